"""Post-hoc adapters for an off-the-shelf text-model upgrade, evaluated on real models and texts.

The scenario: a corpus is indexed with an old embedding model; a new model arrives. Instead of
re-embedding the corpus, fit a backward adapter new -> old (:mod:`bc_fast.fit`) on a small
sample of texts embedded by both, and serve the legacy index with adapted new-model queries.

Protocol (every number in the results JSON follows it)
------------------------------------------------------
* Corpus: a real labelled corpus (:func:`bc_fast.data.text.load_text_corpus`), embedded by every
  model once (cached outside the repository, :func:`bc_fast.data.text_cache.embed_texts`); all
  embeddings are L2-normalised. A fixed random split (``seed``) sets aside ``n_queries`` texts as
  queries; the rest is the indexed corpus ``C``.
* Fit pairs: the first ``round(f * |C|)`` texts of one fixed random order of ``C`` (so the 1 % set
  is inside the 5 % set); never a query.
* Ground truth, the same for every row of a pair: the exact top-``k`` neighbours in ``C`` of each
  query under the NEW model (a flat inner-product index of new-model corpus vectors searched with
  new-model queries, i.e. the full re-embed).
* ``recall_full``: that full re-embed against the ground truth (1 up to ties, by construction).
  ``recall_old``: the legacy (old-model) index searched with old-model queries.
  ``recall``: the legacy index searched with adapted new-model queries (the adapter's output,
  normalised). ``retention = recall / recall_full`` (the issue's Recall@k retention);
  ``vs_old = recall / recall_old``. ``overlap_old``: the share of the old queries' own top-k
  that the adapted queries find (backward compatibility of the results, not a retention).
  ``label_p``: the share of the top-k results that carry the query's label, a relevance proxy
  that no model defines; ``label_retention = label_p / label_p_full``.
* Classifier: multinomial logistic regression (numpy) trained on old-model embeddings of ``C``
  with the corpus labels; ``acc_old`` is its accuracy on old-model query embeddings,
  ``acc`` on adapted new-model query embeddings, ``acc_retention = acc / acc_old``;
  ``acc_new_retrained`` (a classifier retrained on the new model) and ``acc_majority`` for scale.
* ``fit_s``: the estimator's fit time. ``latency_us``: median wall time of one
  ``FusedTransform.apply`` of one query into a preallocated output (compiled core).
  ``recall_bf16`` / ``latency_bf16_us``: the same operator with ``precision="bf16"`` (None where
  the CPU lacks AVX512-BF16).
* Forward (old queries adapted into the NEW index): for the best backward kind of each pair and
  fraction, an old -> new adapter on the same pairs; ``recall`` against the same ground truth.
* Local adapters (kind ``local``, :class:`bc_fast.fit.LocalAdapter`): per-cluster closed-form maps
  routed by soft top-m nearest centroids; its settings are chosen on the fit pairs' own validation
  rows (never the queries). ``local_vs_global`` compares it, per pair and fraction, with the best
  global kind *on the queries* (a choice that favours the global side): label P@10 of both, the
  difference with a 95 % paired bootstrap CI over queries (:mod:`bc_fast.eval.bootstrap`, 1000
  draws), neighbour overlaps, fit time and latency. The local kind's latency is its compiled routed
  operator's (:class:`bc_fast.engine.routed.RoutedTransform`); it has no bf16 twin and is not in the chain.
* ``neighbour_overlap`` (``test_metrics``): the share of each old-model query's top-k among the old-model
  queries that the adapted query finds among them (:func:`bc_fast.fit.neighbour_overlap`).
* Chain: versions 0, 1, 2 = ``chain`` models (old, mid, new) in a :class:`bc_fast.store.Registry`
  with fitted backward transforms 1 -> 0 and 2 -> 1; ``operator(2, 0)`` fuses them, and the new
  model's queries go through it into the version-0 index (ground truth: version 2's neighbours).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..eval.report import write_json
from ..eval.retrieval import overlap_at_k, unit_rows
from .config import check_seed
from .text_report import _plot, format_text_table

__all__ = ["PAIRS", "CHAIN", "run_text_demo", "format_text_table", "fit_logreg"]

PAIRS: dict[str, tuple[str, str]] = {
    "A": ("wordllama-256", "minilm-l6-384"),
    "B": ("minilm-l3-384", "minilm-l6-384"),
}
CHAIN: tuple[str, str, str] = ("wordllama-256", "minilm-l3-384", "minilm-l6-384")
KINDS = ("procrustes", "ridge", "lowrank", "mlp", "local")
#: kinds the registry cannot store yet (no layer program): left out of the chain
_NOT_IN_CHAIN = ("local",)

_QUICK = {"limit": 3000, "n_queries": 300, "fractions": (0.05, 0.20), "kinds": ("procrustes", "ridge", "local"),
          "latency_calls": 300}
_FULL = {"limit": None, "n_queries": 2000, "fractions": (0.01, 0.05, 0.20), "kinds": KINDS,
         "latency_calls": 2000}


# -- small numeric helpers -----------------------------------------------------------------------
def _search(corpus: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k ids by inner product (faiss IndexFlatIP); rows are normalised by the caller."""
    import faiss

    index = faiss.IndexFlatIP(corpus.shape[1])
    index.add(np.ascontiguousarray(corpus, dtype=np.float32))
    _, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return ids


