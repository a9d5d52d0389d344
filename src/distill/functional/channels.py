"""The math of four feature-map methods: CWD, MGD, SimKD and SemCKD.

Conventions: feature maps are ``(B, C, H, W)``; nothing here detaches the teacher (the methods
pass detached teacher tensors); no state and no modules: the trainable parts (channel adapters,
MGD's generation block, SimKD's projector, SemCKD's projections and query/key embeddings) live
in :mod:`distill.methods.channels` and their outputs are passed in.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.functional._precision import fp32

__all__ = [
    "channel_log_softmax",
    "cwd_loss",
    "mgd_mask",
    "mgd_channel_mask",
    "mgd_loss",
    "simkd_loss",
    "semckd_similarity",
    "semckd_attention",
    "semckd_pair_distance",
    "semckd_loss",
]


def _maps(student: Tensor, teacher: Tensor, what: str) -> None:
    if student.dim() != 4 or teacher.dim() != 4:
        raise ValueError(
            f"{what} needs (B, C, H, W) maps, got {tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    if student.shape != teacher.shape:
        raise ValueError(
            f"{what} needs equal shapes (adapt the student first), got {tuple(student.shape)} and "
            f"{tuple(teacher.shape)}"
        )


# --------------------------------------------------------------------------------------------
# CWD
# --------------------------------------------------------------------------------------------


def channel_log_softmax(feature: Tensor, tau: float = 4.0) -> Tensor:
    r"""Log of each channel's spatial softmax: ``(B, C, H, W) → (B, C, H·W)``.

    .. math:: \log \phi(y_c)_i = \frac{y_{c,i}}{\tau} - \log \sum_{j=1}^{H W} \exp\frac{y_{c,j}}{\tau}
    """
    if feature.dim() != 4:
        raise ValueError(f"channel_log_softmax needs a (B, C, H, W) map, got {tuple(feature.shape)}")
    return F.log_softmax(fp32(feature).flatten(2) / tau, dim=2)


def cwd_loss(student: Tensor, teacher: Tensor, tau: float = 4.0) -> Tensor:
    r"""Channel-wise distillation: KL between per-channel spatial distributions, times τ².

    .. math::
        L_{CWD} = \frac{\tau^2}{B\,C} \sum_{b=1}^{B} \sum_{c=1}^{C} \sum_{i=1}^{H W}
        \phi(y^T_{b,c})_i \log \frac{\phi(y^T_{b,c})_i}{\phi(y^S_{b,c})_i},
        \qquad \phi(y_c)_i = \operatorname{softmax}_i(y_{c,i} / \tau)

    ``student`` (already mapped to the teacher's C channels), ``teacher``: (B, C, H, W), equal
    shapes → scalar. The teacher's distribution comes first (KL(teacher ‖ student)): the student
    is pushed hardest where the teacher's channel is salient.

    Paper: Shu, Liu, Gao, Yan, Shen, "Channel-wise Knowledge Distillation for Dense Prediction",
    ICCV 2021, arXiv 2011.13256 (eq. 4: τ²/C times the sum over channels and positions; the
    per-image loss is averaged over the batch here). The authors' code (TorchDistiller
    ``SemSeg-distill/utils/criterion.py`` ``CriterionCWD`` with ``norm_type='channel'``,
    ``divergence='kl'``) and mmrazor compute the same quantity (sum divided by B·C, times τ²).
    Default τ = 4: the authors' Cityscapes setting (``exp_cwd.sh channel kl 3 4``: weight 3,
    τ = 4); their detection configs use τ = 1.
    """
    _maps(student, teacher, "cwd_loss")
    b, c = teacher.shape[:2]
    log_p_t = channel_log_softmax(teacher, tau)
    log_p_s = channel_log_softmax(student, tau)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum()
    return kl * (tau * tau) / (b * c)


# --------------------------------------------------------------------------------------------
# MGD
# --------------------------------------------------------------------------------------------


def _keep_mask(
    shape: tuple[int, ...],
    ratio: float,
    generator: torch.Generator | None,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
) -> Tensor:
    """0 where ``U(0, 1) < ratio``, 1 elsewhere, of ``shape``; drawn on the CPU from ``generator``."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"MGD mask ratio must be in [0, 1], got {ratio}")
    r = torch.rand(*shape, generator=generator)
    mask = (r >= ratio).to(dtype or torch.get_default_dtype())
    return mask if device is None else mask.to(device)


