"""KD-MVS: a self-supervised multi-view stereo teacher, validated probabilistic pseudo-labels, and a
student distilled from them.

Paper: Y. Ding, Q. Zhu, X. Liu, W. Yuan, H. Zhang, C. Zhang, "KD-MVS: Knowledge Distillation Based
Self-supervised Learning for Multi-view Stereo", ECCV 2022, arXiv 2207.10425 (code:
github.com/megvii-research/KD-MVS).

Three stages, no ground-truth depth anywhere in training:

1. **self-supervised teacher**: the teacher MVS network minimises :class:`~distill.methods.mvs.MVSSelfSupervised`
   (photometric + featuremetric consistency, smoothness); each step makes a random view the reference
   (every view of a scene is a reference in the paper's DTU training too);
2. **pseudo-labels**: the frozen teacher predicts a depth map with every view as reference; the
   cross-view check (:func:`~distill.functional.cross_view_check`) keeps the geometrically consistent,
   confident pixels and gives each a mean depth and a spread ``(μ, σ)``;
3. **student**: trained on every (scene, reference view) with :class:`~distill.methods.mvs.KDMVS`, the KL
   from the Gaussian pseudo-label over the depth hypotheses to its probability volume.

The paper iterates stages 2-3 (the student becomes the next teacher) for a few rounds; ``rounds``
does the same (default 1). Evaluation (:func:`evaluate_depth`) compares depth with the ground truth of a
loader built ``with_depth=True``: depth MAE and the accuracy at thresholds.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from distill import functional as DF
from distill.batch import DenseBatch
from distill.distiller import Distiller
from distill.methods.mvs import KD_MVS, KDMVS, MVSSelfSupervised
from distill.strategies.registry import as_model, register_strategy
from distill.train.loop import FitResult
from distill.train.schedules import OPTIMIZERS, SCHEDULES, Schedule, make_optimizer

__all__ = ["KDMVSResult", "PseudoLabels", "evaluate_depth", "kd_mvs", "make_pseudo_labels",
           "train_self_supervised"]


def _rotate(x: Tensor, r: int) -> Tensor:
    """Views reordered so that view ``r`` comes first, the others after it in their order: ``(B, V, ...)``."""
    v = x.shape[1]
    order = [r] + [i for i in range(v) if i != r]
    return x[:, order]


def _progress(progress: bool, total: int, desc: str) -> Any:
    if not progress:
        return None
    from rich.progress import Progress

    bar = Progress(transient=True)
    bar.start()
    bar.add_task(desc, total=total)
    return bar


# fit's optimisation keywords that KD-MVS's own loops take, with KD-MVS's defaults where they differ from fit's:
# AdamW, lr 1e-3 and weight decay 1e-4 (the authors' ``--lr`` / ``--wd``), a constant rate (ours)
_LOOP_DEFAULTS: dict[str, Any] = {"optimizer": "adamw", "lr": 1e-3, "momentum": 0.9, "weight_decay": 1e-4,
                                  "nesterov": False, "schedule": "constant", "milestones": None, "gamma": 0.1,
                                  "grad_clip": None, "device": None}
# fit keywords accepted for the strategy convention that change nothing here: nothing is written (``fingerprint``)
_IGNORED_KEYS = ("fingerprint",)


def _loop_config(fit_kwargs: dict[str, Any], *, epochs: int, teacher_epochs: int) -> dict[str, Any]:
    """The loops' settings from ``fit_kwargs`` (fit's names; anything else refused), checked before any work."""
    unsupported = {k: fit_kwargs[k] for k in ("resume", "loggers", "evaluator", "deterministic", "overwrite")
                   if fit_kwargs.get(k) not in (None, False)}
    if unsupported:
        raise ValueError(f"kd_mvs does not support {unsupported}: its loops keep no checkpoints (no resume or "
                         "overwrite), log no metrics (no loggers), evaluate with evaluate_depth (no evaluator) and "
                         "do not switch torch to deterministic algorithms")
    if fit_kwargs.get("amp", False) not in (False, None, "off", "none", "auto"):
        raise ValueError(f"kd_mvs trains in float32; amp={fit_kwargs['amp']!r} is not supported (use False)")
    known = set(_LOOP_DEFAULTS) | set(_IGNORED_KEYS) | {"resume", "loggers", "evaluator", "deterministic",
                                                          "overwrite", "amp"}
    unknown = sorted(set(fit_kwargs) - known)
    if unknown:
        raise TypeError(f"kd_mvs got unknown argument(s) {unknown}; its training keywords are "
                        f"{sorted(_LOOP_DEFAULTS)}")
    cfg = {k: fit_kwargs.get(k, v) for k, v in _LOOP_DEFAULTS.items()}
    cfg = {**cfg, **{k: _LOOP_DEFAULTS[k] for k in ("optimizer", "lr", "weight_decay", "schedule")
                     if cfg[k] is None}}  # a recipe's unset value means "the strategy's default"
    if cfg["optimizer"] not in OPTIMIZERS:
        raise ValueError(f"kd_mvs: unknown optimizer {cfg['optimizer']!r}; expected one of {OPTIMIZERS}")
    if cfg["schedule"] not in SCHEDULES:
        raise ValueError(f"kd_mvs: unknown schedule {cfg['schedule']!r}; expected one of {SCHEDULES}")
    for name in ("lr", "weight_decay", "momentum", "gamma"):
        value = cfg[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 \
                or (name == "lr" and value == 0):
            raise ValueError(f"kd_mvs: {name} must be a finite number {'> 0' if name == 'lr' else '>= 0'}, got {value!r}")
    clip = cfg["grad_clip"]
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0):
        raise ValueError(f"kd_mvs: grad_clip must be a number > 0 or None, got {clip!r}")
    probe = [torch.zeros(1, requires_grad=True)]
    for stage, n in (("teacher_epochs", teacher_epochs), ("epochs", epochs)):
        if n > 0:  # the schedule's own checks (milestones inside 1..n, increasing) for each stage that trains
            try:
                _schedule(_optimizer(probe, cfg), cfg, n, 1)
            except ValueError as e:
                raise ValueError(f"kd_mvs: {e} (the {stage} stage)") from None
    return cfg


def _optimizer(params: list[nn.Parameter], cfg: dict[str, Any]) -> torch.optim.Optimizer:
    return make_optimizer(params, cfg["optimizer"], lr=float(cfg["lr"]), momentum=float(cfg["momentum"]),
                          weight_decay=float(cfg["weight_decay"]), nesterov=bool(cfg["nesterov"]))


def _schedule(opt: torch.optim.Optimizer, cfg: dict[str, Any], epochs: int, steps: int) -> Schedule:
    return Schedule(opt, cfg["schedule"], epochs=epochs, steps_per_epoch=steps, milestones=cfg["milestones"],
                    gamma=float(cfg["gamma"]))


def _run_steps(distiller: Distiller, batches: Callable[[int], Iterable[DenseBatch]], epochs: int,
               cfg: dict[str, Any], steps: int, progress: bool, desc: str) -> list[dict[str, float]]:
    """``cfg``'s optimizer and schedule (:func:`_loop_config`) over ``distiller``'s trainable parameters for
    ``epochs`` epochs of ``steps`` steps; ``batches(epoch)`` yields one epoch's batches. Returns the per-epoch
    mean losses and learning rates."""
    params = [p for p in distiller.parameters() if p.requires_grad]
    opt = _optimizer(params, cfg)
    sched = _schedule(opt, cfg, max(epochs, 1), max(steps, 1))
    device = next(distiller.student.parameters()).device
    history = []
    bar = _progress(progress, epochs, desc)
    try:
        for epoch in range(epochs):
            distiller.student.train()
            total, n = 0.0, 0
            lr = opt.param_groups[0]["lr"]  # the rate at the epoch's first step
            for batch in batches(epoch):
                out = distiller(batch.to(device))
                opt.zero_grad(set_to_none=True)
                out.total.backward()
                if cfg["grad_clip"] is not None:
                    torch.nn.utils.clip_grad_norm_(params, float(cfg["grad_clip"]))
                opt.step()
                sched.step_batch()
                total, n = total + float(out.total.detach()), n + 1
            sched.step_epoch()
            history.append({"epoch": epoch, "loss": total / max(n, 1), "lr": lr})
            if bar is not None:
                bar.advance(bar.task_ids[0])
    finally:
        if bar is not None:
            bar.stop()
    return history


def _len(loader: Any) -> int:
    return len(loader) if hasattr(loader, "__len__") else 1


def _epoch_rotated(loader: Any, seed: int) -> Callable[[int], Iterable[DenseBatch]]:
    """Each batch of ``loader`` with a random view (from ``(seed, epoch, step)``) as the reference."""
    def batches(epoch: int) -> Iterable[DenseBatch]:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        g = torch.Generator().manual_seed(seed * 10_007 + epoch)
        for batch in loader:
            r = int(torch.randint(batch.inputs.shape[1], (1,), generator=g))
            yield DenseBatch(_rotate(batch.inputs, r), index=batch.index)
    return batches


def train_self_supervised(model: nn.Module, train_loader: Any, *, epochs: int, lr: float = 1e-3, seed: int = 0,
                          progress: bool = True, loss: MVSSelfSupervised | None = None,
                          **fit_kwargs: Any) -> list[dict[str, float]]:
    """Stage 1 (or a student trained self-supervised only, the baseline): ``model`` minimises
    :class:`~distill.methods.mvs.MVSSelfSupervised` (defaults unless ``loss`` is given) for ``epochs``
    epochs of ``train_loader`` (batches of packed views), a random reference view per step.
    ``fit_kwargs``: fit's optimizer, momentum, weight_decay, nesterov, schedule, milestones, gamma,
    grad_clip, device (as :func:`kd_mvs`). Returns the per-epoch mean losses and learning rates."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be an int >= 0, got {epochs!r}")
    cfg = _loop_config({"lr": lr, **fit_kwargs}, epochs=epochs, teacher_epochs=0)
    if cfg["device"] is not None:
        model.to(cfg["device"])
    torch.manual_seed(seed)
    d = Distiller(model, None, losses={"self_sup": loss or MVSSelfSupervised()})
    return _run_steps(d, _epoch_rotated(train_loader, seed), epochs, cfg, _len(train_loader), progress,
                      "KD-MVS self-supervised")


