"""GPU pipeline benchmark of bc_fast: whole-table conversion on the GPU, against storage and the CPU.

The kernels themselves (fused layers, GEMMs, batch 1) against torch eager and torch.compile are
``bench/gpu_kernels.py``; ``bench/gpu_check.sh`` runs both.

Configs (rows: default / --quick), each ``convert_table(..., device="cuda")`` of a float16 ``.npy``
table into a float16 table, timed round-robin with the two storage stages alone, as the conversion does
them: the table read chunk by chunk into one buffer (from the page cache, as the conversion reads it),
and the same bytes written chunk by chunk and fdatasync-ed. The storage bound is
``rows / max(read, write)``. ``device="cpu"`` converts the same rows, or a prefix of them, in the same
rounds; its rate is scaled to the full rows, and the rows it ran on are stated in the report and the JSON
(``cpu_rows``).

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
Every conversion verifies 256 rows against float64 (``convert_table``'s own check). Each measured thing
(GPU conversion, read, write, CPU conversion; GPU and CPU search) runs once untimed, then
``max(3, samples // 2)`` rounds with the order rotated each round; medians. The header and the JSON
carry the machine (CPU model, load average, libraries: the storage, CPU-path and host stages depend on
the host), and the JSON (rewritten atomically after every config) names the ``planned`` configs and
says whether the run is ``complete``; ``--only`` or a failing config makes it ``partial``. Exits with
status 2 and a message when no GPU is usable, 1 when a config failed.

Usage: python bench/bench_gpu.py [--quick] [--json PATH] [--tmp DIR] [--threads N] [--only CFG,...]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bc_fast._util.fileio import atomic_write_json
from bc_fast.bench.harness import (
    Stopwatch,
    check,
    fmt_time,
    kv_line,
    machine_info,
    machine_lines,
    numpy_blas_threads,
    random_weights,
    run_status,
    status_line,
    time_gpu_interleaved,
    time_rounds,
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
            note: str = "", **extra: Any) -> dict:
    """One config's record; ``loadavg1`` is the host's load when it finished (host stages depend on it)."""
    return {"config": name, "rows": rows, "median_s": times, "checks": checks, "max_rel_err": err, "note": note,
            "loadavg1": os.getloadavg()[0], **extra}


def rounds_of(samples: int) -> int:
    """Timed rounds of the self-timed configs: at least 3, so a median is not the mean of two runs."""
    return max(3, samples // 2)


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


def _read_stage_s(table: Path, chunk_rows: int) -> float:
    """Seconds of the read stage alone, as the conversion does it: the table read chunk by chunk into one
    buffer (from the page cache; bench_convert's ``read_stage``)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_convert import read_stage

    from bc_fast.store.tables import open_table

    reader = open_table(str(table))
    try:
        chunks = reader.chunks(chunk_rows)
        buf = np.empty((max(c.rows for c in chunks), reader.dim), reader.dtype)
        with Stopwatch() as read:
            read_stage(reader, chunks, buf)
    finally:
        reader.close()
    return read.wall


def _write_stage_s(table: Path, out: Path, chunk_rows: int) -> float:
    """Seconds of the write stage alone: the table's bytes written chunk by chunk from one touched buffer into
    a .npy and fdatasync-ed (bench_convert's ``_write_stage``), starting with no dirty pages."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_convert import _write_stage

    from bc_fast.store.tables import open_table

    reader = open_table(str(table))
    rows, dim, dtype = reader.n_rows, reader.dim, reader.dtype
    reader.close()
    y = np.random.default_rng(0).standard_normal((chunk_rows, dim), dtype=np.float32).astype(dtype)
    os.sync()  # no dirty pages of earlier steps written back during this one
    with Stopwatch() as write:
        _write_stage(str(table), str(out), y, chunk_rows, rows)
    os.unlink(out)
    return write.wall


def _convert_s(reg: Any, src: Path, out: Path, device: str, threads: int | None) -> float:
    """Seconds of one ``convert_table`` (it verifies 256 rows against float64), starting with no dirty pages."""
    from bc_fast.convert import convert_table

    os.sync()
    with Stopwatch() as t:
        convert_table(src, out, registry=reg, dst=0, device=device, progress=False, threads=threads)
    os.unlink(out)
    os.unlink(str(out) + ".bcfast.json")
    return t.wall


def _prefix_table(table: Path, rows: int, work: Path) -> Path:
    """``table`` itself, or a copy of its first ``rows`` rows (the CPU path's input)."""
    if rows >= len(np.load(table, mmap_mode="r")):
        return table
    dst = work / "v1_cpu.npy"
    np.save(dst, np.load(table, mmap_mode="r")[:rows])
    return dst


#: config: (dim, hidden width of the MLP or 0 for an affine map, rows (default, quick), CPU rows (default, quick))
CONVERT = {
    "convert_host": (256, 0, (50_000_000, 4_000_000), (10_000_000, 4_000_000)),
    "convert_mlp": (768, 3072, (8_000_000, 1_000_000), (400_000, 100_000)),
}


def bench_convert(name: str, samples: int, quick: bool, tmp: Path, threads: int | None) -> dict:
    """``convert_table(device="cuda")`` against the storage bound (the read and the write+fdatasync of the
    same bytes, each alone) and against ``device="cpu"`` (on ``cpu_rows``, scaled), all in the same
    rotating rounds after one untimed warm-up each (:func:`time_rounds`)."""
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
        cpu_src = _prefix_table(table, cpu_rows, work)
        chunk = _default_chunk_rows(dim, 2, dim, 2, "npy", "cuda")
        runs = time_rounds({
            "bc_fast": lambda: _convert_s(reg, table, work / "v0_cuda.npy", "cuda", threads),
            "read": lambda: _read_stage_s(table, chunk),
            "write": lambda: _write_stage_s(table, work / "stage.npy", chunk),
            "cpu_path": lambda: _convert_s(reg, cpu_src, work / "v0_cpu.npy", "cpu", threads),
        }, rounds_of(samples))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: timing_from_samples(v, 0.0).median_s for k, v in runs.items()}
    return _convert_record(name, rows, cpu_rows, med, chunk, len(runs["bc_fast"]))


def _convert_record(name: str, rows: int, cpu_rows: int, med: dict[str, float], chunk: int, rounds: int) -> dict:
    """convert_host / convert_mlp's record from the medians: the storage bound and the CPU path checks."""
    dim, hidden = CONVERT[name][:2]
    cpu_rps = cpu_rows / med["cpu_path"]
    gpu_rps = rows / med["bc_fast"]
    slowest = max(("read", "write"), key=lambda k: med[k])
    bound_rps = rows / med[slowest]
    scaled = "" if cpu_rows == rows else f", scaled from {cpu_rows:,} rows"
    # The target: the storage bound where the transform is light, the CPU path where it is heavy.
    storage = check("vs storage bound", gpu_rps / bound_rps, 0.8, "≥ 0.8x rows / max(read, write)",
                    f"{gpu_rps / bound_rps:.2f}x the {slowest} bound ({bound_rps / 1e6:.2f} M rows/s)")
    cpu = check("vs CPU path", gpu_rps / cpu_rps, 5.0, "≥ 5x device=cpu",
                f"{gpu_rps / cpu_rps:.2f}x cpu ({cpu_rps / 1e6:.3f} M rows/s on {cpu_rows:,} rows)")
    (storage if hidden else cpu).update(status="INFO", shown_target="(shown)")
    times = {"bc_fast": med["bc_fast"], "read": med["read"], "write": med["write"], "cpu_path": rows / cpu_rps}
    step = f"{dim}->{hidden} (GELU)->{dim} MLP" if hidden else f"{dim}->{dim} affine"
    return _record(name, rows, times, [storage, cpu], None,
                   f"fp16 .npy {step} -> fp16, {gpu_rps / 1e6:.2f} M rows/s, chunk {chunk:,} rows; cpu_path: "
                   f"device=cpu on {cpu_rows:,} rows{scaled}; medians of {rounds} rotating rounds after a warm-up",
                   cpu_rows=cpu_rows, rounds=rounds)


#: index_search: (rows, queries) for (default, quick)
INDEX_SEARCH = ((2_000_000, 10_000), (500_000, 2_000))


def _timed_search(index: Any, queries: np.ndarray, found: dict[str, np.ndarray], key: str) -> Callable[[], float]:
    """A self-timed top-10 search of ``queries`` (for :func:`time_rounds`); its ids go to ``found[key]``."""
    def run() -> float:
        with Stopwatch() as sw:
            found[key] = index.search(queries, 10, query_version=1)[1]
        return sw.wall
    return run


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
        found: dict[str, np.ndarray] = {}
        runs = time_rounds({device: _timed_search(index, queries, found, device) for device, index in built.items()},
                           rounds_of(samples))
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
                       f"Flat, cosine, {nq:,} queries of version 1, top 10; medians of {len(runs['cuda'])} "
                       "rotating rounds after a warm-up", rounds=len(runs["cuda"]))
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


