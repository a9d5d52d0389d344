"""LeNet-5 and LeNet-5-half, the MNIST teacher and student of the data-free KD papers.

DAFL (Chen et al., "Data-Free Learning of Student Networks", ICCV 2019, arXiv 1904.01186) and
DFAD (Fang et al., "Data-Free Adversarial Distillation", 2019, arXiv 1912.11006) distill a
LeNet-5 teacher into LeNet-5-half on MNIST. The layer widths below are those of the authors'
code (huawei-noah/Data-Efficient-Model-Compression ``DAFL/lenet.py``, copied unchanged into
VainF/Data-Free-Adversarial-Distillation ``network/lenet.py``):

=========  ====================  =====================
layer      LeNet-5               LeNet-5-half
=========  ====================  =====================
conv1      5x5, 1 -> 6           5x5, 1 -> 3
pool1      max 2x2 / 2           max 2x2 / 2
conv2      5x5, 6 -> 16          5x5, 3 -> 8
pool2      max 2x2 / 2           max 2x2 / 2
conv3      5x5, 16 -> 120        5x5, 8 -> 60
fc1        120 -> 84             60 -> 42
fc2        84 -> 10              42 -> 10
=========  ====================  =====================

with a ReLU after conv1, conv2, conv3 and fc1 (no padding). Both papers resize MNIST to 32x32,
so conv3 sees a 5x5 map and outputs 1x1. ``image_size=28`` (ours) pads conv1 by 2, which maps
28x28 to the same 28x28 -> 14 -> 10 -> 5 -> 1 path as LeCun's original LeNet-5 on padded input.

``batch_norm=True`` (ours, not in the papers) adds a BatchNorm2d after conv1, conv2 and conv3,
before their ReLU, so that BatchNorm-statistics methods (DeepInversion, ADI) have statistics to
match. Tap points (``nn.Identity``): ``"feat1"``/``"feat2"``/``"feat3"`` post-ReLU conv maps
``(B, C, H, W)``, ``"pool"`` the flattened conv3 feature ``(B, 120 | 60)``, ``"fc"`` the logits.
"""

from __future__ import annotations

from torch import Tensor, nn

from distill.models.registry import register_model

__all__ = ["LeNet5", "lenet5", "lenet5_half"]


class LeNet5(nn.Module):
    """LeNet-5 with configurable widths: input ``(B, in_channels, S, S)`` with ``S`` in {28, 32},
    output logits ``(B, num_classes)``.

    Args:
        widths: ``(conv1, conv2, conv3, fc1)`` channels; ``(6, 16, 120, 84)`` is LeNet-5 and
            ``(3, 8, 60, 42)`` LeNet-5-half (DAFL's code).
        num_classes: number of logits.
        in_channels: image channels.
        image_size: 32 (the papers' resized MNIST) or 28 (conv1 padded by 2).
        batch_norm: BatchNorm2d after each conv (ours; for BatchNorm-statistics methods).
    """

    def __init__(self, widths: tuple[int, int, int, int] = (6, 16, 120, 84), num_classes: int = 10,
                 in_channels: int = 1, image_size: int = 32, batch_norm: bool = False) -> None:
        super().__init__()
        if len(widths) != 4 or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
            raise ValueError(f"widths must be 4 positive ints (conv1, conv2, conv3, fc1); got {widths!r}")
        for name, value in (("num_classes", num_classes), ("in_channels", in_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        if image_size not in (28, 32):
            raise ValueError(f"LeNet-5 takes 28x28 or 32x32 images; got image_size={image_size!r}")
        c1, c2, c3, f1 = widths
        self.image_size = image_size
        pad = 2 if image_size == 28 else 0

        def block(cin: int, cout: int, padding: int = 0) -> nn.Sequential:
            layers: list[nn.Module] = [nn.Conv2d(cin, cout, 5, padding=padding)]
            if batch_norm:
                layers.append(nn.BatchNorm2d(cout))
            layers.append(nn.ReLU())
            return nn.Sequential(*layers)

        self.conv1 = block(in_channels, c1, pad)
        self.feat1 = nn.Identity()
        self.pool1 = nn.MaxPool2d(2, 2)
        self.conv2 = block(c1, c2)
        self.feat2 = nn.Identity()
        self.pool2 = nn.MaxPool2d(2, 2)
        self.conv3 = block(c2, c3)
        self.feat3 = nn.Identity()
        self.pool = nn.Identity()
        self.fc1 = nn.Sequential(nn.Linear(c3, f1), nn.ReLU())
        self.fc = nn.Linear(f1, num_classes)
        self.tap_points = ("feat1", "feat2", "feat3", "pool", "fc")

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            raise ValueError(f"LeNet5 expects (B, C, {self.image_size}, {self.image_size}) images; "
                             f"got shape {tuple(x.shape)}")
        h = self.pool1(self.feat1(self.conv1(x)))
        h = self.pool2(self.feat2(self.conv2(h)))
        h = self.feat3(self.conv3(h))  # (B, c3, 1, 1)
        return self.fc(self.fc1(self.pool(h.flatten(1))))


@register_model("lenet5")
def lenet5(num_classes: int = 10, in_channels: int = 1, image_size: int = 32,
           batch_norm: bool = False) -> LeNet5:
    """LeNet-5 as DAFL/DFAD's MNIST teacher: conv 6-16-120, fc 84 (DAFL's ``lenet.py``)."""
    return LeNet5((6, 16, 120, 84), num_classes, in_channels, image_size, batch_norm)


@register_model("lenet5_half")
def lenet5_half(num_classes: int = 10, in_channels: int = 1, image_size: int = 32,
                batch_norm: bool = False) -> LeNet5:
    """LeNet-5-half as DAFL/DFAD's MNIST student: conv 3-8-60, fc 42 (DAFL's ``lenet.py``)."""
    return LeNet5((3, 8, 60, 42), num_classes, in_channels, image_size, batch_norm)
