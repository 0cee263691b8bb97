"""GPU kernels against what a user would write instead (the GPU-kernels issue's table), in one run.

Each config applies one layer program to rows resident on the GPU and times, round-robin and with
CUDA events, bc_fast (``FusedTransform.apply(x, out=)``), torch eager with preallocated outputs
(``addmm(out=)``, ``F.normalize(out=)``, in-place GELU) and, where it applies, ``torch.compile``
(default mode). Medians of ``--samples`` rounds after a warm-up. Reported per config: milliseconds,
bc_fast's speed-up over the best baseline, the bytes that must cross device memory (x read once,
out written once) per second against the device-to-device copy bandwidth measured in the same run,
bc_fast's largest row error relative to a float64 reference on sampled rows, and a per-kernel time
table of one call of bc_fast and of the best baseline (torch.profiler), so one run says where the
time goes. The fused sm90 kernel's other variants (``SM90_VARIANTS``: the pingpong schedule, the
staged store, which also takes GELU layers) are timed in the same round-robin wherever they run a
layer, each with its row error.

Configs (rows: default / --quick):
- ``l2_256``: 256->256 + bias + L2, float16 (16M / 8M). Targets: >= 70 % of copy bandwidth, >= 1.5x torch.compile.
- ``mlp_gelu``: 256->1024 (exact GELU) ->256, float16 (4M / 2M). Target: >= 1.5x eager, >= 1.0x torch.compile.
- ``affine1024x768_fp16`` / ``_bf16``: 1024->768 + bias (2M / 1M). Target: >= 1.0x ``addmm(out=)``.
- ``affine768_fp32``: 768->768 + bias, float32, no TF32 on either side (2M / 1M). Target: >= 1.0x ``addmm(out=)``.
- ``chain4``: a chain of 4 affine 384->384 steps, float16 (4M / 2M): bc_fast applies the one fused
  operator, torch the 4 steps. Target: >= 3x.
- ``batch1``: one row 256->256 + bias, float32, wall time per call (host clock over 2000 calls, then a
  synchronize) vs ``addmm(out=)``. Target: <= 1.0x torch's time.

Usage: python bench/gpu_kernels.py [--quick] [--only NAME,...] [--samples N] [--no-profile] [--no-compile]
                                   [--variants SCHEDULE/STORE,...] [--json PATH]
Exit status 2 with a message when no GPU is usable, 1 when a config failed (its error is recorded, the
others still run). Each record names the path of every layer (``CudaFusedOp.layer_paths``: the fused
sm90 kernel or cuBLASLt) and the host's load average when it finished; the header and the JSON carry
the machine (CPU model, load average: batch1's wall latency depends on the host). The JSON, rewritten
atomically after every config, names the ``planned`` configs and says whether the run is ``complete``;
``--only`` or a failing config makes it ``partial``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from bc_fast._util.fileio import atomic_write_json
from bc_fast.bench.harness import (
    machine_info,
    machine_lines,
    random_weights,
    run_status,
    status_line,
    time_gpu_interleaved,
)

ROWS = {"l2_256": (16 << 20, 8 << 20), "mlp_gelu": (4 << 20, 2 << 20), "affine1024x768_fp16": (2 << 20, 1 << 20),
        "affine1024x768_bf16": (2 << 20, 1 << 20), "affine768_fp32": (2 << 20, 1 << 20),
        "chain4": (4 << 20, 2 << 20), "batch1": (1, 1)}


def _setup() -> Any:
    """torch with a usable GPU and bc_fast's CUDA module, or exit 2 saying what is missing."""
    try:
        import torch
    except ImportError as e:
        _no_gpu(f"torch cannot be imported ({e})")
    if not torch.cuda.is_available():
        _no_gpu("torch sees no CUDA device")
    from bc_fast.engine.cuda import cuda_info

    info = cuda_info()
    if not info["available"]:
        _no_gpu(f"bc_fast's CUDA module is not usable: {info['error']}")
    return torch


def _no_gpu(why: str) -> None:
    print(f"gpu_kernels: no GPU: {why}; nothing was measured", file=sys.stderr)
    sys.exit(2)


