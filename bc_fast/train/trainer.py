"""The general API: any torch embedding model + an intended-task loss -> versions with B_k.

The user supplies, per version:

* ``model`` -- a torch module (any architecture) producing embeddings of dimension ``dim``;
* ``step_fn(model, batch) -> (loss, aligned)`` -- the intended-task loss of a batch and the
  embeddings it computed for the entities to align: a sequence of ``(entity, ids, rows)``
  (``ids`` index the entity's rows in ``embed_fn``'s output, ``rows`` are the new model's
  embeddings of those ids, with gradient);
* ``batches()`` -- returns the batches of one epoch;
* ``embed_fn(model) -> {entity: Tensor (n_entity, dim)}`` -- embeddings of every entity on
  this version's data (used with the frozen previous model to build the alignment targets,
  and to export the final embeddings);
* optionally ``eval_fn(model) -> float`` (higher is better) for model selection.

:class:`BCTrainer` adds B_k, the alignment term ``lam * alignment_loss`` and the bookkeeping
of versions for the chosen strategy (see :mod:`bc_fast.train.strategies`).

Devices: ``BCTrainer(device=...)`` ("auto": CUDA when torch sees a GPU, else the CPU) moves every
model and B_k there; ``step_fn``, ``embed_fn`` and ``eval_fn`` must compute on that device (move
their data there once, before training). Batches that are tensors (or tuples, lists, dicts of them)
on another device are moved per step; give them on the device to avoid the copies. The training
loop never waits for the device: losses are summed on it and read once per evaluation.

Example
-------
>>> trainer = BCTrainer("joint-mloss", transform="linear", lam=16.0)   # doctest: +SKIP
>>> for k, (model, step_fn, batches, embed_fn) in enumerate(versions):  # doctest: +SKIP
...     rec = trainer.fit_version(model, step_fn=step_fn, batches=batches, embed_fn=embed_fn, epochs=20)
>>> z0_view = trainer.to_version(new_embeddings, src=4, dst=0)           # doctest: +SKIP
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from .._util.torch_device import resolve_device
from .losses import alignment_loss
from .strategies import Strategy, get_strategy
from .transforms import TRANSFORM_KINDS, BackwardTransform, IdentityTransform, TruncateTransform, make_transform

__all__ = ["BCTrainer", "VersionRecord"]

StepFn = Callable[[nn.Module, Any], "tuple[torch.Tensor, Sequence[tuple[str, torch.Tensor, torch.Tensor]]]"]
EmbedFn = Callable[[nn.Module], Mapping[str, torch.Tensor]]


@dataclass
class VersionRecord:
    """One embedding version: its model M_k, backward transform B_k and final embeddings.

    Attributes
    ----------
    version : int
    dim : int
        Embedding dimension d_k.
    model : nn.Module
        M_k (eval mode; parameters frozen).
    transform : BackwardTransform or None
        B_k (version k -> k-1); None for version 0.
    embeddings : dict entity -> Tensor (n, d_k)
        ``embed_fn(M_k)`` on version k's data (on the trainer's device).
    score : float or None
        Best ``eval_fn`` value (intended task), if an eval_fn was given.
    history : list of dict
        Per-evaluation log: epoch, intended loss, alignment loss, score.
    selected_epoch : int or None
        The epoch whose state was kept (None when the version was not trained here).
    """

    version: int
    dim: int
    model: nn.Module
    transform: BackwardTransform | None
    embeddings: dict[str, torch.Tensor]
    score: float | None = None
    history: list[dict] = field(default_factory=list)
    selected_epoch: int | None = None


def _freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _embed(model: nn.Module, embed_fn: EmbedFn) -> dict[str, torch.Tensor]:
    was = model.training
    model.eval()
    with torch.no_grad():
        out = {k: v.detach() for k, v in embed_fn(model).items()}
    model.train(was)
    if not out:
        raise ValueError("embed_fn returned no entities")
    for k, v in out.items():
        if v.ndim != 2:
            raise ValueError(f"embed_fn()[{k!r}] must be a 2-D tensor (n, dim), got shape {tuple(v.shape)}")
    return out


def _to_device(batch: Any, device: torch.device) -> Any:
    """Tensors of a batch (nested in tuples, lists, dicts) on ``device``; a no-op for those already there."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (tuple, list)):
        moved = [_to_device(b, device) for b in batch]
        return type(batch)(moved) if type(batch) in (tuple, list) else batch
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _evaluate(model: nn.Module, eval_fn: Callable[[nn.Module], float] | None) -> float | None:
    if eval_fn is None:
        return None
    was = model.training
    model.eval()
    with torch.no_grad():
        score = float(eval_fn(model))
    model.train(was)
    return score


