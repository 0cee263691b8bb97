"""The text demo's report: the fixed-width table (global kinds, local vs global, chain) and the PNG.

Split from :mod:`.text_demo` (which runs the protocol and calls these) to keep each module small.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["format_text_table"]


def _f(v: Any, spec: str) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, spec)


def format_text_table(results: Mapping[str, Any]) -> str:
    """The results as a fixed-width table: one row per pair, fraction and kind, then chain and forward rows."""
    head = (f"{'pair':<24} {'fit %':>5} {'n_fit':>6} {'kind':<10} {'R@10':>6} {'retent.':>7} {'vs old':>6} "
            f"{'ovl old':>7} {'nbr ovl':>7} {'lbl P':>6} {'lbl ret':>7} {'acc':>6} {'acc ret':>7} {'fit s':>7} "
            f"{'µs/q':>6} {'bf16 R@10':>9} {'µs/q':>6}")
    lines = [head, "-" * len(head)]

    def add(label: str, r: Mapping[str, Any]) -> None:
        if "error" in r:
            lines.append(f"{label:<24} {100 * r['fraction']:>5.0f} {r['n_fit']:>6} {r['kind']:<10} not fitted: "
                         f"{r['error'][:60]}")
            return
        lines.append(f"{label:<24} {100 * r['fraction']:>5.0f} {r['n_fit']:>6} {r['kind']:<10} "
                     f"{_f(r.get('recall'), '.3f'):>6} {_f(r.get('retention'), '.3f'):>7} {_f(r.get('vs_old'), '.2f'):>6} "
                     f"{_f(r.get('overlap_old'), '.3f'):>7} {_f(r.get('neighbour_overlap'), '.3f'):>7} "
                     f"{_f(r.get('label_p'), '.3f'):>6} {_f(r.get('label_retention'), '.3f'):>7} {_f(r.get('acc'), '.3f'):>6} "
                     f"{_f(r.get('acc_retention'), '.3f'):>7} {_f(r.get('fit_s'), '.3f'):>7} "
                     f"{_f(r.get('latency_us'), '.1f'):>6} {_f(r.get('recall_bf16'), '.3f'):>9} "
                     f"{_f(r.get('latency_bf16_us'), '.1f'):>6}")

    for name, p in results["pairs"].items():
        b = p["baseline"]
        lines.append(f"[{name}] {p['old']} -> legacy index, queries from {p['new']}: full re-embed R@10 "
                     f"{b['recall_full']:.3f}, old queries R@10 {b['recall_old']:.3f}"
                     + (f", unadapted {b['recall_unadapted']:.3f}" if "recall_unadapted" in b else "")
                     + f"; label P@10 full {b['label_p_full']:.3f}, old {b['label_p_old']:.3f}"
                     + f"; acc old {b['acc_old']:.3f}, retrained {b['acc_new_retrained']:.3f}, "
                       f"majority {b['acc_majority']:.3f}")
        for r in p["backward"]:
            add(f"{name} backward", r)
        for r in p.get("forward", []):
            add(f"{name} forward (old->new)", r)
    cmp = [(name, c) for name, p in results["pairs"].items() for c in p.get("local_vs_global", [])]
    if cmp:
        lines.append("")
        lines.append("local vs the best global kind (label P@10 on the queries; diff = local - global, 95 % paired "
                     "bootstrap CI over queries)")
        h2 = (f"{'pair':<6} {'fit %':>5} {'global':<10} {'lblP glob':>9} {'lblP loc':>8} {'diff [95 % CI]':>26} "
              f"{'ret loc':>7} {'ovl old g/l':>11} {'nbr ovl g/l':>11} {'fit s g/l':>11} {'µs/q g/l':>11}  local k,m,base")
        lines.append(h2)
        lines.append("-" * len(h2))
        for name, c in cmp:
            g, loc, st = c["global"], c["local"], c["local_settings"]
            ci = f"{c['label_p_diff']:+.3f} [{c['label_p_diff_ci95'][0]:+.3f}, {c['label_p_diff_ci95'][1]:+.3f}]"
            lines.append(f"{name:<6} {100 * c['fraction']:>5.0f} {c['best_global']:<10} {g['label_p']:>9.3f} "
                         f"{loc['label_p']:>8.3f} {ci + (' *' if c['significant'] else '  '):>26} "
                         f"{_f(loc['label_retention'], '.3f'):>7} "
                         f"{_f(g['overlap_old'], '.3f')}/{_f(loc['overlap_old'], '.3f'):<5} "
                         f"{_f(g['neighbour_overlap'], '.3f')}/{_f(loc['neighbour_overlap'], '.3f'):<5} "
                         f"{_f(g['fit_s'], '.2f')}/{_f(loc['fit_s'], '.2f'):<6} "
                         f"{_f(g['latency_us'], '.1f')}/{_f(loc['latency_us'], '.1f'):<6} "
                         f" {st.get('k')},{st.get('m')},{st.get('base')}")
    ch = results.get("chain")
    if ch:
        lines.append(f"[chain] {' <- '.join(ch['models'])}: fused operator(2, 0) into the {ch['models'][0]} index")
        for r in ch["rows"]:
            add("chain v2->v0", r)
    return "\n".join(lines)


def _plot(path: Path, results: Mapping[str, Any]) -> Path | None:
    try:
        from ..eval.report import _pyplot, _save_fig

        plt = _pyplot()
    except ImportError:
        return None
    pairs = list(results["pairs"].items())
    panels = (("retention", "Recall@10 retention vs full re-embed"),
              ("label_retention", "label precision@10 retention vs full re-embed"),
              ("acc_retention", "classifier accuracy retention"))
    fig, axes = plt.subplots(len(panels), len(pairs), figsize=(5.5 * len(pairs), 3.4 * len(panels)), squeeze=False)
    colours = {kind: f"C{i}" for i, kind in enumerate(dict.fromkeys(
        r["kind"] for p in results["pairs"].values() for r in p["backward"]))}
    fracs = sorted({100 * r["fraction"] for p in results["pairs"].values() for r in p["backward"]})
    for j, (name, p) in enumerate(pairs):
        for i, (key, label) in enumerate(panels):
            ax = axes[i, j]
            for kind in colours:
                rs = [r for r in p["backward"] if r["kind"] == kind and key in r]
                ax.plot([100 * r["fraction"] for r in rs], [r[key] for r in rs], "o-", color=colours[kind], label=kind)
            fw = [r for r in p.get("forward", []) if key in r]
            if fw:
                ax.plot([100 * r["fraction"] for r in fw], [r[key] for r in fw], "*", ms=10, color="k",
                        label="forward: old queries -> new index")
            ch = results.get("chain")
            if ch and (p["old"], p["new"]) == (ch["models"][0], ch["models"][-1]):
                for kind in colours:
                    rs = [r for r in ch["rows"] if r["kind"] == kind and key in r]
                    ax.plot([100 * r["fraction"] for r in rs], [r[key] for r in rs], "x--", color=colours[kind],
                            label=f"chain {kind}")
            ref = {"retention": ("recall_old", "recall_full"), "label_retention": ("label_p_old", "label_p_full")}
            if key in ref and p["baseline"][ref[key][1]] > 0:
                ax.axhline(p["baseline"][ref[key][0]] / p["baseline"][ref[key][1]], color="grey", ls=":",
                           label="old model's own queries")
            ax.set_xscale("log")
            ax.set_xticks(fracs, [f"{v:g}" for v in fracs])
            ax.minorticks_off()
            ax.set_xlabel("fitting pairs (% of corpus)")
            ax.set_title(f"{name}: {p['new']} -> {p['old']}\n{label}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    out = _save_fig(fig, path)
    plt.close(fig)
    return out
