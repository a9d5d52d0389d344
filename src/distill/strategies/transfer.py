"""Ensembles, transfer sets and unlabeled data: four strategies that make new training data for a student.

* :func:`fit_model_compression`: MUNGE's synthetic transfer set labelled by an ensemble, the
  student regressed on the ensemble's probabilities (Buciluă, Caruana, Niculescu-Mizil, "Model
  Compression", KDD 2006).
* :func:`fit_cmm`: one model learnt from the training set plus generated examples classified by
  the ensemble (Domingos, "Knowledge Acquisition from Examples via Multiple Models", ICML 1997).
* :func:`fit_co_training`: two classifiers on two views label unlabeled examples for each other
  (Blum & Mitchell, "Combining Labeled and Unlabeled Data with Co-Training", COLT 1998).
* :func:`fit_data_distillation`: one model's predictions over several transforms of unlabeled
  images, averaged, become labels for a student (Radosavovic et al., "Data Distillation: Towards
  Omni-Supervised Learning", CVPR 2018, arXiv 1712.04440).

Each is a small loop over the library's pieces: the transfer set or pseudo-labels are built with
the pure functions of :mod:`distill.functional.transfer`, then a :class:`~distill.Distiller` is
trained by :func:`distill.fit` (evaluation, metrics, checkpoints as usual). Training data must be
in memory: an :class:`~distill.data.loader.InMemoryLoader`, a :class:`~distill.data.sources.TensorData`
or an ``(inputs, targets)`` tuple.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from distill import functional as DF
from distill.batch import Batch, View
from distill.data.augment import mix_seed
from distill.data.loader import GlobalBatchShards, InMemoryLoader, in_memory_tensors
from distill.distiller import Distiller
from distill.files import atomic_write_text
from distill.methods.base import Method, Paper, create_method
from distill.strategies.chain import check_stage_resume
from distill.strategies.registry import as_model, register_strategy
from distill.taps import logits_of
from distill.teachers import (
    EnsembleTeacher,
    FrozenTeacher,
    TeacherSource,
    as_teacher_source,
    check_logits,
)
from distill.train.checkpoint import save_checkpoint
from distill.train.distributed import is_main_process
from distill.train.evaluate import evaluate
from distill.train.loop import FitResult, fit
from distill.train.rundir import RunFolderError, clear_run_dir, has_results

__all__ = [
    "GENERATORS",
    "CoTrainingResult",
    "DataDistillationResult",
    "MixedLoader",
    "ProbabilityRegression",
    "TransferFitResult",
    "ViewModel",
    "ViewProduct",
    "fit_cmm",
    "fit_co_training",
    "fit_data_distillation",
    "fit_model_compression",
    "multi_transform_probs",
    "transfer_set",
]

MODEL_COMPRESSION = Paper("Model Compression", "C. Buciluă, R. Caruana, A. Niculescu-Mizil", 2006, None, "KDD")
CMM = Paper("Knowledge Acquisition from Examples via Multiple Models", "P. Domingos", 1997, None, "ICML")
CO_TRAINING = Paper("Combining Labeled and Unlabeled Data with Co-Training", "A. Blum, T. Mitchell", 1998, None,
                    "COLT")
DATA_DISTILLATION = Paper("Data Distillation: Towards Omni-Supervised Learning",
                          "I. Radosavovic, P. Dollár, R. Girshick, G. Gkioxari, K. He", 2018, "1712.04440", "CVPR")

GENERATORS = ("munge", "random", "nbe")
"""Transfer-set generators of :func:`transfer_set`: MUNGE and the paper's two baselines."""


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------


def _labelled(data: Any, who: str) -> tuple[Tensor, Tensor, dict[str, Any]]:
    x, y, settings = in_memory_tensors(data, who)
    if not isinstance(y, Tensor) or y.shape[:1] != x.shape[:1] or x.shape[0] == 0:
        raise ValueError(f"{who} needs labelled training data: inputs (N, ...) with targets (N,); got inputs "
                         f"{tuple(x.shape)} and targets {None if y is None else tuple(y.shape)}")
    return x, y, settings


def _unlabeled(data: Any, like: Tensor, who: str) -> Tensor:
    x = data if isinstance(data, Tensor) else getattr(data, "inputs", None)
    if isinstance(data, tuple) and data and isinstance(data[0], Tensor):
        x = data[0]
    if not isinstance(x, Tensor) or x.shape[1:] != like.shape[1:] or x.shape[0] == 0:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(data).__name__
        raise ValueError(f"{who}: unlabeled must be a non-empty tensor of inputs shaped like the labelled ones "
                         f"(N, {', '.join(map(str, like.shape[1:]))}); got {got}")
    return x


