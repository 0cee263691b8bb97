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
    pair = rng.choice(8 * 12, size=n, replace=False)  # distinct (user, item) pairs: repeats are dropped, warned
    inter = pd.DataFrame({"uid": pair // 12, "mid": 100 + pair % 12,
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
    pair = rng.choice(40 * 60, size=n, replace=False)  # distinct (user, item) pairs
    pd.DataFrame({"u": pair // 60, "i": pair % 60, "t": np.arange(n),
                  "r": rng.integers(1, 6, n)}).to_csv(tmp_path / "ratings.csv", index=False)
    said = []
    data, overrides = load_user_interactions(tmp_path / "ratings.csv", columns="user=u,item=i,time=t,rating=r",
                                             log=said.append)
    assert data.item_labels is None
    assert overrides == {"consumer_tasks": tuple(t for t in ALL_TASKS if t != "item-genre")}
    assert said == ["no label column (label= in --columns): the item-genre consumer task is skipped"]


def _kept(d) -> list[tuple]:
    """The kept interactions as (user id, item id, rating), in time order."""
    return [(int(u), int(i), float(r)) for u, i, r in zip(d.user_ids[d.user], d.item_ids[d.item], d.rating)]


@pytest.mark.parametrize("tz", [None, "Europe/Berlin"])
def test_a_missing_datetime_drops_its_row_instead_of_sorting_it_first(tz) -> None:
    t = pd.to_datetime(["2020-01-03", "2020-01-01", None, "2020-01-02"])
    df = pd.DataFrame({"user": [1, 2, 1, 3], "item": [10, 10, 20, 30], "rating": [4.0, 2.0, 3.0, 1.0],
                       "timestamp": t.tz_localize(tz) if tz else t})
    with pytest.warns(UserWarning, match=r"^1 of 4 interaction\(s\) lack a user, item, rating or timestamp"):
        d = from_dataframe(df)
    assert _kept(d) == [(2, 10, 2.0), (3, 30, 1.0), (1, 10, 4.0)]
    assert np.all(np.diff(d.timestamp) > 0) and d.timestamp.min() > 0


def test_a_missing_time_in_a_parquet_datetime_column_is_dropped(tmp_path) -> None:
    pytest.importorskip("pyarrow", reason="Parquet needs pyarrow")
    pd.DataFrame({"user": [1, 2, 1, 3], "item": [10, 10, 20, 30], "rating": [4.0, 2.0, 3.0, 1.0],
                  "timestamp": pd.to_datetime(["2020-01-03", "2020-01-01", None, "2020-01-02"])}
                 ).to_parquet(tmp_path / "nat.parquet")
    with pytest.warns(UserWarning, match=r"^1 of 4 interaction\(s\) lack"):
        d = load_interactions(tmp_path / "nat.parquet")
    assert _kept(d) == [(2, 10, 2.0), (3, 30, 1.0), (1, 10, 4.0)]


def test_non_finite_and_out_of_range_values_drop_their_rows(tmp_path) -> None:
    (tmp_path / "inf.csv").write_text("user,item,rating,timestamp\n1,1,inf,1\n2,2,3,2\n1,2,4,inf\n"
                                      "3,3,4,1e30\n3,1,2,5\n4,4,-inf,6\n4,1,1,-inf\n")
    with pytest.warns(UserWarning) as rec:
        d = load_interactions(tmp_path / "inf.csv")
    msgs = [str(w.message) for w in rec]
    assert len(msgs) == 2, msgs
    assert msgs[0].startswith("column 'timestamp': 1 time(s) lie outside the int64 range (e.g. [1e+30])"), msgs
    assert msgs[1].startswith("4 of 7 interaction(s) lack a user, item, rating or timestamp (missing or not "
                              "finite) and are dropped"), msgs
    assert _kept(d) == [(2, 2, 3.0), (3, 1, 2.0)]
    np.testing.assert_array_equal(d.timestamp, [2, 5])


def test_only_unusable_rows_leave_an_empty_table() -> None:
    df = pd.DataFrame({"user": [1, 2], "item": [1, 2], "rating": [np.inf, 3.0], "timestamp": [1.0, np.nan]})
    with pytest.warns(UserWarning, match="2 of 2 interaction"), pytest.raises(ValueError, match="empty after dropping"):
        from_dataframe(df)


def test_a_repeated_pair_keeps_its_earliest_interaction(tmp_path) -> None:
    rows, t = ["user,item,rating,timestamp"], 0
    for u in range(1, 7):  # every user rates items 1..3 ...
        for i in range(1, 4):
            t += 1
            rows.append(f"{u},{i},4,{t}")
    for u in range(1, 7):  # ... and repeats item 1 later with another rating
        t += 1
        rows.append(f"{u},1,5,{t}")
    (tmp_path / "repeat.csv").write_text("\n".join(rows) + "\n")
    with pytest.warns(UserWarning, match=r"^6 of 24 interaction\(s\) repeat an earlier \(user, item\) pair and are "
                                         r"dropped \(the earliest is kept"):
        d = load_interactions(tmp_path / "repeat.csv")
    assert _kept(d) == [(u, i, 4.0) for u in range(1, 7) for i in range(1, 4)]
    np.testing.assert_array_equal(d.timestamp, np.arange(1, 19))
    s = d.split(0.75, 1.0)
    train = set(zip(s.train_user.tolist(), s.train_item.tolist()))
    assert s.num_val > 0 and not train & set(zip(s.val_user.tolist(), s.val_item.tolist()))


def test_a_repeat_with_the_same_time_keeps_the_first_row() -> None:
    df = pd.DataFrame({"user": [1, 1, 2, 1], "item": [1, 1, 1, 1], "rating": [5.0, 2.0, 3.0, 1.0],
                       "timestamp": [3, 3, 2, 1]})
    with pytest.warns(UserWarning, match=r"^2 of 4 interaction\(s\) repeat"):
        d = from_dataframe(df)
    assert _kept(d) == [(1, 1, 1.0), (2, 1, 3.0)]


def test_file_errors_name_the_file_and_its_role(tmp_path) -> None:
    r = tmp_path / "r.csv"
    r.write_text("user,item,rating,timestamp\n1,10,4,1\n2,20,3,2\n1,20,4,3\n3,30,5,4\n")
    with pytest.raises(FileNotFoundError, match=r"^item file '.*no_items\.csv' does not exist"):
        load_interactions(r, items=tmp_path / "no_items.csv")
    (tmp_path / "adir.csv").mkdir()
    with pytest.raises(IsADirectoryError, match=r"^interaction file '.*adir\.csv' is a directory; expected one .csv"):
        load_interactions(tmp_path / "adir.csv")
    (tmp_path / "it_s.csv").write_text("item,genre\nA10,x\n")
    with pytest.raises(ValueError, match=r"^cannot join the item file '.*it_s\.csv' to the interaction file "
                                         r"'.*r\.csv' on 'item': its ids are .* there but int64 in the interaction"):
        load_interactions(r, items=tmp_path / "it_s.csv")
    (tmp_path / "it.csv").write_text("item,genre\n10,x\n20,y\n30,z\n")
    with pytest.raises(ValueError, match=r"neither the item file '.*it\.csv' \(columns \['item', 'genre'\]\) nor "
                                         r"the interaction file '.*r\.csv' \(columns \['user', 'item', 'rating', "
                                         r"'timestamp'\]\) has column\(s\) \['year'\]"):
        load_interactions(r, items=tmp_path / "it.csv", columns="attrs=genre+year")


@pytest.mark.parametrize(("columns", "msg"), [
    ("item=user", "--columns maps both user and item to the column 'user'"),
    ("rating=timestamp", "--columns maps both time and rating to the column 'timestamp'"),
])
def test_one_column_for_two_roles_is_refused(tmp_path, columns, msg) -> None:
    (tmp_path / "r.csv").write_text("user,item,rating,timestamp\n1,10,4,1\n2,20,3,2\n")
    with pytest.raises(ValueError, match=f"^{msg}; each of user, item, time and rating needs its own column"):
        load_interactions(tmp_path / "r.csv", columns=columns)


def test_from_dataframe_refuses_one_column_for_two_roles() -> None:
    df = pd.DataFrame({"user": [1, 2], "item": [10, 20], "rating": [4.0, 3.0], "timestamp": [1, 2]})
    with pytest.raises(ValueError, match="^user and item both name the column 'user'"):
        from_dataframe(df, item="user")
    with pytest.raises(ValueError, match="^rating and timestamp both name the column 'timestamp'"):
        from_dataframe(df, rating="timestamp")
