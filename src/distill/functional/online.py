"""The math of online (mutual) distillation: cohorts, diverse peers, rocket launching, dense
multi-branch ensembles and codistillation.

Conventions: a cohort's outputs are stacked along a leading *peer* axis, ``(M, B, K)`` for M
peers' logits over K classes; dense heads give maps ``(B, C, H, W)``. As in the rest of
:mod:`distill.functional`, nothing here detaches a target unless the paper's loss says so (the
rocket-launching gradient block): callers detach what the paper treats as a constant.

Papers:

* DML: Y. Zhang, T. Xiang, T. M. Hospedales, H. Lu, "Deep Mutual Learning", CVPR 2018,
  arXiv 1706.00384.
* OKDDip: D. Chen, J.-P. Mei, C. Wang, Y. Feng, C. Chen, "Online Knowledge Distillation with
  Diverse Peers", AAAI 2020, arXiv 1912.00350 (reference code: github.com/DefangChen/OKDDip).
* Rocket launching: G. Zhou, Y. Fan, R. Cui, W. Bian, X. Zhu, K. Gai, "Rocket Launching: A
  Universal and Efficient Framework for Training Well-performing Light Net", AAAI 2018,
  arXiv 1708.04106 (reference code: github.com/zhougr1993/Rocket-Launching).
* OKDHP: Z. Li, J. Ye, M. Song, Y. Huang, Z. Pan, "Online Knowledge Distillation for Efficient
  Pose Estimation", ICCV 2021, arXiv 2108.02092 (reference code: github.com/zhengli97/OKDHP).
* Codistillation: R. Anil, G. Pereyra, A. Passos, R. Ormandi, G. E. Dahl, G. E. Hinton, "Large
  scale distributed neural network training through online distillation", ICLR 2018,
  arXiv 1804.03235.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.functional._precision import fp32
from distill.functional.core import cross_entropy, kd_loss, kl_rows

__all__ = [
    "codistillation_kl",
    "codistillation_loss",
    "dml_loss",
    "heatmap_kl_loss",
    "heatmap_mse_loss",
    "okddip_attention",
    "okddip_leader_target",
    "okddip_loss",
    "okddip_parts",
    "okddip_peer_targets",
    "okdhp_ensemble",
    "okdhp_loss",
    "rocket_hint_loss",
    "rocket_loss",
]

AGGREGATIONS = ("logits", "probs")
DENSE_KD_LOSSES = ("kl", "mse")


def _check_positive(name: str, value: float) -> None:
    if not isinstance(value, (int, float, Tensor)) or isinstance(value, bool) or float(value) <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def _stack_peers(peer_logits: Tensor | Sequence[Tensor], what: str) -> Tensor:
    """Peers' logits as one ``(P, B, K)`` tensor (a ``(B, K)`` tensor is one peer)."""
    if isinstance(peer_logits, Tensor):
        stacked = peer_logits.unsqueeze(0) if peer_logits.dim() == 2 else peer_logits
    else:
        peers = list(peer_logits)
        if not peers:
            raise ValueError(f"{what} needs at least one peer's logits, got none")
        shapes = {tuple(p.shape) for p in peers}
        if len(shapes) != 1:
            raise ValueError(f"{what}: the peers' logits differ in shape: {sorted(shapes)}")
        stacked = torch.stack(peers)
    if stacked.dim() != 3 or stacked.shape[0] == 0:
        raise ValueError(f"{what} expects peers' logits (P, B, K) or (B, K), got shape {tuple(stacked.shape)}")
    return stacked


def _log_mean_probs(logits: Tensor, T: float) -> Tensor:
    """log of the mean over the leading axis of softmax(logits / T): (P, B, K) → (B, K), computed stably."""
    return torch.logsumexp(F.log_softmax(fp32(logits) / T, dim=-1), dim=0) - math.log(logits.shape[0])


