"""The one benchmark harness: timing, machine info, engines, results, report.

Used by ``bc_fast.bench.suite`` (``bc-fast bench``) and by every ``bench/*.py`` script;
each config is a function ``cfg(bench, ...) -> dict`` built from :func:`result`
and :func:`check`, run by :func:`run_configs`. numpy and threadpoolctl only at
import; torch, faiss and matplotlib are looked up when asked for. Timing rules:

* wall time from ``time.perf_counter``, CPU time from ``time.process_time``
  (all threads of the process), reported as ``cpu_over_wall``;
* a warm-up call (or calibration sample) is dropped before timing;
* tiny calls are timed as a loop of many calls per sample, divided;
* the reported value is the median over samples;
* implementations being compared are timed round-robin (:func:`time_interleaved`)
  so drifting background load on a shared machine hits them all alike; each
  visit is preceded by an untimed call of the same function, and an optional
  idle pause lets other thread pools (OpenBLAS, OpenMP) that were spinning go
  to sleep, so they neither steal the core nor show up in the next CPU time;
* every baseline writes into a preallocated output where its API allows
  (``np.matmul(out=)``, ``torch.addmm(out=)``, faiss ``apply_noalloc``, faiss
  ``search(D=, I=)``); a config's note names any that cannot. First-touched memory
  is very slow on the project's VMs, so outputs come from :class:`Buffers`,
  touched once and reused across configs.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# --------------------------------------------------------------------------- timing


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

# --------------------------------------------------------------------------- optional engines


def import_torch() -> tuple[Any, Any]:
    """``(torch, torch.nn.functional)``, or ``(None, None)`` when torch is not installed."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None, None
    return torch, F


def import_faiss() -> Any:
    """The faiss module, or None when it is not installed."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def _numpy_blas() -> Any:
    """threadpoolctl's controller for numpy's own BLAS (not bc_fast's or faiss's), or None."""
    from threadpoolctl import ThreadpoolController

    np.ones((2, 2), np.float32) @ np.ones((2, 2), np.float32)  # make sure it is loaded
    ctl = ThreadpoolController().select(user_api="blas")
    paths = [c.filepath for c in ctl.lib_controllers if "numpy" in c.filepath]
    return ctl.select(filepath=paths) if paths else None


def numpy_blas_threads() -> int | None:
    """Thread count of numpy's own BLAS (None if threadpoolctl does not find it)."""
    ctl = _numpy_blas()
    return ctl.lib_controllers[0].num_threads if ctl is not None else None


@dataclass
class Engines:
    """The optional engines and the thread count they all run with."""

    threads: int
    torch: Any
    F: Any
    faiss: Any
    numpy_blas_threads: int | None
    notes: list[str]


@contextlib.contextmanager
def engines(threads: int) -> Iterator[Engines]:
    """Run torch, faiss and numpy's BLAS with ``threads`` threads (torch in inference mode); restore after.

    bc_fast's own BLAS is left alone: the core drives it itself. bc_fast's threads are
    passed to each ``apply(threads=...)`` by the configs.
    """
    torch, F = import_torch()
    faiss = import_faiss()
    notes = [f"{name} not installed: its columns are skipped" for name, mod in (("torch", torch), ("faiss", faiss))
             if mod is None]
    blas = _numpy_blas()
    if blas is None:
        notes.append("numpy's BLAS not found by threadpoolctl: its thread count was not set")
    with contextlib.ExitStack() as stack:
        if blas is not None:
            stack.enter_context(blas.limit(limits=threads))
        if torch is not None:
            prev_torch = torch.get_num_threads()
            torch.set_num_threads(threads)
            stack.callback(torch.set_num_threads, prev_torch)
            stack.enter_context(torch.inference_mode())
        if faiss is not None:
            prev_faiss = faiss.omp_get_max_threads()
            faiss.omp_set_num_threads(threads)
            stack.callback(faiss.omp_set_num_threads, prev_faiss)
        yield Engines(threads, torch, F, faiss, numpy_blas_threads(), notes)


# --------------------------------------------------------------------------- machine

