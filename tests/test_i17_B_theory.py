"""Issue 17 (B): Phuong & Lampert's linear distillation result, checked on a toy.

The student is trained here by plain full-batch gradient descent (a loop in this file) and,
once, through ``distill.fit`` with the registered method; the closed forms are computed with
numpy, the risks by Monte Carlo.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import distill
from distill import functional as DF
from distill.data.loader import InMemoryLoader

torch.set_num_threads(1)


def _projection_np(x: np.ndarray) -> np.ndarray:
    """Projection on the row space of x (n, d) by an orthonormal basis (QR), independent of the library's pinv."""
    q, _ = np.linalg.qr(x.T)  # (d, n): columns span the rows of x
    return q @ q.T


def _gd(x: torch.Tensor, w_t: torch.Tensor, w0: torch.Tensor, steps: int, lr: float) -> torch.Tensor:
    """Full-batch gradient descent on -(1/n) sum [t log sig(wx) + (1 - t) log(1 - sig(wx))], t = sig(w*x),
    with its gradient written out: (1/n) X^T (sig(Xw) - sig(Xw*))."""
    w, t = w0.clone(), torch.sigmoid(x @ w_t)
    for _ in range(steps):
        w -= lr * x.t() @ (torch.sigmoid(x @ w) - t) / x.shape[0]
    return w


def test_binary_soft_cross_entropy_by_hand():
    s, t = torch.tensor([0.3, -1.2, 2.0]), torch.tensor([1.0, 0.5, -0.7])
    want = 0.0
    for a, b in zip(s.tolist(), t.tolist()):
        p, q = 1 / (1 + math.exp(-b)), 1 / (1 + math.exp(-a))
        want -= p * math.log(q) + (1 - p) * math.log(1 - q)
    assert float(DF.binary_soft_cross_entropy(s, t.unsqueeze(1))) == pytest.approx(want / 3, rel=1e-6)
    m = distill.methods.create_method("linear_soft_ce", weight=0.5)
    assert float(m({"logits": s.unsqueeze(1)}, {"logits": t.unsqueeze(1)}, None)) == pytest.approx(want / 3, rel=1e-6)


