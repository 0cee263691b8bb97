"""SIMD kernel sets: choice and forcing (BC_FAST_SIMD, set_simd_level), tails and block independence."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import bc_fast
from bc_fast import FusedTransform, Layer, _core
from bc_fast.engine.fusion import apply_layers_reference

ALL_LEVELS = ("generic", "avx2", "avx512")
TESTS_DIR = Path(__file__).resolve().parent


LEVELS = _core.usable_simd_levels()


def expected_levels(cpu: str) -> list[str]:
    """The levels the CPU feature string says this x86 build can run."""
    flags = set(cpu.split())
    levels = ["generic"]
    if {"avx2", "fma", "f16c"} <= flags:
        levels.append("avx2")
        if {"avx512f", "avx512dq", "avx512bw", "avx512vl"} <= flags:
            levels.append("avx512")
    return levels


def kernel_in_subprocess(simd: str | None) -> str:
    """build_info()["kernel"] of a fresh process with BC_FAST_SIMD set to simd (unset if None)."""
    env = dict(os.environ)
    env.pop("BC_FAST_SIMD", None)
    if simd is not None:
        env["BC_FAST_SIMD"] = simd
    code = "import json, bc_fast; print(json.dumps(bc_fast.build_info()['kernel']))"
    # cwd=tests/ so the source tree does not shadow the installed package.
    res = subprocess.run([sys.executable, "-c", code], cwd=TESTS_DIR, env=env, capture_output=True, text=True,
                         timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_default_is_the_best_usable_level():
    if sys.platform.startswith("linux") and os.uname().machine in ("x86_64", "AMD64"):
        assert LEVELS == expected_levels(bc_fast.build_info()["cpu"])
    assert kernel_in_subprocess(None) == LEVELS[-1]


@pytest.mark.parametrize("simd", ALL_LEVELS)
def test_env_forces_each_level_or_falls_back_to_best(simd):
    assert kernel_in_subprocess(simd) == (simd if simd in LEVELS else LEVELS[-1])


@pytest.mark.parametrize("simd", ["sse9", "AVX2", ""])
def test_env_unknown_level_falls_back_to_best(simd):
    assert kernel_in_subprocess(simd) == LEVELS[-1]


def test_cpu_string_lists_avx512_subsets():
    cpu = set(bc_fast.build_info()["cpu"].split())
    if "avx512" in LEVELS:
        assert {"avx512f", "avx512dq", "avx512bw", "avx512vl"} <= cpu
    proc = Path("/proc/cpuinfo")
    if proc.exists() and " avx512_bf16" in proc.read_text():
        assert "avx512bf16" in cpu


def test_set_simd_level_errors_list_usable_levels():
    listed = ", ".join(LEVELS)
    with pytest.raises(ValueError, match=f"unknown SIMD level 'sse9'.*usable levels: {listed}"):
        _core.set_simd_level("sse9")
    unusable = [lv for lv in ALL_LEVELS if lv not in LEVELS]
    for lv in unusable:
        with pytest.raises(ValueError, match=f"SIMD level '{lv}' is not usable on this CPU or build; "
                                             f"usable levels: {listed}"):
            _core.set_simd_level(lv)


def rand(rng, *shape, scale=1.0, dtype=np.float32):
    return (rng.standard_normal(shape) * scale).astype(dtype)


# Widths around the 16-float vector and the 64-float panel, to exercise masked tails.
WIDTHS = [1, 2, 15, 16, 17, 31, 33, 63, 64, 65, 100, 129]


@pytest.mark.parametrize("d", WIDTHS)
@pytest.mark.parametrize("n", [1, 2, 3, 7, 13])
def test_tails_match_float64_reference(simd_level, d, n):
    rng = np.random.default_rng(1000 * d + n)
    # Hidden width d, partial GELU (act tail), fp16 in and out, normalized: every epilogue kernel.
    layers = [Layer(rand(rng, d, 19, scale=0.5), rand(rng, d), "gelu", activation_width=max(1, d - 3)),
              Layer(rand(rng, d + 1, d, scale=0.5), rand(rng, d + 1), "relu")]
    x = rand(rng, n, 19, dtype=np.float16)
    op = FusedTransform(layers, normalize=True)
    ref = apply_layers_reference(layers, x.astype(np.float64))
    ref = ref / np.maximum(np.linalg.norm(ref, axis=1, keepdims=True), 1e-12)
    y32 = op.apply(x, threads=1)
    np.testing.assert_allclose(y32, ref, rtol=0, atol=2e-5)
    y16 = op.apply(x, threads=1, out_dtype=np.float16)
    np.testing.assert_allclose(y16.astype(np.float64), ref, rtol=2.0**-11, atol=2e-5)


@pytest.mark.parametrize("d_in", [77, 200])
@pytest.mark.parametrize("d_out", [64, 100, 200, 256])
def test_row_result_does_not_depend_on_its_block(simd_level, d_out, d_in):
    # The packed kernel takes 1-2 rows over two panels at once and longer batches in 6-row blocks
    # (the AVX2 level also sums k in blocks of 64); each row must come out bit-identical either way
    # (what keeps thread counts bit-identical).
    rng = np.random.default_rng(d_out + d_in)
    w, b, x = rand(rng, d_out, d_in), rand(rng, d_out), rand(rng, 13, d_in)
    op = FusedTransform.affine(w, b)
    whole = op.apply(x, threads=1)
    for i in range(13):
        np.testing.assert_array_equal(op.apply(x[i:i + 1], threads=1), whole[i:i + 1])
    for i in range(0, 12, 2):
        np.testing.assert_array_equal(op.apply(x[i:i + 2], threads=1), whole[i:i + 2])


def test_levels_agree_closely():
    # Different levels sum in the same order for the packed kernel; they may differ only in the
    # epilogue's last bits (vector erf/exp, reduction order), never by more than a few ulps.
    rng = np.random.default_rng(5)
    layers = [Layer(rand(rng, 130, 40, scale=0.3), rand(rng, 130), "gelu"), Layer(rand(rng, 33, 130, scale=0.2))]
    op = FusedTransform(layers, normalize=True)
    x = rand(rng, 9, 40)
    before = bc_fast.build_info()["kernel"]
    try:
        outs = {}
        for lv in LEVELS:
            _core.set_simd_level(lv)
            outs[lv] = op.apply(x, threads=1)
    finally:
        _core.set_simd_level(before)
    for lv in LEVELS:
        np.testing.assert_allclose(outs[lv], outs["generic"], rtol=0, atol=1e-5)


def _skip_at_generic(simd_level: str) -> None:
    if simd_level == "generic":
        pytest.skip("the generic level runs batches of over 64 rows on BLAS, whose rows may depend on the batch")


def _assert_rows_have_single_row_bits(layers: list[Layer], x: np.ndarray) -> None:
    """The batch agrees with float64, and its first, middle and last rows equal those rows applied alone."""
    op = FusedTransform(layers)
    whole = op.apply(x, threads=2)
    np.testing.assert_allclose(whole, apply_layers_reference(layers, x.astype(np.float64)), rtol=0, atol=2e-5)
    n = len(x)
    for i in (0, n // 2, n - 1):
        np.testing.assert_array_equal(op.apply(x[i:i + 1], threads=1), whole[i:i + 1])


@pytest.mark.parametrize("n", [65, 200, 256])
def test_batches_of_up_to_256_rows_give_each_row_its_single_row_bits(simd_level, n):
    # At the avx2 and avx512 levels batches of up to 256 rows run on the packed kernel (above 64 rows at
    # avx2 since stop 35, in place of OpenBLAS), whose rows do not depend on the rows beside them.
    _skip_at_generic(simd_level)
    rng = np.random.default_rng(n)
    layers = [Layer(rand(rng, 300, 200, scale=0.1), rand(rng, 300), "relu"), Layer(rand(rng, 130, 300, scale=0.1))]
    _assert_rows_have_single_row_bits(layers, rand(rng, n, 200))


def test_large_batches_of_a_short_sum_give_each_row_its_single_row_bits(simd_level):
    # A layer over at most 128 inputs runs on the packed kernel at avx2 (and avx512) in batches of any size
    # (OpenBLAS before): its rows then have their single-row bits. The 300-input layer stays on OpenBLAS at avx2.
    _skip_at_generic(simd_level)
    rng = np.random.default_rng(5)
    short = [Layer(rand(rng, 200, 96, scale=0.1), rand(rng, 200))]
    x = rand(rng, 3001, 96)
    _assert_rows_have_single_row_bits(short, x)
    mixed = [Layer(rand(rng, 300, 96, scale=0.1), rand(rng, 300), "gelu"), Layer(rand(rng, 64, 300, scale=0.1))]
    np.testing.assert_allclose(FusedTransform(mixed).apply(x, threads=2),
                               apply_layers_reference(mixed, x.astype(np.float64)), rtol=0, atol=2e-5)
