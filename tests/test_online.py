"""Online distillation: DML, OKDDip, rocket launching, OKDHP (dense multi-branch) and codistillation.

Each loss against an independent computation (explicit loops, numbers by hand), where gradients
flow and where they are blocked (DML's detached peers, rocket launching's gradient block), the
order of DML's updates, short runs on digits that lower the training loss, and clear errors for
bad arguments before any training.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from _interrupt import Interrupted, interrupt_after
from _views import CNN_PAIRS
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import distill
from distill import functional as DF
from distill.batch import Batch
from distill.data import get_dataset
from distill.data.loader import InMemoryLoader
from distill.methods import (
    Codistillation,
    RocketBoosterCE,
    RocketHint,
    create_method,
    method_info,
)
from distill.models import create
from distill.strategies.online import (
    MultiBranchNet,
    PeerAttention,
    RocketNet,
    _Updater,
    dml_step,
    fit_dml,
    fit_okddip,
    fit_okdhp,
    fit_rocket,
)
from distill.strategies.registry import strategy_info

SETTINGS = settings(max_examples=25, deadline=None)
seeds = st.integers(0, 10_000)


def rand(seed: int, *shape: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


# ---------------------------------------------------------------------------- loop references


def ref_softmax(row: list[float], T: float = 1.0) -> list[float]:
    m = max(v / T for v in row)
    e = [math.exp(v / T - m) for v in row]
    return [v / sum(e) for v in e]


def ref_kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def ref_ce(z: torch.Tensor, y: torch.Tensor) -> float:
    rows = z.tolist()
    return sum(-math.log(ref_softmax(r)[int(c)]) for r, c in zip(rows, y)) / len(rows)


def ref_kd(s: torch.Tensor, t: torch.Tensor, T: float) -> float:
    return T * T * sum(ref_kl(ref_softmax(tr, T), ref_softmax(sr, T)) for sr, tr in zip(s.tolist(), t.tolist())) / len(s)


# ---------------------------------------------------------------------------- DML


@pytest.mark.parametrize("T", [1.0, 2.5])
def test_dml_loss_matches_loops(T):
    z, peers, y = rand(0, 5, 4), [rand(1, 5, 4), rand(2, 5, 4)], torch.tensor([0, 3, 1, 2, 3])
    expected = ref_ce(z, y) + (ref_kd(z, peers[0], T) + ref_kd(z, peers[1], T)) / 2
    assert float(DF.dml_loss(z, peers, y, T)) == pytest.approx(expected, rel=1e-9)
    assert float(DF.dml_loss(z, torch.stack(peers), y, T)) == pytest.approx(expected, rel=1e-9)


@SETTINGS
@given(seeds)
def test_dml_loss_properties(seed):
    z, y = rand(seed, 6, 5), torch.arange(6) % 5
    ce = float(DF.cross_entropy(z, y))
    assert float(DF.dml_loss(z, [z.clone()], y)) == pytest.approx(ce, abs=1e-9)  # a peer that agrees adds nothing
    assert float(DF.dml_loss(z, [rand(seed + 1, 6, 5)], y)) >= ce - 1e-12


def _linear_pair(seed: int = 0) -> list[nn.Module]:
    torch.manual_seed(seed)
    return [nn.Linear(3, 4).double(), nn.Linear(3, 4).double()]


def _sgd_updater(models, lr):
    opts = [torch.optim.SGD(m.parameters(), lr=lr) for m in models]
    return _Updater(opts, [list(m.parameters()) for m in models], None)


def _manual_step(model: nn.Module, x, y, peer_probs, lr):
    """One plain SGD step on CE + KL(peer || model), the KL written as sum p (log p - log q)."""
    w, b = model.weight.detach().clone().requires_grad_(True), model.bias.detach().clone().requires_grad_(True)
    z = x @ w.T + b
    log_q = z - torch.logsumexp(z, dim=1, keepdim=True)
    ce = -log_q[torch.arange(len(y)), y].mean()
    kl = (peer_probs * (peer_probs.log() - log_q)).sum(1).mean()
    (ce + kl).backward()
    with torch.no_grad():
        return w - lr * w.grad, b - lr * b.grad


def test_dml_sequential_update_uses_the_updated_peer():
    """Algorithm 1 of the paper: net 2's step sees net 1's prediction after net 1's step."""
    models, lr = _linear_pair(), 0.5
    x, y = rand(3, 6, 3), torch.tensor([0, 1, 2, 3, 0, 1])
    ref = copy.deepcopy(models)
    with torch.no_grad():
        p1_old, p2_old = F.softmax(ref[0](x), 1), F.softmax(ref[1](x), 1)
    w1, b1 = _manual_step(ref[0], x, y, p2_old, lr)
    p1_new = F.softmax(x @ w1.T + b1, 1)
    w2, b2 = _manual_step(ref[1], x, y, p1_new, lr)
    w2_stale, _ = _manual_step(ref[1], x, y, p1_old, lr)

    dml_step(models, Batch(x, y), _sgd_updater(models, lr), update="sequential")
    torch.testing.assert_close(models[0].weight, w1)
    torch.testing.assert_close(models[0].bias, b1)
    torch.testing.assert_close(models[1].weight, w2)
    torch.testing.assert_close(models[1].bias, b2)
    assert not torch.allclose(w2, w2_stale)  # the order matters on this example

    simultaneous = _linear_pair()
    dml_step(simultaneous, Batch(x, y), _sgd_updater(simultaneous, lr), update="simultaneous")
    torch.testing.assert_close(simultaneous[1].weight, w2_stale)  # both from the predictions before the step


