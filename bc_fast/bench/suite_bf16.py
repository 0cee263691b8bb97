"""The fair suite's bf16 configs: ``precision="bf16"`` against torch's bf16 on the same dtypes.

=============  ====================================================================  ===========================
config         bc_fast vs                                                            target
=============  ====================================================================  ===========================
bf16_d{256,    affine d→d (+bias). bf16 rows in and out: torch ``addmm(out=)`` on    ≥ 1.0x torch bf16
768}           bf16 tensors (the same bytes). fp32 rows in and out (our contract):   addmm(out=); ≥ 1.5x torch
               torch converting in and out inside the timing. bc_fast fp32.          fp32 io; ≥ 2x bc_fast
               Where the bf16 backend is native and oneDNN loads, oneDNN's run too   fp32 (4x with AMX)
               (informational)
bf16_mlp       256→1024 exact GELU→256, bf16 rows in and out, against torch bf16     ≥ 1.0x the best torch
               in eager mode: allocating (``F.linear``, ``F.gelu``, ``F.linear``)   bf16 (eager mode)
               and preallocated (``addmm(out=)``, ``aten.gelu_`` in place,
               ``addmm(out=)`` into bf16 hidden and output buffers); the best counts
=============  ====================================================================  ===========================

Skipped, with the reason, where ``precision="bf16"`` cannot run. The machine header records the CPU's
bf16 and AMX flags and ``build_info()["bf16_backend"]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .._util.arrays import bfloat16
from ..engine import FusedTransform, Layer
from ..engine.fusion import apply_layers_reference
from ..engine.onednn import has_amx_bf16, load_onednn
from .harness import Bench, Timing, check, max_abs_err, result, speedup_check

__all__ = ["bf16_configs"]

MLP_HIDDEN = 1024


def _unavailable() -> str:
    """Why ``precision="bf16"`` cannot run here with the default backend, or ``""``."""
    try:
        FusedTransform.affine(np.eye(2, dtype=np.float32), precision="bf16")
    except RuntimeError as e:
        return str(e)
    return ""


def _skipped(name: str, title: str, n: int, labels: list[tuple[str, float]], why: str) -> dict:
    checks = [check(label, None, tgt, f"≥ {tgt:g}x", "skipped") for label, tgt in labels]
    return result(name, title, n, {}, checks, bc="bc_fast_bf16", note=f"skipped: precision='bf16' cannot run here: {why}")


def _bf16_rows(x: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """x rounded to bf16 and a touched bf16 output buffer, made before any timing."""
    out = np.zeros(shape, bfloat16())
    return x.astype(bfloat16()), out


def _affine_labels() -> list[tuple[str, float]]:
    return [("bf16 io vs torch bf16 addmm(out=)", 1.0), ("fp32 io vs torch bf16 fp32 io", 1.5),
            ("vs bc_fast fp32", 4.0 if has_amx_bf16() else 2.0)]


def _affine_torch(bench: Bench, x: np.ndarray, y: np.ndarray, W: np.ndarray, b: np.ndarray) -> dict[str, Callable]:
    torch = bench.torch
    bf = torch.bfloat16
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    x16, y16 = xt.to(bf), torch.empty(y.shape, dtype=bf)  # converted once, outside the timing
    W16, b16 = torch.from_numpy(W).to(bf), torch.from_numpy(b).to(bf)

    def torch_bf16_fp32io() -> None:
        x16.copy_(xt)
        torch.addmm(b16, x16, W16.t(), out=y16)
        yt.copy_(y16)
    return {"torch_bf16_addmm": lambda: torch.addmm(b16, x16, W16.t(), out=y16), "torch_bf16_fp32io": torch_bf16_fp32io}


def _cfg_bf16_affine(bench: Bench, rows: dict, d: int) -> dict:
    n = rows[d]
    title = f"bf16 affine {d}->{d} (+bias), bf16 operands, fp32 accumulation"
    labels = _affine_labels()
    why = _unavailable()
    if why:
        return _skipped(f"bf16_d{d}", title, n, labels, why)
    T = bench.threads
    x = bench.buf.get("x", (n, d), random=True)
    y = bench.buf.get("out", (n, d))
    x16, y16 = _bf16_rows(x, (n, d))
    W, b = bench.weights(d, d)
    op16 = FusedTransform.affine(W, b, precision="bf16")
    op32 = FusedTransform.affine(W, b)
    impls: dict[str, Callable[[], Any]] = {
        "bc_fast_bf16": lambda: op16.apply(x, out=y, threads=T),
        "bc_fast_bf16_io": lambda: op16.apply(x16, out=y16, threads=T),
        "bc_fast_fp32": lambda: op32.apply(x, out=y, threads=T),
    }
    note = (f"bc_fast_bf16 (backend {op16.bf16_backend}): fp32 x in, rounded to bf16 per tile, fp32 out; "
            "bc_fast_bf16_io: bf16 x in, bf16 out; bc_fast_fp32: the default fp32 path")
    if op16.bf16_backend == "native" and not load_onednn():
        op_dnn = FusedTransform.affine(W, b, precision="bf16", bf16_backend="onednn")
        impls["bc_fast_bf16_onednn"] = lambda: op_dnn.apply(x, out=y, threads=T)
        note += f"; bc_fast_bf16_onednn: fp32 io through oneDNN ({op_dnn._op.bf16_impl}), informational"
    if bench.torch is not None:
        impls.update(_affine_torch(bench, x, y, W, b))
        note += ("; torch_bf16_addmm: torch.addmm(b, x, W.T, out=) on bf16 tensors (bf16 in and out); "
                 "torch_bf16_fp32io: the same with fp32 x converted in and the result copied to fp32 out inside "
                 "the timing (our fp32 contract)")
    t = bench.measure(impls, large=True)
    op16.apply(x, out=y, threads=T)
    m = min(n, 256)
    err = max_abs_err(y[:m], x[:m].astype(np.float64) @ W.T.astype(np.float64) + b)
    checks = [speedup_check(labels[0][0], t, "torch_bf16_addmm", labels[0][1], bc="bc_fast_bf16_io"),
              speedup_check(labels[1][0], t, "torch_bf16_fp32io", labels[1][1], bc="bc_fast_bf16"),
              speedup_check(labels[2][0], t, "bc_fast_fp32", labels[2][1], bc="bc_fast_bf16")]
    return result(f"bf16_d{d}", title, n, t, checks, flops_per_call=2.0 * n * d * d, err=err, bc="bc_fast_bf16_io",
                  note=note, bf16_backend=op16.bf16_backend, bf16_impl=op16._op.bf16_impl)


#: bf16_mlp's one check: the label stays "eager" (torch's eager mode: both torch variants), the best counts.
MLP_LABEL = ("vs torch bf16 eager", 1.0)


def _mlp_layers() -> list[Layer]:
    """bf16_mlp's program: 256 -> 1024 (exact GELU) -> 256, fixed seed."""
    rng = np.random.default_rng(11)
    return [Layer((rng.standard_normal((MLP_HIDDEN, 256)) / 16).astype(np.float32),
                  rng.standard_normal(MLP_HIDDEN).astype(np.float32), "gelu"),
            Layer((rng.standard_normal((256, MLP_HIDDEN)) / 32).astype(np.float32),
                  rng.standard_normal(256).astype(np.float32))]


