// Low-latency dispatch/combine kernels (protocol in low_latency.h).
#include <cuda_fp8.h>

#include "../common/device.cuh"
#include "low_latency.h"

namespace jax_ep {
namespace {

constexpr int kOpD = 0, kOpC = 1;        // index of an op in the control block
constexpr int kSend = 0, kRecv = 1;      // index of a phase's completion counter
constexpr int kRecvChunkBytes = 1024;    // bytes of a dispatched row one warp task copies
constexpr float kFp8Max = 448.f;         // largest finite e4m3
constexpr float kFp8MinAmax = 1e-4f;     // floor of a group's amax (jax_ep/backends/xla_ll.py)
constexpr float kFp8InvMax = 1.f / 448.f;  // scale = amax * this (as the reference backend)

// Phase timestamps for benchmarks/ll_phases.cu (built with -DJAX_EP_LL_TRACE): thread 0 of
// each block records clock64 at the numbered points; compiled out otherwise.
#ifdef JAX_EP_LL_TRACE
constexpr int kTracePoints = 16;
__device__ long long g_ll_trace[kMaxBlocks][kTracePoints];
__device__ unsigned long long g_ll_trace_ns[kMaxBlocks][2];  // globaltimer at points 0 and last
#define LL_STAMP(i)                                                          \
  do {                                                                       \
    if (threadIdx.x == 0) g_ll_trace[blockIdx.x][i] = clock64();             \
    if (threadIdx.x == 0 && (i) == 0) g_ll_trace_ns[blockIdx.x][0] = GlobalTimerNs(); \
  } while (0)
#define LL_STAMP_END(i)                                                      \
  do {                                                                       \
    LL_STAMP(i);                                                             \
    if (threadIdx.x == 0) g_ll_trace_ns[blockIdx.x][1] = GlobalTimerNs();    \
  } while (0)
__device__ int g_ll_sink;
// Point i once thread 0 holds the value v (a load's arrival).
#define LL_STAMP_AFTER(i, v)                                                 \
  do {                                                                       \
    if (threadIdx.x == 0) g_ll_sink = (v);                                   \
    LL_STAMP(i);                                                             \
  } while (0)
#else
#define LL_STAMP(i) \
  do {              \
  } while (0)
#define LL_STAMP_END(i) LL_STAMP(i)
#define LL_STAMP_AFTER(i, v) LL_STAMP(i)
#endif

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

// The failed ranks, in two steps like a send's words: lane r < R loads rank r's mark (issued
// with the kernel's first loads: a loop of loads and ors made every thread wait for them before
// it issued anything else, one more round trip at the head of the combine), then FailedBits
// gathers the warp's marks. All ranks on a rank marked failed itself (it takes no part).
// Called by every thread of a warp.
__device__ __forceinline__ int LoadFailedMark(const int32_t* failed, int num_ranks) {
  const int lane = threadIdx.x % 32;
  return lane < num_ranks ? __ldg(failed + lane) : 0;
}

__device__ __forceinline__ unsigned FailedBits(int mark, int num_ranks, int rank) {
  const unsigned bits = __ballot_sync(kFull, mark != 0);
  const unsigned all = num_ranks >= 32 ? ~0u : (1u << num_ranks) - 1;
  return (bits >> rank) & 1 ? all : bits;
}

// EP1: nothing is staged, so no block's reads must finish before the bookkeeping. Block 0 alone
// takes the generation and retires it as soon as it has it; the other blocks never read the
// control words (g is theirs only to name staging, of which there is none): no barrier, no
// completion counter, no tail after the data.
__host__ __device__ __forceinline__ bool Solo(const CommArgs& c) { return c.num_ranks == 1; }

// True in every thread of the block that finishes last (its counter is reset for the next call).
// No fence: what the last block then publishes depends only on the blocks' reads of the staging
// (complete: their values were used) and on kernel-boundary order (the outputs, Gen, Inflight).
__device__ inline bool LastBlock(unsigned* counter) {
  __shared__ bool s_last;
  __syncthreads();  // the block's work precedes its arrival
  if (gridDim.x == 1) return true;
  if (threadIdx.x == 0) {
    s_last = atomicAdd(counter, 1u) == gridDim.x - 1;
    if (s_last) atomicExch(counter, 0u);
  }
  __syncthreads();
  return s_last;
}

// A send takes the next generation g = Gen + 1 (the whole block; it syncs the block). Warp 0
// reads the words (one request per block: a read by every thread makes Gen's line a hot spot
// costing ~1 us), lane 0 of block 0 checks parity g & 1 is not in flight here (a third send in
// flight is misuse), and lane d < R waits until live peer d has received generation g - 2, i.e.
// parity g & 1 of d's staging is free. Both parities' words are read at once, the right one
// picked after: one round trip when nothing is awaited. Split in two so that a kernel can
// issue the reads, then its own first loads, then finish (the latencies overlap).
struct SendWords {
  uint64_t last, busy0, busy1, seen0, seen1;
};

__device__ __forceinline__ SendWords ReadSendWords(const CommArgs& c, int op) {
  SendWords w{0, 0, 0, 0, 0};
  const int d = threadIdx.x;
  if (d < 32 && (!Solo(c) || blockIdx.x == 0)) {  // EP1: block 0's alone
    uint8_t* ws = c.peer_ws[c.rank];
    const bool check = blockIdx.x == 0 && d == 0, peer = d < c.num_ranks;
    w.last = *reinterpret_cast<volatile uint64_t*>(Gen(ws, op));
    if (check) w.busy0 = *reinterpret_cast<volatile uint64_t*>(Inflight(ws, op, 0));
    if (check) w.busy1 = *reinterpret_cast<volatile uint64_t*>(Inflight(ws, op, 1));
    if (peer) w.seen0 = *reinterpret_cast<const volatile uint64_t*>(Consumed(ws, op, 0, d));
    if (peer) w.seen1 = *reinterpret_cast<const volatile uint64_t*>(Consumed(ws, op, 1, d));
  }
  return w;
}

// Misuse: a send of generation g while the last send on its parity (busy0 / busy1: the two
// Inflight words) is not yet received, i.e. a third send in flight.
__device__ __forceinline__ void TrapIfParityBusy(const CommArgs& c, int op_code, uint64_t g,
                                                 uint64_t busy0, uint64_t busy1) {
  const int parity = int(g & 1);
  if ((parity ? busy1 : busy0) != 0) {
    ReportAndTrap(c, op_code, kPhaseBusy, c.rank, parity ? busy1 : busy0);
  }
}

// sync = false: g in warp 0 only (no other thread may store to the staging or use g).
__device__ inline uint64_t FinishBeginSend(const CommArgs& c, int op, int op_code,
                                           unsigned failed, const SendWords& w, bool sync = true) {
  __shared__ uint64_t s_gen;
  const int d = threadIdx.x;
  if (d < 32) {
    uint8_t* ws = c.peer_ws[c.rank];
    const bool check = blockIdx.x == 0 && d == 0;
    const bool waits = d < c.num_ranks && !((failed >> d) & 1);
    const uint64_t g = w.last + 1;
    const int parity = int(g & 1);
    if (check) TrapIfParityBusy(c, op_code, g, w.busy0, w.busy1);
    if (waits && g > 2) {
      if ((parity ? w.seen1 : w.seen0) < g - 2) {
        WaitAtLeast(Consumed(ws, op, parity, d), g - 2, c, op_code, kPhaseFree, d, d == c.rank);
      } else if (!Solo(c)) {  // acquire what the relaxed read saw: the peer's reads of the
        if (d == c.rank) {    // staging precede our stores (EP1: nothing staged, no order)
          asm volatile("fence.acq_rel.gpu;" ::: "memory");
        } else {
          asm volatile("fence.acq_rel.sys;" ::: "memory");
        }
      }
    }
    if (!sync) return g;
    if (d == 0) s_gen = g;
  }
  if (!sync) return 0;
  __syncthreads();  // the waits precede every thread's stores to the staging (cumulativity)
  return s_gen;
}

// A send's last act: generation g of `op` is the last taken, and in flight on its parity.
__device__ __forceinline__ void PutInFlight(uint8_t* ws, int op, uint64_t g) {
  *reinterpret_cast<volatile uint64_t*>(Gen(ws, op)) = g;
  *reinterpret_cast<volatile uint64_t*>(Inflight(ws, op, int(g & 1))) = g;
}

// The ticket of generation g: (g, parity), one 8-byte store (XLA buffers are 16-byte aligned).
__device__ __forceinline__ void PutTicket(int32_t* ticket, uint64_t g) {
  *reinterpret_cast<int2*>(ticket) = make_int2(int32_t(g), int(g & 1));
}

// Last block of a send: generation g is now in flight.
__device__ inline void EndSend(const CommArgs& c, int op, uint64_t g) {
  if (LastBlock(Done(c.peer_ws[c.rank], op, kSend)) && threadIdx.x == 0) {
    PutInFlight(c.peer_ws[c.rank], op, g);
  }
}

// A receive is over: parity free here, and every live peer learns it may reuse it. kFused: send
// and receive in one kernel (g never went in flight; the generation advances here, after every
// block has read it).
template <bool kFused>
__device__ inline void RetireRecv(const CommArgs& c, int op, uint64_t g, unsigned failed) {
  uint8_t* ws = c.peer_ws[c.rank];
  if (threadIdx.x == 0) {
    if (kFused) {
      *reinterpret_cast<volatile uint64_t*>(Gen(ws, op)) = g;
    } else {
      *reinterpret_cast<volatile uint64_t*>(Inflight(ws, op, int(g & 1))) = 0;
    }
  }
  const int s = threadIdx.x;
  if (s < c.num_ranks && !((failed >> s) & 1)) {
    uint64_t* word = Consumed(c.peer_ws[s], op, int(g & 1), c.rank);
    if (Solo(c)) {
      *reinterpret_cast<volatile uint64_t*>(word) = g;  // nothing staged: nothing to order
    } else {
      StoreReleaseTo(word, g, s == c.rank);
    }
  }
}

// The last block of a receive retires it (EP>1; at EP1 the kernels retire it up front).
template <bool kFused>
__device__ inline void EndRecv(const CommArgs& c, int op, uint64_t g, unsigned failed) {
  if (Solo(c) || !LastBlock(Done(c.peer_ws[c.rank], op, kRecv))) return;
  RetireRecv<kFused>(c, op, g, failed);
}

// A send's generation g from its words, the ticket (g, parity) written. A fused kernel at EP1
// (Solo): block 0's alone (warp 0 has it), retired at once; the other blocks get 0.
template <bool kFused>
__device__ inline uint64_t OpenSend(const CommArgs& c, int op, int op_code, unsigned failed,
                                    const SendWords& w, int32_t* ticket) {
  const bool solo = kFused && Solo(c);
  if (solo && blockIdx.x != 0) return 0;
  const uint64_t g = FinishBeginSend(c, op, op_code, failed, w, !solo);
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    PutTicket(ticket, g);
    if (solo) RetireRecv<true>(c, op, g, failed);
  }
  return g;
}

// The receive of `ticket` (g, parity), in two steps like a send's words: every thread loads the
// ticket and thread 0 both parities' in-flight words (one round trip, in flight with the kernel's
// first loads); then OpenRecv checks that g is in flight on its parity (else traps: a receive
// without its send). At EP1 only block 0 checks, and retires the receive at once (Solo). No
// barrier: warps may start polling at once, a wrong ticket traps the whole grid.
struct TicketWords {
  uint64_t g, busy0, busy1;
  int parity;
};

__device__ __forceinline__ bool ChecksTicket(const CommArgs& c) {
  return threadIdx.x == 0 && (!Solo(c) || blockIdx.x == 0);
}

__device__ __forceinline__ TicketWords ReadTicket(const CommArgs& c, int op, const int32_t* ticket) {
  // EP1: only the checker needs (g, parity) (nothing staged), and the ticket's line is spared
  // a load from every warp of the grid right behind the send's store to it.
  if (Solo(c) && !ChecksTicket(c)) return TicketWords{0, 0, 0, 0};
  TicketWords w{uint64_t(uint32_t(__ldg(ticket))), 0, 0, __ldg(ticket + 1)};
  if (ChecksTicket(c)) {
    w.busy0 = *reinterpret_cast<volatile uint64_t*>(Inflight(c.peer_ws[c.rank], op, 0));
    w.busy1 = *reinterpret_cast<volatile uint64_t*>(Inflight(c.peer_ws[c.rank], op, 1));
  }
  return w;
}

__device__ inline void OpenRecv(const CommArgs& c, int op, int op_code, const TicketWords& w,
                                unsigned failed) {
  if (!ChecksTicket(c)) return;
  const uint64_t inflight = w.parity == int(w.g & 1) ? (w.parity ? w.busy1 : w.busy0) : 0;
  if (w.g == 0 || inflight != w.g) ReportAndTrap(c, op_code, kPhaseNoSend, c.rank, w.g);
  if (Solo(c)) RetireRecv<false>(c, op, w.g, failed);
}

// The send of either op at EP1, one thread: nothing is staged and no peer waits, so a send only
// takes the generation (g = Gen + 1, misuse if parity g & 1 is still in flight) and puts it in
// flight. One round trip of loads, then the stores; no barrier. (The Consumed wait of the
// general send is implied here: at EP1 the receive that frees a parity clears its Inflight word.)
__global__ void __launch_bounds__(32, 1) LLSoloSendKernel(CommArgs c, int op, int op_code,
                                                          int32_t* ticket) {
  if (threadIdx.x != 0) return;
  LL_STAMP(0);
  uint8_t* ws = c.peer_ws[c.rank];
  const uint64_t last = *reinterpret_cast<volatile uint64_t*>(Gen(ws, op));
  const uint64_t busy0 = *reinterpret_cast<volatile uint64_t*>(Inflight(ws, op, 0));
  const uint64_t busy1 = *reinterpret_cast<volatile uint64_t*>(Inflight(ws, op, 1));
  const uint64_t g = last + 1;
  TrapIfParityBusy(c, op_code, g, busy0, busy1);
  PutTicket(ticket, g);
  PutInFlight(ws, op, g);
  LL_STAMP_END(1);
}

// ------------------------------------------------------------------ dispatch send

// 8 bfloat16 -> float.
__device__ __forceinline__ void Unpack8(const int4& raw, float (&f)[8]) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const float2 v = __bfloat1622float2(h[u]);
    f[2 * u] = v.x, f[2 * u + 1] = v.y;
  }
}

