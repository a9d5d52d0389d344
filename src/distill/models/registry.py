"""A name -> model-factory registry, in the style of timm's ``create_model``."""

from __future__ import annotations

import difflib
import fnmatch
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

__all__ = ["UnknownModelError", "create", "create_model", "list_models", "register_model"]

Factory = Callable[..., nn.Module]
F = TypeVar("F", bound=Factory)

_MODELS: dict[str, Factory] = {}


class UnknownModelError(KeyError):
    """``create`` got a name nobody registered."""

    def __str__(self) -> str:
        # KeyError's default str() is the repr of its argument, which would quote the message.
        return str(self.args[0]) if self.args else ""


def register_model(name: str) -> Callable[[F], F]:
    """Decorator registering a factory (a function or class returning an ``nn.Module``) as ``name``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name must be a non-empty string; got {name!r}")

    def decorate(factory: F) -> F:
        if name in _MODELS and _MODELS[name] is not factory:
            raise ValueError(f"model {name!r} is already registered (by {_MODELS[name].__qualname__})")
        _MODELS[name] = factory
        return factory

    return decorate


def list_models(pattern: str | None = None) -> list[str]:
    """Registered names, sorted; ``pattern`` filters with shell wildcards, e.g. ``"cnn_*"``."""
    names = sorted(_MODELS)
    return names if pattern is None else [n for n in names if fnmatch.fnmatch(n, pattern)]


def _check_kwargs(name: str, factory: Factory, kwargs: dict[str, Any]) -> None:
    """Reject unknown keyword arguments with the model name and the accepted ones."""
    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        accepted = ", ".join(p for p in params if params[p].kind is not inspect.Parameter.VAR_POSITIONAL)
        raise TypeError(f"model {name!r} got unexpected arguments {unknown}; it accepts: {accepted}")


def create(name: str, **kwargs: Any) -> nn.Module:
    """Build the model registered as ``name``; ``kwargs`` go to its factory.

    A prefixed spec builds a model of an optional ecosystem (:mod:`distill.integrations`):
    ``"timm:NAME"``, ``"torchvision:NAME"``, ``"hf:PATH"``; ``num_classes``, ``in_channels`` and
    ``pretrained`` (a local weights file, never a download) mean the same there.

    Raises:
        UnknownModelError (a KeyError): unknown ``name``; lists the registered names and close matches.
        TypeError: an argument the factory does not take.
        ValueError: a prefixed spec with an unknown prefix or model.
        distill.integrations.MissingExtraError (an ImportError): the ecosystem's package is absent.
    """
    if name not in _MODELS and isinstance(name, str) and ":" in name:
        from distill.integrations import create_model as create_external

        return create_external(name, **kwargs)
    if name not in _MODELS:
        close = difflib.get_close_matches(str(name), _MODELS, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownModelError(f"unknown model {name!r}.{hint} Registered models: {', '.join(list_models())}")
    factory = _MODELS[name]
    _check_kwargs(name, factory, kwargs)
    return factory(**kwargs)


create_model = create
