"""Ray engine vs the single-process converter on the same Parquet dataset, and the scaling model's inputs.

    python bench/bench_distributed.py [--quick] [--threads N] [--json PATH] [--rows 2000000] [--files 8]
                                      [--dim 256] [--repeats 1] [--methods single,ray_Nx1,ray_1xN] [--dir /tmp]

Generates a dataset of ``--files`` Parquet files (``id`` int64 + a fixed_size_list<float16>[dim]
embedding column, 64k-row row groups; default 2M x 256, ~1 GB; --quick: 500k) of version-2
embeddings and a registry with two dim -> dim affine backward transforms, and converts it to
version 0 (float16), each run in its own subprocess, the methods round-robin, one warm-up round
dropped (warm page cache):

- ``single``: ``convert_table`` on each file in turn, one process, N = ``--threads`` threads (default:
  all cores; what ``bc-fast convert`` does per file);
- ``ray_WxP``: ``convert_dataset_ray`` on a local Ray (num_cpus = all cores), W workers x P threads each,
  with W * P = N: every method gets the same threads in all. The default methods are ``single``,
  ``ray_Nx1`` and ``ray_1xN`` (at N = 2: ``ray_2x1`` and ``ray_1x2``); a ``ray_WxP`` whose W * P is
  not N is refused.

Ray's start (``ray.init``) is timed apart and not counted. Peak RSS (VmHWM): the single process,
and each Ray worker (reported by the run). For the scaling model it also times the core alone
(one thread, float16 in and out, in-memory 64k-row chunks, one dim x dim affine layer; the median of 5
runs after a warm-up) at ``dim`` and at 768. Checks: Ray >= 0.7x the single-process rows/s; peak RSS per
Ray worker < 1 GB.
The temporary directory is deleted. Harness: :mod:`bc_fast.bench.harness`.

Measured (2026-11-30, AMD EPYC 2 vCPUs shared with other jobs, load average 6.5 -> 1.6 during the run;
``python bench/bench_distributed.py --rows 2000000 --files 8 --methods single,ray_2x1``): single
15,978 rows/s, Ray 2x1 23,943 rows/s (1.50x: two processes run two pyarrow codecs, the single
process one), peak RSS 634 MB single / <= 770 MB per Ray worker (~240 MB of it Ray + imports; the
same at 200k, 1M and 2M rows: bounded by the chunk and the input row group, not the file), ray.init
4.6 s; core alone 552k rows/s/core at 256-d (72 GFLOP/s), 67k at 768-d (80 GFLOP/s) (the best of 5 runs:
this script reported the best then; it reports the median now).

Scaling model (a PREDICTION, not a measurement). Per row and core, t = 2*d_in*d_out / F + k * B_row,
with F ~ 75 GFLOP/s/core (the core alone) and k ~ 83 ns per byte of final Parquet in + out (Ray 2x1
above: 83 us/row/core, of which 1.8 us compute; k covers the float16 FIXED_LEN_BYTE_ARRAY(2) decode
and encode, the part -> merged rewrite, the verification reads and the sha256). The Parquet path is
codec bound, not GEMM bound. For 1B x 768 -> 768 float16 (B_row ~ 3.1 KB): t ~ 15 + 256 = 272 us,
3.7k rows/s/core, 2.7e5 core-seconds (~76 core-hours). On N nodes of C cores:
T_cpu ~ 2.7e5 / (N*C) s. Shared storage moves at least 4.6 KB/row (input read, parts and merged file
written; re-reads hit the page cache), 4.6 TB in all: T_io >= 4.6 TB / (aggregate bandwidth).
T(N) ~ 10 s (Ray + actors) + max(T_cpu, T_io) + one file's time on one worker (tail: 27 s for 100k-row
files). With C = 64 and 10 GB/s storage: N=1 ~ 71 min, N=4 ~ 19 min, N=8 ~ 9.5 min, N >= 9 I/O bound at
~8 min. Does not scale: one file per worker (have >= 4 files per worker), the driver's serial header
scan and the final rename (one shared POSIX filesystem), and a merged IVF index that must fit one process.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from bc_fast.bench.harness import TINY_PLAN, Bench, Stopwatch, check, result, run_configs, script_args, speedup_check
from bc_fast.bench.harness import timing_from_samples

ROW_GROUP = 65536
_RAY_METHOD = re.compile(r"ray_([1-9][0-9]*)x([1-9][0-9]*)")


def default_methods(threads: int) -> list[str]:
    """``single`` and Ray with the same ``threads`` in all: as many 1-thread workers, and one worker with all."""
    return list(dict.fromkeys(["single", f"ray_{threads}x1", f"ray_1x{threads}"]))


def ray_shape(method: str, threads: int) -> tuple[int, int]:
    """``(workers, threads per worker)`` of a ``ray_WxP`` method; ValueError unless W * P == ``threads``."""
    m = _RAY_METHOD.fullmatch(method)
    if m is None:
        raise ValueError(f"unknown method {method!r}: use single or ray_WxP (W workers x P threads each)")
    workers, per = int(m.group(1)), int(m.group(2))
    if workers * per != threads:
        raise ValueError(f"{method} runs {workers * per} threads in all but --threads is {threads}: every method "
                         f"gets the same total (e.g. ray_{threads}x1, ray_1x{threads})")
    return workers, per


def check_methods(methods: list[str], threads: int) -> list[str]:
    """``methods``, each known and with ``threads`` threads in all (ValueError otherwise)."""
    for m in methods:
        if m != "single":
            ray_shape(m, threads)
    return methods


def _make(root: Path, rows: int, files: int, dim: int, rng: np.random.Generator) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bc_fast.store.registry import Registry

    reg = Registry.create(root / "registry")
    reg.add_version(dim=dim)
    for _ in range(2):
        q, _r = np.linalg.qr(rng.standard_normal((dim, dim)))
        reg.add_version(dim=dim, backward=(q.astype(np.float32), (0.01 * rng.standard_normal(dim)).astype(np.float32)))
    (root / "in").mkdir()
    per = -(-rows // files)
    schema = pa.schema([("id", pa.int64()), ("emb", pa.list_(pa.float16(), dim))])
    for f in range(files):
        n = max(0, min(per, rows - f * per))
        with pq.ParquetWriter(root / "in" / f"part-{f:04d}.parquet", schema) as w:
            for s in range(0, n, ROW_GROUP):
                m = min(ROW_GROUP, n - s)
                x = rng.standard_normal((m, dim), dtype=np.float32).astype(np.float16)
                emb = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), dim)
                ids = pa.array(np.arange(f * per + s, f * per + s + m, dtype=np.int64))
                w.write_table(pa.Table.from_arrays([ids, emb], schema=schema), row_group_size=m)
    return str(reg.path)


def _vmhwm_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) / 1024 for l in f if l.startswith("VmHWM:"))


def _worker(method: str, root: str, registry: str, threads: int) -> dict:
    """One timed run in this (fresh) process."""
    out = Path(root) / "out"
    for p in Path(root).glob("out*"):
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    names = sorted(os.listdir(Path(root) / "in"))
    if method == "single":
        from bc_fast.convert import convert_table

        out.mkdir()
        with Stopwatch() as sw:
            for n in names:
                convert_table(Path(root) / "in" / n, out / n, registry=registry, dst=0, progress=False,
                              threads=threads)
        return {"seconds": sw.wall, "cpu": sw.cpu, "peak_rss_mb": [_vmhwm_mb()], "start_s": 0.0}
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read by ray on import: a local Ray on 127.0.0.1 only
    import ray

    from bc_fast.convert.distributed import convert_dataset_ray

    workers, per = ray_shape(method, threads)
    with Stopwatch() as start:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level="error")
    with Stopwatch() as sw:
        res = convert_dataset_ray(Path(root) / "in", out, registry=registry, dst=0, num_workers=workers,
                                  threads_per_worker=per)
    ray.shutdown()
    return {"seconds": sw.wall, "cpu": sw.cpu, "start_s": start.wall,
            "peak_rss_mb": sorted(v / 2**20 for v in res.peak_rss.values())}


def _run_worker(method: str, root: Path, registry: str, threads: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, "--root", str(root), "--registry",
           registry, "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"bench_distributed: the {method} worker failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _compute_rate(dim: int, reps: int = 5, rows: int = ROW_GROUP) -> dict:
    """The core alone, one thread: rows/s per core and GFLOP/s (the median of ``reps`` runs after a warm-up)."""
    from bc_fast import FusedTransform, Layer

    rng = np.random.default_rng(1)
    op = FusedTransform([Layer(rng.standard_normal((dim, dim)).astype(np.float32) / dim ** 0.5,
                               rng.standard_normal(dim).astype(np.float32))])
    x = rng.standard_normal((rows, dim)).astype(np.float16)
    y = np.empty((rows, dim), np.float16)
    op.apply(x, out=y, threads=1)
    walls, cpu = [], 0.0
    for _ in range(reps):
        with Stopwatch() as sw:
            op.apply(x, out=y, threads=1)
        walls.append(sw.wall)
        cpu += sw.cpu
    t = timing_from_samples(walls, cpu)
    return {"dim": dim, "rows_per_s_per_core": rows / t.median_s,
            "gflops_per_core": 2 * rows * dim * dim / t.median_s / 1e9, "samples": t.samples,
            "cpu_over_wall": t.cpu_over_wall}


def cfg_distributed(bench: Bench, rows: int, files: int, dim: int, repeats: int, methods: list[str],
                    tmp_dir: str | None) -> dict:
    """Every method, round-robin, ``repeats`` rounds after a dropped warm-up round."""
    root = Path(tempfile.mkdtemp(prefix="bench_distributed_", dir=tmp_dir))
    try:
        registry = _make(root, rows, files, dim, bench.rng)
        in_bytes = sum(f.stat().st_size for f in (root / "in").iterdir())
        runs: dict[str, list[dict]] = {m: [] for m in methods}
        for r in range(repeats + 1):
            for m in methods[r % len(methods):] + methods[:r % len(methods)]:
                res = _run_worker(m, root, registry, bench.threads)
                if r:
                    runs[m].append(res)
        out_bytes = sum(f.stat().st_size for f in (root / "out").iterdir())
    finally:
        shutil.rmtree(root, ignore_errors=True)
    t = {m: timing_from_samples([x["seconds"] for x in rs], sum(x["cpu"] for x in rs)) for m, rs in runs.items()}
    rss = {m: max(v for x in rs for v in x["peak_rss_mb"]) for m, rs in runs.items()}
    ray_m = [m for m in methods if m.startswith("ray")]
    best = min(ray_m, key=lambda m: t[m].median_s) if ray_m else methods[0]
    checks = []
    if ray_m and "single" in t:
        checks.append(speedup_check("Ray vs single process", t, "single", 0.7, bc=best,
                                    shown_target="≥ 0.7x single-process rows/s"))
        worst = max(rss[m] for m in ray_m)
        checks.append(check("peak RSS per Ray worker", 1000 / worst, 1.0, "< 1 GB", f"{worst:.0f} MB"))
    compute = [_compute_rate(dim), _compute_rate(768)]
    rates = ", ".join(f"{m} {rows / t[m].median_s:,.0f} rows/s" for m in methods)
    starts = ", ".join(f"{m} {np.median([x['start_s'] for x in runs[m]]):.1f} s" for m in ray_m)
    return result("distributed", f"{rows:,} x {dim} float16 in {files} Parquet files, version 2 -> 0",
                  rows, t, checks, bc=best, peak_rss_mb=rss, compute=compute, runs=runs,
                  bytes_per_row={"read": in_bytes / rows, "written": out_bytes / rows},
                  note=f"{rates}; peak RSS MB " + ", ".join(f"{m} {v:.0f}" for m, v in rss.items())
                       + f" (Ray: per worker); ray.init {starts or '-'} (not counted); bytes/row read "
                       f"{in_bytes / rows:.0f}, written {out_bytes / rows:.0f}; core alone, 1 thread: "
                       + ", ".join(f"{c['dim']}-d {c['rows_per_s_per_core']:,.0f} rows/s "
                                   f"({c['gflops_per_core']:.1f} GFLOP/s)" for c in compute))


def main(argv: list[str] | None = None) -> int:
    def extra(p) -> None:
        p.add_argument("--rows", type=int, default=None, help="rows (default 2,000,000; --quick 500,000)")
        p.add_argument("--files", type=int, default=8, help="Parquet files (default 8)")
        p.add_argument("--dim", type=int, default=256, help="embedding dim (default 256)")
        p.add_argument("--repeats", type=int, default=1, help="timed rounds (one warm-up round more)")
        p.add_argument("--methods", default=None,
                       help="comma-separated, from the list above (default: single,ray_Nx1,ray_1xN for N threads)")
        p.add_argument("--dir", default=None, help="where to put the temporary dataset (default: $TMPDIR)")
        for hidden in ("--worker", "--root", "--registry"):
            p.add_argument(hidden, default=None, help=argparse.SUPPRESS)

    args = script_args(__doc__, argv, quick_help="a 500,000-row dataset", extra=extra)
    threads = args.threads or os.cpu_count() or 1
    if args.worker:
        print(json.dumps(_worker(args.worker, args.root, args.registry, threads)))
        return 0
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    rows = args.rows or {"tiny": 20_000, "quick": 500_000, "full": 2_000_000}[mode]
    repeats = 1 if args.tiny else args.repeats
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else default_methods(threads)
    try:
        check_methods(methods, threads)
    except ValueError as e:
        raise SystemExit(f"bench_distributed: {e}") from None
    run_configs("bench_distributed", [(cfg_distributed, (rows, args.files, args.dim, repeats, methods, args.dir))],
                threads=threads, plan=TINY_PLAN, mode=mode, json_path=args.json,
                describe=f"mode={mode}: {rows:,} x {args.dim} float16 in {args.files} Parquet files, {repeats} "
                         f"rounds (+1 warm-up, dropped), each run in its own process; methods {', '.join(methods)}, "
                         f"{threads} threads in all each")
    return 0


if __name__ == "__main__":
    sys.exit(main())
