"""pix2pix training of an image-to-image generator, with or without distillation from a teacher generator.

pix2pix (Isola et al., "Image-to-Image Translation with Conditional Adversarial Networks", CVPR 2017,
arXiv 1611.07004): the generator ``G`` minimises ``L_GAN + lambda_L1 * mean |G(x) - y|`` with
``lambda_L1 = 100``, where ``L_GAN = BCE(D(x, G(x)), 1)`` (the non-saturating form); the conditional
PatchGAN ``D`` minimises ``(BCE(D(x, y), 1) + BCE(D(x, G(x)), 0)) / 2``; both Adam, lr 2e-4,
betas (0.5, 0.999). These are the pix2pix paper's settings.

Distillation adds ``kd_weight * L_KD(G(x), T(x))`` to the generator's loss, ``T`` the frozen teacher
generator (eval mode, no gradient):

* ``kd="wavelet"``: Wavelet KD (Zhang et al. CVPR 2022, arXiv 2203.06321;
  :class:`~distill.methods.wavelet_kd.WaveletKD`), the high-frequency wavelet bands only;
* ``kd="l1"``: plain output distillation, ``mean |G(x) - T(x)|`` (the baseline the paper improves on).

``kd_weight`` (default 100, the same weight as pix2pix's L1 to the ground truth: the teacher's output
is treated as a second target) is ours: the paper's value could not be read here.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.methods.wavelet_kd import WaveletKD
from distill.synthesis.progress import StepProgress
from distill.train.generative_eval import psnr

__all__ = ["Img2ImgResult", "evaluate_img2img", "predict_images", "train_img2img"]

KD_KINDS = (None, "wavelet", "l1")


@dataclass
class Img2ImgResult:
    """What :func:`train_img2img` returns: the final validation measures (None without validation
    pairs), one dict per evaluation in ``history``, training time in seconds."""

    psnr: float | None = None
    l1: float | None = None
    time_s: float = 0.0
    steps: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


@torch.no_grad()
def predict_images(generator: nn.Module, source: Tensor, batch_size: int = 256) -> Tensor:
    """``generator(source)`` in eval mode, by batches; the generator's mode is restored afterwards."""
    was = generator.training
    generator.eval()
    try:
        return torch.cat([generator(source[i:i + batch_size]) for i in range(0, source.shape[0], batch_size)])
    finally:
        generator.train(was)


def evaluate_img2img(generator: nn.Module, source: Tensor, target: Tensor, batch_size: int = 256) -> dict[str, float]:
    """``{"psnr": psnr(G(x), y), "l1": mean |G(x) - y|}`` on pairs ``(N, C, H, W)`` in [0, 1]; ``psnr`` is
    :func:`distill.train.generative_eval.psnr` (``10 log10(1 / MSE)``, MSE over every pixel of the set)."""
    pred = predict_images(generator, source, batch_size)
    return {"psnr": psnr(pred, target), "l1": float((pred - target).abs().mean())}


def _check_pairs(source: Tensor, target: Tensor, what: str) -> None:
    if source.dim() != 4 or target.dim() != 4 or source.shape[0] != target.shape[0] or source.shape[0] == 0:
        raise ValueError(f"train_img2img: {what} must be (source, target) tensors (N, C, H, W) with the same N > 0; "
                         f"got {tuple(source.shape)} and {tuple(target.shape)}")


