"""The routed (local, mixture-of-experts) map and its float64 reference: the contract of the compiled operator.

Parameters (:class:`RoutedParams`, all arrays C-contiguous float32):

========== ====================== =====================================================
name       shape                  meaning
========== ====================== =====================================================
centroids  (k, d_in)              cluster centres ``C_c`` (k-means on the source rows)
weights    (k, d_out, d_in)       per-cluster matrix ``A_c`` (row-major, like Layer.weight)
bias       (k, d_out)             per-cluster offset ``b_c``
m          int, 1 <= m <= k       clusters blended per row
temperature float > 0             softmax temperature ``T``
========== ====================== =====================================================

For one row ``x`` (d_in,):

1. ``score_c = 2 x . C_c - ||C_c||^2`` for c = 0..k-1 (= ``-||x - C_c||^2`` up to the per-row
   constant ``||x||^2``: the nearest centroid has the largest score);
2. the ``m`` largest scores ``s_1 >= ... >= s_m`` and their clusters ``c_1 .. c_m``; ties go to the
   lower cluster index;
3. ``w_j = exp((s_j - s_1) / T) / sum_i exp((s_i - s_1) / T)`` (softmax of ``s / T``, max subtracted);
4. ``y = sum_j w_j (A_{c_j} x + b_{c_j})``.

With ``m = 1`` this is the map of the nearest centroid's cluster (T plays no part); with
``m = k`` and ``T -> inf`` the plain average of all maps. :func:`routed_reference` computes it in
float64 from the float32 parameters (upcast exactly), which is what the compiled operator is
validated against; the compiled operator is :class:`bc_fast.engine.routed.RoutedTransform`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..engine.routed import centroid_scores64, route64, routed_map64

__all__ = ["RoutedParams", "route", "routed_reference"]


@dataclass(frozen=True)
class RoutedParams:
    """The routed map's parameters (see the module docstring); arrays are float32, C-contiguous."""

    centroids: np.ndarray
    weights: np.ndarray
    bias: np.ndarray
    m: int
    temperature: float

    def __post_init__(self) -> None:
        for name in ("centroids", "weights", "bias"):
            object.__setattr__(self, name, np.ascontiguousarray(getattr(self, name), dtype=np.float32))
        object.__setattr__(self, "m", int(self.m))
        object.__setattr__(self, "temperature", float(self.temperature))
        check_params(self)

    @property
    def k(self) -> int:
        """Number of clusters."""
        return int(self.centroids.shape[0])

    @property
    def d_in(self) -> int:
        """Source dimension."""
        return int(self.centroids.shape[1])

    @property
    def d_out(self) -> int:
        """Target dimension."""
        return int(self.weights.shape[1])

    def as_dict(self) -> dict[str, Any]:
        """``{"centroids", "weights", "bias", "m", "temperature"}``: the layout the compiled operator takes."""
        return {"centroids": self.centroids, "weights": self.weights, "bias": self.bias, "m": self.m,
                "temperature": self.temperature}


def check_params(p: Any) -> None:
    """Refuse inconsistent shapes, non-finite values, m outside [1, k] and T <= 0 (ValueError naming the field)."""
    c, a, b = p.centroids, p.weights, p.bias
    if c.ndim != 2 or c.shape[0] < 1 or c.shape[1] < 1:
        raise ValueError(f"routed params: centroids must be (k, d_in) with k, d_in >= 1, got shape {c.shape}")
    k, d_in = c.shape
    if a.ndim != 3 or a.shape[0] != k or a.shape[2] != d_in or a.shape[1] < 1:
        raise ValueError(f"routed params: weights must be (k, d_out, d_in) = ({k}, d_out, {d_in}) to match the "
                         f"centroids {c.shape}, got shape {a.shape}")
    if b.shape != (k, a.shape[1]):
        raise ValueError(f"routed params: bias must be (k, d_out) = ({k}, {a.shape[1]}), got shape {b.shape}")
    if not 1 <= p.m <= k:
        raise ValueError(f"routed params: m must be in [1, k] = [1, {k}], got {p.m}")
    if not (np.isfinite(p.temperature) and p.temperature > 0):
        raise ValueError(f"routed params: temperature must be a finite number > 0, got {p.temperature}")
    for name, arr in (("centroids", c), ("weights", a), ("bias", b)):
        if not np.isfinite(arr).all():
            raise ValueError(f"routed params: {name} holds NaN or Inf")


def _as_params(params: RoutedParams | Mapping[str, Any]) -> RoutedParams:
    if isinstance(params, RoutedParams):
        return params
    missing = {"centroids", "weights", "bias", "m", "temperature"} - set(params)
    if missing:
        raise ValueError(f"routed params lack {sorted(missing)}; expected keys centroids, weights, bias, m, temperature")
    return RoutedParams(params["centroids"], params["weights"], params["bias"], params["m"], params["temperature"])


def _rows(x: Any, d_in: int, dtype: type) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 2 or a.shape[1] != d_in:
        raise ValueError(f"x must be (n, {d_in}) for these routed params, got shape {a.shape}")
    if a.dtype.kind not in "fiu":
        raise TypeError(f"x must hold real numbers, got dtype {a.dtype}")
    a = np.ascontiguousarray(a, dtype=dtype)
    if not np.isfinite(a).all():
        raise ValueError(f"x has {int((~np.isfinite(a).all(axis=1)).sum())} row(s) with NaN or Inf")
    return a


def route(x: np.ndarray, centroids: np.ndarray, m: int, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """Top-``m`` clusters of each row and their softmax weights, in float64.

    Returns ``(idx (n, m) int64, w (n, m) float64)``; ``idx[:, 0]`` is the nearest centroid.
    """
    return route64(x, *centroid_scores64(centroids), m, temperature)


def routed_reference(x: Any, params: RoutedParams | Mapping[str, Any]) -> np.ndarray:
    """The routed map of every row of ``x`` (n, d_in), exactly as the module docstring defines it, in float64.

    ``params``: a :class:`RoutedParams` or a dict with its fields. Returns float64 (n, d_out).
    """
    p = _as_params(params)
    x64 = _rows(x, p.d_in, np.float64)
    return routed_map64(x64, *centroid_scores64(p.centroids), p.weights, p.bias, p.m, p.temperature)
