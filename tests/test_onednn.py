"""bf16_backend="onednn": oneDNN's matmul as the bf16 GEMM, against float64 with the documented bound.

Runs wherever the optional oneDNN wheel is installed (``pip install "bc-fast[onednn]"``): on CPUs without
AMX oneDNN takes its AVX512-BF16 or AVX-512 path, so the glue (layouts, padding, epilogues, threads) is
tested everywhere; the AMX-only checks skip elsewhere, naming the missing feature.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from bf16_bound import check_within_bound, rand_layers

import bc_fast
from bc_fast import FusedTransform, Layer
from bc_fast._util.arrays import bfloat16
from bc_fast.engine import onednn

_WHY = onednn.onednn_bf16_unavailable()
needs_onednn = pytest.mark.skipif(bool(_WHY), reason=f"oneDNN cannot run bf16 matmuls here: {_WHY}")
_AMX = onednn.has_amx_bf16()
needs_amx = pytest.mark.skipif(not _AMX, reason="this CPU has no amx_bf16 (AMX tile units): the AMX path cannot run")


def run_python(code: str, tmp_path, **env: str) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter (oneDNN loads once per process), with extra environment variables."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=False, cwd=tmp_path, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=180)


def onednn_for_every_batch(layers: list[Layer], normalize: bool = False) -> FusedTransform:
    """A oneDNN operator whose small batches also run on oneDNN (by default they take the native kernels)."""
    op = FusedTransform(layers, normalize=normalize, precision="bf16", bf16_backend="onednn")
    op._op = bc_fast._core.FusedOp([l.weight for l in layers], [l.bias for l in layers],
                                   [l.activation for l in layers],
                                   [l.d_out if l.activation_width is None else l.activation_width for l in layers],
                                   normalize, "bf16", "onednn", 1)
    return op


@needs_onednn
@pytest.mark.parametrize("n,d_in,d_out", [(1, 256, 256), (3, 77, 45), (17, 33, 100), (1000, 768, 768),
                                          (64, 31, 1), (65, 256, 96), (1000, 1, 7), (5003, 128, 130)])
@pytest.mark.parametrize("act", ["none", "relu", "gelu"])
def test_single_layer_within_bound(n: int, d_in: int, d_out: int, act: str) -> None:
    rng = np.random.default_rng(n * 1000 + d_in)
    layers = rand_layers(rng, [d_in, d_out], [act])
    op = FusedTransform(layers, precision="bf16", bf16_backend="onednn")
    assert op.bf16_backend == "onednn" and op.precision == "bf16"
    assert "bf16_backend='onednn'" in repr(op) and op._op.bf16_impl
    check_within_bound(op, layers, rng.standard_normal((n, d_in)).astype(np.float32))


@needs_onednn
@pytest.mark.parametrize("n,d_in,d_out", [(1, 256, 256), (3, 77, 45), (17, 33, 100), (64, 31, 1)])
def test_small_batches_on_onednn_within_bound(n: int, d_in: int, d_out: int) -> None:
    rng = np.random.default_rng(n + d_out)
    layers = rand_layers(rng, [d_in, d_out, 40], ["gelu", "none"])
    op = onednn_for_every_batch(layers, normalize=True)
    x = rng.standard_normal((n, d_in)).astype(np.float32)
    check_within_bound(op, layers, x)
    assert np.array_equal(op.apply(x, threads=1), op.apply(x, threads=2))


@needs_onednn
def test_small_batches_take_the_native_kernels_where_they_run() -> None:
    """oneDNN costs ~10 us a call (batch 1: 10.8 against 1.9 us here), so batches of at most small_batch_rows rows
    run on the native bf16 kernels: the same bits as the native backend; larger ones run on oneDNN."""
    if bc_fast.build_info()["bf16_unavailable"]:
        pytest.skip(f"the native bf16 kernels cannot run here: {bc_fast.build_info()['bf16_unavailable']}")
    rng = np.random.default_rng(9)
    layers = rand_layers(rng, [128, 96], ["relu"])
    dnn = FusedTransform(layers, precision="bf16", bf16_backend="onednn")
    native = FusedTransform(layers, precision="bf16", bf16_backend="native")
    small = bc_fast.build_info()["small_batch_rows"]
    for n in (1, 7, small):
        x = rng.standard_normal((n, 128)).astype(np.float32)
        assert np.array_equal(dnn.apply(x), native.apply(x))
    x = rng.standard_normal((small + 1, 128)).astype(np.float32)
    assert np.array_equal(dnn.apply(x), onednn_for_every_batch(layers).apply(x))


@needs_onednn
@pytest.mark.parametrize("out_dtype", [np.float32, np.float16])
@pytest.mark.parametrize("normalize", [False, True])
def test_mlp_program_normalize(out_dtype, normalize: bool) -> None:
    rng = np.random.default_rng(7)
    layers = rand_layers(rng, [96, 200, 50, 64], ["gelu", "relu", "none"])
    op = FusedTransform(layers, normalize=normalize, precision="bf16", bf16_backend="onednn")
    for n in (1, 3, 17, 1000, 2049):
        check_within_bound(op, layers, rng.standard_normal((n, 96)).astype(np.float32), out_dtype)


@needs_onednn
@pytest.mark.parametrize("act", ["gelu", "relu", "none"])
@pytest.mark.parametrize("width", [None, 20])
def test_hidden_layer_activations_fused_or_not(act: str, width) -> None:
    """A hidden layer whose activation covers every output runs it inside oneDNN (bf16 out); a partial one does
    not; both within the bound."""
    rng = np.random.default_rng(5)
    layers = [Layer((rng.standard_normal((48, 40)) / 6).astype(np.float32), rng.standard_normal(48).astype(np.float32),
                    act, activation_width=width),
              Layer((rng.standard_normal((24, 48)) / 7).astype(np.float32), None, "gelu")]
    op = onednn_for_every_batch(layers)
    for n in (1, 33, 2000):
        x = rng.standard_normal((n, 40)).astype(np.float32)
        check_within_bound(op, layers, x)
        assert np.array_equal(op.apply(x, threads=1), op.apply(x, threads=2))


@needs_onednn
@pytest.mark.parametrize("n", [16, 33, 1024, 3000])
def test_bf16_and_fp16_rows_in_and_out(n: int) -> None:
    """bf16 rows go to oneDNN as they are (whole row steps) or padded; fp16 rows are exact in fp32 first."""
    rng = np.random.default_rng(n)
    layers = rand_layers(rng, [64, 80], ["gelu"])
    op = FusedTransform(layers, precision="bf16", bf16_backend="onednn")
    x = rng.standard_normal((n, 64)).astype(np.float32).astype(bfloat16())
    as_fp32 = op.apply(x.astype(np.float32))
    assert np.array_equal(op.apply(x), as_fp32)  # bf16 x is exact in fp32 and rounds to itself
    assert np.array_equal(op.apply(x.astype(np.float16)), op.apply(x.astype(np.float16).astype(np.float32)))
    y16 = op.apply(x, out_dtype="bfloat16")
    assert y16.dtype == bfloat16() and np.array_equal(y16, as_fp32.astype(bfloat16()))
    check_within_bound(op, layers, x.astype(np.float32))


@needs_onednn
@pytest.mark.parametrize("n", [1, 3, 64, 65, 1000, 4099])
def test_bit_identical_across_thread_counts(n: int) -> None:
    rng = np.random.default_rng(n)
    layers = rand_layers(rng, [130, 257, 96], ["gelu", "none"])
    op = FusedTransform(layers, normalize=True, precision="bf16", bf16_backend="onednn")
    x = rng.standard_normal((n, 130)).astype(np.float32)
    one = op.apply(x, threads=1)
    assert np.array_equal(one, op.apply(x, threads=2))
    assert np.array_equal(one, op.apply(x, threads=3))


@needs_onednn
def test_concurrent_callers_get_the_serial_result() -> None:
    rng = np.random.default_rng(11)
    layers = rand_layers(rng, [256, 256], ["none"])
    op = FusedTransform(layers, precision="bf16", bf16_backend="onednn")
    xs = [rng.standard_normal((n, 256)).astype(np.float32) for n in (1, 40, 700, 3001)]
    want = [op.apply(x) for x in xs]
    errors: list[str] = []

    def worker(i: int) -> None:
        for _ in range(5):
            for x, w in zip(xs, want):
                if not np.array_equal(op.apply(x), w):
                    errors.append(f"thread {i}: rows {len(x)} differ")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


@needs_onednn
def test_agrees_with_the_native_backend_within_both_bounds() -> None:
    if bc_fast.build_info()["bf16_unavailable"]:
        pytest.skip(f"the native bf16 kernels cannot run here: {bc_fast.build_info()['bf16_unavailable']}")
    rng = np.random.default_rng(2)
    layers = rand_layers(rng, [300, 300], ["none"])
    x = rng.standard_normal((777, 300)).astype(np.float32)
    a = FusedTransform(layers, precision="bf16", bf16_backend="onednn").apply(x)
    b = FusedTransform(layers, precision="bf16", bf16_backend="native").apply(x)
    s = np.abs(x.astype(np.float64)) @ np.abs(layers[0].weight.astype(np.float64)).T
    # Same operands (both round to nearest even), different summation orders: fp32-sized differences only.
    assert np.all(np.abs(a.astype(np.float64) - b) <= 2 * 1.01 * 302 * 2.0**-24 * (s + np.abs(layers[0].bias)))


@needs_onednn
def test_forked_child_gets_the_parent_result(tmp_path) -> None:
    res = run_python("""
        import os, numpy as np
        from bc_fast import FusedTransform, Layer
        rng = np.random.default_rng(0)
        op = FusedTransform([Layer((rng.standard_normal((64, 48)) / 7).astype(np.float32))], precision="bf16",
                            bf16_backend="onednn")
        x = rng.standard_normal((3000, 48)).astype(np.float32)
        parent = op.apply(x)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.write(w, b"1" if np.array_equal(op.apply(x), parent) else b"0")
            os._exit(0)
        os.waitpid(pid, 0)
        print("CHILD", os.read(r, 1).decode())
    """, tmp_path)
    assert res.returncode == 0, res.stderr
    assert "CHILD 1" in res.stdout


def test_bad_backend_names_are_refused(monkeypatch) -> None:
    w = np.eye(4, dtype=np.float32)
    with pytest.raises(ValueError, match=r"bf16_backend must be one of \('auto', 'native', 'onednn'\), got 'mkl'"):
        FusedTransform.affine(w, precision="bf16", bf16_backend="mkl")
    with pytest.raises(ValueError, match="applies to precision='bf16' only"):
        FusedTransform.affine(w, bf16_backend="onednn")
    monkeypatch.setenv("BC_FAST_BF16_BACKEND", "fast")
    with pytest.raises(ValueError, match=r"BC_FAST_BF16_BACKEND must be one of .*got 'fast'"):
        FusedTransform.affine(w, precision="bf16")
    assert FusedTransform.affine(w).bf16_backend == "native"  # fp32 operators ignore the variable


def test_missing_onednn_says_how_to_install(monkeypatch) -> None:
    monkeypatch.delenv("BC_FAST_ONEDNN_LIB", raising=False)
    monkeypatch.setattr(onednn, "onednn_library", lambda: None)
    onednn.load_onednn.cache_clear()
    onednn.onednn_bf16_unavailable.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=r"bf16_backend='onednn' cannot run: oneDNN is not installed "
                                               r"\(pip install \"bc-fast\[onednn\]\""):
            FusedTransform.affine(np.eye(4, dtype=np.float32), precision="bf16", bf16_backend="onednn")
        assert onednn.resolve_bf16_backend("auto") == "native"
    finally:
        onednn.load_onednn.cache_clear()
        onednn.onednn_bf16_unavailable.cache_clear()


def test_a_cpu_without_onednn_bf16_is_refused_by_name(monkeypatch) -> None:
    """oneDNN loads on any x86-64 CPU but has no bf16 matmul on AVX2-only ones (it says "unimplemented" when the
    primitive is built): bf16_backend='onednn' is refused up front, naming the CPU's features; 'auto' stays native."""
    if onednn.load_onednn():
        pytest.skip(f"oneDNN cannot be loaded: {onednn.load_onednn()}")
    real = bc_fast._core.FusedOp

    def unimplemented(*args):
        if args[-2:] == ("onednn", 1):
            raise RuntimeError("oneDNN bf16 matmul failed: unimplemented")
        return real(*args)

    monkeypatch.setattr(bc_fast._core, "FusedOp", unimplemented)  # what an AVX2-only CPU answers
    onednn.onednn_bf16_unavailable.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=r"bf16_backend='onednn' cannot run: oneDNN 3\.\S+ \(.*\) has no bf16 "
                                               r"matmul for this CPU \(oneDNN bf16 matmul failed: unimplemented\); "
                                               r"oneDNN needs AVX-512 .* and this CPU has: \w"):
            FusedTransform.affine(np.eye(4, dtype=np.float32), precision="bf16", bf16_backend="onednn")
        assert onednn.resolve_bf16_backend("auto") == "native"
    finally:
        onednn.onednn_bf16_unavailable.cache_clear()


