"""The math of detection distillation: Quantization Mimic, ADL, FGD, Rank Mimicking, PFI, LD (main and
valuable localization regions) and LGD's feature term.

Conventions: a detector's per-level maps are ``(B, C, H_l, W_l)``; "dense" predictions of all levels
are flattened level after level, row-major inside a level, to ``(B, N, ...)`` with
``N = Σ_l H_l W_l`` (:func:`flatten_levels`), the order in which
:meth:`distill.models.detection.GFLDetector.points` lists its points. Boxes are ``(x1, y1, x2, y2)``
in input pixels. Nothing here detaches the teacher (the methods pass detached teacher tensors) and
nothing holds state: trainable parts (channel adapters, FGD's GcBlock, LGD's encoder) live in
:mod:`distill.methods.dense_det`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.functional._precision import fp32

__all__ = [
    "flatten_levels",
    "cell_box_masks",
    "quantize_ste",
    "quantization_mimic_loss",
    "adl_loss",
    "fgd_attention",
    "fgd_masks",
    "fgd_feature_loss",
    "fgd_attention_loss",
    "fgd_global_loss",
    "rank_mimicking_loss",
    "prediction_difference",
    "pfi_loss",
    "ld_kl",
    "ld_loss",
    "pairwise_iou_diou",
    "valuable_localization_region",
    "lgd_feature_loss",
]


def _check_map(x: Tensor, what: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{what} needs a (B, C, H, W) map, got {got}")


def _same(s: Tensor, t: Tensor, what: str) -> None:
    if s.shape != t.shape:
        raise ValueError(f"{what} needs equal shapes (adapt the student first), got {tuple(s.shape)} and "
                         f"{tuple(t.shape)}")


def flatten_levels(maps: Sequence[Tensor], group: int = 1) -> Tensor:
    """Per-level maps ``(B, G·D, H_l, W_l)`` → ``(B, N, G, D)`` (``group = G``) or ``(B, N, D)`` (``G = 1``).

    Levels follow one another, positions are row-major inside a level (``N = Σ_l H_l W_l``). The channel
    axis is read group-major: channel ``g·D + d`` is entry ``d`` of group ``g`` (a GFL box head's
    ``4·(n+1)`` channels are 4 sides of ``n+1`` bins each).
    """
    if not maps:
        raise ValueError("flatten_levels needs at least one map")
    out = []
    for m in maps:
        _check_map(m, "flatten_levels")
        b, c, h, w = m.shape
        if c % group:
            raise ValueError(f"flatten_levels: {c} channels do not split into {group} groups")
        x = m.permute(0, 2, 3, 1).reshape(b, h * w, c)
        out.append(x if group == 1 else x.reshape(b, h * w, group, c // group))
    return torch.cat(out, dim=1)


def cell_box_masks(boxes: Tensor, height: int, width: int, stride: float) -> Tensor:
    r"""Which cells of an ``(H, W)`` map of ``stride`` pixels lie in each box: ``(n, H, W)`` bool.

    Cell ``(i, j)`` has its centre at pixel ``((j + ½)·s, (i + ½)·s)``; it belongs to box
    ``(x_1, y_1, x_2, y_2)`` when ``x_1 ≤ (j + ½)s ≤ x_2`` and ``y_1 ≤ (i + ½)s ≤ y_2``.
    ``boxes``: ``(n, 4)`` pixels.
    """
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"cell_box_masks needs (n, 4) boxes, got {tuple(boxes.shape)}")
    ys = (torch.arange(height, device=boxes.device, dtype=boxes.dtype) + 0.5) * stride
    xs = (torch.arange(width, device=boxes.device, dtype=boxes.dtype) + 0.5) * stride
    x1, y1, x2, y2 = (boxes[:, k, None] for k in range(4))
    in_y = (ys[None] >= y1) & (ys[None] <= y2)  # (n, H)
    in_x = (xs[None] >= x1) & (xs[None] <= x2)  # (n, W)
    return in_y[:, :, None] & in_x[:, None, :]


# --------------------------------------------------------------------------------------------
# Quantization Mimic
# --------------------------------------------------------------------------------------------


def quantize_ste(x: Tensor, step: float) -> Tensor:
    r"""Uniform quantisation with a straight-through gradient: ``Q(x) = step · round(x / step)``.

    The forward value is the quantised map; the backward pass treats ``Q`` as the identity
    (``∂Q/∂x = 1``), so a quantised student still receives gradients.
    """
    if step <= 0:
        raise ValueError(f"quantization step must be > 0, got {step}")
    q = torch.round(x / step) * step
    return x + (q - x).detach()


def quantization_mimic_loss(student: Tensor, teacher: Tensor, region: Tensor, step: float) -> Tensor:
    r"""Quantization Mimic: half the squared distance of the quantised maps over the mimic region.

    .. math::
        L_m = \frac{1}{2N} \sum_{b,i,j} R_{b,i,j} \sum_c \big(Q(F^T_{b,c,i,j}) - Q(F^S_{b,c,i,j})\big)^2,
        \qquad N = \sum_{b,i,j} R_{b,i,j}

    ``student`` (already mapped to the teacher's channels), ``teacher``: ``(B, C, H, W)``; ``region``
    ``(B, H, W)`` bool (the cells inside the regions that are mimicked) → scalar; 0 when the region is
    empty. ``Q`` is :func:`quantize_ste` with ``step``.

    Paper: Wei, Pan, Qin, Ouyang, Yan, "Quantization Mimic: Towards Very Tiny CNN for Object Detection",
    ECCV 2018, arXiv 1805.02152: the student's and the (quantised) teacher's feature maps are both
    quantised and the student mimics the teacher inside the proposals of a two-stage detector (the
    ``1/2N`` L2 of mimic learning, N proposals). Here the region is the set of cells inside ground-truth
    boxes and ``N`` counts cells, not proposals (one-stage detector; see the method's docstring).
    """
    _check_map(student, "quantization_mimic_loss")
    _same(student, teacher, "quantization_mimic_loss")
    if region.shape != (student.shape[0], *student.shape[2:]):
        raise ValueError(f"quantization_mimic_loss: region must be (B, H, W) = "
                         f"{(student.shape[0], *student.shape[2:])}, got {tuple(region.shape)}")
    r = region.to(student.dtype)[:, None]
    n = r.sum()
    if n == 0:
        return student.sum() * 0.0
    d = (quantize_ste(teacher, step) - quantize_ste(student, step)) ** 2
    return (d * r).sum() / (2.0 * n)


# --------------------------------------------------------------------------------------------
# ADL
# --------------------------------------------------------------------------------------------


def adl_loss(student_logits: Tensor, teacher_logits: Tensor, beta: float = 1.0, gamma: float = 2.0,
             normalizer_power: float | None = 1.8, valid: Tensor | None = None) -> Tensor:
    r"""Adaptive distillation loss on sigmoid classification outputs.

    With ``q = σ(z^T)``, ``p = σ(z^S)`` per position and class (binary, as RetinaNet / GFL classify),

    .. math::
        KL = q \log\frac{q}{p} + (1-q)\log\frac{1-q}{1-p}, \qquad
        \mathcal{T}(q) = -q\log q - (1-q)\log(1-q),

        ADL = \frac{1}{Z} \sum \big(1 - e^{-(KL + \beta \mathcal{T}(q))}\big)^{\gamma} \, KL,
        \qquad Z = \max\Big(1, \sum q^{\theta}\Big) \;\text{or}\; Z = \#\text{positions}

    The weight grows with the student-teacher gap (hard to mimic, ``KL``) and with the teacher's
    uncertainty (hard to learn, ``𝒯(q)``); it is differentiated too (as in the authors' kernel).
    ``student_logits``, ``teacher_logits``: ``(..., K)`` equal shapes; ``valid`` an optional bool
    mask of the leading shape (positions that count) → scalar. ``normalizer_power = θ`` normalises by
    the teacher's total "soft foreground" ``Σ q^θ`` (the authors' adaptive normaliser); ``None``
    averages over positions instead.

    Paper: Tang et al., "Learning Efficient Detector with Semi-supervised
    Adaptive Distillation", 2019, arXiv 1901.00366. The text of the paper could not be read here beyond
    its abstract (hard-to-learn = low teacher certainty, hard-to-mimic = large teacher-student gap);
    formula and defaults come from the authors' code (Tangshitao/Semi-supervised-Adaptive-Distillation,
    ``sigmoid_adaptive_distillation_loss_op.cu`` and ``retinanet_R-50-FPN_distillation.yaml``:
    ``LOSS_GAMMA 2.0``, ``LOGITS_POWER 1.8``, adaptive normaliser on, ``LOSS_BETA`` 0). Their kernel
    computes the weight's exponent as ``CE(q, p) − β_code 𝒯(q) = KL + (1 − β_code) 𝒯(q)``, so their
    ``β_code = 0`` is ``β = 1`` here; it multiplies the weight by ``α``-balanced cross-entropy
    (``α = 0.5``: a factor 0.5, and ``CE = KL + 𝒯(q)``) where we use ``KL`` itself.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"adl_loss needs equal shapes, got {tuple(student_logits.shape)} and "
                         f"{tuple(teacher_logits.shape)}")
    zs, zt = fp32(student_logits), fp32(teacher_logits)
    q = torch.sigmoid(zt)
    log_q, log_1q = F.logsigmoid(zt), F.logsigmoid(-zt)
    log_p, log_1p = F.logsigmoid(zs), F.logsigmoid(-zs)
    kl = q * (log_q - log_p) + (1 - q) * (log_1q - log_1p)
    entropy = -(q * log_q + (1 - q) * log_1q)
    w = (1 - torch.exp(-(kl + beta * entropy))).clamp_min(0) ** gamma
    loss = w * kl
    if valid is not None:
        if valid.shape != loss.shape[:-1]:
            raise ValueError(f"adl_loss: valid must have shape {tuple(loss.shape[:-1])}, got {tuple(valid.shape)}")
        keep = valid.to(loss.dtype)[..., None]
        loss, q = loss * keep, q * keep
    if normalizer_power is None:
        denom = loss[..., 0].numel() if valid is None else valid.sum().clamp_min(1)
        return loss.sum() / denom
    return loss.sum() / (q ** normalizer_power).sum().clamp_min(1.0)


