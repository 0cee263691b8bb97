"""The held-out protocol of bc_fast.experiments: selection never sees the test half; CIs and raw values."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest

pytest.importorskip("torch", reason="the experiment trains with PyTorch")

from bc_fast.data import synthetic_interactions, time_points  # noqa: E402
from bc_fast.experiments import ExperimentConfig, run_demo, run_experiment  # noqa: E402
from bc_fast.train.protocol import held_out_split  # noqa: E402

TINY = dict(dims=(8, 10, 12), epochs=4, eval_every=1, batch_size=512, consumer_epochs=2, consumer_seeds=(0,),
            posthoc_steps=20, degree_bins=4, n_boot=200,
            strategies=("fix-m0", "nobc", "posthoc-sloss", "joint-mloss"), keep=("joint-mloss",))


def _data():
    return synthetic_interactions(num_users=90, num_items=150, num_edges=3000, seed=4)


def test_held_out_split_is_a_fixed_partition_of_the_evaluation_users() -> None:
    data = _data()
    s = data.split(0.5, 0.75)
    h = held_out_split(s, num_users=data.num_users, frac=0.5, split_seed=0)
    users = np.unique(s.val_user)
    assert np.intersect1d(h.selection_users, h.test_users).size == 0
    np.testing.assert_array_equal(np.union1d(h.selection_users, h.test_users), users)
    assert abs(h.selection_users.size - h.test_users.size) <= 1
    assert set(np.unique(h.selection.val_user)) == set(h.selection_users.tolist())
    assert set(np.unique(h.test.val_user)) == set(h.test_users.tolist())
    np.testing.assert_array_equal(h.test.train_user, s.train_user)  # training edges untouched
    again = held_out_split(s, num_users=data.num_users, frac=0.5, split_seed=0)
    np.testing.assert_array_equal(again.test_users, h.test_users)
    other = held_out_split(s, num_users=data.num_users, frac=0.5, split_seed=1)
    assert not np.array_equal(other.test_users, h.test_users)
    with pytest.raises(ValueError, match=r"selection fraction must be in \(0, 1\)"):
        held_out_split(s, num_users=data.num_users, frac=1.0)


def _perturb_last_test_half(data, cfg: ExperimentConfig):
    """Move the last slice's test-half validation edges to other (old) items; nothing else changes."""
    K = len(cfg.dims)
    tp = time_points(K, cfg.start)
    last = data.split(tp[K - 1], 1.0)
    h = held_out_split(last, num_users=data.num_users, frac=cfg.selection_frac, split_seed=cfg.split_seed)
    ratio = np.linspace(0.0, 1.0, data.num_edges)
    # edges of existing users in the window are all validation edges (never training edges)
    m = ((ratio > tp[K - 1]) & np.isin(data.user, h.test_users) & (data.user < last.num_users_prev)
         & (data.item < last.num_items_prev))
    assert m.sum() > 10
    item = data.item.copy()
    item[m] = (item[m] + 17) % last.num_items_prev
    return dataclasses.replace(data, item=item)


def test_selected_epochs_do_not_depend_on_the_test_half() -> None:
    cfg = ExperimentConfig.quick(**TINY)
    data = _data()
    a = run_experiment(cfg, data=data, log=None)
    b = run_experiment(cfg, data=_perturb_last_test_half(data, cfg), log=None)
    assert a["raw"]["selected_epoch"] == b["raw"]["selected_epoch"]
    assert a["raw"]["recall_selection"] == b["raw"]["recall_selection"]
    # ... while the reported (test-half) numbers did see the change
    latest = len(cfg.dims) - 1
    assert not np.allclose(a["raw"]["recall_test"]["nobc"][0][latest], b["raw"]["recall_test"]["nobc"][0][latest])
    epochs = [e for s in a["raw"]["selected_epoch"]["joint-mloss"] for e in s[1:]]
    assert all(1 <= e <= cfg.epochs for e in epochs)


