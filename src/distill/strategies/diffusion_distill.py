"""Diffusion distillation: a classifier-free-guided teacher distilled into a ``w``-conditioned student
(stage one), then progressively into fewer sampling steps (stage two).

* ``guided_diffusion_distill``: Meng, Rombach, Gao, Kingma, Ermon, Ho, Salimans, "On Distillation of
  Guided Diffusion Models", CVPR 2023, arXiv 2210.03142, stage one.
* ``progressive_distill``: Salimans & Ho, "Progressive Distillation for Fast Sampling of Diffusion
  Models", ICLR 2022, arXiv 2202.00512 (Algorithm 2), which Meng et al.'s stage two applies to the
  stage-one student (the guidance strength ``w`` passed to teacher and student alike).
* ``stochastic_ddim_sample`` / ``sample_diffusion(stochastic=True)``: Meng et al.'s N-step stochastic
  sampler for the distilled student (a deterministic DDIM step of twice the step length, then a step back
  by re-noising).

The models are :class:`distill.integrations.diffusers.DiffusionUNet` (a ``diffusers.UNet2DModel``
predicting ``v``), in the papers' continuous time with the cosine schedule; the math is in
:mod:`distill.functional.diffusion`. Images are ``(B, C, H, W)`` in [-1, 1]
(:func:`diffusion_images` maps [0, 1] data sets there). The data come as ``images`` / ``labels``
tensors, or as ``train_loader`` (an iterable of ``(images, labels)`` batches, cycled).

What we could read of the papers here: their introductions and abstracts, and secondary summaries of
Salimans & Ho that state the truncated-SNR / SNR+1 weightings and ``alpha_1 = 0`` (the search corpus held
neither method section). The formulas below are the papers' (Salimans & Ho's Algorithm 2 and Sec. 4; Meng
et al.'s stage-one objective), written from our knowledge of them; every default marked "ours" is ours, for
CPU-sized runs (the papers train for far more updates per stage on TPUs).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.functional.diffusion import (cosine_alpha_sigma, ddim_sample, ddim_step, renoise,
                                          diffusion_snr_weight, diffusion_weighted_mse, guided_x, progressive_target,
                                          v_target, x_from_v)
from distill.papers import Paper
from distill.strategies.registry import register_strategy
from distill.progress import StepProgress
from distill.train import FitResult

__all__ = ["MENG_PAPER", "PD_PAPER", "DiffusionResult", "diffusion_images", "guided_diffusion_distill",
           "guided_distill_loss", "load_diffusion_model", "progressive_distill", "progressive_distill_loss",
           "renoise", "sample_diffusion", "save_diffusion_model", "stochastic_ddim_sample", "train_diffusion_teacher"]

MENG_PAPER = Paper("On Distillation of Guided Diffusion Models", "Meng, Rombach, Gao, Kingma, Ermon, Ho, Salimans",
                   2023, "2210.03142", "CVPR 2023")
PD_PAPER = Paper("Progressive Distillation for Fast Sampling of Diffusion Models", "Salimans, Ho", 2022,
                 "2202.00512", "ICLR 2022")


@dataclass
class DiffusionResult(FitResult):
    """What the diffusion strategies return: ``model`` (the delivered network), ``sampling_steps`` (its DDIM
    step count; ``None`` for a continuous-time model), ``rounds`` (progressive distillation: one dict per round
    with ``steps``, ``model``, ``loss``) and ``history`` (a dict of loss per logging interval)."""

    model: nn.Module | None = None
    sampling_steps: int | None = None
    rounds: list[dict[str, Any]] = field(default_factory=list)


# ----------------------------------------------------------------------------- data and models


def diffusion_images(images: Tensor, size: int | None = None) -> Tensor:
    """``(N, C, H, W)`` images in [0, 1] -> ``(N, C, size, size)`` in [-1, 1] (area-resized when ``size``
    differs from ``H``)."""
    if images.dim() != 4:
        raise ValueError(f"diffusion_images: images must be (N, C, H, W); got {tuple(images.shape)}")
    if float(images.min()) < 0 or float(images.max()) > 1:
        raise ValueError("diffusion_images: images must lie in [0, 1]; got values in "
                         f"[{float(images.min())}, {float(images.max())}]")
    x = images.float()
    if size is not None and (x.shape[-2], x.shape[-1]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="area")
    return x * 2 - 1


def _batches(train_loader: Iterable[Any] | None, images: Tensor | None, labels: Tensor | None, batch_size: int,
             gen: torch.Generator, who: str) -> Iterator[tuple[Tensor, Tensor]]:
    if train_loader is not None:
        while True:
            empty = True
            for batch in train_loader:
                empty = False
                yield batch[0], batch[1]
            if empty:
                raise ValueError(f"{who}: train_loader yielded no batch")
    if images is None or labels is None:
        raise ValueError(f"{who}: pass images and labels (tensors) or a train_loader of (images, labels) batches")
    if images.dim() != 4 or labels.shape != (images.shape[0],):
        raise ValueError(f"{who}: images must be (N, C, H, W) and labels (N,); got {tuple(images.shape)} and "
                         f"{tuple(labels.shape)}")
    if float(images.min()) < -1.001 or float(images.max()) > 1.001:
        raise ValueError(f"{who}: images must lie in [-1, 1] (see diffusion_images); got [{float(images.min())}, "
                         f"{float(images.max())}]")
    while True:
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=gen)
        yield images[idx], labels[idx].long()


def _check_model(model: Any, who: str, role: str) -> nn.Module:
    if not isinstance(model, nn.Module) or not hasattr(model, "num_classes") or not hasattr(model, "w_conditioned"):
        raise TypeError(f"{who}: {role} must be a DiffusionUNet (distill.integrations.diffusers.build_unet); got "
                        f"{type(model).__name__}")
    return model


def _frozen(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model).eval()
    model.requires_grad_(False)
    return model


def save_diffusion_model(path: str | Path, model: nn.Module, metadata: dict[str, Any] | None = None) -> Path:
    """Save ``model``'s weights (a ``.safetensors`` path) with ``metadata`` (steps, losses, ...)."""
    from distill.train.checkpoint import save_model

    return save_model(path, model, metadata=dict(metadata or {}))


