"""Timing and machine helpers shared by ``bc_fast.benchmark`` and the bench/ scripts.

numpy only at import; torch and faiss are looked up when asked for. Timing rules:

* wall time from ``time.perf_counter``, CPU time from ``time.process_time``
  (all threads of the process), reported as ``cpu_over_wall``;
* a warm-up call (or calibration sample) is dropped before timing;
* tiny calls are timed as a loop of many calls per sample, divided;
* the reported value is the median over samples;
* implementations being compared are timed round-robin (:func:`time_interleaved`)
  so drifting background load on a shared machine hits them all alike; each
  visit is preceded by an untimed call of the same function, and an optional
  idle pause lets other thread pools (OpenBLAS, OpenMP) that were spinning go
  to sleep, so they neither steal the core nor show up in the next CPU time.
"""

from __future__ import annotations

import ctypes
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
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


def _timing(walls: list[float], cpu: float, calls: int) -> Timing:
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
    cpu = 0.0
    for _ in range(samples):
        w, c = _run_sample(fn, calls)
        walls.append(w)
        cpu += c
    return _timing(walls, cpu, calls)


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
    return {k: _timing(walls[k], cpus[k], per_name[k]) for k in names}


class Stopwatch:
    """``with Stopwatch() as sw: ...`` then ``sw.wall``, ``sw.cpu`` (seconds)."""

    def __enter__(self) -> Stopwatch:
        self._c0, self._t0 = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall = time.perf_counter() - self._t0
        self.cpu = time.process_time() - self._c0


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


def _openblas_libs() -> dict[str, tuple[ctypes.CDLL, str, str, str]]:
    """{label: (ctypes lib, symbol prefix, symbol suffix, path)} for every OpenBLAS loaded in this process."""
    libs: dict[str, tuple[ctypes.CDLL, str, str, str]] = {}
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line}
    except OSError:
        return libs
    for p in sorted(paths):
        if not p.endswith(".so") and ".so." not in p:
            continue
        try:
            lib = ctypes.CDLL(p)
        except OSError:
            continue
        for prefix, suffix in (("scipy_openblas_", "64_"), ("scipy_openblas_", ""), ("openblas_", "64_"),
                               ("openblas_", "")):
            if getattr(lib, f"{prefix}get_num_threads{suffix}", None) is not None:
                label = os.path.basename(os.path.dirname(os.path.dirname(p))) + "/" + os.path.basename(p)
                libs[label] = (lib, prefix, suffix, p)
                break
    return libs


def _openblas_get_threads(lib: ctypes.CDLL, prefix: str, suffix: str) -> int:
    get = getattr(lib, f"{prefix}get_num_threads{suffix}")
    get.restype = ctypes.c_int
    return int(get())


def openblas_threads(core: bool = False) -> dict[str, int] | dict[str, str]:
    """Thread count of each OpenBLAS loaded in this process (numpy's, bc_fast's, ...).

    ``core=True``: values are ``"N threads, core=NAME"`` strings instead of ints.
    """
    found: dict = {}
    for label, (lib, prefix, suffix, _) in _openblas_libs().items():
        n = _openblas_get_threads(lib, prefix, suffix)
        if not core:
            found[label] = n
            continue
        get_core = getattr(lib, f"{prefix}get_corename{suffix}", None)
        name = ""
        if get_core is not None:
            get_core.restype = ctypes.c_char_p
            name = (get_core() or b"").decode()
        found[label] = f"{n} threads, core={name}"
    return found


def numpy_blas_threads(n: int | None) -> int | None:
    """Set (``n`` given) and return the thread count of numpy's own OpenBLAS (None if not found)."""
    np.ones((2, 2), np.float32) @ np.ones((2, 2), np.float32)  # make sure it is loaded
    for lib, prefix, suffix, path in _openblas_libs().values():
        if "numpy" not in path:
            continue
        if n is not None:
            setter = getattr(lib, f"{prefix}set_num_threads{suffix}", None)
            if setter is not None:
                setter.argtypes = [ctypes.c_int]
                setter(int(n))
        return _openblas_get_threads(lib, prefix, suffix)
    return None


def machine_info(extra: dict | None = None, *, detail: bool = False) -> dict[str, Any]:
    """Machine, library versions and thread counts, as a flat-ish dict.

    ``detail=True`` (the suite) adds bc_fast's version and core file, and reports each
    OpenBLAS as ``openblas: {lib: "N threads, core=NAME"}`` instead of
    ``openblas_threads: {lib: N}``.
    """
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
        from . import __version__
        from .ops import build_info
        if detail:
            info["bc_fast"] = __version__
        info["bc_fast_build_info"] = build_info()
        if detail:
            from . import _core
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
    if detail:
        info["openblas"] = openblas_threads(core=True)
    else:
        info["openblas_threads"] = openblas_threads()
    info["env"] = {k: v for k, v in os.environ.items()
                   if k.startswith(("OMP_", "OPENBLAS_", "MKL_", "GOMP_", "KMP_"))}
    if extra:
        info.update(extra)
    return info
