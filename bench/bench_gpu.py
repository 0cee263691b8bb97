"""GPU pipeline benchmark of bc_fast: whole-table conversion on the GPU, against storage and the CPU.

The kernels themselves (fused layers, GEMMs, batch 1) against torch eager and torch.compile are
``bench/gpu_kernels.py``; ``bench/gpu_check.sh`` runs both.

Configs (rows: default / --quick), each ``convert_table(..., device="cuda")`` of a float16 ``.npy``
table into a float16 table, timed round-robin with the two storage stages alone, as the conversion does
them: the table read chunk by chunk into one buffer (from the page cache, as the conversion reads it),
and the same bytes written chunk by chunk and fdatasync-ed. The storage bound is
``rows / max(read, write)``. ``device="cpu"`` converts the same rows (or a prefix) once.

- ``convert_host``: 256-d, a 256->256 affine step (50M / 4M rows; CPU on 10M / 4M). Light compute: target
  >= 0.8x the storage bound (the CPU ratio is shown).
- ``convert_mlp``: 768-d, a 768->3072 (exact GELU)->768 MLP step (8M / 1M rows; CPU on 400k / 100k).
  Heavy compute: target >= 5x the CPU path (the storage fraction is shown).

- ``index_search``: a legacy index (exact ``Flat``, cosine) for version 0 built from 256-d float32 rows of
  version 1 (2M / 500k rows) with ``build_legacy_index(device="cuda")``, searched with 10k / 2k queries of
  version 1 (top 10), against the same index built and searched on the CPU. Target: the same ids (>= 99 %
  of them; exact search, only near-ties may differ); the speed-up is shown. Needs a faiss GPU build;
  without one the row says so and nothing is measured.

The table files live in ``--tmp`` (default: $TMPDIR); the default sizes need about 52 GB there.
Every conversion verifies 256 rows against float64 (``convert_table``'s own check). Medians of
``max(2, samples // 2)`` rounds. Exits with status 2 and a message when no GPU is usable.

Usage: python bench/bench_gpu.py [--quick] [--json PATH] [--tmp DIR] [--threads N] [--only CFG,...]
"""

from __future__ import annotations

import argparse
import json
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
    random_weights,
    time_gpu_interleaved,
    timing_from_samples,
)


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


def _registry(path: Path, dim: int, hidden: int, rng: np.random.Generator) -> Any:
    """Versions 0 and 1 of ``dim``; B_1 an affine map (``hidden`` 0) or dim -> hidden (GELU) -> dim."""
    from bc_fast import Layer
    from bc_fast.store.registry import Registry

    reg = Registry.create(path)
    reg.add_version(dim=dim)
    if hidden:
        (w1, b1), (w2, b2) = random_weights(rng, hidden, dim), random_weights(rng, dim, hidden)
        reg.add_version(dim=dim, backward=[Layer(w1, b1, "gelu"), Layer(w2, b2)])
    else:
        reg.add_version(dim=dim, backward=random_weights(rng, dim, dim))
    return reg


def _write_table(path: Path, rows: int, dim: int, rng: np.random.Generator) -> None:
    """An N x dim float16 .npy table of random rows, written block by block."""
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(rows, dim))
    block = rng.standard_normal((min(rows, 1 << 18), dim), dtype=np.float32).astype(np.float16)
    for s in range(0, rows, len(block)):
        mm[s:s + len(block)] = block[: rows - s]
    mm.flush()
    del mm


