"""Old module paths that keep working after the move into role subpackages.

``import bc_fast.registry`` (or ``from bc_fast.registry import Registry``) still works: a finder on
``sys.meta_path`` answers each old name in :data:`MOVED` with the module that now holds the code, the
same object under both names, so ``isinstance`` checks, monkeypatching and pickled class references
agree. New code should use the new paths; these stay for users' existing imports.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType
from typing import Sequence

#: Old module name -> the module that holds its code now.
MOVED: dict[str, str] = {
    "bc_fast.ops": "bc_fast.engine",
    "bc_fast.fusion": "bc_fast.engine.fusion",
    "bc_fast.cuda": "bc_fast.engine.cuda",
    "bc_fast.registry": "bc_fast.store.registry",
    "bc_fast._manifest": "bc_fast.store.manifest",
    "bc_fast.tables": "bc_fast.store.tables",
    "bc_fast.convert_gpu": "bc_fast.convert.gpu",
    "bc_fast.distributed": "bc_fast.convert.distributed",
    "bc_fast.index_build": "bc_fast.index.sharded",
    "bc_fast.experiment": "bc_fast.experiments",
    "bc_fast.experiment_checkpoint": "bc_fast.experiments.checkpoint",
    "bc_fast.demo": "bc_fast.experiments.demo",
    "bc_fast.text_demo": "bc_fast.experiments.text_demo",
    "bc_fast.benchmark": "bc_fast.bench.suite",
    "bc_fast._benchtools": "bc_fast.bench.harness",
    "bc_fast.progress": "bc_fast._util.progress",
    "bc_fast._fileio": "bc_fast._util.fileio",
    "bc_fast._arrays": "bc_fast._util.arrays",
    "bc_fast._text": "bc_fast._util.text",
}


class _AliasLoader(importlib.abc.Loader):
    """Hands out the already-importable target module instead of executing anything."""

    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(self.target)
        self._real_spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = self._real_spec  # the import system set the alias spec on the shared module


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Finds the old names in :data:`MOVED` (and nothing else)."""

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        new = MOVED.get(fullname)
        if new is None:
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader(new))


def install() -> None:
    """Put the finder on ``sys.meta_path`` once (idempotent)."""
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
