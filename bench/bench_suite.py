"""The issue-6 benchmark suite, standalone: bc_fast vs numpy, torch and faiss, one table.

    python bench/bench_suite.py [--quick] [--out DIR] [--threads N] [--bf16]

A thin wrapper over :func:`bc_fast.bench.suite.run_bench_suite` (the same code as
``bc-fast bench``): prints the machine, one ``key=value`` line per (config, impl),
then a table of medians, ratios and PASS/MISS per target, and writes
``DIR/bench.json`` and ``DIR/bench.png``. ``--quick`` takes under a minute on 2 vCPUs.
``--bf16`` runs only the ``precision="bf16"`` configs (:func:`bc_fast.bench.suite.run_bf16_bench`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bc_fast.bench.suite import run_bench_suite, run_bf16_bench


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller batches, fewer samples (< 1 minute)")
    p.add_argument("--out", default="bench_out", help="output directory for bench.json and bench.png")
    p.add_argument("--threads", type=int, default=None, help="threads for every engine (default: all cores)")
    p.add_argument("--bf16", action="store_true",
                   help="only the precision='bf16' configs (d=256 and 768 vs torch bf16 addmm and bc_fast fp32)")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # smoke-test sizes
    args = p.parse_args(argv)
    run = run_bf16_bench if args.bf16 else run_bench_suite
    run(Path(args.out), quick=args.quick, tiny=args.tiny, threads=args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
