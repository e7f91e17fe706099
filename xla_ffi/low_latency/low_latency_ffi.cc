// XLA FFI handlers of the low-latency ops (kernels in low_latency.cu): the four phases, and
// dispatch / combine as one call each (both phases). Stateless: the
// generations live on the device, so the handlers are command-buffer compatible (XLA may record
// them into CUDA graphs and replay them without running this code).
#include <cuda_runtime.h>

#include <algorithm>
#include <string>

#include "../common/ffi_util.h"
#include "../handlers.h"
#include "../runtime/workspace.h"
#include "low_latency.h"

namespace jax_ep {
namespace {

using S32 = ffi::Buffer<ffi::S32>;
using F32 = ffi::Buffer<ffi::F32>;

ffi::Error Invalid(const std::string& msg) { return InvalidArgument("jax_ep.low_latency", msg); }

// The static shape of one call, checked against the workspace.
struct Shape {
  int64_t num_tokens, hidden, num_topk, num_experts, max_tokens;
  bool use_fp8;
};

ffi::Error Lookup(int64_t workspace_id, int32_t device, const Shape& s, Workspace** ws,
                  DeviceSlot** slot) {
  *ws = FindWorkspace(workspace_id);
  if (*ws == nullptr) {
    return Invalid("low-latency workspace " + std::to_string(workspace_id) +
                   " is closed (create the Buffer with ll_max_tokens_per_rank)");
  }
  if (const std::string err = (*ws)->ErrorMessage(); !err.empty()) return ffi::Error::Internal(err);
  *slot = (*ws)->Device(device);
  if (*slot == nullptr) {
    return Invalid("GPU " + std::to_string(device) + " is not part of this Buffer's mesh");
  }
  const int64_t num_ranks = (*slot)->num_ranks;
  if (s.num_experts % num_ranks || s.num_experts / num_ranks > kMaxLocalExperts ||
      s.num_experts > kMaxExperts) {
    return Invalid("experts must divide evenly over ranks, <= " + std::to_string(kMaxLocalExperts) +
                   " per rank and <= " + std::to_string(kMaxExperts) + " in all");
  }
  if (s.num_topk < 1 || s.num_topk > kMaxTopk) return Invalid("top-k must be in 1..32");
  if (s.num_tokens > s.max_tokens || s.hidden % (s.use_fp8 ? 128 : 8)) {
    return Invalid("T <= max_tokens and H a multiple of 128 (FP8) / 8 (bfloat16) required");
  }
  const size_t need = std::max({LLDispatchSlotBytes(int(s.num_topk), int(s.hidden), s.use_fp8),
                                LLCombineSlotBytes(int(s.hidden)),
                                size_t(s.num_experts / num_ranks) * 8});  // header words
  if (need > (*ws)->config().slot_bytes ||
      LLSlotsPerRank(int(s.max_tokens)) > (*ws)->config().slots_per_rank) {
    return Invalid("this call needs " + std::to_string(LLSlotsPerRank(int(s.max_tokens))) +
                   " slots of " + std::to_string(need) + " bytes per rank; the workspace has " +
                   std::to_string((*ws)->config().slots_per_rank) + " of " +
                   std::to_string((*ws)->config().slot_bytes));
  }
  return ffi::Error::Success();
}

CommArgs Comm(Workspace* ws, DeviceSlot* slot) {
  return ws->Comm(*slot, ws->config().slot_bytes, /*advance_epoch=*/false);
}

ffi::Error Launched(cudaError_t err, const char* kernel) {
  return jax_ep::Launched(err, "jax_ep.low_latency", kernel);
}

// Checks one DispatchSend call and fills its kernel arguments.
ffi::Error PrepareDispatchSend(CommArgs* comm, LLDispatchSendArgs* args, int32_t device,
                               ffi::AnyBuffer x, S32 topk_idx, F32 topk_weights, S32 failed,
                               ffi::Result<S32> ticket, int64_t workspace_id,
                               int64_t num_experts, int64_t max_tokens, bool use_fp8) {
  const auto dims = topk_idx.dimensions();
  if (dims.size() != 2 || x.element_type() != ffi::BF16 || x.dimensions().size() != 2) {
    return Invalid("dispatch_send: x must be [T, H] bfloat16 and topk_idx [T, K]");
  }
  const Shape s{dims[0], x.dimensions()[1], dims[1], num_experts, max_tokens, use_fp8};
  Workspace* ws;
  DeviceSlot* slot;
  if (auto err = Lookup(workspace_id, device, s, &ws, &slot); err.failure()) return err;
  LLDispatchSendArgs a{};
  a.x = static_cast<const uint16_t*>(x.untyped_data());
  a.topk_idx = topk_idx.typed_data();
  a.topk_weights = topk_weights.typed_data();
  a.failed = failed.typed_data();
  a.num_tokens = int(s.num_tokens), a.hidden = int(s.hidden), a.num_topk = int(s.num_topk);
  a.num_experts = int(num_experts), a.max_tokens = int(max_tokens), a.use_fp8 = use_fp8;
  a.ticket = ticket->typed_data();
  *comm = Comm(ws, slot);
  *args = a;
  return ffi::Error::Success();
}

// Checks one DispatchRecv call and fills its kernel arguments.
ffi::Error PrepareDispatchRecv(CommArgs* comm, LLDispatchRecvArgs* args, int32_t device, S32 ticket,
                               ffi::AnyBuffer x, S32 topk_idx, F32 topk_weights,
                               S32 failed, ffi::Result<ffi::AnyBuffer> recv_x,
                               ffi::Result<F32> recv_scales, ffi::Result<S32> recv_count,
                               ffi::Result<S32> recv_src, ffi::Result<S32> recv_range,
                               ffi::Result<S32> num_dropped, ffi::Result<S32> slot_rows,
                               ffi::Result<F32> slot_weights, ffi::Result<S32> token_dests,
                               ffi::Result<S32> token_sent, int64_t workspace_id,
                               int64_t num_experts, int64_t max_tokens, bool use_fp8,
                               int64_t num_tokens, int64_t hidden, int64_t num_topk) {
  const auto x_dims = x.dimensions(), idx_dims = topk_idx.dimensions();
  if (x.element_type() != ffi::BF16 || x_dims.size() != 2 || x_dims[0] != num_tokens ||
      x_dims[1] != hidden || idx_dims.size() != 2 || idx_dims[0] != num_tokens ||
      idx_dims[1] != num_topk) {
    return Invalid("dispatch_recv: x must be the send's [T, H] bfloat16 and topk_idx its [T, K]");
  }
  const Shape s{num_tokens, hidden, num_topk, num_experts, max_tokens, use_fp8};
  Workspace* ws;
  DeviceSlot* slot;
  if (auto err = Lookup(workspace_id, device, s, &ws, &slot); err.failure()) return err;
  LLDispatchRecvArgs a{};
  a.ticket = ticket.typed_data();
  a.x = static_cast<const uint16_t*>(x.untyped_data());
  a.topk_idx = topk_idx.typed_data();
  a.topk_weights = topk_weights.typed_data();
  a.failed = failed.typed_data();
  a.num_tokens = int(num_tokens), a.hidden = int(hidden), a.num_topk = int(num_topk);
  a.num_experts = int(num_experts), a.max_tokens = int(max_tokens), a.use_fp8 = use_fp8;
  a.recv_x = static_cast<uint8_t*>(recv_x->untyped_data());
  a.recv_scales = use_fp8 ? recv_scales->typed_data() : nullptr;
  a.recv_count = recv_count->typed_data();
  a.recv_src = recv_src->typed_data();
  a.recv_range = recv_range->typed_data();
  a.num_dropped = num_dropped->typed_data();
  a.slot_rows = slot_rows->typed_data();
  a.slot_weights = slot_weights->typed_data();
  a.token_dests = token_dests->typed_data();
  a.token_sent = token_sent->typed_data();
  *comm = Comm(ws, slot);
  *args = a;
  return ffi::Error::Success();
}

// Checks one CombineSend call and fills its kernel arguments.
ffi::Error PrepareCombineSend(CommArgs* comm, LLCombineSendArgs* args, int32_t device,
                              ffi::AnyBuffer y, S32 slot_rows, F32 slot_weights, S32 failed,
                              ffi::Result<S32> ticket, int64_t workspace_id, int64_t num_experts,
                              int64_t max_tokens, bool use_fp8) {
  const auto dims = slot_rows.dimensions();
  if (y.element_type() != ffi::BF16 || y.dimensions().size() != 3 || dims.size() != 3) {
    return Invalid("combine_send: y must be [L, R * M, H] bfloat16");
  }
  const Shape s{dims[1], y.dimensions()[2], dims[2], num_experts, max_tokens, use_fp8};
  Workspace* ws;
  DeviceSlot* slot;
  if (auto err = Lookup(workspace_id, device, s, &ws, &slot); err.failure()) return err;
  LLCombineSendArgs a{};
  a.y = static_cast<const uint16_t*>(y.untyped_data());
  a.slot_rows = slot_rows.typed_data();
  a.slot_weights = slot_weights.typed_data();
  a.failed = failed.typed_data();
  a.num_tokens = int(s.num_tokens), a.hidden = int(s.hidden), a.num_topk = int(s.num_topk);
  a.max_tokens = int(max_tokens);
  a.ticket = ticket->typed_data();
  *comm = Comm(ws, slot);
  *args = a;
  return ffi::Error::Success();
}

// Checks one CombineRecv call and fills its kernel arguments.
ffi::Error PrepareCombineRecv(CommArgs* comm, LLCombineRecvArgs* args, int32_t device, S32 ticket,
                              ffi::AnyBuffer y, S32 slot_rows, F32 slot_weights,
                              S32 token_dests, S32 token_sent, S32 failed,
                              ffi::Result<ffi::AnyBuffer> out, ffi::Result<S32> num_missing,
                              int64_t workspace_id, int64_t num_experts, int64_t max_tokens,
                              bool use_fp8, int64_t num_topk) {
  const auto dims = out->dimensions();
  const auto y_dims = y.dimensions();
  if (y.element_type() != ffi::BF16 || y_dims.size() != 3 || y_dims[2] != dims[1] ||
      slot_rows.dimensions().size() != 3 || slot_rows.dimensions()[1] != dims[0] ||
      slot_rows.dimensions()[2] != num_topk) {
    return Invalid("combine_recv: y must be [L, R * M, H] bfloat16 and slot_rows [R, T, K]");
  }
  const Shape s{dims[0], dims[1], num_topk, num_experts, max_tokens, use_fp8};
  Workspace* ws;
  DeviceSlot* slot;
  if (auto err = Lookup(workspace_id, device, s, &ws, &slot); err.failure()) return err;
  LLCombineRecvArgs a{};
  a.ticket = ticket.typed_data();
  a.y = static_cast<const uint16_t*>(y.untyped_data());
  a.slot_rows = slot_rows.typed_data();
  a.slot_weights = slot_weights.typed_data();
  a.token_dests = token_dests.typed_data();
  a.token_sent = token_sent.typed_data();
  a.failed = failed.typed_data();
  a.num_tokens = int(s.num_tokens), a.hidden = int(s.hidden), a.num_topk = int(num_topk);
  a.max_tokens = int(max_tokens);
  a.out = static_cast<uint16_t*>(out->untyped_data());
  a.num_missing = num_missing->typed_data();
  *comm = Comm(ws, slot);
  *args = a;
  return ffi::Error::Success();
}

// The split phases: prepare (checks, kernel arguments), then launch.
#define JAX_EP_LL_PHASE(Name, Args, label, ...)                                      \
  [&]() -> ffi::Error {                                                               \
    CommArgs comm;                                                                    \
    Args a{};                                                                         \
    if (auto err = Prepare##Name(&comm, &a, device, __VA_ARGS__); err.failure()) {   \
      return err;                                                                     \
    }                                                                                 \
    return Launched(LaunchLL##Name(comm, a, stream), label);                          \
  }()

ffi::Error DispatchSendImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer x, S32 topk_idx,
                            F32 topk_weights, S32 failed, ffi::Result<S32> ticket,
                            int64_t workspace_id, int64_t num_experts, int64_t max_tokens,
                            bool use_fp8) {
  return JAX_EP_LL_PHASE(DispatchSend, LLDispatchSendArgs, "dispatch send", x, topk_idx,
                         topk_weights, failed, ticket, workspace_id, num_experts, max_tokens,
                         use_fp8);
}

ffi::Error DispatchRecvImpl(cudaStream_t stream, int32_t device, S32 ticket, ffi::AnyBuffer x,
                            S32 topk_idx, F32 topk_weights, S32 failed,
                            ffi::Result<ffi::AnyBuffer> recv_x,
                            ffi::Result<F32> recv_scales, ffi::Result<S32> recv_count,
                            ffi::Result<S32> recv_src, ffi::Result<S32> recv_range,
                            ffi::Result<S32> num_dropped, ffi::Result<S32> slot_rows,
                            ffi::Result<F32> slot_weights, ffi::Result<S32> token_dests,
                            ffi::Result<S32> token_sent, int64_t workspace_id,
                            int64_t num_experts, int64_t max_tokens, bool use_fp8,
                            int64_t num_tokens, int64_t hidden, int64_t num_topk) {
  return JAX_EP_LL_PHASE(DispatchRecv, LLDispatchRecvArgs, "dispatch receive", ticket, x,
                         topk_idx, topk_weights, failed,
                         recv_x, recv_scales, recv_count, recv_src, recv_range, num_dropped,
                         slot_rows, slot_weights, token_dests, token_sent, workspace_id,
                         num_experts, max_tokens, use_fp8, num_tokens, hidden, num_topk);
}

ffi::Error CombineSendImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer y, S32 slot_rows,
                           F32 slot_weights, S32 failed, ffi::Result<S32> ticket,
                           int64_t workspace_id, int64_t num_experts, int64_t max_tokens,
                           bool use_fp8) {
  return JAX_EP_LL_PHASE(CombineSend, LLCombineSendArgs, "combine send", y, slot_rows,
                         slot_weights, failed, ticket, workspace_id, num_experts, max_tokens,
                         use_fp8);
}

ffi::Error CombineRecvImpl(cudaStream_t stream, int32_t device, S32 ticket, ffi::AnyBuffer y,
                           S32 slot_rows, F32 slot_weights, S32 token_dests, S32 token_sent,
                           S32 failed, ffi::Result<ffi::AnyBuffer> out,
                           ffi::Result<S32> num_missing, int64_t workspace_id,
                           int64_t num_experts, int64_t max_tokens, bool use_fp8,
                           int64_t num_topk) {
  return JAX_EP_LL_PHASE(CombineRecv, LLCombineRecvArgs, "combine receive", ticket, y, slot_rows,
                         slot_weights, token_dests, token_sent, failed, out, num_missing,
                         workspace_id, num_experts, max_tokens, use_fp8, num_topk);
}
#undef JAX_EP_LL_PHASE

// One call for both phases, one kernel (the ticket is an output here, the receive reads none):
// what the split costs is measured against these (benchmarks/bench_low_latency.py).
ffi::Error DispatchImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer x, S32 topk_idx,
                        F32 topk_weights, S32 failed, ffi::Result<S32> ticket,
                        ffi::Result<S32> token_dests, ffi::Result<S32> token_sent,
                        ffi::Result<ffi::AnyBuffer> recv_x, ffi::Result<F32> recv_scales,
                        ffi::Result<S32> recv_count, ffi::Result<S32> recv_src,
                        ffi::Result<S32> recv_range, ffi::Result<S32> num_dropped,
                        ffi::Result<S32> slot_rows, ffi::Result<F32> slot_weights,
                        int64_t workspace_id, int64_t num_experts, int64_t max_tokens,
                        bool use_fp8) {
  CommArgs comm;
  LLDispatchSendArgs send{};
  LLDispatchRecvArgs recv{};
  if (auto err = PrepareDispatchSend(&comm, &send, device, x, topk_idx, topk_weights, failed,
                                     ticket, workspace_id, num_experts, max_tokens, use_fp8);
      err.failure()) {
    return err;
  }
  const auto dims = topk_idx.dimensions();
  if (auto err = PrepareDispatchRecv(&comm, &recv, device, *ticket, x, topk_idx, topk_weights,
                                     failed, recv_x, recv_scales,
                                     recv_count, recv_src, recv_range, num_dropped, slot_rows,
                                     slot_weights, token_dests, token_sent, workspace_id,
                                     num_experts, max_tokens, use_fp8, dims[0],
                                     x.dimensions()[1], dims[1]);
      err.failure()) {
    return err;
  }
  return Launched(LaunchLLDispatch(comm, send, recv, stream), "dispatch");
}

