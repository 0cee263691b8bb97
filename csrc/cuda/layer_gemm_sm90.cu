// The fused layer kernel for Hopper (see layer_gemm_sm90.h), from CUTLASS 3: its TMA warp-specialised
// cooperative GEMM (collective builder) with our own register epilogue in place of CUTLASS's.
//
// GEMM: D (m x n) = X (m x k, row-major) * W^T, W (n x k, row-major): CUTLASS's "TN" GEMM, both
// operands K-major. Tile 128 x 256 x 64 over two consumer warpgroups (64 rows each), a cluster of 2
// CTAs along m sharing W's tiles by TMA multicast.
//
// Epilogue, per accumulator tile in registers: + bias (fp32), exact-erf GELU or ReLU on the leading
// act_width columns, then, when normalising, the row's L2 norm (the whole row lies in the tile since
// n <= 256: each row's 256 columns are spread over one quad of lanes, so two shuffles sum it), the
// scale, the cast and 4-byte stores of column pairs. All arithmetic in fp32, as the cuBLASLt path.
// Measured on an H200 (bench/gpu_kernels.py): 256->256 + bias + L2 in fp16 at 38 % of the copy
// bandwidth, 2.1x torch eager; the GELU epilogue is correct but made the MLP 2.5x slower than torch
// eager (addmm + in-place GELU), so fused_op_cuda.cu sends only L2 layers (no GELU) here.
#include "layer_gemm_sm90.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <string>

#include "cuda_check.h"
#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/collective/detail.hpp"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

namespace bc_fast::cuda {
namespace {

using namespace cute;

template <class T>
struct RawPair;  // the CUDA vector type holding two T, and the fp32 -> pair conversion
template <>
struct RawPair<cutlass::half_t> {
  using type = __half2;
  static __device__ __forceinline__ type make(float a, float b) { return __floats2half2_rn(a, b); }
};
template <>
struct RawPair<cutlass::bfloat16_t> {
  using type = __nv_bfloat162;
  static __device__ __forceinline__ type make(float a, float b) { return __floats2bfloat162_rn(a, b); }
};

// A CUTLASS 3 collective epilogue (the interface of cutlass::epilogue::collective::DefaultEpilogue,
// wrapped by Sm90TmaWarpSpecializedAdapter): registers straight to global memory, no shared memory.
template <class ElementD_>
class LayerEpilogue {
 public:
  using EpilogueSchedule = cutlass::gemm::EpilogueDefault;
  using DispatchPolicy = EpilogueSchedule;
  using ElementC = ElementD_;  // no source operand (is_source_needed() is false)
  using ElementD = ElementD_;
  using ElementAccumulator = float;
  using ElementCompute = float;
  using StrideC = cutlass::detail::TagToStrideC_t<cutlass::layout::RowMajor>;
  using StrideD = StrideC;
  using GmemTiledCopyC = void;
  using GmemTiledCopyD = void;
  // Only named by GemmUniversalAdapter; the epilogue's arithmetic is operator() below.
  using ThreadEpilogueOp = cutlass::epilogue::thread::LinearCombination<ElementD, 1, float, float>;

  struct SharedStorage {};
  using TensorStorage = SharedStorage;

  struct Arguments {
    ElementD* ptr_D = nullptr;
    const float* bias = nullptr;
    int act = 0;
    int act_width = 0;
    int normalize = 0;
  };
  using Params = Arguments;

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& args, void*) {
    return args;
  }
  template <class ProblemShape>
  static size_t get_workspace_size(ProblemShape const&, Arguments const&) {
    return 0;
  }
  template <class ProblemShape>
  static cutlass::Status initialize_workspace(ProblemShape const&, Arguments const&, void*, cudaStream_t,
                                              cutlass::CudaHostAdapter* = nullptr) {
    return cutlass::Status::kSuccess;
  }
  template <class ProblemShape>
  static bool can_implement(ProblemShape const& problem_shape, Arguments const& args) {
    const auto n = get<1>(problem_shape);
    return args.ptr_D != nullptr && n % 2 == 0;
  }

  CUTLASS_HOST_DEVICE
  LayerEpilogue(Params const& params, SharedStorage const& = SharedStorage()) : params_(params) {}

  CUTLASS_DEVICE bool is_source_needed() { return false; }

