"""Conversion into and out of LanceDB tables (bc_fast.store.lance) and legacy search in them
(bc_fast.index.lance_search), against the real embedded LanceDB."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

lance = pytest.importorskip("lance", reason="the lance extra is not installed (pip install 'bc-fast[lance]')")
lancedb = pytest.importorskip("lancedb", reason="the lance extra is not installed (pip install 'bc-fast[lance]')")
pa = pytest.importorskip("pyarrow")

from bc_fast.convert import convert_table, read_sidecar
from bc_fast.engine.fusion import apply_layers_reference, flatten_chain

THREADS = 1
DIMS = (24, 40, 64)  # versions 0, 1, 2
PARTS = (500, 301, 200)  # rows per fragment of the input table


@pytest.fixture(scope="module")
def registry(tmp_path_factory, make_chain_registry):
    return make_chain_registry(tmp_path_factory.mktemp("reg") / "registry", DIMS, (6, 8))


def _vectors(x: np.ndarray):
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])


def _make_table(db, x: np.ndarray, name: str = "items", parts=PARTS) -> str:
    """A LanceDB table with ids, names and vectors, appended in ``parts`` (one fragment each)."""
    conn = lancedb.connect(db)
    start = 0
    tbl = None
    for n in parts:
        rows = np.arange(start, start + n)
        data = pa.table({"id": rows * 7, "name": [f"item{i}" for i in rows], "vector": _vectors(x[start:start + n])})
        tbl = conn.create_table(name, data=data) if tbl is None else tbl
        if start:
            tbl.add(data)
        start += n
    return os.path.join(db, f"{name}.lance")


def _x(n: int = sum(PARTS), d: int = DIMS[2], dtype=np.float16, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(dtype)


def _expected(op, x: np.ndarray, chunks: list[tuple[int, int]], dtype) -> np.ndarray:
    """What the converter must produce: the core applied chunk by chunk."""
    return np.concatenate([op.apply(x[a:b], out_dtype=dtype, threads=THREADS) for a, b in chunks])


def _chunks(parts, chunk_rows: int) -> list[tuple[int, int]]:
    out, start = [], 0
    for n in parts:
        out += [(start + a, start + min(n, a + chunk_rows)) for a in range(0, n, chunk_rows)]
        start += n
    return out


def _read(path: str):
    t = lance.dataset(path).to_table()
    emb = t.column("vector").combine_chunks()
    return t, emb.flatten().to_numpy(zero_copy_only=False).reshape(len(t), emb.type.list_size)


def _state(db) -> dict:
    """Every file under the database folder with its size and mtime: what "unchanged" compares."""
    out = {}
    for d, _, names in os.walk(db):
        for n in names:
            p = os.path.join(d, n)
            st = os.stat(p)
            out[os.path.relpath(p, db)] = (st.st_size, st.st_mtime_ns)
    return out


def _kw(**kw):
    base = {"threads": THREADS, "progress": False}
    base.update(kw)
    return base


# ------------------------------------------------------------------ conversion

@pytest.mark.parametrize("in_dtype,out_dtype", [(np.float16, None), (np.float32, np.float32),
                                                (np.float32, np.float16)])
def test_convert_lancedb_table(tmp_path, registry, in_dtype, out_dtype):
    db = str(tmp_path / "db")
    x = _x(dtype=in_dtype)
    src = _make_table(db, x)
    version_before = lance.dataset(src).version
    res = convert_table(src, os.path.join(db, "items_v0.lance"), registry=registry, dst=0, chunk_rows=128,
                        dtype=out_dtype, verify=64, **_kw())
    assert res.format == "lance" and res.rows == len(x) and res.verified_rows == 64

    # LanceDB sees the new table next to the old one; the old one is untouched
    conn = lancedb.connect(db)
    assert sorted(conn.list_tables().tables) == ["items", "items_v0"]
    assert lance.dataset(src).version == version_before
    t, y = _read(os.path.join(db, "items_v0.lance"))
    want_dtype = np.dtype(out_dtype or in_dtype)
    assert y.dtype == want_dtype and y.shape == (len(x), DIMS[0])
    chunks = _chunks(PARTS, 128)
    assert len(lance.dataset(os.path.join(db, "items_v0.lance")).get_fragments()) == len(chunks)

    op = registry.operator(2, 0)
    assert np.array_equal(y, _expected(op, x, chunks, want_dtype))
    ref = apply_layers_reference(flatten_chain(registry.chain_layers(2, 0)), x)
    err = np.linalg.norm(y - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert err.max() < (2e-3 if want_dtype == np.float16 else 1e-4)
    # ids and the other columns carried through, in order
    assert t.column("id").to_pylist() == list(np.arange(len(x)) * 7)
    assert t.column("name").to_pylist() == [f"item{i}" for i in range(len(x))]
    assert t.schema.names == ["id", "name", "vector"]

    side = read_sidecar(os.path.join(db, "items_v0.lance"))
    assert side["version"] == 0 and side["source_version"] == 2 and side["table"]["format"] == "lance"
    meta = json.loads(t.schema.metadata[b"bc_fast"])
    assert meta["version"] == 0 and meta["column"] == "vector"
    assert sorted(os.listdir(db)) == ["items.lance", "items_v0.lance", "items_v0.lance.bcfast.json"]


def test_chained_conversion_and_column_choice(tmp_path, registry):
    """A converted table converts again (2 -> 1 -> 0), and --column picks among several vector columns."""
    db = str(tmp_path / "db")
    x = _x(600, seed=3)
    conn = lancedb.connect(db)
    other = _x(600, d=5, seed=4)
    conn.create_table("two", data=pa.table({"id": np.arange(600), "vector": _vectors(x), "other": _vectors(other)}))
    src = os.path.join(db, "two.lance")
    with pytest.raises(ValueError, match="several fixed-size-list columns"):
        convert_table(src, os.path.join(db, "two_v1.lance"), registry=registry, dst=1, **_kw())
    convert_table(src, os.path.join(db, "two_v1.lance"), registry=registry, dst=1, column="vector", **_kw())
    # the converted table records its vector column, so it needs no --column
    convert_table(os.path.join(db, "two_v1.lance"), os.path.join(db, "two_v0.lance"), registry=registry, src=1,
                  dst=0, **_kw())
    t, y = _read(os.path.join(db, "two_v0.lance"))
    ref = apply_layers_reference(flatten_chain(registry.chain_layers(2, 0)), x)
    assert np.max(np.linalg.norm(y - ref, axis=1) / np.linalg.norm(ref, axis=1)) < 3e-3
    other_out = t.column("other").combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(-1, 5)
    assert np.array_equal(other_out, other)


# ------------------------------------------------------------------ resume

def _convert_interrupted(monkeypatch, src: str, out: str, kw: dict, *, chunks: int, journal_interval: float,
                         sync: bool = False) -> None:
    """Convert ``src`` to ``out``, interrupted (KeyboardInterrupt) once ``chunks`` chunks are written (each made
    durable at once if ``sync``, whatever the journal says)."""
    from bc_fast.store import tables
    orig, calls = tables.LanceWriter.write, [0]

    def write(self, chunk, y, extra):
        calls[0] += 1
        if calls[0] > chunks:
            raise KeyboardInterrupt
        orig(self, chunk, y, extra)
        if sync:
            self.sync()

    with monkeypatch.context() as m:
        m.setattr(tables.LanceWriter, "write", write)
        with pytest.raises(KeyboardInterrupt):
            convert_table(src, out, journal_interval=journal_interval, **kw)


def _assert_same_table(db: str, out: str, clean: str) -> None:
    """``out`` equals the uninterrupted ``clean`` (rows and fragments), and nothing temporary is left in ``db``."""
    a, _ = _read(out)
    b, _ = _read(clean)
    assert a.equals(b)
    assert [f.count_rows() for f in lance.dataset(out).get_fragments()] == [
        f.count_rows() for f in lance.dataset(clean).get_fragments()]
    assert not [f for f in os.listdir(db) if "partial" in f or f.endswith((".tmp", ".lock"))]


def test_resume_drops_chunks_the_journal_does_not_record(tmp_path, registry, monkeypatch):
    """Interrupted with chunks committed after the journal's last entry: resume cuts them and redoes them."""
    db = str(tmp_path / "db")
    x = _x(seed=9)
    src = _make_table(db, x)
    kw = _kw(registry=registry, dst=0, chunk_rows=150)
    convert_table(src, os.path.join(db, "clean.lance"), journal_interval=0, **kw)
    out = os.path.join(db, "out.lance")
    # durable, but the journal (interval 1 h) has recorded none of them
    _convert_interrupted(monkeypatch, src, out, kw, chunks=6, journal_interval=3600, sync=True)
    journal = json.loads(Path(out + ".partial.journal.json").read_text())
    assert journal["done_chunks"] == 0
    assert len(lance.dataset(out + ".partial").get_fragments()) == 6
    res = convert_table(src, out, resume=True, **kw)
    assert res.resumed_rows == 0 and res.rows == len(x)
    _assert_same_table(db, out, os.path.join(db, "clean.lance"))


