"""Backward transforms B_k: version k (dim d_in) -> version k-1 (dim d_out), as torch modules.

Every transform exports its weights as a list of :class:`bc_fast.engine.Layer`
(plain numpy arrays) so the compiled core can apply it, or a whole chain of them,
without torch. Kinds:

========== ======================================================== ====================
kind       forward                                                  exported layers
========== ======================================================== ====================
linear     ``W x`` (the paper's, ``Linear(d_in, d_out, bias=False)``) 1 affine
affine     ``W x + b``                                              1 affine
lowrank    ``U (V x) + b`` with rank r                              2 affine
orthogonal ``s Q x (+ b)``, Q with orthonormal rows/columns         1 affine
mlp        ``P x + W2 act(W1 x + b1) + b2`` (residual MLP)          2 (activation, affine)
truncate   ``x[:, :d_out]`` (fixed; joint-notrans and nobc)         1 affine
identity   ``x`` (fixed; fix-m0 and finetune-m0)                    1 affine
========== ======================================================== ====================
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "TRANSFORM_KINDS",
    "BackwardTransform",
    "LinearTransform",
    "AffineTransform",
    "LowRankAffineTransform",
    "OrthogonalTransform",
    "ResidualMLPTransform",
    "TruncateTransform",
    "IdentityTransform",
    "make_transform",
    "apply_layers_numpy",
]

TRANSFORM_KINDS = ("linear", "affine", "lowrank", "orthogonal", "mlp", "truncate", "identity")


def _np(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().to(torch.float32).numpy())


def _layer(weight: np.ndarray, bias: np.ndarray | None = None, activation: str = "none",
           activation_width: int | None = None) -> Any:
    from ..engine import Layer  # the interchange type of the compiled core (numpy only)

    return Layer(weight=weight, bias=bias, activation=activation, activation_width=activation_width)


def _check_dims(d_in: int, d_out: int) -> None:
    if int(d_in) < 1 or int(d_out) < 1:
        raise ValueError(f"transform dims must be >= 1, got d_in={d_in}, d_out={d_out}")


class BackwardTransform(nn.Module):
    """Base class: a map from version-k embeddings (d_in) to version-(k-1) embeddings (d_out)."""

    kind: str = "base"
    trainable: bool = True

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        _check_dims(d_in, d_out)
        self.d_in = int(d_in)
        self.d_out = int(d_out)

    def linear_part(self) -> torch.Tensor | None:
        """The matrix W (d_out, d_in) if the transform is affine (``B(x) = W x + b``), else None.

        The multi-step alignment loss pushes differences through frozen affine transforms
        with W alone (the bias cancels), exactly as the reference does.
        """
        return None

    def export_arrays(self) -> list[tuple[np.ndarray, np.ndarray | None, str, int | None]]:
        """``(weight, bias, activation, activation_width)`` per layer, float32 numpy."""
        raise NotImplementedError

    def export(self) -> list[Any]:
        """The transform as a list of :class:`bc_fast.engine.Layer` for ``FusedTransform``."""
        return [_layer(*a) for a in self.export_arrays()]

    def extra_repr(self) -> str:
        return f"{self.d_in} -> {self.d_out}"

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 2 or x.shape[1] != self.d_in:
            raise ValueError(f"{type(self).__name__} expects input of shape (n, {self.d_in}), got {tuple(x.shape)}")


class LinearTransform(BackwardTransform):
    """``B(x) = W x``: the paper's ``Linear(d_in, d_out, bias=False)``."""

    kind = "linear"

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__(d_in, d_out)
        self.lin = nn.Linear(self.d_in, self.d_out, bias=False)

    @property
    def weight(self) -> torch.Tensor:
        """The (d_out, d_in) matrix."""
        return self.lin.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return self.lin(x)

    def linear_part(self) -> torch.Tensor:
        return self.lin.weight

    def export_arrays(self):
        return [(_np(self.lin.weight), None, "none", None)]


class AffineTransform(LinearTransform):
    """``B(x) = W x + b``."""

    kind = "affine"

    def __init__(self, d_in: int, d_out: int) -> None:
        BackwardTransform.__init__(self, d_in, d_out)
        self.lin = nn.Linear(self.d_in, self.d_out, bias=True)

    def export_arrays(self):
        return [(_np(self.lin.weight), _np(self.lin.bias), "none", None)]


