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
                      preallocated expression, einsum-norm and cache-blocked variants ≥ 1.5x torch
                      (best of them counts); torch ``F.normalize(F.linear).half()``
mlp_b256, mlp_large   256→512 relu→256; torch eager F.linear, relu\\_, F.linear        ≥ 1.3x torch
chain_k4              K = 4 affine 256→256 steps fused by ``fuse_chain`` (one matrix)  ≥ 3.5x numpy step by step
                      vs ``z = z @ W.T + b`` four times in numpy
latency_b1            batch 1, 256→256 affine, preallocated output                    median ≤ 3 µs
latency_b16           batch 16, vs the faster of ``x @ W.T + b`` and                   ≤ 0.9x numpy's time
                      ``matmul(out=); add(out=)``
threads_1to2          large affine 256→256, threads=1 vs threads=2 (cpu/wall shown)  ≥ 1.8x (quiet machine)
====================  ==============================================================  ===========================

Timing rules (``bc_fast._benchtools``, shared with the bench/ scripts):
implementations of a config run round-robin, one sample each per round, so drifting
background load on the shared machine hits all alike; warm-up calls are dropped;
outputs go to buffers allocated and first-touched once and reused across configs
(first-touch memory is very slow on the VMs); every value is a median; ``c/w`` is
process CPU time over wall time (≈ cores kept busy). torch and faiss are optional:
their columns are skipped, with a note, when they are not installed; matplotlib too
(no PNG then). bc_fast, torch, faiss and numpy's OpenBLAS all run with the same
thread count (bc_fast's ``max_threads`` unless ``threads`` is given).
"""

from __future__ import annotations

import gc
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._benchtools import Timing, import_faiss, import_torch, numpy_blas_threads, time_interleaved
from ._benchtools import machine_info as _machine_info
from ._fileio import atomic_write_bytes
from .fusion import apply_layers_reference, fuse_chain
from .index import faiss_linear_transform
from .ops import FusedTransform, Layer, build_info

__all__ = ["SIZES", "Timing", "machine_info", "run_bench_suite", "time_interleaved"]

# --------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class Sizes:
    """Rows and sample counts of one suite mode."""

    name: str
    affine_rows: dict  # d -> rows
    l2_rows: int
    mlp_rows: int
    chain_rows: int
    scaling_rows: int
    peak_n: int
    peak_n_inline: int  # square sgemm timed inside each affine config, interleaved with it
    large_budget_s: float  # time budget per large config; sets the sample count
    large_samples: tuple[int, int]  # (min, max) samples for large configs
    small_samples: int
    small_target_s: float  # seconds per sample of a small (looped) config
    small_group: int  # consecutive samples per visit of a small config's implementation
    idle_s: float  # pause before each visit: other runtimes' spinning threads go to sleep

    def describe(self) -> str:
        aff = ", ".join(f"d={d}: {n:,}" for d, n in self.affine_rows.items())
        return (f"mode={self.name}: affine rows {aff}; l2_fp16 {self.l2_rows:,}; mlp_large {self.mlp_rows:,}; "
                f"chain_k4 {self.chain_rows:,}; threads_1to2 {self.scaling_rows:,}; peak sgemm {self.peak_n}² "
                f"(inside affine configs {self.peak_n_inline}²); "
                f"large configs {self.large_samples[0]}-{self.large_samples[1]} samples, "
                f"small configs {self.small_samples} samples of ~{self.small_target_s * 1e3:g} ms "
                f"({self.small_group} per visit); {self.idle_s:g} s idle before each visit")


SIZES = {
    "full": Sizes("full", {128: 1_000_000, 256: 1_000_000, 768: 1_000_000}, 1_000_000, 1_000_000, 1_000_000,
                  1_000_000, 4096, 4096, 40.0, (3, 7), 30, 0.002, 5, 0.15),
    "quick": Sizes("quick", {128: 200_000, 256: 200_000, 768: 40_000}, 65_536, 100_000, 50_000, 200_000,
                   3072, 2048, 2.0, (3, 5), 15, 0.002, 5, 0.1),
    # tests only: seconds in total, numbers meaningless
    "tiny": Sizes("tiny", {128: 2048, 256: 2048, 768: 512}, 2048, 1024, 1024, 2048, 256, 128, 0.0, (2, 2), 3, 0.0005, 3, 0.0),
}

# --------------------------------------------------------------------------- machine (timing: ._benchtools)


def machine_info(extra: dict | None = None) -> dict:
    """Machine, versions, bc_fast's core, each OpenBLAS's core and threads: :func:`._benchtools.machine_info`."""
    return _machine_info(extra, detail=True)


# --------------------------------------------------------------------------- helpers

def _fmt_time(s: float | None) -> str:
    if s is None or math.isnan(s):
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.2f} µs" if s < 1e-5 else f"{s * 1e6:.1f} µs"
    if s < 1.0:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


class _Buffers:
    """Named scratch buffers, allocated and first-touched once, reused by every config.

    First-touched memory is very slow on the VMs, so a fresh output per config would
    time page faults rather than kernels.
    """

    def __init__(self, rng: np.random.Generator) -> None:
        self._mem: dict = {}
        self._noise = rng.standard_normal(1 << 20, dtype=np.float32)

    def get(self, key: str, shape: tuple, dtype=np.float32, *, random: bool = False) -> np.ndarray:
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        mem = self._mem.get(key)
        if mem is None or mem.nbytes < nbytes:
            self._mem.pop(key, None)
            gc.collect()
            mem = np.zeros(nbytes, np.uint8)  # np.zeros may map lazily: touch explicitly
            mem.fill(0)
            self._mem[key] = mem
        a = mem[:nbytes].view(dtype).reshape(shape)
        if random:  # tile a block of N(0,1) noise: cheap, and the rows still differ (period 2^20)
            flat = a.reshape(-1)
            block = self._noise.astype(dtype, copy=False)
            for i in range(0, flat.size, block.size):
                m = min(block.size, flat.size - i)
                flat[i:i + m] = block[:m]
        return a

    def nbytes(self) -> int:
        return sum(m.nbytes for m in self._mem.values())

    def clear(self) -> None:
        self._mem.clear()
        gc.collect()


@dataclass
class _Ctx:
    sizes: Sizes
    threads: int
    buf: _Buffers
    rng: np.random.Generator
    log: Callable
    torch: Any
    F: Any
    faiss: Any
    peak_gflops: float | None = None
    notes: list = field(default_factory=list)

    def weights(self, d_out: int, d_in: int, bias: bool = True) -> tuple:
        w = (self.rng.standard_normal((d_out, d_in), dtype=np.float32) / np.float32(math.sqrt(d_in)))
        b = (self.rng.standard_normal(d_out, dtype=np.float32) * np.float32(0.1)) if bias else None
        return np.ascontiguousarray(w), b

    def measure(self, impls: dict, *, large: bool, min_calls: int = 1) -> dict:
        """Large: one call per sample, count set by the time budget. Small: calibrated loops."""
        s = self.sizes
        if large:
            t0 = time.perf_counter()
            for fn in impls.values():  # warm-up round; also estimates a round's length
                fn()
            round_s = time.perf_counter() - t0
            lo, hi = s.large_samples
            samples = int(min(hi, max(lo, s.large_budget_s // max(round_s, 1e-9))))
            return time_interleaved(impls, samples=samples, calls=1, warmup_rounds=0, idle_s=s.idle_s,
                                    rewarm=False)
        return time_interleaved(impls, samples=s.small_samples, target_s=s.small_target_s, max_calls=5000,
                                min_calls=min_calls, idle_s=s.idle_s, group=s.small_group)


def _check(label: str, value: float | None, target: float, shown_target: str, shown_value: str) -> dict:
    """One target; ``value >= target`` passes (every check is phrased higher-is-better)."""
    status = "SKIP" if value is None else ("PASS" if value >= target else "MISS")
    return {"label": label, "value": value, "target": target, "shown_target": shown_target,
            "shown_value": shown_value, "status": status}


def _speedup_check(label: str, timings: dict, base: str, target: float, bc: str = "bc_fast",
                   shown_target: str | None = None) -> dict:
    if base not in timings:
        return _check(label, None, target, shown_target or f"≥ {target:g}x", f"{base}: not installed")
    v = timings[base].median_s / timings[bc].median_s
    return _check(label, v, target, shown_target or f"≥ {target:g}x", f"{v:.2f}x {base}")


def _result(name: str, title: str, rows: int, timings: dict, checks: list, *, flops_per_call: float | None = None,
            err: float | None = None, note: str = "", bc: str = "bc_fast") -> dict:
    impls = {}
    for k, t in timings.items():
        d = {"median_s": t.median_s, "min_s": t.min_s, "max_s": t.max_s, "cpu_over_wall": t.cpu_over_wall,
             "samples": t.samples, "calls_per_sample": t.calls_per_sample}
        if flops_per_call:
            d["gflops"] = flops_per_call / t.median_s / 1e9
        impls[k] = d
    statuses = [c["status"] for c in checks]
    status = ("MISS" if "MISS" in statuses else "PASS" if "PASS" in statuses else "SKIP") if statuses else "INFO"
    return {"config": name, "title": title, "rows": rows, "bc_impl": bc, "impls": impls, "checks": checks,
            "status": status, "max_abs_err": err, "note": note, "flops_per_call": flops_per_call,
            "loadavg1": os.getloadavg()[0]}


def _max_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(got.astype(np.float64) - ref))) if got.size else 0.0


# --------------------------------------------------------------------------- configs

def _cfg_peak(ctx: _Ctx) -> dict:
    n = ctx.sizes.peak_n
    a = ctx.buf.get("x", (n, n), random=True)
    b = ctx.buf.get("aux", (n, n), random=True)
    c = ctx.buf.get("out", (n, n))
    t = ctx.measure({"numpy_sgemm_square": lambda: np.matmul(a, b, out=c)}, large=True)
    flops = 2.0 * n ** 3
    ctx.peak_gflops = flops / t["numpy_sgemm_square"].median_s / 1e9
    r = _result("peak", f"peak: numpy sgemm {n}x{n} @ {n}x{n}, fp32, preallocated out", n, t, [],
                flops_per_call=flops, bc="numpy_sgemm_square",
                note=f"machine peak {ctx.peak_gflops:.1f} GFLOP/s (median, {ctx.threads} threads)")
    return r


def _cfg_affine(ctx: _Ctx, d: int) -> dict:
    n = ctx.sizes.affine_rows[d]
    x = ctx.buf.get("x", (n, d), random=True)
    y = ctx.buf.get("out", (n, d))
    W, b = ctx.weights(d, d)
    WT = W.T
    op = FusedTransform.affine(W, b)
    T = ctx.threads
    impls = {"bc_fast": lambda: op.apply(x, out=y, threads=T),
             "numpy_sgemm": lambda: np.matmul(x, WT, out=y)}
    if ctx.torch is not None:
        torch = ctx.torch
        xt, yt, Wt, bt = (torch.from_numpy(a) for a in (x, y, W, b))
        impls["torch_addmm"] = lambda: torch.addmm(bt, xt, Wt.t(), out=yt)
    if ctx.faiss is not None:
        faiss = ctx.faiss
        lt = faiss_linear_transform(W, b)
        px, py = faiss.swig_ptr(x), faiss.swig_ptr(y)
        impls["faiss"] = lambda: lt.apply_noalloc(n, px, py)
    # the peak, interleaved with the others: load drifting on the shared box hits it alike
    q = ctx.sizes.peak_n_inline
    qa, qb = ctx.buf.get("sq_a", (q, q), random=True), ctx.buf.get("sq_b", (q, q), random=True)
    qc = ctx.buf.get("sq_c", (q, q))
    impls["peak_sgemm"] = lambda: np.matmul(qa, qb, out=qc)
    t = ctx.measure(impls, large=True)
    peak_inline = 2.0 * q ** 3 / t.pop("peak_sgemm").median_s / 1e9
    # the fraction uses the peak measured in the same rounds (same background load); the peak
    # config ran at another moment, and on this shared box the load drifts between configs
    peak = peak_inline
    op.apply(x, out=y, threads=T)
    m = min(n, 256)
    err = _max_err(y[:m], x[:m].astype(np.float64) @ W.T.astype(np.float64) + b)
    flops = 2.0 * n * d * d
    gf = flops / t["bc_fast"].median_s / 1e9
    checks = [_speedup_check("vs numpy sgemm", t, "numpy_sgemm", 0.95)]
    frac = gf / peak
    checks.append(_check("of peak GFLOP/s", frac, 0.85, "≥ 85 % peak",
                         f"{gf:.0f} GF/s = {100 * frac:.0f} % of {peak:.0f} peak"))
    r = _result(f"affine_d{d}", f"affine {d}->{d} (+bias), fp32 -> fp32 preallocated", n, t, checks,
                flops_per_call=flops, err=err,
                note=f"peak = numpy sgemm {q}x{q} timed in the same rounds: {peak_inline:.1f} GFLOP/s "
                     f"(peak config: {ctx.peak_gflops or 0:.1f})")
    r["peak_gflops_inline"] = peak_inline
    r["peak_gflops_used"] = peak
    return r


def _cfg_l2(ctx: _Ctx) -> dict:
    d = 256
    n = ctx.sizes.l2_rows
    x = ctx.buf.get("x", (n, d), random=True)
    y16 = ctx.buf.get("out16", (n, d), np.float16)
    y32 = ctx.buf.get("out", (n, d))
    nrm = ctx.buf.get("norms", (n,))
    W, b = ctx.weights(d, d)
    WT = W.T
    op = FusedTransform.affine(W, b, normalize=True)
    T = ctx.threads
    blk = 2048
    s32 = ctx.buf.get("block", (blk, d))
    snrm = ctx.buf.get("block_norms", (blk,))

    def numpy_alloc():
        z = x @ WT + b
        return (z / np.linalg.norm(z, axis=1, keepdims=True)).astype(np.float16)

    def numpy_prealloc():
        np.matmul(x, WT, out=y32)
        np.add(y32, b, out=y32)
        np.divide(y32, np.linalg.norm(y32, axis=1, keepdims=True), out=y32)
        y16[...] = y32

    def numpy_einsum():
        np.matmul(x, WT, out=y32)
        np.add(y32, b, out=y32)
        np.einsum("ij,ij->i", y32, y32, out=nrm)
        np.sqrt(nrm, out=nrm)
        np.divide(y32, nrm[:, None], out=y32)
        y16[...] = y32

    def numpy_blocked():  # the einsum variant on 2048-row blocks that stay in cache
        for i in range(0, n, blk):
            m = min(blk, n - i)
            z, q = s32[:m], snrm[:m]
            np.matmul(x[i:i + m], WT, out=z)
            z += b
            np.einsum("ij,ij->i", z, z, out=q)
            np.sqrt(q, out=q)
            z /= q[:, None]
            y16[i:i + m] = z

    impls = {"bc_fast": lambda: op.apply(x, out=y16, threads=T), "numpy_alloc": numpy_alloc,
             "numpy_prealloc": numpy_prealloc, "numpy_einsum": numpy_einsum, "numpy_blocked": numpy_blocked}
    if ctx.torch is not None:
        torch, F = ctx.torch, ctx.F
        xt, Wt, bt = (torch.from_numpy(a) for a in (x, W, b))
        impls["torch"] = lambda: F.normalize(F.linear(xt, Wt, bt)).half()
    t = ctx.measure(impls, large=True)
    op.apply(x, out=y16, threads=T)
    m = min(n, 256)
    ref = x[:m].astype(np.float64) @ W.T.astype(np.float64) + b
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    err = _max_err(y16[:m], ref)
    best = min((k for k in t if k.startswith("numpy")), key=lambda k: t[k].median_s)
    checks = [_speedup_check("vs best numpy", t, best, 1.5), _speedup_check("vs torch", t, "torch", 1.5)]
    return _result("l2_fp16", f"affine 256->256 + bias + L2 normalise, fp32 in -> fp16 out (best numpy: {best})",
                   n, t, checks, flops_per_call=2.0 * n * d * d, err=err)


def _mlp_program(ctx: _Ctx) -> tuple:
    W1, b1 = ctx.weights(512, 256)
    W2, b2 = ctx.weights(256, 512)
    layers = [Layer(W1, b1, "relu"), Layer(W2, b2)]
    return layers, FusedTransform(layers)


def _cfg_mlp(ctx: _Ctx, n: int, layers: list, op: FusedTransform) -> dict:
    x = ctx.buf.get("x", (n, 256), random=True)
    y = ctx.buf.get("out", (n, 256))
    T = ctx.threads
    impls = {"bc_fast": lambda: op.apply(x, out=y, threads=T)}
    if ctx.torch is not None:
        torch, F = ctx.torch, ctx.F
        xt = torch.from_numpy(x)
        W1, b1, W2, b2 = (torch.from_numpy(a) for a in (layers[0].weight, layers[0].bias,
                                                          layers[1].weight, layers[1].bias))
        impls["torch_eager"] = lambda: F.linear(torch.relu_(F.linear(xt, W1, b1)), W2, b2)
    large = n >= 100_000 or ctx.sizes.name == "tiny" and n > 256
    t = ctx.measure(impls, large=large)
    op.apply(x, out=y, threads=T)
    m = min(n, 256)
    err = _max_err(y[:m], apply_layers_reference(layers, x[:m]))
    checks = [_speedup_check("vs torch eager", t, "torch_eager", 1.3)]
    name = "mlp_b256" if n == 256 else "mlp_large"
    return _result(name, f"MLP 256->512 relu->256, batch {n:,}, fp32", n, t, checks,
                   flops_per_call=2.0 * n * (256 * 512 * 2), err=err)


def _cfg_chain(ctx: _Ctx) -> dict:
    d, K = 256, 4
    n = ctx.sizes.chain_rows
    x = ctx.buf.get("x", (n, d), random=True)
    y = ctx.buf.get("out", (n, d))
    steps = [[Layer(*ctx.weights(d, d))] for _ in range(K)]
    fused = fuse_chain(steps)
    op = FusedTransform(fused)
    T = ctx.threads
    np_steps = [(s[0].weight.T, s[0].bias) for s in steps]

    def numpy_steps():
        z = x
        for WT, b in np_steps:
            z = z @ WT + b
        return z

    impls = {"bc_fast": lambda: op.apply(x, out=y, threads=T), "numpy_steps": numpy_steps}
    if ctx.torch is not None:
        torch, F = ctx.torch, ctx.F
        xt = torch.from_numpy(x)
        t_steps = [(torch.from_numpy(s[0].weight), torch.from_numpy(s[0].bias)) for s in steps]

        def torch_steps():
            z = xt
            for W, b in t_steps:
                z = F.linear(z, W, b)
            return z
        impls["torch_steps"] = torch_steps
    t = ctx.measure(impls, large=True)
    op.apply(x, out=y, threads=T)
    m = min(n, 256)
    err = _max_err(y[:m], apply_layers_reference([s[0] for s in steps], x[:m]))
    checks = [_speedup_check("fused vs numpy steps", t, "numpy_steps", 3.5)]
    return _result("chain_k4", f"chain of K={K} affine 256->256 steps, fused to {len(fused)} layer(s)", n, t,
                   checks, flops_per_call=2.0 * n * d * d * K, err=err,
                   note="flops_per_call counts the unfused chain")


def _cfg_latency(ctx: _Ctx, n: int) -> dict:
    d = 256
    x = np.ascontiguousarray(ctx.rng.standard_normal((n, d), dtype=np.float32))
    y = np.empty((n, d), np.float32)
    W, b = ctx.weights(d, d)
    WT = W.T
    op = FusedTransform.affine(W, b)
    T = ctx.threads

    def numpy_prealloc():
        np.matmul(x, WT, out=y)
        np.add(y, b, out=y)

    impls = {"bc_fast": lambda: op.apply(x, out=y, threads=T), "numpy_alloc": lambda: x @ WT + b,
             "numpy_prealloc": numpy_prealloc}
    if ctx.torch is not None:
        torch, F = ctx.torch, ctx.F
        xt, Wt, bt = (torch.from_numpy(a) for a in (x, W, b))
        impls["torch"] = lambda: F.linear(xt, Wt, bt)
    if ctx.faiss is not None:
        faiss = ctx.faiss
        lt = faiss_linear_transform(W, b)
        impls["faiss"] = lambda: lt.apply(x)
    t = ctx.measure(impls, large=False, min_calls=200 if n == 1 else 20)
    op.apply(x, out=y, threads=T)
    err = _max_err(y, x.astype(np.float64) @ W.T.astype(np.float64) + b)
    med_us = t["bc_fast"].median_s * 1e6
    if n == 1:
        checks = [_check("latency budget", 3.0 / med_us, 1.0, "≤ 3 µs (bar: 3µs/median)", f"{med_us:.2f} µs")]
    else:
        best = min(("numpy_alloc", "numpy_prealloc"), key=lambda k: t[k].median_s)
        checks = [_speedup_check(f"vs {best}", t, best, 1 / 0.9, shown_target="≤ 0.9x numpy time (≥ 1.11x)")]
    return _result(f"latency_b{n}", f"affine 256->256 + bias, batch {n}, fp32, preallocated out", n, t, checks,
                   flops_per_call=2.0 * n * d * d, err=err)


def _cfg_scaling(ctx: _Ctx) -> dict:
    d = 256
    n = ctx.sizes.scaling_rows
    T = ctx.threads
    x = ctx.buf.get("x", (n, d), random=True)
    y = ctx.buf.get("out", (n, d))
    W, b = ctx.weights(d, d)
    op = FusedTransform.affine(W, b)
    load_before = os.getloadavg()[0]
    impls = {"bc_fast": lambda: op.apply(x, out=y, threads=T), "bc_fast_1t": lambda: op.apply(x, out=y, threads=1)}
    t = ctx.measure(impls, large=True)
    quiet = load_before < 0.5
    note = (f"loadavg1 {load_before:.2f} before the config "
            f"({'quiet' if quiet else 'NOT quiet: other processes share the cores, scaling is capped'}); "
            f"cpu/wall {T}t {t['bc_fast'].cpu_over_wall:.2f}, 1t {t['bc_fast_1t'].cpu_over_wall:.2f}")
    if T < 2:
        checks = [_check(f"1 -> {T} threads", None, 1.8, "≥ 1.8x", "needs ≥ 2 threads")]
    else:
        checks = [_speedup_check(f"1 -> {T} threads", t, "bc_fast_1t", 1.8)]
    return _result("threads_1to2", f"affine 256->256 + bias, threads 1 vs {T}", n, t, checks,
                   flops_per_call=2.0 * n * d * d, note=note)


# --------------------------------------------------------------------------- report

def _kv(**kv: Any) -> str:
    def f(v: Any) -> str:
        if v is None:
            return "na"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v).replace(" ", "_")
    return " ".join(f"{k}={f(v)}" for k, v in kv.items())


def _log_result(log: Callable, r: dict) -> None:
    for k, v in r["impls"].items():
        log(_kv(config=r["config"], impl=k, rows=r["rows"], median_us=v["median_s"] * 1e6,
                min_us=v["min_s"] * 1e6, cpu_over_wall=v["cpu_over_wall"], gflops=v.get("gflops"),
                samples=v["samples"], calls=v["calls_per_sample"]))
    for c in r["checks"]:
        log(_kv(config=r["config"], check=c["label"], value=c["value"], target=c["target"], status=c["status"]))
    if r.get("max_abs_err") is not None:
        log(_kv(config=r["config"], max_abs_err=r["max_abs_err"]))
    if r.get("note"):
        log(f"# {r['config']}: {r['note']}")


def format_table(results: list) -> str:
    """Markdown table: config | bc_fast median | baseline medians | ratios | target | status."""
    head = ["config", "rows", "bc_fast median (cpu/wall)", "baseline medians", "ratios", "target", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in results:
        bc = r["bc_impl"]
        b = r["impls"][bc]
        bc_cell = f"{_fmt_time(b['median_s'])} ({b['cpu_over_wall']:.2f})"
        if r["config"] == "peak":
            bc_cell = f"{_fmt_time(b['median_s'])} = {b['gflops']:.1f} GFLOP/s ({b['cpu_over_wall']:.2f})"
        bases = "; ".join(f"{k} {_fmt_time(v['median_s'])}" for k, v in r["impls"].items() if k != bc) or "-"
        ratios = "; ".join(c["shown_value"] for c in r["checks"]) or (r.get("note") or "-")
        info = [f"{k} {v['median_s'] / b['median_s']:.2f}x" for k, v in r["impls"].items() if k != bc
                and not any(c["shown_value"].endswith(" " + k) for c in r["checks"])]
        if info and r["checks"]:
            ratios += " (" + ", ".join(info) + ")"
        target = "; ".join(c["shown_target"] for c in r["checks"]) or "-"
        status = r["status"]
        if status == "MISS" and len(r["checks"]) > 1:
            status += f" ({sum(c['status'] == 'PASS' for c in r['checks'])}/{len(r['checks'])} pass)"
        lines.append("| " + " | ".join([r["config"], f"{r['rows']:,}", bc_cell, bases, ratios, target, status])
                     + " |")
    return "\n".join(lines)


def _chart_png(results: list, title: str) -> bytes | None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    bars = [(f"{r['config']}: {c['label']}", c["value"], c["target"], c["status"])
            for r in results for c in r["checks"] if c["value"] is not None]
    if not bars:
        return None
    bars.reverse()
    fig = Figure(figsize=(9.5, 0.42 * len(bars) + 1.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    colors = {"PASS": "#2e7d32", "MISS": "#c62828"}
    ys = range(len(bars))
    ax.barh(list(ys), [v for _, v, _, _ in bars], left=0.0, color=[colors.get(s, "#777") for *_, s in bars], height=0.6)
    for i, (_, v, tgt, _) in enumerate(bars):
        ax.plot([tgt, tgt], [i - 0.42, i + 0.42], color="black", lw=2)
        ax.text(v, i, f" {v:.2f}", va="center", fontsize=8)
    ax.set_yticks(list(ys))
    ax.set_yticklabels([lab for lab, *_ in bars], fontsize=8)
    ax.axvline(1.0, color="#999", lw=0.8, ls="--")
    ax.set_xlabel("ratio (speed-up = baseline median / bc_fast median; or fraction of peak); black bar = target")
    ax.set_title(title, fontsize=9)
    hi = max(max(v for _, v, _, _ in bars), max(t for _, _, t, _ in bars))
    if hi > 4:  # a 10x fusion win would squash every other bar
        ax.set_xscale("log", base=2)
        lo = min(0.25, min(v for _, v, _, _ in bars) / 1.5)
        ax.set_xlim(lo, hi * 1.6)
        ticks = [2.0 ** k for k in range(math.floor(math.log2(lo)), math.ceil(math.log2(hi * 1.6)) + 1)]
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{v:g}" for v in ticks])
    else:
        ax.set_xlim(0, hi * 1.15)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=110)
    return out.getvalue()


# --------------------------------------------------------------------------- entry point

def run_bench_suite(out_dir: Path, quick: bool = False, log: Callable = print, *, tiny: bool = False,
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
        Threads for bc_fast, torch, faiss and numpy's OpenBLAS (default: bc_fast's max_threads).

    Returns
    -------
    dict
        ``machine``, ``sizes``, ``results`` (one per config: medians, checks), ``table``,
        ``total_s``, ``json``/``png`` paths. Never raises on a missed target.
    """
    t_start = time.perf_counter()
    c_start = time.process_time()
    out_dir = Path(out_dir)
    sizes = SIZES["tiny" if tiny else "quick" if quick else "full"]
    T = int(threads or build_info().get("max_threads") or os.cpu_count() or 1)
    torch, F = import_torch()
    faiss = import_faiss()
    notes = []
    if torch is None:
        notes.append("torch not installed: torch columns skipped")
    if faiss is None:
        notes.append("faiss not installed: faiss columns skipped")
    prev_torch = torch.get_num_threads() if torch is not None else None
    prev_faiss = faiss.omp_get_max_threads() if faiss is not None else None
    prev_np = numpy_blas_threads(None)
    if torch is not None:
        torch.set_num_threads(T)
    if faiss is not None:
        faiss.omp_set_num_threads(T)
    np_threads = numpy_blas_threads(T)
    if np_threads is None:
        notes.append("numpy's OpenBLAS not found: its thread count was not set")
    info = machine_info({"bench_threads": T, "numpy_blas_threads": np_threads, "mode": sizes.name})
    log(f"# bc_fast benchmark suite ({sizes.name}); {info['cpu_model']}, {info['cpu_count']} cpus, "
        f"flags {info['cpu_flags']}, loadavg {info['loadavg']}")
    log(f"# threads={T} for bc_fast, numpy OpenBLAS ({np_threads}), torch {info['torch']}, faiss {info['faiss']}; "
        f"bc_fast kernel={info['bc_fast_build_info'].get('kernel') if isinstance(info['bc_fast_build_info'], dict) else '?'}")
    log(f"# sizes: {sizes.describe()}")
    for n_ in notes:
        log(f"# note: {n_}")

    ctx = _Ctx(sizes, T, _Buffers(np.random.default_rng(0)), np.random.default_rng(1), log, torch, F, faiss,
               notes=notes)
    results: list = []

    def run(fn: Callable, *args: Any) -> None:
        t0 = time.perf_counter()
        r = fn(ctx, *args)
        r["config_wall_s"] = time.perf_counter() - t0
        results.append(r)
        _log_result(log, r)
        log(f"# {r['config']} done in {r['config_wall_s']:.1f}s (at {time.perf_counter() - t_start:.1f}s)")
        gc.collect()

    guard = torch.inference_mode() if torch is not None else None
    if guard is not None:
        guard.__enter__()
    try:
        run(_cfg_peak)
        run(_cfg_latency, 1)
        run(_cfg_latency, 16)
        for d in sizes.affine_rows:
            run(_cfg_affine, d)
        run(_cfg_l2)
        layers, op = _mlp_program(ctx)
        run(_cfg_mlp, 256, layers, op)
        run(_cfg_mlp, sizes.mlp_rows, layers, op)
        run(_cfg_chain)
        run(_cfg_scaling)
    finally:
        if guard is not None:
            guard.__exit__(None, None, None)
        peak_mem = ctx.buf.nbytes()
        ctx.buf.clear()
        if torch is not None:
            torch.set_num_threads(prev_torch)
        if faiss is not None:
            faiss.omp_set_num_threads(prev_faiss)
        if prev_np is not None:
            numpy_blas_threads(prev_np)

    total_s = time.perf_counter() - t_start
    cpu_s = time.process_time() - c_start
    table = format_table(results)
    n_checks = [c for r in results for c in r["checks"]]
    n_pass = sum(c["status"] == "PASS" for c in n_checks)
    summary = (f"{n_pass}/{len(n_checks)} targets met; wall {total_s:.1f}s, cpu {cpu_s:.1f}s; "
               f"loadavg now {' '.join(f'{v:.2f}' for v in os.getloadavg())}; reused buffers {peak_mem / 2**30:.2f} GiB")
    log("")
    log(f"# bc_fast bench ({sizes.describe()})")
    log(f"# machine: {info['cpu_model']}, {info['cpu_count']} cpus, threads={T}, loadavg at start {info['loadavg']}; "
        f"ratios are baseline median / bc_fast median (> 1: bc_fast faster)")
    log(table)
    log(f"# {summary}")
    payload = {"suite": "bc_fast issue-6 benchmark", "mode": sizes.name, "sizes": asdict(sizes),
               "sizes_text": sizes.describe(), "machine": info, "threads": T, "notes": notes,
               "peak_gflops": ctx.peak_gflops, "results": results, "table": table, "summary": summary,
               "total_s": total_s, "cpu_s": cpu_s, "argv": sys.argv[1:]}
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "bench.json"
    png_path = out_dir / "bench.png"
    png = _chart_png(results, f"bc_fast bench ({sizes.name}) on {info['cpu_model']}, {T} threads, "
                              f"peak {ctx.peak_gflops or 0:.0f} GFLOP/s")
    payload["json"] = str(json_path)
    payload["png"] = str(png_path) if png is not None else None
    atomic_write_bytes(json_path, json.dumps(payload, indent=1, default=str).encode())
    if png is not None:
        atomic_write_bytes(png_path, png)
        log(f"# wrote {json_path} and {png_path}")
    else:
        log(f"# wrote {json_path} (matplotlib not installed: no PNG)")
    return payload
