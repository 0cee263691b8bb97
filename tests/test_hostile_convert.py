"""Hostile inputs to table conversion: each gets a clear error (or a safe recovery) and leaves
no partial output behind. Add a case here for every new way a user or a crash can hurt a run."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest

import bc_fast.convert.publish as publish
from bc_fast.cli import main
from bc_fast.convert import VerificationError, convert_table, read_sidecar
from bc_fast.convert.journal import _journal_checksum

DIMS = (8, 12, 16)  # versions 0, 1, 2


@pytest.fixture(scope="module")
def registry(tmp_path_factory, make_chain_registry):
    return make_chain_registry(tmp_path_factory.mktemp("reg") / "registry", DIMS, (4, 4))


def _table(n: int, d: int = DIMS[2], dtype=np.float32, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(dtype)


def _kw(registry, **kw):
    base = dict(registry=registry, dst=0, threads=1, progress=False)
    base.update(kw)
    return base


def _tree(d) -> dict:
    """Every file under d with its bytes (symlinks as their target)."""
    out = {}
    for root, dirs, files in os.walk(d):
        for name in dirs + files:
            p = os.path.join(root, name)
            rel = os.path.relpath(p, d)
            if os.path.islink(p):
                out[rel] = "-> " + os.readlink(p)
            elif os.path.isfile(p):
                with open(p, "rb") as f:
                    out[rel] = f.read()
    return out


def _refused(tmp_path, exc, match, *args, **kw):
    """The call raises exc matching match, and nothing under tmp_path changed."""
    before = _tree(tmp_path)
    with pytest.raises(exc, match=match):
        convert_table(*args, **kw)
    assert _tree(tmp_path) == before


def _shard_dir(path, parts: dict) -> None:
    path.mkdir()
    for name, x in parts.items():
        np.save(path / name, x)


# ------------------------------------------------------------------ --overwrite never removes user files

def test_overwrite_refuses_a_directory_of_user_files(tmp_path, registry):
    _shard_dir(tmp_path / "in", {"a.npy": _table(20)})
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    (out / "sub").mkdir()
    (out / "sub" / "data.npy").write_bytes(b"mine")
    _refused(tmp_path, FileExistsError, r"refusing to overwrite .*out: it has no bc_fast sidecar .*never removes",
             tmp_path / "in", out, **_kw(registry, overwrite=True))


def test_overwrite_refuses_a_plain_npy_without_sidecar(tmp_path, registry):
    np.save(tmp_path / "in.npy", _table(20))
    np.save(tmp_path / "out.npy", np.arange(6.0))
    _refused(tmp_path, FileExistsError, "refusing to overwrite .*out.npy: it has no bc_fast sidecar",
             tmp_path / "in.npy", tmp_path / "out.npy", **_kw(registry, overwrite=True))


def test_overwrite_refuses_a_shard_dir_with_an_extra_user_file(tmp_path, registry):
    _shard_dir(tmp_path / "in", {"a.npy": _table(20), "b.npy": _table(5, seed=2)})
    convert_table(tmp_path / "in", tmp_path / "out", **_kw(registry))
    (tmp_path / "out" / "notes.txt").write_text("keep me")
    _refused(tmp_path, FileExistsError, r"holds files bc_fast did not write there \(notes.txt\)",
             tmp_path / "in", tmp_path / "out", **_kw(registry, dst=1, overwrite=True))
    # a shard the sidecar does not list is a user file too, and so is a symlink in place of a shard
    (tmp_path / "out" / "notes.txt").unlink()
    np.save(tmp_path / "out" / "extra.npy", _table(3))
    _refused(tmp_path, FileExistsError, r"\(extra.npy\)", tmp_path / "in", tmp_path / "out",
             **_kw(registry, dst=1, overwrite=True))


def test_overwrite_refuses_a_symlink(tmp_path, registry):
    np.save(tmp_path / "in.npy", _table(20))
    convert_table(tmp_path / "in.npy", tmp_path / "mine.npy", **_kw(registry))
    os.symlink(tmp_path / "mine.npy", tmp_path / "out.npy")
    os.symlink(tmp_path / "mine.npy.bcfast.json", tmp_path / "out.npy.bcfast.json")
    _refused(tmp_path, FileExistsError, "refusing to overwrite .*out.npy: it is a symbolic link",
             tmp_path / "in.npy", tmp_path / "out.npy", **_kw(registry, overwrite=True))
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling.npy")
    _refused(tmp_path, FileExistsError, "symbolic link", tmp_path / "in.npy", tmp_path / "dangling.npy",
             **_kw(registry, overwrite=True))


def test_overwrite_refuses_a_forged_or_foreign_sidecar(tmp_path, registry):
    np.save(tmp_path / "in.npy", _table(20))
    np.save(tmp_path / "out.npy", np.arange(6.0))
    (tmp_path / "out.npy.bcfast.json").write_text("[1, 2]")
    _refused(tmp_path, FileExistsError, "sidecar is not bc_fast's", tmp_path / "in.npy", tmp_path / "out.npy",
             **_kw(registry, overwrite=True))
    (tmp_path / "out.npy.bcfast.json").write_text('{"format": "bc_fast.table/1", "table": {"format": "npy_dir"}}')
    _refused(tmp_path, FileExistsError, "does not describe a single-file table", tmp_path / "in.npy",
             tmp_path / "out.npy", **_kw(registry, overwrite=True))
    (tmp_path / "out.npy.bcfast.json").write_text('{"format": "someone-else/1"}')
    _refused(tmp_path, FileExistsError, "not a bc_fast table sidecar", tmp_path / "in.npy", tmp_path / "out.npy",
             **_kw(registry, overwrite=True))
    # a directory whose sidecar claims files outside it
    (tmp_path / "d").mkdir()
    (tmp_path / "d.bcfast.json").write_text(json.dumps(
        {"format": "bc_fast.table/1", "table": {"format": "npy_dir"}, "files": ["../in.npy"]}))
    _shard_dir(tmp_path / "ins", {"a.npy": _table(4)})
    _refused(tmp_path, FileExistsError, "does not list the shards", tmp_path / "ins", tmp_path / "d",
             **_kw(registry, overwrite=True))


def test_overwrite_replaces_exactly_a_bc_fast_shard_dir(tmp_path, registry):
    _shard_dir(tmp_path / "in", {"a.npy": _table(20), "b.npy": _table(5, seed=2)})
    convert_table(tmp_path / "in", tmp_path / "out", **_kw(registry, dst=1))
    (tmp_path / "in" / "b.npy").unlink()  # the new table has fewer shards: b.npy must go too
    convert_table(tmp_path / "in", tmp_path / "out", **_kw(registry, overwrite=True))
    assert sorted(os.listdir(tmp_path / "out")) == ["a.npy"]
    assert np.load(tmp_path / "out" / "a.npy").shape == (20, DIMS[0])
    assert sorted(os.listdir(tmp_path)) == ["in", "out", "out.bcfast.json"]


# ------------------------------------------------------------------ the journal

def _killed_run(tmp_path, registry, monkeypatch, n_writes: int = 4, rows: int = 600) -> tuple:
    """A conversion of in.npy to out.npy killed after n_writes chunks, and the clean result."""
    from bc_fast.store import tables
    np.save(tmp_path / "in.npy", _table(rows, dtype=np.float16, seed=7))
    kw = _kw(registry, chunk_rows=50, journal_interval=0)
    convert_table(tmp_path / "in.npy", tmp_path / "clean.npy", **kw)
    orig, calls = tables.NpyWriter.write, [0]

    def write(self, chunk, y, extra):
        calls[0] += 1
        if calls[0] > n_writes:
            raise KeyboardInterrupt
        orig(self, chunk, y, extra)
    with monkeypatch.context() as m:
        m.setattr(tables.NpyWriter, "write", write)
        with pytest.raises(KeyboardInterrupt):
            convert_table(tmp_path / "in.npy", tmp_path / "out.npy", **kw)
    return kw, tmp_path / "out.npy.partial.journal.json"


def _edit(journal, fix_checksum: bool, **fields) -> None:
    j = json.loads(journal.read_text())
    j.update(fields)
    if fix_checksum:
        j["checksum"] = _journal_checksum(j)
    journal.write_text(json.dumps(j))


def test_raised_done_chunks_is_refused(tmp_path, registry, monkeypatch):
    kw, journal = _killed_run(tmp_path, registry, monkeypatch)
    _edit(journal, False, done_chunks=12, complete=True)
    _refused(tmp_path, ValueError, "journal was edited or corrupted .*delete .*out.npy.partial",
             tmp_path / "in.npy", tmp_path / "out.npy", resume=True, **kw)
    assert not (tmp_path / "out.npy").exists()


def test_forged_journal_chunks_are_caught_by_their_checksums(tmp_path, registry, monkeypatch):
    kw, journal = _killed_run(tmp_path, registry, monkeypatch)
    j = json.loads(journal.read_text())
    assert j["done_chunks"] == 4
    # claim all 12 chunks done with a journal whose own sha256 is right: the zero rows do not match
    forged = j["crcs"] + [0] * 8
    _edit(journal, True, done_chunks=12, crcs=forged, complete=True, done_rows=600)
    with pytest.warns(RuntimeWarning, match="chunk 4 of the partial output does not match"):
        res = convert_table(tmp_path / "in.npy", tmp_path / "out.npy", resume=True, **kw)
    assert res.resumed_rows == 200
    assert (tmp_path / "out.npy").read_bytes() == (tmp_path / "clean.npy").read_bytes()


def test_corrupted_partial_chunk_is_converted_again(tmp_path, registry, monkeypatch):
    kw, journal = _killed_run(tmp_path, registry, monkeypatch)
    data = bytearray((tmp_path / "out.npy.partial").read_bytes())
    hdr = len(data) - 600 * DIMS[0] * 2
    data[hdr + 60 * DIMS[0] * 2: hdr + 70 * DIMS[0] * 2] = bytes(10 * DIMS[0] * 2)  # zero rows of chunk 1
    (tmp_path / "out.npy.partial").write_bytes(bytes(data))
    with pytest.warns(RuntimeWarning, match="chunk 1 of the partial output"):
        res = convert_table(tmp_path / "in.npy", tmp_path / "out.npy", resume=True, **kw)
    assert res.resumed_rows == 50
    assert (tmp_path / "out.npy").read_bytes() == (tmp_path / "clean.npy").read_bytes()


def test_lowered_done_chunks_is_byte_identical(tmp_path, registry, monkeypatch):
    kw, journal = _killed_run(tmp_path, registry, monkeypatch)
    j = json.loads(journal.read_text())
    _edit(journal, True, done_chunks=2, crcs=j["crcs"][:2], done_rows=100)
    res = convert_table(tmp_path / "in.npy", tmp_path / "out.npy", resume=True, **kw)
    assert res.resumed_rows == 100
    assert (tmp_path / "out.npy").read_bytes() == (tmp_path / "clean.npy").read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["clean.npy", "clean.npy.bcfast.json", "in.npy", "out.npy",
                                            "out.npy.bcfast.json"]


@pytest.mark.parametrize("text, match", [
    ("{}", r"not a bc_fast conversion journal .*format None"),
    ("[1, 2]", "a conversion journal is a JSON object, but this file holds a JSON list"),
    ("{not json", "unreadable conversion journal"),
    ("", "unreadable conversion journal"),
])
def test_malformed_journal(tmp_path, registry, monkeypatch, text, match):
    kw, journal = _killed_run(tmp_path, registry, monkeypatch)
    journal.write_text(text)
    _refused(tmp_path, ValueError, match + r".*delete .*out.npy.partial and .*journal.json",
             tmp_path / "in.npy", tmp_path / "out.npy", resume=True, **kw)


@pytest.mark.parametrize("fields, match", [
    ({"done_chunks": 999}, "done_chunks=999 is not between 0 and n_chunks=12"),
    ({"done_chunks": -1}, "done_chunks=-1"),
    ({"done_chunks": "4"}, "done_chunks='4'"),
    ({"crcs": [1, 2]}, "claims 4 chunks done but records 2 checksums"),
    ({"job": {"chunk_rows": 0}}, "no valid chunk_rows"),
    ({"job": [1]}, "no valid chunk_rows"),
    ({"replacing": {"dir": True, "files": ["../../etc"]}}, "replacing field is malformed"),
    ({"n_chunks": 13, "done_chunks": 4}, "records 13 chunks but the table has 12"),
])
def test_inconsistent_journal_with_a_valid_checksum(tmp_path, registry, monkeypatch, fields, match):
    kw, journal = _killed_run(tmp_path, registry, monkeypatch)
    _edit(journal, True, **fields)
    _refused(tmp_path, ValueError, match, tmp_path / "in.npy", tmp_path / "out.npy", resume=True, **kw)


def test_edited_journal_job_is_a_different_conversion(tmp_path, registry, monkeypatch):
    kw, journal = _killed_run(tmp_path, registry, monkeypatch)
    j = json.loads(journal.read_text())
    job = dict(j["job"], dtype="float32")
    _edit(journal, True, job=job)
    _refused(tmp_path, ValueError, "inconsistent conversion journal: its key does not match its job",
             tmp_path / "in.npy", tmp_path / "out.npy", resume=True, **kw)
    key = hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()
    _edit(journal, True, job=job, key=key)
    _refused(tmp_path, ValueError, r"different conversion \(differs in: dtype\)", tmp_path / "in.npy",
             tmp_path / "out.npy", resume=True, **kw)


def test_resume_with_a_different_operator(tmp_path, registry, monkeypatch):
    kw, journal = _killed_run(tmp_path, registry, monkeypatch)
    _refused(tmp_path, ValueError, r"different conversion \(differs in: operator, provenance\)",
             tmp_path / "in.npy", tmp_path / "out.npy", resume=True, **dict(kw, dst=1))


def test_cli_bad_journal_exits_1_without_traceback(tmp_path, registry, monkeypatch, capsys):
    kw, journal = _killed_run(tmp_path, registry, monkeypatch)
    _edit(journal, False, done_chunks=999)
    capsys.readouterr()
    rc = main(["convert", str(tmp_path / "in.npy"), str(tmp_path / "out.npy"), "-r", str(registry.path),
               "--to", "0", "--resume", "--quiet", "--chunk-rows", "50"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("bc-fast convert: error:") and "edited or corrupted" in err
    assert "Traceback" not in err


# ------------------------------------------------------------------ killed while publishing

def _die_on_replace(monkeypatch, when) -> None:
    """Make publish's os.replace raise KeyboardInterrupt (a kill) on the call where when(src, dst)."""
    real = os.replace

    def replace(src, dst):
        if when(os.fspath(src), os.fspath(dst)):
            raise KeyboardInterrupt
        return real(src, dst)
    monkeypatch.setattr(publish.os, "replace", replace)


