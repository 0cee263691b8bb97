"""Timing for the benchmark harness: interleaved medians, calibrated loops, sample plans.

What lives here: :class:`Timing` (seconds per call, medians over samples), :func:`time_interleaved`
(implementations timed round-robin, calibrated with :func:`calibrate_calls`),
:func:`time_rounds` (self-timed runs, such as whole conversions, round-robin), :func:`timing_from_samples`,
:class:`Stopwatch`, and :class:`TimingPlan` (how many samples a config
gets; :data:`TINY_PLAN` for smoke tests). The rules they follow are listed in
:mod:`bc_fast.bench.harness`, which re-exports every name. It imports the standard library only.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["TINY_PLAN", "Stopwatch", "Timing", "TimingPlan", "calibrate_calls", "time_gpu_interleaved",
           "time_interleaved", "time_rounds", "timing_from_samples"]


@dataclass
class Timing:
    """Seconds per call of one implementation (medians over samples)."""

    median_s: float
    min_s: float
    max_s: float
    cpu_over_wall: float
    samples: int
    calls_per_sample: int
    per_sample_s: list[float] = field(default_factory=list, repr=False)

    @property
    def median_us(self) -> float:
        return self.median_s * 1e6

    def as_dict(self) -> dict:
        d = asdict(self)
        d["median_us"] = self.median_us
        return d


def timing_from_samples(walls: list[float], cpu: float, calls: int = 1) -> Timing:
    """A :class:`Timing` from per-sample wall seconds (each ``calls`` calls) and their total CPU seconds.

    Also for samples measured elsewhere (e.g. in a subprocess).
    """
    per = [w / calls for w in walls]
    total = sum(walls)
    return Timing(statistics.median(per), min(per), max(per), cpu / total if total > 0 else float("nan"),
                  len(walls), calls, per)


def calibrate_calls(fn: Callable[[], Any], *, target_s: float = 0.01, max_calls: int = 2000,
                    min_calls: int = 1) -> int:
    """Calls per sample so that one sample takes about ``target_s`` (runs ``fn`` a few times)."""
    fn()  # warm-up: first touch, lazy init, caches
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        dt = time.perf_counter() - t0
        if dt >= target_s / 4 or n >= max_calls:
            break
        n = min(max_calls, n * 4)
    per_call = dt / n
    for _ in range(2):  # fastest of three trials: a load spike must not shrink the sample
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        per_call = min(per_call, (time.perf_counter() - t0) / n)
    return int(max(min_calls, min(max_calls, round(target_s / max(per_call, 1e-9)))))


def _run_sample(fn: Callable[[], Any], calls: int) -> tuple[float, float]:
    """(wall, cpu) seconds of ``calls`` back-to-back calls of ``fn``."""
    c0 = time.process_time()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    c1 = time.process_time()
    return t1 - t0, c1 - c0


def time_interleaved(fns: dict[str, Callable[[], Any]], *, samples: int = 20,
                     calls: int | dict[str, int] | None = None, warmup_rounds: int = 1,
                     target_s: float = 0.01, max_calls: int = 2000, min_calls: int = 1,
                     idle_s: float = 0.0, rewarm: bool = True, group: int = 1) -> dict[str, Timing]:
    """Time several functions round-robin: ``group`` samples of each per round, rotating who goes first.

    On a shared machine the background load drifts; interleaving spreads it evenly over
    the functions being compared, so their ratios stay meaningful. ``calls`` per sample
    is fixed (int, or per name) or calibrated per function (None) so a sample lasts
    about ``target_s``. Before each visit, ``idle_s`` of sleep lets the others' thread
    pools (OpenBLAS spins ~0.1 s after a call, OpenMP runtimes too) go to sleep; then
    ``rewarm`` runs one untimed call (caches, and this function's own pool).
    """
    names = list(fns)
    if calls is None:
        per_name = {k: calibrate_calls(fns[k], target_s=target_s, max_calls=max_calls, min_calls=min_calls)
                    for k in names}
    elif isinstance(calls, dict):
        per_name = {k: int(calls[k]) for k in names}
    else:
        per_name = {k: int(calls) for k in names}
    for _ in range(warmup_rounds):
        for k in names:
            fns[k]()
    walls: dict[str, list[float]] = {k: [] for k in names}
    cpus: dict[str, float] = {k: 0.0 for k in names}
    group = max(1, int(group))
    for i in range(-(-samples // group)):
        order = names[i % len(names):] + names[:i % len(names)]
        for k in order:
            fn, n = fns[k], per_name[k]
            if idle_s > 0:
                time.sleep(idle_s)
            if rewarm:
                fn()  # untimed re-warm
            for _ in range(min(group, samples - i * group)):
                w, c = _run_sample(fn, n)
                walls[k].append(w)
                cpus[k] += c
    return {k: timing_from_samples(walls[k], cpus[k], per_name[k]) for k in names}


def time_rounds(fns: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Seconds of each self-timed function over ``rounds`` round-robin rounds, after one untimed warm-up each.

    Each function times its own work and returns the seconds (a whole conversion, a search: what it
    sets up or cleans up around that is not counted). The warm-up round runs every function once and
    drops its time (cold caches, lazy initialisation, first-touched memory); then each round visits
    every function once, the order rotated by one each round, so each function takes every position
    in turn (none always runs first, on the freshest page cache or the idlest machine).
    """
    names = list(fns)
    for k in names:  # untimed warm-up
        fns[k]()
    runs: dict[str, list[float]] = {k: [] for k in names}
    for i in range(rounds):
        for k in names[i % len(names):] + names[:i % len(names)]:
            runs[k].append(float(fns[k]()))
    return runs


class Stopwatch:
    """``with Stopwatch() as sw: ...`` then ``sw.wall``, ``sw.cpu`` (seconds)."""

    def __enter__(self) -> Stopwatch:
        self._c0, self._t0 = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall = time.perf_counter() - self._t0
        self.cpu = time.process_time() - self._c0


@dataclass(frozen=True)
class TimingPlan:
    """How many samples a config gets.

    Large configs (one call per sample) get as many samples as fit ``large_budget_s``,
    within ``large_samples``; small configs get ``small_samples`` loops of about
    ``small_target_s`` each, ``small_group`` consecutive samples per visit.
    ``idle_s`` is the pause before each visit (other runtimes' spinning threads sleep).
    """

    large_budget_s: float = 2.0
    large_samples: tuple[int, int] = (3, 5)
    small_samples: int = 15
    small_target_s: float = 0.002
    small_group: int = 5
    idle_s: float = 0.1

    def describe(self) -> str:
        return (f"large configs {self.large_samples[0]}-{self.large_samples[1]} samples, "
                f"small configs {self.small_samples} samples of ~{self.small_target_s * 1e3:g} ms "
                f"({self.small_group} per visit); {self.idle_s:g} s idle before each visit")


#: Toy timing for smoke tests: seconds in total, numbers meaningless.
TINY_PLAN = TimingPlan(0.0, (2, 2), 3, 0.0005, 3, 0.0)


def time_gpu_interleaved(torch: Any, fns: dict[str, Callable[[], Any]], *, samples: int, calls: int = 1,
                         wall: bool = False) -> dict[str, float]:
    """Median seconds per call of each GPU function, interleaved round-robin after one warm-up call each.

    CUDA events on the current stream (``wall=False``) or the host clock up to a synchronize
    (``wall=True``, for per-call latency). ``torch`` is passed in: this module imports no framework.
    """
    for fn in fns.values():
        fn()
    torch.cuda.synchronize()
    per: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for i in range(samples):
        for k in names[i % len(names):] + names[:i % len(names)]:
            fn = fns[k]
            if wall:
                torch.cuda.synchronize()
                with Stopwatch() as sw:
                    for _ in range(calls):
                        fn()
                    torch.cuda.synchronize()
                per[k].append(sw.wall / calls)
            else:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                for _ in range(calls):
                    fn()
                b.record()
                b.synchronize()
                per[k].append(a.elapsed_time(b) / 1e3 / calls)
    return {k: timing_from_samples(v, 0.0).median_s for k, v in per.items()}