def _count(name: str, value: Any, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")
    return value


def _teacher(teacher: Any, who: str) -> TeacherSource:
    if teacher is None:
        raise ValueError(f"{who} needs teacher=: the trained ensemble (a list of models, a distill.EnsembleTeacher) "
                         "or one model, whose predictions label the transfer set")
    return as_teacher_source(teacher)


def _batch_size(batch_size: int | None, settings: dict[str, Any]) -> int:
    return _count("batch_size", batch_size if batch_size is not None else settings.get("batch_size", 64))


def _fresh_copy(model: nn.Module, seed: int) -> nn.Module:
    """A copy of ``model`` with every submodule's parameters re-drawn (``reset_parameters``) from ``seed``."""
    twin = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in twin.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    return twin


def _new_model(student: nn.Module | Callable[[], nn.Module], seed: int) -> nn.Module:
    """A fresh model: from the factory, or a re-initialised copy of the given module."""
    model = student() if not isinstance(student, nn.Module) else _fresh_copy(student, seed)
    if not isinstance(model, nn.Module):
        raise TypeError(f"the student factory must return an nn.Module, got {type(model).__name__}")
    return model


def _check_student(student: Any) -> None:
    if not isinstance(student, nn.Module) and not callable(student):
        raise TypeError(f"student must be an nn.Module or a zero-argument factory, got {type(student).__name__}")


@torch.no_grad()
def _logits_over(source: TeacherSource | nn.Module, x: Tensor, batch_size: int = 256,
                 transform: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """A teacher source's (or a model's, in eval mode) logits ``(N, K)`` on ``x``, in chunks."""
    out = []
    was_training = source.training
    source.eval()
    try:
        device = next(iter(source.parameters()), torch.empty(0)).device
        for start in range(0, x.shape[0], batch_size):
            chunk = x[start:start + batch_size].to(device)
            if transform is not None:
                chunk = transform(chunk)
            if isinstance(source, TeacherSource):
                out.append(check_logits(source(Batch(chunk)), "teacher").float().cpu())
            else:
                out.append(logits_of(source(chunk)).float().cpu())
    finally:
        source.train(was_training)
    return torch.cat(out)


def _result(cls: type, result: FitResult, **extra: Any) -> Any:
    return cls(**{f.name: getattr(result, f.name) for f in fields(FitResult)}, **extra)


def _resumable(fit_kwargs: dict[str, Any], who: str, run_dir: str | Path | None) -> dict[str, Any]:
    """``fit_kwargs`` of a strategy whose data (a transfer set, pseudo-labels) is a pure function of its
    seed, its data and its teacher: a resumed run rebuilds the same set, and each ``fit`` resumes
    from its folder (:func:`~distill.strategies.chain.check_stage_resume`)."""
    check_stage_resume(fit_kwargs, who, run_dir)
    return fit_kwargs


# --------------------------------------------------------------------------------------------
# Transfer sets (Model Compression; CMM)
# --------------------------------------------------------------------------------------------


def _check_generator(generator: str, multiplier: int, p: float, s: float, components: int) -> None:
    if generator not in GENERATORS:
        raise ValueError(f"generator must be one of {GENERATORS}; got {generator!r}")
    _count("multiplier", multiplier)
    _count("components", components)
    if not (isinstance(p, (int, float)) and not isinstance(p, bool) and 0.0 <= p <= 1.0):
        raise ValueError(f"p (MUNGE's swap probability) must be in [0, 1]; got {p!r}")
    if not (isinstance(s, (int, float)) and not isinstance(s, bool) and s > 0):
        raise ValueError(f"s (MUNGE's local-variance divisor) must be > 0; got {s!r}")


def transfer_set(x: Tensor, generator: str = "munge", *, multiplier: int = 10, p: float = 0.5, s: float = 5.0,
                 nominal: Sequence[int] | Tensor | None = None, components: int = 10, seed: int = 0) -> Tensor:
    """``multiplier * N`` synthetic inputs shaped like ``x`` ``(N, ...)``, from the chosen generator.

    Every attribute (pixel) of the flattened inputs ``(N, D)`` is one attribute of the generator:
    ``"munge"`` (:func:`~distill.functional.munge`, ``p``, ``s``, ``nominal``), ``"random"``
    (:func:`~distill.functional.random_transfer`) or ``"nbe"`` (a ``components``-component
    naive-Bayes mixture, :func:`~distill.functional.fit_naive_bayes_mixture`, then sampled).
    """
    _check_generator(generator, multiplier, p, s, components)
    flat = x.flatten(1)
    n = multiplier * x.shape[0]
    if generator == "munge":
        out = DF.munge(flat, p=p, s=s, multiplier=multiplier, nominal=nominal, seed=seed)
    elif generator == "random":
        out = DF.random_transfer(flat, n, seed=seed)
    else:
        mixture = DF.fit_naive_bayes_mixture(flat, min(components, flat.shape[0]), seed=seed)
        out = DF.sample_naive_bayes_mixture(mixture, n, seed=seed)
    return out.reshape(n, *x.shape[1:])


class ProbabilityRegression(Method):
    """Squared error between the student's and the teacher's class probabilities (the mimic's loss).

    See :func:`~distill.functional.probability_regression_loss`. The teacher's probabilities are
    ``softmax`` of its view's logits: exactly the mean of the members' probabilities for an
    :class:`~distill.teachers.EnsembleTeacher` with ``combine="probs"`` and ``temperature=1`` (the
    default), whose logits are the log of that mean.
    """

    name = "probability_regression"
    family = "ensemble"
    paper = MODEL_COMPRESSION

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        teacher = check_logits(teacher_view, "teacher").detach()
        return DF.probability_regression_loss(check_logits(student_view, "student"), teacher.softmax(1))


@dataclass
class TransferFitResult(FitResult):
    """:class:`~distill.train.loop.FitResult` plus the size of the set the student trained on."""

    num_train: int = 0  # examples of the training set used as they are
    num_generated: int = 0  # synthetic examples labelled by the teacher


@register_strategy("model_compression", "ensemble", MODEL_COMPRESSION)
def fit_model_compression(
    student: nn.Module | Callable[[], nn.Module],
    train_loader: Any,
    val_loader: Iterable[Any] | None = None,
    *,
    teacher: Any = None,
    epochs: int,
    run_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    generator: str = "munge",
    multiplier: int = 10,
    p: float = 0.5,
    s: float = 5.0,
    nominal: Sequence[int] | None = None,
    components: int = 10,
    include_train: bool = True,
    loss: str = "mse",
    T: float = 4.0,
    batch_size: int | None = None,
    **fit_kwargs: Any,
) -> TransferFitResult:
    """Model compression: a student mimics an ensemble on a large synthetic transfer set (MUNGE).

    Buciluă, Caruana, Niculescu-Mizil, "Model Compression", KDD 2006. The transfer set is
    :func:`transfer_set` of the training inputs (MUNGE by default), plus the training inputs
    themselves (``include_train``); its labels are the teacher ensemble's predictions, and the student
    minimises the squared error to the ensemble's probabilities (``loss="mse"``,
    :class:`ProbabilityRegression`, the paper's regression on the ensemble's outputs), or Hinton's KD
    at temperature ``T`` (``loss="kd"``). The original labels are not used.

    Args:
        student: the model to train (the mimic), or a zero-argument factory returning it.
        train_loader: the training data in memory (its inputs seed the generator; batch size reused).
        val_loader: evaluated after each epoch (student, ensemble, agreement).
        teacher: the trained ensemble: a list of models (an :class:`~distill.teachers.EnsembleTeacher`
            averaging their probabilities), an ``EnsembleTeacher`` or any teacher source / model.
        epochs: epochs over the transfer set.
        generator: ``"munge"``, ``"random"`` or ``"nbe"`` (:data:`GENERATORS`).
        multiplier: synthetic examples per training example (10; the paper studies transfer sets of
            growing size, up to hundreds of thousands of examples).
        p, s, nominal: MUNGE's swap probability (0.5), local-variance divisor (5) and nominal
            attributes (flattened column indices; none for images); see :func:`~distill.functional.munge`.
        components: NBE's mixture components (10).
        include_train: add the training inputs, labelled by the ensemble too, to the transfer set.
        loss: ``"mse"`` (the paper's) or ``"kd"``; ``T``: KD's temperature.
        batch_size: default the training loader's, else 64.
        run_dir, seed, progress, fit_kwargs: passed to :func:`distill.fit` (``seed`` also seeds the generator).

    The ensemble labels each batch as the student meets it; the set is fixed and the ensemble
    frozen, so this equals labelling the set once as the paper does (store the labels with
    :mod:`distill.cache` to save the ensemble's forward passes).

    Raises (before any work): ``ValueError`` for a missing teacher, an unknown generator or loss,
    bad ``multiplier`` / ``p`` / ``s``, or ``resume``; ``TypeError`` for data not in memory.
    """
    source = _teacher(teacher, "fit_model_compression")
    _check_generator(generator, multiplier, p, s, components)
    if loss not in ("mse", "kd"):
        raise ValueError(f"loss must be 'mse' (the paper's) or 'kd'; got {loss!r}")
    method = ProbabilityRegression() if loss == "mse" else create_method("kd", T=T)
    fit_kwargs = _resumable(fit_kwargs, "fit_model_compression", run_dir)
    x, _, settings = in_memory_tensors(train_loader, "fit_model_compression")
    size = _batch_size(batch_size, settings)
    synthetic = transfer_set(x, generator, multiplier=multiplier, p=p, s=s, nominal=nominal,
                             components=components, seed=seed)
    inputs = torch.cat([x, synthetic.to(x.device)]) if include_train else synthetic
    loader = InMemoryLoader(inputs, None, size, shuffle=True, seed=seed, return_index=True)
    d = Distiller(as_model(student, "fit_model_compression"), source, {loss: method})
    result = fit(d, loader, val_loader, epochs=epochs, run_dir=run_dir, seed=seed, progress=progress, **fit_kwargs)
    return _result(TransferFitResult, result, num_train=int(x.shape[0]) if include_train else 0,
                   num_generated=int(synthetic.shape[0]))


def _members(source: TeacherSource) -> list[TeacherSource]:
    """The ensemble's members, each a teacher source (one model is an ensemble of one)."""
    if isinstance(source, EnsembleTeacher):
        return list(source.members)
    if isinstance(source, FrozenTeacher):
        return [source]
    raise ValueError(f"label_rule='vote' needs the members: give a list of models or an EnsembleTeacher, "
                     f"not a {type(source).__name__}; or use label_rule='mean'")


def _ensemble_labels(source: TeacherSource, x: Tensor, rule: str) -> Tensor:
    """Hard labels ``(N,)`` of the ensemble: the members' plurality vote, or the argmax of the source's view."""
    if rule == "vote":
        return DF.plurality_vote(torch.stack([_logits_over(m, x) for m in _members(source)]))
    return _logits_over(source, x).argmax(1)


@register_strategy("cmm", "ensemble", CMM)
def fit_cmm(
    student: nn.Module | Callable[[], nn.Module],
    train_loader: Any,
    val_loader: Iterable[Any] | None = None,
    *,
    teacher: Any = None,
    epochs: int,
    run_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    generator: str = "munge",
    multiplier: int = 10,
    p: float = 0.5,
    s: float = 5.0,
    nominal: Sequence[int] | None = None,
    components: int = 10,
    label_rule: str = "vote",
    batch_size: int | None = None,
    **fit_kwargs: Any,
) -> TransferFitResult:
    """CMM: one model learnt from the training set plus generated examples classified by an ensemble.

    Domingos, "Knowledge Acquisition from Examples via Multiple Models", ICML 1997. The new
    training set is the original examples with their own labels plus ``multiplier * N`` examples
    generated from the training distribution (:func:`transfer_set`) and labelled by the ensemble's
    hard prediction; the student minimises cross-entropy on it.

    Args:
        student, train_loader, val_loader, epochs, run_dir, seed, progress, batch_size, fit_kwargs:
            as :func:`fit_model_compression`.
        teacher: the ensemble: a list of models (the paper's bagged models) or an ``EnsembleTeacher``.
        generator, multiplier, p, s, nominal, components: the example generator, as
            :func:`fit_model_compression`.
        label_rule: ``"vote"`` (the members' plurality vote, bagging's rule, as in the paper;
            :func:`~distill.functional.plurality_vote`) or ``"mean"`` (argmax of the teacher source's
            combined probabilities).

    Differences from the paper: CMM's base learner is C4.5RULES and its generator samples the
    attribute space of rule learners; here the learner is the student network and the generator is
    one of :data:`GENERATORS` (MUNGE by default), which draws from the training distribution as the
    paper asks.
    """
    source = _teacher(teacher, "fit_cmm")
    _check_generator(generator, multiplier, p, s, components)
    if label_rule not in ("vote", "mean"):
        raise ValueError(f"label_rule must be 'vote' (bagging's, the paper's) or 'mean'; got {label_rule!r}")
    if label_rule == "vote":
        _members(source)  # its clear error for a source without members, before any work
    fit_kwargs = _resumable(fit_kwargs, "fit_cmm", run_dir)
    x, y, settings = _labelled(train_loader, "fit_cmm")
    size = _batch_size(batch_size, settings)
    synthetic = transfer_set(x, generator, multiplier=multiplier, p=p, s=s, nominal=nominal,
                             components=components, seed=seed)
    labels = _ensemble_labels(source, synthetic, label_rule).to(y.device)
    loader = InMemoryLoader(torch.cat([x, synthetic.to(x.device)]), torch.cat([y, labels]), size, shuffle=True,
                            seed=seed, return_index=True)
    # the teacher only for evaluation (accuracy, agreement)
    d = Distiller(as_model(student, "fit_cmm"), source, {"ce": 1.0})
    result = fit(d, loader, val_loader, epochs=epochs, run_dir=run_dir, seed=seed, progress=progress, **fit_kwargs)
    return _result(TransferFitResult, result, num_train=int(x.shape[0]), num_generated=int(synthetic.shape[0]))


# --------------------------------------------------------------------------------------------
# Co-training
# --------------------------------------------------------------------------------------------


class ViewModel(nn.Module):
    """A classifier that sees one view of its input: ``model(view(x))``.

    ``view``: ``"left"``, ``"right"``, ``"top"``, ``"bottom"`` (:func:`~distill.functional.half_view`)
    or a callable ``x -> x'`` (e.g. a feature subset, ``lambda x: x[:, cols]``).
    """

    def __init__(self, model: nn.Module, view: str | Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.model = model
        self.view = view

    def forward(self, x: Tensor) -> Any:
        return self.model(DF.half_view(x, self.view) if isinstance(self.view, str) else self.view(x))


class ViewProduct(nn.Module):
    """The combined co-training classifier: ``log_softmax(h1(x)) + log_softmax(h2(x))``, i.e. the
    product of the two views' class probabilities (renormalised by a softmax)."""

    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x: Tensor) -> Tensor:
        return logits_of(self.first(x)).log_softmax(1) + logits_of(self.second(x)).log_softmax(1)


@dataclass
class CoTrainingResult(FitResult):
    """Per-round history (``round``, ``labeled``, ``added``, validation accuracies of the combined
    classifier ``val_student_acc`` and of each view ``val_view1_acc`` / ``val_view2_acc``); the two
    view classifiers, their product, and the self-labelled examples (indices into ``unlabeled``,
    labels, and which classifier labelled each: 0 or 1)."""

    models: tuple[nn.Module, ...] = ()
    combined: nn.Module | None = None
    added_index: Tensor | None = None
    added_labels: Tensor | None = None
    added_by: Tensor | None = None


class _RoundBar:
    """A rich progress bar over the rounds of a loop of our own; silent when disabled (and on
    ranks other than 0 under torchrun)."""

    def __init__(self, enabled: bool, total: int, what: str) -> None:
        self._progress = None
        if enabled and is_main_process():
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(TextColumn(f"[bold]{what}"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=True)
            self._progress.start()
            self._task = self._progress.add_task(what, total=total, info="")

    def advance(self, info: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=1, info=info)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()


def _per_class(per_class: int | Sequence[int], k: int) -> Tensor:
    counts = [per_class] * k if isinstance(per_class, int) and not isinstance(per_class, bool) else list(per_class)
    if len(counts) != k or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts) \
            or sum(counts) == 0:
        raise ValueError(f"per_class must be an integer >= 1 or {k} non-negative integers (one per class, not all "
                         f"0); got {per_class!r}")
    return torch.tensor(counts)


def _check_view(view: Any) -> None:
    if isinstance(view, str):
        DF.half_view(torch.zeros(1, 1, 2, 2), view)  # the clear error for an unknown name
    elif not callable(view):
        raise TypeError(f"a view must be 'left', 'right', 'top', 'bottom' or a callable x -> x'; got {view!r}")


@register_strategy("co_training", "ensemble", CO_TRAINING)
def fit_co_training(
    student: nn.Module | Callable[[], nn.Module] | Sequence[nn.Module],
    train_loader: Any,
    val_loader: Iterable[Any] | None = None,
    *,
    unlabeled: Any = None,
    teacher: Any = None,
    epochs: int,
    run_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    views: Sequence[str | Callable[[Tensor], Tensor]] = ("left", "right"),
    rounds: int = 30,
    pool_size: int = 75,
    per_class: int | Sequence[int] = 1,
    exchange: str = "shared",
    warm_start: bool = False,
    batch_size: int | None = None,
    **fit_kwargs: Any,
) -> CoTrainingResult:
    """Co-training: two classifiers, one per view, label unlabeled examples for the labelled pool.

    Blum & Mitchell, "Combining Labeled and Unlabeled Data with Co-Training", COLT 1998, Table 1:
    draw a pool U' of ``pool_size`` examples from the unlabeled set U; then for ``rounds`` rounds:
    train h1 on view 1 and h2 on view 2 of the labelled set L (cross-entropy on the labels, true or
    self-given); each labels its most confident ``per_class`` examples of each class in U'
    (:func:`~distill.functional.cotrain_select`; h2 picks among those h1 left); the labelled
    examples join L and U' is refilled from U with as many. The two classifiers are trained once more
    on the final L; their product (:class:`ViewProduct`) is the combined classifier evaluated on
    ``val_loader`` after each training.

    Args:
        student: a zero-argument factory (called twice), a pair of models (one per view), or one
            model (the second view gets a re-initialised copy).
        train_loader: the labelled data L in memory (batch size and augmentation reused).
        unlabeled: the unlabeled inputs U, a tensor ``(N_u, ...)`` shaped like L's (or a TensorData).
        teacher: must be None (the two views teach each other).
        epochs: epochs of each training of each classifier.
        views: the two views: ``"left"`` / ``"right"`` / ``"top"`` / ``"bottom"`` halves of images
            (the other half zeroed) or callables (e.g. feature subsets).
        rounds: the paper's k = 30. pool_size: the paper's u = 75.
        per_class: examples each classifier labels per class per round; an int or one per class. The
            paper's binary setting labels p = 1 positive and n = 3 negative (``per_class=[3, 1]``,
            class 1 positive), the class ratio of its data; 1 per class suits balanced classes.
        exchange: ``"shared"`` (the paper: both classifiers' picks join the one L both train on) or
            ``"cross"`` (each classifier's picks join only the other's training set, a common variant).
        warm_start: continue each classifier from its last round instead of re-training it from its
            initial weights (the paper re-trains its naive-Bayes classifiers on L each round).
        run_dir: writes ``metrics.jsonl`` (one line per training round) and
            ``checkpoints/last.pt`` (the combined classifier's state).
        seed: seeds the pool draws and every training; fit_kwargs: passed to each :func:`distill.fit`.

    Raises (before any training): ValueError for a teacher, missing or mis-shaped ``unlabeled``,
    bad ``rounds`` / ``pool_size`` / ``per_class`` / ``exchange`` / views, or ``resume``.
    """
    if teacher is not None:
        raise ValueError("co-training has no teacher: the two view classifiers label examples for each other")
    _count("rounds", rounds, low=0)
    _count("pool_size", pool_size)
    _count("epochs", epochs)
    if exchange not in ("shared", "cross"):
        raise ValueError(f"exchange must be 'shared' (the paper's) or 'cross'; got {exchange!r}")
    if isinstance(views, str) or len(views) != 2:
        raise ValueError(f"views must be two views (names or callables); got {views!r}")
    for view in views:
        _check_view(view)
    if fit_kwargs.get("resume"):
        raise ValueError("fit_co_training cannot resume: its rounds' classifiers and labelled pool are not "
                         "checkpointed (each round retrains from the initial weights)")
    if run_dir is not None and is_main_process():  # as fit's run_dir: never silently replaced
        if fit_kwargs.get("overwrite"):
            clear_run_dir(run_dir)
        elif has_results(run_dir):
            raise RunFolderError(f"{run_dir} already holds a run's results; pass overwrite=True to replace them, "
                                 "or write to another folder")
    x_l, y_l, settings = _labelled(train_loader, "fit_co_training")
    x_u = _unlabeled(unlabeled, x_l, "fit_co_training")
    if isinstance(student, (list, tuple)):
        if len(student) != 2 or not all(isinstance(m, nn.Module) for m in student):
            raise ValueError(f"student as a sequence must be two models (one per view); got {student!r}")
        bases = list(student)
    else:
        _check_student(student)
        first = student if isinstance(student, nn.Module) else _new_model(student, seed)
        bases = [first, _new_model(student, seed + 1)]
    models = [ViewModel(m, v) for m, v in zip(bases, views)]
    num_classes = int(_logits_over(models[0], x_l[:1]).shape[1])
    counts = _per_class(per_class, num_classes)
    size = _batch_size(batch_size, settings)
    initial = [copy.deepcopy(m.state_dict()) for m in models]

    g = torch.Generator().manual_seed(int(seed))
    queue = torch.randperm(x_u.shape[0], generator=g).tolist()  # U in the order the pool draws it
    pool, queue = queue[:pool_size], queue[pool_size:]
    taken: list[list[tuple[int, int]]] = [[], []]  # (index into U, label) per classifier's training set
    added: list[tuple[int, int, int]] = []  # (index, label, labelled by)
    rows: list[dict[str, Any]] = []
    result = CoTrainingResult(run_dir=Path(run_dir) if run_dir is not None else None)
    combined = ViewProduct(*models)
    bar = _RoundBar(progress, rounds + 1, "co-training")
    try:
        for r in range(rounds + 1):
            for i, model in enumerate(models):
                if not warm_start:
                    model.load_state_dict(initial[i])
                idx = torch.tensor([t[0] for t in taken[i]], dtype=torch.long)
                lab = torch.tensor([t[1] for t in taken[i]], dtype=torch.long)
                x = torch.cat([x_l, x_u[idx.to(x_u.device)].to(x_l.device)])
                y = torch.cat([y_l, lab.to(y_l.device)])
                loader = InMemoryLoader(x, y, size, shuffle=True, seed=seed + i, augment=settings.get("augment"))
                fit(Distiller(model, None, {"ce": 1.0}), loader, None, epochs=epochs, seed=seed + i, progress=False,
                    **fit_kwargs)
            row: dict[str, Any] = {"round": r, "labeled": int(x_l.shape[0]) + len({t[0] for t in added}),
                                   "added": 0, "pool": len(pool)}
            if r < rounds and pool:
                pool_t = torch.tensor(pool, dtype=torch.long)
                free = torch.ones(len(pool), dtype=torch.bool)
                picks = []
                for i, model in enumerate(models):
                    probs = _logits_over(model, x_u[pool_t.to(x_u.device)]).softmax(1)
                    where, labels = DF.cotrain_select(probs, counts, free)
                    free[where] = False
                    picks.append((pool_t[where].tolist(), labels.tolist()))
                for i, (where, labels) in enumerate(picks):
                    pairs = list(zip(where, labels))
                    added.extend((a, b, i) for a, b in pairs)
                    for j in (0, 1):
                        if exchange == "shared" or j != i:
                            taken[j].extend(pairs)
                chosen = {a for where, _ in picks for a in where}
                pool = [a for a in pool if a not in chosen] + queue[:len(chosen)]
                queue = queue[len(chosen):]
                row["added"] = len(chosen)
            if val_loader is not None:
                device = next(combined.parameters()).device
                for key, model in (("val_student_acc", combined), ("val_view1_acc", models[0]),
                                   ("val_view2_acc", models[1])):
                    row[key] = evaluate(Distiller(model, None, {"ce": 1.0}), val_loader, device,
                                        with_teacher=False)["student_acc"]
                if result.best_acc is None or row["val_student_acc"] > result.best_acc:
                    result.best_acc, result.best_epoch = row["val_student_acc"], r
                result.last_acc = row["val_student_acc"]
            rows.append(row)
            bar.advance(f"labeled {row['labeled']}" + (f", val acc {row['val_student_acc']:.2f}%"
                                                       if "val_student_acc" in row else ""))
    finally:
        bar.close()
    result.history = rows
    result.models = tuple(models)
    result.combined = combined
    result.added_index = torch.tensor([a[0] for a in added], dtype=torch.long)
    result.added_labels = torch.tensor([a[1] for a in added], dtype=torch.long)
    result.added_by = torch.tensor([a[2] for a in added], dtype=torch.long)
    if result.run_dir is not None and is_main_process():  # under torchrun: rank 0 writes
        result.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(result.run_dir / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
        save_checkpoint(result.run_dir / "checkpoints" / "last.pt", {"student": combined.state_dict(), "round": rounds})
    return result


# --------------------------------------------------------------------------------------------
# Data distillation
# --------------------------------------------------------------------------------------------


class MixedLoader(GlobalBatchShards):
    """Batches that each hold a fixed share of labelled examples, the rest pseudo-labelled.

    Every batch has ``round(batch_size * labeled_fraction)`` labelled examples (at least 1, and at
    least 1 pseudo-labelled) and the rest pseudo-labelled; each part is walked in its own seeded
    permutation per epoch, restarted when it runs out. An epoch has ``ceil((N_l + N_p) / batch_size)``
    batches. ``augment`` (an :class:`~distill.data.augment.Augment` or callable ``(x, generator)``)
    is applied to each batch. Batches are :class:`~distill.batch.Batch` without index. Under
    torchrun each rank yields its part of every batch (:class:`~distill.data.loader.GlobalBatchShards`).
    """

    def __init__(self, labeled: tuple[Tensor, Tensor], pseudo: tuple[Tensor, Tensor], batch_size: int, *,
                 labeled_fraction: float = 0.6, augment: Any = None, seed: int = 0) -> None:
        self.parts = [labeled, pseudo]
        for x, y in self.parts:
            if x.shape[0] == 0 or y.shape[:1] != x.shape[:1]:
                raise ValueError(f"MixedLoader needs non-empty (inputs, labels) of one length; got {tuple(x.shape)}, "
                                 f"{tuple(y.shape)}")
        self.batch_size = _count("batch_size", batch_size, low=2)
        if not 0.0 < labeled_fraction < 1.0:
            raise ValueError(f"labeled_fraction must be in (0, 1); got {labeled_fraction!r}")
        n_l = min(max(1, round(batch_size * labeled_fraction)), batch_size - 1)
        self.shares = (n_l, batch_size - n_l)
        self.augment = augment
        self.seed = int(seed)
        self.epoch = 0

    def __len__(self) -> int:
        return math.ceil(sum(int(x.shape[0]) for x, _ in self.parts) / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _stream(self, part: int, count: int) -> Tensor:
        n = int(self.parts[part][0].shape[0])
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, part))
        return torch.cat([torch.randperm(n, generator=g) for _ in range(math.ceil(count / n))])[:count]

    def __iter__(self) -> Iterator[Batch]:
        streams = [self._stream(i, len(self) * self.shares[i]) for i in (0, 1)]
        for k in range(len(self)):
            xs, ys = [], []
            for i, (x, y) in enumerate(self.parts):
                rows = streams[i][k * self.shares[i]:(k + 1) * self.shares[i]].to(x.device)
                xs.append(x[rows])
                ys.append(y[rows])
            inputs = torch.cat(xs)
            if self.augment is not None:
                inputs = self.augment(inputs, torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, 2, k)))
            yield self._shard(Batch(inputs, torch.cat(ys)))


