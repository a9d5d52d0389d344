"""Optional ecosystems: models from timm, torchvision and Hugging Face transformers by a prefixed spec.

``distill.models.create`` hands every name with a known prefix to this package::

    create("timm:resnet10t", num_classes=10, in_channels=1)            # timm.create_model
    create("torchvision:resnet18", num_classes=10, pretrained="r18.safetensors")
    create("hf:/path/to/vit-dir", num_classes=10)                      # AutoModelForImageClassification

Each ecosystem lives in its own module (:mod:`~distill.integrations.timm`,
:mod:`~distill.integrations.torchvision`, :mod:`~distill.integrations.hf`), which imports its
package only when a model is built or a spec is checked: ``import distill`` never imports them.
An absent package is a :class:`MissingExtraError` (an ``ImportError``) naming the spec, the
package and the extra that installs it. Weights only ever come from local files (a
safetensors file, or a torch state dict read with ``weights_only=True``): nothing is downloaded.
"""

from __future__ import annotations

import difflib
import importlib
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["PREFIXES", "MissingExtraError", "adapt_input_conv", "check_model_spec", "check_pretrained", "create_model",
           "is_external", "load_pretrained", "read_state_dict", "require", "split_spec"]

# prefix -> (module of this package, what it wraps)
PREFIXES: dict[str, tuple[str, str]] = {
    "timm": ("distill.integrations.timm", "timm.create_model"),
    "torchvision": ("distill.integrations.torchvision", "torchvision.models.get_model"),
    "hf": ("distill.integrations.hf", "transformers AutoModelFor... from a local folder"),
}


class MissingExtraError(ImportError):
    """An optional package a spec (model, logger) needs is absent or cannot be imported."""


def require(package: str, extra: str, what: str) -> Any:
    """Import ``package`` for ``what`` (e.g. ``"model spec 'timm:resnet18'"``), or raise
    :class:`MissingExtraError` naming the package and ``pip install 'distill[extra]'``."""
    top = package.split(".")[0]
    try:
        importlib.import_module(top)
        return importlib.import_module(package)
    except ImportError as e:
        missing = getattr(e, "name", None)
        absent = missing is None or missing == top or package.startswith(missing + ".") or missing == package
        why = "" if absent else f" ({top} is installed but importing it failed: {e})"
        raise MissingExtraError(f"{what} needs {top}: pip install 'distill[{extra}]'{why}") from e


def split_spec(name: str) -> tuple[str, str] | None:
    """``"timm:resnet18"`` -> ``("timm", "resnet18")``; ``None`` for a name without a ``:`` (a zoo name).

    Only the first ``:`` splits, so ``hf:C:/models/vit`` keeps its path whole.
    """
    if not isinstance(name, str) or ":" not in name:
        return None
    prefix, _, rest = name.partition(":")
    return prefix, rest


def is_external(name: str) -> bool:
    """Whether ``name`` is a prefixed spec (``prefix:...``) rather than a zoo name."""
    return split_spec(name) is not None


def _module(name: str) -> tuple[Any, str]:
    parts = split_spec(name)
    if parts is None:
        raise ValueError(f"model spec {name!r} has no prefix; expected one of "
                         f"{', '.join(p + ':NAME' for p in PREFIXES)}")
    prefix, rest = parts
    if prefix not in PREFIXES:
        close = difflib.get_close_matches(prefix, PREFIXES, n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"model spec {name!r}: unknown prefix {prefix!r}.{hint} Known prefixes: "
                         f"{', '.join(repr(p + ':') for p in PREFIXES)} (or a zoo name without a prefix)")
    if not rest:
        raise ValueError(f"model spec {name!r}: nothing after {prefix + ':'!r}")
    return importlib.import_module(PREFIXES[prefix][0]), rest


