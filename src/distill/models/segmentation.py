"""A small DeepLab-style semantic segmenter (conv backbone at output stride 4 + a small ASPP).

The shape follows DeepLabv3 (Chen et al., "Rethinking Atrous Convolution for Semantic Image
Segmentation", 2017, arXiv 1706.05587): a backbone whose last stage keeps its resolution and
dilates its convolutions instead of striding, then Atrous Spatial Pyramid Pooling (a 1x1 conv,
3x3 convs at several atrous rates, and an image-level pooled branch, concatenated and projected
by a 1x1 conv), then a 1x1 classifier. The pixel-wise cross-entropy it trains with is FCN's
(Long et al. 2015, arXiv 1411.4038), :func:`seg_cross_entropy` here, the ``seg_ce`` method.

Scaled for 64x64 / 96x96 scenes on a CPU (ours, not the paper's): three stages (stride 2, 2,
then 1 with dilation 2), output stride 4 (DeepLabv3 uses 16 or 8 on 513x513 crops); ASPP rates
``(1, 2, 3)`` instead of ``(6, 12, 18)``, because the feature map is 16x16 here, not 33x33.

Output: ``model(x)`` returns ``{"logits": (B, K, H/4, W/4)}`` (``ceil`` for odd sizes), the
logits at the feature resolution. Losses and the evaluator upsample them bilinearly to the mask
size (DeepLab computes its loss on upsampled logits, not downsampled labels).

Taps (``nn.Identity`` points, hook them by name):

* ``"backbone_out.0"``, ``"backbone_out.1"``, ``"backbone_out.2"``: the stage outputs,
  ``(B, w0, H/2, W/2)``, ``(B, w1, H/4, W/4)``, ``(B, w2, H/4, W/4)`` (post-ReLU).
* ``"feat"``: the ASPP projection, the last feature map before the classifier, ``(B, C, H/4, W/4)``.
* ``"logits_map"``: the class scores ``(B, K, H/4, W/4)`` (the same tensor as ``"logits"``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.models.registry import register_model

__all__ = ["ASPP", "SegNet", "seg_cross_entropy", "seg_student", "seg_teacher", "upsample_logits"]

IGNORE_INDEX = 255


def _conv_bn_relu(cin: int, cout: int, k: int = 3, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (k // 2)
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride=stride, padding=pad, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU())


class ASPP(nn.Module):
    """Atrous Spatial Pyramid Pooling (DeepLabv3, arXiv 1706.05587, Sec. 3.3).

    Branches on ``x`` ``(B, Cin, h, w)``: a 1x1 conv, one 3x3 conv per rate in ``rates`` (dilated),
    and the image-level branch (global average pool → 1x1 conv → BN → ReLU → broadcast back to
    ``h x w``); each branch gives ``channels`` maps. Their concatenation
    ``(B, (2 + len(rates))·channels, h, w)`` is projected by 1x1 conv-BN-ReLU to ``(B, channels, h, w)``.
    The paper's image-level branch upsamples bilinearly; a 1x1 map upsampled is a broadcast.
    """

    def __init__(self, in_channels: int, channels: int, rates: Sequence[int]) -> None:
        super().__init__()
        rates = [int(r) for r in rates]
        if not rates or any(r < 1 for r in rates):
            raise ValueError(f"ASPP rates must be a non-empty list of ints >= 1, got {rates!r}")
        self.branches = nn.ModuleList([_conv_bn_relu(in_channels, channels, k=1)]
                                      + [_conv_bn_relu(in_channels, channels, k=3, dilation=r) for r in rates])
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, channels, 1, bias=False),
                                        nn.BatchNorm2d(channels), nn.ReLU())
        self.project = _conv_bn_relu((len(rates) + 2) * channels, channels, k=1)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        parts = [b(x) for b in self.branches]
        parts.append(self.image_pool(x).expand(-1, -1, h, w))
        return self.project(torch.cat(parts, dim=1))


class SegNet(nn.Module):
    """DeepLab-lite: 3-stage conv backbone (output stride 4) → ASPP → 1x1 classifier.

    Args:
        num_classes: classes ``K`` (the scene sets use 11: background + 10 object classes).
        in_channels: image channels ``C`` of ``(B, C, H, W)`` inputs (``H, W >= 8``).
        widths: channels of the three backbone stages. Stage 0: two 3x3 convs, the first with
            stride 2; stage 1: two 3x3 convs, the first with stride 2; stage 2: two 3x3 convs with
            dilation 2 and stride 1 (DeepLab's atrous last stage).
        aspp_channels: the ASPP branch and projection width ``C`` (the ``"feat"`` tap's channels).
        rates: ASPP atrous rates.
        dropout: dropout before the classifier (DeepLabv3's head has none; 0 by default).

    ``forward(x)`` → ``{"logits": (B, K, ceil(H/4), ceil(W/4))}``. See the module docstring for taps.
    """

    def __init__(self, num_classes: int = 11, in_channels: int = 1, widths: Sequence[int] = (32, 64, 96),
                 aspp_channels: int = 64, rates: Sequence[int] = (1, 2, 3), dropout: float = 0.0) -> None:
        super().__init__()
        widths = [int(w) for w in widths]
        if len(widths) != 3 or any(w < 1 for w in widths):
            raise ValueError(f"widths must be three positive ints (one per stage), got {widths!r}")
        for name, v in (("num_classes", num_classes), ("in_channels", in_channels), ("aspp_channels", aspp_channels)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.stages = nn.ModuleList([
            nn.Sequential(_conv_bn_relu(in_channels, widths[0], stride=2), _conv_bn_relu(widths[0], widths[0])),
            nn.Sequential(_conv_bn_relu(widths[0], widths[1], stride=2), _conv_bn_relu(widths[1], widths[1])),
            nn.Sequential(_conv_bn_relu(widths[1], widths[2], dilation=2), _conv_bn_relu(widths[2], widths[2], dilation=2)),
        ])
        self.backbone_out = nn.ModuleList([nn.Identity() for _ in widths])
        self.aspp = ASPP(widths[2], aspp_channels, rates)
        self.feat = nn.Identity()
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(aspp_channels, num_classes, 1)
        self.logits_map = nn.Identity()

    @property
    def tap_points(self) -> tuple[str, ...]:
        return (*(f"backbone_out.{i}" for i in range(len(self.stages))), "feat", "logits_map")

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"SegNet expects images (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        for stage, tap in zip(self.stages, self.backbone_out):
            x = tap(stage(x))
        feat = self.feat(self.aspp(x))
        return {"logits": self.logits_map(self.classifier(self.dropout(feat)))}


def upsample_logits(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear upsampling of ``(B, K, h, w)`` logits to ``size = (H, W)`` (``align_corners=False``);
    the tensor itself when it already has that size."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def seg_cross_entropy(logits: Tensor, masks: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    r"""Pixel-wise cross-entropy of FCN (Long et al., "Fully Convolutional Networks for Semantic
    Segmentation", 2015, arXiv 1411.4038), on logits upsampled to the mask.

    .. math:: L = \frac{1}{|\Omega|} \sum_{p \in \Omega} -\log \mathrm{softmax}(\mathrm{up}(z)_p)_{y_p},
              \quad \Omega = \{p : y_p \ne \text{ignore}\}

    ``logits`` ``(B, K, h, w)``; ``masks`` ``(B, H, W)`` long in ``[0, K)`` or ``ignore_index``;
    ``up`` is bilinear upsampling to ``(H, W)``. Returns the mean over labelled pixels (a scalar);
    0 (with a gradient path) when every pixel is ignored. FCN sums the per-pixel loss ("the sum
    over the spatial dimensions of the final layer"); we average it, as DeepLab and common
    implementations do, which divides the gradient by ``|Ω|`` (rescale ``weight`` to recover a sum).
    """
    if logits.dim() != 4:
        raise ValueError(f"seg_cross_entropy expects logits (B, K, h, w), got {tuple(logits.shape)}")
    if masks.dim() != 3 or masks.shape[0] != logits.shape[0]:
        raise ValueError(f"seg_cross_entropy expects masks (B, H, W) with B = {logits.shape[0]}, got {tuple(masks.shape)}")
    if masks.dtype not in (torch.long, torch.int32, torch.int64, torch.uint8, torch.int16):
        raise ValueError(f"seg_cross_entropy expects integer masks, got {masks.dtype}")
    masks = masks.long()
    k = logits.shape[1]
    bad = (masks != ignore_index) & ((masks < 0) | (masks >= k))
    if bool(bad.any()):
        raise ValueError(f"mask values must be in [0, {k}) or {ignore_index} (ignored); found "
                         f"{sorted(set(masks[bad].unique().tolist()))[:5]}")
    up = upsample_logits(logits, tuple(masks.shape[-2:]))
    if not bool((masks != ignore_index).any()):
        return up.sum() * 0.0
    return F.cross_entropy(up, masks, ignore_index=ignore_index)


@register_model("seg_teacher")
def seg_teacher(num_classes: int = 11, in_channels: int = 1, **kwargs) -> SegNet:
    """The scene-segmentation teacher: widths (32, 64, 96), ASPP 64 channels (≈0.4 M parameters)."""
    return SegNet(num_classes, in_channels, **{"widths": (32, 64, 96), "aspp_channels": 64, **kwargs})


@register_model("seg_student")
def seg_student(num_classes: int = 11, in_channels: int = 1, **kwargs) -> SegNet:
    """The scene-segmentation student: widths (8, 16, 32), ASPP 16 channels (≈30 k parameters)."""
    return SegNet(num_classes, in_channels, **{"widths": (8, 16, 32), "aspp_channels": 16, **kwargs})