@dataclass
class PseudoLabels:
    """Stage 2's output, one row per (scene, reference view): ``inputs`` ``(N, V, 4, H, W)`` packed views with
    the reference first, ``mu``, ``sigma`` ``(N, H, W)``, ``mask`` ``(N, H, W)`` bool, ``index`` ``(N,)`` the
    scene and ``view`` ``(N,)`` the reference view of each row."""

    inputs: Tensor
    mu: Tensor
    sigma: Tensor
    mask: Tensor
    index: Tensor
    view: Tensor

    @property
    def coverage(self) -> float:
        """The fraction of pixels the cross-view check kept."""
        return float(self.mask.float().mean())


@torch.no_grad()
def make_pseudo_labels(teacher: nn.Module, loader: Iterable[Any], **check: Any) -> PseudoLabels:
    """Stage 2: the teacher (eval mode) predicts every view's depth with that view as reference; the
    cross-view check (``check``: :func:`~distill.functional.cross_view_check`'s keywords) validates each.

    ``teacher`` must have ``predict(x) -> {"depth", "confidence", ...}`` (an
    :class:`~distill.models.mvs.MVSNet`)."""
    if not callable(getattr(teacher, "predict", None)):
        raise TypeError(f"the KD-MVS teacher must have predict(x) returning depth and confidence (an MVSNet), "
                        f"got {type(teacher).__name__}")
    was_training = teacher.training
    teacher.eval()
    rows: dict[str, list[Tensor]] = {k: [] for k in ("inputs", "mu", "sigma", "mask", "index", "view")}
    try:
        device = next(teacher.parameters()).device
        for batch in loader:
            x = batch.inputs.to(device)
            b, v = x.shape[:2]
            preds = [teacher.predict(_rotate(x, r)) for r in range(v)]
            depth = torch.stack([p["depth"] for p in preds], 1)                     # (B, V, H, W), view r at r
            _, proj = x[:, :, :-1], x[:, :, -1, :4, :4]
            for r in range(v):
                mu, sigma, mask = DF.cross_view_check(_rotate(depth, r), _rotate(proj, r), preds[r]["confidence"],
                                                      **check)
                rows["inputs"].append(_rotate(x, r))
                rows["mu"].append(mu), rows["sigma"].append(sigma), rows["mask"].append(mask)
                index = batch.index.to(device) if batch.index is not None else torch.full((b,), -1, device=device)
                rows["index"].append(index), rows["view"].append(torch.full((b,), r, device=device))
    finally:
        teacher.train(was_training)
    return PseudoLabels(**{k: torch.cat(vals) for k, vals in rows.items()})


