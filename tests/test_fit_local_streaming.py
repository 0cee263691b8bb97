"""The two-pass streaming fit of the local (routed) adapter, against the in-memory fit and numpy references."""

from __future__ import annotations

import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
from local_closed_form import assert_cluster_maps_are_closed_form

from bc_fast.fit import LocalAdapter, fit_streaming, fit_streaming_npy, val_mask
from bc_fast.fit._local_stream import BottomKSample, _row_keys
from bc_fast.store.registry import Registry


def _blobs(n: int, d: int = 8, d_out: int = 6, k: int = 4, noise: float = 0.05, seed: int = 0):
    """Source rows in k separated Gaussian blobs, each with its own affine map plus noise."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d)) * 6
    maps = rng.standard_normal((k, d_out, d)) / np.sqrt(d)
    bias = rng.standard_normal((k, d_out)) * 2
    lab = rng.integers(0, k, n)
    x = centres[lab] + rng.standard_normal((n, d))
    y = np.einsum("nij,nj->ni", maps[lab], x) + bias[lab] + noise * rng.standard_normal((n, d_out))
    return x, y


class Chunks:
    """A re-iterable chunk source: counts rows per pass and checks that no earlier chunk is kept alive."""

    def __init__(self, x: np.ndarray, y: np.ndarray, rows: int) -> None:
        self.x, self.y, self.rows = x, y, rows
        self.passes: list[int] = []
        self.max_alive = 0

    def __call__(self):
        self.passes.append(0)
        refs: list[weakref.ref] = []
        for s in range(0, self.x.shape[0], self.rows):
            xc, yc = self.x[s:s + self.rows].copy(), self.y[s:s + self.rows].copy()  # fresh arrays, as from disk
            refs += [weakref.ref(xc), weakref.ref(yc)]
            self.passes[-1] += xc.shape[0]
            # the consumer may still hold the previous chunk (its loop variables), never older ones
            self.max_alive = max(self.max_alive, sum(r() is not None for r in refs[:-4]))
            yield xc, yc
            del xc, yc


@pytest.mark.parametrize("base", ["ridge", "procrustes", "lowrank"])
@pytest.mark.parametrize("refit", [True, False])
def test_streaming_equals_in_memory_when_the_sample_is_everything(base, refit):
    x, y = _blobs(3000)
    params = {"base": base, "k": 4, "m": 2, "refit": refit, "rank": 4 if base == "lowrank" else None}
    mem = LocalAdapter(**params).fit(x, y)
    src = Chunks(x, y, 256)
    st = LocalAdapter(**params).fit_chunks(src, sample_rows=10**6, val_rows=10**6)
    assert src.passes == [3000, 3000]  # two passes, every row once each
    np.testing.assert_array_equal(st.centroids_, mem.centroids_)  # same sample rows, same k-means
    assert (st.base_, st.k_, st.m_, st.prior_rows_) == (mem.base_, mem.k_, mem.m_, mem.prior_rows_)
    assert st.temperature_ == pytest.approx(mem.temperature_, rel=1e-12)
    scale = np.abs(mem.coef_).max()
    np.testing.assert_allclose(st.coef_, mem.coef_, rtol=1e-8, atol=1e-10 * scale)
    np.testing.assert_allclose(st.intercept_, mem.intercept_, rtol=1e-8, atol=1e-10 * np.abs(mem.intercept_).max())
    np.testing.assert_array_equal(st.fallback_, mem.fallback_)
    np.testing.assert_array_equal(st.cluster_rows_, mem.cluster_rows_)
    assert (st.n_train_, st.n_val_) == (mem.n_train_, mem.n_val_) and st.n_sample_ == mem.n_train_
    assert len(st.candidates_) == len(mem.candidates_)
    for a, b in zip(st.candidates_, mem.candidates_):
        assert a["val_mse"] == pytest.approx(b["val_mse"], rel=1e-8) and a["val_overlap"] == b["val_overlap"]
    assert st.val_metrics_["mse"] == pytest.approx(mem.val_metrics_["mse"], rel=1e-8)
    assert st.val_metrics_["r2"] == pytest.approx(mem.val_metrics_["r2"], rel=1e-8)
    np.testing.assert_allclose(st.transform(x[:50]), mem.transform(x[:50]), rtol=1e-7, atol=1e-7)


def test_pass_two_sums_every_training_row_of_each_cluster():
    """A small sample picks the centroids; each cluster's map is the least-squares fit of ALL its training rows."""
    x, y = _blobs(6000, d=5, d_out=4)
    est = LocalAdapter(base="ridge", k=4, m=1, temperature=1.0, prior_rows=0.0, alpha=0.0, refit=False,
                       min_cluster_rows=2).fit_chunks(Chunks(x, y, 500), sample_rows=300)
    assert est.n_sample_ == 300 and est.n_train_ == int((~val_mask(0, 6000, 0.1, 0)).sum())
    assign = assert_cluster_maps_are_closed_form(est, x, y, ~val_mask(0, x.shape[0], 0.1, 0), atol=1e-8)
    np.testing.assert_array_equal(est.cluster_rows_, np.bincount(assign, minlength=4))
    assert est.cluster_rows_.sum() == est.n_train_


