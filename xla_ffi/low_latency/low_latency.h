// Low-latency (decode) dispatch/combine kernels: plain CUDA, no XLA types.
//
// Four kernels, each one custom call: dispatch send / receive, combine send / receive. The
// generation of each op lives on the device (comm.h kLL*), so handlers are stateless and CUDA
// graphs can replay them: a send takes generation g = last + 1 and buffer parity p = g & 1,
// returns the ticket (g, p), and its receive checks the ticket is the one in flight on p.
//
// Staging (the low-latency workspace: slots of every source rank s in every receiver's
// workspace, per parity p; M = max tokens):
//   [p * (M + 1) + t]        dispatch: token t of s (metadata, row, FP8 scales); its arrival
//                            flag is (g << 1) | present, raised for every token (absent ones too)
//   [p * (M + 1) + M]        dispatch header: s's counts of the receiver's local experts, one
//                            u64 word each, (g & 0xffffffff) << 32 | count (no flag)
//                            (both s != receiver: a rank's receive casts its own tokens from x
//                            straight into recv_x and computes token_dests / token_sent)
//   [2 * (M + 1) + p * M + t] combine: s's partial sum for token t (s != receiver: a rank's own
//                            partial is summed from y by its receive, never staged), chunked;
//                            each chunk carries its own flag (g) after the row, so warps stream
//                            chunks as they land
// Before a sender overwrites parity p of a peer it waits until that peer has received
// generation g - 2 (the peer's receive writes "consumed" of parity p into the sender's
// workspace; per parity, so the receives of two calls in flight may complete in either order):
// two calls of an op may be in flight; the third waits.
//
// Layout of dispatch: rows of local expert j from source s occupy [begin(j, s), +count(s, j))
// with begin(j, s) = sum of counts of sources < s, in s's (t, k) order: deterministic, equal to
// the reference backend's.
#pragma once

#include "../common/comm.h"

namespace jax_ep {

constexpr int kLLChunk = 512;  // channels per combine chunk: 16 per lane (jax_ep/buffer.py LL_CHUNK)

struct LLDispatchSendArgs {
  const uint16_t* x;           // [T, H] bfloat16 bits
  const int32_t* topk_idx;     // [T, K]
  const float* topk_weights;   // [T, K]
  const int32_t* failed;       // [R] non-zero = skipped rank
  int num_tokens, hidden, num_topk, num_experts, max_tokens;
  bool use_fp8;
  int32_t* ticket;             // [2] (generation, parity)
};

struct LLDispatchRecvArgs {
  const int32_t* ticket;       // [2]
  const uint16_t* x;           // [T, H] the send's inputs: this rank's own tokens are placed
  const int32_t* topk_idx;     // [T, K]   by the receive, straight from x (never staged)
  const float* topk_weights;   // [T, K]
  const int32_t* failed;       // [R]
  int num_tokens, hidden, num_topk, num_experts, max_tokens;
  bool use_fp8;
  uint8_t* recv_x;             // [L, R * M, row bytes] e4m3 or bfloat16
  float* recv_scales;          // [L, R * M, H / 128] or nullptr
  int32_t* recv_count;         // [L]
  int32_t* recv_src;           // [L, R * M] s * M + t, -1 beyond recv_count
  int32_t* recv_range;         // [L, R, 2] (begin, count)
  int32_t* num_dropped;        // []
  int32_t* slot_rows;          // [R, T, K] packed row, -1 not here, -2 dropped
  float* slot_weights;         // [R, T, K]
  int32_t* token_dests;        // [T] bit d: a top-k expert of t lives on rank d
  int32_t* token_sent;         // [T] token_dests minus failed ranks
};

struct LLCombineSendArgs {
  const uint16_t* y;           // [L * R * M, H] bfloat16 bits
  const int32_t* slot_rows;    // [R, T, K]
  const float* slot_weights;   // [R, T, K]
  const int32_t* failed;       // [R]
  int num_tokens, hidden, num_topk, max_tokens;
  int32_t* ticket;             // [2]
};

struct LLCombineRecvArgs {
  const int32_t* ticket;       // [2]
  const uint16_t* y;           // [L * R * M, H] bfloat16 bits: this rank's partials come from here
  const int32_t* slot_rows;    // [R, T, K] (row s = this rank)
  const float* slot_weights;   // [R, T, K]
  const int32_t* token_dests;  // [T]
  const int32_t* token_sent;   // [T]
  const int32_t* failed;       // [R]
  int num_tokens, hidden, num_topk, max_tokens;
  uint16_t* out;               // [T, H] bfloat16 bits
  int32_t* num_missing;        // [T]
};

cudaError_t LaunchLLDispatchSend(const CommArgs& c, const LLDispatchSendArgs& a, cudaStream_t s);
cudaError_t LaunchLLDispatchRecv(const CommArgs& c, const LLDispatchRecvArgs& a, cudaStream_t s);
cudaError_t LaunchLLCombineSend(const CommArgs& c, const LLCombineSendArgs& a, cudaStream_t s);
cudaError_t LaunchLLCombineRecv(const CommArgs& c, const LLCombineRecvArgs& a, cudaStream_t s);
// Both phases as one kernel (the receive's ticket is not read: the generation is the send's).
cudaError_t LaunchLLDispatch(const CommArgs& c, const LLDispatchSendArgs& send,
                             const LLDispatchRecvArgs& recv, cudaStream_t s);
cudaError_t LaunchLLCombine(const CommArgs& c, const LLCombineSendArgs& send,
                            const LLCombineRecvArgs& recv, cudaStream_t s);
cudaError_t PreloadLowLatencyKernels();

// Staging geometry (bytes of the pieces of one slot; see above).
__host__ __device__ inline size_t LLMetaBytes(int num_topk) {  // expert, rank, weight per k
  return (size_t(num_topk) * 12 + 15) / 16 * 16;
}
__host__ __device__ inline size_t LLRowBytes(int hidden, bool use_fp8) {
  return size_t(hidden) * (use_fp8 ? 1 : 2);
}
size_t LLDispatchSlotBytes(int num_topk, int hidden, bool use_fp8);
size_t LLCombineSlotBytes(int hidden);
inline size_t LLSlotsPerRank(int max_tokens) { return 2 * size_t(max_tokens + 1) + 2 * size_t(max_tokens); }

}  // namespace jax_ep
