"""Chains and generations: born-again networks (CWTM, DKPP, the generations' ensemble), teacher-
assistant chains, Pro-KD (checkpoint-following teacher, annealed temperature) and ResKD (res-students
on the residual, and the sample-adaptive inference that runs them only where a sample needs them).

Each objective against numbers worked out by hand or explicit loops, gradients reaching the student
only, the chain's wiring (each stage taught by the model the previous stage delivered), and short
runs on digits with two model families.
"""

from __future__ import annotations

import math

import pytest
import torch
from _interrupt import Interrupted, interrupt_after
from _views import cnn_views
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import distill
from distill import functional as DF
from distill.batch import Batch
from distill.data.loader import InMemoryLoader
from distill.strategies.chain import (
    CWTM,
    DKPP,
    AdaptiveResidualStudent,
    AnnealedKD,
    CheckpointTeacher,
    ResidualStudent,
    ResKDResult,
    born_again,
    ensemble_accuracy,
    evaluate_adaptive,
    load_weights,
    pro_kd,
    reskd,
    reskd_confident,
    save_every_epoch,
    takd,
)
from distill.strategies.registry import strategy_info
from distill.train.checkpoint import save_checkpoint, save_model
from distill.train.evaluate import evaluate

SETTINGS = settings(max_examples=30, deadline=None)


def softmax_rows(z: list[float]) -> list[float]:
    m = max(z)
    e = [math.exp(v - m) for v in z]
    return [v / sum(e) for v in e]


def accuracy(model: nn.Module, loader) -> float:  # type: ignore[no-untyped-def]
    return evaluate(type("D", (), {"student": model})(), loader, with_teacher=False)["student_acc"]


def digits(n: int = 400) -> tuple[InMemoryLoader, InMemoryLoader]:
    data = distill.data.get_dataset("digits")
    train = InMemoryLoader(data.inputs[:n], data.targets[:n], 50, seed=0)
    val = InMemoryLoader(data.inputs[-200:], data.targets[-200:], 100, shuffle=False)
    return train, val


FACTORIES = {
    "cnn": lambda: distill.models.create("cnn", widths=(4, 8, 8), num_classes=10),
    "mlp": lambda: distill.models.create("mlp_digits_student"),
}
FAST = {"optimizer": "adam", "lr": 0.01, "schedule": "constant", "progress": False}


# ---------------------------------------------------------------------------- BAN: CWTM and DKPP


def test_cwtm_by_hand() -> None:
    # teacher rows (log 3, 0) -> top 3/4 and (0, 0) -> top 1/2: weights 0.6 and 0.4
    t = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]], dtype=torch.float64)
    assert DF.cwtm_weights(t).tolist() == pytest.approx([0.6, 0.4])
    s = torch.tensor([[0.0, math.log(4.0)], [math.log(2.0), 0.0]], dtype=torch.float64)  # q = (1/5, 4/5), (2/3, 1/3)
    y = torch.tensor([0, 0])
    expected = 0.6 * -math.log(1 / 5) + 0.4 * -math.log(2 / 3)
    assert float(DF.cwtm_loss(s, t, y)) == pytest.approx(expected, rel=1e-12)


@SETTINGS
@given(st.integers(0, 10_000), st.floats(-30, 30))
def test_cwtm_weights_properties(seed: int, shift: float) -> None:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(5, 7, generator=g, dtype=torch.float64) * 3
    w = DF.cwtm_weights(t)
    assert float(w.sum()) == pytest.approx(1.0) and bool((w > 0).all())
    torch.testing.assert_close(DF.cwtm_weights(t + shift), w)
    # a uniform-confidence batch is plain cross-entropy
    s, y = torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randint(0, 7, (5,), generator=g)
    assert float(DF.cwtm_loss(s, torch.zeros(5, 7, dtype=torch.float64), y)) == pytest.approx(
        float(torch.nn.functional.cross_entropy(s, y)), rel=1e-12)


def test_dkpp_permutes_only_the_dark_knowledge() -> None:
    g = torch.Generator().manual_seed(0)
    t = torch.randn(64, 6, generator=g)
    moved = torch.zeros(6)
    for _ in range(20):
        p = DF.dkpp_permute(t, g)
        assert torch.equal(p.argmax(1), t.argmax(1))
        assert torch.equal(p.max(1).values, t.max(1).values)
        assert torch.equal(p.sort(1).values, t.sort(1).values)  # each row keeps its values
        moved += (p != t).float().sum(0)
    assert bool((moved > 0).all())  # every class position receives other values over the draws
    two = torch.tensor([[2.0, 1.0], [0.0, 3.0]])
    assert torch.equal(DF.dkpp_permute(two, g), two)  # one non-argmax entry: nothing to permute


