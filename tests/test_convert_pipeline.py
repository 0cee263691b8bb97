"""The conversion pipeline's moving parts: checksums, the sample verified while writing, the Parquet
merge done as the run goes. (Whole conversions are tested in test_convert.py.)"""

from __future__ import annotations

import time
import zlib

import numpy as np
import pytest

from bc_fast._util.checksum import crc32_array
from bc_fast.convert import convert_table
from bc_fast.convert.job import SampleCheck
from bc_fast.engine.fusion import apply_layers_reference, flatten_chain
from bc_fast.store.tables import make_writer, open_table

DIMS = (24, 40, 64)


@pytest.fixture(scope="module")
def registry(tmp_path_factory, make_chain_registry):
    return make_chain_registry(tmp_path_factory.mktemp("reg") / "registry", DIMS, (6, 8))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.uint8])
def test_crc32_is_zlibs_crc32(dtype):
    a = (np.random.default_rng(0).standard_normal((333, 71)) * 50).astype(dtype)
    assert crc32_array(a) == zlib.crc32(a.tobytes())
    assert crc32_array(a[:, 5:40]) == zlib.crc32(np.ascontiguousarray(a[:, 5:40]).tobytes())  # copied first
    assert crc32_array(a[:0]) == 0


def _reference(registry):
    layers = flatten_chain(registry.chain_layers(2, 0))
    return lambda x: apply_layers_reference(layers, x)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_sample_collected_while_writing_is_judged_like_one_read_back(tmp_path, registry, dtype):
    """The rows collected chunk by chunk in the writer thread give the same verdict and worst error as
    reading the whole sample back from the finished table."""
    x = np.random.default_rng(3).standard_normal((2000, DIMS[2])).astype(dtype)
    np.save(tmp_path / "in.npy", x)
    res = convert_table(tmp_path / "in.npy", tmp_path / "out.npy", registry=registry, dst=0, chunk_rows=128,
                        verify=300, seed=5, threads=1, progress=False)
    assert res.verified_rows == 300

    reader, out = open_table(str(tmp_path / "in.npy")), open_table(str(tmp_path / "out.npy"))
    try:
        check = SampleCheck(reader, DIMS[0], out.dtype, 300, 5, _reference(registry), res.verify_tol)
        read_back = type("ReadBack", (), {"read_rows": lambda self, rows: out.read_rows(rows)})()
        n, worst = check.finish(reader, read_back)  # nothing collected: every row read back
    finally:
        reader.close()
        out.close()
    assert n == 300 and worst == pytest.approx(res.verify_max_error, rel=1e-12, abs=1e-15)


def test_sample_check_collects_only_its_rows_per_chunk(tmp_path, registry):
    x = np.random.default_rng(4).standard_normal((1000, DIMS[2])).astype(np.float32)
    np.save(tmp_path / "in.npy", x)
    reader = open_table(str(tmp_path / "in.npy"))
    try:
        check = SampleCheck(reader, DIMS[0], np.dtype(np.float32), 50, 0, _reference(registry), 1e-4)
        chunks = reader.chunks(300)
        seen = np.concatenate([check.rows[check.rows_in(c)] for c in chunks])
        assert np.array_equal(seen, check.rows) and len(set(seen.tolist())) == 50
        for c in chunks:
            assert np.all((check.rows[check.rows_in(c)] >= c.start) & (check.rows[check.rows_in(c)] < c.stop))
    finally:
        reader.close()


