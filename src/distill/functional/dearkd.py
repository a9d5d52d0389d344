r"""The math of DearKD (Chen, Cao, Zhong, Zhang, Gao, Tao, "DearKD: Data-Efficient Early Knowledge
Distillation for Vision Transformers", CVPR 2022, arXiv 2204.12997).

DearKD trains a ViT in two stages: early, it distils a CNN teacher's intermediate features into the
transformer's early layers together with DeiT-style response distillation; later, the feature term
is dropped. Only the paper's abstract could be read here: the forms below (MSE between aligned
maps, DeiT's hard-label objective) are stated as ours where the paper's exact choice is unknown.
Nothing here detaches the teacher.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from distill.functional._precision import fp32
from distill.functional.vit_deit import deit_hard_loss

__all__ = ["dearkd_feature_active", "dearkd_feature_loss", "dearkd_response_loss"]


def dearkd_feature_loss(student_maps: Sequence[Tensor], teacher_maps: Sequence[Tensor]) -> Tensor:
    r"""The early-stage feature term: the mean over pairs of the MSE between the student's aligned
    maps and the CNN's.

    .. math::
        L_{feat} = \frac{1}{P} \sum_{p=1}^{P} \frac{1}{B C_p H_p W_p}
        \lVert \phi_p(F^S_p) - F^T_p \rVert_2^2

    ``student_maps[p]`` (already aligned: :math:`\phi_p(F^S_p)`, the transformer's tokens as a map,
    projected to the teacher's channels and resampled to its size) and ``teacher_maps[p]``:
    ``(B, C_p, H_p, W_p)``, equal shapes -> scalar.
    """
    if len(student_maps) != len(teacher_maps) or not student_maps:
        raise ValueError(f"dearkd_feature_loss needs as many teacher maps as student maps (at least one), got "
                         f"{len(student_maps)} and {len(teacher_maps)}")
    total: Tensor | None = None
    for i, (s, t) in enumerate(zip(student_maps, teacher_maps)):
        if s.shape != t.shape or s.dim() != 4:
            raise ValueError(f"pair {i}: aligned student map {tuple(s.shape)} and teacher map {tuple(t.shape)} "
                             "must both be (B, C, H, W) and equal")
        term = F.mse_loss(fp32(s), fp32(t))
        total = term if total is None else total + term
    assert total is not None
    return total / len(student_maps)


def dearkd_response_loss(cls_logits: Tensor, dist_logits: Tensor, targets: Tensor, teacher_logits: Tensor) -> Tensor:
    r"""DeiT's hard-label distillation objective, which DearKD keeps through both stages.

    .. math::
        L_{resp} = \tfrac12\, \mathrm{CE}(z_{cls}, y) + \tfrac12\, \mathrm{CE}(z_{dist}, y_t),
        \qquad y_t = \arg\max_k z^T_k

    ``cls_logits`` (class-token head), ``dist_logits`` (distillation-token head; the class head again
    for a ViT without distillation token), ``teacher_logits``: ``(B, K)``; ``targets``: ``(B,)`` ->
    scalar (means over the batch). Touvron et al., "Training data-efficient image transformers &
    distillation through attention", ICML 2021, arXiv 2012.12877 (hard distillation): DeiT's own
    :func:`~distill.functional.vit_deit.deit_hard_loss` with its paper weights and no label smoothing.
    """
    return deit_hard_loss(cls_logits, dist_logits, teacher_logits, targets, 0.5, 0.5)


def dearkd_feature_active(epoch: int | None, total_epochs: int | None, early_epochs: int | None,
                          early_fraction: float) -> bool:
    """Whether the feature term is on in ``epoch`` (0-based): ``epoch < early_epochs`` when given, else
    ``epoch < ceil(early_fraction · total_epochs)``; on when the epoch (or the total) is unknown."""
    if epoch is None:
        return True
    if early_epochs is not None:
        return epoch < early_epochs
    if total_epochs is None:
        return True
    return epoch < math.ceil(early_fraction * total_epochs)