def _mlp_torch(torch: Any, F: Any, layers: list[Layer], x16: np.ndarray, y16: np.ndarray,
               h16: np.ndarray) -> dict[str, Callable[[], Any]]:
    """torch's bf16 MLP on bf16 rows: eager allocating (``F.linear``/``F.gelu``) and into preallocated buffers.

    ``torch_bf16_prealloc`` writes the hidden layer into ``h16`` and the result into ``y16`` (the
    output bc_fast writes): ``addmm(out=)``, ``aten.gelu_`` in place (exact erf GELU, as ours),
    ``addmm(out=)``, as the fp32 MLP configs' ``torch_prealloc``.
    """
    bf = torch.bfloat16
    xt, yt, ht = (torch.from_numpy(a.view(np.int16)).view(bf) for a in (x16, y16, h16))
    W1, b1, W2, b2 = (torch.from_numpy(a).to(bf) for a in
                      (layers[0].weight, layers[0].bias, layers[1].weight, layers[1].bias))

    def torch_bf16_prealloc() -> None:
        torch.addmm(b1, xt, W1.t(), out=ht)
        torch.ops.aten.gelu_(ht)
        torch.addmm(b2, ht, W2.t(), out=yt)
    return {"torch_bf16_eager": lambda: F.linear(F.gelu(F.linear(xt, W1, b1)), W2, b2),
            "torch_bf16_prealloc": torch_bf16_prealloc}


def _mlp_checks(t: dict[str, Timing]) -> list[dict]:
    """bf16_mlp's check against the faster torch variant (the allocating one is never the only baseline)."""
    best = min((k for k in t if k.startswith("torch_bf16")), key=lambda k: t[k].median_s, default="torch_bf16_eager")
    return [speedup_check(MLP_LABEL[0], t, best, MLP_LABEL[1], bc="bc_fast_bf16")]


def _cfg_bf16_mlp(bench: Bench, rows: dict) -> dict:
    n = rows[256]
    title = f"bf16 MLP 256->{MLP_HIDDEN} gelu->256, bf16 rows in and out"
    why = _unavailable()
    if why:
        return _skipped("bf16_mlp", title, n, [MLP_LABEL], why)
    T = bench.threads
    layers = _mlp_layers()
    op = FusedTransform(layers, precision="bf16")
    x16, y16 = _bf16_rows(bench.buf.get("x", (n, 256), random=True), (n, 256))
    impls: dict[str, Callable[[], Any]] = {"bc_fast_bf16": lambda: op.apply(x16, out=y16, threads=T)}
    note = (f"backend {op.bf16_backend}; torch_bf16_eager: F.linear, F.gelu (erf), F.linear on bf16 tensors "
            "(allocating); torch_bf16_prealloc: addmm(out=), aten.gelu_ in place, addmm(out=) into preallocated "
            "bf16 hidden and output buffers; the faster torch variant counts")
    if bench.torch is not None:
        h16 = bench.buf.get("hidden_bf16", (n, MLP_HIDDEN), np.int16).view(bfloat16())
        impls.update(_mlp_torch(bench.torch, bench.F, layers, x16, y16, h16))
    t = bench.measure(impls, large=True)
    op.apply(x16, out=y16, threads=T)
    m = min(n, 256)
    err = max_abs_err(y16[:m].astype(np.float32), apply_layers_reference(layers, x16[:m].astype(np.float32)))
    return result("bf16_mlp", title, n, t, _mlp_checks(t), flops_per_call=2.0 * n * 2 * 256 * MLP_HIDDEN, err=err,
                  bc="bc_fast_bf16", note=note, bf16_backend=op.bf16_backend, bf16_impl=op._op.bf16_impl)


def bf16_configs(rows: dict) -> list[tuple[Callable[..., dict], tuple]]:
    """The bf16 configs for ``rows`` (d -> rows; the MLP uses the d = 256 count), in running order."""
    configs: list[tuple[Callable[..., dict], tuple]] = [(_cfg_bf16_affine, (rows, d)) for d in rows]
    if 256 in rows:
        configs.append((_cfg_bf16_mlp, (rows,)))
    return configs
