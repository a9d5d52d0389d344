"""Teachers that see more than the student: privileged features, another modality, clean inputs.

* :func:`fit_generalized_distillation` (``generalized_distillation``): Lopez-Paz, Bottou,
  Schölkopf, Vapnik, "Unifying Distillation and Privileged Information", ICLR 2016, arXiv
  1511.03643. A teacher learnt on the privileged features ``x*`` labels the training set softly;
  the student, on the regular features ``x``, learns from both kinds of labels.
* :func:`fit_supervision_transfer` (``supervision_transfer``): Gupta, Hoffman, Malik, "Cross Modal
  Distillation for Supervision Transfer", CVPR 2016, arXiv 1507.00448. On unlabeled paired data,
  the student on modality B regresses the mid-level features of a teacher trained on modality A
  (L2), then is fine-tuned on the few labels B has.
* :func:`fit_cross_quality_distillation` (``cross_quality_distillation``): Su & Maji, "Adapting
  Models to Signal Degradation using Distillation", BMVC 2017, arXiv 1604.00433. The teacher sees
  the clean input, the student the degraded one (low resolution, noise, line drawing) of the same
  sample; the student learns from the labels and from the teacher's soft outputs.

Both sides read one packed input: every batch carries what the teacher and the student need,
and each model is wrapped in a :class:`ModalityView` that selects or renders its part
(:func:`~distill.functional.apply_view`): flat features side by side (``"columns:0:50"`` for
``x``, ``"columns:50:51"`` for ``x*``), modalities stacked as channels (``"channels:1:2"``), or a
rendering of the one image (``"downsample:4"``, ``"noise:0.5"``, ``"edges"``, ``"distance"``).
Evaluation runs the wrapped student on the packed validation inputs, so it is scored on its own
view: degraded images, modality B, regular features.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill import functional as DF
from distill.data.loader import InMemoryLoader, in_memory_tensors
from distill.distiller import Distiller
from distill.methods.base import Paper, create_method
from distill.methods.transfer_pi import GENERALIZED_DISTILLATION
from distill.strategies.chain import check_stage_resume
from distill.strategies.registry import as_model, register_strategy
from distill.teachers import FrozenTeacher, TeacherSource
from distill.train.loop import FitResult, fit

__all__ = ["ModalityView", "PairedResult", "fit_cross_quality_distillation", "fit_generalized_distillation",
           "fit_supervision_transfer"]

SUPERVISION_TRANSFER = Paper("Cross Modal Distillation for Supervision Transfer", "S. Gupta, J. Hoffman, J. Malik",
                             2016, "1507.00448", "CVPR")
CROSS_QUALITY = Paper("Adapting Models to Signal Degradation using Distillation", "J.-C. Su, S. Maji", 2017,
                      "1604.00433", "BMVC")


class ModalityView(nn.Module):
    """A model that sees one view of a packed input: ``model(apply_view(x, view))``.

    ``view``: a spec of :func:`~distill.functional.parse_view` (checked here). The wrapped model
    is ``self.model``, so its tap paths gain the prefix ``"model."``.
    """

    def __init__(self, model: nn.Module, view: str = "identity") -> None:
        super().__init__()
        DF.parse_view(view)
        self.model = model
        self.view = view

    def forward(self, x: torch.Tensor) -> Any:
        return self.model(DF.apply_view(x, self.view))

    def extra_repr(self) -> str:
        return f"view={self.view!r}"


@dataclass
class PairedResult(FitResult):
    """The student's :class:`~distill.train.loop.FitResult`, plus the teacher's training (when the
    strategy trained it on its view) and, for supervision transfer, the transfer stage's."""

    teacher_result: FitResult | None = None
    transfer_result: FitResult | None = None


def _result(result: FitResult, **extra: Any) -> PairedResult:
    return PairedResult(history=result.history, best_acc=result.best_acc, best_epoch=result.best_epoch,
                        last_acc=result.last_acc, run_dir=result.run_dir, time_s=result.time_s, **extra)


