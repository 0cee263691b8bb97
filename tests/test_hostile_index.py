"""Hostile inputs to legacy indexes: each must end in a clear Python error that names the culprit.

A catalogue: build_legacy_index, LegacyIndex.search, save and load, fed edited sidecars,
damaged index files, the wrong registry, wrong queries and wrong arguments. Add cases,
never remove them.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

faiss = pytest.importorskip("faiss", reason="legacy indexes are faiss indexes")

from bc_fast.index import LegacyIndex, build_legacy_index  # noqa: E402
from bc_fast.store.registry import Registry, RegistryError  # noqa: E402

N = 300


pytestmark = pytest.mark.usefixtures("faiss_one_thread")


def _affine(rng: np.random.Generator, d_in: int, d_out: int) -> tuple[np.ndarray, np.ndarray]:
    return ((rng.standard_normal((d_out, d_in)) / math.sqrt(d_in)).astype(np.float32),
            (rng.standard_normal(d_out) * 0.1).astype(np.float32))


def _registry(path: Path, seed: int = 0) -> Registry:
    """Affine chain 2 -> 1 -> 0 (dims 12 -> 10 -> 8)."""
    rng = np.random.default_rng(seed)
    r = Registry.create(path)
    r.add_version(dim=8)
    r.add_version(dim=10, backward=_affine(rng, 10, 8))
    r.add_version(dim=12, backward=_affine(rng, 12, 10))
    return r


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    return _registry(tmp_path / "reg")


@pytest.fixture
def table() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((N, 12)).astype(np.float32)


@pytest.fixture
def legacy(reg: Registry, table: np.ndarray) -> LegacyIndex:
    return build_legacy_index(reg, table, 0)


@pytest.fixture
def saved(legacy: LegacyIndex, tmp_path: Path) -> Path:
    return legacy.save(tmp_path / "v0.faiss")


def _side_path(p: Path) -> Path:
    return p.with_name(p.name + ".json")


def _edit_sidecar(p: Path, edit: Callable[[dict], Any], *, reseal: bool = False) -> None:
    """Apply ``edit`` to the sidecar; with ``reseal`` recompute its checksum (a deliberate forgery)."""
    sp = _side_path(p)
    side = json.loads(sp.read_text())
    edit(side)
    if reseal:
        body = {k: v for k, v in side.items() if k != "sidecar_sha256"}
        canon = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
        side["sidecar_sha256"] = hashlib.sha256(canon).hexdigest()
    sp.write_text(json.dumps(side))


def _mutated(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    return "x"


# ----------------------------------------------------------------------------- sidecar edits


SIDECAR_KEYS = ["chain_checksum", "created", "d", "factory", "faiss_version", "index_file", "index_sha256",
                "metric", "normalize", "ntotal", "registry_checksum", "registry_path", "source_version", "version"]


@pytest.mark.parametrize("key", SIDECAR_KEYS)
def test_any_edited_sidecar_field_is_refused(saved: Path, key: str) -> None:
    side = json.loads(_side_path(saved).read_text())
    assert set(side) == set(SIDECAR_KEYS) | {"format", "format_version", "sidecar_sha256"}
    _edit_sidecar(saved, lambda s: s.__setitem__(key, _mutated(s[key])))
    with pytest.raises(ValueError, match=r"v0\.faiss\.json: sidecar checksum mismatch.*re-save"):
        LegacyIndex.load(saved)


@pytest.mark.parametrize("key, value", [("normalize", True), ("metric", "l2")])
def test_edited_normalize_or_metric_is_refused(saved: Path, key: str, value: Any) -> None:
    """The reported defect: these edits were accepted and changed distances / the reported metric."""
    _edit_sidecar(saved, lambda s: s.__setitem__(key, value))
    with pytest.raises(ValueError, match="sidecar checksum mismatch"):
        LegacyIndex.load(saved)


@pytest.mark.parametrize("key, value, found", [("metric", "l2", "'ip'"), ("d", 9, "8"), ("ntotal", 7, str(N))])
def test_forged_sidecar_contradicting_the_faiss_index_is_refused(saved: Path, key: str, value: Any,
                                                                 found: str) -> None:
    _edit_sidecar(saved, lambda s: s.__setitem__(key, value), reseal=True)
    with pytest.raises(ValueError, match=rf"v0\.faiss\.json: says {key}={value!r} but the faiss index v0\.faiss "
                                         rf"has {key}={found}"):
        LegacyIndex.load(saved)


def test_sidecar_checksum_removed_or_wrong_type(saved: Path) -> None:
    _edit_sidecar(saved, lambda s: s.pop("sidecar_sha256"))
    with pytest.raises(ValueError, match="sidecar checksum mismatch"):
        LegacyIndex.load(saved)
    _edit_sidecar(saved, lambda s: s.__setitem__("sidecar_sha256", 5))
    with pytest.raises(ValueError, match="sidecar checksum mismatch"):
        LegacyIndex.load(saved)


@pytest.mark.parametrize("key, value, match", [
    ("format", "something.else", "field 'format' must be 'bc_fast.legacy_index'"),
    ("format_version", 99, "format_version 99 is newer than this bc_fast supports"),
    ("format_version", "2", "'format_version' must be a positive int"),
    ("format_version", True, "'format_version' must be a positive int"),
    ("metric", "cosine", "field 'metric' must be 'ip' or 'l2'"),
    ("normalize", "yes", "field 'normalize' must be bool"),
    ("d", 8.0, "field 'd' must be int"),
    ("version", True, "field 'version' must be int"),
    ("version", 3, "need 0 <= version <= source_version"),
    ("index_sha256", None, "field 'index_sha256' must be str"),
    ("ntotal", 10**40, r"field 'ntotal' must be in \[0, 2\*\*63\), got 1000"),
    ("d", -3, r"field 'd' must be in \[0, 2\*\*63\)"),
    ("factory", [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[0]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]],
     r"field 'factory' must be str, got \[\[\[.*\.\.\.$"),
    ("metric", "l2" * 500, r"field 'metric' must be 'ip' or 'l2', got 'l2l2.*\.\.\.$"),
    ("format", "x" * 5000, r"field 'format' must be 'bc_fast.legacy_index', got 'xxx.*\.\.\.; not a bc_fast"),
])
def test_resealed_sidecar_with_bad_values(saved: Path, key: str, value: Any, match: str) -> None:
    _edit_sidecar(saved, lambda s: s.__setitem__(key, value), reseal=True)
    with pytest.raises(ValueError, match=match) as e:
        LegacyIndex.load(saved)
    assert len(str(e.value)) < 400  # a hostile value is never echoed whole


def test_old_sidecar_without_checksum_refused_then_resaved(saved: Path, table: np.ndarray) -> None:
    def to_v1(s: dict) -> None:
        s.pop("sidecar_sha256")
        s["format_version"] = 1

    _edit_sidecar(saved, to_v1)
    with pytest.raises(ValueError, match=r"format_version 1 sidecars carry no checksum.*Rebuild the index.*"
                                         r"allow_old_sidecar=True\)\.save\(path\)"):
        LegacyIndex.load(saved)
    old = LegacyIndex.load(saved, allow_old_sidecar=True)  # the documented way out
    old.save(saved)
    assert json.loads(_side_path(saved).read_text())["format_version"] == 2
    assert LegacyIndex.load(saved).ntotal == N


@pytest.mark.parametrize("content, match", [
    (b"[1, 2]", r"a bc_fast legacy index sidecar is a JSON object, but this file holds a JSON list"),
    (b'"a string"', "holds a JSON str"),
    (b"{\"format\": ", "not valid JSON"),
    (b"[" * 100_000, "not valid JSON"),  # deep nesting: RecursionError inside json
    (b"\xff\xfe\x00garbage", "not valid JSON"),
    (b"", "not valid JSON"),
])
def test_sidecar_that_is_not_a_sidecar(saved: Path, content: bytes, match: str) -> None:
    _side_path(saved).write_bytes(content)
    with pytest.raises(ValueError, match=match) as e:
        LegacyIndex.load(saved)
    assert "v0.faiss.json" in str(e.value) and len(str(e.value)) < 600


def test_sidecar_with_nan_value(saved: Path) -> None:
    text = _side_path(saved).read_text().replace('"ntotal": 300', '"ntotal": NaN')
    _side_path(saved).write_text(text)
    with pytest.raises(ValueError, match=r"v0\.faiss\.json: sidecar checksum mismatch"):
        LegacyIndex.load(saved)


def test_huge_sidecar_is_refused_without_parsing(saved: Path) -> None:
    _side_path(saved).write_bytes(b" " * (2 << 20))
    with pytest.raises(ValueError, match="far larger than a legacy index sidecar"):
        LegacyIndex.load(saved)


def test_missing_sidecar_or_index(saved: Path) -> None:
    _side_path(saved).rename(saved.with_name("elsewhere.json"))
    with pytest.raises(ValueError, match=r"sidecar .*v0\.faiss\.json not found.*copy both"):
        LegacyIndex.load(saved)
    with pytest.raises(FileNotFoundError, match=r"index file .*nothing\.faiss not found"):
        LegacyIndex.load(saved.with_name("nothing.faiss"))
    with pytest.raises(ValueError, match="is a directory; pass the index file"):
        LegacyIndex.load(saved.parent)


# ----------------------------------------------------------------------------- damaged index files


@pytest.mark.parametrize("damage", ["truncate", "flip_middle", "flip_last", "empty", "append"])
def test_damaged_index_file_is_refused_before_faiss_reads_it(saved: Path, damage: str) -> None:
    data = bytearray(saved.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip_middle":
        data[len(data) // 2] ^= 0x10
    elif damage == "flip_last":
        data[-1] ^= 1
    elif damage == "empty":
        data = bytearray()
    else:
        data += b"\0" * 8
    saved.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"v0\.faiss: checksum mismatch with v0\.faiss\.json.*truncated or corrupt"):
        LegacyIndex.load(saved)


def test_truncated_index_with_forged_checksums_gives_a_clear_error(saved: Path) -> None:
    data = saved.read_bytes()[:100]
    saved.write_bytes(data)
    _edit_sidecar(saved, lambda s: s.__setitem__("index_sha256", hashlib.sha256(data).hexdigest()), reseal=True)
    with pytest.raises(ValueError, match=r"v0\.faiss: faiss cannot read this index file \(.*\); .*rebuild it"):
        LegacyIndex.load(saved)


def test_index_file_of_another_index(reg: Registry, table: np.ndarray, saved: Path, tmp_path: Path) -> None:
    other = build_legacy_index(reg, table[:50], 0).save(tmp_path / "other.faiss")
    saved.write_bytes(other.read_bytes())
    with pytest.raises(ValueError, match="checksum mismatch with v0.faiss.json"):
        LegacyIndex.load(saved)


# ----------------------------------------------------------------------------- registries


def test_wrong_registry_same_dims(saved: Path, tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match=r"v0\.faiss\.json: registry .* different transforms .*chain checksum"):
        LegacyIndex.load(saved, registry=_registry(tmp_path / "other", seed=9))


def test_registry_too_small_or_wrong_dims(saved: Path, tmp_path: Path) -> None:
    small = Registry.create(tmp_path / "small")
    small.add_version(dim=8)
    with pytest.raises(RegistryError, match="built from version 2, but registry"):
        LegacyIndex.load(saved, registry=small)
    wide = Registry.create(tmp_path / "wide")
    for d in (9, 10, 12):
        wide.add_version(dim=d, backward=None if d == 9 else np.eye(9 if d == 10 else 10, d, dtype=np.float32))
    with pytest.raises(RegistryError, match="dimension mismatch: the index holds d=8 vectors but version 0"):
        LegacyIndex.load(saved, registry=wide)


def test_registry_argument_of_the_wrong_kind(saved: Path, tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="registry must be a Registry, a registry path or None, got int"):
        LegacyIndex.load(saved, registry=42)  # type: ignore[arg-type]
    with pytest.raises(RegistryError, match="not found"):
        LegacyIndex.load(saved, registry=tmp_path / "no_such_registry")


def test_registry_changed_since_save_is_refused_on_load(reg: Registry, saved: Path) -> None:
    reg.add_transform(1, 0, _affine(np.random.default_rng(5), 10, 8), replace=True)
    with pytest.raises(RegistryError, match="chain checksum mismatch"):
        LegacyIndex.load(saved, registry=reg.path)


def test_registry_changed_under_a_live_index_is_refused_on_search(reg: Registry, legacy: LegacyIndex,
                                                                   table: np.ndarray) -> None:
    """Before: the new chain was used silently, so newer queries landed in another space."""
    reg.add_transform(2, 1, _affine(np.random.default_rng(5), 12, 10), replace=True)
    with pytest.raises(RegistryError, match=r"now maps version 2 -> 0 with other transforms.*Rebuild the index"):
        legacy.search(table[:3], 2, query_version=2)
    legacy.search(reg.operator(2, 0).apply(table[:3]), 2, query_version=0)  # its own version still works


# ----------------------------------------------------------------------------- search


@pytest.mark.parametrize("queries, qv, exc, match", [
    (np.zeros((2, 5), np.float32), 2, ValueError, "queries have 5 features but version 2 has dim 12"),
    (np.zeros((2, 12), np.float32), 0, ValueError, "queries have 12 features but version 0 has dim 8"),
    (np.zeros((2, 12), np.int64), 2, TypeError, "queries must be floating point, got dtype int64"),
    (np.zeros((2, 12), np.complex64), 2, TypeError, "queries must be floating point"),
    (np.array([["a"] * 12]), 2, TypeError, "queries must be floating point"),
    ([[0.0] * 12, [0.0] * 5], 2, TypeError, "queries must be a float array"),
    (np.zeros((2, 3, 12), np.float32), 2, ValueError, r"1-D \(one query\) or 2-D"),
    (np.zeros((2, 12), np.float32), "2", TypeError, "query_version must be an int version number"),
    (np.zeros((2, 12), np.float32), True, TypeError, "query_version must be an int version number"),
    (np.zeros((2, 12), np.float32), 99, RegistryError, "unknown version 99"),
    (np.zeros((2, 12), np.float32), -1, RegistryError, "older than the index's version 0"),
])
def test_wrong_queries(legacy: LegacyIndex, queries: Any, qv: Any, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        legacy.search(queries, 3, query_version=qv)


@pytest.mark.parametrize("k", [0, -1, True, 2.5, "3", N + 1, 10**30])
def test_bad_k(legacy: LegacyIndex, table: np.ndarray, k: Any) -> None:
    with pytest.raises(ValueError, match=r"k must be a positive integer|k=\d+ is larger than the 300 vectors"):
        legacy.search(table[:2], k, query_version=2)


@pytest.mark.parametrize("qv", [2, 0])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_queries(legacy: LegacyIndex, reg: Registry, table: np.ndarray, qv: int, bad: float) -> None:
    q = table[:4] if qv == 2 else reg.operator(2, 0).apply(table[:4])
    q = q.copy()
    q[1, 3] = bad
    with pytest.raises(ValueError, match=r"queries: row 1 holds NaN or Inf .*\(1 such rows\)"):
        legacy.search(q, 3, query_version=qv)


def test_queries_beyond_float32(legacy: LegacyIndex, table: np.ndarray) -> None:
    q = table[:3].astype(np.float64)
    q[2, 0] = 1e300  # finite in float64, Inf once cast
    with pytest.raises(ValueError, match=r"queries: row 2 holds NaN or Inf or a value beyond the float32 range"):
        legacy.search(q, 3, query_version=2)


def test_queries_overflowing_in_the_transform(legacy: LegacyIndex, reg: Registry) -> None:
    w = reg.fused_layers(2, 0)[0].weight.astype(np.float64)
    assert np.abs(w[0]).sum() > 1.5  # so row 0 below maps to > 4.5e38 in output 0
    q = np.tile(np.sign(w[0]) * 3e38, (3, 1)).astype(np.float32)
    assert np.isfinite(q).all()
    with pytest.raises(ValueError, match=r"queries \(version 2\): row 0 .*NaN or Inf after the transform"):
        legacy.search(q, 3, query_version=2)


def test_no_registry_for_newer_queries(saved: Path, table: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"need the registry.*LegacyIndex\.load\(path, registry=\.\.\.\)"):
        LegacyIndex.load(saved).search(table[:2], 3, query_version=2)


# ----------------------------------------------------------------------------- build


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"factory": 5}, TypeError, "factory must be a faiss index_factory string"),
    ({"factory": "NoSuchIndex"}, ValueError, "faiss cannot build index_factory"),
    ({"metric": "cos"}, ValueError, "metric must be 'ip'"),
    ({"metric": None}, ValueError, "metric must be 'ip'"),
    ({"chunk_rows": 0}, ValueError, "chunk_rows must be a positive integer, got 0"),
    ({"chunk_rows": 1.5}, ValueError, "chunk_rows must be a positive integer, got 1.5"),
    ({"train_rows": True}, ValueError, "train_rows must be a positive integer, got True"),
    ({"normalize": "yes"}, TypeError, "normalize must be True or False"),
    ({"factory": "IVF64,Flat", "train_rows": 20}, ValueError,
     r"faiss cannot train index_factory\(8, 'IVF64,Flat'\) on 20 rows: Number of training points \(20\) "
     r"should be at least as large as number of clusters \(64\); use more rows"),
])
def test_bad_build_arguments(reg: Registry, table: np.ndarray, kwargs: dict, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        build_legacy_index(reg, table, 0, **kwargs)


@pytest.mark.parametrize("table, version, exc, match", [
    ([[0.0] * 12], 0, TypeError, "table must be a numpy array or memmap of shape"),
    (np.zeros((5, 12), np.int32), 0, TypeError, "table must be floating point, got dtype int32"),
    (np.zeros(12, np.float32), 0, ValueError, r"table must be 2-D \(n, 12\)"),
    (np.zeros((5, 10), np.float32), 0, ValueError, "table has 10 features per row but version 2 has dim 12"),
    (np.zeros((5, 12), np.float32), 7, RegistryError, "unknown version 7"),
    (np.zeros((5, 12), np.float32), "0", TypeError, "must be an int version number"),
])
def test_bad_tables_and_versions(reg: Registry, table: Any, version: Any, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        build_legacy_index(reg, table, version)


def test_wrong_registry_object(table: np.ndarray, tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="registry must be a bc_fast.store.Registry, got str"):
        build_legacy_index(str(tmp_path), table, 0)  # type: ignore[arg-type]


@pytest.mark.parametrize("factory", ["Flat", "IVF4,Flat"])
def test_non_finite_table_rows(reg: Registry, table: np.ndarray, factory: str) -> None:
    t = table.copy()
    t[17, 2] = np.nan
    t[40] = np.inf
    with pytest.raises(ValueError, match=r"table: row 17 \(and 1 more in this batch\) holds NaN or Inf"):
        build_legacy_index(reg, t, 0, factory=factory, chunk_rows=64)


def test_empty_table_for_a_trained_index(reg: Registry) -> None:
    with pytest.raises(ValueError, match="needs training, but the table is empty"):
        build_legacy_index(reg, np.zeros((0, 12), np.float32), 0, factory="IVF4,Flat")


# ----------------------------------------------------------------------------- save


def test_save_to_a_directory_or_missing_folder(legacy: LegacyIndex, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"is a directory; pass a file path for the index"):
        legacy.save(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"directory .*missing does not exist; create it first"):
        legacy.save(tmp_path / "missing" / "v0.faiss")
    assert not (tmp_path / "missing").exists()


def test_save_refuses_a_metric_that_contradicts_the_faiss_index(legacy: LegacyIndex, tmp_path: Path) -> None:
    legacy.metric = "l2"
    with pytest.raises(ValueError, match="says metric='l2' but its faiss index uses 'ip'"):
        legacy.save(tmp_path / "v0.faiss")
    assert list(tmp_path.iterdir()) == [tmp_path / "reg"]  # nothing half-written


def test_a_clean_roundtrip_still_loads(saved: Path, reg: Registry, table: np.ndarray, legacy: LegacyIndex) -> None:
    loaded = LegacyIndex.load(saved, registry=reg)
    np.testing.assert_array_equal(loaded.search(table[:5], 4, query_version=2)[1],
                                  legacy.search(table[:5], 4, query_version=2)[1])
