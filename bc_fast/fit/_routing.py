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
from typing import Any

import numpy as np

from ..engine.routed import RoutedParams, centroid_scores64, check_params, route64, routed_map64

__all__ = ["RoutedParams", "check_params", "route", "routed_reference"]


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
