// Low-latency dispatch/combine kernels (protocol in low_latency.h).
#include <cuda_fp8.h>

#include "../common/device.cuh"
#include "low_latency.h"

namespace jax_ep {
namespace {

constexpr int kOpD = 0, kOpC = 1;        // index of an op in the control block
constexpr int kSend = 0, kRecv = 1;      // index of a phase's completion counter
constexpr int kRecvChunkBytes = 2048;    // bytes of a dispatched row one warp task copies
constexpr float kFp8Max = 448.f;         // largest finite e4m3
constexpr float kFp8MinAmax = 1e-4f;     // floor of a group's amax (jax_ep/backends/xla_ll.py)
constexpr float kFp8InvMax = 1.f / 448.f;  // scale = amax * this (as the reference backend)

__device__ __forceinline__ uint64_t* Gen(uint8_t* ws, int op) {
  return reinterpret_cast<uint64_t*>(ws + kLLGenOffset) + op;
}
__device__ __forceinline__ uint64_t* Inflight(uint8_t* ws, int op, int parity) {
  return reinterpret_cast<uint64_t*>(ws + kLLInflightOffset) + op * 2 + parity;
}
__device__ __forceinline__ unsigned* Done(uint8_t* ws, int op, int phase) {
  return reinterpret_cast<unsigned*>(ws + kLLDoneOffset + 8 * (op * 2 + phase));
}
// In `owner`'s workspace: the last generation of `op` on `parity` that `peer` has received from
// owner. Per parity, as the receives of two calls in flight may run in either order.
__device__ __forceinline__ uint64_t* Consumed(uint8_t* ws, int op, int parity, int peer) {
  return reinterpret_cast<uint64_t*>(ws + kLLConsumedOffset) + (op * 2 + parity) * kMaxRanks +
         peer;
}

__device__ __forceinline__ int DispatchSlot(int parity, int max_tokens, int t) {
  return parity * (max_tokens + 1) + t;
}
__device__ __forceinline__ int HeaderSlot(int parity, int max_tokens) {
  return parity * (max_tokens + 1) + max_tokens;
}
__device__ __forceinline__ int CombineSlot(int parity, int max_tokens, int t) {
  return 2 * (max_tokens + 1) + parity * max_tokens + t;
}

// The failed ranks; all of them on a rank marked failed itself (it takes no part).
__device__ __forceinline__ unsigned FailedBits(const int32_t* failed, int num_ranks, int rank) {
  unsigned bits = 0;
  for (int r = 0; r < num_ranks; ++r) bits |= unsigned(failed[r] != 0) << r;
  return (bits >> rank) & 1 ? (1u << num_ranks) - 1 : bits;
}

// True in every thread of the block that finishes last (its counter is reset for the next call).
__device__ inline bool LastBlock(unsigned* counter) {
  __shared__ bool s_last;
  __syncthreads();  // the block's work precedes its arrival
  if (threadIdx.x == 0) {
    __threadfence();
    s_last = atomicAdd(counter, 1u) == gridDim.x - 1;
    if (s_last) atomicExch(counter, 0u);
  }
  __syncthreads();
  return s_last;
}

// The receive of (g, parity) must find g in flight there.
__device__ inline void CheckTicket(const CommArgs& c, int op, int op_code, const int32_t* ticket,
                                   uint64_t* g_out, int* parity_out) {
  const uint64_t g = uint64_t(uint32_t(ticket[0]));
  const int parity = ticket[1];
  if (threadIdx.x == 0) {
    const uint64_t inflight = parity == int(g & 1) ? *reinterpret_cast<volatile uint64_t*>(
                                                         Inflight(c.peer_ws[c.rank], op, parity))
                                                   : 0;
    if (g == 0 || inflight != g) ReportAndTrap(c, op_code, kPhaseNoSend, c.rank, g);
  }
  *g_out = g;
  *parity_out = parity;
}

// A send takes the next generation; its parity must be free.
__device__ inline uint64_t BeginSend(const CommArgs& c, int op, int op_code, unsigned failed) {
  uint8_t* ws = c.peer_ws[c.rank];
  const uint64_t g = *reinterpret_cast<volatile uint64_t*>(Gen(ws, op)) + 1;
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    const uint64_t busy = *reinterpret_cast<volatile uint64_t*>(Inflight(ws, op, int(g & 1)));
    if (busy != 0) ReportAndTrap(c, op_code, kPhaseBusy, c.rank, busy);
  }
  // Parity g & 1 of every live peer is free once that peer has received generation g - 2.
  const int d = threadIdx.x;
  if (d < c.num_ranks && !((failed >> d) & 1) && g > 2) {
    WaitAtLeast(Consumed(ws, op, int(g & 1), d), g - 2, c, op_code, kPhaseFree, d);
  }
  __syncthreads();
  return g;
}

// Last block of a send: generation g is now in flight.
__device__ inline void EndSend(const CommArgs& c, int op, uint64_t g) {
  if (LastBlock(Done(c.peer_ws[c.rank], op, kSend)) && threadIdx.x == 0) {
    uint8_t* ws = c.peer_ws[c.rank];
    *reinterpret_cast<volatile uint64_t*>(Gen(ws, op)) = g;
    *reinterpret_cast<volatile uint64_t*>(Inflight(ws, op, int(g & 1))) = g;
  }
}

// Last block of a receive: parity free here, and every live peer learns it may reuse it.
__device__ inline void EndRecv(const CommArgs& c, int op, uint64_t g, unsigned failed) {
  if (!LastBlock(Done(c.peer_ws[c.rank], op, kRecv))) return;
  if (threadIdx.x == 0) {
    *reinterpret_cast<volatile uint64_t*>(Inflight(c.peer_ws[c.rank], op, int(g & 1))) = 0;
  }
  const int s = threadIdx.x;
  if (s < c.num_ranks && !((failed >> s) & 1)) {
    __threadfence_system();  // every block's reads of the staging precede (LastBlock's fences)
    StoreRelease(Consumed(c.peer_ws[s], op, int(g & 1), c.rank), g);
  }
}

// ------------------------------------------------------------------ dispatch send

// Block 0: per destination, the counts of its local experts among this rank's entries.
__device__ void SendHeader(const CommArgs& c, const LLDispatchSendArgs& a, int parity, uint64_t g,
                           unsigned sendable, int* s_hist) {
  const int num_local = a.num_experts / c.num_ranks;
  for (int e = threadIdx.x; e < a.num_experts; e += blockDim.x) s_hist[e] = 0;
  __syncthreads();
  for (int i = threadIdx.x; i < a.num_tokens * a.num_topk; i += blockDim.x) {
    const int e = a.topk_idx[i];
    if (e >= 0 && e < a.num_experts) atomicAdd(&s_hist[e], 1);
  }
  __syncthreads();
  for (int q = threadIdx.x; q < c.num_ranks * num_local; q += blockDim.x) {
    const int d = q / num_local, j = q % num_local;
    if ((sendable >> d) & 1) {
      reinterpret_cast<int*>(Slot(c, d, c.rank, HeaderSlot(parity, a.max_tokens)))[j] = s_hist[q];
    }
  }
  __syncthreads();
  const int d = threadIdx.x;
  if (d < c.num_ranks && ((sendable >> d) & 1)) {
    __threadfence_system();
    StoreRelease(SlotFlag(c, d, c.rank, HeaderSlot(parity, a.max_tokens)), (g << 1) | 1);
  }
}

// 8 bfloat16 -> float.
__device__ __forceinline__ void Unpack8(const int4& raw, float (&f)[8]) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const float2 v = __bfloat1622float2(h[u]);
    f[2 * u] = v.x, f[2 * u + 1] = v.y;
  }
}