def _same_shape(a: Tensor, b: Tensor, a_name: str, b_name: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{a_name} {tuple(a.shape)} and {b_name} {tuple(b.shape)} must have the same shape")


# --------------------------------------------------------------------------------------------
# DML
# --------------------------------------------------------------------------------------------


def dml_loss(logits: Tensor, peer_logits: Tensor | Sequence[Tensor], targets: Tensor, T: float = 1.0) -> Tensor:
    r"""Deep mutual learning: the loss network i of a cohort of k minimises.

    .. math::
        L_{\Theta_i} = L_{C_i} + \frac{1}{k-1} \sum_{j \ne i} T^2\,
        \mathrm{KL}\big(p_j^T \,\|\, p_i^T\big),
        \qquad L_{C_i} = -\frac{1}{B}\sum_b \log p_{i,b,y_b}

    (Eq. 5 of the paper; Eqs. 3-4 for k = 2), with :math:`p^T = \operatorname{softmax}(z / T)`,
    KL summed over classes and averaged over the batch. Shapes: ``logits`` (B, K), ``peer_logits``
    the other k - 1 networks' logits, (k-1, B, K) or a sequence of (B, K), ``targets`` (B,) →
    scalar. The paper uses T = 1 (plain posteriors, so the T² factor is 1); other T follow the
    library's Hinton convention. The peers' predictions are constants of this loss: pass them
    detached.
    """
    _check_positive("T", T)
    peers = _stack_peers(peer_logits, "dml_loss")
    if peers.shape[1:] != logits.shape:
        raise ValueError(f"dml_loss: logits {tuple(logits.shape)} and peers' logits {tuple(peers.shape)} disagree")
    mimicry = sum(kd_loss(logits, p, T) for p in peers) / peers.shape[0]
    return cross_entropy(logits, targets) + mimicry


# --------------------------------------------------------------------------------------------
# OKDDip
# --------------------------------------------------------------------------------------------


def okddip_attention(query: Tensor, key: Tensor) -> Tensor:
    r"""OKDDip's aggregation weights of every auxiliary peer over all peers (self-attention).

    .. math:: \alpha_{ab} = \frac{\exp\big((L h_a)^\top (E h_b)\big)}{\sum_f \exp\big((L h_a)^\top (E h_f)\big)}

    ``query`` = :math:`L h` and ``key`` = :math:`E h` are the peers' embeddings ``h`` (B, M, D)
    through the two learnt linear maps (B, M, d) → ``alpha`` (B, M, M), rows summing to 1 (row a:
    peer a's weights). The sum runs over all M peers, peer a included, as in the reference code
    (``softmax(bmm(q, k^T))``); the dot product is not scaled by :math:`\sqrt{d}`, as in both.
    """
    if query.dim() != 3 or query.shape != key.shape:
        raise ValueError(
            f"okddip_attention expects query and key (B, M, d) of one shape, got {tuple(query.shape)} and "
            f"{tuple(key.shape)}"
        )
    return torch.softmax(query @ key.transpose(1, 2), dim=-1)


def okddip_peer_targets(peer_logits: Tensor, attention: Tensor, T: float = 3.0, aggregate: str = "logits") -> Tensor:
    r"""Each auxiliary peer's own target (log-probabilities) from the attention-weighted group.

    ``aggregate="logits"`` (the reference code): :math:`t_a = \operatorname{softmax}\big(\sum_b
    \alpha_{ab} z_b / T\big)`; ``"probs"``: :math:`t_a = \sum_b \alpha_{ab}
    \operatorname{softmax}(z_b / T)`, a mixture of the peers' softened predictions.

    Shapes: ``peer_logits`` (M, B, K), ``attention`` (B, M, M) from :func:`okddip_attention` →
    ``log t`` (M, B, K). Gradients flow into both the logits and the attention: the aggregation
    weights are learnt through the distillation loss. The paper speaks of targets derived from the
    peers' predictions; the reference code weights the logits before the temperature softmax, which
    is the default here, and ``"probs"`` is the other reading.
    """
    _check_positive("T", T)
    if aggregate not in AGGREGATIONS:
        raise ValueError(f"aggregate must be one of {AGGREGATIONS}, got {aggregate!r}")
    m, b, _ = peer_logits.shape
    if attention.shape != (b, m, m):
        raise ValueError(
            f"attention {tuple(attention.shape)} does not match {m} peers over a batch of {b}: expected {(b, m, m)}"
        )
    if aggregate == "logits":
        mixed = torch.einsum("bac,cbk->abk", attention, peer_logits)
        return F.log_softmax(fp32(mixed) / T, dim=-1)
    log_p = F.log_softmax(fp32(peer_logits) / T, dim=-1)  # (M, B, K)
    # log Σ_b α_ab p_b, stably: logsumexp over b of log α_ab + log p_b
    log_alpha = attention.clamp_min(torch.finfo(attention.dtype).tiny).log().permute(1, 0, 2)  # (a, B, b)
    return torch.logsumexp(log_alpha.unsqueeze(-1) + log_p.permute(1, 0, 2).unsqueeze(0), dim=2)


def okddip_leader_target(peer_logits: Tensor, T: float = 3.0, aggregate: str = "logits") -> Tensor:
    r"""The group leader's target (log-probabilities): the plain ensemble of the auxiliary peers.

    ``"logits"`` (reference code): :math:`\operatorname{softmax}(\frac{1}{M}\sum_a z_a / T)`;
    ``"probs"``: :math:`\frac{1}{M}\sum_a \operatorname{softmax}(z_a / T)`. (M, B, K) → (B, K).
    """
    _check_positive("T", T)
    if aggregate not in AGGREGATIONS:
        raise ValueError(f"aggregate must be one of {AGGREGATIONS}, got {aggregate!r}")
    if aggregate == "logits":
        return F.log_softmax(fp32(peer_logits).mean(0) / T, dim=-1)
    return _log_mean_probs(peer_logits, T)


def okddip_parts(peer_logits: Tensor, leader_logits: Tensor, attention: Tensor, targets: Tensor,
                 T: float = 3.0, aggregate: str = "logits") -> dict[str, Tensor]:
    r"""The three terms of OKDDip's objective, unweighted.

    * ``"ce"``: :math:`\sum_{a=1}^{M} L_{CE}(z_a, y) + L_{CE}(z_{M+1}, y)` (every peer and the
      leader on the labels, T = 1);
    * ``"peer_kd"``: :math:`T^2 \sum_{a=1}^{M} \mathrm{KL}(t_a \,\|\, p_a^T)`, the first-level
      distillation, each peer towards its own attention-weighted target
      (:func:`okddip_peer_targets`);
    * ``"leader_kd"``: :math:`T^2\, \mathrm{KL}(t_{M+1} \,\|\, p_{M+1}^T)`, the second-level
      distillation of the peers' ensemble (:func:`okddip_leader_target`) into the leader.

    KLs are summed over classes and averaged over the batch; the peer terms are summed over peers
    (not averaged), as in the reference code. Shapes: ``peer_logits`` (M, B, K), ``leader_logits``
    (B, K), ``attention`` (B, M, M), ``targets`` (B,).
    """
    if peer_logits.dim() != 3 or peer_logits.shape[1:] != leader_logits.shape:
        raise ValueError(
            f"okddip: peers' logits {tuple(peer_logits.shape)} must be (M, B, K) with the leader's "
            f"{tuple(leader_logits.shape)} as (B, K)"
        )
    log_t = okddip_peer_targets(peer_logits, attention, T, aggregate)
    log_p = F.log_softmax(fp32(peer_logits) / T, dim=-1)
    peer_kd = kl_rows(log_t, log_p).mean(dim=1).sum() * (T * T)
    log_lead = okddip_leader_target(peer_logits, T, aggregate)
    leader_kd = kl_rows(log_lead, F.log_softmax(fp32(leader_logits) / T, dim=-1)).mean() * (T * T)
    ce = sum(cross_entropy(z, targets) for z in peer_logits) + cross_entropy(leader_logits, targets)
    return {"ce": ce, "peer_kd": peer_kd, "leader_kd": leader_kd}


def okddip_loss(peer_logits: Tensor, leader_logits: Tensor, attention: Tensor, targets: Tensor, T: float = 3.0,
                peer_weight: float = 1.0, leader_weight: float = 1.0, aggregate: str = "logits") -> Tensor:
    r"""OKDDip's objective: :math:`L = L_{CE} + \beta\, L_{dis1} + \gamma\, L_{dis2}`.

    The terms are those of :func:`okddip_parts` (``ce``, ``peer_kd``, ``leader_kd``); ``peer_weight``
    β and ``leader_weight`` γ are 1 in the reference code (``--alpha 1``), which also multiplies both
    by :func:`~distill.functional.sigmoid_rampup` over the first 80 epochs (the strategy does that). T = 3 is the
    reference code's temperature.
    """
    parts = okddip_parts(peer_logits, leader_logits, attention, targets, T, aggregate)
    return parts["ce"] + peer_weight * parts["peer_kd"] + leader_weight * parts["leader_kd"]


# --------------------------------------------------------------------------------------------
# Rocket launching
# --------------------------------------------------------------------------------------------


def rocket_hint_loss(light_logits: Tensor, booster_logits: Tensor) -> Tensor:
    r"""The hint of rocket launching: squared L2 distance between the two nets' logits.

    .. math:: L_{hint} = \frac{1}{B}\sum_b \lVert l(x_b) - z(x_b) \rVert_2^2

    (summed over the K logits, averaged over the batch: the reference code's
    ``((z - l) * (z - l)).sum() / batch_size``). Shapes (B, K), (B, K) → scalar. Unlike
    :func:`~distill.functional.logit_regression_loss` there is no ½.
    """
    _same_shape(light_logits, booster_logits, "light logits", "booster logits")
    return (light_logits - booster_logits).flatten(1).pow(2).sum(dim=1).mean()


def rocket_loss(light_logits: Tensor, booster_logits: Tensor, targets: Tensor, hint_weight: float = 0.03,
                grad_block: bool = True) -> Tensor:
    r"""Rocket launching's joint objective of the light net and the booster net.

    .. math:: L(x; W_S, W_L, W_B) = H(y, p(x)) + H(y, q(x)) + \lambda \lVert l(x) - z(x) \rVert_2^2

    with p = softmax(l) the light net's and q = softmax(z) the booster's prediction. With the
    *gradient block* (``grad_block=True``, the paper's choice) z is a constant of the hint, so the
    hint never updates the booster's own layers W_B (nor reaches the shared layers W_S through the
    booster; it still reaches them through the light net). λ = 0.03: the reference code's
    ``--gamma`` in every published command. Shapes (B, K), (B, K), (B,) → scalar.
    """
    target = booster_logits.detach() if grad_block else booster_logits
    hint = rocket_hint_loss(light_logits, target)
    return cross_entropy(light_logits, targets) + cross_entropy(booster_logits, targets) + hint_weight * hint


# --------------------------------------------------------------------------------------------
# OKDHP: multi-branch dense outputs
# --------------------------------------------------------------------------------------------


def okdhp_ensemble(branch_maps: Tensor, weights: Tensor) -> Tensor:
    r"""The ensemble heatmaps of OKDHP: per channel, a weighted sum of the branches' maps.

    .. math:: \hat H_{b,c} = \sum_{m=1}^{M} w_{b,m,c}\, H^{(m)}_{b,c}

    ``branch_maps`` (M, B, C, H, W), ``weights`` (B, M, C) (the feature aggregation unit's
    output, softmax over the M branches) → (B, C, H, W).
    """
    if branch_maps.dim() != 5:
        raise ValueError(f"okdhp_ensemble expects branch maps (M, B, C, H, W), got shape {tuple(branch_maps.shape)}")
    m, b, c = branch_maps.shape[:3]
    if weights.shape != (b, m, c):
        raise ValueError(f"weights {tuple(weights.shape)} do not match branch maps {tuple(branch_maps.shape)}: "
                         f"expected {(b, m, c)}")
    return torch.einsum("mbchw,bmc->bchw", branch_maps, weights)


def _joint_weight(weight: Tensor | None, maps: Tensor) -> Tensor | None:
    if weight is None:
        return None
    weight = weight.reshape(weight.shape[0], -1) if weight.dim() == 3 else weight  # (B, C, 1) as in pose data
    if weight.shape != maps.shape[:2]:
        raise ValueError(f"target weight {tuple(weight.shape)} must be (B, C) for maps {tuple(maps.shape)}")
    return weight[:, :, None, None].to(maps.dtype)


def heatmap_mse_loss(pred: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    r"""The pose-estimation heatmap loss: half the mean squared error over every pixel.

    .. math:: L = \frac{1}{2\,BCHW} \sum_{b,c,h,w} \big(w_{b,c}\,(\hat H_{bchw} - H_{bchw})\big)^2

    ``pred``, ``target`` (B, C, H, W), optional per-channel (joint visibility) ``weight`` (B, C)
    → scalar. Equal to the reference code's ``JointsMSELoss`` (½ · MSE per joint, averaged over
    joints). Minimised with the ground truth by every branch and the ensemble.
    """
    _same_shape(pred, target, "predicted maps", "target maps")
    if pred.dim() != 4:
        raise ValueError(f"heatmap losses expect maps (B, C, H, W), got shape {tuple(pred.shape)}")
    w = _joint_weight(weight, pred)
    diff = pred - target if w is None else (pred - target) * w
    return 0.5 * diff.pow(2).mean()


def heatmap_kl_loss(pred: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    r"""OKDHP's pixel-wise distillation: KL between the spatial softmaxes of each channel's map.

    .. math::
        L = \frac{1}{B\,HW} \sum_{b,c} \mathrm{KL}\big(\sigma(w_{b,c} T_{bc}) \,\|\, \sigma(w_{b,c} S_{bc})\big),
        \qquad \sigma(M)_{hw} = \frac{e^{M_{hw}}}{\sum_{h'w'} e^{M_{h'w'}}}

    with T the target (ensemble) and S the branch's maps, each channel a distribution over its
    H·W pixels. The normalisation by B·H·W is the reference code's (``JointsKLDLoss``); temperature
    1. Shapes (B, C, H, W), (B, C, H, W), optional ``weight`` (B, C) → scalar.
    """
    _same_shape(pred, target, "predicted maps", "target maps")
    if pred.dim() != 4:
        raise ValueError(f"heatmap losses expect maps (B, C, H, W), got shape {tuple(pred.shape)}")
    w = _joint_weight(weight, pred)
    if w is not None:
        pred, target = pred * w, target * w
    b, _, h, wd = pred.shape
    log_q = F.log_softmax(fp32(pred).flatten(2), dim=-1)
    log_p = F.log_softmax(fp32(target).flatten(2), dim=-1)
    return kl_rows(log_p, log_q).sum() / (b * h * wd)


def okdhp_loss(branch_maps: Tensor, ensemble: Tensor, target: Tensor, weight: Tensor | None = None,
               kd_weight: float = 5.0, ens_weight: float = 6.0, kd: str = "kl") -> Tensor:
    r"""OKDHP's objective over M branches and their FAU ensemble.

    .. math::
        L = \sum_{m=1}^{M} L_{mse}(H^{(m)}, H^{gt}) + \mu\, L_{mse}(\hat H, H^{gt})
            + \lambda \sum_{m=1}^{M} L_{kd}(H^{(m)}, \hat H)

    :func:`heatmap_mse_loss` for the ground truth, ``kd`` = ``"kl"`` (:func:`heatmap_kl_loss`, the
    reference code's pixel-wise KL) or ``"mse"`` for the distillation from the ensemble
    :math:`\hat H` (:func:`okdhp_ensemble`). λ = ``kd_weight`` = 5 and μ = ``ens_weight`` = 6 are the
    reference code's defaults (``TRAIN.KD_WEIGHT``, ``TRAIN.ENS_WEIGHT``); it ramps λ up with
    :func:`~distill.functional.sigmoid_rampup` over 60 epochs. The ensemble is not detached in the distillation term,
    as in the reference code, so that term also trains the aggregation unit.

    Shapes: ``branch_maps`` (M, B, C, H, W), ``ensemble`` and ``target`` (B, C, H, W), ``weight``
    (B, C) or None → scalar.
    """
    if kd not in DENSE_KD_LOSSES:
        raise ValueError(f"kd must be one of {DENSE_KD_LOSSES}, got {kd!r}")
    if branch_maps.dim() != 5 or branch_maps.shape[1:] != ensemble.shape:
        raise ValueError(f"branch maps {tuple(branch_maps.shape)} must be (M, B, C, H, W) around the ensemble "
                         f"{tuple(ensemble.shape)}")
    distil = heatmap_kl_loss if kd == "kl" else heatmap_mse_loss
    gt = sum(heatmap_mse_loss(h, target, weight) for h in branch_maps)
    soft = sum(distil(h, ensemble, weight) for h in branch_maps)
    return gt + ens_weight * heatmap_mse_loss(ensemble, target, weight) + kd_weight * soft


# --------------------------------------------------------------------------------------------
# Codistillation
# --------------------------------------------------------------------------------------------


def codistillation_kl(logits: Tensor, peer_logits: Tensor | Sequence[Tensor], T: float = 1.0) -> Tensor:
    r"""Codistillation's distillation term: KL from the peers' averaged (stale) prediction.

    .. math::
        L_{dist} = T^2\, \mathrm{KL}\Big(\frac{1}{P}\sum_{j=1}^{P} \operatorname{softmax}(z_j / T)
        \,\Big\|\, \operatorname{softmax}(z / T)\Big)

    (batchmean). The paper distils towards the average of the other models' predictions, computed
    from parameters exchanged every so many steps (stale); T = 1 there. Its ψ is a cross-entropy;
    the KL used here differs from it by the target's entropy, a constant, so the gradients are the
    same. Shapes: ``logits`` (B, K), ``peer_logits`` (P, B, K), a sequence of (B, K), or one (B, K)
    → scalar. Pass the peers' logits detached.
    """
    _check_positive("T", T)
    peers = _stack_peers(peer_logits, "codistillation_kl")
    if peers.shape[1:] != logits.shape:
        raise ValueError(
            f"codistillation_kl: logits {tuple(logits.shape)} and peers' logits {tuple(peers.shape)} disagree"
        )
    return kl_rows(_log_mean_probs(peers, T), F.log_softmax(fp32(logits) / T, dim=-1)).mean() * (T * T)


def codistillation_loss(logits: Tensor, targets: Tensor, peer_logits: Tensor | Sequence[Tensor],
                        weight: float = 1.0, T: float = 1.0) -> Tensor:
    r"""What each codistilling worker minimises: :math:`L = L_{CE}(z, y) + \psi\, L_{dist}` with
    :math:`L_{dist}` from :func:`codistillation_kl` and ψ = ``weight``. Shapes (B, K), (B,),
    peers (P, B, K) → scalar."""
    return cross_entropy(logits, targets) + weight * codistillation_kl(logits, peer_logits, T)