class LowRankAffineTransform(BackwardTransform):
    """``B(x) = U (V x) + b`` with ``V`` (rank, d_in) and ``U`` (d_out, rank)."""

    kind = "lowrank"

    def __init__(self, d_in: int, d_out: int, rank: int = 16) -> None:
        super().__init__(d_in, d_out)
        if not 1 <= int(rank) <= min(self.d_in, self.d_out):
            raise ValueError(f"rank must be in [1, min(d_in, d_out)={min(self.d_in, self.d_out)}], got {rank}")
        self.rank = int(rank)
        self.v = nn.Linear(self.d_in, self.rank, bias=False)
        self.u = nn.Linear(self.rank, self.d_out, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return self.u(self.v(x))

    def linear_part(self) -> torch.Tensor:
        return self.u.weight @ self.v.weight

    def export_arrays(self):
        return [(_np(self.v.weight), None, "none", None), (_np(self.u.weight), _np(self.u.bias), "none", None)]

    def extra_repr(self) -> str:
        return f"{self.d_in} -> {self.d_out}, rank={self.rank}"


class OrthogonalTransform(BackwardTransform):
    """``B(x) = s Q x (+ b)``: Q has orthonormal rows (d_out <= d_in) or columns, s > 0 a learned scale.

    Q is kept orthogonal by ``torch.nn.utils.parametrizations.orthogonal`` (Procrustes-style:
    a rotation/projection that preserves angles, plus one global scale).
    """

    kind = "orthogonal"

    def __init__(self, d_in: int, d_out: int, *, bias: bool = False, scale: bool = True) -> None:
        super().__init__(d_in, d_out)
        from torch.nn.utils.parametrizations import orthogonal

        self.q = orthogonal(nn.Linear(self.d_in, self.d_out, bias=False))
        self.log_scale = nn.Parameter(torch.zeros(())) if scale else None
        self.bias = nn.Parameter(torch.zeros(self.d_out)) if bias else None

    def _matrix(self) -> torch.Tensor:
        w = self.q.weight
        return w * self.log_scale.exp() if self.log_scale is not None else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return F.linear(x, self._matrix(), self.bias)

    def linear_part(self) -> torch.Tensor:
        return self._matrix()

    def export_arrays(self):
        return [(_np(self._matrix()), None if self.bias is None else _np(self.bias), "none", None)]


class ResidualMLPTransform(BackwardTransform):
    """``B(x) = P x + W2 act(W1 x + b1) + b2`` (act: relu or exact gelu).

    W2 starts at zero, so training starts from the linear map ``P x``. Exports as two layers:
    ``[W1; P]`` with the activation on the first ``hidden`` outputs, then ``[W2, I]`` with ``b2``.
    """

    kind = "mlp"

    def __init__(self, d_in: int, d_out: int, hidden: int = 64, activation: str = "relu") -> None:
        super().__init__(d_in, d_out)
        if activation not in ("relu", "gelu"):
            raise ValueError(f"activation must be 'relu' or 'gelu', got {activation!r}")
        if int(hidden) < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        self.hidden = int(hidden)
        self.activation = activation
        self.p = nn.Linear(self.d_in, self.d_out, bias=False)
        self.w1 = nn.Linear(self.d_in, self.hidden, bias=True)
        self.w2 = nn.Linear(self.hidden, self.d_out, bias=True)
        nn.init.zeros_(self.w2.weight)
        nn.init.zeros_(self.w2.bias)

    def _act(self, h: torch.Tensor) -> torch.Tensor:
        return F.relu(h) if self.activation == "relu" else F.gelu(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return self.p(x) + self.w2(self._act(self.w1(x)))

    def export_arrays(self):
        w1, b1, p = _np(self.w1.weight), _np(self.w1.bias), _np(self.p.weight)
        w2, b2 = _np(self.w2.weight), _np(self.w2.bias)
        first = (np.vstack([w1, p]), np.concatenate([b1, np.zeros(self.d_out, np.float32)]), self.activation, self.hidden)
        second = (np.hstack([w2, np.eye(self.d_out, dtype=np.float32)]), b2, "none", None)
        return [first, second]

    def extra_repr(self) -> str:
        return f"{self.d_in} -> {self.d_out}, hidden={self.hidden}, activation={self.activation}"


class TruncateTransform(BackwardTransform):
    """``B(x) = x[:, :d_out]`` (fixed): joint-notrans's transform, and how nobc is consumed."""

    kind = "truncate"
    trainable = False

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__(d_in, d_out)
        if self.d_out > self.d_in:
            raise ValueError(f"truncation needs d_out <= d_in, got d_in={self.d_in}, d_out={self.d_out}")
        # a buffer, so that .to(device) moves it with the module; not saved (nothing to learn)
        self.register_buffer("_eye", torch.eye(self.d_out, self.d_in), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return x[:, : self.d_out]

    def linear_part(self) -> torch.Tensor:
        return self._eye

    def export_arrays(self):
        return [(np.eye(self.d_out, self.d_in, dtype=np.float32), None, "none", None)]


class IdentityTransform(TruncateTransform):
    """``B(x) = x`` (fixed): fix-m0 and finetune-m0 keep one embedding space."""

    kind = "identity"

    def __init__(self, d: int, d_out: int | None = None) -> None:
        if d_out is not None and int(d_out) != int(d):
            raise ValueError(f"identity transform needs d_in == d_out, got {d} and {d_out}")
        super().__init__(d, d)


def make_transform(kind: str, d_in: int, d_out: int, **options: Any) -> BackwardTransform:
    """Build a backward transform of the given kind (see :data:`TRANSFORM_KINDS`).

    ``options``: ``rank`` (lowrank), ``bias``/``scale`` (orthogonal), ``hidden``/``activation`` (mlp).
    """
    classes = {
        "linear": LinearTransform, "affine": AffineTransform, "lowrank": LowRankAffineTransform,
        "orthogonal": OrthogonalTransform, "mlp": ResidualMLPTransform,
        "truncate": TruncateTransform, "identity": IdentityTransform,
    }
    if kind not in classes:
        raise ValueError(f"unknown transform kind {kind!r}; expected one of {TRANSFORM_KINDS}")
    return classes[kind](d_in, d_out, **options)


def apply_layers_numpy(layers: list[Any], x: np.ndarray) -> np.ndarray:
    """Float64 reference application of a layer program ``[(W, b, act, width) | Layer, ...]``.

    A thin front of :func:`bc_fast.engine.fusion.apply_layers_reference` that also takes the tuples of
    :meth:`BackwardTransform.export_arrays`.
    """
    from ..engine.fusion import apply_layers_reference
    from ..engine import Layer

    return apply_layers_reference([l if isinstance(l, Layer) else Layer(*l) for l in layers], x)
