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

The parts live in their own modules and every name is importable from here: timing in
:mod:`.timing`, engines and machine facts in :mod:`.machine`, log lines, table and chart in
:mod:`.report`; this module holds what a config gets (:class:`Bench`, :class:`Buffers`), the
records it returns (:func:`result`, :func:`check`) and the runner (:func:`run_configs`).
"""

from __future__ import annotations

import gc
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .machine import (Engines, cpu_flags, cpu_model, engines, import_faiss, import_torch, machine_info,
                      machine_lines, numpy_blas_threads, threadpools)
from .report import chart_png, fmt_time, format_table, kv_line, log_result
from .timing import (TINY_PLAN, Stopwatch, Timing, TimingPlan, calibrate_calls, time_gpu_interleaved, time_interleaved,
                     timing_from_samples)

__all__ = [
    # timing
    "TINY_PLAN", "Stopwatch", "Timing", "TimingPlan", "calibrate_calls", "time_gpu_interleaved", "time_interleaved",
    "timing_from_samples",
    # engines and machine facts
    "Engines", "cpu_flags", "cpu_model", "engines", "import_faiss", "import_torch", "machine_info", "machine_lines",
    "numpy_blas_threads", "threadpools",
    # report
    "chart_png", "fmt_time", "format_table", "kv_line", "log_result",
    # configs: context, results, runner
    "Bench", "Buffers", "Config", "check", "max_abs_err", "random_weights", "result", "run_configs", "script_args",
    "speedup_check",
]


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


def random_weights(rng: np.random.Generator, d_out: int, d_in: int,
                   bias: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Random float32 ``(W (d_out, d_in), b (d_out,))`` of a benchmark layer: W standard normal scaled by
    1/sqrt(d_in), b standard normal times 0.1 (None without ``bias``)."""
    w = rng.standard_normal((d_out, d_in), dtype=np.float32) / np.float32(math.sqrt(d_in))
    b = (rng.standard_normal(d_out, dtype=np.float32) * np.float32(0.1)) if bias else None
    return np.ascontiguousarray(w), b


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
        """:func:`random_weights` from this config's rng."""
        return random_weights(self.rng, d_out, d_in, bias)

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