def _count(name: str, value: Any, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")
    return value


def _teacher_model(teacher: Any, view: str, who: str) -> nn.Module | TeacherSource:
    """The teacher as a module seeing ``view``: a model (or a frozen teacher's model) is wrapped in a
    :class:`ModalityView`; another teacher source only when it sees the packed input as it is."""
    if teacher is None:
        raise ValueError(f"{who} needs teacher=: a model for the teacher's view (trained, or trained here "
                         "with teacher_epochs=)")
    if isinstance(teacher, FrozenTeacher):
        teacher = teacher.model
    if isinstance(teacher, TeacherSource):
        if view != "identity":
            raise ValueError(f"{who}: the teacher's view {view!r} needs a model to wrap, not a "
                             f"{type(teacher).__name__} teacher source")
        return teacher
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"{who}: teacher must be an nn.Module or a teacher source; got {type(teacher).__name__}")
    return teacher if view == "identity" else ModalityView(teacher, view)


def _train_teacher(teacher: nn.Module | TeacherSource, teacher_epochs: int | None, train_loader: Any,
                   val_loader: Any, run_dir: str | Path | None, seed: int, progress: bool,
                   fit_kwargs: dict[str, Any], who: str) -> FitResult | None:
    """Train the teacher on its view with cross-entropy when ``teacher_epochs`` is given."""
    if teacher_epochs is None:
        return None
    _count("teacher_epochs", teacher_epochs)
    if isinstance(teacher, TeacherSource):
        raise ValueError(f"{who}: teacher_epochs trains the teacher, which needs a model, not a teacher source")
    teacher.requires_grad_(True)
    teacher_dir = Path(run_dir) / "teacher" if run_dir is not None else None
    return fit(Distiller(teacher, None, {"ce": 1.0}), train_loader, val_loader, epochs=teacher_epochs,
               run_dir=teacher_dir, seed=seed, progress=progress, **fit_kwargs)


@register_strategy("generalized_distillation", "transfer", GENERALIZED_DISTILLATION)
def fit_generalized_distillation(
    student: nn.Module | Callable[[], nn.Module],
    train_loader: Iterable[Any],
    val_loader: Iterable[Any] | None = None,
    *,
    teacher: Any = None,
    epochs: int,
    run_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    regular: str = "identity",
    privileged: str = "identity",
    imitation: float = 1.0,
    T: float = 1.0,
    teacher_epochs: int | None = None,
    **fit_kwargs: Any,
) -> PairedResult:
    """Generalized distillation: a teacher on privileged features softly labels a student on regular ones.

    Lopez-Paz, Bottou, Schölkopf, Vapnik, "Unifying Distillation and Privileged Information", ICLR
    2016, arXiv 1511.03643 (section 4): (1) learn the teacher ``f_t`` on ``(x*_i, y_i)``; (2) its
    soft labels ``s_i = σ(f_t(x*_i)/T)``; (3) learn the student ``f_s`` on ``(x_i, y_i)`` and
    ``(x_i, s_i)`` with the imitation parameter ``λ``
    (:func:`~distill.functional.generalized_distillation_loss`).

    Args:
        student: the student model (or a zero-argument factory); it sees ``regular``.
        train_loader, val_loader: batches of packed inputs holding both representations.
        teacher: the teacher model, seeing ``privileged``; trained on it first when ``teacher_epochs``
            is given (cross-entropy, the same ``fit_kwargs``), else taken as trained.
        regular, privileged: the views (:func:`~distill.functional.parse_view`) of ``x`` and ``x*``;
            for the paper's synthetic data ``"columns:0:d"`` and ``"columns:d:d+d*"``, for its MNIST
            experiment (``x*`` the 28x28 image, ``x`` the image at 7x7) ``"downsample:4"`` and ``"identity"``.
        imitation, T: ``λ`` and the temperature; the defaults ``λ = T = 1`` are the paper's synthetic
            experiments' (its MNIST and CIFAR-10 runs sweep both).
        epochs, run_dir, seed, progress, fit_kwargs: passed to :func:`distill.fit` (the teacher's run
            goes to ``run_dir/teacher``).

    Raises (before any training): ValueError for a bad view, imitation, T or teacher_epochs, or a
    missing teacher.
    """
    DF.parse_view(regular)
    DF.parse_view(privileged)
    method = create_method("generalized_distillation", imitation=imitation, T=T)  # checks both
    _count("epochs", epochs)
    check_stage_resume(fit_kwargs, "fit_generalized_distillation", run_dir)
    model = as_model(student, "fit_generalized_distillation")
    source = _teacher_model(teacher, privileged, "fit_generalized_distillation")
    teacher_result = _train_teacher(source, teacher_epochs, train_loader, val_loader, run_dir, seed, progress,
                                    fit_kwargs, "fit_generalized_distillation")
    d = Distiller(ModalityView(model, regular), source, {"gd": method})
    result = fit(d, train_loader, val_loader, epochs=epochs, run_dir=run_dir, seed=seed, progress=progress,
                 **fit_kwargs)
    return _result(result, teacher_result=teacher_result)


