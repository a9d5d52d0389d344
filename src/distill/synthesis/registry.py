"""The synthesizer registry: every method that produces a synthetic data set, with its paper.

Two families, two call conventions:

* ``"dataset"`` (dataset distillation and coreset baselines: condense a real training set)::

      fn(images: Tensor (N, C, H, W), labels: Tensor (N,), *, ipc: int, num_classes: int,
         seed: int = 0, progress: bool = True, **hparams) -> SyntheticSet

* ``"data-free"`` (reconstruct data from a trained teacher; never touches training data)::

      fn(teacher: nn.Module, *, ipc: int, num_classes: int, image_shape: tuple[int, int, int],
         seed: int = 0, progress: bool = True, **hparams) -> SyntheticSet

``hparams`` are keyword arguments with the paper's defaults. ``distill synthesizers`` lists the
registry; a recipe ``kind: synth`` runs one (``distill synth RECIPE``).
"""

from __future__ import annotations

import difflib
import hashlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from distill.papers import Paper

__all__ = ["FAMILIES", "RESERVED", "SynthesizerInfo", "list_synthesizers", "register_synthesizer",
           "synthesizer_info", "teacher_fingerprint"]

F = TypeVar("F", bound=Callable[..., Any])
FAMILIES = ("dataset", "data-free")
# the arguments the caller fills in for each family (a recipe's synthesizer args may not set them)
RESERVED = {
    "dataset": ("images", "labels", "ipc", "num_classes", "seed", "progress"),
    "data-free": ("teacher", "ipc", "num_classes", "image_shape", "seed", "progress"),
}


@dataclass(frozen=True)
class SynthesizerInfo:
    """A registry entry: the function, its family, its paper and a one-line summary."""

    name: str
    family: str
    fn: Callable[..., Any]
    paper: Paper
    summary: str = ""

    @property
    def defaults(self) -> dict[str, Any]:
        """The synthesizer's own hyper-parameters (not the reserved arguments) and their defaults."""
        skip = RESERVED[self.family]
        return {n: p.default for n, p in inspect.signature(self.fn).parameters.items()
                if n not in skip and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                and p.default is not inspect.Parameter.empty}

    def hyperparameters(self) -> list[str]:
        """Names of the keyword arguments a caller may set (everything but the reserved ones)."""
        skip = RESERVED[self.family]
        return [n for n, p in inspect.signature(self.fn).parameters.items()
                if n not in skip and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


_SYNTHESIZERS: dict[str, SynthesizerInfo] = {}


def register_synthesizer(name: str, family: str, paper: Paper) -> Callable[[F], F]:
    """Function decorator: add a synthesizer to the registry under ``name``.

    Raises:
        ValueError: an empty name, a family other than ``"dataset"`` / ``"data-free"``, a name
            registered twice, or a function that lacks the family's reserved arguments.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"synthesizer name must be a non-empty string; got {name!r}")
    if family not in FAMILIES:
        raise ValueError(f"synthesizer {name!r}: family must be one of {FAMILIES}; got {family!r}")
    if not isinstance(paper, Paper):
        raise TypeError(f"synthesizer {name!r}: paper must be a distill.papers.Paper; got {type(paper).__name__}")

    def deco(fn: F) -> F:
        if name in _SYNTHESIZERS and _SYNTHESIZERS[name].fn is not fn:
            raise ValueError(f"synthesizer {name!r} is registered twice")
        params = inspect.signature(fn).parameters
        missing = [r for r in RESERVED[family] if r not in params]
        if missing:
            raise ValueError(f"synthesizer {name!r} ({family}) must take {list(RESERVED[family])}; "
                             f"{fn.__qualname__} lacks {missing}")
        doc = (fn.__doc__ or "").strip().splitlines()
        _SYNTHESIZERS[name] = SynthesizerInfo(name, family, fn, paper, doc[0] if doc else "")
        return fn

    return deco


def _ensure_loaded() -> None:
    # importing each module of the package runs its @register_synthesizer decorators
    import importlib
    import pkgutil

    import distill.synthesis as pkg

    for m in pkgutil.iter_modules(pkg.__path__):
        if m.name != "registry":
            importlib.import_module(f"{pkg.__name__}.{m.name}")


def list_synthesizers(family: str | None = None) -> list[SynthesizerInfo]:
    """Every registered synthesizer (of ``family`` when given), sorted by family then name."""
    if family is not None and family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES} or None; got {family!r}")
    _ensure_loaded()
    infos = [i for i in _SYNTHESIZERS.values() if family is None or i.family == family]
    return sorted(infos, key=lambda i: (i.family, i.name))


def synthesizer_info(name: str) -> SynthesizerInfo:
    """The registry entry of ``name``; a KeyError listing the known names (and close ones) otherwise."""
    _ensure_loaded()
    if name not in _SYNTHESIZERS:
        close = difflib.get_close_matches(str(name), list(_SYNTHESIZERS), n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise KeyError(f"unknown synthesizer {name!r}.{hint} Known synthesizers: {', '.join(sorted(_SYNTHESIZERS))}")
    return _SYNTHESIZERS[name]


def teacher_fingerprint(model: nn.Module) -> str:
    """sha256 (hex) over the model's state dict: each entry's name, dtype, shape and raw bytes,
    in name order. Two models with equal weights and buffers have equal fingerprints."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"teacher_fingerprint needs an nn.Module; got {type(model).__name__}")
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        t = value.detach().to("cpu").contiguous().reshape(-1)
        h.update(key.encode("utf-8") + b"\0")
        h.update(f"{t.dtype}{tuple(value.shape)}".encode() + b"\0")
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
