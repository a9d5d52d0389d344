"""The training loop: fit, resume, failure modes, schedules, the hint stage, evaluation and AMP."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import distill
import distill.train.loop as loop_mod
from distill import Distiller, evaluate, fit, fit_hint_stage
from distill.batch import Batch
from distill.data import InMemoryLoader, RandomCropPad, get_dataset
from distill.methods import AT, FitNet, Method, NoisyTeacher
from distill.models import create
from distill.train import LabelRangeError, NonFiniteLossError, load_checkpoint
from distill.train.schedules import Schedule, make_optimizer

K = 10
N_TRAIN, N_VAL = 128, 64


@pytest.fixture(scope="module")
def digits():
    tr = get_dataset("digits", split="train")
    va = get_dataset("digits", split="val")
    return (tr.inputs[:N_TRAIN].clone(), tr.targets[:N_TRAIN].clone(),
            va.inputs[:N_VAL].clone(), va.targets[:N_VAL].clone())


@pytest.fixture(autouse=True)
def _restore_determinism():
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


def _student(seed=0, widths=(4, 8), **kw):
    torch.manual_seed(seed)
    return create("cnn", widths=widths, num_classes=K, **kw)


def _teacher(seed=100, widths=(8, 16)):
    torch.manual_seed(seed)
    return create("cnn", widths=widths, num_classes=K)


def _loaders(digits, batch_size=32, augment=None, shuffle=True):
    xt, yt, xv, yv = digits
    train = InMemoryLoader(xt, yt, batch_size, shuffle=shuffle, augment=augment, seed=0)
    val = InMemoryLoader(xv, yv, 64, shuffle=False)
    return train, val


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


# ------------------------------------------------------------------------------------------- fit


def test_fit_improves_and_writes_run_dir(digits, tmp_path):
    train, val = _loaders(digits)
    d = Distiller(_student(), _teacher(), losses={"ce": 1.0, "kd": 0.5})
    res = fit(d, train, val, epochs=3, optimizer="adam", lr=0.01, schedule="constant",
              run_dir=tmp_path, progress=False)
    assert len(res.history) == 3
    assert res.history[0]["train_loss"] > res.history[-1]["train_loss"]
    rows = _lines(tmp_path / "metrics.jsonl")
    assert len(rows) == 3
    for e, row in enumerate(rows):
        assert row["epoch"] == e
        for key in ("val_student_acc", "val_teacher_acc", "val_agreement", "val_kl_to_teacher", "best_acc",
                    "train_loss", "train_ce", "train_kd", "lr"):
            assert key in row, key
            assert math.isfinite(row[key]), key
        assert 0.0 <= row["val_student_acc"] <= 100.0
        assert row["val_kl_to_teacher"] >= 0.0
        assert row["best_acc"] == max(r["val_student_acc"] for r in rows[: e + 1])
    # a frozen teacher's validation accuracy cannot change between epochs
    assert len({r["val_teacher_acc"] for r in rows}) == 1
    assert (tmp_path / "checkpoints" / "last.pt").is_file()
    assert (tmp_path / "checkpoints" / "best.pt").is_file()
    assert res.last_acc == rows[-1]["val_student_acc"]
    assert res.best_acc is not None and res.last_acc is not None and res.best_acc >= res.last_acc
    assert res.best_acc == max(r["val_student_acc"] for r in rows)
    assert rows[res.best_epoch]["val_student_acc"] == res.best_acc
    best = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert best["epoch"] == res.best_epoch and best["val_student_acc"] == res.best_acc
    last = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert last["epoch"] == 2
    for k, v in d.student.state_dict().items():
        assert torch.equal(last["distiller"]["student"][k], v), k


def test_fit_leaves_teacher_bit_identical(digits, tmp_path):
    train, val = _loaders(digits)
    teacher = _teacher(widths=(8, 16, 16))
    # non-trivial running statistics, so any update would show
    g = torch.Generator().manual_seed(5)
    for m in teacher.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.num_batches_tracked.fill_(7)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    d = Distiller(_student(widths=(4, 8, 8)), teacher, losses={
        "ce": 1.0, "kd": 1.0, "at": AT(pairs=(("stage1", "stage1"), ("stage2", "stage2"), ("stage3", "stage3"))),
    })
    fit(d, train, val, epochs=2, lr=0.05, schedule="constant", run_dir=tmp_path, progress=False)
    after = teacher.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert all(not m.training for m in teacher.modules())
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())


# ---------------------------------------------------------------------------------------- resume


def _resume_setup(digits):
    train, val = _loaders(digits, batch_size=64, augment=RandomCropPad(1))
    student = _student(dropout=0.3)
    nt = NoisyTeacher(variance=0.2, fraction=0.5, weight=0.1)
    return Distiller(student, _teacher(), losses={"ce": 1.0, "noisy_teacher": nt}), train, val


class _Interrupt(Exception):
    pass


def _stop_after(epoch):
    def hook(row):
        if row["epoch"] == epoch:
            raise _Interrupt

    return hook


@pytest.mark.parametrize("mode", ["interrupted", "extended"])
def test_resume_is_bit_exact(digits, tmp_path, mode):
    kw = dict(lr=0.05, deterministic=True, device="cpu", progress=False, seed=3)
    if mode == "interrupted":  # a crash after epoch 1 of a 4-epoch run; the schedule has milestones
        kw.update(schedule="multistep", milestones=[2, 3], gamma=0.5)
    else:  # a 2-epoch run extended to 4 epochs (the schedule must not depend on epochs)
        kw.update(schedule="constant")

    d_a, train, val = _resume_setup(digits)
    res_a = fit(d_a, train, val, epochs=4, run_dir=tmp_path / "a", **kw)

    run_b = tmp_path / "b"
    d_b1, train, val = _resume_setup(digits)
    if mode == "interrupted":
        with pytest.raises(_Interrupt):
            fit(d_b1, train, val, epochs=4, run_dir=run_b, on_epoch_end=_stop_after(1), **kw)
    else:
        fit(d_b1, train, val, epochs=2, run_dir=run_b, **kw)
    assert load_checkpoint(run_b / "checkpoints" / "last.pt")["epoch"] == 1
    assert len(_lines(run_b / "metrics.jsonl")) == 2

    d_b2, train, val = _resume_setup(digits)  # fresh objects, same init
    res_b = fit(d_b2, train, val, epochs=4, run_dir=run_b, resume=True, **kw)

    sa, sb = d_a.student.state_dict(), d_b2.student.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    rows_b = _lines(run_b / "metrics.jsonl")
    assert [r["epoch"] for r in rows_b] == [0, 1, 2, 3]
    rows_a = _lines(tmp_path / "a" / "metrics.jsonl")
    for ra, rb in zip(rows_a, rows_b):
        for key in ("train_loss", "lr", "val_student_acc", "val_kl_to_teacher", "best_acc"):
            assert ra[key] == rb[key], (ra["epoch"], key)
    assert res_b.best_acc == res_a.best_acc and res_b.last_acc == res_a.last_acc
    assert len(res_b.history) == 4


def _same(a, b):
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_resume_restores_a_changing_teacher(digits, tmp_path):
    """An EMA teacher (TeacherSource.static False) is saved in last.pt and restored on resume, so a
    resumed run's teacher is the uninterrupted run's, not a fresh copy of the initial student."""
    from distill.strategies.mean_teacher import EMATeacher

    kw = {"lr": 0.05, "deterministic": True, "device": "cpu", "progress": False, "seed": 3, "schedule": "constant"}

    def setup():
        student = _student()
        d = Distiller(student, EMATeacher(student, decay=0.9, buffers="copy", noise=False),
                      losses={"ce": 1.0, "kd": 1.0})
        return (d, *_loaders(digits))

    d_a, train, val = setup()
    fit(d_a, train, val, epochs=3, run_dir=tmp_path / "a", **kw)
    d_b, train, val = setup()
    fit(d_b, train, val, epochs=2, run_dir=tmp_path / "b", **kw)
    state = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")
    for k, v in d_b.teacher.state_dict().items():
        assert _same(state["teacher"][k], v), k
    d_c, train, val = setup()  # fresh objects: the teacher can only come from the checkpoint
    fit(d_c, train, val, epochs=3, run_dir=tmp_path / "b", resume=True, **kw)
    ta, tc = d_a.teacher.state_dict(), d_c.teacher.state_dict()
    assert set(ta) == set(tc)
    for k in ta:
        assert _same(ta[k], tc[k]), k
    # a frozen teacher is not copied into every checkpoint
    d, train, val = Distiller(_student(), _teacher()), *_loaders(digits)
    fit(d, train, epochs=1, run_dir=tmp_path / "frozen", **kw)
    assert load_checkpoint(tmp_path / "frozen" / "checkpoints" / "last.pt")["teacher"] is None


def test_epoch_log_tracks_best_and_writes_like_fit(tmp_path):
    from distill.train.loop import EpochLog, FitProgress, FitResult, _Progress

    assert _Progress is FitProgress
    result = FitResult(history=[{"epoch": 0, "val_student_acc": 50.0, "best_acc": 50.0}], best_acc=50.0,
                       best_epoch=0)
    log = EpochLog(result, tmp_path)
    log.begin()
    assert _lines(tmp_path / "metrics.jsonl") == result.history
    calls = []

    def state():
        calls.append(1)
        return {"student": {"w": torch.ones(1)}}

    assert log.end_epoch({"epoch": 1, "val_student_acc": 40.0}, state) is False
    assert log.end_epoch({"epoch": 2, "val_student_acc": 60.0}, state) is True
    assert log.end_epoch({"epoch": 3, "val_student_acc": 60.0}, state) is False  # a tie keeps the earlier
    assert log.end_epoch({"epoch": 4, "train_loss": 1.0}, state) is False  # no evaluation: no tracking
    assert len(calls) == 1
    best = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert best["epoch"] == 2 and best["val_student_acc"] == 60.0 and torch.equal(best["student"]["w"], torch.ones(1))
    assert (result.best_acc, result.best_epoch, result.last_acc) == (60.0, 2, 60.0)
    rows = _lines(tmp_path / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3, 4]
    assert [r.get("best_acc") for r in rows] == [50.0, 50.0, 60.0, 60.0, None]
    # write=False (ranks other than 0) tracks the same and writes nothing
    quiet = EpochLog(FitResult(), tmp_path / "quiet", write=False)
    quiet.begin()
    quiet.end_epoch({"epoch": 0, "val_student_acc": 10.0}, state)
    assert quiet.result.best_acc == 10.0 and not (tmp_path / "quiet").exists() and len(calls) == 1


def test_resume_errors(digits, tmp_path):
    train, val = _loaders(digits)
    d = Distiller(_student(), None, losses={"ce": 1.0})
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        fit(d, train, epochs=1, schedule="constant", resume=tmp_path / "nope.pt", progress=False)
    with pytest.raises(ValueError, match="run_dir"):
        fit(d, train, epochs=1, schedule="constant", resume=True, progress=False)


# ------------------------------------------------------------------------------------------- NaN


class NaNAtEpoch1(Method):
    """Zero loss at epoch 0, NaN from epoch 1 on (not registered: passed as an instance)."""

    needs_teacher = False

    def forward(self, student_view, teacher_view, batch):
        z = student_view["logits"]
        if self.epoch == 1:
            return z.sum() * float("nan")
        return z.sum() * 0.0


def test_nan_loss_stops_with_last_good_checkpoint(digits, tmp_path):
    train, val = _loaders(digits)
    d = Distiller(_student(), None, losses={"ce": 1.0, "boom": NaNAtEpoch1()})
    with pytest.raises(NonFiniteLossError) as ei:
        fit(d, train, val, epochs=3, schedule="constant", run_dir=tmp_path, progress=False)
    msg = str(ei.value)
    assert "boom" in msg
    assert "epoch 1" in msg
    assert "ce=" not in msg  # only the bad loss is named
    assert str(tmp_path / "checkpoints" / "last.pt") in msg
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["epoch"] == 0
    assert len(_lines(tmp_path / "metrics.jsonl")) == 1
    # the bad step was not applied: the parameters are those of the checkpoint
    saved = ckpt["distiller"]["student"]
    for k, p in d.student.named_parameters():
        assert torch.equal(p.detach(), saved[k]), k


def test_nan_loss_without_run_dir_says_no_checkpoint(digits):
    train, _ = _loaders(digits)
    d = Distiller(_student(), None, losses={"ce": 1.0, "boom": NaNAtEpoch1()})
    with pytest.raises(NonFiniteLossError, match="No checkpoint"):
        fit(d, train, epochs=2, schedule="constant", progress=False)


# ---------------------------------------------------------------------------------------- labels


def test_label_out_of_range_in_loader_targets(digits, tmp_path):
    xt, yt, xv, yv = digits
    yt = yt.clone()
    yt[100] = 10  # not in the first batch: found through loader.targets
    train = InMemoryLoader(xt, yt, 32, shuffle=False)
    d = Distiller(_student(), _teacher(), losses={"ce": 1.0, "kd": 1.0})
    before = _params(d.student)
    with pytest.raises(LabelRangeError) as ei:
        fit(d, train, epochs=2, schedule="constant", run_dir=tmp_path, progress=False)
    msg = str(ei.value)
    assert "10" in msg and "[0, 9]" in msg
    assert isinstance(ei.value, ValueError)
    assert not (tmp_path / "metrics.jsonl").exists() or not _lines(tmp_path / "metrics.jsonl")
    assert not (tmp_path / "checkpoints" / "last.pt").exists()
    for k, v in before.items():
        assert torch.equal(dict(d.student.named_parameters())[k], v), k


def test_label_out_of_range_in_val_loader(digits):
    xt, yt, xv, yv = digits
    yv = yv.clone()
    yv[3] = -2
    d = Distiller(_student(), None, losses={"ce": 1.0})
    with pytest.raises(LabelRangeError, match="-2"):
        fit(d, InMemoryLoader(xt, yt, 32), InMemoryLoader(xv, yv, 32, shuffle=False), epochs=1,
            schedule="constant", progress=False)


def test_minus_one_marks_unlabeled_and_is_not_an_error(digits):
    """-1 is the unlabeled marker of semi-supervised loaders: the label checks skip it."""
    xt, yt, xv, yv = digits
    yt, yv = yt.clone(), yv.clone()
    yt[100], yv[3] = -1, -1
    loop_mod._check_labels(yt, K, "the training set")  # no error
    loop_mod._check_labels(torch.full((4,), -1), K, "an unlabeled batch")
    with pytest.raises(LabelRangeError, match=r"\[10\].*-1 for an unlabeled"):
        loop_mod._check_labels(torch.tensor([-1, 0, 10]), K, "a batch")
    # the validation set may hold unlabeled samples (they count as misses, never as errors)
    d = Distiller(_student(), None, losses={"ce": 1.0})
    res = fit(d, InMemoryLoader(xt[:64], yt[:64], 32), InMemoryLoader(xv, yv, 32, shuffle=False), epochs=1,
              schedule="constant", progress=False)
    assert res.last_acc is not None


@pytest.mark.parametrize("kind", ["dataloader", "list"])
def test_label_out_of_range_plain_loader_first_batch(digits, kind):
    xt, yt, _, _ = digits
    x, y = xt[:64], yt[:64].clone()
    y[5] = 10
    if kind == "dataloader":
        loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)
        assert not hasattr(loader, "targets")
    else:
        loader = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    d = Distiller(_student(), None, losses={"ce": 1.0})
    before = _params(d.student)
    with pytest.raises(LabelRangeError) as ei:
        fit(d, loader, epochs=1, schedule="constant", progress=False)
    msg = str(ei.value)
    assert "10" in msg and "[0, 9]" in msg and "batch 0" in msg
    for k, p in d.student.named_parameters():
        assert torch.equal(p.detach(), before[k]), k


# ------------------------------------------------------------------------------------ arguments


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"epochs": 0}, "0"),
        ({"epochs": -2}, "-2"),
        ({"epochs": 2.5}, "2.5"),
        ({"epochs": 2, "optimizer": "sgdx"}, "sgdx"),
        ({"epochs": 2, "schedule": "linear_warmup"}, "linear_warmup"),
        ({"epochs": 3, "milestones": [1, 7]}, "7"),
        ({"epochs": 3, "milestones": [0]}, "0"),
        ({"epochs": 2, "lr": 0.0}, "lr"),
        ({"epochs": 2, "amp": "fp8"}, "fp8"),
        ({"epochs": 2, "grad_clip": -1.0}, "-1"),
    ],
)
def test_bad_arguments(digits, tmp_path, kwargs, needle):
    train, _ = _loaders(digits)
    d = Distiller(_student(), None, losses={"ce": 1.0})
    before = _params(d.student)
    with pytest.raises(ValueError) as ei:
        fit(d, train, run_dir=tmp_path, progress=False, **kwargs)
    assert needle in str(ei.value)
    assert not (tmp_path / "metrics.jsonl").exists()
    for k, p in d.student.named_parameters():
        assert torch.equal(p.detach(), before[k]), k


def test_checkpoint_every_zero_is_rejected(digits, tmp_path):
    train, _ = _loaders(digits)
    d = Distiller(_student(), None, losses={"ce": 1.0})
    with pytest.raises(ValueError, match="checkpoint_every"):
        fit(d, train, epochs=1, schedule="constant", run_dir=tmp_path, checkpoint_every=0, progress=False)


# ------------------------------------------------------------------------------------ schedules


class _LrProbe:
    """Wraps a loader; records the optimizer's lr at each batch (the lr that batch's step uses)."""

    def __init__(self, loader):
        self.loader = loader
        self.targets = loader.targets
        self.opt = None
        self.epoch = 0
        self.lrs: list[tuple[int, float]] = []

    def __len__(self):
        return len(self.loader)

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.loader.set_epoch(epoch)

    def __iter__(self):
        for b in self.loader:
            if self.opt is not None:
                self.lrs.append((self.epoch, self.opt.param_groups[0]["lr"]))
            yield b


def _fit_probe(digits, monkeypatch, **kw):
    train, _ = _loaders(digits)
    probe = _LrProbe(train)
    real = loop_mod.make_optimizer

    def capture(*a, **k):
        probe.opt = real(*a, **k)
        return probe.opt

    monkeypatch.setattr(loop_mod, "make_optimizer", capture)
    d = Distiller(_student(), None, losses={"ce": 1.0})
    res = fit(d, probe, progress=False, **kw)
    return probe, res


def test_multistep_lr_after_milestones(digits, monkeypatch):
    lr, gamma = 0.1, 0.5
    probe, res = _fit_probe(digits, monkeypatch, epochs=4, lr=lr, schedule="multistep", milestones=[1, 3],
                            gamma=gamma)
    assert len(probe.lrs) == 4 * 4
    for epoch, used in probe.lrs:
        k = sum(1 for m in (1, 3) if m <= epoch)
        assert used == pytest.approx(lr * gamma**k), (epoch, used)


@pytest.mark.parametrize("schedule", ["cosine", "onecycle"])
def test_per_step_schedules_run(digits, monkeypatch, schedule):
    lr = 0.05
    probe, res = _fit_probe(digits, monkeypatch, epochs=2, lr=lr, schedule=schedule)
    used = [u for _, u in probe.lrs]
    assert len(used) == 2 * 4
    assert all(math.isfinite(u) and 0 <= u <= lr * (1 + 1e-6) for u in used)
    assert len(set(used)) == len(used)  # changes every step
    if schedule == "cosine":
        assert used[0] == pytest.approx(lr)
        assert all(a > b for a, b in zip(used, used[1:]))
    else:
        assert used[0] < lr / 5 and max(used) > used[0] and used[-1] < max(used)
    assert all(math.isfinite(r["train_loss"]) for r in res.history)


def test_default_multistep_schedule_allows_one_epoch():
    opt = make_optimizer([nn.Parameter(torch.zeros(1))], lr=1.0)
    Schedule(opt, "multistep", epochs=1, steps_per_epoch=3)


def test_default_multistep_schedule_two_epochs_decays_once():
    opt = make_optimizer([nn.Parameter(torch.zeros(1))], lr=1.0)
    s = Schedule(opt, "multistep", epochs=2, steps_per_epoch=1, gamma=0.1)
    opt.step()
    s.step_epoch()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)


# ------------------------------------------------------------------------------------ hint stage


def test_fit_hint_stage_trains_only_up_to_guided_layer(digits):
    train, _ = _loaders(digits)
    student = _student(widths=(4, 8, 8))
    teacher = _teacher(widths=(8, 16, 16))
    d = Distiller(student, teacher, losses={
        "ce": 1.0, "kd": 1.0, "fitnet": FitNet("stage2", "stage2"),
        "at": AT(pairs=(("stage1", "stage1"), ("stage3", "stage3"))),
    })
    x0, y0 = digits[0][:8], digits[1][:8]
    d.prepare((x0, y0))
    reg = d.methods["fitnet"].regressor
    before = _params(student)
    reg_before = {k: v.detach().clone() for k, v in reg.named_parameters()}

    res = fit_hint_stage(d, train, epochs=1, lr=0.05, schedule="constant", progress=False)
    assert len(res.history) == 1 and "train_fitnet" in res.history[0]
    assert "train_kd" not in res.history[0]

    after = dict(student.named_parameters())
    below = [k for k in before if k.startswith(("stem.", "stage1.", "stage2."))]
    above = [k for k in before if k.startswith(("stage3.", "fc."))]
    assert below and above
    for k in below:
        assert not torch.equal(after[k].detach(), before[k]), f"{k} did not move in the hint stage"
    for k in above:
        assert torch.equal(after[k].detach(), before[k]), f"{k} moved in the hint stage"
    assert d.methods["fitnet"].regressor is reg
    for k, p in reg.named_parameters():
        assert not torch.equal(p.detach(), reg_before[k]), k

    # the original distiller's teacher taps are back, and stage 2 works
    view = d.teacher(Batch(x0))
    assert {"stage1", "stage2", "stage3"} <= set(view)
    out = d((x0, y0))
    assert set(out.parts) == {"ce", "kd", "fitnet", "at"}
    res2 = fit(d, train, epochs=1, lr=0.05, schedule="constant", progress=False)
    assert {"train_ce", "train_kd", "train_fitnet", "train_at"} <= set(res2.history[0])
    assert not torch.equal(dict(student.named_parameters())["fc.weight"].detach(), before["fc.weight"])


def test_fit_hint_stage_prepares_unprepared_distiller(digits):
    train, _ = _loaders(digits)
    d = Distiller(_student(widths=(4, 8, 8)), _teacher(widths=(8, 16, 16)),
                  losses={"kd": 1.0, "fitnet": FitNet("stage2", "stage2")})
    assert not d.prepared
    fit_hint_stage(d, train, epochs=1, schedule="constant", progress=False)
    assert d.prepared and d.methods["fitnet"].regressor is not None
    assert "stage2" in d.teacher(Batch(digits[0][:4]))
    with pytest.raises(KeyError, match="fitnet"):
        fit_hint_stage(Distiller(_student(), _teacher(), losses={"kd": 1.0}), train, epochs=1, progress=False)


# ------------------------------------------------------------------------------------- evaluate


class _Fixed(nn.Module):
    """Logits are a fixed linear map of the inputs (the inputs themselves when ``mat`` is None)."""

    def __init__(self, mat=None):
        super().__init__()
        self.mat = mat
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return x if self.mat is None else x @ self.mat


def test_evaluate_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    kk = 5
    x = torch.randn(12, kk, generator=g) * 2
    y = torch.randint(0, kk, (12,), generator=g)
    mat = torch.randn(kk, kk, generator=g) + torch.eye(kk) * 1.5
    student, teacher = _Fixed(), _Fixed(mat)
    d = Distiller(student, teacher, losses={"kd": 1.0})
    loader = [(x[:7], y[:7]), (x[7:], y[7:])]  # two uneven batches

    s, t = x, x @ mat
    s_pred, t_pred = s.argmax(1), t.argmax(1)
    want_s = 100.0 * (s_pred == y).float().mean().item()
    want_t = 100.0 * (t_pred == y).float().mean().item()
    want_agree = 100.0 * (s_pred == t_pred).float().mean().item()
    p_t, p_s = F.softmax(t, 1), F.softmax(s, 1)
    want_kl = (p_t * (p_t.log() - p_s.log())).sum(1).mean().item()
    # the data is not trivial: accuracies and agreement are strictly between 0 and 100
    assert 0 < want_agree < 100 and 0 < want_t < 100

    student.train()
    cache: list[torch.Tensor] = []
    got = evaluate(d, loader, teacher_cache=cache)
    assert student.training  # mode restored
    assert set(got) == {"student_acc", "teacher_acc", "agreement", "kl_to_teacher"}
    assert got["student_acc"] == pytest.approx(want_s)
    assert got["teacher_acc"] == pytest.approx(want_t)
    assert got["agreement"] == pytest.approx(want_agree)
    assert got["kl_to_teacher"] == pytest.approx(want_kl, rel=1e-5)
    assert len(cache) == 2
    assert evaluate(d, loader, teacher_cache=cache) == pytest.approx(got)  # from the cache
    assert evaluate(d, loader, with_teacher=False) == {"student_acc": pytest.approx(want_s)}
    with pytest.raises(ValueError):
        evaluate(d, [])


# ------------------------------------------------------------------------------------------ AMP


def _cpu_bf16_ok() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = nn.Conv2d(1, 2, 3)(torch.randn(1, 1, 5, 5))
        return out.dtype == torch.bfloat16
    except Exception:
        return False


@pytest.mark.skipif(not _cpu_bf16_ok(), reason="bf16 autocast unsupported on this CPU build")
def test_fit_bf16_autocast_cpu(digits, tmp_path):
    train, val = _loaders(digits)
    d = Distiller(_student(widths=(4, 8, 8)), _teacher(widths=(8, 16, 16)), losses={
        "ce": 1.0, "kd": 1.0, "fitnet": FitNet("stage2", "stage2"),
    })
    res = fit(d, train, val, epochs=1, amp="bf16", schedule="constant", run_dir=tmp_path, progress=False)
    assert len(res.history) == 1
    row = res.history[0]
    assert math.isfinite(row["train_loss"]) and math.isfinite(row["val_kl_to_teacher"])
    assert all(p.dtype == torch.float32 for p in d.student.parameters())
    assert len(_lines(tmp_path / "metrics.jsonl")) == 1


def test_hint_stage_of_an_initialisation_only_method_and_weight_zero_skips_the_loss() -> None:
    """A method with weight 0 is not computed in stage 2; its hint stage still trains (weight 1)."""
    from distill.methods import FitNet

    torch.manual_seed(0)
    teacher, student = distill.models.create("cnn", widths=(8, 16, 16)), distill.models.create("cnn", widths=(4, 8, 8))
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    hint = FitNet(weight=0.0)
    d = distill.Distiller(student, teacher, losses={"ce": 1.0, "fitnet": hint})
    d.prepare((x, y))
    regressor = [p.detach().clone() for p in hint.parameters()]
    distill.fit_hint_stage(d, [(x, y)], method="fitnet", epochs=2, progress=False, schedule="constant")
    assert hint.weight == 0.0  # restored after the stage
    assert any(not torch.equal(a, b) for a, b in zip(regressor, hint.parameters()))
    out = d((x, y))
    assert set(out.parts) == {"ce"}  # the switched-off loss was not computed
