"""A per-class picture of a synthetic set: one row per class, that class's images side by side.

:func:`class_grid` builds the picture as an array; :func:`save_class_grid` writes it as a PNG with
matplotlib when it is installed (class names down the side), else with a small PNG encoder of
our own (zlib, no dependency): the same pixels without the labels.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["class_grid", "png_bytes", "save_class_grid"]


def class_grid(images: Tensor, labels: Tensor, num_classes: int, *, per_class: int = 10,
               mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
               pad: int = 1) -> np.ndarray:
    """Images ``(N, C, H, W)`` (normalised with ``mean``/``std`` per channel, or already in [0, 1])
    and labels ``(N,)`` (or soft ``(N, K)``: their argmax) -> uint8 picture ``(rows, cols, 3)``.

    Row ``k`` holds the first ``per_class`` images of class ``k`` (blank cells when it has fewer),
    each ``H x W`` with ``pad`` pixels of border. One-channel images are shown as grey.
    """
    if images.dim() != 4:
        raise ValueError(f"class_grid: images must be (N, C, H, W); got {tuple(images.shape)}")
    if num_classes < 1 or per_class < 1:
        raise ValueError(f"class_grid: num_classes and per_class must be >= 1; got {num_classes}, {per_class}")
    x = images.detach().float().cpu()
    c, h, w = x.shape[1:]
    if mean is not None and std is not None:
        x = x * torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1) + torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    x = x.clamp(0, 1)
    if c == 1:
        x = x.expand(-1, 3, -1, -1)
    elif c != 3:
        x = x[:, :1].expand(-1, 3, -1, -1)  # other channel counts: the first channel, as grey
    y = labels.argmax(1) if labels.dim() == 2 else labels
    cols = max(1, min(per_class, max((int((y == k).sum()) for k in range(num_classes)), default=1)))
    out = np.full((num_classes * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for k in range(num_classes):
        for j, i in enumerate(torch.nonzero(y == k).flatten()[:cols].tolist()):
            top, left = pad + k * (h + pad), pad + j * (w + pad)
            out[top:top + h, left:left + w] = (x[i].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    return out


def png_bytes(picture: np.ndarray) -> bytes:
    """An 8-bit RGB PNG of ``picture`` ``(H, W, 3)`` uint8 (filter 0 on every row, zlib level 9)."""
    if picture.dtype != np.uint8 or picture.ndim != 3 or picture.shape[2] != 3:
        raise ValueError(f"png_bytes: picture must be uint8 (H, W, 3); got {picture.dtype} {picture.shape}")
    height, width = picture.shape[:2]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = b"".join(b"\x00" + picture[r].tobytes() for r in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, truecolour, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b"")


def save_class_grid(path: str | os.PathLike[str], images: Tensor, labels: Tensor, num_classes: int, *,
                    per_class: int = 10, mean: tuple[float, ...] | None = None,
                    std: tuple[float, ...] | None = None, title: str | None = None) -> Path:
    """Write :func:`class_grid` as a PNG at ``path`` (atomically); returns the path."""
    from distill.files import atomic_write, atomic_write_bytes

    picture = class_grid(images, labels, num_classes, per_class=per_class, mean=mean, std=std)
    path = Path(path)
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return atomic_write_bytes(path, png_bytes(picture))
    h, w = picture.shape[:2]
    scale = max(1.0, 400.0 / max(h, w))
    fig = Figure(figsize=(max(3.2, w * scale / 100 + 0.6), h * scale / 100 + (0.4 if title else 0.1)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(picture, interpolation="nearest")
    cell = (h - 1) / num_classes
    ax.set_yticks([cell * (k + 0.5) for k in range(num_classes)], [str(k) for k in range(num_classes)])
    ax.set_xticks([])
    ax.set_ylabel("class")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return atomic_write(path, lambda f: fig.savefig(f, format="png"))