class _RecordingUpdater:
    """Backpropagates each loss and records which models received a gradient; applies no step."""

    def __init__(self, models):
        self.models, self.seen = models, []

    def update(self, i, loss, name):
        for m in self.models:
            m.zero_grad(set_to_none=True)
        loss.backward()
        self.seen.append([any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
                          for m in self.models])


def test_dml_peers_are_detached_and_batchnorm_counts_each_batch_once():
    models = [create("cnn", widths=(4, 8, 8)), create("cnn", widths=(4, 8, 8)), create("mlp_digits_student")]
    x, y = torch.randn(6, 1, 8, 8), torch.arange(6) % 10
    rec = _RecordingUpdater(models)
    losses = dml_step(models, Batch(x, y), rec, update="sequential")
    assert rec.seen == [[True, False, False], [False, True, False], [False, False, True]]
    assert set(losses) == {"net0", "net1", "net2"}
    # the refreshed predictions do not count the batch a second time in BatchNorm statistics
    assert all(int(m.num_batches_tracked) == 1 for m in models[0].modules() if isinstance(m, nn.BatchNorm2d))


# ---------------------------------------------------------------------------- OKDDip


def test_okddip_attention_matches_loops():
    q, k = rand(4, 2, 3, 5), rand(5, 2, 3, 5)
    alpha = DF.okddip_attention(q, k)
    for b in range(2):
        for a in range(3):
            e = [math.exp(float(q[b, a] @ k[b, c])) for c in range(3)]
            for c in range(3):
                assert float(alpha[b, a, c]) == pytest.approx(e[c] / sum(e), rel=1e-9)


def _ref_okddip(z, lead, alpha, y, T, aggregate):
    m, bsz, _ = z.shape
    ce = sum(ref_ce(z[a], y) for a in range(m)) + ref_ce(lead, y)
    peer_kd = 0.0
    for a in range(m):
        for b in range(bsz):
            if aggregate == "logits":
                mixed = [sum(float(alpha[b, a, c]) * float(z[c, b, k]) for c in range(m)) for k in range(z.shape[2])]
                t = ref_softmax(mixed, T)
            else:
                probs = [ref_softmax(z[c, b].tolist(), T) for c in range(m)]
                t = [sum(float(alpha[b, a, c]) * probs[c][k] for c in range(m)) for k in range(z.shape[2])]
            peer_kd += ref_kl(t, ref_softmax(z[a, b].tolist(), T)) / bsz
    leader_kd = 0.0
    for b in range(bsz):
        if aggregate == "logits":
            t = ref_softmax([sum(float(z[c, b, k]) for c in range(m)) / m for k in range(z.shape[2])], T)
        else:
            t = [sum(ref_softmax(z[c, b].tolist(), T)[k] for c in range(m)) / m for k in range(z.shape[2])]
        leader_kd += ref_kl(t, ref_softmax(lead[b].tolist(), T)) / bsz
    return ce, T * T * peer_kd, T * T * leader_kd


