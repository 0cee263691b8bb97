"""precision="bf16" alone: bc_fast bf16 vs torch bf16 addmm(out=) and bc_fast fp32, d = 256 and 768.

    python bench/bench_bf16.py [--quick] [--threads N] [--json PATH]

The suite's bf16 configs (:func:`bc_fast.benchmark.run_bf16_bench`, also part of
``bc-fast bench``): 100,000 rows (``--quick``: 50,000 at d=256, 20,000 at d=768), medians of
interleaved rounds, preallocated outputs. Prints one ``key=value`` line per (config, impl)
and a table; say in any report how loaded the machine was (the load average is printed).
"""

from __future__ import annotations

import sys

from bc_fast._benchtools import script_args
from bc_fast.benchmark import run_bf16_bench


def main(argv: list[str] | None = None) -> int:
    args = script_args(__doc__, argv)
    run_bf16_bench(None, quick=args.quick, tiny=args.tiny, threads=args.threads, json_path=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