  template <class ProblemShapeMNKL, class BlockShapeMNK, class BlockCoordMNKL, class FrgEngine, class FrgLayout,
            class TiledMma, class ResidueMNK>
  CUTLASS_DEVICE void operator()(ProblemShapeMNKL problem_shape_mnkl, BlockShapeMNK blk_shape_MNK,
                                 BlockCoordMNKL blk_coord_mnkl, cute::Tensor<FrgEngine, FrgLayout>& acc,
                                 TiledMma tiled_mma, ResidueMNK, int thread_idx, char*) {
    static_assert(is_static<FrgLayout>::value, "accumulator layout must be static");
    // The wgmma accumulator fragment: ((2 adjacent columns, 2 rows 8 apart, N/8 column groups), MMA_M, MMA_N).
    static_assert(rank<0>(FrgLayout{}) == 3 && size<0, 0>(FrgLayout{}) == 2 && size<0, 1>(FrgLayout{}) == 2,
                  "LayerEpilogue expects the sm90 wgmma accumulator layout");
    constexpr int kGroups = size<0, 2>(FrgLayout{});
    constexpr int kMmaM = size<1>(FrgLayout{});
    constexpr int kMmaN = size<2>(FrgLayout{});

    const int M = static_cast<int>(get<0>(problem_shape_mnkl));
    const int N = static_cast<int>(get<1>(problem_shape_mnkl));
    auto [m_coord, n_coord, k_coord, l_coord] = blk_coord_mnkl;
    (void)k_coord;
    (void)l_coord;

    // (row, column) of every accumulator element within the tile: a static identity tensor, so each
    // element's offset is a compile-time constant added to the thread's own.
    Tensor tile_coords = make_identity_tensor(make_shape(get<0>(blk_shape_MNK), get<1>(blk_shape_MNK)));
    Tensor tc = tiled_mma.get_thread_slice(thread_idx).partition_C(tile_coords);  // same shape as acc
    static_assert(is_static<decltype(tc.layout())>::value, "tile coordinates must be static");
    const int row0 = static_cast<int>(m_coord) * static_cast<int>(get<0>(blk_shape_MNK));
    const int col0 = static_cast<int>(n_coord) * static_cast<int>(get<1>(blk_shape_MNK));

    // acc is the adapter's own copy of the accumulators: finished values go back into it. One fully
    // unrolled, branch-free loop per activation: an unrolled loop that branches per element
    // around inlined activation code spreads the hot path over so much code that instruction-cache
    // misses, not arithmetic, set the kernel's speed (on an H200: 8.4 ms per 4M rows, 10x the GEMM alone).
    float ss[kMmaM][2] = {};
    if (params_.act == static_cast<int>(Act::kGelu))
      finish<Act::kGelu>(acc, tc, col0, N, ss);
    else if (params_.act == static_cast<int>(Act::kRelu))
      finish<Act::kRelu>(acc, tc, col0, N, ss);
    else
      finish<Act::kNone>(acc, tc, col0, N, ss);
    if (params_.normalize) {
      // Lanes 4q..4q+3 hold the same two rows: sum over the quad.
      CUTLASS_PRAGMA_UNROLL
      for (int mm = 0; mm < kMmaM; ++mm) {
        CUTLASS_PRAGMA_UNROLL
        for (int h = 0; h < 2; ++h) {
          float s = ss[mm][h];
          s += __shfl_xor_sync(0xffffffffu, s, 1);
          s += __shfl_xor_sync(0xffffffffu, s, 2);
          ss[mm][h] = 1.0f / fmaxf(sqrtf(s), 1e-12f);
        }
      }
    }
    using Pair = RawPair<ElementD>;
    auto* out = reinterpret_cast<typename Pair::type*>(params_.ptr_D);
    CUTLASS_PRAGMA_UNROLL
    for (int mm = 0; mm < kMmaM; ++mm) {
      CUTLASS_PRAGMA_UNROLL
      for (int nn = 0; nn < kMmaN; ++nn) {
        CUTLASS_PRAGMA_UNROLL
        for (int h = 0; h < 2; ++h) {
          const float scale = params_.normalize ? ss[mm][h] : 1.0f;
          CUTLASS_PRAGMA_UNROLL
          for (int g = 0; g < kGroups; ++g) {
            const auto c = tc(make_coord(make_coord(0, h, g), mm, nn));
            const int row = row0 + get<0>(c), col = col0 + get<1>(c);  // col even, N even: col + 1 < N
            if (row < M && col < N)
              out[(static_cast<int64_t>(row) * N + col) / 2] =
                  Pair::make(acc(make_coord(make_coord(0, h, g), mm, nn)) * scale,
                             acc(make_coord(make_coord(1, h, g), mm, nn)) * scale);
          }
        }
      }
    }
  }

