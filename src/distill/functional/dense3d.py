"""The math of point-cloud (BEV) detection and its distillation: CenterPoint's task loss, LiDAR
Distillation, PointDistiller and the sparse 3D KD of Yang et al.

Conventions: BEV maps are ``(B, C, H, W)`` on a :class:`distill.models.pointcloud.BEVGrid`
(row = y, column = x); 3D boxes are ``(n, 7)`` ``(x, y, z, dx, dy, dz, yaw)`` in metres. Nothing here
detaches the teacher (the methods pass detached tensors) and nothing holds state: PointDistiller's
graph adapters live in :mod:`distill.methods.dense3d` and their outputs are passed in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.functional._precision import fp32
from distill.models.pointcloud import BEVGrid

__all__ = [
    "centernet_focal_loss",
    "center_reg_loss",
    "box_region_weights",
    "lidar_distill_loss",
    "topk_cells",
    "knn_indices",
    "graph_features",
    "reweighted_graph_loss",
    "pivotal_mask_soft",
    "pivotal_mask_rank",
    "pivotal_logit_kd",
    "merge_teacher_boxes",
]


def _maps(a: Tensor, b: Tensor, what: str) -> None:
    if a.dim() != 4 or a.shape != b.shape:
        raise ValueError(f"{what} needs two (B, C, H, W) maps of equal shape, got {tuple(a.shape)} and {tuple(b.shape)}")


# --------------------------------------------------------------------------------------------
# the task loss: CenterPoint
# --------------------------------------------------------------------------------------------


def centernet_focal_loss(logits: Tensor, target: Tensor, alpha: float = 2.0, beta: float = 4.0,
                         eps: float = 1e-4) -> Tensor:
    r"""CenterNet's penalty-reduced focal loss on a heatmap, as CenterPoint trains its class heatmap.

    .. math::
        L = -\frac{1}{N} \sum_{b,k,h,w} \begin{cases}
            (1 - p)^{\alpha} \log p & y = 1 \\
            (1 - y)^{\beta} p^{\alpha} \log (1 - p) & \text{otherwise}
        \end{cases}, \qquad p = \operatorname{clamp}(\sigma(x), \epsilon, 1 - \epsilon)

    ``logits`` ``(B, K, H, W)``, ``target`` ``(B, K, H, W)`` in [0, 1] (Gaussian peaks, exactly 1 at
    the centres) → scalar; ``N = max(1, #{y = 1})``, the number of centres.

    Paper: Zhou, Wang, Krähenbühl, "Objects as Points", 2019, arXiv 1904.07850 (eq. 1: α = 2, β = 4);
    CenterPoint (Yin, Zhou, Krähenbühl, CVPR 2021, arXiv 2006.11275) uses it unchanged. The clamp ε
    = 1e-4 is the authors' code's (``_sigmoid``), not the paper's.
    """
    _maps(logits, target, "centernet_focal_loss")
    p = fp32(logits).sigmoid().clamp(eps, 1 - eps)
    t = fp32(target)
    pos = t.eq(1).float()
    pos_loss = torch.log(p) * (1 - p) ** alpha * pos
    neg_loss = torch.log(1 - p) * p ** alpha * (1 - t) ** beta * (1 - pos)
    return -(pos_loss.sum() + neg_loss.sum()) / pos.sum().clamp_min(1.0)


def center_reg_loss(reg: Tensor, index: Tensor, mask: Tensor, target: Tensor,
                    code_weights: Tensor | None = None) -> Tensor:
    r"""L1 box regression read at the box centres, CenterPoint's ``RegLoss``.

    .. math:: L = \frac{1}{N} \sum_{b, m : \text{mask}_{bm}} \sum_{c} w_c \, | \hat r_{b, c, \text{index}_{bm}} - r_{bmc} |

    ``reg`` ``(B, D, H, W)`` predicted maps, ``index`` ``(B, M)`` long (the centre cell ``row·W + col``),
    ``mask`` ``(B, M)`` bool, ``target`` ``(B, M, D)``, ``code_weights`` ``(D,)`` (default all 1) →
    scalar; ``N = max(1, #mask)``.
    """
    b, d = reg.shape[:2]
    if index.shape != mask.shape or tuple(target.shape) != (*index.shape, d) or index.shape[0] != b:
        raise ValueError(f"center_reg_loss: reg {tuple(reg.shape)}, index {tuple(index.shape)}, mask "
                         f"{tuple(mask.shape)}, target {tuple(target.shape)} do not agree (expected index/mask (B, M), "
                         f"target (B, M, {d}))")
    pred = fp32(reg).flatten(2).gather(2, index.unsqueeze(1).expand(-1, d, -1)).transpose(1, 2)  # (B, M, D)
    diff = (pred - fp32(target)).abs() * mask.unsqueeze(-1).float()
    if code_weights is not None:
        diff = diff * code_weights.to(diff)
    return diff.sum() / mask.float().sum().clamp_min(1.0)


# --------------------------------------------------------------------------------------------
# LiDAR Distillation
# --------------------------------------------------------------------------------------------


def box_region_weights(boxes: list[Tensor], grid: BEVGrid) -> tuple[Tensor, int]:
    r"""Per BEV cell, the sum over the boxes covering it of ``1 / (cells in that box)``.

    .. math:: w_{b,h,w} = \sum_{r} \frac{\mathbb 1[(h, w) \in A_r]}{\max(1, |A_r|)}

    ``A_r`` is the set of cells whose centre lies inside box r's axis-aligned BEV extent
    ``[x - dx/2, x + dx/2] × [y - dy/2, y + dy/2]`` (the yaw is ignored, as in the authors' code).
    ``boxes``: B tensors ``(n_b, ≥ 5)`` → ``(weights (B, H, W), total number of boxes)``.
    """
    h, w = grid.height, grid.width
    device = boxes[0].device if boxes else torch.device("cpu")
    cx = grid.x_range[0] + (torch.arange(w, device=device, dtype=torch.float32) + 0.5) * grid.cell
    cy = grid.y_range[0] + (torch.arange(h, device=device, dtype=torch.float32) + 0.5) * grid.cell
    out = torch.zeros(len(boxes), h, w, device=device)
    total = 0
    for i, bx in enumerate(boxes):
        if bx.numel() == 0:
            continue
        bx = bx.float()
        inx = (cx.view(1, 1, w) >= (bx[:, 0] - bx[:, 3] / 2).view(-1, 1, 1)) & \
              (cx.view(1, 1, w) <= (bx[:, 0] + bx[:, 3] / 2).view(-1, 1, 1))
        iny = (cy.view(1, h, 1) >= (bx[:, 1] - bx[:, 4] / 2).view(-1, 1, 1)) & \
              (cy.view(1, h, 1) <= (bx[:, 1] + bx[:, 4] / 2).view(-1, 1, 1))
        region = (inx & iny).float()  # (n, H, W)
        out[i] = (region / region.flatten(1).sum(1).clamp_min(1.0).view(-1, 1, 1)).sum(0)
        total += int(bx.shape[0])
    return out, total


def lidar_distill_loss(student: Tensor, teacher: Tensor, weights: Tensor, num_boxes: int) -> Tensor:
    r"""LiDAR Distillation's feature mimicking inside boxes: the L2 distance between the teacher's and
    the student's BEV feature vectors, averaged over each box's cells, averaged over the boxes.

    .. math:: L = \frac{1}{R} \sum_{b,h,w} w_{b,h,w} \, \lVert F^T_{b,:,h,w} - F^S_{b,:,h,w} \rVert_2

    ``student``, ``teacher`` ``(B, C, H, W)`` (the student already at the teacher's width),
    ``weights`` ``(B, H, W)`` from :func:`box_region_weights`, ``num_boxes`` R (0 gives a zero loss
    that still reaches the student's graph) → scalar.

    Paper: Wei, Wei, Rao, Li, Zhou, Lu, "LiDAR Distillation: Bridging the Beam-Induced Domain Gap
    for 3D Object Detection", ECCV 2022, arXiv 2203.14956. The distance per cell (the channel-wise
    L2 norm, not its square) and the region (the teacher's boxes, axis-aligned) follow the authors'
    code (``tools/train_utils/train_mimic_utils.py``, ``mimic_mode='roi'``); that code divides the sum
    by ``B`` times the padded number of proposals per scene, here by the number of boxes R.
    """
    _maps(student, teacher, "lidar_distill_loss")
    if tuple(weights.shape) != (student.shape[0], *student.shape[2:]):
        raise ValueError(f"lidar_distill_loss: weights must be (B, H, W) = "
                         f"{(student.shape[0], *student.shape[2:])}, got {tuple(weights.shape)}")
    dist = (fp32(teacher) - fp32(student)).pow(2).sum(1).add(1e-12).sqrt()  # (B, H, W); eps: finite gradient at 0
    return (dist * weights).sum() / max(1, int(num_boxes))


# --------------------------------------------------------------------------------------------
# PointDistiller
# --------------------------------------------------------------------------------------------


def topk_cells(importance: Tensor, n: int) -> Tensor:
    """The ``n`` cells (or points) of largest ``importance`` ``(B, N)`` per sample → ``(B, n)`` long."""
    if not 1 <= n <= importance.shape[1]:
        raise ValueError(f"cannot pick {n} of {importance.shape[1]} cells: 1 <= n <= N expected")
    return importance.topk(n, dim=1).indices


def knn_indices(reference: Tensor, query: Tensor, k: int, candidates: Tensor | None = None) -> Tensor:
    """For each query ``(B, S, C)`` its ``k`` nearest rows of ``reference`` ``(B, N, C)`` by Euclidean
    distance (itself included when the query is a reference row) → ``(B, S, k)`` long. ``candidates``
    ``(B, N)`` bool limits the neighbours to those rows (the occupied pillars); when a sample has fewer
    than ``k`` candidates the rest are the nearest of the others."""
    if not 1 <= k <= reference.shape[1]:
        raise ValueError(f"k = {k} neighbours requested among {reference.shape[1]} candidates: 1 <= k <= N expected")
    d = torch.cdist(fp32(query), fp32(reference))  # (B, S, N)
    if candidates is not None:
        d = d + (~candidates).unsqueeze(1).float() * 1e30  # finite: ties among non-candidates stay ordered
    return d.topk(k, dim=2, largest=False).indices


def graph_features(features: Tensor, centres: Tensor, neighbours: Tensor) -> Tensor:
    r"""The local graph of each sampled centre: ``[f_{neighbour}, f_{centre}]`` per edge.

    ``features`` ``(B, N, C)``, ``centres`` ``(B, S)`` long, ``neighbours`` ``(B, S, k)`` long →
    ``(B, 2C, S, k)`` (neighbour features first, then the centre's repeated; DGCNN's edge input
    without the difference, the authors' ``fuse_mode='idendity'``).
    """
    b, n, c = features.shape
    s, k = neighbours.shape[1:]
    nb = features.gather(1, neighbours.reshape(b, s * k, 1).expand(-1, -1, c)).view(b, s, k, c)
    ce = features.gather(1, centres.unsqueeze(-1).expand(-1, -1, c)).unsqueeze(2).expand(-1, -1, k, -1)
    return torch.cat([nb, ce], dim=-1).permute(0, 3, 1, 2)


def reweighted_graph_loss(student: Tensor, teacher: Tensor, importance: Tensor, tau: float) -> Tensor:
    r"""PointDistiller's reweighted local distillation loss.

    .. math::
        L = \frac{1}{B\,D\,S\,k} \sum_{b,d,s,j} \omega_{b,s} \left(G^T_{b,d,s,j} - G^S_{b,d,s,j}\right)^2,
        \qquad \omega_{b,s} = S \cdot \operatorname{softmax}_s(n_{b,s} / \tau)

    ``student``, ``teacher`` ``(B, D, S, k)`` the graph features after each side's graph convolution
    (the adapters of :class:`distill.methods.dense3d.PointDistiller`), ``importance`` ``(B, S)`` the
    importance n of the S sampled centres (points per voxel), ``tau`` the softmax temperature → scalar.

    Paper: Zhang, Dong, Tai, Ma, "PointDistiller: Structured Knowledge Distillation Towards Efficient
    and Compact 3D Detection", CVPR 2023, arXiv 2205.11098. Only the abstract could be read here: the
    form above, the importance (points per pillar) and τ = 1e-2 are the authors' code's
    (``mmdet3d/models/detectors/voxelnet.py``, ``get_voxel_knn``), which softmaxes over the sampled
    voxels of the whole batch; here over each sample's S voxels.
    """
    _maps(student, teacher, "reweighted_graph_loss")
    if tuple(importance.shape) != tuple(student.shape[:1]) + tuple(student.shape[2:3]):
        raise ValueError(f"reweighted_graph_loss: importance must be (B, S) = {(student.shape[0], student.shape[2])}, "
                         f"got {tuple(importance.shape)}")
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    s = student.shape[2]
    omega = F.softmax(fp32(importance) / tau, dim=1) * s  # (B, S)
    return ((fp32(teacher) - fp32(student)).pow(2) * omega[:, None, :, None]).mean()


# --------------------------------------------------------------------------------------------
# Towards Efficient 3D Object Detection with KD (sparse KD)
# --------------------------------------------------------------------------------------------


def pivotal_mask_soft(teacher_logits: Tensor, target_heatmap: Tensor) -> Tensor:
    r"""The soft pivotal-position mask: the teacher's confidence times the ground truth's Gaussian.

    .. math:: m_{b,h,w} = \max_k \sigma(T_{b,k,h,w}) \cdot \max_k Y_{b,k,h,w}

    ``teacher_logits``, ``target_heatmap`` ``(B, K, H, W)`` → ``(B, H, W)``.
    """
    _maps(teacher_logits, target_heatmap, "pivotal_mask_soft")
    return fp32(teacher_logits).sigmoid().amax(1) * fp32(target_heatmap).amax(1)


def pivotal_mask_rank(teacher_logits: Tensor, k: int) -> Tensor:
    """The rank pivotal-position mask: 1 at the cells of the ``k`` largest teacher responses of each
    sample (over classes and cells), 0 elsewhere. ``(B, K, H, W)`` → ``(B, H, W)``."""
    b, c, h, w = teacher_logits.shape
    if not 1 <= k <= c * h * w:
        raise ValueError(f"rank k = {k} must lie in [1, {c * h * w}]")
    top = teacher_logits.detach().flatten(1).topk(k, dim=1).indices % (h * w)
    mask = torch.zeros(b, h * w, device=teacher_logits.device)
    mask.scatter_(1, top, 1.0)
    return mask.view(b, h, w)


def pivotal_logit_kd(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor) -> Tensor:
    r"""Pivotal-position logit KD: the squared difference of the heatmaps' probabilities, only where
    the mask says.

    .. math:: L = \frac{\sum_{b,k,h,w} m_{b,h,w} (\sigma(S_{b,k,h,w}) - \sigma(T_{b,k,h,w}))^2}{\sum_{b,h,w} m_{b,h,w} + 10^{-6}}

    ``student_logits``, ``teacher_logits`` ``(B, K, H, W)`` heatmap logits, ``mask`` ``(B, H, W)`` →
    scalar.

    Paper: Yang, Shi, Ding, Wang, Qi, "Towards Efficient 3D Object Detection with Knowledge
    Distillation", NeurIPS 2022, arXiv 2205.15156 (the pivotal-position logit KD of its improved
    pipeline). The abstract was read here, not the method section: the form (MSE between sigmoid
    heatmaps, normalised by the mask's sum) and the masks are the authors' code's
    (``CVMI-Lab/SparseKD``, ``center_logit_kd_head.py``, ``HM_LOSS: {type: MSELoss, weight: 7.0,
    soft_mask: True, fg_mask: True}`` of ``cp-pillar-v0.4_sparsekd.yaml``).
    """
    _maps(student_logits, teacher_logits, "pivotal_logit_kd")
    if tuple(mask.shape) != (student_logits.shape[0], *student_logits.shape[2:]):
        raise ValueError(f"pivotal_logit_kd: mask must be (B, H, W), got {tuple(mask.shape)}")
    diff = (fp32(student_logits).sigmoid() - fp32(teacher_logits).sigmoid()).pow(2)
    return (diff * fp32(mask).unsqueeze(1)).sum() / (fp32(mask).sum() + 1e-6)


def merge_teacher_boxes(boxes: list[Tensor], labels: list[Tensor], predictions: list[dict[str, Tensor]],
                        score_threshold: float) -> tuple[list[Tensor], list[Tensor]]:
    """Label KD's targets: per scene the teacher's predicted boxes with score ≥ ``score_threshold``,
    then the ground-truth boxes (so a ground-truth box wins a shared centre cell).

    ``boxes`` B tensors ``(n_b, 7)``, ``labels`` B tensors ``(n_b,)``, ``predictions`` B dicts with
    ``boxes (m_b, 7)``, ``scores (m_b,)``, ``labels (m_b,)`` → ``(boxes, labels)`` lists.
    Yang et al. 2022 (arXiv 2205.15156) label KD; threshold 0.6 in their released configs
    (``LABEL_ASSIGN_KD.SCORE_THRESH``, ``USE_GT: True``, ``GT_FIRST: False``).
    """
    if not (len(boxes) == len(labels) == len(predictions)):
        raise ValueError(f"merge_teacher_boxes: {len(boxes)} boxes, {len(labels)} labels and {len(predictions)} "
                         "predictions: one of each per scene expected")
    out_b, out_l = [], []
    for bx, lb, pred in zip(boxes, labels, predictions):
        keep = pred["scores"] >= score_threshold
        out_b.append(torch.cat([pred["boxes"][keep].to(bx), bx], dim=0))
        out_l.append(torch.cat([pred["labels"][keep].to(lb), lb], dim=0))
    return out_b, out_l
