"""Where the trainer and the experiment run: ``device=`` ("auto", "cpu", "cuda", "cuda:N").

On the CPU the results must be the same, bit for bit, as before the option existed; the
references here are the old arithmetic written out (Python-float loss sums, the post-hoc fit
keeping the best state with Python floats and deep copies) and the explicit ``device="cpu"``.
The CUDA tests run where torch sees a GPU and say why they are skipped elsewhere.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="bc_fast.train needs torch (install the train extra)")

from bc_fast._util.torch_device import (
    check_device_spec,
    describe_device,
    resolve_device,
)
from bc_fast.data import synthetic_interactions
from bc_fast.experiments import ExperimentConfig, run_experiment
from bc_fast.experiments.checkpoint import SeedCheckpoints, _decode, _encode
from bc_fast.train import (
    BCTrainer,
    BPRSampler,
    TruncateTransform,
    alignment_loss,
    make_transform,
)

TINY = {"dims": (8, 10, 12), "epochs": 2, "eval_every": 1, "batch_size": 512, "consumer_epochs": 2,
        "consumer_seeds": (0,), "posthoc_steps": 10, "degree_bins": 4, "n_boot": 50, "seeds": 1,
        "strategies": ("fix-m0", "nobc", "posthoc-mloss", "joint-notrans", "joint-mloss"),
        "keep": ("joint-mloss", "nobc")}

needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(),
                                  reason="torch sees a CUDA GPU: 'auto' trains there, not on the CPU")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(),
                               reason="no CUDA GPU visible to torch: the CUDA run is not made here")


def _data():
    return synthetic_interactions(num_users=90, num_items=150, num_edges=3000, seed=4)


# ----------------------------------------------------------------------------- the device setting

@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "cuda:", "cuda:-1", "CPU", "mps", "", 3, None])
def test_bad_device_forms_name_the_allowed_ones(bad):
    with pytest.raises(ValueError, match=r"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got"):
        check_device_spec(bad)
    with pytest.raises(ValueError, match="device must be"):
        BCTrainer("nobc", device=bad)
    with pytest.raises(ValueError, match="device must be"):
        ExperimentConfig.quick(device=bad).validate()


def test_a_gpu_torch_does_not_see_is_refused():
    # past the last GPU (or no GPU at all): the message says what torch sees and the forms to use
    with pytest.raises(ValueError, match=r"device='cuda:99' but torch sees .*'cpu'.*'auto'"):
        resolve_device("cuda:99")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device='cuda' but torch sees no CUDA GPU"):
            BCTrainer("nobc", device="cuda")


def test_resolved_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert describe_device("cpu") == "cpu"
    assert BCTrainer("nobc", device="cpu").device == torch.device("cpu")


def test_bad_device_leaves_no_output_and_the_cli_says_why(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="run_demo draws its figures with matplotlib")
    from bc_fast.cli import main
    from bc_fast.experiments import run_demo

    out = tmp_path / "out"
    with pytest.raises(ValueError, match="device must be"):
        run_demo(out, log=None, data=_data(), device="gpu", **TINY)
    assert not out.exists()
    assert main(["experiment", "--device", "gpu", "--out", str(out)]) == 1
    assert "device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'" in capsys.readouterr().err
    assert not out.exists()
    assert main(["demo", "--text", "--device", "gpu", "--out", str(out)]) == 1  # refused before any model loads
    assert "device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'" in capsys.readouterr().err
    assert not out.exists()


def test_text_demo_device_goes_to_its_mlp_fits(tmp_path, monkeypatch):
    """`bc-fast demo --text --device D` trains the text scenario's MLP adapters on D (its only torch fits)."""
    from bc_fast import cli
    from bc_fast.experiments import text_demo

    seen = {}
    monkeypatch.setattr(text_demo, "run_text_demo", lambda out, **kw: seen.update(kw))
    assert cli.main(["demo", "--text", "--device", "cpu", "--quick", "--out", str(tmp_path / "t")]) == 0
    assert seen["fit_params"] == {"mlp": {"device": "cpu"}}
    assert cli.main(["demo", "--text", "--quick", "--out", str(tmp_path / "t")]) == 0
    assert seen["fit_params"] is None  # MLPAdapter's own default: auto


# ----------------------------------------------------------------------------- the CPU: as before

def _regression_problem():
    torch.manual_seed(0)
    x = torch.randn(96, 5)
    y = x @ torch.randn(5, 1)

    class Encoder(torch.nn.Module):
        def __init__(self, d):
            super().__init__()
            self.enc = torch.nn.Sequential(torch.nn.Linear(5, d), torch.nn.Tanh(), torch.nn.Linear(d, d))
            self.head = torch.nn.Linear(d, 1)

    return x, y, Encoder


