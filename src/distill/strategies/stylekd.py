"""StyleKD: Xu, Hou, Liu, Loy, "Mind the Gap in Distilling StyleGANs", ECCV 2022, arXiv 2208.08840.

A narrow student StyleGAN generator (e.g. the zoo's ``stylegan_small``) learns from a trained
teacher (``stylegan_mnist``) on the same latents: its mapping network starts as a copy of the
teacher's (the paper's initialisation: same ``z`` -> same ``w``, so the outputs can agree), and
its generator loss adds to the GAN loss the output-image L1 and perceptual distances, the mapping
output distance and the latent-direction-based relation loss of
:mod:`distill.functional.stylegan_kd`. The loop is :func:`distill.strategies.gan.train_gan`'s
(logistic loss, lazy R1, Adam (0, 0.99), EMA) with the student in the generator's place.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from distill.functional.stylegan_kd import (
    feature_distance,
    image_l1,
    latent_direction_relation,
    mapping_l1,
    principal_directions,
    sample_offsets,
)
from distill.papers import Paper
from distill.progress import StepProgress
from distill.strategies.gan import (
    GANResult,
    discriminator_loss,
    ema_beta,
    g_nonsaturating_loss,
    save_gan_checkpoint,
    update_ema,
)
from distill.strategies.registry import as_model, register_strategy
from distill.taps import Taps

__all__ = ["STYLEKD_PAPER", "StyleKDWeights", "block_affine_weights", "images_of", "stylekd",
           "stylekd_generator_loss"]

STYLEKD_PAPER = Paper("Mind the Gap in Distilling StyleGANs", "Xu, Hou, Liu, Loy", 2022, "2208.08840", "ECCV 2022")


@dataclass(frozen=True)
class StyleKDWeights:
    """The generator loss's weights. Defaults: the authors' README command (``kd_l1_lambda 3``,
    ``kd_lpips_lambda 3``, ``kd_simi_lambda 30``, ``kd_style_lambda 0``, GAN loss weight 1); here
    ``perceptual`` weights :func:`~distill.functional.stylegan_kd.feature_distance` in LPIPS's place."""

    gan: float = 1.0
    l1: float = 3.0
    perceptual: float = 3.0
    relation: float = 30.0
    mapping: float = 0.0

    def __post_init__(self) -> None:
        for k in ("gan", "l1", "perceptual", "relation", "mapping"):
            v = getattr(self, k)
            if not isinstance(v, (int, float)) or v < 0 or not math.isfinite(v):
                raise ValueError(f"StyleKDWeights: {k} must be a finite number >= 0; got {v!r}")


def block_affine_weights(generator: nn.Module) -> list[Tensor]:
    """Per synthesis block of a :class:`~distill.models.stylegan.StyleGenerator`, its modulated
    convolutions' style affine weights stacked ``(sum of in_channels, w_dim)`` (toRGB left out, as the
    authors' ``calc_direction_split`` takes the two convolutions of each block)."""
    layers = getattr(getattr(generator, "synthesis", None), "layers", None)
    if layers is None:
        raise TypeError("block_affine_weights: the teacher must be a StyleGenerator (synthesis.layers)")
    return [torch.cat([layer.conv.affine.weight for layer in block]) for block in layers.values()]


def images_of(generated: Tensor) -> Tensor:
    """A generator's ``[-1, 1]`` images as ``[0, 1]`` images (what the feature nets take)."""
    return (generated.clamp(-1, 1) + 1) / 2


