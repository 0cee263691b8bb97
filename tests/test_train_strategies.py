"""All eight strategies on a tiny synthetic graph, and the general (model-agnostic) trainer API."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="bc_fast.train needs torch (install the train extra)")

from bc_fast.data import synthetic_interactions, time_points  # noqa: E402
from bc_fast.engine.operator import FusedTransform  # noqa: E402
from bc_fast.train import (  # noqa: E402
    STRATEGY_NAMES,
    BCTrainer,
    BPRSampler,
    PinSAGE,
    bpr_loss,
    build_graph,
    evaluate_recall,
    get_strategy,
)
from bc_fast.train.recommender import graph_attr_sizes  # noqa: E402

DIMS = (8, 10, 12)


@pytest.fixture(scope="module")
def world():
    torch.set_num_threads(1)
    data = synthetic_interactions(num_users=60, num_items=40, num_edges=1500, seed=0)
    tp = time_points(len(DIMS))
    splits = [data.split(tp[k], tp[k + 1]) for k in range(len(DIMS))]
    graphs = [build_graph(data, s, degree_bins=4) for s in splits]
    return data, splits, graphs, graph_attr_sizes(data, degree_bins=4)


def _fns(world, k, seed=0):
    data, splits, graphs, _ = world
    g, s = graphs[k], splits[k]
    sampler = BPRSampler(s.train_user, s.train_item, s.num_items, 256, np.random.default_rng([seed, k]))

    def step_fn(model, batch):
        u, p, n = batch
        xu, xi = model(g)
        return bpr_loss(xu, xi, u, p, n, 1e-2), [("user", u, xu[u]), ("item", p, xi[p]), ("item", n, xi[n])]

    def embed_fn(model):
        xu, xi = model(g)
        return {"user": xu, "item": xi}

    def eval_fn(model):
        return evaluate_recall(*model(g), s, 10)

    return step_fn, sampler.epoch, embed_fn, eval_fn


def _model(world, k, seed=0):
    torch.manual_seed(seed * 100 + k)
    return PinSAGE(DIMS[k], 2, world[3])


def _run(world, name, seed=0, epochs=3, m0=None, reuse=None, **kw):
    tr = BCTrainer(name, lr=1e-2, transform_lr=1e-2, posthoc_steps=100, seed=seed, **kw)
    for k in range(len(DIMS)):
        step_fn, batches, embed_fn, eval_fn = _fns(world, k, seed)
        if k == 0 and m0 is not None:
            tr.add_trained_version(m0, embed_fn=embed_fn, eval_fn=eval_fn)
            continue
        if reuse is not None and k > 0:
            model, trained = reuse.versions[k].model, True
        else:
            model, trained = (_model(world, k, seed) if (k == 0 or get_strategy(name).model == "fresh") else None), False
        tr.fit_version(model, step_fn=step_fn, batches=batches, embed_fn=embed_fn, epochs=epochs, eval_fn=eval_fn,
                       eval_every=1, select_after=1, trained=trained)
    return tr


@pytest.fixture(scope="module")
def runs(world):
    base = _run(world, "nobc", epochs=3)
    m0 = base.versions[0].model
    out = {"nobc": base}
    for name in STRATEGY_NAMES:
        if name != "nobc":
            out[name] = _run(world, name, m0=m0, reuse=base if name.startswith("posthoc") else None)
    return out


def test_every_strategy_produces_versions_in_v0_space(world, runs):
    _, splits, _, _ = world
    expected_kind = {"fix-m0": "identity", "finetune-m0": "identity", "nobc": "truncate", "joint-notrans": "truncate",
                     "posthoc-sloss": "linear", "posthoc-mloss": "linear", "joint-sloss": "linear", "joint-mloss": "linear"}
    for name, tr in runs.items():
        assert len(tr.versions) == len(DIMS)
        dims = [DIMS[0]] * 3 if get_strategy(name).model != "fresh" else list(DIMS)
        assert tr.dims == dims, name
        assert [b.kind for b in tr.transforms] == [expected_kind[name]] * 2, name
        for k, s in enumerate(splits):
            bc = tr.bc_embeddings(k, 0)
            assert bc["user"].shape == (s.num_users, DIMS[0]) and bc["item"].shape == (s.num_items, DIMS[0])
            assert tr.versions[k].score is not None
        # B_k are frozen after their version
        assert all(not p.requires_grad for b in tr.transforms for p in b.parameters())


def test_strategy_semantics(world, runs):
    _, _, graphs, _ = world
    m0 = runs["nobc"].versions[0].model
    # every strategy shares M_0
    for tr in runs.values():
        torch.testing.assert_close(tr.versions[0].embeddings["item"], runs["nobc"].versions[0].embeddings["item"])
    # fix-m0: M_0 applied to the new graph
    with torch.no_grad():
        xu, xi = m0(graphs[2])
    torch.testing.assert_close(runs["fix-m0"].bc_embeddings(2)["item"], xi)
    # nobc / joint-notrans: consumers read the first d_0 dims
    z = runs["nobc"].versions[2].embeddings["user"]
    torch.testing.assert_close(runs["nobc"].bc_embeddings(2)["user"], z[:, : DIMS[0]])
    # post-hoc strategies keep nobc's models and only add B_k
    for name in ("posthoc-sloss", "posthoc-mloss"):
        torch.testing.assert_close(runs[name].versions[2].embeddings["item"], runs["nobc"].versions[2].embeddings["item"])
    # finetune-m0 changed M_0's weights
    ft = runs["finetune-m0"].versions[1].model.state_dict()
    assert any(not torch.equal(v, m0.state_dict()[k]) for k, v in ft.items() if v.dtype.is_floating_point)


def _err_to_fix(runs, name, k):
    a, b = runs[name].bc_embeddings(k), runs["fix-m0"].bc_embeddings(k)
    return float(torch.cat([a["user"] - b["user"], a["item"] - b["item"]]).norm(dim=1).mean())


def test_alignment_beats_no_compatibility(runs):
    for k in (1, 2):
        nobc = _err_to_fix(runs, "nobc", k)
        for name in ("posthoc-sloss", "posthoc-mloss", "joint-notrans", "joint-sloss", "joint-mloss"):
            assert _err_to_fix(runs, name, k) < nobc, (name, k)
        # joint training logged a falling alignment loss
    hist = [h["align"] for h in runs["joint-mloss"].versions[1].history]
    assert hist[-1] < hist[0]


def test_deterministic_under_seed(world):
    a = _run(world, "joint-mloss", epochs=2)
    b = _run(world, "joint-mloss", epochs=2)
    for k in range(len(DIMS)):
        torch.testing.assert_close(a.versions[k].embeddings["item"], b.versions[k].embeddings["item"], rtol=0, atol=0)
    torch.testing.assert_close(a.transforms[-1].weight, b.transforms[-1].weight, rtol=0, atol=0)


@pytest.mark.parametrize("kind,opts", [("affine", {}), ("lowrank", {"rank": 4}), ("orthogonal", {}), ("mlp", {"hidden": 6})])
def test_transform_kinds_and_exported_chain(world, kind, opts):
    tr = _run(world, "joint-mloss", epochs=1, transform=kind, transform_options=opts)
    assert [b.kind for b in tr.transforms] == [kind, kind]
    z = tr.versions[2].embeddings["item"]
    ref = tr.to_version(z, 2, 0).numpy()
    from bc_fast.train import apply_layers_numpy

    arrays = [a for b in tr.chain(2, 0) for a in b.export_arrays()]
    np.testing.assert_allclose(apply_layers_numpy(arrays, z.numpy()), ref, rtol=1e-4, atol=1e-4)
    out = FusedTransform(tr.export_chain(2, 0)).apply(np.ascontiguousarray(z.numpy()))
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_general_api_with_any_model():
    """A plain MLP encoder with a regression loss: bc_fast adds B_k and the bookkeeping."""
    torch.manual_seed(0)
    x = torch.randn(64, 5)
    y = x @ torch.randn(5, 1)

    class Encoder(torch.nn.Module):
        def __init__(self, d):
            super().__init__()
            self.enc = torch.nn.Sequential(torch.nn.Linear(5, d), torch.nn.Tanh(), torch.nn.Linear(d, d))
            self.head = torch.nn.Linear(d, 1)

    def step_fn(model, idx):
        z = model.enc(x[idx])
        return torch.mean((model.head(z) - y[idx]) ** 2), [("row", idx, z)]

    def batches():
        return [torch.arange(0, 32), torch.arange(32, 64)]

    def embed_fn(model):
        return {"row": model.enc(x)}

    tr = BCTrainer("bc-aligner", lam=4.0, lr=1e-2, transform_lr=1e-2)
    for d in (4, 6, 8):
        tr.fit_version(Encoder(d), step_fn=step_fn, batches=batches, embed_fn=embed_fn, epochs=30)
    assert tr.dims == [4, 6, 8] and [b.d_in for b in tr.transforms] == [6, 8]
    z0 = tr.bc_embeddings(2)["row"]
    assert z0.shape == (64, 4)
    err_bc = float((z0 - tr.versions[0].embeddings["row"]).norm(dim=1).mean())
    err_raw = float((tr.versions[2].embeddings["row"][:, :4] - tr.versions[0].embeddings["row"]).norm(dim=1).mean())
    assert err_bc < err_raw


def test_trainer_errors(world):
    with pytest.raises(ValueError, match="unknown strategy"):
        BCTrainer("joint-whatever")
    with pytest.raises(ValueError, match="unknown transform kind"):
        BCTrainer(transform="spline")
    with pytest.raises(ValueError, match="lam"):
        BCTrainer(lam=-1.0)
    tr = BCTrainer("nobc")
    step_fn, batches, embed_fn, eval_fn = _fns(world, 0)
    with pytest.raises(ValueError, match="needs a model"):
        tr.fit_version(None, step_fn=step_fn, batches=batches, embed_fn=embed_fn, epochs=1)
    tr.fit_version(_model(world, 0), step_fn=step_fn, batches=batches, embed_fn=embed_fn, epochs=1)
    with pytest.raises(ValueError, match="not a trained version"):
        tr.chain(3, 0)
    with pytest.raises(ValueError, match="needs its backward transform"):
        tr.add_trained_version(_model(world, 0), embed_fn=embed_fn, transform=None)
    with pytest.raises(ValueError, match=r"shape \(n, 8\)"):
        tr.to_version(torch.zeros(2, 3), 0, 0)
    assert get_strategy("BC-Aligner").name == "joint-mloss"


def test_run_demo_end_to_end_on_synthetic_data(tmp_path):
    pytest.importorskip("matplotlib", reason="run_demo draws its figures with matplotlib")
    import json

    from bc_fast.experiments import run_demo

    data = synthetic_interactions(num_users=80, num_items=40, num_edges=2500, seed=2)
    res = run_demo(tmp_path, seed=0, log=None, data=data, dims=(8, 10, 12), epochs=2, batch_size=512,
                   consumer_epochs=2, consumer_seeds=(0,), posthoc_steps=20, degree_bins=4)
    assert {r["strategy"] for r in res["rows"]} == set(STRATEGY_NAMES)
    assert "joint-mloss" in res["table"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert "artifacts" not in saved and saved["config"]["dims"] == [8, 10, 12]
    assert (tmp_path / "degradation.png").stat().st_size > 1000 and (tmp_path / "per_version.png").exists()
    art = res["artifacts"]["joint-mloss"]
    assert art["dims"] == [8, 10, 12] and art["item"][2].shape[1] == 12
    # bc_fast.engine.operator is always importable (bc_fast imports it), so the exported layers must be there
    assert [layers[0].weight.shape for layers in art["layers"]] == [(8, 10), (10, 12)]
    fix = next(r for r in res["rows"] if r["strategy"] == "fix-m0")
    assert fix["unintended_change"] == 0.0 and fix["align_error"] == 0.0


@pytest.mark.parametrize("name", ["joint-mloss", "nobc"])
def test_save_registry_round_trips_the_chain(runs, tmp_path, name):
    from bc_fast.store.registry import Registry

    tr = runs[name]
    tr.save_registry(tmp_path / "reg")
    reg = Registry.open(tmp_path / "reg", verify=True)
    assert [v.dim for v in reg.versions()] == tr.dims
    assert reg.version(1).metadata["strategy"] == name
    latest = len(tr.versions) - 1
    z = tr.versions[latest].embeddings["item"]
    expected = tr.to_version(z, latest, 0).double().numpy()
    got = reg.operator(latest, 0).apply(np.ascontiguousarray(z.numpy(), dtype=np.float32))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="already|exists"):
        tr.save_registry(tmp_path / "reg")


def test_late_alignment_phase_weights_and_selection(world):
    """lam_late: the last late_frac of the epochs align with the new weight; selection stays in that phase."""
    epochs = 8
    late = _run(world, "joint-mloss", epochs=epochs, lam=0.0, lam_late=64.0, late_frac=0.25)
    for rec in late.versions[1:]:
        assert rec.selected_epoch in (7, 8)
        # lam = 0 before the late phase: the alignment loss is logged but does not train B_k
        early = [h["align"] for h in rec.history if h["epoch"] <= 6]
        assert len(set(round(a, 6) for a in early)) > 1  # M_k moves, B_k frozen by a zero gradient
    none = _run(world, "joint-mloss", epochs=epochs, lam=0.0)
    # the late phase is what aligns: its chain error to fix-m0's space is lower than lam = 0 throughout
    for k in (1, 2):
        with torch.no_grad():
            ref = _fns(world, k)[2](late.versions[0].model)["item"]  # M_0 on version k's graph (fix-m0)
        a, b = late.bc_embeddings(k, 0)["item"], none.bc_embeddings(k, 0)["item"]
        assert float((a - ref).norm(dim=1).mean()) < float((b - ref).norm(dim=1).mean())
    with pytest.raises(ValueError, match="lam_late"):
        BCTrainer(lam_late=-1.0)
    with pytest.raises(ValueError, match="late_frac"):
        BCTrainer(lam_late=4.0, late_frac=0.0)
