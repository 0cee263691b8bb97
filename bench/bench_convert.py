"""End-to-end table conversion vs the naive numpy way and the core's compute-only rate.

    python bench/bench_convert.py [--quick] [--threads N] [--json PATH] [--rows 2000000] [--repeats 3] [--dir /tmp]

Generates an N x 256 float16 table (default N = 2M, ~1 GB; --quick: 500k) of version-2
embeddings in a temporary directory, builds a registry with two 256 -> 256 affine
backward transforms, and converts the table to version 0 at float16 three ways, each
run in its own subprocess (so peak RSS, VmHWM from /proc/self/status, is its own), the
methods round-robin, one warm-up round dropped:

- ``bc_fast``: ``bc_fast.convert.convert_table`` (file in page cache)
- ``compute``: the core on the in-memory table, chunk by chunk into one reused buffer (no I/O)
- ``naive``: np.load, ``(x.astype(f32) @ W.T + b).astype(f16)`` with the fused W, np.save
  (allocates whole-table arrays by design: the reference code's way)

Checks: convert >= 0.8x the compute-only rate, naive time >= 2x convert time, convert
peak RSS < 300 MB. The temporary directory is deleted. Harness: :mod:`bc_fast.bench.harness`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from bc_fast.bench.harness import TINY_PLAN, Bench, Stopwatch, check, result, run_configs, script_args, speedup_check
from bc_fast.bench.harness import timing_from_samples

DIM = 256
METHODS = ("bc_fast", "compute", "naive")


def _make_inputs(root: Path, rows: int, rng: np.random.Generator) -> tuple[str, str]:
    from bc_fast.store.registry import Registry
    from bc_fast.store.tables import npy_header_bytes

    reg = Registry.create(root / "registry")
    reg.add_version(dim=DIM)
    for _ in range(2):
        q, _r = np.linalg.qr(rng.standard_normal((DIM, DIM)))
        reg.add_version(dim=DIM, backward=(q.astype(np.float32), (0.01 * rng.standard_normal(DIM)).astype(np.float32)))
    path = root / "table.npy"
    with open(path, "wb") as f:
        f.write(npy_header_bytes((rows, DIM), np.dtype(np.float16)))
        step = 1 << 16
        for i in range(0, rows, step):
            f.write(rng.standard_normal((min(step, rows - i), DIM), dtype=np.float32).astype(np.float16).tobytes())
    return reg.path.as_posix(), path.as_posix()


def _peak_rss_mb() -> float:
    """This process's peak resident set, MB: VmHWM (per address space, so it starts afresh at exec).

    ``ru_maxrss`` survives fork and exec, so a worker started by a parent that generated the table
    would report the parent's peak; it is the fallback where /proc is missing.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _worker(method: str, registry: str, table: str, out: str, chunk_rows: int | None, threads: int) -> dict:
    """One conversion in this (fresh) process: seconds, CPU seconds, peak RSS."""
    from bc_fast.store.registry import Registry

    op = Registry.open(registry).operator(2, 0)
    cr = chunk_rows or 32768
    if method == "compute":
        x = np.load(table)
        y = np.empty((min(cr, len(x)), op.d_out), np.float16)
        op.apply(x[:len(y)], out=y, threads=threads)  # warm-up
    with Stopwatch() as sw:
        if method == "naive":
            w, b = op.layers[0].weight, op.layers[0].bias
            x = np.load(table)
            np.save(out, (x.astype(np.float32) @ w.T + (0 if b is None else b)).astype(np.float16))
        elif method == "compute":
            for i in range(0, len(x), cr):
                xi = x[i:i + cr]
                op.apply(xi, out=y[: len(xi)], threads=threads)
        else:
            from bc_fast.convert import convert_table
            convert_table(table, out, registry=registry, dst=0, chunk_rows=chunk_rows, progress=False,
                          threads=threads)
    return {"seconds": sw.wall, "cpu": sw.cpu, "peak_rss_mb": _peak_rss_mb()}


def _run_worker(method: str, registry: str, table: str, out: str, chunk_rows: int | None, threads: int) -> dict:
    for p in (out, out + ".bcfast.json"):
        if os.path.exists(p):
            os.unlink(p)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, "--registry", registry,
           "--table", table, "--out", out, "--threads", str(threads)]
    cmd += ["--chunk-rows", str(chunk_rows)] if chunk_rows else []
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"bench_convert: the {method} worker failed (exit {proc.returncode}):\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cfg_convert(bench: Bench, rows: int, repeats: int, chunk_rows: int | None, tmp_dir: str | None) -> dict:
    """The three ways, round-robin, ``repeats`` rounds after a dropped warm-up round."""
    root = Path(tempfile.mkdtemp(prefix="bench_convert_", dir=tmp_dir))
    try:
        registry, table = _make_inputs(root, rows, bench.rng)
        out = str(root / "out.npy")
        runs: dict[str, list[dict]] = {m: [] for m in METHODS}
        for r in range(repeats + 1):
            for m in METHODS[r % len(METHODS):] + METHODS[:r % len(METHODS)]:
                res = _run_worker(m, registry, table, out, chunk_rows, bench.threads)
                if r:
                    runs[m].append(res)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    t = {m: timing_from_samples([x["seconds"] for x in rs], sum(x["cpu"] for x in rs)) for m, rs in runs.items()}
    rss = {m: max(x["peak_rss_mb"] for x in rs) for m, rs in runs.items()}
    checks = [speedup_check("vs compute only", t, "compute", 0.8, shown_target="≥ 0.8x compute-only rate"),
              speedup_check("vs naive", t, "naive", 2.0),
              check("peak RSS", 300 / rss["bc_fast"], 1.0, "< 300 MB", f"{rss['bc_fast']:.0f} MB RSS")]
    return result("convert", f"table {rows:,} x {DIM} float16, version 2 -> 0 at float16 (.npy in page cache)",
                  rows, t, checks, peak_rss_mb=rss,
                  note="peak RSS MB " + ", ".join(f"{m} {v:.0f}" for m, v in rss.items())
                       + "; naive allocates whole-table arrays by design (the reference code's way)")


def main(argv: list[str] | None = None) -> int:
    def extra(p) -> None:
        p.add_argument("--rows", type=int, default=None, help="table rows (default 2,000,000; --quick 500,000)")
        p.add_argument("--repeats", type=int, default=3, help="timed rounds (one warm-up round more)")
        p.add_argument("--chunk-rows", type=int, default=None)
        p.add_argument("--dir", default=None, help="where to put the temporary table (default: $TMPDIR)")
        for hidden in ("--worker", "--registry", "--table", "--out"):
            p.add_argument(hidden, default=None, help=argparse.SUPPRESS)

    args = script_args(__doc__, argv, quick_help="a 500,000-row table", extra=extra)
    if args.worker:
        print(json.dumps(_worker(args.worker, args.registry, args.table, args.out, args.chunk_rows, args.threads)))
        return 0
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    rows = args.rows or {"tiny": 20_000, "quick": 500_000, "full": 2_000_000}[mode]
    repeats = 1 if args.tiny else args.repeats
    run_configs("bench_convert", [(cfg_convert, (rows, repeats, args.chunk_rows, args.dir))], threads=args.threads,
                plan=TINY_PLAN, mode=mode, json_path=args.json,
                describe=f"mode={mode}: {rows:,} x {DIM} float16 table, {repeats} rounds (+1 warm-up, dropped), "
                         "each run in its own process")
    return 0


if __name__ == "__main__":
    sys.exit(main())
