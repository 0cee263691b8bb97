"""Alignment losses of backward-compatible training (Hu et al., KDD 2022).

With ``delta = z_{k-1} - B_k(z_k)`` for a batch of entities (z_{k-1}: the frozen
previous model on the new data, detached):

* single-step: ``mean(delta**2)`` (an MSE over rows and dimensions);
* multi-step (BC-Aligner): ``(1/k) * [mean(delta**2) + sum_{j<k-1} mean((W_{j+1}...W_{k-1} delta)**2)]``
  -- the error measured in every historical space through the frozen earlier transforms.

For affine frozen transforms the difference is pushed through their matrices (the bias
cancels), exactly as the reference code. For non-affine ones (residual MLP) both sides are
mapped: ``C_j(z_{k-1}) - C_j(B_k z_k)``, which equals the former when C_j is linear.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .transforms import BackwardTransform

__all__ = ["single_step_loss", "multi_step_loss", "alignment_loss"]


def _check_pair(target: torch.Tensor, pred: torch.Tensor) -> None:
    if target.shape != pred.shape or target.ndim != 2:
        raise ValueError(f"target and prediction must be 2-D with equal shapes, got {tuple(target.shape)} "
                         f"and {tuple(pred.shape)}")


def single_step_loss(target: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """``mean((target - pred)**2)`` over rows and dimensions (torch.nn.MSELoss)."""
    _check_pair(target, pred)
    return torch.mean((target - pred) ** 2)


def multi_step_loss(target: torch.Tensor, pred: torch.Tensor,
                    frozen: Sequence[BackwardTransform]) -> torch.Tensor:
    """BC-Aligner's multi-step alignment loss of one group of rows.

    Parameters
    ----------
    target : Tensor of shape (n, d_{k-1})
        ``z_{k-1}``, the previous version's embeddings (detached).
    pred : Tensor of shape (n, d_{k-1})
        ``B_k(z_k)``.
    frozen : sequence of BackwardTransform
        ``[B_1, ..., B_{k-1}]``, oldest first; they are applied newest first
        (``B_{k-1}``, then ``B_{k-2}``, ...). Empty for k = 1 (then equal to the single-step loss).

    Returns
    -------
    Tensor (scalar)
        ``(1/k) * sum_{j=0}^{k-1} mean((C_j target - C_j pred)**2)`` with
        ``C_j = B_{j+1} o ... o B_{k-1}`` and ``C_{k-1} = id``.
    """
    _check_pair(target, pred)
    chain = list(frozen)[::-1]
    d = target.shape[1]
    for b in chain:
        if b.d_in != d:
            raise ValueError(f"frozen transform {type(b).__name__} expects dim {b.d_in}, but the chain carries dim {d}")
        d = b.d_out
    delta = target - pred
    loss = torch.mean(delta ** 2)
    mats = [b.linear_part() for b in chain]
    if all(m is not None for m in mats):
        for m in mats:
            delta = delta @ m.T
            loss = loss + torch.mean(delta ** 2)
    else:
        a, p = target, pred
        for b in chain:
            a, p = b(a), b(p)
            loss = loss + torch.mean((a - p) ** 2)
    return loss / (len(chain) + 1)


def alignment_loss(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], transform: BackwardTransform,
                   frozen: Sequence[BackwardTransform] = (), *, multi_step: bool = False) -> torch.Tensor:
    """Sum over groups (e.g. users, positive items, negative items) of the alignment loss.

    Parameters
    ----------
    pairs : sequence of (target z_{k-1}, new z_k) tensors
        One pair per group, as the reference sums the user, item and negative-item MSEs.
    transform : BackwardTransform
        ``B_k`` (trainable or fixed).
    frozen : sequence of BackwardTransform
        ``[B_1, ..., B_{k-1}]`` (only used when ``multi_step``).
    multi_step : bool
        BC-Aligner's multi-step loss instead of the single-step one.
    """
    if not pairs:
        raise ValueError("alignment_loss needs at least one (target, new) pair")
    total = None
    for target, new in pairs:
        pred = transform(new)
        term = multi_step_loss(target, pred, frozen) if multi_step else single_step_loss(target, pred)
        total = term if total is None else total + term
    return total
