"""Several Python threads calling ``apply`` at once (issue 11): exact results, a shared thread budget.

Concurrent applies share the core's budget of ``get_num_threads()`` threads: each claims up to
what it asks for without waiting (at least its own thread) and returns them at the end, error or
not. ``_core._threads_in_use()`` (private) reads the threads held now. No timing assertions.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

import bc_fast
from bc_fast import FusedTransform, Layer, _core

JOIN_TIMEOUT_S = 120.0  # a deadlock fails the test instead of hanging the suite


@pytest.fixture
def num_threads() -> Iterator[None]:
    """Restore bc_fast's default thread count after the test."""
    before = bc_fast.get_num_threads()
    yield
    bc_fast.set_num_threads(before)


def _ops() -> list[FusedTransform]:
    rng = np.random.default_rng(11)

    def w(o: int, i: int) -> np.ndarray:
        return (rng.standard_normal((o, i)) / np.sqrt(i)).astype(np.float32)

    return [
        FusedTransform.affine(w(256, 256), rng.standard_normal(256).astype(np.float32)),
        FusedTransform([Layer(w(96, 48), rng.standard_normal(96).astype(np.float32), "gelu"), Layer(w(40, 96))],
                       normalize=True),
        FusedTransform.affine(w(33, 129), normalize=True),
    ]


def _jobs(ops: list[FusedTransform]) -> list[tuple[FusedTransform, np.ndarray, Any]]:
    """(op, x, out_dtype) with batches on every path: single-thread small, split small, tiled large."""
    rng = np.random.default_rng(12)
    jobs = []
    for k, op in enumerate(ops):
        for n in (1, 17, 64, 65, 300, 3001):
            x = rng.standard_normal((n, op.d_in)).astype(np.float16 if (n + k) % 3 == 0 else np.float32)
            jobs.append((op, x, np.float16 if n % 2 else np.float32))
    return jobs


def _run_threads(targets: list[Callable[[], None]]) -> list[BaseException]:
    """Start every target at once; join under a timeout; return the exceptions they raised."""
    start = threading.Barrier(len(targets))
    errors: list[BaseException] = []
    lock = threading.Lock()

    def wrap(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                start.wait()
                fn()
            except BaseException as e:  # noqa: BLE001 - reported to the test thread
                with lock:
                    errors.append(e)
        return run

    threads = [threading.Thread(target=wrap(fn), daemon=True) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_TIMEOUT_S)
    assert not [t for t in threads if t.is_alive()], f"apply deadlocked: callers still running after {JOIN_TIMEOUT_S}s"
    return errors


@pytest.mark.parametrize("callers", [2, 4, 8])
@pytest.mark.parametrize("threads", [None, 1, 3])
def test_concurrent_callers_get_the_single_threaded_bits(callers, threads, num_threads):
    bc_fast.set_num_threads(2)
    jobs = _jobs(_ops())
    expected = [op.apply(x, out_dtype=dt, threads=1) for op, x, dt in jobs]
    results: dict[int, list[np.ndarray]] = {}

    def caller(c: int) -> Callable[[], None]:
        def run() -> None:
            order = np.random.default_rng(c).permutation(len(jobs))  # different ops and batches at once
            got: list[Any] = [None] * len(jobs)
            for _ in range(2):
                for i in order:
                    op, x, dt = jobs[i]
                    got[i] = op.apply(x, out_dtype=dt, threads=threads)
            results[c] = got
        return run

    assert _run_threads([caller(c) for c in range(callers)]) == []
    for c in range(callers):
        for i, (got, want) in enumerate(zip(results[c], expected)):
            assert got.dtype == want.dtype and np.array_equal(got, want), f"caller {c}, job {i}"
    assert _core._threads_in_use() == 0


def test_an_error_in_one_caller_leaves_the_others_and_the_budget_intact(num_threads):
    bc_fast.set_num_threads(2)
    op = _ops()[0]
    x = np.random.default_rng(3).standard_normal((5000, 256)).astype(np.float32)
    expected = op.apply(x, threads=1)
    good: list[np.ndarray] = []
    raised: list[str] = []

    def good_caller() -> None:
        for _ in range(5):
            good.append(op.apply(x))

    def bad_caller() -> None:
        for _ in range(20):
            for bad in (lambda: op.apply(x[:, :100]),            # wrong width (Python check)
                        lambda: op.apply(x, out=x),              # overlapping output (core check)
                        lambda: op._op.apply(x, x, False, 0)):   # the core's own error, past Python
                with pytest.raises(ValueError, match="features per row|overlap") as e:
                    bad()
                raised.append(str(e.value))

    assert _run_threads([good_caller, bad_caller, good_caller]) == []
    assert len(good) == 10 and all(np.array_equal(g, expected) for g in good)
    assert len(raised) == 60
    assert _core._threads_in_use() == 0


def test_callers_share_the_budget_instead_of_each_opening_a_full_team(num_threads):
    bc_fast.set_num_threads(2)
    callers = 4
    op = _ops()[0]
    x = np.random.default_rng(4).standard_normal((20000, 256)).astype(np.float32)
    done = threading.Event()
    seen: list[int] = []

    def monitor() -> None:
        while not done.is_set():
            seen.append(_core._threads_in_use())

    def caller() -> None:
        for _ in range(3):
            op.apply(x)

    watch = threading.Thread(target=monitor, daemon=True)
    watch.start()
    try:
        assert _run_threads([caller] * callers) == []
    finally:
        done.set()
        watch.join(JOIN_TIMEOUT_S)
    # Unshared, 4 callers would hold 4 teams of 2 (8 threads); shared, the first holds at most
    # the 2 of the budget and every later one its own thread: at most 2 + 3.
    assert max(seen) <= 2 + callers - 1
    assert _core._threads_in_use() == 0


def test_an_explicit_request_above_the_default_is_honoured_and_returned(num_threads):
    bc_fast.set_num_threads(1)
    op = _ops()[0]
    x = np.random.default_rng(5).standard_normal((3000, 256)).astype(np.float32)
    assert np.array_equal(op.apply(x, threads=4), op.apply(x, threads=1))
    assert _core._threads_in_use() == 0


def test_concurrency_bench_config_runs_at_toy_size():
    from bc_fast.bench.harness import TINY_PLAN, run_configs
    from bc_fast.bench.suite import SIZES, _cfg_concurrency

    def configs(bench: Any) -> Iterator[Any]:
        yield _cfg_concurrency, (SIZES["tiny"],)

    res = run_configs("concurrency", configs, threads=2, plan=TINY_PLAN, mode="tiny", describe="tiny",
                      log=lambda _line: None, out_dir=None)
    (r,) = res["results"]
    assert r["config"] == "concurrency"
    assert {"bc_fast", "bc_fast_2callers", "bc_fast_4callers"} <= set(r["impls"])
    assert [c["label"] for c in r["checks"]][:2] == ["2 callers vs 1", "4 callers vs 1"]
    assert r["max_abs_err"] < 1e-3
    assert _core._threads_in_use() == 0
