"""Issue 17 (F): defensive distillation (its loss, FGSM, PGD, the C&W logit margin) and the nasty teacher,
checked against numbers worked out with numpy, and tiny runs of both strategies."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import distill.functional as DF
from distill.data.loader import InMemoryLoader
from distill.strategies.defensive_distillation import fit_defensive_distillation
from distill.strategies.nasty_teacher import fit_nasty_teacher

torch.set_num_threads(1)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _linear(W: np.ndarray, b: np.ndarray) -> nn.Linear:
    lin = nn.Linear(W.shape[1], W.shape[0]).double()
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(W))
        lin.bias.copy_(torch.from_numpy(b))
    return lin


RNG = np.random.default_rng(7)
W = RNG.normal(size=(4, 6))
B = RNG.normal(size=4)
X = RNG.uniform(0.2, 0.8, size=(5, 6))
Y = np.array([0, 3, 1, 2, 3])


def test_temperature_cross_entropy_matches_numpy() -> None:
    z = RNG.normal(size=(3, 4)) * 5
    y = np.array([2, 0, 3])
    T = 7.0
    logq = np.log(_softmax(z / T))
    hard = -logq[np.arange(3), y].mean()
    soft_t = _softmax(RNG.normal(size=(3, 4)))
    soft = -(soft_t * logq).sum(1).mean()
    zt = torch.from_numpy(z)
    assert float(DF.temperature_cross_entropy(zt, torch.from_numpy(y), T)) == pytest.approx(hard, rel=1e-5)
    assert float(DF.temperature_cross_entropy(zt, torch.from_numpy(soft_t), T)) == pytest.approx(soft, rel=1e-5)
    with pytest.raises(ValueError, match="temperature T must be"):
        DF.temperature_cross_entropy(zt, torch.from_numpy(y), 0.0)


def test_fgsm_step_is_eps_sign_of_the_hand_gradient() -> None:
    # CE(softmax(Wx + b), y): d/dx = W^T (softmax(Wx + b) - onehot(y))
    p = _softmax(X @ W.T + B)
    grad = (p - np.eye(4)[Y]) @ W
    eps = 0.07
    expected = np.clip(X + eps * np.sign(grad), 0, 1)
    got = DF.fgsm(_linear(W, B), torch.from_numpy(X), torch.from_numpy(Y), eps)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-12)


def test_logit_margin_by_hand() -> None:
    z = torch.tensor([[2.0, 5.0, 1.0], [4.0, 1.0, 3.5], [0.0, 0.0, 9.0]])
    y = torch.tensor([0, 0, 1])
    # Z_y - max_{i != y} Z_i: 2 - 5 = -3; 4 - 3.5 = 0.5; 0 - 9 = -9; then max(., -kappa)
    assert DF.logit_margin(z, y, kappa=10.0).tolist() == [-3.0, 0.5, -9.0]
    assert DF.logit_margin(z, y, kappa=1.0).tolist() == [-1.0, 0.5, -1.0]
    assert DF.logit_margin(z, y).tolist() == [0.0, 0.5, 0.0]


def test_pgd_on_the_margin_follows_a_hand_written_loop() -> None:
    eps, step, steps = 0.1, 0.04, 4
    x = X.copy()
    for _ in range(steps):
        z = x @ W.T + B
        others = np.where(np.eye(4)[Y] > 0, -np.inf, z)
        j = others.argmax(1)
        grad = -(W[Y] - W[j])  # gradient of -(Z_y - Z_j) while the margin is above -kappa = 0
        done = (z[np.arange(5), Y] - z[np.arange(5), j]) <= 0  # clamped at -kappa: zero gradient
        grad[done] = 0
        x = np.clip(np.clip(x + step * np.sign(grad), X - eps, X + eps), 0, 1)
    got = DF.pgd(_linear(W, B), torch.from_numpy(X), torch.from_numpy(Y), eps, step=step, steps=steps, loss="margin")
    np.testing.assert_allclose(got.numpy(), x, atol=1e-12)
    one = DF.pgd(_linear(W, B), torch.from_numpy(X), torch.from_numpy(Y), eps, step=eps, steps=1)
    np.testing.assert_allclose(one.numpy(), DF.fgsm(_linear(W, B), torch.from_numpy(X), torch.from_numpy(Y), eps).numpy())


def test_saturated_softmax_masks_the_ce_gradient_but_not_the_margin() -> None:
    big = _linear(W * 1e4, B * 1e4)  # a network whose logits grew as defensive distillation makes them
    x, y = torch.from_numpy(X), torch.from_numpy(big(torch.from_numpy(X)).argmax(1).detach().numpy())
    assert torch.equal(DF.fgsm(big, x, y, 0.1, clamp=None), x)  # CE gradient underflows to 0: no step
    moved = DF.fgsm(big, x, y, 0.1, loss="margin", clamp=None)
    assert torch.allclose((moved - x).abs(), torch.full_like(x, 0.1))


def test_attack_success_rate_counts_only_correct_samples() -> None:
    lin = _linear(np.eye(3), np.zeros(3))
    x = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 0, 0]], dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1])  # the last one is wrong already
    x_adv = torch.tensor([[0, 1.0, 0], [0, 1.0, 0], [1.0, 0, 0], [0, 1.0, 0]], dtype=torch.float64)
    assert DF.attack_success_rate(lin, x, x_adv, y) == pytest.approx(200 / 3)


@settings(max_examples=25, deadline=None)
@given(eps=st.floats(0.01, 0.5), seed=st.integers(0, 1000))
def test_attacks_stay_in_the_ball_and_the_box(eps: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (6,), generator=g)
    for x_adv in (DF.fgsm(_linear(W, B), x, y, eps),
                  DF.pgd(_linear(W, B), x, y, eps, steps=3, random_start=True, generator=g, loss="margin")):
        assert float((x_adv - x).abs().max()) <= eps + 1e-12
        assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1


def test_nasty_teacher_loss_matches_numpy() -> None:
    zn, za = RNG.normal(size=(4, 5)) * 3, RNG.normal(size=(4, 5)) * 3
    y = np.array([1, 4, 0, 2])
    tau, omega = 3.0, 0.2
    ce = -np.log(_softmax(zn)[np.arange(4), y]).mean()
    pn, pa = _softmax(zn / tau), _softmax(za / tau)
    kl = (pn * (np.log(pn) - np.log(pa))).sum(1).mean()
    expected = ce - omega * tau ** 2 * kl
    zn_t = torch.from_numpy(zn).requires_grad_(True)
    za_t = torch.from_numpy(za).requires_grad_(True)
    got = DF.nasty_teacher_loss(zn_t, za_t, torch.from_numpy(y), tau=tau, omega=omega)
    assert float(got.detach()) == pytest.approx(expected, rel=1e-6)
    got.backward()
    assert za_t.grad is None and zn_t.grad is not None  # the normal network is a constant
    with pytest.raises(ValueError, match="omega must be >= 0"):
        DF.nasty_teacher_loss(zn_t, za_t, torch.from_numpy(y), omega=-1.0)


def _tiny_data() -> tuple[InMemoryLoader, InMemoryLoader]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(48, 1, 4, 4, generator=g)
    y = (x.flatten(1)[:, :8].sum(1) > x.flatten(1)[:, 8:].sum(1)).long() + 2 * (x[:, 0, 0, 0] > 0.5).long()
    return (InMemoryLoader(x, y, batch_size=16, shuffle=True, seed=0), InMemoryLoader(x, y, batch_size=48))


def _mlp() -> nn.Module:
    from distill.models import create
    return create("mlp", num_classes=4, input_size=4, hidden=(16,))


def test_defensive_distillation_runs_and_checks_its_arguments() -> None:
    train, val = _tiny_data()
    kw = dict(optimizer="adam", lr=0.01, weight_decay=0.0, schedule="constant", progress=False)
    with pytest.raises(ValueError, match="T must be a number"):
        fit_defensive_distillation(_mlp, train, val, epochs=1, T=0.0, **kw)
    res = fit_defensive_distillation(_mlp, train, val, epochs=2, teacher_epochs=3, T=20.0, **kw)
    assert len(res.stages) == 2 and len(res.models) == 2 and res.models[0] is not res.models[1]
    assert len(res.stages[0].history) == 3 and len(res.history) == 2 and res.last_acc is not None


def test_nasty_teacher_runs_and_leaves_the_normal_network_unchanged() -> None:
    train, val = _tiny_data()
    normal = _mlp().eval().requires_grad_(False)
    before = {k: v.clone() for k, v in normal.state_dict().items()}
    kw = dict(optimizer="adam", lr=0.01, weight_decay=0.0, schedule="constant", progress=False)
    with pytest.raises(ValueError, match="kd_weight must be"):
        fit_nasty_teacher(_mlp, train, val, teacher=normal, epochs=1, kd_weight=1.5, **kw)
    res = fit_nasty_teacher(_mlp, train, val, teacher=normal, epochs=1, nasty_epochs=2, tau=3.0, omega=0.1, **kw)
    assert res.nasty_acc == res.stages[0].last_acc and len(res.stages[0].history) == 2
    assert all(torch.equal(before[k], v) for k, v in normal.state_dict().items())
    assert not any(p.data_ptr() == q.data_ptr() for p in res.models[0].parameters() for q in normal.parameters())


def test_the_strategies_losses_use_their_temperatures() -> None:
    from distill.batch import Batch
    from distill.strategies.defensive_distillation import SoftTemperatureCE, TemperatureCE
    from distill.strategies.nasty_teacher import NastyTeacherLoss

    zs, zt = RNG.normal(size=(3, 4)) * 4, RNG.normal(size=(3, 4)) * 4
    y = np.array([3, 1, 0])
    T = 5.0
    logq = np.log(_softmax(zs / T))
    batch = Batch(torch.zeros(3, 2), torch.from_numpy(y))
    s, t = {"logits": torch.from_numpy(zs)}, {"logits": torch.from_numpy(zt)}
    assert float(TemperatureCE(T)(s, {}, batch)) == pytest.approx(-logq[np.arange(3), y].mean(), rel=1e-6)
    assert float(SoftTemperatureCE(T)(s, t, batch)) == pytest.approx(-(_softmax(zt / T) * logq).sum(1).mean(), rel=1e-6)
    pn, pa = _softmax(zs / T), _softmax(zt / T)
    nasty = -np.log(_softmax(zs)[np.arange(3), y]).mean() - 0.3 * T ** 2 * (pn * np.log(pn / pa)).sum(1).mean()
    assert float(NastyTeacherLoss(tau=T, omega=0.3)(s, t, batch)) == pytest.approx(nasty, rel=1e-6)


def _spy(monkeypatch: pytest.MonkeyPatch, module: object) -> list:
    seen: list = []
    real = module.fit

    def spy(distiller, *args, **kwargs):
        seen.append(distiller)
        return real(distiller, *args, **kwargs)

    monkeypatch.setattr(module, "fit", spy)
    return seen


def test_one_batch_objectives_of_defensive_distillation_and_the_nasty_teacher(monkeypatch: pytest.MonkeyPatch) -> None:
    """What each stage's Distiller minimises on one fixed batch, against the papers' formulas written out here."""
    import torch.nn.functional as F

    import distill.strategies.chain as chain_mod
    import distill.strategies.defensive_distillation as dd_mod
    from distill.batch import Batch

    train, val = _tiny_data()
    x, y = train.inputs[:16], train.targets[:16]
    batch = Batch(x, y)
    kw = dict(optimizer="adam", lr=0.01, weight_decay=0.0, schedule="constant", progress=False)
    seen = _spy(monkeypatch, dd_mod)
    T = 7.0
    fit_defensive_distillation(_mlp, train, val, epochs=1, T=T, **kw)
    initial, distilled = seen
    z0 = initial.student(x)
    hand0 = -F.log_softmax(z0 / T, 1)[torch.arange(16), y].mean()
    torch.testing.assert_close(initial(batch).total, hand0)
    zs, zt = distilled.student(x), initial.student(x).detach()
    hand1 = -(F.softmax(zt / T, 1) * F.log_softmax(zs / T, 1)).sum(1).mean()  # no T²: the paper's loss
    torch.testing.assert_close(distilled(batch).total, hand1)

    seen = _spy(monkeypatch, chain_mod)
    normal = _mlp().eval().requires_grad_(False)
    tau, omega, Ts, lam = 3.0, 0.07, 2.0, 0.8
    fit_nasty_teacher(_mlp, train, val, teacher=normal, epochs=1, tau=tau, omega=omega, student_T=Ts, kd_weight=lam,
                      **kw)
    stage1, stage2 = seen
    zn, za = stage1.student(x), normal(x)
    pn, pa = F.softmax(zn / tau, 1), F.softmax(za / tau, 1)
    hand_n = F.cross_entropy(zn, y) - omega * tau ** 2 * (pn * (pn.log() - pa.log())).sum(1).mean()
    torch.testing.assert_close(stage1(batch).total, hand_n)
    zs, zn = stage2.student(x), stage1.student(x).detach()
    ps, pn = F.softmax(zs / Ts, 1), F.softmax(zn / Ts, 1)
    hand_s = lam * Ts ** 2 * (pn * (pn.log() - ps.log())).sum(1).mean() + (1 - lam) * F.cross_entropy(zs, y)
    torch.testing.assert_close(stage2(batch).total, hand_s)
