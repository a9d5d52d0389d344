"""MetaDistil (Zhou et al., ACL 2022, arXiv 2106.04570): the teacher's meta-gradient through the pilot step,
checked against central finite differences of a hand-written numpy pilot step, and a short strategy run."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from distill.data.loader import InMemoryLoader
from distill.strategies.metadistil import fit_metadistil, meta_teacher_grads


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _quiz_loss_numpy(wt, ws, x, y, qx, qy, lr, T, ce_w, kd_w):
    """The quiz cross-entropy after one hand-derived SGD step of a linear student (logits x Ws^T) on
    ce_w CE + kd_w T^2 KL(softmax(x Wt^T / T) || softmax(x Ws^T / T))."""
    B, K = x.shape[0], ws.shape[0]
    onehot = np.eye(K)[y]
    s, t = x @ ws.T, x @ wt.T
    dlogits = ce_w * (_softmax(s) - onehot) + kd_w * T * (_softmax(s / T) - _softmax(t / T))
    ws_pilot = ws - lr * (dlogits.T @ x) / B
    p = _softmax(qx @ ws_pilot.T)
    return float(-np.log(p[np.arange(len(qy)), qy]).mean())


@pytest.mark.parametrize("T, ce_w, kd_w, lr", [(2.5, 0.3, 0.7, 0.8), (1.0, 0.0, 1.0, 2.0)])
def test_meta_gradient_matches_finite_differences(T, ce_w, kd_w, lr):
    rng = np.random.default_rng(0)
    D, K, B, Q = 4, 3, 6, 5
    x, qx = rng.normal(size=(B, D)), rng.normal(size=(Q, D))
    y, qy = rng.integers(0, K, B), rng.integers(0, K, Q)
    ws, wt = rng.normal(size=(K, D)), 2 * rng.normal(size=(K, D))
    student, teacher = nn.Linear(D, K, bias=False).double(), nn.Linear(D, K, bias=False).double()
    with torch.no_grad():
        student.weight.copy_(torch.from_numpy(ws))
        teacher.weight.copy_(torch.from_numpy(wt))
    before = student.weight.detach().clone()
    (g,), quiz = meta_teacher_grads(student, teacher, torch.from_numpy(x), torch.from_numpy(y),
                                    torch.from_numpy(qx), torch.from_numpy(qy), pilot_lr=lr, T=T,
                                    ce_weight=ce_w, kd_weight=kd_w)
    assert torch.equal(student.weight, before)  # the pilot step is functional
    assert quiz == pytest.approx(_quiz_loss_numpy(wt, ws, x, y, qx, qy, lr, T, ce_w, kd_w), rel=1e-10)
    fd = np.zeros_like(wt)
    eps = 1e-6
    for i in range(K):
        for j in range(D):
            up, down = wt.copy(), wt.copy()
            up[i, j] += eps
            down[i, j] -= eps
            fd[i, j] = (_quiz_loss_numpy(up, ws, x, y, qx, qy, lr, T, ce_w, kd_w)
                        - _quiz_loss_numpy(down, ws, x, y, qx, qy, lr, T, ce_w, kd_w)) / (2 * eps)
    assert np.abs(fd).max() > 1e-3  # the teacher does reach the quiz loss
    np.testing.assert_allclose(g.numpy(), fd, rtol=1e-5, atol=1e-8)


def test_without_the_kd_term_the_teacher_gets_no_meta_gradient():
    torch.manual_seed(0)
    student, teacher = nn.Linear(4, 3), nn.Linear(4, 3)
    grads, _ = meta_teacher_grads(student, teacher, torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]),
                                  torch.randn(3, 4), torch.tensor([2, 1, 0]), pilot_lr=0.5, kd_weight=0.0)
    assert all(float(g.abs().max()) == 0.0 for g in grads)


def test_a_frozen_teacher_is_refused():
    student, teacher = nn.Linear(4, 3), nn.Linear(4, 3).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        meta_teacher_grads(student, teacher, torch.randn(2, 4), torch.tensor([0, 1]), torch.randn(2, 4),
                           torch.tensor([0, 1]), pilot_lr=0.1)


def test_strategy_trains_teacher_and_student_and_leaves_the_given_teacher_alone(tmp_path):
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    teacher = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    given = copy.deepcopy(teacher.state_dict())
    res = fit_metadistil(lambda: nn.Linear(6, 3), InMemoryLoader(x, y, 16, seed=0),
                         InMemoryLoader(x[:40], y[:40], 40, shuffle=False), teacher=teacher, epochs=2,
                         num_meta_batches=2, progress=False, run_dir=tmp_path, lr=0.2, T=2.0, ce_weight=1.0,
                         kd_weight=0.3)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in given.items())
    assert any(not torch.equal(v, res.teacher.state_dict()[k]) for k, v in given.items())  # the copy learnt
    assert len(res.history) == 2 and res.last_acc is not None and res.last_acc > 60.0
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 2
    with pytest.raises(ValueError, match="quiz_fraction"):
        fit_metadistil(nn.Linear(6, 3), InMemoryLoader(x, y, 16), teacher=teacher, epochs=1, quiz_fraction=1.5)
