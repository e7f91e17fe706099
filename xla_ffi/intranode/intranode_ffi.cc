// XLA FFI handlers of the intranode dispatch/combine ops (kernels in dispatch.cu, combine.cu,
// peer_copy.cu; declared in intranode.h). The workspace's transport decides direct or staged.
// Handlers only check shapes, look the workspace up and launch: no allocation, no host sync.
#include <cuda_runtime.h>

#include <string>

#include "../common/ffi_util.h"
#include "../runtime/workspace.h"
#include "../handlers.h"
#include "intranode.h"

namespace jax_ep {
namespace {

using S32 = ffi::Buffer<ffi::S32>;
using F32 = ffi::Buffer<ffi::F32>;

ffi::Error Invalid(const std::string& msg) { return InvalidArgument("jax_ep", msg); }

// The workspace and this device's place in it, or an error naming what is wrong.
ffi::Error Lookup(int64_t workspace_id, int32_t device, Workspace** ws, DeviceSlot** slot) {
  *ws = FindWorkspace(workspace_id);
  if (*ws == nullptr) return Invalid("workspace " + std::to_string(workspace_id) + " is closed");
  const std::string err = (*ws)->ErrorMessage();
  if (!err.empty()) return ffi::Error::Internal(err);
  *slot = (*ws)->Device(device);
  if (*slot == nullptr) {
    return Invalid("GPU " + std::to_string(device) + " is not part of this Buffer's mesh");
  }
  return ffi::Error::Success();
}

ffi::Error CheckSlot(const Workspace& ws, size_t slot_bytes, int64_t send_capacity) {
  if (slot_bytes > ws.config().slot_bytes || size_t(send_capacity) > ws.config().slots_per_rank) {
    return Invalid("this call needs " + std::to_string(send_capacity) + " slots of " +
                   std::to_string(slot_bytes) + " bytes per rank but the Buffer's workspace has " +
                   std::to_string(ws.config().slots_per_rank) + " of " +
                   std::to_string(ws.config().slot_bytes) +
                   "; create the Buffer with larger max_tokens_per_rank / hidden");
  }
  return ffi::Error::Success();
}

ffi::Error Launched(cudaError_t err, const char* kernel) {
  return jax_ep::Launched(err, "jax_ep", kernel);
}

ffi::Error DispatchImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer x,
                        ffi::AnyBuffer scales, S32 topk_idx, F32 topk_weights, S32 pos_in_src,
                        S32 send_pos, S32 tokens_per_rank, S32 tokens_per_expert,
                        ffi::Result<ffi::AnyBuffer> recv_x, ffi::Result<ffi::AnyBuffer> recv_scales,
                        ffi::Result<S32> recv_topk_idx, ffi::Result<F32> recv_topk_weights,
                        ffi::Result<S32> group_sizes, ffi::Result<S32> num_recv_rows,
                        ffi::Result<S32> num_tokens_per_expert, ffi::Result<S32> num_dropped,
                        ffi::Result<S32> recv_rows, ffi::Result<S32> row_src,
                        ffi::Result<S32> recv_count, int64_t workspace_id, int64_t num_experts,
                        int64_t recv_capacity, int64_t expert_alignment, int64_t send_capacity,
                        bool expert_layout) {
  Workspace* ws;
  DeviceSlot* slot;
  if (auto err = Lookup(workspace_id, device, &ws, &slot); err.failure()) return err;
  const auto dims = topk_idx.dimensions();
  if (dims.size() != 2 || x.dimensions().size() != 2) return Invalid("dispatch: bad ranks");
  const int64_t num_tokens = dims[0], num_topk = dims[1];
  const int num_ranks = slot->num_ranks;
  if (num_topk > kMaxTopk) return Invalid("dispatch: top-k above 32 is not supported");
  if (num_experts % num_ranks || num_experts / num_ranks > kMaxLocalExperts ||
      num_experts > kMaxExperts) {
    return Invalid("dispatch: experts per rank must divide evenly and be <= " +
                   std::to_string(kMaxLocalExperts) + ", experts <= " +
                   std::to_string(kMaxExperts));
  }
  const int64_t num_scales = scales.dimensions().size() == 2 ? scales.dimensions()[1] : 0;
  if (recv_capacity < 1) return Invalid("dispatch: recv_capacity must be >= 1");
  // From the output: at T = 0 there is no input row, but the C output rows are still cleared.
  const size_t x_row_bytes = recv_x->size_bytes() / size_t(recv_capacity);
  const bool staged = ws->staged();
  const size_t slot_bytes = DispatchSlotBytes(int(num_topk), x_row_bytes, int(num_scales), staged);
  if (auto err = CheckSlot(*ws, slot_bytes, send_capacity); err.failure()) return err;

  DispatchArgs a{};
  a.x = static_cast<const uint8_t*>(x.untyped_data());
  a.x_row_bytes = x_row_bytes;
  a.scales = num_scales ? static_cast<const float*>(scales.untyped_data()) : nullptr;
  a.num_scales = int(num_scales);
  a.topk_idx = topk_idx.typed_data();
  a.topk_weights = topk_weights.typed_data();
  a.pos_in_src = pos_in_src.typed_data();
  a.send_pos = send_pos.typed_data();
  a.tokens_per_rank = tokens_per_rank.typed_data();
  a.tokens_per_expert = tokens_per_expert.typed_data();
  a.num_tokens = int(num_tokens);
  a.num_topk = int(num_topk);
  a.num_experts = int(num_experts);
  a.num_local_experts = int(num_experts / num_ranks);
  a.recv_capacity = int(recv_capacity);
  a.expert_alignment = int(expert_alignment);
  a.send_capacity = int(send_capacity);
  a.expert_layout = expert_layout;
  a.num_recv_blocks = expert_layout || staged ? ws->config().num_recv_blocks : 0;
  a.recv_x = static_cast<uint8_t*>(recv_x->untyped_data());
  a.recv_scales = num_scales ? static_cast<float*>(recv_scales->untyped_data()) : nullptr;
  a.recv_topk_idx = recv_topk_idx->typed_data();
  a.recv_topk_weights = recv_topk_weights->typed_data();
  a.group_sizes = expert_layout ? group_sizes->typed_data() : nullptr;
  a.num_recv_rows = num_recv_rows->typed_data();
  a.num_tokens_per_expert = num_tokens_per_expert->typed_data();
  a.num_dropped = num_dropped->typed_data();
  a.recv_rows = recv_rows->typed_data();
  a.row_src = row_src->typed_data();
  a.recv_count = recv_count->typed_data();
  if (!expert_layout) {  // the token layout counts with atomics
    cudaMemsetAsync(a.num_tokens_per_expert, 0, sizeof(int32_t) * a.num_local_experts, stream);
  }
  return Launched(LaunchDispatch(ws->Comm(*slot, slot_bytes), a, stream), "dispatch");
}

ffi::Error ReturnImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer y, S32 recv_rows,
                      S32 recv_count, F32 row_weights, S32 send_pos,
                      ffi::Result<ffi::AnyBuffer> out, int64_t workspace_id, int64_t mode,
                      int64_t num_topk, int64_t send_capacity) {
  Workspace* ws;
  DeviceSlot* slot;
  if (auto err = Lookup(workspace_id, device, &ws, &slot); err.failure()) return err;
  ReturnArgs a{};
  switch (y.element_type()) {
    case ffi::F32: a.elem = kF32; break;
    case ffi::BF16: a.elem = kBF16; break;
    case ffi::F16: a.elem = kF16; break;
    default: return Invalid("combine: rows must be float32, bfloat16 or float16");
  }
  const auto ydims = y.dimensions();
  a.mode = static_cast<ReturnMode>(mode);
  a.recv_capacity = int(ydims[0]);
  a.width = ydims.size() == 2 ? int(ydims[1]) : 1;
  if (a.mode == kReturnGatherK && a.elem != kF32) return Invalid("combine: bad weight dtype");
  a.y = y.untyped_data();
  a.recv_rows = recv_rows.typed_data();
  a.recv_count = recv_count.typed_data();
  a.row_weights = row_weights.element_count() ? row_weights.typed_data() : nullptr;
  a.send_pos = send_pos.typed_data();
  a.out = out->untyped_data();
  a.num_tokens = int(send_pos.dimensions()[0]);
  a.num_topk = int(num_topk);
  a.send_capacity = int(send_capacity);
  const size_t slot_bytes = ReturnSlotBytes(a.width, a.elem, a.mode, a.num_topk);
  if (auto err = CheckSlot(*ws, slot_bytes, send_capacity); err.failure()) return err;
  return Launched(LaunchReturn(ws->Comm(*slot, slot_bytes), a, stream), "combine");
}

