"""Argument checks shared by the CPU operator and the CUDA path (below both: neither imports the other here)."""

from __future__ import annotations

from typing import Any

import numpy as np

INT_MAX = 2**31 - 1  # the core takes thread counts as C ints
MAX_THREADS = 1024  # the core runs at most this many worker threads per call


def check_threads(threads: Any, name: str = "threads", upper: int = INT_MAX) -> int:
    """``threads`` as a plain int in [1, upper]; a clear ValueError for anything else (bools too)."""
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)):
        raise ValueError(f"{name} must be a positive integer or None, got {type(threads).__name__} {threads!r}")
    t = int(threads)
    if not 1 <= t <= upper:
        raise ValueError(f"{name} must be an integer in [1, {upper}], got {t}; "
                         "bc_fast.get_num_threads() is the default (the CPUs this process may use)")
    return t
