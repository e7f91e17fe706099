// The FFI handlers of the extension, as the pointers jax.ffi.register_ffi_target takes.
// Kept free of XLA headers: module.cc needs only nanobind and the CUDA runtime.
#pragma once

namespace jax_ep {

void* DispatchLayoutHandler();  // target "jax_ep_dispatch_layout" (layout/layout_ffi.cc)
void* DispatchHandler();        // target "jax_ep_dispatch" (intranode/intranode_ffi.cc)
void* ReturnHandler();          // target "jax_ep_combine"
void* BroadcastHandler();       // target "jax_ep_broadcast"
void* PeerCopyHandler();        // target "jax_ep_peer_copy"
void* SlotRanksHandler();       // target "jax_ep_slot_ranks"
void* LLDispatchSendHandler();  // target "jax_ep_ll_dispatch_send" (low_latency/low_latency_ffi.cc)
void* LLDispatchRecvHandler();  // target "jax_ep_ll_dispatch_recv"
void* LLCombineSendHandler();   // target "jax_ep_ll_combine_send"
void* LLCombineRecvHandler();   // target "jax_ep_ll_combine_recv"
void* LLDispatchHandler();      // target "jax_ep_ll_dispatch" (send + receive in one call)
void* LLCombineHandler();       // target "jax_ep_ll_combine"

}  // namespace jax_ep
