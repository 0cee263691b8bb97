"""Reporting for the benchmark harness: times, parseable log lines, the Markdown table, the chart.

What lives here: :func:`fmt_time`, :func:`kv_line` and :func:`log_result` (one ``key=value`` line per
implementation and check), :func:`format_table` (the Markdown table of every config),
:func:`chart_png` (every check's ratio against its target; matplotlib is looked up when asked for), and
:func:`run_status` / :func:`status_line` (whether a run's numbers are the whole planned set: a partial
run is labelled as partial, in its JSON and in its printed report).
They read the records :func:`bc_fast.bench.harness.result` builds; :mod:`bc_fast.bench.harness`
re-exports every name. It imports the standard library only.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["chart_png", "fmt_time", "format_table", "kv_line", "log_result", "run_status", "status_line"]


def fmt_time(s: float | None) -> str:
    """Seconds as µs / ms / s with 3-4 significant digits; ``-`` for None or NaN."""
    if s is None or math.isnan(s):
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.2f} µs" if s < 1e-5 else f"{s * 1e6:.1f} µs"
    if s < 1.0:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


def kv_line(**kv: Any) -> str:
    """One parseable line: ``key=value key=value ...`` (4 significant digits, no spaces in values)."""
    def f(v: Any) -> str:
        if v is None:
            return "na"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v).replace(" ", "_")
    return " ".join(f"{k}={f(v)}" for k, v in kv.items())


def log_result(log: Callable[[str], Any], r: dict) -> None:
    """One ``key=value`` line per implementation and per check, then error and note."""
    for k, v in r["impls"].items():
        log(kv_line(config=r["config"], impl=k, rows=r["rows"], median_us=v["median_s"] * 1e6,
                    min_us=v["min_s"] * 1e6, cpu_over_wall=v["cpu_over_wall"], gflops=v.get("gflops"),
                    samples=v["samples"], calls=v["calls_per_sample"]))
    for c in r["checks"]:
        log(kv_line(config=r["config"], check=c["label"], value=c["value"], target=c["target"], status=c["status"]))
    if r.get("max_abs_err") is not None:
        log(kv_line(config=r["config"], max_abs_err=r["max_abs_err"]))
    if r.get("note"):
        log(f"# {r['config']}: {r['note']}")


def format_table(results: list[dict]) -> str:
    """Markdown table: config | bc_fast median | baseline medians | ratios | target | status."""
    head = ["config", "rows", "bc_fast median (cpu/wall)", "baseline medians", "ratios", "target", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in results:
        bc = r["bc_impl"]
        if bc not in r["impls"]:  # a config skipped on this machine (e.g. bf16 without AVX512_BF16)
            lines.append("| " + " | ".join([r["config"], f"{r['rows']:,}", "-", "-", r.get("note") or "-", "-",
                                            r["status"]]) + " |")
            continue
        b = r["impls"][bc]
        bc_cell = f"{fmt_time(b['median_s'])} ({b['cpu_over_wall']:.2f})"
        if r["config"] == "peak":
            bc_cell = f"{fmt_time(b['median_s'])} = {b['gflops']:.1f} GFLOP/s ({b['cpu_over_wall']:.2f})"
        bases = "; ".join(f"{k} {fmt_time(v['median_s'])}" for k, v in r["impls"].items() if k != bc) or "-"
        ratios = "; ".join(c["shown_value"] for c in r["checks"]) or (r.get("note") or "-")
        info = [f"{k} {v['median_s'] / b['median_s']:.2f}x" for k, v in r["impls"].items() if k != bc
                and not any(c["shown_value"].endswith(" " + k) for c in r["checks"])]
        if info and r["checks"]:
            ratios += " (" + ", ".join(info) + ")"
        target = "; ".join(c["shown_target"] for c in r["checks"]) or "-"
        status = r["status"]
        if status == "MISS" and len(r["checks"]) > 1:
            status += f" ({sum(c['status'] == 'PASS' for c in r['checks'])}/{len(r['checks'])} pass)"
        lines.append("| " + " | ".join([r["config"], f"{r['rows']:,}", bc_cell, bases, ratios, target, status])
                     + " |")
    return "\n".join(lines)


def chart_png(results: list[dict], title: str) -> bytes | None:
    """Horizontal bars of every check's ratio with its target mark; None without matplotlib or checks."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    bars = [(f"{r['config']}: {c['label']}", c["value"], c["target"], c["status"])
            for r in results for c in r["checks"] if c["value"] is not None]
    if not bars:
        return None
    bars.reverse()
    fig = Figure(figsize=(9.5, 0.42 * len(bars) + 1.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    colors = {"PASS": "#2e7d32", "MISS": "#c62828"}
    ys = range(len(bars))
    ax.barh(list(ys), [v for _, v, _, _ in bars], left=0.0, color=[colors.get(s, "#777") for *_, s in bars], height=0.6)
    for i, (_, v, tgt, _) in enumerate(bars):
        ax.plot([tgt, tgt], [i - 0.42, i + 0.42], color="black", lw=2)
        ax.text(v, i, f" {v:.2f}", va="center", fontsize=8)
    ax.set_yticks(list(ys))
    ax.set_yticklabels([lab for lab, *_ in bars], fontsize=8)
    ax.axvline(1.0, color="#999", lw=0.8, ls="--")
    ax.set_xlabel("ratio (speed-up = baseline median / bc_fast median; or fraction of peak); black bar = target")
    ax.set_title(title, fontsize=9)
    hi = max(max(v for _, v, _, _ in bars), max(t for _, _, t, _ in bars))
    if hi > 4:  # a 10x fusion win would squash every other bar
        ax.set_xscale("log", base=2)
        lo = min(0.25, min(v for _, v, _, _ in bars) / 1.5)
        ax.set_xlim(lo, hi * 1.6)
        ticks = [2.0 ** k for k in range(math.floor(math.log2(lo)), math.ceil(math.log2(hi * 1.6)) + 1)]
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{v:g}" for v in ticks])
    else:
        ax.set_xlim(0, hi * 1.15)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=110)
    return out.getvalue()


def run_status(planned: Sequence[str], done: Sequence[str], failed: Sequence[str], *, finished: bool,
               known: Sequence[str] = ()) -> dict[str, Any]:
    """The fields a run's JSON carries to say whether its numbers are the whole planned set.

    ``planned``: the configs this run set out to run, in order; ``done`` / ``failed``: those that
    returned a record / raised; ``finished``: the run got past its last config; ``known``: every
    config the script has (those not planned were left out, e.g. by ``--only``). ``complete`` is
    true only once the run finished with every planned config done; ``partial`` whenever the
    numbers are not the whole set (not complete, or configs left out).
    """
    left_out = [k for k in known if k not in planned]
    complete = bool(finished and not failed and len(done) == len(planned))
    return {"planned": list(planned), "done": list(done), "failed": list(failed), "left_out": left_out,
            "complete": complete, "partial": not complete or bool(left_out)}


def status_line(status: dict[str, Any]) -> str:
    """One line of the printed report: ``complete``, or ``PARTIAL run`` and what is missing (:func:`run_status`)."""
    if not status["partial"]:
        return f"complete: all {len(status['planned'])} planned configs ran"
    parts = [f"PARTIAL run: {len(status['done'])} of {len(status['planned'])} planned configs ran"]
    if status["failed"]:
        parts.append(f"failed: {', '.join(status['failed'])}")
    if status["left_out"]:
        parts.append(f"left out (not selected): {', '.join(status['left_out'])}")
    not_run = [k for k in status["planned"] if k not in status["done"] and k not in status["failed"]]
    if not_run:
        parts.append(f"not run: {', '.join(not_run)}")
    return "; ".join(parts)
