"""The math of three transfer papers: cross-lingual distillation, MSDN and KDDAug.

* :func:`cross_lingual_kd_loss`: the soft-label cross-entropy a target-language student minimises
  against a source-language teacher (Xu & Yang, "Cross-lingual Distillation for Text
  Classification", ACL 2017, arXiv 1705.02073).
* :func:`msdn_jsd`, :func:`msdn_score_gap`, :func:`msdn_distill_loss`, :func:`msdn_self_calibration`:
  MSDN's mutual semantic distillation between its two sub-nets and its self-calibration term
  (Chen et al., "MSDN: Mutually Semantic Distillation Network for Zero-Shot Learning", CVPR 2022,
  arXiv 2203.03137).
* :func:`kddaug_teacher_weights`, :func:`kddaug_soft_labels`: KDDAug's answer assignment, the ID and
  OOD teachers' predictions combined with weights set by how far each is from the bias (Chen, Zheng,
  Xiao, "Rethinking Data Augmentation for Robust Visual Question Answering", ECCV 2022, arXiv 2207.08739).
* :func:`logit_adjusted_cross_entropy`: the debiased (OOD) teacher's training loss in our image
  stand-in for KDDAug (Menon et al., "Long-tail learning via logit adjustment", ICLR 2021, arXiv 2007.07314).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.functional.multitask import soft_cross_entropy

__all__ = [
    "cross_lingual_kd_loss",
    "kddaug_soft_labels",
    "kddaug_teacher_weights",
    "logit_adjusted_cross_entropy",
    "msdn_distill_loss",
    "msdn_jsd",
    "msdn_score_gap",
    "msdn_self_calibration",
]


def _pair(a: Tensor, b: Tensor, who: str) -> None:
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(f"{who} needs two (B, K) tensors of one shape; got {tuple(a.shape)} and {tuple(b.shape)}")


def _probabilities(p: Tensor, who: str) -> None:
    if p.dim() != 2 or (p < 0).any() or not torch.allclose(p.sum(1), torch.ones_like(p[:, 0]), atol=1e-4):
        raise ValueError(f"{who} must be (B, K) probabilities (non-negative rows summing to 1)")


def cross_lingual_kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 3.0) -> Tensor:
    r"""Cross-lingual distillation: the target-side student fits the source-side teacher's soft labels.

    Xu & Yang, ACL 2017, arXiv 1705.02073. For a parallel pair (source document, its translation),
    the teacher reads the source side, the student the target side:

    .. math:: \mathcal L = -\frac1B \sum_b \sum_k \mathrm{softmax}(t_b/T)_k \, \log \mathrm{softmax}(s_b/T)_k

    ``student_logits`` ``(B, K)`` on the target side, ``teacher_logits`` ``(B, K)`` on the source side of
    the same pairs. T = 3 is the authors' code's setting (``config.py``: ``temp: 3``); their Keras
    student is trained with categorical cross-entropy on its temperature-``T`` softmax, so the loss is
    the cross-entropy above, *not* multiplied by ``T**2`` as Hinton et al.'s KL (it differs from
    ``KL(p_t || p_s)`` by the teacher's entropy, a constant, so the gradient is the KL's divided by ``T**2``).
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature!r}")
    _pair(student_logits, teacher_logits, "cross_lingual_kd_loss")
    return soft_cross_entropy(student_logits.float() / temperature, (teacher_logits.float() / temperature).softmax(1))


def msdn_jsd(scores_a: Tensor, scores_b: Tensor) -> Tensor:
    r"""Jensen-Shannon divergence between two sub-nets' class distributions, averaged over the batch.

    .. math:: \mathrm{JSD}(p\,\|\,q) = \tfrac12 \mathrm{KL}(p\,\|\,m) + \tfrac12 \mathrm{KL}(q\,\|\,m), \quad
              m = \tfrac12(p + q), \; p = \mathrm{softmax}(s^a), \; q = \mathrm{softmax}(s^b)

    ``scores_a``, ``scores_b`` ``(B, K)``: the two sub-nets' class scores. Symmetric, zero iff p = q,
    at most log 2.
    """
    _pair(scores_a, scores_b, "msdn_jsd")
    p, q = scores_a.float().softmax(1), scores_b.float().softmax(1)
    log_m = ((p + q) / 2).clamp_min(1e-12).log()
    kl_pm = (p * (p.clamp_min(1e-12).log() - log_m)).sum(1)
    kl_qm = (q * (q.clamp_min(1e-12).log() - log_m)).sum(1)
    return ((kl_pm + kl_qm) / 2).mean()


def msdn_score_gap(scores_a: Tensor, scores_b: Tensor) -> Tensor:
    r"""The score-consistency term of MSDN's released code (``compute_contrastive_loss``).

    With :math:`d = s^a - s^b` per sample, each class's absolute gap is weighted by
    :math:`d_k^2 / \|d\|_2`:

    .. math:: \mathcal L = \frac1B \sum_b \sum_k \frac{d_{bk}^2}{\|d_b\|_2}\,|d_{bk}|

    ``scores_a``, ``scores_b`` ``(B, K)``. A sample whose scores agree exactly contributes 0.
    """
    _pair(scores_a, scores_b, "msdn_score_gap")
    d = scores_a.float() - scores_b.float()
    norm = d.pow(2).sum(1, keepdim=True).sqrt().clamp_min(1e-12)
    return (d.pow(2) / norm * d.abs()).sum(1).mean()


