"""What the adversarial-KD loops share (``adversarial_kd``, ``kdgan``): the logit discriminator, the
optimizer settings a recipe's ``train:`` block passes, labelled batches, and per-epoch evaluation."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.batch import as_batch
from distill.distiller import Distiller
from distill.train import FitResult, evaluate
from distill.train.schedules import OPTIMIZERS, make_optimizer

__all__ = ["LogitDiscriminator", "build_optimizer", "check_weight", "eval_row", "finish", "labelled_batches",
           "optimizer_settings"]

# a recipe's ``train:`` keys that these loops do not use (their own loop: no schedule, AMP or checkpoints)
_IGNORED = ("nesterov", "schedule", "milestones", "gamma", "amp", "grad_clip", "deterministic", "device", "resume",
            "fingerprint")


def optimizer_settings(who: str, train: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``optimizer``, ``lr``, ``momentum``, ``weight_decay`` from a recipe's ``train:`` keywords over
    ``defaults``; the keys in ``_IGNORED`` are dropped; anything else is an error naming it."""
    unknown = sorted(set(train) - {"optimizer", "lr", "momentum", "weight_decay", *_IGNORED})
    if unknown:
        raise TypeError(f"{who}: unexpected arguments {unknown}")
    out = {**defaults, **{k: train[k] for k in ("optimizer", "lr", "momentum", "weight_decay") if k in train}}
    if out["optimizer"] not in OPTIMIZERS:
        raise ValueError(f"{who}: optimizer must be one of {OPTIMIZERS}; got {out['optimizer']!r}")
    return out


def build_optimizer(params: Iterable[nn.Parameter], settings: dict[str, Any], lr: float | None = None
                    ) -> torch.optim.Optimizer:
    """:func:`~distill.train.schedules.make_optimizer` from :func:`optimizer_settings`' dict."""
    return make_optimizer(params, settings["optimizer"], lr=lr if lr is not None else settings["lr"],
                          momentum=settings.get("momentum", 0.9), weight_decay=settings.get("weight_decay", 0.0))


def check_weight(who: str, name: str, value: Any, low: float = 0.0, high: float | None = None) -> float:
    """A float in ``[low, high]``; a clear error naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= low or \
            (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{who}: {name} must be a number {bound}; got {value!r}")
    return float(value)


def labelled_batches(loader: Iterable[Any], who: str) -> Iterator[tuple[Tensor, Tensor]]:
    """``(inputs, targets)`` of each batch; an error when a batch has no labels."""
    for raw in loader:
        b = as_batch(raw)
        if b.targets is None:
            raise ValueError(f"{who} needs labelled batches (the discriminator is conditioned on the label): a batch "
                             "has no targets")
        yield b.inputs, b.targets.long()


class LogitDiscriminator(nn.Module):
    """A multilayer perceptron on logits: ``(B, K)`` logits (and, conditioned, the one-hot label
    ``(B, K)`` concatenated to them) → a real/fake logit ``(B,)`` and, with ``aux=True``, an auxiliary
    head's class logits ``(B, K)``.

    Hidden layers: Linear → LeakyReLU(0.2) per width of ``hidden`` (ours: the paper's discriminator
    width could not be read here)."""

    def __init__(self, num_classes: int, hidden: Sequence[int] = (128, 128), condition: bool = True,
                 aux: bool = True) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"LogitDiscriminator: num_classes must be an int >= 2; got {num_classes!r}")
        widths = [int(h) for h in hidden]
        if not widths or any(h < 1 for h in widths):
            raise ValueError(f"LogitDiscriminator: hidden must be positive widths; got {hidden!r}")
        self.num_classes, self.condition = num_classes, bool(condition)
        layers: list[nn.Module] = []
        width = num_classes * (2 if self.condition else 1)
        for h in widths:
            layers += [nn.Linear(width, h), nn.LeakyReLU(0.2)]
            width = h
        self.body = nn.Sequential(*layers)
        self.adv = nn.Linear(width, 1)
        self.cls = nn.Linear(width, num_classes) if aux else None

    def forward(self, logits: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"LogitDiscriminator: logits must be (B, {self.num_classes}); got {tuple(logits.shape)}")
        x = logits
        if self.condition:
            if targets is None:
                raise ValueError("LogitDiscriminator: a conditioned discriminator needs the labels")
            x = torch.cat([logits, F.one_hot(targets.long(), self.num_classes).to(logits.dtype)], dim=1)
        h = self.body(x)
        return self.adv(h)[:, 0], (self.cls(h) if self.cls is not None else None)


def eval_row(student: nn.Module, teacher: nn.Module | None, val_loader: Any, epoch: int, t0: float,
             extra: dict[str, float]) -> dict[str, Any]:
    """One history row: :func:`~distill.train.evaluate`'s metrics (the teacher's from a frozen copy, so
    a teacher that trains stays trainable), the epoch, the time since ``t0`` and ``extra``."""
    t = copy.deepcopy(teacher) if teacher is not None else None
    metrics = evaluate(Distiller(student, t, {"ce": 1.0}), val_loader) if val_loader is not None else {}
    return {"epoch": epoch, "time_s": time.perf_counter() - t0, **extra, **metrics}


def finish(result: FitResult, t0: float) -> FitResult:
    """Last / best accuracy and time of a history filled by :func:`eval_row`."""
    accs = [r["student_acc"] for r in result.history if "student_acc" in r]
    if accs:
        result.last_acc, result.best_acc = accs[-1], max(accs)
        result.best_epoch = result.history[accs.index(result.best_acc)]["epoch"]
    result.time_s = time.perf_counter() - t0
    return result