@pytest.mark.parametrize("n", [3, 7])
def test_gradient_descent_ends_at_the_projection_plus_the_untouched_initial_component(n):
    """n < d = 10: w -> P w* + (I - P) w0 from a random w0 (the paper's optimisation bias)."""
    g = torch.Generator().manual_seed(n)
    d = 10
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w_t, w0 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    trained = _gd(x, w_t, w0, steps=20000, lr=2.0)
    p = torch.from_numpy(_projection_np(x.numpy()))
    want = p @ w_t + (torch.eye(d, dtype=torch.float64) - p) @ w0
    torch.testing.assert_close(trained, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(DF.linear_distillation_limit(x, w_t, w0), want, atol=1e-10, rtol=0)
    assert (want - w_t).norm() > 0.1  # n < d: the student is not the teacher


def test_enough_data_recovers_the_teacher():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 4, generator=g, dtype=torch.float64)
    w_t = torch.randn(4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(DF.linear_distillation_limit(x, w_t, torch.randn(4, generator=g, dtype=torch.float64)),
                               w_t)


def test_deep_linear_student_matches_the_projection_on_the_span():
    """A 2-layer linear student w = W2 W1 trained by gradient descent: its end-to-end weight's component in the
    span of the data is P w*; from a small initialisation the orthogonal component stays small."""
    g = torch.Generator().manual_seed(5)
    n, d, h = 4, 8, 6
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w_t = torch.randn(d, generator=g, dtype=torch.float64)
    w1 = (1e-3 * torch.randn(h, d, generator=g, dtype=torch.float64)).requires_grad_(True)
    w2 = (1e-3 * torch.randn(1, h, generator=g, dtype=torch.float64)).requires_grad_(True)
    opt = torch.optim.SGD([w1, w2], lr=0.8)
    for _ in range(4000):
        opt.zero_grad()
        DF.binary_soft_cross_entropy(x @ (w2 @ w1).reshape(-1), x @ w_t).backward()
        opt.step()
    w = (w2 @ w1).reshape(-1).detach()
    p = torch.from_numpy(_projection_np(x.numpy()))
    torch.testing.assert_close(p @ w, p @ w_t, atol=1e-4, rtol=0)
    assert float(((torch.eye(d, dtype=torch.float64) - p) @ w).norm()) < 5e-3 * float(w.norm())


def test_the_registered_method_under_distill_fit_reaches_the_closed_form():
    """The method through the library's own loop (SGD with momentum, minibatches of 4, no weight decay): the
    limit does not depend on the optimiser as every update lies in the span of the inputs."""
    g = torch.Generator().manual_seed(2)
    n, d = 8, 12
    x = torch.randn(n, d, generator=g)
    w_t = torch.randn(d, generator=g)
    teacher, student = nn.Linear(d, 1, bias=False), nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        teacher.weight.copy_(w_t.unsqueeze(0))
    w0 = student.weight.detach().clone().reshape(-1)
    loader = InMemoryLoader(x, torch.zeros(n, dtype=torch.long), 4, shuffle=True, seed=0)
    d_ = distill.Distiller(student, teacher, {"pl": distill.methods.create_method("linear_soft_ce")})
    distill.fit(d_, loader, None, epochs=400, lr=0.5, momentum=0.9, weight_decay=0.0, schedule="constant",
                progress=False)
    want = DF.linear_distillation_limit(x.double(), w_t.double(), w0.double()).float()
    torch.testing.assert_close(student.weight.detach().reshape(-1), want, atol=2e-3, rtol=0)


def test_transfer_risk_and_angular_alignment_against_monte_carlo():
    g = torch.Generator().manual_seed(7)
    d = 6
    w_t, w = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    z = torch.randn(200_000, d, generator=g, dtype=torch.float64)
    assert float(DF.gaussian_transfer_risk(w, w_t)) == pytest.approx(float(DF.sign_disagreement(w, w_t, z)), abs=4e-3)
    # p(theta): the share of x whose angle to the hyperplane w*^T x = 0 is at most theta
    angle = torch.arcsin((z @ w_t).abs() / (z.norm(dim=1) * w_t.norm()))
    for theta in (0.1, 0.4, 1.0):
        mc = float((angle <= theta).double().mean())
        assert float(DF.gaussian_angular_alignment(theta, d)) == pytest.approx(mc, abs=4e-3)


def _polarised(m: int, u: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """x = 8 xi u + z, xi ~ N(0, 1), z ~ N(0, I - u u^T): most points lie far from the hyperplane u^T x = 0."""
    z = torch.randn(m, u.numel(), generator=g, dtype=torch.float64)
    z = z - (z @ u).unsqueeze(1) * u
    return 8 * torch.randn(m, 1, generator=g, dtype=torch.float64) * u + z


def test_the_bound_holds_and_the_risk_falls_with_n():
    """Mean transfer risk of the projected student over 300 training sets of n points (d = 8), for a data geometry
    with most mass far from the boundary: below min_beta p(beta) + p(pi/2 - beta)^n with p measured by Monte Carlo,
    the bound informative (< 1), and the risk decreasing in n (the paper's strong monotonicity)."""
    g = torch.Generator().manual_seed(11)
    d = 8
    u = torch.randn(d, generator=g, dtype=torch.float64)
    u = u / u.norm()
    pool = _polarised(100_000, u, g)
    angles = torch.arcsin((pool @ u).abs() / pool.norm(dim=1)).sort().values

    def p(theta: torch.Tensor) -> torch.Tensor:
        return torch.searchsorted(angles, theta.reshape(-1), right=True).double().reshape(theta.shape) / len(angles)

    test = _polarised(20_000, u, g)
    risks = []
    for n in (1, 2, 4):
        r = [float(DF.sign_disagreement(DF.linear_distillation_limit(_polarised(n, u, g), u), u, test))
             for _ in range(300)]
        risks.append(float(np.mean(r)))
        bound = DF.projection_risk_bound(p, n)
        assert risks[-1] <= bound and (n == 1 or bound < 1.0)  # one point: the bound is 1
    assert risks[0] > risks[1] > risks[2] > 0


def test_the_bound_in_closed_form_for_uniform_angles():
    """p(theta) = 2 theta / pi (x uniform on the circle, d = 2): with u = 2 beta / pi the bound is min_u u + (1 - u)^n,
    at 1 - u = n^(-1/(n-1)): for n = 3, 1 - 1/sqrt(3) + 1/(3 sqrt(3))."""
    bound = DF.projection_risk_bound(lambda b: 2 * b / math.pi, 3, betas=torch.linspace(0, math.pi / 2, 200_001))
    assert bound == pytest.approx(1 - 1 / math.sqrt(3) + 1 / (3 * math.sqrt(3)), abs=1e-8)
    assert DF.gaussian_angular_alignment(0.3, 2).item() == pytest.approx(0.6 / math.pi, rel=1e-9)  # d = 2: uniform
