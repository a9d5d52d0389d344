"""A small StyleGAN2-like generator and discriminator for 28×28 / 32×32 images (issue 16's GAN teachers).

The layout follows StyleGAN2 (Karras et al., "Analyzing and Improving the Image Quality of
StyleGAN", CVPR 2020, arXiv 1912.04958), scaled down to what trains on MNIST on a CPU:

* a **mapping network** ``z (B, z_dim)`` [+ conditioning ``c (B, c_dim)``] -> ``w (B, w_dim)``:
  second-moment normalisation of ``z`` (and of the embedded ``c``), then ``layers`` fully
  connected layers with leaky ReLU; a running average ``w_avg`` of ``w`` (updated in training
  mode, β = 0.995 as StyleGAN2) for the truncation trick ``w' = w_avg + ψ (w − w_avg)``;
* a **synthesis network**: a learned constant at the start resolution (7 for 28×28, 4 for
  32×32), then per resolution a block of modulated 3×3 convolutions with weight demodulation,
  per-pixel noise and leaky ReLU (two per block, one at the start resolution), and a
  ``toRGB`` 1×1 modulated convolution whose outputs are summed across resolutions (StyleGAN2's
  "skip" generator). Images come out in ``[-1, 1]`` (tanh on the summed RGB, a departure: the
  paper leaves the output unbounded and clips at display time; bounded outputs keep tiny GANs
  stable);
* a **discriminator**: residual-free conv blocks halving the resolution down to the start
  resolution, StyleGAN's minibatch standard-deviation channel, a linear layer, and a projection
  term ``<embed(c), h>`` for conditioning (Miyato & Koyama 2018, as StyleGAN2-ADA conditions).

Every weight uses StyleGAN's **equalised learning rate** (Karras et al., "Progressive Growing of
GANs", ICLR 2018, arXiv 1710.10196, Section 4.1, kept by StyleGAN2): stored at unit scale
(``N(0, 1)``) and multiplied at run time by ``1/sqrt(fan_in)``, so that one Adam step is the same
relative change in every layer. Without it StyleGAN2's lr 0.0025 collapsed 2 of 3 seeds of a
600-step MNIST GAN to one image; with it none (``docs/generative.md``). What is left out on purpose:
the mapping network's lr multiplier (0.01 in StyleGAN2), blurred up/down-sampling (FIR filters) and
path-length regularisation. The training loop (non-saturating loss, R1) lives in
:mod:`distill.strategies.gan`.

Tap points (``nn.Identity`` modules, for distillation with :class:`distill.taps.Taps`):
``mapping`` (its output is ``w`` ``(B, w_dim)``), ``synthesis.b{res}`` (the block's feature map
``(B, C_res, res, res)``) and ``synthesis.rgb{res}`` (the running RGB sum at ``res``, before the
final tanh, ``(B, channels, res, res)``); discriminator ``b{res}``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from distill.models.registry import register_model

__all__ = ["EqualConv2d", "EqualLinear", "MappingNetwork", "ModulatedConv2d", "StyleDiscriminator", "StyleGenerator", "SynthesisNetwork",
           "start_resolution", "stylegan_discriminator", "stylegan_mnist", "stylegan_small"]

_LRELU_GAIN = math.sqrt(2.0)


def start_resolution(img_size: int) -> int:
    """The constant's resolution: ``img_size`` halved while it stays even and above 7 (28 -> 7, 32 -> 4)."""
    if img_size < 4:
        raise ValueError(f"img_size must be at least 4, got {img_size}")
    res = img_size
    while res > 7 and res % 2 == 0:
        res //= 2
    if res > 7:
        raise ValueError(f"img_size {img_size} is not (4..7)·2^k: the synthesis network doubles from a 4..7 constant")
    return res


def _normalize_2nd_moment(x: Tensor, eps: float = 1e-8) -> Tensor:
    return x * (x.square().mean(dim=1, keepdim=True) + eps).rsqrt()


class EqualLinear(nn.Linear):
    """``nn.Linear`` with an equalised learning rate: ``y = x (gain·W)ᵀ + b``, ``W ~ N(0, 1)`` stored,
    ``gain = 1/sqrt(in_features)``; the bias starts at ``bias_init``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bias_init: float = 0.0) -> None:
        self.bias_init = bias_init
        super().__init__(in_features, out_features, bias)
        self.gain = 1.0 / math.sqrt(in_features)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight)
        if self.bias is not None:
            nn.init.constant_(self.bias, self.bias_init)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.gain, self.bias)


class EqualConv2d(nn.Conv2d):
    """``nn.Conv2d`` with an equalised learning rate: weight ``N(0, 1)`` stored, scaled at run time by
    ``1/sqrt(in_channels · k · k)``; bias 0."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int = 0) -> None:
        super().__init__(in_channels, out_channels, kernel_size, padding=padding)
        self.gain = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.weight * self.gain, self.bias)