def check_model_spec(name: str, kwargs: dict[str, Any] | None = None) -> None:
    """Validate a prefixed spec before any work: known prefix, package importable, model known,
    ``pretrained`` file present. Raises ``ValueError`` or :class:`MissingExtraError`."""
    module, rest = _module(name)
    module.check(rest, dict(kwargs or {}), spec=name)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the model of a prefixed spec; ``num_classes``, ``in_channels`` and ``pretrained``
    (a local weights file) are understood by every ecosystem, other ``kwargs`` go to its factory."""
    module, rest = _module(name)
    return module.create(rest, spec=name, **kwargs)


# ---------------------------------------------------------------------------------------------
# local weights: read safely, load strictly, adapt only the input conv and the classifier


def check_pretrained(pretrained: Any, spec: str) -> None:
    """``pretrained`` must be ``None`` or a path to an existing local file (never a download)."""
    if pretrained is None:
        return
    if isinstance(pretrained, bool) or not isinstance(pretrained, (str, Path)):
        raise ValueError(f"model spec {spec!r}: pretrained must be a path to a local weights file (.safetensors or "
                         f"a torch state dict), got {pretrained!r}; distill never downloads weights")
    if not Path(pretrained).is_file():
        raise FileNotFoundError(f"model spec {spec!r}: pretrained weights file {str(pretrained)!r} does not exist")


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a weights file: safetensors, or a torch file read with ``weights_only=True``.

    A torch file may hold the state dict itself, or a mapping with it under ``"state_dict"``
    (distill's :func:`~distill.train.checkpoint.save_model` files, Lightning) or ``"model"``;
    a ``"module."`` prefix on every key (a DDP-wrapped model) is dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        safetensors_torch = require("safetensors.torch", "vision", f"weights file {str(path)!r}")
        state: Any = safetensors_torch.load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickled code, or not a torch file
            raise ValueError(f"cannot read {str(path)!r} as a torch state dict with weights_only=True: {e}") from None
    if isinstance(state, dict) and not all(isinstance(v, Tensor) for v in state.values()):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{str(path)!r} holds no state dict (a mapping of names to tensors, possibly under "
                         "'state_dict' or 'model')")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def adapt_input_conv(weight: Tensor, in_channels: int) -> Tensor:
    """A first-layer conv weight ``(O, C, kh, kw)`` for ``in_channels`` inputs instead of ``C``.

    As timm's ``adapt_input_conv``: to one channel, the sum over ``C`` (a grey image gives the
    response its ``C`` equal channels gave); to ``N`` channels, the ``C`` channels tiled to ``N``
    and scaled by ``C / N`` (the same response to ``N`` equal channels when ``N`` is a multiple
    of ``C``, the same scale otherwise).
    """
    c = weight.shape[1]
    if in_channels == c:
        return weight
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeat = math.ceil(in_channels / c)
    return weight.repeat(1, repeat, 1, 1)[:, :in_channels] * (c / in_channels)


def load_pretrained(model: nn.Module, path: str | Path, *, num_classes: int | None = None,
                    in_channels: int | None = None, spec: str = "model") -> dict[str, list[str]]:
    """Load a local weights file into ``model``, strictly but for two expected differences.

    Every tensor of the model must be in the file and every tensor of the file in the model,
    with the same shape, except: the first 4-D weight (the input conv or patch embedding), when
    only its input channels differ and the model takes ``in_channels``, is adapted by
    :func:`adapt_input_conv`; tensors whose first dimension is the model's ``num_classes`` and the
    file's another (the classifier of a differently-sized task) keep their fresh initialisation,
    with a warning naming them. Anything else is a ``ValueError`` naming the tensors.

    Returns ``{"adapted": [...], "reinitialised": [...]}``.
    """
    state = read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ValueError(f"{spec}: weights in {str(path)!r} do not fit {type(model).__name__}: "
                         f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
                         f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    first_conv = next((k for k, v in own.items() if v.dim() == 4), None)
    out: dict[str, Tensor] = {}
    adapted: list[str] = []
    reinit: list[str] = []
    bad: list[str] = []
    for key, target in own.items():
        w = state[key]
        if w.shape == target.shape:
            out[key] = w
        elif (key == first_conv and in_channels is not None and target.shape[1] == in_channels and w.dim() == 4
              and w.shape[0] == target.shape[0] and w.shape[2:] == target.shape[2:]):
            out[key] = adapt_input_conv(w, in_channels).to(target.dtype)
            adapted.append(key)
        elif (num_classes is not None and target.dim() >= 1 and w.dim() == target.dim()
              and target.shape[0] == num_classes and w.shape[0] != num_classes and w.shape[1:] == target.shape[1:]):
            out[key] = target
            reinit.append(key)
        else:
            bad.append(f"{key}: file {tuple(w.shape)} vs model {tuple(target.shape)}")
    if bad:
        raise ValueError(f"{spec}: weights in {str(path)!r} do not fit {type(model).__name__}: " + "; ".join(bad[:8]))
    model.load_state_dict(out)
    if reinit:
        warnings.warn(f"{spec}: {reinit} have {num_classes} classes in the model but another number in "
                      f"{str(path)!r}: they keep their fresh initialisation (train or distill the model before "
                      "using it as a teacher)", stacklevel=2)
    return {"adapted": adapted, "reinitialised": reinit}