@pytest.mark.parametrize("form", ["npy", "npy_dir", "parquet"])
@pytest.mark.parametrize("moment", ["after-table-rename", "before-table-rename"])
def test_killed_while_publishing_resume_finishes(tmp_path, registry, monkeypatch, form, moment):
    x = _table(300, dtype=np.float16, seed=5)
    if form == "npy":
        inp, out = tmp_path / "in.npy", tmp_path / "out.npy"
        np.save(inp, x)
    elif form == "npy_dir":
        inp, out = tmp_path / "in", tmp_path / "out"
        _shard_dir(inp, {"s0.npy": x[:100], "s1.npy": x[100:]})
    else:
        pytest.importorskip("pyarrow", reason="Parquet tables need pyarrow")
        import pyarrow as pa
        import pyarrow.parquet as pq
        inp, out = tmp_path / "in.parquet", tmp_path / "out.parquet"
        emb = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])
        pq.write_table(pa.table({"id": np.arange(300), "emb": emb}), inp, row_group_size=120)
    kw = _kw(registry, chunk_rows=64)
    clean = tmp_path / ("clean" + out.suffix)
    convert_table(inp, clean, **kw)
    if moment == "after-table-rename":
        when = lambda s, d: s.endswith(".bcfast.json.tmp")  # noqa: E731
    else:
        when = lambda s, d: d == str(out)  # noqa: E731
    with monkeypatch.context() as m:
        _die_on_replace(m, when)
        with pytest.raises(KeyboardInterrupt):
            convert_table(inp, out, **kw)
    assert (tmp_path / (out.name + ".partial.journal.json")).exists()
    # a rerun without --resume is told what to do
    with pytest.raises(FileExistsError, match=r"interrupted while publishing .*\(--resume\) to finish it"):
        convert_table(inp, out, **kw)
    res = convert_table(inp, out, resume=True, **kw)
    assert res.already_complete and res.rows == 300 and "already complete" in res.summary()

    def content(p):
        if p.is_dir():
            return {f: (p / f).read_bytes() for f in sorted(os.listdir(p))}
        return p.read_bytes()
    assert content(out) == content(clean)
    assert read_sidecar(out)["version"] == 0
    assert sorted(os.listdir(tmp_path)) == sorted([inp.name, clean.name, clean.name + ".bcfast.json", out.name,
                                                   out.name + ".bcfast.json"])