def _label_batches(labels: PseudoLabels, batch_size: int, seed: int) -> Callable[[int], Iterable[DenseBatch]]:
    def batches(epoch: int) -> Iterable[DenseBatch]:
        order = torch.randperm(len(labels.mu), generator=torch.Generator().manual_seed(seed * 7_919 + epoch))
        for start in range(0, len(order), batch_size):
            i = order[start:start + batch_size]
            yield DenseBatch(labels.inputs[i], index=labels.index[i],
                             extras={"pseudo_mu": labels.mu[i], "pseudo_sigma": labels.sigma[i],
                                     "pseudo_mask": labels.mask[i]})
    return batches


@torch.no_grad()
def evaluate_depth(model: nn.Module, loader: Iterable[Any], thresholds: Sequence[float] = (0.1, 0.25, 0.5)
                   ) -> dict[str, float]:
    """Depth MAE and accuracy at ``thresholds`` (scene units) of the reference depth against the ground truth
    ``extras["depth"]`` of each batch (a loader built ``with_depth=True``), over every pixel."""
    was_training = model.training
    model.eval()
    preds, gts = [], []
    try:
        for batch in loader:
            if "depth" not in getattr(batch, "extras", {}):
                raise KeyError("evaluate_depth needs batches with extras['depth'] (MVSScenes.loader(..., with_depth=True))")
            device = next(model.parameters()).device
            preds.append(model(batch.inputs.to(device)).cpu()), gts.append(batch.extras["depth"].cpu())
    finally:
        model.train(was_training)
    return DF.depth_errors(torch.cat(preds), torch.cat(gts), thresholds)


