"""Optimizers and learning-rate schedules, chosen by name."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("multistep", "cosine", "onecycle", "constant")


def make_optimizer(
    params: Iterable[nn.Parameter],
    name: str = "sgd",
    *,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    nesterov: bool = False,
) -> torch.optim.Optimizer:
    """SGD (with momentum), Adam or AdamW over ``params``."""
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    params = list(params)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}")


class Schedule:
    """A learning-rate schedule that the loop steps per batch or per epoch.

    ``multistep``: lr × gamma at each epoch in ``milestones`` (default 50%, 75% of the run);
    ``cosine``: cosine annealing per step to 0; ``onecycle``: Smith's one-cycle policy per step
    with peak ``lr``; ``constant``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        name: str,
        *,
        epochs: int,
        steps_per_epoch: int,
        milestones: Sequence[int] | None = None,
        gamma: float = 0.1,
    ) -> None:
        if name not in SCHEDULES:
            raise ValueError(f"unknown schedule {name!r}; expected one of {SCHEDULES}")
        self.name = name
        total = max(1, epochs * steps_per_epoch)
        if name == "multistep":
            # default: decay at 50% and 75% of the run; de-duplicated, since MultiStepLR applies a
            # milestone listed twice twice, and dropped when a short run rounds it to epoch 0
            ms = list(milestones) if milestones is not None else \
                sorted({m for m in (int(epochs * 0.5), int(epochs * 0.75)) if m >= 1})
            bad = [m for m in ms if not 0 < m <= epochs]
            if bad:
                raise ValueError(f"milestones {bad} lie outside 1..{epochs} (epochs)")
            if any(b <= a for a, b in zip(ms, ms[1:])):  # MultiStepLR applies a repeated milestone twice
                raise ValueError(f"milestones must be strictly increasing epochs, got {ms}")
            self.per_step = False
            self.scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, ms, gamma=gamma)
        elif name == "cosine":
            self.per_step = True
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        elif name == "onecycle":
            self.per_step = True
            max_lr = [g["lr"] for g in optimizer.param_groups]
            self.scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=total)
        else:
            self.per_step = False
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)

    def step_batch(self) -> None:
        if self.per_step:
            self.scheduler.step()

    def step_epoch(self) -> None:
        if not self.per_step:
            self.scheduler.step()

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)
