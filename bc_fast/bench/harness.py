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
  touched once and reused across configs;
* a partial run is labelled as partial: the JSON names the ``planned`` configs and
  says whether the run is ``complete`` (rewritten after every config; a config that
  raises is recorded with its error, the others still run).

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
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._util.fileio import atomic_write_bytes
from .machine import (Engines, cpu_flags, cpu_model, engines, import_faiss, import_torch, machine_info,
                      machine_lines, numpy_blas_threads, threadpools)
from .report import chart_png, fmt_time, format_table, kv_line, log_result, run_status, status_line
from .timing import (TINY_PLAN, Stopwatch, Timing, TimingPlan, calibrate_calls, time_gpu_interleaved, time_interleaved,
                     time_rounds, timing_from_samples)

__all__ = [
    # timing
    "TINY_PLAN", "Stopwatch", "Timing", "TimingPlan", "calibrate_calls", "time_gpu_interleaved", "time_interleaved",
    "time_rounds", "timing_from_samples",
    # engines and machine facts
    "Engines", "cpu_flags", "cpu_model", "engines", "import_faiss", "import_torch", "machine_info", "machine_lines",
    "numpy_blas_threads", "threadpools",
    # report
    "chart_png", "fmt_time", "format_table", "kv_line", "log_result", "run_status", "status_line",
    # configs: context, results, runner
    "Bench", "Buffers", "Config", "check", "config_labels", "error_result", "max_abs_err", "prepare_outputs",
    "random_weights", "result", "run_configs", "script_args", "speedup_check",
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


def config_labels(configs: Sequence[Config]) -> list[str]:
    """A name for each planned config before it runs (the JSON's ``planned``).

    The function's name without ``_cfg_`` / ``cfg_`` and its plain arguments (numbers, strings):
    ``latency(1)``, ``table('npy_f16', 20000, 1)``; a repeated name gets `` #2``, `` #3``...
    """
    labels: list[str] = []
    seen: dict[str, int] = {}
    for fn, args in configs:
        name = fn.__name__.lstrip("_").removeprefix("cfg_")
        plain = [repr(a) if isinstance(a, str) else str(a) for a in args
                 if isinstance(a, (int, float, str)) and not isinstance(a, bool)]
        label = f"{name}({', '.join(plain)})" if plain else name
        seen[label] = seen.get(label, 0) + 1
        labels.append(label if seen[label] == 1 else f"{label} #{seen[label]}")
    return labels


def error_result(label: str, exc: BaseException) -> dict:
    """The record of a config that raised: no timings, one ``ERROR`` check, the error and its traceback."""
    msg = f"{type(exc).__name__}: {exc}"
    ran = check("ran", None, 1.0, "runs", f"ERROR: {msg}")
    ran["status"] = "ERROR"
    r = result(label, f"{label}: raised {type(exc).__name__}", 0, {}, [ran], note=f"ERROR: {msg}", error=msg,
               traceback="".join(traceback.format_exception(exc)))
    r["status"] = "ERROR"
    return r


def prepare_outputs(out_dir: Path | None, json_path: Path | None) -> Path | None:
    """The JSON's path, its folder made (``out_dir``) or checked (``json_path``) before any config runs.

    A bad ``--out`` (an existing file, say) or ``--json`` fails at once with a clear message, not after
    the whole run. ``out_dir`` wins: its JSON is ``out_dir/bench.json``.
    """
    if out_dir is not None:
        out_dir = Path(out_dir)
        if out_dir.exists() and not out_dir.is_dir():
            raise NotADirectoryError(f"the output folder {out_dir} is an existing file, not a folder: name a "
                                     "folder (it is created if missing)")
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OSError(f"cannot create the output folder {out_dir}: {e}") from e
        json_path = out_dir / "bench.json"
    if json_path is None:
        return None
    json_path = Path(json_path)
    if json_path.is_dir():
        raise IsADirectoryError(f"the JSON path {json_path} is a folder: name a file")
    if not json_path.parent.is_dir():
        raise FileNotFoundError(f"the folder of the JSON path {json_path} does not exist")
    if not os.access(json_path.parent, os.W_OK):
        raise PermissionError(f"cannot write into {json_path.parent}, the JSON's folder")
    return json_path


@dataclass
class _Run:
    """One :func:`run_configs` call: what it planned, what ran, and its JSON (rewritten after every config)."""

    name: str
    mode: str
    info: dict
    threads: int
    notes: list[str]
    json_path: Path | None
    meta: dict
    planned: list[str] = field(default_factory=list)
    results: list[dict] = field(default_factory=list)
    finished: bool = False
    peak_gflops: float | None = None
    peak_mem: int = 0
    png: str | None = None
    t_start: float = field(default_factory=time.perf_counter)
    c_start: float = field(default_factory=time.process_time)

    def status(self) -> dict:
        """:func:`run_status` of the configs so far."""
        done = [r["planned_as"] for r in self.results if r["status"] != "ERROR"]
        failed = [r["planned_as"] for r in self.results if r["status"] == "ERROR"]
        return run_status(self.planned, done, failed, finished=self.finished)

    def summary(self) -> str:
        """Targets met, wall and CPU time, load now, buffers, and whether the run is complete."""
        checks = [c for r in self.results for c in r["checks"]]
        return (f"{sum(c['status'] == 'PASS' for c in checks)}/{len(checks)} targets met; "
                f"wall {time.perf_counter() - self.t_start:.1f}s, cpu {time.process_time() - self.c_start:.1f}s; "
                f"loadavg now {' '.join(f'{v:.2f}' for v in os.getloadavg())}; "
                f"reused buffers {self.peak_mem / 2**30:.2f} GiB; {status_line(self.status())}")

    def payload(self) -> dict:
        """Machine, every result so far, the table, and whether the run is complete (``planned``, ``complete``...)."""
        return {"suite": self.name, "mode": self.mode, "machine": self.info, "threads": self.threads,
                "notes": self.notes, "peak_gflops": self.peak_gflops, "results": self.results,
                "table": format_table(self.results), "summary": self.summary(),
                "total_s": time.perf_counter() - self.t_start, "cpu_s": time.process_time() - self.c_start,
                "argv": sys.argv[1:], **self.meta, **self.status(),
                "json": str(self.json_path) if self.json_path is not None else None, "png": self.png}

    def write(self) -> None:
        """Rewrite the JSON (atomically), if there is one: a later crash keeps what was measured, marked partial."""
        if self.json_path is not None:
            atomic_write_bytes(self.json_path, json.dumps(self.payload(), indent=1, default=str).encode())


def _run_one(bench: Bench, fn: Callable[..., dict], args: tuple, label: str, log: Callable[[str], Any],
             t_start: float) -> dict:
    """One config's record (an :func:`error_result` if it raised), logged."""
    t0 = time.perf_counter()
    try:
        r = fn(bench, *args)
    except Exception as e:  # noqa: BLE001 - recorded and reported; the other configs still run
        r = error_result(label, e)
        log(f"# {label} FAILED: {r['error']}")
    r["planned_as"] = label
    r["config_wall_s"] = time.perf_counter() - t0
    log_result(log, r)
    log(f"# {r['config']} done in {r['config_wall_s']:.1f}s (at {time.perf_counter() - t_start:.1f}s)")
    gc.collect()
    return r


def _write_chart(run: _Run, out_dir: Path) -> str:
    """``bench.png`` beside the JSON (written first, so a chart error loses no result); what to log."""
    try:
        png = chart_png(run.results, f"{run.name} ({run.mode}) on {run.info['cpu_model']}, {run.threads} threads"
                        + (f", peak {run.peak_gflops:.0f} GFLOP/s" if run.peak_gflops else ""))
    except Exception as e:  # noqa: BLE001 - the chart is an aid; the JSON already holds every number
        return f" (no PNG: the chart failed: {type(e).__name__}: {e})"
    if png is None:
        return " (no PNG: matplotlib not installed, or no checks)"
    atomic_write_bytes(out_dir / "bench.png", png)
    run.png = str(out_dir / "bench.png")
    run.write()
    return f" and {run.png}"


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
        engines' context (so a config list can depend on what is installed). The list is
        taken in full before the first config runs: its :func:`config_labels` are the JSON's
        ``planned``.
    threads : int, optional
        Threads for bc_fast, torch, faiss and numpy's BLAS (default: bc_fast's max_threads).
    plan, mode, describe : how samples are taken, the mode's name, and a line describing sizes.
    out_dir : Path, optional
        Write ``bench.json`` and ``bench.png`` there (atomically); created, or refused when it is
        an existing file, before any config runs.
    json_path : Path, optional
        Write the JSON there instead (no PNG); its folder must exist.
    meta : dict, optional
        Merged into the JSON payload.

    The JSON is written before the first config and rewritten after each, with ``planned``,
    ``done``, ``failed``, ``complete`` (true only at the end of a run in which every config
    ran) and ``partial``; then the PNG. A config that raises is recorded (an ``ERROR`` row with
    its error) and the others still run.

    Returns
    -------
    dict
        ``machine``, ``results``, ``table``, ``summary``, ``total_s``, ``json``/``png`` paths,
        ``meta``, ``planned``/``complete``/``partial``. Never raises on a missed target.

    Raises
    ------
    RuntimeError
        After the table, the JSON and the PNG are written, when a config raised.
    """
    from ..engine import build_info

    json_path = prepare_outputs(out_dir, json_path)
    t_start, c_start = time.perf_counter(), time.process_time()
    T = int(threads or build_info().get("max_threads") or os.cpu_count() or 1)
    with engines(T) as eng:
        info = machine_info({"bench_threads": T, "numpy_blas_threads": eng.numpy_blas_threads, "mode": mode})
        run = _Run(name, mode, info, T, eng.notes, json_path, meta or {}, t_start=t_start, c_start=c_start)
        log(f"# {name} ({mode})")
        for line in [*machine_lines(info), *([f"# sizes: {describe}"] if describe else []),
                     *(f"# note: {note}" for note in eng.notes)]:
            log(line)
        bench = Bench(plan, eng, Buffers(np.random.default_rng(0)), np.random.default_rng(1), log, mode=mode)
        try:
            planned = list(configs(bench) if callable(configs) else configs)
            run.planned = config_labels(planned)
            run.write()
            for (fn, args), label in zip(planned, run.planned):
                run.results.append(_run_one(bench, fn, args, label, log, run.t_start))
                run.peak_gflops, run.peak_mem = bench.peak_gflops, max(run.peak_mem, bench.buf.nbytes())
                run.write()
            run.finished = True
        finally:
            bench.buf.clear()
    _log_report(run, describe, log)
    run.write()
    wrote = str(json_path) if json_path is not None else ""
    if out_dir is not None:
        wrote += _write_chart(run, Path(out_dir))
    if wrote:
        log(f"# wrote {wrote}")
    payload = run.payload()
    failed = payload["failed"]
    if failed:
        raise RuntimeError(f"{name}: {len(failed)} of {len(run.planned)} configs failed ({', '.join(failed)}); "
                           "every result, the errors included, is in the table above"
                           + (f" and in {json_path} (marked partial)" if json_path is not None else ""))
    return payload


def _log_report(run: _Run, describe: str, log: Callable[[str], Any]) -> None:
    """The closing lines: title, machine and load, the table, the summary (which says if the run is partial)."""
    info = run.info
    log("")
    log(f"# {run.name} ({describe or run.mode})")
    log(f"# machine: {info['cpu_model']}, {info['cpu_count']} cpus, threads={run.threads}, loadavg at start "
        f"{info['loadavg']}; ratios are baseline median / bc_fast median (> 1: bc_fast faster)")
    log(format_table(run.results))
    log(f"# {run.summary()}")


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
