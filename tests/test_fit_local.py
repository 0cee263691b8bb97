"""Local (routed) adapters and retrieval-based selection, against numpy float64 references and known answers."""

from __future__ import annotations

import numpy as np
import pytest
from local_closed_form import assert_cluster_maps_are_closed_form

from bc_fast.fit import (
    AutoAdapter,
    LocalAdapter,
    ProcrustesAdapter,
    RidgeAdapter,
    fit_adapter,
    label_precision,
    make_adapter,
    neighbour_overlap,
    routed_reference,
    val_mask,
)


def _tiny() -> dict:
    """k=2 clusters in 2-D with known maps."""
    return {"centroids": np.array([[1.0, 0.0], [-1.0, 0.0]], np.float32),
            "weights": np.array([[[2.0, 0.0], [0.0, 2.0]], [[0.0, -1.0], [1.0, 0.0]]], np.float32),
            "bias": np.array([[1.0, 1.0], [0.0, -3.0]], np.float32), "m": 1, "temperature": 1.0}


def test_routed_reference_m1_is_the_nearest_clusters_map():
    p = _tiny()
    x = np.array([[0.9, 0.3], [-2.0, 1.0], [0.1, -5.0]])
    y = routed_reference(x, p)
    # row 0 and row 2 are nearer centroid 0 (x0 > 0), row 1 nearer centroid 1
    expect = np.array([[2 * 0.9 + 1, 2 * 0.3 + 1], [-1.0, -2.0 - 3.0], [2 * 0.1 + 1, 2 * -5.0 + 1]])
    np.testing.assert_allclose(y, expect, atol=1e-12)
    assert y.dtype == np.float64
    # a tie (x0 == 0: equal distance) goes to the lower cluster index
    np.testing.assert_allclose(routed_reference(np.array([[0.0, 1.0]]), p), [[1.0, 3.0]], atol=1e-12)


def test_routed_reference_soft_weights_by_hand():
    p = dict(_tiny(), m=2, temperature=2.0)
    x = np.array([[0.5, 0.0]])
    s0, s1 = 2 * 0.5 - 1, 2 * -0.5 - 1  # 2 x.C - |C|^2
    w0 = 1 / (1 + np.exp((s1 - s0) / 2.0))
    y0 = np.array([2 * 0.5 + 1, 1.0])
    y1 = np.array([0.0 + 0.0, 0.5 - 3.0])
    np.testing.assert_allclose(routed_reference(x, p), [w0 * y0 + (1 - w0) * y1], atol=1e-12)
    # m = k with a huge temperature: the plain average of the maps
    rng = np.random.default_rng(0)
    q = {"centroids": rng.standard_normal((3, 4)).astype(np.float32),
         "weights": rng.standard_normal((3, 5, 4)).astype(np.float32),
         "bias": rng.standard_normal((3, 5)).astype(np.float32), "m": 3, "temperature": 1e12}
    xs = rng.standard_normal((7, 4))
    mean = np.mean([xs @ q["weights"][c].astype(np.float64).T + q["bias"][c] for c in range(3)], axis=0)
    np.testing.assert_allclose(routed_reference(xs, q), mean, atol=1e-9)


def test_routed_params_are_checked():
    p = _tiny()
    with pytest.raises(ValueError, match="m must be in \\[1, k\\] = \\[1, 2\\], got 3"):
        routed_reference(np.zeros((1, 2)), dict(p, m=3))
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        routed_reference(np.zeros((1, 2)), dict(p, temperature=0.0))
    with pytest.raises(ValueError, match=r"weights must be \(k, d_out, d_in\) = \(2, d_out, 2\)"):
        routed_reference(np.zeros((1, 2)), dict(p, weights=np.zeros((2, 2, 3), np.float32)))
    with pytest.raises(ValueError, match=r"x must be \(n, 2\)"):
        routed_reference(np.zeros((1, 3)), p)
    with pytest.raises(ValueError, match="lack \\['temperature'\\]"):
        routed_reference(np.zeros((1, 2)), {k: v for k, v in p.items() if k != "temperature"})


