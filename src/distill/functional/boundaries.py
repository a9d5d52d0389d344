"""Losses on pre-ReLU features that care about activation boundaries: AB and OFD.

Both papers are by Heo et al. and distil the *pre-activation* of a ReLU, where the sign says
whether a neuron fires:

* AB (Heo, Lee, Yun, Choi, "Knowledge Transfer via Distillation of Activation Boundaries Formed
  by Hidden Neurons", AAAI 2019, arXiv 1811.03233): a hinge-squared loss that only asks the
  student's (connected) pre-activation to lie on the teacher's side of zero, by a margin μ.
* OFD (Heo, Kim, Yun, Park, Kwak, Choi, "A Comprehensive Overhaul of Feature Distillation",
  ICCV 2019, arXiv 1904.01866): the teacher's pre-activation through a margin ReLU, compared with
  a partial L2 distance that ignores negative responses the student already pushes far enough.

Shapes: features ``(B, C, H, W)`` (any ``(B, C, ...)`` works), student already mapped to the
teacher's shape by the connector; margins ``(C,)``. Callers pass detached teacher tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ab_alternative_loss",
    "ab_loss",
    "activation_agreement",
    "ofd_margin",
    "margin_relu",
    "ofd_partial_l2",
    "ofd_loss",
]


def _check_same(student: Tensor, teacher: Tensor, what: str) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"{what}: shapes differ: student (connected) {tuple(student.shape)} vs teacher {tuple(teacher.shape)}"
        )
    if student.dim() < 2:
        raise ValueError(f"{what}: expected (B, C, ...) features, got shape {tuple(student.shape)}")


def _layer_weights(n: int, layer_weights: Sequence[float] | None) -> list[float]:
    if layer_weights is None:
        return [1.0] * n
    weights = [float(w) for w in layer_weights]
    if len(weights) != n:
        raise ValueError(f"layer_weights has {len(weights)} entries for {n} feature pairs")
    return weights


# --------------------------------------------------------------------------------------------
# AB: activation boundaries
# --------------------------------------------------------------------------------------------


def ab_alternative_loss(student: Tensor, teacher: Tensor, margin: float = 1.0) -> Tensor:
    r"""AB's alternative (piecewise-differentiable) activation transfer loss for one layer pair.

    .. math::
        L = \frac{1}{B} \sum_b \big\lVert \rho(T_b) \odot \sigma(\mu\mathbf 1 - r(S_b))
            + (1 - \rho(T_b)) \odot \sigma(\mu\mathbf 1 + r(S_b)) \big\rVert_2^2,
        \qquad \rho(x) = \mathbb 1[x > 0],\; \sigma = \mathrm{ReLU}

    ``student`` = r(S), the student's pre-ReLU feature through the connector; ``teacher`` = T,
    the teacher's pre-ReLU feature; both ``(B, C, H, W)`` of the same shape → scalar. Squared L2
    over every neuron (C·H·W) of a sample, mean over the batch (the paper's loss is per image,
    its objective the expectation over images). Where the teacher neuron is active the student
    is pushed above +μ, where inactive below −μ; beyond the margin the loss is 0.

    Paper: Heo, Lee, Yun, Choi, AAAI 2019, arXiv 1811.03233 (μ = 1). The authors' code
    (bhheo/AB_distillation, RepDistiller ``ABLoss``) computes the same per-layer sum divided by
    the batch size, then weights the layers 1/4, 1/2, 1 (shallow → deep) and multiplies the sum by
    3/1000; see :func:`ab_loss` and the ``ab`` method's ``layer_weights`` / ``weight``.
    """
    _check_same(student, teacher, "AB loss")
    active = teacher > 0
    hinge = torch.where(active, F.relu(margin - student), F.relu(margin + student))
    return hinge.pow(2).flatten(1).sum(dim=1).mean()


def ab_loss(
    students: Sequence[Tensor],
    teachers: Sequence[Tensor],
    margin: float = 1.0,
    layer_weights: Sequence[float] | None = None,
) -> Tensor:
    r"""AB over several layer pairs: :math:`\sum_j w_j L_{AB}(r_j(S_j), T_j)`.

    ``w_j`` = ``layer_weights`` (default all 1: the paper sums the positions' losses). The
    authors' CIFAR code uses ``w = (1/4, 1/2, 1)`` for three positions and an overall 3/1000.
    """
    if len(students) != len(teachers) or not students:
        raise ValueError(f"need as many student as teacher features (>= 1), got {len(students)} and {len(teachers)}")
    weights = _layer_weights(len(students), layer_weights)
    total = students[0].new_zeros(())
    for w, s, t in zip(weights, students, teachers):
        total = total + w * ab_alternative_loss(s, t, margin)
    return total


def activation_agreement(student: Tensor, teacher: Tensor) -> Tensor:
    r"""Fraction of neurons whose activation state agrees: :math:`1 - \frac{1}{N}\lVert\rho(S) - \rho(T)\rVert_1`.

    The complement of AB's (non-differentiable) activation transfer loss, normalised by the
    number of neurons N = B·C·H·W; a monitoring metric (the authors log it per layer), no gradient.
    """
    _check_same(student, teacher, "activation agreement")
    return ((student > 0) == (teacher > 0)).float().mean()


# --------------------------------------------------------------------------------------------
# OFD: margin ReLU and partial L2
# --------------------------------------------------------------------------------------------


def ofd_margin(bn_weight: Tensor, bn_bias: Tensor) -> Tensor:
    r"""Per-channel margin of OFD's margin ReLU from the teacher's BatchNorm affine parameters.

    The pre-ReLU response of channel c is modelled as :math:`x \sim \mathcal N(\beta_c, \gamma_c^2)`
    (the BN output's mean and standard deviation); the margin is the mean of its negative part:

    .. math::
        m_c = \mathbb E[x \mid x < 0] = \beta_c - s_c \frac{\phi(\beta_c / s_c)}{\Phi(-\beta_c / s_c)},
        \qquad s_c = |\gamma_c|

    with φ, Φ the standard normal pdf and cdf. Computed in float64 through the scaled
    complementary error function, :math:`\phi(a)/\Phi(-a) = \sqrt{2/\pi}\,/\,\mathrm{erfcx}(a/\sqrt2)`,
    so it stays exact when :math:`\Phi(-\beta/s)` underflows (then :math:`m_c \to 0^-`); a channel
    with :math:`\gamma_c = 0` is the constant β: :math:`m_c = \min(\beta_c, 0)`. Always
    :math:`m_c < 0` for :math:`\gamma_c \ne 0`. Shapes ``(C,), (C,) → (C,)``, in ``bn_weight``'s dtype.

    Paper: Heo et al., "A Comprehensive Overhaul of Feature Distillation", ICCV 2019,
    arXiv 1904.01866 (Sec. 3.2). The authors' code (clovaai/overhaul-distillation,
    ``get_margin_from_BN``) uses the same formula but replaces it with ``-3|γ|`` wherever
    :math:`\Phi(-\beta/s) \le 0.001`; we keep the exact value there (close to 0, not −3|γ|).
    """
    if bn_weight.shape != bn_bias.shape or bn_weight.dim() != 1:
        raise ValueError(
            f"ofd_margin needs (C,) BN weight and bias, got {tuple(bn_weight.shape)} and {tuple(bn_bias.shape)}"
        )
    out_dtype = bn_weight.dtype if bn_weight.is_floating_point() else torch.get_default_dtype()
    s = bn_weight.detach().double().abs()
    beta = bn_bias.detach().double()
    degenerate = s == 0
    safe_s = torch.where(degenerate, torch.ones_like(s), s)
    a = beta / safe_s
    mills = math.sqrt(2.0 / math.pi) / torch.special.erfcx(a / math.sqrt(2.0))  # φ(a) / Φ(-a)
    margin = beta - safe_s * mills
    margin = torch.where(degenerate, beta.clamp(max=0.0), margin)
    return margin.to(out_dtype)


def margin_relu(teacher: Tensor, margin: Tensor) -> Tensor:
    r"""OFD's teacher transform :math:`\sigma_m(x) = \max(x, m)`, ``m`` per channel.

    ``teacher`` (B, C, ...), ``margin`` (C,) → same shape as ``teacher``.
    """
    if margin.dim() != 1 or teacher.dim() < 2 or margin.shape[0] != teacher.shape[1]:
        raise ValueError(
            f"margin_relu needs a (C,) margin for (B, C, ...) features, got {tuple(margin.shape)} "
            f"and {tuple(teacher.shape)}"
        )
    m = margin.to(device=teacher.device, dtype=teacher.dtype).view(1, -1, *([1] * (teacher.dim() - 2)))
    return torch.maximum(teacher, m)


def ofd_partial_l2(student: Tensor, target: Tensor) -> Tensor:
    r"""OFD's partial L2 distance, summed per sample, mean over the batch.

    .. math::
        d_p(T, S) = \sum_i \begin{cases} 0 & \text{if } S_i \le T_i \le 0 \\
                                         (T_i - S_i)^2 & \text{otherwise} \end{cases},
        \qquad L = \frac{1}{B}\sum_b d_p(T_b, S_b)

    ``student`` = r(S) (connected), ``target`` = T (the teacher after the margin ReLU); same shape
    (B, C, ...) → scalar. Where the target is non-positive (the teacher neuron is off) a student
    response at or below it is already fine and is not pulled up.
    """
    _check_same(student, target, "OFD partial L2")
    skip = (student <= target) & (target <= 0)
    sq = (target - student).pow(2)
    return torch.where(skip, torch.zeros_like(sq), sq).flatten(1).sum(dim=1).mean()


def ofd_loss(
    students: Sequence[Tensor],
    teachers: Sequence[Tensor],
    margins: Sequence[Tensor],
    layer_weights: Sequence[float] | None = None,
) -> Tensor:
    r"""OFD over several positions: :math:`L_{distill} = \sum_j w_j\, \frac1B \sum_b d_p(\sigma_{m_j}(T_j), r_j(S_j))`.

    ``students`` r_j(S_j) and ``teachers`` T_j (raw pre-ReLU features, (B, C, H, W)), ``margins``
    (C_j,) from :func:`ofd_margin`. ``w_j`` = ``layer_weights`` (default 1). The paper trains with
    :math:`L_{task} + \alpha L_{distill}`, α = 10⁻³ on CIFAR (10⁻⁴ on ImageNet): the ``ofd``
    method's default ``weight``. The authors' code also divides position j of n by
    :math:`2^{n-1-j}` (``layer_weights=(1/4, 1/2, 1)`` for three positions).
    """
    if not (len(students) == len(teachers) == len(margins)) or not students:
        raise ValueError(
            f"need one margin per (student, teacher) pair (>= 1), got {len(students)}, {len(teachers)}, {len(margins)}"
        )
    weights = _layer_weights(len(students), layer_weights)
    total = students[0].new_zeros(())
    for w, s, t, m in zip(weights, students, teachers, margins):
        total = total + w * ofd_partial_l2(s, margin_relu(t, m))
    return total
