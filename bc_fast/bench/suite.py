"""The performance suite: bc_fast side by side with numpy, torch and faiss (issue 6).

``run_bench_suite(out_dir, quick=False)`` runs one config per issue-6 target in one
process, prints a table of medians and ratios with PASS/MISS, and writes
``bench.json`` (machine, sizes, every timing, every check) and ``bench.png`` (speed-up
ratios per config with target marks) into ``out_dir``. It never asserts: a missed
target is a MISS in the table, not an error. ``bc-fast bench [--quick] --out DIR``
and ``python bench/bench_suite.py`` call it.

Configs (d = 256 unless named; "large" = 1,000,000 rows in the full run):

====================  ==============================================================  ===========================
config                bc_fast vs                                                      target
====================  ==============================================================  ===========================
peak                  ``np.matmul`` of two square fp32 matrices into a preallocated   (measures the peak)
                      output (4096² full, 3072² quick)
affine_d{128,256,768} numpy_sgemm ``np.matmul(x, W.T, out=y)`` (no bias; bc_fast adds ≥ 0.95x numpy_sgemm and
                      one); informational: torch ``addmm(out=)``, faiss apply_noalloc ≥ 85 % of peak GFLOP/s
l2_fp16               bias + L2 normalise + fp16 out. numpy: allocating expression,    ≥ 1.5x best numpy,
                      preallocated expression, einsum-norm and cache-blocked variants ≥ 1.5x best torch
                      (best of them counts); torch: ``F.normalize(F.linear).half()``
                      and the same into preallocated outputs (best counts)
mlp_b256, mlp_large   256→512 relu→256; torch ``addmm(out=)``, ``relu_``, ``addmm(out=)``  ≥ 1.3x best torch
                      and torch eager ``F.linear`` (best counts)
mlp_gelu_b256,        the same with exact (erf) GELU, issue 11's MLP; torch's in-place ≥ 1.3x best torch
mlp_gelu_large        form is ``torch.ops.aten.gelu_``
chain_k4              K = 4 affine 256→256 steps fused by ``fuse_chain`` (one matrix)  ≥ 3.5x best numpy
                      vs four numpy steps into preallocated buffers, and
                      ``z = z @ W.T + b`` four times (best counts); torch ``addmm(out=)``
latency_b1            batch 1, 256→256 affine, preallocated output; numpy             median ≤ 2.5 µs, ≥ 1.8x
                      ``x @ W.T + b`` and ``matmul(out=); add(out=)`` (best counts;   best numpy
                      issue 11's targets); torch ``addmm(out=)``, faiss apply_noalloc
latency_b16           batch 16, vs the faster of ``x @ W.T + b`` and                   ≤ 0.9x numpy's time
                      ``matmul(out=); add(out=)``; torch ``addmm(out=)``, faiss
                      apply_noalloc
bf16_d{256,768},      ``precision="bf16"``, bf16 and fp32 rows in and out, against torch's  see
bf16_mlp              bf16 on the same dtypes: :mod:`bc_fast.bench.suite_bf16`            :mod:`.suite_bf16`
threads_1to2          large affine 256→256, threads=1 vs threads=2 (cpu/wall shown)  ≥ 1.8x (quiet machine)
concurrency           the same large affine 256→256 split over 1, 2 and 4 Python     aggregate rows/s ≥ 0.9x
                      threads calling ``apply`` at once (one call per slice, and      one caller's, for 2 and
                      calls of 4096 rows); bc_fast against itself with one caller     for 4 callers
====================  ==============================================================  ===========================

Every baseline writes into a preallocated output where its API allows; the allocating
variants kept (``numpy_alloc``, ``torch_eager``, ...) are the reference code's way and
are never the only baseline of a check. Timing rules, engines, the table and the
report: :mod:`bc_fast.bench.harness`, the one harness shared with the bench/ scripts.
torch and faiss are optional: their columns are skipped, with a note, when they are
not installed; matplotlib too (no PNG then). bc_fast, torch, faiss and numpy's BLAS
all run with the same thread count (bc_fast's ``max_threads`` unless ``threads`` is
given).

It stays one module: every config is a short function over the same :class:`Sizes` and the table of
targets above, and splitting them would scatter that table's rows across files.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .harness import (
    Bench, Config, Timing, TimingPlan, TINY_PLAN, check, format_table, machine_info, max_abs_err, result,
    run_configs, speedup_check, time_interleaved,
)
from ..engine.fusion import apply_layers_reference, fuse_chain
from ..index.faiss_utils import faiss_linear_transform
from ..engine import FusedTransform, Layer
from .suite_bf16 import bf16_configs

__all__ = ["SIZES", "Timing", "affine_err", "affine_impls", "best_of", "format_table", "machine_info",
           "run_bench_suite", "run_bf16_bench", "suite_configs", "time_interleaved"]

# --------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class Sizes:
    """Rows of one suite mode, and how its samples are taken."""

    name: str
    affine_rows: dict  # d -> rows
    l2_rows: int
    mlp_rows: int
    chain_rows: int
    scaling_rows: int
    peak_n: int
    peak_n_inline: int  # square sgemm timed inside each affine config, interleaved with it
    plan: TimingPlan = field(default_factory=TimingPlan)
    bf16_rows: dict = field(default_factory=dict)  # d -> rows of the bf16 configs (none: not run)

    def describe(self) -> str:
        aff = ", ".join(f"d={d}: {n:,}" for d, n in self.affine_rows.items())
        return (f"mode={self.name}: affine rows {aff}; l2_fp16 {self.l2_rows:,}; mlp_large {self.mlp_rows:,}; "
                f"chain_k4 {self.chain_rows:,}; threads_1to2 and concurrency {self.scaling_rows:,}; peak sgemm {self.peak_n}² "
                f"(inside affine configs {self.peak_n_inline}²); "
                + "".join(f"bf16_d{d} {n:,}; " for d, n in self.bf16_rows.items()) + self.plan.describe())


SIZES = {
    "full": Sizes("full", {128: 1_000_000, 256: 1_000_000, 768: 1_000_000}, 1_000_000, 1_000_000, 1_000_000,
                  1_000_000, 4096, 4096, TimingPlan(40.0, (3, 7), 30, 0.002, 5, 0.15),
                  bf16_rows={256: 100_000, 768: 100_000}),
    "quick": Sizes("quick", {128: 200_000, 256: 200_000, 768: 40_000}, 65_536, 100_000, 50_000, 200_000,
                   3072, 2048, TimingPlan(2.0, (3, 5), 15, 0.002, 5, 0.1), bf16_rows={256: 50_000, 768: 20_000}),
    # tests only: seconds in total, numbers meaningless (the bf16 configs have their own tiny run)
    "tiny": Sizes("tiny", {128: 2048, 256: 2048, 768: 512}, 2048, 1024, 1024, 2048, 256, 128, TINY_PLAN),
}
BF16_TINY_ROWS = {256: 1024, 768: 256}

# --------------------------------------------------------------------------- affine baselines (one place)


def affine_impls(bench: Bench, op: FusedTransform, x: np.ndarray, y: np.ndarray, W: np.ndarray,
                 b: np.ndarray, names: tuple[str, ...], *, threads: int | None = None,
                 scratch: np.ndarray | None = None) -> dict[str, Callable[[], Any]]:
    """bc_fast and the affine baselines ``y = x @ W.T + b`` named in ``names``, all writing into ``y``.

    ``bc_fast``: ``op.apply(x, out=y)``; ``numpy_alloc``: ``x @ W.T + b`` (the reference
    code's way, allocates); ``numpy_sgemm``: ``np.matmul(x, W.T, out=y)`` (no bias);
    ``numpy_prealloc``: ``np.matmul(out=y)`` then ``np.add(out=y)``; ``torch_addmm``:
    ``torch.addmm(b, x, W.T, out=y)``; ``faiss``: ``LinearTransform.apply_noalloc`` into
    ``y``. With fp16 ``x`` (bc_fast reads it directly) the preallocated baselines first
    ``np.copyto`` it into the fp32 ``scratch`` buffer, as part of their time. Names whose
    engine is not installed are left out.
    """
    T = bench.threads if threads is None else threads
    WT = W.T
    src = x if x.dtype == np.float32 else scratch
    if src is None:
        raise ValueError(f"affine_impls: {x.dtype} input needs an fp32 scratch buffer of shape {x.shape}")

    def converting(f: Callable[[], Any]) -> Callable[[], Any]:
        if src is x:
            return f

        def convert_then_f() -> None:
            np.copyto(scratch, x)
            f()
        return convert_then_f

    def prealloc() -> None:
        np.matmul(src, WT, out=y)
        np.add(y, b, out=y)

    impls: dict[str, Callable[[], Any]] = {
        "bc_fast": lambda: op.apply(x, out=y, threads=T),
        "numpy_alloc": lambda: x.astype(np.float32, copy=False) @ WT + b,
        "numpy_sgemm": converting(lambda: np.matmul(src, WT, out=y)),
        "numpy_prealloc": converting(prealloc),
    }
    if bench.torch is not None and "torch_addmm" in names:
        torch = bench.torch
        st, yt, Wt, bt = (torch.from_numpy(a) for a in (src, y, W, b))
        impls["torch_addmm"] = converting(lambda: torch.addmm(bt, st, Wt.t(), out=yt))
    if bench.faiss is not None and "faiss" in names:
        lt = faiss_linear_transform(W, b)
        ps, py, n = bench.faiss.swig_ptr(src), bench.faiss.swig_ptr(y), len(x)
        impls["faiss"] = converting(lambda: lt.apply_noalloc(n, ps, py))
    return {k: impls[k] for k in names if k in impls}


def affine_err(y: np.ndarray, x: np.ndarray, W: np.ndarray, b: np.ndarray, rows: int = 256) -> float:
    """Max abs error of the first ``rows`` rows of ``y`` against ``x @ W.T + b`` in float64."""
    m = min(len(x), rows)
    return max_abs_err(y[:m], x[:m].astype(np.float64) @ W.T.astype(np.float64) + b)


def best_of(timings: dict[str, Timing], prefix: str | tuple[str, ...]) -> str | None:
    """The fastest implementation whose name starts with ``prefix`` (or one of several; None if none was timed)."""
    names = [k for k in timings if k.startswith(prefix)]
    return min(names, key=lambda k: timings[k].median_s) if names else None


# --------------------------------------------------------------------------- configs

def _cfg_peak(bench: Bench, sizes: Sizes) -> dict:
    n = sizes.peak_n
    a = bench.buf.get("x", (n, n), random=True)
    b = bench.buf.get("aux", (n, n), random=True)
    c = bench.buf.get("out", (n, n))
    t = bench.measure({"numpy_sgemm_square": lambda: np.matmul(a, b, out=c)}, large=True)
    flops = 2.0 * n ** 3
    bench.peak_gflops = flops / t["numpy_sgemm_square"].median_s / 1e9
    return result("peak", f"peak: numpy sgemm {n}x{n} @ {n}x{n}, fp32, preallocated out", n, t, [],
                  flops_per_call=flops, bc="numpy_sgemm_square",
                  note=f"machine peak {bench.peak_gflops:.1f} GFLOP/s (median, {bench.threads} threads)")


def _cfg_affine(bench: Bench, sizes: Sizes, d: int) -> dict:
    n = sizes.affine_rows[d]
    x = bench.buf.get("x", (n, d), random=True)
    y = bench.buf.get("out", (n, d))
    W, b = bench.weights(d, d)
    op = FusedTransform.affine(W, b)
    impls = affine_impls(bench, op, x, y, W, b, ("bc_fast", "numpy_sgemm", "torch_addmm", "faiss"))
    # the peak, interleaved with the others: load drifting on the shared box hits it alike
    q = sizes.peak_n_inline
    qa, qb = bench.buf.get("sq_a", (q, q), random=True), bench.buf.get("sq_b", (q, q), random=True)
    qc = bench.buf.get("sq_c", (q, q))
    impls["peak_sgemm"] = lambda: np.matmul(qa, qb, out=qc)
    t = bench.measure(impls, large=True)
    # the fraction uses the peak measured in the same rounds (same background load); the peak
    # config ran at another moment, and on this shared box the load drifts between configs
    peak = 2.0 * q ** 3 / t.pop("peak_sgemm").median_s / 1e9
    impls["bc_fast"]()
    flops = 2.0 * n * d * d
    gf = flops / t["bc_fast"].median_s / 1e9
    checks = [speedup_check("vs numpy sgemm", t, "numpy_sgemm", 0.95),
              check("of peak GFLOP/s", gf / peak, 0.85, "≥ 85 % peak",
                    f"{gf:.0f} GF/s = {100 * gf / peak:.0f} % of {peak:.0f} peak")]
    return result(f"affine_d{d}", f"affine {d}->{d} (+bias), fp32 -> fp32 preallocated", n, t, checks,
                  flops_per_call=flops, err=affine_err(y, x, W, b),
                  note=f"peak = numpy sgemm {q}x{q} timed in the same rounds: {peak:.1f} GFLOP/s "
                       f"(peak config: {bench.peak_gflops or 0:.1f})",
                  peak_gflops_inline=peak, peak_gflops_used=peak)


def _l2_numpy(x: np.ndarray, y32: np.ndarray, y16: np.ndarray, nrm: np.ndarray, s32: np.ndarray,
              snrm: np.ndarray, WT: np.ndarray, b: np.ndarray) -> dict[str, Callable[[], Any]]:
    """numpy ways of fp16(normalize(x @ W.T + b)): allocating, preallocated, einsum norm, cache-blocked."""
    n, blk = len(x), len(s32)

    def numpy_alloc() -> np.ndarray:
        z = x @ WT + b
        return (z / np.linalg.norm(z, axis=1, keepdims=True)).astype(np.float16)

    def numpy_prealloc() -> None:
        np.matmul(x, WT, out=y32)
        np.add(y32, b, out=y32)
        np.divide(y32, np.linalg.norm(y32, axis=1, keepdims=True), out=y32)
        y16[...] = y32

    def numpy_einsum() -> None:
        np.matmul(x, WT, out=y32)
        np.add(y32, b, out=y32)
        np.einsum("ij,ij->i", y32, y32, out=nrm)
        np.sqrt(nrm, out=nrm)
        np.divide(y32, nrm[:, None], out=y32)
        y16[...] = y32

    def numpy_blocked() -> None:  # the einsum variant on blocks that stay in cache
        for i in range(0, n, blk):
            m = min(blk, n - i)
            z, q = s32[:m], snrm[:m]
            np.matmul(x[i:i + m], WT, out=z)
            z += b
            np.einsum("ij,ij->i", z, z, out=q)
            np.sqrt(q, out=q)
            z /= q[:, None]
            y16[i:i + m] = z

    return {"numpy_alloc": numpy_alloc, "numpy_prealloc": numpy_prealloc, "numpy_einsum": numpy_einsum,
            "numpy_blocked": numpy_blocked}


def _cfg_l2(bench: Bench, sizes: Sizes) -> dict:
    d, n = 256, sizes.l2_rows
    x = bench.buf.get("x", (n, d), random=True)
    y16 = bench.buf.get("out16", (n, d), np.float16)
    y32 = bench.buf.get("out", (n, d))
    nrm = bench.buf.get("norms", (n,))
    W, b = bench.weights(d, d)
    op = FusedTransform.affine(W, b, normalize=True)
    T = bench.threads
    impls = {"bc_fast": lambda: op.apply(x, out=y16, threads=T)}
    impls.update(_l2_numpy(x, y32, y16, nrm, bench.buf.get("block", (2048, d)), bench.buf.get("block_norms", (2048,)),
                           W.T, b))
    if bench.torch is not None:
        torch, F = bench.torch, bench.F
        xt, Wt, bt, y32t, y16t, nrmt = (torch.from_numpy(a) for a in (x, W, b, y32, y16, nrm))

        def torch_prealloc() -> None:
            torch.addmm(bt, xt, Wt.t(), out=y32t)
            torch.linalg.vector_norm(y32t, dim=1, out=nrmt)
            y32t.div_(nrmt[:, None])
            y16t.copy_(y32t)
        impls["torch_alloc"] = lambda: F.normalize(F.linear(xt, Wt, bt)).half()
        impls["torch_prealloc"] = torch_prealloc
    t = bench.measure(impls, large=True)
    op.apply(x, out=y16, threads=T)
    m = min(n, 256)
    ref = x[:m].astype(np.float64) @ W.T.astype(np.float64) + b
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    best_np, best_t = best_of(t, "numpy"), best_of(t, "torch") or "torch"
    checks = [speedup_check("vs best numpy", t, best_np, 1.5), speedup_check("vs best torch", t, best_t, 1.5)]
    return result("l2_fp16", f"affine 256->256 + bias + L2 normalise, fp32 in -> fp16 out (best numpy: {best_np})",
                  n, t, checks, flops_per_call=2.0 * n * d * d, err=max_abs_err(y16[:m], ref),
                  note="allocating by definition: numpy_alloc (expression) and torch_alloc (F.linear and "
                       "F.normalize have no out=); numpy_prealloc's np.linalg.norm has no out= (allocates the "
                       "row norms, numpy_einsum does not); the rest write into preallocated outputs")


def _mlp_program(bench: Bench, activation: str) -> tuple[list[Layer], FusedTransform]:
    W1, b1 = bench.weights(512, 256)
    W2, b2 = bench.weights(256, 512)
    layers = [Layer(W1, b1, activation), Layer(W2, b2)]
    return layers, FusedTransform(layers)


def _torch_activation(torch: Any, F: Any, activation: str) -> tuple[Callable[[Any], Any], Callable[[Any], Any], str]:
    """torch's in-place and allocating forms of ``activation`` (exact erf GELU, as ours), and the first's name."""
    if activation == "relu":
        return torch.relu_, F.relu, "relu_"
    return torch.ops.aten.gelu_, F.gelu, "aten.gelu_"


def _cfg_mlp(bench: Bench, sizes: Sizes, n: int, layers: list[Layer], op: FusedTransform) -> dict:
    x = bench.buf.get("x", (n, 256), random=True)
    y = bench.buf.get("out", (n, 256))
    T = bench.threads
    act = layers[0].activation
    impls = {"bc_fast": lambda: op.apply(x, out=y, threads=T)}
    note = "torch_eager allocates (F.linear has no out=)"
    if bench.torch is not None:
        torch, F = bench.torch, bench.F
        act_, act_alloc, in_place = _torch_activation(torch, F, act)
        note += (f"; torch_prealloc is the same program with addmm(out=) into preallocated hidden and output "
                 f"buffers and {in_place} in place")
        xt, yt, ht = (torch.from_numpy(a) for a in (x, y, bench.buf.get("hidden", (n, 512))))
        W1, b1, W2, b2 = (torch.from_numpy(a) for a in (layers[0].weight, layers[0].bias,
                                                          layers[1].weight, layers[1].bias))

        def torch_prealloc() -> None:
            torch.addmm(b1, xt, W1.t(), out=ht)
            act_(ht)
            torch.addmm(b2, ht, W2.t(), out=yt)
        impls["torch_prealloc"] = torch_prealloc
        impls["torch_eager"] = lambda: F.linear(act_alloc(F.linear(xt, W1, b1)), W2, b2)
    large = n >= 100_000 or sizes.name == "tiny" and n > 256
    t = bench.measure(impls, large=large)
    op.apply(x, out=y, threads=T)
    m = min(n, 256)
    err = max_abs_err(y[:m], apply_layers_reference(layers, x[:m]))
    checks = [speedup_check("vs best torch", t, best_of(t, "torch") or "torch", 1.3)]
    prefix = "mlp" if act == "relu" else f"mlp_{act}"
    name = f"{prefix}_b256" if n == 256 else f"{prefix}_large"
    return result(name, f"MLP 256->512 {act}->256, batch {n:,}, fp32", n, t, checks,
                  flops_per_call=2.0 * n * (256 * 512 * 2), err=err, note=note)


def _chain_numpy(x: np.ndarray, bufs: tuple[np.ndarray, np.ndarray],
                 steps: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, Callable[[], Any]]:
    """An affine chain step by step in numpy: into two preallocated buffers in turn, and allocating."""
    def numpy_steps() -> None:
        z = x
        for i, (WT, b) in enumerate(steps):
            o = bufs[i % 2]
            np.matmul(z, WT, out=o)
            np.add(o, b, out=o)
            z = o

    def numpy_steps_alloc() -> np.ndarray:  # the reference code's way
        z = x
        for WT, b in steps:
            z = z @ WT + b
        return z
    return {"numpy_steps": numpy_steps, "numpy_steps_alloc": numpy_steps_alloc}


def _cfg_chain(bench: Bench, sizes: Sizes) -> dict:
    d, K, n = 256, 4, sizes.chain_rows
    x = bench.buf.get("x", (n, d), random=True)
    y = bench.buf.get("out", (n, d))
    bufs = (bench.buf.get("pp0", (n, d)), bench.buf.get("pp1", (n, d)))
    steps = [[Layer(*bench.weights(d, d))] for _ in range(K)]
    fused = fuse_chain(steps)
    op = FusedTransform(fused)
    T = bench.threads
    impls = {"bc_fast": lambda: op.apply(x, out=y, threads=T)}
    impls.update(_chain_numpy(x, bufs, [(s[0].weight.T, s[0].bias) for s in steps]))
    if bench.torch is not None:
        torch = bench.torch
        xt, tb = torch.from_numpy(x), tuple(torch.from_numpy(a) for a in bufs)
        t_steps = [(torch.from_numpy(s[0].weight), torch.from_numpy(s[0].bias)) for s in steps]

        def torch_steps() -> None:
            z = xt
            for i, (W, b) in enumerate(t_steps):
                z = torch.addmm(b, z, W.t(), out=tb[i % 2])
        impls["torch_steps"] = torch_steps
    t = bench.measure(impls, large=True)
    op.apply(x, out=y, threads=T)
    m = min(n, 256)
    err = max_abs_err(y[:m], apply_layers_reference([s[0] for s in steps], x[:m]))
    checks = [speedup_check("fused vs best numpy steps", t, best_of(t, "numpy_steps"), 3.5)]
    return result("chain_k4", f"chain of K={K} affine 256->256 steps, fused to {len(fused)} layer(s)", n, t,
                  checks, flops_per_call=2.0 * n * d * d * K, err=err,
                  note="flops_per_call counts the unfused chain; numpy_steps/torch_steps write into two "
                       "preallocated buffers in turn, numpy_steps_alloc is the reference code's way")


def _cfg_latency(bench: Bench, sizes: Sizes, n: int) -> dict:
    d = 256
    x = np.ascontiguousarray(bench.rng.standard_normal((n, d), dtype=np.float32))
    y = np.empty((n, d), np.float32)
    W, b = bench.weights(d, d)
    op = FusedTransform.affine(W, b)
    impls = affine_impls(bench, op, x, y, W, b, ("bc_fast", "numpy_alloc", "numpy_prealloc", "torch_addmm", "faiss"))
    # bc_fast may split a small batch's columns over the caller and one helper thread (build_info()
    # ["small_split"]); bc_fast_1t is the same call on the calling thread alone.
    impls["bc_fast_1t"] = lambda: op.apply(x, out=y, threads=1)
    t = bench.measure(impls, large=False, min_calls=200 if n == 1 else 20)
    impls["bc_fast"]()
    med_us = t["bc_fast"].median_s * 1e6
    best = best_of(t, "numpy")  # numpy_alloc (allocating) is never the only baseline: the faster one counts
    if n == 1:
        checks = [check("latency budget", 2.5 / med_us, 1.0, "≤ 2.5 µs (bar: 2.5µs/median)", f"{med_us:.2f} µs"),
                  speedup_check("vs best numpy", t, best, 1.8)]
    else:
        checks = [speedup_check(f"vs {best}", t, best, 1 / 0.9, shown_target="≤ 0.9x numpy time (≥ 1.11x)")]
    return result(f"latency_b{n}", f"affine 256->256 + bias, batch {n}, fp32, preallocated out", n, t, checks,
                  flops_per_call=2.0 * n * d * d, err=affine_err(y, x, W, b),
                  note="numpy_alloc (x @ W.T + b) allocates by definition (the reference code's way); every "
                       "other baseline writes into the preallocated output; the faster numpy variant counts")


def _cfg_scaling(bench: Bench, sizes: Sizes) -> dict:
    d, n, T = 256, sizes.scaling_rows, bench.threads
    x = bench.buf.get("x", (n, d), random=True)
    y = bench.buf.get("out", (n, d))
    W, b = bench.weights(d, d)
    op = FusedTransform.affine(W, b)
    load_before = os.getloadavg()[0]
    impls = {"bc_fast": lambda: op.apply(x, out=y, threads=T), "bc_fast_1t": lambda: op.apply(x, out=y, threads=1)}
    t = bench.measure(impls, large=True)
    quiet = load_before < 0.5
    note = (f"loadavg1 {load_before:.2f} before the config "
            f"({'quiet' if quiet else 'NOT quiet: other processes share the cores, scaling is capped'}); "
            f"cpu/wall {T}t {t['bc_fast'].cpu_over_wall:.2f}, 1t {t['bc_fast_1t'].cpu_over_wall:.2f}")
    if T < 2:
        checks = [check(f"1 -> {T} threads", None, 1.8, "≥ 1.8x", "needs ≥ 2 threads")]
    else:
        checks = [speedup_check(f"1 -> {T} threads", t, "bc_fast_1t", 1.8)]
    return result("threads_1to2", f"affine 256->256 + bias, threads 1 vs {T}", n, t, checks,
                  flops_per_call=2.0 * n * d * d, note=note)


CONCURRENCY_BATCH = 4096  # rows per call when callers stream their slice in batches


def _cfg_concurrency(bench: Bench, sizes: Sizes) -> dict:
    d, n, T = 256, sizes.scaling_rows, bench.threads
    x = bench.buf.get("x", (n, d), random=True)
    y = bench.buf.get("out", (n, d))
    W, b = bench.weights(d, d)
    op = FusedTransform.affine(W, b)
    callers = (1, 2, 4)

    def stream(lo: int, hi: int, batch: int) -> None:
        for s in range(lo, hi, batch):
            op.apply(x[s:min(s + batch, hi)], out=y[s:min(s + batch, hi)], threads=T)

    with ThreadPoolExecutor(max(callers), thread_name_prefix="bc_fast_bench") as pool:
        def split_over(k: int, batch: int) -> Callable[[], None]:
            bounds = [n * i // k for i in range(k + 1)]

            def run() -> None:  # k callers at once, one slice each; every call asks for T threads
                futures = [pool.submit(stream, lo, hi, batch) for lo, hi in zip(bounds, bounds[1:])]
                for f in futures:
                    f.result()
            return run

        def name(k: int, batch: int) -> str:
            return ("bc_fast" if k == 1 else f"bc_fast_{k}callers") + ("" if batch == n else f"_b{batch}")

        batches = (n, min(n, CONCURRENCY_BATCH))
        impls = {name(k, bt): split_over(k, bt) for bt in batches for k in callers}
        t = bench.measure(impls, large=True)
        impls["bc_fast"]()
    checks = [speedup_check(f"{k} callers vs 1{'' if bt == n else f', batches of {bt}'}", t, name(1, bt), 0.9,
                            bc=name(k, bt), shown_target="≥ 0.9x one caller's rows/s")
              for bt in batches for k in callers[1:]]
    return result("concurrency", f"affine 256->256 + bias, {n:,} rows split over 1/2/4 Python threads "
                                 f"(one call each, or calls of {batches[1]} rows)", n, t, checks,
                  flops_per_call=2.0 * n * d * d, err=affine_err(y, x, W, b),
                  note=f"every call asks for threads={T}; concurrent calls share the core's thread budget "
                       f"(build_info()['max_threads']), so k callers do not open k full OpenMP teams")


# --------------------------------------------------------------------------- entry point

def suite_configs(sizes: Sizes) -> Callable[[Bench], Iterator[Config]]:
    """The issue-6 suite's configs at ``sizes``, in running order (a generator of ``bench``)."""
    def configs(bench: Bench) -> Iterator[Config]:
        yield _cfg_peak, (sizes,)
        yield _cfg_latency, (sizes, 1)
        yield _cfg_latency, (sizes, 16)
        for d in sizes.affine_rows:
            yield _cfg_affine, (sizes, d)
        yield from bf16_configs(sizes.bf16_rows)
        yield _cfg_l2, (sizes,)
        for activation in ("relu", "gelu"):
            layers, op = _mlp_program(bench, activation)  # one program for both batch sizes
            yield _cfg_mlp, (sizes, 256, layers, op)
            yield _cfg_mlp, (sizes, sizes.mlp_rows, layers, op)
        yield _cfg_chain, (sizes,)
        yield _cfg_scaling, (sizes,)
        yield _cfg_concurrency, (sizes,)
    return configs


def run_bf16_bench(out_dir: Path | None = None, quick: bool = False, log: Callable[[str], Any] = print, *,
                   tiny: bool = False, threads: int | None = None, json_path: Path | None = None) -> dict:
    """Only the bf16 configs of the suite (d = 256 and 768, and the bf16 MLP), at the full, quick or tiny sizes.

    Same harness, table and JSON (``out_dir/bench.json`` and ``bench.png``, or ``json_path``
    alone) as :func:`run_bench_suite`; for re-measuring bf16 alone.
    """
    sizes = SIZES["quick" if quick or tiny else "full"]
    rows = BF16_TINY_ROWS if tiny else sizes.bf16_rows
    plan = TINY_PLAN if tiny else sizes.plan
    mode = "tiny" if tiny else sizes.name
    describe = f"mode={mode}: " + "; ".join(f"bf16_d{d} {n:,} rows" for d, n in rows.items()) + f"; {plan.describe()}"
    return run_configs("bc_fast bench bf16", bf16_configs(rows), threads=threads, plan=plan,
                       mode=mode, describe=describe, log=log, out_dir=None if out_dir is None else Path(out_dir),
                       json_path=json_path)


def run_bench_suite(out_dir: Path, quick: bool = False, log: Callable[[str], Any] = print, *, tiny: bool = False,
                    threads: int | None = None) -> dict:
    """Run the issue-6 benchmark suite; print a table, write ``bench.json`` and ``bench.png``.

    Parameters
    ----------
    out_dir : Path
        Created if missing; ``bench.json`` and ``bench.png`` are written atomically.
    quick : bool, default False
        Smaller batches (200k rows instead of 1M, 40k at d=768) and fewer samples;
        under a minute on a 2-vCPU VM. The sizes used are printed and stored.
    log : callable, default print
        Receives every output line.
    tiny : bool, default False
        Toy sizes for smoke tests (a few seconds; the numbers mean nothing).
    threads : int, optional
        Threads for bc_fast, torch, faiss and numpy's BLAS (default: bc_fast's max_threads).

    Returns
    -------
    dict
        ``machine``, ``sizes``, ``results`` (one per config: medians, checks), ``table``,
        ``total_s``, ``json``/``png`` paths. Never raises on a missed target.
    """
    sizes = SIZES["tiny" if tiny else "quick" if quick else "full"]
    return run_configs("bc_fast bench", suite_configs(sizes), threads=threads, plan=sizes.plan, mode=sizes.name,
                       describe=sizes.describe(), log=log, out_dir=Path(out_dir),
                       meta={"sizes": asdict(sizes), "sizes_text": sizes.describe()})