// What a block loads of its first token before it may send (issued before the waits of the
// send, so their latencies overlap): this thread's first kSendPre 16-byte pieces of the row
// (see RowPiece) and entries of topk_idx for the positions (see EntryPositions).
constexpr int kSendPre = 2;
struct SendPrefetch {
  int4 row[kSendPre];
  int entry[kSendPre];  // topk_idx[k * kThreads + thread] (< T * K)
  int own_idx;          // thread < K: entry thread of the token, and its weight
  float own_weight;
};

// The k-th 16-byte piece of a row this thread handles, or -1: FP8, 8 lanes take a 128-channel
// group (16 pieces, 2 adjacent ones per lane; the block covers kFp8Groups groups per round);
// bfloat16, the block strides over the row.
constexpr int kFp8Groups = kThreads / 8;
template <bool kFp8>
__device__ __forceinline__ int RowPiece(int k, int hidden) {
  if constexpr (kFp8) {
    const int tid = int(threadIdx.x), grp = tid / 8 + k / 2 * kFp8Groups;
    return grp < hidden / 128 ? grp * 16 + tid % 8 * 2 + k % 2 : -1;
  } else {
    const int i = int(threadIdx.x) + k * kThreads;
    return i < hidden / 8 ? i : -1;
  }
}

template <bool kFp8>
__device__ __forceinline__ SendPrefetch PrefetchSend(const LLDispatchSendArgs& a, int t,
                                                     bool rows = true) {
  SendPrefetch p;
  const bool has = rows && t < a.num_tokens;  // rows: the token's (else only the entries)
  const int4* row = reinterpret_cast<const int4*>(a.x + size_t(t) * a.hidden);
  const int end = a.num_tokens * a.num_topk;  // every block counts them all (own counts)
#pragma unroll
  for (int k = 0; k < kSendPre; ++k) {
    const int piece = has ? RowPiece<kFp8>(k, a.hidden) : -1;
    p.row[k] = piece >= 0 ? __ldg(row + piece) : make_int4(0, 0, 0, 0);
    const int i = k * kThreads + int(threadIdx.x);
    p.entry[k] = i < end ? __ldg(a.topk_idx + i) : -1;
  }
  const bool own = has && int(threadIdx.x) < a.num_topk;
  p.own_idx = own ? __ldg(a.topk_idx + t * a.num_topk + threadIdx.x) : -1;
  p.own_weight = own ? __ldg(a.topk_weights + t * a.num_topk + threadIdx.x) : 0.f;
  return p;
}

// A header word: a count tagged with the generation's low 32 bits. The receiver polls the words
// themselves (8-byte stores are single-copy atomic): one round trip, where a flag and then the
// counts behind it took two.
__device__ __forceinline__ uint64_t HeaderWord(uint64_t g, int count) {
  return (uint64_t(uint32_t(g)) << 32) | uint32_t(count);
}

