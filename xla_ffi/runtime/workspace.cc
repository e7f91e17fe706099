#include "workspace.h"

#include <cuda_runtime.h>

#include <cstdio>
#include <map>
#include <mutex>
#include <shared_mutex>

#include "../intranode/intranode.h"
#include "../low_latency/low_latency.h"
#include "../layout/layout_kernels.h"
#include "workspace_api.h"

namespace jax_ep {
namespace {

// Never destroyed: at process exit the driver frees device memory, and an NVSHMEM free there
// would wait for peers that may already have left.
std::shared_mutex& Mutex() {
  static auto* m = new std::shared_mutex;
  return *m;
}
std::map<int64_t, std::unique_ptr<Workspace>>& Registry() {
  static auto* r = new std::map<int64_t, std::unique_ptr<Workspace>>;
  return *r;
}
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

cudaError_t PreloadKernels(int device) {
  DeviceGuard guard;
  cudaError_t err = PreloadLayoutKernels(device);
  if (err == cudaSuccess) err = cudaSetDevice(device);
  if (err == cudaSuccess) err = PreloadIntranodeKernels();
  if (err == cudaSuccess) err = PreloadLowLatencyKernels();
  return err;
}

size_t Workspace::max_ranks() const {
  size_t n = 0;
  for (const auto& g : config_.groups) n = std::max(n, g.size());
  return n;
}

size_t Workspace::flags_bytes() const {
  return (max_ranks() * config_.slots_per_rank * 8 + 255) / 256 * 256;
}

size_t Workspace::staging_end() const {
  return kSignalBytes + flags_bytes() + max_ranks() * config_.slots_per_rank * config_.slot_bytes;
}

size_t Workspace::bytes_per_device() const { return staging_end() + internode_bytes(); }

size_t Workspace::BytesPerDevice(const WorkspaceConfig& config) {
  return Workspace(config, nullptr).bytes_per_device();
}

int Workspace::num_nodes() const {
  const int per_node = config_.ranks_per_node;
  return per_node > 0 ? int(max_ranks()) / per_node : 1;
}

size_t Workspace::message_bytes() const {
  return config_.slot_bytes + (4 * kMaxRanks + 15) / 16 * 16;  // keep transport.py in sync
}

size_t Workspace::node_signals_bytes() const {
  return (size_t(num_nodes()) * config_.slots_per_rank * 8 + 255) / 256 * 256;
}

size_t Workspace::internode_bytes() const {
  const size_t nodes = num_nodes();
  if (nodes <= 1) return 0;
  return node_signals_bytes() + 2 * nodes * config_.slots_per_rank * message_bytes();
}

NodeComm Workspace::Nodes(const DeviceSlot& slot) const {
  NodeComm n{};
  const std::vector<int>& group = config_.groups[slot.group];
  for (size_t r = 0; r < group.size(); ++r) n.pes[r] = group[r];
  n.num_nodes = num_nodes();
  n.ranks_per_node = slot.num_ranks / n.num_nodes;
  n.slots = config_.slots_per_rank;
  n.signals_offset = staging_end();
  n.recv_offset = n.signals_offset + node_signals_bytes();
  n.send_offset = n.recv_offset + size_t(n.num_nodes) * n.slots * message_bytes();
  return n;
}

std::unique_ptr<Workspace> Workspace::Create(const WorkspaceConfig& config,
                                             std::unique_ptr<PeerMapping> mapping,
                                             std::string* error) {
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
      *error = "jax_ep: an EP group must have 1.." + std::to_string(kMaxRanks) + " ranks";
      return nullptr;
    }
    if (config.ranks_per_node < 0 ||
        (config.ranks_per_node > 0 && group.size() % size_t(config.ranks_per_node))) {
      *error = "jax_ep: num_ranks_per_node must divide the ranks of every EP group";
      return nullptr;
    }
  }
  std::unique_ptr<Workspace> ws(new Workspace(config, std::move(mapping)));
  // The destructor releases whatever was mapped, unless releasing is collective.
  auto fail = [&](std::string message) -> std::unique_ptr<Workspace> {
    *error = std::move(message);
    if (ws->mapping_->collective()) ws->ranks_.clear();
    return nullptr;
  };
  if (std::string e = ws->mapping_->Map(config.groups, ws->bytes_per_device(),
                                        config.ranks_per_node, &ws->ranks_);
      !e.empty()) {
    return fail(e);
  }
  ws->slots_.resize(ws->ranks_.size());
  for (size_t i = 0; i < ws->ranks_.size(); ++i) {
    const MappedRank& m = ws->ranks_[i];
    DeviceSlot& slot = ws->slots_[i];
    slot.rank = m.rank;
    slot.num_ranks = m.num_ranks;
    slot.group = m.group;
    for (int p = 0; p < m.num_ranks; ++p) slot.peer_ws[p] = m.peer_ws[p];
    slot.epoch = std::make_unique<std::atomic<uint64_t>>(0);
    cudaSetDevice(m.device);
    // All of it, staging too: flags that live inside staging slots (the low-latency combine's
    // chunk flags) must not read as raised from memory a previous workspace left behind.
    if (cudaError_t e = cudaMemset(m.base, 0, ws->bytes_per_device()); e != cudaSuccess) {
      return fail(CudaMessage("cudaMemset", m.device, e));
    }
    if (cudaError_t e = PreloadKernels(m.device); e != cudaSuccess) {
      return fail(CudaMessage("loading kernels", m.device, e));
    }
  }
  if (cudaError_t e = cudaHostAlloc(reinterpret_cast<void**>(&ws->error_), sizeof(ErrorRecord),
                                    cudaHostAllocMapped | cudaHostAllocPortable);
      e != cudaSuccess) {
    return fail(CudaMessage("cudaHostAlloc", -1, e));
  }
  *ws->error_ = ErrorRecord{};
  for (const MappedRank& m : ws->ranks_) {
    cudaSetDevice(m.device);
    if (cudaError_t e = cudaDeviceSynchronize(); e != cudaSuccess) {
      return fail(CudaMessage("initialising the workspace", m.device, e));
    }
  }
  return ws;
}

