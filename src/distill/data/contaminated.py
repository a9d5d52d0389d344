"""A contaminated image set: MNIST digits with a share of Fashion-MNIST images mixed in (the outliers).

The data of Self-Distilled StyleGAN (Mokady et al., "Self-Distilled StyleGAN: Towards Generation from
Internet Photos", SIGGRAPH 2022, arXiv 2202.12211), whose filtering step should remove the outliers. The
same construction as ``benchmarks/generative_stylegan.py`` and ``examples/generative/self_distilled_stylegan.py``
(moved down here so that the generative recipe runner reads it from the library). Local files only.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["contaminated_mnist"]


def contaminated_mnist(size: int, outlier_fraction: float = 0.1, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``size`` training images ``(size, 1, 28, 28)`` in [0, 1] and a bool mask ``(size,)`` of the outliers.

    ``round(size * outlier_fraction)`` images are Fashion-MNIST training images (the outliers), the rest MNIST
    training images; both drawn by a permutation of a generator seeded with ``seed`` (MNIST first, then
    Fashion-MNIST, then the shuffle of the union, in that order).
    """
    from distill.data.sources import _default_mnist_root, load_fashion_mnist, load_mnist

    if isinstance(size, bool) or not isinstance(size, int) or size < 2:
        raise ValueError(f"contaminated_mnist: size must be an int >= 2; got {size!r}")
    if not 0 <= outlier_fraction < 1:
        raise ValueError(f"contaminated_mnist: outlier_fraction must be in [0, 1); got {outlier_fraction!r}")
    g = torch.Generator().manual_seed(seed)
    mnist, _ = load_mnist(_default_mnist_root(), "train")
    fashion, _ = load_fashion_mnist(split="train")
    n_out = round(size * outlier_fraction)
    inliers = mnist[torch.randperm(len(mnist), generator=g)[:size - n_out]]
    outliers = fashion[torch.randperm(len(fashion), generator=g)[:n_out]]
    images = torch.cat([inliers, outliers])
    is_outlier = torch.cat([torch.zeros(len(inliers), dtype=torch.bool), torch.ones(n_out, dtype=torch.bool)])
    perm = torch.randperm(len(images), generator=g)
    return images[perm], is_outlier[perm]
