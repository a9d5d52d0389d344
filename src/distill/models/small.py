"""Small CNNs and MLPs with named tap points, for MNIST-sized and 8x8 digit images.

Tap points are plain submodules, so a distillation method hooks them by dotted path with
``model.get_submodule(path).register_forward_hook(...)``:

* CNN: ``"stem"`` (stem conv-bn-relu output ``(B, C0, H, W)``), ``"stageK"`` (post-ReLU output
  of stage K ``(B, Ck, Hk, Wk)``), ``"stageK.pre"`` (an ``nn.Identity`` on the same tensor just
  before the stage's last ReLU), ``"pool"`` (pooled feature ``(B, D)``), ``"fc"`` (logits
  ``(B, num_classes)``).
* MLP: ``"hiddenK"`` (post-ReLU ``(B, Dk)``), ``"hiddenK.pre"`` (pre-ReLU), ``"pool"`` (the
  penultimate feature ``(B, D)``, an ``nn.Identity``), ``"fc"``.

No activation is in-place: an in-place ReLU after a ``pre`` Identity would overwrite the very
tensor a hook on ``pre`` captured, silently turning pre-ReLU features into post-ReLU ones.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from distill.models.registry import register_model

__all__ = ["CNN", "MLP"]


def _per_stage(value: int | Sequence[int] | Sequence[bool], n: int, what: str) -> list:
    """Broadcast an int to ``n`` stages, or check a sequence has one entry per stage."""
    if isinstance(value, (int, bool)):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise ValueError(f"{what} has {len(values)} entries but the model has {n} stages; got {value!r}")
    return values


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}")


class Stage(nn.Module):
    """Optional 2x2 max-pool, then ``blocks`` conv3x3-BN(-ReLU) blocks.

    The last block's BN output passes through ``pre`` (an ``nn.Identity`` tap point) before
    the final ReLU ``act``. Input ``(B, Cin, H, W)`` -> output ``(B, Cout, H', W')`` with
    ``H' = ceil(H / 2)`` when downsampling, else ``H``.
    """

    def __init__(self, in_channels: int, out_channels: int, blocks: int, downsample: bool) -> None:
        super().__init__()
        _check_positive("blocks per stage", blocks)
        layers: list[nn.Module] = []
        if downsample:
            # ceil_mode keeps odd sizes from shrinking to 0 (7 -> 4, 1 -> 1), so any input >= 8x8 works.
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        channels = in_channels
        for i in range(blocks):
            layers += [
                nn.Conv2d(channels, out_channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(out_channels),
            ]
            if i < blocks - 1:
                layers.append(nn.ReLU())
            channels = out_channels
        self.body = nn.Sequential(*layers)
        self.pre = nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.pre(self.body(x)))


class CNN(nn.Module):
    """Stem conv-bn-relu, ``len(widths)`` stages, global average pooling, a linear classifier.

    Args:
        num_classes: number of output logits ``K``.
        in_channels: input channels ``C`` of ``(B, C, H, W)`` images (any ``H, W >= 8``).
        widths: output channels of each stage; ``len(widths)`` is the number of stages.
        stem_width: channels of the stem (default ``widths[0]``).
        blocks: conv blocks per stage, one int for all stages or one per stage.
        downsample: per stage, whether it starts with a 2x2 max-pool. Default: every stage
            but the first, so 8x8 inputs give 8 -> 8 -> 4 -> 2 for three stages.
        dropout: dropout probability before ``fc``.
    """

    tap_points: tuple[str, ...]

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        widths: Sequence[int] = (32, 64, 128),
        stem_width: int | None = None,
        blocks: int | Sequence[int] = 1,
        downsample: Sequence[bool] | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        widths = list(widths)
        if not widths:
            raise ValueError("widths must list at least one stage width; got an empty sequence")
        for w in widths:
            _check_positive("every entry of widths", w)
        _check_positive("num_classes", num_classes)
        _check_positive("in_channels", in_channels)
        stem_width = widths[0] if stem_width is None else stem_width
        _check_positive("stem_width", stem_width)
        n = len(widths)
        blocks_per = _per_stage(blocks, n, "blocks")
        pools = [i > 0 for i in range(n)] if downsample is None else _per_stage(downsample, n, "downsample")

        self.num_classes = num_classes
        self.feature_dim = widths[-1]
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, stem_width, 3, padding=1, bias=False),
            nn.BatchNorm2d(stem_width),
            nn.ReLU(),
        )
        channels = stem_width
        for k, (w, b, p) in enumerate(zip(widths, blocks_per, pools), start=1):
            self.add_module(f"stage{k}", Stage(channels, w, b, bool(p)))
            channels = w
        self.num_stages = n
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.pool = nn.Flatten(1)  # tap point: (B, C, 1, 1) -> (B, D)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(channels, num_classes)
        stage_taps = [t for k in range(1, n + 1) for t in (f"stage{k}.pre", f"stage{k}")]
        self.tap_points = ("stem", *stage_taps, "pool", "fc")

    def forward(self, x: Tensor) -> Tensor:
        """Images ``(B, C, H, W)`` -> logits ``(B, num_classes)``."""
        if x.dim() != 4:
            raise ValueError(f"CNN expects images (B, C, H, W); got shape {tuple(x.shape)}")
        x = self.stem(x)
        for k in range(1, self.num_stages + 1):
            x = getattr(self, f"stage{k}")(x)
        return self.fc(self.dropout(self.pool(self.avgpool(x))))


class Hidden(nn.Module):
    """Linear -> ``pre`` (Identity tap) -> ReLU: ``(B, Din)`` -> ``(B, Dout)``."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.pre = nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.pre(self.linear(x)))


