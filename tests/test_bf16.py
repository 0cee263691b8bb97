"""precision="bf16": bf16 operands, fp32 accumulation, against float64 with a derived error bound."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from bf16_bound import U_BF16, U_F32, check_within_bound, rand_layers

import bc_fast
from bc_fast import FusedTransform, Layer
from bc_fast.engine.fusion import apply_layers_reference

_WHY = bc_fast._core.bf16_unavailable_reason()
needs_bf16 = pytest.mark.skipif(bool(_WHY), reason=f"precision='bf16' cannot run here: {_WHY}")


@pytest.fixture(autouse=True)
def _native_backend(monkeypatch):
    """These tests are about the core's own bf16 kernels (the oneDNN backend has tests/test_onednn.py):
    on a CPU with AMX, bf16_backend="auto" would pick oneDNN."""
    monkeypatch.setenv("BC_FAST_BF16_BACKEND", "native")

@needs_bf16
@pytest.mark.parametrize("n,d_in,d_out", [(1, 256, 256), (3, 77, 45), (17, 33, 100), (1000, 768, 768),
                                          (64, 31, 1), (65, 256, 96), (1000, 1, 7)])
@pytest.mark.parametrize("act", ["none", "relu", "gelu"])
def test_single_layer_within_bound(n: int, d_in: int, d_out: int, act: str) -> None:
    rng = np.random.default_rng(n * 1000 + d_in)
    layers = rand_layers(rng, [d_in, d_out], [act])
    op = FusedTransform(layers, precision="bf16")
    assert op.precision == "bf16" and "precision='bf16'" in repr(op)
    check_within_bound(op, layers, rng.standard_normal((n, d_in)).astype(np.float32))


@needs_bf16
@pytest.mark.parametrize("n", [1, 3, 17, 1000])
def test_bound_is_not_vacuous(n: int) -> None:
    """bf16 really differs from fp32 and the error is of the bf16 order, not something far smaller."""
    rng = np.random.default_rng(n)
    layers = rand_layers(rng, [200, 130], ["none"], bias=False)
    x = rng.standard_normal((n, 200)).astype(np.float32)
    y16 = FusedTransform(layers, precision="bf16").apply(x).astype(np.float64)
    ref = apply_layers_reference(layers, x)
    s = np.abs(x.astype(np.float64)) @ np.abs(layers[0].weight.astype(np.float64)).T
    rel = np.abs(y16 - ref) / s
    assert rel.max() <= 2 * U_BF16 + U_BF16**2 + 1.01 * 202 * U_F32
    assert rel.max() > 1e-5  # fp32 arithmetic alone would stay near 1e-7


@needs_bf16
@pytest.mark.parametrize("out_dtype", [np.float32, np.float16])
@pytest.mark.parametrize("normalize", [False, True])
def test_mlp_program_normalize_fp16(out_dtype, normalize: bool) -> None:
    rng = np.random.default_rng(7)
    layers = rand_layers(rng, [96, 200, 50, 64], ["gelu", "relu", "none"])
    op = FusedTransform(layers, normalize=normalize, precision="bf16")
    for n in (1, 3, 17, 1000):
        check_within_bound(op, layers, rng.standard_normal((n, 96)).astype(np.float32), out_dtype)


@needs_bf16
def test_residual_activation_width_and_fp16_input() -> None:
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((48, 40)) / 6).astype(np.float32)
    layers = [Layer(w, rng.standard_normal(48).astype(np.float32), "gelu", activation_width=20),
              Layer((rng.standard_normal((24, 48)) / 7).astype(np.float32), None)]
    op = FusedTransform(layers, precision="bf16")
    x16 = rng.standard_normal((33, 40)).astype(np.float16)
    check_within_bound(op, layers, x16)  # fp16 x is exact in fp32, then rounded to bf16 like fp32 x


@needs_bf16
@pytest.mark.parametrize("n", [1, 3, 64, 65, 1000, 4099])
def test_bit_identical_across_thread_counts(n: int) -> None:
    rng = np.random.default_rng(n)
    layers = rand_layers(rng, [130, 257, 96], ["gelu", "none"])
    op = FusedTransform(layers, normalize=True, precision="bf16")
    x = rng.standard_normal((n, 130)).astype(np.float32)
    one = op.apply(x, threads=1)
    assert np.array_equal(one, op.apply(x, threads=2))
    assert np.array_equal(one, op.apply(x, threads=3))
    assert np.array_equal(one[:1], op.apply(x[:1], threads=2))  # a row's result does not depend on its batch


@needs_bf16
def test_weights_are_rounded_once_to_nearest_even() -> None:
    """Exactly representable operands give exact results; a tie rounds to even, as documented."""
    w = np.array([[1.0, 2.0**-8 + 2.0**-9, 1 + 2.0**-8, 3.0]], np.float32)  # 1+2^-8 is a tie: -> 1.0
    x = np.array([[1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0]], np.float32)
    y = FusedTransform([Layer(w)], precision="bf16").apply(x)
    # 2^-8 + 2^-9 has 2 significant bits, exact in bf16; 1 + 2^-8 ties to 1.0 (even).
    assert y[0, 0] == np.float32(1.0 + 2.0**-8 + 2.0**-9 + 1.0)
    assert y[1, 0] == np.float32(1.0)
    assert np.array_equal(FusedTransform([Layer(w)]).apply(x)[1], [1 + 2.0**-8])  # fp32 keeps it


@needs_bf16
@pytest.mark.parametrize("act", ["none", "relu"])
def test_nan_and_inf_rows_as_fp32(act: str) -> None:
    """Where NaN/Inf appear matches the fp32 path (whose ReLU, max(y, 0), maps NaN to 0)."""
    rng = np.random.default_rng(5)
    layers = rand_layers(rng, [40, 70], [act])
    x = rng.standard_normal((5, 40)).astype(np.float32)
    x[1, 3] = np.nan
    x[3, 0] = np.inf
    y16 = FusedTransform(layers, precision="bf16").apply(x)
    y32 = FusedTransform(layers).apply(x)
    assert np.array_equal(np.isnan(y16), np.isnan(y32))
    assert np.array_equal(np.isinf(y16), np.isinf(y32))
    assert np.isfinite(y16[[0, 2, 4]]).all()
    if act == "none":
        assert np.isnan(y16[1]).all() and not np.isfinite(y16[3]).any()


@pytest.mark.parametrize("bad", ["bf32", "BF16", "", None, 16])
def test_bad_precision_lists_choices(bad) -> None:
    with pytest.raises(ValueError, match=r"precision must be one of \('fp32', 'bf16'\)"):
        FusedTransform([Layer(np.eye(3, dtype=np.float32))], precision=bad)


def test_default_is_fp32_and_build_info_reports_bf16() -> None:
    op = FusedTransform.affine(np.eye(3, dtype=np.float32))
    assert op.precision == "fp32" and "precision" not in repr(op)
    info = bc_fast.build_info()
    assert info["bf16"] is (not _WHY) and info["bf16_unavailable"] == _WHY
    assert (not _WHY) == ("avx512bf16" in info["cpu"].split() and info["kernel"] == "avx512")


_REFUSAL = """
import numpy as np, bc_fast
from bc_fast import FusedTransform, Layer
info = bc_fast.build_info()
assert info["kernel"] == "avx2" and info["bf16"] is False, info
try:
    FusedTransform([Layer(np.eye(4, dtype=np.float32))], precision="bf16")
