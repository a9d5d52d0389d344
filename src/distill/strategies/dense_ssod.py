r"""Semi-supervised detection with a mean teacher that supervises the student *densely*.

Two strategies on the GFL-style detector of :mod:`distill.models.detection`:

* :func:`dense_teacher` (Zhou et al., "Dense Teacher: Dense Pseudo-Labels for Semi-supervised
  Object Detection", ECCV 2022, arXiv 2207.02541): the teacher's dense predictions, region-selected,
  are the pseudo-label (:func:`~distill.functional.dense_pseudo_label_loss`).
* :func:`dtg_ssod` (Li et al., "DTG-SSOD: Dense Teacher Guidance for Semi-Supervised Object
  Detection", NeurIPS 2022, arXiv 2207.05536): Inverse NMS Clustering + Rank Matching
  (:func:`~distill.functional.dtg_loss`).

Shared set-up, as in both papers: the teacher is an exponential moving average of the student
(:class:`SSODTeacher`), sees a weakly perturbed view of each unlabeled image while the student sees
a strongly perturbed one (:class:`SSODLoader`); the student pays the detector's own loss
(``gfl_loss``) on the labelled images of each batch and the dense loss on the unlabeled ones, whose
weight is 0 during a burn-in and then ramps up linearly (Dense Teacher's ``SUPPRESS='linear'``).
The perturbations keep the geometry (Gaussian noise, brightness and contrast), so the teacher's
points and the student's are the same places; the papers' strong views also crop and flip.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from distill import functional as DF
from distill.batch import Batch, DenseBatch, View
from distill.data.augment import mix_seed
from distill.data.loader import GlobalBatchShards
from distill.distiller import Distiller
from distill.methods.base import Method, Paper
from distill.methods.dense_tasks import GFLLoss
from distill.models.detection import decode_boxes, grid_points, integral
from distill.strategies.chain import ModelSpec, build_model, check_model_spec
from distill.strategies.mean_teacher import EMATeacher, StepCountedMethod
from distill.strategies.registry import register_strategy
from distill.train import distributed as D
from distill.train.loop import FitResult, fit

__all__ = ["DTGLoss", "DenseTeacherLoss", "LabeledOnly", "SSODBatch", "SSODLoader", "SSODResult", "SSODTeacher",
           "dense_teacher", "dtg_ssod", "photometric"]

DENSE_TEACHER_PAPER = Paper(
    title="Dense Teacher: Dense Pseudo-Labels for Semi-supervised Object Detection",
    authors="H. Zhou, Z. Ge, S. Liu, W. Mao, Z. Li, H. Yu, J. Sun",
    year=2022,
    arxiv="2207.02541",
    venue="ECCV",
)
DTG_PAPER = Paper(
    title="DTG-SSOD: Dense Teacher Guidance for Semi-Supervised Object Detection",
    authors="G. Li, X. Li, Y. Wang, Y. Wu, D. Liang, S. Zhang",
    year=2022,
    arxiv="2207.05536",
    venue="NeurIPS",
)


# ---------------------------------------------------------------------------------------- the data


@dataclass
class SSODBatch(DenseBatch):
    """A :class:`~distill.batch.DenseBatch` of labelled and unlabeled images with a second view.

    Attributes:
        teacher_inputs: the teacher's (weak) view of ``inputs`` ``(B, C, H, W)``.
        labeled: ``(B,)`` bool, which images carry ground truth (their ``boxes``/``labels``; an
            unlabeled image has empty ones).
    """

    teacher_inputs: Tensor | None = None
    labeled: Tensor | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SSODBatch:
        moved = super().to(device, non_blocking)

        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return replace(moved, teacher_inputs=move(self.teacher_inputs), labeled=move(self.labeled))

    def part(self, rank: int, world_size: int) -> SSODBatch:
        """Rank ``rank``'s share of the labelled images and its share of the unlabeled ones (each split
        in ``world_size`` balanced contiguous runs), so that every rank computes both losses on every
        step and DDP's gradient reduction lines up; needs ``world_size`` of each kind."""
        if self.labeled is None:
            return super().part(rank, world_size)  # type: ignore[return-value]
        lab, unl = self.labeled.nonzero().flatten(), (~self.labeled).nonzero().flatten()
        if len(lab) < world_size or len(unl) < world_size:
            raise ValueError(f"a semi-supervised batch of {len(lab)} labelled and {len(unl)} unlabeled images cannot be "
                             f"split over {world_size} processes: every rank needs at least one of each (use larger "
                             "batches of both loaders)")
        return self.select(torch.cat([torch.tensor_split(lab, world_size)[rank],
                                      torch.tensor_split(unl, world_size)[rank]]))

    def select(self, idx: Tensor) -> SSODBatch:
        picked = super().select(idx)

        def cut(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[idx.to(t.device)]

        return replace(picked, teacher_inputs=cut(self.teacher_inputs), labeled=cut(self.labeled))

    def rows(self, keep: Tensor) -> DenseBatch:
        """A plain :class:`DenseBatch` of the images where ``keep`` ``(B,)`` bool is true."""
        picked = DenseBatch.select(self, keep.nonzero().flatten())
        return DenseBatch(picked.inputs, picked.targets, picked.index, boxes=picked.boxes, labels=picked.labels,
                          instance_masks=picked.instance_masks, extras=picked.extras)


def photometric(noise: float = 0.1, contrast: tuple[float, float] = (0.8, 1.2),
                brightness: float = 0.1) -> Callable[[Tensor, torch.Generator], Tensor]:
    """A geometry-preserving perturbation ``x ↦ c·x + b + σ ε`` per image: ``c ~ U(contrast)``,
    ``b ~ U(-brightness, brightness)``, ``ε ~ N(0, 1)`` per pixel, ``σ = noise`` (on normalised inputs)."""
    lo, hi = contrast
    if noise < 0 or brightness < 0 or not 0 < lo <= hi:
        raise ValueError(f"photometric: noise and brightness must be >= 0 and 0 < contrast[0] <= contrast[1], got "
                         f"noise={noise}, contrast={contrast}, brightness={brightness}")

    def apply(x: Tensor, g: torch.Generator) -> Tensor:
        b = x.shape[0]
        c = lo + (hi - lo) * torch.rand(b, 1, 1, 1, generator=g)
        shift = brightness * (2 * torch.rand(b, 1, 1, 1, generator=g) - 1)
        eps = torch.randn(x.shape, generator=g)
        return x * c.to(x) + shift.to(x) + noise * eps.to(x)

    return apply


class SSODLoader(GlobalBatchShards):
    """Joins each batch of ``unlabeled`` (an epoch is one pass over it) with the next batch of
    ``labeled`` (cycled), labelled images first, into an :class:`SSODBatch`: the student's view
    ``strong(x)``, the teacher's ``weak(x)``, with draws that are a pure function of
    ``(seed, epoch, batch)``. The unlabeled loader's boxes, if any, are dropped."""

    def __init__(self, labeled: Iterable[Any], unlabeled: Iterable[Any], *,
                 strong: Callable[[Tensor, torch.Generator], Tensor] | None = None,
                 weak: Callable[[Tensor, torch.Generator], Tensor] | None = None, seed: int = 0) -> None:
        for name, loader in (("labeled", labeled), ("unlabeled", unlabeled)):
            if not hasattr(loader, "__len__"):
                raise TypeError(f"SSODLoader: the {name} loader must have a length")
        if len(labeled) == 0 or len(unlabeled) == 0:  # type: ignore[arg-type]
            raise ValueError("SSODLoader: the labeled and the unlabeled loader must each yield at least one batch")
        self.labeled, self.unlabeled = labeled, unlabeled
        self.strong = strong if strong is not None else photometric()
        self.weak = weak
        self.seed, self.epoch = int(seed), 0

    def __len__(self) -> int:
        return len(self.unlabeled)  # type: ignore[arg-type]

    def set_epoch(self, epoch: int) -> None:
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"set_epoch expects an int >= 0, got {epoch!r}")
        self.epoch = epoch

    def _labeled(self) -> Iterator[DenseBatch]:
        n = self.epoch * math.ceil(len(self) / len(self.labeled))  # type: ignore[arg-type]
        while True:
            if hasattr(self.labeled, "set_epoch"):
                self.labeled.set_epoch(n)
            for b in self.labeled:
                if not isinstance(b, DenseBatch) or b.boxes is None or b.labels is None:
                    raise TypeError("SSODLoader: the labeled loader must yield DenseBatches with boxes and labels")
                yield b
            n += 1

    def __iter__(self) -> Iterator[SSODBatch]:
        if hasattr(self.unlabeled, "set_epoch"):
            self.unlabeled.set_epoch(self.epoch)
        labeled = self._labeled()
        for k, u in enumerate(self.unlabeled):
            lab = next(labeled)
            u_inputs = u.inputs if isinstance(u, Batch) else u[0]
            x = torch.cat([lab.inputs, u_inputs.to(lab.inputs)])
            nl, nu = lab.inputs.shape[0], u_inputs.shape[0]
            empty_box, empty_label = lab.inputs.new_zeros(0, 4), torch.zeros(0, dtype=torch.long)
            student = self.strong(x, torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, 2, k)))
            teacher = x if self.weak is None else self.weak(x, torch.Generator().manual_seed(
                mix_seed(self.seed, self.epoch, 3, k)))
            yield self._shard(SSODBatch(
                student, None, None, boxes=list(lab.boxes) + [empty_box] * nu,  # type: ignore[arg-type]
                labels=list(lab.labels) + [empty_label] * nu, teacher_inputs=teacher,  # type: ignore[arg-type]
                labeled=torch.cat([torch.ones(nl, dtype=torch.bool), torch.zeros(nu, dtype=torch.bool)])))

    def __repr__(self) -> str:
        return f"SSODLoader(batches={len(self)}, seed={self.seed}, epoch={self.epoch})"


