"""HSAKD: the student's objective and the teacher's auxiliary loss against explicit loops, the
auxiliary classifiers of any model, gradients (never into the teacher; a frozen teacher backbone
untouched by its classifiers' training), the two-stage strategy on digits with two model
pairs, and argument errors before any training.
"""

from __future__ import annotations

import pytest
import torch
from _views import CNN_PAIRS
from hypothesis import given, settings
from hypothesis import strategies as st
from test_mixskd import kl_by_hand as kd_by_hand
from test_mixskd import log_softmax_row

from distill import Distiller
from distill.data import get_dataset
from distill.data.loader import InMemoryLoader
from distill.methods import HSAKD, method_info
from distill.methods.hsakd import AuxiliaryNet, HSAKDAuxCE, hsakd_aux_loss, hsakd_loss
from distill.models import create
from distill.strategies.chain import ChainResult
from distill.strategies.hsakd import fit_hsakd
from distill.strategies.registry import strategy_info
from distill.strategies.self_distill import RotationLoader

SETTINGS = settings(max_examples=20, deadline=None)


def test_student_objective_equals_explicit_loops():
    g = torch.Generator().manual_seed(0)
    b, k, T = 2, 3, 3.0
    rows = 4 * b
    y = torch.tensor([2, 0]).repeat_interleave(4)  # RotationLoader repeats each image's label
    s, t = torch.randn(rows, k, generator=g), torch.randn(rows, k, generator=g)
    s_aux = [torch.randn(rows, 4 * k, generator=g) for _ in range(2)]
    t_aux = [torch.randn(rows, 4 * k, generator=g) for _ in range(2)]
    ce = -sum(log_softmax_row(s[4 * i].tolist())[int(y[4 * i])] for i in range(b)) / b  # unrotated rows only
    expected = ce + sum(kd_by_hand(a.tolist(), c.tolist(), T) for a, c in zip(s_aux, t_aux)) \
        + kd_by_hand(s.tolist(), t.tolist(), T)
    assert float(hsakd_loss(s, t, s_aux, t_aux, y, T)) == pytest.approx(expected, rel=1e-5)


def test_auxiliary_loss_uses_the_joint_class_rotation_labels():
    g = torch.Generator().manual_seed(1)
    y = torch.tensor([1, 3]).repeat_interleave(4)
    q = torch.randn(8, 16, generator=g)
    # row 4b + j holds image b turned j quarter turns: its joint label is 4 y_b + j
    expected = -sum(log_softmax_row(q[r].tolist())[4 * int(y[r]) + r % 4] for r in range(8)) / 8
    assert float(hsakd_aux_loss([q, q], y)) == pytest.approx(2 * expected, rel=1e-5)
    with pytest.raises(ValueError, match="4 rotations"):
        hsakd_aux_loss([q[:6]], y[:6])


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.floats(0.5, 5.0))
def test_a_student_equal_to_its_teacher_pays_only_the_task_loss(seed, T):
    g = torch.Generator().manual_seed(seed)
    z, aux = torch.randn(8, 3, generator=g).double(), [torch.randn(8, 12, generator=g).double()]
    y = torch.tensor([0, 2]).repeat_interleave(4)
    task = torch.nn.functional.cross_entropy(z[0::4], y[0::4])
    assert float(hsakd_loss(z, z, aux, aux, y, T)) == pytest.approx(float(task), abs=1e-9)


def test_gradient_reaches_the_student_and_never_the_teacher():
    g = torch.Generator().manual_seed(2)

    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).requires_grad_(True)

    s, t, s_aux, t_aux = leaf(8, 3), leaf(8, 3), [leaf(8, 12)], [leaf(8, 12)]
    hsakd_loss(s, t, s_aux, t_aux, torch.zeros(8, dtype=torch.long)).backward()
    assert s.grad is not None and s_aux[0].grad is not None
    assert t.grad is None and t_aux[0].grad is None


