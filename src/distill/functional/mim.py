r"""The math of masked-image-modelling distillation: FD, SdAE and DMJD.

Pure functions of tensors: seeded token masks (random, block-wise, disjoint across views, split
into folds), the whitening of a target (a LayerNorm without affine parameters), and the three
papers' losses; HOG and per-patch pixel targets for DMJD. Token tensors are ``(B, L, D)`` with
``L`` patch tokens (no prefix tokens); masks are ``(B, L)`` bool, ``True`` = masked (hidden from
the encoder). Nothing here detaches: the strategies pass detached targets.

Papers:

* FD: Y. Wei, H. Hu, Z. Xie, Z. Zhang, Y. Cao, J. Bao, D. Chen, B. Guo, "Contrastive Learning
  Rivals Masked Image Modeling in Fine-tuning via Feature Distillation", 2022, arXiv 2205.14141.
* SdAE: Y. Chen, Y. Liu, D. Jiang, X. Zhang, W. Dai, H. Xiong, Q. Tian, "SdAE: Self-distillated
  Masked Autoencoder", ECCV 2022, arXiv 2208.00449.
* DMJD: X. Ma, C. Liu, C. Xie, L. Ye, Y. Deng, X. Ji, "Disjoint Masking with Joint Distillation
  for Efficient Masked Image Modeling", 2022, arXiv 2301.00230.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "random_token_mask",
    "block_token_mask",
    "disjoint_view_masks",
    "mask_folds",
    "whiten_tokens",
    "fd_loss",
    "sdae_loss",
    "cosine_momentum",
    "hog_histograms",
    "hog_patch_targets",
    "pixel_patch_targets",
    "dmjd_loss",
]


def _check_ratio(ratio: float, what: str) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio < 1.0:
        raise ValueError(f"{what}: mask ratio must be a number in (0, 1), got {ratio!r}")
    return float(ratio)


def _kept(num: int, ratio: float) -> int:
    # MAE's and DMJD's rule: int(L * (1 - ratio)) tokens stay visible
    return int(num * (1.0 - ratio))


def _ranks(batch: int, num: int, generator: torch.Generator | None, device: torch.device | str | None) -> Tensor:
    """A random permutation of ``range(num)`` per row, ``(batch, num)`` long (argsort of uniform noise)."""
    noise = torch.rand(batch, num, generator=generator)
    return noise.argsort(dim=1).to(device) if device is not None else noise.argsort(dim=1)


def random_token_mask(batch: int, num_tokens: int, ratio: float, *, generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> Tensor:
    """MAE's per-sample random mask: ``(B, L)`` bool with exactly ``L - int(L(1 - ratio))`` ``True``
    (masked) entries per row, drawn uniformly from ``generator`` (seeded: the same masks again)."""
    _check_ratio(ratio, "random_token_mask")
    keep = _kept(num_tokens, ratio)
    if keep < 1 or keep >= num_tokens:
        raise ValueError(f"random_token_mask: ratio {ratio} of {num_tokens} tokens keeps {keep}; expected 1..L-1")
    order = _ranks(batch, num_tokens, generator, device)
    mask = torch.ones(batch, num_tokens, dtype=torch.bool, device=order.device)
    mask.scatter_(1, order[:, :keep], False)
    return mask


def _expand_blocks(coarse: Tensor, grid: tuple[int, int], block: int) -> Tensor:
    """``(..., gh/block · gw/block)`` bool over coarse cells -> ``(..., gh · gw)`` over patch tokens."""
    gh, gw = grid
    lead = coarse.shape[:-1]
    c = coarse.reshape(*lead, gh // block, 1, gw // block, 1)
    c = c.expand(*lead, gh // block, block, gw // block, block)
    return c.reshape(*lead, gh * gw)


def _check_grid(grid: tuple[int, int], block: int, what: str) -> None:
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"{what}: block must be a positive int, got {block!r}")
    if grid[0] % block or grid[1] % block:
        raise ValueError(f"{what}: the patch grid {grid[0]}x{grid[1]} is not divisible by block={block}; "
                         "use block=1 (random masking) or an image/patch size whose grid it divides")


def block_token_mask(batch: int, grid: tuple[int, int], ratio: float, block: int = 2, *,
                     generator: torch.Generator | None = None, device: torch.device | str | None = None) -> Tensor:
    """Block-wise mask (SimMIM's, and DMJD's ``block_masking`` with 2x2 blocks): the ``h x w`` patch grid
    is cut into ``block x block`` cells, a random ``1 - int(C(1 - ratio))/C`` share of the ``C`` cells
    is masked, each masking its ``block²`` tokens. ``(B, h·w)`` bool; the grid must be divisible by
    ``block``."""
    _check_ratio(ratio, "block_token_mask")
    _check_grid(grid, block, "block_token_mask")
    cells = (grid[0] // block) * (grid[1] // block)
    return _expand_blocks(random_token_mask(batch, cells, ratio, generator=generator, device=device), grid, block)


def disjoint_view_masks(batch: int, grid: tuple[int, int], ratio: float, views: int = 2, block: int = 1, *,
                        generator: torch.Generator | None = None, device: torch.device | str | None = None) -> Tensor:
    r"""DMJD's disjoint masking: ``views`` masks per image whose *visible* sets are disjoint.

    One random permutation ``π`` of the ``C`` cells per image (cells are tokens when ``block=1``,
    ``block x block`` groups otherwise); with ``k = int(C(1 - ratio))`` visible cells per view,
    view ``v`` shows the cells ``π[v k : (v + 1) k]`` and masks the rest. So every view keeps the
    masking ratio, no token is visible in two views, and with ``views >= 2`` every token is masked
    in at least one view (the union of the masked sets is the whole image: the prediction rate
    is 1). This is the authors' two-view construction (view 2 shows ``k`` cells drawn from view 1's
    masked ones) written for any number of views; it needs ``views · k <= C``.

    Returns ``(views, B, h·w)`` bool, ``True`` = masked.
    """
    _check_ratio(ratio, "disjoint_view_masks")
    _check_grid(grid, block, "disjoint_view_masks")
    if isinstance(views, bool) or not isinstance(views, int) or views < 1:
        raise ValueError(f"disjoint_view_masks: views must be a positive int, got {views!r}")
    cells = (grid[0] // block) * (grid[1] // block)
    keep = _kept(cells, ratio)
    if keep < 1 or views * keep > cells:
        raise ValueError(f"disjoint_view_masks: {views} views x {keep} visible cells (ratio {ratio}) do not fit in "
                         f"{cells} cells; lower views or raise the ratio (views * (1 - ratio) <= 1)")
    order = _ranks(batch, cells, generator, device)
    masks = torch.ones(views, batch, cells, dtype=torch.bool, device=order.device)
    for v in range(views):
        masks[v].scatter_(1, order[:, v * keep:(v + 1) * keep], False)
    return _expand_blocks(masks, grid, block)


def mask_folds(mask: Tensor, folds: int, *, generator: torch.Generator | None = None) -> Tensor:
    """SdAE's multi-fold masking: the masked tokens of each image, in random order, cut into ``folds``
    groups of ``m = M // folds`` tokens (``M`` masked per image, equal across the batch; the
    ``M mod folds`` left over are dropped, as the authors' code does).

    ``mask`` (B, L) bool -> indices ``(B, folds, m)`` long: fold ``f`` of image ``b`` holds the token
    positions ``out[b, f]``; the folds of one image are disjoint and all lie in its masked set.
    """
    if mask.dim() != 2 or mask.dtype != torch.bool:
        raise ValueError(f"mask_folds needs a (B, L) bool mask, got {tuple(mask.shape)} {mask.dtype}")
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 1:
        raise ValueError(f"mask_folds: folds must be a positive int, got {folds!r}")
    counts = mask.sum(1)
    if bool((counts != counts[0]).any()):
        raise ValueError(f"mask_folds: every image must mask as many tokens, got counts {counts.tolist()}")
    m = int(counts[0]) // folds
    if m < 1:
        raise ValueError(f"mask_folds: {int(counts[0])} masked tokens cannot fill {folds} folds")
    noise = torch.rand(mask.shape, generator=generator).to(mask.device)
    noise = noise.masked_fill(~mask, 2.0)  # unmasked tokens sort last
    order = noise.argsort(dim=1)[:, : m * folds]
    return order.reshape(mask.shape[0], folds, m)


def whiten_tokens(x: Tensor, eps: float = 1e-5) -> Tensor:
    r"""Feature whitening of FD (and DMJD's target "instance whitening"): a LayerNorm without affine
    parameters over the last dimension, :math:`\hat t = (t - \mu(t)) / \sqrt{\sigma^2(t) + \epsilon}`,
    mean and (biased) variance of each token's ``D`` values. ``(..., D)`` -> ``(..., D)``."""
    return F.layer_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype)


