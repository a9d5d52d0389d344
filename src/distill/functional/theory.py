"""Linear distillation theory: Phuong & Lampert, "Towards Understanding Knowledge Distillation",
ICML 2019 (arXiv 2105.13093, posted 2021).

Binary classification with a linear teacher ``h_t(x) = σ(w*ᵀx)`` and a linear student
``h(x) = σ(wᵀx)`` (or a deep linear one whose end-to-end weight is ``w = W_N ⋯ W_1``), trained by
gradient descent on the cross-entropy against the teacher's soft outputs on ``n`` points:

* :func:`binary_soft_cross_entropy`: the distillation objective;
* :func:`linear_distillation_limit`: where gradient descent from ``w0`` ends (the paper's
  optimisation-bias result): ``ŵ = P w* + (I − P) w0`` with ``P`` the projection on the span of
  the training inputs; for ``n ≥ d`` inputs in general position, ``ŵ = w*``;
* :func:`gaussian_transfer_risk`, :func:`sign_disagreement`: the transfer risk
  ``P_x[sign(wᵀx) ≠ sign(w*ᵀx)]``, in closed form for isotropic Gaussian inputs and empirically;
* :func:`gaussian_angular_alignment`, :func:`projection_risk_bound`: data geometry, and the risk
  bound ``E R_n ≤ min_β [p(β) + p(π/2 − β)^n]`` on the projected student.

What was checked against the paper: only its abstract (the paper's text was not reachable
here). The limit ``ŵ`` is argued in :func:`linear_distillation_limit` and checked numerically by
the tests (the trained student equals the closed form); the bound is derived here from that
limit (:func:`projection_risk_bound`) and has the form of the paper's Theorem 2 as we recall it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from distill.functional._precision import fp32

__all__ = ["binary_soft_cross_entropy", "gaussian_angular_alignment", "gaussian_transfer_risk",
           "linear_distillation_limit", "projection_risk_bound", "sign_disagreement"]


def binary_soft_cross_entropy(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    r"""Phuong & Lampert's distillation objective for a binary student:

    .. math:: L = -\frac1n \sum_i \big[t_i \log \sigma(s_i) + (1 - t_i)\log(1 - \sigma(s_i))\big],
              \qquad t_i = \sigma(w_*^\top x_i)

    (the teacher's temperature, if any, is folded into its weight). Shapes: ``student_logits``
    and ``teacher_logits`` (n,) or (n, 1), one logit per sample → scalar.
    """
    s, t = fp32(student_logits).reshape(-1), fp32(teacher_logits.detach()).reshape(-1)
    if s.shape != t.shape:
        raise ValueError(f"student and teacher need one logit per sample each; got {tuple(student_logits.shape)} "
                         f"and {tuple(teacher_logits.shape)}")
    return F.binary_cross_entropy_with_logits(s, torch.sigmoid(t))


def linear_distillation_limit(x: Tensor, w_teacher: Tensor, w0: Tensor | None = None) -> Tensor:
    r"""The weight gradient descent on :func:`binary_soft_cross_entropy` converges to from ``w0``:

    .. math:: \hat w = P w_* + (I - P)\, w_0, \qquad P = X^\top (X X^\top)^{+} X

    ``P`` projects on the span of the training inputs (the rows of ``X``). Why: every gradient of
    the loss is a combination of the inputs, so ``(I − P) w`` never moves from ``(I − P) w0``; and
    in the span the loss, strictly convex there, is minimal exactly where ``Xw = Xw*`` (every
    soft label matched). With ``w0 = 0`` the student is the teacher's projection on the data.

    Shapes: ``x`` (n, d), ``w_teacher`` (d,), ``w0`` (d,) or None (zeros) → (d,).
    """
    if x.dim() != 2 or w_teacher.shape != (x.shape[1],):
        raise ValueError(f"x must be (n, d) and w_teacher (d,); got {tuple(x.shape)} and {tuple(w_teacher.shape)}")
    x64 = x.double()
    proj = x64.t() @ torch.linalg.pinv(x64 @ x64.t()) @ x64
    w0 = torch.zeros_like(w_teacher) if w0 is None else w0
    eye = torch.eye(x.shape[1], dtype=torch.float64, device=x.device)
    return (proj @ w_teacher.double() + (eye - proj) @ w0.double()).to(w_teacher.dtype)


def sign_disagreement(w_student: Tensor, w_teacher: Tensor, x: Tensor) -> Tensor:
    r"""Empirical transfer risk: the fraction of rows of ``x`` (N, d) on which the two linear
    classifiers' signs differ, :math:`\frac1N \sum_j [\operatorname{sign}(w^\top x_j) \ne
    \operatorname{sign}(w_*^\top x_j)]` → scalar."""
    return ((x @ w_student > 0) != (x @ w_teacher > 0)).double().mean()


def gaussian_transfer_risk(w_student: Tensor, w_teacher: Tensor) -> Tensor:
    r"""Transfer risk for isotropic Gaussian inputs ``x ~ N(0, I)``: :math:`\angle(w, w_*) / \pi`
    (a random direction separates two half-spaces with the probability of their angle over π).
    Shapes: (d,), (d,) → scalar."""
    cos = torch.dot(w_student.double(), w_teacher.double()) / (w_student.double().norm() * w_teacher.double().norm())
    return torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi


def gaussian_angular_alignment(theta: float | Tensor, d: int) -> Tensor:
    r"""Data geometry of ``x ~ N(0, I_d)``: :math:`p(\theta) = P_x[\bar\alpha(x) \le \theta]`, the mass
    whose angle :math:`\bar\alpha` to the teacher's decision hyperplane is at most ``θ`` (radians,
    in [0, π/2]). With ``u = x/|x|`` uniform on the sphere, :math:`\sin\bar\alpha = |u_1|` and
    :math:`u_1^2 \sim \mathrm{Beta}(\tfrac12, \tfrac{d-1}{2})`, so
    :math:`p(\theta) = I_{\sin^2\theta}(\tfrac12, \tfrac{d-1}{2})` (regularised incomplete beta).
    Returns a float64 tensor shaped like ``theta``."""
    from scipy.special import betainc

    if d < 2:
        raise ValueError(f"d must be >= 2; got {d}")
    th = torch.as_tensor(theta, dtype=torch.float64)
    return torch.as_tensor(np.asarray(betainc(0.5, (d - 1) / 2.0, torch.sin(th).pow(2).numpy())),
                           dtype=torch.float64).reshape(th.shape)


def projection_risk_bound(p: Callable[[Tensor], Tensor], n: int, betas: Sequence[float] | Tensor | None = None) -> float:
    r"""The risk bound for the distilled linear student ``ŵ = P w*`` (``w0 = 0``) from ``n`` i.i.d. points:

    .. math:: \mathbb E\, R_n \le \min_{\beta \in [0, \pi/2]} \big[p(\beta) + p(\tfrac\pi2 - \beta)^n\big]

    Derivation (ours, from :func:`linear_distillation_limit`): if some training point lies within
    angle ``π/2 − β`` of ``±w*`` then ``∠(ŵ, w*) ≤ β`` (a projection on a span containing that
    point turns ``w*`` by at most its angle to it), and a test point is misclassified only if its
    angle to the decision hyperplane is below ``∠(ŵ, w*)``: risk ``≤ p(β)``. Otherwise (every
    point closer than ``π/2 − β`` to the hyperplane, probability ``p(π/2 − β)^n``) the risk is at
    most 1. ``p`` maps angles (float64 tensor) to :math:`p(\theta)`
    (e.g. :func:`gaussian_angular_alignment`); the minimum is over the grid ``betas``
    (default 2001 points of [0, π/2]).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0; got {n}")
    b = torch.linspace(0.0, math.pi / 2, 2001, dtype=torch.float64) if betas is None else \
        torch.as_tensor(betas, dtype=torch.float64)
    return float((p(b) + p(math.pi / 2 - b).pow(n)).min().clamp(max=1.0))
