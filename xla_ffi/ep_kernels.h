// Intranode (NVLink) dispatch/combine kernels: plain CUDA, no XLA types.
//
// One process drives every GPU of the EP group. Each rank owns a workspace (cudaMalloc'ed at
// Buffer creation, peer access enabled): a signal area peers write flags, counts and pointers
// into, one arrival flag per (source rank, slot), and a staging area of [num_ranks][slots] slots.
// A call is one epoch: entry barrier (peers finished the previous call, so staging is free) ->
// [dispatch: every rank's routing counts and output pointers to every peer] -> data -> bounded
// waits for what this rank needs. The two dispatch layouts and combine move data like this:
//   token layout   senders write each row straight into the receivers' outputs at its final
//                  row (the counts of all ranks give every sender its offsets), then per-block
//                  "sent" flags; receivers only do bookkeeping.
//   expert layout  senders write the row once per destination, at the row of its first expert
//                  there, plus the routing metadata into the receiver's staging slot, and raise
//                  that slot's arrival flag; the receiver's own blocks (an SM split) expand the
//                  row into its other experts' rows while the rest is still arriving.
//   combine        token layout: every rank pulls its tokens' rows from the peers' expert
//                  outputs and sums them (no staging), then an exit barrier keeps each rank's
//                  inputs alive until all peers have read them. Expert layout: every rank pushes
//                  one weighted partial row per received slot into the source's staging and
//                  raises that slot's arrival flag; the source sums each token's partials over
//                  ranks as soon as they have landed.
// Peer-written XLA buffers need XLA's default allocator (cudaMalloc'ed arenas, reachable once
// peer access is enabled here). Every wait is bounded: on timeout the kernel records
// rank/phase/peer in host-mapped memory, prints it and traps, so the process fails instead of
// hanging.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace jax_ep {

constexpr int kMaxRanks = 16;
constexpr int kMaxBlocks = 256;
constexpr int kMaxLocalExperts = 1024;
constexpr int kMaxExperts = 4096;
constexpr int kMaxTopk = 32;
constexpr int kCountStride = kMaxRanks + kMaxExperts;  // [tokens per rank..., per expert...]
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
constexpr size_t kSignalBytes = (kPullOffset + 8ull * 2 * kMaxRanks * 2 + 255) / 256 * 256;
static_assert(kSignalBytes == 329984, "keep jax_ep/buffer.py SIGNAL_BYTES in sync");

// Phases named in timeout reports.
enum Phase : int { kPhaseEntry = 1, kPhaseSent = 2, kPhaseCounts = 3, kPhaseDone = 4 };
enum Op : int { kOpDispatch = 1, kOpCombine = 2, kOpBroadcast = 3, kOpPeerCopy = 4 };

// Names in timeout reports: the kernel's printf and the host's error message.
__host__ __device__ inline const char* PhaseName(int phase) {
  return phase == kPhaseEntry ? "entry barrier"
         : phase == kPhaseCounts ? "waiting for peer counts"
         : phase == kPhaseDone ? "exit barrier: peer still reading" : "waiting for peer data";
}

__host__ __device__ inline const char* OpName(int op) {
  return op == kOpDispatch ? "dispatch" : op == kOpCombine ? "combine"
         : op == kOpBroadcast ? "broadcast" : "peer copy";
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
};

