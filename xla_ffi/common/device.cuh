// Device-side building blocks shared by the kernel families: flags and bounded waits, barriers,
// staging slots, warp-wide copies, the SM split and float32 row sums. Plain CUDA, no XLA types;
// see comm.h for the protocol.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdio>
#include <cstring>

#include "comm.h"

namespace jax_ep {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFull = 0xffffffffu;


// ------------------------------------------------------------------ flags and bounded waits

__device__ __forceinline__ void StoreRelease(uint64_t* p, uint64_t v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ uint64_t LoadAcquire(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

// GPU-scope variants: enough when writer and reader run on the same GPU (a rank's own slots),
// and cheaper than system scope (which peer GPUs need).
__device__ __forceinline__ void StoreReleaseGpu(uint64_t* p, uint64_t v) {
  asm volatile("st.release.gpu.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ uint64_t LoadAcquireGpu(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

// Release / acquire at the scope the peer needs: GPU scope for this rank itself.
__device__ __forceinline__ void StoreReleaseTo(uint64_t* p, uint64_t v, bool local) {
  if (local) {
    StoreReleaseGpu(p, v);
  } else {
    StoreRelease(p, v);
  }
}

__device__ __forceinline__ uint64_t LoadAcquireFrom(const uint64_t* p, bool local) {
  return local ? LoadAcquireGpu(p) : LoadAcquire(p);
}

__device__ __forceinline__ uint64_t GlobalTimerNs() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Records a failure (host-mapped, read by the handlers and Buffer.check), prints it and traps:
// the call fails instead of hanging.
__device__ inline void ReportAndTrap(const CommArgs& c, int op, int phase, int peer,
                                     unsigned long long value) {
  volatile ErrorRecord* e = c.error;
  e->op = op;
  e->rank = c.rank;
  e->peer = peer;
  __threadfence_system();
  e->code = phase;
  __threadfence_system();
  if (IsMisuse(phase)) {
    printf("jax_ep: rank %d, %s: %s (value %llu)\n", c.rank, OpName(op), PhaseName(phase), value);
  } else {
    printf("jax_ep: rank %d timed out in %s (%s) waiting for rank %d (target %llu)\n", c.rank,
           OpName(op), PhaseName(phase), peer, value);
  }
  __trap();
}

// Spins until *flag >= target and returns the value seen; on timeout reports and traps. local:
// the writer runs on this GPU (GPU-scope acquire).
__device__ inline uint64_t WaitAtLeast(const uint64_t* flag, uint64_t target, const CommArgs& c,
                                       int op, int phase, int peer, bool local = false) {
  uint64_t v = LoadAcquireFrom(flag, local);
  if (v >= target) return v;
  const uint64_t start = GlobalTimerNs();
  while ((v = LoadAcquireFrom(flag, local)) < target) {
    if (GlobalTimerNs() - start > c.timeout_ns) ReportAndTrap(c, op, phase, peer, target);
  }
  return v;
}

// Spins until *flag >= epoch (this call's).
__device__ inline void WaitFlag(const uint64_t* flag, const CommArgs& c, int op, int phase, int peer) {
  WaitAtLeast(flag, c.epoch, c, op, phase, peer);
}

__device__ __forceinline__ uint64_t* PeerFlag(const CommArgs& c, int peer, size_t offset,
                                              size_t index) {
  return reinterpret_cast<uint64_t*>(c.peer_ws[peer] + offset) + index;
}

// Every rank announces it entered this epoch (its staging is free), then waits for all peers.
__device__ inline void EntryBarrier(const CommArgs& c, int op) {
  if (blockIdx.x == 0 && threadIdx.x < c.num_ranks) {
    StoreRelease(PeerFlag(c, threadIdx.x, kEntryOffset, c.rank), c.epoch);
  }
  if (threadIdx.x < c.num_ranks) {
    WaitFlag(PeerFlag(c, c.rank, kEntryOffset, threadIdx.x), c, op, kPhaseEntry, threadIdx.x);
  }
  __syncthreads();
}

// This block finished pushing to every peer for this epoch. The barrier orders the block's
// stores before the signalling threads' system-scope fence and release (cumulativity), so one
// fence per peer suffices (a fence in every thread costs tens of microseconds per call).
__device__ inline void SignalSent(const CommArgs& c) {
  __syncthreads();
  if (threadIdx.x < c.num_ranks) {
    __threadfence_system();
    StoreRelease(PeerFlag(c, threadIdx.x, kSentOffset, size_t(c.rank) * kMaxBlocks + blockIdx.x),
                 c.epoch);
  }
}

// Waits until every block of peer `src` has pushed to this rank.
__device__ inline void WaitSentFrom(const CommArgs& c, int op, int src) {
  for (int block = threadIdx.x; block < c.num_blocks; block += blockDim.x) {
    WaitFlag(PeerFlag(c, c.rank, kSentOffset, size_t(src) * kMaxBlocks + block), c, op,
             kPhaseSent, src);
  }
  __syncthreads();
}

// Waits until every block of every peer has pushed to this rank.
__device__ inline void WaitAllSent(const CommArgs& c, int op) {
  for (int q = threadIdx.x; q < c.num_ranks * c.num_blocks; q += blockDim.x) {
    const int src = q / c.num_blocks, block = q % c.num_blocks;
    WaitFlag(PeerFlag(c, c.rank, kSentOffset, size_t(src) * kMaxBlocks + block), c, op,
             kPhaseSent, src);
  }
  __syncthreads();
}

__device__ __forceinline__ uint8_t* Slot(const CommArgs& c, int owner, int src, size_t slot) {
  return c.peer_ws[owner] + c.staging_offset + (size_t(src) * c.slots_per_rank + slot) * c.slot_stride;
}

// ------------------------------------------------------------------ warp-wide row copies

// Copies nbytes (a multiple of sizeof(V); both pointers V-aligned) with kUnroll loads in flight.
// kReadOnly: src is an input of this kernel (read-only cache path); else src is staging that
// peers wrote during this kernel, read past L1 (__ldcg).
template <typename V, bool kReadOnly>
__device__ __forceinline__ void WarpCopy(uint8_t* dst, const uint8_t* src, size_t nbytes, int lane) {
  constexpr int kUnroll = 4;
  const size_t n = nbytes / sizeof(V);
  const V* s = reinterpret_cast<const V*>(src);
  V* d = reinterpret_cast<V*>(dst);
  size_t i = lane;
  for (; i + 32 * (kUnroll - 1) < n; i += 32 * kUnroll) {
    V v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = kReadOnly ? __ldg(s + i + 32 * u) : __ldcg(s + i + 32 * u);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) d[i + 32 * u] = v[u];
  }
  for (; i < n; i += 32) d[i] = kReadOnly ? __ldg(s + i) : __ldcg(s + i);
}

template <typename V>
__device__ __forceinline__ void WarpZero(uint8_t* dst, size_t nbytes, int lane) {
  V* d = reinterpret_cast<V*>(dst);
  V z;
  memset(&z, 0, sizeof(V));
  for (size_t i = lane; i < nbytes / sizeof(V); i += 32) d[i] = z;
}

// Copies the row at src to dst_of(k) for every set bit k of `rows`, reading it once (dst_of
// may shuffle: the loop is warp-uniform). kReadOnly as in WarpCopy.
template <typename V, bool kReadOnly, typename DstOf>
__device__ __forceinline__ void WarpCopyToRows(unsigned rows, DstOf dst_of, const uint8_t* src,
                                               size_t nbytes, int lane) {
  constexpr int kUnroll = 4;
  const size_t n = nbytes / sizeof(V);
  const V* s = reinterpret_cast<const V*>(src);
  for (size_t i0 = 0; i0 < n; i0 += 32 * kUnroll) {
    V v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (i0 + 32 * u + lane < n) v[u] = kReadOnly ? __ldg(s + i0 + 32 * u + lane) : __ldcg(s + i0 + 32 * u + lane);
    }
    for (unsigned m = rows; m; m &= m - 1) {
      V* d = reinterpret_cast<V*>(dst_of(__ffs(m) - 1));
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (i0 + 32 * u + lane < n) d[i0 + 32 * u + lane] = v[u];
      }
    }
  }
}

template <typename T>
__device__ __forceinline__ T LoadStaged(const uint8_t* p, int index) {
  return __ldcg(reinterpret_cast<const T*>(p) + index);
}

// Arrival flag of (source rank src, slot) in rank owner's workspace.
__device__ __forceinline__ uint64_t* SlotFlag(const CommArgs& c, int owner, int src, int slot) {
  return reinterpret_cast<uint64_t*>(c.peer_ws[owner] + c.flags_offset) +
         size_t(src) * c.slots_per_rank + slot;
}

// The SM split of a kernel with receive-only blocks: blocks [0, num_send) send, the rest
// receive. Without receive-only blocks every block sends first and receives after (senders
// never wait on receivers, so this cannot deadlock).
struct Roles {
  bool sender, receiver;
  int swarp, num_swarps, rwarp, num_rwarps;  // this warp's index / warp count in each role
  __device__ explicit Roles(int num_recv_blocks) {
    const int num_send = gridDim.x - num_recv_blocks, warp = threadIdx.x / 32;
    sender = int(blockIdx.x) < num_send;
    receiver = !sender || num_recv_blocks == 0;
    swarp = blockIdx.x * kWarps + warp, num_swarps = num_send * kWarps;
    rwarp = (num_recv_blocks ? blockIdx.x - num_send : blockIdx.x) * kWarps + warp;
    num_rwarps = (num_recv_blocks ? num_recv_blocks : gridDim.x) * kWarps;
  }
};

// ------------------------------------------------------------------ combine family

template <typename E> __device__ __forceinline__ float ToF32(E v);
template <> __device__ __forceinline__ float ToF32<float>(float v) { return v; }
template <> __device__ __forceinline__ float ToF32<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <> __device__ __forceinline__ float ToF32<__half>(__half v) { return __half2float(v); }
template <typename E> __device__ __forceinline__ E FromF32(float v);
template <> __device__ __forceinline__ float FromF32<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 FromF32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ __half FromF32<__half>(float v) { return __float2half_rn(v); }

// kPack elements move as one 16-byte access when rows allow it, else one at a time.
template <typename E, int kPack>
struct alignas(sizeof(E) * kPack) Pack {  // aligned: one 16-byte access, not kPack small ones
  E v[kPack];
};

// kPack elements read past L1 (peers or this kernel wrote them, or they live on a peer).
template <typename E, int kPack>
__device__ __forceinline__ Pack<E, kPack> LoadStagedPack(const E* p) {
  Pack<E, kPack> pk;
  if constexpr (sizeof(pk) == 16) {
    const int4 raw = __ldcg(reinterpret_cast<const int4*>(p));
    memcpy(&pk, &raw, 16);
  } else {
#pragma unroll
    for (int u = 0; u < kPack; ++u) pk.v[u] = __ldcg(p + u);
  }
  return pk;
}

// acc += w * pk, element-wise in float32 (explicit roundings: the order is the contract).
template <typename E, int kPack>
__device__ __forceinline__ void Accumulate(float (&acc)[kPack], float w, const Pack<E, kPack>& pk) {
#pragma unroll
  for (int q = 0; q < kPack; ++q) acc[q] = __fadd_rn(acc[q], __fmul_rn(w, ToF32(pk.v[q])));
}

template <typename E, int kPack>
__device__ __forceinline__ void StoreF32(E* p, const float (&f)[kPack]) {
  Pack<E, kPack> pk;
#pragma unroll
  for (int u = 0; u < kPack; ++u) pk.v[u] = FromF32<E>(f[u]);
  *reinterpret_cast<Pack<E, kPack>*>(p) = pk;
}

// out[0, width) = sum over the set bits i of `from`, in increasing order, of
// weight_of(i) * row_of(i)[0, width), in float32 (kU packs in flight per lane; a weight of 1
// is exact). Rows are read past L1: peers or this kernel wrote them, or they live on a peer.
template <typename E, int kPack, bool kPairs, typename RowOf, typename WeightOf>
__device__ __forceinline__ void SumRows(unsigned from, RowOf row_of, WeightOf weight_of, int width,
                                        E* out, int lane) {
  constexpr int kU = 4;
  using P = Pack<E, kPack>;
  for (int e0 = 0; e0 < width; e0 += 32 * kPack * kU) {  // warp-uniform: row_of may shuffle
    float acc[kU][kPack];
#pragma unroll
    for (int u = 0; u < kU; ++u)
#pragma unroll
      for (int q = 0; q < kPack; ++q) acc[u][q] = 0.f;
    // kPairs: two terms at a time, both rows' loads in flight before either is added (in order);
    // it needs registers a kernel may not have to spare (ReturnKernel spilled and slowed down).
    for (unsigned m = from; m;) {
      const int i0 = __ffs(m) - 1;
      m &= m - 1;
      const bool two = kPairs && m != 0;
      const int i1 = two ? __ffs(m) - 1 : i0;
      if (two) m &= m - 1;
      const E* row0 = row_of(i0);
      const E* row1 = row_of(i1);
      const float w0 = weight_of(i0), w1 = weight_of(i1);
      P p0[kU], p1[kU];
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int e = e0 + (u * 32 + lane) * kPack;
        if (e < width) {
          p0[u] = LoadStagedPack<E, kPack>(row0 + e);
          if (two) p1[u] = LoadStagedPack<E, kPack>(row1 + e);
        }
      }
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        if (e0 + (u * 32 + lane) * kPack >= width) continue;
        Accumulate<E, kPack>(acc[u], w0, p0[u]);
        if (two) Accumulate<E, kPack>(acc[u], w1, p1[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int e = e0 + (u * 32 + lane) * kPack;
      if (e < width) StoreF32<E, kPack>(out + e, acc[u]);
    }
  }
}

// ------------------------------------------------------------------ launch helpers

inline int VecBytes(size_t row_bytes) {
  return row_bytes % 16 == 0 ? 16 : row_bytes % 8 == 0 ? 8 : row_bytes % 4 == 0 ? 4
         : row_bytes % 2 == 0 ? 2 : 1;
}

// Runs Launch<V> with the widest vector type (16..1 bytes) that divides the row size.
template <template <typename> class Launch, typename Args>
cudaError_t ByRowVector(size_t row_bytes, const CommArgs& c, const Args& a, cudaStream_t stream) {
  switch (VecBytes(row_bytes)) {
    case 16: return Launch<int4>::Run(c, a, stream);
    case 8: return Launch<int2>::Run(c, a, stream);
    case 4: return Launch<int>::Run(c, a, stream);
    case 2: return Launch<short>::Run(c, a, stream);
    default: return Launch<char>::Run(c, a, stream);
  }
}

// Calls Kernels<V>::Load(err) for every vector type ByRowVector may pick.
template <template <typename> class Kernels>
void LoadForEachRowVector(cudaError_t& err) {
  Kernels<int4>::Load(err), Kernels<int2>::Load(err), Kernels<int>::Load(err);
  Kernels<short>::Load(err), Kernels<char>::Load(err);
}

// Keeps the first error of loading kernels on the current device (cudaFuncGetAttributes loads).
template <typename Kernel>
void Touch(cudaError_t& err, Kernel kernel) {
  cudaFuncAttributes attr;
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, kernel);
}


}  // namespace jax_ep
