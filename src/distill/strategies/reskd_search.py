"""ResKD with its res-students searched in a family of candidates, and a rule for when to stop.

:func:`~distill.strategies.chain.reskd` trains the res-students the user lists. ResKD (Li et al.,
"ResKD: Residual-Guided Knowledge Distillation", IEEE TIP 2021, arXiv 2006.04719) finds them and
decides how many to add. :func:`reskd_search` does both here:

* :func:`search_res_students`, the search as a pure loop over a ``trial`` callback (train a candidate
  on the residual, return the held-out accuracy of the chain with it), so its order and its stop
  can be checked without training anything;
* :func:`reskd_search`, the strategy: stage 0 is ResKD's student by KD, then the search trains
  candidates from ``family`` on the residual (:class:`~distill.strategies.chain.ResidualStudent`,
  the parts before frozen) and keeps the ones it accepts; the result carries each stage's
  held-out and validation accuracy, its cost relative to the teacher, every trial, the reason
  the search stopped, and ResKD's sample-adaptive inference over the delivered chain;
* :func:`count_macs` / :func:`model_cost`, the cost measures.

What could be read of the paper: its abstract and the first page of its ar5iv rendering (the
res-student is "much more lightweight" than the student it corrects; the process "can be repeated
until the user strikes the balance between accuracy and cost"), and one secondary summary (a
Chinese KD-survey table on GitHub) saying the res-students are found by neural architecture search
and an "energy entropy" sets the stopping condition. The method section (the search space, the
search algorithm, the definition of that entropy and its threshold) could not be read, and no
code is published. So the search and the stop below are **this library's**, built only on what
the abstract says, and are not checked against the paper:

* search: cheapest first in a user-given family, the first candidate whose held-out gain reaches
  ``min_gain`` is kept (the lightest res-student that still rectifies enough);
* stop: no candidate reaches ``min_gain``, or none fits the cost budget ``max_cost`` (the whole
  chain's cost relative to the teacher's), or ``max_stages`` res-students are in;
* sample-adaptive inference: the confidence test of :func:`~distill.strategies.chain.reskd_confident`
  (also this library's rule, as ``reskd`` documents).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from distill.batch import as_batch
from distill.methods.logits import KD, CrossEntropy, LogitRegression
from distill.strategies.chain import (
    RESKD_PAPER,
    AdaptiveResidualStudent,
    ModelSpec,
    ResidualStudent,
    ResKDResult,
    _check_epochs,
    _check_positive,
    _check_spec_list,
    _check_stop_rule,
    _check_trained_teacher,
    _check_weight,
    _train_stage,
    _with_labels,
    _with_stages,
    build_model,
    check_model_spec,
    check_stage_resume,
    evaluate_adaptive,
)
from distill.strategies.registry import register_strategy
from distill.taps import logits_of
from distill.train.loop import FitResult

__all__ = [
    "COST_MEASURES",
    "ResKDSearchResult",
    "SearchStep",
    "SearchOutcome",
    "count_macs",
    "model_cost",
    "reskd_search",
    "search_res_students",
]

COST_MEASURES = ("params", "macs")
"""What :func:`model_cost` counts: parameters, or multiply-accumulates of one sample's forward."""


# ---------------------------------------------------------------------------------------- cost


@torch.no_grad()
def count_macs(model: nn.Module, example: Tensor) -> int:
    """Multiply-accumulates of one sample's forward through ``model``'s ``nn.Conv{1,2,3}d`` and
    ``nn.Linear`` layers (the layers that dominate a CNN's compute; norms, activations, pooling and
    additions are not counted).

    For a convolution with output ``(C_out, *S)`` per sample, ``C_in / groups`` input channels and a
    kernel of ``k`` elements: ``C_out · prod(S) · (C_in / groups) · k``; for a linear layer with
    ``M`` output rows of ``F_out`` features per sample: ``M · F_out · F_in``. ``example``: one batch
    ``(B, ...)`` (B >= 1); the count is per sample (total / B). The model runs once in eval mode
    and is put back in the mode it was in.
    """
    if not isinstance(example, Tensor) or example.dim() < 1 or example.shape[0] < 1:
        raise ValueError(f"count_macs needs an example batch (B, ...) with B >= 1, got "
                         f"{tuple(example.shape) if isinstance(example, Tensor) else type(example).__name__}")
    total = 0

    def conv_hook(m: nn.Module, _inp: Any, out: Tensor) -> None:
        nonlocal total
        assert isinstance(m, nn.modules.conv._ConvNd)
        total += out.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)

    def linear_hook(m: nn.Module, _inp: Any, out: Tensor) -> None:
        nonlocal total
        assert isinstance(m, nn.Linear)
        total += out.numel() * m.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        model(example)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total // example.shape[0]


