// NvshmemNet: the transport policy of the internode kernels (see common/nodes.cuh for DirectNet,
// the single-node one). Inside a node: loads and stores, as the intranode kernels. Across nodes,
// public NVSHMEM device calls only: nvshmemx_putmem_signal_nbi_warp (a message and its arrival
// signal), nvshmemx_signal_op (barrier flags), nvshmem_uint64_wait_until on a signal word after
// our own bounded poll has seen the value (it returns at once, after the consistency step the
// transport needs before the message is read; nvshmem_signal_wait_until skips that step in
// NVSHMEM 3.4), nvshmem_quiet. Compiled only into the NVSHMEM extension (separable
// compilation, device-linked with libnvshmem_device.a).
// Not bounded by the Buffer's timeout: a put whose queue is full and nvshmem_quiet wait inside
// NVSHMEM (a dead peer or link then stalls until the transport's own retry limit).
#pragma once

#include <nvshmem.h>
#include <nvshmemx.h>

#include "../common/nodes.cuh"

namespace jax_ep {

struct NvshmemNet {
  static constexpr bool kInternode = true;
  using Nodes = NodeComm;

  // Whether rank d shares this rank's node (reached by loads and stores).
  __device__ static bool Near(const NodeComm& n, int rank, int d) {
    return d / n.ranks_per_node == rank / n.ranks_per_node;
  }

  // Bounded wait for a signal a peer of another node set with a put or a signal op.
  __device__ static void WaitSignal(const uint64_t* signal, const CommArgs& c, int op, int phase,
                                    int peer) {
    WaitAtLeast(signal, c.epoch, c, op, phase, peer);
    nvshmem_uint64_wait_until(const_cast<uint64_t*>(signal), NVSHMEM_CMP_GE, c.epoch);
  }

  // Waits until peer's flag reaches this call's epoch (stored by a peer of my node, or signalled
  // by one of another node).
  __device__ static void Wait(const uint64_t* flag, const CommArgs& c, const NodeComm& n, int op,
                              int phase, int peer) {
    if (Near(n, c.rank, peer)) {
      WaitFlag(flag, c, op, phase, peer);
    } else {
      WaitSignal(flag, c, op, phase, peer);
    }
  }

  __device__ static void WaitMessage(const uint64_t* signal, const CommArgs& c, const NodeComm&,
                                     int op, int peer) {
    WaitSignal(signal, c, op, kPhaseNetwork, peer);
  }

  // EntryBarrier (device.cuh) across nodes: every rank announces it entered this epoch.
  __device__ static void EntryBarrier(const CommArgs& c, const NodeComm& n, int op) {
    if (blockIdx.x == 0 && threadIdx.x < c.num_ranks) {
      const int d = threadIdx.x;
      uint64_t* mine = PeerFlag(c, c.rank, kEntryOffset, c.rank);  // symmetric: names d's word
      if (Near(n, c.rank, d)) {
        StoreRelease(PeerFlag(c, d, kEntryOffset, c.rank), c.epoch);
      } else {
        nvshmemx_signal_op(mine, c.epoch, NVSHMEM_SIGNAL_SET, n.pes[d]);
      }
    }
    if (threadIdx.x < c.num_ranks) {
      Wait(PeerFlag(c, c.rank, kEntryOffset, threadIdx.x), c, n, op, kPhaseEntry, threadIdx.x);
    }
    __syncthreads();
  }

  // Block 0, after my counts row is complete in my own workspace (__syncthreads): one put of
  // its first `bytes` to every rank of the other nodes, with the counts flag as its signal.
  __device__ static void PutCounts(const CommArgs& c, const NodeComm& n, size_t bytes) {
    uint8_t* row = c.peer_ws[c.rank] + kCountsOffset + size_t(c.rank) * kCountStride * 4;
    uint64_t* flag = PeerFlag(c, c.rank, kCountsFlagOffset, c.rank);
    __threadfence_system();  // the row's stores are visible to a NIC reading it
    for (int d = threadIdx.x / 32; d < c.num_ranks; d += kWarps) {
      if (!Near(n, c.rank, d)) {
        nvshmemx_putmem_signal_nbi_warp(row, row, bytes, flag, c.epoch, NVSHMEM_SIGNAL_SET,
                                        n.pes[d]);
      }
    }
  }

  // Warp-collective: `bytes` from my send slot `src` into peer's receive slot `dst` (both named
  // by local symmetric addresses), then its arrival signal set to this call's epoch. Every lane
  // fences its stores into the send slot first: a NIC reads it by DMA (NVSHMEM's own submit
  // path fences at GPU scope only).
  __device__ static void PutMessage(const CommArgs& c, const NodeComm& n, int peer,
                                    const uint8_t* src, uint8_t* dst, uint64_t* signal,
                                    size_t bytes) {
    __threadfence_system();
    __syncwarp();
    nvshmemx_putmem_signal_nbi_warp(dst, src, bytes, signal, c.epoch, NVSHMEM_SIGNAL_SET,
                                    n.pes[peer]);
  }

  // Completes this rank's puts (their send slots are reused by the next call).
  __device__ static void Quiet() {
    __syncwarp();
    if (threadIdx.x % 32 == 0) nvshmem_quiet();
  }
};

}  // namespace jax_ep
