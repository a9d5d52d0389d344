"""Online distillation strategies: models that teach each other while they train.

* :func:`fit_dml`: deep mutual learning, a cohort of k networks each taught by the others.
* :func:`fit_okddip`: online KD with diverse peers, attention-weighted targets and a group leader.
* :func:`fit_rocket`: rocket launching, a light net and a booster net sharing their lower layers
  (:class:`RocketNet`); an ordinary :func:`distill.fit` run with the losses of
  :mod:`distill.methods.online`.
* :func:`fit_okdhp`: online KD for dense outputs, branches of a :class:`MultiBranchNet` taught by
  their ensemble, weighted per channel by a :class:`FeatureAggregationUnit`.

The math is in :mod:`distill.functional.online`. DML, OKDDip and OKDHP train several outputs at
once with their own update rules, so they run one small loop (:func:`_run_cohort`) built from the
library's pieces: :func:`~distill.train.schedules.make_optimizer`, :class:`~distill.train.schedules.Schedule`,
:func:`~distill.train.evaluate.evaluate`, :func:`~distill.train.checkpoint.save_checkpoint`, the
seeding and the progress bar of :func:`distill.fit`. It takes ``fit``'s optimisation keywords
(optimizer, lr, momentum, weight_decay, nesterov, schedule, milestones, gamma, grad_clip, device,
deterministic, checkpoint_every, on_epoch_end, resume, overwrite, fingerprint), trains in float32, and
resumes from its ``last.pt`` (every module, optimizer, schedule, the random state and each member's best
epoch). Its run folder is guarded as ``fit``'s (:mod:`distill.train.rundir`): locked for the run, never
silently replaced, resumed only under the fingerprint its checkpoint records (by default the
optimisation keywords, the members and every model's parameter shapes).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from distill import functional as DF
from distill.batch import Batch, as_batch
from distill.distiller import Distiller
from distill.files import atomic_write_text
from distill.functional.online import AGGREGATIONS, DENSE_KD_LOSSES
from distill.methods.base import Paper
from distill.methods.online import RocketBoosterCE, RocketHint
from distill.strategies.chain import ModelSpec
from distill.strategies.cohort_nets import FeatureAggregationUnit, MultiBranchNet, RocketNet, _positive_int
from distill.strategies.composite import okdhp_student, rocket_student
from distill.strategies.registry import register_strategy
from distill.taps import Taps, logits_of
from distill.train import distributed as D
from distill.train.checkpoint import rng_state, save_checkpoint, set_rng_state
from distill.train.evaluate import evaluate
from distill.train.loop import (
    EpochLosses,
    FitResult,
    NonFiniteLossError,
    _load_resume,
    _Progress,
    fit,
    seed_everything,
)
from distill.train.rundir import (
    check_epochs,
    check_fingerprint,
    elapsed_so_far,
    normalize_fingerprint,
    open_run_dir,
)
from distill.train.schedules import Schedule, make_optimizer

__all__ = [
    "CohortFitResult",
    "FeatureAggregationUnit",
    "MultiBranchNet",
    "PeerAttention",
    "RocketFitResult",
    "RocketNet",
    "dml_step",
    "fit_dml",
    "fit_okddip",
    "fit_okdhp",
    "fit_rocket",
]

DML_UPDATES = ("sequential", "simultaneous")

# fit's optimisation keywords the cohort loop honours (their defaults are read from fit's signature)
_LOOP_KEYS = ("resume", "optimizer", "lr", "momentum", "weight_decay", "nesterov", "schedule", "milestones", "gamma",
              "grad_clip", "device", "deterministic", "on_epoch_end", "checkpoint_every", "overwrite", "fingerprint")
# what the cohort's default fingerprint holds besides the models' shapes (as fit's: what determines the result)
_FINGERPRINT_KEYS = ("optimizer", "lr", "momentum", "weight_decay", "nesterov", "schedule", "milestones", "gamma",
                     "grad_clip")


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


def _real(name: str, value: Any, *, positive: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = value > 0 if positive else value >= 0
    if not ok:
        raise ValueError(f"{name} must be a number {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


def _no_teacher(teacher: Any, who: str) -> None:
    if teacher is not None:
        raise ValueError(f"{who} is teacher-free (the models teach each other); got teacher={type(teacher).__name__}")


def _loop_config(fit_kwargs: dict[str, Any], who: str) -> dict[str, Any]:
    """The cohort loop's settings: fit's optimisation keywords with fit's defaults; anything else is refused."""
    if fit_kwargs.get("amp", False) not in (False, None, "off", "none", "auto"):
        raise ValueError(f"{who} trains in float32; amp={fit_kwargs['amp']!r} is not supported")
    fit_kwargs = {k: v for k, v in fit_kwargs.items() if k not in ("amp", "eval_teacher")}
    unknown = sorted(set(fit_kwargs) - set(_LOOP_KEYS))
    if unknown:
        raise TypeError(f"{who} got unknown argument(s) {unknown}; it accepts {sorted(_LOOP_KEYS)}")
    defaults = inspect.signature(fit).parameters
    cfg = {k: fit_kwargs.get(k, defaults[k].default) for k in _LOOP_KEYS}
    if cfg["grad_clip"] is not None:
        _real("grad_clip", cfg["grad_clip"], positive=True)
    _positive_int("checkpoint_every", cfg["checkpoint_every"])
    return cfg


