"""``fit`` of a net that wraps the student (teachers fused in, features injected), with the student evaluated
*alone* after every epoch: the strategies whose training net is not the deployed model (knowledge flow,
knowledge projection) report the accuracy of what is deployed."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from torch import nn

from distill.train.distributed import is_main_process
from distill.train.evaluate import evaluate
from distill.train.loop import EpochLog, FitResult, fit

__all__ = ["fit_evaluating_student_alone"]


def fit_evaluating_student_alone(distiller: Any, student: nn.Module, train_loader: Iterable[Any],
                                 val_loader: Iterable[Any] | None, *, epochs: int, run_dir: str | Path | None,
                                 seed: int, progress: bool, **fit_kwargs: Any) -> tuple[FitResult, list[float]]:
    """``fit(distiller, ...)``; after each epoch ``student`` alone is evaluated on ``val_loader``, its top-1 added
    to the epoch's row as ``val_independent_acc`` (a caller's ``on_epoch_end`` runs after). Returns fit's
    result and the per-epoch accuracies of the student alone (empty without ``val_loader``)."""
    user_callback = fit_kwargs.pop("on_epoch_end", None)
    alone: list[float] = []

    def on_epoch_end(row: dict[str, Any]) -> None:
        if val_loader is not None:
            device = next(student.parameters()).device
            acc = evaluate(SimpleNamespace(student=student), val_loader, device, with_teacher=False)["student_acc"]
            row["val_independent_acc"] = acc  # the row is the one fit keeps in its history
            alone.append(acc)
        if user_callback is not None:
            user_callback(row)

    result = fit(distiller, train_loader, val_loader, epochs=epochs, run_dir=run_dir, seed=seed, progress=progress,
                 on_epoch_end=on_epoch_end, **fit_kwargs)
    # fit logged each row before on_epoch_end added the student-alone accuracy: write them again, complete
    EpochLog(result, run_dir, write=is_main_process()).begin()
    return result, alone
