"""``distill auto``: search methods, their hyper-parameters and student sizes under a budget.

Given a teacher, data, a family of students and a budget (minutes and/or trials), an Optuna
study (multi-objective: accuracy up, parameters down, measured latency down) samples, per trial,
a student of the family, a method with its hyper-parameters and loss weight (``ce`` alone, no
distillation, is one of the choices: the scratch baseline sits on the same front), and
optionally the learning rate; trains the student for the spec's epochs and scores it.

What makes a trial cheap: the teacher is trained (or loaded) once and its outputs are cached once
over the training images (:mod:`distill.cache`), so every trial costs a student-only training.
What keeps the search honest: trials are scored on a held-out part of the *training* split
(``holdout``, 10% by default), never on the test split; each trial's test accuracy is recorded
for the report only.

Pruning: Optuna does not prune multi-objective studies (``Trial.report`` refuses them), so the
rule is ours, the median rule of Optuna's ``MedianPruner`` applied per student: after
``warmup_epochs``, a trial whose held-out accuracy at epoch ``e`` is below the median of the
earlier trials *of the same student* at epoch ``e`` (at least ``startup_trials`` of them) stops.
Comparing within one student keeps small students, which are slower to learn but may sit on the
front, from being pruned by large ones.

Output, in ``OUTPUT_DIR/NAME``:

- ``study.journal``: the Optuna study (journal storage: a plain append-only file, no database);
  ``--resume`` continues it (trials interrupted by a crash are run again), and ``budget.trials``
  counts the study's trials over every session;
- ``trials/trialNNNN/``: each trial's ``metrics.jsonl`` and checkpoints;
- ``trials.jsonl``: every finished trial (settings, objectives, held-out curve, test accuracy);
- ``pareto.md`` and ``pareto.json``: the Pareto front (accuracy × parameters × latency), and
  ``pareto.png`` when matplotlib is installed;
- ``pareto/trialNNNN.yaml``: each front point's recipe, runnable with ``distill run`` (it trains
  on the whole training split and evaluates on the test split, with the teacher trained here).

Parallel trials: ``jobs`` worker processes share the study (the journal file is safe to share
between processes); each takes ``cores // jobs`` threads, or one GPU each when there are GPUs.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import Field, model_validator
from torch import nn

from distill.files import atomic_write_json, atomic_write_text, read_json
from distill.locks import RunLock
from distill.recipes import DataSpec, ModelSpec, RecipeError, TrainSpec, _Strict, parse_recipe, validate_losses
from distill.runner import (
    MODEL_FILE,
    _device,
    _fit_kwargs,
    build_data,
    build_model,
    build_student,
    console,
    teacher_taps_of,
    train_model,
)
from distill.train.rundir import RunFolderError

OBJECTIVES = {"accuracy": "maximize", "parameters": "minimize", "latency": "minimize"}

# The default search space: the logit methods, which read nothing but the cached logits. Each value is
# fixed (a number or string), a choice (a list) or a range ({low, high, log}). DKD's warm-up is 20 of the
# paper's 240 epochs; a trial of a few epochs would spend most of itself warming up, so it is off here.
DEFAULT_METHODS: dict[str, dict[str, Any]] = {
    "ce": {},
    "kd": {"T": [1.0, 2.0, 4.0, 8.0], "weight": {"low": 0.25, "high": 4.0, "log": True}},
    "dkd": {"T": [1.0, 2.0, 4.0], "alpha": {"low": 0.5, "high": 2.0}, "beta": {"low": 1.0, "high": 8.0, "log": True},
            "warmup_epochs": 0, "weight": {"low": 0.25, "high": 4.0, "log": True}},
    "dist": {"T": [1.0, 2.0, 4.0], "beta": {"low": 0.5, "high": 4.0, "log": True},
             "gamma": {"low": 0.5, "high": 4.0, "log": True}, "weight": {"low": 0.25, "high": 4.0, "log": True}},
}


class RangeSpec(_Strict):
    """A numeric range: floats unless ``low`` and ``high`` are both integers and ``int`` is set."""

    low: float
    high: float
    log: bool = False
    int: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> RangeSpec:
        if not self.low < self.high:
            raise ValueError(f"a range needs low < high; got low={self.low}, high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0; got low={self.low}")
        return self


class BudgetSpec(_Strict):
    minutes: float | None = Field(None, gt=0, description="this session's wall-clock budget")
    trials: int | None = Field(None, gt=0, description="the study's trials (finished or pruned) over all sessions")

    @model_validator(mode="after")
    def _some(self) -> BudgetSpec:
        if self.minutes is None and self.trials is None:
            raise ValueError("a budget needs minutes, trials or both")
        return self


class PruneSpec(_Strict):
    enabled: bool = True
    warmup_epochs: int = Field(1, ge=0, description="epochs every trial runs before it may be pruned")
    startup_trials: int = Field(3, ge=1, description="earlier trials of the same student needed to compare with")


class LatencySpec(_Strict):
    batch_size: int = Field(1, gt=0)
    repeats: int = Field(30, gt=0)


class AutoSpec(_Strict):
    """An auto-search spec (``kind: auto``); see the module docstring."""

    name: str
    kind: Literal["auto"]
    data: DataSpec = Field(default_factory=DataSpec)
    teacher: ModelSpec
    teacher_train: TrainSpec | None = Field(None, description="train the teacher here when it has no checkpoint")
    # as in a recipe, a teacher trained here sees the whole training split unless told otherwise
    teacher_train_subset: int | None = Field(None, gt=0, description="train the teacher on the first N images only")
    students: list[ModelSpec] = Field(min_length=1)
    methods: dict[str, dict[str, Any]] = Field(default_factory=lambda: copy.deepcopy(DEFAULT_METHODS))
    ce: float | list[float] | RangeSpec = 1.0
    lr: float | list[float] | RangeSpec | None = Field(None, description="None: train.lr in every trial")
    train: TrainSpec
    holdout: float = Field(0.1, gt=0, lt=1, description="fraction of the training split that scores the trials")
    budget: BudgetSpec
    objectives: list[Literal["accuracy", "parameters", "latency"]] = Field(
        default_factory=lambda: ["accuracy", "parameters", "latency"], min_length=1)
    prune: PruneSpec = Field(default_factory=PruneSpec)
    latency: LatencySpec = Field(default_factory=LatencySpec)
    jobs: int = Field(1, gt=0)
    # NSGA-II's first generation is random: below `population` trials the search is random sampling
    population: int = Field(50, ge=2, description="NSGA-II's population (Optuna's default 50)")
    seed: int = Field(0, ge=0)
    output_dir: str = "runs/auto"

    @model_validator(mode="after")
    def _checks(self) -> AutoSpec:
        if self.teacher.checkpoint is None and self.teacher_train is None:
            raise ValueError("the teacher has no checkpoint: give teacher.checkpoint, or teacher_train to train it here")
        if not self.methods:
            raise ValueError("methods is empty: name at least one method (ce alone is the no-distillation baseline)")
        if len(set(self.objectives)) != len(self.objectives):
            raise ValueError(f"objectives {self.objectives} repeat one")
        if self.data.task != "classification":
            raise ValueError(f"distill auto searches classification students; data.task is {self.data.task!r}")
        return self


def parse_auto_spec(data: dict[str, Any], source: str = "auto spec") -> AutoSpec:
    """Validate an auto spec, and every method name and fixed value in its search space."""
    from distill.recipes import validate_schema

    spec = validate_schema(AutoSpec, data, source)
    errors = []
    for method, space in spec.methods.items():
        try:
            _space_entries(space, f"methods.{method}")
            validate_losses({method: _representative(space)})
        except (RecipeError, ValueError) as e:
            errors.append(str(e))
    for key in ("ce", "lr"):
        value = getattr(spec, key)
        if isinstance(value, list) and not value:
            errors.append(f"{key}: an empty list of choices")
    if errors:
        raise RecipeError(f"{source}: " + "; ".join(errors))
    return spec


def load_auto_spec(path: str | Path) -> AutoSpec:
    from distill.recipes import read_recipe_file

    return parse_auto_spec(read_recipe_file(path), str(path))


def is_auto_spec(data: Any) -> bool:
    return isinstance(data, dict) and data.get("kind") == "auto"


# ------------------------------------------------------------------------------------- search space

def _space_entries(space: dict[str, Any], where: str) -> dict[str, float | str | list[Any] | RangeSpec]:
    """Each hyper-parameter's space: a fixed value, a list of choices or a :class:`RangeSpec`."""
    out: dict[str, Any] = {}
    for key, value in space.items():
        if isinstance(value, dict):
            try:
                out[key] = RangeSpec(**value)
            except Exception as e:  # pydantic's message names the field
                raise RecipeError(f"{where}.{key}: {value!r} is not a range {{low, high, log, int}}: {e}") from None
        elif isinstance(value, list):
            if not value:
                raise RecipeError(f"{where}.{key}: an empty list of choices")
            out[key] = value
        else:
            out[key] = value
    return out


