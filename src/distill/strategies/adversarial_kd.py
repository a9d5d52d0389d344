"""Conditional adversarial KD: a discriminator on logits as the learned loss.

Xu, Hsu, Huang, "Training Shallow and Thin Networks for Acceleration via Knowledge Distillation with
Conditional Adversarial Networks", 2017, arXiv 1709.00513 (later version: "Learning Loss for Knowledge
Distillation with Conditional Adversarial Networks"). The student plays the GAN's generator: its logits
are "fake" samples, the frozen teacher's logits on the same images "real" ones, and a discriminator
conditioned on the class label tells them apart while an auxiliary head names their class. Discriminator
and student are updated alternately, one step each per batch (``d_steps`` discriminator steps).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from distill import functional as DF
from distill.papers import Paper
from distill.progress import StepProgress
from distill.strategies.adversarial_common import (
    LogitDiscriminator,
    build_optimizer,
    check_weight,
    eval_row,
    finish,
    labelled_batches,
    optimizer_settings,
)
from distill.strategies.registry import as_model, register_strategy
from distill.train import FitResult

__all__ = ["PAPER", "adversarial_kd"]

PAPER = Paper("Training Shallow and Thin Networks for Acceleration via Knowledge Distillation with Conditional "
              "Adversarial Networks", "Z. Xu, Y.-C. Hsu, J. Huang", 2017, "1709.00513")


@register_strategy("adversarial_kd", "adversarial", PAPER)
def adversarial_kd(student: Any, train_loader: Any, val_loader: Any = None, *, teacher: nn.Module, epochs: int = 10,
                   adv_weight: float = 1.0, l1_weight: float = 1.0, aux_weight: float = 1.0, ce_weight: float = 0.0,
                   condition: bool = True, aux: bool = True, discriminator_hidden: Sequence[int] = (128, 128),
                   d_steps: int = 1, lr_discriminator: float = 1e-3, seed: int = 0, progress: bool = True,
                   run_dir: Any = None, **train: Any) -> FitResult:
    """Conditional adversarial KD (Xu et al. 2017, arXiv 1709.00513).

    Per batch ``(x, y)``: teacher logits ``t = T(x)`` (frozen, eval mode) and student logits ``s = S(x)``
    ``(B, K)``; ``d_steps`` discriminator steps on
    :func:`~distill.functional.cakd_discriminator_loss` (``t`` real, ``s.detach()`` fake, both conditioned
    on ``y``; the auxiliary head classifies both), then one student step on
    :func:`~distill.functional.cakd_student_loss` (non-saturating adversarial term + ``l1_weight`` ·
    L1 of the logits + ``aux_weight`` · the auxiliary head's CE on ``s``) + ``ce_weight`` · CE(s, y).

    The discriminator (:class:`~distill.strategies.adversarial_common.LogitDiscriminator`): an MLP on
    ``[logits; one_hot(y)]`` (``condition=True``) with a real/fake output and an auxiliary class head
    (``aux=True``), trained with Adam (lr ``lr_discriminator``, betas (0.5, 0.999)). Only the paper's abstract
    could be read here: the terms (adversarial, L1, auxiliary classification) follow the brief's reading of
    the paper; every weight (1, 1, 1; no label CE), the discriminator's widths and optimizer are ours.

    The student's optimizer is the recipe's (``train.optimizer``/``lr``/``momentum``/``weight_decay``;
    default Adam lr 1e-3, no weight decay: ours; SGD at lr 0.05 made an MLP student's regression onto
    the teacher's logits diverge), constant learning rate. Returns a
    :class:`~distill.train.FitResult` with one history row per epoch; ``run_dir`` is not used.
    """
    student = as_model(student, "adversarial_kd")
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"adversarial_kd: teacher must be a trained nn.Module; got {teacher!r}")
    weights = {n: check_weight("adversarial_kd", n, v) for n, v in
               (("adv_weight", adv_weight), ("l1_weight", l1_weight), ("aux_weight", aux_weight),
                ("ce_weight", ce_weight))}
    for name, v in (("epochs", epochs), ("d_steps", d_steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"adversarial_kd: {name} must be an int >= 1; got {v!r}")
    settings = optimizer_settings("adversarial_kd", train, {"optimizer": "adam", "lr": 1e-3, "momentum": 0.9,
                                                            "weight_decay": 0.0})
    torch.manual_seed(seed)
    teacher.eval()
    teacher.requires_grad_(False)
    disc: LogitDiscriminator | None = None
    opt_s = build_optimizer(student.parameters(), settings)
    opt_d: torch.optim.Optimizer | None = None
    result, t0 = FitResult(run_dir=None), time.perf_counter()
    steps = len(train_loader) if hasattr(train_loader, "__len__") else 0
    with StepProgress(progress, "adversarial_kd", epochs * steps) as bar:
        for epoch in range(1, epochs + 1):
            sums = {"d": 0.0, "s": 0.0}
            n = 0
            for x, y in labelled_batches(train_loader, "adversarial_kd"):
                with torch.no_grad():
                    t = teacher(x)
                student.train()
                s = student(x)
                if disc is None:  # sized by the first batch's logits
                    disc = LogitDiscriminator(int(s.shape[1]), discriminator_hidden, condition, aux).to(s.device)
                    opt_d = torch.optim.Adam(disc.parameters(), lr=lr_discriminator, betas=(0.5, 0.999))
                assert opt_d is not None
                for _ in range(d_steps):
                    real, real_cls = disc(t, y)
                    fake, fake_cls = disc(s.detach(), y)
                    loss_d = DF.cakd_discriminator_loss(real, fake, real_cls, fake_cls, y, weights["aux_weight"])
                    opt_d.zero_grad(set_to_none=True)
                    loss_d.backward()
                    opt_d.step()
                fake, fake_cls = disc(s, y)
                loss_s = DF.cakd_student_loss(fake, s, t, fake_cls, y, weights["adv_weight"], weights["l1_weight"],
                                              weights["aux_weight"])
                if weights["ce_weight"]:
                    loss_s = loss_s + weights["ce_weight"] * nn.functional.cross_entropy(s, y)
                opt_s.zero_grad(set_to_none=True)
                loss_s.backward()  # the discriminator's grads from this step are cleared before its next step
                opt_s.step()
                value = float(loss_s.detach())
                if value != value or abs(value) == float("inf"):
                    raise FloatingPointError(f"adversarial_kd: the student loss became {value} in epoch {epoch}")
                sums["d"] += float(loss_d.detach())
                sums["s"] += value
                n += 1
                bar.advance(f"D {float(loss_d.detach()):.3f} S {value:.3f}")
            if n == 0:
                raise ValueError("adversarial_kd: train_loader yielded no batches")
            result.history.append(eval_row(student, teacher, val_loader, epoch, t0,
                                            {"loss_d": sums["d"] / n, "loss_s": sums["s"] / n}))
    student.eval()
    result.discriminator = disc  # type: ignore[attr-defined]
    return finish(result, t0)
