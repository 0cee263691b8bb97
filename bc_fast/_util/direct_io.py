"""Writes that bypass the page cache (``O_DIRECT``) for the block-aligned middle of a buffer.

A buffered ``pwrite`` copies every byte into the page cache on the calling CPU (and, on the VMs we
run on, first-touches fresh pages); on a 2-core machine that copy competes with the GEMM the bytes
came from. ``O_DIRECT`` lets the device read the buffer itself. It needs the file offset, the length
and the buffer address aligned to the device's block: :func:`pwrite_direct` sends the aligned middle
of a write that way and the unaligned head and tail through the ordinary descriptor, so the file gets
exactly the same bytes. :func:`aligned_empty` makes buffers whose address matches a file offset's
alignment. Where a filesystem refuses ``O_DIRECT`` (tmpfs, some network filesystems), everything is
written the ordinary way.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

BLOCK = 4096  # a multiple of every logical block size seen (512, 4096)


def aligned_empty(shape: tuple[int, int], dtype: Any, offset: int) -> np.ndarray:
    """An uninitialised C-contiguous array whose data address is congruent to ``offset`` modulo BLOCK."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + BLOCK, np.uint8)
    shift = (offset - raw.ctypes.data) % BLOCK
    return raw[shift:shift + nbytes].view(dtype).reshape(shape)


def open_direct(path: str) -> int | None:
    """A write-only ``O_DIRECT`` descriptor of an existing file, or None where the platform or filesystem refuses."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_WRONLY | flag)
    except OSError:
        return None


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def pwrite_direct(fd: int, direct_fd: int | None, buf: np.ndarray, offset: int) -> bool:
    """Write ``buf``'s bytes at ``offset``: the block-aligned middle through ``direct_fd`` when the buffer's
    address is aligned like the offset, the rest (or all, otherwise) through ``fd``. Returns False when the
    direct write was refused (the bytes then went through ``fd``): stop passing ``direct_fd``."""
    view = memoryview(np.ascontiguousarray(buf).reshape(-1).view(np.uint8))
    n = len(view)
    head = -offset % BLOCK
    body = (n - head) // BLOCK * BLOCK if n > head else 0
    if direct_fd is None or body == 0 or (buf.ctypes.data - offset) % BLOCK:
        _pwrite_all(fd, view, offset)
        return True
    ok = True
    try:
        _pwrite_all(direct_fd, view[head:head + body], offset + head)
    except OSError:  # EINVAL: this filesystem accepts O_DIRECT at open() but not for this write
        _pwrite_all(fd, view[head:head + body], offset + head)
        ok = False
    _pwrite_all(fd, view[:head], offset)
    _pwrite_all(fd, view[head + body:], offset + head + body)
    return ok
