"""Hostile registry inputs: each case must end in a clear RegistryError (naming the file and the fix)
or in a correct recovery. Never unpickle: the pickles and zips planted here are only bytes on disk.

Add new cases here so the catalogue only grows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import pickle
import signal
import struct
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bc_fast.store import manifest as _manifest
from bc_fast.store.registry import Registry, RegistryError, as_layers


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    """Versions 0..2 (dims 8, 8, 6), backward transforms 1 -> 0 (affine) and 2 -> 1 (linear)."""
    rng = np.random.default_rng(0)
    r = Registry.create(tmp_path / "reg")
    r.add_version(dim=8)
    r.add_version(dim=8, backward=(rng.standard_normal((8, 8)).astype(np.float32), np.ones(8, np.float32)))
    r.add_version(dim=6, backward=rng.standard_normal((8, 6)).astype(np.float32))
    return r


def _manifest_dict(reg: Registry) -> dict:
    return json.loads((reg.path / "manifest.json").read_text())


def _write_manifest(reg: Registry, m: dict, *, restamp: bool = True) -> None:
    """Write a manifest, with a correct content checksum unless ``restamp`` is False (a careful attacker)."""
    if restamp:
        m["checksum"] = _manifest.content_checksum(m)
    (reg.path / "manifest.json").write_text(json.dumps(m))


def _edit(reg: Registry, fn: Callable[[dict], Any]) -> None:
    m = _manifest_dict(reg)
    fn(m)
    _write_manifest(reg, m)


def _plant(reg: Registry, data: bytes, pair: tuple[int, int] = (1, 0)) -> Path:
    """Replace a transform's file by ``data`` and record its sha256, so only the content is hostile."""
    m = _manifest_dict(reg)
    t = next(t for t in m["transforms"] if (t["from_version"], t["to_version"]) == pair)
    f = reg.path / t["file"]
    f.write_bytes(data)
    t["sha256"] = hashlib.sha256(data).hexdigest()
    _write_manifest(reg, m)
    return f


