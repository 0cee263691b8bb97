"""Consumer (unintended) tasks: MLPs trained ONCE on version-0 embeddings, scored on later versions.

The five tasks of the paper, built as the reference (snap-stanford/bc-emb
``embevolve/unintended_tasks``) does, plus item genre prediction. For the split of
version k (train up to t_k, validation ``(t_k, t_{k+1}]``):

=======================  ======  ==========================================================
task                     input   label
=======================  ======  ==========================================================
edge-rating              (u, i)  validation edge rated >= 4 (training: version-0 train edges)
user-activity            u       the user has a validation edge
user-positive-activity   u       the user's best validation rating is >= 4
item-rating-avg          i       mean rating (train + val edges, items with >= 10) >= version-0 median
item-rating-std          i       rating std (ddof 1, items with >= 10 ratings) >= 1
item-genre               i       multi-hot genres (macro ROC-AUC); held-out and newly arrived items
=======================  ======  ==========================================================

Every consumer is trained on version-0 embeddings (M_0 on G_0) and early-stopped on
``stop_version`` with the reference (fix-m0) embeddings -- version 0 for edge and item
tasks, version 1 for the user-activity tasks (whose version-0 labels are the training
labels) -- and scored with ROC-AUC on the versions in ``score_versions`` (k >= 1, or k >= 2
for the activity tasks), exactly the reference's bookkeeping. Item-genre (not in the
reference) scores the same held-out items at every version, so it early-stops on its own
stop items instead (:attr:`ConsumerTask.stop_examples`): version-0 items neither trained on
nor ever scored.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..data.movielens import InteractionData, VersionSplit
from .bootstrap import auc_placements
from .metrics import roc_auc, roc_auc_macro

__all__ = [
    "CONSUMER_TASKS",
    "ConsumerTask",
    "ConsumerMLP",
    "build_consumer_tasks",
    "task_features",
    "train_consumers",
    "score_consumers",
    "restrict_examples",
    "consumer_placements",
]

CONSUMER_TASKS = ("edge-rating", "user-activity", "user-positive-activity", "item-rating-avg",
                  "item-rating-std", "item-genre")



@dataclass
class ConsumerTask:
    """One consumer task over all versions.

    Attributes
    ----------
    name : str
    entity : {"edge", "user", "item"}
    out_dim : int
        1 for binary tasks, the number of labels for item-genre.
    train_idx, train_y : ndarray
        Version-0 training examples: ``idx`` is (2, n) [users; items] for edges, else (n,).
    examples : list of (idx, y) per version
    stop_version : int
        Version whose examples (with the reference embeddings) early-stop training.
    score_versions : list of int
        Versions averaged in the unintended-task score.
    stop_examples : (idx, y), optional
        Examples that early-stop training instead of ``examples[stop_version]`` (item-genre:
        items outside the training and the scored examples).
    """

    name: str
    entity: str
    out_dim: int
    train_idx: np.ndarray
    train_y: np.ndarray
    examples: list[tuple[np.ndarray, np.ndarray]]
    stop_version: int
    score_versions: list[int]
    stop_examples: tuple[np.ndarray, np.ndarray] | None = None

    def stop_set(self) -> tuple[np.ndarray, np.ndarray]:
        """The ``(idx, y)`` examples that early-stop training (on ``stop_version``'s reference embeddings)."""
        return self.examples[self.stop_version] if self.stop_examples is None else self.stop_examples


def _item_stats(item: np.ndarray, rating: np.ndarray, n_items: int, min_count: int):
    cnt = np.bincount(item, minlength=n_items).astype(np.float64)
    s1 = np.bincount(item, weights=rating, minlength=n_items)
    s2 = np.bincount(item, weights=rating.astype(np.float64) ** 2, minlength=n_items)
    keep = np.nonzero(cnt >= min_count)[0]
    mean = s1[keep] / cnt[keep]
    var = (s2[keep] - cnt[keep] * mean ** 2) / (cnt[keep] - 1)
    return keep, mean, np.sqrt(np.maximum(var, 0.0))


def build_consumer_tasks(data: InteractionData, splits: Sequence[VersionSplit],
                         tasks: Sequence[str] = CONSUMER_TASKS, *, min_item_ratings: int = 10,
                         genre_holdout: float = 0.2, genre_stop: float = 0.1, seed: int = 0) -> list[ConsumerTask]:
    """Build the consumer tasks from the version splits (``splits[k]`` is version k's split).

    ``genre_holdout`` and ``genre_stop`` are the fractions of the labelled version-0 items
    that item-genre scores (with the newly arrived items) and early-stops on; the rest trains.

    Raises
    ------
    ValueError
        On an unknown task name, fewer than 2 versions, or item-genre without item labels or
        with genre fractions outside (0, 1) that leave no training items.
    """
    unknown = [t for t in tasks if t not in CONSUMER_TASKS]
    if unknown:
        raise ValueError(f"unknown consumer task(s) {unknown}; expected some of {CONSUMER_TASKS}")
    K = len(splits)
    if K < 2:
        raise ValueError(f"consumer tasks need at least 2 versions, got {K}")
    out: list[ConsumerTask] = []
    s0 = splits[0]
    for name in tasks:
        if name == "edge-rating":
            tr = (np.stack([s0.train_user, s0.train_item]), (s0.train_rating >= 4).astype(np.float32))
            ex = [(np.stack([s.val_user, s.val_item]), (s.val_rating >= 4).astype(np.float32)) for s in splits]
            out.append(ConsumerTask(name, "edge", 1, tr[0], tr[1], ex, 0, list(range(1, K))))
        elif name in ("user-activity", "user-positive-activity"):
            ex = []
            for s in splits:
                if name == "user-activity":
                    y = np.zeros(s.num_users, np.float32)
                    y[s.val_user] = 1.0
                else:
                    best = np.zeros(s.num_users, np.float64)
                    np.maximum.at(best, s.val_user, s.val_rating)
                    y = (best >= 4).astype(np.float32)
                ex.append((np.arange(s.num_users), y))
            out.append(ConsumerTask(name, "user", 1, ex[0][0], ex[0][1], ex, 1, list(range(2, K))))
        elif name in ("item-rating-avg", "item-rating-std"):
            keep0, mean0, std0 = _item_stats(s0.train_item, s0.train_rating, s0.num_items,
                                             min_item_ratings)
            thresh = float(np.median(mean0))
            tr_y = (mean0 >= thresh) if name == "item-rating-avg" else (std0 >= 1.0)
            ex = []
            for s in splits:
                it = np.concatenate([s.train_item, s.val_item])
                ra = np.concatenate([s.train_rating, s.val_rating])
                keep, mean, std = _item_stats(it, ra, s.num_items, min_item_ratings)
                y = (mean >= thresh) if name == "item-rating-avg" else (std >= 1.0)
                ex.append((keep, y.astype(np.float32)))
            out.append(ConsumerTask(name, "item", 1, keep0, tr_y.astype(np.float32), ex, 0, list(range(1, K))))
        elif name == "item-genre":
            out.append(_item_genre_task(data, splits, genre_holdout, genre_stop, seed))
    return out


def _item_genre_task(data: InteractionData, splits: Sequence[VersionSplit], holdout: float, stop: float,
                     seed: int) -> ConsumerTask:
    """Item-genre: train / stop / held split of the labelled version-0 items; held and new items are scored.

    One uniform draw per item (generator ``seed``): below ``holdout`` held (scored at every
    version, with the items that arrived after version 0), in ``[holdout, holdout + stop)``
    the early-stopping items (never scored), the rest trains the consumer.
    """
    if data.item_labels is None:
        raise ValueError("item-genre needs item labels (InteractionData.item_labels is None)")
    if not (0 < holdout < 1 and 0 < stop < 1 and holdout + stop < 1):
        raise ValueError(f"genre_holdout={holdout} and genre_stop={stop} must be in (0, 1) with a sum below 1 "
                         "(the rest of the items trains item-genre)")
    lab = data.item_labels
    has = lab.sum(1) > 0
    s0 = splits[0]
    items0 = np.nonzero(has[: s0.num_items])[0]
    u = np.random.default_rng(seed).random(items0.shape[0])
    held, stop_items = items0[u < holdout], items0[(u >= holdout) & (u < holdout + stop)]
    train_items = items0[u >= holdout + stop]
    ex = []
    for s in splits:
        new = np.arange(s0.num_items, s.num_items)
        idx = np.concatenate([held, new[has[new]]])
        ex.append((idx, lab[idx]))
    return ConsumerTask("item-genre", "item", lab.shape[1], train_items, lab[train_items], ex, 0,
                        list(range(1, len(splits))), stop_examples=(stop_items, lab[stop_items]))


def task_features(task: ConsumerTask, emb: "tuple[np.ndarray, np.ndarray]", idx: np.ndarray) -> np.ndarray:
    """Input rows of ``task`` for examples ``idx`` from one version's ``(user_emb, item_emb)``."""
    u, i = emb
    if task.entity == "edge":
        return np.concatenate([u[idx[0]], i[idx[1]]], axis=1).astype(np.float32)
    if task.entity == "user":
        return np.asarray(u[idx], dtype=np.float32)
    return np.asarray(i[idx], dtype=np.float32)


class ConsumerMLP(nn.Module):
    """The reference consumer head: Linear-BN-ReLU-Dropout-Linear-BN-Dropout-Linear."""

    def __init__(self, d_in: int, hidden: int = 128, out_dim: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.d_in = int(d_in)
        self.mlp = nn.Sequential(
            nn.Linear(d_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.Dropout(dropout),
            nn.Linear(hidden, out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


def _auc(task: ConsumerTask, y: np.ndarray, s: np.ndarray) -> float:
    try:
        if task.out_dim == 1:
            return roc_auc(y.reshape(-1), s.reshape(-1))
        return roc_auc_macro(y, s)
    except ValueError:
        return float("nan")


def _predict(model: ConsumerMLP, x: np.ndarray) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def train_consumers(tasks: Sequence[ConsumerTask], reference: Sequence["tuple[np.ndarray, np.ndarray]"], *,
                    seeds: Sequence[int] = (0, 1, 2), epochs: int = 30, hidden: int = 128, dropout: float = 0.0,
                    batch_size: int = 2048, lr: float = 1e-3) -> dict[str, list[ConsumerMLP]]:
    """Train every task's MLP once per seed on version-0 embeddings (``reference[0]``).

    ``reference[k]`` are the fix-m0 embeddings of version k (M_0 on G_k); the state with the
    best ROC-AUC of :meth:`ConsumerTask.stop_set` on ``reference[task.stop_version]`` is kept.
    """
    models: dict[str, list[ConsumerMLP]] = {}
    for task in tasks:
        x = torch.from_numpy(task_features(task, reference[0], task.train_idx))
        y = torch.from_numpy(task.train_y.reshape(len(task.train_y), -1).astype(np.float32))
        sidx, sy = task.stop_set()
        xs = task_features(task, reference[task.stop_version], sidx)
        loss_fn = nn.BCEWithLogitsLoss()
        models[task.name] = []
        for seed in seeds:
            g = torch.Generator().manual_seed(int(seed))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(seed))
                model = ConsumerMLP(x.shape[1], hidden, task.out_dim, dropout)
            opt = torch.optim.Adam(model.parameters(), lr=lr)
            best, best_state = -np.inf, None
            n = x.shape[0]
            for _ in range(epochs):
                model.train()
                perm = torch.randperm(n, generator=g)
                for s in range(0, n, batch_size):
                    b = perm[s:s + batch_size]
                    if b.shape[0] < 2:  # batch norm needs two rows
                        continue
                    loss = loss_fn(model(x[b]), y[b])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                auc = _auc(task, sy, _predict(model, xs))
                if best_state is None or (np.isfinite(auc) and auc > best):
                    best, best_state = auc, copy.deepcopy(model.state_dict())
            model.load_state_dict(best_state)
            model.eval()
            models[task.name].append(model)
    return models


def score_consumers(tasks: Sequence[ConsumerTask], models: dict[str, list[ConsumerMLP]],
                    embeddings: Sequence["tuple[np.ndarray, np.ndarray]"]) -> dict[str, np.ndarray]:
    """ROC-AUC of every task, seed and version: ``{task: array (n_seeds, n_versions)}``.

    ``embeddings[k]`` are version k's embeddings as a version-0 consumer sees them
    (after the backward transforms). Versions outside ``score_versions`` are scored too
    (for plots) but not averaged in the unintended score.
    """
    out = {}
    for task in tasks:
        if len(embeddings) != len(task.examples):
            raise ValueError(f"got embeddings of {len(embeddings)} versions, task {task.name!r} has {len(task.examples)}")
        d0 = models[task.name][0].d_in
        res = np.full((len(models[task.name]), len(embeddings)), np.nan)
        for k, emb in enumerate(embeddings):
            idx, y = task.examples[k]
            if len(y) == 0:
                continue
            xk = task_features(task, emb, idx)
            if xk.shape[1] != d0:
                raise ValueError(f"version {k} embeddings give {xk.shape[1]} features for task {task.name!r}, "
                                 f"the consumer was trained on {d0}; map them to version 0 first")
            for j, model in enumerate(models[task.name]):
                res[j, k] = _auc(task, y, _predict(model, xk))
        out[task.name] = res
    return out


def restrict_examples(task: ConsumerTask, excluded_users: Sequence[np.ndarray]) -> ConsumerTask:
    """``task`` with the examples of ``excluded_users[k]`` dropped from version k (user and edge tasks).

    The held-out protocol scores consumers only on users outside each slice's selection half;
    item tasks are returned unchanged (no item takes part in model selection).
    """
    if task.entity == "item":
        return task
    if len(excluded_users) != len(task.examples):
        raise ValueError(f"got excluded users for {len(excluded_users)} versions, task {task.name!r} has {len(task.examples)}")
    examples = []
    for (idx, y), ex in zip(task.examples, excluded_users):
        users = idx[0] if task.entity == "edge" else idx
        keep = ~np.isin(users, ex)
        examples.append((idx[:, keep] if task.entity == "edge" else idx[keep], y[keep]))
    return replace(task, examples=examples)


def consumer_placements(tasks: Sequence[ConsumerTask], models: dict[str, list[ConsumerMLP]],
                        embeddings: Sequence["tuple[np.ndarray, np.ndarray]"]) -> dict[str, dict[int, np.ndarray]]:
    """Per-example AUC placement values of every task's scored versions, averaged over consumer seeds.

    ``{task: {version: values (n_examples,)}}``: the plain mean of ``values`` is the seed-averaged
    ROC-AUC (macro over label columns for multi-label tasks); resampling the examples gives the
    linearised AUC of the resample (see :func:`bc_fast.eval.bootstrap.auc_placements`). A version
    where the AUC is undefined (one class only) is left out.
    """
    out: dict[str, dict[int, np.ndarray]] = {}
    for task in tasks:
        out[task.name] = {}
        for k in task.score_versions:
            idx, y = task.examples[k]
            if len(y) == 0:
                continue
            xk = task_features(task, embeddings[k], idx)
            y2 = y.reshape(len(y), -1)
            cols = [j for j in range(y2.shape[1]) if 0 < y2[:, j].sum() < y2.shape[0]]
            if not cols:
                continue
            acc = np.zeros(len(y))
            for model in models[task.name]:
                pred = _predict(model, xk).reshape(len(y), -1)
                for j in cols:
                    acc += auc_placements(y2[:, j], pred[:, j])[0] / len(cols)
            out[task.name][k] = acc / len(models[task.name])
    return out
