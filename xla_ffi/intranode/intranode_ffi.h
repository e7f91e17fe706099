// Argument checks and kernel arguments of the dispatch / combine / broadcast handlers, shared by
// the intranode handlers (intranode_ffi.cc) and the internode ones (internode/internode_ffi.cc,
// which add their node fields). Header-only: the two live in different extensions.
#pragma once

#include <cuda_runtime.h>

#include <string>
#include <utility>

#include "../common/ffi_util.h"
#include "intranode.h"

namespace jax_ep {

using S32 = ffi::Buffer<ffi::S32>;
using F32 = ffi::Buffer<ffi::F32>;

inline ffi::Error Invalid(const std::string& msg) { return InvalidArgument("jax_ep", msg); }

inline ffi::Error Launched(cudaError_t err, const char* kernel) {
  return Launched(err, "jax_ep", kernel);
}

// What a workspace holds per source rank.
struct Capacity {
  size_t slots_per_rank;
  size_t slot_bytes;
};

inline ffi::Error CheckSlot(const Capacity& ws, size_t slot_bytes, int64_t send_capacity) {
  if (slot_bytes > ws.slot_bytes || size_t(send_capacity) > ws.slots_per_rank) {
    return Invalid("this call needs " + std::to_string(send_capacity) + " slots of " +
                   std::to_string(slot_bytes) + " bytes per rank but the Buffer's workspace has " +
                   std::to_string(ws.slots_per_rank) + " of " + std::to_string(ws.slot_bytes) +
                   "; create the Buffer with larger max_tokens_per_rank / hidden");
  }
  return ffi::Error::Success();
}

// The operands and results of a dispatch call (jax_ep/backends/cuda.py dispatch).
struct DispatchBuffers {
  ffi::AnyBuffer x, scales;
  S32 topk_idx;
  F32 topk_weights;
  S32 pos_in_src, send_pos, tokens_per_rank, tokens_per_expert;
  ffi::Result<ffi::AnyBuffer> recv_x, recv_scales;
  ffi::Result<S32> recv_topk_idx;
  ffi::Result<F32> recv_topk_weights;
  ffi::Result<S32> group_sizes, num_recv_rows, num_tokens_per_expert, num_dropped, recv_rows,
      row_src, recv_count;
};

// Checks a dispatch call and fills its kernel arguments; *slot_bytes: its staging slot.
inline ffi::Error FillDispatch(DispatchBuffers b, int num_ranks, bool staged,
                               int num_recv_blocks, int64_t num_experts, int64_t recv_capacity,
                               int64_t expert_alignment, int64_t send_capacity,
                               bool expert_layout, DispatchArgs* out, size_t* slot_bytes) {
  const auto dims = b.topk_idx.dimensions();
  if (dims.size() != 2 || b.x.dimensions().size() != 2) return Invalid("dispatch: bad ranks");
  const int64_t num_tokens = dims[0], num_topk = dims[1];
  if (num_topk > kMaxTopk) return Invalid("dispatch: top-k above 32 is not supported");
  if (num_experts % num_ranks || num_experts / num_ranks > kMaxLocalExperts ||
      num_experts > kMaxExperts) {
    return Invalid("dispatch: experts per rank must divide evenly and be <= " +
                   std::to_string(kMaxLocalExperts) + ", experts <= " +
                   std::to_string(kMaxExperts));
  }
  const int64_t num_scales = b.scales.dimensions().size() == 2 ? b.scales.dimensions()[1] : 0;
  if (recv_capacity < 1) return Invalid("dispatch: recv_capacity must be >= 1");
  // From the output: at T = 0 there is no input row, but the C output rows are still cleared.
  const size_t x_row_bytes = b.recv_x->size_bytes() / size_t(recv_capacity);
  *slot_bytes = DispatchSlotBytes(int(num_topk), x_row_bytes, int(num_scales), staged);

  DispatchArgs& a = *out;
  a.x = static_cast<const uint8_t*>(b.x.untyped_data());
  a.x_row_bytes = x_row_bytes;
  a.scales = num_scales ? static_cast<const float*>(b.scales.untyped_data()) : nullptr;
  a.num_scales = int(num_scales);
  a.topk_idx = b.topk_idx.typed_data();
  a.topk_weights = b.topk_weights.typed_data();
  a.pos_in_src = b.pos_in_src.typed_data();
  a.send_pos = b.send_pos.typed_data();
  a.tokens_per_rank = b.tokens_per_rank.typed_data();
  a.tokens_per_expert = b.tokens_per_expert.typed_data();
  a.num_tokens = int(num_tokens);
  a.num_topk = int(num_topk);
  a.num_experts = int(num_experts);
  a.num_local_experts = int(num_experts / num_ranks);
  a.recv_capacity = int(recv_capacity);
  a.expert_alignment = int(expert_alignment);
  a.send_capacity = int(send_capacity);
  a.expert_layout = expert_layout;
  a.num_recv_blocks = expert_layout || staged ? num_recv_blocks : 0;
  a.recv_x = static_cast<uint8_t*>(b.recv_x->untyped_data());
  a.recv_scales = num_scales ? static_cast<float*>(b.recv_scales->untyped_data()) : nullptr;
  a.recv_topk_idx = b.recv_topk_idx->typed_data();
  a.recv_topk_weights = b.recv_topk_weights->typed_data();
  a.group_sizes = expert_layout ? b.group_sizes->typed_data() : nullptr;
  a.num_recv_rows = b.num_recv_rows->typed_data();
  a.num_tokens_per_expert = b.num_tokens_per_expert->typed_data();
  a.num_dropped = b.num_dropped->typed_data();
  a.recv_rows = b.recv_rows->typed_data();
  a.row_src = b.row_src->typed_data();
  a.recv_count = b.recv_count->typed_data();
  return ffi::Error::Success();
}

// The token layout counts rows per expert with atomics: they start at zero.
inline void ZeroTokenLayoutCounts(const DispatchArgs& a, cudaStream_t stream) {
  if (!a.expert_layout) {
    cudaMemsetAsync(a.num_tokens_per_expert, 0, sizeof(int32_t) * a.num_local_experts, stream);
  }
}

// Checks a combine call (any return mode) and fills its kernel arguments.
inline ffi::Error FillReturn(ffi::AnyBuffer y, S32 recv_rows, S32 recv_count, F32 row_weights,
                             S32 send_pos, ffi::Result<ffi::AnyBuffer> out, int64_t mode,
                             int64_t num_topk, int64_t send_capacity, ReturnArgs* args,
                             size_t* slot_bytes) {
  ReturnArgs& a = *args;
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
  *slot_bytes = ReturnSlotBytes(a.width, a.elem, a.mode, a.num_topk);
  return ffi::Error::Success();
}

// Checks a broadcast call (combine's VJP) and fills its kernel arguments.
inline ffi::Error FillBroadcast(ffi::AnyBuffer values, S32 send_pos, S32 row_src,
                                ffi::Result<ffi::AnyBuffer> rows, int64_t send_capacity,
                                BroadcastArgs* args, size_t* slot_bytes) {
  BroadcastArgs& a = *args;
  a.num_tokens = int(send_pos.dimensions()[0]);
  a.recv_capacity = int(row_src.element_count());
  if (a.recv_capacity < 1) return Invalid("broadcast: no receive rows");
  a.row_bytes = rows->size_bytes() / size_t(a.recv_capacity);  // also at T = 0 (C >= 1)
  a.values = static_cast<const uint8_t*>(values.untyped_data());
  a.send_pos = send_pos.typed_data();
  a.row_src = row_src.typed_data();
  a.rows = static_cast<uint8_t*>(rows->untyped_data());
  a.send_capacity = int(send_capacity);
  *slot_bytes = (a.row_bytes + 15) / 16 * 16;
  return ffi::Error::Success();
}

// ------------------------------------------------------------------ bindings
// The handlers' bindings in pieces, in the order of their parameters: contexts, operands,
// (internode: node operands), results, (internode: node results), attributes.

inline auto BindContexts() {
  return ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>().Ctx<ffi::DeviceOrdinal>();
}

template <typename B>
auto BindDispatchOperands(B b) {
  return std::move(b)
      .template Arg<ffi::AnyBuffer>()  // x
      .template Arg<ffi::AnyBuffer>()  // scales ([T, 0] when not FP8)
      .template Arg<S32>()             // topk_idx
      .template Arg<F32>()             // topk_weights
      .template Arg<S32>()             // pos_in_src
      .template Arg<S32>()             // send_pos
      .template Arg<S32>()             // tokens_per_rank
      .template Arg<S32>();            // tokens_per_expert
}

template <typename B>
auto BindDispatchResults(B b) {
  return std::move(b)
      .template Ret<ffi::AnyBuffer>()  // recv_x
      .template Ret<ffi::AnyBuffer>()  // recv_scales
      .template Ret<S32>()             // recv_topk_idx
      .template Ret<F32>()             // recv_topk_weights
      .template Ret<S32>()             // group_sizes
      .template Ret<S32>()             // num_recv_rows
      .template Ret<S32>()             // num_tokens_per_expert
      .template Ret<S32>()             // num_dropped
      .template Ret<S32>()             // recv_rows
      .template Ret<S32>()             // row_src
      .template Ret<S32>();            // recv_count
}

template <typename B>
auto BindDispatchAttrs(B b) {
  return std::move(b)
      .template Attr<int64_t>("workspace_id")
      .template Attr<int64_t>("num_experts")
      .template Attr<int64_t>("recv_capacity")
      .template Attr<int64_t>("expert_alignment")
      .template Attr<int64_t>("send_capacity")
      .template Attr<bool>("expert_layout");
}

template <typename B>
auto BindReturnOperands(B b) {
  return std::move(b)
      .template Arg<ffi::AnyBuffer>()  // y rows
      .template Arg<S32>()             // recv_rows
      .template Arg<S32>()             // recv_count
      .template Arg<F32>()             // row_weights ([0] when unweighted)
      .template Arg<S32>();            // send_pos
}

template <typename B>
auto BindReturnOut(B b) {
  return std::move(b)
      .template Ret<ffi::AnyBuffer>()  // out
      .template Attr<int64_t>("workspace_id")
      .template Attr<int64_t>("mode")
      .template Attr<int64_t>("num_topk")
      .template Attr<int64_t>("send_capacity");
}

template <typename B>
auto BindBroadcastOperands(B b) {
  return std::move(b)
      .template Arg<ffi::AnyBuffer>()  // values [T, ...]
      .template Arg<S32>()             // send_pos
      .template Arg<S32>();            // row_src
}

template <typename B>
auto BindBroadcastOut(B b) {
  return std::move(b)
      .template Ret<ffi::AnyBuffer>()  // rows [C, ...]
      .template Attr<int64_t>("workspace_id")
      .template Attr<int64_t>("send_capacity");
}

}  // namespace jax_ep