@pytest.mark.parametrize("aggregate", ["logits", "probs"])
def test_okddip_parts_match_loops(aggregate):
    z, lead, y = rand(6, 3, 4, 5), rand(7, 4, 5), torch.tensor([0, 4, 2, 1])
    alpha = torch.softmax(rand(8, 4, 3, 3), dim=-1)
    parts = DF.okddip_parts(z, lead, alpha, y, T=3.0, aggregate=aggregate)
    ce, peer_kd, leader_kd = _ref_okddip(z, lead, alpha, y, 3.0, aggregate)
    assert float(parts["ce"]) == pytest.approx(ce, rel=1e-9)
    assert float(parts["peer_kd"]) == pytest.approx(peer_kd, rel=1e-9)
    assert float(parts["leader_kd"]) == pytest.approx(leader_kd, rel=1e-9)
    total = DF.okddip_loss(z, lead, alpha, y, T=3.0, peer_weight=0.5, leader_weight=2.0, aggregate=aggregate)
    assert float(total) == pytest.approx(ce + 0.5 * peer_kd + 2.0 * leader_kd, rel=1e-9)


@SETTINGS
@given(seeds)
def test_okddip_properties(seed):
    q = rand(seed, 3, 4, 2)
    alpha = DF.okddip_attention(q, rand(seed + 1, 3, 4, 2))
    torch.testing.assert_close(alpha.sum(-1), torch.ones(3, 4, dtype=torch.float64))
    z = rand(seed + 2, 1, 3, 6).expand(4, 3, 6)  # identical peers: every target is their prediction
    parts = DF.okddip_parts(z, z[0], alpha, torch.arange(3), aggregate="probs")
    assert float(parts["peer_kd"]) == pytest.approx(0.0, abs=1e-9)
    assert float(parts["leader_kd"]) == pytest.approx(0.0, abs=1e-9)


def test_okddip_gradients_reach_attention_and_peers_through_the_targets():
    torch.manual_seed(0)
    att = PeerAttention(16, factor=8).double()
    h = rand(9, 5, 3, 16)
    z = rand(10, 3, 5, 4).requires_grad_(True)
    lead = rand(11, 5, 4).requires_grad_(True)
    y = torch.tensor([0, 1, 2, 3, 0])
    parts = DF.okddip_parts(z, lead, att(h), y)
    parts["ce"].backward(retain_graph=True)
    assert att.query.weight.grad is None  # the attention learns through the distillation only
    parts["peer_kd"].backward(retain_graph=True)
    assert att.query.weight.grad.abs().sum() > 0 and att.key.weight.grad.abs().sum() > 0
    z.grad = None
    parts["leader_kd"].backward()
    assert lead.grad.abs().sum() > 0 and z.grad.abs().sum() > 0  # not detached, as in the reference code


# ---------------------------------------------------------------------------- rocket launching


def test_rocket_hint_by_hand():
    light = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    booster = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    assert float(DF.rocket_hint_loss(light, booster)) == pytest.approx((1 + 4 + 1 + 1) / 2)
    y = torch.tensor([1, 0])
    expected = ref_ce(light, y) + ref_ce(booster, y) + 0.03 * 3.5
    assert float(DF.rocket_loss(light, booster, y)) == pytest.approx(expected, rel=1e-6)


def _rocket(kind: str = "cnn") -> RocketNet:
    if kind == "cnn":
        trunk = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        light = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 10))
        booster = nn.Sequential(nn.Conv2d(6, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, 12, 3, padding=1),
                                nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 10))
    else:
        trunk = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU())
        light = nn.Linear(32, 10)
        booster = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    return RocketNet(trunk, light, booster)


