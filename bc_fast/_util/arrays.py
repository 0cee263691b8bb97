"""One place that turns array-likes (numpy, torch, DLPack producers) into numpy arrays."""

from __future__ import annotations

from typing import Any

import numpy as np


def bfloat16() -> np.dtype:
    """numpy's bfloat16 dtype (``ml_dtypes.bfloat16``, a dependency): how bf16 rows reach the core."""
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


def is_bfloat16(dt: np.dtype) -> bool:
    """True for native-endian ``ml_dtypes.bfloat16`` (without importing ml_dtypes).

    A byte-swapped bfloat16 (``dt.newbyteorder()``) keeps the name but is no bfloat16 the core or torch can read.
    """
    return dt.itemsize == 2 and dt.name == "bfloat16" and dt.isnative


_FLOAT_DTYPES = frozenset((np.dtype(np.float32), np.dtype(np.float16)))


def is_row_dtype(dt: np.dtype) -> bool:
    """True for the row dtypes the core takes and ``.npy`` tables hold: native-endian float32, float16 and bfloat16.

    bfloat16 is matched by name (:func:`is_bfloat16`): ml_dtypes 0.7.0 takes ~0.75 s to import (numpy 2.4, against
    ~6 ms for 0.6.0), so only a run that meets a bfloat16 array, table or dtype pays for it.
    """
    return dt in _FLOAT_DTYPES or is_bfloat16(dt)


def to_torch(a: np.ndarray) -> Any:
    """A torch tensor sharing ``a``'s memory (bfloat16 through an int16 view, which numpy can share)."""
    import torch

    if is_bfloat16(a.dtype):
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def is_torch(x: Any) -> bool:
    """True for torch tensors (and parameters), without importing torch."""
    return type(x).__module__.startswith("torch")


def as_numpy(x: Any, name: str, *, copy_from_device: bool = False) -> tuple[np.ndarray, bool]:
    """Return ``x`` as a numpy array and whether it was a torch tensor.

    numpy arrays are returned as they are. CPU torch tensors and other DLPack producers are viewed
    zero-copy. With ``copy_from_device=False`` (the compiled core's inputs) a GPU tensor or one that
    requires grad is refused with the fix; with ``copy_from_device=True`` (weights, query batches)
    the tensor is detached and moved to the CPU first.
    """
    if isinstance(x, np.ndarray):
        return x, False
    if is_torch(x) and hasattr(x, "detach"):
        # Negative and conjugate views carry a lazy bit that DLPack does not export: resolve it
        # (a copy) or refuse, never drop it silently.
        lazy = x.is_neg() or x.is_conj()
        if copy_from_device:
            x = x.detach().cpu().resolve_conj().resolve_neg()
        elif lazy:
            raise ValueError(f"{name} is a torch negative/conjugate view; pass {name}.resolve_neg().resolve_conj()")
        else:
            if x.device.type != "cpu":
                raise ValueError(f"{name} is a torch tensor on {x.device}; move it to the CPU first ({name}.cpu())")
            if x.requires_grad:
                raise ValueError(f"{name} requires grad; pass {name}.detach()")
        import torch

        if x.dtype == torch.bfloat16 and x.device.type == "cpu":  # numpy has no bf16: view the bits
            return np.from_dlpack(x.view(torch.int16)).view(bfloat16()), True
        try:
            return np.from_dlpack(x), True
        except (TypeError, BufferError, RuntimeError) as e:
            if copy_from_device:
                return x.numpy(), True
            raise TypeError(f"{name}: cannot view a torch tensor of dtype {x.dtype} without a copy: {e}") from e
    if hasattr(x, "__dlpack__"):
        return np.from_dlpack(x), False
    if copy_from_device:
        return np.asarray(x), False
    raise TypeError(f"{name} must be a numpy array or a CPU torch tensor, got {type(x).__name__}")
