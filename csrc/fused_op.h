// FusedOp: a short layer program (affine -> activation, ..., optional L2 normalisation)
// applied to batches of rows. Plain C++: pointers and sizes only.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "kernels/kernels.h"
#include "onednn_gemm.h"
#include "small_pool.h"

namespace bc_fast {

// Row dtypes of apply's input and output; the arithmetic is float32 (or bf16, see Precision) either way.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
// Arithmetic of the GEMMs: fp32, or bf16 operands (inputs and weights rounded to nearest even) with
// fp32 accumulation (AVX512-BF16). Bias, activations, normalisation and output are fp32 either way.
enum class Precision : int { kFloat32 = 0, kBFloat16 = 1 };
// Who runs the bf16 GEMMs: the core's AVX512-BF16 kernels, or oneDNN's matmul (onednn_gemm.h; AMX where the CPU
// has it), which must be loaded first.
enum class Bf16Backend : int { kNative = 0, kOnednn = 1 };

struct LayerSpec {
  int64_t d_in = 0;
  int64_t d_out = 0;
  std::vector<float> weight;  // d_out x d_in, row-major
  std::vector<float> bias;    // d_out values, or empty for no bias
  Activation activation = Activation::kNone;
  int64_t activation_width = 0;  // activation applies to outputs [0, activation_width)
};

Activation parse_activation(const std::string& name);
// "fp32" or "bf16"; std::invalid_argument listing the choices otherwise.
Precision parse_precision(const std::string& name);
// "native" or "onednn"; std::invalid_argument listing the choices otherwise.
Bf16Backend parse_bf16_backend(const std::string& name);

class FusedOp {
 public:
  // Batches of at most this many rows take the single-thread packed-kernel path.
  static constexpr int64_t kSmallBatchRows = 64;
  // Larger fp32 batches of at most this many rows run on the packed kernel at the avx2 level too (see
  // FusedOp::apply; above it, OpenBLAS there).
  static constexpr int64_t kAvx2PackedRows = 256;
  // ... and so do the layers of larger batches that sum over at most this many inputs: OpenBLAS packs every
  // tile's rows and zeroes its output first, which weighs most when k is short. Such batches are cut into
  // tiles of at most kAvx2PackedTileRows rows, so a tile's rows and outputs stay in L2.
  static constexpr int64_t kAvx2PackedMaxK = 128;
  static constexpr int64_t kAvx2PackedTileRows = 256;
  // A small batch is split over threads only above this many multiply-adds (~10 us on one core).
  static constexpr int64_t kMinParallelMacs = int64_t{1} << 19;
  // Up to two such parts, a small batch's fp32 layer is split by output columns (two halves of its
  // panels) over the calling thread and the small pool's helper (small_pool.h: a few cache-line
  // trips instead of an OpenMP region's several us) when its GEMM has at least this many
  // multiply-adds and two panels: batch 1 from 128 -> 128 on.
  static constexpr int64_t kMinSplitMacs = int64_t{1} << 14;

  // Precision::kBFloat16 throws std::runtime_error naming the missing CPU feature where the bf16
  // kernels cannot run (see bf16_unavailable_reason()); its weights are rounded and packed here, once.
  // With Bf16Backend::kOnednn (bf16 only) oneDNN runs the GEMMs of batches of at least `onednn_min_rows` rows
  // (default: above kSmallBatchRows; oneDNN's fixed cost per call is ~10 us, the native kernels' batch 1 ~2 us);
  // smaller batches run on the native bf16 kernels where the CPU has them, else on oneDNN too. It throws
  // std::runtime_error when oneDNN is not loaded or offers no kernel better than its reference one.
  FusedOp(std::vector<LayerSpec> layers, bool normalize, Precision precision = Precision::kFloat32,
          Bf16Backend backend = Bf16Backend::kNative, int64_t onednn_min_rows = kSmallBatchRows + 1);

