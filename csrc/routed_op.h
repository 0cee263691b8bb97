// RoutedOp: a mixture of k affine maps, each row routed to the m clusters whose scores are largest,
// their outputs blended with softmax weights. Plain C++: pointers and sizes only.
//
// For a row x (d_in):
//   score_c = x . S_c + s_c                                  (c = 0..k-1; S: k x d_in, s: k)
//   (x . S_c in float32 as 1, 2 or 4 ordered chains over consecutive parts of d_in, summed in order: the
//   same bits for every batch size and thread count, see score_groups_)
//   c_1..c_m = the m largest scores, ties to the lower cluster index; s_1 >= ... >= s_m
//   w_j = exp((score_{c_j} - score_{c_1}) / T) / sum_i exp((score_{c_i} - score_{c_1}) / T)
//   y = sum_j w_j (A_{c_j} x + b_{c_j})                      (A: k x d_out x d_in, b: k x d_out)
// then, optionally, y / max(||y||, 1e-12). Nearest-centroid routing has S_c = 2 C_c, s_c = -||C_c||^2.
#pragma once

#include <array>
#include <cstdint>
#include <vector>

#include "fused_op.h"
#include "small_pool.h"

namespace bc_fast {

struct RoutedSpec {
  int64_t k = 0, d_in = 0, d_out = 0, m = 1;
  float temperature = 1.0f;
  std::vector<float> score_weight;  // k x d_in, row-major
  std::vector<float> score_bias;    // k
  std::vector<float> weight;        // k x d_out x d_in, row-major
  std::vector<float> bias;          // k x d_out
};

class RoutedOp {
 public:
  // Rows per tile of a large batch, whatever the thread count (512 and 1024 measured 1-3% slower on a
  // Zen 4 VM: a tile's buffers then leave L2).
  static constexpr int64_t kTileRows = 256;
  // Tiles of at least this many rows compute their scores as S x^T (64 rows per panel) where k is at most
  // half a panel, instead of a mostly zero-padded k-wide panel of S^T: same bits, less work.
  static constexpr int64_t kMinTransposedRows = 32;
  // Batches of at most this many rows split their clusters' GEMMs, as (cluster, output panel) units, over
  // the small pool (small_pool.h).
  static constexpr int64_t kSplitRows = 8;

  // Throws std::invalid_argument on inconsistent sizes, m outside [1, k], T <= 0 or non-finite values.
  RoutedOp(RoutedSpec spec, bool normalize);

  int64_t d_in() const { return spec_.d_in; }
  int64_t d_out() const { return spec_.d_out; }
  int64_t k() const { return spec_.k; }
  int64_t m() const { return spec_.m; }

  // out[n x d_out] = routed map of x[n x d_in]; both C-contiguous, must not overlap. A row's result
  // does not depend on the other rows of its batch or on the thread count (bit-identical).
  void apply(const void* x, DType x_type, int64_t n, void* out, DType out_type, int64_t threads) const;

  // The clusters (n x m, best first) and weights (n x m) each row is routed to.
  void route(const void* x, DType x_type, int64_t n, int64_t* clusters, float* weights) const;

 private:
  struct Workspace;
  void run_tile(const void* x, DType x_type, int64_t rows, void* out, DType out_type, Workspace& ws,
                SplitLease* split = nullptr) const;
  const float* tile_input(const void* x, DType x_type, int64_t rows, Workspace& ws) const;
  void route_tile(const float* x, int64_t rows, Workspace& ws) const;

  RoutedSpec spec_;
  bool normalize_;
  int64_t score_pad_ = 0, out_pad_ = 0;
  bool transposed_scores_ = false;  // see kMinTransposedRows
  // Each score is the sum, in order, of score_groups_ chains over consecutive d_in / score_groups_ inputs
  // (4 or 2 where k of them fit one panel and divide d_in, else 1): a few rows then read a
  // (d_in / groups) x 64 panel of S (score_group_packed_) instead of d_in x 64, mostly zero padding.
  int64_t score_groups_ = 1;
  std::vector<float> score_packed_;  // S^T in panels (kernels.h)
  std::vector<float> score_group_packed_;
  std::vector<float> packed_;        // k blocks of A_c^T in panels, out_pad_ x d_in each
  mutable std::array<SplitStats, kSplitBuckets> split_stats_{};  // the small pool's check, by batch size
};

}  // namespace bc_fast
