r"""BINGO: self-supervised distillation by aggregating bags of related instances.

Paper: H. Xu, J. Fang, X. Zhang, L. Xie, X. Wang, W. Dai, H. Xiong, Q. Tian, "Bag of Instances
Aggregation Boosts Self-supervised Distillation", ICLR 2022, arXiv 2107.01691; authors' code
github.com/haohang96/bingo. Only the abstract of the paper could be read here; the procedure and
every default below come from the authors' code unless marked "ours".

1. A frozen (self-supervised) teacher embeds the whole unlabeled training set; each sample's bag is
   its ``k`` nearest neighbours by cosine similarity (:func:`~distill.functional.knn_bags`; ``k=5``:
   ``--clus_pos_num=5``).
2. Each step draws, for every anchor of the batch, one member of its bag uniformly (the code's
   ``np.random.choice(imgs_corr[index])``), two augmented views of each (a student view and a
   teacher view), and the CutMix of the two student views (share ``λ ~ Beta(2, 2)``, one box per
   batch, as the code's ``cutmix``).
3. The student (with a projection MLP, built on the first batch) is trained with
   :func:`~distill.functional.bingo_loss` (temperature 0.2, own/other key weights 0.5/0.5 after the
   first 11 epochs, 1/0 before: the code's ``epoch > 10``), negatives from a queue of past teacher
   anchor keys (MoCo's queue; the code's 65536 for ImageNet, ours 4096 by default), with SGD
   (lr 0.03 at batch 256, momentum 0.9, weight decay 1e-4, cosine schedule, 200 epochs: the code's
   ``SR18-TR50.sh``).

Departures: the teacher's key is the normalised teacher feature that defines the bags (the code's
teacher is a MoCo model whose 128-d projection head gives the keys and whose pre-``fc`` feature
gives the bags); the student's projector maps to that feature's width. The student runs once on the
concatenated anchor, member and CutMix views (the code runs it three times): identical for
LayerNorm ViTs; a BatchNorm student normalises over all three together. Augmentations are ours
(random crop with padding and horizontal flip by default), not MoCo v2's ImageNet set.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from distill import functional as DF
from distill.batch import Batch, View, as_batch
from distill.data.augment import Compose, RandomCropPad, RandomHorizontalFlip, mix_seed
from distill.data.loader import InMemoryLoader
from distill.distiller import Distiller
from distill.methods.base import Method, Paper
from distill.strategies.chain import ModelSpec, build_model, check_model_spec
from distill.strategies.registry import register_strategy
from distill.teachers import FrozenTeacher
from distill.train import distributed as D
from distill.train.loop import FitResult, fit
from distill.train.probe import classifier_input, extract_features, linear_probe

__all__ = ["BagBatch", "BagLoader", "BagTeacher", "BingoLoss", "BingoResult", "bingo", "classifier_input", "teacher_bags"]

PAPER = Paper(
    title="Bag of Instances Aggregation Boosts Self-supervised Distillation",
    authors="H. Xu, J. Fang, X. Zhang, L. Xie, X. Wang, W. Dai, H. Xiong, Q. Tian",
    year=2022,
    arxiv="2107.01691",
    venue="ICLR",
)


@dataclass
class BagBatch(Batch):
    """A BINGO step: ``inputs`` holds the student's views ``(S·B, C, H, W)`` stacked as anchors, bag
    members and (when ``cut_lam`` is set) their CutMix, ``S`` = 3 or 2; ``teacher_inputs`` the teacher's
    views ``(2·B, C, H, W)``: anchors, then members. ``cut_lam``: the anchors' share of the mixed images
    ``(B,)``, or ``None`` without CutMix. ``anchor_index``/``member_index``: data-set positions ``(B,)``."""

    teacher_inputs: Tensor | None = None
    cut_lam: Tensor | None = None
    anchor_index: Tensor | None = None
    member_index: Tensor | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> BagBatch:
        moved = super().to(device, non_blocking=non_blocking)

        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return replace(moved, teacher_inputs=move(self.teacher_inputs), cut_lam=move(self.cut_lam),
                       anchor_index=move(self.anchor_index), member_index=move(self.member_index))


class BagLoader:
    """Batches of anchors, one bag member each, their augmented views and CutMix.

    Args:
        images: the unlabeled training set ``(N, C, H, W)``.
        bags: ``(N, k)`` indices into ``images`` (:func:`~distill.functional.knn_bags`).
        batch_size: anchors per batch (the last incomplete batch is dropped, as the code's loader).
        augment: ``callable(x, generator) -> x`` drawn independently for each of the four views
            (an :class:`~distill.data.augment.Augment`); ``None``: the views are the images.
        cutmix: add the CutMix of the anchor and member student views.
        cutmix_alpha: ``λ ~ Beta(α, α)`` (2: the code's).
        seed: every draw of batch ``j`` of epoch ``e`` is a pure function of ``(seed, e, j)``.
    """

    def __init__(self, images: Tensor, bags: Tensor, batch_size: int, *,
                 augment: Callable[[Tensor, torch.Generator], Tensor] | None = None, cutmix: bool = True,
                 cutmix_alpha: float = 2.0, seed: int = 0) -> None:
        if images.dim() != 4:
            raise ValueError(f"images must be (N, C, H, W), got {tuple(images.shape)}")
        if bags.dim() != 2 or bags.shape[0] != images.shape[0] or bags.dtype != torch.long:
            raise ValueError(f"bags must be (N, k) long with N = {images.shape[0]}, got {tuple(bags.shape)} {bags.dtype}")
        if bags.numel() and (bags.min() < 0 or bags.max() >= images.shape[0]):
            raise ValueError(f"bags index outside [0, {images.shape[0] - 1}]")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= images.shape[0]:
            raise ValueError(f"batch_size must be an int in [1, N = {images.shape[0]}], got {batch_size!r}")
        if not (isinstance(cutmix_alpha, (int, float)) and cutmix_alpha > 0):
            raise ValueError(f"cutmix_alpha must be > 0, got {cutmix_alpha!r}")
        self.images, self.bags, self.batch_size = images, bags, batch_size
        self.augment, self.cutmix, self.cutmix_alpha, self.seed = augment, bool(cutmix), float(cutmix_alpha), int(seed)
        self.epoch = 0

    def __len__(self) -> int:
        return self.images.shape[0] // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _view(self, x: Tensor, g: torch.Generator) -> Tensor:
        return x if self.augment is None else self.augment(x, g)

    def __iter__(self) -> Iterator[BagBatch]:
        n, k = self.bags.shape
        order = torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, 0)))
        for j in range(len(self)):
            g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, 1, j))
            anchors = order[j * self.batch_size:(j + 1) * self.batch_size]
            members = self.bags[anchors, torch.randint(k, (len(anchors),), generator=g)]
            xa, xm = self.images[anchors], self.images[members]
            qa, ka, qm, km = self._view(xa, g), self._view(xa, g), self._view(xm, g), self._view(xm, g)
            student, cut_lam = [qa, qm], None
            if self.cutmix:
                lam = float(np.random.default_rng(mix_seed(self.seed, self.epoch, 2, j)).beta(self.cutmix_alpha,
                                                                                              self.cutmix_alpha))
                mixed, share = DF.cutmix_pair(qa, qm, lam, g)
                student.append(mixed)
                cut_lam = torch.full((len(anchors),), share)
            yield BagBatch(torch.cat(student), None, teacher_inputs=torch.cat([ka, km]), cut_lam=cut_lam,
                           anchor_index=anchors, member_index=members)

    def __repr__(self) -> str:
        return (f"BagLoader(N={self.images.shape[0]}, k={self.bags.shape[1]}, batch_size={self.batch_size}, "
                f"cutmix={self.cutmix}, seed={self.seed}, epoch={self.epoch})")


class BagTeacher(FrozenTeacher):
    """A frozen teacher that sees a :class:`BagBatch` through its ``teacher_inputs``."""

    def forward(self, batch: Batch) -> View:
        inputs = getattr(batch, "teacher_inputs", None)
        return super().forward(batch if inputs is None else replace(batch, inputs=inputs))


class BingoLoss(Method):
    """BINGO's loss on a :class:`BagBatch` (:func:`~distill.functional.bingo_loss`).

    The student's feature ``student_feature`` (``(S·B, D_s)``) passes through a projection MLP
    ``D_s → hidden → D_t`` (ReLU; the code's MoCo v2 head, hidden 2048) built by :meth:`prepare`; the
    teacher's keys are its feature ``teacher_feature`` (``(2·B, D_t)``); both are L2-normalised. A
    queue ``(queue_size, D_t)`` of past teacher anchor keys (random unit vectors at first, as MoCo's)
    gives the negatives; each training step enqueues the batch's anchor keys after its loss.

    Args:
        student_feature, teacher_feature: tap paths of a pooled feature ``(B, D)``.
        tau: temperature (0.2). lam_self, lam_cross: own-key and other-key weights (0.5, 0.5).
        own_key_epochs: the first epochs use weights 1 and 0 instead (11: the code's ``epoch > 10``).
        queue_size: negatives (ours 4096; the code's 65536 on ImageNet).
        hidden: the projector's hidden width (2048, the code's).
    """

    name = "bingo"
    requires_prepare = True

    def __init__(self, student_feature: str = "head:input", teacher_feature: str = "head:input", *, tau: float = 0.2,
                 lam_self: float = 0.5, lam_cross: float = 0.5, own_key_epochs: int = 11, queue_size: int = 4096,
                 hidden: int = 2048, weight: float = 1.0) -> None:
        super().__init__(weight=weight)
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau!r}")
        for label, v in (("lam_self", lam_self), ("lam_cross", lam_cross)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{label} must be a finite number >= 0, got {v!r}")
        for label, v, low in (("own_key_epochs", own_key_epochs, 0), ("queue_size", queue_size, 1),
                              ("hidden", hidden, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{label} must be an int >= {low}, got {v!r}")
        self.student_feature, self.teacher_feature = student_feature, teacher_feature
        self.student_taps, self.teacher_taps = [student_feature], [teacher_feature]
        self.tau, self.lam_self, self.lam_cross = float(tau), float(lam_self), float(lam_cross)
        self.own_key_epochs, self.queue_size, self.hidden = own_key_epochs, queue_size, hidden
        self.projector: nn.Module | None = None
        self.register_buffer("queue", torch.empty(0), persistent=True)
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def _features(self, student_view: View, teacher_view: View, batch: Batch) -> tuple[Tensor, Tensor]:
        s, t = student_view[self.student_feature], teacher_view[self.teacher_feature].detach()
        if s.dim() != 2 or t.dim() != 2:
            raise ValueError(f"BINGO reads pooled features (B, D): student {self.student_feature!r} gave "
                             f"{tuple(s.shape)}, teacher {self.teacher_feature!r} gave {tuple(t.shape)}")
        if getattr(batch, "teacher_inputs", None) is None:
            raise TypeError(f"BINGO trains on BagBatch batches (a BagLoader), got {type(batch).__name__}")
        return s, t

    def prepare(self, student_view: View, teacher_view: View, batch: Batch) -> None:
        if self.projector is not None:
            return
        s, t = self._features(student_view, teacher_view, batch)
        self.projector = nn.Sequential(nn.Linear(s.shape[1], self.hidden), nn.ReLU(),
                                       nn.Linear(self.hidden, t.shape[1])).to(device=s.device, dtype=s.dtype)
        g = torch.Generator().manual_seed(0)
        self.queue = nn.functional.normalize(torch.randn(self.queue_size, t.shape[1], generator=g), dim=1).to(t.device)

    def current_weights(self) -> tuple[float, float]:
        """``(lam_self, lam_cross)`` of the current epoch (1 and 0 during the first ``own_key_epochs``)."""
        if self.epoch is not None and self.epoch < self.own_key_epochs:
            return 1.0, 0.0
        return self.lam_self, self.lam_cross

    @torch.no_grad()
    def _enqueue(self, keys: Tensor) -> None:
        idx = (int(self.queue_ptr) + torch.arange(keys.shape[0], device=keys.device)) % self.queue_size
        self.queue[idx] = nn.functional.normalize(keys.float(), dim=1).to(self.queue.dtype)
        self.queue_ptr.fill_((int(self.queue_ptr) + keys.shape[0]) % self.queue_size)

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        if self.projector is None:
            raise RuntimeError("BingoLoss.prepare() must be called on an example batch before the first forward")
        s, t = self._features(student_view, teacher_view, batch)
        b = t.shape[0] // 2
        cut_lam = getattr(batch, "cut_lam", None)
        if s.shape[0] != (3 if cut_lam is not None else 2) * b:
            raise ValueError(f"the student saw {s.shape[0]} views for {b} anchors; a BagBatch has 2 per anchor, "
                             "3 with CutMix")
        z = self.projector(s)
        lam_self, lam_cross = self.current_weights()
        loss = DF.bingo_loss(z[:b], z[b:2 * b], t[:b], t[b:], self.queue.clone(),
                             s_mix=z[2 * b:] if cut_lam is not None else None, mix_lam=cut_lam, tau=self.tau,
                             lam_self=lam_self, lam_cross=lam_cross)
        if self.training and torch.is_grad_enabled():
            self._enqueue(t[:b])
        return loss

    def extra_repr(self) -> str:
        return (f"student_feature={self.student_feature!r}, teacher_feature={self.teacher_feature!r}, tau={self.tau}, "
                f"lam_self={self.lam_self}, lam_cross={self.lam_cross}, own_key_epochs={self.own_key_epochs}, "
                f"queue_size={self.queue_size}")


def _gather(loader: Iterable[Any]) -> tuple[Tensor, Tensor | None]:
    """The images ``(N, C, H, W)`` and labels ``(N,)`` (or ``None``) of a loader: an ``InMemoryLoader``'s
    tensors as they are (no augmentation), any other loader read once."""
    inputs = getattr(loader, "inputs", None)
    if isinstance(inputs, Tensor) and inputs.dim() == 4:
        targets = getattr(loader, "targets", None)
        return inputs, targets if isinstance(targets, Tensor) else None
    batches = [as_batch(raw) for raw in loader]
    if not batches:
        raise ValueError("the training loader yielded no batch")
    labelled = all(b.targets is not None for b in batches)
    return torch.cat([b.inputs for b in batches]), torch.cat([b.targets for b in batches]) if labelled else None


def teacher_bags(teacher: nn.Module, images: Tensor, k: int = 5, *, feature: str = "head:input",
                 batch_size: int = 512, progress: bool = False) -> Tensor:
    """The frozen teacher's bags of ``images`` ``(N, C, H, W)``: ``(N, k)`` nearest neighbours of each
    sample by cosine similarity of the teacher's ``feature`` (:func:`~distill.functional.knn_bags`)."""
    feats, _ = extract_features(teacher, InMemoryLoader(images, None, batch_size, shuffle=False), features=feature,
                                progress=progress)
    return DF.knn_bags(feats, k)


@dataclass
class BingoResult(FitResult):
    """The student's :class:`~distill.train.FitResult` plus the trained student and the bags used."""

    student: nn.Module | None = None
    bags: Tensor | None = None
    probe: dict[str, Any] | None = None


@register_strategy("bingo", "self-supervised", PAPER)
def bingo(
    student: ModelSpec,
    train_loader: Iterable[Any],
    val_loader: Iterable[Any] | None = None,
    *,
    teacher: nn.Module,
    epochs: int = 200,
    run_dir: str | None = None,
    seed: int = 0,
    progress: bool = True,
    k: int = 5,
    tau: float = 0.2,
    lam_self: float = 0.5,
    lam_cross: float = 0.5,
    own_key_epochs: int = 11,
    queue_size: int = 4096,
    hidden: int = 2048,
    cutmix: bool = True,
    cutmix_alpha: float = 2.0,
    batch_size: int | None = None,
    augment: Callable[[Tensor, torch.Generator], Tensor] | None | str = "default",
    student_feature: str | None = None,
    teacher_feature: str | None = None,
    bags: Tensor | None = None,
    probe: dict[str, Any] | None = None,
    **fit_kwargs: Any,
) -> BingoResult:
    """BINGO: distil a frozen self-supervised teacher into a student without labels, over bags of neighbours.

    Args:
        student: the model (a module, a zero-argument factory, a zoo name or spec).
        train_loader: the training images (labels, if any, are ignored); an ``InMemoryLoader``'s
            tensors are used directly, any other loader is read once.
        val_loader: not used for training. When given, the trained student is evaluated by a linear probe
            (:func:`~distill.train.probe.linear_probe` on ``student_feature``, trained on the training set's
            labelled, unaugmented images): ``last_acc`` and ``best_acc`` are its top-1, ``probe`` its dict.
        teacher: the frozen encoder (any ``nn.Module`` with the ``teacher_feature`` tap).
        epochs: epochs (200: the code's).
        k: bag size (5). tau: temperature (0.2). lam_self, lam_cross, own_key_epochs: see :class:`BingoLoss`.
        queue_size: negatives (ours 4096). hidden: projector width (2048).
        cutmix, cutmix_alpha: the CutMix term and its Beta(α, α) (2).
        batch_size: anchors per batch (each brings a member); default the training loader's ``batch_size``
            (the code's is 256).
        augment: each view's augmentation; ``"default"``: random crop with 4-pixel padding and a horizontal
            flip (ours); ``None``: no augmentation.
        student_feature, teacher_feature: pooled-feature taps; default the input of each model's classifier
            (:func:`classifier_input`: ``"head:input"`` for ViTs, ``"fc:input"`` for CNNs).
        bags: precomputed ``(N, k)`` bags (else the teacher's :func:`teacher_bags`).
        probe: keyword arguments of the linear probe (``epochs``, ``lr``, ``solver``...).
        run_dir, seed, progress, **fit_kwargs: passed to :func:`distill.fit`; defaults: SGD, lr 0.03, momentum
            0.9, weight decay 1e-4, cosine schedule (the code's).

    Returns:
        a :class:`BingoResult`: the fit result (training losses per epoch), the student and the bags.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"bingo needs a frozen teacher nn.Module, got {type(teacher).__name__}")
    if D.dist_info().enabled:  # before any work
        raise RuntimeError("bingo runs in one process: its bag loader and negative queue are not sharded under "
                           "torchrun (WORLD_SIZE > 1)")
    check_model_spec(student, "student")
    model = build_model(student, "student")
    student_feature = student_feature or classifier_input(model, "student")
    teacher_feature = teacher_feature or classifier_input(teacher, "teacher")
    loss = BingoLoss(student_feature, teacher_feature, tau=tau, lam_self=lam_self, lam_cross=lam_cross,
                     own_key_epochs=own_key_epochs, queue_size=queue_size, hidden=hidden)
    images, labels = _gather(train_loader)
    if batch_size is None:
        batch_size = min(int(getattr(train_loader, "batch_size", 256)), images.shape[0])
    if val_loader is not None and labels is None:
        raise ValueError("a val_loader asks for a linear probe, which needs the training set's labels; the training "
                         "loader has none (pass val_loader=None and probe the student yourself)")
    if bags is None:
        bags = teacher_bags(teacher, images, k, feature=teacher_feature, progress=progress)
    elif bags.shape != (images.shape[0], k):
        raise ValueError(f"bags must be (N, k) = ({images.shape[0]}, {k}), got {tuple(bags.shape)}")
    if augment == "default":
        augment = Compose([RandomCropPad(4), RandomHorizontalFlip()])
    elif isinstance(augment, str):
        raise ValueError(f"augment must be 'default', None or a callable (x, generator) -> x, got {augment!r}")
    loader = BagLoader(images, bags, batch_size, augment=augment, cutmix=cutmix, cutmix_alpha=cutmix_alpha, seed=seed)
    distiller = Distiller(model, BagTeacher(teacher), {"bingo": loss})
    for key, value in (("optimizer", "sgd"), ("lr", 0.03), ("momentum", 0.9), ("weight_decay", 1e-4),
                       ("schedule", "cosine")):
        fit_kwargs.setdefault(key, value)
    fit_kwargs.setdefault("eval_teacher", False)
    result = fit(distiller, loader, None, epochs=epochs, run_dir=run_dir, seed=seed, progress=progress, **fit_kwargs)
    out = BingoResult(history=result.history, best_acc=result.best_acc, best_epoch=result.best_epoch,
                      last_acc=result.last_acc, run_dir=result.run_dir, time_s=result.time_s, student=model, bags=bags)
    if val_loader is not None:
        assert labels is not None
        probe_kwargs = {"features": student_feature, "seed": seed, "progress": progress, **(probe or {})}
        out.probe = linear_probe(model, InMemoryLoader(images, labels, 512, shuffle=False), val_loader, **probe_kwargs)
        out.last_acc = out.best_acc = out.probe["top1"]
        out.best_epoch = epochs - 1
    return out
