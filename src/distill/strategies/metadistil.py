"""MetaDistil: the teacher learns to teach from the student's meta-gradient on a quiz set.

Paper: W. Zhou, C. Xu, J. McAuley, "BERT Learns to Teach: Knowledge Distillation with Meta Learning",
ACL 2022, arXiv 2106.04570.

One round (the paper's Algorithm 1 with its pilot update; ``num_meta_batches`` training batches per round):

1. **Pilot update**: a differentiable copy of the student takes SGD step(s) on the distillation loss
   ``L_S(x, y; θ_S, θ_T) = w_ce · CE(S(x), y) + w_kd · T² KL(softmax(T(x)/T) ‖ softmax(S(x)/T))``:
   ``θ_S' = θ_S − λ ∇_{θ_S} L_S`` (``torch.func.functional_call`` on the copied parameters, the graph
   kept, so ``θ_S'`` is a function of the teacher's parameters ``θ_T``).
2. **Teacher (meta) update** on a quiz batch ``(x_q, y_q)``: ``θ_T ← θ_T − μ ∇_{θ_T} CE(S(x_q; θ_S'), y_q)``;
   the gradient flows through the pilot step (second order).
3. **Real student update**: the pilot copy is thrown away and the student takes its real optimiser step on
   the same batch(es) with the updated teacher (teacher outputs detached).

Defaults: the paper's experiment section could not be read here (only its abstract and introduction);
they are the authors' image-classification code (``cv/train_student_meta.py``, ``cv/helper/meta_loops.py``
of github.com/JetRunner/MetaDistil): one batch per round, pilot step size = the student's learning rate
(0.05), teacher SGD lr 0.05 (momentum 0.9, weight decay 5e-4), ``T = 4``, ``w_kd = 0.9``, ``w_ce = 0.1``
(its KD script's ``-a 0.9 -r 0.1``). The teacher runs in eval mode (BatchNorm statistics fixed, its weights
trained), as in that code. The quiz set is held out of the training set; its size (``quiz_fraction=0.1``)
is ours. The pilot's BatchNorm running statistics are restored before the real step (the code restores
the whole state dict).
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterable, Iterator
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

__all__ = ["METADISTIL_PAPER", "MetaDistilResult", "distill_loss", "fit_metadistil", "meta_teacher_grads", "write_history"]

METADISTIL_PAPER = Paper("BERT Learns to Teach: Knowledge Distillation with Meta Learning",
                         "W. Zhou, C. Xu, J. McAuley", 2022, "2106.04570", "ACL")


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


def meta_teacher_grads(student: nn.Module, teacher: nn.Module, x: Tensor, y: Tensor, quiz_x: Tensor,
                       quiz_y: Tensor, *, pilot_lr: float, T: float = 4.0, ce_weight: float = 0.1,
                       kd_weight: float = 0.9) -> tuple[list[Tensor], float]:
    """The teacher's meta-gradient ``∇_{θ_T} CE(S(x_q; θ_S − λ ∇_{θ_S} L_S(x, y; θ_S, θ_T)), y_q)``.

    Args:
        student, teacher: the models; their trainable parameters ``θ_S``, ``θ_T`` (the student is not
            changed: the pilot step is functional, its BatchNorm buffers are restored).
        x: training inputs ``(B, ...)``; y: labels ``(B,)``.
        quiz_x: quiz inputs ``(Q, ...)``; quiz_y: labels ``(Q,)``.
        pilot_lr: ``λ``, the pilot SGD step size.
        T, ce_weight, kd_weight: of :func:`distill_loss`.

    Returns: one gradient per trainable teacher parameter (in ``teacher.parameters()`` order, ``None``-free:
    zeros where a parameter does not reach the loss) and the quiz loss.
    """
    names = [n for n, p in student.named_parameters() if p.requires_grad]
    params = [p for p in student.parameters() if p.requires_grad]
    t_params = [p for p in teacher.parameters() if p.requires_grad]
    if not t_params:
        raise ValueError("metadistil: the teacher has no trainable parameter (requires_grad=False everywhere): "
                         "MetaDistil trains the teacher; pass an unfrozen model")
    saved = {n: b.detach().clone() for n, b in student.named_buffers()}
    try:
        with torch.enable_grad():
            loss = distill_loss(student(x), teacher(x), y, T=T, ce_weight=ce_weight, kd_weight=kd_weight)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            pilot = {n: p - pilot_lr * g for n, p, g in zip(names, params, grads)}
            quiz = F.cross_entropy(functional_call(student, pilot, (quiz_x,), strict=False), quiz_y)
            t_grads = torch.autograd.grad(quiz, t_params, allow_unused=True)
    finally:
        with torch.no_grad():
            for n, b in student.named_buffers():
                b.copy_(saved[n])
    return [torch.zeros_like(p) if g is None else g for p, g in zip(t_params, t_grads)], float(quiz.detach())


def _cycle(loader: Iterable[Any]) -> Iterator[Any]:
    while True:
        yield from loader


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
    quiz = InMemoryLoader(x[q], y[q], quiz_batch_size or bs, seed=seed + 1)
    return train, quiz


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
    seed: int = 0,
    progress: bool = True,
    run_dir: str | Path | None = None,
    **train: Any,
) -> MetaDistilResult:
    """MetaDistil (Zhou et al., ACL 2022, arXiv 2106.04570): alternating pilot update, teacher meta-update on
    a quiz batch, real student update (module docstring).

    Args:
        student: the student (a module or a zero-argument factory).
        train_loader: labelled in-memory training data; ``quiz_fraction`` of it becomes the quiz set.
        val_loader: evaluated after each epoch (student and current teacher).
        teacher: the trained teacher; a deep copy is trained (the given module is not changed).
        epochs: passes over the (remaining) training data.
        T, ce_weight, kd_weight: the distillation loss (:func:`distill_loss`).
        teacher_lr, teacher_momentum, teacher_weight_decay: the teacher's SGD.
        pilot_lr: the pilot step size ``λ`` (default: the student's lr).
        num_meta_batches: training batches per round (pilot steps before one teacher update).
        quiz_fraction, quiz_batch_size: the quiz set's share of the training data and its batch size.
        run_dir: ``metrics.jsonl`` (one line per epoch) is written here when given.
        **train: the recipe's ``lr``, ``momentum``, ``weight_decay`` of the student's SGD (0.05, 0.9, 5e-4).
    """
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"metadistil needs teacher= (a trained nn.Module); got {type(teacher).__name__}")
    for name, v in (("T", T), ("teacher_lr", teacher_lr)):
        if not isinstance(v, (int, float)) or v <= 0:
            raise ValueError(f"metadistil: {name} must be > 0; got {v!r}")
    if isinstance(num_meta_batches, bool) or not isinstance(num_meta_batches, int) or num_meta_batches < 1:
        raise ValueError(f"metadistil: num_meta_batches must be an int >= 1; got {num_meta_batches!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"metadistil: epochs must be an int >= 1; got {epochs!r}")
    opt = train_settings("metadistil", train, "sgd")
    lr = float(opt.get("lr", 0.05))
    pilot_lr = lr if pilot_lr is None else float(pilot_lr)
    torch.manual_seed(seed)  # a factory's initialisation follows the seed
    model = as_model(student, "metadistil")
    device = next(model.parameters()).device
    teacher = copy.deepcopy(teacher).requires_grad_(True).eval().to(device)
    train_data, quiz = _split_quiz(train_loader, quiz_fraction, quiz_batch_size, seed)
    torch.manual_seed(seed)
    s_opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=float(opt.get("momentum", 0.9)),
                            weight_decay=float(opt.get("weight_decay", 5e-4)))
    t_opt = torch.optim.SGD(teacher.parameters(), lr=teacher_lr, momentum=teacher_momentum,
                            weight_decay=teacher_weight_decay)
    quiz_batches = _cycle(quiz)
    history: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    steps = epochs * len(train_data)
    with StepProgress(progress, "metadistil", steps) as bar:
        for epoch in range(epochs):
            train_data.set_epoch(epoch)
            model.train()
            totals = {"loss": 0.0, "quiz": 0.0, "rounds": 0}
            buffer: list[Any] = []
            batches = list(train_data)
            for i, raw in enumerate(batches):
                buffer.append(as_batch(raw).to(device))
                if len(buffer) < num_meta_batches and i + 1 < len(batches):
                    continue
                _round(model, teacher, buffer, as_batch(next(quiz_batches)).to(device), s_opt, t_opt, pilot_lr, T, ce_weight,
                       kd_weight, totals)
                bar.advance(f"quiz {totals['quiz'] / max(totals['rounds'], 1):.3f}", len(buffer))
                buffer = []
            row = {"epoch": epoch, "time_s": time.perf_counter() - t0,
                   "train_loss": totals["loss"] / max(totals["rounds"], 1),
                   "quiz_loss": totals["quiz"] / max(totals["rounds"], 1)}
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


def _round(model: nn.Module, teacher: nn.Module, buffer: list[Any], quiz: Any, s_opt: torch.optim.Optimizer,
           t_opt: torch.optim.Optimizer, pilot_lr: float, T: float, ce_weight: float, kd_weight: float,
           totals: dict[str, float]) -> None:
    # 1-2: pilot update(s) on the round's batches, then the teacher's step on the quiz batch
    if len(buffer) == 1:
        b = buffer[0]
        t_grads, quiz_loss = meta_teacher_grads(model, teacher, b.inputs, b.targets, quiz.inputs, quiz.targets,
                                                pilot_lr=pilot_lr, T=T, ce_weight=ce_weight, kd_weight=kd_weight)
    else:
        t_grads, quiz_loss = _multi_pilot_grads(model, teacher, buffer, quiz, pilot_lr, T, ce_weight, kd_weight)
    for p, g in zip([p for p in teacher.parameters() if p.requires_grad], t_grads):
        p.grad = g
    t_opt.step()
    t_opt.zero_grad(set_to_none=True)
    # 3: the real student step(s) with the updated teacher
    for b in buffer:
        with torch.no_grad():
            t_logits = teacher(b.inputs)
        loss = distill_loss(model(b.inputs), t_logits, b.targets, T=T, ce_weight=ce_weight, kd_weight=kd_weight)
        s_opt.zero_grad(set_to_none=True)
        loss.backward()
        s_opt.step()
        totals["loss"] += float(loss.detach()) / len(buffer)
    totals["quiz"] += quiz_loss
    totals["rounds"] += 1


def _multi_pilot_grads(model: nn.Module, teacher: nn.Module, buffer: list[Any], quiz: Any, pilot_lr: float, T: float,
                       ce_weight: float, kd_weight: float) -> tuple[list[Tensor], float]:
    """Several pilot steps (one per batch of the round), then the quiz loss's teacher gradient."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    fast = {n: p for n, p in model.named_parameters() if p.requires_grad}
    t_params = [p for p in teacher.parameters() if p.requires_grad]
    saved = {n: b.detach().clone() for n, b in model.named_buffers()}
    try:
        for b in buffer:
            s = functional_call(model, fast, (b.inputs,), strict=False)
            loss = distill_loss(s, teacher(b.inputs), b.targets, T=T, ce_weight=ce_weight, kd_weight=kd_weight)
            grads = torch.autograd.grad(loss, [fast[n] for n in names], create_graph=True)
            fast = {n: fast[n] - pilot_lr * g for n, g in zip(names, grads)}
        q = F.cross_entropy(functional_call(model, fast, (quiz.inputs,), strict=False), quiz.targets)
        t_grads = torch.autograd.grad(q, t_params, allow_unused=True)
    finally:
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(saved[n])
    return [torch.zeros_like(p) if g is None else g for p, g in zip(t_params, t_grads)], float(q.detach())


def write_history(run_dir: str | Path | None, history: list[dict[str, Any]]) -> None:
    """``metrics.jsonl`` in ``run_dir`` (one JSON line per epoch so far), written atomically; nothing when
    ``run_dir`` is ``None``."""
    if run_dir is None:
        return
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(run_dir) / "metrics.jsonl", "".join(json.dumps(r, default=float) + "\n" for r in history))
