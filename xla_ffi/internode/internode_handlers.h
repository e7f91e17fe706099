// The internode FFI handlers (internode_ffi.cc), as the pointers jax.ffi.register_ffi_target
// takes, and the binding to the main extension's workspaces. Free of XLA headers: the NVSHMEM
// extension's module (runtime/nvshmem_module.cc) needs only nanobind.
#pragma once

#include "../runtime/workspace_api.h"

namespace jax_ep {

void* InternodeDispatchHandler();   // target "jax_ep_internode_dispatch"
void* InternodeReturnHandler();     // target "jax_ep_internode_combine"
void* InternodeBroadcastHandler();  // target "jax_ep_internode_broadcast"

// The main extension's workspace table (jax_ep._jax_ep_cuda.workspace_api()).
void BindWorkspaceApi(const JaxEpWorkspaceApi* api);

}  // namespace jax_ep