def test_epoch_losses_are_the_python_float_sums_of_the_step_losses():
    """The loss summed on the device equals the old ``sum_task += float(loss)``, bit for bit."""
    x, y, Encoder = _regression_problem()
    recorded: list[list[float]] = []

    def step_fn(model, idx):
        z = model.enc(x[idx])
        loss = torch.mean((model.head(z) - y[idx]) ** 2)
        recorded[-1].append(float(loss.detach()))  # the test's own host sync, not the trainer's
        return loss, [("row", idx, z)]

    def batches():
        recorded.append([])
        return [torch.arange(s, min(s + 20, 96)) for s in range(0, 96, 20)]  # odd last batch (16 rows)

    def embed_fn(model):
        return {"row": model.enc(x)}

    tr = BCTrainer("joint-mloss", lam=4.0, lr=1e-2, transform_lr=1e-2, device="cpu")
    for d in (4, 6):
        recorded.clear()
        torch.manual_seed(d)
        rec = tr.fit_version(Encoder(d), step_fn=step_fn, batches=batches, embed_fn=embed_fn, epochs=3)
        assert [h["epoch"] for h in rec.history] == [1, 2, 3]
        for h, losses in zip(rec.history, recorded):
            want = 0.0
            for v in losses:
                want += v
            assert h["loss"] == want / len(losses)  # exact
        assert (rec.history[0]["align"] is None) == (d == 4)


def _old_fit_posthoc(transform, pairs, frozen, multi_step, steps, lr):
    """The post-hoc fit as it was written before ``device=``: Python floats and deep copies."""
    transform.train()
    opt = torch.optim.Adam(transform.parameters(), lr=lr)
    best, best_state = math.inf, None
    for _ in range(steps):
        loss = alignment_loss(pairs, transform, frozen, multi_step=multi_step)
        v = float(loss.detach())
        if v < best:
            best, best_state = v, copy.deepcopy(transform.state_dict())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if best_state is not None:
        transform.load_state_dict(best_state)
    return transform, best


@pytest.mark.parametrize("kind,opts", [("linear", {}), ("orthogonal", {"bias": True}), ("mlp", {"hidden": 5})])
def test_posthoc_fit_keeps_the_state_the_old_loop_kept(kind, opts):
    gen = torch.Generator().manual_seed(3)
    old, new = torch.randn(50, 4, generator=gen), torch.randn(50, 7, generator=gen)
    tr = BCTrainer("posthoc-sloss", transform=kind, transform_options=opts, posthoc_steps=60, posthoc_lr=5e-2,
                   device="cpu")
    torch.manual_seed(1)
    init = make_transform(kind, 7, 4, **opts)
    got = tr._fit_posthoc(copy.deepcopy(init), {"e": old}, {"e": new})
    want, best = _old_fit_posthoc(copy.deepcopy(init), [(old, new)], [], False, 60, 5e-2)
    assert tr._last_history[-1]["posthoc_align"] == best
    sd_got, sd_want = got.state_dict(), want.state_dict()
    assert list(sd_got) == list(sd_want)
    for k in sd_want:
        torch.testing.assert_close(sd_got[k], sd_want[k], rtol=0, atol=0)


def test_posthoc_fit_with_no_steps_keeps_the_initial_transform():
    tr = BCTrainer("posthoc-sloss", posthoc_steps=0, device="cpu")
    torch.manual_seed(0)
    init = make_transform("linear", 3, 2)
    got = tr._fit_posthoc(copy.deepcopy(init), {"e": torch.randn(6, 2)}, {"e": torch.randn(6, 3)})
    torch.testing.assert_close(got.weight, init.weight, rtol=0, atol=0)
    assert tr._last_history[-1]["posthoc_align"] == math.inf


def test_sampler_triples_do_not_depend_on_the_device_argument():
    rng = np.random.default_rng(0)
    user, item = rng.integers(0, 20, 300), rng.integers(0, 30, 300)
    a = list(BPRSampler(user, item, 30, 64, np.random.default_rng(5)).epoch())
    b = list(BPRSampler(user, item, 30, 64, np.random.default_rng(5), device="cpu").epoch())
    assert [t[0].shape[0] for t in a] == [64, 64, 64, 64, 44]
    for ta, tb in zip(a, b):
        for u, v in zip(ta, tb):
            assert u.dtype == torch.int64 and torch.equal(u, v)


def test_truncation_matrix_follows_the_module_and_is_not_saved():
    t = TruncateTransform(5, 3)
    assert dict(t.state_dict()) == {}
    np.testing.assert_array_equal(t.linear_part().numpy(), np.eye(3, 5, dtype=np.float32))


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("ckpt_cpu")
    torch.set_num_threads(1)
    res = run_experiment(ExperimentConfig.quick(**TINY, device="cpu"), data=_data(), log=None, checkpoint_dir=ckpt)
    return ckpt, res


def _assert_same_run(a: dict, b: dict) -> None:
    assert a["rows"] == b["rows"]
    assert json.dumps(a["raw"], default=lambda v: v.tolist()) == json.dumps(b["raw"], default=lambda v: v.tolist())
    for name in TINY["keep"]:
        for what in ("user", "item"):
            for x, y in zip(a["artifacts"][name][what], b["artifacts"][name][what]):
                np.testing.assert_array_equal(x, y)
        for ca, cb in zip(a["artifacts"][name]["layers"], b["artifacts"][name]["layers"]):
            for la, lb in zip(ca, cb):
                np.testing.assert_array_equal(la.weight, lb.weight)


