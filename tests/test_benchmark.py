"""Smoke test of the benchmark suite at toy sizes (no timing assertions)."""

from __future__ import annotations

import json

from bc_fast.benchmark import SIZES, format_table, run_bench_suite

CONFIGS = {"peak", "latency_b1", "latency_b16", "affine_d128", "affine_d256", "affine_d768", "l2_fp16",
           "mlp_b256", "mlp_large", "chain_k4", "threads_1to2"}


def test_suite_tiny_writes_json_table_and_png(tmp_path):
    lines: list[str] = []
    res = run_bench_suite(tmp_path / "out", log=lines.append, tiny=True, threads=2)
    assert {r["config"] for r in res["results"]} == CONFIGS
    assert res["mode"] == "tiny"
    text = "\n".join(lines)
    assert "| config |" in text and "mode=tiny" in text
    for r in res["results"]:
        assert r["status"] in {"PASS", "MISS", "SKIP", "INFO"}
        for impl in r["impls"].values():
            assert impl["median_s"] > 0
        # every kernel result is checked against a float64 reference
        if r.get("max_abs_err") is not None:
            assert r["max_abs_err"] < (2e-3 if r["config"] == "l2_fp16" else 1e-3), r["config"]
    data = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert data["table"] == res["table"] and data["machine"]["cpu_count"]
    assert data["sizes"]["name"] == "tiny"
    if res["png"] is not None:
        assert (tmp_path / "out" / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]


def test_quick_sizes_are_smaller_than_full():
    q, f = SIZES["quick"], SIZES["full"]
    assert all(q.affine_rows[d] < f.affine_rows[d] for d in f.affine_rows)
    assert "mode=quick" in q.describe()


def test_format_table_marks_misses():
    r = {"config": "x", "rows": 10, "bc_impl": "bc_fast", "status": "MISS", "note": "",
         "impls": {"bc_fast": {"median_s": 2e-6, "cpu_over_wall": 1.0}, "numpy": {"median_s": 1e-6}},
         "checks": [{"label": "vs numpy", "value": 0.5, "target": 1.0, "shown_target": "≥ 1x",
                     "shown_value": "0.50x numpy", "status": "MISS"}]}
    t = format_table([r])
    assert "MISS" in t and "2.00 µs" in t and "0.50x numpy" in t
