// Helpers shared by the FFI handlers (*_ffi.cc): error values and shape strings. Handlers
// return ffi::Error, never throw.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace jax_ep {

namespace ffi = xla::ffi;

inline ffi::Error InvalidArgument(const std::string& prefix, const std::string& msg) {
  return ffi::Error::InvalidArgument(prefix + ": " + msg);
}

// Success, or the launch error naming the kernel.
inline ffi::Error Launched(cudaError_t err, const std::string& prefix, const char* kernel) {
  if (err == cudaSuccess) return ffi::Error::Success();
  return ffi::Error::Internal(prefix + ": launching " + kernel + ": " + cudaGetErrorString(err));
}

template <typename Dims>
std::string ShapeString(const Dims& dims) {
  std::string s = "[";
  for (int64_t d : dims) s += (s.size() > 1 ? ", " : "") + std::to_string(d);
  return s + "]";
}

}  // namespace jax_ep
