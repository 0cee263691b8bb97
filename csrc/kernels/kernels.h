// Kernel table: one implementation per SIMD level, picked at run time.
#pragma once

#include <cstdint>

namespace bc_fast {

enum class Activation : int { kNone = 0, kRelu = 1, kGelu = 2 };

// Width of a packed weight panel (columns of W^T). Packed weights for a layer with
// d_out outputs hold ceil(d_out / kPanel) panels of d_in x kPanel floats, zero padded.
constexpr int kPanel = 64;

struct KernelSet {
  const char* name;
  // y[m x n_pad] (row stride ldy) = x[m x k] (row stride ldx) @ W^T, W packed in panels.
  void (*gemm_packed)(const float* x, int64_t ldx, int64_t m, int64_t k, const float* packed,
                      int64_t n_pad, float* y, int64_t ldy);
  // In place: y += bias (if not null); act on y[0, act_width).
  void (*bias_act)(float* y, int64_t n, const float* bias, Activation act, int64_t act_width);
  // Sum of squares of y[0, n).
  float (*sum_squares)(const float* y, int64_t n);
  // out = y * scale, as float32 or float16 (IEEE binary16 bits).
  void (*store_f32)(const float* y, float* out, int64_t n, float scale);
  void (*store_f16)(const float* y, uint16_t* out, int64_t n, float scale);
  void (*half_to_float)(const uint16_t* in, float* out, int64_t n);
  // out = y * scale as bfloat16 bits, rounded to nearest even (NaN stays a quiet NaN of the same sign).
  void (*store_bf16)(const float* y, uint16_t* out, int64_t n, float scale);
  // bfloat16 bits to float32 (exact).
  void (*bf16_to_float)(const uint16_t* in, float* out, int64_t n);
  // One row x of groups * k values (groups <= 4, groups * width <= kPanel) against one packed panel, block
  // diagonally: y[c] for c < groups * width is group q = c / width's product, x[q k, q k + k) times
  // column c of the panel (k x kPanel), the same bits as row q of gemm_packed(x, k, groups, k, panel, kPanel)
  // in column c; y[c] for larger c is unspecified. The routed operator's scores of a few rows, without
  // gemm_packed's groups x kPanel products of which only kPanel are wanted.
  void (*gemv_groups)(const float* x, int64_t k, int64_t groups, int64_t width, const float* panel, float* y);
};

const KernelSet& generic_kernels();
#if defined(BC_FAST_HAVE_AVX2)
const KernelSet& avx2_kernels();
#endif
#if defined(BC_FAST_HAVE_AVX512)
const KernelSet& avx512_kernels();
#endif

// bf16 compute (precision="bf16"): bf16 operands, fp32 accumulation. A row of k values becomes
// k_pairs = ceil(k / 2) dwords, each two bf16 (value 2j in the low half, 2j + 1 in the high half, the
// odd tail padded with +0). Packed weights for d_out outputs hold ceil(d_out / kBf16Panel) panels of
// k_pairs x kBf16Panel dwords: panel p, pair j, column c holds W[32 p + c][2j], W[32 p + c][2j + 1]
// (zero padded), the layout vdpbf16ps multiplies against a broadcast pair of x.
constexpr int kBf16Panel = 32;

struct Bf16Kernels {
  const char* name;
  // a[m x k_pairs] (row stride lda dwords) = x[m x k] (row stride ldx) rounded to bf16 (nearest even).
  void (*convert_rows)(const float* x, int64_t ldx, int64_t m, int64_t k, uint32_t* a, int64_t lda);
  // y[m x n_pad] (row stride ldy) = bias[n_pad] + bf16(x[m x k]) @ packed, fp32 accumulation starting
  // from the bias, then the pairs of k in order; a[m x k_pairs] (row stride lda) is scratch that receives
  // x rounded by convert_rows, block by block as the GEMM first needs it.
  void (*gemm)(const float* x, int64_t ldx, int64_t m, int64_t k, uint32_t* a, int64_t lda, const uint32_t* packed,
               int64_t n_pad, const float* bias, float* y, int64_t ldy);
};
#if defined(BC_FAST_HAVE_AVX512BF16)
const Bf16Kernels& avx512bf16_kernels();
#endif

// Scalar helpers shared by the kernels (defined in kernels_generic.cpp).
float half_bits_to_float(uint16_t h);
uint16_t float_to_half_bits(float f);
float gelu_exact(float x);
uint16_t float_to_bf16_bits(float f);
float bf16_bits_to_float(uint16_t h);

}  // namespace bc_fast
