"""Self-distillation losses: a network taught by its own deeper exits, its own ranking of the
classes, its own salient channels and deeper layers.

Shapes: ``logits`` ``(B, K)``, ``targets`` ``(B,)``, pooled exit features ``(B, D)``, feature
maps ``(B, C, H, W)``. Unlike the teacher-student functions of :mod:`distill.functional.core`,
several functions here take one tensor in two roles (the deepest classifier is trained by its
labels *and* teaches the shallow ones); where a paper stops the gradient of the teaching role,
the function detaches that role itself and says so.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.functional._precision import fp32
from distill.functional.core import _non_target, kd_loss

__all__ = [
    "byot_loss",
    "channel_salience",
    "dense_class_votes",
    "msd_loss",
    "sla_aggregate",
    "sla_joint_targets",
    "sla_rotations",
    "sla_sd_loss",
    "soft_kl",
    "tffd_inter_loss",
    "tffd_intra_loss",
    "zipf_ls_loss",
    "zipf_ranks",
    "zipf_targets",
]


def soft_kl(student_logits: Tensor, teacher_logits: Tensor, T: float = 3.0) -> Tensor:
    r""":math:`\mathrm{KL}(\operatorname{softmax}(t/T) \,\|\, \operatorname{softmax}(s/T))`, batch mean,
    **without** Hinton's T² factor (the form BYOT and MSD write). ``(B, K), (B, K) → scalar``."""
    return kd_loss(student_logits, teacher_logits, T) / (T * T)


def _check_exits(exit_logits: Sequence[Tensor], exit_features: Sequence[Tensor] | None,
                 deepest_feature: Tensor | None, lam: float) -> None:
    if lam != 0.0:
        if exit_features is None or deepest_feature is None:
            raise ValueError(f"the feature hint (lam={lam}) needs exit_features and deepest_feature")
        if len(exit_features) != len(exit_logits):
            raise ValueError(f"{len(exit_logits)} exit logits but {len(exit_features)} exit features")


def _hint(feature: Tensor, target: Tensor) -> Tensor:
    """Mean over the batch of the squared L2 distance, ``(B, D), (B, D) → scalar``."""
    if feature.shape != target.shape:
        raise ValueError(f"exit feature {tuple(feature.shape)} and deepest feature {tuple(target.shape)} differ")
    return (feature - target).flatten(1).pow(2).sum(dim=1).mean()


def byot_loss(
    exit_logits: Sequence[Tensor],
    deepest_logits: Tensor,
    targets: Tensor,
    exit_features: Sequence[Tensor] | None = None,
    deepest_feature: Tensor | None = None,
    alpha: float = 0.3,
    lam: float = 0.03,
    T: float = 3.0,
) -> Tensor:
    r"""Be Your Own Teacher: shallow exits taught by the labels, the deepest exit and its feature.

    With shallow exits :math:`i = 1..C-1` (logits :math:`z_i`, features :math:`f_i`) and the
    deepest classifier :math:`C` (the network's own output :math:`z_C`, feature :math:`f_C`):

    .. math::
        L = (1-\alpha)\,\mathrm{CE}(z_C, y) + \sum_{i<C} \Big[(1-\alpha)\,\mathrm{CE}(z_i, y)
            + \alpha\,\mathrm{KL}\big(\sigma(z_C/T) \,\|\, \sigma(z_i/T)\big)
            + \lambda\,\overline{\lVert f_i - f_C \rVert_2^2}\Big]

    (the paper's :math:`\sum_{i=1}^{C}` of :math:`(1-\alpha)\mathrm{CE} + \alpha\mathrm{KL} + \lambda
    \lVert\cdot\rVert^2`, whose KL and hint vanish for :math:`i = C`). The overline is the mean over
    the batch. :math:`z_C` and :math:`f_C` are *detached* inside their teaching roles: the deepest
    classifier learns from the labels only.

    Shapes: each ``exit_logits[i]`` and ``deepest_logits`` (B, K); ``targets`` (B,); each
    ``exit_features[i]`` and ``deepest_feature`` (B, D) (needed when ``lam != 0``) → scalar.

    Paper: L. Zhang, J. Song, A. Gao, J. Chen, C. Bao, K. Ma, "Be Your Own Teacher: Improve the
    Performance of Convolutional Neural Networks via Self Distillation", ICCV 2019, arXiv
    1905.08094. Defaults α = 0.3, λ = 0.03, T = 3 are the authors' code's (``loss_coefficient``,
    ``feature_loss_coefficient``, ``temperature``). Differences of that code: the deepest
    classifier's CE has weight 1 (not 1 − α); the KL is written as the soft cross-entropy
    :math:`-\sum p_C \log p_i` (same gradient); no T² factor (as here); the hint is
    ``torch.dist`` (the L2 norm over the whole batch, not squared) of a linear adaptation of the
    exit feature.
    """
    _check_exits(exit_logits, exit_features, deepest_feature, lam)
    teacher = deepest_logits.detach()
    loss = (1.0 - alpha) * F.cross_entropy(deepest_logits, targets)
    for i, z in enumerate(exit_logits):
        loss = loss + (1.0 - alpha) * F.cross_entropy(z, targets) + alpha * soft_kl(z, teacher, T)
        if lam != 0.0:
            loss = loss + lam * _hint(exit_features[i], deepest_feature.detach())  # type: ignore[index,union-attr]
    return loss


