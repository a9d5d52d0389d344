"""Binary students: the feature-map transfer of a binary-weight network and BENN's ensembles.

* :func:`binary_kt_loss`: Xu, Wang, Yang, López, "Training a Binary Weight Object Detector by
  Knowledge Transfer for Autonomous Driving", ICRA 2019, arXiv 1804.06332 — a full-precision
  teacher's feature map taught to a binary-weight student of the same architecture.
* :func:`benn_samme_alpha`, :func:`benn_boost_weights`, :func:`benn_combine`: Zhu, Dong, Su,
  "Binary Ensemble Neural Network: More Bits per Network or More Networks per Bit?", CVPR 2019,
  arXiv 1806.07550 — bagging and boosting of binary networks and their combination rules.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["benn_boost_weights", "benn_combine", "benn_samme_alpha", "binary_kt_loss"]

BENN_RULES = ("hard", "soft")


def binary_kt_loss(student: Tensor, teacher: Tensor) -> Tensor:
    r"""Feature-map transfer: ``L = 1/2 · mean_{b,c,h,w} (F_s - F_t)^2``.

    Args:
        student: the binary-weight student's feature map ``(B, C, H, W)`` (or ``(B, D)``).
        teacher: the full-precision teacher's map of the same shape (detach it beforehand).

    Returns:
        A scalar. The mean over every element (not the sum) keeps the scale independent of the map's
        size — our choice: only the paper's abstract could be read here.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"binary_kt_loss: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} "
                         "maps must have the same shape (give the method an adapter)")
    return 0.5 * (student - teacher).pow(2).mean()


def benn_samme_alpha(error: float, num_classes: int, eps: float = 1e-10) -> float:
    r"""A boosted member's vote, multi-class AdaBoost (SAMME, Zhu et al. 2009):
    ``alpha = log((1 - err) / err) + log(K - 1)``, ``err`` the member's weighted training error
    (clamped to ``[eps, 1 - eps]``). Positive exactly when the member beats chance, ``err < 1 - 1/K``."""
    if num_classes < 2:
        raise ValueError(f"benn_samme_alpha: num_classes must be >= 2; got {num_classes}")
    if not 0.0 <= error <= 1.0:
        raise ValueError(f"benn_samme_alpha: error must be in [0, 1]; got {error}")
    e = min(max(float(error), eps), 1 - eps)
    return math.log((1 - e) / e) + math.log(num_classes - 1)


def benn_boost_weights(weights: Tensor, wrong: Tensor, alpha: float) -> Tensor:
    r"""AdaBoost's re-weighting: ``w_i <- w_i · exp(alpha · 1[h(x_i) != y_i])``, normalised to sum 1.

    Args:
        weights: the sample distribution ``(N,)`` (>= 0, positive sum).
        wrong: bool ``(N,)``, the member's mistakes.
        alpha: the member's vote (:func:`benn_samme_alpha`).
    """
    if weights.shape != wrong.shape or weights.dim() != 1:
        raise ValueError(f"benn_boost_weights: weights {tuple(weights.shape)} and wrong {tuple(wrong.shape)} "
                         "must both be (N,)")
    w = weights * torch.exp(alpha * wrong.to(weights.dtype))
    return w / w.sum()


def benn_combine(logits: Tensor | Sequence[Tensor], rule: str = "soft", alphas: Sequence[float] | None = None
                 ) -> Tensor:
    r"""The ensemble's class scores ``(B, K)`` from its members' logits ``(M, B, K)``.

    * ``"hard"`` (voting): ``s_k = sum_m a_m · 1[argmax_j z_mj = k]``;
    * ``"soft"`` (averaging): ``s_k = sum_m a_m · softmax(z_m)_k``;

    with ``a_m = 1/M`` (bagging) or ``a_m = alpha_m / sum alpha`` (boosting's votes). The prediction is
    ``argmax_k s_k``; ``"soft"`` scores are a distribution.
    """
    z = torch.stack(list(logits)) if not isinstance(logits, Tensor) else logits
    if z.dim() != 3:
        raise ValueError(f"benn_combine: logits must be (M, B, K); got {tuple(z.shape)}")
    if rule not in BENN_RULES:
        raise ValueError(f"benn_combine: rule must be one of {BENN_RULES}; got {rule!r}")
    m = z.shape[0]
    a = torch.full((m,), 1.0 / m, dtype=z.dtype, device=z.device) if alphas is None else \
        torch.as_tensor(list(alphas), dtype=z.dtype, device=z.device)
    if a.shape != (m,) or (a < 0).any() or a.sum() <= 0:
        raise ValueError(f"benn_combine: need {m} non-negative member weights with a positive sum; got {a.tolist()}")
    a = a / a.sum()
    votes = torch.nn.functional.one_hot(z.argmax(-1), z.shape[-1]).to(z.dtype) if rule == "hard" else z.softmax(-1)
    return (a.view(m, 1, 1) * votes).sum(0)
