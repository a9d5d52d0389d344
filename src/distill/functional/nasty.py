"""The nasty teacher's training loss (self-undermining knowledge distillation).

Paper: H. Ma, T. Chen, T.-K. Hu, C. You, X. Xie, Z. Wang, "Undistillable: Making A Nasty Teacher That
CANNOT Teach Students", ICLR 2021, arXiv 2105.07381.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from distill.functional.core import kd_loss

__all__ = ["nasty_teacher_loss"]


def nasty_teacher_loss(nasty_logits: Tensor, adversarial_logits: Tensor, targets: Tensor, tau: float = 4.0,
                       omega: float = 0.04) -> Tensor:
    r"""Self-undermining KD: cross-entropy on the labels minus the temperature-scaled KL to a normal network.

    .. math::
        L = \mathrm{CE}(\operatorname{softmax}(z_n), y)
            - \omega\,\tau^2\,\frac{1}{B}\sum_b \mathrm{KL}\big(\operatorname{softmax}(z_{n,b}/\tau)
              \,\|\, \operatorname{softmax}(z_{a,b}/\tau)\big)

    ``nasty_logits`` :math:`z_n` ``(B, K)`` (trained), ``adversarial_logits`` :math:`z_a` ``(B, K)`` of the
    pre-trained normal network (treated as constants), ``targets`` ``(B,)`` → scalar. The KL's direction
    is the authors' code's (``KLDivLoss(log_softmax(z_a/τ), softmax(z_n/τ))`` = KL(p_n ‖ p_a)); the paper
    writes it with the nasty teacher first as well. The authors' code adds a constant 100 to keep the
    printed loss positive; a constant changes no gradient and is left out here.

    Defaults: ``τ = 4``, ``ω = 0.04`` are the authors' CIFAR-10 settings (``experiments/CIFAR10/
    kd_nasty_resnet18/nasty_resnet18/params.json``; CIFAR-100 and Tiny-ImageNet use ``τ = 20``,
    ``ω = 0.005`` for ResNet-18); only the abstract of the paper could be read here.
    """
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if not omega >= 0:
        raise ValueError(f"omega must be >= 0, got {omega}")
    if nasty_logits.shape != adversarial_logits.shape:
        raise ValueError(f"nasty and adversarial logits must have one shape (B, K); got {tuple(nasty_logits.shape)} "
                         f"and {tuple(adversarial_logits.shape)}")
    ce = F.cross_entropy(nasty_logits.float(), targets)
    # kd_loss(s, t, τ) = τ² KL(softmax(t/τ) ‖ softmax(s/τ)): the nasty logits take the first place of the KL
    return ce - omega * kd_loss(adversarial_logits.detach(), nasty_logits, tau)
