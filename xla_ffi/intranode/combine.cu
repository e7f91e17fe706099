// Combine kernels: the token-layout pull, the push family (expert layout; token layout when
// staged) and combine's VJP (broadcast). See intranode.h for how each moves data.
#include "return_kernel.cuh"

namespace jax_ep {
namespace {

using return_kernel::ReturnKernel;

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
  ReturnArgs b = a;
  if (a.mode == kReturnRows) b.num_topk = 1;  // one row per slot: recv_rows is [R, S]
  if (pull) {
    auto kernel = vec ? PullRowsKernel<E, kPack> : PullRowsKernel<E, 1>;
    kernel<<<c.num_blocks, kThreads, 0, stream>>>(c, b);
  } else {
    auto kernel = vec ? ReturnKernel<E, kPack, DirectNet> : ReturnKernel<E, 1, DirectNet>;
    kernel<<<c.num_blocks, kThreads, 0, stream>>>(c, b, Flat{});
  }
  return cudaGetLastError();
}

template <typename E, int kPack>
void TouchReturnKernels(cudaError_t& err) {
  Touch(err, ReturnKernel<E, kPack, DirectNet>), Touch(err, ReturnKernel<E, 1, DirectNet>);
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

cudaError_t PreloadCombineKernels() {
  cudaError_t err = cudaSuccess;
  TouchReturnKernels<float, 4>(err);
  TouchReturnKernels<__nv_bfloat16, 8>(err);
  TouchReturnKernels<__half, 8>(err);
  LoadForEachRowVector<BroadcastLauncher>(err);
  return err;
}

}  // namespace jax_ep
