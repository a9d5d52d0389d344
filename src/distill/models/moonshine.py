"""Moonshine students: WRNs whose 3x3 convolutions are swapped for cheap blocks.

Crowley, Gray & Storkey, "Moonshine: Distilling with Cheap Convolutions" (NeurIPS 2018,
arXiv 1711.02613). The student is the teacher's own architecture with every 3x3 convolution of
every residual block replaced by a cheaper substitute, then trained with attention transfer
from the teacher. Because only the inside of the blocks changes, the stem, the shortcuts, the
stage widths and spatial sizes are those of the teacher: each ``"stageK"`` tap of a cheap
``wrn_40_2_*`` has exactly the shape of ``wrn_40_2``'s, so AT pairs need no adapter.

Substitutes for a 3x3 convolution ``C_in -> C_out`` (stride ``s``), in the paper's notation
(every inner convolution bias-free, every inner BN followed by a ReLU):

* ``G(g)`` -- grouped + pointwise: 3x3 conv ``C_in -> C_in`` in ``g`` groups (stride ``s``),
  BN-ReLU, 1x1 conv ``C_in -> C_out``. ``g = C_in`` ("G(N)") is a depthwise-separable
  convolution. Parameters: ``9 C_in^2 / g + 2 C_in + C_in C_out``.
* ``B(b)`` -- bottleneck: 1x1 conv ``C_in -> m`` with ``m = C_out / b``, BN-ReLU, 3x3 conv
  ``m -> m`` (stride ``s``), BN-ReLU, 1x1 conv ``m -> C_out``.
  Parameters: ``C_in m + 9 m^2 + m C_out + 4 m``.
* ``BG(b, g)`` -- bottleneck then grouped + pointwise: as ``B(b)`` with the middle 3x3 conv in
  ``g`` groups. Parameters: ``C_in m + 9 m^2 / g + m C_out + 4 m``.

``g`` counts *groups* as in the paper (Fig. 1: "separated into g groups ... reduces the
parameter cost of the layer by a factor of g"). The reference code (BayesWatch/pytorch-moonshine)
names its options differently: its ``DConvG<n>`` / ``G<n>B<b>`` use groups of ``n`` channels
(``C / n`` groups) and its ``DConvA<n>`` / ``A<n>B<b>`` use ``n`` groups; ``G(g)`` here is its
``DConvA<g>``, ``B(b)`` its ``ConvB<b>`` and ``BG(b, g)`` its ``A<g>B<b>``. As in that code, each
of a block's two 3x3 convolutions is replaced (so a ``B(b)`` block holds two bottlenecks), and
the 1x1 projection shortcut, the 3x3 stem, the BNs of the block and the classifier are kept.

The block layout, BN placement and tap points are those of :class:`distill.models.cifar.WideResNet`
(``"stem"``, ``"stageK"``, ``"stageK.pre"``, ``"pool"``, ``"fc"``).

Registered models (CIFAR-100, ``num_classes=100``; parameter counts computed from the
architecture, not copied from the paper's tables; ``wrn_40_2`` itself has 2,255,156; with
``num_classes=10`` subtract 11,610):

==================  ============  ==========
name                block         parameters
==================  ============  ==========
``wrn_40_2_g2``     G(2)          1,370,580
``wrn_40_2_g4``     G(4)            826,260
``wrn_40_2_g8``     G(8)            554,100
``wrn_40_2_g16``    G(16)           418,020
``wrn_40_2_gN``     G(N) (DW)       305,124
``wrn_40_2_b2``     B(2)            868,148
``wrn_40_2_b4``     B(4)            303,668
``wrn_40_2_b2g2``   BG(2, 2)        577,844
``wrn_40_2_b2g4``   BG(2, 4)        432,692
==================  ============  ==========
"""

from __future__ import annotations

from torch import Tensor, nn

from distill.models.cifar import WideResNet, _check_positive
from distill.models.registry import register_model

__all__ = ["CONV_TYPES", "Bottleneck3x3", "CheapWideResNet", "GroupedPointwise", "cheap_conv", "wrn_cheap"]

CONV_TYPES = ("conv", "G", "B", "BG")


def _resolve_groups(groups: int | str, channels: int) -> int:
    """``groups`` as an int, with ``"N"`` meaning one group per channel (depthwise)."""
    g = channels if groups == "N" else groups
    _check_positive("groups", g)  # type: ignore[arg-type]
    if channels % g:  # type: ignore[operator]
        raise ValueError(f"groups={groups!r} does not divide the {channels} channels of a grouped convolution")
    return int(g)  # type: ignore[arg-type]