// Row t of x to every destination in `sent`: FP8 (a half-warp per 128-channel group: amax,
// scale, e4m3 with saturation) or the bfloat16 row as is.
template <bool kFp8>
__device__ void SendRow(const CommArgs& c, const LLDispatchSendArgs& a, int t, unsigned sent,
                        int slot) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const size_t meta = LLMetaBytes(a.num_topk);
  const int4* row = reinterpret_cast<const int4*>(a.x + size_t(t) * a.hidden);
  if constexpr (kFp8) {
    const int num_groups = a.hidden / 128, half = lane / 16, sub = lane % 16;
    const size_t scales_at = meta + Align16(size_t(a.hidden));
    for (int g0 = warp * 2; g0 < num_groups; g0 += kWarps * 2) {  // warp-uniform
      const int grp = g0 + half;
      const bool active = grp < num_groups;
      float f[8];
      float amax = 0.f;
      if (active) {
        Unpack8(__ldg(row + grp * 16 + sub), f);
#pragma unroll
        for (int u = 0; u < 8; ++u) amax = fmaxf(amax, fabsf(f[u]));
      }
#pragma unroll
      for (int m = 8; m >= 1; m /= 2) amax = fmaxf(amax, __shfl_xor_sync(kFull, amax, m));
      if (!active) continue;
      amax = fmaxf(amax, kFp8MinAmax);
      const float inv = __fdiv_rn(kFp8Max, amax), scale = __fmul_rn(amax, kFp8InvMax);
      uint2 q;
      uint16_t* q16 = reinterpret_cast<uint16_t*>(&q);
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        q16[u] = __nv_cvt_float2_to_fp8x2(
            make_float2(__fmul_rn(f[2 * u], inv), __fmul_rn(f[2 * u + 1], inv)), __NV_SATFINITE,
            __NV_E4M3);
      }
      for (unsigned m = sent; m; m &= m - 1) {
        uint8_t* dst = Slot(c, __ffs(m) - 1, c.rank, slot);
        reinterpret_cast<uint2*>(dst + meta)[grp * 16 + sub] = q;
        if (sub == 0) reinterpret_cast<float*>(dst + scales_at)[grp] = scale;
      }
    }
  } else {
    for (int i = threadIdx.x; i < a.hidden / 8; i += blockDim.x) {
      const int4 v = __ldg(row + i);
      for (unsigned m = sent; m; m &= m - 1) {
        reinterpret_cast<int4*>(Slot(c, __ffs(m) - 1, c.rank, slot) + meta)[i] = v;
      }
    }
  }
}

