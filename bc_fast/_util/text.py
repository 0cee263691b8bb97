"""Error-message helpers shared by the parsers (registry, tables, conversion, indexes)."""

from __future__ import annotations

from typing import Any


def short_repr(v: Any, limit: int = 60) -> str:
    """repr of a value read from a file, cut to ``limit`` characters.

    A hostile value may be huge or deeply nested; an error message must stay short and never
    fail itself (RecursionError, ints beyond Python's str conversion limit).
    """
    try:
        r = repr(v)
    except (RecursionError, ValueError):
        return f"<{type(v).__name__}>"
    return r if len(r) <= limit else r[:limit - 3] + "..."
