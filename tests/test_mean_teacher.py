"""Mean teacher (Tarvainen & Valpola, NeurIPS 2017): the EMA decay and ramp-up against numbers worked
out by hand, the consistency and classification costs against explicit loops, the EMA teacher
against a hand-computed average after real optimizer steps (never receiving gradient), the
two-view mixed loader, and the strategy end to end on digits.
"""

from __future__ import annotations

import math

import pytest
import torch
from _interrupt import Interrupted, interrupt_after
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import distill
from distill import functional as DF
from distill.batch import Batch
from distill.data.augment import RandomCropPad
from distill.data.loader import InMemoryLoader
from distill.strategies.mean_teacher import (
    EMATeacher,
    MaskedCrossEntropy,
    MeanTeacherConsistency,
    MeanTeacherLoader,
    TwoViewBatch,
    mean_teacher,
)
from distill.strategies.registry import strategy_info
from distill.train.evaluate import evaluate

SETTINGS = settings(max_examples=30, deadline=None)


def small_net() -> nn.Module:
    """A tiny model with a BatchNorm (buffers) and a Dropout (teacher noise)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.5),
                         nn.Linear(6, 10))


def softmax_rows(z: list[float]) -> list[float]:
    m = max(z)
    e = [math.exp(v - m) for v in z]
    return [v / sum(e) for v in e]


# ---------------------------------------------------------------------------- the math


def test_ema_decay_by_hand() -> None:
    assert DF.ema_decay_at(1, 0.999) == pytest.approx(0.5)  # the true mean of θ0 and θ1
    assert DF.ema_decay_at(2, 0.999) == pytest.approx(2 / 3)
    assert DF.ema_decay_at(3, 0.7) == pytest.approx(0.7)  # 0.75 capped
    assert DF.ema_decay_at(10_000, 0.999) == pytest.approx(0.999)
    with pytest.raises(ValueError, match="step"):
        DF.ema_decay_at(0, 0.9)
    with pytest.raises(ValueError, match="decay"):
        DF.ema_decay_at(1, 1.5)


def test_sigmoid_rampup_by_hand() -> None:
    assert DF.sigmoid_rampup(0, 10) == pytest.approx(math.exp(-5))
    assert DF.sigmoid_rampup(5, 10) == pytest.approx(math.exp(-1.25))
    assert DF.sigmoid_rampup(10, 10) == 1.0 and DF.sigmoid_rampup(50, 10) == 1.0
    assert DF.sigmoid_rampup(-3, 10) == pytest.approx(math.exp(-5))
    assert DF.sigmoid_rampup(0, 0) == 1.0
    with pytest.raises(ValueError, match="length"):
        DF.sigmoid_rampup(1, -1)


def test_softmax_mse_against_a_loop() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(4, 5, generator=g, dtype=torch.float64)
    total = 0.0
    for b in range(4):
        ps, pt = softmax_rows(s[b].tolist()), softmax_rows(t[b].tolist())
        total += sum((a - c) ** 2 for a, c in zip(ps, pt))
    assert float(DF.softmax_mse_loss(s, t)) == pytest.approx(total / (4 * 5), rel=1e-12)
    # by hand: logits (log 3, 0) -> (3/4, 1/4) against uniform: ((1/4)^2 + (1/4)^2) / 2 = 1/16
    assert float(DF.softmax_mse_loss(torch.tensor([[math.log(3.0), 0.0]]), torch.zeros(1, 2))) == pytest.approx(1 / 16)
    with pytest.raises(ValueError, match="same"):
        DF.softmax_mse_loss(s, t[:, :4])


@SETTINGS
@given(st.integers(0, 10_000), st.floats(-20, 20))
def test_softmax_mse_properties(seed: int, shift: float) -> None:
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(3, 6, generator=g, dtype=torch.float64), torch.randn(3, 6, generator=g, dtype=torch.float64)
    value = DF.softmax_mse_loss(s, t)
    assert float(value) >= 0
    assert float(DF.softmax_mse_loss(s, s)) == 0.0
    assert float(DF.softmax_mse_loss(t, s)) == pytest.approx(float(value), rel=1e-12)  # symmetric
    assert float(DF.softmax_mse_loss(s + shift, t - shift)) == pytest.approx(float(value), rel=1e-9, abs=1e-15)
    assert float(value) <= 2.0 / 6  # each row's squared distance between two distributions is at most 2


def test_masked_cross_entropy_against_a_loop() -> None:
    g = torch.Generator().manual_seed(1)
    z = torch.randn(5, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([2, -1, 0, -1, 3])
    expected = -sum(math.log(softmax_rows(z[b].tolist())[int(y[b])]) for b in range(5) if y[b] >= 0) / 5
    assert float(DF.masked_cross_entropy(z, y)) == pytest.approx(expected, rel=1e-12)
    assert float(DF.masked_cross_entropy(z, torch.full((5,), -1))) == 0.0
    with pytest.raises(ValueError, match=r"\[7\].*out of range"):
        DF.masked_cross_entropy(z, torch.tensor([7, -1, 0, 0, 0]))
    with pytest.raises(ValueError, match=r"\(B,\)"):
        DF.masked_cross_entropy(z, torch.zeros(4, dtype=torch.long))


# ---------------------------------------------------------------------------- the EMA teacher


def run_steps(teacher_kwargs: dict, steps: int, seed: int = 0) -> tuple[EMATeacher, list[dict], nn.Module]:
    """``steps`` SGD steps of a Distiller with an EMA teacher; the student's state after each step."""
    torch.manual_seed(seed)
    student = small_net()
    teacher = EMATeacher(student, **teacher_kwargs)
    d = distill.Distiller(student, teacher, losses={"ce": MaskedCrossEntropy(),
                                                    "consistency": MeanTeacherConsistency(weight=10.0)})
    opt = torch.optim.SGD(d.trainable_parameters(), lr=0.5)
    snapshots = [{k: v.detach().clone() for k, v in student.state_dict().items()}]
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        d.train()
        out = d(Batch(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)))
        opt.zero_grad()
        out.total.backward()
        assert all(p.grad is None for p in teacher.parameters())  # the teacher never receives gradient
        opt.step()
        d.step_end()
        snapshots.append({k: v.detach().clone() for k, v in student.state_dict().items()})
    return teacher, snapshots, student


