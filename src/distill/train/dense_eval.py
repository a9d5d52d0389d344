"""Evaluation of dense predictors: detection mAP (COCO's, through pycocotools) and segmentation
mIoU / pixel accuracy (torchmetrics), plus the ``evaluator`` adapters of :func:`distill.fit`.

The metrics come from the field's libraries, not from code of ours: ``pycocotools.COCOeval``
(the reference implementation of COCO's AP, run in memory and silenced) and torchmetrics'
``MulticlassJaccardIndex`` / ``MulticlassAccuracy``. Both are optional dependencies, imported
inside the functions: ``pip install 'distill[dense]'``.

Typical use::

    from distill.data import get_dataset
    from distill.train.dense_eval import detection_evaluator, segmentation_evaluator

    val = get_dataset("mnist_scenes", split="test").loader(64)
    distill.fit(distiller, train, val, epochs=12, evaluator=detection_evaluator)      # student_acc = mAP
    distill.fit(seg_distiller, train, val, epochs=12, evaluator=segmentation_evaluator(11))  # = mIoU
"""

from __future__ import annotations

import contextlib
import importlib
import io
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.batch import DenseBatch, as_batch
from distill.taps import logits_of

__all__ = ["detection_evaluator", "detection_map", "evaluate_detection", "evaluate_segmentation",
           "segmentation_evaluator"]

IGNORE_INDEX = 255
"""Semantic-mask value of pixels that no metric counts."""


def _require(module: str, what: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{what} needs the optional package {module.split('.')[0]!r}: "
                          "pip install 'distill[dense]'") from e


# --------------------------------------------------------------------------------------------
# detection
# --------------------------------------------------------------------------------------------


def _targets_list(batches_or_targets: Iterable[Any]) -> list[tuple[Tensor, Tensor]]:
    """Per image ``(boxes (n, 4), labels (n,))`` from DenseBatches or mappings ``{boxes, labels}``."""
    out: list[tuple[Tensor, Tensor]] = []
    for k, item in enumerate(batches_or_targets):
        if isinstance(item, DenseBatch):
            if item.boxes is None or item.labels is None:
                raise ValueError(f"detection_map: batch {k} carries no boxes/labels (an unlabelled DenseBatch)")
            out += list(zip(item.boxes, item.labels))
        elif isinstance(item, Mapping) and "boxes" in item and "labels" in item:
            out.append((item["boxes"], item["labels"]))
        else:
            raise TypeError(f"detection_map: ground truth item {k} is a {type(item).__name__}; expected a DenseBatch "
                            "or a mapping with 'boxes' (n, 4) xyxy and 'labels' (n,)")
    return out


def _check_boxes(boxes: Any, labels: Any, scores: Any, where: str) -> int:
    if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4:
        got = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
        raise ValueError(f"detection_map: {where} boxes must be a tensor (n, 4) xyxy, got {got}")
    n = boxes.shape[0]
    for name, value in (("labels", labels), ("scores", scores)):
        if value is None and name == "scores":
            continue
        if not isinstance(value, Tensor) or tuple(value.shape) != (n,):
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"detection_map: {where} {name} must be a tensor ({n},) for its {n} boxes, got {got}")
    if n and bool((boxes[:, 2:] < boxes[:, :2]).any()):
        raise ValueError(f"detection_map: {where} has a box with x2 < x1 or y2 < y1 (boxes are (x1, y1, x2, y2))")
    return n


def _xywh(boxes: Tensor) -> list[list[float]]:
    b = boxes.detach().double().cpu()
    return torch.cat([b[:, :2], b[:, 2:] - b[:, :2]], 1).tolist()