def stylekd_generator_loss(student: nn.Module, teacher: nn.Module, z: Tensor, offsets: Tensor | None,
                           weights: StyleKDWeights, *, discriminator: nn.Module | None = None,
                           feature_net: Callable[[Tensor], Tensor] | None = None,
                           student_taps: Taps | None = None, teacher_taps: Taps | None = None,
                           relation_form: str = "kl", noise: str = "random") -> tuple[Tensor, dict[str, float]]:
    """The student's loss for latents ``z`` ``(B, z_dim)``:

    ``gan * softplus(-D(G_s(z))) + l1 * |G_s(z) - G_t(z)| + perceptual * d_feat(G_s(z), G_t(z))
    + mapping * |w_s - w_t| + relation * sum_layers L_rel``, each term as in
    :mod:`distill.functional.stylegan_kd`. For the relation, both generators run their synthesis on
    ``[w; w + offsets]`` (``2B`` latents, the same ``offsets`` ``(B, w_dim)`` for both, added to each
    one's own ``w``) and ``L_rel`` compares the tapped block features of the two halves; the other
    terms use the first half. The teacher runs without gradients. A term whose weight is 0 is not
    computed (``offsets``, the taps, ``discriminator`` and ``feature_net`` are needed only for
    their terms).

    Returns: ``(loss, parts)``, ``parts`` the unweighted terms as floats.
    """
    b = z.shape[0]
    use_rel = weights.relation > 0
    if use_rel and (offsets is None or student_taps is None or teacher_taps is None):
        raise ValueError("stylekd_generator_loss: the relation term needs offsets and student/teacher taps")
    if weights.gan > 0 and discriminator is None:
        raise ValueError("stylekd_generator_loss: the GAN term needs a discriminator")
    if weights.perceptual > 0 and feature_net is None:
        raise ValueError("stylekd_generator_loss: the perceptual term needs a feature_net")
    w_s = student.mapping(z)
    with torch.no_grad():
        w_t = teacher.mapping(z)
    if use_rel:
        with student_taps.recording() as fs:  # type: ignore[union-attr]
            x_s = student.synthesis(torch.cat([w_s, w_s + offsets]), noise)
        with torch.no_grad(), teacher_taps.recording() as ft:  # type: ignore[union-attr]
            x_t = teacher.synthesis(torch.cat([w_t, w_t + offsets]), noise)
        x_s, x_t = x_s[:b], x_t[:b]
    else:
        x_s = student.synthesis(w_s, noise)
        with torch.no_grad():
            x_t = teacher.synthesis(w_t, noise)
    parts: dict[str, float] = {}
    loss = x_s.new_zeros(())
    if weights.gan > 0:
        term = g_nonsaturating_loss(discriminator(x_s))  # type: ignore[misc]
        loss, parts["gan"] = loss + weights.gan * term, float(term.detach())
    if weights.l1 > 0:
        term = image_l1(x_s, x_t)
        loss, parts["l1"] = loss + weights.l1 * term, float(term.detach())
    if weights.perceptual > 0:
        with torch.no_grad():
            f_t = feature_net(images_of(x_t))  # type: ignore[misc]
        term = feature_distance(feature_net(images_of(x_s)), f_t)  # type: ignore[misc]
        loss, parts["perceptual"] = loss + weights.perceptual * term, float(term.detach())
    if weights.mapping > 0:
        term = mapping_l1(w_s, w_t)
        loss, parts["mapping"] = loss + weights.mapping * term, float(term.detach())
    if use_rel:
        term = x_s.new_zeros(())
        for ps, pt in zip(student_taps.paths, teacher_taps.paths, strict=True):  # type: ignore[union-attr]
            term = term + latent_direction_relation(fs[ps][:b], fs[ps][b:], ft[pt][:b], ft[pt][b:], relation_form)
        loss, parts["relation"] = loss + weights.relation * term, float(term.detach())
    return loss, parts


def _real_images(images: Tensor | None, train_loader: Any) -> Tensor:
    if images is None:
        if train_loader is None:
            raise ValueError("stylekd: pass images (N, C, H, W) in [0, 1] or a train_loader of (images, labels)")
        images = torch.cat([b[0] if isinstance(b, (list, tuple)) else b for b in train_loader])
    if images.dim() != 4 or float(images.min()) < -1e-6 or float(images.max()) > 1 + 1e-6:
        raise ValueError(f"stylekd: images must be (N, C, H, W) in [0, 1]; got shape {tuple(images.shape)}, "
                         f"range [{float(images.min()):.3g}, {float(images.max()):.3g}]")
    return images


