"""The small-batch column split over the calling thread and one helper thread (issue 11).

Small batches whose layers are big enough are cut into chunks of output columns; the caller and
one persistent helper thread each run chunks. ``_core._set_small_split(2)`` (private) leaves every
chunk to the helper, so the tests know which thread computed what; ``_small_split_helper_jobs()``
counts the jobs the helper ran chunks of. Results must be bit-identical to ``threads=1``. No timing
assertions; the fork and exit cases run in subprocesses with timeouts.
"""

from __future__ import annotations

import os
import sys
import textwrap
import threading
from typing import Iterator

import numpy as np
import pytest

import bc_fast
from bc_fast import FusedTransform, Layer, _core

JOIN_TIMEOUT_S = 60
SUBPROCESS_TIMEOUT_S = 60


@pytest.fixture
def split_mode() -> Iterator[None]:
    """Restore the split's setting and the default thread count after the test."""
    threads, on = bc_fast.get_num_threads(), bc_fast.build_info()["small_split"]
    yield
    _core._set_small_split(1 if on else 0)
    bc_fast.set_num_threads(threads)


def rand(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def helper_ran(fn) -> int:
    """How many jobs the helper thread ran chunks of during fn()."""
    before = _core._small_split_helper_jobs()
    fn()
    return _core._small_split_helper_jobs() - before


# (d_in, d_out): d_out not a multiple of the 64-column panel, odd panel counts, 2..12 panels.
SHAPES = [(128, 128), (256, 256), (96, 130), (200, 129), (384, 385), (256, 1000), (768, 768)]
MIN_PARALLEL_MACS = 1 << 19  # FusedOp::kMinParallelMacs: from 2x this, a small batch takes the OpenMP row split


def _padded_macs(n: int, d_in: int, d_out: int) -> int:
    return n * d_in * (-(-d_out // 64) * 64)


# batches that would not get an OpenMP row split (the pool's domain)
SPLIT_CASES = [(d_in, d_out, n) for d_in, d_out in SHAPES for n in (1, 2, 3, 7)
               if _padded_macs(n, d_in, d_out) < 2 * MIN_PARALLEL_MACS]


@pytest.mark.parametrize("d_in,d_out,n", SPLIT_CASES)
def test_helper_chunks_are_bit_identical_to_one_thread(simd_level, split_mode, d_in, d_out, n):
    rng = np.random.default_rng(d_in * 1009 + d_out + n)
    w, b, x = rand(rng, d_out, d_in, scale=d_in**-0.5), rand(rng, d_out), rand(rng, n, d_in)
    op = FusedTransform.affine(w, b)
    expected = op.apply(x, threads=1)
    ref = x.astype(np.float64) @ w.astype(np.float64).T + b
    np.testing.assert_allclose(expected, ref, rtol=0, atol=1e-4)
    _core._set_small_split(2)
    got = np.empty_like(expected)
    assert helper_ran(lambda: op.apply(x, out=got, threads=2)) == 1
    np.testing.assert_array_equal(got, expected)
    _core._set_small_split(1)  # caller and helper share the chunks
    for _ in range(50):
        np.testing.assert_array_equal(op.apply(x, threads=2), expected)


@pytest.mark.parametrize("in_dtype", [np.float32, np.float16])
@pytest.mark.parametrize("out_dtype", [np.float32, np.float16])
@pytest.mark.parametrize("normalize", [False, True])
def test_dtypes_and_normalize_are_bit_identical(split_mode, in_dtype, out_dtype, normalize):
    rng = np.random.default_rng(7)
    w, b = rand(rng, 200, 256, scale=1 / 16), rand(rng, 200)
    x = rand(rng, 3, 256).astype(in_dtype)
    op = FusedTransform.affine(w, b, normalize=normalize)
    expected = op.apply(x, out_dtype=out_dtype, threads=1)
    _core._set_small_split(2)
    out = np.empty((3, 200), out_dtype)
    assert helper_ran(lambda: op.apply(x, out=out, threads=2)) == 1
    np.testing.assert_array_equal(out, expected)
    if normalize:
        np.testing.assert_allclose(np.linalg.norm(out.astype(np.float64), axis=1), 1.0, atol=2e-3)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("n", [1, 2])  # from 3 rows this program gets the OpenMP row split instead
def test_mlp_programs_split_every_layer_bit_identically(simd_level, split_mode, activation, n):
    rng = np.random.default_rng(n)
    layers = [
        Layer(rand(rng, 512, 256, scale=1 / 16), rand(rng, 512), activation),
        Layer(rand(rng, 300, 512, scale=512**-0.5), None, activation, activation_width=100),
        Layer(rand(rng, 256, 300, scale=300**-0.5), rand(rng, 256)),
    ]
    x = rand(rng, n, 256)
    for normalize in (False, True):
        op = FusedTransform(layers, normalize=normalize)
        expected = op.apply(x, threads=1)
        _core._set_small_split(2)
        got = np.empty_like(expected)
        assert helper_ran(lambda: op.apply(x, out=got, threads=2)) == 3  # one job per layer
        np.testing.assert_array_equal(got, expected)
        _core._set_small_split(1)


def test_bf16_precision_is_unaffected(split_mode):
    if not bc_fast.build_info()["bf16"]:
        pytest.skip(f"bf16 compute unavailable: {bc_fast.build_info()['bf16_unavailable']}")
    rng = np.random.default_rng(3)
    op = FusedTransform.affine(rand(rng, 256, 256, scale=1 / 16), rand(rng, 256), precision="bf16")
    x = rand(rng, 1, 256)
    expected = op.apply(x, threads=1)
    _core._set_small_split(2)
    got = np.empty_like(expected)
    assert helper_ran(lambda: op.apply(x, out=got, threads=2)) == 0  # the split is fp32 only
    np.testing.assert_array_equal(got, expected)


def test_one_thread_small_layers_and_off_never_use_the_helper(split_mode):
    rng = np.random.default_rng(1)
    big = FusedTransform.affine(rand(rng, 256, 256, scale=1 / 16), rand(rng, 256))
    small = FusedTransform.affine(rand(rng, 64, 64, scale=1 / 8), rand(rng, 64))  # one panel: nothing to split
    x, xs = rand(rng, 1, 256), rand(rng, 1, 64)
    _core._set_small_split(2)
    assert helper_ran(lambda: big.apply(x, threads=1)) == 0
    assert helper_ran(lambda: small.apply(xs, threads=2)) == 0
    bc_fast.set_num_threads(1)
    assert helper_ran(lambda: big.apply(x)) == 0
    bc_fast.set_num_threads(2)
    assert helper_ran(lambda: big.apply(x)) == 1
    assert helper_ran(lambda: big.apply(rand(rng, 65, 256))) == 0  # beyond small batches: row tiles
    assert helper_ran(lambda: big.apply(rand(rng, 64, 256), threads=3)) == 0  # 3 parts: the OpenMP row split
    x16 = rand(rng, 16, 256)  # 16 x 256 x 256 = 2 x MIN_PARALLEL_MACS: two row blocks, OpenMP, not the pool
    assert _padded_macs(16, 256, 256) == 2 * MIN_PARALLEL_MACS
    assert helper_ran(lambda: big.apply(x16, threads=2)) == 0
    np.testing.assert_array_equal(big.apply(x16, threads=2), big.apply(x16, threads=1))
    _core._set_small_split(0)
    assert not bc_fast.build_info()["small_split"]
    assert helper_ran(lambda: big.apply(x, threads=2)) == 0
    with pytest.raises(ValueError, match="small split mode must be 0, 1 or 2, got 3"):
        _core._set_small_split(3)


def test_many_callers_at_once_get_the_single_thread_bits(split_mode):
    rng = np.random.default_rng(5)
    ops = [FusedTransform.affine(rand(rng, d, d, scale=d**-0.5), rand(rng, d)) for d in (128, 256, 384)]
    xs = [rand(rng, n, op.d_in) for op, n in zip(ops, (1, 2, 5))]
    expected = [op.apply(x, threads=1) for op, x in zip(ops, xs)]
    _core._set_small_split(1)
    errors: list[str] = []

    def caller(seed: int) -> None:
        for i in range(300):
            k = (seed + i) % len(ops)
            got = ops[k].apply(xs[k])
            if not np.array_equal(got, expected[k]):
                errors.append(f"caller {seed} call {i}: op {k} differs from threads=1")

    threads = [threading.Thread(target=caller, args=(s,), daemon=True) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_TIMEOUT_S)
    assert not [t for t in threads if t.is_alive()], "a caller deadlocked in the small split"
    assert errors == []
    assert _core._threads_in_use() == 0


_FORK_SCRIPT = textwrap.dedent("""
    import os, sys
    import numpy as np
    import bc_fast
    from bc_fast import _core
    rng = np.random.default_rng(0)
    op = bc_fast.FusedTransform.affine(rng.standard_normal((256, 256)).astype(np.float32),
                                       rng.standard_normal(256).astype(np.float32))
    x = rng.standard_normal((1, 256)).astype(np.float32)
    expected = op.apply(x, threads=1)
    _core._set_small_split(int(sys.argv[1]))
    jobs = _core._small_split_helper_jobs()
    for _ in range(1000):  # the helper runs (and spins) in the parent
        assert np.array_equal(op.apply(x), expected)
    assert sys.argv[1] != "2" or _core._small_split_helper_jobs() == jobs + 1000
    pid = os.fork()
    if pid == 0:  # the child: the helper does not exist here; it must compute alone, not wait
        ok = all(np.array_equal(op.apply(x, threads=2), expected) for _ in range(100))
        ok = ok and bc_fast.build_info()["forked_child"]
        os._exit(0 if ok else 4)
    _, status = os.waitpid(pid, 0)
    assert np.array_equal(op.apply(x), expected)  # the parent's helper still serves it
    sys.exit(os.waitstatus_to_exitcode(status))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork is tested on Linux")
@pytest.mark.parametrize("mode", ["1", "2"])
def test_forked_child_computes_without_the_parents_helper(tmp_path, run_python, mode):
    res = run_python(_FORK_SCRIPT, mode, cwd=tmp_path, timeout=SUBPROCESS_TIMEOUT_S)
    assert res.returncode == 0, f"exit {res.returncode}: {res.stdout[-2000:]}"


_EXIT_SCRIPT = textwrap.dedent("""
    import sys, threading
    import numpy as np
    import bc_fast
    from bc_fast import _core
    _core._set_small_split(int(sys.argv[1]))
    op = bc_fast.FusedTransform.affine(np.ones((512, 256), np.float32))
    x = np.ones((1, 256), np.float32)
    assert np.all(op.apply(x) == 256.0)

    def forever():
        while True:
            op.apply(x)

    if sys.argv[2] == "busy":  # a daemon thread still calling apply while the interpreter exits
        threading.Thread(target=forever, daemon=True).start()
    print("applied", flush=True)
""")


@pytest.mark.parametrize("mode", ["1", "2"])
@pytest.mark.parametrize("calls", ["idle", "busy"])
def test_interpreter_exits_cleanly_with_the_helper_running(tmp_path, run_python, mode, calls):
    res = run_python(_EXIT_SCRIPT, mode, calls, cwd=tmp_path, timeout=SUBPROCESS_TIMEOUT_S)
    assert res.returncode == 0, f"exit {res.returncode}: {res.stdout[-2000:]}"
    assert res.stdout.strip() == "applied"


def test_env_turns_the_split_off(tmp_path, run_python):
    res = run_python("import bc_fast; print(bc_fast.build_info()['small_split'])", cwd=tmp_path,
                     timeout=SUBPROCESS_TIMEOUT_S, env={"BC_FAST_SMALL_SPLIT": "0"})
    assert res.returncode == 0 and res.stdout.strip() == "False", res.stdout
    res = run_python("import bc_fast; print(bc_fast.build_info()['small_split'])", cwd=tmp_path,
                     timeout=SUBPROCESS_TIMEOUT_S, env={"BC_FAST_SMALL_SPLIT": "1"})
    assert res.returncode == 0 and res.stdout.strip() == "True", res.stdout


def test_helper_follows_the_callers_denormal_mode(split_mode):
    torch = pytest.importorskip("torch", reason="torch.set_flush_denormal sets the caller's FTZ/DAZ bits")
    x = np.full((1, 256), 1e-20, np.float32)
    op = FusedTransform.affine(np.full((256, 256), 1e-19, np.float32))  # products of 1e-39: subnormal
    assert np.all(op.apply(x, threads=1) > 0)
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        expected = op.apply(x, threads=1)
        assert np.all(expected == 0)
        _core._set_small_split(2)
        got = np.empty_like(expected)
        assert helper_ran(lambda: op.apply(x, out=got, threads=2)) == 1
        np.testing.assert_array_equal(got, expected)
    finally:
        torch.set_flush_denormal(False)


_AFFINITY_SCRIPT = textwrap.dedent("""
    import os, sys, time
    import numpy as np
    import bc_fast
    from bc_fast import _core
    cpus = sorted(os.sched_getaffinity(0))
    if sys.argv[1] == "one":  # the caller and the helper (started later, inheriting it) share one CPU
        os.sched_setaffinity(0, {cpus[0]})
    _core._set_small_split(1)
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((256, 256)) / 16).astype(np.float32)
    x = rng.standard_normal((1, 256)).astype(np.float32)
    op = bc_fast.FusedTransform.affine(w)
    expected = op.apply(x, threads=1)
    got = np.empty_like(expected)
    for burst in range(20):  # streams of calls with pauses: the helper sleeps, is woken and steered
        for _ in range(300):
            op.apply(x, out=got, threads=2)
            assert np.array_equal(got, expected)
        time.sleep(0.002)
    print("ok")
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="CPU affinity is Linux's")
@pytest.mark.parametrize("cpus", ["all", "one"])
def test_steering_the_helper_keeps_the_bits(tmp_path, run_python, cpus):
    # Before waking the helper the caller narrows the helper's CPU mask to keep it off its own CPU,
    # and the helper restores its mask when it runs. With one CPU there is nowhere to steer it or
    # move it to: the calls must still complete, with the same bits and without a hang.
    res = run_python(_AFFINITY_SCRIPT, cpus, cwd=tmp_path, timeout=SUBPROCESS_TIMEOUT_S)
    assert res.returncode == 0, f"exit {res.returncode}: {res.stdout[-2000:]}"
    assert res.stdout.strip() == "ok", res.stdout