@register_strategy("cross_quality_distillation", "transfer", CROSS_QUALITY)
def fit_cross_quality_distillation(
    student: nn.Module | Callable[[], nn.Module],
    train_loader: Iterable[Any],
    val_loader: Iterable[Any] | None = None,
    *,
    teacher: Any = None,
    epochs: int,
    run_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    degradation: str = "downsample:2",
    T: float = 4.0,
    ce_weight: float = 1.0,
    kd_weight: float = 1.0,
    teacher_epochs: int | None = None,
    **fit_kwargs: Any,
) -> PairedResult:
    """Cross-quality distillation: a teacher on clean inputs teaches a student on their degraded copies.

    Su & Maji, "Adapting Models to Signal Degradation using Distillation", BMVC 2017, arXiv
    1604.00433. Each training image ``x`` and its degraded copy ``x' = D(x)`` form a pair; the
    teacher ``f`` (trained on clean images) sees ``x``, the student ``g`` sees ``x'``, and the
    student minimises ``ce_weight · CE(y, σ(g(x'))) + kd_weight · T²·KL(σ(f(x)/T) ‖ σ(g(x')/T))``
    (:func:`~distill.functional.kd_loss`: the soft cross-entropy of the paper's objective minus the
    teacher's entropy, a constant, times the library's ``T²``). At test time the student sees
    degraded images only (the validation inputs pass through the same degradation).

    Args:
        degradation: the student's view, a :func:`~distill.functional.degrade` spec:
            ``"downsample:k"`` (low resolution, upsampled back), ``"noise:sigma"``, ``"edges"``
            (line drawings); ``"noise"`` draws new noise at every call.
        T, ce_weight, kd_weight: ours (T = 4, both weights 1): the paper's text was not reachable
            here (abstract only), and its defaults are not copied.
        teacher: a model trained on clean inputs (or trained here for ``teacher_epochs`` epochs).
        epochs, run_dir, seed, progress, fit_kwargs: passed to :func:`distill.fit`.
    """
    if DF.parse_view(degradation)[0] not in ("identity", "downsample", "noise", "edges"):
        raise ValueError(f"degradation must be a 'downsample:k', 'noise:sigma' or 'edges' view; got {degradation!r}")
    kd = create_method("kd", T=T, weight=kd_weight)
    _count("epochs", epochs)
    check_stage_resume(fit_kwargs, "fit_cross_quality_distillation", run_dir)
    model = as_model(student, "fit_cross_quality_distillation")
    source = _teacher_model(teacher, "identity", "fit_cross_quality_distillation")
    teacher_result = _train_teacher(source, teacher_epochs, train_loader, val_loader, run_dir, seed, progress,
                                    fit_kwargs, "fit_cross_quality_distillation")
    d = Distiller(ModalityView(model, degradation), source, {"ce": ce_weight, "kd": kd})
    result = fit(d, train_loader, val_loader, epochs=epochs, run_dir=run_dir, seed=seed, progress=progress,
                 **fit_kwargs)
    return _result(result, teacher_result=teacher_result)