def msdn_distill_loss(scores_a: Tensor, scores_b: Tensor) -> Tensor:
    r"""MSDN's semantic distillation loss between its two sub-nets: :func:`msdn_jsd` + :func:`msdn_score_gap`.

    Both sub-nets receive the gradient (mutual: each teaches the other). ``(B, K)`` each.
    """
    return msdn_jsd(scores_a, scores_b) + msdn_score_gap(scores_a, scores_b)


def msdn_self_calibration(scores: Tensor, unseen: Tensor) -> Tensor:
    r"""Self-calibration: push probability mass onto the unseen classes (MSDN, after DAZLE).

    .. math:: \mathcal L_{cal} = -\log \Big(\frac1B \sum_b \sum_{u \in \mathcal U} \mathrm{softmax}(s_b)_u\Big)

    ``scores`` ``(B, K)`` over every class, ``unseen`` ``(U,)`` the unseen classes' indices. This is the
    released code's form (the log of the batch-mean unseen mass).
    """
    if scores.dim() != 2 or unseen.dim() != 1 or unseen.numel() == 0:
        raise ValueError(f"msdn_self_calibration needs scores (B, K) and unseen class indices (U,), U >= 1; got "
                         f"{tuple(scores.shape)} and {tuple(unseen.shape)}")
    mass = scores.float().softmax(1)[:, unseen].sum(1)
    return -mass.mean().clamp_min(1e-12).log()


def kddaug_teacher_weights(p_id: Tensor, p_ood: Tensor, reference: Tensor) -> tuple[Tensor, Tensor]:
    r"""KDDAug's per-sample weights of the ID and OOD teachers.

    Each teacher's cross-entropy against a reference distribution :math:`b` (the bias: in VQA the
    answer prior of the question type, here the training set's class prior),
    :math:`\mathrm{XE}_\cdot = -\sum_k b_k \log p_{\cdot,k}`, and

    .. math:: w_{id} = \frac{\mathrm{XE}_{id}}{\mathrm{XE}_{id} + \mathrm{XE}_{ood}}, \qquad
              w_{ood} = \frac{\mathrm{XE}_{ood}}{\mathrm{XE}_{id} + \mathrm{XE}_{ood}}

    so the teacher *farther* from the bias weighs more (the released code's
    ``w_id = s_ood / (s_id + s_ood)`` with ``s = 1 / XE``, the same numbers). ``p_id``, ``p_ood``
    ``(B, K)`` probabilities, ``reference`` ``(K,)`` or ``(B, K)`` probabilities. The code's VQA
    teachers are multi-label (sigmoid, binary cross-entropy per answer); ours are single-label
    (softmax, categorical cross-entropy). Returns ``(w_id, w_ood)``, each ``(B,)``, summing to 1.
    """
    _pair(p_id, p_ood, "kddaug_teacher_weights")
    ref = reference.expand_as(p_id) if reference.dim() == 1 else reference
    _probabilities(p_id, "p_id")
    _probabilities(p_ood, "p_ood")
    _probabilities(ref, "reference")
    xe_id = -(ref * p_id.float().clamp_min(1e-12).log()).sum(1)
    xe_ood = -(ref * p_ood.float().clamp_min(1e-12).log()).sum(1)
    total = (xe_id + xe_ood).clamp_min(1e-12)
    return xe_id / total, xe_ood / total


def kddaug_soft_labels(p_id: Tensor, p_ood: Tensor, reference: Tensor) -> Tensor:
    r"""KDDAug's soft answers for composed samples: :math:`a = w_{id}\,p_{id} + w_{ood}\,p_{ood}`
    with the weights of :func:`kddaug_teacher_weights`. ``(B, K)`` rows of probabilities."""
    w_id, w_ood = kddaug_teacher_weights(p_id, p_ood, reference)
    return w_id[:, None] * p_id.float() + w_ood[:, None] * p_ood.float()


def logit_adjusted_cross_entropy(logits: Tensor, targets: Tensor, prior: Tensor, tau: float = 1.0) -> Tensor:
    r"""Logit-adjusted cross-entropy: :math:`\mathrm{CE}(z + \tau \log \pi, y)`, batch mean.

    Menon et al., ICLR 2021, arXiv 2007.07314. Trained this way, the raw logits ``z`` estimate the
    balanced (prior-free) class posterior: our debiased "OOD teacher". ``logits`` ``(B, K)``,
    ``targets`` ``(B,)``, ``prior`` ``(K,)`` the training class frequencies (positive, summing to 1).
    """
    if prior.dim() != 1 or prior.shape[0] != logits.shape[-1] or (prior <= 0).any():
        raise ValueError(f"prior must be ({logits.shape[-1]},) positive class frequencies; got {tuple(prior.shape)}")
    return F.cross_entropy(logits.float() + tau * prior.float().log().to(logits.device), targets)
