#include "routed_op.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#if defined(__SSE2__)
#include <xmmintrin.h>  // the 4 x 4 transposes of pack_rows_as_panel (SSE is part of baseline x86-64)
#endif

#include "kernels/dispatch.h"
#include "small_pool.h"

namespace bc_fast {

namespace {

// W (rows x cols, row-major) as W^T in panels of kPanel columns, zero padded to n_pad (kernels.h).
void pack_panels(const float* w, int64_t rows, int64_t cols, int64_t n_pad, float* packed) {
  std::fill(packed, packed + n_pad * cols, 0.0f);
  for (int64_t o = 0; o < rows; ++o) {
    float* panel = packed + (o / kPanel) * cols * kPanel + (o % kPanel);
    const float* src = w + o * cols;
    for (int64_t j = 0; j < cols; ++j) panel[j * kPanel] = src[j];
  }
}

// Every cluster's GEMM of a few rows whose (row, slot) pairs are gathered in cluster order, as work
// units (cluster, output panel) in that order, cut into two chunks of equal unit counts for the small
// pool: at batch 1 with m = 2 each thread streams one cluster's whole map (chunk 0: units [0, half),
// chunk 1: [half, units)). Each output is one chain over d_in whichever call computes it, so the cut
// never changes a bit.
struct ClusterGemms {
  const KernelSet* kern;
  const float* x;  // pairs x d_in, x_stride apart
  int64_t x_stride;  // d_in; 0 for one row, whose pairs all read it in place (each cluster has one pair)
  float* y;        // pairs x out_pad
  const int64_t* groups;  // (cluster, first pair, end pair) for each cluster with pairs, cluster order
  int64_t n_groups;
  const float* packed;  // k blocks of out_pad x d_in
  int64_t d_in, out_pad, half;

  static void run(const void* self, int64_t chunk) {
    const ClusterGemms& g = *static_cast<const ClusterGemms*>(self);
    const int64_t panels = g.out_pad / kPanel;
    const int64_t u0 = chunk == 1 ? g.half : 0;
    const int64_t u1 = chunk == 0 ? g.half : g.n_groups * panels;  // kAllChunks: every unit
    for (int64_t i = u0 / panels; i < g.n_groups && i * panels < u1; ++i) {
      const int64_t p0 = std::max(u0 - i * panels, int64_t{0}), p1 = std::min(u1 - i * panels, panels);
      const int64_t c = g.groups[3 * i], begin = g.groups[3 * i + 1], end = g.groups[3 * i + 2];
      g.kern->gemm_packed(g.x + begin * g.x_stride, g.d_in, end - begin, g.d_in,
                          g.packed + (c * g.out_pad + p0 * kPanel) * g.d_in, (p1 - p0) * kPanel,
                          g.y + begin * g.out_pad + p0 * kPanel, g.out_pad);
    }
  }
};

// Rows [r0, r0 + 64) of x (rows x cols, zero past `rows`) as one kernels.h panel: column c, row j
// holds x[r0 + c][j]. With the score weights as the GEMM's rows this computes the k scores of 64 rows
// without the zero padding of a k < 64 wide panel; each (partial) score is still the same chain of
// products in the same order (the kernel's FMAs multiply x by the weight either way round).
void pack_rows_as_panel(const float* x, int64_t rows, int64_t cols, int64_t r0, float* panel) {
  const int64_t real = std::min<int64_t>(kPanel, rows - r0);
  int64_t c = 0;
#if defined(__SSE2__)
  // 4 x 4 blocks transposed in registers (scalar stores, one float per panel line, cost 3x more), 16 rows
  // at a time, so that each 64-byte panel line is written whole before the next.
  for (; c + 16 <= real; c += 16) {
    const float* s0 = x + (r0 + c) * cols;
    // The next 16 rows (contiguous) are fetched meanwhile, 4 lines a step: 16 row streams at once
    // left the loads waiting on memory.
    const bool fetch_next = c + 32 <= rows - r0 && cols % 4 == 0;
    int64_t j = 0;
    for (; j + 4 <= cols; j += 4) {
      if (fetch_next) {
        const char* next = reinterpret_cast<const char*>(s0 + 16 * cols + 16 * j);
        for (int l = 0; l < 4; ++l) _mm_prefetch(next + 64 * l, _MM_HINT_T0);
      }
      float* dst = panel + j * kPanel + c;
      for (int q = 0; q < 16; q += 4) {
        const float* sq = s0 + q * cols + j;
        __m128 a = _mm_loadu_ps(sq), b = _mm_loadu_ps(sq + cols), e = _mm_loadu_ps(sq + 2 * cols),
               f = _mm_loadu_ps(sq + 3 * cols);
        _MM_TRANSPOSE4_PS(a, b, e, f);
        _mm_storeu_ps(dst + q, a);
        _mm_storeu_ps(dst + q + kPanel, b);
        _mm_storeu_ps(dst + q + 2 * kPanel, e);
        _mm_storeu_ps(dst + q + 3 * kPanel, f);
      }
    }
    for (; j < cols; ++j)
      for (int q = 0; q < 16; ++q) panel[j * kPanel + c + q] = s0[q * cols + j];
  }
#endif
  for (; c < real; ++c) {
    const float* src = x + (r0 + c) * cols;
    for (int64_t j = 0; j < cols; ++j) panel[j * kPanel + c] = src[j];
  }
  if (real < kPanel)
    for (int64_t j = 0; j < cols; ++j) std::fill(panel + j * kPanel + real, panel + (j + 1) * kPanel, 0.0f);
}

void check_finite(const std::vector<float>& v, const char* name) {
  for (float f : v)
    if (!std::isfinite(f)) throw std::invalid_argument(std::string("routed op: ") + name + " has NaN or Inf");
}

}  // namespace

struct RoutedOp::Workspace {
  std::vector<float> input;    // fp16 input converted to fp32
  std::vector<float> rows_panel;  // 64 rows of the tile as one panel (transposed scores)
  std::vector<float> partial;  // partial scores (route_tile)
  std::vector<float> scores;   // rows x k
  std::vector<int64_t> slot_cluster;  // rows x m
  std::vector<float> slot_weight;     // rows x m
  std::vector<int64_t> count, order;  // counting sort of the (row, slot) pairs by cluster
  std::vector<int64_t> groups;        // (cluster, first pair, end pair) of the clusters with pairs
  std::vector<float> gathered;        // the rows routed to one cluster
  std::vector<float> mapped;          // their images under that cluster's map (out_pad wide)
  std::vector<float> acc;             // rows x d_out: the blend
  std::vector<uint8_t> started;       // whether a row's blend has its first contribution