@needs_no_gpu
def test_auto_is_the_cpu_bit_for_bit_without_a_gpu(cpu_run):
    _, cpu = cpu_run
    auto = run_experiment(ExperimentConfig.quick(**TINY), data=_data(), log=None)
    assert auto["config"]["device"] == "auto" and auto["device"] == cpu["device"] == "cpu"
    _assert_same_run(auto, cpu)


def test_checkpoints_are_host_data_and_record_the_device(cpu_run):
    ckpt, res = cpu_run
    doc = json.loads((ckpt / "seed_0.json").read_text())
    assert doc["device"] == res["device"] == "cpu"
    assert "device" not in doc["settings"]  # like threads: where it ran does not change the method
    _, _, art = SeedCheckpoints(ckpt, ExperimentConfig.quick(**TINY), _data()).load(0, need_artifacts=True)
    assert isinstance(art["joint-mloss"]["item"][2], np.ndarray)
    # a tensor that reaches a checkpoint is written as a host array
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    back = _decode(json.loads(json.dumps(_encode({"t": t}))))["t"]
    assert isinstance(back, np.ndarray) and back.dtype == np.float32
    np.testing.assert_array_equal(back, t.numpy())


# ----------------------------------------------------------------------------- CUDA, where there is one

@needs_gpu
def test_cuda_losses_match_the_cpu_within_float_tolerance():
    x, y, Encoder = _regression_problem()

    def run(device):
        dev = torch.device(device)
        xd, yd = x.to(dev), y.to(dev)

        def step_fn(model, idx):
            z = model.enc(xd[idx])
            return torch.mean((model.head(z) - yd[idx]) ** 2), [("row", idx, z)]

        tr = BCTrainer("joint-mloss", lam=4.0, lr=1e-2, transform_lr=1e-2, device=device)
        for d in (4, 6, 8):
            torch.manual_seed(d)
            tr.fit_version(Encoder(d), step_fn=step_fn, embed_fn=lambda m: {"row": m.enc(xd)}, epochs=3,
                           batches=lambda: [torch.arange(s, s + 32, device=dev) for s in (0, 32, 64)])
        return tr

    cpu, gpu = run("cpu"), run("cuda")
    assert all(r.model.head.weight.is_cuda for r in gpu.versions) and gpu.transforms[0].weight.is_cuda
    for rc, rg in zip(cpu.versions, gpu.versions):
        for hc, hg in zip(rc.history, rg.history):
            assert hg["loss"] == pytest.approx(hc["loss"], rel=1e-3, abs=1e-5)
            if hc["align"] is not None:
                assert hg["align"] == pytest.approx(hc["align"], rel=1e-3, abs=1e-5)
    np.testing.assert_allclose(gpu.bc_embeddings(2)["row"].cpu().numpy(), cpu.bc_embeddings(2)["row"].numpy(),
                               rtol=1e-3, atol=1e-4)


@needs_gpu
def test_the_cuda_step_loop_never_waits_for_the_device():
    """Between two batches (step_fn, alignment, backward, Adam, loss sums) nothing syncs with the host."""
    x, y, Encoder = _regression_problem()
    xd, yd = x.cuda(), y.cuda()

    def step_fn(model, idx):
        z = model.enc(xd[idx])
        return torch.mean((model.head(z) - yd[idx]) ** 2), [("row", idx, z)]

    def batches():
        for s in (0, 32, 64):
            torch.cuda.set_sync_debug_mode("error")
            try:
                yield torch.arange(s, s + 32, device="cuda")
            finally:
                torch.cuda.set_sync_debug_mode("default")

    tr = BCTrainer("joint-mloss", lam=4.0, device="cuda")
    for d in (4, 6):
        torch.manual_seed(d)
        tr.fit_version(Encoder(d), step_fn=step_fn, batches=batches, embed_fn=lambda m: {"row": m.enc(xd)}, epochs=2)
    assert len(tr.versions[1].history) == 2


@needs_gpu
def test_a_cuda_experiment_checkpoints_host_data(tmp_path, cpu_run):
    _, cpu = cpu_run
    res = run_experiment(ExperimentConfig.quick(**TINY, device="cuda"), data=_data(), log=None, checkpoint_dir=tmp_path)
    assert res["device"].startswith("cuda:")
    doc = json.loads((tmp_path / "seed_0.json").read_text())
    assert doc["device"] == res["device"]
    with np.load(tmp_path / "seed_0_artifacts.npz", allow_pickle=False) as z:
        assert all(z[k].dtype.kind in "fu" for k in z.files)
    _, _, art = SeedCheckpoints(tmp_path, ExperimentConfig.quick(**TINY), _data()).load(0, need_artifacts=True)
    for k in range(3):
        a, b = art["joint-mloss"]["item"][k], cpu["artifacts"]["joint-mloss"]["item"][k]
        assert isinstance(a, np.ndarray) and a.shape == b.shape and np.isfinite(a).all()
    assert {r["strategy"] for r in res["rows"]} == set(TINY["strategies"])
    assert all(np.isfinite(r["align_error"]) for r in res["rows"])