#: every config, in running order
CONFIGS = (*CONVERT, "index_search")


def _args(argv: list[str] | None) -> argparse.Namespace:
    """The options; ``planned`` (the configs to run, ``--only``'s or all) checked by name before any GPU work."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--quick", action="store_true", help="smaller sizes and fewer samples (about a minute)")
    p.add_argument("--json", type=Path, default=None,
                   help="also write the machine, every timing and check as JSON (rewritten after every config)")
    p.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()),
                   help="folder for convert_host's table files (default: $TMPDIR)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for convert_host's device=cpu run (default: all cores)")
    p.add_argument("--only", default=None, help=f"comma-separated config names to run (default: all of "
                                                f"{', '.join(CONFIGS)})")
    args = p.parse_args(argv)
    args.planned = list(dict.fromkeys(n for n in args.only.split(",") if n)) if args.only else list(CONFIGS)
    unknown = [n for n in args.planned if n not in CONFIGS]
    if unknown:
        p.error(f"unknown config(s) {', '.join(unknown)}; known: {', '.join(CONFIGS)}")
    return args


def _machine(args: argparse.Namespace) -> dict:
    """The harness's machine facts (CPU model, load average, libraries, thread pools) for the header and JSON."""
    from bc_fast.engine import build_info

    return machine_info({"bench_threads": args.threads or build_info().get("max_threads"),
                         "numpy_blas_threads": numpy_blas_threads(), "mode": "quick" if args.quick else "full"})


