"""The method base class and the registry that carries each method's paper and defaults.

A method is a small ``nn.Module``: ``forward(student_view, teacher_view, batch) -> Tensor``
(a scalar loss, *unweighted*; the :class:`~distill.Distiller` multiplies it by ``weight``).
It declares the taps it reads, owns its trainable parts, and builds shape-dependent parts in
:meth:`Method.prepare`, which the Distiller calls once on an example batch before the optimizer
is made.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from torch import Tensor, nn

from distill.batch import Batch, View
from distill.papers import Paper


@dataclass(frozen=True)
class MethodInfo:
    """A registry entry: the class, its family, its paper and its default hyper-parameters."""

    name: str
    family: str
    cls: type[Method]
    paper: Paper
    defaults: dict[str, Any] = field(default_factory=dict)
    summary: str = ""


def check_weight(weight: Any, name: str) -> None:
    """A loss weight is a finite number >= 0 (0 switches the loss off); a ``ValueError`` naming the
    loss otherwise (a negative weight would train the student *away* from the target)."""
    try:
        w = float(weight)
    except (TypeError, ValueError):
        w = float("nan")
    if isinstance(weight, bool) or not math.isfinite(w) or w < 0:
        raise ValueError(f"loss {name!r}: weight must be a finite number >= 0, got {weight!r}")


class Method(nn.Module):
    """Base class of every distillation loss term.

    Args:
        weight: multiplier the Distiller applies to this term's loss.
        warmup_epochs: when > 0, the weight ramps linearly as ``min(1, (epoch + 1) / warmup_epochs)``
            over the first epochs (DKD's warm-up; epoch counted from 0).

    Subclasses set ``student_taps`` / ``teacher_taps`` (tap paths read from the views besides
    ``"logits"``) and ``needs_teacher`` (False for teacher-free terms such as cross-entropy).
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    paper: ClassVar[Paper | None] = None
    needs_teacher: ClassVar[bool] = True
    needs_targets: ClassVar[bool] = False
    requires_prepare: ClassVar[bool] = False  # True when prepare() builds trainable parts (adapters)

    def __init__(self, weight: float = 1.0, warmup_epochs: int = 0) -> None:
        super().__init__()
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
        check_weight(weight, type(self).name or type(self).__name__)
        self.weight = float(weight)
        self.warmup_epochs = int(warmup_epochs)
        self.student_taps: list[str] = []
        self.teacher_taps: list[str] = []
        self.epoch: int | None = None
        self.total_epochs: int | None = None

    def prepare(self, student_view: View, teacher_view: View, batch: Batch) -> None:
        """Build shape-dependent parts (adapters) from one example batch; called under ``no_grad``."""

    def bind_models(self, student: nn.Module, teacher: nn.Module | None, example: Batch) -> None:
        """Shown the models once, before :meth:`prepare`, by :meth:`Distiller.prepare` (under ``no_grad``).

        ``teacher`` is the teacher's ``nn.Module`` when the teacher source wraps one (a frozen
        model), else ``None`` (ensembles, caches). Methods that read more than tapped features take
        what they need here: OFD its margins from the teacher's BatchNorms, SimKD the teacher's
        classifier. Keep references out of the module tree (the teacher is not the method's to
        train or save).
        """

    def predictor(self, student: nn.Module) -> nn.Module | None:
        """The model that predicts after training when it is not the student itself (SimKD's
        student trunk + projector + teacher classifier); ``None`` for methods that train the
        student to predict with its own head. ``fit`` evaluates this model."""
        return None

    # Extra training stages this method offers, by name (FT's paraphraser pre-training):
    # ``stage_method(name)`` returns the Method that stage trains with (sharing this one's parts).
    stages: ClassVar[tuple[str, ...]] = ()

    def stage_method(self, name: str) -> Method:
        """The loss of this method's extra stage ``name`` (one of :attr:`stages`)."""
        raise KeyError(f"method {self.name!r} has no stage {name!r}; its stages: {list(self.stages)}")

    def on_epoch_start(self, epoch: int, total_epochs: int | None = None) -> None:
        """Called by the Distiller at the start of each epoch (0-based)."""
        self.epoch = epoch
        self.total_epochs = total_epochs

    def bind_data(self, num_samples: int, targets: Tensor | None) -> None:
        """Told the training set's size and labels (``fit`` does this from a loader with ``.targets``,
        before :meth:`prepare`); methods with per-sample state (memory banks) size themselves here."""

    def on_step_end(self) -> None:
        """Called after each optimizer step (momentum updates of memory banks go here)."""

    def weight_factor(self) -> float:
        """The warm-up factor for the current epoch (1.0 when no warm-up or epoch unknown)."""
        if self.warmup_epochs <= 0 or self.epoch is None:
            return 1.0
        return min(1.0, (self.epoch + 1) / self.warmup_epochs)

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"weight={self.weight}"


_REGISTRY: dict[str, MethodInfo] = {}
M = TypeVar("M", bound=type[Method])


def _defaults_of(cls: type) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, p in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        out[name] = None if p.default is inspect.Parameter.empty else p.default
    return out


def register(name: str, family: str, paper: Paper) -> Callable[[M], M]:
    """Class decorator: add a method to the registry under ``name``."""

    def deco(cls: M) -> M:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is registered twice ({_REGISTRY[name].cls.__name__}, {cls.__name__})")
        cls.name = name
        cls.family = family
        cls.paper = paper
        doc = (cls.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = MethodInfo(name, family, cls, paper, _defaults_of(cls), doc[0] if doc else "")
        return cls

    return deco


def _ensure_loaded() -> None:
    # Importing the package modules runs their @register decorators.
    import distill.methods  # noqa: F401


def list_methods(family: str | None = None) -> list[MethodInfo]:
    """Every registered method, sorted by family then name."""
    _ensure_loaded()
    infos = [i for i in _REGISTRY.values() if family is None or i.family == family]
    return sorted(infos, key=lambda i: (i.family, i.name))


def method_info(name: str) -> MethodInfo:
    """The registry entry of ``name``; a clear error listing the known names otherwise."""
    _ensure_loaded()
    if name not in _REGISTRY:
        import difflib

        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise KeyError(f"unknown method {name!r}.{hint} Known methods: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def create_method(name: str, **kwargs: Any) -> Method:
    """Build a registered method with its paper defaults, overridden by ``kwargs``."""
    info = method_info(name)
    unknown = set(kwargs) - set(info.defaults)
    if unknown:
        raise TypeError(
            f"method {name!r} got unknown argument(s) {sorted(unknown)}; it accepts {sorted(info.defaults)}"
        )
    for key, value in kwargs.items():  # a NaN passes every `x > 0` check a constructor makes
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"method {name!r}: argument {key}={value} must be a finite number")
    return info.cls(**kwargs)