// The count in header word `word` of source s once it carries generation g (bounded wait).
__device__ inline int WaitHeaderCount(const CommArgs& c, const uint64_t* word, uint64_t g, int s) {
  const volatile uint64_t* w = word;
  uint64_t v = *w;
  if (uint32_t(v >> 32) != uint32_t(g)) {
    const uint64_t start = GlobalTimerNs();
    while (uint32_t((v = *w) >> 32) != uint32_t(g)) {
      if (GlobalTimerNs() - start > c.timeout_ns) ReportAndTrap(c, kOpLLDispatch, kPhaseCounts, s, g);
    }
  }
  return int(uint32_t(v));
}

// Counts per expert of this rank's entries into s_hist [E] (entries of the prefetch where it
// holds them: every block prefetches all T * K entries' first 2 * kThreads).
__device__ void CountEntries(const LLDispatchSendArgs& a, const SendPrefetch& pre, int* s_hist) {
  for (int e = threadIdx.x; e < a.num_experts; e += blockDim.x) s_hist[e] = 0;
  __syncthreads();
  for (int i = threadIdx.x, k = 0; i < a.num_tokens * a.num_topk; i += blockDim.x, ++k) {
    const int e = k < kSendPre ? (k == 0 ? pre.entry[0] : pre.entry[kSendPre - 1]) : a.topk_idx[i];
    if (e >= 0 && e < a.num_experts) atomicAdd(&s_hist[e], 1);
  }
  __syncthreads();
}

// Block 0: per remote destination in `sendable`, the counts of its local experts among this
// rank's entries, as header words (this rank's own counts never travel: its receive counts them).
__device__ void SendHeader(const CommArgs& c, const LLDispatchSendArgs& a, int parity, uint64_t g,
                           unsigned sendable, const SendPrefetch& pre, int* s_hist) {
  const int num_local = a.num_experts / c.num_ranks;
  CountEntries(a, pre, s_hist);
  for (int q = threadIdx.x; q < c.num_ranks * num_local; q += blockDim.x) {
    const int d = q / num_local, j = q % num_local;
    if ((sendable >> d) & 1) {
      volatile uint64_t* words = reinterpret_cast<uint64_t*>(
          Slot(c, d, c.rank, HeaderSlot(parity, a.max_tokens)));
      words[j] = HeaderWord(g, s_hist[q]);
    }
  }
}

// Where WriteRow puts a row: its e4m3 / bfloat16 bytes and (FP8) its per-128-channel scales.
struct RowDst {
  uint8_t* row;
  float* scales;
};

// Row t of x to the destinations i in `mask` (dst_of(i)): FP8 (8 lanes per 128-channel group:
// amax, scale, e4m3 with saturation) or the bfloat16 row as is. pre: the block's prefetch, or
// null.
template <bool kFp8, typename DstOf>
__device__ void WriteRow(const LLDispatchSendArgs& a, int t, unsigned mask, DstOf dst_of,
                         const SendPrefetch* pre) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int4* row = reinterpret_cast<const int4*>(a.x + size_t(t) * a.hidden);
  auto piece_at = [&](int k, int piece) {
    if (pre != nullptr && k < kSendPre) return k == 0 ? pre->row[0] : pre->row[kSendPre - 1];
    return piece >= 0 ? __ldg(row + piece) : make_int4(0, 0, 0, 0);
  };
  if constexpr (kFp8) {
    // One round for H <= 8192: a lane's chain is one amax, one division, 8 conversions (with
    // half-warps per group it was two rounds of each: ~1.5 us of latency).
    const int num_groups = a.hidden / 128, sub = lane % 8;
    for (int k = 0; warp * 4 + k / 2 * kFp8Groups < num_groups; k += 2) {  // warp-uniform
      const int grp = int(threadIdx.x) / 8 + k / 2 * kFp8Groups;
      const bool active = grp < num_groups;
      const int4 raw0 = piece_at(k, active ? grp * 16 + sub * 2 : -1);
      const int4 raw1 = piece_at(k + 1, active ? grp * 16 + sub * 2 + 1 : -1);
      float f[16];
      float amax = 0.f;
      if (active) {
        Unpack8(raw0, reinterpret_cast<float(&)[8]>(f[0]));
        Unpack8(raw1, reinterpret_cast<float(&)[8]>(f[8]));
#pragma unroll
        for (int u = 0; u < 16; ++u) amax = fmaxf(amax, fabsf(f[u]));
      }
#pragma unroll
      for (int m = 4; m >= 1; m /= 2) amax = fmaxf(amax, __shfl_xor_sync(kFull, amax, m));
      if (!active) continue;
      amax = fmaxf(amax, kFp8MinAmax);
      const float inv = __fdiv_rn(kFp8Max, amax), scale = __fmul_rn(amax, kFp8InvMax);
      uint4 q;
      uint16_t* q16 = reinterpret_cast<uint16_t*>(&q);
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        q16[u] = __nv_cvt_float2_to_fp8x2(
            make_float2(__fmul_rn(f[2 * u], inv), __fmul_rn(f[2 * u + 1], inv)), __NV_SATFINITE,
            __NV_E4M3);
      }
      for (unsigned m = mask; m; m &= m - 1) {
        const RowDst dst = dst_of(__ffs(m) - 1);
        reinterpret_cast<uint4*>(dst.row)[grp * 8 + sub] = q;
        if (sub == 0) dst.scales[grp] = scale;
      }
    }
  } else {
    for (int k = 0; k * kThreads < a.hidden / 8; ++k) {
      const int i = int(threadIdx.x) + k * kThreads;
      const int4 v = piece_at(k, i < a.hidden / 8 ? i : -1);
      if (i >= a.hidden / 8) continue;
      for (unsigned m = mask; m; m &= m - 1) reinterpret_cast<int4*>(dst_of(__ffs(m) - 1).row)[i] = v;
    }
  }
}

// A token's entries in shared memory: s_idx / s_weight [K] (ids outside [0, E) as -1) and the
// ranks holding its experts (dests). CountEntriesBefore then counts per expert the rank's
// entries before the token's (a histogram: few collisions; the per-k ballots it replaced took
// ~1.6 us); EntryPosition gives the rank of (t, k) among the entries of its expert.
struct TokenShared {
  int idx[kMaxTopk];
  float weight[kMaxTopk];
  unsigned dests;
};

__device__ void LoadToken(const LLDispatchSendArgs& a, int t, bool first, const SendPrefetch& pre,
                          int num_local, TokenShared& s) {
  __syncthreads();  // the previous token's shared state is no longer read
  if (threadIdx.x == 0) s.dests = 0;
  __syncthreads();
  if (threadIdx.x < a.num_topk) {
    int e = first ? pre.own_idx : a.topk_idx[t * a.num_topk + threadIdx.x];
    e = e >= 0 && e < a.num_experts ? e : -1;
    s.idx[threadIdx.x] = e;
    s.weight[threadIdx.x] =
        first ? pre.own_weight : a.topk_weights[t * a.num_topk + threadIdx.x];
    if (e >= 0) atomicOr(&s.dests, 1u << (e / num_local));
  }
  __syncthreads();
}

// s_hist[e - lo] for the experts e in [lo, lo + n).
__device__ void CountEntriesBefore(const LLDispatchSendArgs& a, int t, bool first,
                                   const SendPrefetch& pre, int lo, int n, int* s_hist) {
  for (int e = threadIdx.x; e < n; e += blockDim.x) s_hist[e] = 0;
  __syncthreads();
  const int first_entry = t * a.num_topk;
  for (int base = 0, k = 0; base < first_entry; base += blockDim.x, ++k) {  // block-uniform
    const int i = base + threadIdx.x;
    const int e = i >= first_entry          ? -1
                  : first && k < kSendPre ? (k == 0 ? pre.entry[0] : pre.entry[kSendPre - 1])
                                          : a.topk_idx[i];
    if (e >= lo && e < lo + n) atomicAdd(&s_hist[e - lo], 1);
  }
  __syncthreads();
}

// Entry k of the token has an expert in [lo, lo + n) (CountEntriesBefore's range).
__device__ __forceinline__ int EntryPosition(const TokenShared& s, const int* s_hist, int lo,
                                             int k) {
  const int e = s.idx[k];
  int pos = s_hist[e - lo];
  for (int j = 0; j < k; ++j) pos += e >= 0 && s.idx[j] == e;
  return pos;
}

