"""What a lambda choice may look at: the selection and test sides of the consumer examples.

Each version's evaluation users are divided by :func:`bc_fast.train.protocol.held_out_split`; the users
without a validation edge are divided here by the same per-user keys, so that every user (and so every
consumer example) lies on exactly one side. The experiment scores consumers on the test side and picks
lambda on the selection side. It imports :mod:`bc_fast.eval.consumers` (and so torch): the runner
imports it inside ``run_experiment`` only.
"""

from __future__ import annotations

import numpy as np

from ..eval.consumers import ConsumerTask, restrict_examples


def user_sides(splits: list, held: list, num_users: int, frac: float, split_seed: int
               ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per version, every user on the selection side and every user on the test side.

    The evaluation users are divided by :func:`bc_fast.train.protocol.held_out_split`; the users without a
    validation edge (user-activity's negatives) are divided by the same per-user keys, ``frac`` of them on
    the selection side, so no consumer example is seen by both a lambda choice and the test scores.
    """
    keys = np.random.default_rng(split_seed).random(num_users)
    sel_side, test_side = [], []
    for s, h in zip(splits, held):
        inactive = np.setdiff1d(np.arange(s.num_users), np.concatenate([h.selection_users, h.test_users]))
        to_sel = keys[inactive] < frac
        sel_side.append(np.union1d(h.selection_users, inactive[to_sel]))
        test_side.append(np.union1d(h.test_users, inactive[~to_sel]))
    return sel_side, test_side


def selection_tasks(tasks: list[ConsumerTask], test_side: list[np.ndarray]) -> list[ConsumerTask]:
    """The user and edge tasks without each version's test-side users: what a lambda choice may look at
    (the test tasks drop the selection side, :func:`user_sides`)."""
    return [restrict_examples(t, test_side) for t in tasks if t.entity != "item"]


def single_class_versions(tasks: list[ConsumerTask]) -> dict[str, list[int]]:
    """``{task: [versions]}``: the scored versions whose labels are empty or of one class (AUC undefined)."""
    out: dict[str, list[int]] = {}
    for t in tasks:
        bad = [k for k in t.score_versions if not _two_classes(t.examples[k][1])]
        if bad:
            out[t.name] = bad
    return out


def _two_classes(y: np.ndarray) -> bool:
    """Whether some label column of ``y`` holds both classes."""
    y = np.asarray(y)
    if y.size == 0:
        return False
    y = y.reshape(len(y), -1)
    return bool(((y.sum(0) > 0) & (y.sum(0) < len(y))).any())
