// The NVLink ceiling the benchmarks compare against (see PeerCopyArgs in intranode.h).
#include "../common/device.cuh"
#include "intranode.h"

namespace jax_ep {
namespace {

// ------------------------------------------------------------------ NVLink ceiling

__global__ void __launch_bounds__(kThreads, 1) PeerCopyKernel(CommArgs c, PeerCopyArgs a) {
  EntryBarrier(c, kOpPeerCopy);
  // Chunks of 2 KiB per warp (4 16-byte loads in flight per lane), interleaved over the
  // destinations so every link stays busy (benchmarks/nvlink_probe.cu measured the variants).
  constexpr int kChunk = 2048;
  const size_t chunks = a.block_bytes / kChunk, tail = a.block_bytes % kChunk;
  const int gwarp = blockIdx.x * kWarps + threadIdx.x / 32, num_gwarps = gridDim.x * kWarps;
  const int lane = threadIdx.x % 32;
  // Only the destinations actually copied take turns (skipping one inside the loop would idle
  // every warp whose index has its parity).
  const int num_dst = a.include_self ? c.num_ranks : c.num_ranks - 1;
  for (size_t q = gwarp; q < chunks * num_dst; q += num_gwarps) {
    const int d = a.include_self ? int(q % num_dst) : (c.rank + 1 + int(q % num_dst)) % c.num_ranks;
    const size_t off = (q / num_dst) * kChunk + lane * 16;
    const int4* src = reinterpret_cast<const int4*>(a.src + d * a.block_bytes + off);
    int4* dst = reinterpret_cast<int4*>(Slot(c, d, c.rank, 0) + off);
    int4 v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) v[u] = __ldg(src + u * 32);
#pragma unroll
    for (int u = 0; u < 4; ++u) dst[u * 32] = v[u];
  }
  if (tail && gwarp < c.num_ranks && (gwarp != c.rank || a.include_self)) {
    const size_t base = chunks * kChunk;
    WarpCopy<int4, true>(Slot(c, gwarp, c.rank, 0) + base, a.src + gwarp * a.block_bytes + base,
                         tail, lane);
  }
  SignalSent(c);
  WaitAllSent(c, kOpPeerCopy);
  if (blockIdx.x == 0 && threadIdx.x == 0) *a.done = 1;
}

}  // namespace

cudaError_t LaunchPeerCopy(const CommArgs& c, const PeerCopyArgs& a, cudaStream_t stream) {
  PeerCopyKernel<<<c.num_blocks, kThreads, 0, stream>>>(c, a);
  return cudaGetLastError();
}

cudaError_t PreloadPeerCopyKernel() {
  cudaError_t err = cudaSuccess;
  Touch(err, PeerCopyKernel);
  return err;
}

}  // namespace jax_ep
