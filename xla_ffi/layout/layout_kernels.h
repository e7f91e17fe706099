// Routing-layout kernel (DeepEP's get_dispatch_layout): plain CUDA, no XLA types.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace jax_ep {

// Limits of the layout kernel: per-expert counts live in shared memory and a token's
// ranks in one 64-bit mask.
constexpr int kLayoutMaxExperts = 1024;
constexpr int kLayoutMaxRanks = 64;

struct LayoutArgs {
  const int32_t* topk_idx;         // [T, K]; -1 = not routed, outside [-1, E) = invalid
  int64_t num_tokens;              // T (may be 0)
  int num_topk;                    // K (may be 0)
  int num_experts;                 // E, 1..kLayoutMaxExperts, a multiple of R
  int num_ranks;                   // R, 1..kLayoutMaxRanks
  int32_t* num_tokens_per_rank;    // [R]
  int32_t* num_tokens_per_expert;  // [E]
  bool* is_token_in_rank;          // [T, R]
  int32_t* num_invalid;            // []
};

// Enqueues the layout on `stream` (zeroing what it accumulates into); never syncs.
// Returns the first launch error. `num_sms` sizes the grid.
cudaError_t LaunchDispatchLayout(const LayoutArgs& args, int num_sms, cudaStream_t stream);

// Streaming multiprocessors of `device`, cached; 0 when the query fails.
int NumSms(int device);

// Loads the layout kernels on `device` now, so that no later launch takes the driver's
// module-loading lock while a peer kernel spins. Restores the current device.
cudaError_t PreloadLayoutKernels(int device);

}  // namespace jax_ep
