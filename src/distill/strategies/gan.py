"""A plain StyleGAN2-style GAN trainer: non-saturating logistic loss, lazy R1, Adam (0, 0.99), a
generator EMA and ``w_avg`` tracking; the GAN teachers of issue 16 are trained with it.

The losses follow Karras et al., "Analyzing and Improving the Image Quality of StyleGAN" (CVPR 2020,
arXiv 1912.04958), which take the non-saturating logistic loss of Goodfellow et al. 2014 and the R1
penalty of Mescheder et al., "Which Training Methods for GANs do actually Converge?" (ICML 2018,
arXiv 1801.04406):

* discriminator: ``L_D = E_x[softplus(-D(x))] + E_z[softplus(D(G(z)))]``
  (:func:`d_logistic_loss`), plus ``(gamma / 2) E_x[||grad_x D(x)||^2]`` on real images
  (:func:`r1_penalty`), applied lazily every ``r1_every`` steps with its weight multiplied by
  ``r1_every`` (StyleGAN2's lazy regularisation);
* generator: ``L_G = E_z[softplus(-D(G(z)))]`` (:func:`g_nonsaturating_loss`).

Departures from StyleGAN2, scaled down for 28x28 images on a CPU: no path-length regulariser, no
style mixing (the shared :class:`~distill.models.stylegan.StyleGenerator` takes one ``w`` per image),
no augmentation. The EMA follows StyleGAN2-ADA's schedule (half-life ``ema_kimg`` thousand images,
ramped up to ``ema_rampup`` times the images seen).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.papers import Paper
from distill.progress import StepProgress

__all__ = ["GANResult", "STYLEGAN2_PAPER", "d_logistic_loss", "discriminator_loss", "ema_beta", "update_ema", "g_nonsaturating_loss", "labels_to_c",
           "load_gan_checkpoint", "r1_penalty", "sample_c", "save_gan_checkpoint", "start_gan", "train_gan"]

STYLEGAN2_PAPER = Paper("Analyzing and Improving the Image Quality of StyleGAN",
                        "Karras, Laine, Aittala, Hellsten, Lehtinen, Aila", 2020, "1912.04958", "CVPR 2020")


def _call(model: nn.Module, x: Tensor, c: Tensor | None) -> Tensor:
    return model(x) if c is None else model(x, c)


def d_logistic_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """The discriminator's logistic loss ``mean(softplus(-D(x))) + mean(softplus(D(G(z))))``.

    Args:
        real_logits: ``(B,)`` or ``(B, 1)`` discriminator outputs on real images.
        fake_logits: ``(B',)`` or ``(B', 1)`` on generated images.
    """
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def g_nonsaturating_loss(fake_logits: Tensor) -> Tensor:
    """The generator's non-saturating loss ``mean(softplus(-D(G(z))))`` for logits ``(B,)``/``(B, 1)``."""
    return F.softplus(-fake_logits).mean()


