"""The math of DeiT's distillation through a distillation token: hard-label and soft distillation.

Paper: Touvron, Cord, Douze, Massa, Sablayrolles, Jégou, "Training data-efficient image
transformers & distillation through attention", ICML 2021, arXiv 2012.12877 (Section 3).

Conventions: ``cls_logits`` is the class token's head ``ψ(Z_cls)`` input, ``dist_logits`` the
distillation token's head (both ``(B, K)``); with a model that has no distillation token pass the
same logits twice (the paper's "usual distillation" baseline). ``teacher_logits`` ``(B, K)``
(callers pass them detached), ``targets`` ``(B,)`` integer labels. Every loss is averaged over the
batch; the two terms are weighted by ``ce_weight`` (the true-label term) and ``distill_weight``
(the teacher term), named for what they weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.functional._precision import fp32

__all__ = [
    "deit_smoothed_targets",
    "deit_label_loss",
    "deit_hard_loss",
    "deit_soft_loss",
]


def _check(cls_logits: Tensor, dist_logits: Tensor, teacher_logits: Tensor, targets: Tensor, what: str) -> None:
    if cls_logits.dim() != 2 or cls_logits.shape != dist_logits.shape or cls_logits.shape != teacher_logits.shape:
        raise ValueError(f"{what} needs (B, K) class-head, distillation-head and teacher logits of one shape, got "
                         f"{tuple(cls_logits.shape)}, {tuple(dist_logits.shape)} and {tuple(teacher_logits.shape)}")
    if targets.shape != cls_logits.shape[:1]:
        raise ValueError(f"{what} needs (B,) = ({cls_logits.shape[0]},) integer targets, got {tuple(targets.shape)}")


def deit_smoothed_targets(targets: Tensor, num_classes: int, eps: float,
                          dtype: torch.dtype = torch.float32) -> Tensor:
    r"""DeiT's label-smoothed true label: ``(B,)`` -> ``(B, K)``.

    .. math:: q_{b,k} = (1 - \varepsilon)\,\delta_{k, y_b} + \frac{\varepsilon}{K - 1}\,(1 - \delta_{k, y_b})

    "The true label is considered to have a probability of 1 − ε, and the remaining ε is shared
    across the remaining classes" (DeiT Section 3, hard-label distillation). timm's
    ``LabelSmoothingCrossEntropy``, which the authors' code uses, spreads ε over *all* K classes
    instead (true class 1 − ε + ε/K, others ε/K): the code's ε equals the paper's ε·K/(K − 1).
    """
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"label smoothing eps must be in [0, 1), got {eps}")
    if num_classes < 2:
        raise ValueError(f"label smoothing needs at least 2 classes, got {num_classes}")
    q = torch.full((targets.shape[0], num_classes), eps / (num_classes - 1), device=targets.device, dtype=dtype)
    return q.scatter_(1, targets.long().unsqueeze(1), 1.0 - eps)


def deit_label_loss(logits: Tensor, targets: Tensor, eps: float = 0.0, mix_targets: Tensor | None = None,
                    mix_lam: Tensor | None = None) -> Tensor:
    r"""Cross-entropy of the class head on the (smoothed, optionally mixed) true labels.

    .. math:: L = -\frac{1}{B}\sum_b \sum_k \big(\lambda_b q(y_b) + (1-\lambda_b) q(y'_b)\big)_k \log\psi(z_b)_k

    ``logits`` (B, K), ``targets`` (B,); ``q`` is :func:`deit_smoothed_targets` (one-hot for
    ``eps = 0``); with mixup (``mix_targets`` (B,), ``mix_lam`` (B,)) each sample's target is the
    λ-mix of its own and its partner's (DeiT trains with mixup and CutMix), else λ = 1.
    """
    log_p = F.log_softmax(fp32(logits), dim=1)
    q = deit_smoothed_targets(targets, logits.shape[1], eps, log_p.dtype)
    if mix_targets is not None and mix_lam is not None:
        lam = mix_lam.to(q.dtype).unsqueeze(1)
        q = lam * q + (1 - lam) * deit_smoothed_targets(mix_targets, logits.shape[1], eps, log_p.dtype)
    return -(q * log_p).sum(1).mean()


def deit_hard_loss(cls_logits: Tensor, dist_logits: Tensor, teacher_logits: Tensor, targets: Tensor,
                   ce_weight: float = 0.5, distill_weight: float = 0.5, eps: float = 0.0,
                   mix_targets: Tensor | None = None, mix_lam: Tensor | None = None) -> Tensor:
    r"""DeiT's hard-label distillation: the distillation head learns the teacher's decision.

    .. math::
        L = w_{ce}\, \mathcal{L}_{CE}(\psi(Z_{cls}), y) + w_{d}\, \mathcal{L}_{CE}(\psi(Z_{dist}), y_t),
        \qquad y_t = \arg\max_c Z_t(c)

    The paper's weights are ``w_ce = w_d = ½`` (its eq. for :math:`\mathcal{L}^{hardDistill}_{global}`).
    The true label ``y`` may be smoothed with ``eps`` (:func:`deit_smoothed_targets`; the paper
    fixes ε = 0.1 wherever true labels are used) and mixed with a mixup partner; the teacher's
    pseudo-label :math:`y_t` is never smoothed ("we do not smooth pseudo-labels provided by the
    teacher"). Shapes: three (B, K) logits, ``targets`` (B,) → scalar. The authors' code
    (``losses.py`` ``DistillationLoss``, ``distillation_type='hard'``) computes the same
    ``(1 − α)·base + α·CE(dist, argmax teacher)`` with ``α = 0.5``.
    """
    _check(cls_logits, dist_logits, teacher_logits, targets, "deit_hard_loss")
    y_t = teacher_logits.argmax(dim=1)
    label = deit_label_loss(cls_logits, targets, eps, mix_targets, mix_lam)
    return ce_weight * label + distill_weight * F.cross_entropy(fp32(dist_logits), y_t)


def deit_soft_loss(cls_logits: Tensor, dist_logits: Tensor, teacher_logits: Tensor, targets: Tensor,
                   T: float = 3.0, ce_weight: float = 0.9, distill_weight: float = 0.1, eps: float = 0.0,
                   mix_targets: Tensor | None = None, mix_lam: Tensor | None = None) -> Tensor:
    r"""DeiT's soft distillation: the distillation head matches the teacher's tempered softmax.

    .. math::
        L = w_{ce}\, \mathcal{L}_{CE}(\psi(Z_{cls}), y)
            + w_{d}\, \tau^2\, \frac{1}{B}\sum_b \mathrm{KL}\big(\psi(Z_{t,b}/\tau)\,\|\,\psi(Z_{dist,b}/\tau)\big)

    The paper writes :math:`(1-\lambda)\mathcal{L}_{CE} + \lambda\tau^2\mathrm{KL}`, i.e.
    ``ce_weight = 1 − λ``, ``distill_weight = λ``. KL is summed over classes and averaged over the
    batch ("batchmean"), teacher first. The authors' code divides the summed KL by
    ``outputs_kd.numel()`` = B·K instead of B ("legacy PyTorch behaviour", their issue 61): its
    distillation term is 1/K of this one. Shapes: three (B, K) logits, ``targets`` (B,) → scalar.
    """
    _check(cls_logits, dist_logits, teacher_logits, targets, "deit_soft_loss")
    if not T > 0:
        raise ValueError(f"temperature T must be > 0, got {T}")
    label = deit_label_loss(cls_logits, targets, eps, mix_targets, mix_lam)
    log_q = F.log_softmax(fp32(dist_logits) / T, dim=1)
    log_p = F.log_softmax(fp32(teacher_logits) / T, dim=1)
    kl = F.kl_div(log_q, log_p, reduction="batchmean", log_target=True) * (T * T)
    return ce_weight * label + distill_weight * kl
