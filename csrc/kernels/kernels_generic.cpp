// Portable kernels: plain C++ the compiler vectorises for the baseline ISA.
#include <cmath>
#include <cstring>

#include "kernels.h"

namespace bc_fast {

float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t mant = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal half: normalise
      int e = -1;
      do {
        ++e;
        mant <<= 1;
      } while ((mant & 0x400u) == 0);
      bits = sign | static_cast<uint32_t>(127 - 15 - e) << 23 | (mant & 0x3FFu) << 13;
    }
  } else if (exp == 0x1F) {
    bits = sign | 0x7F800000u | mant << 13;
  } else {
    bits = sign | (exp + 127 - 15) << 23 | mant << 13;
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

uint16_t float_to_half_bits(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t abs = x & 0x7FFFFFFFu;
  if (abs >= 0x7F800000u) {  // Inf or NaN
    return sign | 0x7C00u | (abs > 0x7F800000u ? 0x200u : 0u);
  }
  if (abs >= 0x477FF000u) return sign | 0x7C00u;  // rounds to >= 65520: overflow to Inf
  if (abs < 0x38800000u) {                          // below the smallest normal half
    if (abs < 0x33000000u) return sign;            // rounds to zero
    const uint32_t e = abs >> 23;
    const uint32_t m = (abs & 0x7FFFFFu) | 0x800000u;
    const uint32_t shift = 126 - e;  // 14..24
    uint32_t h = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1);
    const uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (h & 1u))) ++h;
    return sign | static_cast<uint16_t>(h);
  }
  uint32_t h = ((abs >> 13) - (112u << 10));
  const uint32_t rem = abs & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // round to nearest even
  return sign | static_cast<uint16_t>(h);
}

float gelu_exact(float x) { return 0.5f * x * (1.0f + std::erf(x * 0.70710678118654752f)); }

namespace {

void gemm_packed(const float* x, int64_t ldx, int64_t m, int64_t k, const float* packed, int64_t n_pad,
                 float* y, int64_t ldy) {
  const int64_t panels = n_pad / kPanel;
  for (int64_t i = 0; i < m; ++i) {
    const float* xi = x + i * ldx;
    for (int64_t p = 0; p < panels; ++p) {
      float acc[kPanel] = {};
      const float* panel = packed + p * k * kPanel;
      for (int64_t kk = 0; kk < k; ++kk) {
        const float a = xi[kk];
        const float* b = panel + kk * kPanel;
        for (int c = 0; c < kPanel; ++c) acc[c] += a * b[c];
      }
      std::memcpy(y + i * ldy + p * kPanel, acc, sizeof acc);
    }
  }
}

// The portable level has no faster way: gemm_packed itself, then the wanted block of each row.
void gemv_groups(const float* x, int64_t k, int64_t groups, int64_t width, const float* panel, float* y) {
  float rows[4 * kPanel];
  gemm_packed(x, k, groups, k, panel, kPanel, rows, kPanel);
  for (int64_t c = 0; c < groups * width; ++c) y[c] = rows[(c / width) * kPanel + c];
}

void bias_act(float* y, int64_t n, const float* bias, Activation act, int64_t act_width) {
  if (bias != nullptr)
    for (int64_t j = 0; j < n; ++j) y[j] += bias[j];
  if (act == Activation::kRelu) {
    for (int64_t j = 0; j < act_width; ++j) y[j] = y[j] > 0.0f ? y[j] : 0.0f;
  } else if (act == Activation::kGelu) {
    for (int64_t j = 0; j < act_width; ++j) y[j] = gelu_exact(y[j]);
  }
}

float sum_squares(const float* y, int64_t n) {
  double s = 0.0;
  for (int64_t j = 0; j < n; ++j) s += static_cast<double>(y[j]) * y[j];
  return static_cast<float>(s);
}

void store_f32(const float* y, float* out, int64_t n, float scale) {
  for (int64_t j = 0; j < n; ++j) out[j] = y[j] * scale;
}

void store_f16(const float* y, uint16_t* out, int64_t n, float scale) {
  for (int64_t j = 0; j < n; ++j) out[j] = float_to_half_bits(y[j] * scale);
}

void half_to_float(const uint16_t* in, float* out, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] = half_bits_to_float(in[j]);
}

void store_bf16(const float* y, uint16_t* out, int64_t n, float scale) {
  for (int64_t j = 0; j < n; ++j) out[j] = float_to_bf16_bits(y[j] * scale);
}

void bf16_to_float(const uint16_t* in, float* out, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] = bf16_bits_to_float(in[j]);
}

}  // namespace

uint16_t float_to_bf16_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x0040u);  // quiet NaN
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

float bf16_bits_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

const KernelSet& generic_kernels() {
  static const KernelSet k{"generic", gemm_packed, bias_act, sum_squares, store_f32, store_f16, half_to_float,
                           store_bf16, bf16_to_float, gemv_groups};
  return k;
}

}  // namespace bc_fast
