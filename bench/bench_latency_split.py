"""Batch-1 latency of d->d affine layers: bc_fast (1 thread and default) vs numpy, round-robin.

Each round times a block of calls of every implementation in turn (so load changes hit all of them
alike); the printed figure is the median over rounds of the per-call time in a block. The machine's
load average is printed before and after: on a shared 2-vCPU VM a loaded machine slows the 2-thread
split most (its helper thread competes for the second core).

    python bench/bench_latency_split.py [--dims 128 256 384 768] [--rounds 400] [--block 20] [--split 1]

``bc_fast`` runs with the small-batch column split over two threads on (``--split 1``, the private
``_core._set_small_split``) or off (``--split 0``); ``bc_fast_1t`` is ``threads=1``, the single-thread
path; ``core``/``core_1t`` the same without the Python wrapper. One line per (d, implementation):
``d=256 n=1 bc_fast  2.10 us  1.95x numpy_alloc ...``, and the share of calls the helper thread took part in.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

import bc_fast
from bc_fast import FusedTransform, _core


def _impls(d: int, rng: np.random.Generator, n: int) -> dict:
    W = (rng.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32)
    b = rng.standard_normal(d).astype(np.float32)
    x = rng.standard_normal((n, d)).astype(np.float32)
    y, o = np.empty((n, d), np.float32), np.empty((n, d), np.float32)
    WT = W.T
    op = FusedTransform.affine(W, b)
    core = op._op if hasattr(op, "_op") else None

    def numpy_prealloc() -> None:
        np.matmul(x, WT, out=o)
        np.add(o, b, out=o)

    impls = {
        "bc_fast": lambda: op.apply(x, out=y),
        "bc_fast_1t": lambda: op.apply(x, out=y, threads=1),
        "numpy_alloc": lambda: x @ WT + b,
        "numpy_prealloc": numpy_prealloc,
    }
    if core is not None:  # the compiled call alone, without the Python wrapper's checks
        impls["core"] = lambda: core.apply(x, y)
        impls["core_1t"] = lambda: core.apply(x, y, False, 1)
    op.apply(x, out=y)
    ref = x.astype(np.float64) @ W.T.astype(np.float64) + b
    assert np.allclose(y, ref, rtol=1e-4, atol=1e-4), "bc_fast result wrong"
    y1 = np.empty_like(y)
    op.apply(x, out=y1, threads=1)
    assert np.array_equal(y, y1), "threads=1 and default differ"
    return impls


def measure(impls: dict, rounds: int, block: int) -> dict[str, float]:
    """Median over ``rounds`` of the mean per-call time of ``block`` calls, implementations interleaved."""
    for f in impls.values():  # warm-up
        for _ in range(block * 5):
            f()
    times: dict[str, list[float]] = {k: [] for k in impls}
    for _ in range(rounds):
        for k, f in impls.items():
            t0 = time.perf_counter_ns()
            for _ in range(block):
                f()
            times[k].append((time.perf_counter_ns() - t0) / block)
    return {k: float(np.median(v)) / 1e3 for k, v in times.items()}


def main() -> None:
    """Print one line per dimension and implementation."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", type=int, nargs="+", default=[128, 256, 384, 768])
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=400)
    ap.add_argument("--block", type=int, default=20)
    ap.add_argument("--split", type=int, choices=(0, 1), default=1)
    args = ap.parse_args()
    _core._set_small_split(args.split)
    info = bc_fast.build_info()
    print(f"# {platform.processor() or platform.machine()} kernel={info['kernel']} cpus={info['cpus']} "
          f"threads={info['max_threads']} split={args.split} loadavg={os.getloadavg()}")
    rng = np.random.default_rng(0)
    for d in args.dims:
        jobs = _core._small_split_helper_jobs()
        t = measure(_impls(d, rng, args.rows), args.rounds, args.block)
        calls = args.rounds * args.block * 2 + args.block * 5 * 2  # bc_fast and core, timed and warm-up
        helped = (_core._small_split_helper_jobs() - jobs) / calls
        for k, us in t.items():
            print(f"d={d} n={args.rows} {k:15s} {us:7.2f} us  {t['numpy_alloc'] / us:5.2f}x numpy_alloc  "
                  f"{t['numpy_prealloc'] / us:5.2f}x numpy_prealloc", flush=True)
        print(f"d={d} helper took part in {helped:.0%} of the split calls")
    print(f"# loadavg after {os.getloadavg()}")


if __name__ == "__main__":
    main()
