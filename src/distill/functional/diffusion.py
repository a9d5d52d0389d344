"""Diffusion distillation math: the variance-preserving cosine schedule, the v-parametrisation, DDIM
steps, the classifier-free-guided target and the progressive-distillation target.

Papers:

* Salimans & Ho, "Progressive Distillation for Fast Sampling of Diffusion Models", ICLR 2022,
  arXiv 2202.00512 (Algorithm 2: a student of ``N/2`` DDIM steps matches two DDIM steps of its
  teacher; the v-parametrisation; the truncated-SNR and SNR+1 weightings).
* Meng, Rombach, Gao, Kingma, Ermon, Ho, Salimans, "On Distillation of Guided Diffusion Models",
  CVPR 2023, arXiv 2210.03142 (stage one: a ``w``-conditioned student matches the
  classifier-free-guided teacher ``(1 + w) x_c - w x_null``).

Notation (continuous time ``t`` in [0, 1], the papers'): ``z_t = alpha_t x + sigma_t eps`` with the
cosine schedule ``alpha_t = cos(pi t / 2)``, ``sigma_t = sin(pi t / 2)`` (so ``alpha^2 + sigma^2 = 1``),
log signal-to-noise ratio ``lambda_t = log(alpha_t^2 / sigma_t^2)``. Images ``x``, latents ``z`` and
model outputs are ``(B, C, H, W)`` (any trailing shape works); ``alpha``, ``sigma``, ``t`` and ``w``
are ``(B,)`` tensors (or Python floats), broadcast over the trailing dimensions.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["cosine_alpha_sigma", "ddim_sample", "ddim_step", "eps_from_x", "guided_x", "diffusion_log_snr", "renoise",
           "progressive_target", "diffusion_snr_weight", "v_target", "diffusion_weighted_mse", "x_from_v"]

WEIGHTINGS = ("truncated_snr", "snr+1", "snr", "none")


def _b(v: Tensor | float, like: Tensor) -> Tensor:
    """A per-sample ``(B,)`` tensor (or scalar) shaped ``(B, 1, 1, ...)`` to broadcast against ``like``."""
    v = torch.as_tensor(v, dtype=like.dtype, device=like.device)
    if v.dim() == 0:
        return v
    if v.dim() != 1 or v.shape[0] != like.shape[0]:
        raise ValueError(f"a per-sample coefficient must be a scalar or shaped ({like.shape[0]},) for a batch of "
                         f"{tuple(like.shape)}; got {tuple(v.shape)}")
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def cosine_alpha_sigma(t: Tensor) -> tuple[Tensor, Tensor]:
    """The cosine schedule of both papers: ``alpha_t = cos(pi t / 2)``, ``sigma_t = sin(pi t / 2)``.

    ``t`` ``(B,)`` in [0, 1]; returns two ``(B,)`` tensors. ``t = 0`` is data, ``t = 1`` pure noise.
    """
    t = torch.as_tensor(t)
    if t.numel() and (float(t.min()) < 0 or float(t.max()) > 1):
        raise ValueError(f"cosine_alpha_sigma: t must lie in [0, 1]; got values in [{float(t.min())}, "
                         f"{float(t.max())}]")
    return torch.cos(0.5 * math.pi * t), torch.sin(0.5 * math.pi * t)


def diffusion_log_snr(alpha: Tensor, sigma: Tensor) -> Tensor:
    """``lambda = log(alpha^2 / sigma^2)``, ``(B,)``."""
    return 2 * (torch.log(alpha) - torch.log(sigma))


def x_from_v(z: Tensor, v: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor:
    """The denoised image of a v-prediction: ``x_hat = alpha z - sigma v_hat`` (Salimans & Ho, Sec. 4)."""
    return _b(alpha, z) * z - _b(sigma, z) * v


def v_target(x: Tensor, eps: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor:
    """The velocity ``v = alpha eps - sigma x`` a v-prediction model regresses."""
    return _b(alpha, x) * eps - _b(sigma, x) * x


def eps_from_x(z: Tensor, x_hat: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor:
    """The noise implied by a denoised estimate: ``eps_hat = (z - alpha x_hat) / sigma`` (``sigma > 0``)."""
    return (z - _b(alpha, z) * x_hat) / _b(sigma, z)


def guided_x(x_cond: Tensor, x_uncond: Tensor, w: Tensor | float) -> Tensor:
    """Classifier-free guidance in x-space, Meng et al.'s stage-one target:
    ``x_hat^w = (1 + w) x_hat_c - w x_hat_null``; ``w`` a scalar or ``(B,)``. ``w = 0`` is the conditional model."""
    if x_cond.shape != x_uncond.shape:
        raise ValueError(f"guided_x: x_cond {tuple(x_cond.shape)} and x_uncond {tuple(x_uncond.shape)} differ")
    wb = _b(w, x_cond)
    return (1 + wb) * x_cond - wb * x_uncond


def renoise(z_s: Tensor, alpha_s: Tensor, sigma_s: Tensor, alpha_t: Tensor, sigma_t: Tensor, eps: Tensor) -> Tensor:
    """One draw of the forward process from a time ``s`` to a LATER time ``t > s``, ``q(z_t | z_s)``:

    ``z_t = (alpha_t / alpha_s) z_s + sigma_{t|s} eps``, ``sigma_{t|s}^2 = (1 - exp(lambda_t - lambda_s)) sigma_t^2``
    (``lambda = log(alpha^2 / sigma^2)``; equal to ``sigma_t^2 - (alpha_t / alpha_s)^2 sigma_s^2``, the variance
    of the variance-preserving process between ``s`` and ``t``).

    ``z_s``, ``eps`` ``(B, C, H, W)`` (``eps ~ N(0, I)``); ``alpha_*``, ``sigma_*`` ``(B,)`` with ``alpha_s > 0``.
    At ``s = 0`` (``sigma_s = 0``, ``alpha_s = 1``) this is ``alpha_t z_0 + sigma_t eps``, the usual ``q(z_t | x)``.
    """
    if z_s.shape != eps.shape:
        raise ValueError(f"renoise: z_s {tuple(z_s.shape)} and eps {tuple(eps.shape)} differ")
    lam_s, lam_t = diffusion_log_snr(alpha_s, sigma_s), diffusion_log_snr(alpha_t, sigma_t)
    # lambda_s = +inf at s = 0: exp(-inf) = 0, the full variance sigma_t^2; clamp guards rounding below 0
    var = ((1 - torch.exp(lam_t - lam_s)) * sigma_t ** 2).clamp(min=0)
    shape = (-1, *([1] * (z_s.dim() - 1)))
    return (alpha_t / alpha_s).view(shape) * z_s + var.sqrt().view(shape) * eps


def ddim_step(z_t: Tensor, x_hat: Tensor, alpha_t: Tensor | float, sigma_t: Tensor | float,
              alpha_s: Tensor | float, sigma_s: Tensor | float) -> Tensor:
    """One deterministic DDIM step from time ``t`` to an earlier ``s`` given the denoised estimate
    ``x_hat`` at ``t``: ``z_s = alpha_s x_hat + (sigma_s / sigma_t) (z_t - alpha_t x_hat)``
    (Salimans & Ho, Algorithm 2's teacher steps; ``sigma_t > 0``)."""
    a_t, s_t, a_s, s_s = (_b(v, z_t) for v in (alpha_t, sigma_t, alpha_s, sigma_s))
    return a_s * x_hat + (s_s / s_t) * (z_t - a_t * x_hat)


def progressive_target(z_t: Tensor, z_t2: Tensor, alpha_t: Tensor | float, sigma_t: Tensor | float,
                       alpha_t2: Tensor | float, sigma_t2: Tensor | float) -> Tensor:
    """Salimans & Ho's student target (Algorithm 2): the ``x_tilde`` for which ONE DDIM step of the
    student from ``z_t`` lands where TWO DDIM steps of the teacher landed, ``z_t''`` at ``t'' = t - 1/N``:

    ``x_tilde = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t)``.

    So ``ddim_step(z_t, x_tilde, alpha_t, sigma_t, alpha_t'', sigma_t'') == z_t''`` exactly. At the last
    step (``sigma_t'' = 0``, ``alpha_t'' = 1``) ``x_tilde = z_t''``.
    """
    a_t, s_t, a_2, s_2 = (_b(v, z_t) for v in (alpha_t, sigma_t, alpha_t2, sigma_t2))
    ratio = s_2 / s_t
    return (z_t2 - ratio * z_t) / (a_2 - ratio * a_t)


def diffusion_snr_weight(alpha: Tensor, sigma: Tensor, kind: str = "truncated_snr") -> Tensor:
    """The x-space loss weight ``omega(lambda_t)``, ``(B,)`` (Salimans & Ho, Sec. 4):

    * ``"truncated_snr"``: ``max(alpha^2 / sigma^2, 1)`` (the larger of the x- and eps-losses);
    * ``"snr+1"``: ``alpha^2 / sigma^2 + 1`` (equals the v-loss ``||v - v_hat||^2`` for a VP process);
    * ``"snr"``: ``alpha^2 / sigma^2`` (the eps-loss); ``"none"``: 1 (the plain x-loss).
    """
    if kind not in WEIGHTINGS:
        raise ValueError(f"diffusion_snr_weight: kind must be one of {WEIGHTINGS}; got {kind!r}")
    snr = alpha ** 2 / sigma ** 2
    if kind == "truncated_snr":
        return torch.clamp(snr, min=1.0)
    if kind == "snr+1":
        return snr + 1
    if kind == "snr":
        return snr
    return torch.ones_like(snr)


def diffusion_weighted_mse(x_student: Tensor, x_target: Tensor, weight: Tensor) -> Tensor:
    """``(1/B) sum_b weight_b * mean_d (x_student - x_target)_{b,d}^2`` for ``(B, ...)`` tensors and a
    ``(B,)`` weight. The papers write the squared L2 norm over the ``D`` pixels; the per-pixel mean here is
    that divided by ``D = C H W`` (a constant factor, absorbed by the learning rate)."""
    if x_student.shape != x_target.shape:
        raise ValueError(f"diffusion_weighted_mse: student {tuple(x_student.shape)} and target {tuple(x_target.shape)} "
                         "differ")
    per = (x_student - x_target).pow(2).flatten(1).mean(1)
    return (weight.to(per.dtype) * per).mean()


def ddim_sample(denoise: Callable[[Tensor, Tensor], Tensor], z: Tensor, steps: int) -> Tensor:
    """Deterministic DDIM sampling in ``steps`` equal steps of ``t`` from 1 to 0 (cosine schedule).

    ``denoise(z_t, t)`` returns ``x_hat`` ``(B, C, H, W)`` for the latent ``z_t`` and the times ``t`` ``(B,)``;
    ``z`` ``(B, C, H, W)`` is the starting noise ``z_1``. Step ``i = N..1`` goes from ``t = i/N`` to
    ``s = (i-1)/N``; the last step returns ``x_hat`` (``alpha_0 = 1``, ``sigma_0 = 0``).
    """
    if steps < 1:
        raise ValueError(f"ddim_sample: steps must be >= 1; got {steps}")
    b = z.shape[0]
    for i in range(steps, 0, -1):
        t = torch.full((b,), i / steps, device=z.device, dtype=z.dtype)
        s = torch.full((b,), (i - 1) / steps, device=z.device, dtype=z.dtype)
        a_t, s_t = cosine_alpha_sigma(t)
        a_s, s_s = cosine_alpha_sigma(s)
        x_hat = denoise(z, t)
        z = x_hat if i == 1 else ddim_step(z, x_hat, a_t, s_t, a_s, s_s)
    return z
