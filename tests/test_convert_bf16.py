"""bfloat16 tables in convert_table: .npy files as np.save writes ml_dtypes.bfloat16 arrays, in and out."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from bc_fast.convert import (
    apply_to_table,
    convert_table,
    default_verify_tol,
    read_sidecar,
)
from bc_fast.engine.fusion import apply_layers_reference, flatten_chain
from bc_fast.store.tables import open_table, read_npy_header

BF16 = np.dtype(ml_dtypes.bfloat16)
DIMS = (24, 40, 64)


@pytest.fixture(scope="module")
def registry(tmp_path_factory, make_chain_registry):
    return make_chain_registry(tmp_path_factory.mktemp("reg") / "registry", DIMS, (6, 8))


def _table(n: int, dtype, d: int = DIMS[2], seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32).astype(dtype)


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _as_bf16(a: np.ndarray) -> np.ndarray:
    """What np.load returns for a bf16 file ('|V2' items), seen as bfloat16 again."""
    assert a.dtype.kind == "V" and a.dtype.itemsize == 2
    return a.view(BF16)


def test_np_save_of_bf16_reads_as_bfloat16(tmp_path) -> None:
    x = _table(10, BF16)
    np.save(tmp_path / "x.npy", x)
    assert read_npy_header(str(tmp_path / "x.npy")).dtype == BF16
    reader = open_table(str(tmp_path / "x.npy"))
    assert reader.dtype == BF16 and np.array_equal(reader.read_rows(np.array([3, 7])).view(np.uint16),
                                                  x[[3, 7]].view(np.uint16))
    reader.close()


def test_structured_two_byte_items_are_refused(tmp_path) -> None:
    np.save(tmp_path / "s.npy", np.zeros((4, 3), dtype=[("a", "u1"), ("b", "u1")]))
    with pytest.raises((TypeError, ValueError), match=r"s\.npy"):
        read_npy_header(str(tmp_path / "s.npy"))


@pytest.mark.parametrize("in_dtype,out_dtype", [(BF16, None), (BF16, "float32"), (BF16, "float16"),
                                                 (np.float32, "bfloat16"), (np.float16, BF16)])
def test_bf16_tables_in_and_out_match_the_core_byte_for_byte(tmp_path, registry, in_dtype, out_dtype) -> None:
    x = _table(1000, in_dtype)
    np.save(tmp_path / "in.npy", x)
    res = convert_table(tmp_path / "in.npy", tmp_path / "out.npy", registry=registry, dst=0, dtype=out_dtype,
                        chunk_rows=300, threads=1, verify=64)
    want_dtype = BF16 if out_dtype is None else ml_dtypes.bfloat16 if out_dtype == "bfloat16" else out_dtype
    op = registry.operator(2, 0)
    want = np.concatenate([op.apply(x[i:i + 300], out_dtype=want_dtype, threads=1) for i in range(0, 1000, 300)])
    # Exactly the file np.save writes for the core's output (a bf16 array: descr '<V2').
    assert (tmp_path / "out.npy").read_bytes() == _npy_bytes(want)
    assert res.verified_rows == 64 and res.verify_max_error <= res.verify_tol
    assert res.dtype == str(np.dtype(want_dtype))
    assert read_sidecar(tmp_path / "out.npy")["table"]["dtype"] == str(np.dtype(want_dtype))


def test_bf16_output_is_verified_against_float64_with_its_own_tolerance(tmp_path, registry) -> None:
    x = _table(500, np.float32)
    np.save(tmp_path / "in.npy", x)
    res = convert_table(tmp_path / "in.npy", tmp_path / "out.npy", registry=registry, dst=0, dtype="bfloat16",
                        verify=500, threads=1)
    y = _as_bf16(np.load(tmp_path / "out.npy")).astype(np.float64)
    ref = apply_layers_reference(flatten_chain(registry.chain_layers(2, 0)), x)
    err = np.linalg.norm(y - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert err.max() <= res.verify_tol and err.max() == pytest.approx(res.verify_max_error)
    # bf16 rounding (2^-8 per element) is far above float32's, and the default allows it.
    assert 2.0**-9 < res.verify_max_error <= default_verify_tol(2, 64, "bfloat16")
    assert default_verify_tol(2, 64, "bfloat16") > default_verify_tol(2, 64, "float16") > default_verify_tol(2, 64,
                                                                                                          "float32")


def test_bf16_shard_directory(tmp_path, registry) -> None:
    os.mkdir(tmp_path / "in")
    parts = [_table(n, BF16, seed=n) for n in (70, 0, 130)]
    for i, p in enumerate(parts):
        np.save(tmp_path / "in" / f"part-{i}.npy", p)
    convert_table(tmp_path / "in", tmp_path / "out", registry=registry, dst=1, chunk_rows=50, threads=1, verify=20)
    op = registry.operator(2, 1)
    for i, p in enumerate(parts):
        assert (tmp_path / "out" / f"part-{i}.npy").read_bytes() == _npy_bytes(op.apply(p, out_dtype=BF16, threads=1))


def test_apply_to_table_with_a_bf16_operator_and_bf16_rows(tmp_path, registry) -> None:
    x = _table(400, BF16)
    np.save(tmp_path / "in.npy", x)
    op = registry.operator(2, 0)
    apply_to_table(op, tmp_path / "in.npy", tmp_path / "out.npy", threads=2, verify=10)
    assert (tmp_path / "out.npy").read_bytes() == _npy_bytes(op.apply(x, out_dtype=BF16, threads=1))


def test_parquet_refuses_bfloat16_output_before_writing(tmp_path, registry) -> None:
    pa = pytest.importorskip("pyarrow", reason="Parquet tables need pyarrow")
    pq = pytest.importorskip("pyarrow.parquet", reason="Parquet tables need pyarrow")
    x = _table(20, np.float16)
    pq.write_table(pa.table({"emb": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])}),
                   tmp_path / "in.parquet")
    with pytest.raises(TypeError, match=r"parquet tables hold float32 or float16 only .*bfloat16 is for \.npy"):
        convert_table(tmp_path / "in.parquet", tmp_path / "out.parquet", registry=registry, dst=0, dtype="bfloat16")
    assert sorted(os.listdir(tmp_path)) == ["in.parquet"]


@pytest.mark.parametrize("bad", ["float64", "int8", "bf8"])
def test_unknown_output_dtypes_are_refused(tmp_path, registry, bad) -> None:
    np.save(tmp_path / "in.npy", _table(5, np.float32))
    with pytest.raises(TypeError, match="output dtype must be float32"):
        convert_table(tmp_path / "in.npy", tmp_path / "out.npy", registry=registry, dst=0, dtype=bad)
    assert sorted(os.listdir(tmp_path)) == ["in.npy"]


def test_cli_dtype_bfloat16(tmp_path, registry, capsys) -> None:
    from bc_fast.cli import main

    np.save(tmp_path / "in.npy", _table(300, np.float32))
    rc = main(["convert", str(tmp_path / "in.npy"), str(tmp_path / "out.npy"), "--registry", str(registry.path),
               "--to", "1", "--dtype", "bfloat16", "--verify", "10", "--threads", "1"])
    assert rc == 0, capsys.readouterr().err
    assert "bfloat16" in capsys.readouterr().err
    assert _as_bf16(np.load(tmp_path / "out.npy")).shape == (300, DIMS[1])


_FRESH_PROCESS_CONVERSION = """
import sys
from bc_fast.convert import convert_table
before = "ml_dtypes" in sys.modules
convert_table(sys.argv[1], sys.argv[2], registry=sys.argv[3], dst=0, dtype=sys.argv[4] or None, threads=1, verify=8)
print(before, "ml_dtypes" in sys.modules)
"""


@pytest.mark.parametrize(("in_dtype", "out_dtype", "imported"), [(np.float32, "", False), (np.float16, "float32", False),
                                                                  (np.float32, "bfloat16", True), (BF16, "", True)])
def test_ml_dtypes_is_imported_only_for_bfloat16(tmp_path, registry, in_dtype, out_dtype, imported) -> None:
    # ml_dtypes 0.7.0 takes ~0.75 s to import: a float32/float16 run (and the CLI) must not pay for it.
    np.save(tmp_path / "in.npy", _table(40, in_dtype))
    res = subprocess.run([sys.executable, "-c", _FRESH_PROCESS_CONVERSION, str(tmp_path / "in.npy"),
                          str(tmp_path / "out.npy"), str(registry.path), out_dtype],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["False", str(imported)]
    want_dtype = BF16 if (out_dtype == "bfloat16" or (in_dtype is BF16 and not out_dtype)) else np.dtype(
        out_dtype or in_dtype)
    assert open_table(str(tmp_path / "out.npy")).dtype == want_dtype