@register_strategy("supervision_transfer", "transfer", SUPERVISION_TRANSFER)
def fit_supervision_transfer(
    student: nn.Module | Callable[[], nn.Module],
    train_loader: Iterable[Any],
    val_loader: Iterable[Any] | None = None,
    *,
    teacher: Any = None,
    unlabeled: Any = None,
    epochs: int,
    run_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    student_view: str = "edges",
    teacher_view: str = "identity",
    student_tap: str = "pool",
    teacher_tap: str = "pool",
    adapter: str = "identity",
    transfer_epochs: int | None = None,
    batch_size: int | None = None,
    **fit_kwargs: Any,
) -> PairedResult:
    """Supervision transfer: a new modality's network learns a labelled modality's mid-level features.

    Gupta, Hoffman, Malik, "Cross Modal Distillation for Supervision Transfer", CVPR 2016, arXiv
    1507.00448. (1) On paired, unlabeled inputs, the student on modality B is trained to
    reproduce the teacher's (trained on modality A) features at one mid-level layer: the L2 loss
    ``½‖φ_s(x_B) − φ_t(x_A)‖²`` per sample (:func:`~distill.functional.fitnet_hint_loss`; the paper's
    transformation ``t`` between the two is the identity when, as in its experiments, the two
    networks have one architecture: ``adapter="identity"``; another adapter kind of
    :func:`~distill.adapters.build_adapter` bridges different widths). (2) The whole student is then
    fine-tuned with cross-entropy on the few labelled examples of modality B.

    Args:
        train_loader: the labelled examples (packed inputs; the student sees its view of them).
        unlabeled: the paired unlabeled inputs ``(N_u, ...)`` packed like the labelled ones (or a
            TensorData); None uses the labelled inputs' pairs alone for the transfer stage.
        teacher: the modality-A model (trained), seeing ``teacher_view``.
        student_view, teacher_view: the views of modality B and A
            (:func:`~distill.functional.parse_view`): ``"channels:1:2"`` / ``"channels:0:1"`` for
            modalities stacked as channels, or renderings of one image (``"edges"``, ``"distance"``).
        student_tap, teacher_tap: the layers matched (the paper matches a late convolutional
            layer, pool5 of AlexNet / conv5 of VGG; here the zoo's pooled feature ``pool`` by default).
        transfer_epochs: epochs of stage (1) (default ``epochs``); ``epochs``: of stage (2).
        batch_size: of stage (1) (default: the labelled loader's, or 64).
        run_dir: stage (1) runs in ``run_dir/transfer``, stage (2) in ``run_dir``.
    """
    DF.parse_view(student_view)
    DF.parse_view(teacher_view)
    _count("epochs", epochs)
    if transfer_epochs is not None:
        _count("transfer_epochs", transfer_epochs)
    check_stage_resume(fit_kwargs, "fit_supervision_transfer", run_dir)
    x_l, _, settings = in_memory_tensors(train_loader, "fit_supervision_transfer")
    if unlabeled is None:
        x_u = x_l
    else:
        x_u = unlabeled if isinstance(unlabeled, torch.Tensor) else getattr(unlabeled, "inputs", None)
        if not isinstance(x_u, torch.Tensor) or x_u.shape[1:] != x_l.shape[1:] or x_u.shape[0] == 0:
            got = tuple(x_u.shape) if isinstance(x_u, torch.Tensor) else type(unlabeled).__name__
            raise ValueError(f"fit_supervision_transfer: unlabeled must be paired inputs packed like the labelled "
                             f"ones (N, {', '.join(map(str, x_l.shape[1:]))}); got {got}")
    size = _count("batch_size", batch_size if batch_size is not None else settings.get("batch_size", 64))
    model = ModalityView(as_model(student, "fit_supervision_transfer"), student_view)
    source = _teacher_model(teacher, teacher_view, "fit_supervision_transfer")
    if isinstance(source, TeacherSource):
        raise ValueError("fit_supervision_transfer reads the teacher's features: teacher must be a model")
    t_tap = f"model.{teacher_tap}" if isinstance(source, ModalityView) else teacher_tap
    hint = create_method("fitnet", student_tap=f"model.{student_tap}", teacher_tap=t_tap, adapter=adapter)
    transfer_dir = Path(run_dir) / "transfer" if run_dir is not None else None
    d = Distiller(model, FrozenTeacher(source), {"transfer": hint})
    d.prepare(x_u[:2])
    pairs = InMemoryLoader(x_u, None, size, shuffle=True, seed=seed)
    transfer_result = fit(d, pairs, None, epochs=transfer_epochs or epochs, run_dir=transfer_dir, seed=seed,
                          progress=progress, **fit_kwargs)
    d.detach_taps()
    tune = Distiller(model, None, {"ce": 1.0})
    result = fit(tune, train_loader, val_loader, epochs=epochs, run_dir=run_dir, seed=seed, progress=progress,
                 **fit_kwargs)
    return _result(result, transfer_result=transfer_result)
