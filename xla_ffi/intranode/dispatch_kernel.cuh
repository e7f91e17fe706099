// The dispatch kernel of both families: intranode (one node; direct or staged) and, through the
// transport policy `Net`, internode (several nodes; staged, with the network leg). Included by
// intranode/dispatch.cu (DirectNet) and internode/internode.cu (NvshmemNet). Plain CUDA.
// See intranode.h for how the single-node kernel moves data and internode.h for the nodes.
#pragma once

#include "../common/nodes.cuh"
#include "intranode.h"

namespace jax_ep {
namespace dispatch_kernel {

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
    for (int q = 0; q < c.rank; ++q) before += CountAt(counts, q, kCountExperts + e);
    base[e] = before;
  }
  __syncthreads();
  for (int d = warp; d < num_ranks; d += kWarps) {  // a warp scans rank d's groups
    int carry = 0;
    for (int j0 = 0; j0 < num_local; j0 += 32) {
      const int j = j0 + lane, e = d * num_local + j;
      int all = 0;
      if (j < num_local) {
        for (int q = 0; q < num_ranks; ++q) all += CountAt(counts, q, kCountExperts + e);
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


// Forwarder side of the internode dispatch (sender warps, after their pushes): every message a
// rank with my local index on another node sent me lands in my receive slots; as each one's
// signal arrives, copy its staged slot into the staging of every rank of my node it goes to
// (the slots it carries) and raise their arrival flags, as a sender of my node would. The
// message's forward slots are kept (fwd_slots) for the combine and the broadcast.
template <typename Net>
__device__ void ForwardMessages(const CommArgs& c, const NodeComm& n, const DispatchArgs& a,
                                const DispatchSlot& meta, int warp, int num_warps) {
  const int lane = threadIdx.x % 32, per_node = n.ranks_per_node, num_nodes = n.num_nodes;
  const int my_node = c.rank / per_node, local = c.rank % per_node, num_tokens = a.num_tokens;
  const int32_t* counts = reinterpret_cast<const int32_t*>(c.peer_ws[c.rank] + kCountsOffset);
  // Slot-major across source nodes: the order the senders produce messages in.
  for (int w = warp; w < num_nodes * num_tokens; w += num_warps) {
    const int q = w / num_nodes, node = w % num_nodes, src = node * per_node + local;
    int32_t* fwd_out = a.fwd_slots + (size_t(node) * num_tokens + q) * per_node;
    const int count = node == my_node ? 0 : CountAt(counts, src, kCountNodes + my_node);
    if (q >= count) {
      if (lane < per_node) fwd_out[lane] = -1;
      continue;
    }
    if (lane == 0) {
      Net::WaitMessage(MessageSignal(c, n, node, q), c, n, kOpDispatch, src);
    }
    __syncwarp();
    const uint8_t* msg = RecvMessage(c, n, node, q);
    const int slot = lane < per_node ? LoadStaged<int32_t>(msg + meta.bytes, lane) : -1;
    if (lane < per_node) fwd_out[lane] = slot;
    ForwardToNode<int4>(c, n, src, slot, msg, meta.bytes, lane);
  }
}

// ------------------------------------------------------------------ dispatch

// kExpert: the layout (token | expert). kStaged: rows travel through the receivers' staging
// slots (peers in other processes), else straight into the receivers' outputs. Net: DirectNet
// (one node), or the internode policy (net.cuh there; always staged): a token crosses the
// network once per other node it goes to, as a message to the rank of that node with this
// rank's local index, which forwards it into the staging slots of its node's ranks (see
// ForwardMessages); the receive side is the same as in one node.
template <typename V, bool kExpert, bool kStaged, typename Net>
__global__ void __launch_bounds__(kThreads, 1) DispatchKernel(CommArgs c, DispatchArgs a,
                                                              typename Net::Nodes nodes) {
  // Peers of other nodes cannot address my outputs (nor I theirs): several nodes are staged.
  static_assert(kStaged || !Net::kInternode, "the internode dispatch is staged");
  // Expert layout: base [E] | start [L + 1] | total [L]; token layout: rows per expert [L].
  extern __shared__ int smem[];
  __shared__ int s_kept, s_all;
  __shared__ int s_count[kMaxRanks], s_offset[kMaxRanks + 1], s_dst_offset[kMaxRanks];
  __shared__ uint64_t s_dst_ptr[kMaxRanks][kNumPtrs];
  const int lane = threadIdx.x % 32;
  const int num_ranks = c.num_ranks, rank = c.rank, num_topk = a.num_topk;
  const int num_local = a.num_local_experts, cap = a.recv_capacity, s_cap = a.send_capacity;
  constexpr bool expert = kExpert;
  // Per-slot arrival flags: the expert layout and every staged dispatch; else per-block flags.
  constexpr bool slot_flags = kExpert || kStaged;
  const size_t row_bytes = a.x_row_bytes;
  const DispatchSlot meta(num_topk, row_bytes, a.num_scales, kStaged);
  // SM split (slot flags): senders push, receivers lay each row out as it lands.
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

  Net::EntryBarrier(c, nodes, kOpDispatch);

  // Block 0 publishes my routing counts (tokens per rank, per expert) and, direct only, my output
  // pointers to every peer; everyone waits for all of them, then derives its offsets locally.
  // Several nodes: stores to the peers of my node (my own row included: it is the source of
  // the puts), then one put of that row to each peer of the other nodes.
  if (blockIdx.x == 0) {
    const int row_len = num_ranks + a.num_experts;
    for (int q = threadIdx.x; q < num_ranks * row_len; q += blockDim.x) {
      const int d = q / row_len, j = q % row_len;
      if (!Net::Near(nodes, rank, d)) continue;
      int32_t* row = reinterpret_cast<int32_t*>(c.peer_ws[d] + kCountsOffset) +
                     size_t(rank) * kCountStride;
      if (j < num_ranks) {
        row[j] = a.tokens_per_rank[j];
      } else {
        row[kCountExperts + j - num_ranks] = a.tokens_per_expert[j - num_ranks];
      }
    }
    if (!kStaged && threadIdx.x < num_ranks) {
      uint64_t* ptrs = reinterpret_cast<uint64_t*>(c.peer_ws[threadIdx.x] + kPtrOffset) +
                       rank * kNumPtrs;
      ptrs[0] = reinterpret_cast<uint64_t>(a.recv_x);
      ptrs[1] = reinterpret_cast<uint64_t>(a.recv_scales);
      ptrs[2] = reinterpret_cast<uint64_t>(a.recv_topk_idx);
      ptrs[3] = reinterpret_cast<uint64_t>(a.recv_topk_weights);
    }
    if constexpr (Net::kInternode) {  // tokens per node, for the forwarders
      for (int q = threadIdx.x; q < num_ranks * nodes.num_nodes; q += blockDim.x) {
        const int d = q / nodes.num_nodes, m = q % nodes.num_nodes;
        if (!Net::Near(nodes, rank, d)) continue;
        reinterpret_cast<int32_t*>(c.peer_ws[d] + kCountsOffset)[size_t(rank) * kCountStride +
                                                                 kCountNodes + m] =
            a.tokens_per_node[m];
      }
    }
    __syncthreads();
    if (threadIdx.x < num_ranks && Net::Near(nodes, rank, threadIdx.x)) {
      __threadfence_system();
      StoreRelease(PeerFlag(c, threadIdx.x, kCountsFlagOffset, rank), c.epoch);
    }
    if constexpr (Net::kInternode) {
      Net::PutCounts(c, nodes, size_t(kCountExperts + a.num_experts) * sizeof(int32_t));
    }
  }
  if (threadIdx.x < num_ranks) {
    Net::Wait(PeerFlag(c, rank, kCountsFlagOffset, threadIdx.x), c, nodes, kOpDispatch,
              kPhaseCounts, threadIdx.x);
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
    if (!kStaged) {
      const auto* ptrs = reinterpret_cast<const unsigned long long*>(c.peer_ws[rank] + kPtrOffset);
      for (int q = 0; q < kNumPtrs; ++q) s_dst_ptr[d][q] = __ldcg(ptrs + d * kNumPtrs + q);
    }
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

  // Push: one warp per token; the row crosses the link once per destination rank: direct,
  // straight to its final row there (expert layout: the row of its first expert on that rank);
  // staged, into its staging slot there. The row is read once and stored to every destination.
  // Several nodes: the ranks of my node as above; each other node gets one message (the staged
  // slot + the slots at its ranks) through my send slot, put to the rank with my local index.
  if (sender) {
    for (int t = swarp; t < a.num_tokens; t += num_swarps) {
      const int my_slot = lane < num_ranks ? a.send_pos[size_t(t) * num_ranks + lane] : -1;
      const bool near = Net::Near(nodes, rank, lane);
      const int near_slot = near ? my_slot : -1;
      const unsigned dests = __ballot_sync(kFull, near_slot >= 0);
      const size_t tk = size_t(t) * num_topk + lane;
      int e = -1, pos = 0;
      float w = 0.f;
      if (lane < num_topk) {
        e = a.topk_idx[tk], w = a.topk_weights[tk];
        if (expert) pos = a.pos_in_src[tk];
      }
      // Lane d: where the row goes on rank d (cap: nowhere; the row would be dropped there).
      int my_row = cap;
      for (unsigned m = dests; m; m &= m - 1) {  // destination rows and routing metadata
        const int d = __ffs(m) - 1;
        const int slot = __shfl_sync(kFull, my_slot, d);
        const int j = e - d * num_local;
        const bool local = lane < num_topk && j >= 0 && j < num_local;
        int row = cap;
        if (!expert) {
          row = min(s_dst_offset[d] + slot, cap);  // beyond capacity: dropped, counted there
          if (!kStaged && row < cap && lane < num_topk) {
            const size_t rk = size_t(row) * num_topk + lane;
            reinterpret_cast<int32_t*>(s_dst_ptr[d][2])[rk] = local ? j : -1;
            reinterpret_cast<float*>(s_dst_ptr[d][3])[rk] = local ? w : 0.f;
          }
        } else {
          const int row_k = local ? min(base[e] + pos, cap) : cap;
          const unsigned stored = __ballot_sync(kFull, row_k < cap);
          if (stored) row = __shfl_sync(kFull, row_k, __ffs(stored) - 1);
        }
        if (slot_flags && lane < num_topk) {
          uint8_t* dst = Slot(c, d, rank, slot);
          reinterpret_cast<int32_t*>(dst + meta.idx_off)[lane] = e;
          reinterpret_cast<float*>(dst + meta.w_off)[lane] = w;
          reinterpret_cast<int32_t*>(dst + meta.pos_off)[lane] = pos;
        }
        if (lane == d) my_row = row;
      }
      // Lane f: the message slot to rank f, the forwarder of node f / G (-1: none).
      int my_msg = -1;
      unsigned far = 0;
      if constexpr (Net::kInternode) {
        const int per_node = nodes.ranks_per_node;
        if (lane < num_ranks && !near && lane % per_node == rank % per_node) {
          my_msg = a.node_pos[size_t(t) * nodes.num_nodes + lane / per_node];
        }
        far = __ballot_sync(kFull, my_msg >= 0);
        for (unsigned m = far; m; m &= m - 1) {  // metadata and forward slots of each message
          const int f = __ffs(m) - 1;
          uint8_t* msg = SendMessage(c, nodes, f / per_node, __shfl_sync(kFull, my_msg, f));
          const int fwd = __shfl_sync(kFull, my_slot, min(f - f % per_node + lane, 31));
          if (lane < num_topk) {
            reinterpret_cast<int32_t*>(msg + meta.idx_off)[lane] = e;
            reinterpret_cast<float*>(msg + meta.w_off)[lane] = w;
            reinterpret_cast<int32_t*>(msg + meta.pos_off)[lane] = pos;
          }
          if (lane < per_node) reinterpret_cast<int32_t*>(msg + meta.bytes)[lane] = fwd;
        }
      }
      const unsigned copies = __ballot_sync(kFull, my_row < cap) | far;
      auto row_dst = [&](int d, int ptr, size_t off, size_t row_stride) -> uint8_t* {
        if constexpr (Net::kInternode) {
          if ((far >> d) & 1) {
            return SendMessage(c, nodes, d / nodes.ranks_per_node,
                               __shfl_sync(kFull, my_msg, d)) + off;
          }
        }
        if (kStaged) return Slot(c, d, rank, __shfl_sync(kFull, my_slot, d)) + off;
        return reinterpret_cast<uint8_t*>(s_dst_ptr[d][ptr]) +
               size_t(__shfl_sync(kFull, my_row, d)) * row_stride;
      };
      if (copies) {
        WarpCopyToRows<V, true>(
            copies, [&](int d) { return row_dst(d, 0, meta.row_off, row_bytes); },
            a.x + size_t(t) * row_bytes, row_bytes, lane);
        if (a.num_scales) {
          const size_t scale_bytes = size_t(a.num_scales) * 4;
          WarpCopyToRows<int, true>(
              copies, [&](int d) { return row_dst(d, 1, meta.scales_off, scale_bytes); },
              reinterpret_cast<const uint8_t*>(a.scales + size_t(t) * a.num_scales), scale_bytes,
              lane);
        }
      }
      if (slot_flags) {
        __syncwarp();  // every lane's stores precede the releases (cumulativity)
        if (near_slot >= 0) StoreRelease(SlotFlag(c, lane, rank, near_slot), c.epoch);
      }
      if constexpr (Net::kInternode) {
        const int my_node = rank / nodes.ranks_per_node;
        for (unsigned m = far; m; m &= m - 1) {
          const int f = __ffs(m) - 1;
          const int q = __shfl_sync(kFull, my_msg, f);
          Net::PutMessage(c, nodes, f, SendMessage(c, nodes, f / nodes.ranks_per_node, q),
                          RecvMessage(c, nodes, my_node, q), MessageSignal(c, nodes, my_node, q),
                          meta.message_bytes(nodes.ranks_per_node));
        }
      }
    }
    if (!slot_flags) SignalSent(c);
    if constexpr (Net::kInternode) {
      ForwardMessages<Net>(c, nodes, a, meta, swarp, num_swarps);
      Net::Quiet();  // my puts are complete before my send slots are reused
    }
  }

  if (receiver && !expert && !kStaged) {  // the rows already sit in recv_x: only bookkeeping
    for (int step = 0; step < num_ranks; ++step) {
      const int s = (rank + step) % num_ranks;  // own slots first: they land earliest
      const int num_in = min(s_count[s], s_cap);
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
    }
  }

  // Staged token layout: as each slot lands, copy it to its row (source s's i-th token lands at
  // s_offset[s] + i). Slot-major across sources, the order the senders produce them in.
  if (receiver && !expert && kStaged) {
    for (int q = rwarp; q < num_ranks * s_cap; q += num_rwarps) {
      const int i = q / num_ranks, s = (rank + q % num_ranks) % num_ranks;
      const size_t src_slot = size_t(s) * s_cap + i;
      const int row = s_offset[s] + i;
      const bool stored = i < min(s_count[s], s_cap) && row < cap;
      if (lane == 0) a.recv_rows[src_slot] = stored ? row : cap;
      if (!stored) continue;  // nothing to read: the slot is not waited for
      if (lane == 0) WaitFlag(SlotFlag(c, rank, s, i), c, kOpDispatch, kPhaseSent, s);
      __syncwarp();
      const uint8_t* slot = Slot(c, rank, s, i);
      if (lane < num_topk) {
        const int j = LoadStaged<int32_t>(slot + meta.idx_off, lane) - rank * num_local;
        const bool local = j >= 0 && j < num_local;
        const size_t rk = size_t(row) * num_topk + lane;
        a.recv_topk_idx[rk] = local ? j : -1;
        a.recv_topk_weights[rk] = local ? LoadStaged<float>(slot + meta.w_off, lane) : 0.f;
        if (local) atomicAdd(hist + j, 1);
      }
      if (lane == 0) a.row_src[row] = int(src_slot);
      WarpCopy<V, false>(a.recv_x + size_t(row) * row_bytes, slot + meta.row_off, row_bytes, lane);
      if (a.num_scales) {
        WarpCopy<int, false>(reinterpret_cast<uint8_t*>(a.recv_scales + size_t(row) * a.num_scales),
                             slot + meta.scales_off, size_t(a.num_scales) * 4, lane);
      }
    }
  }

  // Expert layout: as each slot lands, write its rows' metadata and copy its row into its expert
  // rows (direct: from the first one, where the sender put it; staged: from the slot); all copies
  // are local. Slots are taken slot-major across sources, the order every sender produces them
  // in: source-major order left the remote half of the expansion until after the senders had
  // finished.
  if (receiver && expert) {
    for (int q = rwarp; q < num_ranks * s_cap; q += num_rwarps) {
      const int i = q / num_ranks, s = (rank + q % num_ranks) % num_ranks;
      const size_t src_slot = size_t(s) * s_cap + i;
      if (i >= min(s_count[s], s_cap)) {
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
          for (int p = 0; p < s; ++p) before += CountAt(counts, p, kCountExperts + e);
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
      if (!kStaged) rows &= rows - 1;  // the first row already holds the data
      if (!rows) continue;
      const uint8_t* src_row = kStaged ? slot + meta.row_off : a.recv_x + size_t(first) * row_bytes;
      WarpCopyToRows<V, false>(
          rows,
          [&](int k) { return a.recv_x + size_t(__shfl_sync(kFull, row, k)) * row_bytes; },
          src_row, row_bytes, lane);
      if (a.num_scales) {
        const uint8_t* src_scales =
            kStaged ? slot + meta.scales_off
                    : reinterpret_cast<const uint8_t*>(a.recv_scales + size_t(first) * a.num_scales);
        WarpCopyToRows<int, false>(
            rows,
            [&](int k) {
              return reinterpret_cast<uint8_t*>(a.recv_scales +
                                                size_t(__shfl_sync(kFull, row, k)) * a.num_scales);
            },
            src_scales, size_t(a.num_scales) * 4, lane);
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
  if constexpr (Net::kInternode) {  // messages I forwarded from each node
    const int per_node = nodes.ranks_per_node, my_node = rank / per_node;
    if (threadIdx.x < nodes.num_nodes) {
      const int m = threadIdx.x, src = m * per_node + rank % per_node;
      a.node_recv_count[m] = m == my_node ? 0 : CountAt(counts, src, kCountNodes + my_node);
    }
  }
}

}  // namespace dispatch_kernel
}  // namespace jax_ep
