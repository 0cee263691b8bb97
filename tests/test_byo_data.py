"""Bring-your-own data: interaction files with a column mapping, and from_dataframe's robustness."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

pd = pytest.importorskip("pandas", reason="bc_fast.data reads tables with pandas")

from bc_fast.data import from_dataframe  # noqa: E402
from bc_fast.data.interactions import load_interactions, parse_columns, read_table  # noqa: E402


def _frames():
    rng = np.random.default_rng(0)
    n = 60
    inter = pd.DataFrame({"uid": rng.integers(0, 8, n), "mid": rng.integers(100, 112, n),
                          "stars": rng.integers(1, 6, n).astype(float), "ts": rng.permutation(n) * 10})
    items = pd.DataFrame({"mid": np.arange(100, 112), "genres": [f"g{i % 3}|g{i % 2 + 3}" for i in range(12)],
                          "year": 1990.0 + np.arange(12)})
    return inter, items


MAP = "user=uid,item=mid,time=ts,rating=stars,label=genres"


@pytest.mark.parametrize("fmt", ["csv", "tsv", "parquet"])
def test_files_with_a_column_mapping_give_the_same_data(tmp_path, fmt) -> None:
    inter, items = _frames()
    if fmt == "parquet":
        pytest.importorskip("pyarrow", reason="Parquet needs pyarrow")
        inter.to_parquet(tmp_path / "i.parquet")
        items.to_parquet(tmp_path / "m.parquet")
    else:
        sep = "," if fmt == "csv" else "\t"
        inter.to_csv(tmp_path / f"i.{fmt}", sep=sep, index=False)
        items.to_csv(tmp_path / f"m.{fmt}", sep=sep, index=False)
    d = load_interactions(tmp_path / f"i.{fmt}", items=tmp_path / f"m.{fmt}", columns=MAP, n_bins=4)
    ref = from_dataframe(inter.merge(items, on="mid"), user="uid", item="mid", rating="stars", timestamp="ts",
                         item_attributes=("year",), label_attribute="genres", n_bins=4)
    np.testing.assert_array_equal(d.user, ref.user)
    np.testing.assert_array_equal(d.item, ref.item)
    np.testing.assert_array_equal(d.rating, ref.rating)
    assert set(d.attr_sizes) == {"year"} and d.attr_sizes["year"] == 4  # attrs: the item file's other columns
    assert d.label_names == ["g0", "g3", "g1", "g4", "g2"] or sorted(d.label_names) == ["g0", "g1", "g2", "g3", "g4"]
    np.testing.assert_array_equal(d.item_labels, ref.item_labels)
    assert d.name == "i"


def test_mapping_and_file_errors(tmp_path) -> None:
    inter, _ = _frames()
    inter.to_csv(tmp_path / "i.csv", index=False)
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['user', 'item', 'timestamp', 'rating'\].*--columns"):
        load_interactions(tmp_path / "i.csv")
    with pytest.raises(ValueError, match="unknown column mapping key 'usr'"):
        parse_columns("usr=uid")
    with pytest.raises(ValueError, match="is not key=column"):
        parse_columns("user")
    with pytest.raises(ValueError, match="given twice"):
        parse_columns("user=a,user=b")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_table(tmp_path / "nope.csv")
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ValueError, match="unknown table format '.json'"):
        read_table(tmp_path / "x.json")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['genres'\]"):
        load_interactions(tmp_path / "i.csv", columns="user=uid,item=mid,time=ts,rating=stars,label=genres")


def test_junk_numbers_are_coerced_with_a_warning_naming_the_count() -> None:
    n = 12
    rating = [str(1 + k % 5) for k in range(n)]
    rating[1], rating[3] = "oops", "n/a"
    year = [str(1990 + k) for k in range(n)]
    year[2] = "?"
    df = pd.DataFrame({"u": np.arange(n) % 4, "i": np.arange(n), "r": rating, "t": np.arange(n), "year": year})
    with pytest.warns(UserWarning) as rec:
        d = from_dataframe(df, user="u", item="i", rating="r", timestamp="t", item_attributes=("year",), n_bins=2)
    msgs = [str(w.message) for w in rec]
    assert any("column 'r': 2 value(s) are not numbers" in m for m in msgs), msgs
    assert any("2 of 12 interaction(s) lack a user, item, rating or timestamp" in m for m in msgs), msgs
    assert any("column 'year': 1 value(s) are not numbers" in m for m in msgs), msgs
    assert d.num_edges == 10 and d.rating[0] == 1.0 and d.rating[1] == 3.0
    assert d.attr_sizes["year"] == 2  # binned as a number, not 11 string tokens


def test_dates_as_timestamps() -> None:
    df = pd.DataFrame({"u": [1, 2, 1], "i": [1, 2, 2], "r": [5, 3, 4],
                       "t": ["2020-01-03", "2020-01-01", "2020-01-02"]})
    d = from_dataframe(df, user="u", item="i", rating="r", timestamp="t")
    np.testing.assert_array_equal(d.rating, [3.0, 4.0, 5.0])
    assert np.all(np.diff(d.timestamp) > 0)


def test_a_string_where_a_list_is_expected_is_refused() -> None:
    inter, items = _frames()
    df = inter.merge(items, on="mid")
    with pytest.raises(TypeError, match=r"item_attributes must be a list of column names, got the string 'genres'"):
        from_dataframe(df, user="uid", item="mid", rating="stars", timestamp="ts", item_attributes="genres")
    with pytest.raises(TypeError, match="label_exclude must be a list"):
        from_dataframe(df, user="uid", item="mid", rating="stars", timestamp="ts", label_attribute="genres",
                       label_exclude="g0")


def test_quantile_bin_collapse_warns() -> None:
    inter, items = _frames()
    df = inter.merge(items.assign(year=1990.0 + (items.index % 2)), on="mid")
    with pytest.warns(UserWarning, match=r"item attribute 'year': 8 quantile bins collapse to 4 \(only 2 distinct values"):
        from_dataframe(df, user="uid", item="mid", rating="stars", timestamp="ts", item_attributes=("year",),
                       n_bins=8)


def test_cli_rejects_columns_without_data(tmp_path) -> None:
    r = subprocess.run([sys.executable, "-m", "bc_fast.cli", "demo", "--columns", "user=a", "--out", str(tmp_path)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "--items and --columns describe the file given with --data" in r.stderr
    r = subprocess.run([sys.executable, "-m", "bc_fast.cli", "experiment", "--data", str(tmp_path / "none.csv"),
                        "--out", str(tmp_path / "o")], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "none.csv' does not exist" in r.stderr


def test_experiment_runs_on_a_csv_file(tmp_path) -> None:
    pytest.importorskip("torch", reason="the experiment trains with PyTorch")
    from bc_fast.data import synthetic_interactions
    from bc_fast.experiments import ExperimentConfig, run_experiment

    syn = synthetic_interactions(num_users=70, num_items=60, num_edges=2000, seed=1)
    df = pd.DataFrame({"who": syn.user_ids[syn.user], "what": syn.item_ids[syn.item], "stars": syn.rating,
                       "when": syn.timestamp})
    df.to_csv(tmp_path / "inter.csv", index=False)
    data = load_interactions(tmp_path / "inter.csv", columns="user=who,item=what,time=when,rating=stars")
    assert data.item_labels is None and data.attr_sizes == {}
    cfg = ExperimentConfig.quick(dims=(8, 10), epochs=2, batch_size=512, consumer_epochs=2, consumer_seeds=(0,),
                                 posthoc_steps=10, degree_bins=4, n_boot=50, strategies=("fix-m0", "nobc", "joint-mloss"),
                                 keep=(), consumer_tasks=("edge-rating", "item-rating-avg"))
    res = run_experiment(cfg, data=data, log=None)
    assert [r["strategy"] for r in res["rows"]] == ["nobc", "fix-m0", "joint-mloss"]
    assert res["data"]["name"] == "inter" and res["data"]["interactions"] == data.num_edges


def test_user_file_without_labels_drops_the_item_genre_task(tmp_path):
    from bc_fast.experiments.demo import load_user_interactions
    from bc_fast.experiments import ALL_TASKS

    rng = np.random.default_rng(0)
    n = 600
    pd.DataFrame({"u": rng.integers(0, 40, n), "i": rng.integers(0, 60, n), "t": np.arange(n),
                  "r": rng.integers(1, 6, n)}).to_csv(tmp_path / "ratings.csv", index=False)
    said = []
    data, overrides = load_user_interactions(tmp_path / "ratings.csv", columns="user=u,item=i,time=t,rating=r",
                                             log=said.append)
    assert data.item_labels is None
    assert overrides == {"consumer_tasks": tuple(t for t in ALL_TASKS if t != "item-genre")}
    assert said == ["no label column (label= in --columns): the item-genre consumer task is skipped"]
