"""A small one-stage anchor-free detector in the style of GFL, with its box geometry and losses.

Li et al., "Generalized Focal Loss: Learning Qualified and Distributed Bounding Boxes for Dense
Object Detection", NeurIPS 2020, arXiv 2006.04388. The detector predicts, at every point of a
feature pyramid, a joint class-quality score per class (trained with the Quality Focal Loss) and a
*distribution* over ``reg_max + 1`` integer distances for each of the four box sides (trained with
the Distribution Focal Loss and a GIoU loss on the box the distributions' expectations give).

Layout (``width = w``; every conv is 3x3 unless said; the backbone uses BatchNorm, the head
GroupNorm as GFL's head does)::

    image (B, C, H, W)
    stem     conv s2 -> w/4            stride 2
    stage    conv s2 -> w/2, conv      stride 4
    stage    conv s2 -> w,   conv      stride 8    -> backbone_out.0
    stage    conv s2 -> 2w,  conv      stride 16   -> backbone_out.1
    (stage   conv s2 -> 2w,  conv      stride 32   -> backbone_out.2 when strides has 32)
    FPN-lite lateral 1x1 -> C_fpn, top-down nearest-upsample + add, 3x3 out conv -> fpn_out.l
    head     shared by the levels: cls tower (head_convs x conv-GN-ReLU) -> conv -> cls_out.l (B, K, H_l, W_l)
                                   reg tower (head_convs x conv-GN-ReLU) -> conv x scale_l -> reg_out.l
                                   (B, 4 (reg_max + 1), H_l, W_l), channels side-major: [l bins, t bins, r bins, b bins]

``forward`` returns ``{"logits": (B, N, K), "box_dist": (B, N, 4, reg_max + 1)}`` with the levels'
points flattened level by level, row-major inside a level (``N = sum_l H_l W_l``); ``box_dist``
holds the raw (pre-softmax) bin logits and is also the tap ``"box_dist"``. The point of cell
``(i, j)`` of a level with stride ``s`` sits at ``((j + 0.5) s, (i + 0.5) s)`` pixels (ours; the
authors' mmdetection code puts anchor centres at ``(j s, i s)``); a side's distance is
``s * sum_k k softmax(p)_k`` pixels.

Departures from the paper's COCO setting (ResNet + 5-level FPN, 256-wide heads of 4 convs,
``reg_max = 16``, 800-pixel images), chosen for 64x64 scenes on a CPU and documented per
argument: a 4-5 stage plain-conv backbone, 2-3 pyramid levels, 2 head convs, ``reg_max = 8`` (a
side of a 64-pixel image is at most 8 strides of 8), ATSS anchors of ``anchor_scale = 4`` strides
(the paper's code: 8, for COCO's larger objects).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.models.registry import register_model

__all__ = [
    "Assignment", "GFLDetector", "assign_targets", "batched_nms", "box_iou", "decode_boxes", "distribution_focal_loss",
    "encode_boxes", "gfl_losses", "gfl_student", "gfl_teacher", "giou_loss", "grid_points", "integral", "nms",
    "quality_focal_loss",
]


# ============================================================================================
# box geometry
# ============================================================================================


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise IoU of boxes ``a`` ``(n, 4)`` and ``b`` ``(m, 4)`` in ``(x1, y1, x2, y2)``: ``(n, m)``.

    ``IoU = |a ∩ b| / (|a| + |b| - |a ∩ b|)`` with continuous coordinates (no ``+1`` pixel
    convention); a degenerate pair (zero union) has IoU 0.
    """
    if a.shape[-1] != 4 or b.shape[-1] != 4:
        raise ValueError(f"box_iou takes (n, 4) and (m, 4) xyxy boxes, got {tuple(a.shape)} and {tuple(b.shape)}")
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def _aligned_iou_giou(pred: Tensor, target: Tensor, eps: float = 1e-7) -> tuple[Tensor, Tensor]:
    area_p = (pred[:, 2] - pred[:, 0]).clamp(min=0) * (pred[:, 3] - pred[:, 1]).clamp(min=0)
    area_t = (target[:, 2] - target[:, 0]).clamp(min=0) * (target[:, 3] - target[:, 1]).clamp(min=0)
    wh = (torch.minimum(pred[:, 2:], target[:, 2:]) - torch.maximum(pred[:, :2], target[:, :2])).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    union = area_p + area_t - inter + eps
    iou = inter / union
    enclose_wh = (torch.maximum(pred[:, 2:], target[:, 2:]) - torch.minimum(pred[:, :2], target[:, :2])).clamp(min=0)
    enclose = enclose_wh[:, 0] * enclose_wh[:, 1] + eps
    return iou, iou - (enclose - union) / enclose


