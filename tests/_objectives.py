"""Objectives written out from the papers' formulas, independently of distill.functional, and the
spies that let a test see what each participant of a strategy minimises on one fixed batch."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
import torch


def log_softmax(z: torch.Tensor, T: float = 1.0, dim: int = 1) -> torch.Tensor:
    z = z.double() / T
    return z - z.exp().sum(dim, keepdim=True).log()


def kd(s: torch.Tensor, t: torch.Tensor, T: float) -> torch.Tensor:
    """Hinton et al.: T^2 * mean_b sum_k p_t (log p_t - log p_s) at temperature T; t is a target."""
    lt, ls = log_softmax(t.detach(), T), log_softmax(s, T)
    return T * T * (lt.exp() * (lt - ls)).sum(1).mean()


def ce(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -log_softmax(z)[torch.arange(len(y)), y].mean()


def same_objective(loss: torch.Tensor, want: torch.Tensor, params: Iterable[torch.nn.Parameter],
                   rel: float = 1e-5) -> None:
    """``loss`` equals ``want`` in value and in its gradient with respect to ``params``."""
    params = [p for p in params if p.requires_grad]
    value, expected = float(loss.detach()), float(want.detach())
    assert value == pytest.approx(expected, rel=rel, abs=1e-8), (value, expected)
    got = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    exp = torch.autograd.grad(want, params, retain_graph=True, allow_unused=True)
    for p, a, b in zip(params, got, exp):
        a = torch.zeros_like(p) if a is None else a
        b = torch.zeros_like(p) if b is None else b.to(p.dtype)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
