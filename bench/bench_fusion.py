"""Fused chain operator vs applying the chain step by step in numpy and in torch.

For K = 1..5 backward transforms (affine, or residual ReLU MLP steps), batch sizes 1,
256 and 8192, d = 256: the registry's fused operator (one matrix for affine chains,
one layer program for MLP chains, run by the compiled core into a reused output
buffer) against the reference code's way, ``for B in chain: z = B(z)`` in numpy
(``z @ W.T + b``) and in torch (``F.linear``, no_grad). For affine chains a numpy
line with the chain pre-multiplied into one matrix separates the fusion gain from
the core's.

Prints the machine, then one parseable line per config (medians, microseconds)::

    kind=affine K=3 d=256 batch=256 fused_us=... numpy_us=... torch_us=... numpy1_us=... \
speedup_vs_numpy=... speedup_vs_torch=...

Run: ``python bench/bench_fusion.py [--quick] [--threads N]`` (about 1.5 minutes on 2 vCPUs). On a
shared, loaded machine use ``--threads 1``: multithreaded timings there measure the scheduler.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time


from _common import machine_line, threads_from_argv  # noqa: E402

threads_from_argv()

import numpy as np  # noqa: E402

from bc_fast import Layer  # noqa: E402
from bc_fast.registry import Registry  # noqa: E402


def timeit(fn, min_time: float = 0.15, max_reps: int = 400) -> float:
    """Median seconds per call; calls grouped so each timed group lasts >= ~1 ms."""
    for _ in range(3):
        fn()
    t = time.perf_counter()
    fn()
    est = max(time.perf_counter() - t, 1e-7)
    inner = max(1, int(1e-3 / est))
    groups = max(5, min(max_reps, int(min_time / (est * inner))))
    times = []
    for _ in range(groups):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t) / inner)
    return statistics.median(times)


def make_registry(path: str, kind: str, K: int, d: int, rng: np.random.Generator) -> Registry:
    reg = Registry.create(path)
    reg.add_version(dim=d)
    s = 1 / math.sqrt(d)
    for _ in range(K):
        if kind == "affine":
            b = ((rng.standard_normal((d, d)) * s).astype(np.float32), (rng.standard_normal(d) * 0.1).astype(np.float32))
        else:  # residual MLP P x + W2 relu(W1 x + b1) + b2, hidden = d
            h = d
            w1, p, w2 = (rng.standard_normal((h, d)) * s, rng.standard_normal((d, d)) * s, rng.standard_normal((d, h)) * s)
            b = [Layer(np.vstack([w1, p]).astype(np.float32), np.r_[rng.standard_normal(h) * 0.1, np.zeros(d)].astype(np.float32),
                       "relu", activation_width=h),
                 Layer(np.hstack([w2, np.eye(d)]).astype(np.float32), (rng.standard_normal(d) * 0.1).astype(np.float32))]
        reg.add_version(dim=d, backward=b)
    return reg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer batch sizes")
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for every engine (sets OMP/OPENBLAS_NUM_THREADS); use 1 on a shared box")
    args = ap.parse_args()
    import torch
    import torch.nn.functional as F

    print(machine_line())
    print(f"# torch {torch.__version__} threads={torch.get_num_threads()}")
    rng = np.random.default_rng(0)
    d = args.d
    batches = [1, 256] if args.quick else [1, 256, 8192]
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("affine", "mlp"):
            for K in range(1, 6):
                reg = make_registry(os.path.join(tmp, f"{kind}{K}"), kind, K, d, rng)
                op = reg.operator(K, 0)
                steps = [l for step in reg.chain_layers(K, 0) for l in step]
                np_steps = [(l.weight, l.bias, l.activation, l.activation_width) for l in steps]
                t_steps = [(torch.from_numpy(l.weight), None if l.bias is None else torch.from_numpy(l.bias),
                            l.activation, l.activation_width) for l in steps]
                W1 = op.layers[0].weight if kind == "affine" else None
                b1 = op.layers[0].bias if kind == "affine" else None

                def numpy_chain(x):
                    for w, b, act, width in np_steps:
                        x = x @ w.T
                        if b is not None:
                            x += b
                        if act == "relu":
                            np.maximum(x[:, :width], 0, out=x[:, :width])
                    return x

                def torch_chain(x):
                    with torch.no_grad():
                        for w, b, act, width in t_steps:
                            x = F.linear(x, w, b)
                            if act == "relu":
                                x[:, :width].relu_()
                    return x

                for n in batches:
                    x = rng.standard_normal((n, d)).astype(np.float32)
                    xt = torch.from_numpy(x)
                    out = np.empty((n, op.d_out), np.float32)
                    ref = numpy_chain(x.copy())
                    err = float(np.abs(op.apply(x) - ref).max() / max(np.abs(ref).max(), 1e-30))
                    t_fused = timeit(lambda: op.apply(x, out=out))
                    t_np = timeit(lambda: numpy_chain(x))
                    t_t = timeit(lambda: torch_chain(xt))
                    extra = ""
                    if W1 is not None:
                        t_np1 = timeit(lambda: x @ W1.T + b1 if b1 is not None else x @ W1.T)
                        extra = f" numpy1_us={t_np1 * 1e6:.2f}"
                    print(f"kind={kind} K={K} d={d} batch={n} layers={len(op.layers)} fused_us={t_fused * 1e6:.2f} "
                          f"numpy_us={t_np * 1e6:.2f} torch_us={t_t * 1e6:.2f}{extra} "
                          f"speedup_vs_numpy={t_np / t_fused:.2f} speedup_vs_torch={t_t / t_fused:.2f} "
                          f"rel_err={err:.1e}", flush=True)


if __name__ == "__main__":
    main()
