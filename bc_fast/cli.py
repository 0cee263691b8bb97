"""The ``bc-fast`` command. It only parses arguments; the work lives in the library."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any


def _cmd_info(args: argparse.Namespace) -> int:
    from . import __version__, build_info
    from .cuda import cuda_summary

    info = build_info()
    print(json.dumps({"bc_fast": __version__, **info}, indent=2))
    # The CUDA section in words goes to stderr, so that stdout stays one JSON document.
    for line in cuda_summary(info["cuda"]):
        print(line, file=sys.stderr)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo_pipeline

    run_demo_pipeline(Path(args.out), seed=args.seed, quick=not args.full)
    return 0


def _cmd_registry_show(args: argparse.Namespace) -> int:
    from .registry import show

    print(show(args.path))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .benchmark import run_bench_suite

    run_bench_suite(Path(args.out), quick=args.quick)
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert_table

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = convert_table(
                args.input, args.output, registry=args.registry, src=args.src, dst=args.dst,
                normalize=args.normalize, dtype=args.dtype, threads=args.threads, chunk_rows=args.chunk_rows,
                resume=args.resume, verify=args.verify, verify_tol=args.verify_tol, column=args.column,
                overwrite=args.overwrite, progress=False if args.quiet else None, device=args.device)
        finally:
            for w in caught:
                print(f"bc-fast convert: warning: {w.message}", file=sys.stderr)
    if not args.quiet:
        print(result.summary(), file=sys.stderr)
    return 0


def _add_convert_parser(sub: Any) -> None:
    p = sub.add_parser(
        "convert",
        help="convert an embedding table to an older version (out of core, resumable)",
        description="Stream an embedding table (.npy, a directory of .npy shards, or Parquet with a "
                    "fixed-size-list column) from version FROM to version TO through the fused chain. "
                    "Output goes to OUTPUT.partial and is renamed when complete and verified; a sidecar "
                    "OUTPUT.bcfast.json records the version, the registry checksum and the chain.")
    p.add_argument("input", metavar="INPUT", help="input table: .npy, directory of .npy shards, or .parquet")
    p.add_argument("output", metavar="OUTPUT", help="output table, same form as INPUT (must not exist)")
    p.add_argument("--registry", "-r", required=True, metavar="R", help="version registry directory")
    p.add_argument("--from", dest="src", type=int, default=None, metavar="K",
                   help="version of INPUT (default: the registry's latest)")
    p.add_argument("--to", dest="dst", type=int, required=True, metavar="J", help="target version")
    p.add_argument("--dtype", choices=("float32", "float16"), default=None,
                   help="output dtype (default: the input's)")
    p.add_argument("--normalize", action="store_true", help="L2-normalise the output rows")
    p.add_argument("--threads", type=int, default=None, help="compute threads, 1 to 1024 (default: all cores)")
    p.add_argument("--chunk-rows", type=int, default=None,
                   help="rows per chunk (default: ~16 MiB per chunk); memory is about 4 chunks")
    p.add_argument("--resume", action="store_true",
                   help="continue a killed run from its journal (or finish one killed while publishing)")
    p.add_argument("--verify", type=int, default=256, metavar="N",
                   help="check N random rows against the float64 step-by-step chain before publishing "
                        "(default 256; 0 turns it off)")
    p.add_argument("--verify-tol", type=float, default=None, metavar="TOL",
                   help="largest row-relative error allowed (default: from the dtypes and the chain, "
                        "~2e-5 for float32 output, ~1e-3 for float16)")
    p.add_argument("--column", default=None, help="Parquet embedding column (default: the only fixed-size-list one)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing OUTPUT when the new one is complete; only a table bc_fast wrote "
                        "(with its sidecar; for a folder, only the shards it lists) is ever replaced")
    p.add_argument("--device", default="cpu", metavar="DEV",
                   help="where the transform runs: cpu (default), cuda or cuda:N (needs the CUDA build: "
                        "pip install . -C cmake.define.BC_FAST_CUDA=ON); float16 tables use float16 tensor-core "
                        "GEMMs with float32 accumulation, within the verification tolerance")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no summary")
    p.set_defaults(func=_cmd_convert)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``bc-fast``."""
    parser = argparse.ArgumentParser(prog="bc-fast", description="Backward-compatible embeddings, fused and fast.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="print how the compiled core was built and what it picked (JSON on stdout), "
                                     "and the CUDA module, GPUs and driver (also in words on stderr)")
    p.set_defaults(func=_cmd_info)

    for name, full, help_ in (
        ("demo", False, "quick end-to-end run on MovieLens: train versions, fuse, convert, legacy faiss index"),
        ("experiment", True, "the reference experiment (use --full for the paper-size run)"),
    ):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--out", default=f"bc_fast_{name}", help="output directory (results.json, PNG plots)")
        p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same results)")
        if full:
            p.add_argument("--full", action="store_true", help="full size: more epochs, seeds and dims")
        p.set_defaults(func=_cmd_demo, full=False)

    p = sub.add_parser("registry", help="inspect a version registry")
    rsub = p.add_subparsers(dest="registry_command", required=True)
    show = rsub.add_parser("show", help="print a registry's versions and transforms")
    show.add_argument("path", help="registry directory")
    show.set_defaults(func=_cmd_registry_show)

    _add_convert_parser(sub)

    p = sub.add_parser("bench", help="benchmark the core against numpy, torch and faiss; table, JSON and PNG")
    p.add_argument("--quick", action="store_true", help="smaller sizes and fewer samples (under a minute)")
    p.add_argument("--out", default="bc_fast_bench", help="output directory (bench.json, bench.png)")
    p.set_defaults(func=_cmd_bench)

    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``bc-fast`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except (ValueError, TypeError, OSError, ImportError, RuntimeError) as e:
        print(f"bc-fast {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