// A block per token (grid-stride): the rank of each entry among this rank's entries of its
// expert (counted over the entries before it), the destination ranks, then metadata and row to
// each of them, then every live destination's arrival flag (absent tokens too).
template <bool kFp8>
__global__ void __launch_bounds__(kThreads, 1) LLDispatchSendKernel(CommArgs c, LLDispatchSendArgs a) {
  __shared__ int s_hist[kMaxExperts];
  __shared__ int s_idx[kMaxTopk], s_pos[kMaxTopk];
  __shared__ unsigned s_dests;
  const int lane = threadIdx.x % 32, num_topk = a.num_topk, num_ranks = c.num_ranks;
  const int num_local = a.num_experts / num_ranks;
  const unsigned failed = FailedBits(a.failed, num_ranks, c.rank);
  const unsigned live = ((1u << num_ranks) - 1) & ~failed;
  const uint64_t g = BeginSend(c, kOpD, kOpLLDispatch, failed);
  const int parity = int(g & 1);
  if (blockIdx.x == 0 && threadIdx.x == 0) a.ticket[0] = int32_t(g), a.ticket[1] = parity;
  if (blockIdx.x == 0) SendHeader(c, a, parity, g, live, s_hist);

  for (int t = blockIdx.x; t < a.num_tokens; t += gridDim.x) {
    __syncthreads();  // the previous token's shared state is no longer read
    if (threadIdx.x < num_topk) {
      const int e = a.topk_idx[t * num_topk + threadIdx.x];
      s_idx[threadIdx.x] = e >= 0 && e < a.num_experts ? e : -1;
      s_pos[threadIdx.x] = 0;
    }
    if (threadIdx.x == 0) s_dests = 0;
    __syncthreads();
    const int first = t * num_topk, end = first + num_topk;
    for (int base = 0; base < end; base += blockDim.x) {  // block-uniform: ballots below
      const int i = base + threadIdx.x;
      const int e = i < end ? a.topk_idx[i] : -1;
      for (int k = 0; k < num_topk; ++k) {
        const unsigned m = __ballot_sync(kFull, e >= 0 && e == s_idx[k] && i < first + k);
        if (lane == 0 && m) atomicAdd(&s_pos[k], __popc(m));
      }
    }
    if (threadIdx.x < num_topk && s_idx[threadIdx.x] >= 0) {
      atomicOr(&s_dests, 1u << (s_idx[threadIdx.x] / num_local));
    }
    __syncthreads();
    const unsigned dests = s_dests, sent = dests & live;
    const int slot = DispatchSlot(parity, a.max_tokens, t);
    if (threadIdx.x == 0) a.token_dests[t] = int32_t(dests), a.token_sent[t] = int32_t(sent);
    for (int q = threadIdx.x; q < num_topk * num_ranks; q += blockDim.x) {
      const int d = q / num_topk, k = q % num_topk;
      if (!((sent >> d) & 1)) continue;
      uint8_t* meta = Slot(c, d, c.rank, slot);
      reinterpret_cast<int*>(meta)[k] = s_idx[k];
      reinterpret_cast<int*>(meta)[num_topk + k] = s_pos[k];
      reinterpret_cast<float*>(meta)[2 * num_topk + k] = a.topk_weights[t * num_topk + k];
    }
    SendRow<kFp8>(c, a, t, sent, slot);
    __syncthreads();
    const int d = threadIdx.x;
    if (d < num_ranks && ((live >> d) & 1)) {
      __threadfence_system();
      StoreRelease(SlotFlag(c, d, c.rank, slot), (g << 1) | ((sent >> d) & 1));
    }
  }
  EndSend(c, kOpD, g);
}

