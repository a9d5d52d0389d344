"""Knowledge projection as a strategy (Zhang, Ning & He 2017, arXiv 1710.09505): the projected teacher
feature injected into the student's upper layers, the decaying projection weight, the layer-pair search.
Numbers are worked out by hand or with numpy, never with the code under test."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from distill.batch import Batch
from distill.data.loader import InMemoryLoader
from distill.strategies.registry import strategy_info
from distill.strategies.knowledge_projection import (
    InjectedProjectionLoss,
    KnowledgeProjectionNet,
    _joint_loss,
    fit_knowledge_projection,
    inject,
    injection_coefficient,
    projection_decay,
)

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- schedules


def test_injection_coefficient_falls_linearly_over_the_handover():
    assert [injection_coefficient(e, 4) for e in range(7)] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0, 0.0]
    assert [injection_coefficient(e, 3) for e in range(4)] == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0])
    assert injection_coefficient(0, 0) == 0.0 and injection_coefficient(5, 0) == 0.0  # no injection


def test_projection_decay_values():
    assert [projection_decay(e, 5) for e in range(5)] == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])
    assert projection_decay(0, 1) == 1.0


@pytest.mark.parametrize("args, match", [((-1, 3), "epoch"), ((True, 3), "epoch"), ((0, -2), "handover_epochs"),
                                         ((0, 1.5), "handover_epochs")])
def test_injection_coefficient_rejects_bad_values(args, match):
    with pytest.raises(ValueError, match=match):
        injection_coefficient(*args)


@pytest.mark.parametrize("args, match", [((5, 5), r"epoch must be an int in \[0, 5\)"), ((0, 0), "total_epochs"),
                                         ((-1, 3), "epoch")])
def test_projection_decay_rejects_bad_values(args, match):
    with pytest.raises(ValueError, match=match):
        projection_decay(*args)


def test_inject_mixes_by_hand():
    own = torch.tensor([[1.0, 2.0], [-4.0, 0.0]])
    proj = torch.tensor([[3.0, 6.0], [0.0, 8.0]])
    # 0.75 * own + 0.25 * proj
    assert torch.allclose(inject(own, proj, 0.25), torch.tensor([[1.5, 3.0], [-3.0, 2.0]]))
    assert torch.equal(inject(own, proj, 0.0), own) and torch.equal(inject(own, proj, 1.0), proj)
    with pytest.raises(ValueError, match=r"shape \(2, 2\)"):
        inject(own, proj[:, :1], 0.5)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\], got 1.5"):
        inject(own, proj, 1.5)


@settings(max_examples=30, deadline=None)
@given(st.floats(0.0, 1.0), st.integers(0, 2**16))
def test_inject_lies_between_the_two_features(alpha, seed):
    g = torch.Generator().manual_seed(seed)
    own, proj = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    out = inject(own, proj, alpha)
    lo, hi = torch.minimum(own, proj), torch.maximum(own, proj)
    assert bool(((out >= lo - 1e-6) & (out <= hi + 1e-6)).all())


# ----------------------------------------------------------------------------- the injected forward, by hand


def _tiny(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """student: x (2) -> low (2) -> up (3 logits); teacher: x (2) -> feat (3) -> head (3 logits)."""
    torch.manual_seed(seed)
    student = nn.Sequential(OrderedDict(low=nn.Linear(2, 2, bias=False), up=nn.Linear(2, 3, bias=False)))
    teacher = nn.Sequential(OrderedDict(feat=nn.Linear(2, 3, bias=False), head=nn.Linear(3, 3)))
    with torch.no_grad():
        student.low.weight.copy_(torch.tensor([[1.0, -1.0], [0.5, 2.0]]))
        student.up.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        teacher.feat.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    return student, teacher


X = torch.tensor([[1.0, 2.0], [-1.0, 0.5], [0.0, -2.0]])
Y = torch.tensor([0, 2, 1])
WP = np.array([[1.0, -1.0, 0.5], [0.0, 2.0, -1.0]])  # projection matrix (2 x 3)
BP = np.array([0.5, -1.0])


def _net(student, teacher) -> KnowledgeProjectionNet:
    net = KnowledgeProjectionNet(student, teacher, "low", "feat", X)
    lin = net.kp.projection[0]
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(WP, dtype=torch.float32))
        lin.bias.copy_(torch.tensor(BP, dtype=torch.float32))
    return net


def _numpy_parts(alpha: float):
    x = X.numpy().astype(np.float64)
    f_s = x @ np.array([[1.0, -1.0], [0.5, 2.0]]).T
    f_t = x @ np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]).T
    p = np.maximum(f_t @ WP.T + BP, 0.0)
    h = (1 - alpha) * f_s + alpha * p
    logits = h @ np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]).T
    return f_s, p, logits


def test_injected_forward_matches_a_written_out_computation():
    student, teacher = _tiny()
    net = _net(student, teacher)
    net.alpha = 0.25
    f_s, p, logits = _numpy_parts(0.25)
    out = net(X)
    assert np.allclose(out.detach().numpy(), logits, atol=1e-5)
    assert np.allclose(net.last_own.detach().numpy(), f_s, atol=1e-5)
    assert np.allclose(net.last_projected.detach().numpy(), p, atol=1e-5)
    # the student called directly runs alone, and after close() too
    alone = _numpy_parts(0.0)[2]
    assert np.allclose(student(X).detach().numpy(), alone, atol=1e-5)
    net.close()
    assert np.allclose(student(X).detach().numpy(), alone, atol=1e-5)
    with pytest.raises(RuntimeError, match="detach"):
        net(X)


def test_gradients_follow_the_injection():
    # alpha = 1: the cross-entropy reaches the projection, not the student's lower layer
    student, teacher = _tiny()
    net = _net(student, teacher)
    net.alpha = 1.0
    nn.functional.cross_entropy(net(X), Y).backward()
    assert student.low.weight.grad is None or float(student.low.weight.grad.abs().sum()) == 0.0
    assert float(net.kp.projection[0].weight.grad.abs().sum()) > 0
    assert all(p.grad is None for p in teacher.parameters())
    # alpha = 0: it reaches the lower layer, not the projection
    student, teacher = _tiny()
    net = _net(student, teacher)
    net.alpha = 0.0
    nn.functional.cross_entropy(net(X), Y).backward()
    assert float(student.low.weight.grad.abs().sum()) > 0
    w = net.kp.projection[0].weight.grad
    assert w is None or float(w.abs().sum()) == 0.0


def test_projection_loss_is_the_decayed_element_mean_and_sets_alpha():
    student, teacher = _tiny()
    net = _net(student, teacher)
    method = InjectedProjectionLoss(total_epochs=5, handover_epochs=4, weight=3.0)
    method.bind_models(net, None, Batch(X))
    assert net.alpha == 1.0
    method.on_epoch_start(2, 5)
    assert net.alpha == 0.5 and method.weight_factor() == pytest.approx(0.6)
    net(X)
    f_s, p, _ = _numpy_parts(0.5)
    expected = ((f_s - p) ** 2).sum(axis=1).mean() / 2  # per-sample sum over n = 2 elements, batch mean
    assert float(method(None, None, Batch(X, Y)).detach()) == pytest.approx(expected, rel=1e-5)
    assert method.log_values() == {"alpha": 0.5, "decay": pytest.approx(0.6)}


def test_joint_loss_by_hand():
    student, teacher = _tiny()
    net = _net(student, teacher)
    method = InjectedProjectionLoss(total_epochs=4, handover_epochs=2, weight=2.0)
    method.bind_models(net, None, Batch(X))
    method.on_epoch_start(1, 4)  # alpha 0.5, decay 0.75
    f_s, p, logits = _numpy_parts(0.5)
    z = logits - logits.max(axis=1, keepdims=True)
    ce = -(z[np.arange(3), Y.numpy()] - np.log(np.exp(z).sum(axis=1))).mean()
    proj = ((f_s - p) ** 2).sum(axis=1).mean() / 2
    loader = InMemoryLoader(X, Y, 2, shuffle=False)  # batches of 2 and 1: the mean is over samples
    assert _joint_loss(net, method, loader) == pytest.approx(ce + 2.0 * 0.75 * proj, rel=1e-5)


# ----------------------------------------------------------------------------- the strategy


def _images(n: int = 48, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randn(n, 1, 8, 8, generator=g) * 0.3
    x[:, :, :4, :4] += y.view(-1, 1, 1, 1).float()  # a learnable signal
    return x, y


def _cnn(widths, stem):
    from distill.models.small import CNN

    return CNN(3, 1, widths=widths, stem_width=stem, blocks=1)


def test_strategy_trains_on_the_schedule_and_leaves_the_teacher_alone():
    x, y = _images()
    loader = InMemoryLoader(x, y, 16, seed=0)
    torch.manual_seed(0)
    teacher = _cnn((8, 8, 16), 8)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = _cnn((4, 4, 8), 4)
    r = fit_knowledge_projection(student, loader, loader, teacher=teacher, epochs=4,  # handover: 4 // 2
                                 projection_weight=0.5, progress=False, lr=0.05, eval_teacher=False)
    assert [h["projection_alpha"] for h in r.history] == [1.0, 0.5, 0.0, 0.0]
    assert [h["projection_decay"] for h in r.history] == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert r.pair == ("stage2", "stage2") and r.search_losses == {}
    assert r.student is student and r.last_acc == r.history[-1]["val_independent_acc"]
    assert r.injected_last_acc == r.history[-1]["val_student_acc"]
    # the hook is gone: the student runs alone, and the teacher did not change (weights, BN buffers)
    assert r.net is not None and r.net._handle is None
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert strategy_info("knowledge_projection").fn is fit_knowledge_projection


def test_search_keeps_the_pair_with_the_lowest_joint_loss():
    x, y = _images()
    loader = InMemoryLoader(x, y, 16, seed=0)
    torch.manual_seed(0)
    teacher = _cnn((8, 8, 16), 8)
    pairs = [("stage1", "stage1"), ("stage2", "stage2"), ("stage3", "stage3")]
    r = fit_knowledge_projection(lambda: _cnn((4, 4, 8), 4), loader, loader, teacher=teacher, epochs=2, pairs=pairs,
                                 progress=False, lr=0.05, eval_teacher=False)
    assert set(r.search_losses) == {"stage1<-stage1", "stage2<-stage2", "stage3<-stage3"}
    best = min(r.search_losses, key=r.search_losses.get)
    assert f"{r.pair[0]}<-{r.pair[1]}" == best
    assert all(np.isfinite(v) for v in r.search_losses.values())


@pytest.mark.parametrize("kwargs, error, match", [
    ({"pairs": []}, ValueError, "pairs must be a non-empty list"),
    ({"pairs": "stage2"}, ValueError, "pairs must be a non-empty list"),
    ({"pairs": [("stage2",)]}, ValueError, "pairs must be a non-empty list"),
    ({"pairs": [("stage2", "stage2"), ("stage2", "stage2")]}, ValueError, "twice"),
    ({"pairs": [("stage9", "stage2")]}, ValueError, "stage9"),
    ({"pairs": [("stage2", "nope")]}, ValueError, "nope"),
    ({"handover_epochs": 3}, ValueError, r"handover_epochs must be an int in \[0, epochs=2\], got 3"),
    ({"handover_epochs": -1}, ValueError, "handover_epochs"),
    ({"search_epochs": 0}, ValueError, "search_epochs"),
    ({"search_epochs": 3}, ValueError, "search_epochs"),
    ({"projection_weight": -1.0}, ValueError, "projection_weight"),
    ({"projection_weight": float("nan")}, ValueError, "projection_weight"),
    ({"teacher": "resnet"}, TypeError, "teacher"),
    ({"epochs": 0}, ValueError, "epochs"),
    ({"resume": True}, ValueError, "cannot resume"),
])
def test_bad_arguments_are_refused_before_any_training(kwargs, error, match):
    x, y = _images(16)
    loader = InMemoryLoader(x, y, 16, seed=0)
    teacher = _cnn((8, 8, 16), 8)
    args = {"teacher": teacher, "epochs": 2, "progress": False, **kwargs}
    student = _cnn((4, 4, 8), 4)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(error, match=match):
        fit_knowledge_projection(student, loader, None, **args)
    for k, v in student.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_shape_that_cannot_be_projected_is_refused():
    x, y = _images(16)
    loader = InMemoryLoader(x, y, 16, seed=0)
    teacher = _cnn((8, 8, 16), 8)
    # student stage1 (8x8) vs teacher stage3 (2x2): the teacher's map is smaller
    with pytest.raises(ValueError, match="teacher's map must equal the student's"):
        fit_knowledge_projection(_cnn((4, 4, 8), 4), loader, None, teacher=teacher, epochs=1,
                                 pairs=[("stage1", "stage3")], progress=False)


def test_projection_loss_trains_the_projection_and_the_lower_layer_not_the_teacher():
    student, teacher = _tiny()
    net = _net(student, teacher)
    method = InjectedProjectionLoss(total_epochs=2, handover_epochs=1)
    method.bind_models(net, None, Batch(X))
    net(X)
    method(None, None, Batch(X, Y)).backward()
    f_s, p, _ = _numpy_parts(1.0)
    # d/dW_low of (1/B) sum_b (1/n) ||F_S - P||^2, F_S = x W_low^T: (2/(B n)) (F_S - P)^T x
    expected = 2.0 / (3 * 2) * (f_s - p).T @ X.numpy()
    assert np.allclose(student.low.weight.grad.numpy(), expected, atol=1e-5)
    assert float(net.kp.projection[0].weight.grad.abs().sum()) > 0
    assert student.up.weight.grad is None  # the upper layer is not on the projection term's path
    assert all(q.grad is None for q in teacher.parameters())
    net.close()
    with pytest.raises(RuntimeError, match="tap was removed"):
        net.teacher_feature(X)


def test_result_accuracies_are_the_student_alone(monkeypatch):
    import distill.strategies.student_alone as alone_mod

    accs = iter([40.0, 70.0, 60.0])
    monkeypatch.setattr(alone_mod, "evaluate", lambda *a, **k: {"student_acc": next(accs)})
    x, y = _images(16)
    loader = InMemoryLoader(x, y, 16, seed=0)
    r = fit_knowledge_projection(_cnn((4, 4, 8), 4), loader, loader, teacher=_cnn((8, 8, 16), 8), epochs=3,
                                 progress=False, eval_teacher=False)
    assert [h["val_independent_acc"] for h in r.history] == [40.0, 70.0, 60.0]
    assert (r.last_acc, r.best_acc, r.best_epoch) == (60.0, 70.0, 1)


def test_search_measures_the_joint_loss_at_the_last_search_epoch(monkeypatch):
    import distill.strategies.knowledge_projection as kp

    seen = []

    def fake(net, method, loader):
        seen.append((method.epoch, net.alpha, method.weight_factor()))
        return float(len(seen))  # the first candidate wins

    monkeypatch.setattr(kp, "_joint_loss", fake)
    x, y = _images(16)
    loader = InMemoryLoader(x, y, 16, seed=0)
    r = fit_knowledge_projection(_cnn((4, 4, 8), 4), loader, None, teacher=_cnn((8, 8, 16), 8), epochs=4,
                                 search_epochs=2, pairs=[("stage3", "stage3"), ("stage2", "stage2")],
                                 progress=False, eval_teacher=False)
    # epoch 1 of 4, handover 2: alpha 0.5, decay 0.75
    assert seen == [(1, 0.5, 0.75), (1, 0.5, 0.75)]
    assert r.pair == ("stage3", "stage3") and r.search_losses == {"stage3<-stage3": 1.0, "stage2<-stage2": 2.0}


def test_one_batch_objective_through_the_distiller():
    from distill.distiller import Distiller

    student, teacher = _tiny()
    net = _net(student, teacher)
    d = Distiller(net, None, {"ce": 1.0, "projection": InjectedProjectionLoss(total_epochs=4, handover_epochs=2,
                                                                              weight=2.0)})
    d.prepare(Batch(X, Y))
    d.set_epoch(1, 4)  # alpha 0.5, decay 0.75
    out = d(Batch(X, Y))
    f_s, p, logits = _numpy_parts(0.5)
    z = logits - logits.max(axis=1, keepdims=True)
    ce = -(z[np.arange(3), Y.numpy()] - np.log(np.exp(z).sum(axis=1))).mean()
    proj = ((f_s - p) ** 2).sum(axis=1).mean() / 2
    assert float(out.total.detach()) == pytest.approx(ce + 2.0 * 0.75 * proj, rel=1e-5)
