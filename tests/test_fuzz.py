"""Bounded, reproducible fuzzing (hypothesis, derandomized) of the parsers and of random layer programs.

Parsers: registry manifest, safetensors transform files, .npy headers, the convert journal and
sidecars, legacy index sidecars. The contract for each: it either accepts the input and then gives
correct results, or raises a clean, documented exception (a ValueError subclass such as
RegistryError, a TypeError, FileNotFoundError/FileExistsError) whose message names the file, is
short, and is not a raw parser error (no JSONDecodeError, UnicodeDecodeError, KeyError,
IndexError, AttributeError, RecursionError, struct.error, faiss RuntimeError).

Two kinds of mutation: byte-level (truncate, flip, insert, splice in JSON tokens or deep nesting)
and structure-level: a JSON value replaced at a random path, then the file's own checksum
re-stamped, as a user who edits a file and "fixes" its checksum would, so the checks behind the
checksum are reached too.

Layer programs: 1-4 random layers through FusedTransform vs the float64 step-by-step reference,
with a running-error bound derived from the dtypes.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import bc_fast
from bc_fast.convert import job as convert_job, journal as convert_journal, pipeline as convert
from bc_fast.store import tables
from bc_fast.store.manifest import content_checksum, pretty
from bc_fast.engine.fusion import apply_layers_reference
from bc_fast.engine.operator import Layer
from bc_fast.store.registry import Registry, RegistryError

# Derandomized: CI sees the same examples every run. No shrinking, so a failure stays fast too
# (rerun locally with phases including Phase.shrink for a minimal example).
FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None, print_blob=True,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
_UNCLEAN = (UnicodeError, json.JSONDecodeError)
_MAX_MSG = 1500
_ECHOED_DEEP = ("[" * 50, "]" * 50, "{'k': " * 20, "}" * 50)
_counter = itertools.count()


# ----------------------------------------------------------------------------- mutation strategies

_JSON_TOKENS = [b'"', b"{", b"}", b"[", b"]", b",", b":", b"null", b"-1", b"0", b"1e999", b"-0.0", b"NaN",
                b"Infinity", b"true", b'"\\ud800"', b"\xff\xfe", b"\x00", b"1" * 5000, b"[" * 3000,
                b'{"a":' * 1200, b"\\", b'"x":1,"x":2']


def _deep(depth: int, kind: str) -> Any:
    """A nested JSON value built without recursion (so depth can exceed the recursion limit)."""
    v: Any = 1
    for _ in range(depth):
        v = [v] if kind == "list" else {"k": v}
    return v


@st.composite
def byte_mutations(draw: Callable, base: bytes) -> bytes:
    """``base`` with 1-3 random byte-level edits."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "token", "random"]))
        pos = draw(st.integers(0, max(len(data), 1)))
        if op == "truncate":
            del data[pos:]
        elif op == "flip" and data:
            i = min(pos, len(data) - 1)
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 64))]
        elif op == "token":
            data[pos:pos + draw(st.integers(0, 4))] = draw(st.sampled_from(_JSON_TOKENS))
        else:
            return draw(st.binary(max_size=200))
    return bytes(data)


_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.integers(),
    st.sampled_from([0, -1, 2**31, 2**63, 10**30, 10**300, 1.5, -0.0, 1e308, 1e-320]),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12),
    st.sampled_from(["", "..", "/etc/passwd", "../x.safetensors", "a" * 300, "\x00", "\ud7ff", "relu", "gelu",
                     "none", "ip", "l2", "backward", "forward", "mlp", "linear", "F16", "F32", "<f4", "0" * 64]))
json_values = st.recursive(_scalars, lambda c: st.one_of(st.lists(c, max_size=4),
                                                        st.dictionaries(st.text(max_size=8), c, max_size=4)),
                           max_leaves=12)
_deep_values = st.builds(_deep, st.sampled_from([2, 63, 64, 65, 200, 900, 2500]), st.sampled_from(["list", "dict"]))


def _paths(obj: Any, max_depth: int = 8) -> list[tuple]:
    """Paths (tuples of keys / indices) into a JSON value, down to ``max_depth`` (iterative: values may be deep)."""
    out, stack = [], [((), obj)]
    while stack:
        prefix, v = stack.pop()
        out.append(prefix)
        if len(prefix) < max_depth:
            items = v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list) else ()
            stack.extend((prefix + (k,), c) for k, c in items)
    return sorted(out, key=repr)