def _representative(space: dict[str, Any]) -> dict[str, Any]:
    """One point of a method's space (the low end of ranges, the first choice): to validate its keys."""
    point = {}
    for key, value in _space_entries(space, "methods").items():
        point[key] = (value[0] if isinstance(value, list) else
                      (int(value.low) if value.int else value.low) if isinstance(value, RangeSpec) else value)
    return point


def _suggest(trial: Any, name: str, value: Any) -> Any:
    if isinstance(value, RangeSpec):
        if value.int:
            return trial.suggest_int(name, int(value.low), int(value.high), log=value.log)
        return trial.suggest_float(name, value.low, value.high, log=value.log)
    if isinstance(value, list):
        return trial.suggest_categorical(name, value)
    return value


def student_labels(students: list[ModelSpec]) -> list[str]:
    """A short unique label per student spec (Optuna's categorical choices must be plain values)."""
    labels = []
    for s in students:
        kw = ",".join(f"{k}={v}" for k, v in sorted(s.kwargs.items()))
        labels.append(f"{s.name}({kw})" if kw else s.name)
    if len(set(labels)) != len(labels):
        raise RecipeError(f"students: two entries are the same model ({labels})")
    return labels


def sample_trial(trial: Any, spec: AutoSpec) -> dict[str, Any]:
    """The trial's settings: ``student`` (label), ``losses`` (recipe form) and ``lr``."""
    labels = student_labels(spec.students)
    student = trial.suggest_categorical("student", labels)
    method = trial.suggest_categorical("method", list(spec.methods))
    ce = spec.ce if isinstance(spec.ce, float | int) else _suggest(trial, "ce", spec.ce)
    losses: dict[str, Any] = {"ce": float(ce)}
    if method != "ce":
        params = {k: _suggest(trial, f"{method}.{k}", v)
                  for k, v in _space_entries(spec.methods[method], f"methods.{method}").items()}
        losses[method] = params
    lr = spec.train.lr if spec.lr is None else spec.lr if isinstance(spec.lr, float | int) else _suggest(trial, "lr",
                                                                                                        spec.lr)
    return {"student": student, "method": method, "losses": losses, "lr": float(lr)}


