// The one-helper thread pool of small_pool.h.
//
// Protocol. One 64-bit word, `claim`, describes the job in flight: epoch (40 bits, +1 per job),
// front and back (12 bits each): chunks [front, back) are unclaimed. The caller writes the job's
// fn/ctx/mxcsr, then the word (release); it claims by CAS front -> front + 1, the helper by CAS
// back -> back - 1. Within an epoch front only grows and back only shrinks, so the word never takes
// a value twice (no ABA), and a CAS that succeeds proves the job was live between the helper's load
// of the word and the CAS: the fn/ctx it read in between are that job's. The caller counts the
// chunks it ran; the rest were claimed by the helper, which adds one to `helper_done` after each
// (and wakes the caller if it sleeps waiting, see sleep_until_helper_chunk); the caller waits for
// exactly those, so a helper that never sees a job (asleep, descheduled) costs the caller only its
// claims. Sleep: after a spin the helper sets `sleeping` and waits on the futex `wake`; a caller that
// finds it asleep runs alone and never publishes (see kStreamGapNs for when it wakes it, and
// steer_helper_off for where). Tests' helper-only mode (2) publishes anyway and wakes the helper
// while it waits.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <new>
#include <stdexcept>
#include <string>
#include <thread>

#include "small_pool.h"

#if defined(__linux__)
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <sys/syscall.h>
#include <unistd.h>
#define BC_FAST_SPLIT_POOL 1
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <emmintrin.h>  // _mm_pause
#include <x86intrin.h>  // __rdtsc
#include <xmmintrin.h>  // _mm_getcsr, _mm_setcsr
#endif