def _models_from(student: Any, num_models: int | None, *, default: int, minimum: int, who: str) -> list[nn.Module]:
    """A cohort from a list of modules, or from a zero-argument factory called ``num_models`` times
    (``default`` when not given); at least ``minimum`` models."""
    if num_models is not None:
        _positive_int("num_models", num_models, minimum=minimum)
    if isinstance(student, nn.Module):
        raise TypeError(
            f"{who} trains several models: pass student as a list of nn.Modules or a zero-argument factory "
            f"(with num_models), not a single {type(student).__name__}"
        )
    if isinstance(student, (list, tuple)):
        models = list(student)
        if num_models is not None and num_models != len(models):
            raise ValueError(f"{who}: num_models={num_models} but {len(models)} models were given")
    elif callable(student):
        models = [student() for _ in range(num_models or default)]
    else:
        raise TypeError(f"{who}: student must be a list of nn.Modules or a zero-argument factory, "
                        f"got {type(student).__name__}")
    bad = [type(m).__name__ for m in models if not isinstance(m, nn.Module)]
    if bad:
        raise TypeError(f"{who}: every model must be an nn.Module, got {bad}")
    if len(models) < minimum:
        raise ValueError(f"{who} needs at least {minimum} models, got {len(models)}")
    return models


def _labels(batch: Batch, who: str) -> Tensor:
    if batch.targets is None:
        raise ValueError(f"{who} needs labelled batches, but a batch has no targets")
    return batch.targets


def _unique_params(modules: Iterable[nn.Module]) -> list[nn.Parameter]:
    seen: set[int] = set()
    out = []
    for module in modules:
        for p in module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


@contextlib.contextmanager
def _seeded(seed: int, deterministic: bool) -> Iterator[None]:
    """Seed as ``fit`` does (before any model is built, so a factory's initialisation is
    reproducible); the deterministic-algorithms mode (with its ``warn_only``) and cuDNN's flags that
    ``deterministic`` changes are given back as they were on exit."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    seed_everything(seed, deterministic)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[2], before[3]


def _train_modes(modules: Iterable[nn.Module]) -> dict[nn.Module, bool]:
    return {m: m.training for module in modules for m in module.modules()}


def _restore_modes(modes: dict[nn.Module, bool]) -> None:
    for m, mode in modes.items():
        m.training = mode


# --------------------------------------------------------------------------------------------
# The cohort loop
# --------------------------------------------------------------------------------------------


@dataclass
class CohortFitResult(FitResult):
    """:class:`~distill.train.loop.FitResult` of the delivered model plus every member's.

    ``members``: name → its own result, a ``CohortFitResult`` without members or models:
    ``best_score`` / ``last_score`` (and ``best_acc`` / ``last_acc`` for classifiers) its validation
    score; for dense members the validation MSE, with ``best_acc`` left ``None``.
    ``models``: name → the trained module. ``delivered``: the member the top-level fields describe.
    ``best_score`` / ``last_score``: the delivered member's validation score (its accuracy, or its
    MSE for dense outputs).
    """

    members: dict[str, CohortFitResult] = field(default_factory=dict)
    models: dict[str, nn.Module] = field(default_factory=dict)
    delivered: str = ""
    best_score: float | None = None
    last_score: float | None = None


@dataclass
class _Member:
    result: CohortFitResult = field(default_factory=CohortFitResult)
    best: float | None = None
    last: float | None = None


class _Updater:
    """Optimizer steps for one cohort: ``update(i, loss)`` steps optimizer i on ``loss``.

    Under torchrun each rank holds its part of the global batch: ``scale`` (``W · n_r / n``, set by
    the loop each step) turns this rank's mean loss into its share of the global batch's mean, and
    the gradients are averaged over the ranks before the step (:func:`~distill.train.distributed.average_gradients`,
    which also stops every rank when any rank's loss is non-finite).
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer], params: list[list[nn.Parameter]],
                 grad_clip: float | None, distributed: bool = False) -> None:
        self.optimizers, self.params, self.grad_clip = optimizers, params, grad_clip
        self.distributed = distributed
        self.scale = 1.0
        self.where = ""

    def _error(self, loss: Tensor, name: str) -> NonFiniteLossError:
        value = float(loss) if not torch.isfinite(loss) else "finite here, non-finite on another rank"
        return NonFiniteLossError(f"loss {name!r} became non-finite ({value}) at {self.where}; "
                                  "the step was not applied")

    def _backward(self, loss: Tensor, name: str, groups: list[list[nn.Parameter]]) -> None:
        if not self.distributed:
            if not torch.isfinite(loss):
                raise self._error(loss, name)
            loss.backward()
            return
        (loss * self.scale if self.scale != 1.0 else loss).backward()
        if D.average_gradients([p for g in groups for p in g], ~torch.isfinite(loss.detach())):
            raise self._error(loss, name)

    def _clip(self, params: list[nn.Parameter]) -> None:
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)

    def update(self, i: int, loss: Tensor, name: str) -> None:
        opt = self.optimizers[i]
        opt.zero_grad(set_to_none=True)
        self._backward(loss, name, [self.params[i]])
        self._clip(self.params[i])
        opt.step()

    def update_all(self, loss: Tensor, name: str) -> None:
        """One backward of ``loss`` and a step of every optimizer (their parameters are disjoint)."""
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        self._backward(loss, name, self.params)
        for opt, params in zip(self.optimizers, self.params):
            self._clip(params)
            opt.step()


StepFn = Callable[[Batch, int, _Updater], tuple[Tensor, dict[str, Tensor]]]
EvalFn = Callable[[torch.device], tuple[dict[str, float], dict[str, float]]]


