"""Table conversion against the machine's bound: each stage alone, then the whole conversion.

    python bench/bench_convert.py [--quick] [--threads N] [--json PATH] [--rows 2000000] [--repeats 3]
                                  [--dir /tmp] [--only npy_f16,...]

For each table (default N = 2M rows; --quick: 500k), version-2 embeddings in a temporary directory and a
registry with two 256 -> 256 backward transforms, this measures in one run, each method in its own
subprocess (so peak RSS, VmHWM, is its own), methods round-robin, one warm-up round dropped:

- ``bc_fast``: ``bc_fast.convert.convert_table`` version 2 -> 0 (input in the page cache, output
  fdatasync-ed, the 256-row verification on);
- ``read``: the stage alone: the table read chunk by chunk, as the conversion reads it, into one buffer;
- ``compute``: the stage alone: the core on the in-memory table, chunk by chunk into one reused buffer,
  at the same thread count;
- ``write``: the stage alone: the output's bytes (already computed, touched memory) written chunk by chunk
  and fdatasync-ed, the plain way for the format (``pwrite`` into a ``.npy``; one ``pyarrow``
  ``ParquetWriter`` with the conversion's options, ``bc_fast.store.parquet.parquet_write_options``);
- ``naive`` (``npy_f16`` only): np.load, ``(x.astype(f32) @ W.T + b).astype(f16)``, np.save, with numpy's
  BLAS held to the same thread count (``threadpool_limits``; its worker reports the count it ran with).

The bound is ``rows / max(stage times)``; the conversion's rate is reported as a fraction of it (target:
>= 0.8 for ``.npy``, >= 0.7 for Parquet), with its peak RSS (budget 300 MB for ``.npy``: four 16 MiB chunk
buffers on top of the interpreter, numpy and the core; 600 MB for Parquet, see ``RSS_BUDGET_MB``). Tables:
``npy_f16`` and ``npy_f32`` (affine, output in the input's dtype), ``parquet_f16`` (an id column carried
through), ``npy_f16_mlp`` (two residual-MLP steps 256 -> 512 -> 256, ReLU, fused into one layer program).
The temporary directory is deleted.
Harness: :mod:`bc_fast.bench.harness`.
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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bc_fast.bench.harness import (
    TINY_PLAN,
    Bench,
    Stopwatch,
    check,
    numpy_blas_threads,
    result,
    run_configs,
    script_args,
    speedup_check,
    timing_from_samples,
)

if TYPE_CHECKING:
    from bc_fast.store.tables import Chunk, TableReader

DIM = 256
STAGES = ("read", "compute", "write")
#: name: (format, dtype, transform)
TABLES = {
    "npy_f16": ("npy", "float16", "affine"),
    "npy_f32": ("npy", "float32", "affine"),
    "parquet_f16": ("parquet", "float16", "affine"),
    "npy_f16_mlp": ("npy", "float16", "mlp"),
}
TARGETS = {"npy": 0.8, "parquet": 0.7}
# Peak RSS budgets. .npy: four 16 MiB chunk buffers on top of the interpreter, numpy and the core. Parquet:
# pyarrow's own reader peaks near 300 MB here (the `read` stage alone: a 65,536-row group decoded, its pages
# and the record batches cut from it) and its writer keeps ~85 MB of encoder buffers, so 600 MB; what the
# budget guards is that memory does not grow with the table (before stop 32 it did: 764 MB at 500k rows,
# 1.5 GB at 2M).
RSS_BUDGET_MB = {"npy": 300, "parquet": 600}


def _make_inputs(root: Path, fmt: str, dtype: str, kind: str, rows: int, rng: np.random.Generator) -> tuple[str, str]:
    """A two-step registry of ``kind`` transforms and an N x 256 table of version-2 rows."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_fusion import make_registry

    from bc_fast.store.tables import npy_header_bytes

    reg = make_registry(root / "registry", kind, 2, DIM, rng)
    dt = np.dtype(dtype)
    step = 1 << 16
    blocks = (rng.standard_normal((min(step, rows - i), DIM), dtype=np.float32).astype(dt) for i in range(0, rows, step))
    if fmt == "npy":
        path = root / "table.npy"
        with open(path, "wb") as f:
            f.write(npy_header_bytes((rows, DIM), dt))
            f.writelines(b.tobytes() for b in blocks)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        path = root / "table.parquet"
        vt = pa.float16() if dt == np.float16 else pa.float32()
        schema = pa.schema([("id", pa.int64()), ("emb", pa.list_(vt, DIM))])
        with pq.ParquetWriter(path, schema, compression="snappy") as w:
            start = 0
            for b in blocks:
                emb = pa.FixedSizeListArray.from_arrays(pa.array(b.reshape(-1), type=vt), DIM)
                w.write_table(pa.Table.from_arrays([pa.array(np.arange(start, start + len(b))), emb], schema=schema))
                start += len(b)
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