def test_killed_while_overwriting_a_shard_dir(tmp_path, registry, monkeypatch):
    _shard_dir(tmp_path / "in", {"a.npy": _table(40), "b.npy": _table(30, seed=3)})
    convert_table(tmp_path / "in", tmp_path / "out", **_kw(registry, dst=1))
    with monkeypatch.context() as m:  # the old table is moved aside, then the kill
        _die_on_replace(m, lambda s, d: s.endswith(".partial"))
        with pytest.raises(KeyboardInterrupt):
            convert_table(tmp_path / "in", tmp_path / "out", **_kw(registry, overwrite=True))
    assert (tmp_path / "out.partial.old").is_dir() and not (tmp_path / "out").exists()
    res = convert_table(tmp_path / "in", tmp_path / "out", resume=True, **_kw(registry, overwrite=True))
    assert res.already_complete
    assert read_sidecar(tmp_path / "out")["version"] == 0
    assert np.load(tmp_path / "out" / "a.npy").shape == (40, DIMS[0])
    assert sorted(os.listdir(tmp_path)) == ["in", "out", "out.bcfast.json"]


def test_published_table_edited_before_resume_is_refused(tmp_path, registry, monkeypatch):
    np.save(tmp_path / "in.npy", _table(200))
    with monkeypatch.context() as m:
        _die_on_replace(m, lambda s, d: s.endswith(".bcfast.json.tmp"))
        with pytest.raises(KeyboardInterrupt):
            convert_table(tmp_path / "in.npy", tmp_path / "out.npy", **_kw(registry, chunk_rows=64))
    y = np.load(tmp_path / "out.npy")
    y[100] = 0
    np.save(tmp_path / "out.npy", y)
    _refused(tmp_path, ValueError, r"out.npy does not hold the table the journal .* records: its chunk 1",
             tmp_path / "in.npy", tmp_path / "out.npy", resume=True, **_kw(registry, chunk_rows=64))