ffi::Error CombineImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer y, S32 slot_rows,
                       F32 slot_weights, S32 token_dests, S32 token_sent, S32 failed,
                       ffi::Result<S32> ticket, ffi::Result<ffi::AnyBuffer> out,
                       ffi::Result<S32> num_missing, int64_t workspace_id, int64_t num_experts,
                       int64_t max_tokens, bool use_fp8) {
  CommArgs comm;
  LLCombineSendArgs send{};
  LLCombineRecvArgs recv{};
  if (auto err = PrepareCombineSend(&comm, &send, device, y, slot_rows, slot_weights, failed,
                                    ticket, workspace_id, num_experts, max_tokens, use_fp8);
      err.failure()) {
    return err;
  }
  if (auto err = PrepareCombineRecv(&comm, &recv, device, *ticket, y, slot_rows, slot_weights,
                                    token_dests, token_sent, failed, out, num_missing, workspace_id, num_experts,
                                    max_tokens, use_fp8, slot_rows.dimensions()[2]);
      err.failure()) {
    return err;
  }
  return Launched(LaunchLLCombine(comm, send, recv, stream), "combine");
}

constexpr auto kTraits = ffi::Traits::kCmdBufferCompatible;

}  // namespace

XLA_FFI_DEFINE_HANDLER(kLLDispatchSendHandler, DispatchSendImpl,
                       ffi::Ffi::Bind()
                           .Ctx<ffi::PlatformStream<cudaStream_t>>()
                           .Ctx<ffi::DeviceOrdinal>()
                           .Arg<ffi::AnyBuffer>()  // x [T, H] bf16
                           .Arg<S32>()             // topk_idx [T, K]
                           .Arg<F32>()             // topk_weights [T, K]
                           .Arg<S32>()             // failed [R]
                           .Ret<S32>()             // ticket [2]
                           .Attr<int64_t>("workspace_id")
                           .Attr<int64_t>("num_experts")
                           .Attr<int64_t>("max_tokens")
                           .Attr<bool>("use_fp8"),
                       {kTraits});

