// XLA FFI handlers of the internode ops (kernels in internode.cu; see internode.h), in the NVSHMEM
// extension. The workspaces belong to the main extension: the handlers reach them through its
// JaxEpWorkspaceApi table, bound once when jax_ep loads this extension. Operands and results are
// those of the intranode handlers plus the node fields (node_pos, tokens_per_node -> fwd_slots,
// node_recv_count at dispatch; the handle's at combine and broadcast). Checks come first; the
// epoch is taken only right before the launch (every rank counts its launched calls).
#include <cuda_runtime.h>

#include <string>

#include "../intranode/intranode_ffi.h"
#include "../runtime/workspace_api.h"
#include "internode.h"
#include "internode_handlers.h"

namespace jax_ep {
namespace {

const JaxEpWorkspaceApi* g_api = nullptr;

// The workspace view for this call (take_epoch: the launch follows).
ffi::Error View(int64_t workspace_id, int32_t device, size_t slot_stride, bool take_epoch,
                JaxEpWorkspaceView* view) {
  if (g_api == nullptr) {
    return ffi::Error::Internal(
        "jax_ep: the NVSHMEM extension is not bound to the main extension's workspaces "
        "(jax_ep._ffi.nvshmem_extension() binds it when it loads the extension)");
  }
  char error[512] = {0};
  if (g_api->view(workspace_id, device, slot_stride, take_epoch ? 1 : 0, view, error,
                  sizeof(error)) != 0) {
    return ffi::Error::Internal(error);
  }
  return ffi::Error::Success();
}

std::string Shape(const std::string& what, const std::string& want, const std::string& got) {
  return "internode " + what + " must be " + want + ", got " + got;
}

// The handle's node fields: node_pos [T, N], fwd_slots [N, T, G], node_recv_count [N].
ffi::Error CheckNodeFields(const NodeComm& n, int num_tokens, S32 node_pos, S32 fwd_slots,
                           S32 node_recv_count) {
  const int64_t t = num_tokens, nn = n.num_nodes, g = n.ranks_per_node;
  if (node_pos.element_count() != size_t(t * nn)) {
    return Invalid(Shape("node_pos", "[T, N] = [" + std::to_string(t) + ", " + std::to_string(nn) +
                                         "]", ShapeString(node_pos.dimensions())));
  }
  if (fwd_slots.element_count() != size_t(nn * t * g)) {
    return Invalid(Shape("fwd_slots", "[N, T, G]", ShapeString(fwd_slots.dimensions())));
  }
  if (node_recv_count.element_count() != size_t(nn)) {
    return Invalid(Shape("node_recv_count", "[N]", ShapeString(node_recv_count.dimensions())));
  }
  return ffi::Error::Success();
}

ffi::Error CheckMessages(const JaxEpWorkspaceView& v, size_t message_bytes, int num_tokens) {
  if (message_bytes > v.message_bytes || size_t(num_tokens) > v.slots_per_rank) {
    return Invalid("internode: " + std::to_string(num_tokens) + " messages of " +
                   std::to_string(message_bytes) + " bytes per node do not fit the Buffer's " +
                   std::to_string(v.slots_per_rank) + " of " + std::to_string(v.message_bytes));
  }
  return ffi::Error::Success();
}

// What every internode call checks after its own arguments (slots, messages, node fields), then
// its node fields into the kernel arguments and the launch, with a fresh epoch.
template <typename Args, typename Launch>
ffi::Error CheckAndLaunch(int64_t workspace_id, int32_t device, JaxEpWorkspaceView& v, Args& a,
                          size_t slot_bytes, int64_t send_capacity, size_t message_bytes,
                          S32 node_pos, S32 fwd_slots, S32 node_recv_count, Launch launch,
                          const char* kernel) {
  if (auto err = CheckSlot({v.slots_per_rank, v.slot_bytes}, slot_bytes, send_capacity);
      err.failure()) {
    return err;
  }
  if (auto err = CheckMessages(v, message_bytes, a.num_tokens); err.failure()) return err;
  if (auto err = CheckNodeFields(v.nodes, a.num_tokens, node_pos, fwd_slots, node_recv_count);
      err.failure()) {
    return err;
  }
  a.node_pos = node_pos.typed_data();
  a.fwd_slots = fwd_slots.typed_data();
  a.node_recv_count = node_recv_count.typed_data();
  if (auto err = View(workspace_id, device, slot_bytes, true, &v); err.failure()) return err;
  v.nodes.message_stride = message_bytes;
  return Launched(launch(v.comm, v.nodes, a), kernel);
}

ffi::Error DispatchImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer x,
                        ffi::AnyBuffer scales, S32 topk_idx, F32 topk_weights, S32 pos_in_src,
                        S32 send_pos, S32 tokens_per_rank, S32 tokens_per_expert, S32 node_pos,
                        S32 tokens_per_node, ffi::Result<ffi::AnyBuffer> recv_x,
                        ffi::Result<ffi::AnyBuffer> recv_scales, ffi::Result<S32> recv_topk_idx,
                        ffi::Result<F32> recv_topk_weights, ffi::Result<S32> group_sizes,
                        ffi::Result<S32> num_recv_rows, ffi::Result<S32> num_tokens_per_expert,
                        ffi::Result<S32> num_dropped, ffi::Result<S32> recv_rows,
                        ffi::Result<S32> row_src, ffi::Result<S32> recv_count,
                        ffi::Result<S32> fwd_slots, ffi::Result<S32> node_recv_count,
                        int64_t workspace_id, int64_t num_experts, int64_t recv_capacity,
                        int64_t expert_alignment, int64_t send_capacity, bool expert_layout) {
  JaxEpWorkspaceView v;
  if (auto err = View(workspace_id, device, 0, false, &v); err.failure()) return err;
  DispatchArgs a{};
  size_t slot_bytes = 0;
  DispatchBuffers buffers{x, scales, topk_idx, topk_weights, pos_in_src, send_pos,
                          tokens_per_rank, tokens_per_expert, recv_x, recv_scales,
                          recv_topk_idx, recv_topk_weights, group_sizes, num_recv_rows,
                          num_tokens_per_expert, num_dropped, recv_rows, row_src, recv_count};
  if (auto err = FillDispatch(buffers, v.comm.num_ranks, /*staged=*/true, v.num_recv_blocks,
                              num_experts, recv_capacity, expert_alignment, send_capacity,
                              expert_layout, &a, &slot_bytes);
      err.failure()) {
    return err;
  }
  if (tokens_per_node.element_count() != size_t(v.nodes.num_nodes)) {
    return Invalid("internode tokens_per_node must be [N]");
  }
  a.tokens_per_node = tokens_per_node.typed_data();
  // A message: the staged slot + the slot at each rank of the destination node.
  const size_t message = DispatchSlot(a.num_topk, a.x_row_bytes, a.num_scales, true)
                             .message_bytes(v.nodes.ranks_per_node);
  auto launch = [&](const CommArgs& comm, const NodeComm& nodes, const DispatchArgs& args) {
    ZeroTokenLayoutCounts(args, stream);
    return LaunchInternodeDispatch(comm, nodes, args, stream);
  };
  return CheckAndLaunch(workspace_id, device, v, a, slot_bytes, send_capacity, message, node_pos,
                        S32(*fwd_slots), S32(*node_recv_count), launch, "internode dispatch");
}

ffi::Error ReturnImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer y, S32 recv_rows,
                      S32 recv_count, F32 row_weights, S32 send_pos, S32 node_pos, S32 fwd_slots,
                      S32 node_recv_count, ffi::Result<ffi::AnyBuffer> out, int64_t workspace_id,
                      int64_t mode, int64_t num_topk, int64_t send_capacity) {
  JaxEpWorkspaceView v;
  if (auto err = View(workspace_id, device, 0, false, &v); err.failure()) return err;
  ReturnArgs a{};
  size_t slot_bytes = 0;
  if (auto err = FillReturn(y, recv_rows, recv_count, row_weights, send_pos, out, mode, num_topk,
                            send_capacity, &a, &slot_bytes);
      err.failure()) {
    return err;
  }
  auto launch = [&](const CommArgs& comm, const NodeComm& nodes, const ReturnArgs& args) {
    return LaunchInternodeReturn(comm, nodes, args, stream);
  };
  // A message: one value row (or K weights), like a staging slot.
  return CheckAndLaunch(workspace_id, device, v, a, slot_bytes, send_capacity, slot_bytes,
                        node_pos, fwd_slots, node_recv_count, launch, "internode combine");
}

