r"""A small self-supervised pre-training (SimCLR) for the teachers of self-supervised distillation.

BINGO (:mod:`distill.strategies.bingo`) distils a teacher that was itself trained without labels.
The zoo has no such teacher, and nothing may be downloaded, so :func:`pretrain_simclr` makes one on
the training images: "A Simple Framework for Contrastive Learning of Visual Representations"
(T. Chen, S. Kornblith, M. Norouzi, G. Hinton, ICML 2020, arXiv 2002.05709): two random views of
each image, an MLP projection head, NT-Xent (:func:`~distill.functional.nt_xent_loss`) over the
batch's ``2B`` embeddings. It is a helper, not a registered strategy.

Departures (all ours, for small grayscale images on a CPU): the augmentation is a random resized crop
(scale 0.2–1, aspect 3/4–4/3), a horizontal flip and a brightness/contrast jitter (no colour, no blur:
grayscale 28×28 images); Adam (lr 1e-3) instead of LARS at batch 4096; temperature 0.5 (the paper's
CIFAR-10 value as we recall it; its appendix was not re-read here); projection ``D → 512 → 128``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill import functional as DF
from distill.batch import Batch, View
from distill.distiller import Distiller
from distill.methods.base import Method
from distill.strategies.bingo import BagLoader, _gather, classifier_input
from distill.train.loop import FitResult, fit

__all__ = ["NTXent", "SimCLRAugment", "SimCLRResult", "pretrain_simclr"]


class SimCLRAugment:
    """A random view of ``(B, C, H, W)`` images: resized crop, horizontal flip, brightness/contrast jitter.

    Each sample draws its own crop (area ``scale`` of the image, aspect ``ratio``, uniform position),
    resampled bilinearly to the full size; a flip with probability ``flip``; with probability
    ``jitter_p`` the image becomes ``(x - m)·c + m + b`` with ``m`` its mean, ``c ~ U(1 - s, 1 + s)`` and
    ``b ~ U(-s, s)·std(x)``, ``s = jitter``.
    """

    def __init__(self, scale: tuple[float, float] = (0.2, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 flip: float = 0.5, jitter: float = 0.4, jitter_p: float = 0.8) -> None:
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < low <= high, got {ratio}")
        for name, p in (("flip", flip), ("jitter_p", jitter_p)):
            if not 0 <= p <= 1:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
        self.scale, self.ratio, self.flip, self.jitter, self.jitter_p = scale, ratio, flip, jitter, jitter_p

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"SimCLRAugment needs (B, C, H, W) images, got {tuple(x.shape)}")
        b = x.shape[0]

        def u(low: float, high: float) -> Tensor:
            return low + (high - low) * torch.rand(b, generator=generator)

        area = u(*self.scale)
        aspect = torch.exp(u(math.log(self.ratio[0]), math.log(self.ratio[1])))
        sw, sh = (area * aspect).sqrt().clamp(max=1.0), (area / aspect).sqrt().clamp(max=1.0)
        tx, ty = (1 - sw) * u(-1.0, 1.0), (1 - sh) * u(-1.0, 1.0)  # the crop stays inside the image
        flip = torch.where(torch.rand(b, generator=generator) < self.flip, -1.0, 1.0)
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sw * flip, tx, sh, ty
        grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        on = (torch.rand(b, generator=generator) < self.jitter_p).to(x).view(b, 1, 1, 1)
        c = u(1 - self.jitter, 1 + self.jitter).to(x).view(b, 1, 1, 1)
        shift = u(-self.jitter, self.jitter).to(x).view(b, 1, 1, 1)
        m = out.mean((1, 2, 3), keepdim=True)
        s = out.std((1, 2, 3), keepdim=True)
        return out + on * ((out - m) * (c - 1) + shift * s)

    def __repr__(self) -> str:
        return (f"SimCLRAugment(scale={self.scale}, ratio={self.ratio}, flip={self.flip}, jitter={self.jitter}, "
                f"jitter_p={self.jitter_p})")


class NTXent(Method):
    """SimCLR's loss on a batch whose inputs stack two views of ``B`` images ``(2·B, ...)``: the feature
    ``feature`` ``(2·B, D)`` through a projection MLP ``D → hidden → out_dim`` (built by :meth:`prepare`),
    then :func:`~distill.functional.nt_xent_loss` of the two halves."""

    name = "nt_xent"
    needs_teacher = False
    requires_prepare = True

    def __init__(self, feature: str = "head:input", *, tau: float = 0.5, hidden: int = 512, out_dim: int = 128,
                 weight: float = 1.0) -> None:
        super().__init__(weight=weight)
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau!r}")
        self.feature, self.tau, self.hidden, self.out_dim = feature, float(tau), int(hidden), int(out_dim)
        self.student_taps = [feature]
        self.projector: nn.Module | None = None

    def prepare(self, student_view: View, teacher_view: View | None, batch: Batch) -> None:
        if self.projector is None:
            h = student_view[self.feature]
            self.projector = nn.Sequential(nn.Linear(h.shape[1], self.hidden), nn.ReLU(),
                                           nn.Linear(self.hidden, self.out_dim)).to(h)

    def forward(self, student_view: View, teacher_view: View | None, batch: Batch) -> Tensor:
        if self.projector is None:
            raise RuntimeError("NTXent.prepare() must be called on an example batch before the first forward")
        h = student_view[self.feature]
        if h.dim() != 2 or h.shape[0] % 2:
            raise ValueError(f"NTXent needs a pooled feature of two stacked views (2B, D), got {tuple(h.shape)}")
        z = self.projector(h)
        b = h.shape[0] // 2
        return DF.nt_xent_loss(z[:b], z[b:], self.tau)


@dataclass
class SimCLRResult(FitResult):
    """``fit``'s result of the pre-training plus the pre-trained model."""

    model: nn.Module | None = None


