// The transport seam: how the workspaces of an EP group are allocated and how every rank reaches
// every other rank's workspace with loads and stores.
//   P2P      one process drives every GPU of the group: cudaMalloc per GPU, peer access enabled;
//            peers may also write this rank's XLA buffers (the kernels' direct paths).
//   NVSHMEM  one process per GPU: the workspace comes from nvshmem_malloc and peers are mapped
//            with nvshmem_ptr; peers reach only the workspaces, so the kernels stage every row.
//            Implemented by the extension jax_ep._jax_ep_nvshmem (its own separable-compilation
//            target), which hands a PeerMappingOps table over as a PyCapsule.
// Everything here runs at Buffer creation, outside jit: it takes driver locks.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "../common/comm.h"

extern "C" {

// C ABI between extension modules (each links its own CUDA runtime and C++ library).
struct JaxEpPeerMappingOps {
  int abi_version;    // kPeerMappingAbi
  const char* name;   // "nvshmem"
  int device;         // this process's GPU (one per PE)
  int my_pe;          // this process's PE
  int num_pes;
  // Allocates `bytes` of peer-mappable memory on `device`. Collective: every PE calls it in the
  // same order with the same size. Returns 0, or writes a message into `error`.
  int (*allocate)(size_t bytes, void** base, char* error, size_t error_len);
  // The address at which this GPU reaches PE `pe`'s allocation `base` by loads and stores, or
  // nullptr when it cannot (no NVLink/P2P path).
  void* (*peer_address)(void* base, int pe);
  // Frees an allocation; collective like allocate.
  void (*release)(void* base);
};

}  // extern "C"

namespace jax_ep {

constexpr int kPeerMappingAbi = 1;
constexpr const char* kPeerMappingCapsule = "jax_ep.PeerMappingOps";

// One rank of an EP group that this process drives, with the peers' workspaces it sees.
struct MappedRank {
  int device = -1;      // CUDA ordinal
  int rank = -1;        // position in its EP group
  int num_ranks = 0;
  int group = -1;       // index of its EP group
  uint8_t* base = nullptr;          // its own workspace
  uint8_t* peer_ws[kMaxRanks] = {};  // every rank's workspace, as this GPU addresses it
                                     // (null for ranks of other nodes)
};

class PeerMapping {
 public:
  virtual ~PeerMapping() = default;
  virtual const char* name() const = 0;
  // Peers reach only the workspaces, not this rank's XLA buffers: the kernels stage every row.
  virtual bool staged() const = 0;
  // Allocation and release are collective over processes: a failed creation keeps what it got
  // (its peers may have succeeded and would wait in a release).
  virtual bool collective() const = 0;
  // Allocates `bytes` for every rank of `groups` this process drives and maps the peers.
  // groups: the members of each EP group in rank order (P2P: device ordinals; NVSHMEM: PEs).
  // ranks_per_node G: only the ranks of a node (G consecutive ranks) must reach each other by
  // loads and stores (peer_ws is null across nodes); 0: the whole group.
  // Returns "" or an error message (whatever was allocated is in *out, to be released).
  virtual std::string Map(const std::vector<std::vector<int>>& groups, size_t bytes,
                          int ranks_per_node, std::vector<MappedRank>* out) = 0;
  virtual void Release(const MappedRank& rank) = 0;
};

std::unique_ptr<PeerMapping> MakeP2PMapping();
// Wraps a table from another extension; it must outlive the mapping (a static there).
std::unique_ptr<PeerMapping> MakeExternalMapping(const JaxEpPeerMappingOps* ops);

}  // namespace jax_ep