class MappingNetwork(nn.Module):
    """``z (B, z_dim)``, ``c (B, c_dim)`` or ``None`` -> ``w (B, w_dim)``; keeps ``w_avg`` (``(w_dim,)``)."""

    def __init__(self, z_dim: int = 64, w_dim: int = 64, c_dim: int = 0, layers: int = 4,
                 w_avg_beta: float = 0.995) -> None:
        super().__init__()
        self.z_dim, self.w_dim, self.c_dim, self.w_avg_beta = z_dim, w_dim, c_dim, w_avg_beta
        self.embed = EqualLinear(c_dim, w_dim) if c_dim > 0 else None
        dims = [z_dim + (w_dim if c_dim > 0 else 0)] + [w_dim] * layers
        self.fcs = nn.ModuleList(EqualLinear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))
        self.register_buffer("w_avg", torch.zeros(w_dim))

    def forward(self, z: Tensor, c: Tensor | None = None, truncation_psi: float = 1.0,
                w_avg: Tensor | None = None) -> Tensor:
        if z.dim() != 2 or z.shape[1] != self.z_dim:
            raise ValueError(f"z must be (B, {self.z_dim}), got {tuple(z.shape)}")
        x = _normalize_2nd_moment(z)
        if self.embed is not None:
            if c is None or c.shape != (z.shape[0], self.c_dim):
                got = None if c is None else tuple(c.shape)
                raise ValueError(f"this generator is conditional: c must be (B, {self.c_dim}) = "
                                 f"({z.shape[0]}, {self.c_dim}), got {got}")
            x = torch.cat([x, _normalize_2nd_moment(self.embed(c.to(x.dtype)))], dim=1)
        elif c is not None:
            raise ValueError("this generator is unconditional (c_dim=0) but a conditioning c was given")
        for fc in self.fcs:
            x = F.leaky_relu(fc(x), 0.2) * _LRELU_GAIN
        if self.training:
            with torch.no_grad():
                self.w_avg.copy_(x.detach().mean(0).lerp(self.w_avg, self.w_avg_beta))
        if truncation_psi != 1.0:
            centre = self.w_avg if w_avg is None else w_avg
            x = centre + truncation_psi * (x - centre)
        return x


class ModulatedConv2d(nn.Module):
    """StyleGAN2's modulated convolution: the weight scaled per input channel by a style
    ``s = A(w)`` and (``demodulate=True``) renormalised per output channel,
    ``w''_{oik} = s_i w_{oik} / sqrt(Σ_{i,k} (s_i w_{oik})² + ε)``; one grouped convolution per batch."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, w_dim: int,
                 demodulate: bool = True) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.demodulate = demodulate
        # stored at unit scale, used times weight_gain (equalised learning rate)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        self.affine = EqualLinear(w_dim, in_channels, bias_init=1.0)  # styles start at 1, as StyleGAN2

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        b = x.shape[0]
        style = self.affine(w)  # (B, in)
        weight = (self.weight * self.weight_gain).unsqueeze(0) * style[:, None, :, None, None]  # (B, out, in, k, k)
        if self.demodulate:
            weight = weight * (weight.square().sum(dim=(2, 3, 4), keepdim=True) + 1e-8).rsqrt()
        weight = weight.reshape(b * self.out_channels, self.in_channels, self.kernel_size, self.kernel_size)
        out = F.conv2d(x.reshape(1, b * self.in_channels, *x.shape[2:]), weight,
                       padding=self.kernel_size // 2, groups=b)
        return out.reshape(b, self.out_channels, *out.shape[2:])


class _StyleLayer(nn.Module):
    """Modulated 3×3 conv + per-pixel noise (learned strength) + bias + leaky ReLU."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int) -> None:
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, out_channels, 3, w_dim)
        self.noise_strength = nn.Parameter(torch.zeros(()))
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x: Tensor, w: Tensor, noise: str = "random") -> Tensor:
        x = self.conv(x, w)
        if noise == "random":
            x = x + self.noise_strength * torch.randn(x.shape[0], 1, *x.shape[2:], device=x.device, dtype=x.dtype)
        return F.leaky_relu(x + self.bias[None, :, None, None], 0.2) * _LRELU_GAIN


