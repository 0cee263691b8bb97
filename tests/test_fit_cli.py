"""``bc-fast fit`` end to end, in a subprocess (cwd outside the source tree)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bc_fast.store.registry import Registry


def _bc_fast(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bc_fast.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def pairs(tmp_path: Path) -> Path:
    """A registry with versions of dim 12 (v0) and 16 (v1), and 600 pairs v1 -> v0 with a known affine map."""
    rng = np.random.default_rng(0)
    z1 = rng.standard_normal((600, 16)).astype(np.float32)
    w = rng.standard_normal((12, 16)).astype(np.float32) / 4
    z0 = z1 @ w.T + 0.5 + 0.01 * rng.standard_normal((600, 12)).astype(np.float32)
    np.save(tmp_path / "v1.npy", z1)
    np.save(tmp_path / "v0.npy", z0.astype(np.float32))
    reg = Registry.create(tmp_path / "reg")
    reg.add_version(dim=12)
    reg.add_version(dim=16)
    return tmp_path


def test_fit_cli_auto_writes_the_transform(pairs):
    res = _bc_fast("fit", "--registry", "reg", "--from", "1", "--to", "0", "v1.npy", "v0.npy", "--chunk-rows", "128",
                   cwd=pairs)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "ridge" in out and "procrustes" in out and "lowrank" in out and "chosen ridge: R^2 0.99" in out
    assert "neighbour overlap@10" in out and "wrote transform 1 -> 0 (auto:ridge)" in res.stderr
    reg = Registry.open(pairs / "reg")
    info = reg.transform_info(1, 0)
    assert info.kind == "affine" and info.fit_metrics["adapter"] == "auto:ridge"
    assert info.fit_metrics["val_r2"] > 0.99 and info.fit_metrics["val_cosine"] > 0.99
    assert info.fit_metrics["n_pairs"] == 600 and set(info.fit_metrics["candidates"]) == {"ridge", "procrustes", "lowrank"}
    z1 = np.load(pairs / "v1.npy")
    np.testing.assert_allclose(reg.operator(1, 0).apply(z1), np.load(pairs / "v0.npy"), atol=0.06)


def test_fit_cli_forward_lowrank_and_replace(pairs):
    args = ["fit", "-r", "reg", "--from", "0", "--to", "1", "v0.npy", "v1.npy", "--kind", "lowrank", "--rank", "4"]
    assert _bc_fast(*args, cwd=pairs).returncode == 0
    again = _bc_fast(*args, cwd=pairs)
    assert again.returncode == 1 and "already has a transform 0 -> 1; pass --replace" in again.stderr
    res = _bc_fast(*args, "--replace", "--alpha", "0.5", cwd=pairs)
    assert res.returncode == 0, res.stderr
    info = Registry.open(pairs / "reg").transform_info(0, 1)
    assert info.kind == "lowrank" and info.fit_metrics["rank"] == 4 and info.fit_metrics["alpha"] == 0.5


def test_fit_cli_refusals_write_nothing(pairs):
    before = (pairs / "reg" / "manifest.json").read_bytes()
    cases = [
        (["--from", "1", "--to", "0", "v0.npy", "v1.npy"], "v0.npy has dim 12 but version 1 (source)"),
        (["--from", "1", "--to", "1", "v1.npy", "v0.npy"], "connects adjacent versions"),
        (["--from", "1", "--to", "0", "v1.npy", "missing.npy"], "no such file"),
        (["--from", "1", "--to", "0", "v1.npy", "v0.npy", "--kind", "ridge", "--alpha", "-2"], "alpha must be None"),
        (["--from", "1", "--to", "0", "v1.npy", "v0.npy", "--kind", "lowrank", "--rank", "13"], r"rank must be"),
    ]
    np.save(pairs / "short.npy", np.zeros((10, 12), np.float32))
    cases.append((["--from", "1", "--to", "0", "v1.npy", "short.npy"], "v1.npy has 600 rows but short.npy has 10"))
    for args, msg in cases:
        res = _bc_fast("fit", "--registry", "reg", *args, cwd=pairs)
        assert res.returncode == 1 and res.stderr.startswith("bc-fast fit: error:") and msg in res.stderr, res.stderr
    assert (pairs / "reg" / "manifest.json").read_bytes() == before
    assert json.loads(before)["transforms"] == []


def test_fit_cli_help_says_mlp_loads(pairs):
    res = _bc_fast("fit", "--help", cwd=pairs)
    assert res.returncode == 0 and "--kind mlp loads both files into memory" in " ".join(res.stdout.split())


def test_fit_cli_refuses_an_empty_npy_file_in_one_line(pairs):
    (pairs / "empty.npy").write_bytes(b"")
    before = (pairs / "reg" / "manifest.json").read_bytes()
    res = _bc_fast("fit", "-r", "reg", "--from", "1", "--to", "0", "empty.npy", "v0.npy", cwd=pairs)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.startswith("bc-fast fit: error: ") and res.stderr.count("\n") == 1, res.stderr
    assert "error: SRC: empty.npy is not a plain numeric .npy array (EOFError: No data left in file)" in res.stderr
    assert (pairs / "reg" / "manifest.json").read_bytes() == before


def test_open_npy_names_the_file_it_cannot_read(pairs):
    from bc_fast.fit._streaming import open_npy

    (pairs / "empty.npy").write_bytes(b"")
    with pytest.raises(ValueError, match=r"^SRC: .*empty\.npy is not a plain numeric \.npy array \(EOFError"):
        open_npy(pairs / "empty.npy", "SRC")
