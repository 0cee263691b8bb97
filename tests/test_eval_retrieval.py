"""Legacy retrieval report: the version-j index holds version j's items only (known answers)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("faiss", reason="the legacy index is a faiss index")

from bc_fast import Layer
from bc_fast.eval.retrieval import (
    legacy_retrieval_report,
    recall_from_embeddings,
    version_rows,
)

pytestmark = pytest.mark.usefixtures("faiss_one_thread")


def _top_k(q: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    """Brute-force inner-product top-k ids (the reference for the faiss indexes)."""
    return np.argsort(-(q @ items.T), axis=1, kind="stable")[:, :k]


def test_identity_chain_with_appended_items_retains_everything() -> None:
    """B_1 = identity, latest = version-0 items + new (larger) ones: overlap and retention are 1."""
    rng = np.random.default_rng(0)
    n_users, n0, n_new, d = 40, 60, 60, 8
    users0 = rng.normal(size=(n_users, d)).astype(np.float32)
    items0 = rng.normal(size=(n0, d)).astype(np.float32)
    items1 = np.vstack([items0, 1.5 * rng.normal(size=(n_new, d)).astype(np.float32)])
    train = np.stack([rng.integers(0, n_users, 200), rng.integers(0, n0, 200)], 1)
    test = np.stack([np.arange(n_users), rng.integers(0, n0, n_users)], 1)
    strategies = {"perfect": {"items": [items0, items1], "users": [users0, users0],
                              "backward": [[Layer(np.eye(d, dtype=np.float32))]]}}
    r = legacy_retrieval_report(strategies, k=10, recall_k=10, train_pairs=train, test_pairs=test)["perfect"]
    assert r["overlap@10"] == 1.0
    assert r["recall_true"] > 0 and r["recall_retention"] == 1.0
    assert r["recall_legacy"] == r["recall_transformed"] == r["recall_true"]
    # the runner's legacy recall (the same version-0 rows of the latest table) agrees
    assert recall_from_embeddings(users0, version_rows(items1, n0), train, test, 10) == r["recall_legacy"]


def test_drifted_item_and_truncation_known_answer() -> None:
    """Item 1 drifts in the latest version; item 4 is new and would win every query if it were indexed."""
    items0 = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]], np.float32)
    items1 = np.array([[1, 0, 7], [0, -1, 7], [-1, 0, 7], [0, 1, 7], [5, 5, 7]], np.float32)
    users0 = np.array([[1, 0.1], [0.1, 1]], np.float32)
    users1 = np.hstack([users0, np.zeros((2, 1), np.float32)])
    test = np.array([[0, 0], [1, 1]])
    train = np.zeros((0, 2), np.int64)
    strategies = {"nobc": {"items": [items0, items1], "users": [users0, users1], "backward": None}}
    for k in (1, 2):
        r = legacy_retrieval_report(strategies, k=k, recall_k=1, train_pairs=train, test_pairs=test)["nobc"]
        # truncation 3 -> 2 keeps rows 0..3 as [e0, -e1, -e0, e1]: each user keeps half its top-k
        legacy = items1[:4, :2]
        want = np.mean([len(set(a) & set(b)) / k for a, b in zip(_top_k(users0, legacy, k), _top_k(users0, items0, k))])
        assert want == 0.5 and r[f"overlap@{k}"] == pytest.approx(want)
        assert r["notes"] == "B_1=truncate 3->2"
        # user 0 still finds item 0, user 1 finds item 3 instead of item 1
        assert (r["recall_true"], r["recall_legacy"], r["recall_transformed"]) == (1.0, 0.5, 0.5)
        assert r["recall_retention"] == 0.5


def test_version_rows_and_shrinking_tables_are_refused() -> None:
    table = np.arange(12, dtype=np.float32).reshape(6, 2)
    np.testing.assert_array_equal(version_rows(table, 4), table[:4])
    with pytest.raises(ValueError, match="append-only"):
        version_rows(table, 7)
    items0 = np.zeros((5, 2), np.float32)
    with pytest.raises(ValueError, match=r"\[5, 4\] rows per version"):
        legacy_retrieval_report({"x": {"items": [items0, items0[:4]]}})
