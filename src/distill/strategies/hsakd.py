"""HSAKD as a two-stage chain: the teacher's auxiliary classifiers, then the student.

Stage 1 trains auxiliary classifiers of the joint (class, rotation) label on the teacher's
intermediate layers (:class:`~distill.methods.hsakd.AuxiliaryNet`,
:class:`~distill.methods.hsakd.HSAKDAuxCE`; the backbone frozen by default). Stage 2 trains the
student, itself wrapped with auxiliary classifiers, with :class:`~distill.methods.hsakd.HSAKD`.
Both stages are one :func:`distill.fit` each on batches of rotated images
(:class:`~distill.strategies.self_distill.RotationLoader`); validation uses the plain images.

Paper: C. Yang, Z. An, L. Cai, Y. Xu, "Hierarchical Self-supervised Augmented Knowledge
Distillation", IJCAI 2021, arXiv 2107.13715 (reference code github.com/winycg/HSAKD).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from distill import functional as DF
from distill.batch import as_batch
from distill.distiller import Distiller
from distill.methods.hsakd import HSAKD, PAPER, AuxiliaryNet, HSAKDAuxCE
from distill.strategies.chain import (
    ChainResult,
    ModelSpec,
    _check_epochs,
    build_model,
    check_model_spec,
    check_stage_resume,
)
from distill.strategies.online import _positive_int
from distill.strategies.registry import register_strategy
from distill.strategies.self_distill import RotationLoader
from distill.train.loop import FitResult, fit

__all__ = ["TEACHER_PROTOCOLS", "fit_hsakd"]

TEACHER_PROTOCOLS = ("frozen", "joint")


def _paths(value: Any, name: str) -> list[str]:
    if isinstance(value, str) or not isinstance(value, Sequence) or not value \
            or not all(isinstance(p, str) and p for p in value):
        raise ValueError(f"{name} must be a non-empty list of tap paths (e.g. ['stage1', 'stage2', 'stage3']), "
                         f"got {value!r}")
    return list(value)


@register_strategy("hsakd", "chain", PAPER)
def fit_hsakd(
    student: ModelSpec,
    train_loader: Iterable[Any],
    val_loader: Iterable[Any] | None = None,
    *,
    teacher: nn.Module,
    epochs: int,
    teacher_epochs: int | None = None,
    run_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    exits: Sequence[str] = ("stage1", "stage2", "stage3"),
    teacher_exits: Sequence[str] | None = None,
    T: float = 3.0,
    teacher_backbone: str = "frozen",
    **fit_kwargs: Any,
) -> ChainResult:
    """HSAKD: the teacher's self-supervision augmented distributions, stage by stage, distilled into the student.

    Stage 1 (skipped when ``teacher`` is already an :class:`~distill.methods.hsakd.AuxiliaryNet`
    and ``teacher_epochs`` is None): auxiliary classifiers on ``teacher_exits`` learn the joint
    (class, rotation) labels for ``teacher_epochs`` epochs. Stage 2: the student, with auxiliary
    classifiers on ``exits``, minimises :func:`~distill.methods.hsakd.hsakd_loss` (CE on the
    unrotated images + T²·KL of every stage's augmented distribution + T²·KL of the class
    distribution on every rotated image) for ``epochs`` epochs. Each step runs both networks on
    the four rotations of every image.

    Args:
        student: the student (a model, a factory, a zoo name or a zoo spec).
        teacher: the trained teacher, or an ``AuxiliaryNet`` whose auxiliary classifiers are trained.
        exits, teacher_exits: tap paths of the layers carrying auxiliary classifiers (the same count;
            ``teacher_exits`` defaults to ``exits``). The reference code puts one after every stage.
        T: distillation temperature (3, the reference code's).
        teacher_backbone: ``"frozen"`` (the paper's main protocol: only the classifiers train) or
            ``"joint"`` (backbone and classifiers train together from the teacher's current weights,
            the reference code's "HSAKD*" teachers).
        run_dir: stage 1 writes to ``run_dir/teacher``, stage 2 to ``run_dir/student``; stage 2 is
            seeded with ``seed + 1``.
        **fit_kwargs: passed to both :func:`distill.fit` calls (the reference code: SGD (Nesterov)
            lr 0.05, batch 64, 240 epochs with decays at 150/180/210 for the student; 100 epochs with
            decays at 30/60/90 for a frozen teacher's classifiers).

    Returns:
        a :class:`~distill.strategies.chain.ChainResult` of the student; ``stages`` holds the
        teacher's classifier training (when done here) and the student's, ``models`` the teacher's
        ``AuxiliaryNet`` and the student (its auxiliary classifiers dropped: it runs as before).

    Differences from the reference code: its auxiliary classifiers are copies of the network's
    later stages; here they are BYOT-style bottlenecks on any tapped layer
    (:func:`~distill.methods.hsakd.exit_heads`), so any model can take part.
    """
    epochs = _check_epochs(epochs)
    if teacher_epochs is not None:
        teacher_epochs = _positive_int("teacher_epochs", teacher_epochs)
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be a trained nn.Module (or an AuxiliaryNet), got {type(teacher).__name__}")
    check_model_spec(student, "student")
    exits = _paths(exits, "exits")
    teacher_exits = exits if teacher_exits is None else _paths(teacher_exits, "teacher_exits")
    if isinstance(teacher, AuxiliaryNet):
        teacher_exits = teacher.exits
    if len(teacher_exits) != len(exits):
        raise ValueError(f"HSAKD pairs auxiliary classifiers stage by stage: {len(exits)} student exits {exits} but "
                         f"{len(teacher_exits)} teacher exits {teacher_exits}")
    if teacher_backbone not in TEACHER_PROTOCOLS:
        raise ValueError(f"teacher_backbone must be one of {TEACHER_PROTOCOLS}, got {teacher_backbone!r}")
    if not isinstance(teacher, AuxiliaryNet) and teacher_epochs is None:
        raise ValueError("the teacher has no auxiliary classifiers yet: give teacher_epochs to train them (or pass an "
                         "AuxiliaryNet whose classifiers are trained)")
    HSAKD(len(exits), T)  # validates T before any work
    check_stage_resume(fit_kwargs, "fit_hsakd", run_dir)
    first = next(iter(train_loader), None)
    if first is None:
        raise ValueError("the training loader yielded no batch")
    example = as_batch(first).inputs[:2]
    DF.sla_rotations(example)  # HSAKD rotates its images: a clear error for non-square ones, before any training
    root = Path(run_dir) if run_dir is not None else None
    rotated = RotationLoader(train_loader)
    stages: list[FitResult] = []

    if isinstance(teacher, AuxiliaryNet):
        teacher_net = teacher
    else:
        teacher_net = AuxiliaryNet(teacher, teacher_exits, example.to(next(teacher.parameters()).device),
                                   frozen_backbone=teacher_backbone == "frozen")
    if teacher_epochs is not None:
        aux_loss = HSAKDAuxCE(len(exits), backbone_ce=not teacher_net.frozen_backbone)
        stages.append(fit(Distiller(teacher_net, None, {"hsakd_aux": aux_loss}), rotated, val_loader,
                          epochs=teacher_epochs, run_dir=root / "teacher" if root else None, seed=seed,
                          progress=progress, **fit_kwargs))

    model = build_model(student, "student")
    student_net = AuxiliaryNet(model, exits, example.to(next(model.parameters()).device))
    result = fit(Distiller(student_net, teacher_net, {"hsakd": HSAKD(len(exits), T)}), rotated, val_loader,
                 epochs=epochs, run_dir=root / "student" if root else None, seed=seed + 1, progress=progress,
                 **fit_kwargs)
    student_net.remove_hooks()  # the delivered student runs as it did before being wrapped
    stages.append(result)
    return ChainResult(history=result.history, best_acc=result.best_acc, best_epoch=result.best_epoch,
                       last_acc=result.last_acc, run_dir=result.run_dir, stages=stages, models=[teacher_net, model])
