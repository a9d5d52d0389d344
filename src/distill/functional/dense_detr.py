r"""The math of DETRDistill: distilling a DETR-style (set-prediction) detector.

Paper: J. Chang, S. Wang, H.-M. Xu, Z. Chen, C. Yang, F. Zhao, "DETRDistill: A Universal Knowledge
Distillation Framework for DETR-families", ICCV 2023, arXiv 2211.10156. Its three parts:

* **Hungarian-matching logits distillation** (:func:`hungarian_logits_kd_loss`): the teacher's
  predictions, every one of them (no score threshold), are the student's targets; student and
  teacher predictions are paired by a bipartite matching with DETR's matching cost, then each pair
  pays a class term and (teacher object predictions only) the box terms.
* **Target-aware feature distillation** (:func:`target_aware_mask`,
  :func:`target_aware_feature_loss`): the teacher's decoder queries, weighted by their quality
  (score × best IoU with a ground-truth box), select the feature positions that matter; the
  student's (adapted) features imitate the teacher's there.
* **Query-prior assignment distillation** (:func:`query_prior_assignment_loss`): the teacher's
  learned queries run through the student's decoder as an extra group, and those predictions are
  trained against the ground truth with the *teacher's* stable assignment.

Boxes are DETR's: ``(cx, cy, w, h)`` normalised to ``[0, 1]``; class logits ``(…, K+1)`` with the
last entry "no object" (softmax DETR, as :mod:`distill.models.detr`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.models.detr import box_cxcywh_to_xyxy, detr_set_loss, generalized_box_iou

__all__ = [
    "detr_teacher_match",
    "hungarian_logits_kd_loss",
    "query_prior_assignment_loss",
    "query_quality",
    "target_aware_feature_loss",
    "target_aware_mask",
]


def _check_preds(logits: Tensor, boxes: Tensor, who: str) -> None:
    if logits.dim() != 3 or boxes.dim() != 3 or boxes.shape[:2] != logits.shape[:2] or boxes.shape[-1] != 4:
        raise ValueError(f"{who}: expected logits (B, Q, K+1) and boxes (B, Q, 4), got {tuple(logits.shape)} and "
                         f"{tuple(boxes.shape)}")


def _box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise IoU of xyxy boxes ``a`` ``(n, 4)`` and ``b`` ``(m, 4)`` → ``(n, m)``."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp(min=1e-12)


@torch.no_grad()
def detr_teacher_match(s_logits: Tensor, s_boxes: Tensor, t_logits: Tensor, t_boxes: Tensor, *,
                       cost_class: float = 1.0, cost_bbox: float = 5.0,
                       cost_giou: float = 2.0) -> list[tuple[Tensor, Tensor]]:
    r"""Pair student predictions with the teacher's predictions, image by image (DETR's matcher with the
    teacher's predictions as the ground truth).

    With ``c_j = argmax_c p^T_j(c)`` the teacher's class of prediction ``j`` (``K``, no object,
    included) and ``p^S = softmax(s_logits)``:

    .. math:: C_{qj} = -\lambda_{cls}\, p^S_q(c_j) + \lambda_{L1}\|b^S_q - b^T_j\|_1
              - \lambda_{giou}\,\mathrm{GIoU}(b^S_q, b^T_j)

    minimised by ``scipy.optimize.linear_sum_assignment``. ``s_logits`` ``(B, Q_s, K+1)``,
    ``s_boxes`` ``(B, Q_s, 4)``, ``t_logits`` ``(B, Q_t, K+1)``, ``t_boxes`` ``(B, Q_t, 4)``. Returns per
    image ``(student_idx, teacher_idx)``, two long tensors of ``min(Q_s, Q_t)`` entries. The costs
    1, 5, 2 are DETR's (the paper reuses the detector's matcher).
    """
    from scipy.optimize import linear_sum_assignment

    _check_preds(s_logits, s_boxes, "student")
    _check_preds(t_logits, t_boxes, "teacher")
    if s_logits.shape[0] != t_logits.shape[0] or s_logits.shape[-1] != t_logits.shape[-1]:
        raise ValueError(f"student logits {tuple(s_logits.shape)} and teacher logits {tuple(t_logits.shape)} must share "
                         "the batch size and the number of classes (K+1)")
    prob = s_logits.float().softmax(-1)
    labels = t_logits.argmax(-1)
    out = []
    for b in range(s_logits.shape[0]):
        sb, tb = s_boxes[b].float(), t_boxes[b].float()
        cost = (-cost_class * prob[b][:, labels[b]] + cost_bbox * torch.cdist(sb, tb, p=1)
                - cost_giou * generalized_box_iou(box_cxcywh_to_xyxy(sb), box_cxcywh_to_xyxy(tb)))
        rows, cols = linear_sum_assignment(cost.cpu().numpy())
        out.append((torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)))
    return out


def hungarian_logits_kd_loss(s_logits: Tensor, s_boxes: Tensor, t_logits: Tensor, t_boxes: Tensor, *,
                             cls_weight: float = 1.0, l1_weight: float = 5.0, giou_weight: float = 2.0,
                             matches: Sequence[tuple[Tensor, Tensor]] | None = None) -> Tensor:
    r"""DETRDistill's Hungarian-matching logits distillation for one decoder layer.

    With ``σ`` the matching of :func:`detr_teacher_match` (``matches``, computed when ``None``),
    ``P`` its pairs ``(q, j)`` over the batch, ``P_obj ⊆ P`` the pairs whose teacher prediction is an
    object (``argmax p^T_j ≠ K``), ``p = softmax`` over the ``K+1`` classes:

    .. math:: L = \frac{\lambda_{cls}}{|P|}\sum_{(q,j)\in P} \mathrm{KL}(p^T_j \,\|\, p^S_q)
              + \frac{1}{\max(1,|P_{obj}|)}\sum_{(q,j)\in P_{obj}}
                \big(\lambda_{L1}\|b^S_q - b^T_j\|_1 + \lambda_{giou}(1 - \mathrm{GIoU}(b^S_q, b^T_j))\big)

    ``s_logits`` ``(B, Q_s, K+1)``, ``s_boxes`` ``(B, Q_s, 4)``, ``t_logits`` ``(B, Q_t, K+1)``,
    ``t_boxes`` ``(B, Q_t, 4)`` (teacher tensors are detached here). The paper keeps every teacher
    prediction (negatives included) as a target; its class term for a softmax DETR is the teacher's
    distribution (here KL, which is the soft cross-entropy minus the teacher's entropy: the same
    gradient, 0 when the two agree). The authors' code (a sigmoid Deformable DETR) uses a soft binary
    cross-entropy with weight 1, L1 weight 5 and GIoU weight 2: our defaults.
    """
    t_logits, t_boxes = t_logits.detach(), t_boxes.detach()
    if matches is None:
        matches = detr_teacher_match(s_logits, s_boxes, t_logits, t_boxes)
    k = t_logits.shape[-1] - 1
    s_rows, t_rows, b_idx = [], [], []
    for b, (qi, ti) in enumerate(matches):
        s_rows.append(qi.to(s_logits.device))
        t_rows.append(ti.to(s_logits.device))
        b_idx.append(torch.full_like(qi, b).to(s_logits.device))
    bi, si, ti = torch.cat(b_idx), torch.cat(s_rows), torch.cat(t_rows)
    if bi.numel() == 0:
        return s_logits.sum() * 0.0
    log_ps = F.log_softmax(s_logits[bi, si].float(), dim=-1)
    log_pt = F.log_softmax(t_logits[bi, ti].float(), dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean()
    obj = t_logits[bi, ti].argmax(-1) != k
    n_obj = max(1, int(obj.sum()))
    sb, tb = s_boxes[bi, si][obj].float(), t_boxes[bi, ti][obj].float()
    l1 = (sb - tb).abs().sum() / n_obj
    giou = (1 - torch.diagonal(generalized_box_iou(box_cxcywh_to_xyxy(sb), box_cxcywh_to_xyxy(tb)))).sum() / n_obj \
        if sb.shape[0] else s_boxes.sum() * 0.0
    return cls_weight * kl + l1_weight * l1 + giou_weight * giou


@torch.no_grad()
def query_quality(t_logits: Tensor, t_boxes: Tensor, gt_boxes: Sequence[Tensor]) -> Tensor:
    r"""Each teacher query's quality ``q_j = max_{c<K} p^T_j(c) · max_i IoU(b^T_j, g_i)`` ``(B, Q)``.

    ``t_logits`` ``(B, Q, K+1)``, ``t_boxes`` ``(B, Q, 4)`` and ``gt_boxes[b]`` ``(n_b, 4)``, all boxes in
    normalised ``(cx, cy, w, h)``. An image without ground truth uses the score alone (the authors'
    code does both). Their code weighs the 100 best (query, class) pairs of 300 queries x 80 classes
    (a query may count once per class); with ~10 queries we weigh every query by its best class.
    """
    _check_preds(t_logits, t_boxes, "teacher")
    score = t_logits.float().softmax(-1)[..., :-1].max(-1).values
    out = score.clone()
    for b, g in enumerate(gt_boxes):
        if g.shape[0]:
            iou = _box_iou(box_cxcywh_to_xyxy(t_boxes[b].float()), box_cxcywh_to_xyxy(g.to(t_boxes.device).float()))
            out[b] = score[b] * iou.max(-1).values
    return out


@torch.no_grad()
def target_aware_mask(t_feat: Tensor, t_queries: Tensor, quality: Tensor, floor: float = 1e-2) -> Tensor:
    r"""DETRDistill's selection mask over feature positions from the teacher's queries.

    .. math:: a_{j,n} = \frac{\langle q_j, f_n\rangle}{\|q_j\|\,\|f_n\|},\qquad
              m_n = \max\big(\textstyle\sum_j q^{qual}_j\, a_{j,n},\ \text{floor}\big),\qquad
              \hat m_n = m_n / \max_{n'} m_{n'}

    ``t_feat`` ``(B, N, D)`` teacher features (``N`` positions), ``t_queries`` ``(B, M, D)`` the
    teacher's decoder outputs, ``quality`` ``(B, M)`` (:func:`query_quality`) → ``(B, N)`` in
    ``(0, 1]``. The cosine similarity, the floor 0.01 and the division by the image's maximum are the
    authors' code's (``Distiller.forward_train``).
    """
    if t_feat.dim() != 3 or t_queries.dim() != 3 or t_feat.shape[-1] != t_queries.shape[-1]:
        raise ValueError(f"expected t_feat (B, N, D) and t_queries (B, M, D), got {tuple(t_feat.shape)} and "
                         f"{tuple(t_queries.shape)}")
    if quality.shape != t_queries.shape[:2]:
        raise ValueError(f"quality must be (B, M) = {tuple(t_queries.shape[:2])}, got {tuple(quality.shape)}")
    sim = torch.einsum("bmd,bnd->bmn", F.normalize(t_queries.float(), dim=-1), F.normalize(t_feat.float(), dim=-1))
    mask = torch.einsum("bmn,bm->bn", sim, quality.float()).clamp(min=floor)
    return mask / mask.max(dim=-1, keepdim=True).values


def target_aware_feature_loss(s_feat: Tensor, t_feat: Tensor, mask: Tensor) -> Tensor:
    r"""Masked feature imitation: :math:`\frac{1}{BND}\sum_{b,n,d} (\hat m_{bn}(f^T_{bnd} - f^S_{bnd}))^2`.

    ``s_feat`` ``(B, N, D)`` (the student's features, already adapted to the teacher's width),
    ``t_feat`` ``(B, N, D)`` (detached here), ``mask`` ``(B, N)`` (:func:`target_aware_mask`). The mask
    multiplies both features inside the mean squared error, as the authors' code
    (``MSELoss(mask·f^T, mask·f^S)``).
    """
    if s_feat.shape != t_feat.shape:
        raise ValueError(f"student features {tuple(s_feat.shape)} and teacher features {tuple(t_feat.shape)} differ "
                         "(adapt the student's width first)")
    if mask.shape != s_feat.shape[:2]:
        raise ValueError(f"mask must be (B, N) = {tuple(s_feat.shape[:2])}, got {tuple(mask.shape)}")
    m = mask.detach().to(s_feat.dtype)[..., None]
    return ((m * (t_feat.detach() - s_feat)) ** 2).mean()


def query_prior_assignment_loss(logits: Sequence[Tensor], boxes: Sequence[Tensor], gt_boxes: Sequence[Tensor],
                                gt_labels: Sequence[Tensor], matches: Sequence[Sequence[tuple[Tensor, Tensor]]], *,
                                no_object_weight: float = 0.1, ce_weight: float = 1.0, l1_weight: float = 5.0,
                                giou_weight: float = 2.0) -> Tensor:
    r"""Query-prior assignment distillation: the detection loss of the student's predictions made from
    the teacher's queries, with the teacher's assignment to the ground truth.

    .. math:: L = \sum_l \big(\lambda_{ce} L_{ce}^{(l)} + \lambda_{L1} L_{L1}^{(l)} + \lambda_{giou} L_{giou}^{(l)}\big)

    each term DETR's set loss (:func:`distill.models.detr.detr_set_loss`) of layer ``l``'s
    predictions ``logits[l]`` ``(B, Q, K+1)``, ``boxes[l]`` ``(B, Q, 4)`` against ``gt_boxes[b]``
    ``(n_b, 4)`` (normalised cxcywh) and ``gt_labels[b]`` ``(n_b,)`` under the fixed matching
    ``matches[l]`` (the teacher's own query ↔ ground-truth matching). Weights: DETR's 1, 5, 2 and
    no-object weight 0.1.
    """
    if not (len(logits) == len(boxes) == len(matches)) or not logits:
        raise ValueError(f"one matching per layer expected: {len(logits)} logits, {len(boxes)} boxes, "
                         f"{len(matches)} matchings")
    total: Tensor | None = None
    for lg, bx, mt in zip(logits, boxes, matches):
        parts = detr_set_loss(lg, bx, gt_boxes, gt_labels, mt, no_object_weight=no_object_weight)
        loss = ce_weight * parts["ce"] + l1_weight * parts["l1"] + giou_weight * parts["giou"]
        total = loss if total is None else total + loss
    assert total is not None
    return total
