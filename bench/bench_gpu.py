"""GPU pipeline benchmark of bc_fast: whole-table conversion on the GPU, against the copy bound and the CPU.

The kernels themselves (fused layers, GEMMs, batch 1) against torch eager and torch.compile are
``bench/gpu_kernels.py``; ``bench/gpu_check.sh`` runs both.

Configs (sizes in parentheses: default / --quick):

- ``convert_host``: ``convert_table(..., device="cuda")`` of a float16 256-d ``.npy`` table
  (50M / 4M rows) through a 256->256 affine registry step into a float16 table, vs the host<->device
  copy bound (pinned buffers, both directions at once, chunk-sized copies, measured in the same
  run) and vs ``device="cpu"`` on the same machine (on at most 10M / 4M rows; rows/s compared).
  Targets: >= 0.7x the copy bound, >= 5x the CPU path. The table files live in ``--tmp``
  (default: $TMPDIR); the default size needs about 52 GB there.

Timing: CUDA events on the current stream around ``calls`` back-to-back calls (wall clock plus a
synchronize for ``batch1`` and ``convert_host``), implementations interleaved round-robin, one
warm-up dropped, medians reported. Every config checks bc_fast's output against a float64
reference on a sample of rows. Exits with status 2 and a message when no GPU is usable.

Usage: python bench/bench_gpu.py [--quick] [--json PATH] [--tmp DIR] [--threads N] [--only CFG,...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bc_fast.bench.harness import (
    Stopwatch,
    check,
    fmt_time,
    kv_line,
    time_gpu_interleaved,
    timing_from_samples,
)

SIZES = {  # rows per config: (default, quick)
    "convert_host": (50_000_000, 4_000_000), "convert_cpu": (10_000_000, 4_000_000),
}


def _no_gpu(why: str) -> None:
    print(f"bench_gpu: no GPU: {why}; nothing was measured", file=sys.stderr)
    sys.exit(2)


def _setup() -> tuple[Any, Any, Any]:
    """torch, torch.nn.functional and bc_fast's CUDA module, or exit 2 saying what is missing."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError as e:
        _no_gpu(f"torch cannot be imported ({e})")
    if not torch.cuda.is_available():
        _no_gpu("torch sees no CUDA device (torch.cuda.is_available() is False)")
    from bc_fast.engine.cuda import cuda_module
    try:
        mod = cuda_module()
    except RuntimeError as e:
        _no_gpu(str(e))
    info = mod.device_info()
    if not info["available"]:
        _no_gpu(f"bc_fast._cuda sees no GPU ({info['error']})")
    return torch, F, mod


# --------------------------------------------------------------------------- timing


def _rel_err(torch: Any, y: Any, ref: np.ndarray) -> float:
    got = y.float().cpu().numpy().astype(np.float64)
    return float(np.max(np.linalg.norm(got - ref, axis=1) / np.maximum(np.linalg.norm(ref, axis=1), 1e-12)))


def _weights(rng: np.random.Generator, d_out: int, d_in: int) -> tuple[np.ndarray, np.ndarray]:
    w = (rng.standard_normal((d_out, d_in)) / math.sqrt(d_in)).astype(np.float32)
    return w, (rng.standard_normal(d_out) * 0.1).astype(np.float32)


def _record(name: str, rows: int, times: dict[str, float], checks: list[dict], err: float | None,
            note: str = "") -> dict:
    return {"config": name, "rows": rows, "median_s": times, "checks": checks, "max_rel_err": err, "note": note}


# --------------------------------------------------------------------------- configs


def bench_copy_bandwidth(torch: Any, samples: int) -> float:
    """Device-to-device copy, bytes read + written per second (the card's practical memory bandwidth)."""
    n = 1 << 30  # 1 GiB
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = time_gpu_interleaved(torch, {"copy": lambda: dst.copy_(src)}, samples=samples, calls=3)["copy"]
    return 2 * n / t  # the buffers go with this frame


