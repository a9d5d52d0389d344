"""``torchvision:NAME``: a classification model of ``torchvision.models``, built with ``get_model``.

    create("torchvision:resnet18", num_classes=10)                        # weights=None: fresh
    create("torchvision:resnet18", num_classes=10, pretrained="r18.pth")  # a local state dict
    create("torchvision:resnet18", num_classes=10, in_channels=1)         # grey images

torchvision's models take 3-channel images; for another ``in_channels`` the first ``Conv2d``
(``conv1``, ``features.0.0``, ViT's ``conv_proj``) is replaced by one taking that many channels
(and a pretrained file's 3-channel weights are adapted to it). Tap paths are torchvision's module
names (``"layer3"``, ``"avgpool"``, ``"fc:input"``). Installed with ``pip install 'distill[vision]'``.
"""

from __future__ import annotations

import difflib
from typing import Any

from torch import nn

from distill.integrations import check_pretrained, load_pretrained, require

EXTRA = "vision"


def _models(spec: str) -> Any:
    return require("torchvision.models", EXTRA, f"model spec {spec!r}")


def check(name: str, kwargs: dict[str, Any], *, spec: str) -> None:
    """torchvision importable, ``name`` one of its classification models, ``pretrained`` a local file."""
    models = _models(spec)
    known = models.list_models(module=models)  # the classification models (not detection, segmentation...)
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(repr('torchvision:' + c) for c in close)}?" if close else ""
        raise ValueError(f"model spec {spec!r}: {name!r} is not a torchvision classification model.{hint} "
                         "(torchvision.models.list_models(module=torchvision.models) lists them)")
    if "weights" in kwargs:
        raise ValueError(f"model spec {spec!r}: 'weights' would download; give a local file as pretrained: PATH")
    check_pretrained(kwargs.get("pretrained"), spec)


def replace_input_conv(model: nn.Module, in_channels: int) -> str | None:
    """Swap the model's first ``Conv2d`` for one taking ``in_channels`` (same kernel, stride, padding,
    fresh weights); returns its path, or ``None`` when it already takes ``in_channels``."""
    for path, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            if module.in_channels == in_channels:
                return None
            if module.groups != 1:
                raise ValueError(f"the first conv {path!r} is grouped: cannot change its input channels")
            new = nn.Conv2d(in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                            module.dilation, 1, module.bias is not None, module.padding_mode)
            parent, _, attr = path.rpartition(".")
            setattr(model.get_submodule(parent), attr, new)
            return path
    raise ValueError(f"{type(model).__name__} has no Conv2d whose input channels could become {in_channels}")


def create(name: str, *, spec: str, num_classes: int | None = None, in_channels: int | None = None,
           pretrained: str | None = None, **kwargs: Any) -> nn.Module:
    """``torchvision.models.get_model(name, weights=None, num_classes=..., **kwargs)``; the input conv
    changed for ``in_channels`` other than 3; then the local file ``pretrained``."""
    check(name, {"pretrained": pretrained, **kwargs}, spec=spec)
    models = _models(spec)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    model = models.get_model(name, weights=None, **kwargs)
    if in_channels is not None:
        replace_input_conv(model, in_channels)
    if pretrained is not None:
        load_pretrained(model, pretrained, num_classes=num_classes, in_channels=in_channels, spec=spec)
    return model
