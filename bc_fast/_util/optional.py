"""Optional dependencies: import one lazily, or say which install extra brings it."""

from __future__ import annotations

import importlib
from typing import Any


def import_optional(module: str, *, needed_for: str, extra: str, packages: str) -> Any:
    """Import ``module``, or raise ImportError naming what needs it and ``pip install "bc-fast[extra]"``.

    ``needed_for`` starts the message ("Chroma stores"), ``packages`` lists what the extra installs.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{needed_for} need the {extra} extra, which is not installed; install it with "
                          f'`pip install "bc-fast[{extra}]"` ({packages})') from e
