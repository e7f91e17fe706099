// XLA FFI handlers of the intranode dispatch/combine ops (kernels in dispatch.cu, combine.cu,
// peer_copy.cu; declared in intranode.h). The workspace's transport decides direct or staged.
// Handlers only check shapes, look the workspace up and launch: no allocation, no host sync.
#include <cuda_runtime.h>

#include <string>

#include "../handlers.h"
#include "../runtime/workspace.h"
#include "intranode_ffi.h"

namespace jax_ep {
namespace {

Capacity CapacityOf(const Workspace& ws) {
  return {ws.config().slots_per_rank, ws.config().slot_bytes};
}

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
  DispatchArgs a{};
  size_t slot_bytes = 0;
  DispatchBuffers buffers{x, scales, topk_idx, topk_weights, pos_in_src, send_pos,
                                tokens_per_rank, tokens_per_expert, recv_x, recv_scales,
                                recv_topk_idx, recv_topk_weights, group_sizes, num_recv_rows,
                                num_tokens_per_expert, num_dropped, recv_rows, row_src,
                                recv_count};
  if (auto err = FillDispatch(buffers, slot->num_ranks, ws->staged(),
                              ws->config().num_recv_blocks, num_experts, recv_capacity,
                              expert_alignment, send_capacity, expert_layout, &a, &slot_bytes);
      err.failure()) {
    return err;
  }
  if (auto err = CheckSlot(CapacityOf(*ws), slot_bytes, send_capacity); err.failure()) return err;
  ZeroTokenLayoutCounts(a, stream);
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
  size_t slot_bytes = 0;
  if (auto err = FillReturn(y, recv_rows, recv_count, row_weights, send_pos, out, mode, num_topk,
                            send_capacity, &a, &slot_bytes);
      err.failure()) {
    return err;
  }
  if (auto err = CheckSlot(CapacityOf(*ws), slot_bytes, send_capacity); err.failure()) return err;
  return Launched(LaunchReturn(ws->Comm(*slot, slot_bytes), a, stream), "combine");
}

ffi::Error BroadcastImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer values,
                         S32 send_pos, S32 row_src, ffi::Result<ffi::AnyBuffer> rows,
                         int64_t workspace_id, int64_t send_capacity) {
  Workspace* ws;
  DeviceSlot* slot;
  if (auto err = Lookup(workspace_id, device, &ws, &slot); err.failure()) return err;
  BroadcastArgs a{};
  size_t slot_bytes = 0;
  if (auto err = FillBroadcast(values, send_pos, row_src, rows, send_capacity, &a, &slot_bytes);
      err.failure()) {
    return err;
  }
  if (auto err = CheckSlot(CapacityOf(*ws), slot_bytes, send_capacity); err.failure()) return err;
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
                       BindDispatchAttrs(BindDispatchResults(BindDispatchOperands(BindContexts()))));

XLA_FFI_DEFINE_HANDLER(kReturnHandler, ReturnImpl,
                       BindReturnOut(BindReturnOperands(BindContexts())));

XLA_FFI_DEFINE_HANDLER(kBroadcastHandler, BroadcastImpl,
                       BindBroadcastOut(BindBroadcastOperands(BindContexts())));

void* DispatchHandler() { return reinterpret_cast<void*>(kDispatchHandler); }
void* ReturnHandler() { return reinterpret_cast<void*>(kReturnHandler); }
void* BroadcastHandler() { return reinterpret_cast<void*>(kBroadcastHandler); }
void* SlotRanksHandler() { return reinterpret_cast<void*>(kSlotRanksHandler); }
void* PeerCopyHandler() { return reinterpret_cast<void*>(kPeerCopyHandler); }

}  // namespace jax_ep
