// The push combine kernel of both families: intranode (one node, staged or expert layout) and,
// through the transport policy `Net`, internode: each rank's value for a token of another node
// goes to the rank of its own node with that token's local index, which sums its node's values
// and puts one partial per (token, node) over the network to the source; the source sums the
// node partials in node order (docs/api.md). Included by intranode/combine.cu (DirectNet) and
// internode/internode.cu (NvshmemNet). Plain CUDA.
#pragma once

#include "../common/nodes.cuh"
#include "intranode.h"

namespace jax_ep {
namespace return_kernel {

// Internode combine, forwarder side: for each message this rank forwarded at dispatch (from
// node n, the q-th), the ranks of my node that received its token have returned one value each
// into my staging (index n * G + j, at the slot the token took at rank j). Sum them in rank
// order (float32), round to the value type (the node partial crosses the network in it) and put
// it to the token's source, into its message slot q of my node.
template <typename E, int kPack, typename Net>
__device__ void ReduceAndForward(const CommArgs& c, const NodeComm& n, const ReturnArgs& a,
                                 int warp, int num_warps) {
  const int lane = threadIdx.x % 32, per_node = n.ranks_per_node, num_nodes = n.num_nodes;
  const int my_node = c.rank / per_node, local = c.rank % per_node, num_tokens = a.num_tokens;
  int max_count = 0;
  for (int m = 0; m < num_nodes; ++m) max_count = max(max_count, a.node_recv_count[m]);
  for (int w = warp; w < num_nodes * max_count; w += num_warps) {  // slot-major across nodes
    const int q = w / num_nodes, node = w % num_nodes;
    if (node == my_node || q >= a.node_recv_count[node]) continue;
    const int slot = lane < per_node
                         ? a.fwd_slots[(size_t(node) * num_tokens + q) * per_node + lane] : -1;
    const unsigned from = __ballot_sync(kFull, slot >= 0);
    const int index = node * per_node + lane;  // staging index of rank j = lane's value
    if (slot >= 0) {
      WaitFlag(SlotFlag(c, c.rank, index, slot), c, kOpCombine, kPhaseSent,
               my_node * per_node + lane);
    }
    __syncwarp();
    uint8_t* msg = SendMessage(c, n, node, q);
    if (a.mode == kReturnGatherK) {
      float acc = 0.f;
      for (unsigned m = from; m; m &= m - 1) {
        const int j = __ffs(m) - 1;
        const int sj = __shfl_sync(kFull, slot, j);
        if (lane < a.num_topk) acc = __fadd_rn(acc, LoadStaged<float>(Slot(c, c.rank, node * per_node + j, sj), lane));
      }
      if (lane < a.num_topk) reinterpret_cast<float*>(msg)[lane] = acc;
    } else {
      SumRows<E, kPack, false>(
          from,
          [&](int j) {
            return reinterpret_cast<const E*>(
                Slot(c, c.rank, node * per_node + j, __shfl_sync(kFull, slot, j)));
          },
          [](int) { return 1.f; }, a.width, reinterpret_cast<E*>(msg), lane);
    }
    __syncwarp();  // every lane's stores precede the put
    Net::PutMessage(c, n, node * per_node + local, msg, RecvMessage(c, n, my_node, q),
                    MessageSignal(c, n, my_node, q), n.message_stride);
  }
}

// out[0, width) = sum over nodes m (in order) of node partial P_m, float32, where P_m is
// far_row(m) (a partial another node sent, already rounded) for the set bits of `far`, and for
// my node the float32 sum of near_row(j) over the set bits j of `near`, rounded to E.
template <typename E, int kPack, typename NearRow, typename FarRow>
__device__ __forceinline__ void SumNodeRows(int my_node, int num_nodes, unsigned near,
                                            NearRow near_row, unsigned far, FarRow far_row,
                                            int width, E* out, int lane) {
  constexpr int kU = 4;
  using P = Pack<E, kPack>;
  for (int e0 = 0; e0 < width; e0 += 32 * kPack * kU) {  // warp-uniform: the rows may shuffle
    float acc[kU][kPack];
#pragma unroll
    for (int u = 0; u < kU; ++u)
#pragma unroll
      for (int q = 0; q < kPack; ++q) acc[u][q] = 0.f;
    for (int m = 0; m < num_nodes; ++m) {
      if (m == my_node && near) {
        float part[kU][kPack];
#pragma unroll
        for (int u = 0; u < kU; ++u)
#pragma unroll
          for (int q = 0; q < kPack; ++q) part[u][q] = 0.f;
        for (unsigned b = near; b; b &= b - 1) {
          const E* row = near_row(__ffs(b) - 1);
#pragma unroll
          for (int u = 0; u < kU; ++u) {
            const int e = e0 + (u * 32 + lane) * kPack;
            if (e < width) Accumulate<E, kPack>(part[u], 1.f, LoadStagedPack<E, kPack>(row + e));
          }
        }
#pragma unroll
        for (int u = 0; u < kU; ++u)
#pragma unroll
          for (int q = 0; q < kPack; ++q) {
            acc[u][q] = __fadd_rn(acc[u][q], ToF32(FromF32<E>(part[u][q])));
          }
      } else if ((far >> m) & 1) {
        const E* row = far_row(m);
#pragma unroll
        for (int u = 0; u < kU; ++u) {
          const int e = e0 + (u * 32 + lane) * kPack;
          if (e < width) Accumulate<E, kPack>(acc[u], 1.f, LoadStagedPack<E, kPack>(row + e));
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int e = e0 + (u * 32 + lane) * kPack;
      if (e < width) StoreF32<E, kPack>(out + e, acc[u]);
    }
  }
}

// Internode combine, source side: out[t] = the node partials of token t summed in node order
// (float32): my node's from the values its ranks pushed into my staging, every other node's
// from the message its forwarder put into my slot node_pos[t, m].
template <typename E, int kPack, typename Net>
__device__ void SumNodes(const CommArgs& c, const NodeComm& n, const ReturnArgs& a, int warp,
                         int num_warps) {
  const int lane = threadIdx.x % 32, per_node = n.ranks_per_node, num_nodes = n.num_nodes;
  const int num_ranks = c.num_ranks, my_node = c.rank / per_node, local = c.rank % per_node;
  for (int t = warp; t < a.num_tokens; t += num_warps) {
    const int my_slot = lane < num_ranks ? a.send_pos[size_t(t) * num_ranks + lane] : -1;
    const int near_slot = lane / per_node == my_node ? my_slot : -1;
    const int my_msg = lane < num_nodes && lane != my_node ? a.node_pos[size_t(t) * num_nodes + lane] : -1;
    const unsigned near = __ballot_sync(kFull, near_slot >= 0);
    const unsigned far = __ballot_sync(kFull, my_msg >= 0);
    if (near_slot >= 0) WaitFlag(SlotFlag(c, c.rank, lane, near_slot), c, kOpCombine, kPhaseSent, lane);
    if (my_msg >= 0) {
      Net::WaitMessage(MessageSignal(c, n, lane, my_msg), c, n, kOpCombine,
                       lane * per_node + local);
    }
    __syncwarp();
    auto near_row = [&](int d) {
      return reinterpret_cast<const E*>(Slot(c, c.rank, d, __shfl_sync(kFull, my_slot, d)));
    };
    auto far_row = [&](int m) {
      return reinterpret_cast<const E*>(RecvMessage(c, n, m, __shfl_sync(kFull, my_msg, m)));
    };
    if (a.mode == kReturnGatherK) {  // K floats per slot, one lane each
      float acc = 0.f;
      for (int m = 0; m < num_nodes; ++m) {
        if (m == my_node) {
          float part = 0.f;
          for (unsigned b = near; b; b &= b - 1) {
            const float* row = reinterpret_cast<const float*>(near_row(__ffs(b) - 1));
            if (lane < a.num_topk) part = __fadd_rn(part, __ldcg(row + lane));
          }
          acc = __fadd_rn(acc, part);
        } else if ((far >> m) & 1) {
          const float* row = reinterpret_cast<const float*>(far_row(m));
          if (lane < a.num_topk) acc = __fadd_rn(acc, __ldcg(row + lane));
        }
      }
      if (lane < a.num_topk) static_cast<float*>(a.out)[size_t(t) * a.num_topk + lane] = acc;
      continue;
    }
    SumNodeRows<E, kPack>(my_node, num_nodes, near, near_row, far, far_row, a.width,
                          static_cast<E*>(a.out) + size_t(t) * a.width, lane);
  }
}

// Push combine family (kReturnWeighted, kReturnGatherK; kReturnRows when staged, with K = 1: the
// row of each slot is recv_rows [R, S]): every block first pushes one
// value per received slot into the source's staging and raises the slot's arrival flag, then
// sums its tokens' values over ranks as soon as they have landed (no grid-wide wait). The push
// (the weighted sums) is the heavy half and latency-bound per warp, so every warp does it.
// Measured slower on EP2 (DeepEP config, this version 266 us): an SM split (461-530 us against
// 417 us, older version); computing the own-rank value in the receive phase straight into out,
// which saves its staging round trip (325 us), also with an SM split (285-369 us).
template <typename E, int kPack, typename Net>
__global__ void __launch_bounds__(kThreads, 1) ReturnKernel(CommArgs c, ReturnArgs a,
                                                            typename Net::Nodes nodes) {
  const int lane = threadIdx.x % 32;
  const int num_ranks = c.num_ranks, rank = c.rank, num_topk = a.num_topk;
  const int cap = a.recv_capacity, s_cap = a.send_capacity, width = a.width;
  const E* y = static_cast<const E*>(a.y);
  const Roles roles(0);

  __shared__ int s_num_in[kMaxRanks];
  if (threadIdx.x < num_ranks) s_num_in[threadIdx.x] = min(a.recv_count[threadIdx.x], s_cap);
  Net::EntryBarrier(c, nodes, kOpCombine);  // its __syncthreads publishes s_num_in

  if (roles.sender) {
    // Slot-major across sources, remote ones first: every warp's stores alternate between the
    // peers and this rank, so NVLink and local HBM work at once (source-major order kept each
    // rank's outbound link idle while it reduced its own slots).
    int max_in = 0;
    for (int s = 0; s < num_ranks; ++s) max_in = max(max_in, s_num_in[s]);
    for (int q = roles.swarp; q < num_ranks * max_in; q += roles.num_swarps) {
      const int i = q / num_ranks, s = (rank + 1 + q % num_ranks) % num_ranks;
      if (i >= s_num_in[s]) continue;
      const size_t src_slot = size_t(s) * s_cap + i;
      // The value goes to the source's staging; from another node, to the staging of the rank
      // of my node with the source's local index (it reduces the node's values, see below).
      int owner = s, index = rank;
      if constexpr (Net::kInternode) {
        const int per_node = nodes.ranks_per_node;
        if (!Net::Near(nodes, rank, s)) {
          owner = rank - rank % per_node + s % per_node, index = s - s % per_node + rank % per_node;
        }
      }
      uint8_t* dst = Slot(c, owner, index, i);
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
      if (lane == 0) StoreRelease(SlotFlag(c, owner, index, i), c.epoch);
    }
  }
  if constexpr (Net::kInternode) {
    ReduceAndForward<E, kPack, Net>(c, nodes, a, roles.swarp, roles.num_swarps);
    Net::Quiet();
    SumNodes<E, kPack, Net>(c, nodes, a, roles.rwarp, roles.num_rwarps);
    return;
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

}  // namespace return_kernel
}  // namespace jax_ep