def r1_penalty(discriminator: nn.Module, real: Tensor, c: Tensor | None = None) -> Tensor:
    """``E_x[||grad_x D(x)||^2]``: the mean over the batch of the squared L2 norm of the gradient of
    the discriminator's output with respect to each real image (Mescheder et al. 2018's R1, without
    its ``gamma / 2``). Built with ``create_graph=True`` so that it can be backpropagated.

    Args:
        discriminator: maps ``(B, C, H, W)`` (and ``c``) to logits ``(B,)`` or ``(B, 1)``.
        real: real images ``(B, C, H, W)``.
        c: the conditioning ``(B, c_dim)`` of a conditional discriminator, else None.
    Returns: a scalar.
    """
    x = real.detach().requires_grad_(True)
    out = discriminator(x) if c is None else discriminator(x, c)
    (grad,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()


def discriminator_loss(discriminator: nn.Module, real: Tensor, fake: Tensor, c_real: Tensor | None = None,
                       c_fake: Tensor | None = None, r1_weight: float = 0.0) -> tuple[Tensor, dict[str, float]]:
    """One discriminator step's loss: ``d_logistic_loss(D(real), D(fake)) + r1_weight * r1_penalty(D, real)``
    (the R1 term only when ``r1_weight > 0``; :func:`train_gan` passes ``(gamma / 2) * r1_every`` on
    its lazy-regularisation steps and 0 otherwise).

    Args:
        real: ``(B, C, H, W)`` real images in ``[-1, 1]``; fake: ``(B', C, H, W)`` generated ones
            (detached). c_real, c_fake: their conditioning ``(B, c_dim)`` / ``(B', c_dim)`` or None.
    Returns: ``(loss, parts)`` with the floats ``"d_loss"`` (the logistic part) and ``"r1"`` (when computed).
    """
    d = d_logistic_loss(_call(discriminator, real, c_real), _call(discriminator, fake, c_fake))
    parts = {"d_loss": float(d.detach())}
    loss = d
    if r1_weight > 0:
        r1 = r1_penalty(discriminator, real, c_real)
        loss = loss + r1_weight * r1
        parts["r1"] = float(r1.detach())
    return loss, parts


def ema_beta(step: int, batch_size: int, ema_kimg: float, ema_rampup: float | None) -> float:
    """StyleGAN2-ADA's EMA coefficient after ``step`` steps: ``0.5 ** (batch_size / n)`` with the
    half-life ``n = 1000 * ema_kimg`` images, capped at ``ema_rampup * step * batch_size`` when
    ``ema_rampup`` is set (so that a short run's EMA is not stuck at its initial weights)."""
    n = ema_kimg * 1000
    if ema_rampup:
        n = min(n, step * batch_size * ema_rampup)
    return 0.5 ** (batch_size / max(n, 1e-8))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, beta: float) -> None:
    """``p_ema <- beta * p_ema + (1 - beta) * p`` for every parameter; buffers (``w_avg``) are copied."""
    for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
        p_ema.lerp_(p.detach(), 1.0 - beta)
    for b_ema, b in zip(ema.buffers(), model.buffers(), strict=True):
        b_ema.copy_(b)


def labels_to_c(labels: Tensor | None, c_dim: int) -> Tensor | None:
    """The conditioning vectors ``(N, c_dim)`` of ``labels``: class ids ``(N,)`` become one-hot, float
    ``(N, c_dim)`` soft labels pass as they are; None (and ``c_dim == 0``) is unconditional."""
    if c_dim == 0:
        if labels is not None:
            raise ValueError("train_gan: labels were given but the generator is unconditional (c_dim=0)")
        return None
    if labels is None:
        raise ValueError(f"train_gan: the generator is conditional (c_dim={c_dim}); pass labels (class ids (N,) "
                         f"or soft labels (N, {c_dim}))")
    if labels.dim() == 1 and not labels.is_floating_point():
        if int(labels.min()) < 0 or int(labels.max()) >= c_dim:
            raise ValueError(f"train_gan: class ids must lie in [0, {c_dim}); got [{int(labels.min())}, "
                             f"{int(labels.max())}]")
        return F.one_hot(labels.long(), c_dim).float()
    if labels.dim() == 2 and labels.shape[1] == c_dim:
        return labels.float()
    raise ValueError(f"train_gan: labels must be class ids (N,) or conditioning vectors (N, {c_dim}); got shape "
                     f"{tuple(labels.shape)} ({labels.dtype})")


def sample_c(c_all: Tensor | None, n: int, generator: torch.Generator) -> Tensor | None:
    """``n`` conditioning rows drawn at random from the real set's ``c_all`` ``(N, c_dim)`` (the
    label distribution of the data, as StyleGAN2-ADA samples fake labels), or None."""
    if c_all is None:
        return None
    idx = torch.randint(0, c_all.shape[0], (n,), generator=generator)
    return c_all[idx.to(c_all.device)]