def test_ema_equals_a_hand_computed_average_with_the_rampup_decay() -> None:
    teacher, snaps, _ = run_steps({"decay": 0.9, "decay_rampup": 0.6, "rampup_steps": 2}, steps=5)
    # α_t = min(1 - 1/(t+1), cap), cap 0.6 for the first 2 updates, then 0.9
    alphas = [0.5, 0.6, 0.75, 0.8, 5 / 6]
    for name, value in teacher.model.named_parameters():
        ema = snaps[0][name].clone()
        for t, a in enumerate(alphas, start=1):
            ema = a * ema + (1 - a) * snaps[t][name]
        torch.testing.assert_close(value, ema, rtol=1e-5, atol=1e-6)
        assert not value.requires_grad
    assert teacher.num_updates == 5 and teacher.current_decay() == 0.9


def test_ema_without_rampup_decay_uses_the_true_mean_first() -> None:
    teacher, snaps, _ = run_steps({"decay": 0.999}, steps=3)
    w = "1.weight"  # α = 1/2, 2/3, 3/4: the EMA is the plain mean of θ0..θ3
    mean = sum(s[w] for s in snaps) / 4
    torch.testing.assert_close(dict(teacher.model.named_parameters())[w], mean, rtol=1e-5, atol=1e-6)


def test_buffers_own_copy_and_ema() -> None:
    own, _snaps, student = run_steps({"buffers": "own"}, steps=3)
    # "own": the teacher's statistics come from its own training-mode forwards, not from the student
    assert not torch.allclose(own.model[2].running_mean, student[2].running_mean)
    assert int(own.model[2].num_batches_tracked) == 3
    copied, _snaps_c, student_c = run_steps({"buffers": "copy"}, steps=3)
    torch.testing.assert_close(copied.model[2].running_mean, student_c[2].running_mean)
    averaged, snaps_e, _ = run_steps({"buffers": "ema"}, steps=3)
    ema = snaps_e[0]["2.running_var"].clone()
    for t, a in enumerate([0.5, 2 / 3, 0.75], start=1):
        ema = a * ema + (1 - a) * snaps_e[t]["2.running_var"]
    torch.testing.assert_close(averaged.model[2].running_var, ema, rtol=1e-5, atol=1e-6)
    assert int(averaged.model[2].num_batches_tracked) == int(snaps_e[-1]["2.num_batches_tracked"])


