#include "dispatch.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

namespace bc_fast {

std::string cpu_vendor() {
#if defined(__x86_64__) || defined(__i386__)
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (__get_cpuid(0, &a, &b, &c, &d) == 0) return "";
  char v[13];
  std::memcpy(v, &b, 4);
  std::memcpy(v + 4, &d, 4);
  std::memcpy(v + 8, &c, 4);
  v[12] = '\0';
  return v;
#else
  return "";
#endif
}

std::string cpu_features() {
  std::string s;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2")) s += "avx2 ";
  if (__builtin_cpu_supports("fma")) s += "fma ";
  if (__builtin_cpu_supports("f16c")) s += "f16c ";
  if (__builtin_cpu_supports("avx512f")) s += "avx512f ";
  if (__builtin_cpu_supports("avx512dq")) s += "avx512dq ";
  if (__builtin_cpu_supports("avx512bw")) s += "avx512bw ";
  if (__builtin_cpu_supports("avx512vl")) s += "avx512vl ";
  if (__builtin_cpu_supports("avx512bf16")) s += "avx512bf16 ";
  // AMX (CPUID.(7,0):EDX bits 24 and 22): reported, not used by the kernels yet.
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (__get_cpuid_count(7, 0, &a, &b, &c, &d) != 0) {
    if (d & (1u << 24)) s += "amx_tile ";
    if (d & (1u << 22)) s += "amx_bf16 ";
  }
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

bool avx512_usable() {
#if defined(BC_FAST_HAVE_AVX512) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
  // libgcc reports AVX-512 features only where XCR0 shows the OS saves the opmask and ZMM state.
  return avx2_usable() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

std::vector<std::string> usable_simd_levels() {
  std::vector<std::string> levels{"generic"};
  if (avx2_usable()) levels.emplace_back("avx2");
  if (avx512_usable()) levels.emplace_back("avx512");
  return levels;
}

namespace {

// The kernel set for a level name, or null if the name is unknown or the level unusable here.
const KernelSet* kernels_for(const std::string& level) {
  if (level == "generic") return &generic_kernels();
#if defined(BC_FAST_HAVE_AVX2)
  if (level == "avx2" && avx2_usable()) return &avx2_kernels();
#endif
#if defined(BC_FAST_HAVE_AVX512)
  if (level == "avx512" && avx512_usable()) return &avx512_kernels();
#endif
  return nullptr;
}

const KernelSet* best_kernels() {
  const char* env = std::getenv("BC_FAST_SIMD");
  if (env != nullptr && *env != '\0') {
    if (const KernelSet* forced = kernels_for(env)) return forced;
  }
  return kernels_for(usable_simd_levels().back());
}

std::atomic<const KernelSet*>& active_slot() {
  static std::atomic<const KernelSet*> slot{best_kernels()};
  return slot;
}

std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (const std::string& e : v) s += (s.empty() ? "" : ", ") + e;
  return s;
}

}  // namespace

const KernelSet& active_kernels() { return *active_slot().load(std::memory_order_relaxed); }

void set_simd_level(const std::string& level) {
  if (const KernelSet* k = kernels_for(level)) {
    active_slot().store(k);
    return;
  }
  const std::string usable = join(usable_simd_levels());
  if (level == "avx2" || level == "avx512")
    throw std::invalid_argument("SIMD level '" + level + "' is not usable on this CPU or build; usable levels: " +
                                usable);
  throw std::invalid_argument("unknown SIMD level '" + level +
                              "'; expected 'generic', 'avx2' or 'avx512' (usable levels: " + usable + ")");
}

std::string bf16_unavailable_reason() {
#if defined(BC_FAST_HAVE_AVX512BF16) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
  if (!avx512_usable() || !__builtin_cpu_supports("avx512bf16"))
    return "this CPU lacks the AVX512_BF16 instruction set extension (it has: " + cpu_features() + ")";
  const char* level = active_kernels().name;
  if (std::strcmp(level, "avx512") != 0)
    return std::string("the SIMD level is forced to '") + level +
           "' (BC_FAST_SIMD or set_simd_level), below the 'avx512' level that AVX512_BF16 needs";
  return "";
#else
  return "this build of bc_fast has no AVX512_BF16 kernels (not x86-64, or the compiler lacks -mavx512bf16)";
#endif
}

const Bf16Kernels& bf16_kernels() {
  const std::string why = bf16_unavailable_reason();
  if (!why.empty())
    throw std::runtime_error("precision='bf16' is not available: " + why + "; use precision='fp32'");
#if defined(BC_FAST_HAVE_AVX512BF16)
  return avx512bf16_kernels();
#else
  throw std::runtime_error("unreachable");
#endif
}

}  // namespace bc_fast
