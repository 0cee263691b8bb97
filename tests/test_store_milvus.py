"""Conversion of a Milvus Lite collection (bc_fast.store.milvus) against the real Milvus Lite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("milvus_lite", reason="the milvus extra is not installed (pip install 'bc-fast[milvus]')")
pymilvus = pytest.importorskip("pymilvus", reason="the milvus extra is not installed (pip install 'bc-fast[milvus]')")

from bc_fast.convert import convert_table, read_sidecar
from bc_fast.engine.fusion import apply_layers_reference, flatten_chain
from bc_fast.store.milvus import close_client, open_client

THREADS = 1
DIMS = (24, 40, 64)  # versions 0, 1, 2


@pytest.fixture(scope="module")
def registry(tmp_path_factory, make_chain_registry):
    return make_chain_registry(tmp_path_factory.mktemp("reg") / "registry", DIMS, (6, 8))


def _x(n: int, d: int = DIMS[2], seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def _keys(n: int) -> list[int]:
    """Primary keys in an order other than insertion order (the reader sorts them)."""
    return [int(k) for k in (np.random.default_rng(0).permutation(n) * 3 + 5)]


def _make_store(path, x: np.ndarray, name: str = "docs") -> str:
    DataType = pymilvus.DataType
    client = open_client(str(path))
    schema = client.create_schema(auto_id=False, enable_dynamic_field=True)
    schema.add_field("pk", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=x.shape[1])
    schema.add_field("text", DataType.VARCHAR, max_length=64)
    client.create_collection(name, schema=schema)
    keys = _keys(len(x))
    for a in range(0, len(x), 700):
        client.insert(name, [{"pk": keys[i], "vector": x[i], "text": f"doc {keys[i]}", "tag": keys[i] % 7}
                             for i in range(a, min(len(x), a + 700))])
    close_client(client)
    return str(path)


def _read(path, name: str = "docs") -> tuple[list[dict], np.ndarray]:
    """Every row, sorted by key, and the vectors in that order."""
    client = open_client(str(path))
    try:
        rows: list[dict] = []
        it = client.query_iterator(name, batch_size=1000, filter="", output_fields=["*"])
        while batch := it.next():
            rows += [dict(r) for r in batch]
        it.close()
    finally:
        close_client(client)
    rows.sort(key=lambda r: r["pk"])
    return rows, np.asarray([r["vector"] for r in rows], np.float32)


def _in_key_order(x: np.ndarray) -> np.ndarray:
    return x[np.argsort(_keys(len(x)))]


def _kw(**kw):
    base = {"threads": THREADS, "progress": False}
    base.update(kw)
    return base


def _chunks(n: int, chunk_rows: int) -> list[tuple[int, int]]:
    return [(a, min(n, a + chunk_rows)) for a in range(0, n, chunk_rows)]


# ------------------------------------------------------------------ conversion

def test_convert_milvus_collection(tmp_path, registry):
    x = _x(1500)
    src = _make_store(tmp_path / "items.db", x)
    before = _read(src)
    out = str(tmp_path / "items_v0.db")
    res = convert_table(src, out, registry=registry, dst=0, chunk_rows=400, verify=64, **_kw())
    assert res.format == "milvus" and res.rows == 1500 and res.verified_rows == 64
    after = _read(src)
    assert after[0] == before[0] and np.array_equal(after[1], before[1])  # the input store is untouched

    rows, y = _read(out)
    xs = _in_key_order(x)
    assert [r["pk"] for r in rows] == sorted(_keys(1500))
    assert all(r["text"] == f"doc {r['pk']}" and r["tag"] == r["pk"] % 7 for r in rows)  # fields, dynamic too
    op = registry.operator(2, 0)
    assert np.array_equal(y, np.concatenate([op.apply(xs[a:b], threads=THREADS) for a, b in _chunks(1500, 400)]))
    ref = apply_layers_reference(flatten_chain(registry.chain_layers(2, 0)), xs)
    assert (np.linalg.norm(y - ref, axis=1) / np.linalg.norm(ref, axis=1)).max() < 1e-4

    client = open_client(out)
    try:
        desc = client.describe_collection("docs")
        hit = client.search("docs", data=[y[17]], limit=1, anns_field="vector", search_params={"metric_type": "L2"})
    finally:
        close_client(client)
    assert json.loads(desc["properties"]["bc_fast"])["version"] == 0
    assert hit[0][0]["pk"] == rows[17]["pk"]
    side = read_sidecar(out)
    assert side["version"] == 0 and side["table"]["format"] == "milvus" and side["input"]["collection"] == "docs"
    assert sorted(os.listdir(tmp_path)) == ["items.db", "items_v0.db", "items_v0.db.bcfast.json"]


# ------------------------------------------------------------------ resume



def test_resume_after_sigkill(tmp_path, registry, kill_convert_midway):
    x = _x(2000, seed=11)
    src = _make_store(tmp_path / "items.db", x)
    out = str(tmp_path / "items_v0.db")
    args = ["convert", src, out, "--registry", str(registry.path), "--to", "0", "--chunk-rows", "50",
            "--threads", "1", "--quiet"]
    journal = out + ".partial.journal.json"
    kill_convert_midway(args, journal, writer="MilvusWriter", after_chunks=8, cwd=tmp_path, delay=0.05)
    assert not os.path.exists(out) and os.path.isdir(out + ".partial")

    res = convert_table(src, out, registry=registry, dst=0, resume=True, **_kw())
    assert 400 <= res.resumed_rows < 2000
    clean = str(tmp_path / "clean.db")
    convert_table(src, clean, registry=registry, dst=0, chunk_rows=50, **_kw())
    a, ya = _read(out)
    b, yb = _read(clean)
    assert [r["pk"] for r in a] == [r["pk"] for r in b] == sorted(_keys(2000))  # no row twice, none lost
    assert np.array_equal(ya, yb)
    assert sorted(os.listdir(tmp_path)) == ["clean.db", "clean.db.bcfast.json", "items.db", "items_v0.db",
                                            "items_v0.db.bcfast.json"]


# ------------------------------------------------------------------ refusals leave the store unchanged

def _refused(store, exc, match, *args, **kw):
    before = _read(store)
    listing = sorted(os.listdir(os.path.dirname(store)))
    with pytest.raises(exc, match=match):
        convert_table(*args, **_kw(**kw))
    after = _read(store)
    assert after[0] == before[0] and np.array_equal(after[1], before[1])
    assert sorted(os.listdir(os.path.dirname(store))) == listing


def test_mismatched_dims_and_versions_refused(tmp_path, registry):
    src = _make_store(tmp_path / "items.db", _x(200, d=DIMS[1]))
    _refused(src, ValueError, r"has 40 features per row \(milvus, 200 rows, float32\), but version 2 has dim 64",
             src, str(tmp_path / "out.db"), registry=registry, dst=0)
    v0 = str(tmp_path / "items_v0.db")
    convert_table(src, v0, registry=registry, src=1, dst=0, **_kw())
    _refused(v0, ValueError, r"is a version-0 table \(per its sidecar .*use --from 0", v0, str(tmp_path / "x.db"),
             registry=registry, src=1, dst=0)
    _refused(src, ValueError, r"must end in \.db", src, str(tmp_path / "out"), registry=registry, src=1, dst=0)
    _refused(src, TypeError, "float32 vectors only", src, str(tmp_path / "o.db"), registry=registry, src=1, dst=0,
             dtype="float16")


def test_missing_extra_names_it(monkeypatch):
    from bc_fast.store.milvus import import_pymilvus
    monkeypatch.setitem(sys.modules, "milvus_lite", None)
    with pytest.raises(ImportError, match=r'pip install "bc-fast\[milvus\]"'):
        import_pymilvus()


def test_milvus_lite_listens_on_loopback_only(tmp_path):
    """Milvus Lite serves pymilvus over gRPC on a TCP port of its own: it must be bound to 127.0.0.1."""
    if not os.path.exists("/proc/net/tcp6") and not os.path.exists("/proc/net/tcp"):
        pytest.skip("no /proc/net/tcp* on this system to read the listening sockets from")

    def listening() -> set[str]:
        out = set()
        for name in ("tcp", "tcp6"):
            try:
                lines = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                local, state = line.split()[1], line.split()[3]
                if state == "0A":  # LISTEN
                    out.add(f"{name}:{local}")
        return out

    before = listening()
    client = open_client(str(tmp_path / "probe.db"))
    try:
        new = listening() - before
    finally:
        close_client(client)
    assert not listening() - before, "the server still listens after close_client"
    assert new, "expected Milvus Lite to open a listening socket (if it no longer does, drop this test)"
    loopback = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}
    assert all(s.split(":")[1] in loopback for s in new), f"non-loopback listeners: {sorted(new)}"


# ------------------------------------------------------------------ the CLI

def test_cli_convert_milvus(tmp_path, registry):
    src = _make_store(tmp_path / "items.db", _x(500, seed=2))
    out = str(tmp_path / "items_v0.db")
    cmd = [sys.executable, "-c", "import sys; from bc_fast.cli import main; sys.exit(main(sys.argv[1:]))",
           "convert", src, out, "--registry", str(registry.path), "--to", "0", "--threads", "1", "--column",
           "docs.vector"]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert "converted 500 rows (milvus, 64 -> 24, float32)" in r.stderr
    rows, y = _read(out)
    assert y.shape == (500, DIMS[0]) and [r["pk"] for r in rows] == sorted(_keys(500))
