"""The strategy registry: each training strategy (online cohorts, self-distillation, chains,
ensembles of generations, condensation) with its paper, like the method registry.

A strategy is a function that trains one or more models with the library's pieces (a
:class:`~distill.Distiller`, teacher sources, :func:`distill.fit`). By convention it takes

* ``student``: an ``nn.Module``, or a zero-argument factory returning a fresh one (strategies
  that train several models of one architecture: cohorts, generations);
* ``train_loader`` and ``val_loader`` (``val_loader`` may be ``None``);
* keyword-only ``teacher=None`` (a model or teacher source, when the strategy has one), ``epochs``,
  ``run_dir=None``, ``seed=0``, ``progress=True``, its own hyper-parameters with the paper's
  defaults, and ``**fit_kwargs`` passed on to :func:`distill.fit` (optimizer, lr, schedule...);

and returns a :class:`~distill.train.FitResult` of the model it delivers (or a subclass with more:
every peer's result, every generation's).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from distill.methods.base import Paper

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class StrategyInfo:
    """A registry entry: the function, its family, its paper and a one-line summary."""

    name: str
    family: str
    fn: Callable[..., Any]
    paper: Paper
    summary: str = ""


_STRATEGIES: dict[str, StrategyInfo] = {}


def register_strategy(name: str, family: str, paper: Paper) -> Callable[[F], F]:
    """Function decorator: add a strategy to the registry under ``name`` (family: online, self,
    chain, ensemble, condensation, ...)."""

    def deco(fn: F) -> F:
        if name in _STRATEGIES:
            raise ValueError(f"strategy {name!r} is registered twice")
        doc = (fn.__doc__ or "").strip().splitlines()
        _STRATEGIES[name] = StrategyInfo(name, family, fn, paper, doc[0] if doc else "")
        return fn

    return deco


def as_model(student: Any, who: str) -> Any:
    """The convention's ``student``: a module as it is, or a zero-argument factory called once."""
    from torch import nn

    model = student if isinstance(student, nn.Module) else student() if callable(student) else None
    if not isinstance(model, nn.Module):
        raise TypeError(f"{who}: student must be an nn.Module or a zero-argument factory returning one, "
                        f"got {student!r}")
    return model


def _ensure_loaded() -> None:
    # importing each module of the package runs its @register_strategy decorators
    import importlib
    import pkgutil

    import distill.strategies as pkg

    for m in pkgutil.iter_modules(pkg.__path__):
        if m.name != "registry":
            importlib.import_module(f"{pkg.__name__}.{m.name}")


def list_strategies(family: str | None = None) -> list[StrategyInfo]:
    """Every registered strategy, sorted by family then name."""
    _ensure_loaded()
    infos = [i for i in _STRATEGIES.values() if family is None or i.family == family]
    return sorted(infos, key=lambda i: (i.family, i.name))


def strategy_info(name: str) -> StrategyInfo:
    """The registry entry of ``name``; a clear error listing the known names otherwise."""
    _ensure_loaded()
    if name not in _STRATEGIES:
        close = difflib.get_close_matches(name, list(_STRATEGIES), n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise KeyError(f"unknown strategy {name!r}.{hint} Known strategies: {', '.join(sorted(_STRATEGIES))}")
    return _STRATEGIES[name]


__all__ = ["StrategyInfo", "as_model", "list_strategies", "register_strategy",
           "strategy_info"]
