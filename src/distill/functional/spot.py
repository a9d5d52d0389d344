"""Spot-adaptive KD (SAKD): per-sample, per-spot distillation decisions.

Paper: J. Song, Y. Chen, J. Ye, M. Song, "Spot-adaptive Knowledge Distillation", IEEE TIP 2022,
arXiv 2205.02399. A policy network decides, for each sample and each candidate spot (layer pair),
whether to distill there; the decisions are drawn with Gumbel-softmax and the spot losses are
weighted by them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "gumbel_softmax_decisions",
    "spot_adaptive_loss",
    "spot_gumbel_temperature",
    "spot_hint_losses",
]


def gumbel_softmax_decisions(
    logits: Tensor,
    tau: float,
    *,
    hard: bool = True,
    noise: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Binary Gumbel-softmax decisions from two-way policy logits.

    ``logits`` (B, K, 2): per sample b and spot k, the unnormalised log-probabilities of
    {0: "do not distill", 1: "distill"}. With Gumbel noise :math:`g \sim \mathrm{Gumbel}(0, 1)`
    (``-log(-log U)``, U uniform, drawn from ``generator``),

    .. math:: y_{bk} = \mathrm{softmax}\big((\ell_{bk} + g_{bk}) / \tau\big), \qquad d_{bk} = y_{bk,1}.

    ``hard=True``: the forward value is the one-hot argmax, the gradient that of the soft ``y``
    (straight-through estimator, as in Gumbel-softmax training of discrete routing).
    ``noise=False`` drops the noise (deterministic decisions: the policy's argmax when ``hard``).
    Returns ``d`` (B, K) in [0, 1] (exactly {0, 1} when ``hard``).
    """
    if logits.dim() != 3 or logits.shape[-1] != 2:
        raise ValueError(f"policy logits must be (B, K, 2), got {tuple(logits.shape)}")
    if tau <= 0:
        raise ValueError(f"Gumbel temperature must be > 0, got {tau}")
    z = logits
    if noise:
        u = torch.rand(logits.shape, generator=generator, dtype=logits.dtype,
                       device=generator.device if generator is not None else logits.device)
        u = u.to(logits.device).clamp_(1e-10, 1.0 - 1e-10)
        z = logits - torch.log(-torch.log(u))
    soft = F.softmax(z / tau, dim=-1)
    if not hard:
        return soft[..., 1]
    index = soft.argmax(dim=-1, keepdim=True)
    one_hot = torch.zeros_like(soft).scatter_(-1, index, 1.0)
    return (one_hot - soft.detach() + soft)[..., 1]


def spot_hint_losses(students: list[Tensor], teachers: list[Tensor]) -> Tensor:
    r"""Per-sample FitNets hint loss at each spot: (B, K).

    .. math:: \ell_{bk} = \tfrac12 \lVert T_k(x_b) - r_k(S_k(x_b)) \rVert_2^2

    ``students[k]`` is the student's feature at spot k *already passed through its adapter* r_k,
    ``teachers[k]`` the teacher's; equal shapes (B, ...) per spot. The batch mean of column k is
    :func:`~distill.functional.fitnet_hint_loss` at that spot.
    """
    if len(students) != len(teachers) or not students:
        raise ValueError(f"need one teacher per student feature, got {len(students)} and {len(teachers)}")
    cols = []
    for k, (s, t) in enumerate(zip(students, teachers)):
        if s.shape != t.shape:
            raise ValueError(f"spot {k}: shapes differ, student {tuple(s.shape)} vs teacher {tuple(t.shape)}")
        cols.append(0.5 * (s - t).flatten(1).pow(2).sum(dim=1))
    return torch.stack(cols, dim=1)


def spot_adaptive_loss(spot_losses: Tensor, decisions: Tensor) -> Tensor:
    r"""SAKD's distillation objective: decision-weighted spot losses, mean over the batch.

    .. math:: L = \frac1B \sum_b \sum_k d_{bk}\, \ell_{bk}

    ``spot_losses`` (B, K) per-sample loss at each spot; ``decisions`` (B, K) the policy's
    (hard or soft) decision to distill sample b at spot k → scalar.
    """
    if spot_losses.shape != decisions.shape or spot_losses.dim() != 2:
        raise ValueError(
            f"spot losses and decisions must both be (B, K): {tuple(spot_losses.shape)} vs {tuple(decisions.shape)}"
        )
    return (decisions * spot_losses).sum(dim=1).mean()


def spot_gumbel_temperature(epoch: int, total_epochs: int | None, tau_start: float, tau_end: float) -> float:
    r"""Gumbel temperature at ``epoch`` (0-based): linear decay from ``tau_start`` to ``tau_end``.

    .. math:: \tau_e = \tau_{start} - (\tau_{start} - \tau_{end}) \cdot \frac{e}{\max(E - 1, 1)}

    clamped to ``tau_end`` beyond the last epoch; ``tau_start`` when ``total_epochs`` is unknown.
    """
    if total_epochs is None or total_epochs <= 1:
        return float(tau_start) if total_epochs is None or epoch <= 0 else float(tau_end)
    frac = min(max(epoch, 0) / (total_epochs - 1), 1.0)
    return float(tau_start - (tau_start - tau_end) * frac)
