// Low-latency kernel harness (no JAX): device time of the LL kernels and, built with
// -DJAX_EP_LL_TRACE, where inside them the time goes. R "virtual ranks" share one GPU (each its
// own workspace, its kernel on its own stream, SMs / R blocks each so all ranks are resident),
// which exercises the whole protocol; at R = 1 it is the issue-10 configuration (EP1).
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -Ixla_ffi [-DJAX_EP_LL_TRACE] \
//        benchmarks/ll_phases.cu -o ll_phases
//   ./ll_phases [--ranks 1] [--tokens 128] [--hidden 7168] [--topk 8] [--experts 288]
//               [--bf16] [--iters 500] [--blocks N]
// Checks first (and again after the timed calls) that every rank's combine output, fused and
// send + receive, equals a host model bit for bit (exit 1 otherwise).
// Prints: per-call time (CUDA events over --iters back-to-back calls, launched one by one and
// as one CUDA graph) of fused dispatch, send + receive dispatch, fused combine, send + receive
// combine and an empty kernel of the same grid; with the trace, per point: nanoseconds since the block's start (min / median / max over
// blocks) of one call of each kernel. Also runs under compute-sanitizer (README).
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "low_latency/low_latency.cu"

#include "harness.h"

namespace ll_harness {

using namespace jax_ep;

struct Options {
  int ranks = 1, tokens = 128, hidden = 7168, topk = 8, experts = 288, iters = 500, blocks = 0;
  bool fp8 = true;
};

__global__ void EmptyKernel() {}

template <typename T>
T* Alloc(size_t n) {
  T* p = nullptr;
  CHECK(cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(T)));
  return p;
}