  int64_t d_in() const { return layers_.front().spec.d_in; }
  int64_t d_out() const { return layers_.back().spec.d_out; }
  size_t num_layers() const { return layers_.size(); }
  Precision precision() const { return bf16() ? Precision::kBFloat16 : Precision::kFloat32; }
  Bf16Backend bf16_backend() const { return onednn_ ? Bf16Backend::kOnednn : Bf16Backend::kNative; }
  // oneDNN's name for the first layer's kernel ("brg:avx512_core_amx", ...), or "" for the core's own kernels.
  std::string bf16_impl() const { return onednn_ ? layers_.front().onednn->impl() : ""; }

  // out[n x d_out] = program(x[n x d_in]); both C-contiguous, must not overlap.
  // threads <= 0 means num_threads(); more than kMaxThreads count as kMaxThreads; a forked child
  // always runs on its calling thread. With threads >= 2, a small batch may be split by columns
  // over the calling thread and the small pool's helper thread (see kMinSplitMacs), with the same
  // bits. Throws std::invalid_argument on bad sizes.
  void apply(const void* x, DType x_type, int64_t n, void* out, DType out_type, int64_t threads) const;

 private:
  struct Layer {
    LayerSpec spec;
    std::vector<float> packed;  // fp32: W^T in panels of kPanel columns (see kernels.h)
    std::vector<uint32_t> packed_bf16;  // bf16: W in panels of kBf16Panel columns of k pairs (kernels.h)
    std::vector<float> bias_bf16;       // bf16: the bias (or zeros), padded to n_pad; the GEMM starts from it
    int64_t k_pairs = 0;                // bf16: ceil(d_in / 2)
    int64_t n_pad = 0;                  // d_out rounded up to the panel width (d_out itself with oneDNN)
    std::shared_ptr<const OnednnGemm> onednn;  // the bf16 GEMM, with the oneDNN backend
    bool onednn_fused = false;  // oneDNN applies the activation and writes bf16 (a layer before the last)
    mutable std::array<SplitStats, kSplitBuckets> split_stats{};  // the small pool's check, by batch size
  };
  struct Workspace;

  void run_block(const void* x, DType x_type, int64_t m, void* out, DType out_type, bool use_blas, bool via_onednn,
                 Workspace& ws, SplitLease* split = nullptr) const;
  void run_block_onednn(const void* x, DType x_type, int64_t m, void* out, DType out_type, Workspace& ws) const;
  // After a layer's GEMM wrote dst (m rows, stride ld): bias (if not null) and activation; on the last layer
  // also the normalisation and the store to `out` (skipped when `direct`: dst is `out`, float32).
  void finish_layer(const KernelSet& kern, const Layer& l, bool last, const float* bias, float* dst, int64_t ld,
                    int64_t m, void* out, DType out_type, bool direct) const;
  bool bf16() const { return bf16_ != nullptr || onednn_; }
  bool split_pays(int64_t m, const Layer& l) const;
  // A large batch's layer runs on the packed kernel, not OpenBLAS (see kAvx2PackedMaxK).
  static bool packs_at_avx2(const KernelSet& kern, const Layer& l);
  int64_t tile_rows(int64_t n) const;
  void pack_bf16(const LayerSpec& s, Layer& l) const;