# ---------------------------------------------------------------------------------------- the teacher


class SSODTeacher(EMATeacher):
    """The mean teacher of Dense Teacher's code: a copy of the student until ``start_steps`` optimizer
    steps (the code's ``EMA.START_STEPS``, where the EMA starts from the student's weights), then
    ``θ' ← α θ' + (1 − α) θ`` with a fixed ``α = decay`` for parameters and floating buffers. Runs in
    eval mode (no teacher noise), on the batch's ``teacher_inputs``."""

    def __init__(self, student: nn.Module, *, decay: float = 0.99, start_steps: int = 0) -> None:
        if isinstance(start_steps, bool) or not isinstance(start_steps, int) or start_steps < 0:
            raise ValueError(f"start_steps must be an int >= 0, got {start_steps!r}")
        super().__init__(student, decay=decay, buffers="ema", noise=False)
        self.start_steps = start_steps

    @torch.no_grad()
    def on_step_end(self, student: nn.Module) -> None:
        params, student_params, bufs, student_bufs = self._tensors(student)
        self.num_updates += 1
        alpha = 0.0 if self.num_updates <= self.start_steps else self.decay
        if params:
            torch._foreach_lerp_(params, [p.detach() for p in student_params], 1.0 - alpha)
        for mine, theirs in zip(bufs, student_bufs):
            if mine.is_floating_point():
                mine.lerp_(theirs, 1.0 - alpha)
            else:
                mine.copy_(theirs)


