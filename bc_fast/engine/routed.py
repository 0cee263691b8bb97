"""RoutedTransform: a mixture of per-cluster affine maps, routed per row, run by the compiled core.

For a row ``x`` the ``m`` clusters with the largest scores ``x . S_c + s_c`` (nearest centroids:
``S_c = 2 C_c``, ``s_c = -||C_c||^2``; ties to the lower index) are blended with softmax weights
``softmax(score / T)``: ``y = sum_j w_j (A_{c_j} x + b_{c_j})``, optionally L2-normalised. This is the
local adapter of :class:`bc_fast.fit.LocalAdapter` (its float64 reference:
:func:`bc_fast.fit._routing.routed_reference`).

The core groups a tile's rows by cluster, so each cluster's map runs as one GEMM; a row's result
does not depend on the rows beside it or on the thread count. Its float32 scores are 1, 2 or 4 ordered
chains over consecutive parts of ``d_in``, summed in order (4 for k <= 16), so that a few rows read a
small panel of the score weights; the float64 reference is unaffected. Affine steps compose with it on both
sides without changing its form (:meth:`RoutedTransform.then_affine`, :meth:`after_affine`); a second
routed step or an MLP layer does not fuse into it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import _core
from .._util.arrays import as_numpy
from ._checks import INT_MAX
from .operator import _check_batch, apply_on_host

__all__ = ["RoutedParams", "RoutedTransform", "centroid_scores64", "check_params", "route64", "routed_map64"]

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


@dataclass(frozen=True, eq=False)
class RoutedParams:
    """The routed map's parameters as fitted (:class:`bc_fast.fit.LocalAdapter`) and stored (a registry's
    routed step): float32 C-contiguous ``centroids`` (k, d_in), ``weights`` (k, d_out, d_in), ``bias``
    (k, d_out), ``m`` and ``temperature``; nearest-centroid routing (:meth:`RoutedTransform.from_centroids`)."""

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

    def spec(self) -> dict:
        """``{d_in, d_out, k, m, temperature}``: what a registry's manifest and file metadata record."""
        return {"d_in": self.d_in, "d_out": self.d_out, "k": self.k, "m": self.m, "temperature": self.temperature}

    def scores64(self) -> tuple[np.ndarray, np.ndarray]:
        """The routing scores ``(2 C, -||C||^2)`` in float64 (exact from the float32 centroids)."""
        return centroid_scores64(self.centroids)

    def reference(self, x: Any) -> np.ndarray:
        """The routed map of rows ``x`` (n, d_in) in float64."""
        return routed_map64(x, *self.scores64(), self.weights, self.bias, self.m, self.temperature)

    def operator(self, *, normalize: bool = False) -> RoutedTransform:
        """The compiled routed operator."""
        return RoutedTransform.from_params(self, normalize=normalize)

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
        as :meth:`bc_fast.FusedTransform.apply` (results bit-identical for every thread count and batch
        size). A batch of at most 8 rows splits its clusters' maps, in halves of (cluster, output columns)
        units, over the calling thread and the small pool's helper thread where two threads are free
        (at batch 1 with m = 2: one cluster's map each)."""
        if (type(x) is _NDARRAY and (out is None or type(out) is _NDARRAY) and out_dtype is None
                and (threads is None or (type(threads) is int and 0 < threads <= INT_MAX))):
            try:  # the core checks shape, dtype, contiguity and overlap; on a complaint, the full checks below
                return self._op.apply(x, out, False, threads or 0)
            except (ValueError, TypeError):
                pass
        return apply_on_host(self._op, x, out, out_dtype, threads, self.d_in, self.d_out)

    __call__ = apply
