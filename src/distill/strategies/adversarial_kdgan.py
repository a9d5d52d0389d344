"""KDGAN: a three-player game of a classifier (the student), a teacher and a discriminator.

X. Wang, R. Zhang, Y. Sun, J. Qi, "KDGAN: Knowledge Distillation with Generative Adversarial Networks",
NeurIPS 2018 (no arXiv version). The discriminator ``D(x, y) = sigmoid(score_d(x)[y])`` judges
feature-label pairs: true labels are positives, the student's and the teacher's pseudo labels negatives.
Student and teacher learn to fool it (policy gradients through a concrete relaxation of their label
distributions) and learn from each other through distillation losses. Read from the paper's text (its
LaTeX source in the authors' repository xiaojiew1/KDGAN, ``arxiv/latex/20180501.tex``: value function (1),
Algorithm 1, the concrete distribution (5)-(6)); defaults from the authors' MNIST code where the paper
gives none (``mdlcompr_mnist/flags.py``, ``run_algo.sh``).
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill import functional as DF
from distill.papers import Paper
from distill.progress import StepProgress
from distill.strategies.adversarial_common import (
    build_optimizer,
    check_weight,
    eval_row,
    finish,
    labelled_batches,
    optimizer_settings,
)
from distill.strategies.registry import as_model, register_strategy
from distill.train import FitResult

__all__ = ["PAPER", "kdgan", "pair_scores", "tau_at"]

PAPER = Paper("KDGAN: Knowledge Distillation with Generative Adversarial Networks", "X. Wang, R. Zhang, Y. Sun, J. Qi",
              2018, None, "NeurIPS 2018")


def pair_scores(discriminator: nn.Module, x: Tensor, labels: Tensor) -> Tensor:
    """The discriminator's logit of each pair ``(x_i, labels_i)``: ``score_d(x)[i, labels_i]`` ``(B,)`` (the
    authors' code gathers the label's entry of a classifier's logits)."""
    return discriminator(x).gather(1, labels.long().unsqueeze(1)).squeeze(1)


def tau_at(step: int, total: int, tau_start: float, tau_end: float) -> float:
    """The concrete distribution's temperature at ``step`` of ``total``: exponential decay from ``tau_start``
    to ``tau_end`` (the paper: "start with a large value and exponentially decay to a small value")."""
    if total <= 1:
        return tau_end
    return tau_start * (tau_end / tau_start) ** (min(step, total - 1) / (total - 1))