def _write_stage(table: str, out: str, y: np.ndarray, chunk_rows: int, rows: int) -> None:
    """The output's bytes written chunk by chunk from one touched buffer, then fdatasync-ed."""
    if table.endswith(".npy"):
        from bc_fast.store.tables import npy_header_bytes
        hdr = npy_header_bytes((rows, y.shape[1]), y.dtype)
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.pwrite(fd, hdr, 0)
            for start in range(0, rows, chunk_rows):
                view = memoryview(y[: min(chunk_rows, rows - start)].reshape(-1).view(np.uint8))
                off, done = len(hdr) + start * y.shape[1] * y.itemsize, 0
                while done < len(view):
                    done += os.pwrite(fd, view[done:], off + done)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bc_fast.store.parquet import parquet_write_options
    vt = pa.float16() if y.dtype == np.float16 else pa.float32()
    schema = pa.schema([("id", pa.int64()), ("emb", pa.list_(vt, y.shape[1]))])
    with open(out, "wb") as f:
        with pq.ParquetWriter(f, schema, **parquet_write_options(schema, "emb")) as w:  # as the conversion writes
            for start in range(0, rows, chunk_rows):
                n = min(chunk_rows, rows - start)
                emb = pa.FixedSizeListArray.from_arrays(pa.array(y[:n].reshape(-1), type=vt), y.shape[1])
                w.write_table(pa.Table.from_arrays([pa.array(np.arange(start, start + n)), emb], schema=schema),
                              row_group_size=n)
        f.flush()
        os.fsync(f.fileno())


def read_stage(reader: TableReader, chunks: list[Chunk], buf: np.ndarray) -> None:
    """The table read chunk by chunk, as the conversion reads it, into one buffer."""
    for c in chunks:
        reader.read(c, buf)


def _worker(method: str, registry: str, table: str, out: str, threads: int) -> dict:
    """One method in this (fresh) process: seconds, CPU seconds, peak RSS."""
    from bc_fast.convert.job import _default_chunk_rows
    from bc_fast.store.registry import Registry
    from bc_fast.store.tables import open_table

    op = Registry.open(registry).operator(2, 0)
    reader = open_table(table)
    rows, dtype = reader.n_rows, reader.dtype
    cr = _default_chunk_rows(op.d_in, dtype.itemsize, op.d_out, dtype.itemsize, reader.format)  # the conversion's
    chunks = reader.chunks(cr)
    buf = np.empty((max(c.rows for c in chunks), reader.dim), dtype)
    y = np.zeros((cr, op.d_out), dtype)
    if method == "bc_fast":
        import bc_fast.convert  # noqa: F401  (imports outside the clock, as for the other methods)
    if reader.format == "parquet":
        import pyarrow.parquet  # noqa: F401
    if method == "compute":
        x = np.empty((rows, reader.dim), dtype)
        for c in chunks:
            x[c.start:c.stop] = reader.read(c, buf)[0]
        op.apply(x[:cr], out=y[: min(cr, rows)], threads=threads)  # warm-up
    elif method == "write":
        y[:] = np.random.default_rng(0).standard_normal(y.shape, dtype=np.float32)
    with _blas_limit(method, threads) as blas_threads, Stopwatch() as sw:
        if method == "naive":
            w, b = op.layers[0].weight, op.layers[0].bias
            x = np.load(table)
            np.save(out, (x.astype(np.float32) @ w.T + (0 if b is None else b)).astype(dtype))
        elif method == "read":
            read_stage(reader, chunks, buf)
        elif method == "compute":
            for c in chunks:
                op.apply(x[c.start:c.stop], out=y[: c.rows], threads=threads)
        elif method == "write":
            _write_stage(table, out, y, cr, rows)
        else:
            from bc_fast.convert import convert_table
            convert_table(table, out, registry=registry, dst=0, progress=False, threads=threads)
    reader.close()
    return {"seconds": sw.wall, "cpu": sw.cpu, "peak_rss_mb": _peak_rss_mb(), "blas_threads": blas_threads}


@contextmanager
def _blas_limit(method: str, threads: int) -> Iterator[int | None]:
    """numpy's BLAS held to ``threads`` threads for the ``naive`` method; yields the count it runs with.

    The other methods run the core with ``threads``; without the limit numpy's BLAS would use every core
    in ``naive``. The count (None where threadpoolctl does not find numpy's BLAS; None for the other
    methods, which leave it alone) is looked up here, outside the clock.
    """
    if method != "naive":
        yield None
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=threads, user_api="blas"):
        yield numpy_blas_threads()


