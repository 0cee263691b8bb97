// oneDNN's bf16 matmul as FusedOp's GEMM (precision "bf16", backend "onednn"). The library is loaded at run
// time from a path the caller gives (a libdnnl.so.3 of oneDNN 3.x, such as the onednn-cpu-gomp wheel's), never
// linked: the core builds and runs without it. On CPUs with AMX, oneDNN's JIT kernels use the tile units (and ask
// the kernel for AMX state themselves); elsewhere they use AVX512-BF16 or AVX-512. Plain C++: no Python here.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "kernels/kernels.h"

namespace bc_fast {

// Loads oneDNN from `path`, once per process: later calls return the first call's result, whatever their path.
// Returns "" on success, else why not (no such file, not oneDNN 3.x with an OpenMP or sequential CPU runtime, a
// missing symbol, enum values other than this file expects, no CPU engine).
std::string onednn_load(const std::string& path);
// "oneDNN 3.2.0 (<path>)" once loaded, else "".
std::string onednn_version();

// One layer's GEMM, y = act(bias + bf16(x) @ bf16(W)^T) with fp32 accumulation, by oneDNN's matmul: fp32 output,
// or (fused_output) the activation applied by oneDNN and the result rounded to bf16 (nearest even), ready to be
// the next layer's input. Its primitives are made for fixed row counts (multiples of kRowStep) and for one thread
// each, so the bits of a block of rows do not depend on how many threads run the batch. W is rounded to bf16 and
// reordered to the primitive's layout once, at construction.
class OnednnGemm {
 public:
  static constexpr int64_t kRowStep = 16;

  // weight: n x k row-major fp32; bias: n values or null. `main_rows`: the block size most calls use, whose
  // primitive is made here. fused_output: y is bf16, act(...) applied by oneDNN (act must be fusable, see
  // can_fuse); otherwise y is fp32 without activation. Throws std::runtime_error when oneDNN is not loaded or
  // refuses the shape.
  OnednnGemm(const float* weight, const float* bias, int64_t k, int64_t n, int64_t main_rows,
             bool fused_output = false, Activation act = Activation::kNone);
  ~OnednnGemm();
  OnednnGemm(const OnednnGemm&) = delete;
  OnednnGemm& operator=(const OnednnGemm&) = delete;

  // The rows computed for a block of m rows: m rounded up to kRowStep. `a` and `y` of run() hold that many.
  static int64_t padded_rows(int64_t m) { return (m + kRowStep - 1) / kRowStep * kRowStep; }
  // Whether oneDNN can apply `act` itself (its eltwise post-op of that name was found when it was loaded).
  static bool can_fuse(Activation act);
  // y[padded_rows(m) x n] (contiguous; fp32, or bf16 bits when fused_output) = act(bias + a @ W^T), with
  // a[padded_rows(m) x k] contiguous bf16 bits. Thread-safe; primitives for new row counts are made on first
  // use and kept.
  void run(const uint16_t* a, int64_t m, void* y) const;
  // oneDNN's name for the kernel it picked for the main block size, e.g. "brg:avx512_core_amx".
  const std::string& impl() const { return impl_; }

 private:
  struct Kernel;
  const Kernel& kernel(int64_t rows) const;
  std::unique_ptr<Kernel> make_kernel(int64_t rows, const Kernel* like) const;

  int64_t k_, n_;
  bool fused_output_ = false;
  Activation act_ = Activation::kNone;
  int64_t main_rows_ = 0;              // the block size made at construction; others share its W layout
  std::vector<uint16_t> weight_bf16_;  // W rounded to bf16, n x k: the source of every packed layout
  std::vector<float> bias_;            // n values (zeros without a bias)
  std::string impl_;
  mutable std::mutex mutex_;
  mutable std::map<int64_t, std::unique_ptr<Kernel>> kernels_;  // by row count
};

}  // namespace bc_fast
