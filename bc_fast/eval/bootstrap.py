"""Paired bootstrap over evaluation units (users, examples) and seeds, in plain numpy.

A metric that is a mean of per-unit values (Recall@K per user; ROC-AUC linearised into
per-example placement values, see :func:`auc_placements`) is resampled jointly for every
strategy: one draw picks the same seeds and the same units for all of them (paired), so the
difference between two strategies is bootstrapped with the noise they share removed.

A statistic is a weighted sum of *blocks*; a block holds per-unit values of shape
``(n_strategies, n_seeds, n_units)`` and a weight. Seeds are drawn once per replicate and
shared by all blocks (the same training runs); units are drawn independently per block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["Block", "BootstrapResult", "paired_bootstrap", "compare", "auc_placements"]


@dataclass(frozen=True)
class Block:
    """Per-unit values of one part of a statistic.

    Attributes
    ----------
    values : ndarray (n_strategies, n_seeds, n_units)
        The statistic's contribution is ``weight * mean over (seed, unit)``.
    weight : float
    """

    values: np.ndarray
    weight: float = 1.0


@dataclass(frozen=True)
class BootstrapResult:
    """Point estimates and bootstrap replicates of a statistic for every strategy.

    Attributes
    ----------
    point : ndarray (n_strategies,)
        The statistic on the observed data.
    samples : ndarray (n_boot, n_strategies)
        Paired replicates (the same seeds and units drawn for every strategy).
    """

    point: np.ndarray
    samples: np.ndarray


def _check_blocks(blocks: Sequence[Block]) -> tuple[int, int]:
    if not blocks:
        raise ValueError("paired_bootstrap needs at least one block")
    shapes = [np.shape(b.values) for b in blocks]
    if any(len(s) != 3 for s in shapes):
        raise ValueError(f"block values must be 3-D (n_strategies, n_seeds, n_units), got shapes {shapes}")
    heads = {s[:2] for s in shapes}
    if len(heads) != 1:
        raise ValueError(f"blocks disagree on (n_strategies, n_seeds): {sorted(heads)}")
    if any(s[2] < 1 for s in shapes):
        raise ValueError(f"every block needs at least one unit, got shapes {shapes}")
    for b in blocks:
        if not np.all(np.isfinite(b.values)):
            raise ValueError("block values contain NaN or Inf; drop units without a value first")
    return heads.pop()


def paired_bootstrap(blocks: Sequence[Block], *, n_boot: int = 1000, seed: int = 0,
                     resample_seeds: bool = True) -> BootstrapResult:
    """Paired bootstrap of ``sum_b weight_b * mean_{seed, unit} values_b`` for every strategy.

    Parameters
    ----------
    blocks : sequence of Block
        All with the same ``(n_strategies, n_seeds)``.
    n_boot : int
        Replicates (>= 1).
    seed : int
        Seeds the resampling (same seed, same replicates).
    resample_seeds : bool
        Draw seeds with replacement too (two-way bootstrap over seeds and units); with one
        seed this changes nothing.

    Returns
    -------
    BootstrapResult

    Raises
    ------
    ValueError
        On inconsistent shapes, non-finite values or ``n_boot < 1``.
    """
    n_strat, n_seeds = _check_blocks(blocks)
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    if resample_seeds and n_seeds > 1:
        seed_w = _counts(rng, n_boot, n_seeds) / n_seeds  # (B, n_seeds)
    else:
        seed_w = np.full((n_boot, n_seeds), 1.0 / n_seeds)
    point = np.zeros(n_strat)
    samples = np.zeros((n_boot, n_strat))
    for b in blocks:
        v = np.asarray(b.values, dtype=np.float64)
        n_units = v.shape[2]
        point += b.weight * v.mean(axis=(1, 2))
        unit_w = _counts(rng, n_boot, n_units) / n_units  # (B, n_units)
        # per replicate, strategy and seed: the resampled mean over units
        per_seed = np.einsum("bu,tsu->bts", unit_w, v, optimize=True)
        samples += b.weight * np.einsum("bts,bs->bt", per_seed, seed_w, optimize=True)
    return BootstrapResult(point=point, samples=samples)


def _counts(rng: np.random.Generator, n_boot: int, n: int) -> np.ndarray:
    """Multinomial draw counts of ``n`` items drawn ``n`` times with replacement, per replicate."""
    idx = rng.integers(0, n, size=(n_boot, n))
    flat = (np.arange(n_boot)[:, None] * n + idx).ravel()
    return np.bincount(flat, minlength=n_boot * n).reshape(n_boot, n).astype(np.float64)


def _interval(x: np.ndarray, level: float) -> tuple[float, float]:
    """Percentile interval; replicates where a relative change is undefined (reference 0) are skipped."""
    a = (1.0 - level) / 2.0
    x = x[np.isfinite(x)]
    if x.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(x, [a, 1.0 - a])
    return float(lo), float(hi)


def compare(result: BootstrapResult, names: Sequence[str], reference: str, *, level: float = 0.95,
            relative: bool = True) -> dict[str, dict[str, float | bool]]:
    """Mean, percentile CI and the paired difference to ``reference`` for every strategy.

    Parameters
    ----------
    result : BootstrapResult
    names : strategy names in the order of ``result.point``
    reference : name of the reference strategy
    level : CI level (0.95)
    relative : bool
        Difference in % of the reference (``100 (x - ref) / ref``) instead of absolute.

    Returns
    -------
    dict name -> {"mean", "lo", "hi", "diff", "diff_lo", "diff_hi", "significant"}
        ``significant`` is True when the CI of the difference excludes 0.

    Raises
    ------
    ValueError
        If ``reference`` is not in ``names`` or the lengths disagree.
    """
    names = list(names)
    if len(names) != result.point.shape[0]:
        raise ValueError(f"got {len(names)} names for {result.point.shape[0]} strategies")
    if reference not in names:
        raise ValueError(f"reference strategy {reference!r} is not among {names}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    r = names.index(reference)
    out: dict[str, dict[str, float | bool]] = {}
    for j, n in enumerate(names):
        lo, hi = _interval(result.samples[:, j], level)
        if relative:
            with np.errstate(divide="ignore", invalid="ignore"):
                d_point = 100.0 * (result.point[j] - result.point[r]) / result.point[r]
                d_samp = 100.0 * (result.samples[:, j] - result.samples[:, r]) / result.samples[:, r]
        else:
            d_point = result.point[j] - result.point[r]
            d_samp = result.samples[:, j] - result.samples[:, r]
        dlo, dhi = _interval(d_samp, level)
        out[n] = {"mean": float(result.point[j]), "lo": lo, "hi": hi, "diff": float(d_point),
                  "diff_lo": dlo, "diff_hi": dhi, "significant": bool(j != r and (dlo > 0.0 or dhi < 0.0))}
    return out


def auc_placements(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, float]:
    """Per-example placement values whose mean over positives plus mean over negatives minus AUC is AUC.

    For a positive, ``V = P(score_neg < score) + 0.5 P(tie)``; for a negative,
    ``V = P(score_pos > score) + 0.5 P(tie)`` (DeLong's structural components). The returned
    per-example value is ``w_i (V_i - AUC / 2)`` with ``w_i = n / n_pos`` for positives and
    ``n / n_neg`` for negatives, so that its plain mean over all ``n`` examples is the AUC and a
    resample's mean is the first-order (linearised) AUC of that resample.

    Returns
    -------
    (values (n,), auc)

    Raises
    ------
    ValueError
        If only one class is present or the lengths differ.
    """
    y = np.asarray(y).reshape(-1).astype(bool)
    s = np.asarray(score, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"y and score must have the same length, got {y.shape[0]} and {s.shape[0]}")
    n_pos = int(y.sum())
    n_neg = y.shape[0] - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUC placements need both classes, got {n_pos} positives and {n_neg} negatives")
    neg_sorted = np.sort(s[~y])
    pos_sorted = np.sort(s[y])
    below = np.searchsorted(neg_sorted, s, side="left")
    at_or_below = np.searchsorted(neg_sorted, s, side="right")
    v_pos = (below + 0.5 * (at_or_below - below)) / n_neg
    above = n_pos - np.searchsorted(pos_sorted, s, side="right")
    at_or_above = n_pos - np.searchsorted(pos_sorted, s, side="left")
    v_neg = (above + 0.5 * (at_or_above - above)) / n_pos
    auc = float(v_pos[y].mean())
    n = y.shape[0]
    vals = np.where(y, (n / n_pos) * (v_pos - auc / 2.0), (n / n_neg) * (v_neg - auc / 2.0))
    return vals, auc