def test_parquet_merged_during_the_run_equals_merged_at_the_end(tmp_path, registry, monkeypatch):
    pa = pytest.importorskip("pyarrow", reason="pyarrow (the parquet extra) is not installed")
    pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow (the parquet extra) is not installed")
    from bc_fast.store.parquet import ParquetWriter

    x = np.random.default_rng(6).standard_normal((1500, DIMS[2])).astype(np.float16)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), DIMS[2])
    pq.write_table(pa.table({"id": np.arange(1500) * 3, "name": [f"n{i}" for i in range(1500)], "emb": emb}),
                   tmp_path / "in.parquet", row_group_size=400)
    kw = {"registry": registry, "dst": 0, "chunk_rows": 170, "threads": 1, "progress": False}
    merged_as_we_go = []
    orig = ParquetWriter._append_merged
    monkeypatch.setattr(ParquetWriter, "_append_merged",
                        lambda self, i: (merged_as_we_go.append(i), orig(self, i))[1])
    convert_table(tmp_path / "in.parquet", tmp_path / "streamed.parquet", **kw)
    assert merged_as_we_go == list(range(len(merged_as_we_go))) and len(merged_as_we_go) >= 9

    monkeypatch.setattr(ParquetWriter, "_open_merge", lambda self: None)  # every part merged at seal
    convert_table(tmp_path / "in.parquet", tmp_path / "at_end.parquet", **kw)
    assert (tmp_path / "streamed.parquet").read_bytes() == (tmp_path / "at_end.parquet").read_bytes()
    t = pq.read_table(tmp_path / "streamed.parquet")
    assert t.column("id").to_pylist() == list(range(0, 4500, 3)) and t.num_rows == 1500


def test_writer_reads_back_rows_while_writing(tmp_path):
    """The npy writer serves read_rows for chunks already written, before it is sealed."""
    x = np.random.default_rng(7).standard_normal((500, 8)).astype(np.float32)
    np.save(tmp_path / "in.npy", x)
    reader = open_table(str(tmp_path / "in.npy"))
    chunks = reader.chunks(200)
    writer = make_writer(reader, str(tmp_path / "out.partial"), 8, np.dtype(np.float32), chunks, {})
    try:
        writer.create()
        writer.write(chunks[0], x[:200] * 2, None)
        assert np.array_equal(writer.read_rows(np.array([0, 57, 199])), x[[0, 57, 199]] * 2)
    finally:
        writer.close()
        reader.close()


def test_parquet_parts_of_an_older_run_resume_to_the_same_bytes(tmp_path, registry, monkeypatch):
    """Parts are Arrow IPC files; a partial output whose parts are Parquet (bc_fast before 0.2) still
    resumes, and the merged table has the same bytes either way."""
    pa = pytest.importorskip("pyarrow", reason="pyarrow (the parquet extra) is not installed")
    pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow (the parquet extra) is not installed")
    from bc_fast.store.parquet import ParquetWriter

    x = np.random.default_rng(8).standard_normal((1200, DIMS[2])).astype(np.float16)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), DIMS[2])
    pq.write_table(pa.table({"id": np.arange(1200), "emb": emb}), tmp_path / "in.parquet", row_group_size=500)
    kw = {"registry": registry, "dst": 0, "chunk_rows": 100, "threads": 1, "progress": False, "journal_interval": 0}
    convert_table(tmp_path / "in.parquet", tmp_path / "clean.parquet", **kw)

    orig, calls = ParquetWriter.write, [0]

    def write(self, chunk, y, extra):
        calls[0] += 1
        if calls[0] > 4:
            raise KeyboardInterrupt
        orig(self, chunk, y, extra)
    with monkeypatch.context() as m:
        m.setattr(ParquetWriter, "write", write)
        with pytest.raises(KeyboardInterrupt):
            convert_table(tmp_path / "in.parquet", tmp_path / "out.parquet", **kw)
    partial = tmp_path / "out.parquet.partial"
    for arrow in sorted(partial.glob("part-*.arrow")):  # what the older version wrote
        with pa.OSFile(str(arrow), "rb") as f:
            pq.write_table(pa.ipc.open_file(f).read_all(), arrow.with_suffix(".parquet"), compression="none")
        arrow.unlink()
    assert len(list(partial.glob("part-*.parquet"))) == 4
    convert_table(tmp_path / "in.parquet", tmp_path / "out.parquet", resume=True, **kw)
    assert (tmp_path / "out.parquet").read_bytes() == (tmp_path / "clean.parquet").read_bytes()