def load_diffusion_model(path: str | Path, model: nn.Module) -> nn.Module:
    """Load weights saved by :func:`save_diffusion_model` into ``model`` (built with the same config)."""
    from distill.train.checkpoint import load_model

    return load_model(path, model)[0]


def _sample_t(b: int, gen: torch.Generator, device: torch.device) -> Tensor:
    """``t ~ U(0, 1]`` ``(B,)`` (``1 - U[0, 1)``: never 0, where ``sigma_t = 0`` and the SNR is infinite)."""
    return (1 - torch.rand(b, generator=gen)).to(device)


# ----------------------------------------------------------------------------- the teacher


def train_diffusion_teacher(model: nn.Module, images: Tensor | None = None, labels: Tensor | None = None, *,
                            train_loader: Iterable[Any] | None = None, steps: int = 3000, batch_size: int = 64,
                            lr: float = 2e-4, p_uncond: float = 0.1, ema_decay: float = 0.995, seed: int = 0,
                            progress: bool = True, checkpoint: str | Path | None = None) -> DiffusionResult:
    """Train a class-conditional diffusion model with classifier-free guidance's label dropout.

    Per step: ``x`` ``(B, C, H, W)`` in [-1, 1] with labels ``c``; each label replaced by the null label with
    probability ``p_uncond`` (Ho & Salimans' joint training of the conditional and unconditional model);
    ``t ~ U[0, 1]``, ``eps ~ N(0, I)``, ``z_t = alpha_t x + sigma_t eps`` (cosine schedule); the loss is
    ``||v - v_hat||^2`` with ``v = alpha_t eps - sigma_t x``, i.e. the x-space loss weighted by SNR + 1
    (Salimans & Ho, Sec. 4: the v-parametrisation their and Meng et al.'s models use).

    Defaults are ours (CPU-sized): Adam at ``lr`` 2e-4, batch 64, ``p_uncond`` 0.1, an EMA of the weights
    with ``ema_decay`` 0.995 (the returned model holds the EMA weights). ``checkpoint`` (a ``.safetensors``
    path) saves them.
    """
    who = "train_diffusion_teacher"
    model = _check_model(model, who, "model")
    if model.w_conditioned:
        raise ValueError(f"{who}: the teacher takes no guidance strength w (build it with w_conditioned=False)")
    if not 0 <= p_uncond < 1:
        raise ValueError(f"{who}: p_uncond must be in [0, 1); got {p_uncond}")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"{who}: steps and batch_size must be >= 1; got {steps}, {batch_size}")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    data = _batches(train_loader, images, labels, batch_size, gen, who)
    ema = _frozen(model)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    history: list[dict[str, Any]] = []
    start, running = time.time(), 0.0
    with StepProgress(progress, "diffusion teacher", steps) as bar:
        for step in range(1, steps + 1):
            x, c = next(data)
            x, c = x.to(device), c.to(device).long().clone()
            drop = torch.rand(c.shape[0], generator=gen).to(device) < p_uncond
            c[drop] = model.num_classes
            t = _sample_t(x.shape[0], gen, device)
            a, s = cosine_alpha_sigma(t)
            eps = torch.randn(x.shape, generator=gen).to(device)
            z = a.view(-1, 1, 1, 1) * x + s.view(-1, 1, 1, 1) * eps
            loss = F.mse_loss(model(z, t, c), v_target(x, eps, a, s))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(pm, 1 - ema_decay)
            running += float(loss.detach())
            if step % 50 == 0 or step == steps:
                history.append({"step": step, "loss": running / (step % 50 or 50)})
                running = 0.0
            bar.advance(f"loss {float(loss.detach()):.4f}")
    model.load_state_dict(ema.state_dict())
    model.eval()
    if checkpoint is not None:
        save_diffusion_model(checkpoint, model, {"what": "diffusion teacher", "steps": steps, "p_uncond": p_uncond})
    return DiffusionResult(history=history, time_s=time.time() - start, model=model)


