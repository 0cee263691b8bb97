"""Shared timing helpers for the bench/ scripts.

Standalone (numpy only; torch, faiss and bc_fast are looked up if present).
Import from a bench script with ``from _common import ...`` (bench/ is on
``sys.path`` when a script in it is run as ``python bench/bench_x.py``).

Timing rules used by every bench script:

* wall time from ``time.perf_counter``, CPU time from ``time.process_time``
  (all threads of the process), reported as ``cpu_over_wall``;
* a warm-up call (or calibration sample) is dropped before timing;
* tiny calls are timed as a loop of many calls per sample, divided;
* the reported value is the median over samples;
* implementations being compared are timed round-robin (:func:`time_interleaved`)
  so drifting background load on a shared machine hits them all alike; each
  sample is preceded by an untimed call of the same function, and an optional
  idle pause lets other thread pools (OpenBLAS, OpenMP) that were spinning go
  to sleep, so they neither steal the core nor show up in the next CPU time.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable


# --------------------------------------------------------------------------- timing

@dataclass
class Timing:
    """Result of :func:`time_fn`; times are seconds per call."""

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


def time_fn(fn: Callable[[], Any], *, samples: int = 20, calls: int | None = None,
            warmup: int = 1, target_s: float = 0.01, max_calls: int = 2000, min_calls: int = 1,
            idle_s: float = 0.1) -> Timing:
    """Median seconds per call of ``fn()``.

    ``calls`` fixes the calls per sample; None calibrates it so a sample lasts about
    ``target_s`` (between ``min_calls`` and ``max_calls``). ``warmup`` untimed
    calls run first (calibration counts as warm-up too).
    """
    if idle_s > 0:
        time.sleep(idle_s)
    if calls is None:
        calls = calibrate_calls(fn, target_s=target_s, max_calls=max_calls, min_calls=min_calls)
    for _ in range(warmup):
        fn()
    walls: list[float] = []
    cpu_total = 0.0
    for _ in range(samples):
        c0 = time.process_time()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t1 = time.perf_counter()
        c1 = time.process_time()
        walls.append(t1 - t0)
        cpu_total += c1 - c0
    wall_total = sum(walls)
    per = [w / calls for w in walls]
    return Timing(
        median_s=statistics.median(per), min_s=min(per), max_s=max(per),
        cpu_over_wall=cpu_total / wall_total if wall_total > 0 else float("nan"),
        samples=samples, calls_per_sample=calls, per_sample_s=per,
    )


def time_interleaved(fns: dict[str, Callable[[], Any]], *, samples: int = 20,
                     calls: int | dict[str, int] | None = None, warmup_rounds: int = 1,
                     target_s: float = 0.01, max_calls: int = 2000, min_calls: int = 1,
                     idle_s: float = 0.0, rewarm: bool = True) -> dict[str, Timing]:
    """Time several functions round-robin: each round runs one sample of each.

    On a shared machine the background load drifts; interleaving spreads it evenly
    over the functions being compared, so their ratios stay meaningful. Each sample
    is preceded by one untimed call (re-warms caches and that function's thread
    pool after the others ran; ``rewarm=False`` skips it for long calls). ``calls`` per sample is fixed (int or per name) or
    calibrated per function (None) from the fastest of a few trial runs.
    """
    names = list(fns)
    if calls is None:
        per_name = {k: calibrate_calls(fns[k], target_s=target_s, max_calls=max_calls, min_calls=min_calls)
                    for k in names}
    elif isinstance(calls, int):
        per_name = {k: calls for k in names}
    else:
        per_name = dict(calls)
    for _ in range(warmup_rounds):
        for k in names:
            fns[k]()
    walls: dict[str, list[float]] = {k: [] for k in names}
    cpus: dict[str, float] = {k: 0.0 for k in names}
    for i in range(samples):
        order = names[i % len(names):] + names[:i % len(names)]  # rotate who goes first
        for k in order:
            fn, n = fns[k], per_name[k]
            if idle_s > 0:
                time.sleep(idle_s)
            if rewarm:
                fn()  # untimed re-warm
            c0 = time.process_time()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            t1 = time.perf_counter()
            c1 = time.process_time()
            walls[k].append(t1 - t0)
            cpus[k] += c1 - c0
    out: dict[str, Timing] = {}
    for k in names:
        n = per_name[k]
        per = [w / n for w in walls[k]]
        wall_total = sum(walls[k])
        out[k] = Timing(
            median_s=statistics.median(per), min_s=min(per), max_s=max(per),
            cpu_over_wall=cpus[k] / wall_total if wall_total > 0 else float("nan"),
            samples=samples, calls_per_sample=n, per_sample_s=per,
        )
    return out


class Stopwatch:
    """``with Stopwatch() as sw: ...`` then ``sw.wall``, ``sw.cpu`` (seconds)."""

    def __enter__(self) -> "Stopwatch":
        self._c0, self._t0 = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall = time.perf_counter() - self._t0
        self.cpu = time.process_time() - self._c0


def free_memory() -> None:
    """Collect garbage between configs (large arrays)."""
    gc.collect()


# --------------------------------------------------------------------------- formatting

def fmt(v: Any) -> str:
    """Compact value for ``key=value`` lines: 4 significant digits, no spaces."""
    if v is None:
        return "na"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        if v != v:
            return "nan"
        if v == 0:
            return "0"
        if abs(v) >= 1e6 or abs(v) < 1e-3:
            return f"{v:.4g}"
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v).replace(" ", "_")


def kv_line(**kv: Any) -> str:
    """One parseable line: ``key=value key=value ...`` (values without spaces)."""
    return " ".join(f"{k}={fmt(v)}" for k, v in kv.items())


def parse_kv_line(line: str) -> dict[str, str]:
    """Inverse of :func:`kv_line` (values stay strings)."""
    return dict(tok.split("=", 1) for tok in line.split() if "=" in tok)


def ratio(num: float | None, den: float | None) -> float | None:
    """``num / den`` or None when either side is missing."""
    if num is None or den is None or den == 0:
        return None
    return num / den


def pass_miss(ok: bool | None) -> str:
    return "SKIP" if ok is None else ("PASS" if ok else "MISS")


# --------------------------------------------------------------------------- machine

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags(wanted: Iterable[str] = ("avx2", "fma", "f16c", "avx512f", "avx_vnni", "amx_tile")) -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [w for w in wanted if w in have]
    except OSError:
        pass
    return []


def openblas_threads() -> dict[str, int]:
    """Thread count of each OpenBLAS loaded in this process (numpy's, bc_fast's, ...)."""
    found: dict[str, int] = {}
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line}
    except OSError:
        return found
    names = ("scipy_openblas_get_num_threads64_", "scipy_openblas_get_num_threads",
             "openblas_get_num_threads64_", "openblas_get_num_threads")
    for p in sorted(paths):
        if not p.endswith(".so") and ".so." not in p:
            continue
        try:
            lib = ctypes.CDLL(p)
        except OSError:
            continue
        for n in names:
            fn = getattr(lib, n, None)
            if fn is not None:
                fn.restype = ctypes.c_int
                found[os.path.basename(os.path.dirname(os.path.dirname(p))) + "/" + os.path.basename(p)] = int(fn())
                break
    return found


def machine_info(extra: dict | None = None) -> dict:
    """Machine, library versions and thread counts, as a flat-ish dict."""
    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cpu_flags": " ".join(cpu_flags()),
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        import numpy as np
        info["numpy"] = np.__version__
    except ImportError:
        info["numpy"] = None
    try:
        import bc_fast
        info["bc_fast_build_info"] = bc_fast.build_info()
    except Exception as e:  # noqa: BLE001 - report, don't fail
        info["bc_fast_build_info"] = f"unavailable: {e}"
    try:
        import torch
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        info["torch"] = None
    try:
        import faiss
        info["faiss"] = faiss.__version__
        info["faiss_omp_threads"] = faiss.omp_get_max_threads()
    except ImportError:
        info["faiss"] = None
    info["openblas_threads"] = openblas_threads()
    info["env"] = {k: v for k, v in os.environ.items()
                   if k.startswith(("OMP_", "OPENBLAS_", "MKL_", "GOMP_", "KMP_"))}
    if extra:
        info.update(extra)
    return info


def print_machine_info(info: dict, file: Any = None) -> None:
    file = file or sys.stdout
    print("# machine", file=file)
    for k, v in info.items():
        print(f"#   {k}: {v}", file=file)
    file.flush()


def dump_json(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=str)


def threads_from_argv(argv: list[str] | None = None) -> None:
    """Apply ``--threads N`` to OMP/OpenBLAS/MKL before numpy or torch start their thread pools.

    Call it before importing numpy: thread pools read these variables once, at load.
    """
    argv = sys.argv if argv is None else argv
    for i, a in enumerate(argv):
        n = a.split("=", 1)[1] if a.startswith("--threads=") else (
            argv[i + 1] if a == "--threads" and i + 1 < len(argv) else None)
        if n is not None:
            for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
                os.environ[var] = n


def machine_line(extra: str = "") -> str:
    """Two comment lines naming the CPU, load, versions and the bc_fast core's choices."""
    import numpy as np

    import bc_fast

    info = bc_fast.build_info()
    return (f"# machine: {cpu_model()}, {os.cpu_count()} cpus, load1={os.getloadavg()[0]:.2f}, python "
            f"{platform.python_version()}, numpy {np.__version__}{extra}\n# bc_fast core: kernel={info['kernel']} "
            f"blas={info['blas'].split(' core')[0]} threads={info['max_threads']} "
            f"small_batch_rows={info['small_batch_rows']}")

