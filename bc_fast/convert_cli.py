"""The ``bc-fast convert`` subcommand: argument parsing only; the work is
:func:`bc_fast.convert.convert_table`.

Wire it from ``bc_fast/cli.py``::

    from .convert_cli import add_convert_parser
    add_convert_parser(subparsers)          # sets func=convert_main
    ...
    args = parser.parse_args(argv)
    return args.func(args)
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["add_convert_parser", "convert_main"]


def add_convert_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``convert`` subcommand to an ``argparse`` subparsers object; returns its parser."""
    p = subparsers.add_parser(
        "convert",
        help="convert an embedding table to an older version (out of core, resumable)",
        description="Stream an embedding table (.npy, a directory of .npy shards, or Parquet with a "
                    "fixed-size-list column) from version FROM to version TO through the fused chain. "
                    "Output goes to OUTPUT.partial and is renamed when complete; a sidecar "
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
    p.add_argument("--threads", type=int, default=None, help="compute threads (default: all cores)")
    p.add_argument("--chunk-rows", type=int, default=None,
                   help="rows per chunk (default: ~16 MiB per chunk); memory is about 4 chunks")
    p.add_argument("--resume", action="store_true", help="continue a killed run from its journal")
    p.add_argument("--verify", type=int, default=0, metavar="N",
                   help="check N random rows against the step-by-step chain before publishing")
    p.add_argument("--column", default=None, help="Parquet embedding column (default: the only fixed-size-list one)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT when the new one is complete")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no summary")
    p.set_defaults(func=convert_main)
    return p


def convert_main(args: argparse.Namespace) -> int:
    """Run ``bc-fast convert`` from parsed arguments; returns the exit status."""
    from .convert import convert_table

    try:
        result = convert_table(
            args.input, args.output, registry=args.registry, src=args.src, dst=args.dst,
            normalize=args.normalize, dtype=args.dtype, threads=args.threads, chunk_rows=args.chunk_rows,
            resume=args.resume, verify=args.verify, column=args.column, overwrite=args.overwrite,
            progress=False if args.quiet else None)
    except KeyboardInterrupt:
        return 130
    except (ValueError, TypeError, OSError, ImportError, RuntimeError) as e:
        print(f"bc-fast convert: error: {e}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(result.summary(), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m bc_fast.convert_cli ...``) until the main CLI wires it."""
    parser = argparse.ArgumentParser(prog="bc-fast")
    add_convert_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