def test_resume_after_everything_but_the_lock(tmp_path, registry, capsys):
    np.save(tmp_path / "in.npy", _table(100))
    convert_table(tmp_path / "in.npy", tmp_path / "out.npy", **_kw(registry))
    (tmp_path / "out.npy.partial.lock").write_text("")  # a kill after the journal went, before the lock
    rc = main(["convert", str(tmp_path / "in.npy"), str(tmp_path / "out.npy"), "-r", str(registry.path),
               "--to", "0", "--resume", "--threads", "1"])
    assert rc == 0 and "already complete" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["in.npy", "out.npy", "out.npy.bcfast.json"]
    # resuming into a table made by another conversion is not "complete"
    with pytest.raises(FileExistsError, match="already exists"):
        convert_table(tmp_path / "in.npy", tmp_path / "out.npy", resume=True, **_kw(registry, dst=1))


# ------------------------------------------------------------------ bad inputs and arguments

def test_negative_shape_npy_header(tmp_path, registry):
    np.save(tmp_path / "in.npy", _table(3))
    data = (tmp_path / "in.npy").read_bytes().replace(b"(3, 16)", b"(-3, 16)")
    (tmp_path / "in.npy").write_bytes(data)
    _refused(tmp_path, ValueError, r"in.npy: corrupt .npy header: it declares the negative shape \(-3, 16\)",
             tmp_path / "in.npy", tmp_path / "out.npy", **_kw(registry))
    (tmp_path / "in.npy").write_bytes(data.replace(b"(-3, 16)", b"(-3, -16)"))
    _refused(tmp_path, ValueError, "negative shape", tmp_path / "in.npy", tmp_path / "out.npy", **_kw(registry))