XLA_FFI_DEFINE_HANDLER(kLLDispatchRecvHandler, DispatchRecvImpl,
                       ffi::Ffi::Bind()
                           .Ctx<ffi::PlatformStream<cudaStream_t>>()
                           .Ctx<ffi::DeviceOrdinal>()
                           .Arg<S32>()             // ticket [2]
                           .Arg<ffi::AnyBuffer>()  // x [T, H] bf16 (own tokens)
                           .Arg<S32>()             // topk_idx [T, K]
                           .Arg<F32>()             // topk_weights [T, K]
                           .Arg<S32>()             // failed [R]
                           .Ret<ffi::AnyBuffer>()  // recv_x [L, R * M, H]
                           .Ret<F32>()             // recv_scales [L, R * M, H / 128 or 0]
                           .Ret<S32>()             // recv_count [L]
                           .Ret<S32>()             // recv_src [L, R * M]
                           .Ret<S32>()             // recv_range [L, R, 2]
                           .Ret<S32>()             // num_dropped []
                           .Ret<S32>()             // slot_rows [R, T, K]
                           .Ret<F32>()             // slot_weights [R, T, K]
                           .Ret<S32>()             // token_dests [T]
                           .Ret<S32>()             // token_sent [T]
                           .Attr<int64_t>("workspace_id")
                           .Attr<int64_t>("num_experts")
                           .Attr<int64_t>("max_tokens")
                           .Attr<bool>("use_fp8")
                           .Attr<int64_t>("num_tokens")
                           .Attr<int64_t>("hidden")
                           .Attr<int64_t>("num_topk"),
                       {kTraits});

