// Python module jax_ep._jax_ep_cuda: the FFI handlers (jax_ep/_ffi.py registers them) and
// the eager set-up calls that must happen outside jit.
#include <nanobind/nanobind.h>

#include <stdexcept>
#include <string>

#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "handlers.h"
#include "layout/layout_kernels.h"
#include "runtime/workspace.h"
#include "runtime/workspace_api.h"

namespace nb = nanobind;

NB_MODULE(_jax_ep_cuda, m) {
  m.doc() = "jax_ep CUDA kernels as XLA FFI handlers";

  m.def(
      "registrations",
      [] {
        nb::dict targets;
        targets["jax_ep_dispatch_layout"] = nb::capsule(jax_ep::DispatchLayoutHandler());
        targets["jax_ep_dispatch"] = nb::capsule(jax_ep::DispatchHandler());
        targets["jax_ep_combine"] = nb::capsule(jax_ep::ReturnHandler());
        targets["jax_ep_broadcast"] = nb::capsule(jax_ep::BroadcastHandler());
        targets["jax_ep_peer_copy"] = nb::capsule(jax_ep::PeerCopyHandler());
        targets["jax_ep_slot_ranks"] = nb::capsule(jax_ep::SlotRanksHandler());
        targets["jax_ep_ll_dispatch_send"] = nb::capsule(jax_ep::LLDispatchSendHandler());
        targets["jax_ep_ll_dispatch_recv"] = nb::capsule(jax_ep::LLDispatchRecvHandler());
        targets["jax_ep_ll_combine_send"] = nb::capsule(jax_ep::LLCombineSendHandler());
        targets["jax_ep_ll_combine_recv"] = nb::capsule(jax_ep::LLCombineRecvHandler());
        targets["jax_ep_ll_dispatch"] = nb::capsule(jax_ep::LLDispatchHandler());
        targets["jax_ep_ll_combine"] = nb::capsule(jax_ep::LLCombineHandler());
        return targets;
      },
      "dict {FFI target name: PyCapsule of its handler}, for jax.ffi.register_ffi_target.");

  m.def(
      "command_buffer_targets",
      [] {
        // Handlers declared kCmdBufferCompatible (stateless per call: low-latency ops). The trait
        // in XLA_FFI_DEFINE_HANDLER does not travel with a capsule: registration passes it.
        return std::vector<std::string>{"jax_ep_ll_dispatch_send", "jax_ep_ll_dispatch_recv",
                                        "jax_ep_ll_combine_send",  "jax_ep_ll_combine_recv",
                                        "jax_ep_ll_dispatch",      "jax_ep_ll_combine"};
      },
      "FFI targets XLA may record into CUDA graphs (command buffers).");

  m.def(
      "preload",
      [](int device) {
        const cudaError_t err = jax_ep::PreloadKernels(device);
        if (err != cudaSuccess) {
          throw std::runtime_error("jax_ep: loading kernels on GPU " + std::to_string(device) +
                                   ": " + cudaGetErrorString(err));
        }
      },
      nb::arg("device"),
      "Load every kernel on CUDA device `device` now (not lazily at a first launch).");

  m.attr("SIGNAL_BYTES") = jax_ep::kSignalBytes;
  m.attr("MAX_RANKS") = jax_ep::kMaxRanks;
  m.attr("PEER_MAPPING_ABI") = jax_ep::kPeerMappingAbi;

  m.def(
      "create_workspace",
      [](std::vector<std::vector<int>> groups, size_t slots_per_rank, size_t slot_bytes,
         int num_blocks, int num_recv_blocks, uint64_t timeout_ns, nb::object mapping,
         int ranks_per_node) {
        jax_ep::WorkspaceConfig config{std::move(groups), slots_per_rank, slot_bytes, num_blocks,
                                       num_recv_blocks, timeout_ns, ranks_per_node};
        std::unique_ptr<jax_ep::PeerMapping> peers;
        if (mapping.is_none()) {
          peers = jax_ep::MakeP2PMapping();
        } else {
          auto capsule = nb::cast<nb::capsule>(mapping);
          const char* name = capsule.name();
          if (name == nullptr || std::string(name) != jax_ep::kPeerMappingCapsule) {
            throw std::invalid_argument("jax_ep: mapping must be a jax_ep.PeerMappingOps capsule");
          }
          const auto* ops = static_cast<const JaxEpPeerMappingOps*>(capsule.data());
          if (ops->abi_version != jax_ep::kPeerMappingAbi) {
            throw std::runtime_error("jax_ep: the peer-mapping extension has ABI " +
                                     std::to_string(ops->abi_version) + ", expected " +
                                     std::to_string(jax_ep::kPeerMappingAbi) +
                                     " (rebuild jax_ep)");
          }
          peers = jax_ep::MakeExternalMapping(ops);
        }
        std::string error;
        auto ws = jax_ep::Workspace::Create(config, std::move(peers), &error);
        if (ws == nullptr) throw std::runtime_error(error);
        return jax_ep::RegisterWorkspace(std::move(ws));
      },
      nb::arg("groups"), nb::arg("slots_per_rank"), nb::arg("slot_bytes"), nb::arg("num_blocks"),
      nb::arg("num_recv_blocks"), nb::arg("timeout_ns"), nb::arg("mapping") = nb::none(),
      nb::arg("ranks_per_node") = 0,
      "Allocates the EP workspaces and maps the peers, loads the kernels; returns the workspace "
      "id. mapping=None: P2P in this process (groups: device ordinals of each EP group in rank "
      "order); else a PeerMappingOps capsule (NVSHMEM; groups: PEs). ranks_per_node G < group "
      "size: several nodes (NVSHMEM only): the internode message slots, no mapping across "
      "nodes.");
  m.def(
      "workspace_api",
      [] {
        return nb::capsule(static_cast<const void*>(jax_ep::WorkspaceApi()),
                           jax_ep::kWorkspaceApiCapsule);
      },
      "The workspace lookup table (a PyCapsule) the NVSHMEM extension's handlers bind.");
  m.def(
      "workspace_bytes",
      [](int num_ranks, size_t slots_per_rank, size_t slot_bytes, int ranks_per_node) {
        jax_ep::WorkspaceConfig config;
        config.groups = {std::vector<int>(size_t(num_ranks))};
        config.slots_per_rank = slots_per_rank, config.slot_bytes = slot_bytes;
        config.ranks_per_node = ranks_per_node;
        return jax_ep::Workspace::BytesPerDevice(config);
      },
      nb::arg("num_ranks"), nb::arg("slots_per_rank"), nb::arg("slot_bytes"),
      nb::arg("ranks_per_node") = 0,
      "Bytes per GPU of a workspace (signal area, flags, staging, internode message slots).");
  m.def("release_workspace", &jax_ep::ReleaseWorkspace, nb::arg("id"),
        "Frees a workspace (waits for the devices first).");
  m.def(
      "workspace_error",
      [](int64_t id) {
        jax_ep::Workspace* ws = jax_ep::FindWorkspace(id);
        return ws == nullptr ? std::string() : ws->ErrorMessage();
      },
      nb::arg("id"), "The timeout report of a workspace's kernels, or ''.");
}
