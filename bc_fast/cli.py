"""The ``bc-fast`` command. It only parses arguments; the work lives in the library."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .convert_cli import add_convert_parser


def _cmd_info(args: argparse.Namespace) -> int:
    from . import __version__, build_info

    print(json.dumps({"bc_fast": __version__, **build_info()}, indent=2))
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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``bc-fast``."""
    parser = argparse.ArgumentParser(prog="bc-fast", description="Backward-compatible embeddings, fused and fast.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="print how the compiled core was built and what it picked")
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

    add_convert_parser(sub)

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
    except (ValueError, TypeError, OSError, ImportError) as e:
        print(f"bc-fast {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
