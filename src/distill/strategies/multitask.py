"""Multi-task distillation: one student with a shared trunk and a head per task, taught by one
teacher (or an ensemble) per task.

* :class:`Task`: a named task, its training and validation loaders, its teacher.
* :class:`MultiTaskNet`: a shared trunk and one head per task, ``net(inputs, task)``.
* :func:`fit_multilingual_kd` (Tan et al. 2019): selective distillation, KD on a task only while
  the student's validation score trails its teacher's plus a threshold.
* :func:`fit_bam` (Clark et al. 2019): single-task teachers, teacher annealing (target
  ``λ·gold + (1−λ)·teacher``, λ from 0 to 1), tasks drawn with probability ``∝ n^0.75``.
* :func:`fit_mtdnn_kd` (Liu et al. 2019): an ensemble per task, averaged soft targets, loss the
  average of the gold and the soft objectives.

:func:`distill.fit` trains one loader and one head; task mixing, per-task teachers, per-task
validation checks during training and per-step λ need their own loop: :func:`fit_multitask`, one
small loop from the library's pieces (:func:`~distill.train.schedules.make_optimizer`, the teacher
sources of :mod:`distill.teachers`, :func:`~distill.train.loop.seed_everything`,
:class:`~distill.train.loop.FitProgress`, :func:`~distill.train.checkpoint.save_checkpoint`). It
writes ``metrics.jsonl`` (one line per epoch) and ``checkpoints/last.pt`` in ``run_dir`` and resumes
from it (``resume=True``). The math is in :mod:`distill.functional.multitask`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from distill.batch import as_batch
from distill.files import atomic_write_text
from distill.functional import multitask as MF
from distill.methods.base import Paper
from distill.strategies.registry import register_strategy
from distill.teachers import TeacherSource, as_teacher_source
from distill.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from distill.train.loop import FitProgress, FitResult, seed_everything
from distill.train.schedules import make_optimizer

__all__ = [
    "BAM_PAPER",
    "MTDNN_KD_PAPER",
    "MULTILINGUAL_KD_PAPER",
    "MultiTaskNet",
    "MultiTaskResult",
    "Task",
    "evaluate_task",
    "fit_bam",
    "fit_mtdnn_kd",
    "fit_multilingual_kd",
    "fit_multitask",
]

MULTILINGUAL_KD_PAPER = Paper("Multilingual Neural Machine Translation with Knowledge Distillation",
                              "X. Tan, Y. Ren, D. He, T. Qin, Z. Zhao, T.-Y. Liu", 2019, "1902.10461", "ICLR")
BAM_PAPER = Paper("BAM! Born-Again Multi-Task Networks for Natural Language Understanding",
                  "K. Clark, M.-T. Luong, U. Khandelwal, C. D. Manning, Q. V. Le", 2019, "1907.04829", "ACL")
MTDNN_KD_PAPER = Paper("Improving Multi-Task Deep Neural Networks via Knowledge Distillation for Natural Language "
                       "Understanding", "X. Liu, P. He, W. Chen, J. Gao", 2019, "1904.09482", "arXiv")


# --------------------------------------------------------------------------------------------
# Tasks and the multi-task student
# --------------------------------------------------------------------------------------------


@dataclass
class Task:
    """One task of a multi-task run.

    Attributes:
        name: the task's name (also the key of its head in :class:`MultiTaskNet`).
        train_loader: yields labelled batches (tuples, mappings or :class:`~distill.batch.Batch`) of
            inputs the student's trunk takes and class labels ``(B,)``; ``set_epoch(e)`` is called
            when it has one. It must be re-iterable (each pass is one epoch of the task).
        val_loader: labelled validation batches (needed by :func:`fit_multilingual_kd`'s check).
        teacher: the task's teacher, a model giving ``(B, K)`` logits, a list of models (an
            :class:`~distill.teachers.EnsembleTeacher` averaging their probabilities), a
            :class:`~distill.teachers.TeacherSource`, or None (the task trains on gold labels only).
    """

    name: str
    train_loader: Iterable[Any]
    val_loader: Iterable[Any] | None = None
    teacher: Any = None


class MultiTaskNet(nn.Module):
    """A shared trunk and one head per task: ``forward(inputs, task) = heads[task](trunk(inputs))``.

    Args:
        trunk: maps inputs ``(B, ...)`` to features ``(B, D)``.
        heads: task name → head mapping ``(B, D)`` features to ``(B, K_task)`` logits.
    """

    def __init__(self, trunk: nn.Module, heads: Mapping[str, nn.Module]) -> None:
        super().__init__()
        if not heads:
            raise ValueError("a MultiTaskNet needs at least one head")
        bad = [k for k in heads if not isinstance(k, str) or not k or "." in k]
        if bad:
            raise ValueError(f"head names must be non-empty strings without '.', got {bad}")
        self.trunk = trunk
        self.heads = nn.ModuleDict(dict(heads))

    def forward(self, inputs: Tensor, task: str) -> Tensor:
        if task not in self.heads:
            raise KeyError(f"no head for task {task!r}; heads: {sorted(self.heads)}")
        return self.heads[task](self.trunk(inputs))


@dataclass
class MultiTaskResult(FitResult):
    """:class:`~distill.train.loop.FitResult` of a multi-task run.

    ``best_acc`` / ``last_acc``: the mean over tasks of the validation accuracy (%), best epoch and
    last epoch. ``task_best_acc`` / ``task_last_acc``: task → its own best / last accuracy.
    ``teacher_acc``: task → its teacher's validation accuracy (tasks with a teacher and a validation
    loader). ``kd_flags``: for selective distillation, task → whether KD was on at the end.
    ``model``: the trained student.
    """

    task_best_acc: dict[str, float] = field(default_factory=dict)
    task_last_acc: dict[str, float] = field(default_factory=dict)
    teacher_acc: dict[str, float] = field(default_factory=dict)
    kd_flags: dict[str, bool] = field(default_factory=dict)
    model: nn.Module | None = None


# --------------------------------------------------------------------------------------------
# Checks and helpers
# --------------------------------------------------------------------------------------------


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_tasks(tasks: Sequence[Task], who: str) -> list[Task]:
    if isinstance(tasks, Task) or not isinstance(tasks, Sequence) or not tasks:
        raise TypeError(f"{who}: tasks must be a non-empty list of Task, got {tasks!r}")
    bad = [type(t).__name__ for t in tasks if not isinstance(t, Task)]
    if bad:
        raise TypeError(f"{who}: every task must be a distill.strategies.multitask.Task, got {bad}")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{who}: task names must be distinct non-empty strings, got {names}")
    return list(tasks)


def _check_student(student: Any, tasks: Sequence[Task], who: str) -> nn.Module:
    model = student if isinstance(student, nn.Module) else student() if callable(student) else None
    if not isinstance(model, nn.Module):
        raise TypeError(f"{who}: student must be an nn.Module (e.g. a MultiTaskNet) or a zero-argument factory "
                        f"returning one, got {student!r}")
    if isinstance(model, MultiTaskNet):
        missing = [t.name for t in tasks if t.name not in model.heads]
        if missing:
            raise ValueError(f"{who}: the student has no head for task(s) {missing}; heads: {sorted(model.heads)}")
    return model


def _count(loader: Iterable[Any], name: str) -> tuple[int, int]:
    """Batches and samples of one pass over ``loader`` (its length when it has one)."""
    batches = samples = 0
    for raw in loader:
        b = as_batch(raw)
        if b.targets is None:
            raise ValueError(f"task {name!r}: the training loader yields unlabelled batches; labels are needed")
        batches += 1
        samples += int(b.targets.shape[0])
    if batches == 0:
        raise ValueError(f"task {name!r}: the training loader yielded no batch")
    return batches, samples


def _set_epoch(loader: Any, epoch: int) -> None:
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)


@torch.no_grad()
def evaluate_task(model: Callable[[Tensor], Tensor], loader: Iterable[Any], device: torch.device | str = "cpu") -> float:
    """Top-1 accuracy (%) of ``model(inputs) -> (B, K)`` logits over a labelled loader."""
    correct = n = 0
    for raw in loader:
        b = as_batch(raw).to(device)
        if b.targets is None:
            raise ValueError("the validation loader yields unlabelled batches; labels are needed")
        correct += int((model(b.inputs).argmax(-1) == b.targets).sum())
        n += int(b.targets.shape[0])
    if n == 0:
        raise ValueError("the validation loader yielded no batch")
    return 100.0 * correct / n


def _teacher_view_logits(source: TeacherSource, raw: Any, device: torch.device) -> Tensor:
    return source(as_batch(raw).to(device))["logits"]


def _student_acc(model: nn.Module, task: Task, device: torch.device) -> float:
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        return evaluate_task(lambda x: model(x, task.name), task.val_loader, device)
    finally:
        for m, mode in modes.items():
            m.training = mode


class _Schedule:
    """The order of tasks in one epoch: ``None`` exponent: every batch of every task once, shuffled
    (sampling ∝ size without replacement); a float α: ``steps`` draws with ``p ∝ n_τ^α``."""

    def __init__(self, names: list[str], batches: dict[str, int], samples: dict[str, int],
                 exponent: float | None) -> None:
        self.names, self.batches, self.exponent = names, batches, exponent
        self.steps = sum(batches.values())
        self.probs = None if exponent is None else MF.task_sampling_probs({n: samples[n] for n in names}, exponent)

    def order(self, seed: int, epoch: int) -> list[str]:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        if self.probs is None:
            pool = [n for n in self.names for _ in range(self.batches[n])]
            return [pool[i] for i in torch.randperm(len(pool), generator=g).tolist()]
        draws = torch.multinomial(self.probs, self.steps, replacement=True, generator=g)
        return [self.names[i] for i in draws.tolist()]


class _Cycler:
    """An endless stream of a loader's batches; each new pass calls ``set_epoch`` with a fresh index."""

    def __init__(self, loader: Iterable[Any], epoch: int) -> None:
        self.loader, self.passes, self.epoch = loader, 0, epoch
        self._it: Iterator[Any] | None = None

    def next(self) -> Any:
        while True:
            if self._it is None:
                _set_epoch(self.loader, self.epoch * 1000 + self.passes)
                self.passes += 1
                self._it = iter(self.loader)
            try:
                return next(self._it)
            except StopIteration:
                self._it = None


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------

