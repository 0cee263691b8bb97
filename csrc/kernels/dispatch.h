// Runtime choice of the kernel set after a CPU feature check.
#pragma once

#include <string>

#include "kernels.h"

namespace bc_fast {

// Features of this CPU, as "avx2 fma f16c" (those that matter to us).
std::string cpu_features();
// Whether the AVX2/FMA/F16C kernels were compiled in and this CPU (and OS) can run them.
bool avx2_usable();
// The kernel set in use. Starts at the best usable level (BC_FAST_SIMD=generic forces the fallback).
const KernelSet& active_kernels();
// Select "generic" or "avx2"; throws std::invalid_argument if unknown or unusable.
void set_simd_level(const std::string& level);

}  // namespace bc_fast
