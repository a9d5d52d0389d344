"""Differentiable Siamese Augmentation (DSA).

Zhao & Bilen, "Dataset Condensation with Differentiable Siamese Augmentation", ICML 2021,
arXiv 2102.08259. When a synthetic set is learned by matching something computed on real
images (gradients, features), both batches are augmented with the SAME randomly drawn
transformation (siamese), and the transformation is differentiable in the images so that the
matching loss reaches the synthetic pixels through it.

    dsa = DSA()
    params = dsa.sample(real.shape, generator)        # one draw, shared by the whole batch
    loss = match(net(dsa(real, params)), net(dsa(syn, params)))

The ops and their ranges (defaults and ranges from the authors' code, ``ParamDiffAug`` and
``DiffAugment`` in VICO-UoE/DatasetCondensation ``utils.py``; we could read only the paper's
abstract here). ``u ~ U[0, 1)`` is one uniform draw:

* ``color``: three ops in this order: brightness ``x + (u - 0.5) * brightness``; saturation
  ``m + (x - m) * (u * saturation)`` with ``m`` the mean over channels at each pixel;
  contrast ``m + (x - m) * (u + contrast)`` with ``m`` the mean over ``(C, H, W)`` of each image.
* ``crop``: a translation by integer ``(ty, tx)`` with ``ty`` in
  ``[-round(H * ratio_crop_pad), +round(H * ratio_crop_pad)]`` rows (``tx`` likewise in
  columns), ``out[i, j] = x[i + ty, j + tx]``, zero outside the image.
* ``cutout``: a ``round(H * ratio_cutout) x round(W * ratio_cutout)`` square of zeros, centred
  at a row ``cy`` drawn from ``[0, H + 1 - sh % 2)`` (rows ``cy - sh // 2`` to
  ``cy - sh // 2 + sh - 1``, clipped to the image) and a column likewise.
* ``flip``: horizontal flip with probability 0.5.
* ``scale``: the affine sampling grid ``diag(sx, sy)`` with ``sx, sy ~ U[1/ratio_scale, ratio_scale)``
  independently (a factor above 1 shrinks the content), bilinear ``grid_sample``, zeros outside.
* ``rotate``: the sampling grid rotated by ``theta ~ U[-ratio_rotate, ratio_rotate)`` degrees,
  ``[[cos, -sin], [sin, cos]]``, bilinear, zeros outside.

``mode="single"`` (the authors' code's default, ``aug_mode='S'``) draws ONE of the strategy's
groups per call uniformly and applies only it; ``mode="all"`` (their ``'M'``) applies every
group of ``strategy`` in order.

Siamese draws (``sample(..., siamese=True)``, the default) hold one value per parameter, shared
by every image of whatever batch they are applied to, as the authors' code does with a fixed
seed; ``siamese=False`` draws one value per image (the random augmentation of the evaluator).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["DSA", "DSAParams", "DSA_OPS", "NO_FLIP_DATASETS", "strategy_for"]

DSA_OPS = ("color", "crop", "cutout", "flip", "scale", "rotate")

NO_FLIP_DATASETS = ("mnist", "digits", "svhn")
"""Data sets whose classes a mirror image changes (digits: a flipped 2 is no 2): DSA runs without
``flip`` on them. The authors' README says so for MNIST (their commands pass a strategy without flip);
we extend it to every digit set."""


def strategy_for(dataset: str | None, strategy: str = "color_crop_cutout_flip_scale_rotate") -> str:
    """``strategy`` without its ``flip`` group when ``dataset`` is a digit set (:data:`NO_FLIP_DATASETS`).

    >>> strategy_for("mnist")
    'color_crop_cutout_scale_rotate'
    >>> strategy_for("fashion_mnist")
    'color_crop_cutout_flip_scale_rotate'
    """
    if dataset is None or str(dataset).lower() not in NO_FLIP_DATASETS:
        return strategy
    return "_".join(g for g in strategy.split("_") if g != "flip")


@dataclass(frozen=True)
class DSAParams:
    """Every random parameter of one DSA draw; ``n`` is 1 (siamese: shared by the batch) or ``B``.

    Attributes:
        ops: the groups to apply, in order.
        flip: ``(n,)`` bool, flip horizontally.
        scale: ``(n, 2)`` the grid factors ``(sx, sy)``.
        rotate: ``(n,)`` angle in radians.
        brightness, saturation, contrast: ``(n,)`` the uniform draws ``u`` of the colour ops.
        crop: ``(n, 2)`` int64 translation ``(ty, tx)`` in pixels.
        cutout: ``(n, 2)`` int64 centre ``(cy, cx)`` of the cut square.
        image_size: ``(H, W)`` the draw was made for.
    """

    ops: tuple[str, ...]
    flip: Tensor
    scale: Tensor
    rotate: Tensor
    brightness: Tensor
    saturation: Tensor
    contrast: Tensor
    crop: Tensor
    cutout: Tensor
    image_size: tuple[int, int]

    @property
    def n(self) -> int:
        return int(self.flip.shape[0])


class DSA:
    """Differentiable siamese augmentation (Zhao & Bilen, ICML 2021, arXiv 2102.08259).

    Args:
        strategy: ``"_"``-joined groups from :data:`DSA_OPS`.
        ratio_scale: scale factors drawn from ``[1/ratio_scale, ratio_scale)``; ``>= 1``.
        ratio_rotate: the largest rotation in degrees.
        ratio_crop_pad: the largest translation as a fraction of the image side.
        ratio_cutout: the cut square's side as a fraction of the image side.
        brightness, saturation, contrast: the colour ops' strengths (module docstring).
        mode: ``"single"`` (one group per call) or ``"all"``.
        prob_flip: probability of the horizontal flip.
    """

    def __init__(self, strategy: str = "color_crop_cutout_flip_scale_rotate", ratio_scale: float = 1.2,
                 ratio_rotate: float = 15.0, ratio_crop_pad: float = 0.125, ratio_cutout: float = 0.5,
                 brightness: float = 1.0, saturation: float = 2.0, contrast: float = 0.5, *,
                 mode: str = "single", prob_flip: float = 0.5) -> None:
        groups = tuple(strategy.split("_")) if strategy else ()
        unknown = [g for g in groups if g not in DSA_OPS]
        if not groups or unknown:
            raise ValueError(f"DSA strategy {strategy!r}: unknown groups {unknown}; expected '_'-joined "
                             f"names from {list(DSA_OPS)}")
        if mode not in ("single", "all"):
            raise ValueError(f"DSA mode must be 'single' or 'all'; got {mode!r}")
        if not ratio_scale >= 1:
            raise ValueError(f"DSA ratio_scale must be >= 1; got {ratio_scale!r}")
        for name, value in (("ratio_rotate", ratio_rotate), ("ratio_crop_pad", ratio_crop_pad),
                            ("ratio_cutout", ratio_cutout), ("brightness", brightness),
                            ("saturation", saturation), ("contrast", contrast)):
            if not value >= 0:
                raise ValueError(f"DSA {name} must be >= 0; got {value!r}")
        if not 0 <= prob_flip <= 1:
            raise ValueError(f"DSA prob_flip must be in [0, 1]; got {prob_flip!r}")
        self.groups = groups
        self.ratio_scale, self.ratio_rotate = float(ratio_scale), float(ratio_rotate)
        self.ratio_crop_pad, self.ratio_cutout = float(ratio_crop_pad), float(ratio_cutout)
        self.brightness, self.saturation, self.contrast = float(brightness), float(saturation), float(contrast)
        self.mode, self.prob_flip = mode, float(prob_flip)

    def __repr__(self) -> str:
        return (f"DSA(strategy={'_'.join(self.groups)!r}, ratio_scale={self.ratio_scale}, "
                f"ratio_rotate={self.ratio_rotate}, ratio_crop_pad={self.ratio_crop_pad}, "
                f"ratio_cutout={self.ratio_cutout}, brightness={self.brightness}, saturation={self.saturation}, "
                f"contrast={self.contrast}, mode={self.mode!r})")

    def _sides(self, h: int, w: int) -> tuple[tuple[int, int], tuple[int, int]]:
        shift = (int(h * self.ratio_crop_pad + 0.5), int(w * self.ratio_crop_pad + 0.5))
        cut = (int(h * self.ratio_cutout + 0.5), int(w * self.ratio_cutout + 0.5))
        return shift, cut

    def sample(self, x_shape: Sequence[int], generator: torch.Generator | None = None, *,
               siamese: bool = True) -> DSAParams:
        """Draw every random parameter for images of shape ``x_shape = (B, C, H, W)``.

        ``siamese=True``: one value per parameter (``n = 1``), shared by every image of any batch;
        ``siamese=False``: one per image (``n = B``). Draws come from ``generator`` (CPU).
        """
        if len(x_shape) != 4:
            raise ValueError(f"DSA.sample expects an image shape (B, C, H, W); got {tuple(x_shape)}")
        b, _, h, w = (int(s) for s in x_shape)
        n = 1 if siamese else b
        g = generator

        def u(*shape: int) -> Tensor:
            return torch.rand(n, *shape, generator=g)

        if self.mode == "single":
            ops: tuple[str, ...] = (self.groups[int(torch.randint(0, len(self.groups), (1,), generator=g))],)
        else:
            ops = self.groups
        (sh_y, sh_x), (cut_h, cut_w) = self._sides(h, w)
        crop = torch.stack([torch.randint(-sh_y, sh_y + 1, (n,), generator=g),
                            torch.randint(-sh_x, sh_x + 1, (n,), generator=g)], dim=1)
        cutout = torch.stack([torch.randint(0, h + 1 - cut_h % 2, (n,), generator=g),
                              torch.randint(0, w + 1 - cut_w % 2, (n,), generator=g)], dim=1)
        lo = 1.0 / self.ratio_scale
        return DSAParams(
            ops=ops,
            flip=u() < self.prob_flip,
            scale=u(2) * (self.ratio_scale - lo) + lo,
            rotate=(u() - 0.5) * 2 * math.radians(self.ratio_rotate),
            brightness=u(), saturation=u(), contrast=u(),
            crop=crop, cutout=cutout, image_size=(h, w))

    def __call__(self, x: Tensor, params: DSAParams | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """Apply ``params`` (or a fresh per-image draw when ``None``) to images ``x`` ``(B, C, H, W)``;
        returns ``(B, C, H, W)``, differentiable in ``x``."""
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(f"DSA expects images of shape (B, C, H, W); got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        if params is None:
            params = self.sample(x.shape, generator, siamese=False)
        if tuple(x.shape[2:]) != params.image_size:
            raise ValueError(f"DSA params were drawn for images of size {params.image_size}; got "
                             f"{tuple(x.shape[2:])}")
        if params.n not in (1, x.shape[0]):
            raise ValueError(f"DSA params hold {params.n} per-image draws but the batch has {x.shape[0]} "
                             f"images; draw with siamese=True to share one draw across batches")
        for op in params.ops:
            x = getattr(self, f"_{op}")(x, params)
        return x

    # ---------------------------------------------------------------- the ops

    @staticmethod
    def _per_image(values: Tensor, x: Tensor) -> Tensor:
        """``(n,)`` -> ``(n, 1, 1, 1)`` on ``x``'s device and dtype (broadcasts over the batch)."""
        return values.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)

    def _color(self, x: Tensor, p: DSAParams) -> Tensor:
        x = x + (self._per_image(p.brightness, x) - 0.5) * self.brightness
        m = x.mean(dim=1, keepdim=True)
        x = (x - m) * (self._per_image(p.saturation, x) * self.saturation) + m
        m = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - m) * (self._per_image(p.contrast, x) + self.contrast) + m

    def _flip(self, x: Tensor, p: DSAParams) -> Tensor:
        return torch.where(p.flip.to(x.device).view(-1, 1, 1, 1), x.flip(3), x)

    def _crop(self, x: Tensor, p: DSAParams) -> Tensor:
        b, _, h, w = x.shape
        t = p.crop.to(x.device).expand(b, 2)
        rows = (torch.arange(h, device=x.device) + t[:, :1] + 1).clamp(0, h + 1)  # (B, H), +1 for the pad
        cols = (torch.arange(w, device=x.device) + t[:, 1:] + 1).clamp(0, w + 1)  # (B, W)
        padded = F.pad(x, (1, 1, 1, 1))  # a zero border: rows/cols pushed outside read it
        batch = torch.arange(b, device=x.device).view(b, 1, 1)
        return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)

    def _cutout(self, x: Tensor, p: DSAParams) -> Tensor:
        _, _, h, w = x.shape
        _, (cut_h, cut_w) = self._sides(h, w)
        c = p.cutout.to(x.device)
        top, left = c[:, :1] - cut_h // 2, c[:, 1:] - cut_w // 2  # (n, 1)
        r, q = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
        in_rows = (r >= top) & (r < top + cut_h)  # (n, H)
        in_cols = (q >= left) & (q < left + cut_w)  # (n, W)
        keep = ~(in_rows[:, :, None] & in_cols[:, None, :])
        return x * keep.unsqueeze(1).to(x.dtype)

    @staticmethod
    def _warp(x: Tensor, mats: Tensor) -> Tensor:
        theta = torch.cat([mats, torch.zeros(mats.shape[0], 2, 1)], dim=2)  # (n, 2, 3)
        theta = theta.to(device=x.device, dtype=x.dtype).expand(x.shape[0], 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, align_corners=False)

    def _scale(self, x: Tensor, p: DSAParams) -> Tensor:
        return self._warp(x, torch.diag_embed(p.scale))

    def _rotate(self, x: Tensor, p: DSAParams) -> Tensor:
        cos, sin = p.rotate.cos(), p.rotate.sin()
        mats = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)  # (n, 2, 2)
        return self._warp(x, mats)