def _header(torch: Any, mod: Any, info: dict, quick: bool) -> str:
    """The device line (GPU, driver, torch) of the report's header; the machine lines follow it."""
    props = torch.cuda.get_device_properties(0)
    cu = mod.device_info()
    return (f"# bench_gpu ({'quick' if quick else 'full'}): {props.name}, {props.total_memory / 2**30:.0f} GiB, "
            f"cc {props.major}.{props.minor}, driver {cu['driver_version']}, runtime {cu['runtime_version']}, "
            f"torch {torch.__version__} (CUDA {torch.version.cuda}); host {info['cpu_model']}, "
            f"loadavg {info['loadavg']}")


def _run_one(name: str, fn: Callable[[], dict]) -> dict:
    """One config's record; a config that raises gives a FAIL record with its error (the others still run)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - one failing config must not hide the others' numbers
        msg = f"{type(e).__name__}: {e}"
        r = _record(name, 0, {"bc_fast": float("nan")}, [check("ran", None, 1, "runs", f"ERROR: {msg}")], None,
                    error=msg)
        r["checks"][0]["status"] = "FAIL"
        return r


def _print_record(r: dict) -> None:
    """One parseable line per timing and per check."""
    for k, v in r["median_s"].items():
        print(kv_line(config=r["config"], impl=k, rows=r["rows"], median_us=v * 1e6), flush=True)
    for c in r["checks"]:
        print(kv_line(config=r["config"], check=c["label"], value=c["value"], target=c["target"],
                      status=c["status"]), flush=True)


def _status(planned: list[str], results: list[dict], finished: bool) -> dict:
    """:func:`run_status` of the run so far (``--only`` leaves the other configs out: partial)."""
    return run_status(planned, [r["config"] for r in results if "error" not in r],
                      [r["config"] for r in results if "error" in r], finished=finished, known=CONFIGS)


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    torch, _, mod = _setup()
    samples = 5 if args.quick else 11
    info = _machine(args)
    print(_header(torch, mod, info, args.quick), flush=True)
    for line in machine_lines(info):
        print(line, flush=True)
    results: list[dict] = []
    state: dict[str, Any] = {"device": torch.cuda.get_device_properties(0).name, "machine": info,
                             "copy_bandwidth": None, "samples": samples, "rounds": rounds_of(samples),
                             "results": results}

    def save(finished: bool) -> None:  # atomically, after every config: a crash keeps what was measured
        if args.json:
            atomic_write_json(args.json, {**state, **_status(args.planned, results, finished)})

    save(False)
    total = Stopwatch().__enter__()
    state["copy_bandwidth"] = bw = bench_copy_bandwidth(torch, samples)
    print(f"# device-to-device copy bandwidth: {bw / 1e9:.0f} GB/s (read + write)", flush=True)
    fns: dict[str, Callable[[], dict]] = {
        **{n: (lambda n=n: bench_convert(n, samples, args.quick, args.tmp, args.threads)) for n in CONVERT},
        "index_search": lambda: bench_index_search(samples, args.quick)}
    for name in args.planned:
        cfg = Stopwatch().__enter__()
        results.append(_run_one(name, fns[name]))
        torch.cuda.empty_cache()
        _print_record(results[-1])
        cfg.__exit__()
        print(f"# {name} done in {cfg.wall:.1f}s", flush=True)
        save(False)
    save(True)
    total.__exit__()
    print()
    print(table(results))
    checks = [c for r in results for c in r["checks"]]
    targets = [c for c in checks if c["status"] not in ("INFO", "SKIP")]
    print(f"# {sum(c['status'] == 'PASS' for c in targets)}/{len(targets)} targets met; wall {total.wall:.0f}s; "
          f"host loadavg now {' '.join(f'{v:.2f}' for v in os.getloadavg())}; "
          f"{status_line(_status(args.planned, results, True))}")
    return 1 if any(c["status"] == "FAIL" for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
