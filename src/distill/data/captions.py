"""Image–caption pairs built from real MNIST digits: canvases of 2–3 digits side by side with a
generated caption ("a 3 left of a 7") and each digit's box, the closest honest small stand-in for
an image–text pre-training corpus with detector boxes (COCO/Visual Genome are not available offline).

The pixels are real MNIST digits; the captions are generated from their labels, so every caption
is true of its canvas; a *negative* caption changes one digit's label (a hard negative: only the
changed object tells them apart).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["CAPTION_VOCAB", "MASK_ID", "DigitCanvases", "caption_ids", "digit_canvases", "digit_positions",
           "negative_labels"]

CAPTION_VOCAB: tuple[str, ...] = ("[PAD]", "[CLS]", "a", "left", "of", *[str(d) for d in range(10)], "[MASK]")
_INDEX = {w: i for i, w in enumerate(CAPTION_VOCAB)}
MASK_ID: int = _INDEX["[MASK]"]  # the masked-language-modelling token (never in a generated caption)


@dataclass(frozen=True)
class DigitCanvases:
    """``images`` ``(N, 1, 28, 28·K)`` in [0, 1]; ``labels`` ``(N, K)`` the digits left to right;
    ``boxes`` ``(N, K, 4)`` long ``(x0, y0, x1, y1)`` pixel boxes (x1, y1 exclusive)."""

    images: Tensor
    labels: Tensor
    boxes: Tensor

    def __len__(self) -> int:
        return int(self.images.shape[0])


def digit_canvases(images: Tensor, labels: Tensor, n: int, digits: int = 2, seed: int = 0) -> DigitCanvases:
    """``n`` canvases of ``digits`` MNIST digits drawn at random (with ``seed``) from ``images``
    ``(M, 1, 28, 28)`` / ``labels`` ``(M,)`` (e.g. :func:`distill.data.sources.load_mnist`), laid side
    by side, digit ``k`` in the box ``x ∈ [28k, 28k + 28)``."""
    if images.dim() != 4 or images.shape[1:] != (1, 28, 28) or labels.shape != images.shape[:1]:
        raise ValueError(f"digit_canvases needs (M, 1, 28, 28) images and (M,) labels; got {tuple(images.shape)}, "
                         f"{tuple(labels.shape)}")
    if not (isinstance(digits, int) and 1 <= digits <= 4):
        raise ValueError(f"digit_canvases digits must be an int in [1, 4], got {digits!r}")
    if not (isinstance(n, int) and n >= 1):
        raise ValueError(f"digit_canvases n must be an int >= 1, got {n!r}")
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, images.shape[0], (n, digits), generator=g)
    canvas = torch.cat([images[pick[:, k]] for k in range(digits)], dim=3)
    x0 = torch.arange(digits) * 28
    boxes = torch.stack([x0, torch.zeros_like(x0), x0 + 28, torch.full_like(x0, 28)], dim=1).expand(n, digits, 4)
    return DigitCanvases(canvas.float(), labels[pick].long(), boxes.clone())


def caption_ids(labels: Tensor) -> Tensor:
    """Token ids ``(N, 1 + 4K - 2)`` of the captions of ``labels`` ``(N, K)``: ``[CLS] a d1 left of a d2 ...``
    (vocabulary :data:`CAPTION_VOCAB`)."""
    rows = []
    for row in labels.tolist():
        words = ["[CLS]"]
        for j, d in enumerate(row):
            words += (["left", "of"] if j else []) + ["a", str(d)]
        rows.append([_INDEX[w] for w in words])
    return torch.tensor(rows, dtype=torch.long)


def digit_positions(k: int | Tensor) -> int | Tensor:
    """The caption position of digit ``k`` (an int or a tensor of ints) in :func:`caption_ids`' rows:
    ``[CLS] a d1 left of a d2 ...`` puts digit ``k`` at ``2 + 4k``."""
    return 2 + 4 * k


def negative_labels(labels: Tensor, seed: int = 0) -> Tensor:
    """``labels`` with one random digit per row replaced by a different random digit."""
    g = torch.Generator().manual_seed(seed)
    out = labels.clone()
    which = torch.randint(0, labels.shape[1], (labels.shape[0],), generator=g)
    shift = torch.randint(1, 10, (labels.shape[0],), generator=g)
    rows = torch.arange(labels.shape[0])
    out[rows, which] = (out[rows, which] + shift) % 10
    return out
