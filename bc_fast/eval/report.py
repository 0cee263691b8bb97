"""Reports: the paper-style results table, JSON and PNG plots, all written atomically."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .._util.fileio import atomic_write_bytes

__all__ = ["format_table", "format_per_version", "write_json", "write_raw_json", "plot_degradation", "plot_per_version", "plot_pareto", "atomic_write_bytes"]


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        v = float(x)
        return v if math.isfinite(v) else None
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.bool_,)):
        return bool(x)
    if isinstance(x, Path):
        return str(x)
    return x


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON (numpy values converted, NaN -> null), atomically."""
    text = json.dumps(_jsonable(obj), indent=2, sort_keys=False, allow_nan=False)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(path, (text + "\n").encode())


def write_raw_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as compact JSON (floats to 6 significant digits, NaN -> null), atomically.

    For large per-user / per-example arrays; keys are strings, so integer keys come back as str.
    """
    text = json.dumps(_jsonable(_round(obj)), separators=(",", ":"), allow_nan=False)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(path, (text + "\n").encode())


def _round(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {k: _round(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_round(v) for v in x]
    if isinstance(x, np.ndarray):
        if np.issubdtype(x.dtype, np.floating):
            return [float(f"{v:.6g}") if math.isfinite(v) else None for v in x.ravel().tolist()] if x.ndim == 1 \
                else [_round(r) for r in x]
        return x.tolist()
    if isinstance(x, (float, np.floating)):
        v = float(x)
        return float(f"{v:.6g}") if math.isfinite(v) else None
    return x


def _fmt(v: float | None, spec: str) -> str:
    return "n/a" if v is None or not math.isfinite(v) else format(v, spec)


def _ci_cell(r: Mapping[str, Any], key: str, spec: str, sig: bool = False) -> str:
    v = r.get(key)
    lo, hi = r.get(f"{key}_lo"), r.get(f"{key}_hi")
    cell = _fmt(v, spec)
    if lo is not None and hi is not None and cell != "n/a" and math.isfinite(lo) and math.isfinite(hi):
        cell += f" [{format(lo, spec)}, {format(hi, spec)}]"
    if sig and r.get(f"{key}_significant"):
        cell += " *"
    return cell


def format_table(rows: Sequence[Mapping[str, Any]], *, recall_k: int = 50, seeds: int | None = None,
                 latest: int | None = None) -> str:
    """The paper's Table 3 form, one row per strategy, every number with its 95 % CI when present.

    Each row needs ``strategy``, ``intended_change`` (% Recall@K vs nobc), ``unintended_change``
    (% ROC-AUC vs fix-m0), ``total`` and ``align_error``; ``recall`` and ``auc`` are shown if
    present. ``<key>_lo`` / ``<key>_hi`` give the CI shown in brackets, ``<key>_significant``
    marks a change whose CI excludes 0 with ``*``.
    """
    cols = [("strategy", 15), ("intended % vs nobc", 27), ("unintended % vs fix-m0", 27), ("total %", 25),
            (f"Recall@{recall_k}", 25), ("AUC", 25), ("align err", 9)]
    retention = any(r.get("retention") is not None for r in rows)
    if retention:
        cols.append(("legacy v0 ret. %", 21))
    head = " ".join(f"{n:<{w}}" if i == 0 else f"{n:>{w}}" for i, (n, w) in enumerate(cols))
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = [r["strategy"], _ci_cell(r, "intended_change", "+.2f", True),
                 _ci_cell(r, "unintended_change", "+.2f", True), _ci_cell(r, "total", "+.2f"),
                 _ci_cell(r, "recall", ".4f"), _ci_cell(r, "auc", ".4f"), _fmt(r.get("align_error"), ".3f")]
        if retention:
            cells.append(_ci_cell(r, "retention", ".1f"))
        lines.append(" ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, (_, w)) in enumerate(zip(cells, cols))))
    if any(r.get("intended_change_lo") is not None for r in rows):
        where = f"latest version (v{latest})" if latest is not None else "latest version"
        n = f"{seeds} paired seed(s) x " if seeds else ""
        lines.append(f"intended: Recall@{recall_k} of the {where} on held-out test users; unintended: consumer "
                     f"ROC-AUC on test examples. Mean [95% CI], paired bootstrap over {n}test users/examples; "
                     "* = CI of the change excludes 0."
                     + (" legacy v0 ret.: Recall@K of the version-0 index served from the latest table "
                        "(through the chain) / of the true version-0 index, version-0 test users." if retention
                        else ""))
    return "\n".join(lines)


def format_per_version(per_version: Mapping[str, Mapping[str, Sequence[Any]]], *, recall_k: int = 50) -> str:
    """Intended change per version (% Recall@K vs nobc on the test users, [95 % CI]) next to the table."""
    names = list(per_version)
    if not names:
        return ""
    K = len(per_version[names[0]]["recall"])
    head = f"{'strategy':<15}" + "".join(f"{f'v{k} intended %':>24}" for k in range(1, K))
    lines = [f"per version (Recall@{recall_k} % vs nobc, test users):", head, "-" * len(head)]
    for n in names:
        d = per_version[n]
        cells = []
        for k in range(1, K):
            v, lo, hi = (d.get(key, [None] * K)[k] for key in ("intended_change", "intended_change_lo",
                                                                "intended_change_hi"))
            cells.append("n/a" if v is None or lo is None or hi is None or not math.isfinite(v)
                         else f"{v:+.1f} [{lo:+.1f}, {hi:+.1f}]")
        lines.append(f"{n:<15}" + "".join(f"{c:>24}" for c in cells))
    return "\n".join(lines)


def _save_fig(fig: Any, path: str | Path) -> Path:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(path, buf.getvalue())


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_degradation(path: str | Path, per_version: Mapping[str, Mapping[str, Sequence[float]]],
                     *, title: str = "") -> Path:
    """Two panels per version and strategy: intended Recall@50 % vs nobc, unintended AUC % vs fix-m0.

    ``per_version[strategy]`` holds lists ``intended_change`` and ``unintended_change`` (None = not scored).
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "intended_change", "intended Recall@50 change vs nobc (%)"),
                           (axes[1], "unintended_change", "unintended ROC-AUC change vs fix-m0 (%)")):
        for name, d in per_version.items():
            vals = np.array([np.nan if v is None else v for v in d[key]], dtype=float)
            ax.plot(np.arange(len(vals)), vals, "o-", label=name, lw=2.2 if name == "joint-mloss" else 1.2)
        ax.axhline(0.0, color="grey", lw=0.8)
        n_versions = max((len(d[key]) for d in per_version.values()), default=0)
        ax.set_xticks(range(n_versions))
        ax.set_xlabel("version k")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="lower left")
    if title:
        fig.suptitle(title)
    out = _save_fig(fig, path)
    plt.close(fig)
    return out


