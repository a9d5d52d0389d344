"""Defensive distillation's training loss and the attacks that measure it (FGSM, PGD, a logit-margin attack).

* :func:`temperature_cross_entropy` -- the loss of both networks of defensive distillation
  (Papernot, McDaniel, Wu, Jha, Swami, "Distillation as a Defense to Adversarial Perturbations
  against Deep Neural Networks", IEEE S&P 2016, arXiv 1511.04508): cross-entropy of
  ``softmax(z / T)`` against hard labels (the initial network) or soft labels (the distilled one).
* :func:`fgsm` -- the fast gradient sign method (Goodfellow, Shlens, Szegedy, ICLR 2015, arXiv
  1412.6572): ``x' = clip(x + ε · sign(∇ₓ L(x, y)))``.
* :func:`pgd` -- projected gradient ascent in the L∞ ball (Madry et al., ICLR 2018, arXiv 1706.06083),
  on the softmax cross-entropy or on the logit margin.
* :func:`logit_margin` -- Carlini & Wagner's ``f6`` objective on logits, ``max(Z_y − max_{i≠y} Z_i, −κ)``
  ("Defensive Distillation is Not Robust to Adversarial Examples", 2016, arXiv 1607.04311; "Towards
  Evaluating the Robustness of Neural Networks", S&P 2017, arXiv 1608.04644). Its gradient does not
  pass through a softmax, so the saturation that defensive distillation causes cannot hide it.

The attacks take a model (any callable ``(B, ...) -> (B, K)`` logits) and run it in the mode it is in.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ATTACK_LOSSES", "attack_loss", "attack_success_rate", "fgsm", "logit_margin", "pgd",
           "temperature_cross_entropy"]

ATTACK_LOSSES = ("ce", "margin")
"""What an attack ascends: ``"ce"``, softmax cross-entropy of the logits (at temperature 1, the deployed
network's); ``"margin"``, minus the C&W logit margin (:func:`logit_margin`)."""


def temperature_cross_entropy(logits: Tensor, target: Tensor, T: float) -> Tensor:
    r"""Cross-entropy of the temperature softmax, mean over the batch:

    .. math:: L = -\frac{1}{B}\sum_b \sum_k y_{b,k} \log \operatorname{softmax}(z_b / T)_k

    ``logits`` ``(B, K)``; ``target`` integer labels ``(B,)`` (one-hot ``y``) or probabilities ``(B, K)``
    (the distilled network's soft labels, ``softmax(z_teacher / T)``). Defensive distillation trains
    both networks with it at the same ``T`` and deploys them at ``T = 1`` (the logits unscaled). There is
    no ``T²`` factor: the paper's loss is this cross-entropy as it is (the network compensates the
    1/T in its gradient by growing its logits, which is the defence's mechanism).
    """
    if not T > 0 or T == float("inf"):
        raise ValueError(f"temperature T must be a finite number > 0, got {T}")
    log_q = F.log_softmax(logits.float() / T, dim=1)
    if target.dtype in (torch.long, torch.int32, torch.int64):
        if target.shape != logits.shape[:1]:
            raise ValueError(f"integer targets must be (B,) = {tuple(logits.shape[:1])}, got {tuple(target.shape)}")
        return F.nll_loss(log_q, target)
    if target.shape != logits.shape:
        raise ValueError(f"soft targets must be (B, K) = {tuple(logits.shape)}, got {tuple(target.shape)}")
    return -(target.float() * log_q).sum(1).mean()


def logit_margin(logits: Tensor, y: Tensor, kappa: float = 0.0) -> Tensor:
    r"""Carlini & Wagner's untargeted ``f6`` per sample: :math:`\max(Z_y - \max_{i \ne y} Z_i, -\kappa)`.

    ``logits`` ``(B, K)``, ``y`` ``(B,)`` → ``(B,)``. Negative once the sample is misclassified; the
    attack minimises it (``κ ≥ 0`` asks for a confidence margin beyond the decision boundary).
    """
    if kappa < 0:
        raise ValueError(f"kappa must be >= 0, got {kappa}")
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return torch.clamp(true - others, min=-kappa)


def attack_loss(logits: Tensor, y: Tensor, loss: str, kappa: float = 0.0) -> Tensor:
    """The summed objective an attack ascends (summed, so that each sample's gradient is its own):
    ``"ce"``, Σ_b CE(softmax(z_b), y_b); ``"margin"``, −Σ_b f6(z_b)."""
    if loss == "ce":
        return F.cross_entropy(logits.float(), y, reduction="sum")
    if loss == "margin":
        return -logit_margin(logits.float(), y, kappa).sum()
    raise ValueError(f"loss must be one of {ATTACK_LOSSES}, got {loss!r}")


def _check_ball(eps: float, clamp: tuple[float, float] | None) -> None:
    if not eps > 0:
        raise ValueError(f"eps (the L-infinity radius) must be > 0, got {eps}")
    if clamp is not None and not clamp[0] < clamp[1]:
        raise ValueError(f"clamp must be (low, high) with low < high, got {clamp}")


def _input_grad(model: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, loss: str, kappa: float) -> Tensor:
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(attack_loss(model(x), y, loss, kappa), x)
    return grad


def fgsm(model: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, eps: float, *, loss: str = "ce",
         kappa: float = 0.0, clamp: tuple[float, float] | None = (0.0, 1.0)) -> Tensor:
    r"""One signed-gradient step: :math:`x' = \operatorname{clip}(x + \varepsilon\,\operatorname{sign}(\nabla_x L))`.

    ``x`` ``(B, ...)``, ``y`` ``(B,)`` → ``x'`` like ``x``. Where the gradient is exactly zero (a
    saturated softmax: defensive distillation's gradient masking) ``sign`` is 0 and the input is not moved.
    """
    _check_ball(eps, clamp)
    x_adv = x.detach() + eps * _input_grad(model, x, y, loss, kappa).sign()
    return x_adv.clamp(*clamp) if clamp is not None else x_adv


def pgd(model: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, eps: float, *, step: float | None = None,
        steps: int = 10, loss: str = "ce", kappa: float = 0.0, random_start: bool = False,
        clamp: tuple[float, float] | None = (0.0, 1.0), generator: torch.Generator | None = None) -> Tensor:
    r"""L∞ projected gradient ascent: ``steps`` times :math:`x \leftarrow \Pi_{\|x - x_0\|_\infty \le \varepsilon}
    (x + \alpha\,\operatorname{sign}(\nabla_x L))`, then clipped to ``clamp``.

    ``x`` ``(B, ...)``, ``y`` ``(B,)``; ``step`` α defaults to ``2.5 ε / steps`` (Madry et al.'s rule);
    ``random_start`` begins at a uniform point of the ball. ``loss="margin"`` is the C&W-style attack on
    logits that defensive distillation does not stop.
    """
    _check_ball(eps, clamp)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    alpha = 2.5 * eps / steps if step is None else step
    if not alpha > 0:
        raise ValueError(f"step must be > 0, got {step}")
    x0 = x.detach()
    x_adv = x0.clone()
    if random_start:
        noise = torch.rand(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        x_adv = x0 + (2 * noise - 1) * eps
    for _ in range(steps):
        x_adv = x_adv + alpha * _input_grad(model, x_adv, y, loss, kappa).sign()
        x_adv = torch.max(torch.min(x_adv, x0 + eps), x0 - eps)
        if clamp is not None:
            x_adv = x_adv.clamp(*clamp)
    return x_adv.detach()


@torch.no_grad()
def attack_success_rate(model: Callable[[Tensor], Tensor], x: Tensor, x_adv: Tensor, y: Tensor) -> float:
    """Of the samples ``model`` classifies correctly on ``x`` ``(B, ...)``, the fraction (%) misclassified on
    ``x_adv``; ``nan`` when none is correct."""
    correct = model(x).argmax(1) == y
    if not bool(correct.any()):
        return float("nan")
    fooled = (model(x_adv).argmax(1) != y) & correct
    return 100.0 * float(fooled.sum()) / float(correct.sum())
