// XLA FFI handler of "jax_ep_dispatch_layout": checks shapes and attributes, then launches
// (layout_kernels.cu). Errors come back as ffi::Error; no host sync, no allocation.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "../common/ffi_util.h"
#include "../handlers.h"
#include "layout_kernels.h"

namespace jax_ep {

// Mirrors jax_ep._ffi.LayoutConfig; passed as one dictionary attribute "config".
struct LayoutConfig {
  int64_t num_experts;
  int64_t num_ranks;
};

}  // namespace jax_ep

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jax_ep::LayoutConfig,
                                      ::xla::ffi::StructMember<int64_t>("num_experts"),
                                      ::xla::ffi::StructMember<int64_t>("num_ranks"));

namespace jax_ep {
namespace {

using S32 = ffi::Buffer<ffi::S32>;

constexpr const char* kTarget = "jax_ep_dispatch_layout";

ffi::Error Invalid(const std::string& msg) { return InvalidArgument(kTarget, msg); }

ffi::Error CheckShape(const char* name, ffi::Span<const int64_t> dims,
                      const std::vector<int64_t>& want) {
  if (std::equal(dims.begin(), dims.end(), want.begin(), want.end())) {
    return ffi::Error::Success();
  }
  return Invalid(std::string(name) + " has shape " + ShapeString(dims) + ", expected " + ShapeString(want));
}

ffi::Error DispatchLayoutImpl(cudaStream_t stream, int32_t device, S32 topk_idx,
                              ffi::Result<S32> num_tokens_per_rank,
                              ffi::Result<S32> num_tokens_per_expert,
                              ffi::Result<ffi::Buffer<ffi::PRED>> is_token_in_rank,
                              ffi::Result<S32> num_invalid, LayoutConfig config) {
  const int64_t num_experts = config.num_experts, num_ranks = config.num_ranks;
  if (num_ranks < 1 || num_ranks > kLayoutMaxRanks) {
    return Invalid("num_ranks must be in [1, " + std::to_string(kLayoutMaxRanks) + "], got " +
                   std::to_string(num_ranks));
  }
  if (num_experts < 1 || num_experts > kLayoutMaxExperts || num_experts % num_ranks != 0) {
    return Invalid("num_experts must be a multiple of num_ranks (" + std::to_string(num_ranks) +
                   ") in [1, " + std::to_string(kLayoutMaxExperts) + "], got " +
                   std::to_string(num_experts));
  }
  const auto dims = topk_idx.dimensions();
  if (dims.size() != 2) return Invalid("topk_idx must be [T, K], got shape " + ShapeString(dims));
  const int64_t num_tokens = dims[0], num_topk = dims[1];
  if (num_topk > INT32_MAX) return Invalid("top-k too large: " + std::to_string(num_topk));
  if (auto err = CheckShape("num_tokens_per_rank", num_tokens_per_rank->dimensions(), {num_ranks});
      err.failure()) {
    return err;
  }
  if (auto err = CheckShape("num_tokens_per_expert", num_tokens_per_expert->dimensions(),
                            {num_experts});
      err.failure()) {
    return err;
  }
  if (auto err = CheckShape("is_token_in_rank", is_token_in_rank->dimensions(),
                            {num_tokens, num_ranks});
      err.failure()) {
    return err;
  }
  if (auto err = CheckShape("num_invalid", num_invalid->dimensions(), {}); err.failure()) {
    return err;
  }

  LayoutArgs args;
  args.topk_idx = topk_idx.typed_data();
  args.num_tokens = num_tokens;
  args.num_topk = static_cast<int>(num_topk);
  args.num_experts = static_cast<int>(num_experts);
  args.num_ranks = static_cast<int>(num_ranks);
  args.num_tokens_per_rank = num_tokens_per_rank->typed_data();
  args.num_tokens_per_expert = num_tokens_per_expert->typed_data();
  args.is_token_in_rank = is_token_in_rank->typed_data();
  args.num_invalid = num_invalid->typed_data();
  return Launched(LaunchDispatchLayout(args, NumSms(device), stream), kTarget,
                  "DispatchLayoutKernel");
}

}  // namespace

// Not marked command-buffer compatible until graph capture of it is shown on the GPU hosts.
XLA_FFI_DEFINE_HANDLER(kDispatchLayout, DispatchLayoutImpl,
                       ffi::Ffi::Bind()
                           .Ctx<ffi::PlatformStream<cudaStream_t>>()
                           .Ctx<ffi::DeviceOrdinal>()
                           .Arg<S32>()                       // topk_idx [T, K]
                           .Ret<S32>()                       // num_tokens_per_rank [R]
                           .Ret<S32>()                       // num_tokens_per_expert [E]
                           .Ret<ffi::Buffer<ffi::PRED>>()    // is_token_in_rank [T, R]
                           .Ret<S32>()                       // num_invalid []
                           .Attr<LayoutConfig>("config"));

void* DispatchLayoutHandler() { return reinterpret_cast<void*>(kDispatchLayout); }

}  // namespace jax_ep
