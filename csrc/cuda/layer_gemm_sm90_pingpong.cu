// The fused sm_90a layer kernel's pingpong instances (fp16 and bf16, direct and staged stores).
#include "layer_gemm_sm90_kernel.cuh"

namespace bc_fast::cuda::sm90 {
BC_FAST_SM90_SCHEDULE(, Pingpong)
}  // namespace bc_fast::cuda::sm90
