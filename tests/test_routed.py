"""The compiled routed operator (bc_fast.engine.routed.RoutedTransform, the core's RoutedOp) against the
float64 reference of the routed map (bc_fast.fit.routed_reference)."""

from __future__ import annotations

import numpy as np
import pytest

from bc_fast.engine.routed import RoutedTransform
from bc_fast.fit._routing import RoutedParams, route, routed_reference


def _params(k=5, d_in=70, d_out=33, m=2, t=2.0, seed=0) -> RoutedParams:
    rng = np.random.default_rng(seed)
    return RoutedParams(rng.standard_normal((k, d_in)), rng.standard_normal((k, d_out, d_in)) / np.sqrt(d_in),
                        rng.standard_normal((k, d_out)), m, t)


def _rel_err(y, ref) -> float:
    return float(np.max(np.linalg.norm(y - ref, axis=1) / np.maximum(np.linalg.norm(ref, axis=1), 1e-12)))


@pytest.mark.parametrize("k,m", [(1, 1), (5, 1), (5, 2), (5, 5), (70, 3)])
@pytest.mark.parametrize("n", [1, 7, 513, 1100])
def test_matches_the_float64_reference(k, m, n):
    p = _params(k=k, m=m)
    op = RoutedTransform.from_params(p)
    x = np.random.default_rng(n).standard_normal((n, p.d_in)).astype(np.float32)
    y = op.apply(x)
    assert y.dtype == np.float32 and y.shape == (n, p.d_out)
    assert _rel_err(y, routed_reference(x, p)) < 2e-5
    assert _rel_err(y, op.reference(x)) < 2e-5


@pytest.mark.parametrize("in_dtype", [np.float32, np.float16])
@pytest.mark.parametrize("out_dtype", [np.float32, np.float16])
def test_dtypes_and_normalisation(in_dtype, out_dtype):
    p = _params(k=8, m=3)
    op = RoutedTransform.from_params(p, normalize=True)
    x = np.random.default_rng(1).standard_normal((300, p.d_in)).astype(in_dtype)
    y = op.apply(x, out_dtype=out_dtype)
    ref = routed_reference(x.astype(np.float64), p)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    assert y.dtype == out_dtype
    assert _rel_err(y.astype(np.float64), ref) < (2e-3 if out_dtype == np.float16 else 2e-5)
    assert np.allclose(np.linalg.norm(y.astype(np.float64), axis=1), 1, atol=2e-3)


def test_bit_identical_across_threads_and_batches():
    p = _params(k=16, d_in=96, d_out=80, m=2)
    op = RoutedTransform.from_params(p)
    x = np.random.default_rng(2).standard_normal((2100, p.d_in)).astype(np.float32)
    y = op.apply(x, threads=1)
    for t in (2, 3, 8):
        assert np.array_equal(op.apply(x, threads=t), y)
    for a, b in ((0, 1), (5, 9), (511, 1030), (1999, 2100)):
        assert np.array_equal(op.apply(x[a:b].copy()), y[a:b])  # a row's result ignores its neighbours


# Shapes for each way the core computes scores: 4 or 2 partial chains per score (k * groups <= 64 and
# d_in divisible), one chain (d_in odd; k > 32), S x^T on tiles of >= 32 rows (k <= 32) or a padded panel.
_SCORE_SHAPES = [(16, 96, 80, 2), (20, 70, 33, 2), (5, 71, 130, 3), (40, 64, 64, 2), (70, 32, 20, 1)]


@pytest.mark.parametrize("k,d_in,d_out,m", _SCORE_SHAPES)
def test_every_batch_size_and_thread_count_gives_the_same_bits(k, d_in, d_out, m):
    p = _params(k=k, d_in=d_in, d_out=d_out, m=m, seed=k)
    op = RoutedTransform.from_params(p)
    x = np.random.default_rng(k).standard_normal((5000, p.d_in)).astype(np.float32)
    whole = op.apply(x, threads=1)
    assert _rel_err(whole, routed_reference(x, p)) < 2e-5
    for n in (1, 7, 8, 9, 63, 64, 65, 255, 256, 257, 5000):
        for t in (1, 2, 3):
            assert np.array_equal(op.apply(x[-n:].copy(), threads=t), whole[-n:]), (n, t)
    idx, w = op.route(x[:300])
    for n in (1, 31, 32, 300):  # below and above the tile size where the scores are computed as S x^T
        i_n, w_n = op.route(x[:n].copy())
        assert np.array_equal(i_n, idx[:n]) and np.array_equal(w_n, w[:n])


@pytest.mark.parametrize("k,d_in", [(16, 96), (10, 48), (3, 40), (20, 70), (32, 64)])
def test_scores_of_a_few_rows_match_the_batched_ones_at_every_simd_level(simd_level, k, d_in):
    """Below the S x^T tile size each row's scores come from gemv_groups (partial chains of d_in / groups
    inputs, groups = 4 or 2, block diagonal in one panel; group widths k need not be a multiple of 16): the
    same bits as the batched path, at every SIMD level."""
    p = _params(k=k, d_in=d_in, d_out=24, m=2, seed=k + d_in)
    op = RoutedTransform.from_params(p)
    x = np.random.default_rng(d_in).standard_normal((300, d_in)).astype(np.float32)
    idx, w = op.route(x)
    whole = op.apply(x, threads=1)
    for r in (0, 1, 150, 299):
        i_1, w_1 = op.route(x[r:r + 1].copy())
        assert np.array_equal(i_1, idx[r:r + 1]) and np.array_equal(w_1, w[r:r + 1]), r
        assert np.array_equal(op.apply(x[r:r + 3].copy(), threads=1), whole[r:r + 3])
    assert _rel_err(whole, routed_reference(x, p)) < 2e-5


