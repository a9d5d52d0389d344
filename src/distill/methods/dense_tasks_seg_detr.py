"""Task losses of the dense models of issue 14: ``seg_ce`` (the segmenter) and ``detr_loss`` (the small DETR).

Family ``"task"``, no teacher: a teacher is trained with ``Distiller(model, None, losses={"seg_ce": 1.0})``
and a student with ``losses={"seg_ce": 1.0, <a distillation method>: w}``. The math lives beside
the models (:func:`distill.models.segmentation.seg_cross_entropy`,
:func:`distill.models.detr.hungarian_match`, :func:`distill.models.detr.detr_set_loss`).
"""

from __future__ import annotations

from torch import Tensor

from distill.batch import Batch, DenseBatch, View
from distill.methods._views import tap as _tap
from distill.methods.base import Method, Paper, register
from distill.models.detr import detr_set_loss, hungarian_match, normalize_boxes
from distill.models.segmentation import IGNORE_INDEX, seg_cross_entropy


@register(
    "seg_ce",
    "task",
    Paper(
        title="Fully Convolutional Networks for Semantic Segmentation",
        authors="J. Long, E. Shelhamer, T. Darrell",
        year=2015,
        arxiv="1411.4038",
        venue="CVPR",
    ),
)
class SegCE(Method):
    """Pixel-wise cross-entropy on the semantic masks (no teacher), logits upsampled to the mask.

    Reads the student's ``"logits"`` ``(B, K, h, w)`` and ``batch.targets`` ``(B, H, W)`` long;
    pixels equal to ``ignore_index`` (255 in :class:`~distill.batch.DenseBatch`) carry no loss. The
    loss is the mean over labelled pixels of ``−log softmax(up(z))_y`` (``up`` bilinear to ``H x W``);
    FCN sums over pixels instead (see :func:`distill.models.segmentation.seg_cross_entropy`).
    """

    needs_teacher = False
    needs_targets = True

    def __init__(self, ignore_index: int = IGNORE_INDEX, weight: float = 1.0, warmup_epochs: int = 0) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        self.ignore_index = int(ignore_index)

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        logits = _tap(student_view, "logits", "student")
        if logits.dim() != 4:
            raise ValueError(f"seg_ce needs segmentation logits (B, K, h, w), got {tuple(logits.shape)}")
        if batch.targets is None or batch.targets.dim() != 3:
            got = None if batch.targets is None else tuple(batch.targets.shape)
            raise ValueError(f"seg_ce needs semantic masks (B, H, W) as batch.targets, got {got}")
        return seg_cross_entropy(logits, batch.targets, self.ignore_index)

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, weight={self.weight}"


@register(
    "detr_loss",
    "task",
    Paper(
        title="End-to-End Object Detection with Transformers",
        authors="N. Carion, F. Massa, G. Synnaeve, N. Usunier, A. Kirillov, S. Zagoruyko",
        year=2020,
        arxiv="2005.12872",
        venue="ECCV",
    ),
)
class DETRLoss(Method):
    """DETR's Hungarian set loss (no teacher): match queries to objects, then CE + λ_L1·L1 + λ_giou·GIoU.

    ``ce_weight·L_ce + l1_weight·L_L1 + giou_weight·L_giou`` (terms of
    :func:`distill.models.detr.detr_set_loss`), the matching of
    :func:`distill.models.detr.hungarian_match` with costs ``cost_class``, ``cost_bbox``,
    ``cost_giou``; with ``aux_loss`` the same loss (matched anew) is added for every earlier
    decoder layer (the paper's auxiliary decoding losses). Reads the student's ``"logits"``
    ``(B, Q, K+1)`` and taps ``"box_out"`` ``(B, Q, 4)`` (plus ``"aux_cls_out"`` and
    ``"aux_box_out"`` ``(B, L-1, Q, ·)``), and ``batch.boxes`` (xyxy pixels, normalised here by
    the input's ``H, W``) and ``batch.labels``.

    Defaults: no-object weight 0.1 (the paper: the no-object log-probability "down-weighted by a
    factor 10"); λ_L1 = 5, λ_giou = 2 and matching costs 1, 5, 2 are the authors' code's
    (facebookresearch/detr ``main.py``: ``bbox_loss_coef``, ``giou_loss_coef``, ``set_cost_*``).
    """

    needs_teacher = False

    def __init__(self, no_object_weight: float = 0.1, ce_weight: float = 1.0, l1_weight: float = 5.0,
                 giou_weight: float = 2.0, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 aux_loss: bool = True, weight: float = 1.0, warmup_epochs: int = 0) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        for name, v in (("no_object_weight", no_object_weight), ("ce_weight", ce_weight), ("l1_weight", l1_weight),
                        ("giou_weight", giou_weight), ("cost_class", cost_class), ("cost_bbox", cost_bbox),
                        ("cost_giou", cost_giou)):
            if v < 0:
                raise ValueError(f"detr_loss: {name} must be >= 0, got {v}")
        self.no_object_weight, self.ce_weight = float(no_object_weight), float(ce_weight)
        self.l1_weight, self.giou_weight = float(l1_weight), float(giou_weight)
        self.costs = (float(cost_class), float(cost_bbox), float(cost_giou))
        self.aux_loss = bool(aux_loss)
        self.student_taps = ["box_out"] + (["aux_cls_out", "aux_box_out"] if self.aux_loss else [])

    def _one(self, logits: Tensor, boxes: Tensor, tb: list[Tensor], tl: list[Tensor]) -> Tensor:
        matches = hungarian_match(logits, boxes, tb, tl, *self.costs)
        t = detr_set_loss(logits, boxes, tb, tl, matches, self.no_object_weight)
        return self.ce_weight * t["ce"] + self.l1_weight * t["l1"] + self.giou_weight * t["giou"]

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        if not isinstance(batch, DenseBatch) or batch.boxes is None or batch.labels is None:
            raise ValueError("detr_loss needs a DenseBatch with boxes and labels (the detection targets)")
        logits = _tap(student_view, "logits", "student")
        boxes = _tap(student_view, "box_out", "student")
        hw = tuple(batch.inputs.shape[-2:])
        tb = [normalize_boxes(b[:, :4], hw) for b in batch.boxes]
        tl = list(batch.labels)
        loss = self._one(logits, boxes, tb, tl)
        if self.aux_loss:
            aux_logits = _tap(student_view, "aux_cls_out", "student")
            aux_boxes = _tap(student_view, "aux_box_out", "student")
            for i in range(aux_logits.shape[1]):
                loss = loss + self._one(aux_logits[:, i], aux_boxes[:, i], tb, tl)
        return loss

    def extra_repr(self) -> str:
        return (f"no_object_weight={self.no_object_weight}, ce/l1/giou=({self.ce_weight}, {self.l1_weight}, "
                f"{self.giou_weight}), costs={self.costs}, aux_loss={self.aux_loss}, weight={self.weight}")
