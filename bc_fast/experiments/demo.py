"""The end-to-end demo behind ``bc-fast demo``: train, register, fuse, convert, serve a legacy index."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..eval.report import write_json

#: What ``bc-fast demo`` trains (``bc-fast experiment`` runs all eight): the two references,
#: the post-hoc baseline and BC-Aligner -- half the training time of the full list.
DEMO_STRATEGIES = ("fix-m0", "nobc", "posthoc-sloss", "joint-mloss")


def load_user_interactions(path: str | Path, *, items: str | Path | None = None, columns: str | None = None,
                           log: Callable[[str], None] = print) -> tuple[Any, dict]:
    """Interactions from the user's file (``--data``) and the experiment overrides they imply.

    Without a label column the item-genre consumer task cannot be trained: it is left out of
    ``consumer_tasks`` (returned in the overrides) and ``log`` says so.
    """
    from ..data.interactions import load_interactions
    from .config import ALL_TASKS

    data = load_interactions(path, items=items, columns=columns)
    overrides: dict = {}
    if data.item_labels is None:
        overrides["consumer_tasks"] = tuple(t for t in ALL_TASKS if t != "item-genre")
        log("no label column (label= in --columns): the item-genre consumer task is skipped")
    return data, overrides


def _save_registry(path: Path, artifacts: dict, *, name: str, kind: str) -> Any:
    """A new registry of BC-Aligner's versions (dim, selection score) and B_k layers from the artifacts.

    From the exported layers rather than the trainer, so that a resumed run (whose first seed
    was restored from its checkpoint) serves the same registry.
    """
    from ..store.registry import Registry

    reg = Registry.create(path, name=name)
    for k, dim in enumerate(artifacts["dims"]):
        meta = {"strategy": "joint-mloss"}
        if artifacts["scores"][k] is not None:
            meta["score"] = float(artifacts["scores"][k])
        reg.add_version(k, dim=int(dim), metadata=meta, backward=artifacts["layers"][k - 1] if k else None,
                        kind=kind if k else None)
    return reg


def run_demo_pipeline(out_dir: str | Path, seed: int = 0, quick: bool = True,
                      log: Callable[[str], None] | None = print, *, data: Any = None, **overrides: Any) -> dict:
    """Run the reference experiment, then serve version 0 from the latest BC-Aligner embeddings.

    After training (see :func:`bc_fast.experiments.run_demo`; with ``seeds > 1`` the first seed's
    models are served) the BC-Aligner chain
    B_1 ... B_K is saved in a version registry, fused into one operator, the latest
    item table is converted to version 0 through it (``bc_fast.convert``), and a
    version-0 faiss index built from the latest embeddings is compared with the true
    version-0 index, next to nobc (which truncates the latest embeddings instead).

    ``data`` (default: MovieLens latest-small) and ``overrides`` (any
    :class:`bc_fast.experiments.ExperimentConfig` field, e.g. ``device="cuda"``; default "auto",
    CUDA when torch sees a GPU) go to :func:`bc_fast.experiments.run_demo`. The device the models
    trained on is recorded as ``results["device"]`` (and in ``results.json``).

    Returns the experiment's results with ``pipeline`` (registry, conversion and
    retrieval figures) added; they are also written to ``out_dir/pipeline.json``.
    """
    from ..convert import convert_table
    from ..data import load_movielens
    from .runner import run_demo
    from ..eval.retrieval import format_retrieval_report, legacy_retrieval_report

    from ..train.strategies import get_strategy
    from .config import ExperimentConfig

    # every setting (the device too) is checked before the data is loaded and anything is written
    settings = {k: v for k, v in overrides.items() if k != "resume"}  # run_demo's own keyword
    (ExperimentConfig.quick if quick else ExperimentConfig.full)(seed=seed, **settings).validate()
    names = {get_strategy(x).name for x in overrides.get("strategies", ("nobc", "joint-mloss"))}
    if not {"nobc", "joint-mloss"} <= names:
        raise ValueError(f"the demo serves a legacy index from joint-mloss next to nobc; strategies "
                         f"{sorted(names)} lack {sorted({'nobc', 'joint-mloss'} - names)}: add them")
    out = Path(out_dir)
    data = load_movielens() if data is None else data
    res = run_demo(out, seed=seed, quick=quick, log=log, data=data, **overrides)
    say = log or (lambda s: None)
    art = res["artifacts"]
    bc = art["joint-mloss"]
    K = len(bc["dims"]) - 1

    reg_path = out / "registry"
    if (reg_path / "manifest.json").exists():
        shutil.rmtree(reg_path)  # the demo's own output from an earlier run
    reg = _save_registry(reg_path, bc, name=f"{data.name}-bc-aligner", kind=res["config"]["transform"])
    say("\n" + reg.describe())
    op = reg.operator(K, 0)
    say(f"\nfused chain v{K} -> v0: {K} backward transforms as one operator {op}")

    latest = np.ascontiguousarray(bc["item"][K], dtype=np.float32)
    src_path, dst_path = out / f"items_v{K}.npy", out / "items_v0_from_latest.npy"
    tmp = src_path.with_suffix(".tmp.npy")
    np.save(tmp, latest)
    tmp.replace(src_path)
    conv = convert_table(src_path, dst_path, registry=reg, dst=0, verify=256, overwrite=True, progress=False)
    say(conv.summary())
    n0 = bc["item"][0].shape[0]
    converted = np.load(dst_path, mmap_mode="r", allow_pickle=False)[:n0]
    true_v0 = bc["item"][0]
    rel_err = float(np.linalg.norm(converted - true_v0) / np.linalg.norm(true_v0))
    say(f"converted version-0 item table vs the true version-0 embeddings: relative error {rel_err:.3f}")

    # Recall of the legacy index on version 0's held-out TEST users only (the protocol's test half)
    split0 = data.split(res["data"]["time_points"][0], res["data"]["time_points"][1])
    test0 = np.isin(split0.val_user, np.asarray(res["raw"]["test_users"][0]))
    pairs = dict(train_pairs=np.stack([split0.train_user, split0.train_item], 1),
                 test_pairs=np.stack([split0.val_user[test0], split0.val_item[test0]], 1))
    strategies = {
        "joint-mloss": {"items": bc["item"], "users": bc["user"], "backward": bc["layers"]},
        "nobc": {"items": art["nobc"]["item"], "users": art["nobc"]["user"], "backward": None},
    }
    retrieval = legacy_retrieval_report(strategies, version=0, k=50, seed=seed, **pairs)
    say("\nversion-0 faiss index served from the latest embeddings:")
    say(format_retrieval_report(retrieval, version=0))

    pipeline = {
        "registry": str(out / "registry"), "registry_checksum": reg.checksum, "fused_operator": repr(op),
        "conversion": {"input": str(src_path), "output": str(dst_path), "rows": int(latest.shape[0]),
                       "relative_error_vs_true_v0": rel_err},
        "retrieval": {name: {k: v for k, v in row.items() if isinstance(v, (int, float, str))}
                      for name, row in retrieval.items()},
    }
    write_json(out / "pipeline.json", pipeline)
    res["pipeline"] = pipeline
    return res