def test_dkpp_loss_is_kl_to_the_permuted_teacher() -> None:
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(4, 5, generator=g, dtype=torch.float64)
    perm = DF.dkpp_permute(t, torch.Generator().manual_seed(9))
    total = 0.0
    for b in range(4):
        p, q = softmax_rows(perm[b].tolist()), softmax_rows(s[b].tolist())
        total += sum(pk * math.log(pk / qk) for pk, qk in zip(p, q))
    assert float(DF.dkpp_loss(s, t, torch.Generator().manual_seed(9))) == pytest.approx(total / 4, rel=1e-10)


@pytest.mark.parametrize("method", [CWTM(), DKPP()])
def test_ban_objectives_send_gradient_to_the_student_only(method) -> None:  # type: ignore[no-untyped-def]
    student, teacher, batch = cnn_views(6)
    loss = method(student, teacher, batch)
    loss.backward()
    assert student["logits"].grad is not None and student["logits"].grad.abs().sum() > 0
    assert teacher["logits"].grad is None


# ---------------------------------------------------------------------------- Pro-KD: temperature


def test_annealed_temperature_by_hand() -> None:
    assert [DF.annealed_temperature(e, 5, 4.0, 1.0) for e in range(5)] == pytest.approx([4, 3.25, 2.5, 1.75, 1])
    assert DF.annealed_temperature(0, 1, 4.0, 1.0) == 1.0
    with pytest.raises(ValueError, match="t_min"):
        DF.annealed_temperature(0, 3, 1.0, 2.0)
    with pytest.raises(ValueError, match="epoch"):
        DF.annealed_temperature(3, 3, 4.0, 1.0)


def test_annealed_kd_uses_the_epochs_temperature() -> None:
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)
    method = AnnealedKD(T_max=5.0, T_min=1.0)
    method.on_epoch_start(1, 3)  # halfway: T = 3
    assert method.T == 3.0 and method.log_values() == {"T": 3.0}
    expected = 0.0
    for b in range(3):
        p, q = softmax_rows((t[b] / 3).tolist()), softmax_rows((s[b] / 3).tolist())
        expected += 9 * sum(pk * math.log(pk / qk) for pk, qk in zip(p, q))
    value = method({"logits": s}, {"logits": t}, Batch(torch.zeros(3, 1)))
    assert float(value) == pytest.approx(expected / 3, rel=1e-10)
    with pytest.raises(ValueError, match="t_min"):
        AnnealedKD(T_max=1.0, T_min=2.0)


# ---------------------------------------------------------------------------- Pro-KD: the footsteps


def test_load_weights_reads_every_format(tmp_path) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    source = nn.Linear(3, 2)
    sd = source.state_dict()
    files = {
        "model.pt": lambda p: save_model(p, source),
        "last.pt": lambda p: save_checkpoint(p, {"epoch": 0, "distiller": {"student": sd, "methods": {}}}),
        "best.pt": lambda p: save_checkpoint(p, {"student": sd, "methods": {}, "epoch": 0}),
        "plain.pt": lambda p: torch.save(sd, p),
    }
    for name, write in files.items():
        write(tmp_path / name)
        target = load_weights(tmp_path / name, nn.Linear(3, 2))
        assert torch.equal(target.weight, source.weight), name
    with pytest.raises(ValueError, match="do not fit"):
        load_weights(tmp_path / "model.pt", nn.Linear(4, 2))


def write_footsteps(folder, n: int = 3) -> list:  # type: ignore[no-untyped-def]
    paths = []
    for i in range(n):
        m = nn.Linear(4, 3)
        with torch.no_grad():
            m.weight.fill_(float(i))
            m.bias.zero_()
        paths.append(save_model(folder / f"epoch{i + 1:04d}.pt", m))
    return paths


