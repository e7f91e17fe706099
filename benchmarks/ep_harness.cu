// Normal-mode kernel harness (no JAX): R "virtual ranks" on one GPU run the layout, slot-rank,
// dispatch, combine (rows or weighted), weight-gradient return and broadcast kernels on inputs
// written by benchmarks/ep_harness.py, which checks every output against the numpy model
// (tests/numpy_model.py). Each rank has its own workspace and stream and SMs / R blocks, so all
// ranks are resident at once and the whole protocol runs (direct or staged). Built and driven
// by ep_harness.py; made for compute-sanitizer, where JAX programs are too large to run:
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -Ixla_ffi -lineinfo \
//        benchmarks/ep_harness.cu xla_ffi/intranode/{dispatch,combine,peer_copy}.cu \
//        xla_ffi/layout/layout_kernels.cu -o ep_harness
//   ./ep_harness DIR     # DIR/case.txt + DIR/in.<name>.<rank>.bin -> DIR/out.<name>.<rank>.bin
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "intranode/intranode.h"
#include "layout/layout_kernels.h"

#include "harness.h"

namespace ep_harness {

using namespace jax_ep;

// case.txt: one "key value" per line (ep_harness.py writes it).
struct Case {
  std::map<std::string, long long> v;
  long long operator[](const std::string& key) const {
    auto it = v.find(key);
    if (it == v.end()) {
      std::printf("case.txt has no %s\n", key.c_str());
      std::exit(2);
    }
    return it->second;
  }
};

Case ReadCase(const std::string& dir) {
  Case c;
  std::ifstream in(dir + "/case.txt");
  std::string key;
  long long value;
  while (in >> key >> value) c.v[key] = value;
  return c;
}

// A device copy of DIR/in.<name>.<rank>.bin, or a zeroed device buffer of `bytes` (outputs).
void* Input(const std::string& dir, const std::string& name, int rank, size_t bytes) {
  std::vector<char> host(bytes);
  std::ifstream in(dir + "/in." + name + "." + std::to_string(rank) + ".bin", std::ios::binary);
  if (!in.read(host.data(), std::streamsize(bytes)) && bytes) {
    std::printf("in.%s.%d.bin: expected %zu bytes\n", name.c_str(), rank, bytes);
    std::exit(2);
  }
  void* d = nullptr;
  CHECK(cudaMalloc(&d, std::max<size_t>(bytes, 16)));
  CHECK(cudaMemcpy(d, host.data(), bytes, cudaMemcpyHostToDevice));
  return d;
}

void* Output(size_t bytes) {
  void* d = nullptr;
  CHECK(cudaMalloc(&d, std::max<size_t>(bytes, 16)));
  CHECK(cudaMemset(d, 0xa5, std::max<size_t>(bytes, 16)));  // garbage: unwritten rows show
  return d;
}

void Dump(const std::string& dir, const std::string& name, int rank, const void* d, size_t bytes) {
  std::vector<char> host(bytes);
  CHECK(cudaMemcpy(host.data(), d, bytes, cudaMemcpyDeviceToHost));
  std::ofstream(dir + "/out." + name + "." + std::to_string(rank) + ".bin", std::ios::binary)
      .write(host.data(), std::streamsize(bytes));
}

struct Rank {
  cudaStream_t stream;
  CommArgs comm;
  LayoutArgs layout{};
  DispatchArgs dispatch{};
  ReturnArgs combine{}, grads{};
  BroadcastArgs broadcast{};
  int32_t* pos_in_src;
};

int Run(const std::string& dir) {
  const Case k = ReadCase(dir);
  const int R = int(k["ranks"]), T = int(k["tokens"]), K = int(k["topk"]), E = int(k["experts"]);
  const int C = int(k["capacity"]), S = int(k["send_capacity"]), L = E / R;
  const bool expert = k["expert_layout"] != 0, staged = k["staged"] != 0;
  const size_t x_row = size_t(k["x_row_bytes"]), value_row = size_t(k["value_row_bytes"]);
  const int num_scales = int(k["num_scales"]), width = int(k["y_width"]);
  const ElemType elem = ElemType(k["y_elem"]);
  const size_t elem_bytes = elem == kF32 ? 4 : 2;
  const int iters = int(k["iters"]);
  // One workspace per rank, sized for every op of the case (as Buffer sizes it for the largest).
  const size_t slots = std::max(T, 1);
  const size_t slot_bytes = std::max({DispatchSlotBytes(K, x_row, num_scales, staged),
                                      ReturnSlotBytes(width, elem, kReturnWeighted, K),
                                      ReturnSlotBytes(K, kF32, kReturnGatherK, K),
                                      ReturnSlotBytes(K, kF32, kReturnRows, K),
                                      Align16(value_row)});
  const size_t flags = (size_t(R) * slots * 8 + 255) / 256 * 256;
  const size_t ws_bytes = kSignalBytes + flags + size_t(R) * slots * slot_bytes;
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const int blocks = k["blocks"] ? int(k["blocks"]) : std::max(1, sms / R);
  const int recv_blocks = blocks > 1 ? blocks - std::max(blocks / 4, 1) : 0;
  ErrorRecord* err = nullptr;
  CHECK(cudaHostAlloc(&err, sizeof(ErrorRecord), cudaHostAllocMapped));
  std::memset(err, 0, sizeof(ErrorRecord));
  ErrorRecord* err_dev = nullptr;
  CHECK(cudaHostGetDevicePointer(&err_dev, err, 0));
  CHECK(PreloadLayoutKernels(0));
  CHECK(PreloadIntranodeKernels());

  std::vector<uint8_t*> ws(R);
  for (auto& w : ws) {
    w = static_cast<uint8_t*>(Output(ws_bytes));
    CHECK(cudaMemset(w, 0, ws_bytes));
  }
  std::vector<Rank> ranks(R);
  for (int r = 0; r < R; ++r) {
    Rank& q = ranks[r];
    CHECK(cudaStreamCreateWithFlags(&q.stream, cudaStreamNonBlocking));
    CommArgs& c = q.comm;
    for (int p = 0; p < R; ++p) c.peer_ws[p] = ws[p];
    c.rank = r, c.num_ranks = R, c.epoch = 0, c.timeout_ns = uint64_t(k["timeout_s"]) * 1000000000ull;
    c.slots_per_rank = slots, c.flags_offset = kSignalBytes, c.staging_offset = kSignalBytes + flags;
    c.error = err_dev, c.num_blocks = blocks, c.staged = staged;

    const auto* idx = static_cast<const int32_t*>(Input(dir, "idx", r, size_t(T) * K * 4));
    LayoutArgs& l = q.layout;
    l.topk_idx = idx, l.num_tokens = T, l.num_topk = K, l.num_experts = E, l.num_ranks = R;
    l.num_tokens_per_rank = static_cast<int32_t*>(Output(R * 4));
    l.num_tokens_per_expert = static_cast<int32_t*>(Output(E * 4));
    l.is_token_in_rank = static_cast<bool*>(Output(size_t(T) * R));
    l.num_invalid = static_cast<int32_t*>(Output(4));
    q.pos_in_src = static_cast<int32_t*>(Output(size_t(T) * K * 4));

    DispatchArgs& a = q.dispatch;
    a.x = static_cast<const uint8_t*>(Input(dir, "x", r, T * x_row));
    a.x_row_bytes = x_row, a.num_scales = num_scales;
    a.scales = num_scales ? static_cast<const float*>(Input(dir, "scales", r,
                                                            size_t(T) * num_scales * 4))
                          : nullptr;
    a.topk_idx = idx;
    a.topk_weights = static_cast<const float*>(Input(dir, "w", r, size_t(T) * K * 4));
    a.pos_in_src = q.pos_in_src;
    a.send_pos = static_cast<const int32_t*>(Input(dir, "send_pos", r, size_t(T) * R * 4));
    a.tokens_per_rank = l.num_tokens_per_rank, a.tokens_per_expert = l.num_tokens_per_expert;
    a.num_tokens = T, a.num_topk = K, a.num_experts = E, a.num_local_experts = L;
    a.recv_capacity = C, a.expert_alignment = int(k["alignment"]), a.send_capacity = S;
    a.expert_layout = expert, a.num_recv_blocks = expert || staged ? recv_blocks : 0;
    const int idx_width = expert ? 1 : K;
    a.recv_x = static_cast<uint8_t*>(Output(C * x_row));
    a.recv_scales = num_scales ? static_cast<float*>(Output(size_t(C) * num_scales * 4)) : nullptr;
    a.recv_topk_idx = static_cast<int32_t*>(Output(size_t(C) * idx_width * 4));
    a.recv_topk_weights = static_cast<float*>(Output(size_t(C) * idx_width * 4));
    a.group_sizes = expert ? static_cast<int32_t*>(Output(L * 4)) : nullptr;
    a.num_recv_rows = static_cast<int32_t*>(Output(4));
    a.num_tokens_per_expert = static_cast<int32_t*>(Output(L * 4));
    a.num_dropped = static_cast<int32_t*>(Output(4));
    a.recv_rows = static_cast<int32_t*>(Output(size_t(R) * S * (expert ? K : 1) * 4));
    a.row_src = static_cast<int32_t*>(Output(size_t(C) * 4));
    a.recv_count = static_cast<int32_t*>(Output(R * 4));

    // combine: the rows (token layout) or their weighted sums (expert layout, the row weights
    // dispatch returned); the weight gradients: [C, K] rows back (token layout) or the gather of
    // [C] row values into the K slots (expert layout), as ops.py's VJP calls them.
    ReturnArgs& m = q.combine;
    m.y = Input(dir, "y", r, size_t(C) * width * elem_bytes);
    m.width = width, m.elem = elem, m.mode = expert ? kReturnWeighted : kReturnRows;
    m.recv_rows = a.recv_rows, m.recv_count = a.recv_count;
    m.row_weights = expert ? a.recv_topk_weights : nullptr;
    m.send_pos = a.send_pos, m.out = Output(size_t(T) * width * elem_bytes);
    m.num_tokens = T, m.num_topk = expert ? K : 1, m.recv_capacity = C, m.send_capacity = S;
    ReturnArgs& g = q.grads;
    g = m;
    g.y = Input(dir, "row_grads", r, size_t(C) * idx_width * 4);
    g.width = expert ? 1 : K, g.elem = kF32, g.mode = expert ? kReturnGatherK : kReturnRows;
    g.row_weights = nullptr, g.num_topk = expert ? K : 1;
    g.out = Output(size_t(T) * K * 4);

    BroadcastArgs& b = q.broadcast;
    b.values = static_cast<const uint8_t*>(Input(dir, "values", r, T * value_row));
    b.row_bytes = value_row, b.send_pos = a.send_pos, b.row_src = a.row_src;
    b.rows = static_cast<uint8_t*>(Output(C * value_row));
    b.num_tokens = T, b.recv_capacity = C, b.send_capacity = S;
  }
  CHECK(cudaDeviceSynchronize());

  // Every op on every rank (its own stream, no host sync in between, as XLA runs them); each
  // exchange is one epoch on all ranks.
  uint64_t epoch = 0;
  auto exchange = [&](auto launch, size_t stride) {
    ++epoch;
    for (Rank& q : ranks) {
      CommArgs c = q.comm;
      c.epoch = epoch, c.slot_stride = stride;
      CHECK(launch(q, c));
    }
  };
  for (int it = 0; it < iters; ++it) {
    for (Rank& q : ranks) {
      CHECK(LaunchDispatchLayout(q.layout, sms, q.stream));
      CHECK(LaunchSlotRanks(q.dispatch.topk_idx, T * K, E, q.pos_in_src, q.stream));
      if (!expert) {
        CHECK(cudaMemsetAsync(q.dispatch.num_tokens_per_expert, 0, L * 4, q.stream));
      }
    }
    exchange([](Rank& q, const CommArgs& c) { return LaunchDispatch(c, q.dispatch, q.stream); },
             DispatchSlotBytes(K, x_row, num_scales, staged));
    exchange([](Rank& q, const CommArgs& c) { return LaunchReturn(c, q.combine, q.stream); },
             ReturnSlotBytes(width, elem, ranks[0].combine.mode, K));
    exchange([](Rank& q, const CommArgs& c) { return LaunchReturn(c, q.grads, q.stream); },
             ReturnSlotBytes(ranks[0].grads.width, kF32, ranks[0].grads.mode, K));
    exchange([](Rank& q, const CommArgs& c) { return LaunchBroadcast(c, q.broadcast, q.stream); },
             Align16(value_row));
    const cudaError_t e = cudaDeviceSynchronize();
    if (e != cudaSuccess || err->code != 0) {
      std::printf("iteration %d: %s; error record code %d op %d rank %d peer %d\n", it,
                  cudaGetErrorString(e), err->code, err->op, err->rank, err->peer);
      return 1;
    }
  }

  for (int r = 0; r < R; ++r) {
    const Rank& q = ranks[r];
    const DispatchArgs& a = q.dispatch;
    const int idx_width = expert ? 1 : K;
    Dump(dir, "num_tokens_per_rank", r, q.layout.num_tokens_per_rank, R * 4);
    Dump(dir, "num_tokens_per_expert_all", r, q.layout.num_tokens_per_expert, E * 4);
    Dump(dir, "is_token_in_rank", r, q.layout.is_token_in_rank, size_t(T) * R);
    Dump(dir, "num_invalid", r, q.layout.num_invalid, 4);
    Dump(dir, "pos_in_src", r, q.pos_in_src, size_t(T) * K * 4);
    Dump(dir, "recv_x", r, a.recv_x, C * x_row);
    if (num_scales) Dump(dir, "recv_x_scales", r, a.recv_scales, size_t(C) * num_scales * 4);
    Dump(dir, "recv_topk_idx", r, a.recv_topk_idx, size_t(C) * idx_width * 4);
    Dump(dir, "recv_topk_weights", r, a.recv_topk_weights, size_t(C) * idx_width * 4);
    if (expert) Dump(dir, "group_sizes", r, a.group_sizes, L * 4);
    Dump(dir, "num_recv_rows", r, a.num_recv_rows, 4);
    Dump(dir, "num_tokens_per_expert", r, a.num_tokens_per_expert, L * 4);
    Dump(dir, "num_dropped", r, a.num_dropped, 4);
    Dump(dir, "combine", r, q.combine.out, size_t(T) * width * elem_bytes);
    Dump(dir, "weight_grads", r, q.grads.out, size_t(T) * K * 4);
    Dump(dir, "broadcast", r, q.broadcast.rows, C * value_row);
  }
  std::printf("ep_harness: %d ranks, %d iterations, %d blocks per rank: done\n", R, iters, blocks);
  return 0;
}

}  // namespace ep_harness

int main(int argc, char** argv) {
  if (argc != 2) {
    std::printf("usage: %s DIR (written by benchmarks/ep_harness.py)\n", argv[0]);
    return 2;
  }
  return ep_harness::Run(argv[1]);
}