def test_resume_redoes_the_fragments_from_a_chunk_that_fails_its_checksum(tmp_path, registry, monkeypatch):
    """Resume finds chunk 1 of the partial output changed (its checksum check stands in for an edit on disk):
    the fragments from chunk 1 on are dropped and converted again; the result equals an uninterrupted run."""
    from bc_fast.convert import pipeline
    db = str(tmp_path / "db")
    x = _x(seed=10)
    src = _make_table(db, x)
    kw = _kw(registry=registry, dst=0, chunk_rows=150)
    convert_table(src, os.path.join(db, "clean.lance"), **kw)
    out = os.path.join(db, "out.lance")
    _convert_interrupted(monkeypatch, src, out, kw, chunks=4, journal_interval=0)
    assert json.loads(Path(out + ".partial.journal.json").read_text())["done_chunks"] == 4
    monkeypatch.setattr(pipeline, "_first_bad_chunk", lambda read, chunks, crcs: 1)
    with pytest.warns(RuntimeWarning, match="chunk 1 of the partial output does not match the checksum"):
        res = convert_table(src, out, resume=True, **kw)
    assert res.resumed_rows == 150 and res.rows == len(x)
    _assert_same_table(db, out, os.path.join(db, "clean.lance"))


def test_resume_after_sigkill(tmp_path, registry, kill_convert_midway):
    db = str(tmp_path / "db")
    x = _x(3000, seed=11)
    src = _make_table(db, x, parts=(1700, 1300))
    out = os.path.join(db, "items_v0.lance")
    args = ["convert", src, out, "--registry", str(registry.path), "--to", "0", "--chunk-rows", "50",
            "--threads", "1", "--quiet"]
    journal = out + ".partial.journal.json"
    kill_convert_midway(args, journal, writer="LanceWriter", after_chunks=8, cwd=tmp_path, delay=0.05)
    assert not os.path.exists(out) and os.path.isdir(out + ".partial")

    res = convert_table(src, out, registry=registry, dst=0, resume=True, **_kw())
    assert 400 <= res.resumed_rows < 3000
    clean = os.path.join(str(tmp_path), "clean.lance")
    convert_table(src, clean, registry=registry, dst=0, chunk_rows=50, **_kw())
    a, y = _read(out)
    b, _ = _read(clean)
    assert a.equals(b)
    assert a.column("id").to_pylist() == list(np.arange(3000) * 7)
    op = registry.operator(2, 0)
    assert np.array_equal(y, _expected(op, x, _chunks((1700, 1300), 50), np.float16))
    assert sorted(os.listdir(db)) == ["items.lance", "items_v0.lance", "items_v0.lance.bcfast.json"]
    # no orphan data files from the killed write: exactly the fragments' files
    ds = lance.dataset(out)
    referenced = {d.path for f in ds.get_fragments() for d in f.data_files()}
    assert set(os.listdir(os.path.join(out, "data"))) == referenced


