"""Target-aware transformer (TaT) distillation: one-to-all spatial matching of feature maps.

Lin, Xie, Wang, Yu, Chang, Liang, Wang, "Knowledge Distillation via the Target-aware
Transformer", CVPR 2022, arXiv 2205.10793.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["tat_attention", "tat_reconfigure", "tat_loss"]


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
    if teacher.shape != query.shape:
        raise ValueError(
            f"tat_loss needs the teacher map in the query's shape, got {tuple(teacher.shape)} and {tuple(query.shape)}"
        )
    out = tat_reconfigure(query, key, value, temperature)
    sq = (teacher - out).pow(2)
    if reduction == "mean":
        return sq.mean()
    if reduction == "sum":
        return sq.sum() / teacher.shape[0]
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
