"""``distill``: each version mapped to version 0 by one fitted affine map instead of the B_k chain."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch", reason="the experiment trains with PyTorch")

from bc_fast.data import synthetic_interactions  # noqa: E402
from bc_fast.experiments import ExperimentConfig, run_experiment  # noqa: E402
from bc_fast.experiments.runner import _direct_maps  # noqa: E402


def test_direct_maps_recover_an_exactly_affine_version() -> None:
    rng = np.random.default_rng(0)
    users0, items0 = rng.standard_normal((300, 6)), rng.standard_normal((500, 6))
    a, b = rng.standard_normal((6, 9)), rng.standard_normal(9)
    # version 1 = an invertible affine image of version 0, plus 40 new users and 60 new items
    new_u, new_i = rng.standard_normal((40, 6)), rng.standard_normal((60, 6))
    users1 = np.vstack([users0, new_u]) @ a + b
    items1 = np.vstack([items0, new_i]) @ a + b
    out = _direct_maps([(users0.astype(np.float32), items0.astype(np.float32)),
                        (users1.astype(np.float32), items1.astype(np.float32))])
    assert out[0][0] is not None and out[1][0].shape == (340, 6) and out[1][1].shape == (560, 6)
    # the new rows were not in the fit, yet are mapped back exactly (the map is affine)
    np.testing.assert_allclose(out[1][0], np.vstack([users0, new_u]), atol=2e-3)
    np.testing.assert_allclose(out[1][1], np.vstack([items0, new_i]), atol=2e-3)


def test_distill_adds_direct_rows_with_the_same_models() -> None:
    cfg = ExperimentConfig.quick(dims=(8, 10, 12), epochs=2, eval_every=1, batch_size=512, consumer_epochs=2,
                                 consumer_seeds=(0,), posthoc_steps=10, degree_bins=4, n_boot=100, distill=True,
                                 strategies=("fix-m0", "nobc", "posthoc-sloss", "joint-mloss"), keep=())
    res = run_experiment(cfg, data=synthetic_interactions(num_users=90, num_items=150, num_edges=3000, seed=4),
                         log=None)
    rows = {r["strategy"]: r for r in res["rows"]}
    assert set(rows) == {"fix-m0", "nobc", "posthoc-sloss", "joint-mloss", "nobc+direct", "joint-mloss+direct"}
    for name in ("nobc", "joint-mloss"):
        assert rows[f"{name}+direct"]["recall"] == rows[name]["recall"]  # same models, same retrieval
        assert rows[f"{name}+direct"]["intended_change"] == rows[name]["intended_change"]
    # a least-squares map to the version-0 table aligns far better than truncating an unrelated model
    assert rows["nobc+direct"]["align_error"] < rows["nobc"]["align_error"]
    assert "joint-mloss+direct" in res["table"]