# ---------------------------------------------------------------------------------------- the losses


def _labeled_mask(batch: Batch) -> Tensor:
    labeled = getattr(batch, "labeled", None)
    if not isinstance(labeled, Tensor):
        raise ValueError("semi-supervised detection losses need an SSODBatch (SSODLoader yields them): which images "
                         f"are labelled is unknown for a {type(batch).__name__}")
    return labeled.to(batch.inputs.device)


class LabeledOnly(Method):
    """A teacher-free task loss (``inner``) on the labelled images of an :class:`SSODBatch` only
    (every view tensor and the batch cut to those rows); 0 when the batch has none."""

    needs_teacher = False

    def __init__(self, inner: Method, weight: float = 1.0) -> None:
        super().__init__(weight=weight)
        self.inner = inner
        self.student_taps = list(inner.student_taps)
        self.name = f"labeled({type(inner).name or type(inner).__name__})"

    def bind_models(self, student: nn.Module, teacher: nn.Module | None, example: Batch) -> None:
        self.inner.bind_models(student, teacher, example)

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        keep = _labeled_mask(batch)
        if not bool(keep.any()):
            return student_view["logits"].sum() * 0.0
        view = {k: v[keep] for k, v in student_view.items()}
        return self.inner(view, {}, batch.rows(keep))  # type: ignore[attr-defined]


