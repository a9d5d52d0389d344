"""MetaDistil: the teacher learns to teach from the student's meta-gradient on a quiz set.

Paper: W. Zhou, C. Xu, J. McAuley, "BERT Learns to Teach: Knowledge Distillation with Meta Learning",
ACL 2022, arXiv 2106.04570.

Schedule (the authors' CV code, below): the first ``teacher_warmup_epochs`` (or ``teacher_warmup_steps``) are
plain KD with the teacher fixed (no pilot step, no meta-gradient, the teacher bit-identical); after them, one
round per ``num_meta_batches`` training batches (the paper's Algorithm 1 with its pilot update):

1. **Pilot update**: a differentiable copy of the student takes SGD step(s) on the distillation loss
   ``L_S(x, y; θ_S, θ_T) = w_ce · CE(S(x), y) + w_kd · T² KL(softmax(T(x)/T) ‖ softmax(S(x)/T))``:
   ``θ_S' = θ_S − λ ∇_{θ_S} L_S`` (``torch.func.functional_call`` on the copied parameters, the graph
   kept, so ``θ_S'`` is a function of the teacher's parameters ``θ_T``).
2. **Teacher (meta) update** on the round's quiz batches ``(x_q^j, y_q^j)``, j = 1..J:
   ``θ_T ← θ_T − μ ∇_{θ_T} (1/J) Σ_j CE(S(x_q^j; θ_S'), y_q^j)`` (the mean of the per-batch mean CEs, as the
   code sums the held loader's batch losses and divides by their count); the gradient flows through the pilot
   step (second order). The teacher's loss is only the pilot student's quiz CE: neither the CV nor the NLP code
   adds a CE of the teacher's own (checked in ``cv/helper/meta_loops.py`` and ``nlp/run_glue_distillation_meta.py``).
3. **Real student update**: the pilot copy is thrown away and the student takes its real optimiser step on
   the same batch(es) with the updated teacher (teacher outputs detached).

Sources. The paper's method and experiment sections could not be read here (only its abstract and
introduction); the schedule and defaults are the authors' image-classification code
(github.com/JetRunner/MetaDistil, ``cv/train_student_meta.py``, ``cv/helper/meta_loops.py``,
``cv/dataset/meta_cifar100.py``; commit 80e60c1):

* **Teacher warm-up**: the script sets the teacher optimiser's lr to 0 for epochs 1–149 of 240 and to
  ``teacher_lr`` from epoch 150, where it also multiplies the pilot step size by 0.1 (the student's first lr
  decay). Ours: ``teacher_warmup_epochs`` defaults to the first lr milestone (150 of 240 scaled to ``epochs``;
  no milestones → no warm-up, the paper's Algorithm 1). Departures: (a) the code's switch is one epoch before
  the student's lr decay (the student's decays after epoch 150, ``epoch > 150``); ours switches both at the same
  epoch, so the pilot step always equals the student's current lr; (b) with lr 0 the code still runs the pilot
  and the meta-gradient during the warm-up, which fills the teacher's SGD momentum buffer; ours runs plain KD
  there (the same student updates, the teacher untouched) and the teacher's momentum starts empty.
* **lr schedule**: the student's lr (0.05) decays ×0.1 at epochs 150, 180, 210 of 240; the pilot step size
  (``assume_s_step_size`` 0.05) with it; the teacher's lr ×0.1 at 180 and 210 (its milestones after the
  warm-up). Ours: ``milestones`` (default ``round(epochs · {150, 180, 210} / 240)``) and ``gamma`` (0.1) apply
  to the student's lr and the pilot step; the teacher's lr decays at the milestones after its warm-up ends.
* **Quiz set**: the last ``held_size`` training images are held out (augmented like the training set); per
  round the teacher's loss averages the pilot student's CE over a sample the size of the whole held set
  (``RandomSampler(replacement=True)``; the NLP code: the whole held set, ``num_held_batches=0``). Ours: a
  random ``quiz_fraction`` (0.1, ours: ``held_size`` has no default in the code) of the training data, with the
  training data's augmentation; ``quiz_batches=None`` (default) averages one pass over the whole quiz set (no
  replacement, as the NLP code), an int ``J`` takes the next ``J`` batches of a reshuffled stream.
* One batch per round, teacher SGD lr 0.05 (momentum 0.9, weight decay 5e-4), ``T = 4``, ``w_kd = 0.9``,
  ``w_ce = 0.1`` (its KD script's ``-a 0.9 -r 0.1``). The teacher runs in eval mode (BatchNorm statistics
  fixed, its weights trained), as in that code. The pilot's BatchNorm running statistics are restored before
  the real step (the code restores the whole state dict). The NLP code clips the teacher's gradient norm and
  uses AdamW with a linear schedule; the CV code does neither, and neither do we.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from distill import functional as DF
from distill.batch import as_batch
from distill.data.loader import InMemoryLoader, in_memory_tensors
from distill.distiller import Distiller
from distill.files import atomic_write_text
from distill.papers import Paper
from distill.progress import StepProgress
from distill.strategies.data_free_dfad import train_settings
from distill.strategies.registry import as_model, register_strategy
from distill.train import FitResult, evaluate

__all__ = ["METADISTIL_PAPER", "MetaDistilResult", "distill_loss", "fit_metadistil", "meta_teacher_grads",
           "schedule_milestones", "write_history"]

METADISTIL_PAPER = Paper("BERT Learns to Teach: Knowledge Distillation with Meta Learning",
                         "W. Zhou, C. Xu, J. McAuley", 2022, "2106.04570", "ACL")

# the authors' CV schedule: 240 epochs, lr decays (and the teacher's start) at epochs 150, 180, 210
_AUTHORS_EPOCHS, _AUTHORS_MILESTONES = 240, (150, 180, 210)


@dataclass
class MetaDistilResult(FitResult):
    """:class:`~distill.train.FitResult` of the student, plus the trained ``teacher`` and ``student``."""

    teacher: nn.Module | None = None
    student: nn.Module | None = None


def distill_loss(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, *, T: float,
                 ce_weight: float, kd_weight: float) -> Tensor:
    """``w_ce · CE(s, y) + w_kd · T² KL(softmax(t/T) ‖ softmax(s/T))`` (batch means); logits ``(B, K)``,
    targets ``(B,)``. Differentiable in both logits (the teacher's gradient in the pilot step)."""
    return ce_weight * F.cross_entropy(student_logits, targets) + kd_weight * DF.kd_loss(student_logits,
                                                                                        teacher_logits, T)


def _as_list(v: Tensor | Sequence[Tensor], name: str) -> list[Tensor]:
    out = [v] if isinstance(v, Tensor) else list(v)
    if not out or not all(isinstance(t, Tensor) for t in out):
        raise ValueError(f"metadistil: {name} must be a tensor or a non-empty sequence of tensors; got {v!r}")
    return out


def meta_teacher_grads(student: nn.Module, teacher: nn.Module, x: Tensor | Sequence[Tensor],
                       y: Tensor | Sequence[Tensor], quiz_x: Tensor | Sequence[Tensor],
                       quiz_y: Tensor | Sequence[Tensor], *, pilot_lr: float, T: float = 4.0, ce_weight: float = 0.1,
                       kd_weight: float = 0.9) -> tuple[list[Tensor], float]:
    """The teacher's meta-gradient ``∇_{θ_T} (1/J) Σ_j CE(S(x_q^j; θ_S'), y_q^j)`` through the pilot step(s)
    ``θ_S' = θ_S − λ ∇ L_S(x_1, y_1; ·) − ...`` (one per training batch, each at the previous pilot weights).

    Args:
        student, teacher: the models; their trainable parameters ``θ_S``, ``θ_T`` (the student is not
            changed: the pilot steps are functional, its BatchNorm buffers are restored).
        x, y: a training batch, inputs ``(B, ...)`` and labels ``(B,)``, or a sequence of such batches (one
            pilot step each, in order).
        quiz_x, quiz_y: a quiz batch, inputs ``(Q, ...)`` and labels ``(Q,)``, or a sequence of ``J`` such
            batches; the quiz loss is the mean of their batch-mean cross-entropies.
        pilot_lr: ``λ``, the pilot SGD step size.
        T, ce_weight, kd_weight: of :func:`distill_loss`.

    Returns: one gradient per trainable teacher parameter (in ``teacher.parameters()`` order, ``None``-free:
    zeros where a parameter does not reach the loss) and the quiz loss.
    """
    xs, ys, qxs, qys = _as_list(x, "x"), _as_list(y, "y"), _as_list(quiz_x, "quiz_x"), _as_list(quiz_y, "quiz_y")
    if len(xs) != len(ys) or len(qxs) != len(qys):
        raise ValueError(f"metadistil: {len(xs)} input batches for {len(ys)} label batches, {len(qxs)} quiz input "
                         f"batches for {len(qys)} quiz label batches; expected equal counts")
    names = [n for n, p in student.named_parameters() if p.requires_grad]
    fast = {n: p for n, p in student.named_parameters() if p.requires_grad}
    t_params = [p for p in teacher.parameters() if p.requires_grad]
    if not t_params:
        raise ValueError("metadistil: the teacher has no trainable parameter (requires_grad=False everywhere): "
                         "MetaDistil trains the teacher; pass an unfrozen model")
    saved = {n: b.detach().clone() for n, b in student.named_buffers()}
    try:
        with torch.enable_grad():
            for bx, by in zip(xs, ys):
                s = functional_call(student, fast, (bx,), strict=False)
                loss = distill_loss(s, teacher(bx), by, T=T, ce_weight=ce_weight, kd_weight=kd_weight)
                grads = torch.autograd.grad(loss, [fast[n] for n in names], create_graph=True)
                fast = {n: fast[n] - pilot_lr * g for n, g in zip(names, grads)}
            # the mean of per-batch mean CEs (the authors' held-loader average), not a per-sample mean
            quiz = sum(F.cross_entropy(functional_call(student, fast, (qx,), strict=False), qy)
                       for qx, qy in zip(qxs, qys)) / len(qxs)
            t_grads = torch.autograd.grad(quiz, t_params, allow_unused=True)
    finally:
        with torch.no_grad():
            for n, b in student.named_buffers():
                b.copy_(saved[n])
    return [torch.zeros_like(p) if g is None else g for p, g in zip(t_params, t_grads)], float(quiz.detach())


def _quiz_stream(quiz: InMemoryLoader) -> Iterator[Any]:
    """The quiz batches, reshuffled each pass (the held loader's ``shuffle=True``)."""
    epoch = 0
    while True:
        quiz.set_epoch(epoch)
        yield from quiz
        epoch += 1


def _split_quiz(train_loader: Any, quiz_fraction: float, quiz_batch_size: int | None,
                seed: int) -> tuple[InMemoryLoader, InMemoryLoader]:
    x, y, settings = in_memory_tensors(train_loader, "metadistil")
    if not isinstance(y, Tensor) or y.dtype != torch.long:
        raise ValueError("metadistil needs labelled training data (inputs, long targets): the quiz loss is a "
                         "cross-entropy")
    if not 0.0 < quiz_fraction < 1.0:
        raise ValueError(f"metadistil: quiz_fraction must be in (0, 1); got {quiz_fraction!r}")
    n_quiz = max(1, round(quiz_fraction * len(x)))
    if n_quiz >= len(x):
        raise ValueError(f"metadistil: quiz_fraction={quiz_fraction} leaves no training data out of {len(x)}")
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    q, t = order[:n_quiz], order[n_quiz:]
    bs = int(settings.get("batch_size", 64))
    train = InMemoryLoader(x[t], y[t], bs, seed=seed, augment=settings.get("augment"))
    # the authors' held set takes the training transform (cv/dataset/meta_cifar100.py)
    quiz = InMemoryLoader(x[q], y[q], quiz_batch_size or bs, seed=seed + 1, augment=settings.get("augment"))
    return train, quiz


def _check_int(name: str, v: Any, low: int, none_ok: bool = False) -> None:
    if none_ok and v is None:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"metadistil: {name} must be an int >= {low}{' or None' if none_ok else ''}; got {v!r}")