class MLP(nn.Module):
    """Flatten, ``len(hidden)`` Linear-ReLU layers, a linear classifier.

    Args:
        num_classes: number of output logits ``K``.
        in_channels: input channels ``C``.
        input_size: image side ``S`` (or ``(H, W)``); the input has ``C * H * W`` features.
        hidden: widths of the hidden layers (may be empty: logistic regression).
        dropout: dropout probability after each hidden layer.
        in_features: override the flattened input size (for non-image inputs ``(B, D)``).
    """

    tap_points: tuple[str, ...]

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        input_size: int | tuple[int, int] = 28,
        hidden: Sequence[int] = (256,),
        dropout: float = 0.0,
        in_features: int | None = None,
    ) -> None:
        super().__init__()
        _check_positive("num_classes", num_classes)
        _check_positive("in_channels", in_channels)
        if in_features is None:
            h, w = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
            _check_positive("input_size", h)
            _check_positive("input_size", w)
            in_features = in_channels * h * w
        _check_positive("in_features", in_features)
        hidden = list(hidden)
        for d in hidden:
            _check_positive("every entry of hidden", d)

        self.num_classes = num_classes
        self.in_features = in_features
        features = in_features
        for k, d in enumerate(hidden, start=1):
            self.add_module(f"hidden{k}", Hidden(features, d))
            features = d
        self.num_hidden = len(hidden)
        self.feature_dim = features
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.pool = nn.Identity()  # tap point: the penultimate feature (B, D), named as in the CNNs
        self.fc = nn.Linear(features, num_classes)
        hidden_taps = [t for k in range(1, len(hidden) + 1) for t in (f"hidden{k}.pre", f"hidden{k}")]
        self.tap_points = (*hidden_taps, "pool", "fc")

    def forward(self, x: Tensor) -> Tensor:
        """Inputs ``(B, C, H, W)`` or ``(B, D)`` -> logits ``(B, num_classes)``."""
        x = x.flatten(1)
        if x.shape[1] != self.in_features:
            raise ValueError(
                f"MLP was built for {self.in_features} input features but got {x.shape[1]} "
                f"(input shape {tuple(x.shape)}); set input_size/in_channels or in_features to match"
            )
        for k in range(1, self.num_hidden + 1):
            x = self.dropout(getattr(self, f"hidden{k}")(x))
        return self.fc(self.pool(x))


# --------------------------------------------------------------------------------------------
# Registered models
# --------------------------------------------------------------------------------------------

register_model("cnn")(CNN)
register_model("mlp")(MLP)


@register_model("cnn_teacher_mnist")
def cnn_teacher_mnist(num_classes: int = 10, in_channels: int = 1, dropout: float = 0.0) -> CNN:
    """~1.17M parameters: 3 stages of 2 blocks (64, 128, 256), 28 -> 14 -> 7 -> 4."""
    return CNN(num_classes, in_channels, widths=(64, 128, 256), stem_width=32, blocks=2,
               downsample=(True, True, True), dropout=dropout)


@register_model("cnn_student_mnist")
def cnn_student_mnist(num_classes: int = 10, in_channels: int = 1, dropout: float = 0.0) -> CNN:
    """~99k parameters: 3 stages of 1 block (32, 64, 128), 28 -> 14 -> 7 -> 4."""
    return CNN(num_classes, in_channels, widths=(32, 64, 128), stem_width=16, blocks=1,
               downsample=(True, True, True), dropout=dropout)


@register_model("cnn_digits_teacher")
def cnn_digits_teacher(num_classes: int = 10, in_channels: int = 1, dropout: float = 0.0) -> CNN:
    """~213k parameters for 8x8 digits: 3 stages of 2 blocks (32, 64, 96), 8 -> 8 -> 4 -> 2."""
    return CNN(num_classes, in_channels, widths=(32, 64, 96), stem_width=32, blocks=2, dropout=dropout)


@register_model("cnn_digits_student")
def cnn_digits_student(num_classes: int = 10, in_channels: int = 1, dropout: float = 0.0) -> CNN:
    """~2.3k parameters for 8x8 digits: 3 stages of 1 block (8, 8, 16), 8 -> 8 -> 4 -> 2."""
    return CNN(num_classes, in_channels, widths=(8, 8, 16), stem_width=4, blocks=1, dropout=dropout)


@register_model("mlp_digits_student")
def mlp_digits_student(num_classes: int = 10, in_channels: int = 1, dropout: float = 0.0) -> MLP:
    """~2.4k parameters: 64 -> 32 -> 10 on flattened 8x8 digits."""
    return MLP(num_classes, in_channels, input_size=8, hidden=(32,), dropout=dropout)
