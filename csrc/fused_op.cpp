#include "fused_op.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <exception>
#include <stdexcept>

#include "kernels/dispatch.h"

#if defined(BC_FAST_HAVE_OPENMP)
#include <omp.h>
#endif
#include <cctype>
#include <cerrno>
#include <cstdlib>
#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#include <unistd.h>
#endif
#if defined(__linux__)
#include <sched.h>
#endif
#if defined(BC_FAST_HAVE_BLAS)
#include <cblas.h>
#endif

namespace bc_fast {

Activation parse_activation(const std::string& name) {
  if (name == "none") return Activation::kNone;
  if (name == "relu") return Activation::kRelu;
  if (name == "gelu") return Activation::kGelu;
  throw std::invalid_argument("unknown activation '" + name + "'; expected 'none', 'relu' or 'gelu'");
}

Precision parse_precision(const std::string& name) {
  if (name == "fp32") return Precision::kFloat32;
  if (name == "bf16") return Precision::kBFloat16;
  throw std::invalid_argument("precision must be one of 'fp32', 'bf16', got '" + name + "'");
}

Bf16Backend parse_bf16_backend(const std::string& name) {
  if (name == "native") return Bf16Backend::kNative;
  if (name == "onednn") return Bf16Backend::kOnednn;
  throw std::invalid_argument("bf16 backend must be one of 'native', 'onednn', got '" + name + "'");
}

namespace {

// Set by the pthread_atfork child handler (registered when the core is loaded, as torch does):
// libgomp's thread pool does not survive fork(), and a child that enters a parallel region after
// its parent used one waits forever. The parent's pool may be torch's (torch ships its own
// libgomp.so.1 with the same soname), so "has this process used OpenMP?" cannot be answered
// here; "is this a fork?" can.
std::atomic<bool> g_forked_child{false};
std::atomic<int> g_num_threads{0};  // 0: not resolved yet
// Threads the parallel applies now running hold (callers included); see ThreadClaim.
std::atomic<int> g_threads_in_use{0};

#if defined(__unix__) || defined(__APPLE__)
[[maybe_unused]] const bool kAtforkRegistered = [] {
  return pthread_atfork(nullptr, nullptr, [] { g_forked_child.store(true, std::memory_order_relaxed); }) == 0;
}();
#endif

#if defined(BC_FAST_HAVE_BLAS)
// We parallelise over row tiles ourselves, so each BLAS call must run on its caller's thread:
// with OpenBLAS's own pool awake as well, 2 cores ran large batches up to 10x slower. This
// scipy-openblas32 build has no per-thread setting (openblas_set_num_threads_local is neither
// exported nor thread-local in pthread builds), so this sets the count of the library instance the
// core links: the scipy-openblas32 package's copy. numpy and scipy bundle their own OpenBLAS and
// torch its own BLAS, so they are not affected; other code that loads scipy-openblas32 itself is.
[[maybe_unused]] const bool kBlasSingleThreaded = [] {
  scipy_openblas_set_num_threads(1);
  return true;
}();
#endif

int threads_from_env() {
  const char* env = std::getenv("BC_FAST_NUM_THREADS");
  if (env == nullptr || *env == '\0') return 0;
  errno = 0;
  char* end = nullptr;
  const long long v = std::strtoll(env, &end, 10);
  while (end != nullptr && std::isspace(static_cast<unsigned char>(*end))) ++end;
  if (errno != 0 || end == env || *end != '\0' || v < 1 || v > kMaxThreads)
    throw std::invalid_argument("environment variable BC_FAST_NUM_THREADS='" + std::string(env) +
                                "' is not an integer in [1, " + std::to_string(kMaxThreads) +
                                "]; set it to a thread count such as 4, or unset it to use all available CPUs");
  return static_cast<int>(v);
}

}  // namespace

int threads_in_use() { return g_threads_in_use.load(std::memory_order_relaxed); }

ThreadClaim::ThreadClaim(int want) {
  const int capacity = std::max(num_threads(), want);
  int used = g_threads_in_use.load(std::memory_order_relaxed);
  do {
    granted_ = std::max(1, std::min(want, capacity - used));
  } while (!g_threads_in_use.compare_exchange_weak(used, used + granted_, std::memory_order_relaxed));
}

ThreadClaim::~ThreadClaim() { g_threads_in_use.fetch_sub(granted_, std::memory_order_relaxed); }

int available_cpus() {
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    const int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
#endif
#if defined(__unix__) || defined(__APPLE__)
  const long n = sysconf(_SC_NPROCESSORS_ONLN);
  if (n > 0) return static_cast<int>(std::min<long>(n, kMaxThreads));
#endif
  return 1;
}

int num_threads() {
  int t = g_num_threads.load(std::memory_order_relaxed);
  if (t > 0) return t;
  t = threads_from_env();
  if (t == 0) t = std::min(available_cpus(), kMaxThreads);
  int expected = 0;
  // A concurrent set_num_threads() wins over the default.
  return g_num_threads.compare_exchange_strong(expected, t) ? t : expected;
}

void set_num_threads(int64_t n) {
  if (n < 1 || n > kMaxThreads)
    throw std::invalid_argument("threads must be an integer in [1, " + std::to_string(kMaxThreads) + "], got " +
                                std::to_string(n));
  g_num_threads.store(static_cast<int>(n), std::memory_order_relaxed);
}

bool in_forked_child() { return g_forked_child.load(std::memory_order_relaxed); }

void mark_forked_child() { g_forked_child.store(true, std::memory_order_relaxed); }

// Per-thread scratch space, grown on first use and reused afterwards.
struct FusedOp::Workspace {
  std::vector<float> input;  // fp16 input converted to fp32
  std::vector<float> ping, pong;
  std::vector<uint32_t> pairs;  // bf16 mode: the layer input rounded to bf16 pairs
  std::vector<uint16_t> bf16, bf16_next;  // oneDNN backend: layer inputs rounded to bf16, padded to whole row steps