// A block per token (grid-stride): the destination ranks; to every remote one the metadata
// (experts, their positions, weights) and the row, then every live remote destination's arrival
// flag (absent tokens too). This rank's own entries and token_dests / token_sent are left to
// its receive (PlaceOwnTokens): at EP1 a send only takes the generation. Block 0 first sends the
// header. The caller has waited until parity g & 1 is free at every live peer.
template <bool kFp8>
__device__ void DispatchSendPart(const CommArgs& c, const LLDispatchSendArgs& a, uint64_t g,
                                 unsigned failed, const SendPrefetch& pre, int* s_hist) {
  __shared__ TokenShared s_tok;
  const int num_topk = a.num_topk, num_ranks = c.num_ranks;
  const int num_local = a.num_experts / num_ranks;
  const unsigned live = ((1u << num_ranks) - 1) & ~failed, remote = live & ~(1u << c.rank);
  const int parity = int(g & 1);
  const size_t meta_bytes = LLMetaBytes(num_topk);
  const size_t scales_at = meta_bytes + Align16(LLRowBytes(a.hidden, kFp8));
  if (remote == 0) return;  // nothing to stage (every peer failed, or this rank)
  LL_STAMP_AFTER(13, pre.entry[0] ^ pre.entry[kSendPre - 1] ^ pre.own_idx);
  if (blockIdx.x == 0) SendHeader(c, a, parity, g, remote, pre, s_hist);
  LL_STAMP(2);
  for (int t = blockIdx.x; t < a.num_tokens; t += gridDim.x) {
    const bool first = t == int(blockIdx.x);
    LoadToken(a, t, first, pre, num_local, s_tok);
    const unsigned staged = s_tok.dests & remote;
    const int slot = DispatchSlot(parity, a.max_tokens, t);
    if (staged != 0) {  // block-uniform
      CountEntriesBefore(a, t, first, pre, 0, a.num_experts, s_hist);
      LL_STAMP(3);
      for (int q = threadIdx.x; q < num_topk * num_ranks; q += blockDim.x) {
        const int d = q / num_topk, k = q % num_topk;
        if (!((staged >> d) & 1)) continue;
        uint8_t* meta = Slot(c, d, c.rank, slot);
        reinterpret_cast<int*>(meta)[k] = s_tok.idx[k];
        reinterpret_cast<int*>(meta)[num_topk + k] =
            s_tok.idx[k] >= 0 ? EntryPosition(s_tok, s_hist, 0, k) : 0;
        reinterpret_cast<float*>(meta)[2 * num_topk + k] = s_tok.weight[k];
      }
      WriteRow<kFp8>(
          a, t, staged,
          [&](int d) {
            uint8_t* base = Slot(c, d, c.rank, slot);
            return RowDst{base + meta_bytes, reinterpret_cast<float*>(base + scales_at)};
          },
          first ? &pre : nullptr);
      LL_STAMP(12);
    }
    __syncthreads();  // the block's stores precede the release (cumulativity)
    const int d = threadIdx.x;
    if (d < num_ranks && ((remote >> d) & 1)) {
      StoreRelease(SlotFlag(c, d, c.rank, slot), (g << 1) | ((staged >> d) & 1));
    }
    LL_STAMP(4);
  }
}

// ------------------------------------------------------------------ dispatch: own tokens

// The send's inputs as the receive sees them (it places this rank's own tokens).
__device__ __forceinline__ LLDispatchSendArgs OwnInputs(const LLDispatchRecvArgs& a) {
  LLDispatchSendArgs x{};
  x.x = a.x, x.topk_idx = a.topk_idx, x.topk_weights = a.topk_weights, x.failed = a.failed;
  x.num_tokens = a.num_tokens, x.hidden = a.hidden, x.num_topk = a.num_topk;
  x.num_experts = a.num_experts, x.max_tokens = a.max_tokens, x.use_fp8 = a.use_fp8;
  return x;
}

// Counts of this rank's entries per local expert j into s_own [L] (the header it sends itself).
__device__ void CountOwnEntries(const CommArgs& c, const LLDispatchSendArgs& x,
                                const SendPrefetch& pre, int* s_own) {
  const int num_local = x.num_experts / c.num_ranks, lo = c.rank * num_local;
  for (int i = threadIdx.x, k = 0; i < x.num_tokens * x.num_topk; i += blockDim.x, ++k) {
    const int e = k < kSendPre ? (k == 0 ? pre.entry[0] : pre.entry[kSendPre - 1]) : x.topk_idx[i];
    if (e >= lo && e < lo + num_local) atomicAdd(&s_own[e - lo], 1);
  }
}

// This rank's own tokens go from x straight into recv_x (never staged): a block per token
// (grid-stride), the positions of its entries as the send computes them for remote ranks, the
// row cast once (FP8) and stored at each of its local experts' rows with the scales, recv_src
// and the combine handle (slot_rows / slot_weights of source = this rank). s_hist: [L] ints.
template <bool kFp8>
__device__ void PlaceOwnTokens(const CommArgs& c, const LLDispatchRecvArgs& a, unsigned failed,
                               const SendPrefetch& pre, const int* s_begin, int* s_hist) {
  __shared__ TokenShared s_tok;
  __shared__ int s_row[kMaxTopk];
  const LLDispatchSendArgs x = OwnInputs(a);
  const int me = c.rank, num_topk = a.num_topk, num_local = a.num_experts / c.num_ranks;
  const int lo = me * num_local, cap = c.num_ranks * a.max_tokens;
  const size_t row_bytes = LLRowBytes(a.hidden, kFp8);
  const int num_scales = kFp8 ? a.hidden / 128 : 0;
  const size_t own_entries = size_t(me) * a.num_tokens * num_topk;  // slot_rows[me]
  const unsigned live = ((1u << c.num_ranks) - 1) & ~failed;
  if ((failed >> me) & 1) {  // a failed rank takes no part (and sends nothing: live = 0)
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < a.num_tokens * num_topk;
         i += gridDim.x * blockDim.x) {
      a.slot_rows[own_entries + i] = -1, a.slot_weights[own_entries + i] = 0.f;
    }
    for (int t = blockIdx.x * blockDim.x + threadIdx.x; t < a.num_tokens;
         t += gridDim.x * blockDim.x) {
      unsigned dests = 0;
      for (int k = 0; k < num_topk; ++k) {
        const int e = x.topk_idx[t * num_topk + k];
        if (e >= 0 && e < a.num_experts) dests |= 1u << (e / num_local);
      }
      a.token_dests[t] = int32_t(dests), a.token_sent[t] = 0;
    }
    return;
  }
  for (int t = blockIdx.x; t < a.num_tokens; t += gridDim.x) {
    const bool first = t == int(blockIdx.x);
    LoadToken(x, t, first, pre, num_local, s_tok);
    if (threadIdx.x == 0) {
      a.token_dests[t] = int32_t(s_tok.dests), a.token_sent[t] = int32_t(s_tok.dests & live);
    }
    const bool here = (s_tok.dests >> me) & 1;  // block-uniform
    if (here) CountEntriesBefore(x, t, first, pre, lo, num_local, s_hist);
    if (threadIdx.x < num_topk) {
      const int k = threadIdx.x, local = s_tok.idx[k] - lo;
      const bool mine = s_tok.idx[k] >= 0 && local >= 0 && local < num_local;
      int row = -1;
      if (mine) {
        const int r = s_begin[me * num_local + local] + EntryPosition(s_tok, s_hist, lo, k);
        row = r < cap ? local * cap + r : -2;
      }
      const size_t entry = own_entries + size_t(t) * num_topk + k;
      a.slot_rows[entry] = row;
      a.slot_weights[entry] = mine ? s_tok.weight[k] : 0.f;
      if (row >= 0) a.recv_src[row] = me * a.max_tokens + t;
      s_row[k] = row;
    }
    if (!here) continue;
    __syncthreads();
    unsigned rows = 0;
    for (int k = 0; k < num_topk; ++k) rows |= unsigned(s_row[k] >= 0) << k;
    WriteRow<kFp8>(
        x, t, rows,
        [&](int k) {
          const size_t r = size_t(s_row[k]);
          return RowDst{a.recv_x + r * row_bytes, kFp8 ? a.recv_scales + r * num_scales : nullptr};
        },
        first ? &pre : nullptr);
  }
}

// ------------------------------------------------------------------ dispatch receive

// One warp task of the receive: (remote source, token, 1 KB chunk of the row). Loaded (flag awaited,
// metadata, the chunk, with chunk 0 the first scales) before the header is known, placed after.
constexpr int kChunkPieces = kRecvChunkBytes / 16 / 32;  // 16-byte pieces per lane
constexpr int kScalesPre = 2;                            // scales per lane loaded with chunk 0
struct RecvTask {
  int s, t, chunk;
  bool present;
  int expert, pos;  // lanes < K
  float weight;
  int4 data[kChunkPieces];
  float scale[kScalesPre];
};

