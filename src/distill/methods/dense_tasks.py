"""Task losses of the dense detectors: the detector's own training loss as a teacher-free Method.

A teacher is trained with ``Distiller(detector, None, losses={"gfl_loss": 1.0})`` and a student with
``losses={"gfl_loss": 1.0, "ld": 1.0}``. The math lives in :mod:`distill.models.detection`
(:func:`~distill.models.detection.assign_targets`, :func:`~distill.models.detection.gfl_losses`).
"""

from __future__ import annotations

from torch import Tensor, nn

from distill.batch import Batch, DenseBatch, View
from distill.methods._views import tap as _tap
from distill.methods.base import Method, Paper, register
from distill.models.detection import assign_targets, gfl_losses, grid_points

__all__ = ["GFLLoss"]


@register(
    "gfl_loss",
    "task",
    Paper(
        title="Generalized Focal Loss: Learning Qualified and Distributed Bounding Boxes for Dense Object Detection",
        authors="X. Li, W. Wang, L. Wu, S. Chen, X. Hu, J. Li, J. Tang, J. Yang",
        year=2020,
        arxiv="2006.04388",
        venue="NeurIPS",
    ),
)
class GFLLoss(Method):
    """GFL's detection loss: ``qfl_weight·QFL + giou_weight·GIoU + dfl_weight·DFL`` on ATSS-assigned points.

    Reads the student's ``"logits"`` ``(B, N, K)`` and tap ``"box_dist"`` ``(B, N, 4, R+1)`` (a
    :class:`~distill.models.detection.GFLDetector`, or any model with the same outputs, ``strides``
    and ``num_classes`` attributes) and the batch's ``boxes`` / ``labels`` (a
    :class:`~distill.batch.DenseBatch`). The points' geometry (strides) is read from the student in
    :meth:`bind_models`. Each term is normalised as
    :func:`~distill.models.detection.gfl_losses` says.

    Defaults: β = 2, weights QFL 1, GIoU 2, DFL 0.25, ATSS top-k 9 are the authors' GFocal
    configuration (implus/GFocal ``configs/gfl_r50_1x.py``; the paper's text could not be read here,
    only its abstract). Their code weights the GIoU and DFL terms of each positive by its highest
    predicted class score and normalises by the sum of those weights; we do the same.
    ``anchor_scale = 4`` (ATSS anchor side in strides) is ours; the config's 8 is for COCO's
    800-pixel images.
    """

    needs_teacher = False

    def __init__(self, qfl_weight: float = 1.0, giou_weight: float = 2.0, dfl_weight: float = 0.25,
                 beta: float = 2.0, topk: int = 9, anchor_scale: float = 4.0, weight: float = 1.0,
                 warmup_epochs: int = 0) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        for name, value in (("qfl_weight", qfl_weight), ("giou_weight", giou_weight), ("dfl_weight", dfl_weight),
                            ("beta", beta)):
            if value < 0:
                raise ValueError(f"gfl_loss: {name} must be >= 0, got {value}")
        if anchor_scale <= 0:
            raise ValueError(f"gfl_loss: anchor_scale must be > 0, got {anchor_scale}")
        if int(topk) != topk or topk < 1:
            raise ValueError(f"gfl_loss: topk must be a positive int, got {topk}")
        self.qfl_weight, self.giou_weight, self.dfl_weight = float(qfl_weight), float(giou_weight), float(dfl_weight)
        self.beta, self.topk, self.anchor_scale = float(beta), int(topk), float(anchor_scale)
        self.student_taps = ["box_dist"]
        self.strides: tuple[int, ...] | None = None
        self.num_classes: int | None = None

    def bind_models(self, student: nn.Module, teacher: nn.Module | None, example: Batch) -> None:
        strides, num_classes = getattr(student, "strides", None), getattr(student, "num_classes", None)
        if strides is None or num_classes is None:
            raise TypeError(f"gfl_loss needs a detector with 'strides' and 'num_classes' attributes (GFLDetector: "
                            f"distill.models.create('gfl_student')), got {type(student).__name__}")
        self.strides, self.num_classes = tuple(int(s) for s in strides), int(num_classes)

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        if self.strides is None or self.num_classes is None:
            raise RuntimeError("gfl_loss: bind_models(student, ...) must run first (Distiller.prepare does) so the "
                               "loss knows the detector's strides")
        if not isinstance(batch, DenseBatch) or batch.boxes is None or batch.labels is None:
            raise ValueError("gfl_loss needs a DenseBatch with boxes and labels (distill.data.scenes loaders yield "
                             f"them), got {type(batch).__name__}"
                             + ("" if not isinstance(batch, DenseBatch) else " without boxes/labels"))
        logits = student_view["logits"]
        box_dist = _tap(student_view, "box_dist", "student")
        points, strides = grid_points(tuple(batch.inputs.shape[-2:]), self.strides, device=logits.device,
                                      dtype=logits.dtype)
        if logits.shape[-1] != self.num_classes:
            raise ValueError(f"gfl_loss: the student has {self.num_classes} classes but logits of shape "
                             f"{tuple(logits.shape)}")
        assignment = assign_targets(points, strides, batch.boxes, batch.labels, self.num_classes, topk=self.topk,
                                    anchor_scale=self.anchor_scale)
        qfl, giou, dfl = gfl_losses(logits, box_dist, points, strides, assignment, beta=self.beta)
        return self.qfl_weight * qfl + self.giou_weight * giou + self.dfl_weight * dfl

    def extra_repr(self) -> str:
        return (f"qfl_weight={self.qfl_weight}, giou_weight={self.giou_weight}, dfl_weight={self.dfl_weight}, "
                f"beta={self.beta}, topk={self.topk}, anchor_scale={self.anchor_scale}, weight={self.weight}")
