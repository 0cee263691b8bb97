"""Backward-compatible training in PyTorch (imports torch; install the ``train`` extra).

* :class:`BCTrainer` -- the general API: any torch embedding model + an intended-task loss
  -> versions M_0..M_K with backward transforms B_k, for any of the paper's eight strategies.
* Backward transforms (:func:`make_transform`): linear (the paper's), affine, lowrank,
  orthogonal, mlp (residual), plus the fixed truncate/identity; each ``.export()``s
  :class:`bc_fast.engine.Layer` lists for the fused core.
* Losses: :func:`single_step_loss`, :func:`multi_step_loss` (BC-Aligner), :func:`alignment_loss`.
* The reference recommender: :class:`PinSAGE`, :func:`bpr_loss`, :class:`BPRSampler`,
  :func:`evaluate_recall`.

It may import :mod:`bc_fast.eval` (metrics), :mod:`bc_fast.data`, :mod:`bc_fast.store` (saving the
versions), :mod:`bc_fast.engine` and ``bc_fast._util``.
"""

try:
    import torch  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("bc_fast.train needs PyTorch: pip install 'bc_fast[train]' (or torch)") from e

from .losses import alignment_loss, multi_step_loss, single_step_loss
from .recommender import BPRSampler, Graph, PinSAGE, bpr_loss, build_graph, evaluate_recall
from .strategies import STRATEGIES, STRATEGY_NAMES, Strategy, get_strategy
from .trainer import BCTrainer, VersionRecord
from .transforms import (
    TRANSFORM_KINDS,
    AffineTransform,
    BackwardTransform,
    IdentityTransform,
    LinearTransform,
    LowRankAffineTransform,
    OrthogonalTransform,
    ResidualMLPTransform,
    TruncateTransform,
    apply_layers_numpy,
    make_transform,
)

__all__ = [
    "BCTrainer", "VersionRecord",
    "Strategy", "STRATEGIES", "STRATEGY_NAMES", "get_strategy",
    "alignment_loss", "multi_step_loss", "single_step_loss",
    "TRANSFORM_KINDS", "BackwardTransform", "LinearTransform", "AffineTransform", "LowRankAffineTransform",
    "OrthogonalTransform", "ResidualMLPTransform", "TruncateTransform", "IdentityTransform",
    "make_transform", "apply_layers_numpy",
    "PinSAGE", "Graph", "BPRSampler", "bpr_loss", "build_graph", "evaluate_recall",
]