def detection_map(predictions: Sequence[Mapping[str, Tensor]], batches_or_targets: Iterable[Any]) -> dict[str, float]:
    """COCO mean average precision of ``predictions`` against the ground truth, in %.

    ``predictions[i]`` is image i's ``{"boxes": (n, 4) xyxy pixels, "scores": (n,), "labels": (n,)
    long}``; ``batches_or_targets`` gives the same images' ground truth in the same order: the
    :class:`~distill.batch.DenseBatch` es of a loader (their ``boxes`` / ``labels``), or one mapping
    ``{"boxes": (m, 4), "labels": (m,)}`` per image.

    The numbers are ``pycocotools.COCOeval``'s (iouType ``"bbox"``, every area, at most 100
    detections per image): a detection matches an unmatched ground truth of its class with IoU >= t
    in descending score order; precision is interpolated (the running maximum from the right) at
    101 recall points ``0, 0.01, ..., 1``; AP is their mean; the mean runs over the classes that
    have ground truth (a class with ground truth but no detection counts 0, a class without
    ground truth is left out). ``map`` averages t = 0.50, 0.55, ..., 0.95; ``map_50`` and
    ``map_75`` take t = 0.5 and 0.75. Box areas and IoUs are ``w · h`` with ``w = x2 − x1``.

    Returns ``{"map", "map_50", "map_75"}`` in % (0 for no detection at all).

    Raises:
        ValueError: the counts of images differ, a tensor has the wrong shape, or there is no
            ground-truth box at all (the mean would be empty).
    """
    truth = _targets_list(batches_or_targets)
    if len(truth) != len(predictions):
        raise ValueError(f"detection_map: {len(predictions)} predictions for {len(truth)} ground-truth images; "
                         "give one prediction dict per image, in the loader's order")
    images, annotations, detections, classes = [], [], [], set()
    for i, ((gt_boxes, gt_labels), pred) in enumerate(zip(truth, predictions)):
        _check_boxes(gt_boxes, gt_labels, None, f"image {i}'s ground-truth")
        if not isinstance(pred, Mapping) or not {"boxes", "scores", "labels"} <= set(pred):
            raise ValueError(f"detection_map: prediction {i} must be a mapping with 'boxes', 'scores' and 'labels', "
                             f"got {sorted(pred) if isinstance(pred, Mapping) else type(pred).__name__}")
        _check_boxes(pred["boxes"], pred["labels"], pred["scores"], f"prediction {i}'s")
        images.append({"id": i})
        for box, label in zip(_xywh(gt_boxes), gt_labels.tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": int(label), "bbox": box,
                                "area": box[2] * box[3], "iscrowd": 0})
            classes.add(int(label))
        for box, label, score in zip(_xywh(pred["boxes"]), pred["labels"].tolist(), pred["scores"].tolist()):
            detections.append({"image_id": i, "category_id": int(label), "bbox": box, "score": float(score)})
            classes.add(int(label))
    if not annotations:
        raise ValueError(f"detection_map: the {len(truth)} images hold no ground-truth box, so mAP is undefined")
    if not detections:
        return {"map": 0.0, "map_50": 0.0, "map_75": 0.0}
    coco_mod = _require("pycocotools.coco", "detection_map")
    eval_mod = _require("pycocotools.cocoeval", "detection_map")
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and its table
        gt = coco_mod.COCO()
        gt.dataset = {"images": images, "annotations": annotations,
                      "categories": [{"id": c, "name": str(c)} for c in sorted(classes)]}
        gt.createIndex()
        dt = gt.loadRes(detections)
        ev = eval_mod.COCOeval(gt, dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = [max(float(s), 0.0) for s in ev.stats[:3]]  # -1: nothing to average (no class with ground truth)
    return {"map": 100.0 * stats[0], "map_50": 100.0 * stats[1], "map_75": 100.0 * stats[2]}


class _Modes:
    """Eval mode for the block, each module's own mode restored after (a frozen BN stays frozen)."""

    def __init__(self, *models: nn.Module | None) -> None:
        self.modes = {m: m.training for model in models if model is not None for m in model.modules()}

    def __enter__(self) -> None:
        for m in self.modes:
            m.eval()

    def __exit__(self, *exc: Any) -> None:
        for m, mode in self.modes.items():
            m.training = mode


def _dense_batches(loader: Iterable[Any], device: torch.device | str | None) -> Iterable[DenseBatch]:
    for k, raw in enumerate(loader):
        batch = as_batch(raw)
        if not isinstance(batch, DenseBatch):
            raise TypeError(f"dense evaluation needs DenseBatch batches (a SceneSet's loader), got a "
                            f"{type(batch).__name__} at batch {k}")
        yield batch.to(device) if device is not None else batch


def _predictions(model: nn.Module, x: Tensor) -> list[dict[str, Tensor]]:
    out = model.predict(x)  # type: ignore[operator]
    if not isinstance(out, (list, tuple)) or len(out) != x.shape[0]:
        raise ValueError(f"{type(model).__name__}.predict must return one dict per image ({x.shape[0]}), got "
                         f"{len(out) if isinstance(out, (list, tuple)) else type(out).__name__}")
    return [{k: v.detach().cpu() for k, v in p.items()} for p in out]


def _check_detector(model: Any, who: str) -> None:
    if not callable(getattr(model, "predict", None)):
        raise TypeError(f"{who}: the model ({type(model).__name__}) has no predict(images) -> list of "
                        "{'boxes', 'scores', 'labels'} dicts; the detectors of distill.models have one")


@torch.no_grad()
def evaluate_detection(model: nn.Module, loader: Iterable[Any], *, device: torch.device | str | None = None
                       ) -> dict[str, float]:
    """COCO mAP (:func:`detection_map`) of a detector on a loader of :class:`~distill.batch.DenseBatch`.

    ``model.predict(images (B, C, H, W)) -> [{"boxes" (n, 4) xyxy, "scores" (n,), "labels" (n,)}] * B``
    runs in eval mode (each module's mode restored after). Returns ``{"map", "map_50", "map_75"}`` in %.
    """
    _check_detector(model, "evaluate_detection")
    preds: list[dict[str, Tensor]] = []
    truth: list[dict[str, Tensor]] = []
    with _Modes(model):
        for batch in _dense_batches(loader, device):
            preds += _predictions(model, batch.inputs)
            truth += _truth(batch)
    return detection_map(preds, truth)


def _truth(batch: DenseBatch) -> list[dict[str, Tensor]]:
    if batch.boxes is None or batch.labels is None:
        raise ValueError("detection evaluation needs batches with boxes and labels (an unlabelled DenseBatch came)")
    return [{"boxes": b.cpu(), "labels": y.cpu()} for b, y in zip(batch.boxes, batch.labels)]


def _models(distiller: Any, with_teacher: bool) -> tuple[nn.Module, nn.Module | None]:
    student = distiller.predictor() if hasattr(distiller, "predictor") else distiller.student
    teacher = distiller.teacher_module() if with_teacher and hasattr(distiller, "teacher_module") else None
    return student, teacher


@torch.no_grad()
def detection_evaluator(distiller: Any, loader: Iterable[Any], device: torch.device | str | None = None, *,
                        with_teacher: bool = True) -> dict[str, float]:
    """The ``evaluator`` of :func:`distill.fit` for detectors: COCO mAP of the student (and of the
    teacher when ``with_teacher`` and the Distiller's teacher source wraps one model) in one pass.

    Returns ``student_acc`` (= ``student_map``, the headline that picks ``best.pt``),
    ``student_map``, ``student_map_50``, ``student_map_75`` and, with a teacher, the same four
    ``teacher_*`` entries, in %.
    """
    student, teacher = _models(distiller, with_teacher)
    if not callable(getattr(student, "predict", None)):
        student = distiller.student  # a method's predictor wrapper: the detector itself predicts
    _check_detector(student, "detection_evaluator (student)")
    if teacher is not None and not callable(getattr(teacher, "predict", None)):
        teacher = None  # a teacher without a detector's predict (a classifier...): no teacher score
    s_preds: list[dict[str, Tensor]] = []
    t_preds: list[dict[str, Tensor]] = []
    truth: list[dict[str, Tensor]] = []
    with _Modes(student, teacher):
        for batch in _dense_batches(loader, device):
            s_preds += _predictions(student, batch.inputs)
            if teacher is not None:
                t_preds += _predictions(teacher, batch.inputs)
            truth += _truth(batch)
    out: dict[str, float] = {}
    for who, preds in (("student", s_preds), ("teacher", t_preds if teacher is not None else None)):
        if preds is None:
            continue
        scores = detection_map(preds, truth)
        out[f"{who}_acc"] = scores["map"]
        out.update({f"{who}_{k}": v for k, v in scores.items()})
    return out


# --------------------------------------------------------------------------------------------
# segmentation
# --------------------------------------------------------------------------------------------


class _SegTotals:
    """torchmetrics' mIoU and pixel accuracy, accumulated over batches."""

    def __init__(self, num_classes: int) -> None:
        cls = _require("torchmetrics.classification", "segmentation evaluation")
        self.iou = cls.MulticlassJaccardIndex(num_classes=num_classes, ignore_index=IGNORE_INDEX, average="macro")
        self.acc = cls.MulticlassAccuracy(num_classes=num_classes, ignore_index=IGNORE_INDEX, average="micro")
        self.num_classes = num_classes
        self.seen = 0

    def update(self, output: Any, masks: Tensor) -> None:
        logits = logits_of(output)
        if logits.dim() != 4 or logits.shape[1] != self.num_classes:
            raise ValueError(f"segmentation evaluation: the model's logits must be (B, {self.num_classes}, h, w), got "
                             f"{tuple(logits.shape)}")
        if logits.shape[-2:] != masks.shape[-2:]:
            logits = F.interpolate(logits.float(), size=tuple(masks.shape[-2:]), mode="bilinear", align_corners=False)
        pred = logits.argmax(1).cpu()
        target = masks.cpu().long()
        bad = (target != IGNORE_INDEX) & ((target < 0) | (target >= self.num_classes))
        if bool(bad.any()):
            raise ValueError(f"segmentation evaluation: mask values must lie in [0, {self.num_classes}) or be "
                             f"{IGNORE_INDEX}; found {target[bad].unique()[:10].tolist()}")
        self.iou.update(pred, target)
        self.acc.update(pred, target)
        self.seen += int((target != IGNORE_INDEX).sum())

    def compute(self) -> dict[str, float]:
        if self.seen == 0:
            raise ValueError("segmentation evaluation: the loader yielded no labelled pixel (all 255 or no batch)")
        return {"miou": 100.0 * float(self.iou.compute()), "pixel_acc": 100.0 * float(self.acc.compute())}


def _check_classes(num_classes: Any) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2 (background + classes; 11 for the scene sets), "
                         f"got {num_classes!r}")
    return num_classes