@register_strategy("kdgan", "adversarial", PAPER)
def kdgan(student: Any, train_loader: Any, val_loader: Any = None, *, teacher: nn.Module, epochs: int = 10,
          alpha: float = 0.5, distill_weight: float = 1.0, teacher_distill_weight: float = 0.01, distill: str = "l2",
          temperature: float = 3.0, tau_start: float = 1.0, tau_end: float = 0.1, pretrain_epochs: int = 1,
          discriminator: nn.Module | None = None,
          lr_teacher: float = 1e-3, lr_discriminator: float = 1e-3, seed: int = 0, progress: bool = True,
          run_dir: Any = None, **train: Any) -> FitResult:
    """KDGAN (Wang et al., NeurIPS 2018): student, teacher and discriminator trained alternately per batch.

    Per batch ``(x, y)`` (Algorithm 1 with one step per player; ``tau`` from :func:`tau_at`); ``x`` and
    ``y`` are the batch's inputs ``(B, ...)`` and labels ``(B,)``, every player's output logits ``(B, K)``:

    1. discriminator: concrete samples ``(q_s, y_s)``, ``(q_t, y_t)`` of the student's and teacher's
       label distributions (:func:`~distill.functional.concrete_sample`), one step on
       :func:`~distill.functional.kdgan_discriminator_loss` of the pairs ``(x, y)``, ``(x, y_s)``, ``(x, y_t)``;
    2. teacher: ``(1 - alpha)`` · :func:`~distill.functional.kdgan_policy_loss` of its own sample
       + ``teacher_distill_weight`` (the paper's gamma) · :func:`~distill.functional.kdgan_distill_loss`
       toward the student (the teacher learns from the student);
    3. student: ``alpha`` · policy loss + ``distill_weight`` (the paper's beta) · distillation toward the
       teacher.

    The student is first trained ``pretrain_epochs`` epochs with cross-entropy (the paper pretrains
    all three players); the teacher arrives trained; the discriminator defaults to a copy of the
    trained teacher (the paper scores teacher and discriminator with one architecture, the authors'
    code pretrains the discriminator as a classifier with cross-entropy: starting from the teacher's
    weights is ours and saves that pretraining). The given teacher is not modified: a copy trains, and
    is returned as ``result.teacher``.

    Defaults: ``alpha = 0.5``, ``distill_weight = 1`` (the authors' ``intelltch_weight``,
    ``distilled_weight``), ``teacher_distill_weight = 0.01`` (ours, inside the paper's search range
    [1e-4, 100]; the code's ``intellstd_weight`` defaults to 0, which switches the teacher's learning
    from the student off; at 1 a small student dragged a digits teacher from 92% to 10% in two
    epochs); ``distill="l2"``, the paper's reported
    choice (``"kl"`` at ``temperature``, the code's ``distn`` at T = 3, is the alternative it says gives
    comparable results); Adam lr 1e-3 for all three players (the code's); the temperature decays
    exponentially from ``tau_start = 1`` to ``tau_end = 0.1`` over training (the schedule's shape is the
    paper's, its end points ours). The student's optimizer is the recipe's
    (``train.optimizer``/``lr``/...; default Adam lr 1e-3, no weight decay).

    Returns a :class:`~distill.train.FitResult` with one row per epoch (the pretraining epochs are
    not rows), ``result.teacher`` and ``result.discriminator``; ``run_dir`` is not used.
    """
    who = "kdgan"
    student = as_model(student, who)
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"{who}: teacher must be a trained nn.Module; got {teacher!r}")
    alpha = check_weight(who, "alpha", alpha, 0.0, 1.0)
    beta = check_weight(who, "distill_weight", distill_weight)
    gamma = check_weight(who, "teacher_distill_weight", teacher_distill_weight)
    for name, v in (("tau_start", tau_start), ("tau_end", tau_end), ("temperature", temperature)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"{who}: {name} must be > 0; got {v!r}")
    for name, v, low in (("epochs", epochs, 1), ("pretrain_epochs", pretrain_epochs, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{who}: {name} must be an int >= {low}; got {v!r}")
    if distill not in ("l2", "kl"):
        raise ValueError(f"{who}: distill must be 'l2' or 'kl'; got {distill!r}")
    settings = optimizer_settings(who, train, {"optimizer": "adam", "lr": 1e-3, "momentum": 0.9, "weight_decay": 0.0})
    torch.manual_seed(seed)
    tch = copy.deepcopy(teacher).requires_grad_(True)
    disc = copy.deepcopy(teacher if discriminator is None else discriminator).requires_grad_(True)
    opt_s = build_optimizer(student.parameters(), settings)
    opt_t = torch.optim.Adam(tch.parameters(), lr=lr_teacher)
    opt_d = torch.optim.Adam(disc.parameters(), lr=lr_discriminator)
    result, t0 = FitResult(run_dir=None), time.perf_counter()
    steps = len(train_loader) if hasattr(train_loader, "__len__") else 0
    total = max(1, epochs * steps)

    def dist(a: Tensor, b: Tensor) -> Tensor:
        return DF.kdgan_distill_loss(a, b, distill, temperature)

    with StepProgress(progress and pretrain_epochs > 0, "kdgan pretrain", pretrain_epochs * steps) as bar:
        student.train()
        for _ in range(pretrain_epochs):
            for x, y in labelled_batches(train_loader, who):
                loss = F.cross_entropy(student(x), y)
                opt_s.zero_grad(set_to_none=True)
                loss.backward()
                opt_s.step()
                bar.advance(f"ce {float(loss.detach()):.3f}")
    step = 0
    with StepProgress(progress, "kdgan", epochs * steps) as bar:
        for epoch in range(1, epochs + 1):
            sums = {"d": 0.0, "t": 0.0, "s": 0.0}
            n = 0
            for x, y in labelled_batches(train_loader, who):
                tau = tau_at(step, total, tau_start, tau_end)
                student.train(), tch.train(), disc.train()
                # 1. discriminator: true pairs positive, both players' pseudo labels negative
                with torch.no_grad():
                    _, ys = DF.concrete_sample(student(x), tau)
                    _, yt = DF.concrete_sample(tch(x), tau)
                d_logits = disc(x)
                loss_d = DF.kdgan_discriminator_loss(d_logits.gather(1, y[:, None])[:, 0],
                                                     d_logits.gather(1, ys[:, None])[:, 0],
                                                     d_logits.gather(1, yt[:, None])[:, 0], alpha)
                opt_d.zero_grad(set_to_none=True)
                loss_d.backward()
                opt_d.step()
                # 2. teacher: fool the discriminator, learn from the student
                t_logits = tch(x)
                qt, yt = DF.concrete_sample(t_logits, tau)
                with torch.no_grad():
                    s_ref = student(x)
                    d_t = pair_scores(disc, x, yt)
                loss_t = (1 - alpha) * DF.kdgan_policy_loss(qt, yt, d_t) + gamma * dist(t_logits, s_ref)
                opt_t.zero_grad(set_to_none=True)
                loss_t.backward()
                opt_t.step()
                # 3. student: fool the discriminator, learn from the teacher
                s_logits = student(x)
                qs, ys = DF.concrete_sample(s_logits, tau)
                with torch.no_grad():
                    t_ref = tch(x)
                    d_s = pair_scores(disc, x, ys)
                loss_s = alpha * DF.kdgan_policy_loss(qs, ys, d_s) + beta * dist(s_logits, t_ref)
                opt_s.zero_grad(set_to_none=True)
                loss_s.backward()
                opt_s.step()
                value = float(loss_s.detach())
                if not math.isfinite(value):
                    raise FloatingPointError(f"{who}: the student loss became {value} in epoch {epoch}")
                sums["d"] += float(loss_d.detach())
                sums["t"] += float(loss_t.detach())
                sums["s"] += value
                n += 1
                step += 1
                bar.advance(f"D {float(loss_d.detach()):.3f} T {float(loss_t.detach()):.3f} S {value:.3f} "
                            f"tau {tau:.2f}")
            if n == 0:
                raise ValueError(f"{who}: train_loader yielded no batches")
            result.history.append(eval_row(student, tch, val_loader, epoch, t0,
                                            {f"loss_{k}": v / n for k, v in sums.items()} | {"tau": tau}))
    student.eval(), tch.eval(), disc.eval()
    result.teacher, result.discriminator = tch, disc  # type: ignore[attr-defined]
    return finish(result, t0)