def test_teacher_noise_only_in_training_steps_and_its_own_view() -> None:
    torch.manual_seed(0)
    student = small_net()
    teacher = EMATeacher(student, decay=0.99)
    x, x2 = torch.randn(16, 1, 8, 8), torch.randn(16, 1, 8, 8)
    reference = EMATeacher(student).model  # the same weights, to compute the expected outputs
    teacher.train()
    with torch.no_grad():  # evaluation and prepare(): eval mode, running statistics untouched
        out = teacher(Batch(x))["logits"]
        torch.testing.assert_close(out, reference.eval()(x))
    assert int(teacher.model[2].num_batches_tracked) == 0
    torch.manual_seed(5)
    noisy = teacher(TwoViewBatch(x, None, teacher_inputs=x2))["logits"]  # a training step: train mode
    torch.manual_seed(5)
    torch.testing.assert_close(noisy, reference.train()(x2).detach())  # on the teacher's own view
    assert not noisy.requires_grad and not teacher.model.training
    assert int(teacher.model[2].num_batches_tracked) == 1
    quiet = EMATeacher(student, noise=False, buffers="copy")
    quiet.train()
    torch.testing.assert_close(quiet(Batch(x))["logits"], EMATeacher(student).model(x))  # a fresh copy, eval


def test_teacher_state_dict_keeps_the_update_count() -> None:
    teacher, _, _ = run_steps({"decay": 0.9}, steps=2)
    fresh = EMATeacher(small_net())
    fresh.load_state_dict(teacher.state_dict())
    assert fresh.num_updates == 2
    torch.testing.assert_close(fresh.model[1].weight, teacher.model[1].weight)


def test_ema_teacher_rejects_bad_arguments() -> None:
    with pytest.raises(TypeError, match="nn.Module"):
        EMATeacher("model")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="decay must"):
        EMATeacher(small_net(), decay=1.2)
    with pytest.raises(ValueError, match="buffers"):
        EMATeacher(small_net(), buffers="mean")
    with pytest.raises(ValueError, match="noise=False"):
        EMATeacher(small_net(), noise=False)
    with pytest.raises(ValueError, match="rampup_steps"):
        EMATeacher(small_net(), rampup_steps=-1)
    teacher = EMATeacher(small_net())
    with pytest.raises(ValueError, match="not the model it copied"):
        teacher.on_step_end(nn.Linear(3, 3))


# ---------------------------------------------------------------------------- the student's losses


def test_the_student_minimises_ce_plus_ramped_consistency() -> None:
    torch.manual_seed(0)
    student = small_net()
    teacher = EMATeacher(student)
    d = distill.Distiller(student, teacher, losses={
        "ce": MaskedCrossEntropy(), "consistency": MeanTeacherConsistency(rampup_steps=4, weight=100.0)})
    x, xt = torch.randn(6, 1, 8, 8), torch.randn(6, 1, 8, 8)
    y = torch.tensor([1, -1, 3, -1, -1, 0])
    d.eval()  # deterministic forwards, so the loss can be recomputed by hand
    with torch.no_grad():
        s, t = student.eval()(x), teacher.model(xt)
    for step in range(3):
        out = d(TwoViewBatch(x, y, teacher_inputs=xt))
        ce = -sum(math.log(softmax_rows(s[b].tolist())[int(y[b])]) for b in range(6) if y[b] >= 0) / 6
        mse = sum((a - c) ** 2 for b in range(6) for a, c in zip(softmax_rows(s[b].tolist()),
                                                                   softmax_rows(t[b].tolist()))) / 60
        ramp = math.exp(-5 * (1 - step / 4) ** 2)
        assert float(out.parts["ce"]) == pytest.approx(ce, rel=1e-5)
        assert float(out.parts["consistency"]) == pytest.approx(100.0 * ramp * mse, rel=1e-4)
        d.methods["consistency"].on_step_end()
    state = d.methods["consistency"].state_dict()
    again = MeanTeacherConsistency(rampup_steps=4)
    again.load_state_dict(state)
    assert again.steps == 3


def test_consistency_gradient_reaches_the_student_only() -> None:
    s = torch.randn(4, 10, requires_grad=True)
    t = torch.randn(4, 10, requires_grad=True)
    loss = MeanTeacherConsistency()({"logits": s}, {"logits": t}, Batch(torch.zeros(4, 1)))
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None