@register_strategy("stylekd", "generative", STYLEKD_PAPER)
def stylekd(student: Any, train_loader: Any = None, val_loader: Any = None, *, teacher: nn.Module,
            images: Tensor | None = None, discriminator: nn.Module | None = None,
            feature_net: Callable[[Tensor], Tensor] | None = None, weights: StyleKDWeights | None = None,
            steps: int = 2000, batch_size: int = 32, lr: float = 2.5e-3, betas: tuple[float, float] = (0.0, 0.99),
            init_mapping: bool = True, mapping_lr_mult: float = 0.01, relation_form: str = "kl",
            relation_resolutions: list[int] | None = None, directions_per_block: int = 5, offset_sigma: float = 5.0,
            r1_gamma: float = 0.1, r1_every: int = 16, ema_kimg: float | None = None, ema_rampup: float = 0.05,
            log_every: int = 50, checkpoint: str | Path | None = None, progress: bool = True,
            seed: int = 0) -> GANResult:
    """StyleKD (Xu et al., ECCV 2022, arXiv 2208.08840): distil a StyleGAN teacher into a narrower student.

    1. ``init_mapping``: the student's mapping network (and ``w_avg``) is copied from the teacher's
       (the authors' ``--load_style 1``); it keeps training at ``mapping_lr_mult`` times the lr
       (their ``lr_mlp 0.01``). Latent sizes must match.
    2. Directions: :func:`~distill.functional.stylegan_kd.principal_directions` of the teacher's
       blocks (``directions_per_block`` each, the authors' 5), offsets with ``offset_sigma`` 5.
    3. Per step: one discriminator step (logistic + lazy R1, as :func:`~distill.strategies.gan.train_gan`)
       on real ``images`` and the student's fakes, one student step on
       :func:`stylekd_generator_loss`, the student EMA update.

    Defaults from the authors' code and README (the paper's text beyond its abstract could not be
    read here): weights ``l1 3, perceptual 3, relation 30, mapping 0`` (:class:`StyleKDWeights`),
    relation form ``kl``, directions ``split`` with 5 per block, offset sigma 5; their relation layers
    are the middle blocks (16 to 128 of a 256 generator), ours every block above the start resolution
    (``relation_resolutions``, 14 and 28 for 28x28). Ours: batch 32, steps, lr 0.0025 (StyleGAN2's),
    R1 gamma 0.1, a fresh discriminator (theirs too, ``--load 0``) unless one is passed.

    Args:
        student: a :class:`~distill.models.stylegan.StyleGenerator` (or a zero-argument factory).
        train_loader: (images, labels) batches, read once when ``images`` is None; val_loader: unused.
        teacher: the trained teacher generator (frozen, eval mode).
        images: the real set ``(N, C, H, W)`` in ``[0, 1]`` for the GAN loss.
        discriminator: default a fresh ``StyleDiscriminator`` of the images' size.
        feature_net: maps ``[0, 1]`` images to features ``(B, F)`` for the perceptual term (e.g.
            :func:`~distill.train.generative_eval.train_feature_net`); needed when its weight > 0.
    Returns: a :class:`~distill.strategies.gan.GANResult` of the student (``ema``: sample from it).
    """
    from distill.models.stylegan import StyleDiscriminator

    student = as_model(student, "stylekd")
    weights = weights or StyleKDWeights()
    images = _real_images(images, train_loader)
    if getattr(teacher, "c_dim", 0) or getattr(student, "c_dim", 0):
        raise ValueError("stylekd: conditional generators are not supported (the paper distils unconditional ones)")
    if (student.z_dim, student.w_dim) != (teacher.z_dim, teacher.w_dim):
        raise ValueError(f"stylekd: student and teacher latent sizes differ: (z_dim, w_dim) {(student.z_dim, student.w_dim)}"
                         f" vs {(teacher.z_dim, teacher.w_dim)}")
    if weights.perceptual > 0 and feature_net is None:
        raise ValueError("stylekd: the perceptual weight is > 0 but no feature_net was given (LPIPS cannot be "
                         "downloaded: pass distill.train.generative_eval.train_feature_net(...) or set "
                         "weights.perceptual=0)")
    for name, v in (("steps", steps), ("batch_size", batch_size), ("r1_every", r1_every), ("log_every", log_every)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"stylekd: {name} must be a positive int; got {v!r}")
    resolutions = teacher.synthesis.resolutions
    rel_res = list(resolutions[1:]) if relation_resolutions is None else list(relation_resolutions)
    bad = [r for r in rel_res if r not in resolutions or r not in student.synthesis.resolutions]
    if weights.relation > 0 and (bad or not rel_res):
        raise ValueError(f"stylekd: relation_resolutions must be a non-empty subset of {resolutions}; got {rel_res}")

    device = images.device
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    teacher = teacher.to(device).eval().requires_grad_(False)
    student.to(device).train()
    if init_mapping:
        student.mapping.load_state_dict(teacher.mapping.state_dict())
    if discriminator is None:
        discriminator = StyleDiscriminator(images.shape[1], images.shape[2])
    discriminator.to(device).train()
    if feature_net is not None and isinstance(feature_net, nn.Module):
        feature_net.eval().requires_grad_(False)
    ema = copy.deepcopy(student).eval().requires_grad_(False)
    mapping_params = list(student.mapping.parameters())
    ids = {id(p) for p in mapping_params}
    opt_g = torch.optim.Adam([{"params": [p for p in student.parameters() if id(p) not in ids]},
                              {"params": mapping_params, "lr": lr * mapping_lr_mult}], lr=lr, betas=betas)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=lr, betas=betas)
    directions = principal_directions(block_affine_weights(teacher), directions_per_block).to(device)
    paths = [f"synthesis.b{r}" for r in rel_res]
    s_taps = Taps(student, paths, model_name="student") if weights.relation > 0 else None
    t_taps = Taps(teacher, paths, model_name="teacher") if weights.relation > 0 else None
    ema_kimg = batch_size * 10 / 32 if ema_kimg is None else ema_kimg
    real_all = images * 2 - 1
    result = GANResult(student, ema, discriminator)
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    t0 = time.perf_counter()
    try:
        with StepProgress(progress, "StyleKD", steps) as bar:
            for step in range(1, steps + 1):
                real = real_all[torch.randint(0, real_all.shape[0], (batch_size,), generator=g).to(device)]
                z = torch.randn(batch_size, student.z_dim, generator=g).to(device)
                with torch.no_grad():
                    student.eval()
                    fake = student(z)
                    student.train()
                lazy = r1_gamma > 0 and step % r1_every == 0
                d_loss, parts = discriminator_loss(discriminator, real, fake,
                                                   r1_weight=(r1_gamma / 2) * r1_every if lazy else 0.0)
                opt_d.zero_grad(set_to_none=True)
                d_loss.backward()
                opt_d.step()
                z = torch.randn(batch_size, student.z_dim, generator=g).to(device)
                offsets = sample_offsets(directions, batch_size, offset_sigma, g) if weights.relation > 0 else None
                discriminator.requires_grad_(False)
                g_loss, g_parts = stylekd_generator_loss(student, teacher, z, offsets, weights,
                                                         discriminator=discriminator, feature_net=feature_net,
                                                         student_taps=s_taps, teacher_taps=t_taps,
                                                         relation_form=relation_form)
                discriminator.requires_grad_(True)
                opt_g.zero_grad(set_to_none=True)
                g_loss.backward()
                opt_g.step()
                update_ema(ema, student, ema_beta(step, batch_size, ema_kimg, ema_rampup))
                value = float(g_loss.detach())
                if not math.isfinite(value):
                    raise FloatingPointError(f"stylekd: the student's loss became {value} at step {step}")
                for k, v in {**parts, **g_parts, "g_total": value}.items():
                    sums[k] = sums.get(k, 0.0) + v
                    counts[k] = counts.get(k, 0) + 1
                if step % log_every == 0 or step == steps:
                    result.history.append({"step": float(step), **{k: v / counts[k] for k, v in sums.items()},
                                           "time_s": time.perf_counter() - t0})
                    sums.clear()
                    counts.clear()
                bar.advance(f"D {parts['d_loss']:.3f} G {value:.3f}")
    finally:
        for taps in (s_taps, t_taps):
            if taps is not None:
                taps.remove()
    student.eval()
    result.time_s = time.perf_counter() - t0
    if checkpoint is not None:
        result.checkpoint = save_gan_checkpoint(checkpoint, student, ema, discriminator,
                                                {"strategy": "stylekd", "steps": str(steps), "seed": str(seed)})
    return result
