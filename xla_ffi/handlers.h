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

}  // namespace jax_ep