# (task, student logits, teacher logits or None, targets, state) -> loss; state holds
# "step", "total_steps", "flags"
LossFn = Callable[[str, Tensor, "Tensor | None", Tensor, dict[str, Any]], Tensor]


def fit_multitask(
    student: Any,
    tasks: Sequence[Task],
    loss_fn: LossFn,
    *,
    epochs: int,
    sampling_exponent: float | None = None,
    selective: Mapping[str, float] | None = None,
    optimizer: str = "adam",
    lr: float = 1e-3,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    grad_clip: float | None = None,
    device: str | torch.device | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    seed: int = 0,
    progress: bool = True,
    who: str = "fit_multitask",
) -> MultiTaskResult:
    """Train a multi-task student: each step draws a task, runs the student's head for it and the
    task's teacher on the same batch, and steps the optimizer on ``loss_fn``.

    Args:
        student: a :class:`MultiTaskNet` (or any module called as ``student(inputs, task_name)``),
            or a zero-argument factory returning one (called after seeding).
        tasks: the tasks (:class:`Task`).
        loss_fn: ``(task, student_logits (B, K), teacher_logits (B, K) or None, targets (B,), state)``
            → scalar loss; ``state`` holds ``step`` (0-based global step), ``total_steps`` and
            ``flags`` (task → KD on, for selective distillation).
        epochs: passes; an epoch has as many steps as all tasks have training batches together.
        sampling_exponent: None: each epoch runs every batch of every task once, in a shuffled order;
            α: each step draws its task with probability ``∝ n_τ^α`` (``n_τ`` the task's samples).
        selective: ``{"threshold": τ, "check_every": steps or 0}`` turns on Tan et al.'s check: the
            flags start on, and every ``check_every`` steps (0: at each epoch's end) a task's flag is
            ``student_val_acc < teacher_val_acc + τ`` (accuracies in %).
        optimizer, lr, momentum, weight_decay, grad_clip: the optimizer (constant learning rate).
        run_dir: where ``metrics.jsonl`` and ``checkpoints/last.pt`` go (None: nothing is written).
        resume: continue from ``run_dir/checkpoints/last.pt``.

    Returns:
        a :class:`MultiTaskResult`.
    """
    epochs = _positive_int("epochs", epochs)
    tasks = _check_tasks(tasks, who)
    if grad_clip is not None and not (isinstance(grad_clip, (int, float)) and grad_clip > 0):
        raise ValueError(f"grad_clip must be a number > 0 or None, got {grad_clip!r}")
    if selective is not None:
        unknown = sorted(set(selective) - {"threshold", "check_every"})
        if unknown:
            raise ValueError(f"selective: unknown key(s) {unknown}; expected 'threshold' and 'check_every'")
        missing_val = [t.name for t in tasks if t.val_loader is None]
        if missing_val:
            raise ValueError(f"{who}: selective distillation compares validation accuracy; task(s) {missing_val} "
                             "have no val_loader")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    root = Path(run_dir) if run_dir is not None else None
    ckpt = root / "checkpoints" / "last.pt" if root is not None else None
    if ckpt is not None and ckpt.exists() and not resume:
        raise FileExistsError(f"{ckpt} exists: pass resume=True to continue that run, or choose another run_dir")
    if resume and (ckpt is None or not ckpt.exists()):
        raise FileNotFoundError(f"resume=True but there is no checkpoint at {ckpt}")

    seed_everything(seed)
    model = _check_student(student, tasks, who).to(dev)
    sources = {t.name: as_teacher_source(t.teacher) for t in tasks}
    for s in sources.values():
        if s is not None:
            s.to(dev)
    counts = {t.name: _count(t.train_loader, t.name) for t in tasks}
    schedule = _Schedule([t.name for t in tasks], {n: c[0] for n, c in counts.items()},
                         {n: c[1] for n, c in counts.items()}, sampling_exponent)
    total_steps = epochs * schedule.steps
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay)

    teacher_acc: dict[str, float] = {}
    for t in tasks:
        if sources[t.name] is not None and t.val_loader is not None:
            source = sources[t.name]
            teacher_acc[t.name] = evaluate_task(lambda x, s=source: s(as_batch((x,)))["logits"], t.val_loader, dev)
    flags = {t.name: sources[t.name] is not None for t in tasks}
    check_every = 0
    threshold = 0.0
    if selective is not None:
        threshold = float(selective.get("threshold", 1.0))
        check_every = selective.get("check_every", 0)
        if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 0:
            raise ValueError(f"selective check_every must be an int >= 0 (0: each epoch's end), got {check_every!r}")

    result = MultiTaskResult(run_dir=root, teacher_acc=teacher_acc, model=model)
    start_epoch, step = 0, 0
    elapsed_before = 0.0
    if resume and ckpt is not None:
        state = load_checkpoint(ckpt)
        if state.get("tasks") != [t.name for t in tasks] or state.get("total_steps") != total_steps:
            raise ValueError(f"{ckpt} was written for tasks {state.get('tasks')} and {state.get('total_steps')} "
                             f"steps; this run has {[t.name for t in tasks]} and {total_steps}")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start_epoch, step = int(state["epoch"]), int(state["step"])
        flags = {k: bool(v) for k, v in state["flags"].items()}
        result.history = list(json.loads(state["history"]))
        elapsed_before = float(state.get("time_s", 0.0))
        set_rng_state(state["rng"])

    def check(student_scores: dict[str, float]) -> None:
        gated = {n: v for n, v in student_scores.items() if n in teacher_acc}
        new = MF.selective_kd_flags(gated, {n: teacher_acc[n] for n in gated}, threshold)
        flags.update(new)

    bar = FitProgress(progress, epochs, schedule.steps)
    began = time.monotonic()
    try:
        for epoch in range(start_epoch, epochs):
            bar.start_epoch(epoch)
            model.train()
            streams = {t.name: _Cycler(t.train_loader, epoch) for t in tasks}
            loss_sum, n_steps = 0.0, 0
            for name in schedule.order(seed, epoch):
                batch = as_batch(streams[name].next()).to(dev)
                if batch.targets is None:
                    raise ValueError(f"task {name!r}: a training batch has no labels")
                logits = model(batch.inputs, name)
                t_logits = None
                if sources[name] is not None and flags.get(name, True):
                    with torch.no_grad():
                        t_logits = sources[name](batch)["logits"]
                loss = loss_fn(name, logits, t_logits, batch.targets,
                               {"step": step, "total_steps": total_steps, "flags": flags})
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"the loss became non-finite ({float(loss)}) at epoch {epoch + 1}, "
                                             f"step {step}, task {name!r}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if grad_clip is not None:
                    nn.utils.clip_grad_norm_(params, grad_clip)
                opt.step()
                step += 1
                loss_sum += float(loss.detach())
                n_steps += 1
                bar.advance(float(loss.detach()) if bar.wants_loss(step) else None)
                if selective is not None and check_every and step % check_every == 0:
                    check({t.name: _student_acc(model, t, dev) for t in tasks})
                    model.train()
            accs = {t.name: _student_acc(model, t, dev) for t in tasks if t.val_loader is not None}
            if selective is not None and not check_every:
                check(accs)
            row: dict[str, Any] = {"epoch": epoch + 1, "step": step, "train_loss": loss_sum / max(n_steps, 1)}
            row.update({f"val_acc/{n}": a for n, a in accs.items()})
            if accs:
                row["val_acc_mean"] = sum(accs.values()) / len(accs)
            if selective is not None:
                row.update({f"kd_on/{n}": v for n, v in flags.items()})
            result.history.append(row)
            bar.end_epoch({"val_student_acc": row["val_acc_mean"]} if accs else {})
            if root is not None:
                _write_epoch(root, ckpt, row, model, opt, epoch + 1, step, flags, result.history, tasks, total_steps,
                             elapsed_before + time.monotonic() - began)
    finally:
        bar.close()
    model.eval()
    result.time_s = elapsed_before + time.monotonic() - began
    _summarise(result, flags if selective is not None else {})
    return result


