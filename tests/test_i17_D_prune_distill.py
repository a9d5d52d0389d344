"""Prune Your Model Before Distill It (Park & No, ECCV 2022, arXiv 2109.14960): the pruning schedule, the global
magnitude masks, the student built from the pruned teacher's weight counts and the KD loss the strategy trains."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import distill.strategies.prune_distill as pd
from distill.data import InMemoryLoader
from distill.models import create
from distill.strategies.prune_distill import (
    fit_prune_then_distill,
    prune_rounds,
    prune_teacher,
    student_from_pruned,
    weight_sparsity,
)

torch.set_num_threads(1)


def _loader(n: int = 32, features: int = 6, classes: int = 3) -> InMemoryLoader:
    g = torch.Generator().manual_seed(0)
    return InMemoryLoader(torch.randn(n, features, generator=g), torch.randint(classes, (n,), generator=g), 16)


def test_rounds_match_the_total_sparsity_closest_to_the_target():
    # 1 - 0.8^n: .2, .36, .488, .5904, .672, .7379, .7903, .8322
    assert prune_rounds(0.0) == 0
    assert prune_rounds(0.2) == 1
    assert prune_rounds(0.5) == 3      # .488 (off .012) beats .5904
    assert prune_rounds(0.8) == 7      # .7903 (off .0097) beats .8322: the code's "st79"
    assert prune_rounds(0.82) == 8     # .8322 (off .0122) beats .7903 (off .0297)
    assert prune_rounds(0.75, rate=0.5) == 2   # 1 - 0.5^n: .5, .75
    with pytest.raises(ValueError, match="sparsity"):
        prune_rounds(1.0)


def test_global_magnitude_pruning_zeroes_the_smallest_weights_of_all_layers():
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -2.0], [3.0, -4.0]]))
        model[2].weight.copy_(torch.tensor([[0.5, 5.0]]))
    x = torch.randn(8, 2)
    loader = InMemoryLoader(x, torch.zeros(8, dtype=torch.long), 8)
    model.append(nn.Linear(1, 2))  # a 2-class head so the CE re-training runs; its 2 weights join the pool
    with torch.no_grad():
        model[3].weight.copy_(torch.tensor([[10.0], [-20.0]]))
    # 8 weights, 50%: the 4 of smallest magnitude, 0.5, 1, -2, 3, go (globally: two layers lose weights)
    pruned, accs = prune_teacher(model, loader, None, rounds=1, rate=0.5, epochs=1, progress=False, lr=0.01)
    assert torch.equal(pruned[0].weight == 0, torch.tensor([[True, True], [True, False]]))
    assert torch.equal(pruned[2].weight == 0, torch.tensor([[True, False]]))
    assert (pruned[3].weight != 0).all()
    assert weight_sparsity(pruned) == 0.5 and accs == [None]
    assert not hasattr(pruned[0], "weight_orig")  # the masks are permanent
    assert model[0].weight[0, 0] == 1.0  # the teacher itself is not edited


def test_iterative_rounds_prune_a_fraction_of_the_remaining_weights():
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))  # 90 weights
    pruned, _ = prune_teacher(model, _loader(), None, rounds=2, rate=0.2, epochs=1, progress=False, lr=0.01)
    # round 1: round(0.2 * 90) = 18; round 2: round(0.2 * 72) = 14 more -> 32 of 90
    assert weight_sparsity(pruned) == pytest.approx(32 / 90)


def test_student_from_pruned_matches_the_weight_counts_by_hand():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(6 * 2 * 2, 3))
    with torch.no_grad():
        model[0].weight.zero_().view(-1)[:18].fill_(1.0)   # 18 of 36 kept
        model[3].weight.zero_().view(-1)[:40].fill_(1.0)   # 40 of 216 kept
    student = student_from_pruned(model, seed=0)
    # conv1: round(18 / (1 * 9)) = 2; conv2: round(40 / (2 * 9)) = round(2.22) = 2; the classifier keeps 3
    assert student[0].out_channels == 2 and student[1].num_features == 2
    assert student[3].in_channels == 2 and student[3].out_channels == 2
    assert student[6].in_features == 2 * 2 * 2 and student[6].out_features == 3
    assert student(torch.rand(2, 1, 2, 2)).shape == (2, 3)
    assert (student[0].weight != 0).all()  # dense and re-initialised


def test_strategy_distills_with_the_codes_kd_weights(monkeypatch):
    seen = []
    real_fit = pd.fit

    def spy(distiller, *args, **kwargs):
        seen.append(distiller)
        return real_fit(distiller, *args, **kwargs)

    monkeypatch.setattr(pd, "fit", spy)
    teacher = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
    student = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    res = fit_prune_then_distill(student, _loader(), _loader(), teacher=teacher, epochs=1, sparsity=0.36,
                                 progress=False, lr=0.01)
    assert res.rounds == 2 and len(seen) == 3 and len(res.round_accs) == 2
    kd_d = seen[-1]
    assert set(kd_d.methods) == {"ce", "kd"}
    assert kd_d.methods["kd"].T == 10.0 and kd_d.methods["kd"].weight == 0.95 and kd_d.methods["ce"].weight == 0.05
    # 108 weights: round 1 prunes round(0.2 * 108) = 22, round 2 round(0.2 * 86) = 17 -> 39
    assert res.teacher_sparsity == pytest.approx(39 / 108)
    # the paper's compression scheme: the student is built from the pruned teacher
    res2 = fit_prune_then_distill(None, _loader(), None, teacher=teacher, epochs=1, sparsity=0.2,
                                  student_from_teacher=True, progress=False, lr=0.01)
    nnz = int((res2.teacher[0].weight != 0).sum())
    assert res2.student[0].out_features == round(nnz / 6)
    with pytest.raises(ValueError, match="prune_epochs"):
        fit_prune_then_distill(student, _loader(), None, teacher=teacher, epochs=1, prune_epochs=0, progress=False)
    with pytest.raises(TypeError, match="teacher"):
        fit_prune_then_distill(student, _loader(), None, teacher=None, epochs=1, progress=False)


def test_zoo_cnn_teacher_prunes_and_distills():
    teacher = create("cnn_digits_student", num_classes=3, in_channels=1)
    x = torch.rand(16, 1, 8, 8)
    loader = InMemoryLoader(x, torch.randint(3, (16,)), 16)
    res = fit_prune_then_distill(None, loader, None, teacher=teacher, epochs=1, sparsity=0.5, prune_epochs=1,
                                 student_from_teacher=True, progress=False, lr=0.01)
    assert res.rounds == 3 and res.teacher_sparsity == pytest.approx(0.488, abs=0.01)
    assert sum(p.numel() for n, p in res.student.named_parameters() if p.dim() > 1) < \
        sum(p.numel() for n, p in teacher.named_parameters() if p.dim() > 1)


def test_one_batch_objectives_of_the_rounds_and_the_distillation(monkeypatch):
    """One batch: each re-training round minimises CE of the masked teacher; the distillation minimises
    0.05 CE + 0.95 T^2 KL(p_t^T || p_s^T) with T = 10, batch mean."""
    import torch.nn.functional as F

    from distill.batch import Batch

    seen = []
    real_fit = pd.fit
    monkeypatch.setattr(pd, "fit", lambda d, *a, **k: (seen.append(d), real_fit(d, *a, **k))[1])
    loader = _loader()
    teacher = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
    fit_prune_then_distill(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)), loader, None, teacher=teacher,
                           epochs=1, sparsity=0.2, progress=False, lr=0.01)
    x, y = loader.inputs[:16], loader.targets[:16]
    prune_d, kd_d = seen
    torch.testing.assert_close(prune_d(Batch(x, y)).total, F.cross_entropy(prune_d.student(x), y))
    s = kd_d.student(x)
    with torch.no_grad():
        t = kd_d.teacher(Batch(x, y))["logits"]
    # written out: sum_k p_k (log p_k - log q_k) per sample, mean over the batch, times T^2
    p, logq = F.softmax(t / 10, 1), F.log_softmax(s / 10, 1)
    kl = (p * (p.log() - logq)).sum(1).mean() * 100
    torch.testing.assert_close(kd_d(Batch(x, y)).total, 0.05 * F.cross_entropy(s, y) + 0.95 * kl)