def _storage_stages(table: Path, out: Path, chunk_rows: int) -> dict[str, float]:
    """Seconds of each storage stage alone, as the conversion does it: the table read chunk by chunk into
    one buffer, and the same bytes written chunk by chunk into a .npy and fdatasync-ed (bench_convert's)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_convert import _write_stage, read_stage

    from bc_fast.store.tables import open_table

    reader = open_table(str(table))
    try:
        chunks = reader.chunks(chunk_rows)
        buf = np.empty((max(c.rows for c in chunks), reader.dim), reader.dtype)
        with Stopwatch() as read:
            read_stage(reader, chunks, buf)
    finally:
        reader.close()
    y = np.random.default_rng(0).standard_normal((chunk_rows, buf.shape[1]), dtype=np.float32).astype(buf.dtype)
    os.sync()  # no dirty pages of earlier steps written back during this one
    with Stopwatch() as write:
        _write_stage(str(table), str(out), y, chunk_rows, reader.n_rows)
    os.unlink(out)
    return {"read": read.wall, "write": write.wall}


#: config: (dim, hidden width of the MLP or 0 for an affine map, rows (default, quick), CPU rows (default, quick))
CONVERT = {
    "convert_host": (256, 0, (50_000_000, 4_000_000), (10_000_000, 4_000_000)),
    "convert_mlp": (768, 3072, (8_000_000, 1_000_000), (400_000, 100_000)),
}


def bench_convert(name: str, samples: int, quick: bool, tmp: Path, threads: int | None) -> dict:
    """``convert_table(device="cuda")`` against the storage bound (the read and the write+fdatasync of the
    same bytes, each alone, in the same run, round-robin with it) and against ``device="cpu"``."""
    from bc_fast.convert import convert_table
    from bc_fast.convert.job import _default_chunk_rows

    dim, hidden, sizes, cpu_sizes = CONVERT[name]
    q = 1 if quick else 0
    rows, cpu_rows = sizes[q], min(sizes[q], cpu_sizes[q])
    rng = np.random.default_rng(3)
    work = Path(tempfile.mkdtemp(prefix="bc_fast_gpu_bench.", dir=tmp))
    try:
        reg = _registry(work / "reg", dim, hidden, rng)
        table = work / "v1.npy"
        with Stopwatch() as sw:
            _write_table(table, rows, dim, rng)
        print(f"# {name}: wrote the {rows:,}-row input in {sw.wall:.1f}s", flush=True)

        def convert(device: str, src: Path) -> float:
            out = work / f"v0_{device}.npy"
            os.sync()
            with Stopwatch() as t:  # convert_table verifies 256 rows against float64
                convert_table(src, out, registry=reg, dst=0, device=device, progress=False, threads=threads)
            os.unlink(out)
            os.unlink(str(out) + ".bcfast.json")
            return t.wall

        chunk = _default_chunk_rows(dim, 2, dim, 2, "npy", "cuda")
        runs: dict[str, list[float]] = {"bc_fast": [], "read": [], "write": []}
        for _ in range(max(2, samples // 2)):  # round-robin
            runs["bc_fast"].append(convert("cuda", table))
            for stage, t in _storage_stages(table, work / "stage.npy", chunk).items():
                runs[stage].append(t)
        med = {k: timing_from_samples(v, 0.0).median_s for k, v in runs.items()}
        cpu_src = table
        if cpu_rows < rows:
            cpu_src = work / "v1_cpu.npy"
            np.save(cpu_src, np.load(table, mmap_mode="r")[:cpu_rows])
        cpu_rps = cpu_rows / convert("cpu", cpu_src)
        gpu_rps = rows / med["bc_fast"]
        slowest = max(("read", "write"), key=lambda k: med[k])
        bound_rps = rows / med[slowest]
        # The target: the storage bound where the transform is light, the CPU path where it is heavy.
        storage = check("vs storage bound", gpu_rps / bound_rps, 0.8, "≥ 0.8x rows / max(read, write)",
                        f"{gpu_rps / bound_rps:.2f}x the {slowest} bound ({bound_rps / 1e6:.2f} M rows/s)")
        cpu = check("vs CPU path", gpu_rps / cpu_rps, 5.0, "≥ 5x device=cpu",
                    f"{gpu_rps / cpu_rps:.2f}x cpu ({cpu_rps / 1e6:.3f} M rows/s)")
        (storage if hidden else cpu).update(status="INFO", shown_target="(shown)")
        times = {"bc_fast": med["bc_fast"], "read": med["read"], "write": med["write"],
                 "cpu_path": rows / cpu_rps}
        step = f"{dim}->{hidden} (GELU)->{dim} MLP" if hidden else f"{dim}->{dim} affine"
        return _record(name, rows, times, [storage, cpu], None,
                       f"fp16 .npy {step} -> fp16, {gpu_rps / 1e6:.2f} M rows/s, chunk {chunk:,} rows; "
                       f"cpu on {cpu_rows:,} rows, scaled")
    finally:
        shutil.rmtree(work, ignore_errors=True)


#: index_search: (rows, queries) for (default, quick)
INDEX_SEARCH = ((2_000_000, 10_000), (500_000, 2_000))


def bench_index_search(samples: int, quick: bool) -> dict:
    """A legacy Flat index built and searched on the GPU (faiss GPU build) against the same on the CPU."""
    from bc_fast.index import build_legacy_index
    from bc_fast.index.faiss_utils import _faiss_gpu

    rows, nq = INDEX_SEARCH[1 if quick else 0]
    try:
        _faiss_gpu("cuda")
    except (ImportError, RuntimeError) as e:
        skipped = check("GPU index", None, 1, "(not run)", f"skipped: no faiss GPU build here: {e}")
        return _record("index_search", 0, {"bc_fast": float("nan")}, [skipped], None,
                       "GPU legacy index not measured")
    rng = np.random.default_rng(5)
    work = Path(tempfile.mkdtemp(prefix="bc_fast_gpu_index."))
    try:
        reg = _registry(work / "reg", 256, 0, rng)
        table = rng.standard_normal((rows, 256), dtype=np.float32)
        queries = rng.standard_normal((nq, 256), dtype=np.float32)
        built = {}
        for device in ("cpu", "cuda"):
            with Stopwatch() as sw:
                built[device] = build_legacy_index(reg, table, 0, factory="Flat", normalize=True, device=device)
            print(f"# index_search: built the {device} index of {rows:,} rows in {sw.wall:.1f}s", flush=True)
        runs: dict[str, list[float]] = {"cpu": [], "cuda": []}
        found = {}
        for _ in range(max(2, samples // 2)):  # round-robin
            for device, index in built.items():
                with Stopwatch() as sw:
                    found[device] = index.search(queries, 10, query_version=1)[1]
                runs[device].append(sw.wall)
        med = {k: timing_from_samples(v, 0.0).median_s for k, v in runs.items()}
        same = float(np.mean(found["cuda"] == found["cpu"]))
        ids = check("same ids as the CPU index", same, 0.99, "≥ 99 % of the top-10 ids",
                    f"{100 * same:.2f} % of the ids")
        if same < 0.99:
            ids["status"] = "FAIL"  # a wrong answer, not a slow one
        speed = check("vs CPU index", med["cpu"] / med["cuda"], 1.0, "(shown)",
                      f"{med['cpu'] / med['cuda']:.1f}x the CPU index ({nq / med['cuda']:,.0f} queries/s)")
        speed["status"] = "INFO"
        return _record("index_search", rows, {"bc_fast": med["cuda"], "cpu_index": med["cpu"]}, [ids, speed], None,
                       f"Flat, cosine, {nq:,} queries of version 1, top 10")
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
        (name, lambda name=name: bench_convert(name, samples, args.quick, args.tmp, args.threads)) for name in CONVERT
    ] + [("index_search", lambda: bench_index_search(samples, args.quick))]
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
    targets = [c for c in checks if c["status"] not in ("INFO", "SKIP")]
    print(f"# {sum(c['status'] == 'PASS' for c in targets)}/{len(targets)} targets met; wall {total.wall:.0f}s")
    if args.json:
        args.json.write_text(json.dumps({"device": props.name, "copy_bandwidth": bw, "results": results}, indent=1,
                                        default=str))
    return 1 if any(c["status"] == "FAIL" for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
