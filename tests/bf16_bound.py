"""The error bound of precision="bf16" against float64, shared by the native and the oneDNN backend's tests."""

from __future__ import annotations

import numpy as np

from bc_fast import FusedTransform, Layer
from bc_fast.engine.fusion import apply_layers_reference

U_BF16 = 2.0**-8   # unit roundoff of bf16 (8 significant bits), round to nearest even
U_F32 = 2.0**-24
GELU_LIP = 1.13    # max |gelu'(z)| = 1.1289 (at z = sqrt 2)
TINY = 2.0**-126   # subnormals flushed to zero by vdpbf16ps


def layer_bound(x: np.ndarray, e_in: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-output bound on |y - y_exact| for one bf16 layer, given an input error bound e_in.

    Both operands rounded to bf16: each product's relative error <= 2 u + u^2 (u = 2^-8); the fp32
    accumulation adds at most (d_in + 2) roundings of 2^-24 (bias add included), 1.01 for gamma_n's
    denominator; a propagated input error costs |W| e_in; flushed subnormals a tiny absolute term.
    """
    aw = np.abs(w)
    s = (np.abs(x) + e_in) @ aw.T
    d_in = w.shape[1]
    return (e_in @ aw.T + (2 * U_BF16 + U_BF16**2) * s + 1.01 * (d_in + 2) * U_F32 * (s + np.abs(b))
            + (d_in + 1) * TINY * (1 + aw.max()))


def program_bound(layers: list[Layer], x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(float64 reference before normalisation, per-output error bound) through a layer program."""
    y = x.astype(np.float64)
    e = np.zeros_like(y)
    for layer in layers:
        w = layer.weight.astype(np.float64)
        b = np.zeros(w.shape[0]) if layer.bias is None else layer.bias.astype(np.float64)
        e = layer_bound(y, e, w, b)
        if layer.activation == "gelu":
            # Lipschitz factor, plus the kernel's erf approximation (|err| < 1.5e-7) and fp32 steps.
            z = apply_layers_reference([Layer(layer.weight, layer.bias)], y)
            e = GELU_LIP * e + 1e-6 * (1 + np.abs(z))
        y = apply_layers_reference([layer], y)  # relu is 1-Lipschitz: e carries over
    return y, e


def rand_layers(rng: np.random.Generator, dims: list[int], acts: list[str], bias: bool = True) -> list[Layer]:
    layers = []
    for d_in, d_out, act in zip(dims[:-1], dims[1:], acts):
        w = (rng.standard_normal((d_out, d_in)) / np.sqrt(d_in)).astype(np.float32)
        b = rng.standard_normal(d_out).astype(np.float32) if bias else None
        layers.append(Layer(w, b, act))
    return layers


def check_within_bound(op: FusedTransform, layers: list[Layer], x: np.ndarray, out_dtype=np.float32) -> None:
    y = op.apply(x, out_dtype=out_dtype).astype(np.float64)
    ref, e = program_bound(layers, x.astype(np.float64))
    if op.normalize:
        norm = np.maximum(np.linalg.norm(ref, axis=1, keepdims=True), 1e-12)
        ref = ref / norm
        # ||a/|a| - b/|b| || <= 2 ||a - b|| / |b|, per row.
        e = np.broadcast_to(2 * np.linalg.norm(e, axis=1, keepdims=True) / norm + 1e-6, ref.shape)
    if np.dtype(out_dtype) == np.float16:
        e = e * (1 + 2.0**-11) + 2.0**-11 * np.abs(ref) + 2.0**-24
    err = np.abs(y - ref)
    assert np.all(err <= e), f"max err/bound {np.max(err / e):.3g}"
