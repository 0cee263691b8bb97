"""Conversion and legacy IVF index building on Ray (bc_fast.convert.distributed, bc_fast.index.sharded).

One local Ray (2 CPUs) serves the whole module. Every output is compared byte for byte with the
single-process converter on the same file, and its values with the float64 step-by-step chain.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

# Ray reads this once, on import: the local Ray these tests start listens on 127.0.0.1 only.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ray = pytest.importorskip("ray", reason="ray[data] is needed for the Ray engine (pip install bc_fast[ray])")
pa = pytest.importorskip("pyarrow", reason="pyarrow is needed for Parquet datasets")
pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow is needed for Parquet datasets")

from bc_fast.convert import convert_table, read_sidecar  # noqa: E402
import bc_fast  # noqa: E402
from bc_fast.convert.distributed import convert_dataset_ray  # noqa: E402
from bc_fast.engine.fusion import apply_layers_reference, flatten_chain  # noqa: E402

# Ray Data warns about its own deprecated internals while it starts (warnings are errors here), and now
# and then leaves its own per-dataset log file (…/logs/ray-data/*.log) for the garbage collector to close,
# which surfaces in whichever test is running (seen once in CI, 2026-12-04). Only those files are ignored.
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray"),
    pytest.mark.filterwarnings(r"ignore:unclosed file <_io.TextIOWrapper name='[^']*/logs/ray-data/:ResourceWarning"),
    pytest.mark.filterwarnings(r"ignore:Exception ignored in. <_io.FileIO name='[^']*/logs/ray-data/"
                               ":pytest.PytestUnraisableExceptionWarning"),
]

DIMS = (24, 40)
ROWS = (700, 1000, 513, 900)
CHUNK = 256


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    # Local workers start in the driver's working directory: never the source tree, whose bc_fast/
    # (no compiled core) would shadow the installed package.
    old_cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("ray_cwd"))
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="error")
        assert ray._private.worker.global_worker.node.node_ip_address == "127.0.0.1"  # loopback only
        yield ray
        ray.shutdown()
    finally:
        os.chdir(old_cwd)


_LISTENERS = r"""
import socket


def listeners():
    # (ip, port) of every TCP socket in LISTEN state on this machine, from /proc/net/tcp and tcp6
    out = set()
    for family, path in ((socket.AF_INET, "/proc/net/tcp"), (socket.AF_INET6, "/proc/net/tcp6")):
        for line in open(path).read().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":
                continue
            ip_hex, port = fields[1].split(":")
            raw = bytes.fromhex(ip_hex)
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # host-order words
            out.add((socket.inet_ntop(family, raw), int(port, 16)))
    return out
"""
_LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def _run_without_loopback_env(script: str, cwd) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    return subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads listening sockets from Linux's /proc/net")
def test_a_local_ray_started_by_bc_fast_listens_on_loopback_only(tmp_path):
    """The product path (import_ray + start_ray, no address) in a fresh process, the variable unset."""
    script = _LISTENERS + """
import json, time
from bc_fast._util.ray_runtime import import_ray, start_ray
before = listeners()
ray = import_ray(local=True)
assert start_ray(ray, None)
time.sleep(1)
new = listeners() - before
node_ip = ray._private.worker.global_worker.node.node_ip_address
ray.shutdown()
print(json.dumps({"ips": sorted({ip for ip, _ in new}), "node_ip": node_ip}))
"""
    r = _run_without_loopback_env(script, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["ips"], "the local Ray opened no listening socket"
    assert set(got["ips"]) <= _LOOPBACK, f"a local Ray listens beyond loopback: {got}"
    assert got["node_ip"] == "127.0.0.1"


def test_a_local_ray_is_refused_when_ray_was_imported_too_early(tmp_path):
    script = """
import ray
from bc_fast._util.ray_runtime import import_ray, start_ray
try:
    start_ray(import_ray(local=True), None)
except RuntimeError as e:
    print("refused:", e, "| initialized:", ray.is_initialized())
