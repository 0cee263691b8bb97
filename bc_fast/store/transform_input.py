"""What a registry accepts as a transform, turned into a checked list of :class:`~bc_fast.engine.Layer`.

What lives here: :func:`as_layers` (a list of Layer, a ``(W, b)`` pair, a weight matrix, a
:class:`~bc_fast.engine.FusedTransform`, a ``bc_fast.train`` module, an ``nn.Linear``-like object) and
the inference of a transform's kind (linear, affine, mlp) from its layers. Nothing here touches the
disk; :mod:`.registry` calls it before writing a transform. It may import :mod:`bc_fast.engine` and
``bc_fast._util`` only.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .._util.arrays import as_numpy
from ..engine import FusedTransform, Layer, validate_layer
from ..engine.layer import check_float32_range

__all__ = ["as_layers"]


def _to_numpy(a: Any, where: str) -> np.ndarray:
    return None if a is None else as_numpy(a, where, copy_from_device=True)[0]  # type: ignore[return-value]


def _clean_layer(layer: Layer, where: str) -> Layer:
    layer = validate_layer(layer, where, keep_float64=True)
    check_float32_range(layer, where)  # float64 weights are stored exactly, but the core runs them in float32
    if layer.bias is not None and not np.any(layer.bias):
        layer = Layer(layer.weight, None, layer.activation, layer.activation_width)
    return layer


def _fused_layers(op: FusedTransform) -> list[Layer]:
    """The layers of a FusedTransform; ValueError when it carries serving options a stored step cannot keep.

    A stored step is weights only: normalisation and bf16 arithmetic are chosen when the chain is served.
    """
    if op.normalize:
        raise ValueError(
            "cannot store a FusedTransform built with normalize=True: normalisation is a property of the served "
            "operator, not of a stored step (a chain normalises once, at its end). Store the weights (pass "
            "op.layers, or build it with normalize=False) and normalise when serving: "
            "reg.operator(src, dst, normalize=True), build_legacy_index(..., normalize=True) or "
            "convert_table(..., normalize=True)")
    if op.precision != "fp32":
        raise ValueError(
            f"cannot store a FusedTransform built with precision={op.precision!r}: the arithmetic is a property "
            "of the served operator, not of a stored step, and storing only its weights would change its "
            "results. Store the weights (pass op.layers, or build it with precision='fp32') and choose the "
            f"arithmetic when serving: reg.operator(src, dst, precision={op.precision!r})")
    return list(op.layers)


def as_layers(transform: Any) -> list[Layer]:
    """Normalise a transform to a list of :class:`Layer`.

    Accepts a list of Layer, one Layer, a :class:`FusedTransform`, a ``(W, b)``
    pair (``b`` may be None), a bare weight matrix ``W`` of shape (d_out, d_in), an
    object with ``export_layers()`` or ``export()`` (the modules in ``bc_fast.train``), or a torch
    ``nn.Linear``-like module with ``weight``/``bias``. A FusedTransform with ``normalize=True`` or
    ``precision="bf16"`` is refused (ValueError): those are chosen when serving (``Registry.operator``).
    Weights beyond float32's range are refused (ValueError): the core computes in float32.
    """
    name = type(transform).__name__
    if transform is None:
        raise TypeError("transform is None; pass a list of Layer, (W, b), or a module with export_layers()")
    if hasattr(transform, "export_layers"):
        layers = list(transform.export_layers())
    elif callable(getattr(transform, "export", None)) and not isinstance(transform, (FusedTransform, Layer)):
        layers = list(transform.export())  # bc_fast.train transforms
    elif isinstance(transform, FusedTransform):
        layers = _fused_layers(transform)
    elif isinstance(transform, Layer):
        layers = [transform]
    elif isinstance(transform, (list, tuple)) and transform and all(isinstance(l, Layer) for l in transform):
        layers = list(transform)
    elif isinstance(transform, tuple) and len(transform) == 2 and not isinstance(transform[0], Layer):
        layers = [Layer(_to_numpy(transform[0], "W"), _to_numpy(transform[1], "b"))]
    elif isinstance(transform, np.ndarray) or type(transform).__module__.startswith("torch") and hasattr(transform, "ndim"):
        layers = [Layer(_to_numpy(transform, "W"))]
    elif hasattr(transform, "weight") and hasattr(transform, "bias"):  # nn.Linear-like
        layers = [Layer(_to_numpy(transform.weight, f"{name}.weight"), _to_numpy(transform.bias, f"{name}.bias"))]
    else:
        raise TypeError(
            f"cannot read a transform from {name}; pass a list of bc_fast.Layer, a (W, b) pair, "
            f"a weight matrix, or an object with export_layers()")
    if not layers:
        raise ValueError(f"transform {name} exports no layers")
    out: list[Layer] = []
    for i, layer in enumerate(layers):
        if not isinstance(layer, Layer):
            raise TypeError(f"transform layer {i} must be a bc_fast.Layer, got {type(layer).__name__}")
        layer = _clean_layer(layer, f"layers[{i}]")
        if out and layer.d_in != out[-1].d_out:
            raise ValueError(f"layers[{i}] expects d_in={layer.d_in} but layers[{i - 1}] outputs {out[-1].d_out}")
        out.append(layer)
    return out


def _infer_kind(layers: Sequence[Layer]) -> str:
    if all(l.is_affine for l in layers):
        return "linear" if all(l.bias is None for l in layers) else "affine"
    return "mlp"
