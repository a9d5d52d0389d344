"""Dense targets from labelled images: a pose-style keypoint task on real data.

Dense-output methods (OKDHP, :func:`distill.strategies.online.fit_okdhp`) learn target maps
``(B, C, H, W)``, as pose estimators learn one Gaussian heatmap per joint. :func:`class_heatmaps`
derives such maps from any labelled image set without new annotation: the "keypoint" of an
image is the centre of mass of its ink, and the channel it lives in is the image's class, so a
model must both find the digit and say which one it is. A recipe opts in with
``data: {targets: class_heatmaps, heatmap_sigma: 1.0}`` (:func:`distill.runner.build_data`).

The maps are computed once from the un-augmented images and held in memory beside them:
``N·K·H·W`` floats (1,347 digits: 3.4 MB; all 60,000 MNIST images: 1.9 GB, so use
``data.train_subset`` there). Augmentations that move pixels would leave the maps behind, so a
recipe refuses them with dense targets.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["TARGET_KINDS", "class_heatmaps", "ink_centres"]

TARGET_KINDS = ("labels", "class_heatmaps")
"""What a recipe's batches carry as ``targets``: class ``labels`` ``(B,)`` or ``class_heatmaps`` ``(B, K, H, W)``."""


def _check_images(images: Tensor, who: str) -> None:
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
        got = f"shape {tuple(images.shape)} {images.dtype}" if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{who} expects float images (N, C, H, W) with pixel intensities >= 0, got {got}")


def ink_centres(images: Tensor) -> Tensor:
    r"""The centre of mass of each image's ink, in pixel coordinates.

    .. math:: r_n = \frac{\sum_{h,w} h\, m_{nhw}}{\sum_{h,w} m_{nhw}}, \quad
              c_n = \frac{\sum_{h,w} w\, m_{nhw}}{\sum_{h,w} m_{nhw}}, \quad
              m_{nhw} = \sum_{k} \max(x_{nkhw}, 0)

    ``images`` (N, C, H, W): pixel intensities with 0 as the background (e.g. [0, 1] pixels,
    not normalised ones) → (N, 2) float ``(row, col)``; pixel ``(h, w)`` has its centre at
    ``(h, w)``. Raises ``ValueError`` naming the first image with no ink (its centre is undefined).
    """
    _check_images(images, "ink_centres")
    mass = images.clamp_min(0).sum(dim=1)  # (N, H, W)
    total = mass.sum(dim=(1, 2))  # (N,)
    empty = (total <= 0).nonzero()
    if len(empty):
        raise ValueError(f"ink_centres: image {int(empty[0])} has no ink (no pixel > 0): pass pixel intensities "
                         "with 0 as the background, not normalised images")
    h, w = mass.shape[1:]
    rows = torch.arange(h, dtype=mass.dtype, device=mass.device)
    cols = torch.arange(w, dtype=mass.dtype, device=mass.device)
    r = (mass.sum(dim=2) * rows).sum(dim=1) / total
    c = (mass.sum(dim=1) * cols).sum(dim=1) / total
    return torch.stack([r, c], dim=1)


def class_heatmaps(images: Tensor, labels: Tensor, num_classes: int, *, sigma: float = 1.0,
                   size: tuple[int, int] | None = None) -> Tensor:
    r"""Pose-style target maps: one Gaussian per image, at its ink centre, in its class's channel.

    .. math:: H_{n,k,i,j} = [k = y_n]\, \exp\!\Big(-\frac{(i - r_n)^2 + (j - c_n)^2}{2\sigma^2}\Big)

    with ``(r_n, c_n)`` the ink centre of image n (:func:`ink_centres`), scaled to the map's grid
    when ``size`` differs from the image's (pixel centres aligned: ``r' = (r + ½)·H'/H − ½``).

    Args:
        images: ``(N, C, H, W)`` pixel intensities with 0 as the background ([0, 1] pixels).
        labels: ``(N,)`` integer classes in ``[0, num_classes)``.
        num_classes: K, the number of channels.
        sigma: the Gaussian's standard deviation in map pixels (1.0 suits 8x8 maps; HRNet /
            SimpleBaseline, whose heatmap code OKDHP uses, take 2 on 64x48 maps).
        size: ``(H', W')`` of the maps (default: the images' ``(H, W)``).

    Returns:
        ``(N, K, H', W')`` float maps in [0, 1], zero outside the label's channel.

    As the pose code, the peak is 1 (not a normalised density). Unlike it, the centre is kept at
    sub-pixel precision (the pose code rounds the joint to the nearest pixel) and the Gaussian is
    not cut off at 3σ: both matter on maps only 8 pixels wide.
    """
    _check_images(images, "class_heatmaps")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"class_heatmaps: num_classes must be an integer >= 1, got {num_classes!r}")
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0:
        raise ValueError(f"class_heatmaps: sigma must be a number > 0, got {sigma!r}")
    if not isinstance(labels, Tensor) or labels.shape != images.shape[:1] or labels.is_floating_point():
        got = f"{tuple(labels.shape)} {labels.dtype}" if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"class_heatmaps: labels must be integer classes ({images.shape[0]},) for the images "
                         f"{tuple(images.shape)}, got {got}")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"class_heatmaps: labels must lie in [0, {num_classes}), got values in "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    h, w = images.shape[2:]
    out_h, out_w = (h, w) if size is None else size
    if min(out_h, out_w) < 1:
        raise ValueError(f"class_heatmaps: size must be positive (H, W), got {size!r}")
    centre = ink_centres(images)
    r = (centre[:, 0] + 0.5) * out_h / h - 0.5
    c = (centre[:, 1] + 0.5) * out_w / w - 0.5
    rows = torch.arange(out_h, dtype=images.dtype, device=images.device)
    cols = torch.arange(out_w, dtype=images.dtype, device=images.device)
    d2 = (rows[None, :, None] - r[:, None, None]) ** 2 + (cols[None, None, :] - c[:, None, None]) ** 2
    blob = torch.exp(-d2 / (2.0 * float(sigma) ** 2))  # (N, H', W')
    onehot = torch.nn.functional.one_hot(labels.long(), num_classes).to(images.dtype)  # (N, K)
    return onehot[:, :, None, None] * blob[:, None]
