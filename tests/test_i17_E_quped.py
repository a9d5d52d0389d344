"""Issue 17 (E): QuPeD (Ozkara et al. 2021) — the quantiser's relaxation, its proximal steps, one local
iteration against a plainly written replay, and short federated runs."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from distill import functional as DF
from distill.strategies.quped import quped, quped_step

torch.set_num_threads(1)


def test_quantize_relaxation_prox_and_init_on_hand_numbers():
    c = torch.tensor([-1.0, 0.5])
    x = torch.tensor([-2.0, -0.3, 0.0, 0.2, 1.0])
    # nearest centres: -1, -1 (|-0.3+1| = 0.7 < 0.8), 0.5, 0.5, 0.5
    assert DF.quped_quantize(x, c).tolist() == [-1.0, -1.0, 0.5, 0.5, 0.5]
    assert float(DF.quped_relaxation(x, c)) == pytest.approx(1.0 + 0.7 + 0.5 + 0.3 + 0.5)
    # prox with step 0.4: move 0.4 toward the centre, stop on it
    assert DF.quped_prox(x, c, 0.4).tolist() == pytest.approx([-1.6, -0.7, 0.4, 0.5, 0.6])
    w = torch.tensor([-3.0, -1.0, 0.0, 2.0, 4.0])
    assert DF.quped_init_centers(w, 2).tolist() == pytest.approx([-2.0, 2.0])  # means of < 0 and of >= 0
    assert DF.quped_init_centers(w, 3).tolist() == pytest.approx([-3.0, 0.5, 4.0])


def test_center_gradient_sums_member_gradients_clips_and_adds_the_sign_counts():
    c = torch.tensor([-1.0, 1.0])
    x = torch.tensor([-1.5, -0.5, -0.9, 0.5, 2.0, 3.0])  # members: centre 0 <- 0, 1, 2; centre 1 <- 3, 4, 5
    gq = torch.tensor([4.0, 5.0, 6.0, 0.5, -0.25, 1.0])
    # centre 0: clip(15, 10) = 10, signs (-1, +1, +1) -> count +1; centre 1: 1.25, signs (-1, +1, +1) -> +1
    out = DF.quped_center_grad(x, c, gq, lam=0.2)
    assert out.tolist() == pytest.approx([10.0 - 0.2, 1.25 - 0.2])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-3, 3), min_size=1, max_size=20), st.floats(0, 2), st.integers(0, 1000))
def test_prox_moves_toward_the_nearest_centre_by_at_most_the_step(xs, step, seed):
    g = torch.Generator().manual_seed(seed)
    c = torch.sort(torch.randn(3, generator=g, dtype=torch.float64)).values
    x = torch.tensor(xs, dtype=torch.float64)
    y = DF.quped_prox(x, c, step)
    q = DF.quped_quantize(x, c)
    assert ((y - x).abs() <= step + 1e-12).all()
    assert ((y - q).abs() <= (x - q).abs() + 1e-12).all()  # never past the centre
    assert ((y - q) * (x - q) >= 0).all()
    torch.testing.assert_close(DF.quped_quantize(q, c), q)  # Q is idempotent


def _nets():
    torch.manual_seed(0)
    p = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 3))
    w = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 3))
    return p, w


def _kd(s, t, T):  # T^2 KL(softmax(t/T) || softmax(s/T)), batch mean, written out
    pt = torch.softmax(t / T, 1)
    return T * T * (pt * (torch.log(pt) - torch.log_softmax(s / T, 1))).sum(1).mean()


def _ce(z, y):
    return -torch.log_softmax(z, 1)[torch.arange(len(y)), y].mean()


def test_one_local_iteration_matches_a_plain_replay():
    """x: gradient step at full precision then prox; c: clipped member-gradient sums at Q(x) plus lam * sign
    counts; w: step on (1 - lp) CE + lp KD towards Q(x). Non-default lr, lam, lambda_p, T."""
    p, w = _nets()
    g = torch.Generator().manual_seed(3)
    xb, yb = torch.randn(6, 3, generator=g), torch.tensor([0, 1, 2, 0, 1, 2])
    lr, lrc, lam, lp, T = 0.3, 0.05, 0.7, 0.35, 2.5
    centers = {"1.weight": torch.tensor([-0.2, 0.3])}
    p0, w0, c0 = copy.deepcopy(p), copy.deepcopy(w), centers["1.weight"].clone()
    quped_step(p, centers, w, xb, yb, lr=lr, lr_centers=lrc, lam=lam, lambda_p=lp, T=T)

    # the replay
    zw = w0(xb)
    x = p0[1].weight
    q = DF.quped_quantize(x.detach(), c0).requires_grad_(True)
    zp = p0(xb)
    h = torch.nn.functional.linear(p0[0](xb), q, p0[1].bias.detach())
    zq = torch.nn.functional.linear(h, p0[2].weight.detach(), p0[2].bias.detach())
    zq = torch.nn.functional.linear(torch.nn.functional.linear(p0[0](xb).detach(), q, p0[1].bias.detach()),
                                    p0[2].weight.detach(), p0[2].bias.detach())
    loss_p = (1 - lp) * _ce(zp, yb) + lp * _kd(zp, zw.detach(), T)
    loss_q = (1 - lp) * _ce(zq, yb) + lp * _kd(zq, zw.detach(), T)
    loss_w = (1 - lp) * _ce(zw, yb) + lp * _kd(zw, zq.detach(), T)
    gp = torch.autograd.grad(loss_p, list(p0.parameters()))
    (gq,) = torch.autograd.grad(loss_q, [q])
    gw = torch.autograd.grad(loss_w, list(w0.parameters()))
    with torch.no_grad():
        for (name, a), ga in zip(p0.named_parameters(), gp):
            new = a - lr * ga
            if name == "1.weight":
                qq = DF.quped_quantize(new, c0)
                d = new - qq
                new = qq + d.sign() * (d.abs() - lr * lam).clamp_min(0)
            torch.testing.assert_close(dict(p.named_parameters())[name], new)
        idx = (x.unsqueeze(-1) - c0).abs().argmin(-1)
        grad_c = torch.stack([gq[idx == j].sum().clamp(-10, 10) for j in range(2)])
        count = torch.stack([(x - c0[j])[idx == j].sign().sum() for j in range(2)])
        torch.testing.assert_close(centers["1.weight"], torch.sort(c0 - lrc * (grad_c - lam * count)).values)
        for a, b, ga in zip(w.parameters(), w0.parameters(), gw):
            torch.testing.assert_close(a, b - lr * ga)


def test_local_mode_has_no_distillation_and_frozen_tensors_stay():
    p, _ = _nets()
    g = torch.Generator().manual_seed(4)
    xb, yb = torch.randn(5, 3, generator=g), torch.tensor([0, 1, 2, 0, 1])
    centers = {"1.weight": torch.tensor([-0.2, 0.3])}
    p0 = copy.deepcopy(p)
    quped_step(p, centers, None, xb, yb, lr=0.1, lr_centers=0.0, lam=0.0, lambda_p=0.9, T=3.0)
    (g0,) = torch.autograd.grad(_ce(p0(xb), yb), [p0[0].weight])  # lambda_p has no teacher to weight
    torch.testing.assert_close(p[0].weight, p0[0].weight - 0.1 * g0)
    frozen = p[1].weight.detach().clone()
    quped_step(p, centers, None, xb, yb, lr=0.1, lr_centers=0.01, lam=0.5, lambda_p=0.0, T=1.0, frozen=True)
    torch.testing.assert_close(p[1].weight, frozen)


@pytest.mark.parametrize("mode", ["quped", "local", "fedavg"])
def test_quped_runs_on_dirichlet_clients_and_deploys_quantised_models(mode):
    from distill.models import create

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(120, 1, 8, 8, generator=g), torch.arange(120) % 4
    r = quped(lambda: create("cnn_digits_student", num_classes=4), client_data=(x, y), mode=mode, num_clients=3,
              rounds=3, local_steps=2, batch_size=8, eval_every=1, finetune_fraction=0.34, progress=False)
    assert [h["epoch"] for h in r.history] == [1, 2, 3] and 0 <= r.last_acc <= 100
    assert sum(len(c.y) + len(c.yt) for c in r.clients) == 120
    if mode != "fedavg":
        for c in r.clients:
            deployed = dict(c.quantized().named_parameters())
            assert c.names and all(deployed[n].unique().numel() <= 2 for n in c.names)
    with pytest.raises(ValueError, match="mode must be one of"):
        quped(lambda: create("cnn_digits_student"), client_data=(x, y), mode="fedprox")
