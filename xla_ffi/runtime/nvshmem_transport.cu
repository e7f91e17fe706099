// NVSHMEM transport of jax_ep (see nvshmem_transport.h). Host calls (init, malloc, nvshmem_ptr)
// run at Buffer creation only; the kernels of the other families reach peers through the
// nvshmem_ptr mappings. No team collectives or NVSHMEM barriers: with several PEs on one GPU
// (no MPS) they do not complete; synchronisation is our own flags.
#include <cuda_runtime.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include <cstdio>
#include <cstring>
#include <string>

#include "nvshmem_transport.h"

namespace {

struct Handshake {  // symmetric: one slot per source PE
  uint64_t signal[jax_ep::kMaxRanks * 64];
  int value[jax_ep::kMaxRanks * 64];
};
constexpr int kMaxPes = jax_ep::kMaxRanks * 64;

JaxEpPeerMappingOps g_ops{};
bool g_initialised = false;
Handshake* g_handshake = nullptr;

int Fail(char* error, size_t len, const std::string& message) {
  std::snprintf(error, len, "%s", message.c_str());
  return 1;
}

__device__ __forceinline__ uint64_t GlobalTimerNs() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// One thread: value + signal to the next PE, then a bounded wait for the previous PE's.
__global__ void HandshakeKernel(Handshake* h, int pe, int num_pes, uint64_t timeout_ns,
                                int* result) {
  const int next = (pe + 1) % num_pes, prev = (pe + num_pes - 1) % num_pes;
  nvshmem_int_p(&h->value[pe], 1000 + pe, next);
  nvshmem_fence();  // the value lands before the signal
  nvshmemx_signal_op(&h->signal[pe], 1, NVSHMEM_SIGNAL_SET, next);
  const uint64_t start = GlobalTimerNs();
  while (nvshmem_signal_fetch(&h->signal[prev]) < 1) {
    if (GlobalTimerNs() - start > timeout_ns) {
      *result = -1;
      return;
    }
  }
  *result = h->value[prev] == 1000 + prev ? 0 : 1000 + prev - h->value[prev];
}

int Allocate(size_t bytes, void** base, char* error, size_t len) {
  cudaSetDevice(g_ops.device);
  *base = nvshmem_malloc(bytes);
  if (*base == nullptr) {
    size_t free_bytes = 0, total = 0;
    cudaMemGetInfo(&free_bytes, &total);
    return Fail(error, len,
                "jax_ep: nvshmem_malloc of the " + std::to_string(bytes >> 20) +
                    " MiB workspace failed on GPU " + std::to_string(g_ops.device) + " (PE " +
                    std::to_string(g_ops.my_pe) + ", " + std::to_string(free_bytes >> 20) +
                    " MiB free): raise NVSHMEM_SYMMETRIC_SIZE (before the first Buffer) or lower "
                    "XLA_PYTHON_CLIENT_MEM_FRACTION / max_tokens_per_rank");
  }
  return 0;
}

void* PeerAddress(void* base, int pe) { return nvshmem_ptr(base, pe); }

void Release(void* base) {
  cudaSetDevice(g_ops.device);
  nvshmem_free(base);
}

}  // namespace

