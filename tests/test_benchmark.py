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
    assert data["complete"] is True and data["partial"] is False and not data["failed"]
    assert data["planned"] == [r["planned_as"] for r in data["results"]] and len(data["planned"]) == len(CONFIGS)
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
from bc_fast.bench import harness
from bc_fast.bench.harness import (  # noqa: E402
    TINY_PLAN, Bench, Buffers, check, config_labels, engines, machine_info, numpy_blas_threads, result, run_configs,
    threadpools, time_rounds, timing_from_samples,
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


# --------------------------------------------------------------------------- fair baselines (no timing assertions)


def _timings(**medians: float) -> dict:
    """Synthetic timings: name -> median seconds (for checks that pick a baseline)."""
    return {k: timing_from_samples([v], v) for k, v in medians.items()}


def test_latency_b1_counts_the_best_numpy_not_only_the_allocating_one():
    from bc_fast.bench.suite import _cfg_latency

    with engines(1) as eng:
        r = _cfg_latency(_bench(eng), SIZES["tiny"], 1)
    assert {"numpy_alloc", "numpy_prealloc"} <= set(r["impls"])
    best = min(("numpy_alloc", "numpy_prealloc"), key=lambda k: r["impls"][k]["median_s"])
    (vs_numpy,) = [c for c in r["checks"] if c["label"] == "vs best numpy"]
    assert vs_numpy["shown_value"].endswith(f"x {best}") and vs_numpy["target"] == 1.8


def test_bench_core_batch1_counts_the_best_numpy_with_bias():
    core = _load_script("bench_core.py")
    with engines(1) as eng:
        r = core.cfg_core(_bench(eng), 256, 256, 1)
    labels = [c["label"] for c in r["checks"]]
    assert "vs numpy_alloc" not in labels and "vs best numpy" in labels
    best = min(core.NUMPY_BIASED, key=lambda k: r["impls"][k]["median_s"])  # numpy_sgemm leaves the bias out
    (vs_numpy,) = [c for c in r["checks"] if c["label"] == "vs best numpy"]
    assert vs_numpy["shown_value"].endswith(f"x {best}")


def test_bf16_mlp_torch_baselines_do_the_same_work_and_the_best_counts():
    torch = pytest.importorskip("torch", reason="the bf16 MLP's baselines are torch's")
    import torch.nn.functional as F

    from bc_fast._util.arrays import bfloat16
    from bc_fast.bench import suite_bf16

    layers = suite_bf16._mlp_layers()
    rng = np.random.default_rng(0)
    x16 = rng.standard_normal((5, 256), dtype=np.float32).astype(bfloat16())
    y16 = np.zeros((5, 256), bfloat16())
    h16 = np.zeros((5, suite_bf16.MLP_HIDDEN), bfloat16())
    fns = suite_bf16._mlp_torch(torch, F, layers, x16, y16, h16)
    assert set(fns) == {"torch_bf16_eager", "torch_bf16_prealloc"}
    want = fns["torch_bf16_eager"]().float().numpy()
    assert fns["torch_bf16_prealloc"]() is None  # writes into the preallocated output
    np.testing.assert_allclose(y16.astype(np.float32), want, rtol=2e-2, atol=2e-2)
    for fast in ("torch_bf16_eager", "torch_bf16_prealloc"):
        slow = ({"torch_bf16_eager", "torch_bf16_prealloc"} - {fast}).pop()
        (c,) = suite_bf16._mlp_checks(_timings(bc_fast_bf16=1.0, **{fast: 2.0, slow: 3.0}))
        assert c["label"] == "vs torch bf16 eager" and c["shown_value"] == f"2.00x {fast}"


def test_convert_naive_worker_holds_numpy_blas_to_the_thread_count(tmp_path):
    conv = _load_script("bench_convert.py")
    registry, table = conv._make_inputs(tmp_path, "npy", "float16", "affine", 3000, np.random.default_rng(0))
    before = numpy_blas_threads()
    res = conv._worker("naive", registry, table, str(tmp_path / "out.npy"), 1)
    assert res["blas_threads"] == 1 and numpy_blas_threads() == before  # limited inside, restored after
    assert np.load(tmp_path / "out.npy").shape == (3000, 256)
    assert conv._worker("read", registry, table, str(tmp_path / "out.npy"), 1)["blas_threads"] is None


def test_distributed_methods_share_one_thread_total():
    dist = _load_script("bench_distributed.py")
    assert dist.default_methods(2) == ["single", "ray_2x1", "ray_1x2"]
    assert dist.default_methods(4) == ["single", "ray_4x1", "ray_1x4"]
    assert dist.default_methods(1) == ["single", "ray_1x1"]
    assert dist.ray_shape("ray_2x2", 4) == (2, 2)
    with pytest.raises(ValueError, match="ray_2x1 runs 2 threads in all but --threads is 4"):
        dist.ray_shape("ray_2x1", 4)
    with pytest.raises(ValueError, match="unknown method 'ray_two'"):
        dist.check_methods(["single", "ray_two"], 2)
    with pytest.raises(SystemExit, match="every method gets the same total"):
        dist.main(["--threads", "4", "--methods", "single,ray_2x1"])  # refused before any data is made


def test_distributed_compute_rate_is_the_median(monkeypatch):
    dist = _load_script("bench_distributed.py")
    walls = iter([5.0, 1.0, 3.0, 2.0, 4.0])

    class FakeStopwatch:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.wall = self.cpu = next(walls)

    monkeypatch.setattr(dist, "Stopwatch", FakeStopwatch)
    r = dist._compute_rate(8, reps=5, rows=30)
    assert r["rows_per_s_per_core"] == 30 / 3.0 and r["samples"] == 5  # the median, not the best (1.0)


# --------------------------------------------------------------------------- runs: outputs, partial runs


def _ok(bench):
    return result("ok", "a config that works", 1, _timings(bc_fast=1e-3, base=2e-3),
                  [check("vs base", 2.0, 1.0, "≥ 1x", "2.00x base")])


def _boom(bench, n, path):
    data = json.loads(path.read_text())  # the JSON so far: rewritten after the first config, not complete
    assert data["planned"] == ["ok", "boom(7)"] and data["complete"] is False and len(data["results"]) == 1
    raise ValueError("config broke")


def test_run_configs_refuses_an_out_path_that_is_a_file_before_running(tmp_path):
    ran = []
    (tmp_path / "taken").write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="is an existing file, not a folder"):
        run_configs("t", [(lambda bench: ran.append(1), ())], threads=1, plan=TINY_PLAN, log=lambda _: None,
                    out_dir=tmp_path / "taken")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_configs("t", [(lambda bench: ran.append(1), ())], threads=1, plan=TINY_PLAN, log=lambda _: None,
                    json_path=tmp_path / "missing" / "b.json")
    assert ran == [] and (tmp_path / "taken").read_text() == "not a folder"


