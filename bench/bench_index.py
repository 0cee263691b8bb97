"""Legacy-version faiss index: query-time transform overhead, BLAS threshold, build throughput.

    python bench/bench_index.py [--quick] [--threads N] [--json PATH] [--n 100000] [--d 128] [--build-n 500000]

1. ``index_overhead_b{1,256}``: a flat IP index of ``--n`` version-0 vectors (d=128),
   queried with latest-version (v2) vectors transformed on the fly by the fused core
   (``LegacyIndex.search(q, 10, query_version=2)``, ``bc_fast``) vs faiss searching
   precomputed version-0 vectors (``faiss_search``, ``index.search(q, 10, D=, I=)``
   into preallocated outputs, same BLAS threshold). Target: < 5 % overhead. Also
   timed: the same two on a 16-vector index (``*_tiny16``: what the wrapper adds
   when search itself costs ~µs) and the transform alone (``transform_only``).
2. ``blas_threshold_b{nq}``: flat search on faiss's SIMD loop vs its BLAS path for
   1..256 queries. faiss 1.15 takes the SIMD loop when ``n_queries * d < threshold``
   (default 128000); bc_fast sets ``DEFAULT_BLAS_MIN_QUERIES * d``. The row's bc_fast
   column is the path bc_fast's threshold picks; check: no slower than faiss's default.
3. ``build``: ``build_legacy_index`` from a ``--build-n`` row latest table (chunked,
   fused, one reused buffer) vs the reference code's way: convert the whole table
   step by step with numpy (into two preallocated table-sized buffers) and
   ``index.add``. Check: fused no slower.

``LegacyIndex.search`` allocates its ``(D, I)`` (its API has no ``out=``), so the
overhead is measured against a baseline that does not. Harness: :mod:`bc_fast.bench.harness`.
"""

from __future__ import annotations

import math
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from bc_fast.bench.harness import (
    TINY_PLAN, Bench, Config, TimingPlan, check, result, run_configs, script_args, speedup_check,
)
from bc_fast.index import blas_threshold, blas_threshold_for, build_legacy_index
from bc_fast.store.registry import Registry

K = 2  # versions 0..2: queries and table at version 2, index at version 0


def _registry(path: Path, d: int, rng: np.random.Generator) -> Registry:
    reg = Registry.create(path)
    reg.add_version(dim=d)
    for _ in range(K):
        reg.add_version(dim=d, backward=((rng.standard_normal((d, d)) / math.sqrt(d)).astype(np.float32),
                                         (rng.standard_normal(d) * 0.1).astype(np.float32)))
    return reg


def _searcher(index, q: np.ndarray, k: int, thr: int):
    """faiss ``index.search`` of ``q`` into preallocated ``D, I`` under BLAS threshold ``thr``."""
    D, I = np.empty((len(q), k), np.float32), np.empty((len(q), k), np.int64)

    def search() -> None:
        with blas_threshold(thr):
            index.search(q, k, D=D, I=I)
    return search


def cfg_overhead(bench: Bench, reg: Registry, legacy, tiny, d: int, nq: int) -> dict:
    """Query-time transform + search vs search of precomputed old-version queries."""
    op, T = reg.operator(K, 0), bench.threads
    q_latest = bench.rng.standard_normal((nq, d), dtype=np.float32)
    q_v0 = op.apply(q_latest)
    qbuf = np.empty_like(q_v0)
    thr = blas_threshold_for(d)
    impls = {"bc_fast": lambda: legacy.search(q_latest, 10, query_version=K, threads=T),
             "faiss_search": _searcher(legacy.index, q_v0, 10, thr),
             "bc_fast_tiny16": lambda: tiny.search(q_latest, 10, query_version=K, threads=T),
             "faiss_search_tiny16": _searcher(tiny.index, q_v0, 10, thr),
             "transform_only": lambda: op.apply(q_latest, out=qbuf, threads=T)}
    t = bench.measure(impls, large=nq > 16)
    added_us = (t["bc_fast_tiny16"].median_s - t["faiss_search_tiny16"].median_s) * 1e6
    checks = [speedup_check("overhead < 5 %", t, "faiss_search", 1 / 1.05,
                            shown_target="≤ 5 % overhead (≥ 0.952x)")]
    return result(f"index_overhead_b{nq}", f"flat IP index {legacy.ntotal:,} x {d}, k=10, batch {nq}: "
                  "transform on the fly + search vs search", nq, t, checks,
                  note=f"on a 16-vector index the wrapper (transform, checks, threshold) adds {added_us:.2f} µs; "
                       "LegacyIndex.search allocates D, I (no out= in its API), faiss_search does not")