extern "C" {

size_t JaxEpNvshmemUniqueIdBytes() { return sizeof(nvshmemx_uniqueid_t); }

int JaxEpNvshmemUniqueId(void* out, char* error, size_t len) {
  nvshmemx_uniqueid_t id = NVSHMEMX_UNIQUEID_INITIALIZER;
  if (int status = nvshmemx_get_uniqueid(&id); status != 0) {
    return Fail(error, len, "jax_ep: nvshmemx_get_uniqueid failed (status " +
                                std::to_string(status) + ")");
  }
  std::memcpy(out, &id, sizeof(id));
  return 0;
}

int JaxEpNvshmemInit(const void* unique_id, int pe, int num_pes, int device, char* error,
                     size_t len) {
  if (g_initialised) return Fail(error, len, "jax_ep: NVSHMEM is already initialised");
  if (num_pes < 1 || num_pes > kMaxPes || pe < 0 || pe >= num_pes) {
    return Fail(error, len, "jax_ep: bad NVSHMEM PE " + std::to_string(pe) + " of " +
                                std::to_string(num_pes));
  }
  // NVSHMEM binds the PE to the current device.
  if (cudaError_t e = cudaSetDevice(device); e != cudaSuccess) {
    return Fail(error, len, std::string("jax_ep: cudaSetDevice before NVSHMEM init: ") +
                                cudaGetErrorString(e));
  }
  cudaFree(nullptr);
  nvshmemx_uniqueid_t id;
  std::memcpy(&id, unique_id, sizeof(id));
  nvshmemx_init_attr_t attr = NVSHMEMX_INIT_ATTR_INITIALIZER;
  if (int status = nvshmemx_set_attr_uniqueid_args(pe, num_pes, &id, &attr); status != 0) {
    return Fail(error, len, "jax_ep: nvshmemx_set_attr_uniqueid_args failed (status " +
                                std::to_string(status) + ")");
  }
  // nvshmemx_init_attr would exit() on failure; its core reports the status instead.
  nvshmemx_init_init_attr_ver_only(attr);
  nvshmemi_version_t version = {NVSHMEM_VENDOR_MAJOR_VERSION, NVSHMEM_VENDOR_MINOR_VERSION,
                                NVSHMEM_VENDOR_PATCH_VERSION};
  int provided = 0;
  if (int status = nvshmemi_init_thread(NVSHMEM_THREAD_SERIALIZED, &provided,
                                        NVSHMEMX_INIT_WITH_UNIQUEID, &attr, version);
      status != 0) {
    return Fail(error, len, "jax_ep: NVSHMEM initialisation failed on GPU " +
                                std::to_string(device) + " as PE " + std::to_string(pe) + " of " +
                                std::to_string(num_pes) + " (status " + std::to_string(status) +
                                "; NVSHMEM_DEBUG=INFO says more)");
  }
  if (nvshmem_my_pe() != pe || nvshmem_n_pes() != num_pes) {
    return Fail(error, len, "jax_ep: NVSHMEM came up as PE " + std::to_string(nvshmem_my_pe()) +
                                " of " + std::to_string(nvshmem_n_pes()) + ", expected " +
                                std::to_string(pe) + " of " + std::to_string(num_pes));
  }
  g_handshake = static_cast<Handshake*>(nvshmem_malloc(sizeof(Handshake)));
  if (g_handshake == nullptr) return Fail(error, len, "jax_ep: nvshmem_malloc of the handshake block failed");
  cudaMemset(g_handshake, 0, sizeof(Handshake));
  if (cudaError_t e = cudaDeviceSynchronize(); e != cudaSuccess) {
    return Fail(error, len, std::string("jax_ep: after NVSHMEM init: ") + cudaGetErrorString(e));
  }
  g_ops.abi_version = jax_ep::kPeerMappingAbi;
  g_ops.name = "nvshmem";
  g_ops.device = device;
  g_ops.my_pe = pe;
  g_ops.num_pes = num_pes;
  g_ops.allocate = Allocate;
  g_ops.peer_address = PeerAddress;
  g_ops.release = Release;
  g_initialised = true;
  return 0;
}

int JaxEpNvshmemHandshake(uint64_t timeout_ns, char* error, size_t len) {
  if (!g_initialised) return Fail(error, len, "jax_ep: NVSHMEM is not initialised");
  cudaSetDevice(g_ops.device);
  int* result = nullptr;
  if (cudaMalloc(&result, sizeof(int)) != cudaSuccess) {
    return Fail(error, len, "jax_ep: cudaMalloc for the NVSHMEM handshake failed");
  }
  HandshakeKernel<<<1, 1>>>(g_handshake, g_ops.my_pe, g_ops.num_pes, timeout_ns, result);
  int host = -2;
  cudaError_t e = cudaMemcpy(&host, result, sizeof(int), cudaMemcpyDeviceToHost);
  cudaFree(result);
  if (e != cudaSuccess) {
    return Fail(error, len, std::string("jax_ep: NVSHMEM handshake kernel: ") +
                                cudaGetErrorString(e));
  }
  const int prev = (g_ops.my_pe + g_ops.num_pes - 1) % g_ops.num_pes;
  if (host == -1) {
    return Fail(error, len, "jax_ep: NVSHMEM handshake: PE " + std::to_string(g_ops.my_pe) +
                                " timed out waiting for PE " + std::to_string(prev));
  }
  if (host != 0) {
    return Fail(error, len, "jax_ep: NVSHMEM handshake: PE " + std::to_string(g_ops.my_pe) +
                                " received a wrong value from PE " + std::to_string(prev));
  }
  return 0;
}

const JaxEpPeerMappingOps* JaxEpNvshmemMapping() { return g_initialised ? &g_ops : nullptr; }

const char* JaxEpNvshmemVersion() {
  static const std::string v = std::to_string(NVSHMEM_VENDOR_MAJOR_VERSION) + "." +
                               std::to_string(NVSHMEM_VENDOR_MINOR_VERSION) + "." +
                               std::to_string(NVSHMEM_VENDOR_PATCH_VERSION);
  return v.c_str();
}

}  // extern "C"
