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
        ShapeMismatchError: ranks differ, batch sizes differ, or spatial sizes that no
            convolution of :func:`resampling_conv` bridges, naming both taps and shapes.

    Maps of different resolution get the channel change and a resampling convolution in one
    layer (:func:`resampling_conv`: strided conv down, transposed conv up, as RepDistiller's
    ``ConvReg`` does for 2x), followed by BatchNorm for the ``*_bn`` kinds.
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
    cs, ct = s[1], t[1]
    if kind not in _CONV_KINDS:
        raise ValueError(f"unknown adapter kind {kind!r}; expected {', '.join(_CONV_KINDS)}, linear or identity")
    if s[2:] != t[2:]:
        conv: nn.Module = resampling_conv(cs, ct, (s[2], s[3]), (t[2], t[3]), where=where,
                                          bias=kind == "conv1x1")
    elif kind == "conv3x3_bn":
        conv = nn.Conv2d(cs, ct, 3, padding=1, bias=False)
    else:
        conv = nn.Conv2d(cs, ct, 1, bias=kind == "conv1x1")
    return nn.Sequential(conv, nn.BatchNorm2d(ct)) if kind.endswith("_bn") else conv


_CONV_KINDS = ("conv1x1_bn", "conv1x1", "conv3x3_bn")


def _axis_conv(n_in: int, n_out: int) -> tuple[str, int, int, int] | None:
    """(op, kernel, stride, padding) taking length ``n_in`` to ``n_out`` along one axis."""
    if n_in == n_out:
        return ("conv", 1, 1, 0)
    if n_in > n_out and n_in % n_out == 0:  # downsample by f: kernel 2f-1, stride f, padding f-1
        f = n_in // n_out
        return ("conv", 2 * f - 1, f, f - 1)
    if n_out > n_in and n_out % n_in == 0:  # upsample by f: transposed conv, kernel 2f/stride f/pad f/2 (f even)
        f = n_out // n_in
        return ("deconv", 2 * f, f, f // 2) if f % 2 == 0 else ("deconv", f, f, 0)
    if n_in > n_out:  # FitNets' valid convolution: kernel n_in - n_out + 1
        return ("conv", n_in - n_out + 1, 1, 0)
    return None


def resampling_conv(c_in: int, c_out: int, hw_in: tuple[int, int], hw_out: tuple[int, int], *,
                    where: str = "", bias: bool = False) -> nn.Module:
    """A convolution mapping ``(B, c_in, *hw_in)`` to ``(B, c_out, *hw_out)``.

    The spatial part of a regressor between maps of different resolution, per axis:

    * ``n_in = f·n_out`` (student map larger): a strided conv, kernel ``2f−1``, stride ``f``,
      padding ``f−1``; for ``f = 2`` this is the 3x3 stride-2 conv of RepDistiller's ``ConvReg``.
    * ``n_out = f·n_in`` (student map smaller): a transposed conv, kernel ``2f``, stride ``f``,
      padding ``f/2`` for even ``f`` (``ConvReg``'s 4x4 stride-2 for ``f = 2``), kernel = stride
      ``f`` for odd ``f``.
    * otherwise, student larger: the "valid" convolution of FitNets (Romero et al., ICLR 2015,
      arXiv 1412.6550, section 2.2), kernel ``n_in − n_out + 1``.

    Raises:
        ShapeMismatchError: the student's map is smaller by a non-integer factor, or the two axes
            need different kinds of convolution (one up, one down).
    """
    plans = [_axis_conv(a, b) for a, b in zip(hw_in, hw_out)]
    ops = {p[0] for p in plans if p is not None and p[1:] != (1, 1, 0)}
    if any(p is None for p in plans) or len(ops) > 1:
        raise ShapeMismatchError(
            f"spatial sizes differ ({tuple(hw_in)} vs {tuple(hw_out)}): {where}; an adapter bridges a larger student "
            "map, or a smaller one by an integer factor (per axis, the same direction on both): tap layers "
            "with compatible resolutions"
        )
    kernel = (plans[0][1], plans[1][1])  # type: ignore[index]
    stride = (plans[0][2], plans[1][2])  # type: ignore[index]
    padding = (plans[0][3], plans[1][3])  # type: ignore[index]
    if ops == {"deconv"}:
        return nn.ConvTranspose2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=bias)
    return nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=bias)


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
