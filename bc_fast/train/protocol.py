"""The held-out protocol: each time slice's evaluation users split into a selection half and a test half.

Model selection (the best epoch, any lambda) may only look at the selection half; every
reported number is computed on the test half. The split is a fixed function of the user
and ``split_seed`` -- independent of the training seed -- so paired seeds and strategies
are all scored on exactly the same users.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..data.movielens import VersionSplit

__all__ = ["HeldOutSplit", "held_out_split"]


@dataclass(frozen=True)
class HeldOutSplit:
    """One version's split with its validation edges divided by user.

    Attributes
    ----------
    selection, test : VersionSplit
        The version's split with only the validation edges of the selection / test users
        (training edges unchanged).
    selection_users, test_users : ndarray of int64
        Sorted evaluation users (users with validation edges) of each half.
    """

    selection: VersionSplit
    test: VersionSplit
    selection_users: np.ndarray
    test_users: np.ndarray


def held_out_split(split: VersionSplit, *, num_users: int, frac: float = 0.5, split_seed: int = 0) -> HeldOutSplit:
    """Divide ``split``'s evaluation users deterministically: ``frac`` of them select, the rest test.

    Every user of the data set gets one fixed random key (``numpy`` generator seeded with
    ``split_seed``, drawn for ``num_users`` users); within the slice, the evaluation users
    with the smallest keys (``round(frac * n)``, at least one, and at least one left to
    test) form the selection half.

    Raises
    ------
    ValueError
        If ``frac`` is not in (0, 1), ``num_users`` does not cover the split, or the slice has
        fewer than 2 evaluation users.
    """
    if not 0.0 < frac < 1.0:
        raise ValueError(f"selection fraction must be in (0, 1), got {frac}")
    if num_users < split.num_users:
        raise ValueError(f"num_users={num_users} does not cover the split's {split.num_users} users")
    users = np.unique(split.val_user)
    if users.size < 2:
        raise ValueError(f"the slice ({split.t_train}, {split.t_val}] has {users.size} evaluation user(s); "
                         "the held-out protocol needs at least 2 (use more data or fewer versions)")
    keys = np.random.default_rng(split_seed).random(num_users)
    order = users[np.argsort(keys[users], kind="stable")]
    n_sel = min(max(int(round(frac * users.size)), 1), users.size - 1)
    sel, test = np.sort(order[:n_sel]), np.sort(order[n_sel:])
    return HeldOutSplit(_only(split, sel), _only(split, test), sel.astype(np.int64), test.astype(np.int64))


def _only(split: VersionSplit, users: np.ndarray) -> VersionSplit:
    m = np.isin(split.val_user, users)
    return replace(split, val_user=split.val_user[m], val_item=split.val_item[m], val_rating=split.val_rating[m])
