"""bc_fast.fit: post-hoc adapters checked against known answers (numpy float64 references)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bc_fast.fit import (AutoAdapter, LowRankAdapter, MLPAdapter, NotFittedError, ProcrustesAdapter, RidgeAdapter,
                         accumulate_pairs, fit_adapter, fit_metrics, fit_streaming, fit_streaming_npy, make_adapter,
                         val_mask)
from bc_fast.engine.fusion import apply_layers_reference
from bc_fast.engine.operator import Layer
from bc_fast.store.registry import Registry, RegistryError


def _orth(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """A (rows, cols) matrix with orthonormal rows or columns."""
    q, _ = np.linalg.qr(rng.standard_normal((max(rows, cols), min(rows, cols))))
    return q if rows >= cols else q.T


def _linear_pairs(n: int, p: int, q: int, noise: float = 0.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, p)) + 2.0  # far from zero-mean on purpose
    w = rng.standard_normal((q, p)) / np.sqrt(p)
    b = rng.standard_normal(q)
    return x, x @ w.T + b + noise * rng.standard_normal((n, q)), w, b


def _ridge_reference(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    xc, yc = x - x.mean(0), y - y.mean(0)
    w = np.linalg.solve(xc.T @ xc + alpha * np.eye(x.shape[1]), xc.T @ yc).T
    return w, y.mean(0) - w @ x.mean(0)


# ----------------------------------------------------------------------------- known answers

@pytest.mark.parametrize("p,q", [(16, 16), (12, 20)])
def test_procrustes_recovers_exact_orthogonal_map(p, q):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((400, p)) + 1.0
    qm = _orth(rng, q, p)  # square: orthogonal; q > p: orthonormal columns (an isometric embedding)
    y = x @ qm.T + rng.standard_normal(q)
    est = ProcrustesAdapter().fit(x, y)
    np.testing.assert_allclose(est.coef_, qm, atol=1e-5)
    np.testing.assert_allclose(est.transform(x), y, atol=1e-5)
    assert est.kind == "orthogonal" and est.val_metrics_["r2"] > 1 - 1e-10


def test_procrustes_smaller_target_is_a_partial_isometry():
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((300, 20)), rng.standard_normal((300, 8))
    est = ProcrustesAdapter(center=False).fit(x, y)
    np.testing.assert_allclose(est.coef_ @ est.coef_.T, np.eye(8), atol=1e-10)  # orthonormal rows
    assert est.layers_[0].bias is None
    u, _, vt = np.linalg.svd(x.T @ y, full_matrices=False)  # zero-padded square Procrustes, d_dst x d_src block
    np.testing.assert_allclose(est.coef_, (u @ vt).T, atol=1e-10)


def test_procrustes_scale_is_least_squares():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, 10))
    qm = _orth(rng, 10, 10)
    est = ProcrustesAdapter(scale=True).fit(x, 0.25 * x @ qm.T)
    np.testing.assert_allclose(est.coef_, 0.25 * qm, atol=1e-10)


def test_ridge_alpha0_matches_lstsq():
    x, y, _, _ = _linear_pairs(300, 12, 7, noise=0.5)
    est = RidgeAdapter(alpha=0.0).fit(x, y)
    sol = np.linalg.lstsq(np.hstack([x, np.ones((300, 1))]), y, rcond=None)[0]
    np.testing.assert_allclose(est.coef_, sol[:12].T, atol=1e-10)
    np.testing.assert_allclose(est.intercept_, sol[12], atol=1e-10)
    assert est.alpha_ == 0.0 and est.n_pairs_ == 300


@pytest.mark.parametrize("val_fraction", [0.0, 0.2])
def test_ridge_alpha_matches_closed_form(val_fraction):
    x, y, _, _ = _linear_pairs(200, 15, 9, noise=1.0, seed=4)
    est = RidgeAdapter(alpha=37.5, val_fraction=val_fraction).fit(x, y)  # refit: all rows, alpha as given
    w, b = _ridge_reference(x, y, 37.5)
    np.testing.assert_allclose(est.coef_, w, atol=1e-10)
    np.testing.assert_allclose(est.intercept_, b, atol=1e-10)
    assert est.val_metrics_ == {} if val_fraction == 0 else set(est.val_metrics_) == {"mse", "r2"}


def test_ridge_chosen_alpha_is_the_validation_minimum():
    x, y, _, _ = _linear_pairs(120, 40, 10, noise=2.0, seed=5)
    est = RidgeAdapter(refit=False).fit(x, y)
    m = val_mask(0, 120, 0.1, 0)
    best = int(np.argmin(est.val_mse_path_))
    w, b = _ridge_reference(x[~m], y[~m], est.alphas_[best])
    np.testing.assert_allclose(est.coef_, w, atol=1e-9)
    mse = [((x[m] @ _ridge_reference(x[~m], y[~m], a)[0].T + _ridge_reference(x[~m], y[~m], a)[1] - y[m]) ** 2).mean()
           for a in est.alphas_[1:]]
    np.testing.assert_allclose(est.val_mse_path_[1:], mse, rtol=1e-8)  # validation MSE from the sums alone
    assert est.alpha_ > 0 and est.alpha_ == est.alphas_[best]


def test_lowrank_full_rank_equals_ridge():
    x, y, _, _ = _linear_pairs(300, 10, 6, noise=0.3, seed=6)
    ridge = RidgeAdapter().fit(x, y)
    low = LowRankAdapter(rank=6).fit(x, y)
    np.testing.assert_allclose(low.coef_, ridge.coef_, atol=1e-10)
    np.testing.assert_allclose(low.intercept_, ridge.intercept_, atol=1e-10)
    assert [l.weight.shape for l in low.layers_] == [(6, 10), (6, 6)]


def test_lowrank_keeps_top_directions_of_fitted_values():
    x, y, _, _ = _linear_pairs(500, 12, 9, noise=0.1, seed=7)
    low = LowRankAdapter(rank=3, alpha=0.0).fit(x, y)
    w, b = _ridge_reference(x, y, 0.0)
    fitted = (x - x.mean(0)) @ w.T
    _, _, vt = np.linalg.svd(fitted, full_matrices=False)
    proj = vt[:3].T @ vt[:3]
    np.testing.assert_allclose(low.coef_, proj @ w, atol=1e-9)
    assert np.linalg.matrix_rank(low.coef_, tol=1e-8) == 3


def test_streaming_equals_in_memory(tmp_path):
    x, y, _, _ = _linear_pairs(3000, 24, 16, noise=1.5, seed=8)
    for kind, params in (("ridge", {}), ("lowrank", {"rank": 5}), ("procrustes", {})):
        mem = fit_adapter(x, y, kind=kind, **params)
        chunks = ((x[s:s + 437], y[s:s + 437]) for s in range(0, 3000, 437))
        st = fit_streaming(chunks, kind=kind, **params)
        np.testing.assert_allclose(st.coef_, mem.coef_, atol=1e-10, rtol=0)
        np.testing.assert_allclose(st.intercept_, mem.intercept_, atol=1e-10, rtol=0)
        assert getattr(st, "alpha_", 0) == pytest.approx(getattr(mem, "alpha_", 0), rel=1e-12)  # same grid point
    np.save(tmp_path / "src.npy", x)
    np.save(tmp_path / "dst.npy", y)
    npy = fit_streaming_npy(tmp_path / "src.npy", tmp_path / "dst.npy", kind="ridge", chunk_rows=1000)
    mem = RidgeAdapter().fit(x, y)
    np.testing.assert_allclose(npy.coef_, mem.coef_, atol=1e-10, rtol=0)
    assert npy.alpha_ == pytest.approx(mem.alpha_, rel=1e-12)


def test_val_mask_ignores_chunking_and_has_the_asked_share():
    whole = val_mask(0, 10000, 0.1, 3)
    parts = np.concatenate([val_mask(s, min(777, 10000 - s), 0.1, 3) for s in range(0, 10000, 777)])
    np.testing.assert_array_equal(whole, parts)
    assert 0.09 < whole.mean() < 0.11
    assert not np.array_equal(whole, val_mask(0, 10000, 0.1, 4))


# ----------------------------------------------------------------------------- auto and mlp

def test_auto_picks_procrustes_for_a_noisy_rotation():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((80, 32))
    y = x @ _orth(rng, 32, 32).T + 0.5 * rng.standard_normal((80, 32))
    est = AutoAdapter(kinds=("ridge", "procrustes", "lowrank")).fit(x, y)
    assert est.chosen_ == "procrustes" and est.kind == "orthogonal"
    assert set(est.candidates_) == {"ridge", "procrustes", "lowrank"}
    assert est.candidates_["procrustes"]["val_mse"] < est.candidates_["ridge"]["val_mse"]


def test_auto_picks_lowrank_for_a_rank_deficient_map():
    rng = np.random.default_rng(10)
    x = rng.standard_normal((150, 48))
    w = rng.standard_normal((48, 3)) @ rng.standard_normal((3, 48)) / 8
    y = x @ w.T + 0.5 * rng.standard_normal((150, 48))
    est = AutoAdapter(kinds=("ridge", "procrustes", "lowrank"), rank=3).fit(x, y)
    assert est.chosen_ == "lowrank", est.candidates_


def test_auto_picks_ridge_for_a_general_linear_map():
    x, y, _, _ = _linear_pairs(2000, 16, 16, noise=0.05, seed=11)
    est = AutoAdapter(kinds=("procrustes", "lowrank", "ridge"), rank=4).fit(x, y)
    assert est.chosen_ == "ridge"
    np.testing.assert_allclose(est.transform(x.astype(np.float32)), est.best_estimator_.transform(x.astype(np.float32)))


def test_auto_ties_go_to_the_first_kind():
    x, y, _, _ = _linear_pairs(500, 8, 6, noise=0.2, seed=12)
    est = AutoAdapter(kinds=("ridge", "lowrank"), rank=6).fit(x, y)  # lowrank at full rank is ridge
    assert est.chosen_ == "ridge"


def test_mlp_beats_ridge_on_a_nonlinear_map():
    pytest.importorskip("torch", reason="the mlp adapter needs torch")
    rng = np.random.default_rng(13)
    x = rng.standard_normal((1000, 4)).astype(np.float32)
    y = x @ (rng.standard_normal((4, 4)).astype(np.float32) / 2).T + np.tanh(2 * x[:, ::-1])
    params = dict(hidden=32, epochs=30, patience=5, lr=1e-2, batch_size=64)
    est = MLPAdapter(**params).fit(x, y)
    assert est.val_metrics_["mse"] < 0.2 * est.ridge_.val_metrics_["mse"]
    assert est.best_epoch_ > 0 and est.kind == "mlp"
    assert [l.activation for l in est.layers_] == ["gelu", "none"] and est.layers_[0].activation_width == 32
    np.testing.assert_allclose(est.transform(x[:50]), apply_layers_reference(est.layers_, x[:50]), atol=1e-4)
    again = MLPAdapter(**{**params, "epochs": 2}).fit(x, y)
    twice = MLPAdapter(**{**params, "epochs": 2}).fit(x, y)
    np.testing.assert_array_equal(again.layers_[0].weight, twice.layers_[0].weight)  # deterministic
    auto = AutoAdapter(kinds=("ridge", "mlp"), mlp_params={**params, "epochs": 10}).fit(x, y)
    assert auto.chosen_ == "mlp" and auto.kind == "mlp"


def _small_nonlinear() -> tuple[np.ndarray, np.ndarray, dict]:
    rng = np.random.default_rng(14)
    x = rng.standard_normal((400, 6)).astype(np.float32)
    params = {"hidden": 16, "epochs": 3, "patience": 5, "lr": 1e-2, "batch_size": 64}
    return x, np.tanh(x[:, ::-1]).astype(np.float32), params


def test_mlp_device_argument_is_checked():
    pytest.importorskip("torch", reason="the mlp adapter needs torch")
    x, y, params = _small_nonlinear()
    assert MLPAdapter().get_params()["device"] == "auto"
    for bad in ("gpu", "cuda:x", 3):
        with pytest.raises(ValueError, match="device must be"):
            MLPAdapter(**params, device=bad).fit(x, y)


def test_mlp_auto_device_is_the_cpu_without_a_gpu():
    torch = pytest.importorskip("torch", reason="the mlp adapter needs torch")
    if torch.cuda.is_available():
        pytest.skip("torch sees a CUDA GPU: 'auto' trains there (test_mlp_on_a_gpu)")
    x, y, params = _small_nonlinear()
    cpu = MLPAdapter(**params, device="cpu").fit(x, y)
    auto = MLPAdapter(**params).fit(x, y)  # the same weights, bit for bit
    for a, b in zip(auto.layers_, cpu.layers_):
        np.testing.assert_array_equal(a.weight, b.weight)
    with pytest.raises(ValueError, match="sees no CUDA GPU"):
        MLPAdapter(**params, device="cuda").fit(x, y)


def test_mlp_on_a_gpu():
    torch = pytest.importorskip("torch", reason="the mlp adapter needs torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible to torch: the fit on a GPU is not run here")
    x, y, params = _small_nonlinear()
    cpu = MLPAdapter(**params, device="cpu").fit(x, y)
    gpu = MLPAdapter(**params, device="cuda").fit(x, y)
    np.testing.assert_allclose(gpu.transform(x[:50]), cpu.transform(x[:50]), rtol=1e-3, atol=1e-4)


# ----------------------------------------------------------------------------- conventions

def test_float32_preserved_and_close_to_float64():
    x, y, _, _ = _linear_pairs(400, 12, 5, noise=0.1, seed=14)
    est = RidgeAdapter().fit(x.astype(np.float32), y.astype(np.float32))
    out32 = est.transform(x.astype(np.float32))
    out64 = est.transform(x)
    assert out32.dtype == np.float32 and out64.dtype == np.float64
    assert est.transform(x.astype(np.float16)).dtype == np.float16
    np.testing.assert_allclose(out32, out64, rtol=1e-5, atol=1e-5)
    assert est.coef_.dtype == np.float64
    np.testing.assert_allclose(est.operator_.apply(x.astype(np.float32)), out32)


def test_get_params_set_params_round_trip():
    est = LowRankAdapter(rank=7, alpha=2.0, val_fraction=0.2, random_state=5)
    params = est.get_params()
    assert params == {"rank": 7, "alpha": 2.0, "val_fraction": 0.2, "random_state": 5, "refit": True,
                      "chunk_rows": 16384}
    clone = type(est)(**params)
    assert clone.get_params() == params and repr(clone) == repr(est)
    assert est.set_params(rank=3) is est and est.rank == 3
    with pytest.raises(ValueError, match="invalid parameter 'ranks' for LowRankAdapter"):
        est.set_params(ranks=3)
    for cls in (RidgeAdapter, ProcrustesAdapter, MLPAdapter, AutoAdapter):
        assert cls(**cls().get_params()).get_params() == cls().get_params()
    assert MLPAdapter().get_params()["threads"] == 1


def test_score_is_r2():
    x, y, _, _ = _linear_pairs(300, 6, 4, noise=0.3, seed=15)
    est = RidgeAdapter().fit(x, y)
    pred = est.transform(x)
    r2 = np.mean(1 - ((y - pred) ** 2).sum(0) / ((y - y.mean(0)) ** 2).sum(0))
    assert est.score(x, y) == pytest.approx(r2, abs=1e-12)
    np.testing.assert_array_equal(RidgeAdapter().fit_transform(x, y), pred)


def test_fit_metrics_against_numpy():
    rng = np.random.default_rng(16)
    x = rng.standard_normal((300, 8))
    qm = _orth(rng, 8, 8)
    est = ProcrustesAdapter().fit(x, x @ qm.T)
    m = fit_metrics(est, x[:100], x[:100] @ qm.T, k=5)
    assert m["r2"] == pytest.approx(1.0, abs=1e-6) and m["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert m["neighbour_overlap"] == 1.0 and m["k"] == 5 and m["n"] == 100
    noisy = fit_metrics(est, x[:100], x[:100] @ qm.T + rng.standard_normal((100, 8)), k=5)
    assert 0 < noisy["neighbour_overlap"] < 1 and noisy["cosine"] < 0.9


# ----------------------------------------------------------------------------- registry

def test_registry_fitted_transform_fuses_with_a_trained_one(tmp_path):
    rng = np.random.default_rng(17)
    n = 600
    z0 = rng.standard_normal((n, 12)).astype(np.float32)
    z1 = rng.standard_normal((n, 16)).astype(np.float32)
    z2 = (z1 @ rng.standard_normal((16, 20)) + 0.1 * rng.standard_normal((n, 20))).astype(np.float32)
    trained = [Layer(rng.standard_normal((24, 16)).astype(np.float32), np.zeros(24, np.float32), "gelu", 8),
               Layer(rng.standard_normal((12, 24)).astype(np.float32) / 4, rng.standard_normal(12).astype(np.float32))]
    reg = Registry.create(tmp_path / "reg")
    reg.add_version(dim=12)
    reg.add_version(dim=16, backward=trained, kind="mlp")
    reg.add_version(dim=20)
    est = RidgeAdapter().fit(z2, z1)
    metrics = fit_metrics(est, z2[:100], z1[:100])
    reg.add_transform(2, 1, est, fit_metrics=metrics)
    reopened = Registry.open(tmp_path / "reg")
    info = reopened.transform_info(2, 1)
    assert info.kind == "affine" and info.fit_metrics["r2"] == pytest.approx(metrics["r2"])
    np.testing.assert_allclose(reopened.operator(2, 1).apply(z2), est.transform(z2), rtol=1e-5, atol=1e-5)
    chain = reopened.operator(2, 0).apply(z2)
    ref = apply_layers_reference(trained, est.transform(z2.astype(np.float64)))
    np.testing.assert_allclose(chain, ref, rtol=1e-4, atol=1e-4)
    forward = ProcrustesAdapter().fit(z0, z1)  # forward 0 -> 1, dims 12 -> 16
    reopened.add_transform(0, 1, forward, fit_metrics={"adapter": forward.adapter})
    assert reopened.transform_info(0, 1).kind == "orthogonal"
    np.testing.assert_allclose(reopened.operator(0, 1).apply(z0), forward.transform(z0), atol=1e-5)
    del z0


def test_registry_refuses_mismatched_dims_and_writes_nothing(tmp_path):
    rng = np.random.default_rng(18)
    reg = Registry.create(tmp_path / "reg")
    reg.add_version(dim=8)
    reg.add_version(dim=10, backward=np.eye(8, 10, dtype=np.float32))
    before = (tmp_path / "reg" / "manifest.json").read_bytes()
    files = sorted(p.name for p in (tmp_path / "reg" / "transforms").iterdir())
    est = RidgeAdapter().fit(rng.standard_normal((100, 10)), rng.standard_normal((100, 6)))
    with pytest.raises(RegistryError, match=r"must map version 1 \(dim 10\) to version 0 \(dim 8\)"):
        reg.add_transform(1, 0, est, replace=True)
    wrong_way = RidgeAdapter().fit(rng.standard_normal((100, 8)), rng.standard_normal((100, 10)))
    with pytest.raises(RegistryError, match="it is the transform in the other direction"):
        reg.add_transform(1, 0, wrong_way, replace=True)
    assert (tmp_path / "reg" / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "reg" / "transforms").iterdir()) == files
    assert json.loads(before)["transforms"][0]["kind"] == "linear"


# ----------------------------------------------------------------------------- bad input

def test_bad_input_messages():
    rng = np.random.default_rng(19)
    x, y = rng.standard_normal((50, 6)), rng.standard_normal((50, 4))
    with pytest.raises(ValueError, match="X_src has 50 rows but X_dst has 49: pairs must be the same items in the same order"):
        RidgeAdapter().fit(x, y[:49])
    bad = x.copy()
    bad[[7, 30, 31]] = np.nan
    bad[40, 2] = np.inf
    with pytest.raises(ValueError, match=r"X_src has 4 row\(s\) with NaN or Inf \(first: row 7\); drop those pairs"):
        RidgeAdapter().fit(bad, y)
    with pytest.raises(ValueError, match=r"expected a 2-D array .* got a 1-D array of shape \(50,\); reshape"):
        RidgeAdapter().fit(x[:, 0], y)
    with pytest.raises(TypeError, match="X_dst must hold real numbers .* got dtype complex128"):
        RidgeAdapter().fit(x, y.astype(complex))
    with pytest.raises(TypeError, match="X_src must hold real numbers"):
        RidgeAdapter().fit(x.astype(str), y)
    with pytest.raises(ValueError, match="alpha=0 .* got 5 pairs for d_src=6, need at least 7"):
        RidgeAdapter(alpha=0).fit(x[:5], y[:5])
    with pytest.raises(ValueError, match="lowrank with alpha=0 .* need at least 7"):
        LowRankAdapter(rank=2, alpha=0).fit(x[:6], y[:6])
    with pytest.raises(ValueError, match=r"rank must be an integer in \[1, min\(d_src, d_dst\)\] = \[1, 4\]"):
        LowRankAdapter(rank=5).fit(x, y)
    with pytest.raises(ValueError, match="alpha=None is chosen on validation rows, but none of the 3 pairs"):
        RidgeAdapter().fit(x[:3], y[:3])
    with pytest.raises(ValueError, match="the auto adapter chooses on validation rows, but none of the 3 pairs"):
        AutoAdapter(kinds=("procrustes",)).fit(x[:3], y[:3])
    with pytest.raises(ValueError, match="alpha must be None .* or a finite number >= 0, got -1"):
        RidgeAdapter(alpha=-1).fit(x, y)
    with pytest.raises(ValueError, match="unknown adapter kind 'pca'"):
        fit_adapter(x, y, kind="pca")
    with pytest.raises(TypeError, match=r"ProcrustesAdapter \(kind='procrustes'\) takes no parameter\(s\) \['alpha'\]"):
        make_adapter("procrustes", alpha=1.0)
    with pytest.raises(NotFittedError, match="not fitted yet; call fit"):
        RidgeAdapter().transform(x)
    est = RidgeAdapter().fit(x, y)
    with pytest.raises(ValueError, match="X has 5 features but the adapter was fitted on 6"):
        est.transform(x[:, :5])
    with pytest.raises(ValueError, match="no pairs"):
        RidgeAdapter().fit(x[:0], y[:0])


def test_streaming_bad_input_names_global_rows():
    rng = np.random.default_rng(20)
    x, y = rng.standard_normal((100, 4)), rng.standard_normal((100, 3))
    y[63] = np.nan
    with pytest.raises(ValueError, match=r"X_dst has 1 row\(s\) with NaN or Inf \(first: row 63\)"):
        fit_streaming(((x[s:s + 25], y[s:s + 25]) for s in range(0, 100, 25)))
    with pytest.raises(ValueError, match=r"the chunk starting at row 25 has dims \(3, 3\) but the first chunk had \(4, 3\)"):
        accumulate_pairs(iter([(x[:25], y[:25]), (x[25:50, :3], y[25:50])]))
    with pytest.raises(ValueError, match="kind='mlp' cannot be fitted by streaming"):
        fit_streaming(iter([(x, y)]), kind="mlp")
    with pytest.raises(ValueError, match="no pairs: the input is empty"):
        fit_streaming(iter([]))


def test_npy_inputs_are_checked_without_unpickling(tmp_path):
    x = np.ones((20, 3), np.float32)
    np.save(tmp_path / "ok.npy", x)
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}] * 4, dtype=object), allow_pickle=True)
    np.save(tmp_path / "flat.npy", np.ones(20, np.float32))
    np.save(tmp_path / "short.npy", x[:5])
    with pytest.raises(ValueError, match="obj.npy is not a plain numeric .npy array"):
        fit_streaming_npy(tmp_path / "obj.npy", tmp_path / "ok.npy", alpha=1.0)
    with pytest.raises(ValueError, match=r"flat.npy holds an array of shape \(20,\); expected 2-D"):
        fit_streaming_npy(tmp_path / "flat.npy", tmp_path / "ok.npy", alpha=1.0)
    with pytest.raises(ValueError, match="ok.npy has 20 rows but .*short.npy has 5"):
        fit_streaming_npy(tmp_path / "ok.npy", tmp_path / "short.npy", alpha=1.0)
    with pytest.raises(FileNotFoundError, match="no such file .*missing.npy"):
        fit_streaming_npy(tmp_path / "missing.npy", tmp_path / "ok.npy")
    with pytest.raises(ValueError, match="kind='mlp' cannot be fitted by streaming"):
        fit_streaming_npy(tmp_path / "missing.npy", tmp_path / "ok.npy", kind="mlp")


def test_r2_counts_dead_output_dimensions_as_constant():
    x, y, _, _ = _linear_pairs(400, 6, 4, noise=0.3, seed=21)
    y[:, 3] = 1e-33 * np.random.default_rng(0).standard_normal(400)  # a dead dimension (MiniLM has three)
    est = RidgeAdapter().fit(x, y)
    pred = est.transform(x)
    live = np.mean(1 - ((y[:, :3] - pred[:, :3]) ** 2).sum(0) / ((y[:, :3] - y[:, :3].mean(0)) ** 2).sum(0))
    assert est.score(x, y) == pytest.approx((3 * live + 1.0) / 4, abs=1e-9)  # predicted ~0: counts 1
    assert -1 < est.val_metrics_["r2"] <= 1
