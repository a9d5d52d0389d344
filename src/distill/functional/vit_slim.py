r"""The math of SiT's distillation (Self-slimmed Vision Transformer, Zong et al., ECCV 2022, arXiv 2111.12624).

The student is a token-slimmed ViT (:class:`distill.models.slimmed_vit.SlimmedViT`), the teacher the
same ViT without slimming. Feature Recalibration Distillation (FRD) maps the student's slimmed
tokens of every layer back to the teacher's token count with a reverse token slimming module
(RTSM, trainable, owned by :class:`distill.methods.vit_slim.SiTDistill`) and matches the teacher's
tokens there; the logits are matched by temperature-scaled KL. Nothing here detaches the teacher.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from distill.functional._precision import fp32

__all__ = ["sit_frd_loss", "sit_distill_loss"]


def sit_frd_loss(recovered: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
    r"""FRD's token term: the mean over layers of the mean squared error between the student's
    recovered tokens and the teacher's.

    .. math::
        L_{token} = \frac{1}{L} \sum_{l=1}^{L} \frac{1}{B N D} \lVert \mathrm{RTSM}_l(\hat X^S_l) - X^T_l \rVert_2^2

    ``recovered[l]``, ``teacher[l]``: ``(B, N, D)`` patch tokens of layer ``l`` (prefix tokens
    excluded), equal shapes per layer -> scalar. As the authors' code (``losses.py``: ``MSELoss``
    per layer, divided by the number of layers).
    """
    if len(recovered) != len(teacher) or not recovered:
        raise ValueError(f"sit_frd_loss needs one teacher tensor per student layer (at least one), got "
                         f"{len(recovered)} and {len(teacher)}")
    total: Tensor | None = None
    for i, (s, t) in enumerate(zip(recovered, teacher)):
        if s.shape != t.shape or s.dim() != 3:
            raise ValueError(f"layer {i}: recovered student tokens {tuple(s.shape)} and teacher tokens "
                             f"{tuple(t.shape)} must both be (B, N, D) and equal")
        term = F.mse_loss(fp32(s), fp32(t))
        total = term if total is None else total + term
    assert total is not None
    return total / len(recovered)


def sit_distill_loss(student_logits: Tensor, teacher_logits: Tensor, recovered: Sequence[Tensor],
                     teacher_tokens: Sequence[Tensor], T: float = 1.0, logits_weight: float = 2.0,
                     token_weight: float = 2.0) -> Tensor:
    r"""SiT's dark-knowledge distillation: logits KD plus the FRD token term.

    .. math::
        L = \lambda_{logits}\, \frac{T^2}{B} \sum_b \mathrm{KL}\big(\sigma(z^T_b/T) \,\Vert\, \sigma(z^S_b/T)\big)
          + \lambda_{token}\, L_{token}

    ``student_logits``, ``teacher_logits``: ``(B, K)``; ``recovered``, ``teacher_tokens``: per layer
    ``(B, N, D)`` (:func:`sit_frd_loss`) -> scalar. Defaults ``T = 1``, ``λ_logits = λ_token = 2``:
    the authors' code and training scripts (``main.py`` ``--distillation-tau 1.0``,
    ``exp/*/train.sh`` ``--lambda-token 2.0 --lambda-logits 2.0``); the cross-entropy on labels is a
    separate loss (weight 1 there).
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(f"sit_distill_loss needs (B, K) logits of equal shapes, got {tuple(student_logits.shape)} "
                         f"and {tuple(teacher_logits.shape)}")
    if T <= 0:
        raise ValueError(f"T must be > 0, got {T}")
    log_q = F.log_softmax(fp32(student_logits) / T, dim=1)
    log_p = F.log_softmax(fp32(teacher_logits) / T, dim=1)
    kd = F.kl_div(log_q, log_p, reduction="batchmean", log_target=True) * (T * T)
    return logits_weight * kd + token_weight * sit_frd_loss(recovered, teacher_tokens)