  static Workspace& local() {
    thread_local Workspace ws;
    return ws;
  }
};

RoutedOp::RoutedOp(RoutedSpec spec, bool normalize) : spec_(std::move(spec)), normalize_(normalize) {
  const RoutedSpec& s = spec_;
  if (s.k < 1 || s.d_in < 1 || s.d_out < 1)
    throw std::invalid_argument("routed op: k, d_in and d_out must be positive");
  if (s.m < 1 || s.m > s.k)
    throw std::invalid_argument("routed op: m must be in [1, k] = [1, " + std::to_string(s.k) + "], got " +
                                std::to_string(s.m));
  if (!(std::isfinite(s.temperature) && s.temperature > 0.0f))
    throw std::invalid_argument("routed op: temperature must be a finite number > 0");
  if (static_cast<int64_t>(s.score_weight.size()) != s.k * s.d_in ||
      static_cast<int64_t>(s.score_bias.size()) != s.k)
    throw std::invalid_argument("routed op: the score weights must be k x d_in and the score bias k values");
  if (static_cast<int64_t>(s.weight.size()) != s.k * s.d_out * s.d_in ||
      static_cast<int64_t>(s.bias.size()) != s.k * s.d_out)
    throw std::invalid_argument("routed op: the weights must be k x d_out x d_in and the bias k x d_out values");
  check_finite(s.score_weight, "score weights");
  check_finite(s.score_bias, "score bias");
  check_finite(s.weight, "weights");
  check_finite(s.bias, "bias");
  score_pad_ = (s.k + kPanel - 1) / kPanel * kPanel;
  // Scores as S x^T (pack_rows_as_panel) where a k-wide panel would be mostly zero padding.
  transposed_scores_ = 2 * s.k <= score_pad_;
  // A score is the sum of score_groups_ partial chains over d_in / score_groups_ inputs each (see
  // score_groups_ in routed_op.h).
  score_groups_ = 1;
  for (int64_t g : {4, 2})
    if (score_groups_ == 1 && g * s.k <= kPanel && s.d_in % g == 0) score_groups_ = g;
  if (score_groups_ > 1) {  // one panel: row j, column q k + c holds S[c][q dq + j]
    const int64_t dq = s.d_in / score_groups_;
    score_group_packed_.assign(static_cast<size_t>(dq * kPanel), 0.0f);
    for (int64_t q = 0; q < score_groups_; ++q)
      for (int64_t c = 0; c < s.k; ++c)
        for (int64_t j = 0; j < dq; ++j)
          score_group_packed_[static_cast<size_t>(j * kPanel + q * s.k + c)] = s.score_weight[static_cast<size_t>(c * s.d_in + q * dq + j)];
  }
  out_pad_ = (s.d_out + kPanel - 1) / kPanel * kPanel;
  if (score_groups_ == 1) {
    score_packed_.resize(static_cast<size_t>(score_pad_ * s.d_in));
    pack_panels(s.score_weight.data(), s.k, s.d_in, score_pad_, score_packed_.data());
  }
  packed_.resize(static_cast<size_t>(s.k * out_pad_ * s.d_in));
  for (int64_t c = 0; c < s.k; ++c)
    pack_panels(s.weight.data() + c * s.d_out * s.d_in, s.d_out, s.d_in, out_pad_, packed_.data() + c * out_pad_ * s.d_in);
}

const float* RoutedOp::tile_input(const void* x, DType x_type, int64_t rows, Workspace& ws) const {
  if (x_type == DType::kFloat32) return static_cast<const float*>(x);
  float* in = grow_to(ws.input, static_cast<size_t>(rows * spec_.d_in));
  const KernelSet& kern = active_kernels();
  (x_type == DType::kFloat16 ? kern.half_to_float : kern.bf16_to_float)(static_cast<const uint16_t*>(x), in,
                                                                       rows * spec_.d_in);
  return in;
}

void RoutedOp::route_tile(const float* x, int64_t rows, Workspace& ws) const {
  const RoutedSpec& s = spec_;
  const KernelSet& kern = active_kernels();
  const int64_t m = s.m;
  // The scores (before the bias), rows x k. Every way below computes each as the same partial chains of
  // products over d_in, summed in the same order, so the choice (by tile size) never changes a bit.
  const int64_t k = s.k, groups = score_groups_, dq = s.d_in / groups;
  float* scores = grow_to(ws.scores, static_cast<size_t>(rows * k));
  if (transposed_scores_ && rows >= kMinTransposedRows) {
    // 64 rows at a time as one panel; each group of inputs (rows [q dq, (q + 1) dq) of the panel) times
    // the same columns of S gives k x 64 partial scores.
    float* panel = grow_to(ws.rows_panel, static_cast<size_t>(kPanel * s.d_in));
    float* part = grow_to(ws.partial, static_cast<size_t>(groups * k * kPanel));
    for (int64_t r0 = 0; r0 < rows; r0 += kPanel) {
      pack_rows_as_panel(x, rows, s.d_in, r0, panel);
      for (int64_t q = 0; q < groups; ++q)
        kern.gemm_packed(s.score_weight.data() + q * dq, s.d_in, k, dq, panel + q * dq * kPanel, kPanel,
                         part + q * k * kPanel, kPanel);
      for (int64_t r = r0; r < std::min(rows, r0 + kPanel); ++r)
        for (int64_t c = 0; c < k; ++c) {
          float v = part[c * kPanel + (r - r0)];
          for (int64_t q = 1; q < groups; ++q) v += part[(q * k + c) * kPanel + (r - r0)];
          scores[r * k + c] = v;
        }
    }
  } else if (groups > 1) {
    // Row r as `groups` rows of dq inputs: group q's partial scores are the product of x[r][q dq, q dq + dq)
    // with columns [q k, q k + k) of one dq x 64 panel, computed block diagonally (gemv_groups: the bits
    // of gemm_packed's row q, a quarter of its FMAs at groups = 4).
    float* part = grow_to(ws.partial, static_cast<size_t>(kPanel));
    for (int64_t r = 0; r < rows; ++r) {
      kern.gemv_groups(x + r * s.d_in, dq, groups, k, score_group_packed_.data(), part);
      for (int64_t c = 0; c < k; ++c) {
        float v = part[c];
        for (int64_t q = 1; q < groups; ++q) v += part[q * k + c];
        scores[r * k + c] = v;
      }
    }
  } else {
    float* part = grow_to(ws.partial, static_cast<size_t>(rows * score_pad_));
    kern.gemm_packed(x, s.d_in, rows, s.d_in, score_packed_.data(), score_pad_, part, score_pad_);
    for (int64_t r = 0; r < rows; ++r) std::copy_n(part + r * score_pad_, k, scores + r * k);
  }
  int64_t* cl = grow_to(ws.slot_cluster, static_cast<size_t>(rows * m));
  float* wt = grow_to(ws.slot_weight, static_cast<size_t>(rows * m));
  const double inv_t = 1.0 / static_cast<double>(s.temperature);
  for (int64_t r = 0; r < rows; ++r) {
    const float* sc = scores + r * k;
    int64_t* top = cl + r * m;
    float* w = wt + r * m;
    // Insertion into a sorted top-m list; a later cluster displaces an earlier one only with a strictly
    // larger score, so ties keep the lower index first.
    int64_t filled = 0;
    for (int64_t c = 0; c < s.k; ++c) {
      const float v = sc[c] + s.score_bias[static_cast<size_t>(c)];
      if (filled == m && !(v > w[m - 1])) continue;
      int64_t pos = filled < m ? filled++ : m - 1;
      while (pos > 0 && v > w[pos - 1]) {
        w[pos] = w[pos - 1];
        top[pos] = top[pos - 1];
        --pos;
      }
      w[pos] = v;
      top[pos] = c;
    }
    double e[64];
    double sum = 0.0;
    std::vector<double> big;
    double* ex = m <= 64 ? e : (big.resize(static_cast<size_t>(m)), big.data());
    for (int64_t j = 0; j < m; ++j) sum += ex[j] = std::exp((static_cast<double>(w[j]) - w[0]) * inv_t);
    for (int64_t j = 0; j < m; ++j) w[j] = static_cast<float>(ex[j] / sum);
  }
}

void RoutedOp::run_tile(const void* x, DType x_type, int64_t rows, void* out, DType out_type, Workspace& ws,
                        SplitLease* split) const {
  const RoutedSpec& s = spec_;
  const KernelSet& kern = active_kernels();
  const float* xin = tile_input(x, x_type, rows, ws);
  route_tile(xin, rows, ws);
  const int64_t m = s.m, pairs = rows * m;
  const int64_t* cl = ws.slot_cluster.data();
  const float* wt = ws.slot_weight.data();

  // The (row, slot) pairs grouped by cluster, rows ascending within a cluster (a stable counting sort).
  int64_t* count = grow_to(ws.count, static_cast<size_t>(s.k + 1));
  std::fill(count, count + s.k + 1, 0);
  for (int64_t p = 0; p < pairs; ++p) ++count[cl[p] + 1];
  for (int64_t c = 0; c < s.k; ++c) count[c + 1] += count[c];
  int64_t* order = grow_to(ws.order, static_cast<size_t>(pairs));
  for (int64_t p = 0; p < pairs; ++p) order[count[cl[p]]++] = p;  // count[c] ends at the start of c + 1

  // The blend: a row's first contribution (in cluster order) is stored, the others added. (Blending into
  // float32 output rows directly, skipping the store pass, measured 2-3% slower on large batches.)
  float* acc = grow_to(ws.acc, static_cast<size_t>(rows * s.d_out));
  uint8_t* started = grow_to(ws.started, static_cast<size_t>(rows));
  std::fill(started, started + rows, uint8_t{0});
  // With the small pool (a few rows), all pairs are gathered first and every cluster's GEMM runs in one
  // split job; otherwise cluster by cluster, each GEMM's input and output still in cache for the blend.
  float *gx = nullptr, *gy = nullptr;
  if (split != nullptr) {
    gy = grow_to(ws.mapped, static_cast<size_t>(pairs * out_pad_));
    if (rows > 1) {
      gx = grow_to(ws.gathered, static_cast<size_t>(pairs * s.d_in));
      for (int64_t i = 0; i < pairs; ++i) std::copy_n(xin + (order[i] / m) * s.d_in, s.d_in, gx + i * s.d_in);
    }
    int64_t* groups = grow_to(ws.groups, static_cast<size_t>(3 * s.k));
    int64_t n_groups = 0;
    for (int64_t c = 0, begin = 0; c < s.k; begin = count[c++]) {
      if (count[c] == begin) continue;
      groups[3 * n_groups] = c;
      groups[3 * n_groups + 1] = begin;
      groups[3 * n_groups++ + 2] = count[c];
    }
    const int64_t units = n_groups * (out_pad_ / kPanel);
    const ClusterGemms job{&kern, rows > 1 ? gx : xin, rows > 1 ? s.d_in : 0, gy, groups, n_groups, packed_.data(),
                           s.d_in, out_pad_, (units + 1) / 2};
    split->run(2, &ClusterGemms::run, &job, split_stats_[static_cast<size_t>(split_bucket(rows))]);
  }
  for (int64_t c = 0, begin = 0; c < s.k; begin = count[c++]) {
    const int64_t g = count[c] - begin;
    if (g == 0) continue;
    // Each cluster's rows go through one GEMM; a row's image does not depend on the rows beside it
    // (the packed kernel computes each output as one chain over d_in), and each row adds its clusters'
    // contributions in cluster order, so results are the same for every batch and thread count.
    float* mapped;
    if (split != nullptr) {
      mapped = gy + begin * out_pad_;
    } else {
      float* cx = grow_to(ws.gathered, static_cast<size_t>(g * s.d_in));
      for (int64_t i = 0; i < g; ++i) std::copy_n(xin + (order[begin + i] / m) * s.d_in, s.d_in, cx + i * s.d_in);
      mapped = grow_to(ws.mapped, static_cast<size_t>(g * out_pad_));
      kern.gemm_packed(cx, s.d_in, g, s.d_in, packed_.data() + c * out_pad_ * s.d_in, out_pad_, mapped, out_pad_);
    }
    const float* b = s.bias.data() + c * s.d_out;
    for (int64_t i = 0; i < g; ++i) {
      // dst (+)= w (src + b), each step rounded to float32, by the SIMD kernels: src += b, then src * w
      // stored into a first contribution, or into src and added to dst.
      const int64_t p = order[begin + i], r = p / m;
      float* dst = acc + r * s.d_out;
      float* src = mapped + i * out_pad_;
      kern.bias_act(src, s.d_out, b, Activation::kNone, 0);
      if (!started[r]) {
        kern.store_f32(src, dst, s.d_out, wt[p]);
        started[r] = 1;
      } else {
        kern.store_f32(src, src, s.d_out, wt[p]);
        kern.bias_act(dst, s.d_out, src, Activation::kNone, 0);
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = acc + r * s.d_out;
    float scale = 1.0f;
    if (normalize_) scale = inverse_norm(kern, row, s.d_out);
    store_row(kern, row, out, out_type, r, s.d_out, scale);
  }
}

void RoutedOp::apply(const void* x, DType x_type, int64_t n, void* out, DType out_type, int64_t threads) const {
  if (!check_apply_args(x, x_type, n, d_in(), out, out_type, d_out())) return;
  const size_t x_item = dtype_size(x_type);
  const size_t o_item = dtype_size(out_type);
  const char* xb = static_cast<const char*>(x);
  char* ob = static_cast<char*>(out);
  const int64_t t = apply_threads(threads);
  if (n <= kSplitRows && t >= 2 && out_pad_ >= 2 * kPanel) {
    // A few rows: their clusters' maps are cut into two halves of (cluster, output panel) units over
    // this thread and the small pool's helper, so each streams half of the weights (at batch 1 with
    // m = 2, one cluster's map each: from L3, since k maps do not fit one core's L2).
    const ThreadClaim claim(2);
    if (claim.granted() >= 2) {
      SplitLease lease;
      if (lease.ok()) {
        run_tile(x, x_type, n, out, out_type, Workspace::local(), &lease);
        return;
      }
    }
  }
  const int64_t tiles = (n + kTileRows - 1) / kTileRows;
  auto run = [&](int64_t i) {
    const int64_t r0 = i * kTileRows;
    run_tile(xb + r0 * d_in() * x_item, x_type, std::min(kTileRows, n - r0), ob + r0 * d_out() * o_item, out_type,
             Workspace::local());
  };
  run_tiles(tiles, t, run);
}

void RoutedOp::route(const void* x, DType x_type, int64_t n, int64_t* clusters, float* weights) const {
  if (n < 0) throw std::invalid_argument("negative number of rows");
  const size_t x_item = dtype_size(x_type);
  Workspace& ws = Workspace::local();
  for (int64_t r0 = 0; r0 < n; r0 += kTileRows) {
    const int64_t rows = std::min(kTileRows, n - r0);
    route_tile(tile_input(static_cast<const char*>(x) + r0 * d_in() * x_item, x_type, rows, ws), rows, ws);
    std::copy_n(ws.slot_cluster.data(), rows * spec_.m, clusters + r0 * spec_.m);
    std::copy_n(ws.slot_weight.data(), rows * spec_.m, weights + r0 * spec_.m);
  }
}

}  // namespace bc_fast
