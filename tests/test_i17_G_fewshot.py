"""Issue 17 (G): SKD (Rajasegaran et al., BMVC 2021, arXiv 2006.09785) and the few-shot episodes, against plain
loops and hand numbers."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distill import functional as DF
from distill.data.fewshot import episode_accuracy, sample_episode
from distill.models import create
from distill.strategies.fewshot_skd import fit_skd_fewshot


def log_softmax_loop(row, T=1.0):
    m = max(v / T for v in row)
    lse = m + math.log(sum(math.exp(v / T - m) for v in row))
    return [v / T - lse for v in row]


def ce_loop(z, y):
    return sum(-log_softmax_loop(z[i])[y[i]] for i in range(len(y))) / len(y)


def test_gen0_loss_is_ce_on_every_rotation_plus_weighted_rotation_ce():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(8, 3, generator=g, dtype=torch.float64)  # B = 2, four rotations each, sample-major
    r = torch.randn(8, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([2, 0])
    got = DF.skd_gen0_loss(z, r, y, rotation_weight=0.35)
    cls = ce_loop(z.tolist(), [2, 2, 2, 2, 0, 0, 0, 0])
    rot = ce_loop(r.tolist(), [0, 1, 2, 3, 0, 1, 2, 3])
    assert got.item() == pytest.approx(cls + 0.35 * rot, rel=1e-12)


def test_rotation_consistency_and_gen1_loss_against_loops():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(12, 5, generator=g, dtype=torch.float64)  # B = 3
    t = torch.randn(3, 5, generator=g, dtype=torch.float64)
    cons = sum(math.sqrt(sum((z[4 * b + j, k] - z[4 * b, k]).item() ** 2 for k in range(5)))
               for b in range(3) for j in (1, 2, 3)) / 9
    assert DF.skd_rotation_consistency(z).item() == pytest.approx(cons, rel=1e-12)
    T = 3.0
    kd = 0.0
    for b in range(3):
        lt, ls = log_softmax_loop(t[b].tolist(), T), log_softmax_loop(z[4 * b].tolist(), T)
        kd += sum(math.exp(a) * (a - c) for a, c in zip(lt, ls))
    kd = T * T * kd / 3
    assert DF.skd_gen1_loss(z, t, T=T, consistency_weight=0.45).item() == pytest.approx(kd + 0.45 * cons, rel=1e-10)


def test_rotations_are_sample_major_quarter_turns():
    x = torch.arange(8.0).view(2, 1, 2, 2)
    r = DF.sla_rotations(x)
    assert torch.equal(r[4], x[1]) and torch.equal(r[1], torch.rot90(x[0], 1, (1, 2)))


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10_000), st.floats(-3, 3))
def test_consistency_ignores_a_shift_shared_by_all_four_rotations(seed, shift):
    z = torch.randn(8, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    shifted = z + shift * torch.randn(2, 1, 4, generator=torch.Generator().manual_seed(seed + 1),
                                      dtype=torch.float64).expand(2, 4, 4).reshape(8, 4)
    assert DF.skd_rotation_consistency(shifted).item() == pytest.approx(DF.skd_rotation_consistency(z).item(),
                                                                        rel=1e-9, abs=1e-12)


def test_episodes_draw_disjoint_support_and_query_of_n_classes():
    labels = torch.arange(7).repeat_interleave(10)
    si, sy, qi, qy = sample_episode(labels, 5, 2, 3, torch.Generator().manual_seed(0))
    assert len(si) == 10 and len(qi) == 15 and not set(si.tolist()) & set(qi.tolist())
    assert len(labels[si].unique()) == 5
    for k in range(5):  # one episode label per drawn class, on support and query alike
        assert len(labels[si[sy == k]].unique()) == 1 and labels[si[sy == k]][0] == labels[qi[qy == k]][0]
    with pytest.raises(ValueError, match="n_way"):
        sample_episode(labels, 8, 1, 1, torch.Generator())


def test_episode_accuracy_is_perfect_on_separable_features_and_chance_on_noise():
    labels = torch.arange(5).repeat_interleave(30)
    feats = torch.nn.functional.one_hot(labels, 5).float() + 0.01 * torch.randn(150, 5)
    assert episode_accuracy(feats, labels, 5, 1, 5, episodes=5)[0] == 100.0
    noise = torch.randn(150, 16, generator=torch.Generator().manual_seed(0))
    assert episode_accuracy(noise, labels, 5, 1, 15, episodes=30)[0] < 40.0


def test_skd_trains_gen0_with_a_rotation_head_then_a_frozen_teacher_for_gen1():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(48, 1, 8, 8, generator=g), torch.arange(48) % 3
    student = create("cnn", num_classes=3, in_channels=1, widths=(4, 8))
    before = {k: v.clone() for k, v in student.state_dict().items()}
    r = fit_skd_fewshot(student, (x, y), (x, y), epochs=1, batch_size=16, progress=False, rotation_weight=0.5)
    assert r.model is student and r.teacher is not student and r.rotation_head.weight.shape == (4, 3)
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert all(not p.requires_grad for p in r.teacher.parameters()) and not r.teacher.training
    assert [h["stage"] for h in r.history] == ["gen0", "gen1"] and r.last_acc is not None
    with pytest.raises(TypeError, match="own SGD loop"):
        fit_skd_fewshot(student, (x, y), epochs=1, optimizer="adam")
    with pytest.raises(ValueError, match="square"):
        fit_skd_fewshot(student, (torch.rand(4, 1, 8, 6), torch.zeros(4, dtype=torch.long)), epochs=1)


def _hand_log_softmax(z, T=1.0):
    z = z / T
    return z - z.exp().sum(1, keepdim=True).log()


def test_one_batch_objectives_of_gen0_and_gen1(monkeypatch):
    """A spy on the strategy's SGD loop: on one batch, the loss each generation minimises equals the objective
    written out here (rotations by torch.rot90, CE and KL by hand), in value and in gradient."""
    import inspect

    import distill.strategies.fewshot_skd as mod

    real = mod.sgd_epochs
    seen = []

    def spy(params, loss_fn, x, y, **kw):
        env = inspect.getclosurevars(loss_fn).nonlocals
        xb, yb = x[:6], y[:6]
        rot = torch.cat([torch.stack([torch.rot90(xb[b], j, (1, 2)) for j in range(4)]) for b in range(6)])
        if kw["what"] == "SKD Gen-0":
            net, head, gamma = env["teacher"], env["rot_head"], env["rotation_weight"]
            z = net(rot)
            ref = -_hand_log_softmax(z)[torch.arange(24), yb.repeat_interleave(4)].mean() - gamma * _hand_log_softmax(
                head(z))[torch.arange(24), torch.arange(4).repeat(6)].mean()
        else:
            net, teacher, T, beta = env["model"], env["teacher"], env["T"], env["consistency_weight"]
            z = net(rot).view(6, 4, -1)
            with torch.no_grad():
                lt = _hand_log_softmax(teacher(xb), T)
            kd = T * T * (lt.exp() * (lt - _hand_log_softmax(z[:, 0], T))).sum(1).mean()
            cons = sum((z[:, j] - z[:, 0]).pow(2).sum(1).sqrt().mean() for j in (1, 2, 3)) / 3
            ref = kd + beta * cons
        got = loss_fn(xb, yb)
        g_ref = torch.autograd.grad(ref, params, allow_unused=True)
        g_got = torch.autograd.grad(got, params, allow_unused=True)
        assert got.item() == pytest.approx(ref.item(), rel=1e-5)
        for a, b in zip(g_got, g_ref):
            assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, atol=1e-6))
        seen.append(kw["what"])
        return real(params, loss_fn, x, y, **kw)

    monkeypatch.setattr(mod, "sgd_epochs", spy)
    torch.manual_seed(0)
    x, y = torch.rand(12, 1, 8, 8), torch.arange(12) % 3
    fit_skd_fewshot(lambda: create("cnn", num_classes=3, in_channels=1, widths=(4, 8)), (x, y), epochs=1,
                    batch_size=12, progress=False, rotation_weight=0.7, consistency_weight=0.3, T=3.0)
    assert seen == ["SKD Gen-0", "SKD Gen-1"]