def test_checkpoint_teacher_walks_through_the_checkpoints(tmp_path) -> None:  # type: ignore[no-untyped-def]
    paths = write_footsteps(tmp_path)
    x = torch.ones(2, 4)

    def used(teacher: CheckpointTeacher, epochs: int) -> list[int]:
        out = []
        for e in range(epochs):
            teacher.on_epoch_start(e)
            out.append(int(teacher(Batch(x))["logits"][0, 0]) // 4)  # weight i → logit 4 i
        return out

    even = CheckpointTeacher(nn.Linear(4, 3), tmp_path)
    even.set_total_epochs(6)
    assert used(even, 6) == [0, 0, 1, 1, 2, 2]
    assert used(CheckpointTeacher(nn.Linear(4, 3), paths, epochs_per_checkpoint=1), 5) == [0, 1, 2, 2, 2]
    uneven = CheckpointTeacher(nn.Linear(4, 3), paths)
    uneven.set_total_epochs(4)
    assert used(uneven, 4) == [0, 0, 1, 2]
    assert not CheckpointTeacher.static and all(not p.requires_grad for p in even.parameters())
    with pytest.raises(FileNotFoundError, match="do not exist"):
        CheckpointTeacher(nn.Linear(4, 3), [tmp_path / "missing.pt"])
    with pytest.raises(ValueError, match="do not fit"):
        CheckpointTeacher(nn.Linear(5, 3), paths)
    with pytest.raises(ValueError, match="empty"):
        CheckpointTeacher(nn.Linear(4, 3), [])


def test_save_every_epoch_writes_the_footsteps(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = nn.Linear(2, 2)
    callback = save_every_epoch(model, tmp_path / "steps", every=2)
    for e in range(5):
        callback({"epoch": e})
    assert sorted(p.name for p in (tmp_path / "steps").iterdir()) == ["epoch0002.pt", "epoch0004.pt"]
    with pytest.raises(ValueError, match="every"):
        save_every_epoch(model, tmp_path, every=0)


@pytest.mark.parametrize("arch", ["cnn", "mlp"])
def test_pro_kd_follows_the_teachers_footsteps_on_digits(arch: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    train, val = digits()
    torch.manual_seed(0)
    result = pro_kd(FACTORIES[arch], train, val, teacher=distill.models.create("cnn_digits_student"),
                    teacher_epochs=3, epochs=6, run_dir=tmp_path, T_max=4.0, **FAST)
    steps = sorted((tmp_path / "teacher" / "footsteps").glob("*.pt"))
    assert [p.name for p in steps] == ["epoch0001.pt", "epoch0002.pt", "epoch0003.pt"]
    assert len(result.stages) == 2 and result.history is result.stages[1].history
    # epochs 2k and 2k+1 are taught by checkpoint k: the teacher accuracy logged each epoch is that
    # checkpoint's, evaluated independently
    checkpoint_accs = [accuracy(load_weights(p, distill.models.create("cnn_digits_student")).eval(), val)
                       for p in steps]
    logged = [row["val_teacher_acc"] for row in result.history]
    assert logged == pytest.approx([checkpoint_accs[e // 2] for e in range(6)])
    assert [row["kd_T"] for row in result.history] == pytest.approx([4.0, 3.4, 2.8, 2.2, 1.6, 1.0])
    # the total changes meaning as T and the teacher change; its label part keeps its meaning and falls
    assert result.history[-1]["train_ce"] < result.history[0]["train_ce"]


def test_pro_kd_checks_arguments_before_training(tmp_path) -> None:  # type: ignore[no-untyped-def]
    train, val = digits(100)
    teacher = distill.models.create("cnn_digits_student")
    with pytest.raises(ValueError, match="teacher_epochs and run_dir"):
        pro_kd(FACTORIES["mlp"], train, val, teacher=teacher, epochs=2)
    with pytest.raises(ValueError, match="t_min"):
        pro_kd(FACTORIES["mlp"], train, val, teacher=teacher, epochs=2, teacher_epochs=1, run_dir=tmp_path,
               T_max=0.5)
    with pytest.raises(ValueError, match="kd_weight"):
        pro_kd(FACTORIES["mlp"], train, val, teacher=teacher, epochs=2, checkpoints=tmp_path, kd_weight=0.0)
    with pytest.raises(TypeError, match="teacher"):
        pro_kd(FACTORIES["mlp"], train, val, teacher=None, epochs=2, checkpoints=tmp_path)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no \\*.pt"):
        pro_kd(FACTORIES["mlp"], train, val, teacher=teacher, epochs=2, checkpoints=tmp_path)
    assert not (tmp_path / "teacher").exists() and not (tmp_path / "student").exists()


# ---------------------------------------------------------------------------- born-again networks


def ensemble_by_hand(models: list[nn.Module], loader: InMemoryLoader) -> float:
    correct = n = 0
    for batch in loader:
        with torch.no_grad():
            probs = [torch.softmax(m.eval()(batch.inputs), 1) for m in models]
        mean = [[sum(float(p[b, k]) for p in probs) / len(probs) for k in range(probs[0].shape[1])]
                for b in range(len(batch))]
        correct += sum(int(max(range(len(row)), key=row.__getitem__) == int(y)) for row, y in zip(mean, batch.targets))
        n += len(batch)
    return 100.0 * correct / n


@pytest.mark.parametrize("arch", ["cnn", "mlp"])
def test_born_again_generations_and_their_ensemble(arch: str) -> None:
    train, val = digits()
    result = born_again(FACTORIES[arch], train, val, epochs=4, generations=2, seed=1, **FAST)
    assert len(result.stages) == 3 and len(result.models) == 3  # generation 0 from scratch, then 2
    assert len({id(p) for m in result.models for p in m.parameters()}) == sum(
        len(list(m.parameters())) for m in result.models)  # fresh models, nothing shared
    assert "train_ce" in result.stages[0].history[0] and "train_kd" in result.stages[1].history[0]
    assert "train_ce" not in result.stages[1].history[0]  # BAN: the teacher's outputs only
    # generation k is taught by generation k-1: the teacher accuracy it logs is that model's
    assert result.stages[2].history[0]["val_teacher_acc"] == pytest.approx(accuracy(result.models[1], val))
    for stage in result.stages:
        assert stage.history[-1]["train_loss"] < stage.history[0]["train_loss"]
    assert result.ensemble_accs[0] == pytest.approx(accuracy(result.models[1], val))
    assert result.ensemble_acc == pytest.approx(ensemble_by_hand(result.models[1:], val))
    assert result.last_acc == result.stages[-1].last_acc
    assert all(p.requires_grad for m in result.models for p in m.parameters())


@pytest.mark.parametrize("loss", ["cwtm", "dkpp"])
def test_born_again_variants_from_a_given_teacher(loss: str) -> None:
    train, val = digits(200)
    teacher = FACTORIES["cnn"]()
    state = {k: v.clone() for k, v in teacher.state_dict().items()}
    result = born_again(FACTORIES["mlp"], train, val, teacher=teacher, epochs=2, generations=1, loss=loss,
                        ce_weight=0.5, **FAST)
    assert len(result.stages) == 1 and f"train_{loss}" in result.history[0] and "train_ce" in result.history[0]
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in state.items())  # weights and BN buffers


def test_born_again_checks_arguments_before_training() -> None:
    train, val = digits(100)
    info = strategy_info("born_again")
    assert info.family == "chain" and info.paper.arxiv == "1805.04770"
    with pytest.raises(TypeError, match="factory"):
        born_again(FACTORIES["mlp"](), train, val, epochs=1)
    for kwargs, match in [({"generations": 0}, "generations"), ({"loss": "ce"}, "loss"), ({"T": 0}, "T"),
                          ({"ce_weight": -1.0}, "ce_weight"), ({"hand_over": "first"}, "hand_over"),
                          ({"epochs": 0}, "epochs"), ({"resume": True}, "resume=True needs run_dir")]:
        with pytest.raises(ValueError, match=match):
            born_again(FACTORIES["mlp"], train, val, **{"epochs": 1, "progress": False, **kwargs})


def test_ensemble_accuracy_rejects_nothing_to_average() -> None:
    with pytest.raises(ValueError, match="at least one"):
        ensemble_accuracy([], [])


# ---------------------------------------------------------------------------- TAKD


def test_takd_chain_of_assistants_on_digits() -> None:
    train, val = digits()
    torch.manual_seed(0)
    teacher = distill.models.create("cnn_digits_teacher")
    distill.fit(distill.Distiller(teacher, None, {"ce": 1.0}), train, epochs=3, **FAST)
    teacher_acc = accuracy(teacher, val)
    state = {k: v.clone() for k, v in teacher.state_dict().items()}
    # the chain given as zoo specs, as a recipe would write it
    result = takd("mlp_digits_student", train, val, teacher=teacher,
                  assistants=[{"name": "cnn", "widths": [4, 8, 8], "num_classes": 10}], epochs=4, T=4.0,
                  kd_weight=0.9, **FAST)
    assistant, student = result.models
    assert type(student) is type(FACTORIES["mlp"]()) and type(assistant) is type(FACTORIES["cnn"]())
    assert len(result.stages) == 2 and result.history is result.stages[1].history
    # each stage is taught by the model before it: the teacher accuracy it logs is that model's
    assert result.stages[0].history[0]["val_teacher_acc"] == pytest.approx(teacher_acc)
    assert result.stages[1].history[0]["val_teacher_acc"] == pytest.approx(accuracy(assistant, val))
    # hand_over="best": the assistant handed on its best validation epoch's weights
    assert accuracy(assistant, val) == pytest.approx(result.stages[0].best_acc)
    assert {"train_kd", "train_ce"} <= set(result.history[0])
    for stage in result.stages:
        assert stage.history[-1]["train_loss"] < stage.history[0]["train_loss"]
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in state.items())


def test_takd_stage_loss_is_the_papers_mixture() -> None:
    """(1 - λ) CE + λ T² KL, checked on one batch through a stage's Distiller built like takd's."""
    from distill.methods.logits import KD, CrossEntropy

    torch.manual_seed(0)
    s_logits, t_logits = torch.randn(4, 10), torch.randn(4, 10)
    y = torch.tensor([1, 2, 3, 4])
    lam, T = 0.7, 2.0
    ce = -sum(math.log(softmax_rows(s_logits[b].tolist())[int(y[b])]) for b in range(4)) / 4
    kl = sum(p * math.log(p / q) for b in range(4) for p, q in zip(softmax_rows((t_logits[b] / T).tolist()),
                                                                    softmax_rows((s_logits[b] / T).tolist()))) / 4
    batch = Batch(torch.zeros(4, 1), y)
    value = (1 - lam) * CrossEntropy()({"logits": s_logits}, {}, batch) + lam * KD(T=T)(
        {"logits": s_logits}, {"logits": t_logits}, batch)
    assert float(value) == pytest.approx((1 - lam) * ce + lam * T * T * kl, rel=1e-5)


def test_takd_checks_arguments_before_training() -> None:
    train, val = digits(100)
    teacher = FACTORIES["cnn"]()
    for kwargs, match, error in [
        ({"teacher": None}, "teacher", TypeError), ({"assistants": "resnet20"}, "assistants", TypeError),
        ({"assistants": [3]}, r"assistants\[0\]", TypeError), ({"kd_weight": 1.5}, "kd_weight", ValueError),
        ({"T": -1.0}, "T must", ValueError), ({"hand_over": "all"}, "hand_over", ValueError),
        ({"assistants": ["resnet_huge"]}, "unknown zoo model 'resnet_huge'", ValueError),
    ]:
        with pytest.raises(error, match=match):
            takd(FACTORIES["mlp"], train, val, **{"teacher": teacher, "assistants": [], "epochs": 1,
                                                  "progress": False, **kwargs})


# ---------------------------------------------------------------------------- ResKD


def test_residual_student_sums_its_parts_and_keeps_the_frozen_ones_fixed() -> None:
    torch.manual_seed(0)
    base, res = FACTORIES["cnn"](), FACTORIES["mlp"]()
    combined = ResidualStudent([base, res], frozen=1)
    combined.train()
    assert not base.training and res.training
    x = torch.randn(5, 1, 8, 8)
    out = combined(x)
    base.eval()
    torch.testing.assert_close(out, base(x) + res(x))
    out.sum().backward()
    assert all(p.grad is None and not p.requires_grad for p in base.parameters())
    assert all(p.grad is not None for p in res.parameters())
    with pytest.raises(ValueError, match="part 1"):
        ResidualStudent([base, nn.Sequential(nn.Flatten(), nn.Linear(64, 3))])(x)
    with pytest.raises(ValueError, match="frozen"):
        ResidualStudent([base], frozen=2)


def test_reskd_res_student_learns_the_residual_on_digits() -> None:
    train, val = digits()
    torch.manual_seed(0)
    teacher = distill.models.create("cnn_digits_teacher")
    distill.fit(distill.Distiller(teacher, None, {"ce": 1.0}), train, epochs=3, **FAST)
    result = reskd(FACTORIES["cnn"], train, val, teacher=teacher, res_students=[FACTORIES["mlp"]], epochs=4, **FAST)
    assert len(result.stages) == 2 and len(result.models) == 2
    final = result.models[-1]
    base, res = final.parts
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    x = next(iter(val)).inputs
    with torch.no_grad():
        torch.testing.assert_close(final(x), base.eval()(x) + res.eval()(x))
        # stage 1's loss is the regression of the summed logits on the teacher's: the residual
        t = teacher.eval()(x)
        residual = 0.5 * ((base(x) + res(x) - t) ** 2).sum(1).mean()
        before = 0.5 * ((base(x) - t) ** 2).sum(1).mean()
    assert float(residual) < float(before)  # the res-student closes part of the gap
    stage1 = result.stages[1].history
    assert "train_residual" in stage1[0] and "train_kd" in result.stages[0].history[0]
    assert stage1[-1]["train_residual"] < stage1[0]["train_residual"]
    assert result.last_acc == pytest.approx(accuracy(final, val))
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in base_state.items())
    # sample-adaptive inference over the same parts: its accuracy and mean number of res-students
    assert isinstance(result, ResKDResult) and isinstance(result.adaptive, AdaptiveResidualStudent)
    assert list(result.adaptive.parts) == [base, res]
    n = correct = ran = 0
    for batch in val:
        logits, used = result.adaptive.predict(batch.inputs)
        n, correct, ran = n + len(used), correct + int((logits.argmax(1) == batch.targets).sum()), ran + int(used.sum())
    assert result.adaptive_acc == pytest.approx(100.0 * correct / n)
    assert result.avg_res_students == pytest.approx(ran / n) and result.part_usage == [pytest.approx(ran / n)]
    assert 0.0 < result.avg_res_students < 1.0  # some samples skip the res-student, some run it
    assert result.adaptive_acc == pytest.approx(accuracy(result.adaptive, val))  # what evaluate() sees
    # the threshold's ends: the student alone, every part
    alone = evaluate_adaptive(AdaptiveResidualStudent(final, 0.0), val)
    assert alone["avg_res_students"] == 0.0 and alone["acc"] == pytest.approx(accuracy(ResidualStudent([base]), val))
    every = evaluate_adaptive(AdaptiveResidualStudent(final, 0.0, "entropy"), val)
    assert every["avg_res_students"] == 1.0 and every["acc"] == pytest.approx(result.last_acc)


def test_reskd_stopping_rule_by_hand() -> None:
    # rows: p = (0.9, 0.1), (0.5, 0.5), (0.99, 0.01)
    z = torch.tensor([[math.log(9.0), 0.0], [0.0, 0.0], [math.log(99.0), 0.0]])
    assert reskd_confident(z, 0.9).tolist() == [True, False, True]
    assert reskd_confident(z, 0.95).tolist() == [False, False, True]
    assert reskd_confident(z, 0.0).tolist() == [True, True, True]  # tau = 0: the student alone
    # entropy normalised by log 2: H(0.9, 0.1) / log 2 = 0.46900, H(0.99, 0.01) / log 2 = 0.08079, H(0.5, 0.5) = 1
    h = [-(0.9 * math.log(0.9) + 0.1 * math.log(0.1)) / math.log(2), 1.0,
         -(0.99 * math.log(0.99) + 0.01 * math.log(0.01)) / math.log(2)]
    assert h[0] == pytest.approx(0.468996, abs=1e-6) and h[2] == pytest.approx(0.080793, abs=1e-6)
    assert reskd_confident(z, 0.5, "entropy").tolist() == [True, False, True]
    assert reskd_confident(z, 0.1, "entropy").tolist() == [False, False, True]
    assert reskd_confident(z, 1.0, "entropy").tolist() == [True, True, True]
    # a probability that underflows to 0 keeps the entropy finite (0 · log 0 = 0)
    assert reskd_confident(torch.tensor([[0.0, -1e4, -1e4]]), 0.01, "entropy").tolist() == [True]


def _linear(weight: list[list[float]], bias: list[float]) -> nn.Linear:
    m = nn.Linear(2, 2)
    with torch.no_grad():
        m.weight.copy_(torch.tensor(weight))
        m.bias.copy_(torch.tensor(bias))
    return m


def test_adaptive_inference_by_hand() -> None:
    # student z0 = (x0, 0), res-student 1 adds (x1, 0), res-student 2 adds (0.5, 0); with tau = 0.9 a
    # two-class sample stops once its logit gap reaches log 9 = 2.197
    parts = [_linear([[1, 0], [0, 0]], [0, 0]), _linear([[0, 1], [0, 0]], [0, 0]), _linear([[0, 0], [0, 0]], [0.5, 0])]
    seen: list[int] = []
    for part in parts[1:]:
        part.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[0]))
    model = AdaptiveResidualStudent(parts, threshold=0.9)
    x = torch.tensor([[3.0, 0.0],   # gap 3 after the student: stops, logits (3, 0)
                      [1.0, 2.0],   # gap 1, then 1 + 2 = 3: stops after res-student 1, logits (3, 0)
                      [0.0, 1.0]])  # gap 0, then 1: runs both, logits (0 + 1 + 0.5, 0)
    logits, used = model.predict(x)
    torch.testing.assert_close(logits, torch.tensor([[3.0, 0.0], [3.0, 0.0], [1.5, 0.0]]))
    assert used.tolist() == [0, 1, 2]
    assert seen == [2, 1]  # res-student 1 ran on the two samples still going, res-student 2 on one
    torch.testing.assert_close(model(x), logits)
    assert model.last_used.tolist() == [0, 1, 2]  # type: ignore[union-attr]
    torch.testing.assert_close(model.full(x), torch.tensor([[3.5, 0.0], [3.5, 0.0], [1.5, 0.0]]))
    # tau = 0 keeps every sample at the student; "entropy" at 0 runs every part
    assert AdaptiveResidualStudent(parts, threshold=0.0).predict(x)[1].tolist() == [0, 0, 0]
    torch.testing.assert_close(AdaptiveResidualStudent(parts, 0.0, "entropy")(x), model.full(x))


def test_adaptive_inference_equals_each_samples_own_partial_sum() -> None:
    torch.manual_seed(0)
    parts = [FACTORIES["cnn"](), FACTORIES["mlp"](), FACTORIES["cnn"]()]
    for part in parts:  # non-trivial BatchNorm statistics, then frozen by the wrapper
        part.train()
        with torch.no_grad():
            part(torch.randn(32, 1, 8, 8) * 2 + 0.5)
    x = torch.randn(40, 1, 8, 8)
    with torch.no_grad():
        top = torch.softmax(parts[0].eval()(x), 1).max(1).values
    tau = float(top.median())  # about half the samples stop at the student
    model = AdaptiveResidualStudent(ResidualStudent(parts), threshold=tau)
    logits, used = model.predict(x)
    with torch.no_grad():
        for i in range(len(x)):  # one sample at a time, with an explicit loop over the parts
            xi = x[i:i + 1]
            running, k = parts[0](xi), 0
            while k < 2 and float(torch.softmax(running, 1).max()) < tau:
                k += 1
                running = running + parts[k](xi)
            assert int(used[i]) == k
            torch.testing.assert_close(logits[i:i + 1], running, rtol=1e-5, atol=1e-6)
            if k == 0:  # stopped early: exactly the student's logits
                torch.testing.assert_close(logits[i:i + 1], parts[0](xi), rtol=1e-5, atol=1e-6)
    assert 0 < int((used == 0).sum()) < len(x) and int((used > 0).sum()) > 0
    assert not any(p.requires_grad for p in model.parameters())
    assert all(not m.training for m in model.modules())


def test_adaptive_inference_checks_arguments() -> None:
    parts = [FACTORIES["mlp"](), FACTORIES["mlp"]()]
    for kwargs, match in [({"threshold": 1.5}, "threshold"), ({"threshold": -0.1}, "threshold"),
                          ({"threshold": float("nan")}, "threshold"), ({"threshold": True}, "threshold"),
                          ({"criterion": "margin"}, "criterion")]:
        with pytest.raises(ValueError, match=match):
            AdaptiveResidualStudent(parts, **kwargs)
        with pytest.raises(ValueError, match=match):
            reskd_confident(torch.zeros(2, 3), **kwargs)
    with pytest.raises(ValueError, match="K >= 2"):
        reskd_confident(torch.zeros(4, 1))
    with pytest.raises(ValueError, match="K >= 2"):
        reskd_confident(torch.zeros(4))
    with pytest.raises(TypeError, match="tensor"):
        AdaptiveResidualStudent(parts)({"x": torch.zeros(2, 1, 8, 8)})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="part 1"):
        AdaptiveResidualStudent([parts[0], nn.Sequential(nn.Flatten(), nn.Linear(64, 3))], 1.0)(torch.zeros(2, 64))
    with pytest.raises(TypeError, match="AdaptiveResidualStudent"):
        evaluate_adaptive(ResidualStudent(parts), [])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no samples"):
        evaluate_adaptive(AdaptiveResidualStudent(parts), [])


