"""AB (activation boundaries) and OFD (overhaul of feature distillation).

The losses against hand-worked numbers and independent formulations, OFD's margin against
numerical integration of the Gaussian, the BN lookup on the model zoo, the methods on synthetic
views (gradients reach the student and the connectors, never the teacher) and end to end
through the Distiller, ``fit`` and ``fit_hint_stage``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import distill
from distill import functional as DF
from distill.adapters import ShapeMismatchError
from distill.batch import Batch
from distill.methods import AB, OFD, create_method, list_methods, method_info
from distill.methods.boundaries import find_bn_before
from distill.models import create

PRE = [("stage1.pre", "stage1.pre"), ("stage2.pre", "stage2.pre"), ("stage3.pre", "stage3.pre")]


def rand(seed: int, *shape: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


# ---------------------------------------------------------------------------- registry


def test_registered_with_paper_family_and_defaults():
    assert {"ab", "ofd"} <= {i.name for i in list_methods("features")}
    ab, ofd = method_info("ab"), method_info("ofd")
    assert ab.paper.arxiv == "1811.03233" and ab.paper.year == 2019 and ab.paper.venue == "AAAI"
    assert ofd.paper.arxiv == "1904.01866" and ofd.paper.year == 2019 and ofd.paper.venue == "ICCV"
    assert "Heo" in ab.paper.authors and "Heo" in ofd.paper.authors
    assert ab.defaults["margin"] == 1.0 and ab.defaults["weight"] == 1.0
    assert ab.defaults["layer_weights"] is None
    assert ofd.defaults["weight"] == 1e-3 and ofd.defaults["margins"] is None
    for info in (ab, ofd):
        assert [tuple(p) for p in info.defaults["pairs"]] == PRE
        assert info.summary and info.cls.requires_prepare


# ---------------------------------------------------------------------------- AB loss


def test_ab_loss_hand_example():
    # one sample, 4 neurons; μ = 1
    s = torch.tensor([[0.5, 2.0, -0.5, -3.0]], dtype=torch.float64)
    t = torch.tensor([[1.0, 0.2, -1.0, 0.0]], dtype=torch.float64)  # active, active, off, off (0 is off)
    # active: relu(1 - s)²  -> 0.25, 0;  off: relu(1 + s)² -> 0.25, 0
    assert DF.ab_alternative_loss(s, t, 1.0).item() == pytest.approx(0.5)
    # margin 2: active -> 1.5², 0; off -> 1.5², 0
    assert DF.ab_alternative_loss(s, t, 2.0).item() == pytest.approx(4.5)
    # per-sample sum, mean over the batch
    s2, t2 = torch.cat([s, -s]), torch.cat([t, t])
    want = (0.5 + (1.5**2 + 3.0**2 + 1.5**2 + 4.0**2)) / 2  # -s = [-0.5, -2, 0.5, 3]
    assert DF.ab_alternative_loss(s2, t2, 1.0).item() == pytest.approx(want)


def test_ab_loss_matches_the_authors_masked_formulation_and_layer_weights():
    s, t = rand(1, 3, 4, 5, 5), rand(2, 3, 4, 5, 5)
    mu = 1.0
    # the authors' form: (s + μ)² where s > -μ and t <= 0, (s - μ)² where s <= μ and t > 0
    ref = ((s + mu) ** 2 * ((s > -mu) & (t <= 0)) + (s - mu) ** 2 * ((s <= mu) & (t > 0))).sum() / 3
    assert DF.ab_alternative_loss(s, t, mu).item() == pytest.approx(ref.item(), rel=1e-12)
    s2, t2 = rand(3, 3, 2, 2, 2), rand(4, 3, 2, 2, 2)
    l1, l2 = DF.ab_alternative_loss(s, t), DF.ab_alternative_loss(s2, t2)
    assert DF.ab_loss([s, s2], [t, t2]).item() == pytest.approx((l1 + l2).item())
    assert DF.ab_loss([s, s2], [t, t2], layer_weights=(0.5, 1.0)).item() == pytest.approx((0.5 * l1 + l2).item())
    with pytest.raises(ValueError, match="layer_weights"):
        DF.ab_loss([s], [t], layer_weights=(1.0, 2.0))
    with pytest.raises(ValueError, match="shapes differ"):
        DF.ab_alternative_loss(s, t[:, :2])


def test_ab_loss_is_zero_beyond_the_margin_and_agreement_metric():
    t = rand(5, 2, 3, 4, 4)
    s = torch.where(t > 0, 1.5, -1.5).to(t.dtype)
    assert DF.ab_alternative_loss(s, t).item() == 0.0
    assert DF.activation_agreement(s, t).item() == 1.0
    assert DF.activation_agreement(-s, t).item() == 0.0
    assert DF.ab_alternative_loss(-s, t).item() > 0


# ---------------------------------------------------------------------------- OFD margin


def numeric_margin(gamma: float, beta: float) -> float:
    """E[x | x < 0] for x ~ N(beta, gamma²) by the trapezoid rule on a fine grid."""
    s = abs(gamma)
    lo = min(beta, 0.0) - 14 * s
    x = torch.linspace(lo, 0.0, 400_001, dtype=torch.float64)
    pdf = torch.exp(-0.5 * ((x - beta) / s) ** 2)
    return (torch.trapz(x * pdf, x) / torch.trapz(pdf, x)).item()


@pytest.mark.parametrize("gamma,beta", [(1.0, 0.0), (2.0, -1.0), (0.5, 1.0), (-1.5, 0.3), (1.0, 3.0),
                                        (0.3, -2.0), (1.0, 5.0)])
def test_ofd_margin_matches_numerical_integration(gamma, beta):
    m = DF.ofd_margin(torch.tensor([gamma], dtype=torch.float64), torch.tensor([beta], dtype=torch.float64))
    assert m.dtype == torch.float64 and m.shape == (1,)
    assert m.item() == pytest.approx(numeric_margin(gamma, beta), rel=1e-5, abs=1e-8)
    assert m.item() < 0


def test_ofd_margin_closed_form_tails_and_degenerate_channels():
    # β = 0: E[x | x < 0] = -γ √(2/π)
    m = DF.ofd_margin(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0]))
    assert torch.allclose(m, torch.tensor([-1.0, -2.0]) * math.sqrt(2 / math.pi))
    assert m.dtype == torch.float32
    # far tails stay finite: β ≫ γ -> m ≈ -γ²/β (→ 0⁻), β ≪ -γ -> m ≈ β
    w, b = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64), torch.tensor([40.0, -40.0, 2.0, -2.0],
                                                                                   dtype=torch.float64)
    m = DF.ofd_margin(w, b)
    assert torch.isfinite(m).all()
    assert m[0].item() == pytest.approx(-1 / 40, rel=2e-3) and m[0].item() < 0
    assert m[1].item() == pytest.approx(-40.0, rel=1e-12)
    assert m[2].item() == 0.0 and m[3].item() == -2.0  # γ = 0: the constant β (or 0 when positive)
    with pytest.raises(ValueError, match=r"\(C,\)"):
        DF.ofd_margin(torch.ones(2, 2), torch.ones(2, 2))


# ---------------------------------------------------------------------------- OFD loss


def test_margin_relu_per_channel():
    t = torch.tensor([[[[-3.0, 1.0]], [[-0.1, -2.0]]]])  # (1, 2, 1, 2)
    out = DF.margin_relu(t, torch.tensor([-1.0, -0.5]))
    assert torch.equal(out, torch.tensor([[[[-1.0, 1.0]], [[-0.1, -0.5]]]]))
    with pytest.raises(ValueError, match="margin"):
        DF.margin_relu(t, torch.tensor([-1.0, -1.0, -1.0]))


def test_partial_l2_mask_on_a_hand_example():
    #                 T>0, S<T  T>0,S>T  T<0,S<T(skip) T<0,S>T  T=0,S<0(skip)  T=0,S>0  T<0,S=T(skip)
    t = torch.tensor([[2.0, 1.0, -1.0, -1.0, 0.0, 0.0, -0.5]], dtype=torch.float64)
    s = torch.tensor([[0.0, 3.0, -4.0, 0.5, -2.0, 1.0, -0.5]], dtype=torch.float64)
    want = 4.0 + 4.0 + 0.0 + 2.25 + 0.0 + 1.0 + 0.0
    assert DF.ofd_partial_l2(s, t).item() == pytest.approx(want)
    # per-sample sum, mean over the batch
    assert DF.ofd_partial_l2(torch.cat([s, t]), torch.cat([t, t])).item() == pytest.approx(want / 2)


def test_ofd_loss_matches_the_authors_masked_mse_and_layer_weights():
    s, t = rand(7, 2, 3, 4, 4), rand(8, 2, 3, 4, 4)
    m = DF.ofd_margin(rand(9, 3).abs() + 0.1, rand(10, 3))
    target = torch.maximum(t, m.view(1, -1, 1, 1))
    ref = ((s - target) ** 2 * ((s > target) | (target > 0))).sum() / 2  # the authors' mask, / batch
    assert DF.ofd_loss([s], [t], [m]).item() == pytest.approx(ref.item(), rel=1e-12)
    assert DF.ofd_loss([s, s], [t, t], [m, m], layer_weights=(0.25, 1.0)).item() == pytest.approx(1.25 * ref.item())
    with pytest.raises(ValueError, match="margin"):
        DF.ofd_loss([s], [t], [m, m])


# ---------------------------------------------------------------------------- methods on synthetic views

B = 4


def make_views(seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape):
        return torch.randn(*shape, generator=g).requires_grad_(True)

    student = {"logits": leaf(B, 10), "stage1.pre": leaf(B, 4, 8, 8), "stage2.pre": leaf(B, 6, 4, 4),
               "stage3.pre": leaf(B, 8, 2, 2)}
    teacher = {"logits": leaf(B, 10), "stage1.pre": leaf(B, 8, 8, 8), "stage2.pre": leaf(B, 12, 4, 4),
               "stage3.pre": leaf(B, 16, 2, 2)}
    return student, teacher, Batch(torch.zeros(B, 1, 8, 8), torch.arange(B) % 10)


def margins_for(teacher):
    return [DF.ofd_margin(torch.rand(teacher[t].shape[1]) + 0.5, torch.randn(teacher[t].shape[1])) for _, t in PRE]


def build(name, teacher):
    return AB() if name == "ab" else OFD(margins=margins_for(teacher))


@pytest.mark.parametrize("name", ["ab", "ofd"])
def test_gradients_reach_student_and_connectors_never_teacher(name):
    student, teacher, batch = make_views()
    m = build(name, teacher)
    with torch.no_grad():
        m.prepare(student, teacher, batch)
    assert sorted(m.connectors) == ["stage1_pre__stage1_pre", "stage2_pre__stage2_pre", "stage3_pre__stage3_pre"]
    loss = m(student, teacher, batch)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    for key in m.student_taps:
        g = student[key].grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, key
    assert all(t.grad is None for t in teacher.values())
    assert student["logits"].grad is None
    params = list(m.named_parameters())
    assert params and m.hint_parameters()
    for pname, p in params:
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    assert not [n for n, _ in params if "margin" in n]  # margins are buffers, never trained
    if name == "ofd":
        assert sorted(n for n, _ in m.named_buffers() if n.startswith("margin")) == ["margin_0", "margin_1", "margin_2"]


def test_methods_match_functional_and_prepare_is_idempotent():
    student, teacher, batch = make_views(1)
    ab = AB(pairs=PRE[1:], margin=0.5, layer_weights=(0.5, 1.0))
    ab.prepare(student, teacher, batch)
    c = ab.connectors
    ab.prepare(student, teacher, batch)
    assert ab.connectors is c
    rs = [c["stage2_pre__stage2_pre"](student["stage2.pre"]), c["stage3_pre__stage3_pre"](student["stage3.pre"])]
    want = DF.ab_loss(rs, [teacher["stage2.pre"], teacher["stage3.pre"]], 0.5, (0.5, 1.0))
    assert torch.allclose(ab(student, teacher, batch), want)
    assert len(ab.agreement(student, teacher)) == 2
    ms = margins_for(teacher)
    ofd = OFD(pairs=PRE[:1], margins=ms[:1])
    ofd.prepare(student, teacher, batch)
    r = ofd.connectors["stage1_pre__stage1_pre"](student["stage1.pre"])
    assert torch.allclose(ofd(student, teacher, batch), DF.ofd_loss([r], [teacher["stage1.pre"]], ms[:1]))


def test_clear_errors():
    student, teacher, batch = make_views()
    for m in (AB(), OFD(margins=margins_for(teacher))):
        with pytest.raises(RuntimeError, match="prepare"):
            m(student, teacher, batch)
    with pytest.raises(RuntimeError, match="from_teacher"):
        create_method("ofd").prepare(student, teacher, batch)
    bad = margins_for(teacher)
    bad[1] = bad[1][:3]
    with pytest.raises(ShapeMismatchError, match="teacher:stage2.pre"):
        OFD(margins=bad).prepare(student, teacher, batch)
    with pytest.raises(ValueError, match="3 pairs"):
        OFD(margins=bad[:2])
    with pytest.raises(TypeError, match="from_teacher"):
        OFD(teacher_bn=["stage1.body.1"] * 3)
    with pytest.raises(ValueError, match="layer_weights"):
        AB(layer_weights=(1.0,))
    student["stage2.pre"] = torch.randn(B, 6, 3, 3)  # spatial sizes differ: a 1x1 connector cannot fix that
    with pytest.raises(ShapeMismatchError, match="spatial"):
        AB().prepare(student, teacher, batch)
    with pytest.raises(KeyError, match="no tap"):
        AB(pairs=[("nope", "stage1.pre")]).prepare(student, teacher, batch)


# ---------------------------------------------------------------------------- teacher BN lookup


def test_find_bn_before_on_the_zoo():
    taps = [t for _, t in PRE]
    assert find_bn_before(create("cnn"), taps) == ["stage1.body.1", "stage2.body.2", "stage3.body.2"]
    # residual stages: the residual branch's last BN, not the projection shortcut's (run after it)
    assert find_bn_before(create("resnet8x4"), taps) == [f"stage{k}.blocks.0.bn2" for k in (1, 2, 3)]
    assert find_bn_before(create("wrn_16_2"), taps) == ["stage1.norm", "stage2.norm", "stage3.norm"]
    with pytest.raises(ValueError, match="bn_paths"):
        find_bn_before(create("ShuffleV2"), ["stage1.pre"])


def test_from_teacher_margins_equal_those_of_the_bn_and_accepts_modules():
    torch.manual_seed(0)
    teacher = create("cnn", widths=(8, 16, 16))
    for bn in (teacher.stage1.body[1], teacher.stage2.body[2], teacher.stage3.body[2]):
        bn.weight.data.uniform_(0.5, 2.0)
        bn.bias.data.normal_()
    m = OFD.from_teacher(distill.teachers.FrozenTeacher(teacher))
    assert m.bn_paths == ["stage1.body.1", "stage2.body.2", "stage3.body.2"]
    bn3 = teacher.stage3.body[2]
    assert torch.allclose(m.margin_2, DF.ofd_margin(bn3.weight, bn3.bias))
    explicit = OFD.from_teacher(teacher, PRE[2:], bn_paths=["stage3.body.2"], weight=0.5)
    assert torch.equal(explicit.margin_0, m.margin_2) and explicit.weight == 0.5
    by_module = OFD(pairs=PRE[2:], teacher_bn=[bn3])
    by_tuple = OFD(pairs=PRE[2:], teacher_bn=[(bn3.weight.detach(), bn3.bias.detach())])
    assert torch.equal(by_module.margin_0, m.margin_2) and torch.equal(by_tuple.margin_0, m.margin_2)
    assert not any(p is q for p in by_module.parameters() for q in teacher.parameters())


# ---------------------------------------------------------------------------- end to end

PAIRS = {
    "cnn": (lambda: create("cnn", widths=(4, 8, 8)), lambda: create("cnn", widths=(8, 16, 16)), (1, 8)),
    "digits": (lambda: create("cnn_digits_student"), lambda: create("cnn_digits_teacher"), (1, 8)),
    "cifar": (lambda: create("resnet8", num_classes=10), lambda: create("resnet8x4", num_classes=10), (3, 32)),
}


@pytest.mark.parametrize("name", ["ab", "ofd"])
@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_end_to_end_through_the_distiller_and_fit(name, pair):
    torch.manual_seed(0)
    make_s, make_t, (c, hw) = PAIRS[pair]
    student, teacher = make_s(), make_t()
    method = AB() if name == "ab" else OFD.from_teacher(teacher)
    d = distill.Distiller(student, teacher, losses={"ce": 1.0, "kd": 1.0, name: method})
    x, y = torch.randn(8, c, hw, hw), torch.arange(8) % 10
    d.prepare((x[:4], y[:4]))
    params = list(d.trainable_parameters())
    assert all(any(p is q for q in params) for p in method.parameters())
    out = d((x[:4], y[:4]))
    assert torch.isfinite(out.total) and out.parts[name].item() > 0
    out.total.backward()
    assert all(p.grad is None for p in teacher.parameters())
    for p in method.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    d.zero_grad()
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    res = distill.fit(d, loader, None, epochs=1, lr=1e-4, schedule="constant", progress=False, eval_teacher=False)
    assert math.isfinite(res.history[0][f"train_{name}"])


def test_ab_initialisation_stage_with_fit_hint_stage_trains_connectors_and_lower_layers_only():
    torch.manual_seed(0)
    student, teacher = create("cnn", widths=(4, 8, 8)), create("cnn", widths=(8, 16, 16))
    ab = AB(pairs=PRE[:2])
    d = distill.Distiller(student, teacher, losses={"ce": 1.0, "kd": 1.0, "ab": ab})
    x, y = torch.randn(16, 1, 8, 8), torch.arange(16) % 10
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    before = {k: v.detach().clone() for k, v in student.state_dict().items()}
    res = distill.fit_hint_stage(d, loader, method="ab", epochs=2, lr=1e-3, schedule="constant",
                                 progress=False, eval_teacher=False)
    assert ab.connectors is not None and d.prepared
    conn_before = {k: v.detach().clone() for k, v in ab.state_dict().items()}
    hist = [h["train_ab"] for h in res.history]
    assert hist[-1] < hist[0]
    after = student.state_dict()
    assert not torch.equal(before["stage1.body.0.weight"], after["stage1.body.0.weight"])
    assert not torch.equal(before["stage2.body.1.weight"], after["stage2.body.1.weight"])
    assert torch.equal(before["stage3.body.1.weight"], after["stage3.body.1.weight"])
    assert torch.equal(before["fc.weight"], after["fc.weight"])
    # stage 2 (KD) reuses the same Distiller and its trained connectors
    distill.fit(d, loader, None, epochs=1, lr=1e-3, schedule="constant", progress=False, eval_teacher=False)
    assert ab.connectors is not None and set(ab.state_dict()) == set(conn_before)