  static Workspace& local() {
    thread_local Workspace ws;
    return ws;
  }
};

FusedOp::FusedOp(std::vector<LayerSpec> layers, bool normalize, Precision precision, Bf16Backend backend,
                 int64_t onednn_min_rows)
    : normalize_(normalize), onednn_min_rows_(onednn_min_rows),
      tile_parts_(std::max(2, std::min(available_cpus(), kMaxThreads))) {
  if (layers.empty()) throw std::invalid_argument("a fused op needs at least one layer");
  if (backend == Bf16Backend::kOnednn && precision != Precision::kBFloat16)
    throw std::invalid_argument("the oneDNN backend runs precision 'bf16' only");
  onednn_ = backend == Bf16Backend::kOnednn;
  // The native kernels: the whole bf16 backend (they throw where the CPU lacks them), or oneDNN's small batches.
  if (precision == Precision::kBFloat16 && (!onednn_ || bf16_unavailable_reason().empty())) bf16_ = &bf16_kernels();
  for (size_t i = 0; i < layers.size(); ++i) {
    LayerSpec& s = layers[i];
    if (s.d_in <= 0 || s.d_out <= 0) throw std::invalid_argument("layer dimensions must be positive");
    if (i > 0 && s.d_in != layers[i - 1].d_out)
      throw std::invalid_argument("layer " + std::to_string(i) + " has d_in " + std::to_string(s.d_in) +
                                  " but the previous layer outputs " + std::to_string(layers[i - 1].d_out));
    if (static_cast<int64_t>(s.weight.size()) != s.d_in * s.d_out)
      throw std::invalid_argument("layer " + std::to_string(i) + " weight has the wrong number of values");
    if (!s.bias.empty() && static_cast<int64_t>(s.bias.size()) != s.d_out)
      throw std::invalid_argument("layer " + std::to_string(i) + " bias has the wrong number of values");
    if (s.activation_width < 0 || s.activation_width > s.d_out)
      throw std::invalid_argument("layer " + std::to_string(i) + " activation width out of range");
    for (float w : s.weight)
      if (!std::isfinite(w)) throw std::invalid_argument("layer " + std::to_string(i) + " weight has NaN or Inf");
    for (float b : s.bias)
      if (!std::isfinite(b)) throw std::invalid_argument("layer " + std::to_string(i) + " bias has NaN or Inf");

    Layer l;
    if (bf16_ != nullptr) {
      pack_bf16(s, l);  // oneDNN's GEMM, if any, is made below, once the block size is known
    } else if (onednn_) {
      l.n_pad = s.d_out;
    } else {
      l.n_pad = (s.d_out + kPanel - 1) / kPanel * kPanel;
      l.packed.assign(static_cast<size_t>(l.n_pad * s.d_in), 0.0f);
      for (int64_t o = 0; o < s.d_out; ++o) {
        float* panel = l.packed.data() + (o / kPanel) * s.d_in * kPanel + (o % kPanel);
        const float* w = s.weight.data() + o * s.d_in;
        for (int64_t k = 0; k < s.d_in; ++k) panel[k * kPanel] = w[k];
      }
    }
    max_width_ = std::max(max_width_, l.n_pad);
    macs_per_row_ += s.d_in * l.n_pad;
    if (!bf16()) max_layer_macs_ = std::max(max_layer_macs_, s.d_in * l.n_pad);
    l.spec = std::move(s);
    layers_.push_back(std::move(l));
  }
  if (onednn_) {
    const int64_t block = tile_rows(int64_t{1} << 40);  // the tile of every large batch
    for (size_t i = 0; i < layers_.size(); ++i) {
      Layer& l = layers_[i];
      // A layer before the last whose activation covers all its outputs (or that has none) gets it from oneDNN,
      // with its output rounded to bf16 there: the next layer's input, without two passes over the tile.
      l.onednn_fused = i + 1 < layers_.size() &&
                       (l.spec.activation == Activation::kNone || l.spec.activation_width == l.spec.d_out) &&
                       OnednnGemm::can_fuse(l.spec.activation);
      l.onednn = std::make_shared<const OnednnGemm>(l.spec.weight.data(),
                                                    l.spec.bias.empty() ? nullptr : l.spec.bias.data(), l.spec.d_in,
                                                    l.spec.d_out, block, l.onednn_fused,
                                                    l.onednn_fused ? l.spec.activation : Activation::kNone);
    }
  }
}

void FusedOp::pack_bf16(const LayerSpec& s, Layer& l) const {
  // Rounded by the same instruction as the inputs (vcvtne2ps2bf16), once per operator.
  l.k_pairs = (s.d_in + 1) / 2;
  l.n_pad = (s.d_out + kBf16Panel - 1) / kBf16Panel * kBf16Panel;
  l.packed_bf16.assign(static_cast<size_t>(l.n_pad * l.k_pairs), 0u);
  l.bias_bf16.assign(static_cast<size_t>(l.n_pad), 0.0f);
  std::copy(s.bias.begin(), s.bias.end(), l.bias_bf16.begin());
  std::vector<uint32_t> row(static_cast<size_t>(l.k_pairs));
  for (int64_t o = 0; o < s.d_out; ++o) {
    bf16_->convert_rows(s.weight.data() + o * s.d_in, s.d_in, 1, s.d_in, row.data(), l.k_pairs);
    uint32_t* panel = l.packed_bf16.data() + (o / kBf16Panel) * l.k_pairs * kBf16Panel + (o % kBf16Panel);
    for (int64_t j = 0; j < l.k_pairs; ++j) panel[j * kBf16Panel] = row[static_cast<size_t>(j)];
  }
}

int64_t FusedOp::tile_rows(int64_t n) const {
  // Big tiles amortise BLAS packing the weights on every call; a tile's output (up to 512 KB)
  // should still sit in L2 for the epilogue. Mid-size batches are cut into one tile per core.
  // The tiling depends on n, the layer widths and the core count seen at construction, never
  // on the threads argument, so every thread count gives bit-identical results.
  const int64_t cache_rows = std::max<int64_t>(16, (131072 / max_width_) / 16 * 16);
  const int64_t share = ((n + tile_parts_ - 1) / tile_parts_ + 15) / 16 * 16;
  return std::max<int64_t>(16, std::min<int64_t>({cache_rows, 1024, share}));
}

namespace {

// One layer's packed GEMM cut into two chunks of whole panels, the first (the caller's, see
// SplitLease::run) panels [0, half), the second [half, panels). Halves measured best on a Zen 4
// VM (caller 2 of 4 panels: 2.0 us at 256 -> 256; 3 of 4: 2.45 us; one thread: 2.96 us). A panel's
// outputs do not depend on the other panels (every kernel level computes each output as one chain
// over k), so any cut, and any thread running a chunk, gives the single-thread bits.
struct GemmHalves {
  const KernelSet* kern;
  const float* x;
  int64_t ldx, m, k;
  const float* packed;
  float* y;
  int64_t ldy;
  int64_t panels, half;