def _run_worker(method: str, registry: str, table: str, out: str, threads: int) -> dict:
    for p in (out, out + ".bcfast.json"):
        if os.path.exists(p):
            os.unlink(p)
    # Every method starts with no dirty pages: np.save (naive) returns with its output still in the page cache,
    # and the kernel's writeback of it ran during the next method (always the conversion: the round-robin
    # keeps the cyclic order), at 0.68 of the bound where a clean start gave 0.75.
    os.sync()
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, "--registry", registry,
           "--table", table, "--out", out, "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"bench_convert: the {method} worker failed (exit {proc.returncode}):\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cfg_table(bench: Bench, name: str, rows: int, repeats: int, tmp_dir: str | None) -> dict:
    """One table: the conversion and its stages alone, round-robin, ``repeats`` rounds after a dropped warm-up."""
    fmt, dtype, kind = TABLES[name]
    methods = ("bc_fast", *STAGES) + (("naive",) if name == "npy_f16" else ())
    root = Path(tempfile.mkdtemp(prefix="bench_convert_", dir=tmp_dir))
    try:
        registry, table = _make_inputs(root, fmt, dtype, kind, rows, bench.rng)
        out = str(root / ("out" + Path(table).suffix))
        runs: dict[str, list[dict]] = {m: [] for m in methods}
        for r in range(repeats + 1):
            for m in methods[r % len(methods):] + methods[:r % len(methods)]:
                res = _run_worker(m, registry, table, out, bench.threads)
                if r:
                    runs[m].append(res)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    t = {m: timing_from_samples([x["seconds"] for x in rs], sum(x["cpu"] for x in rs)) for m, rs in runs.items()}
    rss = {m: max(x["peak_rss_mb"] for x in rs) for m, rs in runs.items()}
    slowest = max(STAGES, key=lambda s: t[s].median_s)
    frac = t[slowest].median_s / t["bc_fast"].median_s
    target = TARGETS[fmt]
    checks = [check("vs slowest stage", frac, target, f"≥ {target:g} of rows / max(stage)",
                    f"{frac:.2f} of the {slowest} bound"),
              check("peak RSS", RSS_BUDGET_MB[fmt] / rss["bc_fast"], 1.0, f"< {RSS_BUDGET_MB[fmt]} MB",
                    f"{rss['bc_fast']:.0f} MB RSS")]
    if "naive" in t:
        checks.append(speedup_check("vs naive", t, "naive", 2.0))
    stages = ", ".join(f"{s} {rows / t[s].median_s / 1e6:.2f}" for s in STAGES)
    naive = (f"; naive: numpy's BLAS on {runs['naive'][0]['blas_threads']} thread(s), bc_fast on {bench.threads}"
             if "naive" in runs else "")
    return result(f"convert_{name}", f"{rows:,} x {DIM} {dtype} {fmt}, {kind} version 2 -> 0, {dtype} out",
                  rows, t, checks, peak_rss_mb=rss, bound_stage=slowest, fraction_of_bound=frac,
                  note=f"M rows/s: convert {rows / t['bc_fast'].median_s / 1e6:.2f}; stages alone {stages}; "
                       "peak RSS MB " + ", ".join(f"{m} {v:.0f}" for m, v in rss.items()) + naive)


def main(argv: list[str] | None = None) -> int:
    def extra(p) -> None:
        p.add_argument("--rows", type=int, default=None, help="table rows (default 2,000,000; --quick 500,000)")
        p.add_argument("--repeats", type=int, default=3, help="timed rounds (one warm-up round more)")
        p.add_argument("--dir", default=None, help="where to put the temporary tables (default: $TMPDIR)")
        p.add_argument("--only", default=None, help=f"comma-separated tables of {', '.join(TABLES)}")
        for hidden in ("--worker", "--registry", "--table", "--out"):
            p.add_argument(hidden, default=None, help=argparse.SUPPRESS)

    args = script_args(__doc__, argv, quick_help="500,000-row tables", extra=extra)
    if args.worker:
        print(json.dumps(_worker(args.worker, args.registry, args.table, args.out, args.threads)))
        return 0
    names = args.only.split(",") if args.only else list(TABLES)
    unknown = [n for n in names if n not in TABLES]
    if unknown:
        raise SystemExit(f"bench_convert: unknown table(s) {', '.join(unknown)}; choose from {', '.join(TABLES)}")
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    rows = args.rows or {"tiny": 20_000, "quick": 500_000, "full": 2_000_000}[mode]
    repeats = 1 if args.tiny else args.repeats
    run_configs("bench_convert", [(cfg_table, (n, rows, repeats, args.dir)) for n in names], threads=args.threads,
                plan=TINY_PLAN, mode=mode, json_path=args.json,
                describe=f"mode={mode}: {rows:,}-row tables ({', '.join(names)}), {repeats} rounds (+1 warm-up, "
                         "dropped), each method in its own process")
    return 0


if __name__ == "__main__":
    sys.exit(main())