namespace bc_fast {
namespace small_pool_detail {

constexpr int kIndexBits = 12;
constexpr uint64_t kIndexMask = (uint64_t{1} << kIndexBits) - 1;
constexpr int kEpochShift = 2 * kIndexBits;
constexpr int64_t kMaxChunks = static_cast<int64_t>(kIndexMask);
// After a job the helper spins this long for the next one before it sleeps: a stream of calls
// (a query loop) finds it awake, an idle library costs nothing.
constexpr auto kHelperSpin = std::chrono::microseconds(60);
// Waking a sleeping helper (FUTEX_WAKE) costs the caller ~5 us on the project's VMs, more than a
// batch-1 call, and a woken helper comes too late for that call anyway. So a call that finds the
// helper asleep runs alone, and wakes it (after its own work) only when the previous such call was
// less than this long ago: calls are coming in a stream, which then keeps the helper awake.
constexpr int64_t kStreamGapNs = 50000;
// And at most once per this long: on a busy machine a woken helper may not run for a while (or run
// on the caller's own core, where it only yields), and the wake-up is then pure cost.
constexpr int64_t kMinWakeIntervalNs = 2000000;
// The split checks itself, by direct comparison, per kind of job (SplitStats: the caller keeps one
// per layer and batch-size bucket): every kProbeEvery-th job of a kind runs alone, and its time is
// compared with the mean time of that kind's split jobs since the previous probe, so both sides of
// each comparison come from the same fraction of a millisecond. A moving average of that ratio (1/4
// weight per probe) decides: where split is slower (cores busy or far apart, or a helper descheduled
// mid-chunk for milliseconds on a busy machine), that kind runs alone, without publishing, for
// kMinBackoff jobs, doubled after each failed re-try up to kMaxBackoff. So the split pays on average
// where it runs and costs nearly nothing where it cannot. (Two moving averages with different time
// scales, one per mode and one for every shape, compared one shape's or one moment's split time with
// another's alone time, and turned the split off where it paid: on the project's VM its neighbours'
// bursts of cache traffic alone flipped it.)
constexpr int64_t kProbeEvery = 32;
constexpr int kMinSamples = 4;  // split jobs since the last probe for a comparison
constexpr int kMinRatios = 2;   // comparisons before a verdict
// Not judged: the first split calls after the helper wakes or the split resumes (the helper's cache
// is cold then: its half of W comes from memory once).
constexpr int kWarmupCalls = 2;
constexpr int64_t kMinBackoff = 64;
constexpr int64_t kMaxBackoff = 16384;
// The caller spins this many pauses (~3 us) waiting for the helper's chunks before it sleeps on a
// futex until the helper has finished them (the helper may share the caller's core, or have been
// descheduled mid-chunk, on a busy machine). sched_yield there left the caller spinning until the
// next scheduler tick, 4 ms on the project's VM, whenever the scheduler did not switch to the helper.
constexpr int kCallerSpinsBeforeSleep = 128;
// Longest single futex sleep of the caller (a safety net: the helper always wakes it).
constexpr long kCallerSleepNs = 1000000;
// Every this many pauses (~1 us) the spinning helper checks its deadline, and leaves its core if it
// shares it with the last caller (the scheduler likes to put a wakee beside its waker): spinning
// there would hold that caller off for the whole spin, and help never comes (move_off_cpu).
constexpr unsigned kHelperSpinsPerCheck = 32;

constexpr int kAwake = 0, kAsleep = 1, kWakeSent = 2;

inline uint64_t epoch_of(uint64_t v) { return v >> kEpochShift; }
inline uint64_t front_of(uint64_t v) { return (v >> kIndexBits) & kIndexMask; }
inline uint64_t back_of(uint64_t v) { return v & kIndexMask; }

inline void cpu_pause() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#else
  std::this_thread::yield();
#endif
}
// A cheap monotonic tick count (TSC on x86: ~10 ns against steady_clock's ~25).
inline int64_t ticks() {
#if defined(__x86_64__) || defined(__i386__)
  return static_cast<int64_t>(__rdtsc());
#else
  return std::chrono::steady_clock::now().time_since_epoch().count();
#endif
}

inline uint32_t get_fp_state() {
#if defined(__x86_64__) || defined(__i386__)
  return _mm_getcsr();
#else
  return 0;
#endif
}
inline void set_fp_state([[maybe_unused]] uint32_t s) {
#if defined(__x86_64__) || defined(__i386__)
  // Exception flags differ harmlessly; compare the control bits only (rounding, FTZ, DAZ, masks).
  if (((_mm_getcsr() ^ s) & ~0x3Fu) != 0) _mm_setcsr(s);
#endif
}

struct Pool {
  // The job line: written by the caller once per job, read by the helper.
  alignas(64) std::atomic<uint64_t> claim{0};
  std::atomic<ChunkFn> fn{nullptr};
  std::atomic<const void*> ctx{nullptr};
  std::atomic<uint32_t> fp_state{0};
  std::atomic<int> caller_cpu{-1};  // where the last job's caller ran (sched_getcpu: cheap, rseq)
  // Chunks the helper has finished, ever (only it writes).
  alignas(64) std::atomic<int64_t> helper_done{0};
  std::atomic<int64_t> helper_jobs{0};
  // A caller that waits for the helper's chunks longer than a spin sleeps on the futex `done_seq`,
  // announced by `caller_waiting`; the helper bumps and wakes it after a chunk.
  std::atomic<uint32_t> done_seq{0};
  std::atomic<int> caller_waiting{0};
  // Sleeping and waking.
  alignas(64) std::atomic<uint32_t> wake{0};
  std::atomic<int> sleeping{0};  // kAwake, kAsleep (or about to be) or kWakeSent
  std::atomic<int> helper_tid{0};       // set by the helper when it starts
  std::atomic<bool> steered{false};     // a waker narrowed the helper's CPU mask (steer_helper_off)
  // The lease (a try-lock) and what only its holder touches.
  alignas(64) std::atomic<bool> busy{false};
  int64_t last_alone_ns = 0;  // when a call last ran alone because the helper slept
  int64_t last_wake_ns = -kMinWakeIntervalNs;  // when a caller last woke it
  uint64_t wakes = 0;                          // wake-ups sent (SplitStats::seen_wakes)
  bool started = false;
  bool failed = false;
  // Set in a forked child (pthread_atfork, registered before the helper starts): the helper exists
  // only in the parent. getpid() per call would cost a system call.
  std::atomic<bool> forked{false};
  uint64_t epoch = 0;
  int64_t helper_expected = 0;  // chunks the helper has claimed, ever
};

// Never destroyed: the detached helper may still be spinning on it while the process exits.
inline Pool& pool() {
  static Pool* const p = new Pool();
  return *p;
}

// Without BC_FAST_SMALL_SPLIT: on. Where the helper gets a core of its own and the cores are close
// it pays (batch 1 on a Zen 4 VM, core call, helper on the other vCPU: 256 -> 256 2.0 vs 3.0 us,
// 384 -> 384 3.5 vs 6.4 us, 768 -> 768 13.4 vs 25.2 us); where it cannot (cores busy, or ~1 us
// between them) the self-check (kProbeEvery) keeps calls alone, at +0.00-0.05 us a call.
constexpr int kDefaultMode = 1;

// 0: off, 1: on, 2: on and the caller leaves every chunk to the helper (tests), -1: not read yet.
inline std::atomic<int>& mode_slot() {
  static std::atomic<int> mode{-1};
  return mode;
}
inline int mode() {
  int m = mode_slot().load(std::memory_order_relaxed);
  if (m >= 0) return m;
  const char* env = std::getenv("BC_FAST_SMALL_SPLIT");
  m = env == nullptr || *env == '\0' ? kDefaultMode : std::strcmp(env, "0") == 0 ? 0 : 1;
  int expected = -1;
  return mode_slot().compare_exchange_strong(expected, m) ? m : expected;
}

#if defined(BC_FAST_SPLIT_POOL)
inline void futex_wait(std::atomic<uint32_t>* word, uint32_t value) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT_PRIVATE, value, nullptr, nullptr, 0);
}
inline void futex_wake(std::atomic<uint32_t>* word) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE_PRIVATE, 1, nullptr, nullptr, 0);
}
inline void futex_wait_for(std::atomic<uint32_t>* word, uint32_t value, long ns) {
  const timespec timeout{0, ns};
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT_PRIVATE, value, &timeout, nullptr, 0);
}

