"""Function matching (Beyer et al., CVPR 2022, arXiv 2106.05237): the crop, the four view modes, the teacher
reading its own view, and label-free training."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from distill.batch import Batch
from distill.data.loader import InMemoryLoader
from distill.strategies.function_matching import (
    FunctionMatchingViews,
    RandomResizedCrop,
    ViewBatch,
    ViewTeacher,
    fit_function_matching,
)


def _ramp(h: int = 4, w: int = 4) -> torch.Tensor:
    return torch.arange(w, dtype=torch.float32).repeat(h, 1).reshape(1, 1, h, w)  # pixel value = its column


def test_crop_identity_flip_and_a_hand_computed_half_crop():
    crop = RandomResizedCrop()
    x = torch.rand(2, 3, 5, 6)
    torch.testing.assert_close(crop.apply(x, torch.tensor([[1.0, 1.0, 0.0, 0.0]] * 2)), x)
    torch.testing.assert_close(crop.apply(x, torch.tensor([[-1.0, 1.0, 0.0, 0.0]] * 2)), x.flip(-1))
    # the left half (half-width 0.5 centred at -0.5) of a 4-wide ramp: output columns sample the input at
    # pixel coordinates -0.25 (clamped to the border: 0), 0.25, 0.75, 1.25
    out = crop.apply(_ramp(), torch.tensor([[0.5, 1.0, -0.5, 0.0]]))
    torch.testing.assert_close(out[0, 0], torch.tensor([[0.0, 0.25, 0.75, 1.25]] * 4))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), lo=st.floats(0.05, 1.0))
def test_drawn_crops_stay_inside_the_image_within_the_scale(seed, lo):
    crop = RandomResizedCrop(scale=(lo, 1.0), flip=0.5)
    p = crop.sample_params(64, torch.Generator().manual_seed(seed)).double()
    sx, sy, cx, cy = p[:, 0].abs(), p[:, 1], p[:, 2], p[:, 3]
    assert bool(((cx.abs() + sx) <= 1 + 1e-6).all()) and bool(((cy.abs() + sy) <= 1 + 1e-6).all())
    # the area fraction sx*sy is the drawn one unless a side was clamped at the full image
    assert bool((sx * sy <= 1 + 1e-6).all()) and bool((sx * sy >= min(lo, 1.0) * (3 / 4) - 1e-6).all())


def _views(mode: str, x: torch.Tensor) -> ViewBatch:
    v = FunctionMatchingViews(mode, RandomResizedCrop(scale=(0.3, 0.6)), mixup_p=0.7, seed=3)
    v.set_epoch(2)
    return v(Batch(x, torch.zeros(len(x), dtype=torch.long)))


def test_the_four_modes_build_the_views_the_paper_describes():
    x = torch.rand(6, 1, 8, 8)
    consistent, fixed = _views("consistent", x), _views("fixed_teacher", x)
    independent, fm = _views("independent_noise", x), _views("function_matching", x)
    a = consistent.inputs
    assert torch.equal(consistent.teacher_inputs, a) and not torch.equal(a, x)
    assert torch.equal(fixed.inputs, a) and torch.equal(fixed.teacher_inputs, x)  # the un-augmented image
    assert torch.equal(independent.inputs, a)
    assert not torch.allclose(independent.teacher_inputs, a) and not torch.allclose(independent.teacher_inputs, x)
    assert torch.equal(fm.teacher_inputs, fm.inputs)
    # the same crop, mixed with the batch rolled by one: inputs = lam * a + (1 - lam) * roll(a)
    d, r = (a - a.roll(1, 0)).flatten(), (fm.inputs - a.roll(1, 0)).flatten()
    lam = float(d @ r / (d @ d))
    assert 0.0 <= lam <= 1.0
    torch.testing.assert_close(fm.inputs, lam * a + (1 - lam) * a.roll(1, 0), atol=1e-6, rtol=1e-6)
    # the ratio is Beta(0.7, 0.7)'s draw for this batch's seed, not a constant
    assert not torch.allclose(_views("function_matching", x).inputs, 0.5 * a + 0.5 * a.roll(1, 0))


def test_view_teacher_reads_the_teacher_view():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    teacher = ViewTeacher(copy.deepcopy(model))
    s, t = torch.rand(2, 1, 4, 4), torch.rand(2, 1, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(teacher(ViewBatch(s, teacher_inputs=t))["logits"], model(t))
        torch.testing.assert_close(teacher(Batch(s))["logits"], model(s))


def test_bad_mode_and_augmenting_loader_are_refused():
    with pytest.raises(ValueError, match="mode must be one of"):
        FunctionMatchingViews("mixup", RandomResizedCrop())
    from distill.data.augment import RandomHorizontalFlip
    loader = InMemoryLoader(torch.rand(8, 1, 4, 4), torch.zeros(8, dtype=torch.long), 4, augment=RandomHorizontalFlip())
    with pytest.raises(ValueError, match="must not augment"):
        fit_function_matching(nn.Linear(16, 3), loader, teacher=nn.Linear(16, 3), epochs=1, progress=False)


@pytest.mark.parametrize("mode", ["function_matching", "fixed_teacher"])
def test_training_uses_no_labels(mode):
    torch.set_num_threads(1)
    x = torch.rand(24, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(24) % 3
    torch.manual_seed(1)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    with torch.no_grad():
        teacher[1].weight.mul_(20.0)  # confident, input-dependent targets

    def run(labels: torch.Tensor) -> nn.Module:
        torch.manual_seed(0)
        student = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
        fit_function_matching(student, InMemoryLoader(x, labels, 8, seed=1), teacher=teacher, epochs=4, mode=mode,
                              T=1.0, progress=False, lr=0.05, device="cpu")
        return student

    a, b = run(y), run(y.flip(0))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    torch.manual_seed(0)
    start = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))  # the students' initialisation
    assert not torch.allclose(a[1].weight, start[1].weight)  # it did train, on the teacher's outputs alone


def test_one_batch_objective_is_the_kl_on_the_two_views(monkeypatch):
    """The Distiller the strategy trains, on one fixed batch, against T^2 KL(softmax(t(v_T)/T) || softmax(s(v_S)/T))
    written out, in value and in gradient (independent noise: the two views differ)."""
    import distill.strategies.function_matching as fm

    seen = {}

    def spy(distiller, loader, val, **kw):
        seen.update(distiller=distiller, views=kw["batch_transform"])

    monkeypatch.setattr(fm, "fit", spy)
    torch.manual_seed(0)
    teacher, student = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)), nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x = torch.rand(5, 1, 4, 4)
    fm.fit_function_matching(student, InMemoryLoader(x, None, 5), teacher=teacher, epochs=1, mode="independent_noise",
                             T=2.5, progress=False)
    vb = seen["views"](Batch(x))
    assert not torch.allclose(vb.inputs, vb.teacher_inputs)
    out = seen["distiller"](vb)
    T = 2.5
    p = torch.softmax(teacher(vb.teacher_inputs).detach() / T, 1)
    log_q = torch.log_softmax(student(vb.inputs) / T, 1)
    hand = T * T * (p * (p.log() - log_q)).sum(1).mean()
    torch.testing.assert_close(out.total, hand)
    g1 = torch.autograd.grad(out.total, list(student.parameters()))
    g2 = torch.autograd.grad(hand, list(student.parameters()))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)