// ------------------------------------------------------------------ dispatch receive

// Every block: the sources' headers -> begin(s, j) (rows of sources < s) and totals. Block 0
// writes the counts, ranges and drops; all blocks fill recv_src past the counts with -1. Then
// warp tasks (source, token, 2 KB chunk): wait for the slot, place its rows (one per local
// expert of the token) and, with chunk 0, the scales, recv_src and the combine handle.
__global__ void __launch_bounds__(kThreads, 1) LLDispatchRecvKernel(CommArgs c, LLDispatchRecvArgs a) {
  __shared__ int s_begin[kMaxExperts];  // [R][L]
  __shared__ int s_count[kMaxExperts];  // [R][L]
  __shared__ int s_total[kMaxLocalExperts];
  __shared__ int s_dropped;
  const int lane = threadIdx.x % 32, num_ranks = c.num_ranks, me = c.rank;
  const int num_topk = a.num_topk, num_tokens = a.num_tokens, m_tok = a.max_tokens;
  const int num_local = a.num_experts / num_ranks, cap = num_ranks * m_tok;
  const unsigned failed = FailedBits(a.failed, num_ranks, c.rank);
  uint64_t g;
  int parity;
  CheckTicket(c, kOpD, kOpLLDispatch, a.ticket, &g, &parity);
  const int hdr = HeaderSlot(parity, m_tok);
  if (threadIdx.x < num_ranks && !((failed >> threadIdx.x) & 1)) {
    WaitAtLeast(SlotFlag(c, me, threadIdx.x, hdr), g << 1, c, kOpLLDispatch, kPhaseCounts,
                threadIdx.x);
  }
  if (threadIdx.x == 0) s_dropped = 0;
  __syncthreads();
  for (int q = threadIdx.x; q < num_ranks * num_local; q += blockDim.x) {
    const int s = q / num_local;
    s_count[q] = (failed >> s) & 1 ? 0 : LoadStaged<int>(Slot(c, me, s, hdr), q % num_local);
  }
  __syncthreads();
  for (int j = threadIdx.x; j < num_local; j += blockDim.x) {
    int acc = 0;
    for (int s = 0; s < num_ranks; ++s) {
      s_begin[s * num_local + j] = acc;
      acc += s_count[s * num_local + j];
    }
    s_total[j] = acc;
    if (blockIdx.x == 0) {
      a.recv_count[j] = min(acc, cap);
      if (acc > cap) atomicAdd(&s_dropped, acc - cap);
      for (int s = 0; s < num_ranks; ++s) {
        a.recv_range[(j * num_ranks + s) * 2] = s_begin[s * num_local + j];
        a.recv_range[(j * num_ranks + s) * 2 + 1] = s_count[s * num_local + j];
      }
    }
  }
  __syncthreads();
  if (blockIdx.x == 0 && threadIdx.x == 0) *a.num_dropped = s_dropped;
  for (size_t q = size_t(blockIdx.x) * blockDim.x + threadIdx.x; q < size_t(num_local) * cap;
       q += size_t(gridDim.x) * blockDim.x) {
    if (int(q % cap) >= min(s_total[q / cap], cap)) a.recv_src[q] = -1;
  }

  const size_t row_bytes = LLRowBytes(a.hidden, a.use_fp8), meta = LLMetaBytes(num_topk);
  const int num_scales = a.use_fp8 ? a.hidden / 128 : 0;
  const int num_chunks = int((row_bytes + kRecvChunkBytes - 1) / kRecvChunkBytes);
  const int gwarp = blockIdx.x * kWarps + threadIdx.x / 32, num_gwarps = gridDim.x * kWarps;
  for (int q = gwarp; q < num_ranks * num_tokens * num_chunks; q += num_gwarps) {
    const int s = q / (num_tokens * num_chunks), t = q / num_chunks % num_tokens;
    const int chunk = q % num_chunks;
    const size_t entry = (size_t(s) * num_tokens + t) * num_topk;
    bool present = false;
    const uint8_t* slot = Slot(c, me, s, DispatchSlot(parity, m_tok, t));
    if (!((failed >> s) & 1)) {
      uint64_t flag = 0;
      if (lane == 0) {
        const uint64_t* f = SlotFlag(c, me, s, DispatchSlot(parity, m_tok, t));
        WaitAtLeast(f, g << 1, c, kOpLLDispatch, kPhaseSent, s);
        flag = LoadAcquire(f);
      }
      present = __shfl_sync(kFull, flag & 1, 0) != 0;
    }
    int row = -1;
    bool mine = false;
    float w = 0.f;
    if (present && lane < num_topk) {
      const int e = LoadStaged<int>(slot, lane);
      const int local = e - me * num_local;
      mine = e >= 0 && local >= 0 && local < num_local;
      if (mine) {
        const int r = s_begin[s * num_local + local] + LoadStaged<int>(slot, num_topk + lane);
        row = r < cap ? local * cap + r : -2;
        w = LoadStaged<float>(slot, 2 * num_topk + lane);
      }
    }
    if (chunk == 0 && lane < num_topk) {
      a.slot_rows[entry + lane] = mine ? row : -1;
      a.slot_weights[entry + lane] = w;
    }
    const unsigned rows = __ballot_sync(kFull, row >= 0);
    if (rows == 0) continue;
    const size_t off = size_t(chunk) * kRecvChunkBytes;
    const size_t nbytes = min(size_t(kRecvChunkBytes), row_bytes - off);
    WarpCopyToRows<int4, false>(
        rows, [&](int k) { return a.recv_x + size_t(__shfl_sync(kFull, row, k)) * row_bytes + off; },
        slot + meta + off, nbytes, lane);
    if (chunk != 0) continue;
    const float* scales = reinterpret_cast<const float*>(slot + meta + Align16(row_bytes));
    for (unsigned m = rows; m; m &= m - 1) {
      const int k = __ffs(m) - 1;
      const int r = __shfl_sync(kFull, row, k);
      for (int i = lane; i < num_scales; i += 32) {
        a.recv_scales[size_t(r) * num_scales + i] = __ldcg(scales + i);
      }
      if (lane == 0) a.recv_src[r] = s * m_tok + t;
    }
  }
  EndRecv(c, kOpD, g, failed);
}

