"""Chains and generations of distillation: born-again networks, teacher-assistant chains, Pro-KD.

Each is a short loop over :func:`distill.fit`: a stage is one ``fit`` of a
:class:`~distill.Distiller` whose teacher is the model the previous stage delivered (or, for
Pro-KD, one ``fit`` whose teacher source walks through the teacher's saved checkpoints).

* :func:`born_again`: generations of one architecture, each taught by the previous one, and the
  ensemble of the generations (Furlanello et al., ICML 2018, arXiv 1805.04770);
* :func:`takd`: teacher → assistant_1 → ... → student, each taught by the one before (Mirzadeh et
  al., AAAI 2020, arXiv 1902.03393);
* :func:`pro_kd`: the student follows the teacher's training trajectory, checkpoint by checkpoint,
  with an annealed temperature (Rezagholizadeh et al., COLING 2022, arXiv 2110.08532);
* :func:`reskd`: res-students that learn what the student (plus the res-students before them) still
  misses of the teacher, added to its output (Li et al., IEEE TIP 2021, arXiv 2006.04719), and
  :class:`AdaptiveResidualStudent`, its sample-adaptive inference (res-students run only for the
  samples whose running prediction is not yet confident).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from distill import functional as DF
from distill.batch import Batch, View, as_batch
from distill.distiller import Distiller
from distill.methods.base import Method, Paper
from distill.methods.logits import KD, CrossEntropy, LogitRegression
from distill.models.registry import create as create_model
from distill.models.registry import list_models
from distill.strategies.registry import register_strategy
from distill.taps import logits_of
from distill.teachers import EnsembleTeacher, FrozenTeacher, TeacherSource, freeze
from distill.train.checkpoint import load_checkpoint, load_model, save_model
from distill.train.evaluate import evaluate
from distill.train.loop import FitResult, fit, seed_everything

__all__ = [
    "CWTM",
    "DKPP",
    "RESKD_CRITERIA",
    "AdaptiveResidualStudent",
    "AnnealedKD",
    "BornAgainResult",
    "ChainResult",
    "CheckpointTeacher",
    "ModelSpec",
    "ResKDResult",
    "ResidualStudent",
    "born_again",
    "build_model",
    "check_model_spec",
    "check_stage_resume",
    "ensemble_accuracy",
    "evaluate_adaptive",
    "load_weights",
    "pro_kd",
    "reskd",
    "reskd_confident",
    "save_every_epoch",
    "takd",
]

BAN_PAPER = Paper("Born-Again Neural Networks", "T. Furlanello, Z. Lipton, M. Tschannen, L. Itti, A. Anandkumar",
                  2018, "1805.04770", "ICML")
TAKD_PAPER = Paper("Improved Knowledge Distillation via Teacher Assistant",
                   "S. I. Mirzadeh, M. Farajtabar, A. Li, N. Levine, A. Matsukawa, H. Ghasemzadeh", 2020, "1902.03393",
                   "AAAI")
RESKD_PAPER = Paper("ResKD: Residual-Guided Knowledge Distillation", "X. Li, S. Li, B. Omar, F. Wu, X. Li", 2021,
                    "2006.04719", "IEEE TIP")
PROKD_PAPER = Paper("Pro-KD: Progressive Distillation by Following the Footsteps of the Teacher",
                    "M. Rezagholizadeh, A. Jafari, P. Salad, P. Sharma, A. S. Pasand, A. Ghodsi", 2022, "2110.08532",
                    "COLING")

HAND_OVER = ("last", "best")
BAN_LOSSES = ("kd", "cwtm", "dkpp")


# ---------------------------------------------------------------------------------------- losses


class CWTM(Method):
    """Born-again networks' Confidence-Weighted by Teacher Max: the ground-truth cross-entropy of
    each sample weighted by the teacher's top probability, normalised over the batch
    (:func:`~distill.functional.cwtm_loss`; BAN Section 3.2)."""

    name = "cwtm"
    needs_targets = True

    def __init__(self, weight: float = 1.0, warmup_epochs: int = 0) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        assert batch.targets is not None  # needs_targets: the Distiller checked
        return DF.cwtm_loss(student_view["logits"], teacher_view["logits"].detach(), batch.targets)


class DKPP(Method):
    """Born-again networks' Dark Knowledge with Permuted Predictions: KD at T = 1 towards the teacher
    with its non-argmax probabilities randomly permuted per sample and step
    (:func:`~distill.functional.dkpp_loss`; BAN Section 3.2). The permutations come from torch's
    global generator (seeded by ``fit``)."""

    name = "dkpp"

    def __init__(self, weight: float = 1.0, warmup_epochs: int = 0) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        return DF.dkpp_loss(student_view["logits"], teacher_view["logits"].detach())


class AnnealedKD(KD):
    """Hinton KD whose temperature falls linearly from ``T_max`` (first epoch) to ``T_min`` (last epoch)
    (:func:`~distill.functional.annealed_temperature`), the loss still scaled by ``T²`` of the epoch.

    This anneals the softmax temperature of a KL loss. It is not the loss of Annealing KD (Jafari
    et al., EACL 2021, arXiv 2104.07163), whose authors' code (huawei-noah/Efficient-NLP,
    ``Annealing_KD``) regresses the student's logits on the teacher's logits scaled by
    ``T / T_max`` (MSE, ``T`` stepping up from 1 to ``T_max`` over the first phase), then trains
    on the labels alone in a second phase."""

    name = "annealed_kd"

    def __init__(self, T_max: float = 4.0, T_min: float = 1.0, weight: float = 1.0, warmup_epochs: int = 0) -> None:
        DF.annealed_temperature(0, 2, T_max, T_min)  # validates the pair before any training
        super().__init__(T=T_max, weight=weight, warmup_epochs=warmup_epochs)
        self.T_max, self.T_min = float(T_max), float(T_min)

    def on_epoch_start(self, epoch: int, total_epochs: int | None = None) -> None:
        super().on_epoch_start(epoch, total_epochs)
        if total_epochs is not None:
            self.T = DF.annealed_temperature(epoch, total_epochs, self.T_max, self.T_min)

    def log_values(self) -> dict[str, float]:
        """Logged by ``fit`` in each epoch's metrics (``<loss>_T``)."""
        return {"T": self.T}

    def extra_repr(self) -> str:
        return f"T_max={self.T_max}, T_min={self.T_min}, T={self.T}, weight={self.weight}"


