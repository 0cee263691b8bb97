"""The bc-fast command: argument parsing, output and exit codes (the work is tested elsewhere)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bc_fast.cli import build_parser, main
from bc_fast.registry import Registry


def test_info_prints_build_info(capsys):
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kernel"] in ("generic", "avx2") and "bc_fast" in info


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