 private:
  // acc + bias, then the activation on the columns before act_width (computed everywhere, selected),
  // written back into acc; ss[mm][h] gathers each of the thread's rows' sum of squares.
  template <Act kAct, class Acc, class Coords, int kMmaM>
  CUTLASS_DEVICE void finish(Acc& acc, Coords const& tc, int col0, int N, float (&ss)[kMmaM][2]) const {
    constexpr int kGroups = size<0, 2>(typename Acc::layout_type{});
    constexpr int kMmaN = size<2>(typename Acc::layout_type{});
    const int width = params_.act_width;
    const float* bias = params_.bias;
    const int bias_end = bias != nullptr ? N : 0;  // columns with a bias value (predicated loads)
    CUTLASS_PRAGMA_UNROLL
    for (int mm = 0; mm < kMmaM; ++mm) {
      CUTLASS_PRAGMA_UNROLL
      for (int nn = 0; nn < kMmaN; ++nn) {
        CUTLASS_PRAGMA_UNROLL
        for (int h = 0; h < 2; ++h) {
          CUTLASS_PRAGMA_UNROLL
          for (int g = 0; g < kGroups; ++g) {
            CUTLASS_PRAGMA_UNROLL
            for (int p = 0; p < 2; ++p) {
              const auto idx = make_coord(make_coord(p, h, g), mm, nn);
              const int col = col0 + get<1>(tc(idx));
              float x = acc(idx);
              x += col < bias_end ? __ldg(bias + col) : 0.0f;
              if constexpr (kAct == Act::kRelu) x = col < width ? fmaxf(x, 0.0f) : x;
              if constexpr (kAct == Act::kGelu)
                x = col < width ? 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)) : x;
              acc(idx) = x;
              ss[mm][h] += x * x;
            }
          }
        }
      }
    }
  }

  Params params_;
};

int current_device() {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) throw CudaError("cudaGetDevice failed");
  return device;
}


// Cooperative schedule: 128 x 256 tiles, both consumer warpgroups on one tile (64 rows each), a cluster
// of 2 CTAs along m sharing W's tiles by TMA multicast. Measured on an H200 against the pingpong
// schedule (64 x 256 tiles, epilogue overlapping the other warpgroup's MMAs: 1.2x slower GEMM) and a
// cluster of 1 (within 2 %). ptxas reports 48 bytes of spills with the current epilogue.
struct Cooperative {
  using Tile = Shape<_128, _256, _64>;
  using Kernel = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
  using Cluster = Shape<_2, _1, _1>;
};

template <class Element, class Schedule>
struct LayerGemm {
  using TileShape = typename Schedule::Tile;
  using ClusterShape = typename Schedule::Cluster;
  using Epilogue = cutlass::epilogue::collective::detail::Sm90TmaWarpSpecializedAdapter<LayerEpilogue<Element>>;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, cutlass::layout::RowMajor, 8, Element,
      cutlass::layout::ColumnMajor, 8, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      typename Schedule::Kernel>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static typename Gemm::Arguments arguments(const LayerGemmArgs& a) {
    const int m = static_cast<int>(a.m), n = static_cast<int>(a.n), k = static_cast<int>(a.k);
    const auto stride_a = cutlass::make_cute_packed_stride(typename Kernel::StrideA{}, make_shape(m, k, 1));
    const auto stride_b = cutlass::make_cute_packed_stride(typename Kernel::StrideB{}, make_shape(n, k, 1));
    typename LayerEpilogue<Element>::Arguments epi;
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

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace

bool layer_gemm_sm90_built() { return true; }

bool layer_gemm_sm90_supports(DType t, const LayerGemmArgs& a) {
  if (t != DType::kFloat16 && t != DType::kBFloat16) return false;
  if (a.m <= 0 || a.m > INT_MAX || a.n <= 0 || a.k <= 0 || a.n > INT_MAX / 2 || a.k > INT_MAX / 2) return false;
  if (a.k % 8 != 0 || a.n % 8 != 0) return false;
  if (a.normalize && a.n > kLayerGemmMaxNormWidth) return false;
  if (a.act_width < 0 || a.act_width > a.n) return false;
  return aligned16(a.x) && aligned16(a.w) && aligned16(a.out) && (a.bias == nullptr || aligned16(a.bias));
}

size_t layer_gemm_sm90_workspace(DType t, const LayerGemmArgs& a) {
  return t == DType::kFloat16 ? LayerGemm<cutlass::half_t, Cooperative>::workspace(a)
                              : LayerGemm<cutlass::bfloat16_t, Cooperative>::workspace(a);
}

void layer_gemm_sm90(DType t, const LayerGemmArgs& a, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (!layer_gemm_sm90_supports(t, a)) throw std::invalid_argument("layer_gemm_sm90: unsupported arguments");
  if (t == DType::kFloat16)
    LayerGemm<cutlass::half_t, Cooperative>::run(a, workspace, workspace_bytes, stream);
  else
    LayerGemm<cutlass::bfloat16_t, Cooperative>::run(a, workspace, workspace_bytes, stream);
}

}  // namespace bc_fast::cuda