  static void run(const void* self, int64_t chunk) {
    const GemmHalves& g = *static_cast<const GemmHalves*>(self);
    const int64_t p0 = chunk == 1 ? g.half : 0;
    const int64_t p1 = chunk == 0 ? g.half : g.panels;  // kAllChunks: all panels
    g.kern->gemm_packed(g.x, g.ldx, g.m, g.k, g.packed + p0 * g.k * kPanel, (p1 - p0) * kPanel, g.y + p0 * kPanel,
                        g.ldy);
  }
};

}  // namespace

bool FusedOp::packs_at_avx2(const KernelSet& kern, const Layer& l) {
  // Measured on a Zen 3 VM (2 threads, 200k rows, interleaved builds): 128 -> 128 124-133 -> 143-156 GFLOP/s,
  // 128 -> 768 140-148 -> 157-164, 64 -> 64 111-117 -> 129-157; 768 -> 128 is as fast or faster on OpenBLAS.
  return l.spec.d_in <= kAvx2PackedMaxK && std::strcmp(kern.name, "avx2") == 0;
}

bool FusedOp::split_pays(int64_t m, const Layer& l) const {
  return !bf16() && l.n_pad >= 2 * kPanel && m * l.spec.d_in * l.n_pad >= kMinSplitMacs;
}

void FusedOp::run_block(const void* x, DType x_type, int64_t m, void* out, DType out_type, bool use_blas,
                        bool via_onednn, Workspace& ws, SplitLease* split) const {
  if (via_onednn) {
    run_block_onednn(x, x_type, m, out, out_type, ws);
    return;
  }
  const KernelSet& kern = active_kernels();
  const int64_t d0 = d_in();
  const float* cur;
  int64_t ld_cur = d0;
  if (x_type != DType::kFloat32) {
    float* in = grow_to(ws.input, static_cast<size_t>(m * d0));
    (x_type == DType::kFloat16 ? kern.half_to_float : kern.bf16_to_float)(static_cast<const uint16_t*>(x), in, m * d0);
    cur = in;
  } else {
    cur = static_cast<const float*>(x);
  }
  float* bufs[2] = {grow_to(ws.ping, static_cast<size_t>(m * max_width_)),
                    grow_to(ws.pong, static_cast<size_t>(m * max_width_))};
  for (size_t li = 0; li < layers_.size(); ++li) {
    const Layer& l = layers_[li];
    const bool last = li + 1 == layers_.size();
    // The last layer writes float32 output in place when the kernel can (BLAS takes any row
    // stride; the packed kernel writes whole panels), saving a pass over the tile.
    const bool blas = use_blas && !packs_at_avx2(kern, l);
    const bool direct = last && out_type == DType::kFloat32 && (blas || l.n_pad == l.spec.d_out);
    float* dst = direct ? static_cast<float*>(out) : bufs[li % 2];
    const int64_t ld = direct ? l.spec.d_out : l.n_pad;
    if (bf16_ != nullptr) {
      uint32_t* a = grow_to(ws.pairs, static_cast<size_t>(m * l.k_pairs));
      bf16_->gemm(cur, ld_cur, m, l.spec.d_in, a, l.k_pairs, l.packed_bf16.data(), l.n_pad, l.bias_bf16.data(), dst,
                  ld);
    } else
#if defined(BC_FAST_HAVE_BLAS)
    if (blas) {
      scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<blasint>(m),
                        static_cast<blasint>(l.spec.d_out), static_cast<blasint>(l.spec.d_in), 1.0f, cur,
                        static_cast<blasint>(ld_cur), l.spec.weight.data(), static_cast<blasint>(l.spec.d_in), 0.0f,
                        dst, static_cast<blasint>(ld));
    } else
#endif
    if (split != nullptr && split_pays(m, l)) {
      const int64_t panels = l.n_pad / kPanel;
      const GemmHalves job{&kern, cur, ld_cur, m, l.spec.d_in, l.packed.data(), dst, ld, panels, (panels + 1) / 2};
      split->run(2, &GemmHalves::run, &job, l.split_stats[static_cast<size_t>(split_bucket(m))]);
    } else {
      (void)blas;
      kern.gemm_packed(cur, ld_cur, m, l.spec.d_in, l.packed.data(), l.n_pad, dst, ld);
    }
    // The bf16 GEMM starts its sums from the bias.
    const float* bias = l.spec.bias.empty() || bf16_ != nullptr ? nullptr : l.spec.bias.data();
    finish_layer(kern, l, last, bias, dst, ld, m, out, out_type, direct);
    cur = dst;
    ld_cur = ld;
  }
}

