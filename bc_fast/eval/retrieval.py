"""Retrieval evaluation of legacy indexes: overlap@k, Recall@k from embeddings, retention reports.

:func:`legacy_retrieval_report` builds, per strategy, a temporary registry and a
legacy index (:func:`bc_fast.index.build_legacy_index`) from the latest embeddings
of the legacy version's items, and compares it with an index of the true
legacy-version embeddings. Recall@k is :func:`bc_fast.eval.metrics.recall_at_k`,
the package's single implementation.

Dense ids are append-only: row ``i`` of every version's table is the same entity and
version j's table holds the first ``n_j`` rows of any later one (new entities are
appended). :func:`version_rows` takes those rows from a later table; the experiment
runner's legacy retention uses it too, so both define retention the same way.
"""

from __future__ import annotations

import itertools
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..index.faiss_utils import blas_threshold, blas_threshold_for, faiss_metric
from ..index.legacy import build_legacy_index
from ..engine import Layer
from ..store.registry import Registry
from .metrics import recall_at_k

__all__ = ["unit_rows", "overlap_at_k", "recall_from_embeddings", "version_rows", "legacy_retrieval_report",
           "format_retrieval_report"]


def unit_rows(x: np.ndarray) -> np.ndarray:
    """``x`` as C-contiguous float32 rows of unit L2 norm (zero rows stay zero): cosine search input."""
    x = np.asarray(x, dtype=np.float32)
    return np.ascontiguousarray(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12), dtype=np.float32)


def version_rows(table: Any, n_rows: int, *, what: str = "table") -> Any:
    """The rows of an older version in a newer ``table``: its first ``n_rows`` rows (dense ids are append-only).

    Row ``i`` of every version's table must be the same entity, so the version with
    ``n_rows`` entities is a prefix of every later table; entities added later are not
    part of it. Raises ValueError if ``table`` has fewer than ``n_rows`` rows.
    """
    n = int(n_rows)
    if n < 0 or n > len(table):
        raise ValueError(f"{what} has {len(table)} rows, the older version has {n}: dense ids are append-only, "
                         "so an older version's entities must be a prefix of every later table")
    return table[:n]


