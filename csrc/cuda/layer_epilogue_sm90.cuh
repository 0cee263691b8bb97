// The register epilogue of the fused sm_90a layer kernel (layer_gemm_sm90.h): a CUTLASS 3 collective
// epilogue (the interface of cutlass::epilogue::collective::DefaultEpilogue, wrapped by
// Sm90TmaWarpSpecializedAdapter) that finishes each accumulator tile in registers and writes it out.
//
// Per tile: + bias (fp32), exact-erf GELU or ReLU on the leading act_width columns, then, when
// normalising, the row's L2 norm (the whole row lies in the tile since n <= 256: each row's columns are
// spread over one quad of lanes, so two shuffles sum it), the scale and the cast. All arithmetic in
// fp32, as the cuBLASLt path. Two ways out (Sm90Store):
// - kDirect: 4-byte stores of column pairs straight from registers (one warp store covers 16 bytes of 8
//   rows). Measured on an H200: 256->256 + bias + L2 fp16 at 38 % of the copy bandwidth (before its
//   addresses came from one row pointer per half: a third fewer IMADs in the kernel; not re-measured).
// - kStaged: each warp moves its 8-row halves through its own 4 KB of shared memory (stmatrix in, 16-byte
//   reads out), so every row leaves as one coalesced 512-byte warp store: 8 full-line 16-byte stores per
//   thread and half instead of 32 scattered 4-byte ones. A GELU layer without normalisation takes its
//   GELU there, on the 16-bit values read back (8 per lane per row, in a rolled loop): erf inlined into
//   the fully unrolled register loop made the kernel instruction-fetch bound. Its values are thus rounded
//   to 16 bits before the GELU, as on the cuBLASLt route (GEMM + bias, then one GELU pass).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>

#include "cuda_op.h"
#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/gemm/dispatch_policy.hpp"

namespace bc_fast::cuda::sm90 {

template <class T>
struct RawPair;  // the CUDA vector type holding two T, and the fp32 -> pair conversion
template <>
struct RawPair<cutlass::half_t> {
  using type = __half2;
  static __device__ __forceinline__ type make(float a, float b) { return __floats2half2_rn(a, b); }
  static __device__ __forceinline__ float2 unpack(type v) { return __half22float2(v); }
};
template <>
struct RawPair<cutlass::bfloat16_t> {
  using type = __nv_bfloat162;
  static __device__ __forceinline__ type make(float a, float b) { return __floats2bfloat162_rn(a, b); }
  static __device__ __forceinline__ float2 unpack(type v) { return __bfloat1622float2(v); }
};

__device__ __forceinline__ float gelu_erf(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)); }

// The staging buffers: one per consumer warp. The sm90 warp-specialised kernels run 384 threads (one
// producer and two consumer warpgroups), so (threadIdx.x / 32) % 8 gives each consumer warp its own.
constexpr int kStageWarps = 8;
constexpr int kStageRowBytes = 256 * 2;                   // one tile row of 256 16-bit values
constexpr int kStageWarpBytes = 8 * kStageRowBytes;       // the warp's 8 rows of one half (h)

// Byte offset, in a warp's staging slot, of 16-byte chunk `chunk` (columns 8 chunk .. 8 chunk + 7) of
// row `row` (0..7). The chunks are XOR-swizzled by row, so that neither the stmatrix writes (one chunk
// of 8 rows) nor the row reads (the 32 chunks of one row) meet a bank conflict.
CUTE_HOST_DEVICE constexpr int stage_offset(int row, int chunk) { return row * kStageRowBytes + ((chunk ^ row) * 16); }