def _dim_of(emb: Mapping[str, torch.Tensor]) -> int:
    dims = {int(v.shape[1]) for v in emb.values()}
    if len(dims) != 1:
        raise ValueError(f"all entities must share one embedding dimension, got {sorted(dims)}")
    return dims.pop()


class BCTrainer:
    """Trains embedding versions M_0..M_K with backward transforms B_k for one strategy.

    Parameters
    ----------
    strategy : str or Strategy, default "joint-mloss"
        One of fix-m0, nobc, finetune-m0, posthoc-sloss, posthoc-mloss, joint-notrans,
        joint-sloss, joint-mloss (= BC-Aligner).
    transform : str, default "linear"
        Kind of learned B_k (linear, affine, lowrank, orthogonal, mlp); the paper's is linear.
    transform_options : dict, optional
        Passed to :func:`make_transform` (e.g. ``{"rank": 16}``, ``{"hidden": 64}``).
    lam : float, default 16
        Weight of the alignment loss (the paper's lambda).
    lr, transform_lr : float, default 1e-3
        Adam learning rates of M_k and B_k (the reference uses 1e-3 for both).
    posthoc_steps : int, default 500
        Full-batch Adam steps when fitting B_k post hoc.
    posthoc_lr : float, default 1e-2
    lam_late : float, optional
        Joint strategies only: the alignment weight of the last ``late_frac`` of the epochs (a
        late, stronger alignment phase; e.g. 64 after 16). Model selection then only considers
        epochs of that phase, so the chosen state is one trained with the stronger weight.
    late_frac : float, default 0.25
        Share of the epochs (rounded, at least one) run with ``lam_late``.
    seed : int, default 0
        Seeds the initialisation of each B_k (``seed``, version) independently of global state.
    log : callable, optional
        Called with progress strings.
    device : str, default "auto"
        Where to train: "cpu", "cuda" or "cuda:N"; "auto" is CUDA when torch sees a GPU, else the
        CPU. Every model and transform is moved there (models in place), and so are the
        embeddings of the versions. On the CPU the results are the same, bit for bit, as before
        this option existed; a GPU's float32 arithmetic differs in the last bits.
    """

    def __init__(self, strategy: str | Strategy = "joint-mloss", *, transform: str = "linear",
                 transform_options: Mapping[str, Any] | None = None, lam: float = 16.0,
                 lr: float = 1e-3, transform_lr: float = 1e-3, posthoc_steps: int = 500,
                 posthoc_lr: float = 1e-2, lam_late: float | None = None, late_frac: float = 0.25,
                 seed: int = 0, log: Callable[[str], None] | None = None, device: str = "auto") -> None:
        self.strategy = get_strategy(strategy)
        self.device = resolve_device(device)
        if transform in ("truncate", "identity"):
            raise ValueError(f"transform={transform!r} is fixed; use strategy 'joint-notrans' for truncation")
        if transform not in TRANSFORM_KINDS:
            raise ValueError(f"unknown transform kind {transform!r}; expected one of {TRANSFORM_KINDS[:5]}")
        if lam < 0 or not math.isfinite(lam):
            raise ValueError(f"lam must be a finite number >= 0, got {lam}")
        if lam_late is not None and (lam_late < 0 or not math.isfinite(lam_late)):
            raise ValueError(f"lam_late must be a finite number >= 0 or None, got {lam_late}")
        if not 0.0 < late_frac <= 1.0:
            raise ValueError(f"late_frac must be in (0, 1], got {late_frac}")
        self.transform_kind = transform
        self.transform_options = dict(transform_options or {})
        self.lam = float(lam)
        self.lam_late = None if lam_late is None else float(lam_late)
        self.late_frac = float(late_frac)
        self.lr = float(lr)
        self.transform_lr = float(transform_lr)
        self.posthoc_steps = int(posthoc_steps)
        self.posthoc_lr = float(posthoc_lr)
        self.seed = int(seed)
        self.log = log or (lambda s: None)
        self.versions: list[VersionRecord] = []
        self._last_history: list[dict] = []
        self._last_selected: int | None = None

    # -- bookkeeping ----------------------------------------------------------------------------
    @property
    def dims(self) -> list[int]:
        """Embedding dimension of every version so far."""
        return [r.dim for r in self.versions]

    @property
    def transforms(self) -> list[BackwardTransform]:
        """``[B_1, ..., B_K]``."""
        return [r.transform for r in self.versions[1:]]

    def _check_version(self, v: int, name: str) -> int:
        if not 0 <= v < len(self.versions):
            raise ValueError(f"{name}={v} is not a trained version (have versions 0..{len(self.versions) - 1})")
        return int(v)

    def chain(self, src: int, dst: int = 0) -> list[BackwardTransform]:
        """Transforms mapping version ``src`` to version ``dst`` (``B_src`` first, then ``B_{src-1}``, ...)."""
        src = self._check_version(src, "src")
        dst = self._check_version(dst, "dst")
        if dst > src:
            raise ValueError(f"backward transforms only map newer to older versions, got src={src} < dst={dst}")
        return [self.versions[j].transform for j in range(src, dst, -1)]

    def to_version(self, z: torch.Tensor, src: int, dst: int = 0) -> torch.Tensor:
        """Map embeddings of version ``src`` into the space of version ``dst`` (``B_{dst+1} o ... o B_src``).

        Computed, and returned, on the trainer's device.
        """
        chain = self.chain(src, dst)
        if z.ndim != 2 or z.shape[1] != self.versions[src].dim:
            raise ValueError(f"version {src} embeddings must have shape (n, {self.versions[src].dim}), got {tuple(z.shape)}")
        z = z.to(self.device)
        with torch.no_grad():
            for b in chain:
                z = b(z)
        return z

    def bc_embeddings(self, version: int, dst: int = 0) -> dict[str, torch.Tensor]:
        """The final embeddings of ``version`` as consumers pinned to ``dst`` see them."""
        rec = self.versions[self._check_version(version, "version")]
        return {k: self.to_version(v, version, dst) for k, v in rec.embeddings.items()}

    def export_chain(self, src: int, dst: int = 0) -> list[Any]:
        """The chain ``src -> dst`` as :class:`bc_fast.engine.Layer` list, ready for ``FusedTransform``."""
        layers: list[Any] = []
        for b in self.chain(src, dst):
            layers.extend(b.export())
        return layers

    def save_registry(self, path: str | Any, *, name: str | None = None,
                      metadata: Mapping[str, Any] | None = None) -> Any:
        """Save every version (dim, strategy, score) and its backward transform into a new registry.

        Parameters
        ----------
        path : path
            Directory of the new registry (see :class:`bc_fast.store.Registry`); must not
            hold one already.
        name : str, optional
            Registry name (default: the strategy name).
        metadata : mapping, optional
            Extra JSON metadata stored with every version.

        Returns
        -------
        bc_fast.store.Registry
        """
        from ..store.registry import Registry

        if not self.versions:
            raise ValueError("no trained versions to save")
        reg = Registry.create(path, name=name or self.strategy.name)
        for rec in self.versions:
            meta = {"strategy": self.strategy.name, **dict(metadata or {})}
            if rec.score is not None:
                meta["score"] = float(rec.score)
            reg.add_version(rec.version, dim=rec.dim, metadata=meta,
                            backward=rec.transform if rec.version > 0 else None)
        return reg

    def add_trained_version(self, model: nn.Module, *, embed_fn: EmbedFn,
                            transform: BackwardTransform | None = None, score: float | None = None,
                            eval_fn: Callable[[nn.Module], float] | None = None) -> VersionRecord:
        """Register a model trained elsewhere as the next version (e.g. a shared M_0).

        The model is deep-copied, frozen and moved to the trainer's device; ``embed_fn`` (and
        ``eval_fn``) must then compute there. For versions >= 1 a transform must be given.
        ``score`` defaults to ``eval_fn(model)`` when an eval_fn is given.
        """
        k = len(self.versions)
        model = copy.deepcopy(model).to(self.device)
        emb = _embed(model, embed_fn)
        dim = _dim_of(emb)
        if k > 0:
            if transform is None:
                raise ValueError(f"version {k} needs its backward transform B_{k}")
            if transform.d_in != dim or transform.d_out != self.versions[-1].dim:
                raise ValueError(f"B_{k} maps {transform.d_in} -> {transform.d_out}, expected {dim} -> {self.versions[-1].dim}")
            transform = _freeze(copy.deepcopy(transform).to(self.device))
        if score is None:
            score = _evaluate(model, eval_fn)
        rec = VersionRecord(k, dim, _freeze(model), transform, emb, score)
        self.versions.append(rec)
        return rec

    # -- training -------------------------------------------------------------------------------
    def fit_version(self, model: nn.Module | None, *, step_fn: StepFn, batches: Callable[[], Iterable[Any]],
                    embed_fn: EmbedFn, epochs: int, eval_fn: Callable[[nn.Module], float] | None = None,
                    eval_every: int = 1, select_after: int = 0, trained: bool = False) -> VersionRecord:
        """Produce the next version according to the strategy.

        Parameters
        ----------
        model : nn.Module or None
            The new model M_k (freshly initialised, of any dimension), moved in place to the
            trainer's device. Ignored for fix-m0 and finetune-m0 at k >= 1 (they reuse M_0 /
            M_{k-1}); may then be None.
        step_fn, batches, embed_fn, eval_fn
            See the module docstring. ``embed_fn`` and ``eval_fn`` must refer to this version's data.
        epochs : int
            Training epochs (for finetune-m0: fine-tuning epochs).
        eval_every : int
            Evaluate (and keep the best state) every this many epochs; the last epoch is always evaluated.
        select_after : int
            Only epochs after this one are eligible as the best state (the reference waits
            for the alignment loss to drop: ``epoch > 50`` of 500).
        trained : bool
            ``model`` is already trained for this version: skip the intended-task training
            (post-hoc strategies can reuse models trained by nobc).

        Returns
        -------
        VersionRecord
        """
        if epochs < 0 or eval_every < 1:
            raise ValueError(f"epochs must be >= 0 and eval_every >= 1, got epochs={epochs}, eval_every={eval_every}")
        k = len(self.versions)
        s = self.strategy
        if k == 0 or s.model == "fresh":
            if model is None:
                raise ValueError(f"strategy {s.name!r} needs a model for version {k}")
            model = model.to(self.device)
        if k == 0:
            m = model if trained else self._train(model, step_fn, batches, epochs, eval_fn, eval_every, select_after, None, None)
            return self._record(m, None, embed_fn, eval_fn)
        prev = self.versions[-1]
        if s.model == "fixed":
            return self._record(self.versions[0].model, IdentityTransform(prev.dim).to(self.device), embed_fn, eval_fn)
        if s.model == "finetune":
            m = copy.deepcopy(prev.model)
            for p in m.parameters():
                p.requires_grad_(True)
            m = self._train(m, step_fn, batches, epochs, eval_fn, eval_every, select_after, None, None)
            return self._record(m, IdentityTransform(prev.dim).to(self.device), embed_fn, eval_fn)

        # fresh model
        targets = _embed(prev.model, embed_fn)  # frozen M_{k-1} on the NEW data
        bad = {e: tuple(t.shape) for e, t in targets.items() if t.shape[1] != prev.dim}
        if bad:
            raise ValueError(f"embed_fn on M_{k - 1} gave shapes {bad}, expected dim {prev.dim}")
        with torch.no_grad():
            model.eval()
            dim = _dim_of(embed_fn(model))
            model.train()
        if s.transform == "truncate":
            if dim < prev.dim:
                raise ValueError(f"strategy {s.name!r} needs d_{k} >= d_{k - 1}, got {dim} < {prev.dim}")
            transform = TruncateTransform(dim, prev.dim).to(self.device)
        else:
            with torch.random.fork_rng(devices=[]):  # initialised on the CPU: the same B_k on every device
                torch.manual_seed(self.seed * 100003 + k)
                transform = make_transform(self.transform_kind, dim, prev.dim, **self.transform_options)
            transform = transform.to(self.device)
        if s.fit == "joint":
            m, transform = self._train(model, step_fn, batches, epochs, eval_fn, eval_every, select_after,
                                       targets, transform, return_transform=True)
        else:
            m = model if trained else self._train(model, step_fn, batches, epochs, eval_fn, eval_every, select_after, None, None)
            if s.fit == "posthoc":
                transform = self._fit_posthoc(transform, targets, _embed(m, embed_fn))
        return self._record(m, transform, embed_fn, eval_fn)

    def _record(self, model: nn.Module, transform: BackwardTransform | None, embed_fn: EmbedFn,
                eval_fn: Callable[[nn.Module], float] | None) -> VersionRecord:
        k = len(self.versions)
        emb = _embed(model, embed_fn)
        dim = _dim_of(emb)
        if transform is not None and (transform.d_in != dim or transform.d_out != self.versions[-1].dim):
            raise ValueError(f"B_{k} maps {transform.d_in} -> {transform.d_out}, expected {dim} -> {self.versions[-1].dim}")
        rec = VersionRecord(k, dim, _freeze(copy.deepcopy(model)), None if transform is None else _freeze(transform),
                            emb, _evaluate(model, eval_fn), self._last_history, self._last_selected)
        self._last_history = []
        self._last_selected = None
        self.versions.append(rec)
        return rec

    def _train(self, model: nn.Module, step_fn: StepFn, batches: Callable[[], Iterable[Any]], epochs: int,
               eval_fn, eval_every: int, select_after: int, targets: Mapping[str, torch.Tensor] | None,
               transform: BackwardTransform | None, return_transform: bool = False):
        k = len(self.versions)
        align = targets is not None and transform is not None and max(self.lam, self.lam_late or 0.0) > 0
        frozen = self.transforms if self.strategy.multi_step else []
        model.train()
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=self.lr)
        opt_t = None
        if align and transform.trainable:
            transform.train()
            opt_t = torch.optim.Adam(transform.parameters(), lr=self.transform_lr)
        best_score, best_state, best_epoch, history = -math.inf, None, None, []
        late_start = epochs  # epochs after this one use lam_late
        if align and self.lam_late is not None:
            late_start = epochs - max(1, round(self.late_frac * epochs))
            select_after = max(select_after, late_start)
        # the epoch's losses are summed on the device in float64 (the sums of the Python floats they
        # were before, bit for bit) and read once per evaluation: no host sync per step
        sum_task = torch.zeros((), dtype=torch.float64, device=self.device)
        sum_align = torch.zeros((), dtype=torch.float64, device=self.device)
        for epoch in range(1, epochs + 1):
            sum_task.zero_()
            sum_align.zero_()
            n = 0
            lam = self.lam_late if epoch > late_start else self.lam
            for batch in batches():
                loss, aligned = step_fn(model, _to_device(batch, self.device))
                total = loss
                if align:
                    pairs = []
                    for entity, ids, rows in aligned:
                        if entity not in targets:
                            raise ValueError(f"step_fn aligned entity {entity!r}, but embed_fn gives {sorted(targets)}")
                        pairs.append((targets[entity][ids], rows))
                    a = alignment_loss(pairs, transform, frozen, multi_step=self.strategy.multi_step)
                    total = loss + lam * a
                    sum_align += a.detach().to(sum_align)
                opt.zero_grad(set_to_none=True)
                if opt_t is not None:
                    opt_t.zero_grad(set_to_none=True)
                total.backward()
                opt.step()
                if opt_t is not None:
                    opt_t.step()
                sum_task += loss.detach().to(sum_task)
                n += 1
            if epoch % eval_every == 0 or epoch == epochs:
                score = _evaluate(model, eval_fn)
                entry = {"epoch": epoch, "loss": float(sum_task) / max(n, 1),
                         "align": float(sum_align) / max(n, 1) if align else None, "score": score}
                history.append(entry)
                self.log(f"  v{k} epoch {epoch}: loss={entry['loss']:.4f}"
                         + (f" align={entry['align']:.4f}" if align else "")
                         + (f" score={score:.4f}" if score is not None else ""))
                eligible = epoch > select_after or epoch == epochs
                cand = score if score is not None else float(epoch)
                if eligible and (best_state is None or cand > best_score):
                    best_score, best_epoch = cand, epoch
                    best_state = (copy.deepcopy(model.state_dict()),
                                  copy.deepcopy(transform.state_dict()) if transform is not None else None)
        if best_state is not None:
            model.load_state_dict(best_state[0])
            if transform is not None and best_state[1] is not None:
                transform.load_state_dict(best_state[1])
        self._last_history = history
        self._last_selected = best_epoch
        model.eval()
        return (model, transform) if return_transform else model

    def _fit_posthoc(self, transform: BackwardTransform, targets: Mapping[str, torch.Tensor],
                     new: Mapping[str, torch.Tensor]) -> BackwardTransform:
        """Fit B_k on fixed embeddings: full-batch Adam on the (single- or multi-step) alignment loss."""
        missing = set(targets) ^ set(new)
        if missing:
            raise ValueError(f"old and new embeddings cover different entities: {sorted(missing)}")
        pairs = []
        for e in sorted(targets):
            if targets[e].shape[0] != new[e].shape[0]:
                raise ValueError(f"entity {e!r}: {targets[e].shape[0]} old rows vs {new[e].shape[0]} new rows")
            pairs.append((targets[e], new[e]))
        frozen = self.transforms if self.strategy.multi_step else []
        transform.train()
        opt = torch.optim.Adam(transform.parameters(), lr=self.posthoc_lr)
        # The best state is tracked on the device (torch.where, no host sync per step): the same
        # comparisons in float64 as with the Python floats before, so the same state is kept.
        best = torch.full((), math.inf, dtype=torch.float64, device=self.device)
        found = torch.zeros((), dtype=torch.bool, device=self.device)
        best_state = {k: t.detach().clone() for k, t in transform.state_dict().items()}
        for _ in range(self.posthoc_steps):
            loss = alignment_loss(pairs, transform, frozen, multi_step=self.strategy.multi_step)
            v = loss.detach().to(best)
            better = v < best  # the state that produced this loss (before the step)
            best = torch.where(better, v, best)
            found |= better
            for k, t in transform.state_dict().items():
                best_state[k].copy_(torch.where(better, t, best_state[k]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if bool(found):
            transform.load_state_dict(best_state)
        self._last_history = self._last_history + [{"posthoc_align": float(best)}]
        return transform
