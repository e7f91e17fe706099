#include "ep_runtime.h"

#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <shared_mutex>

namespace jax_ep {
namespace {

std::shared_mutex g_mutex;
std::map<int64_t, std::unique_ptr<Workspace>> g_workspaces;
int64_t g_next_id = 1;

std::string CudaMessage(const char* what, int device, cudaError_t err) {
  return std::string("jax_ep: ") + what + " on GPU " + std::to_string(device) + ": " +
         cudaGetErrorString(err);
}

// Restores the caller's current device (JAX's threads rely on their own).
struct DeviceGuard {
  int saved = 0;
  DeviceGuard() { cudaGetDevice(&saved); }
  ~DeviceGuard() { cudaSetDevice(saved); }
};

}  // namespace

size_t Workspace::max_ranks() const {
  size_t n = 0;
  for (const auto& g : config_.groups) n = std::max(n, g.size());
  return n;
}

size_t Workspace::flags_bytes() const {
  return (max_ranks() * config_.slots_per_rank * 8 + 255) / 256 * 256;
}

size_t Workspace::bytes_per_device() const {
  return kSignalBytes + flags_bytes() + max_ranks() * config_.slots_per_rank * config_.slot_bytes;
}

std::unique_ptr<Workspace> Workspace::Create(const WorkspaceConfig& config, std::string* error) {
  std::unique_ptr<Workspace> ws(new Workspace(config));
  DeviceGuard guard;
  if (config.num_blocks < 1 || config.num_blocks > kMaxBlocks) {
    *error = "jax_ep: num_sms must be in [1, " + std::to_string(kMaxBlocks) + "]";
    return nullptr;
  }
  if (config.num_recv_blocks < 0 || config.num_recv_blocks >= config.num_blocks) {
    *error = "jax_ep: num_recv_sms must be in [0, num_sms)";
    return nullptr;
  }
  for (const auto& group : config.groups) {
    if (group.empty() || group.size() > size_t(kMaxRanks)) {
      *error = "jax_ep: an EP group must have 1.." + std::to_string(kMaxRanks) + " GPUs";
      return nullptr;
    }
    for (int a : group) {
      for (int b : group) {
        int ok = 1;
        if (a != b && (cudaDeviceCanAccessPeer(&ok, a, b) != cudaSuccess || !ok)) {
          *error = "jax_ep: GPU " + std::to_string(a) + " cannot access GPU " + std::to_string(b) +
                   " (no peer-to-peer path); backend 'cuda' needs NVLink/P2P between all GPUs "
                   "of the EP axis";
          return nullptr;
        }
      }
    }
  }
  const size_t bytes = ws->bytes_per_device();
  for (const auto& group : config.groups) {
    for (size_t r = 0; r < group.size(); ++r) {
      const int dev = group[r];
      if (cudaError_t e = cudaSetDevice(dev); e != cudaSuccess) {
        *error = CudaMessage("cudaSetDevice", dev, e);
        return nullptr;
      }
      size_t free_bytes = 0, total = 0;
      cudaMemGetInfo(&free_bytes, &total);
      uint8_t* base = nullptr;
      if (bytes > free_bytes || cudaMalloc(&base, bytes) != cudaSuccess) {
        cudaGetLastError();
        *error = "jax_ep: cannot allocate the " + std::to_string(bytes >> 20) +
                 " MiB workspace on GPU " + std::to_string(dev) + " (" +
                 std::to_string(free_bytes >> 20) +
                 " MiB free): XLA preallocates most of the GPU; lower "
                 "XLA_PYTHON_CLIENT_MEM_FRACTION (e.g. 0.6) or max_tokens_per_rank";
        return nullptr;
      }
      ws->ordinals_.push_back(dev);
      ws->bases_.push_back(base);
      if (cudaError_t e = cudaMemset(base, 0, kSignalBytes + ws->flags_bytes()); e != cudaSuccess) {
        *error = CudaMessage("cudaMemset", dev, e);
        return nullptr;
      }
      for (int peer : group) {
        if (peer == dev) continue;
        cudaError_t e = cudaDeviceEnablePeerAccess(peer, 0);
        if (e == cudaErrorPeerAccessAlreadyEnabled) {
          cudaGetLastError();
        } else if (e != cudaSuccess) {
          *error = CudaMessage("cudaDeviceEnablePeerAccess", dev, e);
          return nullptr;
        }
      }
      if (cudaError_t e = PreloadKernels(); e != cudaSuccess) {
        *error = CudaMessage("loading kernels", dev, e);
        return nullptr;
      }
    }
  }
  // Peer tables: every device of a group sees every group member's workspace.
  size_t index = 0;
  ws->slots_.resize(ws->ordinals_.size());
  for (const auto& group : config.groups) {
    for (size_t r = 0; r < group.size(); ++r) {
      DeviceSlot& slot = ws->slots_[index + r];
      slot.rank = int(r);
      slot.num_ranks = int(group.size());
      for (size_t p = 0; p < group.size(); ++p) slot.peer_ws[p] = ws->bases_[index + p];
      slot.epoch = std::make_unique<std::atomic<uint64_t>>(0);
    }
    index += group.size();
  }
  if (cudaError_t e = cudaHostAlloc(reinterpret_cast<void**>(&ws->error_), sizeof(ErrorRecord),
                                    cudaHostAllocMapped | cudaHostAllocPortable);
      e != cudaSuccess) {
    *error = CudaMessage("cudaHostAlloc", -1, e);
    return nullptr;
  }
  *ws->error_ = ErrorRecord{};
  for (int dev : ws->ordinals_) {
    cudaSetDevice(dev);
    if (cudaError_t e = cudaDeviceSynchronize(); e != cudaSuccess) {
      *error = CudaMessage("initialising the workspace", dev, e);
      return nullptr;
    }
  }
  return ws;
}

Workspace::~Workspace() {
  DeviceGuard guard;
  for (size_t i = 0; i < bases_.size(); ++i) {
    cudaSetDevice(ordinals_[i]);
    cudaDeviceSynchronize();  // no kernel of ours may still use it
    cudaFree(bases_[i]);
  }
  if (error_ != nullptr) cudaFreeHost(error_);
}

DeviceSlot* Workspace::Device(int ordinal) {
  for (size_t i = 0; i < ordinals_.size(); ++i) {
    if (ordinals_[i] == ordinal) return &slots_[i];
  }
  return nullptr;
}

std::string Workspace::ErrorMessage() const {
  const volatile ErrorRecord* e = error_;
  if (e == nullptr || e->code == 0) return "";
  return "jax_ep: rank " + std::to_string(e->rank) + " timed out in " + OpName(e->op) + " (" +
         PhaseName(e->code) + ") waiting for rank " + std::to_string(e->peer) +
         "; every rank of the EP axis must run the same sequence of jax_ep calls";
}

CommArgs Workspace::Comm(DeviceSlot& slot, size_t slot_stride) {
  CommArgs c{};
  for (int p = 0; p < slot.num_ranks; ++p) c.peer_ws[p] = slot.peer_ws[p];
  c.rank = slot.rank;
  c.num_ranks = slot.num_ranks;
  c.epoch = slot.epoch->fetch_add(1) + 1;
  c.timeout_ns = config_.timeout_ns;
  c.slots_per_rank = config_.slots_per_rank;
  c.slot_stride = slot_stride;
  c.flags_offset = kSignalBytes;
  c.staging_offset = kSignalBytes + flags_bytes();
  c.error = error_;
  c.num_blocks = config_.num_blocks;
  return c;
}

int64_t RegisterWorkspace(std::unique_ptr<Workspace> ws) {
  std::unique_lock lock(g_mutex);
  const int64_t id = g_next_id++;
  g_workspaces[id] = std::move(ws);
  return id;
}

void ReleaseWorkspace(int64_t id) {
  std::unique_ptr<Workspace> doomed;
  {
    std::unique_lock lock(g_mutex);
    auto it = g_workspaces.find(id);
    if (it == g_workspaces.end()) return;
    doomed = std::move(it->second);
    g_workspaces.erase(it);
  }
}

Workspace* FindWorkspace(int64_t id) {
  std::shared_lock lock(g_mutex);
  auto it = g_workspaces.find(id);
  return it == g_workspaces.end() ? nullptr : it->second.get();
}

}  // namespace jax_ep
