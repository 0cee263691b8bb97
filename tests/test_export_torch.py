"""bc_fast.export.to_torch: a FusedTransform as an nn.Module, checked against op.apply and float64."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from bc_fast import FusedTransform, Layer
from bc_fast.engine.fusion import apply_layers_reference
from bc_fast.export import to_torch

torch = pytest.importorskip("torch", reason="to_torch needs torch (the [train] extra)")
from bc_fast.export import FusedModule  # the torch class: imported after the skip


def _program(kind: str, rng: np.random.Generator) -> FusedTransform:
    def w(o: int, i: int) -> np.ndarray:
        return (rng.standard_normal((o, i)) / np.sqrt(i)).astype(np.float32)

    def b(o: int) -> np.ndarray:
        return rng.standard_normal(o).astype(np.float32)

    layers, normalize = {
        "affine": ([Layer(w(24, 40))], False),
        "affine_bias_l2": ([Layer(w(24, 40), b(24))], True),
        "relu_partial": ([Layer(w(24, 40), b(24), "relu", 7)], False),
        "gelu_mlp_l2": ([Layer(w(64, 40), b(64), "gelu"), Layer(w(24, 64), None, "gelu", 5)], True),
        "three_layers": ([Layer(w(33, 40), b(33), "relu"), Layer(w(17, 33), b(17), "gelu", 16), Layer(w(24, 17))],
                         True),
    }[kind]
    return FusedTransform(layers, normalize=normalize)


def _reference(op: FusedTransform, x: np.ndarray) -> np.ndarray:
    y = apply_layers_reference(op.layers, x.astype(np.float64))
    if op.normalize:
        y = y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
    return y


KINDS = ["affine", "affine_bias_l2", "relu_partial", "gelu_mlp_l2", "three_layers"]


@pytest.mark.parametrize("kind", KINDS)
def test_float32_module_equals_apply(kind):
    rng = np.random.default_rng(len(kind))
    op = _program(kind, rng)
    x = rng.standard_normal((301, 40)).astype(np.float32)
    module = to_torch(op)
    assert not module.training and all(not p.requires_grad for p in module.parameters())
    with torch.no_grad():
        got = module(torch.from_numpy(x)).numpy()
    ref = _reference(op, x)
    np.testing.assert_allclose(got, op.apply(x), rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("dtype, tol", [("float16", 5e-3), ("bfloat16", 4e-2)])
@pytest.mark.parametrize("kind", KINDS)
def test_16bit_module_within_rounding(kind, dtype, tol):
    rng = np.random.default_rng(7 + len(kind))
    op = _program(kind, rng)
    x = rng.standard_normal((200, 40)).astype(np.float32)
    module = to_torch(op, dtype=getattr(torch, dtype))
    xt = torch.from_numpy(x).to(getattr(torch, dtype))
    with torch.no_grad():
        got = module(xt)
    assert got.dtype == getattr(torch, dtype) and tuple(got.shape) == (200, op.d_out)
    ref = _reference(op, xt.float().numpy())
    err = np.abs(got.float().numpy() - ref).max() / np.abs(ref).max()
    assert err < tol, err


def test_keep_float32_module_computes_in_float32_like_bc_fast():
    """Layer outputs beyond float16's range (about 8e4 here) before normalisation: bc_fast and a keep_float32
    module (what the sentence-transformers adapter uses) compute in float32 and round the output once, so
    neither overflows, and casting the module to half precision keeps its weights float32."""
    rng = np.random.default_rng(0)
    op = FusedTransform([Layer((rng.standard_normal((32, 64)) * 1e4).astype(np.float32))], normalize=True)
    x = rng.standard_normal((16, 64)).astype(np.float16)
    module = FusedModule(op, keep_float32=True).half()
    assert all(p.dtype == torch.float32 for p in module.parameters())
    with torch.no_grad():
        got = module(torch.from_numpy(x))
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    ref = _reference(op, x.astype(np.float32))
    np.testing.assert_allclose(got.float().numpy(), ref, rtol=2**-10, atol=2**-24)  # one float16 rounding
    np.testing.assert_allclose(got.numpy(), op.apply(x, out_dtype=np.float16), rtol=2**-10, atol=2**-24)


def test_keep_float32_casts_keep_the_weights_and_device_moves_apply():
    op = _program("gelu_mlp_l2", np.random.default_rng(2))
    x = torch.from_numpy(np.random.default_rng(3).standard_normal((8, 40)).astype(np.float32))
    for cast in (lambda m: m.half(), lambda m: m.to(torch.bfloat16), lambda m: m.double()):
        module = cast(FusedModule(op, keep_float32=True))
        assert all(p.dtype == torch.float32 for p in module.parameters())
        with torch.no_grad():
            torch.testing.assert_close(module(x), to_torch(op)(x), rtol=0, atol=0)
    moved = FusedModule(op, keep_float32=True).to("meta", torch.float16)
    assert all(p.device.type == "meta" and p.dtype == torch.float32 for p in moved.parameters())
    assert all(p.dtype == torch.float16 for p in to_torch(op).half().parameters())  # the default module casts


def test_leading_batch_dimensions_and_wrong_width():
    rng = np.random.default_rng(3)
    op = _program("gelu_mlp_l2", rng)
    module = to_torch(op)
    x = rng.standard_normal((2, 5, 40)).astype(np.float32)
    with torch.no_grad():
        got = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got.reshape(10, -1), op.apply(x.reshape(10, 40)), rtol=2e-5, atol=2e-6)
    with pytest.raises(ValueError, match="expected inputs with 40 features"):
        module(torch.zeros(3, 41))


def test_zero_rows_normalise_to_zero():
    op = FusedTransform([Layer(np.eye(4, dtype=np.float32))], normalize=True)
    with torch.no_grad():
        got = to_torch(op)(torch.zeros(2, 4))
    assert torch.equal(got, torch.zeros(2, 4))


def test_state_dict_round_trip_and_export():
    rng = np.random.default_rng(5)
    op = _program("three_layers", rng)
    module = to_torch(op)
    other = to_torch(_program("three_layers", np.random.default_rng(6)))
    other.load_state_dict(module.state_dict())
    x = torch.from_numpy(rng.standard_normal((9, 40)).astype(np.float32))
    with torch.no_grad():
        assert torch.equal(other(x), module(x))
    exported = torch.export.export(module, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), module(x), rtol=0, atol=0)


def test_refuses_what_is_not_a_transform():
    with pytest.raises(TypeError, match="takes a FusedTransform"):
        to_torch([Layer(np.eye(2, dtype=np.float32))])


def test_import_does_not_import_torch(tmp_path):
    code = "import sys, bc_fast, bc_fast.export; assert 'torch' not in sys.modules, 'torch imported'"
    # cwd=tmp_path: the child must import the installed bc_fast, not the source checkout.
    res = subprocess.run([sys.executable, "-c", code], check=False, cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr


def test_cuda_module_matches_apply():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible to torch: the CUDA half of to_torch is not run here")
    rng = np.random.default_rng(9)
    op = _program("gelu_mlp_l2", rng)
    module = to_torch(op, device="cuda")
    x = rng.standard_normal((64, 40)).astype(np.float32)
    with torch.no_grad():
        got = module(torch.from_numpy(x).cuda()).cpu().numpy()
    np.testing.assert_allclose(got, _reference(op, x), rtol=1e-4, atol=1e-5)
