"""Wavelet Knowledge Distillation (Zhang et al., "Wavelet Knowledge Distillation: Towards Efficient
Image-to-Image Translation", CVPR 2022, arXiv 2203.06321): distil only the high-frequency wavelet
bands of the teacher generator's output.

The discrete wavelet transform is :func:`ptwt.wavedec2` (differentiable, PyTorch), imported only
inside the functions (extra ``generative``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["wavelet_bands", "wavelet_kd_loss"]


def _ptwt() -> Any:
    from distill.integrations import require

    return require("ptwt", "generative", "Wavelet KD (the discrete wavelet transform)")


def wavelet_bands(images: Tensor, levels: int = 4, wavelet: str = "haar",
                  mode: str = "zero") -> tuple[Tensor, list[Tensor]]:
    """The ``levels``-level 2-D discrete wavelet decomposition of ``images`` ``(B, C, H, W)``.

    With the Haar wavelet, one level maps each 2x2 block ``[[a, b], [c, d]]`` to

    * ``LL = (a + b + c + d) / 2`` (the low band, decomposed again at the next level),
    * ``LH = (a + b - c - d) / 2`` (ptwt's "horizontal" detail: row differences),
    * ``HL = (a - b + c - d) / 2`` ("vertical": column differences),
    * ``HH = (a - b - c + d) / 2`` ("diagonal"),

    odd sides padded by ``mode`` (``"zero"``: the authors' ``DWTForward(mode='zero')``).

    Returns:
        ``(low, highs)``: ``low`` the coarsest LL band ``(B, C, H_L, W_L)``; ``highs[j]`` the detail
        bands of level ``j + 1`` (finest first) stacked as ``(B, C, 3, H_j, W_j)`` in the order
        LH, HL, HH (``H_j = ceil(H / 2^j)``).
    """
    if images.dim() != 4:
        raise ValueError(f"wavelet_bands expects images (B, C, H, W); got shape {tuple(images.shape)}")
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
        raise ValueError(f"wavelet_bands: levels must be a positive int; got {levels!r}")
    side = min(images.shape[-2:])
    if side < 2**levels:
        raise ValueError(f"wavelet_bands: {levels} levels need images of side >= {2 ** levels}; got "
                         f"{tuple(images.shape[-2:])}")
    ptwt = _ptwt()
    coeffs = ptwt.wavedec2(images, wavelet, level=levels, mode=mode)
    low = coeffs[0]
    highs = [torch.stack(tuple(detail), dim=2) for detail in reversed(coeffs[1:])]
    return low, highs


def wavelet_kd_loss(student: Tensor, teacher: Tensor, levels: int = 4, wavelet: str = "haar", mode: str = "zero",
                    include_low: bool = False) -> Tensor:
    """Wavelet KD: ``L = sum_{j=1..J} mean |H_j(S) - H_j(T)|`` over the high bands of ``J`` levels.

    ``H_j(x)`` is the stack of level ``j``'s LH, HL and HH bands ``(B, C, 3, H_j, W_j)`` of
    :func:`wavelet_bands`; the mean is over all its elements (the authors' per-level
    ``F.l1_loss(teacher_h[j], student_h[j])``, summed over levels). ``include_low=True`` adds
    ``mean |LL_J(S) - LL_J(T)|`` (distilling every band: the paper's ablation, not its method).

    Args:
        student: the student generator's output images ``(B, C, H, W)``.
        teacher: the teacher's output for the same inputs ``(B, C, H, W)`` (detach it: no gradient is
            meant to reach the teacher).
        levels, wavelet, mode: of the decomposition; defaults are the authors' published snippet
            (``DWTForward(J=4, mode='zero', wave='haar')``).
    Returns: a scalar.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"wavelet_kd_loss: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} "
                         "outputs must have the same shape")
    s_low, s_high = wavelet_bands(student, levels, wavelet, mode)
    t_low, t_high = wavelet_bands(teacher, levels, wavelet, mode)
    loss = sum(F.l1_loss(s, t) for s, t in zip(s_high, t_high))
    if include_low:
        loss = loss + F.l1_loss(s_low, t_low)
    assert isinstance(loss, Tensor)
    return loss
