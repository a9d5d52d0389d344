"""Bird's-eye-view (BEV) average precision of 3D box detectors, for the point-scene tasks.

A prediction matches a ground-truth box of its class when their **rotated** BEV IoU (the
overlap of the two oriented rectangles ``(x, y, dx, dy, yaw)`` on the ground plane, computed
exactly by convex polygon clipping in :func:`bev_iou`, written here) reaches the threshold. The
matching, the precision/recall accumulation and the AP itself are pycocotools' ``COCOeval``
(greedy matching by descending score, 101-point interpolated precision, at most 100 detections
per scene), fed our IoU matrix in place of its own axis-aligned one. KITTI's BEV AP uses
40 recall points and per-class thresholds (0.7 cars, 0.5 pedestrians); ours are
``iou_thresholds`` (default ``(0.25, 0.5)``, ours: the small CPU-trained models of this
project rarely reach 0.7) for every class.

Boxes are ``(n, 7)`` ``(x, y, z, dx, dy, dz, yaw)`` in metres (:mod:`distill.data.pointscenes`);
``z`` and ``dz`` do not enter the BEV IoU.
"""

from __future__ import annotations

import contextlib
import inspect
import io
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from distill.batch import DenseBatch

__all__ = ["bev_corners", "bev_evaluator", "bev_iou", "bev_map", "evaluate_bev", "polygon_area", "polygon_clip"]


def bev_corners(boxes: np.ndarray) -> np.ndarray:
    """``(n, ≥7)`` boxes → ``(n, 4, 2)`` BEV corners, counter-clockwise."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 7)
    x, y, dx, dy, yaw = boxes[:, 0], boxes[:, 1], boxes[:, 3], boxes[:, 4], boxes[:, 6]
    sx = np.array([1.0, -1.0, -1.0, 1.0])
    sy = np.array([1.0, 1.0, -1.0, -1.0])
    lx, ly = sx[None] * dx[:, None] / 2, sy[None] * dy[:, None] / 2
    c, s = np.cos(yaw)[:, None], np.sin(yaw)[:, None]
    return np.stack([x[:, None] + c * lx - s * ly, y[:, None] + s * lx + c * ly], axis=-1)


def polygon_area(poly: np.ndarray) -> float:
    """Area of a simple polygon ``(n, 2)`` (shoelace formula); 0 for fewer than 3 vertices."""
    if len(poly) < 3:
        return 0.0
    x, y = poly[:, 0], poly[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def polygon_clip(subject: np.ndarray, clip: np.ndarray) -> np.ndarray:
    """Sutherland–Hodgman: the part of convex polygon ``subject`` ``(n, 2)`` inside convex, counter-clockwise
    polygon ``clip`` ``(m, 2)``; ``(k, 2)`` (``k = 0`` when they do not overlap)."""
    out = [tuple(p) for p in subject]
    m = len(clip)
    for i in range(m):
        if not out:
            break
        a, b = clip[i], clip[(i + 1) % m]
        ex, ey = b[0] - a[0], b[1] - a[1]

        def side(p: tuple[float, float]) -> float:
            return ex * (p[1] - a[1]) - ey * (p[0] - a[0])  # > 0: left of a→b, inside

        pts, out = out, []
        for j in range(len(pts)):
            p, q = pts[j], pts[(j + 1) % len(pts)]
            sp, sq = side(p), side(q)
            if sp >= 0:
                out.append(p)
            if (sp >= 0) != (sq >= 0):
                t = sp / (sp - sq)
                out.append((p[0] + t * (q[0] - p[0]), p[1] + t * (q[1] - p[1])))
    return np.asarray(out, dtype=np.float64).reshape(-1, 2)


def bev_iou(a: np.ndarray | Tensor, b: np.ndarray | Tensor) -> np.ndarray:
    """Rotated BEV IoU of boxes ``a`` ``(n, 7)`` and ``b`` ``(m, 7)`` → ``(n, m)`` float64.

    ``IoU = |A ∩ B| / (|A| + |B| − |A ∩ B|)`` with ``A``, ``B`` the oriented ground rectangles
    ``(x, y, dx, dy, yaw)``; the intersection is the clipped polygon's shoelace area.
    """
    a = np.asarray(a.detach().cpu() if isinstance(a, Tensor) else a, dtype=np.float64).reshape(-1, 7)
    b = np.asarray(b.detach().cpu() if isinstance(b, Tensor) else b, dtype=np.float64).reshape(-1, 7)
    ca, cb = bev_corners(a), bev_corners(b)
    area_a, area_b = a[:, 3] * a[:, 4], b[:, 3] * b[:, 4]
    out = np.zeros((len(a), len(b)))
    ra = np.hypot(a[:, 3], a[:, 4]) / 2
    rb = np.hypot(b[:, 3], b[:, 4]) / 2
    for i in range(len(a)):
        for j in range(len(b)):
            if np.hypot(a[i, 0] - b[j, 0], a[i, 1] - b[j, 1]) >= ra[i] + rb[j]:
                continue  # circumscribed circles apart: no overlap
            inter = polygon_area(polygon_clip(ca[i], cb[j]))
            union = area_a[i] + area_b[j] - inter
            out[i, j] = inter / union if union > 0 else 0.0
    return out


def _cocoeval_class() -> type:
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as e:  # pragma: no cover - the extra is installed here
        raise ImportError("BEV AP needs pycocotools: pip install distill[dense]") from e

    class _RotatedEval(COCOeval):
        """COCOeval whose IoU is the rotated BEV IoU of the annotations' ``"box7"``."""

        def computeIoU(self, imgId: int, catId: int) -> Any:  # noqa: N802 (pycocotools' name)
            p = self.params
            gt = self._gts[imgId, catId]
            dt = self._dts[imgId, catId]
            if len(gt) == 0 or len(dt) == 0:
                return []
            order = np.argsort([-d["score"] for d in dt], kind="mergesort")
            dt = [dt[i] for i in order][: p.maxDets[-1]]
            return bev_iou(np.array([d["box7"] for d in dt]), np.array([g["box7"] for g in gt]))

    return COCO, _RotatedEval


