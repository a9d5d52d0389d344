r"""The math of two semi-supervised detection teachers that supervise the student densely.

* **Dense Teacher** (H. Zhou, Z. Ge, S. Liu, W. Mao, Z. Li, H. Yu, J. Sun, "Dense Teacher: Dense
  Pseudo-Labels for Semi-supervised Object Detection", ECCV 2022, arXiv 2207.02541):
  :func:`dense_pseudo_label_loss`. The teacher's dense predictions on an unlabeled image are the
  pseudo-label, no NMS and no box threshold; a *region selection* keeps the top ``ratio`` of the
  points (by the teacher's best class score) as the region where the class scores are imitated and
  the boxes regressed, and pushes every other point's scores to 0.
* **DTG-SSOD** (G. Li, X. Li, Y. Wang, Y. Wu, D. Liang, S. Zhang, "DTG-SSOD: Dense Teacher Guidance
  for Semi-Supervised Object Detection", NeurIPS 2022, arXiv 2207.05536): :func:`inverse_nms_clusters`
  and :func:`dtg_loss`. The teacher's NMS groups its candidate boxes into clusters (each kept box and
  the boxes it suppressed); *Inverse NMS Clustering* makes the student's candidates at the same
  places learn that grouping (a cluster's members are positives of the kept box's class, the rest
  background), and *Rank Matching* makes the student's score ranking inside each cluster follow the
  teacher's.

Both on a dense one-stage detector (:mod:`distill.models.detection`'s GFL-style head): per point
``K`` class logits (sigmoid, joint class-quality) and a box decoded to ``(x1, y1, x2, y2)`` pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.models.detection import aligned_iou, box_iou, giou_loss

__all__ = ["dense_pseudo_label_loss", "dtg_loss", "inverse_nms_clusters", "select_dense_region"]


def _check_dense(s_logits: Tensor, s_boxes: Tensor, t_logits: Tensor, t_boxes: Tensor) -> None:
    if s_logits.dim() != 2 or s_logits.shape != t_logits.shape:
        raise ValueError(f"expected student and teacher logits (M, K) of one shape, got {tuple(s_logits.shape)} and "
                         f"{tuple(t_logits.shape)}")
    if s_boxes.shape != (s_logits.shape[0], 4) or t_boxes.shape != s_boxes.shape:
        raise ValueError(f"expected student and teacher boxes (M, 4) = ({s_logits.shape[0]}, 4), got "
                         f"{tuple(s_boxes.shape)} and {tuple(t_boxes.shape)}")


@torch.no_grad()
def select_dense_region(t_logits: Tensor, ratio: float) -> Tensor:
    r"""Dense Teacher's region selection: the ``max(1, ⌊ratio · M⌋)`` points of highest teacher score
    ``max_c sigmoid(t_logits)_c`` → a bool mask ``(M,)`` (``t_logits`` ``(M, K)``, all the points of
    the batch flattened, as the authors' code selects over the whole batch). Ties: the lower index."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    m = t_logits.shape[0]
    count = max(1, int(m * ratio))
    score = t_logits.float().sigmoid().amax(-1)
    order = torch.sort(score, descending=True, stable=True).indices
    mask = torch.zeros(m, dtype=torch.bool, device=t_logits.device)
    mask[order[:count]] = True
    return mask


def dense_pseudo_label_loss(s_logits: Tensor, s_boxes: Tensor, t_logits: Tensor, t_boxes: Tensor, *,
                            ratio: float = 0.01, beta: float = 2.0, cls_weight: float = 4.0,
                            box_weight: float = 1.0) -> Tensor:
    r"""Dense Teacher's unsupervised loss on the dense pseudo-label (DPL).

    With ``σ^S = sigmoid(s_logits)``, ``σ^T = sigmoid(t_logits)`` ``(M, K)``, ``S`` the selected
    points (:func:`select_dense_region`) and ``F = Σ_{i∈S} max_c σ^T_{ic}``:

    .. math:: L_{cls} = \frac1F\Big[\sum_{i\in S,c} \mathrm{BCE}(\sigma^S_{ic}, \sigma^T_{ic})\,|\sigma^T_{ic}-\sigma^S_{ic}|^\beta
              + \sum_{i\notin S,c} \mathrm{BCE}(\sigma^S_{ic}, 0)\,(\sigma^S_{ic})^\beta\Big]

    .. math:: L_{box} = \frac1{|S|}\sum_{i\in S} \big(1 - \mathrm{GIoU}(b^S_i, b^T_i)\big),\qquad
              L = \lambda_{cls} L_{cls} + \lambda_{box} L_{box}

    ``s_boxes``, ``t_boxes`` ``(M, 4)`` xyxy: the boxes each point predicts (teacher tensors are
    detached here). The quality-focal form of ``L_cls``, its normalisation by ``F``, the GIoU on the
    selected points, ``ratio = 0.01``, ``β = 2`` and the weights 4 (logits) and 1 (boxes) are the
    authors' code's (Megvii-BaseDetection/DenseTeacher ``runner.py`` ``get_distill_loss`` and
    ``config.py``; the paper's text was read only through its abstract). Their FCOS has a separate
    quality (IoU) branch distilled by a BCE of weight 1; the GFL head folds quality into the class
    score, so that term has nothing to act on here and is left out.
    """
    _check_dense(s_logits, s_boxes, t_logits, t_boxes)
    t_logits, t_boxes = t_logits.detach(), t_boxes.detach()
    mask = select_dense_region(t_logits, ratio)
    t_prob = t_logits.float().sigmoid()
    s_prob = s_logits.float().sigmoid()
    target = torch.where(mask[:, None], t_prob, torch.zeros_like(t_prob))
    bce = F.binary_cross_entropy_with_logits(s_logits.float(), target, reduction="none")
    cls = (bce * (target - s_prob).abs().pow(beta)).sum() / t_prob[mask].amax(-1).sum().clamp(min=1e-6)
    box = giou_loss(s_boxes[mask].float(), t_boxes[mask].float()).mean()
    return cls_weight * cls + box_weight * box


@torch.no_grad()
def inverse_nms_clusters(boxes: Tensor, scores: Tensor, labels: Tensor, *, score_threshold: float = 0.5,
                         iou_threshold: float = 0.6) -> Tensor:
    r"""The clusters of the teacher's NMS: for each candidate, the index of the kept box that suppressed
    it (a kept box is its own cluster's head), ``-1`` for points below ``score_threshold``.

    Greedy class-wise NMS over the candidates ``scores > score_threshold``, visited by decreasing
    score (ties: the lower index first): an unvisited candidate becomes a kept box, and every
    unvisited candidate of the same label with ``IoU > iou_threshold`` joins its cluster. ``boxes``
    ``(N, 4)`` xyxy, ``scores`` ``(N,)``, ``labels`` ``(N,)`` → ``(N,)`` long.
    """
    if boxes.dim() != 2 or boxes.shape[-1] != 4 or scores.shape != boxes.shape[:1] or labels.shape != scores.shape:
        raise ValueError(f"expected boxes (N, 4), scores (N,) and labels (N,), got {tuple(boxes.shape)}, "
                         f"{tuple(scores.shape)}, {tuple(labels.shape)}")
    n = boxes.shape[0]
    cluster = torch.full((n,), -1, dtype=torch.long, device=boxes.device)
    cand = (scores > score_threshold).nonzero().flatten()
    if cand.numel() == 0:
        return cluster
    order = cand[torch.sort(scores[cand], descending=True, stable=True).indices]
    iou = box_iou(boxes[order].float(), boxes[order].float()).cpu()
    same = (labels[order][:, None] == labels[order][None, :]).cpu()
    over = (iou > iou_threshold) & same
    assigned = torch.full((len(order),), -1, dtype=torch.long)
    for i in range(len(order)):
        if assigned[i] >= 0:
            continue
        join = over[i] & (assigned < 0)
        join[i] = True
        assigned[join] = i
    cluster[order] = order[assigned.to(order.device)]
    return cluster


def dtg_loss(s_logits: Tensor, s_boxes: Tensor, t_logits: Tensor, t_boxes: Tensor, cluster: Tensor, *,
             tau: float = 1.0, beta: float = 2.0, inc_weight: float = 1.0, box_weight: float = 2.0,
             rank_weight: float = 1.0) -> Tensor:
    r"""DTG-SSOD's dense teacher guidance for one image: Inverse NMS Clustering + Rank Matching.

    ``cluster`` ``(N,)`` from :func:`inverse_nms_clusters` on the teacher's boxes; for a member ``i``
    of the cluster of kept box ``k``, ``c_k = argmax_c t_logits_{kc}`` is its class. With
    ``P = {i : cluster_i ≥ 0}``:

    * INC, classification: GFL's quality focal loss (β) with target ``IoU(b^S_i, b^T_k)`` (student box
      detached) for class ``c_k`` at ``i ∈ P`` and 0 elsewhere, summed and divided by ``max(1, |P|)``;
    * INC, boxes: :math:`\frac1{|P|}\sum_{i\in P} (1 - \mathrm{GIoU}(b^S_i, b^T_i))` (each member
      regresses to the teacher's own box at that point: teacher guidance stays dense);
    * Rank Matching: for each cluster ``G`` of at least two members,
      :math:`\mathrm{KL}(\mathrm{softmax}(t_{G,c_k}/\tau) \,\|\, \mathrm{softmax}(s_{G,c_k}/\tau))`
      over its members' logits of the cluster's class, averaged over such clusters;

    ``L = λ_inc L_cls + λ_box L_box + λ_rank L_rank``. ``s_logits``, ``t_logits`` ``(N, K)``,
    ``s_boxes``, ``t_boxes`` ``(N, 4)`` xyxy (teacher tensors detached here).

    What is ours: the paper builds INC and RM on Faster R-CNN's shared proposals with a CE
    classifier; on the GFL head a cluster's members are positives of the quality focal loss whose
    quality target is the IoU with the kept box (GFL's usual target), the regression target, the
    temperature ``τ = 1`` and the weights 1, 2 (GFL's GIoU weight), 1 are ours; only the paper's
    abstract could be read here.
    """
    _check_dense(s_logits, s_boxes, t_logits, t_boxes)
    if cluster.shape != s_logits.shape[:1]:
        raise ValueError(f"cluster must be (N,) = ({s_logits.shape[0]},), got {tuple(cluster.shape)}")
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    t_logits, t_boxes = t_logits.detach(), t_boxes.detach()
    pos = cluster >= 0
    head = cluster.clamp(min=0)
    cls_of = t_logits.argmax(-1)[head]  # the kept box's class, per point
    target = torch.zeros_like(s_logits, dtype=torch.float32)
    n_pos = int(pos.sum())
    zero = s_logits.sum() * 0.0
    if n_pos:
        quality = aligned_iou(s_boxes[pos].detach().float(), t_boxes[head[pos]].float()).clamp(min=0)
        target[pos.nonzero().flatten(), cls_of[pos]] = quality
    s_prob = s_logits.float().sigmoid()
    bce = F.binary_cross_entropy_with_logits(s_logits.float(), target, reduction="none")
    inc = (bce * (target - s_prob).abs().pow(beta)).sum() / max(1, n_pos)
    box = giou_loss(s_boxes[pos].float(), t_boxes[pos].float()).mean() if n_pos else zero
    ranks = []
    for g in cluster[pos].unique():
        members = (cluster == g).nonzero().flatten()
        if members.numel() < 2:
            continue
        c = cls_of[members[0]]
        log_pt = F.log_softmax(t_logits[members, c].float() / tau, dim=0)
        log_ps = F.log_softmax(s_logits[members, c].float() / tau, dim=0)
        ranks.append((log_pt.exp() * (log_pt - log_ps)).sum())
    rank = torch.stack(ranks).mean() if ranks else zero
    return inc_weight * inc + box_weight * box + rank_weight * rank