def fd_loss(student: Tensor, teacher: Tensor, beta: float = 2.0, eps: float = 1e-5) -> Tensor:
    r"""Feature distillation (FD, Wei et al. 2022, arXiv 2205.14141): smooth-L1 between the projected
    student tokens and the whitened teacher tokens, averaged over every element.

    .. math::
        L = \frac{1}{B N D} \sum_{b, n, d} \ell_\beta\bigl(s_{bnd} - \hat t_{bnd}\bigr), \qquad
        \ell_\beta(x) = \begin{cases} x^2 / (2\beta) & |x| < \beta \\ |x| - \beta/2 & \text{else}\end{cases}

    with :math:`\hat t` = :func:`whiten_tokens` of the teacher. ``student`` (already projected to the
    teacher's width) and ``teacher``: ``(B, N, D)`` -> scalar. β = 2 is the authors' code
    (``nn.SmoothL1Loss(beta=2.0)``).
    """
    if student.shape != teacher.shape:
        raise ValueError(f"fd_loss needs equal shapes (project the student first), got {tuple(student.shape)} "
                         f"and {tuple(teacher.shape)}")
    if beta <= 0:
        raise ValueError(f"fd_loss: beta must be > 0, got {beta}")
    return F.smooth_l1_loss(student.float(), whiten_tokens(teacher, eps).float(), beta=beta)


