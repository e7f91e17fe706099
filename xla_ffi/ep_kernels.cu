// Intranode dispatch/combine kernels (see ep_kernels.h for the protocol).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdio>

#include "ep_kernels.h"

namespace jax_ep {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFull = 0xffffffffu;

__host__ __device__ constexpr size_t Align16(size_t v) { return (v + 15) / 16 * 16; }

// ------------------------------------------------------------------ flags and bounded waits

__device__ __forceinline__ void StoreRelease(uint64_t* p, uint64_t v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ uint64_t LoadAcquire(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ uint64_t GlobalTimerNs() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ const char* PhaseName(int phase) {
  return phase == kPhaseEntry ? "entry barrier"
         : phase == kPhaseCounts ? "waiting for peer counts" : "waiting for peer data";
}

__device__ const char* OpName(int op) {
  return op == kOpDispatch ? "dispatch" : op == kOpCombine ? "combine"
         : op == kOpBroadcast ? "broadcast" : "peer copy";
}

// Spins until *flag >= epoch; on timeout reports and traps (the call then fails, never hangs).
__device__ void WaitFlag(const uint64_t* flag, const CommArgs& c, int op, int phase, int peer) {
  if (LoadAcquire(flag) >= c.epoch) return;
  const uint64_t start = GlobalTimerNs();
  while (LoadAcquire(flag) < c.epoch) {
    if (GlobalTimerNs() - start > c.timeout_ns) {
      volatile ErrorRecord* e = c.error;
      e->op = op;
      e->rank = c.rank;
      e->peer = peer;
      __threadfence_system();
      e->code = phase;
      __threadfence_system();
      printf("jax_ep: rank %d timed out in %s (%s) waiting for rank %d (epoch %llu)\n", c.rank,
             OpName(op), PhaseName(phase), peer, (unsigned long long)c.epoch);
      __trap();
    }
  }
}

__device__ __forceinline__ uint64_t* PeerFlag(const CommArgs& c, int peer, size_t offset,
                                              size_t index) {
  return reinterpret_cast<uint64_t*>(c.peer_ws[peer] + offset) + index;
}

// Every rank announces it entered this epoch (its staging is free), then waits for all peers.
__device__ void EntryBarrier(const CommArgs& c, int op) {
  if (blockIdx.x == 0 && threadIdx.x < c.num_ranks) {
    StoreRelease(PeerFlag(c, threadIdx.x, kEntryOffset, c.rank), c.epoch);
  }
  if (threadIdx.x < c.num_ranks) {
    WaitFlag(PeerFlag(c, c.rank, kEntryOffset, threadIdx.x), c, op, kPhaseEntry, threadIdx.x);
  }
  __syncthreads();
}

// This block finished pushing to every peer for this epoch. The barrier orders the block's
// stores before the signalling threads' system-scope fence and release (cumulativity), so one
// fence per peer suffices (a fence in every thread costs tens of microseconds per call).
__device__ void SignalSent(const CommArgs& c) {
  __syncthreads();
  if (threadIdx.x < c.num_ranks) {
    __threadfence_system();
    StoreRelease(PeerFlag(c, threadIdx.x, kSentOffset, size_t(c.rank) * kMaxBlocks + blockIdx.x),
                 c.epoch);
  }
}

// Waits until every block of peer `src` has pushed to this rank.
__device__ void WaitSentFrom(const CommArgs& c, int op, int src) {
  for (int block = threadIdx.x; block < c.num_blocks; block += blockDim.x) {
    WaitFlag(PeerFlag(c, c.rank, kSentOffset, size_t(src) * kMaxBlocks + block), c, op,
             kPhaseSent, src);
  }
  __syncthreads();
}

// Waits until every block of every peer has pushed to this rank.
__device__ void WaitAllSent(const CommArgs& c, int op) {
  for (int q = threadIdx.x; q < c.num_ranks * c.num_blocks; q += blockDim.x) {
    const int src = q / c.num_blocks, block = q % c.num_blocks;
    WaitFlag(PeerFlag(c, c.rank, kSentOffset, size_t(src) * kMaxBlocks + block), c, op,
             kPhaseSent, src);
  }
  __syncthreads();
}

__device__ __forceinline__ uint8_t* Slot(const CommArgs& c, int owner, int src, size_t slot) {
  return c.peer_ws[owner] + kStagingOffset + (size_t(src) * c.slots_per_rank + slot) * c.slot_stride;
}

// ------------------------------------------------------------------ warp-wide row copies

// Copies nbytes (a multiple of sizeof(V); both pointers V-aligned) with kUnroll loads in flight.
// kReadOnly: src is an input of this kernel (read-only cache path); else src is staging that
// peers wrote during this kernel, read past L1 (__ldcg).
template <typename V, bool kReadOnly>
__device__ __forceinline__ void WarpCopy(uint8_t* dst, const uint8_t* src, size_t nbytes, int lane) {
  constexpr int kUnroll = 4;
  const size_t n = nbytes / sizeof(V);
  const V* s = reinterpret_cast<const V*>(src);
  V* d = reinterpret_cast<V*>(dst);
  size_t i = lane;
  for (; i + 32 * (kUnroll - 1) < n; i += 32 * kUnroll) {
    V v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = kReadOnly ? __ldg(s + i + 32 * u) : __ldcg(s + i + 32 * u);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) d[i + 32 * u] = v[u];
  }
  for (; i < n; i += 32) d[i] = kReadOnly ? __ldg(s + i) : __ldcg(s + i);
}

template <typename V>
__device__ __forceinline__ void WarpZero(uint8_t* dst, size_t nbytes, int lane) {
  V* d = reinterpret_cast<V*>(dst);
  V z;
  memset(&z, 0, sizeof(V));
  for (size_t i = lane; i < nbytes / sizeof(V); i += 32) d[i] = z;
}

__device__ __forceinline__ void WarpCopyWords(float* dst, const float* src, int n, int lane) {
  for (int i = lane; i < n; i += 32) dst[i] = __ldcg(src + i);
}

template <typename T>
__device__ __forceinline__ T LoadStaged(const uint8_t* p, int index) {
  return __ldcg(reinterpret_cast<const T*>(p) + index);
}

// Slot layout of a dispatch: [x row | scales | topk idx | topk weights | pos_in_src].
struct DispatchSlot {
  size_t scales_off, idx_off, w_off, pos_off;
  __host__ __device__ DispatchSlot(size_t x_row_bytes, int num_scales, int num_topk) {
    scales_off = Align16(x_row_bytes);
    idx_off = scales_off + Align16(size_t(num_scales) * 4);
    w_off = idx_off + size_t(num_topk) * 4;
    pos_off = w_off + size_t(num_topk) * 4;
  }
  __host__ __device__ size_t bytes(int num_topk) const { return Align16(pos_off + num_topk * 4); }
};

// ------------------------------------------------------------------ dispatch

template <typename V>
__global__ void __launch_bounds__(kThreads, 1) DispatchKernel(CommArgs c, DispatchArgs a) {
  // Expert layout: padded group offsets [E_local + 1], then rows per local expert [E_local].
  extern __shared__ int smem[];
  __shared__ int s_kept, s_all;
  __shared__ int s_count[kMaxRanks], s_offset[kMaxRanks + 1];
  const int lane = threadIdx.x % 32;
  const int gwarp = blockIdx.x * kWarps + threadIdx.x / 32, num_gwarps = gridDim.x * kWarps;
  const int num_ranks = c.num_ranks, rank = c.rank, num_topk = a.num_topk;
  const int num_local = a.num_local_experts, cap = a.recv_capacity, s_cap = a.send_capacity;
  const DispatchSlot layout(a.x_row_bytes, a.num_scales, num_topk);

  EntryBarrier(c, kOpDispatch);

  // Counts first: tokens and per-expert slots for every peer, then wait for everyone's, so each
  // source's slots can be laid out as soon as that source's data has landed.
  const bool direct = !a.expert_layout;  // token layout: rows go straight to the outputs
  if (blockIdx.x == 0) {
    for (int q = threadIdx.x; q < num_ranks * (1 + num_local); q += blockDim.x) {
      const int d = q / (1 + num_local), j = q % (1 + num_local);
      const int v = j == 0 ? a.tokens_per_rank[d] : a.tokens_per_expert[d * num_local + j - 1];
      reinterpret_cast<int32_t*>(c.peer_ws[d] + kCountsOffset)[size_t(rank) * kCountStride + j] = v;
    }
    if (direct) {
      for (int q = threadIdx.x; q < num_ranks * num_ranks; q += blockDim.x) {
        const int d = q / num_ranks, e = q % num_ranks;
        reinterpret_cast<int32_t*>(c.peer_ws[d] + kMatrixOffset)[rank * kMaxRanks + e] =
            a.tokens_per_rank[e];
      }
      if (threadIdx.x < num_ranks) {
        uint64_t* ptrs = reinterpret_cast<uint64_t*>(c.peer_ws[threadIdx.x] + kPtrOffset) +
                         rank * kNumPtrs;
        ptrs[0] = reinterpret_cast<uint64_t>(a.recv_x);
        ptrs[1] = reinterpret_cast<uint64_t>(a.recv_scales);
        ptrs[2] = reinterpret_cast<uint64_t>(a.recv_topk_idx);
        ptrs[3] = reinterpret_cast<uint64_t>(a.recv_topk_weights);
      }
    }
    __syncthreads();
    if (threadIdx.x < num_ranks) {
      __threadfence_system();
      StoreRelease(PeerFlag(c, threadIdx.x, kCountsFlagOffset, rank), c.epoch);
    }
  }
  if (threadIdx.x < num_ranks) {
    WaitFlag(PeerFlag(c, rank, kCountsFlagOffset, threadIdx.x), c, kOpDispatch, kPhaseCounts,
             threadIdx.x);
  }
  __shared__ int s_dst_offset[kMaxRanks];  // direct: my first row on each destination
  __shared__ uint64_t s_dst_ptr[kMaxRanks][kNumPtrs];
  if (direct && threadIdx.x < num_ranks) {
    const int d = threadIdx.x;
    const int32_t* matrix = reinterpret_cast<const int32_t*>(c.peer_ws[rank] + kMatrixOffset);
    int before = 0;
    for (int q = 0; q < rank; ++q) before += __ldcg(matrix + q * kMaxRanks + d);
    s_dst_offset[d] = before;
    const uint64_t* ptrs = reinterpret_cast<const uint64_t*>(c.peer_ws[rank] + kPtrOffset);
    for (int q = 0; q < kNumPtrs; ++q) s_dst_ptr[d][q] = __ldcg(ptrs + d * kNumPtrs + q);
  }
  __syncthreads();

  // Push: one warp per token; the row crosses NVLink once per destination rank.
  for (int t = gwarp; t < a.num_tokens; t += num_gwarps) {
    const int my_slot = lane < num_ranks ? a.send_pos[size_t(t) * num_ranks + lane] : -1;
    unsigned dests = __ballot_sync(kFull, my_slot >= 0);
    while (dests) {
      const int d = __ffs(dests) - 1;
      dests &= dests - 1;
      const int slot = __shfl_sync(kFull, my_slot, d);
      if (direct) {  // straight into rank d's outputs, at this token's final row
        const int row = s_dst_offset[d] + slot;
        if (row >= cap) continue;  // dropped: counted by the receiver
        WarpCopy<V, true>(reinterpret_cast<uint8_t*>(s_dst_ptr[d][0]) + size_t(row) * a.x_row_bytes,
                          a.x + size_t(t) * a.x_row_bytes, a.x_row_bytes, lane);
        for (int q = lane; q < a.num_scales; q += 32) {
          reinterpret_cast<float*>(s_dst_ptr[d][1])[size_t(row) * a.num_scales + q] =
              a.scales[size_t(t) * a.num_scales + q];
        }
        if (lane < num_topk) {
          const size_t tk = size_t(t) * num_topk + lane, rk = size_t(row) * num_topk + lane;
          const int j = a.topk_idx[tk] - d * num_local;
          const bool local = j >= 0 && j < num_local;
          reinterpret_cast<int32_t*>(s_dst_ptr[d][2])[rk] = local ? j : -1;
          reinterpret_cast<float*>(s_dst_ptr[d][3])[rk] = local ? a.topk_weights[tk] : 0.f;
        }
        continue;
      }
      uint8_t* dst = Slot(c, d, rank, slot);
      WarpCopy<V, true>(dst, a.x + size_t(t) * a.x_row_bytes, a.x_row_bytes, lane);
      if (a.num_scales) {
        WarpCopyWords(reinterpret_cast<float*>(dst + layout.scales_off),
                      a.scales + size_t(t) * a.num_scales, a.num_scales, lane);
      }
      if (lane < num_topk) {
        const size_t tk = size_t(t) * num_topk + lane;
        reinterpret_cast<int32_t*>(dst + layout.idx_off)[lane] = a.topk_idx[tk];
        reinterpret_cast<float*>(dst + layout.w_off)[lane] = a.topk_weights[tk];
        reinterpret_cast<int32_t*>(dst + layout.pos_off)[lane] = a.pos_in_src[tk];
      }
    }
  }
  SignalSent(c);

  // Receive side: counts from every source, then offsets.
  const int32_t* counts = reinterpret_cast<const int32_t*>(c.peer_ws[rank] + kCountsOffset);
  if (threadIdx.x == 0) {
    int acc = 0;
    for (int s = 0; s < num_ranks; ++s) {
      s_count[s] = __ldcg(counts + size_t(s) * kCountStride);
      s_offset[s] = acc;
      acc += s_count[s];
    }
    s_offset[num_ranks] = acc;
  }
  if (a.expert_layout && threadIdx.x < 32) {  // warp 0: padded group offsets (exclusive scan)
    int carry = 0;
    for (int base = 0; base < num_local; base += 32) {
      const int j = base + lane;
      int v = 0;
      if (j < num_local) {
        for (int s = 0; s < num_ranks; ++s) v += __ldcg(counts + size_t(s) * kCountStride + 1 + j);
        smem[num_local + 1 + j] = v;
        v = (v + a.expert_alignment - 1) / a.expert_alignment * a.expert_alignment;
      }
      int incl = v;
      for (int o = 1; o < 32; o <<= 1) {
        const int n = __shfl_up_sync(kFull, incl, o);
        if (lane >= o) incl += n;
      }
      if (j < num_local) smem[j] = carry + incl - v;
      carry += __shfl_sync(kFull, incl, 31);
    }
    if (lane == 0) smem[num_local] = carry;
  }
  __syncthreads();

  const size_t row_bytes = a.x_row_bytes;
  for (int step = 0; step < num_ranks; ++step) {
    const int s = (rank + step) % num_ranks;  // own slots first: they land earliest
    WaitSentFrom(c, kOpDispatch, s);
    const int num_in = min(s_count[s], s_cap);
    for (int i = gwarp; i < s_cap; i += num_gwarps) {
      const size_t src_slot = size_t(s) * s_cap + i;
      const uint8_t* slot = Slot(c, rank, s, i);
      if (direct) {  // the row already sits in recv_x: only the bookkeeping is left
        const int row = s_offset[s] + i;
        const bool stored = i < num_in && row < cap;
        if (lane == 0) a.recv_rows[src_slot] = stored ? row : cap;
        if (!stored) continue;
        if (lane < num_topk) {
          const int j = __ldcg(a.recv_topk_idx + size_t(row) * num_topk + lane);
          if (j >= 0) atomicAdd(a.num_tokens_per_expert + j, 1);
        }
        if (lane == 0) a.row_src[row] = int(src_slot);
        continue;
      }
      // Expert layout: one row per (slot, local expert); the copies are local.
      int row = cap;
      if (i < num_in && lane < num_topk) {
        const int j = LoadStaged<int32_t>(slot + layout.idx_off, lane) -
                      rank * num_local;
        if (j >= 0 && j < num_local) {
          int before = 0;  // rows of this expert from lower source ranks
          for (int q = 0; q < s; ++q) before += __ldcg(counts + size_t(q) * kCountStride + 1 + j);
          const int r = smem[j] + before + LoadStaged<int32_t>(slot + layout.pos_off, lane);
          if (r < cap) {
            row = r;
            a.recv_topk_idx[row] = j;
            a.recv_topk_weights[row] = LoadStaged<float>(slot + layout.w_off, lane);
            a.row_src[row] = int(src_slot);
          }
        }
      }
      if (lane < num_topk) a.recv_rows[src_slot * num_topk + lane] = row;
      unsigned rows = __ballot_sync(kFull, row < cap);
      while (rows) {
        const int k = __ffs(rows) - 1;
        rows &= rows - 1;
        const int r = __shfl_sync(kFull, row, k);
        WarpCopy<V, false>(a.recv_x + size_t(r) * row_bytes, slot, row_bytes, lane);
        if (a.num_scales) {
          WarpCopyWords(a.recv_scales + size_t(r) * a.num_scales,
                        reinterpret_cast<const float*>(slot + layout.scales_off), a.num_scales, lane);
        }
      }
    }
  }

  // Rows holding no data: zeros / -1 (token layout: the tail; expert layout: padding + tail).
  const int total = s_offset[num_ranks];
  const int row_idx_width = a.expert_layout ? 1 : num_topk;
  for (int row = gwarp; row < cap; row += num_gwarps) {
    bool empty;
    if (!a.expert_layout) {
      empty = row >= total;
    } else if (row >= smem[num_local]) {
      empty = true;
    } else {
      int lo = 0, hi = num_local - 1;  // last group starting at or before row
      while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (smem[mid] <= row) lo = mid; else hi = mid - 1;
      }
      empty = row >= smem[lo] + smem[num_local + 1 + lo];
    }
    if (!empty) continue;
    WarpZero<V>(a.recv_x + size_t(row) * row_bytes, row_bytes, lane);
    for (int q = lane; q < a.num_scales; q += 32) a.recv_scales[size_t(row) * a.num_scales + q] = 0.f;
    if (lane < row_idx_width) {
      a.recv_topk_idx[size_t(row) * row_idx_width + lane] = -1;
      a.recv_topk_weights[size_t(row) * row_idx_width + lane] = 0.f;
    }
    if (lane == 0) a.row_src[row] = -1;
  }

  if (blockIdx.x != 0) return;
  if (threadIdx.x == 0) s_kept = 0, s_all = 0;
  __syncthreads();
  if (!a.expert_layout) {
    if (threadIdx.x == 0) s_all = total, s_kept = min(total, cap);
  } else {
    for (int j = threadIdx.x; j < num_local; j += blockDim.x) {
      const int count = smem[num_local + 1 + j];
      const int room = max(cap - smem[j], 0);
      const int kept = min(count, room);
      a.num_tokens_per_expert[j] = kept;
      a.group_sizes[j] = min(smem[j + 1] - smem[j], room);
      atomicAdd(&s_kept, kept);
      atomicAdd(&s_all, count);
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    *a.num_recv_rows = s_kept;
    *a.num_dropped = s_all - s_kept;
  }
  if (threadIdx.x < num_ranks) a.recv_count[threadIdx.x] = s_count[threadIdx.x];
}

// ------------------------------------------------------------------ combine family

template <typename E> __device__ __forceinline__ float ToF32(E v);
template <> __device__ __forceinline__ float ToF32<float>(float v) { return v; }
template <> __device__ __forceinline__ float ToF32<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <> __device__ __forceinline__ float ToF32<__half>(__half v) { return __half2float(v); }
template <typename E> __device__ __forceinline__ E FromF32(float v);
template <> __device__ __forceinline__ float FromF32<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 FromF32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ __half FromF32<__half>(float v) { return __float2half_rn(v); }

// kPack elements move as one 16-byte access when rows allow it, else one at a time.
template <typename E, int kPack>
struct alignas(sizeof(E) * kPack) Pack {  // aligned: one 16-byte access, not kPack small ones
  E v[kPack];
};

template <typename E, int kPack>
__device__ __forceinline__ void LoadF32(const E* p, float (&f)[kPack]) {
  Pack<E, kPack> pk = *reinterpret_cast<const Pack<E, kPack>*>(p);
#pragma unroll
  for (int u = 0; u < kPack; ++u) f[u] = ToF32(pk.v[u]);
}

// The same for staging that peers wrote during this kernel: read past L1.
template <typename E, int kPack>
__device__ __forceinline__ void LoadStagedF32(const E* p, float (&f)[kPack]) {
  Pack<E, kPack> pk;
  if constexpr (sizeof(pk) == 16) {
    const int4 raw = __ldcg(reinterpret_cast<const int4*>(p));
    memcpy(&pk, &raw, 16);
  } else {
#pragma unroll
    for (int u = 0; u < kPack; ++u) pk.v[u] = __ldcg(p + u);
  }
#pragma unroll
  for (int u = 0; u < kPack; ++u) f[u] = ToF32(pk.v[u]);
}

template <typename E, int kPack>
__device__ __forceinline__ void StoreF32(E* p, const float (&f)[kPack]) {
  Pack<E, kPack> pk;
#pragma unroll
  for (int u = 0; u < kPack; ++u) pk.v[u] = FromF32<E>(f[u]);
  *reinterpret_cast<Pack<E, kPack>*>(p) = pk;
}

template <typename E, int kPack>
__global__ void __launch_bounds__(kThreads, 1) ReturnKernel(CommArgs c, ReturnArgs a) {
  using P = Pack<E, kPack>;
  constexpr int kU = 4;  // packs in flight per lane
  const int lane = threadIdx.x % 32;
  const int gwarp = blockIdx.x * kWarps + threadIdx.x / 32, num_gwarps = gridDim.x * kWarps;
  const int num_ranks = c.num_ranks, rank = c.rank, num_topk = a.num_topk;
  const int cap = a.recv_capacity, s_cap = a.send_capacity, width = a.width;
  const E* y = static_cast<const E*>(a.y);

  EntryBarrier(c, kOpCombine);

  // Push: a value row per received slot back to its source rank.
  for (int s = 0; s < num_ranks; ++s) {
    const int num_in = min(a.recv_count[s], s_cap);
    for (int i = gwarp; i < num_in; i += num_gwarps) {
      const size_t src_slot = size_t(s) * s_cap + i;
      uint8_t* dst = Slot(c, s, rank, i);
      if (a.mode == kReturnGatherK) {
        if (lane < num_topk) {
          const int row = a.recv_rows[src_slot * num_topk + lane];
          reinterpret_cast<float*>(dst)[lane] =
              row < cap ? reinterpret_cast<const float*>(a.y)[row] : 0.f;
        }
        continue;
      }
      int my_row = cap;
      float my_w = 1.f;
      if (a.mode == kReturnRows) {
        my_row = a.recv_rows[src_slot];
      } else if (lane < num_topk) {
        my_row = a.recv_rows[src_slot * num_topk + lane];
        if (a.row_weights != nullptr && my_row < cap) my_w = a.row_weights[my_row];
      }
      if (a.mode == kReturnRows) {  // a plain row copy, kU 16-byte packs in flight per lane
        const int row = __shfl_sync(kFull, my_row, 0);
        const E* src = y + size_t(row) * width;
        for (int e0 = 0; e0 < width; e0 += 32 * kPack * kU) {
          P v[kU];
#pragma unroll
          for (int u = 0; u < kU; ++u) {
            const int e = e0 + (u * 32 + lane) * kPack;
            if (e < width && row < cap) {
              v[u] = *reinterpret_cast<const P*>(src + e);
            } else {
#pragma unroll
              for (int q = 0; q < kPack; ++q) v[u].v[q] = FromF32<E>(0.f);
            }
          }
#pragma unroll
          for (int u = 0; u < kU; ++u) {
            const int e = e0 + (u * 32 + lane) * kPack;
            if (e < width) *reinterpret_cast<P*>(reinterpret_cast<E*>(dst) + e) = v[u];
          }
        }
        continue;
      }
      const unsigned present = __ballot_sync(kFull, lane < num_topk && my_row < cap);
      for (int e0 = 0; e0 < width; e0 += 32 * kPack * kU) {  // warp-uniform: shuffles below
        float acc[kU][kPack];
#pragma unroll
        for (int u = 0; u < kU; ++u)
#pragma unroll
          for (int q = 0; q < kPack; ++q) acc[u][q] = 0.f;
        for (unsigned m = present; m; m &= m - 1) {  // k in increasing order
          const int k = __ffs(m) - 1;
          const int row = __shfl_sync(kFull, my_row, k);
          const float w = __shfl_sync(kFull, my_w, k);
          float f[kU][kPack];
#pragma unroll
          for (int u = 0; u < kU; ++u) {
            const int e = e0 + (u * 32 + lane) * kPack;
            if (e < width) LoadF32<E, kPack>(y + size_t(row) * width + e, f[u]);
          }
#pragma unroll
          for (int u = 0; u < kU; ++u) {
            if (e0 + (u * 32 + lane) * kPack >= width) continue;
#pragma unroll
            for (int q = 0; q < kPack; ++q) acc[u][q] = __fadd_rn(acc[u][q], __fmul_rn(w, f[u][q]));
          }
        }
#pragma unroll
        for (int u = 0; u < kU; ++u) {
          const int e = e0 + (u * 32 + lane) * kPack;
          if (e < width) StoreF32<E, kPack>(reinterpret_cast<E*>(dst) + e, acc[u]);
        }
      }
    }
  }
  SignalSent(c);
  WaitAllSent(c, kOpCombine);

  // Reduce: out[t] = sum over ranks d (in order) of the row d returned, float32.
  const int out_width = a.mode == kReturnGatherK ? num_topk : width;
  for (int t = gwarp; t < a.num_tokens; t += num_gwarps) {
    const int my_slot = lane < num_ranks ? a.send_pos[size_t(t) * num_ranks + lane] : -1;
    const unsigned from = __ballot_sync(kFull, my_slot >= 0);
    if (a.mode == kReturnGatherK) {
      float acc = 0.f;
      for (unsigned m = from; m; m &= m - 1) {
        const int d = __ffs(m) - 1;
        const int slot = __shfl_sync(kFull, my_slot, d);
        if (lane < num_topk) {
          acc = __fadd_rn(acc, LoadStaged<float>(Slot(c, rank, d, slot), lane));
        }
      }
      if (lane < num_topk) static_cast<float*>(a.out)[size_t(t) * num_topk + lane] = acc;
      continue;
    }
    for (int e0 = 0; e0 < out_width; e0 += 32 * kPack * kU) {  // warp-uniform: shuffles below
      float acc[kU][kPack];
#pragma unroll
      for (int u = 0; u < kU; ++u)
#pragma unroll
        for (int q = 0; q < kPack; ++q) acc[u][q] = 0.f;
      for (unsigned m = from; m; m &= m - 1) {  // ranks in increasing order
        const int d = __ffs(m) - 1;
        const E* row = reinterpret_cast<const E*>(Slot(c, rank, d, __shfl_sync(kFull, my_slot, d)));
        float f[kU][kPack];
#pragma unroll
        for (int u = 0; u < kU; ++u) {
          const int e = e0 + (u * 32 + lane) * kPack;
          if (e < out_width) LoadStagedF32<E, kPack>(row + e, f[u]);
        }
#pragma unroll
        for (int u = 0; u < kU; ++u) {
          if (e0 + (u * 32 + lane) * kPack >= out_width) continue;
#pragma unroll
          for (int q = 0; q < kPack; ++q) acc[u][q] = __fadd_rn(acc[u][q], f[u][q]);
        }
      }
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int e = e0 + (u * 32 + lane) * kPack;
        if (e < out_width) StoreF32<E, kPack>(static_cast<E*>(a.out) + size_t(t) * width + e, acc[u]);
      }
    }
  }
}

// ------------------------------------------------------------------ broadcast (combine's VJP)

template <typename V>
__global__ void __launch_bounds__(kThreads, 1) BroadcastKernel(CommArgs c, BroadcastArgs a) {
  const int lane = threadIdx.x % 32;
  const int gwarp = blockIdx.x * kWarps + threadIdx.x / 32, num_gwarps = gridDim.x * kWarps;
  const int num_ranks = c.num_ranks, rank = c.rank;

  EntryBarrier(c, kOpBroadcast);
  for (int t = gwarp; t < a.num_tokens; t += num_gwarps) {
    const int my_slot = lane < num_ranks ? a.send_pos[size_t(t) * num_ranks + lane] : -1;
    for (unsigned m = __ballot_sync(kFull, my_slot >= 0); m; m &= m - 1) {
      const int d = __ffs(m) - 1;
      const int slot = __shfl_sync(kFull, my_slot, d);
      WarpCopy<V, true>(Slot(c, d, rank, slot), a.values + size_t(t) * a.row_bytes, a.row_bytes,
                        lane);
    }
  }
  SignalSent(c);
  WaitAllSent(c, kOpBroadcast);
  for (int row = gwarp; row < a.recv_capacity; row += num_gwarps) {
    const int src = a.row_src[row];
    uint8_t* dst = a.rows + size_t(row) * a.row_bytes;
    if (src < 0) {
      WarpZero<V>(dst, a.row_bytes, lane);
    } else {
      WarpCopy<V, false>(dst, Slot(c, rank, src / a.send_capacity, src % a.send_capacity),
                         a.row_bytes, lane);
    }
  }
}

// ------------------------------------------------------------------ slot ranks (local)

// One block per expert: rank of each slot (t, k) among the slots naming that expert, in (t, k)
// order. Each thread counts kPer consecutive slots, a block-wide exclusive scan gives its start;
// deterministic. Slots naming no valid expert keep the -1 prefill.
constexpr int kRankThreads = 1024, kRankPer = 8;

__global__ void __launch_bounds__(kRankThreads) SlotRanksKernel(const int32_t* topk_idx,
                                                                int num_slots, int32_t* ranks) {
  __shared__ int warp_total[kRankThreads / 32];
  const int expert = blockIdx.x, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int carry = 0;
  for (int base = 0; base < num_slots; base += kRankThreads * kRankPer) {
    const int first = base + threadIdx.x * kRankPer;
    unsigned hits = 0;
#pragma unroll
    for (int q = 0; q < kRankPer; ++q) {
      if (first + q < num_slots && __ldg(topk_idx + first + q) == expert) hits |= 1u << q;
    }
    const int mine = __popc(hits);
    int incl = mine;  // warp-inclusive scan
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int n = __shfl_up_sync(kFull, incl, o);
      if (lane >= o) incl += n;
    }
    if (lane == 31) warp_total[warp] = incl;
    __syncthreads();
    int before = carry, total = 0;
    for (int w = 0; w < kRankThreads / 32; ++w) {
      const int t = warp_total[w];
      before += w < warp ? t : 0;
      total += t;
    }
    int r = before + incl - mine;
    for (unsigned h = hits; h; h &= h - 1) ranks[first + __ffs(h) - 1] = r++;
    carry += total;
    __syncthreads();
  }
}