def model_cost(model: nn.Module, measure: str = "params", example: Tensor | None = None) -> int:
    """``model``'s cost: its number of parameters (``"params"``) or the multiply-accumulates of one
    sample's forward (``"macs"``, :func:`count_macs`, needs ``example`` (B, ...))."""
    if measure not in COST_MEASURES:
        raise ValueError(f"cost must be one of {COST_MEASURES}, got {measure!r}")
    if measure == "params":
        return sum(p.numel() for p in model.parameters())
    if example is None:
        raise ValueError("cost='macs' needs an example input batch (B, ...)")
    return count_macs(model, example)


# ---------------------------------------------------------------------------------------- search


@dataclass(frozen=True)
class SearchStep:
    """One trial of the search: at ``stage`` (1 = the first res-student), family member
    ``candidate`` (its index in ``family``) of cost ``cost`` was trained on the residual; the chain
    with it reached held-out accuracy ``acc`` (%), ``gain`` = ``acc`` minus the chain's accuracy
    before it (points); ``accepted`` says whether it joined the chain."""

    stage: int
    candidate: int
    cost: float
    acc: float
    gain: float
    accepted: bool


@dataclass
class SearchOutcome:
    """What :func:`search_res_students` found: ``chosen`` (family indices of the accepted
    res-students, in chain order), ``accs`` (held-out accuracy (%) of the chain after stage 0..R),
    ``costs`` (the chain's total cost after stage 0..R, in the units of ``costs``), ``steps`` (every
    trial, in order) and ``stop_reason``: ``"min_gain"`` (the last stage's eligible candidates all
    gained less than ``min_gain``), ``"budget"`` (no candidate left fits ``max_cost``), ``"family"``
    (no candidate is as light as the last part, with ``monotone``) or ``"max_stages"``."""

    chosen: list[int] = field(default_factory=list)
    accs: list[float] = field(default_factory=list)
    costs: list[float] = field(default_factory=list)
    steps: list[SearchStep] = field(default_factory=list)
    stop_reason: str = ""


def _check_search_args(costs: Sequence[float], base_cost: float, teacher_cost: float, min_gain: float,
                       max_cost: float, max_stages: int) -> None:
    if isinstance(costs, (str, bytes)) or not isinstance(costs, Sequence) or not costs:
        raise ValueError(f"costs must be a non-empty list of the candidates' costs, got {costs!r}")
    for name, value in [*(("costs[%d]" % i, c) for i, c in enumerate(costs)), ("base_cost", base_cost),
                        ("teacher_cost", teacher_cost)]:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    if isinstance(min_gain, bool) or not isinstance(min_gain, (int, float)) or not math.isfinite(min_gain):
        raise ValueError(f"min_gain must be a finite number of accuracy points, got {min_gain!r}")
    if isinstance(max_cost, bool) or not isinstance(max_cost, (int, float)) or not max_cost > 0 \
            or math.isnan(max_cost):
        raise ValueError(f"max_cost must be a positive number (the chain's cost / the teacher's), got {max_cost!r}")
    if isinstance(max_stages, bool) or not isinstance(max_stages, int) or max_stages < 1:
        raise ValueError(f"max_stages must be a positive int, got {max_stages!r}")