def test_small_sample_beats_the_global_ridge_on_held_out_pairs():
    x, y = _blobs(42_000, d=16, d_out=12, seed=3)
    xs, ys, xh, yh = x[:40_000], y[:40_000], x[40_000:], y[40_000:]
    src = Chunks(xs, ys, 4096)
    loc = fit_streaming(src, kind="local", base="auto", sample_rows=2000, val_rows=500)
    assert src.passes == [40_000, 40_000] and src.max_alive == 0
    assert loc.n_sample_ == 2000 and loc.n_val_sample_ == 500 and loc.n_train_ + loc.n_val_ == 40_000
    ridge = fit_streaming(Chunks(xs, ys, 4096)(), kind="ridge")
    mse_loc = float(((loc.transform(xh) - yh) ** 2).mean())
    mse_ridge = float(((ridge.transform(xh) - yh) ** 2).mean())
    assert loc.base_ == "ridge" and mse_loc < 0.02 * mse_ridge
    assert {"base", "k", "m", "prior_rows", "temperature", "val_overlap"} <= set(loc.candidates_[0])


def test_chunks_are_consumed_lazily_and_not_kept():
    x, y = _blobs(5000)
    src = Chunks(x, y, 100)
    LocalAdapter(base="ridge", k=4, m=1).fit_chunks(src, sample_rows=400, val_rows=100)
    assert src.passes == [5000, 5000] and src.max_alive == 0


def test_bottom_k_sample_is_bounded_and_independent_of_chunking():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((10_000, 3)), rng.standard_normal((10_000, 2))
    want = np.sort(np.argsort(_row_keys(np.arange(10_000), 7))[:50])  # the 50 smallest keys, in row order
    for rows in (1, 97, 10_000):
        s = BottomKSample(50, 7)
        for start in range(0, 10_000, rows):
            s.add(start, x[start:start + rows], y[start:start + rows], np.ones(min(rows, 10_000 - start), bool))
            assert s._held <= 2 * 50 + rows
        xs, ys = s.arrays(3, 2)
        np.testing.assert_array_equal(xs, x[want])
        np.testing.assert_array_equal(ys, y[want])


def test_streaming_bad_input():
    x, y = _blobs(200, d=4, d_out=3)
    chunks = [(x[s:s + 50], y[s:s + 50]) for s in range(0, 200, 50)]  # a list is re-iterable
    with pytest.raises(ValueError, match=r"k=300 clusters but only \d+ training pairs"):
        LocalAdapter(k=300).fit_chunks(chunks)
    with pytest.raises(ValueError, match=r"k=50 clusters but sample_rows=40"):
        LocalAdapter(k=50).fit_chunks(chunks, sample_rows=40)
    with pytest.raises(ValueError, match=r"k=None tries k in .* sampled training pairs \(sample_rows=20 of"):
        LocalAdapter().fit_chunks(chunks, sample_rows=20)
    bad = x.copy()
    bad[117] = np.nan
    with pytest.raises(ValueError, match=r"X_src has 1 row\(s\) with NaN or Inf \(first: row 117\)"):
        LocalAdapter(k=4).fit_chunks([(bad[s:s + 50], y[s:s + 50]) for s in range(0, 200, 50)])
    with pytest.raises(ValueError, match="X_src has 50 rows but X_dst has 49 in the chunk starting at row 50"):
        LocalAdapter(k=4).fit_chunks([(x[:50], y[:50]), (x[50:100], y[50:99])])
    with pytest.raises(TypeError, match="reads the pairs twice"):
        LocalAdapter(k=4).fit_chunks(iter(chunks))
    with pytest.raises(TypeError, match="reads the pairs twice"):
        fit_streaming((c for c in chunks), kind="local", k=4)
    calls = []

    def shrinking():
        calls.append(1)
        return chunks if len(calls) == 1 else chunks[:2]

    with pytest.raises(ValueError, match="second pass over the chunks read 100 pairs but the first read 200"):
        LocalAdapter(k=4, m=1).fit_chunks(shrinking)
    with pytest.raises(ValueError, match="select_by='labels' needs one label per pair"):
        LocalAdapter(k=4, select_by="labels").fit_chunks(chunks)
    with pytest.raises(ValueError, match="base must be one of"):
        LocalAdapter(base="mlp").fit_chunks(lambda: pytest.fail("read before the settings were checked"))
    with pytest.raises(ValueError, match="m=5 exceeds k=4"):
        LocalAdapter(k=4, m=5).fit_chunks(lambda: pytest.fail("read before the settings were checked"))
    with pytest.raises(ValueError, match=r"only 0 of the \d+ pairs is one \(val_fraction=0.1, val_rows=0 kept"):
        LocalAdapter(k=4).fit_chunks(chunks, val_rows=0)
    with pytest.raises(ValueError, match="no pairs"):
        LocalAdapter(k=4).fit_chunks(list)
    with pytest.raises(ValueError, match=r"\['sample_rows'\] apply to kind='local' only"):
        fit_streaming(chunks, kind="ridge", sample_rows=10)