class _UnlabeledDense(StepCountedMethod):
    """Shared part of the two dense losses: the unlabeled rows' logits and decoded boxes of both
    models, and the burn-in schedule of the weight (0 for ``burn_in_steps`` optimizer steps, then
    a linear ramp to 1 over as many steps: Dense Teacher's ``SUPPRESS='linear'``)."""

    def __init__(self, burn_in_steps: int = 0, weight: float = 1.0) -> None:
        super().__init__(weight=weight)
        if isinstance(burn_in_steps, bool) or not isinstance(burn_in_steps, int) or burn_in_steps < 0:
            raise ValueError(f"burn_in_steps must be an int >= 0, got {burn_in_steps!r}")
        self.burn_in_steps = burn_in_steps
        self.student_taps = ["box_dist"]
        self.teacher_taps = ["box_dist"]
        self.strides: tuple[int, ...] | None = None

    def weight_factor(self) -> float:
        b = self.burn_in_steps
        ramp = 1.0 if b == 0 else 0.0 if self.steps < b else min(1.0, (self.steps - b) / b)
        return super().weight_factor() * ramp

    def bind_models(self, student: nn.Module, teacher: nn.Module | None, example: Batch) -> None:
        strides = getattr(student, "strides", None)
        if strides is None:
            raise TypeError(f"{type(self).__name__} needs a detector with 'strides' (GFLDetector), got "
                            f"{type(student).__name__}")
        self.strides = tuple(int(s) for s in strides)

    def _dense(self, student_view: View, teacher_view: View, batch: Batch) -> tuple[Tensor, ...] | None:
        """``(s_logits, s_boxes, t_logits, t_boxes)`` of the unlabeled images, ``(U, N, K)`` and ``(U, N, 4)``."""
        assert self.strides is not None, "bind_models must run first"
        unl = ~_labeled_mask(batch)
        if not bool(unl.any()):
            return None
        points, strides = grid_points(tuple(batch.inputs.shape[-2:]), self.strides, device=batch.inputs.device,
                                      dtype=student_view["logits"].dtype)

        def boxes(view: View) -> Tensor:
            return decode_boxes(integral(view["box_dist"][unl]), points, strides)

        return (student_view["logits"][unl], boxes(student_view), teacher_view["logits"][unl].detach(),
                boxes(teacher_view).detach())


class DenseTeacherLoss(_UnlabeledDense):
    """Dense Teacher's unsupervised loss on the unlabeled images
    (:func:`~distill.functional.dense_pseudo_label_loss` over all their points together)."""

    name = "dense_teacher"

    def __init__(self, ratio: float = 0.01, beta: float = 2.0, cls_weight: float = 4.0, box_weight: float = 1.0,
                 burn_in_steps: int = 0, weight: float = 1.0) -> None:
        super().__init__(burn_in_steps=burn_in_steps, weight=weight)
        if not 0 < ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        self.ratio, self.beta, self.cls_weight, self.box_weight = float(ratio), float(beta), float(cls_weight), \
            float(box_weight)

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        dense = self._dense(student_view, teacher_view, batch)
        if dense is None:
            return student_view["logits"].sum() * 0.0
        s_logits, s_boxes, t_logits, t_boxes = dense
        k = s_logits.shape[-1]
        return DF.dense_pseudo_label_loss(s_logits.reshape(-1, k), s_boxes.reshape(-1, 4), t_logits.reshape(-1, k),
                                          t_boxes.reshape(-1, 4), ratio=self.ratio, beta=self.beta,
                                          cls_weight=self.cls_weight, box_weight=self.box_weight)


class DTGLoss(_UnlabeledDense):
    """DTG-SSOD's dense teacher guidance on the unlabeled images: per image, the teacher's NMS clusters
    (:func:`~distill.functional.inverse_nms_clusters` on its boxes, best class scores and classes)
    and :func:`~distill.functional.dtg_loss`, averaged over the images."""

    name = "dtg"

    def __init__(self, score_threshold: float = 0.5, iou_threshold: float = 0.6, tau: float = 1.0, beta: float = 2.0,
                 inc_weight: float = 1.0, box_weight: float = 2.0, rank_weight: float = 1.0, burn_in_steps: int = 0,
                 weight: float = 1.0) -> None:
        super().__init__(burn_in_steps=burn_in_steps, weight=weight)
        if not 0 <= score_threshold < 1 or not 0 < iou_threshold <= 1:
            raise ValueError(f"score_threshold must be in [0, 1) and iou_threshold in (0, 1], got {score_threshold}, "
                             f"{iou_threshold}")
        self.score_threshold, self.iou_threshold = float(score_threshold), float(iou_threshold)
        self.kwargs = {"tau": float(tau), "beta": float(beta), "inc_weight": float(inc_weight),
                       "box_weight": float(box_weight), "rank_weight": float(rank_weight)}

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        dense = self._dense(student_view, teacher_view, batch)
        if dense is None:
            return student_view["logits"].sum() * 0.0
        s_logits, s_boxes, t_logits, t_boxes = dense
        total = s_logits.sum() * 0.0
        for i in range(s_logits.shape[0]):
            scores, labels = t_logits[i].sigmoid().max(-1)
            cluster = DF.inverse_nms_clusters(t_boxes[i], scores, labels, score_threshold=self.score_threshold,
                                              iou_threshold=self.iou_threshold)
            total = total + DF.dtg_loss(s_logits[i], s_boxes[i], t_logits[i], t_boxes[i], cluster, **self.kwargs)
        return total / s_logits.shape[0]