def _profile(torch: Any, fn: Callable[[], Any], top: int = 6) -> list[dict]:
    """GPU kernels of one call: name, count, total microseconds, share of the call's GPU time."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    # Self time: a kernel's own; the aten ops that launched them have none (no double counting).
    rows = [(e.key, e.count, float(getattr(e, "self_device_time_total", 0.0))) for e in prof.key_averages()]
    rows = [r for r in rows if r[2] > 0]
    total = sum(r[2] for r in rows) or 1.0
    rows.sort(key=lambda r: -r[2])
    return [{"kernel": k[:70], "calls": c, "us": round(t, 1), "share": round(t / total, 3)} for k, c, t in rows[:top]]


def _row_err(y: Any, ref: np.ndarray) -> float:
    got = y.float().cpu().numpy().astype(np.float64)
    return float(np.max(np.linalg.norm(got - ref, axis=1) / np.maximum(np.linalg.norm(ref, axis=1), 1e-12)))


def _copy_bandwidth(torch: Any, samples: int) -> float:
    """Device-to-device copy of 2 GiB: bytes read + written per second."""
    src = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    src.random_(0, 255)
    dst = torch.empty_like(src)
    t = time_gpu_interleaved(torch, {"copy": lambda: dst.copy_(src)}, samples=samples)["copy"]
    return 2 * (2 << 30) / t


def _compiled(torch: Any, fn: Callable[[Any], Any], x: Any) -> tuple[Callable[[], Any] | None, str]:
    """torch.compile(fn) bound to x, compiled and warmed up now; (None, why) if it fails."""
    try:
        c = torch.compile(fn)
        for _ in range(2):
            c(x)
        torch.cuda.synchronize()
        return (lambda: c(x)), ""
    except Exception as e:  # noqa: BLE001 (no triton, no compiler: the baseline is reported missing, not the run)
        return None, f"torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"


# The fused sm90 kernel's variants timed beside the default (cooperative/direct) where a layer runs on it.
SM90_VARIANTS = [("cooperative", "staged"), ("pingpong", "direct"), ("pingpong", "staged")]


def _sm90_variant_fns(op: Any, x: Any, out: Any, dtype: str, sm90: bool,
                     variants: list[tuple[str, str]]) -> dict[str, Callable[[], Any]]:
    """``op.apply(x, out=out)`` under each of ``variants`` of the fused sm90 kernel that runs a layer on it."""
    from bc_fast.engine.cuda import cuda_module

    cu = cuda_module()
    if not sm90 or not cu.device_info()["fused_sm90_kernels"]:
        return {}
    default = tuple(cu.sm90_kernel_variant())

    @contextmanager
    def variant_set(variant: tuple[str, str]) -> Iterator[None]:
        cu.set_sm90_kernel_variant(*variant)
        try:
            yield
        finally:
            cu.set_sm90_kernel_variant(*default)

    def uses_it(variant: tuple[str, str]) -> bool:
        with variant_set(variant):
            return "sm90_fused" in op._cuda_op.layer_paths(dtype, dtype, True)

    def under(variant: tuple[str, str]) -> Callable[[], Any]:
        def call() -> Any:
            with variant_set(variant):
                return op.apply(x, out=out)
        return call

    return {f"bc_fast {'/'.join(v)}": under(v) for v in variants if v != default and uses_it(v)}


def run_config(torch: Any, name: str, rows: int, samples: int, profile_on: bool, compile_on: bool = True,
               variants: list[tuple[str, str]] | None = None) -> dict:
    """Times one config; returns its record (times, errors, bytes, profile)."""
    import torch.nn.functional as F

    from bc_fast import FusedTransform, Layer
    from bc_fast.engine.fusion import apply_layers_reference, fuse_chain

    rng = np.random.default_rng(0)
    dev = "cuda"
    notes: list[str] = []
    compile_fn = None
    calls = 1
    if name == "l2_256":
        dt, d_in = torch.float16, 256
        w, b = random_weights(rng, 256, 256)
        layers, normalize = [Layer(w, b)], True
        W, B = torch.tensor(w, device=dev, dtype=dt), torch.tensor(b, device=dev, dtype=dt)
        tmp = torch.empty((rows, 256), device=dev, dtype=dt)
        ref_out = torch.empty((rows, 256), device=dev, dtype=dt)

        def eager() -> Any:
            torch.addmm(B, x, W.t(), out=tmp)
            return F.normalize(tmp, dim=1, out=ref_out)

        compile_fn = lambda xx: F.normalize(F.linear(xx, W, B), dim=1)
    elif name == "mlp_gelu":
        dt, d_in = torch.float16, 256
        (w1, b1), (w2, b2) = random_weights(rng, 1024, 256), random_weights(rng, 256, 1024)
        layers, normalize = [Layer(w1, b1, "gelu"), Layer(w2, b2)], False
        W1, B1 = torch.tensor(w1, device=dev, dtype=dt), torch.tensor(b1, device=dev, dtype=dt)
        W2, B2 = torch.tensor(w2, device=dev, dtype=dt), torch.tensor(b2, device=dev, dtype=dt)
        h = torch.empty((rows, 1024), device=dev, dtype=dt)
        ref_out = torch.empty((rows, 256), device=dev, dtype=dt)

        def eager() -> Any:
            torch.addmm(B1, x, W1.t(), out=h)
            torch.ops.aten.gelu_(h)
            return torch.addmm(B2, h, W2.t(), out=ref_out)

        compile_fn = lambda xx: F.linear(F.gelu(F.linear(xx, W1, B1)), W2, B2)
    elif name.startswith("affine"):
        d_in, d_out = (1024, 768) if name.startswith("affine1024") else (768, 768)
        dt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name.rsplit("_", 1)[1]]
        w, b = random_weights(rng, d_out, d_in)
        layers, normalize = [Layer(w, b)], False
        W, B = torch.tensor(w, device=dev, dtype=dt), torch.tensor(b, device=dev, dtype=dt)
        ref_out = torch.empty((rows, d_out), device=dev, dtype=dt)

        def eager() -> Any:
            return torch.addmm(B, x, W.t(), out=ref_out)
    elif name == "chain4":
        dt, d_in = torch.float16, 384
        steps = [[Layer(*random_weights(rng, 384, 384))] for _ in range(4)]
        layers, normalize = fuse_chain(steps), False
        Ws = [(torch.tensor(np.asarray(s[0].weight), device=dev, dtype=dt),
               torch.tensor(np.asarray(s[0].bias), device=dev, dtype=dt)) for s in steps]
        bufs = [torch.empty((rows, 384), device=dev, dtype=dt) for _ in range(2)]
        ref_out = bufs[1]

        def eager() -> Any:
            y = x
            for i, (W, B) in enumerate(Ws):
                y = torch.addmm(B, y, W.t(), out=bufs[i % 2])
            return y
    elif name == "batch1":
        dt, d_in = torch.float32, 256
        w, b = random_weights(rng, 256, 256)
        layers, normalize = [Layer(w, b)], False
        W, B = torch.tensor(w, device=dev), torch.tensor(b, device=dev)
        ref_out = torch.empty((1, 256), device=dev)
        calls = 2000

        def eager() -> Any:
            return torch.addmm(B, x, W.t(), out=ref_out)
    else:
        raise SystemExit(f"gpu_kernels: unknown config {name!r}; known: {', '.join(ROWS)}")

    op = FusedTransform(layers, normalize=normalize)
    x = torch.randn((rows, d_in), device=dev, dtype=torch.float32).to(dt)
    out = torch.empty((rows, op.d_out), device=dev, dtype=dt)
    fns: dict[str, Callable[[], Any]] = {"bc_fast": lambda: op.apply(x, out=out), "torch eager": eager}
    op.apply(x, out=out)  # builds op._cuda_op
    dname, sm90 = str(dt).removeprefix("torch."), torch.cuda.get_device_capability() == (9, 0)
    paths = list(op._cuda_op.layer_paths(dname, dname, sm90)) if getattr(op, "_cuda_op", None) is not None else []
    variant_fns = _sm90_variant_fns(op, x, out, dname, sm90, SM90_VARIANTS if variants is None else variants) \
        if paths else {}
    fns.update(variant_fns)
    if compile_fn is not None and compile_on:
        c, why = _compiled(torch, compile_fn, x)
        if c is None:
            notes.append(why)
        else:
            fns["torch.compile"] = c
    times = time_gpu_interleaved(torch, fns, samples=samples, calls=calls, wall=name == "batch1")
    # Correctness on sampled rows, against float64.
    op.apply(x, out=out)
    torch.cuda.synchronize()
    idx = np.unique(np.linspace(0, rows - 1, min(rows, 2048)).astype(np.int64))
    ti = torch.as_tensor(idx, device=dev)
    ref = apply_layers_reference(layers, x[ti].float().cpu().numpy().astype(np.float64))
    if normalize:
        ref = ref / np.maximum(np.linalg.norm(ref, axis=1, keepdims=True), 1e-12)
    err = _row_err(out[ti], ref)
    base_err = _row_err(eager()[ti], ref)
    variant_recs = {}
    for k, fn in variant_fns.items():
        fn()
        torch.cuda.synchronize()
        variant_recs[k] = {"median_s": times.pop(k), "max_row_err": _row_err(out[ti], ref)}
    best_name = min((k for k in times if k != "bc_fast"), key=lambda k: times[k])
    rec = {"config": name, "rows": rows, "dtype": str(dt).removeprefix("torch."), "median_s": times,
           "best_baseline": best_name, "speedup": times[best_name] / times["bc_fast"],
           "bytes": rows * (d_in + op.d_out) * x.element_size(), "max_row_err": err,
           "eager_max_row_err": base_err, "notes": notes, "paths": paths, "sm90_variants": variant_recs,
           "loadavg1": os.getloadavg()[0]}
    if profile_on and name != "batch1":
        try:
            rec["profile"] = {"bc_fast": _profile(torch, fns["bc_fast"]), best_name: _profile(torch, fns[best_name])}
        except Exception as e:  # noqa: BLE001 (the profiler is an aid; its failure must not lose the timings)
            notes.append(f"profiler failed: {type(e).__name__}: {e}")
    return rec


TARGETS = {  # config: [(what, predicate over (record, copy_bw))]
    "l2_256": [(">= 70 % copy bw", lambda r, bw: r["bytes"] / r["median_s"]["bc_fast"] >= 0.7 * bw),
               (">= 1.5x torch.compile", lambda r, bw: "torch.compile" in r["median_s"] and
                r["median_s"]["torch.compile"] / r["median_s"]["bc_fast"] >= 1.5)],
    "mlp_gelu": [(">= 1.5x eager", lambda r, bw: r["median_s"]["torch eager"] / r["median_s"]["bc_fast"] >= 1.5),
                 (">= 1.0x torch.compile", lambda r, bw: "torch.compile" in r["median_s"] and
                  r["median_s"]["torch.compile"] / r["median_s"]["bc_fast"] >= 1.0)],
    "affine1024x768_fp16": [(">= 1.0x addmm", lambda r, bw: r["speedup"] >= 1.0)],
    "affine1024x768_bf16": [(">= 1.0x addmm", lambda r, bw: r["speedup"] >= 1.0)],
    "affine768_fp32": [(">= 1.0x addmm", lambda r, bw: r["speedup"] >= 1.0)],
    "chain4": [(">= 3x step by step", lambda r, bw: r["speedup"] >= 3.0)],
    "batch1": [("<= 1.0x addmm wall", lambda r, bw: r["speedup"] >= 1.0)],
}


def _fmt_t(s: float) -> str:
    return f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms"


def report(records: list[dict], bw: float, status: dict | None = None) -> str:
    """The profiles, then the summary table and the targets line (with :func:`status_line`: complete or partial)."""
    lines: list[str] = []
    for r in records:
        for impl, rows in r.get("profile", {}).items():
            lines.append(f"### {r['config']}: {impl}, one call, GPU kernels")
            lines += [f"  {p['us']:>9.1f} us {100 * p['share']:5.1f} %  x{p['calls']:<3d} {p['kernel']}" for p in rows]
    lines.append("")
    lines.append(f"device copy bandwidth (read + write): {bw / 1e12:.2f} TB/s")
    lines.append("| config | rows | bc_fast | torch eager | torch.compile | speed-up vs best | % copy bw | row err (eager) | paths | targets |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    met = total = 0
    for r in records:
        t = r["median_s"]
        res = []
        for what, pred in TARGETS[r["config"]]:
            ok = bool(pred(r, bw))
            met += ok
            total += 1
            res.append(f"{what}: {'met' if ok else 'MISS'}")
        frac = r["bytes"] / t["bc_fast"] / bw
        lines.append(f"| {r['config']} ({r['dtype']}) | {r['rows']} | {_fmt_t(t['bc_fast'])} | "
                     f"{_fmt_t(t['torch eager'])} | {_fmt_t(t['torch.compile']) if 'torch.compile' in t else '-'} | "
                     f"{r['speedup']:.2f}x ({r['best_baseline']}) | {100 * frac:.0f} % | "
                     f"{r['max_row_err']:.1e} ({r['eager_max_row_err']:.1e}) | {'+'.join(r['paths'])} | "
                     f"{'; '.join(res)} |")
        for v, vr in r.get("sm90_variants", {}).items():
            vt = vr["median_s"]
            lines.append(f"|  {v}: {_fmt_t(vt)}, {100 * r['bytes'] / vt / bw:.0f} % copy bw, "
                         f"{t['bc_fast'] / vt:.2f}x the default kernel, row err {vr['max_row_err']:.1e} |")
        for n in r["notes"]:
            lines.append(f"|  note: {n} |")
    lines.append(f"# {met}/{total} kernel targets met" + (f"; {status_line(status)}" if status else ""))
    return "\n".join(lines)


def _args(argv: list[str] | None) -> argparse.Namespace:
    """The options; ``names`` (the planned configs) and ``variant_list`` checked here, before any GPU work."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller batches (the GPU check's setting)")
    ap.add_argument("--only", default="", help="comma-separated configs (default: all)")
    ap.add_argument("--samples", type=int, default=0, help="timed rounds per implementation (default 11, quick 7)")
    ap.add_argument("--no-profile", action="store_true", help="skip the per-kernel tables")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    ap.add_argument("--variants", default=",".join("/".join(v) for v in SM90_VARIANTS),
                    help="comma-separated SCHEDULE/STORE variants of the fused sm90 kernel timed beside the "
                         "default (default: all; '' for none; bench/gpu_check.sh passes those that "
                         "bench/sm90_variant_check.py found correct)")
    ap.add_argument("--json", default="", help="also write the records here (rewritten after every config)")
    args = ap.parse_args(argv)
    args.names = list(dict.fromkeys(n for n in args.only.split(",") if n)) or list(ROWS)
    unknown = [n for n in args.names if n not in ROWS]
    if unknown:
        ap.error(f"unknown config(s) {', '.join(unknown)}; known: {', '.join(ROWS)}")
    args.variant_list = [tuple(v.split("/")) for v in args.variants.split(",") if v]
    bad = [v for v in args.variant_list if v not in SM90_VARIANTS]
    if bad:
        ap.error(f"unknown variant(s) {', '.join('/'.join(v) for v in bad)}; known: "
                 f"{', '.join('/'.join(v) for v in SM90_VARIANTS)}")
    return args


