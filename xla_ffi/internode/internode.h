// Internode dispatch/combine (several nodes of NVLink-connected GPUs, one process per GPU, the
// network between nodes): plain CUDA launchers, no XLA types. The same ops, layouts and results
// as the intranode family (intranode.h: the argument structs, with their internode fields set),
// whose kernels they share (dispatch_kernel.cuh, return_kernel.cuh) with NvshmemNet (net.cuh).
//
// Rank r = n * G + j is local rank j of node n (NodeComm, comm.h). Rank (n, j) talks over the
// network only to the ranks (m, j) (DeepEP's scheme: each token crosses the network at most once
// per destination node):
//   dispatch   a token goes to the ranks of its own node as in one node (staged slots); for each
//              other node m holding one of its experts, ONE message (the staged slot + the slot
//              it takes at each rank of m) is put with its signal into (m, j)'s receive slot
//              node_pos[t, m]; (m, j) copies it into the staging slots of the ranks of m it goes
//              to and raises their flags (the forward slots stay in the handle: fwd_slots). The
//              receive side is the intranode staged one.
//   combine    each rank returns one value per received slot; a value for a token of another
//              node goes to the rank of its own node with that token's local index, which sums
//              its node's values (rank order, float32, rounded to the value type) and puts one
//              partial per (token, node) to the source; the source adds its own node's partial
//              and the others in node order (float32).
//   broadcast  (combine's VJP) the dispatch's data path with the handle's forward slots.
// Every wait is bounded (the Buffer's timeout) and names the rank and phase; message slots are
// per (node, token): no ring buffers, no credits (a call fits the workspace by construction).
#pragma once

#include "../intranode/intranode.h"

namespace jax_ep {

cudaError_t LaunchInternodeDispatch(const CommArgs& comm, const NodeComm& nodes,
                                    const DispatchArgs& args, cudaStream_t stream);
cudaError_t LaunchInternodeReturn(const CommArgs& comm, const NodeComm& nodes,
                                  const ReturnArgs& args, cudaStream_t stream);
cudaError_t LaunchInternodeBroadcast(const CommArgs& comm, const NodeComm& nodes,
                                     const BroadcastArgs& args, cudaStream_t stream);

// Loads this family's kernels on the current device (at Buffer creation, outside jit).
cudaError_t PreloadInternodeKernels();

}  // namespace jax_ep
