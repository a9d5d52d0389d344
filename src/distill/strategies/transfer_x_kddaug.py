"""KDDAug: composed training samples labelled by an ID and an OOD teacher instead of heuristic rules.

Chen, Zheng, Xiao, "Rethinking Data Augmentation for Robust Visual Question Answering", ECCV 2022, arXiv
2207.08739. In VQA, KDDAug composes new image-question pairs from the training set and, instead of
heuristic answers, gives each a soft answer from two teachers: an in-distribution (ID) teacher trained
normally and an out-of-distribution (OOD) teacher trained to be debiased, mixed per sample with the weights
of :func:`~distill.functional.kddaug_teacher_weights` (the teacher farther from the bias weighs more); the
student is trained on the original and the augmented samples together.

Our image stand-in (no VQA data here): the bias is a long-tailed class prior instead of a question type's
answer prior; the ID teacher is trained with cross-entropy, the OOD teacher with logit-adjusted
cross-entropy (Menon et al., arXiv 2007.07314; it plays the role of the paper's LMH+CSS debiased VQA
model); a composed sample mixes two training images, ``λ x_i + (1 − λ) x_j`` with ``λ ~ Beta(α, α)``
(mixing two samples' content, as pairing an image with another sample's question does); its heuristic
label is mixup's ``λ y_i + (1 − λ) y_j``; the reference distribution of the teachers' weights is the
training class prior (the authors' code's reference for samples without a trusted heuristic answer, its
"low-quality" split). Not reproduced: the paper's CLIP-based filtering of composed pairs, and the code's
"high-quality" path that keeps the heuristic answer in place of the ID teacher's prediction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill import functional as DF
from distill.data.loader import in_memory_tensors
from distill.papers import Paper
from distill.strategies.registry import as_model, register_strategy
from distill.batch import as_batch
from distill.strategies.transfer import _logits_over, _new_model
from distill.strategies.transfer_x_common import own_loop_kwargs, train_in_memory
from distill.teachers import TeacherSource, as_teacher_source
from distill.train import FitResult

__all__ = ["KDDAUG", "LABELS", "KDDAugResult", "augmented_set", "compose_pairs", "fit_kddaug"]

KDDAUG = Paper("Rethinking Data Augmentation for Robust Visual Question Answering", "L. Chen, Y. Zheng, J. Xiao",
               2022, "2207.08739", "ECCV")
LABELS = ("teacher", "heuristic", "id_teacher", "ood_teacher")
"""How composed samples are labelled: KDDAug's two teachers, mixup's heuristic, or one teacher alone (ablations)."""


def compose_pairs(x: Tensor, y: Tensor, num_classes: int, n: int, alpha: float, seed: int
                  ) -> tuple[Tensor, Tensor]:
    """``n`` composed samples ``λ x_i + (1 − λ) x_j`` (i, j drawn uniformly, j ≠ i when possible, λ ~ Beta(α, α))
    and their heuristic labels ``λ onehot(y_i) + (1 − λ) onehot(y_j)`` ``(n, K)``. ``x`` ``(N, ...)``, ``y`` ``(N,)``."""
    rng = np.random.default_rng(seed)
    N = x.shape[0]
    i = rng.integers(0, N, n)
    j = (i + rng.integers(1, N, n)) % N if N > 1 else i
    lam = torch.from_numpy(rng.beta(alpha, alpha, n)).float()
    shape = (n,) + (1,) * (x.dim() - 1)
    xi, xj = torch.from_numpy(i), torch.from_numpy(j)
    mixed = lam.view(shape) * x[xi] + (1 - lam.view(shape)) * x[xj]
    one = F.one_hot(y, num_classes).float()
    return mixed, lam[:, None] * one[xi] + (1 - lam[:, None]) * one[xj]


def augmented_set(x: Tensor, y: Tensor, teacher: TeacherSource | nn.Module, ood_teacher: TeacherSource | nn.Module, *,
                  num_classes: int, prior: Tensor, labels: str = "teacher", n: int, alpha: float = 1.0, seed: int = 0
                  ) -> tuple[Tensor, Tensor]:
    """The composed samples ``(n, ...)`` (:func:`compose_pairs`) and their labels ``(n, K)``: KDDAug's
    :func:`~distill.functional.kddaug_soft_labels` of the two teachers' softmax probabilities against
    ``prior`` ``(K,)`` (``labels="teacher"``), mixup's heuristic labels, or one teacher's probabilities."""
    if labels not in LABELS:
        raise ValueError(f"labels must be one of {LABELS}; got {labels!r}")
    x_aug, heuristic = compose_pairs(x, y, num_classes, n, alpha, seed)
    if labels == "heuristic":
        return x_aug, heuristic
    p_id, p_ood = _logits_over(teacher, x_aug).softmax(1), _logits_over(ood_teacher, x_aug).softmax(1)
    if labels == "id_teacher":
        return x_aug, p_id
    if labels == "ood_teacher":
        return x_aug, p_ood
    return x_aug, DF.kddaug_soft_labels(p_id, p_ood, prior)


@dataclass
class KDDAugResult(FitResult):
    """The student's :class:`~distill.train.FitResult` plus the teachers' accuracy on ``val_loader``."""

    id_teacher_acc: float | None = None
    ood_teacher_acc: float | None = None
    num_augmented: int = 0


def _source_accuracy(source: TeacherSource, loader: Iterable[Any] | None) -> float | None:
    """Top-1 accuracy (%) of a teacher source on ``loader``'s batches, None without a loader."""
    if loader is None:
        return None
    right = total = 0
    for raw in loader:
        b = as_batch(raw)
        pred = _logits_over(source, b.inputs).argmax(1)
        right += int((pred == b.targets.cpu()).sum())
        total += len(pred)
    return 100.0 * right / max(1, total)