Workspace::~Workspace() {
  DeviceGuard guard;
  for (const MappedRank& m : ranks_) {
    cudaSetDevice(m.device);
    cudaDeviceSynchronize();  // no kernel of ours may still use it
    mapping_->Release(m);
  }
  if (error_ != nullptr) cudaFreeHost(error_);
}

DeviceSlot* Workspace::Device(int ordinal) {
  for (size_t i = 0; i < ranks_.size(); ++i) {
    if (ranks_[i].device == ordinal) return &slots_[i];
  }
  return nullptr;
}

std::string Workspace::ErrorMessage() const {
  const volatile ErrorRecord* e = error_;
  if (e == nullptr || e->code == 0) return "";
  if (IsMisuse(e->code)) {
    return "jax_ep: rank " + std::to_string(e->rank) + ", " + OpName(e->op) + ": " +
           PhaseName(e->code) +
           " (every receive consumes the ticket of one earlier send; at most two sends of an "
           "op may be in flight)";
  }
  return "jax_ep: rank " + std::to_string(e->rank) + " timed out in " + OpName(e->op) + " (" +
         PhaseName(e->code) + ") waiting for rank " + std::to_string(e->peer) +
         "; every rank of the EP axis must run the same sequence of jax_ep calls";
}

CommArgs Workspace::Comm(DeviceSlot& slot, size_t slot_stride, bool advance_epoch) {
  CommArgs c{};
  for (int p = 0; p < slot.num_ranks; ++p) c.peer_ws[p] = slot.peer_ws[p];
  c.rank = slot.rank;
  c.num_ranks = slot.num_ranks;
  c.epoch = advance_epoch ? slot.epoch->fetch_add(1) + 1 : 0;
  c.timeout_ns = config_.timeout_ns;
  c.slots_per_rank = config_.slots_per_rank;
  c.slot_stride = slot_stride;
  c.flags_offset = kSignalBytes;
  c.staging_offset = kSignalBytes + flags_bytes();
  c.error = error_;
  c.num_blocks = config_.num_blocks;
  c.staged = mapping_->staged();
  return c;
}

int64_t RegisterWorkspace(std::unique_ptr<Workspace> ws) {
  std::unique_lock lock(Mutex());
  const int64_t id = g_next_id++;
  Registry()[id] = std::move(ws);
  return id;
}

void ReleaseWorkspace(int64_t id) {
  std::unique_ptr<Workspace> doomed;
  {
    std::unique_lock lock(Mutex());
    auto it = Registry().find(id);
    if (it == Registry().end()) return;
    doomed = std::move(it->second);
    Registry().erase(it);
  }
}

Workspace* FindWorkspace(int64_t id) {
  std::shared_lock lock(Mutex());
  auto it = Registry().find(id);
  return it == Registry().end() ? nullptr : it->second.get();
}

namespace {

int ViewWorkspace(int64_t id, int32_t device, size_t slot_stride, int take_epoch,
                  JaxEpWorkspaceView* out, char* error, size_t error_len) {
  auto fail = [&](const std::string& message) {
    std::snprintf(error, error_len, "%s", message.c_str());
    return 1;
  };
  Workspace* ws = FindWorkspace(id);
  if (ws == nullptr) return fail("jax_ep: workspace " + std::to_string(id) + " is closed");
  if (std::string message = ws->ErrorMessage(); !message.empty()) return fail(message);
  DeviceSlot* slot = ws->Device(device);
  if (slot == nullptr) {
    return fail("jax_ep: GPU " + std::to_string(device) + " is not part of this Buffer's mesh");
  }
  if (ws->num_nodes() < 2) return fail("jax_ep: this Buffer's workspace has a single node");
  out->comm = ws->Comm(*slot, slot_stride, take_epoch != 0);
  out->nodes = ws->Nodes(*slot);
  out->slots_per_rank = ws->config().slots_per_rank;
  out->slot_bytes = ws->config().slot_bytes;
  out->message_bytes = ws->message_bytes();
  out->num_recv_blocks = ws->config().num_recv_blocks;
  return 0;
}

}  // namespace

const JaxEpWorkspaceApi* WorkspaceApi() {
  static const JaxEpWorkspaceApi api{kWorkspaceApiAbi, sizeof(JaxEpWorkspaceView), ViewWorkspace};
  return &api;
}

}  // namespace jax_ep
