// AVX2 + FMA + F16C kernels. This translation unit alone is compiled with -mavx2 -mfma -mf16c;
// dispatch.cpp only calls into it after checking the CPU.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels.h"

namespace bc_fast {
namespace {

// acc[MR rows][NV vectors of 8] over k, reading MR rows of x and a k x kPanel panel slice; with
// CONTINUE the sums start from y (the same rows' sums over the k before), else from zero.
// GCC keeps acc[][] in registers only if the r/v loops are unrolled before scalar replacement,
// hence the pragmas (without them every FMA result is also stored to the stack).
template <int MR, int NV, bool CONTINUE>
inline void micro_kernel(const float* x, int64_t ldx, int64_t k, const float* panel, float* y, int64_t ldy) {
  __m256 acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = CONTINUE ? _mm256_loadu_ps(y + r * ldy + 8 * v) : _mm256_setzero_ps();
  for (int64_t kk = 0; kk < k; ++kk) {
    __m256 b[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) b[v] = _mm256_loadu_ps(panel + kk * kPanel + 8 * v);
    if constexpr (MR > 1 && MR * NV + NV + 1 <= 16) {
      // Keep the panel vectors in registers where they fit the 16 ymm registers with the
      // accumulators: GCC 12 otherwise folds the loads into every row's FMA for 2 rows (W loaded
      // once per row: n = 2 at 256 -> 256 5.5 us, 4.7 us with this). Where they do not fit (3 x 4),
      // forcing them costs spills: GCC's own mix is better there. Same FMAs, same order, same bits.
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) __asm__("" : "+x"(b[v]));
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m256 a = _mm256_broadcast_ss(x + r * ldx + kk);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(a, b[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(y + r * ldy + 8 * v, acc[r][v]);
}

// One block of MR rows across a whole panel, in column strips of 8*NV.
template <int MR, int NV>
inline void panel_block(const float* x, int64_t ldx, int64_t k, const float* panel, float* y, int64_t ldy,
                        bool continued) {
  static_assert(kPanel % (8 * NV) == 0, "strip width must divide the panel");
  for (int c = 0; c < kPanel; c += 8 * NV) {
    if (continued)
      micro_kernel<MR, NV, true>(x, ldx, k, panel + c, y + c, ldy);
    else
      micro_kernel<MR, NV, false>(x, ldx, k, panel + c, y + c, ldy);
  }
}

// The sum over k runs in blocks of kKBlock, every row of the panel through one block before the next.
// A strip's 8*NV columns of a panel are one cache line every kPanel floats, so they fall in a quarter of
// L1's sets: over all of k (256 lines at k = 256) they are fetched from L2 again for every block of rows;
// a block's 64 lines stay in L1. On a Zen 3 core, 76-79 -> 87-92 GFLOP/s for 64-256 rows at k = 256-768.
// Each output is still one chain of FMAs over k in order (stored and reloaded between blocks exactly),
// so the bits do not change.
constexpr int64_t kKBlock = 64;

void gemm_packed(const float* x, int64_t ldx, int64_t m, int64_t k, const float* packed, int64_t n_pad,
                 float* y, int64_t ldy) {
  const int64_t panels = n_pad / kPanel;
  for (int64_t p = 0; p < panels; ++p) {
    float* yp = y + p * kPanel;
    for (int64_t k0 = 0; k0 < k; k0 += kKBlock) {
      const int64_t kb = std::min(kKBlock, k - k0);
      const float* panel = packed + (p * k + k0) * kPanel;
      const float* xk = x + k0;
      const bool continued = k0 > 0;
      int64_t i = 0;
      for (; i + 6 <= m; i += 6) panel_block<6, 2>(xk + i * ldx, ldx, kb, panel, yp + i * ldy, ldy, continued);
      switch (m - i) {  // few rows left: wider strips keep enough FMAs in flight
        case 5: panel_block<5, 2>(xk + i * ldx, ldx, kb, panel, yp + i * ldy, ldy, continued); break;
        case 4: panel_block<4, 2>(xk + i * ldx, ldx, kb, panel, yp + i * ldy, ldy, continued); break;
        case 3: panel_block<3, 4>(xk + i * ldx, ldx, kb, panel, yp + i * ldy, ldy, continued); break;
        case 2: panel_block<2, 4>(xk + i * ldx, ldx, kb, panel, yp + i * ldy, ldy, continued); break;
        case 1: panel_block<1, 8>(xk + i * ldx, ldx, kb, panel, yp + i * ldy, ldy, continued); break;
        default: break;
      }
    }
  }
}

// Where each 8 lanes lie in one group (k a multiple of 8): eight FMA chains, each lane's gemm_packed's
// (from zero, one FMA per j in order), a broadcast of its group's x per j. Otherwise gemm_packed itself,
// and the wanted block of each row.
void gemv_groups(const float* x, int64_t k, int64_t groups, int64_t width, const float* panel, float* y) {
  constexpr int kVecs = kPanel / 8;
  if (width % 8 != 0) {
    float rows[4 * kPanel];
    gemm_packed(x, k, groups, k, panel, kPanel, rows, kPanel);
    for (int64_t c = 0; c < groups * width; ++c) y[c] = rows[(c / width) * kPanel + c];
    return;
  }
  const float* xv[kVecs];
  __m256 acc[kVecs];
#pragma GCC unroll 8
  for (int v = 0; v < kVecs; ++v) {
    const int64_t q = 8 * v / width;
    xv[v] = x + (q < groups ? q : groups - 1) * k;
    acc[v] = _mm256_setzero_ps();
  }
  for (int64_t j = 0; j < k; ++j) {
#pragma GCC unroll 8
    for (int v = 0; v < kVecs; ++v)
      acc[v] = _mm256_fmadd_ps(_mm256_set1_ps(xv[v][j]), _mm256_loadu_ps(panel + j * kPanel + 8 * v), acc[v]);
  }
#pragma GCC unroll 8
  for (int v = 0; v < kVecs; ++v) _mm256_storeu_ps(y + 8 * v, acc[v]);
}

// exp(x) for x in [-88, 88] (Cephes expf: range reduction by ln 2, degree-5 polynomial), ~1 ulp.
inline __m256 exp_ps(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-88.0f)), _mm256_set1_ps(88.0f));
  const __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(pow2n));
}

// Exact-form GELU 0.5 x (1 + erf(x / sqrt 2)); erf by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7).
inline __m256 gelu_ps(__m256 x) {
  const __m256 sign_mask = _mm256_set1_ps(-0.0f);
  const __m256 z = _mm256_mul_ps(x, _mm256_set1_ps(0.70710678118654752f));
  const __m256 az = _mm256_andnot_ps(sign_mask, z);
  const __m256 t = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_fmadd_ps(az, _mm256_set1_ps(0.3275911f), _mm256_set1_ps(1.0f)));
  __m256 p = _mm256_set1_ps(1.061405429f);
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-1.453152027f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.421413741f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-0.284496736f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.254829592f));
  p = _mm256_mul_ps(p, t);
  const __m256 e = exp_ps(_mm256_mul_ps(_mm256_sub_ps(_mm256_setzero_ps(), az), az));
  const __m256 erf_abs = _mm256_fnmadd_ps(p, e, _mm256_set1_ps(1.0f));
  const __m256 erf = _mm256_or_ps(erf_abs, _mm256_and_ps(sign_mask, z));  // copy the sign of z
  const __m256 half_x = _mm256_mul_ps(x, _mm256_set1_ps(0.5f));
  return _mm256_fmadd_ps(half_x, erf, half_x);
}