// This thread's CPU mask (`allowed`) and the same without `cpu` (`others`); false if `cpu` is not in
// it or nothing else is, or on error.
inline bool mask_without(int cpu, cpu_set_t* allowed, cpu_set_t* others) {
  if (cpu < 0 || cpu >= CPU_SETSIZE || sched_getaffinity(0, sizeof *allowed, allowed) != 0 ||
      !CPU_ISSET(cpu, allowed))
    return false;
  *others = *allowed;
  CPU_CLR(cpu, others);
  return CPU_COUNT(others) > 0;
}

// Moves the calling thread (the helper) off `cpu`, the last caller's, to another CPU it may run on,
// and leaves its mask as it was. sched_yield alone is not enough: the scheduler placed the woken
// helper beside its waker and kept it there while the other core idled, so in about half of the
// processes on the project's 2-vCPU VM the split never ran (helper and caller on one vCPU).
inline void move_off_cpu(int cpu) {
  cpu_set_t allowed, others;
  if (!mask_without(cpu, &allowed, &others) || sched_setaffinity(0, sizeof others, &others) != 0) {
    sched_yield();  // nowhere to go
    return;
  }
  sched_setaffinity(0, sizeof allowed, &allowed);  // the move above happened at once
}

// Before a wake-up, by the caller: keeps the helper off the caller's CPU. The scheduler likes to put
// a wakee beside its waker, where the helper waited for the caller's time slice to end (milliseconds)
// before it could run and move away, and calls ran alone meanwhile. The helper restores its mask once
// it runs.
inline void steer_helper_off(Pool& p, int cpu) {
  const int tid = p.helper_tid.load(std::memory_order_acquire);
  cpu_set_t allowed, others;
  if (tid > 0 && mask_without(cpu, &allowed, &others) && sched_setaffinity(tid, sizeof others, &others) == 0)
    p.steered.store(true, std::memory_order_release);
}

