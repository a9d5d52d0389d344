"""Adapters: small trainable maps that bring a student feature to the teacher's shape.

Built by a method's ``prepare`` from the shapes seen on one example batch, so the optimizer
made afterwards sees their parameters.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class ShapeMismatchError(ValueError):
    """Two tapped tensors whose shapes no adapter can bridge."""


def _describe(name: str, t: Tensor) -> str:
    return f"{name} {tuple(t.shape)}"


def build_adapter(
    student: Tensor,
    teacher: Tensor,
    *,
    student_name: str = "student",
    teacher_name: str = "teacher",
    kind: str = "conv1x1_bn",
) -> nn.Module:
    """An adapter mapping the student's tensor to the teacher's shape.

    Args:
        student: example student feature, ``(B, Cs, H, W)`` or ``(B, Ds)``.
        teacher: example teacher feature, ``(B, Ct, H, W)`` or ``(B, Dt)``.
        student_name, teacher_name: tap paths, used in error messages.
        kind: ``"conv1x1_bn"`` (1x1 conv then BatchNorm, the FitNets/CRD-style regressor),
            ``"conv1x1"``, ``"conv3x3_bn"``, or ``"linear"`` (for ``(B, D)`` tensors; chosen
            automatically for 2-D inputs). ``"identity"`` checks the shapes already agree.

    Returns ``nn.Identity`` when the shapes already agree and ``kind`` allows it.

    Raises:
        ShapeMismatchError: ranks differ, batch sizes differ, or spatial sizes differ (a 1x1
            conv changes channels, not resolution), naming both taps and shapes.
    """
    s, t = student.shape, teacher.shape
    where = f"{_describe(student_name, student)} -> {_describe(teacher_name, teacher)}"
    if s[0] != t[0]:
        raise ShapeMismatchError(f"batch sizes differ: {where}")
    if student.dim() != teacher.dim():
        raise ShapeMismatchError(
            f"cannot adapt a {student.dim()}-D tensor to a {teacher.dim()}-D one: {where}; "
            "tap layers of the same kind (both feature maps or both vectors)"
        )
    if kind == "identity":
        if s != t:
            raise ShapeMismatchError(f"shapes differ and adapter kind is 'identity': {where}")
        return nn.Identity()
    if student.dim() == 2:
        return nn.Linear(s[1], t[1])
    if student.dim() == 3:  # (B, N, D) token sequences: a linear map on the last axis
        if s[1] != t[1]:
            raise ShapeMismatchError(f"sequence lengths differ: {where}")
        return nn.Linear(s[2], t[2])
    if student.dim() != 4:
        raise ShapeMismatchError(f"adapters support 2-, 3- and 4-D tensors, got {where}")
    if s[2:] != t[2:]:
        raise ShapeMismatchError(
            f"spatial sizes differ ({tuple(s[2:])} vs {tuple(t[2:])}): {where}; "
            "a channel adapter cannot change resolution: tap layers with the same spatial size"
        )
    cs, ct = s[1], t[1]
    if kind == "conv1x1":
        return nn.Conv2d(cs, ct, 1, bias=True)
    if kind == "conv1x1_bn":
        return nn.Sequential(nn.Conv2d(cs, ct, 1, bias=False), nn.BatchNorm2d(ct))
    if kind == "conv3x3_bn":
        return nn.Sequential(nn.Conv2d(cs, ct, 3, padding=1, bias=False), nn.BatchNorm2d(ct))
    raise ValueError(f"unknown adapter kind {kind!r}; expected conv1x1_bn, conv1x1, conv3x3_bn, linear or identity")


def match_spatial(student: Tensor, teacher: Tensor, *, student_name: str = "student",
                  teacher_name: str = "teacher") -> tuple[Tensor, Tensor]:
    """Average-pool the larger of two ``(B, C, H, W)`` maps down to the other's ``(H, W)``.

    Used by methods that compare spatial maps without a channel adapter (AT): allowed only when
    the larger size is an integer multiple of the smaller, so pooling is exact block averaging.
    """
    hs, ws = student.shape[-2:]
    ht, wt = teacher.shape[-2:]
    if (hs, ws) == (ht, wt):
        return student, teacher
    if hs >= ht and ws >= wt and hs % ht == 0 and ws % wt == 0:
        return F.adaptive_avg_pool2d(student, (ht, wt)), teacher
    if ht >= hs and wt >= ws and ht % hs == 0 and wt % ws == 0:
        return student, F.adaptive_avg_pool2d(teacher, (hs, ws))
    raise ShapeMismatchError(
        f"spatial sizes {(hs, ws)} and {(ht, wt)} are not integer multiples: "
        f"{_describe(student_name, student)} vs {_describe(teacher_name, teacher)}"
    )