void FusedOp::finish_layer(const KernelSet& kern, const Layer& l, bool last, const float* bias, float* dst,
                           int64_t ld, int64_t m, void* out, DType out_type, bool direct) const {
  const int64_t d = l.spec.d_out;
  const bool has_epilogue = bias != nullptr || l.spec.activation != Activation::kNone;
  if (!last) {
    if (has_epilogue)
      for (int64_t r = 0; r < m; ++r) kern.bias_act(dst + r * ld, d, bias, l.spec.activation, l.spec.activation_width);
    return;
  }
  // Last layer: bias, activation, normalisation and conversion in one pass per row, while the row is in L1.
  for (int64_t r = 0; r < m; ++r) {
    float* row = dst + r * ld;
    if (has_epilogue) kern.bias_act(row, d, bias, l.spec.activation, l.spec.activation_width);
    float scale = 1.0f;
    if (normalize_) scale = inverse_norm(kern, row, d);
    if (direct) {
      if (normalize_) kern.store_f32(row, row, d, scale);
    } else {
      store_row(kern, row, out, out_type, r, d, scale);
    }
  }
}

void FusedOp::run_block_onednn(const void* x, DType x_type, int64_t m, void* out, DType out_type,
                               Workspace& ws) const {
  const KernelSet& kern = active_kernels();
  const int64_t rows = OnednnGemm::padded_rows(m);  // the GEMM computes whole row steps; the extra rows are zeros
  // fp32 rows (stride k) to bf16 (stride k), rounded to nearest even: by vcvtne2ps2bf16 where the native bf16
  // kernels run (every CPU with AMX has it) and k is even, else by the SIMD level's emulation.
  const auto round_rows = [&](const float* src, int64_t n, int64_t k, uint16_t* dst) {
    if (bf16_ != nullptr && k % 2 == 0) {
      bf16_->convert_rows(src, k, n, k, reinterpret_cast<uint32_t*>(dst), k / 2);
    } else {
      for (int64_t r = 0; r < n; ++r) kern.store_bf16(src + r * k, dst + r * k, k, 1.0f);
    }
  };
  float* bufs[2] = {grow_to(ws.ping, static_cast<size_t>(rows * max_width_)),
                    grow_to(ws.pong, static_cast<size_t>(rows * max_width_))};
  uint16_t* halves[2] = {grow_to(ws.bf16, static_cast<size_t>(rows * max_width_)),
                         grow_to(ws.bf16_next, static_cast<size_t>(rows * max_width_))};
  // The first layer's input as bf16 rows: as they are when they fill whole row steps, else rounded or copied.
  const int64_t d0 = d_in();
  const uint16_t* a = static_cast<const uint16_t*>(x);
  if (x_type != DType::kBFloat16 || rows != m) {
    uint16_t* buf = grow_to(ws.bf16, static_cast<size_t>(rows * std::max(d0, max_width_)));
    halves[0] = buf;
    if (x_type == DType::kBFloat16) {
      std::memcpy(buf, x, static_cast<size_t>(m * d0) * sizeof(uint16_t));
    } else if (x_type == DType::kFloat16) {
      float* row = grow_to(ws.input, static_cast<size_t>(d0));
      for (int64_t r = 0; r < m; ++r) {
        kern.half_to_float(static_cast<const uint16_t*>(x) + r * d0, row, d0);
        round_rows(row, 1, d0, buf + r * d0);
      }
    } else {
      round_rows(static_cast<const float*>(x), m, d0, buf);
    }
    std::fill(buf + m * d0, buf + rows * d0, uint16_t{0});
    a = buf;
  }
  int next = a == halves[0] ? 1 : 0;  // the bf16 buffer the next rounded input goes to
  for (size_t li = 0; li < layers_.size(); ++li) {
    const Layer& l = layers_[li];
    const int64_t d = l.spec.d_out;
    if (l.onednn_fused) {  // bias, activation and the rounding to bf16 by oneDNN: the next layer's input
      uint16_t* y = halves[next];
      l.onednn->run(a, m, y);
      a = y;
      next ^= 1;
      continue;
    }
    const bool last = li + 1 == layers_.size();
    const bool direct = last && out_type == DType::kFloat32 && rows == m;
    float* dst = direct ? static_cast<float*>(out) : bufs[li % 2];
    l.onednn->run(a, m, dst);  // adds the bias
    finish_layer(kern, l, last, nullptr, dst, d, m, out, out_type, direct);
    if (last) break;
    uint16_t* y = halves[next];
    round_rows(dst, m, d, y);
    std::fill(y + m * d, y + rows * d, uint16_t{0});
    a = y;
    next ^= 1;
  }
}