# --------------------------------------------------------------------------------------------
# FGD
# --------------------------------------------------------------------------------------------


def fgd_attention(feature: Tensor, temperature: float = 0.5) -> tuple[Tensor, Tensor]:
    r"""FGD's spatial and channel attention of a map ``(B, C, H, W)``: ``(B, H, W)`` and ``(B, C)``.

    .. math::
        A^S = H W \cdot \operatorname{softmax}\Big(\frac{1}{C T}\sum_c |F_c|\Big), \qquad
        A^C = C \cdot \operatorname{softmax}\Big(\frac{1}{H W T}\sum_{i,j} |F_{i,j}|\Big)
    """
    _check_map(feature, "fgd_attention")
    if temperature <= 0:
        raise ValueError(f"FGD temperature must be > 0, got {temperature}")
    b, c, h, w = feature.shape
    a = fp32(feature).abs()
    spatial = h * w * F.softmax(a.mean(dim=1).reshape(b, -1) / temperature, dim=1).reshape(b, h, w)
    channel = c * F.softmax(a.mean(dim=(2, 3)) / temperature, dim=1)
    return spatial, channel


def fgd_masks(boxes: Sequence[Tensor], height: int, width: int, stride: float,
              dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor]:
    r"""FGD's binary foreground mask ``M`` and scale masks for one level: three ``(B, H, W)`` tensors.

    .. math::
        M_{i,j} = [(i,j) \in \text{some box}], \qquad
        S^{fg}_{i,j} = \frac{1}{H_r W_r}\ \text{(the smallest box } r \ni (i,j)), \qquad
        S^{bg}_{i,j} = \frac{1 - M_{i,j}}{\sum_{i,j} (1 - M_{i,j})}

    ``H_r W_r`` is the box's area in cells: the number of cells of the map inside it
    (:func:`cell_box_masks`), so each box's foreground weights sum to 1 when boxes do not overlap.
    """
    fg_list, scale_list, bg_list = [], [], []
    for b in boxes:
        device = b.device
        fg = torch.zeros(height, width, dtype=dtype, device=device)
        scale = torch.zeros(height, width, dtype=dtype, device=device)
        if len(b):
            cells = cell_box_masks(b.to(dtype), height, width, stride)  # (n, H, W)
            area = cells.flatten(1).sum(1).to(dtype)  # (n,)
            inv = torch.where(area > 0, 1.0 / area.clamp_min(1), torch.zeros_like(area))
            scale = (cells.to(dtype) * inv[:, None, None]).amax(dim=0)
            fg = cells.any(dim=0).to(dtype)
        bg = 1.0 - fg
        bg = bg / bg.sum().clamp_min(1.0)
        fg_list.append(fg)
        scale_list.append(scale)
        bg_list.append(bg)
    return torch.stack(fg_list), torch.stack(scale_list), torch.stack(bg_list)