# ------------------------------------------------------------------ refusals leave the store unchanged

def _refused(db, exc, match, *args, **kw):
    before = _state(db)
    with pytest.raises(exc, match=match):
        convert_table(*args, **_kw(**kw))
    assert _state(db) == before


def test_mismatched_dims_refused(tmp_path, registry):
    db = str(tmp_path / "db")
    _make_table(db, _x(200, d=DIMS[1]), parts=(200,))
    src = os.path.join(db, "items.lance")
    _refused(db, ValueError, r"has 40 features per row \(lance, 200 rows, float16\), but version 2 has dim 64",
             src, os.path.join(db, "items_v0.lance"), registry=registry, dst=0)


def test_wrong_version_refused(tmp_path, registry):
    db = str(tmp_path / "db")
    src = _make_table(db, _x(300), parts=(300,))
    v1 = os.path.join(db, "items_v1.lance")
    convert_table(src, v1, registry=registry, dst=1, **_kw())
    # the version-1 table has version 1's dim; the sidecar check comes first and names the fix
    _refused(db, ValueError, r"is a version-1 table \(per its sidecar .*use --from 1", v1,
             os.path.join(db, "items_v0.lance"), registry=registry, src=2, dst=0)


def test_output_must_be_a_lance_table_and_not_exist(tmp_path, registry):
    db = str(tmp_path / "db")
    src = _make_table(db, _x(100), parts=(100,))
    _refused(db, ValueError, r"must end in \.lance", src, os.path.join(db, "items_v0"), registry=registry, dst=0)
    convert_table(src, os.path.join(db, "items_v0.lance"), registry=registry, dst=0, **_kw())
    _refused(db, FileExistsError, "already exists", src, os.path.join(db, "items_v0.lance"), registry=registry,
             dst=0)