def _train_teacher(student: Any, x: Tensor, y: Tensor, loss: Callable[[Tensor, Tensor], Tensor], what: str,
                   epochs: int, batch_size: int, seed: int, progress: bool, run_dir: Path | None,
                   opt: dict[str, Any]) -> nn.Module:
    model = _new_model(student, seed)  # a fresh model of the factory, or a re-initialised copy of the module
    train_in_memory(model, x, y, loss, epochs=epochs, batch_size=batch_size, seed=seed, progress=progress, what=what,
                    run_dir=run_dir, **opt)
    return model.eval()


@register_strategy("kddaug", "transfer", KDDAUG)
def fit_kddaug(
    student: nn.Module | Callable[[], nn.Module],
    train_loader: Any,
    val_loader: Iterable[Any] | None = None,
    *,
    teacher: Any = None,
    ood_teacher: Any = None,
    epochs: int,
    teacher_epochs: int | None = None,
    num_classes: int | None = None,
    run_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    labels: str = "teacher",
    augment_ratio: float = 1.0,
    mix_alpha: float = 1.0,
    tau: float = 1.0,
    batch_size: int | None = None,
    **fit_kwargs: Any,
) -> KDDAugResult:
    """KDDAug: composed samples labelled by the ID and OOD teachers' weighted soft predictions; student on both.

    Chen, Zheng, Xiao, ECCV 2022, arXiv 2207.08739 (see the module docstring for our image stand-in).

    Args:
        student: the model to train, or a zero-argument factory (teachers trained here are fresh models of
            the factory, or re-initialised copies of the module).
        train_loader: the (biased, e.g. long-tailed) training data in memory (an InMemoryLoader, TensorData
            or ``(x, y)``).
        val_loader: the evaluation data (balanced: the distribution-shifted test), per-epoch accuracy.
        teacher: the ID teacher (a model or teacher source); None trains one with cross-entropy.
        ood_teacher: the OOD (debiased) teacher; None trains one with logit-adjusted cross-entropy (``tau``).
        teacher_epochs: epochs of each teacher trained here (default ``epochs``).
        labels: ``"teacher"`` (KDDAug), ``"heuristic"`` (mixup's labels), ``"id_teacher"`` or
            ``"ood_teacher"`` (one teacher's soft predictions: the paper's single-teacher ablations).
        augment_ratio: composed samples per training sample (1.0: as many as the training set; ours).
        mix_alpha: α of the Beta(α, α) mixing coefficient (1.0, uniform; ours).
        batch_size, fit_kwargs: the loop's batch size (default: the loader's) and optimizer (``optimizer``,
            ``lr``, ``momentum``, ``weight_decay``; constant learning rate).

    Returns: a :class:`KDDAugResult` (the student's history on ``val_loader``, both teachers' accuracy).
    """
    if labels not in LABELS:
        raise ValueError(f"labels must be one of {LABELS}; got {labels!r}")
    for name, value in (("augment_ratio", augment_ratio), ("mix_alpha", mix_alpha), ("tau", tau)):
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
            raise ValueError(f"{name} must be a number > 0; got {value!r}")
    opt = own_loop_kwargs(fit_kwargs, "kddaug")
    x, y, settings = in_memory_tensors(train_loader, "kddaug")
    if y is None or y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"kddaug needs labelled training data, targets (N,); got {None if y is None else tuple(y.shape)}")
    k = int(num_classes) if num_classes is not None else int(y.max()) + 1
    bs = int(batch_size or settings.get("batch_size", 64))
    counts = torch.bincount(y, minlength=k).float()
    if (counts == 0).any():
        raise ValueError(f"every class needs a training sample (the prior's log is taken); classes "
                         f"{(counts == 0).nonzero().flatten().tolist()} have none")
    prior = counts / counts.sum()
    run = None if run_dir is None else Path(run_dir)
    t_epochs = teacher_epochs or epochs
    if teacher is None:
        teacher = _train_teacher(student, x, y, F.cross_entropy, "kddaug ID teacher", t_epochs, bs, seed + 1, progress,
                                 None if run is None else run / "id_teacher", opt)
    if ood_teacher is None:
        ood_teacher = _train_teacher(student, x, y, lambda z, t: DF.logit_adjusted_cross_entropy(z, t, prior, tau),
                                     "kddaug OOD teacher", t_epochs, bs, seed + 2, progress,
                                     None if run is None else run / "ood_teacher", opt)
    id_src, ood_src = as_teacher_source(teacher), as_teacher_source(ood_teacher)
    x_aug, soft = augmented_set(x, y, id_src, ood_src, num_classes=k, prior=prior, labels=labels,
                                n=max(1, round(augment_ratio * x.shape[0])), alpha=mix_alpha, seed=seed)
    inputs = torch.cat([x, x_aug.to(x.dtype)])
    targets = torch.cat([F.one_hot(y, k).float(), soft])
    model = as_model(student, "kddaug")
    result = train_in_memory(model, inputs, targets, DF.soft_cross_entropy, epochs=epochs, batch_size=bs,
                             seed=seed, progress=progress, what="kddaug student", val_loader=val_loader, run_dir=run, **opt)
    return KDDAugResult(**vars(result), id_teacher_acc=_source_accuracy(id_src, val_loader),
                        ood_teacher_acc=_source_accuracy(ood_src, val_loader), num_augmented=x_aug.shape[0])
