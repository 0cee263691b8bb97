"""Settings of the reference experiment: :class:`ExperimentConfig`, its presets, strategy and task lists.

What lives here: the eight strategies (:data:`ALL_STRATEGIES`; :data:`LAMBDA_STRATEGIES`, those
whose alignment weight a lambda sweep may change), the six consumer tasks (:data:`ALL_TASKS`)
and :class:`ExperimentConfig` with its presets ``ExperimentConfig.quick()`` (the demo) and
``.full()``, its checks (``validate``) and derived settings (``seed_list``, ``layers``). It is
the bottom of :mod:`bc_fast.experiments`: it imports only numpy at module level (``validate``
asks :mod:`bc_fast.train` for the known strategies and transforms), never the runner or the summary.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

__all__ = ["ALL_STRATEGIES", "ALL_TASKS", "LAMBDA_STRATEGIES", "ExperimentConfig"]

ALL_STRATEGIES = ("fix-m0", "nobc", "finetune-m0", "posthoc-sloss", "posthoc-mloss",
                  "joint-notrans", "joint-sloss", "joint-mloss")
ALL_TASKS = ("edge-rating", "user-activity", "user-positive-activity", "item-rating-avg",
             "item-rating-std", "item-genre")
LAMBDA_STRATEGIES = ("joint-notrans", "joint-sloss", "joint-mloss")
_SEED_LIMIT = 2 ** 32  # training seeds must lie in [0, 2**32)


def check_seed(seed: Any) -> None:
    """ValueError naming ``--seed`` unless ``seed`` is an integer in [0, 2**32) (what numpy's generators take)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < _SEED_LIMIT:
        raise ValueError(f"seed (--seed) must be an integer in [0, 2**32 - 1], got {seed!r}")


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
    lam_late, late_frac : float or None, float
        Optional late alignment phase of the joint strategies: the last ``late_frac`` of the
        epochs use ``lam_late`` and model selection only looks at them (see ``BCTrainer``).
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
    seeds : int
        Number of paired seeds ``seed, seed + 1, ...`` (each a full run of every strategy).
    selection_frac, split_seed : the held-out protocol: the share of each slice's evaluation users
        used for model selection, and the seed of the (training-seed independent) user split.
    n_boot : int
        Bootstrap replicates of the CIs.
    threads : int
        torch intra-op threads (1 is fastest on a busy 2-core machine).
    device : str
        Where the recommender trains: "auto" (default: CUDA when torch sees a GPU, else the
        CPU), "cpu", "cuda" or "cuda:N". On the CPU the results are the same, bit for bit, as
        before the setting existed; on a GPU they differ in the float rounding. Like
        ``threads`` it does not decide what a seed computes, so a resumed run may reuse
        checkpoints made on another device (each checkpoint records its own).
    keep : tuple of str
        Strategies whose embeddings and exported B_k layers are returned under ``artifacts``.
    distill : bool
        Also score ``<strategy>+direct`` for every strategy but fix-m0: the chain replaced, per
        version, by one affine map fitted in closed form from that version's embeddings of the
        version-0 users and items to the version-0 table (see ``_direct_maps``). Same models,
        so the same intended change; a different unintended change and legacy retention.
    """

    strategies: tuple[str, ...] = ALL_STRATEGIES
    dims: tuple[int, ...] = (32, 40, 48, 56, 64)
    num_layers: tuple[int, ...] | int = 2
    start: float = 0.5
    epochs: int = 30
    finetune_epochs: int | None = None
    batch_size: int = 4096
    lr: float = 5e-3
    transform_lr: float = 5e-3
    weight_decay: float = 1e-2
    lam: float = 16.0
    lam_late: float | None = None
    late_frac: float = 0.25
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
    seeds: int = 1
    selection_frac: float = 0.5
    split_seed: int = 0
    n_boot: int = 1000
    threads: int = 1
    device: str = "auto"
    keep: tuple[str, ...] = ("joint-mloss", "nobc")
    distill: bool = False
    name: str = "quick"

    @classmethod
    def quick(cls, **overrides: Any) -> "ExperimentConfig":
        """The demo preset: dims 32..64, 30 epochs per version at lr 5e-3, 3 consumer seeds.

        30 epochs: M_0's Recall@50 on the selection half (mean of 3 seeds, 5-epoch moving
        average) plateaus at epochs 25-30 with lr 5e-3 (0.157, up from 0.067 at epoch 8);
        with lr 2e-3 it still rises at epoch 60.
        """
        return replace(cls(), **overrides)

    @classmethod
    def full(cls, **overrides: Any) -> "ExperimentConfig":
        """The full preset: dims 64..128, 60 epochs at lr 2e-3 (batch 2048), 10 consumer seeds of 60 epochs.

        lr 2e-3 rather than the reference 1e-3, chosen on the selection half of InstEval (seed 0,
        nobc): M_0's Recall@50 plateaus from epoch 42 on (0.615-0.617), while at 1e-3 it still
        rises at epoch 60 (0.603); versions 1 and 2 end higher too (0.742 / 0.732 vs 0.728 / 0.723).
        """
        base = cls(dims=(64, 80, 96, 112, 128), num_layers=(2, 2, 3, 3, 3), epochs=60, batch_size=2048,
                   lr=2e-3, transform_lr=2e-3, eval_every=3, posthoc_steps=1000,
                   consumer_seeds=tuple(range(10)), consumer_epochs=60, name="full")
        return replace(base, **overrides)

    def validate(self, data: Any = None) -> None:
        """Raise ValueError on inconsistent settings (and, given ``data``, settings the data cannot serve)."""
        from .._util.torch_device import resolve_device
        from ..train.strategies import get_strategy
        from ..train.transforms import TRANSFORM_KINDS

        resolve_device(self.device)  # the form, and a CUDA device that torch does not see
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
        if self.seeds < 1 or self.n_boot < 1:
            raise ValueError(f"seeds and n_boot must be >= 1, got seeds={self.seeds}, n_boot={self.n_boot}")
        self._check_seed()
        if not 0.0 < self.selection_frac < 1.0:
            raise ValueError(f"selection_frac must be in (0, 1), got {self.selection_frac}")
        learned = tuple(k for k in TRANSFORM_KINDS if k not in ("truncate", "identity"))
        if self.transform not in learned:
            raise ValueError(f"unknown transform {self.transform!r}; expected one of {learned}")
        for name, v in (("lam", self.lam), ("lam_late", self.lam_late)):
            if v is not None and not (np.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v}")
        for name, v in (("lr", self.lr), ("transform_lr", self.transform_lr), ("posthoc_lr", self.posthoc_lr)):
            if not (np.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive finite learning rate, got {v}")
        if not 0.0 < self.late_frac <= 1.0:
            raise ValueError(f"late_frac must be in (0, 1], got {self.late_frac}")
        if data is not None and "item-genre" in self.consumer_tasks and getattr(data, "item_labels", None) is None:
            raise ValueError(f"consumer task 'item-genre' needs item labels, but data {getattr(data, 'name', '')!r} has "
                             "none: give a label column (from_dataframe(label_attribute=...), `--columns label=...`) "
                             "or leave 'item-genre' out of consumer_tasks")

    def _check_seed(self) -> None:
        """``seed`` (``--seed``) and the last paired seed must be integers in [0, 2**32)."""
        seed = self.seed
        check_seed(seed)
        if int(seed) + int(self.seeds) - 1 >= _SEED_LIMIT:
            raise ValueError(f"the paired seeds seed..seed+seeds-1 (--seed {seed}, --seeds {self.seeds}) end at "
                             f"{int(seed) + int(self.seeds) - 1}; expected all below 2**32: lower --seed")

    def seed_list(self) -> list[int]:
        """The paired training seeds."""
        return [int(self.seed) + i for i in range(int(self.seeds))]

    def layers(self) -> tuple[int, ...]:
        """GNN layers of each version."""
        if isinstance(self.num_layers, int):
            return (int(self.num_layers),) * len(self.dims)
        return tuple(int(x) for x in self.num_layers)