def plot_per_version(path: str | Path, per_task: Mapping[str, Mapping[str, Sequence[float]]],
                     recall: Mapping[str, Sequence[float]], align: Mapping[str, Sequence[float]]) -> Path:
    """Per-version figure: raw Recall@50, alignment error and each consumer task's ROC-AUC per strategy.

    ``per_task[task][strategy]`` is a list of AUC per version (None = not scored).
    """
    plt = _pyplot()
    panels = [("Recall@50 (intended)", recall), ("alignment error vs fix-m0", align)]
    panels += [(f"{t} ROC-AUC", d) for t, d in per_task.items()]
    n = len(panels)
    cols = 4
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, (title, data) in zip(axes.flat, panels):
        for name, vals in data.items():
            v = np.array([np.nan if x is None else x for x in vals], dtype=float)
            ax.plot(np.arange(len(v)), v, "o-", label=name, ms=3, lw=2.0 if name == "joint-mloss" else 1.0)
        ax.set_xticks(range(max((len(v) for v in data.values()), default=0)))
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("version k", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    out = _save_fig(fig, path)
    plt.close(fig)
    return out


def plot_pareto(path: str | Path, points: Sequence[Mapping[str, Any]], references: Sequence[Mapping[str, Any]] = (),
                *, title: str = "") -> Path:
    """Pareto front of a lambda sweep: unintended vs intended change (95 % CI bars), colour = legacy retention.

    ``points`` have ``strategy``, ``lam``, ``intended_change(_lo/_hi)``, ``unintended_change(_lo/_hi)``,
    ``retention`` and ``chosen``; ``references`` (rows of fixed strategies) are drawn as grey crosses.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    markers = "osD^v"
    sc = None
    ret = [float(p["retention"]) for p in points if p.get("retention") is not None and math.isfinite(p["retention"])]
    top = max([100.0, *ret])  # retention can exceed 100 %: keep those points apart in colour
    for si, name in enumerate(dict.fromkeys(p["strategy"] for p in points)):
        ps = sorted((p for p in points if p["strategy"] == name), key=lambda p: p["lam"])
        x = np.array([p["unintended_change"] for p in ps], dtype=float)
        y = np.array([p["intended_change"] for p in ps], dtype=float)
        xerr = np.array([[p["unintended_change"] - p["unintended_change_lo"] for p in ps],
                         [p["unintended_change_hi"] - p["unintended_change"] for p in ps]], dtype=float)
        yerr = np.array([[p["intended_change"] - p["intended_change_lo"] for p in ps],
                         [p["intended_change_hi"] - p["intended_change"] for p in ps]], dtype=float)
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="none", ecolor="lightgrey", lw=0.8, zorder=1)
        ax.plot(x, y, "-", color="grey", lw=0.8, zorder=2)
        sc = ax.scatter(x, y, c=[p.get("retention", float("nan")) for p in ps], cmap="viridis", vmin=50.0, vmax=top,
                        marker=markers[si % len(markers)], s=60, zorder=3, label=name, edgecolors="k")
        for p, xi, yi in zip(ps, x, y):
            ax.annotate(f"λ={p['lam']:g}" + (" (chosen)" if p.get("chosen") else ""), (xi, yi), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
    for r in references:
        ax.scatter([r["unintended_change"]], [r["intended_change"]], marker="x", color="grey", zorder=3)
        ax.annotate(r["strategy"], (r["unintended_change"], r["intended_change"]), fontsize=7, color="grey",
                    xytext=(4, -8), textcoords="offset points")
    ax.axhline(0.0, color="grey", lw=0.6)
    ax.axvline(0.0, color="grey", lw=0.6)
    ax.set_xlabel("unintended ROC-AUC change vs fix-m0 (%), test half")
    ax.set_ylabel("intended Recall@50 change vs nobc (%), latest version, test half")
    if sc is not None:
        fig.colorbar(sc, ax=ax, label="legacy retrieval retention % (v0 index from latest)")
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    out = _save_fig(fig, path)
    plt.close(fig)
    return out
