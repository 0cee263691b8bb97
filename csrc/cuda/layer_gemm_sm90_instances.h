// The fused sm_90a layer kernel's instances, one per variant (schedule x store; each covers fp16 and
// bf16), declared without any CUTLASS header. Each is defined in a translation unit of its own,
// layer_gemm_sm90_<schedule>_<store>.cu (from layer_gemm_sm90_kernel.cuh), so that they compile in
// parallel and the dispatch (layer_gemm_sm90.cu) compiles in seconds.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "cuda_op.h"
#include "layer_gemm_sm90.h"

namespace bc_fast::cuda::sm90 {

template <Sm90Schedule S, Sm90Store St>
size_t instance_workspace(DType t, const LayerGemmArgs& a);

template <Sm90Schedule S, Sm90Store St>
void instance_run(DType t, const LayerGemmArgs& a, void* workspace, size_t workspace_bytes, cudaStream_t stream);

// A variant as a type, for with_instance.
template <Sm90Schedule S, Sm90Store St>
struct Instance {
  static constexpr Sm90Schedule schedule = S;
  static constexpr Sm90Store store = St;
};

// Calls f with the Instance of the variant v.
template <class F>
decltype(auto) with_instance(Sm90Variant v, F&& f) {
  using S = Sm90Schedule;
  using St = Sm90Store;
  if (v.schedule == S::kPingpong)
    return v.store == St::kStaged ? f(Instance<S::kPingpong, St::kStaged>{}) : f(Instance<S::kPingpong, St::kDirect>{});
  return v.store == St::kStaged ? f(Instance<S::kCooperative, St::kStaged>{})
                                : f(Instance<S::kCooperative, St::kDirect>{});
}

}  // namespace bc_fast::cuda::sm90
