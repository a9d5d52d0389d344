"""Spot-adaptive KD (SAKD): per-sample, per-spot distillation decisions.

Paper: J. Song, Y. Chen, J. Ye, M. Song, "Spot-adaptive Knowledge Distillation", IEEE TIP 2022,
arXiv 2205.02399. A policy network decides, for each sample and each candidate spot (layer pair),
whether to distill there; the decisions are drawn with Gumbel-softmax and the spot losses are
weighted by them. The same decisions route a multi-path network (:func:`spot_route`) built from
the teacher's and the student's stages, whose task loss (:func:`spot_route_loss`) trains the
policy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.functional._precision import fp32

__all__ = [
    "gumbel_softmax_decisions",
    "spot_adaptive_loss",
    "spot_gumbel_temperature",
    "spot_hint_losses",
    "spot_route",
    "spot_route_loss",
]

Stage = Callable[[Tensor], Tensor]


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
    soft = F.softmax(fp32(z) / tau, dim=-1)
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


def _per_sample(d: Tensor, like: Tensor) -> Tensor:
    """(B,) decisions shaped to broadcast over ``like`` (B, ...)."""
    return d.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def spot_route(
    inputs: Tensor,
    student_stages: Sequence[Stage],
    teacher_stages: Sequence[Stage],
    to_teacher: Sequence[Stage],
    to_student: Sequence[Stage],
    decisions: Tensor,
) -> Tensor:
    r"""SAKD's multi-path routing network: each sample's forward pass takes, stage by stage, the
    teacher's or the student's stage, as its decisions say.

    Both networks are split into the same number N of stages :math:`S_k` (student) and
    :math:`T_k` (teacher); the spot k (k < N) sits after stage k. With :math:`h^0_s = h^0_t = x`
    and, per sample, :math:`d_k \in \{0, 1\}` (1: stage k is the teacher's),

    .. math::
        o^k_s = S_k(h^{k-1}_s), \quad o^k_t = T_k(h^{k-1}_t), \\
        h^k_t = d_k\, o^k_t + (1 - d_k)\, A^k_{s\to t}(o^k_s), \quad
        h^k_s = (1 - d_k)\, o^k_s + d_k\, A^k_{t\to s}(o^k_t) \quad (k < N), \\
        y = d_N\, o^N_t + (1 - d_N)\, o^N_s.

    For hard decisions this is one path per sample: stage k runs in the network d_k names, and
    an adapter :math:`A^k` converts the feature at spot k when the path switches network there
    (all ones: exactly the teacher; all zeros: exactly the student). With straight-through
    decisions the gradient of y reaches the decisions (hence the policy) and the adapters.

    Args:
        inputs: x, (B, ...) fed to the first stage of both networks.
        student_stages, teacher_stages: N callables each; stage k maps spot k-1's feature to
            spot k's, the last one ends in the output (e.g. logits (B, K)); the two networks'
            outputs must have the same shape.
        to_teacher, to_student: N - 1 adapters each, :math:`A^k_{s\to t}` and
            :math:`A^k_{t\to s}` at the spots.
        decisions: (B, N), 1 = the teacher's stage (hard {0, 1}, or soft in [0, 1]).

    Returns the routed output y, shaped like the networks' outputs.
    """
    n = len(student_stages)
    if n < 1 or len(teacher_stages) != n:
        raise ValueError(
            f"need the same number (>= 1) of student and teacher stages, got {n} and {len(teacher_stages)}"
        )
    if len(to_teacher) != n - 1 or len(to_student) != n - 1:
        raise ValueError(
            f"{n} stages need {n - 1} adapters each way, got {len(to_teacher)} (to teacher) and "
            f"{len(to_student)} (to student)"
        )
    if decisions.dim() != 2 or decisions.shape[1] != n or decisions.shape[0] != inputs.shape[0]:
        raise ValueError(
            f"decisions must be (B, N) = ({inputs.shape[0]}, {n}), got {tuple(decisions.shape)}"
        )
    h_s = h_t = inputs
    for k in range(n - 1):
        o_s, o_t = student_stages[k](h_s), teacher_stages[k](h_t)
        d = _per_sample(decisions[:, k], o_t)
        h_t = d * o_t + (1 - d) * to_teacher[k](o_s)
        h_s = (1 - d) * o_s + d * to_student[k](o_t)
    o_s, o_t = student_stages[-1](h_s), teacher_stages[-1](h_t)
    if o_s.shape != o_t.shape:
        raise ValueError(f"the last stages' outputs differ in shape: student {tuple(o_s.shape)}, "
                         f"teacher {tuple(o_t.shape)}")
    d = _per_sample(decisions[:, -1], o_t)
    return d * o_t + (1 - d) * o_s


def spot_route_loss(routed_logits: Tensor, targets: Tensor, output_decisions: Tensor,
                    min_teacher_frac: float = 0.5) -> Tensor:
    r"""Task loss of the multi-path routing network, which trains the policy and the adapters.

    .. math:: L_{route} = \mathrm{CE}(y, \text{targets})
        + \max\big(0,\; \rho B - \textstyle\sum_b d_{bN}\big)

    ``routed_logits`` y (B, K) from :func:`spot_route`, ``targets`` (B,) class labels,
    ``output_decisions`` :math:`d_{\cdot N}` (B,) the decisions at the output (1: the teacher's
    last stage), :math:`\rho` = ``min_teacher_frac``. The hinge, from the authors' code
    (zju-vipa/spot-adaptive-pytorch, ``train.py``, with :math:`\rho = 1/2`), penalises batches
    where fewer than :math:`\rho B` samples take the teacher's output, i.e. keeps the gated
    logit KD from being switched off wholesale; ``min_teacher_frac=0`` drops it.
    """
    if routed_logits.dim() != 2 or targets.shape != routed_logits.shape[:1]:
        raise ValueError(
            f"routed logits must be (B, K) with targets (B,), got {tuple(routed_logits.shape)} and "
            f"{tuple(targets.shape)}"
        )
    if output_decisions.shape != targets.shape:
        raise ValueError(f"output decisions must be (B,) = {tuple(targets.shape)}, got "
                         f"{tuple(output_decisions.shape)}")
    if not 0.0 <= min_teacher_frac <= 1.0:
        raise ValueError(f"min_teacher_frac must be in [0, 1], got {min_teacher_frac}")
    loss = F.cross_entropy(routed_logits, targets)
    if min_teacher_frac > 0:
        batch = routed_logits.shape[0]
        loss = loss + (min_teacher_frac * batch - output_decisions.sum()).clamp(min=0)
    return loss