class GroupedPointwise(nn.Module):
    """G(g): grouped 3x3 conv ``in -> in`` (``g`` groups, stride) -> BN -> ReLU -> 1x1 conv ``in -> out``."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, groups: int | str = 2) -> None:
        super().__init__()
        g = _resolve_groups(groups, in_ch)
        self.grouped = nn.Conv2d(in_ch, in_ch, 3, stride=stride, padding=1, groups=g, bias=False)
        self.bn = nn.BatchNorm2d(in_ch)
        self.act = nn.ReLU()
        self.pointwise = nn.Conv2d(in_ch, out_ch, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise(self.act(self.bn(self.grouped(x))))


class Bottleneck3x3(nn.Module):
    """B(b) / BG(b, g): 1x1 ``in -> m`` -> BN-ReLU -> 3x3 ``m -> m`` (``g`` groups, stride) -> BN-ReLU
    -> 1x1 ``m -> out``, with ``m = out // b``."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, bottleneck: int = 2,
                 groups: int | str = 1) -> None:
        super().__init__()
        _check_positive("bottleneck", bottleneck)
        if out_ch % bottleneck:
            raise ValueError(f"bottleneck={bottleneck} does not divide the {out_ch} output channels")
        mid = out_ch // bottleneck
        g = _resolve_groups(groups, mid)
        self.reduce = nn.Conv2d(in_ch, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.act1 = nn.ReLU()
        self.conv = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=g, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.act2 = nn.ReLU()
        self.expand = nn.Conv2d(mid, out_ch, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.act1(self.bn1(self.reduce(x)))
        return self.expand(self.act2(self.bn2(self.conv(out))))


def cheap_conv(conv: str, in_ch: int, out_ch: int, stride: int = 1, groups: int | str = 2,
               bottleneck: int = 2) -> nn.Module:
    """The substitute for one 3x3 convolution ``in_ch -> out_ch`` (see the module docstring)."""
    if conv == "conv":
        return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
    if conv == "G":
        return GroupedPointwise(in_ch, out_ch, stride, groups)
    if conv == "B":
        return Bottleneck3x3(in_ch, out_ch, stride, bottleneck, groups=1)
    if conv == "BG":
        return Bottleneck3x3(in_ch, out_ch, stride, bottleneck, groups=groups)
    raise ValueError(f"conv must be one of {CONV_TYPES}; got {conv!r}")


class CheapWideResNet(WideResNet):
    """WRN-d-k (the layout of :class:`~distill.models.cifar.WideResNet`) with each block's two 3x3
    convolutions replaced by :func:`cheap_conv` ``(conv, groups, bottleneck)``.

    Args:
        depth: ``6n + 4``.
        widen_factor: ``k``; stage widths ``16k, 32k, 64k``.
        conv: ``"G"`` (grouped + pointwise), ``"B"`` (bottleneck), ``"BG"`` (both) or ``"conv"``
            (plain 3x3: then this is exactly ``WideResNet``).
        groups: ``g`` for ``"G"`` / ``"BG"`` (number of groups; ``"N"`` = depthwise).
        bottleneck: ``b`` for ``"B"`` / ``"BG"`` (channel reduction factor).
    """

    def __init__(self, depth: int = 40, widen_factor: int = 2, conv: str = "G", groups: int | str = 4,
                 bottleneck: int = 2, num_classes: int = 100, in_channels: int = 3,
                 drop_rate: float = 0.0) -> None:
        if conv not in CONV_TYPES:
            raise ValueError(f"conv must be one of {CONV_TYPES}; got {conv!r}")
        super().__init__(depth, widen_factor, num_classes, in_channels, drop_rate,
                         conv3x3=lambda i, o, stride: cheap_conv(conv, i, o, stride, groups, bottleneck))
        self.depth = depth
        self.widen_factor = widen_factor
        self.conv = conv
        self.groups = groups
        self.bottleneck = bottleneck


def wrn_cheap(depth: int = 40, widen_factor: int = 2, conv: str = "G", groups: int | str = 4,
              bottleneck: int = 2, num_classes: int = 100, in_channels: int = 3,
              drop_rate: float = 0.0) -> CheapWideResNet:
    """A Moonshine student (arXiv 1711.02613): WRN-``depth``-``widen_factor`` with cheap blocks."""
    return CheapWideResNet(depth, widen_factor, conv, groups, bottleneck, num_classes, in_channels, drop_rate)


register_model("wrn_cheap")(wrn_cheap)

# name -> (conv, groups, bottleneck, parameters with 100 classes)
VARIANTS: dict[str, tuple[str, int | str, int, int]] = {
    "wrn_40_2_g2": ("G", 2, 1, 1_370_580),
    "wrn_40_2_g4": ("G", 4, 1, 826_260),
    "wrn_40_2_g8": ("G", 8, 1, 554_100),
    "wrn_40_2_g16": ("G", 16, 1, 418_020),
    "wrn_40_2_gN": ("G", "N", 1, 305_124),
    "wrn_40_2_b2": ("B", 1, 2, 868_148),
    "wrn_40_2_b4": ("B", 1, 4, 303_668),
    "wrn_40_2_b2g2": ("BG", 2, 2, 577_844),
    "wrn_40_2_b2g4": ("BG", 4, 2, 432_692),
}

_LABEL = {"G": "G({g})", "B": "B({b})", "BG": "BG({b}, {g})"}


def _register_variant(name: str, conv: str, groups: int | str, bottleneck: int, n_params: int) -> None:
    def factory(num_classes: int = 100, in_channels: int = 3, drop_rate: float = 0.0) -> CheapWideResNet:
        return CheapWideResNet(40, 2, conv, groups, bottleneck, num_classes, in_channels, drop_rate)

    label = _LABEL[conv].format(g=groups, b=bottleneck)
    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = (f"WRN-40-2 with {label} blocks (Moonshine, Crowley et al. 2018, arXiv 1711.02613): "
                       f"{n_params:,} parameters with 100 classes (wrn_40_2: 2,255,156).")
    register_model(name)(factory)


for _name, (_conv, _g, _b, _n) in VARIANTS.items():
    _register_variant(_name, _conv, _g, _b, _n)