def _as_np(t: Any, shape_tail: tuple[int, ...], dtype: Any) -> np.ndarray:
    arr = t.detach().cpu().numpy() if isinstance(t, Tensor) else np.asarray(t)
    return arr.astype(dtype).reshape(-1, *shape_tail)


def bev_map(predictions: Sequence[dict[str, Any]], targets: Sequence[dict[str, Any]] | Iterable[DenseBatch],
            iou_thresholds: Sequence[float] = (0.25, 0.5), num_classes: int | None = None) -> dict[str, float]:
    """BEV AP in % over scenes.

    Args:
        predictions: per scene ``dict(boxes (n, 7), scores (n,), labels (n,))``.
        targets: per scene ``dict(boxes (m, 7), labels (m,))``, or :class:`DenseBatch` es whose
            ``boxes``/``labels`` give them in order.
        iou_thresholds: rotated BEV IoU thresholds, each in (0, 1).
        num_classes: the categories to evaluate (default: every label seen).

    Returns:
        ``bev_ap`` (the mean over thresholds and classes with ground truth), ``bev_ap_<100·t>`` per
        threshold (e.g. ``bev_ap_50``), in %.

    Raises:
        ValueError: a threshold outside (0, 1), a count mismatch, a box that is not ``(n, 7)``, or
            no ground-truth box at all (AP is undefined).
    """
    thr = [float(t) for t in iou_thresholds]
    if not thr or any(not 0 < t < 1 for t in thr):
        raise ValueError(f"iou_thresholds must be numbers in (0, 1), got {list(iou_thresholds)}")
    tg: list[dict[str, Any]] = []
    for item in targets:
        if isinstance(item, DenseBatch):
            if item.boxes is None or item.labels is None:
                raise ValueError("bev_map: a DenseBatch without boxes/labels cannot be a target")
            tg += [{"boxes": b, "labels": lab} for b, lab in zip(item.boxes, item.labels)]
        else:
            tg.append(item)
    if len(tg) != len(predictions):
        raise ValueError(f"bev_map got {len(predictions)} predictions but {len(tg)} target scenes")
    for who, items in (("prediction", predictions), ("target", tg)):
        for i, d in enumerate(items):
            bx = d["boxes"]
            if tuple(np.shape(bx))[-1:] != (7,) and np.size(bx):
                raise ValueError(f"bev_map: {who} {i} has boxes of shape {tuple(np.shape(bx))}; expected (n, 7) "
                                 "(x, y, z, dx, dy, dz, yaw)")
    gt_boxes = [_as_np(d["boxes"], (7,), np.float64) for d in tg]
    gt_labels = [_as_np(d["labels"], (), np.int64) for d in tg]
    if sum(len(b) for b in gt_boxes) == 0:
        raise ValueError("bev_map: the targets hold no box; BEV AP is undefined")
    k = num_classes if num_classes is not None else int(max(int(lab.max()) for lab in gt_labels if len(lab)) + 1)
    COCO, RotatedEval = _cocoeval_class()
    images = [{"id": i} for i in range(len(tg))]
    cats = [{"id": c} for c in range(k)]
    anns, dets = [], []
    for i, (bx, lab) in enumerate(zip(gt_boxes, gt_labels)):
        for b, c in zip(bx, lab):
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(c), "box7": b.tolist(),
                         "area": float(b[3] * b[4]), "iscrowd": 0, "bbox": [0, 0, 1, 1]})
    for i, d in enumerate(predictions):
        bx = _as_np(d["boxes"], (7,), np.float64)
        sc = _as_np(d["scores"], (), np.float64)
        lab = _as_np(d["labels"], (), np.int64)
        for b, s, c in zip(bx, sc, lab):
            dets.append({"id": len(dets) + 1, "image_id": i, "category_id": int(c), "box7": b.tolist(),
                         "score": float(s), "area": float(b[3] * b[4]), "iscrowd": 0, "bbox": [0, 0, 1, 1]})
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "categories": cats, "annotations": anns}
        gt.createIndex()
        dt = COCO()
        dt.dataset = {"images": images, "categories": cats, "annotations": dets}
        dt.createIndex()
        ev = RotatedEval(gt, dt, iouType="bbox")
        ev.params.iouThrs = np.array(thr)
        ev.params.maxDets = [100]
        ev.params.areaRng = [[0.0, 1e10]]
        ev.params.areaRngLbl = ["all"]
        ev.evaluate()
        ev.accumulate()
    precision = ev.eval["precision"]  # (T, R, K, A=1, M=1); -1 for classes without ground truth
    out: dict[str, float] = {}
    per_t = []
    for ti, t in enumerate(thr):
        p = precision[ti, :, :, 0, 0]
        valid = p[:, (p > -1).all(axis=0)] if p.size else p
        ap = float(valid.mean() * 100) if valid.size else 0.0
        out[f"bev_ap_{round(t * 100)}"] = ap
        per_t.append(ap)
    out["bev_ap"] = float(np.mean(per_t))
    return out


