"""Chain fusion: compose backward transforms into one short layer program.

A backward transform is a list of :class:`~bc_fast.engine.Layer`. A chain of them
(``B_k``, then ``B_{k-1}``, ... ) is fused in float64:

* every run of consecutive affine layers (no activation) collapses into ONE
  matrix and bias, so a fully affine chain becomes exactly one layer;
* layers with an activation stay program steps. An affine run that directly
  precedes an activation layer is folded into it when that does not cost more
  multiply-adds than keeping it separate (``act(W2 (W1 x + b1) + b2)`` is
  ``act((W2 W1) x + (W2 b1 + b2))``).

The result is cast back to float32, the core's weight dtype.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .._util.blas import single_threaded_blas
from .layer import Layer, validate_layer

__all__ = ["fuse_chain", "apply_layers_reference", "flatten_chain", "chain_flops"]

_erf = np.frompyfunc(math.erf, 1, 1)


def _erf64(x: np.ndarray) -> np.ndarray:
    """Elementwise float64 erf (exact, via math.erf)."""
    return np.asarray(_erf(x), dtype=np.float64)


def _check(layer: object, where: str) -> Layer:
    return validate_layer(layer, where, keep_float64=True)


def flatten_chain(steps: Sequence[Sequence[Layer]]) -> list[Layer]:
    """Concatenate the steps' layers in application order, checking dimensions.

    Parameters
    ----------
    steps : sequence of sequences of Layer
        ``steps[0]`` is applied first (for ``src=k, dst=j``: ``B_k, B_{k-1}, ..., B_{j+1}``).
    """
    return _flatten(steps)[0]


def _flatten(steps: Sequence[Sequence[Layer]]) -> tuple[list[Layer], list[int]]:
    """:func:`flatten_chain`'s layers, and for each layer the index of the step it came from."""
    out: list[Layer] = []
    origin: list[int] = []
    d_prev: int | None = None
    for s, step in enumerate(steps):
        if isinstance(step, Layer):
            raise TypeError(f"steps[{s}] is a single Layer; pass a list of steps, each a list of Layers")
        step = list(step)
        if not step:
            raise ValueError(f"steps[{s}] has no layers")
        for i, layer in enumerate(step):
            layer = _check(layer, f"steps[{s}][{i}]")
            if d_prev is not None and layer.d_in != d_prev:
                raise ValueError(
                    f"steps[{s}][{i}] expects d_in={layer.d_in} but the previous layer outputs {d_prev} "
                    f"features; the chain's steps must be ordered newest first (B_k, B_(k-1), ...)")
            d_prev = layer.d_out
            out.append(layer)
            origin.append(s)
    if not out:
        raise ValueError("the chain has no steps")
    return out, origin


def _w64(layer: Layer) -> tuple[np.ndarray, np.ndarray]:
    w = np.asarray(layer.weight, dtype=np.float64)
    b = np.zeros(w.shape[0]) if layer.bias is None else np.asarray(layer.bias, dtype=np.float64)
    return w, b


def _to_layer(w: np.ndarray, b: np.ndarray, activation: str = "none", width: int | None = None) -> Layer:
    bias = None if not np.any(b) else np.ascontiguousarray(b, dtype=np.float32)
    return Layer(np.ascontiguousarray(w, dtype=np.float32), bias, activation, width)


#: One step of a fused program: float64 (weight, bias, activation, width), and the chain steps it fuses.
_Fused = tuple[np.ndarray, np.ndarray, str, int | None, range]


def _check_fused_range(entry: _Fused, names: Sequence[str]) -> None:
    """ValueError when a fused float64 step holds values float32 cannot (they would become Inf in the core)."""
    w, b, _, _, span = entry
    big = max(float(np.max(np.abs(w))), float(np.max(np.abs(b))) if b.size else 0.0)
    if not big <= float(np.finfo(np.float32).max):  # NaN too: Inf - Inf in a float64 product
        which = ", ".join(names[i] for i in span)
        raise ValueError(
            f"the fused chain of {which} exceeds float32 range (max |value| = {big:.3g}): each step's weights are "
            "finite, but composed in float64 they are not representable in float32, the core's weight dtype; "
            "rescale the steps' weights")


