"""EC-KD (Wang, Fu, Liao, Wang, Lei, Mei, ECCV 2020): position-aware weight exclusivity and hardness-aware
feature consistency, against hand-worked numbers, plain numpy loops and invariants."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import distill
from distill import functional as DF
from distill.batch import Batch
from distill.methods import create_method
from distill.models import create


def np_exclusivity_loop(w, normalize, reduction):
    """The O(N^2 D) definition: sum over ordered pairs i != j of ||w_i * w_j||_1."""
    w = np.asarray(w, dtype=np.float64).reshape(len(w), -1)
    if normalize:
        w = w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
    n, total = len(w), 0.0
    for i in range(n):
        for j in range(n):
            if i != j:
                total += sum(abs(w[i, k] * w[j, k]) for k in range(w.shape[1]))
    return total / (n * (n - 1)) if reduction == "mean" else total


def np_hfc(s, t, gamma, normalize):
    s, t = np.asarray(s, dtype=np.float64), np.asarray(t, dtype=np.float64)
    if normalize:
        s = s / np.linalg.norm(s, axis=1, keepdims=True)
        t = t / np.linalg.norm(t, axis=1, keepdims=True)
    d = ((s - t) ** 2).sum(1)
    w = np.exp(gamma * d) / np.exp(gamma * d).sum() * len(d)
    return float((w * d).mean())


# --------------------------------------------------------------------------------------------- exclusivity


def test_exclusivity_by_hand():
    w = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.0, 1.0]], dtype=torch.float64)
    # unordered pairs: (1,2): |1*3| + |2*-1| = 5; (1,3): 0 + 2 = 2; (2,3): 0 + 1 = 1 -> 8, ordered 16
    assert DF.weight_exclusivity(w, normalize=False, reduction="sum").item() == pytest.approx(16.0, abs=1e-12)
    assert DF.weight_exclusivity(w, normalize=False, reduction="mean").item() == pytest.approx(16.0 / 6, abs=1e-12)
    # unit filters: norms sqrt5, sqrt10, 1
    pairs = 5 / math.sqrt(50) + 2 / math.sqrt(5) + 1 / math.sqrt(10)
    assert DF.weight_exclusivity(w).item() == pytest.approx(2 * pairs / 6, abs=1e-12)
    assert DF.weight_exclusivity(w, reduction="sum").item() == pytest.approx(2 * pairs, abs=1e-12)


@pytest.mark.parametrize("shape", [(6, 3, 3, 3), (5, 7), (4, 2, 5), (3, 1, 1, 1, 2)])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_closed_form_equals_the_pair_loop(shape, normalize, reduction):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)), dtype=torch.float64)
    got = DF.weight_exclusivity(w, normalize=normalize, reduction=reduction).item()
    assert got == pytest.approx(np_exclusivity_loop(w.numpy(), normalize, reduction), rel=1e-10)


def test_exclusivity_is_position_aware_not_value_aware():
    # disjoint supports: zero, whatever the values
    assert DF.weight_exclusivity(torch.tensor([[5.0, 0.0, 0.0], [0.0, -2.0, 0.0], [0.0, 0.0, 9.0]])).item() == 0.0
    # orthogonal filters on the same positions (an orthogonality penalty would be 0): |1*1| + |1*-1| = 2 / 2
    assert DF.weight_exclusivity(torch.tensor([[1.0, 1.0], [1.0, -1.0]])).item() == pytest.approx(1.0)
    # identical unit filters: every pair overlaps fully, ||w||^2 = 1
    assert DF.weight_exclusivity(torch.tensor([[0.6, 0.8]] * 4)).item() == pytest.approx(1.0)


def test_exclusivity_gradient_matches_the_loop_by_autograd():
    w = torch.randn(4, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64, requires_grad=True)
    DF.weight_exclusivity(w, reduction="sum").backward()
    w2 = w.detach().clone().requires_grad_(True)
    u = w2 / w2.norm(dim=1, keepdim=True)
    sum((u[i] * u[j]).abs().sum() for i in range(4) for j in range(4) if i != j).backward()
    assert torch.allclose(w.grad, w2.grad, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 6), d=st.integers(1, 9),
       scale=st.floats(0.01, 100.0))
def test_exclusivity_invariants(seed, n, d, scale):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, d, generator=g, dtype=torch.float64)
    e = DF.weight_exclusivity(w)
    assert 0.0 <= e.item() <= 1.0 + 1e-12  # mean over pairs of unit filters (Cauchy-Schwarz)
    per_filter = torch.rand(n, 1, generator=g, dtype=torch.float64) * scale + 1e-3
    assert DF.weight_exclusivity(w * per_filter).item() == pytest.approx(e.item(), rel=1e-9, abs=1e-12)
    assert DF.weight_exclusivity(w[torch.randperm(n, generator=g)]).item() == pytest.approx(e.item(), rel=1e-9,
                                                                                           abs=1e-12)
    raw = DF.weight_exclusivity(w, normalize=False, reduction="sum").item()
    assert DF.weight_exclusivity(w * scale, normalize=False, reduction="sum").item() == pytest.approx(
        raw * scale ** 2, rel=1e-9, abs=1e-12)


# --------------------------------------------------------------------------------------------- consistency


def test_hardness_aware_consistency_by_hand():
    s = torch.tensor([[2.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    t = torch.tensor([[1.0, 0.0], [5.0, 0.0]], dtype=torch.float64)
    # unit vectors: d = [0, 2]; gamma 0.5: weights 2*softmax([0, 1]) -> L = (1/2) * 2 * e/(1+e) * 2
    e = math.e
    assert DF.hardness_aware_consistency(s, t, hardness=0.5).item() == pytest.approx(2 * e / (1 + e), abs=1e-12)
    assert DF.hardness_aware_consistency(s, t, hardness=0.0).item() == pytest.approx(1.0, abs=1e-12)
    # raw features: d = [1, 9 + 25 = 34]
    raw = (1 * 1 + 34 * math.exp(34 * 0.1 - 0.1)) / (1 + math.exp(34 * 0.1 - 0.1))
    assert DF.hardness_aware_consistency(s, t, hardness=0.1, normalize=False).item() == pytest.approx(raw, rel=1e-12)


@pytest.mark.parametrize("gamma,normalize", [(0.0, True), (1.7, True), (0.3, False)])
def test_consistency_against_numpy(gamma, normalize):
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(7, 5, generator=g, dtype=torch.float64)
    got = DF.hardness_aware_consistency(s, t, hardness=gamma, normalize=normalize).item()
    assert got == pytest.approx(np_hfc(s.numpy(), t.numpy(), gamma, normalize), rel=1e-10)


def test_hardness_weights_carry_no_gradient_unless_asked():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    DF.hardness_aware_consistency(s, t, hardness=2.0, normalize=False).backward()
    d = ((s - t) ** 2).sum(1).detach()
    w = torch.softmax(2.0 * d, 0)
    assert torch.allclose(s.grad, 2 * w[:, None] * (s - t).detach(), atol=1e-12)  # d/ds of sum_b w_b d_b, w fixed
    assert t.grad is None  # the teacher is a target
    s.grad = None
    DF.hardness_aware_consistency(s, t, hardness=2.0, normalize=False, detach_weights=False).backward()
    assert not torch.allclose(s.grad, 2 * w[:, None] * (s - t).detach(), atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), b=st.integers(1, 6), scale=st.floats(0.01, 100.0),
       gamma=st.floats(0.0, 5.0))
def test_consistency_invariants(seed, b, scale, gamma):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(b, 4, generator=g, dtype=torch.float64), torch.randn(b, 4, generator=g, dtype=torch.float64)
    loss = DF.hardness_aware_consistency(s, t, hardness=gamma)
    assert 0.0 <= loss.item() <= 4.0 + 1e-12
    assert DF.hardness_aware_consistency(t * scale, t, hardness=gamma).item() == pytest.approx(0.0, abs=1e-12)
    assert DF.hardness_aware_consistency(s * scale, t / scale, hardness=gamma).item() == pytest.approx(
        loss.item(), rel=1e-9, abs=1e-12)
    # a harder batch weighting never lowers the loss below the plain mean (weights grow with d)
    assert loss.item() >= DF.hardness_aware_consistency(s, t, hardness=0.0).item() - 1e-12


# --------------------------------------------------------------------------------------------- bad input


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="at least 2 dims"):
        DF.weight_exclusivity(torch.ones(4))
    with pytest.raises(ValueError, match="at least 2 non-empty filters"):
        DF.weight_exclusivity(torch.ones(1, 5))
    with pytest.raises(ValueError, match="reduction"):
        DF.weight_exclusivity(torch.ones(3, 5), reduction="max")
    with pytest.raises(ValueError, match=r"\(4, 3\) and \(4, 2\)"):
        DF.hardness_aware_consistency(torch.ones(4, 3), torch.ones(4, 2))
    with pytest.raises(ValueError, match="hardness"):
        DF.hardness_aware_consistency(torch.ones(4, 3), torch.ones(4, 3), hardness=-1.0)
    with pytest.raises(ValueError, match="hardness"):
        DF.hardness_aware_consistency(torch.ones(4, 3), torch.ones(4, 3), hardness=float("nan"))
    with pytest.raises(ValueError, match="both 0"):
        create_method("ec_kd", consistency_weight=0, exclusivity_weight=0)
    with pytest.raises(ValueError, match="exclusivity_weight"):
        create_method("ec_kd", exclusivity_weight=-0.1)
    with pytest.raises(ValueError, match="skip"):
        create_method("ec_kd", skip="fc")
    with pytest.raises(ValueError, match="no conv/linear layer"):
        create_method("ec_kd", student_model=nn.Sequential(nn.ReLU()))
    m = create_method("ec_kd", consistency_weight=0.0)
    with pytest.raises(RuntimeError, match="student network"):
        m({"pool": torch.ones(2, 3)}, {"pool": torch.ones(2, 3)}, Batch(torch.ones(2, 1)))


# --------------------------------------------------------------------------------------------- the method


def _cnn(widths=(4, 6, 8), classes=5):
    return create("cnn", num_classes=classes, in_channels=1, widths=widths)


def test_method_sums_both_terms_over_the_chosen_layers():
    torch.manual_seed(0)
    student = _cnn()
    m = create_method("ec_kd", consistency_weight=0.7, exclusivity_weight=0.3, hardness=2.0, skip=("fc",),
                      student_model=student)
    convs = [n for n, x in student.named_modules() if isinstance(x, nn.Conv2d)]
    assert m.layer_names == convs and "fc" not in m.layer_names and len(convs) >= 4
    with_fc = create_method("ec_kd", student_model=student)
    assert with_fc.layer_names == convs + ["fc"]
    assert create_method("ec_kd", include_linear=False, student_model=student).layer_names == convs
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    m.prepare({"pool": s}, {"pool": t}, Batch(torch.ones(6, 1)))
    got = m({"pool": s}, {"pool": t}, Batch(torch.ones(6, 1))).item()
    excl = sum(np_exclusivity_loop(dict(student.named_modules())[n].weight.detach().numpy(), True, "mean")
               for n in convs)
    want = 0.7 * np_hfc(s.numpy(), t.numpy(), 2.0, True) + 0.3 * excl
    assert got == pytest.approx(want, rel=1e-5)


def test_through_the_distiller_gradients_reach_only_the_student():
    torch.manual_seed(0)
    student, teacher = _cnn((4, 6, 8)), _cnn((8, 8, 12))  # widths differ: a linear adapter 8 -> 12
    t_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    d = distill.Distiller(student, teacher, losses={"ce": 1.0, "ec_kd": create_method(
        "ec_kd", consistency_weight=0.5, exclusivity_weight=0.2, skip=("fc",))})
    x, y = torch.randn(8, 1, 12, 12), torch.randint(0, 5, (8,))
    d.prepare((x, y))
    method = d.methods["ec_kd"]
    assert method.student_model is student and isinstance(method.adapter, nn.Linear)
    assert "adapter" not in " ".join(method.layer_names)
    opt = torch.optim.SGD(list(student.parameters()) + list(method.parameters()), lr=0.1)
    out = d((x, y))
    out.total.backward()
    assert method.adapter.weight.grad is not None and student.stem[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    opt.step()
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in t_state.items())


def test_exclusivity_alone_needs_no_teacher_features_and_moves_the_filters_apart():
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    m = create_method("ec_kd", consistency_weight=0.0, exclusivity_weight=1.0, student_model=layer)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    before = m.exclusivity().item()
    assert m({}, {}, Batch(torch.ones(1, 6))).item() == pytest.approx(before)
    for _ in range(50):
        loss = m({}, {}, Batch(torch.ones(1, 6)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert m.exclusivity().item() < 0.5 * before