@dataclass
class DataDistillationResult(FitResult):
    """The student's :class:`~distill.train.loop.FitResult` plus the teacher's training (when the
    strategy trained it) and the pseudo-labels: ``pseudo_labels`` / ``pseudo_scores`` ``(N_u,)`` for
    every unlabeled example, ``pseudo_keep`` ``(N_u,)`` bool for those trained on."""

    teacher_result: FitResult | None = None
    pseudo_labels: Tensor | None = None
    pseudo_scores: Tensor | None = None
    pseudo_keep: Tensor | None = None


@torch.no_grad()
def multi_transform_probs(model: nn.Module | TeacherSource, x: Tensor, *, scales: Sequence[float] = (0.75, 1.0, 1.25),
                          flip: bool = True, fill: float = 0.0, batch_size: int = 256) -> Tensor:
    """The model's class probabilities on ``x`` ``(N, C, H, W)`` averaged over every transform of
    :func:`~distill.functional.transform_grid` (:func:`~distill.functional.mean_probabilities`), ``(N, K)``."""
    grid = DF.transform_grid(scales, flip)
    logits = [_logits_over(model, x, batch_size, transform=lambda b, sc=sc, f=f: DF.apply_transform(b, sc, f, fill))
              for sc, f in grid]
    return DF.mean_probabilities(torch.stack(logits))