def fgd_feature_loss(student: Tensor, teacher: Tensor, fg_scale: Tensor, bg_scale: Tensor,
                     spatial_t: Tensor, channel_t: Tensor, alpha: float, beta: float) -> tuple[Tensor, Tensor]:
    r"""FGD's focal feature loss, foreground and background parts (each already times α / β).

    .. math::
        L_{fg} = \frac{\alpha}{B} \sum_{b,c,i,j} S^{fg}_{b,i,j} A^S_{b,i,j} A^C_{b,c}
                 (F^T_{b,c,i,j} - F^S_{b,c,i,j})^2, \qquad
        L_{bg} = \frac{\beta}{B} \sum S^{bg} A^S A^C (F^T - F^S)^2

    with the *teacher's* attention ``A^S`` ``(B, H, W)`` and ``A^C`` ``(B, C)`` and the masks of
    :func:`fgd_masks` (``S^{fg} = M·S`` and ``S^{bg} = (1 − M)·S``). ``student`` (adapted), ``teacher``:
    ``(B, C, H, W)``.
    """
    _check_map(student, "fgd_feature_loss")
    _same(student, teacher, "fgd_feature_loss")
    b = student.shape[0]
    d = (fp32(teacher) - fp32(student)) ** 2 * spatial_t[:, None] * channel_t[:, :, None, None]
    return alpha * (d * fg_scale[:, None]).sum() / b, beta * (d * bg_scale[:, None]).sum() / b


