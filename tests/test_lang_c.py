"""Multi-teacher, multi-task distillation (issue 12 rows 9-11): Tan et al.'s selective KD, BAM's
teacher annealing, MT-DNN's ensemble distillation.

The losses are checked against numbers computed with NumPy from their equations; each strategy's
loop is replayed step by step with plainly written reference losses and plain SGD (so a wrong λ
schedule, a wrong gate or a wrong weight changes the trained weights); properties with
hypothesis; argument errors before any training; resume; the example's quick run.
"""

from __future__ import annotations

import copy
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.functional import multitask as MF
from distill.strategies.multitask import (
    MultiTaskNet,
    Task,
    fit_bam,
    fit_mtdnn_kd,
    fit_multilingual_kd,
)
from distill.strategies.registry import strategy_info

SETTINGS = settings(max_examples=25, deadline=None)
ROOT = Path(__file__).resolve().parents[1]


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_softmax(z: np.ndarray) -> np.ndarray:
    return np.exp(np_log_softmax(z))


ZS = np.array([[1.0, -0.5, 0.3, 2.0], [0.2, 0.1, -1.0, 0.0]])
ZT = np.array([[2.0, 0.5, -0.3, 1.0], [-0.4, 1.5, 0.0, 0.7]])
Y = np.array([3, 1])


def t(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float64)


# ------------------------------------------------------------------------------------ formulas


def test_bam_loss_matches_numpy_annealed_cross_entropy():
    lam = 0.3
    onehot = np.eye(4)[Y]
    q = lam * onehot + (1 - lam) * np_softmax(ZT)
    expected = -(q * np_log_softmax(ZS)).sum(-1).mean()
    got = MF.bam_loss(t(ZS), t(ZT), torch.tensor(Y), lam)
    assert float(got) == pytest.approx(expected, rel=1e-6)
    # the two ends: pure distillation and pure supervision
    assert float(MF.bam_loss(t(ZS), t(ZT), torch.tensor(Y), 0.0)) == pytest.approx(
        -(np_softmax(ZT) * np_log_softmax(ZS)).sum(-1).mean(), rel=1e-6)
    assert float(MF.bam_loss(t(ZS), t(ZT), torch.tensor(Y), 1.0)) == pytest.approx(
        -np_log_softmax(ZS)[[0, 1], Y].mean(), rel=1e-6)


