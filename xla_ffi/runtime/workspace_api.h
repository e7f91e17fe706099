// C ABI through which the NVSHMEM extension's handlers (the internode family) reach the
// workspaces the main extension owns: the main extension exports one JaxEpWorkspaceApi table
// (module function `workspace_api`, a PyCapsule), the NVSHMEM extension binds it once at load.
// Both are built from these headers by the same build, so CommArgs / NodeComm agree; the version
// and the view's size guard against mixing builds.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../common/comm.h"

extern "C" {

struct JaxEpWorkspaceView {
  jax_ep::CommArgs comm;   // this call's (its epoch taken)
  jax_ep::NodeComm nodes;  // message_stride: 0, set by the caller
  size_t slots_per_rank;   // staging slots (and message slots per node) per source
  size_t slot_bytes;       // largest staging slot
  size_t message_bytes;    // largest message slot
  int num_recv_blocks;     // receive-only blocks of the SM split
};

struct JaxEpWorkspaceApi {
  int abi_version;   // kWorkspaceApiAbi
  size_t view_size;  // sizeof(JaxEpWorkspaceView)
  // The view of workspace `id` for CUDA device `device` with staging slots of `slot_stride`
  // bytes; take_epoch: a new epoch (the call then must launch: every rank counts its calls),
  // else comm.epoch is 0 (for the checks before). Returns 0, or writes a message into `error`
  // (closed workspace, a recorded timeout, a device outside it, a single-node workspace).
  int (*view)(int64_t id, int32_t device, size_t slot_stride, int take_epoch,
              JaxEpWorkspaceView* out, char* error, size_t error_len);
};

}  // extern "C"

namespace jax_ep {

constexpr int kWorkspaceApiAbi = 1;
constexpr const char* kWorkspaceApiCapsule = "jax_ep.WorkspaceApi";

// The table of this build (runtime/workspace.cc).
const JaxEpWorkspaceApi* WorkspaceApi();

}  // namespace jax_ep
