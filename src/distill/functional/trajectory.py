"""Matching Training Trajectories (MTT): the normalised parameter-matching loss and the
differentiable unrolled SGD it is computed through.

Paper: G. Cazenavette, T. Wang, A. Torralba, A. A. Efros, J.-Y. Zhu, "Dataset Distillation by
Matching Training Trajectories", CVPR 2022, arXiv 2203.11932 (reference code:
github.com/GeorgeCazenavette/mtt-distillation).

An *expert* network trained on the real data leaves a trajectory of flattened parameters
``theta*_0, theta*_1, ..., theta*_E`` (one per epoch). A *student* starts at ``theta*_t``, takes
``N`` plain SGD steps on mini-batches of the synthetic set with a learnable step size ``alpha``,

.. math:: \\hat\\theta_{t+n+1} = \\hat\\theta_{t+n} - \\alpha \\nabla_\\theta \\ell(\\mathcal{A}(D_{syn}^{(n)});
          \\hat\\theta_{t+n}), \\qquad \\hat\\theta_t = \\theta^*_t,

and the synthetic images (and ``alpha``) are updated to bring the student's end point to the
expert's parameters ``M`` epochs later, relative to how far the expert itself moved:

.. math:: \\mathcal{L} = \\frac{\\lVert \\hat\\theta_{t+N} - \\theta^*_{t+M} \\rVert_2^2}
                              {\\lVert \\theta^*_t - \\theta^*_{t+M} \\rVert_2^2}.

The reference code divides numerator and denominator each by the number of parameters; the factor
cancels, so the value is the paper's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["trajectory_matching_loss", "unrolled_sgd"]


def trajectory_matching_loss(student_end: Tensor, expert_start: Tensor, expert_target: Tensor) -> Tensor:
    """MTT's normalised parameter distance (arXiv 2203.11932).

    .. math:: \\lVert \\hat\\theta_{t+N} - \\theta^*_{t+M} \\rVert_2^2 /
              \\lVert \\theta^*_t - \\theta^*_{t+M} \\rVert_2^2

    Args:
        student_end: the student's flattened parameters after its ``N`` synthetic steps ``(P,)``.
        expert_start: the expert's parameters at the start epoch ``t`` ``(P,)`` (the student's start).
        expert_target: the expert's parameters at epoch ``t + M`` ``(P,)``.

    Returns:
        A scalar; 1.0 for a student that did not move, 0.0 for one that lands on the target.
        Gradients flow into ``student_end`` only in practice (the expert's points are constants),
        but the function itself detaches nothing.

    Raises:
        ValueError: the three are not 1-D of one length, or the expert did not move
            (``expert_start == expert_target``: the normaliser is zero).
    """
    shapes = {tuple(t.shape) for t in (student_end, expert_start, expert_target)}
    if len(shapes) != 1 or student_end.dim() != 1:
        raise ValueError("trajectory_matching_loss expects three flattened parameter vectors (P,) of one "
                         f"length; got shapes {tuple(student_end.shape)}, {tuple(expert_start.shape)}, "
                         f"{tuple(expert_target.shape)}")
    denom = (expert_start - expert_target).pow(2).sum()
    if not bool(denom > 0):
        raise ValueError("trajectory_matching_loss: the expert's start and target parameters are identical "
                         "(||theta*_t - theta*_{t+M}||^2 = 0), so the loss is undefined; expected an expert "
                         "that moved between the two epochs")
    return (student_end - expert_target).pow(2).sum() / denom


def unrolled_sgd(
    step_loss: Callable[[Tensor, int], Tensor],
    theta0: Tensor,
    lr: Tensor | float,
    steps: int,
    create_graph: bool = True,
) -> Tensor:
    """``steps`` plain SGD steps on flattened parameters, kept differentiable (MTT's student).

    .. math:: \\theta_{n+1} = \\theta_n - \\alpha \\, \\nabla_\\theta \\,\\mathrm{step\\_loss}(\\theta_n, n),
              \\qquad n = 0, \\dots, N - 1

    Args:
        step_loss: ``(theta (P,), n) -> scalar``: the student's training loss at step ``n``
            (it draws the ``n``-th synthetic mini-batch, augments it and runs the model with
            ``torch.func.functional_call`` on ``theta``).
        theta0: the start ``(P,)``; treated as a constant (detached), as the expert's point is.
        lr: the step size ``alpha``: a float, or a scalar tensor that may require grad (learned).
        steps: ``N >= 1``.
        create_graph: keep the graph of every gradient so the end point can be differentiated
            with respect to the synthetic data and ``lr`` (second order); False for a plain run.

    Returns:
        ``theta_N`` ``(P,)``.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"unrolled_sgd: steps must be a positive int; got {steps!r}")
    if theta0.dim() != 1:
        raise ValueError(f"unrolled_sgd expects flattened parameters (P,); got shape {tuple(theta0.shape)}")
    theta = theta0.detach().requires_grad_(True)
    for n in range(steps):
        loss = step_loss(theta, n)
        if loss.dim() != 0:
            raise ValueError(f"unrolled_sgd: step_loss must return a scalar; got shape {tuple(loss.shape)}")
        (grad,) = torch.autograd.grad(loss, theta, create_graph=create_graph)
        theta = theta - lr * grad
        if not create_graph:
            theta = theta.detach().requires_grad_(True)
    return theta
