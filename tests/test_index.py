"""Legacy-version faiss indexes built from the latest table through the fused core."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from bc_fast import Layer  # noqa: E402
from bc_fast.eval.retrieval import (  # noqa: E402
    format_retrieval_report, legacy_retrieval_report, overlap_at_k, recall_from_embeddings)
from bc_fast.index import (  # noqa: E402
    DEFAULT_BLAS_MIN_QUERIES, LegacyIndex, blas_threshold, blas_threshold_for, build_legacy_index, export_faiss_pretransform)
from bc_fast._util.progress import Progress  # noqa: E402
from bc_fast.store.registry import Registry, RegistryError  # noqa: E402

N = 3000


pytestmark = pytest.mark.usefixtures("faiss_one_thread")


def _affine(rng, d_in, d_out):
    return ((rng.standard_normal((d_out, d_in)) / math.sqrt(d_in)).astype(np.float32),
            (rng.standard_normal(d_out) * 0.1).astype(np.float32))


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    """Affine chain 2 -> 1 -> 0 (dims 24 -> 32 -> 16)."""
    rng = np.random.default_rng(0)
    r = Registry.create(tmp_path / "reg")
    r.add_version(dim=16)
    r.add_version(dim=32, backward=_affine(rng, 32, 16))
    r.add_version(dim=24, backward=_affine(rng, 24, 32))
    return r


@pytest.fixture
def table() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((N, 24)).astype(np.float32)


def _numpy_v0(reg: Registry, x: np.ndarray) -> np.ndarray:
    y = x.astype(np.float64)
    for step in reg.chain_layers(reg.latest, 0):
        for l in step:
            y = y @ l.weight.astype(np.float64).T + (0 if l.bias is None else l.bias)
    return y.astype(np.float32)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_build_and_search_transformed_equals_precomputed(reg: Registry, table: np.ndarray, metric: str) -> None:
    legacy = build_legacy_index(reg, table, 0, metric=metric, chunk_rows=700)
    assert legacy.ntotal == N and legacy.d == 16 and legacy.version == 0 and legacy.source_version == 2
    reference = faiss.IndexFlatIP(16) if metric == "ip" else faiss.IndexFlatL2(16)
    reference.add(_numpy_v0(reg, table))
    q_latest = np.random.default_rng(2).standard_normal((37, 24)).astype(np.float32)
    q_v0 = reg.operator(2, 0).apply(q_latest)
    D1, I1 = legacy.search(q_latest, 10, query_version=2)  # transformed on the fly
    D0, I0 = legacy.search(q_v0, 10, query_version=0)  # precomputed version-0 queries
    np.testing.assert_array_equal(I1, I0)
    np.testing.assert_allclose(D1, D0, rtol=1e-5, atol=1e-5)
    Dr, Ir = reference.search(q_v0, 10)
    keep, want = _tie_free_queries(_numpy_v0(reg, table), q_v0, 10, metric)
    assert keep.sum() >= 30
    np.testing.assert_array_equal(I0[keep], want)  # same ids as float64 brute force where no near-ties
    np.testing.assert_array_equal(Ir[keep], want)
    np.testing.assert_allclose(D0, Dr, rtol=1e-4, atol=1e-4)
    # queries of the middle version go through the 1 -> 0 chain
    D_mid, I_mid = legacy.search(reg.operator(2, 1).apply(q_latest), 10, query_version=1)
    np.testing.assert_array_equal(I_mid, I0)


def test_single_query_float16_and_memmap_table(reg: Registry, table: np.ndarray, tmp_path: Path) -> None:
    mm = np.lib.format.open_memmap(tmp_path / "t.npy", mode="w+", dtype=np.float16, shape=table.shape)
    mm[:] = table
    mm.flush()
    legacy = build_legacy_index(reg, np.load(tmp_path / "t.npy", mmap_mode="r"), 0, chunk_rows=1024)
    q = table[5]
    D, I = legacy.search(q, 4, query_version=2)
    assert D.shape == (4,) and I.shape == (4,)
    Db, Ib = legacy.search(q[None].astype(np.float16), 4, query_version=2)
    np.testing.assert_array_equal(Ib[0], I)
    assert legacy.search(q.astype(np.float64), 4, query_version=2)[1].tolist() == I.tolist()


def _tie_free_queries(base: np.ndarray, queries: np.ndarray, k: int, metric: str, *, normalize: bool = False,
                      margin: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``queries`` whose float64 top-(k+1) scores against ``base`` are >= ``margin`` apart,
    and their exact float64 top-k ids: on such rows any correct exhaustive search returns these ids."""
    x, q = base.astype(np.float64), queries.astype(np.float64)
    if normalize:
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
    s = q @ x.T if metric == "ip" else -((q[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k + 1]
    top = np.take_along_axis(s, order, axis=1)
    keep = (top[:, :-1] - top[:, 1:]).min(axis=1) >= margin
    return keep, order[keep, :k]


@pytest.mark.parametrize("metric, normalize", [("ip", False), ("l2", False), ("ip", True)])
def test_exhaustive_ivf_equals_flat_exactly(reg: Registry, table: np.ndarray, metric: str, normalize: bool) -> None:
    """nprobe = nlist visits every list: same ids as a flat index and as float64 brute force, same distances."""
    ivf = build_legacy_index(reg, table, 1, factory="IVF8,Flat", metric=metric, normalize=normalize, train_rows=1000)
    flat = build_legacy_index(reg, table, 1, factory="Flat", metric=metric, normalize=normalize)
    faiss.extract_index_ivf(ivf.index).nprobe = faiss.extract_index_ivf(ivf.index).nlist
    candidates = np.random.default_rng(3).standard_normal((200, 24)).astype(np.float32)
    v1 = reg.operator(2, 1)
    keep, want = _tie_free_queries(v1.apply(table), v1.apply(candidates), 10, metric, normalize=normalize)
    assert keep.sum() >= 50  # enough tie-free queries for the test to mean something
    q = candidates[keep]
    D_ivf, I_ivf = ivf.search(q, 10, query_version=2)
    D_flat, I_flat = flat.search(q, 10, query_version=2)
    np.testing.assert_array_equal(I_ivf, I_flat)
    np.testing.assert_array_equal(I_ivf, want)
    np.testing.assert_allclose(D_ivf, D_flat, rtol=1e-5, atol=1e-4)


def test_trained_factory_normalizes_queries(reg: Registry, table: np.ndarray) -> None:
    legacy = build_legacy_index(reg, table, 1, factory="IVF8,Flat", train_rows=1000, normalize=True)
    q = table[:20]
    # version-1 queries are normalised like the indexed rows
    D1, _ = legacy.search(reg.operator(2, 1).apply(q) * 7.0, 5, query_version=1)
    assert np.all(D1 <= 1.0 + 1e-4)


def test_search_errors(reg: Registry, table: np.ndarray) -> None:
    legacy = build_legacy_index(reg, table, 1)
    with pytest.raises(ValueError, match="queries have 16 features but version 2 has dim 24"):
        legacy.search(np.zeros((2, 16), np.float32), 3, query_version=2)
    with pytest.raises(RegistryError, match="older than the index's version 1"):
        legacy.search(np.zeros((2, 16), np.float32), 3, query_version=0)
    with pytest.raises(TypeError, match="query_version"):
        legacy.search(np.zeros((2, 24), np.float32), 3)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="k must be a positive integer"):
        legacy.search(np.zeros((2, 24), np.float32), 0, query_version=2)
    with pytest.raises(ValueError, match="table has 16 features per row but version 2 has dim 24"):
        build_legacy_index(reg, table[:, :16], 0)
    with pytest.raises(ValueError, match="metric must be"):
        build_legacy_index(reg, table, 0, metric="cos")
    with pytest.raises(ValueError, match="faiss cannot build index_factory"):
        build_legacy_index(reg, table, 0, factory="NoSuchIndex")
    with pytest.raises(RegistryError, match="no forward transforms unless fitted"):
        build_legacy_index(reg, table[:, :16].copy(), 2, table_version=0)


def test_save_load_roundtrip_and_stamps(reg: Registry, table: np.ndarray, tmp_path: Path) -> None:
    legacy = build_legacy_index(reg, table, 0)
    path = legacy.save(tmp_path / "v0.faiss")
    side = json.loads((tmp_path / "v0.faiss.json").read_text())
    assert side["version"] == 0 and side["source_version"] == 2 and side["registry_checksum"] == reg.checksum
    q = table[:8]
    want = legacy.search(q, 5, query_version=2)
    loaded = LegacyIndex.load(path, registry=reg.path)
    got = loaded.search(q, 5, query_version=2)
    np.testing.assert_array_equal(got[1], want[1])
    # without a registry only version-0 queries work
    bare = LegacyIndex.load(path)
    with pytest.raises(ValueError, match="need the registry"):
        bare.search(q, 5, query_version=2)
    np.testing.assert_array_equal(bare.search(reg.operator(2, 0).apply(q), 5, query_version=0)[1], want[1])
    # a registry that grew keeps serving the index (chain 2 -> 0 unchanged)
    reg.add_version(dim=24, backward=np.eye(24, dtype=np.float32))
    assert LegacyIndex.load(path, registry=reg).search(q, 5, query_version=3)[1].tolist() == want[1].tolist()


def test_load_refuses_mismatches(reg: Registry, table: np.ndarray, tmp_path: Path) -> None:
    path = build_legacy_index(reg, table, 0).save(tmp_path / "v0.faiss")
    other = Registry.create(tmp_path / "other")
    rng = np.random.default_rng(9)
    other.add_version(dim=16)
    other.add_version(dim=32, backward=_affine(rng, 32, 16))
    other.add_version(dim=24, backward=_affine(rng, 24, 32))
    with pytest.raises(RegistryError, match="chain checksum mismatch"):
        LegacyIndex.load(path, registry=other)
    small = Registry.create(tmp_path / "small")
    small.add_version(dim=16)
    with pytest.raises(RegistryError, match="built from version 2, but registry"):
        LegacyIndex.load(path, registry=small)
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch with v0.faiss.json"):
        LegacyIndex.load(path)
    (tmp_path / "v0.faiss.json").write_text("{\"format\": ")
    with pytest.raises(ValueError, match="not valid JSON"):
        LegacyIndex.load(path)


def test_export_pretransform_read_index_roundtrip(reg: Registry, table: np.ndarray, tmp_path: Path) -> None:
    legacy = build_legacy_index(reg, table, 0)
    pre = export_faiss_pretransform(legacy)
    faiss.write_index(pre, str(tmp_path / "plain.faiss"))
    plain = faiss.read_index(str(tmp_path / "plain.faiss"))  # what a plain faiss user does
    assert plain.d == 24 and plain.ntotal == N
    q = table[100:130]
    _, I_plain = plain.search(q, 10)
    _, I_legacy = legacy.search(q, 10, query_version=2)
    keep, want = _tie_free_queries(_numpy_v0(reg, table), _numpy_v0(reg, q), 10, "ip")
    assert keep.sum() >= 20
    np.testing.assert_array_equal(I_plain[keep], want)  # faiss's LinearTransform vs the core: same ids
    np.testing.assert_array_equal(I_legacy[keep], want)
    # with an explicit registry + index, and the normalised variant
    pre1 = export_faiss_pretransform(reg, faiss.IndexFlatL2(32), src=2, dst=1)
    assert pre1.d == 24 and pre1.chain.size() == 1
    legacy_n = build_legacy_index(reg, table, 0, normalize=True)
    pre_n = export_faiss_pretransform(legacy_n)
    D, I = pre_n.search(q, 5)
    np.testing.assert_array_equal(I, legacy_n.search(q, 5, query_version=2)[1])


def test_export_refuses_mlp_chain(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    r = Registry.create(tmp_path / "mlp")
    r.add_version(dim=8)
    r.add_version(dim=8, backward=[Layer(rng.standard_normal((8, 8)).astype(np.float32), None, "relu"),
                                   Layer(rng.standard_normal((8, 8)).astype(np.float32))])
    legacy = build_legacy_index(r, rng.standard_normal((50, 8)).astype(np.float32), 0)
    with pytest.raises(ValueError, match="not affine .*relu.*faiss has no MLP transform"):
        export_faiss_pretransform(legacy)
    D, I = legacy.search(rng.standard_normal((3, 8)).astype(np.float32), 4, query_version=1)
    assert I.shape == (3, 4)


def test_blas_threshold_context() -> None:
    before = faiss.cvar.distance_compute_blas_threshold
    assert blas_threshold_for(128) == DEFAULT_BLAS_MIN_QUERIES * 128  # faiss 1.15 compares n_queries * d
    with blas_threshold(blas_threshold_for(64, 5)):
        assert faiss.cvar.distance_compute_blas_threshold == 320
    assert faiss.cvar.distance_compute_blas_threshold == before
    with pytest.raises(ValueError, match=">= 0"):
        with blas_threshold(-1):
            pass
    with pytest.raises(ValueError, match="min_queries >= 0"):
        blas_threshold_for(0)


def test_search_restores_global_threshold(reg: Registry, table: np.ndarray) -> None:
    legacy = build_legacy_index(reg, table, 0)
    before = faiss.cvar.distance_compute_blas_threshold
    a = legacy.search(table[:5], 3, query_version=2, blas_min_queries=1)  # BLAS path
    b = legacy.search(table[:5], 3, query_version=2, blas_min_queries=10**6)  # SIMD loop
    np.testing.assert_array_equal(a[1], b[1])
    assert faiss.cvar.distance_compute_blas_threshold == before


def test_overlap_and_recall_by_hand() -> None:
    a = np.array([[1, 2, 3], [4, 5, -1]])
    b = np.array([[3, 2, 9], [-1, 6, 7]])
    assert overlap_at_k(a, b) == pytest.approx((2 / 3 + 0) / 2)
    assert overlap_at_k(a, b, k=1) == 0.0
    with pytest.raises(ValueError, match="same number of rows"):
        overlap_at_k(a, b[:1])
    users = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    items = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]], np.float32)
    train = np.array([[0, 0], [1, 2]])
    test = np.array([[0, 1], [0, 3], [1, 3]])
    # user 0: item 0 excluded, top-1 = item 1 -> 1/2; user 1: item 2 excluded, top-1 = item 3 -> 1
    assert recall_from_embeddings(users, items, train, test, k=1) == pytest.approx(0.75)
    assert recall_from_embeddings(users, items, train, test, k=1, metric="l2") == pytest.approx(0.75)
    with pytest.raises(ValueError, match="outside"):
        recall_from_embeddings(users, items, train, np.array([[0, 9]]), k=1)
    # scored one user at a time, duplicate test pairs count once: the same answer
    assert recall_from_embeddings(users, items, train, np.vstack([test, test]), k=1, chunk=1) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="chunk must be a positive integer"):
        recall_from_embeddings(users, items, train, test, k=1, chunk=0)
    with pytest.raises(ValueError, match="metric must be"):
        recall_from_embeddings(users, items, train, test, k=1, metric="cos")


