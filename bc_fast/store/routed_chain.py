"""A registry chain with a routed step, fused into one :class:`~bc_fast.engine.routed.RoutedTransform`.

What fuses (:func:`fuse_routed_chain`, used by :meth:`Registry.operator
<bc_fast.store.registry.Registry.operator>`):

* one routed step with any number of affine steps (layers without activation) before and after it.
  The affine steps before it are composed in float64 into one ``(G, h)`` and folded into the routing
  scores and the per-cluster maps (:meth:`RoutedTransform.after_affine`); those after it into one
  ``(P, q)`` folded into every cluster's map (:meth:`RoutedTransform.then_affine`, exact because the
  blend weights sum to 1). ``normalize=True`` L2-normalises the fused operator's output, as for any
  chain. The result is one routed operator of the same cost as the routed step alone (on the
  chain's outer dimensions).

What does not fuse (a :class:`~bc_fast.store.manifest.RegistryError` names the steps):

* two routed steps: the second step's routing depends on the first's blended output, which is no
  mixture of ``k`` affine maps; convert in two runs (``src -> mid``, ``mid -> dst``) instead;
* a routed step with an MLP step (activation layers): the activation sits between the routing and
  the maps (or after the blend) and cannot be folded into either.

It may import :mod:`.manifest`, :mod:`.routed_format`, :mod:`bc_fast.engine` and ``bc_fast._util``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .._util.blas import single_threaded_blas
from ..engine import Layer
from ..engine.routed import RoutedTransform
from .manifest import RegistryError
from .routed_format import RoutedStep

__all__ = ["compose_affine", "fuse_routed_chain"]


def compose_affine(steps: Sequence[Sequence[Layer]]) -> tuple[np.ndarray, np.ndarray] | None:
    """The affine steps ``steps`` (applied in order) as one float64 ``(W, b)``; None for no steps."""
    w: np.ndarray | None = None
    b: np.ndarray | None = None
    for step in steps:
        for layer in step:
            lw = np.asarray(layer.weight, dtype=np.float64)
            lb = np.zeros(lw.shape[0]) if layer.bias is None else np.asarray(layer.bias, dtype=np.float64)
            w, b = (lw, lb) if w is None else (lw @ w, lw @ b + lb)
    return None if w is None else (w, b)


def fuse_routed_chain(steps: Sequence[Sequence[Layer] | RoutedStep], labels: Sequence[str], *,
                      normalize: bool = False, precision: str = "fp32") -> RoutedTransform:
    """Fuse a chain holding one routed step and affine steps into one routed operator (see the module docstring).

    ``steps`` in application order (each a list of Layer or a :class:`RoutedStep`), ``labels`` their
    names for messages (``"3 -> 2"``). Raises RegistryError for a chain that does not fuse.
    """
    routed = [i for i, s in enumerate(steps) if isinstance(s, RoutedStep)]
    chain = f"{labels[0].split(' -> ')[0]} -> {labels[-1].split(' -> ')[-1]}"
    if len(routed) != 1:
        raise RegistryError(
            f"the chain {chain} has {len(routed)} routed (local) steps ({', '.join(labels[i] for i in routed)}): two "
            f"routed steps do not fuse into one operator (the second routes on the first's blended output); "
            f"convert in two runs, one routed step each (e.g. {labels[routed[0]]} first, then the rest)")
    for i, s in enumerate(steps):
        if i != routed[0] and not all(layer.is_affine for layer in s):  # type: ignore[union-attr]
            acts = sorted({layer.activation for layer in s if not layer.is_affine})  # type: ignore[union-attr]
            raise RegistryError(
                f"the chain {chain} has a routed (local) step ({labels[routed[0]]}) and an MLP step ({labels[i]}, "
                f"{'/'.join(acts)} layers): a routed step fuses only with affine steps (no activation); "
                f"convert in two runs, one across the routed step and one across the MLP step")
    if precision != "fp32":
        raise ValueError(f"precision={precision!r}: a routed (local) chain ({chain}) runs in fp32 only")
    r = routed[0]
    op = steps[r].operator()  # type: ignore[union-attr]
    with single_threaded_blas():  # small products; OpenBLAS workers would spin beside the core afterwards
        before = compose_affine(steps[:r])  # type: ignore[arg-type]
        after = compose_affine(steps[r + 1:])  # type: ignore[arg-type]
        if before is not None:
            op = op.after_affine(*before)
        if after is not None:
            op = op.then_affine(*after)
    if normalize:
        op = RoutedTransform(op.score_weight, op.score_bias, op.weight, op.bias, op.m, op.temperature,
                             normalize=True)
    return op
