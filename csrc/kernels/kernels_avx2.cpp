// AVX2 + FMA + F16C kernels. This translation unit alone is compiled with -mavx2 -mfma -mf16c;
// dispatch.cpp only calls into it after checking the CPU.
#include <immintrin.h>

#include <cmath>
#include <cstring>

#include "kernels.h"

namespace bc_fast {
namespace {

// acc[MR rows][NV vectors of 8] over k, reading MR rows of x and a k x kPanel panel slice.
template <int MR, int NV>
inline void micro_kernel(const float* x, int64_t ldx, int64_t k, const float* panel, float* y, int64_t ldy) {
  __m256 acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_setzero_ps();
  for (int64_t kk = 0; kk < k; ++kk) {
    __m256 b[NV];
    for (int v = 0; v < NV; ++v) b[v] = _mm256_loadu_ps(panel + kk * kPanel + 8 * v);
    for (int r = 0; r < MR; ++r) {
      const __m256 a = _mm256_broadcast_ss(x + r * ldx + kk);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(a, b[v], acc[r][v]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(y + r * ldy + 8 * v, acc[r][v]);
}

// One block of MR rows across a whole panel, in column strips of 8*NV.
template <int MR, int NV>
inline void panel_block(const float* x, int64_t ldx, int64_t k, const float* panel, float* y, int64_t ldy) {
  static_assert(kPanel % (8 * NV) == 0, "strip width must divide the panel");
  for (int c = 0; c < kPanel; c += 8 * NV) micro_kernel<MR, NV>(x, ldx, k, panel + c, y + c, ldy);
}

void gemm_packed(const float* x, int64_t ldx, int64_t m, int64_t k, const float* packed, int64_t n_pad,
                 float* y, int64_t ldy) {
  const int64_t panels = n_pad / kPanel;
  for (int64_t p = 0; p < panels; ++p) {
    const float* panel = packed + p * k * kPanel;
    float* yp = y + p * kPanel;
    int64_t i = 0;
    for (; i + 6 <= m; i += 6) panel_block<6, 2>(x + i * ldx, ldx, k, panel, yp + i * ldy, ldy);
    switch (m - i) {  // few rows left: wider strips keep enough FMAs in flight
      case 5: panel_block<5, 2>(x + i * ldx, ldx, k, panel, yp + i * ldy, ldy); break;
      case 4: panel_block<4, 2>(x + i * ldx, ldx, k, panel, yp + i * ldy, ldy); break;
      case 3: panel_block<3, 4>(x + i * ldx, ldx, k, panel, yp + i * ldy, ldy); break;
      case 2: panel_block<2, 4>(x + i * ldx, ldx, k, panel, yp + i * ldy, ldy); break;
      case 1: panel_block<1, 8>(x + i * ldx, ldx, k, panel, yp + i * ldy, ldy); break;
      default: break;
    }
  }
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
    for (int64_t j = 0; j < act_width; ++j) y[j] = gelu_exact(y[j]);
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

}  // namespace

const KernelSet& avx2_kernels() {
  static const KernelSet k{"avx2", gemm_packed, bias_act, sum_squares, store_f32, store_f16, half_to_float};
  return k;
}

}  // namespace bc_fast
