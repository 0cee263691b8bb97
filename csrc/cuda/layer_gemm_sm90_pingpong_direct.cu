// The fused sm_90a layer kernel's pingpong schedule with the direct store (fp16 and bf16).
#include "layer_gemm_sm90_kernel.cuh"

namespace bc_fast::cuda::sm90 {
BC_FAST_SM90_INSTANCE(kPingpong, kDirect)
}  // namespace bc_fast::cuda::sm90