def sdae_loss(pred: Tensor, target: Tensor, eps: float = 1e-6) -> Tensor:
    r"""SdAE's self-distillation loss: one minus the mean cosine similarity between the student's
    predictions and the teacher's normalised features at the same masked tokens.

    .. math:: L = 1 - \frac{1}{N} \sum_{n} \cos\bigl(p_n, \tilde t_n\bigr), \qquad
              \tilde t_n = (t_n - \mu(t_n)) / \sqrt{\operatorname{var}(t_n) + \epsilon}

    ``pred``, ``target``: ``(..., D)`` equal shapes (``N`` = the product of the leading sizes) ->
    scalar. The cosine is scale-invariant, so only the centring of the target matters; the authors'
    code divides by the unbiased variance + 1e-6, which changes nothing here.
    """
    if pred.shape != target.shape:
        raise ValueError(f"sdae_loss needs equal shapes, got {tuple(pred.shape)} and {tuple(target.shape)}")
    t = target.float()
    t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + eps).sqrt()
    return 1.0 - F.cosine_similarity(pred.float(), t, dim=-1).mean()


def cosine_momentum(step: int, total: int, base: float, final: float = 1.0) -> float:
    r"""The EMA momentum at ``step`` of ``total`` (DINO's and SdAE's schedule):
    :math:`m_k = m_{final} - (m_{final} - m_{base}) (\cos(\pi k / K) + 1) / 2`, from ``base`` at
    ``k = 0`` to ``final`` at ``k = K``; ``total <= 1``: ``base``."""
    if total <= 1:
        return float(base)
    k = min(max(step, 0), total)
    return float(final - (final - base) * (math.cos(math.pi * k / total) + 1.0) / 2.0)


