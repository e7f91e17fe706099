// The communication contract every kernel family shares: limits, the signal area at the head of
// every rank's workspace, the phases named in timeout reports, and CommArgs, a kernel's view of
// its EP group. Plain CUDA, no XLA types.
//
// Each rank owns a workspace, reachable from every peer by loads and stores (P2P pointers in one
// process, nvshmem_ptr across processes): a signal area peers write flags, counts and pointers
// into, one arrival flag per (source rank, slot), and a staging area of [num_ranks][slots] slots.
// A call is one epoch: entry barrier (peers finished the previous call, so staging is free) ->
// data -> bounded waits for what this rank needs. Every wait is bounded: on timeout the kernel
// records rank/phase/peer in host-mapped memory, prints it and traps, so the process fails
// instead of hanging.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace jax_ep {

__host__ __device__ constexpr size_t Align16(size_t v) { return (v + 15) / 16 * 16; }

constexpr int kMaxRanks = 32;
constexpr int kMaxBlocks = 256;
constexpr int kMaxLocalExperts = 1024;
constexpr int kMaxExperts = 4096;
constexpr int kMaxTopk = 32;
// A rank's routing counts: [tokens per rank (kMaxRanks) | per node (kMaxRanks) | per expert].
constexpr int kCountNodes = kMaxRanks;        // column of node 0 (internode kernels only)
constexpr int kCountExperts = 2 * kMaxRanks;  // column of expert 0
constexpr int kCountStride = kCountExperts + kMaxExperts;
constexpr int kNumPtrs = 4;  // dispatch outputs peers write into: recv_x, scales, topk idx, weights

// Byte offsets inside every rank's workspace (identical on all ranks).
constexpr size_t kEntryOffset = 0;                                          // u64 [kMaxRanks]
constexpr size_t kCountsFlagOffset = 128;                                   // u64 [kMaxRanks]
constexpr size_t kSentOffset = 256;                                         // u64 [R][kMaxBlocks]
constexpr size_t kDoneOffset = kSentOffset + 8ull * kMaxRanks * kMaxBlocks;  // u64 [R][kMaxBlocks]
// Routing counts of every source rank (all of its tokens per rank and per expert).
constexpr size_t kCountsOffset = kDoneOffset + 8ull * kMaxRanks * kMaxBlocks;  // i32 [R][stride]
constexpr size_t kPtrOffset = kCountsOffset + 4ull * kMaxRanks * kCountStride;  // u64 [R][kNumPtrs]
// Combine pull: per epoch parity, every peer's (rows pointer, first row of my tokens there).
constexpr size_t kPullOffset = kPtrOffset + 8ull * kMaxRanks * kNumPtrs;  // u64 [2][R][2]
// Low-latency mode (low_latency/): device-side generations, so that handlers stay stateless
// and CUDA graphs can replay them. Per op (0 dispatch, 1 combine): the last generation sent,
// the generation in flight on each buffer parity (0 = none), a block-completion counter per
// kernel (send, receive), and, written by peers, the last generation each peer has received.
constexpr size_t kLLOffset = kPullOffset + 8ull * 2 * kMaxRanks * 2;
constexpr size_t kLLGenOffset = kLLOffset;                     // u64 [2]
constexpr size_t kLLInflightOffset = kLLGenOffset + 8 * 2;     // u64 [2 ops][2 parities]
constexpr size_t kLLDoneOffset = kLLInflightOffset + 8 * 4;    // u32 [2 ops][2 phases], u64 apart
// Per parity: receives of one op may complete out of order (two in flight), so "consumed" is
// kept per parity, never one running maximum.
constexpr size_t kLLConsumedOffset = kLLDoneOffset + 8 * 4;    // u64 [2 ops][2 parities][kMaxRanks]
constexpr size_t kSignalBytes = (kLLConsumedOffset + 8ull * 4 * kMaxRanks + 255) / 256 * 256;
static_assert(kSignalBytes == 667136, "keep jax_ep/_ffi.py SIGNAL_BYTES in sync");

