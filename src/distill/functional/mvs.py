r"""KD-MVS's math: self-supervised consistency losses, the cross-view check, the probability encoding
of pseudo-labels and the probabilistic KD loss; and the depth metrics.

Paper: Y. Ding, Q. Zhu, X. Liu, W. Yuan, H. Zhang, C. Zhang, "KD-MVS: Knowledge Distillation Based
Self-supervised Learning for Multi-view Stereo", ECCV 2022, arXiv 2207.10425. Only the paper's abstract
and introduction could be read here; the forms below follow the abstract's outline (photometric and
featuremetric consistency for the teacher; validated pseudo-labels; probabilistic knowledge transfer)
and the authors' code (github.com/megvii-research/KD-MVS: ``models/module.py`` ``unsup_loss`` and
``kl_loss``, ``tools/normal_check_prob_enc.py``), with each departure stated where it is made.

Shapes: ``B`` scenes, ``V`` views (view 0 the reference), ``C`` channels, ``D`` depth hypotheses,
``H × W`` pixels. Projections ``(B, 4, 4)`` as :mod:`distill.data.mvs` defines them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.models.mvs import sample_pixels, reproject

__all__ = [
    "cross_view_check",
    "depth_errors",
    "depth_probability_encoding",
    "edge_aware_smoothness",
    "kd_mvs_kl_loss",
    "mvs_consistency_loss",
    "mvs_reconstruction_error",
]


def _dx(x: Tensor) -> Tensor:
    return F.pad(x[..., :, 1:] - x[..., :, :-1], (0, 1))


def _dy(x: Tensor) -> Tensor:
    return F.pad(x[..., 1:, :] - x[..., :-1, :], (0, 0, 0, 1))


def mvs_reconstruction_error(ref: Tensor, warped: Tensor, grad_weight: float = 0.5) -> Tensor:
    r"""Per-pixel reconstruction error of each warped source against the reference.

    .. math:: e_v(p) = (1-\alpha)\,\overline{|\hat I_v(p) - I(p)|} + \alpha\,\big(\overline{|\partial_x \hat I_v(p)
              - \partial_x I(p)|} + \overline{|\partial_y \hat I_v(p) - \partial_y I(p)|}\big)

    the bars averaging over channels, ``∂`` forward differences (0 on the last column / row), ``α`` =
    ``grad_weight`` (the authors' code: 0.5; it uses smooth-L1, here L1).

    Args:
        ref: ``(B, C, H, W)``. warped: ``(B, V, C, H, W)`` sources warped to the reference.

    Returns:
        ``(B, V, H, W)``.
    """
    if warped.dim() != 5 or warped.shape[:1] + warped.shape[2:] != ref.shape:
        raise ValueError(f"warped must be (B, V, C, H, W) matching ref {tuple(ref.shape)}, got {tuple(warped.shape)}")
    if not 0.0 <= grad_weight <= 1.0:
        raise ValueError(f"grad_weight must be in [0, 1], got {grad_weight}")
    r = ref[:, None]
    photo = (warped - r).abs().mean(2)
    grad = (_dx(warped) - _dx(r)).abs().mean(2) + (_dy(warped) - _dy(r)).abs().mean(2)
    return (1 - grad_weight) * photo + grad_weight * grad


def mvs_consistency_loss(ref: Tensor, warped: Tensor, valid: Tensor, grad_weight: float = 0.5,
                         top_k: int = 1) -> Tensor:
    r"""Photometric (images) or featuremetric (features) consistency: per pixel the sum of the ``top_k``
    smallest errors :func:`mvs_reconstruction_error` over the source views where the pixel is valid,
    averaged over the pixels with at least ``top_k`` valid views.

    .. math:: L = \frac{1}{|\Omega|}\sum_{p\in\Omega}\ \sum_{v \in \mathrm{top}_k(p)} e_v(p)

    The authors' code keeps the best 3 of 4 sources (an occlusion heuristic of unsupervised MVS); with two
    sources ``top_k = 1`` (ours) keeps the better one. Their code also weighs each pixel by a learned
    uncertainty ``exp(-log σ²)`` plus ``0.1·log σ²``: left out.

    Args:
        ref: ``(B, C, H, W)``. warped: ``(B, V, C, H, W)``. valid: ``(B, V, H, W)`` bool.

    Returns:
        scalar (0 when no pixel qualifies).
    """
    if valid.shape != warped.shape[:2] + warped.shape[3:]:
        raise ValueError(f"valid must be (B, V, H, W) = {tuple(warped.shape[:2] + warped.shape[3:])}, "
                         f"got {tuple(valid.shape)}")
    if not 1 <= top_k <= warped.shape[1]:
        raise ValueError(f"top_k must be in [1, V={warped.shape[1]}], got {top_k}")
    err = mvs_reconstruction_error(ref, warped, grad_weight)
    big = torch.finfo(err.dtype).max / (4 * top_k)
    err = torch.where(valid, err, torch.full_like(err, big))
    best, _ = torch.topk(err, top_k, dim=1, largest=False)                      # (B, k, H, W)
    ok = (best < big).all(1)
    if not bool(ok.any()):
        return err.sum() * 0.0
    return best.sum(1)[ok].mean()


def edge_aware_smoothness(depth: Tensor, image: Tensor) -> Tensor:
    r"""Edge-aware first-order smoothness of the depth normalised by its per-image mean (ours; the authors'
    code has a depth smoothness term of weight 0.18 against 12 for the photometric one):

    .. math:: L = \overline{|\partial_x \tilde d|\,e^{-\overline{|\partial_x I|}}} + \overline{|\partial_y \tilde d|\,
              e^{-\overline{|\partial_y I|}}},\qquad \tilde d = d / \overline{d}

    Args:
        depth: ``(B, H, W)``. image: ``(B, C, H, W)``.
    """
    d = depth / depth.mean((1, 2), keepdim=True).clamp_min(1e-6)
    wx = torch.exp(-_dx(image).abs().mean(1))
    wy = torch.exp(-_dy(image).abs().mean(1))
    return (_dx(d).abs() * wx)[..., :-1].mean() + (_dy(d).abs() * wy)[..., :-1, :].mean()


def cross_view_check(depth: Tensor, proj: Tensor, confidence: Tensor | None = None, *, reproj_px: float = 1.0,
                     rel_depth: float = 0.05, min_views: int = 1, min_confidence: float = 0.05
                     ) -> tuple[Tensor, Tensor, Tensor]:
    r"""Validate the reference view's depth against the sources' depths (geometric consistency), as
    KD-MVS turns a teacher's depth maps into pseudo-labels.

    For every source ``j``: the reference pixel ``p`` with depth ``d(p)`` projects to ``q_j`` in view ``j``;
    the source's depth there, ``d_j(q_j)`` (bilinear), is back-projected and projected into the reference
    camera at ``p'_j`` with depth ``d'_j``. The view agrees when ``‖p'_j − p‖ < reproj_px`` and
    ``|d'_j − d(p)| / d(p) < rel_depth``. With ``n(p)`` agreeing views:

    .. math:: \mu = \frac{d + \sum_{j\,\mathrm{agrees}} d'_j}{n + 1},\qquad
              \sigma = \sqrt{\frac{(d-\mu)^2 + \sum_{j\,\mathrm{agrees}} (d'_j - \mu)^2}{n + 1}}

    and the pixel is kept when ``n ≥ min_views`` and ``confidence > min_confidence``. The authors' script
    uses 1 pixel, a relative depth difference of 0.005, 5 of 10 source views and confidence 0.05 on DTU;
    ``rel_depth = 0.05`` (ours) scales the tolerance to these coarse hypotheses (about 0.05 of the depth
    apart) and ``min_views = 1`` keeps their "half the sources" with two sources.

    Args:
        depth: ``(B, V, H, W)``, each view's depth predicted with that view as reference.
        proj: ``(B, V, 4, 4)``. confidence: the reference's ``(B, H, W)``, or None (no photometric filter).

    Returns:
        ``mu`` ``(B, H, W)``, ``sigma`` ``(B, H, W)`` (0 where masked out), ``mask`` ``(B, H, W)`` bool.
    """
    if depth.dim() != 4 or proj.shape != (*depth.shape[:2], 4, 4):
        raise ValueError(f"expected depth (B, V, H, W) and proj (B, V, 4, 4), got {tuple(depth.shape)} and "
                         f"{tuple(proj.shape)}")
    b, v, h, w = depth.shape
    if not 0 <= min_views <= v - 1:
        raise ValueError(f"min_views must be in [0, {v - 1}] (the number of source views), got {min_views}")
    ref = depth[:, 0]
    vv, uu = torch.meshgrid(torch.arange(h, dtype=depth.dtype, device=depth.device),
                            torch.arange(w, dtype=depth.dtype, device=depth.device), indexing="ij")
    count = torch.zeros_like(ref)
    total = ref.clone()
    agreeing = []
    for j in range(1, v):
        q = reproject(proj[:, j], proj[:, 0], ref)                                   # (B, H, W, 3)
        d_src, inside = sample_pixels(depth[:, j:j + 1], q[:, None, ..., :2])
        d_src = d_src[:, 0, 0]
        # back-project (q, d_src) from view j and project into the reference
        pts = torch.stack([q[..., 0] * d_src, q[..., 1] * d_src, d_src, torch.ones_like(d_src)], -1)
        m = proj[:, 0].double() @ torch.linalg.inv(proj[:, j].double())
        back = torch.einsum("bij,bhwj->bhwi", m.to(depth.dtype), pts)
        z = back[..., 2]
        safe = torch.where(z.abs() < 1e-6, torch.full_like(z, 1e-6), z)
        dist = torch.sqrt((back[..., 0] / safe - uu) ** 2 + (back[..., 1] / safe - vv) ** 2)
        ok = inside[:, 0] & (d_src > 0) & (dist < reproj_px) & ((z - ref).abs() / ref.clamp_min(1e-6) < rel_depth)
        count = count + ok.to(depth.dtype)
        total = total + torch.where(ok, z, torch.zeros_like(z))
        agreeing.append((ok, z))
    mu = total / (count + 1)
    spread = (ref - mu) ** 2
    for ok, z in agreeing:
        spread = spread + torch.where(ok, (z - mu) ** 2, torch.zeros_like(z))
    sigma = torch.sqrt(spread / (count + 1))
    mask = count >= min_views
    if confidence is not None:
        mask = mask & (confidence > min_confidence)
    zero = torch.zeros_like(mu)
    return torch.where(mask, mu, zero), torch.where(mask, sigma, zero), mask


def depth_probability_encoding(mu: Tensor, sigma: Tensor, depth_values: Tensor, min_sigma: float) -> Tensor:
    r"""A pseudo depth label as a distribution over the hypotheses: a Gaussian ``N(μ, σ²)`` evaluated at
    each hypothesis and normalised,

    .. math:: q_k(p) = \frac{\exp(-(d_k - \mu(p))^2 / 2\sigma'(p)^2)}{\sum_{k'} \exp(-(d_{k'} - \mu(p))^2 / 2\sigma'(p)^2)},
              \qquad \sigma' = \max(\sigma, \sigma_{\min})

    (``min_sigma`` keeps a pixel whose views agree exactly from a one-hot target; ours).

    Args:
        mu, sigma: ``(B, H, W)``. depth_values: ``(D,)``.

    Returns:
        ``(B, D, H, W)``, each pixel summing to 1.
    """
    if min_sigma <= 0:
        raise ValueError(f"min_sigma must be > 0, got {min_sigma}")
    s = sigma.clamp_min(min_sigma)[:, None]
    logits = -((depth_values.view(1, -1, 1, 1).to(mu) - mu[:, None]) ** 2) / (2 * s ** 2)
    return torch.softmax(logits, dim=1)


def kd_mvs_kl_loss(student_log_prob: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    r"""Probabilistic knowledge transfer: KL divergence from the pseudo-label distribution to the student's
    probability volume over the depth hypotheses, averaged over each scene's valid pixels, then over scenes:

    .. math:: L = \frac{1}{B}\sum_b \frac{1}{|\Omega_b|}\sum_{p\in\Omega_b}\sum_{k=1}^{D} q_k(p)\,
              \big(\log q_k(p) - \log P_k(p)\big)

    (``0·log 0 = 0``; a scene without valid pixels adds 0, as the authors' ``/ (count + 1e-6)``). The
    authors' code instead fits a Gaussian to the student's volume (its mean and standard deviation) and
    takes a closed-form Gaussian KL against ``(μ, σ)`` (weight 0.5), plus a cross-entropy to the one-hot
    hypothesis nearest ``μ`` (weight 2.0); here the KL is taken on the discrete volumes.

    Args:
        student_log_prob: ``(B, D, H, W)`` log-probabilities (log-softmax over ``D``).
        target: ``(B, D, H, W)`` probabilities (:func:`depth_probability_encoding`), no gradient.
        mask: ``(B, H, W)`` bool, the validated pixels.
    """
    if student_log_prob.shape != target.shape or mask.shape != target.shape[:1] + target.shape[2:]:
        raise ValueError(f"expected student_log_prob and target (B, D, H, W) and mask (B, H, W), got "
                         f"{tuple(student_log_prob.shape)}, {tuple(target.shape)}, {tuple(mask.shape)}")
    t = target.detach()
    kl = (torch.xlogy(t, t) - t * student_log_prob).sum(1)                         # (B, H, W)
    m = mask.to(kl.dtype)
    per_scene = (kl * m).sum((1, 2)) / m.sum((1, 2)).clamp_min(1.0)
    return per_scene.mean()


def depth_errors(pred: Tensor, gt: Tensor, thresholds: Sequence[float] = (0.1, 0.25, 0.5),
                 mask: Tensor | None = None) -> dict[str, float]:
    """Depth metrics against ground truth: mean absolute error ``mae`` and, for each threshold ``τ``,
    the fraction of pixels with ``|pred − gt| < τ`` (``acc@τ``), over ``mask`` (all pixels when None).

    Args:
        pred, gt: ``(B, H, W)``. mask: ``(B, H, W)`` bool or None.
    """
    if pred.shape != gt.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and gt {tuple(gt.shape)} differ in shape")
    err = (pred - gt).abs()
    if mask is not None:
        err = err[mask]
    if err.numel() == 0:
        raise ValueError("no pixel to evaluate (the mask is empty)")
    out = {"mae": float(err.mean())}
    out.update({f"acc@{t:g}": float((err < t).float().mean()) for t in thresholds})
    return out