def _run_cohort(
    modules: dict[str, nn.Module],
    groups: list[list[nn.Parameter]],
    train_loader: Iterable[Any],
    *,
    epochs: int,
    step: StepFn,
    evaluate_fn: EvalFn | None,
    delivered: str,
    maximize: bool,
    cfg: dict[str, Any],
    run_dir: str | Path | None,
    progress: bool,
    members: Sequence[str],
    best_module: nn.Module | None = None,
) -> CohortFitResult:
    """Train ``modules`` for ``epochs`` epochs with ``step`` (which runs the optimizers itself).

    ``groups``: the parameters of each optimizer. ``evaluate_fn(device)`` returns (per-member
    scores, other metrics) on the validation data; the best epoch is tracked per member, the top
    level describes ``delivered``. Writes ``metrics.jsonl``, ``checkpoints/last.pt`` (every module,
    optimizer and schedule) and ``checkpoints/best.pt`` (the weights of ``best_module``, by default
    the delivered member's module, at the delivered member's best epoch).

    Under torchrun (as :func:`distill.fit`): every rank starts from rank 0's weights, trains on its
    part of each global batch (:func:`~distill.train.distributed.shard_loader`) with gradients
    averaged over the ranks, so the ranks' models stay equal; rank 0 evaluates, writes the files and
    shows progress, and its BatchNorm statistics are given to every rank at the end of each epoch
    (DDP gives rank 0's buffers to every rank before each forward: the same end state).
    """
    best_module = best_module if best_module is not None else modules[delivered]
    device = torch.device(cfg["device"]) if cfg["device"] is not None else \
        next(iter(_unique_params(modules.values())), torch.empty(0)).device
    info = D.dist_info()
    if info.enabled:
        device = D.resolve_device(device, info)
        info = D.init_distributed(device)
    for module in modules.values():
        module.to(device)
    D.broadcast_state(modules.values())
    with contextlib.ExitStack() as lock, D.shard_loader(train_loader, info):
        # as fit: the folder locked for the run, cleared (overwrite), results never silently replaced
        open_run_dir(Path(run_dir) if run_dir is not None else None, resume=cfg["resume"],
                     overwrite=cfg["overwrite"], info=info, stack=lock, what="cohort fit")
        return _cohort_epochs(modules, groups, train_loader, epochs=epochs, step=step, evaluate_fn=evaluate_fn,
                              delivered=delivered, maximize=maximize, cfg=cfg, run_dir=run_dir, progress=progress,
                              members=members, best_module=best_module, device=device, info=info)


def _cohort_epochs(
    modules: dict[str, nn.Module], groups: list[list[nn.Parameter]], train_loader: Iterable[Any], *, epochs: int,
    step: StepFn, evaluate_fn: EvalFn | None, delivered: str, maximize: bool, cfg: dict[str, Any],
    run_dir: str | Path | None, progress: bool, members: Sequence[str], best_module: nn.Module,
    device: torch.device, info: D.DistInfo,
) -> CohortFitResult:
    steps_per_epoch = len(train_loader) if hasattr(train_loader, "__len__") else 1  # type: ignore[arg-type]
    optimizers = [make_optimizer(g, cfg["optimizer"], lr=cfg["lr"], momentum=cfg["momentum"],
                                 weight_decay=cfg["weight_decay"], nesterov=cfg["nesterov"]) for g in groups]
    schedules = [Schedule(o, cfg["schedule"], epochs=epochs, steps_per_epoch=steps_per_epoch,
                          milestones=cfg["milestones"], gamma=cfg["gamma"]) for o in optimizers]
    updater = _Updater(optimizers, groups, cfg["grad_clip"], distributed=info.enabled)
    write = info.is_main and run_dir is not None
    run_path = Path(run_dir) if run_dir is not None else None
    ckpt_dir = run_path / "checkpoints" if run_path is not None else None
    tracked = {name: _Member() for name in members}
    result = CohortFitResult(run_dir=run_path, delivered=delivered, models=dict(modules))
    spec = normalize_fingerprint(cfg["fingerprint"]) if cfg["fingerprint"] is not None else normalize_fingerprint({
        "fit": {k: cfg[k] for k in _FINGERPRINT_KEYS}, "delivered": delivered, "members": list(members),
        "models": {n: {k: list(v.shape) for k, v in m.state_dict().items()} for n, m in modules.items()}})
    start_epoch, elapsed_before = 0, 0.0
    if cfg["resume"]:
        state = _load_resume(cfg["resume"], ckpt_dir, device, info)
        if state is not None:
            where = cfg["resume"] if not isinstance(cfg["resume"], bool) else ckpt_dir / "last.pt"  # type: ignore[operator]
            check_fingerprint(state, spec, where)
            check_epochs(state, epochs, cfg["schedule"], cfg["milestones"], where)
            elapsed_before = elapsed_so_far(state)
            start_epoch = _restore_cohort(state, modules, optimizers, schedules, tracked, result)
    if write:
        run_path.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
        # afresh from the history so far: a resumed run never keeps lines of the epochs it redoes
        atomic_write_text(run_path / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in result.history))  # type: ignore[operator]
    bar = _Progress(progress and info.is_main, epochs, steps_per_epoch)
    session_t0 = time.perf_counter()
    try:
        for epoch in range(start_epoch, epochs):
            t0 = time.perf_counter()
            D.set_loader_epoch(train_loader, epoch)
            for module in modules.values():
                module.train()
            bar.start_epoch(epoch)
            losses = EpochLosses(device)
            for i, raw in enumerate(train_loader):
                batch = as_batch(raw).to(device, non_blocking=True)
                updater.where = f"epoch {epoch} step {i}"
                share = 1.0  # this rank's part of the step's global batch
                if info.enabled:
                    n_global, _ = D.step_sizes(len(batch), torch.zeros((), dtype=torch.bool), device)
                    share = len(batch) / n_global
                    updater.scale = share * info.world_size
                total, parts = step(batch, epoch, updater)
                for s in schedules:
                    s.step_batch()
                losses.add(total, parts, share)
                bar.advance(float(total) if bar.wants_loss(i) else None)
            row: dict[str, Any] = {"epoch": epoch, "lr": optimizers[0].param_groups[0]["lr"],
                                   **losses.means(info.enabled)}
            if info.enabled:
                D.broadcast_state(modules.values(), buffers_only=True)
            for s in schedules:
                s.step_epoch()
            if evaluate_fn is not None:
                scores, metrics = evaluate_fn(device) if info.is_main else ({}, {})
                scores, metrics = D.broadcast_object((scores, metrics))
                row.update({f"val_{k}": v for k, v in metrics.items()})
                for name, score in scores.items():
                    member = tracked[name]
                    member.last = score
                    improved = member.best is None or (score > member.best if maximize else score < member.best)
                    if improved:
                        member.best, member.result.best_epoch = score, epoch
                        if name == delivered and write:
                            save_checkpoint(ckpt_dir / "best.pt", {"student": best_module.state_dict(),  # type: ignore[operator]
                                                                  "epoch": epoch, "score": score, "fingerprint": spec})
                    member.result.history.append({"epoch": epoch, "val_score": score})
                if maximize:
                    row["val_student_acc"] = scores[delivered]
                    row["best_acc"] = tracked[delivered].best
            row["time_s"] = time.perf_counter() - t0
            result.history.append(row)
            bar.end_epoch(row)
            if write:
                with open(run_path / "metrics.jsonl", "a") as f:  # type: ignore[operator]
                    f.write(json.dumps(row) + "\n")
                if (epoch + 1) % cfg["checkpoint_every"] == 0 or epoch + 1 == epochs:
                    save_checkpoint(ckpt_dir / "last.pt", {  # type: ignore[operator]
                        "epoch": epoch, "history": result.history,
                        "models": {n: m.state_dict() for n, m in modules.items()},
                        "optimizers": [o.state_dict() for o in optimizers],
                        "schedules": [s.state_dict() for s in schedules],
                        "members": {n: {"best": m.best, "last": m.last, "best_epoch": m.result.best_epoch,
                                        "history": m.result.history} for n, m in tracked.items()},
                        "rng": rng_state(),
                        "fingerprint": spec, "epochs": epochs,  # what resume checks
                        "elapsed_s": elapsed_before + time.perf_counter() - session_t0,
                    })
            if cfg["on_epoch_end"] is not None:
                cfg["on_epoch_end"](row)
    finally:
        bar.close()
    result.time_s = elapsed_before + time.perf_counter() - session_t0
    if info.enabled:
        D.barrier()  # every rank leaves once rank 0 has written its files
    for name, member in tracked.items():
        member.result.best_score, member.result.last_score = member.best, member.last
        if maximize:
            member.result.best_acc, member.result.last_acc = member.best, member.last
        result.members[name] = member.result
    top = tracked.get(delivered)
    if top is not None:
        result.best_score, result.last_score, result.best_epoch = top.best, top.last, top.result.best_epoch
        if maximize:
            result.best_acc, result.last_acc = top.best, top.last
    return result