def test_paired_seeds_table_and_raw_values_recompute(tmp_path) -> None:
    res = run_demo(tmp_path, seed=3, log=None, data=_data(), seeds=2, **TINY)
    assert res["raw"]["seeds"] == [3, 4]
    saved = json.loads((tmp_path / "results.json").read_text())
    raw = json.loads((tmp_path / "results_raw.json").read_text())
    assert saved["raw_file"] == "results_raw.json" and "recall_test[strategy][s][k]" in saved["raw_schema"]
    latest = 2
    mean = {n: np.mean([np.mean(raw["recall_test"][n][s][latest]) for s in range(2)]) for n in raw["strategies"]}
    rows = {r["strategy"]: r for r in saved["rows"]}
    for n in raw["strategies"]:
        assert rows[n]["recall"] == pytest.approx(mean[n], rel=1e-5)
        assert rows[n]["intended_change"] == pytest.approx(100 * (mean[n] - mean["nobc"]) / mean["nobc"], rel=1e-4,
                                                           abs=1e-6)
        assert rows[n]["recall_lo"] <= rows[n]["recall"] <= rows[n]["recall_hi"]
    # unintended: the weighted mean of the per-example placement values is the AUC
    auc = {n: sum(u["weight"] * np.mean([np.mean(raw["auc_values"][n][s][t][k]) for s in range(2)])
                  for t, per_v in raw["auc_units"].items() for k, u in per_v.items()) for n in raw["strategies"]}
    for n in raw["strategies"]:
        assert rows[n]["auc"] == pytest.approx(auc[n], rel=1e-4)
    assert rows["fix-m0"]["unintended_change"] == 0.0 and rows["nobc"]["intended_change"] == 0.0
    assert "[" in res["table"] and "held-out test users" in res["table"]
    # legacy retention: mean legacy version-0 recall over the mean true version-0 recall, in %
    true0 = np.mean([np.mean(raw["recall_test"]["fix-m0"][s][0]) for s in range(2)])
    for n in raw["strategies"]:
        assert len(raw["legacy_recall"][n][0]) == len(raw["test_users"][0])
        legacy = np.mean([np.mean(raw["legacy_recall"][n][s]) for s in range(2)])
        assert rows[n]["retention"] == pytest.approx(100 * legacy / true0, rel=1e-4)
        assert rows[n]["retention_lo"] <= rows[n]["retention"] <= rows[n]["retention_hi"]
    assert "legacy v0 ret." in res["table"]
    # BC-Aligner minus each other strategy, in points: the difference of the rows' changes
    comp = saved["comparisons"]
    assert set(comp) == set(raw["strategies"]) - {"joint-mloss"}
    for n, e in comp.items():
        for key, col in (("intended", "intended_change"), ("unintended", "unintended_change"), ("total", "total")):
            assert e[key]["diff"] == pytest.approx(rows["joint-mloss"][col] - rows[n][col], rel=1e-6, abs=1e-9)
            assert e[key]["lo"] <= e[key]["hi"]
            assert e[key]["significant"] == (e[key]["lo"] > 0 or e[key]["hi"] < 0)
    assert "BC-Aligner minus" in res["table"]


def test_legacy_retention_known_answers() -> None:
    """Equal recall is 100 % with a zero-width CI; half the recall is 50 %; no test users, no column."""
    from bc_fast.experiments.summary import _legacy_retention

    rng = np.random.default_rng(0)
    true = [rng.random(30), rng.random(30)]
    raw = {"seeds": [0, 1], "recall_test": {"a": [[t] for t in true]},
           "legacy_recall": {"a": true, "b": [t / 2 for t in true]}}
    out = _legacy_retention(raw, ["a", "b"], {"n_boot": 200, "seed": 0})
    assert out["a"] == pytest.approx({"mean": 100.0, "lo": 100.0, "hi": 100.0})
    assert out["b"] == pytest.approx({"mean": 50.0, "lo": 50.0, "hi": 50.0})
    raw_empty = {**raw, "recall_test": {"a": [[np.zeros(0)], [np.zeros(0)]]}}
    assert _legacy_retention(raw_empty, ["a", "b"], {"n_boot": 10, "seed": 0}) == {}
    assert _legacy_retention({k: v for k, v in raw.items() if k != "legacy_recall"}, ["a"], {}) == {}


def test_item_genre_without_labels_is_refused_before_training() -> None:
    data = dataclasses.replace(_data(), item_labels=None)
    with pytest.raises(ValueError, match="'item-genre' needs item labels"):
        run_experiment(ExperimentConfig.quick(**TINY), data=data, log=None)
    with pytest.raises(ValueError, match="seeds and n_boot must be >= 1"):
        ExperimentConfig.quick(seeds=0).validate()
    with pytest.raises(ValueError, match="unknown transform 'spline'"):
        ExperimentConfig.quick(transform="spline").validate()
    with pytest.raises(ValueError, match="lam_late must be a finite number >= 0"):
        ExperimentConfig.quick(lam_late=float("nan")).validate()
    with pytest.raises(ValueError, match="transform_lr must be a positive finite learning rate, got 0.0"):
        ExperimentConfig.quick(transform_lr=0.0).validate()
    with pytest.raises(ValueError, match=r"late_frac must be in \(0, 1\]"):
        ExperimentConfig.quick(lam_late=64.0, late_frac=1.5).validate()


