// AVX-512 (F, DQ, BW, VL) + FMA + F16C kernels. This translation unit alone is compiled with
// -mavx512f -mavx512dq -mavx512bw -mavx512vl -mfma -mf16c; dispatch.cpp only calls into it after
// checking the CPU (and that the OS saves ZMM state). It includes no standard headers with inline
// functions, so no AVX-512 copy of a shared inline function can be picked by the linker for
// baseline code.
#include <cstdint>

#include "avx512_intrinsics.h"
#include "kernels.h"

namespace bc_fast {
namespace {

constexpr int kVec = 16;                 // floats per zmm
constexpr int kPanelVecs = kPanel / kVec;  // 4 zmm across a panel

// Lanes [0, n) of a vector, for tails (n < 16).
inline __mmask16 tail_mask(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }

// acc[MR rows][NP panels x 4 vectors] over k: MR rows of x times NP adjacent k x kPanel panels.
// Every output element is one FMA chain over k in order from zero, whatever MR and NP are, so a
// row's result does not depend on which rows share its block (bit-identical across thread counts).
// GCC keeps acc[][] in registers only if the loops are unrolled before scalar replacement, hence
// the pragmas (without them every FMA result is also stored to the stack). MR * NP * 4 accumulators
// + NP * 4 panel vectors + 1 broadcast must fit the 32 zmm registers.
template <int MR, int NP>
inline void micro_kernel(const float* x, int64_t ldx, int64_t k, const float* panel, int64_t panel_stride,
                         float* y, int64_t ldy) {
  constexpr int NV = NP * kPanelVecs;
  static_assert(MR * NV + NV + 1 <= 32, "register blocking must fit 32 zmm registers");
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t kk = 0; kk < k; ++kk) {
    __m512 b[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v)
      b[v] = _mm512_loadu_ps(panel + (v / kPanelVecs) * panel_stride + kk * kPanel + kVec * (v % kPanelVecs));
    if constexpr (MR > 1) {
      // Keep the panel vectors in registers: for 2 and 3 rows GCC 12 folds each load into every
      // row's FMA instead (a memory operand per FMA), loading W MR times per k: n = 3 took 7.0 us
      // against 5.3 us for n = 4 at 256 -> 256. Same FMAs in the same order, so the same bits.
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) __asm__("" : "+v"(b[v]));
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(x[r * ldx + kk]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(a, b[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v)
      _mm512_storeu_ps(y + r * ldy + (v / kPanelVecs) * kPanel + kVec * (v % kPanelVecs), acc[r][v]);
}

// Rows [0, m) of x against panels [p0, p0 + NP), in blocks of 6 rows (24 accumulators).
void rows_block(const float* x, int64_t ldx, int64_t m, int64_t k, const float* panel, int64_t panel_stride,
                float* y, int64_t ldy) {
  int64_t i = 0;
  for (; i + 6 <= m; i += 6) micro_kernel<6, 1>(x + i * ldx, ldx, k, panel, panel_stride, y + i * ldy, ldy);
  const float* xi = x + i * ldx;
  float* yi = y + i * ldy;
  switch (m - i) {
    case 5: micro_kernel<5, 1>(xi, ldx, k, panel, panel_stride, yi, ldy); break;
    case 4: micro_kernel<4, 1>(xi, ldx, k, panel, panel_stride, yi, ldy); break;
    case 3: micro_kernel<3, 1>(xi, ldx, k, panel, panel_stride, yi, ldy); break;
    case 2: micro_kernel<2, 1>(xi, ldx, k, panel, panel_stride, yi, ldy); break;
    case 1: micro_kernel<1, 1>(xi, ldx, k, panel, panel_stride, yi, ldy); break;
    default: break;
  }
}

void gemm_packed(const float* x, int64_t ldx, int64_t m, int64_t k, const float* packed, int64_t n_pad,
                 float* y, int64_t ldy) {
  const int64_t panels = n_pad / kPanel;
  const int64_t stride = k * kPanel;
  if (m <= 2) {
    // One or two rows: a single panel gives only 4 or 8 FMA chains, too few to hide the FMA latency,
    // so take two panels at once (8 or 16 chains).
    int64_t p = 0;
    for (; p + 2 <= panels; p += 2) {
      if (m == 2)
        micro_kernel<2, 2>(x, ldx, k, packed + p * stride, stride, y + p * kPanel, ldy);
      else
        micro_kernel<1, 2>(x, ldx, k, packed + p * stride, stride, y + p * kPanel, ldy);
    }
    if (p < panels) rows_block(x, ldx, m, k, packed + p * stride, stride, y + p * kPanel, ldy);
    return;
  }
  for (int64_t p = 0; p < panels; ++p) rows_block(x, ldx, m, k, packed + p * stride, stride, y + p * kPanel, ldy);
}

// Where each 16 lanes lie in one group (k = 16, 32 or 48 clusters): four FMA chains, each lane's
// gemm_packed's (from zero, one FMA per j in order), a broadcast of its group's x per j. Otherwise
// gemm_packed itself, and the wanted block of each row.
void gemv_groups(const float* x, int64_t k, int64_t groups, int64_t width, const float* panel, float* y) {
  if (width % kVec != 0) {
    float rows[4 * kPanel];
    gemm_packed(x, k, groups, k, panel, kPanel, rows, kPanel);
    for (int64_t c = 0; c < groups * width; ++c) y[c] = rows[(c / width) * kPanel + c];
    return;
  }
  const float* xv[kPanelVecs];
  __m512 acc[kPanelVecs];
#pragma GCC unroll 4
  for (int v = 0; v < kPanelVecs; ++v) {
    const int64_t q = kVec * v / width;
    xv[v] = x + (q < groups ? q : groups - 1) * k;
    acc[v] = _mm512_setzero_ps();
  }
  for (int64_t j = 0; j < k; ++j) {
#pragma GCC unroll 4
    for (int v = 0; v < kPanelVecs; ++v)
      acc[v] = _mm512_fmadd_ps(_mm512_set1_ps(xv[v][j]), _mm512_loadu_ps(panel + j * kPanel + kVec * v), acc[v]);
  }
#pragma GCC unroll 4
  for (int v = 0; v < kPanelVecs; ++v) _mm512_storeu_ps(y + kVec * v, acc[v]);
}

// exp(x) for x in [-88, 88] (Cephes expf: range reduction by ln 2, degree-5 polynomial), ~1 ulp.
// The same steps as the AVX2 kernel's exp_ps.
inline __m512 exp_ps(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-88.0f)), _mm512_set1_ps(88.0f));
  const __m512 fx = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                         _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), x);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
  const __m512i pow2n = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(fx), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(y, _mm512_castsi512_ps(pow2n));
}