def _restore_cohort(state: dict[str, Any], modules: dict[str, nn.Module], optimizers: list[torch.optim.Optimizer],
                    schedules: list[Schedule], tracked: dict[str, _Member], result: CohortFitResult) -> int:
    """Load a cohort ``last.pt`` into the loop's pieces; returns the epoch to start from."""
    if "rng" not in state or set(state["models"]) != set(modules) or len(state["optimizers"]) != len(optimizers):
        raise ValueError(f"the checkpoint to resume from is not this cohort's (models {sorted(state['models'])}, "
                         f"{len(state['optimizers'])} optimizers; this run has {sorted(modules)}, {len(optimizers)}), "
                         "or was written by a version that could not resume")
    for name, module in modules.items():
        module.load_state_dict(state["models"][name])
    for opt, saved in zip(optimizers, state["optimizers"]):
        opt.load_state_dict(saved)
    for sched, saved in zip(schedules, state["schedules"]):
        sched.load_state_dict(saved)
    for name, saved in state["members"].items():
        member = tracked[name]
        member.best, member.last, member.result.best_epoch = saved["best"], saved["last"], saved["best_epoch"]
        member.result.history = list(saved["history"])
    result.history = list(state["history"])
    set_rng_state(state["rng"])
    return int(state["epoch"]) + 1


def _accuracy_eval(models: dict[str, nn.Module], val_loader: Iterable[Any] | None) -> EvalFn | None:
    """Top-1 accuracy of every member on ``val_loader`` with :func:`~distill.train.evaluate.evaluate`."""
    if val_loader is None:
        return None

    def run(device: torch.device) -> tuple[dict[str, float], dict[str, float]]:
        scores = {name: evaluate(SimpleNamespace(student=m), val_loader, device, with_teacher=False)["student_acc"]
                  for name, m in models.items()}
        return scores, {f"{name}_acc": acc for name, acc in scores.items()}

    return run


def _peers_with_shared_parameters(models: Sequence[nn.Module]) -> list[tuple[int, int]]:
    ids = [{id(p) for p in m.parameters()} for m in models]
    return [(i, j) for i in range(len(ids)) for j in range(i + 1, len(ids)) if ids[i] & ids[j]]


# --------------------------------------------------------------------------------------------
# DML
# --------------------------------------------------------------------------------------------


def _refreshed_logits(model: nn.Module, x: Tensor) -> Tensor:
    """The model's current prediction on ``x`` in its current mode, without gradient and without
    touching its buffers (a second forward in training mode would count the batch twice in the
    BatchNorm running statistics)."""
    saved = [b.clone() for b in model.buffers()]
    with torch.no_grad():
        out = logits_of(model(x))
        for b, s in zip(model.buffers(), saved):
            b.copy_(s)
    return out


