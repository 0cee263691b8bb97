"""RoutedTransform: a mixture of per-cluster affine maps, routed per row, run by the compiled core.

For a row ``x`` the ``m`` clusters with the largest scores ``x . S_c + s_c`` (nearest centroids:
``S_c = 2 C_c``, ``s_c = -||C_c||^2``; ties to the lower index) are blended with softmax weights
``softmax(score / T)``: ``y = sum_j w_j (A_{c_j} x + b_{c_j})``, optionally L2-normalised. This is the
local adapter of :class:`bc_fast.fit.LocalAdapter` (its float64 reference:
:func:`bc_fast.fit._routing.routed_reference`).

The core groups a tile's rows by cluster, so each cluster's map runs as one GEMM; a row's result
does not depend on the rows beside it or on the thread count. Affine steps compose with it on both
sides without changing its form (:meth:`RoutedTransform.then_affine`, :meth:`after_affine`); a second
routed step or an MLP layer does not fuse into it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import _core
from .._util.arrays import as_numpy
from ._checks import INT_MAX, check_threads
from .operator import _check_batch, host_batch

__all__ = ["RoutedTransform", "centroid_scores64", "route64", "routed_map64"]

_NDARRAY = np.ndarray


def _f32(a: Any, shape: tuple[int, ...], name: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {arr.shape}")
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} holds NaN or Inf")
    return np.ascontiguousarray(arr, dtype=np.float32)


def centroid_scores64(centroids: Any) -> tuple[np.ndarray, np.ndarray]:
    """Nearest-centroid routing scores ``(2 C, -||C||^2)`` in float64 from (float32) centroids ``C`` (exact)."""
    c = np.asarray(centroids, dtype=np.float64)
    return 2.0 * c, -np.einsum("ij,ij->i", c, c)


def route64(x: Any, score_weight: Any, score_bias: Any, m: int, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """The top-``m`` clusters of each row (n, m; best first, ties to the lower index) and their softmax
    weights (n, m), in float64: the routing every float64 reference of the routed map shares."""
    x64 = np.asarray(x, dtype=np.float64)
    scores = x64 @ np.asarray(score_weight, np.float64).T + np.asarray(score_bias, np.float64)
    idx = np.argsort(-scores, axis=1, kind="stable")[:, :m]  # stable: ties keep the lower cluster index first
    top = np.take_along_axis(scores, idx, axis=1)
    w = np.exp((top - top[:, :1]) / float(temperature))
    w /= w.sum(axis=1, keepdims=True)
    return idx, w


def routed_map64(x: Any, score_weight: Any, score_bias: Any, weight: Any, bias: Any, m: int,
                 temperature: float) -> np.ndarray:
    """The routed map of rows ``x`` in float64 (the parameters upcast exactly): (n, d_out)."""
    x64 = np.asarray(x, dtype=np.float64)
    idx, w = route64(x64, score_weight, score_bias, m, temperature)
    a, b = np.asarray(weight, np.float64), np.asarray(bias, np.float64)
    y = np.zeros((x64.shape[0], a.shape[1]))
    for j in range(m):
        for c in np.unique(idx[:, j]):
            rows = np.nonzero(idx[:, j] == c)[0]
            y[rows] += w[rows, j, None] * (x64[rows] @ a[c].T + b[c])
    return y


class RoutedTransform:
    """A routed mixture of ``k`` affine maps ``d_in -> d_out`` applied to batches by the compiled core.

    Parameters
    ----------
    score_weight, score_bias : (k, d_in), (k,)
        Routing scores ``x . score_weight[c] + score_bias[c]``; :meth:`from_centroids` builds them for
        nearest-centroid routing.
    weight, bias : (k, d_out, d_in), (k, d_out)
        The per-cluster maps.
    m : int
        Clusters blended per row, 1 <= m <= k.
    temperature : float
        Softmax temperature, > 0.
    normalize : bool
        L2-normalise each output row.
    """

    def __init__(self, score_weight: Any, score_bias: Any, weight: Any, bias: Any, m: int, temperature: float, *,
                 normalize: bool = False) -> None:
        sw = np.asarray(score_weight)
        w = np.asarray(weight)
        if sw.ndim != 2 or w.ndim != 3 or w.shape[0] != sw.shape[0] or w.shape[2] != sw.shape[1]:
            raise ValueError(f"score_weight must be (k, d_in) and weight (k, d_out, d_in) with the same k and d_in, "
                             f"got {sw.shape} and {w.shape}")
        k, d_in = sw.shape
        d_out = w.shape[1]
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or not 1 <= m <= k:
            raise ValueError(f"m must be an integer in [1, k] = [1, {k}], got {m!r}")
        if not (isinstance(temperature, (int, float, np.floating)) and np.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        if not isinstance(normalize, (bool, np.bool_)):
            raise TypeError(f"normalize must be True or False, got {normalize!r}")
        self.score_weight = _f32(sw, (k, d_in), "score_weight")
        self.score_bias = _f32(score_bias, (k,), "score_bias")
        self.weight = _f32(w, (k, d_out, d_in), "weight")
        self.bias = _f32(bias, (k, d_out), "bias")
        self.m, self.temperature, self.normalize = int(m), float(temperature), bool(normalize)
        self._op = _core.RoutedOp(self.score_weight, self.score_bias, self.weight, self.bias, self.m,
                                  self.temperature, self.normalize)

    @classmethod
    def from_centroids(cls, centroids: Any, weight: Any, bias: Any, m: int, temperature: float, *,
                       normalize: bool = False) -> RoutedTransform:
        """Nearest-centroid routing: ``score_c = 2 x . C_c - ||C_c||^2`` (``-||x - C_c||^2`` up to a per-row
        constant), the norms computed in float64 from the float32 centroids."""
        c = np.asarray(centroids, dtype=np.float32)
        if c.ndim != 2:
            raise ValueError(f"centroids must be (k, d_in), got shape {c.shape}")
        return cls(*centroid_scores64(c), weight, bias, m, temperature, normalize=normalize)

    @classmethod
    def from_params(cls, params: Any, *, normalize: bool = False) -> RoutedTransform:
        """From a :class:`bc_fast.fit._routing.RoutedParams` or its ``as_dict()``."""
        p = params.as_dict() if hasattr(params, "as_dict") else dict(params)
        return cls.from_centroids(p["centroids"], p["weights"], p["bias"], p["m"], p["temperature"],
                                  normalize=normalize)

    @property
    def k(self) -> int:
        """Number of clusters."""
        return int(self.weight.shape[0])

    @property
    def d_in(self) -> int:
        """Number of input features."""
        return int(self.weight.shape[2])

    @property
    def d_out(self) -> int:
        """Number of output features."""
        return int(self.weight.shape[1])

    def __repr__(self) -> str:
        return (f"RoutedTransform({self.d_in} -> {self.d_out}, k={self.k}, m={self.m}, "
                f"temperature={self.temperature:g}{', normalize' if self.normalize else ''})")

    def then_affine(self, weight: Any, bias: Any = None) -> RoutedTransform:
        """``x -> P (routed x) + q``, as one routed transform (the blend weights sum to 1, so each map
        becomes ``P A_c``, ``P b_c + q``); products formed in float64. Not for a normalised transform."""
        if self.normalize:
            raise ValueError("an affine step after L2 normalisation does not fuse into the routed transform")
        p = np.asarray(weight, np.float64)
        if p.ndim != 2 or p.shape[1] != self.d_out:
            raise ValueError(f"weight must be (d, {self.d_out}) to follow this transform, got shape {p.shape}")
        q = np.zeros(p.shape[0]) if bias is None else np.asarray(bias, np.float64)
        a = np.einsum("ij,cjk->cik", p, self.weight.astype(np.float64))
        b = self.bias.astype(np.float64) @ p.T + q
        return RoutedTransform(self.score_weight, self.score_bias, a, b, self.m, self.temperature)

    def after_affine(self, weight: Any, bias: Any = None) -> RoutedTransform:
        """``x -> routed (G x + h)``, as one routed transform (scores and maps take G and h in); products
        formed in float64."""
        g = np.asarray(weight, np.float64)
        if g.ndim != 2 or g.shape[0] != self.d_in:
            raise ValueError(f"weight must be ({self.d_in}, d) to precede this transform, got shape {g.shape}")
        h = np.zeros(self.d_in) if bias is None else np.asarray(bias, np.float64)
        sw, a = self.score_weight.astype(np.float64), self.weight.astype(np.float64)
        return RoutedTransform(sw @ g, self.score_bias + sw @ h, np.einsum("cij,jk->cik", a, g),
                               self.bias + a @ h, self.m, self.temperature, normalize=self.normalize)

    def route(self, x: Any) -> tuple[np.ndarray, np.ndarray]:
        """The clusters (n, m; best first) and the blend weights (n, m) of each row of ``x``."""
        xa, _ = as_numpy(x, "x")
        _check_batch(xa, "x", self.d_in)
        return self._op.route(xa)

    def reference(self, x: Any) -> np.ndarray:
        """The transform in float64 (routing included), for validation: (n, d_out)."""
        y = routed_map64(x, self.score_weight, self.score_bias, self.weight, self.bias, self.m, self.temperature)
        if self.normalize:
            y /= np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
        return y

    def apply(self, x: Any, *, out: Any = None, out_dtype: Any = None, threads: int | None = None) -> Any:
        """Apply to a batch of rows: ``x`` (n, d_in) float32/float16 C-contiguous (numpy or CPU torch),
        ``out`` (n, d_out) written in place if given, ``out_dtype`` float32 (default) or float16, ``threads``
        as :meth:`bc_fast.FusedTransform.apply` (results bit-identical for every thread count). A batch of
        at most 8 rows splits each cluster's map by output columns over the calling thread and the small
        pool's helper thread, where two threads are free."""
        if (type(x) is _NDARRAY and (out is None or type(out) is _NDARRAY) and out_dtype is None
                and (threads is None or (type(threads) is int and 0 < threads <= INT_MAX))):
            try:  # the core checks shape, dtype, contiguity and overlap; on a complaint, the full checks below
                return self._op.apply(x, out, False, threads or 0)
            except (ValueError, TypeError):
                pass
        xa, oa, result = host_batch(x, out, out_dtype, self.d_in, self.d_out)
        n_threads = 0 if threads is None else check_threads(threads)
        if xa.shape[0]:
            self._op.apply(xa, oa, False, n_threads)
        return result

    __call__ = apply