@pytest.mark.parametrize("target,message", [
    ("/nonexistent/libdnnl.so.3", "cannot load /nonexistent/libdnnl.so.3"),
    ("libm.so.6", "is not oneDNN 3.x: it lacks dnnl_version"),
])
def test_a_wrong_library_is_refused_by_name(tmp_path, target: str, message: str) -> None:
    res = run_python("""
        import numpy as np
        from bc_fast import FusedTransform, Layer
        try:
            FusedTransform.affine(np.eye(4, dtype=np.float32), precision="bf16", bf16_backend="onednn")
        except RuntimeError as e:
            print("REFUSED:", e)
        print("FP32:", FusedTransform.affine(np.eye(4, dtype=np.float32)).apply(np.ones((1, 4), np.float32)).sum())
    """, tmp_path, BC_FAST_ONEDNN_LIB=target)
    assert res.returncode == 0, res.stderr
    assert "REFUSED: bf16_backend='onednn' cannot run: " in res.stdout and message in res.stdout
    assert "FP32: 4.0" in res.stdout


def test_auto_picks_onednn_only_with_amx() -> None:
    native_ok = not bc_fast.build_info()["bf16_unavailable"]
    want = "onednn" if _AMX and native_ok and not _WHY else "native"
    assert onednn.resolve_bf16_backend("auto") == want
    info = bc_fast.build_info()
    assert info["bf16_backend"] == onednn.resolve_bf16_backend()
    assert isinstance(info["onednn"], str) and info["onednn"]


