"""MetaDistil (Zhou et al., ACL 2022, arXiv 2106.04570): the teacher's meta-gradient through the pilot step,
checked against central finite differences of a hand-written numpy pilot step, and a short strategy run."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from distill.data.loader import InMemoryLoader
import distill.strategies.metadistil as md
from distill.strategies.metadistil import fit_metadistil, meta_teacher_grads, schedule_milestones


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



# --- several pilot steps and several quiz batches, against a hand-written numpy loop ---------------------------

def _pilot_numpy(wt, ws, xs, ys, lr, T, ce_w, kd_w):
    """Hand-derived SGD steps of a linear student, one per batch, each at the previous step's weights."""
    K = ws.shape[0]
    for x, y in zip(xs, ys):
        s, t = x @ ws.T, x @ wt.T
        dlogits = ce_w * (_softmax(s) - np.eye(K)[y]) + kd_w * T * (_softmax(s / T) - _softmax(t / T))
        ws = ws - lr * (dlogits.T @ x) / x.shape[0]
    return ws


def _multi_quiz_numpy(wt, ws, xs, ys, qxs, qys, lr, T, ce_w, kd_w):
    """The mean over quiz batches of each batch's mean CE (batches of unequal size weigh the same)."""
    w = _pilot_numpy(wt, ws, xs, ys, lr, T, ce_w, kd_w)
    losses = []
    for qx, qy in zip(qxs, qys):
        p = _softmax(qx @ w.T)
        losses.append(-np.log(p[np.arange(len(qy)), qy]).mean())
    return float(np.mean(losses))


def test_two_pilot_steps_and_three_unequal_quiz_batches_match_finite_differences():
    rng = np.random.default_rng(3)
    D, K = 4, 3
    xs = [rng.normal(size=(5, D)), rng.normal(size=(3, D))]
    ys = [rng.integers(0, K, 5), rng.integers(0, K, 3)]
    qxs = [rng.normal(size=(n, D)) for n in (4, 2, 1)]
    qys = [rng.integers(0, K, n) for n in (4, 2, 1)]
    ws, wt = rng.normal(size=(K, D)), 2 * rng.normal(size=(K, D))
    args = (0.7, 3.0, 0.4, 0.6)  # lr, T, ce_w, kd_w: none of them the defaults
    student, teacher = nn.Linear(D, K, bias=False).double(), nn.Linear(D, K, bias=False).double()
    with torch.no_grad():
        student.weight.copy_(torch.from_numpy(ws))
        teacher.weight.copy_(torch.from_numpy(wt))
    t = [torch.from_numpy(a) for a in xs], [torch.from_numpy(a) for a in ys]
    q = [torch.from_numpy(a) for a in qxs], [torch.from_numpy(a) for a in qys]
    (g,), quiz = meta_teacher_grads(student, teacher, *t, *q, pilot_lr=0.7, T=3.0, ce_weight=0.4, kd_weight=0.6)
    want = _multi_quiz_numpy(wt, ws, xs, ys, qxs, qys, *args)
    pooled = _multi_quiz_numpy(wt, ws, xs, ys, [np.concatenate(qxs)], [np.concatenate(qys)], *args)
    assert abs(want - pooled) > 1e-3  # the batch-mean average differs from a per-sample mean here
    assert quiz == pytest.approx(want, rel=1e-10)
    fd = np.zeros_like(wt)
    eps = 1e-6
    for i in range(K):
        for j in range(D):
            up, down = wt.copy(), wt.copy()
            up[i, j] += eps
            down[i, j] -= eps
            fd[i, j] = (_multi_quiz_numpy(up, ws, xs, ys, qxs, qys, *args)
                        - _multi_quiz_numpy(down, ws, xs, ys, qxs, qys, *args)) / (2 * eps)
    np.testing.assert_allclose(g.numpy(), fd, rtol=1e-5, atol=1e-8)


# --- the teacher's warm-up and the lr schedule ----------------------------------------------------------------

class _SpyTeacher(nn.Linear):
    """Logs (grad enabled?, its weight) at each forward; the log is a class attribute so the strategy's deep
    copy writes to it too."""

    log: list = []

    def forward(self, x):
        _SpyTeacher.log.append((torch.is_grad_enabled(), self.weight.detach().clone()))
        return super().forward(x)