@dataclass
class KDMVSResult(FitResult):
    """:class:`~distill.train.FitResult` of the student, plus each stage's numbers: ``teacher_history`` and
    ``student_history`` (per-epoch mean losses), ``coverage`` (per round, the fraction of pixels kept as
    pseudo-labels), ``teacher_metrics`` / ``student_metrics`` (:func:`evaluate_depth` on ``val_loader``,
    when given) and the trained ``teacher``."""

    teacher_history: list[dict[str, float]] = field(default_factory=list)
    student_history: list[dict[str, float]] = field(default_factory=list)
    coverage: list[float] = field(default_factory=list)
    teacher_metrics: dict[str, float] | None = None
    student_metrics: dict[str, float] | None = None
    teacher: nn.Module | None = None


@register_strategy("kd_mvs", "self-supervised", KD_MVS)
def kd_mvs(student: Any, train_loader: Any, val_loader: Any = None, *, teacher: Any = None, epochs: int = 10,
           teacher_epochs: int | None = None, rounds: int = 1, lr: float = 1e-3, batch_size: int | None = None,
           check: dict[str, Any] | None = None, self_sup: dict[str, Any] | None = None,
           min_sigma: float | None = None, run_dir: Any = None, seed: int = 0, progress: bool = True,
           **fit_kwargs: Any) -> KDMVSResult:
    """KD-MVS: self-supervised MVS teacher → cross-view-checked probabilistic pseudo-labels → student.

    Args:
        student: an :class:`~distill.models.mvs.MVSNet` (or a factory); trained by stage 3.
        train_loader: batches of packed views (:meth:`distill.data.mvs.MVSScenes.loader`), no depth used.
        val_loader: the same ``with_depth=True``, for :func:`evaluate_depth` after each stage; or None.
        teacher: an MVSNet (or a factory) trained by stage 1 for ``teacher_epochs`` (default ``epochs``;
            0 = use it as given, already trained).
        epochs: the student's epochs per round. rounds: stage 2-3 rounds (later rounds label with the
            previous round's student, as the paper iterates). batch_size: stage 3's (default: the loader's).
        lr, **fit_kwargs: the optimisation keywords of :func:`distill.fit`, same names and meanings, for
            stage 1 and each round of stage 3 (a fresh optimizer and schedule per stage, the schedule
            spanning that stage's epochs): ``optimizer`` (default ``"adamw"``), ``lr`` (1e-3),
            ``weight_decay`` (1e-4; lr and weight decay the authors' ``--lr`` / ``--wd``), ``momentum``,
            ``nesterov``, ``schedule`` (default ``"constant"``, ours), ``milestones`` (epochs of each stage),
            ``gamma``, ``grad_clip``, ``device`` (student, teacher and batches moved there). ``amp`` may only
            be off (float32); ``resume``, ``overwrite``, ``loggers``, ``evaluator``, ``deterministic=True``
            are refused (these loops keep no checkpoints and write nothing); ``fingerprint`` is accepted and
            unused. An unknown keyword is a ``TypeError`` naming the accepted ones; every check runs
            before any training.
        check: keywords of :func:`~distill.functional.cross_view_check`. self_sup: keywords of
            :class:`~distill.methods.mvs.MVSSelfSupervised`. min_sigma: :class:`~distill.methods.mvs.KDMVS`'s.
        run_dir: unused (nothing is written; accepted for the strategy convention). seed, progress: as usual.
    """
    if teacher is None:
        raise ValueError("kd_mvs needs a teacher MVS network (teacher=...), trained self-supervised by stage 1")
    if epochs < 0 or rounds < 1 or (teacher_epochs is not None and teacher_epochs < 0):
        raise ValueError(f"need epochs >= 0, teacher_epochs >= 0 and rounds >= 1, got {epochs}, {teacher_epochs}, "
                         f"{rounds}")
    t_epochs = epochs if teacher_epochs is None else teacher_epochs
    cfg = _loop_config({"lr": lr, **fit_kwargs}, epochs=epochs, teacher_epochs=t_epochs)
    student_model = as_model(student, "kd_mvs")
    teacher_model = as_model(teacher, "kd_mvs")
    if cfg["device"] is not None:
        student_model.to(cfg["device"]), teacher_model.to(cfg["device"])
    loop = {k: cfg[k] for k in _LOOP_DEFAULTS}
    start = time.perf_counter()
    result = KDMVSResult(teacher=teacher_model)
    result.teacher_history = train_self_supervised(
        teacher_model, train_loader, epochs=t_epochs, seed=seed, progress=progress,
        loss=MVSSelfSupervised(**(self_sup or {})), **loop)
    if val_loader is not None:
        result.teacher_metrics = evaluate_depth(teacher_model, val_loader)
    labeller: nn.Module = teacher_model
    bs = batch_size or getattr(train_loader, "batch_size", None) or 8
    for round_ in range(rounds):
        labels = make_pseudo_labels(labeller, train_loader, **(check or {}))
        result.coverage.append(labels.coverage)
        torch.manual_seed(seed + round_)
        d = Distiller(student_model, None, losses={"kd_mvs": KDMVS(min_sigma=min_sigma)})
        hist = _run_steps(d, _label_batches(labels, bs, seed + round_), epochs, cfg, math.ceil(len(labels.mu) / bs),
                          progress, f"KD-MVS student (round {round_ + 1}/{rounds})")
        result.student_history += [{**h, "round": round_} for h in hist]
        if round_ + 1 < rounds:
            labeller = copy.deepcopy(student_model)
    if val_loader is not None:
        result.student_metrics = evaluate_depth(student_model, val_loader)
        result.history = [{"epoch": len(result.student_history) - 1, **{f"val_{k}": v
                                                                       for k, v in result.student_metrics.items()}}]
    result.time_s = time.perf_counter() - start
    return result