// Phases named in timeout reports.
enum Phase : int {
  kPhaseEntry = 1, kPhaseSent = 2, kPhaseCounts = 3, kPhaseDone = 4,
  kPhaseFree = 5,      // low latency: waiting for a peer to receive the previous call on a parity
  kPhaseNoSend = 6,    // misuse: a receive whose ticket is not in flight
  kPhaseBusy = 7,      // misuse: a send onto a parity whose previous send was not received
  kPhaseNetwork = 8,   // internode: waiting for a message from a peer of another node
};
enum Op : int {
  kOpDispatch = 1, kOpCombine = 2, kOpBroadcast = 3, kOpPeerCopy = 4,
  kOpLLDispatch = 5, kOpLLCombine = 6,
};

__host__ __device__ inline bool IsMisuse(int phase) {
  return phase == kPhaseNoSend || phase == kPhaseBusy;
}

// Names in timeout reports: the kernel's printf and the host's error message.
__host__ __device__ inline const char* PhaseName(int phase) {
  return phase == kPhaseEntry ? "entry barrier"
         : phase == kPhaseCounts ? "waiting for peer counts"
         : phase == kPhaseDone ? "exit barrier: peer still reading"
         : phase == kPhaseFree ? "waiting for the peer to receive the previous call on this buffer"
         : phase == kPhaseNoSend ? "receive without its send: the ticket's generation is not in flight"
         : phase == kPhaseBusy ? "send while the previous send on this buffer parity was not received"
         : phase == kPhaseNetwork ? "waiting for a message over the network"
         : "waiting for peer data";
}

__host__ __device__ inline const char* OpName(int op) {
  return op == kOpDispatch ? "dispatch" : op == kOpCombine ? "combine"
         : op == kOpBroadcast ? "broadcast" : op == kOpPeerCopy ? "peer copy"
         : op == kOpLLDispatch ? "low-latency dispatch" : "low-latency combine";
}

struct ErrorRecord {  // host-mapped; written by a kernel that timed out
  int32_t code;       // 0 = fine, else Phase
  int32_t op;
  int32_t rank;
  int32_t peer;
};

struct CommArgs {
  uint8_t* peer_ws[kMaxRanks];  // every rank's workspace base (peer-accessible)
  size_t flags_offset;      // u64 [R][slots_per_rank] arrival flags, after the signal area
  size_t staging_offset;    // staging slots, after the flags
  int rank;
  int num_ranks;
  uint64_t epoch;           // strictly increasing per call, equal on every rank
  uint64_t timeout_ns;      // bound of every wait
  size_t slots_per_rank;    // staging slots reserved per source rank
  size_t slot_stride;       // bytes per staging slot (this call)
  ErrorRecord* error;       // host-mapped
  int num_blocks;           // grid size (same on every rank)
  // Peers cannot address this rank's XLA buffers (they live in another process): every row
  // travels through the workspaces, which the transport maps for all ranks.
  bool staged;
};

// The nodes of an EP group, for the internode kernels (internode/): ranks [n * G, (n + 1) * G)
// form node n. Inside a node ranks use loads and stores (CommArgs::peer_ws; null for the ranks
// of other nodes); across nodes a rank talks only to the ranks with its local index, through
// NVSHMEM puts with signals into per-node message slots of its own workspace (symmetric memory:
// the same offsets on every rank, so a local address names the peer's slot too).
struct NodeComm {
  int pes[kMaxRanks];     // NVSHMEM PE of every rank
  int ranks_per_node;     // G
  int num_nodes;          // N = R / G
  size_t signals_offset;  // u64 [N][slots]: arrival signal of each message slot, by source node
  size_t recv_offset;     // [N][slots] messages, by source node
  size_t send_offset;     // [N][slots] messages, by destination node (puts read symmetric memory)
  size_t slots;           // message slots per node (= slots_per_rank)
  size_t message_stride;  // bytes per message slot (this call)
};

}  // namespace jax_ep
