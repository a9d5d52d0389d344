"""``distill.fit``: the training loop we ship around a :class:`~distill.Distiller`."""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill.batch import Batch, as_batch
from distill.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from distill.train.evaluate import evaluate
from distill.train.schedules import Schedule, make_optimizer


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; training stopped before the bad step was applied."""


class LabelRangeError(ValueError):
    """A target label outside ``[0, num_classes)``."""


@dataclass
class FitResult:
    """What :func:`fit` returns; ``history`` holds one metrics dict per epoch."""

    history: list[dict[str, Any]] = field(default_factory=list)
    best_acc: float | None = None
    best_epoch: int | None = None
    last_acc: float | None = None
    run_dir: Path | None = None


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; in deterministic mode also ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def _resolve_amp(amp: bool | str, device: torch.device) -> torch.dtype | None:
    """``"auto"``: bf16 (or fp16 with a grad scaler) on CUDA, off on CPU; ``True`` = auto but also CPU bf16."""
    if amp in (False, None, "off", "none"):
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    if amp in ("auto", True):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if amp is True else None
    raise ValueError(f"amp must be 'auto', True, False, 'bf16' or 'fp16', got {amp!r}")


def _check_labels(targets: torch.Tensor | None, num_classes: int | None, where: str) -> None:
    if targets is None or num_classes is None or targets.numel() == 0:
        return
    lo, hi = int(targets.min()), int(targets.max())
    if lo < 0 or hi >= num_classes:
        bad = targets[(targets < 0) | (targets >= num_classes)].unique()[:10].tolist()
        raise LabelRangeError(
            f"labels out of range in {where}: found {bad}; the student has {num_classes} outputs, "
            f"so labels must lie in [0, {num_classes - 1}]"
        )


def _first_batch(loader: Iterable[Any]) -> Batch:
    for raw in loader:
        return as_batch(raw)
    raise ValueError("the training loader yielded no batch")


def fit(
    distiller: Any,
    train_loader: Iterable[Any],
    val_loader: Iterable[Any] | None = None,
    *,
    epochs: int,
    optimizer: str = "sgd",
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    nesterov: bool = False,
    schedule: str = "multistep",
    milestones: Sequence[int] | None = None,
    gamma: float = 0.1,
    amp: bool | str = "auto",
    grad_clip: float | None = None,
    device: str | torch.device | None = None,
    run_dir: str | Path | None = None,
    resume: bool | str | Path = False,
    seed: int = 0,
    deterministic: bool = False,
    progress: bool = True,
    eval_teacher: bool = True,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
    checkpoint_every: int = 1,
) -> FitResult:
    """Train ``distiller.student`` (and the methods' parts) for ``epochs`` epochs.

    Each epoch: ``set_epoch`` on the loader and the Distiller (warm-ups, curricula), one pass
    with the weighted losses, an evaluation on ``val_loader`` (student top-1, teacher top-1,
    agreement, mean KL to the teacher), one line of ``metrics.jsonl`` and a checkpoint
    ``checkpoints/last.pt`` in ``run_dir`` (plus ``best.pt`` holding the best student).
    Both the last-epoch and the best-epoch accuracy are recorded.

    Args:
        distiller: a :class:`~distill.Distiller`.
        train_loader: yields batches (tuples, mappings or :class:`~distill.batch.Batch`);
            ``set_epoch(e)`` is called on it when it has one (deterministic order per epoch).
        val_loader: evaluated after each epoch, when given.
        epochs: number of epochs (> 0).
        optimizer: ``"sgd"``, ``"adam"`` or ``"adamw"``; ``lr``, ``momentum``, ``weight_decay``,
            ``nesterov`` configure it.
        schedule: ``"multistep"`` (``milestones`` in epochs, ``gamma``), ``"cosine"``,
            ``"onecycle"`` or ``"constant"``.
        amp: mixed precision: ``"auto"`` (on for CUDA), ``True``, ``False``, ``"bf16"``, ``"fp16"``.
        grad_clip: clip the global gradient norm to this value.
        device: where to train (default: the student's device).
        run_dir: folder for metrics and checkpoints (nothing is written when ``None``).
        resume: ``True`` to continue from ``run_dir/checkpoints/last.pt``, or a checkpoint path.
        seed, deterministic: seeding, and deterministic kernels (bit-exact resume on CPU).
        progress: show a progress bar.
        eval_teacher: also evaluate the teacher (accuracy, agreement, KL) each epoch.
        on_epoch_end: called with each epoch's metrics dict.

    Raises:
        NonFiniteLossError: a loss became NaN/inf; the message names the loss and the last good
            checkpoint stays as it was.
        LabelRangeError: a label outside ``[0, num_classes)``.
    """
    if not isinstance(epochs, int) or epochs <= 0:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be a positive integer, got {checkpoint_every!r}")
    if grad_clip is not None and grad_clip <= 0:
        raise ValueError(f"grad_clip must be > 0 or None, got {grad_clip}")
    previous_determinism = torch.are_deterministic_algorithms_enabled()
    seed_everything(seed, deterministic)
    try:
        return _fit(distiller, train_loader, val_loader, epochs=epochs, optimizer=optimizer, lr=lr,
                    momentum=momentum, weight_decay=weight_decay, nesterov=nesterov, schedule=schedule,
                    milestones=milestones, gamma=gamma, amp=amp, grad_clip=grad_clip, device=device,
                    run_dir=run_dir, resume=resume, progress=progress, eval_teacher=eval_teacher,
                    on_epoch_end=on_epoch_end, checkpoint_every=checkpoint_every)
    finally:
        if deterministic and not previous_determinism:
            torch.use_deterministic_algorithms(False)  # the mode was this run's, not the process's


def _fit(distiller: Any, train_loader: Iterable[Any], val_loader: Iterable[Any] | None, *, epochs: int,
         optimizer: str, lr: float, momentum: float, weight_decay: float, nesterov: bool, schedule: str,
         milestones: Sequence[int] | None, gamma: float, amp: bool | str, grad_clip: float | None,
         device: str | torch.device | None, run_dir: str | Path | None, resume: bool | str | Path,
         progress: bool, eval_teacher: bool, on_epoch_end: Callable[[dict[str, Any]], None] | None,
         checkpoint_every: int) -> FitResult:
    device = torch.device(device) if device is not None else next(distiller.student.parameters()).device
    distiller.to(device)
    run_path = Path(run_dir) if run_dir is not None else None

    all_targets = getattr(train_loader, "targets", None)
    if isinstance(all_targets, torch.Tensor) and hasattr(distiller, "bind_data"):
        distiller.bind_data(int(all_targets.shape[0]), all_targets)
    example = _first_batch(train_loader).to(device)
    distiller.prepare(example)
    num_classes = distiller.num_classes
    if isinstance(all_targets, torch.Tensor):
        _check_labels(all_targets, num_classes, "the training set")
    if val_loader is not None and isinstance(getattr(val_loader, "targets", None), torch.Tensor):
        _check_labels(val_loader.targets, num_classes, "the validation set")

    steps_per_epoch = len(train_loader) if hasattr(train_loader, "__len__") else 1  # type: ignore[arg-type]
    opt = make_optimizer(distiller.trainable_parameters(), optimizer, lr=lr, momentum=momentum,
                         weight_decay=weight_decay, nesterov=nesterov)
    sched = Schedule(opt, schedule, epochs=epochs, steps_per_epoch=steps_per_epoch,
                     milestones=milestones, gamma=gamma)
    amp_dtype = _resolve_amp(amp, device)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None

    result = FitResult(run_dir=run_path)
    start_epoch = 0
    ckpt_dir = run_path / "checkpoints" if run_path is not None else None
    if resume:
        path = Path(resume) if not isinstance(resume, bool) else (ckpt_dir / "last.pt" if ckpt_dir else None)
        if path is None:
            raise ValueError("resume=True needs run_dir (or pass the checkpoint path as resume)")
        if path.is_file():
            state = load_checkpoint(path, map_location=device)
            distiller.load_trainable_state_dict(state["distiller"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["schedule"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            set_rng_state(state["rng"])
            start_epoch = int(state["epoch"]) + 1
            result.history = list(state["history"])
            result.best_acc, result.best_epoch = state.get("best_acc"), state.get("best_epoch")
        elif not isinstance(resume, bool):
            raise FileNotFoundError(f"resume checkpoint {str(path)!r} does not exist")
    if run_path is not None:
        run_path.mkdir(parents=True, exist_ok=True)
        # rewrite the metrics file from the (possibly resumed) history so it never holds lines
        # of epochs that the resumed run will redo
        with open(run_path / "metrics.jsonl", "w") as f:
            for row in result.history:
                f.write(json.dumps(row) + "\n")

    # a frozen teacher gives the same validation logits every epoch: compute them once
    static_val = getattr(distiller.teacher, "static", False) and getattr(val_loader, "shuffle", True) is False \
        and getattr(val_loader, "augment", None) is None
    teacher_cache: list[torch.Tensor] | None = [] if static_val else None
    bar = _Progress(progress, epochs, steps_per_epoch)
    try:
        for epoch in range(start_epoch, epochs):
            t0 = time.perf_counter()
            if hasattr(train_loader, "set_epoch"):
                train_loader.set_epoch(epoch)
            distiller.set_epoch(epoch, epochs)
            distiller.train()
            sums: dict[str, torch.Tensor] = {}
            total_sum = torch.zeros((), device=device)
            n_steps = 0
            bar.start_epoch(epoch)
            for step, raw in enumerate(train_loader):
                batch = as_batch(raw).to(device, non_blocking=True)
                if epoch == start_epoch and not isinstance(all_targets, torch.Tensor):
                    _check_labels(batch.targets, num_classes, f"training batch {step}")
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    out = distiller(batch)
                if not torch.isfinite(out.total):
                    bad = {k: float(v) for k, v in out.parts.items() if not math.isfinite(float(v))}
                    last = ckpt_dir / "last.pt" if ckpt_dir is not None and (ckpt_dir / "last.pt").exists() else None
                    raise NonFiniteLossError(
                        f"loss became non-finite at epoch {epoch} step {step}: "
                        f"{', '.join(f'{k}={v}' for k, v in bad.items()) or 'the total'}; "
                        "the step was not applied. "
                        + (f"Last good checkpoint: {last}" if last else "No checkpoint was written yet.")
                    )
                opt.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(out.total).backward()
                    if grad_clip is not None:
                        scaler.unscale_(opt)
                        torch.nn.utils.clip_grad_norm_(list(distiller.trainable_parameters()), grad_clip)
                    scaler.step(opt)
                    scaler.update()
                else:
                    out.total.backward()
                    if grad_clip is not None:
                        torch.nn.utils.clip_grad_norm_(list(distiller.trainable_parameters()), grad_clip)
                    opt.step()
                distiller.step_end()
                sched.step_batch()
                total_sum += out.total.detach()
                for k, v in out.parts.items():
                    sums[k] = sums[k] + v if k in sums else v.clone()
                n_steps += 1
                bar.advance(float(out.total) if bar.wants_loss(step) else None)
            epoch_lr = opt.param_groups[0]["lr"]  # the rate the epoch trained at (its last step's)
            sched.step_epoch()
            if n_steps == 0:
                raise ValueError("the training loader yielded no batch")
            row: dict[str, Any] = {
                "epoch": epoch,
                "lr": epoch_lr,
                "train_loss": float(total_sum) / n_steps,
                **{f"train_{k}": float(v) / n_steps for k, v in sums.items()},
            }
            for name, m in distiller.methods.items():
                for key, value in getattr(m, "log_values", lambda: {})().items():
                    row[f"{name}_{key}"] = value
            if val_loader is not None:
                row.update({f"val_{k}": v for k, v in evaluate(
                    distiller, val_loader, device, with_teacher=eval_teacher and distiller.teacher is not None,
                    teacher_cache=teacher_cache).items()})
                acc = row["val_student_acc"]
                result.last_acc = acc
                if result.best_acc is None or acc > result.best_acc:
                    result.best_acc, result.best_epoch = acc, epoch
                    if ckpt_dir is not None:
                        # the methods' parts too: a method's predictor (SimKD's projector) is part of the model
                        save_checkpoint(ckpt_dir / "best.pt", {"student": distiller.student.state_dict(),
                                                              "methods": distiller.methods.state_dict(),
                                                              "epoch": epoch, "val_student_acc": acc})
                row["best_acc"] = result.best_acc
            row["time_s"] = time.perf_counter() - t0
            result.history.append(row)
            bar.end_epoch(row)
            if run_path is not None:
                with open(run_path / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
            if ckpt_dir is not None and ((epoch + 1) % checkpoint_every == 0 or epoch + 1 == epochs):
                save_checkpoint(ckpt_dir / "last.pt", {
                    "epoch": epoch,
                    "distiller": distiller.trainable_state_dict(),
                    "optimizer": opt.state_dict(),
                    "schedule": sched.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "rng": rng_state(),
                    "history": result.history,
                    "best_acc": result.best_acc,
                    "best_epoch": result.best_epoch,
                })
            if on_epoch_end is not None:
                on_epoch_end(row)
    finally:
        bar.close()
    if result.history and result.last_acc is None:
        result.last_acc = result.history[-1].get("val_student_acc")
    return result


class _Progress:
    """A rich progress bar over all steps of the run; silent when disabled."""

    def __init__(self, enabled: bool, epochs: int, steps_per_epoch: int) -> None:
        self.enabled = enabled
        self.epochs = epochs
        self.steps = steps_per_epoch
        self._progress = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"),
                BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                TextColumn("{task.fields[acc]}"), TimeRemainingColumn(), transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task("train", total=epochs * steps_per_epoch, epoch=0,
                                                 epochs=epochs, loss="-", acc="")

    def wants_loss(self, step: int) -> bool:
        return self.enabled and step % 10 == 0

    def start_epoch(self, epoch: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, epoch=epoch + 1, completed=epoch * self.steps)

    def advance(self, loss: float | None) -> None:
        if self._progress is not None:
            fields = {"loss": f"{loss:.4f}"} if loss is not None else {}
            self._progress.update(self._task, advance=1, **fields)

    def end_epoch(self, row: dict[str, Any]) -> None:
        if self._progress is not None and "val_student_acc" in row:
            self._progress.update(self._task, acc=f"val acc {row['val_student_acc']:.2f}%")

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
