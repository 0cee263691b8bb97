"""Closed-form solutions from the sums in :class:`~bc_fast.fit._gram.Gram` (float64).

Each solver returns ``(wt, b)`` with the map ``y_hat = x @ wt + b`` (``wt`` of shape
(d_src, d_dst)); low-rank also returns its factors.

Ridge: ``wt = (Xc^T Xc + alpha I)^-1 Xc^T Yc``, ``b = mean_y - mean_x @ wt`` (the intercept is
not penalised). The centred Gram is eigendecomposed once (``C = V diag(lam) V^T``), after which
every alpha costs one scaling: ``wt(alpha) = V diag(1 / (lam + alpha)) V^T Xc^T Yc``. With
``alpha = 0`` eigenvalues below ``lam_max * d * eps`` are dropped: the minimum-norm least-squares
solution, as ``numpy.linalg.lstsq``.

Alpha grid (``alpha=None``): ``{0} U mean(lam) * 10**k`` for k in -8, -7.5, ..., 2 (21 values,
relative to the mean eigenvalue, so the grid does not depend on the scale or count of the rows).
The value with the lowest validation MSE wins (ties: the smaller alpha). Refitting on all rows
scales the chosen alpha by ``n_all / n_train`` so the penalty per row stays the same.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from ._gram import Gram, PairStats

ALPHA_GRID_EXPONENTS = np.arange(-8.0, 2.0 + 1e-9, 0.5)


@dataclass
class RidgePath:
    """The eigendecomposition of one Gram, reused for every alpha."""

    lam: np.ndarray       # eigenvalues of the centred X^T X, ascending
    v: np.ndarray         # eigenvectors (columns)
    g: np.ndarray         # V^T Xc^T Yc
    mean_x: np.ndarray
    mean_y: np.ndarray
    n: int

    @classmethod
    def of(cls, gram: Gram) -> "RidgePath":
        """Decompose ``gram``'s centred ``X^T X``."""
        c, cxy = gram.centred()
        lam, v = np.linalg.eigh((c + c.T) / 2)
        lam = np.maximum(lam, 0.0)
        return cls(lam, v, v.T @ cxy, gram.mean_x, gram.mean_y, gram.n)

    @functools.cached_property
    def gram(self) -> np.ndarray:
        """The centred ``X^T X`` again (``V diag(lam) V^T``), for the low-rank projection."""
        return (self.v * self.lam) @ self.v.T

    def coef(self, alpha: float) -> tuple[np.ndarray, np.ndarray]:
        """``(wt, b)`` of the ridge fit with penalty ``alpha``."""
        denom = self.lam + alpha
        if alpha == 0.0:
            cutoff = self.lam[-1] * self.lam.shape[0] * np.finfo(np.float64).eps
            inv = np.where(self.lam > cutoff, 1.0 / np.where(self.lam > cutoff, self.lam, 1.0), 0.0)
        else:
            inv = 1.0 / denom
        wt = self.v @ (self.g * inv[:, None])
        return wt, self.mean_y - self.mean_x @ wt

    def alpha_grid(self) -> np.ndarray:
        """The candidate penalties (see the module docstring)."""
        scale = float(self.lam.mean()) if self.lam.size and self.lam.mean() > 0 else 1.0
        return np.concatenate([[0.0], scale * 10.0 ** ALPHA_GRID_EXPONENTS])


def ridge_path(stats: PairStats, part: str) -> RidgePath:
    """The decomposition of ``stats.train`` (part="train") or of all rows ("both"), computed once
    per PairStats and shared by the adapters fitted from it (ridge, lowrank, auto's candidates)."""
    key = f"ridge_path_{part}"
    if key not in stats.cache:
        stats.cache[key] = RidgePath.of(stats.train if part == "train" else stats.both())
    return stats.cache[key]


def lowrank_project(wt: np.ndarray, c: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Reduced-rank projection: ``(wt @ Vr @ Vr^T, Vr)`` with Vr the top-``rank`` principal directions
    of the fitted values ``Xc @ wt`` (eigenvectors of ``wt^T C wt``)."""
    f = wt.T @ c @ wt
    lam, v = np.linalg.eigh((f + f.T) / 2)
    vr = v[:, ::-1][:, :rank]
    return wt @ vr @ vr.T, vr


def procrustes(gram: Gram, *, center: bool, scale: bool) -> tuple[np.ndarray, np.ndarray]:
    """Orthogonal Procrustes ``(wt, b)``: ``wt = U V^T`` from the SVD ``X^T Y = U S V^T``.

    With ``d_src != d_dst`` the thin SVD gives a partial isometry: orthonormal columns of
    ``wt`` when d_src >= d_dst (project, then rotate), orthonormal rows otherwise (rotate into a
    subspace). This equals zero-padding the smaller side to a square problem, solving it, and
    keeping the d_src x d_dst block. ``scale`` multiplies by the least-squares scale
    ``trace(S) / trace(wt^T X^T X wt)``.
    """
    if center:
        c, m = gram.centred()
        mx, my = gram.mean_x, gram.mean_y
    else:  # sums of the raw rows, from the shifted ones
        sx, sy, n = gram.sx, gram.sy, gram.n
        c = gram.xx + np.outer(gram.shift_x, sx) + np.outer(sx, gram.shift_x) + n * np.outer(gram.shift_x, gram.shift_x)
        m = gram.xy + np.outer(gram.shift_x, sy) + np.outer(sx, gram.shift_y) + n * np.outer(gram.shift_x, gram.shift_y)
        mx, my = np.zeros_like(gram.shift_x), np.zeros_like(gram.shift_y)
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    wt = u @ vt
    if scale:
        denom = float(np.einsum("ij,ij->", wt, c @ wt))
        wt = wt * (float(s.sum()) / denom if denom > 0 else 1.0)
    return wt, my - mx @ wt