ffi::Error BroadcastImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer values,
                         S32 send_pos, S32 row_src, S32 node_pos, S32 fwd_slots,
                         S32 node_recv_count, ffi::Result<ffi::AnyBuffer> rows,
                         int64_t workspace_id, int64_t send_capacity) {
  JaxEpWorkspaceView v;
  if (auto err = View(workspace_id, device, 0, false, &v); err.failure()) return err;
  BroadcastArgs a{};
  size_t slot_bytes = 0;
  if (auto err = FillBroadcast(values, send_pos, row_src, rows, send_capacity, &a, &slot_bytes);
      err.failure()) {
    return err;
  }
  auto launch = [&](const CommArgs& comm, const NodeComm& nodes, const BroadcastArgs& args) {
    return LaunchInternodeBroadcast(comm, nodes, args, stream);
  };
  return CheckAndLaunch(workspace_id, device, v, a, slot_bytes, send_capacity, slot_bytes,
                        node_pos, fwd_slots, node_recv_count, launch, "internode broadcast");
}

}  // namespace

// The intranode bindings (intranode_ffi.h) with the node operands and results.
XLA_FFI_DEFINE_HANDLER(kInternodeDispatchHandler, DispatchImpl,
                       BindDispatchAttrs(
                           BindDispatchResults(BindDispatchOperands(BindContexts())
                                                   .Arg<S32>()    // node_pos [T, N]
                                                   .Arg<S32>())   // tokens_per_node [N]
                               .Ret<S32>()                        // fwd_slots [N, T, G]
                               .Ret<S32>()));                     // node_recv_count [N]

XLA_FFI_DEFINE_HANDLER(kInternodeReturnHandler, ReturnImpl,
                       BindReturnOut(BindReturnOperands(BindContexts())
                                         .Arg<S32>()     // node_pos
                                         .Arg<S32>()     // fwd_slots
                                         .Arg<S32>()));  // node_recv_count

XLA_FFI_DEFINE_HANDLER(kInternodeBroadcastHandler, BroadcastImpl,
                       BindBroadcastOut(BindBroadcastOperands(BindContexts())
                                            .Arg<S32>()     // node_pos
                                            .Arg<S32>()     // fwd_slots
                                            .Arg<S32>()));  // node_recv_count

void* InternodeDispatchHandler() { return reinterpret_cast<void*>(kInternodeDispatchHandler); }
void* InternodeReturnHandler() { return reinterpret_cast<void*>(kInternodeReturnHandler); }
void* InternodeBroadcastHandler() { return reinterpret_cast<void*>(kInternodeBroadcastHandler); }

void BindWorkspaceApi(const JaxEpWorkspaceApi* api) { g_api = api; }

}  // namespace jax_ep
