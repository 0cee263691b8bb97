"""Time a streaming closed-form fit of synthetic pairs: ``python -m bc_fast.fit._bench``.

Writes two float32 .npy files (SRC, DST: ``--pairs`` x ``--dim``, DST a noisy affine image of
SRC) unless they exist, then times :func:`bc_fast.fit.fit_streaming_npy` (the files read with
mmap, ``--chunk-rows`` at a time) and, with ``--in-memory``, :func:`bc_fast.fit.fit_adapter` on
arrays already loaded. Prints one line per timing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np


def _make(path_src: Path, path_dst: Path, n: int, d: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32)
    src = np.lib.format.open_memmap(path_src, mode="w+", dtype=np.float32, shape=(n, d))
    dst = np.lib.format.open_memmap(path_dst, mode="w+", dtype=np.float32, shape=(n, d))
    for s in range(0, n, 65536):
        x = rng.standard_normal((min(65536, n - s), d), dtype=np.float32) + 0.5
        src[s:s + x.shape[0]] = x
        dst[s:s + x.shape[0]] = x @ w.T + 0.1 * rng.standard_normal(x.shape, dtype=np.float32)
    src.flush()
    dst.flush()
    del src, dst


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    """Run the timing; see the module docstring."""
    from . import fit_adapter
    from . import fit_streaming_npy

    ap = argparse.ArgumentParser(prog="python -m bc_fast.fit._bench", description=__doc__)
    ap.add_argument("--pairs", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--kind", default="ridge", choices=("ridge", "procrustes", "lowrank", "auto"))
    ap.add_argument("--chunk-rows", type=int, default=65536)
    ap.add_argument("--dir", default=os.environ.get("TMPDIR", "/tmp"), help="where the .npy files go")
    ap.add_argument("--in-memory", action="store_true", help="also time fit_adapter on loaded arrays")
    ap.add_argument("--blas-threads", type=int, default=None,
                    help="limit numpy's BLAS threads (needs threadpoolctl): on a machine shared with other "
                         "busy processes, 1 thread can beat 2")
    args = ap.parse_args(argv)
    limit = contextlib.nullcontext()
    if args.blas_threads is not None:
        from threadpoolctl import threadpool_limits

        limit = threadpool_limits(args.blas_threads, user_api="blas")
    with limit:
        return _run(args, fit_adapter, fit_streaming_npy)


def _run(args: argparse.Namespace, fit_adapter: Any, fit_streaming_npy: Any) -> int:
    d = Path(args.dir)
    src, dst = d / f"bcfast_fit_src_{args.pairs}x{args.dim}.npy", d / f"bcfast_fit_dst_{args.pairs}x{args.dim}.npy"
    if not (src.exists() and dst.exists()):
        _make(src, dst, args.pairs, args.dim)
    print(f"machine: {_cpu_name()}, {os.cpu_count()} cpus, load average {os.getloadavg()[0]:.2f} "
          f"(other processes share the cores: compare with the load)")
    np.load(src, mmap_mode="r").sum(dtype=np.float64)  # warm the page cache: time the fit, not the disk
    np.load(dst, mmap_mode="r").sum(dtype=np.float64)
    t0, c0 = time.perf_counter(), time.process_time()
    est = fit_streaming_npy(src, dst, kind=args.kind, chunk_rows=args.chunk_rows)
    dt = time.perf_counter() - t0
    cpu = time.process_time() - c0
    r2 = est.val_metrics_.get("r2", float("nan"))
    print(f"fit_streaming_npy kind={args.kind} pairs={args.pairs} dim={args.dim}->{args.dim} "
          f"chunk_rows={args.chunk_rows} blas_threads={args.blas_threads or 'default'}: "
          f"{dt:.2f} s wall, {cpu:.2f} s CPU (val R^2 {r2:.4f}, load average now {os.getloadavg()[0]:.2f})")
    if args.in_memory:
        x, y = np.load(src), np.load(dst)
        t0 = time.perf_counter()
        fit_adapter(x, y, kind=args.kind)
        print(f"fit_adapter (in memory) kind={args.kind}: {time.perf_counter() - t0:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