@needs_onednn
def test_build_info_reports_the_loaded_library() -> None:
    FusedTransform.affine(np.eye(4, dtype=np.float32), precision="bf16", bf16_backend="onednn")
    assert bc_fast.build_info()["onednn"].startswith("oneDNN 3.")


@needs_onednn
@needs_amx
def test_amx_tiles_run_the_bf16_gemm() -> None:
    rng = np.random.default_rng(3)
    layers = rand_layers(rng, [256, 1024, 256], ["gelu", "none"])
    op = FusedTransform(layers, precision="bf16")  # "auto"
    assert op.bf16_backend == "onednn" and "amx" in op._op.bf16_impl, op._op.bf16_impl
    check_within_bound(op, layers, rng.standard_normal((2000, 256)).astype(np.float32))


@needs_onednn
@pytest.mark.parametrize("d", [4, 5])  # even: vcvtne2ps2bf16 where it runs; odd: the SIMD level's rounding
def test_inputs_round_to_nearest_even(d: int) -> None:
    """x rows are rounded to bf16 (ties to even) before oneDNN multiplies them: an identity map shows the rounding."""
    x = np.zeros((3, d), np.float32)
    x[0, 0] = 1 + 2.0**-8              # a tie between 1 and 1 + 2^-7: to even, 1.0
    x[1, 0] = 1 + 3 * 2.0**-8          # a tie between 1 + 2^-7 and 1 + 2^-6: to even, 1 + 2^-6
    x[2, 0] = 1 + 2.0**-8 + 2.0**-20   # above the tie: 1 + 2^-7
    op = onednn_for_every_batch([Layer(np.eye(d, dtype=np.float32))])
    assert op.apply(x)[:, 0].tolist() == [1.0, 1 + 2.0**-6, 1 + 2.0**-7]


