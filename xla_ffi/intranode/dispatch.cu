// Dispatch kernels: the routing-rank prefix (slot ranks) and the NVLink dispatch itself, both
// layouts, direct or staged (see intranode.h for how each moves data; the kernel is shared with
// the internode family: dispatch_kernel.cuh).
#include "dispatch_kernel.cuh"

namespace jax_ep {
namespace {

using dispatch_kernel::DispatchKernel;

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

template <typename V>
struct DispatchLauncher {
  template <bool kExpert, bool kStaged>
  static cudaError_t Launch(const CommArgs& c, const DispatchArgs& a, cudaStream_t stream) {
    const size_t smem = sizeof(int) * (kExpert ? a.num_experts + 2 * a.num_local_experts + 1
                                               : a.num_local_experts);
    DispatchKernel<V, kExpert, kStaged, DirectNet><<<c.num_blocks, kThreads, smem, stream>>>(
        c, a, Flat{});
    return cudaGetLastError();
  }
  static cudaError_t Run(const CommArgs& c, const DispatchArgs& a, cudaStream_t stream) {
    if (a.expert_layout) {
      return c.staged ? Launch<true, true>(c, a, stream) : Launch<true, false>(c, a, stream);
    }
    return c.staged ? Launch<false, true>(c, a, stream) : Launch<false, false>(c, a, stream);
  }
  static void Load(cudaError_t& err) {
    Touch(err, DispatchKernel<V, false, false, DirectNet>);
    Touch(err, DispatchKernel<V, false, true, DirectNet>);
    Touch(err, DispatchKernel<V, true, false, DirectNet>);
    Touch(err, DispatchKernel<V, true, true, DirectNet>);
  }
};

}  // namespace

cudaError_t LaunchDispatch(const CommArgs& c, const DispatchArgs& a, cudaStream_t stream) {
  return ByRowVector<DispatchLauncher>(a.x_row_bytes, c, a, stream);
}

cudaError_t LaunchSlotRanks(const int32_t* topk_idx, int num_slots, int num_experts,
                            int32_t* ranks, cudaStream_t stream) {
  cudaMemsetAsync(ranks, 0xff, sizeof(int32_t) * num_slots, stream);  // -1 everywhere
  if (num_slots > 0 && num_experts > 0) {
    SlotRanksKernel<<<num_experts, kRankThreads, 0, stream>>>(topk_idx, num_slots, ranks);
  }
  return cudaGetLastError();
}

cudaError_t PreloadDispatchKernels() {
  cudaError_t err = cudaSuccess;
  LoadForEachRowVector<DispatchLauncher>(err);
  Touch(err, SlotRanksKernel);
  return err;
}

cudaError_t PreloadIntranodeKernels() {
  cudaError_t err = PreloadDispatchKernels();
  if (err == cudaSuccess) err = PreloadCombineKernels();
  if (err == cudaSuccess) err = PreloadPeerCopyKernel();
  return err;
}

}  // namespace jax_ep
