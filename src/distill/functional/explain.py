"""The math of distilling a network into an explanation: B-spline shape functions fitted by ridge least
squares, and the fidelity of a student to its teacher.

Used by :mod:`distill.strategies.explain_additive` (Tan, Caruana, Hooker, Koch, Gordo, "Learning Global
Additive Explanations for Neural Nets Using Model Distillation", 2018, arXiv 1801.08640) and
:mod:`distill.strategies.explain_yasenn`.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["bspline_basis", "clamped_knots", "fidelity", "ridge_fit"]


def clamped_knots(x: Tensor, interior: int, degree: int = 3) -> Tensor:
    """Knots of a clamped B-spline on the values ``x`` ``(N,)``: ``degree + 1`` copies of ``min(x)`` and of
    ``max(x)`` around ``interior`` knots at the quantiles ``1/(interior+1), ..., interior/(interior+1)`` →
    ``(interior + 2·degree + 2,)``. A constant feature gets the span ``[min, min + 1]``."""
    if interior < 0 or degree < 0:
        raise ValueError(f"interior and degree must be >= 0, got interior={interior}, degree={degree}")
    x = x.double()
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        hi = lo + 1.0
    inner = torch.quantile(x, torch.linspace(0, 1, interior + 2, dtype=torch.float64)[1:-1]) if interior else x[:0]
    return torch.cat([torch.full((degree + 1,), lo, dtype=torch.float64), inner,
                      torch.full((degree + 1,), hi, dtype=torch.float64)])


def bspline_basis(x: Tensor, knots: Tensor, degree: int = 3) -> Tensor:
    r"""The B-spline basis of ``degree`` on ``knots`` ``(M,)`` at ``x`` ``(N,)`` → ``(N, M − degree − 1)``.

    Cox–de Boor recursion: :math:`B_{i,0}(x) = [t_i \le x < t_{i+1}]` and
    :math:`B_{i,p}(x) = \frac{x - t_i}{t_{i+p} - t_i} B_{i,p-1}(x) + \frac{t_{i+p+1} - x}{t_{i+p+1} - t_{i+1}}
    B_{i+1,p-1}(x)` (a term with a zero denominator is 0). ``x`` is clamped to ``[t_0, t_{M-1}]`` and the
    last non-empty interval is closed on the right, so with clamped knots the basis sums to 1 everywhere.
    """
    t = knots.double()
    if t.dim() != 1 or t.numel() < degree + 2 or bool((t[1:] < t[:-1]).any()):
        raise ValueError(f"knots must be a non-decreasing (M,) tensor with M >= degree + 2 = {degree + 2}; "
                         f"got shape {tuple(t.shape)}")
    x = x.double().clamp(float(t[0]), float(t[-1]))[:, None]
    left, right = t[:-1], t[1:]
    basis = ((x >= left) & (x < right)).double()
    last = int(torch.nonzero(right > left).max())  # the last interval of positive length
    basis[:, last] = torch.where(x[:, 0] == t[-1], 1.0, basis[:, last])
    for p in range(1, degree + 1):
        n = basis.shape[1] - 1
        d1 = t[p:p + n] - t[:n]
        d2 = t[p + 1:p + 1 + n] - t[1:1 + n]
        w1 = torch.where(d1 > 0, (x - t[:n]) / torch.where(d1 > 0, d1, 1.0), torch.zeros(()).double())
        w2 = torch.where(d2 > 0, (t[p + 1:p + 1 + n] - x) / torch.where(d2 > 0, d2, 1.0), torch.zeros(()).double())
        basis = w1 * basis[:, :n] + w2 * basis[:, 1:n + 1]
    return basis


def ridge_fit(design: Tensor, targets: Tensor, ridge: float) -> Tensor:
    r"""Ridge least squares :math:`\hat\beta = (A^\top A + \lambda I)^{-1} A^\top Y` for ``design`` A ``(N, P)``
    and ``targets`` Y ``(N, K)`` → ``(P, K)`` (float64; ``λ = 0`` is plain least squares, then solved by
    ``lstsq`` so that a rank-deficient design still gets the minimum-norm solution)."""
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    a, y = design.double(), targets.double()
    if ridge == 0:
        return torch.linalg.lstsq(a, y, driver="gelsd").solution
    return torch.linalg.solve(a.T @ a + ridge * torch.eye(a.shape[1], dtype=a.dtype), a.T @ y)


def fidelity(student: Tensor, teacher: Tensor) -> dict[str, float]:
    r"""How closely ``student`` ``(N, K)`` reproduces ``teacher`` ``(N, K)`` (or ``(N,)``): ``rmse``
    :math:`\sqrt{\frac{1}{NK}\sum (s - t)^2}` and ``r2`` :math:`1 - \sum (s - t)^2 / \sum (t - \bar t_k)^2`
    (the column means :math:`\bar t_k`)."""
    if student.shape != teacher.shape:
        raise ValueError(f"student and teacher outputs must have one shape; got {tuple(student.shape)} and "
                         f"{tuple(teacher.shape)}")
    s, t = student.double(), teacher.double()
    sse = float(((s - t) ** 2).sum())
    sst = float(((t - t.mean(0)) ** 2).sum())
    return {"rmse": (sse / t.numel()) ** 0.5, "r2": 1.0 - sse / sst if sst > 0 else float("nan")}