// Exact-form GELU 0.5 x (1 + erf(x / sqrt 2)); erf by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7),
// as in the AVX2 kernel.
inline __m512 gelu_ps(__m512 x) {
  const __m512 sign_mask = _mm512_set1_ps(-0.0f);
  const __m512 z = _mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752f));
  const __m512 az = _mm512_andnot_ps(sign_mask, z);
  const __m512 t = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_fmadd_ps(az, _mm512_set1_ps(0.3275911f), _mm512_set1_ps(1.0f)));
  __m512 p = _mm512_set1_ps(1.061405429f);
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.453152027f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.421413741f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.284496736f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.254829592f));
  p = _mm512_mul_ps(p, t);
  const __m512 e = exp_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), az), az));
  const __m512 erf_abs = _mm512_fnmadd_ps(p, e, _mm512_set1_ps(1.0f));
  const __m512 erf = _mm512_or_ps(erf_abs, _mm512_and_ps(sign_mask, z));  // copy the sign of z
  const __m512 half_x = _mm512_mul_ps(x, _mm512_set1_ps(0.5f));
  return _mm512_fmadd_ps(half_x, erf, half_x);
}

void bias_act(float* y, int64_t n, const float* bias, Activation act, int64_t act_width) {
  if (bias != nullptr) {
    int64_t j = 0;
    for (; j + kVec <= n; j += kVec)
      _mm512_storeu_ps(y + j, _mm512_add_ps(_mm512_loadu_ps(y + j), _mm512_loadu_ps(bias + j)));
    if (j < n) {
      const __mmask16 m = tail_mask(n - j);
      _mm512_mask_storeu_ps(y + j, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, y + j), _mm512_maskz_loadu_ps(m, bias + j)));
    }
  }
  if (act == Activation::kRelu) {
    const __m512 zero = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + kVec <= act_width; j += kVec) _mm512_storeu_ps(y + j, _mm512_max_ps(_mm512_loadu_ps(y + j), zero));
    if (j < act_width) {
      const __mmask16 m = tail_mask(act_width - j);
      _mm512_mask_storeu_ps(y + j, m, _mm512_max_ps(_mm512_maskz_loadu_ps(m, y + j), zero));
    }
  } else if (act == Activation::kGelu) {
    int64_t j = 0;
    for (; j + kVec <= act_width; j += kVec) _mm512_storeu_ps(y + j, gelu_ps(_mm512_loadu_ps(y + j)));
    if (j < act_width) {  // masked-off lanes hold 0, whose GELU is a harmless 0
      const __mmask16 m = tail_mask(act_width - j);
      _mm512_mask_storeu_ps(y + j, m, gelu_ps(_mm512_maskz_loadu_ps(m, y + j)));
    }
  }
}