def test_parquet_output_encodes_embeddings_plainly_and_other_columns_as_pyarrow_would(tmp_path, registry):
    """The embedding column gets no dictionary and no statistics (parquet_write_options); ids and names keep
    pyarrow's defaults."""
    pa = pytest.importorskip("pyarrow", reason="pyarrow (the parquet extra) is not installed")
    pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow (the parquet extra) is not installed")
    x = np.random.default_rng(8).standard_normal((600, DIMS[2])).astype(np.float16)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), DIMS[2])
    pq.write_table(pa.table({"id": np.arange(600), "name": [f"n{i % 7}" for i in range(600)], "emb": emb}),
                   tmp_path / "in.parquet", row_group_size=250)
    convert_table(tmp_path / "in.parquet", tmp_path / "out.parquet", registry=registry, dst=0, chunk_rows=200,
                  threads=1, progress=False)
    md = pq.ParquetFile(tmp_path / "out.parquet").metadata
    assert md.num_row_groups >= 3
    for g in range(md.num_row_groups):
        cols = {md.row_group(g).column(c).path_in_schema: md.row_group(g).column(c)
                for c in range(md.num_columns)}
        assert not cols["emb.list.element"].has_dictionary_page and not cols["emb.list.element"].is_stats_set
        assert cols["name"].has_dictionary_page and cols["id"].is_stats_set


def test_pipeline_holds_only_the_chunks_in_flight(tmp_path, registry, monkeypatch):
    """A chunk's rows are released once written: Parquet reads return arrays of their own, and holding
    every finished read kept the whole table in memory by the end of a run."""
    import gc
    import weakref

    pa = pytest.importorskip("pyarrow", reason="pyarrow (the parquet extra) is not installed")
    pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow (the parquet extra) is not installed")
    from bc_fast.store.parquet import ParquetReader

    x = np.random.default_rng(9).standard_normal((3000, DIMS[2])).astype(np.float32)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), DIMS[2])
    pq.write_table(pa.table({"id": np.arange(3000), "emb": emb}), tmp_path / "in.parquet", row_group_size=1000)
    alive: list[weakref.ref] = []
    most = []
    orig = ParquetReader.read

    def read(self, chunk, buf):
        gc.collect()
        most.append(sum(r() is not None for r in alive))
        rows, extra = orig(self, chunk, buf)
        alive.append(weakref.ref(rows))
        return rows, extra

    monkeypatch.setattr(ParquetReader, "read", read)
    convert_table(tmp_path / "in.parquet", tmp_path / "out.parquet", registry=registry, dst=0, chunk_rows=100,
                  threads=1, progress=False)
    assert len(most) == 30 and max(most) <= 4, most


def _blas_threads() -> list[int]:
    from threadpoolctl import threadpool_info
    return [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]


def test_numpy_blas_runs_on_one_thread_during_a_conversion_and_is_restored(tmp_path, registry):
    """OpenBLAS workers busy-wait after a threaded call, on the cores the core's GEMM needs: the conversion
    (fusing the chain, the verification's float64 reference) holds numpy's BLAS to one thread, then restores it."""
    from threadpoolctl import threadpool_limits

    if not _blas_threads():
        pytest.skip("threadpoolctl finds no BLAS library loaded by numpy")
    seen: list[list[int]] = []
    layers = flatten_chain(registry.chain_layers(2, 0))

    def reference(x):
        seen.append(_blas_threads())
        return apply_layers_reference(layers, x)

    np.save(tmp_path / "in.npy", np.random.default_rng(6).standard_normal((500, DIMS[2])).astype(np.float32))
    with threadpool_limits(2, user_api="blas"):
        res = convert_table(tmp_path / "in.npy", tmp_path / "out.npy", registry=registry, dst=0, verify=50,
                            reference=reference, progress=False)
        after = _blas_threads()
    assert res.verified_rows == 50
    assert seen and all(t == [1] * len(t) for t in seen)
    assert after == [2] * len(after)