def _masks(batch: DenseBatch) -> Tensor:
    if batch.targets is None or batch.targets.dim() != 3:
        got = None if batch.targets is None else tuple(batch.targets.shape)
        raise ValueError(f"segmentation evaluation needs semantic masks (B, H, W) as batch.targets, got {got}")
    return batch.targets


@torch.no_grad()
def evaluate_segmentation(model: nn.Module, loader: Iterable[Any], num_classes: int, *,
                          device: torch.device | str | None = None) -> dict[str, float]:
    """Mean IoU and pixel accuracy of a segmenter on a loader of :class:`~distill.batch.DenseBatch`.

    ``model(images)`` gives logits ``(B, K, h, w)`` (or a dict / output holding ``"logits"``),
    upsampled bilinearly (``align_corners=False``) to the masks' ``(H, W)`` when smaller; the
    prediction is their argmax. Pixels whose mask is 255 are ignored.

    ``miou`` = torchmetrics' ``MulticlassJaccardIndex(average="macro", ignore_index=255)``: per class
    ``TP / (TP + FP + FN)`` over the whole loader, averaged over the classes that occur in the
    masks or the predictions (a class absent from both is left out); ``pixel_acc`` = correct / counted
    pixels. Both in %.
    """
    totals = _SegTotals(_check_classes(num_classes))
    with _Modes(model):
        for batch in _dense_batches(loader, device):
            totals.update(model(batch.inputs), _masks(batch))
    return totals.compute()