def cfg_blas_threshold(bench: Bench, reg: Registry, legacy, d: int, nq: int) -> dict:
    """faiss flat search through its SIMD loop vs its BLAS path; which one bc_fast's threshold picks."""
    q = reg.operator(K, 0).apply(bench.rng.standard_normal((nq, d), dtype=np.float32))
    impls = {"simd_loop": _searcher(legacy.index, q, 10, 10**9), "blas": _searcher(legacy.index, q, 10, 0)}
    t = bench.measure(impls, large=nq > 16)
    ours = "simd_loop" if nq * d < blas_threshold_for(d) else "blas"
    default = "simd_loop" if nq * d < 128000 else "blas"
    v = t[default].median_s / t[ours].median_s
    checks = [check("ours vs faiss default", v, 1.0, "≥ 1x", f"{v:.2f}x faiss default {default}")]
    return result(f"blas_threshold_b{nq}", f"flat search, {nq} queries, d={d}: SIMD loop vs BLAS (bc_fast "
                  f"threshold {blas_threshold_for(d)} picks {ours})", nq, t, checks, bc=ours,
                  note=f"bc_fast column = the path bc_fast's threshold picks ({ours})")


def cfg_build(bench: Bench, reg: Registry, d: int, nb: int) -> dict:
    """build_legacy_index (chunked, fused) vs numpy step by step over the whole table, then index.add."""
    import faiss

    big = bench.buf.get("x", (nb, d), random=True)
    bufs = (bench.buf.get("pp0", (nb, d)), bench.buf.get("pp1", (nb, d)))
    steps = [layer for step in reg.chain_layers(K, 0) for layer in step]
    T = bench.threads

    def numpy_first() -> None:
        z = big
        for i, layer in enumerate(steps):  # the reference code: one step at a time, whole table in memory
            np.matmul(z, layer.weight.T, out=bufs[i % 2])
            np.add(bufs[i % 2], layer.bias, out=bufs[i % 2])
            z = bufs[i % 2]
        faiss.IndexFlatIP(d).add(z)

    impls = {"bc_fast": lambda: build_legacy_index(reg, big, 0, factory="Flat", progress=False, threads=T),
             "numpy_first": numpy_first}
    t = bench.measure(impls, large=True)
    return result("build", f"flat IP index of {nb:,} x {d} from the version-{K} table", nb, t,
                  [speedup_check("vs numpy first", t, "numpy_first", 1.0)],
                  note=f"extra memory: fused {min(nb, 65536) * d * 4 / 2**20:.0f} MiB (one chunk), "
                       f"numpy first {2 * nb * d * 4 / 2**20:.0f} MiB (two whole tables)")


def main(argv: list[str] | None = None) -> int:
    def extra(p) -> None:
        p.add_argument("--n", type=int, default=100_000, help="vectors in the index")
        p.add_argument("--d", type=int, default=128, help="dimension")
        p.add_argument("--build-n", type=int, default=500_000, help="rows of the latest table for the build test")

    args = script_args(__doc__, argv, quick_help="fewer samples, 200,000-row build table", extra=extra)
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    n, d = (2000, 32) if args.tiny else (args.n, args.d)
    nb = 5000 if args.tiny else min(args.build_n, 200_000) if args.quick else args.build_n
    plan = TINY_PLAN if args.tiny else TimingPlan(2.0, (3, 5), 15 if args.quick else 40)

    def configs(bench: Bench) -> Iterator[Config]:
        with tempfile.TemporaryDirectory() as tmp:
            reg = _registry(Path(tmp) / "reg", d, bench.rng)
            table = bench.rng.standard_normal((n, d), dtype=np.float32)
            legacy = build_legacy_index(reg, table, 0, factory="Flat", metric="ip", progress=False)
            tiny = build_legacy_index(reg, table[:16], 0, progress=False)
            for nq in (1, 256):
                yield cfg_overhead, (reg, legacy, tiny, d, nq)
            for nq in (1, 2, 3, 4, 8, 16, 64, 256):
                yield cfg_blas_threshold, (reg, legacy, d, nq)
            del legacy
            yield cfg_build, (reg, d, nb)

    run_configs("bench_index", configs, threads=args.threads, plan=plan, mode=mode, json_path=args.json,
                describe=f"mode={mode}: index {n:,} x {d} flat IP, build table {nb:,} rows; {plan.describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