def test_default_chunks_are_16_mib_and_at_most_16384_rows_for_npy_on_the_cpu():
    from bc_fast.convert.job import _default_chunk_rows

    assert _default_chunk_rows(256, 2, 256, 2, "npy") == 16384  # 8 MiB: capped by rows
    assert _default_chunk_rows(256, 2, 256, 2, "npy_dir") == 16384
    assert _default_chunk_rows(256, 4, 256, 4, "npy") == 16384  # 16 MiB either way
    assert _default_chunk_rows(768, 4, 384, 4, "npy") == 5120  # capped by bytes, a multiple of 1024 rows
    assert _default_chunk_rows(256, 2, 256, 2, "parquet") == 32768  # row groups follow the chunks: unchanged
    assert _default_chunk_rows(256, 2, 256, 2, "npy", device="cuda") == 32768
    assert _default_chunk_rows(1 << 20, 4, 8, 4, "npy") == 1024  # never below 1024 rows


def test_a_default_npy_conversion_runs_in_16384_row_chunks(tmp_path, registry):
    np.save(tmp_path / "in.npy", np.random.default_rng(7).standard_normal((40000, DIMS[2])).astype(np.float16))
    res = convert_table(tmp_path / "in.npy", tmp_path / "out.npy", registry=registry, dst=0, progress=False)
    assert (res.chunk_rows, res.chunks) == (16384, 3)


def test_compute_threads_follow_what_the_run_waits_for():
    from bc_fast.convert.pipeline import _ComputeThreads
    from bc_fast.engine import get_num_threads

    assert _ComputeThreads(None).threads == get_num_threads()
    pace = _ComputeThreads(2)
    pace.update(0.002, 0.010)  # waited less than it computed: the compute is the bottleneck
    assert pace.threads == 2
    pace.update(0.010, 0.010)  # one thread (~0.020 s) would just keep up: no margin, stays on two
    assert pace.threads == 2
    pace.update(0.020, 0.010)  # 0.030 s a chunk: one thread does it in ~0.020 s
    assert pace.threads == 1
    pace.update(0.005, 0.020)  # one thread still waits a quarter of its time: stays on one
    assert pace.threads == 1
    pace.update(0.001, 0.030)  # now the run waits on the compute: all threads again
    assert pace.threads == 2
    many = _ComputeThreads(16)
    many.update(0.040, 0.010)  # 0.050 s a chunk: 16 * 0.010 * 1.25 / 0.050 = 4 threads keep up
    assert many.threads == 4
    single = _ComputeThreads(1)
    single.update(1.0, 0.001)
    assert single.threads == 1


def test_a_run_that_waits_on_its_reader_computes_on_one_thread(tmp_path, registry, monkeypatch):
    """While reading takes longer than computing, a multi-threaded GEMM would only take the reader's cores:
    chunks after the first two are computed on one thread, with the same bytes as a one-thread run."""
    from bc_fast.engine import FusedTransform
    from bc_fast.store.npy import NpyReader

    np.save(tmp_path / "in.npy", np.random.default_rng(8).standard_normal((4000, DIMS[2])).astype(np.float32))
    single = convert_table(tmp_path / "in.npy", tmp_path / "one.npy", registry=registry, dst=0, chunk_rows=500,
                           threads=1, progress=False)
    threads_used: list[int | None] = []
    orig_apply, orig_read = FusedTransform.apply, NpyReader.read

    def apply(self, x, **kw):
        threads_used.append(kw.get("threads"))
        return orig_apply(self, x, **kw)

    def slow_read(self, chunk, buf):
        time.sleep(0.05)
        return orig_read(self, chunk, buf)

    monkeypatch.setattr(FusedTransform, "apply", apply)
    monkeypatch.setattr(NpyReader, "read", slow_read)
    res = convert_table(tmp_path / "in.npy", tmp_path / "out.npy", registry=registry, dst=0, chunk_rows=500,
                        threads=2, verify=0, progress=False)
    assert res.chunks == 8 and len(threads_used) == 8
    assert threads_used[:2] == [2, 2] and threads_used[2:] == [1] * 6, threads_used
    assert (tmp_path / "out.npy").read_bytes() == (tmp_path / "one.npy").read_bytes()
    assert single.chunks == 8
