"""ConvNet-3: the standard evaluation network of dataset distillation.

Dataset Condensation with Gradient Matching (Zhao, Mopuri & Bilen, ICLR 2021, arXiv 2006.05929)
and its successors (DSA, arXiv 2102.08259; DM, arXiv 2110.04181; MTT, arXiv 2203.11932) train
and evaluate synthetic sets on the same small network: ``depth`` blocks of

    conv3x3(width) -> instance norm -> ReLU -> 2x2 average pooling

then one linear classifier on the flattened features. Instance norm is
``nn.GroupNorm(width, width, affine=True)`` (one group per channel), as in the authors' code
(github.com/VICO-UoE/DatasetCondensation, ``networks.py``).

28x28 inputs (MNIST, Fashion-MNIST): the authors' code pads the FIRST convolution by 3 (not 1)
for one-channel images, turning 28x28 into 32x32, so that three poolings give 4x4 features
(``128 * 4 * 4 = 2048``). We pad by 3 when ``image_size == 28`` and by 1 otherwise; the authors
pad by 3 for every one-channel input whatever its size, which differs from ours only for
one-channel inputs that are not 28x28 (e.g. the 8x8 digits, where we keep 8 -> 4 -> 2 -> 1).

Tap points: ``"features"`` (the last block's output ``(B, width, h, w)``), ``"pool"`` (the
flattened features ``(B, D)``, what ``embed`` returns), ``"fc"`` (logits ``(B, K)``).
"""

from __future__ import annotations

from torch import Tensor, nn

from distill.models.registry import register_model

__all__ = ["ConvNet", "convnet3"]

_NORMS = ("instancenorm", "batchnorm", "groupnorm", "layernorm", "none")
_ACTIVATIONS = ("relu", "leakyrelu", "sigmoid")
_POOLINGS = ("avg", "max", "none")


def _positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"convnet3: {name} must be a positive int; got {value!r}")


def _norm(kind: str, channels: int, height: int, width: int) -> nn.Module:
    if kind == "instancenorm":
        return nn.GroupNorm(channels, channels, affine=True)
    if kind == "batchnorm":
        return nn.BatchNorm2d(channels)
    if kind == "groupnorm":
        return nn.GroupNorm(4, channels, affine=True)
    if kind == "layernorm":
        return nn.LayerNorm([channels, height, width], elementwise_affine=True)
    return nn.Identity()


def _activation(kind: str) -> nn.Module:
    if kind == "relu":
        return nn.ReLU()
    if kind == "leakyrelu":
        return nn.LeakyReLU(0.01)
    return nn.Sigmoid()


class ConvNet(nn.Module):
    """``depth`` x [conv3x3 -> norm -> activation -> pool], flatten, linear.

    Args:
        num_classes: logits ``K``.
        in_channels: channels ``C`` of the input ``(B, C, H, W)``.
        image_size: ``H == W`` of the inputs (the classifier's input size depends on it).
        width: channels of every convolution.
        depth: number of blocks.
        norm: ``"instancenorm"`` (GroupNorm with one group per channel, the default of DC/DSA/DM),
            ``"batchnorm"``, ``"groupnorm"`` (4 groups), ``"layernorm"`` or ``"none"``.
        activation: ``"relu"``, ``"leakyrelu"`` (slope 0.01) or ``"sigmoid"``.
        pooling: ``"avg"`` or ``"max"`` (2x2, stride 2), or ``"none"``.
    """

    tap_points = ("features", "pool", "fc")

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        width: int = 128,
        depth: int = 3,
        norm: str = "instancenorm",
        activation: str = "relu",
        pooling: str = "avg",
    ) -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("in_channels", in_channels),
                            ("image_size", image_size), ("width", width), ("depth", depth)):
            _positive(name, value)
        for name, value, allowed in (("norm", norm, _NORMS), ("activation", activation, _ACTIVATIONS),
                                     ("pooling", pooling, _POOLINGS)):
            if value not in allowed:
                raise ValueError(f"convnet3: {name} must be one of {', '.join(allowed)}; got {value!r}")
        layers: list[nn.Module] = []
        size = image_size
        channels = in_channels
        for d in range(depth):
            pad = 3 if (d == 0 and image_size == 28) else 1
            size = size + 2 * pad - 2
            layers += [nn.Conv2d(channels, width, 3, padding=pad), _norm(norm, width, size, size),
                       _activation(activation)]
            if pooling != "none":
                if size < 2:
                    raise ValueError(
                        f"convnet3: image_size {image_size} is too small for depth {depth} with pooling "
                        f"(block {d + 1} sees {size}x{size})")
                layers.append(nn.AvgPool2d(2, 2) if pooling == "avg" else nn.MaxPool2d(2, 2))
                size //= 2
            channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.Flatten(1)
        self.feature_dim = width * size * size
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.image_size = image_size
        self.fc = nn.Linear(self.feature_dim, num_classes)

    def _check(self, x: Tensor) -> None:
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"convnet3 expects images (B, {expected[0]}, {expected[1]}, {expected[2]}); "
                             f"got shape {tuple(x.shape)}")

    def embed(self, x: Tensor) -> Tensor:
        """Images ``(B, C, H, W)`` -> flattened features ``(B, D)`` before the classifier."""
        self._check(x)
        return self.pool(self.features(x))

    def forward(self, x: Tensor) -> Tensor:
        """Images ``(B, C, H, W)`` -> logits ``(B, num_classes)``."""
        return self.fc(self.embed(x))


@register_model("convnet3")
def convnet3(
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int = 28,
    width: int = 128,
    depth: int = 3,
    norm: str = "instancenorm",
    activation: str = "relu",
    pooling: str = "avg",
) -> ConvNet:
    """The ConvNet of dataset distillation (DC, arXiv 2006.05929); see :class:`ConvNet`."""
    return ConvNet(num_classes, in_channels, image_size, width, depth, norm, activation, pooling)
