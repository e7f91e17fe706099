// Intranode dispatch/combine kernels (the NVLink/P2P family): plain CUDA, no XLA types.
//
// The protocol (common/comm.h): entry barrier -> [dispatch: every rank's routing counts (and, when
// peers can address XLA buffers, its output pointers) to every peer] -> data -> bounded waits.
// How the ops move data, with direct peer access (one process drives every GPU):
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
// Staged (CommArgs::staged: peers live in other processes and reach only the workspaces):
//   dispatch       both layouts: the sender writes metadata + row + scales into the receiver's
//                  staging slot and raises its arrival flag; the receiver's blocks (the SM split)
//                  copy each slot into its output rows as it lands.
//   combine        token layout too pushes (one row per received slot into the source's staging).
// Peer-written XLA buffers need XLA's default allocator (cudaMalloc'ed arenas, reachable once
// peer access is enabled).
#pragma once

#include "../common/comm.h"

namespace jax_ep {

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
  int num_recv_blocks;        // blocks that only receive (the SM split; expert layout or staged)
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
  // Internode kernels only (N nodes of G ranks; see internode/internode.h), else null.
  const int32_t* node_pos;         // [T, N] message slot of token t to node n, -1 if none
  const int32_t* tokens_per_node;  // [N] messages to each node
  int32_t* fwd_slots;              // [N, T, G] out: forward slots of each message I forwarded
  int32_t* node_recv_count;        // [N] out: messages I forwarded from each node
};

// Combine family: every rank produces one value row per received slot for the slot's source,
// which sums the rows over ranks in rank order in float32. kReturnRows pulls the rows from the
// peers (pushes them when staged); the other modes push them into the source's staging.
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
  // Internode kernels only (the dispatch handle's; see DispatchArgs), else null.
  const int32_t* node_pos;         // [T, N]
  const int32_t* fwd_slots;        // [N, T, G]
  const int32_t* node_recv_count;  // [N]
};

// Broadcast (combine's backward): rows[p] = values[token of row p], cached layout.
struct BroadcastArgs {
  const uint8_t* values;      // [T, row_bytes]
  size_t row_bytes;
  const int32_t* send_pos;    // [T, R]
  const int32_t* row_src;     // [C]
  uint8_t* rows;              // [C, row_bytes]
  int num_tokens, recv_capacity, send_capacity;
  // Internode kernels only (the dispatch handle's; see DispatchArgs), else null.
  const int32_t* node_pos;         // [T, N]
  const int32_t* fwd_slots;        // [N, T, G]
  const int32_t* node_recv_count;  // [N]
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

// Loads this family's kernels on the current device (runtime/preload.cc loads every family).
cudaError_t PreloadIntranodeKernels();
// Per kernel file; PreloadIntranodeKernels calls them all.
cudaError_t PreloadDispatchKernels();
cudaError_t PreloadCombineKernels();
cudaError_t PreloadPeerCopyKernel();

// Staging slot of a dispatch: one token's routing metadata [topk idx | topk weights |
// pos_in_src] (K entries each) and, when staged, its row and scales (direct: the row goes straight
// to the receiver's output and the slot is used by the expert layout only).
// A message of the internode network leg is a staged slot followed by the slot the token takes
// at each rank of the destination node ([G] int32 at `bytes`, -1: not there).
struct DispatchSlot {
  size_t idx_off, w_off, pos_off, row_off, scales_off, bytes;
  __host__ __device__ DispatchSlot(int num_topk, size_t row_bytes, int num_scales, bool staged)
      : idx_off(0), w_off(size_t(num_topk) * 4), pos_off(size_t(num_topk) * 8),
        row_off(Align16(size_t(num_topk) * 12)), scales_off(row_off + Align16(row_bytes)),
        bytes(staged ? scales_off + Align16(size_t(num_scales) * 4) : row_off) {}
  __host__ __device__ size_t message_bytes(int ranks_per_node) const {
    return bytes + Align16(size_t(ranks_per_node) * 4);
  }
};

// Bytes of one staging slot for each op (16-byte aligned pieces). A staged dispatch slot also
// carries the row and its scales.
inline size_t DispatchSlotBytes(int num_topk, size_t row_bytes, int num_scales, bool staged) {
  return DispatchSlot(num_topk, row_bytes, num_scales, staged).bytes;
}

inline size_t ReturnSlotBytes(int width, ElemType elem, ReturnMode mode, int num_topk) {
  if (mode == kReturnGatherK) return Align16(size_t(num_topk) * 4);
  const size_t item = elem == kF32 ? 4 : 2;
  return Align16(size_t(width) * item);
}

}  // namespace jax_ep