def schedule_milestones(epochs: int, milestones: Sequence[int] | None) -> list[int]:
    """The lr milestones: the given ones (sorted), or the authors' 150, 180, 210 of 240 epochs scaled to
    ``epochs`` (``round(epochs · m / 240)``)."""
    if milestones is None:
        return [round(epochs * m / _AUTHORS_EPOCHS) for m in _AUTHORS_MILESTONES]
    out = list(milestones)
    for m in out:
        _check_int("each milestone", m, 1)
    return sorted(out)


@register_strategy("metadistil", "meta", METADISTIL_PAPER)
def fit_metadistil(
    student: Any,
    train_loader: Any,
    val_loader: Iterable[Any] | None = None,
    *,
    teacher: nn.Module,
    epochs: int,
    T: float = 4.0,
    ce_weight: float = 0.1,
    kd_weight: float = 0.9,
    teacher_lr: float = 0.05,
    teacher_momentum: float = 0.9,
    teacher_weight_decay: float = 5e-4,
    pilot_lr: float | None = None,
    num_meta_batches: int = 1,
    quiz_fraction: float = 0.1,
    quiz_batch_size: int | None = None,
    quiz_batches: int | None = None,
    milestones: Sequence[int] | None = None,
    gamma: float = 0.1,
    teacher_warmup_epochs: int | None = None,
    teacher_warmup_steps: int | None = None,
    seed: int = 0,
    progress: bool = True,
    run_dir: str | Path | None = None,
    **train: Any,
) -> MetaDistilResult:
    """MetaDistil (Zhou et al., ACL 2022, arXiv 2106.04570): KD with the teacher fixed during a warm-up, then
    rounds of pilot update, teacher meta-update on quiz batches, real student update (module docstring).

    Args:
        student: the student (a module or a zero-argument factory).
        train_loader: labelled in-memory training data; ``quiz_fraction`` of it becomes the quiz set.
        val_loader: evaluated after each epoch (student and current teacher).
        teacher: the trained teacher; a deep copy is trained (the given module is not changed).
        epochs: passes over the (remaining) training data.
        T, ce_weight, kd_weight: the distillation loss (:func:`distill_loss`).
        teacher_lr, teacher_momentum, teacher_weight_decay: the teacher's SGD (``teacher_lr`` from the end of
            the warm-up, decayed by ``gamma`` at each later milestone).
        pilot_lr: the pilot step size ``λ`` at the start (default: the student's lr); decayed with the
            student's lr at every milestone.
        num_meta_batches: training batches per round (pilot steps before one teacher update).
        quiz_fraction, quiz_batch_size: the quiz set's share of the training data and its batch size.
        quiz_batches: quiz batches per teacher update (their batch-mean CEs averaged); ``None``: the whole
            quiz set (the authors').
        milestones, gamma: epochs (0-based: from that epoch on) where the student's lr and the pilot step are
            multiplied by ``gamma``; default the authors' 150/180/210 of 240 scaled to ``epochs``; ``()``: none.
        teacher_warmup_epochs: epochs of plain KD with the teacher fixed before the first meta-update;
            default the first milestone (0 without milestones). teacher_warmup_steps: the same in training
            batches (student steps); give at most one of the two.
        run_dir: ``metrics.jsonl`` (one line per epoch) is written here when given.
        **train: the recipe's ``lr``, ``momentum``, ``weight_decay`` of the student's SGD (0.05, 0.9, 5e-4).
    """
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"metadistil needs teacher= (a trained nn.Module); got {type(teacher).__name__}")
    for name, v in (("T", T), ("teacher_lr", teacher_lr), ("gamma", gamma)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise ValueError(f"metadistil: {name} must be > 0; got {v!r}")
    _check_int("num_meta_batches", num_meta_batches, 1)
    _check_int("epochs", epochs, 1)
    _check_int("quiz_batches", quiz_batches, 1, none_ok=True)
    _check_int("teacher_warmup_epochs", teacher_warmup_epochs, 0, none_ok=True)
    _check_int("teacher_warmup_steps", teacher_warmup_steps, 0, none_ok=True)
    if teacher_warmup_epochs is not None and teacher_warmup_steps is not None:
        raise ValueError(f"metadistil: give teacher_warmup_epochs ({teacher_warmup_epochs}) or teacher_warmup_steps "
                         f"({teacher_warmup_steps}), not both")
    if isinstance(milestones, (str, bytes)) or not (milestones is None or isinstance(milestones, Iterable)):
        raise ValueError(f"metadistil: milestones must be a sequence of epochs (ints >= 1) or None; got {milestones!r}")
    ms = schedule_milestones(epochs, milestones)
    opt = train_settings("metadistil", train, "sgd")
    lr = float(opt.get("lr", 0.05))
    pilot_lr = lr if pilot_lr is None else float(pilot_lr)
    torch.manual_seed(seed)  # a factory's initialisation follows the seed
    model = as_model(student, "metadistil")
    device = next(model.parameters()).device
    teacher = copy.deepcopy(teacher).requires_grad_(True).eval().to(device)
    train_data, quiz = _split_quiz(train_loader, quiz_fraction, quiz_batch_size, seed)
    per_epoch = len(train_data)
    if teacher_warmup_steps is not None:
        warmup = teacher_warmup_steps
    else:
        warmup = per_epoch * ((ms[0] if ms else 0) if teacher_warmup_epochs is None else teacher_warmup_epochs)
    meta_start_epoch = warmup // per_epoch  # the teacher's lr decays only at milestones after this epoch
    n_quiz = len(quiz) if quiz_batches is None else quiz_batches
    torch.manual_seed(seed)
    s_opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=float(opt.get("momentum", 0.9)),
                            weight_decay=float(opt.get("weight_decay", 5e-4)))
    t_opt = torch.optim.SGD(teacher.parameters(), lr=teacher_lr, momentum=teacher_momentum,
                            weight_decay=teacher_weight_decay)
    quiz_batches_iter = _quiz_stream(quiz)
    history: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    step = 0
    with StepProgress(progress, "metadistil", epochs * per_epoch) as bar:
        for epoch in range(epochs):
            decay = gamma ** sum(m <= epoch for m in ms)
            t_decay = gamma ** sum(meta_start_epoch < m <= epoch for m in ms)
            for g in s_opt.param_groups:
                g["lr"] = lr * decay
            for g in t_opt.param_groups:
                g["lr"] = teacher_lr * t_decay
            train_data.set_epoch(epoch)
            model.train()
            totals = {"loss": 0.0, "quiz": 0.0, "rounds": 0, "steps": 0}
            buffer: list[Any] = []
            batches = list(train_data)
            for i, raw in enumerate(batches):
                b = as_batch(raw).to(device)
                step += 1
                if step <= warmup:  # the teacher fixed: plain KD, no pilot, no meta-gradient
                    _student_step(model, teacher, b, s_opt, T, ce_weight, kd_weight, totals)
                    bar.advance("KD, teacher fixed", 1)
                    continue
                buffer.append(b)
                if len(buffer) < num_meta_batches and i + 1 < len(batches):
                    continue
                qs = [as_batch(next(quiz_batches_iter)).to(device) for _ in range(n_quiz)]
                _round(model, teacher, buffer, qs, s_opt, t_opt, pilot_lr * decay, T, ce_weight, kd_weight, totals)
                bar.advance(f"quiz {totals['quiz'] / max(totals['rounds'], 1):.3f}", len(buffer))
                buffer = []
            row = {"epoch": epoch, "time_s": time.perf_counter() - t0,
                   "train_loss": totals["loss"] / max(totals["steps"], 1),
                   "quiz_loss": totals["quiz"] / totals["rounds"] if totals["rounds"] else None,
                   "teacher_updates": totals["rounds"], "lr": lr * decay, "pilot_lr": pilot_lr * decay,
                   "teacher_lr": teacher_lr * t_decay}
            if val_loader is not None:
                metrics = evaluate(Distiller(model, copy.deepcopy(teacher), {"ce": 1.0}), val_loader)
                row.update({f"val_{k}": v for k, v in metrics.items()})
            history.append(row)
            write_history(run_dir, history)
    accs = [r.get("val_student_acc") for r in history]
    best = max(range(len(accs)), key=lambda i: accs[i]) if accs and accs[0] is not None else None
    return MetaDistilResult(history=history, best_acc=accs[best] if best is not None else None, best_epoch=best,
                            last_acc=accs[-1] if accs else None, run_dir=Path(run_dir) if run_dir else None,
                            time_s=time.perf_counter() - t0, teacher=teacher, student=model)