def _grad_sum(module: nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


@pytest.mark.parametrize("grad_block", [True, False])
def test_rocket_hint_gradient_block(grad_block):
    torch.manual_seed(0)
    net = _rocket()
    d = distill.Distiller(net, None, losses={"rocket_hint": RocketHint(grad_block=grad_block)})
    out = d(Batch(torch.randn(4, 1, 8, 8), torch.arange(4)))
    out.total.backward()
    assert _grad_sum(net.light) > 0 and _grad_sum(net.trunk) > 0
    assert (_grad_sum(net.booster) == 0) is grad_block  # the booster is untouched by the hint only with the block


def test_rocket_methods_equal_the_paper_objective():
    torch.manual_seed(1)
    net = _rocket("mlp")
    d = distill.Distiller(net, None, losses={"ce": 1.0, "rocket_booster_ce": 1.0, "rocket_hint": 0.03})
    x, y = torch.randn(5, 1, 8, 8), torch.tensor([1, 2, 3, 4, 5])
    out = d(Batch(x, y))
    h = net.trunk(x)
    torch.testing.assert_close(out.total, DF.rocket_loss(net.light(h), net.booster(h), y))
    assert isinstance(d.predictor(), nn.Sequential)  # the deployed model is the light net alone
    torch.testing.assert_close(d.predictor()(x), net(x))


# ---------------------------------------------------------------------------- OKDHP


def test_okdhp_ensemble_and_heatmap_losses_match_loops():
    maps, w = rand(12, 3, 2, 2, 3, 3), torch.softmax(rand(13, 2, 3, 2), dim=1)
    ens = DF.okdhp_ensemble(maps, w)
    for b in range(2):
        for c in range(2):
            expected = sum(float(w[b, m, c]) * maps[m, b, c] for m in range(3))
            torch.testing.assert_close(ens[b, c], expected)
    pred, gt = rand(14, 2, 2, 3, 3), rand(15, 2, 2, 3, 3)
    vis = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    mse = sum(float(vis[b, c]) ** 2 * float((pred[b, c, i, j] - gt[b, c, i, j]) ** 2)
              for b in range(2) for c in range(2) for i in range(3) for j in range(3))
    assert float(DF.heatmap_mse_loss(pred, gt, vis)) == pytest.approx(0.5 * mse / 36, rel=1e-9)
    kl = sum(ref_kl(ref_softmax(gt[b, c].flatten().tolist()), ref_softmax(pred[b, c].flatten().tolist()))
             for b in range(2) for c in range(2))
    assert float(DF.heatmap_kl_loss(pred, gt)) == pytest.approx(kl / (2 * 9), rel=1e-9)
    branches = torch.stack([pred, gt])
    total = DF.okdhp_loss(branches, ens[:, :, :, :], gt, kd_weight=5.0, ens_weight=6.0)
    expected = sum(float(DF.heatmap_mse_loss(h, gt)) + 5.0 * float(DF.heatmap_kl_loss(h, ens)) for h in branches) \
        + 6.0 * float(DF.heatmap_mse_loss(ens, gt))
    assert float(total) == pytest.approx(expected, rel=1e-9)


@SETTINGS
@given(seeds, st.floats(-5, 5))
def test_heatmap_kl_properties(seed, shift):
    a, b = rand(seed, 2, 3, 4, 4), rand(seed + 1, 2, 3, 4, 4)
    assert float(DF.heatmap_kl_loss(a, a)) == pytest.approx(0.0, abs=1e-12)
    assert float(DF.heatmap_kl_loss(a, b)) >= 0
    # a spatial softmax per channel: adding a constant to a map changes nothing
    assert float(DF.heatmap_kl_loss(a + shift, b)) == pytest.approx(float(DF.heatmap_kl_loss(a, b)), rel=1e-9)


def _dense_net() -> MultiBranchNet:
    trunk = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    branches = [nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 2, 1)) for _ in range(3)]
    return MultiBranchNet(trunk, branches, in_channels=8, out_channels=2, mid_channels=8)