def dml_step(models: Sequence[nn.Module], batch: Batch, updater: _Updater, T: float = 1.0,
             update: str = "sequential") -> dict[str, Tensor]:
    """One DML mini-batch: every network minimises CE + mean KL(p_j || p_i) to its detached peers.

    ``"sequential"`` (Algorithm 1 of the paper): the networks are updated in turn; before network i's
    update the predictions are brought up to date, so network i learns from the predictions of the
    networks already updated in this mini-batch (network 1 sees the old network 2, network 2 the
    updated network 1). Each network's forward with gradient is taken once at the start (its
    parameters do not change before its turn); after network i steps, its prediction is recomputed
    without gradient (and without counting the batch again in BatchNorm statistics).
    ``"simultaneous"``: one forward each, all losses from the same predictions, one backward, every
    optimizer steps (what most re-implementations do).

    Returns each network's loss (detached), keyed ``net0``, ``net1``, ...
    """
    x, y = batch.inputs, _labels(batch, "DML")
    logits = [logits_of(m(x)) for m in models]
    current = [z.detach() for z in logits]  # the peers' predictions are constants of each loss
    k = len(models)
    losses: dict[str, Tensor] = {}
    if update == "simultaneous":
        each = [DF.dml_loss(logits[i], [current[j] for j in range(k) if j != i], y, T) for i in range(k)]
        updater.update_all(sum(each), "dml")  # type: ignore[arg-type]
        return {f"net{i}": loss.detach() for i, loss in enumerate(each)}
    for i in range(k):
        loss = DF.dml_loss(logits[i], [current[j] for j in range(k) if j != i], y, T)
        updater.update(i, loss, f"net{i}")
        losses[f"net{i}"] = loss.detach()
        if i < k - 1:
            current[i] = _refreshed_logits(models[i], x)
    return losses


@register_strategy(
    "dml",
    "online",
    Paper(title="Deep Mutual Learning", authors="Y. Zhang, T. Xiang, T. M. Hospedales, H. Lu", year=2018,
          arxiv="1706.00384", venue="CVPR"),
)
def fit_dml(
    student: Sequence[nn.Module] | Callable[[], nn.Module],
    train_loader: Iterable[Any],
    val_loader: Iterable[Any] | None = None,
    *,
    teacher: None = None,
    epochs: int,
    run_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    num_models: int | None = None,
    T: float = 1.0,
    update: str = "sequential",
    **fit_kwargs: Any,
) -> CohortFitResult:
    """Deep mutual learning: a cohort of k networks, each trained with CE + mean KL to the others.

    Network i minimises :func:`~distill.functional.dml_loss`, CE + 1/(k-1) Σ_{j≠i} KL(p_j || p_i),
    with its peers' predictions as constants. Each network has its own optimizer and schedule
    (built from ``fit_kwargs`` like ``fit``'s). See :func:`dml_step` for the update order.

    Args:
        student: the cohort, a list of k >= 2 modules (architectures may differ), or a zero-argument
            factory called ``num_models`` times (after seeding, so every network starts differently).
        train_loader, val_loader: labelled batches; every network is evaluated each epoch.
        teacher: must be ``None`` (DML has no pre-trained teacher).
        num_models: k, with a factory (2, the paper's main setting), or a check on a list's length.
        T: softmax temperature of the mimicry KL (1: the paper's plain posteriors).
        update: ``"sequential"`` (the paper's Algorithm 1) or ``"simultaneous"``.
        fit_kwargs: optimizer, lr, momentum, weight_decay, nesterov, schedule, milestones, gamma,
            grad_clip, device, deterministic, checkpoint_every, on_epoch_end.

    Returns:
        A :class:`CohortFitResult`; the top level describes ``net0``, ``members`` every network
        (``net0`` ... ``net{k-1}``), ``models`` the trained networks.

    Raises (before any training): a single module instead of a cohort, k < 2, T <= 0, an unknown
    ``update``, a teacher, unknown or unsupported fit keywords, or (sequential update) networks that
    share parameters.
    """
    who = "fit_dml"
    _no_teacher(teacher, who)
    _positive_int("epochs", epochs)
    _real("T", T, positive=True)
    if update not in DML_UPDATES:
        raise ValueError(f"update must be one of {DML_UPDATES}, got {update!r}")
    cfg = _loop_config(fit_kwargs, who)
    with _seeded(seed, cfg["deterministic"]):
        models = _models_from(student, num_models, default=2, minimum=2, who=who)
        shared = _peers_with_shared_parameters(models)
        if shared and update == "sequential":
            raise ValueError(f"networks {shared} share parameters: the sequential update would change one "
                             "network's weights under another's pending backward; use update='simultaneous'")
        named = {f"net{i}": m for i, m in enumerate(models)}

        def step(batch: Batch, epoch: int, updater: _Updater) -> tuple[Tensor, dict[str, Tensor]]:
            losses = dml_step(models, batch, updater, T, update)
            return sum(losses.values()) / len(losses), losses  # type: ignore[return-value]

        groups = [_unique_params([m]) for m in models]
        return _run_cohort(named, groups, train_loader, epochs=epochs, step=step,
                           evaluate_fn=_accuracy_eval(named, val_loader), delivered="net0", maximize=True,
                           cfg=cfg, run_dir=run_dir, progress=progress, members=list(named))


# --------------------------------------------------------------------------------------------
# OKDDip
# --------------------------------------------------------------------------------------------


