// One layer of the program as ONE kernel on Hopper (sm_90a): the GEMM on tensor cores (wgmma, TMA)
// with bias, activation on the leading `act_width` outputs, L2 normalisation of the row and the
// output cast done in registers in the GEMM's epilogue. Built from CUTLASS 3 when its headers are
// found at build time (BC_FAST_WITH_CUTLASS=1); the caller falls back to cuBLASLt otherwise.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "cuda_op.h"

namespace bc_fast::cuda {

// Widest row the fused L2 normalisation takes: one CTA tile spans the whole row.
constexpr int64_t kLayerGemmMaxNormWidth = 256;

struct LayerGemmArgs {
  const void* x = nullptr;  // m x k, row-major, 16-bit (the kernel's dtype)
  const void* w = nullptr;  // n x k, row-major, same dtype
  const float* bias = nullptr;  // n values, or null
  void* out = nullptr;      // m x n, row-major, same dtype
  int64_t m = 0, n = 0, k = 0;
  Act act = Act::kNone;
  int64_t act_width = 0;    // the activation applies to outputs [0, act_width)
  bool normalize = false;   // needs n <= kLayerGemmMaxNormWidth
  Sm90Variant variant;      // which instance runs it
};

#if BC_FAST_WITH_CUTLASS
// The process-wide variant (Sm90Variant, cuda_op.h) that later applies use, read once per apply
// (thread-safe). It defaults to the pair measured fastest; the others are there to be measured
// (bench/gpu_kernels.py times them).
Sm90Variant sm90_variant();
void set_sm90_variant(Sm90Variant v);

// Whether this build holds the fused sm_90a kernels.
bool layer_gemm_sm90_built();

// Whether the kernel takes these arguments: 16-bit dtype, k and n multiples of 8, 16-byte aligned
// pointers, m within int range, normalisation only for n <= kLayerGemmMaxNormWidth.
bool layer_gemm_sm90_supports(DType t, const LayerGemmArgs& a);

// Scratch the launch needs (bytes; may be 0).
size_t layer_gemm_sm90_workspace(DType t, const LayerGemmArgs& a);

// Enqueues the layer on `stream` (current device must be a compute capability 9.0 GPU). Throws
// CudaError when CUTLASS refuses the arguments or the launch fails.
void layer_gemm_sm90(DType t, const LayerGemmArgs& a, void* workspace, size_t workspace_bytes, cudaStream_t stream);
#else
// Built without CUDA's CUTLASS headers: no fused kernels; every layer takes the cuBLASLt path.
inline bool layer_gemm_sm90_built() { return false; }
inline Sm90Variant sm90_variant() { return {}; }
inline void set_sm90_variant(Sm90Variant) {
  throw CudaError("this build of bc_fast._cuda has no fused sm90 kernels (built without CUTLASS)");
}
inline bool layer_gemm_sm90_supports(DType, const LayerGemmArgs&) { return false; }
inline size_t layer_gemm_sm90_workspace(DType, const LayerGemmArgs&) { return 0; }
inline void layer_gemm_sm90(DType, const LayerGemmArgs&, void*, size_t, cudaStream_t) {
  throw CudaError("this build of bc_fast._cuda has no fused sm90 kernels (built without CUTLASS)");
}
#endif

}  // namespace bc_fast::cuda