void bias_act(float* y, int64_t n, const float* bias, Activation act, int64_t act_width) {
  if (bias != nullptr) {
    int64_t j = 0;
    for (; j + 8 <= n; j += 8)
      _mm256_storeu_ps(y + j, _mm256_add_ps(_mm256_loadu_ps(y + j), _mm256_loadu_ps(bias + j)));
    for (; j < n; ++j) y[j] += bias[j];
  }
  if (act == Activation::kRelu) {
    const __m256 zero = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= act_width; j += 8) _mm256_storeu_ps(y + j, _mm256_max_ps(_mm256_loadu_ps(y + j), zero));
    for (; j < act_width; ++j) y[j] = y[j] > 0.0f ? y[j] : 0.0f;
  } else if (act == Activation::kGelu) {
    int64_t j = 0;
    for (; j + 8 <= act_width; j += 8) _mm256_storeu_ps(y + j, gelu_ps(_mm256_loadu_ps(y + j)));
    for (; j < act_width; ++j) y[j] = gelu_exact(y[j]);
  }
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

float sum_squares(const float* y, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m256 v0 = _mm256_loadu_ps(y + j), v1 = _mm256_loadu_ps(y + j + 8);
    a0 = _mm256_fmadd_ps(v0, v0, a0);
    a1 = _mm256_fmadd_ps(v1, v1, a1);
  }
  float s = hsum(_mm256_add_ps(a0, a1));
  for (; j < n; ++j) s += y[j] * y[j];
  return s;
}

void store_f32(const float* y, float* out, int64_t n, float scale) {
  const __m256 s = _mm256_set1_ps(scale);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(out + j, _mm256_mul_ps(_mm256_loadu_ps(y + j), s));
  for (; j < n; ++j) out[j] = y[j] * scale;
}

void store_f16(const float* y, uint16_t* out, int64_t n, float scale) {
  const __m256 s = _mm256_set1_ps(scale);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_mul_ps(_mm256_loadu_ps(y + j), s), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + j), h);
  }
  for (; j < n; ++j) out[j] = float_to_half_bits(y[j] * scale);
}

void half_to_float(const uint16_t* in, float* out, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    _mm256_storeu_ps(out + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + j))));
  for (; j < n; ++j) out[j] = half_bits_to_float(in[j]);
}

void store_bf16(const float* y, uint16_t* out, int64_t n, float scale) {
  const __m256 s = _mm256_set1_ps(scale);
  const __m256i bias = _mm256_set1_epi32(0x7fff), one = _mm256_set1_epi32(1), quiet = _mm256_set1_epi32(0x0040);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(y + j), s);
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), one);
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, bias), lsb), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(bits, 16), quiet), nan);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + j),
                     _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
  }
  for (; j < n; ++j) out[j] = float_to_bf16_bits(y[j] * scale);
}

void bf16_to_float(const uint16_t* in, float* out, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + j)));
    _mm256_storeu_ps(out + j, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
  }
  for (; j < n; ++j) out[j] = bf16_bits_to_float(in[j]);
}

}  // namespace

const KernelSet& avx2_kernels() {
  static const KernelSet k{"avx2", gemm_packed, bias_act, sum_squares, store_f32, store_f16, half_to_float,
                           store_bf16, bf16_to_float, gemv_groups};
  return k;
}

}  // namespace bc_fast
