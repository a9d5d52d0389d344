"""The math of Self-Distilled StyleGAN: Mokady, Yarom, Tov, Lang, Cohen-Or, Dekel, Irani, Mosseri,
"Self-Distilled StyleGAN: Towards Generation from Internet Photos", SIGGRAPH 2022, arXiv 2202.12211.

* **Generator-based self-filtering**: a generator trained on the raw, contaminated collection models
  its prevalent content; each training image ``x_i`` is scored by how badly the generator
  reconstructs it, ``s_i = d(x_i, G(w_i*))`` with ``w_i*`` its inversion (the paper: an encoder
  trained on the unfiltered data and the LPIPS distance), and the images with the largest scores are
  dropped (:func:`reconstruction_scores`, :func:`keep_lowest`, :func:`removal_precision_recall`).
* **Multi-modal truncation**: StyleGAN's truncation trick ``w' = w_avg + psi (w - w_avg)``
  (:func:`truncate`) pulls every sample towards one global mean, which for multi-modal data lies
  between the modes. Instead, sampled latents are clustered (k-means, :func:`kmeans`, on perceptual
  features of their images), each cluster's centre ``c_k`` is the mean ``w`` of its members, and a
  sample is truncated towards the perceptually nearest centre, ``w' = c_k + psi (w - c_k)`` with
  ``k = argmin_k ||phi(G(w)) - phi(G(c_k))||^2`` (:func:`nearest_center`,
  :func:`multimodal_truncate`).

Only the abstract and the pipeline figure's caption could be read here; the distances, cluster
counts and thresholds used by :mod:`distill.strategies.self_distilled_stylegan` are ours (its
docstring lists them).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["keep_lowest", "kmeans", "multimodal_truncate", "nearest_center", "reconstruction_scores",
           "removal_precision_recall", "truncate"]


def truncate(w: Tensor, center: Tensor, psi: float) -> Tensor:
    """The truncation trick ``w' = c + psi (w - c)`` for latents ``w`` ``(B, w_dim)`` and a centre
    ``c`` ``(w_dim,)`` (the global ``w_avg``) or ``(B, w_dim)`` (one per sample)."""
    if center.shape not in (w.shape, w.shape[1:]):
        raise ValueError(f"truncate: center must be ({w.shape[1]},) or {tuple(w.shape)}; got {tuple(center.shape)}")
    return center + psi * (w - center)


def nearest_center(features: Tensor, center_features: Tensor) -> Tensor:
    """``argmin_k ||f_i - g_k||^2`` for features ``(B, F)`` and centre features ``(K, F)`` -> ``(B,)`` long."""
    if features.dim() != 2 or center_features.dim() != 2 or features.shape[1] != center_features.shape[1]:
        raise ValueError(f"nearest_center: need (B, F) and (K, F); got {tuple(features.shape)} and "
                         f"{tuple(center_features.shape)}")
    return torch.cdist(features.double(), center_features.double()).argmin(1)


def multimodal_truncate(w: Tensor, centers: Tensor, assignment: Tensor, psi: float) -> Tensor:
    """``w'_i = c_{k_i} + psi (w_i - c_{k_i})``: latents ``(B, w_dim)``, centres ``(K, w_dim)``,
    ``assignment`` ``(B,)`` the index ``k_i`` of each sample's centre."""
    if assignment.shape != w.shape[:1]:
        raise ValueError(f"multimodal_truncate: assignment must be ({w.shape[0]},); got {tuple(assignment.shape)}")
    return truncate(w, centers[assignment], psi)


def kmeans(x: Tensor, k: int, iters: int = 100, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means on ``x`` ``(N, D)`` with k-means++ seeding (Arthur & Vassilvitskii 2007).

    Returns ``(centers (k, D), assignment (N,))``; stops when the assignment no longer changes or
    after ``iters`` rounds. An empty cluster keeps its previous centre."""
    n = x.shape[0]
    if x.dim() != 2 or not 1 <= k <= n:
        raise ValueError(f"kmeans: need x (N, D) with 1 <= k <= N; got shape {tuple(x.shape)}, k={k}")
    g = torch.Generator().manual_seed(seed)
    xd = x.detach().double().cpu()
    centers = [xd[int(torch.randint(0, n, (1,), generator=g))]]
    for _ in range(1, k):
        d2 = torch.cdist(xd, torch.stack(centers)).pow(2).min(1).values
        probs = d2 / d2.sum() if float(d2.sum()) > 0 else torch.full((n,), 1.0 / n, dtype=xd.dtype)
        centers.append(xd[int(torch.multinomial(probs, 1, generator=g))])
    c = torch.stack(centers)
    assign = torch.cdist(xd, c).argmin(1)
    for _ in range(iters):
        for j in range(k):
            members = assign == j
            if members.any():
                c[j] = xd[members].mean(0)
        new = torch.cdist(xd, c).argmin(1)
        if torch.equal(new, assign):
            break
        assign = new
    return c.to(x.dtype).to(x.device), assign.to(x.device)


def reconstruction_scores(images: Tensor, reconstructions: Tensor, features: Tensor | None = None,
                          reconstruction_features: Tensor | None = None, eps: float = 1e-10) -> Tensor:
    """Per-image reconstruction distances ``(N,)``: the mean squared pixel error
    ``mean_{c,h,w} (x - x_rec)^2`` of images ``(N, C, H, W)``, or, when features ``(N, F)`` of both are
    given, the LPIPS-like ``||u - u_rec||^2`` of unit-normalised features ``u = f / ||f||`` instead."""
    if images.shape != reconstructions.shape:
        raise ValueError(f"reconstruction_scores: images {tuple(images.shape)} and reconstructions "
                         f"{tuple(reconstructions.shape)} differ")
    if features is None:
        return (images - reconstructions).pow(2).flatten(1).mean(1)
    if reconstruction_features is None or features.shape != reconstruction_features.shape:
        raise ValueError("reconstruction_scores: pass features of both the images and the reconstructions, of one shape")
    u = features / (features.pow(2).sum(1, keepdim=True) + eps).sqrt()
    v = reconstruction_features / (reconstruction_features.pow(2).sum(1, keepdim=True) + eps).sqrt()
    return (u - v).pow(2).sum(1)


def keep_lowest(scores: Tensor, keep_fraction: float) -> Tensor:
    """A bool mask ``(N,)`` keeping the ``round(keep_fraction * N)`` lowest scores (ties: lower index first)."""
    if not 0 < keep_fraction <= 1:
        raise ValueError(f"keep_lowest: keep_fraction must be in (0, 1]; got {keep_fraction}")
    n_keep = max(1, round(keep_fraction * scores.numel()))
    order = torch.argsort(scores, stable=True)
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    mask[order[:n_keep]] = True
    return mask


def removal_precision_recall(kept: Tensor, is_outlier: Tensor) -> dict[str, float]:
    """Of the removed images (``~kept``), the share that are outliers (precision), and of the outliers,
    the share removed (recall); both bool ``(N,)``. 0 when nothing was removed / there is no outlier."""
    removed = ~kept
    tp = int((removed & is_outlier).sum())
    precision = tp / int(removed.sum()) if int(removed.sum()) else 0.0
    recall = tp / int(is_outlier.sum()) if int(is_outlier.sum()) else 0.0
    return {"precision": precision, "recall": recall, "removed": float(removed.sum())}
