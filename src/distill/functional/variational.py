"""The math of VID (variational information distillation) and FT (factor transfer).

Two feature methods whose loss goes through a small trainable network on one or both sides:

* VID scores the teacher's feature under a Gaussian whose mean a regressor predicts from the
  student's feature and whose per-channel variance is learnt: the loss is that Gaussian's
  negative log-likelihood (Ahn et al., CVPR 2019, arXiv 1904.05835).
* FT compares L2-normalised "factors": the teacher's from a paraphraser (an autoencoder
  pre-trained to reconstruct the teacher's feature map), the student's from a translator
  (Kim, Park, Kwak, NeurIPS 2018, arXiv 1802.04977).

Shapes: feature maps ``(B, C, H, W)``; everything here also takes ``(B, C)`` vectors (VID) or any
``(B, ...)`` tensor (FT) unless stated. Nothing here detaches the teacher: the methods pass
detached teacher tensors. Where a well-known implementation differs from the paper, the function
follows the paper and its docstring says what the implementation does instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "vid_variance",
    "vid_alpha_for_variance",
    "vid_nll",
    "vid_loss",
    "ft_factor_loss",
    "ft_reconstruction_loss",
]

_REDUCTIONS = ("sum", "mean")


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be 'sum' (the paper) or 'mean' (RepDistiller), got {reduction!r}")


# --------------------------------------------------------------------------------------------
# VID
# --------------------------------------------------------------------------------------------


def vid_variance(alpha: Tensor, eps: float = 1e-5) -> Tensor:
    r"""VID's per-channel variance, positive by construction.

    .. math:: \sigma_c^2 = \log(1 + e^{\alpha_c}) + \varepsilon

    ``alpha`` (C,) → (C,). Ahn et al., "Variational Information Distillation for Knowledge
    Transfer", CVPR 2019, arXiv 1904.05835 (heteroscedastic: one variance per channel,
    shared over spatial positions and samples). ``softplus`` is evaluated stably for large α.
    """
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    return F.softplus(alpha) + eps


def vid_alpha_for_variance(variance: float, eps: float = 1e-5) -> float:
    r"""The α with :func:`vid_variance` (α) = ``variance``: :math:`\alpha = \log(e^{\sigma^2 - \varepsilon} - 1)`.

    The authors' code initialises every α so that σ² starts at ``init_pred_var = 5.0``.
    """
    if variance <= eps:
        raise ValueError(f"the initial variance must exceed eps={eps}, got {variance}")
    v = variance - eps
    return v + math.log(-math.expm1(-v))  # log(exp(v) - 1), without overflow for large v


def vid_nll(mean: Tensor, target: Tensor, variance: Tensor, reduction: str = "sum") -> Tensor:
    r"""Gaussian negative log-likelihood of the teacher's feature, up to its constant.

    .. math::
        L = \frac{1}{B} \sum_b \sum_{c,h,w}
            \Big[ \log \sigma_c + \frac{(t_{b,c,h,w} - \mu_{b,c,h,w})^2}{2 \sigma_c^2} \Big]

    (the dropped constant is :math:`\tfrac12 \log 2\pi` per element; :math:`\log\sigma_c =
    \tfrac12 \log \sigma_c^2`).

    Args:
        mean: μ(s), the regressor's prediction from the student's feature, ``(B, C, H, W)`` or
            ``(B, C)``.
        target: t, the teacher's feature, same shape.
        variance: σ², ``(C,)`` positive (see :func:`vid_variance`).
        reduction: ``"sum"`` (the paper: sum over C·H·W, mean over the batch, which
            estimates the expectation over the data) or ``"mean"`` (the authors' code and
            RepDistiller: ``torch.mean`` over all B·C·H·W elements, i.e. the ``"sum"`` value divided
            by C·H·W; RepDistiller then uses weight 1 per layer).

    Returns a scalar. Paper: Ahn, Hu, Damianou, Lawrence, Dai, "Variational Information
    Distillation for Knowledge Transfer", CVPR 2019, arXiv 1904.05835.
    """
    _check_reduction(reduction)
    if mean.shape != target.shape:
        raise ValueError(f"VID mean and target shapes differ: {tuple(mean.shape)} vs {tuple(target.shape)}")
    if mean.dim() < 2:
        raise ValueError(f"VID needs (B, C, ...) tensors, got {tuple(mean.shape)}")
    c = mean.shape[1]
    if variance.shape != (c,):
        raise ValueError(f"VID variance must have shape ({c},) for {c} channels, got {tuple(variance.shape)}")
    var = variance.reshape(1, c, *([1] * (mean.dim() - 2)))
    per_element = 0.5 * torch.log(var) + (target - mean).pow(2) / (2.0 * var)
    if reduction == "mean":
        return per_element.mean()
    return per_element.flatten(1).sum(dim=1).mean()


def vid_loss(means: Sequence[Tensor], targets: Sequence[Tensor], variances: Sequence[Tensor],
             reduction: str = "sum") -> Tensor:
    r"""VID summed over layer pairs k: :math:`\sum_k L_{NLL}(\mu_k(s_k), t_k, \sigma_k^2)`.

    The paper weights each layer by λ_k; here all λ_k are equal (the method's ``weight``), as in
    RepDistiller. Shapes as in :func:`vid_nll`, one entry per pair.
    """
    if not (len(means) == len(targets) == len(variances)) or not means:
        raise ValueError(
            f"vid_loss needs as many means, targets and variances (>= 1): {len(means)}, {len(targets)}, "
            f"{len(variances)}"
        )
    total = vid_nll(means[0], targets[0], variances[0], reduction)
    for m, t, v in zip(means[1:], targets[1:], variances[1:]):
        total = total + vid_nll(m, t, v, reduction)
    return total


# --------------------------------------------------------------------------------------------
# Factor transfer
# --------------------------------------------------------------------------------------------


def ft_factor_loss(student_factor: Tensor, teacher_factor: Tensor, p: float = 1.0, reduction: str = "sum") -> Tensor:
    r"""Factor-transfer loss: p-norm distance of the L2-normalised, flattened factors.

    .. math::
        L_{FT} = \frac{1}{B} \sum_b \Big\lVert \frac{F_T^{(b)}}{\lVert F_T^{(b)} \rVert_2}
                 - \frac{F_S^{(b)}}{\lVert F_S^{(b)} \rVert_2} \Big\rVert_p

    ``F_S`` = translator(student feature), ``F_T`` = paraphraser encoder(teacher feature), both
    ``(B, C', H, W)`` (any ``(B, ...)`` of equal size), each flattened per sample to D values;
    the paper uses p = 1. A zero factor stays zero (no division by zero). Returns a scalar.

    ``reduction="sum"`` is the per-sample p-norm above (the paper's formula). ``"mean"`` takes
    the p-norm of the per-element mean instead, :math:`\big(\frac1D \sum_d |\Delta_{b,d}|^p\big)^{1/p}`
    (the ``"sum"`` value divided by :math:`D^{1/p}`), averaged over the batch: for p = 1 this is
    ``nn.L1Loss()`` on the normalised factors, as in the authors' code
    (Jangho-Kim/Factor-Transfer-pytorch ``train_student.py``: ``BETA * L1Loss(FT(factor_s),
    FT(factor_t))`` with ``FT`` = ``F.normalize`` of the flattened factor and ``BETA = 500``).

    Paper: Kim, Park, Kwak, "Paraphrasing Complex Network: Network Compression via Factor
    Transfer", NeurIPS 2018, arXiv 1802.04977. RepDistiller's ``FactorTransfer``
    differs: it first reduces each factor to a spatial map ``mean_c F_c^2`` (as in attention
    transfer), L2-normalises that (B, H·W) map, and takes the *mean* absolute difference over
    all B·H·W entries (not a per-sample norm of the whole C'·H·W factor).
    """
    if p <= 0:
        raise ValueError(f"p must be > 0, got {p}")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' (the paper's norm) or 'mean' (the authors' code), got {reduction!r}")
    if student_factor.shape[0] != teacher_factor.shape[0]:
        raise ValueError(
            f"factor batch sizes differ: {tuple(student_factor.shape)} vs {tuple(teacher_factor.shape)}"
        )
    fs, ft = student_factor.flatten(1), teacher_factor.flatten(1)
    if fs.shape != ft.shape:
        raise ValueError(
            f"factor sizes differ: student {tuple(student_factor.shape)} vs teacher {tuple(teacher_factor.shape)}"
        )
    diff = F.normalize(ft, p=2.0, dim=1) - F.normalize(fs, p=2.0, dim=1)
    if p == 1.0:
        per_sample = diff.abs().sum(dim=1)
    elif p == 2.0:
        per_sample = diff.pow(2).sum(dim=1).clamp_min(1e-24).sqrt()  # finite gradient at agreement
    else:
        per_sample = diff.abs().pow(p).sum(dim=1).clamp_min(1e-24).pow(1.0 / p)
    if reduction == "mean":
        per_sample = per_sample / diff.shape[1] ** (1.0 / p)
    return per_sample.mean()


def ft_reconstruction_loss(reconstruction: Tensor, feature: Tensor, reduction: str = "sum") -> Tensor:
    r"""The paraphraser's reconstruction loss (FT's first stage, unsupervised).

    .. math:: L_{rec} = \frac{1}{B} \sum_b \lVert x_b - P(x_b) \rVert_2^2

    ``reconstruction`` = P(x), the paraphraser's output, and ``feature`` = x, the teacher's
    feature map, both ``(B, C, H, W)`` → scalar. ``reduction="sum"`` (the paper: squared L2 norm
    per sample, mean over the batch) or ``"mean"`` (RepDistiller's ``nn.MSELoss()``: mean over all
    B·C·H·W elements, the ``"sum"`` value divided by C·H·W). The authors' code trains the
    paraphraser with ``nn.L1Loss()`` instead (Jangho-Kim/Factor-Transfer-pytorch
    ``train_Paraphraser.py``, lr 0.1, ``--epoch 5``, k = 0.5).

    Paper: Kim, Park, Kwak, NeurIPS 2018, arXiv 1802.04977.
    """
    _check_reduction(reduction)
    if reconstruction.shape != feature.shape:
        raise ValueError(
            f"reconstruction and feature shapes differ: {tuple(reconstruction.shape)} vs {tuple(feature.shape)}"
        )
    sq = (feature - reconstruction).pow(2)
    if reduction == "mean":
        return sq.mean()
    return sq.flatten(1).sum(dim=1).mean()