def _student_step(model: nn.Module, teacher: nn.Module, b: Any, s_opt: torch.optim.Optimizer, T: float,
                  ce_weight: float, kd_weight: float, totals: dict[str, float]) -> None:
    """One real student step on ``L_S`` with the teacher's logits detached."""
    with torch.no_grad():
        t_logits = teacher(b.inputs)
    loss = distill_loss(model(b.inputs), t_logits, b.targets, T=T, ce_weight=ce_weight, kd_weight=kd_weight)
    s_opt.zero_grad(set_to_none=True)
    loss.backward()
    s_opt.step()
    totals["loss"] += float(loss.detach())
    totals["steps"] += 1


def _round(model: nn.Module, teacher: nn.Module, buffer: list[Any], quiz: list[Any], s_opt: torch.optim.Optimizer,
           t_opt: torch.optim.Optimizer, pilot_lr: float, T: float, ce_weight: float, kd_weight: float,
           totals: dict[str, float]) -> None:
    # 1-2: pilot update(s) on the round's batches, then the teacher's step on the quiz batches
    t_grads, quiz_loss = meta_teacher_grads(model, teacher, [b.inputs for b in buffer], [b.targets for b in buffer],
                                            [q.inputs for q in quiz], [q.targets for q in quiz], pilot_lr=pilot_lr,
                                            T=T, ce_weight=ce_weight, kd_weight=kd_weight)
    for p, g in zip([p for p in teacher.parameters() if p.requires_grad], t_grads):
        p.grad = g
    t_opt.step()
    t_opt.zero_grad(set_to_none=True)
    # 3: the real student step(s) with the updated teacher
    for b in buffer:
        _student_step(model, teacher, b, s_opt, T, ce_weight, kd_weight, totals)
    totals["quiz"] += quiz_loss
    totals["rounds"] += 1


def write_history(run_dir: str | Path | None, history: list[dict[str, Any]]) -> None:
    """``metrics.jsonl`` in ``run_dir`` (one JSON line per epoch so far), written atomically; nothing when
    ``run_dir`` is ``None``."""
    if run_dir is None:
        return
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(run_dir) / "metrics.jsonl", "".join(json.dumps(r, default=float) + "\n" for r in history))
