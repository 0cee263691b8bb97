"""The bc-fast command: argument parsing, output and exit codes (the work is tested elsewhere)."""

from __future__ import annotations

import json

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
