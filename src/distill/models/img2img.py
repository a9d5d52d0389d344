"""A small pix2pix-style image-to-image family: a U-Net generator and a PatchGAN discriminator.

After Isola et al., "Image-to-Image Translation with Conditional Adversarial Networks" (pix2pix,
CVPR 2017, arXiv 1611.07004), scaled down to 28x28 / 32x32 images:

* :class:`UNetImg2Img`: ``depth`` encoder levels (4x4 conv, stride 2, BatchNorm except the first,
  LeakyReLU 0.2), the mirrored decoder (4x4 transposed conv, stride 2, BatchNorm, ReLU) with a skip
  connection (channel concatenation) from the encoder level of the same resolution, and a 1x1 conv to
  ``out_channels``. pix2pix ends in ``tanh`` on images in [-1, 1]; our images are in [0, 1] and the
  output is ``sigmoid`` (``sigmoid(2a) = (tanh(a) + 1) / 2``: the same map up to an affine change of
  units). Inputs whose sides are not multiples of ``2**depth`` are zero-padded (centred) and the output
  cropped back, so 28x28 works at any depth. Width doubles per level, capped at ``8 * width``.
* :class:`PatchDiscriminator`: pix2pix's PatchGAN on the channel concatenation of source and
  (real or generated) target, 4x4 convs with stride 2 (``layers`` of them) then a stride-1 4x4 conv
  and a 1-channel 4x4 conv: a ``(B, 1, h, w)`` map of patch logits.

Tap points (``nn.Identity``) of the U-Net: ``"down{i}"`` the encoder map of level ``i`` (1-based,
``(B, C_i, H/2^i, W/2^i)``), ``"up{i}"`` the decoder map at level ``i`` (before the skip concatenation
of the next level, ``(B, C, H/2^(i-1), W/2^(i-1))`` for ``i`` from ``depth`` down to 1), ``"out"`` the
output image ``(B, out_channels, H, W)`` (also the model's output: the view's ``"logits"``).

Zoo: ``unet_img2img`` (any size), ``unet_img2img_teacher`` (width 32, depth 3, 394 k parameters),
``unet_img2img_student`` (width 8, depth 3, 25 k parameters), ``patchgan``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.models.registry import register_model

__all__ = ["PatchDiscriminator", "UNetImg2Img", "patchgan", "unet_img2img", "unet_img2img_student",
           "unet_img2img_teacher"]


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}")
    return value


class UNetImg2Img(nn.Module):
    """pix2pix U-Net: ``(B, in_channels, H, W)`` in [0, 1] -> ``(B, out_channels, H, W)`` in (0, 1).

    Args:
        in_channels: source image channels.
        out_channels: target image channels.
        width: channels of the first encoder level (doubled per level, capped at ``8 * width``).
        depth: encoder (and decoder) levels, each halving (doubling) the resolution.
        dropout: dropout after the innermost decoder levels' ReLU (pix2pix's noise; 0 switches it off).
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, width: int = 32, depth: int = 3,
                 dropout: float = 0.0) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("width", width),
                            ("depth", depth)):
            _positive_int(name, value)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {dropout!r}")
        self.depth = depth
        chans = [min(width * 2**i, width * 8) for i in range(depth)]
        self.down = nn.ModuleList()
        cin = in_channels
        for i, c in enumerate(chans):
            layers: list[nn.Module] = [nn.Conv2d(cin, c, 4, stride=2, padding=1, bias=i == 0)]
            if i > 0:
                layers.append(nn.BatchNorm2d(c))
            layers.append(nn.LeakyReLU(0.2))
            self.down.append(nn.Sequential(*layers))
            cin = c
        self.up = nn.ModuleList()
        for i in reversed(range(depth)):  # decoder level i+1 maps to the resolution of encoder level i
            c_in = chans[i] if i == depth - 1 else 2 * chans[i]
            c_out = chans[i - 1] if i > 0 else width
            layers = [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out),
                      nn.ReLU()]
            if dropout > 0 and i >= depth - 2:
                layers.append(nn.Dropout(dropout))
            self.up.append(nn.Sequential(*layers))
        self.head = nn.Conv2d(width, out_channels, 1)
        for i in range(1, depth + 1):
            self.add_module(f"down{i}", nn.Identity())
            self.add_module(f"up{i}", nn.Identity())
        self.out = nn.Identity()

    @property
    def tap_points(self) -> tuple[str, ...]:
        return (*(f"down{i}" for i in range(1, self.depth + 1)), *(f"up{i}" for i in range(self.depth, 0, -1)),
                "out")

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"UNetImg2Img expects (B, C, H, W) images; got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        m = 2**self.depth
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        skips = []
        for i, block in enumerate(self.down):
            x = getattr(self, f"down{i + 1}")(block(x))
            skips.append(x)
        for j, block in enumerate(self.up):
            level = self.depth - j
            if j > 0:
                x = torch.cat([x, skips[level - 1]], dim=1)
            x = getattr(self, f"up{level}")(block(x))
        y = torch.sigmoid(self.head(x))
        if ph or pw:
            y = y[..., ph // 2: ph // 2 + h, pw // 2: pw // 2 + w]
        return self.out(y)


class PatchDiscriminator(nn.Module):
    """pix2pix's PatchGAN: ``(source, target)`` -> patch logits ``(B, 1, h, w)``.

    Args:
        in_channels: source channels + target channels (the two are concatenated).
        width: channels of the first conv (doubled per layer, capped at ``8 * width``).
        layers: stride-2 convs (pix2pix's 70x70 PatchGAN has 3; 2 suits 28x28 images).
    """

    def __init__(self, in_channels: int = 2, width: int = 32, layers: int = 2) -> None:
        super().__init__()
        _positive_int("in_channels", in_channels)
        _positive_int("width", width)
        _positive_int("layers", layers)
        mods: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        c = width
        for i in range(1, layers + 1):
            c_next = min(width * 2**i, width * 8)
            stride = 2 if i < layers else 1
            mods += [nn.Conv2d(c, c_next, 4, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_next),
                     nn.LeakyReLU(0.2)]
            c = c_next
        mods.append(nn.Conv2d(c, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*mods)

    def forward(self, source: Tensor, target: Tensor) -> Tensor:
        if source.shape[0] != target.shape[0] or source.shape[-2:] != target.shape[-2:]:
            raise ValueError(f"PatchDiscriminator: source {tuple(source.shape)} and target {tuple(target.shape)} "
                             "must share batch size and spatial size")
        return self.net(torch.cat([source, target], dim=1))


@register_model("unet_img2img")
def unet_img2img(channels: int = 1, width: int = 32, depth: int = 3, out_channels: int | None = None,
                 dropout: float = 0.0) -> UNetImg2Img:
    """A pix2pix U-Net with ``channels`` in (and out, unless ``out_channels``), ``width``, ``depth``."""
    return UNetImg2Img(channels, channels if out_channels is None else out_channels, width, depth, dropout)


@register_model("unet_img2img_teacher")
def unet_img2img_teacher(channels: int = 1) -> UNetImg2Img:
    """The image-to-image teacher: U-Net width 32, depth 3."""
    return UNetImg2Img(channels, channels, 32, 3)


@register_model("unet_img2img_student")
def unet_img2img_student(channels: int = 1) -> UNetImg2Img:
    """The image-to-image student: U-Net width 8, depth 3 (1/4 of the teacher's channels)."""
    return UNetImg2Img(channels, channels, 8, 3)


@register_model("patchgan")
def patchgan(channels: int = 1, width: int = 32, layers: int = 2) -> PatchDiscriminator:
    """pix2pix's PatchGAN for ``channels``-channel source and target images (``2 * channels`` in)."""
    return PatchDiscriminator(2 * channels, width, layers)
