"""Conversion of a Chroma persistent collection (bc_fast.store.chroma) against the real embedded Chroma."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

chromadb = pytest.importorskip("chromadb", reason="the chroma extra is not installed (pip install 'bc-fast[chroma]')")

from bc_fast.convert import convert_table, read_sidecar
from bc_fast.engine.fusion import apply_layers_reference, flatten_chain
from bc_fast.store.chroma import open_client

THREADS = 1
DIMS = (24, 40, 64)  # versions 0, 1, 2


@pytest.fixture(scope="module")
def registry(tmp_path_factory, make_chain_registry):
    return make_chain_registry(tmp_path_factory.mktemp("reg") / "registry", DIMS, (6, 8))


def _x(n: int, d: int = DIMS[2], seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def _make_store(path, x: np.ndarray, name: str = "docs", space: str = "l2") -> str:
    """A Chroma store with ids, metadatas and documents, added in a few batches."""
    client = open_client(str(path))
    # Chroma's default embedding function (a model of the *input* version) is recorded, as users get it
    col = client.create_collection(name, configuration={"hnsw": {"space": space}}, metadata={"owner": "tests"})
    for a in range(0, len(x), 700):
        b = min(len(x), a + 700)
        col.add(ids=[f"id{i}" for i in range(a, b)], embeddings=x[a:b],
                metadatas=[{"i": i, "even": i % 2 == 0} for i in range(a, b)],
                documents=[f"document {i}" for i in range(a, b)])
    client.close()
    return str(path)


def _read(path, name: str = "docs") -> tuple[dict, np.ndarray, dict]:
    client = open_client(str(path))
    try:
        col = client.get_collection(name, embedding_function=None)
        got = col.get(include=["embeddings", "metadatas", "documents"], limit=col.count())
        return got, np.asarray(got["embeddings"], np.float32), {"metadata": col.metadata,
                                                                "configuration": col.configuration_json}
    finally:
        client.close()


def _content(path) -> dict:
    """What "unchanged" compares: every collection's ids, vectors, metadatas and documents. (Chroma
    itself rewrites its files when a client opens the folder, so file bytes are not the measure.)"""
    client = open_client(str(path))
    try:
        out = {}
        for c in client.list_collections():
            col = client.get_collection(c.name, embedding_function=None)
            got = col.get(include=["embeddings", "metadatas", "documents"], limit=max(col.count(), 1))
            h = hashlib.sha256(np.asarray(got["embeddings"], np.float32).tobytes()).hexdigest()
            out[c.name] = (got["ids"], h, got["metadatas"], got["documents"], col.metadata)
        return out
    finally:
        client.close()


def _kw(**kw):
    base = {"threads": THREADS, "progress": False}
    base.update(kw)
    return base


def _chunks(n: int, chunk_rows: int) -> list[tuple[int, int]]:
    return [(a, min(n, a + chunk_rows)) for a in range(0, n, chunk_rows)]


# ------------------------------------------------------------------ conversion

@pytest.mark.parametrize("space", ["l2", "cosine"])
def test_convert_chroma_collection(tmp_path, registry, space):
    x = _x(1500)
    src = _make_store(tmp_path / "chroma", x, space=space)
    before = _content(src)
    out = str(tmp_path / "chroma_v0")
    res = convert_table(src, out, registry=registry, dst=0, chunk_rows=400, verify=64, **_kw())
    assert res.format == "chroma" and res.rows == 1500 and res.verified_rows == 64
    assert _content(src) == before  # the input store is untouched

    got, y, info = _read(out)
    assert y.shape == (1500, DIMS[0])
    assert got["ids"] == [f"id{i}" for i in range(1500)]
    assert got["metadatas"] == [{"i": i, "even": i % 2 == 0} for i in range(1500)]
    assert got["documents"] == [f"document {i}" for i in range(1500)]
    op = registry.operator(2, 0)
    want = np.concatenate([op.apply(x[a:b], threads=THREADS) for a, b in _chunks(1500, 400)])
    if space == "l2":
        assert np.array_equal(y, want)  # bit for bit what the core computes
    else:  # Chroma keeps cosine-space vectors to within an ulp
        np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6)
    ref = apply_layers_reference(flatten_chain(registry.chain_layers(2, 0)), x)
    assert (np.linalg.norm(y - ref, axis=1) / np.linalg.norm(ref, axis=1)).max() < 1e-4

    # index settings kept, the input model's embedding function dropped, bc_fast's stamp added
    assert info["configuration"]["hnsw"]["space"] == space
    assert info["configuration"]["embedding_function"] == {"type": "legacy"}  # Chroma's "none"
    assert info["metadata"]["owner"] == "tests"
    stamp = json.loads(info["metadata"]["bc_fast"])
    assert stamp["version"] == 0 and stamp["source_version"] == 2
    side = read_sidecar(out)
    assert side["version"] == 0 and side["table"]["format"] == "chroma" and side["input"]["collection"] == "docs"
    assert sorted(os.listdir(tmp_path)) == ["chroma", "chroma_v0", "chroma_v0.bcfast.json"]

    # a search in the converted collection finds a row's own converted vector first
    client = open_client(out)
    try:
        hit = client.get_collection("docs", embedding_function=None).query(query_embeddings=y[17:18], n_results=1)
    finally:
        client.close()
    assert hit["ids"] == [["id17"]]


def test_chained_conversion_and_collection_choice(tmp_path, registry):
    """With two collections --column names one; the converted store converts again (2 -> 1 -> 0)."""
    x = _x(300, seed=3)
    src = _make_store(tmp_path / "chroma", x)
    _make_store(tmp_path / "chroma", _x(10, d=5), name="other")
    with pytest.raises(ValueError, match=r"holds 2 collections \(docs, other\); name the one to convert"):
        convert_table(src, str(tmp_path / "v1"), registry=registry, dst=1, **_kw())
    with pytest.raises(ValueError, match="has no collection 'nope'"):
        convert_table(src, str(tmp_path / "v1"), registry=registry, dst=1, column="nope", **_kw())
    convert_table(src, str(tmp_path / "v1"), registry=registry, dst=1, column="docs", **_kw())
    convert_table(str(tmp_path / "v1"), str(tmp_path / "v0"), registry=registry, src=1, dst=0, **_kw())
    _, y, _ = _read(tmp_path / "v0")
    ref = apply_layers_reference(flatten_chain(registry.chain_layers(2, 0)), x)
    assert (np.linalg.norm(y - ref, axis=1) / np.linalg.norm(ref, axis=1)).max() < 1e-4


# ------------------------------------------------------------------ resume



def test_resume_after_sigkill(tmp_path, registry, kill_convert_midway):
    x = _x(2000, seed=11)
    src = _make_store(tmp_path / "chroma", x)
    out = str(tmp_path / "chroma_v0")
    args = ["convert", src, out, "--registry", str(registry.path), "--to", "0", "--chunk-rows", "50",
            "--threads", "1", "--quiet"]
    journal = out + ".partial.journal.json"
    kill_convert_midway(args, journal, writer="ChromaWriter", after_chunks=8, cwd=tmp_path, delay=0.05)
    assert not os.path.exists(out) and os.path.isdir(out + ".partial")

    res = convert_table(src, out, registry=registry, dst=0, resume=True, **_kw())
    assert 400 <= res.resumed_rows < 2000
    clean = str(tmp_path / "clean")
    convert_table(src, clean, registry=registry, dst=0, chunk_rows=50, **_kw())
    a, ya, _ = _read(out)
    b, yb, _ = _read(clean)
    assert a["ids"] == b["ids"] == [f"id{i}" for i in range(2000)]
    assert a["metadatas"] == b["metadatas"] and a["documents"] == b["documents"]
    assert np.array_equal(ya, yb)
    assert sorted(os.listdir(tmp_path)) == ["chroma", "chroma_v0", "chroma_v0.bcfast.json", "clean",
                                            "clean.bcfast.json"]


def _convert_interrupted(monkeypatch, src: str, out: str, kw: dict, *, chunks: int, journal_interval: float) -> None:
    """Convert ``src`` to ``out``, interrupted (KeyboardInterrupt) once ``chunks`` chunks are written."""
    from bc_fast.store import tables
    orig, calls = tables.ChromaWriter.write, [0]

    def write(self, chunk, y, extra):
        calls[0] += 1
        if calls[0] > chunks:
            raise KeyboardInterrupt
        orig(self, chunk, y, extra)

    with monkeypatch.context() as m:
        m.setattr(tables.ChromaWriter, "write", write)
        with pytest.raises(KeyboardInterrupt):
            convert_table(src, out, journal_interval=journal_interval, **kw)


def _assert_converted(out: str, x: np.ndarray, registry, chunk_rows: int) -> None:
    """``out`` holds every record of ``x``, in order, converted chunk by chunk as an uninterrupted run would."""
    got, y, _ = _read(out)
    assert got["ids"] == [f"id{i}" for i in range(len(x))]
    op = registry.operator(2, 0)
    want = np.concatenate([op.apply(x[a:b], threads=THREADS) for a, b in _chunks(len(x), chunk_rows)])
    assert np.array_equal(y, want)


def test_resume_deletes_records_the_journal_does_not_record(tmp_path, registry, monkeypatch):
    x = _x(900, seed=9)
    src = _make_store(tmp_path / "chroma", x)
    kw = _kw(registry=registry, dst=0, chunk_rows=100)
    out = str(tmp_path / "out")
    _convert_interrupted(monkeypatch, src, out, kw, chunks=4, journal_interval=3600)
    assert json.loads(Path(out + ".partial.journal.json").read_text())["done_chunks"] == 0
    res = convert_table(src, out, resume=True, **kw)
    assert res.resumed_rows == 0
    _assert_converted(out, x, registry, 100)


def test_resume_redoes_the_records_from_a_chunk_changed_on_disk(tmp_path, registry, monkeypatch):
    """A record of a journaled chunk edited in the partial store: resume converts again from that chunk (the
    records after it are deleted first) and the result equals an uninterrupted run."""
    x = _x(900, seed=12)
    src = _make_store(tmp_path / "chroma", x)
    kw = _kw(registry=registry, dst=0, chunk_rows=100)
    out = str(tmp_path / "out")
    _convert_interrupted(monkeypatch, src, out, kw, chunks=4, journal_interval=0)
    assert json.loads(Path(out + ".partial.journal.json").read_text())["done_chunks"] == 4
    client = open_client(out + ".partial")
    col = client.get_collection("docs", embedding_function=None)
    e = np.asarray(col.get(ids=["id150"], include=["embeddings"])["embeddings"][0])
    col.update(ids=["id150"], embeddings=[e + 1])  # chunk 1 edited behind the journal's back
    client.close()

    with pytest.warns(RuntimeWarning, match="chunk 1 of the partial output does not match the checksum"):
        res = convert_table(src, out, resume=True, **kw)
    assert res.resumed_rows == 100
    _assert_converted(out, x, registry, 100)


# ------------------------------------------------------------------ refusals leave the store unchanged

def _refused(store, exc, match, *args, **kw):
    before = _content(store)
    listing = sorted(os.listdir(os.path.dirname(store)))
    with pytest.raises(exc, match=match):
        convert_table(*args, **_kw(**kw))
    assert _content(store) == before
    assert sorted(os.listdir(os.path.dirname(store))) == listing


def test_mismatched_dims_refused(tmp_path, registry):
    src = _make_store(tmp_path / "chroma", _x(200, d=DIMS[1]))
    _refused(src, ValueError, r"has 40 features per row \(chroma, 200 rows, float32\), but version 2 has dim 64",
             src, str(tmp_path / "out"), registry=registry, dst=0)


def test_wrong_version_refused(tmp_path, registry):
    src = _make_store(tmp_path / "chroma", _x(300))
    v1 = str(tmp_path / "chroma_v1")
    convert_table(src, v1, registry=registry, dst=1, **_kw())
    _refused(v1, ValueError, r"is a version-1 table \(per its sidecar .*use --from 1", v1, str(tmp_path / "v0"),
             registry=registry, src=2, dst=0)


def test_float16_output_and_existing_output_refused(tmp_path, registry):
    src = _make_store(tmp_path / "chroma", _x(100))
    _refused(src, TypeError, "Chroma stores float32 vectors only", src, str(tmp_path / "out"), registry=registry,
             dst=0, dtype="float16")
    convert_table(src, str(tmp_path / "out"), registry=registry, dst=0, **_kw())
    _refused(src, FileExistsError, "already exists", src, str(tmp_path / "out"), registry=registry, dst=0)
    # overwrite replaces a store bc_fast wrote
    res = convert_table(src, str(tmp_path / "out"), registry=registry, dst=1, overwrite=True, **_kw())
    assert res.dim_out == DIMS[1] and read_sidecar(str(tmp_path / "out"))["version"] == 1


def test_missing_extra_names_it(monkeypatch):
    from bc_fast.store.chroma import import_chromadb
    monkeypatch.setitem(sys.modules, "chromadb", None)
    with pytest.raises(ImportError, match=r'pip install "bc-fast\[chroma\]"'):
        import_chromadb()


# ------------------------------------------------------------------ the CLI

def test_cli_convert_chroma(tmp_path, registry):
    src = _make_store(tmp_path / "chroma", _x(500, seed=2))
    out = str(tmp_path / "chroma_v0")
    cmd = [sys.executable, "-c", "import sys; from bc_fast.cli import main; sys.exit(main(sys.argv[1:]))",
           "convert", src, out, "--registry", str(registry.path), "--to", "0", "--threads", "1", "--column", "docs"]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert "converted 500 rows (chroma, 64 -> 24, float32)" in r.stderr
    got, y, _ = _read(out)
    assert y.shape == (500, DIMS[0]) and got["ids"] == [f"id{i}" for i in range(500)]
