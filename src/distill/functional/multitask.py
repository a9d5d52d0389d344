"""The math of multi-teacher, multi-task distillation: pure functions of tensors.

Used by :mod:`distill.strategies.multitask`:

* :func:`soft_cross_entropy`: ``-(1/B) Σ_b Σ_k q_bk log softmax(z_b)_k``, the loss of a student
  against any target distribution ``q``.
* :func:`annealed_targets` / :func:`bam_loss` / :func:`teacher_annealing_lambda`: BAM's teacher
  annealing (Clark et al., "BAM! Born-Again Multi-Task Networks for Natural Language
  Understanding", ACL 2019, arXiv 1907.04829).
* :func:`topk_teacher_probs` / :func:`selective_kd_loss` / :func:`selective_kd_flags`: the
  selective distillation of Tan et al., "Multilingual Neural Machine Translation with Knowledge
  Distillation", ICLR 2019, arXiv 1902.10461.
* :func:`mtdnn_kd_loss`: the task loss of Liu et al., "Improving Multi-Task Deep Neural Networks
  via Knowledge Distillation for Natural Language Understanding", 2019, arXiv 1904.09482.
* :func:`task_sampling_probs`: the probability of drawing each task, ``∝ n_τ^α``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "annealed_targets",
    "bam_loss",
    "mtdnn_kd_loss",
    "selective_kd_flags",
    "selective_kd_loss",
    "soft_cross_entropy",
    "task_sampling_probs",
    "teacher_annealing_lambda",
    "topk_teacher_probs",
]


def _check_logits(student_logits: Tensor, other: Tensor, what: str) -> None:
    if student_logits.dim() != 2:
        raise ValueError(f"student logits must be (B, K), got shape {tuple(student_logits.shape)}")
    if other.shape != student_logits.shape:
        raise ValueError(f"{what} must have the student logits' shape {tuple(student_logits.shape)}, "
                         f"got {tuple(other.shape)}")


def _check_targets(student_logits: Tensor, targets: Tensor) -> None:
    if targets.shape != student_logits.shape[:1]:
        raise ValueError(f"targets must be (B,) = ({student_logits.shape[0]},), got {tuple(targets.shape)}")


def _wide(x: Tensor) -> Tensor:
    """Half-precision tensors in float32 (losses are summed in at least single precision)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _unit_interval(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return value


def soft_cross_entropy(student_logits: Tensor, target_probs: Tensor) -> Tensor:
    """Cross-entropy of the student against a target distribution, averaged over the batch.

    ``L = -(1/B) Σ_b Σ_k q_bk · log softmax(z_b)_k``.

    Args:
        student_logits: ``(B, K)`` student logits ``z``.
        target_probs: ``(B, K)`` target distribution ``q`` (rows sum to 1; not differentiated
            through when it comes from a frozen teacher).

    Returns:
        a scalar tensor.
    """
    _check_logits(student_logits, target_probs, "target_probs")
    return -(target_probs * F.log_softmax(student_logits, dim=-1)).sum(-1).mean()


def teacher_annealing_lambda(step: int, total_steps: int) -> float:
    """BAM's λ at optimizer step ``step`` (0-based) of ``total_steps``: rising linearly from 0 at the
    first step to 1 at the last, ``λ = step / (total_steps - 1)`` (1 for a one-step run).

    The paper increases λ linearly from 0 to 1 over the course of training.
    """
    if total_steps < 1 or not 0 <= step < total_steps:
        raise ValueError(f"need 0 <= step < total_steps and total_steps >= 1, got step={step}, "
                         f"total_steps={total_steps}")
    return 1.0 if total_steps == 1 else step / (total_steps - 1)


def annealed_targets(targets: Tensor, teacher_probs: Tensor, lam: float) -> Tensor:
    """BAM's annealed target ``λ · onehot(y) + (1 − λ) · p_T``.

    Args:
        targets: ``(B,)`` gold class indices ``y``.
        teacher_probs: ``(B, K)`` the single-task teacher's distribution ``p_T = softmax(z_T)``.
        lam: ``λ ∈ [0, 1]``: 0 is pure distillation, 1 pure supervised learning.

    Returns:
        ``(B, K)`` target distributions.
    """
    lam = _unit_interval("lam", lam)
    if teacher_probs.dim() != 2 or targets.shape != teacher_probs.shape[:1]:
        raise ValueError(f"need teacher_probs (B, K) and targets (B,), got {tuple(teacher_probs.shape)} and "
                         f"{tuple(targets.shape)}")
    gold = F.one_hot(targets.long(), teacher_probs.shape[-1]).to(teacher_probs.dtype)
    return lam * gold + (1.0 - lam) * teacher_probs


def bam_loss(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, lam: float) -> Tensor:
    """BAM's classification loss with teacher annealing:
    ``L = -(1/B) Σ_b Σ_k [λ · onehot(y_b)_k + (1 − λ) · softmax(z_T,b)_k] · log softmax(z_S,b)_k``.

    The teacher's distribution is taken at temperature 1 (the paper uses no temperature).

    Args:
        student_logits: ``(B, K)``; teacher_logits: ``(B, K)``; targets: ``(B,)``; lam: ``λ ∈ [0, 1]``.
    """
    _check_logits(student_logits, teacher_logits, "teacher_logits")
    _check_targets(student_logits, targets)
    q = annealed_targets(targets, F.softmax(_wide(teacher_logits.detach()), dim=-1), lam)
    return soft_cross_entropy(_wide(student_logits), q)


def topk_teacher_probs(teacher_logits: Tensor, k: int | None) -> Tensor:
    """The teacher's distribution kept on its ``k`` most probable classes and renormalised there
    (Tan et al.'s top-K distillation); ``k=None`` (or ``k >= K``) keeps the full distribution.

    Args:
        teacher_logits: ``(B, K)``.
        k: number of classes kept per row (> 0) or None.

    Returns:
        ``(B, K)`` distributions, zero outside each row's top ``k``.
    """
    if teacher_logits.dim() != 2:
        raise ValueError(f"teacher logits must be (B, K), got shape {tuple(teacher_logits.shape)}")
    p = F.softmax(_wide(teacher_logits.detach()), dim=-1)
    if k is None or k >= p.shape[-1]:
        return p
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"top_k must be a positive int or None, got {k!r}")
    top = p.topk(k, dim=-1)
    kept = torch.zeros_like(p).scatter_(-1, top.indices, top.values)
    return kept / kept.sum(-1, keepdim=True)