# ------------------------------------------------------------------------------------- measurements

def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def measure_latency(model: nn.Module, example: torch.Tensor, repeats: int = 30, device: Any = "cpu") -> float:
    """Median wall time (milliseconds) of one forward pass of ``example`` ``(B, C, H, W)`` in eval mode,
    after three warm-up passes, on this machine and its current thread count."""
    model = model.to(device).eval()
    x = example.to(device)
    cuda = torch.device(device).type == "cuda"
    times = []
    for i in range(repeats + 3):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(x)
        if cuda:
            torch.cuda.synchronize()
        if i >= 3:
            times.append((time.perf_counter() - t0) * 1000)
    return float(statistics.median(times))


def pareto_front(points: list[tuple[float, ...]], directions: list[str]) -> list[int]:
    """Indices of the points no other point dominates (at least as good in every objective, better in
    one); ``directions`` per objective: ``"maximize"`` or ``"minimize"``."""
    signs = [1.0 if d == "minimize" else -1.0 for d in directions]
    keys = [tuple(s * v for s, v in zip(signs, p, strict=True)) for p in points]
    front = []
    for i, a in enumerate(keys):
        dominated = any(all(b_k <= a_k for a_k, b_k in zip(a, b, strict=True)) and b != a
                        for j, b in enumerate(keys) if j != i)
        if not dominated:
            front.append(i)
    return front


