r"""Word-level soft-target losses of sequence-to-sequence distillation, shared by C-MLM distillation
(Chen et al. 2020), kNN-KD (Yang et al. 2022) and noisy self-KD (Liu et al. 2021).

Per labelled token (row ``t`` of the logits ``(B, L, V)``), with ``p = softmax(t / T_t)`` the
teacher's distribution and ``q = softmax(s / T_s)`` the student's:

.. math::

    \ell_t = kd \cdot scale \cdot KL(p \,\|\, q) + ce \cdot (-\log softmax(s)_{y_t})

summed with :func:`distill.functional.tokens.token_weights` (``"token"``: the mean over the
labelled tokens). The KL differs from the soft cross-entropy ``-Σ p log q`` the papers write by the
teacher's entropy, a constant for the student: the same gradients, 0 at agreement. Teacher logits
may hold ``-inf`` (a top-k teacher, a kNN distribution given as log-probabilities): ``0 log 0 = 0``.
The teacher is detached.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.functional._precision import fp32
from distill.functional.tokens import (
    _NO_TOKEN_WARNING,
    REDUCTIONS,
    _check_labels,
    _graph_zero,
    token_mask,
    token_weights,
)

__all__ = ["aligned_targets", "tempered_token_kl", "soft_target_token_loss"]


def _positive(value: float, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _non_negative(value: float, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def tempered_token_kl(student_logits: Tensor, teacher_logits: Tensor, *, teacher_T: float = 1.0,
            student_T: float = 1.0) -> Tensor:
    r"""``KL(softmax(t / T_t) ‖ softmax(s / T_s))`` per row, summed over the vocabulary.

    Shapes: ``(..., V)``, ``(..., V)`` → ``(...)``, float32 (float64 stays float64). Teacher entries of
    ``-inf`` have probability 0 and contribute 0. No ``T²`` factor here (callers scale).
    """
    _positive(teacher_T, "teacher_T")
    _positive(student_T, "student_T")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape (..., V)")
    log_q = F.log_softmax(fp32(student_logits) / student_T, dim=-1)
    log_p = F.log_softmax(fp32(teacher_logits.detach()) / teacher_T, dim=-1).to(log_q.dtype)
    p = log_p.exp()
    # p · (log p − log q), with 0 where p = 0 (log p = -inf there; the where keeps the gradient finite)
    inside = torch.where(p > 0, log_p - log_q, torch.zeros_like(log_q))
    return (p * inside).sum(-1)


def aligned_targets(labels: Tensor, causal: bool) -> Tensor:
    """The label each logit row predicts: ``labels[:, t + 1]`` (causal, -100 at the end) or ``labels``.

    Shapes: ``(B, L)`` → ``(B, L)``.
    """
    if not causal:
        return labels
    out = torch.full_like(labels, -100)
    out[:, :-1] = labels[:, 1:]
    return out


def soft_target_token_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    kd: float = 1.0,
    ce: float = 0.0,
    teacher_T: float = 1.0,
    student_T: float = 1.0,
    scale: float = 1.0,
    causal: bool = False,
    reduction: str = "token",
) -> Tensor:
    r"""``Σ_t w_t [kd · scale · KL(p_t ‖ q_t) + ce · CE(s_t, y_t)]`` over the labelled rows.

    Shapes: student ``(B, L, V)``, teacher ``(B, L, V)`` (logits or log-probabilities, aligned row by
    row with the student's), labels ``(B, L)`` long (-100: no loss; for ``causal`` the row ``t`` is
    scored against ``labels[:, t + 1]`` as :func:`distill.functional.token_mask` says) → scalar.
    ``p = softmax(t / teacher_T)``, ``q = softmax(s / student_T)``; the cross-entropy uses the
    student's logits at temperature 1. ``scale`` multiplies the KL (``T²`` in Hinton's convention,
    1 where a paper does not scale). Rows without a label change neither the loss nor any gradient.
    """
    _non_negative(kd, "kd (the weight of the soft-target term)")
    _non_negative(ce, "ce (the weight of the cross-entropy on the gold tokens)")
    _non_negative(scale, "scale")
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {', '.join(REDUCTIONS)}")
    if student_logits.dim() != 3:
        raise ValueError(f"token logits must be (B, L, V), got shape {tuple(student_logits.shape)}")
    if tuple(teacher_logits.shape) != tuple(student_logits.shape):
        raise ValueError(f"the teacher's logits have shape {tuple(teacher_logits.shape)} but the student's "
                         f"{tuple(student_logits.shape)}; expected the same (B, L, V)")
    if tuple(labels.shape) != tuple(student_logits.shape[:2]):
        raise ValueError(f"labels have shape {tuple(labels.shape)} but the logits {tuple(student_logits.shape)}; "
                         f"expected labels (B, L) = {tuple(student_logits.shape[:2])}")
    V = student_logits.shape[-1]
    _check_labels(labels, V)
    mask = token_mask(labels, causal)
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    weights = token_weights(mask, reduction, dtype).flatten()
    rows = mask.flatten().nonzero().squeeze(1)
    if rows.numel() == 0:
        warnings.warn(_NO_TOKEN_WARNING, RuntimeWarning, stacklevel=2)
        return _graph_zero(student_logits)
    s = student_logits.reshape(-1, V).index_select(0, rows)
    per = torch.zeros(rows.numel(), dtype=dtype, device=s.device)
    if kd:
        t = teacher_logits.reshape(-1, V).index_select(0, rows)
        per = per + kd * scale * tempered_token_kl(s, t, teacher_T=teacher_T, student_T=student_T).to(dtype)
    if ce:
        y = aligned_targets(labels, causal).flatten().index_select(0, rows)
        per = per + ce * F.cross_entropy(fp32(s), y, reduction="none").to(dtype)
    return (per * weights.index_select(0, rows)).sum()
