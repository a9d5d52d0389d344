"""Function matching: the teacher and the student see the very same aggressively augmented (mixed-up) view.

Paper: L. Beyer, X. Zhai, A. Royer, L. Markeeva, R. Anil, A. Kolesnikov, "Knowledge distillation: A good
teacher is patient and consistent", CVPR 2022, arXiv 2106.05237.

The student minimises ``KL(softmax(t(v)/T) ‖ softmax(s(v)/T))`` only (no labels) on views ``v`` of the training
images; the paper's Figure compares four ways of making the teacher's and the student's inputs
(``mode``):

* ``fixed_teacher``: the teacher's predictions are on the un-augmented image (a fixed target, what a
  precomputed-logit pipeline gives), the student sees a random crop of it;
* ``independent_noise``: teacher and student each see their own random crop of the image;
* ``consistent``: both see the same random crop ("consistent teaching");
* ``function_matching``: both see the same random crop, mixed up with another image of the batch.

The paper's claim is that the consistent modes, function matching first, keep improving with a *patient*
(long) schedule where the others saturate or overfit.

Views: :class:`RandomResizedCrop` (an inception-style crop: area fraction and aspect ratio drawn per sample,
resized back to ``H x W`` by bilinear sampling) with a left-right flip, then (``function_matching``) mixup.
Defaults are the authors' big_vision configuration for the paper (``configs/proj/distill/bigsweep_flowers_pet.py``;
the experiment section could not be read here): KL distance with temperature ``T = 1``, mixup with
``p = 1.0`` (one ratio per batch from ``Beta(1, 1)``, the partner the batch rolled by one), Adam with
gradient clipping 1.0 and a cosine schedule (set these through ``fit`` keywords: ``optimizer="adam"``,
``grad_clip=1.0``, ``schedule="cosine"``). Ours: the crop's area range ``(0.25, 1)`` for 28 x 28 images (the
inception crop's 5% minimum destroys a 28-pixel digit or garment). The KL carries our ``T²`` factor
(:func:`distill.functional.kd_loss`); the authors' has none, equal at ``T = 1``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.batch import Batch, View
from distill.data.augment import Augment, mix_seed
from distill.data.loader import InMemoryLoader, in_memory_tensors
from distill.distiller import Distiller
from distill.methods.base import create_method
from distill.papers import Paper
from distill.strategies.registry import as_model, register_strategy
from distill.teachers import FrozenTeacher
from distill.train import FitResult, fit

__all__ = ["FM_MODES", "FUNCTION_MATCHING_PAPER", "FunctionMatchingViews", "RandomResizedCrop", "ViewBatch",
           "ViewTeacher", "fit_function_matching"]

FUNCTION_MATCHING_PAPER = Paper("Knowledge distillation: A good teacher is patient and consistent",
                                "L. Beyer, X. Zhai, A. Royer, L. Markeeva, R. Anil, A. Kolesnikov", 2022,
                                "2106.05237", "CVPR")
FM_MODES = ("fixed_teacher", "independent_noise", "consistent", "function_matching")


class RandomResizedCrop(Augment):
    """A random crop of area fraction ``a ~ U(scale)`` and aspect ratio ``r`` (``log r ~ U(log ratio)``), resized
    back to the input's ``H x W`` (bilinear), mirrored left-right with probability ``flip``.

    Params ``(B, 4)``: ``(sx, sy, cx, cy)`` in ``[-1, 1]`` normalised coordinates: the crop's half-width
    ``|sx|`` and half-height ``sy`` as fractions of the image's (``sx < 0``: mirrored) and its centre. The
    output pixel at normalised ``(u, v)`` samples the input at ``(cx + sx·u, cy + sy·v)``.
    """

    def __init__(self, scale: tuple[float, float] = (0.25, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 flip: float = 0.5) -> None:
        lo, hi = (float(v) for v in scale)
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"RandomResizedCrop scale must be (lo, hi) with 0 < lo <= hi <= 1; got {scale!r}")
        rlo, rhi = (float(v) for v in ratio)
        if not 0.0 < rlo <= rhi:
            raise ValueError(f"RandomResizedCrop ratio must be (lo, hi) with 0 < lo <= hi; got {ratio!r}")
        if not 0.0 <= float(flip) <= 1.0:
            raise ValueError(f"RandomResizedCrop flip must be a probability in [0, 1]; got {flip!r}")
        self.scale, self.ratio, self.flip = (lo, hi), (rlo, rhi), float(flip)

    def sample_params(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        u = torch.rand(batch_size, 5, generator=generator, dtype=torch.float64)
        area = self.scale[0] + (self.scale[1] - self.scale[0]) * u[:, 0]
        log_r = math.log(self.ratio[0]) + (math.log(self.ratio[1]) - math.log(self.ratio[0])) * u[:, 1]
        sx = torch.sqrt(area * torch.exp(log_r)).clamp(max=1.0)
        sy = torch.sqrt(area / torch.exp(log_r)).clamp(max=1.0)
        cx, cy = (1 - sx) * (2 * u[:, 2] - 1), (1 - sy) * (2 * u[:, 3] - 1)
        sign = torch.where(u[:, 4] < self.flip, -1.0, 1.0).to(torch.float64)
        return torch.stack([sx * sign, sy, cx, cy], 1).float()

    def apply(self, x: Tensor, params: Tensor) -> Tensor:
        if x.dim() != 4 or params.shape != (x.shape[0], 4):
            raise ValueError(f"RandomResizedCrop: x must be (B, C, H, W) and params (B, 4); got {tuple(x.shape)} "
                             f"and {tuple(params.shape)}")
        p = params.to(device=x.device, dtype=x.dtype)
        zero = torch.zeros_like(p[:, 0])
        theta = torch.stack([torch.stack([p[:, 0], zero, p[:, 2]], 1), torch.stack([zero, p[:, 1], p[:, 3]], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def __repr__(self) -> str:
        return f"RandomResizedCrop(scale={self.scale}, ratio={self.ratio}, flip={self.flip})"


@dataclass
class ViewBatch(Batch):
    """A :class:`~distill.batch.Batch` whose teacher sees ``teacher_inputs`` (same shape as ``inputs``)."""

    teacher_inputs: Tensor | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ViewBatch:
        moved = super().to(device, non_blocking)
        t = None if self.teacher_inputs is None else self.teacher_inputs.to(device, non_blocking=non_blocking)
        return replace(moved, teacher_inputs=t)


class ViewTeacher(FrozenTeacher):
    """A frozen teacher that reads a :class:`ViewBatch`'s ``teacher_inputs`` (any other batch: its inputs)."""

    kind = "view"

    def forward(self, batch: Batch) -> View:
        t = getattr(batch, "teacher_inputs", None)
        if t is not None:
            batch = Batch(t, batch.targets, batch.index)
        return super().forward(batch)