def median_prune(acc: float, epoch: int, others: list[list[float]], prune: PruneSpec) -> bool:
    """The median rule: stop a trial whose accuracy at ``epoch`` (1-based) is below the median of the
    ``others`` curves (held-out accuracy per epoch of earlier trials of the same student) that reached it."""
    if not prune.enabled or epoch <= prune.warmup_epochs:
        return False
    at = [c[epoch - 1] for c in others if len(c) >= epoch]
    return len(at) >= prune.startup_trials and acc < statistics.median(at)


# ------------------------------------------------------------------------------------- the run

def _spec_fingerprint(spec: AutoSpec) -> dict[str, Any]:
    """What fixes a study's meaning: everything but the budget, the parallelism and the output folder."""
    d = spec.model_dump(mode="json")
    for key in ("budget", "jobs", "output_dir"):
        d.pop(key)
    return d


def _holdout_split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fit indices, held-out indices)`` of ``n`` samples, a fixed random split."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    k = max(1, int(round(n * fraction)))
    if k >= n:
        raise RecipeError(f"holdout={fraction} leaves no training samples out of {n}")
    return perm[k:].sort().values, perm[:k].sort().values


class _Context:
    """What every trial shares: data loaders, the cached teacher, latency and size per student."""

    def __init__(self, spec: AutoSpec, base: Path, device: torch.device, progress: bool) -> None:
        from distill.cache import MANIFEST, CachedTeacher, build_cache
        from distill.data.loader import InMemoryLoader
        from distill.teachers import FrozenTeacher
        from distill.train.checkpoint import load_model

        self.spec, self.base, self.device = spec, base, device
        train_loader, test_loader, info = build_data(spec.data, seed=spec.seed)
        fit_idx, hold_idx = _holdout_split(int(train_loader.inputs.shape[0]), spec.holdout, spec.seed)
        x, y = train_loader.inputs, train_loader.targets
        self.fit_loader = InMemoryLoader(x[fit_idx], y[fit_idx], spec.data.batch_size, shuffle=True, seed=spec.seed,
                                         augment=train_loader.augment, return_index=True)
        self.holdout_loader = InMemoryLoader(x[hold_idx], y[hold_idx], spec.data.eval_batch_size, shuffle=False)
        self.test_loader, self.info = test_loader, info
        teacher = build_model(spec.teacher, info["num_classes"], info["in_channels"])
        self.teacher_file = Path(spec.teacher.checkpoint) if spec.teacher.checkpoint else base / "teacher" / MODEL_FILE
        teacher, _ = load_model(self.teacher_file, teacher)
        losses = {m: _representative(space) for m, space in spec.methods.items()}
        cache_dir = base / "teacher_cache"
        augmented = train_loader.augment is not None
        if not (cache_dir / MANIFEST).exists():
            build_cache(FrozenTeacher(teacher), self.fit_loader.inputs, cache_dir, targets=self.fit_loader.targets,
                        augment=train_loader.augment if augmented else None,
                        epochs=spec.train.epochs if augmented else None, taps=teacher_taps_of(losses),
                        batch_size=max(256, spec.data.batch_size), device=device, progress=progress)
        self.teacher = CachedTeacher(cache_dir, teacher=teacher, verify="lazy", check_inputs=True)
        self.teacher.prepare_loader(self.fit_loader)
        self.labels = student_labels(spec.students)
        # measured once per study and kept beside it: every trial, worker and session of the study compares the
        # same numbers (a latency measured again would differ with the machine's load)
        sizes_file = base / "students.json"
        if sizes_file.exists():
            saved = read_json(sizes_file, "student sizes")
            self.sizes = {k: (int(v["parameters"]), float(v["latency_ms"])) for k, v in saved.items()}
        else:
            self.sizes = {}
            example = x[: spec.latency.batch_size]
            for label, s in zip(self.labels, spec.students, strict=True):
                model = build_student(s, info["num_classes"], info["in_channels"])
                self.sizes[label] = (count_parameters(model), measure_latency(model, example, spec.latency.repeats,
                                                                                device))
            atomic_write_json(sizes_file, {k: {"parameters": p, "latency_ms": ms} for k, (p, ms) in self.sizes.items()})