def mgd_mask(
    batch: int,
    height: int,
    width: int,
    ratio: float = 0.5,
    generator: torch.Generator | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    r"""MGD's random spatial mask ``M``: ``(B, 1, H, W)``, 0 at masked positions, 1 elsewhere.

    .. math:: M_{b,i,j} = \begin{cases} 0 & R_{b,i,j} < \lambda \\ 1 & \text{otherwise} \end{cases},
        \qquad R_{b,i,j} \sim U(0, 1)

    Each position of each sample is masked independently with probability λ = ``ratio``; the
    same mask covers every channel (the paper's "random pixels"). Draws on the CPU from
    ``generator`` (reproducible), then moves to ``device``.
    """
    return _keep_mask((batch, 1, height, width), ratio, generator, device, dtype)


def mgd_channel_mask(
    batch: int,
    channels: int,
    ratio: float = 0.15,
    generator: torch.Generator | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    r"""The channel mask of the authors' classification code: ``(B, C, 1, 1)``, 0 = masked channel.

    .. math:: M_{b,c} = 0 \text{ if } R_{b,c} < \lambda \text{ else } 1, \qquad R_{b,c} \sim U(0, 1)

    Each channel of each sample is masked with probability λ = ``ratio`` at every position.
    yzd-v/MGD ``cls/mmcls/distillation/losses/mgd.py`` draws this ``(N, C, 1, 1)`` mask (its
    spatial ``(N, 1, H, W)`` line is commented out) with ``lambda_mgd=0.15`` in its ImageNet
    configs, whereas the paper describes masking random pixels (:func:`mgd_mask`).
    """
    return _keep_mask((batch, channels, 1, 1), ratio, generator, device, dtype)


def mgd_loss(generated: Tensor, teacher: Tensor) -> Tensor:
    r"""MGD's generation loss: squared error summed over channels and positions, mean over the batch.

    .. math::
        L_{dis} = \frac{1}{B} \sum_{b=1}^{B} \sum_{k=1}^{C} \sum_{i=1}^{H} \sum_{j=1}^{W}
        \big(T_{b,k,i,j} - \mathcal G(f_{align}(S_b) \cdot M_b)_{k,i,j}\big)^2

    ``generated`` = :math:`\mathcal G(f_{align}(S) \cdot M)` (the method's generation block, 3x3
    conv → ReLU → 3x3 conv, on the masked aligned student map), ``teacher``: (B, C, H, W) → scalar.

    Paper: Yang, Li, Shao, Shi, Yuan, Yuan, "Masked Generative Distillation", ECCV 2022,
    arXiv 2205.01529 (eq. 3, per image; the total loss adds α·L_dis). α = 7e-5 for
    classification is the authors' ImageNet configs' ``alpha_mgd=0.00007`` (yzd-v/MGD
    ``cls/configs/distillers/res34_distill_res18_img.py``; 2e-5 in their detection and
    segmentation code). The authors' code (``MGDLoss``) sums the squared error over the batch
    and divides by B, as here.
    """
    _maps(generated, teacher, "mgd_loss")
    return (generated - teacher).pow(2).sum() / teacher.shape[0]


# --------------------------------------------------------------------------------------------
# SimKD
# --------------------------------------------------------------------------------------------


def simkd_loss(projected: Tensor, teacher: Tensor, reduction: str = "mean") -> Tensor:
    r"""SimKD's feature-alignment ℓ2 loss between the projected student feature and the teacher's.

    .. math::
        L_{SimKD} = \frac{1}{B\,C\,H\,W} \sum_b \lVert f^t_b - \mathcal P(f^s_b) \rVert_2^2
        \quad (\text{``mean''}), \qquad
        \frac{1}{B} \sum_b \lVert f^t_b - \mathcal P(f^s_b) \rVert_2^2 \quad (\text{``sum''})

    ``projected`` = :math:`\mathcal P(f^s)` (the method's projector), ``teacher`` = :math:`f^t`:
    (B, C, H, W) or (B, D), equal shapes → scalar.

    Paper: Chen, Mei, Zhang, Wang, Feng, Chen, "Knowledge Distillation with the Reused Teacher
    Classifier", CVPR 2022, arXiv 2203.14001 (eq. 2 writes the unnormalised squared ℓ2 norm).
    ``"mean"`` (default) is the authors' code (DefangChen/SimKD, ``nn.MSELoss()``), the scale the
    paper's results and learning rates were obtained with; ``"sum"`` is the literal per-sample
    squared norm, C·H·W times larger.
    """
    if projected.shape != teacher.shape:
        raise ValueError(f"simkd_loss needs equal shapes, got {tuple(projected.shape)} and {tuple(teacher.shape)}")
    sq = (projected - teacher).pow(2)
    if reduction == "mean":
        return sq.mean()
    if reduction == "sum":
        return sq.sum() / teacher.shape[0]
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


# --------------------------------------------------------------------------------------------
# SemCKD
# --------------------------------------------------------------------------------------------


def semckd_similarity(feature: Tensor) -> Tensor:
    r"""A layer's pairwise sample-similarity matrix: ``(B, ...) → (B, B)``.

    .. math:: A = R(F)\, R(F)^\top, \qquad R(F) \in \mathbb R^{B \times C H W}\ \text{(flattened per sample)}

    Row b is sample b's representation from which SemCKD's query (student layer) or key
    (teacher layer) is computed.
    """
    flat = feature.reshape(feature.shape[0], -1)
    return flat @ flat.t()


def semckd_attention(queries: Tensor, keys: Tensor) -> Tensor:
    r"""SemCKD's soft layer association: softmax over teacher layers of query·key.

    .. math:: \alpha^b_{(s, t)} = \frac{\exp(q^{b\top}_s k^b_t)}{\sum_{t'} \exp(q^{b\top}_s k^b_{t'})}

    ``queries`` (B, S, d), one per student layer; ``keys`` (B, T, d), one per teacher layer
    → ``(B, S, T)``, each row a distribution over the T teacher layers.
    """
    if queries.dim() != 3 or keys.dim() != 3 or queries.shape[0] != keys.shape[0] or queries.shape[2] != keys.shape[2]:
        raise ValueError(
            f"queries (B, S, d) and keys (B, T, d) expected, got {tuple(queries.shape)}, {tuple(keys.shape)}"
        )
    return torch.softmax(torch.bmm(queries, keys.transpose(1, 2)), dim=-1)


def semckd_pair_distance(projected: Tensor, teacher: Tensor) -> Tensor:
    r"""Per-sample mean squared error of one (student layer, teacher layer) pair: ``(B,)``.

    .. math:: \mathrm{Dist}_b = \frac{1}{C_t H W} \lVert F^b_t - \mathrm{Proj}(F^b_s, t) \rVert_2^2
    """
    if projected.shape != teacher.shape:
        raise ValueError(
            f"semckd_pair_distance needs equal shapes, got {tuple(projected.shape)} and {tuple(teacher.shape)}"
        )
    return (projected - teacher).pow(2).reshape(teacher.shape[0], -1).mean(dim=1)


def semckd_loss(
    projected: Sequence[Sequence[Tensor]], targets: Sequence[Sequence[Tensor]], attention: Tensor
) -> Tensor:
    r"""SemCKD: attention-weighted feature distances over every (student, teacher) layer pair.

    .. math::
        L_{SemCKD} = \frac{1}{B\,S} \sum_{b=1}^{B} \sum_{s=1}^{S} \sum_{t=1}^{T}
        \alpha^b_{(s,t)}\, \mathrm{Dist}\big(F^b_t, \mathrm{Proj}(F^b_s, t)\big)

    ``projected[s][t]`` = Proj(F_s, t) (student layer s mapped to teacher layer t's channels and
    spatial size), ``targets[s][t]`` = F_t (average-pooled to the student's size when it is the
    larger), ``attention`` (B, S, T) from :func:`semckd_attention`; Dist is
    :func:`semckd_pair_distance` → scalar.

    Paper: Chen, Mei, Zhang, Wang, Wang, Feng, Chen, "Cross-Layer Distillation with Semantic
    Calibration", AAAI 2021, arXiv 2012.03236 (β = 400 on CIFAR-100). The paper writes the loss
    as a sum over instances and layer pairs; the 1/(B·S) normalisation is the authors' code's
    (DefangChen/SemCKD, ``SemCKDLoss``), the scale at which β = 400 was tuned.
    """
    s_len = len(projected)
    if s_len == 0 or len(targets) != s_len:
        raise ValueError(f"semckd_loss: {s_len} projected rows vs {len(targets)} target rows")
    b, s_att, t_len = attention.shape
    if s_att != s_len:
        raise ValueError(f"attention has {s_att} student layers, projected has {s_len}")
    total = attention.new_zeros(())
    for s in range(s_len):
        if len(projected[s]) != t_len or len(targets[s]) != t_len:
            raise ValueError(f"student layer {s}: expected {t_len} teacher layers")
        for t in range(t_len):
            total = total + (attention[:, s, t] * semckd_pair_distance(projected[s][t], targets[s][t])).sum()
    return total / (b * s_len)
