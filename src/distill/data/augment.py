"""Batched, tensor-side image augmentation.

Every transform works on a whole batch ``x`` of shape ``(B, C, H, W)`` at once, with no Python
loop over samples. Randomness is split from application:

* ``sample_params(batch_size, generator)`` draws the per-sample parameters (tensors whose first
  axis is the batch, always drawn on the generator's device, normally the CPU);
* ``apply(x, params)`` applies them deterministically.

``transform(x, generator)`` does both. Keeping the parameters lets later code replay the exact
same augmented view (e.g. to cache a teacher's outputs per view) and slice them per sample
(``params[i]``) like any other tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Augment", "Compose", "RandomCropPad", "RandomHorizontalFlip"]


def _check_images(x: Tensor, who: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{who} expects images of shape (B, C, H, W); got {shape}")


def _check_params_batch(params: Tensor, x: Tensor, who: str) -> None:
    if params.shape[0] != x.shape[0]:
        raise ValueError(
            f"{who}: parameters are for a batch of {params.shape[0]} samples but x has {x.shape[0]}"
        )


class Augment:
    """Base class: subclasses implement :meth:`sample_params` and :meth:`apply`."""

    def sample_params(self, batch_size: int, generator: torch.Generator | None = None) -> Any:
        """Draw the random parameters for ``batch_size`` samples."""
        raise NotImplementedError

    def apply(self, x: Tensor, params: Any) -> Tensor:
        """Apply parameters from :meth:`sample_params` to ``x`` ``(B, C, H, W)``."""
        raise NotImplementedError

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Augment ``x`` ``(B, C, H, W)`` with fresh draws from ``generator``; same shape out."""
        _check_images(x, type(self).__name__)
        return self.apply(x, self.sample_params(x.shape[0], generator))


class RandomCropPad(Augment):
    """Pad each side by ``padding`` pixels of ``fill``, then crop a random ``H x W`` window.

    ``fill`` is the padding value in the space of ``x``: inputs that were normalised with
    ``(x - mean) / std`` get mean-coloured padding from the default ``0.0``; pass
    ``-mean / std`` for black padding.

    Params: integer offsets ``(B, 2)`` as ``(row, col)``, each in ``[0, 2 * padding]``; offset
    ``(padding, padding)`` is the identity crop.
    """

    def __init__(self, padding: int, fill: float = 0.0) -> None:
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise ValueError(f"RandomCropPad padding must be an int >= 0; got {padding!r}")
        self.padding = padding
        self.fill = float(fill)

    def sample_params(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        device = generator.device if generator is not None else None
        return torch.randint(0, 2 * self.padding + 1, (batch_size, 2), generator=generator, device=device)

    def apply(self, x: Tensor, params: Tensor) -> Tensor:
        _check_images(x, "RandomCropPad")
        _check_params_batch(params, x, "RandomCropPad")
        if self.padding == 0:
            return x
        b, c, h, w = x.shape
        p = self.padding
        padded = F.pad(x, (p, p, p, p), value=self.fill)  # (B, C, H+2p, W+2p)
        offsets = params.to(device=x.device, dtype=torch.long)
        rows = offsets[:, 0:1] + torch.arange(h, device=x.device)  # (B, H)
        cols = offsets[:, 1:2] + torch.arange(w, device=x.device)  # (B, W)
        # One advanced-indexing gather; the four index tensors broadcast to (B, C, H, W).
        return padded[
            torch.arange(b, device=x.device)[:, None, None, None],
            torch.arange(c, device=x.device)[None, :, None, None],
            rows[:, None, :, None],
            cols[:, None, None, :],
        ]

    def __repr__(self) -> str:
        return f"RandomCropPad(padding={self.padding}, fill={self.fill})"


class RandomHorizontalFlip(Augment):
    """Mirror each image left-right with probability ``p``.

    Params: a boolean mask ``(B,)``, ``True`` where the sample is flipped.
    """

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"RandomHorizontalFlip p must be in [0, 1]; got {p!r}")
        self.p = float(p)

    def sample_params(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        device = generator.device if generator is not None else None
        return torch.rand(batch_size, generator=generator, device=device) < self.p

    def apply(self, x: Tensor, params: Tensor) -> Tensor:
        _check_images(x, "RandomHorizontalFlip")
        _check_params_batch(params, x, "RandomHorizontalFlip")
        mask = params.to(device=x.device, dtype=torch.bool)[:, None, None, None]
        return torch.where(mask, x.flip(-1), x)

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class Compose(Augment):
    """Apply transforms in order. Params: a tuple with one entry per transform."""

    def __init__(self, transforms: Sequence[Augment]) -> None:
        transforms = list(transforms)
        for i, t in enumerate(transforms):
            if not isinstance(t, Augment):
                raise TypeError(
                    f"Compose item {i} is a {type(t).__name__}; expected an Augment "
                    "(RandomCropPad, RandomHorizontalFlip, ...)"
                )
        self.transforms = transforms

    def sample_params(self, batch_size: int, generator: torch.Generator | None = None) -> tuple[Any, ...]:
        # Drawn in order, so a fixed generator state gives the same parameters for every transform.
        return tuple(t.sample_params(batch_size, generator) for t in self.transforms)

    def apply(self, x: Tensor, params: Sequence[Any]) -> Tensor:
        if len(params) != len(self.transforms):
            raise ValueError(
                f"Compose has {len(self.transforms)} transforms but got {len(params)} parameter sets"
            )
        for t, p in zip(self.transforms, params):
            x = t.apply(x, p)
        return x

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"
