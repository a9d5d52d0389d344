"""QuPeD's quantiser: learnable centres, the distance-to-centres relaxation and its proximal steps.

Ozkara, Singh, Data, Diggavi, "QuPeD: Quantized Personalization via Distillation with Applications
to Federated Learning", NeurIPS 2021, arXiv 2107.13892. A quantised model's weights must take values
in a set of ``m`` centres ``c`` (per layer); the paper relaxes the constraint ``x in c^d`` into a
penalty ``lambda · R(x, c)`` and optimises ``x`` and ``c`` by alternating proximal gradient steps.
Only the paper's abstract could be read here; the forms below (``R`` the l1 distance to the nearest
centre, the soft-threshold prox of ``x``, the centres' gradient and the sign-count subgradient of ``R``
with the gradient clipped at 10) are read from the authors' code (github.com/kazkara/QuPeD,
``utils.py``: ``quantize``, ``update_prox``, ``init_centers``).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["quped_center_grad", "quped_init_centers", "quped_prox", "quped_quantize", "quped_relaxation"]


def _check_centers(centers: Tensor, who: str) -> None:
    if centers.dim() != 1 or centers.numel() < 2:
        raise ValueError(f"{who}: centers must be a (m,) tensor with m >= 2; got shape {tuple(centers.shape)}")


def _nearest(x: Tensor, centers: Tensor) -> Tensor:
    """Index of each element's nearest centre (ties: the lower centre); same shape as ``x``."""
    return (x.unsqueeze(-1) - centers).abs().argmin(-1)


def quped_quantize(x: Tensor, centers: Tensor) -> Tensor:
    """``Q_c(x)``: every element of ``x`` (any shape) replaced by its nearest centre of ``c`` ``(m,)``."""
    _check_centers(centers, "quped_quantize")
    return centers[_nearest(x, centers)]


def quped_relaxation(x: Tensor, centers: Tensor) -> Tensor:
    r"""The relaxation ``R(x, c) = ||x - Q_c(x)||_1 = sum_i min_j |x_i - c_j|`` (a scalar)."""
    return (x - quped_quantize(x, centers)).abs().sum()


def quped_prox(x: Tensor, centers: Tensor, step: float) -> Tensor:
    r"""``prox_{step · R(·, c)}(x)``: each element moves toward its nearest centre by ``step`` and stops on it,
    ``q + sign(x - q) · max(|x - q| - step, 0)`` with ``q = Q_c(x)`` (soft thresholding around ``q``)."""
    if step < 0:
        raise ValueError(f"quped_prox: step must be >= 0; got {step}")
    q = quped_quantize(x, centers)
    d = x - q
    return q + d.sign() * (d.abs() - step).clamp_min(0)


def quped_center_grad(x: Tensor, centers: Tensor, grad_q: Tensor, lam: float, clip: float = 10.0) -> Tensor:
    r"""The centres' step direction ``(m,)``:
    ``g_j = clip(sum_{i: Q(x_i) = c_j} dF/dq_i, ±clip) - lam · (#{i in A_j: x_i > c_j} - #{i in A_j: x_i < c_j})``.

    The first term is the gradient of the loss at the quantised weights ``q = Q_c(x)`` with respect to
    ``c_j`` (``dq_i/dc_j = 1`` for the weights ``A_j`` that centre ``j`` quantises), clipped at ``clip`` as
    the authors' code; the second is a subgradient of ``lam · R(x, c)`` in ``c_j``. Step: ``c <- c - lr · g``.

    Args:
        x: latent weights (any shape); ``grad_q``: ``dF/dq`` of the same shape; ``centers``: ``(m,)``.
    """
    _check_centers(centers, "quped_center_grad")
    if grad_q.shape != x.shape:
        raise ValueError(f"quped_center_grad: grad_q {tuple(grad_q.shape)} must have x's shape {tuple(x.shape)}")
    idx = _nearest(x, centers).flatten()
    m = centers.numel()
    g = torch.zeros(m, dtype=centers.dtype, device=centers.device).index_add_(0, idx, grad_q.flatten().to(centers.dtype))
    s = (x.flatten() - centers[idx]).sign().to(centers.dtype)
    count = torch.zeros(m, dtype=centers.dtype, device=centers.device).index_add_(0, idx, s)
    return g.clamp(-clip, clip) - lam * count


def quped_init_centers(x: Tensor, m: int) -> Tensor:
    """Initial centres ``(m,)`` of a layer's weights ``x`` (the authors' ``init_centers``): for ``m = 2`` the
    means of its negative and of its non-negative weights; for ``m > 2`` ``m`` evenly spaced values from
    ``min x`` to ``max x``."""
    if m < 2:
        raise ValueError(f"quped_init_centers: m must be >= 2; got {m}")
    x = x.detach().flatten()
    if m == 2:
        neg, pos = x[x < 0], x[x >= 0]
        lo = neg.mean() if neg.numel() else -x.abs().mean()
        hi = pos.mean() if pos.numel() else x.abs().mean()
        return torch.stack([lo, hi]).to(x.dtype)
    return torch.linspace(float(x.min()), float(x.max()), m, dtype=x.dtype)
