// The NVSHMEM transport (nvshmem_transport.cu, compiled with -rdc against libnvshmem_device.a):
// bootstrap by unique ID, a device-side handshake, and the JaxEpPeerMappingOps table that the
// main extension's workspaces allocate and map through. A C interface, free of NVSHMEM headers,
// so that nvshmem_module.cc builds with the host compiler alone.
#pragma once

#include <cstddef>
#include <cstdint>

#include "peer_mapping.h"

extern "C" {

// Every function returns 0 on success, else writes a message into `error` (error_len bytes).
size_t JaxEpNvshmemUniqueIdBytes();
// Rank 0's unique ID, to hand to every process before they all call JaxEpNvshmemInit.
int JaxEpNvshmemUniqueId(void* out, char* error, size_t error_len);
// Collective over all PEs: binds this process to `device`, initialises NVSHMEM as PE `pe` of
// `num_pes`, allocates the handshake block. Once per process.
int JaxEpNvshmemInit(const void* unique_id, int pe, int num_pes, int device, char* error,
                     size_t error_len);
// After every PE has initialised (a host barrier in between): each PE puts a value and a
// signal into the next PE's handshake block and waits, at most timeout_ns, for the previous
// one's. Proves device-initiated puts work.
int JaxEpNvshmemHandshake(uint64_t timeout_ns, char* error, size_t error_len);
// nullptr before JaxEpNvshmemInit succeeded.
const JaxEpPeerMappingOps* JaxEpNvshmemMapping();
// "major.minor.patch" of the NVSHMEM this was built against.
const char* JaxEpNvshmemVersion();

}  // extern "C"