@st.composite
def json_mutations(draw: Callable, base: Any) -> Any:
    """A deep copy of the JSON value ``base`` with 1-2 values replaced, keys deleted or added."""
    obj = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(1, 2))):
        paths = _paths(obj)
        path = draw(st.sampled_from(paths[1:] if len(paths) > 1 else paths))
        if not path:
            return draw(st.one_of(json_values, _deep_values))
        parent = obj
        for key in path[:-1]:
            parent = parent[key]
        op = draw(st.sampled_from(["replace", "replace", "deep", "delete", "add"]))
        if op == "delete":
            del parent[path[-1]]
        elif op == "add" and isinstance(parent, dict):
            parent[draw(st.text(max_size=10))] = draw(json_values)
        else:
            parent[path[-1]] = draw(_deep_values if op == "deep" else json_values)
    return obj


def _dumps(obj: Any) -> bytes:
    """JSON bytes of any value, however deep (json.dumps recurses)."""
    try:
        return json.dumps(obj).encode()
    except RecursionError:
        return b"[" * 3000 + b"1" + b"]" * 3000


def _check_clean(e: BaseException, allowed: tuple, names: list[str]) -> None:
    """The exception is an allowed type, not a raw parser error, short, and names one of ``names``."""
    what = f"{type(e).__module__}.{type(e).__name__}: {str(e)[:500]}"
    assert isinstance(e, allowed) and not isinstance(e, _UNCLEAN), f"unclean exception {what}"
    msg = str(e)
    assert any(n in msg for n in names), f"message does not name the file ({names}): {what}"
    for n in sorted(names, key=len, reverse=True):
        msg = msg.replace(n, "<file>")
    for echo in _ECHOED_DEEP:  # a known finding with its own test below (test_errors_do_not_echo_deep_values)
        msg = msg.replace(echo, "")
    assert len(msg) < _MAX_MSG, f"message of {len(msg)} chars besides file names (a dumped value?): {what}"