// ------------------------------------------------------------------ NVLink ceiling

__global__ void __launch_bounds__(kThreads, 1) PeerCopyKernel(CommArgs c, PeerCopyArgs a) {
  EntryBarrier(c, kOpPeerCopy);
  // Chunks of 512 bytes per warp, interleaved over destinations so every link stays busy.
  const size_t chunks = a.block_bytes / 512, tail = a.block_bytes % 512;
  const int gwarp = blockIdx.x * kWarps + threadIdx.x / 32, num_gwarps = gridDim.x * kWarps;
  const int lane = threadIdx.x % 32;
  for (size_t q = gwarp; q < chunks * c.num_ranks; q += num_gwarps) {
    const int d = int(q % c.num_ranks);
    if (d == c.rank && !a.include_self) continue;
    const size_t off = (q / c.num_ranks) * 512 + lane * 16;
    const int4 v = __ldg(reinterpret_cast<const int4*>(a.src + d * a.block_bytes + off));
    *reinterpret_cast<int4*>(Slot(c, d, c.rank, 0) + off) = v;
  }
  if (tail && gwarp < c.num_ranks && (gwarp != c.rank || a.include_self)) {
    const size_t base = chunks * 512;
    WarpCopy<int4, true>(Slot(c, gwarp, c.rank, 0) + base, a.src + gwarp * a.block_bytes + base,
                         tail, lane);
  }
  SignalSent(c);
  WaitAllSent(c, kOpPeerCopy);
  if (blockIdx.x == 0 && threadIdx.x == 0) *a.done = 1;
}