ffi::Error BroadcastImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer values,
                         S32 send_pos, S32 row_src, ffi::Result<ffi::AnyBuffer> rows,
                         int64_t workspace_id, int64_t send_capacity) {
  Workspace* ws;
  DeviceSlot* slot;
  if (auto err = Lookup(workspace_id, device, &ws, &slot); err.failure()) return err;
  BroadcastArgs a{};
  a.num_tokens = int(send_pos.dimensions()[0]);
  a.recv_capacity = int(row_src.element_count());
  if (a.recv_capacity < 1) return Invalid("broadcast: no receive rows");
  a.row_bytes = rows->size_bytes() / size_t(a.recv_capacity);  // also at T = 0 (C >= 1)
  a.values = static_cast<const uint8_t*>(values.untyped_data());
  a.send_pos = send_pos.typed_data();
  a.row_src = row_src.typed_data();
  a.rows = static_cast<uint8_t*>(rows->untyped_data());
  a.send_capacity = int(send_capacity);
  const size_t slot_bytes = (a.row_bytes + 15) / 16 * 16;
  if (auto err = CheckSlot(*ws, slot_bytes, send_capacity); err.failure()) return err;
  return Launched(LaunchBroadcast(ws->Comm(*slot, slot_bytes), a, stream), "broadcast");
}

