r"""Self-supervised knowledge distillation for few-shot learning (issue 17, part G).

Rajasegaran, Khan, Hayat, Khan, Shah, "Self-supervised Knowledge Distillation for Few-shot Learning",
BMVC 2021, arXiv 2006.09785. Every image comes with its four rotations, sample-major as
:func:`distill.functional.sla_rotations` lays them out: row ``4b + j`` is image ``b`` turned ``j`` quarter
turns.

* Gen-0 (:func:`skd_gen0_loss`): cross-entropy of the class head on all four rotations, plus
  ``rotation_weight`` times the rotation head's cross-entropy on the rotation index.
* Gen-1 (:func:`skd_gen1_loss`): Hinton KD of the student's logits on the un-rotated images towards the
  Gen-0 teacher's, plus ``consistency_weight`` times the mean L2 distance between the student's logits on
  each rotated copy and on the original (:func:`skd_rotation_consistency`): the self-supervised twins are
  brought together while the teacher constrains the output manifold.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.functional.core import kd_loss

__all__ = ["skd_gen0_loss", "skd_gen1_loss", "skd_rotation_consistency"]


def _check_rotated(logits: Tensor, who: str) -> int:
    if logits.dim() != 2 or logits.shape[0] % 4:
        raise ValueError(f"{who}: logits of the four rotations must be (4B, K), sample-major; got {tuple(logits.shape)}")
    return logits.shape[0] // 4


def skd_gen0_loss(class_logits: Tensor, rotation_logits: Tensor, targets: Tensor,
                  rotation_weight: float = 2.0) -> Tensor:
    r"""Gen-0: :math:`\frac{1}{4B}\sum_{b,j} \mathrm{CE}(z_{4b+j}, y_b) + \gamma \frac{1}{4B}\sum_{b,j}
    \mathrm{CE}(r_{4b+j}, j)`.

    Args:
        class_logits: ``(4B, K)`` class logits of the rotated images (sample-major).
        rotation_logits: ``(4B, 4)`` rotation-head logits.
        targets: ``(B,)`` class labels.
        rotation_weight: :math:`\gamma`.
    """
    b = _check_rotated(class_logits, "skd_gen0_loss")
    if rotation_logits.shape != (4 * b, 4) or targets.shape != (b,):
        raise ValueError(f"skd_gen0_loss: rotation_logits must be ({4 * b}, 4) and targets ({b},); got "
                         f"{tuple(rotation_logits.shape)} and {tuple(targets.shape)}")
    rot = torch.arange(4, device=targets.device).repeat(b)
    return F.cross_entropy(class_logits, targets.repeat_interleave(4)) + rotation_weight * F.cross_entropy(
        rotation_logits, rot)


def skd_rotation_consistency(logits: Tensor) -> Tensor:
    r""":math:`\frac{1}{3B}\sum_b \sum_{j=1}^{3} \lVert z_{4b+j} - z_{4b} \rVert_2` for logits ``(4B, K)``."""
    b = _check_rotated(logits, "skd_rotation_consistency")
    z = logits.view(b, 4, -1)
    return (z[:, 1:] - z[:, :1]).norm(dim=2).mean()


def skd_gen1_loss(student_logits: Tensor, teacher_logits: Tensor, T: float = 2.0,
                  consistency_weight: float = 0.1) -> Tensor:
    r"""Gen-1: :math:`L_{KD}(z_{4b}, t_b; T) + \beta \cdot` :func:`skd_rotation_consistency`.

    Args:
        student_logits: ``(4B, K)`` the student's logits on the four rotations (sample-major).
        teacher_logits: ``(B, K)`` the Gen-0 teacher's logits on the un-rotated images (detached here).
        T: the KD temperature (:func:`distill.functional.kd_loss`, times T²).
        consistency_weight: :math:`\beta`.
    """
    b = _check_rotated(student_logits, "skd_gen1_loss")
    if teacher_logits.shape != (b, student_logits.shape[1]):
        raise ValueError(f"skd_gen1_loss: teacher_logits must be ({b}, {student_logits.shape[1]}); got "
                         f"{tuple(teacher_logits.shape)}")
    kd = kd_loss(student_logits.view(b, 4, -1)[:, 0], teacher_logits.detach(), T)
    return kd + consistency_weight * skd_rotation_consistency(student_logits)
