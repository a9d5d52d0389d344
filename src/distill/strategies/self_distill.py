"""Self-distillation strategies: one model, its own teacher, trained by :func:`distill.fit`.

Each strategy is a Distiller with no teacher and one method of
:mod:`distill.methods.self_distill`, plus what the paper's loop needs beyond it:

* :func:`fit_byot`, :func:`fit_msd`: auxiliary exits taught by the deepest one (BYOT) or by all
  others (MSD); the result also holds every exit's validation accuracy (``exit_acc``).
* :func:`fit_dlb`: batches that share half their samples with the previous batch
  (:class:`LastBatchLoader`); the stored predictions of the last step teach them.
* :func:`fit_zipf_ls`: cross-entropy plus Zipf's label smoothing.
* :func:`fit_tffd`: cross-entropy plus teacher-free feature distillation.
* :func:`fit_sla`: joint (class, rotation) labels on batches of rotated images
  (:class:`RotationLoader`), the aggregated prediction distilled into the ordinary head.

Every strategy takes a model (or a zero-argument factory), loaders and plain-valued
hyper-parameters with the paper's defaults, passes ``**fit_kwargs`` to :func:`distill.fit`, and
returns a :class:`SelfDistillResult`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from distill import functional as DF
from distill.batch import Batch, as_batch
from distill.data.loader import shard_wrapped
from distill.distiller import Distiller
from distill.methods.base import Method
from distill.methods.self_distill import (
    BYOT,
    DLB,
    MSD,
    SLA,
    ExitPredictor,
    ExitsMethod,
    TfFD,
    ZipfLS,
)
from distill.strategies.registry import as_model, register_strategy
from distill.train.evaluate import evaluate
from distill.train.loop import FitResult, fit

__all__ = [
    "LastBatchLoader",
    "RotationLoader",
    "SelfDistillResult",
    "evaluate_exits",
    "fit_byot",
    "fit_dlb",
    "fit_msd",
    "fit_sla",
    "fit_tffd",
    "fit_zipf_ls",
]


@dataclass
class SelfDistillResult(FitResult):
    """:class:`~distill.train.loop.FitResult` plus the trained ``distiller`` (its methods hold the
    exits) and, for BYOT and MSD with a validation loader, ``exit_acc``: the final top-1 (%) of
    each exit (by tap path), of ``"deepest"`` and of the ``"ensemble"`` of all classifiers."""

    distiller: Distiller | None = None
    exit_acc: dict[str, float] = field(default_factory=dict)


class _Wrapper:
    """A loader built on another one: ``set_epoch``, ``set_shard`` and ``targets`` (what ``fit`` uses
    to seed the order, shard the data under torchrun and bind per-sample state) pass through to the
    wrapped loader, so under torchrun each rank wraps its own part of every batch."""

    def __init__(self, loader: Iterable[Any]) -> None:
        self.loader = loader

    @property
    def targets(self) -> Any:
        return getattr(self.loader, "targets", None)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(epoch)

    def set_shard(self, rank: int, world_size: int, split: str = "batch") -> None:
        shard_wrapped(self.loader, rank, world_size, split, type(self).__name__)

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]


class LastBatchLoader(_Wrapper):
    """Batches that hold half of the previous batch's samples (DLB's pairing).

    From a loader yielding chunks ``c_0, c_1, c_2, ...`` it yields ``[c_0; c_1], [c_1; c_2], ...``:
    the second half of each batch is the first half of the next, so each sample is seen in two
    consecutive steps (one fewer batch than the wrapped loader per epoch; each batch is twice as
    large). A repeated chunk is the same tensors both times: with an augmenting loader the sample
    keeps its view of this epoch.

    Paper: Y. Shen, L. Xu, Y. Yang, Y. Li, Y. Guo, "Self-Distillation from the Last Mini-Batch for
    Consistency Regularization", CVPR 2022, arXiv 2203.16172 (each sample is seen twice per epoch,
    so the paper halves the epochs for a like-for-like comparison).
    """

    def __len__(self) -> int:
        return max(0, len(self.loader) - 1)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Batch]:
        previous: Batch | None = None
        for raw in self.loader:
            batch = _unmixed(as_batch(raw), "DLB's last-batch pairing")
            if previous is not None:
                yield Batch(torch.cat([previous.inputs, batch.inputs]), _cat(previous.targets, batch.targets),
                            _cat(previous.index, batch.index))
            previous = batch


class RotationLoader(_Wrapper):
    """Batches of each image's four rotations, sample-major (row ``4b + j``: image b turned j
    quarter turns; :func:`~distill.functional.sla_rotations`), labels and indices repeated: the
    batches SLA trains on."""

    def __iter__(self) -> Iterator[Batch]:
        for raw in self.loader:
            b = _unmixed(as_batch(raw), "SLA's rotations")
            yield Batch(DF.sla_rotations(b.inputs), _repeat(b.targets), _repeat(b.index))


def _repeat(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.repeat_interleave(4)


def _unmixed(batch: Batch, who: str) -> Batch:
    """Refuse mixup batches where a wrapper rebuilds the batch (the mixed labels would be lost)."""
    if batch.mix_lam is not None:
        raise ValueError(f"{who} does not support mixup batches (Mixup augmentation): remove it from the loader")
    return batch


def _cat(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return None if a is None or b is None else torch.cat([a, b])


def _model(student: nn.Module | Callable[[], nn.Module], strategy: str) -> nn.Module:
    return as_model(student, strategy)


def _train(strategy: str, student: nn.Module | Callable[[], nn.Module], train_loader: Iterable[Any],
           val_loader: Iterable[Any] | None, losses: Mapping[str, float | Method], *, teacher: Any, epochs: int,
           run_dir: Any, seed: int, progress: bool, fit_kwargs: dict[str, Any]) -> SelfDistillResult:
    if teacher is not None:
        raise ValueError(f"{strategy} is self-distillation: the student is its own teacher, so teacher must be None "
                         f"(got {type(teacher).__name__})")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    distiller = Distiller(_model(student, strategy), None, losses)
    result = fit(distiller, train_loader, val_loader, epochs=epochs, run_dir=run_dir, seed=seed, progress=progress,
                 **fit_kwargs)
    out = SelfDistillResult(**{f.name: getattr(result, f.name) for f in fields(FitResult)})
    out.distiller = distiller
    return out


def evaluate_exits(distiller: Distiller, loader: Iterable[Any], method: str | None = None,
                   device: torch.device | str | None = None) -> dict[str, float]:
    """Top-1 (%) on ``loader`` of each exit of the Distiller's BYOT/MSD loss (by tap path), of
    ``"deepest"`` (the student's own output) and of ``"ensemble"`` (mean logits of all)."""
    found = {n: m for n, m in distiller.methods.items() if isinstance(m, ExitsMethod) and (method in (None, n))}
    if len(found) != 1:
        raise ValueError(f"evaluate_exits needs exactly one BYOT/MSD loss{f' named {method!r}' if method else ''}; "
                         f"the distiller's losses: {list(distiller.methods)}")
    exits = next(iter(found.values()))
    student = distiller.student
    device = device if device is not None else next(student.parameters()).device
    heads = [exits.heads[k] for k in exits.heads]
    out = {"deepest": evaluate(SimpleNamespace(student=student), loader, device, with_teacher=False)["student_acc"]}
    for mode in (*exits.exits, "ensemble"):
        model = ExitPredictor(student, exits.exits, heads, mode)
        try:
            out[mode] = evaluate(SimpleNamespace(student=model), loader, device, with_teacher=False)["student_acc"]
        finally:
            model.remove_hooks()
    return out


def _fit_exits(strategy: str, method: ExitsMethod, student: nn.Module | Callable[[], nn.Module],
               train_loader: Iterable[Any], val_loader: Iterable[Any] | None, *, teacher: Any, epochs: int,
               run_dir: Any, seed: int, progress: bool, fit_kwargs: dict[str, Any]) -> SelfDistillResult:
    out = _train(strategy, student, train_loader, val_loader, {strategy: method}, teacher=teacher, epochs=epochs,
                 run_dir=run_dir, seed=seed, progress=progress, fit_kwargs=fit_kwargs)
    if val_loader is not None and out.distiller is not None:
        out.exit_acc = evaluate_exits(out.distiller, val_loader, strategy)
    return out


@register_strategy("byot", "self", BYOT.paper)  # type: ignore[arg-type]
def fit_byot(
    student: nn.Module | Callable[[], nn.Module],
    train_loader: Iterable[Any],
    val_loader: Iterable[Any] | None = None,
    *,
    teacher: Any = None,
    epochs: int,
    run_dir: Any = None,
    seed: int = 0,
    progress: bool = True,
    exits: Sequence[str] = ("stage1", "stage2"),
    feature: str | None = "pool",
    alpha: float = 0.3,
    lam: float = 0.03,
    T: float = 3.0,
    predict: str | None = None,
    **fit_kwargs: Any,
) -> SelfDistillResult:
    """Be Your Own Teacher: train a model with auxiliary exits taught by its deepest classifier.

    The student minimises :func:`distill.functional.byot_loss` (each exit's (1 − α)·CE + α·KL to the
    deepest output at T + λ·hint to the deepest feature, and the deepest's (1 − α)·CE); the exits
    are built on the taps ``exits`` from the first batch. See :class:`~distill.methods.self_distill.BYOT`
    for the arguments (defaults α = 0.3, λ = 0.03, T = 3: the authors' code). The authors train
    CIFAR-100 ResNets 200 epochs with SGD lr 0.1, batch 128, decays at 1/3, 2/3 and the last
    10 epochs: ``fit_byot(model, train, val, epochs=200, lr=0.1, milestones=[66, 133, 190])``.

    Returns: ``fit``'s result, the Distiller (``result.distiller.methods["byot"].heads`` are the
    exits) and each exit's validation accuracy (``exit_acc``).
    """
    method = BYOT(exits=exits, feature=feature, alpha=alpha, lam=lam, T=T, predict=predict)
    return _fit_exits("byot", method, student, train_loader, val_loader, teacher=teacher, epochs=epochs,
                      run_dir=run_dir, seed=seed, progress=progress, fit_kwargs=fit_kwargs)


@register_strategy("msd", "self", MSD.paper)  # type: ignore[arg-type]
def fit_msd(
    student: nn.Module | Callable[[], nn.Module],
    train_loader: Iterable[Any],
    val_loader: Iterable[Any] | None = None,
    *,
    teacher: Any = None,
    epochs: int,
    run_dir: Any = None,
    seed: int = 0,
    progress: bool = True,
    exits: Sequence[str] = ("stage1", "stage2"),
    feature: str | None = None,
    alpha: float = 0.3,
    lam: float = 0.0,
    T: float = 3.0,
    predict: str | None = None,
    lam_decay: str = "cosine",
    **fit_kwargs: Any,
) -> SelfDistillResult:
    """Multi-self-distillation: the exits of BYOT, every classifier taught by all the others.

    The student minimises :func:`distill.functional.msd_loss`; arguments and result as
    :func:`fit_byot` (the feature hint off by default, ``lam = 0``; when on, its weight decays
    with a cosine over the epochs, ``lam_decay``, see :class:`~distill.methods.self_distill.MSD`).
    """
    method = MSD(exits=exits, feature=feature, alpha=alpha, lam=lam, T=T, predict=predict, lam_decay=lam_decay)
    return _fit_exits("msd", method, student, train_loader, val_loader, teacher=teacher, epochs=epochs,
                      run_dir=run_dir, seed=seed, progress=progress, fit_kwargs=fit_kwargs)


@register_strategy("dlb", "self", DLB.paper)  # type: ignore[arg-type]
def fit_dlb(
    student: nn.Module | Callable[[], nn.Module],
    train_loader: Iterable[Any],
    val_loader: Iterable[Any] | None = None,
    *,
    teacher: Any = None,
    epochs: int,
    run_dir: Any = None,
    seed: int = 0,
    progress: bool = True,
    alpha: float = 1.0,
    T: float = 3.0,
    **fit_kwargs: Any,
) -> SelfDistillResult:
    """Self-distillation from the last mini-batch: CE + α·T²·KL to the last step's predictions.

    ``train_loader`` yields *half* batches with sample indices (``InMemoryLoader(...,
    return_index=True)``); :class:`LastBatchLoader` pairs consecutive ones, so every step sees half
    of the previous step's samples, whose stored predictions (detached) teach them through
    :class:`~distill.methods.self_distill.DLB`. The student minimises
    ``CE(batch) + alpha * T² KL(p_last^T ‖ p^T)`` on the repeated half; defaults α = 1, T = 3
    (the paper's). Each sample is seen twice per epoch: the paper halves the epochs to compare
    with plain training.
    """
    for name, value in (("alpha", alpha), ("T", T)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{name} must be a number > 0, got {value!r}")
    if hasattr(train_loader, "__len__") and len(train_loader) < 2:  # type: ignore[arg-type]
        raise ValueError(f"DLB pairs consecutive batches, so the training loader needs at least 2 batches, "
                         f"it has {len(train_loader)}")  # type: ignore[arg-type]
    first = next(iter(train_loader), None)
    if first is None or as_batch(first).index is None:
        raise ValueError("DLB pairs each sample with its last prediction by sample index, but the training loader "
                         "yields no index: use InMemoryLoader(..., return_index=True) or IndexedTensorDataset")
    return _train("dlb", student, LastBatchLoader(train_loader), val_loader,
                  {"ce": 1.0, "dlb": DLB(T=T, weight=float(alpha))}, teacher=teacher, epochs=epochs, run_dir=run_dir,
                  seed=seed, progress=progress, fit_kwargs=fit_kwargs)


@register_strategy("zipf_ls", "self", ZipfLS.paper)  # type: ignore[arg-type]
def fit_zipf_ls(
    student: nn.Module | Callable[[], nn.Module],
    train_loader: Iterable[Any],
    val_loader: Iterable[Any] | None = None,
    *,
    teacher: Any = None,
    epochs: int,
    run_dir: Any = None,
    seed: int = 0,
    progress: bool = True,
    lam: float = 0.1,
    feature: str | None = None,
    classifier: str | None = None,
    power: float = 1.0,
    upsample: int = 2,
    correct_only: bool = False,
    **fit_kwargs: Any,
) -> SelfDistillResult:
    """Zipf's label smoothing: CE + λ·KL(Zipf soft labels over the model's own ranking ‖ prediction).

    Give ``feature`` (the last feature map's tap, e.g. ``"stage3"``) to rank the classes by the
    dense prediction as in the paper; without it the classes are ranked by the logits. Arguments:
    :class:`~distill.methods.self_distill.ZipfLS` (λ = 0.1: the reference code's CIFAR-100 setting).
    """
    method = ZipfLS(feature=feature, classifier=classifier, power=power, upsample=upsample,
                    correct_only=correct_only, weight=lam)
    return _train("zipf_ls", student, train_loader, val_loader, {"ce": 1.0, "zipf_ls": method}, teacher=teacher,
                  epochs=epochs, run_dir=run_dir, seed=seed, progress=progress, fit_kwargs=fit_kwargs)


@register_strategy("tf_fd", "self", TfFD.paper)  # type: ignore[arg-type]
def fit_tffd(
    student: nn.Module | Callable[[], nn.Module],
    train_loader: Iterable[Any],
    val_loader: Iterable[Any] | None = None,
    *,
    teacher: Any = None,
    epochs: int,
    run_dir: Any = None,
    seed: int = 0,
    progress: bool = True,
    taps: Sequence[str] = ("stage1", "stage2", "stage3"),
    intra: float = 4e-4,
    inter: float = 5e-3,
    **fit_kwargs: Any,
) -> SelfDistillResult:
    """Teacher-free feature distillation: CE + intra-layer (salient → redundant channels) and
    inter-layer (deeper → shallower maps) feature losses; arguments:
    :class:`~distill.methods.self_distill.TfFD`."""
    method = TfFD(taps=taps, intra=intra, inter=inter)
    return _train("tf_fd", student, train_loader, val_loader, {"ce": 1.0, "tf_fd": method}, teacher=teacher,
                  epochs=epochs, run_dir=run_dir, seed=seed, progress=progress, fit_kwargs=fit_kwargs)


@register_strategy("sla", "self", SLA.paper)  # type: ignore[arg-type]
def fit_sla(
    student: nn.Module | Callable[[], nn.Module],
    train_loader: Iterable[Any],
    val_loader: Iterable[Any] | None = None,
    *,
    teacher: Any = None,
    epochs: int,
    run_dir: Any = None,
    seed: int = 0,
    progress: bool = True,
    feature: str = "pool",
    T: float = 1.0,
    beta: float = 1.0,
    predict: str = "single",
    **fit_kwargs: Any,
) -> SelfDistillResult:
    """Self-supervised label augmentation with self-distillation (SLA+SD), rotations as transformations.

    Each training batch is expanded to the four rotations of its images (:class:`RotationLoader`,
    so a step costs four forwards per image); the student minimises
    :func:`distill.functional.sla_sd_loss`: CE on the joint (class, rotation) labels of a joint
    head on ``feature``, β·CE of its own output on the unrotated image, and T²·KL from the
    aggregated joint prediction (detached) to that output. Validation uses the unrotated images
    (``predict="single"``) or the aggregated inference (``"aggregated"``). Images must be square.
    """
    method = SLA(feature=feature, T=T, beta=beta, predict=predict)
    return _train("sla", student, RotationLoader(train_loader), val_loader, {"sla": method}, teacher=teacher,
                  epochs=epochs, run_dir=run_dir, seed=seed, progress=progress, fit_kwargs=fit_kwargs)