def fit_logreg(x: np.ndarray, y: np.ndarray, n_classes: int, *, l2: float = 1e-4, iters: int = 300,
               lr: float = 0.05, seed: int = 0) -> Callable[[np.ndarray], np.ndarray]:
    """Multinomial logistic regression by full-batch Adam; returns ``predict(X) -> labels``.

    Features are standardised with the training mean and std (part of the classifier, so a
    consumer fed other embeddings sees the same scaling).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"expected x (n, d) and y (n,), got {x.shape} and {y.shape}")
    mu, sd = x.mean(0), x.std(0) + 1e-8
    z = (x - mu) / sd
    n, d = z.shape
    onehot = np.zeros((n, n_classes))
    onehot[np.arange(n), y] = 1.0
    w = np.random.default_rng(seed).normal(0.0, 1e-3, (d + 1, n_classes))
    zb = np.hstack([z, np.ones((n, 1))])
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    for t in range(1, iters + 1):
        logits = zb @ w
        logits -= logits.max(1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(1, keepdims=True)
        g = zb.T @ (p - onehot) / n
        g[:-1] += l2 * w[:-1]
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        w -= lr * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)

    def predict(xq: np.ndarray) -> np.ndarray:
        zq = (np.asarray(xq, dtype=np.float64) - mu) / sd
        return np.argmax(zq @ w[:-1] + w[-1], axis=1)

    return predict


def _latency_us(op: Any, x_row: np.ndarray, calls: int) -> float:
    """Median µs of ``op.apply(x_row, out=out)`` for one row, after a warm-up."""
    x = np.ascontiguousarray(x_row.reshape(1, -1), dtype=np.float32)
    out = np.empty((1, op.d_out), dtype=np.float32)
    for _ in range(min(50, calls)):
        op.apply(x, out=out)
    t = np.empty(calls)
    clock = time.perf_counter_ns
    for i in range(calls):
        t0 = clock()
        op.apply(x, out=out)
        t[i] = clock() - t0
    return float(np.median(t) / 1e3)


# -- inputs ---------------------------------------------------------------------------------------
def _load_corpus(corpus: Any, limit: int | None) -> Any:
    from ..data.text import TextCorpus, load_text_corpus

    if isinstance(corpus, TextCorpus):
        return corpus if limit is None or limit >= len(corpus) else corpus.subset(np.arange(limit))
    return load_text_corpus(corpus, limit=limit)


def _embeddings(models: Sequence[str], corpus: Any, given: Mapping[str, np.ndarray] | None,
                cache_dir: Any, log: Callable[[str], None]) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    from ..data.text_cache import embed_texts
    from ..data.text_models import TEXT_MODELS, load_encoder, model_info

    embs: dict[str, np.ndarray] = {}
    infos: dict[str, dict] = {}
    for name in models:
        t0 = time.perf_counter()
        if given is not None and name in given:
            x = np.asarray(given[name], dtype=np.float32)
            if x.ndim != 2 or x.shape[0] != len(corpus):
                raise ValueError(f"embeddings[{name!r}] must have shape ({len(corpus)}, d), got {x.shape}")
            info = model_info(name) if name in TEXT_MODELS else {"name": name, "dim": x.shape[1]}
            info["source"] = "given"
        else:
            info = model_info(name)
            log(f"embedding {len(corpus)} texts with {name} ({info['package']} {info['package_version']})")
            x = embed_texts(load_encoder(name), corpus.texts, cache_dir=cache_dir, log=log)
            info["source"] = "computed or cached"
        info["seconds"] = round(time.perf_counter() - t0, 3)
        embs[name] = unit_rows(x)
        infos[name] = info
    return embs, infos


# -- one evaluation --------------------------------------------------------------------------------
class _Setup:
    """Per-run fixed state: split, fit order, ground truths, classifiers."""

    def __init__(self, embs: dict[str, np.ndarray], labels: np.ndarray, n_queries: int, k: int, seed: int) -> None:
        n = labels.shape[0]
        if not 1 <= n_queries < n:
            raise ValueError(f"n_queries must be in [1, {n - 1}] for a corpus of {n} texts, got {n_queries}")
        rng = np.random.default_rng(seed)
        perm = rng.permutation(n)
        self.q_idx, self.c_idx = np.sort(perm[:n_queries]), np.sort(perm[n_queries:])
        self.fit_order = rng.permutation(self.c_idx.shape[0])  # positions into C
        self.embs, self.labels, self.k = embs, labels, k
        self.n_classes = int(labels.max()) + 1
        self._gt: dict[str, np.ndarray] = {}
        self._own: dict[str, np.ndarray] = {}
        self._clf: dict[str, Callable] = {}

    def corpus(self, m: str) -> np.ndarray:
        return self.embs[m][self.c_idx]

    def queries(self, m: str) -> np.ndarray:
        return self.embs[m][self.q_idx]

    def own_results(self, m: str) -> np.ndarray:
        """Top-k of model m's queries in model m's index (for the new model: the ground truth)."""
        if m not in self._own:
            self._own[m] = _search(self.corpus(m), self.queries(m), self.k)
        return self._own[m]

    def classifier(self, m: str) -> Callable:
        if m not in self._clf:
            self._clf[m] = fit_logreg(self.corpus(m), self.labels[self.c_idx], self.n_classes)
        return self._clf[m]

    def label_precision(self, ids: np.ndarray) -> float:
        """Mean share of each query's results (positions into C) that carry the query's label."""
        return float(np.mean(self.labels[self.c_idx][ids] == self.labels[self.q_idx][:, None]))

    def accuracy(self, m: str, x_queries: np.ndarray) -> float:
        return float(np.mean(self.classifier(m)(x_queries) == self.labels[self.q_idx]))

    def n_fit(self, fraction: float) -> int:
        return max(2, int(round(fraction * self.c_idx.shape[0])))

    def fit_rows(self, fraction: float) -> np.ndarray:
        return self.c_idx[np.sort(self.fit_order[:self.n_fit(fraction)])]


def _baseline(s: _Setup, old: str, new: str) -> dict[str, Any]:
    gt = s.own_results(new)
    qs_old, qs_new = s.queries(old), s.queries(new)
    full = _search(s.corpus(new), qs_new, s.k)
    base = {
        "recall_full": overlap_at_k(full, gt),
        "recall_old": overlap_at_k(s.own_results(old), gt),
        "label_p_full": s.label_precision(full),
        "label_p_old": s.label_precision(s.own_results(old)),
        "acc_old": s.accuracy(old, qs_old),
        "acc_new_retrained": s.accuracy(new, qs_new),
        "acc_majority": float(np.mean(s.labels[s.q_idx] == np.bincount(s.labels[s.c_idx]).argmax())),
    }
    if qs_new.shape[1] == qs_old.shape[1]:  # same width: what happens without any adapter
        base["recall_unadapted"] = overlap_at_k(_search(s.corpus(old), qs_new, s.k), gt)
        base["acc_unadapted"] = s.accuracy(old, qs_new)
    return base


def _fit(kind: str, x_src: np.ndarray, x_dst: np.ndarray, params: Mapping[str, Any]) -> Any:
    from ..fit import fit_adapter

    return fit_adapter(x_src, x_dst, kind=kind, **dict(params))


def _bf16_twin(op: Any) -> Any | None:
    """The same layer program computed in bf16 where the CPU can (None elsewhere)."""
    from ..engine import FusedTransform, build_info

    if not build_info().get("bf16") or not hasattr(op, "layers"):  # a routed (local) map has no layer program
        return None
    return FusedTransform(op.layers, normalize=op.normalize, precision="bf16")


def _score_backward(s: _Setup, est_or_op: Any, old: str, new: str, base: dict, latency_calls: int) -> dict[str, Any]:
    op = getattr(est_or_op, "operator_", est_or_op)
    queries = np.ascontiguousarray(s.queries(new))

    def legacy_ids(operator: Any) -> tuple[np.ndarray, np.ndarray]:
        adapted = unit_rows(operator.apply(queries))
        return adapted, _search(s.corpus(old), adapted, s.k)

    adapted, ids = legacy_ids(op)
    recall = overlap_at_k(ids, s.own_results(new))
    label_p = s.label_precision(ids)
    per_query = np.mean(s.labels[s.c_idx][ids] == s.labels[s.q_idx][:, None], axis=1)
    acc = s.accuracy(old, adapted)
    op_bf16 = _bf16_twin(op)
    recall_bf16 = latency_bf16 = None
    if op_bf16 is not None:
        recall_bf16 = overlap_at_k(legacy_ids(op_bf16)[1], s.own_results(new))
        latency_bf16 = _latency_us(op_bf16, queries[0], latency_calls)
    return {
        "recall": recall,
        "retention": recall / base["recall_full"] if base["recall_full"] > 0 else float("nan"),
        "vs_old": recall / base["recall_old"] if base["recall_old"] > 0 else float("nan"),
        "overlap_old": overlap_at_k(ids, s.own_results(old)),
        "label_p": label_p,
        "label_retention": label_p / base["label_p_full"] if base["label_p_full"] > 0 else float("nan"),
        "acc": acc,
        "acc_retention": acc / base["acc_old"] if base["acc_old"] > 0 else float("nan"),
        "latency_us": _latency_us(op, queries[0], latency_calls),
        "recall_bf16": recall_bf16,
        "latency_bf16_us": latency_bf16,
        "_label_p_per_query": per_query,  # for the bootstrap; not written to the JSON
    }


def _fit_and_score(s: _Setup, kind: str, old: str, new: str, f: float, base: dict, params: Mapping,
                   latency_calls: int, log: Callable) -> dict[str, Any]:
    from ..fit import fit_metrics

    rows = s.fit_rows(f)
    row: dict[str, Any] = {"kind": kind, "fraction": f, "n_fit": int(rows.shape[0])}
    t0 = time.perf_counter()
    try:
        est = _fit(kind, s.embs[new][rows], s.embs[old][rows], params)
    except ValueError as e:  # e.g. fewer pairs than a kind needs: a result, not a crash
        log(f"    {kind} at {f:.0%}: not fitted: {e}")
        row["error"] = str(e)
        return row
    row["fit_s"] = float(getattr(est, "fit_time_s_", time.perf_counter() - t0))
    row.update(_score_backward(s, est, old, new, base, latency_calls))
    row["test_metrics"] = fit_metrics(est, s.queries(new), s.queries(old), k=s.k)
    row["neighbour_overlap"] = row["test_metrics"]["neighbour_overlap"]
    row["fitted"] = _fitted_attrs(est)
    return row


def _fitted_attrs(est: Any) -> dict[str, Any]:
    """The estimator's choices worth reporting (chosen alpha, kept epoch, validation scores)."""
    names = ("chosen_", "alpha_", "rank_", "best_epoch_", "n_epochs_", "val_metrics_", "base_", "k_", "m_",
             "temperature_", "prior_rows_")
    return {n.rstrip("_"): getattr(est, n) for n in names
            if isinstance(getattr(est, n, None), (int, float, str, dict, np.integer, np.floating))}