def test_lambda_sweep_chooses_on_the_selection_split(tmp_path) -> None:
    pytest.importorskip("matplotlib", reason="the sweep draws its Pareto plot with matplotlib")
    from bc_fast.experiments import run_lambda_sweep

    cfg = ExperimentConfig.quick(**{**TINY, "epochs": 2})
    res = run_lambda_sweep(tmp_path, [0.0, 16.0], cfg, data=_data(), log=None)
    pts = res["points"]
    assert [(p["strategy"], p["lam"]) for p in pts] == [("joint-mloss", 0.0), ("joint-mloss", 16.0)]
    best = max(pts, key=lambda p: p["selection_total"])
    assert res["chosen"] == {"joint-mloss": best["lam"]} and best["chosen"]
    for p in pts:
        assert 0.0 <= p["retention"] and p["intended_change_lo"] <= p["intended_change"] <= p["intended_change_hi"]
    assert {r["strategy"] for r in res["references"]} == {"fix-m0", "nobc", "posthoc-sloss"}
    assert (tmp_path / "pareto.png").stat().st_size > 1000 and (tmp_path / "lambda_sweep.json").exists()
    with pytest.raises(ValueError, match="lambda only changes the joint strategies"):
        run_lambda_sweep(tmp_path, [1.0], cfg, data=_data(), strategies=("nobc",), log=None)


def test_selection_and_test_sides_share_no_consumer_example() -> None:
    """Every user is on one side per version (users without a validation edge split by the same keys), so
    user-activity has both classes on the selection side and no example is both selected on and tested."""
    from bc_fast.eval.consumers import build_consumer_tasks, restrict_examples
    from bc_fast.experiments.selection import selection_tasks, single_class_versions, user_sides

    data = _data()
    tp = time_points(3, 0.5)
    splits = [data.split(tp[k], tp[k + 1]) for k in range(3)]
    held = [held_out_split(s, num_users=data.num_users) for s in splits]
    sel_side, test_side = user_sides(splits, held, data.num_users, 0.5, 0)
    tasks = build_consumer_tasks(data, splits, ("user-activity", "edge-rating", "item-genre"))
    sel = {t.name: t for t in selection_tasks(tasks, test_side)}
    test = {t.name: t for t in (restrict_examples(t, sel_side) for t in tasks)}
    assert set(sel) == {"user-activity", "edge-rating"}  # no item takes part in selection
    for k, (s, h) in enumerate(zip(splits, held)):
        assert np.intersect1d(sel_side[k], test_side[k]).size == 0
        np.testing.assert_array_equal(np.union1d(sel_side[k], test_side[k]), np.arange(s.num_users))
        assert np.isin(h.selection_users, sel_side[k]).all() and np.isin(h.test_users, test_side[k]).all()
        idx, y = sel["user-activity"].examples[k]
        np.testing.assert_array_equal(idx[y == 1], h.selection_users)
        assert np.intersect1d(idx, test["user-activity"].examples[k][0]).size == 0
        if k in sel["user-activity"].score_versions:
            assert 0 < y.sum() < len(y)
        edges = sel["edge-rating"].examples[k][0]
        assert np.isin(edges[0], h.selection_users).all()
        assert not np.isin(test["edge-rating"].examples[k][0][0], sel_side[k]).any()
    assert single_class_versions(list(sel.values())) == {}


def test_single_class_selection_task_is_reported() -> None:
    """Every user of the last slice is active (seed 6): user-activity is named, not silently nan-meaned."""
    cfg = ExperimentConfig.quick(**{**TINY, "epochs": 1, "strategies": ("fix-m0", "nobc"), "keep": (),
                                    "consumer_tasks": ("user-activity", "edge-rating")})
    lines: list[str] = []
    res = run_experiment(cfg, data=synthetic_interactions(num_users=90, num_items=150, num_edges=3000, seed=6),
                         log=lines.append)
    assert any(re.search(r"one class .* left out of auc_selection: \{'user-activity': \[2\]\}", m) for m in lines)
    assert res["data"]["selection_tasks"]["user-activity"]["single_class_versions"] == [2]
    assert res["data"]["selection_tasks"]["edge-rating"]["single_class_versions"] == []
    assert all(np.isfinite(v[0]) for v in res["raw"]["auc_selection"].values())  # edge-rating still counts