# ---------------------------------------------------------------------------- the loader


def test_loader_joins_labeled_and_unlabeled_batches() -> None:
    xl, yl = torch.randn(6, 1, 8, 8), torch.arange(6)
    xu = torch.randn(20, 1, 8, 8)
    lab = InMemoryLoader(xl, yl, 4, shuffle=False)  # 2 batches: 4 + 2
    unl = InMemoryLoader(xu, None, 5, shuffle=False)  # 4 batches, so the labeled loader cycles twice
    loader = MeanTeacherLoader(lab, unl)
    assert len(loader) == 4
    batches = list(loader)
    assert [len(b) for b in batches] == [9, 7, 9, 7]
    assert batches[0].targets.tolist() == [0, 1, 2, 3] + [-1] * 5
    assert batches[1].targets.tolist() == [4, 5] + [-1] * 5
    torch.testing.assert_close(batches[2].inputs[:4], xl[:4])
    torch.testing.assert_close(batches[3].inputs[2:], xu[15:20])
    assert batches[0].teacher_inputs is None  # no noise, no augmentation: one view
    assert loader.targets.tolist() == yl.tolist()


def test_loader_views_are_independent_and_reproducible() -> None:
    x = torch.zeros(500, 1, 8, 8)
    lab = InMemoryLoader(x, torch.zeros(500, dtype=torch.long), 500, shuffle=False)
    loader = MeanTeacherLoader(lab, input_noise=0.15, augment=RandomCropPad(1), seed=3)
    b = next(iter(loader))
    noise_s, noise_t = b.inputs, b.teacher_inputs
    assert abs(float(noise_s.std()) - 0.15) < 0.01 and abs(float(noise_t.std()) - 0.15) < 0.01
    assert abs(float((noise_s * noise_t).mean())) < 0.15**2 * 0.1  # independent draws
    again = next(iter(loader))
    torch.testing.assert_close(again.inputs, b.inputs)
    loader.set_epoch(1)
    assert not torch.allclose(next(iter(loader)).inputs, b.inputs)
    moved = b.to("cpu")
    assert isinstance(moved, TwoViewBatch) and moved.teacher_inputs is not None


def test_loader_marks_missing_labels_and_rejects_bad_arguments() -> None:
    lab = InMemoryLoader(torch.randn(4, 1, 8, 8), None, 2)
    assert next(iter(MeanTeacherLoader(lab))).targets.tolist() == [-1, -1]
    with pytest.raises(ValueError, match="input_noise"):
        MeanTeacherLoader(lab, input_noise=-0.1)
    with pytest.raises(TypeError, match="augment"):
        MeanTeacherLoader(lab, augment=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="length"):
        MeanTeacherLoader(iter([]))
    with pytest.raises(TypeError, match="floating-point"):
        list(MeanTeacherLoader(InMemoryLoader(torch.zeros(2, 3, dtype=torch.long), None, 2), input_noise=0.1))


# ---------------------------------------------------------------------------- the strategy


def digits_loaders(n_labeled: int = 60, n_unlabeled: int = 300) -> tuple:
    train = distill.data.get_dataset("digits")
    x, y = train.inputs, train.targets
    lab = InMemoryLoader(x[:n_labeled], y[:n_labeled], 20, seed=0)
    unl = InMemoryLoader(x[n_labeled:n_labeled + n_unlabeled], None, 60, seed=1)
    val = InMemoryLoader(x[-200:], y[-200:], 100, shuffle=False)
    return lab, unl, val


@pytest.mark.parametrize("arch", ["cnn_digits_student", "mlp_digits_student"])
def test_mean_teacher_on_digits(arch: str) -> None:
    lab, unl, val = digits_loaders()
    torch.manual_seed(0)
    student = distill.models.create(arch)
    result = mean_teacher(student, lab, val, unlabeled_loader=unl, epochs=8, progress=False, optimizer="adam",
                          lr=0.01, schedule="constant", consistency_rampup=1.0)
    ce = [row["train_ce"] for row in result.history]
    assert ce[-1] < ce[0]  # the labeled loss falls
    assert all(row["train_consistency"] > 0 for row in result.history)
    assert len(result.history) == 8
    ema = result.ema_model
    assert ema is not None and all(not p.requires_grad for p in ema.parameters())
    assert result.ema_last_acc == result.history[-1]["val_teacher_acc"]
    assert result.ema_best_acc == max(row["val_teacher_acc"] for row in result.history)
    # the reported EMA accuracy is that of the returned EMA model, evaluated independently
    acc = evaluate(type("D", (), {"student": ema})(), val, with_teacher=False)["student_acc"]
    assert acc == pytest.approx(result.ema_last_acc)
    assert result.ema_last_acc > 30 and result.last_acc > 30  # 10 classes: well above chance
    # the EMA is an average of the student's past weights: near it, not equal to it
    gaps = [float((p - q.detach()).abs().max()) for p, q in zip(ema.parameters(), student.parameters())]
    assert 0 < max(gaps) < 1.0


