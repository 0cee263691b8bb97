"""O_DIRECT writes of a buffer's aligned middle (bc_fast._util.direct_io): the file gets exactly the bytes."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from bc_fast._util.direct_io import BLOCK, aligned_empty, open_direct, pwrite_direct


def _file(tmp_path, size: int) -> tuple[str, int]:
    path = str(tmp_path / "f.bin")
    with open(path, "wb") as f:
        f.write(b"\xee" * size)
    return path, os.open(path, os.O_RDWR)


@contextmanager
def _with_direct(tmp_path, size: int):
    """A file of ``size`` 0xEE bytes: its path, a read-write descriptor and an O_DIRECT one (None where
    refused), both closed afterwards."""
    path, fd = _file(tmp_path, size)
    direct = open_direct(path)
    try:
        yield path, fd, direct
    finally:
        os.close(fd)
        if direct is not None:
            os.close(direct)


@pytest.mark.parametrize("offset", [0, 128, 4096, 5000])
def test_aligned_empty_matches_the_offset(offset: int) -> None:
    for shape, dtype in (((3, 5), np.float32), ((1000, 256), np.float16), ((7, 1), np.float64)):
        a = aligned_empty(shape, dtype, offset)
        assert a.shape == shape and a.dtype == dtype and a.flags.c_contiguous and a.flags.writeable
        assert (a.ctypes.data - offset) % BLOCK == 0


@pytest.mark.parametrize("offset,nbytes", [(128, 3 * BLOCK), (0, 2 * BLOCK), (128, 100), (4000, BLOCK + 200),
                                           (128, 10 * BLOCK + 77), (8192, BLOCK)])
def test_same_bytes_as_a_plain_write(tmp_path, offset: int, nbytes: int) -> None:
    with _with_direct(tmp_path, offset + nbytes + 3 * BLOCK) as (path, fd, direct):
        buf = aligned_empty((nbytes, 1), np.uint8, offset)
        buf[:, 0] = np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8)
        assert pwrite_direct(fd, direct, buf, offset)
        os.fsync(fd)
        data = Path(path).read_bytes()
        assert data[offset:offset + nbytes] == buf.tobytes()
        assert set(data[:offset]) <= {0xEE} and set(data[offset + nbytes:]) == {0xEE}


def test_misaligned_buffer_and_no_direct_fd_write_plainly(tmp_path) -> None:
    with _with_direct(tmp_path, 6 * BLOCK) as (path, fd, direct):
        raw = aligned_empty((3 * BLOCK + 1, 1), np.uint8, 128)
        buf = raw[1:]  # address one byte off the offset's alignment
        buf[:, 0] = 7
        assert pwrite_direct(fd, direct, buf, 128)
        assert pwrite_direct(fd, None, buf[:10], 5 * BLOCK)
        data = Path(path).read_bytes()
        assert data[128:128 + 3 * BLOCK] == b"\x07" * (3 * BLOCK) and data[5 * BLOCK:5 * BLOCK + 10] == b"\x07" * 10


def test_a_refused_direct_write_falls_back_with_the_same_bytes(tmp_path) -> None:
    path, fd = _file(tmp_path, 4 * BLOCK)
    refusing = os.open(path, os.O_RDONLY)  # writes through it fail with EBADF, like a filesystem refusing O_DIRECT
    try:
        buf = aligned_empty((2 * BLOCK, 1), np.uint8, 0)
        buf[:, 0] = 9
        assert pwrite_direct(fd, refusing, buf, BLOCK) is False
        assert Path(path).read_bytes()[BLOCK:3 * BLOCK] == b"\x09" * (2 * BLOCK)
    finally:
        os.close(fd)
        os.close(refusing)


def test_conversion_output_is_np_save_bytes_with_direct_writes(tmp_path) -> None:
    """The .npy writer's direct path end to end: a table whose chunks are block multiples, and one whose are not."""
    import io

    from bc_fast import FusedTransform
    from bc_fast.convert import apply_to_table

    rng = np.random.default_rng(0)
    op = FusedTransform.affine((rng.standard_normal((64, 32)) / 6).astype(np.float32))
    for rows, chunk_rows in ((5000, 1024), (3001, 333)):
        x = rng.standard_normal((rows, 32)).astype(np.float32)
        np.save(tmp_path / "in.npy", x)
        out = tmp_path / f"out{rows}.npy"
        apply_to_table(op, tmp_path / "in.npy", out, chunk_rows=chunk_rows, threads=1, verify=16)
        want = io.BytesIO()
        np.save(want, np.concatenate([op.apply(x[i:i + chunk_rows], threads=1) for i in range(0, rows, chunk_rows)]))
        assert out.read_bytes() == want.getvalue()
