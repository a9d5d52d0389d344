"""The CIFAR-100 knowledge-distillation benchmark zoo, with named tap points.

These are the CIFAR variants of the architectures in the teacher/student tables of Tian et al.,
"Contrastive Representation Distillation" (CRD, arXiv 1910.10699) and its RepDistiller code base
(also used by mdistiller), rebuilt here with the same layer shapes and parameter counts:

* ``resnet8`` ... ``resnet110``, ``resnet8x4``, ``resnet32x4``: the 3-stage CIFAR ResNets of
  He et al., "Deep Residual Learning for Image Recognition" (arXiv 1512.03385), widths
  (16, 16, 32, 64) or 4x wider (32, 64, 128, 256), depth ``6n + 2``.
* ``wrn_16_1``, ``wrn_16_2``, ``wrn_40_1``, ``wrn_40_2``: pre-activation Wide ResNets of Zagoruyko &
  Komodakis, "Wide Residual Networks" (arXiv 1605.07146), depth ``6n + 4``, widen factor ``k``.
* ``vgg8``, ``vgg11``, ``vgg13``, ``vgg16``, ``vgg19``: VGG with batch norm of Simonyan &
  Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition"
  (arXiv 1409.1556), with the fully connected layers replaced by one linear classifier.
* ``MobileNetV2``: the half-width (``width_mult=0.5``, expansion 6) MobileNetV2 of Sandler et
  al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks" (arXiv 1801.04381), called
  ``mobile_half`` in RepDistiller.
* ``ShuffleV1``: ShuffleNet (g = 3) of Zhang et al., "ShuffleNet: An Extremely Efficient
  Convolutional Neural Network for Mobile Devices" (arXiv 1707.01083).
* ``ShuffleV2``: ShuffleNetV2 1x of Ma et al., "ShuffleNet V2: Practical Guidelines for Efficient
  CNN Architecture Design" (arXiv 1807.11164).
* ``ResNet18``, ``ResNet34``, ``ResNet50``: the ImageNet ResNets of He et al. (arXiv 1512.03385)
  with a CIFAR stem (one 3x3 stride-1 conv, no max-pool).

Tap points (submodule paths, listed in each model's ``tap_points``):

* ``"stem"``: the stem output (before any stage).
* ``"stageK"``: the post-activation output of stage ``K`` (what stage ``K + 1`` consumes).
* ``"stageK.pre"``: an ``nn.Identity`` on the same tensor just before the stage's final ReLU,
  i.e. the pre-activation of the stage's last block -- the feature RepDistiller returns with
  ``preact=True``. For MobileNetV2 the stages end in a linear bottleneck with no ReLU, so there
  ``"stageK.pre"`` and ``"stageK"`` see the same tensor.
* ``"pool"``: the globally average-pooled feature ``(B, feature_dim)`` (an ``nn.Flatten``).
* ``"fc"``: the linear classifier producing the logits ``(B, num_classes)``.

Each stage is a :class:`Stage`: ``blocks`` (an ``nn.Sequential`` whose last block does *not*
apply its final ReLU), then ``pre`` (the Identity tap), then ``act`` (ReLU, or Identity for
MobileNetV2). Activations are never in-place, so a hook on ``pre`` keeps the pre-ReLU tensor.

Per-family notes on how the stages line up with RepDistiller's ``is_feat`` features:

* WRN blocks are pre-activation, so RepDistiller's stage output is a raw residual sum and its
  ``preact`` feature is that sum after the BN that opens the next stage's first block (or the
  final BN). Here that BN is moved to the end of the stage (``stageK.norm``): ``"stageK.pre"`` is
  exactly RepDistiller's preact feature and ``"stageK"`` is its ReLU. This is an exact
  re-grouping, not a change of the network: the first block of stages 2 and 3 always changes
  width, so it only ever used the BN-ReLU'd input. The raw sum is the output of
  ``"stageK.blocks"``.
* VGG: ``"stem"`` is RepDistiller's ``block0`` (after its ReLU); stage K is max-pool + ``blockK``.
  As RepDistiller does for 32x32 inputs, stage 4 does not max-pool (``pool_last=False``).
* MobileNetV2: stages group the inverted-residual settings as RepDistiller's features do
  ((16, 24), (32,), (64, 96), (160, 320) before halving); the 1x1 conv to 1280 channels after
  stage 4 is ``head``, not a tap point.
* ShuffleV2: the last block's ``pre`` is the channel-shuffled concatenation of the pass-through
  half and the branch's BN output (RepDistiller returns it unshuffled; same values, permuted
  channels). Applying the ReLU after the shuffle is exact because the pass-through half is
  already non-negative. The 1x1 conv to 1024 channels after stage 3 is ``head``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from distill.models.registry import register_model

__all__ = [
    "CifarNet",
    "CifarResNet",
    "MobileNetV2",
    "ResNet",
    "ShuffleNetV1",
    "ShuffleNetV2",
    "Stage",
    "VGG",
    "WideResNet",
]


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}")


def _relu_or_identity(activate: bool) -> nn.Module:
    return nn.ReLU() if activate else nn.Identity()


def _conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1,
             relu: bool = True) -> nn.Sequential:
    """Conv (no bias, 'same' padding for odd kernels) -> BN (-> ReLU)."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
    ]
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class ChannelShuffle(nn.Module):
    """ShuffleNet channel shuffle: ``(B, g*n, H, W)`` -> interleave the ``g`` groups."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        g = self.groups
        return x.view(b, g, c // g, h, w).transpose(1, 2).reshape(b, c, h, w)


class Stage(nn.Module):
    """``blocks`` -> ``norm`` -> ``pre`` (Identity tap) -> ``act``.

    The last block of ``blocks`` must stop before its final ReLU, so that ``pre`` sees the
    pre-activation and ``act`` applies it. ``norm`` is an Identity except in the WRN stages.
    """

    def __init__(self, blocks: Sequence[nn.Module], act: bool = True, norm: nn.Module | None = None) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.norm = nn.Identity() if norm is None else norm
        self.pre = nn.Identity()
        self.act = _relu_or_identity(act)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.pre(self.norm(self.blocks(x))))


class CifarNet(nn.Module):
    """Shared skeleton: ``stem`` -> ``stage1..stageN`` -> ``head`` -> global average pool -> ``fc``.

    Subclasses build the stem, stages and (optional) head; this class adds the pooling, the
    classifier, the ``tap_points`` tuple and the weight initialisation (Kaiming-normal convs,
    fan-out; BN weight 1, bias 0).
    """

    tap_points: tuple[str, ...]

    def __init__(self, stem: nn.Module, stages: Sequence[nn.Module], feature_dim: int, num_classes: int,
                 head: nn.Module | None = None) -> None:
        super().__init__()
        _check_positive("num_classes", num_classes)
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        self.num_stages = len(stages)
        self.stem = stem
        for k, stage in enumerate(stages, start=1):
            self.add_module(f"stage{k}", stage)
        self.head = nn.Identity() if head is None else head
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.pool = nn.Flatten(1)  # tap point: (B, D, 1, 1) -> (B, D)
        self.fc = nn.Linear(feature_dim, num_classes)
        stage_taps = [t for k in range(1, self.num_stages + 1) for t in (f"stage{k}.pre", f"stage{k}")]
        self.tap_points = ("stem", *stage_taps, "pool", "fc")
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Images ``(B, C, H, W)`` -> logits ``(B, num_classes)``."""
        if x.dim() != 4:
            raise ValueError(f"{type(self).__name__} expects images (B, C, H, W); got shape {tuple(x.shape)}")
        x = self.stem(x)
        for k in range(1, self.num_stages + 1):
            x = getattr(self, f"stage{k}")(x)
        return self.fc(self.pool(self.avgpool(self.head(x))))


