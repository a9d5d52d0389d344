"""The nasty teacher: a network as accurate as a normal one whose soft labels mislead its students.

Paper: H. Ma, T. Chen, T.-K. Hu, C. You, X. Xie, Z. Wang, "Undistillable: Making A Nasty Teacher That
CANNOT Teach Students", ICLR 2021, arXiv 2105.07381 (code: github.com/VITA-Group/Nasty-Teacher).

Self-undermining KD trains the nasty teacher on the labels while pushing its temperature-softened
outputs away from those of a normal pre-trained network (the *adversarial* network, the strategy's
``teacher``): :func:`distill.functional.nasty_teacher_loss`. A student then distilled from it (Hinton
KD, the paper's protocol) should do worse than one distilled from the normal network, while the nasty
teacher's own accuracy stays close to the normal one's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from distill import functional as DF
from distill.batch import Batch, View
from distill.methods.base import Method
from distill.methods.logits import KD
from distill.papers import Paper
from distill.strategies.chain import (
    ChainResult,
    ModelSpec,
    _check_epochs,
    _check_positive,
    _check_trained_teacher,
    _train_stage,
    _with_labels,
    _with_stages,
    build_model,
    check_model_spec,
    check_stage_resume,
)
from distill.strategies.registry import register_strategy
from distill.strategies.transfer import _new_model
from distill.teachers import check_logits

__all__ = ["NASTY_TEACHER", "NastyTeacherLoss", "NastyTeacherResult", "fit_nasty_teacher"]

NASTY_TEACHER = Paper("Undistillable: Making A Nasty Teacher That CANNOT Teach Students",
                      "H. Ma, T. Chen, T.-K. Hu, C. You, X. Xie, Z. Wang", 2021, "2105.07381", "ICLR")


class NastyTeacherLoss(Method):
    """CE(nasty, y) − ω τ² KL(p_nasty^τ ‖ p_adversarial^τ): the nasty network is the Distiller's student,
    the normal pre-trained network its (frozen) teacher. See :func:`distill.functional.nasty_teacher_loss`."""

    name = "nasty_teacher"
    family = "security"
    paper = NASTY_TEACHER
    needs_targets = True

    def __init__(self, tau: float = 4.0, omega: float = 0.04, weight: float = 1.0) -> None:
        super().__init__(weight=weight)
        self.tau = _check_positive("tau", tau)
        if isinstance(omega, bool) or not isinstance(omega, (int, float)) or not omega >= 0:
            raise ValueError(f"omega must be a number >= 0, got {omega!r}")
        self.omega = float(omega)

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        if batch.targets is None:
            raise ValueError("the nasty teacher's loss needs labelled batches (batch.targets is None)")
        return DF.nasty_teacher_loss(check_logits(student_view, "nasty teacher"),
                                     check_logits(teacher_view, "adversarial network").detach(), batch.targets,
                                     self.tau, self.omega)


@dataclass
class NastyTeacherResult(ChainResult):
    """:class:`~distill.strategies.chain.ChainResult` of the student distilled from the nasty teacher
    (``models[-1]``), with ``nasty_acc``: the nasty teacher's last validation accuracy (%), ``models[0]``."""

    nasty_acc: float | None = None


@register_strategy("nasty_teacher", "security", NASTY_TEACHER)
def fit_nasty_teacher(
    student: ModelSpec,
    train_loader: Iterable[Any],
    val_loader: Iterable[Any] | None = None,
    *,
    teacher: nn.Module,
    epochs: int,
    nasty: ModelSpec | None = None,
    nasty_epochs: int | None = None,
    tau: float = 4.0,
    omega: float = 0.04,
    student_T: float = 4.0,
    kd_weight: float = 0.9,
    run_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    **fit_kwargs: Any,
) -> NastyTeacherResult:
    """Train a nasty teacher against the normal network ``teacher``, then distil ``student`` from it.

    Args:
        student: the student distilled from the nasty teacher (a model, factory, zoo name or spec).
        teacher: the normal pre-trained network (the paper's adversarial network), kept frozen.
        nasty: the nasty teacher's architecture; default a re-initialised copy of ``teacher`` (the
            paper's main setting: the same architecture as the adversarial network).
        epochs: the student's epochs; ``nasty_epochs`` the nasty teacher's (default ``epochs``).
        tau, omega: the self-undermining temperature and weight; ``τ = 4``, ``ω = 0.04`` are the
            authors' CIFAR-10 settings (their code's ``params.json``; CIFAR-100: ``τ = 20``, ``ω = 0.005``).
        student_T, kd_weight: the student's KD temperature and the weight λ of ``λ·KD + (1 − λ)·CE``;
            ``T = 4``, ``λ = 0.9`` are the authors' CIFAR-10 student settings (their ``alpha``).
        run_dir: ``run_dir/stage1`` (nasty teacher) and ``run_dir/stage2`` (student).
        **fit_kwargs: passed to both :func:`distill.fit` calls.
    """
    epochs = _check_epochs(epochs)
    nasty_epochs = _check_epochs(epochs if nasty_epochs is None else nasty_epochs)
    _check_trained_teacher(teacher)
    check_model_spec(student, "student")
    if nasty is not None:
        check_model_spec(nasty, "nasty")
    loss = NastyTeacherLoss(tau, omega)  # validates tau and omega before any training
    kd = KD(T=_check_positive("student_T", student_T), weight=_check_positive("kd_weight", kd_weight, high=1.0))
    check_stage_resume(fit_kwargs, "nasty_teacher", run_dir)
    root = Path(run_dir) if run_dir is not None else None
    nasty_model = _new_model(teacher, seed + 1000) if nasty is None else build_model(nasty, "nasty")
    nasty_model.requires_grad_(True).train()  # a copy of a frozen teacher would not learn
    common = dict(seed=seed, progress=progress, hand_over="last", fit_kwargs=fit_kwargs)
    first = _train_stage(nasty_model, teacher, {"nasty_teacher": loss}, train_loader, val_loader,
                         epochs=nasty_epochs, run_dir=root / "stage1" if root else None, **common)
    nasty_model.eval().requires_grad_(False)
    model = build_model(student, "student")
    second = _train_stage(model, nasty_model, _with_labels(kd, kd.weight), train_loader, val_loader, epochs=epochs,
                          run_dir=root / "stage2" if root else None, **common)
    return _with_stages(second, [first, second], [nasty_model, model], NastyTeacherResult, nasty_acc=first.last_acc)