bool check_apply_args(const void* x, DType x_type, int64_t n, int64_t d_in, const void* out, DType out_type,
                      int64_t d_out) {
  if (n < 0) throw std::invalid_argument("negative number of rows");
  if (n == 0) return false;
  if (x == nullptr || out == nullptr) throw std::invalid_argument("null data pointer");
  const char* xb = static_cast<const char*>(x);
  const char* ob = static_cast<const char*>(out);
  if (xb < ob + n * d_out * static_cast<int64_t>(dtype_size(out_type)) &&
      ob < xb + n * d_in * static_cast<int64_t>(dtype_size(x_type)))
    throw std::invalid_argument("output overlaps input");
  return true;
}

int64_t apply_threads(int64_t threads) {
  return in_forked_child() ? 1 : threads > 0 ? std::min<int64_t>(threads, kMaxThreads) : num_threads();
}

float inverse_norm(const KernelSet& kern, const float* row, int64_t d) {
  float ss = kern.sum_squares(row, d);
  if (std::isinf(ss)) {
    double acc = 0.0;
    for (int64_t i = 0; i < d; ++i) acc += static_cast<double>(row[i]) * row[i];
    return static_cast<float>(1.0 / std::sqrt(acc));  // 0 where the row itself holds an Inf, as before
  }
  return 1.0f / std::max(std::sqrt(ss), 1e-12f);
}