def overlap_at_k(I_a: np.ndarray, I_b: np.ndarray, k: int | None = None) -> float:
    """Mean fraction of shared ids in two top-k result lists (retrieval compatibility).

    Parameters
    ----------
    I_a, I_b : int arrays of shape (n, >=k)
        Result ids of the same queries from two indexes; -1 (no hit) never matches.
    k : int, optional
        Use the first ``k`` columns (default: all).

    Returns
    -------
    float in [0, 1]: mean over queries of ``|top_k(a) & top_k(b)| / k``.
    """
    a = np.asarray(I_a)
    b = np.asarray(I_b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(f"I_a and I_b must be 2-D with the same number of rows, got {a.shape} and {b.shape}")
    k = min(a.shape[1], b.shape[1]) if k is None else int(k)
    if not 1 <= k <= min(a.shape[1], b.shape[1]):
        raise ValueError(f"k={k} must be in [1, {min(a.shape[1], b.shape[1])}]")
    if a.shape[0] == 0:
        raise ValueError("no queries")
    a, b = a[:, :k], b[:, :k]
    hits = 0
    for s in range(0, a.shape[0], 512):
        aa, bb = a[s:s + 512], b[s:s + 512]
        eq = (aa[:, :, None] == bb[:, None, :]) & (aa[:, :, None] >= 0)
        hits += int(eq.any(axis=2).sum())
    return hits / (a.shape[0] * k)


def recall_from_embeddings(users: np.ndarray, items: np.ndarray, train_pairs: np.ndarray,
                           test_pairs: np.ndarray, k: int = 50, *, metric: str = "ip", chunk: int = 1024) -> float:
    """Mean Recall@k of item recommendation from embeddings: all items ranked per user, training items excluded.

    Scores ``users @ items.T`` (or ``-||u - i||^2`` for ``metric="l2"``) in blocks of
    ``chunk`` users and passes them to :func:`bc_fast.eval.metrics.recall_at_k`.

    Parameters
    ----------
    users : ndarray of shape (n_users, d)
    items : ndarray of shape (n_items, d)
    train_pairs, test_pairs : int arrays of shape (m, 2)
        ``(user, item)`` rows. Training items are never recommended.
    k : int, default 50
    metric : {"ip", "l2"}

    Returns
    -------
    float: mean over users with test items of ``|top_k & test| / |test|``.
    """
    faiss_metric(metric)
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise ValueError(f"chunk must be a positive integer (users scored at once), got {chunk!r}")
    users = np.asarray(users, dtype=np.float32)
    items = np.asarray(items, dtype=np.float32)
    if users.ndim != 2 or items.ndim != 2 or users.shape[1] != items.shape[1]:
        raise ValueError(f"users (n_users, d) and items (n_items, d) must share d, got {users.shape}, {items.shape}")
    tr = _pairs(train_pairs, "train_pairs", users.shape[0], items.shape[0])
    te = _pairs(test_pairs, "test_pairs", users.shape[0], items.shape[0])
    if te.shape[0] == 0:
        raise ValueError("test_pairs is empty")
    test_users = np.unique(te[:, 0])
    truth, seen = _group(te, test_users), _group(tr, test_users)
    sq = (items * items).sum(1) if metric.lower() == "l2" else None
    recalls = np.empty(len(test_users))
    for s in range(0, len(test_users), chunk):
        scores = users[test_users[s:s + chunk]] @ items.T
        if sq is not None:
            scores = 2 * scores - sq[None, :]  # -||u - i||^2 up to a per-user constant
        recalls[s:s + chunk] = recall_at_k(scores, truth[s:s + chunk], k, exclude=seen[s:s + chunk])
    return float(recalls.mean())


def _group(pairs: np.ndarray, users: np.ndarray) -> list[np.ndarray]:
    """The items of each of ``users`` (sorted ids) in ``(user, item)`` rows."""
    p = pairs[np.argsort(pairs[:, 0], kind="stable")]
    lo = np.searchsorted(p[:, 0], users, side="left")
    hi = np.searchsorted(p[:, 0], users, side="right")
    return [p[a:b, 1] for a, b in zip(lo, hi)]


def _pairs(p: Any, name: str, n_users: int, n_items: int) -> np.ndarray:
    a = np.asarray(p)
    if a.ndim != 2 or a.shape[1] != 2 or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must be an int array of shape (m, 2) of (user, item) rows, got {a.dtype} {a.shape}")
    if a.size and (a.min() < 0 or a[:, 0].max() >= n_users or a[:, 1].max() >= n_items):
        raise ValueError(f"{name} has ids outside [0, {n_users}) x [0, {n_items})")
    return a.astype(np.int64)


# ----------------------------------------------------------------------------- legacy retrieval report


def _backward_list(backward: Any, n_versions: int, name: str) -> list[Any]:
    """Normalise per-strategy backward transforms to a list indexed by version (entry 0 unused)."""
    K = n_versions - 1
    if backward is None:
        return [None] * n_versions
    if isinstance(backward, Mapping):
        bad = [v for v in backward if not (isinstance(v, int) and 1 <= v <= K)]
        if bad:
            raise ValueError(f"strategies[{name!r}]['backward'] keys must be versions 1..{K}, got {bad}")
        return [None] + [backward.get(v) for v in range(1, n_versions)]
    seq = list(backward)
    if len(seq) == K:
        return [None] + seq
    if len(seq) == n_versions and seq[0] is None:
        return seq
    raise ValueError(f"strategies[{name!r}]['backward'] must list B_1..B_{K} ({K} entries) or "
                     f"[None, B_1, ..., B_{K}]; got {len(seq)} entries")


def _identity_layers(d_from: int, d_to: int) -> list[Layer]:
    return [Layer(np.eye(d_to, d_from, dtype=np.float32))]


def legacy_retrieval_report(strategies: Mapping[str, Mapping[str, Any]], *, version: int = 0, k: int = 50,
                            train_pairs: np.ndarray | None = None, test_pairs: np.ndarray | None = None,
                            recall_k: int = 50, factory: str = "Flat", metric: str = "ip",
                            max_queries: int = 2000, seed: int = 0,
                            workdir: str | os.PathLike | None = None) -> dict[str, dict[str, Any]]:
    """Retrieval retention of a legacy index built from the latest embeddings, per strategy.

    For each strategy: put its versions and backward transforms in a registry (in a
    temporary directory), fuse the chain latest -> ``version`` (j), build a faiss index
    for j from the latest embeddings of version j's n_j items (the first n_j rows of the
    latest table, :func:`version_rows`) through the fused core, and compare it with the
    index of the TRUE version-j embeddings of the same items. Items added after version j
    are left out of both: they did not exist for version j's consumers (and its test
    pairs cannot name them), so a perfectly compatible chain scores overlap and
    retention 1.0.

    Parameters
    ----------
    strategies : mapping name -> dict with keys
        ``items``: list of K+1 arrays, item embeddings of versions 0..K, shapes (n_k, d_k),
        n_0 <= ... <= n_K, row i the same item in every version (dense ids, appended);
        ``users``: optional list of K+1 arrays (n_users_k, d_k), user embeddings, the same way;
        ``backward``: B_1..B_K as a list of K transforms (or ``[None, B_1, ...]`` or
        ``{k: B_k}``), each anything :func:`bc_fast.store.registry.as_layers` accepts (a Layer
        list from ``export_layers()``, ``(W, b)``). ``None`` (the whole entry, or one
        step) means no transform: the identity, truncating to the first d_(k-1)
        features if the dimension grew (what nobc does).
    version : int, default 0
        The legacy version j whose consumers are served.
    k : int, default 50
        Depth of overlap@k.
    train_pairs, test_pairs : int arrays of shape (m, 2), optional
        ``(user, item)`` interactions for Recall@``recall_k`` (needs ``users``).
    recall_k : int, default 50
    factory, metric : faiss index_factory string and "ip"/"l2" for the legacy index.
    max_queries : int
        Version-j queries used for overlap@k: the true version-j user embeddings (or
        item embeddings when no users are given), at most this many, sampled.
    workdir : path, optional
        Where to put the registries (default: a temporary directory, removed after).

    Returns
    -------
    dict name -> dict with
        ``overlap@k``: mean |top-k(legacy index) & top-k(true v_j index)| / k for version-j queries,
        both indexes over version j's n_j items;
        ``recall_true``: Recall@recall_k of true v_j users vs true v_j items;
        ``recall_legacy``: true v_j users vs the legacy items (latest embeddings of the n_j
        version-j items, transformed);
        ``recall_transformed``: transformed latest users vs those legacy items;
        ``recall_retention``: recall_legacy / recall_true; ``recall_k``;
        ``chain``: the fused operator, ``n_queries``, ``build_s`` (index build seconds),
        ``rows_per_s``. Recall keys are absent without interactions and users.

    Raises
    ------
    ValueError
        Among others, if a version has more item (or user) rows than a later one.
    """
    if not strategies:
        raise ValueError("strategies is empty")
    own_tmp = workdir is None
    base = Path(tempfile.mkdtemp(prefix="bc_fast_legacy_")) if own_tmp else Path(workdir)
    report: dict[str, dict[str, Any]] = {}
    try:
        for si, (name, data) in enumerate(strategies.items()):
            items, users = _strategy_arrays(name, data, version)
            reg, notes = _strategy_registry(base / f"{si:02d}_registry", str(name), items, data.get("backward"))
            row = _overlap_row(reg, items, users, version=version, k=k, factory=factory, metric=metric,
                               max_queries=max_queries, seed=seed)
            if notes:
                row["notes"] = ", ".join(notes)
            if users is not None and train_pairs is not None and test_pairs is not None:
                row.update(_recall_row(reg, items, users, version, train_pairs, test_pairs, recall_k, metric))
            report[str(name)] = row
    finally:
        if own_tmp:
            shutil.rmtree(base, ignore_errors=True)
    return report


def _strategy_arrays(name: Any, data: Any, version: int) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """The per-version item (and user) arrays of one strategy, checked."""
    if not isinstance(data, Mapping) or "items" not in data:
        raise ValueError(f"strategies[{name!r}] must be a dict with 'items' (and optional 'users', 'backward')")
    items = [np.asarray(x) for x in data["items"]]
    users = None if data.get("users") is None else [np.asarray(x) for x in data["users"]]
    nv = len(items)
    if not 0 <= version < nv - 1:
        raise ValueError(f"strategies[{name!r}] has versions 0..{nv - 1}; version={version} must be older "
                         f"than the latest")
    if users is not None and len(users) != nv:
        raise ValueError(f"strategies[{name!r}]: 'users' has {len(users)} versions, 'items' has {nv}")
    for what, tables in (("items", items), ("users", users or [])):
        rows = [len(x) for x in tables]
        if any(a > b for a, b in itertools.pairwise(rows)):
            raise ValueError(f"strategies[{name!r}]['{what}'] has {rows} rows per version: dense ids are "
                             "append-only, so each version's rows must be a prefix of the next version's")
    return items, users


def _strategy_registry(path: Path, name: str, items: list[np.ndarray], backward: Any) -> tuple[Registry, list[str]]:
    """A registry of the strategy's versions; missing steps become identity/truncation (listed in the notes)."""
    steps = _backward_list(backward, len(items), name)
    reg = Registry.create(path, name=name)
    notes = []
    for v, x in enumerate(items):
        dim, b = x.shape[1], steps[v]
        if v > 0 and b is None:
            d_prev = items[v - 1].shape[1]
            b = _identity_layers(dim, d_prev)
            notes.append(f"B_{v}=" + ("identity" if dim == d_prev else f"truncate {dim}->{d_prev}"))
        reg.add_version(dim=dim, backward=b if v > 0 else None, metadata={"strategy": name})
    return reg, notes


def _legacy_items(items: list[np.ndarray], version: int) -> np.ndarray:
    """The latest embeddings of version ``version``'s items (the first n_j rows of the latest table)."""
    rows = version_rows(items[-1], items[version].shape[0], what=f"the latest item table (v{len(items) - 1})")
    return np.ascontiguousarray(rows, np.float32)


def _overlap_row(reg: Registry, items: list[np.ndarray], users: list[np.ndarray] | None, *, version: int, k: int,
                 factory: str, metric: str, max_queries: int, seed: int) -> dict[str, Any]:
    """overlap@k of the legacy index with a flat index of the true version-j items (the same n_j items).

    The legacy index holds the latest embeddings of version j's items only, mapped through
    the fused chain: items added after version j are in neither index.
    """
    import faiss

    latest = len(items) - 1
    t0 = time.perf_counter()
    legacy = build_legacy_index(reg, _legacy_items(items, version), version, table_version=latest,
                                factory=factory, metric=metric, progress=False)
    build_s = time.perf_counter() - t0
    true_j = np.ascontiguousarray(items[version], np.float32)
    truth = faiss.index_factory(true_j.shape[1], "Flat", faiss_metric(metric))
    truth.add(true_j)
    pool = users[version] if users is not None else true_j
    rng = np.random.default_rng(seed)
    qi = np.sort(rng.choice(len(pool), size=min(max_queries, len(pool)), replace=False))
    q = np.ascontiguousarray(pool[qi], np.float32)
    kk = min(k, legacy.ntotal)
    _, I_legacy = legacy.search(q, kk, query_version=version)
    with blas_threshold(blas_threshold_for(true_j.shape[1])):
        _, I_true = truth.search(q, kk)
    return {
        f"overlap@{k}": overlap_at_k(I_legacy, I_true),
        "chain": repr(reg.operator(latest, version)),
        "n_queries": int(len(q)),
        "build_s": build_s,
        "rows_per_s": legacy.ntotal / build_s if build_s > 0 else math.inf,
    }


def _recall_row(reg: Registry, items: list[np.ndarray], users: list[np.ndarray], version: int,
                train_pairs: np.ndarray, test_pairs: np.ndarray, recall_k: int, metric: str) -> dict[str, Any]:
    """Recall@recall_k of true version-j users against true, legacy and transformed embeddings.

    Every ranking is over version j's n_j items only: the true ones, or the latest
    embeddings of the same items mapped through the fused chain.
    """
    latest = len(items) - 1
    op = reg.operator(latest, version)
    items_t = op.apply(_legacy_items(items, version))
    users_t = op.apply(np.ascontiguousarray(users[latest], np.float32))

    def recall(u: np.ndarray, i: np.ndarray) -> float:
        return recall_from_embeddings(u, i, train_pairs, test_pairs, recall_k, metric=metric)

    r_true = recall(users[version], np.asarray(items[version], np.float32))
    r_legacy = recall(users[version], items_t)
    return {"recall_k": int(recall_k), "recall_true": r_true, "recall_legacy": r_legacy,
            "recall_transformed": recall(users_t, items_t),
            "recall_retention": r_legacy / r_true if r_true > 0 else math.nan}


def format_retrieval_report(report: Mapping[str, Mapping[str, Any]], *, version: int = 0) -> str:
    """Render :func:`legacy_retrieval_report` output as an aligned text table."""
    if not report:
        return "(no strategies)"
    okey = next((key for key in next(iter(report.values())) if key.startswith("overlap@")), "overlap@50")
    has_recall = any("recall_true" in r for r in report.values())
    rk = next((r["recall_k"] for r in report.values() if "recall_k" in r), 50)
    head = f"{'strategy':<20} {okey:>11}"
    if has_recall:
        head += (f" {f'R@{rk} true v{version}':>14} {f'R@{rk} legacy':>12} {'retention':>10} "
                 f"{f'R@{rk} transf.':>13}")
    title = (f"legacy retrieval for version {version} (index of version {version}'s items built from their "
             "latest embeddings via the fused chain)")
    lines = [title, head]
    for name, r in report.items():
        line = f"{name:<20} {r[okey]:>11.3f}"
        if has_recall and "recall_true" in r:
            line += (f" {r['recall_true']:>14.4f} {r['recall_legacy']:>12.4f} {r['recall_retention']:>9.1%} "
                     f"{r['recall_transformed']:>13.4f}")
        lines.append(line)
    return "\n".join(lines)