def test_mean_teacher_is_registered_and_checks_arguments_before_training() -> None:
    info = strategy_info("mean_teacher")
    assert info.family == "self" and info.paper.arxiv == "1703.01780"
    lab, _unl, val = digits_loaders(20, 20)
    student = distill.models.create("mlp_digits_student")
    before = [p.detach().clone() for p in student.parameters()]
    for kwargs, match in [({"epochs": 0}, "epochs"), ({"consistency": -1.0}, "consistency"),
                          ({"ema_decay": 1.5}, "ema_decay"), ({"ema_decay_rampup": -0.1}, "ema_decay_rampup"),
                          ({"buffers": "none"}, "buffers"), ({"resume": True}, "resume=True needs run_dir"),
                          ({"input_noise": -1.0}, "input_noise")]:
        with pytest.raises(ValueError, match=match):
            mean_teacher(student, lab, val, **{"epochs": 1, "progress": False, **kwargs})
    with pytest.raises(TypeError, match="nn.Module"):
        mean_teacher(lambda: 3, lab, epochs=1, progress=False)  # type: ignore[arg-type, return-value]
    assert all(torch.equal(p, q) for p, q in zip(before, student.parameters()))


def test_loader_reads_index_returning_datasets_with_minus_one_labels() -> None:
    from torch.utils.data import DataLoader

    from distill.data.loader import IndexedTensorDataset

    x = torch.randn(6, 1, 8, 8)
    y = torch.tensor([3, -1, 5, -1, -1, 0])  # -1: unlabeled, as IndexedTensorDataset marks them
    unl = DataLoader(IndexedTensorDataset(x[:4], None), batch_size=4)
    loader = MeanTeacherLoader(DataLoader(IndexedTensorDataset(x, y), batch_size=6), unl)
    (batch,) = list(loader)
    assert batch.targets.tolist() == [3, -1, 5, -1, -1, 0, -1, -1, -1, -1] and batch.index is None
    assert loader.targets.numel() == 0  # no .targets on a DataLoader: fit checks nothing up front
    torch.manual_seed(0)
    student = small_net()
    d = distill.Distiller(student, EMATeacher(student), losses={"ce": MaskedCrossEntropy(),
                                                                "consistency": MeanTeacherConsistency()})
    d.eval()
    with torch.no_grad():
        z = student.eval()(batch.inputs)
    expected = -sum(math.log(softmax_rows(z[b].tolist())[int(batch.targets[b])]) for b in (0, 2, 5)) / 10
    assert float(d(batch).parts["ce"]) == pytest.approx(expected, rel=1e-5)


def test_mean_teacher_resumes_where_the_interrupted_run_stopped(tmp_path) -> None:
    """A run stopped after its second epoch and resumed ends with the student and the EMA teacher of
    the uninterrupted run (fit checkpoints the changing teacher source with the student)."""
    lab, unl, _ = digits_loaders(40, 80)

    def run(run_dir, resume=False, stop_after=None):
        torch.manual_seed(0)
        student = distill.models.create("cnn_digits_student")
        result = mean_teacher(student, lab, None, unlabeled_loader=unl, epochs=3, run_dir=run_dir, resume=resume,
                              progress=False, lr=0.05, input_noise=0.1, on_epoch_end=interrupt_after(stop_after))
        return student, result

    student, whole = run(tmp_path / "whole")
    with pytest.raises(Interrupted):
        run(tmp_path / "cut", stop_after=2)
    resumed_student, resumed = run(tmp_path / "cut", resume=True)
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in whole.history]
    for a, b in zip(student.state_dict().values(), resumed_student.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(whole.ema_model.state_dict().values(), resumed.ema_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
