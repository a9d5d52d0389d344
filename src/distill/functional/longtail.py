r"""Self Supervision to Distillation for long-tailed recognition (issue 17, part G).

Li, Wang, Wu, "Self Supervision to Distillation for Long-Tailed Visual Recognition", ICCV 2021,
arXiv 2109.04075. The student of stage III has two classifiers on one backbone: a *hard* head trained by
cross-entropy on the labels and a *soft* head trained by distillation from the teacher's soft labels
(the teacher's classifier re-trained with class-balanced sampling in stage II):

.. math::
    L = \mathrm{CE}(W_h f(x), y) + \lambda\, T^2\, \mathrm{KL}\big(\sigma(z^t / T) \,\|\, \sigma(W_s f(x) / T)\big)
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from distill.functional.core import kd_loss

__all__ = ["class_balanced_weights", "ssd_student_loss"]


def ssd_student_loss(hard_logits: Tensor, soft_logits: Tensor, teacher_logits: Tensor, targets: Tensor,
                     T: float = 2.0, kd_weight: float = 1.0) -> Tensor:
    """Stage III of SSD: CE on the hard head ``(B, K)`` plus ``kd_weight`` x Hinton KD (times T², batch mean)
    of the soft head ``(B, K)`` towards the teacher's logits ``(B, K)`` (detached); ``targets`` ``(B,)``."""
    if not (hard_logits.shape == soft_logits.shape == teacher_logits.shape) or hard_logits.dim() != 2:
        raise ValueError(f"ssd_student_loss: the hard, soft and teacher logits must be one (B, K) shape; got "
                         f"{tuple(hard_logits.shape)}, {tuple(soft_logits.shape)}, {tuple(teacher_logits.shape)}")
    return F.cross_entropy(hard_logits, targets) + kd_weight * kd_loss(soft_logits, teacher_logits.detach(), T)


def class_balanced_weights(targets: Tensor, num_classes: int) -> Tensor:
    """Per-sample weights ``(N,)`` that make each class equally likely under weighted sampling:
    ``1 / n_{y_i}`` (the class-balanced sampling of stage II's classifier re-training)."""
    counts = targets.bincount(minlength=num_classes).clamp_min(1).float()
    return 1.0 / counts[targets]
