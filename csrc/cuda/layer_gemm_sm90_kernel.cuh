// The fused sm_90a layer kernel as a CUTLASS 3 type (see layer_gemm_sm90.h): CUTLASS's TMA
// warp-specialised GEMM (collective builder) with our register epilogue (layer_epilogue_sm90.cuh) in
// place of CUTLASS's, per element type, schedule and store. Each variant's instances (fp16, bf16) are
// defined in a translation unit of their own (layer_gemm_sm90_<schedule>_<store>.cu, declared in
// layer_gemm_sm90_instances.h), so they compile in parallel.
//
// GEMM: D (m x n) = X (m x k, row-major) * W^T, W (n x k, row-major): CUTLASS's "TN" GEMM, both
// operands K-major; clusters of 2 CTAs along m share W's tiles by TMA multicast.
#pragma once

#include <string>

#include "cuda_check.h"
#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/collective/detail.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"
#include "layer_epilogue_sm90.cuh"
#include "layer_gemm_sm90.h"
#include "layer_gemm_sm90_instances.h"

namespace bc_fast::cuda::sm90 {

template <Sm90Schedule S>
struct ScheduleOf;

// 128 x 256 tiles, both consumer warpgroups on one tile (64 rows each). Measured on an H200 (GEMM alone,
// epilogue skipped): within 2 % of a cluster of 1, and 1.2x faster than the pingpong schedule.
template <>
struct ScheduleOf<Sm90Schedule::kCooperative> {
  using Tile = cute::Shape<cute::_128, cute::_256, cute::_64>;
  using Kernel = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
  using Cluster = cute::Shape<cute::_2, cute::_1, cute::_1>;
};

// 64 x 256 tiles, one per consumer warpgroup: one warpgroup's epilogue runs during the other's MMAs.
template <>
struct ScheduleOf<Sm90Schedule::kPingpong> {
  using Tile = cute::Shape<cute::_64, cute::_256, cute::_64>;
  using Kernel = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
  using Cluster = cute::Shape<cute::_2, cute::_1, cute::_1>;
};

inline int current_device() {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) throw CudaError("cudaGetDevice failed");
  return device;
}

template <class Element, class Schedule, Sm90Store kStore>
struct LayerGemm {
  using TileShape = typename Schedule::Tile;
  using ClusterShape = typename Schedule::Cluster;
  using EpilogueOp = LayerEpilogue<Element, kStore>;
  using Epilogue = cutlass::epilogue::collective::detail::Sm90TmaWarpSpecializedAdapter<EpilogueOp>;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, cutlass::layout::RowMajor, 8, Element,
      cutlass::layout::ColumnMajor, 8, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      typename Schedule::Kernel>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  // The staged store gives each consumer warp its own slot by (threadIdx.x / 32) % kStageWarps: one producer
  // warpgroup and kStageWarps consumer warps.
  static_assert(Kernel::MaxThreadsPerBlock == 128 + kStageWarps * 32, "one producer and two consumer warpgroups");

  static typename Gemm::Arguments arguments(const LayerGemmArgs& a) {
    const int m = static_cast<int>(a.m), n = static_cast<int>(a.n), k = static_cast<int>(a.k);
    const auto stride_a = cutlass::make_cute_packed_stride(typename Kernel::StrideA{}, cute::make_shape(m, k, 1));
    const auto stride_b = cutlass::make_cute_packed_stride(typename Kernel::StrideB{}, cute::make_shape(n, k, 1));
    typename EpilogueOp::Arguments epi;
    epi.ptr_D = static_cast<Element*>(a.out);
    epi.bias = a.bias;
    epi.act = a.act_width > 0 ? static_cast<int>(a.act) : 0;
    epi.act_width = static_cast<int>(a.act_width);
    epi.normalize = a.normalize ? 1 : 0;
    typename Gemm::Arguments args{cutlass::gemm::GemmUniversalMode::kGemm,
                                  {m, n, k, 1},
                                  {static_cast<const Element*>(a.x), stride_a, static_cast<const Element*>(a.w),
                                   stride_b},
                                  epi};
    // The current device and its SM count (cached): CUTLASS would otherwise query device 0's per call.
    args.hw_info.device_id = current_device();
    args.hw_info.sm_count = device_attribute(cudaDevAttrMultiProcessorCount, args.hw_info.device_id);
    return args;
  }

  static size_t workspace(const LayerGemmArgs& a) { return Gemm::get_workspace_size(arguments(a)); }

  static void run(const LayerGemmArgs& a, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
    auto args = arguments(a);
    Gemm gemm;
    if (gemm.can_implement(args) != cutlass::Status::kSuccess)
      throw CudaError("the fused sm90 layer kernel cannot take a " + std::to_string(a.m) + " x " +
                      std::to_string(a.k) + " -> " + std::to_string(a.n) + " layer (CUTLASS can_implement)");
    if (Gemm::get_workspace_size(args) > workspace_bytes)
      throw CudaError("the fused sm90 layer kernel needs more workspace than given");
    cutlass::Status st = gemm.initialize(args, workspace, stream);
    if (st == cutlass::Status::kSuccess) st = gemm.run(stream);
    const cudaError_t err = cudaGetLastError();
    if (st != cutlass::Status::kSuccess || err != cudaSuccess)
      throw CudaError(std::string("the fused sm90 layer kernel failed to launch: ") + cutlassGetStatusString(st) +
                      (err != cudaSuccess ? std::string("; ") + cudaGetErrorString(err) : std::string()));
  }
};

// Calls f with a value of the variant's LayerGemm instance for the dtype.
template <Sm90Schedule S, Sm90Store St, class F>
decltype(auto) with_layer_gemm(DType t, F&& f) {
  if (t == DType::kFloat16) return f(LayerGemm<cutlass::half_t, ScheduleOf<S>, St>{});
  return f(LayerGemm<cutlass::bfloat16_t, ScheduleOf<S>, St>{});
}

// The entry points declared in layer_gemm_sm90_instances.h; each variant's translation unit instantiates
// them with BC_FAST_SM90_INSTANCE.
template <Sm90Schedule S, Sm90Store St>
size_t instance_workspace(DType t, const LayerGemmArgs& a) {
  return with_layer_gemm<S, St>(t, [&](auto gemm) { return decltype(gemm)::workspace(a); });
}

template <Sm90Schedule S, Sm90Store St>
void instance_run(DType t, const LayerGemmArgs& a, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  with_layer_gemm<S, St>(t, [&](auto gemm) { decltype(gemm)::run(a, workspace, workspace_bytes, stream); });
}

#define BC_FAST_SM90_INSTANCE(S, ST)                                                                    \
  template size_t instance_workspace<Sm90Schedule::S, Sm90Store::ST>(DType, const LayerGemmArgs&); \
  template void instance_run<Sm90Schedule::S, Sm90Store::ST>(DType, const LayerGemmArgs&, void*, size_t, cudaStream_t);

}  // namespace bc_fast::cuda::sm90