@pytest.mark.parametrize("text, match", [
    ("[1, 2]", r"in.npy.bcfast.json: a bc_fast sidecar is a JSON object, but this file holds a JSON list"),
    ('"v2"', "holds a JSON str"),
    ("{oops", "unreadable bc_fast sidecar"),
    ("[" * 100000 + "]" * 100000, "unreadable bc_fast sidecar"),
])
def test_bad_input_sidecar(tmp_path, registry, text, match):
    np.save(tmp_path / "in.npy", _table(10))
    (tmp_path / "in.npy.bcfast.json").write_text(text)
    _refused(tmp_path, ValueError, match, tmp_path / "in.npy", tmp_path / "out.npy", **_kw(registry))


@pytest.mark.parametrize("threads", [10 ** 30, 2 ** 31, 1025])
def test_threads_beyond_range(tmp_path, registry, capsys, threads):
    np.save(tmp_path / "in.npy", _table(10))
    _refused(tmp_path, ValueError, rf"threads={threads} is more than bc_fast can use \(at most 1024\)",
             tmp_path / "in.npy", tmp_path / "out.npy", **_kw(registry, threads=threads))
    rc = main(["convert", str(tmp_path / "in.npy"), str(tmp_path / "out.npy"), "-r", str(registry.path),
               "--to", "0", "--threads", str(threads)])
    err = capsys.readouterr().err
    assert rc == 1 and "threads=" in err and "Traceback" not in err and "array" not in err