# ---------------------------------------------------------------------------------------- the strategies


@dataclass
class SSODResult(FitResult):
    """The student's :class:`~distill.train.loop.FitResult` plus the EMA teacher and its scores
    (``val_teacher_acc`` of each epoch; both papers report the teacher)."""

    ema_model: nn.Module | None = None
    ema_last_acc: float | None = None
    ema_best_acc: float | None = None


def _steps(value: float | int, total: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{name} must be a number >= 0 (a fraction < 1 of the run's steps, or steps), got {value!r}")
    return int(round(value * total)) if isinstance(value, float) and value < 1 else int(value)


def _run(unsup: _UnlabeledDense, student: ModelSpec, train_loader: Iterable[Any], val_loader: Iterable[Any] | None, *,
         epochs: int, unlabeled_loader: Iterable[Any] | None, run_dir: str | None, seed: int, progress: bool,
         ema_decay: float, ema_start: float | int, strong: Any, weak: Any, fit_kwargs: dict[str, Any]) -> SSODResult:
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    if unlabeled_loader is None:
        raise ValueError("a semi-supervised strategy needs unlabeled_loader (batches of unlabeled scenes)")
    if not 0.0 <= ema_decay <= 1.0:
        raise ValueError(f"ema_decay must be in [0, 1], got {ema_decay}")
    check_model_spec(student, "student")
    if D.dist_info().enabled:
        # a rank whose pseudo-label loss selects no point leaves the box branch without a gradient on that step
        fit_kwargs = {"find_unused_parameters": True, **fit_kwargs}
    loader = SSODLoader(train_loader, unlabeled_loader, strong=strong, weak=weak, seed=seed)
    total = epochs * len(loader)
    model = build_model(student, "student")
    teacher = SSODTeacher(model, decay=ema_decay, start_steps=_steps(ema_start, total, "ema_start"))
    distiller = Distiller(model, teacher, losses={"gfl_loss": LabeledOnly(GFLLoss()), unsup.name: unsup})
    if val_loader is not None and "evaluator" not in fit_kwargs:
        from distill.train.dense_eval import detection_evaluator

        fit_kwargs = {**fit_kwargs, "evaluator": detection_evaluator}
    result = fit(distiller, loader, val_loader, epochs=epochs, run_dir=run_dir, seed=seed, progress=progress,
                 **fit_kwargs)
    accs = [row["val_teacher_acc"] for row in result.history if "val_teacher_acc" in row]
    return SSODResult(history=result.history, best_acc=result.best_acc, best_epoch=result.best_epoch,
                      last_acc=result.last_acc, run_dir=result.run_dir, time_s=result.time_s, ema_model=teacher.model,
                      ema_last_acc=accs[-1] if accs else None, ema_best_acc=max(accs) if accs else None)


@register_strategy("dense_teacher", "semi-supervised", DENSE_TEACHER_PAPER)
def dense_teacher(student: ModelSpec, train_loader: Iterable[Any], val_loader: Iterable[Any] | None = None, *,
                  epochs: int, unlabeled_loader: Iterable[Any] | None = None, run_dir: str | None = None, seed: int = 0,
                  progress: bool = True, ratio: float = 0.01, unsup_weight: float = 1.0, cls_weight: float = 4.0,
                  box_weight: float = 1.0, burn_in: float | int = 0.3, ema_start: float | int = 0.18,
                  ema_decay: float = 0.99, strong: Any = None, weak: Any = None, **fit_kwargs: Any) -> SSODResult:
    """Dense Teacher: a mean teacher whose region-selected dense predictions supervise the student.

    Each step: ``gfl_loss`` on the labelled images + ``unsup_weight · ramp(t) ·``
    :func:`~distill.functional.dense_pseudo_label_loss` on the unlabeled ones (teacher on the weak
    view, student on the strong one); the teacher follows the student by EMA (:class:`SSODTeacher`).

    Args:
        student: the detector (a :class:`~distill.models.detection.GFLDetector`, a zoo name such as
            ``"gfl_student"``, or a factory).
        train_loader: the labelled scenes (:class:`~distill.batch.DenseBatch` with boxes and labels).
        val_loader: evaluated each epoch for the student and the EMA teacher (mAP through
            :func:`distill.train.dense_eval.detection_evaluator` unless ``evaluator`` is given).
        epochs: passes over ``unlabeled_loader``.
        unlabeled_loader: the unlabeled scenes (their boxes, if any, are ignored).
        ratio: the selected region's share of the points (the authors' code: 0.01).
        unsup_weight, cls_weight, box_weight: the unsupervised loss's weight and its logits and box
            terms' (code: 1, 4, 1).
        burn_in: optimizer steps (or, below 1, the fraction of the run's steps) with the unsupervised
            weight at 0; it then ramps up linearly over as many steps (the code: 5,000 of 180,000 steps;
            ours 0.3: the detectors here need part of a short run to produce usable predictions).
        ema_start: steps (or fraction) during which the teacher is a copy of the student (code: 3,000;
            ours 0.18, the code's 3:5 ratio to the burn-in).
        ema_decay: the EMA's α afterwards (code: 0.9996 over 180,000 steps; ours 0.99 for runs of a
            few hundred steps).
        strong, weak: the two views' perturbations ``(x, generator) -> x`` (default :func:`photometric`
            for the student, none for the teacher).
        run_dir, seed, progress, **fit_kwargs: passed to :func:`distill.fit` (optimizer, lr, schedule...).
    """
    loader_len = len(unlabeled_loader) if unlabeled_loader is not None and hasattr(unlabeled_loader, "__len__") else 0
    unsup = DenseTeacherLoss(ratio=ratio, cls_weight=cls_weight, box_weight=box_weight,
                             burn_in_steps=_steps(burn_in, epochs * loader_len, "burn_in"), weight=unsup_weight)
    return _run(unsup, student, train_loader, val_loader, epochs=epochs, unlabeled_loader=unlabeled_loader,
                run_dir=run_dir, seed=seed, progress=progress, ema_decay=ema_decay, ema_start=ema_start, strong=strong,
                weak=weak, fit_kwargs=fit_kwargs)


@register_strategy("dtg_ssod", "semi-supervised", DTG_PAPER)
def dtg_ssod(student: ModelSpec, train_loader: Iterable[Any], val_loader: Iterable[Any] | None = None, *,
             epochs: int, unlabeled_loader: Iterable[Any] | None = None, run_dir: str | None = None, seed: int = 0,
             progress: bool = True, score_threshold: float = 0.5, iou_threshold: float = 0.6, tau: float = 1.0,
             unsup_weight: float = 1.0, rank_weight: float = 1.0, burn_in: float | int = 0.3,
             ema_start: float | int = 0.18, ema_decay: float = 0.99, strong: Any = None, weak: Any = None,
             **fit_kwargs: Any) -> SSODResult:
    """DTG-SSOD: a mean teacher whose NMS clusters (Inverse NMS Clustering) and in-cluster score ranks
    (Rank Matching) supervise the student's dense candidates on unlabeled images.

    Each step: ``gfl_loss`` on the labelled images + ``unsup_weight · ramp(t) ·`` :class:`DTGLoss` on
    the unlabeled ones. The schedule (burn-in, EMA) is shared with :func:`dense_teacher`.

    Args:
        score_threshold: the teacher's candidates enter its NMS above this score (ours).
        iou_threshold: its NMS IoU threshold (ours: the detector's test-time 0.6).
        tau: Rank Matching's temperature (ours: 1).
        unsup_weight, rank_weight: the unsupervised loss's weight and Rank Matching's within it (ours: 1, 1).
        Other arguments: as :func:`dense_teacher`. Every default here is ours: only the paper's
        abstract could be read.
    """
    loader_len = len(unlabeled_loader) if unlabeled_loader is not None and hasattr(unlabeled_loader, "__len__") else 0
    unsup = DTGLoss(score_threshold=score_threshold, iou_threshold=iou_threshold, tau=tau, rank_weight=rank_weight,
                    burn_in_steps=_steps(burn_in, epochs * loader_len, "burn_in"), weight=unsup_weight)
    return _run(unsup, student, train_loader, val_loader, epochs=epochs, unlabeled_loader=unlabeled_loader,
                run_dir=run_dir, seed=seed, progress=progress, ema_decay=ema_decay, ema_start=ema_start, strong=strong,
                weak=weak, fit_kwargs=fit_kwargs)
