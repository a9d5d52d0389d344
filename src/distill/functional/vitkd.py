r"""The math of ViTKD: mimicking the shallow layers, generating the deep layer.

Paper: Yang, Li, Zeng, Li, Yuan, Li, "ViTKD: Practical Guidelines for ViT feature knowledge
distillation", arXiv 2209.02432, 2022 (code: yzd-v/cls_KD).

Patch tokens are ``(B, L, D)`` (prefix tokens dropped), the student's already mapped to the
teacher's width by the method's linear layers. No modules here: the linear layers, the mask token
and the generative block (3x3 conv → ReLU → 3x3 conv on the token grid) live in
:mod:`distill.methods.vitkd`, and their outputs are passed in. Nothing here detaches the teacher.

Only the paper's abstract could be read here; the formulas' normalisations (sums over tokens and
channels divided by B; the generation loss also divided by the mask ratio λ) are the authors'
code's (``mmcls/models/dis_losses/vitkd.py``, ``ViTKDLoss``), the scale at which its weights
α = 3e-5 and β = 3e-6 were tuned.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["vitkd_mimic_loss", "vitkd_random_mask", "vitkd_fill_masked", "vitkd_generation_loss"]


def vitkd_mimic_loss(students: Sequence[Tensor], teachers: Sequence[Tensor]) -> Tensor:
    r"""ViTKD's mimicking loss over the shallow layers: squared error summed over layers, tokens and
    channels, averaged over the batch.

    .. math:: L_{lr} = \frac{1}{B} \sum_{k} \sum_{b=1}^{B} \sum_{l=1}^{L} \sum_{c=1}^{D_t}
        \big(F^T_{k,b,l,c} - \mathrm{Lin}_k(F^S_{k,b,l})_c\big)^2

    ``students[k]`` = :math:`\mathrm{Lin}_k(F^S_k)` (the student's layer k mapped to the teacher's
    width), ``teachers[k]`` = :math:`F^T_k`: each ``(B, L, D_t)``, equal shapes → scalar. The total
    loss weighs it by α (3e-5 in the authors' configs).
    """
    if len(students) == 0 or len(students) != len(teachers):
        raise ValueError(f"vitkd_mimic_loss needs as many student as teacher layers (>= 1), got "
                         f"{len(students)} and {len(teachers)}")
    total: Tensor | None = None
    for k, (s, t) in enumerate(zip(students, teachers)):
        if s.dim() != 3 or s.shape != t.shape:
            raise ValueError(f"vitkd_mimic_loss layer {k}: needs equal (B, L, D) shapes (map the student to the "
                             f"teacher's width first), got {tuple(s.shape)} and {tuple(t.shape)}")
        term = (s - t).pow(2).sum()
        total = term if total is None else total + term
    assert total is not None
    return total / teachers[0].shape[0]


def vitkd_random_mask(
    batch: int, patches: int, ratio: float = 0.5, generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    r"""ViTKD's random token mask: ``(B, L)`` bool, True = masked; exactly ``L - ⌊L(1 - λ)⌋`` tokens
    of each image are masked.

    Each image draws uniform noise per token (on the CPU, from ``generator``); its
    ``⌊L (1 - λ)⌋`` lowest-noise tokens are kept, the rest masked (MAE-style per-sample shuffling,
    as the authors' ``random_masking``). λ = ``ratio``.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ViTKD mask ratio must be in [0, 1], got {ratio}")
    keep = int(patches * (1 - ratio))
    noise = torch.rand(batch, patches, generator=generator)
    rank = noise.argsort(dim=1).argsort(dim=1)  # each token's place in its image's ascending noise order
    mask = rank >= keep
    return mask if device is None else mask.to(device)


def vitkd_fill_masked(tokens: Tensor, mask: Tensor, mask_token: Tensor) -> Tensor:
    r"""Replace the masked tokens by the (learned) mask token: ``(B, L, D)``.

    .. math:: \tilde F_{b,l} = \begin{cases} m & M_{b,l} = 1 \\ F_{b,l} & \text{otherwise} \end{cases}

    ``tokens`` (B, L, D), ``mask`` (B, L) bool (True = masked), ``mask_token`` broadcastable to (D,).
    """
    if mask.shape != tokens.shape[:2]:
        raise ValueError(f"mask must be (B, L) = {tuple(tokens.shape[:2])}, got {tuple(mask.shape)}")
    return torch.where(mask.unsqueeze(-1), mask_token.reshape(-1).to(tokens.dtype), tokens)


def vitkd_generation_loss(generated: Tensor, teacher: Tensor, mask: Tensor, ratio: float) -> Tensor:
    r"""ViTKD's generation loss on the deep layer: squared error over the masked tokens only.

    .. math:: L_{gen} = \frac{1}{B\,\lambda} \sum_{b=1}^{B} \sum_{l=1}^{L} M_{b,l}
        \sum_{c=1}^{D_t} \big(F^T_{b,l,c} - \mathcal G(\tilde F^S)_{b,l,c}\big)^2

    ``generated`` = :math:`\mathcal G(\tilde F^S)` (the generative block on the aligned student
    tokens with the masked ones replaced by the mask token), ``teacher`` :math:`F^T`: ``(B, L, D_t)``;
    ``mask`` (B, L) bool (True = masked); λ = ``ratio`` > 0 → scalar. Dividing by λ (the authors'
    code) keeps the loss's scale independent of how many tokens are masked. The total loss weighs
    it by β (3e-6 in the authors' configs).
    """
    if generated.dim() != 3 or generated.shape != teacher.shape:
        raise ValueError(f"vitkd_generation_loss needs equal (B, L, D) shapes, got {tuple(generated.shape)} and "
                         f"{tuple(teacher.shape)}")
    if mask.shape != teacher.shape[:2]:
        raise ValueError(f"mask must be (B, L) = {tuple(teacher.shape[:2])}, got {tuple(mask.shape)}")
    if not ratio > 0:
        raise ValueError(f"vitkd_generation_loss needs a mask ratio > 0, got {ratio}")
    sq = (generated - teacher).pow(2) * mask.unsqueeze(-1).to(teacher.dtype)
    return sq.sum() / (teacher.shape[0] * ratio)
