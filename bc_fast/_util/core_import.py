"""Importing the compiled core, with a message that says what is wrong when it is missing."""

from __future__ import annotations

import importlib
import importlib.machinery
import os


def check_core() -> None:
    """Import ``bc_fast._core``; where the package folder holds no built core, say so and how to fix it.

    Running Python inside a source checkout imports the ``bc_fast/`` source folder, which has no
    compiled core: without this check that fails as a confusing circular-import error.
    """
    try:
        importlib.import_module("bc_fast._core")
    except ImportError as e:
        folder = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        suffixes = importlib.machinery.EXTENSION_SUFFIXES
        built = any(name.startswith("_core.") and name.endswith(tuple(suffixes)) for name in os.listdir(folder))
        if built:
            raise ImportError(f"bc_fast's compiled core in {folder} failed to load: {e}") from e
        raise ImportError(
            f"bc_fast's compiled core (bc_fast._core) is not in {folder}: this looks like the source folder, "
            "not an installed bc_fast. Run Python from another directory to use the installed package, or "
            "install this checkout with: pip install -e .") from e
