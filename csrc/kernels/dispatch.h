// Runtime choice of the kernel set after a CPU feature check.
#pragma once

#include <string>
#include <vector>

#include "kernels.h"

namespace bc_fast {

// Features of this CPU, as "avx2 fma f16c avx512f ..." (those that matter to us; amx_tile and amx_bf16
// are reported, not used).
std::string cpu_features();
// The CPUID vendor string ("GenuineIntel", "AuthenticAMD"), or "" where there is none.
std::string cpu_vendor();
// Whether the AVX2/FMA/F16C kernels were compiled in and this CPU (and OS) can run them.
bool avx2_usable();
// Whether the AVX-512 F/DQ/BW/VL kernels were compiled in and this CPU (and OS) can run them.
bool avx512_usable();
// The levels this build can run on this CPU, lowest first: "generic", then "avx2", "avx512".
std::vector<std::string> usable_simd_levels();
// The kernel set in use. Starts at the best usable level; BC_FAST_SIMD=generic|avx2|avx512 forces
// a level (one this CPU cannot run, or an unknown name, falls back to the best usable).
const KernelSet& active_kernels();
// Select "generic", "avx2" or "avx512"; throws std::invalid_argument if unknown or unusable.
void set_simd_level(const std::string& level);

// Why precision="bf16" cannot run now, or "" if it can: the AVX512-BF16 kernels must be compiled in,
// the CPU must have AVX512_BF16 (and the AVX-512 level), and the active level must be avx512 (not
// forced lower by BC_FAST_SIMD or set_simd_level).
std::string bf16_unavailable_reason();
// The bf16 kernels; throws std::runtime_error with bf16_unavailable_reason() where they cannot run.
const Bf16Kernels& bf16_kernels();

}  // namespace bc_fast
