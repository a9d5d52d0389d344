"""Net2Net as a strategy: grow a trained small network into a bigger student with function-preserving
transformations, then train the student (Chen, Goodfellow, Shlens, "Net2Net: Accelerating Learning via
Knowledge Transfer", ICLR 2016, arXiv 1511.05641).

The transformations are :func:`distill.models.net2net.widen` (Net2WiderNet) and
:func:`distill.models.net2net.deepen` (Net2DeeperNet); this module picks the layers, grows a copy of the
teacher and trains it with :func:`distill.fit` on the labels (the paper trains the grown student
normally: the knowledge is in its initialisation, there is no distillation loss). ``init="random"`` is
the paper's baseline: the same grown architecture trained from a random initialisation.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.batch import as_batch
from distill.distiller import Distiller
from distill.models.net2net import deepen as deepen_layer
from distill.models.net2net import widen, width_of
from distill.papers import Paper
from distill.strategies.registry import as_model, register_strategy
from distill.taps import logits_of
from distill.train.loop import FitResult, fit

__all__ = ["NET2NET", "Net2NetResult", "fit_net2net", "grow", "widths_to_match"]

NET2NET = Paper("Net2Net: Accelerating Learning via Knowledge Transfer", "T. Chen, I. Goodfellow, J. Shlens", 2016,
                "1511.05641", "ICLR")
INITS = ("net2net", "random")


@dataclass
class Net2NetResult(FitResult):
    """:class:`~distill.train.FitResult` of the grown student, plus the student itself, the widths it was
    grown to, the layers inserted after, and ``function_gap``: max |grown(x) - teacher(x)| over the logits
    of the first training batch, in evaluation mode, before training (0 up to rounding without noise;
    ``None`` for ``init="random"``)."""

    student: nn.Module | None = None
    widths: dict[str, int] = field(default_factory=dict)
    deepened: list[str] = field(default_factory=list)
    function_gap: float | None = None


def _weighted(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def widths_to_match(teacher: nn.Module, student: nn.Module) -> dict[str, int]:
    """``{layer: width}`` growing ``teacher``'s hidden weight layers to ``student``'s: every ``nn.Conv2d`` /
    ``nn.Linear`` of the teacher but the last that the student has under the same name and type, wider.

    Raises:
        ValueError: the student has a narrower layer (Net2Net only grows), or nothing to grow.
    """
    layers = _weighted(teacher)[:-1]
    s_mods = dict(student.named_modules())
    out: dict[str, int] = {}
    for name, m in layers:
        s = s_mods.get(name)
        if s is None or type(s) is not type(m):
            continue
        tw, sw = width_of(m), width_of(s)
        if sw < tw:
            raise ValueError(f"the student's {name!r} has {sw} units, fewer than the teacher's {tw}: Net2Net grows a "
                             "network, it cannot shrink one")
        if sw > tw:
            out[name] = sw
    if not out:
        raise ValueError("the student has no wider layer of the teacher's names and types: give widths={layer: width} "
                         f"(the teacher's weight layers: {[n for n, _ in layers]})")
    return out


def grow(teacher: nn.Module, widths: Mapping[str, int], deepen: Sequence[str] = (), *, example: torch.Tensor | None,
         noise: float = 0.0, generator: torch.Generator | None = None) -> nn.Module:
    """A copy of ``teacher`` widened to ``widths`` (Net2WiderNet, in the teacher's layer order) and deepened
    after each of ``deepen`` (Net2DeeperNet; ``example`` is a training batch ``(B, ...)``)."""
    model = copy.deepcopy(teacher)
    order = [n for n, _ in _weighted(model)]
    unknown = sorted(set(widths) - set(order))
    if unknown:
        raise ValueError(f"widths names {unknown}, not weight layers of the teacher ({order})")
    for name in sorted(widths, key=order.index):
        widen(model, name, widths[name], noise=noise, generator=generator)
    if deepen and example is None:
        raise ValueError("deepen needs an example batch of training inputs")
    for after in deepen:
        deepen_layer(model, after, example)
    return model


def _reinit(model: nn.Module, seed: int) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in model.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
            if hasattr(m, "reset_running_stats"):
                m.reset_running_stats()


@register_strategy("net2net", "compression", NET2NET)
def fit_net2net(
    student: Any,
    train_loader: Iterable[Any],
    val_loader: Iterable[Any] | None = None,
    *,
    teacher: nn.Module,
    epochs: int,
    widths: Mapping[str, int] | None = None,
    deepen: Sequence[str] = (),
    noise: float = 0.0,
    init: str = "net2net",
    run_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    **fit_kwargs: Any,
) -> Net2NetResult:
    """Grow the trained ``teacher`` into a wider/deeper student with Net2Net, then train it on the labels.

    Args:
        student: the target architecture (a module or a zero-argument factory): its hidden layers' widths
            give ``widths`` when that is not given (:func:`widths_to_match`). The delivered model is the
            grown copy of the teacher (``result.student``), of the same widths.
        teacher: the trained small network (an ``nn.Module`` of the zoo's sequential kind: ``mlp``, ``cnn``,
            ``lenet5``...).
        widths: ``{layer path: new width}`` (Net2WiderNet), overriding the student's.
        deepen: submodule paths whose post-ReLU output gets an identity layer (Net2DeeperNet), e.g.
            ``["stage2.act"]``; BatchNorm is added when the teacher has BatchNorm.
        noise: Net2WiderNet's symmetry-breaking noise (relative std on the new replicas; ours, 0 = exact).
        init: ``"net2net"`` (function-preserving) or ``"random"`` (the paper's baseline: the grown
            architecture, randomly initialised).
        **fit_kwargs: passed to :func:`distill.fit` (optimizer, lr, schedule...). The paper trains the grown
            model with a smaller learning rate than the teacher's (its experiments; the value is the user's).
    """
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"net2net needs teacher= (the trained small nn.Module to grow); got {type(teacher).__name__}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}; got {init!r}")
    if isinstance(deepen, str):
        raise TypeError(f"deepen must be a list of submodule paths; got the string {deepen!r}")
    if widths is None:
        widths = widths_to_match(teacher, as_model(student, "net2net"))
    widths = dict(widths)
    first = next(iter(train_loader), None)
    if first is None:
        raise ValueError("net2net: the training loader yielded no batch")
    example = as_batch(first).inputs
    device = next(iter(teacher.parameters())).device
    example = example.to(device)
    g = torch.Generator().manual_seed(seed)
    model = grow(teacher, widths, list(deepen), example=example, noise=noise, generator=g)
    gap: float | None = None
    if init == "random":
        _reinit(model, seed)
    else:
        was_t, was_m = teacher.training, model.training
        teacher.eval()
        model.eval()
        with torch.no_grad():
            gap = float((logits_of(model(example)) - logits_of(teacher(example))).abs().max())
        teacher.train(was_t)
        model.train(was_m)
    res = fit(Distiller(model, None, {"ce": 1.0}), train_loader, val_loader, epochs=epochs, run_dir=run_dir,
              seed=seed, progress=progress, **fit_kwargs)
    return Net2NetResult(history=res.history, best_acc=res.best_acc, best_epoch=res.best_epoch, last_acc=res.last_acc,
                         run_dir=res.run_dir, time_s=res.time_s, student=model, widths=widths,
                         deepened=list(deepen), function_gap=gap)