def fuse_chain(steps: Sequence[Sequence[Layer]], *, fold_into_activation: bool = True,
               labels: Sequence[str] | None = None) -> list[Layer]:
    """Fuse a chain of transforms into a short float32 layer program.

    Parameters
    ----------
    steps : sequence of sequences of Layer
        Transforms in application order (``steps[0]`` first). Each is a list of layers.
    fold_into_activation : bool, default True
        Fold an affine run into the following activation layer when that costs no
        more multiply-adds.
    labels : sequence of str, optional
        A name per step for error messages (e.g. ``"2 -> 1"``); default ``steps[i]``.

    Returns
    -------
    list of Layer
        Equivalent program, composed in float64 and stored as float32. A chain with no
        activation returns exactly one layer. Zero biases are dropped (``bias=None``).
        ValueError when a fused layer holds values beyond float32's range.
    """
    layers, origin = _flatten(steps)
    names = [f"steps[{i}]" for i in range(origin[-1] + 1)] if labels is None else [str(n) for n in labels]
    if len(names) <= origin[-1]:
        raise ValueError(f"labels names {len(names)} steps, but the chain has {origin[-1] + 1}")
    # Small products: OpenBLAS workers would spin beside the core afterwards. Overflow is reported below.
    with single_threaded_blas(), np.errstate(over="ignore", invalid="ignore"):
        program = _fused_program(layers, origin, fold_into_activation)
    for entry in program:
        _check_fused_range(entry, names)
    return [_to_layer(*entry[:4]) for entry in program]


def _fused_program(layers: list[Layer], origin: list[int], fold_into_activation: bool) -> list[_Fused]:
    """The float64 program of :func:`fuse_chain`; ``origin[i]`` is the step ``layers[i]`` came from."""
    program: list[_Fused] = []
    run_w: np.ndarray | None = None  # pending affine run, float64
    run_b: np.ndarray | None = None
    run_first = run_last = 0  # the steps the pending run starts and ends in
    for layer, s in zip(layers, origin):
        w, b = _w64(layer)
        if layer.is_affine:
            if run_w is None:
                run_w, run_b, run_first = w, b, s
            else:
                run_w, run_b = w @ run_w, w @ run_b + b
            run_last = s
            continue
        first = s
        if run_w is not None:
            d_run_in, d_mid = run_w.shape[1], run_w.shape[0]
            fused_cost = w.shape[0] * d_run_in
            split_cost = d_mid * d_run_in + w.shape[0] * d_mid
            if fold_into_activation and fused_cost <= split_cost:
                w, b, first = w @ run_w, w @ run_b + b, run_first
            else:
                program.append((run_w, run_b, "none", None, range(run_first, run_last + 1)))
            run_w = run_b = None
        program.append((w, b, layer.activation, layer.activation_width, range(first, s + 1)))
    if run_w is not None:
        program.append((run_w, run_b, "none", None, range(run_first, run_last + 1)))
    return program


def chain_flops(layers: Sequence[Layer]) -> int:
    """Multiply-adds per row of a layer program (``sum d_out * d_in``)."""
    return int(sum(l.d_out * l.d_in for l in layers))


def apply_layers_reference(layers: Sequence[Layer], x: np.ndarray) -> np.ndarray:
    """Apply a layer program step by step in float64 (the test/verify reference).

    Parameters
    ----------
    layers : sequence of Layer
    x : ndarray of shape (n, d_in)

    Returns
    -------
    ndarray of shape (n, d_out), float64
        ``gelu`` is the exact erf form, as ``torch.nn.functional.gelu``.
    """
    y = np.asarray(x, dtype=np.float64)
    if y.ndim != 2:
        raise ValueError(f"x must be 2-D (n, d_in), got shape {y.shape}")
    for i, layer in enumerate(layers):
        layer = _check(layer, f"layers[{i}]")
        if y.shape[1] != layer.d_in:
            raise ValueError(f"layers[{i}] expects {layer.d_in} features, got {y.shape[1]}")
        w, b = _w64(layer)
        y = y @ w.T + b
        if layer.is_affine:
            continue
        width = layer.d_out if layer.activation_width is None else int(layer.activation_width)
        head = y[:, :width]
        if layer.activation == "relu":
            y[:, :width] = np.maximum(head, 0.0)
        else:  # gelu, exact
            y[:, :width] = 0.5 * head * (1.0 + _erf64(head / math.sqrt(2.0)))
    return y
