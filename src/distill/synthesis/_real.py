"""The real data set a "dataset" synthesizer condenses: its checks, per-class indices and the
initial synthetic images drawn from it."""

from __future__ import annotations

import torch
from torch import Tensor

from distill.synthesis._checks import check_int

__all__ = ["check_real_set", "class_indices", "init_images"]


def check_real_set(images: Tensor, labels: Tensor, ipc: int | None, num_classes: int, who: str,
                   *, min_classes: int = 1) -> None:
    """Raise a ValueError naming ``who`` unless ``images`` is a float ``(N, C, H, W)`` tensor,
    ``labels`` int class indices ``(N,)`` in ``[0, num_classes)``, ``ipc`` an int >= 1 (None: not
    checked) and ``num_classes`` an int >= ``min_classes``."""
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{who}: images must be a float tensor (N, C, H, W); got {got}")
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.is_floating_point() \
            or labels.shape[0] != images.shape[0]:
        got = (tuple(labels.shape), labels.dtype) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"{who}: labels must be integer class indices (N,) matching the {images.shape[0]} images; "
                         f"got {got}")
    if ipc is not None:
        check_int("ipc", ipc, who=who)
    check_int("num_classes", num_classes, min_classes, who=who)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"{who}: labels must lie in [0, {num_classes - 1}] (num_classes={num_classes}); got "
                         f"[{int(labels.min())}, {int(labels.max())}]")


def class_indices(labels: Tensor, num_classes: int, ipc: int, who: str, *, minimum: int | None = None) -> list[Tensor]:
    """Per class ``c < num_classes``, the indices ``(n_c,)`` of its samples in ``labels (N,)``;
    a ValueError naming ``who`` when a class has fewer than ``minimum`` (default: ``ipc``)."""
    need = ipc if minimum is None else minimum
    out = []
    for c in range(num_classes):
        idx = torch.nonzero(labels == c).flatten()
        if idx.numel() < need:
            wanted = f"ipc={ipc}" if need == ipc else f"the {need} needed (ipc={ipc})"
            raise ValueError(f"{who}: class {c} has {idx.numel()} samples, fewer than {wanted}")
        out.append(idx)
    return out


def init_images(images: Tensor, per_class: list[Tensor], ipc: int, init: str, generator: torch.Generator,
                *, noise_per_class: bool = False) -> Tensor:
    """The initial synthetic set ``(K * ipc, C, H, W)``, class-major, in ``images``' dtype.

    ``init="real"``: per class, ``ipc`` of its images ``images[per_class[c]]`` drawn without
    replacement (one ``randperm`` per class, in class order); ``"noise"``: ``N(0, 1)`` noise, one
    draw of all ``K * ipc`` images, or one draw per class with ``noise_per_class`` (the two give
    different numbers from the same generator: callers keep the order they were seeded with).
    """
    shape = images.shape[1:]
    if init == "noise":
        if noise_per_class:
            return torch.cat([torch.randn((ipc, *shape), generator=generator, dtype=images.dtype)
                              for _ in per_class])
        return torch.randn((len(per_class) * ipc, *shape), generator=generator, dtype=images.dtype)
    return torch.cat([images[i[torch.randperm(len(i), generator=generator)[:ipc]]] for i in per_class]).clone()
