// Internal to csrc/cuda: error checking and the device guard (needs the CUDA runtime headers).
#pragma once

#include <cuda_runtime_api.h>

#include <string>

#include "cuda_op.h"

namespace bc_fast::cuda {

// Throws CudaOutOfMemory for cudaErrorMemoryAllocation, CudaError otherwise, naming `call`.
// Clears the runtime's last-error slot so that a non-sticky error does not resurface later.
[[noreturn]] void throw_cuda(cudaError_t err, const char* call);

inline void check(cudaError_t err, const char* call) {
  if (err != cudaSuccess) throw_cuda(err, call);
}

#define BC_CUDA_CHECK(expr) ::bc_fast::cuda::check((expr), #expr)

// cublasLtGetVersion() (defined in the .cu file, the only one that includes cuBLASLt).
int64_t cublaslt_version();

// Number of visible devices; throws CudaError ("CUDA is not available: ...") without a driver or GPU.
int device_count();
// Throws invalid_argument unless 0 <= device < device_count().
void check_device(int device);
// cudaDeviceGetAttribute(attr, device), asked once per (attribute, device) and cached: these never change.
int device_attribute(cudaDeviceAttr attr, int device);

// Makes `device` current for its lifetime and restores the previous current device afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

}  // namespace bc_fast::cuda