__device__ __forceinline__ void LoadRecvTask(const CommArgs& c, const LLDispatchRecvArgs& a,
                                             uint64_t g, int parity, unsigned failed, int q,
                                             int num_chunks, RecvTask& k) {
  const int lane = threadIdx.x % 32, other = q / (a.num_tokens * num_chunks);
  k.s = other + int(other >= c.rank), k.t = q / num_chunks % a.num_tokens;
  k.chunk = q % num_chunks;
  k.present = false;
  const uint8_t* slot = Slot(c, c.rank, k.s, DispatchSlot(parity, a.max_tokens, k.t));
  if (!((failed >> k.s) & 1)) {
    uint64_t flag = 0;
    if (lane == 0) {
      const uint64_t* f = SlotFlag(c, c.rank, k.s, DispatchSlot(parity, a.max_tokens, k.t));
      flag = WaitAtLeast(f, g << 1, c, kOpLLDispatch, kPhaseSent, k.s);
    }
    k.present = __shfl_sync(kFull, flag & 1, 0) != 0;
  }
  if (!k.present) return;
  if (lane < a.num_topk) {
    k.expert = LoadStaged<int>(slot, lane);
    k.pos = LoadStaged<int>(slot, a.num_topk + lane);
    k.weight = LoadStaged<float>(slot, 2 * a.num_topk + lane);
  }
  const size_t row_bytes = LLRowBytes(a.hidden, a.use_fp8), off = size_t(k.chunk) * kRecvChunkBytes;
  const int n = int(min(size_t(kRecvChunkBytes), row_bytes - off) / 16);
  const int4* src = reinterpret_cast<const int4*>(slot + LLMetaBytes(a.num_topk) + off);
#pragma unroll
  for (int u = 0; u < kChunkPieces; ++u) {
    if (u * 32 + lane < n) k.data[u] = __ldcg(src + u * 32 + lane);
  }
  if (k.chunk == 0 && a.use_fp8) {
    const float* scales =
        reinterpret_cast<const float*>(slot + LLMetaBytes(a.num_topk) + Align16(row_bytes));
#pragma unroll
    for (int u = 0; u < kScalesPre; ++u) {
      if (u * 32 + lane < a.hidden / 128) k.scale[u] = __ldcg(scales + u * 32 + lane);
    }
  }
}

// Places a loaded task: one row per local expert of the token (-2 past the capacity), with
// chunk 0 the scales, recv_src and the combine handle.
__device__ __forceinline__ void PlaceRecvTask(const CommArgs& c, const LLDispatchRecvArgs& a,
                                              int parity, int num_chunks, const int* s_begin,
                                              const RecvTask& k) {
  const int lane = threadIdx.x % 32, num_topk = a.num_topk, me = c.rank;
  const int num_local = a.num_experts / c.num_ranks, cap = c.num_ranks * a.max_tokens;
  int row = -1;
  bool mine = false;
  if (k.present && lane < num_topk) {
    const int local = k.expert - me * num_local;
    mine = k.expert >= 0 && local >= 0 && local < num_local;
    if (mine) {
      const int r = s_begin[k.s * num_local + local] + k.pos;
      row = r < cap ? local * cap + r : -2;
    }
  }
  const size_t entry = (size_t(k.s) * a.num_tokens + k.t) * num_topk;
  if (k.chunk == 0 && lane < num_topk) {
    a.slot_rows[entry + lane] = mine ? row : -1;
    a.slot_weights[entry + lane] = mine ? k.weight : 0.f;
  }
  const unsigned rows = __ballot_sync(kFull, row >= 0);
  if (rows == 0) return;
  const size_t row_bytes = LLRowBytes(a.hidden, a.use_fp8), off = size_t(k.chunk) * kRecvChunkBytes;
  const int n = int(min(size_t(kRecvChunkBytes), row_bytes - off) / 16);
  const int num_scales = a.use_fp8 ? a.hidden / 128 : 0;
  const float* scales = reinterpret_cast<const float*>(
      Slot(c, me, k.s, DispatchSlot(parity, a.max_tokens, k.t)) + LLMetaBytes(num_topk) +
      Align16(row_bytes));
  for (unsigned m = rows; m; m &= m - 1) {
    const int r = __shfl_sync(kFull, row, __ffs(m) - 1);
    int4* dst = reinterpret_cast<int4*>(a.recv_x + size_t(r) * row_bytes + off);
#pragma unroll
    for (int u = 0; u < kChunkPieces; ++u) {
      if (u * 32 + lane < n) dst[u * 32 + lane] = k.data[u];
    }
    if (k.chunk != 0) continue;
    for (int i = lane; i < num_scales; i += 32) {
      const int u = i / 32;
      a.recv_scales[size_t(r) * num_scales + i] =
          u < kScalesPre ? (u == 0 ? k.scale[0] : k.scale[kScalesPre - 1]) : __ldcg(scales + i);
    }
    if (lane == 0) a.recv_src[r] = k.s * a.max_tokens + k.t;
  }
}

// Every block: the sources' headers -> begin(s, j) (rows of sources < s) and totals. Block 0
// writes the counts, ranges and drops; all blocks fill recv_src past the counts with -1. Warp
// tasks (source, token, 2 KB chunk): each warp loads its first task before the header work.
// Task q runs on block q % G, warp q / G % kWarps: consecutive tasks land on different SMs, so
// the rows' stores spread over every SM (blocks taking tasks in order left the stores of all
// tokens on the first quarter of the SMs: a 6 us tail). s_mem: 2 * kMaxExperts +
// kMaxLocalExperts ints.
template <bool kFp8>
__device__ void DispatchRecvPart(const CommArgs& c, const LLDispatchRecvArgs& a, uint64_t g,
                                 int parity, unsigned failed, const SendPrefetch& pre,
                                 int* s_mem) {
  int* s_begin = s_mem;                     // [R][L]
  int* s_count = s_mem + kMaxExperts;       // [R][L]
  int* s_total = s_mem + 2 * kMaxExperts;   // [L]
  __shared__ int s_dropped;
  const int num_ranks = c.num_ranks, me = c.rank, m_tok = a.max_tokens;
  const int num_local = a.num_experts / num_ranks, cap = num_ranks * m_tok;
  const size_t row_bytes = LLRowBytes(a.hidden, a.use_fp8);
  const int num_chunks = int((row_bytes + kRecvChunkBytes - 1) / kRecvChunkBytes);
  const int first_task = int(blockIdx.x) + int(gridDim.x) * (int(threadIdx.x) / 32);
  const int task_stride = int(gridDim.x) * kWarps;
  const int num_tasks = (num_ranks - 1) * a.num_tokens * num_chunks;
  RecvTask task;
  if (first_task < num_tasks) LoadRecvTask(c, a, g, parity, failed, first_task, num_chunks, task);
  LL_STAMP(5);

  const int hdr = HeaderSlot(parity, m_tok);
  if (threadIdx.x == 0) s_dropped = 0;
  for (int q = threadIdx.x; q < num_ranks * num_local; q += blockDim.x) {
    const int s = q / num_local;
    const uint64_t* words = reinterpret_cast<const uint64_t*>(Slot(c, me, s, hdr));
    s_count[q] = (failed >> s) & 1 || s == me ? 0 : WaitHeaderCount(c, words + q % num_local, g, s);
  }
  __syncthreads();
  if (!((failed >> me) & 1)) {
    CountOwnEntries(c, OwnInputs(a), pre, s_count + me * num_local);
    __syncthreads();
  }
  LL_STAMP(6);
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
  LL_STAMP(7);
  if (blockIdx.x == 0 && threadIdx.x == 0) *a.num_dropped = s_dropped;
  for (size_t q = size_t(blockIdx.x) * blockDim.x + threadIdx.x; q < size_t(num_local) * cap;
       q += size_t(gridDim.x) * blockDim.x) {
    if (int(q % cap) >= min(s_total[q / cap], cap)) a.recv_src[q] = -1;
  }
  LL_STAMP(8);
  PlaceOwnTokens<kFp8>(c, a, failed, pre, s_begin, s_total);  // s_total is free again
  for (int q = first_task; q < num_tasks; q += task_stride) {
    if (q != first_task) LoadRecvTask(c, a, g, parity, failed, q, num_chunks, task);
    PlaceRecvTask(c, a, parity, num_chunks, s_begin, task);
  }
  LL_STAMP(9);
}

constexpr int kRecvSharedInts = 2 * kMaxExperts + kMaxLocalExperts;