except RuntimeError as e:
    print("REFUSED:", e)
print("FP32:", FusedTransform([Layer(np.eye(4, dtype=np.float32))]).apply(np.ones((2, 4), np.float32)).sum())
"""


@pytest.mark.skipif("avx2" not in bc_fast._core.usable_simd_levels(), reason="this CPU cannot run the avx2 level")
def test_refused_below_avx512_with_clear_error(tmp_path) -> None:
    env = {**os.environ, "BC_FAST_SIMD": "avx2"}
    res = subprocess.run([sys.executable, "-c", _REFUSAL], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert "REFUSED: precision='bf16' is not available: " in res.stdout
    assert "AVX512_BF16" in res.stdout and "use precision='fp32'" in res.stdout
    assert "FP32: 8.0" in res.stdout


@pytest.mark.skipif(not _WHY, reason="this CPU runs precision='bf16'; the refusal is tested with BC_FAST_SIMD=avx2")
def test_refused_on_this_cpu() -> None:
    with pytest.raises(RuntimeError, match=r"precision='bf16' is not available: .*use precision='fp32'"):
        FusedTransform([Layer(np.eye(4, dtype=np.float32))], precision="bf16")


@needs_bf16
def test_set_simd_level_below_avx512_refuses_new_bf16_ops() -> None:
    op = FusedTransform([Layer(np.eye(4, dtype=np.float32))], precision="bf16")
    before = bc_fast.build_info()["kernel"]
    bc_fast._core.set_simd_level("generic")
    try:
        with pytest.raises(RuntimeError, match="SIMD level is forced to 'generic'.*AVX512_BF16"):
            FusedTransform([Layer(np.eye(4, dtype=np.float32))], precision="bf16")
        # An operator built before keeps its bf16 kernels (the CPU has them); its epilogue follows the level.
        assert np.array_equal(op.apply(np.ones((2, 4), np.float32)), np.ones((2, 4), np.float32))
    finally:
        bc_fast._core.set_simd_level(before)


@needs_bf16
def test_registry_operator_passes_precision(tmp_path, make_chain_registry) -> None:
    reg = make_chain_registry(tmp_path / "reg", [24, 40, 56], [6.0, 7.0])
    op16 = reg.operator(2, 0, normalize=True, precision="bf16")
    op32 = reg.operator(2, 0, normalize=True)
    assert op16.precision == "bf16" and op32.precision == "fp32" and op16 is not op32
    assert reg.operator(2, 0, normalize=True, precision="bf16") is op16
    x = np.random.default_rng(0).standard_normal((9, 56)).astype(np.float32)
    check_within_bound(op16, list(op16.layers), x)
    with pytest.raises(ValueError, match="precision must be one of"):
        reg.operator(2, 0, precision="fp16")


@needs_bf16
def test_registry_refuses_a_bf16_operator_as_a_stored_step(tmp_path) -> None:
    # storing it kept only its weights: the registry's operator then ran fp32, silently other results
    from bc_fast.store import Registry

    reg = Registry.create(tmp_path / "reg")
    reg.add_version(dim=4)
    reg.add_version(dim=6)
    op = FusedTransform.affine(np.ones((4, 6), np.float32), precision="bf16")
    with pytest.raises(ValueError, match=r"precision='bf16'.*reg\.operator\(src, dst, precision='bf16'\)"):
        reg.add_transform(1, 0, op)
    reg.add_transform(1, 0, op.layers)  # the fix the message names
    x = np.random.default_rng(0).standard_normal((3, 6)).astype(np.float32)
    np.testing.assert_array_equal(reg.operator(1, 0, precision="bf16").apply(x), op.apply(x))


def test_bf16_bench_configs_tiny(tmp_path) -> None:
    """The suite's bf16 configs at toy sizes: every impl timed, the result checked, or a visible skip."""
    pytest.importorskip("threadpoolctl", reason="the benchmark harness needs threadpoolctl")
    from bc_fast.bench.suite import run_bf16_bench

    lines: list[str] = []
    res = run_bf16_bench(tmp_path / "out", tiny=True, threads=2, log=lines.append)
    assert [r["config"] for r in res["results"]] == ["bf16_d256", "bf16_d768", "bf16_mlp"]
    assert (tmp_path / "out" / "bench.json").is_file()
    for r in res["results"]:
        if _WHY:
            assert r["status"] == "SKIP" and _WHY in r["note"]
            continue
        assert r["bf16_backend"] == "native"  # the autouse fixture
        if r["config"] == "bf16_mlp":
            assert {c["label"] for c in r["checks"]} == {"vs torch bf16 eager"} and r["max_abs_err"] < 0.5
            continue
        assert {"bc_fast_bf16", "bc_fast_bf16_io", "bc_fast_fp32"} <= set(r["impls"])
        assert 1e-4 < r["max_abs_err"] < 0.1  # bf16-sized error on N(0,1) inputs, W ~ N(0, 1/d)
        assert {c["label"] for c in r["checks"]} == {"bf16 io vs torch bf16 addmm(out=)",
                                                    "fp32 io vs torch bf16 fp32 io", "vs bc_fast fp32"}
    assert "| bf16_d256 |" in "\n".join(lines) and "bf16 backend=native" in "\n".join(lines)