def fgd_attention_loss(spatial_s: Tensor, channel_s: Tensor, spatial_t: Tensor, channel_t: Tensor,
                       gamma: float) -> Tensor:
    r"""FGD's attention loss: ``γ/B · (Σ|A^S_t − A^S_s| + Σ|A^C_t − A^C_s|)`` (L1 summed, batch-averaged)."""
    b = spatial_s.shape[0]
    return gamma * ((spatial_t - spatial_s).abs().sum() + (channel_t - channel_s).abs().sum()) / b


def fgd_global_loss(relation_student: Tensor, relation_teacher: Tensor, lam: float) -> Tensor:
    r"""FGD's global loss: ``λ/B · Σ (R(F^T) − R(F^S))²`` on the GcBlock outputs ``(B, C, H, W)``."""
    _same(relation_student, relation_teacher, "fgd_global_loss")
    return lam * ((fp32(relation_teacher) - fp32(relation_student)) ** 2).sum() / relation_student.shape[0]


# --------------------------------------------------------------------------------------------
# Rank Mimicking and Prediction-guided Feature Imitation
# --------------------------------------------------------------------------------------------


def rank_mimicking_loss(student_scores: Tensor, teacher_scores: Tensor, groups: Tensor,
                        tau: float = 1.0) -> Tensor:
    r"""Rank Mimicking: the teacher's ranking of each object's candidate boxes, as a distribution.

    For object ``i`` with candidates ``j ∈ A_i`` (the positions assigned to it) and scores ``s_{ij}`` (the
    classification score of the object's class),

    .. math::
        P_{ij} = \frac{e^{s_{ij}/\tau}}{\sum_{k \in A_i} e^{s_{ik}/\tau}}, \qquad
        L_{RM} = \frac{1}{M} \sum_{i=1}^{M} \sum_{j \in A_i} P^T_{ij} \log\frac{P^T_{ij}}{P^S_{ij}}

    ``student_scores``, ``teacher_scores``: ``(P,)`` the candidates' scores; ``groups``: ``(P,)`` long,
    the object each candidate belongs to (any ids; ``M`` = number of distinct ids) → scalar (0 when
    ``P = 0``). Objects with a single candidate contribute 0.

    Paper: Li, Li, Wang, Zhang, Wu, Liang, "Knowledge Distillation for Object Detection via Rank
    Mimicking and Prediction-guided Feature Imitation", AAAI 2022, arXiv 2112.04840. Scores are the
    sigmoid classification scores and ``τ = 1`` (a plain softmax over each object's candidates).
    """
    if student_scores.shape != teacher_scores.shape or student_scores.dim() != 1 or groups.shape != student_scores.shape:
        raise ValueError(f"rank_mimicking_loss needs three (P,) tensors, got {tuple(student_scores.shape)}, "
                         f"{tuple(teacher_scores.shape)}, {tuple(groups.shape)}")
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if student_scores.numel() == 0:
        return student_scores.sum() * 0.0
    ids, inverse = torch.unique(groups, return_inverse=True)
    m = len(ids)
    s, t = fp32(student_scores) / tau, fp32(teacher_scores) / tau

    def group_log_softmax(x: Tensor) -> Tensor:
        top = torch.full((m,), float("-inf"), dtype=x.dtype, device=x.device).scatter_reduce(
            0, inverse, x, reduce="amax")
        e = torch.exp(x - top[inverse])
        z = torch.zeros(m, dtype=x.dtype, device=x.device).index_add(0, inverse, e)
        return x - top[inverse] - torch.log(z[inverse])

    log_pt, log_ps = group_log_softmax(t), group_log_softmax(s)
    return (log_pt.exp() * (log_pt - log_ps)).sum() / m


