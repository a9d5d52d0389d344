"""Paired image-to-image tasks built from real MNIST / Fashion-MNIST images (nothing downloaded).

Two tasks, each a deterministic function of a real image ``x`` in [0, 1], ``(N, 1, 28, 28)``:

* ``"thicken"``: ``x -> dilate(x)``, a grey-scale morphological dilation with a ``size x size``
  square (a stride-1 max-pool, zero-padded): every pixel becomes the maximum of its neighbourhood,
  strokes grow by ``(size - 1) / 2`` pixels on each side.
* ``"edges2image"``: ``edges(x) -> x``, where ``edges(x) = 1[|Sobel(x)| > threshold]`` is the
  binarised Sobel gradient magnitude ``sqrt(Gx^2 + Gy^2)`` (3x3 Sobel kernels, zero padding); the
  model must fill in the strokes' (or garments') interior and texture from their outline, pix2pix's
  edges -> photo task in miniature.

:func:`img2img_pairs` loads a split, takes a deterministic subset (a seeded permutation) and returns
``(source, target)``, both ``(N, 1, 28, 28)`` float in [0, 1].
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["IMG2IMG_TASKS", "dilate", "img2img_pairs", "make_pairs", "sobel_edges"]

IMG2IMG_TASKS = ("thicken", "edges2image")


def _check_images(images: Tensor, who: str) -> None:
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"{who}: images must be a float tensor (N, C, H, W); got "
                         f"{getattr(images, 'shape', type(images).__name__)}")


def dilate(images: Tensor, size: int = 3) -> Tensor:
    """Grey-scale dilation by a ``size x size`` square: ``y[i, j] = max_{|di|,|dj| <= size//2} x[i+di, j+dj]``.

    Args:
        images: ``(N, C, H, W)`` float, non-negative (outside the image counts as 0).
        size: odd side of the square structuring element (1 returns the images unchanged).
    Returns: ``(N, C, H, W)``.
    """
    _check_images(images, "dilate")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size % 2 == 0:
        raise ValueError(f"dilate: size must be an odd positive int; got {size!r}")
    return F.max_pool2d(images, size, stride=1, padding=size // 2)


def sobel_edges(images: Tensor, threshold: float = 0.5) -> Tensor:
    """Binary edge map ``1[sqrt(Gx^2 + Gy^2) > threshold]`` per channel, Sobel kernels with zero padding.

    ``Gx = [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]] * x`` (cross-correlation), ``Gy`` its transpose.

    Args:
        images: ``(N, C, H, W)`` float in [0, 1].
        threshold: on the gradient magnitude (which is at most ``4 * sqrt(2)`` for images in [0, 1]).
    Returns: ``(N, C, H, W)`` float in {0, 1}.
    """
    _check_images(images, "sobel_edges")
    if not threshold >= 0:
        raise ValueError(f"sobel_edges: threshold must be >= 0; got {threshold!r}")
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=images.dtype,
                      device=images.device)
    c = images.shape[1]
    weight = torch.stack([kx, kx.t()])[:, None].repeat(c, 1, 1, 1)  # (2C, 1, 3, 3): gx, gy per channel
    g = F.conv2d(images, weight, padding=1, groups=c).unflatten(1, (c, 2))
    return (g.pow(2).sum(2).sqrt() > threshold).to(images.dtype)


def make_pairs(images: Tensor, task: str = "edges2image", dilation: int = 3,
               edge_threshold: float = 0.5) -> tuple[Tensor, Tensor]:
    """``(source, target)`` of ``task`` for images ``(N, C, H, W)`` in [0, 1] (see the module docstring)."""
    if task == "thicken":
        return images, dilate(images, dilation)
    if task == "edges2image":
        return sobel_edges(images, edge_threshold), images
    raise ValueError(f"unknown image-to-image task {task!r}; expected one of {IMG2IMG_TASKS}")


def img2img_pairs(task: str = "edges2image", dataset: str = "fashion_mnist", split: str = "train",
                  limit: int | None = None, seed: int = 0, root: str | os.PathLike[str] | None = None,
                  dilation: int = 3, edge_threshold: float = 0.5) -> tuple[Tensor, Tensor]:
    """Pairs of ``task`` from the real ``dataset`` (``"mnist"`` or ``"fashion_mnist"``) ``split``.

    Args:
        task: ``"thicken"`` or ``"edges2image"``.
        dataset: which images (MNIST from ``root`` or the project's default directory; Fashion-MNIST
            from ``root`` or the Debian package's directory).
        split: ``"train"`` or ``"test"``.
        limit: keep the first ``limit`` images of a permutation seeded by ``seed`` (all when None).
    Returns: ``(source, target)``, each ``(N, 1, 28, 28)`` float in [0, 1].
    """
    from distill.data.sources import _default_mnist_root, load_fashion_mnist, load_mnist

    if task not in IMG2IMG_TASKS:
        raise ValueError(f"unknown image-to-image task {task!r}; expected one of {IMG2IMG_TASKS}")
    if dataset == "mnist":
        images, _ = load_mnist(Path(root) if root is not None else _default_mnist_root(), split)
    elif dataset == "fashion_mnist":
        images, _ = load_fashion_mnist(root, split)
    else:
        raise ValueError(f"img2img_pairs: dataset must be 'mnist' or 'fashion_mnist'; got {dataset!r}")
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"img2img_pairs: limit must be a positive int or None; got {limit!r}")
        order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))
        images = images[order[:limit]]
    return make_pairs(images.float(), task, dilation, edge_threshold)