# ---------------------------------------------------------------------------------------- results


@dataclass
class ChainResult(FitResult):
    """The last stage's :class:`~distill.train.loop.FitResult` (the delivered model) plus every stage's
    result and model, in training order."""

    stages: list[FitResult] = field(default_factory=list)
    models: list[nn.Module] = field(default_factory=list)


@dataclass
class BornAgainResult(ChainResult):
    """:class:`ChainResult` of the generations plus the ensembles' accuracies.

    ``stages`` / ``models``: the teacher trained from scratch when no teacher was given (generation 0),
    then born-again generations 1..G. ``ensemble_accs[k-1]``: top-1 (%) on the validation data of the
    average of the predicted distributions of born-again generations 1..k (the paper's BAN ensemble);
    ``ensemble_acc`` is that of all G. The delivered model (the top-level fields) is generation G.
    """

    ensemble_acc: float | None = None
    ensemble_accs: list[float] = field(default_factory=list)


def _with_stages(result: FitResult, stages: list[FitResult], models: list[nn.Module], cls: type = ChainResult,
                 **extra: Any) -> Any:
    return cls(history=result.history, best_acc=result.best_acc, best_epoch=result.best_epoch,
               last_acc=result.last_acc, run_dir=result.run_dir, stages=stages, models=models, **extra)


# ---------------------------------------------------------------------------------------- helpers


def _check_epochs(epochs: Any) -> int:
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    return epochs


