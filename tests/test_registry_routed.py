"""Routed (local, per-cluster) transforms in the registry: storage, fusion with affine steps, conversion
(verification, sidecar, resume, CLI) and legacy indexes (bc_fast.store.routed_format / routed_chain,
bc_fast.convert.routed_check)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from bc_fast.convert import VerificationError, apply_to_table, convert_table, read_sidecar
from bc_fast.convert.job import operator_fingerprint, registry_job
from bc_fast.engine import Layer
from bc_fast.engine.routed import RoutedTransform
from bc_fast.fit import AutoAdapter, LocalAdapter
from bc_fast.fit._routing import RoutedParams, routed_reference
from bc_fast.store.registry import Registry, RegistryError

THREADS = 1
D = 16


def _piecewise(n: int, d: int = D, k: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Source rows in k blobs, each mapped by its own rotation (a piecewise-linear drift), float32."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d)) * 4
    lab = rng.integers(0, k, n)
    x = centres[lab] + rng.standard_normal((n, d))
    maps = np.stack([np.linalg.qr(rng.standard_normal((d, d)))[0] for _ in range(k)])
    y = np.einsum("nij,nj->ni", maps[lab], x) + 0.05 * rng.standard_normal((n, d))
    return x.astype(np.float32), y.astype(np.float32)


def _params(k: int = 5, d_in: int = D, d_out: int = D, m: int = 2, t: float = 20.0, seed: int = 0) -> RoutedParams:
    rng = np.random.default_rng(seed)
    return RoutedParams(rng.standard_normal((k, d_in)) * 3, rng.standard_normal((k, d_out, d_in)) / np.sqrt(d_in),
                        rng.standard_normal((k, d_out)), m, t)


def _rel_err(y, ref) -> np.ndarray:
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(y - ref, axis=1) / np.maximum(np.linalg.norm(ref, axis=1), 1e-12)


def _affine(rng, d_out: int, d_in: int) -> tuple[np.ndarray, np.ndarray]:
    return (rng.standard_normal((d_out, d_in)) / np.sqrt(d_in)).astype(np.float32), \
        rng.standard_normal(d_out).astype(np.float32)


@pytest.fixture(scope="module")
def adapter() -> LocalAdapter:
    x, y = _piecewise(2000)
    return LocalAdapter(k=4, m=2, random_state=0).fit(x, y)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Versions of dims (24, 16, 16, 20): B_1 affine 16 -> 24, B_2 routed 16 -> 16, B_3 affine 20 -> 16."""
    rng = np.random.default_rng(3)
    path = tmp_path_factory.mktemp("chain") / "registry"
    reg = Registry.create(path)
    reg.add_version(dim=24)
    reg.add_version(dim=16, backward=_affine(rng, 24, 16))
    params = _params(k=6, m=2, t=15.0)
    reg.add_version(dim=16, backward=params)
    w3, b3 = _affine(rng, 16, 20)
    reg.add_version(dim=20, backward=(w3, b3))
    return Registry.open(path, verify=True), params


def _step_by_step(reg: Registry, params: RoutedParams, x: np.ndarray, normalize: bool = False) -> np.ndarray:
    """The chain 3 -> 0 in float64, independently: affine, the fit module's routed reference, affine."""
    (l3,), (l1,) = reg.transform_layers(3, 2), reg.transform_layers(1, 0)
    h = np.asarray(x, np.float64) @ l3.weight.astype(np.float64).T + l3.bias
    h = routed_reference(h, params)
    y = h @ l1.weight.astype(np.float64).T + l1.bias
    return y / np.linalg.norm(y, axis=1, keepdims=True) if normalize else y


def _snapshot(path) -> dict:
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file() and f.name != ".lock"}


# ----------------------------------------------------------------------------- storage