def test_run_configs_records_a_failing_config_and_writes_json_before_the_chart(tmp_path, monkeypatch):
    def broken_chart(*args):
        raise RuntimeError("matplotlib broke")

    monkeypatch.setattr(harness, "chart_png", broken_chart)
    lines: list[str] = []
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match=r"1 of 2 configs failed \(boom\(7\)\)"):
        run_configs("t", [(_ok, ()), (_boom, (7, out / "bench.json"))], threads=1, plan=TINY_PLAN,
                    log=lines.append, out_dir=out)
    data = json.loads((out / "bench.json").read_text())
    assert data["planned"] == ["ok", "boom(7)"] and data["done"] == ["ok"] and data["failed"] == ["boom(7)"]
    assert data["complete"] is False and data["partial"] is True
    ok, boom = data["results"]
    assert ok["status"] == "PASS" and boom["status"] == "ERROR" and boom["error"] == "ValueError: config broke"
    assert "config broke" in boom["traceback"] and data["png"] is None and not (out / "bench.png").exists()
    text = "\n".join(lines)
    assert "| boom(7) |" in text and "PARTIAL run: 1 of 2 planned configs ran; failed: boom(7)" in text
    assert "no PNG: the chart failed: RuntimeError: matplotlib broke" in text


def test_config_labels_name_each_planned_config_once():
    def cfg_table(bench, *args):
        pass

    def _cfg_mlp(bench, *args):
        pass

    assert config_labels([(cfg_table, ("npy_f16", 20_000, None)), (_cfg_mlp, (object(), 256)),
                          (_cfg_mlp, (object(), 256))]) == ["table('npy_f16', 20000)", "mlp(256)", "mlp(256) #2"]


# --------------------------------------------------------------------------- GPU scripts, on fakes


def test_time_rounds_warms_each_up_then_rotates_the_order():
    calls: list[str] = []

    def timed(name: str):
        def run() -> float:
            calls.append(name)
            return float(len(calls))
        return run

    runs = time_rounds({k: timed(k) for k in "abc"}, 3)
    assert calls == list("abc" "abc" "bca" "cab")  # one untimed warm-up each, then rotated rounds
    assert runs == {"a": [4.0, 9.0, 11.0], "b": [5.0, 7.0, 12.0], "c": [6.0, 8.0, 10.0]}


def test_gpu_convert_bench_rounds_and_cpu_rows_on_the_fake_cuda(tmp_path, monkeypatch):
    from test_convert_gpu import FakeCuda

    from bc_fast.engine import device

    fake = FakeCuda()
    monkeypatch.setattr(device, "_cuda_module", lambda: fake)
    gpu = _load_script("bench_gpu.py")
    monkeypatch.setattr(gpu, "CONVERT", {"convert_host": (16, 0, (3000, 3000), (1000, 1000))})
    r = gpu.bench_convert("convert_host", 2, True, tmp_path, 1)  # --quick's samples // 2 would be 1 round
    assert r["rounds"] == 3 and r["cpu_rows"] == 1000
    assert fake.executed.count("compute") >= 4  # device="cuda" went through the fake module: warm-up + 3 rounds
    assert set(r["median_s"]) == {"bc_fast", "read", "write", "cpu_path"}
    storage, cpu = r["checks"]
    assert cpu["status"] == "INFO" and storage["label"] == "vs storage bound"  # light compute: storage counts
    assert cpu["shown_value"].endswith("on 1,000 rows)") and "scaled from 1,000 rows" in r["note"]
    assert "loadavg1" in r and not list(tmp_path.iterdir())  # the work folder is removed