// Waits until the word carries an epoch other than `seen`; returns it. `mask`: the helper's own CPU
// mask, restored after a steered wake-up.
inline uint64_t wait_for_job(Pool& p, uint64_t seen, const cpu_set_t& mask) {
  for (;;) {
    const auto deadline = std::chrono::steady_clock::now() + kHelperSpin;
    for (unsigned spin = 0;; ++spin) {
      const uint64_t v = p.claim.load(std::memory_order_acquire);
      if (epoch_of(v) != seen) return v;
      cpu_pause();
      if (spin % kHelperSpinsPerCheck == 0) {  // also at once, after a wake-up
        if (std::chrono::steady_clock::now() > deadline) break;
        const int caller = p.caller_cpu.load(std::memory_order_relaxed);
        if (sched_getcpu() == caller) move_off_cpu(caller);
      }
    }
    p.sleeping.store(kAsleep, std::memory_order_seq_cst);
    const uint32_t w = p.wake.load(std::memory_order_seq_cst);
    // Not if a wake-up was sent since (it bumps `wake` after setting kWakeSent: if it bumped it
    // before the read above, this sees kWakeSent; if after, FUTEX_WAIT returns or is woken).
    if (p.sleeping.load(std::memory_order_seq_cst) == kAsleep &&
        epoch_of(p.claim.load(std::memory_order_seq_cst)) == seen)
      futex_wait(&p.wake, w);
    if (p.steered.exchange(false, std::memory_order_acq_rel)) sched_setaffinity(0, sizeof mask, &mask);
    p.sleeping.store(kAwake, std::memory_order_seq_cst);
  }
}

// The caller sleeps until the helper finishes a chunk (or kCallerSleepNs pass). The helper bumps
// `done_seq` after `helper_done` whenever it sees `caller_waiting`; all four accesses are seq_cst, so
// either the helper sees the flag (and the futex value changes, or the sleeper is woken) or this
// thread sees the chunk done and does not sleep.
inline void sleep_until_helper_chunk(Pool& p) {
  const uint32_t seq = p.done_seq.load(std::memory_order_seq_cst);
  p.caller_waiting.store(1, std::memory_order_seq_cst);
  if (p.helper_done.load(std::memory_order_seq_cst) != p.helper_expected)
    futex_wait_for(&p.done_seq, seq, kCallerSleepNs);
  p.caller_waiting.store(0, std::memory_order_seq_cst);
}