def start_gan(generator: nn.Module, discriminator: nn.Module, *, lr: float, betas: tuple[float, float], seed: int,
              device: torch.device | str) -> tuple[torch.Generator, nn.Module, torch.optim.Optimizer,
                                                   torch.optim.Optimizer]:
    """What every GAN loop here starts with: seeded global and sampling generators, both players on
    ``device`` in train mode, a frozen EMA copy of the generator, and one Adam per player. Returns
    ``(sampling generator, ema, opt_g, opt_d)``."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    generator.to(device).train()
    discriminator.to(device).train()
    ema = copy.deepcopy(generator).eval().requires_grad_(False)
    opt_g = torch.optim.Adam(generator.parameters(), lr=lr, betas=betas)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=lr, betas=betas)
    return g, ema, opt_g, opt_d


@dataclass
class GANResult:
    """What :func:`train_gan` returns: the trained generator, its EMA (the one to sample from), the
    discriminator, one history row per ``log_every`` steps, the time and the checkpoint written."""

    generator: nn.Module
    ema: nn.Module
    discriminator: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    time_s: float = 0.0
    checkpoint: Path | None = None


def save_gan_checkpoint(path: str | Path, generator: nn.Module, ema: nn.Module, discriminator: nn.Module,
                        meta: dict[str, str] | None = None) -> Path:
    """Write the three state dicts (keys prefixed ``G.``, ``G_ema.``, ``D.``) to one safetensors file."""
    from safetensors.torch import save_file

    tensors: dict[str, Tensor] = {}
    for prefix, m in (("G", generator), ("G_ema", ema), ("D", discriminator)):
        for k, v in m.state_dict().items():
            tensors[f"{prefix}.{k}"] = v.detach().cpu().contiguous().clone()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta or {})
    return path


def load_gan_checkpoint(path: str | Path, generator: nn.Module | None = None, ema: nn.Module | None = None,
                        discriminator: nn.Module | None = None) -> None:
    """Load a :func:`save_gan_checkpoint` file into the given modules (strict; nothing executes)."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    for prefix, m in (("G", generator), ("G_ema", ema), ("D", discriminator)):
        if m is not None:
            sd = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
            if not sd:
                raise KeyError(f"load_gan_checkpoint: {path} holds no {prefix}.* tensors")
            m.load_state_dict(sd)