  std::vector<Layer> layers_;
  bool normalize_;
  const Bf16Kernels* bf16_ = nullptr;  // set for Precision::kBFloat16 with the native backend
  bool onednn_ = false;                // Precision::kBFloat16 with the oneDNN backend
  int64_t onednn_min_rows_ = 0;        // smaller batches take the native bf16 kernels (bf16_) where set
  int64_t max_width_ = 0;     // widest padded row any layer writes
  int64_t macs_per_row_ = 0;  // multiply-adds the packed kernel spends on one row
  int64_t max_layer_macs_ = 0;  // the most multiply-adds one fp32 layer spends on one row
  int tile_parts_ = 2;        // mid-size batches are cut into this many tiles (CPUs at construction)
};

// Upper bound on worker threads for one apply (more only adds idle threads and scratch memory).
constexpr int kMaxThreads = 1024;

// CPUs this process may run on (sched_getaffinity), at least 1.
int available_cpus();
// The core's default thread count: set_num_threads() if called, else BC_FAST_NUM_THREADS, else
// available_cpus(). Independent of OpenMP's and torch's settings. Throws std::invalid_argument
// when BC_FAST_NUM_THREADS is not a positive integer.
int num_threads();
// Threads held right now by parallel apply calls from all calling threads (callers included;
// 0 when none runs). Concurrent applies share a budget of num_threads() threads: each claims up
// to what it wants without waiting, at least its own thread, and returns them when it ends.
int threads_in_use();
// A process-wide thread budget shared by concurrent apply calls, so that several Python threads
// calling apply at once do not each open a full team (libgomp gives every calling thread its own
// pool: k callers x num_threads() workers on num_threads() cores). A parallel apply claims up to
// the threads it wants, never waits: with the budget spent it gets 1, its own calling thread,
// which still counts, so a later claim sees the core it occupies (and asks again per tile).
// Capacity: num_threads(), or a larger explicit request (an explicit threads= is honoured when the
// cores are free). Returned on destruction, so an exception cannot leak threads from the budget.
class ThreadClaim {
 public:
  explicit ThreadClaim(int want);
  ~ThreadClaim();
  ThreadClaim(const ThreadClaim&) = delete;
  ThreadClaim& operator=(const ThreadClaim&) = delete;
  int granted() const { return granted_; }

 private:
  int granted_ = 1;
};
// v's storage grown (never shrunk) to at least n elements: per-thread scratch reused from call to call.
template <class T>
T* grow_to(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}
// Bytes per element of a row dtype.
inline size_t dtype_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }
// The checks every apply makes: n >= 0, non-null data, output not overlapping the input
// (std::invalid_argument); false when there is nothing to do (n == 0).
bool check_apply_args(const void* x, DType x_type, int64_t n, int64_t d_in, const void* out, DType out_type,
                      int64_t d_out);
// The threads an apply call uses: `threads` (at most kMaxThreads), num_threads() for threads <= 0, 1 in a
// forked child.
int64_t apply_threads(int64_t threads);
// 1 / max(||row||, 1e-12) for the normalisation. A finite row whose float sum of squares overflows (values
// above ~1.8e19) is summed again in double, so it still comes out a unit vector instead of zeros.
float inverse_norm(const KernelSet& kern, const float* row, int64_t d);
// Row r of `out` (out_type, d values a row) = row * scale.
void store_row(const KernelSet& kern, const float* row, void* out, DType out_type, int64_t r, int64_t d, float scale);
// run_tile(i) for every tile i in [0, tiles), on up to `threads` threads claimed from the shared budget
// (OpenMP, dynamic schedule; the calling thread alone in a forked child or with one thread). The first
// exception a tile throws is rethrown once all have run.
void run_tiles(int64_t tiles, int64_t threads, const std::function<void(int64_t)>& run_tile);
// Overrides the default thread count for this process (1..kMaxThreads, else invalid_argument).
void set_num_threads(int64_t n);
// True in a process forked (after the core was loaded) from one that loaded it: such a process
// never enters an OpenMP parallel region, since its parent's thread pool did not survive fork().
bool in_forked_child();
// Marks this process as a forked child: for a fork that happened before the core was loaded,
// which the atfork handler cannot see (the Python layer detects multiprocessing fork children).
void mark_forked_child();

struct BuildInfo {
  std::string kernel;
  std::string cpu;
  std::string blas;
  bool openmp = false;
  int max_threads = 1;  // num_threads()
  int cpus = 1;         // available_cpus()
  int blas_threads = 0; // the BLAS library's own (process-global) setting, read only; 0 without BLAS
  bool forked_child = false;
  std::string compiler;
};

BuildInfo build_info();

}  // namespace bc_fast