def _data(n=60, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


def test_warmup_keeps_the_teacher_bit_identical_for_exactly_the_given_steps():
    torch.set_num_threads(1)
    x, y = _data()  # 60 samples: 6 quiz, 54 to train on = 7 batches of 8 per epoch
    torch.manual_seed(0)
    teacher = _SpyTeacher(6, 3)
    w0 = teacher.weight.detach().clone()
    _SpyTeacher.log = []
    res = fit_metadistil(lambda: nn.Linear(6, 3), InMemoryLoader(x, y, 8, seed=0), teacher=teacher, epochs=2,
                         teacher_warmup_steps=5, milestones=(), progress=False, lr=0.3, teacher_lr=0.5, T=2.0)
    log = _SpyTeacher.log
    # warm-up: 5 plain KD steps, each one no-grad teacher call with the initial weights
    assert [g for g, _ in log[:5]] == [False] * 5
    assert all(torch.equal(w, w0) for _, w in log[:5])
    # then rounds: the pilot (grad) still sees the warm-up's teacher, the real step (no grad) the updated one
    assert log[5][0] is True and torch.equal(log[5][1], w0)
    assert log[6][0] is False and not torch.equal(log[6][1], w0)
    assert len(log) == 5 + 2 * (14 - 5)
    assert [r["teacher_updates"] for r in res.history] == [2, 7]
    assert not torch.equal(res.teacher.weight, w0) and torch.equal(teacher.weight, w0)


def test_warmup_epochs_default_to_the_first_milestone():
    x, y = _data()
    kw = dict(epochs=3, progress=False, lr=0.3, T=2.0)
    res = fit_metadistil(lambda: nn.Linear(6, 3), InMemoryLoader(x, y, 8), teacher=nn.Linear(6, 3), milestones=(2,),
                         **kw)
    assert [r["teacher_updates"] for r in res.history] == [0, 0, 7]
    res = fit_metadistil(lambda: nn.Linear(6, 3), InMemoryLoader(x, y, 8), teacher=nn.Linear(6, 3), milestones=[],
                         **kw)
    assert [r["teacher_updates"] for r in res.history] == [7, 7, 7]  # no milestone: Algorithm 1 from the start
    res = fit_metadistil(lambda: nn.Linear(6, 3), InMemoryLoader(x, y, 8), teacher=nn.Linear(6, 3), milestones=(2,),
                         teacher_warmup_epochs=1, num_meta_batches=3, **kw)
    assert [r["teacher_updates"] for r in res.history] == [0, 3, 3]  # 7 batches: rounds of 3, 3, 1
    # the authors' 150/180/210 of 240 epochs, scaled
    assert schedule_milestones(240, None) == [150, 180, 210]
    assert schedule_milestones(40, None) == [25, 30, 35]
    assert schedule_milestones(10, None) == [6, 8, 9]  # 6.25, 7.5, 8.75 rounded
    assert schedule_milestones(40, (9, 3)) == [3, 9]


class _BiasStudent(nn.Module):
    """Logits = a bias, whatever the input: under the loss ``logits[:, 0].mean()`` each plain SGD step lowers
    bias[0] by exactly the current lr."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(3))

    def forward(self, x):
        return self.bias.expand(len(x), 3)


def test_lr_schedule_of_student_pilot_and_teacher(monkeypatch):
    torch.set_num_threads(1)
    calls = []

    quizzes = []

    def fake_grads(student, teacher, xs, ys, qxs, qys, *, pilot_lr, T, ce_weight, kd_weight):
        calls.append((pilot_lr, len(qxs), [len(q) for q in qxs]))
        quizzes.append(torch.cat(list(qxs)))
        return [torch.ones_like(p) for p in teacher.parameters()], 0.0

    monkeypatch.setattr(md, "meta_teacher_grads", fake_grads)
    monkeypatch.setattr(md, "distill_loss", lambda s, t, y, **kw: s[:, 0].mean())
    x, y = _data()  # 6 quiz (3 batches of 2 below), 7 training batches per epoch
    torch.manual_seed(0)
    teacher = _SpyTeacher(6, 3)
    w0 = teacher.weight.detach().clone()
    _SpyTeacher.log = []
    res = fit_metadistil(_BiasStudent, InMemoryLoader(x, y, 8), teacher=teacher, epochs=3, milestones=(1, 2),
                         gamma=0.5, teacher_warmup_epochs=1, quiz_batch_size=2, progress=False, lr=0.2, momentum=0.0,
                         weight_decay=0.0, teacher_lr=0.1, teacher_momentum=0.0, teacher_weight_decay=0.0)
    # student: 7 steps at 0.2, 7 at 0.1, 7 at 0.05
    assert float(res.student.bias[0].detach()) == pytest.approx(-(7 * 0.2 + 7 * 0.1 + 7 * 0.05), abs=1e-6)
    # pilot step = the student's current lr; the whole quiz set (3 batches of 2) per round by default
    assert calls == [(0.1, 3, [2, 2, 2])] * 7 + [(0.05, 3, [2, 2, 2])] * 7
    # each round: one pass over the same 6 quiz samples, reshuffled from pass to pass
    rows = sorted(map(tuple, quizzes[0].tolist()))
    assert all(sorted(map(tuple, q.tolist())) == rows for q in quizzes)
    assert len({tuple(q.flatten().tolist()) for q in quizzes}) > 1
    # teacher: fixed in epoch 0, then teacher_lr 0.1 (the milestone at its start does not decay it), 0.05
    assert all(torch.equal(w, w0) for _, w in _SpyTeacher.log[:7])
    torch.testing.assert_close(res.teacher.weight, w0 - (7 * 0.1 + 7 * 0.05), rtol=0, atol=1e-6)
    assert [(r["lr"], r["pilot_lr"], r["teacher_lr"]) for r in res.history] == [
        (0.2, 0.2, 0.1), (0.1, 0.1, 0.1), (0.05, 0.05, 0.05)]
    calls.clear()
    fit_metadistil(_BiasStudent, InMemoryLoader(x, y, 8), teacher=nn.Linear(6, 3), epochs=1, milestones=(),
                   quiz_batch_size=4, quiz_batches=3, pilot_lr=0.7, progress=False, lr=0.2)
    # a stream of reshuffled passes over the 6 quiz samples (batches 4, 2, 4, 2, ...), 3 batches per round
    assert calls == [(0.7, 3, [4, 2, 4]), (0.7, 3, [2, 4, 2])] * 3 + [(0.7, 3, [4, 2, 4])]


def test_the_quiz_set_is_held_out_and_augmented_like_the_training_set():
    from distill.data.augment import RandomHorizontalFlip

    x, y = _data()
    x = x.reshape(60, 1, 2, 3)  # the loader augments images only
    aug = RandomHorizontalFlip()
    train, quiz = md._split_quiz(InMemoryLoader(x, y, 8, augment=aug), 0.1, 4, seed=0)
    assert train.augment is aug and quiz.augment is aug  # the authors' held set takes the training transform
    assert len(quiz.inputs) == 6 and len(train.inputs) == 54 and quiz.batch_size == 4
    seen = {tuple(r) for r in train.inputs.flatten(1).tolist()}
    assert not any(tuple(r) in seen for r in quiz.inputs.flatten(1).tolist())


@pytest.mark.parametrize("kw, match", [
    ({"teacher_warmup_steps": 3, "teacher_warmup_epochs": 1}, "not both"),
    ({"teacher_warmup_steps": -1}, "teacher_warmup_steps"),
    ({"teacher_warmup_epochs": 1.5}, "teacher_warmup_epochs"),
    ({"quiz_batches": 0}, "quiz_batches"),
    ({"milestones": (0, 2)}, "milestone"),
    ({"milestones": 3}, "milestones"),
    ({"gamma": 0.0}, "gamma"),
])
def test_bad_schedule_arguments_are_refused(kw, match):
    x, y = _data()
    with pytest.raises(ValueError, match=match):
        fit_metadistil(nn.Linear(6, 3), InMemoryLoader(x, y, 8), teacher=nn.Linear(6, 3), epochs=1, progress=False,
                       **kw)
