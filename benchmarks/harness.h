// What the native harnesses (no JAX: ll_phases.cu, ep_harness.cu, nvlink_probe.cu) share.
#pragma once

#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

// Exits with the file, line and CUDA error of a failed call.
#define CHECK(x)                                                                        \
  do {                                                                                  \
    cudaError_t e_ = (x);                                                               \
    if (e_ != cudaSuccess) {                                                            \
      std::printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e_));            \
      std::exit(1);                                                                     \
    }                                                                                   \
  } while (0)
