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
  return c.peer_ws[owner] + c.staging_offset + (size_t(src) * c.slots_per_rank + slot) * c.slot_stride;
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

// Copies the row at src to dst_of(k) for every set bit k of `rows`, reading it once (dst_of
// may shuffle: the loop is warp-uniform). kReadOnly as in WarpCopy.
template <typename V, bool kReadOnly, typename DstOf>
__device__ __forceinline__ void WarpCopyToRows(unsigned rows, DstOf dst_of, const uint8_t* src,
                                               size_t nbytes, int lane) {
  constexpr int kUnroll = 4;
  const size_t n = nbytes / sizeof(V);
  const V* s = reinterpret_cast<const V*>(src);
  for (size_t i0 = 0; i0 < n; i0 += 32 * kUnroll) {
    V v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (i0 + 32 * u + lane < n) v[u] = kReadOnly ? __ldg(s + i0 + 32 * u + lane) : __ldcg(s + i0 + 32 * u + lane);
    }
    for (unsigned m = rows; m; m &= m - 1) {
      V* d = reinterpret_cast<V*>(dst_of(__ffs(m) - 1));
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (i0 + 32 * u + lane < n) d[i0 + 32 * u + lane] = v[u];
      }
    }
  }
}

template <typename T>
__device__ __forceinline__ T LoadStaged(const uint8_t* p, int index) {
  return __ldcg(reinterpret_cast<const T*>(p) + index);
}

// Staging slot of an expert-layout dispatch: one token's routing metadata (the row itself goes
// straight to the receiver's output): [topk idx | topk weights | pos_in_src], K entries each.
struct DispatchSlot {
  size_t idx_off, w_off, pos_off;
  __host__ __device__ explicit DispatchSlot(int num_topk)
      : idx_off(0), w_off(size_t(num_topk) * 4), pos_off(size_t(num_topk) * 8) {}
  __host__ __device__ static size_t bytes(int num_topk) { return Align16(size_t(num_topk) * 12); }
};

// Arrival flag of (source rank src, slot) in rank owner's workspace.
__device__ __forceinline__ uint64_t* SlotFlag(const CommArgs& c, int owner, int src, int slot) {
  return reinterpret_cast<uint64_t*>(c.peer_ws[owner] + c.flags_offset) +
         size_t(src) * c.slots_per_rank + slot;
}

// The SM split of a kernel with receive-only blocks: blocks [0, num_send) send, the rest
// receive. Without receive-only blocks every block sends first and receives after (senders
// never wait on receivers, so this cannot deadlock).
struct Roles {
  bool sender, receiver;
  int swarp, num_swarps, rwarp, num_rwarps;  // this warp's index / warp count in each role
  __device__ explicit Roles(int num_recv_blocks) {
    const int num_send = gridDim.x - num_recv_blocks, warp = threadIdx.x / 32;
    sender = int(blockIdx.x) < num_send;
    receiver = !sender || num_recv_blocks == 0;
    swarp = blockIdx.x * kWarps + warp, num_swarps = num_send * kWarps;
    rwarp = (num_recv_blocks ? blockIdx.x - num_send : blockIdx.x) * kWarps + warp;
    num_rwarps = (num_recv_blocks ? num_recv_blocks : gridDim.x) * kWarps;
  }
};

__device__ __forceinline__ int CountAt(const int32_t* counts, int src, int column) {
  return __ldcg(counts + size_t(src) * kCountStride + column);
}

// Expert-layout tables every block derives from the counts all ranks published:
//   base[e]   row, on the rank of global expert e, of my first slot naming e: the padded start
//             of e's group there plus the rows of e from lower source ranks
//   start[j]  padded group offsets on this rank, j = 0..L (start[L] = rows incl. padding)
//   total[j]  rows of my local expert j from all sources
__device__ void ExpertTables(const CommArgs& c, const int32_t* counts, int num_local, int alignment,
                             int* base, int* start, int* total) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int num_ranks = c.num_ranks, num_experts = num_ranks * num_local;
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
    int before = 0;
    for (int q = 0; q < c.rank; ++q) before += CountAt(counts, q, kMaxRanks + e);
    base[e] = before;
  }
  __syncthreads();
  for (int d = warp; d < num_ranks; d += kWarps) {  // a warp scans rank d's groups
    int carry = 0;
    for (int j0 = 0; j0 < num_local; j0 += 32) {
      const int j = j0 + lane, e = d * num_local + j;
      int all = 0;
      if (j < num_local) {
        for (int q = 0; q < num_ranks; ++q) all += CountAt(counts, q, kMaxRanks + e);
      }
      const int padded = (all + alignment - 1) / alignment * alignment;
      int incl = padded;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int n = __shfl_up_sync(kFull, incl, o);
        if (lane >= o) incl += n;
      }
      if (j < num_local) {
        base[e] += carry + incl - padded;
        if (d == c.rank) start[j] = carry + incl - padded, total[j] = all;
      }
      carry += __shfl_sync(kFull, incl, 31);
    }
    if (d == c.rank && lane == 0) start[num_local] = carry;
  }
  __syncthreads();
}

