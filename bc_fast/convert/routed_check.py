"""The float64 reference of a conversion through a routed (local) step, and how a converted row is judged.

What lives here: :class:`RoutedChainReference`, the step-by-step float64 chain of a registry
conversion with one routed step (affine steps before it in float64, the routed step by its float64
definition from the stored float32 parameters, the steps after it, then the optional L2
normalisation), which :func:`bc_fast.convert.job.registry_job` hands to the verification; also built
from a bare :class:`~bc_fast.engine.routed.RoutedTransform` (then the reference is that operator's own
definition in float64). It may import :mod:`bc_fast.engine`, :mod:`bc_fast.store` and ``bc_fast._util``.

Why a routed row needs more than one tolerance. The compiled operator computes the routing scores
``x . S_c + s_c`` in float32 (on the fused operator's parameters), the reference in float64. Two things
follow, both bounded per row from the score error bound ``eps_c = gamma * (|S_c| . a + |s_c|)``, where
``a`` is ``|x|`` carried through the absolute values of the affine steps before the routed step (the
sum of the absolute values of the terms the score adds up) and ``gamma = 8 (sqrt(d) + n_before + 2) u32``
(``d`` the operator's input dimension, ``n_before`` the layers composed into the scores, ``u32 = 2^-24``),
the same model as :func:`~bc_fast.convert.job.default_verify_tol` (a dot product of length d errs by about
``sqrt(d) u32``, times 8) applied to the sum of absolute terms, itself an overestimate of the error's
scale. Measured on the AVX2 core (d = 16, 384, 1024; plain and fused scores; 4000 rows each) the
worst score error was 2.8 ``u32 (|S_c| . a + |s_c|)``, 20-60 times below ``gamma``:

1. **Near-ties in the top-m choice.** Where the m-th best score lies within ``eps`` of the (m+1)-th,
   float32 may pick another set of clusters than float64, and both are correct answers to within
   rounding. :meth:`RoutedChainReference.judge` lists, for such a row, every top-m set that some
   score perturbation within ``eps`` could produce (at most :data:`MAX_SETS`, the float64 one always
   among them) and judges the row against the set whose output is nearest to it. A row whose
   converted output matches none of them fails as before: the check loosens only where the choice
   itself is ambiguous.
2. **Soft weights.** A score error of at most ``eps`` changes each blend weight ``w_j`` by at most a
   factor ``exp(+-2 eps / T)``, so the output by at most ``expm1(2 eps / T) * sum_j w_j ||y_j - y||``
   (``y_j`` the row's output through cluster j alone, ``y`` the blend), and never by more than
   ``max_j ||y_j - y||`` (any weights blend the same m outputs: a row routed so close to a tie that
   float32 cannot resolve its weights is still held to a blend of the right clusters' maps). This
   per-row allowance, relative to ``||y||`` (doubled for a normalised output), is added to the chain's
   ordinary tolerance
   (:func:`bc_fast.convert.job.default_verify_tol`, counting the routed step as two float32 GEMMs:
   scores and maps). With ``m = 1``, or far from ties at a moderate temperature, it is ~0.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..engine import Layer
from ..engine.fusion import apply_layers_reference
from ..engine.routed import RoutedTransform
from ..store.routed_format import RoutedStep

__all__ = ["MAX_SETS", "RoutedChainReference"]

#: Most candidate top-m sets a near-tie row is judged against (the float64 set always among them).
MAX_SETS = 64
_U32 = 2.0 ** -24


class RoutedChainReference:
    """``reference(x) -> (n, d_out) float64``: the chain with the float64 top-m choice.

    ``judge(x, y) -> (reference, slack)`` judges converted rows ``y``: the reference row for the top-m set
    nearest to ``y`` among the sets a float32 near-tie allows, and each row's extra relative allowance for
    the soft weights (see the module docstring). ``verify_shape`` is ``(layers, largest dim)`` for the
    default tolerance.
    """

    def __init__(self, before: Sequence[Layer], score_weight: np.ndarray, score_bias: np.ndarray,
                 weight: np.ndarray, bias: np.ndarray, m: int, temperature: float, after: Sequence[Layer],
                 normalize: bool) -> None:
        self.before, self.after = list(before), list(after)
        self.sw, self.sb = np.asarray(score_weight, np.float64), np.asarray(score_bias, np.float64)
        self.a, self.b = np.asarray(weight, np.float64), np.asarray(bias, np.float64)
        self.m, self.temperature, self.normalize = int(m), float(temperature), bool(normalize)
        dims = [d for l in self.before + self.after for d in (l.d_in, l.d_out)] + list(self.a.shape[1:])
        self.verify_shape = (len(self.before) + len(self.after) + 2, max(dims))

    @classmethod
    def from_steps(cls, steps: Sequence[Sequence[Layer] | RoutedStep], normalize: bool) -> RoutedChainReference:
        """The chain of registry steps (application order) holding exactly one :class:`RoutedStep`."""
        r = next(i for i, s in enumerate(steps) if isinstance(s, RoutedStep))
        step: RoutedStep = steps[r]  # type: ignore[assignment]
        sw, sb = step.scores64()
        flat = [[layer for s in part for layer in s] for part in (steps[:r], steps[r + 1:])]  # type: ignore[union-attr]
        return cls(flat[0], sw, sb, step.weights, step.bias, step.m, step.temperature, flat[1], normalize)

    @classmethod
    def from_operator(cls, op: RoutedTransform) -> RoutedChainReference:
        """A compiled routed operator's own definition in float64 (its float32 parameters upcast)."""
        return cls([], op.score_weight, op.score_bias, op.weight, op.bias, op.m, op.temperature, [], op.normalize)

    # ------------------------------------------------------------------ pieces

    def _scores(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The routed step's float64 input, its scores and each score's float32 error bound."""
        x64 = np.asarray(x, dtype=np.float64)
        xr = apply_layers_reference(self.before, x64) if self.before else x64
        bound = np.abs(x64)
        for layer in self.before:  # |act(z)| <= |z| for relu and gelu: the bound carries through them too
            bound = bound @ np.abs(np.asarray(layer.weight, np.float64)).T
            if layer.bias is not None:
                bound += np.abs(np.asarray(layer.bias, np.float64))
        gamma = 8.0 * (np.sqrt(x64.shape[1]) + len(self.before) + 2) * _U32
        eps = gamma * (bound @ np.abs(self.sw).T + np.abs(self.sb))
        return xr, xr @ self.sw.T + self.sb, eps

    def _outputs(self, xr: np.ndarray, scores: np.ndarray, sets: np.ndarray) -> tuple[np.ndarray, list, np.ndarray]:
        """For top-m ``sets`` (n, m): the blend weights, each cluster's output through the steps after the
        routed one, and the blended output (before normalisation)."""
        top = np.take_along_axis(scores, sets, axis=1)
        w = np.exp((top - top.max(axis=1, keepdims=True)) / self.temperature)
        w /= w.sum(axis=1, keepdims=True)
        outs = []
        blend = np.zeros((xr.shape[0], self.a.shape[1]))
        for j in range(sets.shape[1]):
            z = np.empty_like(blend)
            for c in np.unique(sets[:, j]):
                rows = np.nonzero(sets[:, j] == c)[0]
                z[rows] = xr[rows] @ self.a[c].T + self.b[c]
            blend += w[:, j, None] * z
            outs.append(z)
        if self.after:
            outs = [apply_layers_reference(self.after, z) for z in outs]
            blend = apply_layers_reference(self.after, blend)
        return w, outs, blend

    def _finish(self, y: np.ndarray) -> np.ndarray:
        return y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12) if self.normalize else y

    def _top(self, scores: np.ndarray) -> np.ndarray:
        return np.argsort(-scores, axis=1, kind="stable")[:, : self.m]  # stable: ties to the lower index

    def _candidate_sets(self, s: np.ndarray, eps: np.ndarray, exact: np.ndarray) -> list[np.ndarray]:
        """Every top-m set a perturbation of the scores ``s`` within ``eps`` could pick (the exact set first)."""
        lo, hi = s - eps, s + eps
        k = s.shape[0]
        beaten_maybe = np.array([(np.delete(hi, c) >= lo[c]).sum() for c in range(k)])
        beaten_surely = np.array([(np.delete(lo, c) > hi[c]).sum() for c in range(k)])
        sure = np.nonzero(beaten_maybe < self.m)[0]
        unsure = np.nonzero((beaten_surely < self.m) & (beaten_maybe >= self.m))[0]
        sets = [exact]
        for extra in itertools.combinations(unsure.tolist(), self.m - len(sure)):
            cand = np.array(sorted(set(sure.tolist()) | set(extra), key=lambda c: (-s[c], c)))
            if not np.array_equal(np.sort(cand), np.sort(exact)):
                sets.append(cand)
            if len(sets) >= MAX_SETS:
                break
        return sets

    # ------------------------------------------------------------------ the reference and the judgment

    def __call__(self, x: Any) -> np.ndarray:
        """The chain in float64 with the float64 top-m choice: (n, d_out)."""
        xr, scores, _ = self._scores(x)
        return self._finish(self._outputs(xr, scores, self._top(scores))[2])

    def judge(self, x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
        """``(reference (n, d_out), slack (n,))`` for converted rows ``y`` of inputs ``x`` (module docstring)."""
        y64 = np.asarray(y, dtype=np.float64)
        xr, scores, eps = self._scores(x)
        sets = self._top(scores)
        if self.m < scores.shape[1]:
            rest = np.ones_like(scores, dtype=bool)
            np.put_along_axis(rest, sets, False, axis=1)
            lo_top = np.take_along_axis(scores - eps, sets, axis=1).min(axis=1)
            hi_rest = np.where(rest, scores + eps, -np.inf).max(axis=1)
            for i in np.nonzero(lo_top <= hi_rest)[0]:
                cands = self._candidate_sets(scores[i], eps[i], sets[i])
                if len(cands) > 1:
                    outs = [self._finish(self._outputs(xr[i:i + 1], scores[i:i + 1], c[None, :])[2])[0]
                            for c in cands]
                    sets[i] = cands[int(np.argmin([np.linalg.norm(o - y64[i]) for o in outs]))]
        w, outs, blend = self._outputs(xr, scores, sets)
        dist = np.stack([np.linalg.norm(o - blend, axis=1) for o in outs], axis=1)  # (n, m)
        worst = np.take_along_axis(eps, sets, axis=1).max(axis=1)
        factor = np.expm1(np.minimum(2.0 * worst / self.temperature, 700.0))
        # any weights blend the same m outputs: never more than the farthest of them from the blend
        slack = np.minimum(factor * (w * dist).sum(axis=1), dist.max(axis=1))
        slack /= np.maximum(np.linalg.norm(blend, axis=1), 1e-300)
        return self._finish(blend), slack * (2.0 if self.normalize else 1.0)
