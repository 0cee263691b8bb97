"""Durable file writes shared by the registry, table conversion, indexes and reports."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import Any


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so that renames and creations inside it are durable."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: temp file in the same folder, fsync, rename, fsync folder.

    A crash leaves either the old file or the new one, never a mix; on error the temp
    file is removed. The folder must exist.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int = 1) -> Path:
    """Write ``obj`` as sorted, indented JSON with :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=indent, sort_keys=True) + "\n").encode())


class FileLock:
    """An exclusive advisory lock on a lock file (POSIX ``flock``), released by the OS if the process dies.

    Use as a context manager or call :meth:`release`. With ``blocking=False`` a lock held by another
    process raises ``RuntimeError(busy_message)`` at once instead of waiting.
    """

    def __init__(self, path: str | os.PathLike, *, blocking: bool = True,
                 busy_message: str = "the lock {path} is held by another process") -> None:
        self.path, self.fd = os.fspath(path), -1
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no cross-process lock
            return
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError as e:
            os.close(self.fd)
            self.fd = -1
            raise RuntimeError(busy_message.format(path=self.path)) from e

    def release(self, *, remove: bool = False) -> None:
        """Release the lock; with ``remove=True`` delete the lock file first (while still holding it)."""
        if self.fd < 0:
            return
        if remove:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        os.close(self.fd)  # closing the descriptor drops the flock
        self.fd = -1

    def __enter__(self) -> "FileLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def read_json_object(path: str | os.PathLike, *, what: str, fix: str) -> dict:
    """Read a file that must hold one JSON object (a sidecar, a journal).

    Raises ValueError naming ``path``, saying it should be a ``what`` and giving ``fix``, when the file
    cannot be read, is not valid JSON (truncated, hand-edited, absurdly nested) or holds another type.
    """
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        reason = "nesting too deep" if isinstance(e, RecursionError) else str(e)[:200]
        raise ValueError(f"{path}: unreadable {what}, not valid JSON (truncated or hand-edited?): {reason}; "
                         f"{fix}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: a {what} is a JSON object, but this file holds a JSON {type(obj).__name__}; "
                         f"{fix}")
    return obj


def is_relative_file(name: Any) -> bool:
    """A file name inside a folder, as a sidecar or journal lists it: a relative, normalised path that
    never climbs out of the folder (``a.npy``, ``data/x.lance``; never ``/x``, ``..``, ``a/../b``)."""
    return (isinstance(name, str) and name not in ("", ".", "..") and not os.path.isabs(name)
            and os.path.normpath(name) == name and not name.startswith(".." + os.sep))


def is_json_int(v: Any) -> bool:
    """True for a JSON integer read by ``json`` (an int that is not a bool)."""
    return isinstance(v, int) and not isinstance(v, bool)
