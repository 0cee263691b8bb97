"""Bring your own data: interaction files (CSV, TSV, Parquet) with a column mapping.

``load_interactions("ratings.csv", items="movies.csv", columns="user=userId,item=movieId,time=ts")``
reads the interactions, joins the optional item-attribute file on the item column, and
returns :class:`bc_fast.data.InteractionData` through :func:`bc_fast.data.from_dataframe`.

Column mapping keys (``key=column``, comma separated):

* ``user``, ``item``, ``time``, ``rating`` -- interaction columns (defaults: the key's own
  name, ``timestamp`` for ``time``);
* ``attrs`` -- item attribute columns joined by ``+`` (default: every column of the item
  file except the item column and the label; none without an item file);
* ``label`` -- a multi-valued item column (``|``-separated) for the item-genre consumer task.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from .movielens import InteractionData, from_dataframe

__all__ = ["COLUMN_KEYS", "parse_columns", "read_table", "load_interactions"]

COLUMN_KEYS = ("user", "item", "time", "rating", "attrs", "label")
_DEFAULTS = {"user": "user", "item": "item", "time": "timestamp", "rating": "rating"}


def parse_columns(spec: str | Mapping[str, str] | None) -> dict[str, str]:
    """Parse ``"user=userId,item=movieId,time=timestamp,rating=rating"`` into a dict.

    Raises
    ------
    ValueError
        On an unknown key, an entry without ``=``, an empty column name or a repeated key.
    """
    if spec is None:
        return {}
    if isinstance(spec, Mapping):
        pairs = [(str(k), str(v)) for k, v in spec.items()]
    else:
        pairs = []
        for part in str(spec).split(","):
            part = part.strip()
            if not part:
                continue
            if "=" not in part:
                raise ValueError(f"column mapping entry {part!r} is not key=column; expected e.g. "
                                 "'user=userId,item=movieId,time=timestamp,rating=rating'")
            k, v = (x.strip() for x in part.split("=", 1))
            pairs.append((k, v))
    out: dict[str, str] = {}
    for k, v in pairs:
        if k not in COLUMN_KEYS:
            raise ValueError(f"unknown column mapping key {k!r}; expected some of {COLUMN_KEYS}")
        if not v:
            raise ValueError(f"column mapping {k}= names no column")
        if k in out:
            raise ValueError(f"column mapping key {k!r} given twice")
        out[k] = v
    return out


def read_table(path: str | Path) -> Any:
    """Read a CSV (``.csv``), TSV (``.tsv``, ``.tab``) or Parquet (``.parquet``, ``.pq``) file into pandas.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        On another extension, or a file that cannot be parsed (the parser's message included).
    """
    import pandas as pd

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"interaction file {str(p)!r} does not exist")
    sfx = [x.lower() for x in p.suffixes]
    if sfx and sfx[-1] in (".gz", ".bz2", ".xz", ".zst"):  # compressed CSV/TSV: pandas infers the codec
        sfx = sfx[:-1]
    base = sfx[-1][1:] if sfx else ""
    try:
        if base in ("parquet", "pq"):
            return pd.read_parquet(p)
        if base == "csv":
            return pd.read_csv(p)
        if base in ("tsv", "tab"):
            return pd.read_csv(p, sep="\t")
    except (ValueError, OSError, pd.errors.ParserError) as e:
        raise ValueError(f"cannot read {str(p)!r} as {base.upper()}: {e}") from e
    raise ValueError(f"{str(p)!r}: unknown table format {p.suffix!r}; expected .csv, .tsv/.tab or .parquet/.pq")


def load_interactions(path: str | Path, *, items: str | Path | None = None,
                      columns: str | Mapping[str, str] | None = None, n_bins: int = 10,
                      name: str | None = None) -> InteractionData:
    """Interactions (and optional item attributes) from files, ready for the experiment.

    Parameters
    ----------
    path : path
        Interaction table, one row per (user, item, rating, time).
    items : path, optional
        Item-attribute table with the item column (named as in the mapping) and attributes.
    columns : str or mapping, optional
        Column mapping, see the module docstring.
    n_bins : int
        Quantile bins of numeric attributes.
    name : str, optional
        Data set name (default: the file's stem).

    Raises
    ------
    ValueError
        If a mapped column is missing (naming the file and its columns), or a file cannot be read.
    """
    import pandas as pd

    cols = {**_DEFAULTS, **parse_columns(columns)}
    df = read_table(path)
    _require(df, [cols[k] for k in ("user", "item", "time", "rating")], path,
             "map them with --columns user=...,item=...,time=...,rating=...")
    attrs: list[str] = [c for c in cols["attrs"].split("+") if c] if "attrs" in cols else []
    label = cols.get("label")
    if items is not None:
        it = read_table(items)
        _require(it, [cols["item"]], items, f"the item file needs the item column {cols['item']!r}")
        if "attrs" not in cols:
            attrs = [c for c in it.columns if c != cols["item"] and c != label]
        keep = [cols["item"], *[c for c in dict.fromkeys([*attrs, *([label] if label else [])]) if c in it.columns]]
        it = it[keep].drop_duplicates(cols["item"])
        overlap = [c for c in keep[1:] if c in df.columns]
        df = df.drop(columns=overlap).merge(it, on=cols["item"], how="left")
    _require(df, [*attrs, *([label] if label else [])], items or path, "check attrs= / label= in --columns")
    return from_dataframe(df, user=cols["user"], item=cols["item"], rating=cols["rating"], timestamp=cols["time"],
                          item_attributes=tuple(attrs), label_attribute=label, n_bins=n_bins,
                          name=name or Path(path).stem)


def _require(df: Any, names: list[str], path: Any, fix: str) -> None:
    missing = [c for c in names if c not in df.columns]
    if missing:
        raise ValueError(f"{str(path)!r} lacks column(s) {missing}; it has {list(df.columns)}: {fix}")
