// A one-helper thread pool for splitting a call of a few microseconds over two cores.
//
// An OpenMP parallel region costs several microseconds; this costs a few cache-line transfers. One
// persistent helper thread (started on first use, detached) waits for jobs: it spins briefly after
// each job, then sleeps on a futex, so an idle library burns no CPU. A job is a number of chunks
// that write disjoint memory. The caller claims chunks from the front, the helper from the back
// (so each keeps the same weights in its own cache call after call); the caller waits only for the
// chunks the helper has actually claimed, so an asleep or descheduled helper costs the caller one
// claim, never the chunk. Every 32nd job of a kind runs alone, and while the split jobs of that kind
// are slower on average than those, its jobs run alone (see small_pool.cpp). Linux only; elsewhere (and in a forked child)
// a lease is never granted.
#pragma once

#include <cstdint>

namespace bc_fast {

// Runs chunk `chunk` of the job described by `ctx`, or all of them at once for kAllChunks (what the
// caller does when it runs alone: one kernel call over the whole range can be faster than two).
using ChunkFn = void (*)(const void* ctx, int64_t chunk);
constexpr int64_t kAllChunks = -1;

// The split's self-check for one kind of job (one layer at one batch size): its split times since the
// last probe alone, the moving average of split / alone, and how long it runs alone. A caller keeps one
// per kind, so that jobs of different sizes are never judged against each other (one shared check turned
// the split off for a cheap layer's batch-1 calls after an expensive one's were sampled alone). Touched
// only by the lease holder.
struct SplitStats {
  double split_sum = 0;   // TSC ticks of the split jobs since the last probe alone
  int split_n = 0;
  double ratio_avg = 0;   // moving average of split / alone time, one sample per probe (0: none yet)
  int ratios = 0;
  int64_t calls = 0;
  int warmup = 0;                        // split calls not judged (the helper's cache is cold)
  int64_t alone_left = 0;                // calls to run alone before trying the split again
  int64_t backoff = 0;                   // 0: the minimum
  uint64_t seen_wakes = 0;               // the pool's wake-ups seen (each restarts the warm-up)
};

// Which of kSplitBuckets SplitStats a job of `rows` rows uses: 1, 2-3, 4-7, ... rows.
constexpr int kSplitBuckets = 8;
inline int split_bucket(int64_t rows) {
  int b = 0;
  while (b + 1 < kSplitBuckets && (int64_t{2} << b) <= rows) ++b;
  return b;
}

// The right to use the pool, held by at most one calling thread at a time (a try-lock: other
// callers are refused at once and run on their own thread). Not copyable.
class SplitLease {
 public:
  // Takes the pool if it is free, enabled, in the process that created it (never in a forked
  // child) and its helper runs or can be started now; ok() says whether it did.
  SplitLease();
  ~SplitLease();
  SplitLease(const SplitLease&) = delete;
  SplitLease& operator=(const SplitLease&) = delete;
  bool ok() const { return ok_; }

  // fn(ctx, i) for every i in [0, chunks) once, on this thread or the helper, or fn(ctx, kAllChunks)
  // once on this thread; returns when all have run. fn must not throw. The helper runs with this thread's MXCSR (rounding, FTZ/DAZ), so
  // a chunk's result does not depend on which thread ran it. Without ok(), or outside 1 <= chunks <= 4095, runs every chunk here.
  // Runs alone (fn(ctx, kAllChunks)) while splitting does not pay for this kind of job, by `stats` (see
  // kProbeEvery in small_pool.cpp), or while the helper sleeps.
  void run(int64_t chunks, ChunkFn fn, const void* ctx, SplitStats& stats);

 private:
  bool ok_ = false;
};

// Whether leases may be granted: BC_FAST_SMALL_SPLIT=1 or 0 at the first call, else the built-in
// default (small_pool.cpp, kDefaultMode); set_small_split_enabled(false) makes later leases fail.
bool small_split_enabled();
void set_small_split_enabled(bool enabled);
// 0: off, 1: on, 2: on, and the caller leaves every chunk to the helper (for tests: every chunk of
// every job then runs on the helper thread). Else std::invalid_argument.
void set_small_split_mode(int mode);
// Jobs the helper thread has taken at least one chunk of since the process started (for tests).
int64_t small_split_helper_jobs();

}  // namespace bc_fast
