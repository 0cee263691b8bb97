"""crc32 of array bytes, at memory speed where a SIMD implementation is installed.

The checksum is zlib's crc32 (the values the conversion journal and sidecar have always recorded).
``zlib-ng`` (a dependency; PCLMUL/VPCLMUL folding, tens of GB/s) computes it when importable, the
standard library's ``zlib`` (about 4 GB/s) otherwise; both release the GIL and give identical values.
"""

from __future__ import annotations

import zlib

import numpy as np

try:
    from zlib_ng.zlib_ng import crc32 as _crc32
    CRC32_IMPLEMENTATION = "zlib-ng"
except ImportError:  # pragma: no cover - zlib-ng is a dependency; a platform without a wheel falls back
    _crc32 = zlib.crc32
    CRC32_IMPLEMENTATION = "zlib"

__all__ = ["CRC32_IMPLEMENTATION", "crc32_array"]


def crc32_array(a: np.ndarray) -> int:
    """zlib's crc32 of an array's bytes in C order (a non-contiguous array is copied first)."""
    return _crc32(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