def test_small_batches_split_over_the_helper_thread_give_the_same_bits():
    from bc_fast import _core

    p = _params(k=16, d_in=96, d_out=200, m=3)
    op = RoutedTransform.from_params(p)
    x = np.random.default_rng(6).standard_normal((8, p.d_in)).astype(np.float32)
    alone = op.apply(x, threads=1)
    on = _core.build_info()["small_split"]
    _core._set_small_split(2)  # every chunk of every split job runs on the helper
    try:
        before = _core._small_split_helper_jobs()
        for n in range(1, 9):  # 3..16 clusters: the cut of (cluster, panel) units falls inside a cluster or not
            assert np.array_equal(op.apply(x[:n], threads=2), alone[:n])
        assert _core._small_split_helper_jobs() > before  # the helper computed them
    finally:
        _core._set_small_split(1 if on else 0)


def test_route_picks_the_top_m_with_softmax_weights():
    p = _params(k=9, m=3, t=0.7)
    op = RoutedTransform.from_params(p)
    x = np.random.default_rng(3).standard_normal((200, p.d_in)).astype(np.float32)
    idx, w = op.route(x)
    ref_idx, ref_w = route(x, p.centroids, p.m, p.temperature)
    assert np.array_equal(idx, ref_idx)
    assert np.allclose(w, ref_w, atol=1e-5) and np.allclose(w.sum(axis=1), 1, atol=1e-6)


def test_ties_go_to_the_lower_cluster():
    c = np.zeros((4, 3), np.float32)
    c[1] = c[2] = [1, 0, 0]  # clusters 1 and 2 tie for every row
    a = np.stack([np.eye(3) * (i + 1) for i in range(4)]).astype(np.float32)
    op = RoutedTransform.from_centroids(c, a, np.zeros((4, 3)), 1, 1.0)
    x = np.array([[2, 0, 0]], np.float32)
    assert op.route(x)[0].tolist() == [[1]]
    assert np.array_equal(op.apply(x), [[4, 0, 0]])  # cluster 1's map, 2 * I


def test_affine_steps_compose_on_both_sides():
    rng = np.random.default_rng(4)
    p = _params(k=6, d_in=40, d_out=30, m=2)
    op = RoutedTransform.from_params(p)
    g, h = rng.standard_normal((40, 50)) / 7, rng.standard_normal(40)
    q_w, q_b = rng.standard_normal((20, 30)) / 5, rng.standard_normal(20)
    x = rng.standard_normal((400, 50))
    chained = (op.reference(x @ g.T + h)) @ q_w.T + q_b
    fused = op.after_affine(g, h).then_affine(q_w, q_b)
    assert fused.d_in == 50 and fused.d_out == 20
    assert _rel_err(fused.apply(x.astype(np.float32)), chained) < 1e-4


def test_bad_parameters_and_input_are_refused():
    p = _params(k=4, m=2)
    with pytest.raises(ValueError, match=r"m must be an integer in \[1, k\] = \[1, 4\]"):
        RoutedTransform.from_centroids(p.centroids, p.weights, p.bias, 5, 1.0)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        RoutedTransform.from_centroids(p.centroids, p.weights, p.bias, 2, 0.0)
    bad = p.weights.copy()
    bad[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="weight holds NaN or Inf"):
        RoutedTransform.from_centroids(p.centroids, bad, p.bias, 2, 1.0)
    with pytest.raises(ValueError, match="same k and d_in"):
        RoutedTransform.from_centroids(p.centroids[:3], p.weights, p.bias, 2, 1.0)
    with pytest.raises(ValueError, match=r"bias must have shape \(4, 33\)"):
        RoutedTransform.from_centroids(p.centroids, p.weights, p.bias[:, :5], 2, 1.0)
    op = RoutedTransform.from_params(p)
    with pytest.raises(ValueError, match="has 69 features per row, expected 70"):
        op.apply(np.zeros((3, 69), np.float32))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        op.apply(np.zeros((3, 70), np.float64))
    with pytest.raises(ValueError, match="must not overlap"):
        sq = RoutedTransform.from_centroids(np.eye(3), np.stack([np.eye(3)] * 3), np.zeros((3, 3)), 1, 1.0)
        buf = np.ones((4, 3), np.float32)
        sq.apply(buf, out=buf)


def test_local_adapter_transforms_through_the_compiled_operator():
    from bc_fast.fit import LocalAdapter

    rng = np.random.default_rng(5)
    x = rng.standard_normal((3000, 12)).astype(np.float32)
    y = np.where(x[:, :1] > 0, x @ rng.standard_normal((12, 8)), x @ rng.standard_normal((12, 8))).astype(np.float32)
    est = LocalAdapter(base="ridge", k=4, m=2, random_state=0).fit(x, y)
    assert isinstance(est.operator_, RoutedTransform)
    got = est.transform(x[:500])
    assert got.dtype == np.float32
    assert _rel_err(got, routed_reference(x[:500], est.routed_params())) < 2e-5
