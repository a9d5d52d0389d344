"""``timm:NAME``: a model of timm (Wightman, *PyTorch Image Models*), built with ``timm.create_model``.

    create("timm:resnet10t", num_classes=10, in_channels=1)
    create("timm:vit_tiny_patch16_224", num_classes=10, in_channels=1, img_size=28, patch_size=7)
    create("timm:resnet18", num_classes=100, pretrained="resnet18.safetensors")   # a local file

Tap paths are timm's module names (``"layer3"``, ``"blocks.11.mlp"``, ``"head:input"``).
Installed with ``pip install 'distill[vision]'``; timm imports torchvision at import time.
"""

from __future__ import annotations

import difflib
from typing import Any

from torch import nn

from distill.integrations import check_pretrained, load_pretrained, require

EXTRA = "vision"


def _timm(spec: str) -> Any:
    return require("timm", EXTRA, f"model spec {spec!r}")


def check(name: str, kwargs: dict[str, Any], *, spec: str) -> None:
    """timm importable, ``name`` one of ``timm.list_models()``, ``pretrained`` a local file."""
    timm = _timm(spec)
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(repr('timm:' + c) for c in close)}?" if close else ""
        raise ValueError(f"model spec {spec!r}: timm has no model {name!r}.{hint} "
                         "(timm.list_models() lists them)")
    check_pretrained(kwargs.get("pretrained"), spec)


def create(name: str, *, spec: str, num_classes: int | None = None, in_channels: int | None = None,
           pretrained: str | None = None, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, pretrained=False, num_classes=..., in_chans=..., **kwargs)``, then
    the weights of the local file ``pretrained`` (see :func:`distill.integrations.load_pretrained`)."""
    check(name, {"pretrained": pretrained}, spec=spec)
    timm = _timm(spec)
    if "in_chans" in kwargs and in_channels is not None and kwargs["in_chans"] != in_channels:
        raise ValueError(f"model spec {spec!r}: in_chans={kwargs['in_chans']} contradicts in_channels={in_channels}")
    if in_channels is not None:
        kwargs["in_chans"] = in_channels
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    model = timm.create_model(name, pretrained=False, **kwargs)
    if pretrained is not None:
        load_pretrained(model, pretrained, num_classes=num_classes, in_channels=kwargs.get("in_chans"), spec=spec)
    return model