def _dense_data(n: int = 96, seed: int = 0):
    """A tiny dense task: two target maps per image, a fixed smoothing of the image and its square."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    blur = F.avg_pool2d(x, 3, stride=1, padding=1)
    return x, torch.cat([blur, blur.pow(2)], dim=1)


def test_okdhp_distillation_reaches_branches_and_the_aggregation_unit():
    torch.manual_seed(0)
    net = _dense_net()
    x, _ = _dense_data(8)
    maps, ens = net(x)
    assert maps.shape == (3, 8, 2, 8, 8) and ens.shape == (8, 2, 8, 8)
    soft = sum(DF.heatmap_kl_loss(h, ens) for h in maps)
    soft.backward()
    assert _grad_sum(net.fau) > 0 and all(_grad_sum(b) > 0 for b in net.branches)


# ---------------------------------------------------------------------------- codistillation


def test_codistillation_matches_loops_and_method():
    z, peers, y = rand(16, 4, 5), rand(17, 3, 4, 5), torch.tensor([0, 1, 2, 4])
    T = 2.0
    kl = 0.0
    for b in range(4):
        probs = [ref_softmax(peers[j, b].tolist(), T) for j in range(3)]
        mean = [sum(p[k] for p in probs) / 3 for k in range(5)]
        kl += ref_kl(mean, ref_softmax(z[b].tolist(), T)) / 4
    assert float(DF.codistillation_kl(z, peers, T)) == pytest.approx(T * T * kl, rel=1e-9)
    assert float(DF.codistillation_loss(z, y, peers, weight=0.5, T=T)) == pytest.approx(
        ref_ce(z, y) + 0.5 * T * T * kl, rel=1e-9)
    method = Codistillation(T=T)
    student = {"logits": z.clone().requires_grad_(True)}
    view = {"logits": torch.zeros(4, 5, dtype=torch.float64), "peer_logits": peers.clone().requires_grad_(True)}
    loss = method(student, view, Batch(torch.zeros(4, 1), y))
    assert float(loss.detach()) == pytest.approx(T * T * kl, rel=1e-9)
    loss.backward()
    assert student["logits"].grad.abs().sum() > 0 and view["peer_logits"].grad is None  # stale peers: constants


def test_codistillation_burn_in():
    method = create_method("codistillation", burn_in_steps=2)
    z = rand(18, 3, 4).requires_grad_(True)
    view = {"logits": rand(19, 3, 4)}
    batch = Batch(torch.zeros(3, 1))
    for _ in range(2):
        assert float(method({"logits": z}, view, batch).detach()) == 0.0
        method.on_step_end()
    assert float(method({"logits": z}, view, batch).detach()) > 0
    assert int(method.state_dict()["steps"]) == 2  # checkpointed with the method


@pytest.mark.parametrize("pair", sorted(CNN_PAIRS))
def test_codistillation_end_to_end(pair):
    """A stale copy of a peer (a frozen model) as the teacher source; the peer stays untouched."""
    torch.manual_seed(0)
    student, peer = CNN_PAIRS[pair]()
    before = copy.deepcopy(peer.state_dict())
    d = distill.Distiller(student, peer, losses={"ce": 1.0, "codistillation": 1.0})
    x, y = torch.randn(16, 1, 8, 8), torch.arange(16) % 10
    result = distill.fit(d, InMemoryLoader(x, y, 8, seed=0), epochs=2, lr=0.05, progress=False)
    assert all(math.isfinite(r["train_loss"]) for r in result.history)
    for k, v in peer.state_dict().items():
        torch.testing.assert_close(v, before[k])


# ---------------------------------------------------------------------------- short runs on digits


@pytest.fixture(scope="module")
def digits():
    train, val = get_dataset("digits", split="train"), get_dataset("digits", split="val")
    x, y = train.inputs[:384], train.targets[:384]
    return (lambda: InMemoryLoader(x, y, 64, shuffle=True, seed=0)), val.loader(128, shuffle=False)


def test_fit_dml_lowers_the_loss_on_digits(digits, tmp_path):
    train, val = digits
    result = fit_dml(lambda: create("cnn", widths=(4, 8, 8)), train(), val, epochs=3, lr=0.1, progress=False,
                     run_dir=tmp_path)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert set(result.members) == {"net0", "net1"} and result.delivered == "net0"
    assert result.last_acc == result.members["net0"].last_acc == result.history[-1]["val_net0_acc"]
    assert not torch.equal(result.models["net0"].fc.weight, result.models["net1"].fc.weight)
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 3
    assert (tmp_path / "checkpoints" / "last.pt").exists() and (tmp_path / "checkpoints" / "best.pt").exists()


def test_fit_dml_heterogeneous_cohort_simultaneous(digits):
    train, _ = digits
    cohort = [create("cnn_digits_student"), create("mlp_digits_student"), create("cnn", widths=(4, 8, 8))]
    result = fit_dml(cohort, train(), None, epochs=2, lr=0.05, update="simultaneous", progress=False)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert set(result.history[0]) >= {"train_net0", "train_net1", "train_net2"}


def test_fit_okddip_lowers_the_loss_on_digits(digits):
    train, val = digits
    result = fit_okddip(lambda: create("cnn", widths=(4, 8, 8)), train(), val, epochs=3, lr=0.1,
                        rampup_epochs=0, progress=False)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.delivered == "leader" and set(result.members) == {"peer0", "peer1", "peer2", "leader"}
    assert {"train_ce", "train_peer_kd", "train_leader_kd"} <= set(result.history[0])
    assert "attention" in result.models and result.best_acc is not None


@pytest.mark.parametrize("kind", ["cnn", "mlp"])
def test_fit_rocket_lowers_the_loss_on_digits(digits, kind):
    train, val = digits
    torch.manual_seed(0)
    net = _rocket(kind)
    result = fit_rocket(net, train(), val, epochs=3, lr=0.1, progress=False)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert {"train_ce", "train_rocket_booster_ce", "train_rocket_hint"} <= set(result.history[0])
    assert result.booster_acc is not None and result.last_acc is not None
    assert not net.booster_logits._forward_hooks  # the returned model runs hook-free


def test_fit_okdhp_lowers_the_loss_on_a_dense_task():
    torch.manual_seed(0)
    x, maps = _dense_data()
    net = _dense_net()
    result = fit_okdhp(net, InMemoryLoader(x, maps, 32, seed=0), InMemoryLoader(x[:32], maps[:32], 32, shuffle=False),
                       epochs=4, optimizer="adam", lr=1e-2, rampup_epochs=2, progress=False)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.best_acc is None and result.best_score is not None
    assert set(result.members) == {"branch0", "branch1", "branch2", "ensemble"}
    assert result.history[-1]["val_branch0_mse"] == result.last_score


# ---------------------------------------------------------------------------- errors before training


class _Untouchable:
    """A loader that fails the test if anything iterates it."""

    def __iter__(self):
        raise AssertionError("training started")

    def __len__(self):
        return 1


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda L: fit_dml(create("cnn_digits_student"), L, epochs=1), TypeError, "list of nn.Modules"),
        (lambda L: fit_dml([create("cnn_digits_student")], L, epochs=1), ValueError, "at least 2"),
        (lambda L: fit_dml(lambda: create("cnn_digits_student"), L, epochs=1, num_models=1), ValueError, "num_models"),
        (lambda L: fit_dml(lambda: create("cnn_digits_student"), L, epochs=1, T=0), ValueError, "T must"),
        (lambda L: fit_dml(lambda: create("cnn_digits_student"), L, epochs=1, update="async"), ValueError, "update"),
        (lambda L: fit_dml(lambda: create("cnn_digits_student"), L, epochs=1, teacher=nn.Linear(2, 2)), ValueError,
         "teacher-free"),
        (lambda L: fit_dml(lambda: create("cnn_digits_student"), L, epochs=1, lr_decay=3), TypeError, "lr_decay"),
        (lambda L: fit_dml(lambda: create("cnn_digits_student"), L, epochs=1, resume=True), ValueError,
         "resume=True needs run_dir"),
        (lambda L: fit_dml(lambda: create("cnn_digits_student"), L, epochs=1, amp="bf16"), ValueError, "float32"),
        (lambda L: fit_dml(lambda: create("cnn_digits_student"), L, epochs=0), ValueError, "epochs"),
        (lambda L: fit_okddip(lambda: create("cnn_digits_student"), L, epochs=1, num_models=2), ValueError,
         "num_models"),
        (lambda L: fit_okddip(lambda: create("cnn_digits_student"), L, epochs=1, aggregate="max"), ValueError,
         "aggregate"),
        (lambda L: fit_okddip(lambda: create("cnn_digits_student"), L, epochs=1, T=-1), ValueError, "T must"),
        (lambda L: fit_rocket(create("cnn_digits_student"), L, epochs=1), TypeError, "RocketNet"),
        (lambda L: fit_rocket(_rocket(), L, epochs=1, hint_weight=-1), ValueError, "hint_weight"),
        (lambda L: fit_okdhp(create("cnn_digits_student"), L, epochs=1), TypeError, "MultiBranchNet"),
        (lambda L: fit_okdhp(_dense_net(), L, epochs=1, kd="l1"), ValueError, "kd must"),
    ],
)
def test_bad_arguments_fail_before_training(call, error, match):
    with pytest.raises(error, match=match):
        call(_Untouchable())


def test_okddip_embeddings_of_different_sizes_are_refused():
    x, y = torch.randn(8, 1, 8, 8), torch.arange(8)
    models = [create("cnn", widths=(4, 8, 8)), create("cnn", widths=(4, 8, 16)), create("cnn", widths=(4, 8, 8))]
    with pytest.raises(ValueError, match="differ in size"):
        fit_okddip(models, InMemoryLoader(x, y, 8), epochs=1, progress=False)


def test_dml_sequential_refuses_shared_parameters():
    shared = nn.Linear(64, 10)
    models = [nn.Sequential(nn.Flatten(), shared), nn.Sequential(nn.Flatten(), shared)]
    with pytest.raises(ValueError, match="share parameters"):
        fit_dml(models, _Untouchable(), epochs=1)


def test_dense_targets_of_the_wrong_shape_are_named():
    x = torch.randn(8, 1, 8, 8)
    with pytest.raises(ValueError, match="target maps shaped like"):
        fit_okdhp(_dense_net(), InMemoryLoader(x, torch.arange(8), 8), epochs=1, progress=False)


def test_functional_shape_errors():
    with pytest.raises(ValueError, match="disagree"):
        DF.dml_loss(torch.randn(4, 3), [torch.randn(4, 5)], torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one peer"):
        DF.codistillation_kl(torch.randn(4, 3), [])
    with pytest.raises(ValueError, match="attention"):
        DF.okddip_peer_targets(torch.randn(3, 4, 5), torch.randn(4, 2, 2))
    with pytest.raises(ValueError, match="same shape"):
        DF.rocket_hint_loss(torch.randn(4, 3), torch.randn(4, 5))
    with pytest.raises(ValueError, match=r"\(B, C\)"):
        DF.heatmap_mse_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.ones(2, 4))
    with pytest.raises(ValueError, match="burn_in_steps"):
        Codistillation(burn_in_steps=-1)
    with pytest.raises(ValueError, match="booster_tap"):
        RocketBoosterCE(booster_tap="")


def test_registry_entries():
    for name, arxiv in [("dml", "1706.00384"), ("okddip", "1912.00350"), ("rocket_launching", "1708.04106"),
                        ("okdhp", "2108.02092")]:
        info = strategy_info(name)
        assert info.family == "online" and info.paper.arxiv == arxiv
    for name in ("rocket_hint", "rocket_booster_ce", "codistillation"):
        assert method_info(name).family == "online"
    assert method_info("rocket_hint").defaults["grad_block"] is True


@pytest.mark.parametrize("strategy", ["dml", "okddip"])
def test_cohort_resumes_where_the_interrupted_run_stopped(strategy, tmp_path):
    """A cohort run stopped after its second epoch and resumed from last.pt ends with the weights,
    history and per-member best epochs of the uninterrupted run."""
    train = get_dataset("digits", split="train")
    x, y = train.inputs[:96], train.targets[:96]
    fn, extra = {"dml": (fit_dml, {"num_models": 2}), "okddip": (fit_okddip, {"num_models": 3})}[strategy]

    def run(run_dir, resume=False, stop_after=None):
        return fn(lambda: create("cnn_digits_student"), InMemoryLoader(x, y, 32, seed=1),
                  InMemoryLoader(x[:32], y[:32], 32, shuffle=False), epochs=3, run_dir=run_dir, resume=resume,
                  progress=False, lr=0.05, on_epoch_end=interrupt_after(stop_after), **extra)

    whole = run(tmp_path / "whole")
    with pytest.raises(Interrupted):
        run(tmp_path / "cut", stop_after=2)
    resumed = run(tmp_path / "cut", resume=True)
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in whole.history]
    for name, model in whole.models.items():
        for a, b in zip(model.state_dict().values(), resumed.models[name].state_dict().values()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert {n: m.best_epoch for n, m in resumed.members.items()} == {n: m.best_epoch for n, m in whole.members.items()}
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1, 2]  # the redone epoch is logged once
    # a DML checkpoint does not resume OKDDip's cohort: its fingerprint names the members that differ
    with pytest.raises(ValueError, match="other settings: delivered: checkpoint"):
        other = fit_okddip if strategy == "dml" else fit_dml
        other(lambda: create("cnn_digits_student"), InMemoryLoader(x, y, 32, seed=1), epochs=3,
              run_dir=tmp_path / "cut", resume=True, progress=False, num_models=2 if strategy == "okddip" else 3)


def test_every_cohort_member_reports_its_scores():
    torch.manual_seed(0)
    x, maps = _dense_data()
    result = fit_okdhp(_dense_net(), InMemoryLoader(x, maps, 32, seed=0),
                       InMemoryLoader(x[:32], maps[:32], 32, shuffle=False), epochs=2, optimizer="adam", lr=1e-2,
                       rampup_epochs=1, progress=False)
    for name, member in result.members.items():
        assert member.last_score == result.history[-1][f"val_{name}_mse"]
        assert member.best_score == min(row[f"val_{name}_mse"] for row in result.history)
        assert member.best_acc is None