template <bool kFp8>
__global__ void __launch_bounds__(kThreads, 1) LLDispatchSendKernel(CommArgs c, LLDispatchSendArgs a) {
  __shared__ int s_hist[kMaxExperts];
  LL_STAMP(0);
  const int mark = LoadFailedMark(a.failed, c.num_ranks);
  const SendPrefetch pre = PrefetchSend<kFp8>(a, blockIdx.x);  // before the waits (EP > 1)
  const unsigned failed = FailedBits(mark, c.num_ranks, c.rank);
  const uint64_t g =
      OpenSend<false>(c, kOpD, kOpLLDispatch, failed, ReadSendWords(c, kOpD), a.ticket);
  LL_STAMP(1);
  DispatchSendPart<kFp8>(c, a, g, failed, pre, s_hist);
  EndSend(c, kOpD, g);
  LL_STAMP_END(10);
}

template <bool kFp8>
__global__ void __launch_bounds__(kThreads, 1) LLDispatchRecvKernel(CommArgs c, LLDispatchRecvArgs a) {
  __shared__ int s_mem[kRecvSharedInts];
  LL_STAMP(0);
  const int mark = LoadFailedMark(a.failed, c.num_ranks);
  const TicketWords ticket = ReadTicket(c, kOpD, a.ticket);
  const SendPrefetch pre = PrefetchSend<kFp8>(OwnInputs(a), blockIdx.x);  // the own tokens
  const unsigned failed = FailedBits(mark, c.num_ranks, c.rank);
  OpenRecv(c, kOpD, kOpLLDispatch, ticket, failed);
  DispatchRecvPart<kFp8>(c, a, ticket.g, ticket.parity, failed, pre, s_mem);
  EndRecv<false>(c, kOpD, ticket.g, failed);
  LL_STAMP_END(10);
}

// Both phases in one kernel: every block sends its tokens, then receives (senders never wait
// for receivers, and the grid is at most one block per SM, all resident).
template <bool kFp8>
__global__ void __launch_bounds__(kThreads, 1) LLDispatchKernel(CommArgs c, LLDispatchSendArgs s,
                                                                LLDispatchRecvArgs r) {
  __shared__ int s_mem[kRecvSharedInts];  // the header histogram, then the receive's tables
  LL_STAMP(0);
  const int mark = LoadFailedMark(s.failed, c.num_ranks);
  const SendPrefetch pre = PrefetchSend<kFp8>(s, blockIdx.x);  // also the receive's own tokens
  const unsigned failed = FailedBits(mark, c.num_ranks, c.rank);
  const uint64_t g =
      OpenSend<true>(c, kOpD, kOpLLDispatch, failed, ReadSendWords(c, kOpD), s.ticket);
  LL_STAMP(1);
  DispatchSendPart<kFp8>(c, s, g, failed, pre, s_mem);
  __syncthreads();  // s_mem changes role
  DispatchRecvPart<kFp8>(c, r, g, int(g & 1), failed, pre, s_mem);
  EndRecv<true>(c, kOpD, g, failed);
  LL_STAMP_END(10);
}

// ------------------------------------------------------------------ combine
//
// Each expert rank's partial sum of a token (its rows there, weighted) goes to the token's source,
// which adds the partials in rank order. The partial of the source's own rank is never staged: its
// receive computes it from y (the same float32 sum, rounded to bfloat16 as staging would round
// it), so a rank's own tokens cost one read of y and one write of out (at EP1, all the work).

// A combine chunk is kLLChunk = 512 channels: per lane kLLPieces = 2 16-byte pieces of each row,
// 256 channels apart (each piece a coalesced 512-byte warp access). Two pieces per task halve the
// tasks: at T = 128, H = 7168 the 1792 receive tasks fit the grid's warps in one round, so a
// warp's rows are all in flight at once (one round trip for the rows, not two).
constexpr int kLLPiece = 32 * 8;
constexpr int kLLPieces = kLLChunk / kLLPiece;
static_assert(kLLChunk % kLLPiece == 0, "a combine chunk is whole 16-byte pieces per lane");
using ChunkAcc = float[kLLPieces][8];  // a lane's channels of a chunk, in float32
using ChunkBf16 = int4[kLLPieces];      // the same rounded to bfloat16, packed (half the registers)

// acc += sum over the set bits b < kBatch of `bits` of weight_of(base + b) * row_of(base + b) at
// the lane's channels e + u * kLLPiece (those < hidden), in float32, in increasing b; every load
// in flight before any row is added. row_of / weight_of may shuffle: warp-uniform.
template <int kBatch, typename RowOf, typename WeightOf>
__device__ __forceinline__ void SumBatch(unsigned bits, int base, RowOf row_of, WeightOf weight_of,
                                         int e, int hidden, ChunkAcc& acc) {
  int4 p[kBatch][kLLPieces];  // raw: a Pack of 8 bfloat16 would take 8 registers, not 4
#pragma unroll
  for (int b = 0; b < kBatch; ++b) {
    const __nv_bfloat16* row = row_of(base + b);
#pragma unroll
    for (int u = 0; u < kLLPieces; ++u) {
      if (((bits >> b) & 1) && e + u * kLLPiece < hidden) {
        p[b][u] = __ldcg(reinterpret_cast<const int4*>(row + e + u * kLLPiece));
      }
    }
  }
#pragma unroll
  for (int b = 0; b < kBatch; ++b) {
    const float w = weight_of(base + b);
#pragma unroll
    for (int u = 0; u < kLLPieces; ++u) {
      if (!((bits >> b) & 1) || e + u * kLLPiece >= hidden) continue;
      float f[8];
      Unpack8(p[b][u], f);
#pragma unroll
      for (int v = 0; v < 8; ++v) acc[u][v] = __fadd_rn(acc[u][v], __fmul_rn(w, f[v]));
    }
  }
}

// The same over every set bit i of `from` (i < 32), in increasing order: the first kFirst
// positions in one batch, any beyond one row at a time (batches in a loop made the compiler
// spill: it needs far more registers than one straight-line batch).
template <int kFirst, typename RowOf, typename WeightOf>
__device__ __forceinline__ void SumLaneRows(unsigned from, RowOf row_of, WeightOf weight_of,
                                            int e, int hidden, ChunkAcc& acc) {
  SumBatch<kFirst>(from, 0, row_of, weight_of, e, hidden, acc);
#pragma unroll 1
  for (unsigned rest = from & ~((1u << kFirst) - 1); rest != 0; rest &= rest - 1) {
    SumBatch<1>(1u, __ffs(rest) - 1, row_of, weight_of, e, hidden, acc);
  }
}

__device__ __forceinline__ void ZeroChunk(ChunkAcc& acc) {
#pragma unroll
  for (int u = 0; u < kLLPieces; ++u) {
#pragma unroll
    for (int v = 0; v < 8; ++v) acc[u][v] = 0.f;
  }
}

// Stores the lane's channels of a chunk at row + e (+ u * kLLPiece), as bfloat16.
__device__ __forceinline__ void StoreChunk(__nv_bfloat16* row, int e, int hidden,
                                           const ChunkAcc& acc) {
#pragma unroll
  for (int u = 0; u < kLLPieces; ++u) {
    if (e + u * kLLPiece < hidden) StoreF32<__nv_bfloat16, 8>(row + e + u * kLLPiece, acc[u]);
  }
}

// Lane k < K: where entry k of token t of source s is here (row of y; -1 not here, -2 dropped)
// and its weight. Loaded a task ahead (the warp's first before the kernel's waits).
struct CombineMeta {
  int row;
  float weight;
};

__device__ __forceinline__ CombineMeta LoadCombineMeta(const int32_t* slot_rows,
                                                       const float* slot_weights, int num_topk,
                                                       size_t token, bool valid) {
  const int lane = threadIdx.x % 32;
  CombineMeta m{-1, 0.f};
  if (valid && lane < num_topk) {
    m.row = __ldg(slot_rows + token * num_topk + lane);
    m.weight = __ldg(slot_weights + token * num_topk + lane);
  }
  return m;
}

// The lane's channels of the chunk at e of a token's partial here: sum over its rows (top-k
// order) of weight * y row, in float32.
__device__ __forceinline__ void SumTokenRows(const __nv_bfloat16* y, int hidden,
                                             const CombineMeta& m, int e, ChunkAcc& acc) {
  ZeroChunk(acc);
  SumLaneRows<8>(  // top-k <= 8: every row in flight at once
      __ballot_sync(kFull, m.row >= 0),
      [&](int k) { return y + size_t(__shfl_sync(kFull, m.row, k)) * hidden; },
      [&](int k) { return __shfl_sync(kFull, m.weight, k); }, e, hidden, acc);
}

