"""The small training loop shared by the cross-lingual, MSDN and KDDAug strategies (no registration here).

Each of them trains a model on in-memory inputs with a loss of its own (soft labels from a teacher, two
heads' mutual terms, a logit-adjusted cross-entropy), sometimes with a step of another player in between
(a domain discriminator): :func:`train_in_memory` is that loop, with a progress bar and per-epoch
validation, returning a :class:`~distill.train.FitResult`.
"""

from __future__ import annotations

import json
import time
import types
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from distill.files import atomic_write_text
from distill.progress import StepProgress
from distill.train import FitResult
from distill.train.evaluate import evaluate

__all__ = ["accuracy", "make_optimizer", "own_loop_kwargs", "train_in_memory"]

# fit()'s keyword arguments a recipe always passes: the loop below uses the optimizer's and ignores the rest
_OPTIMIZER_KEYS = ("optimizer", "lr", "momentum", "weight_decay", "nesterov")
_IGNORED_KEYS = ("schedule", "milestones", "gamma", "amp", "grad_clip", "deterministic", "device", "evaluator",
                 "fingerprint", "batch_size")


def own_loop_kwargs(fit_kwargs: dict[str, Any], who: str) -> dict[str, Any]:
    """The optimizer settings among ``fit_kwargs``; an error for ``resume`` and for any key the loop cannot honour."""
    if fit_kwargs.get("resume"):
        raise ValueError(f"{who} runs a loop of its own and cannot resume a run; start it again")
    unknown = sorted(set(fit_kwargs) - set(_OPTIMIZER_KEYS) - set(_IGNORED_KEYS) - {"resume"})
    if unknown:
        raise TypeError(f"{who}: unexpected keyword arguments {unknown}; its loop takes {list(_OPTIMIZER_KEYS)}")
    return {k: fit_kwargs[k] for k in _OPTIMIZER_KEYS if fit_kwargs.get(k) is not None}


def make_optimizer(params: Iterable[Tensor], optimizer: str = "adam", lr: float = 1e-3, momentum: float = 0.9,
                   weight_decay: float = 0.0, nesterov: bool = False) -> torch.optim.Optimizer:
    """``"adam"``, ``"adamw"``, ``"rmsprop"`` or ``"sgd"`` over ``params``."""
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be > 0; got {lr!r}")
    params = list(params)
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, weight_decay=weight_decay)
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    raise ValueError(f"optimizer must be 'adam', 'adamw', 'rmsprop' or 'sgd'; got {optimizer!r}")


def accuracy(model: nn.Module, loader: Iterable[Any] | None) -> float | None:
    """Top-1 accuracy (%) of ``model`` on ``loader`` (``(x, y)`` batches or Batches), None without a loader."""
    if loader is None:
        return None
    return evaluate(types.SimpleNamespace(student=model), loader, with_teacher=False)["student_acc"]


def train_in_memory(model: nn.Module, inputs: Tensor, targets: Tensor, loss_fn: Callable[[Any, Tensor], Tensor], *,
                    epochs: int, batch_size: int, seed: int, progress: bool, what: str,
                    val_loader: Iterable[Any] | None = None, evaluate_fn: Callable[[nn.Module], float | None] | None = None,
                    before_step: Callable[[Tensor, int], dict[str, float]] | None = None,
                    forward: Callable[[Tensor], Any] | None = None,
                    run_dir: str | Path | None = None, optimizer: str = "adam", lr: float = 1e-3,
                    momentum: float = 0.9, weight_decay: float = 0.0, nesterov: bool = False) -> FitResult:
    """Train ``model`` for ``epochs`` on ``inputs`` ``(N, ...)`` with ``loss_fn(forward(x), targets[idx])``
    (``forward`` defaults to ``model``; MSDN's returns both sub-nets' scores).

    Batches are drawn in a random order from ``seed``. ``before_step(idx, step)``, when given, runs
    before each step (another player's update: a domain discriminator) and returns numbers to log.
    After each epoch the model is scored by ``evaluate_fn(model)`` or, with ``val_loader``, its top-1
    accuracy; the history (one dict per epoch) is written to ``run_dir/history.json`` when given.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1; got {epochs!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1; got {batch_size!r}")
    if inputs.shape[0] == 0 or inputs.shape[0] != targets.shape[0]:
        raise ValueError(f"{what}: inputs and targets must be non-empty with one row each; got {tuple(inputs.shape)} "
                         f"and {tuple(targets.shape)}")
    opt = make_optimizer(model.parameters(), optimizer, lr, momentum, weight_decay, nesterov)
    g = torch.Generator().manual_seed(seed)
    n = inputs.shape[0]
    steps = -(-n // batch_size)
    result = FitResult(run_dir=Path(run_dir) if run_dir is not None else None)
    t0 = time.perf_counter()
    step = 0
    with StepProgress(progress, what, epochs * steps) as bar:
        for epoch in range(epochs):
            model.train()
            order = torch.randperm(n, generator=g)
            total, extra = 0.0, {}
            for start in range(0, n, batch_size):
                idx = order[start:start + batch_size]
                if before_step is not None:
                    extra = before_step(idx, step)
                loss = loss_fn((forward or model)(inputs[idx]), targets[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
                step += 1
                bar.advance(f"loss {float(loss.detach()):.3f}")
            score = evaluate_fn(model) if evaluate_fn is not None else accuracy(model, val_loader)
            row = {"epoch": epoch, "train_loss": total / n, **extra}
            if score is not None:
                row["val_student_acc"] = score
                if result.best_acc is None or score > result.best_acc:
                    result.best_acc, result.best_epoch = score, epoch
                result.last_acc = score
            result.history.append(row)
    result.time_s = time.perf_counter() - t0
    if run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(run_dir) / "history.json", json.dumps(result.history, indent=1))
    return result