@pytest.mark.parametrize("kw, exc, match", [
    ({"threads": 0}, ValueError, "threads must be a positive integer"),
    ({"chunk_rows": -5}, ValueError, "chunk_rows must be a positive integer"),
    ({"verify": -1}, ValueError, "verify must be a non-negative number of rows"),
    ({"verify": True}, ValueError, "verify must be"),
    ({"verify_tol": float("nan")}, ValueError, "verify_tol must be a positive finite number"),
    ({"verify_tol": -1.0}, ValueError, "verify_tol must be"),
    ({"dtype": "float64"}, TypeError, "output dtype must be float32 or float16"),
    ({"seed": -1}, ValueError, r"seed \(of the verified sample\) must be a non-negative integer"),
    ({"seed": 1.5}, ValueError, "seed"),
    ({"journal_interval": float("nan")}, ValueError, "journal_interval must be a finite number of seconds"),
    ({"journal_interval": "1"}, ValueError, "journal_interval must be"),
    ({"journal_interval": -1}, ValueError, "journal_interval must be"),
])
def test_bad_arguments(tmp_path, registry, kw, exc, match):
    np.save(tmp_path / "in.npy", _table(10))
    _refused(tmp_path, exc, match, tmp_path / "in.npy", tmp_path / "out.npy", **_kw(registry, **kw))


def test_bad_tables(tmp_path, registry):
    out = tmp_path / "out.npy"
    np.save(tmp_path / "int.npy", np.arange(32, dtype=np.int32).reshape(2, 16))
    _refused(tmp_path, TypeError, "dtype int32 is not supported", tmp_path / "int.npy", out, **_kw(registry))
    np.save(tmp_path / "big.npy", _table(4).astype(">f4"))
    _refused(tmp_path, TypeError, "big-endian", tmp_path / "big.npy", out, **_kw(registry))
    np.save(tmp_path / "wrongdim.npy", _table(4, d=DIMS[1]))
    _refused(tmp_path, ValueError, r"has 12 features per row .* dim 16; is --from right",
             tmp_path / "wrongdim.npy", out, **_kw(registry))
    np.save(tmp_path / "trunc.npy", _table(40))
    (tmp_path / "trunc.npy").write_bytes((tmp_path / "trunc.npy").read_bytes()[:-7])
    _refused(tmp_path, ValueError, "trunc.npy: file is truncated", tmp_path / "trunc.npy", out, **_kw(registry))
    (tmp_path / "header-only.npy").write_bytes(b"\x93NUMPY\x01\x00")
    _refused(tmp_path, ValueError, "not a readable .npy file", tmp_path / "header-only.npy", out, **_kw(registry))
    (tmp_path / "obj.npy").write_bytes(b"")
    _refused(tmp_path, ValueError, "not a readable .npy file", tmp_path / "obj.npy", out, **_kw(registry))
    (tmp_path / "notes.txt").write_text("hello")
    _refused(tmp_path, ValueError, "unknown table format", tmp_path / "notes.txt", out, **_kw(registry))
    (tmp_path / "empty").mkdir()
    _refused(tmp_path, ValueError, "holds no .npy shards", tmp_path / "empty", tmp_path / "o", **_kw(registry))