__device__ __forceinline__ int ChunkChannel(int q, int hidden) {  // the lane's e in task q's chunk
  return q % ((hidden + kLLChunk - 1) / kLLChunk) * kLLChunk + int(threadIdx.x % 32) * 8;
}

// ------------------------------------------------------------------ combine send

__device__ __forceinline__ int NumChunks(int hidden) { return (hidden + kLLChunk - 1) / kLLChunk; }

// The warp's first task: task q runs on block q % G (warp q / G of it), so that when the tasks
// take 1 < n < 2 rounds, the second round spreads over every SM (block-major numbering left it
// on the first (n - 1) * G blocks: those SMs read twice the rows of the others).
__device__ __forceinline__ int FirstWarpTask() {
  return int(blockIdx.x) + int(gridDim.x) * (int(threadIdx.x) / 32);
}

// Warp tasks of a send: (destination s != this rank, token t, chunk), s-major.
__device__ __forceinline__ int CombineSendTasks(const CommArgs& c, const LLCombineSendArgs& a) {
  return (c.num_ranks - 1) * a.num_tokens * NumChunks(a.hidden);
}
__device__ __forceinline__ int SendTaskDest(const CommArgs& c, const LLCombineSendArgs& a, int q) {
  const int other = q / (a.num_tokens * NumChunks(a.hidden));
  return other + int(other >= c.rank);
}

__device__ __forceinline__ CombineMeta SendTaskMeta(const CommArgs& c, const LLCombineSendArgs& a,
                                                    int q) {
  const int valid = q < CombineSendTasks(c, a);
  const int t = valid ? q / NumChunks(a.hidden) % a.num_tokens : 0;
  const size_t token = valid ? size_t(SendTaskDest(c, a, q)) * a.num_tokens + t : 0;
  return LoadCombineMeta(a.slot_rows, a.slot_weights, a.num_topk, token, valid);
}

// Warp tasks on the experts' rank: the token's partial as bfloat16 into the source's staging,
// then the chunk's flag. `meta`: the warp's first task's (loaded before OpenSend made the block
// wait until the parity is free). (Reading y is the cost: T=128, H=7168 reads 14.7 MB.)
__device__ void CombineSendPart(const CommArgs& c, const LLCombineSendArgs& a, uint64_t g,
                                unsigned failed, CombineMeta meta) {
  const int lane = threadIdx.x % 32, hidden = a.hidden;
  const __nv_bfloat16* y = reinterpret_cast<const __nv_bfloat16*>(a.y);
  const int num_chunks = NumChunks(hidden), num_tasks = CombineSendTasks(c, a);
  const size_t flags_at = Align16(size_t(hidden) * 2);
  const int gwarp = FirstWarpTask(), num_gwarps = gridDim.x * kWarps;
  for (int q = gwarp; q < num_tasks; q += num_gwarps) {
    const CombineMeta m = meta;
    meta = SendTaskMeta(c, a, q + num_gwarps);  // in flight meanwhile
    const int s = SendTaskDest(c, a, q), t = q / num_chunks % a.num_tokens;
    const int chunk = q % num_chunks, e = chunk * kLLChunk + lane * 8;
    if ((failed >> s) & 1) continue;
    if (__ballot_sync(kFull, m.row != -1) == 0) continue;  // token t of s did not come here
    ChunkAcc acc;
    SumTokenRows(y, hidden, m, e, acc);
    if (q == gwarp) LL_STAMP(5);
    uint8_t* dst = Slot(c, s, c.rank, CombineSlot(int(g & 1), a.max_tokens, t));
    StoreChunk(reinterpret_cast<__nv_bfloat16*>(dst), e, hidden, acc);
    __syncwarp();  // the lanes' stores precede lane 0's release (cumulativity)
    if (lane == 0) StoreRelease(reinterpret_cast<uint64_t*>(dst + flags_at) + chunk, g);
    if (q == gwarp) LL_STAMP(6);
  }
}

// ------------------------------------------------------------------ combine receive

// Warp tasks (token, chunk) on the source. What a task needs: the token's token_sent, (chunk 0,
// lane 0) its token_dests for num_missing and, lane k < K, its entries here (for the partial of
// this rank); all loaded at once.
struct CombineRecvMeta {
  int sent, dests;
  CombineMeta local;
};

__device__ __forceinline__ CombineRecvMeta RecvTaskMeta(const CommArgs& c,
                                                        const LLCombineRecvArgs& a, int q) {
  const int num_chunks = NumChunks(a.hidden);
  const bool valid = q < a.num_tokens * num_chunks;
  const int t = valid ? q / num_chunks : 0;
  const bool counts = valid && q % num_chunks == 0 && threadIdx.x % 32 == 0;
  return {valid ? __ldg(a.token_sent + t) : 0, counts ? __ldg(a.token_dests + t) : 0,
          LoadCombineMeta(a.slot_rows, a.slot_weights, a.num_topk,
                          size_t(c.rank) * a.num_tokens + t, valid)};
}

// This rank's partial of a task, rounded to bfloat16 as staging would round it (zeros where the
// token has no row here).
__device__ __forceinline__ void LocalPartial(const LLCombineRecvArgs& a, const CombineRecvMeta& m,
                                             int q, ChunkBf16& local) {
  ChunkAcc acc;
  SumTokenRows(reinterpret_cast<const __nv_bfloat16*>(a.y), a.hidden, m.local,
               ChunkChannel(q, a.hidden), acc);
#pragma unroll
  for (int u = 0; u < kLLPieces; ++u) {
    __nv_bfloat162 h[4];
#pragma unroll
    for (int v = 0; v < 4; ++v) h[v] = __floats2bfloat162_rn(acc[u][2 * v], acc[u][2 * v + 1]);
    memcpy(&local[u], h, 16);
  }
}

// Receive task q, given its metadata and this rank's partial: the partials of the token's live
// ranks summed in rank order (float32), this rank's from y, the others' from the staging once
// their chunk flags carry g; out and (chunk 0) num_missing stored. kSolo: EP1 (no staging; the
// kernels are compiled apart so that its registers are not sized for the staged sums).
template <bool kSolo>
__device__ __forceinline__ void FinishRecvTask(const CommArgs& c, const LLCombineRecvArgs& a,
                                               uint64_t g, int parity, unsigned failed, int q,
                                               const CombineRecvMeta& m, const ChunkBf16& local) {
  const int lane = threadIdx.x % 32, me = c.rank, hidden = a.hidden;
  const int num_chunks = NumChunks(hidden);
  const int t = q / num_chunks, chunk = q % num_chunks, e = chunk * kLLChunk + lane * 8;
  const unsigned use = unsigned(m.sent) & ~failed, remote = use & ~(1u << me);
  const int slot = CombineSlot(parity, a.max_tokens, t);
  if (!kSolo && lane < c.num_ranks && ((remote >> lane) & 1)) {
    const size_t flags_at = Align16(size_t(hidden) * 2);
    WaitAtLeast(reinterpret_cast<const uint64_t*>(Slot(c, me, lane, slot) + flags_at) + chunk, g,
                c, kOpLLCombine, kPhaseSent, lane);
  }
  __syncwarp();
  ChunkAcc acc;
  ZeroChunk(acc);
  auto add_staged = [&](unsigned from) {
    if (kSolo || from == 0) return;
    SumLaneRows<8>(
        from, [&](int d) { return reinterpret_cast<const __nv_bfloat16*>(Slot(c, me, d, slot)); },
        [](int) { return 1.f; }, e, hidden, acc);
  };
  const unsigned below = remote & ((1u << me) - 1);
  add_staged(below);
  if ((use >> me) & 1) {
#pragma unroll
    for (int u = 0; u < kLLPieces; ++u) {
      float f[8];
      Unpack8(local[u], f);
#pragma unroll
      for (int v = 0; v < 8; ++v) acc[u][v] = __fadd_rn(acc[u][v], f[v]);
    }
  }
  add_staged(remote & ~below);
  StoreChunk(reinterpret_cast<__nv_bfloat16*>(a.out) + size_t(t) * hidden, e, hidden, acc);
  if (chunk == 0 && lane == 0) a.num_missing[t] = __popc(unsigned(m.dests) & ~use);
}