def test_teacher_annealing_lambda_rises_linearly_from_zero_to_one():
    assert [MF.teacher_annealing_lambda(s, 5) for s in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert MF.teacher_annealing_lambda(0, 1) == 1.0
    with pytest.raises(ValueError, match="step"):
        MF.teacher_annealing_lambda(5, 5)


def test_selective_kd_loss_matches_numpy_with_top_k_renormalised_teacher():
    lam, k = 0.3, 2
    p = np_softmax(ZT)
    q = np.zeros_like(p)
    for b in range(2):
        top = np.argsort(-p[b])[:k]
        q[b, top] = p[b, top] / p[b, top].sum()
    nll = -np_log_softmax(ZS)[[0, 1], Y].mean()
    kd = -(q * np_log_softmax(ZS)).sum(-1).mean()
    got = MF.selective_kd_loss(t(ZS), t(ZT), torch.tensor(Y), kd_weight=lam, distill=True, top_k=k)
    assert float(got) == pytest.approx((1 - lam) * nll + lam * kd, rel=1e-6)
    off = MF.selective_kd_loss(t(ZS), t(ZT), torch.tensor(Y), kd_weight=lam, distill=False, top_k=k)
    assert float(off) == pytest.approx(nll, rel=1e-6)
    # top-K of the first row by hand: classes 0 (2.0) and 3 (1.0)
    e = np.exp([2.0, 1.0])
    np.testing.assert_allclose(MF.topk_teacher_probs(t(ZT), 2)[0].numpy(), [e[0] / e.sum(), 0, 0, e[1] / e.sum()],
                               rtol=1e-6)


def test_selective_kd_flags_follow_the_threshold_both_ways():
    teacher = {"a": 90.0, "b": 80.0, "c": 70.0}
    student = {"a": 90.5, "b": 81.0, "c": 72.0}
    assert MF.selective_kd_flags(student, teacher, 1.0) == {"a": True, "b": False, "c": False}
    assert MF.selective_kd_flags(student, teacher, 2.5) == {"a": True, "b": True, "c": True}
    with pytest.raises(ValueError, match="different tasks"):
        MF.selective_kd_flags({"a": 1.0}, teacher, 1.0)


def test_mtdnn_kd_loss_is_the_average_of_gold_and_soft_objectives():
    zt2 = np.array([[0.0, 0.0, 3.0, 0.0], [1.0, 1.0, 1.0, -2.0]])
    avg = (np_softmax(ZT) + np_softmax(zt2)) / 2  # the ensemble's averaged probabilities
    nll = -np_log_softmax(ZS)[[0, 1], Y].mean()
    soft = -(avg * np_log_softmax(ZS)).sum(-1).mean()
    got = MF.mtdnn_kd_loss(t(ZS), t(avg), torch.tensor(Y))
    assert float(got) == pytest.approx(0.5 * nll + 0.5 * soft, rel=1e-6)


def test_task_sampling_probs_by_hand():
    p = MF.task_sampling_probs({"big": 10000, "small": 100}, 0.75)
    w = np.array([10000 ** 0.75, 100 ** 0.75])  # 1000 and 31.62...
    np.testing.assert_allclose(p.numpy(), w / w.sum(), rtol=1e-12)
    np.testing.assert_allclose(MF.task_sampling_probs([3, 1], 1.0).numpy(), [0.75, 0.25])
    with pytest.raises(ValueError, match="sizes"):
        MF.task_sampling_probs([3, 0], 1.0)


@SETTINGS
@given(st.lists(st.floats(-4, 4), min_size=3, max_size=3), st.floats(0.0, 0.99), st.integers(0, 2))
def test_bam_loss_is_minimal_at_the_annealed_target_and_grad_reaches_only_the_student(zt, lam, y):
    zt_ = torch.tensor([zt], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([y])
    q = MF.annealed_targets(target, F.softmax(zt_.detach(), -1), lam)
    z = q.log().clone().requires_grad_(True)  # student logits whose softmax is the target
    loss = MF.bam_loss(z, zt_, target, lam)
    loss.backward()
    assert torch.allclose(z.grad, torch.zeros_like(z.grad), atol=1e-9)
    assert zt_.grad is None
    # any other student pays more (Gibbs' inequality): the loss minus its minimum is a KL >= 0
    other = torch.zeros(1, 3, dtype=torch.float64)
    assert float(MF.bam_loss(other, zt_, target, lam).detach()) >= float(loss.detach()) - 1e-9


# ------------------------------------------------------------------------ the strategies' loops


def _net(seed: int, k: int = 3) -> MultiTaskNet:
    torch.manual_seed(seed)
    return MultiTaskNet(torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh()),
                        {"a": torch.nn.Linear(5, k), "b": torch.nn.Linear(5, k)})


def _batches(seed: int, n: int, k: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 4, generator=g), torch.randint(0, k, (6,), generator=g)) for _ in range(n)]


def _teacher(seed: int, k: int = 3) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, k))


def _sgd_replay(net: MultiTaskNet, steps: list[tuple[str, tuple, object]], lr: float) -> MultiTaskNet:
    """Plain SGD over ``(task, batch, loss_of_logits)`` steps, written independently of the loop."""
    ref = copy.deepcopy(net)
    for task, (x, y), loss_of in steps:
        ref.zero_grad()
        loss = loss_of(ref(x, task), y)
        loss.backward()
        with torch.no_grad():
            for p in ref.parameters():
                if p.grad is not None:  # the other task's head gets no gradient
                    p -= lr * p.grad
    return ref