def giou_loss(pred: Tensor, target: Tensor) -> Tensor:
    """GIoU loss of aligned boxes: ``1 - GIoU(p, t)`` per row, ``(n,)``.

    ``GIoU = IoU - (|C| - |p ∪ t|) / |C|`` with ``C`` the smallest box enclosing both (Rezatofighi
    et al., CVPR 2019), so the loss lies in ``[0, 2]``. ``pred``, ``target``: ``(n, 4)`` xyxy.
    """
    if pred.shape != target.shape or pred.shape[-1] != 4:
        raise ValueError(f"giou_loss takes two (n, 4) xyxy tensors of one shape, got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")
    return 1.0 - _aligned_iou_giou(pred, target)[1]


def aligned_iou(pred: Tensor, target: Tensor) -> Tensor:
    """IoU of aligned boxes ``(n, 4)`` xyxy: ``(n,)`` (GFL's quality target)."""
    return _aligned_iou_giou(pred, target)[0]


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression: indices ``(k,)`` long of the kept boxes, by decreasing score.

    Visits boxes ``(n, 4)`` xyxy in order of ``scores`` ``(n,)`` (ties: the lower index first) and
    keeps a box unless an already kept one overlaps it with IoU ``> iou_threshold``.
    """
    if boxes.dim() != 2 or boxes.shape[-1] != 4 or scores.shape != boxes.shape[:1]:
        raise ValueError(f"nms takes boxes (n, 4) and scores (n,), got {tuple(boxes.shape)} and {tuple(scores.shape)}")
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    over = (box_iou(boxes[order], boxes[order]) > iou_threshold).cpu()
    removed = torch.zeros(len(order), dtype=torch.bool)
    keep: list[int] = []
    for i in range(len(order)):
        if removed[i]:
            continue
        keep.append(i)
        removed |= over[i]
    return order[torch.tensor(keep, dtype=torch.long, device=order.device)]


def batched_nms(boxes: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float) -> Tensor:
    """NMS inside each class: boxes of different ``labels`` ``(n,)`` never suppress each other.

    Shifts each class's boxes by ``label * (max coordinate + 1)`` so that classes cannot overlap,
    then runs :func:`nms`. Returns kept indices ``(k,)`` by decreasing score.
    """
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    offset = labels.to(boxes.dtype)[:, None] * (boxes.max() - boxes.min() + 1)
    return nms(boxes + offset, scores, iou_threshold)


# ============================================================================================
# points, distances, decoding
# ============================================================================================


def level_sizes(image_hw: tuple[int, int], strides: tuple[int, ...]) -> list[tuple[int, int]]:
    """``(H_l, W_l)`` of each level: a stride-2 3x3 conv with padding 1 maps ``n`` to ``ceil(n / 2)``."""
    h, w = int(image_hw[0]), int(image_hw[1])
    sizes, s = [], 1
    for stride in strides:
        while s < stride:
            h, w, s = (h + 1) // 2, (w + 1) // 2, s * 2
        sizes.append((h, w))
    return sizes


def grid_points(image_hw: tuple[int, int], strides: tuple[int, ...], *, device: Any = None,
                dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """The points of every level: ``(points (N, 2) xy pixels, strides (N,))``.

    Level by level, row-major inside a level; cell ``(i, j)`` of stride ``s`` is at
    ``((j + 0.5) s, (i + 0.5) s)``.
    """
    pts, strs = [], []
    for (h, w), s in zip(level_sizes(image_hw, strides), strides):
        ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) * s
        xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) * s
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        pts.append(torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1))
        strs.append(torch.full((h * w,), float(s), device=device, dtype=dtype))
    return torch.cat(pts), torch.cat(strs)


def integral(box_dist: Tensor) -> Tensor:
    """Expected distance of each side: ``sum_k k softmax(p)_k``, ``(..., 4, R+1) -> (..., 4)`` in stride units."""
    bins = torch.arange(box_dist.shape[-1], device=box_dist.device, dtype=box_dist.dtype)
    return box_dist.softmax(-1) @ bins


def decode_boxes(distances: Tensor, points: Tensor, strides: Tensor) -> Tensor:
    """Boxes from side distances: ``(x - l s, y - t s, x + r s, y + b s)``.

    ``distances`` ``(..., N, 4)`` ``(l, t, r, b)`` in stride units, ``points`` ``(N, 2)``,
    ``strides`` ``(N,)``; returns ``(..., N, 4)`` xyxy pixels.
    """
    d = distances * strides[:, None]
    return torch.cat([points - d[..., :2], points + d[..., 2:]], dim=-1)


def encode_boxes(boxes: Tensor, points: Tensor, strides: Tensor, max_distance: float | None = None) -> Tensor:
    """Side distances of boxes from points in stride units: ``((x - x1)/s, (y - y1)/s, (x2 - x)/s, (y2 - y)/s)``.

    ``boxes`` ``(..., N, 4)`` xyxy, ``points`` ``(N, 2)``, ``strides`` ``(N,)``; ``(..., N, 4)``.
    With ``max_distance`` the result is clamped to ``[0, max_distance]`` (the DFL target needs
    ``< reg_max``). The inverse of :func:`decode_boxes` for points inside the box.
    """
    d = torch.cat([points - boxes[..., :2], boxes[..., 2:] - points], dim=-1) / strides[:, None]
    return d if max_distance is None else d.clamp(min=0.0, max=max_distance)


# ============================================================================================
# assignment (ATSS)
# ============================================================================================


@dataclass
class Assignment:
    """Which ground truth each point learns from.

    Attributes:
        labels: ``(B, N)`` long, the class of the assigned box, ``num_classes`` for background.
        box_targets: ``(B, N, 4)`` xyxy pixels of the assigned box (zeros for background).
        positive: ``(B, N)`` bool.
        gt_index: ``(B, N)`` long, index into the image's box list, ``-1`` for background.
    """

    labels: Tensor
    box_targets: Tensor
    positive: Tensor
    gt_index: Tensor


def _level_slices(strides: Tensor) -> list[slice]:
    change = (strides[1:] != strides[:-1]).nonzero().flatten().tolist()
    bounds = [0, *[c + 1 for c in change], len(strides)]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def assign_targets(points: Tensor, strides: Tensor, boxes: list[Tensor], labels: list[Tensor], num_classes: int,
                   *, topk: int = 9, anchor_scale: float = 4.0) -> Assignment:
    """ATSS assignment (Zhang et al., "Bridging the Gap Between Anchor-based and Anchor-free
    Detection via Adaptive Training Sample Selection", CVPR 2020, arXiv 1912.02424), as GFL uses it.

    Each point carries a square anchor of side ``anchor_scale * stride`` centred on it. For each
    ground-truth box: on each level take the ``topk`` points closest (L2) to the box centre; the
    candidates' anchor IoUs give a threshold ``mean + std`` (unbiased std, as the authors' code);
    candidates with IoU ``>=`` threshold whose point lies inside the box (every side distance
    ``> 0.01`` px) are positives. A point positive for several boxes takes the one of highest IoU.

    Args:
        points: ``(N, 2)`` xy pixels, strides ``(N,)``: :func:`grid_points` (levels contiguous).
        boxes: per image ``(n_i, 4)`` xyxy pixels; labels per image ``(n_i,)`` long in ``[0, K)``.
        num_classes: ``K`` (the background label).
        topk: candidates per level per box (ATSS/GFL: 9).
        anchor_scale: anchor side in strides (GFL's config: 8 for COCO; ours 4 for 64-pixel scenes).
    """
    if len(boxes) != len(labels):
        raise ValueError(f"assign_targets: {len(boxes)} box tensors but {len(labels)} label tensors")
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    n = points.shape[0]
    half = anchor_scale * strides[:, None] / 2
    anchors = torch.cat([points - half, points + half], dim=1)
    levels = _level_slices(strides)
    out_labels, out_boxes, out_gt = [], [], []
    for gt, lab in zip(boxes, labels):
        gt = gt.to(points)
        if gt.dim() != 2 or gt.shape[-1] != 4 or lab.shape != gt.shape[:1]:
            raise ValueError(f"assign_targets takes boxes (n, 4) with labels (n,), got {tuple(gt.shape)} and "
                             f"{tuple(lab.shape)}")
        if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= num_classes):
            raise ValueError(f"box labels must lie in [0, {num_classes}), got {lab.tolist()}")
        g = gt.shape[0]
        gt_index = torch.full((n,), -1, dtype=torch.long, device=points.device)
        if g:
            ious = box_iou(anchors, gt)  # (N, G)
            centres = (gt[:, :2] + gt[:, 2:]) / 2
            dist = torch.cdist(points, centres)  # (N, G)
            cand = torch.cat([dist[sl].topk(min(topk, sl.stop - sl.start), dim=0, largest=False).indices + sl.start
                              for sl in levels])  # (C, G)
            cand_iou = ious.gather(0, cand)
            thr = cand_iou.mean(0) + (cand_iou.std(0) if cand.shape[0] > 1 else 0.0)
            p = points[cand]  # (C, G, 2)
            inside = torch.stack([p[..., 0] - gt[:, 0], p[..., 1] - gt[:, 1], gt[:, 2] - p[..., 0],
                                  gt[:, 3] - p[..., 1]], -1).amin(-1) > 0.01
            ok = (cand_iou >= thr[None]) & inside
            score = torch.full((n, g), -1.0, device=points.device, dtype=points.dtype)
            cols = torch.arange(g, device=points.device).expand_as(cand)
            score[cand[ok], cols[ok]] = ious[cand[ok], cols[ok]]
            best, arg = score.max(1)
            gt_index = torch.where(best >= 0, arg, gt_index)
        pos = gt_index >= 0
        safe = gt_index.clamp(min=0)
        out_gt.append(gt_index)
        out_labels.append(torch.where(pos, lab.to(points.device).long()[safe] if g else safe, num_classes))
        out_boxes.append(torch.where(pos[:, None], gt[safe] if g else torch.zeros(n, 4).to(points), 0.0))
    gt_index = torch.stack(out_gt)
    return Assignment(torch.stack(out_labels), torch.stack(out_boxes), gt_index >= 0, gt_index)


# ============================================================================================
# losses
# ============================================================================================


def quality_focal_loss(logits: Tensor, labels: Tensor, quality: Tensor, beta: float = 2.0) -> Tensor:
    """Quality Focal Loss (GFL, Eq. QFL), elementwise ``(N, K)``.

    ``QFL(σ) = -|y - σ|^β ((1 - y) log(1 - σ) + y log σ)`` with ``σ = sigmoid(logits)`` and the
    soft target ``y`` = ``quality`` for the point's labelled class and 0 for every other class and
    for background points (``labels == K``).

    Args:
        logits: ``(N, K)``; labels ``(N,)`` long in ``[0, K]``; quality ``(N,)`` in ``[0, 1]``
            (read only where ``labels < K``); beta: the focusing exponent (GFL: 2).
    """
    if logits.dim() != 2 or labels.shape != logits.shape[:1] or quality.shape != labels.shape:
        raise ValueError(f"quality_focal_loss takes logits (N, K), labels (N,), quality (N,); got "
                         f"{tuple(logits.shape)}, {tuple(labels.shape)}, {tuple(quality.shape)}")
    k = logits.shape[1]
    target = torch.zeros_like(logits)
    pos = labels < k
    target[pos, labels[pos]] = quality[pos].to(logits.dtype)
    sigma = logits.sigmoid()
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return bce * (target - sigma).abs().pow(beta)


def distribution_focal_loss(bin_logits: Tensor, target: Tensor) -> Tensor:
    """Distribution Focal Loss (GFL, Eq. DFL), ``(M,)``.

    For a continuous target ``y`` between bins ``y_i = floor(y)`` and ``y_{i+1} = y_i + 1``:
    ``DFL(S) = -((y_{i+1} - y) log S_i + (y - y_i) log S_{i+1})``, ``S = softmax(bin_logits)``.

    Args:
        bin_logits: ``(M, R + 1)``; target ``(M,)`` in ``[0, R)`` (clamp to ``R - ε`` first).
    """
    r = bin_logits.shape[-1] - 1
    if target.shape != bin_logits.shape[:1]:
        raise ValueError(f"distribution_focal_loss takes bin_logits (M, R+1) and target (M,), got "
                         f"{tuple(bin_logits.shape)} and {tuple(target.shape)}")
    if target.numel() and (float(target.min()) < 0 or float(target.max()) >= r):
        raise ValueError(f"DFL targets must lie in [0, {r}) for {r + 1} bins, got range "
                         f"[{float(target.min()):.3f}, {float(target.max()):.3f}]")
    left = target.floor().long()
    w_left = (left + 1).to(target.dtype) - target
    logp = bin_logits.log_softmax(-1)
    return -(w_left * logp.gather(1, left[:, None])[:, 0]
             + (1 - w_left) * logp.gather(1, (left + 1)[:, None])[:, 0])


def gfl_losses(logits: Tensor, box_dist: Tensor, points: Tensor, strides: Tensor, assignment: Assignment,
               *, beta: float = 2.0) -> tuple[Tensor, Tensor, Tensor]:
    """GFL's three losses, ``(qfl, giou, dfl)`` scalars, unweighted.

    ``qfl = Σ_{points, classes} QFL / max(N_pos, 1)`` with the quality target = IoU(decoded
    prediction (detached), assigned box) at positives; ``giou = Σ_pos w (1 - GIoU) / Σ_pos w`` and
    ``dfl = Σ_pos w mean_sides DFL / Σ_pos w`` with ``w`` the positive's highest class score
    ``max_k sigmoid(logit_k)`` (detached) and DFL targets clamped to ``reg_max - 0.1`` (both as the
    authors' GFocal code; zero when there is no positive).

    Args:
        logits: ``(B, N, K)``; box_dist ``(B, N, 4, R+1)``; points ``(N, 2)``; strides ``(N,)``;
        assignment: :func:`assign_targets`'s result for these points.
    """
    b, n, k = logits.shape
    if box_dist.shape[:3] != (b, n, 4):
        raise ValueError(f"box_dist must be (B, N, 4, R+1) = ({b}, {n}, 4, R+1), got {tuple(box_dist.shape)}")
    if points.shape[0] != n or assignment.positive.shape != (b, n):
        raise ValueError(f"{n} predicted points but {points.shape[0]} grid points and an assignment of shape "
                         f"{tuple(assignment.positive.shape)}: the points must come from the same image size")
    pos = assignment.positive
    num_pos = int(pos.sum())
    quality = torch.zeros(b, n, device=logits.device, dtype=logits.dtype)
    if num_pos == 0:
        zero = box_dist.sum() * 0.0
        qfl = quality_focal_loss(logits.reshape(-1, k), assignment.labels.reshape(-1), quality.reshape(-1), beta)
        return qfl.sum(), zero, zero
    bi, pi = pos.nonzero(as_tuple=True)
    dist_pos = box_dist[bi, pi]  # (P, 4, R+1)
    pred_boxes = decode_boxes(integral(dist_pos), points[pi], strides[pi])
    target_boxes = assignment.box_targets[bi, pi].to(pred_boxes)
    quality[bi, pi] = aligned_iou(pred_boxes.detach(), target_boxes).clamp(min=0).to(quality.dtype)
    qfl = quality_focal_loss(logits.reshape(-1, k), assignment.labels.reshape(-1), quality.reshape(-1), beta)
    weight = logits.detach()[bi, pi].sigmoid().amax(-1)
    wsum = weight.sum().clamp(min=1e-12)
    giou = (weight * giou_loss(pred_boxes, target_boxes)).sum() / wsum
    r = box_dist.shape[-1] - 1
    ltrb = encode_boxes(target_boxes, points[pi], strides[pi], max_distance=r - 0.1)
    dfl = distribution_focal_loss(dist_pos.reshape(-1, r + 1), ltrb.reshape(-1)).view(-1, 4).mean(1)
    return qfl.sum() / max(num_pos, 1), giou, (weight * dfl).sum() / wsum


# ============================================================================================
# the model
# ============================================================================================


def _groups(c: int) -> int:
    return math.gcd(8, c)


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _conv_gn(c: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.GroupNorm(_groups(c), c), nn.ReLU(inplace=True))


class GFLDetector(nn.Module):
    """GFL-style one-stage detector (see the module docstring for the layout and departures).

    Args:
        num_classes: ``K`` object classes (no background logit: a point is background when every
            sigmoid score is low).
        in_channels: image channels.
        width: ``w``; stage widths ``w/4, w/2, w, 2w(, 2w)``.
        fpn_channels: ``C_fpn`` of the pyramid and head (default ``w``).
        head_convs: convs per head tower (GFL: 4; ours 2).
        reg_max: ``R``, bins ``0..R`` per side in stride units (GFL: 16; ours 8).
        strides: pyramid strides, ``(8, 16)`` or ``(8, 16, 32)``.
        prior_prob: initial foreground probability of the class logits (GFL: 0.01).

    Taps (``nn.Identity``): ``backbone_out.l`` ``(B, C_l, H_l, W_l)``, ``fpn_out.l``
    ``(B, C_fpn, H_l, W_l)``, ``cls_out.l`` ``(B, K, H_l, W_l)``, ``reg_out.l``
    ``(B, 4 (R+1), H_l, W_l)`` (side-major), ``box_dist`` ``(B, N, 4, R+1)``.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 64, fpn_channels: int | None = None,
                 head_convs: int = 2, reg_max: int = 8, strides: tuple[int, ...] = (8, 16),
                 prior_prob: float = 0.01) -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("in_channels", in_channels), ("width", width),
                            ("reg_max", reg_max)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if width % 4:
            raise ValueError(f"width must be a multiple of 4 (the stem has width/4 channels), got {width}")
        strides = tuple(int(s) for s in strides)
        if strides not in ((8, 16), (8, 16, 32)):
            raise ValueError(f"strides must be (8, 16) or (8, 16, 32), got {strides}")
        if not 0 < prior_prob < 1:
            raise ValueError(f"prior_prob must be in (0, 1), got {prior_prob}")
        c_fpn = width if fpn_channels is None else int(fpn_channels)
        self.num_classes, self.reg_max, self.strides = num_classes, reg_max, strides
        w = width
        self.stem = _conv_bn(in_channels, w // 4, 2)
        self.stage4 = nn.Sequential(_conv_bn(w // 4, w // 2, 2), _conv_bn(w // 2, w // 2))
        level_widths = [w, 2 * w, 2 * w][: len(strides)]
        stages, cin = [], w // 2
        for c in level_widths:
            stages.append(nn.Sequential(_conv_bn(cin, c, 2), _conv_bn(c, c)))
            cin = c
        self.stages = nn.ModuleList(stages)
        self.backbone_out = nn.ModuleList(nn.Identity() for _ in strides)
        self.lateral = nn.ModuleList(nn.Conv2d(c, c_fpn, 1) for c in level_widths)
        self.fpn_conv = nn.ModuleList(nn.Conv2d(c_fpn, c_fpn, 3, 1, 1) for _ in strides)
        self.fpn_out = nn.ModuleList(nn.Identity() for _ in strides)
        self.cls_tower = nn.Sequential(*[_conv_gn(c_fpn) for _ in range(head_convs)])
        self.reg_tower = nn.Sequential(*[_conv_gn(c_fpn) for _ in range(head_convs)])
        self.cls_head = nn.Conv2d(c_fpn, num_classes, 3, 1, 1)
        self.reg_head = nn.Conv2d(c_fpn, 4 * (reg_max + 1), 3, 1, 1)
        self.scales = nn.Parameter(torch.ones(len(strides)))
        self.cls_out = nn.ModuleList(nn.Identity() for _ in strides)
        self.reg_out = nn.ModuleList(nn.Identity() for _ in strides)
        self.box_dist = nn.Identity()
        for m in [*self.cls_tower.modules(), *self.reg_tower.modules(), self.cls_head, self.reg_head]:
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls_head.bias, -math.log((1 - prior_prob) / prior_prob))
        self.tap_points = (*(f"backbone_out.{i}" for i in range(len(strides))),
                           *(f"fpn_out.{i}" for i in range(len(strides))),
                           *(f"cls_out.{i}" for i in range(len(strides))),
                           *(f"reg_out.{i}" for i in range(len(strides))), "box_dist")

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """``x`` ``(B, C, H, W)`` -> ``{"logits": (B, N, K), "box_dist": (B, N, 4, R+1)}``."""
        if x.dim() != 4 or x.shape[1] != self.stem[0].in_channels:
            raise ValueError(f"GFLDetector expects images (B, {self.stem[0].in_channels}, H, W), got {tuple(x.shape)}")
        h = self.stage4(self.stem(x))
        feats = []
        for stage, tap in zip(self.stages, self.backbone_out):
            h = stage(h)
            feats.append(tap(h))
        laterals = [lat(f) for lat, f in zip(self.lateral, feats)]
        for i in range(len(laterals) - 2, -1, -1):
            laterals[i] = laterals[i] + F.interpolate(laterals[i + 1], size=laterals[i].shape[-2:], mode="nearest")
        b = x.shape[0]
        logits, dists = [], []
        for i, (lat, conv) in enumerate(zip(laterals, self.fpn_conv)):
            p = self.fpn_out[i](conv(lat))
            cls = self.cls_out[i](self.cls_head(self.cls_tower(p)))
            reg = self.reg_out[i](self.reg_head(self.reg_tower(p)) * self.scales[i])
            logits.append(cls.flatten(2).transpose(1, 2))
            dists.append(reg.flatten(2).transpose(1, 2))
        box_dist = torch.cat(dists, 1).reshape(b, -1, 4, self.reg_max + 1)
        return {"logits": torch.cat(logits, 1), "box_dist": self.box_dist(box_dist)}

    def points(self, image_hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """``(points (N, 2) xy pixels, strides (N,))`` for images of size ``image_hw``, on the model's device."""
        p = next(self.parameters())
        return grid_points(image_hw, self.strides, device=p.device, dtype=p.dtype)

    def decode(self, box_dist: Tensor, points: Tensor, strides: Tensor) -> Tensor:
        """``box_dist`` ``(B, N, 4, R+1)`` -> boxes ``(B, N, 4)`` xyxy pixels (the distributions' expectations)."""
        return decode_boxes(integral(box_dist), points, strides)

    @torch.no_grad()
    def predict(self, x: Tensor, score_threshold: float = 0.05, iou_threshold: float = 0.6,
                max_detections: int = 100, pre_nms: int = 1000) -> list[dict[str, Tensor]]:
        """Detections per image: ``[{"boxes": (n, 4) xyxy, "scores": (n,), "labels": (n,) long}]``.

        Each (point, class) pair whose score ``sigmoid(logit)`` exceeds ``score_threshold`` is a
        candidate; the ``pre_nms`` best go through class-wise NMS at ``iou_threshold``, and the
        ``max_detections`` best survivors are returned, boxes clipped to the image (GFL's test
        settings: 0.05, 0.6, 100, 1000). Runs in the model's current mode: call ``.eval()`` first.
        """
        out = self(x)
        pts, strs = self.points(tuple(x.shape[-2:]))
        boxes_all = self.decode(out["box_dist"], pts, strs)
        hgt, wid = x.shape[-2:]
        limit = torch.tensor([wid, hgt, wid, hgt], dtype=boxes_all.dtype, device=boxes_all.device)
        boxes_all = torch.minimum(boxes_all.clamp(min=0), limit)
        scores_all = out["logits"].sigmoid()
        k = scores_all.shape[-1]
        results = []
        for boxes, scores in zip(boxes_all, scores_all):
            flat = scores.reshape(-1)
            cand = (flat > score_threshold).nonzero().flatten()
            if cand.numel() > pre_nms:
                cand = cand[flat[cand].topk(pre_nms).indices]
            point, label = cand // k, cand % k
            b, s = boxes[point], flat[cand]
            keep = batched_nms(b, s, label, iou_threshold)[:max_detections]
            results.append({"boxes": b[keep], "scores": s[keep], "labels": label[keep]})
        return results


@register_model("gfl_teacher")
def gfl_teacher(num_classes: int = 10, in_channels: int = 1, width: int = 64, reg_max: int = 8,
                strides: tuple[int, ...] = (8, 16)) -> GFLDetector:
    """GFL-style teacher: width 64 (backbone 16-32-64-128, FPN/head 64 channels)."""
    return GFLDetector(num_classes, in_channels, width=width, reg_max=reg_max, strides=strides)


@register_model("gfl_student")
def gfl_student(num_classes: int = 10, in_channels: int = 1, width: int = 16, reg_max: int = 8,
                strides: tuple[int, ...] = (8, 16)) -> GFLDetector:
    """GFL-style student: width 16 (backbone 4-8-16-32, FPN/head 16 channels), ~1/14 of the teacher's FLOPs."""
    return GFLDetector(num_classes, in_channels, width=width, reg_max=reg_max, strides=strides)