def _forward(s: _Setup, kind: str, old: str, new: str, f: float, base: dict, params: Mapping,
             latency_calls: int) -> dict[str, Any]:
    rows = s.fit_rows(f)
    est = _fit(kind, s.embs[old][rows], s.embs[new][rows], params)
    adapted = unit_rows(est.transform(np.ascontiguousarray(s.queries(old))))
    ids = _search(s.corpus(new), adapted, s.k)
    recall = overlap_at_k(ids, s.own_results(new))
    return {"kind": kind, "fraction": f, "n_fit": int(rows.shape[0]), "fit_s": float(est.fit_time_s_),
            "recall": recall, "retention": recall / base["recall_full"] if base["recall_full"] > 0 else float("nan"),
            "vs_old": recall / base["recall_old"] if base["recall_old"] > 0 else float("nan"),
            "label_p": s.label_precision(ids),
            "label_retention": s.label_precision(ids) / base["label_p_full"] if base["label_p_full"] > 0 else float("nan"),
            "latency_us": _latency_us(est.operator_, s.queries(old)[0], latency_calls)}


def _chain(s: _Setup, chain: Sequence[str], kind: str, f: float, base: dict, params: Mapping,
           latency_calls: int, reg_dir: Path, infos: Mapping[str, dict]) -> dict[str, Any]:
    from ..fit import fit_metrics
    from ..store.registry import Registry

    old, mid, new = chain
    rows = s.fit_rows(f)
    path = reg_dir / f"{kind}-{int(round(f * 1000)):04d}permille"
    if path.exists():
        shutil.rmtree(path)  # this demo's own output from an earlier run
    reg = Registry.create(path, name=f"text-upgrade-{kind}-{f:g}")
    reg.add_version(dim=s.embs[old].shape[1], metadata={"model": old, **_meta(infos[old])})
    fit_s = 0.0
    for v, (src, dst) in enumerate(((mid, old), (new, mid)), start=1):
        est = _fit(kind, s.embs[src][rows], s.embs[dst][rows], params)
        fit_s += float(est.fit_time_s_)
        reg.add_version(dim=s.embs[src].shape[1], metadata={"model": src, **_meta(infos[src])}, backward=est,
                        fit_metrics=fit_metrics(est, s.queries(src), s.queries(dst), k=s.k))
    op = reg.operator(2, 0)
    row = {"kind": kind, "fraction": f, "n_fit": int(rows.shape[0]), "fit_s": fit_s, "registry": str(path),
           "operator": repr(op)}
    row.update(_score_backward(s, op, old, new, base, latency_calls))
    row.pop("_label_p_per_query")
    return row