// ------------------------------------------------------------------ dispatch

template <typename V>
__global__ void __launch_bounds__(kThreads, 1) DispatchKernel(CommArgs c, DispatchArgs a) {
  // Expert layout: base [E] | start [L + 1] | total [L]; token layout: rows per expert [L].
  extern __shared__ int smem[];
  __shared__ int s_kept, s_all;
  __shared__ int s_count[kMaxRanks], s_offset[kMaxRanks + 1], s_dst_offset[kMaxRanks];
  __shared__ uint64_t s_dst_ptr[kMaxRanks][kNumPtrs];
  const int lane = threadIdx.x % 32;
  const int num_ranks = c.num_ranks, rank = c.rank, num_topk = a.num_topk;
  const int num_local = a.num_local_experts, cap = a.recv_capacity, s_cap = a.send_capacity;
  const bool expert = a.expert_layout;
  const size_t row_bytes = a.x_row_bytes;
  // SM split (expert layout): senders push, receivers expand each row as it lands.
  const Roles roles(a.num_recv_blocks);
  const bool sender = roles.sender, receiver = roles.receiver;
  const int swarp = roles.swarp, num_swarps = roles.num_swarps;
  const int rwarp = roles.rwarp, num_rwarps = roles.num_rwarps;
  int* base = smem;
  int* start = smem + a.num_experts;
  int* total = start + num_local + 1;
  int* hist = smem;  // token layout: this block's count of stored rows per local expert
  if (!expert) {
    for (int j = threadIdx.x; j < num_local; j += blockDim.x) hist[j] = 0;
  }

  EntryBarrier(c, kOpDispatch);

  // Block 0 publishes my routing counts (tokens per rank, per expert) and output pointers to
  // every peer; everyone waits for all of them, then derives its offsets locally.
  if (blockIdx.x == 0) {
    const int row_len = num_ranks + a.num_experts;
    for (int q = threadIdx.x; q < num_ranks * row_len; q += blockDim.x) {
      const int d = q / row_len, j = q % row_len;
      int32_t* row = reinterpret_cast<int32_t*>(c.peer_ws[d] + kCountsOffset) +
                     size_t(rank) * kCountStride;
      if (j < num_ranks) {
        row[j] = a.tokens_per_rank[j];
      } else {
        row[kMaxRanks + j - num_ranks] = a.tokens_per_expert[j - num_ranks];
      }
    }
    if (threadIdx.x < num_ranks) {
      uint64_t* ptrs = reinterpret_cast<uint64_t*>(c.peer_ws[threadIdx.x] + kPtrOffset) +
                       rank * kNumPtrs;
      ptrs[0] = reinterpret_cast<uint64_t>(a.recv_x);
      ptrs[1] = reinterpret_cast<uint64_t>(a.recv_scales);
      ptrs[2] = reinterpret_cast<uint64_t>(a.recv_topk_idx);
      ptrs[3] = reinterpret_cast<uint64_t>(a.recv_topk_weights);
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
  // Thread q acquired only rank q's flag; the barrier extends every acquire to all threads.
  __syncthreads();
  const int32_t* counts = reinterpret_cast<const int32_t*>(c.peer_ws[rank] + kCountsOffset);
  if (threadIdx.x < num_ranks) {
    const int d = threadIdx.x;
    int before = 0;  // my first row on rank d (token layout)
    for (int q = 0; q < rank; ++q) before += CountAt(counts, q, d);
    s_dst_offset[d] = before;
    s_count[d] = CountAt(counts, d, rank);  // tokens rank d routes to me
    const auto* ptrs = reinterpret_cast<const unsigned long long*>(c.peer_ws[rank] + kPtrOffset);
    for (int q = 0; q < kNumPtrs; ++q) s_dst_ptr[d][q] = __ldcg(ptrs + d * kNumPtrs + q);
  }
  if (expert) ExpertTables(c, counts, num_local, a.expert_alignment, base, start, total);
  __syncthreads();
  if (threadIdx.x == 0) {
    int acc = 0;
    for (int s = 0; s < num_ranks; ++s) s_offset[s] = acc, acc += s_count[s];
    s_offset[num_ranks] = acc;
  }
  __syncthreads();
  const int num_rows_used = expert ? start[num_local] : s_offset[num_ranks];

  // Receivers first clear the rows no data will reach (token layout: the tail; expert layout:
  // group padding and the tail), while the data is in flight.
  if (receiver) {
    for (int row = rwarp; row < cap; row += num_rwarps) {
      bool empty = row >= num_rows_used;
      if (!empty && expert) {
        int lo = 0, hi = num_local - 1;  // last group starting at or before row
        while (lo < hi) {
          const int mid = (lo + hi + 1) / 2;
          if (start[mid] <= row) lo = mid; else hi = mid - 1;
        }
        empty = row >= start[lo] + total[lo];
      }
      if (!empty) continue;
      WarpZero<V>(a.recv_x + size_t(row) * row_bytes, row_bytes, lane);
      for (int q = lane; q < a.num_scales; q += 32) a.recv_scales[size_t(row) * a.num_scales + q] = 0.f;
      const int idx_width = expert ? 1 : num_topk;
      if (lane < idx_width) {
        a.recv_topk_idx[size_t(row) * idx_width + lane] = -1;
        a.recv_topk_weights[size_t(row) * idx_width + lane] = 0.f;
      }
      if (lane == 0) a.row_src[row] = -1;
    }
  }

  // Push: one warp per token; the row crosses NVLink once per destination rank, straight to
  // its final row there (expert layout: the row of its first expert on that rank). The row is
  // read once and stored to every destination.
  if (sender) {
    const DispatchSlot meta(num_topk);
    for (int t = swarp; t < a.num_tokens; t += num_swarps) {
      const int my_slot = lane < num_ranks ? a.send_pos[size_t(t) * num_ranks + lane] : -1;
      const unsigned dests = __ballot_sync(kFull, my_slot >= 0);
      const size_t tk = size_t(t) * num_topk + lane;
      int e = -1, pos = 0;
      float w = 0.f;
      if (lane < num_topk) {
        e = a.topk_idx[tk], w = a.topk_weights[tk];
        if (expert) pos = a.pos_in_src[tk];
      }
      int my_row = cap;  // lane d: where the row goes on rank d (cap: nowhere)
      for (unsigned m = dests; m; m &= m - 1) {  // destination rows and routing metadata
        const int d = __ffs(m) - 1;
        const int slot = __shfl_sync(kFull, my_slot, d);
        const int j = e - d * num_local;
        const bool local = lane < num_topk && j >= 0 && j < num_local;
        int row = cap;
        if (!expert) {
          row = min(s_dst_offset[d] + slot, cap);  // beyond capacity: dropped, counted there
          if (row < cap && lane < num_topk) {
            const size_t rk = size_t(row) * num_topk + lane;
            reinterpret_cast<int32_t*>(s_dst_ptr[d][2])[rk] = local ? j : -1;
            reinterpret_cast<float*>(s_dst_ptr[d][3])[rk] = local ? w : 0.f;
          }
        } else {
          const int row_k = local ? min(base[e] + pos, cap) : cap;
          const unsigned stored = __ballot_sync(kFull, row_k < cap);
          if (stored) row = __shfl_sync(kFull, row_k, __ffs(stored) - 1);
          uint8_t* dst = Slot(c, d, rank, slot);
          if (lane < num_topk) {
            reinterpret_cast<int32_t*>(dst + meta.idx_off)[lane] = e;
            reinterpret_cast<float*>(dst + meta.w_off)[lane] = w;
            reinterpret_cast<int32_t*>(dst + meta.pos_off)[lane] = pos;
          }
        }
        if (lane == d) my_row = row;
      }
      const unsigned copies = __ballot_sync(kFull, my_row < cap);
      auto dst_row = [&](int d, int q) {  // q: row bytes / scale index
        return size_t(__shfl_sync(kFull, my_row, d)) * q;
      };
      WarpCopyToRows<V, true>(
          copies,
          [&](int d) { return reinterpret_cast<uint8_t*>(s_dst_ptr[d][0]) + dst_row(d, int(row_bytes)); },
          a.x + size_t(t) * row_bytes, row_bytes, lane);
      if (a.num_scales) {
        WarpCopyToRows<int, true>(
            copies,
            [&](int d) {
              return reinterpret_cast<uint8_t*>(s_dst_ptr[d][1]) + dst_row(d, a.num_scales * 4);
            },
            reinterpret_cast<const uint8_t*>(a.scales + size_t(t) * a.num_scales),
            size_t(a.num_scales) * 4, lane);
      }
      if (expert) {
        __syncwarp();  // every lane's stores precede the releases (cumulativity)
        if (my_slot >= 0) StoreRelease(SlotFlag(c, lane, rank, my_slot), c.epoch);
      }
    }
    if (!expert) SignalSent(c);
  }

  if (receiver) {
    const DispatchSlot meta(num_topk);
    for (int step = 0; step < num_ranks; ++step) {
      const int s = (rank + step) % num_ranks;  // own slots first: they land earliest
      const int num_in = min(s_count[s], s_cap);
      if (!expert) {  // the rows already sit in recv_x: only the bookkeeping is left
        WaitSentFrom(c, kOpDispatch, s);
        for (int i = rwarp; i < s_cap; i += num_rwarps) {
          const size_t src_slot = size_t(s) * s_cap + i;
          const int row = s_offset[s] + i;
          const bool stored = i < num_in && row < cap;
          if (lane == 0) a.recv_rows[src_slot] = stored ? row : cap;
          if (!stored) continue;
          if (lane < num_topk) {
            const int j = __ldcg(a.recv_topk_idx + size_t(row) * num_topk + lane);
            if (j >= 0) atomicAdd(hist + j, 1);
          }
          if (lane == 0) a.row_src[row] = int(src_slot);
        }
        continue;
      }
      // Expert layout: as each slot lands, write its rows' metadata and copy its row from the
      // first expert row (where the sender put it) into the others; all copies are local.
      for (int i = rwarp; i < s_cap; i += num_rwarps) {
        const size_t src_slot = size_t(s) * s_cap + i;
        if (i >= num_in) {
          if (lane < num_topk) a.recv_rows[src_slot * num_topk + lane] = cap;
          continue;
        }
        if (lane == 0) WaitFlag(SlotFlag(c, rank, s, i), c, kOpDispatch, kPhaseSent, s);
        __syncwarp();
        const uint8_t* slot = Slot(c, rank, s, i);
        int row = cap;
        if (lane < num_topk) {
          const int e = LoadStaged<int32_t>(slot + meta.idx_off, lane);
          const int j = e - rank * num_local;
          if (j >= 0 && j < num_local) {
            int before = 0;  // rows of this expert from lower source ranks
            for (int q = 0; q < s; ++q) before += CountAt(counts, q, kMaxRanks + e);
            const int r = start[j] + before + LoadStaged<int32_t>(slot + meta.pos_off, lane);
            if (r < cap) {
              row = r;
              a.recv_topk_idx[row] = j;
              a.recv_topk_weights[row] = LoadStaged<float>(slot + meta.w_off, lane);
              a.row_src[row] = int(src_slot);
            }
          }
          a.recv_rows[src_slot * num_topk + lane] = row;
        }
        unsigned rows = __ballot_sync(kFull, row < cap);
        if (!rows) continue;
        const int first = __shfl_sync(kFull, row, __ffs(rows) - 1);
        rows &= rows - 1;  // the others
        WarpCopyToRows<V, false>(
            rows,
            [&](int k) { return a.recv_x + size_t(__shfl_sync(kFull, row, k)) * row_bytes; },
            a.recv_x + size_t(first) * row_bytes, row_bytes, lane);
        if (a.num_scales) {
          WarpCopyToRows<int, false>(
              rows,
              [&](int k) {
                return reinterpret_cast<uint8_t*>(a.recv_scales +
                                                  size_t(__shfl_sync(kFull, row, k)) * a.num_scales);
              },
              reinterpret_cast<const uint8_t*>(a.recv_scales + size_t(first) * a.num_scales),
              size_t(a.num_scales) * 4, lane);
        }
      }
    }
  }

  if (!expert) {  // one global atomic per (block, expert) instead of one per row
    __syncthreads();
    for (int j = threadIdx.x; j < num_local; j += blockDim.x) {
      if (hist[j]) atomicAdd(a.num_tokens_per_expert + j, hist[j]);
    }
  }
  if (blockIdx.x != 0) return;
  if (threadIdx.x == 0) s_kept = 0, s_all = 0;
  __syncthreads();
  if (!expert) {
    if (threadIdx.x == 0) s_all = num_rows_used, s_kept = min(num_rows_used, cap);
  } else {
    for (int j = threadIdx.x; j < num_local; j += blockDim.x) {
      const int room = max(cap - start[j], 0);
      const int kept = min(total[j], room);
      a.num_tokens_per_expert[j] = kept;
      a.group_sizes[j] = min(start[j + 1] - start[j], room);
      atomicAdd(&s_kept, kept);
      atomicAdd(&s_all, total[j]);
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

// kPack elements read past L1 (peers or this kernel wrote them, or they live on a peer).
template <typename E, int kPack>
__device__ __forceinline__ Pack<E, kPack> LoadStagedPack(const E* p) {
  Pack<E, kPack> pk;
  if constexpr (sizeof(pk) == 16) {
    const int4 raw = __ldcg(reinterpret_cast<const int4*>(p));
    memcpy(&pk, &raw, 16);
  } else {
#pragma unroll
    for (int u = 0; u < kPack; ++u) pk.v[u] = __ldcg(p + u);
  }
  return pk;
}

// acc += w * pk, element-wise in float32 (explicit roundings: the order is the contract).
template <typename E, int kPack>
__device__ __forceinline__ void Accumulate(float (&acc)[kPack], float w, const Pack<E, kPack>& pk) {
#pragma unroll
  for (int q = 0; q < kPack; ++q) acc[q] = __fadd_rn(acc[q], __fmul_rn(w, ToF32(pk.v[q])));
}

template <typename E, int kPack>
__device__ __forceinline__ void StoreF32(E* p, const float (&f)[kPack]) {
  Pack<E, kPack> pk;
#pragma unroll
  for (int u = 0; u < kPack; ++u) pk.v[u] = FromF32<E>(f[u]);
  *reinterpret_cast<Pack<E, kPack>*>(p) = pk;
}

// out[0, width) = sum over the set bits i of `from`, in increasing order, of
// weight_of(i) * row_of(i)[0, width), in float32 (kU packs in flight per lane; a weight of 1
// is exact). Rows are read past L1: peers or this kernel wrote them, or they live on a peer.
template <typename E, int kPack, bool kPairs, typename RowOf, typename WeightOf>
__device__ __forceinline__ void SumRows(unsigned from, RowOf row_of, WeightOf weight_of, int width,
                                        E* out, int lane) {
  constexpr int kU = 4;
  using P = Pack<E, kPack>;
  for (int e0 = 0; e0 < width; e0 += 32 * kPack * kU) {  // warp-uniform: row_of may shuffle
    float acc[kU][kPack];
#pragma unroll
    for (int u = 0; u < kU; ++u)
#pragma unroll
      for (int q = 0; q < kPack; ++q) acc[u][q] = 0.f;
    // kPairs: two terms at a time, both rows' loads in flight before either is added (in order);
    // it needs registers a kernel may not have to spare (ReturnKernel spilled and slowed down).
    for (unsigned m = from; m;) {
      const int i0 = __ffs(m) - 1;
      m &= m - 1;
      const bool two = kPairs && m != 0;
      const int i1 = two ? __ffs(m) - 1 : i0;
      if (two) m &= m - 1;
      const E* row0 = row_of(i0);
      const E* row1 = row_of(i1);
      const float w0 = weight_of(i0), w1 = weight_of(i1);
      P p0[kU], p1[kU];
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int e = e0 + (u * 32 + lane) * kPack;
        if (e < width) {
          p0[u] = LoadStagedPack<E, kPack>(row0 + e);
          if (two) p1[u] = LoadStagedPack<E, kPack>(row1 + e);
        }
      }
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        if (e0 + (u * 32 + lane) * kPack >= width) continue;
        Accumulate<E, kPack>(acc[u], w0, p0[u]);
        if (two) Accumulate<E, kPack>(acc[u], w1, p1[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int e = e0 + (u * 32 + lane) * kPack;
      if (e < width) StoreF32<E, kPack>(out + e, acc[u]);
    }
  }
}

// Token-layout combine (kReturnRows): every rank pulls its tokens' rows straight from the peers'
// y and sums them; no staging. Each rank publishes (y, first row of peer x's tokens in y) before
// the entry barrier, and an exit barrier keeps y alive until every peer has read it.
template <typename E, int kPack>
__global__ void __launch_bounds__(kThreads, 1) PullRowsKernel(CommArgs c, ReturnArgs a) {
  __shared__ const E* s_rows[kMaxRanks];
  __shared__ int s_first[kMaxRanks];
  const int lane = threadIdx.x % 32;
  const int gwarp = blockIdx.x * kWarps + threadIdx.x / 32, num_gwarps = gridDim.x * kWarps;
  const int num_ranks = c.num_ranks, rank = c.rank, width = a.width, cap = a.recv_capacity;
  const size_t parity = c.epoch & 1;  // a peer may publish for the next call while I read
  if (blockIdx.x == 0 && threadIdx.x < num_ranks) {  // published by the entry flag's thread
    const int x = threadIdx.x;
    int first = 0;
    for (int q = 0; q < x; ++q) first += a.recv_count[q];
    uint64_t* slot = reinterpret_cast<uint64_t*>(c.peer_ws[x] + kPullOffset) +
                     (parity * kMaxRanks + rank) * 2;
    slot[0] = reinterpret_cast<uint64_t>(a.y);
    slot[1] = uint64_t(first);
  }
  EntryBarrier(c, kOpCombine);
  if (threadIdx.x < num_ranks) {
    const auto* slot = reinterpret_cast<const unsigned long long*>(c.peer_ws[rank] + kPullOffset) +
                       (parity * kMaxRanks + threadIdx.x) * 2;
    s_rows[threadIdx.x] = reinterpret_cast<const E*>(__ldcg(slot));
    s_first[threadIdx.x] = int(__ldcg(slot + 1));
  }
  __syncthreads();

  for (int t = gwarp; t < a.num_tokens; t += num_gwarps) {
    const int my_slot = lane < num_ranks ? a.send_pos[size_t(t) * num_ranks + lane] : -1;
    const int my_row = my_slot >= 0 ? s_first[lane] + my_slot : cap;  // >= cap: dropped there
    const unsigned from = __ballot_sync(kFull, my_row < cap);
    SumRows<E, kPack, true>(
        from,
        [&](int d) { return s_rows[d] + size_t(__shfl_sync(kFull, my_row, d)) * width; },
        [](int) { return 1.f; }, width, static_cast<E*>(a.out) + size_t(t) * width, lane);
  }

  // Exit barrier: this block is done reading; wait until the peers' same block is too.
  __syncthreads();
  if (threadIdx.x < num_ranks) {
    StoreRelease(PeerFlag(c, threadIdx.x, kDoneOffset, size_t(rank) * kMaxBlocks + blockIdx.x),
                 c.epoch);
    WaitFlag(PeerFlag(c, rank, kDoneOffset, size_t(threadIdx.x) * kMaxBlocks + blockIdx.x), c,
             kOpCombine, kPhaseDone, threadIdx.x);
  }
}

// Expert-layout combine family (kReturnWeighted, kReturnGatherK): every block first pushes one
// value per received slot into the source's staging and raises the slot's arrival flag, then
// sums its tokens' values over ranks as soon as they have landed (no grid-wide wait). The push
// (the weighted sums) is the heavy half, so no SM is kept from it: an SM split measured slower
// (EP2: 461-530 us against 417 us without one).
template <typename E, int kPack>
__global__ void __launch_bounds__(kThreads, 1) ReturnKernel(CommArgs c, ReturnArgs a) {
  const int lane = threadIdx.x % 32;
  const int num_ranks = c.num_ranks, rank = c.rank, num_topk = a.num_topk;
  const int cap = a.recv_capacity, s_cap = a.send_capacity, width = a.width;
  const E* y = static_cast<const E*>(a.y);
  const Roles roles(0);

  EntryBarrier(c, kOpCombine);

  if (roles.sender) {
    for (int s = 0; s < num_ranks; ++s) {
      const int num_in = min(a.recv_count[s], s_cap);
      for (int i = roles.swarp; i < num_in; i += roles.num_swarps) {
        const size_t src_slot = size_t(s) * s_cap + i;
        uint8_t* dst = Slot(c, s, rank, i);
        const int my_row = lane < num_topk ? a.recv_rows[src_slot * num_topk + lane] : cap;
        if (a.mode == kReturnGatherK) {
          if (lane < num_topk) {
            reinterpret_cast<float*>(dst)[lane] =
                my_row < cap ? reinterpret_cast<const float*>(a.y)[my_row] : 0.f;
          }
        } else {
          const float my_w = a.row_weights != nullptr && my_row < cap ? a.row_weights[my_row] : 1.f;
          SumRows<E, kPack, false>(
              __ballot_sync(kFull, my_row < cap),
              [&](int k) { return y + size_t(__shfl_sync(kFull, my_row, k)) * width; },
              [&](int k) { return __shfl_sync(kFull, my_w, k); }, width, reinterpret_cast<E*>(dst),
              lane);
        }
        __syncwarp();  // the lanes' stores precede lane 0's release (cumulativity)
        if (lane == 0) StoreRelease(SlotFlag(c, s, rank, i), c.epoch);
      }
    }
  }
  if (!roles.receiver) return;

  // out[t] = sum over ranks d (in order) of the value d returned, float32.
  for (int t = roles.rwarp; t < a.num_tokens; t += roles.num_rwarps) {
    const int my_slot = lane < num_ranks ? a.send_pos[size_t(t) * num_ranks + lane] : -1;
    const unsigned from = __ballot_sync(kFull, my_slot >= 0);
    if (my_slot >= 0) WaitFlag(SlotFlag(c, rank, lane, my_slot), c, kOpCombine, kPhaseSent, lane);
    __syncwarp();
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
    SumRows<E, kPack, false>(
        from,
        [&](int d) {
          return reinterpret_cast<const E*>(Slot(c, rank, d, __shfl_sync(kFull, my_slot, d)));
        },
        [](int) { return 1.f; }, width, static_cast<E*>(a.out) + size_t(t) * width, lane);
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
  // Chunks of 2 KiB per warp (4 16-byte loads in flight per lane), interleaved over the
  // destinations so every link stays busy (benchmarks/nvlink_probe.cu measured the variants).
  constexpr int kChunk = 2048;
  const size_t chunks = a.block_bytes / kChunk, tail = a.block_bytes % kChunk;
  const int gwarp = blockIdx.x * kWarps + threadIdx.x / 32, num_gwarps = gridDim.x * kWarps;
  const int lane = threadIdx.x % 32;
  // Only the destinations actually copied take turns (skipping one inside the loop would idle
  // every warp whose index has its parity).
  const int num_dst = a.include_self ? c.num_ranks : c.num_ranks - 1;
  for (size_t q = gwarp; q < chunks * num_dst; q += num_gwarps) {
    const int d = a.include_self ? int(q % num_dst) : (c.rank + 1 + int(q % num_dst)) % c.num_ranks;
    const size_t off = (q / num_dst) * kChunk + lane * 16;
    const int4* src = reinterpret_cast<const int4*>(a.src + d * a.block_bytes + off);
    int4* dst = reinterpret_cast<int4*>(Slot(c, d, c.rank, 0) + off);
    int4 v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) v[u] = __ldg(src + u * 32);
#pragma unroll
    for (int u = 0; u < 4; ++u) dst[u * 32] = v[u];
  }
  if (tail && gwarp < c.num_ranks && (gwarp != c.rank || a.include_self)) {
    const size_t base = chunks * kChunk;
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
  const size_t smem = sizeof(int) * (a.expert_layout ? a.num_experts + 2 * a.num_local_experts + 1
                                                     : a.num_local_experts);
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
  auto kernel = a.mode == kReturnRows ? (vec ? PullRowsKernel<E, kPack> : PullRowsKernel<E, 1>)
                                      : (vec ? ReturnKernel<E, kPack> : ReturnKernel<E, 1>);
  kernel<<<c.num_blocks, kThreads, 0, stream>>>(c, a);
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
  touch(PullRowsKernel<float, 4>), touch(PullRowsKernel<float, 1>);
  touch(PullRowsKernel<__nv_bfloat16, 8>), touch(PullRowsKernel<__nv_bfloat16, 1>);
  touch(PullRowsKernel<__half, 8>), touch(PullRowsKernel<__half, 1>);
  touch(SlotRanksKernel);
  return err;
}

size_t DispatchSlotBytes(int num_topk) {
  return DispatchSlot::bytes(num_topk);
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
