"""Each transform kind's exported layers reproduce the torch module (numpy float64, fused core)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="bc_fast.train needs torch (install the train extra)")

from bc_fast.engine import operator as ops  # noqa: E402
from bc_fast.train.transforms import (  # noqa: E402
    TRANSFORM_KINDS,
    OrthogonalTransform,
    apply_layers_numpy,
    make_transform,
)

CASES = [
    ("linear", {}, 13, 7),
    ("affine", {}, 13, 7),
    ("lowrank", {"rank": 3}, 13, 7),
    ("orthogonal", {}, 13, 7),
    ("orthogonal", {"bias": True}, 5, 11),
    ("mlp", {"hidden": 9}, 13, 7),
    ("mlp", {"hidden": 5, "activation": "gelu"}, 7, 13),
    ("truncate", {}, 13, 7),
    ("identity", {}, 6, 6),
]


def _randomize(t):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in t.named_parameters():
            if "parametrizations" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        if isinstance(t, OrthogonalTransform):
            # set Q through the parametrisation (right inverse) to a random orthogonal matrix
            a = torch.randn(max(t.d_in, t.d_out), min(t.d_in, t.d_out), generator=g)
            qr = torch.linalg.qr(a).Q
            t.q.weight = qr.T if t.d_out < t.d_in else qr
    return t


@pytest.mark.parametrize("kind,opts,d_in,d_out", CASES)
def test_export_matches_forward(kind, opts, d_in, d_out):
    torch.manual_seed(0)
    t = _randomize(make_transform(kind, d_in, d_out, **opts)).eval()
    x = np.random.default_rng(0).normal(size=(17, d_in)).astype(np.float32)
    with torch.no_grad():
        y = t(torch.from_numpy(x)).double().numpy()
    arrays = t.export_arrays()
    assert arrays[0][0].shape[1] == d_in and arrays[-1][0].shape[0] == d_out
    assert all(a[0].dtype == np.float32 for a in arrays)
    y64 = apply_layers_numpy(arrays, x)
    np.testing.assert_allclose(y64, y, rtol=1e-5, atol=1e-5)
    lin = t.linear_part()
    if kind in ("linear", "affine", "lowrank", "orthogonal", "truncate", "identity"):
        assert lin is not None and tuple(lin.shape) == (d_out, d_in)
        # differences go through the linear part: B(a) - B(b) = W (a - b)
        a, b = torch.from_numpy(x[:3]), torch.from_numpy(x[3:6])
        with torch.no_grad():
            np.testing.assert_allclose((t(a) - t(b)).numpy(), ((a - b) @ lin.T).numpy(), rtol=1e-4, atol=1e-5)
    else:
        assert lin is None
    layers = t.export()
    assert all(isinstance(layer, ops.Layer) for layer in layers)
    np.testing.assert_allclose(apply_layers_numpy(layers, x), y64, rtol=1e-6, atol=1e-6)
    fused = ops.FusedTransform(layers).apply(np.ascontiguousarray(x))
    np.testing.assert_allclose(fused, y64, rtol=1e-4, atol=1e-4)


def test_orthogonal_has_orthonormal_rows():
    t = _randomize(OrthogonalTransform(12, 5))
    q = t.q.weight.detach().double().numpy()
    np.testing.assert_allclose(q @ q.T, np.eye(5), atol=1e-5)


def test_transform_errors():
    with pytest.raises(ValueError, match="unknown transform kind"):
        make_transform("spline", 3, 2)
    with pytest.raises(ValueError, match="d_out <= d_in"):
        make_transform("truncate", 3, 4)
    with pytest.raises(ValueError, match="rank"):
        make_transform("lowrank", 8, 4, rank=5)
    with pytest.raises(ValueError, match="d_in == d_out"):
        make_transform("identity", 3, 4)
    with pytest.raises(ValueError, match=">= 1"):
        make_transform("linear", 0, 4)
    t = make_transform("linear", 4, 2)
    with pytest.raises(ValueError, match=r"shape \(n, 4\)"):
        t(torch.zeros(3, 5))
    assert set(TRANSFORM_KINDS) == {"linear", "affine", "lowrank", "orthogonal", "mlp", "truncate", "identity"}


def _silent_import_skips(path) -> list[int]:
    """Lines of ``except ImportError`` handlers (or ModuleNotFoundError) that ``return`` or ``pass``."""
    import ast

    bad = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ExceptHandler) or node.type is None:
            continue
        names = {n.id for n in ast.walk(node.type) if isinstance(n, ast.Name)}
        if names & {"ImportError", "ModuleNotFoundError"} and any(
                isinstance(n, (ast.Return, ast.Pass)) for n in ast.walk(node)):
            bad.append(node.lineno)
    return bad


def test_no_test_passes_silently_on_a_missing_import():
    """A missing module must fail a test or skip it visibly (pytest.importorskip with a reason)."""
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    found = {p.name: lines for p in sorted(tests.glob("test_*.py")) if (lines := _silent_import_skips(p))}
    assert not found, f"tests that return/pass on ImportError (use pytest.importorskip(..., reason=...)): {found}"