@pytest.mark.parametrize("asked,falls_back", [(None, True), ("auto", True), ("onednn", False)])
def test_auto_falls_back_to_native_when_onednn_refuses_the_shape(monkeypatch, asked, falls_back) -> None:
    """Asked for "auto" (by argument or by $BC_FAST_BF16_BACKEND), a oneDNN refusal gives the native kernels;
    asked for "onednn", it is an error."""
    if bc_fast.build_info()["bf16_unavailable"]:
        pytest.skip(f"the native bf16 kernels cannot run here: {bc_fast.build_info()['bf16_unavailable']}")
    from bc_fast.engine import operator

    real = bc_fast._core.FusedOp

    def refusing(*args):
        if args[-1] == "onednn":
            raise RuntimeError("oneDNN has only its reference kernel (ref:any) for a bf16 matmul on this CPU")
        return real(*args)

    monkeypatch.setattr(operator, "resolve_bf16_backend", lambda requested: "onednn")
    monkeypatch.setattr(operator._core, "FusedOp", refusing)
    monkeypatch.delenv("BC_FAST_BF16_BACKEND", raising=False)
    if asked is not None:
        monkeypatch.setenv("BC_FAST_BF16_BACKEND", asked)
    w = np.eye(4, dtype=np.float32)
    if falls_back:
        assert FusedTransform.affine(w, precision="bf16").bf16_backend == "native"
    else:
        with pytest.raises(RuntimeError, match="reference kernel"):
            FusedTransform.affine(w, precision="bf16")
