"""``distill.fit``: the training loop we ship around a :class:`~distill.Distiller`."""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill.batch import Batch, DenseBatch, as_batch
from distill.data.augment import mix_seed
from distill.data.loader import check_finite
from distill.files import atomic_write_text
from distill.train import distributed as D
from distill.train import fsdp as F
from distill.train.checkpoint import (
    CheckpointError,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from distill.train.evaluate import evaluate
from distill.train.loggers import Logger, check_loggers, close_loggers, log_row, make_loggers
from distill.train.rundir import (
    check_epochs,
    check_fingerprint,
    default_fingerprint,
    elapsed_so_far,
    normalize_fingerprint,
    open_run_dir,
)
from distill.teachers import require_device
from distill.train.schedules import Schedule, make_optimizer

__all__ = ["EpochLog", "EpochLosses", "FitProgress", "FitResult", "LabelRangeError", "NonFiniteLossError", "fit",
           "seed_everything"]

UNLABELED = -1  # the label of a sample without one (semi-supervised loaders); checks skip it
IGNORE_TOKEN = -100  # a token label without loss (padding, prompt), the Hugging Face convention


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
    time_s: float | None = None  # training time over every session of the run (a resumed one included)


CUBLAS_WORKSPACE = ":4096:8"  # what cuBLAS needs for deterministic results (CUDA >= 10.2)


def set_cublas_workspace_config() -> None:
    """Set ``CUBLAS_WORKSPACE_CONFIG`` (when unset) for deterministic cuBLAS kernels.

    cuBLAS reads it once, when this process first uses it: ``fit(deterministic=True)`` and the
    recipe runner call this before anything touches CUDA, but a process that already ran a
    matrix product on the GPU keeps its workspace, so set the variable in the environment
    (``CUBLAS_WORKSPACE_CONFIG=:4096:8``) before starting such a process. A warning says so when
    CUDA was already started without it.
    """
    if "CUBLAS_WORKSPACE_CONFIG" in os.environ:
        return
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        import warnings

        warnings.warn("deterministic training: CUDA was started in this process before CUBLAS_WORKSPACE_CONFIG was "
                      f"set; if cuBLAS already ran, its kernels may stay non-deterministic. Set "
                      f"CUBLAS_WORKSPACE_CONFIG={CUBLAS_WORKSPACE} in the environment before the process starts.",
                      RuntimeWarning, stacklevel=3)
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; in deterministic mode also require deterministic kernels.

    ``deterministic=True`` is strict: ``torch.use_deterministic_algorithms(True)`` makes an operation
    without a deterministic implementation raise (naming the operation) instead of warning, cuDNN's
    autotuner is off and its deterministic kernels on, and ``CUBLAS_WORKSPACE_CONFIG`` is set
    (:func:`set_cublas_workspace_config`). This changes process-wide settings; :func:`fit` restores
    the caller's afterwards.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        set_cublas_workspace_config()
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


@dataclass
class _CallerState:
    """What ``fit`` changes process-wide and gives back: the random states of Python, NumPy and torch
    (CUDA too), the deterministic-algorithms mode (and its ``warn_only``) and cuDNN's flags."""

    rng: dict[str, Any]
    deterministic: bool
    warn_only: bool
    cudnn_benchmark: bool
    cudnn_deterministic: bool

    @classmethod
    def capture(cls) -> _CallerState:
        return cls(rng_state(), torch.are_deterministic_algorithms_enabled(),
                   torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.benchmark,
                   torch.backends.cudnn.deterministic)

    def restore(self) -> None:
        set_rng_state(self.rng)
        torch.use_deterministic_algorithms(self.deterministic, warn_only=self.warn_only)
        torch.backends.cudnn.benchmark = self.cudnn_benchmark
        torch.backends.cudnn.deterministic = self.cudnn_deterministic


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
    """Every label in ``[0, num_classes)``; ``-1`` marks an unlabeled sample and is skipped, and so
    does ``-100`` in a token batch's labels (``(B, L)``: a position without loss, the Hugging Face way)."""
    if targets is None or num_classes is None or targets.numel() == 0:
        return
    tokens = targets.dim() >= 2
    targets = targets[(targets != UNLABELED) & ((targets != IGNORE_TOKEN) | (not tokens))]
    if targets.numel() == 0:
        return
    lo, hi = int(targets.min()), int(targets.max())
    if lo < 0 or hi >= num_classes:
        bad = targets[(targets < 0) | (targets >= num_classes)].unique()[:10].tolist()
        raise LabelRangeError(
            f"labels out of range in {where}: found {bad}; the student has {num_classes} outputs, "
            f"so labels must lie in [0, {num_classes - 1}] (or be {UNLABELED} for an unlabeled sample"
            + (f", {IGNORE_TOKEN} for a token without loss)" if tokens else ")")
        )


def _first_batch(loader: Iterable[Any]) -> Batch:
    for raw in loader:
        return as_batch(raw)
    inputs = getattr(loader, "inputs", None)
    held = f" (it holds {int(inputs.shape[0])} samples)" if isinstance(inputs, torch.Tensor) else ""
    raise ValueError(f"the training loader yielded no batch{held}: an empty data set, or drop_last with fewer "
                     "samples than batch_size")


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
    overwrite: bool = False,
    fingerprint: Mapping[str, Any] | None = None,
    seed: int = 0,
    deterministic: bool = False,
    progress: bool = True,
    eval_teacher: bool = True,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
    checkpoint_every: int = 1,
    ddp: bool | None = None,
    fsdp: bool = False,
    sync_bn: bool = False,
    find_unused_parameters: bool | None = None,
    loggers: Sequence[Any] | None = None,
    nan_check_every: int | None = None,
    batch_transform: Callable[[Batch], Batch] | None = None,
    evaluator: Callable[..., dict[str, float]] | None = None,
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
        run_dir: folder for metrics and checkpoints (nothing is written when ``None``). It is
            locked for the run (:class:`~distill.locks.RunLock`: a second process writing it gets
            ``RunLockedError`` naming this one's pid) and never silently replaced: a folder that
            already holds results is refused (``RunFolderError``) unless ``resume`` or ``overwrite``.
        resume: ``True`` to continue from ``run_dir/checkpoints/last.pt``, or a checkpoint path.
            With nothing in ``run_dir`` the run starts afresh; results there without ``last.pt``
            raise ``ResumeError``. The checkpoint must carry this run's ``fingerprint``, else
            ``SpecMismatchError`` names each differing field; ``epochs`` may differ (extend or cut a
            run) only when no more epochs are done and the schedule does not depend on the number
            (``constant``, or ``multistep`` with explicit ``milestones``).
        overwrite: replace the results in ``run_dir``: the folder is cleared first, so no stale
            ``best.pt`` or metrics line survives. Excludes ``resume``.
        fingerprint: the settings that determine this run's result, stored in ``last.pt`` and
            ``best.pt`` and compared on resume (a recipe passes its validated fields). Default
            (:func:`~distill.train.rundir.default_fingerprint`): ``optimizer``, ``lr``, ``momentum``,
            ``weight_decay``, ``nesterov``, ``schedule``, ``milestones``, ``gamma``, ``amp``,
            ``grad_clip``, ``seed``, ``sync_bn``, the student's parameter names and shapes, and each
            loss's method, weight and parts' shapes. What may change on resume is left out:
            ``device``, ``progress``, ``eval_teacher``, ``on_epoch_end``, ``checkpoint_every``,
            ``deterministic`` (kernel choice), ``ddp``, ``find_unused_parameters``, and ``epochs``
            (checked on its own, see ``resume``).
            A teacher source that changes during training (``static`` false: an EMA teacher,
            codistillation peers) is saved in ``last.pt`` and restored with it.
        seed, deterministic: seeding, and deterministic kernels (bit-exact resume on CPU).
            ``deterministic=True`` is strict (:func:`seed_everything`): an operation without a
            deterministic implementation raises, naming it. ``fit`` sets ``CUBLAS_WORKSPACE_CONFIG``
            before it touches CUDA, which is too late in a process that already used cuBLAS: set it
            in the environment then. Random state: ``fit`` seeds Python, NumPy and torch with
            ``seed`` for the run and afterwards gives back the caller's random states, its
            deterministic-algorithms mode and cuDNN flags as they were, whether it returns or raises
            (what the caller draws after ``fit`` does not depend on how long it trained).
        progress: show a progress bar.
        eval_teacher: also evaluate the teacher (accuracy, agreement, KL) each epoch.
        on_epoch_end: called with each epoch's metrics dict.
        ddp: ``None`` (default): DDP when launched with several processes; ``False``: each
            process trains on its own, whatever the launch (codistillation workers);
            ``True``: require a multi-process launch.
        fsdp: shard the student with FSDP2 instead of DDP (:mod:`distill.train.fsdp`: ``fully_shard`` on
            each transformer block, then the root); needs a multi-process launch. Every rank evaluates
            (the sharded student runs only with all ranks), and checkpoints hold the full (unsharded)
            state dicts gathered on rank 0, so a saved student loads without FSDP.
        sync_bn: under DDP, convert the student's BatchNorm layers to SyncBatchNorm (statistics
            over the global batch; GPU only, refused on CPU).
        find_unused_parameters: passed to DDP (default: on when a method has trainable parameters).
        loggers: where each epoch's metrics row goes besides ``metrics.jsonl``, with the epoch as
            the step (main process only; closed at the end): ``"tensorboard"`` (``RUN_DIR/tensorboard``),
            ``"mlflow"``, ``{"name": ..., **options}`` or :class:`~distill.train.loggers.Logger` objects
            (:mod:`distill.train.loggers`; the packages are the ``log`` extra).

        nan_check_every: how often (in steps) the loss and gradient-norm checks are read back.
            Every step adds a device-side NaN/inf flag (no synchronisation); the flag is read every
            ``nan_check_every`` steps and at the end of each epoch. Default: 1 on the CPU and under
            DDP (reading costs nothing there: DDP synchronises every step anyway), 50 on an
            accelerator. The gradient norm is checked too (``clip_grad_norm_``'s, or one
            ``get_total_norm`` per step without ``grad_clip``), except under fp16's gradient scaler.
        batch_transform: applied to each training batch after it is moved to the device, before the
            step (e.g. :class:`distill.strategies.gkd.OnPolicy`, which replaces completions by the
            student's samples); ``set_epoch(epoch)`` is called on it at each epoch start when it has one.
            The example batch of ``prepare`` and the validation batches are not transformed.
        evaluator: what evaluates on ``val_loader`` each epoch instead of :func:`evaluate` (whose
            top-1 suits classifiers): ``evaluator(distiller, val_loader, device, with_teacher=bool)
            -> dict[str, float]``, logged with a ``val_`` prefix. Its ``"student_acc"`` entry is the
            task's headline score in %, higher is better (a detector's mAP, a segmenter's mIoU:
            :mod:`distill.train.dense_eval`), which picks ``best.pt`` and ``best_acc``.

    Raises:
        NonFiniteLossError: a loss, or the gradient norm (a NaN gradient from a finite loss), became
            NaN/inf; the message names the first bad step, the loss (or the parameters whose
            gradients are non-finite), says fp16 when fp16 autocast is on, and names the last good
            checkpoint, which stays as it was. State of the model then: when the check runs every
            step (``nan_check_every=1``, the CPU default) the bad step was never applied, so the
            weights are those after the last good step. With ``nan_check_every=N > 1`` up to N-1
            updates may have followed the bad step: ``fit`` then reloads the student, the methods'
            parts, the optimizer and the schedule from ``run_dir/checkpoints/last.pt`` before
            raising, so the model is the last good checkpoint's; without a checkpoint the weights
            are not usable (the message says so). Under fp16 with the gradient scaler, steps with
            non-finite gradients are skipped by the scaler and never reach the weights.
        LabelRangeError: a label outside ``[0, num_classes)`` (``-1``, unlabeled, is allowed).
        NonFiniteInputError: NaN/inf in the training or validation inputs (all of an in-memory
            loader's, or the first batch of another loader), before any training.
        RuntimeError: ``device`` does not exist on this machine (before any work).
    """
    if not isinstance(epochs, int) or epochs <= 0:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be a positive integer, got {checkpoint_every!r}")
    if grad_clip is not None and grad_clip <= 0:
        raise ValueError(f"grad_clip must be > 0 or None, got {grad_clip}")
    if ddp not in (None, True, False):
        raise ValueError(f"ddp must be None (automatic), True or False, got {ddp!r}")
    if evaluator is not None and not callable(evaluator):
        raise TypeError(f"evaluator must be a callable (distiller, loader, device, with_teacher=...) -> dict, got {evaluator!r}")
    if batch_transform is not None and not callable(batch_transform):
        raise TypeError(f"batch_transform must be a callable Batch -> Batch or None, got {batch_transform!r}")
    if fsdp not in (True, False) or (fsdp and ddp is False):
        raise ValueError(f"fsdp must be True or False and excludes ddp=False, got fsdp={fsdp!r}, ddp={ddp!r}")
    info = D.dist_info() if ddp is not False else D.DistInfo()
    if fsdp and not info.enabled:
        raise ValueError("fsdp=True needs a multi-process launch (torchrun --nproc_per_node=N ...), but WORLD_SIZE is 1")
    if ddp is True and not info.enabled:
        raise ValueError("ddp=True needs a multi-process launch (torchrun --nproc_per_node=N ...), but WORLD_SIZE is 1")
    check_loggers(loggers, run_dir=run_dir)  # unknown name, absent package: before any work
    if nan_check_every is not None and (isinstance(nan_check_every, bool) or not isinstance(nan_check_every, int)
                                        or nan_check_every < 1):
        raise ValueError(f"nan_check_every must be a positive integer or None, got {nan_check_every!r}")
    if device is not None:  # a CPU-only build asked for 'cuda', a typo: before any work
        device = require_device(device, "device")
    if deterministic:
        set_cublas_workspace_config()  # before this run touches CUDA (cuBLAS reads it once)
    caller = _CallerState.capture()  # given back at the end: fit leaves no global state changed
    seed_everything(seed, deterministic)
    try:
        with ExitStack() as run_dir_lock:  # the run folder's lock, held until fit returns or raises
            result = _fit(distiller, train_loader, val_loader, epochs=epochs, optimizer=optimizer, lr=lr,
                          momentum=momentum, weight_decay=weight_decay, nesterov=nesterov, schedule=schedule,
                          milestones=milestones, gamma=gamma, amp=amp, grad_clip=grad_clip, device=device,
                          run_dir=run_dir, resume=resume, progress=progress, eval_teacher=eval_teacher,
                          on_epoch_end=on_epoch_end, checkpoint_every=checkpoint_every, info=info, seed=seed,
                          sync_bn=sync_bn, find_unused_parameters=find_unused_parameters, overwrite=overwrite,
                          fingerprint=fingerprint, run_dir_lock=run_dir_lock, loggers=loggers,
                          nan_check_every=nan_check_every, fsdp=fsdp,
                          batch_transform=batch_transform, evaluator=evaluator)
    finally:
        caller.restore()  # the random states, deterministic mode and cuDNN flags the caller had
    if info.enabled:
        D.sync_rng_from_main()  # what a caller draws next (a strategy's next stage) is the same on every rank
    return result


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
            try:
                state = load_checkpoint(path, map_location="cpu")
            except CheckpointError as e:  # damaged or unsafe: every rank raises it, none waits forever
                error = e
        elif not isinstance(resume, bool):
            error = f"resume checkpoint {str(path)!r} does not exist"
    state, error = D.broadcast_object((state, error))
    if isinstance(error, CheckpointError):
        raise error
    if error is not None:
        raise FileNotFoundError(error)
    return state


def _fit(distiller: Any, train_loader: Iterable[Any], val_loader: Iterable[Any] | None, *, epochs: int,
         optimizer: str, lr: float, momentum: float, weight_decay: float, nesterov: bool, schedule: str,
         milestones: Sequence[int] | None, gamma: float, amp: bool | str, grad_clip: float | None,
         device: str | torch.device | None, run_dir: str | Path | None, resume: bool | str | Path,
         progress: bool, eval_teacher: bool, on_epoch_end: Callable[[dict[str, Any]], None] | None,
         checkpoint_every: int, info: D.DistInfo, seed: int, sync_bn: bool,
         find_unused_parameters: bool | None, overwrite: bool = False,
         fingerprint: Mapping[str, Any] | None = None, run_dir_lock: ExitStack | None = None,
         loggers: Sequence[Any] | None = None, nan_check_every: int | None = None,
         fsdp: bool = False, batch_transform: Callable[[Batch], Batch] | None = None,
         evaluator: Callable[..., dict[str, float]] | None = None) -> FitResult:
    device = torch.device(device) if device is not None else next(distiller.student.parameters()).device
    if info.enabled:
        device = D.resolve_device(device, info)
        info = D.init_distributed(device)
        if sync_bn:
            D.convert_sync_batchnorm(distiller, device)  # before DDP and the optimizer; refuses the CPU
    distiller.to(device)
    run_path = Path(run_dir) if run_dir is not None else None
    # before any work: lock the folder, clear it (overwrite), refuse results it would replace
    open_run_dir(run_path, resume=resume, overwrite=overwrite, info=info,
                 stack=run_dir_lock if run_dir_lock is not None else ExitStack())

    all_targets = getattr(train_loader, "targets", None)
    # the range of the batches' sample indices: per-sample state has one row for each (DDP keeps it in step)
    num_samples = int(all_targets.shape[0]) if isinstance(all_targets, torch.Tensor) else \
        getattr(train_loader, "index_space", None)
    if isinstance(all_targets, torch.Tensor) and hasattr(distiller, "bind_data"):
        distiller.bind_data(int(all_targets.shape[0]), all_targets)
    # NaN/inf inputs: all of an in-memory data set once, else the first batch (before any work)
    in_memory = isinstance(getattr(train_loader, "inputs", None), torch.Tensor)
    check_finite(getattr(train_loader, "inputs", None), "the training set (train_loader.inputs)")
    if val_loader is not None:
        check_finite(getattr(val_loader, "inputs", None), "the validation set (val_loader.inputs)")
    example = _first_batch(train_loader).to(device)
    if not in_memory:
        check_finite(example.inputs, "the first training batch")
    distiller.prepare(example)
    num_classes = distiller.num_classes
    spec = normalize_fingerprint(fingerprint) if fingerprint is not None else default_fingerprint(distiller, dict(
        optimizer=optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
        schedule=schedule, milestones=milestones, gamma=gamma, amp=amp, grad_clip=grad_clip, seed=seed,
        sync_bn=sync_bn))
    if isinstance(all_targets, torch.Tensor):
        _check_labels(all_targets, num_classes, "the training set")
    if val_loader is not None and isinstance(getattr(val_loader, "targets", None), torch.Tensor):
        _check_labels(val_loader.targets, num_classes, "the validation set")

    # FSDP shards the student in place (its parameters become DTensor shards): before the optimizer
    sharded = F.FSDPDistiller(distiller, num_samples) if fsdp else None
    with D.shard_loader(train_loader, info):  # this rank's part of every global batch (no-op alone)
        steps_per_epoch = len(train_loader) if hasattr(train_loader, "__len__") else 1  # type: ignore[arg-type]
        opt = make_optimizer(distiller.trainable_parameters(), optimizer, lr=lr, momentum=momentum,
                             weight_decay=weight_decay, nesterov=nesterov)
        sched = Schedule(opt, schedule, epochs=epochs, steps_per_epoch=steps_per_epoch,
                         milestones=milestones, gamma=gamma)
        amp_dtype = _resolve_amp(amp, device)
        scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
        params = list(distiller.trainable_parameters())
        # reading a flag costs nothing on the CPU, nor under DDP (which agrees on the step's size every step)
        every = nan_check_every if nan_check_every is not None else (1 if device.type == "cpu" or info.enabled else 50)
        named_params = [(f"{prefix}.{n}", p) for prefix, module in (("student", distiller.student),
                                                                    ("methods", distiller.methods))
                        for n, p in module.named_parameters() if p.requires_grad]

        def restore_training_state(state: dict[str, Any]) -> None:  # a resume, or a rollback after a NaN
            if fsdp:  # full tensors in the file: each rank keeps its shards
                F.load_full_state_dict(distiller.student, state["distiller"]["student"])
                distiller.methods.load_state_dict(state["distiller"]["methods"])
                F.load_full_optimizer_state_dict(distiller.student, opt, state["optimizer"])
            else:
                distiller.load_trainable_state_dict(state["distiller"])
                opt.load_state_dict(state["optimizer"])
            if changing_teacher and state.get("teacher") is not None:
                teacher.load_state_dict(state["teacher"])
            sched.load_state_dict(state["schedule"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])

        def rollback() -> Path | None:  # bad updates were applied: back to the last good checkpoint
            last = log.checkpoint_dir / "last.pt" if log.checkpoint_dir is not None else None
            if last is None or not last.is_file():
                return None
            restore_training_state(load_checkpoint(last, map_location=device))
            return last

        watch = _NonFiniteWatch(device, every, named_params, rollback)

        result = FitResult(run_dir=run_path)
        log = EpochLog(result, run_path, write=info.is_main,
                       loggers=make_loggers(loggers, run_path) if info.is_main else ())
        start_epoch = 0
        elapsed_before = 0.0  # training time of the sessions before a resume
        teacher = distiller.teacher
        changing_teacher = teacher is not None and not getattr(teacher, "static", False)
        if resume:
            state = _load_resume(resume, log.checkpoint_dir, device, info)
            if state is not None:
                where = resume if not isinstance(resume, bool) else log.checkpoint_dir / "last.pt"  # type: ignore[operator]
                check_fingerprint(state, spec, where)
                check_epochs(state, epochs, schedule, milestones, where)
                elapsed_before = elapsed_so_far(state)
                restore_training_state(state)
                set_rng_state(state["rng"])
                start_epoch = int(state["epoch"]) + 1
                result.history = list(state["history"])
                result.best_acc, result.best_epoch = state.get("best_acc"), state.get("best_epoch")
        log.begin()
        stepper: Any = distiller
        if info.enabled:
            stepper = sharded or D.DDPDistiller(distiller, num_samples, find_unused_parameters)
            if info.rank > 0:  # dropout and other noise: each rank its own stream, rank 0 the single-process one
                _reseed(mix_seed(seed, info.rank, start_epoch))

        # a frozen teacher gives the same validation logits every epoch: compute them once
        static_val = getattr(teacher, "static", False) and getattr(val_loader, "shuffle", True) is False \
            and getattr(val_loader, "augment", None) is None
        teacher_cache: list[torch.Tensor] | None = [] if static_val else None
        bar = FitProgress(progress and info.is_main, epochs, steps_per_epoch)
        scale = scaler.get_scale() if scaler is not None else 1.0  # the gradient scaler's, after a resume too
        session_t0 = time.perf_counter()
        try:
            for epoch in range(start_epoch, epochs):
                t0 = time.perf_counter()
                D.set_loader_epoch(train_loader, epoch)
                distiller.set_epoch(epoch, epochs)
                if batch_transform is not None and hasattr(batch_transform, "set_epoch"):
                    batch_transform.set_epoch(epoch)
                distiller.train()
                losses = EpochLosses(device)
                bar.start_epoch(epoch)
                for step, raw in enumerate(train_loader):
                    batch = as_batch(raw).to(device, non_blocking=True)
                    if batch_transform is not None:
                        batch = batch_transform(batch)
                    # a DenseBatch's targets are masks, not classes of the student's logits
                    if epoch == start_epoch and not isinstance(all_targets, torch.Tensor) \
                            and not isinstance(batch, DenseBatch):
                        _check_labels(batch.targets, num_classes, f"training batch {step}")
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        out = stepper(batch)
                    share = 1.0  # this rank's part of the step's global batch
                    if info.enabled:  # the ranks agree on a bad loss now (one collective per step anyway)
                        n_global, bad = D.step_sizes(len(batch), ~torch.isfinite(out.total.detach()), device)
                        share = len(batch) / n_global
                        if bad:
                            _raise_non_finite(out, epoch, step, log.checkpoint_dir, amp_dtype)
                    # DDP averages the ranks' gradients with equal weights: scaling each rank's mean
                    # by W * n_r / n makes that average the gradient of the global batch's mean
                    loss = out.total * (share * info.world_size) if share * info.world_size != 1.0 else out.total
                    opt.zero_grad(set_to_none=True)
                    stepped = True
                    if scaler is not None:  # non-finite gradients are the scaler's to skip: loss checked only
                        scaler.scale(loss).backward()
                        if grad_clip is not None:
                            scaler.unscale_(opt)
                            torch.nn.utils.clip_grad_norm_(params, grad_clip)
                        watch.observe(step, None if info.enabled else out, None)
                        if watch.due(step):
                            watch.check(epoch, step, log.checkpoint_dir, amp_dtype)
                        scaler.step(opt)
                        scaler.update()
                        # update() lowers the scale exactly when step() skipped the update; reading it
                        # costs no extra wait: step() has read the scaler's inf flags back already
                        new_scale = scaler.get_scale()
                        stepped, scale = new_scale >= scale, new_scale
                    else:
                        loss.backward()
                        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip) if grad_clip is not None else \
                            torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
                        if fsdp:  # a DTensor over the shards: the global norm, on every rank
                            norm = norm.full_tensor()
                        watch.observe(step, None if info.enabled else out, norm)
                        if watch.due(step):
                            watch.check(epoch, step, log.checkpoint_dir, amp_dtype)
                        opt.step()
                    if info.enabled:
                        stepper.step_end(batch.index)
                    else:
                        distiller.step_end()
                    if stepped:  # a step the scaler skipped moves no schedule either
                        sched.step_batch()
                    losses.add(out.total, out.parts, share)
                    bar.advance(float(out.total.detach()) if bar.wants_loss(step) else None)
                watch.check(epoch, None, log.checkpoint_dir, amp_dtype)  # before eval and checkpoint
                epoch_lr = opt.param_groups[0]["lr"]  # the rate the epoch trained at (its last step's)
                sched.step_epoch()
                row: dict[str, Any] = {"epoch": epoch, "lr": epoch_lr, **losses.means(info.enabled)}
                for name, m in distiller.methods.items():
                    for key, value in getattr(m, "log_values", dict)().items():
                        row[f"{name}_{key}"] = value
                if val_loader is not None and (info.is_main or fsdp):  # the sharded student needs every rank
                    with_teacher = eval_teacher and teacher is not None
                    scores = (evaluate(distiller, val_loader, device, with_teacher=with_teacher,
                                       teacher_cache=teacher_cache) if evaluator is None
                              else evaluator(distiller, val_loader, device, with_teacher=with_teacher))
                    row.update({f"val_{k}": v for k, v in scores.items()})
                row["time_s"] = time.perf_counter() - t0
                if info.enabled:
                    row = D.broadcast_object(row)  # rank 0's evaluation and method logs on every rank
                # the methods' parts too: a method's predictor (SimKD's projector) is part of the model
                saving = log.checkpoint_dir is not None and ((epoch + 1) % checkpoint_every == 0 or epoch + 1 == epochs)
                if fsdp and log.checkpoint_dir is not None:  # gathered by every rank (collectives), written
                    trainable = {"student": F.full_state_dict(distiller.student),  # by rank 0: ordinary dicts
                                 "methods": distiller.methods.state_dict()}
                    opt_state = F.full_optimizer_state_dict(distiller.student, opt) if saving else None
                log.end_epoch(row, lambda: {"student": trainable["student"] if fsdp else distiller.student.state_dict(),
                                            "methods": distiller.methods.state_dict(), "fingerprint": spec})
                bar.end_epoch(row)
                if log.write and saving:
                    save_checkpoint(log.checkpoint_dir / "last.pt", {  # type: ignore[operator]
                        "epoch": epoch,
                        "distiller": trainable if fsdp else distiller.trainable_state_dict(),
                        "teacher": teacher.state_dict() if changing_teacher else None,
                        "optimizer": opt_state if fsdp else opt.state_dict(),
                        "schedule": sched.state_dict(),
                        "scaler": scaler.state_dict() if scaler is not None else None,
                        "rng": rng_state(),
                        "history": result.history,
                        "best_acc": result.best_acc,
                        "best_epoch": result.best_epoch,
                        "fingerprint": spec,  # what resume checks: this run's settings
                        "epochs": epochs,
                        "elapsed_s": elapsed_before + time.perf_counter() - session_t0,
                    })
                if on_epoch_end is not None:
                    on_epoch_end(row)
        finally:
            bar.close()
            del stepper  # DDP's gradient hooks go with it: a later fit of the same student starts clean
            log.close()
        result.time_s = elapsed_before + time.perf_counter() - session_t0
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


FP16_HINT = (" This happened under fp16 autocast: float16 overflows above 65504 (a large logit, a sum of "
             "squares); train with amp='bf16' or amp=False, or lower the scale of the values.")


def _raise_non_finite(out: Any, epoch: int, step: int, ckpt_dir: Path | None,
                      amp_dtype: torch.dtype | None = None) -> None:
    bad = {k: float(v) for k, v in out.parts.items() if not math.isfinite(float(v))}
    where = ", ".join(f"{k}={v}" for k, v in bad.items()) if bad else (
        "the total" if not math.isfinite(float(out.total)) else "on another rank")
    last = ckpt_dir / "last.pt" if ckpt_dir is not None and (ckpt_dir / "last.pt").exists() else None
    raise NonFiniteLossError(
        f"loss became non-finite at epoch {epoch} step {step}: {where}; the step was not applied. "
        + (f"Last good checkpoint: {last}" if last else "No checkpoint was written yet.")
        + (FP16_HINT if amp_dtype == torch.float16 else "")
    )


class _NonFiniteWatch:
    """The loss's and the gradient norm's NaN/inf flags, kept on the device and read every ``every`` steps.

    :meth:`observe` adds a step's flags without synchronising (a few tiny kernels); it remembers the
    first bad step of the window, its loss values and which check failed. :meth:`check` reads the
    flag (one synchronisation) and raises :class:`NonFiniteLossError`; when updates were applied
    after the bad step (``every > 1``, or the end-of-epoch check) it calls ``rollback`` first, which
    reloads the last checkpoint and returns its path (``None`` without one).
    """

    def __init__(self, device: torch.device, every: int, named_params: Sequence[tuple[str, torch.Tensor]],
                 rollback: Callable[[], Path | None]) -> None:
        self.device, self.every, self.named_params, self.rollback = device, every, named_params, rollback
        self._reset()

    def _reset(self) -> None:
        self._false = z = torch.zeros((), dtype=torch.bool, device=self.device)
        self.bad, self.loss_bad, self.grad_bad = z, z, z
        self.first_step: torch.Tensor | int = torch.full((), -1, dtype=torch.long, device=self.device)
        self.values: dict[str, torch.Tensor] = {}
        self._out: Any = None  # with every == 1: the step's output, whose losses the message names
        self.observed = False

    def observe(self, step: int, out: Any, grad_norm: torch.Tensor | None) -> None:
        """Add one step: ``out`` (a :class:`DistillOutput`, or ``None`` when the loss is checked elsewhere)
        and the gradient norm (``None``: not checked, e.g. under the gradient scaler)."""
        z = self._false
        loss_bad = torch.logical_not(torch.isfinite(out.total.detach())) if out is not None else z
        grad_bad = torch.logical_not(torch.isfinite(grad_norm.detach())) if grad_norm is not None else z
        step_bad = loss_bad | grad_bad
        if self.every == 1:  # read at once: keep this step's flags, no bookkeeping kernels
            self.bad, self.loss_bad, self.grad_bad, self.observed = step_bad, loss_bad, grad_bad, True
            self.first_step, self._out = step, out
            return
        new = step_bad & ~self.bad  # the window's first bad step
        self.first_step = torch.where(new, step, self.first_step)
        self.loss_bad = torch.where(new, loss_bad, self.loss_bad)
        self.grad_bad = torch.where(new, grad_bad, self.grad_bad)
        if out is not None:
            for k, v in {"total": out.total, **out.parts}.items():
                v = v.detach().float()
                self.values[k] = torch.where(new, v, self.values[k]) if k in self.values else torch.where(new, v, 0.0)
        self.bad = self.bad | step_bad
        self.observed = True

    def due(self, step: int) -> bool:
        return (step + 1) % self.every == 0

    def check(self, epoch: int, step: int | None, ckpt_dir: Path | None, amp_dtype: torch.dtype | None) -> None:
        """Read the flags; raise naming the first bad step. ``step``: the step about to be applied
        (``None`` at the end of the epoch, when every observed step was applied)."""
        if not self.observed:
            return
        if not bool(self.bad):
            if self.every == 1:  # observe() replaces every flag next step: nothing to clear
                self.observed, self._out = False, None
            else:
                self._reset()
            return
        first = int(self.first_step)
        applied = step is None or first < step
        if self._out is not None:
            self.values = {"total": self._out.total.detach(), **self._out.parts}
        if bool(self.loss_bad):
            parts = {k: float(v) for k, v in self.values.items() if k != "total"}
            bad = {k: v for k, v in parts.items() if not math.isfinite(v)}
            what = "loss became non-finite: " + (", ".join(f"{k}={v}" for k, v in bad.items()) if bad else
                                                 f"the total={float(self.values.get('total', float('nan')))}")
        else:
            grads = [n for n, p in self.named_params
                     if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
            shown = ", ".join(grads[:8]) + (f" and {len(grads) - 8} more" if len(grads) > 8 else "")
            what = ("the gradient became non-finite although the loss was finite (a NaN/inf in a backward "
                    "pass): " + (f"non-finite gradients in {shown}" if grads and not applied else
                                 f"non-finite gradients in {shown} at the check" if grads else
                                 "the parameters are no longer known (rerun with nan_check_every=1 to name them)"))
        if not applied:
            last = ckpt_dir / "last.pt" if ckpt_dir is not None and (ckpt_dir / "last.pt").exists() else None
            state = "the step was not applied. " + (f"Last good checkpoint: {last}" if last else
                                                   "No checkpoint was written yet.")
        else:
            done = f"step {step}" if step is not None else "the end of the epoch"
            restored = self.rollback()
            state = (f"found at {done} (checks every {self.every} steps): the model was reloaded from the last good "
                     f"checkpoint {restored}" if restored is not None else
                     f"found at {done} (checks every {self.every} steps); the updates after step {first} reached "
                     "the weights and no checkpoint was written yet, so the model is not usable: rerun with a "
                     "run_dir, or nan_check_every=1")
        self._reset()
        raise NonFiniteLossError(f"{what} at epoch {epoch} step {first}; {state}"
                                 + (FP16_HINT if amp_dtype == torch.float16 else ""))


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
        loggers: :class:`~distill.train.loggers.Logger` objects that :meth:`end_epoch` also sends
            each row to (the epoch as the step) and :meth:`close` closes (pass none on ranks other than 0).
    """

    def __init__(self, result: FitResult, run_dir: str | Path | None = None, *, write: bool = True,
                 loggers: Sequence[Logger] = ()) -> None:
        self.result = result
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.write = bool(write) and self.run_dir is not None
        self.loggers = list(loggers)

    @property
    def checkpoint_dir(self) -> Path | None:
        """``run_dir/checkpoints`` (``None`` without a run folder)."""
        return self.run_dir / "checkpoints" if self.run_dir is not None else None

    def begin(self) -> None:
        """Create the run folder and write ``metrics.jsonl`` afresh from the history so far."""
        if self.write:
            self.run_dir.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
            atomic_write_text(self.run_dir / "metrics.jsonl",  # type: ignore[operator]
                              "".join(json.dumps(row) + "\n" for row in self.result.history))

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
        log_row(self.loggers, row)
        return improved

    def close(self) -> None:
        """Close the loggers (a later :meth:`end_epoch` reopens them)."""
        close_loggers(self.loggers)


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
