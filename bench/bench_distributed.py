"""Ray engine vs the single-process converter on the same Parquet dataset, and a scaling model.

    python bench/bench_distributed.py [--rows 2000000] [--files 8] [--dim 256] [--repeats 2] [--dir /tmp]
                                      [--json PATH]

Generates a dataset of ``--files`` Parquet files (``id`` int64 + a fixed_size_list<float16>[dim]
embedding column, 64k-row row groups) of version-2 embeddings and a registry with two dim -> dim
affine backward transforms, then converts it to version 0 (float16) with, round-robin, each run
in its own subprocess (warm page cache, first round dropped when ``--repeats`` > 1):

- ``single``: ``convert_table`` on each file in turn, one process, all cores (what ``bc-fast convert``
  does per file);
- ``ray_2x1``: ``convert_dataset_ray`` on a local Ray (num_cpus = all cores), 2 workers x 1 thread;
- ``ray_1x2``: the same, 1 worker x 2 threads.

Ray's start-up (``ray.init``, ~5 s) is timed apart from the conversion. Peak RSS: VmHWM of the
single process, and of each Ray worker (from the run's result). Also measured, for the scaling
model: the core's compute-only rate (one thread, fp16 in/out, in-memory chunks) at ``dim`` and at
768. Prints one ``key=value`` line per method and the model's inputs; ``--json`` writes them all.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROW_GROUP = 65536


def _make(root: Path, rows: int, files: int, dim: int) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bc_fast.registry import Registry

    rng = np.random.default_rng(0)
    reg = Registry.create(root / "registry")
    reg.add_version(dim=dim)
    for _ in range(2):
        q, _r = np.linalg.qr(rng.standard_normal((dim, dim)))
        reg.add_version(dim=dim, backward=(q.astype(np.float32), (0.01 * rng.standard_normal(dim)).astype(np.float32)))
    (root / "in").mkdir()
    per = -(-rows // files)
    for f in range(files):
        n = min(per, rows - f * per)
        schema = pa.schema([("id", pa.int64()), ("emb", pa.list_(pa.float16(), dim))])
        with pq.ParquetWriter(root / "in" / f"part-{f:04d}.parquet", schema) as w:
            for s in range(0, n, ROW_GROUP):
                m = min(ROW_GROUP, n - s)
                x = rng.standard_normal((m, dim), dtype=np.float32).astype(np.float16)
                emb = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), dim)
                ids = pa.array(np.arange(f * per + s, f * per + s + m, dtype=np.int64))
                w.write_table(pa.Table.from_arrays([ids, emb], schema=schema), row_group_size=m)
    return str(reg.path)


def _vmhwm() -> int:
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))


def _worker(method: str, root: str, registry: str) -> dict:
    """One timed run, in a fresh process."""
    out = Path(root) / f"out_{method}"
    shutil.rmtree(out, ignore_errors=True)
    for p in Path(root).glob(f"out_{method}*"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
    names = sorted(os.listdir(Path(root) / "in"))
    if method == "single":
        from bc_fast.convert import convert_table

        out.mkdir()
        t0 = time.perf_counter()
        rows = 0
        for n in names:
            rows += convert_table(Path(root) / "in" / n, out / n, registry=registry, dst=0, progress=False).rows
        wall = time.perf_counter() - t0
        return {"method": method, "rows": rows, "seconds": wall, "rows_per_s": rows / wall,
                "peak_rss_mb": _vmhwm() / 2**20, "startup_s": 0.0}
    import ray

    from bc_fast.distributed import convert_dataset_ray

    workers, threads = (2, 1) if method == "ray_2x1" else (1, 2)
    t0 = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level="error")
    startup = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = convert_dataset_ray(Path(root) / "in", out, registry=registry, dst=0, num_workers=workers,
                              threads_per_worker=threads)
    wall = time.perf_counter() - t0
    ray.shutdown()
    return {"method": method, "rows": res.rows, "seconds": wall, "rows_per_s": res.rows / wall,
            "inner_rows_per_s": res.rows_per_s, "startup_s": startup,
            "peak_rss_mb_per_worker": sorted(v / 2**20 for v in res.peak_rss.values()),
            "driver_peak_rss_mb": _vmhwm() / 2**20}


def _compute_rate(dim: int, rows: int = 65536, reps: int = 5) -> dict:
    """The core alone, one thread, float16 in and out, one dim x dim affine layer: rows/s and GFLOP/s."""
    from bc_fast import FusedTransform, Layer

    rng = np.random.default_rng(1)
    op = FusedTransform([Layer(rng.standard_normal((dim, dim)).astype(np.float32) / dim ** 0.5,
                               rng.standard_normal(dim).astype(np.float32))])
    x = rng.standard_normal((rows, dim)).astype(np.float16)
    y = np.empty((rows, dim), np.float16)
    op.apply(x, out=y, threads=1)
    best = min(_timed(lambda: op.apply(x, out=y, threads=1)) for _ in range(reps))
    return {"dim": dim, "rows_per_s_per_core": rows / best, "gflops_per_core": 2 * rows * dim * dim / best / 1e9}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--files", type=int, default=8)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--methods", default="single,ray_2x1,ray_1x2")
    p.add_argument("--dir", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--_worker", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._worker:
        print(json.dumps(_worker(*a._worker)))
        return 0
    from bc_fast._benchtools import cpu_model

    print(f"# machine: {cpu_model()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start")
    root = Path(tempfile.mkdtemp(prefix="bench_distributed_", dir=a.dir))
    try:
        t0 = time.perf_counter()
        registry = _make(root, a.rows, a.files, a.dim)
        size = sum(f.stat().st_size for f in (root / "in").iterdir())
        print(f"# dataset: {a.rows:,} rows x {a.dim} float16 in {a.files} Parquet files, {size / 2**20:,.0f} MiB "
              f"({size / a.rows:.0f} B/row), made in {time.perf_counter() - t0:.1f} s")
        methods = a.methods.split(",")
        runs: dict[str, list[dict]] = {m: [] for m in methods}
        for rep in range(a.repeats):
            for m in methods:
                r = subprocess.run([sys.executable, __file__, "--_worker", m, str(root), registry],
                                   capture_output=True, text=True, check=False)
                if r.returncode:
                    print(r.stderr[-3000:], file=sys.stderr)
                    return 1
                runs[m].append(json.loads(r.stdout.strip().splitlines()[-1]))
        keep = slice(1, None) if a.repeats > 1 else slice(None)
        out_size = sum(f.stat().st_size for f in (root / f"out_{methods[0]}").iterdir())
        summary = {"rows": a.rows, "files": a.files, "dim": a.dim, "in_bytes_per_row": size / a.rows,
                   "out_bytes_per_row": out_size / a.rows, "load_average_end": os.getloadavg()[0], "methods": {}}
        for m, rs in runs.items():
            rps = statistics.median(r["rows_per_s"] for r in rs[keep])
            summary["methods"][m] = {"rows_per_s": rps, "runs": rs}
            extra = (f"peak_rss_mb={rs[-1]['peak_rss_mb']:.0f}" if m == "single" else
                     f"ray_start_s={statistics.median(r['startup_s'] for r in rs):.1f} peak_rss_mb_per_worker="
                     + "/".join(f"{v:.0f}" for v in rs[-1]["peak_rss_mb_per_worker"]))
            ratio = rps / summary["methods"]["single"]["rows_per_s"] if "single" in summary["methods"] else None
            print(f"method={m} rows={a.rows} dim={a.dim} files={a.files} rows_per_s={rps:,.0f} "
                  + (f"vs_single={ratio:.2f}x " if ratio else "") + extra
                  + " samples=" + "/".join(f"{r['rows_per_s']:,.0f}" for r in rs))
        summary["compute"] = [_compute_rate(a.dim), _compute_rate(768)]
        for c in summary["compute"]:
            print(f"compute dim={c['dim']} rows_per_s_per_core={c['rows_per_s_per_core']:,.0f} "
                  f"gflops_per_core={c['gflops_per_core']:.1f}")
        print(f"# bytes per row: read {size / a.rows:.0f}, written {out_size / a.rows:.0f}; "
              f"load average at end {os.getloadavg()[0]:.1f}")
        if a.json:
            Path(a.json).write_text(json.dumps(summary, indent=1))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