"""
    r = _run_without_loopback_env(script, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "refused: ray was imported before bc_fast could make a local Ray listen on 127.0.0.1 only" in r.stdout
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0" in r.stdout and "initialized: False" in r.stdout


def _ipv6_loopback_listener():
    import socket

    s = None
    try:
        s = socket.socket(socket.AF_INET6)
        s.bind(("::1", 0))
    except OSError as e:
        if s is not None:
            s.close()
        pytest.skip(f"no IPv6 loopback here: {e}")
    s.listen(8)  # each check connects without being accepted
    return s


def test_an_ipv6_cluster_address_is_reachable_in_brackets():
    from bc_fast._util.ray_runtime import _check_reachable

    s = _ipv6_loopback_listener()
    port = s.getsockname()[1]
    try:
        for address in (f"[::1]:{port}", f"ray://[::1]:{port}", f"ray://[::1]:{port}/"):
            _check_reachable(address, timeout=2)  # no "Name or service not known" from the brackets
    finally:
        s.close()
    with pytest.raises(ConnectionError, match=rf"no Ray cluster answers at --address \[::1\]:{port} \(\[Errno "
                                              r"\d+\] Connection refused\)"):
        _check_reachable(f"[::1]:{port}", timeout=2)


def test_a_source_checkout_as_working_directory_is_refused(tmp_path):
    from bc_fast._util.ray_runtime import check_no_shadowing_source

    (tmp_path / "bc_fast").mkdir()
    (tmp_path / "bc_fast" / "__init__.py").write_text("")
    with pytest.raises(RuntimeError, match="holds a bc_fast/ source folder.*run the command from another directory"):
        check_no_shadowing_source(str(tmp_path))
    check_no_shadowing_source(str(tmp_path / "bc_fast"))  # no bc_fast/ below it: fine
    check_no_shadowing_source(os.path.dirname(os.path.dirname(bc_fast.__file__)))  # the installed package itself


@pytest.fixture(scope="module")
def registry(tmp_path_factory, make_chain_registry):
    return make_chain_registry(tmp_path_factory.mktemp("reg") / "registry", DIMS, (6.0,))


def _write(path, x: np.ndarray, start: int = 0, metadata: dict | None = None) -> None:
    emb = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])
    t = pa.table({"id": np.arange(start, start + len(x), dtype=np.int64) * 3,
                  "name": [f"item{i}" for i in range(start, start + len(x))], "emb": emb})
    if metadata is not None:
        t = t.replace_schema_metadata({b"bc_fast": json.dumps(metadata).encode()})
    pq.write_table(t, path, row_group_size=300)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("data") / "in"
    d.mkdir()
    rng = np.random.default_rng(3)
    start = 0
    for i, n in enumerate(ROWS):
        _write(d / f"part-{i}.parquet", rng.standard_normal((n, DIMS[1])).astype(np.float16), start)
        start += n
    return d


@pytest.fixture(scope="module")
def single(tmp_path_factory, registry, dataset):
    """The single-process converter on each file: {name: (bytes, sidecar)}."""
    d = tmp_path_factory.mktemp("single")
    out = {}
    for name in sorted(os.listdir(dataset)):
        convert_table(dataset / name, d / name, registry=registry, dst=0, chunk_rows=CHUNK, threads=1,
                      progress=False)
        out[name] = ((d / name).read_bytes(), read_sidecar(d / name))
    return out


@pytest.fixture(scope="module")
def converted(ray_cluster, tmp_path_factory, registry, dataset):
    out = tmp_path_factory.mktemp("ray") / "out"
    res = convert_dataset_ray(dataset, out, registry=registry, dst=0, batch_rows=CHUNK, num_workers=2,
                              threads_per_worker=1)
    return out, res


def _reference(registry, x: np.ndarray) -> np.ndarray:
    return apply_layers_reference(flatten_chain(registry.chain_layers(1, 0)), x.astype(np.float64))


def test_same_bytes_and_sidecar_as_single_process(converted, single, registry, dataset):
    out, res = converted
    names = sorted(single)
    assert sorted(os.listdir(out)) == names  # no per-file sidecars, no partial files
    assert res.files == names and res.converted == names and res.skipped == [] and res.rows == sum(ROWS)
    assert res.workers == 2 and res.threads_per_worker == 1 and len(res.peak_rss) >= 1
    side = read_sidecar(out)
    for name in names:
        data, one = single[name]
        assert (out / name).read_bytes() == data
        for k in ("format", "version", "source_version", "registry", "registry_checksum", "chain_checksum",
                  "chain", "provenance", "operator", "bc_fast_version"):
            assert side[k] == one[k], k
        part = side["parts"][name]
        assert part["chunk_crc32"] == one["chunk_crc32"] and part["job_key"] == one["job_key"]
        assert part["sha256"] == hashlib.sha256(data).hexdigest()
        # the values themselves, against the float64 chain; the ids and names carried through
        t, src = pq.read_table(out / name), pq.read_table(dataset / name)
        y = t.column("emb").combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(-1, DIMS[0])
        x = src.column("emb").combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(-1, DIMS[1])
        ref = _reference(registry, x)
        assert np.max(np.abs(y - ref) / np.abs(ref).max()) < 2e-3
        assert t.column("id").equals(src.column("id")) and t.column("name").equals(src.column("name"))
    assert side["version"] == 0 and side["source_version"] == 1
    assert side["table"] == {**single[names[0]][1]["table"], "format": "parquet_dir", "rows": sum(ROWS),
                             "files": len(names)}
    assert side["files"] == names and side["engine"]["name"] == "ray"


def test_rerun_is_a_no_op_and_overwrite_rules(converted, registry, dataset):
    out, _ = converted
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    again = convert_dataset_ray(dataset, out, registry=registry, dst=0, batch_rows=CHUNK)
    assert again.already_complete and again.converted == []
    with pytest.raises(FileExistsError, match="already exists; remove it, choose another path, or pass"):
        convert_dataset_ray(dataset, out, registry=registry, dst=0, batch_rows=CHUNK // 2)
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before


def test_killed_worker_then_rerun(ray_cluster, tmp_path, registry, dataset, single):
    out, staging = tmp_path / "out", tmp_path / "out.partial"
    names = sorted(single)
    crash = names[2]
    with pytest.raises(RuntimeError, match="rerun the same command to resume") as died:
        convert_dataset_ray(dataset, out, registry=registry, dst=0, batch_rows=CHUNK // 2, num_workers=1,
                            threads_per_worker=1, max_retries=0, _fault={"file": crash, "after_chunks": 2})
    assert not out.exists()  # nothing published
    journal = json.loads((tmp_path / "out.partial.journal.json").read_text())
    done = sorted(journal["files"])
    assert crash not in done
    assert not (staging / crash).exists() and (staging / (crash + ".partial")).is_dir()
    # the error counts the files kept (journaled or staged under their final names) and names the rest
    kept = [n for n in names if (staging / n).exists()]
    todo = ", ".join(f"{n} (half-converted)" if n == crash else n for n in names if n not in kept)
    assert (f"; {len(kept)} of {len(names)} files are converted and kept ({', '.join(kept)}); not finished "
            f"(in flight or not started): {todo}; rerun") in str(died.value)
    # every file under its final name is complete: the single-process bytes (chunking differs: reconvert)
    expect = {}
    for n in names:
        p = tmp_path / "single" / n
        p.parent.mkdir(exist_ok=True)
        convert_table(dataset / n, p, registry=registry, dst=0, chunk_rows=CHUNK // 2, threads=1, progress=False)
        expect[n] = p.read_bytes()
    finished = [n for n in names if (staging / n).exists()]
    assert set(done) <= set(finished)
    for n in finished:
        assert (staging / n).read_bytes() == expect[n]

    res = convert_dataset_ray(dataset, out, registry=registry, dst=0, batch_rows=CHUNK // 2, num_workers=2,
                              threads_per_worker=1)
    assert set(done) <= set(res.skipped) and crash in res.converted
    assert sorted(res.skipped + res.converted) == names
    assert sorted(os.listdir(out)) == names and not staging.exists()
    assert not (tmp_path / "out.partial.journal.json").exists()
    for n in names:
        assert (out / n).read_bytes() == expect[n]

    # --overwrite replaces only a dataset bc_fast wrote, and never a file it did not write
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"holds files bc_fast did not write there \(notes.txt\)"):
        convert_dataset_ray(dataset, out, registry=registry, dst=0, batch_rows=CHUNK, overwrite=True)
    (out / "notes.txt").unlink()
    convert_dataset_ray(dataset, out, registry=registry, dst=0, batch_rows=CHUNK, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["out", "out.bcfast.json", "single"]
    for n in names:
        assert (out / n).read_bytes() == single[n][0]


def test_a_dead_worker_names_the_files_not_finished(tmp_path):
    from types import SimpleNamespace

    from bc_fast.convert.dataset import _JOURNAL_FORMAT
    from bc_fast.convert.distributed import _collect, _Plan

    class RayError(Exception):
        pass

    class ActorDiedError(RayError):
        pass

    names = ["a.npy", "b.npy", "c.npy", "d.npy", "e.npy"]
    staging = tmp_path / "out.partial"
    staging.mkdir()
    (staging / "b.npy").write_bytes(b"finished, but Ray never delivered its result")
    (staging / "c.npy.partial").write_bytes(b"half-converted")
    done = {"name": "a.npy", "rows": 3, "resumed_rows": 0, "already_complete": False, "sha256": "0" * 64,
            "size": 10, "verify_max_error": 0.0, "side": {}, "warnings": []}
    failed = {"name": "e.npy", "error": {"type": "ValueError", "message": "bad rows"}}

    class Dataset:
        def iter_batches(self, **kw):
            yield {"result": [json.dumps(done), json.dumps(failed)]}
            raise ActorDiedError("The actor died unexpectedly before finishing this task.\n\tclass_name: X")

    journal = {"format": _JOURNAL_FORMAT, "key": "k", "job": {}, "files": {}, "publishing": False}
    plan = _Plan(str(tmp_path / "in"), str(staging), names, journal, str(tmp_path / "out.partial.journal.json"),
                 15, 1, 1, 0, False)
    ray_ = SimpleNamespace(exceptions=SimpleNamespace(RayError=RayError))
    with pytest.raises(RuntimeError) as died:
        _collect(ray_, Dataset(), plan, SimpleNamespace(update=lambda n: None, close=lambda: None))
    assert str(died.value) == (
        "a Ray worker died or failed (ActorDiedError: The actor died unexpectedly before finishing this task.); "
        "2 of 5 files are converted and kept (a.npy, b.npy); not finished (in flight or not started): "
        "c.npy (half-converted), d.npy; failed before that: e.npy: bad rows; rerun the same command to "
        "resume (finished files are skipped, a half-converted one continues from its journal)")
    assert list(json.loads((tmp_path / "out.partial.journal.json").read_text())["files"]) == ["a.npy"]


def test_npy_shards_match_the_npy_dir_converter(ray_cluster, tmp_path, registry):
    from bc_fast.store.tables import open_table

    shards = tmp_path / "in"
    shards.mkdir()
    rng = np.random.default_rng(7)
    names = ["_s2.npy", "s0.npy", "s1.npy"]  # an "_" shard is a shard, as for the single-process reader
    for name, n in zip(names, (120, 300, 451)):
        np.save(shards / name, rng.standard_normal((n, DIMS[1])).astype(np.float32))
    kw = dict(registry=registry, dst=0, dtype=np.float16)
    convert_table(shards, tmp_path / "one", chunk_rows=100, threads=1, progress=False, **kw)
    res = convert_dataset_ray(shards, tmp_path / "ray", batch_rows=100, **kw)
    side = read_sidecar(tmp_path / "ray")
    assert res.rows == 871 and side["table"]["format"] == "npy_dir" and side["files"] == names
    assert sorted(os.listdir(tmp_path / "one")) == names
    for n in names:
        assert (tmp_path / "ray" / n).read_bytes() == (tmp_path / "one" / n).read_bytes()
    assert open_table(str(tmp_path / "ray")).n_rows == 871
    # a dataset the Ray engine wrote is one the single-process converter may overwrite (float32 this time)
    convert_table(shards, tmp_path / "ray", registry=registry, dst=0, chunk_rows=100, threads=1, progress=False,
                  overwrite=True)
    assert np.load(tmp_path / "ray" / "s1.npy").dtype == np.float32


def test_inputs_are_the_single_process_readers_shards(tmp_path):
    from bc_fast.convert.dataset import _list_inputs
    from bc_fast.store.tables import open_table

    for name in ("_extra.npy", ".hidden.npy", "a.npy"):
        np.save(tmp_path / name, np.ones((3, 4), np.float32))
    (tmp_path / "a.npy.bcfast.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("not data")
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "run.log").write_text("no data in here")
    assert _list_inputs(str(tmp_path)) == ("npy", [".hidden.npy", "_extra.npy", "a.npy"])
    assert open_table(str(tmp_path)).names == [".hidden.npy", "_extra.npy", "a.npy"]


@pytest.mark.parametrize("nested", ["sub/b.npy", "sub/deeper/b.parquet", "b.npy/x"])
def test_subfolders_with_data_are_refused_not_skipped(tmp_path, nested):
    from bc_fast.convert.dataset import _list_inputs

    np.save(tmp_path / "a.npy", np.ones((3, 4), np.float32))
    (tmp_path / nested).parent.mkdir(parents=True)
    (tmp_path / nested).write_bytes(b"")
    top = nested.split("/")[0]
    with pytest.raises(ValueError, match=rf"has subfolders with .npy or Parquet files \({top}\), which the Ray "
                                         r"engine would not convert .*move their files up into .*or convert each "
                                         "subfolder as a dataset of its own"):
        _list_inputs(str(tmp_path))


def test_mixed_versions_refused(ray_cluster, tmp_path, registry):
    rng = np.random.default_rng(0)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    _write(mixed / "a.parquet", rng.standard_normal((10, DIMS[1])).astype(np.float16))
    _write(mixed / "b.parquet", rng.standard_normal((10, DIMS[1])).astype(np.float16), metadata={"version": 2})
    with pytest.raises(ValueError, match=r"mixed-version input: .* versions \(2: b.parquet\), but the "
                                         r"conversion starts from version 1"):
        convert_dataset_ray(mixed, tmp_path / "out", registry=registry, dst=0)
    dims = tmp_path / "dims"
    dims.mkdir()
    _write(dims / "a.parquet", rng.standard_normal((10, DIMS[1])).astype(np.float16))
    _write(dims / "b.parquet", rng.standard_normal((10, DIMS[0])).astype(np.float16))
    with pytest.raises(ValueError, match=r"have 24 features per row \(24: b.parquet\), but version 1 has dim 40"):
        convert_dataset_ray(dims, tmp_path / "out", registry=registry, dst=0)
    assert sorted(os.listdir(tmp_path)) == ["dims", "mixed"]  # nothing written


def test_ray_missing_is_a_clear_error(tmp_path, registry, dataset, monkeypatch, capsys):
    from bc_fast import cli

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r"install it with pip install bc_fast\[ray\]"):
        convert_dataset_ray(dataset, tmp_path / "out", registry=registry, dst=0)
    rc = cli.main(["convert", str(dataset), str(tmp_path / "out"), "-r", str(registry.path), "--to", "0",
                   "--engine", "ray"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("bc-fast convert: error: the Ray engine needs ray[data]")
    assert "install it with pip install bc_fast[ray]" in err and "Traceback" not in err


def test_sharded_ivf_equals_one_process(converted, tmp_path, registry):
    faiss = pytest.importorskip("faiss", reason="faiss-cpu is needed for index tests")
    from bc_fast.index import LegacyIndex
    from bc_fast.index.sharded import build_ivf_index_sharded, train_ivf

    out, _ = converted
    faiss.omp_set_num_threads(1)
    trained = train_ivf(out, factory="IVF8,Flat", metric="l2", train_rows=800)
    legacy = build_ivf_index_sharded(out, tmp_path / "ivf.faiss", factory="IVF8,Flat", metric="l2",
                                     trained=trained, registry=registry, chunk_rows=200, engine="ray")
    rows = np.concatenate([pq.read_table(out / n).column("emb").combine_chunks().flatten()
                           .to_numpy(zero_copy_only=False).reshape(-1, DIMS[0]) for n in sorted(os.listdir(out))])
    rows = rows.astype(np.float32)
    one = faiss.clone_index(trained)
    one.add(rows)
    q = np.random.default_rng(5).standard_normal((20, DIMS[0])).astype(np.float32)
    for nprobe in (2, 8):
        faiss.extract_index_ivf(one).nprobe = nprobe
        faiss.extract_index_ivf(legacy.index).nprobe = nprobe
        d1, i1 = one.search(q, 10)
        d2, i2 = legacy.index.search(q, 10)
        assert np.array_equal(i1, i2) and np.array_equal(d1, d2)
    # probing every list is exact: the numpy brute force top-10
    dist = ((q[:, None, :].astype(np.float64) - rows[None].astype(np.float64)) ** 2).sum(-1)
    assert np.array_equal(np.sort(i2, 1), np.sort(np.argsort(dist, 1)[:, :10], 1))
    loaded = LegacyIndex.load(tmp_path / "ivf.faiss", registry)
    assert loaded.version == 0 and loaded.source_version == 1 and loaded.ntotal == sum(ROWS)
    local = build_ivf_index_sharded(out, factory="IVF8,Flat", metric="l2", trained=trained, engine="local")
    faiss.extract_index_ivf(local.index).nprobe = 8
    assert np.array_equal(local.index.search(q, 10)[1], i2)


def test_cli_engine_ray_end_to_end(tmp_path, registry, dataset, single):
    env = {**os.environ, "RAY_ADDRESS": ""}
    cmd = [sys.executable, "-m", "bc_fast.cli", "convert", str(dataset), str(tmp_path / "out"), "-r",
           str(registry.path), "--from", "1", "--to", "0", "--chunk-rows", str(CHUNK), "--engine", "ray",
           "--workers", "1", "--threads", "1"]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "converted 4 of 4 files" in p.stderr and "on 1 Ray workers x 1 threads" in p.stderr
    for name, (data, _) in single.items():
        assert (tmp_path / "out" / name).read_bytes() == data
    assert read_sidecar(tmp_path / "out")["version"] == 0