@pytest.fixture(scope="module")
def fixed_tmp() -> Any:
    """A temp dir whose path length does not vary between runs (pytest's pytest-<N> does): the
    fuzzed journal and sidecars embed absolute paths, and their length steers the generated examples."""
    d = Path(tempfile.mkdtemp(prefix="bc_fast_fuzz_"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _fresh(root: Path, template: Path) -> Path:
    d = root / f"case{next(_counter)}"
    shutil.copytree(template, d, symlinks=True)
    return d


# ----------------------------------------------------------------------------- registry + safetensors


def _make_registry(path: Path) -> Registry:
    rng = np.random.default_rng(0)
    r = Registry.create(path, metadata={"dataset": "fuzz"})
    r.add_version(dim=6, metadata={"model": "m0"})
    r.add_version(dim=8, backward=(rng.standard_normal((6, 8)).astype(np.float32),
                                   rng.standard_normal(6).astype(np.float32)))
    mlp = [Layer(rng.standard_normal((9, 5)).astype(np.float32), rng.standard_normal(9).astype(np.float32),
                 "gelu", 5),
           Layer(rng.standard_normal((8, 9)).astype(np.float32), None, "relu")]
    r.add_version(dim=5, backward=mlp, kind="mlp")
    return r


@pytest.fixture(scope="module")
def registry_template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, tuple[str, np.ndarray]]:
    root = tmp_path_factory.mktemp("fuzz_registry")
    reg = _make_registry(root / "reg")
    x = np.random.default_rng(1).standard_normal((7, 5)).astype(np.float32)
    return reg.path, x, (reg.chain_checksum(2, 0), reg.operator(2, 0).apply(x))


def _exercise_registry(d: Path, x: np.ndarray, want: tuple[str, np.ndarray], allow_edited: bool) -> None:
    """Open, verify and use every transform. A registry that opens with the template's chain checksum
    (the stamp indexes and converted tables are checked against) must compute what the template did."""
    try:
        reg = Registry.open(d, verify=True, allow_edited=allow_edited)
        reg.describe()
        for t in reg.transforms():
            reg.transform_layers(t.from_version, t.to_version)
        y = reg.operator(2, 0).apply(x) if len(reg) == 3 and reg.dim(2) == x.shape[1] else None
    except Exception as e:
        _check_clean(e, (RegistryError,), [str(d)])
        return
    if y is not None:
        assert y.shape == (x.shape[0], reg.dim(0))
        if reg.chain_checksum(2, 0) == want[0]:
            np.testing.assert_array_equal(y, want[1], err_msg="same chain checksum, different operator")


def _restamp(m: Any) -> bytes:
    if isinstance(m, dict):
        try:
            m["checksum"] = content_checksum(m)
        except (ValueError, TypeError, RecursionError):
            pass
        try:
            return pretty(m)
        except (ValueError, TypeError, RecursionError):
            pass
    return _dumps(m)


@FUZZ
@given(data=st.data())
def test_fuzz_manifest_bytes(registry_template: Any, tmp_path: Path, data: st.DataObject) -> None:
    template, x, want = registry_template
    d = _fresh(tmp_path, template)
    raw = (template / "manifest.json").read_bytes()
    (d / "manifest.json").write_bytes(data.draw(byte_mutations(raw)))
    _exercise_registry(d, x, want, allow_edited=data.draw(st.booleans()))


@FUZZ
@given(data=st.data())
def test_fuzz_manifest_fields(registry_template: Any, tmp_path: Path, data: st.DataObject) -> None:
    """Edited manifest fields with a re-stamped checksum reach the schema checks."""
    template, x, want = registry_template
    d = _fresh(tmp_path, template)
    m = json.loads((template / "manifest.json").read_bytes())
    (d / "manifest.json").write_bytes(_restamp(data.draw(json_mutations(m))))
    _exercise_registry(d, x, want, allow_edited=False)


def _split_safetensors(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join_safetensors(header: Any, body: bytes) -> bytes:
    text = _dumps(header)
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


def _plant_weights(d: Path, template: Path, data: st.DataObject) -> None:
    """Replace one transform file with mutated bytes and make the manifest vouch for them."""
    m = json.loads((template / "manifest.json").read_bytes())
    t = data.draw(st.sampled_from(m["transforms"]))
    raw = (template / t["file"]).read_bytes()
    how = data.draw(st.sampled_from(["bytes", "header", "metadata", "foreign"]))
    if how == "bytes":
        new = data.draw(byte_mutations(raw))
    elif how == "header":
        header, body = _split_safetensors(raw)
        new = _join_safetensors(data.draw(json_mutations(header)), data.draw(st.sampled_from([body, body[:-4], b""])))
    elif how == "metadata":
        header, body = _split_safetensors(raw)
        header["__metadata__"] = data.draw(st.one_of(json_values, json_mutations(header["__metadata__"])))
        new = _join_safetensors(header, body)
    else:
        new = data.draw(st.sampled_from([b"\x80\x04\x95" + raw[:40], b"PK\x03\x04" + raw, b"\x93NUMPY" + raw]))
    (d / t["file"]).write_bytes(new)
    for entry in m["transforms"]:
        if entry["file"] == t["file"]:
            entry["sha256"] = hashlib.sha256(new).hexdigest()
    (d / "manifest.json").write_bytes(_restamp(m))


@FUZZ
@given(data=st.data())
def test_fuzz_safetensors_transform_files(registry_template: Any, tmp_path: Path, data: st.DataObject) -> None:
    template, x, want = registry_template
    d = _fresh(tmp_path, template)
    _plant_weights(d, template, data)
    _exercise_registry(d, x, want, allow_edited=False)


@pytest.mark.parametrize("edit", ["activation", "activation_width"])
def test_edited_layer_spec_is_refused_or_changes_the_chain_checksum(
        registry_template: Any, tmp_path: Path, edit: str) -> None:
    template, x, want = registry_template
    d = _fresh(tmp_path, template)
    m = json.loads((d / "manifest.json").read_bytes())
    spec = m["transforms"][1]["layers"][1]  # v2 -> v1, layer 1: relu on every output
    spec.update({"activation": "gelu"} if edit == "activation" else {"activation_width": 3})
    (d / "manifest.json").write_bytes(_restamp(m))
    try:
        reg = Registry.open(d, verify=True, allow_edited=True)
        y = reg.operator(2, 0).apply(x)
    except RegistryError as e:
        assert str(d) in str(e)
        return
    assert reg.chain_checksum(2, 0) != want[0] or np.array_equal(y, want[1])


# ----------------------------------------------------------------------------- .npy headers


def _npy_bytes(header: bytes, body: bytes, version: int = 1) -> bytes:
    pad = -(len(header) + 1 + (10 if version == 1 else 12)) % 64
    text = header + b" " * pad + b"\n"
    if version == 1:
        prefix = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text) & 0xFFFF)
    else:
        prefix = b"\x93NUMPY\x02\x00" + struct.pack("<I", len(text))
    return prefix + text + body