def test_auxiliary_net_keeps_the_output_and_a_frozen_backbone():
    torch.manual_seed(0)
    model = create("cnn", widths=(4, 8, 8))
    x = torch.randn(8, 1, 8, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    net = AuxiliaryNet(model, ["stage1", "stage2", "stage3"], x, frozen_backbone=True)
    assert net.aux_taps == ["aux.0", "aux.1", "aux.2"]
    d = Distiller(net, None, {"hsakd_aux": HSAKDAuxCE(3)})
    d.train()
    assert not model.training and all(h.training for h in net.heads)
    out = d(next(iter(RotationLoader([(x[:2], torch.tensor([1, 2]))]))))
    assert out.student["aux.2"].shape == (8, 40) and out.student["aux.0"].shape == (8, 40)
    out.total.backward()
    assert all(p.grad is not None for p in net.heads.parameters())
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # BN statistics too
    model.eval()
    assert torch.equal(net(x), model(x))


def test_the_method_is_registered_and_reads_the_auxiliary_taps():
    info = method_info("hsakd")
    assert info.cls is HSAKD and info.paper.arxiv == "2107.13715" and info.defaults["T"] == 3.0
    m = HSAKD(branches=2)
    assert m.student_taps == m.teacher_taps == ["aux.0", "aux.1"]
    with pytest.raises(ValueError, match="branches must be"):
        HSAKD(branches=0)
    with pytest.raises(ValueError, match="T must be"):
        HSAKD(T=0)


# ---------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def digits():
    train, val = get_dataset("digits", split="train"), get_dataset("digits", split="val")
    loader = InMemoryLoader(train.inputs[:256], train.targets[:256], 32, shuffle=True, seed=0, return_index=True)
    return loader, InMemoryLoader(val.inputs[:200], val.targets[:200], 200, shuffle=False)


@pytest.mark.parametrize("pair", list(CNN_PAIRS))
def test_two_stages_on_digits_lower_the_students_loss_and_leave_the_teacher(digits, pair):
    train, val = digits
    torch.manual_seed(0)
    student, teacher = CNN_PAIRS[pair]()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    result = fit_hsakd(student, train, val, teacher=teacher, epochs=3, teacher_epochs=1, progress=False, lr=0.05,
                       schedule="constant")
    assert isinstance(result, ChainResult) and len(result.stages) == 2
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < losses[0], losses
    assert result.last_acc is not None and "val_teacher_acc" in result.history[-1]
    teacher_net, delivered = result.models
    assert isinstance(teacher_net, AuxiliaryNet) and delivered is student
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())  # frozen in both stages
    assert not any(m._forward_hooks for m in student.modules())  # the delivered student runs as before


def test_a_trained_auxiliary_teacher_teaches_an_mlp(digits):
    train, val = digits
    torch.manual_seed(0)
    teacher = create("cnn", widths=(8, 16, 16))
    net = AuxiliaryNet(teacher, ["stage2", "stage3"], next(iter(train)).inputs, frozen_backbone=True)
    result = fit_hsakd(create("mlp_digits_student"), train, val, teacher=net, epochs=3, exits=["hidden1", "pool"],
                       progress=False, lr=0.05, schedule="constant")
    assert len(result.stages) == 1  # the teacher's classifiers were given: no teacher stage
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < losses[0], losses


def test_bad_arguments_fail_before_any_training(digits):
    train, _ = digits
    student, teacher = create("cnn_digits_student"), create("cnn", widths=(8, 16, 16))
    before = [p.detach().clone() for p in student.parameters()]
    with pytest.raises(ValueError, match="teacher_epochs"):
        fit_hsakd(student, train, teacher=teacher, epochs=1, progress=False)
    with pytest.raises(ValueError, match="stage by stage"):
        fit_hsakd(student, train, teacher=teacher, epochs=1, teacher_epochs=1, teacher_exits=["stage3"], progress=False)
    with pytest.raises(ValueError, match="teacher_backbone must be"):
        fit_hsakd(student, train, teacher=teacher, epochs=1, teacher_epochs=1, teacher_backbone="free", progress=False)
    with pytest.raises(ValueError, match="T must be"):
        fit_hsakd(student, train, teacher=teacher, epochs=1, teacher_epochs=1, T=-1.0, progress=False)
    with pytest.raises(ValueError, match="square"):
        wide = InMemoryLoader(torch.randn(8, 1, 8, 12), torch.arange(8), 4)
        fit_hsakd(student, wide, teacher=teacher, epochs=1, teacher_epochs=1, progress=False)
    with pytest.raises(ValueError, match="exits must be"):
        fit_hsakd(student, train, teacher=teacher, epochs=1, teacher_epochs=1, exits="stage1", progress=False)
    with pytest.raises(TypeError, match="teacher must be"):
        fit_hsakd(student, train, teacher=None, epochs=1, teacher_epochs=1, progress=False)
    with pytest.raises(ValueError, match="epochs must be"):
        fit_hsakd(student, train, teacher=teacher, epochs=1, teacher_epochs=0, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters()))
    info = strategy_info("hsakd")
    assert info.fn is fit_hsakd and info.paper.arxiv == "2107.13715"
