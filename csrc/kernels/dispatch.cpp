#include "dispatch.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

namespace bc_fast {

std::string cpu_features() {
  std::string s;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2")) s += "avx2 ";
  if (__builtin_cpu_supports("fma")) s += "fma ";
  if (__builtin_cpu_supports("f16c")) s += "f16c ";
  if (__builtin_cpu_supports("avx512f")) s += "avx512f ";
#endif
  if (!s.empty()) s.pop_back();
  return s;
}

bool avx2_usable() {
#if defined(BC_FAST_HAVE_AVX2) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
  // libgcc checks XCR0 too, so these are false where the OS does not save YMM state.
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

namespace {

const KernelSet* best_kernels() {
  const char* env = std::getenv("BC_FAST_SIMD");
  if (env != nullptr && std::string(env) == "generic") return &generic_kernels();
#if defined(BC_FAST_HAVE_AVX2)
  if (avx2_usable()) return &avx2_kernels();
#endif
  return &generic_kernels();
}

std::atomic<const KernelSet*>& active_slot() {
  static std::atomic<const KernelSet*> slot{best_kernels()};
  return slot;
}

}  // namespace

const KernelSet& active_kernels() { return *active_slot().load(std::memory_order_relaxed); }

void set_simd_level(const std::string& level) {
  if (level == "generic") {
    active_slot().store(&generic_kernels());
    return;
  }
  if (level == "avx2") {
#if defined(BC_FAST_HAVE_AVX2)
    if (avx2_usable()) {
      active_slot().store(&avx2_kernels());
      return;
    }
#endif
    throw std::invalid_argument("SIMD level 'avx2' is not usable on this CPU or build");
  }
  throw std::invalid_argument("unknown SIMD level '" + level + "'; expected 'generic' or 'avx2'");
}

}  // namespace bc_fast
