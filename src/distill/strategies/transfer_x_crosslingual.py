"""Cross-lingual distillation for text classification (Xu & Yang, ACL 2017, arXiv 1705.02073).

A classifier trained on labelled documents of a *source* language reads the source side of a parallel
corpus; its soft predictions become the labels of the *target*-language side, on which a
target-language student is trained (:func:`~distill.functional.cross_lingual_kd_loss`, temperature T).
The paper's adversarial feature adaptation variant adds a domain discriminator behind a gradient
reversal layer (Ganin & Lempitsky 2015): for the student, between the target side of the parallel
corpus and unlabelled target-language documents of the task; for the teacher (when trained here),
between the labelled source documents and the source side of the parallel corpus.

Defaults from the authors' code (``xrc10/cross-distill``, ``config.py``; the paper's text beyond its
abstract could not be read here): T = 3, Adam lr 1e-3, batch 256; adversarial: discriminator one hidden
layer of 500 ReLU units with dropout 0.2, two-way softmax, gradient-reversal strength 1e-7, 5
discriminator/feature steps (``k``) per classifier step (``l = 1``), its own Adam at lr 1e-3.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill import functional as DF
from distill.papers import Paper
from distill.strategies.registry import as_model, register_strategy
from distill.strategies.transfer_x_common import make_optimizer, own_loop_kwargs, train_in_memory
from distill.taps import logits_of, resolve
from distill.train import FitResult

__all__ = ["CROSS_LINGUAL", "CrossLingualResult", "fit_cross_lingual_distill", "teacher_soft_logits"]

CROSS_LINGUAL = Paper("Cross-lingual Distillation for Text Classification", "R. Xu, Y. Yang", 2017, "1705.02073",
                      "ACL")


@dataclass
class CrossLingualResult(FitResult):
    """The student's :class:`~distill.train.FitResult` plus the teacher's (when trained here)."""

    teacher_result: FitResult | None = None
    teacher_logits: Tensor | None = field(default=None, repr=False)  # (N, K) on the source side of the corpus


@torch.no_grad()
def teacher_soft_logits(teacher: nn.Module, source: Tensor, batch_size: int = 512) -> Tensor:
    """The teacher's logits ``(N, K)`` on the source side ``(N, ...)`` of the parallel corpus (eval mode)."""
    was = teacher.training
    teacher.eval()
    try:
        return torch.cat([logits_of(teacher(source[i:i + batch_size])).float()
                          for i in range(0, source.shape[0], batch_size)])
    finally:
        teacher.train(was)


class _Discriminator(nn.Module):
    def __init__(self, width: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 2))

    def forward(self, h: Tensor) -> Tensor:
        return self.net(h)


def _features(model: nn.Module, tap: str, x: Tensor) -> Tensor:
    """The output of ``model``'s submodule ``tap`` on ``x``, flattened to ``(B, D)``."""
    store: list[Tensor] = []
    handle = resolve(model, tap).register_forward_hook(lambda _m, _i, out: store.append(out))
    try:
        model(x)
    finally:
        handle.remove()
    return store[0].flatten(1)


