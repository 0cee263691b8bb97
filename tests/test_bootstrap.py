"""The paired bootstrap (bc_fast.eval.bootstrap) against known answers."""

from __future__ import annotations

import numpy as np
import pytest

from bc_fast.eval.bootstrap import Block, auc_placements, compare, paired_bootstrap
from bc_fast.eval.metrics import roc_auc


def _two(a: np.ndarray, b: np.ndarray) -> list[Block]:
    return [Block(np.stack([a, b]))]


def test_constant_difference_gives_zero_width_ci() -> None:
    rng = np.random.default_rng(0)
    base = rng.random((3, 200))  # 3 seeds, 200 users
    res = paired_bootstrap(_two(base + 0.05, base), n_boot=300, seed=1)
    cmp = compare(res, ["a", "b"], "b", relative=False)
    assert cmp["a"]["diff"] == pytest.approx(0.05)
    assert cmp["a"]["diff_lo"] == pytest.approx(0.05) and cmp["a"]["diff_hi"] == pytest.approx(0.05)
    assert cmp["a"]["significant"] and not cmp["b"]["significant"]
    # the strategies' own CIs are not degenerate: users and seeds vary
    assert cmp["b"]["hi"] - cmp["b"]["lo"] > 0.01
    assert cmp["b"]["mean"] == pytest.approx(base.mean())


def test_large_shift_is_significant_and_noise_is_not() -> None:
    rng = np.random.default_rng(3)
    a = rng.normal(0.5, 0.2, (2, 300))
    shifted = a + rng.normal(0.1, 0.2, a.shape)  # mean shift of 0.1, se ~0.01
    noise = a + rng.normal(0.0, 0.2, a.shape)
    res = paired_bootstrap([Block(np.stack([a, shifted, noise]))], n_boot=500, seed=0)
    cmp = compare(res, ["ref", "shifted", "noise"], "ref", relative=False)
    assert cmp["shifted"]["significant"] and cmp["shifted"]["diff_lo"] > 0.05
    assert not cmp["noise"]["significant"]
    rel = compare(res, ["ref", "shifted", "noise"], "ref", relative=True)
    assert rel["shifted"]["diff"] == pytest.approx(100 * (shifted.mean() - a.mean()) / a.mean())


def test_seeded_determinism_and_weights() -> None:
    rng = np.random.default_rng(5)
    blocks = [Block(rng.random((2, 4, 50)), 0.25), Block(rng.random((2, 4, 30)), 0.75)]
    r1 = paired_bootstrap(blocks, n_boot=100, seed=7)
    r2 = paired_bootstrap(blocks, n_boot=100, seed=7)
    r3 = paired_bootstrap(blocks, n_boot=100, seed=8)
    np.testing.assert_array_equal(r1.samples, r2.samples)
    assert not np.array_equal(r1.samples, r3.samples)
    expected = 0.25 * blocks[0].values.mean(axis=(1, 2)) + 0.75 * blocks[1].values.mean(axis=(1, 2))
    np.testing.assert_allclose(r1.point, expected)
    # the bootstrap distribution is centred on the point estimate
    np.testing.assert_allclose(r1.samples.mean(0), r1.point, atol=0.02)


def test_bootstrap_errors() -> None:
    with pytest.raises(ValueError, match="at least one block"):
        paired_bootstrap([])
    with pytest.raises(ValueError, match="must be 3-D"):
        paired_bootstrap([Block(np.zeros((2, 3)))])
    with pytest.raises(ValueError, match="disagree"):
        paired_bootstrap([Block(np.zeros((2, 3, 4))), Block(np.zeros((2, 2, 4)))])
    with pytest.raises(ValueError, match="NaN or Inf"):
        paired_bootstrap([Block(np.full((1, 1, 2), np.nan))])
    res = paired_bootstrap([Block(np.ones((1, 1, 2)))], n_boot=5)
    with pytest.raises(ValueError, match="reference strategy 'z'"):
        compare(res, ["a"], "z")


def test_auc_placements_mean_is_the_auc() -> None:
    rng = np.random.default_rng(0)
    y = rng.random(400) < 0.3
    s = np.round(rng.normal(y * 0.8, 1.0), 1)  # rounded: many ties
    vals, auc = auc_placements(y, s)
    assert auc == pytest.approx(roc_auc(y, s))
    assert vals.mean() == pytest.approx(auc)
    with pytest.raises(ValueError, match="both classes"):
        auc_placements(np.ones(3), np.arange(3.0))


def test_relative_change_with_a_zero_reference_is_nan_not_an_error() -> None:
    vals = np.zeros((2, 1, 5))
    vals[0] = 1.0
    cmp = compare(paired_bootstrap([Block(vals)], n_boot=20), ["a", "ref"], "ref", relative=True)
    assert np.isnan(cmp["a"]["diff_lo"]) and not cmp["a"]["significant"]