void store_row(const KernelSet& kern, const float* row, void* out, DType out_type, int64_t r, int64_t d, float scale) {
  if (out_type == DType::kFloat32)
    kern.store_f32(row, static_cast<float*>(out) + r * d, d, scale);
  else if (out_type == DType::kFloat16)
    kern.store_f16(row, static_cast<uint16_t*>(out) + r * d, d, scale);
  else
    kern.store_bf16(row, static_cast<uint16_t*>(out) + r * d, d, scale);
}

void FusedOp::apply(const void* x, DType x_type, int64_t n, void* out, DType out_type, int64_t threads) const {
  if (!check_apply_args(x, x_type, n, d_in(), out, out_type, d_out())) return;
  const size_t x_item = dtype_size(x_type);
  const size_t o_item = dtype_size(out_type);
  const char* xb = static_cast<const char*>(x);
  char* ob = static_cast<char*>(out);
  // The whole batch, never a tile, decides: a row's bits then depend only on the batch size class.
  const bool via_onednn = onednn_ && (n >= onednn_min_rows_ || bf16_ == nullptr);
  const int64_t t = apply_threads(threads);
  bool use_blas = false;
  int64_t tile = n;
  if (n <= kSmallBatchRows) {
    // Packed kernel. Its result for a row does not depend on which rows share its block, so
    // splitting rows over threads keeps results bit-identical; split only when each thread gets
    // enough work to pay for waking it.
    const int64_t parts = std::min<int64_t>({t, n, std::max<int64_t>(1, n * macs_per_row_ / kMinParallelMacs)});
    // A batch too small for an OpenMP region is split by output columns instead, over this thread
    // and the small pool's one helper (~0.2 us against an OpenMP region's several; each thread
    // streams half of W, not all of it), where a layer is big enough, two threads are free in the
    // shared budget and no other caller holds the pool (then this one runs without it: concurrent
    // callers never wait). Batches with enough work for two row blocks keep the OpenMP split: at
    // 16 x 256 -> 256 it ran in 11.8 us where the pool fell back to one thread (19.2 us; measured when
    // one self-check judged every shape together, before SplitStats).
    if (parts <= 1 && t >= 2 && n * max_layer_macs_ >= kMinSplitMacs && max_width_ >= 2 * kPanel) {
      const ThreadClaim claim(2);
      if (claim.granted() >= 2) {
        SplitLease lease;
        if (lease.ok()) {
          run_block(x, x_type, n, out, out_type, /*use_blas=*/false, via_onednn, Workspace::local(), &lease);
          return;
        }
      }
    }
    if (parts <= 1) {
      run_block(x, x_type, n, out, out_type, /*use_blas=*/false, via_onednn, Workspace::local());
      return;
    }
    tile = (n + parts - 1) / parts;
  } else {
    const KernelSet& kern = active_kernels();
#if defined(BC_FAST_HAVE_BLAS)
    // At the avx512 level our packed kernel (W packed once, at construction) beats OpenBLAS, which packs
    // W again on every tile's call: on a Zen 4 core 117 vs 104 GFLOP/s for a 160 x 768 x 768 tile,
    // 1.05-1.08x numpy sgemm instead of 0.94x for 100k x 256/768 batches. At the avx2 level it does up
    // to a few hundred rows, where OpenBLAS's packing weighs most (AMD Zen 3, 2 threads, 96-256 rows of
    // d 128-384 and an MLP: 1.01-1.27x; 512 rows 0.97-1.07x), and OpenBLAS is 5-10 % faster on large ones,
    // except in layers that sum over few inputs (packs_at_avx2).
    use_blas = !bf16() && std::strcmp(kern.name, "avx512") != 0 &&
               !(std::strcmp(kern.name, "avx2") == 0 && n <= kAvx2PackedRows);
#endif
    tile = tile_rows(n);
    if (use_blas && std::any_of(layers_.begin(), layers_.end(), [&](const Layer& l) { return packs_at_avx2(kern, l); }))
      tile = std::min(tile, kAvx2PackedTileRows);
  }
  const int64_t tiles = (n + tile - 1) / tile;
  auto run_tile = [&](int64_t i) {
    const int64_t r0 = i * tile;
    const int64_t m = std::min(tile, n - r0);
    run_block(xb + r0 * d_in() * x_item, x_type, m, ob + r0 * d_out() * o_item, out_type, use_blas, via_onednn,
              Workspace::local());
  };
  run_tiles(tiles, t, run_tile);
}

