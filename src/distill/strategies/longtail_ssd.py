"""SSD: self supervision to distillation for long-tailed recognition (issue 17, part G).

Li, Wang, Wu, "Self Supervision to Distillation for Long-Tailed Visual Recognition", ICCV 2021,
arXiv 2109.04075. Three stages on one architecture (self-distillation):

* Stage I, self-supervision-guided feature learning: the teacher network is trained with cross-entropy
  (instance-balanced sampling) plus ``ssl_weight`` x a contrastive loss between two augmented views of each
  image, on a projection head over the ``feature_tap`` features.
* Stage II, soft-label generation: the teacher's backbone is frozen and its classifier re-trained with
  class-balanced sampling (``classifier_epochs``); its logits are the soft labels.
* Stage III, joint training with self-distillation: a fresh student with *two* classifiers on one backbone,
  the hard head by cross-entropy on the labels, the soft head by KD from the soft labels at ``T``
  (:func:`distill.functional.ssd_student_loss`). Optionally (``finetune_epochs``) the soft head is
  re-trained with class-balanced sampling on the frozen backbone, as the authors' optional last step.

Defaults: ``T = 2`` (``--kd_t``) and the CE + KD sum with weight 1 are the authors' code
(github.com/MCG-NJU/SSD-LT, ``ssd_stage_iii.py`` and ``SSD_LT/builder.py``); ``ssl_tau = 0.2`` is their
MoCo temperature (``--moco-t``). Departures, ours: the self-supervision is SimCLR's in-batch NT-Xent
(:func:`distill.functional.nt_xent_loss`) instead of MoCo's queue and momentum encoder (a small data set
here); the stage-II classifier is a plain linear layer re-trained with class-balanced sampling (cRT), where
the code uses a tau-normalised classifier; views are random crops (padding 2) and horizontal flips; the
epoch counts and the cosine SGD schedule are ours. The paper's method section could not be read here.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from distill import functional as DF
from distill.data.augment import Compose, RandomCropPad, RandomHorizontalFlip
from distill.methods.base import Paper
from distill.strategies.fewshot_skd import (
    _check_own_loop,
    _write,
    labelled_tensors,
    sgd_epochs,
    tap_features,
    val_accuracy,
)
from distill.strategies.registry import register_strategy
from distill.strategies.transfer import _new_model
from distill.taps import Taps, logits_of
from distill.train.loop import FitResult

__all__ = ["SSD_PAPER", "SSDResult", "TwoHeadClassifier", "fit_ssd_longtail"]

SSD_PAPER = Paper("Self Supervision to Distillation for Long-Tailed Visual Recognition", "T. Li, L. Wang, G. Wu",
                  2021, "2109.04075", "ICCV")


class TwoHeadClassifier(nn.Module):
    """A backbone's ``feature_tap`` features ``(B, D)`` into two linear heads: ``forward`` returns the soft
    head's logits ``(B, K)``; :meth:`both` returns ``(hard, soft)``."""

    def __init__(self, model: nn.Module, soft_head: nn.Linear, feature_tap: str = "pool") -> None:
        super().__init__()
        self.model, self.soft_head, self.feature_tap = model, soft_head, feature_tap
        self._taps = Taps(model, [feature_tap])

    def both(self, x: Tensor) -> tuple[Tensor, Tensor]:
        with self._taps.recording() as store:
            hard = logits_of(self.model(x))
        return hard, self.soft_head(store[self.feature_tap].flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.both(x)[1]


@dataclass
class SSDResult(FitResult):
    """:class:`~distill.train.FitResult` of the soft head, plus the two-head student and the teacher."""

    model: TwoHeadClassifier | None = None
    teacher: nn.Module | None = None


def _head(model: nn.Module, x: Tensor, tap: str) -> tuple[nn.Linear, int]:
    """The model's last ``nn.Linear`` (its classifier) and the feature width at ``tap``."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("ssd_longtail needs a classifier ending in an nn.Linear (its stage II re-trains it)")
    return linears[-1], tap_features(model, x[:2], tap).shape[1]


@register_strategy("ssd_longtail", "longtail", SSD_PAPER)
def fit_ssd_longtail(student: nn.Module | Callable[[], nn.Module], train_loader: Any, val_loader: Any = None, *,
                     teacher: nn.Module | None = None, epochs: int = 10, teacher_epochs: int | None = None,
                     classifier_epochs: int | None = None, finetune_epochs: int = 0,
                     run_dir: str | Path | None = None, seed: int = 0, progress: bool = True,
                     ssl_weight: float = 1.0, ssl_tau: float = 0.2, T: float = 2.0, kd_weight: float = 1.0,
                     feature_tap: str = "pool", projection_dim: int = 64, lr: float = 0.05, momentum: float = 0.9,
                     weight_decay: float = 5e-4, batch_size: int | None = None, **fit_kwargs: Any) -> SSDResult:
    """SSD: a self-supervised teacher, its class-balanced soft labels, a two-head student.

    Args:
        student: the student network (its own classifier becomes the hard head), or a factory; the teacher
            is a fresh copy of it (self-distillation).
        train_loader: the long-tailed labelled images ``(N, C, H, W)`` in memory.
        val_loader: optional balanced labelled data: the soft head's accuracy is recorded.
        teacher: an already trained stage-I network: stage I is skipped.
        epochs / teacher_epochs / classifier_epochs: stage III / I / II epochs (the last two default to
            ``epochs``); ``finetune_epochs``: the optional class-balanced re-training of the soft head.
        ssl_weight, ssl_tau: weight and temperature of stage I's contrastive term.
        T, kd_weight: stage III's KD temperature and weight.
    Returns:
        :class:`SSDResult`: ``model`` the :class:`TwoHeadClassifier` (soft head by default), ``teacher``.
    """
    who = "ssd_longtail"
    _check_own_loop(fit_kwargs, who)
    for name, v in (("ssl_weight", ssl_weight), ("kd_weight", kd_weight)):
        if v < 0:
            raise ValueError(f"{who}: {name} must be >= 0; got {v}")
    if T <= 0 or ssl_tau <= 0:
        raise ValueError(f"{who}: T and ssl_tau must be > 0; got {T}, {ssl_tau}")
    x, y, bs = labelled_tensors(train_loader, who)
    num_classes = int(y.max()) + 1
    kw = dict(batch_size=batch_size or bs, lr=lr, momentum=momentum, weight_decay=weight_decay, progress=progress)
    balanced = DF.class_balanced_weights(y, num_classes)
    history: list[dict[str, Any]] = []
    model = student if isinstance(student, nn.Module) else _new_model(student, seed)

    if teacher is None:  # stage I
        teacher = _new_model(student, seed + 1)
        _, dim = _head(teacher, x, feature_tap)
        proj = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, projection_dim))
        views = Compose([RandomCropPad(2), RandomHorizontalFlip()])
        taps = Taps(teacher, [feature_tap])
        g = torch.Generator().manual_seed(seed + 3)

        def stage1(xb: Tensor, yb: Tensor) -> Tensor:
            both = torch.cat([views(xb, g), views(xb, g)])
            with taps.recording() as store:
                z = logits_of(teacher(both))
            f = proj(store[feature_tap].flatten(1))
            b = len(xb)
            ce = nn.functional.cross_entropy(z, yb.repeat(2))
            return ce + ssl_weight * DF.nt_xent_loss(f[:b], f[b:], ssl_tau)

        try:
            losses = sgd_epochs(list(teacher.parameters()) + list(proj.parameters()), stage1, x, y,
                                epochs=epochs if teacher_epochs is None else teacher_epochs, seed=seed,
                                what="SSD stage I", modules=[teacher, proj], **kw)
        finally:
            taps.remove()
        history += [{"stage": "I", "epoch": e, "loss": v} for e, v in enumerate(losses)]
    else:
        teacher = copy.deepcopy(teacher)

    # stage II: the frozen backbone's classifier re-trained with class-balanced sampling
    teacher.eval()
    teacher.requires_grad_(False)
    fc, _ = _head(teacher, x, feature_tap)
    fc.reset_parameters()
    fc.requires_grad_(True)
    feats_t = tap_features(teacher, x, feature_tap)
    losses = sgd_epochs(list(fc.parameters()), lambda f, yb: nn.functional.cross_entropy(fc(f), yb), feats_t, y,
                        epochs=epochs if classifier_epochs is None else classifier_epochs, seed=seed + 4,
                        what="SSD stage II", sample_weights=balanced, modules=[fc], **kw)
    history += [{"stage": "II", "epoch": e, "loss": v} for e, v in enumerate(losses)]
    fc.requires_grad_(False)
    teacher.eval()

    # stage III: the two-head student
    _, dim = _head(model, x, feature_tap)
    two = TwoHeadClassifier(model, nn.Linear(dim, num_classes), feature_tap)

    def stage3(xb: Tensor, yb: Tensor) -> Tensor:
        with torch.no_grad():
            t = logits_of(teacher(xb))
        hard, soft = two.both(xb)
        return DF.ssd_student_loss(hard, soft, t, yb, T, kd_weight)

    losses = sgd_epochs(list(two.parameters()), stage3, x, y, epochs=epochs, seed=seed + 5, what="SSD stage III",
                        modules=[two], **kw)
    history += [{"stage": "III", "epoch": e, "loss": v} for e, v in enumerate(losses)]
    if finetune_epochs:
        feats_s = tap_features(model, x, feature_tap)
        two.soft_head.reset_parameters()
        losses = sgd_epochs(list(two.soft_head.parameters()),
                            lambda f, yb: nn.functional.cross_entropy(two.soft_head(f), yb), feats_s, y,
                            epochs=finetune_epochs, seed=seed + 6, what="SSD fine-tune", sample_weights=balanced,
                            modules=[two.soft_head], **kw)
        history += [{"stage": "finetune", "epoch": e, "loss": v} for e, v in enumerate(losses)]
    two.eval()
    acc = val_accuracy(two, val_loader, who)
    if acc is not None:
        history[-1]["student_acc"] = acc
    return SSDResult(history=history, best_acc=acc, best_epoch=epochs - 1 if acc is not None else None,
                     last_acc=acc, run_dir=_write(run_dir, history), model=two, teacher=teacher)
