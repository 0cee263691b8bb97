"""Smoke test of the benchmark suite at toy sizes (no timing assertions)."""

from __future__ import annotations

import importlib.util
import json

from bc_fast.bench.suite import SIZES, format_table, run_bench_suite

CONFIGS = {"peak", "latency_b1", "latency_b16", "affine_d128", "affine_d256", "affine_d768", "l2_fp16",
           "mlp_b256", "mlp_large", "mlp_gelu_b256", "mlp_gelu_large", "chain_k4", "threads_1to2", "concurrency"}


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
        # every kernel result is checked against a float64 reference (peak is numpy's; threads_1to2 reruns affine)
        if r["config"] in {"peak", "threads_1to2"}:
            assert r["max_abs_err"] is None
        else:
            assert r["max_abs_err"] < (2e-3 if r["config"] == "l2_fp16" else 1e-3), r["config"]
    data = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert data["table"] == res["table"] and data["machine"]["cpu_count"]
    assert data["sizes"]["name"] == "tiny"
    if importlib.util.find_spec("matplotlib") is None:  # the PNG is optional, and then said to be missing
        assert res["png"] is None and "no PNG" in text
    else:
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


# --------------------------------------------------------------------------- the one harness

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from bc_fast import FusedTransform  # noqa: E402
from bc_fast.bench.harness import (  # noqa: E402
    TINY_PLAN, Bench, Buffers, engines, machine_info, numpy_blas_threads, threadpools,
)
from bc_fast.bench.suite import affine_impls  # noqa: E402

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("bench_*.py"))


def _bench(eng, seed=0):
    return Bench(TINY_PLAN, eng, Buffers(np.random.default_rng(seed)), np.random.default_rng(seed + 1))


def test_threadpools_come_from_threadpoolctl_with_kernel_names():
    pools = threadpools()
    blas = [p for p in pools if p["user_api"] == "blas"]
    assert blas, pools
    for p in pools:
        assert set(p) == {"library", "user_api", "internal_api", "version", "num_threads", "core"}
        assert isinstance(p["num_threads"], int) and p["num_threads"] >= 1
    assert any(p["core"] for p in blas if p["internal_api"] == "openblas")
    info = machine_info()
    assert info["threadpools"] and all("threads, core=" in v for v in info["openblas"].values())


def test_engines_set_every_pool_and_restore_them():
    torch = pytest.importorskip("torch", reason="checks torch's thread count too")
    before = (numpy_blas_threads(), torch.get_num_threads())
    with engines(1) as eng:
        assert eng.threads == 1 and eng.numpy_blas_threads == 1
        assert numpy_blas_threads() == 1 and torch.get_num_threads() == 1
        assert torch.is_inference_mode_enabled()
    assert (numpy_blas_threads(), torch.get_num_threads()) == before


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_every_affine_baseline_writes_the_same_preallocated_output(dtype):
    """Fairness: each baseline computes the same thing into the caller's buffer (none allocates its own)."""
    names = ("bc_fast", "numpy_sgemm", "numpy_prealloc", "torch_addmm", "faiss")
    with engines(2) as eng:
        bench = _bench(eng)
        n, d_in, d_out = 37, 24, 11
        x = bench.rng.standard_normal((n, d_in), dtype=np.float32).astype(dtype)
        W, b = bench.weights(d_out, d_in)
        y = np.zeros((n, d_out), np.float32)
        impls = affine_impls(bench, FusedTransform.affine(W, b), x, y, W, b, names,
                             scratch=np.empty((n, d_in), np.float32))
        ref = x.astype(np.float64) @ W.T.astype(np.float64)
        missing = {"torch_addmm"} if eng.torch is None else set()
        missing |= {"faiss"} if eng.faiss is None else set()
        assert set(impls) == set(names) - missing
        for name in impls:
            y[...] = np.nan
            impls[name]()
            want = ref if name == "numpy_sgemm" else ref + b
            np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4, err_msg=name)


def test_fp16_input_needs_a_scratch_buffer():
    with engines(1) as eng:
        bench = _bench(eng)
        W, b = bench.weights(4, 3)
        x = np.zeros((2, 3), np.float16)
        with pytest.raises(ValueError, match="fp32 scratch buffer of shape"):
            affine_impls(bench, FusedTransform.affine(W, b), x, np.zeros((2, 4), np.float32), W, b, ("bc_fast",))


def _load_script(name):
    spec = importlib.util.spec_from_file_location(name[:-3], BENCH / name)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_fusion_step_by_step_baselines_match_the_fused_operator(tmp_path):
    fusion = _load_script("bench_fusion.py")
    from bc_fast.engine.fusion import apply_layers_reference

    with engines(1) as eng:
        bench = _bench(eng)
        for kind in ("affine", "mlp"):
            reg = fusion.make_registry(tmp_path / kind, kind, 3, 16, bench.rng)
            steps = [layer for step in reg.chain_layers(3, 0) for layer in step]
            x = bench.rng.standard_normal((9, 16), dtype=np.float32)
            ref = apply_layers_reference(steps, x)
            np.testing.assert_allclose(reg.operator(3, 0).apply(x), ref, rtol=1e-4, atol=1e-4)
            for name, fn in fusion.step_impls(bench, x, steps).items():
                fn()  # the last step's output is in buffer step{(len(steps) - 1) % 2}
                got = bench.buf.get(f"step{(len(steps) - 1) % 2}", ref.shape)
                np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4, err_msg=f"{kind} {name}")


@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_scripts_are_standalone_and_document_their_options(script):
    assert script in {"bench_core.py", "bench_fusion.py", "bench_index.py", "bench_convert.py", "bench_routed.py", "bench_suite.py",
                      "bench_gpu.py", "bench_distributed.py"}
    proc = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "--threads" in proc.stdout and "--quick" in proc.stdout


def _fused_sm90_gpu() -> bool:
    """A compute capability 9.0 GPU that torch and bc_fast's CUDA module (built with CUTLASS) both see."""
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("bc_fast._cuda") is None:
        return False
    import bc_fast._cuda as cu
    import torch

    info = cu.device_info()
    return bool(info["available"] and info["fused_sm90_kernels"] and torch.cuda.is_available()
                and torch.cuda.get_device_capability() == (9, 0))


def test_gpu_variant_scripts_refuse_unknown_variants_and_say_when_nothing_was_checked():
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, check=False)

    check = str(BENCH / "sm90_variant_check.py")
    bad = run(check, "pingpong/tma")
    assert bad.returncode == 2
    assert "STORE one of direct, staged, got 'pingpong/tma'" in bad.stderr
    bad = run(str(BENCH / "gpu_kernels.py"), "--variants", "cooperative/staged,fast/direct")
    assert bad.returncode == 2
    assert "unknown variant(s) fast/direct" in bad.stderr
    proc = run(check, "cooperative/staged")
    if _fused_sm90_gpu():
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "sm90 variant cooperative/staged: correct" in proc.stdout
    else:
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert proc.stdout.startswith("sm90_variant_check: nothing checked: ")


def test_no_second_timer_in_bench_scripts():
    """One harness: the bench/ scripts time through bc_fast.bench.harness, never with their own clock."""
    assert not (BENCH / "_common.py").exists()
    for script in SCRIPTS:
        text = (BENCH / script).read_text()
        assert "perf_counter" not in text and "statistics.median" not in text, script
