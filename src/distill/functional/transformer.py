"""Target-aware transformer (TaT) distillation: one-to-all spatial matching of feature maps, and
the paper's hierarchical form for large maps (patch-group and anchor-point distillation).

Lin, Xie, Wang, Yu, Chang, Liang, Wang, "Knowledge Distillation via the Target-aware
Transformer", CVPR 2022, arXiv 2205.10793.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "tat_anchor_grid",
    "tat_anchor_loss",
    "tat_anchors",
    "tat_attention",
    "tat_loss",
    "tat_patch_grid",
    "tat_patch_group_loss",
    "tat_patch_groups",
    "tat_reconfigure",
]

_REDUCTIONS = ("mean", "sum")


def _flat(x: Tensor) -> Tensor:
    """(B, C, H, W) → (B, H·W, C): one row per spatial position."""
    return x.flatten(2).transpose(1, 2)


def tat_attention(query: Tensor, key: Tensor, temperature: float = 1.0) -> Tensor:
    r"""TaT's similarity map: for each query position, a softmax over all key positions.

    .. math:: W_{b,i,j} = \frac{\exp(\langle q_{b,i}, k_{b,j}\rangle / T)}
        {\sum_{j'=1}^{N} \exp(\langle q_{b,i}, k_{b,j'}\rangle / T)}

    ``query`` (B, C, H, W) (N_q = H·W positions), ``key`` (B, C, H', W') (N_k = H'·W' positions)
    → ``(B, N_q, N_k)``, each row a distribution over key positions. No 1/√C scaling: the paper
    writes a plain dot product inside σ; ``temperature`` T = 1 is the paper (T is only a
    convenience for experiments and tests).
    """
    if query.dim() != 4 or key.dim() != 4:
        raise ValueError(f"tat_attention needs (B, C, H, W) maps, got {tuple(query.shape)} and {tuple(key.shape)}")
    if query.shape[:2] != key.shape[:2]:
        raise ValueError(
            f"tat_attention needs equal batch and channel sizes, got {tuple(query.shape)} and {tuple(key.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = torch.bmm(_flat(query), _flat(key).transpose(1, 2)) / temperature
    return torch.softmax(logits, dim=-1)


def tat_reconfigure(query: Tensor, key: Tensor, value: Tensor, temperature: float = 1.0) -> Tensor:
    r"""The reconfigured student map: each query position gets a weighted sum of all value positions.

    .. math:: f^{s'}_{b,i} = \sum_{j=1}^{N} W_{b,i,j}\, v_{b,j}, \qquad W = \text{tat\_attention}(q, k)

    ``query`` (B, C, H, W); ``key`` and ``value`` (B, C, H', W') → ``(B, C, H, W)`` (the query's
    spatial layout).
    """
    if value.shape != key.shape:
        raise ValueError(f"key and value need equal shapes, got {tuple(key.shape)} and {tuple(value.shape)}")
    att = tat_attention(query, key, temperature)
    out = torch.bmm(att, _flat(value))  # (B, N_q, C)
    b, c, h, w = query.shape
    return out.transpose(1, 2).reshape(b, c, h, w)


def tat_loss(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    teacher: Tensor,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> Tensor:
    r"""L_TaT: squared distance between the teacher map and the reconfigured student map.

    .. math::
        W_{b,i} = \sigma\big(\langle\theta(f^t)_{b,i}, \gamma(f^s)_{b,1}\rangle, \dots,
        \langle\theta(f^t)_{b,i}, \gamma(f^s)_{b,N}\rangle\big), \qquad
        f^{s'}_{b,i} = \sum_{j=1}^{N} W_{b,i,j}\,\varphi(f^s)_{b,j},

        L_{TaT} = \frac{1}{B\,C\,H\,W} \sum_{b,i} \lVert f^t_{b,i} - f^{s'}_{b,i} \rVert_2^2
        \quad (\text{``mean''}), \qquad
        \frac{1}{B} \sum_{b,i} \lVert f^t_{b,i} - f^{s'}_{b,i} \rVert_2^2 \quad (\text{``sum''})

    With the method's embeddings, ``query`` = θ(f^t) (teacher positions ask), ``key`` = γ(f^s)
    and ``value`` = φ(f^s) (student positions answer), ``teacher`` = f^t; all (B, C, H, W) at the
    teacher's C channels → scalar. Passing ``query`` = γ(f^s), ``key`` = θ(f^t) instead gives the
    authors' code's arrangement (see the method).

    Paper: Lin et al., "Knowledge Distillation via the Target-aware Transformer", CVPR 2022,
    arXiv 2205.10793, §3.2 (one-to-all spatial matching; each teacher pixel i is matched against
    every student pixel j). The paper writes the unnormalised squared norm; ``"mean"`` (default)
    is the authors' code's ``nn.MSELoss()``, the scale its loss factor was tuned at; ``"sum"`` is
    the per-sample squared norm, C·H·W times larger.
    """
    _check_reduction(reduction)
    if teacher.shape != query.shape:
        raise ValueError(
            f"tat_loss needs the teacher map in the query's shape, got {tuple(teacher.shape)} and {tuple(query.shape)}"
        )
    sq = (teacher - tat_reconfigure(query, key, value, temperature)).pow(2)
    return sq.mean() if reduction == "mean" else sq.sum() / teacher.shape[0]


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def _size2(size: int | Sequence[int], name: str) -> tuple[int, int]:
    """An int or a pair of ints, each >= 1, as an (h, w) pair."""
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {size!r}")
    return pair[0], pair[1]


def _check_maps(what: str, *maps: Tensor) -> None:
    if any(x.dim() != 4 for x in maps):
        raise ValueError(f"{what} needs (B, C, H, W) maps, got {[tuple(x.shape) for x in maps]}")


def tat_patch_grid(
    height: int, width: int, patch_size: int | Sequence[int], group_size: int = 1
) -> tuple[int, int, int]:
    """The patch grid of an ``height`` x ``width`` map: ``(n, m, g)``, n x m patches of ``patch_size``
    (h, w) in g = n·m / ``group_size`` groups.

    Raises ValueError, naming the sizes, when the patch size does not divide the map or the group
    size does not divide the number of patches (the authors' code silently drops the remainder).
    """
    ph, pw = _size2(patch_size, "patch_size")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if height % ph or width % pw:
        raise ValueError(
            f"patch_size {(ph, pw)} must divide the {height}x{width} map: choose a patch size whose height divides "
            f"{height} and whose width divides {width}"
        )
    n, m = height // ph, width // pw
    if (n * m) % group_size:
        raise ValueError(
            f"group_size {group_size} must divide the {n * m} patches ({n}x{m} of size {(ph, pw)}) "
            f"of the {height}x{width} map"
        )
    return n, m, n * m // group_size


def tat_patch_groups(x: Tensor, patch_size: int | Sequence[int], group_size: int) -> Tensor:
    r"""Split maps into patches and concatenate each group of patches along the channels.

    ``x`` (B, C, H, W) is cut into n x m patches of ``patch_size`` (h, w), n = H/h, m = W/w, taken
    in raster order (row by row); consecutive runs of p = ``group_size`` patches form the
    g = n·m/p groups, and the p patches of a group are stacked along the channels:

    .. math:: X_{b,k} = \big[\,x_{b,\,kp}\;;\;x_{b,\,kp+1}\;;\;\dots\;;\;x_{b,\,kp+p-1}\,\big]
        \in \mathbb{R}^{pC \times h \times w}, \qquad k = 0, \dots, g-1

    → ``(B·g, p·C, h, w)``: group k of sample b at batch row ``b·g + k``; its channels are patch
    by patch (the first C channels are the group's first patch). A pixel of the result holds the
    features of p positions of the original map, one from each patch of its group.
    """
    _check_maps("tat_patch_groups", x)
    b, c, height, width = x.shape
    n, m, g = tat_patch_grid(height, width, patch_size, group_size)
    ph, pw = height // n, width // m
    # (B, C, n, h, m, w) -> (B, n, m, C, h, w): patch index i·m + j in raster order, then groups of p
    patches = x.reshape(b, c, n, ph, m, pw).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b * g, group_size * c, ph, pw)


def tat_patch_group_loss(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    teacher: Tensor,
    patch_size: int | Sequence[int],
    group_size: int,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> Tensor:
    r"""L^P_TaT, patch-group distillation: one-to-all TaT matching inside each group of patches.

    Every map is grouped by :func:`tat_patch_groups` (patches of size h x w, p patches per group
    stacked along the channels); group k of the teacher is matched, one to all, against group k of
    the student only:

    .. math::
        L^{P}_{TaT} = \sum_{k=1}^{g} \big\lVert T_k - \sigma(Q_k K_k^\top) V_k \big\rVert^2,
        \qquad Q_k, K_k, V_k, T_k \in \mathbb{R}^{hw \times pC}

    (rows of Q_k, K_k, V_k, T_k are the hw pixels of group k of query, key, value, teacher; σ is
    the row softmax of :func:`tat_attention`). ``query``, ``teacher`` (B, C, H, W); ``key``,
    ``value`` (B, C, H, W) of the same spatial size (groups pair up by position) → scalar.
    ``"mean"`` divides the sum by B·C·H·W (the authors' ``nn.MSELoss`` over all groups), ``"sum"``
    by B. One group holding every patch of a one-patch map is :func:`tat_loss`; 1 x 1 patches in
    groups of one are the one-to-one ‖f^t − φ(f^s)‖² (each softmax has a single entry).

    Paper: Lin et al., CVPR 2022, arXiv 2205.10793, §3.3 (hierarchical distillation, patch-group
    distillation): local TaT inside groups keeps the cost at O(g·h²w²) instead of O(H²W²) while
    each pixel still sees p positions of the original map.
    """
    _check_reduction(reduction)
    _check_maps("tat_patch_group_loss", query, key, value, teacher)
    if teacher.shape != query.shape or key.shape != value.shape or key.shape[2:] != query.shape[2:]:
        raise ValueError(
            "tat_patch_group_loss needs query and teacher of one shape and key and value of one shape, all of one "
            f"spatial size; got query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}, "
            f"teacher {tuple(teacher.shape)}"
        )
    groups = tat_patch_grid(query.shape[2], query.shape[3], patch_size, group_size)[2]
    loss = tat_loss(*(tat_patch_groups(x, patch_size, group_size) for x in (query, key, value, teacher)),
                    temperature, reduction)
    # groups ride in the batch axis: "sum" divided by B·g there, so back to per-sample
    return loss * groups if reduction == "sum" else loss


def tat_anchor_grid(height: int, width: int, kernel: int | Sequence[int]) -> tuple[int, int]:
    """The anchor map's size ``(H / k_h, W / k_w)``; ValueError, naming the sizes, when ``kernel``
    does not divide the ``height`` x ``width`` map (the authors' code drops the remainder)."""
    kh, kw = _size2(kernel, "anchor kernel")
    if height % kh or width % kw:
        raise ValueError(
            f"anchor kernel {(kh, kw)} must divide the {height}x{width} map: choose a kernel whose height divides "
            f"{height} and whose width divides {width}"
        )
    return height // kh, width // kw


def tat_anchors(x: Tensor, kernel: int | Sequence[int]) -> Tensor:
    r"""Anchor points: the mean of each non-overlapping k_h x k_w window.

    .. math:: a_{b,c,u,v} = \frac{1}{k_h k_w} \sum_{i<k_h,\,j<k_w} x_{b,c,\,u k_h + i,\,v k_w + j}

    ``x`` (B, C, H, W) → ``(B, C, H/k_h, W/k_w)`` (average pooling, stride = kernel).
    """
    _check_maps("tat_anchors", x)
    k = _size2(kernel, "anchor kernel")
    tat_anchor_grid(x.shape[2], x.shape[3], k)  # a clear error where pooling would drop a remainder
    return F.avg_pool2d(x, k, stride=k)


def tat_anchor_loss(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    teacher: Tensor,
    kernel: int | Sequence[int],
    temperature: float = 1.0,
    reduction: str = "mean",
) -> Tensor:
    r"""L^A_TaT, anchor-point distillation: one-to-all TaT on the anchor maps.

    .. math:: L^{A}_{TaT} = \text{tat\_loss}\big(A(q), A(k), A(v), A(f^t)\big), \qquad A = \text{tat\_anchors}

    Each map is average-pooled with a non-overlapping ``kernel`` (:func:`tat_anchors`), so every
    anchor summarises a k_h x k_w region and the matching spans the whole (coarse) map:
    long-range dependence at cost O((HW / k_h k_w)²). ``query``, ``teacher`` (B, C, H, W); ``key``,
    ``value`` (B, C, H', W') → scalar; ``reduction`` as :func:`tat_loss` (over the anchor maps).

    Paper: Lin et al., CVPR 2022, arXiv 2205.10793, §3.3 (anchor-point distillation).
    """
    _check_reduction(reduction)
    _check_maps("tat_anchor_loss", query, key, value, teacher)
    if teacher.shape != query.shape:
        raise ValueError(
            f"tat_anchor_loss needs the teacher map in the query's shape, got {tuple(teacher.shape)} and "
            f"{tuple(query.shape)}"
        )
    return tat_loss(*(tat_anchors(x, kernel) for x in (query, key, value, teacher)), temperature, reduction)