// stmatrix .x4: four 8x8 matrices of 16-bit values from the warp's registers into shared memory. Our own
// asm (CuTe's SM90_U32x4_STSM_N has the same instruction) with a "memory" clobber, so that the compiler
// keeps it ordered with the plain shared-memory reads that follow.
__device__ __forceinline__ void stmatrix_x4(void* row_address, uint32_t r0, uint32_t r1, uint32_t r2, uint32_t r3) {
  const auto smem = static_cast<uint32_t>(__cvta_generic_to_shared(row_address));
  asm volatile("stmatrix.sync.aligned.x4.m8n8.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(smem), "r"(r0), "r"(r1),
               "r"(r2), "r"(r3)
               : "memory");
}

template <Sm90Store kStore>
struct EpilogueStorage {};
template <>
struct EpilogueStorage<Sm90Store::kStaged> {
  alignas(128) uint8_t rows[kStageWarps * kStageWarpBytes];
};

template <class ElementD_, Sm90Store kStore>
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

  using SharedStorage = EpilogueStorage<kStore>;
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
    const auto n = cute::get<1>(problem_shape);
    return args.ptr_D != nullptr && n % (kStore == Sm90Store::kStaged ? 8 : 2) == 0;
  }

  CUTLASS_HOST_DEVICE
  LayerEpilogue(Params const& params, SharedStorage const& = SharedStorage()) : params_(params) {}

  CUTLASS_DEVICE bool is_source_needed() { return false; }

  template <class ProblemShapeMNKL, class BlockShapeMNK, class BlockCoordMNKL, class FrgEngine, class FrgLayout,
            class TiledMma, class ResidueMNK>
  CUTLASS_DEVICE void operator()(ProblemShapeMNKL problem_shape_mnkl, BlockShapeMNK blk_shape_MNK,
                                 BlockCoordMNKL blk_coord_mnkl, cute::Tensor<FrgEngine, FrgLayout>& acc,
                                 TiledMma tiled_mma, ResidueMNK, int thread_idx, char* smem) {
    using namespace cute;
    static_assert(is_static<FrgLayout>::value, "accumulator layout must be static");
    // The wgmma accumulator fragment: ((2 adjacent columns, 2 rows 8 apart, N/8 column groups), MMA_M, MMA_N).
    static_assert(rank<0>(FrgLayout{}) == 3 && size<0, 0>(FrgLayout{}) == 2 && size<0, 1>(FrgLayout{}) == 2,
                  "LayerEpilogue expects the sm90 wgmma accumulator layout");
    constexpr int kMmaM = size<1>(FrgLayout{});

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
    const bool gelu_on_read_back =
        kStore == Sm90Store::kStaged && params_.act == static_cast<int>(Act::kGelu) && !params_.normalize;
    const int act_in_registers = gelu_on_read_back ? static_cast<int>(Act::kNone) : params_.act;
    float scale[kMmaM][2] = {};
    if (act_in_registers == static_cast<int>(Act::kGelu))
      finish<Act::kGelu>(acc, tc, col0, N, scale);
    else if (act_in_registers == static_cast<int>(Act::kRelu))
      finish<Act::kRelu>(acc, tc, col0, N, scale);
    else
      finish<Act::kNone>(acc, tc, col0, N, scale);
    CUTLASS_PRAGMA_UNROLL
    for (int mm = 0; mm < kMmaM; ++mm) {
      CUTLASS_PRAGMA_UNROLL
      for (int h = 0; h < 2; ++h) {
        // Lanes 4q..4q+3 hold the same two rows: sum over the quad.
        float s = scale[mm][h];
        s += __shfl_xor_sync(0xffffffffu, s, 1);
        s += __shfl_xor_sync(0xffffffffu, s, 2);
        scale[mm][h] = params_.normalize ? 1.0f / fmaxf(sqrtf(s), 1e-12f) : 1.0f;
      }
    }
    if constexpr (kStore == Sm90Store::kStaged) {
      if (gelu_on_read_back)
        store_staged<Act::kGelu>(acc, tc, row0, col0, M, N, scale, smem);
      else
        store_staged<Act::kNone>(acc, tc, row0, col0, M, N, scale, smem);
    } else {
      store_direct(acc, tc, row0, col0, M, N, scale);
    }
  }

 private:
  using Pair = RawPair<ElementD>;

  // acc + bias, then the activation on the columns before act_width (computed everywhere, selected),
  // written back into acc; ss[mm][h] gathers each of the thread's rows' sum of squares. The bias of a
  // column pair is one 8-byte load (col even, bias 16-byte aligned), shared by the thread's two rows.
  template <Act kAct, class Acc, class Coords, int kMmaM>
  CUTLASS_DEVICE void finish(Acc& acc, Coords const& tc, int col0, int N, float (&ss)[kMmaM][2]) const {
    using namespace cute;
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
        for (int g = 0; g < kGroups; ++g) {
          const int col = col0 + get<1>(tc(make_coord(make_coord(0, 0, g), mm, nn)));  // even; N even
          const float2 b = col < bias_end ? __ldg(reinterpret_cast<const float2*>(bias + col)) : make_float2(0.f, 0.f);
          CUTLASS_PRAGMA_UNROLL
          for (int h = 0; h < 2; ++h) {
            CUTLASS_PRAGMA_UNROLL
            for (int p = 0; p < 2; ++p) {
              const auto idx = make_coord(make_coord(p, h, g), mm, nn);
              float x = acc(idx) + (p == 0 ? b.x : b.y);
              if constexpr (kAct == Act::kRelu) x = col + p < width ? fmaxf(x, 0.0f) : x;
              if constexpr (kAct == Act::kGelu) x = col + p < width ? gelu_erf(x) : x;
              acc(idx) = x;
              ss[mm][h] += x * x;
            }
          }
        }
      }
    }
  }

  template <class Acc, class Coords, int kMmaM>
  CUTLASS_DEVICE void store_direct(Acc const& acc, Coords const& tc, int row0, int col0, int M, int N,
                                   float const (&scale)[kMmaM][2]) const {
    using namespace cute;
    constexpr int kGroups = size<0, 2>(typename Acc::layout_type{});
    constexpr int kMmaN = size<2>(typename Acc::layout_type{});
    auto* out = reinterpret_cast<typename Pair::type*>(params_.ptr_D);
    CUTLASS_PRAGMA_UNROLL
    for (int mm = 0; mm < kMmaM; ++mm) {
      CUTLASS_PRAGMA_UNROLL
      for (int nn = 0; nn < kMmaN; ++nn) {
        CUTLASS_PRAGMA_UNROLL
        for (int h = 0; h < 2; ++h) {
          // The thread's row is the same in every column group (the wgmma fragment; checked on the host by
          // tests/cuda/sm90_store_layout.cu): one row pointer, and per group a constant column offset.
          const int row = row0 + get<0>(tc(make_coord(make_coord(0, h, 0), mm, nn)));
          if (row >= M) continue;
          auto* out_row = out + static_cast<int64_t>(row) * (N / 2);
          CUTLASS_PRAGMA_UNROLL
          for (int g = 0; g < kGroups; ++g) {
            const int col = col0 + get<1>(tc(make_coord(make_coord(0, h, g), mm, nn)));  // even, N even: col + 1 < N
            if (col < N)
              out_row[col / 2] = Pair::make(acc(make_coord(make_coord(0, h, g), mm, nn)) * scale[mm][h],
                                            acc(make_coord(make_coord(1, h, g), mm, nn)) * scale[mm][h]);
          }
        }
      }
    }
  }

  // Per 8-row half of the warp's 16-row slab: the values, packed to 16-bit pairs, go into the warp's
  // buffer by stmatrix (group g of 8 columns is one 8x8 matrix: lane t holds its row t/4, columns 2(t%4)
  // and 2(t%4)+1, exactly the wgmma fragment), 16-byte chunks XOR-swizzled by row so that neither the
  // matrix stores nor the row reads meet a bank conflict; then lane l reads chunk l of each row and the
  // warp writes the row's 512 bytes in one coalesced store. Only the warp touches its buffer: __syncwarp.
  // kAct == kGelu: the GELU on the chunk's columns before act_width, between the read and the store.
  template <Act kAct, class Acc, class Coords, int kMmaM>
  CUTLASS_DEVICE void store_staged(Acc const& acc, Coords const& tc, int row0, int col0, int M, int N,
                                   float const (&scale)[kMmaM][2], char* smem) const {
    using namespace cute;
    constexpr int kGroups = size<0, 2>(typename Acc::layout_type{});
    static_assert(size<2>(typename Acc::layout_type{}) == 1 && kGroups * 8 * 2 == kStageRowBytes,
                  "the staged store expects one 256-wide MMA atom across the tile");
    const int lane = static_cast<int>(threadIdx.x % 32);
    uint8_t* buf = reinterpret_cast<uint8_t*>(smem) + (threadIdx.x / 32 % kStageWarps) * kStageWarpBytes;
    auto* out = params_.ptr_D;
    const int col = col0 + lane * 8;  // the 8 columns this lane writes in every row
    CUTLASS_PRAGMA_UNROLL
    for (int mm = 0; mm < kMmaM; ++mm) {
      CUTLASS_PRAGMA_UNROLL
      for (int h = 0; h < 2; ++h) {
        uint32_t packed[kGroups];
        CUTLASS_PRAGMA_UNROLL
        for (int g = 0; g < kGroups; ++g) {
          const auto pair = Pair::make(acc(make_coord(make_coord(0, h, g), mm, 0)) * scale[mm][h],
                                       acc(make_coord(make_coord(1, h, g), mm, 0)) * scale[mm][h]);
          memcpy(&packed[g], &pair, sizeof(uint32_t));
        }
        // stmatrix .x4: lanes 8i..8i+7 give the addresses of rows 0..7 of matrix i (group 4j + i).
        const int r = lane % 8, i = lane / 8;
        CUTLASS_PRAGMA_UNROLL
        for (int j = 0; j < kGroups / 4; ++j) {
          stmatrix_x4(buf + stage_offset(r, 4 * j + i), packed[4 * j], packed[4 * j + 1], packed[4 * j + 2],
                      packed[4 * j + 3]);
        }
        __syncwarp();
        // The slab's first row in this half: lane 0 holds it (lane t holds row t/4 of the half).
        const int first = row0 + __shfl_sync(0xffffffffu, get<0>(tc(make_coord(make_coord(0, h, 0), mm, 0))), 0);
#pragma unroll(kAct == Act::kGelu ? 1 : 8)
        for (int rr = 0; rr < 8; ++rr) {
          uint4 v = *reinterpret_cast<const uint4*>(buf + stage_offset(rr, lane));
          if constexpr (kAct == Act::kGelu) v = gelu_chunk(v, col);
          const int row = first + rr;
          if (row < M && col < N) *reinterpret_cast<uint4*>(out + static_cast<int64_t>(row) * N + col) = v;
        }
        __syncwarp();
      }
    }
  }

  // GELU on the 8 16-bit values of a 16-byte chunk starting at column col, where before act_width.
  CUTLASS_DEVICE uint4 gelu_chunk(uint4 v, int col) const {
    typename Pair::type pairs[4];
    memcpy(pairs, &v, sizeof(v));
    CUTLASS_PRAGMA_UNROLL
    for (int q = 0; q < 4; ++q) {
      float2 f = Pair::unpack(pairs[q]);
      f.x = col + 2 * q < params_.act_width ? gelu_erf(f.x) : f.x;
      f.y = col + 2 * q + 1 < params_.act_width ? gelu_erf(f.y) : f.y;
      pairs[q] = Pair::make(f.x, f.y);
    }
    memcpy(&v, pairs, sizeof(v));
    return v;
  }

  Params params_;
};

}  // namespace bc_fast::cuda::sm90