def _status(names: list[str], records: list[dict], errors: list[dict], finished: bool) -> dict:
    """:func:`run_status` of the run so far (configs not in ``--only`` are left out: partial)."""
    return run_status(names, [r["config"] for r in records], [e["config"] for e in errors], finished=finished,
                      known=list(ROWS))


def main(argv: list[str] | None = None) -> int:
    """Runs the configs and prints the report."""
    args = _args(argv)
    torch = _setup()
    torch.backends.cuda.matmul.allow_tf32 = False  # bc_fast's fp32 GEMMs are true fp32: compare like with like
    samples = args.samples or (7 if args.quick else 11)
    props = torch.cuda.get_device_properties(0)
    info = machine_info({"mode": "quick" if args.quick else "full"})
    print(f"# {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}; {samples} samples, "
          f"medians; host {info['cpu_model']}, loadavg {info['loadavg']}", flush=True)
    for line in machine_lines(info):
        print(line, flush=True)
    records: list[dict] = []
    errors: list[dict] = []
    state: dict = {"device": props.name, "machine": info, "samples": samples, "copy_bandwidth": None,
                   "records": records, "errors": errors}

    def save(finished: bool) -> None:  # after every config: a later crash keeps what was measured, marked partial
        if args.json:
            atomic_write_json(args.json, {**state, **_status(args.names, records, errors, finished)})

    save(False)
    state["copy_bandwidth"] = bw = _copy_bandwidth(torch, samples)
    for n in args.names:
        t0 = time.perf_counter()
        try:
            records.append(run_config(torch, n, ROWS[n][1 if args.quick else 0], samples, not args.no_profile,
                                      not args.no_compile, args.variant_list))
        except Exception as e:  # noqa: BLE001 - recorded and reported; the other configs still run
            errors.append({"config": n, "error": f"{type(e).__name__}: {e}", "loadavg1": os.getloadavg()[0]})
            print(f"# {n}: FAILED: {errors[-1]['error']}", flush=True)
        torch.cuda.empty_cache()  # the config's tensors died with run_config
        print(f"# {n}: {time.perf_counter() - t0:.1f} s", flush=True)
        save(False)
    save(True)
    print(report(records, bw, _status(args.names, records, errors, True)))
    print(f"# host loadavg now {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
