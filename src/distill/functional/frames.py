"""Frame-level losses for sequence labelling (acoustic-model style): per-frame logits ``(B, T, K)``,
per-frame labels ``(B, T)`` and a per-frame mask ``(B, T)`` (True where the frame counts).

Every loss is a mean over the counted frames of the whole batch (each frame one sample), so a
padded frame never moves it and a long sequence weighs more than a short one, as in frame-level
acoustic-model training where the frames of all utterances form the training set.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.functional._precision import fp32
from distill.functional.core import kd_per_sample

__all__ = ["frame_cross_entropy", "frame_kd_loss", "frame_mask"]

IGNORE_INDEX = -100


def frame_mask(logits: Tensor, targets: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
    """The frames that count, ``(B, T)`` bool: ``mask`` when given, else ``targets != -100`` when
    labels are given, else every frame. Checks the shapes against ``logits`` ``(B, T, K)``."""
    if not isinstance(logits, Tensor) or logits.dim() != 3:
        raise ValueError(f"frame losses need per-frame logits (B, T, K); got "
                         f"{tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__}")
    bt = tuple(logits.shape[:2])
    if mask is not None:
        if tuple(mask.shape) != bt:
            raise ValueError(f"frame mask has shape {tuple(mask.shape)} but the logits' frames are {bt}")
        return mask.bool()
    if targets is not None:
        if tuple(targets.shape) != bt:
            raise ValueError(f"frame labels have shape {tuple(targets.shape)} but the logits' frames are {bt} "
                             f"(expected one label per frame, -100 for padding)")
        return targets != IGNORE_INDEX
    return torch.ones(bt, dtype=torch.bool, device=logits.device)


def _counted(m: Tensor) -> None:
    if not bool(m.any()):
        raise ValueError("frame loss: no frame is counted (the mask is all False / every label is -100)")


def frame_cross_entropy(logits: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
    r"""Hard-label cross-entropy per frame, averaged over the counted frames.

    .. math:: L_{CE} = -\frac{1}{|M|}\sum_{(b,t) \in M} \log \operatorname{softmax}(s_{b,t})_{y_{b,t}}

    Shapes: logits ``(B, T, K)``, targets ``(B, T)`` (``-100`` = not counted), mask ``(B, T)`` or None.
    """
    m = frame_mask(logits, targets, mask)
    _counted(m)
    return F.cross_entropy(fp32(logits[m]), targets[m])


def frame_kd_loss(student_logits: Tensor, teacher_logits: Tensor, T: float = 1.0, mask: Tensor | None = None,
                  targets: Tensor | None = None) -> Tensor:
    r"""Frame-level soft-target loss: :math:`T^2 \, \mathrm{KL}(p^T_{b,t} \| q^T_{b,t})` averaged over the
    counted frames.

    .. math::
        L_{KD} = \frac{T^2}{|M|} \sum_{(b,t) \in M} \sum_k p^T_{b,t,k} \log \frac{p^T_{b,t,k}}{q^T_{b,t,k}},
        \quad p^T = \operatorname{softmax}(t/T),\ q^T = \operatorname{softmax}(s/T)

    The teacher-student criterion of Lu et al. (2017) and the dark-knowledge soft-target criterion
    of Tang et al. (2016), both written there as the cross-entropy :math:`-\sum_k p_k \log q_k`; KL
    differs from it by the teacher's entropy (a constant for the student): same gradient, 0 at agreement.

    Shapes: ``(B, T, K)``, ``(B, T, K)``; mask ``(B, T)`` or None (then ``targets != -100`` when
    ``targets`` ``(B, T)`` is given, else every frame).
    """
    if T <= 0:
        raise ValueError(f"temperature T must be > 0; got {T}")
    m = frame_mask(student_logits, targets, mask)
    if tuple(teacher_logits.shape) != tuple(student_logits.shape):
        raise ValueError(f"teacher frame logits {tuple(teacher_logits.shape)} and student's "
                         f"{tuple(student_logits.shape)} differ; both must be (B, T, K)")
    _counted(m)
    return kd_per_sample(student_logits[m], teacher_logits[m].detach(), T).mean()