def _check_positive(name: str, value: Any, low: float = 0.0, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value <= low or (high is not None and value > high):
        span = f"({low}, {high}]" if high is not None else f"> {low}"
        raise ValueError(f"{name} must be a number in {span}, got {value!r}")
    return float(value)


def _check_weight(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _check_trained_teacher(teacher: Any) -> None:
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be a trained nn.Module, got {type(teacher).__name__}")


def _check_spec_list(specs: Any, name: str, *, allow_empty: bool) -> None:
    if isinstance(specs, (str, bytes, Mapping)) or not isinstance(specs, Sequence) or (not specs and not allow_empty):
        raise TypeError(f"{name} must be a {'' if allow_empty else 'non-empty '}list of models, factories or zoo "
                        f"specs, got {specs!r}")
    for i, spec in enumerate(specs):
        check_model_spec(spec, f"{name}[{i}]")


def _with_labels(kd: Method, kd_weight: float) -> dict[str, Method]:
    """``λ · kd + (1 - λ) · CE``: the KD term (already weighted λ) and the label term when λ < 1."""
    return {"kd": kd} if kd_weight >= 1.0 else {"kd": kd, "ce": CrossEntropy(weight=1.0 - kd_weight)}


def _check_hand_over(hand_over: str) -> None:
    if hand_over not in HAND_OVER:
        raise ValueError(f"hand_over must be one of {HAND_OVER}, got {hand_over!r}")


def check_stage_resume(fit_kwargs: dict[str, Any], strategy: str, run_dir: str | Path | None) -> None:
    """``resume`` of a strategy that trains stages, each a ``fit`` with a folder of its own under
    ``run_dir``: every stage's ``fit`` gets it, so a finished stage restores its last checkpoint
    (no epoch left to run), the interrupted one continues, and the later ones start. Needs ``run_dir``."""
    resume = fit_kwargs.get("resume")
    if resume and run_dir is None:
        raise ValueError(f"{strategy}: resume=True needs run_dir, where each stage keeps its checkpoints")
    if resume not in (None, False, True):
        raise ValueError(f"{strategy}: resume must be True or False (each stage resumes from its own folder), "
                         f"got {resume!r}")


ModelSpec = nn.Module | Callable[[], nn.Module] | str | Mapping[str, Any]
"""A model, a zero-argument factory, a zoo name (``"resnet8"``) or a zoo name with arguments
(``{"name": "cnn", "widths": [4, 8, 8], "num_classes": 10}``): the last three build a fresh model."""


def check_model_spec(spec: Any, what: str, *, fresh: bool = False) -> None:
    """Raise a clear error, before any training, for a :data:`ModelSpec` that cannot build a model
    (or, with ``fresh``, for a ready model where each use needs a new one); ``what`` names the argument."""
    if isinstance(spec, nn.Module):
        if fresh:
            raise TypeError(
                f"{what} is built afresh for every generation: pass a factory, a zoo name or a zoo spec (e.g. "
                f"lambda: distill.models.create('resnet8x4', num_classes=100)), not a model ({type(spec).__name__})"
            )
        return
    name = spec.get("name") if isinstance(spec, Mapping) else spec if isinstance(spec, str) else None
    if isinstance(spec, (str, Mapping)):
        if name not in list_models():
            raise ValueError(f"{what}: unknown zoo model {name!r}; known: {', '.join(list_models())}")
        return
    if not callable(spec):
        raise TypeError(f"{what} must be an nn.Module, a zero-argument factory, a zoo name or a zoo spec "
                        f"{{'name': ..., **kwargs}}, got {type(spec).__name__}")


def build_model(spec: ModelSpec, what: str) -> nn.Module:
    """The model a :data:`ModelSpec` stands for: the model itself, or a fresh one built by the factory
    or the zoo; ``what`` names the argument in errors."""
    if isinstance(spec, nn.Module):
        return spec
    if isinstance(spec, str):
        model = create_model(spec)
    elif isinstance(spec, Mapping):
        kwargs = dict(spec)
        model = create_model(kwargs.pop("name"), **kwargs)
    else:
        model = spec()
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what}: the factory returned a {type(model).__name__}, not an nn.Module")
    return model


def _train_stage(model: nn.Module, teacher: Any, losses: dict[str, Any], train_loader: Iterable[Any],
                 val_loader: Iterable[Any] | None, *, epochs: int, run_dir: Path | None, seed: int, progress: bool,
                 hand_over: str, fit_kwargs: dict[str, Any]) -> FitResult:
    """One ``fit`` of ``model`` (taught by ``teacher``); with ``hand_over="best"`` the model ends with
    the weights of its best validation epoch (the reference TAKD code hands the best checkpoint on)."""
    kwargs = dict(fit_kwargs)
    user_callback = kwargs.pop("on_epoch_end", None)
    best: dict[str, Any] = {"acc": None, "state": None}

    def on_epoch_end(row: dict[str, Any]) -> None:
        acc = row.get("val_student_acc")
        if hand_over == "best" and acc is not None and (best["acc"] is None or acc > best["acc"]):
            best["acc"] = acc
            best["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if user_callback is not None:
            user_callback(row)

    distiller = Distiller(model, teacher, losses)
    result = fit(distiller, train_loader, val_loader, epochs=epochs, run_dir=run_dir, seed=seed, progress=progress,
                 on_epoch_end=on_epoch_end, **kwargs)
    best_file = run_dir / "checkpoints" / "best.pt" if run_dir is not None else None
    if hand_over == "best" and kwargs.get("resume") and best_file is not None and best_file.is_file():
        # a resumed stage saw only its last epochs: the best of all of them is the one fit saved
        model.load_state_dict(load_checkpoint(best_file, map_location="cpu")["student"])
    elif best["state"] is not None:
        model.load_state_dict(best["state"])
    return result


class _SourceAsModel(nn.Module):
    """A teacher source seen as a model of the inputs (so ``evaluate`` can score an ensemble)."""

    def __init__(self, source: TeacherSource) -> None:
        super().__init__()
        self.source = source

    def forward(self, x: Tensor) -> Tensor:
        return self.source(Batch(x))["logits"]


def ensemble_accuracy(models: Sequence[nn.Module], loader: Iterable[Any],
                      device: torch.device | str | None = None) -> float:
    """Top-1 accuracy (%) on ``loader`` of the average of the models' predicted distributions
    (:class:`~distill.teachers.EnsembleTeacher` at T = 1). The models are frozen (eval mode, no
    gradients), as teachers are."""
    if not models:
        raise ValueError("ensemble_accuracy needs at least one model")
    if device is None:
        device = next(models[0].parameters()).device
    ensemble = _SourceAsModel(EnsembleTeacher(list(models), combine="probs", temperature=1.0))
    return evaluate(SimpleNamespace(student=ensemble), loader, device, with_teacher=False)["student_acc"]


# ---------------------------------------------------------------------------------------- born-again


def _ban_losses(loss: str, T: float, ce_weight: float) -> dict[str, Method]:
    if loss == "kd":
        losses: dict[str, Method] = {"kd": KD(T=T)}
    elif loss == "cwtm":
        losses = {"cwtm": CWTM()}
    else:
        losses = {"dkpp": DKPP()}
    if ce_weight > 0:
        losses["ce"] = CrossEntropy(weight=ce_weight)
    return losses


@register_strategy("born_again", "chain", BAN_PAPER)
def born_again(
    student: ModelSpec,
    train_loader: Iterable[Any],
    val_loader: Iterable[Any] | None = None,
    *,
    epochs: int,
    teacher: nn.Module | None = None,
    generations: int = 3,
    run_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    loss: str = "kd",
    T: float = 1.0,
    ce_weight: float = 0.0,
    hand_over: str = "last",
    **fit_kwargs: Any,
) -> BornAgainResult:
    """Born-again networks: generations of one architecture, each distilled from the previous one.

    Generation 0 is ``teacher`` when given, else a model of the student's architecture trained from
    scratch with cross-entropy. Generation ``k`` (``k = 1..generations``) is a fresh model trained
    only on generation ``k-1``'s predictions (``loss``), and at the end the average of the predicted
    distributions of generations 1..k is evaluated on ``val_loader`` for every ``k`` (the paper's BAN
    ensembles).

    Args:
        student: the architecture: a zero-argument factory, a zoo name or a zoo spec (each generation
            is a fresh model, so not a ready model).
        train_loader, val_loader: the data; ``val_loader`` also scores the ensembles.
        epochs: epochs per generation (and for generation 0 when it is trained here).
        teacher: the trained generation 0 (any architecture: the paper also crosses DenseNets and ResNets).
        generations: born-again generations after generation 0 (the paper trains up to 3).
        loss: what each generation minimises towards its teacher:
            ``"kd"``: the KL divergence to the teacher's distribution at temperature ``T`` (times T²),
            the paper's BAN objective (the teacher's outputs only, no labels, no softening: T = 1);
            ``"cwtm"``: the labels' cross-entropy weighted by the teacher's confidence (:class:`CWTM`);
            ``"dkpp"``: KD towards the teacher with permuted non-argmax predictions (:class:`DKPP`).
        T: the temperature of ``loss="kd"``.
        ce_weight: weight of an added ground-truth cross-entropy (the paper's BAN+L variant; 0 = off).
        hand_over: the weights a generation hands to the next: ``"last"`` epoch's or ``"best"``
            validation epoch's.
        run_dir: generation ``k`` writes to ``run_dir/gen<k>``.
        seed: generation ``k`` is built and trained with seed ``seed + k``.
        **fit_kwargs: passed to every :func:`distill.fit` (optimizer, lr, schedule...).
    """
    check_model_spec(student, "student", fresh=True)
    epochs = _check_epochs(epochs)
    if isinstance(generations, bool) or not isinstance(generations, int) or generations < 1:
        raise ValueError(f"generations must be a positive int, got {generations!r}")
    if loss not in BAN_LOSSES:
        raise ValueError(f"loss must be one of {BAN_LOSSES}, got {loss!r}")
    T = _check_positive("T", T)
    ce_weight = _check_weight("ce_weight", ce_weight)
    _check_hand_over(hand_over)
    if teacher is not None and not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be an nn.Module or None, got {type(teacher).__name__}")
    check_stage_resume(fit_kwargs, "born_again", run_dir)
    root = Path(run_dir) if run_dir is not None else None
    stages: list[FitResult] = []
    models: list[nn.Module] = []

    def stage(k: int, previous: nn.Module | None, losses: dict[str, Any]) -> nn.Module:
        seed_everything(seed + k)  # the fresh model's initialisation is part of the generation's seed
        model = build_model(student, "student")
        stages.append(_train_stage(model, previous, losses, train_loader, val_loader, epochs=epochs,
                                   run_dir=root / f"gen{k}" if root else None, seed=seed + k, progress=progress,
                                   hand_over=hand_over, fit_kwargs=fit_kwargs))
        models.append(model)
        return model

    previous = teacher if teacher is not None else stage(0, None, {"ce": CrossEntropy()})
    born = []
    for k in range(1, generations + 1):
        previous = stage(k, previous, _ban_losses(loss, T, ce_weight))
        born.append(previous)
    ensemble_accs = [ensemble_accuracy(born[:k], val_loader) for k in range(1, len(born) + 1)] \
        if val_loader is not None else []
    for m in models:  # a generation was frozen when it taught the next: hand every model back trainable
        m.requires_grad_(True)
    return _with_stages(stages[-1], stages, models, BornAgainResult,
                        ensemble_acc=ensemble_accs[-1] if ensemble_accs else None, ensemble_accs=ensemble_accs)


# ---------------------------------------------------------------------------------------- TAKD


@register_strategy("takd", "chain", TAKD_PAPER)
def takd(
    student: ModelSpec,
    train_loader: Iterable[Any],
    val_loader: Iterable[Any] | None = None,
    *,
    epochs: int,
    teacher: nn.Module,
    assistants: Sequence[ModelSpec],
    run_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    T: float = 4.0,
    kd_weight: float = 0.9,
    hand_over: str = "best",
    **fit_kwargs: Any,
) -> ChainResult:
    """Teacher-assistant knowledge distillation: teacher → assistant_1 → ... → assistant_n → student.

    Each model of the chain minimises ``(1 - λ) CE + λ T² KL(softmax(t/T) ‖ softmax(s/T))`` (Eq. 3
    of the paper) towards the model before it, which is frozen.

    Args:
        student: the final student (a model, a zero-argument factory, a zoo name or a zoo spec).
        teacher: the trained teacher.
        assistants: the teacher assistants in chain order, largest first (models, factories, zoo names
            or zoo specs); any number, including none (plain KD).
        epochs: epochs per stage.
        T, kd_weight: the temperature and λ. The paper tunes both per experiment (its code searches
            T ∈ {1, 2, 5, 10, 15, 20} and λ ∈ [0.05, 1]) and gives no single value; the defaults are
            this library's KD baseline (T = 4, λ = 0.9: 0.1 CE + 0.9 KD).
        hand_over: the weights each stage hands on as the next teacher: ``"best"`` validation epoch's
            (the reference code loads the best checkpoint; without ``val_loader`` the last) or ``"last"``.
        run_dir: stage ``i`` (0 = first assistant) writes to ``run_dir/stage<i>``.
        seed: stage ``i`` trains with seed ``seed + i``.
        **fit_kwargs: passed to every :func:`distill.fit`.

    The reference code's KD term uses ``nn.KLDivLoss()`` with its default mean over all B·K entries,
    i.e. the paper's KL divided by K; this follows the paper (batch mean of the KL, times T²).
    """
    epochs = _check_epochs(epochs)
    _check_trained_teacher(teacher)
    _check_spec_list(assistants, "assistants", allow_empty=True)
    check_model_spec(student, "student")
    T = _check_positive("T", T)
    kd_weight = _check_positive("kd_weight", kd_weight, 0.0, 1.0)
    _check_hand_over(hand_over)
    check_stage_resume(fit_kwargs, "takd", run_dir)
    root = Path(run_dir) if run_dir is not None else None
    stages: list[FitResult] = []
    models: list[nn.Module] = []
    previous: nn.Module = teacher
    chain = list(assistants) + [student]
    for i, spec in enumerate(chain):
        last = i == len(chain) - 1
        model = build_model(spec, "student" if last else f"assistants[{i}]")
        stages.append(_train_stage(model, previous, _with_labels(KD(T=T, weight=kd_weight), kd_weight), train_loader, val_loader, epochs=epochs,
                                   run_dir=root / f"stage{i}" if root else None, seed=seed + i, progress=progress,
                                   hand_over=hand_over, fit_kwargs=fit_kwargs))
        models.append(model)
        previous = model
    for m in models[:-1]:  # the assistants were frozen as teachers; hand them back trainable
        m.requires_grad_(True)
    return _with_stages(stages[-1], stages, models)


# ---------------------------------------------------------------------------------------- Pro-KD


def load_weights(path: str | Path, model: nn.Module) -> nn.Module:
    """Load the model weights stored in ``path`` into ``model``.

    Reads a file of :func:`~distill.train.checkpoint.save_model`, ``fit``'s ``checkpoints/last.pt``
    (the student of its ``"distiller"`` state) or ``checkpoints/best.pt`` (its ``"student"``), or a plain
    ``state_dict``. A clear error names the file when the weights do not fit the model.
    """
    return load_model(path, model)[0]


def save_every_epoch(model: nn.Module, folder: str | Path, every: int = 1) -> Callable[[dict[str, Any]], None]:
    """An ``on_epoch_end`` callback for :func:`distill.fit` that saves ``model`` to
    ``folder/epoch<NNNN>.pt`` (:func:`~distill.train.checkpoint.save_model`) every ``every`` epochs:
    the teacher's footsteps that :func:`pro_kd` follows."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a positive int, got {every!r}")
    folder = Path(folder)

    def callback(row: dict[str, Any]) -> None:
        if (row["epoch"] + 1) % every == 0:
            save_model(folder / f"epoch{row['epoch'] + 1:04d}.pt", model,
                       metadata={"epoch": row["epoch"], "val_student_acc": row.get("val_student_acc")})

    return callback


def _checkpoint_paths(checkpoints: str | Path | Sequence[str | Path]) -> list[Path]:
    if isinstance(checkpoints, (str, Path)):
        folder = Path(checkpoints)
        if not folder.is_dir():
            raise FileNotFoundError(f"checkpoint folder {str(folder)!r} does not exist")
        paths = sorted(folder.glob("*.pt"))
        if not paths:
            raise ValueError(f"checkpoint folder {str(folder)!r} holds no *.pt file")
        return paths
    paths = [Path(p) for p in checkpoints]
    if not paths:
        raise ValueError("checkpoints is empty: give the teacher's checkpoints in training order")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"teacher checkpoints do not exist: {missing[:5]}")
    return paths


class CheckpointTeacher(FrozenTeacher):
    """A frozen teacher that walks through its saved checkpoints as the epochs pass.

    Checkpoint ``i`` (0-based, in the given order) teaches epochs ``[i · E/n, (i+1) · E/n)`` of an
    ``E``-epoch run with ``n`` checkpoints when ``epochs_per_checkpoint`` is ``None`` (an even split;
    the last one keeps any remainder), else ``epochs_per_checkpoint`` epochs each, the last one
    staying until the end. The weights are loaded at the start of the epoch that switches
    (``on_epoch_start``; ``distill.fit`` calls it through ``Distiller.set_epoch``).

    Args:
        model: the teacher's architecture; the checkpoints' weights are loaded into it
            (:func:`load_weights` formats). The first checkpoint is loaded here, so a checkpoint of
            another architecture fails before any training.
        checkpoints: the files in training order, or a folder whose ``*.pt`` files sort in that order
            (:func:`save_every_epoch` names them so).
        epochs_per_checkpoint: see above.
    """

    kind = "checkpoints"
    static = False  # the weights change between epochs: fit must not cache its validation outputs

    def __init__(self, model: nn.Module, checkpoints: str | Path | Sequence[str | Path], *,
                 epochs_per_checkpoint: int | None = None, metadata: dict[str, Any] | None = None) -> None:
        if epochs_per_checkpoint is not None and (isinstance(epochs_per_checkpoint, bool) or not isinstance(
                epochs_per_checkpoint, int) or epochs_per_checkpoint < 1):
            raise ValueError(f"epochs_per_checkpoint must be a positive int or None, got {epochs_per_checkpoint!r}")
        self.paths = _checkpoint_paths(checkpoints)
        load_weights(self.paths[0], model)
        super().__init__(model, metadata=metadata)
        self.epochs_per_checkpoint = epochs_per_checkpoint
        self.total_epochs: int | None = None
        self.current = 0

    def set_total_epochs(self, total: int) -> None:
        """The run's length, for the even split (``pro_kd`` sets it)."""
        self.total_epochs = _check_epochs(total)

    def index_at(self, epoch: int) -> int:
        """The checkpoint that teaches ``epoch``."""
        n = len(self.paths)
        if self.epochs_per_checkpoint is not None:
            return min(epoch // self.epochs_per_checkpoint, n - 1)
        if self.total_epochs is None:
            raise RuntimeError("CheckpointTeacher needs epochs_per_checkpoint or set_total_epochs() for its schedule")
        return min(epoch * n // self.total_epochs, n - 1)

    def on_epoch_start(self, epoch: int) -> None:
        i = self.index_at(epoch)
        if i != self.current:
            load_weights(self.paths[i], self.model)  # copies into the existing tensors: device and dtype stay
            self.current = i


@register_strategy("pro_kd", "chain", PROKD_PAPER)
def pro_kd(
    student: ModelSpec,
    train_loader: Iterable[Any],
    val_loader: Iterable[Any] | None = None,
    *,
    epochs: int,
    teacher: nn.Module,
    checkpoints: str | Path | Sequence[str | Path] | None = None,
    teacher_epochs: int | None = None,
    run_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    T_max: float = 4.0,
    T_min: float = 1.0,
    kd_weight: float = 0.9,
    epochs_per_checkpoint: int | None = None,
    **fit_kwargs: Any,
) -> ChainResult:
    """Pro-KD: the student distils from the teacher's checkpoints in training order, with a falling temperature.

    The student minimises ``(1 - λ) CE + λ T_e² KL(softmax(t/T_e) ‖ softmax(s/T_e))`` where the teacher
    ``t`` is the checkpoint of the current stage (:class:`CheckpointTeacher`: the checkpoints split
    the student's epochs evenly unless ``epochs_per_checkpoint`` is given) and ``T_e`` falls linearly
    from ``T_max`` to ``T_min`` over the run (:class:`AnnealedKD`): early, immature teachers are
    followed with soft targets, the final teacher at ``T_min``. One optimizer and schedule span the
    whole run (one :func:`distill.fit`).

    Args:
        student: the student (a model, a zero-argument factory, a zoo name or a zoo spec).
        teacher: the teacher's architecture (an ``nn.Module``) into which the checkpoints are loaded.
        checkpoints: the teacher's checkpoint files in training order, or their folder. ``None``
            trains the teacher here first, from its current weights, for ``teacher_epochs`` epochs
            with cross-entropy, saving a checkpoint per epoch under ``run_dir/teacher/footsteps``
            (:func:`save_every_epoch`; needs ``run_dir``).
        epochs: the student's epochs.
        T_max, T_min, kd_weight: the temperature's start and end and λ (defaults: this library's KD
            baseline, T = 4 annealed to 1 and λ = 0.9; see Sources below).
        epochs_per_checkpoint: stage length; ``None`` splits the epochs evenly over the checkpoints.
        run_dir, seed, progress, **fit_kwargs: passed to :func:`distill.fit` (the student writes to
            ``run_dir/student``).

    Returns:
        a :class:`ChainResult`: the student's result, with ``stages`` / ``models`` holding the teacher's
        training (when done here) and the student's.

    Sources: only the paper's abstract could be read here (arXiv listing, paperswithcode,
    deepai, emergentmind; no code is published): the student follows the teacher's training
    footprints, checkpoint by checkpoint, instead of a single fully trained teacher, against the
    capacity gap and the search for the best teacher checkpoint. What the abstract fixes, this
    does: one teacher checkpoint after another, in training order. The loss (temperature KD with
    a label term), the linear fall of the temperature, the even split of the epochs over the
    checkpoints and every default (T 4 → 1, λ = 0.9) are this library's and not checked against
    the paper; set them per task. The temperature annealing is not that of the same group's
    Annealing KD (see :class:`AnnealedKD`).
    """
    epochs = _check_epochs(epochs)
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be an nn.Module (the architecture the checkpoints load into), got "
                        f"{type(teacher).__name__}")
    check_model_spec(student, "student")
    kd_weight = _check_positive("kd_weight", kd_weight, 0.0, 1.0)
    DF.annealed_temperature(0, 2, T_max, T_min)  # validates the temperatures before any training
    check_stage_resume(fit_kwargs, "pro_kd", run_dir)
    root = Path(run_dir) if run_dir is not None else None
    stages: list[FitResult] = []
    models: list[nn.Module] = []
    if checkpoints is None:
        if teacher_epochs is None or root is None:
            raise ValueError("pro_kd needs the teacher's checkpoints, or teacher_epochs and run_dir to train the "
                             "teacher here and save its footsteps")
        _check_epochs(teacher_epochs)
        folder = root / "teacher" / "footsteps"
        if folder.is_dir() and any(folder.glob("*.pt")) and not fit_kwargs.get("resume"):
            raise FileExistsError(f"{str(folder)!r} already holds checkpoints; give them as checkpoints= or "
                                  "use another run_dir")
        kwargs = dict(fit_kwargs)
        user_callback = kwargs.pop("on_epoch_end", None)
        trained = copy.deepcopy(teacher)  # the footsteps are saved from this copy; `teacher` loads them
        save = save_every_epoch(trained, folder)

        def on_epoch_end(row: dict[str, Any]) -> None:
            save(row)
            if user_callback is not None:
                user_callback(row)

        stages.append(fit(Distiller(trained, None, {"ce": CrossEntropy()}), train_loader, val_loader,
                          epochs=teacher_epochs, run_dir=root / "teacher", seed=seed, progress=progress,
                          on_epoch_end=on_epoch_end, **kwargs))
        models.append(trained)
        checkpoints = folder
    elif teacher_epochs is not None:
        raise ValueError("give either checkpoints (a trained teacher's footsteps) or teacher_epochs, not both")
    source = CheckpointTeacher(teacher, checkpoints, epochs_per_checkpoint=epochs_per_checkpoint)
    source.set_total_epochs(epochs)
    model = build_model(student, "student")
    losses = _with_labels(AnnealedKD(T_max=T_max, T_min=T_min, weight=kd_weight), kd_weight)
    result = fit(Distiller(model, source, losses), train_loader, val_loader, epochs=epochs,
                 run_dir=root / "student" if root else None, seed=seed, progress=progress, **fit_kwargs)
    stages.append(result)
    models.append(model)
    return _with_stages(result, stages, models)


# ---------------------------------------------------------------------------------------- ResKD


class ResidualStudent(nn.Module):
    """A student plus its res-students: the logits are the sum of the parts' logits.

    ``parts[0]`` is the student, ``parts[1:]`` the res-students. The first ``frozen`` parts are
    fixed (eval mode whatever ``train()`` says, no gradients, run under ``no_grad``): while
    res-student ``k`` trains, the parts before it are; their sum is what it corrects.
    """

    def __init__(self, parts: Sequence[nn.Module], frozen: int = 0) -> None:
        super().__init__()
        if not parts:
            raise ValueError("a ResidualStudent needs at least one part")
        if not 0 <= frozen <= len(parts):
            raise ValueError(f"frozen must lie in [0, {len(parts)}], got {frozen}")
        self.parts = nn.ModuleList(parts)
        self.frozen = frozen
        for part in self.parts[:frozen]:
            freeze(part)

    def train(self, mode: bool = True) -> ResidualStudent:
        super().train(mode)
        for part in self.parts[: self.frozen]:
            part.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        total: Tensor | None = None
        for i, part in enumerate(self.parts):
            if i < self.frozen:
                with torch.no_grad():
                    z = logits_of(part(x))
            else:
                z = logits_of(part(x))
            if total is not None:
                _check_part_logits(i, z, total.shape)
            total = z if total is None else total + z
        assert total is not None
        return total


def _check_part_logits(i: int, z: Tensor, expected: torch.Size) -> None:
    if z.shape != expected:
        raise ValueError(f"part {i} of the residual student gives logits {tuple(z.shape)}, the parts before it "
                         f"{tuple(expected)}: every res-student must output the teacher's classes")


RESKD_CRITERIA = ("max_prob", "entropy")
"""The confidence tests of :func:`reskd_confident`."""


def _check_stop_rule(threshold: Any, criterion: Any) -> float:
    if criterion not in RESKD_CRITERIA:
        raise ValueError(f"criterion must be one of {RESKD_CRITERIA}, got {criterion!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
    return float(threshold)


def reskd_confident(logits: Tensor, threshold: float = 0.9, criterion: str = "max_prob") -> Tensor:
    r"""ResKD's stopping rule at inference: the samples whose running prediction is confident
    enough to skip the remaining res-students.

    With :math:`p = \operatorname{softmax}(z)` of the running sum :math:`z` (the student's logits
    plus those of the res-students run so far) and the threshold :math:`\tau \in [0, 1]`:

    * ``"max_prob"``: stop when :math:`\max_k p_k \ge \tau` (:math:`\tau = 0` stops every sample
      after the student, :math:`\tau = 1` only a sample whose top probability is exactly 1);
    * ``"entropy"``: stop when the entropy normalised to [0, 1] is small,
      :math:`-\sum_k p_k \log p_k / \log K \le \tau`.

    ``logits`` (B, K) with K >= 2 → bool (B,), True where the sample stops.

    The paper (Li et al., IEEE TIP 2021, arXiv 2006.04719) decides per sample which res-students
    are not needed; only its abstract (and a secondary summary saying the strategy adapts to the
    samples' difficulty) could be read here, so these two confidence tests and the default
    :math:`\tau = 0.9` on the top probability are this library's choice, not the paper's rule.
    """
    threshold = _check_stop_rule(threshold, criterion)
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"reskd_confident expects logits (B, K) with K >= 2 classes, got {tuple(logits.shape)}")
    log_p = torch.log_softmax(logits.float(), dim=1)
    if criterion == "max_prob":
        return log_p.max(dim=1).values.exp() >= threshold
    entropy = -(log_p.exp() * log_p).sum(dim=1)  # finite where a probability underflows to 0
    return entropy / math.log(logits.shape[1]) <= threshold


class AdaptiveResidualStudent(ResidualStudent):
    """ResKD's sample-adaptive inference: the student, then each res-student only for the samples
    that still need it.

    Per sample, the running sum starts at the student's logits; before res-student ``k`` runs,
    :func:`reskd_confident` tests the sum so far and a confident sample stops there: its logits
    are the sum of the parts it ran. Res-student ``k`` runs on the sub-batch of samples still
    going, so a skipped part costs those samples nothing. Every part is frozen (eval mode, no
    gradients): BatchNorm uses its running statistics, so a sample's output does not depend on
    which other samples share its sub-batch.

    ``forward(x)`` → logits (B, K), and keeps in ``last_used`` (B,) int64 how many res-students
    each sample ran (0 .. R); :meth:`predict` returns both; :meth:`full` runs every part (the
    :class:`ResidualStudent` sum). Inputs must be one tensor (B, ...).

    Args:
        parts: the student then the res-students (or a :class:`ResidualStudent`, whose parts are
            shared, not copied).
        threshold, criterion: the stopping rule (:func:`reskd_confident`).
    """

    def __init__(self, parts: Sequence[nn.Module] | ResidualStudent, threshold: float = 0.9,
                 criterion: str = "max_prob") -> None:
        threshold = _check_stop_rule(threshold, criterion)
        modules = list(parts.parts) if isinstance(parts, ResidualStudent) else list(parts)
        super().__init__(modules, frozen=len(modules))
        self.threshold, self.criterion = threshold, criterion
        self.last_used: Tensor | None = None

    def full(self, x: Tensor) -> Tensor:
        """The logits with every part run (no sample stops early)."""
        return super().forward(x)

    @torch.no_grad()
    def predict(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(logits (B, K), used (B,) int64)``: the adaptive logits and each sample's number of res-students."""
        if not isinstance(x, Tensor):
            raise TypeError(f"sample-adaptive inference splits the batch per sample: the input must be a tensor "
                            f"(B, ...), got {type(x).__name__}")
        self.train(False)  # the parts are frozen: eval mode is their only mode
        total = logits_of(self.parts[0](x)).clone()
        used = torch.zeros(total.shape[0], dtype=torch.long, device=total.device)
        going = torch.arange(total.shape[0], device=total.device)
        for k, part in enumerate(self.parts[1:], start=1):
            going = going[~reskd_confident(total[going], self.threshold, self.criterion)]
            if going.numel() == 0:
                break
            z = logits_of(part(x[going.to(x.device)])).to(total.device)
            _check_part_logits(k, z, torch.Size((going.numel(), total.shape[1])))
            total[going] += z
            used[going] += 1
        return total, used

    def forward(self, x: Tensor) -> Tensor:
        logits, self.last_used = self.predict(x)
        return logits

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}, criterion={self.criterion!r}"


@torch.no_grad()
def evaluate_adaptive(model: AdaptiveResidualStudent, loader: Iterable[Any],
                      device: torch.device | str | None = None) -> dict[str, Any]:
    """The accuracy and the cost of ResKD's sample-adaptive inference on ``loader``.

    Returns ``acc`` (top-1, %), ``avg_res_students`` (mean number of res-students run per sample),
    ``part_usage`` (``part_usage[k-1]``: the fraction of samples that ran res-student ``k``) and
    ``samples``. Batches are moved to ``device`` when given.
    """
    if not isinstance(model, AdaptiveResidualStudent):
        raise TypeError(f"evaluate_adaptive needs an AdaptiveResidualStudent, got {type(model).__name__}")
    n = correct = 0
    runs = [0] * (len(model.parts) - 1)  # runs[k-1]: samples that ran res-student k
    used_sum = 0
    for raw in loader:
        batch = as_batch(raw)
        if device is not None:
            batch = batch.to(device)
        if batch.targets is None:
            raise ValueError("evaluate_adaptive needs labelled batches to measure the accuracy")
        logits, used = model.predict(batch.inputs)
        n += int(used.shape[0])
        correct += int((logits.argmax(1) == batch.targets.to(logits.device)).sum())
        used_sum += int(used.sum())
        for k in range(1, len(model.parts)):
            runs[k - 1] += int((used >= k).sum())
    if n == 0:
        raise ValueError("evaluation loader yielded no samples")
    return {"acc": 100.0 * correct / n, "avg_res_students": used_sum / n, "part_usage": [r / n for r in runs],
            "samples": n}


@dataclass
class ResKDResult(ChainResult):
    """:class:`ChainResult` of ResKD (the top-level fields and ``models[-1]``: the full sum of every
    part) plus its sample-adaptive inference.

    ``adaptive``: the delivered parts as an :class:`AdaptiveResidualStudent` (sharing them) with
    the run's ``threshold`` and ``criterion``; ``adaptive_acc`` (top-1, %), ``avg_res_students``
    (mean number of res-students run per sample) and ``part_usage`` (``part_usage[k-1]``: fraction
    of samples that ran res-student ``k``) on the validation data (:func:`evaluate_adaptive`;
    ``None`` / empty without a validation loader).
    """

    adaptive: AdaptiveResidualStudent | None = None
    adaptive_acc: float | None = None
    avg_res_students: float | None = None
    part_usage: list[float] = field(default_factory=list)


@register_strategy("reskd", "chain", RESKD_PAPER)
def reskd(
    student: ModelSpec,
    train_loader: Iterable[Any],
    val_loader: Iterable[Any] | None = None,
    *,
    epochs: int,
    teacher: nn.Module,
    res_students: Sequence[ModelSpec],
    run_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    T: float = 4.0,
    kd_weight: float = 0.9,
    ce_weight: float = 0.0,
    threshold: float = 0.9,
    criterion: str = "max_prob",
    **fit_kwargs: Any,
) -> ResKDResult:
    """ResKD: a student distilled from the teacher, then res-students that learn the residual.

    Stage 0 trains ``student`` with ``(1 - λ) CE + λ KD(T)`` from the teacher. Stage ``k`` trains
    res-student ``k`` alone (the parts before it frozen) so that the sum of the logits of the student
    and res-students 1..k regresses the teacher's logits, ``1/(2B) Σ_b ‖Σ_j z_j(x_b) - t(x_b)‖²``
    (:class:`~distill.methods.logits.LogitRegression` on the sum): res-student ``k`` learns the
    residual ``t - Σ_{j<k} z_j``, the knowledge gap the parts before it left, and the sum is the new
    student. ``ce_weight > 0`` adds a cross-entropy on the summed logits.

    Args:
        student: the base student (a model, a factory, a zoo name or a zoo spec).
        teacher: the trained teacher.
        res_students: the res-students in order (models, factories, zoo names or zoo specs, usually
            much smaller than the student); each must output the teacher's number of classes.
        epochs: epochs per stage.
        T, kd_weight: stage 0's KD temperature and λ (this library's KD baseline: T = 4, λ = 0.9).
        ce_weight: weight of the label term of the res-students' stages.
        threshold, criterion: the stopping rule of the sample-adaptive inference
            (:func:`reskd_confident`; this library's default: stop once the running prediction's top
            probability reaches 0.9).
        run_dir: stage ``k`` writes to ``run_dir/stage<k>``; seed: stage ``k`` trains with ``seed + k``.
        **fit_kwargs: passed to every :func:`distill.fit`.

    Returns:
        a :class:`ResKDResult`: ``models[k]`` is the :class:`ResidualStudent` after stage ``k``
        (they share their parts; ``models[-1]`` is the delivered model, all parts frozen, every
        part run), ``adaptive`` the same parts with the sample-adaptive inference
        (:class:`AdaptiveResidualStudent`), and its accuracy and mean number of res-students on
        the validation data.

    Sources: only the paper's abstract could be read here (arXiv listing and mirrors; no code is
    published), plus a secondary summary (a Chinese KD-survey table on GitHub) that says the
    res-students are found by architecture search, an "energy entropy" criterion sets when to stop,
    and inference adapts to each sample's difficulty. What is implemented: the residual mechanism
    of the abstract at the level of the outputs (logits), which needs no change to any
    architecture, with res-students the user chooses (no search; the number of stages is the
    length of ``res_students``); and sample-adaptive inference, whose per-sample rule (a
    confidence test of the running sum) and threshold are this library's, not checked against the
    paper.
    """
    epochs = _check_epochs(epochs)
    _check_trained_teacher(teacher)
    _check_spec_list(res_students, "res_students", allow_empty=False)
    check_model_spec(student, "student")
    T = _check_positive("T", T)
    kd_weight = _check_positive("kd_weight", kd_weight, 0.0, 1.0)
    ce_weight = _check_weight("ce_weight", ce_weight)
    threshold = _check_stop_rule(threshold, criterion)
    check_stage_resume(fit_kwargs, "reskd", run_dir)
    root = Path(run_dir) if run_dir is not None else None
    parts = [build_model(student, "student")]
    stages: list[FitResult] = []
    models: list[nn.Module] = []
    for k in range(len(res_students) + 1):
        if k == 0:
            model: nn.Module = ResidualStudent(parts)
            losses = _with_labels(KD(T=T, weight=kd_weight), kd_weight)
        else:
            parts.append(build_model(res_students[k - 1], f"res_students[{k - 1}]"))
            model = ResidualStudent(parts, frozen=k)
            losses = {"residual": LogitRegression()}
            if ce_weight > 0:
                losses["ce"] = CrossEntropy(weight=ce_weight)
        stages.append(_train_stage(model, teacher, losses, train_loader, val_loader, epochs=epochs,
                                   run_dir=root / f"stage{k}" if root else None, seed=seed + k, progress=progress,
                                   hand_over="last", fit_kwargs=fit_kwargs))
        models.append(model)
    final = ResidualStudent(parts, frozen=len(parts))
    models[-1] = final
    adaptive = AdaptiveResidualStudent(final, threshold, criterion)
    stats: dict[str, Any] = {}
    if val_loader is not None:
        params = next(iter(final.parameters()), None)
        stats = evaluate_adaptive(adaptive, val_loader, params.device if params is not None else None)
    return _with_stages(stages[-1], stages, models, ResKDResult, adaptive=adaptive, adaptive_acc=stats.get("acc"),
                        avg_res_students=stats.get("avg_res_students"), part_usage=stats.get("part_usage", []))