def msd_loss(
    logits: Sequence[Tensor],
    targets: Tensor,
    exit_features: Sequence[Tensor] | None = None,
    deepest_feature: Tensor | None = None,
    alpha: float = 0.3,
    lam: float = 0.0,
    T: float = 3.0,
) -> Tensor:
    r"""Multi-self-distillation: every classifier learns from the labels and from all the others.

    With classifiers :math:`i = 1..C` (shallow to deep, the last is the network's own output):

    .. math::
        L = \sum_{i=1}^{C} \Big[(1-\alpha)\,\mathrm{CE}(z_i, y) + \frac{\alpha}{C-1} \sum_{j \ne i}
            \mathrm{KL}\big(\sigma(\bar z_j/T) \,\|\, \sigma(z_i/T)\big)\Big]
            + \lambda \sum_{i<C} \overline{\lVert f_i - \bar f_C \rVert_2^2}

    where a bar is a detached (teaching) copy: as in deep mutual learning, each classifier treats
    the others' outputs as fixed targets, so the deepest classifier too learns from the shallow
    ones. The hint term is BYOT's (off by default).

    Shapes: ``logits`` C ≥ 2 tensors (B, K); ``targets`` (B,); ``exit_features`` C−1 tensors
    (B, D) and ``deepest_feature`` (B, D) when ``lam != 0`` → scalar.

    Paper: Y. Luan, H. Zhao, Z. Yang, Y. Dai, "MSD: Multi-Self-Distillation Learning via
    Multi-classifiers within Deep Neural Networks", 2019, arXiv 1911.09418. Written from the
    paper's description (all classifiers teach each other); its code was not available to us, so
    the defaults (α = 0.3, T = 3, no T² factor) are BYOT's, which the paper builds on.
    """
    if len(logits) < 2:
        raise ValueError(f"MSD needs at least 2 classifiers, got {len(logits)}")
    _check_exits(logits[:-1], exit_features, deepest_feature, lam)
    teachers = [z.detach() for z in logits]
    share = alpha / (len(logits) - 1)
    loss = logits[0].new_zeros(())
    for i, z in enumerate(logits):
        loss = loss + (1.0 - alpha) * F.cross_entropy(z, targets)
        for j, t in enumerate(teachers):
            if j != i:
                loss = loss + share * soft_kl(z, t, T)
    if lam != 0.0:
        for f in exit_features:  # type: ignore[union-attr]
            loss = loss + lam * _hint(f, deepest_feature.detach())  # type: ignore[union-attr]
    return loss