// Dispatch: push tokens (rows of x, FP8 scales, routing metadata) to the ranks of their experts,
// then lay them out in the token or expert layout (see docs/api.md).
struct DispatchArgs {
  const uint8_t* x;           // [T, x_row_bytes]
  size_t x_row_bytes;
  const float* scales;        // [T, num_scales] or nullptr
  int num_scales;
  const int32_t* topk_idx;    // [T, K]
  const float* topk_weights;  // [T, K]
  const int32_t* pos_in_src;  // [T, K] rank of slot (t, k) among this rank's slots of its expert
  const int32_t* send_pos;    // [T, R] slot in the block for rank d, -1 if not sent
  const int32_t* tokens_per_rank;    // [R]
  const int32_t* tokens_per_expert;  // [E]
  int num_tokens, num_topk, num_experts, num_local_experts;
  int recv_capacity, expert_alignment, send_capacity;
  bool expert_layout;
  int num_recv_blocks;        // expert layout: blocks that only receive (the SM split)
  // Outputs (recv_capacity rows C; S = send_capacity).
  uint8_t* recv_x;            // [C, x_row_bytes]
  float* recv_scales;         // [C, num_scales] or nullptr
  int32_t* recv_topk_idx;     // token [C, K] / expert [C]
  float* recv_topk_weights;   // token [C, K] / expert [C]
  int32_t* group_sizes;       // [E_local] (expert layout) or nullptr
  int32_t* num_recv_rows;     // []
  int32_t* num_tokens_per_expert;  // [E_local], zeroed by the launcher
  int32_t* num_dropped;       // []
  int32_t* recv_rows;         // token [R, S] / expert [R, S, K]
  int32_t* row_src;           // [C]
  int32_t* recv_count;        // [R] tokens each source routed here
};

// Combine family: every rank produces one value row per received slot for the slot's source,
// which sums the rows over ranks in rank order in float32. kReturnRows pulls the rows from the
// peers; the other modes push them into the source's staging.
enum ReturnMode : int {
  kReturnRows = 0,      // value = y[recv_rows[s, i]] = y[first row of s + i] (token layout)
  kReturnWeighted = 1,  // value = sum_k w[row_k] * y[row_k] (w = 1 if null) (expert layout)
  kReturnGatherK = 2,   // value[k] = y[row_k] for scalar rows y [C]     (expert layout weights)
};
enum ElemType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

struct ReturnArgs {
  const void* y;              // [C, width] elem
  int width;                  // elements per row (H, or K for kGatherK outputs)
  ElemType elem;
  ReturnMode mode;
  const int32_t* recv_rows;   // token [R, S] / expert [R, S, K]
  const int32_t* recv_count;  // [R]
  const float* row_weights;   // [C] or nullptr
  const int32_t* send_pos;    // [T, R]
  void* out;                  // [T, width] elem (kGatherK: float [T, K])
  int num_tokens, num_topk, recv_capacity, send_capacity;
};

// Broadcast (combine's backward): rows[p] = values[token of row p], cached layout.
struct BroadcastArgs {
  const uint8_t* values;      // [T, row_bytes]
  size_t row_bytes;
  const int32_t* send_pos;    // [T, R]
  const int32_t* row_src;     // [C]
  uint8_t* rows;              // [C, row_bytes]
  int num_tokens, recv_capacity, send_capacity;
};

// The NVLink ceiling the benchmarks compare against: rank r pushes block d of `src` into rank
// d's staging (no layout work), with every SM; local blocks are skipped unless include_self.
struct PeerCopyArgs {
  const uint8_t* src;   // [R, block_bytes]
  size_t block_bytes;   // multiple of 16
  bool include_self;
  int32_t* done;        // [] set to 1 (gives XLA a result to keep)
};

// Launchers return the launch error (cudaSuccess when queued).
cudaError_t LaunchDispatch(const CommArgs& comm, const DispatchArgs& args, cudaStream_t stream);
cudaError_t LaunchReturn(const CommArgs& comm, const ReturnArgs& args, cudaStream_t stream);
cudaError_t LaunchBroadcast(const CommArgs& comm, const BroadcastArgs& args, cudaStream_t stream);
// Local: ranks[t * K + k] = rank of slot (t, k) among the slots naming the same expert, in
// (t, k) order; -1 for entries outside [0, num_experts). ranks: [T, K] int32.
cudaError_t LaunchSlotRanks(const int32_t* topk_idx, int num_slots, int num_experts,
                            int32_t* ranks, cudaStream_t stream);
cudaError_t LaunchPeerCopy(const CommArgs& comm, const PeerCopyArgs& args, cudaStream_t stream);

// Loads every kernel on the current device: lazy loading would take a driver lock inside a
// handler while peers spin.
cudaError_t PreloadKernels();

// Bytes of one staging slot for each op (16-byte aligned pieces).
size_t DispatchSlotBytes(int num_topk);
size_t ReturnSlotBytes(int width, ElemType elem, ReturnMode mode, int num_topk);

}  // namespace jax_ep