def test_legacy_retrieval_report() -> None:
    rng = np.random.default_rng(0)
    n_users, n_items, d = 60, 400, 16
    items0 = rng.standard_normal((n_items, d)).astype(np.float32)
    users0 = rng.standard_normal((n_users, d)).astype(np.float32)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    q = q.astype(np.float32)
    items1, users1 = items0 @ q.T, users0 @ q.T  # version 1 is a rotation of version 0
    pairs = np.stack([rng.integers(0, n_users, 800), rng.integers(0, n_items, 800)], 1)
    strategies = {
        "bc-aligner": {"items": [items0, items1], "users": [users0, users1], "backward": [[Layer(q.T.copy())]]},
        "nobc": {"items": [items0, items1], "users": [users0, users1], "backward": None},
    }
    rep = legacy_retrieval_report(strategies, k=10, train_pairs=pairs[:600], test_pairs=pairs[600:])
    assert rep["bc-aligner"]["overlap@10"] > 0.99 and rep["nobc"]["overlap@10"] < 0.5
    assert rep["bc-aligner"]["recall_retention"] == pytest.approx(1.0, abs=0.02)
    assert rep["nobc"]["notes"] == "B_1=identity"
    text = format_retrieval_report(rep)
    assert "bc-aligner" in text and "nobc" in text and "retention" in text
    with pytest.raises(ValueError, match="must list B_1..B_1"):
        legacy_retrieval_report({"x": {"items": [items0, items1], "backward": [None, None, None]}})


