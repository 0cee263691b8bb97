// bf16 GEMM with fp32 accumulation (AVX512-BF16: vcvtne2ps2bf16, vdpbf16ps). This translation unit
// alone is compiled with -mavx512f -mavx512bw -mavx512vl -mavx512bf16 -mfma; dispatch.cpp only hands
// out its table after checking the CPU (and that the OS saves ZMM state). Like kernels_avx512.cpp it
// includes no standard headers with inline functions, so no AVX-512 copy of a shared inline function
// can be picked by the linker for baseline code.
#include <cstdint>

#include "avx512_intrinsics.h"
#include "kernels.h"

namespace bc_fast {
namespace {

constexpr int kVec = 16;                        // fp32 lanes (= bf16 pairs) per zmm
constexpr int kPanelVecs = kBf16Panel / kVec;   // 2 zmm across a panel
constexpr int64_t kBlockPairs = 128;  // K block: 256 values of k; a 32-column B block is 16 KB (L1)

inline __mmask16 mask16(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }

// Offset of vector v of a block of adjacent panels: within a row of y or bias (panel_stride = kBf16Panel),
// or within one pair of k of packed weights (panel_stride = k_pairs * kBf16Panel).
constexpr int64_t vec_offset(int v, int64_t panel_stride) {
  return (v / kPanelVecs) * panel_stride + kVec * (v % kPanelVecs);
}

// Rows of x (fp32, row stride ldx, k values) to bf16 pairs (row stride lda dwords, k_pairs = ceil(k / 2)
// of them, the odd tail padded with +0), rounded to nearest even by vcvtne2ps2bf16.
void convert_rows(const float* x, int64_t ldx, int64_t m, int64_t k, uint32_t* a, int64_t lda) {
  for (int64_t r = 0; r < m; ++r) {
    const float* xr = x + r * ldx;
    uint32_t* ar = a + r * lda;
    int64_t j = 0;
    for (; j + 2 * kVec <= k; j += 2 * kVec) {
      const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(xr + j + kVec), _mm512_loadu_ps(xr + j));
      _mm512_storeu_si512(ar + j / 2, reinterpret_cast<const __m512i&>(v));
    }
    if (j < k) {
      const int64_t rest = k - j;  // 1..31 values, 1..16 pairs
      const __m512 lo = _mm512_maskz_loadu_ps(mask16(rest < kVec ? rest : kVec), xr + j);
      const __m512 hi = rest > kVec ? _mm512_maskz_loadu_ps(mask16(rest - kVec), xr + j + kVec) : _mm512_setzero_ps();
      const __m512bh v = _mm512_cvtne2ps_pbh(hi, lo);
      _mm512_mask_storeu_epi32(ar + j / 2, mask16((rest + 1) / 2), reinterpret_cast<const __m512i&>(v));
    }
  }
}

// acc[MR rows][NV vectors] (+)= a[MR rows, kp pairs] . b[kp pairs, NV * 16 columns], one vdpbf16ps
// chain per output over k in order, from zero or from y. Which rows share the block does not change a
// row's result, so results are bit-identical across thread counts. MR * NV + NV + 1 <= 32 zmm.
// init: null starts the chains from y (a later K block), else from init[0, NV * 16) (the bias, or zeros).
template <int MR, int NV>
inline void micro_kernel(const uint32_t* a, int64_t lda, int64_t kp, const uint32_t* b, int64_t panel_stride,
                         float* y, int64_t ldy, const float* init) {
  static_assert(MR * NV + NV + 1 <= 32, "register blocking must fit 32 zmm registers");
  __m512 acc[MR][NV];
  if (init == nullptr) {
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v)
        acc[r][v] = _mm512_loadu_ps(y + r * ldy + vec_offset(v, kBf16Panel));
  } else {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[0][v] = _mm512_loadu_ps(init + vec_offset(v, kBf16Panel));
#pragma GCC unroll 16
    for (int r = 1; r < MR; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = acc[0][v];
  }
  for (int64_t kk = 0; kk < kp; ++kk) {
    __m512bh bv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      const __m512i w = _mm512_loadu_si512(b + kk * kBf16Panel + vec_offset(v, panel_stride));
      bv[v] = reinterpret_cast<const __m512bh&>(w);
    }
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m512i p = _mm512_set1_epi32(static_cast<int>(a[r * lda + kk]));
      const __m512bh av = reinterpret_cast<const __m512bh&>(p);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, bv[v]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v)
      _mm512_storeu_ps(y + r * ldy + vec_offset(v, kBf16Panel), acc[r][v]);
}

constexpr int kRows = 12;  // 12 rows x 2 zmm: 24 accumulators, 2 B loads + 12 broadcasts per pair of k