_descrs = st.one_of(st.sampled_from(["<f4", "<f2", ">f4", "<f8", "<i4", "|O", "|u1", "<c8", "xx", "", "<f4 ",
                                     "[('a', '<f4')]"]), st.text(max_size=6))
_shape_items = st.one_of(st.integers(-3, 8), st.sampled_from([2**62, 2**64, 10**40, -(2**63)]))
_shapes = st.one_of(st.lists(_shape_items, max_size=4).map(tuple), st.sampled_from(["(5, 3)", "5", "None", "[5, 3]"]))


@st.composite
def npy_files(draw: Callable) -> bytes:
    x = np.arange(15, dtype=np.float32).reshape(5, 3)
    body = x.tobytes()
    how = draw(st.sampled_from(["bytes", "dict", "dict", "raw"]))
    if how == "bytes":
        import io
        buf = io.BytesIO()
        np.save(buf, x)
        return draw(byte_mutations(buf.getvalue()))
    if how == "raw":
        text = draw(st.one_of(st.sampled_from([b"{}", b"(" * 300, b"{'descr': '<f4', 'fortran_order': False, "
                                               b"'shape': (" + b"(" * 150 + b")" * 150 + b")}",
                                               b"__import__('os')", b"{'descr': '<f4'}"]),
                              st.binary(max_size=40)))
        return _npy_bytes(text, body, draw(st.sampled_from([1, 2])))
    descr = draw(st.one_of(st.just("<f4"), _descrs))
    fortran = draw(st.one_of(st.just(False), st.sampled_from([True, 0, 1, "no", None])))
    shape = draw(st.one_of(st.just((5, 3)), _shapes))
    shape_txt = shape if isinstance(shape, str) else repr(shape)
    text = f"{{'descr': {descr!r}, 'fortran_order': {fortran!r}, 'shape': {shape_txt}, }}".encode()
    cut = draw(st.sampled_from([len(body), 0, 12, len(body) + 4]))
    return _npy_bytes(text, (body + b"\0" * 8)[:cut], draw(st.sampled_from([1, 1, 2])))


@FUZZ
@given(raw=npy_files())
def test_fuzz_npy_headers(tmp_path: Path, raw: bytes) -> None:
    """read_npy_header/open_table accept exactly what np.load reads as a 2-D float table, and read it right."""
    p = tmp_path / f"t{next(_counter)}.npy"
    p.write_bytes(raw)
    try:
        h = tables.read_npy_header(str(p))
        reader = tables.open_table(str(p))
    except Exception as e:
        _check_clean(e, (ValueError, TypeError), [str(p)])
        return
    try:
        got = np.empty((reader.n_rows, reader.dim), reader.dtype)
        for c in reader.chunks(2):
            reader.read(c, got[c.start:c.stop])
    finally:
        reader.close()
    expect = np.load(p, allow_pickle=False)
    assert h.shape == expect.shape and h.dtype == expect.dtype
    np.testing.assert_array_equal(got, expect)


# ----------------------------------------------------------------------------- convert: sidecars, journal


