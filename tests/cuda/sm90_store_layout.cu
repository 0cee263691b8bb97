// Host-only check of the fused sm90 kernel's stores (csrc/cuda/layer_epilogue_sm90.cuh), run by .ci/cuda
// without a GPU, on CuTe's own partition of the accumulator tile (each LayerGemm instance's TiledMma).
// Direct store: a thread's row is the same in every column group and its columns are even (one row
// pointer, 4-byte pair stores). Staged store: the partition is pushed through a model of stmatrix .x4
// (PTX ISA: lanes 8i..8i+7 give the row addresses of matrix i; register i of lane t holds row t/4,
// columns 2(t%4) and 2(t%4)+1 of matrix i) into the warp's slot at stage_offset(), and read back as the
// kernel reads it (lane l: chunk l of each row, written to columns 8l..8l+7 of row `first` + rr). Every
// tile element must land exactly once at its own (row, column), and neither side may meet a shared-memory
// bank conflict. Exit status 0 when all hold; the first mismatches are printed.
#include <cstdio>
#include <vector>

#include "layer_gemm_sm90_kernel.cuh"

namespace {

using namespace cute;
using bc_fast::cuda::Sm90Schedule;
using bc_fast::cuda::Sm90Store;
namespace sm90 = bc_fast::cuda::sm90;

int failures = 0;

void fail(const char* what, int a, int b, int c) {
  if (++failures <= 10) std::printf("  FAIL: %s (%d, %d, %d)\n", what, a, b, c);
}

// Distinct 16-byte bank groups (of the 8 in 128 bytes) for 8 addresses: one wavefront.
bool conflict_free(const int (&offsets)[8]) {
  unsigned seen = 0;
  for (int o : offsets) seen |= 1u << ((o % 128) / 16);
  return seen == 0xffu;
}

template <class Gemm>
void check(const char* name) {
  using Tile = typename Gemm::TileShape;
  constexpr int kM = size<0>(Tile{}), kN = size<1>(Tile{});
  typename Gemm::Mainloop::TiledMma mma;
  const auto coords = [&](int thread) {
    return mma.get_thread_slice(thread).partition_C(make_identity_tensor(make_shape(Int<kM>{}, Int<kN>{})));
  };
  using Layout = decltype(coords(0).layout());
  constexpr int kMmaM = size<1>(Layout{}), kGroups = size<0, 2>(Layout{});
  static_assert(size<2>(Layout{}) == 1 && kGroups * 8 * 2 == sm90::kStageRowBytes, "one 256-wide atom");
  const int threads = static_cast<int>(size(mma));
  std::vector<int> landed(kM * kN, 0);  // how often each tile element was written, at its own place
  const int before = failures;
  for (int warp = 0; warp < threads / 32; ++warp) {
    for (int mm = 0; mm < kMmaM; ++mm) {
      for (int h = 0; h < 2; ++h) {
        // The slot as stmatrix leaves it: the tile (row, column) whose value each 2-byte cell holds.
        std::vector<int> slot_row(sm90::kStageWarpBytes / 2, -1), slot_col(sm90::kStageWarpBytes / 2, -1);
        for (int j = 0; j < kGroups / 4; ++j) {
          for (int i = 0; i < 4; ++i) {  // matrix i of this stmatrix: packed[4j + i], column group g
            const int g = 4 * j + i;
            int offsets[8];
            for (int r = 0; r < 8; ++r) {
              offsets[r] = sm90::stage_offset(r, g);  // the address lane 8i + r gives
              for (int t = 4 * r; t < 4 * r + 4; ++t) {  // the lanes holding row r of the matrix
                const auto tc = coords(warp * 32 + t);
                for (int p = 0; p < 2; ++p) {
                  const auto c = tc(make_coord(make_coord(p, h, g), mm, 0));
                  const int cell = (offsets[r] + 4 * (t % 4) + 2 * p) / 2;
                  slot_row[cell] = get<0>(c);
                  slot_col[cell] = get<1>(c);
                }
              }
            }
            if (!conflict_free(offsets)) fail("stmatrix bank conflict: warp, half, group", warp, h, g);
          }
        }
        // The read-back: row `first` + rr, lane l's 16 bytes to columns 8l..8l+7.
        const int first = get<0>(coords(warp * 32)(make_coord(make_coord(0, h, 0), mm, 0)));
        for (int rr = 0; rr < 8; ++rr) {
          for (int quarter = 0; quarter < 4; ++quarter) {  // 8 lanes x 16 bytes: one 128-byte wavefront
            int offsets[8];
            for (int l = 8 * quarter; l < 8 * quarter + 8; ++l) offsets[l % 8] = sm90::stage_offset(rr, l);
            if (!conflict_free(offsets)) fail("read-back bank conflict: warp, half, row", warp, h, rr);
          }
          for (int l = 0; l < 32; ++l) {
            for (int e = 0; e < 8; ++e) {
              const int cell = sm90::stage_offset(rr, l) / 2 + e;
              const int row = first + rr, col = 8 * l + e;
              if (slot_row[cell] != row || slot_col[cell] != col)
                fail("value lands elsewhere: row, column, stored from row", row, col, slot_row[cell]);
              else
                ++landed[row * kN + col];
            }
          }
        }
      }
    }
  }
  for (int r = 0; r < kM; ++r)
    for (int c = 0; c < kN; ++c)
      if (landed[r * kN + c] != 1) fail("tile element written n times: row, column, n", r, c, landed[r * kN + c]);
  std::printf("%s: %d x %d tile, %d threads, %d MMA rows per thread: %s\n", name, kM, kN, threads, kMmaM,
              failures == before ? "ok" : "FAIL");
}

// The direct store's assumption: a thread's row of ((0, h, g), mm, 0) is the same for every column group g,
// and its column is even (one 4-byte pair store per (h, g)).
template <class Gemm>
void check_direct(const char* name) {
  using Tile = typename Gemm::TileShape;
  constexpr int kM = size<0>(Tile{}), kN = size<1>(Tile{});
  typename Gemm::Mainloop::TiledMma mma;
  const int before = failures;
  for (int t = 0; t < static_cast<int>(size(mma)); ++t) {
    const auto tc = mma.get_thread_slice(t).partition_C(make_identity_tensor(make_shape(Int<kM>{}, Int<kN>{})));
    using Layout = decltype(tc.layout());
    for (int mm = 0; mm < size<1>(Layout{}); ++mm)
      for (int h = 0; h < 2; ++h)
        for (int g = 0; g < size<0, 2>(Layout{}); ++g) {
          const auto c = tc(make_coord(make_coord(0, h, g), mm, 0));
          const int row = get<0>(tc(make_coord(make_coord(0, h, 0), mm, 0)));
          if (get<0>(c) != row) fail("row varies with g: t, h, g", t, h, g);
          if (get<1>(c) % 2 != 0) fail("odd column: t, h, g", t, h, g);
        }
  }
  std::printf("%s: direct store rows and columns: %s\n", name, failures == before ? "ok" : "FAIL");
}

}  // namespace

int main() {
  check_direct<sm90::LayerGemm<cutlass::half_t, sm90::ScheduleOf<Sm90Schedule::kCooperative>, Sm90Store::kDirect>>(
      "cooperative fp16");
  check_direct<sm90::LayerGemm<cutlass::bfloat16_t, sm90::ScheduleOf<Sm90Schedule::kPingpong>, Sm90Store::kDirect>>(
      "pingpong bf16");
  check<sm90::LayerGemm<cutlass::half_t, sm90::ScheduleOf<Sm90Schedule::kCooperative>, Sm90Store::kStaged>>(
      "cooperative fp16");
  check<sm90::LayerGemm<cutlass::bfloat16_t, sm90::ScheduleOf<Sm90Schedule::kCooperative>, Sm90Store::kStaged>>(
      "cooperative bf16");
  check<sm90::LayerGemm<cutlass::half_t, sm90::ScheduleOf<Sm90Schedule::kPingpong>, Sm90Store::kStaged>>(
      "pingpong fp16");
  check<sm90::LayerGemm<cutlass::bfloat16_t, sm90::ScheduleOf<Sm90Schedule::kPingpong>, Sm90Store::kStaged>>(
      "pingpong bf16");
  return failures == 0 ? 0 : 1;
}