def _same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6), n


SGD = dict(optimizer="sgd", lr=0.5, momentum=0.0, weight_decay=0.0, progress=False)


def test_bam_trains_with_lambda_zero_then_one_on_a_two_step_run():
    batches = _batches(1, 2)
    teacher = _teacher(7)
    net = _net(0)
    start = copy.deepcopy(net)
    fit_bam(net, [Task("a", batches, teacher=teacher)], epochs=1, seed=3, **SGD)

    def bam_ref(lam: float, x: torch.Tensor):
        def loss_of(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            q = lam * F.one_hot(y, 3).float() + (1 - lam) * F.softmax(teacher(x), -1).detach()
            return -(q * F.log_softmax(z, -1)).sum(-1).mean()
        return loss_of

    ref = _sgd_replay(start, [("a", batches[0], bam_ref(0.0, batches[0][0])),
                              ("a", batches[1], bam_ref(1.0, batches[1][0]))], lr=0.5)
    _same(net, ref)


def test_selective_kd_switches_distillation_off_once_the_student_passes_teacher_plus_threshold():
    batches, val = _batches(2, 2), _batches(3, 1)
    teacher = _teacher(8)
    lam, k = 0.3, 2

    def kd_step(x: torch.Tensor):
        def loss_of(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            p = F.softmax(teacher(x), -1).detach()
            top = p.topk(k, -1)
            q = torch.zeros_like(p).scatter(-1, top.indices, top.values)
            q = q / q.sum(-1, keepdim=True)
            return (1 - lam) * F.cross_entropy(z, y) - lam * (q * F.log_softmax(z, -1)).sum(-1).mean()
        return loss_of

    def nll(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(z, y)

    # τ = -1000: after the first check (step 1) the student is "ahead": step 2 trains on NLL only
    net = _net(0)
    start = copy.deepcopy(net)
    res = fit_multilingual_kd(net, [Task("a", batches, val, teacher)], epochs=1, kd_weight=lam, top_k=k,
                              threshold=-1000.0, check_every=1, seed=0, **SGD)
    _same(net, _sgd_replay(start, [("a", batches[0], kd_step(batches[0][0])), ("a", batches[1], nll)], lr=0.5))
    assert res.kd_flags == {"a": False}
    # τ = +1000: the student never gets there: both steps distil
    net = _net(0)
    res = fit_multilingual_kd(net, [Task("a", batches, val, teacher)], epochs=1, kd_weight=lam, top_k=k,
                              threshold=1000.0, check_every=1, seed=0, **SGD)
    _same(net, _sgd_replay(start, [("a", batches[0], kd_step(batches[0][0])),
                                   ("a", batches[1], kd_step(batches[1][0]))], lr=0.5))
    assert res.kd_flags == {"a": True} and "a" in res.teacher_acc


def test_mtdnn_kd_uses_the_ensembles_mean_probabilities_and_gold_only_without_teacher():
    batches = _batches(4, 2)
    members = [_teacher(9), _teacher(10)]

    def soft(x: torch.Tensor):
        def loss_of(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            q = ((F.softmax(members[0](x), -1) + F.softmax(members[1](x), -1)) / 2).detach()
            return 0.5 * F.cross_entropy(z, y) - 0.5 * (q * F.log_softmax(z, -1)).sum(-1).mean()
        return loss_of

    net = _net(0)
    start = copy.deepcopy(net)
    fit_mtdnn_kd(net, [Task("a", batches, teacher=members)], epochs=1, seed=0, **SGD)
    _same(net, _sgd_replay(start, [("a", b, soft(b[0])) for b in batches], lr=0.5))

    net = _net(0)
    fit_mtdnn_kd(net, [Task("b", batches)], epochs=1, seed=0, **SGD)
    _same(net, _sgd_replay(start, [("b", b, lambda z, y: F.cross_entropy(z, y)) for b in batches], lr=0.5))


def test_bam_draws_tasks_by_size_to_the_power_and_trains_every_head():
    big, small = _batches(5, 12), _batches(6, 1)
    net = _net(0)
    heads0 = {n: h.weight.detach().clone() for n, h in net.heads.items()}
    res = fit_bam(net, [Task("a", big, big[:2], _teacher(1)), Task("b", small, small, _teacher(2))], epochs=3,
                  seed=0, **SGD)
    assert all(not torch.equal(heads0[n], net.heads[n].weight) for n in heads0)
    assert set(res.task_last_acc) == {"a", "b"} and res.best_acc is not None and len(res.history) == 3


class _Interrupting(list):
    """A list of batches whose second epoch is interrupted (the loop calls set_epoch(1000 * epoch + pass))."""

    armed = False

    def set_epoch(self, e: int) -> None:
        if self.armed and e >= 1000:
            raise KeyboardInterrupt


def test_resume_continues_to_the_same_weights(tmp_path):
    batches, val = _Interrupting(_batches(2, 3)), _batches(3, 1)
    tasks = [Task("a", batches, val, _teacher(1)), Task("b", batches[:1], val, _teacher(2))]
    adam = {**SGD, "optimizer": "adam", "lr": 0.05}  # an optimizer with state, which must be resumed too
    full = _net(0)
    fit_bam(full, tasks, epochs=2, seed=0, **adam)
    batches.armed = True
    with pytest.raises(KeyboardInterrupt):
        fit_bam(_net(0), tasks, epochs=2, seed=0, run_dir=tmp_path / "r", **adam)
    batches.armed = False
    with pytest.raises(ValueError, match="steps"):  # λ's schedule depends on the run's length
        fit_bam(_net(0), tasks, epochs=3, seed=0, run_dir=tmp_path / "r", resume=True, **adam)
    resumed = _net(5)  # other initial weights: everything must come from the checkpoint
    res = fit_bam(resumed, tasks, epochs=2, seed=0, run_dir=tmp_path / "r", resume=True, **adam)
    _same(resumed, full)
    assert len(res.history) == 2 and (tmp_path / "r" / "metrics.jsonl").exists()
    with pytest.raises(FileExistsError, match="resume=True"):
        fit_bam(_net(0), tasks, epochs=2, seed=0, run_dir=tmp_path / "r", **SGD)


def test_bad_arguments_fail_before_training():
    tasks = [Task("a", _batches(1, 1), None, _teacher(1))]
    with pytest.raises(ValueError, match="val_loader"):
        fit_multilingual_kd(_net(0), tasks, epochs=1, progress=False)
    with pytest.raises(ValueError, match="kd_weight"):
        fit_multilingual_kd(_net(0), tasks, epochs=1, kd_weight=1.5, progress=False)
    with pytest.raises(ValueError, match="no head for task"):
        fit_bam(_net(0), [Task("zzz", _batches(1, 1))], epochs=1, progress=False)
    with pytest.raises(ValueError, match="distinct"):
        fit_bam(_net(0), tasks + tasks, epochs=1, progress=False)
    with pytest.raises(ValueError, match="epochs"):
        fit_mtdnn_kd(_net(0), tasks, epochs=0, progress=False)


def test_registered_with_their_papers():
    for name, arxiv in [("multilingual_kd", "1902.10461"), ("bam", "1907.04829"), ("mtdnn_kd", "1904.09482")]:
        info = strategy_info(name)
        assert info.paper.arxiv == arxiv and info.family == "multitask" and info.paper.year == 2019


def test_example_quick_run():
    path = ROOT / "examples" / "language" / "multitask.py"
    spec = importlib.util.spec_from_file_location("example_multitask", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--quick"])
    assert {r["method"] for r in rows} >= {"multi-task CE (no KD)", "bam", "mtdnn_kd", "multilingual_kd"}
    assert all(math.isfinite(r["mean_acc"]) for r in rows)
