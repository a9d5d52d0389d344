"""Multi-stage protocols that reuse ``fit``: FitNets' stage-1 hint training."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from distill.train.loop import FitResult, fit


def fit_hint_stage(distiller: Any, train_loader: Iterable[Any], *, method: str = "fitnet",
                   epochs: int, weight: float | None = None, **fit_kwargs: Any) -> FitResult:
    """FitNets stage 1 (Romero et al., ICLR 2015, arXiv 1412.6550): train the student up to its
    guided layer, and the regressor, with the hint loss alone.

    A temporary Distiller shares the student, the teacher and the hint method of ``distiller``
    with only that loss: parameters above the guided layer get no gradient, and the optimizers
    skip parameters without one, so only the layers the paper trains in stage 1 move.
    Stage 2 is then an ordinary ``fit(distiller, ...)`` (KD, or the losses you chose).

    ``weight``: the loss weight during this stage (default: the method's own, or 1 when that is
    0, i.e. when the method only initialises, as AB does, and is off in stage 2).

    ``method`` may also name a stage that one of the losses offers (``Method.stages``): FT's
    ``"ft_paraphraser"`` pre-trains FT's paraphraser (Kim et al., NeurIPS 2018, arXiv 1802.04977).
    """
    from distill.distiller import Distiller

    offered_stage = method not in distiller.methods
    if not offered_stage:
        hint = distiller.methods[method]
    else:  # a stage a method offers (FT's paraphraser pre-training), sharing that method's parts
        owners = [m for m in distiller.methods.values() if method in m.stages]
        if not owners:
            offered = sorted({s for m in distiller.methods.values() for s in m.stages})
            raise KeyError(f"the distiller has no loss or stage named {method!r}; it has losses "
                           f"{list(distiller.methods)}" + (f" and stages {offered}" if offered else ""))
        if not distiller.prepared:  # the owner's parts (FT's paraphraser) are built by prepare
            distiller.prepare(next(iter(train_loader)))
        hint = owners[0].stage_method(method)
        # the stage may unfreeze the owner's parts (FT's paraphraser): restore the flags afterwards
        flags = [(p, p.requires_grad) for p in owners[0].parameters()]
    main_weight = hint.weight
    stage_weight = weight if weight is not None else (main_weight or 1.0)
    stage = Distiller(distiller.student, distiller.teacher, losses={method: (stage_weight, hint)})
    if offered_stage:  # a fresh stage loss builds (and unfreezes) its parts before the optimizer
        stage.prepare(next(iter(train_loader)))
    elif distiller.prepared:
        stage.prepared = True
    else:  # build the hint's adapter now, on the Distiller the stage-2 optimizer will read
        distiller.prepare(next(iter(train_loader)))
        stage.prepared = True
    try:
        result = fit(stage, train_loader, None, epochs=epochs, **fit_kwargs)
    finally:
        hint.weight = main_weight
        if offered_stage:
            for p, flag in flags:
                p.requires_grad_(flag)
        stage.detach_taps()
        distiller.attach()
    return result