ffi::Error PeerCopyImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer src,
                        ffi::Result<S32> done, int64_t workspace_id, bool include_self) {
  Workspace* ws;
  DeviceSlot* slot;
  if (auto err = Lookup(workspace_id, device, &ws, &slot); err.failure()) return err;
  PeerCopyArgs a{};
  a.src = static_cast<const uint8_t*>(src.untyped_data());
  a.block_bytes = src.size_bytes() / slot->num_ranks;
  a.include_self = include_self;
  a.done = done->typed_data();
  if (a.block_bytes % 16 || a.block_bytes > ws->config().slots_per_rank * ws->config().slot_bytes) {
    return Invalid("peer copy: blocks must be 16-byte multiples that fit the staging area");
  }
  return Launched(LaunchPeerCopy(ws->Comm(*slot, ws->config().slot_bytes), a, stream),
                  "peer copy");
}

ffi::Error SlotRanksImpl(cudaStream_t stream, S32 topk_idx, ffi::Result<S32> ranks,
                         int64_t num_experts) {
  if (num_experts < 0 || num_experts > (1 << 20)) return Invalid("slot ranks: bad num_experts");
  return Launched(LaunchSlotRanks(topk_idx.typed_data(), int(topk_idx.element_count()),
                                  int(num_experts), ranks->typed_data(), stream),
                  "slot ranks");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER(kSlotRanksHandler, SlotRanksImpl,
                       ffi::Ffi::Bind()
                           .Ctx<ffi::PlatformStream<cudaStream_t>>()
                           .Arg<S32>()  // topk_idx [T, K]
                           .Ret<S32>()  // ranks [T, K]
                           .Attr<int64_t>("num_experts"));

XLA_FFI_DEFINE_HANDLER(kPeerCopyHandler, PeerCopyImpl,
                       ffi::Ffi::Bind()
                           .Ctx<ffi::PlatformStream<cudaStream_t>>()
                           .Ctx<ffi::DeviceOrdinal>()
                           .Arg<ffi::AnyBuffer>()  // src [R, block]
                           .Ret<S32>()             // done []
                           .Attr<int64_t>("workspace_id")
                           .Attr<bool>("include_self"));

XLA_FFI_DEFINE_HANDLER(kDispatchHandler, DispatchImpl,
                       ffi::Ffi::Bind()
                           .Ctx<ffi::PlatformStream<cudaStream_t>>()
                           .Ctx<ffi::DeviceOrdinal>()
                           .Arg<ffi::AnyBuffer>()  // x
                           .Arg<ffi::AnyBuffer>()  // scales ([T, 0] when not FP8)
                           .Arg<S32>()             // topk_idx
                           .Arg<F32>()             // topk_weights
                           .Arg<S32>()             // pos_in_src
                           .Arg<S32>()             // send_pos
                           .Arg<S32>()             // tokens_per_rank
                           .Arg<S32>()             // tokens_per_expert
                           .Ret<ffi::AnyBuffer>()  // recv_x
                           .Ret<ffi::AnyBuffer>()  // recv_scales
                           .Ret<S32>()             // recv_topk_idx
                           .Ret<F32>()             // recv_topk_weights
                           .Ret<S32>()             // group_sizes
                           .Ret<S32>()             // num_recv_rows
                           .Ret<S32>()             // num_tokens_per_expert
                           .Ret<S32>()             // num_dropped
                           .Ret<S32>()             // recv_rows
                           .Ret<S32>()             // row_src
                           .Ret<S32>()             // recv_count
                           .Attr<int64_t>("workspace_id")
                           .Attr<int64_t>("num_experts")
                           .Attr<int64_t>("recv_capacity")
                           .Attr<int64_t>("expert_alignment")
                           .Attr<int64_t>("send_capacity")
                           .Attr<bool>("expert_layout"));

XLA_FFI_DEFINE_HANDLER(kReturnHandler, ReturnImpl,
                       ffi::Ffi::Bind()
                           .Ctx<ffi::PlatformStream<cudaStream_t>>()
                           .Ctx<ffi::DeviceOrdinal>()
                           .Arg<ffi::AnyBuffer>()  // y rows
                           .Arg<S32>()             // recv_rows
                           .Arg<S32>()             // recv_count
                           .Arg<F32>()             // row_weights ([0] when unweighted)
                           .Arg<S32>()             // send_pos
                           .Ret<ffi::AnyBuffer>()  // out
                           .Attr<int64_t>("workspace_id")
                           .Attr<int64_t>("mode")
                           .Attr<int64_t>("num_topk")
                           .Attr<int64_t>("send_capacity"));

XLA_FFI_DEFINE_HANDLER(kBroadcastHandler, BroadcastImpl,
                       ffi::Ffi::Bind()
                           .Ctx<ffi::PlatformStream<cudaStream_t>>()
                           .Ctx<ffi::DeviceOrdinal>()
                           .Arg<ffi::AnyBuffer>()  // values [T, ...]
                           .Arg<S32>()             // send_pos
                           .Arg<S32>()             // row_src
                           .Ret<ffi::AnyBuffer>()  // rows [C, ...]
                           .Attr<int64_t>("workspace_id")
                           .Attr<int64_t>("send_capacity"));

void* DispatchHandler() { return reinterpret_cast<void*>(kDispatchHandler); }
void* ReturnHandler() { return reinterpret_cast<void*>(kReturnHandler); }
void* BroadcastHandler() { return reinterpret_cast<void*>(kBroadcastHandler); }
void* SlotRanksHandler() { return reinterpret_cast<void*>(kSlotRanksHandler); }
void* PeerCopyHandler() { return reinterpret_cast<void*>(kPeerCopyHandler); }

}  // namespace jax_ep
