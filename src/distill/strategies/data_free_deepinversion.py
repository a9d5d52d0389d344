"""Data-free KD with DeepInversion and Adaptive DeepInversion: synthesise, then distill.

Paper: H. Yin et al., "Dreaming to Distill: Data-free Knowledge Transfer via DeepInversion", CVPR 2020,
arXiv 1912.08795 (the synthesizers: :mod:`distill.synthesis.deepinversion`).

* ``deepinversion_kd``: one DeepInversion set of ``ipc`` images per class from the teacher, then
  ordinary KD (``T^2 KL(p_T^T || p_S^T)``, :class:`~distill.methods.logits.KD`) of the student on it
  with :func:`distill.fit` for ``epochs`` epochs.
* ``adi_kd``: Adaptive DeepInversion in ``rounds``: each round synthesises ``ipc_per_round`` images per
  class against the *current* student (the competition term seeks where it disagrees with the
  teacher), adds them to the pool, and trains the student with KD on the whole pool for
  ``epochs_per_round`` epochs (a fresh optimizer per round: each round is one ``fit`` call).

Neither ever reads ``train_loader`` (it is accepted for the strategy convention only);
``val_loader`` (the test split) is used for evaluation only. The teacher is frozen (eval mode, no
gradient to its weights, BN buffers untouched). The KD temperature ``T = 20`` is that of Fang et
al.'s benchmark scripts (github.com/zju-vipa/Fast-Datafree, which also run DeepInversion); the
paper's own KD settings could not be read here.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.data.synthetic import SyntheticSet
from distill.distiller import Distiller
from distill.methods.logits import KD
from distill.strategies.registry import as_model, register_strategy
from distill.synthesis._checks import check_int
from distill.synthesis.deepinversion import (
    YIN_2020,
    adaptive_deepinversion,
    deepinversion,
)
from distill.train.loop import FitResult, fit
from distill.train.schedules import Schedule, make_optimizer

__all__ = ["DataFreeResult", "fit_adi_kd", "fit_deepinversion_kd", "kd_on_synthetic"]


@dataclass
class DataFreeResult(FitResult):
    """:class:`~distill.train.loop.FitResult` plus the synthetic set trained on and the time spent
    synthesising (seconds; included in ``time_s``, which covers synthesis and training)."""

    synthetic: SyntheticSet | None = None
    synthesis_time_s: float = 0.0
    student: nn.Module | None = None


def _check_teacher(teacher: Any) -> nn.Module:
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"a data-free strategy needs teacher= (a trained nn.Module); got {type(teacher).__name__}")
    return teacher


def _check_kd_settings(who: str, *, T: float, batch_size: int, epochs: int, fit_kwargs: dict[str, Any]) -> None:
    """Reject bad KD settings before any synthesis: the KD temperature, the batch size, and the
    :func:`distill.fit` keywords (unknown names; optimizer name, ``lr``, ``momentum``,
    ``weight_decay``; schedule name and milestones), with :func:`distill.fit`'s defaults for those
    not given. Without this, a typo surfaced only after the whole DeepInversion synthesis had run
    (minutes on a CPU; issue 13's benchmark synthesises for about ten)."""
    KD(T=T)  # raises for T <= 0, inf, NaN
    check_int("batch_size", batch_size, 1)
    reserved = sorted(set(fit_kwargs) & {"epochs", "run_dir", "seed", "progress"})
    if reserved:
        raise TypeError(f"{who}: {reserved} are set by the strategy itself; remove them from the fit keywords")
    sig = inspect.signature(fit)
    try:
        sig.bind_partial(None, None, None, epochs=epochs, **fit_kwargs)
    except TypeError as e:
        raise TypeError(f"{who}: bad keyword for distill.fit: {e}") from None
    d = {k: v.default for k, v in sig.parameters.items() if v.default is not inspect.Parameter.empty}
    d.update(fit_kwargs)
    probe = [nn.Parameter(torch.zeros(1))]
    opt = make_optimizer(probe, d["optimizer"], lr=d["lr"], momentum=d["momentum"], weight_decay=d["weight_decay"],
                         nesterov=d["nesterov"])
    Schedule(opt, d["schedule"], epochs=epochs, steps_per_epoch=1, milestones=d["milestones"], gamma=d["gamma"])


def kd_on_synthetic(student: nn.Module, teacher: nn.Module, synthetic: SyntheticSet, val_loader: Iterable[Any] | None,
                    *, epochs: int, T: float, batch_size: int, seed: int, progress: bool,
                    run_dir: str | Path | None, **fit_kwargs: Any) -> FitResult:
    """KD of ``student`` from ``teacher`` on the images of ``synthetic`` (labels unused): one
    :func:`distill.fit` call with ``losses={"kd": KD(T)}``."""
    d = Distiller(student, teacher, {"kd": KD(T=T)})
    loader = synthetic.loader(batch_size, shuffle=True, seed=seed)
    return fit(d, loader, val_loader, epochs=epochs, run_dir=run_dir, seed=seed, progress=progress, **fit_kwargs)


@register_strategy("deepinversion_kd", "data-free", YIN_2020)
def fit_deepinversion_kd(
    student: Any,
    train_loader: Iterable[Any] | None,
    val_loader: Iterable[Any] | None = None,
    *,
    teacher: nn.Module,
    num_classes: int,
    image_shape: tuple[int, int, int],
    epochs: int,
    ipc: int = 100,
    T: float = 20.0,
    batch_size: int = 256,
    synth: dict[str, Any] | None = None,
    synthetic: SyntheticSet | None = None,
    seed: int = 0,
    progress: bool = True,
    run_dir: str | Path | None = None,
    **fit_kwargs: Any,
) -> DataFreeResult:
    """DeepInversion, then KD on the synthesised set (never reads ``train_loader``).

    Args:
        student: the student (a module or a zero-argument factory).
        train_loader: ignored: data-free (a test proves it is never iterated).
        val_loader: evaluation only (the test split).
        teacher: the trained BN teacher.
        num_classes, image_shape: ``K`` and ``(C, H, W)`` of the teacher's inputs.
        epochs: KD epochs on the synthetic set.
        ipc: images per class to synthesise (ours: 100).
        T: KD temperature (20, Fang et al.'s scripts).
        batch_size: KD batch size.
        synth: keyword arguments for :func:`~distill.synthesis.deepinversion.deepinversion`
            (``iterations``, ``lr``, ``bn``, ``tv``, ...; the paper's defaults otherwise).
        synthetic: a set synthesised earlier (skips synthesis).
        **fit_kwargs: passed to :func:`distill.fit` (optimizer, lr, schedule, ...); without them the
            student gets ``fit``'s defaults (SGD lr 0.05, momentum 0.9, weight decay 5e-4, lr x0.1 at
            50% and 75% of the epochs), ours, not the paper's (whose KD settings could not be read here).

    The KD settings (``T``, ``batch_size``, ``fit_kwargs``) are checked before the synthesis, which
    takes minutes. Issue 13 (MNIST, LeNet-5 (BN) -> LeNet-5-half, which has no BN): the synthesised
    images are fine (teacher confidence 0.97, every image of its class, class-balanced), but with
    ``fit``'s defaults and 1,000 images at batch 256 the student gets 4 steps an epoch and stays near
    chance; ``lr=0.01, weight_decay=1e-4, batch_size=64`` and more epochs learn (docs/benchmarks.md).

    Returns:
        :class:`DataFreeResult` (``fit``'s result, the set, synthesis time).
    """
    teacher = _check_teacher(teacher)
    model = as_model(student, "deepinversion_kd")
    check_int("epochs", epochs)
    check_int("ipc", ipc)
    _check_kd_settings("deepinversion_kd", T=T, batch_size=batch_size, epochs=epochs, fit_kwargs=fit_kwargs)
    start = time.perf_counter()
    if synthetic is None:
        synthetic = deepinversion(teacher, ipc=ipc, num_classes=num_classes, image_shape=tuple(image_shape),
                                  seed=seed, progress=progress, **(synth or {}))
    synth_time = time.perf_counter() - start
    res = kd_on_synthetic(model, teacher, synthetic, val_loader, epochs=epochs, T=T, batch_size=batch_size, seed=seed,
                          progress=progress, run_dir=run_dir, **fit_kwargs)
    return DataFreeResult(history=res.history, best_acc=res.best_acc, best_epoch=res.best_epoch,
                          last_acc=res.last_acc, run_dir=res.run_dir, time_s=time.perf_counter() - start,
                          synthetic=synthetic, synthesis_time_s=synth_time, student=model)


@register_strategy("adi_kd", "data-free", YIN_2020)
def fit_adi_kd(
    student: Any,
    train_loader: Iterable[Any] | None,
    val_loader: Iterable[Any] | None = None,
    *,
    teacher: nn.Module,
    num_classes: int,
    image_shape: tuple[int, int, int],
    rounds: int = 4,
    ipc_per_round: int = 25,
    epochs_per_round: int = 5,
    epochs: int | None = None,
    T: float = 20.0,
    batch_size: int = 256,
    synth: dict[str, Any] | None = None,
    seed: int = 0,
    progress: bool = True,
    run_dir: str | Path | None = None,
    **fit_kwargs: Any,
) -> DataFreeResult:
    """Adaptive DeepInversion alternating with KD rounds (never reads ``train_loader``).

    Round ``r`` (``0..rounds-1``): ``adaptive_deepinversion(teacher, student=<current student>,
    ipc=ipc_per_round, seed=seed + r, **synth)``, appended to the pool; then ``fit`` with KD (``T``) on
    the pool for ``epochs_per_round`` epochs (``run_dir/round<r>`` when ``run_dir`` is given). The
    history concatenates the rounds' epochs, each tagged with ``"round"``.

    Args:
        rounds, ipc_per_round, epochs_per_round: the schedule (ours: 4 x 25 images per class x 5 epochs).
        epochs: the total KD epochs (what a recipe's ``train.epochs`` gives): when set, it replaces
            ``epochs_per_round`` by ``ceil(epochs / rounds)``.
        synth: keyword arguments for :func:`~distill.synthesis.deepinversion.adaptive_deepinversion`
            (``competition``, ``iterations``, ...).
        Others as :func:`fit_deepinversion_kd`.
    """
    teacher = _check_teacher(teacher)
    model = as_model(student, "adi_kd")
    if epochs is not None:
        epochs_per_round = -(-check_int("epochs", epochs) // check_int("rounds", rounds))
    for name, v in (("rounds", rounds), ("ipc_per_round", ipc_per_round), ("epochs_per_round", epochs_per_round)):
        check_int(name, v)
    _check_kd_settings("adi_kd", T=T, batch_size=batch_size, epochs=epochs_per_round, fit_kwargs=fit_kwargs)
    if synth and "student" in synth:
        raise ValueError("adi_kd passes the current student to adaptive_deepinversion itself; remove 'student' "
                         "from synth")
    root = Path(run_dir) if run_dir is not None else None
    start = time.perf_counter()
    synth_time = 0.0
    pool: SyntheticSet | None = None
    history: list[dict[str, Any]] = []
    res: FitResult | None = None
    for r in range(rounds):
        t0 = time.perf_counter()
        new = adaptive_deepinversion(teacher, ipc=ipc_per_round, num_classes=num_classes,
                                     image_shape=tuple(image_shape), seed=seed + r, progress=progress,
                                     student=model, **(synth or {}))
        synth_time += time.perf_counter() - t0
        if pool is None:
            pool = new
        else:
            manifest = dict(pool.manifest, ipc=ipc_per_round * (r + 1), rounds=r + 1)
            pool = SyntheticSet(torch.cat([pool.images, new.images]), torch.cat([pool.labels, new.labels]), manifest)
        res = kd_on_synthetic(model, teacher, pool, val_loader, epochs=epochs_per_round, T=T, batch_size=batch_size,
                              seed=seed + r, progress=progress, run_dir=root / f"round{r}" if root else None,
                              **fit_kwargs)
        history.extend(dict(h, round=r) for h in res.history)
    assert res is not None
    accs = [h.get("val_student_acc") for h in history if h.get("val_student_acc") is not None]
    best = max(accs) if accs else None
    return DataFreeResult(history=history, best_acc=best,
                          best_epoch=next((i for i, h in enumerate(history) if h.get("val_student_acc") == best), None),
                          last_acc=res.last_acc, run_dir=root, time_s=time.perf_counter() - start,
                          synthetic=pool, synthesis_time_s=synth_time, student=model)