@register_strategy("data_distillation", "ensemble", DATA_DISTILLATION)
def fit_data_distillation(
    student: nn.Module | Callable[[], nn.Module],
    train_loader: Any,
    val_loader: Iterable[Any] | None = None,
    *,
    unlabeled: Any = None,
    teacher: Any = None,
    epochs: int,
    run_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    scales: Sequence[float] = (0.75, 1.0, 1.25),
    flip: bool = True,
    fill: float = 0.0,
    threshold: float | None = None,
    labeled_fraction: float = 0.6,
    teacher_epochs: int | None = None,
    batch_size: int | None = None,
    **fit_kwargs: Any,
) -> DataDistillationResult:
    """Data distillation: a model's ensembled predictions over transforms of unlabeled images train a student.

    Radosavovic, Dollár, Girshick, Gkioxari, He, "Data Distillation: Towards Omni-Supervised
    Learning", CVPR 2018, arXiv 1712.04440. (1) A model is trained on the labelled data (or given as
    ``teacher``); (2) it predicts on every transform of the unlabeled images (each scale, flipped and
    not: :func:`multi_transform_probs`); (3) the predictions are ensembled, the average of the class
    probabilities, into hard pseudo-labels, kept where the score clears ``threshold``
    (:func:`~distill.functional.pseudo_labels`); (4) the student is trained with cross-entropy on the
    labelled and pseudo-labelled data together, every batch holding a ``labeled_fraction`` share of
    labelled examples (:class:`MixedLoader`).

    Args:
        student: the model to train, or a zero-argument factory; with ``teacher=None`` the teacher is a
            second model of the same kind (the factory's, or a re-initialised copy).
        train_loader: the labelled data in memory (batch size and augmentation reused).
        unlabeled: the unlabeled images ``(N_u, C, H, W)`` (or a TensorData).
        teacher: a trained model (or teacher source); None trains one on the labelled data for
            ``teacher_epochs`` (default ``epochs``) epochs with the same ``fit_kwargs``.
        scales, flip, fill: the transforms (:func:`~distill.functional.rescale` keeps the image size;
            ``fill`` pads zoomed-out images). The paper ensembles several test scales with
            horizontal flips; (0.75, 1, 1.25) x flip is its small-image analogue here. The
            transforms must be ones the teacher is invariant to (the paper's models are trained with
            scale and flip augmentation): on 8x8 digits a teacher trained without them labels
            scaled and mirrored digits badly, and ``scales=(1.0,), flip=False`` is the better choice.
        threshold: keep a pseudo-label when its averaged probability is at least this; None keeps all,
            which is what the paper's rule (as many labels per unlabeled image as per labelled one)
            gives for classification, one label per image.
        labeled_fraction: share of labelled examples in every batch (0.6: the paper fixes the mix of
            manually and automatically labelled data in each minibatch, 6:4).
        run_dir: the student's run; a trained teacher's run goes to ``run_dir/teacher``.
        seed, progress, batch_size, fit_kwargs: passed to :func:`distill.fit`.

    Raises (before any training): ValueError for missing or mis-shaped ``unlabeled``, bad scales,
    threshold or ``labeled_fraction``, no pseudo-label kept, or ``resume``.
    """
    _count("epochs", epochs)
    DF.transform_grid(scales, flip)
    if threshold is not None and not (isinstance(threshold, (int, float)) and 0.0 <= threshold <= 1.0):
        raise ValueError(f"threshold must be None or in [0, 1]; got {threshold!r}")
    if not (isinstance(labeled_fraction, (int, float)) and 0.0 < labeled_fraction < 1.0):
        raise ValueError(f"labeled_fraction must be in (0, 1); got {labeled_fraction!r}")
    if teacher_epochs is not None:
        _count("teacher_epochs", teacher_epochs)
    _check_student(student)
    fit_kwargs = _resumable(fit_kwargs, "fit_data_distillation", run_dir)
    x_l, y_l, settings = _labelled(train_loader, "fit_data_distillation")
    x_u = _unlabeled(unlabeled, x_l, "fit_data_distillation")
    if x_u.dim() != 4:
        raise ValueError(f"fit_data_distillation transforms images: unlabeled must be (N, C, H, W); "
                         f"got {tuple(x_u.shape)}")
    size = _batch_size(batch_size, settings)
    model = student if isinstance(student, nn.Module) else _new_model(student, seed)
    teacher_result = None
    if teacher is None:
        teacher = _new_model(student, seed + 1)
        loader = train_loader if isinstance(train_loader, InMemoryLoader) else \
            InMemoryLoader(x_l, y_l, size, shuffle=True, seed=seed, augment=settings.get("augment"))
        teacher_dir = Path(run_dir) / "teacher" if run_dir is not None else None
        teacher_result = fit(Distiller(teacher, None, {"ce": 1.0}), loader, val_loader,
                             epochs=teacher_epochs or epochs, run_dir=teacher_dir, seed=seed, progress=progress,
                             **fit_kwargs)
    source = as_teacher_source(teacher)
    probs = multi_transform_probs(source, x_u, scales=scales, flip=flip, fill=fill)
    labels, scores, keep = DF.pseudo_labels(probs, threshold)
    if not bool(keep.any()):
        raise ValueError(f"no pseudo-label reaches threshold={threshold} (the highest score is "
                         f"{float(scores.max()):.3f}); lower the threshold")
    keep_at = keep.to(x_u.device)
    mixed = MixedLoader((x_l, y_l), (x_u[keep_at].to(x_l.device), labels[keep].to(y_l.device)), size,
                        labeled_fraction=labeled_fraction, augment=settings.get("augment"), seed=seed)
    d = Distiller(model, source, {"ce": 1.0})  # the teacher only for evaluation (accuracy, agreement)
    result = fit(d, mixed, val_loader, epochs=epochs, run_dir=run_dir, seed=seed, progress=progress, **fit_kwargs)
    return _result(DataDistillationResult, result, teacher_result=teacher_result, pseudo_labels=labels,
                   pseudo_scores=scores, pseudo_keep=keep)