def _safetensors(header: Any, payload: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + payload


def _meta(pair: tuple[int, int] = (1, 0)) -> dict:
    return {"format": "bc_fast.transform", "from_version": str(pair[0]), "to_version": str(pair[1]),
            "direction": "backward", "kind": "affine"}


# ----------------------------------------------------------------------------- manifest.json


def test_truncated_manifest(reg: Registry) -> None:
    m = reg.path / "manifest.json"
    m.write_bytes(m.read_bytes()[:100])
    with pytest.raises(RegistryError, match=r"manifest.json is not valid JSON \(truncated.*restore manifest.json"):
        Registry.open(reg.path)


@pytest.mark.parametrize("depth", [100, 100_000])
def test_deeply_nested_manifest(reg: Registry, depth: int) -> None:
    # 100_000 levels used to raise RecursionError from json; 100 parsed and was accepted
    m = _manifest_dict(reg)
    text = json.dumps(m).replace('"metadata": {}', '"metadata": {"x": ' + "[" * depth + "]" * depth + "}", 1)
    (reg.path / "manifest.json").write_text(text)
    with pytest.raises(RegistryError, match=r"manifest.json is nested (too deeply|more than 64).*restore"):
        Registry.open(reg.path, allow_edited=True)


def test_deep_metadata_refused_on_write(reg: Registry) -> None:
    deep: Any = 1
    for _ in range(70):
        deep = [deep]
    with pytest.raises(ValueError, match="metadata.*nested more than 64 levels deep; flatten it"):
        reg.add_version(dim=6, metadata={"x": deep})


def test_non_utf8_manifest(reg: Registry) -> None:
    m = reg.path / "manifest.json"
    m.write_bytes(m.read_bytes().replace(b'"format"', b'"\xff\xfeformat"', 1))
    with pytest.raises(RegistryError, match=r"manifest.json is not UTF-8 text \(byte 0xff at offset \d+\)"):
        Registry.open(reg.path)


def test_nan_literal_in_manifest(reg: Registry) -> None:
    m = reg.path / "manifest.json"
    m.write_text(m.read_text().replace('"metadata": {}', '"metadata": {"x": NaN}', 1))
    with pytest.raises(RegistryError, match="manifest.json holds NaN, which is not JSON"):
        Registry.open(reg.path, allow_edited=True)


def test_duplicate_key_in_manifest(reg: Registry) -> None:
    m = reg.path / "manifest.json"
    m.write_text(m.read_text().replace('"dim": 6,', '"dim": 6, "dim": 7,', 1))
    with pytest.raises(RegistryError, match="manifest.json has the key 'dim' twice in one object"):
        Registry.open(reg.path, allow_edited=True)


def test_manifest_not_an_object(reg: Registry) -> None:
    (reg.path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(RegistryError, match="the manifest must be a JSON object, got list"):
        Registry.open(reg.path)


def test_huge_manifest_is_not_read(reg: Registry) -> None:
    with open(reg.path / "manifest.json", "r+b") as f:
        f.truncate(_manifest.MAX_MANIFEST_BYTES + 1)  # sparse: cheap to make
    with pytest.raises(RegistryError, match="more than a manifest can be"):
        Registry.open(reg.path)


def test_wrong_format_string(reg: Registry) -> None:
    _edit(reg, lambda m: m.update(format="bc_fast.registri"))
    with pytest.raises(RegistryError, match="field 'format' is 'bc_fast.registri'.*not a bc_fast registry"):
        Registry.open(reg.path)


def test_duplicate_versions(reg: Registry) -> None:
    _edit(reg, lambda m: m["versions"].insert(1, dict(m["versions"][0])))
    with pytest.raises(RegistryError, match=r"versions\[1\].version is 0, expected 1 \(a duplicate version\)"):
        Registry.open(reg.path)


def test_duplicate_transforms(reg: Registry) -> None:
    _edit(reg, lambda m: m["transforms"].append(dict(m["transforms"][0])))
    with pytest.raises(RegistryError, match=r"transforms\[2\]: a second transform .* \(duplicate entry\)"):
        Registry.open(reg.path)


@pytest.mark.parametrize("dim,msg", [
    (10**30, r"versions\[2\].dim must be an integer in \[1, 1048576\], got 10{30}"),
    (-6, r"versions\[2\].dim must be an integer in \[1, 1048576\], got -6"),
    (0, r"versions\[2\].dim must be an integer in \[1, 1048576\], got 0"),
    (True, r"versions\[2\]: field 'dim' must be int, got bool"),
    (6.0, r"versions\[2\]: field 'dim' must be int, got float 6.0"),
    ("6", r"versions\[2\]: field 'dim' must be int, got str '6'"),
])
def test_bad_dim_refused_at_open(reg: Registry, dim: Any, msg: str) -> None:
    _edit(reg, lambda m: m["versions"][2].update(dim=dim))
    with pytest.raises(RegistryError, match=msg):
        Registry.open(reg.path)


def test_huge_hidden_layer_dim_refused_at_open(reg: Registry) -> None:
    def grow(m: dict) -> None:
        t = m["transforms"][0]
        spec = dict(t["layers"][0])
        t["layers"] = [dict(spec, d_out=10**30), dict(spec, d_in=10**30)]
    _edit(reg, grow)
    with pytest.raises(RegistryError, match=r"layers\[0\].d_out must be an integer in \[1, 1048576\]"):
        Registry.open(reg.path)


def test_huge_dim_refused_on_write(reg: Registry) -> None:
    with pytest.raises(ValueError, match="dim must be a positive integer of at most 1048576, got 10{30}"):
        reg.add_version(dim=10**30)


@pytest.mark.parametrize("fname", ["/etc/passwd.safetensors", "transforms/../../x.safetensors",
                                   "transforms/a\\b.safetensors", "transforms/x.pt"])
def test_weight_path_outside_registry(reg: Registry, fname: str) -> None:
    _edit(reg, lambda m: m["transforms"][0].update(file=fname))
    with pytest.raises(RegistryError, match=r"file must be a relative .safetensors path inside the registry"):
        Registry.open(reg.path)


def test_manifest_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "r" / "manifest.json").mkdir(parents=True)
    with pytest.raises(RegistryError, match="manifest.json not found; .* is not a bc_fast registry"):
        Registry.open(tmp_path / "r")


# ----------------------------------------------------------------------------- weight files


def test_transform_sha256_mismatch(reg: Registry) -> None:
    _edit(reg, lambda m: m["transforms"][0].update(sha256="0" * 64))
    with pytest.raises(RegistryError, match=r"checksum mismatch for transform .*modified or corrupted; re-add"):
        Registry.open(reg.path, verify=True)


def test_bit_flipped_weights(reg: Registry) -> None:
    f = reg.path / reg.transform_info(2, 1).file
    data = bytearray(f.read_bytes())
    data[len(data) // 2 + 40] ^= 0x10
    f.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match=r"backward_2_to_1_.*checksum mismatch for transform 2 -> 1"):
        Registry.open(reg.path).operator(2, 0)


@pytest.mark.parametrize("restamp", [True, False])
def test_pickle_planted_as_safetensors(reg: Registry, restamp: bool) -> None:
    data = pickle.dumps({"layers.0.weight": np.eye(8)}, protocol=4)  # bytes only: never loaded
    f = reg.path / reg.transform_info(1, 0).file
    if restamp:
        _plant(reg, data)
    else:
        f.write_bytes(data)
    with pytest.raises(RegistryError, match=r"backward_1_to_0_.*is a Python pickle \(protocol 4\), not safetensors; "
                                            r"bc_fast never unpickles"):
        Registry.open(reg.path, verify=True)


def test_torch_zip_planted_as_safetensors(reg: Registry) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:  # the layout torch.save writes; the pickle inside is never read
        z.writestr("archive/data.pkl", pickle.dumps({"w": 1}))
    _plant(reg, buf.getvalue())
    with pytest.raises(RegistryError, match=r"is a zip archive \(torch.save writes these.*never unpickles"):
        Registry.open(reg.path, verify=True)


def test_npy_planted_as_safetensors(reg: Registry) -> None:
    buf = io.BytesIO()
    np.save(buf, np.eye(8, dtype=np.float32))
    _plant(reg, buf.getvalue())
    with pytest.raises(RegistryError, match=r"is a numpy .npy file, not safetensors"):
        Registry.open(reg.path, verify=True)


@pytest.mark.parametrize("data,msg", [
    (b"", r"file is truncated \(0 bytes\)"),
    (struct.pack("<Q", 2**62) + b"{}", r"header length 4611686018427387904 is beyond the format's 100000000 byte"),
    (struct.pack("<Q", 500) + b"{}", r"header length 500 exceeds the file size; the file is truncated"),
    (_safetensors([1, 2]), r"the safetensors header must be a JSON object, got list"),
    (_safetensors({"__metadata__": "bc_fast.transform"}), r"'__metadata__' must be an object of strings, got str"),
    (_safetensors({"__metadata__": ["a"]}), r"'__metadata__' must be an object of strings, got list"),
    (_safetensors({"__metadata__": {"format": 5}}), r"'__metadata__' must be an object of strings, got an object"),
    (struct.pack("<Q", 3) + b"[\xff]", r"the safetensors header is not UTF-8 text"),
    (struct.pack("<Q", 3000) + b"[" * 1500 + b"]" * 1500, r"the safetensors header is nested"),
    (_safetensors({"__metadata__": {"format": "x"}}), r"not a bc_fast transform file \(metadata format='x'\)"),
    (_safetensors({"__metadata__": _meta(), "layers.0.weight": {"dtype": "F32", "shape": [8, 8],
                                                                "data_offsets": [0, 256]}}, b"\0" * 10),
     r"cannot parse safetensors"),
])
def test_malformed_safetensors(reg: Registry, data: bytes, msg: str) -> None:
    _plant(reg, data)
    with pytest.raises(RegistryError, match=r"backward_1_to_0_\w+\.safetensors.*" + msg):
        Registry.open(reg.path, verify=True)


def _real_transform(tensors: dict[str, np.ndarray]) -> bytes:
    from safetensors.numpy import save

    layers = [{"d_in": 8, "d_out": 8, "activation": "none", "activation_width": None, "bias": True}]
    return save(tensors, metadata=dict(_meta(), layers=json.dumps(layers)))


@pytest.mark.parametrize("tensors,msg", [
    ({"layers.0.weight": np.full((8, 8), np.nan, np.float32), "layers.0.bias": np.ones(8, np.float32)},
     r"layers\[0\].weight contains NaN or Inf; re-add"),
    ({"layers.0.weight": np.ones((8, 8), np.int32), "layers.0.bias": np.ones(8, np.float32)},
     r"layers\[0\].weight must be a floating-point array, got dtype int32"),
    ({"layers.0.weight": np.ones((8, 7), np.float32), "layers.0.bias": np.ones(8, np.float32)},
     r"layers.0.weight has shape \(8, 7\), manifest says \(8, 8\)"),
    ({"layers.0.weight": np.ones((8, 8), np.float32), "layers.0.bias": np.ones(8, np.float32),
      "extra": np.ones(1, np.float32)}, r"holds tensors the manifest does not list"),
])
def test_bad_tensors(reg: Registry, tensors: dict, msg: str) -> None:
    _plant(reg, _real_transform(tensors))
    with pytest.raises(RegistryError, match=msg):
        Registry.open(reg.path, verify=True)


# ----------------------------------------------------------------------------- symlinks


def test_transforms_folder_symlinked_outside(reg: Registry, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (reg.path / "transforms").rename(outside)
    (reg.path / "transforms").symlink_to(outside)
    with pytest.raises(RegistryError, match=r"reg/transforms is a symlink to .*outside.*leads outside the registry"):
        Registry.open(reg.path)


def test_write_through_symlinked_folder_refused(reg: Registry, tmp_path: Path) -> None:
    handle = Registry.open(reg.path)
    outside = tmp_path / "outside"
    (reg.path / "transforms").rename(outside)
    (reg.path / "transforms").symlink_to(outside)
    before = sorted(p.name for p in outside.iterdir())
    (outside / "backward_9_to_8_0123456789ab.safetensors").write_bytes(b"x")  # looks like an orphan of ours
    for backward in (np.eye(6, dtype=np.float32), None):
        with pytest.raises(RegistryError, match="is a symlink to .* refuses to read or write through it"):
            handle.add_version(dim=6, backward=backward)
    (outside / "backward_9_to_8_0123456789ab.safetensors").unlink()  # it was not cleaned up through the link
    assert sorted(p.name for p in outside.iterdir()) == before  # nothing written outside
    with pytest.raises(RegistryError, match="leads outside the registry"):
        handle.operator(2, 0)  # nor read from there


def test_weight_file_symlinked_outside(reg: Registry, tmp_path: Path) -> None:
    f = reg.path / reg.transform_info(2, 1).file
    handle = Registry.open(reg.path)
    outside = tmp_path / "elsewhere.safetensors"
    f.rename(outside)
    f.symlink_to(outside)
    with pytest.raises(RegistryError, match=r"backward_2_to_1_\w+\.safetensors is a symlink to .*elsewhere"):
        Registry.open(reg.path)
    with pytest.raises(RegistryError, match="leads outside the registry"):
        handle.operator(2, 0)


def test_manifest_and_lock_symlinked_outside(reg: Registry, tmp_path: Path) -> None:
    handle = Registry.open(reg.path)
    target = tmp_path / "planted_lock"
    (reg.path / ".lock").unlink()
    (reg.path / ".lock").symlink_to(target)
    with pytest.raises(RegistryError, match=r"\.lock is a symlink to .*planted_lock"):
        handle.add_version(dim=6)
    assert not target.exists()  # the lock was not created outside
    (reg.path / ".lock").unlink()
    m = reg.path / "manifest.json"
    m.rename(tmp_path / "m.json")
    m.symlink_to(tmp_path / "m.json")
    with pytest.raises(RegistryError, match=r"manifest.json is a symlink to .*m.json"):
        Registry.open(reg.path)


def test_symlinks_inside_the_registry_are_fine(reg: Registry, tmp_path: Path) -> None:
    f = reg.path / reg.transform_info(2, 1).file
    (reg.path / "kept").mkdir()
    f.rename(reg.path / "kept" / f.name)
    f.symlink_to(Path("..") / "kept" / f.name)  # relative link that stays inside
    (tmp_path / "alias").symlink_to(reg.path)  # the registry itself opened through a link
    r = Registry.open(tmp_path / "alias", verify=True)
    r.add_version(dim=6, backward=np.eye(6, dtype=np.float32))
    assert Registry.open(reg.path, verify=True).latest == 3


# ----------------------------------------------------------------------------- stale handles


def test_stale_handle_after_another_replaced_a_transform(reg: Registry) -> None:
    a = Registry.open(reg.path)
    b = Registry.open(reg.path)
    b.add_transform(2, 1, np.ones((8, 6), np.float32), replace=True)  # removes the file `a` knows
    with pytest.raises(RegistryError, match=r"this Registry handle is stale: .*manifest.json changed on disk.*"
                                            r"reopen with Registry.open\("):
        a.operator(2, 0)
    with pytest.raises(RegistryError, match=r"changed on disk since this Registry was opened.*reopen with "
                                            r"Registry.open\("):
        a.add_version(dim=6)
    np.testing.assert_array_equal(Registry.open(reg.path).transform_layers(2, 1)[0].weight, np.ones((8, 6)))


# ----------------------------------------------------------------------------- interrupted create and orphans


def _interrupted_create(p: Path) -> None:
    """What a create killed before its manifest rename leaves (with this or an older bc_fast)."""
    (p / "transforms").mkdir(parents=True)
    (p / ".lock").write_bytes(b"")
    (p / ".manifest.json.tmp-123-0123abcd").write_bytes(b'{"format": "bc_fa')


def test_interrupted_create_is_recognised_and_finished(tmp_path: Path) -> None:
    p = tmp_path / "r"
    _interrupted_create(p)
    with pytest.raises(RegistryError, match=r"holds only what an interrupted Registry.create left.*run "
                                            r"Registry.create\(.*\) again"):
        Registry.open(p)
    r = Registry.create(p, metadata={"try": 2})
    assert Registry.open(p).metadata == {"try": 2} and r.path == p
    assert sorted(e.name for e in p.iterdir()) == [".lock", "manifest.json", "transforms"]


def test_lost_manifest_is_not_mistaken_for_interrupted_create(reg: Registry) -> None:
    (reg.path / "manifest.json").unlink()
    with pytest.raises(RegistryError, match="the manifest was deleted or lost; restore manifest.json"):
        Registry.open(reg.path)
    with pytest.raises(RegistryError, match="exists and is not an empty directory"):
        Registry.create(reg.path)
    assert len(list((reg.path / "transforms").iterdir())) == 2  # weights untouched


def test_orphans_cleaned_on_next_write_and_user_files_kept(reg: Registry) -> None:
    t = reg.path / "transforms"
    ours = [t / "backward_5_to_4_0123456789ab.safetensors", t / ".backward_3_to_2_x.safetensors.tmp-99-deadbeef",
            reg.path / ".manifest.json.tmp-99-deadbeef"]
    theirs = [t / "notes.txt", t / "my_weights.safetensors", reg.path / "README"]
    for f in ours + theirs:
        f.write_bytes(b"x")
    r = Registry.open(reg.path)
    r.add_version(dim=6, backward=np.eye(6, dtype=np.float32))
    assert [f.exists() for f in ours] == [False] * 3
    assert all(f.exists() for f in theirs)
    assert Registry.open(reg.path, verify=True).latest == 3


def test_same_name_orphan_with_wrong_content_is_rewritten(reg: Registry) -> None:
    w = np.eye(6, dtype=np.float32) * 2
    reg.add_version(dim=6, backward=w)
    f = reg.path / reg.transform_info(3, 2).file
    data = f.read_bytes()
    reg.add_transform(3, 2, np.eye(6, dtype=np.float32), replace=True)
    assert not f.exists()  # the replaced file is removed
    # a killed writer (or an attacker) left a file under the name the next write will use, with other bytes
    f.write_bytes(b"garbage" + data)
    reg.add_transform(3, 2, w, replace=True)  # same transform: same bytes, same content-addressed name
    assert reg.transform_info(3, 2).file == f"transforms/{f.name}" and f.read_bytes() == data
    assert Registry.open(reg.path, verify=True).latest == 3


# ----------------------------------------------------------------------------- SIGKILL mid-write

_KILLER = r"""
import os, signal, sys
import numpy as np
from bc_fast.store.registry import Registry

path, point = sys.argv[1], sys.argv[2]
real_replace = os.replace

def replace(src, dst, *args, **kwargs):
    name = os.path.basename(os.fspath(dst))
    if point == "weight-rename" and name.endswith(".safetensors"):
        os.kill(os.getpid(), signal.SIGKILL)          # the weight file's temp is complete, not renamed
    if point in ("manifest-rename", "create") and name == "manifest.json":
        os.kill(os.getpid(), signal.SIGKILL)          # weights renamed, manifest temp written, not renamed
    real_replace(src, dst, *args, **kwargs)
    if point == "after-commit" and name == "manifest.json":
        os.kill(os.getpid(), signal.SIGKILL)          # manifest switched, the replaced file not yet removed

os.replace = replace
if point == "create":
    Registry.create(path)
elif point == "after-commit":
    Registry.open(path).add_transform(2, 1, np.ones((8, 6), np.float32) * 3, replace=True)
else:
    Registry.open(path).add_version(dim=6, backward=np.eye(6, dtype=np.float32) * 3)
raise SystemExit("not killed")
"""


def _run_killer(path: Path, point: str) -> None:
    # cwd=tmp folder: `python -c` puts cwd on sys.path, and the source bc_fast/ must not shadow the install.
    proc = subprocess.run([sys.executable, "-c", _KILLER, str(path), point], capture_output=True, text=True,
                          timeout=120, cwd=path.parent)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


def test_sigkill_during_create_then_create_again(tmp_path: Path) -> None:
    p = tmp_path / "r"
    _run_killer(p, "create")
    assert not (p / "manifest.json").exists() and list(p.glob(".manifest.json.tmp-*"))
    with pytest.raises(RegistryError, match="interrupted Registry.create"):
        Registry.open(p)
    Registry.create(p).add_version(dim=4)
    assert Registry.open(p, verify=True).latest == 0 and not list(p.glob(".manifest.json.tmp-*"))


@pytest.mark.parametrize("point", ["weight-rename", "manifest-rename", "after-commit"])
def test_sigkill_mid_write_then_reopen_and_write(reg: Registry, point: str) -> None:
    before = reg.checksum
    _run_killer(reg.path, point)
    leftovers = [f.name for f in reg.path.rglob("*") if f.is_file() and f.name != ".lock"
                 and os.path.normpath(f.relative_to(reg.path)) not in
                 {os.path.normpath(t.file) for t in Registry.open(reg.path).transforms()} | {"manifest.json"}]
    assert leftovers, "the kill should leave a temp or orphaned weight file behind"
    r = Registry.open(reg.path, verify=True)  # the registry is the old one, or the new one: never broken
    assert (r.checksum == before) == (point != "after-commit")
    r.add_version(dim=6, backward=np.eye(6, dtype=np.float32) * 5)  # the next write cleans up
    final = Registry.open(reg.path, verify=True)
    live = {os.path.normpath(t.file) for t in final.transforms()}
    on_disk = {os.path.normpath(f.relative_to(reg.path)) for f in reg.path.rglob("*") if f.is_file()}
    assert on_disk == live | {"manifest.json", ".lock"}


# ----------------------------------------------------------------------------- concurrent writers


def _writer(path: str, worker: int, n: int) -> None:
    """Add ``n`` versions, reopening and retrying whenever another writer got there first."""
    done = 0
    while done < n:
        r = Registry.open(path)
        w = np.full((4, 4), worker * 10 + done, np.float32)
        try:
            r.add_version(dim=4, backward=w, metadata={"worker": worker, "i": done})
        except RegistryError as e:
            if "changed on disk" not in str(e):
                raise
            continue
        done += 1


def test_concurrent_writers(tmp_path: Path) -> None:
    p = tmp_path / "r"
    Registry.create(p).add_version(dim=4)
    ctx = multiprocessing.get_context("spawn")  # no fork: the parent may hold OpenMP/torch threads
    procs = [ctx.Process(target=_writer, args=(str(p), k, 3)) for k in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
    assert [proc.exitcode for proc in procs] == [0] * 4
    r = Registry.open(p, verify=True)
    got = sorted((v.metadata["worker"], v.metadata["i"]) for v in r.versions()[1:])
    assert got == [(k, i) for k in range(4) for i in range(3)]  # each write exactly once, none lost
    for v in r.versions()[1:]:  # each version's weights are the ones its writer meant
        want = v.metadata["worker"] * 10 + v.metadata["i"]
        assert np.all(r.transform_layers(v.version, v.version - 1)[0].weight == want)
    assert sorted(f.name for f in (p / "transforms").iterdir()) == sorted(
        Path(t.file).name for t in r.transforms())


# ----------------------------------------------------------------------------- bounded fuzzing of the parsers

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(10**40), max_value=10**40) | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)


def _valid_manifest_and_files() -> tuple[dict, dict[str, bytes]]:
    rng = np.random.default_rng(3)
    layers = [{"d_in": 4, "d_out": 3, "activation": "none", "activation_width": None, "bias": True}]
    data = _manifest.encode_transform(as_layers((rng.standard_normal((3, 4)).astype(np.float32),
                                                 rng.standard_normal(3).astype(np.float32))), 1, 0, "backward",
                                      "affine")
    sha = hashlib.sha256(data).hexdigest()
    m = {"format": _manifest.FORMAT, "format_version": 1, "name": "f", "created": "", "metadata": {},
         "versions": [{"version": 0, "dim": 3, "metadata": {}, "created": ""},
                      {"version": 1, "dim": 4, "metadata": {}, "created": ""}],
         "transforms": [{"from_version": 1, "to_version": 0, "direction": "backward", "kind": "affine",
                         "file": _manifest.weight_file("backward", 1, 0, sha), "sha256": sha, "layers": layers,
                         "fit_metrics": {}, "created": ""}]}
    m["checksum"] = _manifest.content_checksum(m)
    return m, {m["transforms"][0]["file"]: data}


def _replace_somewhere(obj: Any, data: Any, value: Any) -> Any:
    """Replace one randomly chosen node of a JSON tree by ``value``."""
    if isinstance(obj, (dict, list)) and obj and data.draw(st.booleans()):
        keys = list(obj) if isinstance(obj, dict) else list(range(len(obj)))
        k = data.draw(st.sampled_from(keys))
        obj[k] = _replace_somewhere(obj[k], data, value)
        return obj
    return value


@settings(max_examples=150, deadline=None, database=None, derandomize=True)
@given(data=st.data(), value=_JSON)
def test_fuzz_manifest_edits_raise_registry_error_only(data: Any, value: Any) -> None:
    m, files = _valid_manifest_and_files()
    edited = _replace_somewhere(m, data, value)
    raw = json.dumps(edited).encode()
    try:
        parsed = _manifest.parse_manifest(raw, "manifest.json", allow_edited=True)
        _, transforms = _manifest.validate_manifest(parsed, "manifest.json")
        for t in transforms:
            if t.file in files:
                _manifest.decode_transform(files[t.file], t, t.file)
    except RegistryError:
        pass


@settings(max_examples=150, deadline=None, database=None, derandomize=True)
@given(cut=st.integers(min_value=0, max_value=400), flips=st.lists(
    st.tuples(st.integers(min_value=0, max_value=400), st.integers(min_value=1, max_value=255)), max_size=3))
def test_fuzz_transform_bytes_raise_registry_error_only(cut: int, flips: list[tuple[int, int]]) -> None:
    m, files = _valid_manifest_and_files()
    (t,) = _manifest.validate_manifest(m, "manifest.json")[1]
    data = bytearray(files[t.file])
    for pos, x in flips:
        if pos < len(data):
            data[pos] ^= x
    data = data[: len(data) - cut % len(data)] if cut else data
    info = dataclasses.replace(t, sha256=hashlib.sha256(bytes(data)).hexdigest())  # sha matches: only content hostile
    try:
        layers = _manifest.decode_transform(bytes(data), info, "w.safetensors")
    except RegistryError:
        return
    assert layers[0].weight.shape == (3, 4) and np.all(np.isfinite(layers[0].weight))



def test_layer_spec_without_activation_width(reg: Registry) -> None:
    # a spec missing the optional key used to pass validation and raise KeyError when the weights loaded
    _edit(reg, lambda m: [s.pop("activation_width") for t in m["transforms"] for s in t["layers"]])
    r = Registry.open(reg.path, verify=True)
    assert r.operator(2, 0).d_out == 8 and "v2 -> v1" in r.describe()


@pytest.mark.parametrize("header_len", [640, 896, 1152, 1408, 640 + 65536])
def test_safetensors_header_length_that_starts_like_a_pickle_is_read(header_len: int) -> None:
    """A header of 640 bytes is ``80 02 00 ..``: a pickle's magic, yet valid safetensors (seen with MLP chains)."""
    from bc_fast.engine.operator import Layer

    data = _manifest.encode_transform([Layer(np.eye(4, dtype=np.float32), np.ones(4, np.float32), "relu", 4)],
                                      1, 0, "backward", "mlp")
    (n,) = struct.unpack("<Q", data[:8])
    assert n < header_len
    padded = struct.pack("<Q", header_len) + data[8:8 + n] + b" " * (header_len - n) + data[8 + n:]
    assert padded[0] == 0x80 and 2 <= padded[1] <= 5
    assert _manifest.foreign_format(padded) is None
    header = _manifest.read_header(padded, "t.safetensors")
    assert header["__metadata__"]["kind"] == "mlp"
    # a real pickle still is one
    assert _manifest.foreign_format(pickle.dumps([1, 2], protocol=2)) == "a Python pickle (protocol 2)"


def _routed_reg(tmp_path: Path) -> Registry:
    rng = np.random.default_rng(0)
    r = Registry.create(tmp_path / "routed")
    r.add_version(dim=4)
    r.add_version(dim=3, backward={"centroids": rng.standard_normal((2, 3)), "weights": rng.standard_normal((2, 4, 3)),
                                   "bias": rng.standard_normal((2, 4)), "m": 1, "temperature": 1.0})
    return r


def _with_recorded(key: str, text: str) -> bytes:
    """A transform file for pair (1, 0) whose metadata records ``text`` under ``key`` ("layers" or "routed")."""
    from safetensors.numpy import save

    if key == "layers":
        return save({"layers.0.weight": np.ones((8, 8), np.float32), "layers.0.bias": np.ones(8, np.float32)},
                    metadata=dict(_meta(), layers=text))
    tensors = {"routed.centroids": np.ones((2, 3), np.float32), "routed.weights": np.ones((2, 4, 3), np.float32),
               "routed.bias": np.ones((2, 4), np.float32)}
    return save(tensors, metadata=dict(_meta(), kind="routed", routed=text))


_SPEC = '{"d_in": 8, "d_out": 8, "activation": "none", "activation_width": null, "bias": true'


@pytest.mark.parametrize("key", ["layers", "routed"])
@pytest.mark.parametrize("text,msg", [
    ("[" * 100_000 + "]" * 100_000, "is nested too deeply to parse"),  # used to raise RecursionError
    ("[" * 100 + "]" * 100, "is nested more than 64 levels deep"),
    ("[" + _SPEC + ', "d_in": 8}]', "has the key 'd_in' twice in one object"),  # json.loads kept the last one
    ("[NaN]", "holds NaN, which is not JSON"),
])
def test_hostile_recorded_metadata_json(reg: Registry, tmp_path: Path, key: str, text: str, msg: str) -> None:
    """The JSON a transform file records is parsed as strictly as the manifest (sha256 re-stamped)."""
    target = reg if key == "layers" else _routed_reg(tmp_path)
    _plant(target, _with_recorded(key, text))
    with pytest.raises(RegistryError, match=rf"backward_1_to_0_\w+\.safetensors: the file's recorded '{key}' "
                                            rf"metadata {msg}.*re-add the transform"):
        Registry.open(target.path).operator(1, 0)