XLA_FFI_DEFINE_HANDLER(kLLCombineSendHandler, CombineSendImpl,
                       ffi::Ffi::Bind()
                           .Ctx<ffi::PlatformStream<cudaStream_t>>()
                           .Ctx<ffi::DeviceOrdinal>()
                           .Arg<ffi::AnyBuffer>()  // y [L, R * M, H] bf16
                           .Arg<S32>()             // slot_rows [R, T, K]
                           .Arg<F32>()             // slot_weights [R, T, K]
                           .Arg<S32>()             // failed [R]
                           .Ret<S32>()             // ticket [2]
                           .Attr<int64_t>("workspace_id")
                           .Attr<int64_t>("num_experts")
                           .Attr<int64_t>("max_tokens")
                           .Attr<bool>("use_fp8"),
                       {kTraits});

XLA_FFI_DEFINE_HANDLER(kLLCombineRecvHandler, CombineRecvImpl,
                       ffi::Ffi::Bind()
                           .Ctx<ffi::PlatformStream<cudaStream_t>>()
                           .Ctx<ffi::DeviceOrdinal>()
                           .Arg<S32>()             // ticket [2]
                           .Arg<ffi::AnyBuffer>()  // y [L, R * M, H] bf16 (own partials)
                           .Arg<S32>()             // slot_rows [R, T, K]
                           .Arg<F32>()             // slot_weights [R, T, K]
                           .Arg<S32>()             // token_dests [T]
                           .Arg<S32>()             // token_sent [T]
                           .Arg<S32>()             // failed [R]
                           .Ret<ffi::AnyBuffer>()  // out [T, H] bf16
                           .Ret<S32>()             // num_missing [T]
                           .Attr<int64_t>("workspace_id")
                           .Attr<int64_t>("num_experts")
                           .Attr<int64_t>("max_tokens")
                           .Attr<bool>("use_fp8")
                           .Attr<int64_t>("num_topk"),
                       {kTraits});