def _piecewise(n: int, d: int = 12, k: int = 4, noise: float = 0.05, seed: int = 0):
    """Source rows in k well-separated blobs, each mapped by its own rotation: a piecewise-linear drift."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d)) * 4
    lab = rng.integers(0, k, n)
    x = centres[lab] + rng.standard_normal((n, d))
    maps = [np.linalg.qr(rng.standard_normal((d, d)))[0] for _ in range(k)]
    y = np.einsum("nij,nj->ni", np.stack(maps)[lab], x) + noise * rng.standard_normal((n, d))
    return x, y, lab


def test_local_beats_the_global_map_on_piecewise_drift():
    x, y, _ = _piecewise(2500)
    xt, yt, xs, ys = x[:2000], y[:2000], x[2000:], y[2000:]
    loc = LocalAdapter().fit(xt, yt)
    glob = [ProcrustesAdapter().fit(xt, yt), RidgeAdapter().fit(xt, yt)]
    mse_loc = ((loc.transform(xs) - ys) ** 2).mean()
    assert all(mse_loc < 0.05 * ((g.transform(xs) - ys) ** 2).mean() for g in glob)
    assert neighbour_overlap(loc.transform(xs), ys) > neighbour_overlap(glob[1].transform(xs), ys) + 0.3
    assert loc.k_ in (4, 8, 16) and 1 <= loc.m_ <= 3 and loc.temperature_ > 0
    # transform (float32 numpy path and float64) is routed_reference of routed_params()
    p = loc.routed_params()
    assert p.centroids.dtype == np.float32 and p.weights.shape == (loc.k_, 12, 12) and p.bias.shape == (loc.k_, 12)
    ref = routed_reference(xs, p)
    np.testing.assert_allclose(loc.transform(xs), ref, atol=1e-12)
    out32 = loc.transform(xs.astype(np.float32))
    assert out32.dtype == np.float32
    np.testing.assert_allclose(out32, ref, rtol=1e-4, atol=1e-4)
    assert set(p.as_dict()) == {"centroids", "weights", "bias", "m", "temperature"}


def test_local_fixed_settings_and_fallback_to_global():
    x, y, _ = _piecewise(800, d=6)
    est = LocalAdapter(base="ridge", k=4, m=1, temperature=1.0, prior_rows=0.0, min_cluster_rows=10_000).fit(x, y)
    glob = est.global_estimator_
    assert est.fallback_.all()  # every cluster is too small: the global map everywhere
    for c in range(4):
        np.testing.assert_array_equal(est.coef_[c], glob.coef_)
        np.testing.assert_array_equal(est.intercept_[c], glob.intercept_)
    # the routed map runs from the float32 parameters (the compiled operator's contract)
    np.testing.assert_allclose(est.transform(x), glob.transform(x), rtol=1e-6, atol=1e-6)
    assert len(est.candidates_) == 1 and est.candidates_[0]["m"] == 1


def test_local_cluster_map_is_the_closed_form_of_its_rows():
    """refit=False, prior 0, m=1: each cluster's map is the ridge fit of its own training rows."""
    x, y, _ = _piecewise(1200, d=5)
    est = LocalAdapter(base="ridge", k=4, m=1, temperature=1.0, prior_rows=0.0, alpha=0.0, refit=False,
                       min_cluster_rows=2).fit(x, y)
    assert_cluster_maps_are_closed_form(est, x, y, ~val_mask(0, x.shape[0], 0.1, 0), atol=1e-6)


