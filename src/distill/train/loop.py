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
from distill.data.augment import mix_seed
from distill.train import distributed as D
from distill.train.checkpoint import (
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from distill.train.evaluate import evaluate
from distill.train.schedules import Schedule, make_optimizer

__all__ = ["EpochLog", "EpochLosses", "FitProgress", "FitResult", "LabelRangeError", "NonFiniteLossError", "fit",
           "seed_everything"]

UNLABELED = -1  # the label of a sample without one (semi-supervised loaders); checks skip it


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
    """Every label in ``[0, num_classes)``; ``-1`` marks an unlabeled sample and is skipped."""
    if targets is None or num_classes is None or targets.numel() == 0:
        return
    targets = targets[targets != UNLABELED]
    if targets.numel() == 0:
        return
    lo, hi = int(targets.min()), int(targets.max())
    if lo < 0 or hi >= num_classes:
        bad = targets[(targets < 0) | (targets >= num_classes)].unique()[:10].tolist()
        raise LabelRangeError(
            f"labels out of range in {where}: found {bad}; the student has {num_classes} outputs, "
            f"so labels must lie in [0, {num_classes - 1}] (or be {UNLABELED} for an unlabeled sample)"
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
    ddp: bool | None = None,
    sync_bn: bool = False,
    find_unused_parameters: bool | None = None,
) -> FitResult:
    """Train ``distiller.student`` (and the methods' parts) for ``epochs`` epochs.

    Each epoch: ``set_epoch`` on the loader and the Distiller (warm-ups, curricula), one pass
    with the weighted losses, an evaluation on ``val_loader`` (student top-1, teacher top-1,
    agreement, mean KL to the teacher), one line of ``metrics.jsonl`` and a checkpoint
    ``checkpoints/last.pt`` in ``run_dir`` (plus ``best.pt`` holding the best student).
    Both the last-epoch and the best-epoch accuracy are recorded.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the same call trains with DistributedDataParallel
    (:mod:`distill.train.distributed`): the process group is initialised (gloo on CPU, nccl on
    CUDA, ``device="cuda"`` meaning ``cuda:LOCAL_RANK``), the student and the methods' parts are
    wrapped in one DDP module (the teacher never is: each rank runs its own), the training loader
    is sharded so that an InMemoryLoader's ``batch_size`` stays the global batch, the logged
    training losses are the global batch's, and only rank 0 evaluates, shows progress and writes
    ``metrics.jsonl`` and checkpoints (every rank returns the same :class:`FitResult`). With the
    same global batch and no BatchNorm or dropout in the student it trains the same weights as one
    process, up to floating-point summation order.

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
            A teacher source that changes during training (``static`` false: an EMA teacher,
            codistillation peers) is saved in ``last.pt`` and restored with it.
        seed, deterministic: seeding, and deterministic kernels (bit-exact resume on CPU).
        progress: show a progress bar.
        eval_teacher: also evaluate the teacher (accuracy, agreement, KL) each epoch.
        on_epoch_end: called with each epoch's metrics dict.
        ddp: ``None`` (default): DDP when launched with several processes; ``False``: each
            process trains on its own, whatever the launch (codistillation workers);
            ``True``: require a multi-process launch.
        sync_bn: under DDP, convert the student's BatchNorm layers to SyncBatchNorm (statistics
            over the global batch; GPU only, refused on CPU).
        find_unused_parameters: passed to DDP (default: on when a method has trainable parameters).

    Raises:
        NonFiniteLossError: a loss became NaN/inf; the message names the loss and the last good
            checkpoint stays as it was.
        LabelRangeError: a label outside ``[0, num_classes)`` (``-1``, unlabeled, is allowed).
    """
    if not isinstance(epochs, int) or epochs <= 0:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be a positive integer, got {checkpoint_every!r}")
    if grad_clip is not None and grad_clip <= 0:
        raise ValueError(f"grad_clip must be > 0 or None, got {grad_clip}")
    if ddp not in (None, True, False):
        raise ValueError(f"ddp must be None (automatic), True or False, got {ddp!r}")
    info = D.dist_info() if ddp is not False else D.DistInfo()
    if ddp is True and not info.enabled:
        raise ValueError("ddp=True needs a multi-process launch (torchrun --nproc_per_node=N ...), but WORLD_SIZE is 1")
    previous_determinism = torch.are_deterministic_algorithms_enabled()
    seed_everything(seed, deterministic)
    try:
        return _fit(distiller, train_loader, val_loader, epochs=epochs, optimizer=optimizer, lr=lr,
                    momentum=momentum, weight_decay=weight_decay, nesterov=nesterov, schedule=schedule,
                    milestones=milestones, gamma=gamma, amp=amp, grad_clip=grad_clip, device=device,
                    run_dir=run_dir, resume=resume, progress=progress, eval_teacher=eval_teacher,
                    on_epoch_end=on_epoch_end, checkpoint_every=checkpoint_every, info=info, seed=seed,
                    sync_bn=sync_bn, find_unused_parameters=find_unused_parameters)
    finally:
        if deterministic and not previous_determinism:
            torch.use_deterministic_algorithms(False)  # the mode was this run's, not the process's


def _load_resume(resume: bool | str | Path, ckpt_dir: Path | None, device: torch.device,
                 info: D.DistInfo) -> dict[str, Any] | None:
    """The checkpoint to resume from (``None``: start afresh); under DDP rank 0 reads it and
    broadcasts it, so the other ranks need not see the file."""
    path = Path(resume) if not isinstance(resume, bool) else (ckpt_dir / "last.pt" if ckpt_dir else None)
    if path is None:
        raise ValueError("resume=True needs run_dir (or pass the checkpoint path as resume)")
    if not info.enabled:
        if path.is_file():
            return load_checkpoint(path, map_location=device)
        if not isinstance(resume, bool):
            raise FileNotFoundError(f"resume checkpoint {str(path)!r} does not exist")
        return None
    state, error = None, None
    if info.is_main:
        if path.is_file():
            state = load_checkpoint(path, map_location="cpu")
        elif not isinstance(resume, bool):
            error = f"resume checkpoint {str(path)!r} does not exist"
    state, error = D.broadcast_object((state, error))
    if error is not None:
        raise FileNotFoundError(error)
    return state


def _fit(distiller: Any, train_loader: Iterable[Any], val_loader: Iterable[Any] | None, *, epochs: int,
         optimizer: str, lr: float, momentum: float, weight_decay: float, nesterov: bool, schedule: str,
         milestones: Sequence[int] | None, gamma: float, amp: bool | str, grad_clip: float | None,
         device: str | torch.device | None, run_dir: str | Path | None, resume: bool | str | Path,
         progress: bool, eval_teacher: bool, on_epoch_end: Callable[[dict[str, Any]], None] | None,
         checkpoint_every: int, info: D.DistInfo, seed: int, sync_bn: bool,
         find_unused_parameters: bool | None) -> FitResult:
    device = torch.device(device) if device is not None else next(distiller.student.parameters()).device
    if info.enabled:
        device = D.resolve_device(device, info)
        info = D.init_distributed(device)
        if sync_bn:
            D.convert_sync_batchnorm(distiller, device)  # before DDP and the optimizer; refuses the CPU
    distiller.to(device)
    run_path = Path(run_dir) if run_dir is not None else None

    all_targets = getattr(train_loader, "targets", None)
    # the range of the batches' sample indices: per-sample state has one row for each (DDP keeps it in step)
    num_samples = int(all_targets.shape[0]) if isinstance(all_targets, torch.Tensor) else \
        getattr(train_loader, "index_space", None)
    if isinstance(all_targets, torch.Tensor) and hasattr(distiller, "bind_data"):
        distiller.bind_data(int(all_targets.shape[0]), all_targets)
    example = _first_batch(train_loader).to(device)
    distiller.prepare(example)
    num_classes = distiller.num_classes
    if isinstance(all_targets, torch.Tensor):
        _check_labels(all_targets, num_classes, "the training set")
    if val_loader is not None and isinstance(getattr(val_loader, "targets", None), torch.Tensor):
        _check_labels(val_loader.targets, num_classes, "the validation set")

    with D.shard_loader(train_loader, info):  # this rank's part of every global batch (no-op alone)
        steps_per_epoch = len(train_loader) if hasattr(train_loader, "__len__") else 1  # type: ignore[arg-type]
        opt = make_optimizer(distiller.trainable_parameters(), optimizer, lr=lr, momentum=momentum,
                             weight_decay=weight_decay, nesterov=nesterov)
        sched = Schedule(opt, schedule, epochs=epochs, steps_per_epoch=steps_per_epoch,
                         milestones=milestones, gamma=gamma)
        amp_dtype = _resolve_amp(amp, device)
        scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None

        result = FitResult(run_dir=run_path)
        log = EpochLog(result, run_path, write=info.is_main)
        start_epoch = 0
        teacher = distiller.teacher
        changing_teacher = teacher is not None and not getattr(teacher, "static", False)
        if resume:
            state = _load_resume(resume, log.checkpoint_dir, device, info)
            if state is not None:
                distiller.load_trainable_state_dict(state["distiller"])
                if changing_teacher and state.get("teacher") is not None:
                    teacher.load_state_dict(state["teacher"])
                opt.load_state_dict(state["optimizer"])
                sched.load_state_dict(state["schedule"])
                if scaler is not None and state.get("scaler"):
                    scaler.load_state_dict(state["scaler"])
                set_rng_state(state["rng"])
                start_epoch = int(state["epoch"]) + 1
                result.history = list(state["history"])
                result.best_acc, result.best_epoch = state.get("best_acc"), state.get("best_epoch")
        log.begin()
        stepper: Any = distiller
        if info.enabled:
            stepper = D.DDPDistiller(distiller, num_samples, find_unused_parameters)
            if info.rank > 0:  # dropout and other noise: each rank its own stream, rank 0 the single-process one
                _reseed(mix_seed(seed, info.rank, start_epoch))

        # a frozen teacher gives the same validation logits every epoch: compute them once
        static_val = getattr(teacher, "static", False) and getattr(val_loader, "shuffle", True) is False \
            and getattr(val_loader, "augment", None) is None
        teacher_cache: list[torch.Tensor] | None = [] if static_val else None
        bar = FitProgress(progress and info.is_main, epochs, steps_per_epoch)
        try:
            for epoch in range(start_epoch, epochs):
                t0 = time.perf_counter()
                D.set_loader_epoch(train_loader, epoch)
                distiller.set_epoch(epoch, epochs)
                distiller.train()
                losses = EpochLosses(device)
                bar.start_epoch(epoch)
                for step, raw in enumerate(train_loader):
                    batch = as_batch(raw).to(device, non_blocking=True)
                    if epoch == start_epoch and not isinstance(all_targets, torch.Tensor):
                        _check_labels(batch.targets, num_classes, f"training batch {step}")
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        out = stepper(batch)
                    share = 1.0  # this rank's part of the step's global batch
                    if info.enabled:
                        n_global, bad = D.step_sizes(len(batch), ~torch.isfinite(out.total.detach()), device)
                        share = len(batch) / n_global
                    else:
                        bad = not torch.isfinite(out.total)
                    if bad:
                        _raise_non_finite(out, epoch, step, log.checkpoint_dir)
                    # DDP averages the ranks' gradients with equal weights: scaling each rank's mean
                    # by W * n_r / n makes that average the gradient of the global batch's mean
                    loss = out.total * (share * info.world_size) if share * info.world_size != 1.0 else out.total
                    opt.zero_grad(set_to_none=True)
                    if scaler is not None:
                        scaler.scale(loss).backward()
                        if grad_clip is not None:
                            scaler.unscale_(opt)
                            torch.nn.utils.clip_grad_norm_(list(distiller.trainable_parameters()), grad_clip)
                        scaler.step(opt)
                        scaler.update()
                    else:
                        loss.backward()
                        if grad_clip is not None:
                            torch.nn.utils.clip_grad_norm_(list(distiller.trainable_parameters()), grad_clip)
                        opt.step()
                    if info.enabled:
                        stepper.step_end(batch.index)
                    else:
                        distiller.step_end()
                    sched.step_batch()
                    losses.add(out.total, out.parts, share)
                    bar.advance(float(out.total) if bar.wants_loss(step) else None)
                epoch_lr = opt.param_groups[0]["lr"]  # the rate the epoch trained at (its last step's)
                sched.step_epoch()
                row: dict[str, Any] = {"epoch": epoch, "lr": epoch_lr, **losses.means(info.enabled)}
                for name, m in distiller.methods.items():
                    for key, value in getattr(m, "log_values", dict)().items():
                        row[f"{name}_{key}"] = value
                if val_loader is not None and info.is_main:
                    row.update({f"val_{k}": v for k, v in evaluate(
                        distiller, val_loader, device, with_teacher=eval_teacher and teacher is not None,
                        teacher_cache=teacher_cache).items()})
                row["time_s"] = time.perf_counter() - t0
                if info.enabled:
                    row = D.broadcast_object(row)  # rank 0's evaluation and method logs on every rank
                # the methods' parts too: a method's predictor (SimKD's projector) is part of the model
                log.end_epoch(row, lambda: {"student": distiller.student.state_dict(),
                                            "methods": distiller.methods.state_dict()})
                bar.end_epoch(row)
                if log.write and ((epoch + 1) % checkpoint_every == 0 or epoch + 1 == epochs):
                    save_checkpoint(log.checkpoint_dir / "last.pt", {  # type: ignore[operator]
                        "epoch": epoch,
                        "distiller": distiller.trainable_state_dict(),
                        "teacher": teacher.state_dict() if changing_teacher else None,
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
            del stepper  # DDP's gradient hooks go with it: a later fit of the same student starts clean
    if info.enabled:
        D.sync_rng_from_main()  # what a caller draws next (a strategy's next stage) is the same on every rank
        D.barrier()  # every rank leaves once rank 0 has written its files
    if result.history and result.last_acc is None:
        result.last_acc = result.history[-1].get("val_student_acc")
    return result


def _reseed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _raise_non_finite(out: Any, epoch: int, step: int, ckpt_dir: Path | None) -> None:
    bad = {k: float(v) for k, v in out.parts.items() if not math.isfinite(float(v))}
    where = ", ".join(f"{k}={v}" for k, v in bad.items()) if bad else (
        "the total" if not math.isfinite(float(out.total)) else "on another rank")
    last = ckpt_dir / "last.pt" if ckpt_dir is not None and (ckpt_dir / "last.pt").exists() else None
    raise NonFiniteLossError(
        f"loss became non-finite at epoch {epoch} step {step}: {where}; the step was not applied. "
        + (f"Last good checkpoint: {last}" if last else "No checkpoint was written yet.")
    )


class EpochLosses:
    """An epoch's mean training losses, for ``fit`` and training loops of their own.

    :meth:`add` takes each step's total and parts (scalar tensors) weighted by ``share``, this rank's
    part of the step's global batch (1 alone); :meth:`means` sums the ranks' shares under DDP (one
    all-reduce) and returns ``train_loss`` and ``train_<part>``, averaged over the steps. The sums
    stay on the device: no step waits for them.
    """

    def __init__(self, device: torch.device) -> None:
        self.total = torch.zeros((), device=device)
        self.parts: dict[str, torch.Tensor] = {}
        self.steps = 0

    def add(self, total: torch.Tensor, parts: dict[str, torch.Tensor], share: float = 1.0) -> None:
        self.total += total.detach().float() * share
        for k, v in parts.items():
            v = v.detach().float() * share
            self.parts[k] = self.parts[k] + v if k in self.parts else v
        self.steps += 1

    def means(self, distributed: bool = False) -> dict[str, float]:
        if self.steps == 0:
            raise ValueError("the training loader yielded no batch")
        total, parts = self.total, self.parts
        if distributed:  # every rank's share of each step: the global batch's losses
            keys = list(parts)
            summed = D.all_reduce_sum(torch.stack([total, *(parts[k] for k in keys)]))
            total, parts = summed[0], dict(zip(keys, summed[1:]))
        return {"train_loss": float(total) / self.steps, **{f"train_{k}": float(v) / self.steps
                                                             for k, v in parts.items()}}


class EpochLog:
    """``fit``'s end-of-epoch bookkeeping, for training loops of their own.

    :meth:`begin` (re)writes ``run_dir/metrics.jsonl`` from ``result.history`` (a resumed run
    never keeps lines of the epochs it redoes). :meth:`end_epoch` takes one epoch's metrics row:
    when it has ``val_student_acc`` it updates ``result.last_acc`` and the best epoch
    (``result.best_acc``, ``result.best_epoch``; ties keep the earlier epoch), writes
    ``checkpoints/best.pt`` when the accuracy improved, and sets ``row["best_acc"]``; then it
    appends the row to ``result.history`` and to ``metrics.jsonl``.

    Args:
        result: the :class:`FitResult` being filled.
        run_dir: the run folder (``None``: nothing is written, the tracking still happens).
        write: ``False`` on processes that must not write (ranks other than 0).
    """

    def __init__(self, result: FitResult, run_dir: str | Path | None = None, *, write: bool = True) -> None:
        self.result = result
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.write = bool(write) and self.run_dir is not None

    @property
    def checkpoint_dir(self) -> Path | None:
        """``run_dir/checkpoints`` (``None`` without a run folder)."""
        return self.run_dir / "checkpoints" if self.run_dir is not None else None

    def begin(self) -> None:
        """Create the run folder and write ``metrics.jsonl`` afresh from the history so far."""
        if self.write:
            self.run_dir.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
            with open(self.run_dir / "metrics.jsonl", "w") as f:  # type: ignore[operator]
                f.writelines(json.dumps(row) + "\n" for row in self.result.history)

    def end_epoch(self, row: dict[str, Any], best_state: Callable[[], dict[str, Any]] | None = None) -> bool:
        """Record one epoch's ``row`` (with its ``"epoch"``); returns whether it is the new best.

        ``best_state()`` gives what ``best.pt`` holds besides ``epoch`` and ``val_student_acc``
        (e.g. ``{"student": model.state_dict()}``); it is only called when the file is written.
        """
        result, improved = self.result, False
        if "val_student_acc" in row:
            acc = row["val_student_acc"]
            result.last_acc = acc
            if result.best_acc is None or acc > result.best_acc:
                improved = True
                result.best_acc, result.best_epoch = acc, row.get("epoch")
                if self.write and best_state is not None:
                    save_checkpoint(self.checkpoint_dir / "best.pt",  # type: ignore[operator]
                                    {**best_state(), "epoch": row.get("epoch"), "val_student_acc": acc})
            row["best_acc"] = result.best_acc
        result.history.append(row)
        if self.write:
            with open(self.run_dir / "metrics.jsonl", "a") as f:  # type: ignore[operator]
                f.write(json.dumps(row) + "\n")
        return improved


class FitProgress:
    """The rich progress bar of ``fit`` over all steps of a run (silent when disabled); loops of
    their own use it too: ``start_epoch``, ``advance`` per step, ``end_epoch``, ``close``."""

    def __init__(self, enabled: bool, epochs: int, steps_per_epoch: int) -> None:
        self.enabled = enabled
        self.epochs = epochs
        self.steps = steps_per_epoch
        self._progress = None
        if enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"),
                BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                TextColumn("{task.fields[acc]}"), TimeRemainingColumn(), transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task("train", total=epochs * steps_per_epoch, epoch=0,
                                                 epochs=epochs, loss="-", acc="")

    def wants_loss(self, step: int) -> bool:
        """Whether step ``step``'s loss is shown (every 10th: reading it syncs a GPU)."""
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


_Progress = FitProgress  # the former private name (strategies/online.py imports it)