class FunctionMatchingViews:
    """``fit``'s ``batch_transform``: clean images in, a :class:`ViewBatch` (student view, teacher view) out.

    Each batch's randomness is a pure function of ``(seed, epoch, step)``. ``mixup_p`` is the Beta
    parameter of the mixing ratio (``function_matching`` only); the partner of sample ``i`` is sample
    ``i - 1`` of the batch (rolled).
    """

    def __init__(self, mode: str, crop: Augment, mixup_p: float = 1.0, seed: int = 0) -> None:
        if mode not in FM_MODES:
            raise ValueError(f"function_matching: mode must be one of {FM_MODES}; got {mode!r}")
        if not (isinstance(mixup_p, (int, float)) and mixup_p > 0):
            raise ValueError(f"function_matching: mixup_p (the Beta parameter) must be > 0; got {mixup_p!r}")
        self.mode, self.crop, self.mixup_p, self.seed = mode, crop, float(mixup_p), seed
        self.epoch, self.step = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.step = epoch, 0

    def __call__(self, batch: Batch) -> ViewBatch:
        seed = mix_seed(self.seed, self.epoch, self.step)
        self.step += 1
        g = torch.Generator().manual_seed(seed)
        x = batch.inputs
        student = self.crop.apply(x, self.crop.sample_params(x.shape[0], g))
        if self.mode == "fixed_teacher":
            teacher = x
        elif self.mode == "independent_noise":
            teacher = self.crop.apply(x, self.crop.sample_params(x.shape[0], g))
        else:
            if self.mode == "function_matching":
                lam = float(np.random.default_rng(seed).beta(self.mixup_p, self.mixup_p))
                student = lam * student + (1.0 - lam) * student.roll(1, 0)
            teacher = student
        return ViewBatch(student, batch.targets, batch.index, teacher_inputs=teacher)


@register_strategy("function_matching", "augmentation", FUNCTION_MATCHING_PAPER)
def fit_function_matching(
    student: Any,
    train_loader: Any,
    val_loader: Iterable[Any] | None = None,
    *,
    teacher: nn.Module,
    epochs: int,
    mode: str = "function_matching",
    T: float = 1.0,
    mixup_p: float = 1.0,
    crop_scale: tuple[float, float] = (0.25, 1.0),
    flip: float = 0.5,
    seed: int = 0,
    progress: bool = True,
    run_dir: str | Path | None = None,
    **fit_kwargs: Any,
) -> FitResult:
    """Distil with KL only on views built by ``mode`` (module docstring; Beyer et al., CVPR 2022, arXiv
    2106.05237), through :func:`distill.fit`.

    Args:
        student: the student (a module or a zero-argument factory).
        train_loader: in-memory training images (labels, if any, are not used for training); the strategy
            draws its own views, so the loader must not augment.
        val_loader: evaluation.
        teacher: the trained teacher (frozen, eval mode).
        epochs: the schedule's length (the paper's "patience").
        mode: one of :data:`FM_MODES`.
        T: the KL's temperature.
        mixup_p: mixup's Beta parameter (``function_matching``).
        crop_scale, flip: :class:`RandomResizedCrop`'s area range and flip probability (``flip=0`` for digits).
        **fit_kwargs: :func:`distill.fit`'s (optimizer, lr, schedule, grad_clip...).
    """
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"function_matching needs teacher= (a trained nn.Module); got {type(teacher).__name__}")
    crop = RandomResizedCrop(tuple(crop_scale), flip=flip)
    views = FunctionMatchingViews(mode, crop, mixup_p, seed)
    kd = create_method("kd", T=T)
    x, y, settings = in_memory_tensors(train_loader, "function_matching")
    if settings.get("augment") is not None:
        raise ValueError("function_matching draws its own views (crop, flip, mixup) for teacher and student: the "
                         "training loader must not augment (remove data.augment)")
    if x.dim() != 4:
        raise ValueError(f"function_matching augments images (N, C, H, W); got inputs {tuple(x.shape)}")
    loader = InMemoryLoader(x, y, int(settings.get("batch_size", 64)), seed=int(settings.get("seed", seed)),
                            return_index=True)
    torch.manual_seed(seed)  # a factory's initialisation follows the seed
    d = Distiller(as_model(student, "function_matching"), ViewTeacher(teacher), {"kd": kd})
    return fit(d, loader, val_loader, epochs=epochs, run_dir=run_dir, seed=seed, progress=progress,
               batch_transform=views, **fit_kwargs)
