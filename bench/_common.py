"""Helpers for the bench/ scripts.

The timing and machine helpers (``Timing``, ``time_fn``, ``time_interleaved``,
``Stopwatch``, ``machine_info``, ...) live in :mod:`bc_fast._benchtools`, shared with
``bc-fast bench``; they are re-exported here and imported on first use, so that
``from _common import threads_from_argv`` loads neither numpy nor bc_fast (thread
pools read OMP_NUM_THREADS and friends once, at load). What stays here is specific
to the scripts: ``key=value`` lines, ratios, PASS/MISS, JSON dumps, machine headers.
Import from a bench script with ``from _common import ...`` (bench/ is on
``sys.path`` when a script in it is run as ``python bench/bench_x.py``).
"""

from __future__ import annotations

import gc
import json
import os
import platform
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers and editors; at run time __getattr__ imports them
    from bc_fast._benchtools import Stopwatch as Stopwatch, Timing as Timing
    from bc_fast._benchtools import calibrate_calls as calibrate_calls, cpu_flags as cpu_flags
    from bc_fast._benchtools import cpu_model as cpu_model, machine_info as machine_info
    from bc_fast._benchtools import openblas_threads as openblas_threads, time_fn as time_fn
    from bc_fast._benchtools import time_interleaved as time_interleaved

_SHARED = ("Timing", "calibrate_calls", "time_fn", "time_interleaved", "Stopwatch", "cpu_model", "cpu_flags",
           "openblas_threads", "machine_info")


def __getattr__(name: str) -> Any:
    """Re-export the shared helpers of :mod:`bc_fast._benchtools`, imported on first use."""
    if name in _SHARED:
        from bc_fast import _benchtools
        return getattr(_benchtools, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------- memory

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
    from bc_fast._benchtools import cpu_model

    info = bc_fast.build_info()
    return (f"# machine: {cpu_model()}, {os.cpu_count()} cpus, load1={os.getloadavg()[0]:.2f}, python "
            f"{platform.python_version()}, numpy {np.__version__}{extra}\n# bc_fast core: kernel={info['kernel']} "
            f"blas={info['blas'].split(' core')[0]} threads={info['max_threads']} "
            f"small_batch_rows={info['small_batch_rows']}")