[[noreturn]] inline void helper_main(Pool* pp, uint64_t seen) {
  Pool& p = *pp;
  cpu_set_t mask;
  if (sched_getaffinity(0, sizeof mask, &mask) == 0)
    p.helper_tid.store(static_cast<int>(syscall(SYS_gettid)), std::memory_order_release);  // else never steered
  for (;;) {
    uint64_t v = wait_for_job(p, seen, mask);
    seen = epoch_of(v);
    bool took = false;
    while (epoch_of(v) == seen && front_of(v) < back_of(v)) {
      // Read before the CAS; valid for this job only if the CAS succeeds (see the protocol above).
      const ChunkFn fn = p.fn.load(std::memory_order_relaxed);
      const void* ctx = p.ctx.load(std::memory_order_relaxed);
      const uint32_t fp = p.fp_state.load(std::memory_order_relaxed);
      if (!p.claim.compare_exchange_weak(v, v - 1, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
      if (!took) {
        took = true;
        set_fp_state(fp);
        p.helper_jobs.fetch_add(1, std::memory_order_relaxed);
      }
      fn(ctx, static_cast<int64_t>(back_of(v) - 1));
      p.helper_done.fetch_add(1, std::memory_order_seq_cst);
      if (p.caller_waiting.load(std::memory_order_seq_cst) != 0) {
        p.done_seq.fetch_add(1, std::memory_order_seq_cst);
        futex_wake(&p.done_seq);
      }
      v = p.claim.load(std::memory_order_acquire);
    }
  }
}

// Starts the detached helper with every signal blocked (signals belong to the interpreter's
// threads). Called by the lease holder. False if the thread cannot be created.
inline bool start_helper(Pool& p) {
  if (pthread_atfork(nullptr, nullptr, [] { pool().forked.store(true, std::memory_order_relaxed); }) != 0)
    return false;
  sigset_t all, old;
  sigfillset(&all);
  if (pthread_sigmask(SIG_SETMASK, &all, &old) != 0) return false;
  bool ok = true;
  try {
    std::thread(helper_main, &p, p.epoch).detach();
  } catch (...) {
    ok = false;
  }
  pthread_sigmask(SIG_SETMASK, &old, nullptr);
  return ok;
}
#endif

// A sample counts at most twice the average so far (weight 1/4): one comparison spoiled by a lost
// time slice (milliseconds, on a busy or virtualised machine) must not turn the split off for thousands
// of calls, while a lasting change still moves the average.
inline void average_in(double& avg, double x) {
  avg = avg <= 0 ? x : avg + (std::min(x, 2 * avg) - avg) / 4;
}

// The caller alone: one kernel call over the whole range; its time in ticks.
inline int64_t run_alone(ChunkFn fn, const void* ctx) {
  const int64_t t0 = ticks();
  fn(ctx, kAllChunks);
  return ticks() - t0;
}

// A split job took `took` ticks.
inline void record_split(SplitStats& st, int64_t took) {
  if (st.warmup > 0) {
    --st.warmup;
    return;
  }
  st.split_sum += static_cast<double>(took);
  ++st.split_n;
}

// A probe ran alone in `alone` ticks: compare with the split jobs since the last probe, and stop
// splitting this kind of job for a while if that mode is the slower one.
inline void judge(SplitStats& st, int64_t alone) {
  if (st.split_n < kMinSamples || alone <= 0) return;
  average_in(st.ratio_avg, st.split_sum / st.split_n / static_cast<double>(alone));
  st.split_sum = 0;
  st.split_n = 0;
  if (++st.ratios < kMinRatios) return;
  if (st.ratio_avg > 1.0) {
    st.alone_left = std::max(st.backoff, kMinBackoff);
    st.backoff = std::min(kMaxBackoff, 2 * st.alone_left);
    st.ratio_avg = 0;
    st.ratios = 0;
  } else if (st.ratio_avg < 0.8) {
    st.backoff = kMinBackoff;
  }
}

}  // namespace small_pool_detail

SplitLease::SplitLease() {
#if defined(BC_FAST_SPLIT_POOL)
  using namespace small_pool_detail;
  if (mode() == 0) return;
  Pool& p = pool();
  if (p.busy.load(std::memory_order_relaxed) || p.busy.exchange(true, std::memory_order_acquire)) return;
  // A forked child's copy of the pool names a helper that exists only in its parent.
  bool usable = !p.failed && !p.forked.load(std::memory_order_relaxed);
  if (usable && !p.started) {
    p.started = start_helper(p);
    p.failed = !p.started;
    usable = p.started;
  }
  if (!usable) {
    p.busy.store(false, std::memory_order_release);
    return;
  }
  ok_ = true;
#endif
}

SplitLease::~SplitLease() {
  if (ok_) small_pool_detail::pool().busy.store(false, std::memory_order_release);
}

void SplitLease::run(int64_t chunks, ChunkFn fn, const void* ctx, SplitStats& st) {
  using namespace small_pool_detail;
  if (!ok_ || chunks < 1 || chunks > kMaxChunks) {  // callers check; never a wrong answer
    fn(ctx, kAllChunks);
    return;
  }
  Pool& p = pool();
  const bool helper_only = mode() == 2;
  if (st.calls == 0 || st.seen_wakes != p.wakes) {  // first use, or the helper slept since: its cache is cold
    st.warmup = kWarmupCalls;
    st.seen_wakes = p.wakes;
  }
  if (!helper_only) {
    if (st.alone_left > 0) {  // the split did not pay lately
      if (--st.alone_left == 0) {
        st.warmup = kWarmupCalls;
        st.split_sum = 0;
        st.split_n = 0;
      }
      run_alone(fn, ctx);
      return;
    }
    if (++st.calls % kProbeEvery == 0) {  // the comparison
      judge(st, run_alone(fn, ctx));
      return;
    }
  }
#if defined(BC_FAST_SPLIT_POOL)
  if (p.sleeping.load(std::memory_order_acquire) != kAwake) {
    // Asleep, or woken and not running yet: no help is coming soon.
    bool wake = helper_only;
    if (!helper_only) {
      run_alone(fn, ctx);
      const int64_t now = std::chrono::duration_cast<std::chrono::nanoseconds>(
                              std::chrono::steady_clock::now().time_since_epoch()).count();
      wake = now - p.last_alone_ns < kStreamGapNs && now - p.last_wake_ns >= kMinWakeIntervalNs;
      p.last_alone_ns = now;
      if (wake) p.last_wake_ns = now;
    }
    int asleep = kAsleep;
    if (wake) p.caller_cpu.store(sched_getcpu(), std::memory_order_relaxed);
    if (wake && p.sleeping.compare_exchange_strong(asleep, kWakeSent, std::memory_order_seq_cst)) {
      if (!helper_only) steer_helper_off(p, p.caller_cpu.load(std::memory_order_relaxed));
      p.wake.fetch_add(1, std::memory_order_seq_cst);
      futex_wake(&p.wake);
      ++p.wakes;
    }
    if (!helper_only) return;
  }
#endif
  p.fn.store(fn, std::memory_order_relaxed);
  p.ctx.store(ctx, std::memory_order_relaxed);
  p.fp_state.store(get_fp_state(), std::memory_order_relaxed);
#if defined(BC_FAST_SPLIT_POOL)
  p.caller_cpu.store(sched_getcpu(), std::memory_order_relaxed);
#endif
  // The caller publishes the job with chunk 0 already its own: it starts computing without a
  // second trip of the line between the cores (each costs ~0.1-0.5 us on the project's VMs). A
  // helper that falls asleep meanwhile, without seeing the job, costs nothing: the caller then
  // claims every chunk itself.
  const uint64_t first = helper_only ? 0 : 1;
  const uint64_t start = (++p.epoch << kEpochShift) | (first << kIndexBits) | static_cast<uint64_t>(chunks);
  const int64_t t0 = ticks();
  p.claim.store(start, std::memory_order_release);
  int64_t mine = 0;
  if (!helper_only) {
    fn(ctx, 0);
    mine = 1;
    uint64_t v = p.claim.load(std::memory_order_acquire);
    while (front_of(v) < back_of(v)) {
      if (!p.claim.compare_exchange_weak(v, v + (uint64_t{1} << kIndexBits), std::memory_order_acq_rel,
                                         std::memory_order_acquire))
        continue;
      fn(ctx, static_cast<int64_t>(front_of(v)));
      ++mine;
      v = p.claim.load(std::memory_order_acquire);
    }
  }
  p.helper_expected += chunks - mine;
  for (int spins = 0; p.helper_done.load(std::memory_order_acquire) != p.helper_expected;) {
    cpu_pause();
    if (++spins < kCallerSpinsBeforeSleep) continue;
    spins = 0;
#if defined(BC_FAST_SPLIT_POOL)
    int asleep = kAsleep;  // helper-only mode: it may have fallen asleep without seeing the job
    if (helper_only && p.sleeping.compare_exchange_strong(asleep, kWakeSent, std::memory_order_seq_cst)) {
      p.wake.fetch_add(1, std::memory_order_seq_cst);
      futex_wake(&p.wake);
    }
    sleep_until_helper_chunk(p);
#else
    std::this_thread::yield();
#endif
  }
  // A call the helper took no part in ran alone plus one publish (the helper was not there yet, or
  // asleep): it says nothing about the split, and judging it as one turned the split off for good at
  // start-up, before the new helper thread first ran.
  if (!helper_only && mine < chunks) record_split(st, ticks() - t0);
}

bool small_split_enabled() { return small_pool_detail::mode() != 0; }

void set_small_split_enabled(bool enabled) { set_small_split_mode(enabled ? 1 : 0); }

void set_small_split_mode(int mode) {
  if (mode < 0 || mode > 2) throw std::invalid_argument("small split mode must be 0, 1 or 2, got " + std::to_string(mode));
  small_pool_detail::mode_slot().store(mode, std::memory_order_relaxed);
}

int64_t small_split_helper_jobs() {
  return small_pool_detail::pool().helper_jobs.load(std::memory_order_relaxed);
}

}  // namespace bc_fast