class PeerAttention(nn.Module):
    """OKDDip's attention over the auxiliary peers: two bias-free linear maps L (query), E (key).

    ``forward(h)``: embeddings (B, M, D) → aggregation weights (B, M, M)
    (:func:`~distill.functional.okddip_attention`). The projected size is ``D // factor``
    (``factor=8``: the reference code's ``input_channel // 8``), at least 1.
    """

    def __init__(self, dim: int, factor: int = 8) -> None:
        super().__init__()
        _positive_int("embedding dim", dim)
        _positive_int("factor", factor)
        out = max(1, dim // factor)
        self.query = nn.Linear(dim, out, bias=False)
        self.key = nn.Linear(dim, out, bias=False)

    def forward(self, h: Tensor) -> Tensor:
        return DF.okddip_attention(self.query(h), self.key(h))


def _embedding(feature: Tensor) -> Tensor:
    """A tapped feature as (B, D): maps (B, C, H, W) are averaged over space, as the reference code pools."""
    return feature.flatten(2).mean(-1) if feature.dim() > 2 else feature


@register_strategy(
    "okddip",
    "online",
    Paper(title="Online Knowledge Distillation with Diverse Peers",
          authors="D. Chen, J.-P. Mei, C. Wang, Y. Feng, C. Chen", year=2020, arxiv="1912.00350", venue="AAAI"),
)
def fit_okddip(
    student: Sequence[nn.Module] | Callable[[], nn.Module],
    train_loader: Iterable[Any],
    val_loader: Iterable[Any] | None = None,
    *,
    teacher: None = None,
    epochs: int,
    run_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    num_models: int | None = None,
    feature_tap: str = "pool",
    T: float = 3.0,
    peer_weight: float = 1.0,
    leader_weight: float = 1.0,
    rampup_epochs: int = 80,
    factor: int = 8,
    aggregate: str = "logits",
    **fit_kwargs: Any,
) -> CohortFitResult:
    """OKDDip: auxiliary peers with attention-weighted targets, and a group leader taught by their ensemble.

    The last model is the group leader (the model delivered for inference), the others the M
    auxiliary peers. Each step minimises :func:`~distill.functional.okddip_parts` combined as
    ``ce + r(e) * (peer_weight * peer_kd + leader_weight * leader_kd)`` with r(e) the ramp-up
    :func:`~distill.functional.sigmoid_rampup` over ``rampup_epochs``. Peer a's target mixes the
    peers' outputs with weights from attention over their embeddings (tap ``feature_tap``,
    :class:`PeerAttention`, trained jointly through the distillation loss); the leader's target is
    the peers' plain average. One optimizer trains every model and the attention, as in the
    reference code.

    Args:
        student: M + 1 modules (peers first, leader last) or a zero-argument factory called
            ``num_models`` times (default 4: three peers and the leader, the reference code's
            ``--num_branches 4``). Peers' embeddings must have one size.
        teacher: must be ``None``.
        feature_tap: the tap of each peer's embedding h (``"pool"`` in the zoo models); a map is
            averaged over space.
        T: temperature of both distillations (3, the reference code's).
        peer_weight, leader_weight: β and γ (1 and 1, the reference code's ``--alpha``).
        rampup_epochs: length of the ramp-up (80, the reference code's ``--length``); 0 switches it off.
        factor: the attention's projection divides the embedding size by it (8, the reference's).
        aggregate: ``"logits"`` (the reference code: targets from the weighted logits) or
            ``"probs"`` (weighted softened predictions); see :func:`~distill.functional.okddip_peer_targets`.
        fit_kwargs: as :func:`fit_dml` (the reference code: SGD, Nesterov, lr 0.1, 300 epochs).

    Returns:
        A :class:`CohortFitResult` of the leader (``members``: ``peer0`` ... and ``leader``;
        ``models`` also holds ``attention``).

    Notes:
        As in the reference code no target is detached: the first-level loss trains the attention
        and also pulls the other peers; the second-level loss also pulls the peers towards the leader.
    """
    who = "fit_okddip"
    _no_teacher(teacher, who)
    _positive_int("epochs", epochs)
    _real("T", T, positive=True)
    _real("peer_weight", peer_weight)
    _real("leader_weight", leader_weight)
    _positive_int("rampup_epochs", rampup_epochs, minimum=0)
    _positive_int("factor", factor)
    if aggregate not in AGGREGATIONS:
        raise ValueError(f"aggregate must be one of {AGGREGATIONS}, got {aggregate!r}")
    if not isinstance(feature_tap, str) or not feature_tap:
        raise ValueError(f"feature_tap must be a module path, got {feature_tap!r}")
    cfg = _loop_config(fit_kwargs, who)
    with _seeded(seed, cfg["deterministic"]):
        # at least 2 auxiliary peers (attention over one peer is trivial) and the leader
        models = _models_from(student, num_models, default=4, minimum=3, who=who)
        peers, leader = models[:-1], models[-1]
        taps = [Taps(p, [feature_tap], model_name=f"peer{i}") for i, p in enumerate(peers)]
        try:
            dims = _embedding_dims(peers, taps, feature_tap, train_loader)
            if len(set(dims)) != 1:
                raise ValueError(f"the peers' embeddings at {feature_tap!r} differ in size {dims}: the shared "
                                 "attention needs one size")
            attention = PeerAttention(dims[0], factor).to(next(iter(_unique_params(peers))).device)

            def step(batch: Batch, epoch: int, updater: _Updater) -> tuple[Tensor, dict[str, Tensor]]:
                x, y = batch.inputs, _labels(batch, "OKDDip")
                logits, feats = [], []
                for p, t in zip(peers, taps):
                    with t.recording() as store:
                        logits.append(logits_of(p(x)))
                    feats.append(_embedding(store[feature_tap]))
                alpha = attention(torch.stack(feats, dim=1))
                parts = DF.okddip_parts(torch.stack(logits), logits_of(leader(x)), alpha, y, T, aggregate)
                ramp = DF.sigmoid_rampup(epoch, rampup_epochs)
                total = parts["ce"] + ramp * (peer_weight * parts["peer_kd"] + leader_weight * parts["leader_kd"])
                updater.update(0, total, "okddip")
                return total, {k: v.detach() for k, v in parts.items()}

            named = {**{f"peer{i}": p for i, p in enumerate(peers)}, "leader": leader}
            return _run_cohort({**named, "attention": attention}, [_unique_params([*models, attention])],
                               train_loader, epochs=epochs, step=step,
                               evaluate_fn=_accuracy_eval(named, val_loader), delivered="leader", maximize=True,
                               cfg=cfg, run_dir=run_dir, progress=progress, members=list(named))
        finally:
            for t in taps:
                t.remove()


def _embedding_dims(peers: Sequence[nn.Module], taps: Sequence[Taps], path: str, loader: Iterable[Any]) -> list[int]:
    """Each peer's embedding size, from one example batch (eval mode, no gradient)."""
    example = None
    for raw in loader:
        example = as_batch(raw)
        break
    if example is None:
        raise ValueError("the training loader yielded no batch")
    modes = _train_modes(peers)
    dims = []
    try:
        for p, t in zip(peers, taps):
            p.eval()
            device = next(iter(_unique_params([p])), torch.empty(0)).device
            with torch.no_grad(), t.recording() as store:
                p(example.inputs.to(device))
            dims.append(int(_embedding(store[path]).shape[-1]))
    finally:
        _restore_modes(modes)
    return dims


# --------------------------------------------------------------------------------------------
# Rocket launching
# --------------------------------------------------------------------------------------------


@dataclass
class RocketFitResult(FitResult):
    """``fit``'s result for the light net, plus the booster's last validation accuracy (%)."""

    booster_acc: float | None = None


@register_strategy(
    "rocket_launching",
    "online",
    Paper(title="Rocket Launching: A Universal and Efficient Framework for Training Well-performing Light Net",
          authors="G. Zhou, Y. Fan, R. Cui, W. Bian, X. Zhu, K. Gai", year=2018, arxiv="1708.04106",
          venue="AAAI"),
)
def fit_rocket(
    student: RocketNet | ModelSpec,
    train_loader: Iterable[Any],
    val_loader: Iterable[Any] | None = None,
    *,
    teacher: None = None,
    epochs: int,
    run_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    hint_weight: float = 0.03,
    grad_block: bool = True,
    booster: ModelSpec | None = None,
    shared: str | None = None,
    booster_from: str | None = None,
    **fit_kwargs: Any,
) -> RocketFitResult:
    """Rocket launching: light and booster nets trained together, the booster guiding the light net.

    One :func:`distill.fit` run of a :class:`~distill.Distiller` whose losses are the paper's
    objective (:func:`~distill.functional.rocket_loss`): ``"ce"`` on the light net's logits,
    ``"rocket_booster_ce"`` on the booster's and ``"rocket_hint"`` (weight λ = ``hint_weight``,
    gradient block on). ``fit`` evaluates the light net alone; afterwards the booster is evaluated
    once too.

    Args:
        student: a :class:`RocketNet` (shared trunk, light head, booster head), or the light model (a
            model, factory, zoo name or spec) from which, with ``booster`` and ``shared``, one is built
            (:func:`~distill.strategies.composite.rocket_from_models`).
        teacher: must be ``None`` (the booster is trained here, not loaded).
        booster: the booster model (model, factory, zoo name or spec), when ``student`` is not a RocketNet.
        shared: module path of the light model where the shared lower layers end (e.g. ``"stage1"``).
        booster_from: module path of the booster whose output the shared layers' replaces (default:
            ``shared``); an adapter bridges different shapes.
        hint_weight: λ (0.03, the reference code's ``--gamma`` in all its published commands).
        grad_block: keep the hint from updating the booster (the paper's choice; ``False`` is its ablation).
        fit_kwargs: passed to :func:`distill.fit` (the reference code: SGD lr 0.1, 200 epochs,
            decay ×0.2 at 60/120/160).

    Returns:
        :class:`RocketFitResult`: ``fit``'s result for the light net plus ``booster_acc``.
    """
    _no_teacher(teacher, "fit_rocket")
    _positive_int("epochs", epochs)
    hint_weight = _real("hint_weight", hint_weight)
    if not isinstance(student, RocketNet):
        seed_everything(seed)  # a factory's and the booster's initialisation follow `seed`, as fit's do
    student = rocket_student(student, train_loader, booster=booster, shared=shared, booster_from=booster_from)
    losses = {"ce": 1.0, "rocket_booster_ce": RocketBoosterCE(),
              "rocket_hint": (hint_weight, RocketHint(grad_block=grad_block))}
    distiller = Distiller(student, None, losses=losses)
    try:
        result = fit(distiller, train_loader, val_loader, epochs=epochs, run_dir=run_dir, seed=seed,
                     progress=progress, **fit_kwargs)
    finally:
        distiller.detach_taps()  # the returned model runs hook-free
    out = RocketFitResult(**{f.name: getattr(result, f.name) for f in fields(FitResult)})
    if val_loader is not None:
        device = next(student.parameters()).device
        out.booster_acc = evaluate(SimpleNamespace(student=student.booster_net()), val_loader, device,
                                   with_teacher=False)["student_acc"]
    return out


# --------------------------------------------------------------------------------------------
# OKDHP: online KD for dense outputs
# --------------------------------------------------------------------------------------------


def _dense_eval(model: MultiBranchNet, val_loader: Iterable[Any] | None) -> EvalFn | None:
    """Validation heatmap loss (:func:`~distill.functional.heatmap_mse_loss`) of every branch and the ensemble."""
    if val_loader is None:
        return None

    @torch.no_grad()
    def run(device: torch.device) -> tuple[dict[str, float], dict[str, float]]:
        modes = _train_modes([model])
        model.eval()
        sums: dict[str, float] = {}
        n = 0
        try:
            for raw in val_loader:
                batch = as_batch(raw).to(device)
                maps, ens = model(batch.inputs)
                target = _dense_targets(batch, ens)
                b = int(batch.inputs.shape[0])
                outs = {**{f"branch{i}": m for i, m in enumerate(maps)}, "ensemble": ens}
                for name, out in outs.items():
                    sums[name] = sums.get(name, 0.0) + float(DF.heatmap_mse_loss(out, target)) * b
                n += b
        finally:
            _restore_modes(modes)
        if n == 0:
            raise ValueError("evaluation loader yielded no samples")
        scores = {k: v / n for k, v in sums.items()}
        return scores, {f"{k}_mse": v for k, v in scores.items()}

    return run


def _dense_targets(batch: Batch, like: Tensor) -> Tensor:
    if batch.targets is None or batch.targets.shape != like.shape:
        got = None if batch.targets is None else tuple(batch.targets.shape)
        raise ValueError(f"OKDHP needs target maps shaped like the outputs {tuple(like.shape)}, got {got}")
    return batch.targets.to(like.dtype)


@register_strategy(
    "okdhp",
    "online",
    Paper(title="Online Knowledge Distillation for Efficient Pose Estimation",
          authors="Z. Li, J. Ye, M. Song, Y. Huang, Z. Pan", year=2021, arxiv="2108.02092", venue="ICCV"),
)
def fit_okdhp(
    student: MultiBranchNet | ModelSpec,
    train_loader: Iterable[Any],
    val_loader: Iterable[Any] | None = None,
    *,
    teacher: None = None,
    epochs: int,
    run_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    kd_weight: float = 5.0,
    ens_weight: float = 6.0,
    rampup_epochs: int = 60,
    kd: str = "kl",
    split: str | None = None,
    num_branches: int = 3,
    until: str | None = None,
    **fit_kwargs: Any,
) -> CohortFitResult:
    """OKDHP: every branch of a multi-branch dense network is taught by the branches' FAU ensemble.

    Each step minimises :func:`~distill.functional.okdhp_loss` with λ = ``kd_weight`` · r(e), r the
    ramp-up :func:`~distill.functional.sigmoid_rampup` over ``rampup_epochs``: the heatmap MSE of
    every branch and (× ``ens_weight``) of the ensemble against the target maps, plus the
    pixel-wise distillation of the ensemble into each branch. Batches carry target maps
    (B, C, H, W) as ``targets`` (every channel weighted 1). One optimizer trains the whole network.

    Args:
        student: a :class:`MultiBranchNet`, or a model (model, factory, zoo name or spec) from which, with
            ``split``, one is built (:func:`~distill.strategies.composite.multi_branch_from_model`).
        teacher: must be ``None``.
        split: module path where the shared trunk ends (e.g. ``"stage1"``), when ``student`` is not a
            MultiBranchNet.
        num_branches: M, the branches of the built network (3, the reference code's).
        until: module path where each branch's copy of the model ends (a feature map, e.g. ``"stage3"``;
            default: the model's end); a head then maps it to the targets' shape (a 1x1 conv, or a
            transposed conv where the targets are larger).
        kd_weight, ens_weight, rampup_epochs: 5, 6 and 60, the reference code's ``TRAIN.KD_WEIGHT``,
            ``TRAIN.ENS_WEIGHT``, ``TRAIN.LENGTH``.
        kd: ``"kl"`` (the reference code's pixel-wise KL) or ``"mse"``.
        fit_kwargs: as :func:`fit_dml` (the reference code: Adam, lr 2.5e-4, 140 epochs, ×0.1 at 90/120).

    Returns:
        A :class:`CohortFitResult` over the validation heatmap MSE (lower is better): the top level
        describes ``branch0``; ``members`` holds ``branch0`` ... and ``ensemble``.
    """
    who = "fit_okdhp"
    _no_teacher(teacher, who)
    _positive_int("epochs", epochs)
    _real("kd_weight", kd_weight)
    _real("ens_weight", ens_weight)
    _positive_int("rampup_epochs", rampup_epochs, minimum=0)
    if kd not in DENSE_KD_LOSSES:
        raise ValueError(f"kd must be one of {DENSE_KD_LOSSES}, got {kd!r}")
    _positive_int("num_branches", num_branches, minimum=2)
    cfg = _loop_config(fit_kwargs, who)
    with _seeded(seed, cfg["deterministic"]):  # the built branches' initialisation follows `seed`
        net = okdhp_student(student, train_loader, split=split, num_branches=num_branches, until=until)

    def step(batch: Batch, epoch: int, updater: _Updater) -> tuple[Tensor, dict[str, Tensor]]:
        maps, ens = net(batch.inputs)
        target = _dense_targets(batch, ens)
        ramp = DF.sigmoid_rampup(epoch, rampup_epochs)
        total = DF.okdhp_loss(maps, ens, target, kd_weight=kd_weight * ramp, ens_weight=ens_weight, kd=kd)
        updater.update(0, total, "okdhp")
        return total, {}

    names = [*(f"branch{i}" for i in range(len(net.branches))), "ensemble"]
    with _seeded(seed, cfg["deterministic"]):
        return _run_cohort({"model": net}, [_unique_params([net])], train_loader, epochs=epochs,
                           step=step, evaluate_fn=_dense_eval(net, val_loader), delivered="branch0",
                           maximize=False, cfg=cfg, run_dir=run_dir, progress=progress, members=names,
                           best_module=net.branch_net(0))