def test_overwrite_replaces_a_lance_table_bc_fast_wrote_and_nothing_else(tmp_path, registry):
    db = str(tmp_path / "db")
    x = _x(400)
    src = _make_table(db, x, parts=(400,))
    out = os.path.join(db, "items_v0.lance")
    convert_table(src, out, registry=registry, dst=1, **_kw())  # the wrong version, to be replaced
    res = convert_table(src, out, registry=registry, dst=0, overwrite=True, **_kw())
    t, y = _read(out)
    assert y.shape == (400, DIMS[0]) and read_sidecar(out)["version"] == 0 and res.rows == 400
    assert t.column("id").to_pylist() == list(range(0, 2800, 7))
    assert sorted(os.listdir(db)) == ["items.lance", "items_v0.lance", "items_v0.lance.bcfast.json"]
    assert lancedb.connect(db).open_table("items_v0").count_rows() == 400

    # a file bc_fast did not write (an index, another writer's data) makes it refuse and keep everything
    Path(out, "_indices").mkdir()
    Path(out, "_indices", "user.idx").write_bytes(b"x")
    _refused(db, FileExistsError, r"holds files bc_fast did not write there \(_indices/user.idx\)", src, out,
             registry=registry, dst=0, overwrite=True)


def test_missing_extra_names_it(monkeypatch):
    from bc_fast.store.lance import import_lance
    monkeypatch.setitem(sys.modules, "lance", None)
    with pytest.raises(ImportError, match=r'pip install "bc-fast\[lance\]"'):
        import_lance()


# ------------------------------------------------------------------ legacy search