// ------------------------------------------------------------------ combine

// out[e, e + 8) = sum over the set bits i of `from`, in increasing order, of weight_of(i) *
// row_of(i)[e, e + 8) in float32, e = this lane's 8 channels; up to kBatch rows' loads in flight
// before any is added (a warp's chunk is one load per row and lane: latency, not bandwidth,
// bounds these small sums). row_of / weight_of may shuffle: the loop is warp-uniform.
template <typename RowOf, typename WeightOf>
__device__ __forceinline__ void SumLaneRows(unsigned from, RowOf row_of, WeightOf weight_of,
                                            bool active, int e, __nv_bfloat16* out) {
  constexpr int kBatch = 8;
  using P = Pack<__nv_bfloat16, 8>;
  float acc[8];
#pragma unroll
  for (int u = 0; u < 8; ++u) acc[u] = 0.f;
  while (from) {
    P p[kBatch];
    float w[kBatch];
    int n = 0;
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      if (from == 0) break;
      const int i = __ffs(from) - 1;
      from &= from - 1;
      const __nv_bfloat16* row = row_of(i);
      w[b] = weight_of(i);
      if (active) p[b] = LoadStagedPack<__nv_bfloat16, 8>(row + e);
      n = b + 1;
    }
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      if (b < n && active) Accumulate<__nv_bfloat16, 8>(acc, w[b], p[b]);
    }
  }
  if (active) StoreF32<__nv_bfloat16, 8>(out + e, acc);
}