uint16_t Bf16Bits(float f) {  // round to nearest even
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return uint16_t((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

// One rank's buffers and kernel arguments (as the FFI handlers fill them).
struct Rank {
  CommArgs comm;
  LLDispatchSendArgs dsend{};
  LLDispatchRecvArgs drecv{};
  LLCombineSendArgs csend{};
  LLCombineRecvArgs crecv{};
  cudaStream_t stream;
  std::vector<int> idx;
  std::vector<uint16_t> y;  // [L * R * M, H] the expert outputs (host copy, for CheckCombine)
};

std::vector<Rank> Setup(const Options& o, std::mt19937& rng) {
  const int R = o.ranks, T = o.tokens, H = o.hidden, K = o.topk, E = o.experts, M = o.tokens;
  const int L = E / R;
  const size_t slots = LLSlotsPerRank(M);
  const size_t slot_bytes = Align16(std::max({LLDispatchSlotBytes(K, H, o.fp8),
                                              LLCombineSlotBytes(H), size_t(L) * 8}));
  const size_t flags_bytes = (kMaxRanks * slots * 8 + 255) / 256 * 256;
  const size_t ws_bytes = kSignalBytes + flags_bytes + kMaxRanks * slots * slot_bytes;
  ErrorRecord* err = nullptr;
  CHECK(cudaHostAlloc(&err, sizeof(ErrorRecord), cudaHostAllocMapped));
  std::memset(err, 0, sizeof(ErrorRecord));
  ErrorRecord* err_dev = nullptr;
  CHECK(cudaHostGetDevicePointer(&err_dev, err, 0));
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  std::vector<Rank> ranks(R);
  std::vector<uint8_t*> ws(R);
  for (int r = 0; r < R; ++r) {
    ws[r] = Alloc<uint8_t>(ws_bytes);
    CHECK(cudaMemset(ws[r], 0, ws_bytes));
  }
  std::uniform_real_distribution<float> uni(-2.f, 2.f);
  std::uniform_real_distribution<float> pos(0.05f, 1.f);
  for (int r = 0; r < R; ++r) {
    Rank& k = ranks[r];
    CHECK(cudaStreamCreateWithFlags(&k.stream, cudaStreamNonBlocking));
    CommArgs& c = k.comm;
    c = CommArgs{};
    for (int p = 0; p < R; ++p) c.peer_ws[p] = ws[p];
    c.rank = r, c.num_ranks = R, c.epoch = 0, c.timeout_ns = 10'000'000'000ull;
    c.slots_per_rank = slots, c.slot_stride = slot_bytes;
    c.flags_offset = kSignalBytes, c.staging_offset = kSignalBytes + flags_bytes;
    c.error = err_dev, c.num_blocks = o.blocks ? o.blocks : std::max(1, sms / R);
    c.staged = false;
    // Inputs: random bfloat16 rows, K distinct experts per token (every 11th entry -1).
    std::vector<uint16_t> x(size_t(T) * H);
    for (auto& v : x) v = Bf16Bits(uni(rng));
    k.idx.assign(size_t(T) * K, -1);
    std::vector<float> w(size_t(T) * K);
    std::vector<int> perm(E);
    for (int t = 0; t < T; ++t) {
      for (int e = 0; e < E; ++e) perm[e] = e;
      std::shuffle(perm.begin(), perm.end(), rng);
      for (int j = 0; j < K; ++j) {
        k.idx[t * K + j] = (t * K + j) % 11 == 10 ? -1 : perm[j];
        w[t * K + j] = pos(rng);
      }
    }
    std::vector<uint16_t>& y = k.y;  // large: a cheap generator
    y.resize(size_t(L) * R * M * H);
    uint32_t state = rng();
    for (auto& v : y) {
      state = state * 1664525u + 1013904223u;
      v = Bf16Bits((int(state >> 9) - (1 << 22)) * (2.f / (1 << 22)));
    }
    auto* d_x = Alloc<uint16_t>(x.size());
    auto* d_idx = Alloc<int32_t>(k.idx.size());
    auto* d_w = Alloc<float>(w.size());
    auto* d_y = Alloc<uint16_t>(y.size());
    CHECK(cudaMemcpy(d_x, x.data(), x.size() * 2, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(d_idx, k.idx.data(), k.idx.size() * 4, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(d_w, w.data(), w.size() * 4, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(d_y, y.data(), y.size() * 2, cudaMemcpyHostToDevice));
    auto* failed = Alloc<int32_t>(R);
    CHECK(cudaMemset(failed, 0, R * 4));
    auto* ticket = Alloc<int32_t>(2);
    auto* ticket_c = Alloc<int32_t>(2);
    auto* dests = Alloc<int32_t>(T);
    auto* sent = Alloc<int32_t>(T);
    auto* slot_rows = Alloc<int32_t>(size_t(R) * T * K);
    auto* slot_weights = Alloc<float>(size_t(R) * T * K);
    const size_t cap = size_t(R) * M;
    k.dsend = LLDispatchSendArgs{d_x, d_idx, d_w, failed, T, H, K, E, M, o.fp8, ticket};
    LLDispatchRecvArgs& dr = k.drecv;
    dr.ticket = ticket, dr.failed = failed, dr.x = d_x, dr.topk_idx = d_idx, dr.topk_weights = d_w;
    dr.num_tokens = T, dr.hidden = H, dr.num_topk = K, dr.num_experts = E, dr.max_tokens = M;
    dr.use_fp8 = o.fp8;
    dr.recv_x = Alloc<uint8_t>(L * cap * LLRowBytes(H, o.fp8));
    dr.recv_scales = o.fp8 ? Alloc<float>(L * cap * (H / 128)) : nullptr;
    dr.recv_count = Alloc<int32_t>(L);
    dr.recv_src = Alloc<int32_t>(L * cap);
    dr.recv_range = Alloc<int32_t>(size_t(L) * R * 2);
    dr.num_dropped = Alloc<int32_t>(1);
    dr.slot_rows = slot_rows, dr.slot_weights = slot_weights;
    dr.token_dests = dests, dr.token_sent = sent;
    k.csend = LLCombineSendArgs{d_y, slot_rows, slot_weights, failed, T, H, K, M, ticket_c};
    k.crecv = LLCombineRecvArgs{ticket_c, d_y, slot_rows, slot_weights, dests, sent, failed,
                                T, H, K, M, Alloc<uint16_t>(size_t(T) * H), Alloc<int32_t>(T)};
  }
  CHECK(cudaDeviceSynchronize());
  return ranks;
}

float Bf16ToF32(uint16_t b) {
  const uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// a + w * x rounded twice, as the kernels (never contracted into an FMA).
float AddMul(float a, float w, float x) {
  volatile float product = w * x;
  return a + product;
}

template <typename T>
std::vector<T> Fetch(const T* p, size_t n) {
  std::vector<T> v(n);
  CHECK(cudaMemcpy(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
  return v;
}

// Every rank's combine output (and num_missing) against the host model: per token, the partials
// of the ranks in token_sent (rank order; a rank's partial = its rows in top-k order, weighted,
// float32, rounded to bfloat16), summed in float32 and rounded. Bit-exact; returns mismatches.
long long CheckCombine(std::vector<Rank>& ranks, const char* what) {
  CHECK(cudaDeviceSynchronize());
  const int R = int(ranks.size());
  const Rank& k0 = ranks[0];
  const int T = k0.crecv.num_tokens, H = k0.crecv.hidden, K = k0.crecv.num_topk;
  std::vector<std::vector<int32_t>> rows(R);
  std::vector<std::vector<float>> weights(R);
  for (int d = 0; d < R; ++d) {
    rows[d] = Fetch(ranks[d].crecv.slot_rows, size_t(R) * T * K);
    weights[d] = Fetch(ranks[d].crecv.slot_weights, size_t(R) * T * K);
  }
  long long bad = 0;
  for (int s = 0; s < R; ++s) {
    const auto out = Fetch(ranks[s].crecv.out, size_t(T) * H);
    const auto sent = Fetch(ranks[s].crecv.token_sent, size_t(T));
    const auto dests = Fetch(ranks[s].crecv.token_dests, size_t(T));
    const auto missing = Fetch(ranks[s].crecv.num_missing, size_t(T));
    std::vector<float> acc(H), part(H);
    for (int t = 0; t < T; ++t) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int d = 0; d < R; ++d) {
        if (!((sent[t] >> d) & 1)) continue;
        std::fill(part.begin(), part.end(), 0.f);
        for (int j = 0; j < K; ++j) {
          const size_t at = (size_t(s) * T + t) * K + j;
          const int row = rows[d][at];
          if (row < 0) continue;
          const uint16_t* yr = ranks[d].y.data() + size_t(row) * H;
          for (int e = 0; e < H; ++e) part[e] = AddMul(part[e], weights[d][at], Bf16ToF32(yr[e]));
        }
        for (int e = 0; e < H; ++e) acc[e] = acc[e] + Bf16ToF32(Bf16Bits(part[e]));
      }
      for (int e = 0; e < H; ++e) {
        const uint16_t want = Bf16Bits(acc[e]), got = out[size_t(t) * H + e];
        if (want != got && bad++ < 3) {
          std::printf("  %s: rank %d token %d channel %d: got %04x want %04x\n", what, s, t, e,
                      got, want);
        }
      }
      if (missing[t] != 0 || sent[t] != dests[t]) ++bad;  // no rank fails here
    }
  }
  std::printf("combine check (%s): %s (%lld mismatches)\n", what, bad ? "FAILED" : "bit-exact",
              bad);
  return bad;
}

enum Mode { kFusedDispatch, kSplitDispatch, kFusedCombine, kSplitCombine, kEmpty };
const char* kModeNames[] = {"dispatch (fused)", "dispatch send+recv", "combine (fused)",
                            "combine send+recv", "empty kernel, same grid"};

void Launch(Rank& k, Mode m) {
  cudaError_t e = cudaSuccess;
  switch (m) {
    case kFusedDispatch: e = LaunchLLDispatch(k.comm, k.dsend, k.drecv, k.stream); break;
    case kSplitDispatch:
      e = LaunchLLDispatchSend(k.comm, k.dsend, k.stream);
      if (e == cudaSuccess) e = LaunchLLDispatchRecv(k.comm, k.drecv, k.stream);
      break;
    case kFusedCombine: e = LaunchLLCombine(k.comm, k.csend, k.crecv, k.stream); break;
    case kSplitCombine:
      e = LaunchLLCombineSend(k.comm, k.csend, k.stream);
      if (e == cudaSuccess) e = LaunchLLCombineRecv(k.comm, k.crecv, k.stream);
      break;
    case kEmpty: EmptyKernel<<<k.comm.num_blocks, kThreads, 0, k.stream>>>(); break;
  }
  CHECK(e);
}

// Microseconds per call: every rank issues `iters` calls on its stream; the slowest rank counts.
// graph: the calls are captured into one CUDA graph first (kernel nodes start back to back, no
// host launch cost: the device time per call).
double TimeMode(std::vector<Rank>& ranks, Mode m, int iters, bool graph) {
  for (int i = 0; i < 20; ++i) {
    for (auto& k : ranks) Launch(k, m);
  }
  CHECK(cudaDeviceSynchronize());
  cudaStream_t s0 = ranks[0].stream;
  std::vector<cudaEvent_t> fork(ranks.size()), join(ranks.size());
  for (size_t r = 0; r < ranks.size(); ++r) {
    CHECK(cudaEventCreateWithFlags(&fork[r], cudaEventDisableTiming));
    CHECK(cudaEventCreateWithFlags(&join[r], cudaEventDisableTiming));
  }
  auto issue = [&] {  // every rank's calls, forked from and joined into stream 0
    CHECK(cudaEventRecord(fork[0], s0));
    for (size_t r = 1; r < ranks.size(); ++r) CHECK(cudaStreamWaitEvent(ranks[r].stream, fork[0]));
    for (int i = 0; i < iters; ++i) {
      for (auto& k : ranks) Launch(k, m);
    }
    for (size_t r = 1; r < ranks.size(); ++r) {
      CHECK(cudaEventRecord(join[r], ranks[r].stream));
      CHECK(cudaStreamWaitEvent(s0, join[r]));
    }
  };
  cudaGraphExec_t exec = nullptr;
  if (graph) {
    cudaGraph_t g;
    CHECK(cudaStreamBeginCapture(s0, cudaStreamCaptureModeRelaxed));
    issue();
    CHECK(cudaStreamEndCapture(s0, &g));
    CHECK(cudaGraphInstantiate(&exec, g, 0));
    CHECK(cudaGraphDestroy(g));
    CHECK(cudaGraphLaunch(exec, s0));  // warm-up
    CHECK(cudaStreamSynchronize(s0));
  }
  cudaEvent_t start, stop;
  CHECK(cudaEventCreate(&start));
  CHECK(cudaEventCreate(&stop));
  CHECK(cudaEventRecord(start, s0));
  if (graph) {
    CHECK(cudaGraphLaunch(exec, s0));
  } else {
    issue();
  }
  CHECK(cudaEventRecord(stop, s0));
  CHECK(cudaEventSynchronize(stop));
  float ms = 0;
  CHECK(cudaEventElapsedTime(&ms, start, stop));
  if (exec != nullptr) CHECK(cudaGraphExecDestroy(exec));
  return 1e3 * ms / iters;
}

#ifdef JAX_EP_LL_TRACE
// One traced call of `kernel` (launched by `launch` on every rank); prints rank 0's points.
template <typename LaunchOne>
void Trace(std::vector<Rank>& ranks, const char* name, LaunchOne launch) {
  static long long zeros[kMaxBlocks][kTracePoints];
  CHECK(cudaDeviceSynchronize());
  CHECK(cudaMemcpyToSymbol(g_ll_trace, zeros, sizeof(zeros)));
  CHECK(cudaMemcpyToSymbol(g_ll_trace_ns, zeros, sizeof(unsigned long long) * kMaxBlocks * 2));
  for (auto& k : ranks) CHECK(launch(k));
  CHECK(cudaDeviceSynchronize());
  long long pts[kMaxBlocks][kTracePoints];
  unsigned long long ns[kMaxBlocks][2];
  CHECK(cudaMemcpyFromSymbol(pts, g_ll_trace, sizeof(pts)));
  CHECK(cudaMemcpyFromSymbol(ns, g_ll_trace_ns, sizeof(ns)));
  // ns per cycle from the block with the longest run (globaltimer span / clock span).
  int blocks = 0;  // the grid (blocks that stamped their start)
  while (blocks < kMaxBlocks && pts[blocks][0] != 0) ++blocks;
  int longest = 0;
  unsigned long long t0 = ~0ull, t1 = 0;
  for (int b = 0; b < blocks; ++b) {
    if (ns[b][1] - ns[b][0] > ns[longest][1] - ns[longest][0]) longest = b;
    t0 = std::min(t0, ns[b][0]), t1 = std::max(t1, ns[b][1]);
  }
  long long last_clock = pts[longest][0];  // the latest point is the end (points are not in order)
  for (int i = 1; i < kTracePoints; ++i) last_clock = std::max(last_clock, pts[longest][i]);
  const double ns_per_cycle =
      double(ns[longest][1] - ns[longest][0]) / double(last_clock - pts[longest][0]);
  unsigned long long start_max = 0;
  for (int b = 0; b < blocks; ++b) start_max = std::max(start_max, ns[b][0] - t0);
  std::printf("\n%s (rank 0 of %zu, %d blocks): first start -> last end %.2f us, block starts "
              "spread over %.2f us, %.3f ns/cycle\n  point   min_us   med_us   max_us  blocks\n",
              name, ranks.size(), blocks, (t1 - t0) / 1e3, start_max / 1e3, ns_per_cycle);
  for (int i = 1; i < kTracePoints; ++i) {
    std::vector<double> v;
    for (int b = 0; b < blocks; ++b) {
      if (pts[b][i] != 0) v.push_back((pts[b][i] - pts[b][0]) * ns_per_cycle / 1e3);
    }
    if (v.empty()) continue;
    std::sort(v.begin(), v.end());
    std::printf("  %5d %8.2f %8.2f %8.2f %7zu\n", i, v.front(), v[v.size() / 2], v.back(),
                v.size());
  }
}
#endif

int Flag(int argc, char** argv, const char* name, int def) {
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::string(argv[i]) == name) return std::atoi(argv[i + 1]);
  }
  return def;
}

}  // namespace ll_harness

using namespace ll_harness;

int main(int argc, char** argv) {
  Options o;
  o.ranks = Flag(argc, argv, "--ranks", 1), o.tokens = Flag(argc, argv, "--tokens", 128);
  o.hidden = Flag(argc, argv, "--hidden", 7168), o.topk = Flag(argc, argv, "--topk", 8);
  o.experts = Flag(argc, argv, "--experts", 288), o.iters = Flag(argc, argv, "--iters", 500);
  o.blocks = Flag(argc, argv, "--blocks", 0);
  for (int i = 1; i < argc; ++i) o.fp8 &= std::string(argv[i]) != "--bf16";
  if (o.experts % o.ranks || o.ranks > kMaxRanks) {
    std::printf("experts must divide over ranks (<= %d)\n", kMaxRanks);
    return 2;
  }
  CHECK(PreloadLowLatencyKernels());
  std::mt19937 rng(std::random_device{}());
  std::vector<Rank> ranks = Setup(o, rng);
  std::printf("LL kernels: R=%d T=%d H=%d top-%d of %d, %s, %d blocks/rank, %d threads\n", o.ranks,
              o.tokens, o.hidden, o.topk, o.experts, o.fp8 ? "FP8" : "bf16",
              ranks[0].comm.num_blocks, kThreads);
  // Sanity: at every rank the received rows equal the valid entries routed to it.
  Launch(ranks[0], kFusedDispatch);
  for (size_t r = 1; r < ranks.size(); ++r) Launch(ranks[r], kFusedDispatch);
  CHECK(cudaDeviceSynchronize());
  const int L = o.experts / o.ranks;
  for (int r = 0; r < o.ranks; ++r) {
    const std::vector<int32_t> count = Fetch(ranks[r].drecv.recv_count, size_t(L));
    long long got = 0, want = 0;
    for (int v : count) got += v;
    for (const Rank& k : ranks) {
      for (int e : k.idx) want += e >= r * L && e < (r + 1) * L;
    }
    if (got != want) {
      std::printf("rank %d received %lld rows, expected %lld\n", r, got, want);
      return 1;
    }
  }
  long long bad = 0;
  for (Mode m : {kFusedCombine, kSplitCombine}) {
    for (auto& k : ranks) CHECK(cudaMemset(k.crecv.out, 0xff, size_t(o.tokens) * o.hidden * 2));
    for (auto& k : ranks) Launch(k, m);
    bad += CheckCombine(ranks, kModeNames[m]);
  }
  std::printf("\n%-26s %10s %14s\n", "kernel(s)", "us/call", "us/call graph");
  for (int m = kFusedDispatch; m <= kEmpty; ++m) {
    const double plain = TimeMode(ranks, Mode(m), o.iters, false);
    std::printf("%-26s %10.2f %14.2f\n", kModeNames[m], plain,
                TimeMode(ranks, Mode(m), o.iters, true));
  }
  bad += CheckCombine(ranks, "combine after the timed calls");  // the last send+recv's output
  if (bad) return 1;
#ifdef JAX_EP_LL_TRACE
  Trace(ranks, "dispatch (fused)",
        [](Rank& k) { return LaunchLLDispatch(k.comm, k.dsend, k.drecv, k.stream); });
  Trace(ranks, "dispatch send",
        [](Rank& k) { return LaunchLLDispatchSend(k.comm, k.dsend, k.stream); });
  Trace(ranks, "dispatch recv",
        [](Rank& k) { return LaunchLLDispatchRecv(k.comm, k.drecv, k.stream); });
  Trace(ranks, "combine (fused)",
        [](Rank& k) { return LaunchLLCombine(k.comm, k.csend, k.crecv, k.stream); });
  Trace(ranks, "combine send",
        [](Rank& k) { return LaunchLLCombineSend(k.comm, k.csend, k.stream); });
  Trace(ranks, "combine recv",
        [](Rank& k) { return LaunchLLCombineRecv(k.comm, k.crecv, k.stream); });
#endif
  return 0;
}
