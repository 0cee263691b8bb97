"""Metrics against known answers, consumer tasks and reports."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from bc_fast.eval.metrics import recall_at_k, roc_auc, roc_auc_macro


def _auc_bruteforce(y, s):
    pos, neg = s[y == 1], s[y == 0]
    tot = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return tot / (len(pos) * len(neg))


def test_roc_auc_known_answers():
    # scikit-learn's documented example
    assert roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    assert roc_auc(np.array([0, 0, 1, 1]), np.array([1, 2, 3, 4])) == 1.0
    assert roc_auc(np.array([1, 1, 0, 0]), np.array([1, 2, 3, 4])) == 0.0
    # ties count one half: pairs (0.5, 0.5) x2 -> 0.5 each, (0.9, 0.5) x2 -> 1 each
    assert roc_auc(np.array([0, 1, 0, 1]), np.array([0.5, 0.5, 0.5, 0.9])) == pytest.approx(0.75)
    assert roc_auc(np.array([True, False]), np.array([3.0, 3.0])) == pytest.approx(0.5)


@pytest.mark.parametrize("n", [2, 7, 50, 333])
def test_roc_auc_matches_pairwise_definition(n):
    rng = np.random.default_rng(n)
    y = rng.integers(0, 2, n)
    y[0], y[1] = 0, 1
    s = np.round(rng.normal(size=n), 1)  # many ties
    assert roc_auc(y, s) == pytest.approx(_auc_bruteforce(y, s), abs=1e-12)


def test_roc_auc_errors():
    with pytest.raises(ValueError, match="both classes"):
        roc_auc(np.ones(4), np.arange(4.0))
    with pytest.raises(ValueError, match="same length"):
        roc_auc(np.array([0, 1]), np.arange(3.0))
    with pytest.raises(ValueError, match="0/1"):
        roc_auc(np.array([0, 2]), np.arange(2.0))
    with pytest.raises(ValueError, match="NaN"):
        roc_auc(np.array([0, 1]), np.array([0.0, np.nan]))


def test_roc_auc_macro_skips_single_class_columns():
    y = np.array([[0, 1, 1], [1, 1, 0], [0, 1, 1], [1, 1, 0]])
    s = np.array([[0.1, 0.5, 0.9], [0.9, 0.2, 0.1], [0.2, 0.3, 0.8], [0.8, 0.1, 0.3]])
    # column 1 has one class and is skipped; columns 0 and 2 are perfect
    assert roc_auc_macro(y, s) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="both classes"):
        roc_auc_macro(np.ones((3, 2)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="equal shape"):
        roc_auc_macro(np.ones((3, 2)), np.zeros((3, 3)))


def test_recall_at_k_known_answers():
    scores = np.array([[0.9, 0.8, 0.7, 0.1, 0.0],
                       [0.1, 0.2, 0.3, 0.4, 0.5]])
    pos = [np.array([1, 3]), np.array([0])]
    # row 0 top-2 = {0, 1}: 1 of 2 positives; row 1 top-2 = {4, 3}: 0 of 1
    np.testing.assert_allclose(recall_at_k(scores, pos, 2), [0.5, 0.0])
    # excluding item 0 (already seen) moves item 2 into row 0's top-2: {1, 2}
    np.testing.assert_allclose(recall_at_k(scores, pos, 2, exclude=[np.array([0]), np.array([], int)]), [0.5, 0.0])
    np.testing.assert_allclose(recall_at_k(scores, pos, 3, exclude=[np.array([0, 2]), np.array([4, 3])]), [1.0, 1.0])
    np.testing.assert_allclose(recall_at_k(scores, pos, 5), [1.0, 1.0])
    np.testing.assert_allclose(recall_at_k(scores, pos, 50), [1.0, 1.0])  # k > n_items
    # ties broken by item id
    np.testing.assert_allclose(recall_at_k(np.zeros((1, 4)), [np.array([1])], 2), [1.0])
    np.testing.assert_allclose(recall_at_k(np.zeros((1, 4)), [np.array([2])], 2), [0.0])


def _recall_reference(scores, positives, k, exclude=None):
    """The former per-row implementation: full stable sort by (-score, item id)."""
    s = np.array(scores, dtype=np.float64)
    out = []
    for r in range(s.shape[0]):
        if exclude is not None and len(exclude[r]):
            s[r, exclude[r]] = -np.inf
        top = np.lexsort((np.arange(s.shape[1]), -s[r]))[:min(k, s.shape[1])]
        pos = np.unique(positives[r])
        out.append(np.isin(top, pos).sum() / pos.size)
    return np.array(out)


@pytest.mark.parametrize("k", [1, 3, 7, 40])
def test_recall_at_k_matches_per_row_reference_with_ties_and_blocks(k, monkeypatch):
    import bc_fast.eval.metrics as M

    rng = np.random.default_rng(k)
    scores = rng.integers(0, 4, size=(53, 37)).astype(np.float32)  # many ties at the cut
    scores[5] = -np.inf
    positives = [rng.integers(0, 37, size=rng.integers(1, 6)) for _ in range(53)]
    exclude = [rng.choice(37, size=rng.integers(0, 5), replace=False) for _ in range(53)]
    want = _recall_reference(scores, positives, k, exclude)
    np.testing.assert_array_equal(recall_at_k(scores, positives, k, exclude=exclude), want)
    monkeypatch.setattr(M, "_BLOCK_SCORES", 100)  # several blocks of 2 rows, and a short last one
    np.testing.assert_array_equal(recall_at_k(scores, positives, k, exclude=exclude), want)
    assert scores[5, 0] == -np.inf and np.isfinite(scores[0]).all()  # the caller's scores are untouched


def test_recall_at_k_errors():
    with pytest.raises(ValueError, match="k must be"):
        recall_at_k(np.zeros((1, 3)), [np.array([0])], 0)
    with pytest.raises(ValueError, match="no positives"):
        recall_at_k(np.zeros((1, 3)), [np.array([], int)], 1)
    with pytest.raises(ValueError, match="2-D"):
        recall_at_k(np.zeros(3), [np.array([0])], 1)
    with pytest.raises(ValueError, match="positive lists"):
        recall_at_k(np.zeros((2, 3)), [np.array([0])], 1)
    with pytest.raises(ValueError, match="scores row 1 contains NaN"):
        recall_at_k(np.array([[0.0, 1.0], [np.nan, 0.0]]), [np.array([0]), np.array([1])], 1)
    with pytest.raises(ValueError, match=r"positives\[0\] has item id 3 outside \[0, 3\)"):
        recall_at_k(np.zeros((1, 3)), [np.array([3])], 1)
    with pytest.raises(ValueError, match=r"exclude\[0\] has item id -1 outside"):
        recall_at_k(np.zeros((1, 3)), [np.array([0])], 1, exclude=[np.array([-1])])
    with pytest.raises(ValueError, match=r"positives\[0\] must hold integer item ids"):
        recall_at_k(np.zeros((1, 3)), [np.array([0.5])], 1)


def test_consumer_tasks_labels_and_scoring():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    from bc_fast.data import synthetic_interactions, time_points
    from bc_fast.eval.consumers import CONSUMER_TASKS, build_consumer_tasks, score_consumers, train_consumers

    data = synthetic_interactions(num_users=50, num_items=30, num_edges=900, seed=3)
    tp = time_points(3)
    splits = [data.split(tp[k], tp[k + 1]) for k in range(3)]
    tasks = build_consumer_tasks(data, splits, min_item_ratings=3)
    assert [t.name for t in tasks] == list(CONSUMER_TASKS)
    by = {t.name: t for t in tasks}
    # user-activity: label 1 exactly for users with a validation edge
    for k, s in enumerate(splits):
        idx, y = by["user-activity"].examples[k]
        np.testing.assert_array_equal(np.nonzero(y)[0], np.unique(s.val_user))
        idx, y = by["edge-rating"].examples[k]
        np.testing.assert_array_equal(y, (s.val_rating >= 4).astype(np.float32))
    assert by["user-activity"].stop_version == 1 and by["user-activity"].score_versions == [2]
    assert by["edge-rating"].score_versions == [1, 2]
    assert by["item-genre"].out_dim == len(data.label_names)

    rng = np.random.default_rng(0)
    d = 6
    emb = [(rng.normal(size=(s.num_users, d)).astype(np.float32), rng.normal(size=(s.num_items, d)).astype(np.float32))
           for s in splits]
    heads = train_consumers(tasks, emb, seeds=(0, 1), epochs=2, hidden=8)
    scores = score_consumers(tasks, heads, emb)
    assert set(scores) == set(CONSUMER_TASKS)
    assert all(v.shape == (2, 3) for v in scores.values())
    # deterministic under the seed
    heads2 = train_consumers(tasks, emb, seeds=(0, 1), epochs=2, hidden=8)
    scores2 = score_consumers(tasks, heads2, emb)
    for name in scores:
        np.testing.assert_array_equal(np.nan_to_num(scores[name], nan=-1), np.nan_to_num(scores2[name], nan=-1))
    bad = [(u[:, :3], i[:, :3]) for u, i in emb]
    with pytest.raises(ValueError, match="map them to version 0"):
        score_consumers(tasks, heads, bad)
    with pytest.raises(ValueError, match="unknown consumer task"):
        build_consumer_tasks(data, splits, ["nope"])


def test_report_table_json_and_plots(tmp_path):
    from bc_fast.eval.report import format_table, plot_degradation, plot_per_version, write_json

    rows = [{"strategy": "nobc", "intended_change": 0.0, "unintended_change": -26.5, "total": -26.5,
             "align_error": 2.6, "recall": 0.1, "auc": 0.5},
            {"strategy": "joint-mloss", "intended_change": -3.0, "unintended_change": -0.65, "total": -3.65,
             "align_error": 0.38, "recall": 0.097, "auc": float("nan")}]
    table = format_table(rows)
    assert "joint-mloss" in table and "-26.50" in table and "n/a" in table
    p = write_json(tmp_path / "sub" / "r.json", {"a": np.float32(1.5), "b": [np.nan, 1], "c": np.arange(3)})
    assert json.loads(p.read_text()) == {"a": 1.5, "b": [None, 1], "c": [0, 1, 2]}
    assert [f.name for f in p.parent.iterdir()] == ["r.json"]  # no temp file left behind
    pytest.importorskip("matplotlib")
    pv = {"nobc": {"intended_change": [0, 0, 0], "unintended_change": [None, -20.0, -30.0]},
          "joint-mloss": {"intended_change": [0, -2.0, -3.0], "unintended_change": [None, -0.5, -1.0]}}
    png = plot_degradation(tmp_path / "deg.png", pv, title="t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    png2 = plot_per_version(tmp_path / "pv.png", {"edge-rating": {"nobc": [0.7, 0.6, None]}},
                            {"nobc": [0.1, 0.1, 0.1]}, {"nobc": [0.0, 1.0, 2.0]})
    assert png2.stat().st_size > 1000


def test_item_genre_stops_on_items_it_never_scores(monkeypatch):
    """The early-stopping items are disjoint from the training items and from every version's scored items."""
    pytest.importorskip("torch")
    from bc_fast.data import synthetic_interactions, time_points
    from bc_fast.eval import consumers as C

    data = synthetic_interactions(num_users=200, num_items=300, num_edges=8000, seed=0)
    tp = time_points(3, 0.5)
    splits = [data.split(tp[k], tp[k + 1]) for k in range(3)]
    (task,) = C.build_consumer_tasks(data, splits, ["item-genre"])
    stop_idx, stop_y = task.stop_set()
    items0 = np.nonzero(data.item_labels[: splits[0].num_items].sum(1) > 0)[0]
    assert len(stop_idx) > 0 and np.intersect1d(stop_idx, task.train_idx).size == 0
    for idx, _ in task.examples:
        assert np.intersect1d(stop_idx, idx).size == 0
    # train, stop and held (scored version-0) items partition the labelled version-0 items
    held = np.intersect1d(task.examples[1][0], items0)
    np.testing.assert_array_equal(np.sort(np.concatenate([task.train_idx, stop_idx, held])), items0)
    np.testing.assert_array_equal(stop_y, data.item_labels[stop_idx])
    with pytest.raises(ValueError, match="must be in \\(0, 1\\) with a sum below 1"):
        C.build_consumer_tasks(data, splits, ["item-genre"], genre_holdout=0.6, genre_stop=0.4)

    # train_consumers early-stops on exactly those items
    seen = []
    auc = C._auc
    monkeypatch.setattr(C, "_auc", lambda t, y, s: seen.append(len(y)) or auc(t, y, s))
    rng = np.random.default_rng(0)
    emb = [(rng.normal(size=(s.num_users, 4)).astype(np.float32), rng.normal(size=(s.num_items, 4)).astype(np.float32))
           for s in splits]
    C.train_consumers([task], emb, seeds=(0,), epochs=2, hidden=8)
    assert seen == [len(stop_idx)] * 2