@pytest.fixture(scope="module")
def convert_template(fixed_tmp: Path) -> dict:
    """An input table, its expected conversion, and a genuine journal + partial output of a killed run."""
    root = fixed_tmp / "convert"
    root.mkdir()
    rng = np.random.default_rng(2)
    x = rng.standard_normal((40, 6)).astype(np.float32)
    op = bc_fast.FusedTransform.affine(rng.standard_normal((4, 6)).astype(np.float32),
                                       rng.standard_normal(4).astype(np.float32))
    src = root / "in.npy"
    np.save(src, x)
    done = root / "done.npy"
    convert.apply_to_table(op, str(src), str(done), chunk_rows=8, progress=False)
    want = np.load(done)
    side = json.loads(Path(convert_job.sidecar_path(done)).read_bytes())

    out = root / "killed.npy"
    real = convert._pipeline

    def killed(op_: Any, reader: Any, writer: Any, chunks: list, start: int, **kw: Any) -> None:
        real(op_, reader, writer, chunks[:3], start, **kw)
        raise KeyboardInterrupt

    mp = pytest.MonkeyPatch()
    mp.setattr(convert, "_pipeline", killed)
    try:
        with pytest.raises(KeyboardInterrupt):
            convert.apply_to_table(op, str(src), str(out), chunk_rows=8, progress=False, journal_interval=0)
    finally:
        mp.undo()
    partial = Path(str(out) + ".partial")
    journal = Path(str(partial) + ".journal.json")
    assert partial.exists() and journal.exists()
    return {"root": root, "op": op, "src": src, "want": want, "side": side, "out": out,
            "partial": partial.read_bytes(), "journal": json.loads(journal.read_bytes())}


def _reset(out: Path) -> None:
    for p in out.parent.glob(out.name + "*"):
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


@FUZZ
@given(data=st.data())
def test_fuzz_convert_journal(convert_template: dict, data: st.DataObject) -> None:
    """A resumed conversion with an edited journal either refuses cleanly or writes the correct table."""
    t = convert_template
    out: Path = t["out"]
    _reset(out)
    partial = Path(str(out) + ".partial")
    journal = Path(str(partial) + ".journal.json")
    partial.write_bytes(t["partial"])
    if data.draw(st.booleans()):
        raw = data.draw(byte_mutations(json.dumps(t["journal"]).encode()))
    else:
        j = data.draw(json_mutations(t["journal"]))
        if isinstance(j, dict):
            try:
                j["checksum"] = convert_journal._journal_checksum(j)
            except (ValueError, TypeError, RecursionError):
                pass
        raw = _dumps(j)
    journal.write_bytes(raw)
    try:
        res = convert.apply_to_table(t["op"], str(t["src"]), str(out), chunk_rows=8, resume=True, progress=False)
    except Exception as e:
        _check_clean(e, (ValueError, TypeError, FileExistsError), [str(journal), str(partial), str(out)])
        return
    assert res.output == str(out)
    np.testing.assert_array_equal(np.load(out), t["want"])


@FUZZ
@given(data=st.data())
def test_fuzz_convert_sidecars(convert_template: dict, data: st.DataObject) -> None:
    """Input sidecars (read to check the version) and output sidecars (read by overwrite) of any content."""
    t = convert_template
    root: Path = t["root"]
    src = root / "fuzz_in.npy"
    out = root / "fuzz_out.npy"
    _reset(src)
    _reset(out)
    shutil.copyfile(t["src"], src)
    base = data.draw(st.sampled_from([t["side"], {"version": 1}, {}]))
    if data.draw(st.booleans()):
        raw = data.draw(byte_mutations(json.dumps(base).encode()))
    else:
        raw = _dumps(data.draw(json_mutations(base)))
    which = data.draw(st.sampled_from(["input", "output"]))
    if which == "input":
        side = Path(convert_job.sidecar_path(src))
        side.write_bytes(raw)
        kw: dict = {"provenance": {"from": 1, "to": 0}}
    else:
        side = Path(convert_job.sidecar_path(out))
        np.save(out, np.zeros((2, 2), np.float32))
        side.write_bytes(raw)
        kw = {"overwrite": True}
    try:
        convert.apply_to_table(t["op"], str(src), str(out), progress=False, **kw)
        sidecar = convert_job.read_sidecar(src)
    except Exception as e:
        _check_clean(e, (ValueError, TypeError, FileExistsError), [str(side), str(src), str(out)])
        return
    np.testing.assert_array_equal(np.load(out), t["want"])
    if which == "input" and isinstance(sidecar, dict) and sidecar.get("version") not in (None, 1):
        pytest.fail(f"a version-{sidecar['version']!r} input converted as version 1")


# ----------------------------------------------------------------------------- legacy index sidecars