def _local_vs_global(rows: Sequence[dict[str, Any]], per_query: Mapping[int, np.ndarray], f: float,
                     seed: int) -> dict[str, Any] | None:
    """The local adapter against the best global kind at one fraction (best by label P@10 on the queries),
    with a paired bootstrap CI over queries of the label P@10 difference."""
    from ..eval.bootstrap import Block, compare, paired_bootstrap

    done = [(i, r) for i, r in enumerate(rows) if r["fraction"] == f and "error" not in r]
    local = [(i, r) for i, r in done if r["kind"] == "local"]
    glob = [(i, r) for i, r in done if r["kind"] != "local"]
    if not local or not glob:
        return None
    (il, rl), (ig, rg) = local[0], max(glob, key=lambda t: t[1]["label_p"])
    values = np.stack([per_query[ig], per_query[il]])[:, None, :]
    cmp = compare(paired_bootstrap([Block(values)], n_boot=1000, seed=seed), ["global", "local"], "global",
                  relative=False)["local"]
    keys = ("label_p", "label_retention", "recall", "overlap_old", "neighbour_overlap", "fit_s", "latency_us")
    return {"fraction": f, "best_global": rg["kind"], "global": {k: rg.get(k) for k in keys},
            "local": {k: rl.get(k) for k in keys}, "local_settings": rl.get("fitted", {}),
            "label_p_diff": cmp["diff"], "label_p_diff_ci95": [cmp["diff_lo"], cmp["diff_hi"]],
            "significant": cmp["significant"]}