# --------------------------------------------------------------------------------------------
# ResNets (CIFAR 3-stage, and ImageNet-style 4-stage with a CIFAR stem)
# --------------------------------------------------------------------------------------------


def _projection(in_ch: int, out_ch: int, stride: int) -> nn.Module:
    """Identity, or a 1x1 conv + BN when the shape changes (ResNet option B)."""
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    return _conv_bn(in_ch, out_ch, 1, stride=stride, relu=False)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + shortcut -> ``act`` (ReLU, or Identity for a stage's last block)."""

    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int = 1, final_act: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _projection(in_ch, planes, stride)
        self.act = _relu_or_identity(final_act)

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.act(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1-3x3(stride)-1x1 (x4 channels) with BN, + shortcut -> ``act``."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1, final_act: bool = True) -> None:
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = nn.Conv2d(in_ch, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = nn.ReLU()
        self.conv3 = nn.Conv2d(planes, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.shortcut = _projection(in_ch, out_ch, stride)
        self.act = _relu_or_identity(final_act)

    def forward(self, x: Tensor) -> Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.act(out + self.shortcut(x))


def _residual_stage(block: type[BasicBlock] | type[Bottleneck], in_ch: int, planes: int, n: int,
                    stride: int) -> tuple[Stage, int]:
    blocks = []
    for i in range(n):
        blocks.append(block(in_ch, planes, stride if i == 0 else 1, final_act=i < n - 1))
        in_ch = planes * block.expansion
    return Stage(blocks), in_ch


class CifarResNet(CifarNet):
    """CIFAR ResNet (He et al. 2016, arXiv 1512.03385, Sec. 4.2): 3x3 stem, 3 stages of ``n``
    basic blocks (strides 1, 2, 2), depth ``6n + 2``. 32x32 -> 32 -> 16 -> 8.

    Args:
        depth: ``6n + 2`` (8, 14, 20, 32, 44, 56, 110, ...).
        widths: (stem, stage1, stage2, stage3) channels.
    """

    def __init__(self, depth: int, widths: Sequence[int] = (16, 16, 32, 64), num_classes: int = 100,
                 in_channels: int = 3) -> None:
        _check_positive("in_channels", in_channels)
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1 (8, 14, 20, ...); got {depth!r}")
        widths = list(widths)
        if len(widths) != 4:
            raise ValueError(f"widths must give (stem, stage1, stage2, stage3) channels; got {widths!r}")
        n = (depth - 2) // 6
        stem = _conv_bn(in_channels, widths[0], 3)
        stages, ch = [], widths[0]
        for planes, stride in zip(widths[1:], (1, 2, 2)):
            stage, ch = _residual_stage(BasicBlock, ch, planes, n, stride)
            stages.append(stage)
        super().__init__(stem, stages, ch, num_classes)
        self.depth = depth


class ResNet(CifarNet):
    """ImageNet-style ResNet (He et al. 2016, arXiv 1512.03385) with the CIFAR stem: a 3x3
    stride-1 conv (64 channels) and no max-pool; 4 stages (64, 128, 256, 512, strides 1, 2, 2, 2).
    32x32 -> 32 -> 16 -> 8 -> 4.
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], num_blocks: Sequence[int],
                 num_classes: int = 100, in_channels: int = 3) -> None:
        _check_positive("in_channels", in_channels)
        num_blocks = list(num_blocks)
        for n in num_blocks:
            _check_positive("every entry of num_blocks", n)
        stem = _conv_bn(in_channels, 64, 3)
        stages, ch = [], 64
        for k, n in enumerate(num_blocks):
            stage, ch = _residual_stage(block, ch, 64 * 2**k, n, 1 if k == 0 else 2)
            stages.append(stage)
        super().__init__(stem, stages, ch, num_classes)


# --------------------------------------------------------------------------------------------
# Wide ResNets
# --------------------------------------------------------------------------------------------


class WideBlock(nn.Module):
    """Pre-activation block: [BN-ReLU] -> conv3x3(stride) -> BN-ReLU -> dropout -> conv3x3, + shortcut.

    ``preactivated=True`` means the input has already been through BN-ReLU (the first block of
    stages 2 and 3, whose BN lives at the end of the previous :class:`Stage`); then this block
    has no ``bn1`` and its shortcut sees that activated input, as in the original network where
    a width-changing block feeds both paths from its own BN-ReLU. Otherwise the residual path
    starts with BN-ReLU and the shortcut takes the raw input (identity when the shape is kept,
    else a 1x1 conv).
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, drop_rate: float = 0.0,
                 preactivated: bool = False) -> None:
        super().__init__()
        self.preactivated = preactivated
        self.bn1 = nn.Identity() if preactivated else nn.BatchNorm2d(in_ch)
        self.act1 = nn.Identity() if preactivated else nn.ReLU()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.act2 = nn.ReLU()
        self.dropout = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        same = stride == 1 and in_ch == out_ch
        self.shortcut = nn.Identity() if same else nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        a = self.act1(self.bn1(x))
        out = self.conv2(self.dropout(self.act2(self.bn2(self.conv1(a)))))
        # Original WRN: a width-changing block's shortcut uses the activated input, a
        # shape-keeping one the raw input.
        skip = self.shortcut(x if isinstance(self.shortcut, nn.Identity) else a)
        return out + skip


class WideResNet(CifarNet):
    """Wide ResNet WRN-d-k (Zagoruyko & Komodakis 2016, arXiv 1605.07146): 3x3 conv stem (16),
    3 stages of ``n = (d - 4) / 6`` pre-activation blocks with widths ``16k, 32k, 64k``
    (strides 1, 2, 2), final BN-ReLU. Each stage ends in the BN-ReLU that the original
    applies at the start of the next stage (see the module docstring), so ``"stageK"`` is
    post-ReLU and ``"stageK.pre"`` is RepDistiller's preact feature.
    """

    def __init__(self, depth: int, widen_factor: int, num_classes: int = 100, in_channels: int = 3,
                 drop_rate: float = 0.0,
                 conv3x3: Callable[[int, int, int], nn.Module] | None = None) -> None:
        """``conv3x3(in_ch, out_ch, stride)``, when given, builds each block's two 3x3 convolutions
        (Moonshine's cheap students reuse this layout with grouped/bottleneck convolutions)."""
        _check_positive("in_channels", in_channels)
        _check_positive("widen_factor", widen_factor)
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...); got {depth!r}")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1); got {drop_rate!r}")
        n = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        stem = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        stages, ch = [], 16
        for k, (w, stride) in enumerate(zip(widths, (1, 2, 2))):
            blocks = []
            for i in range(n):
                block_in, block_stride = (ch if i == 0 else w), (stride if i == 0 else 1)
                block = WideBlock(block_in, w, block_stride, drop_rate, preactivated=(i == 0 and k > 0))
                if conv3x3 is not None:  # same pre-activation wiring; only the two 3x3 convolutions change
                    block.conv1 = conv3x3(block_in, w, block_stride)
                    block.conv2 = conv3x3(w, w, 1)
                blocks.append(block)
            stages.append(Stage(blocks, norm=nn.BatchNorm2d(w)))
            ch = w
        super().__init__(stem, stages, ch, num_classes)
        self.depth = depth
        self.widen_factor = widen_factor


# --------------------------------------------------------------------------------------------
# VGG
# --------------------------------------------------------------------------------------------

VGG_CONFIGS: dict[str, list[list[int]]] = {
    # block0 (the stem), then stages 1..4
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def _vgg_convs(in_ch: int, widths: Sequence[int], final_act: bool) -> tuple[list[nn.Module], int]:
    """conv3x3 (with bias, as in VGG) - BN - ReLU per width; the last ReLU only if ``final_act``."""
    layers: list[nn.Module] = []
    for i, w in enumerate(widths):
        layers += [nn.Conv2d(in_ch, w, 3, padding=1), nn.BatchNorm2d(w)]
        if final_act or i < len(widths) - 1:
            layers.append(nn.ReLU())
        in_ch = w
    return layers, in_ch


class VGG(CifarNet):
    """VGG with batch norm (Simonyan & Zisserman 2015, arXiv 1409.1556), CIFAR variant: the stem
    is the first conv group, each of the 4 stages is a 2x2 max-pool then a conv group, and the
    fully connected layers are replaced by global average pooling and one linear layer.
    32x32 -> 32 -> 16 -> 8 -> 4 -> 4 (stage 4 max-pools only with ``pool_last=True``; RepDistiller
    does that for 64x64 inputs only).

    Args:
        config: a key of ``VGG_CONFIGS`` or a list of 5 conv-width lists.
    """

    def __init__(self, config: str | Sequence[Sequence[int]], num_classes: int = 100, in_channels: int = 3,
                 pool_last: bool = False) -> None:
        _check_positive("in_channels", in_channels)
        cfg = VGG_CONFIGS[config] if isinstance(config, str) else [list(g) for g in config]
        if len(cfg) != 5 or not all(cfg):
            raise ValueError(f"a VGG config is 5 non-empty lists of conv widths; got {config!r}")
        layers, ch = _vgg_convs(in_channels, cfg[0], final_act=True)
        stem = nn.Sequential(*layers)
        stages = []
        for k, widths in enumerate(cfg[1:], start=1):
            layers, ch_out = _vgg_convs(ch, widths, final_act=False)
            if k < 4 or pool_last:
                layers.insert(0, nn.MaxPool2d(2))
            stages.append(Stage(layers))
            ch = ch_out
        super().__init__(stem, stages, ch, num_classes)


# --------------------------------------------------------------------------------------------
# MobileNetV2
# --------------------------------------------------------------------------------------------


class InvertedResidual(nn.Module):
    """1x1 expand (x``t``)-BN-ReLU -> 3x3 depthwise(stride)-BN-ReLU -> 1x1 linear projection-BN,
    plus the input when the shape is kept. As in RepDistiller the expansion conv is kept even
    for ``t = 1``. No activation at the end (linear bottleneck)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_ch * expand_ratio
        self.use_residual = stride == 1 and in_ch == out_ch
        self.conv = nn.Sequential(
            _conv_bn(in_ch, hidden, 1),
            _conv_bn(hidden, hidden, 3, stride=stride, groups=hidden),
            _conv_bn(hidden, out_ch, 1, relu=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(CifarNet):
    """MobileNetV2 (Sandler et al. 2018, arXiv 1801.04381), RepDistiller's CIFAR variant: stride-2
    3x3 stem, the (t, c, n, s) settings (1,16,1,1) (t,24,2,1) (t,32,3,2) (t,64,4,2) (t,96,3,1)
    (t,160,3,2) (t,320,1,1) with channels scaled by ``width_mult``, grouped into 4 stages
    [(16, 24), (32,), (64, 96), (160, 320)]; a 1x1 conv-BN-ReLU ``head`` to 1280 channels.
    32x32 -> 16 -> 16 -> 8 -> 4 -> 2. Stages end in a linear bottleneck, so ``"stageK.pre"``
    is the same tensor as ``"stageK"``.
    """

    SETTINGS = ((1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2),
                (None, 96, 3, 1), (None, 160, 3, 2), (None, 320, 1, 1))
    STAGES = ((0, 1), (2,), (3, 4), (5, 6))

    def __init__(self, num_classes: int = 100, in_channels: int = 3, width_mult: float = 1.0,
                 expand_ratio: int = 6) -> None:
        _check_positive("in_channels", in_channels)
        _check_positive("expand_ratio", expand_ratio)
        if not width_mult > 0:
            raise ValueError(f"width_mult must be positive; got {width_mult!r}")
        ch = int(32 * width_mult)
        stem = _conv_bn(in_channels, ch, 3, stride=2)
        groups: list[list[nn.Module]] = []
        for t, c, n, s in self.SETTINGS:
            out_ch = int(c * width_mult)
            group: list[nn.Module] = []
            for i in range(n):
                group.append(InvertedResidual(ch, out_ch, s if i == 0 else 1, expand_ratio if t is None else t))
                ch = out_ch
            groups.append(group)
        stages = [Stage([b for g in idx for b in groups[g]], act=False) for idx in self.STAGES]
        last = int(1280 * width_mult) if width_mult > 1.0 else 1280
        head = _conv_bn(ch, last, 1)
        super().__init__(stem, stages, last, num_classes, head=head)
        self.width_mult = width_mult


# --------------------------------------------------------------------------------------------
# ShuffleNet V1 / V2
# --------------------------------------------------------------------------------------------


class ShuffleUnitV1(nn.Module):
    """ShuffleNet unit: 1x1 group conv-BN-ReLU -> shuffle -> 3x3 depthwise(stride)-BN-ReLU ->
    1x1 group conv-BN; stride 1: + input; stride 2: concatenated with a 3x3 avg-pooled input.
    Then ``act``. The first unit after the 24-channel stem uses an ungrouped first conv."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, groups: int, final_act: bool = True) -> None:
        super().__init__()
        mid = out_ch // 4
        g1 = 1 if in_ch == 24 else groups
        self.stride = stride
        self.conv1 = _conv_bn(in_ch, mid, 1, groups=g1)
        self.shuffle = ChannelShuffle(g1)
        self.conv2 = _conv_bn(mid, mid, 3, stride=stride, groups=mid)
        self.conv3 = _conv_bn(mid, out_ch, 1, groups=groups, relu=False)
        self.shortcut = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else nn.Identity()
        self.act = _relu_or_identity(final_act)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv3(self.conv2(self.shuffle(self.conv1(x))))
        res = self.shortcut(x)
        out = torch.cat([out, res], 1) if self.stride == 2 else out + res
        return self.act(out)


class ShuffleNetV1(CifarNet):
    """ShuffleNet (Zhang et al. 2018, arXiv 1707.01083), RepDistiller's CIFAR variant: a 1x1
    conv-BN-ReLU stem (24 channels), 3 stages each opening with a stride-2 concat unit.
    32x32 -> 32 -> 16 -> 8 -> 4.
    """

    def __init__(self, num_classes: int = 100, in_channels: int = 3, out_planes: Sequence[int] = (240, 480, 960),
                 num_blocks: Sequence[int] = (4, 8, 4), groups: int = 3) -> None:
        _check_positive("in_channels", in_channels)
        stem = _conv_bn(in_channels, 24, 1)
        stages, ch = [], 24
        for out_ch, n in zip(out_planes, num_blocks, strict=True):
            _check_positive("every entry of num_blocks", n)
            blocks = []
            for i in range(n):
                # the stride-2 unit's branch makes out_ch - ch channels; the pooled input fills the rest
                branch = out_ch - ch if i == 0 else out_ch
                blocks.append(ShuffleUnitV1(ch, branch, 2 if i == 0 else 1, groups, final_act=i < n - 1))
                ch = out_ch
            stages.append(Stage(blocks))
        super().__init__(stem, stages, ch, num_classes)


class ShuffleUnitV2(nn.Module):
    """ShuffleNetV2 basic unit: split channels in half; the second half goes through
    1x1-BN-ReLU -> 3x3 depthwise-BN -> 1x1-BN -> ``act``; concatenate with the first half;
    shuffle (2 groups)."""

    def __init__(self, channels: int, final_act: bool = True) -> None:
        super().__init__()
        half = channels // 2
        self.half = half
        self.branch = nn.Sequential(
            _conv_bn(half, half, 1),
            _conv_bn(half, half, 3, groups=half, relu=False),
            _conv_bn(half, half, 1, relu=False),
        )
        self.act = _relu_or_identity(final_act)
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = x[:, : self.half], x[:, self.half :]
        return self.shuffle(torch.cat([x1, self.act(self.branch(x2))], 1))


class DownUnitV2(nn.Module):
    """ShuffleNetV2 stride-2 unit: left = 3x3 dw(s2)-BN -> 1x1-BN-ReLU; right = 1x1-BN-ReLU ->
    3x3 dw(s2)-BN -> 1x1-BN-ReLU; concatenate, shuffle."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        mid = out_ch // 2
        self.left = nn.Sequential(
            _conv_bn(in_ch, in_ch, 3, stride=2, groups=in_ch, relu=False),
            _conv_bn(in_ch, mid, 1),
        )
        self.right = nn.Sequential(
            _conv_bn(in_ch, mid, 1),
            _conv_bn(mid, mid, 3, stride=2, groups=mid, relu=False),
            _conv_bn(mid, mid, 1),
        )
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.shuffle(torch.cat([self.left(x), self.right(x)], 1))


class ShuffleNetV2(CifarNet):
    """ShuffleNetV2 (Ma et al. 2018, arXiv 1807.11164), RepDistiller's CIFAR variant: a 1x1
    conv-BN-ReLU stem (24 channels), 3 stages of one stride-2 unit and ``n`` basic units, and a
    1x1 conv-BN-ReLU ``head`` (1024 channels for the 1x size). 32x32 -> 32 -> 16 -> 8 -> 4.
    """

    def __init__(self, num_classes: int = 100, in_channels: int = 3,
                 out_channels: Sequence[int] = (116, 232, 464, 1024), num_blocks: Sequence[int] = (3, 7, 3)) -> None:
        _check_positive("in_channels", in_channels)
        out_channels = list(out_channels)
        if len(out_channels) != len(num_blocks) + 1:
            raise ValueError(f"out_channels needs one entry per stage plus the head; got {out_channels!r}")
        stem = _conv_bn(in_channels, 24, 1)
        stages, ch = [], 24
        for out_ch, n in zip(out_channels[:-1], num_blocks):
            _check_positive("every entry of num_blocks", n)
            blocks: list[nn.Module] = [DownUnitV2(ch, out_ch)]
            blocks += [ShuffleUnitV2(out_ch, final_act=i < n - 1) for i in range(n)]
            stages.append(Stage(blocks))
            ch = out_ch
        head = _conv_bn(ch, out_channels[-1], 1)
        super().__init__(stem, stages, out_channels[-1], num_classes, head=head)


# --------------------------------------------------------------------------------------------
# Registered models (names as in RepDistiller's model_dict)
# --------------------------------------------------------------------------------------------


def _register_cifar_resnet(name: str, depth: int, widths: tuple[int, ...]) -> None:
    def factory(num_classes: int = 100, in_channels: int = 3) -> CifarResNet:
        return CifarResNet(depth, widths, num_classes, in_channels)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = (f"CIFAR ResNet-{depth} (He et al. 2016, arXiv 1512.03385), widths {widths}, "
                       "as in RepDistiller (CRD, arXiv 1910.10699).")
    register_model(name)(factory)


for _depth in (8, 14, 20, 32, 44, 56, 110):
    _register_cifar_resnet(f"resnet{_depth}", _depth, (16, 16, 32, 64))
for _depth in (8, 32):
    _register_cifar_resnet(f"resnet{_depth}x4", _depth, (32, 64, 128, 256))


def _register_wrn(depth: int, widen_factor: int) -> None:
    name = f"wrn_{depth}_{widen_factor}"

    def factory(num_classes: int = 100, in_channels: int = 3, drop_rate: float = 0.0) -> WideResNet:
        return WideResNet(depth, widen_factor, num_classes, in_channels, drop_rate)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = (f"WRN-{depth}-{widen_factor} (Zagoruyko & Komodakis 2016, arXiv 1605.07146), "
                       "as in RepDistiller (CRD, arXiv 1910.10699).")
    register_model(name)(factory)


for _depth, _k in ((16, 1), (16, 2), (40, 1), (40, 2)):
    _register_wrn(_depth, _k)


def _register_vgg(name: str) -> None:
    def factory(num_classes: int = 100, in_channels: int = 3) -> VGG:
        return VGG(name, num_classes, in_channels)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = (f"{name} with batch norm (Simonyan & Zisserman 2015, arXiv 1409.1556), CIFAR variant "
                       f"as in RepDistiller (CRD, arXiv 1910.10699).")
    register_model(name)(factory)


for _name in VGG_CONFIGS:
    _register_vgg(_name)


@register_model("MobileNetV2")
def mobile_half(num_classes: int = 100, in_channels: int = 3, width_mult: float = 0.5,
                expand_ratio: int = 6) -> MobileNetV2:
    """Half-width MobileNetV2 (Sandler et al. 2018, arXiv 1801.04381): RepDistiller's
    ``mobile_half``, listed as "MobileNetV2" in the CRD tables (arXiv 1910.10699)."""
    return MobileNetV2(num_classes, in_channels, width_mult=width_mult, expand_ratio=expand_ratio)


@register_model("ShuffleV1")
def shuffle_v1(num_classes: int = 100, in_channels: int = 3) -> ShuffleNetV1:
    """ShuffleNet g=3, widths (240, 480, 960), units (4, 8, 4) (Zhang et al. 2018, arXiv 1707.01083),
    as in RepDistiller (CRD, arXiv 1910.10699)."""
    return ShuffleNetV1(num_classes, in_channels)


@register_model("ShuffleV2")
def shuffle_v2(num_classes: int = 100, in_channels: int = 3) -> ShuffleNetV2:
    """ShuffleNetV2 1x, widths (116, 232, 464, 1024), units (3, 7, 3) (Ma et al. 2018, arXiv 1807.11164),
    as in RepDistiller (CRD, arXiv 1910.10699)."""
    return ShuffleNetV2(num_classes, in_channels)


@register_model("ResNet18")
def resnet18(num_classes: int = 100, in_channels: int = 3) -> ResNet:
    """ResNet-18 (He et al. 2016, arXiv 1512.03385) with a CIFAR stem, as in RepDistiller (arXiv 1910.10699)."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, in_channels)


@register_model("ResNet34")
def resnet34(num_classes: int = 100, in_channels: int = 3) -> ResNet:
    """ResNet-34 (He et al. 2016, arXiv 1512.03385) with a CIFAR stem, as in RepDistiller (arXiv 1910.10699)."""
    return ResNet(BasicBlock, (3, 4, 6, 3), num_classes, in_channels)


@register_model("ResNet50")
def resnet50(num_classes: int = 100, in_channels: int = 3) -> ResNet:
    """ResNet-50 (He et al. 2016, arXiv 1512.03385) with a CIFAR stem, as in RepDistiller (arXiv 1910.10699)."""
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, in_channels)
