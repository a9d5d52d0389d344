"""Image priors for synthesised inputs: total variation, an L2 penalty, and random jitter + flip.

These are the image regularisers of DeepInversion (Yin et al., "Dreaming to Distill: Data-free
Knowledge Transfer via DeepInversion", CVPR 2020, arXiv 1912.08795):
``R_prior(x) = a_tv R_TV(x) + a_l2 R_l2(x)``, with random jitter (a roll of the image by up to
``lim`` pixels) and a random horizontal flip applied to the batch before each teacher forward.

Every function takes images ``x`` of shape ``(B, C, H, W)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["jitter_flip", "l2_prior", "total_variation"]


def _check_images(x: Tensor, where: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{where} expects images of shape (B, C, H, W); got {shape}")


def total_variation(x: Tensor, p: float = 2.0) -> Tensor:
    """Anisotropic total variation of a batch of images.

    ``TV_p(x) = (1/B) sum_b [ sum_{c,h,w} |x[b,c,h+1,w] - x[b,c,h,w]|^p
    + sum_{c,h,w} |x[b,c,h,w+1] - x[b,c,h,w]|^p ]``: the mean over the batch of the sum over
    pixels of the ``p``-th power of the vertical and horizontal neighbour differences.

    ``p=2`` is the squared-difference ("l2") variant and ``p=1`` the absolute ("l1") variant of
    DeepInversion's R_TV (arXiv 1912.08795). Departure: the authors' code (``deepinversion.py``)
    takes differences in four directions (the two axes and the two diagonals) over the whole batch
    and sums, for its l2 variant, their Frobenius norms (not squared, not per image), for its l1
    variant their mean absolute values; we compute the anisotropic TV over the two image axes.

    Args:
        x: images ``(B, C, H, W)``.
        p: exponent of the absolute differences, ``> 0``.

    Returns:
        a scalar tensor.
    """
    _check_images(x, "total_variation")
    if not p > 0:
        raise ValueError(f"total_variation: p must be > 0; got {p!r}")
    dh = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().pow(p)
    dw = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().pow(p)
    return (dh.flatten(1).sum(1) + dw.flatten(1).sum(1)).mean()


def l2_prior(x: Tensor) -> Tensor:
    """``R_l2(x) = (1/B) sum_b ||x_b||_2``: the mean over the batch of each image's Euclidean norm
    (DeepInversion's R_l2, arXiv 1912.08795).

    Args:
        x: images ``(B, C, H, W)``.

    Returns:
        a scalar tensor.
    """
    _check_images(x, "l2_prior")
    return x.flatten(1).norm(p=2, dim=1).mean()


def jitter_flip(x: Tensor, max_shift: int, flip: bool = True,
                generator: torch.Generator | None = None) -> Tensor:
    """Roll the whole batch by one random ``(dx, dy)`` and maybe flip it horizontally, as
    DeepInversion does before every teacher forward (arXiv 1912.08795, and its code).

    The draws, in this order, from ``generator`` (torch's default generator when ``None``):
    ``dx, dy = torch.randint(-max_shift, max_shift + 1, (2,))``; then, when ``flip``,
    ``coin = torch.randint(0, 2, (1,))``. The output is
    ``torch.roll(x, shifts=(dy, dx), dims=(2, 3))`` (``dy`` rows down, ``dx`` columns right,
    wrapping around), flipped along the width when ``coin == 1``. Differentiable in ``x``.

    Args:
        x: images ``(B, C, H, W)``.
        max_shift: the largest shift in pixels along each axis, ``>= 0``.
        flip: draw the horizontal flip too.
        generator: the random generator to draw from.

    Returns:
        the shifted (and maybe flipped) images, ``(B, C, H, W)``.
    """
    _check_images(x, "jitter_flip")
    if isinstance(max_shift, bool) or not isinstance(max_shift, int) or max_shift < 0:
        raise ValueError(f"jitter_flip: max_shift must be an int >= 0; got {max_shift!r}")
    dx, dy = torch.randint(-max_shift, max_shift + 1, (2,), generator=generator).tolist()
    out = torch.roll(x, shifts=(dy, dx), dims=(2, 3)) if (dx or dy) else x
    if flip and int(torch.randint(0, 2, (1,), generator=generator)) == 1:
        out = out.flip(3)
    return out