void run_tiles(int64_t tiles, int64_t threads, const std::function<void(int64_t)>& run_tile) {
  if (std::min<int64_t>(threads, tiles) <= 1) {  // never touch the OpenMP runtime: in a forked child its pool is gone
    for (int64_t i = 0; i < tiles; ++i) run_tile(i);
    return;
  }
  // The tiling is fixed by the caller, so any grant gives the same bits. A caller granted only its own
  // thread runs one tile and asks again: when another call returns its threads, the rest of
  // this batch goes parallel instead of finishing alone on one core while others sit idle.
  for (int64_t next = 0; next < tiles;) {
    const ThreadClaim claim(static_cast<int>(std::min<int64_t>(threads, tiles - next)));
    if (claim.granted() <= 1) {
      run_tile(next++);
      continue;
    }
    std::exception_ptr error;
#if defined(BC_FAST_HAVE_OPENMP)
#pragma omp parallel for schedule(dynamic, 1) num_threads(claim.granted())
#endif
    for (int64_t i = next; i < tiles; ++i) {
      try {
        run_tile(i);
      } catch (...) {
#if defined(BC_FAST_HAVE_OPENMP)
#pragma omp critical(bc_fast_error)
#endif
        if (!error) error = std::current_exception();
      }
    }
    if (error) std::rethrow_exception(error);
    next = tiles;
  }
}

BuildInfo build_info() {
  BuildInfo info;
  info.kernel = active_kernels().name;
  info.cpu = cpu_features();
#if defined(BC_FAST_HAVE_BLAS)
  info.blas = std::string("scipy-openblas32 ") + scipy_openblas_get_config() + " core=" +
              scipy_openblas_get_corename();
#else
  info.blas = "none (built-in packed kernel)";
#endif
#if defined(BC_FAST_HAVE_OPENMP)
  info.openmp = true;
#endif
  info.max_threads = num_threads();
  info.cpus = available_cpus();
  info.forked_child = in_forked_child();
#if defined(BC_FAST_HAVE_BLAS)
  info.blas_threads = scipy_openblas_get_num_threads();
#endif
#if defined(__clang__)
  info.compiler = "clang " __clang_version__;
#elif defined(__GNUC__)
  info.compiler = "gcc " __VERSION__;
#else
  info.compiler = "unknown";
#endif
  return info;
}

}  // namespace bc_fast