// x: null, or the fp32 rows (stride ldx, k values) that a holds, rounded into a block by block just
// before the block's first use, so reading x from memory overlaps the arithmetic.
template <int NV>
void rows_block(uint32_t* a, int64_t lda, int64_t m, int64_t kp, const uint32_t* b, int64_t panel_stride, float* y,
                int64_t ldy, const float* acc, const float* x = nullptr, int64_t ldx = 0, int64_t k = 0) {
  int64_t i = 0;
  for (; i + kRows <= m; i += kRows) {
    if (x != nullptr) convert_rows(x + i * ldx, ldx, kRows, k, a + i * lda, lda);
    micro_kernel<kRows, NV>(a + i * lda, lda, kp, b, panel_stride, y + i * ldy, ldy, acc);
  }
  if (x != nullptr && i < m) convert_rows(x + i * ldx, ldx, m - i, k, a + i * lda, lda);
  a += i * lda;
  y += i * ldy;
  switch (m - i) {
    case 11: micro_kernel<11, NV>(a, lda, kp, b, panel_stride, y, ldy, acc); break;
    case 10: micro_kernel<10, NV>(a, lda, kp, b, panel_stride, y, ldy, acc); break;
    case 9: micro_kernel<9, NV>(a, lda, kp, b, panel_stride, y, ldy, acc); break;
    case 8: micro_kernel<8, NV>(a, lda, kp, b, panel_stride, y, ldy, acc); break;
    case 7: micro_kernel<7, NV>(a, lda, kp, b, panel_stride, y, ldy, acc); break;
    case 6: micro_kernel<6, NV>(a, lda, kp, b, panel_stride, y, ldy, acc); break;
    case 5: micro_kernel<5, NV>(a, lda, kp, b, panel_stride, y, ldy, acc); break;
    case 4: micro_kernel<4, NV>(a, lda, kp, b, panel_stride, y, ldy, acc); break;
    case 3: micro_kernel<3, NV>(a, lda, kp, b, panel_stride, y, ldy, acc); break;
    case 2: micro_kernel<2, NV>(a, lda, kp, b, panel_stride, y, ldy, acc); break;
    case 1: micro_kernel<1, NV>(a, lda, kp, b, panel_stride, y, ldy, acc); break;
    default: break;
  }
}

// y[m x n_pad] (row stride ldy) = bias + bf16(x[m x k]) @ packed, where packed holds n_pad / 32 panels of
// kp = ceil(k / 2) x 32 dwords (see kernels.h) and bias n_pad values; a (row stride lda >= kp dwords)
// receives x rounded to bf16 pairs. Per 32-column panel, K in blocks of kBlockPairs (the B block stays in
// L1 while all m rows stream past it from L2), rows in blocks of kRows. Each output is one chain: bias,
// then the pairs of k in order.
void gemm(const float* x, int64_t ldx, int64_t m, int64_t k, uint32_t* a, int64_t lda, const uint32_t* packed,
          int64_t n_pad, const float* bias, float* y, int64_t ldy) {
  const int64_t panels = n_pad / kBf16Panel;
  const int64_t kp = (k + 1) / 2;
  const int64_t stride = kp * kBf16Panel;
  if (m <= 2) {
    convert_rows(x, ldx, m, k, a, lda);
    // One or two rows: 2 zmm per panel give too few independent chains to hide vdpbf16ps latency;
    // take four panels (8 chains per row) at once.
    int64_t p = 0;
    for (; p + 4 <= panels; p += 4) {
      const uint32_t* b = packed + p * stride;
      float* yp = y + p * kBf16Panel;
      if (m == 2)
        micro_kernel<2, 8>(a, lda, kp, b, stride, yp, ldy, bias + p * kBf16Panel);
      else
        micro_kernel<1, 8>(a, lda, kp, b, stride, yp, ldy, bias + p * kBf16Panel);
    }
    for (; p < panels; ++p) {
      const int64_t col = p * kBf16Panel;
      rows_block<kPanelVecs>(a, lda, m, kp, packed + p * stride, stride, y + col, ldy, bias + col);
    }
    return;
  }
  for (int64_t p = 0; p < panels; ++p) {
    const uint32_t* b = packed + p * stride;
    float* yp = y + p * kBf16Panel;
    for (int64_t k0 = 0; k0 < kp; k0 += kBlockPairs) {
      const int64_t kb = kp - k0 < kBlockPairs ? kp - k0 : kBlockPairs;
      rows_block<kPanelVecs>(a + k0, lda, m, kb, b + k0 * kBf16Panel, stride, yp, ldy,
                             k0 > 0 ? nullptr : bias + p * kBf16Panel, p == 0 && k0 == 0 ? x : nullptr, ldx, k);
    }
  }
}

}  // namespace

const Bf16Kernels& avx512bf16_kernels() {
  static const Bf16Kernels k{"avx512bf16", convert_rows, gemm};
  return k;
}

}  // namespace bc_fast