def _meta(info: Mapping[str, Any]) -> dict[str, Any]:
    return {k: info[k] for k in ("package", "package_version") if k in info}


# -- entry point ----------------------------------------------------------------------------------------
def run_text_demo(out_dir: str | Path, *, fractions: Sequence[float] | None = None,
                  kinds: Sequence[str] | None = None, seed: int = 0, log: Callable[[str], None] = print,
                  quick: bool = False, corpus: Any = "trump_tweets", limit: int | None = None,
                  n_queries: int | None = None, k: int = 10,
                  pairs: Mapping[str, tuple[str, str]] | None = None, chain: Sequence[str] | None = CHAIN,
                  forward: bool = True, cache_dir: str | Path | None = None,
                  embeddings: Mapping[str, np.ndarray] | None = None,
                  fit_params: Mapping[str, Mapping[str, Any]] | None = None,
                  latency_calls: int | None = None, blas_threads: int | None = None) -> dict[str, Any]:
    """Fit post-hoc adapters between real text models and evaluate them (see the module doc for the protocol).

    Parameters
    ----------
    out_dir : path
        Receives ``text_demo.json`` (every number), ``text_demo.png`` and the chain registries.
    fractions : fitting-pair fractions of the indexed corpus (default 1 %, 5 %, 20 %; quick: 5 %, 20 %).
    kinds : adapter kinds of :func:`bc_fast.fit.fit_adapter` (default all five: procrustes, ridge, lowrank,
        mlp, local; quick: procrustes, ridge, local).
    seed : int
        Query split and fit-pair order.
    quick : bool
        A small run for tests and smoke checks: the first 3000 texts, 300 queries, fewer kinds and
        fractions (explicit arguments win).
    corpus : name of :data:`bc_fast.data.text.TEXT_CORPORA` or a :class:`bc_fast.data.text.TextCorpus`.
    limit, n_queries : corpus size cap and number of queries (full: all texts, 2000 queries).
    pairs : ``{name: (old_model, new_model)}`` (default :data:`PAIRS`).
    chain : three models ``(old, mid, new)`` or None to skip the chain.
    forward : bool
        Also fit old -> new adapters for the best backward kind of each pair and fraction.
    cache_dir : embedding cache folder (see :func:`bc_fast.data.text_cache.embedding_cache_dir`).
    embeddings : ``{model: array (n_texts, d)}``, optional
        Precomputed embeddings of the corpus texts, used instead of the models (tests).
    fit_params : ``{kind: {param: value}}`` passed to :func:`bc_fast.fit.fit_adapter`.
    latency_calls : calls timed per latency figure (full 2000, quick 300).
    blas_threads : int, optional
        Cap the BLAS/OpenMP thread pools (threadpoolctl) for the run. The closed-form fits are
        small dense problems: on a busy 2-core machine 1 thread is many times faster than 2.
        Default: leave the pools as they are. The setting is recorded in the JSON.

    Returns
    -------
    dict, also written to ``out_dir/text_demo.json``.
    """
    from threadpoolctl import threadpool_info, threadpool_limits

    if blas_threads is not None and (isinstance(blas_threads, bool) or not isinstance(blas_threads, int)
                                     or blas_threads < 1):
        raise ValueError(f"blas_threads must be a positive integer or None, got {blas_threads!r}")
    check_seed(seed)
    with threadpool_limits(blas_threads):
        res = _run(out_dir, fractions=fractions, kinds=kinds, seed=seed, log=log, quick=quick, corpus=corpus,
                   limit=limit, n_queries=n_queries, k=k, pairs=pairs, chain=chain, forward=forward,
                   cache_dir=cache_dir, embeddings=embeddings, fit_params=fit_params, latency_calls=latency_calls,
                   threads={f"{p['internal_api']}:{p['prefix']}": p["num_threads"] for p in threadpool_info()})
    return res