def train_gan(generator: nn.Module, discriminator: nn.Module, images: Tensor, labels: Tensor | None = None, *,
              steps: int = 2000, batch_size: int = 64, lr: float = 2.5e-3, betas: tuple[float, float] = (0.0, 0.99),
              r1_gamma: float = 0.1, r1_every: int = 16, ema_kimg: float | None = None, ema_rampup: float = 0.05,
              log_every: int = 50, checkpoint: str | Path | None = None,
              progress: bool = True, seed: int = 0) -> GANResult:
    """Train ``generator`` against ``discriminator`` on ``images`` (StyleGAN2's losses, scaled down).

    Each step: one discriminator step on a real batch and a fake batch (``d_logistic_loss``; every
    ``r1_every`` steps also ``(r1_gamma / 2) * r1_every * r1_penalty`` on the real batch), then one
    generator step (``g_nonsaturating_loss``), then the EMA update
    ``ema <- beta * ema + (1 - beta) * G`` with ``beta = 0.5 ** (batch_size / (1000 * ema_kimg'))``,
    ``ema_kimg' = min(ema_kimg, ema_rampup * images_seen / 1000)``; buffers (``w_avg``) are copied
    into the EMA. ``w_avg`` itself is tracked by the generator's mapping network in training mode
    (:class:`~distill.models.stylegan.MappingNetwork`, beta 0.995): the discriminator's fakes are
    made in eval mode so that it moves once per generator step.

    Defaults: Adam with StyleGAN2's betas ``(0, 0.99)`` and lr 0.0025 for both networks, lazy R1
    every 16 steps, EMA half-life ``ema_kimg = batch_size * 10 / 32`` thousand images with ramp-up
    0.05 (StyleGAN2-ADA's ``auto`` configuration). ``r1_gamma`` 0.1 is ours, not tuned (ADA's auto rule
    ``0.0002 * res^2 / batch`` would give ~0.0025 for 28x28 at batch 64).

    Args:
        generator: ``forward(z)`` (or ``forward(z, c)`` when ``generator.c_dim > 0``) -> images in
            ``[-1, 1]`` of shape ``(B, C, H, W)``; ``generator.z_dim`` gives the latent size.
        discriminator: ``forward(x)`` (or ``forward(x, c)``) -> logits ``(B,)`` or ``(B, 1)``.
        images: the real training set ``(N, C, H, W)`` with values in ``[0, 1]`` (scaled to
            ``[-1, 1]`` here).
        labels: for a conditional generator, class ids ``(N,)`` (one-hot conditioning) or soft labels
            ``(N, c_dim)`` (DarkGAN's conditioning); None for an unconditional one.
        steps, batch_size, lr, betas, r1_gamma, r1_every, ema_kimg, ema_rampup: above.
        log_every: a history row (mean losses since the last row) every this many steps.
        checkpoint: where to write G, G_ema and D as safetensors at the end (None: nothing written).
        progress: a rich progress bar; ``False`` silences it.
        seed: seeds the latents, the batches and ``torch.manual_seed``.
    Returns: a :class:`GANResult`; ``result.ema`` is the generator to sample from (eval mode).
    """
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise ValueError(f"train_gan: images must be a tensor (N, C, H, W); got "
                         f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}")
    lo, hi = float(images.min()), float(images.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise ValueError(f"train_gan: images must lie in [0, 1]; got values in [{lo:.3g}, {hi:.3g}]")
    for name, v in (("steps", steps), ("batch_size", batch_size), ("r1_every", r1_every), ("log_every", log_every)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"train_gan: {name} must be a positive int; got {v!r}")
    if r1_gamma < 0 or lr <= 0:
        raise ValueError(f"train_gan: r1_gamma must be >= 0 and lr > 0; got r1_gamma={r1_gamma}, lr={lr}")
    z_dim = getattr(generator, "z_dim", None)
    if not isinstance(z_dim, int):
        raise ValueError("train_gan: the generator must have an int attribute z_dim (its latent size)")
    c_dim = int(getattr(generator, "c_dim", 0) or 0)
    device = images.device
    c_all = labels_to_c(labels.to(device) if labels is not None else None, c_dim)
    if c_all is not None and c_all.shape[0] != images.shape[0]:
        raise ValueError(f"train_gan: {images.shape[0]} images but {c_all.shape[0]} labels")
    ema_kimg = batch_size * 10 / 32 if ema_kimg is None else ema_kimg

    g, ema, opt_g, opt_d = start_gan(generator, discriminator, lr=lr, betas=betas, seed=seed, device=device)
    real_all = images * 2 - 1
    n = images.shape[0]
    result = GANResult(generator, ema, discriminator)
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    t0 = time.perf_counter()

    def note(key: str, value: float) -> None:
        if not math.isfinite(value):
            raise FloatingPointError(f"train_gan: {key} became {value} at step {step}")
        sums[key] = sums.get(key, 0.0) + value
        counts[key] = counts.get(key, 0) + 1

    with StepProgress(progress, "GAN", steps) as bar:
        for step in range(1, steps + 1):
            idx = torch.randint(0, n, (batch_size,), generator=g).to(device)
            real = real_all[idx]
            c_real = None if c_all is None else c_all[idx]
            # discriminator step
            z = torch.randn(batch_size, z_dim, generator=g).to(device)
            c_fake = sample_c(c_all, batch_size, g)
            with torch.no_grad():
                generator.eval()  # no w_avg update from the discriminator's fakes: one per generator step
                fake = _call(generator, z, c_fake)
                generator.train()
            lazy = r1_gamma > 0 and step % r1_every == 0
            loss, parts = discriminator_loss(discriminator, real, fake, c_real, c_fake,
                                             (r1_gamma / 2) * r1_every if lazy else 0.0)
            for k, v in parts.items():
                note(k, v)
            opt_d.zero_grad(set_to_none=True)
            loss.backward()
            opt_d.step()
            # generator step
            z = torch.randn(batch_size, z_dim, generator=g).to(device)
            c_fake = sample_c(c_all, batch_size, g)
            discriminator.requires_grad_(False)
            g_loss = g_nonsaturating_loss(_call(discriminator, _call(generator, z, c_fake), c_fake))
            discriminator.requires_grad_(True)
            opt_g.zero_grad(set_to_none=True)
            g_loss.backward()
            opt_g.step()
            note("g_loss", float(g_loss.detach()))
            update_ema(ema, generator, ema_beta(step, batch_size, ema_kimg, ema_rampup))
            if step % log_every == 0 or step == steps:
                row = {"step": float(step), **{k: sums[k] / counts[k] for k in sums}}
                row["time_s"] = time.perf_counter() - t0
                result.history.append(row)
                sums.clear()
                counts.clear()
            bar.advance(f"D {parts['d_loss']:.3f} G {float(g_loss.detach()):.3f}")
    generator.eval()
    result.time_s = time.perf_counter() - t0
    if checkpoint is not None:
        result.checkpoint = save_gan_checkpoint(checkpoint, generator, ema, discriminator,
                                                {"steps": str(steps), "seed": str(seed)})
    return result