def test_demo_pipeline_on_synthetic_data(tmp_path: Path) -> None:
    """The `bc-fast demo` code path (train, registry, convert, legacy index, retrieval report), made small."""
    pytest.importorskip("torch", reason="the demo trains its models with PyTorch")
    pytest.importorskip("matplotlib", reason="the demo draws its figures with matplotlib")
    from bc_fast.data import synthetic_interactions
    from bc_fast.experiments.demo import run_demo_pipeline

    lines: list[str] = []
    data = synthetic_interactions(num_users=80, num_items=40, num_edges=2500, seed=2)
    res = run_demo_pipeline(tmp_path, seed=0, log=lines.append, data=data, dims=(8, 10, 12), epochs=2,
                            batch_size=512, consumer_epochs=2, consumer_seeds=(0,), posthoc_steps=20, degree_bins=4)
    retrieval = res["pipeline"]["retrieval"]
    assert set(retrieval) == {"joint-mloss", "nobc"}
    for row in retrieval.values():
        assert 0.0 <= row["overlap@50"] <= 1.0 and 0.0 <= row["recall_true"] <= 1.0
    saved = json.loads((tmp_path / "pipeline.json").read_text())
    assert saved["retrieval"]["nobc"]["notes"] == "B_1=truncate 10->8, B_2=truncate 12->10"
    assert any("legacy retrieval for version 0" in line for line in lines)
    # rerun with --resume: every seed comes from out/checkpoints, and the registry built from the
    # restored B_k layers serves the same fused operator
    from bc_fast.store.registry import Registry

    x = np.random.default_rng(0).standard_normal((5, 12)).astype(np.float32)
    first = Registry.open(tmp_path / "registry")
    before, meta = first.operator(2, 0).apply(x), [v.metadata for v in first.versions()]
    again = run_demo_pipeline(tmp_path, seed=0, log=None, data=data, dims=(8, 10, 12), epochs=2, resume=True,
                              batch_size=512, consumer_epochs=2, consumer_seeds=(0,), posthoc_steps=20, degree_bins=4)
    assert again["resumed_seeds"] == [0] and again["rows"] == res["rows"]
    reg = Registry.open(tmp_path / "registry")
    np.testing.assert_array_equal(reg.operator(2, 0).apply(x), before)
    assert [v.metadata for v in reg.versions()] == meta and meta[2]["strategy"] == "joint-mloss" and "score" in meta[2]
    assert [t.kind for t in reg.transforms()] == [t.kind for t in first.transforms()] == ["linear", "linear"]
    resaved = json.loads((tmp_path / "pipeline.json").read_text())["retrieval"]
    for name, row in saved["retrieval"].items():  # the same figures, timings aside
        assert {k: v for k, v in resaved[name].items() if not k.endswith("_s")} == \
            {k: v for k, v in row.items() if not k.endswith("_s")}