def test_output_paths(tmp_path, registry):
    np.save(tmp_path / "in.npy", _table(10))
    _refused(tmp_path, ValueError, r"is \(or overlaps\) the input", tmp_path / "in.npy", tmp_path / "in.npy",
             **_kw(registry))
    _shard_dir(tmp_path / "shards", {"a.npy": _table(10)})
    _refused(tmp_path, ValueError, r"is \(or overlaps\) the input", tmp_path / "shards",
             tmp_path / "shards" / "out", **_kw(registry))
    _refused(tmp_path, ValueError, r"is \(or overlaps\) the input", tmp_path / "shards",
             tmp_path / "shards" / "a.npy", **_kw(registry))
    _refused(tmp_path, FileNotFoundError, "output directory .*missing does not exist; create it first",
             tmp_path / "in.npy", tmp_path / "missing" / "out.npy", **_kw(registry))
    _refused(tmp_path, ValueError, "must end in .npy", tmp_path / "in.npy", tmp_path / "out.bin",
             **_kw(registry))
    _refused(tmp_path, FileNotFoundError, "input table .* does not exist", tmp_path / "nope.npy",
             tmp_path / "out.npy", **_kw(registry))


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root ignores directory permissions, so a read-only folder is still writable")
def test_read_only_output_dir(tmp_path, registry):
    np.save(tmp_path / "in.npy", _table(10))
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        _refused(tmp_path, PermissionError, "Permission denied", tmp_path / "in.npy", ro / "out.npy",
                 **_kw(registry))
    finally:
        ro.chmod(0o755)


def test_output_dir_not_writable_simulated(tmp_path, registry, monkeypatch):
    """The same failure as a read-only folder, for runs as root: creating the partial output fails."""
    from bc_fast.store import tables
    np.save(tmp_path / "in.npy", _table(10))

    def create(self):
        raise PermissionError(13, f"Permission denied: '{self.temp}'")
    monkeypatch.setattr(tables.NpyWriter, "create", create)
    _refused(tmp_path, PermissionError, r"Permission denied: '.*out.npy.partial'", tmp_path / "in.npy",
             tmp_path / "out.npy", **_kw(registry))


def test_another_conversion_holds_the_lock(tmp_path, registry):
    from bc_fast._util.fileio import FileLock
    np.save(tmp_path / "in.npy", _table(10))
    with FileLock(tmp_path / "out.npy.partial.lock"):
        with pytest.raises(RuntimeError, match="another conversion is writing .*out.npy"):
            convert_table(tmp_path / "in.npy", tmp_path / "out.npy", **_kw(registry))
    assert sorted(os.listdir(tmp_path)) == ["in.npy", "out.npy.partial.lock"]


def test_user_file_named_like_the_partial_output_is_kept(tmp_path, registry):
    np.save(tmp_path / "in.npy", _table(10))
    (tmp_path / "out.npy.partial").write_text("mine")
    _refused(tmp_path, FileExistsError, r"partial conversion .*out.npy.partial", tmp_path / "in.npy",
             tmp_path / "out.npy", **_kw(registry))
    _refused(tmp_path, ValueError, "its journal .* is missing", tmp_path / "in.npy", tmp_path / "out.npy",
             **_kw(registry, resume=True))


def test_verify_failure_leaves_nothing(tmp_path, registry):
    np.save(tmp_path / "in.npy", _table(50))
    _refused(tmp_path, VerificationError, r"verification failed: \d+ of 50 random rows .*--verify-tol",
             tmp_path / "in.npy", tmp_path / "out.npy",
             **_kw(registry, reference=lambda x: np.ones((len(x), DIMS[0]))))


@pytest.mark.parametrize("old, new", [(b"(3, 16)", b"((3, 16)"), (b"'<f4'", b"5"), (b"(3, 16)", b"(3.5, 16)")])
def test_malformed_npy_header(tmp_path, registry, old, new):
    np.save(tmp_path / "in.npy", _table(3))
    (tmp_path / "in.npy").write_bytes((tmp_path / "in.npy").read_bytes().replace(old, new))
    _refused(tmp_path, ValueError, r"in.npy: not a readable .npy file .*write it with np.save",
             tmp_path / "in.npy", tmp_path / "out.npy", **_kw(registry))