def hog_histograms(images: Tensor, cell: int, bins: int = 9) -> Tensor:
    r"""Histograms of oriented gradients per cell (MaskFeat's and DMJD's target), one per channel.

    Gradients are central differences ``g_y = x[i+1, j] - x[i-1, j]``, ``g_x = x[i, j+1] - x[i, j-1]``
    (0 on the border rows/columns); each pixel votes its magnitude :math:`\sqrt{g_x^2 + g_y^2}` into
    the bin ``⌊(atan2(g_y, g_x) mod π) / (π / bins)⌋`` of its cell (unsigned orientation, hard
    binning), and each histogram is divided by the cell's pixel count, as the DMJD code's
    ``hog_torch`` (no block normalisation).

    ``images`` (B, C, H, W) with ``H``, ``W`` multiples of ``cell`` -> ``(B, C, H/cell, W/cell, bins)``.
    """
    if images.dim() != 4:
        raise ValueError(f"hog_histograms needs (B, C, H, W) images, got {tuple(images.shape)}")
    b, c, h, w = images.shape
    if h % cell or w % cell:
        raise ValueError(f"hog_histograms: image {h}x{w} is not divisible by cell={cell}")
    x = images.float()
    gy, gx = torch.zeros_like(x), torch.zeros_like(x)
    gy[:, :, 1:-1, :] = x[:, :, 2:, :] - x[:, :, :-2, :]
    gx[:, :, :, 1:-1] = x[:, :, :, 2:] - x[:, :, :, :-2]
    magnitude = torch.hypot(gx, gy)
    angle = torch.rad2deg(torch.atan2(gy, gx)) % 180.0
    index = torch.div(angle, 180.0 / bins, rounding_mode="floor").long().clamp_(0, bins - 1)
    votes = F.one_hot(index, bins).to(x.dtype) * magnitude.unsqueeze(-1)  # (B, C, H, W, bins)
    votes = votes.reshape(b, c, h // cell, cell, w // cell, cell, bins)
    return votes.sum(dim=(3, 5)) / (cell * cell)


def hog_patch_targets(images: Tensor, patch: int, cell: int, bins: int = 9, whiten: bool = True) -> Tensor:
    """DMJD's HOG target per patch token: :func:`hog_histograms` of ``cell x cell`` cells, each
    histogram (one cell, one channel) whitened over its ``bins`` values (:func:`whiten_tokens`, the
    authors' ``InstanceWhitening``), then the ``(patch/cell)²`` cells x channels of a patch
    concatenated. ``(B, C, H, W)`` -> ``(B, L, (patch/cell)² · bins · C)``, tokens in row-major order."""
    if patch % cell:
        raise ValueError(f"hog_patch_targets: patch={patch} is not divisible by cell={cell}")
    hist = hog_histograms(images, cell, bins)  # (B, C, H/cell, W/cell, bins)
    if whiten:
        hist = whiten_tokens(hist)
    b, c, hc, wc, k = hist.shape
    r = patch // cell
    hist = hist.reshape(b, c, hc // r, r, wc // r, r, k)
    # (b, gh, gw, dh, dw, bins, c): the authors' order "(dh dw d c)"
    return hist.permute(0, 2, 4, 3, 5, 6, 1).reshape(b, (hc // r) * (wc // r), r * r * k * c)


def pixel_patch_targets(images: Tensor, patch: int, normalize: bool = True, eps: float = 1e-6) -> Tensor:
    """Per-patch pixel targets (MAE's): ``(B, C, H, W)`` -> ``(B, L, patch² · C)``, each patch's values
    in ``(dh, dw, c)`` order, standardised per patch (mean 0, unbiased variance 1: MAE's
    ``norm_pix_loss``) when ``normalize``."""
    b, c, h, w = images.shape
    if h % patch or w % patch:
        raise ValueError(f"pixel_patch_targets: image {h}x{w} is not divisible by patch={patch}")
    x = images.float().reshape(b, c, h // patch, patch, w // patch, patch)
    x = x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)
    if normalize:
        x = (x - x.mean(-1, keepdim=True)) / (x.var(-1, keepdim=True) + eps).sqrt()
    return x


def dmjd_loss(pred: Tensor, pred_visible: Tensor, target: Tensor, mask: Tensor, theta: float = 1.0,
              beta: float = 2.0) -> Tensor:
    r"""DMJD's joint distillation loss for one batch of masked views.

    .. math::
        L = \underbrace{\frac{\sum_{b,l} M_{bl} \tfrac{1}{K}\lVert p_{bl} - y_{bl}\rVert^2}{\sum_{b,l} M_{bl}}}
            _{\text{invisible (masked) tokens}}
          + \theta \underbrace{\frac{1}{B V K} \sum_{b, v, k} \ell_\beta\bigl(q_{bvk} - y_{b, \mathrm{vis}(v), k}\bigr)}
            _{\text{visible tokens}}

    ``pred`` (B, L, K): the decoder's prediction at every token (only masked ones count);
    ``pred_visible`` (B, V, K): the visible branch's prediction at the ``V`` visible tokens of each
    image, in increasing token order (``mask[b]``'s ``False`` positions); ``target`` (B, L, K);
    ``mask`` (B, L) bool, ``True`` = masked, ``V = L - M`` equal for every image. ``ℓ_β`` is the
    smooth-L1 of :func:`fd_loss`. Defaults θ = 1, β = 2 and the two distances (squared error on the
    masked tokens, smooth-L1 on the visible ones) are the authors' code's (``--mim_loss_type l2
    --vis_loss_type smooth_l1``, ``theta=1.0``, ``beta=2.0``).
    """
    if pred.shape != target.shape or mask.shape != pred.shape[:2]:
        raise ValueError(f"dmjd_loss: pred {tuple(pred.shape)}, target {tuple(target.shape)} and mask "
                         f"{tuple(mask.shape)} must be (B, L, K), (B, L, K), (B, L)")
    visible = ~mask
    counts = visible.sum(1)
    if bool((counts != counts[0]).any()) or pred_visible.shape != (pred.shape[0], int(counts[0]), pred.shape[2]):
        raise ValueError(f"dmjd_loss: pred_visible must be (B, V, K) = ({pred.shape[0]}, V, {pred.shape[2]}) with V "
                         f"the visible count of every image, got {tuple(pred_visible.shape)} for counts "
                         f"{counts.tolist()}")
    per_token = (pred.float() - target.float()).pow(2).mean(-1)
    m = mask.to(per_token.dtype)
    invisible = (per_token * m).sum() / m.sum().clamp_min(1.0)
    target_visible = target[visible].reshape(pred_visible.shape)
    seen = F.smooth_l1_loss(pred_visible.float(), target_visible.float(), beta=beta)
    return invisible + theta * seen
