// Nodes of an EP group on the device: the message slots of the internode kernels' network leg
// (NodeComm, comm.h) and DirectNet, the transport policy of the single-node kernels. The
// kernels shared by both families (intranode/dispatch_kernel.cuh, return_kernel.cuh) take a
// policy `Net`: DirectNet here (every peer by loads and stores), or NvshmemNet
// (internode/net.cuh: NVSHMEM puts and signals to the ranks of other nodes). Plain CUDA.
#pragma once

#include "device.cuh"

namespace jax_ep {

// The Nodes argument of a single-node kernel: nothing to know.
struct Flat {};

// Message slot q of `node` in this rank's workspace: by source node (receive side) or by
// destination node (send side). Symmetric memory: a put to a peer names its slot by the local
// address of the same slot.
__device__ __forceinline__ uint8_t* RecvMessage(const CommArgs& c, const NodeComm& n, int node,
                                                size_t q) {
  return c.peer_ws[c.rank] + n.recv_offset + (size_t(node) * n.slots + q) * n.message_stride;
}

__device__ __forceinline__ uint8_t* SendMessage(const CommArgs& c, const NodeComm& n, int node,
                                                size_t q) {
  return c.peer_ws[c.rank] + n.send_offset + (size_t(node) * n.slots + q) * n.message_stride;
}

__device__ __forceinline__ uint64_t* MessageSignal(const CommArgs& c, const NodeComm& n, int node,
                                                   size_t q) {
  return reinterpret_cast<uint64_t*>(c.peer_ws[c.rank] + n.signals_offset) + size_t(node) * n.slots +
         q;
}

// The forwarder's step (internode dispatch and broadcast): the `bytes` of a message that source
// rank `src` (another node) put here go into the staging slot `slot` (lane j's value, -1: none)
// of each rank j of my node, whose arrival flags then rise, as if `src` had stored them itself.
template <typename V>
__device__ __forceinline__ void ForwardToNode(const CommArgs& c, const NodeComm& n, int src,
                                              int slot, const uint8_t* msg, size_t bytes,
                                              int lane) {
  const int first = c.rank - c.rank % n.ranks_per_node;  // rank 0 of my node
  WarpCopyToRows<V, false>(
      __ballot_sync(kFull, slot >= 0),
      [&](int j) { return Slot(c, first + j, src, __shfl_sync(kFull, slot, j)); }, msg, bytes,
      lane);
  __syncwarp();  // every lane's stores precede the releases (cumulativity)
  if (slot >= 0) StoreRelease(SlotFlag(c, first + lane, src, slot), c.epoch);
}

// One node: every peer is reached by loads and stores.
struct DirectNet {
  static constexpr bool kInternode = false;
  using Nodes = Flat;
  __device__ static constexpr bool Near(const Flat&, int, int) { return true; }
  __device__ static void EntryBarrier(const CommArgs& c, const Flat&, int op) {
    jax_ep::EntryBarrier(c, op);
  }
  // Waits until peer's flag reaches this call's epoch.
  __device__ static void Wait(const uint64_t* flag, const CommArgs& c, const Flat&, int op,
                              int phase, int peer) {
    WaitFlag(flag, c, op, phase, peer);
  }
};

}  // namespace jax_ep