def _train_teacher(spec: AutoSpec, base: Path, progress: bool) -> None:
    """Train the teacher here (once) when it has no checkpoint; reuse it while its settings stand."""
    if spec.teacher.checkpoint is not None:
        return
    assert spec.teacher_train is not None
    tdir = base / "teacher"
    data_spec = spec.data.model_copy(update={"train_subset": spec.teacher_train_subset})
    fingerprint = {"teacher": spec.teacher.model_dump(mode="json"), "train": spec.teacher_train.model_dump(mode="json"),
                   "data": data_spec.model_dump(mode="json"), "seed": spec.seed}
    spec_file = tdir / "teacher_spec.json"
    if (tdir / MODEL_FILE).is_file() and spec_file.is_file() and read_json(spec_file, "teacher spec") == fingerprint:
        console.print(f"[dim]reusing the trained teacher in {tdir}[/dim]")
        return
    data = build_data(data_spec, seed=spec.seed)
    torch.manual_seed(spec.seed + 1000)
    model = build_model(spec.teacher, data[2]["num_classes"], data[2]["in_channels"])
    console.print(f"training teacher {spec.teacher.name} → {tdir}")
    train_model(model, spec.teacher, spec.teacher_train, data, tdir, seed=spec.seed, progress=progress,
                overwrite=True, fingerprint=fingerprint)
    atomic_write_json(spec_file, fingerprint)


def _directions(spec: AutoSpec) -> list[str]:
    return [OBJECTIVES[o] for o in spec.objectives]


def _storage(base: Path) -> Any:
    import optuna

    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(base / "study.journal")))


def _objective(ctx: _Context, progress: bool) -> Any:
    """The Optuna objective: one trial trains one student from the cache and returns its objectives."""
    import optuna

    from distill.distiller import Distiller
    from distill.methods import create_method
    from distill.train import fit
    from distill.train.evaluate import evaluate

    spec = ctx.spec

    def objective(trial: Any) -> tuple[float, ...]:
        s = sample_trial(trial, spec)
        student_spec = spec.students[ctx.labels.index(s["student"])]
        losses = validate_losses(s["losses"])
        torch.manual_seed(spec.seed)
        student = build_student(student_spec, ctx.info["num_classes"], ctx.info["in_channels"])
        d = Distiller(student, ctx.teacher, losses={n: create_method(n, **kw) for n, kw in losses.items()})
        d.bind_data(len(ctx.fit_loader.targets), ctx.fit_loader.targets)
        d.prepare(next(iter(ctx.fit_loader)))
        curve: list[float] = []
        t0 = time.perf_counter()
        others = [t.user_attrs.get("curve", []) for t in trial.study.get_trials(deepcopy=False)
                  if t.number != trial.number and t.params.get("student") == s["student"]
                  and t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]

        def on_epoch_end(row: dict[str, Any]) -> None:
            acc = float(row["val_student_acc"])
            curve.append(acc)
            trial.set_user_attr("curve", list(curve))
            trial.set_user_attr("time_s", time.perf_counter() - t0)  # a pruned trial's cost is known too
            if median_prune(acc, len(curve), others, spec.prune):
                raise optuna.TrialPruned(f"held-out accuracy {acc:.2f}% at epoch {len(curve)} is below the median "
                                         f"of the earlier {s['student']} trials")

        params, latency = ctx.sizes[s["student"]]
        trial.set_user_attr("losses", losses)
        trial.set_user_attr("lr", s["lr"])
        trial.set_user_attr("parameters", params)
        trial.set_user_attr("latency_ms", latency)
        run_dir = ctx.base / "trials" / f"trial{trial.number:04d}"
        train = spec.train.model_copy(update={"lr": s["lr"]})
        fit(d, ctx.fit_loader, ctx.holdout_loader, run_dir=run_dir, seed=spec.seed, progress=False,
            eval_teacher=False, on_epoch_end=on_epoch_end, overwrite=True,
            **{**_fit_kwargs(train), "device": ctx.device})
        trial.set_user_attr("time_s", time.perf_counter() - t0)
        test = evaluate(d, ctx.test_loader, ctx.device, with_teacher=False)
        trial.set_user_attr("test_acc", float(test["student_acc"]))
        values = {"accuracy": curve[-1], "parameters": float(params), "latency": latency}
        return tuple(values[o] for o in spec.objectives)

    return objective