@pytest.fixture(scope="module")
def index_template(fixed_tmp: Path) -> dict:
    pytest.importorskip("faiss", reason="legacy indexes are faiss indexes")
    from bc_fast.index import build_legacy_index

    root = fixed_tmp / "index"
    root.mkdir()
    reg = _make_registry(root / "reg")
    table = np.random.default_rng(3).standard_normal((30, 5)).astype(np.float32)
    p = build_legacy_index(reg, table, version=0, table_version=2, progress=False).save(root / "idx.faiss")
    return {"root": root, "reg": reg, "index": p.read_bytes(), "side": json.loads(Path(str(p) + ".json").read_bytes())}


@FUZZ
@given(data=st.data())
def test_fuzz_index_sidecar(index_template: dict, data: st.DataObject) -> None:
    from bc_fast.index.legacy import LegacyIndex, _sidecar_checksum

    t = index_template
    d = t["root"] / f"case{next(_counter)}"
    d.mkdir()
    p, sp = d / "idx.faiss", d / "idx.faiss.json"
    index_bytes = t["index"]
    how = data.draw(st.sampled_from(["bytes", "fields", "index", "truncated-forged"]))
    side: Any = dict(t["side"])
    if how == "index":  # a bit-flipped or truncated index file: the sha256 must catch it before faiss
        index_bytes = data.draw(byte_mutations(index_bytes))
    elif how == "truncated-forged":  # even a forged sha256 over a truncated file must not reach faiss' raw errors
        index_bytes = index_bytes[:data.draw(st.integers(0, len(index_bytes) - 1))]
        side["index_sha256"] = hashlib.sha256(index_bytes).hexdigest()
        side["sidecar_sha256"] = _sidecar_checksum(side)
    p.write_bytes(index_bytes)
    if how == "bytes":
        raw = data.draw(byte_mutations(json.dumps(side, indent=2).encode()))
    elif how == "fields":
        side = data.draw(json_mutations(side))
        if isinstance(side, dict):
            try:
                side["sidecar_sha256"] = _sidecar_checksum(side)
            except (ValueError, TypeError, RecursionError):
                pass
        raw = _dumps(side)
    else:
        raw = json.dumps(side).encode()
    sp.write_bytes(raw)
    registry = data.draw(st.sampled_from([None, t["reg"]]))
    try:
        idx = LegacyIndex.load(p, registry)
        dist, ids = idx.search(np.ones((3, idx.d), np.float32), 2, query_version=idx.version)
    except Exception as e:
        _check_clean(e, (ValueError, TypeError, FileNotFoundError), [str(p), str(sp)])
        return
    assert ids.shape == (3, 2) and np.isfinite(dist).all()


def _deep_journal(t: dict) -> tuple[Path, Callable[[], Any]]:
    out: Path = t["out"]
    _reset(out)
    partial = Path(str(out) + ".partial")
    journal = Path(str(partial) + ".journal.json")
    partial.write_bytes(t["partial"])
    j = json.loads(json.dumps(t["journal"]))
    j["done_chunks"] = _deep(900, "list")
    j["checksum"] = convert_journal._journal_checksum(j)
    journal.write_bytes(json.dumps(j).encode())
    return journal, lambda: convert.apply_to_table(t["op"], str(t["src"]), str(out), chunk_rows=8, resume=True,
                                                   progress=False)


def _deep_index_sidecar(t: dict) -> tuple[Path, Callable[[], Any]]:
    from bc_fast.index.legacy import LegacyIndex, _sidecar_checksum

    d = t["root"] / f"case{next(_counter)}"
    d.mkdir()
    (d / "idx.faiss").write_bytes(t["index"])
    side = dict(t["side"], version=_deep(900, "list"))
    side["sidecar_sha256"] = _sidecar_checksum(side)
    (d / "idx.faiss.json").write_bytes(json.dumps(side).encode())
    return d / "idx.faiss.json", lambda: LegacyIndex.load(d / "idx.faiss")


@pytest.mark.parametrize("case", [
    "journal",
    "index_sidecar"])