def _write_epoch(root: Path, ckpt: Path | None, row: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer,
                 epoch: int, step: int, flags: dict[str, bool], history: list[dict[str, Any]], tasks: list[Task],
                 total_steps: int, time_s: float) -> None:
    root.mkdir(parents=True, exist_ok=True)
    metrics = root / "metrics.jsonl"
    lines = [json.dumps(r) for r in history]
    atomic_write_text(metrics, "\n".join(lines) + "\n")
    assert ckpt is not None
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(ckpt, {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch, "step": step,
                           "flags": dict(flags), "history": json.dumps(history), "rng": rng_state(),
                           "tasks": [t.name for t in tasks], "total_steps": total_steps, "time_s": time_s})


def _summarise(result: MultiTaskResult, flags: dict[str, bool]) -> None:
    rows = result.history
    with_mean = [r for r in rows if "val_acc_mean" in r]
    if with_mean:
        best = max(with_mean, key=lambda r: r["val_acc_mean"])
        result.best_acc, result.best_epoch = best["val_acc_mean"], best["epoch"]
        result.last_acc = with_mean[-1]["val_acc_mean"]
        for key in with_mean[-1]:
            if key.startswith("val_acc/"):
                name = key[len("val_acc/"):]
                result.task_last_acc[name] = with_mean[-1][key]
                result.task_best_acc[name] = max(r[key] for r in with_mean if key in r)
    result.kd_flags = dict(flags)