// ------------------------------------------------------------------ launch helpers

int VecBytes(size_t row_bytes) {
  return row_bytes % 16 == 0 ? 16 : row_bytes % 8 == 0 ? 8 : row_bytes % 4 == 0 ? 4
         : row_bytes % 2 == 0 ? 2 : 1;
}

template <typename V>
cudaError_t LaunchDispatchV(const CommArgs& c, const DispatchArgs& a, cudaStream_t stream) {
  const size_t smem = sizeof(int) * (2 * a.num_local_experts + 1);
  DispatchKernel<V><<<c.num_blocks, kThreads, smem, stream>>>(c, a);
  return cudaGetLastError();
}

template <typename V>
cudaError_t LaunchBroadcastV(const CommArgs& c, const BroadcastArgs& a, cudaStream_t stream) {
  BroadcastKernel<V><<<c.num_blocks, kThreads, 0, stream>>>(c, a);
  return cudaGetLastError();
}

template <typename E>
cudaError_t LaunchReturnE(const CommArgs& c, const ReturnArgs& a, cudaStream_t stream) {
  constexpr int kPack = 16 / sizeof(E);
  const bool vec = a.mode != kReturnGatherK && a.width % kPack == 0;
  if (vec) {
    ReturnKernel<E, kPack><<<c.num_blocks, kThreads, 0, stream>>>(c, a);
  } else {
    ReturnKernel<E, 1><<<c.num_blocks, kThreads, 0, stream>>>(c, a);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t LaunchSlotRanks(const int32_t* topk_idx, int num_slots, int num_experts,
                            int32_t* ranks, cudaStream_t stream) {
  cudaMemsetAsync(ranks, 0xff, sizeof(int32_t) * num_slots, stream);  // -1 everywhere
  if (num_slots > 0 && num_experts > 0) {
    SlotRanksKernel<<<num_experts, kRankThreads, 0, stream>>>(topk_idx, num_slots, ranks);
  }
  return cudaGetLastError();
}

cudaError_t LaunchPeerCopy(const CommArgs& c, const PeerCopyArgs& a, cudaStream_t stream) {
  PeerCopyKernel<<<c.num_blocks, kThreads, 0, stream>>>(c, a);
  return cudaGetLastError();
}

cudaError_t PreloadKernels() {
  cudaError_t err = cudaSuccess;
  auto touch = [&err](auto kernel) {
    cudaFuncAttributes attr;
    if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, kernel);
  };
  touch(DispatchKernel<int4>), touch(DispatchKernel<int2>), touch(DispatchKernel<int>);
  touch(DispatchKernel<short>), touch(DispatchKernel<char>);
  touch(BroadcastKernel<int4>), touch(BroadcastKernel<int2>), touch(BroadcastKernel<int>);
  touch(BroadcastKernel<short>), touch(BroadcastKernel<char>);
  touch(ReturnKernel<float, 4>), touch(ReturnKernel<float, 1>);
  touch(ReturnKernel<__nv_bfloat16, 8>), touch(ReturnKernel<__nv_bfloat16, 1>);
  touch(ReturnKernel<__half, 8>), touch(ReturnKernel<__half, 1>), touch(PeerCopyKernel);
  touch(SlotRanksKernel);
  return err;
}

size_t DispatchSlotBytes(size_t x_row_bytes, int num_scales, int num_topk) {
  return DispatchSlot(x_row_bytes, num_scales, num_topk).bytes(num_topk);
}

size_t ReturnSlotBytes(int width, ElemType elem, ReturnMode mode, int num_topk) {
  if (mode == kReturnGatherK) return Align16(size_t(num_topk) * 4);
  const size_t item = elem == kF32 ? 4 : 2;
  return Align16(size_t(width) * item);
}

// Runs Launch<V> with the widest vector type (16..1 bytes) that divides the row size.
template <template <typename> class Launch, typename Args>
cudaError_t ByRowVector(size_t row_bytes, const CommArgs& c, const Args& a, cudaStream_t stream) {
  switch (VecBytes(row_bytes)) {
    case 16: return Launch<int4>::Run(c, a, stream);
    case 8: return Launch<int2>::Run(c, a, stream);
    case 4: return Launch<int>::Run(c, a, stream);
    case 2: return Launch<short>::Run(c, a, stream);
    default: return Launch<char>::Run(c, a, stream);
  }
}

template <typename V>
struct DispatchLauncher {
  static cudaError_t Run(const CommArgs& c, const DispatchArgs& a, cudaStream_t s) {
    return LaunchDispatchV<V>(c, a, s);
  }
};

template <typename V>
struct BroadcastLauncher {
  static cudaError_t Run(const CommArgs& c, const BroadcastArgs& a, cudaStream_t s) {
    return LaunchBroadcastV<V>(c, a, s);
  }
};

cudaError_t LaunchDispatch(const CommArgs& c, const DispatchArgs& a, cudaStream_t stream) {
  return ByRowVector<DispatchLauncher>(a.x_row_bytes, c, a, stream);
}

cudaError_t LaunchBroadcast(const CommArgs& c, const BroadcastArgs& a, cudaStream_t stream) {
  return ByRowVector<BroadcastLauncher>(a.row_bytes, c, a, stream);
}

cudaError_t LaunchReturn(const CommArgs& c, const ReturnArgs& a, cudaStream_t stream) {
  switch (a.elem) {
    case kF32: return LaunchReturnE<float>(c, a, stream);
    case kBF16: return LaunchReturnE<__nv_bfloat16>(c, a, stream);
    default: return LaunchReturnE<__half>(c, a, stream);
  }
}

}  // namespace jax_ep
