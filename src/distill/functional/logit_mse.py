"""Tang et al.'s distillation objective: squared error between the student's and the teacher's logits,
with cross-entropy against the label, or the teacher's predicted label for unlabelled (augmented) samples.

Tang, Lu, Liu, Mou, Vechtomova, Lin, "Distilling Task-Specific Knowledge from BERT into Simple
Neural Networks", 2019, arXiv 1903.12136, §3.1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.functional._precision import fp32
from distill.functional.core import logit_regression_loss

__all__ = ["logit_squared_error", "tang_loss", "teacher_filled_labels"]


def logit_squared_error(student_logits: Tensor, teacher_logits: Tensor, reduction: str = "sum") -> Tensor:
    r"""The paper's distillation loss, the squared L2 distance of the logit vectors.

    .. math:: L_{distill} = \frac{1}{B}\sum_b \lVert z^{(B)}_b - z^{(S)}_b \rVert_2^2 \quad (\text{``sum''}),
        \qquad \frac{1}{BK}\sum_{b,k} (z^{(B)}_{b,k} - z^{(S)}_{b,k})^2 \quad (\text{``mean''})

    ``student_logits``, ``teacher_logits`` (B, K) → scalar. ``"sum"`` is the paper's per-sample
    squared norm averaged over the batch; ``"mean"`` is ``nn.MSELoss`` (K times smaller). Unlike
    :func:`distill.functional.logit_regression_loss` (Ba & Caruana) there is no ½.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(f"logit_squared_error needs (B, K) logits of one shape, got {tuple(student_logits.shape)} "
                         f"and {tuple(teacher_logits.shape)}")
    # Ba & Caruana's regression without its ½: the per-sample squared norm, averaged over the batch
    per_sample = 2.0 * logit_regression_loss(fp32(student_logits), fp32(teacher_logits))
    return per_sample if reduction == "sum" else per_sample / student_logits.shape[1]


def teacher_filled_labels(targets: Tensor | None, teacher_logits: Tensor) -> Tensor:
    """The labels of the paper's cross-entropy term: the ground truth where known, the teacher's
    argmax where a sample is unlabelled (``targets`` < 0, or ``targets`` is ``None``).

    ``targets`` (B,) long or ``None``, ``teacher_logits`` (B, K) → (B,) long.
    """
    predicted = teacher_logits.argmax(-1)
    if targets is None:
        return predicted
    if targets.shape != predicted.shape:
        raise ValueError(f"targets must be (B,) = {tuple(predicted.shape)}, got {tuple(targets.shape)}")
    return torch.where(targets >= 0, targets.long(), predicted)


def tang_loss(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor | None, ce_weight: float,
              distill_weight: float, reduction: str = "sum") -> Tensor:
    r"""The paper's objective, with each weight named for its term:

    .. math:: L = w_{ce}\,\mathrm{CE}(z^{(S)}, t) + w_{distill}\,L_{distill}

    (the paper writes α and 1 − α). t is :func:`teacher_filled_labels`. Shapes as above → scalar.
    """
    loss = distill_weight * logit_squared_error(student_logits, teacher_logits, reduction)
    if ce_weight:
        labels = teacher_filled_labels(targets, teacher_logits)
        loss = loss + ce_weight * F.cross_entropy(fp32(student_logits), labels)
    return loss