def test_fit_streaming_npy_local_and_its_refusals(tmp_path):
    x, y = _blobs(1500, d=6, d_out=5)
    np.save(tmp_path / "src.npy", x.astype(np.float32))
    np.save(tmp_path / "dst.npy", y.astype(np.float32))
    est = fit_streaming_npy(tmp_path / "src.npy", tmp_path / "dst.npy", kind="local", chunk_rows=128, k=4, m=2,
                            base="ridge")
    ref = LocalAdapter(base="ridge", k=4, m=2).fit(x.astype(np.float32), y.astype(np.float32))
    np.testing.assert_array_equal(est.centroids_, ref.centroids_)
    np.testing.assert_allclose(est.coef_, ref.coef_, rtol=1e-8, atol=1e-10 * np.abs(ref.coef_).max())
    assert est.kind == "routed" and est.n_train_ + est.n_val_ == 1500
    np.save(tmp_path / "short.npy", np.zeros((10, 5), np.float32))
    with pytest.raises(ValueError, match=r"src.npy has 1500 rows but .*short.npy has 10"):
        fit_streaming_npy(tmp_path / "src.npy", tmp_path / "short.npy", kind="local")
    with pytest.raises(ValueError, match="kind='mlp' cannot be fitted by streaming"):
        fit_streaming_npy(tmp_path / "src.npy", tmp_path / "dst.npy", kind="mlp")
    with pytest.raises(TypeError, match="LocalAdapter .* takes no parameter"):
        fit_streaming_npy(tmp_path / "src.npy", tmp_path / "dst.npy", kind="local", clusters=3)
    with pytest.raises(FileNotFoundError, match="no such file"):
        fit_streaming_npy(tmp_path / "src.npy", tmp_path / "missing.npy", kind="local")


def _bc_fast(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bc_fast.cli", *args], cwd=cwd, capture_output=True, text=True, check=False,
                          timeout=300)


def test_fit_cli_local_streams_into_the_registry(tmp_path):
    x, y = _blobs(2000, d=10, d_out=8, seed=5)
    np.save(tmp_path / "v1.npy", x.astype(np.float32))
    np.save(tmp_path / "v0.npy", y.astype(np.float32))
    reg = Registry.create(tmp_path / "reg")
    reg.add_version(dim=8)
    reg.add_version(dim=10)
    res = _bc_fast("fit", "-r", "reg", "--from", "1", "--to", "0", "v1.npy", "v0.npy", "--kind", "local",
                   "--chunk-rows", "128", "--sample-rows", "800", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "wrote transform 1 -> 0 (local)" in res.stderr and "neighbour overlap@10" in res.stdout
    info = Registry.open(tmp_path / "reg").transform_info(1, 0)
    fm = info.fit_metrics
    assert info.kind == "routed" and fm["adapter"] == "local" and fm["n_pairs"] == 2000
    assert fm["local"]["n_sample"] == 800 and fm["local"]["k"] in (4, 8, 16) and fm["val_r2"] > 0.95
    # the stored transform is the streaming fit of the same files with the same settings
    est = fit_streaming_npy(tmp_path / "v1.npy", tmp_path / "v0.npy", kind="local", chunk_rows=128,
                            sample_rows=800)
    z1 = x[:300].astype(np.float32)
    np.testing.assert_allclose(Registry.open(tmp_path / "reg").operator(1, 0).apply(z1), est.transform(z1),
                               rtol=1e-5, atol=1e-5)
    res = _bc_fast("fit", "-r", "reg", "--from", "1", "--to", "0", "v1.npy", "v0.npy", "--kind", "ridge",
                   "--sample-rows", "800", "--replace", cwd=tmp_path)
    assert res.returncode == 1 and "--sample-rows applies to --kind local" in res.stderr