def test_progress_bar() -> None:
    buf = io.StringIO()
    with Progress(1000, "conv", enabled=True, stream=buf, min_interval=0) as bar:
        bar.update(400)
        bar.update(600)
    out = buf.getvalue()
    assert "conv: 1.0k/1.0k rows (100.0%)" in out and "rows/s" in out and "ETA" in out and out.endswith("\n")
    quiet = io.StringIO()
    with Progress(10, "x", stream=quiet) as bar:  # not a TTY: silent by default
        bar.update(10)
    assert quiet.getvalue() == "" and bar.n == 10
    unknown = io.StringIO()
    with Progress(None, enabled=True, stream=unknown) as bar:
        bar.update(5)
    assert "5 rows" in unknown.getvalue()


@pytest.fixture
def converted_shards(reg: Registry, tmp_path: Path) -> Path:
    """Two .npy shards of version 2 rows (dim 24), converted to version 0 (dim 16)."""
    from bc_fast.convert import convert_table

    rng = np.random.default_rng(2)
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(2):
        np.save(shards / f"p{i}.npy", rng.standard_normal((100, 24)).astype(np.float32))
    convert_table(shards, tmp_path / "v0", registry=reg, dst=0, threads=1, progress=False)
    return tmp_path / "v0"


def _trained(d: int, metric: int) -> object:
    index = faiss.index_factory(d, "IVF4,Flat", metric)
    index.train(np.random.default_rng(3).standard_normal((200, d)).astype(np.float32))
    return index