def search_res_students(
    base_acc: float,
    base_cost: float,
    costs: Sequence[float],
    trial: Callable[[int, int], float],
    *,
    teacher_cost: float,
    min_gain: float = 0.5,
    max_cost: float = 1.0,
    max_stages: int = 4,
    monotone: bool = True,
    accept: Callable[[int, int], None] | None = None,
) -> SearchOutcome:
    r"""The res-student search (this library's rule; ResKD's own could not be read, see the module).

    The chain starts as the student alone, held-out accuracy ``base_acc`` (%), cost ``base_cost``.
    Stage :math:`k = 1, 2, \dots` tries the family's candidates cheapest first (ties: the family's
    order), skipping

    * with ``monotone``, any candidate costlier than the chain's last part (the student at stage 1):
      a res-student is no heavier than the part it corrects (the abstract: "much more lightweight");
    * any candidate that would take the chain's total cost over ``max_cost · teacher_cost``;

    and for each calls ``trial(k, i)``: train candidate ``i`` on the residual of the chain so far,
    return the held-out accuracy of the chain with it. The first candidate with
    :math:`\text{acc} - \text{acc}_{k-1} \ge` ``min_gain`` joins the chain (``accept(k, i)`` is then
    called) and stage :math:`k + 1` starts; the others are dropped. The search stops when a stage
    keeps none (``"min_gain"``), when no candidate fits the budget (``"budget"``), when none is
    light enough (``"family"``) or after ``max_stages`` res-students (``"max_stages"``).

    Args:
        base_acc, base_cost: the student's held-out accuracy (%) and cost.
        costs: ``costs[i]``, the cost of family member ``i`` (same units as ``base_cost``).
        trial: ``(stage, candidate index) -> held-out accuracy (%)`` of the chain with it.
        teacher_cost: the teacher's cost (same units), the budget's reference.
        min_gain: the least held-out gain (accuracy points) a res-student must bring.
        max_cost: the budget, the chain's total cost over the teacher's (1.0: as costly as the teacher).
        max_stages: the most res-students.
        monotone: only candidates no costlier than the chain's last part.
        accept: called with ``(stage, candidate index)`` when a candidate joins the chain.

    Returns:
        a :class:`SearchOutcome`.
    """
    _check_search_args(costs, base_cost, teacher_cost, min_gain, max_cost, max_stages)
    if not callable(trial):
        raise TypeError(f"trial must be a callable (stage, candidate) -> accuracy, got {type(trial).__name__}")
    order = sorted(range(len(costs)), key=lambda i: (costs[i], i))
    out = SearchOutcome(accs=[float(base_acc)], costs=[float(base_cost)])
    last_part, total, acc = float(base_cost), float(base_cost), float(base_acc)
    for stage in range(1, max_stages + 1):
        light = [i for i in order if not monotone or costs[i] <= last_part]
        if not light:
            out.stop_reason = "family"
            return out
        eligible = [i for i in light if (total + costs[i]) / teacher_cost <= max_cost]
        if not eligible:
            out.stop_reason = "budget"
            return out
        kept = None
        for i in eligible:
            new_acc = float(trial(stage, i))
            gain = new_acc - acc
            ok = gain >= min_gain
            out.steps.append(SearchStep(stage, i, float(costs[i]), new_acc, gain, ok))
            if ok:
                kept = i
                acc, total, last_part = new_acc, total + costs[i], float(costs[i])
                break
        if kept is None:
            out.stop_reason = "min_gain"
            return out
        out.chosen.append(kept)
        out.accs.append(acc)
        out.costs.append(total)
        if accept is not None:
            accept(stage, kept)
    out.stop_reason = "max_stages"
    return out


# ---------------------------------------------------------------------------------------- strategy


@dataclass
class ResKDSearchResult(ResKDResult):
    """:class:`~distill.strategies.chain.ResKDResult` of the searched chain (``stages`` /
    ``models``: stage 0 then each accepted res-student's stage; rejected trials are not in them)
    plus the search.

    ``chosen``: family indices of the accepted res-students; ``steps``: every trial
    (:class:`SearchStep`); ``stop_reason``: why the search stopped (:class:`SearchOutcome`);
    ``stage_held_out_acc[k]``: held-out accuracy (%) of the chain after stage ``k``;
    ``stage_val_acc[k]``: its last-epoch validation accuracy (``None`` without ``val_loader``);
    ``stage_cost[k]``: the chain's total cost after stage ``k``; ``part_cost[j]``: part ``j``'s
    cost (``j = 0`` the student); ``teacher_cost``; ``cost_measure``; ``adaptive_cost``: the mean
    cost per validation sample of the sample-adaptive inference,
    ``part_cost[0] + Σ_k part_usage[k-1] · part_cost[k]`` (``None`` without ``val_loader``).
    """

    chosen: list[int] = field(default_factory=list)
    steps: list[SearchStep] = field(default_factory=list)
    stop_reason: str = ""
    stage_held_out_acc: list[float] = field(default_factory=list)
    stage_val_acc: list[float | None] = field(default_factory=list)
    stage_cost: list[float] = field(default_factory=list)
    part_cost: list[float] = field(default_factory=list)
    teacher_cost: float = 0.0
    cost_measure: str = "params"
    adaptive_cost: float | None = None


@torch.no_grad()
def _top1(model: nn.Module, loader: Iterable[Any]) -> float:
    """Top-1 (%) of ``model`` on ``loader``, in eval mode (put back as it was)."""
    params = next(iter(model.parameters()), None)
    device = params.device if params is not None else None
    was_training = model.training
    model.eval()
    n = correct = 0
    try:
        for raw in loader:
            batch = as_batch(raw)
            if device is not None:
                batch = batch.to(device)
            if batch.targets is None:
                raise ValueError("reskd_search's held-out loader must yield labelled batches")
            pred = logits_of(model(batch.inputs)).argmax(1)
            n += int(pred.shape[0])
            correct += int((pred == batch.targets).sum())
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("the held-out loader yielded no samples")
    return 100.0 * correct / n


