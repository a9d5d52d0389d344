"""Spot-adaptive KD (Song et al., TIP 2022, arXiv 2205.02399).

The weighted objective against explicit loops, Gumbel decisions (per sample and per spot, noise
from the method's own generator), the temperature schedule, gradient isolation (student, adapters
and policy train; the teacher never) and end to end through the Distiller and ``fit``; the
multi-path routing network against per-sample paths run module by module, the stage splitter,
the routed loss against its terms computed by hand, and the teacher (weights and BatchNorm
buffers) unchanged by training.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from _views import CNN_PAIRS, cnn_views, prepare_and_snapshot, prepare_checked, tiny_loader
from torch import nn

import distill
from distill import functional as DF
from distill.adapters import ShapeMismatchError
from distill.batch import Batch
from distill.methods import SpotAdaptive, create_method, method_info
from distill.methods.spot import ZOO_STAGES, StageSplit
from distill.models import create
from distill.taps import TapError
from distill.teachers import EnsembleTeacher

B = 6


def make_views(seed: int = 0):
    return cnn_views(B, seed)


def prepared(**kw) -> tuple[SpotAdaptive, dict, dict, Batch]:
    """The method without the routing network, on synthetic views."""
    student, teacher, batch = make_views()
    m = create_method("spot_adaptive", routing=False, **kw)
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
    # the authors' code: fixed Gumbel temperature 5, one Linear policy on both networks' features,
    # loss weights 1, KD at T = 4, the output hinge at half the batch
    assert d["adapter"] == "conv1x1_bn" and (d["tau_start"], d["tau_end"]) == (5.0, 5.0) and d["hard"] is True
    assert d["routing"] is True and d["hidden"] == 0 and d["policy_input"] == "both"
    assert (d["hint"], d["kd"], d["T"], d["route"], d["min_teacher_frac"]) == (1.0, 1.0, 4.0, 1.0, 0.5)
    assert d["student_stages"] is None and d["teacher_stages"] is None


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
    m = create_method("spot_adaptive", routing=False, hard=False)
    params = prepare_checked(m, student, teacher, batch)
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
    bad = SpotAdaptive(pairs=(("stage1", "pool"),), routing=False)
    with pytest.raises(ShapeMismatchError):
        bad.prepare(s, t, b)


# ---------------------------------------------------------------------------- end to end

PAIRS = CNN_PAIRS


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_end_to_end_fit_through_the_distiller_without_routing(pair, tmp_path):
    torch.manual_seed(0)
    student, teacher = PAIRS[pair]()
    teacher_params = [p.detach().clone() for p in teacher.parameters()]
    method = SpotAdaptive(tau_start=2.0, tau_end=1.0, routing=False)
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


# ---------------------------------------------------------------------------- multi-path routing: functional


def _linear_nets(seed: int = 0):
    """Three-stage student (3→4→5→6) and teacher (3→7→8→6) of Linear layers, with adapters."""
    torch.manual_seed(seed)

    def lin(i: int, o: int) -> nn.Linear:
        return nn.Linear(i, o).double()

    student, teacher = [lin(3, 4), lin(4, 5), lin(5, 6)], [lin(3, 7), lin(7, 8), lin(8, 6)]
    to_t, to_s = [lin(4, 7), lin(5, 8)], [lin(7, 4), lin(8, 5)]
    return student, teacher, to_t, to_s


def _path(x, path, student, teacher, to_t, to_s):
    """One sample's forward along ``path`` (1: the teacher's stage), converting where it switches."""
    f, prev = x, None
    for k, use_teacher in enumerate(path):
        if prev is not None and use_teacher != prev:
            f = (to_t if use_teacher else to_s)[k - 1](f)
        f = (teacher if use_teacher else student)[k](f)
        prev = use_teacher
    return f


def test_spot_route_follows_each_samples_path():
    student, teacher, to_t, to_s = _linear_nets()
    paths = list(itertools.product([0, 1], repeat=3))  # every path, one sample each
    x = torch.randn(len(paths), 3, dtype=torch.float64)
    d = torch.tensor(paths, dtype=torch.float64)
    got = DF.spot_route(x, student, teacher, to_t, to_s, d)
    for b, path in enumerate(paths):
        want = _path(x[b : b + 1], path, student, teacher, to_t, to_s)
        assert torch.allclose(got[b : b + 1], want, atol=1e-12), path
    # all teacher / all student: exactly the networks themselves, adapters unused
    ones, zeros = torch.ones(len(paths), 3, dtype=torch.float64), torch.zeros(len(paths), 3, dtype=torch.float64)
    assert torch.equal(DF.spot_route(x, student, teacher, to_t, to_s, ones), teacher[2](teacher[1](teacher[0](x))))
    assert torch.equal(DF.spot_route(x, student, teacher, to_t, to_s, zeros), student[2](student[1](student[0](x))))


def test_spot_route_soft_decisions_and_gradient_reach_decisions_and_adapters():
    student, teacher, to_t, to_s = _linear_nets(1)
    x = torch.randn(2, 3, dtype=torch.float64)
    # one stage: a convex mix of the two outputs, worked out directly
    d1 = torch.tensor([[0.25], [0.8]], dtype=torch.float64)
    got = DF.spot_route(x, student[:1], [nn.Linear(3, 4).double()], [], [], d1)
    assert got.shape == (2, 4)
    s = student[0]
    mix = DF.spot_route(x, [s], [lambda h: s(h) * 2 + 1], [], [], d1)
    assert torch.allclose(mix, d1 * (s(x) * 2 + 1) + (1 - d1) * s(x))
    # straight-through style: decisions with grad receive one; the adapters too
    d = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    y = DF.spot_route(x, student, teacher, to_t, to_s, d)
    y.sum().backward()
    assert d.grad is not None and d.grad.abs().sum() > 0
    assert all(a.weight.grad is not None and a.weight.grad.abs().sum() > 0 for a in to_t + to_s)
    with pytest.raises(ValueError, match="adapters"):
        DF.spot_route(x, student, teacher, to_t[:1], to_s, d)
    with pytest.raises(ValueError, match="same number"):
        DF.spot_route(x, student, teacher[:2], to_t, to_s, d)
    with pytest.raises(ValueError, match="decisions"):
        DF.spot_route(x, student, teacher, to_t, to_s, d[:, :2])


def test_spot_route_loss_is_cross_entropy_plus_the_output_hinge():
    rng = np.random.default_rng(2)
    logits, y = rng.standard_normal((4, 5)), np.array([0, 3, 1, 4])
    log_softmax = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    ce = -np.mean([log_softmax[b, y[b]] for b in range(4)])
    z, t = torch.tensor(logits), torch.tensor(y)
    few = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64, requires_grad=True)  # 1 of 4 < 0.5 * 4
    got = DF.spot_route_loss(z, t, few, 0.5)
    assert got.item() == pytest.approx(ce + (2.0 - 1.0), rel=1e-12)
    got.backward()
    assert torch.equal(few.grad, -torch.ones(4, dtype=torch.float64))  # d/dd of (ρB − Σ d)
    many = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    assert DF.spot_route_loss(z, t, many, 0.5).item() == pytest.approx(ce, rel=1e-12)
    assert DF.spot_route_loss(z, t, few.detach(), 0.0).item() == pytest.approx(ce, rel=1e-12)
    with pytest.raises(ValueError):
        DF.spot_route_loss(z, t, many, 1.5)
    with pytest.raises(ValueError):
        DF.spot_route_loss(z, t[:3], many, 0.5)


# ---------------------------------------------------------------------------- the stage splitter

CNN_STAGES = (("stem", "stage1"), "stage2", "stage3", ("avgpool", "pool", "dropout", "fc"))


def _zoo(name: str, **kw) -> nn.Module:
    return create(name, num_classes=10, in_channels=1, **kw)


# (student, teacher, stages): two families of the CIFAR zoo (default stages) and the small CNN
ROUTED_PAIRS = {
    "resnet": (lambda: (_zoo("resnet8"), _zoo("resnet20")), None),
    "wrn": (lambda: (_zoo("wrn_16_1"), _zoo("wrn_16_2")), None),
    "cnn": (lambda: (create("cnn", widths=(4, 8, 8)), create("cnn", widths=(8, 16, 16))), CNN_STAGES),
}


def _stage(model: nn.Module, k: int, x: torch.Tensor) -> torch.Tensor:
    """Stage k of a zoo / small CNN by explicit module calls (independent of StageSplit)."""
    if k == 0:
        return model.stage1(model.stem(x))
    if k in (1, 2):
        return getattr(model, f"stage{k + 1}")(x)
    x = model.avgpool(getattr(model, "head", nn.Identity())(x))
    return model.fc(getattr(model, "dropout", nn.Identity())(model.pool(x)))


@pytest.mark.parametrize("pair", sorted(ROUTED_PAIRS))
def test_stage_split_chains_into_the_models_forward(pair):
    factory, stages = ROUTED_PAIRS[pair]
    student, teacher = factory()
    for model in (student, teacher):
        model.eval()
        split = StageSplit(model, stages or ZOO_STAGES)
        assert len(split) == 4
        x = torch.randn(3, 1, 8, 8)
        outs = split.outputs(x)
        assert torch.equal(outs[-1], model(x))
        f = x
        for k, out in enumerate(outs):
            f = _stage(model, k, f)
            assert torch.equal(out, f), k


def test_stage_split_detached_parameters_pass_input_gradient_only_and_errors():
    model = _zoo("resnet8").eval()
    split = StageSplit(model, ZOO_STAGES, model_name="student")
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    h = split(0, x, detach_params=True)
    split(1, h, detach_params=True).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
    split(1, split(0, x)).sum().backward()  # without detaching, the parameters do get gradients
    assert any(p.grad is not None for p in model.stage2.parameters())
    assert "stage1" in split.describe(0)
    with pytest.raises(TapError, match="stage9"):
        StageSplit(model, ["stem", "stage9"])
    with pytest.raises(ValueError, match="non-empty"):
        StageSplit(model, [])
    with pytest.raises(ValueError, match="non-empty"):
        StageSplit(model, ["stem", ()])
    with pytest.raises(ValueError, match=":input"):
        StageSplit(model, ["stem:input"])
    with pytest.raises(TypeError):
        StageSplit("resnet8", ["stem"])  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- multi-path routing: the method


def routed(pair: str = "resnet", **kw):
    """A Distiller with the routing method, prepared on 4 images of 8x8; its views from one step."""
    torch.manual_seed(0)
    factory, stages = ROUTED_PAIRS[pair]
    student, teacher = factory()
    if stages is not None:
        kw = {"student_stages": stages, "teacher_stages": stages, **kw}
    m = SpotAdaptive(**kw)
    d = distill.Distiller(student, teacher, losses={"ce": 1.0, "spot_adaptive": m})
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([1, 0, 3, 2])
    d.prepare((x, y))
    return d, m, student, teacher, Batch(x, y)


def _routed_path(m, student, teacher, x, path):
    f, prev = x, None
    for k, use_teacher in enumerate(path):
        if prev is not None and use_teacher != prev:
            f = m.route_adapters[f"to_{'teacher' if use_teacher else 'student'}_{k - 1}"](f)
        f = _stage(teacher if use_teacher else student, k, f)
        prev = use_teacher
    return f


@pytest.mark.parametrize("pair", sorted(ROUTED_PAIRS))
def test_route_equals_stage_by_stage_paths_for_hand_set_decisions(pair):
    d, m, student, teacher, _ = routed(pair)
    d.eval()  # adapters' BatchNorm on running statistics: every sample independent of the others
    x = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(m.route(x, torch.ones(8, 4)), teacher(x))  # the teacher's path: the teacher
        assert torch.equal(m.route(x, torch.zeros(8, 4)), student(x))  # the student's path: the student
        paths = [(1, 0, 1, 0), (0, 1, 1, 0), (0, 0, 0, 1), (1, 1, 0, 0), (0, 1, 0, 1), (1, 0, 0, 1),
                 (1, 1, 1, 0), (0, 0, 1, 1)]
        got = m.route(x, torch.tensor(paths, dtype=torch.float32))
        for b, path in enumerate(paths):
            want = _routed_path(m, student, teacher, x[b : b + 1], path)
            assert torch.allclose(got[b : b + 1], want, atol=1e-5, rtol=1e-4), path


def test_route_trains_policy_and_adapters_never_the_models():
    d, m, student, teacher, batch = routed()
    d.train()
    buffers = {k: v.clone() for k, v in student.state_dict().items()}
    out = d(batch)
    ss = [out.student[s] for s, _ in m.pairs]
    ts = [out.teacher[t] for _, t in m.pairs]
    decisions = m.decisions(m.policy_logits(ss, ts))  # straight-through Gumbel, with gradient
    student.zero_grad()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    DF.cross_entropy(m.route(batch.inputs, decisions), batch.targets).backward()
    assert student.training and not teacher.training  # modes restored after the eval-mode routed pass
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())  # BN stats untouched
    assert any(not torch.equal(v, buffers[k]) for k, v in student.state_dict().items())  # (the step's own did)
    assert all(p.grad is None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.policy.parameters())
    for name, p in m.route_adapters.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in m.route_adapters.parameters())


def test_policy_gradient_comes_from_the_multi_path_task_loss():
    d, m, _, teacher, batch = routed()
    d.train()
    d(batch).total.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.policy.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert set(m.last_losses) == {"hint", "kd", "route"}
    # without the routed network's loss, the gated terms send the policy nothing (decisions detached)
    d2, m2, *_, batch2 = routed(route=0.0)
    d2.train()
    d2(batch2).total.backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in m2.policy.parameters())
    assert "route" not in m2.last_losses


def test_routed_objective_equals_its_terms_computed_by_hand():
    d, m, student, teacher, batch = routed(hint=0.5, kd=2.0, T=3.0, route=0.7, min_teacher_frac=0.75)
    d.eval()
    with torch.no_grad():
        out = d(batch)
        dec = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 0, 1], [0, 1, 1, 0]], dtype=torch.float32)
        m.set_decisions(dec)
        got = m(out.student, out.teacher, batch).item()
        assert torch.equal(m.last_decisions, dec)
        B = 4
        hint = 0.0
        for k, ((s_path, t_path), adapter) in enumerate(zip(m.pairs, m.adapters.values())):
            diff = adapter(out.student[s_path]) - out.teacher[t_path]
            for b in range(B):
                hint += float(dec[b, k]) * 0.5 * float(diff[b].pow(2).sum()) / B
        kd = 0.0
        for b in range(B):
            p = torch.softmax(out.teacher["logits"][b] / 3.0, 0)
            q = torch.softmax(out.student["logits"][b] / 3.0, 0)
            kd += float(dec[b, 3]) * 9.0 * float((p * (p.log() - q.log())).sum()) / B
        routed_logits = torch.cat([_routed_path(m, student, teacher, batch.inputs[b : b + 1], dec[b].tolist())
                                   for b in range(B)])
        ce = float(nn.functional.cross_entropy(routed_logits, batch.targets))
        hinge = max(0.0, 0.75 * B - float(dec[:, 3].sum()))  # 2 of 4 take the teacher's output: 1 short
        assert hinge == 1.0
        want = 0.5 * hint + 2.0 * kd + 0.7 * (ce + hinge)
        assert got == pytest.approx(want, rel=1e-4)
        assert float(m.last_losses["route"]) == pytest.approx(ce + hinge, rel=1e-4)
    with pytest.raises(ValueError, match="injected"):
        m.set_decisions(torch.zeros(4, 3))
        m(out.student, out.teacher, batch)
    m.set_decisions(None)
    with pytest.raises(ValueError, match="targets"):
        m(out.student, out.teacher, Batch(batch.inputs))


def test_distill_bias_starts_every_decision_on_the_teacher():
    d, m, *_ , batch = routed(distill_bias=10.0)
    assert m.policy[-1].out_features == 2 * 4 and m.num_decisions == 4
    d.train()
    d(batch)
    assert torch.equal(m.last_decisions, torch.ones(4, 4))  # logit gap 10: the Gumbel noise never flips it


def test_routing_errors_are_clear():
    with pytest.raises(ValueError, match="need 4"):
        SpotAdaptive(student_stages=("stem", "stage1", "stage2"))
    student, teacher, batch = make_views()
    m = SpotAdaptive()
    with pytest.raises(RuntimeError, match="bind_models"), torch.no_grad():
        m.prepare(student, teacher, batch)
    s, t = _zoo("resnet8"), _zoo("resnet20")
    with pytest.raises(TypeError, match="one teacher network"):
        m.bind_models(s, EnsembleTeacher([t, _zoo("resnet20")]))
    with pytest.raises(TypeError, match="one teacher network"):  # what the Distiller passes for an ensemble
        m.bind_models(s, None)
    with pytest.raises(TapError, match="head"):  # the zoo's default stages on a model without a head
        SpotAdaptive().bind_models(*CNN_PAIRS["cnn"]())
    # stages that do not end at the spots' taps
    shifted = ("stem", "stage1", ("stage2", "stage3"), ("head", "avgpool", "pool", "fc"))
    bad = SpotAdaptive(student_stages=shifted, teacher_stages=shifted)
    d = distill.Distiller(s, t, losses={"spot_adaptive": bad})
    with pytest.raises(ValueError, match="does not end at"):
        d.prepare((torch.randn(2, 1, 8, 8), torch.tensor([0, 1])))
    SpotAdaptive(routing=False).bind_models(s, None)  # a no-op without routing
    with pytest.raises(ValueError):
        SpotAdaptive(min_teacher_frac=2.0)
    with pytest.raises(ValueError):
        SpotAdaptive(kd=-1.0)


@pytest.mark.parametrize("pair", ["resnet", "wrn"])
def test_end_to_end_routing_fit_leaves_the_teacher_untouched(pair, tmp_path):
    torch.manual_seed(0)
    factory, _ = ROUTED_PAIRS[pair]
    student, teacher = factory()
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}  # weights and BN buffers
    student_state = {k: v.clone() for k, v in student.state_dict().items()}
    method = SpotAdaptive()
    d = distill.Distiller(student, teacher, losses={"ce": 1.0, "spot_adaptive": method})
    x, y, loader = tiny_loader()
    method_params, before = prepare_and_snapshot(d, method, loader)
    assert {n.split(".")[0] for n, _ in method.named_parameters()} == {"adapters", "route_adapters", "policy"}
    res = distill.fit(d, loader, loader, epochs=2, lr=0.01, schedule="constant", run_dir=tmp_path, progress=False)
    assert len(res.history) == 2 and all(np.isfinite(h["train_loss"]) for h in res.history)
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())
    assert any(not torch.equal(v, student_state[k]) for k, v in student.state_dict().items())
    for name, p in method.named_parameters():  # policy and routing adapters learn too
        if name.startswith(("policy", "route_adapters")):
            assert any(p is q for q in method_params)
    changed = {n.split(".")[0] for (n, p), b in zip(method.named_parameters(), before) if not torch.equal(p, b)}
    assert {"policy", "route_adapters", "adapters"} <= changed
    assert not any(k.startswith(("student", "teacher")) for k in method.state_dict())  # models not saved with it
    d.eval()
    out = d((x[:4], y[:4]))
    assert torch.isfinite(out.parts["spot_adaptive"]) and method.last_decisions.shape == (4, 4)