@pytest.mark.parametrize("d,metric,kw,msg", [
    (16, faiss.METRIC_L2, {}, (r"^metric='ip' but the trained index uses 'l2'.*; "
                               r"pass metric='l2', or train it with metric='ip'$")),
    (16, faiss.METRIC_INNER_PRODUCT, {"metric": "l2"}, r"metric='l2' but the trained index uses 'ip'"),
    (12, faiss.METRIC_INNER_PRODUCT, {}, r"trained is a 12-d index but .*v0 holds 16-d rows"),
])
def test_sharded_trained_index_checked_before_any_shard(reg: Registry, converted_shards: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch, d: int, metric: int,
                                                        kw: dict, msg: str) -> None:
    # the metric was taken from metric= (an L2 index reported "ip"), and a 12-d index raised a bare AssertionError
    from bc_fast.index import sharded

    def no_shard_work(*args: object) -> bytes:
        raise AssertionError("a shard was read before the trained index was checked")

    monkeypatch.setattr(sharded, "_add_shard", no_shard_work)
    with pytest.raises(ValueError, match=msg):
        sharded.build_ivf_index_sharded(converted_shards, tmp_path / "out.faiss", trained=_trained(d, metric),
                                        registry=reg, **kw)
    assert not (tmp_path / "out.faiss").exists()


def test_sharded_trained_l2_index_with_its_metric(reg: Registry, converted_shards: Path) -> None:
    from bc_fast.index.sharded import build_ivf_index_sharded

    trained = _trained(16, faiss.METRIC_L2)
    legacy = build_ivf_index_sharded(converted_shards, trained=trained, metric="l2", registry=reg)
    assert legacy.metric == "l2" and legacy.index.metric_type == faiss.METRIC_L2 and legacy.ntotal == 200
    rows = np.concatenate([np.load(f) for f in sorted(converted_shards.glob("*.npy"))])
    ref = faiss.clone_index(trained)
    ref.add_with_ids(rows, np.arange(len(rows), dtype=np.int64))
    ref.nprobe = legacy.index.nprobe = 4
    np.testing.assert_array_equal(legacy.index.search(rows[:5], 3)[1], ref.search(rows[:5], 3)[1])
