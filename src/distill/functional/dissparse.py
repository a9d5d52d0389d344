r"""The math of DDSL, the dynamically distillability-and-sparsability learning framework.

Paper: Y. Liu, J. Cao, B. Li, W. Hu, S. Maybank, "Learning to Explore Distillability and Sparsability:
A Joint Framework for Model Compression", IEEE TPAMI 45(3), 2023 (no arXiv version found). Only the
abstract could be read here: a student's channels are pruned by an ADMM-based *knowledge distillation
with pruning* (KDP) optimisation, and a *dean* adjusts the distillation supervision and the sparsity
supervision by meta-learning. The concrete forms below are ours, written from that description:

* channel gates :math:`\gamma_l \in \mathbb R^{C_l \times 2}` (the BatchNorm scale and shift of each channel
  of layer ``l``) under the constraint "at most :math:`k_l` non-zero rows", split by ADMM into :math:`\gamma_l = Z_l` with the scaled dual
  :math:`U_l`: the penalty :func:`dissparse_admm_penalty`, the projection :func:`dissparse_keep_topk`
  (:math:`Z_l = \Pi_{k_l}(\gamma_l + U_l)`), then :math:`U_l \leftarrow U_l + \gamma_l - Z_l`;
* the dean's weights :math:`\lambda_i` of the loss terms :math:`L_i` (distillation, sparsity) are moved by
  the meta-gradient of a held-out loss after a virtual step :math:`\theta' = \theta - \eta \sum_i \lambda_i
  \nabla_\theta L_i(\theta)`: :func:`dissparse_dean_gradient`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["dissparse_admm_penalty", "dissparse_admm_update", "dissparse_balance_gradient", "dissparse_dean_gradient",
           "dissparse_keep_topk"]


def dissparse_keep_topk(v: Tensor, k: int) -> Tensor:
    r"""Euclidean projection onto the channel-sparse set :math:`\{z : z \text{ has at most } k
    \text{ non-zero rows}\}`: ``v`` ``(C,)`` or ``(C, D)`` (a channel's group of gate values, e.g. its
    BatchNorm scale and shift) with every row but the ``k`` of largest L2 norm set to 0 (ties: the lower
    index is kept). Returns a new tensor of ``v``'s shape."""
    if v.dim() not in (1, 2):
        raise ValueError(f"dissparse_keep_topk takes (C,) or (C, D); got shape {tuple(v.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= v.shape[0]:
        raise ValueError(f"k must be an int in [0, {v.shape[0]}]; got {k!r}")
    norms = v.abs() if v.dim() == 1 else v.pow(2).sum(1)
    order = torch.sort(norms, descending=True, stable=True).indices
    mask = torch.zeros(v.shape[0], dtype=torch.bool, device=v.device)
    mask[order[:k]] = True
    return torch.where(mask.view(-1, *([1] * (v.dim() - 1))), v, torch.zeros_like(v))


def dissparse_admm_penalty(gammas: Sequence[Tensor], z: Sequence[Tensor], u: Sequence[Tensor],
                           rho: float | Tensor = 1.0) -> Tensor:
    r"""ADMM's augmented-Lagrangian term :math:`\frac{\rho}{2}\sum_l \|\gamma_l - Z_l + U_l\|_2^2`.

    Shapes: per layer ``l``, ``gammas[l]``, ``z[l]``, ``u[l]`` are ``(C_l,)`` or ``(C_l, D)``; returns a scalar (gradient to
    ``gammas`` only: ``z`` and ``u`` are constants of the step)."""
    if not (len(gammas) == len(z) == len(u)) or not gammas:
        raise ValueError(f"gammas, z and u need one (C_l,) tensor per layer each; got {len(gammas)}, {len(z)}, {len(u)}")
    total = gammas[0].new_zeros(())
    for g, zl, ul in zip(gammas, z, u):
        if g.shape != zl.shape or g.shape != ul.shape:
            raise ValueError(f"gamma, Z and U of a layer must have one shape; got {tuple(g.shape)}, "
                             f"{tuple(zl.shape)}, {tuple(ul.shape)}")
        total = total + (g - zl.detach() + ul.detach()).pow(2).sum()
    return 0.5 * rho * total


@torch.no_grad()
def dissparse_admm_update(gammas: Sequence[Tensor], u: Sequence[Tensor], ks: Sequence[int]) -> tuple[list[Tensor], list[Tensor]]:
    r"""One ADMM update of the split variables (scaled form): per layer ``l``,
    :math:`Z_l = \Pi_{k_l}(\gamma_l + U_l)` (:func:`dissparse_keep_topk`), then :math:`U_l \leftarrow U_l +
    \gamma_l - Z_l`. Shapes: ``gammas[l]``, ``u[l]`` ``(C_l,)`` or ``(C_l, D)``; returns the new ``(z, u)`` lists."""
    if not (len(gammas) == len(u) == len(ks)):
        raise ValueError(f"gammas, u and ks need one entry per layer; got {len(gammas)}, {len(u)}, {len(ks)}")
    z_new, u_new = [], []
    for g, ul, k in zip(gammas, u, ks):
        zl = dissparse_keep_topk(g.detach() + ul, k)
        z_new.append(zl)
        u_new.append(ul + g.detach() - zl)
    return z_new, u_new


def dissparse_dean_gradient(meta_grads: Sequence[Tensor | None], term_grads: Mapping[str, Sequence[Tensor | None]],
                            lr: float) -> dict[str, Tensor]:
    r"""The meta-gradient of each loss weight after one virtual SGD step.

    With :math:`\theta' = \theta - \eta \sum_i \lambda_i g_i` (:math:`g_i = \nabla_\theta L_i(\theta)`, fixed),
    :math:`\theta'` is linear in :math:`\lambda`, so exactly

    .. math::
        \frac{\partial L_{meta}(\theta')}{\partial \lambda_i} = -\eta \,
        \langle \nabla_{\theta'} L_{meta}(\theta'),\; g_i \rangle .

    Args:
        meta_grads: :math:`\nabla_{\theta'} L_{meta}`, one tensor per parameter (``None``: no gradient).
        term_grads: ``{term: [g_i per parameter]}`` in the same order (``None``: the term does not reach it).
        lr: the virtual step :math:`\eta`.

    Returns ``{term: scalar tensor}``.
    """
    out: dict[str, Tensor] = {}
    for name, grads in term_grads.items():
        if len(grads) != len(meta_grads):
            raise ValueError(f"term {name!r} has {len(grads)} gradients for {len(meta_grads)} parameters")
        dot = torch.zeros(())
        for gm, gi in zip(meta_grads, grads):
            if gm is not None and gi is not None:
                dot = dot + (gm.detach().double() * gi.detach().double()).sum().cpu()
        out[name] = (-lr * dot).float()
    return out


def dissparse_balance_gradient(logits: Tensor, d: Tensor, total: float) -> Tensor:
    r"""Chain rule from loss weights to the logits of their balance.

    The weights are :math:`w = \text{total} \cdot \operatorname{softmax}(a)` (their sum stays ``total``:
    the dean moves the balance between terms, not the overall step). With :math:`d_i = \partial L/\partial w_i`
    and :math:`s = \operatorname{softmax}(a)`:

    .. math::
        \frac{\partial L}{\partial a_j} = \text{total} \cdot s_j \left(d_j - \sum_i s_i d_i\right).

    Shapes: ``logits`` ``(M,)``, ``d`` ``(M,)``; returns ``(M,)``.
    """
    if logits.shape != d.shape or logits.dim() != 1:
        raise ValueError(f"logits and d must be vectors of one shape (M,); got {tuple(logits.shape)}, {tuple(d.shape)}")
    sm = torch.softmax(logits, 0)
    return total * sm * (d - (sm * d).sum())
