"""Tests of streaming table conversion (bc_fast.convert, bc_fast.store.tables; the CLI is in test_cli.py)."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

from bc_fast import FusedTransform, Layer
from bc_fast.convert import VerificationError, apply_to_table, convert_table, default_verify_tol, read_sidecar
from bc_fast.engine.fusion import apply_layers_reference, flatten_chain

THREADS = 1
DIMS = (24, 40, 64)  # versions 0, 1, 2


@pytest.fixture(scope="module")
def registry(tmp_path_factory, make_chain_registry):
    return make_chain_registry(tmp_path_factory.mktemp("reg") / "registry", DIMS, (6, 8))


def _table(n: int, d: int = DIMS[2], dtype=np.float16, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(dtype)


def _expected(op: FusedTransform, x: np.ndarray, chunk_rows: int, dtype) -> np.ndarray:
    """What the converter must produce: the core applied chunk by chunk."""
    return np.concatenate([op.apply(x[i:i + chunk_rows], out_dtype=dtype, threads=THREADS)
                           for i in range(0, len(x), chunk_rows)] or [np.empty((0, op.d_out), dtype)])


def _write_parquet(path, x: np.ndarray, row_group_size: int, ids=None) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    ids = np.arange(len(x), dtype=np.int64) * 7 if ids is None else ids
    emb = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])
    table = pa.table({"id": ids, "name": [f"item{i}" for i in range(len(x))], "emb": emb})
    pq.write_table(table, path, row_group_size=row_group_size)


def _read_parquet(path):
    pq = pytest.importorskip("pyarrow.parquet")
    t = pq.read_table(path)
    emb = t.column("emb").combine_chunks()
    d = emb.type.list_size
    return t, emb.flatten().to_numpy(zero_copy_only=False).reshape(-1, d)


def _listing(d) -> list[str]:
    return sorted(os.listdir(d))


def _kw(**kw):
    base = dict(threads=THREADS, progress=False)
    base.update(kw)
    return base


# ------------------------------------------------------------------ formats and dtypes

@pytest.mark.parametrize("in_dtype", [np.float16, np.float32])
@pytest.mark.parametrize("out_dtype", [np.float16, np.float32])
def test_npy(tmp_path, registry, in_dtype, out_dtype):
    x = _table(1001, dtype=in_dtype)
    np.save(tmp_path / "in.npy", x)
    res = convert_table(tmp_path / "in.npy", tmp_path / "out.npy", registry=registry, dst=0,
                        dtype=out_dtype, chunk_rows=256, verify=64, **_kw())
    y = np.load(tmp_path / "out.npy")
    assert y.dtype == out_dtype and y.shape == (1001, DIMS[0])
    op = registry.operator(2, 0)
    assert np.array_equal(y, _expected(op, x, 256, out_dtype))
    ref = apply_layers_reference(flatten_chain(registry.chain_layers(2, 0)), x)
    tol = 5e-3 if out_dtype == np.float16 else 1e-4
    assert np.max(np.abs(y - ref) / (np.abs(ref).max())) < tol
    assert res.rows == 1001 and res.chunks == 4 and res.verified_rows == 64
    assert res.verify_max_error < tol
    assert _listing(tmp_path) == ["in.npy", "out.npy", "out.npy.bcfast.json"]
    # the output is exactly what np.save writes
    np.save(tmp_path / "again.npy", y)
    assert (tmp_path / "again.npy").read_bytes() == (tmp_path / "out.npy").read_bytes()


def test_sidecar(tmp_path, registry):
    np.save(tmp_path / "in.npy", _table(300))
    convert_table(tmp_path / "in.npy", tmp_path / "out.npy", registry=registry, src=2, dst=1, **_kw())
    side = read_sidecar(tmp_path / "out.npy")
    assert side["format"] == "bc_fast.table/1"
    assert side["version"] == 1 and side["source_version"] == 2
    assert side["registry_checksum"] == registry.checksum
    assert side["chain_checksum"] == registry.chain_checksum(2, 1)
    assert side["registry"] == os.path.abspath(registry.path)
    assert [(c["from"], c["to"]) for c in side["chain"]] == [(2, 1)]
    assert side["chain"][0]["sha256"] == registry.transform_info(2, 1).sha256
    assert side["table"] == {"format": "npy", "rows": 300, "dim": DIMS[1], "dtype": "float16",
                             "chunk_rows": side["table"]["chunk_rows"]}
    assert side["operator"]["d_in"] == DIMS[2] and side["operator"]["d_out"] == DIMS[1]
    assert len(side["operator"]["sha256"]) == 64
    # a version-1 table cannot be converted as if it were version 2
    with pytest.raises(ValueError, match=r"version-1 table .* use --from 1"):
        convert_table(tmp_path / "out.npy", tmp_path / "again.npy", registry=registry, src=2, dst=0, **_kw())
    res = convert_table(tmp_path / "out.npy", tmp_path / "v0.npy", registry=registry, src=1, dst=0, **_kw())
    assert read_sidecar(res.output)["version"] == 0


def test_npy_shard_dir(tmp_path, registry):
    src = tmp_path / "shards"
    src.mkdir()
    parts = {"a-000.npy": _table(700, seed=2), "a-001.npy": _table(37, seed=3), "a-002.npy": _table(0, seed=4),
             "a-003.npy": _table(513, seed=5)}
    for name, x in parts.items():
        np.save(src / name, x)
    (src / "README.txt").write_text("not a shard")
    res = convert_table(src, tmp_path / "out", registry=registry, dst=0, chunk_rows=256, dtype="float32",
                        verify=100, **_kw())
    op = registry.operator(2, 0)
    assert _listing(tmp_path / "out") == sorted(parts)
    for name, x in parts.items():
        assert np.array_equal(np.load(tmp_path / "out" / name), _expected(op, x, 256, np.float32))
    assert res.rows == 1250 and res.format == "npy_dir"
    side = read_sidecar(tmp_path / "out")
    assert side["files"] == sorted(parts) and side["table"]["format"] == "npy_dir"
    assert _listing(tmp_path) == ["out", "out.bcfast.json", "shards"]


def test_parquet(tmp_path, registry):
    pytest.importorskip("pyarrow")
    x = _table(1000, dtype=np.float16)
    _write_parquet(tmp_path / "in.parquet", x, row_group_size=300)
    res = convert_table(tmp_path / "in.parquet", tmp_path / "out.parquet", registry=registry, dst=1,
                        chunk_rows=128, verify=50, **_kw())
    t, y = _read_parquet(tmp_path / "out.parquet")
    assert t.column_names == ["id", "name", "emb"]
    assert t.column("id").to_pylist() == list(range(0, 7000, 7))
    assert t.column("name").to_pylist()[999] == "item999"
    assert str(t.schema.field("emb").type.value_type) == "halffloat"
    op = registry.operator(2, 1)
    # chunks never cross row groups: 300 = 128 + 128 + 44
    want = np.concatenate([_expected(op, x[i:i + 300], 128, np.float16) for i in range(0, 1000, 300)])
    assert np.array_equal(y, want)
    meta = json.loads(t.schema.metadata[b"bc_fast"])
    assert meta["version"] == 1 and meta["registry_checksum"] == registry.checksum
    assert res.verified_rows == 50
    assert _listing(tmp_path) == ["in.parquet", "out.parquet", "out.parquet.bcfast.json"]


def test_normalize(tmp_path, registry):
    np.save(tmp_path / "in.npy", _table(500, dtype=np.float32))
    convert_table(tmp_path / "in.npy", tmp_path / "out.npy", registry=registry, dst=0, normalize=True,
                  verify=20, **_kw())
    y = np.load(tmp_path / "out.npy")
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, rtol=1e-5)
    assert read_sidecar(tmp_path / "out.npy")["operator"]["normalize"] is True


def test_core_level_and_empty_table(tmp_path):
    rng = np.random.default_rng(3)
    op = FusedTransform([Layer(rng.standard_normal((16, 8)).astype(np.float32), None, "gelu"),
                         Layer(rng.standard_normal((5, 16)).astype(np.float32))])
    np.save(tmp_path / "in.npy", _table(77, d=8, dtype=np.float32))
    res = apply_to_table(op, tmp_path / "in.npy", tmp_path / "out.npy", provenance={"model": "m1"}, verify=77,
                         **_kw())
    assert res.verified_rows == 77 and read_sidecar(tmp_path / "out.npy")["provenance"] == {"model": "m1"}
    np.save(tmp_path / "empty.npy", np.empty((0, 8), np.float16))
    res = apply_to_table(op, tmp_path / "empty.npy", tmp_path / "empty-out.npy", verify=5, **_kw())
    assert res.rows == 0 and np.load(tmp_path / "empty-out.npy").shape == (0, 5)


# ------------------------------------------------------------------ verify

def test_verify_failure_leaves_nothing(tmp_path, registry):
    np.save(tmp_path / "in.npy", _table(400))
    before = _listing(tmp_path)
    with pytest.raises(VerificationError, match=r"verification failed: \d+ of 30 random rows"):
        convert_table(tmp_path / "in.npy", tmp_path / "out.npy", registry=registry, dst=0, verify=30,
                      reference=lambda x: np.zeros((len(x), DIMS[0])) + 1.0, **_kw())
    assert _listing(tmp_path) == before


def test_verify_is_on_by_default_and_off_with_zero(tmp_path, registry):
    np.save(tmp_path / "in.npy", _table(300, dtype=np.float32))
    res = convert_table(tmp_path / "in.npy", tmp_path / "a.npy", registry=registry, dst=0, **_kw())
    assert res.verified_rows == 256 and res.verify_max_error < 1e-6
    assert res.verify_tol == pytest.approx(default_verify_tol(2, DIMS[2], np.float32))
    assert "tolerance" in res.summary()
    res = convert_table(tmp_path / "in.npy", tmp_path / "b.npy", registry=registry, dst=0, verify=0, **_kw())
    assert res.verified_rows == 0 and res.verify_max_error is None
    assert (tmp_path / "a.npy").read_bytes() == (tmp_path / "b.npy").read_bytes()


def test_default_verify_tol_from_dtypes():
    # float32: 8 (L + 1) sqrt(d) u32, about 1e-5 for two 64-d steps
    assert default_verify_tol(2, 64, np.float32) == pytest.approx(8 * 3 * 8 * 2.0 ** -24)
    assert 5e-6 < default_verify_tol(2, 256, np.float32) < 5e-5
    # a float16 output adds two float16 roundings: about 1e-3
    assert default_verify_tol(2, 256, np.float16) == pytest.approx(2 * 2.0 ** -11, rel=0.05)


@pytest.mark.parametrize("out_dtype, scale, fails", [
    (np.float32, 1e-4, True),   # passed the old fixed 1e-3 tolerance; a real fp32 chain is ~2e-7
    (np.float32, 1e-6, False),
    (np.float16, 1e-4, False),
    (np.float16, 3e-3, True),
])
def test_default_tolerance_catches_small_errors(tmp_path, registry, out_dtype, scale, fails):
    np.save(tmp_path / "in.npy", _table(200, dtype=np.float32))
    layers = flatten_chain(registry.chain_layers(2, 0))
    off = lambda x: apply_layers_reference(layers, x) * (1 + scale)  # noqa: E731
    off.layers = layers  # sets the depth of the default tolerance, as convert_table does
    kw = dict(registry=registry, dst=0, dtype=out_dtype, reference=off, **_kw())
    if fails:
        with pytest.raises(VerificationError, match="verification failed: 200 of 200 random rows"):
            convert_table(tmp_path / "in.npy", tmp_path / "out.npy", **kw)
        assert _listing(tmp_path) == ["in.npy"]
    else:
        assert convert_table(tmp_path / "in.npy", tmp_path / "out.npy", **kw).verified_rows == 200


# ------------------------------------------------------------------ resume

def _interrupt_after(monkeypatch, cls, n_writes: int) -> None:
    """Make cls.write raise KeyboardInterrupt on its n-th call (a run killed mid-way)."""
    orig = cls.write
    calls = [0]

    def write(self, chunk, y, extra):
        calls[0] += 1
        if calls[0] > n_writes:
            raise KeyboardInterrupt
        orig(self, chunk, y, extra)
    monkeypatch.setattr(cls, "write", write)


@pytest.mark.parametrize("form", ["npy", "npy_dir", "parquet"])
def test_resume_is_byte_identical(tmp_path, registry, monkeypatch, form):
    from bc_fast.store import tables
    x = _table(2000, dtype=np.float16, seed=9)
    if form == "npy":
        inp, name = tmp_path / "in.npy", "out.npy"
        np.save(inp, x)
    elif form == "npy_dir":
        inp, name = tmp_path / "in", "out"
        inp.mkdir()
        np.save(inp / "s0.npy", x[:1200])
        np.save(inp / "s1.npy", x[1200:])
    else:
        pytest.importorskip("pyarrow")
        inp, name = tmp_path / "in.parquet", "out.parquet"
        _write_parquet(inp, x, row_group_size=700)
    kw = _kw(registry=registry, dst=0, chunk_rows=150, journal_interval=0)
    convert_table(inp, tmp_path / ("clean-" + name), **kw)

    cls = tables.ParquetWriter if form == "parquet" else tables.NpyWriter
    with monkeypatch.context() as m:
        _interrupt_after(m, cls, 5)
        with pytest.raises(KeyboardInterrupt):
            convert_table(inp, tmp_path / name, **kw)
    journal = json.loads((tmp_path / (name + ".partial.journal.json")).read_text())
    assert journal["done_chunks"] == 5 and not journal["complete"]
    assert not (tmp_path / name).exists()
    with pytest.raises(FileExistsError, match=r"partial conversion .*\(--resume\) to continue"):
        convert_table(inp, tmp_path / name, **kw)
    with pytest.raises(ValueError, match="different conversion .*dtype"):
        convert_table(inp, tmp_path / name, resume=True, **dict(kw, dtype="float32"))
    res = convert_table(inp, tmp_path / name, resume=True, **dict(kw, chunk_rows=None))
    assert res.resumed_rows == journal["done_rows"] > 0 and res.chunk_rows == 150

    def content(p):
        if p.is_dir():
            return {f: (p / f).read_bytes() for f in _listing(p)}
        return p.read_bytes()
    assert content(tmp_path / name) == content(tmp_path / ("clean-" + name))
    leftovers = [f for f in _listing(tmp_path) if "partial" in f or f.endswith((".tmp", ".lock"))]
    assert leftovers == []




def test_resume_after_sigkill(tmp_path, registry, kill_convert_midway):
    x = _table(6000, dtype=np.float16, seed=11)
    np.save(tmp_path / "in.npy", x)
    args = ["convert", str(tmp_path / "in.npy"), str(tmp_path / "out.npy"), "--registry", str(registry.path),
            "--to", "0", "--chunk-rows", "50", "--threads", "1", "--quiet"]
    journal = tmp_path / "out.npy.partial.journal.json"
    kill_convert_midway(args, journal, writer="NpyWriter", after_chunks=10, cwd=tmp_path, delay=0.03)
    assert not (tmp_path / "out.npy").exists() and (tmp_path / "out.npy.partial").exists()
    res = convert_table(tmp_path / "in.npy", tmp_path / "out.npy", registry=registry, dst=0, resume=True, **_kw())
    assert 500 <= res.resumed_rows < 6000
    op = registry.operator(2, 0)
    assert np.array_equal(np.load(tmp_path / "out.npy"), _expected(op, x, 50, np.float16))
    assert _listing(tmp_path) == ["in.npy", "out.npy", "out.npy.bcfast.json"]


# ------------------------------------------------------------------ bad input

def _bad(tmp_path, exc, match, *args, **kw):
    before = _listing(tmp_path)
    with pytest.raises(exc, match=match):
        convert_table(*args, **_kw(**kw))
    assert _listing(tmp_path) == before


@pytest.mark.parametrize("form", ["nan", "inf"])
def test_non_finite_input_row_is_refused_and_named(tmp_path, registry, form):
    """A NaN/Inf input row outside the verified sample: named in the error, nothing published."""
    x = _table(3000, dtype=np.float32, seed=4)
    x[2345, 7] = np.nan if form == "nan" else -np.inf
    np.save(tmp_path / "in.npy", x)
    _bad(tmp_path, ValueError, r"input row 2345 of .*in\.npy holds NaN or Inf", tmp_path / "in.npy",
         tmp_path / "out.npy", registry=registry, dst=0, chunk_rows=500, verify=4, journal_interval=0)


def test_float16_overflow_is_refused_and_named(tmp_path):
    """Finite inputs whose transformed values exceed float16's range: the float16 conversion names the row and
    says to convert to float32 (which then works); nothing is published."""
    op = FusedTransform([Layer(np.eye(8, dtype=np.float32) * 1000.0)])
    x = _table(3000, d=8, dtype=np.float32, seed=5)
    x[1234, 3] = 70.0  # 70,000 after the map: above float16's 65,504
    np.save(tmp_path / "in.npy", x)
    with pytest.raises(ValueError, match=r"converted row 1234 of .* is not finite in float16: .* \(65504\) .*"
                                         r"Convert to float32"):
        apply_to_table(op, tmp_path / "in.npy", tmp_path / "out.npy", dtype=np.float16, chunk_rows=500, verify=4,
                       **_kw())
    assert _listing(tmp_path) == ["in.npy"]
    apply_to_table(op, tmp_path / "in.npy", tmp_path / "out.npy", dtype=np.float32, chunk_rows=500, **_kw())
    assert np.load(tmp_path / "out.npy")[1234, 3] == np.float32(70000.0)


def test_wrong_dim(tmp_path, registry):
    np.save(tmp_path / "in.npy", _table(10, d=DIMS[1]))
    _bad(tmp_path, ValueError, r"has 40 features per row .* version 2 has dim 64",
         tmp_path / "in.npy", tmp_path / "out.npy", registry=registry, dst=0)


def test_unreadable_and_truncated(tmp_path, registry):
    _bad(tmp_path, FileNotFoundError, "does not exist", tmp_path / "nope.npy", tmp_path / "out.npy",
         registry=registry, dst=0)
    (tmp_path / "junk.npy").write_bytes(b"\x93NUMPYgarbage")
    _bad(tmp_path, ValueError, "not a readable .npy file", tmp_path / "junk.npy", tmp_path / "out.npy",
         registry=registry, dst=0)
    np.save(tmp_path / "in.npy", _table(100))
    data = (tmp_path / "in.npy").read_bytes()
    (tmp_path / "in.npy").write_bytes(data[:-10])
    _bad(tmp_path, ValueError, r"truncated: its header says shape \(100, 64\) float16",
         tmp_path / "in.npy", tmp_path / "out.npy", registry=registry, dst=0)
    np.save(tmp_path / "f64.npy", _table(10, dtype=np.float64))
    _bad(tmp_path, TypeError, "float64 is not supported", tmp_path / "f64.npy", tmp_path / "out.npy",
         registry=registry, dst=0)
    np.save(tmp_path / "fort.npy", np.asfortranarray(_table(10)))
    _bad(tmp_path, ValueError, "Fortran-ordered", tmp_path / "fort.npy", tmp_path / "out.npy",
         registry=registry, dst=0)
    np.save(tmp_path / "vec.npy", _table(1)[0])
    _bad(tmp_path, ValueError, r"expected a 2-D table .*reshape", tmp_path / "vec.npy", tmp_path / "out.npy",
         registry=registry, dst=0)


def test_truncated_parquet(tmp_path, registry):
    pytest.importorskip("pyarrow")
    _write_parquet(tmp_path / "in.parquet", _table(100), row_group_size=50)
    data = (tmp_path / "in.parquet").read_bytes()
    (tmp_path / "in.parquet").write_bytes(data[: len(data) // 2])
    _bad(tmp_path, ValueError, "not a readable Parquet file", tmp_path / "in.parquet", tmp_path / "out.parquet",
         registry=registry, dst=0)


def test_mixed_shard_dims(tmp_path, registry):
    (tmp_path / "in").mkdir()
    np.save(tmp_path / "in" / "a.npy", _table(10))
    np.save(tmp_path / "in" / "b.npy", _table(10, d=DIMS[1]))
    _bad(tmp_path, ValueError, "mixed shard dims: a.npy has dim 64 but b.npy has dim 40",
         tmp_path / "in", tmp_path / "out", registry=registry, dst=0)


def test_output_is_input_or_exists(tmp_path, registry):
    np.save(tmp_path / "in.npy", _table(10))
    _bad(tmp_path, ValueError, r"is \(or overlaps\) the input", tmp_path / "in.npy", tmp_path / "in.npy",
         registry=registry, dst=0)
    os.symlink(tmp_path / "in.npy", tmp_path / "link.npy")
    _bad(tmp_path, ValueError, r"is \(or overlaps\) the input", tmp_path / "in.npy", tmp_path / "link.npy",
         registry=registry, dst=0)
    (tmp_path / "old.npy").write_bytes(b"x")
    _bad(tmp_path, FileExistsError, "already exists.*--overwrite", tmp_path / "in.npy", tmp_path / "old.npy",
         registry=registry, dst=0)
    # a file bc_fast did not write is never overwritten
    _bad(tmp_path, FileExistsError, "refusing to overwrite .*old.npy: it has no bc_fast sidecar",
         tmp_path / "in.npy", tmp_path / "old.npy", registry=registry, dst=0, overwrite=True)
    assert (tmp_path / "old.npy").read_bytes() == b"x"
    convert_table(tmp_path / "in.npy", tmp_path / "new.npy", registry=registry, dst=1, **_kw())
    convert_table(tmp_path / "in.npy", tmp_path / "new.npy", registry=registry, dst=0, overwrite=True, **_kw())
    assert np.load(tmp_path / "new.npy").shape == (10, DIMS[0])
    assert read_sidecar(tmp_path / "new.npy")["version"] == 0


def test_not_enough_disk(tmp_path, registry, monkeypatch):
    import bc_fast.convert.pipeline as convert
    np.save(tmp_path / "in.npy", _table(1000))
    monkeypatch.setattr(convert, "_disk_free", lambda path: 1 << 20)
    _bad(tmp_path, OSError, "not enough disk space .* needs about", tmp_path / "in.npy", tmp_path / "out.npy",
         registry=registry, dst=0)


def test_missing_pyarrow(tmp_path, registry, monkeypatch):
    _write_parquet(tmp_path / "in.parquet", _table(10), row_group_size=10)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    _bad(tmp_path, ImportError, r"pip install bc_fast\[parquet\]", tmp_path / "in.parquet",
         tmp_path / "out.parquet", registry=registry, dst=0)


# ------------------------------------------------------------------ CLI

def test_cli(tmp_path, registry, capsys):
    from bc_fast.cli import main
    np.save(tmp_path / "in.npy", _table(300))
    rc = main(["convert", str(tmp_path / "in.npy"), str(tmp_path / "out.npy"), "--registry", str(registry.path),
               "--to", "1", "--dtype", "float32", "--verify", "10", "--threads", "1"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "converted 300 rows" in err and "verified 10 random rows" in err and "version 2 -> 1" in err
    assert np.load(tmp_path / "out.npy").dtype == np.float32
    rc = main(["convert", str(tmp_path / "in.npy"), str(tmp_path / "out.npy"), "--registry", str(registry.path),
               "--to", "1", "--quiet"])
    assert rc == 1 and "already exists" in capsys.readouterr().err


# ------------------------------------------------------------------ progress

def test_progress_bar_is_drawn_by_tqdm(tmp_path, registry, capsys):
    import tqdm

    from bc_fast._util.progress import Progress
    np.save(tmp_path / "in.npy", _table(1000))
    convert_table(tmp_path / "in.npy", tmp_path / "out.npy", registry=registry, dst=0, chunk_rows=256,
                  threads=THREADS, progress=True)
    err = capsys.readouterr().err
    assert "convert out.npy: 1.0k/1.0k rows (100.0%) |" in err and "rows/s" in err and err.endswith("\n")
    with Progress(5, "q", enabled=False) as bar:  # quiet: nothing drawn, still counted, no tqdm object
        bar.update(5)
    assert bar.n == 5 and bar._bar is None and capsys.readouterr().err == ""
    with Progress(5, "t", enabled=True) as bar:
        assert isinstance(bar._bar, tqdm.tqdm)