# ----------------------------------------------------------------------------- sampling


def stochastic_ddim_sample(denoise: Callable[[Tensor, Tensor], Tensor], z: Tensor, steps: int, *,
                           noise: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Meng et al.'s N-step stochastic sampler for a distilled model (On Distillation of Guided Diffusion
    Models, CVPR 2023, arXiv 2210.03142), on the cosine schedule of :mod:`distill.functional.diffusion`
    (``alpha_t = cos(pi t / 2)``, ``sigma_t = sin(pi t / 2)``, continuous ``t`` in [0, 1]: the library's, the
    one the models here are trained on).

    With ``N = steps`` and ``t = i/N``, for ``i = N..2`` (one network evaluation each):

    1. a deterministic DDIM step of TWICE the step length, ``t -> t - 2/N`` (what an ``N/2``-step sampler
       does): ``z_{t-2/N} = alpha_{t-2/N} x_hat + (sigma_{t-2/N} / sigma_t)(z_t - alpha_t x_hat)``,
       ``x_hat = denoise(z_t, t)``;
    2. a stochastic step BACK by the original step length, ``t - 2/N -> t - 1/N``, drawing from the forward
       process ``q(z_{t-1/N} | z_{t-2/N})`` (:func:`renoise`).

    The last step (``t = 1/N``) is deterministic: ``z_0 = x_hat(z_{1/N})``. So the sampler makes ``N`` network
    evaluations, like the ``N``-step deterministic DDIM sampler (:func:`~distill.functional.diffusion.ddim_sample`)
    it replaces, and visits the same times ``1, (N-1)/N, ..., 1/N`` the ``N``-step student was distilled at.
    ``N = 1`` is the one-step deterministic sampler.

    Args:
        denoise: ``denoise(z_t (B, C, H, W), t (B,)) -> x_hat (B, C, H, W)``.
        z: the starting noise ``z_1`` ``(B, C, H, W)``.
        steps: ``N >= 1``.
        noise: the re-noising ``eps`` ``(N - 1, B, C, H, W)`` (row ``k`` for the ``k``-th stochastic step); drawn
            from ``N(0, I)`` with ``generator`` when ``None``.
    Returns: ``x`` ``(B, C, H, W)`` (not clamped).

    What we could read of the paper here: its abstract and introduction (which state that a stochastic
    sampler for the distilled model is proposed), not its method section; the update rule above is the paper's
    as we know it (the description in the issue agrees: a deterministic step of twice the step length, then a
    stochastic step back by re-noising), and the last, deterministic step is as we recall it.
    """
    if steps < 1:
        raise ValueError(f"stochastic_ddim_sample: steps must be >= 1; got {steps}")
    if noise is not None and noise.shape != (steps - 1, *z.shape):
        raise ValueError(f"stochastic_ddim_sample: noise must be (steps - 1, *z.shape) = {(steps - 1, *z.shape)}; "
                         f"got {tuple(noise.shape)}")
    b = z.shape[0]

    def times(k: int) -> tuple[Tensor, Tensor]:
        return cosine_alpha_sigma(torch.full((b,), k / steps, device=z.device, dtype=z.dtype))

    for i in range(steps, 0, -1):
        x_hat = denoise(z, torch.full((b,), i / steps, device=z.device, dtype=z.dtype))
        if i == 1:
            return x_hat
        (a_t, s_t), (a_2, s_2), (a_1, s_1) = times(i), times(i - 2), times(i - 1)
        z2 = ddim_step(z, x_hat, a_t, s_t, a_2, s_2)  # t -> t - 2/N, deterministic
        k = steps - i
        eps = noise[k].to(z) if noise is not None else torch.randn(z.shape, generator=generator).to(z)
        z = renoise(z2, a_2, s_2, a_1, s_1, eps)  # t - 2/N -> t - 1/N, stochastic
    return z  # not reached (steps >= 1 returns at i = 1)


@torch.no_grad()
def sample_diffusion(model: nn.Module, labels: Tensor, steps: int, *, w: float | None = None,
                     image_shape: tuple[int, int, int] | None = None, seed: int = 0, batch_size: int = 256,
                     progress: bool = False, stochastic: bool = False) -> Tensor:
    """DDIM samples ``(N, C, H, W)`` in [-1, 1] for ``labels`` ``(N,)`` in ``steps`` deterministic steps, or with
    ``stochastic=True`` Meng et al.'s ``steps``-step stochastic sampler (:func:`stochastic_ddim_sample`: the same
    number of network evaluations).

    * a ``w``-conditioned model (Meng et al.'s student): one network evaluation per step, ``w`` its input;
    * a plain model with ``w`` given: classifier-free guidance, ``x_hat = (1 + w) x_hat_c - w x_hat_null``,
      two evaluations per step (batched together);
    * a plain model with ``w=None``: the conditional model alone.

    ``image_shape`` ``(C, H, W)`` defaults to the UNet's ``(channels, sample_size, sample_size)``. The noise
    ``z_1`` of sample ``n`` depends only on ``seed`` and ``n``, so models compared with one seed start from the
    same noise. The stochastic sampler starts from that same ``z_1``; its re-noising noise (``steps - 1`` draws per
    sample) comes from the same generator after all the ``z_1`` (so it depends on ``seed``, ``n``, ``steps`` and
    the number of samples, not on ``batch_size``). The last ``x_hat`` is clamped to [-1, 1].
    """
    model = _check_model(model, "sample_diffusion", "model")
    if model.w_conditioned and w is None:
        raise ValueError("sample_diffusion: this model is w-conditioned; pass w (the guidance strength)")
    if image_shape is None:
        cfg = model.unet.config
        image_shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
    device = next(model.parameters()).device
    if steps < 1:
        raise ValueError(f"sample_diffusion: steps must be >= 1; got {steps}")
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((labels.shape[0], *image_shape), generator=gen)
    if stochastic:  # (N, steps - 1, C, H, W), drawn after z_1 (which stays the deterministic sampler's)
        # one generator: a second one seeded "seed + 2**32" would repeat z_1's stream (CPU seeds are 32-bit)
        renoise_eps = torch.randn((labels.shape[0], steps - 1, *image_shape), generator=gen)
    was_training = model.training
    model.eval()
    out = []
    with StepProgress(progress, f"sampling ({steps} {'stochastic ' if stochastic else ''}steps)",
                      labels.shape[0]) as bar:
        for lo in range(0, labels.shape[0], batch_size):
            c = labels[lo:lo + batch_size].to(device).long()
            z = noise[lo:lo + batch_size].to(device)
            b = c.shape[0]

            def denoise(z_t: Tensor, t: Tensor, c: Tensor = c, b: int = b) -> Tensor:
                a, s = cosine_alpha_sigma(t)
                if model.w_conditioned:
                    wv = torch.full((b,), float(w), device=z_t.device)
                    return x_from_v(z_t, model(z_t, t, c, wv), a, s)
                if w is None:
                    return x_from_v(z_t, model(z_t, t, c), a, s)
                null = torch.full_like(c, model.num_classes)
                v = model(torch.cat([z_t, z_t]), torch.cat([t, t]), torch.cat([c, null]))
                x = x_from_v(torch.cat([z_t, z_t]), v, torch.cat([a, a]), torch.cat([s, s]))
                return guided_x(x[:b], x[b:], w)

            if stochastic:
                eps = renoise_eps[lo:lo + batch_size].transpose(0, 1).to(device)  # (steps - 1, b, C, H, W)
                x = stochastic_ddim_sample(denoise, z, steps, noise=eps)
            else:
                x = ddim_sample(denoise, z, steps)
            out.append(x.clamp(-1, 1).cpu())
            bar.advance(steps=b)
    model.train(was_training)
    return torch.cat(out)


# ----------------------------------------------------------------------------- stage one (Meng et al.)


def _teacher_x(teacher: nn.Module, z: Tensor, t: Tensor, c: Tensor, w: Tensor) -> Tensor:
    """The teacher's denoised estimate the student matches: guided when the teacher is a plain
    classifier-free model, its own ``w`` input when it is a stage-one student."""
    a, s = cosine_alpha_sigma(t)
    if teacher.w_conditioned:
        return x_from_v(z, teacher(z, t, c, w), a, s)
    if not bool((w != 0).any()):  # w = 0: the conditional model alone, one evaluation
        return x_from_v(z, teacher(z, t, c), a, s)
    b = z.shape[0]
    null = torch.full_like(c, teacher.num_classes)
    v = teacher(torch.cat([z, z]), torch.cat([t, t]), torch.cat([c, null]))
    x = x_from_v(torch.cat([z, z]), v, torch.cat([a, a]), torch.cat([s, s]))
    return guided_x(x[:b], x[b:], w)


def guided_distill_loss(student: nn.Module, teacher: nn.Module, x: Tensor, c: Tensor, t: Tensor, w: Tensor,
                        eps: Tensor, weighting: str = "truncated_snr") -> Tensor:
    """Meng et al.'s stage-one loss on one batch: ``z_t = alpha_t x + sigma_t eps``,
    ``(1/B) sum_b omega(lambda_t)_b mean_d (x_hat_student(z_t, c, w) - [(1 + w) x_hat_c - w x_hat_null])_{b,d}^2``.

    ``x``, ``eps`` ``(B, C, H, W)``; ``c`` ``(B,)`` labels; ``t`` ``(B,)`` in (0, 1]; ``w`` ``(B,)``. The teacher
    (a plain classifier-free model) is evaluated without gradient.
    """
    a, s = cosine_alpha_sigma(t)
    z = a.view(-1, 1, 1, 1) * x + s.view(-1, 1, 1, 1) * eps
    with torch.no_grad():
        target = _teacher_x(teacher, z, t, c, w)
    x_student = x_from_v(z, student(z, t, c, w), a, s)
    return diffusion_weighted_mse(x_student, target, diffusion_snr_weight(a, s, weighting))


def progressive_distill_loss(student: nn.Module, teacher: nn.Module, x: Tensor, c: Tensor, i: Tensor, n_student: int,
                             w: Tensor, eps: Tensor, weighting: str = "truncated_snr") -> Tensor:
    """Salimans & Ho's Algorithm 2 loss on one batch, for a student of ``n_student`` steps.

    ``t = i / n_student`` (``i`` ``(B,)`` long in ``1..n_student``), ``t' = t - 0.5/n_student``,
    ``t'' = t - 1/n_student``; ``z_t = alpha_t x + sigma_t eps``; the teacher's two DDIM steps ``z_t -> z_t' ->
    z_t''`` (no gradient); ``x_tilde`` = :func:`~distill.functional.diffusion.progressive_target`; the loss is
    ``(1/B) sum_b omega(lambda_t)_b mean_d (x_hat_student(z_t) - x_tilde)_{b,d}^2``. ``w`` ``(B,)`` enters a
    w-conditioned teacher/student, or guides a plain teacher (``w = 0``: its conditional model).
    """
    if i.dim() != 1 or int(i.min()) < 1 or int(i.max()) > n_student:
        raise ValueError(f"progressive_distill_loss: i must be (B,) in 1..{n_student}; got {i.tolist()[:8]}")
    t = i.to(x.dtype) / n_student
    t1, t2 = t - 0.5 / n_student, (t - 1.0 / n_student).clamp(0, 1)
    (a, s), (a1, s1), (a2, s2) = cosine_alpha_sigma(t), cosine_alpha_sigma(t1), cosine_alpha_sigma(t2)
    z = a.view(-1, 1, 1, 1) * x + s.view(-1, 1, 1, 1) * eps
    with torch.no_grad():  # two DDIM steps of the teacher: t -> t' -> t''
        z1 = ddim_step(z, _teacher_x(teacher, z, t, c, w), a, s, a1, s1)
        z2 = ddim_step(z1, _teacher_x(teacher, z1, t1, c, w), a1, s1, a2, s2)
        target = progressive_target(z, z2, a, s, a2, s2)
    v = student(z, t, c, w) if student.w_conditioned else student(z, t, c)
    return diffusion_weighted_mse(x_from_v(z, v, a, s), target, diffusion_snr_weight(a, s, weighting))


def _check_range(who: str, w_min: float, w_max: float, weighting: str) -> None:
    if not 0 <= w_min <= w_max:
        raise ValueError(f"{who}: need 0 <= w_min <= w_max; got w_min={w_min}, w_max={w_max}")
    diffusion_snr_weight(torch.ones(1), torch.ones(1), weighting)  # validates the name before any work


@register_strategy("guided_diffusion_distill", "generative", MENG_PAPER)
def guided_diffusion_distill(student: nn.Module | None = None, train_loader: Iterable[Any] | None = None,
                             val_loader: Any = None, *, teacher: nn.Module, images: Tensor | None = None,
                             labels: Tensor | None = None, steps: int = 1000, batch_size: int = 64, lr: float = 1e-4,
                             w_min: float = 0.0, w_max: float = 4.0, weighting: str = "truncated_snr",
                             seed: int = 0, progress: bool = True, run_dir: str | Path | None = None,
                             epochs: int | None = None) -> DiffusionResult:
    """Meng et al.'s stage one: one ``w``-conditioned student matches the classifier-free-guided teacher.

    ``L(eta_1) = E_{w ~ U[w_min, w_max], t ~ U[0, 1], x} [ omega(lambda_t) || x_hat_eta1(z_t, c, w) - x_hat^w_theta(z_t, c) ||^2 ]``
    with the guided teacher ``x_hat^w_theta = (1 + w) x_hat_{c,theta}(z_t) - w x_hat_theta(z_t)``
    (:func:`~distill.functional.diffusion.guided_x`; both teacher terms in one batched call),
    ``z_t = alpha_t x + sigma_t eps`` on real images ``x`` with labels ``c``, and ``omega`` the
    ``weighting`` (:func:`~distill.functional.diffusion.diffusion_snr_weight`; default truncated SNR,
    ``max(alpha^2/sigma^2, 1)``, Salimans & Ho's; the paper writes ``omega(lambda_t)`` as a chosen weighting).
    ``w`` is drawn per sample. The student enters ``w`` by Fourier features added to its time embedding
    (:class:`~distill.integrations.diffusers.DiffusionUNet`); by default it is the teacher copied, with a
    zero-initialised ``w`` input (:meth:`~distill.integrations.diffusers.DiffusionUNet.with_guidance_input`),
    so it starts as the teacher's conditional model (our choice of initialisation).

    Defaults: ``w`` in [0, 4] (Meng et al.'s range for their pixel-space ImageNet 64 models, as we recall
    it); ``steps`` 1000, Adam ``lr`` 1e-4, batch 64 are ours. ``epochs`` (a recipe's ``train.epochs``) is
    ignored: ``steps`` counts updates. ``val_loader`` is not read. ``run_dir`` saves ``student.safetensors``.

    Args:
        student: a w-conditioned :class:`DiffusionUNet`, or ``None`` for the teacher's copy.
        train_loader: batches ``(images (B, C, H, W) in [-1, 1], labels (B,))``, or ``None`` for ``images``/``labels``.
        teacher: the trained classifier-free :class:`DiffusionUNet` (frozen here, a copy in eval mode).
    Returns: :class:`DiffusionResult` with the student (``sampling_steps`` ``None``: continuous time).
    """
    who = "guided_diffusion_distill"
    teacher = _check_model(teacher, who, "teacher")
    if teacher.w_conditioned:
        raise ValueError(f"{who}: the teacher must be a plain classifier-free model (no w input)")
    _check_range(who, w_min, w_max, weighting)
    if student is None:
        student = teacher.with_guidance_input()
    student = _check_model(student, who, "student")
    if not student.w_conditioned:
        raise ValueError(f"{who}: the student needs a guidance-strength input (teacher.with_guidance_input())")
    frozen = _frozen(teacher)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    device = next(student.parameters()).device
    data = _batches(train_loader, images, labels, batch_size, gen, who)
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    student.train()
    history: list[dict[str, Any]] = []
    start, running = time.time(), 0.0
    with StepProgress(progress, "guided distillation (stage one)", steps) as bar:
        for step in range(1, steps + 1):
            x, c = next(data)
            x, c = x.to(device), c.to(device).long()
            b = x.shape[0]
            t = _sample_t(b, gen, device)
            w = (w_min + (w_max - w_min) * torch.rand(b, generator=gen)).to(device)
            eps = torch.randn(x.shape, generator=gen).to(device)
            loss = guided_distill_loss(student, frozen, x, c, t, w, eps, weighting)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += float(loss.detach())
            if step % 50 == 0 or step == steps:
                history.append({"step": step, "loss": running / (step % 50 or 50)})
                running = 0.0
            bar.advance(f"loss {float(loss.detach()):.4f}")
    student.eval()
    if run_dir is not None:
        save_diffusion_model(Path(run_dir) / "student.safetensors", student,
                             {"what": "guided_diffusion_distill stage one", "w_min": w_min, "w_max": w_max})
    return DiffusionResult(history=history, time_s=time.time() - start, model=student)


# ----------------------------------------------------------------------------- stage two (Salimans & Ho)


def _progressive_round(teacher: nn.Module, student: nn.Module, n_student: int, data: Iterator[tuple[Tensor, Tensor]],
                       gen: torch.Generator, updates: int, lr: float, w_min: float, w_max: float, weighting: str,
                       bar: StepProgress, device: torch.device) -> list[float]:
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1 - k / updates)  # linear to 0 over the round
    student.train()
    losses = []
    for _ in range(updates):
        x, c = next(data)
        x, c = x.to(device), c.to(device).long()
        b = x.shape[0]
        i = torch.randint(1, n_student + 1, (b,), generator=gen).to(device)
        w = (w_min + (w_max - w_min) * torch.rand(b, generator=gen)).to(device)
        eps = torch.randn(x.shape, generator=gen).to(device)
        loss = progressive_distill_loss(student, teacher, x, c, i, n_student, w, eps, weighting)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        bar.advance(f"{2 * n_student}->{n_student} steps, loss {float(loss.detach()):.4f}")
    student.eval()
    return losses


@register_strategy("progressive_distill", "generative", PD_PAPER)
def progressive_distill(student: nn.Module | None = None, train_loader: Iterable[Any] | None = None,
                        val_loader: Any = None, *, teacher: nn.Module, images: Tensor | None = None,
                        labels: Tensor | None = None, start_steps: int = 64, rounds: int = 4,
                        steps_per_round: int = 500, batch_size: int = 64, lr: float = 1e-4, w_min: float = 0.0,
                        w_max: float = 4.0, guidance_w: float | None = None, weighting: str = "truncated_snr",
                        seed: int = 0, progress: bool = True, run_dir: str | Path | None = None,
                        epochs: int | None = None) -> DiffusionResult:
    """Progressive distillation (Salimans & Ho, Algorithm 2), Meng et al.'s stage two.

    Round ``k`` (``N = start_steps / 2^k`` teacher steps): the student, initialised as a copy of its teacher,
    learns to do in ONE DDIM step what the teacher does in TWO. Per sample, ``t = i/N_s`` with
    ``i ~ U{1..N_s}``, ``N_s = N/2``, ``t' = t - 0.5/N_s``, ``t'' = t - 1/N_s``; the teacher's two DDIM steps
    (:func:`~distill.functional.diffusion.ddim_step`) give ``z_t''`` and the target is
    ``x_tilde = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t)``
    (:func:`~distill.functional.diffusion.progressive_target`); the loss is
    ``omega(lambda_t) ||x_tilde - x_hat_eta(z_t)||^2`` (``weighting``, default truncated SNR). Then the student
    becomes the teacher and ``N`` halves. Each round Adam's learning rate decays linearly from ``lr`` to 0.

    The teacher of round 0 may be
    * Meng et al.'s stage-one student (``w``-conditioned): ``w ~ U[w_min, w_max]`` per sample enters teacher and
      student (Meng et al.'s stage two: one student for the whole guidance range);
    * a plain classifier-free model with ``guidance_w`` set: the guided teacher ``(1 + w) x_c - w x_null`` at
      that fixed ``w``, distilled into a plain student (round 0's student then takes one evaluation per step
      where the teacher took two);
    * a plain model with ``guidance_w=None``: the conditional model (Salimans & Ho's class-conditional case).

    Defaults ``start_steps`` 64, ``rounds`` 4 (64 -> 4 steps), ``steps_per_round`` 500, Adam ``lr`` 1e-4,
    batch 64 are ours, for CPU runs: Salimans & Ho start from 1024-8192 steps and train each round for
    tens of thousands of updates. ``val_loader`` is not read; ``epochs`` is ignored. ``run_dir`` saves each
    round's student as ``student_{N}steps.safetensors``.

    Returns: :class:`DiffusionResult`: ``model`` the last student, ``sampling_steps`` its step count,
    ``rounds`` one dict per round (``steps``, ``model``, ``loss`` the mean of the round's last 10% of updates).
    """
    who = "progressive_distill"
    teacher = _check_model(teacher, who, "teacher")
    _check_range(who, w_min, w_max, weighting)
    if start_steps < 2 or start_steps & (start_steps - 1):
        raise ValueError(f"{who}: start_steps must be a power of two >= 2; got {start_steps}")
    if not 1 <= rounds or start_steps >> rounds < 1:
        raise ValueError(f"{who}: rounds must be in [1, log2(start_steps)={start_steps.bit_length() - 1}]; got {rounds}")
    if steps_per_round < 1:
        raise ValueError(f"{who}: steps_per_round must be >= 1; got {steps_per_round}")
    if teacher.w_conditioned and guidance_w is not None:
        raise ValueError(f"{who}: guidance_w is for a plain classifier-free teacher; this teacher takes w itself "
                         "(its range: w_min, w_max)")
    if guidance_w is not None:
        if guidance_w < 0:
            raise ValueError(f"{who}: guidance_w must be >= 0; got {guidance_w}")
        w_min = w_max = float(guidance_w)
    if student is not None:
        student = _check_model(student, who, "student")
        if student.w_conditioned != teacher.w_conditioned:
            raise ValueError(f"{who}: the student must take w exactly when the teacher does")

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    data = _batches(train_loader, images, labels, batch_size, gen, who)
    current = _frozen(teacher)
    if not teacher.w_conditioned and guidance_w is None:
        w_min = w_max = 0.0  # (1 + 0) x_c - 0 x_null: the conditional model
    # a plain teacher with guidance: its guided output is distilled into a plain student, which then
    # stands for the guided model (w absorbed); the next rounds use it with w = 0 (unguided) as teacher.
    n = start_steps
    out_rounds: list[dict[str, Any]] = []
    history: list[dict[str, Any]] = []
    start = time.time()
    with StepProgress(progress, "progressive distillation", rounds * steps_per_round) as bar:
        for k in range(rounds):
            n_student = n // 2
            s_model = student if (k == 0 and student is not None) else copy.deepcopy(current)
            s_model.requires_grad_(True)
            device = next(s_model.parameters()).device
            current.to(device)
            losses = _progressive_round(current, s_model, n_student, data, gen, steps_per_round, lr, w_min, w_max,
                                        weighting, bar, device)
            tail = losses[-max(1, len(losses) // 10):]
            out_rounds.append({"steps": n_student, "model": s_model, "loss": sum(tail) / len(tail)})
            history.append({"round": k, "steps": n_student, "loss": sum(tail) / len(tail)})
            if run_dir is not None:
                save_diffusion_model(Path(run_dir) / f"student_{n_student}steps.safetensors", s_model,
                                     {"what": "progressive_distill", "steps": n_student, "round": k})
            current = _frozen(s_model)
            if not teacher.w_conditioned:
                w_min = w_max = 0.0
            n = n_student
    last = out_rounds[-1]
    return DiffusionResult(history=history, time_s=time.time() - start, model=last["model"],
                           sampling_steps=last["steps"], rounds=out_rounds)
