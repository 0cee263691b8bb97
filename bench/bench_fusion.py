"""Fused chain operator vs applying the chain step by step in numpy and in torch.

    python bench/bench_fusion.py [--quick] [--threads N] [--json PATH] [--d 256]

For K = 1..5 backward transforms (affine, or residual ReLU MLP steps), batch sizes 1,
256 and 8192 (--quick: 1 and 256), d = 256: the registry's fused operator (one matrix
for affine chains, one layer program for MLP chains, run by the compiled core into a
reused output buffer) against the reference code's way, ``for B in chain: z = B(z)``,
in numpy (``np.matmul(out=)``, ``np.add(out=)``, ReLU in place) and in torch
(``torch.addmm(out=)``, ``relu_``), each step into one of two preallocated buffers in
turn. For affine chains ``numpy_onematrix`` (the chain pre-multiplied into one matrix,
``np.matmul(out=)`` + ``np.add(out=)``) separates the fusion gain from the core's. One
config per (kind, K, batch); check: fused no slower than either step-by-step way.
Harness: :mod:`bc_fast.bench.harness`. On a shared, loaded machine use ``--threads 1``.
"""

from __future__ import annotations

import math
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bc_fast import Layer
from bc_fast.bench.harness import TINY_PLAN, Bench, Config, TimingPlan, result, run_configs, script_args, speedup_check
from bc_fast.bench.suite import affine_impls
from bc_fast.engine.fusion import apply_layers_reference
from bc_fast.store.registry import Registry


def make_registry(path: Path, kind: str, K: int, d: int, rng: np.random.Generator) -> Registry:
    """A registry of K + 1 versions of dim ``d`` with K affine or residual-MLP backward transforms."""
    reg = Registry.create(path)
    reg.add_version(dim=d)
    s = 1 / math.sqrt(d)
    for _ in range(K):
        if kind == "affine":
            b: Any = ((rng.standard_normal((d, d)) * s).astype(np.float32),
                      (rng.standard_normal(d) * 0.1).astype(np.float32))
        else:  # residual MLP P x + W2 relu(W1 x + b1) + b2, hidden = d
            w1, p, w2 = (rng.standard_normal((d, d)) * s for _ in range(3))
            b = [Layer(np.vstack([w1, p]).astype(np.float32),
                       np.r_[rng.standard_normal(d) * 0.1, np.zeros(d)].astype(np.float32), "relu", activation_width=d),
                 Layer(np.hstack([w2, np.eye(d)]).astype(np.float32),
                       (rng.standard_normal(d) * 0.1).astype(np.float32))]
        reg.add_version(dim=d, backward=b)
    return reg


def step_impls(bench: Bench, x: np.ndarray, steps: list[Layer]) -> dict[str, Callable[[], Any]]:
    """The chain layer by layer in numpy and torch, each layer into one of two preallocated buffers."""
    n = len(x)
    bufs = [bench.buf.get(f"step{i % 2}", (n, layer.weight.shape[0])) for i, layer in enumerate(steps)]
    relu_width = [layer.activation_width or layer.weight.shape[0] if layer.activation == "relu" else 0
                  for layer in steps]

    def numpy_steps() -> None:
        z = x
        for layer, o, w in zip(steps, bufs, relu_width):
            np.matmul(z, layer.weight.T, out=o)
            if layer.bias is not None:
                np.add(o, layer.bias, out=o)
            if w:
                np.maximum(o[:, :w], 0, out=o[:, :w])
            z = o

    impls = {"numpy_steps": numpy_steps}
    if bench.torch is not None:
        torch = bench.torch
        t_steps = [(torch.from_numpy(layer.weight.copy()).t(),  # copies: the layers are read-only
                    None if layer.bias is None else torch.from_numpy(layer.bias.copy()),
                    torch.from_numpy(o), w) for layer, o, w in zip(steps, bufs, relu_width)]
        xt = torch.from_numpy(x)

        def torch_steps() -> None:
            z = xt
            for WT, b, o, w in t_steps:
                if b is None:
                    torch.mm(z, WT, out=o)
                else:
                    torch.addmm(b, z, WT, out=o)
                if w:
                    o[:, :w].relu_()
                z = o
        impls["torch_steps"] = torch_steps
    return impls


def cfg_fusion(bench: Bench, kind: str, K: int, d: int, n: int) -> dict:
    """Fused operator of a K-step chain vs the chain step by step, batch ``n``."""
    with tempfile.TemporaryDirectory() as tmp:
        reg = make_registry(Path(tmp) / "reg", kind, K, d, bench.rng)
        op = reg.operator(K, 0)
        steps = [layer for step in reg.chain_layers(K, 0) for layer in step]
    x = bench.buf.get("x", (n, d), random=True)
    out = bench.buf.get("out", (n, op.d_out))
    T = bench.threads
    impls: dict[str, Callable[[], Any]] = {"bc_fast": lambda: op.apply(x, out=out, threads=T)}
    impls.update(step_impls(bench, x, steps))
    if kind == "affine":
        W1, b1 = op.layers[0].weight, op.layers[0].bias
        impls["numpy_onematrix"] = affine_impls(bench, op, x, bench.buf.get("out1", (n, op.d_out)), W1, b1,
                                                ("numpy_prealloc",))["numpy_prealloc"]
    t = bench.measure(impls, large=False, min_calls=50 if n == 1 else 1)
    impls["bc_fast"]()
    ref = apply_layers_reference(steps, x)
    err = float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30))
    checks = [speedup_check("vs numpy steps", t, "numpy_steps", 1.0),
              speedup_check("vs torch steps", t, "torch_steps", 1.0)]
    return result(f"{kind}_K{K}_b{n}", f"{kind} chain of K={K} steps, d={d}, batch {n}, fused to "
                  f"{len(op.layers)} layer(s)", n, t, checks, err=err,
                  flops_per_call=2.0 * n * sum(layer.weight.size for layer in steps),
                  note="max_abs_err is relative to max |reference|; flops count the unfused chain")


def main(argv: list[str] | None = None) -> int:
    args = script_args(__doc__, argv, quick_help="batch sizes 1 and 256 only",
                       extra=lambda p: p.add_argument("--d", type=int, default=256, help="embedding dimension"))
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    batches = {"tiny": [1, 64], "quick": [1, 256], "full": [1, 256, 8192]}[mode]
    ks = range(1, 3) if args.tiny else range(1, 6)
    plan = TINY_PLAN if args.tiny else TimingPlan(2.0, (3, 5), 10 if args.quick else 20)  # idle 0.1 s per visit

    def configs(bench: Bench) -> Iterator[Config]:
        for kind in ("affine", "mlp"):
            for K in ks:
                for n in batches:
                    yield cfg_fusion, (kind, K, args.d, n)

    run_configs("bench_fusion", configs, threads=args.threads, plan=plan, mode=mode, json_path=args.json,
                describe=f"mode={mode}: kinds affine, mlp; K {list(ks)}; d={args.d}; batches {batches}; "
                         f"{plan.describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
