// <immintrin.h> for the AVX-512 translation units (kernels_avx512.cpp, kernels_avx512bf16.cpp).
// GCC 12's AVX-512 headers start some intrinsics from an uninitialised __Y (GCC bug 105593), which
// -Wall reports wherever they are inlined; the value is never read.
#pragma once

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
