"""Spot-adaptive KD (Song et al., TIP 2022, arXiv 2205.02399).

The weighted objective against explicit loops, Gumbel decisions (per sample and per spot, noise
from the method's own generator), the temperature schedule, gradient isolation (student, adapters
and policy train; the teacher never) and end to end through the Distiller and ``fit``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import distill
from distill import functional as DF
from distill.adapters import ShapeMismatchError
from distill.batch import Batch
from distill.methods import SpotAdaptive, create_method, method_info
from _views import CNN_PAIRS, cnn_views, prepare_and_snapshot, tiny_loader

B = 6


def make_views(seed: int = 0):
    return cnn_views(B, seed)


def prepared(**kw) -> tuple[SpotAdaptive, dict, dict, Batch]:
    student, teacher, batch = make_views()
    m = create_method("spot_adaptive", **kw)
    with torch.no_grad():
        m.prepare(student, teacher, batch)
    return m, student, teacher, batch


# ---------------------------------------------------------------------------- registry


def test_registered_with_paper_family_and_defaults():
    info = method_info("spot_adaptive")
    assert info.family == "features" and info.cls is SpotAdaptive
    assert info.paper.arxiv == "2205.02399" and info.paper.year == 2022
    assert "Spot-adaptive" in info.paper.title and "Song" in info.paper.authors and "Image Processing" in info.paper.venue
    d = info.defaults
    assert d["pairs"] == (("stage1", "stage1"), ("stage2", "stage2"), ("stage3", "stage3"))
    assert d["adapter"] == "conv1x1_bn" and (d["tau_start"], d["tau_end"]) == (5.0, 0.5) and d["hard"] is True


# ---------------------------------------------------------------------------- functional


def test_spot_adaptive_loss_matches_loops():
    rng = np.random.default_rng(0)
    losses, dec = rng.random((5, 3)), (rng.random((5, 3)) > 0.5).astype(float)
    want = sum(sum(dec[b, k] * losses[b, k] for k in range(3)) for b in range(5)) / 5
    got = DF.spot_adaptive_loss(torch.tensor(losses), torch.tensor(dec))
    assert got.item() == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError):
        DF.spot_adaptive_loss(torch.zeros(5, 3), torch.zeros(5, 2))


def test_spot_hint_losses_match_numpy_and_fitnet_mean():
    rng = np.random.default_rng(1)
    s = [rng.standard_normal((4, 3, 2, 2)), rng.standard_normal((4, 5))]
    t = [rng.standard_normal((4, 3, 2, 2)), rng.standard_normal((4, 5))]
    got = DF.spot_hint_losses([torch.tensor(a) for a in s], [torch.tensor(a) for a in t]).numpy()
    for b in range(4):
        for k in range(2):
            assert got[b, k] == pytest.approx(0.5 * ((s[k][b] - t[k][b]) ** 2).sum(), rel=1e-12)
    fit = DF.fitnet_hint_loss(torch.tensor(s[0]), torch.tensor(t[0])).item()
    assert got[:, 0].mean() == pytest.approx(fit, rel=1e-12)


def test_gumbel_decisions_hard_soft_noise_free_and_reproducible():
    logits = torch.tensor([[[2.0, -1.0], [-3.0, 0.5]], [[0.0, 0.1], [1.0, 1.0 - 1e-3]]], requires_grad=True)
    d = DF.gumbel_softmax_decisions(logits, 1.0, noise=False)
    assert d.tolist() == [[0.0, 1.0], [1.0, 0.0]]  # argmax of each (sample, spot) pair
    soft = DF.gumbel_softmax_decisions(logits, 2.0, hard=False, noise=False)
    want = torch.sigmoid((logits[..., 1] - logits[..., 0]) / 2.0)
    assert torch.allclose(soft, want)
    d.sum().backward()  # straight-through: the gradient of the soft probabilities
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    big = torch.zeros(200, 4, 2)
    a = DF.gumbel_softmax_decisions(big, 1.0, generator=torch.Generator().manual_seed(3))
    b = DF.gumbel_softmax_decisions(big, 1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and set(a.unique().tolist()) == {0.0, 1.0}
    assert 0.35 < a.mean().item() < 0.65  # equal logits: a fair coin per sample and spot
    with pytest.raises(ValueError):
        DF.gumbel_softmax_decisions(torch.zeros(3, 2), 1.0)
    with pytest.raises(ValueError):
        DF.gumbel_softmax_decisions(big, 0.0)


def test_temperature_schedule_values():
    f = DF.spot_gumbel_temperature
    assert f(0, 10, 5.0, 0.5) == pytest.approx(5.0)
    assert f(3, 10, 5.0, 0.5) == pytest.approx(5.0 - 4.5 * 3 / 9)
    assert f(9, 10, 5.0, 0.5) == pytest.approx(0.5)
    assert f(20, 10, 5.0, 0.5) == pytest.approx(0.5)
    assert f(4, None, 5.0, 0.5) == 5.0
    m = SpotAdaptive(tau_start=4.0, tau_end=1.0)
    assert m.tau == 4.0
    for epoch, want in [(0, 4.0), (1, 3.0), (2, 2.0), (3, 1.0)]:
        m.on_epoch_start(epoch, 4)
        assert m.tau == pytest.approx(want) and m.epoch == epoch


# ---------------------------------------------------------------------------- method


def test_injected_and_deterministic_decisions_weight_independent_spot_losses():
    m, student, teacher, batch = prepared()
    m.train()
    # independent per-spot losses: the adapters applied by hand, half squared L2 per sample
    per_spot = []
    for (s_path, t_path), adapter in zip(m.pairs, m.adapters.values()):
        diff = adapter(student[s_path]) - teacher[t_path]
        per_spot.append(0.5 * diff.detach().pow(2).flatten(1).sum(1))
    per_spot = torch.stack(per_spot, 1)  # (B, K)
    dec = torch.tensor([[1, 0, 1], [0, 0, 0], [1, 1, 1], [0, 1, 0], [1, 0, 0], [0, 0, 1]], dtype=torch.float32)
    m.set_decisions(dec)
    got = m(student, teacher, batch)
    want = sum(float(dec[b, k]) * float(per_spot[b, k]) for b in range(B) for k in range(3)) / B
    assert got.item() == pytest.approx(want, rel=1e-5)
    assert torch.equal(m.last_decisions, dec)
    m.set_decisions(None)
    # deterministic mode: the policy's argmax, no noise; the same twice
    m.deterministic = True
    logits = m.policy_logits([student[s] for s, _ in m.pairs], [teacher[t] for _, t in m.pairs])
    argmax = (logits[..., 1] > logits[..., 0]).float()
    got = m(student, teacher, batch)
    assert torch.equal(m.last_decisions, argmax)
    assert got.item() == pytest.approx((argmax * per_spot).sum(1).mean().item(), rel=1e-5)
    assert m(student, teacher, batch).item() == got.item()


def test_decisions_are_per_sample_and_per_spot_and_come_from_the_methods_generator():
    m, student, teacher, batch = prepared(seed=7)
    m.train()
    with torch.no_grad():  # a policy with equal logits everywhere: each decision is a fair coin
        for p in m.policy.parameters():
            p.zero_()
    seen = []
    for _ in range(8):
        m(student, teacher, batch)
        assert m.last_decisions.shape == (B, 3)
        seen.append(m.last_decisions.clone())
    alld = torch.cat(seen)
    assert set(alld.unique().tolist()) == {0.0, 1.0}
    assert any(len(set(map(tuple, d.tolist()))) > 1 for d in seen)  # samples differ within a batch
    assert any(len(set(row)) > 1 for d in seen for row in d.tolist())  # spots differ within a sample
    torch.manual_seed(123)  # the global RNG plays no part
    m2, *_ = prepared(seed=7)
    m2.load_state_dict(m.state_dict())
    m2.train()
    torch.manual_seed(999)
    for d in seen:
        m2(student, teacher, batch)
        assert torch.equal(m2.last_decisions, d)
    m.eval()  # eval: argmax of equal logits, no noise → index 0 ("skip") everywhere
    m(student, teacher, batch)
    assert torch.equal(m.last_decisions, torch.zeros(B, 3))


def test_gradients_reach_student_adapters_and_policy_never_teacher():
    student, teacher, batch = make_views()
    m = create_method("spot_adaptive", hard=False)
    assert m.requires_prepare
    with pytest.raises(RuntimeError, match="prepare"):
        m(student, teacher, batch)
    with torch.no_grad():
        m.prepare(student, teacher, batch)
    params = list(m.named_parameters())
    m.prepare(student, teacher, batch)  # idempotent
    assert [id(p) for _, p in m.named_parameters()] == [id(p) for _, p in params]
    m.train()
    loss = m(student, teacher, batch)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.item() >= 0
    loss.backward()
    for key in m.student_taps:
        g = student[key].grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, key
    for key, t in teacher.items():
        assert t.grad is None, key
    assert student["logits"].grad is None
    names = {n.split(".")[0] for n, _ in params}
    assert names == {"adapters", "policy"}
    for name, p in params:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for n, p in params if n.startswith("policy"))
    # hard (straight-through) decisions also send a gradient to the policy
    m2, student, teacher, batch = prepared()
    m2.train()
    m2(student, teacher, batch).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m2.policy.parameters())
    assert all(t.grad is None for t in teacher.values())


def test_both_policy_input_and_shape_errors():
    m, student, teacher, batch = prepared(policy_input="both")
    assert m.policy[0].in_features == (4 + 6 + 8) + (8 + 12 + 16)
    m(student, teacher, batch).backward()
    assert all(t.grad is None for t in teacher.values())
    with pytest.raises(ValueError):
        SpotAdaptive(policy_input="teacher")
    with pytest.raises(ValueError):
        SpotAdaptive(pairs=())
    s, t, b = make_views()
    bad = SpotAdaptive(pairs=(("stage1", "stage2"),))
    with pytest.raises(ShapeMismatchError):
        bad.prepare(s, t, b)


# ---------------------------------------------------------------------------- end to end

PAIRS = CNN_PAIRS


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_end_to_end_fit_through_the_distiller(pair, tmp_path):
    torch.manual_seed(0)
    student, teacher = PAIRS[pair]()
    teacher_params = [p.detach().clone() for p in teacher.parameters()]
    method = SpotAdaptive(tau_start=2.0, tau_end=1.0)
    d = distill.Distiller(student, teacher, losses={"ce": 1.0, "spot_adaptive": method})
    x, y, loader = tiny_loader()
    method_params, before = prepare_and_snapshot(d, method, loader)
    res = distill.fit(d, loader, loader, epochs=2, lr=0.01, schedule="constant", run_dir=tmp_path, progress=False)
    assert len(res.history) == 2
    assert method.tau == pytest.approx(1.0)  # annealed to tau_end at the last epoch
    assert any(not torch.equal(a, p) for a, p in zip(before, method_params))
    assert all(torch.equal(a, p) for a, p in zip(teacher_params, teacher.parameters()))
    d.eval()
    out = d((x[:4], y[:4]))
    assert torch.isfinite(out.parts["spot_adaptive"]) and out.parts["spot_adaptive"].item() >= 0
    assert method.last_decisions.shape == (4, 3)
