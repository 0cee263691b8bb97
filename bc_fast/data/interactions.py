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


def read_table(path: str | Path, what: str = "interaction file") -> Any:
    """Read a CSV (``.csv``), TSV (``.tsv``, ``.tab``) or Parquet (``.parquet``, ``.pq``) file into pandas.

    ``what`` names the file's role in the messages ("interaction file", "item file").

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    IsADirectoryError
        If the path is a directory.
    ValueError
        On another extension, or a file that cannot be parsed (the parser's message included).
    """
    import pandas as pd

    p = Path(path)
    if p.is_dir():
        raise IsADirectoryError(f"{what} {str(p)!r} is a directory; expected one .csv, .tsv/.tab or .parquet/.pq file")
    if not p.is_file():
        raise FileNotFoundError(f"{what} {str(p)!r} does not exist")
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
        If a mapped column is missing (naming the file and its columns), one column is mapped to two of
        user, item, time and rating, the two files' item ids differ in type, or a file cannot be read.
    FileNotFoundError, IsADirectoryError
        If a file does not exist or is a directory (naming the interaction or the item file).
    """
    cols = {**_DEFAULTS, **parse_columns(columns)}
    _check_roles(cols)
    df = read_table(path, "interaction file")
    _require(df, [cols[k] for k in ("user", "item", "time", "rating")], path,
             "map them with --columns user=...,item=...,time=...,rating=...")
    attrs: list[str] = [c for c in cols["attrs"].split("+") if c] if "attrs" in cols else []
    label = cols.get("label")
    wanted = [*attrs, *([label] if label else [])]
    if items is None:
        _require(df, wanted, path, "check attrs= / label= in --columns")
    else:
        it = read_table(items, "item file")
        _require(it, [cols["item"]], items, f"the item file needs the item column {cols['item']!r}")
        if "attrs" not in cols:
            attrs = [c for c in it.columns if c != cols["item"] and c != label]
            wanted = [*attrs, *([label] if label else [])]
        _require_in_either(df, it, wanted, path, items)
        df = _join_items(df, it, [c for c in dict.fromkeys(wanted) if c in it.columns], cols["item"], path, items)
    return from_dataframe(df, user=cols["user"], item=cols["item"], rating=cols["rating"], timestamp=cols["time"],
                          item_attributes=tuple(attrs), label_attribute=label, n_bins=n_bins,
                          name=name or Path(path).stem)


def _check_roles(cols: Mapping[str, str]) -> None:
    """Refuse one column mapped to two of user, item, time and rating."""
    seen: dict[str, str] = {}
    for key in ("user", "item", "time", "rating"):
        if cols[key] in seen:
            raise ValueError(f"--columns maps both {seen[cols[key]]} and {key} to the column {cols[key]!r}; each of "
                             f"user, item, time and rating needs its own column (got {seen[cols[key]]}="
                             f"{cols[key]}, {key}={cols[key]}): map {key}= to another column")
        seen[cols[key]] = key


def _require(df: Any, names: list[str], path: Any, fix: str) -> None:
    missing = [c for c in names if c not in df.columns]
    if missing:
        raise ValueError(f"{str(path)!r} lacks column(s) {missing}; it has {list(df.columns)}: {fix}")


def _require_in_either(df: Any, it: Any, names: list[str], path: Any, items: Any) -> None:
    """Attribute and label columns come from the item file, else from the interaction file."""
    missing = [c for c in names if c not in it.columns and c not in df.columns]
    if missing:
        raise ValueError(f"neither the item file {str(items)!r} (columns {list(it.columns)}) nor the interaction "
                         f"file {str(path)!r} (columns {list(df.columns)}) has column(s) {missing}: check attrs= / "
                         "label= in --columns")


def _join_items(df: Any, it: Any, take: list[str], item: str, path: Any, items: Any) -> Any:
    """Left-join the item file's columns ``take`` (first row per item) onto the interactions."""
    it = it[[item, *take]].drop_duplicates(item)
    df = df.drop(columns=[c for c in take if c in df.columns])
    try:
        return df.merge(it, on=item, how="left")
    except ValueError as e:
        raise ValueError(f"cannot join the item file {str(items)!r} to the interaction file {str(path)!r} on "
                         f"{item!r}: its ids are {it[item].dtype} there but {df[item].dtype} in the interaction "
                         f"file ({e}); expected the same id type in both files: write the ids the same way "
                         "(e.g. both integers)") from e
