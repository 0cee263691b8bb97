// The fused sm_90a layer kernel's entry points (layer_gemm_sm90.h): which arguments it takes, and the
// dispatch to the instance of the chosen variant (layer_gemm_sm90_instances.h). No CUTLASS header here.
#include "layer_gemm_sm90.h"

#include <atomic>
#include <climits>
#include <stdexcept>

#include "layer_gemm_sm90_instances.h"

namespace bc_fast::cuda {
namespace {

// Cooperative schedule, direct stores: the pair measured on an H200 (bench/gpu_kernels.py). The staged
// store and the pingpong schedule are built and tested but not yet timed on a GPU.
std::atomic<int> g_schedule{static_cast<int>(Sm90Schedule::kCooperative)};
std::atomic<int> g_store{static_cast<int>(Sm90Store::kDirect)};

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace

Sm90Variant sm90_variant() {
  return {static_cast<Sm90Schedule>(g_schedule.load()), static_cast<Sm90Store>(g_store.load())};
}

void set_sm90_variant(Sm90Variant v) {
  g_schedule.store(static_cast<int>(v.schedule));
  g_store.store(static_cast<int>(v.store));
}

bool layer_gemm_sm90_built() { return true; }

bool layer_gemm_sm90_supports(DType t, const LayerGemmArgs& a) {
  if (t != DType::kFloat16 && t != DType::kBFloat16) return false;
  if (a.m <= 0 || a.m > INT_MAX || a.n <= 0 || a.k <= 0 || a.n > INT_MAX / 2 || a.k > INT_MAX / 2) return false;
  if (a.k % 8 != 0 || a.n % 8 != 0) return false;
  if (a.normalize && a.n > kLayerGemmMaxNormWidth) return false;
  if (a.act_width < 0 || a.act_width > a.n) return false;
  return aligned16(a.x) && aligned16(a.w) && aligned16(a.out) && (a.bias == nullptr || aligned16(a.bias));
}

size_t layer_gemm_sm90_workspace(DType t, const LayerGemmArgs& a) {
  return sm90::with_instance(a.variant, [&](auto v) {
    return sm90::instance_workspace<decltype(v)::schedule, decltype(v)::store>(t, a);
  });
}

void layer_gemm_sm90(DType t, const LayerGemmArgs& a, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (!layer_gemm_sm90_supports(t, a)) throw std::invalid_argument("layer_gemm_sm90: unsupported arguments");
  sm90::with_instance(a.variant, [&](auto v) {
    sm90::instance_run<decltype(v)::schedule, decltype(v)::store>(t, a, workspace, workspace_bytes, stream);
  });
}

}  // namespace bc_fast::cuda
