"""Is one variant of the fused sm90 kernel correct on this GPU? One variant per process.

    python bench/sm90_variant_check.py SCHEDULE/STORE        (e.g. pingpong/staged)

``bench/gpu_check.sh`` runs this once per variant, each in a process of its own under a timeout,
before the GPU tests and the benchmark: a variant that has never run on a GPU may fault (a sticky
CUDA error ends every later CUDA call of its process) or hang, and it must not take the rest of the
check with it. Only the variants that pass here are timed by ``bench/gpu_kernels.py``.

Under the variant, every layer program below that runs a layer on the fused kernel is applied to
float16 and bfloat16 rows (``ROWS``: around the 64- and 128-row tiles, and up to more tiles than the GPU
runs at once) into NaN-filled outputs, and compared with the float64 reference: every element written, and
``max |y - ref| / max |ref|`` within the GPU tests' bounds (5e-3 float16, 3e-2 bfloat16).
Prints one line. Exit status: 0 correct, 1 wrong (or refused by the kernel), 2 nothing to check
(no GPU, no torch with CUDA, or a build without the fused kernels).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from bc_fast import FusedTransform, Layer
from bc_fast.bench.harness import random_weights
from bc_fast.engine.fusion import apply_layers_reference

SCHEDULES = ("cooperative", "pingpong")
STORES = ("direct", "staged")
TOL = {"float16": 5e-3, "bfloat16": 3e-2}
# Row counts around the 64- and 128-row tiles, and one with more tiles than a 132-SM GPU runs at once
# (each persistent CTA then takes several, reusing its staging slots); its rows are checked on a sample.
ROWS = (1, 63, 65, 129, 4099, 40_000)
SAMPLED_ABOVE = 5000


def _dense(rng: np.random.Generator, d_out: int, d_in: int, act: str = "none", width: int | None = None,
           bias: bool = True) -> Layer:
    return Layer(*random_weights(rng, d_out, d_in, bias), act, width)


# name: (layers, normalize). The L2 programs take the fused kernel under every variant; the GELU ones
# only with the staged store.
PROGRAMS: dict[str, Callable[[np.random.Generator], tuple[list[Layer], bool]]] = {
    "l2_256": lambda r: ([_dense(r, 256, 256)], True),
    "l2_64_from_1024": lambda r: ([_dense(r, 64, 1024, bias=False)], True),
    "relu_partial_l2": lambda r: ([_dense(r, 200, 128, act="relu", width=77)], True),
    "mlp_gelu": lambda r: ([_dense(r, 1024, 256, act="gelu"), _dense(r, 256, 1024)], False),
    "mlp_gelu_l2": lambda r: ([_dense(r, 384, 256, act="gelu"), _dense(r, 128, 384, bias=False)], True),
    "gelu_partial": lambda r: ([_dense(r, 200, 96, act="gelu", width=77)], False),
}


def _no_check(why: str) -> int:
    print(f"sm90_variant_check: nothing checked: {why}")
    return 2


def check_variant(torch: Any, cu: Any, schedule: str, store: str) -> tuple[bool, str]:
    """(correct, one-line summary) of every program under the variant."""
    rng = np.random.default_rng(2026)
    worst: dict[str, float] = {}
    used = 0
    cu.set_sm90_kernel_variant(schedule, store)
    for name, make in PROGRAMS.items():
        layers, normalize = make(rng)
        op = FusedTransform(layers, normalize=normalize)
        for dtype, tol in TOL.items():
            dt = getattr(torch, dtype)
            for n in ROWS:
                x = torch.from_numpy(rng.standard_normal((n, layers[0].d_in)).astype(np.float32)).to("cuda", dt)
                out = torch.full((n, op.d_out), float("nan"), dtype=dt, device="cuda")
                try:
                    op.apply(x, out=out)
                    torch.cuda.synchronize()
                except Exception as e:  # noqa: BLE001 (the kernel's refusal is the finding: report it, exit 1)
                    return False, f"{name} {dtype} {n} rows: {type(e).__name__}: {e}"
                if "sm90_fused" not in op._cuda_op.layer_paths(dtype, dtype, True):
                    break  # this program does not run on the fused kernel under this variant
                used += 1
                unwritten = int(torch.isnan(out).sum().item())
                if unwritten:
                    return False, f"{name} {dtype} {n} rows: {unwritten} output elements left unwritten"
                rows = np.unique(np.r_[0:n:37, max(n - 64, 0):n]) if n > SAMPLED_ABOVE else np.arange(n)
                idx = torch.as_tensor(rows, device="cuda")
                got = out[idx].float().cpu().numpy().astype(np.float64)
                ref = apply_layers_reference(layers, x[idx].float().cpu().numpy().astype(np.float64))
                if normalize:
                    ref = ref / np.maximum(np.linalg.norm(ref, axis=1, keepdims=True), 1e-12)
                err = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-6))
                worst[dtype] = max(worst.get(dtype, 0.0), err)
                if not err < tol:
                    return False, f"{name} {dtype} {n} rows: relative error {err:.2e} >= {tol:.0e}"
    if used == 0:
        return False, "no program ran a layer on the fused kernel"
    errs = ", ".join(f"{d} {e:.1e}" for d, e in worst.items())
    return True, f"{used} runs on the fused kernel agree with float64 (largest relative error: {errs})"


def main(argv: list[str] | None = None) -> int:
    """Checks the variant named on the command line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variant", help="SCHEDULE/STORE, e.g. cooperative/staged")
    args = ap.parse_args(argv)
    schedule, _, store = args.variant.partition("/")
    if schedule not in SCHEDULES or store not in STORES:
        ap.error(f"variant must be SCHEDULE/STORE with SCHEDULE one of {', '.join(SCHEDULES)} and STORE one of "
                 f"{', '.join(STORES)}, got {args.variant!r}")
    try:
        import torch
    except ImportError as e:
        return _no_check(f"torch cannot be imported ({e})")
    if not torch.cuda.is_available():
        return _no_check("torch sees no CUDA device")
    try:
        import bc_fast._cuda as cu
    except ImportError as e:
        return _no_check(f"bc_fast._cuda is not built ({e})")
    info = cu.device_info()
    if not info["available"] or not info["fused_sm90_kernels"] or torch.cuda.get_device_capability() != (9, 0):
        return _no_check("the fused sm90 kernels need a build with CUTLASS and a compute capability 9.0 GPU")
    ok, line = check_variant(torch, cu, schedule, store)
    print(f"sm90 variant {schedule}/{store}: {'correct' if ok else 'WRONG'}: {line}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