XLA_FFI_DEFINE_HANDLER(kLLDispatchHandler, DispatchImpl,
                       ffi::Ffi::Bind()
                           .Ctx<ffi::PlatformStream<cudaStream_t>>()
                           .Ctx<ffi::DeviceOrdinal>()
                           .Arg<ffi::AnyBuffer>()  // x [T, H] bf16
                           .Arg<S32>()             // topk_idx [T, K]
                           .Arg<F32>()             // topk_weights [T, K]
                           .Arg<S32>()             // failed [R]
                           .Ret<S32>()             // ticket [2]
                           .Ret<S32>()             // token_dests [T]
                           .Ret<S32>()             // token_sent [T]
                           .Ret<ffi::AnyBuffer>()  // recv_x [L, R * M, H]
                           .Ret<F32>()             // recv_scales [L, R * M, H / 128 or 0]
                           .Ret<S32>()             // recv_count [L]
                           .Ret<S32>()             // recv_src [L, R * M]
                           .Ret<S32>()             // recv_range [L, R, 2]
                           .Ret<S32>()             // num_dropped []
                           .Ret<S32>()             // slot_rows [R, T, K]
                           .Ret<F32>()             // slot_weights [R, T, K]
                           .Attr<int64_t>("workspace_id")
                           .Attr<int64_t>("num_experts")
                           .Attr<int64_t>("max_tokens")
                           .Attr<bool>("use_fp8"),
                       {kTraits});

