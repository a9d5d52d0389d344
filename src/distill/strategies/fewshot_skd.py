"""SKD: self-supervised knowledge distillation for few-shot learning (issue 17, part G).

Rajasegaran, Khan, Hayat, Khan, Shah, "Self-supervised Knowledge Distillation for Few-shot Learning",
BMVC 2021, arXiv 2006.09785. Two generations of one architecture are trained on the *base* classes; the
backbone is then frozen and evaluated on N-way K-shot episodes of held-out classes
(:func:`distill.data.fewshot.episode_accuracy`: a logistic regression on L2-normalised features).

* Gen-0: cross-entropy on all four rotations of each image plus ``rotation_weight`` x the cross-entropy of
  a rotation head that predicts the rotation *from the class logits* (a ``Linear(K, 4)``, as the authors'
  ``resnet12_ssl``) (:func:`distill.functional.skd_gen0_loss`).
* Gen-1: a fresh network distils Gen-0's logits on the un-rotated images (KD at ``T``) while the L2
  distance between its logits on each rotated copy and on the original is reduced
  (:func:`distill.functional.skd_gen1_loss`); no cross-entropy, as the authors' ``train_distillation.py``.

Defaults from the authors' code (github.com/brjathu/SKD, ``run.sh``/``README.md``; the paper's method
section could not be read here): ``rotation_weight = 2`` (Gen-0 ``--gamma 2.0``), ``consistency_weight =
0.1`` (Gen-1 ``--gamma 0.1``), ``T = 2`` (``--kd_T``), SGD lr 0.05, momentum 0.9, weight decay 5e-4. Two
departures, both ours: the rotation loss is the softmax cross-entropy the paper names, where the code sums
a binary cross-entropy over the 4 rotation logits; the code's Gen-1 compares one rotated copy (the 180
degree one) and divides by 3, we average over all three rotated copies. The short cosine schedule and the
epoch counts are ours.

Shared by the long-tail strategy (:mod:`distill.strategies.longtail_ssd`): :func:`sgd_epochs` (an SGD loop
over tensors in memory) and :func:`tap_features`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from distill import functional as DF
from distill.data.loader import in_memory_tensors
from distill.files import atomic_write_text
from distill.methods.base import Paper
from distill.progress import StepProgress
from distill.strategies.registry import register_strategy
from distill.strategies.transfer import _new_model
from distill.taps import Taps, logits_of
from distill.train.loop import FitResult

__all__ = ["SKD_PAPER", "SKDResult", "fit_skd_fewshot", "labelled_tensors", "sgd_epochs", "tap_features",
           "val_accuracy"]

SKD_PAPER = Paper("Self-supervised Knowledge Distillation for Few-shot Learning",
                  "J. Rajasegaran, S. Khan, M. Hayat, F. S. Khan, M. Shah", 2021, "2006.09785", "BMVC")


@dataclass
class SKDResult(FitResult):
    """:class:`~distill.train.FitResult` of the Gen-1 student, plus the Gen-0 teacher and its rotation head."""

    model: nn.Module | None = None
    teacher: nn.Module | None = None
    rotation_head: nn.Module | None = None


def labelled_tensors(data: Any, who: str) -> tuple[Tensor, Tensor, int]:
    """``(inputs, targets, batch_size)`` of labelled training data held in memory."""
    x, y, settings = in_memory_tensors(data, who)
    if y is None or y.shape[:1] != x.shape[:1] or len(x) == 0:
        raise ValueError(f"{who} needs labelled training data (inputs (N, ...) with targets (N,))")
    return x, y, int(settings.get("batch_size", 64))


def sgd_epochs(params: Sequence[nn.Parameter], loss_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor, *,
               epochs: int, batch_size: int, lr: float, momentum: float, weight_decay: float, seed: int,
               progress: bool, what: str, sample_weights: Tensor | None = None,
               modules: Sequence[nn.Module] = ()) -> list[float]:
    """SGD with momentum and a per-step cosine schedule over ``(x (N, ...), y (N,))`` in memory; each epoch a
    seeded permutation, or ``N`` draws with replacement by ``sample_weights`` ``(N,)`` (class-balanced
    sampling). ``modules`` are put in train mode. Returns the mean loss of each epoch."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"{what}: epochs must be an integer >= 0; got {epochs!r}")
    if batch_size < 1 or lr <= 0:
        raise ValueError(f"{what}: batch_size must be >= 1 and lr > 0; got {batch_size}, {lr}")
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    steps_per = math.ceil(len(x) / batch_size)
    total = max(1, epochs * steps_per)
    g = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    for m in modules:
        m.train()
    step = 0
    with StepProgress(progress, what, epochs * steps_per) as bar:
        for _ in range(epochs):
            order = (torch.multinomial(sample_weights, len(x), replacement=True, generator=g)
                     if sample_weights is not None else torch.randperm(len(x), generator=g))
            run = 0.0
            for k in range(steps_per):
                idx = order[k * batch_size:(k + 1) * batch_size]
                for group in opt.param_groups:
                    group["lr"] = 0.5 * lr * (1 + math.cos(math.pi * step / total))
                loss = loss_fn(x[idx], y[idx])
                if not torch.isfinite(loss.detach()):
                    raise FloatingPointError(f"{what}: the loss became {float(loss.detach())} at step {step}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                run += float(loss.detach())
                step += 1
                bar.advance(f"loss {run / (k + 1):.3f}")
            losses.append(run / steps_per)
    return losses


@torch.no_grad()
def tap_features(model: nn.Module, x: Tensor, tap: str = "pool", batch_size: int = 512) -> Tensor:
    """The model's tap ``tap`` on ``x``, flattened to ``(N, D)``, in eval mode (its mode is restored)."""
    taps = Taps(model, [tap])
    was = model.training
    model.eval()
    try:
        out = []
        for s in range(0, len(x), batch_size):
            with taps.recording() as store:
                model(x[s:s + batch_size])
            out.append(store[tap].flatten(1))
        return torch.cat(out)
    finally:
        taps.remove()
        model.train(was)


@torch.no_grad()
def val_accuracy(model: nn.Module, data: Any, who: str) -> float | None:
    """Top-1 accuracy (%) of ``model`` on labelled validation data, or None without data."""
    if data is None:
        return None
    x, y, _ = labelled_tensors(data, who)
    was = model.training
    model.eval()
    pred = torch.cat([logits_of(model(x[s:s + 512])).argmax(1) for s in range(0, len(x), 512)])
    model.train(was)
    return 100.0 * float((pred == y).float().mean())


def _check_own_loop(fit_kwargs: dict[str, Any], who: str) -> None:
    if fit_kwargs:
        raise TypeError(f"{who} trains with its own SGD loop (lr, momentum, weight_decay, batch_size); it does not "
                        f"take {sorted(fit_kwargs)}")


def _write(run_dir: str | Path | None, history: list[dict[str, Any]]) -> Path | None:
    if run_dir is None:
        return None
    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path / "history.json", json.dumps(history, indent=1))
    return path