// Warp tasks (source, token, chunk of kLLChunk channels) on the experts' rank: the weighted sum
// of the token's rows here (top-k order, float32) as bfloat16 into the source's staging, then
// the chunk's flag.
__global__ void __launch_bounds__(kThreads, 1) LLCombineSendKernel(CommArgs c, LLCombineSendArgs a) {
  const int lane = threadIdx.x % 32, num_ranks = c.num_ranks, num_topk = a.num_topk;
  const int hidden = a.hidden, num_tokens = a.num_tokens;
  const unsigned failed = FailedBits(a.failed, num_ranks, c.rank);
  const uint64_t g = BeginSend(c, kOpC, kOpLLCombine, failed);
  const int parity = int(g & 1);
  if (blockIdx.x == 0 && threadIdx.x == 0) a.ticket[0] = int32_t(g), a.ticket[1] = parity;
  const __nv_bfloat16* y = reinterpret_cast<const __nv_bfloat16*>(a.y);
  const int num_chunks = (hidden + kLLChunk - 1) / kLLChunk;
  const size_t flags_at = Align16(size_t(hidden) * 2);
  const int gwarp = blockIdx.x * kWarps + threadIdx.x / 32, num_gwarps = gridDim.x * kWarps;
  for (int q = gwarp; q < num_ranks * num_tokens * num_chunks; q += num_gwarps) {
    const int s = q / (num_tokens * num_chunks), t = q / num_chunks % num_tokens;
    const int chunk = q % num_chunks;
    if ((failed >> s) & 1) continue;
    const size_t entry = (size_t(s) * num_tokens + t) * num_topk;
    const int row = lane < num_topk ? a.slot_rows[entry + lane] : -1;
    if (__ballot_sync(kFull, row != -1) == 0) continue;  // token t of s did not come here
    const float w = lane < num_topk ? a.slot_weights[entry + lane] : 0.f;
    uint8_t* dst = Slot(c, s, c.rank, CombineSlot(parity, a.max_tokens, t));
    const int e = chunk * kLLChunk + lane * 8;
    SumLaneRows(
        __ballot_sync(kFull, row >= 0),
        [&](int k) { return y + size_t(__shfl_sync(kFull, row, k)) * hidden; },
        [&](int k) { return __shfl_sync(kFull, w, k); }, e < hidden, e,
        reinterpret_cast<__nv_bfloat16*>(dst));
    __syncwarp();  // the lanes' stores precede lane 0's release (cumulativity)
    if (lane == 0) StoreRelease(reinterpret_cast<uint64_t*>(dst + flags_at) + chunk, g);
  }
  EndSend(c, kOpC, g);
}

