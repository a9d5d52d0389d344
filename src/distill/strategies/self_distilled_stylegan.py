"""Self-Distilled StyleGAN: Mokady et al., "Self-Distilled StyleGAN: Towards Generation from Internet
Photos", SIGGRAPH 2022, arXiv 2202.12211.

The generator distils its own training data: (1) a GAN trained on the raw, contaminated collection
(:func:`~distill.strategies.gan.train_gan`), (2) every training image projected into its ``W``
space (:func:`project`) and scored by its reconstruction distance, (3) the worst-reconstructed
share dropped (the outliers: the generator models what is prevalent), (4) a fresh GAN trained on
what is kept, and (5) its latent space clustered into modes (:func:`fit_mode_clusters`) for the
multi-modal truncation trick (:func:`sample_truncated`). The math is in
:mod:`distill.functional.gan_truncation`.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from distill.functional.gan_truncation import (
    keep_lowest,
    kmeans,
    multimodal_truncate,
    nearest_center,
    reconstruction_scores,
    truncate,
)
from distill.papers import Paper
from distill.progress import StepProgress
from distill.strategies.gan import GANResult, train_gan
from distill.strategies.registry import as_model, register_strategy

__all__ = ["ModeClusters", "SELF_DISTILLED_STYLEGAN_PAPER", "SelfDistilledResult", "fit_mode_clusters", "project",
           "sample_truncated", "self_distilled_stylegan"]

SELF_DISTILLED_STYLEGAN_PAPER = Paper("Self-Distilled StyleGAN: Towards Generation from Internet Photos",
                                      "Mokady, Yarom, Tov, Lang, Cohen-Or, Dekel, Irani, Mosseri", 2022,
                                      "2202.12211", "SIGGRAPH 2022")

FeatureFn = Callable[[Tensor], Tensor]


def _pixels(images: Tensor) -> Tensor:
    return images.flatten(1)


def _to01(x: Tensor) -> Tensor:
    return (x.clamp(-1, 1) + 1) / 2


def project(generator: nn.Module, images: Tensor, *, steps: int = 100, lr: float = 0.05,
            feature_net: FeatureFn | None = None, feature_weight: float = 1.0, batch_size: int = 500,
            progress: bool = True) -> tuple[Tensor, Tensor]:
    """Invert ``images`` ``(N, C, H, W)`` in ``[0, 1]``: per image, ``w`` starts at the generator's
    ``w_avg`` and ``steps`` Adam steps minimise ``mean (G(w) - x)^2`` (+ ``feature_weight`` times the
    unit-normalised feature distance when ``feature_net`` is given), the synthesis without noise.

    The paper inverts with an encoder trained on the unfiltered data (e4e-like); optimisation in
    ``W`` is ours (cheap at 28x28 and without a second network to train). Returns
    ``(w (N, w_dim), reconstructions (N, C, H, W) in [0, 1])``."""
    generator.eval()
    params = list(generator.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    ws, recs = [], []
    try:
        with StepProgress(progress, "projection", steps * ((images.shape[0] + batch_size - 1) // batch_size)) as bar:
            for start in range(0, images.shape[0], batch_size):
                x = images[start:start + batch_size]
                w = generator.w_avg.detach().clone().expand(x.shape[0], -1).clone().requires_grad_(True)
                opt = torch.optim.Adam([w], lr=lr)
                f_x = feature_net(x).detach() if feature_net is not None else None
                for _ in range(steps):
                    rec = _to01(generator.synthesis(w, "const"))
                    loss = (rec - x).pow(2).flatten(1).mean(1).sum()
                    if f_x is not None:
                        loss = loss + feature_weight * reconstruction_scores(x, rec, f_x, feature_net(rec)).sum()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    bar.advance(f"loss {float(loss.detach()) / x.shape[0]:.4f}")
                with torch.no_grad():
                    recs.append(_to01(generator.synthesis(w, "const")))
                ws.append(w.detach())
    finally:
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)
    return torch.cat(ws), torch.cat(recs)


@dataclass
class ModeClusters:
    """The modes of a generator's ``W``: ``centers`` ``(K, w_dim)`` (the mean ``w`` of each cluster) and
    ``center_features`` ``(K, F)`` (the features of the centres' images, for nearest-centre search)."""

    centers: Tensor
    center_features: Tensor


@torch.no_grad()
def fit_mode_clusters(generator: nn.Module, num_clusters: int = 10, samples: int = 2000,
                      feature_fn: FeatureFn | None = None, seed: int = 0, batch_size: int = 500) -> ModeClusters:
    """Sample ``samples`` latents ``w = f(z)``, embed their images (no noise) with ``feature_fn``
    (default: the raw pixels), k-means the embeddings into ``num_clusters`` clusters, and return each
    cluster's mean ``w`` and the embedding of the image of that mean (the paper clusters perceptual
    features of generated images; the counts are ours)."""
    feature_fn = feature_fn or _pixels
    generator.eval()
    g = torch.Generator().manual_seed(seed)
    device = generator.w_avg.device
    ws, feats = [], []
    for start in range(0, samples, batch_size):
        z = torch.randn(min(batch_size, samples - start), generator.z_dim, generator=g).to(device)
        w = generator.mapping(z)
        ws.append(w)
        feats.append(feature_fn(_to01(generator.synthesis(w, "const"))).flatten(1))
    w_all, f_all = torch.cat(ws), torch.cat(feats)
    _, assign = kmeans(f_all, num_clusters, seed=seed)
    centers = torch.stack([w_all[assign == k].mean(0) if (assign == k).any() else generator.w_avg.clone()
                           for k in range(num_clusters)])
    center_feats = feature_fn(_to01(generator.synthesis(centers, "const"))).flatten(1)
    return ModeClusters(centers, center_feats)


@torch.no_grad()
def sample_truncated(generator: nn.Module, n: int, psi: float = 0.7, *, clusters: ModeClusters | None = None,
                     feature_fn: FeatureFn | None = None, seed: int = 0, batch_size: int = 500) -> Tensor:
    """``n`` images ``(n, C, H, W)`` in ``[0, 1]``: ``w = f(z)`` truncated towards ``w_avg``
    (``clusters=None``, StyleGAN's trick) or towards the perceptually nearest cluster centre
    (multi-modal truncation: nearest by ``feature_fn`` of ``G(w)`` against ``clusters.center_features``;
    ``feature_fn`` must be the one the clusters were fitted with)."""
    feature_fn = feature_fn or _pixels
    generator.eval()
    g = torch.Generator().manual_seed(seed)
    device = generator.w_avg.device
    out = []
    for start in range(0, n, batch_size):
        z = torch.randn(min(batch_size, n - start), generator.z_dim, generator=g).to(device)
        w = generator.mapping(z)
        if clusters is None:
            w = truncate(w, generator.w_avg, psi)
        else:
            k = nearest_center(feature_fn(_to01(generator.synthesis(w, "const"))).flatten(1), clusters.center_features)
            w = multimodal_truncate(w, clusters.centers, k.to(w.device), psi)
        out.append(_to01(generator.synthesis(w)))
    return torch.cat(out)


@dataclass
class SelfDistilledResult:
    """What :func:`self_distilled_stylegan` returns: the GAN trained on the raw data, the one trained on
    the filtered data, each image's reconstruction score and whether it was kept, the mode clusters
    of the filtered generator's EMA, and the total time."""

    raw: GANResult
    filtered: GANResult
    scores: Tensor
    kept: Tensor
    clusters: ModeClusters
    time_s: float = 0.0


def _fresh(spec: Any, who: str) -> Callable[[], nn.Module]:
    if isinstance(spec, nn.Module):
        pristine = copy.deepcopy(spec)
        return lambda: copy.deepcopy(pristine)
    if callable(spec):
        return lambda: as_model(spec, who)
    raise TypeError(f"{who}: expected an nn.Module or a zero-argument factory; got {spec!r}")


@register_strategy("self_distilled_stylegan", "generative", SELF_DISTILLED_STYLEGAN_PAPER)
def self_distilled_stylegan(student: Any, train_loader: Any = None, val_loader: Any = None, *,
                            discriminator: Any, images: Tensor | None = None, keep_fraction: float = 0.8,
                            steps: int = 2000, batch_size: int = 64, projection_steps: int = 100,
                            projection_lr: float = 0.05, feature_net: FeatureFn | None = None,
                            num_clusters: int = 10, cluster_samples: int = 2000, progress: bool = True,
                            seed: int = 0, **gan_kwargs: Any) -> SelfDistilledResult:
    """Self-Distilled StyleGAN (Mokady et al., SIGGRAPH 2022, arXiv 2202.12211) on a contaminated set.

    1. ``raw``: :func:`~distill.strategies.gan.train_gan` of a fresh generator on all ``images``.
    2. :func:`project` every image into the raw generator's EMA; score it by
       :func:`~distill.functional.gan_truncation.reconstruction_scores` (pixel MSE, or the
       unit-normalised ``feature_net`` feature distance when one is given: the paper's LPIPS).
    3. Keep the ``keep_fraction`` best-reconstructed images (:func:`~distill.functional.gan_truncation.keep_lowest`).
    4. ``filtered``: a fresh generator and discriminator trained the same way on the kept images.
    5. :func:`fit_mode_clusters` of the filtered EMA (``num_clusters`` k-means clusters of
       ``cluster_samples`` samples, embedded by ``feature_net`` or pixels); sample with
       :func:`sample_truncated`.

    The paper's details beyond its abstract and pipeline caption could not be read here: the encoder
    (replaced by optimisation, :func:`project`), the share kept (``keep_fraction`` 0.8), the cluster
    count (10, MNIST's classes) and sample count are ours; the GAN settings are
    :func:`~distill.strategies.gan.train_gan`'s (``steps``, ``batch_size`` and ``gan_kwargs``).

    Args:
        student: a generator (copied: both GANs start from its initial weights) or a zero-argument
            factory of one (a :class:`~distill.models.stylegan.StyleGenerator`).
        train_loader: (images, labels) batches, read once when ``images`` is None; val_loader: unused.
        discriminator: a discriminator (copied likewise) or a factory.
        images: the contaminated training set ``(N, C, H, W)`` in ``[0, 1]``.
    """
    t0 = time.perf_counter()
    if images is None:
        if train_loader is None:
            raise ValueError("self_distilled_stylegan: pass images (N, C, H, W) in [0, 1] or a train_loader")
        images = torch.cat([b[0] if isinstance(b, (list, tuple)) else b for b in train_loader])
    if not 0 < keep_fraction <= 1:
        raise ValueError(f"self_distilled_stylegan: keep_fraction must be in (0, 1]; got {keep_fraction}")
    new_g, new_d = _fresh(student, "self_distilled_stylegan"), _fresh(discriminator, "self_distilled_stylegan")
    raw = train_gan(new_g(), new_d(), images, steps=steps, batch_size=batch_size, progress=progress, seed=seed,
                    **gan_kwargs)
    if isinstance(feature_net, nn.Module):
        feature_net.eval().requires_grad_(False)
    _, recs = project(raw.ema, images, steps=projection_steps, lr=projection_lr, feature_net=feature_net,
                      progress=progress)
    with torch.no_grad():
        if feature_net is None:
            scores = reconstruction_scores(images, recs)
        else:
            scores = reconstruction_scores(images, recs, feature_net(images), feature_net(recs))
    kept = keep_lowest(scores, keep_fraction)
    filtered = train_gan(new_g(), new_d(), images[kept], steps=steps, batch_size=batch_size, progress=progress,
                         seed=seed + 1, **gan_kwargs)
    clusters = fit_mode_clusters(filtered.ema, num_clusters, cluster_samples, feature_net, seed=seed)
    return SelfDistilledResult(raw, filtered, scores, kept, clusters, time.perf_counter() - t0)
