"""Per-seed checkpoints: an interrupted experiment resumes with the results of an uninterrupted one."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch", reason="the experiment trains with PyTorch")

from bc_fast.data import synthetic_interactions  # noqa: E402
from bc_fast.experiments import ExperimentConfig, run_experiment  # noqa: E402
from bc_fast.experiments.checkpoint import SeedCheckpoints, _decode, _encode  # noqa: E402

TINY = dict(dims=(8, 10, 12), epochs=2, eval_every=1, batch_size=512, consumer_epochs=2, consumer_seeds=(0,),
            posthoc_steps=10, degree_bins=4, n_boot=100, seeds=2,
            strategies=("fix-m0", "nobc", "posthoc-sloss", "joint-mloss"), keep=("joint-mloss", "nobc"))


def _data(seed: int = 4):
    return synthetic_interactions(num_users=90, num_items=150, num_edges=3000, seed=seed)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("ckpt")
    return ckpt, run_experiment(ExperimentConfig.quick(**TINY), data=_data(), log=None, checkpoint_dir=ckpt)


def test_values_round_trip_exactly() -> None:
    rng = np.random.default_rng(0)
    value = {"a": [rng.random(5), 0.1 + 0.2, None, float("nan")], "auc": {1: rng.random(3), 2: np.zeros(0)},
             "b": rng.random((2, 3)).astype(np.float32), "n": np.int64(7)}
    back = _decode(json.loads(json.dumps(_encode(value))))
    np.testing.assert_array_equal(back["a"][0], value["a"][0])
    assert back["a"][1] == 0.1 + 0.2 and back["a"][2] is None and np.isnan(back["a"][3])
    assert set(back["auc"]) == {1, 2} and back["auc"][2].shape == (0,)
    assert back["b"].dtype == np.float32 and np.array_equal(back["b"], value["b"]) and back["n"] == 7


def test_resume_after_an_interruption_gives_the_same_results(uninterrupted, tmp_path) -> None:
    ckpt, full = uninterrupted
    assert sorted(p.name for p in ckpt.iterdir()) == ["seed_0.json", "seed_0_artifacts.npz", "seed_1.json"]
    # the run "died" during seed 1: only seed 0's files are left
    partial = tmp_path / "ckpt"
    partial.mkdir()
    for name in ("seed_0.json", "seed_0_artifacts.npz"):
        (partial / name).write_bytes((ckpt / name).read_bytes())
    lines: list[str] = []
    res = run_experiment(ExperimentConfig.quick(**TINY), data=_data(), log=lines.append, checkpoint_dir=partial,
                         resume=True)
    assert res["resumed_seeds"] == [0] and any("seed 0 restored from" in line for line in lines)
    assert (partial / "seed_1.json").exists()
    assert res["rows"] == full["rows"] and res["comparisons"] == full["comparisons"]
    assert json.dumps(res["raw"], default=lambda a: a.tolist()) == json.dumps(full["raw"], default=lambda a: a.tolist())
    for name in ("joint-mloss", "nobc"):
        a, b = res["artifacts"][name], full["artifacts"][name]
        assert a["dims"] == b["dims"] and a["scores"] == b["scores"]
        for k in range(3):
            np.testing.assert_array_equal(a["user"][k], b["user"][k])
            np.testing.assert_array_equal(a["item"][k], b["item"][k])
        for got, want in zip(a["layers"], b["layers"]):
            for g, w in zip(got, want):
                np.testing.assert_array_equal(g.weight, w.weight)
                assert (g.bias is None) == (w.bias is None) and g.activation == w.activation
    # everything restored: nothing is trained, the timing of the original run is carried over
    again = run_experiment(ExperimentConfig.quick(**TINY), data=_data(), log=None, checkpoint_dir=partial, resume=True)
    assert again["resumed_seeds"] == [0, 1] and again["rows"] == full["rows"]
    assert again["timing"]["seed1"] == pytest.approx(res["timing"]["seed1"], abs=0.01)


def test_resume_refuses_other_settings_data_or_a_damaged_file(uninterrupted, tmp_path) -> None:
    ckpt, _ = uninterrupted
    with pytest.raises(ValueError, match=r"seed_0.json was made with other settings \(epochs=2 there, 3 now\)"):
        run_experiment(ExperimentConfig.quick(**{**TINY, "epochs": 3}), data=_data(), log=None,
                       checkpoint_dir=ckpt, resume=True)
    with pytest.raises(ValueError, match=r"seed_0.json was made on other data"):
        run_experiment(ExperimentConfig.quick(**TINY), data=_data(seed=5), log=None, checkpoint_dir=ckpt, resume=True)
    with pytest.raises(ValueError, match="resume=True needs the checkpoint_dir"):
        run_experiment(ExperimentConfig.quick(**TINY), data=_data(), log=None, resume=True)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "seed_0.json").write_text('{"format": "bc_fast.experiment.seed v2", "seed": 0, "resu')
    with pytest.raises(ValueError, match=r"unreadable experiment seed checkpoint.*delete .*seed_0.json"):
        SeedCheckpoints(bad, ExperimentConfig.quick(**TINY), _data()).load(0, need_artifacts=False)
    good = json.loads((ckpt / "seed_0.json").read_text())
    good["result"]["nobc"]["legacy_recall"]["shape"] = [7, 7]
    (bad / "seed_0.json").write_text(json.dumps(good))
    with pytest.raises(ValueError, match=r"seed_0.json: damaged experiment seed checkpoint \(cannot reshape"):
        SeedCheckpoints(bad, ExperimentConfig.quick(**TINY), _data()).load(0, need_artifacts=False)
    old_scores = json.loads((ckpt / "seed_0.json").read_text()) | {"format": "bc_fast.experiment.seed v1"}
    (bad / "seed_0.json").write_text(json.dumps(old_scores))  # consumer scores of the evaluation before stop 39
    with pytest.raises(ValueError, match="not a bc_fast.experiment.seed v2 checkpoint of seed 0"):
        SeedCheckpoints(bad, ExperimentConfig.quick(**TINY), _data()).load(0, need_artifacts=False)
    (bad / "seed_0.json").write_text(json.dumps({"format": "something else", "seed": 0, "result": {}}))
    with pytest.raises(ValueError, match="not a bc_fast.experiment.seed v2 checkpoint of seed 0"):
        SeedCheckpoints(bad, ExperimentConfig.quick(**TINY), _data()).load(0, need_artifacts=False)


def test_settings_that_do_not_change_a_seed_may_differ(uninterrupted) -> None:
    ckpt, full = uninterrupted
    # fewer seeds, other CI replicates and threads: seed 0 is reused as it is
    res = run_experiment(ExperimentConfig.quick(**{**TINY, "seeds": 1, "n_boot": 50, "threads": 2}), data=_data(),
                         log=None, checkpoint_dir=ckpt, resume=True)
    assert res["resumed_seeds"] == [0]
    assert res["raw"]["recall_test"]["nobc"][0][2].tolist() == full["raw"]["recall_test"]["nobc"][0][2].tolist()


def test_a_checkpoint_predating_a_setting_counts_at_its_default(uninterrupted, tmp_path) -> None:
    ckpt, _ = uninterrupted
    old = tmp_path / "old"
    old.mkdir()
    for name in ("seed_0.json", "seed_0_artifacts.npz"):
        (old / name).write_bytes((ckpt / name).read_bytes())
    doc = json.loads((old / "seed_0.json").read_text())
    del doc["settings"]["distill"]  # written before the setting existed
    (old / "seed_0.json").write_text(json.dumps(doc))
    cfg = ExperimentConfig.quick(**{**TINY, "seeds": 1})
    assert SeedCheckpoints(old, cfg, _data()).load(0, need_artifacts=True) is not None
    with pytest.raises(ValueError, match=r"other settings \(distill=None there, True now\)"):
        SeedCheckpoints(old, ExperimentConfig.quick(**{**TINY, "distill": True}), _data()).load(0, need_artifacts=False)
