"""The compiled routed operator (local adapters) against a plain affine map and the same map in numpy.

    python bench/bench_routed.py [--quick] [--threads N] [--json PATH]

A routed map 384 -> 384 with k = 16 clusters, m = 2 blended per row (bc_fast.engine.routed.RoutedTransform),
at batch 1 and on a large batch (200k rows; --quick 50k), float32 in, preallocated float32 out:

- ``bc_fast``: the core's RoutedOp (scores as one GEMM, top-m, each cluster's rows as one GEMM, the blend);
- ``affine``: one affine map of the same shape (FusedTransform): the speed a routed map is held to
  (each routed row runs m maps, so 1/m of it is the bound);
- ``numpy``: the same routed map in numpy float32 (scores into a preallocated buffer, argpartition, one GEMM
  per cluster and slot), what a user would write instead.

Checks (issue 27): batch 1 <= 10 us per query; large batches >= 0.5x the affine map's rows/s. A routed row
costs m d_out d_in + k d_in multiply-adds against the affine map's d_out d_in, so at equal GEMM speed the
large batch is bounded by d_out / (m d_out + k) = 0.49x (printed in the note).
Errors are against the float64 reference (RoutedTransform.reference). Harness: bc_fast.bench.harness.
"""

from __future__ import annotations

import sys

import numpy as np

from bc_fast import FusedTransform
from bc_fast.bench.harness import (
    Bench,
    check,
    result,
    run_configs,
    script_args,
    speedup_check,
)
from bc_fast.engine.routed import RoutedTransform

D, K, M = 384, 16, 2


def _numpy_routed(op: RoutedTransform, x: np.ndarray, out: np.ndarray, scores: np.ndarray) -> None:
    np.matmul(x, op.score_weight.T, out=scores)
    scores += op.score_bias
    idx = np.argsort(-scores, axis=1, kind="stable")[:, : op.m]
    top = np.take_along_axis(scores, idx, axis=1)
    w = np.exp((top - top[:, :1]) / op.temperature)
    w /= w.sum(axis=1, keepdims=True)
    out[:] = 0
    for j in range(op.m):
        for c in np.unique(idx[:, j]):
            rows = np.nonzero(idx[:, j] == c)[0]
            out[rows] += w[rows, j, None] * (x[rows] @ op.weight[c].T + op.bias[c])


def cfg_routed(bench: Bench, n: int) -> dict:
    """Routed 384 -> 384 (k 16, m 2) on ``n`` rows vs one affine map and numpy."""
    rng = bench.rng
    centroids = rng.standard_normal((K, D), dtype=np.float32)
    weight = (rng.standard_normal((K, D, D), dtype=np.float32) / np.float32(np.sqrt(D)))
    bias = rng.standard_normal((K, D), dtype=np.float32) * np.float32(0.1)
    op = RoutedTransform.from_centroids(centroids, weight, bias, M, 3.0)
    affine = FusedTransform.affine(weight[0], bias[0])
    pool = bench.buf.get("x", (max(n, 4096), D), random=True)
    y = bench.buf.get("out", (n, D))
    scores = bench.buf.get("scores", (n, K))
    large = n > 1
    if large:
        x = pool[:n]
        impls = {"bc_fast": lambda: op.apply(x, out=y, threads=bench.threads),
                 "affine": lambda: affine.apply(x, out=y, threads=bench.threads),
                 "numpy": lambda: _numpy_routed(op, x, y, scores)}
    else:  # a different query each call: every cluster's map in play, as when serving
        rows = [pool[i:i + 1] for i in range(4096)]
        state = {"i": 0}

        def step(fn):
            def call() -> None:
                i = state["i"] = (state["i"] + 1) & 4095
                fn(rows[i])
            return call
        impls = {"bc_fast": step(lambda q: op.apply(q, out=y, threads=bench.threads)),
                 "affine": step(lambda q: affine.apply(q, out=y, threads=bench.threads)),
                 "numpy": step(lambda q: _numpy_routed(op, q, y, scores))}
    t = bench.measure(impls, large=large, min_calls=200 if not large else 1)
    x_chk = pool[: min(n, 2048)]
    got = op.apply(x_chk)
    ref = op.reference(x_chk)
    err = float(np.max(np.abs(got - ref)))
    if large:
        checks = [speedup_check("vs affine", t, "affine", 0.5, shown_target="≥ 0.5x one affine map's rows/s"),
                  speedup_check("vs numpy", t, "numpy", 1.0)]
    else:
        us = t["bc_fast"].median_s * 1e6
        checks = [check("latency", 10.0 / us, 1.0, "≤ 10 µs per query", f"{us:.2f} µs"),
                  speedup_check("vs numpy", t, "numpy", 1.0)]
    return result(f"routed_{D}_k{K}_m{M}_b{n}", f"routed {D}->{D}, k={K}, m={M}, batch {n:,}, fp32 in/out", n, t,
                  checks, flops_per_call=2.0 * n * D * (M * D + K), err=err,
                  note=f"affine: one map of the same shape (a routed row runs m of them); at equal GEMM speed "
                       f"the routed map runs at most {D / (M * D + K):.3f}x its rows/s")


def main(argv: list[str] | None = None) -> int:
    args = script_args(__doc__, argv, quick_help="a 50,000-row large batch")
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    n_large = {"tiny": 2_000, "quick": 50_000, "full": 200_000}[mode]
    run_configs("bench_routed", [(cfg_routed, (1,)), (cfg_routed, (n_large,))], threads=args.threads, mode=mode,
                json_path=args.json, describe=f"mode={mode}: batch 1 and {n_large:,} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
