"""Defensive distillation: train at temperature T, distil at T, deploy at T = 1.

Paper: N. Papernot, P. McDaniel, X. Wu, S. Jha, A. Swami, "Distillation as a Defense to Adversarial
Perturbations against Deep Neural Networks", IEEE S&P 2016, arXiv 1511.04508. Its breaking:
N. Carlini, D. Wagner, "Defensive Distillation is Not Robust to Adversarial Examples", 2016, arXiv
1607.04311 (attacks on the logits, :func:`distill.functional.logit_margin`).

The procedure (Section IV of the paper):

1. the *initial network* ``F`` is trained on the hard labels with the softmax at temperature ``T``:
   cross-entropy of ``softmax(Z(x) / T)`` (:func:`~distill.functional.temperature_cross_entropy`);
2. its soft labels ``softmax(Z_F(x) / T)`` label the training set;
3. the *distilled network* ``F^d``, of the same architecture, is trained on those soft labels at the
   same ``T``;
4. ``F^d`` is deployed at ``T = 1``: its logits as they are.

Trained at ``T = 100`` the network's logits grow about ``T`` times; at ``T = 1`` the softmax saturates
and the cross-entropy's input gradient vanishes (to exactly 0 in float32 for most samples), so FGSM and
PGD on the softmax cross-entropy fail, while an attack on the logits (C&W's margin) does not
(``benchmarks/security_explain.py`` measures both).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from distill import functional as DF
from distill.batch import Batch, View
from distill.distiller import Distiller
from distill.methods.base import Method
from distill.papers import Paper
from distill.strategies.chain import ChainResult, _check_epochs, _check_positive, _with_stages, check_stage_resume
from distill.strategies.registry import register_strategy
from distill.strategies.transfer import _new_model
from distill.teachers import check_logits
from distill.train.loop import fit

__all__ = ["DEFENSIVE_DISTILLATION", "SoftTemperatureCE", "TemperatureCE", "fit_defensive_distillation"]

DEFENSIVE_DISTILLATION = Paper(
    "Distillation as a Defense to Adversarial Perturbations against Deep Neural Networks",
    "N. Papernot, P. McDaniel, X. Wu, S. Jha, A. Swami", 2016, "1511.04508", "IEEE S&P")


class TemperatureCE(Method):
    """Step 1: cross-entropy of ``softmax(z / T)`` on the hard labels (no teacher), no ``T²`` factor."""

    name = "temperature_ce"
    family = "security"
    paper = DEFENSIVE_DISTILLATION
    needs_teacher = False
    needs_targets = True

    def __init__(self, T: float = 100.0, weight: float = 1.0) -> None:
        super().__init__(weight=weight)
        self.T = _check_positive("T", T)

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        if batch.targets is None:
            raise ValueError("temperature_ce needs labelled batches (batch.targets is None)")
        return DF.temperature_cross_entropy(check_logits(student_view, "student"), batch.targets, self.T)


class SoftTemperatureCE(Method):
    """Step 3: cross-entropy of ``softmax(z_s / T)`` on the teacher's ``softmax(z_t / T)``, no ``T²`` factor."""

    name = "soft_temperature_ce"
    family = "security"
    paper = DEFENSIVE_DISTILLATION

    def __init__(self, T: float = 100.0, weight: float = 1.0) -> None:
        super().__init__(weight=weight)
        self.T = _check_positive("T", T)

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        soft = (check_logits(teacher_view, "teacher").detach().float() / self.T).softmax(1)
        return DF.temperature_cross_entropy(check_logits(student_view, "student"), soft, self.T)


@register_strategy("defensive_distillation", "security", DEFENSIVE_DISTILLATION)
def fit_defensive_distillation(
    student: nn.Module | Callable[[], nn.Module],
    train_loader: Iterable[Any],
    val_loader: Iterable[Any] | None = None,
    *,
    teacher: nn.Module | None = None,
    epochs: int,
    teacher_epochs: int | None = None,
    T: float = 100.0,
    run_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    **fit_kwargs: Any,
) -> ChainResult:
    """Train the initial network at temperature ``T``, then distil it at ``T`` into a network of the same
    architecture; the result's model is the distilled network, used at ``T = 1`` (its logits as they are).

    Args:
        student: the architecture (a model, re-initialised for the initial network, or a factory).
        teacher: an initial network already trained at temperature ``T`` (step 1 is then skipped). A
            network trained at ``T = 1`` is *not* one: its soft labels at ``T = 100`` are nearly uniform.
        epochs: the distilled network's epochs; ``teacher_epochs`` the initial network's (default ``epochs``).
        T: the training and distillation temperature. ``T = 100``: the highest temperature of the paper's
            experiments, as its authors' follow-up (arXiv 1607.05113) describes them; only the paper's
            abstract was read here. Optimiser settings are ours
            (pass them in ``fit_kwargs``: with SGD the 1/T of the gradient calls for a larger ``lr``;
            Adam is insensitive to it).
        run_dir: ``run_dir/initial`` and ``run_dir/distilled``.
        **fit_kwargs: passed to both :func:`distill.fit` calls.

    Returns a :class:`~distill.strategies.chain.ChainResult`: the distilled network's result, ``stages``
    ``[initial, distilled]`` (``[distilled]`` with a given teacher) and ``models`` likewise.
    """
    epochs = _check_epochs(epochs)
    teacher_epochs = _check_epochs(epochs if teacher_epochs is None else teacher_epochs)
    T = _check_positive("T", T)
    check_stage_resume(fit_kwargs, "defensive_distillation", run_dir)
    if teacher is not None and not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be an initial network trained at temperature T (an nn.Module), got "
                        f"{type(teacher).__name__}")
    if not isinstance(student, nn.Module) and not callable(student):
        raise TypeError(f"student must be an nn.Module or a zero-argument factory, got {type(student).__name__}")
    root = Path(run_dir) if run_dir is not None else None
    stages, models = [], []
    if teacher is None:
        teacher = _new_model(student, seed + 1000)
        stages.append(fit(Distiller(teacher, None, {"temperature_ce": TemperatureCE(T)}), train_loader, val_loader,
                          epochs=teacher_epochs, run_dir=root / "initial" if root else None, seed=seed,
                          progress=progress, **fit_kwargs))
        models.append(teacher)
    distilled = student if isinstance(student, nn.Module) else _new_model(student, seed)
    result = fit(Distiller(distilled, teacher, {"soft_temperature_ce": SoftTemperatureCE(T)}), train_loader,
                 val_loader, epochs=epochs, run_dir=root / "distilled" if root else None, seed=seed + 1,
                 progress=progress, **fit_kwargs)
    return _with_stages(result, [*stages, result], [*models, distilled])
