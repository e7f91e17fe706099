// Device workspaces of the EP groups (one per jax_ep.Buffer with backend "cuda").
//
// Everything that takes driver locks happens here, at Buffer creation and outside jit:
// allocation and peer mapping (through a PeerMapping: P2P or NVSHMEM), kernel loading.
// Handlers only look a workspace up.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "../common/comm.h"
#include "peer_mapping.h"

namespace jax_ep {

struct DeviceSlot {
  int rank = -1;                  // position in its EP group
  int num_ranks = 0;
  int group = -1;                 // index of its EP group in WorkspaceConfig::groups
  uint8_t* peer_ws[kMaxRanks] = {};
  std::unique_ptr<std::atomic<uint64_t>> epoch;  // calls issued on this device
};

struct WorkspaceConfig {
  // Members of each EP group in rank order: device ordinals (P2P) or PEs (NVSHMEM).
  std::vector<std::vector<int>> groups;
  size_t slots_per_rank = 0;             // staging slots reserved per source rank
  size_t slot_bytes = 0;                 // largest staging slot
  int num_blocks = 0;                    // grid of every kernel (<= SMs, <= kMaxBlocks)
  int num_recv_blocks = 0;               // receive-only blocks of the SM split
  uint64_t timeout_ns = 0;
  // G: ranks of a node. 0 or the group size: one node. Smaller (NVSHMEM only): the workspace also
  // holds the internode message slots, and ranks of other nodes need not be reachable.
  int ranks_per_node = 0;
};

class Workspace {
 public:
  // Returns nullptr and sets *error when the GPUs cannot host it.
  static std::unique_ptr<Workspace> Create(const WorkspaceConfig& config,
                                           std::unique_ptr<PeerMapping> mapping,
                                           std::string* error);
  ~Workspace();

  // nullptr when the device is not part of this workspace.
  DeviceSlot* Device(int ordinal);
  const WorkspaceConfig& config() const { return config_; }
  const char* transport() const { return mapping_->name(); }
  bool staged() const { return mapping_->staged(); }
  size_t bytes_per_device() const;
  // bytes_per_device() of a workspace with this configuration (jax_ep/backends/transport.py
  // sizes NVSHMEM's heap with it before creating one).
  static size_t BytesPerDevice(const WorkspaceConfig& config);
  size_t flags_bytes() const;  // arrival flags [R][slots_per_rank] u64, after the signal area
  size_t staging_end() const;  // signal area + flags + staging: where the internode area starts
  size_t node_signals_bytes() const;  // the internode area's arrival signals, u64 [N][slots]
  int num_nodes() const;       // N (1: a single-node workspace)
  // The internode area after the staging (0 bytes with one node): per node, a message slot per
  // token and its arrival signal (receive side) and a message slot per token (send side).
  size_t internode_bytes() const;
  size_t message_bytes() const;  // largest message slot: a staged slot + G forward slots
  // The nodes of this device's EP group (message_stride left for the caller).
  NodeComm Nodes(const DeviceSlot& slot) const;
  // "" when no kernel reported a timeout, else the report.
  std::string ErrorMessage() const;
  // advance_epoch = false: the low-latency kernels keep their generations on the device (a
  // handler replayed from a CUDA graph runs without its host code).
  CommArgs Comm(DeviceSlot& slot, size_t slot_stride, bool advance_epoch = true);

 private:
  Workspace(WorkspaceConfig config, std::unique_ptr<PeerMapping> mapping)
      : config_(std::move(config)), mapping_(std::move(mapping)) {}
  size_t max_ranks() const;  // ranks of the largest EP group
  WorkspaceConfig config_;
  std::unique_ptr<PeerMapping> mapping_;
  std::vector<MappedRank> ranks_;  // the ranks this process drives
  std::vector<DeviceSlot> slots_;  // indexed like ranks_
  ErrorRecord* error_ = nullptr;   // host-mapped
};

// Loads every kernel of every family on `device` (lazy loading would take a driver lock inside
// a handler while peers spin). Restores the current device.
cudaError_t PreloadKernels(int device);

// Registry: ids handed to Python; handlers find their workspace by id and DeviceOrdinal.
int64_t RegisterWorkspace(std::unique_ptr<Workspace> ws);
void ReleaseWorkspace(int64_t id);
Workspace* FindWorkspace(int64_t id);

}  // namespace jax_ep