_KILL_ON_SIDECAR_RENAME = """
import os, signal, sys
import bc_fast.convert.publish as publish
from bc_fast.cli import main
real = os.replace
def replace(src, dst):
    if str(src).endswith(".bcfast.json.tmp"):
        os.kill(os.getpid(), signal.SIGKILL)  # the table is in place, its sidecar not yet
    return real(src, dst)
publish.os.replace = replace
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_just_after_the_final_rename(tmp_path, registry, capsys):
    import subprocess
    import sys
    np.save(tmp_path / "in.npy", _table(500, dtype=np.float16))
    args = ["convert", str(tmp_path / "in.npy"), str(tmp_path / "out.npy"), "-r", str(registry.path), "--to", "0",
            "--threads", "1", "--chunk-rows", "64", "--quiet"]
    # cwd=tmp_path: the child imports the installed bc_fast, not the source checkout
    proc = subprocess.run([sys.executable, "-c", _KILL_ON_SIDECAR_RENAME] + args, cwd=tmp_path,
                          capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()
    assert (tmp_path / "out.npy").exists() and not (tmp_path / "out.npy.bcfast.json").exists()
    assert main(args) == 1  # a plain rerun says how to finish
    assert "interrupted while publishing" in capsys.readouterr().err
    assert main(args + ["--resume"]) == 0
    convert_table(tmp_path / "in.npy", tmp_path / "clean.npy", **_kw(registry, chunk_rows=64))
    assert (tmp_path / "out.npy").read_bytes() == (tmp_path / "clean.npy").read_bytes()
    assert read_sidecar(tmp_path / "out.npy")["version"] == 0
    assert sorted(os.listdir(tmp_path)) == ["clean.npy", "clean.npy.bcfast.json", "in.npy", "out.npy",
                                            "out.npy.bcfast.json"]


def test_input_changed_before_resume(tmp_path, registry, monkeypatch):
    kw, journal = _killed_run(tmp_path, registry, monkeypatch)
    x = np.load(tmp_path / "in.npy")
    x[0, 0] += 1
    np.save(tmp_path / "in.npy", x)
    os.utime(tmp_path / "in.npy", ns=(1, 1))
    _refused(tmp_path, ValueError, r"different conversion \(differs in: input\)", tmp_path / "in.npy",
             tmp_path / "out.npy", resume=True, **kw)


def test_journal_that_is_a_symlink_or_a_folder(tmp_path, registry, monkeypatch):
    kw, journal = _killed_run(tmp_path, registry, monkeypatch)
    journal.rename(tmp_path / "elsewhere.json")
    os.symlink(tmp_path / "elsewhere.json", journal)
    _refused(tmp_path, ValueError, "journal.json: the conversion journal is not a regular file", tmp_path / "in.npy",
             tmp_path / "out.npy", resume=True, **kw)
    journal.unlink()
    journal.mkdir()
    _refused(tmp_path, ValueError, "not a regular file", tmp_path / "in.npy", tmp_path / "out.npy", resume=True, **kw)


def test_disk_full_mid_run_leaves_nothing(tmp_path, registry, monkeypatch):
    import errno

    from bc_fast.store import tables
    np.save(tmp_path / "in.npy", _table(400))
    orig, calls = tables.NpyWriter.write, [0]

    def write(self, chunk, y, extra):
        calls[0] += 1
        if calls[0] > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        orig(self, chunk, y, extra)
    monkeypatch.setattr(tables.NpyWriter, "write", write)
    _refused(tmp_path, OSError, "No space left on device", tmp_path / "in.npy", tmp_path / "out.npy",
             **_kw(registry, chunk_rows=50))


def test_input_is_the_outputs_partial(tmp_path, registry):
    with open(tmp_path / "x.npy.partial", "wb") as f:
        np.save(f, _table(10))
    _refused(tmp_path, ValueError, r"is \(or overlaps\) the input", tmp_path / "x.npy.partial",
             tmp_path / "x.npy", **_kw(registry))
