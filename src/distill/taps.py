"""Taps: capture the output (or input) of submodules by dotted path, with forward hooks.

No model is rewritten, so any ``nn.Module`` works: ``"layer3"``, ``"blocks.11.mlp"``,
``"fc:input"`` (the input of ``fc``, e.g. a pooled feature).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn


class TapError(KeyError):
    """A tap path that is not a submodule of the model."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it readable
        return str(self.args[0])


def _split(path: str) -> tuple[str, str]:
    module, _, where = path.partition(":")
    if where not in ("", "input", "output"):
        raise TapError(f"tap {path!r}: suffix must be ':input' or ':output', got ':{where}'")
    return module, where or "output"


def resolve(model: nn.Module, path: str, *, model_name: str = "model") -> nn.Module:
    """The submodule at ``path`` (``""`` is the model itself); a clear error listing near paths."""
    module_path, _ = _split(path)
    names = [n for n, _ in model.named_modules()]
    if module_path in names:
        return model.get_submodule(module_path)
    close = difflib.get_close_matches(module_path, names, n=5, cutoff=0.4)
    if not close:  # fall back to paths sharing the first component
        head = module_path.split(".")[0]
        close = [n for n in names if n.split(".")[0] == head][:5]
    hint = f" Nearest valid paths: {', '.join(map(repr, close))}." if close else ""
    raise TapError(
        f"tap {path!r} is not a submodule of the {model_name} ({type(model).__name__}).{hint} "
        f"Top-level modules: {', '.join(repr(n) for n, _ in model.named_children())}."
    )


def _first_tensor(value: Any) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], Tensor):
        return value[0]
    if isinstance(value, dict):
        for v in value.values():
            if isinstance(v, Tensor):
                return v
    raise TypeError(f"tap captured a {type(value).__name__}, expected a tensor")


class Taps:
    """Hooks on one model that record the tensors at the given paths during each forward.

    Args:
        model: any ``nn.Module``.
        paths: dotted module paths, optionally with ``":input"``.
        model_name: ``"student"`` / ``"teacher"``, used in error messages.

    Use ``with taps.recording() as store: model(x)``; ``store`` maps each path to its tensor.
    Hooks stay registered until :meth:`remove`; outside ``recording()`` they cost one branch.
    """

    def __init__(self, model: nn.Module, paths: Iterable[str], *, model_name: str = "model") -> None:
        self.model = model
        self.paths = list(dict.fromkeys(paths))
        self._store: dict[str, Tensor] | None = None
        self._handles: list[Any] = []
        for path in self.paths:
            module = resolve(model, path, model_name=model_name)
            _, where = _split(path)
            if where == "input":
                self._handles.append(module.register_forward_pre_hook(self._pre_hook(path)))
            else:
                self._handles.append(module.register_forward_hook(self._hook(path)))

    def _hook(self, path: str):
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if self._store is not None:
                self._store[path] = _first_tensor(output)

        return hook

    def _pre_hook(self, path: str):
        def hook(_module: nn.Module, inputs: Any) -> None:
            if self._store is not None:
                self._store[path] = _first_tensor(inputs)

        return hook

    def recording(self) -> _Recording:
        return _Recording(self)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


class _Recording:
    def __init__(self, taps: Taps) -> None:
        self.taps = taps

    def __enter__(self) -> dict[str, Tensor]:
        self.taps._store = {}
        return self.taps._store

    def __exit__(self, *exc: object) -> None:
        store = self.taps._store
        self.taps._store = None
        if exc[0] is None and store is not None:
            missing = [p for p in self.taps.paths if p not in store]
            if missing:
                raise TapError(f"taps {missing} were not reached by the forward pass (module never called)")


def logits_of(output: Any) -> Tensor:
    """The logits in a model's output: the tensor itself, ``output.logits``, ``output["logits"]`` or ``output[0]``."""
    if isinstance(output, Tensor):
        return output
    if hasattr(output, "logits") and isinstance(output.logits, Tensor):
        return output.logits
    if isinstance(output, dict) and isinstance(output.get("logits"), Tensor):
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")