def _stale_trials_requeued(study: Any) -> int:
    """Trials left RUNNING by a crashed session: marked failed, and their settings queued to run again."""
    import optuna

    n = 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
        study.enqueue_trial(t.params, skip_if_exists=False)
        n += 1
    return n


def _optimize(spec: AutoSpec, base: Path, device: torch.device, deadline: float | None, progress: bool,
              threads: int | None = None, ctx: _Context | None = None) -> None:
    """Run trials on the shared study until the budget is spent (one process: the parent or a worker)."""
    import optuna
    from optuna.study import MaxTrialsCallback

    if threads is not None:
        torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ctx = ctx or _Context(spec, base, device, progress=False)
    study = optuna.load_study(study_name=spec.name, storage=_storage(base))
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    callbacks = [_print_trial] if progress else []
    if spec.budget.trials is not None:
        callbacks.insert(0, MaxTrialsCallback(spec.budget.trials, states=states))
        if len(study.get_trials(deepcopy=False, states=states)) >= spec.budget.trials:
            return
    timeout = None if deadline is None else max(0.0, deadline - time.time())
    if timeout == 0.0:
        return
    study.optimize(_objective(ctx, progress), timeout=timeout, callbacks=callbacks, gc_after_trial=True)


def _print_trial(study: Any, trial: Any) -> None:
    losses = trial.user_attrs.get("losses", {})
    method = trial.params.get("method", "?")
    kw = ", ".join(f"{k}={_fmt(v)}" for k, v in losses.get(method, {}).items()) if method != "ce" else ""
    curve = trial.user_attrs.get("curve", [])
    acc = f"{curve[-1]:.2f}%" if curve else "–"
    console.print(f"trial {trial.number:>3} {trial.state.name.lower():>8}  {trial.params.get('student', '?')}  "
                  f"{method}({kw})  held-out {acc}  "
                  f"lr {trial.user_attrs.get('lr', float('nan')):.3g}")


def _worker(spec_data: dict[str, Any], base: str, device: str, deadline: float | None, threads: int,
            progress: bool) -> None:
    spec = parse_auto_spec(spec_data)
    _optimize(spec, Path(base), torch.device(device), deadline, progress=progress, threads=threads)