def segmentation_evaluator(num_classes: int) -> Callable[..., dict[str, float]]:
    """The ``evaluator`` of :func:`distill.fit` for segmenters of ``num_classes`` classes (11 for the
    scene sets: background + 10): ``student_acc`` (= ``student_miou``), ``student_miou``,
    ``student_pixel_acc`` and, with a teacher model, the same ``teacher_*`` entries, in %."""
    classes = _check_classes(num_classes)

    @torch.no_grad()
    def evaluator(distiller: Any, loader: Iterable[Any], device: torch.device | str | None = None, *,
                  with_teacher: bool = True) -> dict[str, float]:
        student, teacher = _models(distiller, with_teacher)
        s_tot = _SegTotals(classes)
        t_tot = _SegTotals(classes) if teacher is not None else None
        with _Modes(student, teacher):
            for batch in _dense_batches(loader, device):
                masks = _masks(batch)
                s_tot.update(student(batch.inputs), masks)
                if t_tot is not None:
                    t_tot.update(teacher(batch.inputs), masks)  # type: ignore[misc]
        out: dict[str, float] = {}
        for who, tot in (("student", s_tot), ("teacher", t_tot)):
            if tot is None:
                continue
            scores = tot.compute()
            out[f"{who}_acc"] = scores["miou"]
            out.update({f"{who}_{k}": v for k, v in scores.items()})
        return out

    evaluator.__name__ = evaluator.__qualname__ = f"segmentation_evaluator({classes})"
    return evaluator