class SynthesisNetwork(nn.Module):
    """``w (B, w_dim)`` (one style for every layer) or ``(B, num_ws, w_dim)`` (one per layer, for
    style mixing) -> images ``(B, channels, img_size, img_size)`` in ``[-1, 1]``."""

    def __init__(self, w_dim: int = 64, channels: int = 1, img_size: int = 28, width: int = 128,
                 min_width: int = 16) -> None:
        super().__init__()
        self.w_dim, self.channels, self.img_size = w_dim, channels, img_size
        start = start_resolution(img_size)
        self.resolutions = [start * 2 ** i for i in range(int(math.log2(img_size // start)) + 1)]
        self.widths = {r: max(min_width, width // 2 ** i) for i, r in enumerate(self.resolutions)}
        self.const = nn.Parameter(torch.randn(width, start, start))
        self.layers = nn.ModuleDict()
        self.to_rgb = nn.ModuleDict()
        self.rgb_bias = nn.ParameterDict()
        prev = width
        for r in self.resolutions:
            c = self.widths[r]
            convs = [_StyleLayer(prev, c, w_dim)] + ([_StyleLayer(c, c, w_dim)] if r != start else [])
            self.layers[str(r)] = nn.ModuleList(convs)
            self.to_rgb[str(r)] = ModulatedConv2d(c, channels, 1, w_dim, demodulate=False)
            self.rgb_bias[str(r)] = nn.Parameter(torch.zeros(channels))
            self.add_module(f"b{r}", nn.Identity())
            self.add_module(f"rgb{r}", nn.Identity())
            prev = c
        # one w per modulated conv plus one per toRGB
        self.num_ws = sum(len(m) for m in self.layers.values()) + len(self.resolutions)

    def forward(self, w: Tensor, noise: str = "random") -> Tensor:
        """``noise``: ``"random"`` (StyleGAN's per-pixel noise) or ``"const"`` (none: deterministic)."""
        if noise not in ("random", "const"):
            raise ValueError(f"noise must be 'random' or 'const', got {noise!r}")
        if w.dim() == 2:
            w = w.unsqueeze(1).expand(-1, self.num_ws, -1)
        if w.dim() != 3 or w.shape[1:] != (self.num_ws, self.w_dim):
            raise ValueError(f"w must be (B, {self.w_dim}) or (B, {self.num_ws}, {self.w_dim}), got {tuple(w.shape)}")
        x = self.const.unsqueeze(0).expand(w.shape[0], -1, -1, -1)
        rgb, k = None, 0
        for r in self.resolutions:
            if r != self.resolutions[0]:
                x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            for layer in self.layers[str(r)]:
                x, k = layer(x, w[:, k], noise), k + 1
            x = getattr(self, f"b{r}")(x)
            y = self.to_rgb[str(r)](x, w[:, k]) + self.rgb_bias[str(r)][None, :, None, None]
            k += 1
            rgb = y if rgb is None else F.interpolate(rgb, scale_factor=2, mode="bilinear", align_corners=False) + y
            rgb = getattr(self, f"rgb{r}")(rgb)
        return torch.tanh(rgb)


class StyleGenerator(nn.Module):
    """Mapping + synthesis. ``forward(z, c=None, truncation_psi=1.0, noise="random")`` -> images
    ``(B, channels, img_size, img_size)`` in ``[-1, 1]``.

    Args:
        z_dim, w_dim: latent sizes. c_dim: conditioning size (0: unconditional; a one-hot label or
            a soft-label vector otherwise). channels, img_size: output images. width: channels at
            the start resolution (halved at each doubling, at least ``min_width``).
        mapping_layers: fully connected layers of the mapping network (StyleGAN2: 8; 4 here).
    """

    def __init__(self, z_dim: int = 64, w_dim: int = 64, c_dim: int = 0, channels: int = 1, img_size: int = 28,
                 width: int = 128, min_width: int = 16, mapping_layers: int = 4) -> None:
        super().__init__()
        self.z_dim, self.w_dim, self.c_dim, self.channels, self.img_size = z_dim, w_dim, c_dim, channels, img_size
        self.mapping = MappingNetwork(z_dim, w_dim, c_dim, mapping_layers)
        self.synthesis = SynthesisNetwork(w_dim, channels, img_size, width, min_width)

    @property
    def w_avg(self) -> Tensor:
        return self.mapping.w_avg

    @property
    def num_ws(self) -> int:
        return self.synthesis.num_ws

    def sample_z(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` latents ``(n, z_dim)`` from N(0, I), on the model's device."""
        device = self.synthesis.const.device
        return torch.randn(n, self.z_dim, generator=generator, device="cpu").to(device)

    def forward(self, z: Tensor, c: Tensor | None = None, truncation_psi: float = 1.0,
                noise: str = "random") -> Tensor:
        return self.synthesis(self.mapping(z, c, truncation_psi), noise)


class StyleDiscriminator(nn.Module):
    """Images ``(B, channels, img_size, img_size)`` (in ``[-1, 1]``) [+ ``c (B, c_dim)``] -> scores ``(B,)``."""

    def __init__(self, channels: int = 1, img_size: int = 28, c_dim: int = 0, width: int = 128,
                 min_width: int = 16, mbstd_group: int = 4) -> None:
        super().__init__()
        self.c_dim, self.mbstd_group = c_dim, mbstd_group
        start = start_resolution(img_size)
        resolutions = [start * 2 ** i for i in range(int(math.log2(img_size // start)) + 1)][::-1]
        widths = {r: max(min_width, width // 2 ** i) for i, r in enumerate(resolutions[::-1])}
        self.from_rgb = EqualConv2d(channels, widths[img_size], 1)
        self.blocks = nn.ModuleDict()
        for hi, lo in zip(resolutions[:-1], resolutions[1:], strict=True):
            self.blocks[str(hi)] = nn.ModuleList([EqualConv2d(widths[hi], widths[hi], 3, padding=1),
                                                  EqualConv2d(widths[hi], widths[lo], 3, padding=1)])
            self.add_module(f"b{hi}", nn.Identity())
        self.resolutions = resolutions
        c = widths[start]
        self.final_conv = EqualConv2d(c + 1, c, 3, padding=1)
        self.fc = EqualLinear(c * start * start, c)
        self.out = EqualLinear(c, 1)
        self.embed = EqualLinear(c_dim, c, bias=False) if c_dim > 0 else None

    def _minibatch_std(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        g = min(self.mbstd_group, b)
        while b % g:
            g -= 1
        y = x.reshape(g, b // g, *x.shape[1:])
        y = (y.var(dim=0, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))  # (B/g,)
        y = y.repeat(g).reshape(b, 1, 1, 1).expand(-1, 1, *x.shape[2:])
        return torch.cat([x, y], dim=1)

    def forward(self, x: Tensor, c: Tensor | None = None) -> Tensor:
        if (self.embed is None) != (c is None):
            raise ValueError(f"this discriminator has c_dim={self.c_dim}: "
                             + ("pass c" if c is None else "it takes no conditioning c"))
        h = F.leaky_relu(self.from_rgb(x), 0.2)
        for r in self.resolutions[:-1]:
            conv1, conv2 = self.blocks[str(r)]
            h = F.leaky_relu(conv1(h), 0.2)
            h = F.avg_pool2d(F.leaky_relu(conv2(h), 0.2), 2)
            h = getattr(self, f"b{r}")(h)
        h = F.leaky_relu(self.final_conv(self._minibatch_std(h)), 0.2)
        h = F.leaky_relu(self.fc(h.flatten(1)), 0.2)
        score = self.out(h).squeeze(1)
        if self.embed is not None:
            score = score + (self.embed(c.to(h.dtype)) * h).sum(1) / math.sqrt(h.shape[1])
        return score


@register_model("stylegan_mnist")
def stylegan_mnist(z_dim: int = 64, w_dim: int = 64, c_dim: int = 0, channels: int = 1, img_size: int = 28,
                   width: int = 128) -> StyleGenerator:
    """The teacher GAN generator for 28×28 MNIST/Fashion-MNIST: widths 128/64/32 at 7/14/28."""
    return StyleGenerator(z_dim, w_dim, c_dim, channels, img_size, width)


@register_model("stylegan_small")
def stylegan_small(z_dim: int = 64, w_dim: int = 64, c_dim: int = 0, channels: int = 1, img_size: int = 28,
                   width: int = 32) -> StyleGenerator:
    """A narrower student generator (a quarter of the teacher's widths: 32/16/16), same latent sizes."""
    return StyleGenerator(z_dim, w_dim, c_dim, channels, img_size, width)


@register_model("stylegan_discriminator")
def stylegan_discriminator(channels: int = 1, img_size: int = 28, c_dim: int = 0, width: int = 128) -> StyleDiscriminator:
    """The discriminator paired with :func:`stylegan_mnist`."""
    return StyleDiscriminator(channels, img_size, c_dim, width)