def _predict(model: nn.Module, batch: DenseBatch) -> list[dict[str, Tensor]]:
    if not hasattr(model, "predict"):
        raise TypeError(f"{type(model).__name__} has no predict(...) -> list[dict(boxes (n, 7), scores, labels)]")
    params = inspect.signature(model.predict).parameters
    kwargs: dict[str, Any] = {}
    if "point_mask" in params and batch.point_mask is not None:
        kwargs["point_mask"] = batch.point_mask
    if "intrinsics" in params and "intrinsics" in batch.extras:
        kwargs["intrinsics"] = batch.extras["intrinsics"]
    return model.predict(batch.inputs, **kwargs)


@torch.no_grad()
def evaluate_bev(model: nn.Module, loader: Iterable[DenseBatch], *, device: torch.device | str | None = None,
                 iou_thresholds: Sequence[float] = (0.25, 0.5), num_classes: int | None = None) -> dict[str, float]:
    """BEV AP (:func:`bev_map`) of ``model.predict`` on every batch of ``loader``.

    ``model.predict(inputs, [point_mask=...], [intrinsics=...])`` must return per scene
    ``dict(boxes (n, 7), scores, labels)``; ``point_mask`` and ``intrinsics`` (the batch's
    ``extras["intrinsics"]``) are passed when its signature names them. The model is put in eval
    mode and restored.
    """
    was = model.training
    model.eval()
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    preds: list[dict[str, Tensor]] = []
    targets: list[dict[str, Tensor]] = []
    try:
        for batch in loader:
            if not isinstance(batch, DenseBatch) or batch.boxes is None or batch.labels is None:
                raise TypeError("evaluate_bev needs DenseBatch es with boxes (n, 7) and labels")
            out = _predict(model, batch.to(dev))
            preds += [{k: v.cpu() for k, v in p.items()} for p in out]
            targets += [{"boxes": b, "labels": lab} for b, lab in zip(batch.boxes, batch.labels)]
    finally:
        model.train(was)
    return bev_map(preds, targets, iou_thresholds, num_classes)


def bev_evaluator(iou_thresholds: Sequence[float] = (0.25, 0.5), num_classes: int | None = None) -> Any:
    """An ``evaluator`` for :func:`distill.fit`: the student's BEV AP as ``student_acc`` (and the
    teacher's as ``teacher_acc`` when asked and the teacher is a model), plus ``student_bev_ap_<t>``."""

    def evaluate(distiller: Any, loader: Iterable[DenseBatch], device: Any, with_teacher: bool = False) -> dict[str, float]:
        s = evaluate_bev(distiller.predictor(), loader, device=device, iou_thresholds=iou_thresholds,
                         num_classes=num_classes)
        out = {"student_acc": s["bev_ap"], **{f"student_{k}": v for k, v in s.items() if k != "bev_ap"}}
        teacher = distiller.teacher_module() if with_teacher else None
        if teacher is not None:
            t = evaluate_bev(teacher, loader, device=device, iou_thresholds=iou_thresholds, num_classes=num_classes)
            out["teacher_acc"] = t["bev_ap"]
        return out

    return evaluate
