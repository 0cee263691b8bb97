"""Legacy-version faiss index: query-time transform overhead, BLAS threshold, build throughput.

1. Overhead: a flat index of 100k version-0 vectors at d=128 (IP), queried with
   latest-version (v2) vectors transformed on the fly by the fused core
   (``LegacyIndex.search(q, k, query_version=2)``) vs searching with precomputed
   version-0 vectors (``index.search``). Batch 1 and 256, k=10. Target: < 5 %.
   The two are timed interleaved (ABAB...) to cancel drift on a shared machine.
2. ``distance_compute_blas_threshold``: flat search time on faiss's SIMD loop vs
   its BLAS path, for 1..256 queries. faiss 1.15 takes the SIMD loop when
   ``n_queries * d < threshold`` (default 128000: below 1000 queries at d=128);
   bc_fast sets ``DEFAULT_BLAS_MIN_QUERIES * d`` per search.
3. Build throughput (vectors/s): ``build_legacy_index`` from the latest table
   (chunked, fused, one reused buffer) vs converting the whole table with numpy
   step by step first (the reference code's way) and then ``index.add``.

One parseable line per config. Run: ``python bench/bench_index.py [--threads N]``
(about 1 minute on 2 vCPUs; on a shared, loaded box use ``--threads 1``).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time


from _common import machine_line, threads_from_argv  # noqa: E402

threads_from_argv()

import faiss  # noqa: E402
import numpy as np  # noqa: E402

from bc_fast.index import blas_threshold, blas_threshold_for, build_legacy_index  # noqa: E402
from bc_fast.registry import Registry  # noqa: E402


def interleaved(fa, fb, reps: int, with_min: bool = False) -> tuple[float, ...]:
    """Median (and optionally min) seconds of fa and fb, timed alternately."""
    for _ in range(3):
        fa(), fb()
    ta, tb = [], []
    for _ in range(reps):
        t = time.perf_counter()
        fa()
        ta.append(time.perf_counter() - t)
        t = time.perf_counter()
        fb()
        tb.append(time.perf_counter() - t)
    if with_min:
        return statistics.median(ta), statistics.median(tb), min(ta), min(tb)
    return statistics.median(ta), statistics.median(tb)


def median_time(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--build-n", type=int, default=500_000, help="rows of the latest table for the build test")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    print(machine_line(f", faiss {faiss.__version__} (omp threads {faiss.omp_get_max_threads()})"))
    rng = np.random.default_rng(0)
    n, d, K = args.n, args.d, 2
    with tempfile.TemporaryDirectory() as tmp:
        reg = Registry.create(os.path.join(tmp, "reg"))
        reg.add_version(dim=d)
        for _ in range(K):
            reg.add_version(dim=d, backward=((rng.standard_normal((d, d)) / math.sqrt(d)).astype(np.float32),
                                             (rng.standard_normal(d) * 0.1).astype(np.float32)))
        op = reg.operator(K, 0)
        table = rng.standard_normal((n, d)).astype(np.float32)
        legacy = build_legacy_index(reg, table, 0, factory="Flat", metric="ip", progress=False)

        # 1. query-time overhead. Wall-clock medians of interleaved runs swing by +-10 % on a shared
        # box, far more than the transform costs, so also measure what LegacyIndex.search adds on top
        # of index.search (transform + checks + threshold) on a 16-vector index, where search is ~us.
        tiny = build_legacy_index(reg, table[:16], 0, progress=False)
        for nq in (1, 256):
            q_latest = rng.standard_normal((nq, d)).astype(np.float32)
            q_v0 = op.apply(q_latest)
            reps = 400 if nq == 1 else 40
            thr = blas_threshold_for(d)

            def plain(idx=legacy):
                with blas_threshold(thr):
                    idx.index.search(q_v0, 10)

            def on_the_fly(idx=legacy):
                idx.search(q_latest, 10, query_version=K)

            t_plain, t_fly, m_plain, m_fly = interleaved(plain, on_the_fly, reps, with_min=True)
            w_plain, w_fly = interleaved(lambda: plain(tiny), lambda: on_the_fly(tiny), 2000)
            added = w_fly - w_plain
            t_op = median_time(lambda: op.apply(q_latest), 200)
            print(f"test=overhead index=Flat n={n} d={d} K={K} batch={nq} search_us={t_plain * 1e6:.1f} "
                  f"transform_search_us={t_fly * 1e6:.1f} overhead_pct={100 * (t_fly - t_plain) / t_plain:.2f} "
                  f"min_search_us={m_plain * 1e6:.1f} min_transform_search_us={m_fly * 1e6:.1f} "
                  f"overhead_min_pct={100 * (m_fly - m_plain) / m_plain:.2f} transform_only_us={t_op * 1e6:.2f} "
                  f"added_by_wrapper_us={added * 1e6:.2f} intrinsic_overhead_pct={100 * added / t_plain:.3f}",
                  flush=True)

        # 2. blas threshold: SIMD loop (threshold 10**9) vs BLAS (0); faiss default 128000 and ours
        prev = faiss.cvar.distance_compute_blas_threshold
        for nq in (1, 2, 3, 4, 8, 16, 64, 256):
            q = op.apply(rng.standard_normal((nq, d)).astype(np.float32))
            reps = 25 if nq <= 16 else 7
            res = {}
            for thr in (10**9, 0):
                def run(thr=thr, idx=legacy):
                    with blas_threshold(thr):
                        idx.index.search(q, 10)
                res[thr] = run
            t_simd, t_blas = interleaved(res[10**9], res[0], reps)
            t_default = t_simd if nq * d < 128000 else t_blas
            t_ours = t_simd if nq * d < blas_threshold_for(d) else t_blas
            print(f"test=blas_threshold index=Flat n={n} d={d} batch={nq} simd_loop_ms={t_simd * 1e3:.2f} "
                  f"blas_ms={t_blas * 1e3:.2f} faiss_default_ms={t_default * 1e3:.2f} "
                  f"ours_threshold={blas_threshold_for(d)} ours_ms={t_ours * 1e3:.2f} "
                  f"speedup_vs_faiss_default={t_default / t_ours:.2f}", flush=True)
        faiss.cvar.distance_compute_blas_threshold = prev

        # 3. build throughput
        del legacy
        nb = args.build_n
        big = rng.standard_normal((nb, d)).astype(np.float32)
        steps = [l for step in reg.chain_layers(K, 0) for l in step]

        def build_fused():
            return build_legacy_index(reg, big, 0, factory="Flat", progress=False)

        def build_numpy():
            z = big
            for l in steps:  # the reference code: one step at a time, whole table in memory
                z = z @ l.weight.T + l.bias
            idx = faiss.IndexFlatIP(d)
            idx.add(np.ascontiguousarray(z, dtype=np.float32))
            return idx

        times: dict[str, list[float]] = {"fused_chunked": [], "numpy_first": []}
        for _ in range(3):  # alternate the two methods; report medians
            for name, fn in (("fused_chunked", build_fused), ("numpy_first", build_numpy)):
                t = time.perf_counter()
                res = fn()
                times[name].append(time.perf_counter() - t)
                del res
        for name, ts in times.items():
            dt = statistics.median(ts)
            extra = min(nb, 65536) * d * 4 / 2**20 if name == "fused_chunked" else K * nb * d * 4 / 2**20
            print(f"test=build index=Flat rows={nb} d={d} K={K} method={name} seconds={dt:.3f} "
                  f"vectors_per_s={nb / dt:.0f} runs_s={','.join(f'{t:.2f}' for t in ts)} "
                  f"extra_peak_mb={extra:.0f}", flush=True)
        print(f"test=build_ratio fused_over_numpy_first="
              f"{statistics.median(times['numpy_first']) / statistics.median(times['fused_chunked']):.2f}")

if __name__ == "__main__":
    main()