XLA_FFI_DEFINE_HANDLER(kLLCombineHandler, CombineImpl,
                       ffi::Ffi::Bind()
                           .Ctx<ffi::PlatformStream<cudaStream_t>>()
                           .Ctx<ffi::DeviceOrdinal>()
                           .Arg<ffi::AnyBuffer>()  // y [L, R * M, H] bf16
                           .Arg<S32>()             // slot_rows [R, T, K]
                           .Arg<F32>()             // slot_weights [R, T, K]
                           .Arg<S32>()             // token_dests [T]
                           .Arg<S32>()             // token_sent [T]
                           .Arg<S32>()             // failed [R]
                           .Ret<S32>()             // ticket [2]
                           .Ret<ffi::AnyBuffer>()  // out [T, H] bf16
                           .Ret<S32>()             // num_missing [T]
                           .Attr<int64_t>("workspace_id")
                           .Attr<int64_t>("num_experts")
                           .Attr<int64_t>("max_tokens")
                           .Attr<bool>("use_fp8"),
                       {kTraits});

void* LLDispatchSendHandler() { return reinterpret_cast<void*>(kLLDispatchSendHandler); }
void* LLDispatchRecvHandler() { return reinterpret_cast<void*>(kLLDispatchRecvHandler); }
void* LLCombineSendHandler() { return reinterpret_cast<void*>(kLLCombineSendHandler); }
void* LLCombineRecvHandler() { return reinterpret_cast<void*>(kLLCombineRecvHandler); }
void* LLDispatchHandler() { return reinterpret_cast<void*>(kLLDispatchHandler); }
void* LLCombineHandler() { return reinterpret_cast<void*>(kLLCombineHandler); }

}  // namespace jax_ep
