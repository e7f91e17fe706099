// NVLink copy probe: how fast can SMs move bytes between the GPUs of this host, and how?
// Standalone (no JAX): every GPU moves `bytes_per_peer` to (push) or from (pull) every other GPU
// at the same time, like an all-to-all. Modes:
//   st    SIMT 16-byte loads from local memory, stores to the peer (push)
//   ld    SIMT 16-byte loads from the peer, stores to local memory (pull)
//   tma   one thread per block: cp.async.bulk peer -> shared -> local (pull), multi-stage
//   tmap  the same, local -> shared -> peer (push)
// Prints per-GPU outgoing (push) / incoming (pull) GB/s of remote bytes, median of 20 runs.
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a benchmarks/nvlink_probe.cu -o probe
//   ./probe [bytes_per_peer_MB=58]
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "harness.h"

constexpr int kMaxGpus = 8;
struct Peers {
  char* buf[kMaxGpus];  // every GPU's buffer: [num_gpus][bytes] source area then same for dest
};

// Chunk q of the all-peers job goes to peer (me + 1 + q % num_peers) % num_gpus: consecutive
// chunks alternate between peers so every link stays busy.
__global__ void SimtKernel(Peers p, int me, int num_gpus, size_t bytes, bool pull, int unroll4) {
  const size_t per_warp = 512 * (unroll4 ? 4 : 1);
  const size_t chunks = bytes / per_warp;
  const int lane = threadIdx.x % 32;
  const size_t gwarp = (blockIdx.x * size_t(blockDim.x) + threadIdx.x) / 32;
  const size_t num_warps = size_t(gridDim.x) * blockDim.x / 32;
  const int num_peers = num_gpus - 1;
  for (size_t q = gwarp; q < chunks * num_peers; q += num_warps) {
    const int peer = (me + 1 + int(q % num_peers)) % num_gpus;
    const size_t off = (q / num_peers) * per_warp + lane * 16;
    // push: my src area [peer] -> peer's dst area [me];  pull: peer's src [me] -> my dst [peer]
    const char* src = pull ? p.buf[peer] + me * bytes : p.buf[me] + peer * bytes;
    char* dst = pull ? p.buf[me] + (num_gpus + peer) * bytes : p.buf[peer] + (num_gpus + me) * bytes;
    int4 v[4];
    const int n = unroll4 ? 4 : 1;
#pragma unroll
    for (int u = 0; u < 4; ++u)
      if (u < n) v[u] = __ldcg(reinterpret_cast<const int4*>(src + off + u * 512));
#pragma unroll
    for (int u = 0; u < 4; ++u)
      if (u < n) *reinterpret_cast<int4*>(dst + off + u * 512) = v[u];
  }
}

__device__ __forceinline__ unsigned SmemAddr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// One thread per block drives a ring of kStages shared-memory stages with bulk copies.
template <int kStages>
__global__ void TmaKernel(Peers p, int me, int num_gpus, size_t bytes, bool pull, int chunk) {
  extern __shared__ __align__(128) char smem[];
  __shared__ __align__(8) unsigned long long bar[kStages];
  if (threadIdx.x != 0) return;
  const int num_peers = num_gpus - 1;
  const size_t chunks = bytes / chunk, total = chunks * num_peers;
  auto src_of = [&](size_t q) {
    const int peer = (me + 1 + int(q % num_peers)) % num_gpus;
    const size_t off = (q / num_peers) * chunk;
    return (pull ? p.buf[peer] + me * bytes : p.buf[me] + peer * bytes) + off;
  };
  auto dst_of = [&](size_t q) {
    const int peer = (me + 1 + int(q % num_peers)) % num_gpus;
    const size_t off = (q / num_peers) * chunk;
    return (pull ? p.buf[me] + (num_gpus + peer) * bytes : p.buf[peer] + (num_gpus + me) * bytes) +
           off;
  };
  for (int s = 0; s < kStages; ++s) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(SmemAddr(&bar[s])));
  }
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  auto issue_load = [&](size_t q, int s) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(SmemAddr(&bar[s])),
                 "r"(chunk)
                 : "memory");
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
            SmemAddr(smem + s * chunk)),
        "l"(src_of(q)), "r"(chunk), "r"(SmemAddr(&bar[s]))
        : "memory");
  };
  // My jobs: q = blockIdx.x + i * gridDim.x.
  size_t mine = total > blockIdx.x ? (total - blockIdx.x + gridDim.x - 1) / gridDim.x : 0;
  for (size_t i = 0; i < mine && i < kStages; ++i) issue_load(blockIdx.x + i * gridDim.x, int(i));
  for (size_t i = 0; i < mine; ++i) {
    const int s = int(i % kStages);
    const unsigned parity = unsigned((i / kStages) & 1);
    asm volatile(
        "{\n .reg .pred p;\n W: mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n @!p bra W;\n}" ::"r"(
            SmemAddr(&bar[s])),
        "r"(parity)
        : "memory");
    asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(
                     dst_of(blockIdx.x + i * gridDim.x)),
                 "r"(SmemAddr(smem + s * chunk)), "r"(chunk)
                 : "memory");
    asm volatile("cp.async.bulk.commit_group;" ::: "memory");
    // Refill the stage of the previous chunk once its store has read shared memory.
    if (i >= 1 && i - 1 + kStages < mine) {
      asm volatile("cp.async.bulk.wait_group.read 1;" ::: "memory");
      issue_load(blockIdx.x + (i - 1 + kStages) * gridDim.x, int((i - 1) % kStages));
    }
  }
  asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}

