// Combine kernels: the token-layout pull, the push family (expert layout; token layout when
// staged) and combine's VJP (broadcast). See intranode.h for how each moves data.
#include "../common/device.cuh"
#include "intranode.h"

namespace jax_ep {
namespace {

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

// Push combine family (kReturnWeighted, kReturnGatherK; kReturnRows when staged, with K = 1: the
// row of each slot is recv_rows [R, S]): every block first pushes one
// value per received slot into the source's staging and raises the slot's arrival flag, then
// sums its tokens' values over ranks as soon as they have landed (no grid-wide wait). The push
// (the weighted sums) is the heavy half and latency-bound per warp, so every warp does it.
// Measured slower on EP2 (DeepEP config, this version 266 us): an SM split (461-530 us against
// 417 us, older version); computing the own-rank value in the receive phase straight into out,
// which saves its staging round trip (325 us), also with an SM split (285-369 us).
template <typename E, int kPack>
__global__ void __launch_bounds__(kThreads, 1) ReturnKernel(CommArgs c, ReturnArgs a) {
  const int lane = threadIdx.x % 32;
  const int num_ranks = c.num_ranks, rank = c.rank, num_topk = a.num_topk;
  const int cap = a.recv_capacity, s_cap = a.send_capacity, width = a.width;
  const E* y = static_cast<const E*>(a.y);
  const Roles roles(0);

  __shared__ int s_num_in[kMaxRanks];
  if (threadIdx.x < num_ranks) s_num_in[threadIdx.x] = min(a.recv_count[threadIdx.x], s_cap);
  EntryBarrier(c, kOpCombine);  // its __syncthreads publishes s_num_in

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

template <typename V>
struct BroadcastLauncher {
  static cudaError_t Run(const CommArgs& c, const BroadcastArgs& a, cudaStream_t stream) {
    BroadcastKernel<V><<<c.num_blocks, kThreads, 0, stream>>>(c, a);
    return cudaGetLastError();
  }
  static void Load(cudaError_t& err) { Touch(err, BroadcastKernel<V>); }
};

template <typename E>
cudaError_t LaunchReturnE(const CommArgs& c, const ReturnArgs& a, cudaStream_t stream) {
  constexpr int kPack = 16 / sizeof(E);
  const bool vec = a.mode != kReturnGatherK && a.width % kPack == 0;
  const bool pull = a.mode == kReturnRows && !c.staged;  // staged: peers cannot read y
  auto kernel = pull ? (vec ? PullRowsKernel<E, kPack> : PullRowsKernel<E, 1>)
                     : (vec ? ReturnKernel<E, kPack> : ReturnKernel<E, 1>);
  ReturnArgs b = a;
  if (a.mode == kReturnRows) b.num_topk = 1;  // one row per slot: recv_rows is [R, S]
  kernel<<<c.num_blocks, kThreads, 0, stream>>>(c, b);
  return cudaGetLastError();
}

template <typename E, int kPack>
void TouchReturnKernels(cudaError_t& err) {
  Touch(err, ReturnKernel<E, kPack>), Touch(err, ReturnKernel<E, 1>);
  Touch(err, PullRowsKernel<E, kPack>), Touch(err, PullRowsKernel<E, 1>);
}

}  // namespace

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

size_t ReturnSlotBytes(int width, ElemType elem, ReturnMode mode, int num_topk) {
  if (mode == kReturnGatherK) return Align16(size_t(num_topk) * 4);
  const size_t item = elem == kF32 ? 4 : 2;
  return Align16(size_t(width) * item);
}

cudaError_t PreloadCombineKernels() {
  cudaError_t err = cudaSuccess;
  TouchReturnKernels<float, 4>(err);
  TouchReturnKernels<__nv_bfloat16, 8>(err);
  TouchReturnKernels<__half, 8>(err);
  LoadForEachRowVector<BroadcastLauncher>(err);
  return err;
}

}  // namespace jax_ep
