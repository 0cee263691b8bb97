"""Alignment losses against hand-computed values."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="bc_fast.train needs torch (install the train extra)")

from bc_fast.train.losses import alignment_loss, multi_step_loss, single_step_loss  # noqa: E402
from bc_fast.train.transforms import LinearTransform, ResidualMLPTransform, TruncateTransform  # noqa: E402


def _linear(w):
    t = LinearTransform(len(w[0]), len(w))
    with torch.no_grad():
        t.lin.weight.copy_(torch.tensor(w, dtype=torch.float32))
    for p in t.parameters():
        p.requires_grad_(False)
    return t


def test_single_step_hand_value():
    target = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    pred = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    # squared errors 1, 4, 1, 4 -> mean 2.5
    assert single_step_loss(target, pred).item() == pytest.approx(2.5)


def test_multi_step_hand_values():
    target = torch.tensor([[1.0, 2.0]])
    pred = torch.zeros(1, 2)
    # k = 1: no frozen transforms -> the single-step loss
    assert multi_step_loss(target, pred, []).item() == pytest.approx(2.5)
    # k = 2, B_1 = [[1, 1]]: delta = (1, 2) -> mean 2.5; B_1 delta = 3 -> 9; (2.5 + 9) / 2
    b1 = _linear([[1.0, 1.0]])
    assert multi_step_loss(target, pred, [b1]).item() == pytest.approx(5.75)
    # k = 3, B_2 = diag(2, 1) applied first: (2, 2) -> 4; then B_1: 4 -> 16; (2.5 + 4 + 16) / 3
    b2 = _linear([[2.0, 0.0], [0.0, 1.0]])
    assert multi_step_loss(target, pred, [b1, b2]).item() == pytest.approx(7.5)
    # truncation as a frozen transform: (1, 2) -> (1) -> 1; (2.5 + 1) / 2
    assert multi_step_loss(target, pred, [TruncateTransform(2, 1)]).item() == pytest.approx(1.75)


def test_multi_step_nonlinear_chain_maps_both_sides():
    torch.manual_seed(0)
    mlp = ResidualMLPTransform(3, 2, hidden=4)
    with torch.no_grad():
        mlp.w2.weight.normal_()
    for p in mlp.parameters():
        p.requires_grad_(False)
    target, pred = torch.randn(5, 3), torch.randn(5, 3)
    expect = (torch.mean((target - pred) ** 2) + torch.mean((mlp(target) - mlp(pred)) ** 2)) / 2
    assert multi_step_loss(target, pred, [mlp]).item() == pytest.approx(expect.item(), rel=1e-6)
    # a linear chain gives the same value either way
    lin = _linear([[1.0, -2.0, 0.5], [0.0, 1.0, 3.0]])
    expect = (torch.mean((target - pred) ** 2) + torch.mean((lin(target) - lin(pred)) ** 2)) / 2
    assert multi_step_loss(target, pred, [lin]).item() == pytest.approx(expect.item(), rel=1e-6)


def test_alignment_loss_sums_groups_and_trains_only_bk():
    bk = LinearTransform(3, 2)
    with torch.no_grad():
        bk.lin.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    b1 = _linear([[1.0, 1.0]])
    new_u = torch.tensor([[1.0, 1.0, 5.0]], requires_grad=True)
    new_i = torch.tensor([[0.0, 0.0, 0.0]], requires_grad=True)
    tgt_u = torch.tensor([[2.0, 3.0]])  # delta (1, 2)
    tgt_i = torch.tensor([[0.0, 0.0]])  # delta 0
    single = alignment_loss([(tgt_u, new_u), (tgt_i, new_i)], bk)
    assert single.item() == pytest.approx(2.5)
    multi = alignment_loss([(tgt_u, new_u), (tgt_i, new_i)], bk, [b1], multi_step=True)
    assert multi.item() == pytest.approx(5.75)
    multi.backward()
    assert bk.lin.weight.grad is not None and new_u.grad is not None
    assert b1.lin.weight.grad is None  # earlier transforms stay frozen


def test_loss_shape_errors():
    with pytest.raises(ValueError, match="equal shapes"):
        single_step_loss(torch.zeros(2, 3), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="expects dim"):
        multi_step_loss(torch.zeros(2, 3), torch.zeros(2, 3), [_linear([[1.0, 1.0]])])
    with pytest.raises(ValueError, match="at least one"):
        alignment_loss([], LinearTransform(2, 2))
