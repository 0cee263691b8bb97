"""Paths inside a registry directory, checked: no symlink out of it, no leftover mistaken for data.

What lives here: resolving ``root/rel`` while refusing a symlink that leads outside the registry
(every read and every write goes through :func:`_inside`), recognising what an interrupted
``Registry.create`` left behind (and saying so when the manifest is missing), removing what a killed
writer left, and reading the manifest's bytes with a size cap. The names come from :mod:`.manifest`;
:mod:`.registry` uses these for every file it touches. It may import :mod:`.manifest`,
``bc_fast._util.fileio`` and the standard library only.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

from .._util.fileio import fsync_dir
from .manifest import (LOCK, MANIFEST, MANIFEST_TEMP_NAME, MAX_MANIFEST_BYTES, TEMP_NAME, TRANSFORM_DIR, WEIGHT_NAME,
                       RegistryError)


def _escaping_link(root: Path, rel: str) -> Path | None:
    """The first symlink on the way from ``root`` to ``root/rel`` that resolves outside ``root``, or None."""
    real_root = os.path.realpath(root)
    cur = Path(root)
    for part in Path(rel).parts:
        cur = cur / part
        if os.path.islink(cur):
            real = os.path.realpath(cur)
            if os.path.commonpath([real_root, real]) != real_root:
                return cur
    return None


def _inside(root: Path, rel: str) -> Path:
    """``root/rel``, refusing a path that a symlink leads out of the registry (reads and writes both)."""
    link = _escaping_link(root, rel)
    if link is not None:
        raise RegistryError(
            f"{link} is a symlink to {os.readlink(link)!r}, which leads outside the registry {root}; bc_fast "
            f"refuses to read or write through it. Replace the link with a regular file or folder inside the "
            f"registry (or open the registry at its real location)")
    return root / rel


def _create_leftovers(p: Path) -> list[Path] | None:
    """What an interrupted :meth:`Registry.create` left in ``p`` (no manifest yet), or None if ``p`` holds more.

    A killed create leaves only bc_fast's own names: the lock file, an empty ``transforms/``
    folder, temporary manifest files. Anything else (a weight file, a user's file) is not ours.
    """
    found: list[Path] = []
    for e in p.iterdir():
        if e.name == LOCK and e.is_file() and not e.is_symlink():
            found.append(e)
        elif MANIFEST_TEMP_NAME.match(e.name) and not e.is_symlink():
            found.append(e)
        elif e.name == TRANSFORM_DIR and e.is_dir() and not e.is_symlink():
            inner = list(e.iterdir())
            if any(not TEMP_NAME.match(f.name) or f.is_dir() for f in inner):
                return None
            found.extend(inner + [e])
        else:
            return None
    return found


def _read_manifest_bytes(mpath: Path) -> bytes:
    """The manifest's bytes, refusing absurd sizes before reading them."""
    try:
        size = mpath.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise RegistryError(f"{mpath} is {size} bytes, more than a manifest can be ({MAX_MANIFEST_BYTES}); it is "
                                f"not a bc_fast manifest or is corrupted; restore manifest.json from a backup")
        return mpath.read_bytes()
    except OSError as e:
        raise RegistryError(f"{mpath}: cannot read the manifest: {e}") from e


def _not_found_msg(p: Path) -> str:
    """Why ``p`` has no manifest, and what to do about it."""
    mpath = p / MANIFEST
    if not p.exists():
        return f"{mpath} not found (the directory does not exist); create a registry with Registry.create({str(p)!r})"
    if p.is_dir() and _create_leftovers(p):
        return (f"{mpath} not found: {p} holds only what an interrupted Registry.create left (a lock file and an "
                f"empty {TRANSFORM_DIR}/ folder); run Registry.create({str(p)!r}) again to finish creating it")
    if p.is_dir() and (p / TRANSFORM_DIR).is_dir() and any((p / TRANSFORM_DIR).iterdir()):
        return (f"{mpath} not found, but {p / TRANSFORM_DIR} holds files: the manifest was deleted or lost; "
                f"restore manifest.json from a backup")
    return f"{mpath} not found; {p} is not a bc_fast registry (create one with Registry.create(path))"


def _remove_orphans(root: Path, referenced: set[str], obsolete: Sequence[str]) -> None:
    """Remove bc_fast's own files in ``root`` that the manifest does not reference (``referenced``: its
    normalised transform paths); call under the registry's lock."""
    doomed = [root / f for f in obsolete if os.path.normpath(f) not in referenced]
    tdir = root / TRANSFORM_DIR
    if tdir.is_dir():
        for f in tdir.iterdir():
            rel = os.path.normpath(f"{TRANSFORM_DIR}/{f.name}")
            if TEMP_NAME.match(f.name) or (WEIGHT_NAME.match(f.name) and rel not in referenced):
                doomed.append(f)
    doomed += [f for f in root.iterdir() if MANIFEST_TEMP_NAME.match(f.name)]
    for f in doomed:
        if _escaping_link(root, os.path.relpath(f, root)) is None and not f.is_dir():
            with contextlib.suppress(OSError):
                f.unlink()
    if doomed:
        fsync_dir(tdir if tdir.is_dir() else root)
