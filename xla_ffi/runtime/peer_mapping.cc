// The two peer mappings of runtime/peer_mapping.h: in-process P2P, and a table handed over by
// another extension (NVSHMEM).
#include "peer_mapping.h"

#include <cuda_runtime.h>

namespace jax_ep {
namespace {

std::string CudaMessage(const char* what, int device, cudaError_t err) {
  return std::string("jax_ep: ") + what + " on GPU " + std::to_string(device) + ": " +
         cudaGetErrorString(err);
}

std::string AllocationMessage(size_t bytes, int device, size_t free_bytes) {
  return "jax_ep: cannot allocate the " + std::to_string(bytes >> 20) + " MiB workspace on GPU " +
         std::to_string(device) + " (" + std::to_string(free_bytes >> 20) +
         " MiB free): XLA preallocates most of the GPU; lower XLA_PYTHON_CLIENT_MEM_FRACTION "
         "(e.g. 0.6) or max_tokens_per_rank";
}

class P2PMapping final : public PeerMapping {
 public:
  const char* name() const override { return "p2p"; }
  bool staged() const override { return false; }
  bool collective() const override { return false; }

  std::string Map(const std::vector<std::vector<int>>& groups, size_t bytes, int ranks_per_node,
                  std::vector<MappedRank>* out) override {
    if (ranks_per_node > 0 && size_t(ranks_per_node) < groups.front().size()) {
      return "jax_ep: the internode kernels (num_ranks_per_node < ranks) need one process per GPU "
             "(NVSHMEM)";
    }
    for (const auto& group : groups) {
      for (int a : group) {
        for (int b : group) {
          int ok = 1;
          if (a != b && (cudaDeviceCanAccessPeer(&ok, a, b) != cudaSuccess || !ok)) {
            return "jax_ep: GPU " + std::to_string(a) + " cannot access GPU " + std::to_string(b) +
                   " (no peer-to-peer path); backend 'cuda' needs NVLink/P2P between all GPUs "
                   "of the EP axis";
          }
        }
      }
    }
    for (size_t g = 0; g < groups.size(); ++g) {
      const auto& group = groups[g];
      const size_t first = out->size();
      for (size_t r = 0; r < group.size(); ++r) {
        const int dev = group[r];
        if (cudaError_t e = cudaSetDevice(dev); e != cudaSuccess) {
          return CudaMessage("cudaSetDevice", dev, e);
        }
        size_t free_bytes = 0, total = 0;
        cudaMemGetInfo(&free_bytes, &total);
        MappedRank m;
        m.device = dev, m.rank = int(r), m.num_ranks = int(group.size()), m.group = int(g);
        if (bytes > free_bytes || cudaMalloc(&m.base, bytes) != cudaSuccess) {
          cudaGetLastError();
          return AllocationMessage(bytes, dev, free_bytes);
        }
        out->push_back(m);
        for (int peer : group) {
          if (peer == dev) continue;
          cudaError_t e = cudaDeviceEnablePeerAccess(peer, 0);
          if (e == cudaErrorPeerAccessAlreadyEnabled) {
            cudaGetLastError();
          } else if (e != cudaSuccess) {
            return CudaMessage("cudaDeviceEnablePeerAccess", dev, e);
          }
        }
      }
      // Every device of a group sees every member's allocation at the same address.
      for (size_t r = 0; r < group.size(); ++r) {
        for (size_t p = 0; p < group.size(); ++p) {
          (*out)[first + r].peer_ws[p] = (*out)[first + p].base;
        }
      }
    }
    return "";
  }

  void Release(const MappedRank& rank) override {
    cudaSetDevice(rank.device);
    cudaFree(rank.base);
  }
};

class ExternalMapping final : public PeerMapping {
 public:
  explicit ExternalMapping(const JaxEpPeerMappingOps* ops) : ops_(ops) {}
  const char* name() const override { return ops_->name; }
  bool staged() const override { return true; }
  bool collective() const override { return true; }

  std::string Map(const std::vector<std::vector<int>>& groups, size_t bytes, int ranks_per_node,
                  std::vector<MappedRank>* out) override {
    // This process is one PE: it drives exactly the rank of its group that it is.
    const std::vector<int>* mine = nullptr;
    int my_rank = -1, my_group = -1;
    for (size_t g = 0; g < groups.size(); ++g) {
      for (size_t r = 0; r < groups[g].size(); ++r) {
        if (groups[g][r] == ops_->my_pe) mine = &groups[g], my_rank = int(r), my_group = int(g);
      }
    }
    if (mine == nullptr) {
      return "jax_ep: " + std::string(ops_->name) + " PE " + std::to_string(ops_->my_pe) +
             " is in none of the Buffer's EP groups";
    }
    if (cudaError_t e = cudaSetDevice(ops_->device); e != cudaSuccess) {
      return CudaMessage("cudaSetDevice", ops_->device, e);
    }
    MappedRank m;
    m.device = ops_->device, m.rank = my_rank, m.num_ranks = int(mine->size());
    m.group = my_group;
    const int per_node = ranks_per_node > 0 ? ranks_per_node : int(mine->size());
    char error[512] = {0};
    void* base = nullptr;
    if (ops_->allocate(bytes, &base, error, sizeof(error)) != 0) return error;
    m.base = static_cast<uint8_t*>(base);
    out->push_back(m);
    for (size_t p = 0; p < mine->size(); ++p) {
      // Ranks of other nodes are reached only by NVSHMEM puts: keep no pointer to them (on one
      // host nvshmem_ptr would give one, and a kernel must not use it).
      if (int(p) / per_node != my_rank / per_node) continue;
      void* peer = ops_->peer_address(base, (*mine)[p]);
      if (peer == nullptr) {
        return "jax_ep: GPU " + std::to_string(ops_->device) + " (PE " +
               std::to_string(ops_->my_pe) + ") cannot reach rank " + std::to_string(p) +
               " (PE " + std::to_string((*mine)[p]) +
               ") by loads and stores (no NVLink/P2P path): " +
               (ranks_per_node > 0
                    ? std::string("the ranks of a node (num_ranks_per_node) need one NVLink domain")
                    : std::string("this workspace needs every rank of the EP axis in one NVLink "
                                  "domain; across hosts the normal ops run the internode kernels "
                                  "(Buffer num_ranks_per_node, by default the ranks of a host), "
                                  "the low-latency ops have no network leg"));
      }
      out->back().peer_ws[p] = static_cast<uint8_t*>(peer);
    }
    return "";
  }

  void Release(const MappedRank& rank) override { ops_->release(rank.base); }

 private:
  const JaxEpPeerMappingOps* ops_;
};

}  // namespace

std::unique_ptr<PeerMapping> MakeP2PMapping() { return std::make_unique<P2PMapping>(); }

std::unique_ptr<PeerMapping> MakeExternalMapping(const JaxEpPeerMappingOps* ops) {
  return std::make_unique<ExternalMapping>(ops);
}

}  // namespace jax_ep