def pretrain_simclr(model: nn.Module, train_loader: Iterable[Any], *, epochs: int, batch_size: int = 256,
                    tau: float = 0.5, feature: str | None = None, hidden: int = 512, out_dim: int = 128,
                    augment: Any = None, seed: int = 0, progress: bool = True, **fit_kwargs: Any) -> SimCLRResult:
    """Pre-train ``model`` (in place) with SimCLR on the images of ``train_loader`` (labels are ignored).

    Args:
        model: the encoder; its pooled ``feature`` (default the input of its classifier,
            :func:`~distill.strategies.bingo.classifier_input`) is what the projection head reads.
        train_loader: the images (an ``InMemoryLoader``'s tensors are used directly, any other loader
            is read once).
        epochs, batch_size: the training length and the images per batch (``2·batch_size`` views).
        tau, hidden, out_dim: NT-Xent's temperature and the projection head.
        augment: a ``callable(x, generator) -> x``; default :class:`SimCLRAugment`.
        seed, progress, **fit_kwargs: passed to :func:`distill.fit`; defaults Adam, lr 1e-3, weight decay
            1e-6, cosine schedule (ours).

    Returns:
        a :class:`SimCLRResult` (the history holds ``train_nt_xent`` per epoch).
    """
    images, _ = _gather(train_loader)
    feature = feature or classifier_input(model)
    bags = torch.arange(images.shape[0]).unsqueeze(1)  # each image's only "neighbour" is itself: two views
    loader = BagLoader(images, bags, min(batch_size, images.shape[0]), augment=augment or SimCLRAugment(),
                       cutmix=False, seed=seed)
    for key, value in (("optimizer", "adam"), ("lr", 1e-3), ("weight_decay", 1e-6), ("schedule", "cosine")):
        fit_kwargs.setdefault(key, value)
    distiller = Distiller(model, None, {"nt_xent": NTXent(feature, tau=tau, hidden=hidden, out_dim=out_dim)})
    result = fit(distiller, loader, None, epochs=epochs, seed=seed, progress=progress, eval_teacher=False,
                 **fit_kwargs)
    return SimCLRResult(history=result.history, best_acc=result.best_acc, best_epoch=result.best_epoch,
                        last_acc=result.last_acc, run_dir=result.run_dir, time_s=result.time_s, model=model)