# --------------------------------------------------------------------------------------------
# Zipf's label smoothing
# --------------------------------------------------------------------------------------------


def dense_class_votes(dense_logits: Tensor) -> Tensor:
    """How many locations vote for each class: ``(B, K, *spatial)`` logits → ``(B, K)`` counts.

    Each location's vote is its argmax class (the dense prediction of Zipf's label smoothing).
    """
    if dense_logits.dim() < 3:
        raise ValueError(f"dense logits must be (B, K, *spatial), got shape {tuple(dense_logits.shape)}")
    b, k = dense_logits.shape[:2]
    winners = dense_logits.flatten(2).argmax(dim=1)  # (B, L)
    votes = torch.zeros(b, k, dtype=dense_logits.dtype, device=dense_logits.device)
    return votes.scatter_add_(1, winners, torch.ones_like(winners, dtype=votes.dtype))


def zipf_ranks(scores: Tensor) -> Tensor:
    """Rank of each class by descending score, ties sharing their smallest rank: ``(B, K) → (B, K)``.

    ``rank_k = 1 + #{j : score_j > score_k}`` (scipy's ``rankdata(-s, method="min")``), int64.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (B, K), got shape {tuple(scores.shape)}")
    ascending = scores.sort(dim=1).values.contiguous()
    not_greater = torch.searchsorted(ascending, scores.contiguous(), right=True)  # #{j : s_j <= s_k}
    return 1 + scores.shape[1] - not_greater


def zipf_targets(ranks: Tensor, targets: Tensor, power: float = 1.0, dtype: torch.dtype | None = None) -> Tensor:
    r"""Zipf's soft labels over the non-target classes: ``(B, K)`` ranks, ``(B,)`` labels → ``(B, K-1)``.

    .. math:: \pi_k = \frac{r_k^{-s}}{\sum_{j \ne y} r_j^{-s}}, \qquad k \ne y

    with :math:`r_k` the rank of class k among all K classes (the target included, so when the
    model ranks the target first the non-target ranks start at 2) and :math:`s` = ``power``.
    Columns stay in class order with the target column removed; ``dtype`` defaults to torch's
    default float dtype.
    """
    if power <= 0:
        raise ValueError(f"power must be > 0, got {power}")
    weights = _non_target(ranks.to(dtype or torch.get_default_dtype()).pow(-power), targets)
    return weights / weights.sum(dim=1, keepdim=True)


def zipf_ls_loss(logits: Tensor, targets: Tensor, ranks: Tensor, power: float = 1.0,
                 correct_only: bool = False) -> Tensor:
    r"""Zipf's label smoothing term: KL from the Zipf soft labels to the non-target prediction.

    .. math::
        L = \frac{1}{|S|} \sum_{b \in S} \sum_{k \ne y_b} \pi_{b,k}
            \log \frac{\pi_{b,k}}{\hat q_{b,k}}, \qquad
        \hat q_b = \operatorname{softmax}\big((z_{b,k})_{k \ne y_b}\big)

    :math:`\pi` from :func:`zipf_targets`; :math:`\hat q` is the softmax over the K−1 non-target
    logits only (the target probability is left to the cross-entropy); :math:`S` is the batch, or
    with ``correct_only`` the samples whose argmax is their label (0 when there are none).
    The full objective is :math:`\mathrm{CE} + \lambda L`.

    Shapes: ``logits`` (B, K), ``targets`` (B,), ``ranks`` (B, K) → scalar.

    Paper: J. Liang, L. Li, Z. Bing, B. Zhao, Y. Tang, B. Lin, H. Fan, "Efficient One Pass
    Self-distillation with Zipf's Label Smoothing", ECCV 2022, arXiv 2207.12980 (reference code:
    github.com/megvii-research/zipfls: ``power`` 1, ``loss_mask`` off by default).
    """
    if logits.shape[1] < 2:
        raise ValueError("Zipf's label smoothing needs at least 2 classes")
    pi = zipf_targets(ranks.to(logits.device), targets, power, dtype=logits.dtype)
    log_q = F.log_softmax(_non_target(fp32(logits), targets), dim=1)
    per_sample = (pi * (pi.clamp_min(torch.finfo(pi.dtype).tiny).log() - log_q)).sum(dim=1)
    if not correct_only:
        return per_sample.mean()
    mask = (logits.detach().argmax(dim=1) == targets).to(per_sample.dtype)
    return (per_sample * mask).sum() / mask.sum().clamp_min(1.0)


# --------------------------------------------------------------------------------------------
# Teacher-free feature distillation
# --------------------------------------------------------------------------------------------


def channel_salience(feature: Tensor) -> Tensor:
    r"""Salience of each channel of ``(B, C, H, W)`` maps → ``(C,)``.

    .. math:: s_c = \frac{1}{B H W} \sum_{b,h,w} \frac{F_{b,c,h,w}}{\lVert F_{b,c,:,:} \rVert_2}

    (each channel map L2-normalised over its locations, then averaged over batch and locations).
    """
    if feature.dim() != 4:
        raise ValueError(f"Tf-FD needs (B, C, H, W) feature maps, got shape {tuple(feature.shape)}")
    return F.normalize(feature, p=2, dim=(2, 3)).mean(dim=(0, 2, 3))


def tffd_intra_loss(feature: Tensor) -> Tensor:
    r"""Intra-layer Tf-FD: the salient half of a layer's channels teaches the other half.

    Channels are sorted by :func:`channel_salience` (descending); with :math:`h = \lfloor C/2 \rfloor`,
    the i-th most salient channel teaches the (h+i)-th:

    .. math:: L = \frac{1}{B h H W} \sum_{b, i<h, x} \big(F_{b,\pi(h+i),x} - \bar F_{b,\pi(i),x}\big)^2

    (a bar: detached). With an odd C the least salient channel sits out. ``(B, C, H, W) → scalar``;
    0 for a single channel.

    Paper: L. Li, "Self-Regulated Feature Learning via Teacher-free Feature Distillation", ECCV
    2022 (code: github.com/lilujunai/Teacher-free-Distillation). The published code's MSE does not
    detach the salient half, so it also pulls salient channels towards redundant ones; the paper
    transfers knowledge *from* salient *to* redundant features, which the detach implements.
    """
    order = channel_salience(feature.detach()).argsort(descending=True)
    h = feature.shape[1] // 2
    if h == 0:
        return feature.sum() * 0.0
    ranked = feature.index_select(1, order)
    return F.mse_loss(ranked[:, h:2 * h], ranked[:, :h].detach())


def tffd_inter_loss(shallow: Tensor, deep: Tensor) -> Tensor:
    r"""Inter-layer Tf-FD: a deeper layer's features teach a shallower layer's.

    The map with more locations is average-pooled (adaptively) to the other's size; the first
    :math:`m = \min(C_s, C_d)` channels are compared:

    .. math:: L = \frac{1}{B m H W} \sum_{b, c<m, x} \big(P(F^s)_{b,c,x} - \bar F^d_{b,c,x}\big)^2

    (a bar: detached). ``(B, C_s, H_s, W_s), (B, C_d, H_d, W_d) → scalar``. Paper: see
    :func:`tffd_intra_loss`.
    """
    for name, t in (("shallow", shallow), ("deep", deep)):
        if t.dim() != 4:
            raise ValueError(f"Tf-FD needs (B, C, H, W) feature maps, got {name} {tuple(t.shape)}")
    if shallow.shape[0] != deep.shape[0]:
        raise ValueError(f"batch sizes differ: shallow {tuple(shallow.shape)}, deep {tuple(deep.shape)}")
    deep = deep.detach()
    size = (min(shallow.shape[2], deep.shape[2]), min(shallow.shape[3], deep.shape[3]))
    if tuple(shallow.shape[2:]) != size:
        shallow = F.adaptive_avg_pool2d(shallow, size)
    if tuple(deep.shape[2:]) != size:
        deep = F.adaptive_avg_pool2d(deep, size)
    m = min(shallow.shape[1], deep.shape[1])
    return F.mse_loss(shallow[:, :m], deep[:, :m])


# --------------------------------------------------------------------------------------------
# Self-supervised label augmentation (SLA) with self-distillation
# --------------------------------------------------------------------------------------------


def sla_rotations(inputs: Tensor) -> Tensor:
    """The four rotations (0, 90, 180, 270 degrees) of each image, sample-major:
    ``(B, C, H, W) → (4B, C, H, W)``, row ``4b + j`` = image b rotated by j quarter turns."""
    if inputs.dim() != 4 or inputs.shape[-1] != inputs.shape[-2]:
        raise ValueError(f"SLA rotates square images (B, C, H, H), got shape {tuple(inputs.shape)}")
    return torch.stack([torch.rot90(inputs, j, (2, 3)) for j in range(4)], dim=1).flatten(0, 1)


def sla_joint_targets(targets: Tensor, transforms: int) -> Tensor:
    """Joint (class, transformation) labels ``y M + j``, sample-major: ``(B,) → (B M,)``."""
    return (targets.view(-1, 1) * transforms + torch.arange(transforms, device=targets.device)).flatten()


def sla_aggregate(joint_logits: Tensor) -> Tensor:
    r"""Aggregated prediction of SLA: ``(B, M, K M)`` joint logits → ``(B, K)`` logits.

    .. math:: \tilde z_{b,k} = \frac{1}{M} \sum_{j} z_{b,j,\,kM + j}

    (for transformation j of sample b, the joint logit of class k *with* transformation j); its
    softmax is the paper's aggregated distribution (a normalised geometric mean).
    """
    b, m, km = joint_logits.shape
    if km % m:
        raise ValueError(f"joint logits (B, M, K*M) need a last size divisible by M={m}, got {tuple(joint_logits.shape)}")
    per_class = joint_logits.view(b, m, km // m, m)  # [b, j, k, j']
    return torch.diagonal(per_class, dim1=1, dim2=3).mean(dim=-1)  # j' = j, averaged over j


def sla_sd_loss(joint_logits: Tensor, single_logits: Tensor, targets: Tensor, T: float = 1.0,
                beta: float = 1.0) -> Tensor:
    r"""SLA with self-distillation: joint-label CE, the single head's CE, and the aggregated
    prediction distilled into the single head.

    .. math::
        L = \frac{1}{BM} \sum_{b,j} \mathrm{CE}(z_{b,j}, y_b M + j)
            + \beta\, \mathrm{CE}(v_b, y_b)
            + T^2\, \mathrm{KL}\big(\sigma(\bar{\tilde z}_b / T) \,\|\, \sigma(v_b / T)\big)

    with :math:`z_{b,j}` the joint head on transformation j of sample b, :math:`v_b` the single
    (ordinary K-way) head on the untransformed sample, :math:`\tilde z` :func:`sla_aggregate`
    (detached: the aggregate teaches the single head only); the last two terms are batch means.

    Shapes: ``joint_logits`` (B, M, K M), ``single_logits`` (B, K), ``targets`` (B,) → scalar.

    Paper: H. Lee, S. J. Hwang, J. Shin, "Self-supervised Label Augmentation via Input
    Transformations", ICML 2020, arXiv 1910.05872 (Eq. 6; T = 1 and β = 1 as in the reference code,
    github.com/hankook/SLA ``create_sla_sd_trainer``).
    """
    b, m, km = joint_logits.shape
    if single_logits.shape != (b, km // m):
        raise ValueError(f"single logits {tuple(single_logits.shape)} do not match joint logits "
                         f"{tuple(joint_logits.shape)} (expected ({b}, {km // m}))")
    joint = F.cross_entropy(joint_logits.reshape(b * m, km), sla_joint_targets(targets, m))
    teacher = sla_aggregate(joint_logits).detach()
    return joint + beta * F.cross_entropy(single_logits, targets) + kd_loss(single_logits, teacher, T)