def train_img2img(generator: nn.Module, source: Tensor, target: Tensor, *, teacher: nn.Module | None = None,
                  kd: str | None = None, kd_weight: float = 100.0, wavelet_levels: int = 4,
                  discriminator: nn.Module | None = None, l1_weight: float = 100.0, gan_weight: float = 1.0,
                  steps: int = 2000, batch_size: int = 64, lr: float = 2e-4, betas: tuple[float, float] = (0.5, 0.999),
                  val: tuple[Tensor, Tensor] | None = None, eval_every: int = 0, seed: int = 0,
                  progress: bool = True) -> Img2ImgResult:
    """Train ``generator`` on pairs ``source -> target`` with pix2pix's loss, plus ``kd`` from ``teacher``.

    Args:
        generator: maps ``(B, C_in, H, W)`` in [0, 1] to ``(B, C_out, H, W)`` in [0, 1] (e.g. the zoo's
            ``unet_img2img_student``); trained in place.
        source, target: the training pairs ``(N, C_in, H, W)`` / ``(N, C_out, H, W)`` in [0, 1].
        teacher: the trained teacher generator (same input and output shapes), needed when ``kd`` is set.
        kd: ``None``, ``"wavelet"`` (Wavelet KD) or ``"l1"`` (plain output L1 KD).
        kd_weight: the distillation term's weight (ours, see the module docstring).
        wavelet_levels: levels of Wavelet KD's decomposition (the authors' code: 4).
        discriminator: the conditional discriminator ``D(source, image)`` -> logits (any shape); default
            the zoo's ``patchgan`` for these channel counts. Not built when ``gan_weight`` is 0.
        l1_weight: pix2pix's ``lambda_L1`` (100).
        gan_weight: the adversarial term's weight (1; 0 trains by regression only).
        steps, batch_size, lr, betas: Adam for both networks (pix2pix: lr 2e-4, betas (0.5, 0.999)).
        val: validation pairs ``(source, target)``, evaluated every ``eval_every`` steps (0: only at the end).
        seed: for the batch order and the discriminator's initialisation.
        progress: a progress bar.
    Returns: an :class:`Img2ImgResult`.
    """
    if kd not in KD_KINDS:
        raise ValueError(f"train_img2img: kd must be one of {KD_KINDS}; got {kd!r}")
    if kd is not None and not isinstance(teacher, nn.Module):
        raise ValueError(f"train_img2img: kd={kd!r} needs a trained teacher generator (teacher=...); got {teacher!r}")
    for name, value in (("kd_weight", kd_weight), ("l1_weight", l1_weight), ("gan_weight", gan_weight)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"train_img2img: {name} must be a finite number >= 0; got {value!r}")
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"train_img2img: {name} must be a positive int; got {value!r}")
    _check_pairs(source, target, "the training pairs")
    if val is not None:
        _check_pairs(*val, "val")
    torch.manual_seed(seed)
    device = next(generator.parameters()).device
    if gan_weight > 0 and discriminator is None:
        from distill.models.img2img import PatchDiscriminator

        discriminator = PatchDiscriminator(source.shape[1] + target.shape[1]).to(device)
    wkd = WaveletKD(levels=wavelet_levels) if kd == "wavelet" else None
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    opt_g = torch.optim.Adam(generator.parameters(), lr=lr, betas=betas)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=lr, betas=betas) if gan_weight > 0 else None
    gen = torch.Generator().manual_seed(seed)
    n = source.shape[0]
    order = torch.randperm(n, generator=gen)
    cursor = 0
    result = Img2ImgResult()
    generator.train()
    start = time.perf_counter()
    with StepProgress(progress, f"pix2pix{' + ' + kd + ' KD' if kd else ''}", steps) as bar:
        for step in range(1, steps + 1):
            if cursor + batch_size > n:
                order, cursor = torch.randperm(n, generator=gen), 0
            idx = order[cursor:cursor + batch_size]
            cursor += batch_size
            x, y = source[idx].to(device), target[idx].to(device)
            fake = generator(x)
            parts: dict[str, float] = {}
            if opt_d is not None:
                assert discriminator is not None
                d_real, d_fake = discriminator(x, y), discriminator(x, fake.detach())
                loss_d = 0.5 * (F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real))
                                + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake)))
                opt_d.zero_grad(set_to_none=True)
                loss_d.backward()
                opt_d.step()
                parts["d"] = float(loss_d.detach())
            loss_g = l1_weight * (fake - y).abs().mean()
            if opt_d is not None:
                assert discriminator is not None
                d_gen = discriminator(x, fake)
                loss_g = loss_g + gan_weight * F.binary_cross_entropy_with_logits(d_gen, torch.ones_like(d_gen))
            if kd is not None:
                assert teacher is not None
                with torch.no_grad():
                    t_out = teacher(x)
                if wkd is not None:
                    kd_loss = wkd({"logits": fake}, {"logits": t_out}, None)  # type: ignore[arg-type]
                else:
                    kd_loss = (fake - t_out).abs().mean()
                loss_g = loss_g + kd_weight * kd_loss
                parts["kd"] = float(kd_loss.detach())
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
            parts["g"] = float(loss_g.detach())
            if val is not None and ((eval_every and step % eval_every == 0) or step == steps):
                measures = evaluate_img2img(generator, val[0].to(device), val[1].to(device))
                result.history.append({"step": step, **measures, **parts})
            bar.advance(" ".join(f"{k}={v:.3f}" for k, v in parts.items()))
    result.time_s = time.perf_counter() - start
    result.steps = steps
    if result.history:
        result.psnr, result.l1 = result.history[-1]["psnr"], result.history[-1]["l1"]
    return result