def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (else what platform knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags(wanted: Iterable[str] = ("avx2", "fma", "f16c", "avx512f", "avx_vnni", "amx_tile")) -> list[str]:
    """Those of ``wanted`` the CPU has (from /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [w for w in wanted if w in have]
    except OSError:
        pass
    return []


def threadpools() -> list[dict[str, Any]]:
    """Every BLAS and OpenMP runtime loaded in this process (threadpoolctl).

    One dict each: ``library`` (parent folder/file name), ``user_api``, ``internal_api``,
    ``version``, ``num_threads`` and, where threadpoolctl knows it, ``core`` (the BLAS
    kernel it picked, e.g. Haswell, SkylakeX, Zen).
    """
    from threadpoolctl import threadpool_info

    pools = []
    for p in threadpool_info():
        path = p.get("filepath") or ""
        pools.append({"library": f"{os.path.basename(os.path.dirname(path))}/{os.path.basename(path)}",
                      "user_api": p.get("user_api"), "internal_api": p.get("internal_api"),
                      "version": p.get("version"), "num_threads": p.get("num_threads"),
                      "core": p.get("architecture")})
    return pools


def machine_info(extra: dict | None = None) -> dict[str, Any]:
    """Machine, library versions, bc_fast's core, every thread pool's library/version/threads/kernel."""
    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cpu_flags": " ".join(cpu_flags()),
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": np.__version__,
    }
    try:
        from .. import __version__
        from .. import _core
        from ..engine import build_info
        info["bc_fast"] = __version__
        info["bc_fast_build_info"] = build_info()
        info["bc_fast_core"] = (f"{os.path.basename(_core.__file__)} built "
                                f"{time.ctime(os.path.getmtime(_core.__file__))}")
    except Exception as e:  # noqa: BLE001 - report, don't fail
        info["bc_fast_build_info"] = f"unavailable: {e}"
    torch, _ = import_torch()
    info["torch"] = torch.__version__ if torch is not None else None
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
    faiss = import_faiss()
    info["faiss"] = faiss.__version__ if faiss is not None else None
    if faiss is not None:
        info["faiss_omp_threads"] = faiss.omp_get_max_threads()
    info["threadpools"] = threadpools()
    info["openblas"] = {p["library"]: f"{p['num_threads']} threads, core={p['core'] or ''}"
                        for p in info["threadpools"] if p["internal_api"] == "openblas"}
    info["env"] = {k: v for k, v in os.environ.items()
                   if k.startswith(("OMP_", "OPENBLAS_", "MKL_", "GOMP_", "KMP_"))}
    if extra:
        info.update(extra)
    return info


def machine_lines(info: dict) -> list[str]:
    """Comment lines naming the CPU, load, versions, threads and the bc_fast core's kernel."""
    bi = info.get("bc_fast_build_info")
    kernel = bi.get("kernel") if isinstance(bi, dict) else "?"
    return [f"# machine: {info['cpu_model']}, {info['cpu_count']} cpus, flags {info['cpu_flags']}, "
            f"loadavg {info['loadavg']}; python {info['python']}, numpy {info['numpy']}, "
            f"torch {info['torch']}, faiss {info['faiss']}",
            f"# bc_fast {info.get('bc_fast')} kernel={kernel}; threads={info.get('bench_threads')} for bc_fast, "
            f"numpy BLAS ({info.get('numpy_blas_threads')}), torch, faiss; blas "
            + "; ".join(f"{k}: {v}" for k, v in info["openblas"].items())]


# --------------------------------------------------------------------------- configs: context and results

class Buffers:
    """Named scratch buffers, allocated and first-touched once, reused by every config.

    First-touched memory is very slow on the VMs, so a fresh output per config would
    time page faults rather than kernels.
    """

    def __init__(self, rng: np.random.Generator) -> None:
        self._mem: dict = {}
        self._noise = rng.standard_normal(1 << 20, dtype=np.float32)

    def get(self, key: str, shape: tuple, dtype: Any = np.float32, *, random: bool = False) -> np.ndarray:
        """A ``shape``/``dtype`` view of buffer ``key`` (grown if needed); ``random``: filled with N(0,1)."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        mem = self._mem.get(key)
        if mem is None or mem.nbytes < nbytes:
            self._mem.pop(key, None)
            gc.collect()
            mem = np.zeros(nbytes, np.uint8)  # np.zeros may map lazily: touch explicitly
            mem.fill(0)
            self._mem[key] = mem
        a = mem[:nbytes].view(dtype).reshape(shape)
        if random:  # tile a block of N(0,1) noise: cheap, and the rows still differ (period 2^20)
            flat = a.reshape(-1)
            block = self._noise.astype(dtype, copy=False)
            for i in range(0, flat.size, block.size):
                m = min(block.size, flat.size - i)
                flat[i:i + m] = block[:m]
        return a

    def nbytes(self) -> int:
        return sum(m.nbytes for m in self._mem.values())

    def clear(self) -> None:
        self._mem.clear()
        gc.collect()


@dataclass
class Bench:
    """What a config gets: engines, thread count, timing plan, reused buffers, a seeded rng.

    ``threads``, ``torch``, ``F`` (torch.nn.functional) and ``faiss`` are copied from ``eng``
    (None for an engine that is not installed).
    """

    plan: TimingPlan
    eng: Engines
    buf: Buffers
    rng: np.random.Generator
    log: Callable[[str], Any] = print
    peak_gflops: float | None = None
    mode: str = "full"

    def __post_init__(self) -> None:
        self.threads, self.torch, self.F, self.faiss = self.eng.threads, self.eng.torch, self.eng.F, self.eng.faiss

    def weights(self, d_out: int, d_in: int, bias: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """Random ``(W (d_out, d_in), b (d_out,))``, W scaled by 1/sqrt(d_in)."""
        w = self.rng.standard_normal((d_out, d_in), dtype=np.float32) / np.float32(math.sqrt(d_in))
        b = (self.rng.standard_normal(d_out, dtype=np.float32) * np.float32(0.1)) if bias else None
        return np.ascontiguousarray(w), b

    def measure(self, impls: dict[str, Callable[[], Any]], *, large: bool, min_calls: int = 1) -> dict[str, Timing]:
        """Large: one call per sample, count set by the time budget. Small: calibrated loops."""
        p = self.plan
        if large:
            t0 = time.perf_counter()
            for fn in impls.values():  # warm-up round; also estimates a round's length
                fn()
            round_s = time.perf_counter() - t0
            lo, hi = p.large_samples
            samples = int(min(hi, max(lo, p.large_budget_s // max(round_s, 1e-9))))
            return time_interleaved(impls, samples=samples, calls=1, warmup_rounds=0, idle_s=p.idle_s,
                                    rewarm=False)
        return time_interleaved(impls, samples=p.small_samples, target_s=p.small_target_s, max_calls=5000,
                                min_calls=min_calls, idle_s=p.idle_s, group=p.small_group)


def check(label: str, value: float | None, target: float, shown_target: str, shown_value: str) -> dict:
    """One target; ``value >= target`` passes (every check is phrased higher-is-better); None: SKIP."""
    status = "SKIP" if value is None else ("PASS" if value >= target else "MISS")
    return {"label": label, "value": value, "target": target, "shown_target": shown_target,
            "shown_value": shown_value, "status": status}


def speedup_check(label: str, timings: dict[str, Timing], base: str, target: float, bc: str = "bc_fast",
                  shown_target: str | None = None) -> dict:
    """``timings[base] / timings[bc] >= target`` (SKIP when ``base`` was not timed)."""
    if base not in timings:
        return check(label, None, target, shown_target or f"≥ {target:g}x", f"{base}: not installed")
    v = timings[base].median_s / timings[bc].median_s
    return check(label, v, target, shown_target or f"≥ {target:g}x", f"{v:.2f}x {base}")


def result(name: str, title: str, rows: int, timings: dict[str, Timing], checks: list[dict], *,
           flops_per_call: float | None = None, err: float | None = None, note: str = "",
           bc: str = "bc_fast", **extra: Any) -> dict:
    """One config's record: every implementation's medians (and GFLOP/s), its checks and overall status."""
    impls = {}
    for k, t in timings.items():
        d = {"median_s": t.median_s, "min_s": t.min_s, "max_s": t.max_s, "cpu_over_wall": t.cpu_over_wall,
             "samples": t.samples, "calls_per_sample": t.calls_per_sample}
        if flops_per_call:
            d["gflops"] = flops_per_call / t.median_s / 1e9
        impls[k] = d
    statuses = [c["status"] for c in checks]
    status = ("MISS" if "MISS" in statuses else "PASS" if "PASS" in statuses else "SKIP") if statuses else "INFO"
    return {"config": name, "title": title, "rows": rows, "bc_impl": bc, "impls": impls, "checks": checks,
            "status": status, "max_abs_err": err, "note": note, "flops_per_call": flops_per_call,
            "loadavg1": os.getloadavg()[0], **extra}


def max_abs_err(got: np.ndarray, ref: np.ndarray) -> float:
    """Largest absolute difference of ``got`` from a (float64) reference."""
    return float(np.max(np.abs(got.astype(np.float64) - ref))) if got.size else 0.0


# --------------------------------------------------------------------------- report

def fmt_time(s: float | None) -> str:
    """Seconds as µs / ms / s with 3-4 significant digits; ``-`` for None or NaN."""
    if s is None or math.isnan(s):
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.2f} µs" if s < 1e-5 else f"{s * 1e6:.1f} µs"
    if s < 1.0:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


def kv_line(**kv: Any) -> str:
    """One parseable line: ``key=value key=value ...`` (4 significant digits, no spaces in values)."""
    def f(v: Any) -> str:
        if v is None:
            return "na"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v).replace(" ", "_")
    return " ".join(f"{k}={f(v)}" for k, v in kv.items())


def log_result(log: Callable[[str], Any], r: dict) -> None:
    """One ``key=value`` line per implementation and per check, then error and note."""
    for k, v in r["impls"].items():
        log(kv_line(config=r["config"], impl=k, rows=r["rows"], median_us=v["median_s"] * 1e6,
                    min_us=v["min_s"] * 1e6, cpu_over_wall=v["cpu_over_wall"], gflops=v.get("gflops"),
                    samples=v["samples"], calls=v["calls_per_sample"]))
    for c in r["checks"]:
        log(kv_line(config=r["config"], check=c["label"], value=c["value"], target=c["target"], status=c["status"]))
    if r.get("max_abs_err") is not None:
        log(kv_line(config=r["config"], max_abs_err=r["max_abs_err"]))
    if r.get("note"):
        log(f"# {r['config']}: {r['note']}")


def format_table(results: list[dict]) -> str:
    """Markdown table: config | bc_fast median | baseline medians | ratios | target | status."""
    head = ["config", "rows", "bc_fast median (cpu/wall)", "baseline medians", "ratios", "target", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in results:
        bc = r["bc_impl"]
        if bc not in r["impls"]:  # a config skipped on this machine (e.g. bf16 without AVX512_BF16)
            lines.append("| " + " | ".join([r["config"], f"{r['rows']:,}", "-", "-", r.get("note") or "-", "-",
                                            r["status"]]) + " |")
            continue
        b = r["impls"][bc]
        bc_cell = f"{fmt_time(b['median_s'])} ({b['cpu_over_wall']:.2f})"
        if r["config"] == "peak":
            bc_cell = f"{fmt_time(b['median_s'])} = {b['gflops']:.1f} GFLOP/s ({b['cpu_over_wall']:.2f})"
        bases = "; ".join(f"{k} {fmt_time(v['median_s'])}" for k, v in r["impls"].items() if k != bc) or "-"
        ratios = "; ".join(c["shown_value"] for c in r["checks"]) or (r.get("note") or "-")
        info = [f"{k} {v['median_s'] / b['median_s']:.2f}x" for k, v in r["impls"].items() if k != bc
                and not any(c["shown_value"].endswith(" " + k) for c in r["checks"])]
        if info and r["checks"]:
            ratios += " (" + ", ".join(info) + ")"
        target = "; ".join(c["shown_target"] for c in r["checks"]) or "-"
        status = r["status"]
        if status == "MISS" and len(r["checks"]) > 1:
            status += f" ({sum(c['status'] == 'PASS' for c in r['checks'])}/{len(r['checks'])} pass)"
        lines.append("| " + " | ".join([r["config"], f"{r['rows']:,}", bc_cell, bases, ratios, target, status])
                     + " |")
    return "\n".join(lines)


def chart_png(results: list[dict], title: str) -> bytes | None:
    """Horizontal bars of every check's ratio with its target mark; None without matplotlib or checks."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    bars = [(f"{r['config']}: {c['label']}", c["value"], c["target"], c["status"])
            for r in results for c in r["checks"] if c["value"] is not None]
    if not bars:
        return None
    bars.reverse()
    fig = Figure(figsize=(9.5, 0.42 * len(bars) + 1.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    colors = {"PASS": "#2e7d32", "MISS": "#c62828"}
    ys = range(len(bars))
    ax.barh(list(ys), [v for _, v, _, _ in bars], left=0.0, color=[colors.get(s, "#777") for *_, s in bars], height=0.6)
    for i, (_, v, tgt, _) in enumerate(bars):
        ax.plot([tgt, tgt], [i - 0.42, i + 0.42], color="black", lw=2)
        ax.text(v, i, f" {v:.2f}", va="center", fontsize=8)
    ax.set_yticks(list(ys))
    ax.set_yticklabels([lab for lab, *_ in bars], fontsize=8)
    ax.axvline(1.0, color="#999", lw=0.8, ls="--")
    ax.set_xlabel("ratio (speed-up = baseline median / bc_fast median; or fraction of peak); black bar = target")
    ax.set_title(title, fontsize=9)
    hi = max(max(v for _, v, _, _ in bars), max(t for _, _, t, _ in bars))
    if hi > 4:  # a 10x fusion win would squash every other bar
        ax.set_xscale("log", base=2)
        lo = min(0.25, min(v for _, v, _, _ in bars) / 1.5)
        ax.set_xlim(lo, hi * 1.6)
        ticks = [2.0 ** k for k in range(math.floor(math.log2(lo)), math.ceil(math.log2(hi * 1.6)) + 1)]
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{v:g}" for v in ticks])
    else:
        ax.set_xlim(0, hi * 1.15)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=110)
    return out.getvalue()


# --------------------------------------------------------------------------- running configs

#: A config to run: ``(function, args)``; the function is called as ``function(bench, *args)``.
Config = tuple[Callable[..., dict], tuple]


def run_configs(name: str, configs: Iterable[Config] | Callable[[Bench], Iterable[Config]], *,
                threads: int | None = None, plan: TimingPlan = TimingPlan(), mode: str = "full",
                describe: str = "", log: Callable[[str], Any] = print, out_dir: Path | None = None,
                json_path: Path | None = None, meta: dict | None = None) -> dict:
    """Run configs in one process, log each, print a table; optionally write JSON (and a PNG).

    Parameters
    ----------
    name : str
        Title of the run (``bc_fast bench``, ``bench_core``, ...).
    configs : iterable of (function, args), or a callable ``bench -> iterable``
        Each function returns a :func:`result` record; a callable is called inside the
        engines' context (so a config list can depend on what is installed).
    threads : int, optional
        Threads for bc_fast, torch, faiss and numpy's BLAS (default: bc_fast's max_threads).
    plan, mode, describe : how samples are taken, the mode's name, and a line describing sizes.
    out_dir : Path, optional
        Write ``bench.json`` and ``bench.png`` there (atomically).
    json_path : Path, optional
        Write the JSON there instead (no PNG).
    meta : dict, optional
        Merged into the JSON payload.

    Returns
    -------
    dict
        ``machine``, ``results``, ``table``, ``summary``, ``total_s``, ``json``/``png`` paths, ``meta``.
        Never raises on a missed target.
    """
    from .._util.fileio import atomic_write_bytes
    from ..engine import build_info

    t_start, c_start = time.perf_counter(), time.process_time()
    T = int(threads or build_info().get("max_threads") or os.cpu_count() or 1)
    results: list[dict] = []
    with engines(T) as eng:
        info = machine_info({"bench_threads": T, "numpy_blas_threads": eng.numpy_blas_threads, "mode": mode})
        log(f"# {name} ({mode})")
        for line in machine_lines(info):
            log(line)
        if describe:
            log(f"# sizes: {describe}")
        for note in eng.notes:
            log(f"# note: {note}")
        bench = Bench(plan, eng, Buffers(np.random.default_rng(0)), np.random.default_rng(1), log, mode=mode)
        try:
            for fn, args in (configs(bench) if callable(configs) else configs):
                t0 = time.perf_counter()
                r = fn(bench, *args)
                r["config_wall_s"] = time.perf_counter() - t0
                results.append(r)
                log_result(log, r)
                log(f"# {r['config']} done in {r['config_wall_s']:.1f}s (at {time.perf_counter() - t_start:.1f}s)")
                gc.collect()
        finally:
            peak_mem = bench.buf.nbytes()
            bench.buf.clear()
    total_s, cpu_s = time.perf_counter() - t_start, time.process_time() - c_start
    table = format_table(results)
    checks = [c for r in results for c in r["checks"]]
    summary = (f"{sum(c['status'] == 'PASS' for c in checks)}/{len(checks)} targets met; wall {total_s:.1f}s, "
               f"cpu {cpu_s:.1f}s; loadavg now {' '.join(f'{v:.2f}' for v in os.getloadavg())}; "
               f"reused buffers {peak_mem / 2**30:.2f} GiB")
    log("")
    log(f"# {name} ({describe or mode})")
    log(f"# machine: {info['cpu_model']}, {info['cpu_count']} cpus, threads={T}, loadavg at start {info['loadavg']}; "
        f"ratios are baseline median / bc_fast median (> 1: bc_fast faster)")
    log(table)
    log(f"# {summary}")
    payload = {"suite": name, "mode": mode, "machine": info, "threads": T, "notes": eng.notes,
               "peak_gflops": bench.peak_gflops, "results": results, "table": table, "summary": summary,
               "total_s": total_s, "cpu_s": cpu_s, "argv": sys.argv[1:], **(meta or {})}
    png = None
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        json_path = out_dir / "bench.json"
        png = chart_png(results, f"{name} ({mode}) on {info['cpu_model']}, {T} threads"
                        + (f", peak {bench.peak_gflops:.0f} GFLOP/s" if bench.peak_gflops else ""))
    payload["json"] = str(json_path) if json_path is not None else None
    payload["png"] = str(out_dir / "bench.png") if png is not None else None
    if json_path is not None:
        atomic_write_bytes(Path(json_path), json.dumps(payload, indent=1, default=str).encode())
        wrote = str(json_path)
        if png is not None:
            atomic_write_bytes(out_dir / "bench.png", png)
            wrote += f" and {payload['png']}"
        elif out_dir is not None:
            wrote += " (no PNG: matplotlib not installed, or no checks)"
        log(f"# wrote {wrote}")
    return payload


def script_args(doc: str, argv: list[str] | None = None, *, quick_help: str = "smaller sizes, fewer samples",
                extra: Callable[[Any], None] | None = None) -> Any:
    """The bench/ scripts' common options: ``--quick``, ``--threads N``, ``--json PATH`` (+ ``extra``)."""
    import argparse

    p = argparse.ArgumentParser(description=doc.strip().splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc)
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--threads", type=int, default=None,
                   help="threads for bc_fast, numpy's BLAS, torch and faiss (default: bc_fast max_threads); "
                        "use 1 on a shared, loaded machine")
    p.add_argument("--json", metavar="PATH", type=Path, default=None,
                   help="also write machine info, every timing and check as JSON")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # smoke-test sizes
    if extra is not None:
        extra(p)
    return p.parse_args(argv)