def test_round_trip_is_bit_identical(tmp_path, adapter):
    reg = Registry.create(tmp_path / "reg")
    reg.add_version(dim=D)
    reg.add_version(dim=D)
    info = reg.add_transform(1, 0, adapter, fit_metrics={"n": 2000})
    assert info.kind == "routed" and info.is_routed and info.layers == ()
    assert info.routed == {"d_in": D, "d_out": D, "k": 4, "m": 2, "temperature": adapter.temperature_}
    again = Registry.open(tmp_path / "reg", verify=True)
    op = again.operator(1, 0)
    assert isinstance(op, RoutedTransform) and (op.d_in, op.d_out, op.k, op.m) == (D, D, 4, 2)
    x, _ = _piecewise(3000, seed=7)
    assert np.array_equal(op.apply(x, threads=THREADS), adapter.transform(x))
    assert np.array_equal(op.apply(x), adapter.operator_.apply(x))
    step, p = again.transform_step(1, 0), adapter.routed_params()
    for name in ("centroids", "weights", "bias"):
        assert np.array_equal(getattr(step, name), getattr(p, name))
    assert (step.m, step.temperature) == (p.m, p.temperature)
    # the store's float64 definition is the fit module's, exactly
    np.testing.assert_array_equal(step.reference(x[:300]), routed_reference(x[:300], p))
    manifest = json.loads((tmp_path / "reg" / "manifest.json").read_text())
    assert manifest["format_version"] == 2
    entry = manifest["transforms"][0]
    assert entry["kind"] == "routed" and "layers" not in entry and entry["routed"] == info.routed
    data = (tmp_path / "reg" / entry["file"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == entry["sha256"]
    from safetensors.numpy import load

    assert sorted(load(data)) == ["routed.bias", "routed.centroids", "routed.weights"]
    # a forward routed transform from the RoutedParams (or their dict) is the same bytes in another file
    again.add_transform(0, 1, p.as_dict())
    fwd = Registry.open(tmp_path / "reg", verify=True)
    assert fwd.transform_info(0, 1).direction == "forward"
    assert np.array_equal(fwd.operator(0, 1).apply(x), op.apply(x))
    assert "routed 16 -> 16 (k=4, m=2" in fwd.describe() and "fuses into 1 routed operator" in fwd.describe()
    with pytest.raises(RegistryError, match="is a routed \\(local\\) transform, not a layer program"):
        fwd.transform_layers(1, 0)
    # an AutoAdapter that chose the local adapter is stored as its routed map
    auto = AutoAdapter(kinds=("local",), local_params={"k": 4, "m": 2}).fit(*_piecewise(1000, seed=2))
    fwd.add_transform(1, 0, auto, kind=auto.kind, replace=True)
    assert np.array_equal(Registry.open(tmp_path / "reg").operator(1, 0).apply(x), auto.transform(x))
    with pytest.raises(RegistryError, match="routed"):
        fwd.fused_layers(1, 0)


def test_layer_registries_are_unchanged(tmp_path, make_chain_registry):
    """Layer-only registries: format version 1, the same bytes on disk as before routed transforms existed."""
    reg = make_chain_registry(tmp_path / "reg", (8, 12), (3,))
    before = _snapshot(tmp_path / "reg")
    again = Registry.open(tmp_path / "reg", verify=True)
    assert again.checksum == reg.checksum and isinstance(again.operator(1, 0), type(reg.operator(1, 0)))
    again.operator(1, 0).apply(np.ones((2, 12), np.float32))
    assert _snapshot(tmp_path / "reg") == before
    assert json.loads((tmp_path / "reg" / "manifest.json").read_text())["format_version"] == 1
    # a fixed layer program's file: the sha256 bc_fast wrote before routed transforms (content-addressed names)
    from bc_fast.store.manifest import encode_transform

    w = (np.arange(30, dtype=np.float32).reshape(6, 5) - 7) / 8
    layers = [Layer(w, np.arange(6, dtype=np.float32) / 4, "relu"), Layer(np.arange(18, dtype=np.float32).reshape(3, 6) / 16)]
    assert hashlib.sha256(encode_transform(layers, 2, 1, "backward", "mlp")).hexdigest() == \
        "b4c2c184eada3b344eb5aad0de47396edaa36cb27010275322eb4ae811cc0032"


def test_bad_routed_transforms_are_refused_and_nothing_is_written(tmp_path, adapter):
    reg = Registry.create(tmp_path / "reg")
    reg.add_version(dim=D)
    reg.add_version(dim=D + 1)
    reg.add_version(dim=D)
    before = _snapshot(tmp_path / "reg")
    p = adapter.routed_params()
    cases = [
        ((2, 1, adapter), RegistryError, (r"dimension mismatch: the backward routed transform 2 -> 1 must map version 2 "
                                          r"\(dim 16\) to version 1 \(dim 17\), but its centroids and weights map 16 -> 16")),
        ((1, 0, p), RegistryError, r"routed transform 1 -> 0 .* map 16 -> 16"),
        ((2, 1, {**p.as_dict(), "m": 5}), ValueError, r"backward transform 2 -> 1: m must be an integer in \[1, k\] = \[1, 4\]"),
        ((2, 1, {**p.as_dict(), "m": True}), ValueError, r"m must be an integer"),
        ((2, 1, {**p.as_dict(), "temperature": 0.0}), ValueError, "temperature must be a finite number > 0"),
        ((2, 1, {**p.as_dict(), "weights": p.weights[:3]}), ValueError, r"weights must be \(k, d_out, d_in\) = \(4, d_out, 16\)"),
        ((2, 1, {**p.as_dict(), "bias": p.bias[:, :3]}), ValueError, r"bias must be \(k, d_out\) = \(4, 16\)"),
        ((2, 1, {**p.as_dict(), "centroids": np.where(np.eye(4, D) > 0, np.nan, p.centroids)}), ValueError,
         r"2 -> 1: centroids holds 4 NaN or Inf"),
        ((2, 1, {k: v for k, v in p.as_dict().items() if k != "temperature"}), ValueError, r"lack \['temperature'\]"),
        ((2, 1, adapter.operator_), TypeError, "a compiled RoutedTransform cannot be stored"),
        ((2, 1, LocalAdapter(k=4)), ValueError, "not fitted yet"),
    ]
    for args, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            reg.add_transform(*args)
    with pytest.raises(ValueError, match="kind='affine' but the backward routed transform 2 -> 1 is a routed"):
        reg.add_transform(2, 1, adapter, kind="affine")
    with pytest.raises(ValueError, match="kind='routed' but the backward transform 2 -> 1 is a layer program"):
        reg.add_transform(2, 1, np.eye(D + 1, D, dtype=np.float32), kind="routed")
    assert _snapshot(tmp_path / "reg") == before and Registry.open(tmp_path / "reg").transforms() == []


def _tamper(path, offset_from_end: int = 5) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x01
    path.write_bytes(bytes(data))


def test_tampered_or_edited_routed_transforms_are_refused(tmp_path, adapter):
    reg = Registry.create(tmp_path / "reg")
    reg.add_version(dim=D)
    reg.add_version(dim=D, backward=adapter)
    mpath = tmp_path / "reg" / "manifest.json"
    wfile = tmp_path / "reg" / reg.transform_info(1, 0).file
    good_file, good_manifest = wfile.read_bytes(), mpath.read_text()

    _tamper(wfile)  # one bit of the weights
    with pytest.raises(RegistryError, match=r"checksum mismatch for transform 1 -> 0.*weights were modified"):
        Registry.open(tmp_path / "reg", verify=True)
    with pytest.raises(RegistryError, match="checksum mismatch"):
        Registry.open(tmp_path / "reg").operator(1, 0)
    wfile.write_bytes(good_file)

    def edit(fn) -> None:
        m = json.loads(good_manifest)
        fn(m)
        mpath.write_text(json.dumps(m))

    edit(lambda m: m["transforms"][0]["routed"].update(m=1))  # an edited manifest, accepted by allow_edited
    with pytest.raises(RegistryError, match=r"describes routed transform 1 -> 0 as .*'m': 1.* but the weight file "
                                            r"records .*'m': 2"):
        Registry.open(tmp_path / "reg", allow_edited=True).operator(1, 0)
    edit(lambda m: m.update(format_version=1))
    with pytest.raises(RegistryError, match="is a routed transform, which needs format_version 2, but the manifest says 1"):
        Registry.open(tmp_path / "reg", allow_edited=True)
    edit(lambda m: m["transforms"][0]["routed"].update(d_in=17))
    with pytest.raises(RegistryError, match=r"routed transform mapping 17 -> 16 features but version 1 has dim 16"):
        Registry.open(tmp_path / "reg", allow_edited=True)
    edit(lambda m: m["transforms"][0]["routed"].update(m=9))
    with pytest.raises(RegistryError, match=r"routed.m=9 must be in \[1, k\] = \[1, 4\]"):
        Registry.open(tmp_path / "reg", allow_edited=True)
    edit(lambda m: m.update(format_version=3))
    with pytest.raises(RegistryError, match="format_version 3 is newer than this bc_fast supports"):
        Registry.open(tmp_path / "reg", allow_edited=True)


# ----------------------------------------------------------------------------- chains


@pytest.mark.parametrize("normalize", [False, True])
def test_routed_and_affine_steps_fuse_into_one_routed_operator(chain, normalize):
    reg, params = chain
    op = reg.operator(3, 0, normalize=normalize)
    assert isinstance(op, RoutedTransform) and (op.d_in, op.d_out, op.k, op.m) == (20, 24, 6, 2)
    assert op.normalize is normalize
    x = np.random.default_rng(5).standard_normal((2000, 20)).astype(np.float32) * 2
    assert _rel_err(op.apply(x, threads=THREADS), _step_by_step(reg, params, x, normalize)).max() < 1e-4
    # sub-chains: routed + affine after, affine before + routed, the routed step alone (bit for bit)
    h = np.random.default_rng(6).standard_normal((500, 16)).astype(np.float32)
    (l1,) = reg.transform_layers(1, 0)
    after = routed_reference(h, params) @ l1.weight.astype(np.float64).T + l1.bias
    assert _rel_err(reg.operator(2, 0).apply(h), after).max() < 1e-4
    assert np.array_equal(reg.operator(2, 1).apply(h), RoutedTransform.from_params(params).apply(h))
    with pytest.raises(RegistryError, match="transform 2 -> 1 .* is a routed \\(local\\) transform"):
        reg.chain_layers(3, 0)
    steps = reg.chain_steps(3, 0)
    assert [type(s) for s in steps] == [list, RoutedParams, list]  # a registry's routed step is a RoutedParams


def test_chains_that_do_not_fuse_are_refused(tmp_path):
    rng = np.random.default_rng(1)
    reg = Registry.create(tmp_path / "reg")
    reg.add_version(dim=8)
    reg.add_version(dim=8, backward=_params(k=3, d_in=8, d_out=8, seed=1))
    reg.add_version(dim=8, backward=_params(k=4, d_in=8, d_out=8, seed=2))
    mlp = [Layer(rng.standard_normal((10, 8)).astype(np.float32), None, "relu"),
           Layer(rng.standard_normal((8, 10)).astype(np.float32))]
    reg.add_version(dim=8, backward=mlp)
    with pytest.raises(RegistryError, match=r"the chain 2 -> 0 has 2 routed \(local\) steps \(2 -> 1, 1 -> 0\): two "
                                            r"routed steps do not fuse into one operator"):
        reg.operator(2, 0)
    with pytest.raises(RegistryError, match=r"the chain 3 -> 1 has a routed \(local\) step \(2 -> 1\) and an MLP step "
                                            r"\(3 -> 2, relu layers\): a routed step fuses only with affine steps"):
        reg.operator(3, 1)
    assert isinstance(reg.operator(2, 1), RoutedTransform) and isinstance(reg.operator(1, 0), RoutedTransform)
    with pytest.raises(ValueError, match="runs in fp32 only"):
        reg.operator(2, 1, precision="bf16")
    x = np.zeros((10, 8), np.float32)
    np.save(tmp_path / "x.npy", x)
    with pytest.raises(RegistryError, match="two routed steps do not fuse"):
        convert_table(tmp_path / "x.npy", tmp_path / "y.npy", registry=reg, src=2, dst=0, progress=False)
    assert not (tmp_path / "y.npy").exists()
    text = reg.describe()
    assert "v3 -> v1: 2 step(s), 2 layer(s), 1 routed step(s), does not fuse" in text
    assert "v3 -> v0: 3 step(s), 2 layer(s), 2 routed step(s), does not fuse" in text


# ----------------------------------------------------------------------------- conversion


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


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_convert_table_through_a_routed_chain(tmp_path, chain, monkeypatch, dtype):
    from bc_fast.store import tables

    reg, params = chain
    x = (np.random.default_rng(9).standard_normal((1500, 20)) * 2).astype(dtype)
    np.save(tmp_path / "in.npy", x)
    kw = {"registry": reg, "src": 3, "dst": 0, "chunk_rows": 200, "threads": THREADS, "progress": False,
          "journal_interval": 0, "verify": 1500}
    res = convert_table(tmp_path / "in.npy", tmp_path / "clean.npy", **kw)
    out = np.load(tmp_path / "clean.npy")
    op = reg.operator(3, 0)
    assert out.dtype == dtype and out.shape == (1500, 24)
    expected = np.concatenate([op.apply(x[i:i + 200], out_dtype=dtype) for i in range(0, 1500, 200)])
    assert np.array_equal(out, expected)
    assert res.verified_rows == 1500 and res.verify_max_error < (2e-3 if dtype == np.float16 else 1e-4)
    assert _rel_err(out, _step_by_step(reg, params, x)).max() < (2e-3 if dtype == np.float16 else 1e-4)
    side = read_sidecar(tmp_path / "clean.npy")
    assert side["version"] == 0 and side["source_version"] == 3
    assert side["operator"]["sha256"] == operator_fingerprint(op)
    assert side["operator"]["routed"] == {"k": 6, "m": 2, "temperature": 15.0}
    assert [c["from"] for c in side["chain"]] == [3, 2, 1]
    assert side["chain"][1]["sha256"] == reg.transform_info(2, 1).sha256

    with monkeypatch.context() as m:
        _interrupt_after(m, tables.NpyWriter, 3)
        with pytest.raises(KeyboardInterrupt):
            convert_table(tmp_path / "in.npy", tmp_path / "out.npy", **kw)
    journal = json.loads((tmp_path / "out.npy.partial.journal.json").read_text())
    assert journal["done_chunks"] == 3 and not (tmp_path / "out.npy").exists()
    res = convert_table(tmp_path / "in.npy", tmp_path / "out.npy", resume=True, **kw)
    assert res.resumed_rows == 600
    assert (tmp_path / "out.npy").read_bytes() == (tmp_path / "clean.npy").read_bytes()
    assert not [f for f in os.listdir(tmp_path) if "partial" in f]


def test_routed_conversion_is_cpu_only_and_fingerprinted(tmp_path, chain):
    reg, _ = chain
    np.save(tmp_path / "in.npy", np.ones((4, 20), np.float32))
    with pytest.raises(ValueError, match="a routed \\(local\\) transform runs on the CPU only"):
        convert_table(tmp_path / "in.npy", tmp_path / "out.npy", registry=reg, src=3, dst=0, device="cuda",
                      progress=False)
    assert sorted(os.listdir(tmp_path)) == ["in.npy"]
    op = reg.operator(3, 0)
    other = RoutedTransform(op.score_weight, op.score_bias, op.weight, op.bias, op.m, op.temperature * 1.0001)
    changed_map = op.weight.copy()
    changed_map[0, 0, 0] += 1e-3
    prints = {operator_fingerprint(o) for o in (
        op, other, reg.operator(3, 0, normalize=True),
        RoutedTransform(op.score_weight, op.score_bias, changed_map, op.bias, op.m, op.temperature))}
    assert len(prints) == 4


def test_near_ties_in_the_routing_are_judged_against_both_choices(tmp_path):
    """Rows on the boundary between two clusters: float32 and float64 may pick different clusters (m=1)."""
    rng = np.random.default_rng(2)
    c = (rng.standard_normal((3, D)) * 3).astype(np.float32)
    a = (rng.standard_normal((3, D, D)) / 4).astype(np.float32)
    p = RoutedParams(c, a, rng.standard_normal((3, D)), 1, 1.0)
    x = ((c[0] + c[1]) / 2 + 1e-6 * rng.standard_normal((400, D))).astype(np.float32)
    np.save(tmp_path / "in.npy", x)
    op = RoutedTransform.from_params(p)
    y = op.apply(x)
    plain = _single_step_reference(p)
    flipped = _rel_err(y, plain(x)) > 1e-3
    assert flipped.any()  # float32 chose the other cluster for some rows: both answers are right
    res = apply_to_table(op, tmp_path / "in.npy", tmp_path / "out.npy", verify=400, progress=False, threads=THREADS)
    assert res.verified_rows == 400 and np.array_equal(np.load(tmp_path / "out.npy"), y)
    # a wrong operator (another cluster's bias) still fails, with nothing written
    wrong = RoutedTransform.from_centroids(c, a, p.bias + 0.5, 1, 1.0)
    with pytest.raises(VerificationError, match=r"400 of 400 random rows differ .* plus the routed step's per-row"):
        apply_to_table(wrong, tmp_path / "in.npy", tmp_path / "bad.npy", verify=400, progress=False,
                       reference=plain)
    assert not (tmp_path / "bad.npy").exists()


def _single_step_reference(p: RoutedParams):
    """The reference a registry conversion through the single routed step ``p`` uses."""
    from bc_fast.convert.routed_check import RoutedChainReference
    from bc_fast.store.routed_format import make_step

    step = make_step(p.centroids, p.weights, p.bias, p.m, p.temperature, where="test")
    return RoutedChainReference.from_steps([step], normalize=False)


def test_registry_job_reference_is_the_step_by_step_chain(chain):
    reg, params = chain
    op, prov, reference = registry_job(reg, 3, 0, normalize=True)
    assert isinstance(op, RoutedTransform) and op.normalize and prov["normalize"] is True
    x = np.random.default_rng(4).standard_normal((300, 20))
    np.testing.assert_allclose(reference(x), _step_by_step(reg, params, x, normalize=True), rtol=1e-12, atol=1e-12)
    ref, slack = reference.judge(x, op.apply(x.astype(np.float32)))
    assert ref.shape == (300, 24) and slack.shape == (300,) and np.all(slack >= 0)


def test_cli_convert_through_a_routed_registry(tmp_path, adapter):
    reg = Registry.create(tmp_path / "reg")
    reg.add_version(dim=D)
    reg.add_version(dim=D, backward=adapter)
    x, _ = _piecewise(700, seed=3)
    np.save(tmp_path / "in.npy", x)
    cmd = [sys.executable, "-m", "bc_fast.cli", "convert", "in.npy", "out.npy", "-r", "reg", "--to", "0",
           "--threads", "1", "--quiet"]
    r = subprocess.run(cmd, check=False, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert np.array_equal(np.load(tmp_path / "out.npy"), adapter.transform(x))
    assert read_sidecar(tmp_path / "out.npy")["operator"]["routed"]["k"] == 4
    r = subprocess.run([sys.executable, "-m", "bc_fast.cli", "registry", "show", "reg"], check=False, cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "backward routed 16 -> 16 (k=4, m=2" in r.stdout
    r = subprocess.run(cmd[:5] + ["out2.npy"] + cmd[6:] + ["--device", "cuda"], check=False, cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "runs on the CPU only" in r.stderr


# ----------------------------------------------------------------------------- legacy indexes


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_legacy_index_search_through_a_routed_chain(tmp_path, chain, faiss_one_thread, metric):
    from bc_fast.index.legacy import LegacyIndex, build_legacy_index, export_faiss_pretransform

    reg, _ = chain
    rng = np.random.default_rng(8)
    table = (rng.standard_normal((600, 20)) * 2).astype(np.float32)
    queries = (rng.standard_normal((25, 20)) * 2).astype(np.float32)
    legacy = build_legacy_index(reg, table, version=0, metric=metric, chunk_rows=128, threads=THREADS,
                                progress=False)
    op = reg.operator(3, 0)
    base, q = op.apply(table).astype(np.float64), op.apply(queries).astype(np.float64)
    if metric == "l2":
        dist = ((q[:, None, :] - base[None, :, :]) ** 2).sum(-1)
        want = np.argsort(dist, axis=1, kind="stable")[:, :10]
    else:
        want = np.argsort(-(q @ base.T), axis=1, kind="stable")[:, :10]
    _, got = legacy.search(queries, 10, query_version=3)
    assert np.array_equal(got, want)
    _, got1 = legacy.search(queries[0], 10, query_version=3)
    assert np.array_equal(got1, want[0])
    legacy.save(tmp_path / "idx.faiss")
    loaded = LegacyIndex.load(tmp_path / "idx.faiss", registry=reg)
    assert np.array_equal(loaded.search(queries, 10, query_version=3)[1], want)
    assert isinstance(loaded.query_operator(3), RoutedTransform)
    with pytest.raises(ValueError, match="routed \\(local\\) transform, which runs on the CPU only"):
        loaded.search(queries, 10, query_version=3, device="cuda")
    with pytest.raises(ValueError, match="routed \\(local\\) transform, which runs on the CPU only"):
        build_legacy_index(reg, table, version=0, device="cuda", progress=False)
    with pytest.raises(ValueError, match="has a routed \\(local\\) step; faiss has no routed transform"):
        export_faiss_pretransform(loaded)


def test_fit_to_registry_kind_local_writes_a_routed_transform(tmp_path):
    """`bc-fast fit --kind local` (fit_to_registry): a routed transform the registry serves bit for bit."""
    from bc_fast.fit import fit_to_registry
    from bc_fast.store import Registry

    rng = np.random.default_rng(11)
    side = rng.integers(0, 2, 2000)[:, None]  # two well separated blobs, each with its own drift
    x = (rng.standard_normal((2000, 12)) + np.where(side, 6.0, -6.0) * np.eye(12)[0]).astype(np.float32)
    q1, q2 = (np.linalg.qr(rng.standard_normal((12, 12)))[0][:, :8] for _ in range(2))  # a rotation per blob
    y = np.where(side, x @ q1, x @ q2).astype(np.float32)
    np.save(tmp_path / "new.npy", x)
    np.save(tmp_path / "old.npy", y)
    reg = Registry.create(tmp_path / "reg")
    reg.add_version(dim=8)
    reg.add_version(dim=12)
    est, metrics = fit_to_registry(tmp_path / "reg", 1, 0, tmp_path / "new.npy", tmp_path / "old.npy", kind="local")
    assert metrics["adapter"] == "local" and metrics["val_r2"] > 0.9
    op = Registry.open(tmp_path / "reg").operator(1, 0)
    assert np.array_equal(op.apply(x[:300]), est.transform(x[:300]))
