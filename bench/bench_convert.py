"""Benchmark: end-to-end table conversion vs the naive numpy way and the core's compute-only rate.

Generates an N x 256 float16 table (default N = 2M, ~1 GB) of version-2 embeddings in a
temporary directory, builds a registry with two 256 -> 256 affine backward transforms, and
converts the table to version 0 at float16 three ways, each in its own subprocess (so peak RSS,
from resource.getrusage, is not contaminated):

- ``naive``:   np.load, ``(x.astype(f32) @ W.T + b).astype(f16)`` with the fused W, np.save
- ``compute``: the core on the in-memory table, chunk by chunk into a reused buffer (no I/O)
- ``convert``: ``bc_fast.convert.convert_table`` (file in page cache)

Prints the machine, then one parseable line per method (median of --repeats runs, after a
warm-up run), then the ratios against the targets. The temporary directory is deleted.

    python bench/bench_convert.py [--rows 2000000] [--repeats 3] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

DIM = 256


def _machine() -> str:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import bc_fast
    info = bc_fast.build_info()
    return (f"machine: {platform.machine()} {cpu}, {os.cpu_count()} cpus, python {platform.python_version()}, "
            f"numpy {np.__version__}, bc_fast {bc_fast.__version__} kernel={info.get('kernel')} "
            f"blas={info.get('blas', '').split(' ')[0]} max_threads={info.get('max_threads')}")


def _make_inputs(root: str, rows: int) -> tuple[str, str]:
    from bc_fast.registry import Registry
    rng = np.random.default_rng(0)
    reg = Registry.create(os.path.join(root, "registry"))
    reg.add_version(dim=DIM)
    for _ in range(2):
        q, _r = np.linalg.qr(rng.standard_normal((DIM, DIM)))
        reg.add_version(dim=DIM, backward=(q.astype(np.float32), (0.01 * rng.standard_normal(DIM)).astype(np.float32)))
    path = os.path.join(root, "table.npy")
    from bc_fast.tables import npy_header_bytes
    with open(path, "wb") as f:
        f.write(npy_header_bytes((rows, DIM), np.dtype(np.float16)))
        step = 1 << 16
        for i in range(0, rows, step):
            f.write(rng.standard_normal((min(step, rows - i), DIM), dtype=np.float32).astype(np.float16).tobytes())
    return reg.path.as_posix(), path


# ----------------------------------------------------------------------------- workers

def _worker(method: str, registry: str, table: str, out: str, chunk_rows: int | None) -> dict:
    from bc_fast.registry import Registry
    reg = Registry.open(registry)
    op = reg.operator(2, 0)
    t0 = time.perf_counter()
    if method == "naive":
        w, b = op.layers[0].weight, op.layers[0].bias
        x = np.load(table)
        y = (x.astype(np.float32) @ w.T + (0 if b is None else b)).astype(np.float16)
        np.save(out, y)
        rows = len(x)
    elif method == "compute":
        x = np.load(table)
        rows = len(x)
        cr = chunk_rows or 32768
        y = np.empty((cr, op.d_out), np.float16)
        op.apply(x[:cr], out=y)  # warm-up
        t0 = time.perf_counter()
        for i in range(0, rows, cr):
            xi = x[i:i + cr]
            op.apply(xi, out=y[: len(xi)])
    elif method == "convert":
        from bc_fast.convert import convert_table
        res = convert_table(table, out, registry=reg, dst=0, chunk_rows=chunk_rows, progress=False)
        rows = res.rows
    else:
        raise ValueError(method)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "rows": rows,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _run_worker(method: str, registry: str, table: str, out: str, chunk_rows: int | None) -> dict:
    for p in (out, out + ".bcfast.json"):
        if os.path.exists(p):
            os.unlink(p)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, "--registry", registry,
           "--table", table, "--out", out] + (["--chunk-rows", str(chunk_rows)] if chunk_rows else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"{method} worker failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk-rows", type=int, default=None)
    ap.add_argument("--methods", default="compute,convert,naive")
    ap.add_argument("--dir", default=None, help="where to put the temporary table (default: $TMPDIR)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--registry", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--table", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.worker, args.registry, args.table, args.out, args.chunk_rows)))
        return

    print(_machine())
    root = tempfile.mkdtemp(prefix="bench_convert_", dir=args.dir)
    try:
        registry, table = _make_inputs(root, args.rows)
        gb = os.path.getsize(table) / 1e9
        print(f"table: {args.rows} x {DIM} float16 ({gb:.2f} GB) version 2 -> 0 at float16, "
              f"repeats={args.repeats} (+1 warm-up, dropped), medians")
        out = os.path.join(root, "out.npy")
        results: dict[str, dict] = {}
        for method in args.methods.split(","):
            runs = [_run_worker(method, registry, table, out, args.chunk_rows) for _ in range(args.repeats + 1)][1:]
            sec = statistics.median(r["seconds"] for r in runs)
            rss = max(r["peak_rss_mb"] for r in runs)
            results[method] = {"seconds": sec, "rows_per_s": args.rows / sec, "peak_rss_mb": rss}
            print(f"method={method} rows={args.rows} dim={DIM} dtype=float16 median_s={sec:.3f} "
                  f"rows_per_s={args.rows / sec:.0f} peak_rss_mb={rss:.0f} "
                  f"runs_s={','.join('%.3f' % r['seconds'] for r in runs)}", flush=True)
        if "convert" in results:
            c = results["convert"]
            if "compute" in results:
                r = c["rows_per_s"] / results["compute"]["rows_per_s"]
                print(f"ratio convert/compute_only={r:.2f} (target >= 0.8)")
            if "naive" in results:
                r = results["naive"]["seconds"] / c["seconds"]
                print(f"ratio naive_time/convert_time={r:.2f} (target >= 2.0)")
            print(f"convert peak_rss_mb={c['peak_rss_mb']:.0f} (target < 300)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