def _adversary(model: nn.Module, tap: str, own: Tensor, other: Tensor, *, hidden: int, dropout: float, grl: float,
               steps: int, lr: float, seed: int) -> Callable[[Tensor, int], dict[str, float]]:
    """A ``before_step`` hook: ``steps`` updates of discriminator + features (through the gradient reversal)
    telling ``own[idx]`` (label 1) from as many random rows of ``other`` (label 0)."""
    with torch.no_grad():
        width = _features(model, tap, own[:2]).shape[1]
    disc = _Discriminator(width, hidden, dropout)
    opt = make_optimizer(list(disc.parameters()) + list(model.parameters()), "adam", lr)
    g = torch.Generator().manual_seed(seed)

    def step(idx: Tensor, _: int) -> dict[str, float]:
        pick = torch.randint(0, other.shape[0], (len(idx),), generator=g)
        x = torch.cat([own[idx], other[pick]])
        y = torch.cat([torch.ones(len(idx)), torch.zeros(len(idx))]).long()
        loss = torch.zeros(())
        for _ in range(steps):
            loss = F.cross_entropy(disc(DF.grad_reverse(_features(model, tap, x), grl)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return {"domain_loss": float(loss.detach())}

    return step


def _check_pair(name: str, x: Any) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty tensor of inputs (N, ...); got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    return x


@register_strategy("cross_lingual_distill", "transfer", CROSS_LINGUAL)
def fit_cross_lingual_distill(
    student: nn.Module | Callable[[], nn.Module],
    train_loader: tuple[Tensor, Tensor],
    val_loader: Iterable[Any] | None = None,
    *,
    teacher: nn.Module | None = None,
    source_labelled: tuple[Tensor, Tensor] | None = None,
    teacher_model: nn.Module | Callable[[], nn.Module] | None = None,
    target_unlabelled: Tensor | None = None,
    epochs: int,
    teacher_epochs: int | None = None,
    run_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    temperature: float = 3.0,
    adversarial: bool = False,
    feature_tap: str = "pool",
    grl_lambda: float = 1e-7,
    discriminator_hidden: int = 500,
    discriminator_dropout: float = 0.2,
    discriminator_steps: int = 5,
    discriminator_lr: float = 1e-3,
    batch_size: int = 256,
    **fit_kwargs: Any,
) -> CrossLingualResult:
    """Cross-lingual distillation: a target-language student learns a source-language teacher's soft labels.

    Xu & Yang, "Cross-lingual Distillation for Text Classification", ACL 2017, arXiv 1705.02073.

    Args:
        student: the target-language classifier ``(B, L_t) -> (B, K)`` (or a factory).
        train_loader: the parallel corpus ``(source_side, target_side)``: two tensors ``(N, L_s)`` and
            ``(N, L_t)``, row i of one the translation of row i of the other. No labels.
        val_loader: labelled target-language batches ``(x (B, L_t), y (B,))`` for per-epoch accuracy.
        teacher: a trained source-language classifier ``(B, L_s) -> (B, K)``; None trains ``teacher_model``
            on ``source_labelled = (x (M, L_s), y (M,))`` for ``teacher_epochs`` (default ``epochs``) with CE.
        target_unlabelled: target-language documents ``(N_u, L_t)`` of the task's own distribution, for
            the adversarial variant (the authors' code uses the test documents' text, transductively).
        temperature: T of :func:`~distill.functional.cross_lingual_kd_loss` (3, the authors' code).
        adversarial: the paper's adversarial feature adaptation (see the module docstring); the features are
            the output of ``feature_tap`` (``"pool"``: the pooled document vector of the zoo's text models).
        grl_lambda, discriminator_hidden, discriminator_dropout, discriminator_steps, discriminator_lr:
            the adversary, defaults from the authors' code. Note that a reversal strength of 1e-7 leaves
            the features almost untouched; larger values (0.1) are ours to try.
        batch_size, fit_kwargs: the loop's batch size and optimizer (``optimizer``, ``lr``,
            ``weight_decay``, ...; Adam at 1e-3 by default, as the authors' code). Constant learning rate.

    Returns: a :class:`CrossLingualResult` (the student's history, its accuracy on ``val_loader``, the
    teacher's result when trained here, the teacher's logits on the corpus).
    """
    opt_kwargs = own_loop_kwargs(fit_kwargs, "cross_lingual_distill")
    if not (isinstance(train_loader, tuple) and len(train_loader) == 2):
        raise ValueError("cross_lingual_distill: train_loader must be the parallel corpus (source_side, target_side), "
                         f"two tensors with one row per pair; got {type(train_loader).__name__}")
    src = _check_pair("the parallel corpus's source side", train_loader[0])
    tgt = _check_pair("the parallel corpus's target side", train_loader[1])
    if src.shape[0] != tgt.shape[0]:
        raise ValueError(f"the parallel corpus's sides must pair row by row; got {src.shape[0]} and {tgt.shape[0]} rows")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be > 0; got {temperature!r}")
    if adversarial and target_unlabelled is None:
        raise ValueError("adversarial=True needs target_unlabelled: target-language documents (N_u, L_t) of the task")
    if adversarial:
        _check_pair("target_unlabelled", target_unlabelled)
    if teacher is None and (source_labelled is None or teacher_model is None):
        raise ValueError("cross_lingual_distill needs teacher= (a trained source-language classifier) or both "
                         "teacher_model= and source_labelled=(x, y) to train one")
    adv = dict(hidden=discriminator_hidden, dropout=discriminator_dropout, grl=grl_lambda, steps=discriminator_steps,
               lr=discriminator_lr)
    teacher_result = None
    if teacher is None:
        xs, ys = source_labelled  # type: ignore[misc]
        teacher = as_model(teacher_model, "cross_lingual_distill (teacher_model)")
        hook = _adversary(teacher, feature_tap, xs, src, seed=seed + 1, **adv) if adversarial else None
        teacher_result = train_in_memory(
            teacher, _check_pair("source_labelled inputs", xs), ys, F.cross_entropy, epochs=teacher_epochs or epochs,
            batch_size=batch_size, seed=seed + 1, progress=progress, what="cross-lingual teacher", before_step=hook,
            run_dir=None if run_dir is None else Path(run_dir) / "teacher", **opt_kwargs)
    t_logits = teacher_soft_logits(teacher, src)
    model = as_model(student, "cross_lingual_distill")
    hook = _adversary(model, feature_tap, tgt, target_unlabelled, seed=seed + 2, **adv) if adversarial else None
    result = train_in_memory(
        model, tgt, t_logits, lambda s, t: DF.cross_lingual_kd_loss(s, t, temperature), epochs=epochs,
        batch_size=batch_size, seed=seed, progress=progress, what="cross-lingual student", val_loader=val_loader,
        before_step=hook, run_dir=run_dir, **opt_kwargs)
    return CrossLingualResult(**vars(result), teacher_result=teacher_result, teacher_logits=t_logits)