# --------------------------------------------------------------------------------------------
# The three strategies
# --------------------------------------------------------------------------------------------


def _weight(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


@register_strategy("multilingual_kd", "multitask", MULTILINGUAL_KD_PAPER)
def fit_multilingual_kd(
    student: Any,
    tasks: Sequence[Task],
    *,
    epochs: int,
    kd_weight: float = 0.9,
    threshold: float = 1.0,
    check_every: int = 0,
    top_k: int | None = 4,
    run_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    **loop_kwargs: Any,
) -> MultiTaskResult:
    """Selective multi-teacher distillation: one student, one individual teacher per task, KD on a
    task only while the student's validation score is below its teacher's plus ``threshold``.

    Tan et al., "Multilingual Neural Machine Translation with Knowledge Distillation", ICLR 2019,
    arXiv 1902.10461 (Algorithm 1). Each step trains on a batch of one task with
    ``(1 − λ)·L_NLL + λ·L_KD`` (:func:`~distill.functional.multitask.selective_kd_loss`) while the
    task's flag is on, ``L_NLL`` alone otherwise. The flags start on; at each check (every
    ``check_every`` steps, 0 meaning at the end of each epoch) a task's flag is set to
    ``student_acc < teacher_acc + threshold`` (:func:`~distill.functional.multitask.selective_kd_flags`):
    KD stops once the student overtakes its teacher by the threshold and comes back if it falls
    behind again. Every batch of every task is seen once per epoch in a shuffled order (the
    language pairs' data mixed as in the authors' fairseq code).

    Args:
        student: a :class:`MultiTaskNet` with a head per task (or a factory).
        tasks: :class:`Task` entries, each with a ``val_loader`` and (for KD) a ``teacher``.
        kd_weight: λ, the weight of the KD term (0.9: the authors' code, ``DEFAULT_ALPHA``).
        threshold: τ in accuracy points (%). The authors' code switches KD off once the student's
            BLEU reaches the teacher's + 1; for classification tasks here, 1 accuracy point.
        check_every: T_check in optimizer steps; 0 checks at each epoch's end (the authors' README
            reports validation BLEU every 3 epochs).
        top_k: the teacher's K most probable classes kept and renormalised (the paper's top-K
            distillation; 4: the authors' code's ``distill_topk``; None keeps all classes).
        **loop_kwargs: :func:`fit_multitask`'s optimisation keywords (optimizer, lr, weight_decay,
            grad_clip, device, resume).

    Sources: the paper's abstract and introduction (its method section could not be read here) and
    the authors' code (github.com/RayeRen/multilingual-kd-pytorch), from which every default above
    is taken. Departures from that code: its KD term is taken at a temperature of 0.6 with a T²
    factor and its NLL term has label smoothing 0.1; here the teacher's distribution is used at
    temperature 1 without smoothing, as the loss ``(1 − λ)·L_NLL + λ·L_KD`` is usually stated for
    this paper.
    """
    lam = _weight("kd_weight", kd_weight)
    if top_k is not None:
        _positive_int("top_k", top_k)
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")

    def loss(task: str, z: Tensor, zt: Tensor | None, y: Tensor, state: dict[str, Any]) -> Tensor:
        on = zt is not None and state["flags"].get(task, False)
        return MF.selective_kd_loss(z, zt if zt is not None else z, y, kd_weight=lam, distill=on, top_k=top_k)

    return fit_multitask(student, tasks, loss, epochs=epochs, sampling_exponent=None,
                         selective={"threshold": float(threshold), "check_every": check_every},
                         run_dir=run_dir, seed=seed, progress=progress, who="fit_multilingual_kd", **loop_kwargs)


@register_strategy("bam", "multitask", BAM_PAPER)
def fit_bam(
    student: Any,
    tasks: Sequence[Task],
    *,
    epochs: int,
    teacher_annealing: bool = True,
    distill_weight: float = 0.5,
    sampling_exponent: float = 0.75,
    run_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    **loop_kwargs: Any,
) -> MultiTaskResult:
    """BAM!: a multi-task student distilled from single-task teachers with teacher annealing.

    Clark et al., "BAM! Born-Again Multi-Task Networks for Natural Language Understanding",
    ACL 2019, arXiv 1907.04829. Each step trains one task's head on
    ``-Σ_k [λ·onehot(y)_k + (1 − λ)·softmax(z_T)_k] log softmax(z_S)_k``
    (:func:`~distill.functional.multitask.bam_loss`), λ rising linearly from 0 at the first step to 1
    at the last (:func:`~distill.functional.multitask.teacher_annealing_lambda`): the student starts
    by imitating its teachers and ends on the gold labels. A task without a teacher trains on its
    gold labels. Each step draws its task with probability ``∝ n_τ^0.75`` (``n_τ`` its training
    samples); an epoch has as many steps as the tasks have batches together.

    Args:
        student: a :class:`MultiTaskNet` with a head per task (or a factory).
        tasks: :class:`Task` entries; ``teacher`` is the single-task model of that task (born-again:
            the same architecture as the student, trained on the task alone).
        teacher_annealing: False uses a fixed ``λ = 1 − distill_weight`` (the paper's ablation
            without annealing; the authors' code's ``distill_weight`` 0.5).
        sampling_exponent: α of the task sampling (0.75: the authors' code's
            ``task_weight_exponent``).
        **loop_kwargs: :func:`fit_multitask`'s optimisation keywords (optimizer, lr, weight_decay,
            grad_clip, device, resume). The authors' code fine-tunes BERT with lr 1e-4 (layer-wise
            decay 0.9, warm-up 10%), batch 128, 6 epochs; here Adam at a constant lr.

    Sources: the abstract, and the authors' code (github.com/google-research/google-research,
    ``bam/``) for every default. Departures: the authors' code realises the ``n^0.75`` weighting by repeating small data sets and
    weighting examples inside mixed batches; here whole batches of one task are drawn with that
    probability. Regression tasks (STS-B) are not covered: classification heads only.
    """
    if not isinstance(teacher_annealing, bool):
        raise ValueError(f"teacher_annealing must be True or False, got {teacher_annealing!r}")
    fixed = 1.0 - _weight("distill_weight", distill_weight)

    def loss(task: str, z: Tensor, zt: Tensor | None, y: Tensor, state: dict[str, Any]) -> Tensor:
        if zt is None:
            return torch.nn.functional.cross_entropy(z.float(), y.long())
        lam = MF.teacher_annealing_lambda(state["step"], state["total_steps"]) if teacher_annealing else fixed
        return MF.bam_loss(z, zt, y, lam)

    return fit_multitask(student, tasks, loss, epochs=epochs, sampling_exponent=sampling_exponent,
                         run_dir=run_dir, seed=seed, progress=progress, who="fit_bam", **loop_kwargs)


@register_strategy("mtdnn_kd", "multitask", MTDNN_KD_PAPER)
def fit_mtdnn_kd(
    student: Any,
    tasks: Sequence[Task],
    *,
    epochs: int,
    run_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    **loop_kwargs: Any,
) -> MultiTaskResult:
    """MT-DNN knowledge distillation: per-task ensembles of teachers distilled into one multi-task student.

    Liu et al., "Improving Multi-Task Deep Neural Networks via Knowledge Distillation for Natural
    Language Understanding", 2019, arXiv 1904.09482. For each task an ensemble of models (e.g. the
    same network fine-tuned with different seeds) gives soft targets, the average of the members'
    class probabilities (``Task.teacher`` a list of models → an
    :class:`~distill.teachers.EnsembleTeacher`, mean of probabilities at temperature 1). The student
    trains as MT-DNN does (Algorithm 1: the mini-batches of all tasks merged and shuffled, one pass
    per epoch); when the task has a teacher its loss is the average of the gold-label and the
    soft-target objectives, ``½·CE(y) + ½·CE(Q)`` (:func:`~distill.functional.multitask.mtdnn_kd_loss`),
    otherwise the gold-label CE alone.

    Args:
        student: a :class:`MultiTaskNet` with a head per task (or a factory).
        tasks: :class:`Task` entries, ``teacher`` a list of models (or one model, or None).
        **loop_kwargs: :func:`fit_multitask`'s optimisation keywords (the paper's optimiser settings
            could not be read here; Adam by default).

    Departures: regression tasks (STS-B, where the teacher's scores are averaged and MSE is used)
    are not covered; classification heads only. Sources: the abstract and the caption of the
    paper's Figure 2 (the loss as the average of the gold and soft objectives) could be read here;
    the ensemble's averaged probabilities at temperature 1 and MT-DNN's shuffled mix of all tasks'
    mini-batches are our reading of the paper and of MT-DNN, not checked against its full text.
    """

    def loss(task: str, z: Tensor, zt: Tensor | None, y: Tensor, state: dict[str, Any]) -> Tensor:
        if zt is None:
            return torch.nn.functional.cross_entropy(z.float(), y.long())
        # an EnsembleTeacher's logits are log p̄ (mean of the members' probabilities at T = 1)
        return MF.mtdnn_kd_loss(z, torch.softmax(zt.float(), dim=-1), y)

    return fit_multitask(student, tasks, loss, epochs=epochs, sampling_exponent=None,
                         run_dir=run_dir, seed=seed, progress=progress, who="fit_mtdnn_kd", **loop_kwargs)