class _NotIterated:
    """A loader that fails the test if anything iterates it (so an error came before training)."""

    def __iter__(self):  # type: ignore[no-untyped-def]
        raise AssertionError("the strategy started training before checking its arguments")


def test_reskd_checks_arguments_before_training() -> None:
    train, val = _NotIterated(), _NotIterated()
    teacher = FACTORIES["cnn"]()
    for kwargs, match, error in [
        ({"res_students": []}, "res_students", TypeError), ({"res_students": [3]}, r"res_students\[0\]", TypeError),
        ({"teacher": None}, "teacher", TypeError), ({"ce_weight": -1.0}, "ce_weight", ValueError),
        ({"kd_weight": 0.0}, "kd_weight", ValueError), ({"threshold": 2.0}, "threshold", ValueError),
        ({"criterion": "margin"}, "criterion", ValueError),
    ]:
        with pytest.raises(error, match=match):
            reskd(FACTORIES["cnn"], train, val, **{"teacher": teacher, "res_students": [FACTORIES["mlp"]],
                                                   "epochs": 1, "progress": False, **kwargs})


# ---------------------------------------------------------------------------- resuming a chain


def _chain_runs():
    """Each chain strategy as a call of (run_dir, resume, on_epoch_end), 2 epochs per stage."""
    from distill.strategies.hsakd import fit_hsakd

    train, val = digits(100)
    kw = {"epochs": 2, "optimizer": "sgd", "lr": 0.05, "progress": False}

    def teacher():
        torch.manual_seed(123)
        return distill.models.create("cnn", widths=(4, 8, 8), num_classes=10)

    return {
        "born_again": lambda **k: born_again(FACTORIES["mlp"], train, val, generations=2, hand_over="best", **kw, **k),
        "takd": lambda **k: takd(FACTORIES["mlp"], train, val, teacher=teacher(), assistants=[FACTORIES["mlp"]],
                                 hand_over="best", **kw, **k),
        "reskd": lambda **k: reskd(FACTORIES["mlp"], train, val, teacher=teacher(), res_students=[FACTORIES["mlp"]],
                                   **kw, **k),
        "pro_kd": lambda **k: pro_kd(FACTORIES["mlp"], train, val, teacher=teacher(), teacher_epochs=2, **kw, **k),
        "hsakd": lambda **k: fit_hsakd(FACTORIES["cnn"], train, val, teacher=teacher(), teacher_epochs=2, **kw, **k),
    }


@pytest.mark.parametrize("name", ["born_again", "takd", "reskd", "pro_kd", "hsakd"])
def test_a_chain_stopped_in_its_second_stage_resumes_to_the_same_models(name, tmp_path) -> None:
    """Stopped after the first epoch of the second stage, then resumed: the finished stage is restored
    from its checkpoint (its best epoch for hand_over="best"), the interrupted one continues, and the
    delivered models equal the uninterrupted run's."""
    call = _chain_runs()[name]
    torch.manual_seed(0)
    whole = call(run_dir=tmp_path / "whole")
    torch.manual_seed(0)
    with pytest.raises(Interrupted):  # after stage 1's two epochs and the first of stage 2
        call(run_dir=tmp_path / "cut", on_epoch_end=interrupt_after(3))
    torch.manual_seed(0)
    resumed = call(run_dir=tmp_path / "cut", resume=True)
    assert len(resumed.stages) == len(whole.stages)
    for a, b in zip(whole.stages, resumed.stages):
        assert [r["train_loss"] for r in a.history] == [r["train_loss"] for r in b.history]
    for m_whole, m_resumed in zip(whole.models, resumed.models):
        for a, b in zip(m_whole.state_dict().values(), m_resumed.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