// The warp's receive tasks. `meta` / `first_local`: its first task's, computed by the caller
// before its waits (the first task is peeled: its partial is not live in the loop).
template <bool kSolo>
__device__ void CombineRecvPart(const CommArgs& c, const LLCombineRecvArgs& a, uint64_t g,
                                int parity, unsigned failed, const CombineRecvMeta& meta,
                                const ChunkBf16& first_local) {
  const int num_tasks = a.num_tokens * NumChunks(a.hidden);
  const int gwarp = FirstWarpTask(), num_gwarps = gridDim.x * kWarps;
  if (gwarp >= num_tasks) return;
  CombineRecvMeta next = RecvTaskMeta(c, a, gwarp + num_gwarps);  // in flight meanwhile
  FinishRecvTask<kSolo>(c, a, g, parity, failed, gwarp, meta, first_local);
  LL_STAMP(7);
  for (int q = gwarp + num_gwarps; q < num_tasks; q += num_gwarps) {
    const CombineRecvMeta m = next;
    next = RecvTaskMeta(c, a, q + num_gwarps);
    ChunkBf16 local;
    LocalPartial(a, m, q, local);
    FinishRecvTask<kSolo>(c, a, g, parity, failed, q, m, local);
  }
}

// The first receive task of the warp: its metadata and this rank's partial (before any wait).
struct FirstRecvTask {
  CombineRecvMeta meta;
  ChunkBf16 local;
};
__device__ __forceinline__ FirstRecvTask BeginRecvTask(const CommArgs& c,
                                                       const LLCombineRecvArgs& a) {
  const int q = FirstWarpTask();
  FirstRecvTask f;
  f.meta = RecvTaskMeta(c, a, q);
  LocalPartial(a, f.meta, q, f.local);
  return f;
}

__global__ void __launch_bounds__(kThreads, 1) LLCombineSendKernel(CommArgs c, LLCombineSendArgs a) {
  LL_STAMP(0);
  const int mark = LoadFailedMark(a.failed, c.num_ranks);
  const CombineMeta meta = SendTaskMeta(c, a, FirstWarpTask());
  const unsigned failed = FailedBits(mark, c.num_ranks, c.rank);
  const uint64_t g =
      OpenSend<false>(c, kOpC, kOpLLCombine, failed, ReadSendWords(c, kOpC), a.ticket);
  LL_STAMP(1);
  CombineSendPart(c, a, g, failed, meta);
  LL_STAMP(2);
  EndSend(c, kOpC, g);
  LL_STAMP_END(4);
}

template <bool kSolo>
__global__ void __launch_bounds__(kThreads, 1) LLCombineRecvKernel(CommArgs c, LLCombineRecvArgs a) {
  LL_STAMP(0);
  const int mark = LoadFailedMark(a.failed, c.num_ranks);
  const TicketWords ticket = ReadTicket(c, kOpC, a.ticket);
  const FirstRecvTask first = BeginRecvTask(c, a);  // y is ready: no wait needed
  const unsigned failed = FailedBits(mark, c.num_ranks, c.rank);
  OpenRecv(c, kOpC, kOpLLCombine, ticket, failed);
  LL_STAMP(1);
  CombineRecvPart<kSolo>(c, a, ticket.g, ticket.parity, failed, first.meta, first.local);
  LL_STAMP(3);
  EndRecv<false>(c, kOpC, ticket.g, failed);
  LL_STAMP_END(4);
}

template <bool kSolo>
__global__ void __launch_bounds__(kThreads, 1) LLCombineKernel(CommArgs c, LLCombineSendArgs s,
                                                               LLCombineRecvArgs r) {
  LL_STAMP(0);
  const int mark = LoadFailedMark(s.failed, c.num_ranks);
  if constexpr (kSolo) {  // nothing to send: the own partials at once
    const SendWords words = ReadSendWords(c, kOpC);  // in flight with the first partial's loads
    const FirstRecvTask first = BeginRecvTask(c, r);
    const unsigned failed = FailedBits(mark, c.num_ranks, c.rank);
    const uint64_t g = OpenSend<true>(c, kOpC, kOpLLCombine, failed, words, s.ticket);
    LL_STAMP(1);
    CombineRecvPart<true>(c, r, g, int(g & 1), failed, first.meta, first.local);
    LL_STAMP_END(4);
    return;
  }
  const CombineMeta meta = SendTaskMeta(c, s, FirstWarpTask());
  const unsigned failed = FailedBits(mark, c.num_ranks, c.rank);
  const uint64_t g =
      OpenSend<true>(c, kOpC, kOpLLCombine, failed, ReadSendWords(c, kOpC), s.ticket);
  LL_STAMP(1);
  CombineSendPart(c, s, g, failed, meta);
  LL_STAMP(2);
  // After the sends (its partial is not live across them), in flight with the peers' partials.
  const FirstRecvTask first = BeginRecvTask(c, r);
  CombineRecvPart<false>(c, r, g, int(g & 1), failed, first.meta, first.local);
  LL_STAMP(3);
  EndRecv<true>(c, kOpC, g, failed);
  LL_STAMP_END(4);
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
  if (Solo(c)) {
    LLSoloSendKernel<<<1, 32, 0, s>>>(c, kOpD, kOpLLDispatch, a.ticket);
    return cudaGetLastError();
  }
  auto kernel = a.use_fp8 ? LLDispatchSendKernel<true> : LLDispatchSendKernel<false>;
  kernel<<<Grid(c, a.num_tokens), kThreads, 0, s>>>(c, a);
  return cudaGetLastError();
}

cudaError_t LaunchLLDispatchRecv(const CommArgs& c, const LLDispatchRecvArgs& a, cudaStream_t s) {
  auto kernel = a.use_fp8 ? LLDispatchRecvKernel<true> : LLDispatchRecvKernel<false>;
  kernel<<<c.num_blocks, kThreads, 0, s>>>(c, a);
  return cudaGetLastError();
}

cudaError_t LaunchLLDispatch(const CommArgs& c, const LLDispatchSendArgs& send,
                             const LLDispatchRecvArgs& recv, cudaStream_t s) {
  auto kernel = send.use_fp8 ? LLDispatchKernel<true> : LLDispatchKernel<false>;
  kernel<<<c.num_blocks, kThreads, 0, s>>>(c, send, recv);
  return cudaGetLastError();
}

// Warps of a combine send: one per (other rank, token, chunk); a receive: per (token, chunk).
// Spread over as many blocks (SMs) as allowed, not packed 16 to a block: the warps of an SM share
// its load bandwidth, and the rows are the cost.
int CombineWarps(int num_ranks, int num_tokens, int hidden) {
  return num_ranks * num_tokens * ((hidden + kLLChunk - 1) / kLLChunk);
}

cudaError_t LaunchLLCombineSend(const CommArgs& c, const LLCombineSendArgs& a, cudaStream_t s) {
  if (Solo(c)) {
    LLSoloSendKernel<<<1, 32, 0, s>>>(c, kOpC, kOpLLCombine, a.ticket);
    return cudaGetLastError();
  }
  const int warps = CombineWarps(c.num_ranks - 1, a.num_tokens, a.hidden);
  LLCombineSendKernel<<<Grid(c, warps), kThreads, 0, s>>>(c, a);
  return cudaGetLastError();
}

cudaError_t LaunchLLCombineRecv(const CommArgs& c, const LLCombineRecvArgs& a, cudaStream_t s) {
  const int warps = CombineWarps(1, a.num_tokens, a.hidden);
  auto kernel = Solo(c) ? LLCombineRecvKernel<true> : LLCombineRecvKernel<false>;
  kernel<<<Grid(c, warps), kThreads, 0, s>>>(c, a);
  return cudaGetLastError();
}

cudaError_t LaunchLLCombine(const CommArgs& c, const LLCombineSendArgs& send,
                            const LLCombineRecvArgs& recv, cudaStream_t s) {
  const int warps = CombineWarps(max(c.num_ranks - 1, 1), send.num_tokens, send.hidden);
  auto kernel = Solo(c) ? LLCombineKernel<true> : LLCombineKernel<false>;
  kernel<<<Grid(c, warps), kThreads, 0, s>>>(c, send, recv);
  return cudaGetLastError();
}

cudaError_t PreloadLowLatencyKernels() {
  cudaError_t err = cudaSuccess;
  Touch(err, LLDispatchSendKernel<true>), Touch(err, LLDispatchSendKernel<false>);
  Touch(err, LLDispatchKernel<true>), Touch(err, LLDispatchKernel<false>);
  Touch(err, LLDispatchRecvKernel<true>), Touch(err, LLDispatchRecvKernel<false>);
  Touch(err, LLCombineSendKernel), Touch(err, LLSoloSendKernel);
  Touch(err, LLCombineRecvKernel<true>), Touch(err, LLCombineRecvKernel<false>);
  Touch(err, LLCombineKernel<true>), Touch(err, LLCombineKernel<false>);
  return err;
}

}  // namespace jax_ep
