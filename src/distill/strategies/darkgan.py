"""DarkGAN: a GAN conditioned on a classifier teacher's soft labels (knowledge distillation into a GAN).

Nistal, Lattner, Richard, "DarkGAN: Exploiting Knowledge Distillation for Comprehensible Audio
Synthesis with GANs", ISMIR 2021, arXiv 2108.01216. The paper distils a large audio tagger (PANNs)
into an audio GAN; here the data are **images** (MNIST / Fashion-MNIST) and the teacher an image
classifier trained here, the scheme unchanged:

1. the frozen teacher labels every real training image with its temperature-softened class
   probabilities ``c = softmax(t / T)`` (:func:`~distill.functional.darkgan.darkgan_soft_labels`);
2. the generator ``G(z, c)`` takes ``c`` as its conditioning (our
   :class:`~distill.models.stylegan.StyleGenerator` with ``c_dim = K``);
3. the discriminator has an auxiliary head ``a(x)`` (:class:`AuxDiscriminator`) trained to predict
   ``c`` of real images (:func:`~distill.functional.darkgan.darkgan_discriminator_loss`), and the
   generator is trained so that the head predicts, on ``G(z, c)``, the ``c`` it was given
   (:func:`~distill.functional.darkgan.darkgan_generator_loss`): AC-GAN (Odena et al. 2017) with the
   teacher's soft labels as targets.

Only the abstract could be read here; the loss structure and the defaults are the authors' code
(github SonyCSLParis/DarkGAN: ``gans/base_GAN.py``, ``gans/ac_criterion.py``,
``config_files/darkgan.json``): T = 3 for both the teacher's labels and the head, the
discriminator's conditioning weight 10, the auxiliary term on real data for the discriminator,
each fake batch conditioned on the real batch's soft labels. The generator's conditioning weight
is 1 (ours): the authors' 10 balances a WGAN-GP critic's unbounded loss; against our logistic loss
it made the generator collapse (Fashion-MNIST, width 32, batch 32, seed 0: after 400 steps FID 829
and the teacher's top-1 agreement at chance, 0.106; with 1: a working GAN, see docs). Departures: the GAN is
our small StyleGAN2-like pair trained with StyleGAN2's non-saturating loss, lazy R1, Adam (0, 0.99)
and a generator EMA (:mod:`distill.strategies.gan`'s settings), not the authors' progressive-growing
WGAN-GP on spectrograms; the teacher is single-label, so the conditioning term is the categorical KL
(``form="softmax"``) rather than their per-tag binary cross-entropy (``form="sigmoid"`` is theirs).

``conditioning="onehot"`` (the teacher's top-1 class, or ``labels``, as one-hot vectors; AC-GAN's
cross-entropy at T = 1) and ``conditioning="none"`` (no conditioning, no auxiliary head) run the
same loop: the baselines of ``benchmarks/generative_darkgan.py``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.functional.darkgan import (
    darkgan_condition_agreement,
    darkgan_discriminator_loss,
    darkgan_generator_loss,
    darkgan_soft_labels,
)
from distill.papers import Paper
from distill.progress import StepProgress
from distill.strategies.gan import GANResult, r1_penalty, save_gan_checkpoint, start_gan
from distill.strategies.registry import register_strategy

__all__ = ["DARKGAN_PAPER", "AuxDiscriminator", "DarkGANResult", "darkgan", "darkgan_evaluate", "teacher_soft_labels"]

DARKGAN_PAPER = Paper("DarkGAN: Exploiting Knowledge Distillation for Comprehensible Audio Synthesis with GANs",
                      "Nistal, Lattner, Richard", 2021, "2108.01216", "ISMIR 2021")

_CONDITIONINGS = ("soft", "onehot", "none")


class AuxDiscriminator(nn.Module):
    """A discriminator with an auxiliary classification head (AC-GAN's, DarkGAN's).

    ``backbone`` maps images ``(B, C, H, W)`` to scores ``(B,)`` and computes them with a final
    linear layer named ``feature_module`` (``"out"`` in :class:`~distill.models.stylegan.StyleDiscriminator`);
    the head is a new ``nn.Linear`` reading that layer's input, the penultimate features ``(B, F)``,
    and giving logits ``(B, num_classes)``. ``forward(x)`` returns the scores only (so R1 and any
    plain GAN code use it unchanged); ``forward_with_aux(x)`` returns ``(scores (B,), logits (B, K))``.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, feature_module: str = "out") -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"AuxDiscriminator: num_classes must be a positive int; got {num_classes!r}")
        last = getattr(backbone, feature_module, None)
        if not isinstance(last, nn.Linear):
            raise TypeError(f"AuxDiscriminator: the backbone must compute its scores with an nn.Linear named "
                             f"{feature_module!r} (the head reads its input); got {type(last).__name__}")
        if getattr(backbone, "c_dim", 0):
            raise ValueError(f"AuxDiscriminator: the backbone must be unconditional (c_dim=0); got c_dim="
                             f"{backbone.c_dim}: DarkGAN's discriminator predicts c, it does not take it")
        self.backbone, self.feature_module = backbone, feature_module
        self.head = nn.Linear(last.in_features, num_classes)
        self._features: Tensor | None = None
        last.register_forward_pre_hook(self._keep)

    def _keep(self, _module: nn.Module, args: tuple[Tensor, ...]) -> None:
        self._features = args[0]

    def forward(self, x: Tensor) -> Tensor:
        scores = self.backbone(x)
        self._features = None  # the hook kept them; only forward_with_aux reads them
        return scores

    def forward_with_aux(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._features = None
        scores = self.backbone(x)
        feats, self._features = self._features, None
        if feats is None:
            raise RuntimeError(f"AuxDiscriminator: the backbone did not call its {self.feature_module!r} layer")
        return scores, self.head(feats)


@dataclass
class DarkGANResult(GANResult):
    """:class:`~distill.strategies.gan.GANResult` plus the conditioning: ``conditions`` ``(N, K)`` the
    vectors the training images were labelled with (None for ``"none"``), ``conditioning``, ``temperature``."""

    conditions: Tensor | None = None
    conditioning: str = "soft"
    temperature: float = 3.0


@torch.no_grad()
def teacher_soft_labels(teacher: nn.Module, images: Tensor, temperature: float = 3.0, form: str = "softmax",
                        batch_size: int = 500) -> tuple[Tensor, Tensor]:
    """The frozen teacher's ``(logits (N, K), soft labels (N, K))`` of ``images`` ``(N, C, H, W)`` in
    [0, 1], in eval mode and batches of ``batch_size`` (its mode is restored afterwards)."""
    was_training = teacher.training
    teacher.eval()
    try:
        logits = torch.cat([teacher(images[i:i + batch_size]).float() for i in range(0, len(images), batch_size)])
    finally:
        teacher.train(was_training)
    if logits.dim() != 2 or logits.shape[0] != images.shape[0]:
        raise ValueError(f"the teacher must map (N, C, H, W) images to logits (N, K); got {tuple(logits.shape)}")
    return logits, darkgan_soft_labels(logits, temperature, form)


def _positive_int(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"darkgan: {name} must be a positive int; got {v!r}")


def _check_images(images: Any) -> Tensor:
    if not isinstance(images, Tensor) or images.dim() != 4:
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"darkgan: images must be a tensor (N, C, H, W) of real training images; got {got}")
    lo, hi = float(images.min()), float(images.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise ValueError(f"darkgan: images must lie in [0, 1]; got values in [{lo:.3g}, {hi:.3g}]")
    return images


@register_strategy("darkgan", "generative", DARKGAN_PAPER)
def darkgan(student: nn.Module, train_loader: Any = None, val_loader: Any = None, *, teacher: nn.Module | None = None,
            images: Tensor | None = None, discriminator: nn.Module | None = None, conditioning: str = "soft",
            labels: Tensor | None = None, temperature: float = 3.0, form: str = "softmax", weight_d: float = 10.0,
            weight_g: float = 1.0, steps: int = 2000, batch_size: int = 64, lr: float = 2.5e-3,
            betas: tuple[float, float] = (0.0, 0.99), r1_gamma: float = 0.1, r1_every: int = 16,
            ema_kimg: float | None = None, ema_rampup: float = 0.05, log_every: int = 50,
            checkpoint: str | Path | None = None, progress: bool = True, seed: int = 0) -> DarkGANResult:
    """DarkGAN (Nistal et al., ISMIR 2021, arXiv 2108.01216): train a generator conditioned on the
    teacher's soft labels, against a discriminator that learns to predict them.

    Each step, with a real batch ``x`` ``(B, C, H, W)`` (scaled to [-1, 1]) and its conditioning
    ``c = c(x)`` ``(B, K)``: a discriminator step on
    :func:`~distill.functional.darkgan.darkgan_discriminator_loss` (real ``x``, fakes
    ``G(z, c)`` made without gradient, the head on ``x``; every ``r1_every`` steps also
    ``(r1_gamma / 2) r1_every`` times R1 on ``x``), then a generator step on
    :func:`~distill.functional.darkgan.darkgan_generator_loss` for fresh ``z`` and the same ``c``,
    then the EMA of the generator (StyleGAN2-ADA's half-life schedule, as
    :func:`~distill.strategies.gan.train_gan`).

    Defaults: ``temperature = 3``, ``weight_d = 10`` (the authors' ``darkgan.json``), ``weight_g = 1``
    (ours; the authors' 10 collapsed our logistic-loss GAN, see the module docstring);
    the optimiser, R1 (``r1_gamma = 0.1``, ours) and EMA settings are :func:`~distill.strategies.gan.train_gan`'s.

    Args:
        student: the generator, ``forward(z, c)`` -> images ``(B, C, H, W)`` in [-1, 1] with int
            attributes ``z_dim`` and ``c_dim`` (``c_dim = K`` for ``"soft"``/``"onehot"``, 0 for ``"none"``),
            e.g. ``StyleGenerator(c_dim=10)``.
        train_loader, val_loader: not read (the strategy convention's slots); the data are ``images``.
        teacher: the frozen classifier, images ``(N, C, H, W)`` in [0, 1] -> logits ``(N, K)``; may be
            None only for ``"none"``, or for ``"onehot"`` with ``labels``.
        images: the real training images ``(N, C, H, W)`` in [0, 1].
        discriminator: an :class:`AuxDiscriminator` (for ``"soft"``/``"onehot"``) or a plain one
            (``"none"``); default an ``AuxDiscriminator`` over an unconditional
            :class:`~distill.models.stylegan.StyleDiscriminator` of the images' size.
        conditioning: ``"soft"`` (DarkGAN), ``"onehot"`` (the teacher's top-1 class, or ``labels`` when
            given, one-hot; head loss = cross-entropy at T = 1) or ``"none"``.
        labels: class ids ``(N,)`` for ``"onehot"`` (default: the teacher's top-1).
        temperature, form: of the soft labels and the head (``"softmax"`` or the authors' ``"sigmoid"``).
        weight_d, weight_g: the conditioning terms' weights.
        steps, batch_size, lr, betas, r1_gamma, r1_every, ema_kimg, ema_rampup, log_every: as
            :func:`~distill.strategies.gan.train_gan`.
        checkpoint: a safetensors file for G, G_ema and D at the end (None: nothing written).
        progress: a rich progress bar (``False``: silent). seed: latents, batches, initialisation.
    Returns: a :class:`DarkGANResult`; ``.ema`` is the generator to sample from.
    """
    if conditioning not in _CONDITIONINGS:
        raise ValueError(f"darkgan: conditioning must be one of {_CONDITIONINGS}; got {conditioning!r}")
    images = _check_images(images)
    for name, v in (("steps", steps), ("batch_size", batch_size), ("r1_every", r1_every), ("log_every", log_every)):
        _positive_int(name, v)
    if r1_gamma < 0 or lr <= 0 or weight_d < 0 or weight_g < 0:
        raise ValueError(f"darkgan: need r1_gamma >= 0, lr > 0, weight_d >= 0, weight_g >= 0; got r1_gamma={r1_gamma}, "
                         f"lr={lr}, weight_d={weight_d}, weight_g={weight_g}")
    generator = student
    z_dim, c_dim = getattr(generator, "z_dim", None), int(getattr(generator, "c_dim", 0) or 0)
    if not isinstance(z_dim, int):
        raise TypeError("darkgan: the generator (student) must have an int attribute z_dim (its latent size)")
    device = images.device

    # 1. the conditioning vectors of the training images
    c_all: Tensor | None = None
    head_t = temperature
    if conditioning == "soft":
        if teacher is None:
            raise ValueError("darkgan: conditioning='soft' needs the teacher (its soft labels are the conditioning)")
        _, c_all = teacher_soft_labels(teacher, images, temperature, form)
    elif conditioning == "onehot":
        if labels is None:
            if teacher is None:
                raise ValueError("darkgan: conditioning='onehot' needs labels (N,) or a teacher (its top-1 class)")
            labels = teacher_soft_labels(teacher, images, 1.0, "softmax")[0].argmax(1)
        if labels.shape != (images.shape[0],):
            raise ValueError(f"darkgan: labels must be class ids ({images.shape[0]},); got {tuple(labels.shape)}")
        c_all = F.one_hot(labels.long().to(device), c_dim if c_dim > 0 else int(labels.max()) + 1).float()
        head_t, form = 1.0, "softmax"
    if c_all is not None and c_dim != c_all.shape[1]:
        raise ValueError(f"darkgan: the generator's c_dim is {c_dim} but the conditioning has {c_all.shape[1]} "
                         f"classes; build it with c_dim={c_all.shape[1]}")
    if c_all is None and c_dim:
        raise ValueError(f"darkgan: conditioning='none' needs an unconditional generator (c_dim=0); got c_dim={c_dim}")

    # 2. the discriminator
    if discriminator is None:
        from distill.models.stylegan import StyleDiscriminator

        base = StyleDiscriminator(channels=images.shape[1], img_size=images.shape[-1])
        discriminator = base if c_all is None else AuxDiscriminator(base, c_all.shape[1])
    aux = c_all is not None
    if aux and not isinstance(discriminator, AuxDiscriminator):
        raise TypeError(f"darkgan: conditioning={conditioning!r} needs an AuxDiscriminator (a head predicting c); "
                         f"got {type(discriminator).__name__}")

    g, ema, opt_g, opt_d = start_gan(generator, discriminator, lr=lr, betas=betas, seed=seed, device=device)
    ema_kimg = batch_size * 10 / 32 if ema_kimg is None else ema_kimg
    real_all = images * 2 - 1
    n = images.shape[0]
    result = DarkGANResult(generator, ema, discriminator, conditions=c_all, conditioning=conditioning,
                           temperature=head_t)
    sums: dict[str, float] = {}
    t0 = time.perf_counter()

    def gen(z: Tensor, c: Tensor | None) -> Tensor:
        return generator(z) if c is None else generator(z, c)

    with StepProgress(progress, f"DarkGAN ({conditioning})", steps) as bar:
        for step in range(1, steps + 1):
            idx = torch.randint(0, n, (batch_size,), generator=g).to(device)
            real, c = real_all[idx], None if c_all is None else c_all[idx]
            # discriminator step: fakes conditioned on the real batch's labels (the authors' code)
            z = torch.randn(batch_size, z_dim, generator=g).to(device)
            with torch.no_grad():
                generator.eval()  # w_avg moves once per generator step, as train_gan
                fake = gen(z, c)
                generator.train()
            if aux:
                s_real, a_real = discriminator.forward_with_aux(real)
            else:
                s_real, a_real = discriminator(real), None
            d_loss, parts = darkgan_discriminator_loss(s_real, discriminator(fake), a_real, c, head_t, weight_d, form)
            if r1_gamma > 0 and step % r1_every == 0:
                r1 = r1_penalty(discriminator, real)
                d_loss = d_loss + (r1_gamma / 2) * r1_every * r1
                parts["r1"] = float(r1.detach())
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            # generator step: fresh z, the same conditioning
            z = torch.randn(batch_size, z_dim, generator=g).to(device)
            discriminator.requires_grad_(False)
            fake = gen(z, c)
            if aux:
                s_fake, a_fake = discriminator.forward_with_aux(fake)
            else:
                s_fake, a_fake = discriminator(fake), None
            g_loss, g_parts = darkgan_generator_loss(s_fake, a_fake, c, head_t, weight_g, form)
            discriminator.requires_grad_(True)
            opt_g.zero_grad(set_to_none=True)
            g_loss.backward()
            opt_g.step()
            parts.update(g_parts)
            for k, v in parts.items():
                if not math.isfinite(v):
                    raise FloatingPointError(f"darkgan: {k} became {v} at step {step}")
                sums[k] = sums.get(k, 0.0) + v
                sums["#" + k] = sums.get("#" + k, 0.0) + 1
            _ema_update(ema, generator, step, batch_size, ema_kimg, ema_rampup)
            if step % log_every == 0 or step == steps:
                row = {"step": float(step), **{k: sums[k] / sums["#" + k] for k in sums if not k.startswith("#")}}
                row["time_s"] = time.perf_counter() - t0
                result.history.append(row)
                sums.clear()
            bar.advance(f"D {parts['d_adv']:.3f} G {parts['g_adv']:.3f}"
                        + (f" cond {parts['g_cond']:.3f}" if aux else ""))
    generator.eval()
    result.time_s = time.perf_counter() - t0
    if checkpoint is not None:
        result.checkpoint = save_gan_checkpoint(checkpoint, generator, ema, discriminator,
                                                {"strategy": "darkgan", "conditioning": conditioning,
                                                 "temperature": str(head_t), "steps": str(steps), "seed": str(seed)})
    return result


@torch.no_grad()
def _ema_update(ema: nn.Module, generator: nn.Module, step: int, batch_size: int, ema_kimg: float,
                ema_rampup: float) -> None:
    """``ema <- beta ema + (1 - beta) G``, ``beta = 0.5 ** (B / nimg)``, ``nimg = min(1000 ema_kimg,
    rampup * step * B)`` (StyleGAN2-ADA's schedule, as :func:`~distill.strategies.gan.train_gan`); buffers copied."""
    nimg = min(ema_kimg * 1000, step * batch_size * ema_rampup) if ema_rampup else ema_kimg * 1000
    beta = 0.5 ** (batch_size / max(nimg, 1e-8))
    for p_ema, p in zip(ema.parameters(), generator.parameters(), strict=True):
        p_ema.lerp_(p.detach(), 1.0 - beta)
    for b_ema, b in zip(ema.buffers(), generator.buffers(), strict=True):
        b_ema.copy_(b)


@torch.no_grad()
def darkgan_evaluate(generator: nn.Module, teacher: nn.Module, targets: Tensor, *, inputs: Tensor | None = None,
                     real: Tensor | None = None, feature_net: nn.Module | None = None, temperature: float = 3.0,
                     form: str = "softmax", batch_size: int = 500, seed: int = 0) -> dict[str, Any]:
    """How well a (Dark)GAN follows its conditioning, judged by the teacher, and FID/KID.

    One image per row of ``targets`` ``(M, K)`` (the teacher's soft labels of held-out real images):
    ``G(z_i, inputs_i)`` with ``z_i ~ N(0, I)`` and ``inputs`` ``(M, c_dim)`` what this generator is
    conditioned on (default ``targets``: DarkGAN; one-hot rows for an AC-GAN; ``None`` for an
    unconditional generator, whose agreement is then chance). Returns
    :func:`~distill.functional.darkgan.darkgan_condition_agreement` of the teacher's logits on the
    generated images (in [0, 1]) against ``targets`` (``"kl"``, ``"top1"``), and, with ``real``
    ``(M', C, H, W)`` in [0, 1] and ``feature_net``, :func:`distill.train.generative_eval.fid_kid`'s
    ``"fid"``, ``"kid"``, ``"kid_std"``, ``"extractor"``.
    """
    if targets.dim() != 2:
        raise ValueError(f"darkgan_evaluate: targets must be soft labels (M, K); got {tuple(targets.shape)}")
    c_dim = int(getattr(generator, "c_dim", 0) or 0)
    cond = targets if inputs is None and c_dim else inputs
    if c_dim and (cond is None or cond.shape != (targets.shape[0], c_dim)):
        raise ValueError(f"darkgan_evaluate: the generator is conditional (c_dim={c_dim}): inputs must be "
                         f"({targets.shape[0]}, {c_dim}); got {None if cond is None else tuple(cond.shape)}")
    if not c_dim and inputs is not None:
        raise ValueError("darkgan_evaluate: the generator is unconditional (c_dim=0) but inputs were given")
    was_g, was_t = generator.training, teacher.training
    generator.eval()
    teacher.eval()
    g = torch.Generator().manual_seed(seed)
    device = next(generator.parameters()).device
    fakes, logits = [], []
    try:
        for i in range(0, targets.shape[0], batch_size):
            m = min(batch_size, targets.shape[0] - i)
            z = torch.randn(m, generator.z_dim, generator=g).to(device)
            x = generator(z) if not c_dim else generator(z, cond[i:i + m].to(device))
            x = ((x + 1) / 2).clamp(0, 1)
            fakes.append(x.cpu())
            logits.append(teacher(x).float().cpu())
    finally:
        generator.train(was_g)
        teacher.train(was_t)
    out: dict[str, Any] = darkgan_condition_agreement(torch.cat(logits), targets.cpu(), temperature, form)
    if real is not None and feature_net is not None:
        from distill.train.generative_eval import fid_kid

        out.update({k: v for k, v in fid_kid(real, torch.cat(fakes), feature_net, seed=seed).items()
                    if k in ("fid", "kid", "kid_std", "extractor")})
    return out
