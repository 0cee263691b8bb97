"""Layer: one step of a fused layer program, and its validation.

A layer computes ``y = x @ W.T + b`` and then applies an activation to its leading
``activation_width`` outputs. :func:`validate_layer` makes the private, read-only,
contiguous copies that the compiled core is handed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .._util.arrays import as_numpy, is_torch

ACTIVATIONS = ("none", "relu", "gelu")


@dataclass(frozen=True)
class Layer:
    """One affine layer ``y = x @ weight.T + bias`` followed by an activation.

    Parameters
    ----------
    weight : ndarray of shape (d_out, d_in)
    bias : ndarray of shape (d_out,) or None
    activation : {"none", "relu", "gelu"}
        ``gelu`` is the exact (erf) form, as ``torch.nn.functional.gelu``.
    activation_width : int or None
        The activation applies to outputs ``[0, activation_width)`` only; the rest
        pass through unchanged. None means all outputs. This lets residual blocks
        (``P x + W2 act(W1 x)``) be written as a plain layer program.
    """

    weight: np.ndarray
    bias: np.ndarray | None = None
    activation: str = "none"
    activation_width: int | None = None

    @property
    def d_in(self) -> int:
        """Input dimension of the layer."""
        return int(self.weight.shape[1])

    @property
    def d_out(self) -> int:
        """Output dimension of the layer."""
        return int(self.weight.shape[0])

    @property
    def is_affine(self) -> bool:
        """True when the layer has no (effective) activation."""
        return self.activation == "none" or self.activation_width == 0


def _frozen(a: np.ndarray, dtype: Any) -> np.ndarray:
    """A private, read-only, C-contiguous copy: later edits of the caller's array cannot reach it."""
    out = np.array(a, dtype=dtype, order="C", copy=True)
    out.flags.writeable = False
    return out


def _param_numpy(value: Any, name: str) -> np.ndarray:
    """A weight or bias (numpy, torch on any device, array-like) as a numpy array, or a clear error."""
    if is_torch(value) and hasattr(value, "detach"):
        if value.device.type == "meta":
            raise ValueError(f"{name} is a torch tensor on the meta device, which holds no values; "
                             "load or materialise the weights first")
        if str(value.dtype) == "torch.bfloat16":
            value = value.detach().float()  # numpy has no bfloat16; float32 holds it exactly
    try:
        a, _ = as_numpy(value, name, copy_from_device=True)
    except (RuntimeError, NotImplementedError) as e:
        raise ValueError(f"{name}: cannot read this tensor's values on the CPU ({e})") from e
    return a


def _check_float32_range(a: np.ndarray, name: str, dtype: Any) -> None:
    """Finite float64 values beyond float32's range would silently become Inf in the core."""
    if dtype == np.float32 and a.dtype.itemsize > 4 and a.size:
        big = float(np.max(np.abs(a)))
        if big > float(np.finfo(np.float32).max):
            raise ValueError(f"{name} has values beyond float32 range (max |value| = {big:.3g}); "
                             "the core computes in float32: rescale the weights")


def check_float32_range(layer: Layer, where: str) -> None:
    """ValueError when a checked layer's (float64) weight or bias holds finite values beyond float32's range.

    :func:`validate_layer` with ``keep_float64=True`` keeps such values (the registry stores weights exactly);
    a stored step must still be one the float32 core can run.
    """
    _check_float32_range(layer.weight, f"{where}.weight", np.float32)
    if layer.bias is not None:
        _check_float32_range(layer.bias, f"{where}.bias", np.float32)


def validate_layer(layer: Any, where: str, d_prev: int | None = None, *, keep_float64: bool = False) -> Layer:
    """Check one layer and return it with private, read-only, contiguous copies of its arrays.

    Parameters
    ----------
    layer : Layer
        Its ``weight`` and ``bias`` may be numpy arrays or torch tensors (detached, copied).
    where : str
        How error messages name the layer, e.g. ``"layers[2]"``.
    d_prev : int, optional
        Output dimension of the previous layer, checked against ``d_in``.
    keep_float64 : bool, default False
        Keep float64 weights as float64 (the registry stores them exactly); otherwise float32,
        the compiled core's weight dtype.
    """
    if not isinstance(layer, Layer):
        raise TypeError(f"{where} must be a bc_fast.Layer, got {type(layer).__name__}")
    w = _param_numpy(layer.weight, f"{where}.weight")
    if w.ndim != 2 or w.shape[0] == 0 or w.shape[1] == 0:
        raise ValueError(f"{where}.weight must be a non-empty 2-D array (d_out, d_in), got shape {w.shape}")
    if not np.issubdtype(w.dtype, np.floating):
        raise TypeError(f"{where}.weight must be a floating-point array, got dtype {w.dtype}")
    if not np.all(np.isfinite(w)):
        raise ValueError(f"{where}.weight contains NaN or Inf")
    if d_prev is not None and w.shape[1] != d_prev:
        raise ValueError(f"{where}.weight has d_in={w.shape[1]} but the previous layer outputs {d_prev} features")
    dtype = np.float64 if keep_float64 and w.dtype == np.float64 else np.float32
    _check_float32_range(w, f"{where}.weight", dtype)
    b = layer.bias
    if b is not None:
        b = _param_numpy(b, f"{where}.bias")
        if b.shape != (w.shape[0],):
            raise ValueError(f"{where}.bias must have shape ({w.shape[0]},), got {b.shape}")
        if not np.issubdtype(b.dtype, np.floating):
            raise TypeError(f"{where}.bias must be a floating-point array, got dtype {b.dtype}")
        if not np.all(np.isfinite(b)):
            raise ValueError(f"{where}.bias contains NaN or Inf")
        _check_float32_range(b, f"{where}.bias", dtype)
        b = _frozen(b, dtype)
    if layer.activation not in ACTIVATIONS:
        raise ValueError(f"{where}.activation must be one of {ACTIVATIONS}, got {layer.activation!r}")
    width = layer.activation_width
    if width is not None:
        if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or not 0 <= int(width) <= w.shape[0]:
            raise ValueError(f"{where}.activation_width must be an integer in [0, {w.shape[0]}], got {width!r}")
        width = int(width)
    return Layer(_frozen(w, dtype), b, layer.activation, width)