@pytest.mark.parametrize("metric", ["l2", "cosine", "dot"])
def test_legacy_search_matches_exact_numpy(tmp_path, registry, metric):
    from bc_fast.index.lance_search import LanceLegacyTable

    db = str(tmp_path / "db")
    x = _x(400, dtype=np.float32, seed=5)
    src = _make_table(db, x, parts=(250, 150))
    convert_table(src, os.path.join(db, "items_v0.lance"), registry=registry, dst=0, **_kw())
    table = LanceLegacyTable.open(db, "items_v0", registry)
    assert (table.version, table.source_version, table.d) == (0, 2, DIMS[0])

    q2 = np.random.default_rng(6).standard_normal((7, DIMS[2])).astype(np.float32)
    D, I = table.search(q2, 5, query_version=2, metric=metric)
    # exact search in float64 on the converted vectors with the queries mapped by the operator
    _, y = _read(os.path.join(db, "items_v0.lance"))
    y = y.astype(np.float64)
    q0 = registry.operator(2, 0).apply(q2).astype(np.float64)
    if metric == "l2":
        dist = ((q0[:, None, :] - y[None]) ** 2).sum(-1)
    elif metric == "cosine":
        dist = 1 - (q0 @ y.T) / np.linalg.norm(q0, axis=1)[:, None] / np.linalg.norm(y, axis=1)[None]
    else:
        dist = 1 - (q0 @ y.T)
    order = np.argsort(dist, axis=1)[:, :5]
    assert np.array_equal(I, order * 7)
    np.testing.assert_allclose(D, np.take_along_axis(dist, order, 1), rtol=1e-4, atol=1e-4)
    _, i1 = table.search(q2[3], 5, query_version=2, metric=metric)
    assert np.array_equal(i1, I[3])
    # version-1 queries go through the shorter chain
    q1 = np.random.default_rng(7).standard_normal((2, DIMS[1])).astype(np.float32)
    _, I1 = table.search(q1, 3, query_version=1, metric=metric)
    q10 = registry.operator(1, 0).apply(q1).astype(np.float64)
    if metric == "l2":
        d10 = ((q10[:, None, :] - y[None]) ** 2).sum(-1)
    elif metric == "cosine":
        d10 = 1 - (q10 @ y.T) / np.linalg.norm(q10, axis=1)[:, None] / np.linalg.norm(y, axis=1)[None]
    else:
        d10 = 1 - (q10 @ y.T)
    assert np.array_equal(I1, np.argsort(d10, axis=1)[:, :3] * 7)


def test_legacy_search_refusals(tmp_path, registry, make_chain_registry):
    from bc_fast.index.lance_search import LanceLegacyTable
    from bc_fast.store.registry import RegistryError

    db = str(tmp_path / "db")
    src = _make_table(db, _x(100, dtype=np.float32), parts=(100,))
    convert_table(src, os.path.join(db, "items_v0.lance"), registry=registry, dst=0, **_kw())
    other = make_chain_registry(tmp_path / "other", DIMS, (6, 8), seed=1)
    with pytest.raises(RegistryError, match="other transforms"):
        LanceLegacyTable.open(db, "items_v0", other)
    with pytest.raises(ValueError, match="does not say which embedding version"):
        LanceLegacyTable.open(db, "items", registry)
    table = LanceLegacyTable.open(db, "items_v0", registry)
    q = np.zeros((1, DIMS[2]), np.float32)
    with pytest.raises(ValueError, match="queries have 64 features but version 1 has dim 40"):
        table.search(q, 3, query_version=1)
    with pytest.raises(ValueError, match="k must be an integer between 1 and the 100 rows"):
        table.search(q, 101, query_version=2)
    with pytest.raises(ValueError, match="no column 'key'"):
        table.search(q, 3, query_version=2, id_column="key")


# ------------------------------------------------------------------ the CLI

def test_cli_convert_lance(tmp_path, registry):
    db = str(tmp_path / "db")
    x = _x(500, seed=2)
    src = _make_table(db, x, parts=(500,))
    out = os.path.join(db, "items_v0.lance")
    cmd = [sys.executable, "-c", "import sys; from bc_fast.cli import main; sys.exit(main(sys.argv[1:]))",
           "convert", src, out, "--registry", str(registry.path), "--to", "0", "--threads", "1"]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert "converted 500 rows (lance, 64 -> 24, float16)" in r.stderr
    t = lancedb.connect(db).open_table("items_v0").to_arrow()
    assert t.num_rows == 500 and t.column("id").to_pylist() == list(np.arange(500) * 7)