def _fake_torch(**props):
    import types

    cuda = types.SimpleNamespace(get_device_properties=lambda i: types.SimpleNamespace(**props),
                                 empty_cache=lambda: None, is_available=lambda: True)
    return types.SimpleNamespace(__version__="0.fake", version=types.SimpleNamespace(cuda="13.0"), cuda=cuda,
                                 backends=types.SimpleNamespace(cuda=types.SimpleNamespace(
                                     matmul=types.SimpleNamespace(allow_tf32=True))))


def test_bench_gpu_report_and_json_carry_the_machine_and_say_partial(tmp_path, monkeypatch, capsys):
    gpu = _load_script("bench_gpu.py")
    torch = _fake_torch(name="Fake GPU", total_memory=1 << 30, major=9, minor=0)
    mod = type("Mod", (), {"device_info": lambda self: {"driver_version": 1, "runtime_version": 2}})()
    monkeypatch.setattr(gpu, "_setup", lambda: (torch, None, mod))
    monkeypatch.setattr(gpu, "bench_copy_bandwidth", lambda torch, samples: 1e12)
    skipped = gpu._record("index_search", 0, {"bc_fast": float("nan")}, [check("GPU index", None, 1, "-", "-")], None)
    monkeypatch.setattr(gpu, "bench_index_search", lambda samples, quick: skipped)
    written = []
    real = gpu.atomic_write_json
    monkeypatch.setattr(gpu, "atomic_write_json",
                        lambda path, obj: written.append((obj["complete"], len(obj["results"]))) or real(path, obj))
    path = tmp_path / "gpu.json"
    assert gpu.main(["--quick", "--only", "index_search", "--json", str(path)]) == 0
    assert written == [(False, 0), (False, 1), (True, 1)]  # atomically: at the start, after the config, at the end
    data = json.loads(path.read_text())
    assert data["machine"]["cpu_model"] and data["machine"]["loadavg"] and data["rounds"] == 3
    assert data["planned"] == ["index_search"] and data["left_out"] == ["convert_host", "convert_mlp"]
    assert data["complete"] is True and data["partial"] is True  # --only: the planned ran, the rest left out
    out = capsys.readouterr().out
    assert f"host {data['machine']['cpu_model']}, loadavg" in out and "\n# machine: " in out
    assert "PARTIAL run: 1 of 1 planned configs ran; left out (not selected): convert_host, convert_mlp" in out

    monkeypatch.setattr(gpu, "bench_index_search", lambda samples, quick: 1 / 0)
    assert gpu.main(["--quick", "--only", "index_search", "--json", str(path)]) == 1  # the failing config
    data = json.loads(path.read_text())
    assert data["failed"] == ["index_search"] and data["complete"] is False and data["partial"] is True
    assert data["results"][0]["error"] == "ZeroDivisionError: division by zero"
    assert "PARTIAL run: 0 of 1 planned configs ran; failed: index_search" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        gpu.main(["--only", "convert_hots"])  # refused by name


def test_gpu_kernels_json_names_the_plan_and_records_a_failing_config(tmp_path, monkeypatch, capsys):
    kern = _load_script("gpu_kernels.py")
    monkeypatch.setattr(kern, "_setup", lambda: _fake_torch(name="Fake GPU", multi_processor_count=132))
    monkeypatch.setattr(kern, "_copy_bandwidth", lambda torch, samples: 1e12)

    def run_config(torch, name, rows, *args):
        if name == "chain4":
            raise RuntimeError("kernel fault")
        return {"config": name, "rows": rows, "dtype": "float32", "median_s": {"bc_fast": 1e-5, "torch eager": 2e-5},
                "best_baseline": "torch eager", "speedup": 2.0, "bytes": 2048, "max_row_err": 0.0,
                "eager_max_row_err": 0.0, "notes": [], "paths": ["cublaslt"], "sm90_variants": {}}

    monkeypatch.setattr(kern, "run_config", run_config)
    rc = kern.main(["--quick", "--only", "batch1,chain4", "--json", str(tmp_path / "k.json"), "--no-profile"])
    assert rc == 1
    data = json.loads((tmp_path / "k.json").read_text())
    assert data["planned"] == ["batch1", "chain4"] and data["done"] == ["batch1"]
    assert data["errors"] == [{"config": "chain4", "error": "RuntimeError: kernel fault",
                               "loadavg1": data["errors"][0]["loadavg1"]}]
    assert data["complete"] is False and data["partial"] is True and "l2_256" in data["left_out"]
    assert data["machine"]["cpu_model"] and data["machine"]["loadavg"]
    out = capsys.readouterr().out
    assert "# 1/1 kernel targets met; PARTIAL run: 1 of 2 planned configs ran; failed: chain4" in out
    assert "\n# machine: " in out