@pytest.mark.parametrize("cpu,vendor,available,verdict", [
    ("avx2 fma f16c avx512f avx512bf16", "AuthenticAMD", True, "faster"),
    ("avx2 avx512f avx512bf16 amx_tile amx_bf16", "GenuineIntel", True, "slower"),
    ("avx2 avx512f avx512bf16", "GenuineIntel", True, "unmeasured"),  # Cooper Lake: not measured
    ("avx2 fma f16c", "AuthenticAMD", False, "unavailable"),
])
def test_bf16_speed_verdict_by_cpu_family(cpu, vendor, available, verdict):
    from bc_fast.engine.runtime import bf16_speed

    got, why = bf16_speed(cpu, vendor, available)
    assert got == verdict and (why == "") == (verdict == "unavailable")
    if verdict == "slower":
        assert "precision='fp32'" in why


def test_build_info_says_whether_bf16_is_faster_here():
    info = bc_fast.build_info()
    assert isinstance(info["cpu_vendor"], str) and isinstance(info["bf16_vs_fp32_why"], str)
    assert info["bf16_vs_fp32"] in ("faster", "slower", "unmeasured", "unavailable")
    assert (info["bf16_vs_fp32"] == "unavailable") == (not info["bf16"])


def test_bf16_on_a_cpu_where_it_is_slower_warns(monkeypatch):
    from bc_fast.engine import operator

    monkeypatch.setattr(operator, "bf16_speed", lambda cpu, vendor, available: ("slower", "measured slower here"))
    if not bc_fast.build_info()["bf16"]:
        pytest.skip(f"precision='bf16' cannot run here: {bc_fast.build_info()['bf16_unavailable']}")
    with pytest.warns(RuntimeWarning, match="precision='bf16' is slower than 'fp32' on this CPU: measured slower"):
        FusedTransform.affine(np.eye(4, dtype=np.float32), precision="bf16")