int main(int argc, char** argv) {
  const size_t mb = argc > 1 ? std::atoll(argv[1]) : 58;
  int num_gpus = 0;
  CHECK(cudaGetDeviceCount(&num_gpus));
  num_gpus = std::min(num_gpus, kMaxGpus);
  if (num_gpus < 2) {
    std::printf("needs >= 2 GPUs\n");
    return 0;
  }
  const size_t bytes = mb << 20;
  Peers p;
  std::vector<cudaStream_t> streams(num_gpus);
  std::vector<cudaEvent_t> start(num_gpus), stop(num_gpus);
  for (int g = 0; g < num_gpus; ++g) {
    CHECK(cudaSetDevice(g));
    for (int h = 0; h < num_gpus; ++h)
      if (h != g) CHECK(cudaDeviceEnablePeerAccess(h, 0));
    CHECK(cudaMalloc(&p.buf[g], 2 * num_gpus * bytes));
    CHECK(cudaMemset(p.buf[g], g + 1, 2 * num_gpus * bytes));
    CHECK(cudaStreamCreateWithFlags(&streams[g], cudaStreamNonBlocking));
    CHECK(cudaEventCreate(&start[g]));
    CHECK(cudaEventCreate(&stop[g]));
    CHECK(cudaFuncSetAttribute(TmaKernel<4>, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 << 10));
    CHECK(cudaFuncSetAttribute(TmaKernel<8>, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 << 10));
  }
  struct Cfg {
    const char* name;
    int mode;  // 0 simt, 1 tma4, 2 tma8
    bool pull;
    int blocks, threads, arg;  // arg: simt unroll4 / tma chunk bytes
  };
  std::vector<Cfg> cfgs;
  for (int blocks : {24, 32, 66, 132, 264}) {
    cfgs.push_back({"st", 0, false, blocks, 512, 1});
    cfgs.push_back({"ld", 0, true, blocks, 512, 1});
  }
  cfgs.push_back({"st-u1", 0, false, 132, 512, 0});
  cfgs.push_back({"ld-u1", 0, true, 132, 512, 0});
  for (int blocks : {24, 32, 66, 132, 264, 528}) {
    for (int chunk : {8192, 16384}) {
      cfgs.push_back({"tma4", 1, true, blocks, 32, chunk});
      cfgs.push_back({"tmap4", 1, false, blocks, 32, chunk});
    }
    cfgs.push_back({"tma8", 2, true, blocks, 32, 16384});
    cfgs.push_back({"tmap8", 2, false, blocks, 32, 16384});
  }
  std::printf("%d GPUs, %zu MiB per peer pair; GB/s = remote bytes per GPU / time\n", num_gpus, mb);
  std::printf("%-7s %-5s %7s %8s %10s %10s\n", "mode", "dir", "blocks", "chunk", "us", "GB/s");
  for (const Cfg& cfg : cfgs) {
    std::vector<float> times;
    for (int it = 0; it < 23; ++it) {
      for (int g = 0; g < num_gpus; ++g) {
        CHECK(cudaSetDevice(g));
        CHECK(cudaEventRecord(start[g], streams[g]));
        if (cfg.mode == 0) {
          SimtKernel<<<cfg.blocks, cfg.threads, 0, streams[g]>>>(p, g, num_gpus, bytes, cfg.pull,
                                                                  cfg.arg);
        } else if (cfg.mode == 1) {
          TmaKernel<4><<<cfg.blocks, cfg.threads, 4 * cfg.arg, streams[g]>>>(p, g, num_gpus, bytes,
                                                                            cfg.pull, cfg.arg);
        } else {
          TmaKernel<8><<<cfg.blocks, cfg.threads, 8 * cfg.arg, streams[g]>>>(p, g, num_gpus, bytes,
                                                                            cfg.pull, cfg.arg);
        }
        CHECK(cudaGetLastError());
        CHECK(cudaEventRecord(stop[g], streams[g]));
      }
      float worst = 0;
      for (int g = 0; g < num_gpus; ++g) {
        CHECK(cudaSetDevice(g));
        CHECK(cudaEventSynchronize(stop[g]));
        float ms;
        CHECK(cudaEventElapsedTime(&ms, start[g], stop[g]));
        worst = std::max(worst, ms);
      }
      if (it >= 3) times.push_back(worst);
    }
    std::sort(times.begin(), times.end());
    const double us = times[times.size() / 2] * 1e3;
    std::printf("%-7s %-5s %7d %8d %10.1f %10.1f\n", cfg.name, cfg.pull ? "pull" : "push", cfg.blocks,
                cfg.mode ? cfg.arg : (cfg.arg ? 2048 : 512), us,
                double(bytes) * (num_gpus - 1) / us / 1e3);
  }
  return 0;
}