def test_errors_do_not_echo_deep_values(request: pytest.FixtureRequest, case: str) -> None:
    """A field holding a 900-deep list is refused with a short message, not the value's repr."""
    if case == "journal":
        path, run = _deep_journal(request.getfixturevalue("convert_template"))
    else:
        path, run = _deep_index_sidecar(request.getfixturevalue("index_template"))
    with pytest.raises(ValueError, match=re.escape(str(path))) as e:
        run()
    assert len(str(e.value)) < 1000, str(e.value)[:300]


# ----------------------------------------------------------------------------- random layer programs

_EPS = {np.dtype(np.float32): 2.0**-24, np.dtype(np.float16): 2.0**-11}


@st.composite
def layer_programs(draw: Callable) -> tuple[list[Layer], bool, np.dtype, np.dtype, int, int]:
    n_layers = draw(st.integers(1, 4))
    dims = [draw(st.integers(1, 70)) for _ in range(n_layers + 1)]
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    layers = []
    for i in range(n_layers):
        d_in, d_out = dims[i], dims[i + 1]
        w = (rng.standard_normal((d_out, d_in)) / np.sqrt(d_in)).astype(np.float32)
        b = rng.standard_normal(d_out).astype(np.float32) if draw(st.booleans()) else None
        act = draw(st.sampled_from(["none", "relu", "gelu"]))
        width = draw(st.one_of(st.none(), st.integers(0, d_out)))
        layers.append(Layer(w, b, act, width))
    normalize = draw(st.booleans())
    in_dt = np.dtype(draw(st.sampled_from([np.float32, np.float16])))
    out_dt = np.dtype(draw(st.sampled_from([np.float32, np.float16])))
    return layers, normalize, in_dt, out_dt, draw(st.integers(0, 130)), seed


def _abs_bound(layers: list[Layer], x: np.ndarray) -> np.ndarray:
    """Per-element magnitude |W_k|...|W_1||x| + |b| terms: the scale the rounding errors are relative to."""
    s = np.abs(x.astype(np.float64))
    for layer in layers:
        s = s @ np.abs(layer.weight.astype(np.float64)).T
        if layer.bias is not None:
            s = s + np.abs(layer.bias.astype(np.float64))
    return s


@settings(FUZZ, max_examples=120)
@given(prog=layer_programs(), threads=st.sampled_from([1, 2]))
def test_fuzz_layer_programs_match_float64(prog: tuple, threads: int) -> None:
    layers, normalize, in_dt, out_dt, n, seed = prog
    x = np.random.default_rng(seed + 1).standard_normal((n, layers[0].d_in)).astype(in_dt)
    op = bc_fast.FusedTransform(layers, normalize=normalize)
    y = op.apply(x, out_dtype=out_dt, threads=threads)
    assert y.shape == (n, layers[-1].d_out) and y.dtype == out_dt
    ref = apply_layers_reference(layers, x)
    # fp32 accumulation error, relative to the |W|...|x| chain: ~ depth * sqrt(width) * eps32 (measured
    # max 1.4x that over 3000 random programs; 8x leaves room for other summation orders).
    depth = len(layers)
    width = max(max(l.d_in for l in layers), 2)
    err = 8.0 * depth * np.sqrt(width) * _EPS[np.dtype(np.float32)] * _abs_bound(layers, x) + 1e-30
    if normalize:
        norm = np.linalg.norm(ref, axis=1, keepdims=True)
        row_err = np.linalg.norm(err, axis=1, keepdims=True)
        ok_rows = (norm > 4 * row_err).ravel()  # rows that are numerically zero have no direction to check
        ref = ref / np.maximum(norm, 1e-300)
        err = np.broadcast_to(2 * row_err / np.maximum(norm, 1e-300), ref.shape)
        assert np.all(np.linalg.norm(y.astype(np.float64), axis=1) <= 1 + 4 * _EPS[out_dt])
        y, ref, err = y[ok_rows], ref[ok_rows], err[ok_rows]
    tol = err + _EPS[out_dt] * np.abs(ref) + (2.0**-24 if out_dt == np.float16 else 0)
    diff = np.abs(y.astype(np.float64) - ref)
    assert np.all(diff <= tol), (f"max excess {np.max(diff - tol):.3g} (max diff {diff.max():.3g}) for "
                                 f"{[(l.d_in, l.d_out, l.activation, l.activation_width, l.bias is not None) for l in layers]} "
                                 f"normalize={normalize} {in_dt}->{out_dt} n={n}")
