"""Version registry: round trips, chain operators, and every misuse the issue lists."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from bc_fast import FusedTransform, Layer
from bc_fast.store import registry as registry_mod
from bc_fast.engine.fusion import apply_layers_reference
from bc_fast.store.registry import Registry, RegistryError, as_layers, show


def _mlp(rng: np.random.Generator, d_in: int, d_out: int, hidden: int = 16) -> list[Layer]:
    s = 1 / math.sqrt(d_in)
    w1 = rng.standard_normal((hidden, d_in)) * s
    p = rng.standard_normal((d_out, d_in)) * s
    w2 = rng.standard_normal((d_out, hidden)) / math.sqrt(hidden)
    return [Layer(np.vstack([w1, p]).astype(np.float32),
                  np.concatenate([rng.standard_normal(hidden) * 0.1, np.zeros(d_out)]).astype(np.float32),
                  "gelu", activation_width=hidden),
            Layer(np.hstack([w2, np.eye(d_out)]).astype(np.float32), (rng.standard_normal(d_out) * 0.1).astype(np.float32))]


class _Exported:
    """Stands in for a bc_fast.train module: anything with export_layers()."""

    def __init__(self, layers: list[Layer]) -> None:
        self._layers = layers

    def export_layers(self) -> list[Layer]:
        return self._layers


def _affine(rng: np.random.Generator, d_in: int, d_out: int) -> tuple[np.ndarray, np.ndarray]:
    return ((rng.standard_normal((d_out, d_in)) / math.sqrt(d_in)).astype(np.float32),
            (rng.standard_normal(d_out) * 0.1).astype(np.float32))


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    """Versions 0..3 with dims 12, 16, 16, 20: affine, linear, residual-MLP backward transforms."""
    rng = np.random.default_rng(0)
    r = Registry.create(tmp_path / "reg", metadata={"dataset": "synthetic"})
    r.add_version(dim=12, metadata={"model": "m0"})
    r.add_version(dim=16, backward=_affine(rng, 16, 12), fit_metrics={"align_mse": 0.01})
    r.add_version(dim=16, backward=(rng.standard_normal((16, 16)) / 4).astype(np.float32))
    r.add_version(dim=20, backward=_Exported(_mlp(rng, 20, 16)), kind="mlp")
    return r


def test_roundtrip_and_listing(reg: Registry) -> None:
    again = Registry.open(reg.path, verify=True)
    assert [v.dim for v in again.versions()] == [12, 16, 16, 20]
    assert again.latest == 3 and len(again) == 4 and 2 in again and 7 not in again
    assert again.checksum == reg.checksum and len(again.checksum) == 64
    assert again.version(0).metadata == {"model": "m0"}
    assert again.metadata == {"dataset": "synthetic"}
    kinds = {(t.from_version, t.to_version): t.kind for t in again.transforms()}
    assert kinds == {(1, 0): "affine", (2, 1): "linear", (3, 2): "mlp"}
    assert again.transform_info(1, 0).fit_metrics == {"align_mse": 0.01}
    manifest = json.loads((reg.path / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and manifest["transforms"][0]["sha256"]
    assert all(t["file"].endswith(".safetensors") for t in manifest["transforms"])
    assert not list(reg.path.rglob(".*.tmp-*"))  # atomic writes left no temp files
    text = show(reg.path)
    assert "v3 -> v2" in text and "mlp" in text and "dim 20" in text and reg.checksum[:16] in text
    assert reg.describe() == reg.show()


@pytest.mark.parametrize("src,dst", [(1, 0), (2, 0), (3, 0), (3, 1), (3, 2), (2, 1)])
def test_operator_matches_step_by_step(reg: Registry, src: int, dst: int) -> None:
    op = reg.operator(src, dst)
    assert isinstance(op, FusedTransform) and op.d_in == reg.dim(src) and op.d_out == reg.dim(dst)
    raw = [l for step in reg.chain_layers(src, dst) for l in step]
    x = np.random.default_rng(src).standard_normal((9, reg.dim(src))).astype(np.float32)
    ref = apply_layers_reference(raw, x)
    np.testing.assert_allclose(op.apply(x), ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    if src <= 2:  # affine chains are ONE matrix and bias
        assert len(op.layers) == 1 and op.layers[0].is_affine
    assert reg.operator(src, dst) is op  # cached


def test_identity_default_src_and_normalize(reg: Registry) -> None:
    x = np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32)
    np.testing.assert_array_equal(reg.operator(2, 2).apply(x), x)
    assert reg.operator(dst=0).d_in == 20  # src defaults to latest
    y = reg.operator(3, 0, normalize=True).apply(np.ones((3, 20), np.float32))
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1, rtol=1e-5)


def test_chain_checksum_stable_as_registry_grows(reg: Registry) -> None:
    before, full = reg.chain_checksum(2, 0), reg.checksum
    reg.add_version(dim=20, backward=np.eye(20, dtype=np.float32))
    assert reg.chain_checksum(2, 0) == before and reg.checksum != full
    assert reg.chain_checksum(3, 0) != reg.chain_checksum(4, 0)


def test_as_layers_inputs() -> None:
    torch = pytest.importorskip("torch")
    lin = torch.nn.Linear(5, 3, bias=False)
    (l,) = as_layers(lin)
    assert l.weight.shape == (3, 5) and l.bias is None
    (l,) = as_layers((np.ones((3, 5), np.float32), np.zeros(3)))
    assert l.bias is None and l.weight.dtype == np.float32  # zero bias dropped
    assert as_layers(np.ones((3, 5), np.float64))[0].weight.dtype == np.float64
    assert len(as_layers(FusedTransform.affine(np.ones((3, 5), np.float32)))) == 1
    with pytest.raises(TypeError, match="cannot read a transform from str"):
        as_layers("W")
    with pytest.raises(ValueError, match="expects d_in=4 but layers"):
        as_layers([Layer(np.ones((3, 5))), Layer(np.ones((2, 4)))])
    with pytest.raises(ValueError, match="NaN or Inf"):
        as_layers((np.full((3, 5), np.nan), None))


def test_forward_transform_only_when_fitted(reg: Registry) -> None:
    with pytest.raises(RegistryError, match="dst=1 is newer than src=0.*no forward transforms unless fitted"):
        reg.operator(0, 1)
    w, b = _affine(np.random.default_rng(5), 12, 16)
    reg.add_transform(0, 1, (w, b), fit_metrics={"mse": 0.5})
    x = np.ones((2, 12), np.float32)
    np.testing.assert_allclose(reg.operator(0, 1).apply(x), x @ w.T + b, rtol=1e-5)
    assert Registry.open(reg.path).transform_info(0, 1).direction == "forward"
    with pytest.raises(RegistryError, match="no forward transform 1 -> 2"):
        reg.operator(0, 2)


def test_replace_transform_removes_old_file(reg: Registry) -> None:
    old = reg.path / reg.transform_info(2, 1).file
    with pytest.raises(RegistryError, match="already has a backward transform 2 -> 1; pass replace=True"):
        reg.add_transform(2, 1, np.eye(16, dtype=np.float32))
    reg.add_transform(2, 1, np.eye(16, dtype=np.float32), replace=True)
    assert not old.exists()
    assert Registry.open(reg.path, verify=True).transform_info(2, 1).kind == "linear"


# ----------------------------------------------------------------------------- misuse


def test_unknown_version(reg: Registry) -> None:
    with pytest.raises(RegistryError, match=r"unknown version 9 \(src\).*known versions: 0..3"):
        reg.operator(9, 0)
    with pytest.raises(RegistryError, match=r"unknown version -1 \(dst\)"):
        reg.operator(3, -1)
    with pytest.raises(TypeError, match="must be an int version number"):
        reg.operator("3", 0)  # type: ignore[arg-type]
    with pytest.raises(RegistryError, match="has no versions yet"):
        Registry.create(reg.path.parent / "empty").latest


def test_dimension_mismatch_and_direction_on_add(reg: Registry) -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(RegistryError, match=r"dimension mismatch.*version 4 \(dim 24\) to version 3 \(dim 20\).*7 -> 20"):
        reg.add_version(dim=24, backward=rng.standard_normal((20, 7)).astype(np.float32))
    with pytest.raises(RegistryError, match="other direction"):
        reg.add_version(dim=24, backward=rng.standard_normal((24, 20)).astype(np.float32))  # a forward map 3 -> 4
    with pytest.raises(ValueError, match="kind='linear' but the transform has activation layers"):
        reg.add_version(dim=20, backward=_mlp(rng, 20, 20), kind="linear")
    with pytest.raises(ValueError, match="kind must be one of"):
        reg.add_version(dim=20, backward=np.eye(20), kind="spline")
    with pytest.raises(RegistryError, match="next version of .* is 4, got 6"):
        reg.add_version(6, dim=20)
    with pytest.raises(RegistryError, match="version 2 already exists"):
        reg.add_version(2, dim=20)
    with pytest.raises(ValueError, match="JSON has no NaN"):
        reg.add_version(dim=20, backward=np.eye(20), fit_metrics={"mse": float("nan")})
    # nothing above left a file or a version behind
    assert len(Registry.open(reg.path, verify=True)) == 4
    assert len(list((reg.path / "transforms").iterdir())) == 3


def test_checksum_mismatch(reg: Registry) -> None:
    f = reg.path / reg.transform_info(1, 0).file
    data = bytearray(f.read_bytes())
    data[-1] ^= 0x01
    f.write_bytes(bytes(data))
    fresh = Registry.open(reg.path)  # cheap open checks the manifest only
    with pytest.raises(RegistryError, match="checksum mismatch for transform 1 -> 0"):
        fresh.operator(3, 0)
    with pytest.raises(RegistryError, match="checksum mismatch"):
        Registry.open(reg.path, verify=True)


def test_truncated_and_empty_manifest(reg: Registry) -> None:
    m = reg.path / "manifest.json"
    text = m.read_text()
    m.write_text(text[: len(text) // 2])
    with pytest.raises(RegistryError, match="manifest.json is not valid JSON \\(truncated or hand-edited"):
        Registry.open(reg.path)
    m.write_text("")
    with pytest.raises(RegistryError, match="manifest.json is empty"):
        Registry.open(reg.path)


def _edit(reg: Registry, fn) -> None:
    m = reg.path / "manifest.json"
    d = json.loads(m.read_text())
    fn(d)
    m.write_text(json.dumps(d))


def test_hand_edited_manifest(reg: Registry) -> None:
    _edit(reg, lambda d: d["versions"][0]["metadata"].update(model="other"))
    with pytest.raises(RegistryError, match="content checksum mismatch.*edited by hand"):
        Registry.open(reg.path)
    edited = Registry.open(reg.path, allow_edited=True)  # a deliberate edit can be accepted ...
    assert edited.version(0).metadata == {"model": "other"}
    edited.add_version(dim=20, backward=np.eye(20, dtype=np.float32))  # ... and is re-stamped on write
    assert Registry.open(reg.path).latest == 4


def test_hand_edited_dims_are_inconsistent(reg: Registry) -> None:
    _edit(reg, lambda d: d["versions"][1].update(dim=15))
    with pytest.raises(RegistryError, match=r"transforms\[\d\] maps 16 -> 12 features but version 1 has dim 15"):
        Registry.open(reg.path, allow_edited=True)


@pytest.mark.parametrize("field,value,msg", [
    ("format", "something", "not a bc_fast registry"),
    ("format_version", 99, "newer than this bc_fast supports"),
    ("versions", {}, "field 'versions' must be list"),
])
def test_manifest_schema_errors(reg: Registry, field: str, value: object, msg: str) -> None:
    _edit(reg, lambda d: d.update({field: value}))
    with pytest.raises(RegistryError, match=msg):
        Registry.open(reg.path, allow_edited=True)


def test_manifest_missing_field_names_it(reg: Registry) -> None:
    _edit(reg, lambda d: d["versions"][2].pop("dim"))
    with pytest.raises(RegistryError, match=r"manifest.json: versions\[2\]: missing field 'dim'"):
        Registry.open(reg.path, allow_edited=True)


def test_transform_recorded_in_other_direction(reg: Registry) -> None:
    def swap(d: dict) -> None:
        t = next(t for t in d["transforms"] if t["from_version"] == 2)
        t["from_version"], t["to_version"] = 1, 2  # still says "backward"
    _edit(reg, swap)
    with pytest.raises(RegistryError, match="recorded as backward from version 1 to version 2, which is the other direction"):
        Registry.open(reg.path, allow_edited=True)


def test_weight_file_recorded_in_other_direction(reg: Registry) -> None:
    # hand-point the forward slot 1 -> 2 at the backward B_2's file: the file's own header disagrees
    def misfile(d: dict) -> None:
        t = dict(next(t for t in d["transforms"] if t["from_version"] == 2))
        t.update(from_version=1, to_version=2, direction="forward")
        d["transforms"].append(t)
    _edit(reg, misfile)
    r = Registry.open(reg.path, allow_edited=True)
    with pytest.raises(RegistryError, match="records a backward transform 2 -> 1 but the manifest uses it as forward 1 -> 2"):
        r.operator(1, 2)


def test_missing_weight_file(reg: Registry) -> None:
    (reg.path / reg.transform_info(2, 1).file).unlink()
    with pytest.raises(RegistryError, match="transform 2 -> 1 file .* is missing"):
        Registry.open(reg.path)


def test_create_and_open_errors(tmp_path: Path, reg: Registry) -> None:
    with pytest.raises(RegistryError, match="already exists; use Registry.open"):
        Registry.create(reg.path)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(RegistryError, match="not an empty directory"):
        Registry.create(tmp_path / "full")
    with pytest.raises(RegistryError, match="not found \\(the directory does not exist\\)"):
        Registry.open(tmp_path / "nope")
    with pytest.raises(TypeError, match="use Registry.create"):
        Registry(tmp_path, {}, [], [])


def test_concurrent_writer_detected(reg: Registry) -> None:
    other = Registry.open(reg.path)
    reg.add_version(dim=20, backward=np.eye(20, dtype=np.float32))
    with pytest.raises(RegistryError, match="changed on disk since this Registry was opened"):
        other.add_version(dim=20, backward=np.eye(20, dtype=np.float32))
    # the loser's weight file was cleaned up
    assert len(list((reg.path / "transforms").iterdir())) == 4


def test_failed_manifest_write_leaves_registry_unchanged(reg: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    before = (reg.path / "manifest.json").read_bytes()
    files_before = sorted(p.name for p in (reg.path / "transforms").iterdir())
    real = registry_mod.atomic_write_bytes

    def failing(path, data):
        if Path(path).name == "manifest.json":
            raise OSError("disk full")
        return real(path, data)

    monkeypatch.setattr(registry_mod, "atomic_write_bytes", failing)
    with pytest.raises(OSError, match="disk full"):
        reg.add_version(dim=20, backward=np.eye(20, dtype=np.float32) * 2)
    monkeypatch.undo()
    assert (reg.path / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in (reg.path / "transforms").iterdir()) == files_before
    assert reg.latest == 3
    reg.add_version(dim=20, backward=np.eye(20, dtype=np.float32) * 2)  # the object is still usable
    assert Registry.open(reg.path, verify=True).latest == 4


def test_atomic_write_cleans_temp_on_error(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "x.bin"
    with pytest.raises(OSError):
        registry_mod.atomic_write_bytes(target, b"abc")  # parent missing
    (tmp_path / "sub").mkdir()
    registry_mod.atomic_write_bytes(target, b"abc")
    assert target.read_bytes() == b"abc" and [p.name for p in (tmp_path / "sub").iterdir()] == ["x.bin"]


def test_bc_fast_train_modules_save_into_registry(tmp_path: Path) -> None:
    """bc_fast.train transforms (export() + kind) go straight into a registry and match their torch forward."""
    torch = pytest.importorskip("torch")
    tr = pytest.importorskip("bc_fast.train.transforms")
    torch.manual_seed(0)
    mods = [tr.AffineTransform(24, 16), tr.ResidualMLPTransform(24, 24, hidden=8, activation="gelu"),
            tr.LowRankAffineTransform(32, 24, rank=4), tr.TruncateTransform(40, 32)]
    dims = [16, 24, 24, 32, 40]
    r = Registry.create(tmp_path / "trained")
    r.add_version(dim=dims[0])
    for k, m in enumerate(mods, start=1):
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(0, 0.2)
        r.add_version(dim=dims[k], backward=m, fit_metrics={"epochs": 1})
    assert [t.kind for t in Registry.open(r.path, verify=True).transforms()] == [
        "affine", "mlp", "lowrank", "truncate"]
    x = torch.randn(7, 40)
    with torch.no_grad():
        want = x
        for m in reversed(mods):
            want = m(want)
    got = r.operator(4, 0).apply(x.numpy())
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)


def test_transform_files_are_deterministic_and_old_files_still_load(reg: Registry) -> None:
    """The same transform always gets the same bytes (safetensors.numpy.save orders metadata at random),
    and files written by that older writer still load."""
    w = np.eye(16, dtype=np.float32) * 3
    sha = [reg.add_transform(2, 1, w, replace=True).sha256 for _ in range(3)]
    assert len(set(sha)) == 1 and Registry.open(reg.path, verify=True).transform_info(2, 1).sha256 == sha[0]
    from safetensors.numpy import save

    old_bytes = save({"layers.0.weight": w}, metadata={
        "format": "bc_fast.transform", "from_version": "2", "to_version": "1", "direction": "backward",
        "kind": "linear", "layers": json.dumps(registry_mod.layer_specs(as_layers(w)), sort_keys=True)})
    f = reg.path / reg.transform_info(2, 1).file
    f.write_bytes(old_bytes)
    _edit(reg, lambda d: next(t for t in d["transforms"] if t["from_version"] == 2).update(
        sha256=registry_mod.hashlib.sha256(old_bytes).hexdigest()))
    old = Registry.open(reg.path, allow_edited=True, verify=True)
    np.testing.assert_array_equal(old.transform_layers(2, 1)[0].weight, w)


def test_registry_api_names_still_importable() -> None:
    from bc_fast.store.registry import (  # noqa: F401
        FORMAT, FORMAT_VERSION, KINDS, MANIFEST, TRANSFORM_DIR, Registry, RegistryError, TransformInfo,
        VersionInfo, as_layers, atomic_write_bytes, show)
    from bc_fast.store import manifest as _manifest

    assert registry_mod.RegistryError is _manifest.RegistryError and FORMAT_VERSION == 1


def _two_versions(tmp_path: Path) -> Registry:
    r = Registry.create(tmp_path / "r2")
    r.add_version(dim=4)
    r.add_version(dim=6)
    return r


class _Bf16Op(FusedTransform):
    """A fp32 operator that reports precision 'bf16', as one built on an AVX512-BF16 CPU does (this CPU may lack it)."""

    @property
    def precision(self) -> str:
        return "bf16"


def test_fused_transform_with_normalize_is_refused_not_silently_dropped(tmp_path: Path) -> None:
    # add_transform used to store the weights only: reg.operator(1, 0) then returned unnormalised rows
    rng = np.random.default_rng(0)
    w, b = _affine(rng, 6, 4)
    r = _two_versions(tmp_path)
    op = FusedTransform.affine(w, b, normalize=True)
    fix = r"property of the served operator, not of a stored step.*reg\.operator\(src, dst, normalize=True\)"
    with pytest.raises(ValueError, match=r"FusedTransform built with normalize=True: normalisation is a " + fix):
        r.add_transform(1, 0, op)
    r3 = Registry.create(tmp_path / "r3")
    r3.add_version(dim=4)
    with pytest.raises(ValueError, match=r"normalize=True.*build_legacy_index\(\.\.\., normalize=True\)"):
        r3.add_version(dim=6, backward=op)
    assert r3.latest == 0
    with pytest.raises(ValueError, match="normalize=True"):
        as_layers(op)
    assert not r.transforms()
    # the fix the message names: store the weights, normalise when serving
    r.add_transform(1, 0, op.layers)
    x = rng.standard_normal((5, 6)).astype(np.float32)
    ref = x.astype(np.float64) @ w.astype(np.float64).T + b
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(r.operator(1, 0, normalize=True).apply(x), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r.operator(1, 0, normalize=True).apply(x), op.apply(x), rtol=1e-6, atol=1e-7)


def test_fused_transform_with_bf16_precision_is_refused(tmp_path: Path) -> None:
    r = _two_versions(tmp_path)
    op = _Bf16Op.affine(np.ones((4, 6), np.float32))
    with pytest.raises(ValueError, match=r"precision='bf16'.*would change its results.*"
                                         r"reg\.operator\(src, dst, precision='bf16'\)"):
        r.add_transform(1, 0, op)
    assert not r.transforms()


@pytest.mark.parametrize("weight,bias,name", [
    (np.full((4, 6), 1e300), None, "weight"),
    (np.ones((4, 6)), np.array([0.0, 0.0, 1e39, 0.0]), "bias"),
])
def test_float64_weights_beyond_float32_refused_at_add(tmp_path: Path, weight: np.ndarray, bias: np.ndarray | None,
                                                      name: str) -> None:
    # float64 weights are stored exactly: 1e300 used to be stored, and every operator on it failed later
    r = _two_versions(tmp_path)
    with pytest.raises(ValueError, match=rf"layers\[0\]\.{name} has values beyond float32 range.*rescale"):
        r.add_transform(1, 0, (weight, bias))
    assert not r.transforms()
    r.add_transform(1, 0, np.full((4, 6), 1e30))  # float64 within float32's range: stored exactly, as before
    assert r.transform_layers(1, 0)[0].weight.dtype == np.float64


def test_fused_chain_beyond_float32_is_named_not_blamed_on_nan_weights(tmp_path: Path) -> None:
    # two finite 1e20 steps fuse to 1e40: this used to say "layers[0].weight contains NaN or Inf"
    r = Registry.create(tmp_path / "r")
    r.add_version(dim=2)
    for _ in range(2):
        r.add_version(dim=2, backward=np.eye(2, dtype=np.float32) * np.float32(1e20))
    with pytest.raises(ValueError, match=r"fused chain of 2 -> 1, 1 -> 0 exceeds float32 range "
                                         r"\(max \|value\| = 1e\+40\)"):
        r.operator(2, 0)
    one_step = r.operator(1, 0).apply(np.ones((1, 2), np.float32))
    np.testing.assert_array_equal(one_step, np.full((1, 2), 1e20, np.float32))