def test_local_bad_input():
    x, y, _ = _piecewise(200, d=4)
    with pytest.raises(ValueError, match=r"k=500 clusters but only \d+ training pairs"):
        LocalAdapter(k=500).fit(x, y)
    with pytest.raises(ValueError, match="k=None tries k in"):
        LocalAdapter(min_cluster_rows=100).fit(x, y)
    bad = x.copy()
    bad[17] = np.nan
    with pytest.raises(ValueError, match=r"X_src has 1 row\(s\) with NaN or Inf \(first: row 17\)"):
        LocalAdapter(k=4).fit(bad, y)
    dup = np.repeat(x[:3], 70, axis=0)  # 3 distinct rows: k-means with k=8 leaves clusters empty
    with pytest.raises(ValueError, match=r"k=8 left cluster\(s\) .* without training rows .* 3 distinct"):
        LocalAdapter(k=8, m=1).fit(dup, np.repeat(y[:3], 70, axis=0))
    with pytest.raises(ValueError, match="base must be one of"):
        LocalAdapter(base="mlp").fit(x, y)
    with pytest.raises(ValueError, match="m=5 exceeds k=4"):
        LocalAdapter(k=4, m=5).fit(x, y)
    with pytest.raises(ValueError, match="temperature must be None"):
        LocalAdapter(k=4, temperature=-1.0).fit(x, y)
    with pytest.raises(ValueError, match="select_by='labels' .* pass fit"):
        LocalAdapter(k=4, select_by="labels").fit(x, y)
    est = LocalAdapter(k=4).fit(x, y)
    with pytest.raises(ValueError, match="not a layer program"):
        est.export_layers()
    with pytest.raises(ValueError, match="X has 3 features but the adapter was fitted on 4"):
        est.transform(x[:, :3])


def test_local_get_set_params_round_trip():
    est = LocalAdapter(base="ridge", k=8, m=2, temperature=0.5, prior_rows=10.0, random_state=3)
    params = est.get_params()
    assert params["base"] == "ridge" and params["k"] == 8 and params["select_by"] == "overlap"
    clone = LocalAdapter(**params)
    assert clone.get_params() == params and repr(clone) == repr(est)
    assert est.set_params(k=4) is est and est.k == 4
    with pytest.raises(ValueError, match="invalid parameter 'clusters' for LocalAdapter"):
        est.set_params(clusters=3)
    assert isinstance(make_adapter("local", k=4), LocalAdapter)


def test_auto_reports_both_metrics_and_chooses_by_overlap():
    x, y, _ = _piecewise(1500)
    est = AutoAdapter(kinds=("ridge", "procrustes", "local")).fit(x, y)
    assert est.selected_by_ == "overlap" and est.chosen_ == "local" and est.kind == "routed"
    for c in est.candidates_.values():
        assert {"val_mse", "val_overlap"} <= set(c)
    best = max(est.candidates_, key=lambda k: est.candidates_[k]["val_overlap"])
    assert best == "local"
    np.testing.assert_allclose(est.transform(x[:20]), est.best_estimator_.transform(x[:20]))
    # the independent check: overlap of the training-rows fit on the validation rows
    m = val_mask(0, x.shape[0], 0.1, 0)
    probe = RidgeAdapter(refit=False).fit(x, y)
    assert est.candidates_["ridge"]["val_overlap"] == pytest.approx(neighbour_overlap(probe.transform(x[m]), y[m]))
    old = AutoAdapter(kinds=("ridge", "procrustes"), select_by="mse").fit(x, y)
    assert old.selected_by_ == "mse" and "val_overlap" not in old.candidates_["ridge"]


def test_auto_selection_by_labels():
    x, y, lab = _piecewise(1500)
    est = fit_adapter(x, y, kind="auto", kinds=("ridge", "procrustes"), select_by="labels", labels=lab)
    assert est.selected_by_ == "labels" and all("val_label_p" in c for c in est.candidates_.values())
    m = val_mask(0, x.shape[0], 0.1, 0)
    probe = ProcrustesAdapter(refit=False).fit(x, y)
    assert est.candidates_["procrustes"]["val_label_p"] == pytest.approx(
        label_precision(probe.transform(x[m]), y[m], lab[m]))
    with pytest.raises(ValueError, match="select_by='labels' .* pass fit"):
        AutoAdapter(kinds=("ridge",), select_by="labels").fit(x, y)
    with pytest.raises(ValueError, match="labels must be a 1-D integer array with one label per pair"):
        AutoAdapter(kinds=("ridge",), select_by="labels").fit(x, y, labels=lab[:10])


def test_label_precision_by_hand():
    t = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    lab = np.array([0, 0, 1, 1])
    assert label_precision(t, t, lab, k=1) == 1.0  # each row's nearest other target has its label
    assert label_precision(t[[2, 3, 0, 1]], t, lab, k=1) == 0.0  # predictions swapped across the groups