@register_strategy("reskd_search", "chain", RESKD_PAPER)
def reskd_search(
    student: ModelSpec,
    train_loader: Iterable[Any],
    val_loader: Iterable[Any] | None = None,
    *,
    epochs: int,
    teacher: nn.Module,
    family: Sequence[ModelSpec],
    held_out: Iterable[Any] | None = None,
    min_gain: float = 0.5,
    max_cost: float = 1.0,
    max_stages: int = 4,
    monotone: bool = True,
    cost: str = "params",
    run_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    T: float = 4.0,
    kd_weight: float = 0.9,
    ce_weight: float = 0.0,
    threshold: float = 0.9,
    criterion: str = "max_prob",
    **fit_kwargs: Any,
) -> ResKDSearchResult:
    """ResKD with its res-students searched in ``family`` and a stopping rule (both this library's).

    Stage 0 trains ``student`` as :func:`~distill.strategies.chain.reskd` does,
    ``(1 - λ) CE + λ KD(T)`` from the teacher. Then :func:`search_res_students`: at stage ``k`` the
    candidates of ``family`` are tried cheapest first; each is built fresh and trained alone (the
    chain before it frozen) so that the chain's summed logits regress the teacher's,
    ``1/(2B) Σ_b ‖Σ_j z_j(x_b) - t(x_b)‖²`` (+ ``ce_weight`` · CE on the sum), i.e. it learns the
    residual; the first whose held-out gain reaches ``min_gain`` points is kept. The search stops
    when a stage keeps none, when the chain's cost would pass ``max_cost`` times the teacher's,
    when no candidate is as light as the last part (``monotone``), or after ``max_stages``.

    Args:
        student: the base student (a model, a factory, a zoo name or a zoo spec).
        teacher: the trained teacher.
        family: the candidate res-students (factories, zoo names or zoo specs: each trial builds a
            fresh one), each giving the teacher's number of classes; e.g. the zoo's ``cnn`` at
            several widths.
        held_out: labelled data the search scores candidates on; default ``val_loader`` (then the
            validation accuracy reported is the one the search selected on, an optimistic figure:
            pass a split of the training data to keep the validation data untouched).
        min_gain: the least held-out gain (top-1 points) a res-student must bring (ours: 0.5).
        max_cost: the budget, the whole chain's cost over the teacher's (ours: 1.0).
        max_stages: the most res-students (ours: 4).
        monotone: a res-student is no costlier than the part before it (ours, from the abstract's
            "much more lightweight").
        cost: ``"params"`` (parameters) or ``"macs"`` (multiply-accumulates of one sample,
            :func:`count_macs`, measured on the first training batch).
        epochs: epochs per stage and per trial.
        T, kd_weight: stage 0's KD temperature and λ (this library's KD baseline: T = 4, λ = 0.9).
        ce_weight: weight of the label term of the res-students' stages.
        threshold, criterion: the sample-adaptive inference's confidence test
            (:func:`~distill.strategies.chain.reskd_confident`; this library's rule).
        run_dir: stage 0 writes to ``run_dir/stage0``, the trial of family member ``i`` at stage
            ``k`` to ``run_dir/stage<k>/cand<i>``; seed: stage ``k``'s trials train with ``seed + k``.
        **fit_kwargs: passed to every :func:`distill.fit` (``resume`` is not supported: the search
            decides from the trials' held-out accuracies, which a resumed run would have to replay).

    Returns:
        a :class:`ResKDSearchResult`.

    Sources: what could be read of ResKD (Li et al., IEEE TIP 2021, arXiv 2006.04719) is its
    abstract, the first page of its ar5iv rendering and a secondary summary (res-students found by
    architecture search, an "energy entropy" stopping condition); the search, its order, the
    stopping rule and every default above are this library's, not the paper's.
    """
    epochs = _check_epochs(epochs)
    _check_trained_teacher(teacher)
    check_model_spec(student, "student")
    _check_spec_list(family, "family", allow_empty=False)
    for i, spec in enumerate(family):
        check_model_spec(spec, f"family[{i}]", fresh=True)
    if cost not in COST_MEASURES:
        raise ValueError(f"cost must be one of {COST_MEASURES}, got {cost!r}")
    if held_out is None and val_loader is None:
        raise ValueError("reskd_search needs held_out (or val_loader) data to score the candidates on")
    T = _check_positive("T", T)
    kd_weight = _check_positive("kd_weight", kd_weight, 0.0, 1.0)
    ce_weight = _check_weight("ce_weight", ce_weight)
    threshold = _check_stop_rule(threshold, criterion)
    if not isinstance(monotone, bool):
        raise ValueError(f"monotone must be True or False, got {monotone!r}")
    _check_search_args([1.0], 1.0, 1.0, min_gain, max_cost, max_stages)
    if fit_kwargs.get("resume"):
        raise ValueError("reskd_search: resume is not supported (the search replays its trials' held-out scores)")
    check_stage_resume(fit_kwargs, "reskd_search", run_dir)
    scoring = held_out if held_out is not None else val_loader
    assert scoring is not None
    root = Path(run_dir) if run_dir is not None else None

    example = None
    if cost == "macs":
        example = as_batch(next(iter(train_loader))).inputs[:1]

    def cost_of(model: nn.Module) -> float:
        return float(model_cost(model, cost, None if example is None else example.to(_device_of(model))))

    parts = [build_model(student, "student")]  # first, as reskd does: the same seed gives the same student
    with torch.random.fork_rng(devices=[]):  # measuring the candidates' costs leaves the global RNG as it was
        family_costs = [cost_of(build_model(spec, f"family[{i}]")) for i, spec in enumerate(family)]
    teacher_cost = cost_of(teacher)

    stages: list[FitResult] = []
    models: list[nn.Module] = []
    model: nn.Module = ResidualStudent(parts)
    stages.append(_train_stage(model, teacher, _with_labels(KD(T=T, weight=kd_weight), kd_weight), train_loader,
                               val_loader, epochs=epochs, run_dir=root / "stage0" if root else None, seed=seed,
                               progress=progress, hand_over="last", fit_kwargs=fit_kwargs))
    models.append(model)
    base_acc = _top1(ResidualStudent(parts, frozen=1), scoring)
    part_cost = [cost_of(parts[0])]
    trials: dict[tuple[int, int], tuple[nn.Module, nn.Module, FitResult]] = {}

    def trial(stage: int, i: int) -> float:
        candidate = build_model(family[i], f"family[{i}]")
        chain = ResidualStudent([*parts, candidate], frozen=len(parts))
        losses: dict[str, Any] = {"residual": LogitRegression()}
        if ce_weight > 0:
            losses["ce"] = CrossEntropy(weight=ce_weight)
        result = _train_stage(chain, teacher, losses, train_loader, val_loader, epochs=epochs,
                              run_dir=root / f"stage{stage}" / f"cand{i}" if root else None, seed=seed + stage,
                              progress=progress, hand_over="last", fit_kwargs=fit_kwargs)
        trials[(stage, i)] = (candidate, chain, result)
        return _top1(chain, scoring)

    def accept(stage: int, i: int) -> None:
        candidate, chain, result = trials.pop((stage, i))
        parts.append(candidate)
        part_cost.append(family_costs[i])
        stages.append(result)
        models.append(chain)
        trials.clear()  # the rejected trials of this stage are dropped

    outcome = search_res_students(base_acc, part_cost[0], family_costs, trial, teacher_cost=teacher_cost,
                                  min_gain=min_gain, max_cost=max_cost, max_stages=max_stages, monotone=monotone,
                                  accept=accept)
    final = ResidualStudent(parts, frozen=len(parts))
    models[-1] = final
    adaptive = AdaptiveResidualStudent(final, threshold, criterion)
    stats: dict[str, Any] = {}
    adaptive_cost = None
    if val_loader is not None:
        stats = evaluate_adaptive(adaptive, val_loader, _device_of(final))
        adaptive_cost = part_cost[0] + sum(u * c for u, c in zip(stats["part_usage"], part_cost[1:], strict=True))
    return _with_stages(stages[-1], stages, models, ResKDSearchResult, adaptive=adaptive,
                        adaptive_acc=stats.get("acc"), avg_res_students=stats.get("avg_res_students"),
                        part_usage=stats.get("part_usage", []), chosen=outcome.chosen, steps=outcome.steps,
                        stop_reason=outcome.stop_reason, stage_held_out_acc=outcome.accs,
                        stage_val_acc=[s.last_acc for s in stages], stage_cost=outcome.costs, part_cost=part_cost,
                        teacher_cost=teacher_cost, cost_measure=cost, adaptive_cost=adaptive_cost)


def _device_of(model: nn.Module) -> torch.device | None:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else None
