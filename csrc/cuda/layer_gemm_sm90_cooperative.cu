// The fused sm_90a layer kernel's cooperative instances (fp16 and bf16, direct and staged stores).
#include "layer_gemm_sm90_kernel.cuh"

namespace bc_fast::cuda::sm90 {

size_t cooperative_workspace(DType t, Sm90Store store, const LayerGemmArgs& a) {
  return with_layer_gemm<Cooperative>(t, store, [&](auto gemm) { return decltype(gemm)::workspace(a); });
}

void cooperative_run(DType t, Sm90Store store, const LayerGemmArgs& a, void* workspace, size_t workspace_bytes,
              cudaStream_t stream) {
  with_layer_gemm<Cooperative>(t, store, [&](auto gemm) { decltype(gemm)::run(a, workspace, workspace_bytes, stream); });
}

}  // namespace bc_fast::cuda::sm90
