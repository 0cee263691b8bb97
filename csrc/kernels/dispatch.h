// Runtime choice of the kernel set after a CPU feature check.
#pragma once

#include <string>
#include <vector>

#include "kernels.h"

namespace bc_fast {

// Features of this CPU, as "avx2 fma f16c avx512f ..." (those that matter to us).
std::string cpu_features();
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

}  // namespace bc_fast
