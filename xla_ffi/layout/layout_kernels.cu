// Routing layout: per-rank / per-expert token counts and the token -> rank map.
//
// Each block owns tiles of kThreads tokens (one token per thread) and accumulates its counts
// in shared memory; only the block's nonzero totals reach global memory, by atomics. Integer
// sums do not depend on atomic order, so the results are deterministic.
#include <atomic>
#include <cstdint>

#include "layout_kernels.h"

namespace jax_ep {
namespace {

constexpr int kThreads = 256;
constexpr unsigned kFullWarp = 0xffffffffu;
constexpr int kMaxCachedDevices = 64;

// One top-k entry: valid ids count towards their expert and set their rank in the token's mask.
__device__ __forceinline__ void Visit(int32_t e, int num_experts, int experts_per_rank,
                                      int* s_expert, uint64_t& mask, int& invalid) {
  if (static_cast<unsigned>(e) < static_cast<unsigned>(num_experts)) {
    atomicAdd(&s_expert[e], 1);
    mask |= 1ull << (e / experts_per_rank);
  } else if (e != -1) {
    ++invalid;
  }
}

// kDirect: a single block covers all tokens and writes the counts without atomics, which
// saves the zeroing memsets (the common small-batch / decode case).
template <bool kDirect>
__global__ void __launch_bounds__(kThreads) DispatchLayoutKernel(LayoutArgs a) {
  __shared__ int s_expert[kLayoutMaxExperts];
  __shared__ int s_rank[kLayoutMaxRanks];
  __shared__ int s_invalid;
  __shared__ uint64_t s_mask[kThreads];

  const int tid = threadIdx.x, lane = tid & 31;
  const int num_experts = a.num_experts, num_ranks = a.num_ranks, num_topk = a.num_topk;
  const int experts_per_rank = num_experts / num_ranks;
  // XLA buffers are aligned, but check before using vector accesses.
  const bool vec_in = num_topk % 4 == 0 && reinterpret_cast<uintptr_t>(a.topk_idx) % 16 == 0;
  const bool vec_out =
      num_ranks % 4 == 0 && reinterpret_cast<uintptr_t>(a.is_token_in_rank) % 4 == 0;
  for (int i = tid; i < num_experts; i += kThreads) s_expert[i] = 0;
  if (tid < num_ranks) s_rank[tid] = 0;
  if (tid == 0) s_invalid = 0;
  __syncthreads();

  int invalid = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t t0 = static_cast<int64_t>(blockIdx.x) * kThreads; t0 < a.num_tokens; t0 += stride) {
    const int64_t t = t0 + tid;
    uint64_t mask = 0;
    if (t < a.num_tokens) {
      const int32_t* row = a.topk_idx + t * num_topk;
      if (vec_in) {  // every row is 16-byte aligned
        const int4* row4 = reinterpret_cast<const int4*>(row);
        for (int k = 0; k < num_topk / 4; ++k) {
          const int4 v = __ldg(row4 + k);
          Visit(v.x, num_experts, experts_per_rank, s_expert, mask, invalid);
          Visit(v.y, num_experts, experts_per_rank, s_expert, mask, invalid);
          Visit(v.z, num_experts, experts_per_rank, s_expert, mask, invalid);
          Visit(v.w, num_experts, experts_per_rank, s_expert, mask, invalid);
        }
      } else {
        for (int k = 0; k < num_topk; ++k) {
          Visit(__ldg(row + k), num_experts, experts_per_rank, s_expert, mask, invalid);
        }
      }
    }
    // Tokens per rank: one ballot per rank and warp, one shared atomic per warp.
    for (int r = 0; r < num_ranks; ++r) {
      const unsigned votes = __ballot_sync(kFullWarp, (mask >> r) & 1);
      if (lane == 0 && votes != 0) atomicAdd(&s_rank[r], __popc(votes));
    }
    s_mask[tid] = mask;
    __syncthreads();

    // This tile of is_token_in_rank is one contiguous run of rows * R bytes: write it coalesced.
    const int rows = static_cast<int>(min(static_cast<int64_t>(kThreads), a.num_tokens - t0));
    const int bytes = rows * num_ranks;
    uint8_t* out = reinterpret_cast<uint8_t*>(a.is_token_in_rank) + t0 * num_ranks;
    if (vec_out) {  // 4 flags of one row per 32-bit word (R % 4 == 0 keeps words in a row)
      uint32_t* out4 = reinterpret_cast<uint32_t*>(out);
      for (int w = tid; w < bytes / 4; w += kThreads) {
        const int byte = 4 * w;
        const uint32_t bits = static_cast<uint32_t>(s_mask[byte / num_ranks] >> (byte % num_ranks));
        out4[w] = (bits & 1u) | ((bits & 2u) << 7) | ((bits & 4u) << 14) | ((bits & 8u) << 21);
      }
    } else {
      for (int b = tid; b < bytes; b += kThreads) {
        out[b] = static_cast<uint8_t>((s_mask[b / num_ranks] >> (b % num_ranks)) & 1);
      }
    }
    __syncthreads();  // s_mask is rewritten by the next tile
  }

