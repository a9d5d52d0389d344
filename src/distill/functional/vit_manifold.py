r"""The math of fine-grained manifold distillation for vision transformers.

Paper: Hao, Guo, Jia, Han, Tang, Zhang, Hu, Wang, "Learning Efficient Vision Transformers via
Fine-Grained Manifold Distillation", NeurIPS 2022, arXiv 2107.01378.

Patch tokens ``F`` of one layer: ``(B, L, D)`` (prefix tokens already dropped). Every patch
embedding is ℓ2-normalised over its D channels (ψ), and the *manifold* of a set of patches is the
matrix of their pairwise cosine similarities, ``ψ(F) ψ(F)ᵀ``. The full relation of all B·L patches
of a batch costs O((B L)²); the paper decouples it into three cheaper terms:

- intra-image: per image, the ``L × L`` relation of its patches;
- inter-image: per patch position, the ``B × B`` relation of the images' patches there;
- random: the ``K × K`` relation of K patches drawn at random from all B·L patches of the batch.

Relations are width-free, so a student of width ``D_s`` and a teacher of width ``D_t`` compare
directly, without a projector; only the token counts must agree (or be merged to agree, see
:func:`manifold_merge_patches`). Nothing here detaches the teacher; the method passes detached tensors.

Normalisation: the paper's text could not be read here (only its abstract); each term is the
mean squared difference of the two relation matrices (sum over entries divided by their number),
which is what the authors' code computes (huawei-noah/Efficient-Computing,
``Distillation/ManifoldKD/losses.py``, ``layer_mf_loss``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.functional._precision import fp32

__all__ = [
    "manifold_relation",
    "manifold_intra_loss",
    "manifold_inter_loss",
    "manifold_random_indices",
    "manifold_random_loss",
    "manifold_merge_patches",
    "manifold_layer_loss",
]


def _tokens(student: Tensor, teacher: Tensor, what: str) -> None:
    if student.dim() != 3 or teacher.dim() != 3:
        raise ValueError(f"{what} needs patch tokens (B, L, D), got {tuple(student.shape)} and {tuple(teacher.shape)}")
    if student.shape[:2] != teacher.shape[:2]:
        raise ValueError(
            f"{what} needs the same batch size and number of patch tokens (B, L) for student and teacher, got "
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} (the widths D may differ); "
            "merge the larger grid first (manifold_merge_patches)"
        )


def manifold_relation(tokens: Tensor) -> Tensor:
    r"""The normalised manifold relation of each set of tokens: ``(..., N, D) → (..., N, N)``.

    .. math:: \mathcal M(F) = \psi(F)\,\psi(F)^\top, \qquad \psi(f) = f / \lVert f \rVert_2

    Entry ``(i, j)`` is the cosine similarity of tokens i and j (1 on the diagonal).
    """
    normed = F.normalize(fp32(tokens), dim=-1)
    return normed @ normed.transpose(-1, -2)


def manifold_intra_loss(student: Tensor, teacher: Tensor) -> Tensor:
    r"""Intra-image patch relation: per image, the L×L relations of its patches.

    .. math:: L_{intra} = \frac{1}{B L^2} \sum_{b=1}^{B}
        \big\lVert \mathcal M(F^T_b) - \mathcal M(F^S_b) \big\rVert_F^2

    ``student`` (B, L, D_s), ``teacher`` (B, L, D_t) → scalar.
    """
    _tokens(student, teacher, "manifold_intra_loss")
    return (manifold_relation(teacher) - manifold_relation(student)).pow(2).mean()


def manifold_inter_loss(student: Tensor, teacher: Tensor) -> Tensor:
    r"""Inter-image patch relation: per patch position, the B×B relations of the images.

    .. math:: L_{inter} = \frac{1}{L B^2} \sum_{l=1}^{L}
        \big\lVert \mathcal M(F^T_{:,l}) - \mathcal M(F^S_{:,l}) \big\rVert_F^2

    ``F_{:,l}`` (B, D) holds the B images' tokens at position l. ``student`` (B, L, D_s),
    ``teacher`` (B, L, D_t) → scalar.
    """
    _tokens(student, teacher, "manifold_inter_loss")
    return (manifold_relation(teacher.transpose(0, 1)) - manifold_relation(student.transpose(0, 1))).pow(2).mean()


def manifold_random_indices(
    batch: int, patches: int, num_samples: int, generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """K = ``num_samples`` distinct indices into the B·L patches of a batch (row-major: image, then
    position), drawn uniformly without replacement on the CPU from ``generator``: ``(min(K, B·L),)``."""
    if num_samples < 1:
        raise ValueError(f"num_samples (K) must be >= 1, got {num_samples}")
    idx = torch.randperm(batch * patches, generator=generator)[:num_samples]
    return idx if device is None else idx.to(device)


def manifold_random_loss(student: Tensor, teacher: Tensor, indices: Tensor) -> Tensor:
    r"""Randomly sampled patch relation: the K×K relation of K patches drawn from the whole batch.

    .. math:: L_{random} = \frac{1}{K^2}
        \big\lVert \mathcal M(F^T_{\Omega}) - \mathcal M(F^S_{\Omega}) \big\rVert_F^2

    ``Ω`` = ``indices`` (K,) into the B·L patches flattened row-major
    (:func:`manifold_random_indices`); the same patches for student and teacher. ``student``
    (B, L, D_s), ``teacher`` (B, L, D_t) → scalar.
    """
    _tokens(student, teacher, "manifold_random_loss")
    if indices.dim() != 1 or indices.numel() == 0:
        raise ValueError(f"indices must be a non-empty (K,) index tensor, got shape {tuple(indices.shape)}")
    s = student.reshape(-1, student.shape[-1])[indices]
    t = teacher.reshape(-1, teacher.shape[-1])[indices]
    return (manifold_relation(t) - manifold_relation(s)).pow(2).mean()


def manifold_merge_patches(tokens: Tensor, patches: int) -> Tensor:
    """Merge a square grid of patch tokens down to ``patches`` tokens: ``(B, L, D) → (B, L', m²·D)``.

    Each ``m × m`` block of neighbouring patches (``m = √L / √L'``, an integer) becomes one token,
    their embeddings concatenated. Relations are width-free, so the merged grid compares with a
    model whose patches are ``m`` times larger. This is the authors' code's answer to different
    patch counts (``merge`` in ``Distillation/ManifoldKD/losses.py``); the paper's text could not
    be read here.
    """
    b, n, d = tokens.shape
    if n == patches:
        return tokens
    side, target = math.isqrt(n), math.isqrt(patches)
    if side * side != n or target * target != patches or target == 0 or side % target:
        raise ValueError(
            f"cannot merge {n} patch tokens into {patches}: both must be square numbers and the side "
            f"{math.sqrt(n):g} a multiple of {math.sqrt(max(patches, 0)):g}"
        )
    m = side // target
    x = tokens.reshape(b, target, m, target, m, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, patches, m * m * d)


def manifold_layer_loss(
    student: Tensor,
    teacher: Tensor,
    indices: Tensor,
    intra_weight: float = 4.0,
    inter_weight: float = 0.1,
    random_weight: float = 0.2,
) -> Tensor:
    r"""The manifold loss of one (student layer, teacher layer) pair.

    .. math:: L_{mf} = \alpha\, L_{intra} + \beta\, L_{inter} + \gamma\, L_{random}

    α = ``intra_weight``, β = ``inter_weight``, γ = ``random_weight``; defaults 4, 0.1, 0.2 are the
    authors' ImageNet command (``--w-patch 4 --w-sample 0.1 --w-rand 0.2``, README of
    huawei-noah/Efficient-Computing ``Distillation/ManifoldKD``). ``student`` (B, L, D_s),
    ``teacher`` (B, L, D_t), ``indices`` (K,) → scalar.
    """
    return (intra_weight * manifold_intra_loss(student, teacher)
            + inter_weight * manifold_inter_loss(student, teacher)
            + random_weight * manifold_random_loss(student, teacher, indices))