def test_text_demo_compares_local_with_global(tmp_path):
    """`bc-fast demo --text`'s evaluation on synthetic embeddings with a per-blob drift: local wins, with a CI."""
    from bc_fast.data.text import TextCorpus
    from bc_fast.experiments.text_demo import run_text_demo

    rng = np.random.default_rng(1)
    n, d = 1500, 16
    lab = rng.integers(0, 4, n)
    old = rng.standard_normal((4, d))[lab] * 3 + rng.standard_normal((n, d))
    rots = np.stack([np.linalg.qr(rng.standard_normal((d, d)))[0] for _ in range(4)])
    new = np.einsum("nij,nj->ni", rots[lab], old) + 5 * np.eye(4, d)[lab]  # a different rotation per blob
    corpus = TextCorpus("synthetic", [f"t{i}" for i in range(n)], lab.astype(np.int64), list("abcd"), "test")
    res = run_text_demo(tmp_path / "out", corpus=corpus, embeddings={"old": old.astype(np.float32),
                                                                     "new": new.astype(np.float32)},
                        n_queries=150, pairs={"p": ("old", "new")}, chain=None, forward=False,
                        kinds=("procrustes", "ridge", "local"), fractions=(0.2,), latency_calls=5,
                        blas_threads=1, log=lambda m: None)
    rows = {r["kind"]: r for r in res["pairs"]["p"]["backward"]}
    assert rows["local"]["recall"] > max(rows["procrustes"]["recall"], rows["ridge"]["recall"]) + 0.2
    assert all("_label_p_per_query" not in r and 0 <= r["neighbour_overlap"] <= 1 for r in rows.values())
    (cmp,) = res["pairs"]["p"]["local_vs_global"]
    assert cmp["best_global"] in ("procrustes", "ridge") and cmp["fraction"] == 0.2
    lo, hi = cmp["label_p_diff_ci95"]
    assert lo <= cmp["label_p_diff"] <= hi
    assert cmp["label_p_diff"] == pytest.approx(cmp["local"]["label_p"] - cmp["global"]["label_p"])
    assert cmp["local_settings"]["k"] in (4, 8, 16) and rows["local"]["recall_bf16"] is None
    assert "local vs the best global kind" in res["table"]


def test_registry_local_val_metrics_are_held_out(tmp_path):
    """`bc-fast fit --kind local` writes a map refitted on every pair; its stored val_* are those of a fit that
    never saw the validation rows (the same settings on the training rows, fitted here independently)."""
    from bc_fast.fit import fit_metrics, fit_to_registry
    from bc_fast.store.registry import Registry

    rng = np.random.default_rng(0)
    n, d = 700, 8
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (np.tanh(x @ rng.normal(size=(d, d))) + 0.3 * rng.normal(size=(n, d))).astype(np.float32)
    np.save(tmp_path / "src.npy", x)
    np.save(tmp_path / "dst.npy", y)
    reg = Registry.create(tmp_path / "reg")
    reg.add_version(dim=d)
    reg.add_version(dim=d)
    est, metrics = fit_to_registry(tmp_path / "reg", 1, 0, tmp_path / "src.npy", tmp_path / "dst.npy", kind="local")
    is_val = val_mask(0, n, 0.1, 0)
    held_out = LocalAdapter(base=est.base_, k=est.k_, m=est.m_, temperature=est.temperature_,
                            prior_rows=est.prior_rows_, refit=False).fit(x, y)
    want = fit_metrics(held_out, x[is_val], y[is_val])
    for key in ("mse", "r2", "cosine", "neighbour_overlap"):
        assert metrics[f"val_{key}"] == pytest.approx(want[key], rel=1e-6), key
    assert metrics["val_n"] == is_val.sum() == 65
    # the map written has seen the validation rows: its own numbers there are better, and not the ones stored
    seen = fit_metrics(est, x[is_val], y[is_val])
    assert seen["mse"] < 0.95 * metrics["val_mse"]
    stored = next(t for t in Registry.open(tmp_path / "reg").transforms() if (t.from_version, t.to_version) == (1, 0))
    assert stored.fit_metrics["val_mse"] == metrics["val_mse"]