@register_strategy("skd_fewshot", "fewshot", SKD_PAPER)
def fit_skd_fewshot(student: nn.Module | Callable[[], nn.Module], train_loader: Any, val_loader: Any = None, *,
                    teacher: nn.Module | None = None, epochs: int = 10, teacher_epochs: int | None = None,
                    run_dir: str | Path | None = None, seed: int = 0, progress: bool = True,
                    rotation_weight: float = 2.0, consistency_weight: float = 0.1, T: float = 2.0,
                    lr: float = 0.05, momentum: float = 0.9, weight_decay: float = 5e-4,
                    batch_size: int | None = None, **fit_kwargs: Any) -> SKDResult:
    """SKD: Gen-0 (CE on rotations + rotation prediction), then Gen-1 (KD + rotation consistency).

    Args:
        student: the Gen-1 network (trained in place), or a factory; Gen-0 is a fresh copy of it.
        train_loader: the base classes' labelled images ``(N, C, H, H)`` in memory (an InMemoryLoader, a
            TensorData or an ``(inputs, targets)`` tuple).
        val_loader: optional labelled base-class data: the Gen-1 accuracy is recorded.
        teacher: an already trained Gen-0 network: stage 1 is skipped (``teacher_epochs`` ignored).
        epochs / teacher_epochs: Gen-1 / Gen-0 epochs (``teacher_epochs`` defaults to ``epochs``).
        rotation_weight, consistency_weight, T: gamma of Gen-0, beta and the KD temperature of Gen-1.
    Returns:
        :class:`SKDResult` (``model`` the Gen-1 student, ``teacher`` Gen-0, ``rotation_head``).
    """
    who = "skd_fewshot"
    _check_own_loop(fit_kwargs, who)
    for name, v in (("rotation_weight", rotation_weight), ("consistency_weight", consistency_weight)):
        if v < 0:
            raise ValueError(f"{who}: {name} must be >= 0; got {v}")
    if T <= 0:
        raise ValueError(f"{who}: T must be > 0; got {T}")
    x, y, bs = labelled_tensors(train_loader, who)
    if x.dim() != 4 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"{who} rotates square images (N, C, H, H); got {tuple(x.shape)}")
    bs = batch_size or bs
    model = student if isinstance(student, nn.Module) else _new_model(student, seed)
    kw = dict(batch_size=bs, lr=lr, momentum=momentum, weight_decay=weight_decay, progress=progress)
    history: list[dict[str, Any]] = []
    rot_head = None
    if teacher is None:
        teacher = _new_model(student, seed + 1)
        k = logits_of(teacher(x[:2])).shape[1]
        rot_head = nn.Linear(k, 4)

        def gen0(xb: Tensor, yb: Tensor) -> Tensor:
            z = logits_of(teacher(DF.sla_rotations(xb)))
            return DF.skd_gen0_loss(z, rot_head(z), yb, rotation_weight)

        losses = sgd_epochs(list(teacher.parameters()) + list(rot_head.parameters()), gen0, x, y,
                            epochs=epochs if teacher_epochs is None else teacher_epochs, seed=seed,
                            what="SKD Gen-0", modules=[teacher, rot_head], **kw)
        history += [{"stage": "gen0", "epoch": e, "loss": v} for e, v in enumerate(losses)]
    teacher.eval()
    teacher.requires_grad_(False)

    def gen1(xb: Tensor, yb: Tensor) -> Tensor:
        with torch.no_grad():
            t = logits_of(teacher(xb))
        return DF.skd_gen1_loss(logits_of(model(DF.sla_rotations(xb))), t, T, consistency_weight)

    losses = sgd_epochs(list(model.parameters()), gen1, x, y, epochs=epochs, seed=seed + 2, what="SKD Gen-1",
                        modules=[model], **kw)
    history += [{"stage": "gen1", "epoch": e, "loss": v} for e, v in enumerate(losses)]
    acc = val_accuracy(model, val_loader, who)
    if acc is not None:
        history[-1]["student_acc"] = acc
    model.eval()
    return SKDResult(history=history, best_acc=acc, best_epoch=epochs - 1 if acc is not None else None,
                     last_acc=acc, run_dir=_write(run_dir, history), model=model, teacher=teacher,
                     rotation_head=rot_head)
