"""A forked child must compute, not hang, whoever started the OpenMP pool in its parent.

torch ships its own libgomp.so.1 (same soname as the system one), so in a process that imported
torch, OpenMP is torch's runtime whoever initialised it. libgomp's pool does not survive fork():
a child that enters a parallel region after its parent used one waits forever. Each case runs in
its own process group with a timeout, so a hang fails the test instead of hanging the suite.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import bc_fast
from bc_fast import FusedTransform

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the fork start method is Linux-only here")

HANG_TIMEOUT_S = 20  # a healthy case takes a few seconds

# The parent imports in `order`, lets `first` start the OpenMP pool, forks, and the child applies
# the operator to 4096 rows. Exit 0: the child's answer was right; 3: the child hung; 4: wrong answer.
_SCRIPT = textwrap.dedent("""
    import multiprocessing as mp, queue, sys
    import numpy as np
    order, first = sys.argv[1], sys.argv[2]
    if order == "torch_first":
        import torch
        import bc_fast
    else:
        import bc_fast
        import torch
    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    op = bc_fast.FusedTransform.affine(rng.standard_normal((96, 64)).astype(np.float32),
                                       rng.standard_normal(96).astype(np.float32))
    x = rng.standard_normal((4096, 64)).astype(np.float32)
    ref = x.astype(np.float64) @ np.asarray(op.layers[0].weight, np.float64).T + op.layers[0].bias

    def torch_parallel():
        a = torch.randn(512, 512)
        torch.mm(a, a)

    def bc_fast_parallel():
        op.apply(x[:1000], threads=2)

    steps = {"torch": [torch_parallel], "torch_then_bc_fast": [torch_parallel, bc_fast_parallel],
             "bc_fast_then_torch": [bc_fast_parallel, torch_parallel]}[first]
    for step in steps:
        step()

    def child(q):
        q.put(op.apply(x, threads=2))

    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=child, args=(q,), daemon=True)
    p.start()
    try:
        got = q.get(timeout=float(sys.argv[3]))  # read before join: a child cannot exit with unread data
    except queue.Empty:
        p.kill()
        print("the forked child hung in bc_fast", flush=True)
        sys.exit(3)
    p.join(10)
    sys.exit(0 if np.allclose(got, ref, rtol=1e-4, atol=1e-3) else 4)
""")


# The parent uses torch's OpenMP pool and forks before bc_fast is ever imported; the child (a
# DataLoader-style worker) imports bc_fast lazily. Exit codes as above.
_LATE_IMPORT_SCRIPT = textwrap.dedent("""
    import multiprocessing as mp, queue, sys
    import numpy as np
    import torch
    torch.set_num_threads(2)
    a = torch.randn(512, 512)
    torch.mm(a, a)

    def child(q):
        import bc_fast
        w = np.ones((96, 64), np.float32)
        q.put((bc_fast.FusedTransform.affine(w).apply(np.ones((4096, 64), np.float32), threads=2),
               bc_fast.build_info()["forked_child"]))

    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=child, args=(q,), daemon=True)
    p.start()
    try:
        got, forked = q.get(timeout=float(sys.argv[1]))
    except queue.Empty:
        p.kill()
        print("the forked child hung in bc_fast", flush=True)
        sys.exit(3)
    p.join(10)
    sys.exit(0 if forked and np.all(got == 64.0) else 4)
""")

# Which multiprocessing children count as forked when they import bc_fast themselves.
_START_METHOD_SCRIPT = textwrap.dedent("""
    import multiprocessing as mp

    def report(q):
        import bc_fast
        q.put(bc_fast.build_info()["forked_child"])

    if __name__ == "__main__":
        for method in ("spawn", "fork", "forkserver"):
            ctx = mp.get_context(method)
            q = ctx.Queue()
            p = ctx.Process(target=report, args=(q,))
            p.start()
            print(method, q.get(timeout=60))
            p.join(10)
""")


# cwd=tests/: `python -c` puts cwd on sys.path, and the source bc_fast/ must not shadow the install.
_HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("order", ["torch_first", "bc_fast_first"])
@pytest.mark.parametrize("first", ["torch", "torch_then_bc_fast", "bc_fast_then_torch"])
def test_forked_child_computes_whoever_started_openmp(run_python, order, first):
    pytest.importorskip("torch", reason="the hang needs torch's libgomp in the parent")
    res = run_python(_SCRIPT, order, first, str(HANG_TIMEOUT_S), cwd=_HERE, timeout=HANG_TIMEOUT_S + 30)
    assert res.returncode != 3, f"the forked child hung: {res.stdout[-2000:]}"
    assert res.returncode == 0, f"exit {res.returncode}: {res.stdout[-2000:]}"


def test_child_importing_bc_fast_after_the_fork_computes(run_python):
    pytest.importorskip("torch", reason="the hang needs torch's libgomp in the parent")
    res = run_python(_LATE_IMPORT_SCRIPT, str(HANG_TIMEOUT_S), cwd=_HERE, timeout=HANG_TIMEOUT_S + 30)
    assert res.returncode != 3, f"the forked child hung: {res.stdout[-2000:]}"
    assert res.returncode == 0, f"exit {res.returncode}: {res.stdout[-2000:]}"


def test_only_fork_started_children_are_marked(tmp_path):
    script = tmp_path / "start_methods.py"  # spawn and forkserver re-import __main__ from a file
    script.write_text(_START_METHOD_SCRIPT)
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=HANG_TIMEOUT_S + 60)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split("\n")[:3] == ["spawn False", "fork True", "forkserver False"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Python >= 3.12 warns about fork + threads
def test_forked_child_does_not_hang_after_parent_used_threads():
    import multiprocessing as mp

    rng = np.random.default_rng(7)
    op = FusedTransform.affine(rng.standard_normal((64, 64)).astype(np.float32))
    x = rng.standard_normal((20_000, 64)).astype(np.float32)
    expected = op.apply(x, threads=2)  # the parent starts the OpenMP pool
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_apply, args=(op, x, q), daemon=True)
    p.start()
    try:
        got = q.get(timeout=HANG_TIMEOUT_S)  # read before join: a child cannot exit with unread queue data
    except Exception:  # queue.Empty: the child never answered
        got = None
    p.join(10)
    if p.is_alive():
        p.kill()
    assert got is not None, "the forked child hung in the core"
    assert p.exitcode == 0
    np.testing.assert_array_equal(got, expected)


def _child_apply(op, x, q):
    q.put(op.apply(x, threads=2))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Python >= 3.12 warns about fork + threads
def test_build_info_reports_forked_child_in_a_fork():
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave at once, without pytest's teardown
        try:
            os.write(w, b"1" if bc_fast.build_info()["forked_child"] else b"0")
        finally:
            os._exit(0)
    os.close(w)
    got = os.read(r, 1)
    os.close(r)
    os.waitpid(pid, 0)
    assert got == b"1"
    assert bc_fast.build_info()["forked_child"] is False