  for (int offset = 16; offset > 0; offset /= 2) {
    invalid += __shfl_xor_sync(kFullWarp, invalid, offset);
  }
  if (lane == 0 && invalid != 0) atomicAdd(&s_invalid, invalid);
  __syncthreads();

  if (kDirect) {
    for (int i = tid; i < num_experts; i += kThreads) a.num_tokens_per_expert[i] = s_expert[i];
    if (tid < num_ranks) a.num_tokens_per_rank[tid] = s_rank[tid];
    if (tid == 0) *a.num_invalid = s_invalid;
  } else {
    for (int i = tid; i < num_experts; i += kThreads) {
      if (s_expert[i] != 0) atomicAdd(a.num_tokens_per_expert + i, s_expert[i]);
    }
    if (tid < num_ranks && s_rank[tid] != 0) atomicAdd(a.num_tokens_per_rank + tid, s_rank[tid]);
    if (tid == 0 && s_invalid != 0) atomicAdd(a.num_invalid, s_invalid);
  }
}

std::atomic<int> g_num_sms[kMaxCachedDevices];

}  // namespace

int NumSms(int device) {
  const bool cached = device >= 0 && device < kMaxCachedDevices;
  if (cached) {
    const int n = g_num_sms[device].load(std::memory_order_relaxed);
    if (n > 0) return n;
  }
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    (void)cudaGetLastError();  // a failed query must not look like a failed launch
    return 0;
  }
  if (cached) g_num_sms[device].store(n, std::memory_order_relaxed);
  return n;
}

cudaError_t LaunchDispatchLayout(const LayoutArgs& a, int num_sms, cudaStream_t stream) {
  (void)cudaGetLastError();  // report only what this launch does
  // Two blocks per SM hide the tile's syncs; more would only add flush atomics.
  const int64_t max_blocks = 2 * static_cast<int64_t>(num_sms > 0 ? num_sms : 132);
  const int64_t tiles = (a.num_tokens + kThreads - 1) / kThreads;
  const int blocks = static_cast<int>(tiles < 1 ? 1 : (tiles < max_blocks ? tiles : max_blocks));
  if (blocks == 1) {  // also T = 0: one block writes the zero counts
    DispatchLayoutKernel<true><<<1, kThreads, 0, stream>>>(a);
    return cudaGetLastError();
  }
  cudaError_t err =
      cudaMemsetAsync(a.num_tokens_per_rank, 0, sizeof(int32_t) * a.num_ranks, stream);
  if (err == cudaSuccess) {
    err = cudaMemsetAsync(a.num_tokens_per_expert, 0, sizeof(int32_t) * a.num_experts, stream);
  }
  if (err == cudaSuccess) err = cudaMemsetAsync(a.num_invalid, 0, sizeof(int32_t), stream);
  if (err != cudaSuccess) return err;
  DispatchLayoutKernel<false><<<blocks, kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

cudaError_t PreloadLayoutKernels(int device) {
  int previous = 0;
  cudaError_t err = cudaGetDevice(&previous);
  if (err != cudaSuccess) return err;
  err = cudaSetDevice(device);
  cudaFuncAttributes attr;
  // Querying a kernel's attributes loads it (CUDA lazy loading).
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, DispatchLayoutKernel<true>);
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, DispatchLayoutKernel<false>);
  if (err == cudaSuccess && NumSms(device) == 0) err = cudaErrorInvalidDevice;
  (void)cudaSetDevice(previous);
  (void)cudaGetLastError();
  return err;
}

}  // namespace jax_ep