def selective_kd_loss(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, *, kd_weight: float,
                      distill: bool, top_k: int | None = None) -> Tensor:
    """Tan et al.'s loss for one language pair (task):
    ``L = (1 − λ) · L_NLL + λ · L_KD`` while distillation is on for the task, ``L = L_NLL`` otherwise;
    ``L_NLL = -(1/B) Σ_b log softmax(z_S,b)_{y_b}``, ``L_KD = -(1/B) Σ_b Σ_k q_bk log softmax(z_S,b)_k``
    with ``q`` the teacher's (top-K renormalised) distribution at temperature 1.

    Args:
        student_logits: ``(B, K)``; teacher_logits: ``(B, K)``; targets: ``(B,)``.
        kd_weight: ``λ ∈ [0, 1]``.
        distill: the task's flag ``f^l`` (:func:`selective_kd_flags`).
        top_k: classes of the teacher's distribution kept (None: all).
    """
    lam = _unit_interval("kd_weight", kd_weight)
    _check_targets(student_logits, targets)
    nll = F.cross_entropy(_wide(student_logits), targets.long())
    if not distill:
        return nll
    _check_logits(student_logits, teacher_logits, "teacher_logits")
    kd = soft_cross_entropy(_wide(student_logits), topk_teacher_probs(teacher_logits, top_k))
    return (1.0 - lam) * nll + lam * kd


def selective_kd_flags(student_scores: Mapping[str, float], teacher_scores: Mapping[str, float],
                       threshold: float) -> dict[str, bool]:
    """Tan et al.'s check: distillation on task ``l`` stays (or comes back) on while the student's
    validation score is below the teacher's plus the threshold, ``f^l = [s_l < t_l + τ]``, and is
    switched off once the student reaches ``t_l + τ``.

    Args:
        student_scores, teacher_scores: task name → validation score (same scale, e.g. accuracy in %).
        threshold: ``τ`` in the scores' unit.
    """
    if set(student_scores) != set(teacher_scores):
        raise ValueError(f"scores name different tasks: student {sorted(student_scores)}, "
                         f"teacher {sorted(teacher_scores)}")
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold!r}")
    return {name: float(student_scores[name]) < float(teacher_scores[name]) + threshold for name in student_scores}


def mtdnn_kd_loss(student_logits: Tensor, teacher_probs: Tensor, targets: Tensor) -> Tensor:
    """Liu et al.'s task loss when the task has a teacher: the average of the two objectives,
    ``L = ½ · CE(z_S, y) + ½ · (-(1/B) Σ_b Σ_k Q_bk log softmax(z_S,b)_k)``, with ``Q`` the
    ensemble's soft targets (the average of its members' class probabilities).

    Args:
        student_logits: ``(B, K)``; teacher_probs: ``(B, K)`` the averaged soft targets; targets: ``(B,)``.
    """
    _check_logits(student_logits, teacher_probs, "teacher_probs")
    _check_targets(student_logits, targets)
    z = _wide(student_logits)
    return 0.5 * F.cross_entropy(z, targets.long()) + 0.5 * soft_cross_entropy(z, _wide(teacher_probs.detach()))


def task_sampling_probs(sizes: Mapping[str, int] | Sequence[int], exponent: float) -> Tensor:
    """Probability of drawing each task: ``p_τ = n_τ^α / Σ_σ n_σ^α`` (α = 1: proportional to size,
    α = 0: uniform).

    Args:
        sizes: task sizes ``n_τ`` (> 0), a mapping (its order is kept) or a sequence.
        exponent: ``α ≥ 0``.

    Returns:
        ``(T,)`` float64 probabilities summing to 1.
    """
    values = list(sizes.values()) if isinstance(sizes, Mapping) else list(sizes)
    if not values or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in values):
        raise ValueError(f"sizes must be positive ints, got {values!r}")
    if not math.isfinite(exponent) or exponent < 0:
        raise ValueError(f"exponent must be a finite number >= 0, got {exponent!r}")
    w = torch.tensor(values, dtype=torch.float64) ** float(exponent)
    return w / w.sum()
