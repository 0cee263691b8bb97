"""The bc-fast command: argument parsing, output and exit codes (the work is tested elsewhere)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from bc_fast.cli import build_parser, main
from bc_fast.store.registry import Registry


def test_info_prints_build_info(capsys):
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kernel"] in ("generic", "avx2", "avx512") and "bc_fast" in info


def test_registry_show(tmp_path, capsys):
    reg = Registry.create(tmp_path / "reg", name="cli-test")
    reg.add_version(dim=4)
    reg.add_version(dim=6, backward=np.ones((4, 6), np.float32))
    assert main(["registry", "show", str(tmp_path / "reg")]) == 0
    out = capsys.readouterr().out
    assert "cli-test" in out and "v1 -> v0" in out


def test_errors_exit_1_with_a_message(tmp_path, capsys):
    assert main(["registry", "show", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("bc-fast registry: error:") and "manifest.json not found" in err


def test_experiment_late_frac_needs_lam_late(capsys):
    assert main(["experiment", "--late-frac", "0.5"]) == 1
    assert "add --lam-late" in capsys.readouterr().err
    assert main(["demo", "--text", "--lam", "4"]) == 1
    assert "trains no recommender; drop --lam" in capsys.readouterr().err
    assert main(["demo", "--text", "--lr", "1e-3", "--distill"]) == 1
    assert "trains no recommender; drop --lr, --distill" in capsys.readouterr().err
    assert main(["experiment", "--lr", "nan"]) == 1
    assert "--lr must be a positive finite learning rate, got nan" in capsys.readouterr().err


def test_resume_is_refused_where_nothing_checkpoints(tmp_path, capsys):
    assert main(["experiment", "--lambdas", "4,16", "--resume", "--out", str(tmp_path)]) == 1
    assert "the lambda sweep has no checkpoints: drop --resume" in capsys.readouterr().err
    assert main(["demo", "--text", "--resume", "--out", str(tmp_path)]) == 1
    assert "drop --data, --items, --columns, --strategies, --seeds and --resume" in capsys.readouterr().err


def test_every_subcommand_has_help(capsys):
    parser = build_parser()
    for cmd in (["info"], ["demo"], ["experiment"], ["registry", "show"], ["convert"], ["bench"]):
        with pytest.raises(SystemExit) as e:
            parser.parse_args(cmd + ["--help"])
        assert e.value.code == 0
    assert "usage: bc-fast" in capsys.readouterr().out


def test_missing_subcommand_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2


@pytest.fixture
def small_registry(tmp_path):
    rng = np.random.default_rng(0)
    reg = Registry.create(tmp_path / "reg")
    reg.add_version(dim=4)
    reg.add_version(dim=6, backward=rng.standard_normal((4, 6)).astype(np.float32))
    np.save(tmp_path / "in.npy", rng.standard_normal((300, 6)).astype(np.float32))
    return reg


def _convert(tmp_path, *extra: str) -> int:
    return main(["convert", str(tmp_path / "in.npy"), str(tmp_path / "out.npy"), "--registry",
                 str(tmp_path / "reg"), "--to", "0", "--threads", "1", *extra])


def test_convert_is_a_bc_fast_subcommand_and_verifies_by_default(tmp_path, small_registry, capsys):
    assert _convert(tmp_path) == 0
    err = capsys.readouterr().err
    assert "converted 300 rows" in err and "verified 256 random rows" in err and "tolerance" in err
    assert _convert(tmp_path, "--verify", "0", "--overwrite") == 0
    err = capsys.readouterr().err
    assert "converted 300 rows" in err and "verified" not in err


def test_convert_errors_exit_1_with_one_line(tmp_path, small_registry, capsys):
    assert _convert(tmp_path, "--verify-tol", "-1") == 1
    err = capsys.readouterr().err
    assert err == "bc-fast convert: error: verify_tol must be a positive finite number, got -1.0\n"
    (tmp_path / "out.npy").write_text("user data")
    assert _convert(tmp_path, "--overwrite") == 1
    err = capsys.readouterr().err
    assert err.startswith("bc-fast convert: error: refusing to overwrite") and err.count("\n") == 1
    assert (tmp_path / "out.npy").read_text() == "user data"


def test_convert_warnings_are_one_line(tmp_path, small_registry, capsys, monkeypatch):
    from bc_fast.store import tables
    orig, calls = tables.NpyWriter.write, [0]

    def write(self, chunk, y, extra):
        calls[0] += 1
        if calls[0] > 3:
            raise KeyboardInterrupt
        orig(self, chunk, y, extra)
    with monkeypatch.context() as m:
        m.setattr(tables.NpyWriter, "write", write)
        m.setattr("bc_fast.convert.journal.time.monotonic", lambda: 1e9 + calls[0] * 10.0)  # journal every chunk
        assert _convert(tmp_path, "--chunk-rows", "50", "--quiet") == 130
    data = bytearray((tmp_path / "out.npy.partial").read_bytes())
    data[-300 * 4 * 4] ^= 0xFF  # flip a byte of chunk 0
    (tmp_path / "out.npy.partial").write_bytes(bytes(data))
    capsys.readouterr()
    assert _convert(tmp_path, "--resume", "--quiet") == 0
    err = capsys.readouterr().err
    assert err.startswith("bc-fast convert: warning: ") and "chunk 0 of the partial output" in err
    assert err.count("\n") == 1


@pytest.fixture
def no_training(monkeypatch):
    """The demo pipeline and the lambda sweep replaced: a call is recorded instead of training."""
    calls = []
    monkeypatch.setattr("bc_fast.experiments.demo.run_demo_pipeline",
                        lambda out, **kw: calls.append(("pipeline", str(out), kw)) or {})
    monkeypatch.setattr("bc_fast.experiments.run_lambda_sweep",
                        lambda out, lams, cfg, **kw: calls.append(("sweep", lams, cfg, kw)) or {})
    return calls


@pytest.mark.parametrize(("argv", "msg"), [
    (["demo", "--blas-threads", "0"], "--blas-threads applies to the text scenario only (demo --text); add --text"),
    (["demo", "--cache", ""], "--cache got an empty value (an unset shell variable?)"),
    (["experiment", "--data", ""], "--data got an empty value (an unset shell variable?)"),
    (["experiment", "--dataset", " "], "--dataset got an empty value (an unset shell variable?)"),
    (["experiment", "--strategies", ",,"], "--strategies names nothing, got ',,'"),
    (["experiment", "--sweep-strategies", "joint-sloss"],
     "--sweep-strategies chooses the strategies of the lambda sweep, which --lambdas starts; add --lambdas"),
    (["experiment", "--lambdas", "1", "--lam", "5"], "--lam 5.0 and --lambdas 1 both set the alignment weight"),
    (["experiment", "--lambdas", "1", "--strategies", "nobc,joint-mloss"],
     "--strategies and --lambdas: the sweep always runs fix-m0, nobc and posthoc-sloss"),
    (["experiment", "--lambdas", "1,abc"], "--lambdas must be comma-separated numbers, got '1,abc'"),
])
def test_ignored_or_empty_options_are_refused(no_training, capsys, tmp_path, argv, msg):
    assert main([*argv, "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"bc-fast {argv[0]}: error: ") and msg in err and err.count("\n") == 1, err
    assert no_training == [] and not (tmp_path / "out").exists()


def test_the_lambda_sweep_gets_its_own_strategies(no_training, tmp_path):
    assert main(["experiment", "--lambdas", "1,4", "--sweep-strategies", "joint-sloss,joint-mloss", "--seeds", "2",
                 "--out", str(tmp_path)]) == 0
    assert main(["experiment", "--lambdas", "16", "--lam-late", "2", "--out", str(tmp_path)]) == 0
    (_, lams, cfg, kw), (_, lams2, cfg2, kw2) = no_training
    assert lams == [1.0, 4.0] and kw == {"data": None, "strategies": ["joint-sloss", "joint-mloss"]}
    assert cfg.seeds == 2 and cfg.lam == 16.0
    assert lams2 == [16.0] and kw2["strategies"] == ["joint-mloss"] and cfg2.lam_late == 2.0


@pytest.mark.parametrize(("seed", "seeds", "msg"), [
    (-1, 1, "seed (--seed) must be an integer in [0, 2**32 - 1], got -1"),
    (2 ** 32, 1, "seed (--seed) must be an integer in [0, 2**32 - 1], got 4294967296"),
    (1.5, 1, "got 1.5"),
    (True, 1, "got True"),
    (2 ** 32 - 2, 3, "(--seed 4294967294, --seeds 3) end at 4294967296"),
])
def test_config_validate_checks_the_seed(seed, seeds, msg):
    from bc_fast.experiments import ExperimentConfig

    with pytest.raises(ValueError, match=re.escape(msg)):
        ExperimentConfig.quick(seed=seed, seeds=seeds).validate()
    ExperimentConfig.quick(seed=2 ** 32 - 2, seeds=2).validate()


def test_a_negative_seed_is_refused_before_the_data_is_read(tmp_path, capsys):
    pd = pytest.importorskip("pandas", reason="--data files are read with pandas")
    from bc_fast.data import synthetic_interactions

    d = synthetic_interactions(60, 40, 1500, seed=0)
    pd.DataFrame({"user": d.user, "item": d.item, "rating": d.rating, "timestamp": d.timestamp}).to_csv(
        tmp_path / "synth.csv", index=False)
    out = tmp_path / "out"
    assert main(["experiment", "--data", str(tmp_path / "synth.csv"), "--seed", "-1", "--strategies",
                 "nobc,joint-mloss", "--device", "cpu", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err == "bc-fast experiment: error: seed (--seed) must be an integer in [0, 2**32 - 1], got -1\n"
    assert not out.exists()
