"""``hf:PATH``: a Hugging Face transformers model from a local folder (``save_pretrained``'s output).

    create("hf:/models/vit-small", num_classes=10)                  # the folder's weights, a new head
    create("hf:/models/vit-small", num_classes=10, pretrained=False, image_size=28)   # config only

``PATH`` is a folder holding ``config.json`` (and, unless ``pretrained=False``, the weights), or
the id of a model already in the local Hugging Face cache: everything loads with
``local_files_only=True``, nothing is downloaded. The model is built with
``AutoModelForImageClassification`` (``task="image-classification"``, the default) or
``AutoModelForSequenceClassification`` (``task="sequence-classification"``); ``num_classes``
sets the config's ``num_labels`` and ``in_channels`` its ``num_channels``; other keyword
arguments override config attributes (an attribute the config does not have is an error, not
a silently ignored key). Loading is strict: a classifier of another size keeps its fresh
initialisation (with a warning), any other missing or mismatched weight is an error.

The model returns a ``ModelOutput``: :func:`distill.taps.logits_of` reads its ``.logits``.
Tap paths are the model's module names (``"vit.layers.1"``, ``"classifier:input"``).
Installed with ``pip install 'distill[hf]'``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from torch import nn

from distill.integrations import require

EXTRA = "hf"
TASKS = {"image-classification": "AutoModelForImageClassification",
         "sequence-classification": "AutoModelForSequenceClassification"}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def _transformers(spec: str) -> Any:
    return require("transformers", EXTRA, f"model spec {spec!r}")


def _config(path: str, spec: str) -> Any:
    transformers = _transformers(spec)
    try:
        return transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        if Path(path).is_dir():
            raise ValueError(f"model spec {spec!r}: the folder {path!r} has no readable config.json: {e}") from None
        if path.startswith((".", "/", "~")) or "\\" in path or Path(path).exists():
            raise ValueError(f"model spec {spec!r}: the folder {path!r} does not exist") from None
        raise ValueError(f"model spec {spec!r}: {path!r} is neither a local folder nor a model in the local Hugging "
                         "Face cache (distill never downloads)") from None


def check(path: str, kwargs: dict[str, Any], *, spec: str) -> None:
    """transformers importable, a config at ``path``, known ``task``, config overrides that exist,
    weights present unless ``pretrained=False``."""
    config = _config(path, spec)
    _check_kwargs(path, config, kwargs, spec)


def _check_kwargs(path: str, config: Any, kwargs: dict[str, Any], spec: str) -> None:
    task = kwargs.get("task", "image-classification")
    if task not in TASKS:
        raise ValueError(f"model spec {spec!r}: task must be one of {list(TASKS)}, got {task!r}")
    pretrained = kwargs.get("pretrained", True)
    if not isinstance(pretrained, bool):
        raise ValueError(f"model spec {spec!r}: pretrained must be true (load the weights in {path!r}) or false "
                         f"(build from its config alone), got {pretrained!r}")
    overrides = {k for k in kwargs if k not in ("task", "pretrained", "num_classes", "in_channels")}
    unknown = sorted(k for k in overrides if not hasattr(config, k))
    if unknown:
        raise TypeError(f"model spec {spec!r}: {unknown} are not attributes of its {type(config).__name__}; "
                        "keyword arguments of an hf: model override its config")
    if kwargs.get("in_channels") is not None and not hasattr(config, "num_channels"):
        raise ValueError(f"model spec {spec!r}: its {type(config).__name__} has no num_channels, so in_channels "
                         f"({kwargs['in_channels']}) cannot be set; is it an image model?")
    if pretrained and Path(path).is_dir() and not any((Path(path) / f).is_file() for f in WEIGHT_FILES):
        raise ValueError(f"model spec {spec!r}: the folder {path!r} holds no weights ({', '.join(WEIGHT_FILES)}); "
                         "pass pretrained: false to build the model from its config alone")


def create(path: str, *, spec: str, num_classes: int | None = None, in_channels: int | None = None,
           pretrained: bool = True, task: str = "image-classification", **overrides: Any) -> nn.Module:
    """The model of the folder (or locally cached id) ``path``; see the module docstring."""
    transformers = _transformers(spec)
    config = _config(path, spec)
    _check_kwargs(path, config, {"task": task, "pretrained": pretrained, "in_channels": in_channels,
                                 **overrides}, spec)
    auto = getattr(transformers, TASKS[task])
    updates = dict(overrides)
    if num_classes is not None:
        updates["num_labels"] = num_classes
    if in_channels is not None:
        updates["num_channels"] = in_channels
    if not pretrained:
        for key, value in updates.items():
            setattr(config, key, value)  # num_labels' setter also rebuilds id2label
        return auto.from_config(config)
    model, info = auto.from_pretrained(path, local_files_only=True, ignore_mismatched_sizes=True,
                                       output_loading_info=True, **updates)
    labels = model.config.num_labels
    own = model.state_dict()

    def is_head(key: str) -> bool:  # a tensor sized by the number of labels: the classifier
        return key in own and own[key].dim() >= 1 and own[key].shape[0] == labels

    missing = sorted(k for k in info.get("missing_keys", ()) if not is_head(k))
    mismatched = sorted(f"{k}: file {tuple(a)} vs model {tuple(b)}" for k, a, b in info.get("mismatched_keys", ())
                        if not (is_head(k) and tuple(a)[1:] == tuple(b)[1:]))
    if missing or mismatched:
        raise ValueError(f"model spec {spec!r}: the weights in {path!r} do not fit the model: missing {missing[:8]}, "
                         f"mismatched {mismatched[:8]}" + (" (the data's in_channels differ from the checkpoint's "
                                                          "num_channels?)" if mismatched else ""))
    fresh = sorted({k for k in info.get("missing_keys", ())} | {k for k, _, _ in info.get("mismatched_keys", ())})
    if fresh:
        warnings.warn(f"model spec {spec!r}: {fresh} are not in {path!r} with {labels} labels: they keep their fresh "
                      "initialisation (train or distill the model before using it as a teacher)", stacklevel=2)
    return model