// Warp tasks (token, chunk) on the source: the partials of the token's live ranks, summed in
// rank order (float32) as they land.
__global__ void __launch_bounds__(kThreads, 1) LLCombineRecvKernel(CommArgs c, LLCombineRecvArgs a) {
  const int lane = threadIdx.x % 32, num_ranks = c.num_ranks, me = c.rank, hidden = a.hidden;
  const unsigned failed = FailedBits(a.failed, num_ranks, c.rank);
  uint64_t g;
  int parity;
  CheckTicket(c, kOpC, kOpLLCombine, a.ticket, &g, &parity);
  const int num_chunks = (hidden + kLLChunk - 1) / kLLChunk;
  const size_t flags_at = Align16(size_t(hidden) * 2);
  const int gwarp = blockIdx.x * kWarps + threadIdx.x / 32, num_gwarps = gridDim.x * kWarps;
  for (int q = gwarp; q < a.num_tokens * num_chunks; q += num_gwarps) {
    const int t = q / num_chunks, chunk = q % num_chunks;
    const unsigned use = unsigned(a.token_sent[t]) & ~failed;
    const int slot = CombineSlot(parity, a.max_tokens, t);
    if (lane < num_ranks && ((use >> lane) & 1)) {
      WaitAtLeast(reinterpret_cast<const uint64_t*>(Slot(c, me, lane, slot) + flags_at) + chunk,
                  g, c, kOpLLCombine, kPhaseSent, lane);
    }
    __syncwarp();
    const int e = chunk * kLLChunk + lane * 8;
    SumLaneRows(
        use, [&](int d) { return reinterpret_cast<const __nv_bfloat16*>(Slot(c, me, d, slot)); },
        [](int) { return 1.f; }, e < hidden, e,
        reinterpret_cast<__nv_bfloat16*>(a.out) + size_t(t) * hidden);
    if (chunk == 0 && lane == 0) a.num_missing[t] = __popc(unsigned(a.token_dests[t]) & ~use);
  }
  EndRecv(c, kOpC, g, failed);
}

int Grid(const CommArgs& c, int work) { return max(1, min(work, c.num_blocks)); }

}  // namespace

size_t LLDispatchSlotBytes(int num_topk, int hidden, bool use_fp8) {
  const size_t scales = use_fp8 ? Align16(size_t(hidden / 128) * 4) : 0;
  return LLMetaBytes(num_topk) + Align16(LLRowBytes(hidden, use_fp8)) + scales;
}
size_t LLCombineSlotBytes(int hidden) {
  return Align16(size_t(hidden) * 2) + Align16(size_t((hidden + kLLChunk - 1) / kLLChunk) * 8);
}

cudaError_t LaunchLLDispatchSend(const CommArgs& c, const LLDispatchSendArgs& a, cudaStream_t s) {
  auto kernel = a.use_fp8 ? LLDispatchSendKernel<true> : LLDispatchSendKernel<false>;
  kernel<<<Grid(c, a.num_tokens), kThreads, 0, s>>>(c, a);
  return cudaGetLastError();
}

cudaError_t LaunchLLDispatchRecv(const CommArgs& c, const LLDispatchRecvArgs& a, cudaStream_t s) {
  LLDispatchRecvKernel<<<c.num_blocks, kThreads, 0, s>>>(c, a);
  return cudaGetLastError();
}

cudaError_t LaunchLLCombineSend(const CommArgs& c, const LLCombineSendArgs& a, cudaStream_t s) {
  const int chunks = (a.hidden + kLLChunk - 1) / kLLChunk;
  const int warps = c.num_ranks * a.num_tokens * chunks;
  LLCombineSendKernel<<<Grid(c, (warps + kWarps - 1) / kWarps), kThreads, 0, s>>>(c, a);
  return cudaGetLastError();
}

cudaError_t LaunchLLCombineRecv(const CommArgs& c, const LLCombineRecvArgs& a, cudaStream_t s) {
  const int warps = a.num_tokens * ((a.hidden + kLLChunk - 1) / kLLChunk);
  LLCombineRecvKernel<<<Grid(c, (warps + kWarps - 1) / kWarps), kThreads, 0, s>>>(c, a);
  return cudaGetLastError();
}

cudaError_t PreloadLowLatencyKernels() {
  cudaError_t err = cudaSuccess;
  Touch(err, LLDispatchSendKernel<true>), Touch(err, LLDispatchSendKernel<false>);
  Touch(err, LLDispatchRecvKernel), Touch(err, LLCombineSendKernel);
  Touch(err, LLCombineRecvKernel);
  return err;
}

}  // namespace jax_ep
