"""A FusedTransform as a torch module: the same layer program, in torch, on any device and dtype."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..engine.operator import FusedTransform

if TYPE_CHECKING:  # torch stays out of bc_fast's import; it is needed only when a module is built
    import torch


def _torch() -> Any:
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"to_torch needs torch ({e}); pip install 'bc_fast[train]' or pip install torch") from None
    return torch


def _keep_float32(fn: Any) -> Any:
    """``fn`` as ``Module._apply`` calls it on each tensor, but never changing a floating tensor's dtype:
    where ``fn`` would (``.half()``, ``.to(dtype)``), the tensor only moves to the device ``fn`` targets."""

    def apply(t: Any) -> Any:
        if not t.is_floating_point():
            return fn(t)
        target = fn(t.new_empty(0))  # the device and dtype fn gives, without rounding t's values
        return fn(t) if target.dtype == t.dtype else t.to(device=target.device)

    return apply


def _module_class() -> type:
    """FusedModule, defined on first use so that importing bc_fast.export does not import torch."""
    global _FusedModule
    if _FusedModule is not None:
        return _FusedModule
    torch = _torch()
    F = torch.nn.functional

    class FusedModule(torch.nn.Module):
        """``y = program(x)`` for ``x`` of shape ``(..., d_in)``: a FusedTransform's layers in torch.

        Each layer is an ``nn.Linear`` (its weights frozen: ``requires_grad=False``) followed by ReLU or
        exact (erf) GELU on the leading ``activation_width`` outputs; then, if the operator
        normalises, ``y / max(||y||, 1e-12)`` computed in float32 and cast back, as bc_fast does.
        Move it with ``.to(device, dtype)``; it works with ``torch.export`` and ``torch.compile``.

        With ``keep_float32=True`` the arithmetic is float32 whatever the input's dtype, as in bc_fast: a
        float16 or bfloat16 ``x`` is cast up and the output rounded once to ``x``'s dtype, and the weights
        stay float32 through dtype casts (``.half()``, also from a parent model); device moves apply.
        """

        def __init__(self, op: FusedTransform, *, keep_float32: bool = False) -> None:
            super().__init__()
            self.keep_float32 = bool(keep_float32)
            self.linears = torch.nn.ModuleList()
            self.activations: list[str] = []
            self.widths: list[int] = []
            for layer in op.layers:
                w = np.asarray(layer.weight, dtype=np.float32)
                lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=layer.bias is not None)
                with torch.no_grad():
                    lin.weight.copy_(torch.from_numpy(w.copy()))
                    if layer.bias is not None:
                        lin.bias.copy_(torch.from_numpy(np.asarray(layer.bias, dtype=np.float32).copy()))
                lin.requires_grad_(False)
                self.linears.append(lin)
                self.activations.append(layer.activation)
                self.widths.append(w.shape[0] if layer.activation_width is None else int(layer.activation_width))
            self.normalize = bool(op.normalize)
            self.d_in, self.d_out = int(op.d_in), int(op.d_out)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[-1] != self.d_in:
                raise ValueError(f"expected inputs with {self.d_in} features in the last dimension, got shape "
                                 f"{tuple(x.shape)}")
            y = x.to(torch.float32) if self.keep_float32 else x
            for lin, act, width in zip(self.linears, self.activations, self.widths):
                y = lin(y)
                if act == "none" or width == 0:
                    continue
                fn = F.relu if act == "relu" else F.gelu
                y = fn(y) if width == lin.out_features else torch.cat([fn(y[..., :width]), y[..., width:]], dim=-1)
            if self.normalize:
                y32 = y.float()
                y = (y32 / y32.norm(dim=-1, keepdim=True).clamp_min(1e-12)).to(y.dtype)
            return y.to(x.dtype) if self.keep_float32 else y

        def _apply(self, fn: Any, recurse: bool = True) -> Any:
            """Applies ``fn`` (a move, a cast) to the weights; with ``keep_float32`` they keep their dtype."""
            return super()._apply(_keep_float32(fn) if self.keep_float32 else fn, recurse)

        def extra_repr(self) -> str:
            return f"d_in={self.d_in}, d_out={self.d_out}, normalize={self.normalize}"

    _FusedModule = FusedModule
    return FusedModule


_FusedModule: type | None = None


def to_torch(op: FusedTransform, *, dtype: Any = None, device: Any = None) -> Any:
    """A ``torch.nn.Module`` computing ``op``'s layer program (float32 weights unless ``dtype`` says).

    ``dtype=torch.float16`` (or bfloat16) gives 16-bit weights and 16-bit arithmetic, the fast choice on a
    GPU: a layer's outputs beyond float16's range (65504) then overflow, where bc_fast computes in float32
    and rounds the output once. Keep the default float32 for an operator with such large intermediate
    values.

    >>> module = to_torch(op, dtype=torch.float16, device="cuda")   # doctest: +SKIP
    >>> old = module(new_embeddings)                                  # doctest: +SKIP
    """
    if not isinstance(op, FusedTransform):
        raise TypeError(f"to_torch takes a FusedTransform, got {type(op).__name__}; build one with "
                        "FusedTransform(layers) or registry.transform(from_version, to_version)")
    module = _module_class()(op)
    if dtype is not None or device is not None:
        module = module.to(device=device, dtype=dtype)
    return module.eval()


def __getattr__(name: str) -> Any:
    if name == "FusedModule":
        return _module_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
