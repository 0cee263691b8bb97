"""Summaries of the experiment's raw results: the paper's table with paired-bootstrap CIs, and printing.

Every table number is a mean over the paired seeds with a 95 % CI from a paired bootstrap over
test users/examples and seeds (:mod:`bc_fast.eval.bootstrap`), computed from the ``raw`` per-seed,
per-user values a run returns (schema: :func:`raw_schema`). The intended metric is Recall@K of the
LATEST version (as the paper reports it), per-version values beside it.

What lives here: :func:`summarize` (table rows, per-version curves, per-task AUCs, BC-Aligner's
paired differences, legacy retention), :func:`raw_schema`, and the text tables
:func:`format_comparisons` and :func:`format_sweep`. It works on finished results only, so it may
import :mod:`.config` and :mod:`bc_fast.eval`, never :mod:`.runner` (which imports it).
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np

from .config import ExperimentConfig

__all__ = ["format_comparisons", "format_sweep", "raw_schema", "summarize"]


def _pct(x: float, ref: float) -> float:
    return float((x - ref) / ref * 100.0) if ref and np.isfinite(ref) and np.isfinite(x) else float("nan")


def raw_schema() -> dict[str, str]:
    """What the ``raw`` part of the results (``results_raw.json``) holds, key by key."""
    return {
        "seeds": "list of the paired training seeds, in order (index s below)",
        "strategies": "list of strategy names, in order",
        "selection_users[k] / test_users[k]": "dense user ids of version k's evaluation users in each half",
        "recall_test[strategy][s][k]": "Recall@K of every test user of version k (in test_users[k] order), seed s",
        "recall_selection[strategy][s][k]": "mean Recall@K on the selection half (what model selection saw)",
        "auc_selection[strategy][s]": "consumer ROC-AUC of the user and edge tasks on the selection side (the "
                                      "selection users, and the share of users with no validation edge that the "
                                      "same per-user keys assign to it), mean over tasks and scored versions with "
                                      "both classes (what a lambda choice may look at)",
        "selected_epoch[strategy][s][k]": "epoch kept for version k (null: not trained by this strategy)",
        "legacy_recall[strategy][s]": "Recall@K of every test user of version 0 (test_users[0] order) on the "
                                      "version-0 index served from the latest table: version-0 items' latest "
                                      "embeddings through the strategy's chain, queried by the true version-0 "
                                      "users; retention = its mean / the mean of recall_test[strategy][s][0]",
        "auc_units[task][k]": "the examples scored for task at version k: {'entity', 'ids' (user or item ids, "
                              "or [users, items] for edges), 'weight' (its share of the unintended score)}",
        "auc_values[strategy][s][task][k]": "per-example AUC placement values (mean = ROC-AUC averaged over "
                                           "consumer seeds; see bc_fast.eval.bootstrap.auc_placements)",
        "align[strategy][s][k]": "mean row L2 distance of version k's embeddings (as version-0 consumers see "
                                 "them) to M_0's",
    }


def _ci(cmp: dict, name: str, prefix: str) -> dict:
    c = cmp.get(name) if cmp else None
    if c is None:
        nan = float("nan")
        return {f"{prefix}": nan, f"{prefix}_lo": nan, f"{prefix}_hi": nan}
    return {prefix: c["mean"], f"{prefix}_lo": c["lo"], f"{prefix}_hi": c["hi"]}


def _diff(cmp: dict, name: str, prefix: str) -> dict:
    c = cmp.get(name) if cmp else None
    if c is None:
        nan = float("nan")
        return {prefix: nan, f"{prefix}_lo": nan, f"{prefix}_hi": nan, f"{prefix}_significant": False}
    return {prefix: c["diff"], f"{prefix}_lo": c["diff_lo"], f"{prefix}_hi": c["diff_hi"],
            f"{prefix}_significant": c["significant"]}


def _legacy_retention(raw: dict, names: list[str], boot: dict) -> dict:
    """Legacy retention in % (mean legacy Recall@K / mean true version-0 Recall@K) with a paired CI.

    The true version-0 recall is shared by every strategy (all share M_0); seeds and test users
    are resampled together for the numerator and the denominator. Empty when ``raw`` has no
    legacy values (results written before they existed) or version 0 has no test users.
    """
    if "legacy_recall" not in raw:
        return {}
    n_seeds = len(raw["seeds"])
    legacy = [[np.asarray(raw["legacy_recall"][n][s], dtype=np.float64) for s in range(n_seeds)] for n in names]
    true = [np.asarray(raw["recall_test"][names[0]][s][0], dtype=np.float64) for s in range(n_seeds)]
    if not true[0].size:
        return {}
    from ..eval.bootstrap import Block, compare, paired_bootstrap

    ref = "__true_version_0_index__"
    res = paired_bootstrap([Block(np.array(legacy + [true]))], **boot)
    out = {}
    for n, c in compare(res, [*names, ref], ref).items():
        if n != ref:
            out[n] = {"mean": 100.0 + c["diff"], "lo": 100.0 + c["diff_lo"], "hi": 100.0 + c["diff_hi"]}
    return out


BC_ALIGNER = "joint-mloss"


def _bc_aligner_differences(intended_res: Any, unintended_res: Any, names: list[str]) -> dict:
    """BC-Aligner minus every other strategy, in points of each % change, with paired 95 % CIs.

    Per bootstrap replicate (the same seeds and units for every strategy), the intended change
    (vs nobc), the unintended change (vs fix-m0) and their total of BC-Aligner minus those of the
    other strategy; ``significant``: the CI excludes 0. Empty without BC-Aligner.
    """
    if BC_ALIGNER not in names:
        return {}
    a, r_i, r_u = names.index(BC_ALIGNER), names.index("nobc"), names.index("fix-m0")

    def change(j: int) -> dict[str, np.ndarray]:
        i = _rel_samples(intended_res, j, r_i)
        u = _rel_samples(unintended_res, j, r_u)
        return {"intended": i, "unintended": u, "total": i + u}

    def point(j: int) -> dict[str, float]:
        i = _pct(float(intended_res.point[j]), float(intended_res.point[r_i]))
        u = _pct(float(unintended_res.point[j]), float(unintended_res.point[r_u]))
        return {"intended": i, "unintended": u, "total": i + u}

    mine, mine_pt = change(a), point(a)
    out: dict[str, dict] = {}
    for j, n in enumerate(names):
        if j == a:
            continue
        theirs, theirs_pt = change(j), point(j)
        entry = {}
        for key in ("intended", "unintended", "total"):
            d = mine[key] - theirs[key]
            d = d[np.isfinite(d)]
            lo, hi = (float(x) for x in np.quantile(d, [0.025, 0.975])) if d.size else (float("nan"),) * 2
            entry[key] = {"diff": mine_pt[key] - theirs_pt[key], "lo": lo, "hi": hi,
                          "significant": bool(lo > 0.0 or hi < 0.0)}
        out[n] = entry
    return out


def format_comparisons(comparisons: dict) -> str:
    """BC-Aligner minus each other strategy, in points, as printed under the table."""
    if not comparisons:
        return ""
    head = f"{'BC-Aligner minus':<16} {'intended (points)':>24} {'unintended (points)':>24} {'total (points)':>24}"
    lines = [head, "-" * len(head)]
    for n, e in comparisons.items():
        cells = [f"{e[k]['diff']:+.2f} [{e[k]['lo']:+.2f}, {e[k]['hi']:+.2f}]" + (" *" if e[k]["significant"] else "  ")
                 for k in ("intended", "unintended", "total")]
        lines.append(f"{n:<16} " + " ".join(f"{c:>24}" for c in cells))
    lines.append("paired over the same seeds and test users/examples; > 0: BC-Aligner better; "
                 "* = CI excludes 0.")
    return "\n".join(lines)


def _rel_samples(res: Any, j: int, r: int) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return 100.0 * (res.samples[:, j] - res.samples[:, r]) / res.samples[:, r]


def summarize(raw: dict, tasks: Any, cfg: ExperimentConfig) -> dict:
    """The paper's table with CIs, per-version curves and per-task AUCs from the ``raw`` results.

    Intended: Recall@K of the LATEST version on its test users, % change vs nobc. Unintended:
    ROC-AUC on the test examples averaged over consumer seeds, each task's scored versions and
    the tasks, % change vs fix-m0. Every value is a mean over the paired seeds with a 95 % CI
    from a paired bootstrap over test users / examples and seeds (``cfg.n_boot`` replicates,
    seeded by ``cfg.split_seed``); ``*_significant`` means the CI of the difference to the
    reference excludes 0. ``total`` adds the two changes replicate by replicate (seeds are
    drawn identically for both; units independently). Alignment error: mean over seeds and
    versions of the mean row L2 distance to M_0's embeddings (no CI).
    """
    from ..eval.bootstrap import Block, compare, paired_bootstrap

    names = list(raw["strategies"])
    n_seeds = len(raw["seeds"])
    K = len(cfg.dims)
    latest = K - 1
    boot = dict(n_boot=cfg.n_boot, seed=cfg.split_seed)

    def recall_block(k: int) -> Block:
        return Block(np.array([[np.asarray(raw["recall_test"][n][s][k]) for s in range(n_seeds)] for n in names]))

    def auc_blocks(only: list[int] | None = None) -> list[Block]:
        blocks = []
        for task, per_v in raw["auc_units"].items():
            vs = [k for k in per_v if only is None or k in only]
            for k in vs:
                vals = np.array([[raw["auc_values"][n][s][task][k] for s in range(n_seeds)] for n in names])
                w = per_v[k]["weight"] if only is None else 1.0 / (len([t for t, pv in raw["auc_units"].items()
                                                                        if any(v in only for v in pv)]) * len(vs))
                blocks.append(Block(vals, w))
        return blocks

    intended_res = paired_bootstrap([recall_block(latest)], **boot)
    unintended_blocks = auc_blocks()
    unintended_res = paired_bootstrap(unintended_blocks, **boot) if unintended_blocks else None
    ic = compare(intended_res, names, "nobc") if "nobc" in names else {}
    uc = compare(unintended_res, names, "fix-m0") if unintended_res is not None and "fix-m0" in names else {}
    ic_abs = compare(intended_res, names, names[0])
    uc_abs = compare(unintended_res, names, names[0]) if unintended_res is not None else {}

    retention = _legacy_retention(raw, names, boot)
    comparisons = _bc_aligner_differences(intended_res, unintended_res, names) if ic and uc else {}

    rows = []
    for j, n in enumerate(names):
        row: dict[str, Any] = {"strategy": n}
        row.update(_diff(ic, n, "intended_change"))
        row.update(_diff(uc, n, "unintended_change"))
        if ic and uc:
            tot = _rel_samples(intended_res, j, names.index("nobc")) + _rel_samples(unintended_res, j, names.index("fix-m0"))
            tot = tot[np.isfinite(tot)]
            lo, hi = np.quantile(tot, [0.025, 0.975]) if tot.size else (float("nan"), float("nan"))
            row.update(total=row["intended_change"] + row["unintended_change"], total_lo=float(lo), total_hi=float(hi))
        else:
            row.update(total=float("nan"), total_lo=float("nan"), total_hi=float("nan"))
        row.update(_ci(ic_abs, n, "recall"))
        row.update(_ci(uc_abs, n, "auc"))
        row["align_error"] = float(np.mean(raw["align"][n]))
        if retention:
            row.update(_ci(retention, n, "retention"))
        rows.append(row)

    per_version: dict[str, dict] = {n: {"recall": [], "recall_lo": [], "recall_hi": [], "intended_change": [],
                                        "intended_change_lo": [], "intended_change_hi": [], "auc": [],
                                        "unintended_change": [], "align_error": [],
                                        "selected_epoch": raw["selected_epoch"][n]} for n in names}
    for k in range(K):
        res_k = paired_bootstrap([recall_block(k)], **boot)
        abs_k = compare(res_k, names, names[0])
        rel_k = compare(res_k, names, "nobc") if "nobc" in names else {}
        blocks_k = auc_blocks([k])
        ures_k = paired_bootstrap(blocks_k, n_boot=1, seed=0) if blocks_k else None
        for j, n in enumerate(names):
            pv = per_version[n]
            pv["recall"].append(abs_k[n]["mean"])
            pv["recall_lo"].append(abs_k[n]["lo"])
            pv["recall_hi"].append(abs_k[n]["hi"])
            d = _diff(rel_k, n, "d")
            pv["intended_change"].append(d["d"] if rel_k else None)
            pv["intended_change_lo"].append(d["d_lo"] if rel_k else None)
            pv["intended_change_hi"].append(d["d_hi"] if rel_k else None)
            a_k = float(ures_k.point[j]) if ures_k is not None else None
            pv["auc"].append(a_k)
            ref_a = float(ures_k.point[names.index("fix-m0")]) if ures_k is not None and "fix-m0" in names else None
            pv["unintended_change"].append(_pct(a_k, ref_a) if a_k is not None and ref_a is not None else None)
            pv["align_error"].append(float(np.mean([a[k] for a in raw["align"][n]])))

    per_task = {}
    for t in tasks:
        per_task[t.name] = {}
        for n in names:
            a = np.concatenate([np.asarray(s[t.name]) for s in raw["auc"][n]], axis=0)  # (seeds*cseeds, K)
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                per_task[t.name][n] = {"auc_mean": np.nanmean(a, axis=0).tolist(), "auc_std": np.nanstd(a, axis=0).tolist(),
                                       "score": float(np.nanmean(a[:, t.score_versions]))}
    return {"rows": rows, "per_version": per_version, "per_task": per_task, "comparisons": comparisons}


def format_sweep(points: Sequence[dict]) -> str:
    """The lambda sweep as a table: test-half changes with CIs, retention, the selection-split total."""
    head = (f"{'strategy':<13} {'lambda':>7} {'intended % [95% CI]':>26} {'unintended % [95% CI]':>26} "
            f"{'legacy v0 ret. % [95% CI]':>26} {'sel. total':>10}")
    lines, nan = [head, "-" * len(head)], float("nan")
    for p in points:
        lines.append(f"{p['strategy']:<13} {p['lam']:>7g} "
                     f"{p['intended_change']:>+7.2f} [{p['intended_change_lo']:+.2f}, {p['intended_change_hi']:+.2f}]"
                     f"{'':>2} {p['unintended_change']:>+7.2f} [{p['unintended_change_lo']:+.2f}, "
                     f"{p['unintended_change_hi']:+.2f}]{'':>2} {p.get('retention', nan):>8.1f} [{p.get('retention_lo', nan):5.1f}, "
                     f"{p.get('retention_hi', nan):5.1f}]{'':>2} {p['selection_total']:>+10.2f}"
                     + ("  <- chosen on selection split" if p.get("chosen") else ""))
    return "\n".join(lines)