def prediction_difference(student_scores: Tensor, teacher_scores: Tensor) -> Tensor:
    r"""PFI's prediction difference per position: ``P = 1/K Σ_c (p^T_c − p^S_c)²``; ``(B, K, H, W) → (B, H, W)``."""
    _check_map(student_scores, "prediction_difference")
    _same(student_scores, teacher_scores, "prediction_difference")
    return ((fp32(teacher_scores) - fp32(student_scores)) ** 2).mean(dim=1)


def pfi_loss(student: Tensor, teacher: Tensor, difference: Tensor) -> Tensor:
    r"""Prediction-guided feature imitation on one level.

    .. math::
        L_{PFI} = \frac{1}{B H W} \sum_{b,i,j} P_{b,i,j} \sum_{c} (F^T_{b,c,i,j} - F^S_{b,c,i,j})^2

    ``student`` (adapted to the teacher's channels), ``teacher``: ``(B, C, H, W)``; ``difference``:
    ``(B, H, W)`` the prediction difference :func:`prediction_difference` (a weight: pass it detached)
    → scalar. Positions where teacher and student already predict alike are imitated little; where
    their predictions differ the features are pulled together hardest.
    """
    _check_map(student, "pfi_loss")
    _same(student, teacher, "pfi_loss")
    if difference.shape != (student.shape[0], *student.shape[2:]):
        raise ValueError(f"pfi_loss: difference must be (B, H, W), got {tuple(difference.shape)}")
    d = ((fp32(teacher) - fp32(student)) ** 2).sum(dim=1)
    return (difference * d).mean()


# --------------------------------------------------------------------------------------------
# Localization distillation
# --------------------------------------------------------------------------------------------