def _copy_bound_rows_per_s(torch: Any, chunk_rows: int, samples: int) -> float:
    """Rows/s when only copies run: chunk H2D (256 fp16) and D2H (256 fp16) at once on two streams."""
    nbytes = chunk_rows * 256 * 2
    h_in = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    h_out = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    d_in, d_out = torch.empty(nbytes, dtype=torch.uint8, device="cuda"), torch.empty(nbytes, dtype=torch.uint8,
                                                                                     device="cuda")
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()

    def both() -> None:
        with torch.cuda.stream(s1):
            d_in.copy_(h_in, non_blocking=True)
        with torch.cuda.stream(s2):
            h_out.copy_(d_out, non_blocking=True)

    t = time_gpu_interleaved(torch, {"copy": both}, samples=samples, calls=8, wall=True)["copy"]
    return chunk_rows / t


def bench_convert(torch: Any, rows: int, cpu_rows: int, samples: int, tmp: Path, threads: int | None) -> dict:
    from bc_fast.convert import convert_table
    from bc_fast.convert.job import _default_chunk_rows
    from bc_fast.store.registry import Registry
    rng = np.random.default_rng(3)
    w, b = _weights(rng, 256, 256)
    work = Path(tempfile.mkdtemp(prefix="bc_fast_gpu_bench.", dir=tmp))
    try:
        reg = Registry.create(work / "reg")
        reg.add_version(dim=256)
        reg.add_version(dim=256, backward=(w, b))
        table = work / "v1.npy"
        with Stopwatch() as sw:
            mm = np.lib.format.open_memmap(table, mode="w+", dtype=np.float16, shape=(rows, 256))
            block = rng.standard_normal((min(rows, 1 << 18), 256), dtype=np.float32).astype(np.float16)
            for s in range(0, rows, len(block)):
                mm[s:s + len(block)] = block[: rows - s]
            mm.flush()
            del mm
        print(f"# convert_host: wrote the {rows:,}-row input in {sw.wall:.1f}s", flush=True)

        def run(device: str, src: Path, out: Path) -> float:
            with Stopwatch() as t:  # convert_table verifies 256 rows against float64
                convert_table(src, out, registry=reg, dst=0, device=device, progress=False, threads=threads)
            return t.wall

        gpu_runs = []
        for i in range(max(1, samples // 2)):
            out = work / f"v0_gpu{i}.npy"
            gpu_runs.append(run("cuda", table, out))
            os.unlink(out)
            os.unlink(str(out) + ".bcfast.json")
        gpu_s = timing_from_samples(gpu_runs, 0.0).median_s
        gpu_rps = rows / gpu_s
        cpu_src = table
        if cpu_rows < rows:
            cpu_src = work / "v1_cpu.npy"
            np.save(cpu_src, np.load(table, mmap_mode="r")[:cpu_rows])
        cpu_s = run("cpu", cpu_src, work / "v0_cpu.npy")
        cpu_rps = cpu_rows / cpu_s
        chunk = _default_chunk_rows(256, 2, 256, 2)
        bound = _copy_bound_rows_per_s(torch, chunk, samples=max(3, samples))
        checks = [check("vs copy bound", gpu_rps / bound, 0.7, "≥ 0.7x H2D+D2H bound",
                        f"{gpu_rps / bound:.2f}x ({gpu_rps / 1e6:.1f} vs {bound / 1e6:.1f} M rows/s)"),
                  check("vs CPU path", gpu_rps / cpu_rps, 5.0, "≥ 5x device=cpu",
                        f"{gpu_rps / cpu_rps:.2f}x cpu ({cpu_rps / 1e6:.2f} M rows/s)")]
        times = {"bc_fast": gpu_s, "cpu_path": cpu_s * rows / cpu_rows, "copy_bound": rows / bound}
        return _record("convert_host", rows, times, checks, None,
                       f"fp16 .npy 256->256 affine -> fp16, chunk {chunk:,} rows; cpu on {cpu_rows:,} rows, scaled")
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------- report


def table(results: list[dict]) -> str:
    """One markdown table: config | rows | bc_fast | baselines | checks | status."""
    lines = ["| config | rows | bc_fast median | baselines | result | target | status | max rel err |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        t = r["median_s"]
        bases = "; ".join(f"{k} {fmt_time(v)}" for k, v in t.items() if k != "bc_fast") or "-"
        st = [c["status"] for c in r["checks"]]
        status = next((x for x in ("FAIL", "MISS", "PASS") if x in st), "SKIP")
        err = "-" if r["max_rel_err"] is None else f"{r['max_rel_err']:.1e}"
        lines.append(f"| {r['config']} | {r['rows']:,} | {fmt_time(t['bc_fast'])} | {bases} | "
                     f"{'; '.join(c['shown_value'] for c in r['checks'])} | "
                     f"{'; '.join(c['shown_target'] for c in r['checks'])} | {status} | {err} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--quick", action="store_true", help="smaller sizes and fewer samples (about a minute)")
    p.add_argument("--json", type=Path, default=None, help="also write every timing and check as JSON")
    p.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()),
                   help="folder for convert_host's table files (default: $TMPDIR)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for convert_host's device=cpu run (default: all cores)")
    p.add_argument("--only", default=None, help="comma-separated config names to run (default: all)")
    args = p.parse_args(argv)
    torch, _, mod = _setup()
    q = 1 if args.quick else 0
    samples = 5 if args.quick else 11
    props = torch.cuda.get_device_properties(0)
    info = mod.device_info()
    print(f"# bench_gpu ({'quick' if args.quick else 'full'}): {props.name}, {props.total_memory / 2**30:.0f} GiB, "
          f"cc {props.major}.{props.minor}, driver {info['driver_version']}, runtime {info['runtime_version']}, "
          f"torch {torch.__version__} (CUDA {torch.version.cuda})", flush=True)
    only = None if args.only is None else set(args.only.split(","))
    results: list[dict] = []
    total = Stopwatch().__enter__()
    bw = bench_copy_bandwidth(torch, samples)
    print(f"# device-to-device copy bandwidth: {bw / 1e9:.0f} GB/s (read + write)", flush=True)
    plan: list[tuple[str, Callable[[], dict]]] = [
        ("convert_host", lambda: bench_convert(torch, SIZES["convert_host"][q], SIZES["convert_cpu"][q], samples,
                                               args.tmp, args.threads)),
    ]
    for name, fn in plan:
        if only is not None and name not in only:
            continue
        cfg = Stopwatch().__enter__()
        try:
            r = fn()
        except Exception as e:  # noqa: BLE001 - one failing config must not hide the others' numbers
            r = _record(name, 0, {"bc_fast": float("nan")}, [check("ran", None, 1, "runs", f"ERROR: {e}")], None)
            r["checks"][0]["status"] = "FAIL"
        torch.cuda.empty_cache()
        results.append(r)
        for k, v in r["median_s"].items():
            print(kv_line(config=r["config"], impl=k, rows=r["rows"], median_us=v * 1e6), flush=True)
        for c in r["checks"]:
            print(kv_line(config=r["config"], check=c["label"], value=c["value"], target=c["target"],
                          status=c["status"]), flush=True)
        cfg.__exit__()
        print(f"# {name} done in {cfg.wall:.1f}s", flush=True)
    print()
    print(table(results))
    checks = [c for r in results for c in r["checks"]]
    total.__exit__()
    print(f"# {sum(c['status'] == 'PASS' for c in checks)}/{len(checks)} targets met; wall {total.wall:.0f}s")
    if args.json:
        args.json.write_text(json.dumps({"device": props.name, "copy_bandwidth": bw, "results": results}, indent=1,
                                        default=str))
    return 1 if any(c["status"] == "FAIL" for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