def _run(out_dir: str | Path, *, fractions: Sequence[float] | None, kinds: Sequence[str] | None, seed: int,
         log: Callable[[str], None], quick: bool, corpus: Any, limit: int | None, n_queries: int | None, k: int,
         pairs: Mapping[str, tuple[str, str]] | None, chain: Sequence[str] | None, forward: bool,
         cache_dir: str | Path | None, embeddings: Mapping[str, np.ndarray] | None,
         fit_params: Mapping[str, Mapping[str, Any]] | None, latency_calls: int | None,
         threads: dict[str, int]) -> dict[str, Any]:
    t_start = time.perf_counter()
    mode = _QUICK if quick else _FULL
    fractions = tuple(mode["fractions"] if fractions is None else fractions)
    kinds = tuple(mode["kinds"] if kinds is None else kinds)
    limit = mode["limit"] if limit is None else limit
    n_queries = mode["n_queries"] if n_queries is None else int(n_queries)
    latency_calls = mode["latency_calls"] if latency_calls is None else int(latency_calls)
    pairs = dict(PAIRS if pairs is None else pairs)
    fit_params = {kk: dict(v) for kk, v in (fit_params or {}).items()}
    if not fractions or any(not 0.0 < float(f) <= 1.0 for f in fractions):
        raise ValueError(f"fractions must be a non-empty list of values in (0, 1], got {fractions}")
    if not kinds:
        raise ValueError("kinds must name at least one adapter kind")
    if chain is not None and len(chain) != 3:
        raise ValueError(f"chain must be three models (old, mid, new) or None, got {chain!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    data = _load_corpus(corpus, limit)
    log(f"corpus: {data!r} from {data.source}")
    models = list(dict.fromkeys([m for p in pairs.values() for m in p] + list(chain or ())))
    embs, infos = _embeddings(models, data, embeddings, cache_dir, log)
    s = _Setup(embs, data.labels, n_queries, k, seed)
    log(f"split: {s.c_idx.shape[0]} indexed texts, {s.q_idx.shape[0]} queries; fit pairs "
        + ", ".join(f"{f:.0%} = {s.n_fit(f)}" for f in fractions))

    res: dict[str, Any] = {"pairs": {}}
    for name, (old, new) in pairs.items():
        base = _baseline(s, old, new)
        p: dict[str, Any] = {"old": old, "new": new, "baseline": base, "backward": [], "forward": [],
                             "local_vs_global": []}
        per_query: dict[int, np.ndarray] = {}
        log(f"[{name}] {new} -> {old}: full re-embed R@{k} {base['recall_full']:.3f}, "
            f"old queries R@{k} {base['recall_old']:.3f}")
        for f in fractions:
            for kind in kinds:
                r = _fit_and_score(s, kind, old, new, f, base, fit_params.get(kind, {}), latency_calls, log)
                if "_label_p_per_query" in r:
                    per_query[len(p["backward"])] = r.pop("_label_p_per_query")
                p["backward"].append(r)
                if "error" not in r:
                    log(f"    {kind:<10} {f:>4.0%}: R@{k} {r['recall']:.3f} (retention {r['retention']:.3f}), "
                        f"acc {r['acc']:.3f}, fit {r['fit_s']:.2f} s, {r['latency_us']:.1f} µs/query")
            cmp = _local_vs_global(p["backward"], per_query, f, seed)
            if cmp is not None:
                p["local_vs_global"].append(cmp)
                log(f"    local vs {cmp['best_global']} {f:.0%}: label P@{k} {cmp['local']['label_p']:.3f} vs "
                    f"{cmp['global']['label_p']:.3f}, diff {cmp['label_p_diff']:+.3f} "
                    f"[{cmp['label_p_diff_ci95'][0]:+.3f}, {cmp['label_p_diff_ci95'][1]:+.3f}]")
            done = [r for r in p["backward"] if r["fraction"] == f and "error" not in r]
            if forward and done:
                best = max(done, key=lambda r: r["recall"])["kind"]
                fw = _forward(s, best, old, new, f, base, fit_params.get(best, {}), latency_calls)
                p["forward"].append(fw)
                log(f"    forward {best} {f:.0%}: old queries -> new index R@{k} {fw['recall']:.3f}")
        res["pairs"][name] = p

    if chain is not None:
        old, mid, new = chain
        base = _baseline(s, old, new)
        ch: dict[str, Any] = {"models": list(chain), "baseline": base, "rows": []}
        for f in fractions:
            for kind in (kk for kk in kinds if kk not in _NOT_IN_CHAIN):
                try:
                    r = _chain(s, chain, kind, f, base, fit_params.get(kind, {}), latency_calls,
                               out / "registries", infos)
                except ValueError as e:
                    r = {"kind": kind, "fraction": f, "n_fit": s.n_fit(f), "error": str(e)}
                ch["rows"].append(r)
                if "error" not in r:
                    log(f"    chain {kind:<10} {f:>4.0%}: R@{k} {r['recall']:.3f} (retention {r['retention']:.3f}) "
                        f"through {r['operator']}")
        res["chain"] = ch

    res.update({
        "protocol": {
            "corpus": {"name": data.name, "source": data.source, "n_texts": len(data), "sha256": data.fingerprint,
                       "labels": data.label_names},
            "n_queries": int(s.q_idx.shape[0]), "n_indexed": int(s.c_idx.shape[0]), "k": k, "seed": seed,
            "fractions": list(fractions), "kinds": list(kinds), "fit_params": fit_params,
            "index": "faiss IndexFlatIP on L2-normalised vectors (exact)",
            "ground_truth": "exact top-k of the new model's queries in the new model's index of the same texts",
            "retention": "recall / recall_full", "vs_old": "recall / recall_old",
            "label_retention": "label_p / label_p_full, label_p = share of the top-k results with the "
                               "query's label (a model-independent relevance proxy)",
            "classifier": "multinomial logistic regression (numpy, standardised features) trained on old-model "
                          "corpus embeddings; accuracy on the queries",
            "latency": f"median of {latency_calls} .apply calls of the compiled operator (FusedTransform; local: "
                       "RoutedTransform), batch 1, preallocated out",
            "local_vs_global": "local against the global kind with the best label P@10 on the queries at the same "
                               "fraction; label_p_diff = local - global with a 95 % paired bootstrap CI over "
                               "queries (1000 draws)",
            "fit_pairs": "first round(f * n_indexed) texts of a fixed random order of the indexed corpus",
            "thread_pools": threads,
        },
        "models": infos,
        "seconds": round(time.perf_counter() - t_start, 1),
    })
    table = format_text_table(res)
    log("\n" + table)
    res["table"] = table
    write_json(out / "text_demo.json", res)
    png = _plot(out / "text_demo.png", res)
    log(f"\nwrote {out / 'text_demo.json'}" + (f" and {png}" if png else " (no PNG: matplotlib is not installed)"))
    return res