def ld_kl(student_dist: Tensor, teacher_dist: Tensor, tau: float) -> Tensor:
    r"""Per-position LD: ``τ² Σ_e KL(softmax(z^T_e/τ) ‖ softmax(z^S_e/τ))`` over the box's 4 edges.

    ``student_dist``, ``teacher_dist``: ``(M, 4, n + 1)`` distribution logits (edge ``e`` of position
    ``m``, ``n + 1`` bins) → ``(M,)``.
    """
    if student_dist.shape != teacher_dist.shape or student_dist.dim() != 3:
        raise ValueError(f"ld_kl needs equal (M, 4, n+1) logits, got {tuple(student_dist.shape)} and "
                         f"{tuple(teacher_dist.shape)}")
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    log_t = F.log_softmax(fp32(teacher_dist) / tau, dim=-1)
    log_s = F.log_softmax(fp32(student_dist) / tau, dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum(dim=(-1, -2)) * tau * tau


def ld_loss(student_dist: Tensor, teacher_dist: Tensor, weights: Tensor, tau: float = 10.0) -> Tensor:
    r"""Localization distillation over a region, weighted.

    .. math::
        L_{LD} = \frac{1}{\sum_m w_m} \sum_m w_m \, \tau^2 \sum_{e \in \{l,t,r,b\}}
        \mathrm{KL}\big(\mathcal{S}(z^T_{m,e}, \tau) \,\|\, \mathcal{S}(z^S_{m,e}, \tau)\big)

    with ``𝒮(z, τ) = softmax(z / τ)`` over the ``n + 1`` bins of an edge's distribution.
    ``student_dist``, ``teacher_dist``: ``(M, 4, n + 1)``; ``weights``: ``(M,)`` ≥ 0 (0 outside the
    region) → scalar; 0 when ``Σ w = 0``.

    Paper: Zheng, Ye, Wang, Ren, Zuo, Hou, Cheng, "Localization Distillation for Dense Object
    Detection", CVPR 2022, arXiv 2102.12252 (LD: KL between the teacher's and the student's
    temperature-softened edge distributions, summed over the four edges). The authors' code
    (HikariTJU/LD ``KnowledgeDistillationKLDivLoss``, ``LDHead``) averages the KL over the ``n + 1``
    bins (a factor ``1/(n+1)``) and sums the weighted terms over positions divided by 4 instead of the
    weighted mean here (a factor ``Σ_m w_m / 4``); the loss weight absorbs both.
    """
    if weights.shape != student_dist.shape[:1]:
        raise ValueError(f"ld_loss: weights must be (M,) = ({student_dist.shape[0]},), got {tuple(weights.shape)}")
    per = ld_kl(student_dist, teacher_dist, tau)
    total = weights.sum()
    if float(total) <= 0:
        return student_dist.sum() * 0.0
    return (fp32(weights) * per).sum() / total


def pairwise_iou_diou(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    r"""IoU and Distance-IoU of every pair: ``(N, 4), (n, 4) → (N, n), (N, n)``.

    .. math:: \mathrm{DIoU} = \mathrm{IoU} - \frac{\rho^2(c_a, c_b)}{d^2}

    ``ρ`` the distance of the centres, ``d`` the diagonal of the smallest box enclosing both.
    """
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp_min(0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp_min(0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp_min(0).prod(-1)
    iou = inter / (area_a[:, None] + area_b[None] - inter).clamp_min(1e-9)
    ca, cb = (a[:, :2] + a[:, 2:]) / 2, (b[:, :2] + b[:, 2:]) / 2
    rho2 = ((ca[:, None] - cb[None]) ** 2).sum(-1)
    outer = (torch.maximum(a[:, None, 2:], b[None, :, 2:]) - torch.minimum(a[:, None, :2], b[None, :, :2]))
    diag2 = (outer ** 2).sum(-1).clamp_min(1e-9)
    return iou, iou - rho2 / diag2


def valuable_localization_region(points: Tensor, strides: Tensor, boxes: Tensor, *, anchor_scale: float = 8.0,
                                 topk: int = 9, alpha_vl: float = 0.25) -> Tensor:
    r"""The valuable localization region (VLR) of one image and its weights: ``(N,)``, 0 outside.

    Each point carries a square anchor of side ``anchor_scale · stride`` (ATSS's). For each
    ground-truth box, ATSS's positive threshold is ``α_pos = mean + std`` of the IoUs of the
    ``topk`` anchors nearest to its centre on every level. A point is in the VLR of a box when

    .. math:: \alpha_{vl} \cdot \alpha_{pos} \le \mathrm{DIoU}(\text{anchor}, \text{box}) < \alpha_{pos}

    and its weight is its largest IoU with such a box (0 when in none).

    ``points``: ``(N, 2)`` xy pixels; ``strides``: ``(N,)`` (points of one level share a stride, levels
    follow one another); ``boxes``: ``(n, 4)`` xyxy pixels → ``(N,)`` float.

    Paper: Zheng, Ye, Hou, Ren, Wang, Zuo, Cheng, "Localization Distillation for Object Detection",
    TPAMI 2023, arXiv 2204.05957 (and the CVPR version, 2102.12252): the VLR lies between the main
    (positive) region and the background, ``α_vl = 0.25``. The DIoU test, the IoU weights, the topk 9
    and the anchor scale 8 follow the authors' code (HikariTJU/LD ``ATSSAssigner.get_vlr_region``).
    """
    n_points = points.shape[0]
    out = points.new_zeros(n_points)
    if len(boxes) == 0 or n_points == 0:
        return out
    half = strides.to(points.dtype)[:, None] * anchor_scale / 2
    anchors = torch.cat([points - half, points + half], dim=1)
    iou, diou = pairwise_iou_diou(anchors, boxes.to(points.dtype))  # (N, n)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    dist = torch.cdist(points, centres.to(points.dtype))  # (N, n)
    candidates = []
    for s in torch.unique_consecutive(strides):
        idx = (strides == s).nonzero().squeeze(1)
        k = min(topk, len(idx))
        near = dist[idx].topk(k, dim=0, largest=False).indices  # (k, n)
        candidates.append(idx[near])
    cand = torch.cat(candidates, dim=0)  # (Σk, n)
    cand_iou = iou.gather(0, cand)
    thr = cand_iou.mean(0) + cand_iou.std(0) if cand.shape[0] > 1 else cand_iou.mean(0)
    inside = (diou >= alpha_vl * thr[None]) & (diou < thr[None])
    weights = torch.where(inside, iou, torch.full_like(iou, -1.0)).amax(dim=1)
    return weights.clamp_min(0.0)


# --------------------------------------------------------------------------------------------
# LGD
# --------------------------------------------------------------------------------------------


def lgd_feature_loss(student: Tensor, knowledge: Tensor, eps: float = 1e-5) -> Tensor:
    r"""LGD's distillation term: mean squared error of the instance-normalised maps.

    .. math::
        L_{distill} = \frac{1}{B C H W} \sum_{b,c,i,j}
        \big(\mathrm{IN}(K)_{b,c,i,j} - \mathrm{IN}(F^S)_{b,c,i,j}\big)^2, \qquad
        \mathrm{IN}(x)_{b,c} = \frac{x_{b,c} - \mu_{b,c}}{\sqrt{\sigma^2_{b,c} + \epsilon}}

    (``μ``, ``σ²`` the mean and biased variance of each channel's map). ``student``: the student's
    (adapted) map ``(B, C, H, W)``; ``knowledge``: the instructive knowledge of the same shape (pass it
    detached: the student follows it; the knowledge is trained by its own detection loss). Several
    levels: pass them flattened and concatenated, or average per level as the method does.

    Paper: Zhang, Kang, Yang, Zhang, Zheng, Sun, "LGD: Label-guided Self-distillation for Object
    Detection", AAAI 2022, arXiv 2109.11496; the instance norm (no affine) on both sides follows the
    authors' code (megvii-research/LGD ``BaseDistillator.distill``).
    """
    _check_map(student, "lgd_feature_loss")
    _same(student, knowledge, "lgd_feature_loss")
    s = F.instance_norm(fp32(student), eps=eps)
    k = F.instance_norm(fp32(knowledge), eps=eps)
    return ((k - s) ** 2).mean()