def run_auto(spec: AutoSpec, *, out_dir: str | Path | None = None, progress: bool = True, resume: bool = False,
             overwrite: bool = False) -> Path:
    """Run the search of ``spec``; returns its folder (``OUT/NAME``) holding the study and the report.

    Before any training: the folder is locked (one process per study), a folder holding a study is
    refused unless ``resume`` (continue it: the spec must be the same, budget and jobs aside) or
    ``overwrite`` (replace it), and ``optuna`` must be installed.
    """
    from distill.integrations import require

    require("optuna", "auto", "distill auto")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own line per trial says what matters

    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: --resume continues the study, --overwrite "
                         "replaces it")
    base = Path(out_dir or spec.output_dir) / spec.name
    with RunLock(base, f"distill auto {spec.name}"):
        saved_file = base / "auto_spec.json"
        if saved_file.exists() and not overwrite:
            if not resume:
                raise RunFolderError(f"{base} holds a study already: --resume continues it, --overwrite replaces it")
            saved = read_json(saved_file, "auto spec")
            if saved != _spec_fingerprint(spec):
                from distill.train.rundir import fingerprint_diff

                changes = fingerprint_diff(saved, _spec_fingerprint(spec))
                diff = "; ".join(f"{k}: study {a!r}, now {b!r}" for k, a, b in changes)
                raise RecipeError(f"--resume: {base} holds a study of other settings ({diff}); "
                                  "only the budget and jobs may change between sessions")
        elif resume and not saved_file.exists():
            raise RunFolderError(f"--resume: {base} holds no study to continue")
        if overwrite:
            from distill.train.rundir import clear_run_dir

            clear_run_dir(base)
        base.mkdir(parents=True, exist_ok=True)
        atomic_write_json(saved_file, _spec_fingerprint(spec))
        atomic_write_text(base / "auto.yaml", yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
        deadline = None if spec.budget.minutes is None else time.time() + 60 * spec.budget.minutes
        device = _device(spec.train)
        _train_teacher(spec, base, progress)
        # the cache and the latency table are built once, before the trials (and before any worker starts)
        ctx = _Context(spec, base, device, progress)
        study = optuna.create_study(study_name=spec.name, storage=_storage(base), directions=_directions(spec),
                                    sampler=optuna.samplers.NSGAIISampler(population_size=spec.population, seed=spec.seed)
                                    if len(spec.objectives) > 1
                                    else optuna.samplers.TPESampler(seed=spec.seed), load_if_exists=True)
        requeued = _stale_trials_requeued(study)
        if requeued:
            console.print(f"{requeued} trial(s) interrupted in an earlier session will run again")
        if spec.jobs == 1:
            _optimize(spec, base, device, deadline, progress, ctx=ctx)
        else:
            _run_workers(spec, base, device, deadline, progress)
        write_report(spec, base)
    return base


def _run_workers(spec: AutoSpec, base: Path, device: torch.device, deadline: float | None, progress: bool) -> None:
    """``spec.jobs`` processes on the shared study: one GPU each when there are GPUs, else the cores shared."""
    import multiprocessing as mp

    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    threads = max(1, (os.cpu_count() or 1) // spec.jobs)
    ctx = mp.get_context("spawn")
    procs = []
    for i in range(spec.jobs):
        dev = f"cuda:{i % gpus}" if gpus else str(device)
        p = ctx.Process(target=_worker, args=(spec.model_dump(mode="json"), str(base), dev, deadline, threads,
                                                    progress))
        p.start()
        procs.append(p)
    failed = []
    for p in procs:
        p.join()
        if p.exitcode != 0:
            failed.append(p.exitcode)
    if failed:
        raise RuntimeError(f"distill auto: {len(failed)} of {spec.jobs} worker processes failed (exit codes {failed})")


# ------------------------------------------------------------------------------------- the report

def trial_records(study: Any) -> list[dict[str, Any]]:
    """Every finished (complete or pruned) trial as a plain record."""
    import optuna

    out = []
    for t in study.get_trials(deepcopy=False):
        if t.state not in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED):
            continue
        curve = t.user_attrs.get("curve", [])
        out.append({"trial": t.number, "state": t.state.name.lower(), "student": t.params.get("student"),
                    "method": t.params.get("method"), "losses": t.user_attrs.get("losses"),
                    "lr": t.user_attrs.get("lr"), "holdout_acc": curve[-1] if curve else None,
                    "curve": curve, "test_acc": t.user_attrs.get("test_acc"),
                    "parameters": t.user_attrs.get("parameters"), "latency_ms": t.user_attrs.get("latency_ms"),
                    "time_s": t.user_attrs.get("time_s")})
    return out


def front_recipe(spec: AutoSpec, record: dict[str, Any], base: Path) -> dict[str, Any]:
    """The recipe (``distill run``) of one trial: its student, losses and lr on the whole training split."""
    student = spec.students[student_labels(spec.students).index(record["student"])]
    teacher_file = Path(spec.teacher.checkpoint) if spec.teacher.checkpoint else base / "teacher" / MODEL_FILE
    recipe = {
        "name": f"{spec.name}-trial{record['trial']:04d}", "kind": "distill", "seeds": [spec.seed],
        "data": {"name": spec.data.name, **spec.data.model_dump(mode="json", exclude_defaults=True)},
        "student": student.model_dump(mode="json", exclude_defaults=True),
        "teacher": {"model": {**spec.teacher.model_dump(mode="json", exclude_defaults=True),
                              "checkpoint": str(teacher_file.resolve())}},
        "losses": record["losses"],
        "train": {**spec.train.model_dump(mode="json", exclude_defaults=True), "lr": record["lr"]},
        "output_dir": str(Path(spec.output_dir) / "recipes"),
    }
    parse_recipe(recipe, f"front point trial {record['trial']}")  # a written recipe always loads
    return recipe


def write_report(spec: AutoSpec, base: Path) -> list[dict[str, Any]]:
    """``trials.jsonl``, ``pareto.md``, ``pareto.json``, ``pareto/*.yaml`` (and ``pareto.png``); returns the front."""
    import optuna

    study = optuna.load_study(study_name=spec.name, storage=_storage(base))
    records = trial_records(study)
    atomic_write_text(base / "trials.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    done = [r for r in records if r["state"] == "complete"]
    keys = {"accuracy": "holdout_acc", "parameters": "parameters", "latency": "latency_ms"}
    points = [tuple(float(r[keys[o]]) for o in spec.objectives) for r in done]
    # trials with the same objectives are one point of the front: the earliest stands for the others ("ties")
    point_of: dict[tuple[float, ...], dict[str, Any]] = {}
    for i in pareto_front(points, _directions(spec)):
        first = point_of.setdefault(points[i], {**done[i], "ties": []})
        if first["trial"] != done[i]["trial"]:
            first["ties"].append(done[i]["trial"])
    front = sorted(point_of.values(), key=lambda r: (-r["holdout_acc"], r["parameters"]))
    folder = base / "pareto"
    folder.mkdir(exist_ok=True)
    for r in front:
        recipe = front_recipe(spec, r, base)
        r["recipe"] = str(folder / f"trial{r['trial']:04d}.yaml")
        atomic_write_text(Path(r["recipe"]), yaml.safe_dump(recipe, sort_keys=False))
    atomic_write_json(base / "pareto.json", front)
    pruned = sum(r["state"] == "pruned" for r in records)
    lines = [f"# distill auto: {spec.name}", "",
             f"{len(done)} complete and {pruned} pruned trial(s); objectives {', '.join(spec.objectives)}; "
             f"accuracy on a held-out {spec.holdout:.0%} of the training split after {spec.train.epochs} epoch(s) "
             "(the test accuracy is reported, never used to choose); latency: median forward time of a batch of "
             f"{spec.latency.batch_size} on this machine.", "",
             "| trial | student | parameters | latency (ms) | method | settings | lr | held-out acc (%) | "
             "test acc (%) | recipe | ties (same objectives) |",
             "| ---: | :--- | ---: | ---: | :--- | :--- | ---: | ---: | ---: | :--- | :--- |"]
    for r in front:
        m = r["method"]
        settings = "–" if m == "ce" else ", ".join(f"{k}={_fmt(v)}" for k, v in r["losses"][m].items())
        settings += f"; ce={_fmt(r['losses']['ce']['weight'])}"
        lines.append(f"| {r['trial']} | {r['student']} | {r['parameters']:,} | {r['latency_ms']:.3f} | {m} | {settings} | "
                     f"{r['lr']:.3g} | {r['holdout_acc']:.2f} | {r['test_acc']:.2f} | "
                     f"{Path(r['recipe']).relative_to(base)} | {', '.join(map(str, r['ties'])) or '–'} |")
    atomic_write_text(base / "pareto.md", "\n".join(lines) + "\n")
    _plot(done, front, base / "pareto.png")
    return front


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _plot(done: list[dict[str, Any]], front: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([r["parameters"] for r in done], [r["holdout_acc"] for r in done], c="0.7", s=14, label="trials")
    ax.scatter([r["parameters"] for r in front], [r["holdout_acc"] for r in front], c="C3", s=28, label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("student parameters")
    ax.set_ylabel("held-out accuracy (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["AutoSpec", "DEFAULT_METHODS", "count_parameters", "front_recipe", "is_auto_spec", "load_auto_spec",
           "measure_latency", "median_prune", "pareto_front", "parse_auto_spec", "run_auto", "sample_trial",
           "student_labels", "write_report"]