float sum_squares(const float* y, int64_t n) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 2 * kVec <= n; j += 2 * kVec) {
    const __m512 v0 = _mm512_loadu_ps(y + j), v1 = _mm512_loadu_ps(y + j + kVec);
    a0 = _mm512_fmadd_ps(v0, v0, a0);
    a1 = _mm512_fmadd_ps(v1, v1, a1);
  }
  if (j + kVec <= n) {
    const __m512 v = _mm512_loadu_ps(y + j);
    a0 = _mm512_fmadd_ps(v, v, a0);
    j += kVec;
  }
  if (j < n) {
    const __m512 v = _mm512_maskz_loadu_ps(tail_mask(n - j), y + j);
    a1 = _mm512_fmadd_ps(v, v, a1);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}

void store_f32(const float* y, float* out, int64_t n, float scale) {
  const __m512 s = _mm512_set1_ps(scale);
  int64_t j = 0;
  for (; j + kVec <= n; j += kVec) _mm512_storeu_ps(out + j, _mm512_mul_ps(_mm512_loadu_ps(y + j), s));
  if (j < n) {
    const __mmask16 m = tail_mask(n - j);
    _mm512_mask_storeu_ps(out + j, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, y + j), s));
  }
}

inline __m256i to_half(__m512 v) { return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }

void store_f16(const float* y, uint16_t* out, int64_t n, float scale) {
  const __m512 s = _mm512_set1_ps(scale);
  int64_t j = 0;
  for (; j + kVec <= n; j += kVec)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j), to_half(_mm512_mul_ps(_mm512_loadu_ps(y + j), s)));
  if (j < n) {
    const __mmask16 m = tail_mask(n - j);
    _mm256_mask_storeu_epi16(out + j, m, to_half(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, y + j), s)));
  }
}

void half_to_float(const uint16_t* in, float* out, int64_t n) {
  int64_t j = 0;
  for (; j + kVec <= n; j += kVec)
    _mm512_storeu_ps(out + j, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + j))));
  if (j < n) {
    const __mmask16 m = tail_mask(n - j);
    _mm512_mask_storeu_ps(out + j, m, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, in + j)));
  }
}

inline __m256i to_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7fff)), lsb), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x0040));
  return _mm512_cvtepi32_epi16(r);
}

void store_bf16(const float* y, uint16_t* out, int64_t n, float scale) {
  const __m512 s = _mm512_set1_ps(scale);
  int64_t j = 0;
  for (; j + kVec <= n; j += kVec)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j), to_bf16(_mm512_mul_ps(_mm512_loadu_ps(y + j), s)));
  if (j < n) {
    const __mmask16 m = tail_mask(n - j);
    _mm256_mask_storeu_epi16(out + j, m, to_bf16(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, y + j), s)));
  }
}

inline __m512 from_bf16(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }

void bf16_to_float(const uint16_t* in, float* out, int64_t n) {
  int64_t j = 0;
  for (; j + kVec <= n; j += kVec)
    _mm512_storeu_ps(out + j, from_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + j))));
  if (j < n) {
    const __mmask16 m = tail_mask(n - j);
    _mm512_mask_storeu_ps(out + j, m, from_bf16(_mm256_maskz_loadu_epi16(m, in + j)));
  }
}

}  // namespace

const KernelSet& avx512_kernels() {
  static const KernelSet k{"avx512", gemm_packed, bias_act, sum_squares, store_f32, store_f16, half_to_float,
                           store_bf16, bf16_to_float, gemv_groups};
  return k;
}

}  // namespace bc_fast
