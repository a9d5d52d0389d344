"""Losses that mix: MixSKD's mixup self-distillation and knowledge flow's mixing of teacher features.

* MixSKD (Yang et al., ECCV 2022, arXiv 2208.05768): a pair of images and their mixup
  :math:`\\tilde x = \\lambda x_i + (1 - \\lambda) x_j`; the network's feature maps and logits on
  :math:`\\tilde x` and the same interpolation of its feature maps and logits on :math:`x_i, x_j`
  distil into each other (:func:`mixup`, :func:`mixup_cross_entropy`, :func:`mixskd_parts`,
  :func:`mixskd_discriminator_loss`).
* Knowledge flow (Liu, Peng, Schwing, ICLR 2019, arXiv 1904.05878): at chosen layers the
  student's output is a convex combination of its own output and the transformed outputs of
  several teachers, with trainable normalised weights that a dependency loss drives towards the
  student alone (:func:`flow_weights`, :func:`flow_mix`, :func:`flow_dependency_loss`,
  :func:`flow_dependency_factor`).

Shapes: logits ``(B, K)``, labels ``(B,)``, feature maps ``(B, C, H, W)`` or vectors ``(B, D)``,
a pairing permutation ``perm`` ``(B,)`` (sample b is mixed with sample ``perm[b]``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.functional.core import kd_loss

__all__ = [
    "flow_dependency_factor",
    "flow_dependency_loss",
    "flow_mix",
    "flow_weights",
    "mixskd_discriminator_loss",
    "mixskd_parts",
    "mixup",
    "mixup_cross_entropy",
]


# --------------------------------------------------------------------------------------------
# Mixup and MixSKD
# --------------------------------------------------------------------------------------------


def _check_pairing(n: int, lam: float, perm: Tensor) -> None:
    if not (isinstance(lam, (int, float)) and not isinstance(lam, bool) and 0.0 <= lam <= 1.0):
        raise ValueError(f"the mixing coefficient lam must be a number in [0, 1], got {lam!r}")
    if perm.dim() != 1 or perm.shape[0] != n:
        raise ValueError(f"perm must be a permutation (B,) of the {n} rows, got shape {tuple(perm.shape)}")


def mixup(x: Tensor, lam: float, perm: Tensor) -> Tensor:
    r"""Mixup of each row with its partner: :math:`\tilde x_b = \lambda x_b + (1 - \lambda) x_{\pi(b)}`.

    The same operation interpolates images, feature maps and logits. ``(B, ...)`` → ``(B, ...)``;
    ``perm`` (B,) holds :math:`\pi`. Paper: H. Zhang, M. Cisse, Y. N. Dauphin, D. Lopez-Paz,
    "mixup: Beyond Empirical Risk Minimization", ICLR 2018, arXiv 1710.09412.
    """
    _check_pairing(x.shape[0], lam, perm)
    return lam * x + (1.0 - lam) * x[perm.to(x.device)]


def mixup_cross_entropy(logits: Tensor, targets: Tensor, lam: float, perm: Tensor) -> Tensor:
    r"""Cross-entropy of a prediction on mixed inputs against both labels:
    :math:`\lambda\,\mathrm{CE}(z, y) + (1 - \lambda)\,\mathrm{CE}(z, y_{\pi})`, batch mean.

    ``logits`` (B, K) (the prediction on :func:`mixup` inputs), ``targets`` (B,) the labels of the
    unmixed rows → scalar.
    """
    _check_pairing(logits.shape[0], lam, perm)
    return lam * F.cross_entropy(logits, targets) + (1.0 - lam) * F.cross_entropy(logits, targets[perm.to(targets.device)])


def _same_lengths(**lists: Sequence[Tensor]) -> int:
    sizes = {name: len(v) for name, v in lists.items()}
    if len(set(sizes.values())) != 1 or not next(iter(sizes.values())):
        raise ValueError(f"MixSKD needs one non-empty entry per classifier in every list, got lengths {sizes}")
    return next(iter(sizes.values()))


def mixskd_parts(
    logits: Sequence[Tensor],
    mixed_logits: Sequence[Tensor],
    features: Sequence[Tensor],
    mixed_features: Sequence[Tensor],
    teacher_on_interpolated: Tensor,
    teacher_on_mixed: Tensor,
    targets: Tensor,
    lam: float,
    perm: Tensor,
    T: float = 3.0,
) -> dict[str, Tensor]:
    r"""The terms of MixSKD's objective, but its adversarial one (:func:`mixskd_discriminator_loss`).

    With classifiers :math:`k = 1..K` (auxiliary branches, then the backbone's own classifier
    :math:`k = K`), logits :math:`z_k(\cdot)` and final feature maps :math:`F_k(\cdot)`; a pair
    :math:`(x, x_\pi)` and its mixup :math:`\tilde x`; interpolations
    :math:`\tilde z_k = \lambda z_k(x) + (1-\lambda) z_k(x_\pi)` and
    :math:`\tilde F_k = \lambda F_k(x) + (1-\lambda) F_k(x_\pi)`; the self-teacher's logits
    :math:`s` on the interpolated maps and :math:`\hat s` on the maps of :math:`\tilde x`; and
    :math:`\mathrm{KD}(a \leftarrow b) = T^2\,\mathrm{KL}(\sigma(\bar b/T) \,\|\, \sigma(a/T))`
    with :math:`\bar b` detached:

    .. math::
        \mathrm{ce} &= \textstyle\sum_k \mathrm{CE}(z_k(x), y) \\
        \mathrm{mixup\_ce} &= \textstyle\sum_k \mathrm{CE}_{mix}(z_k(\tilde x))
            + \mathrm{CE}_{mix}(s) + \mathrm{CE}_{mix}(\hat s) \\
        \mathrm{feature} &= \textstyle\sum_k \operatorname{mean}\big(\tilde F_k - F_k(\tilde x)\big)^2 \\
        \mathrm{logit} &= \textstyle\sum_{k<K} \big[\mathrm{KD}(\tilde z_k \leftarrow z_k(\tilde x))
            + \mathrm{KD}(z_k(\tilde x) \leftarrow \tilde z_k)\big]
            + \mathrm{KD}(\tilde z_K \leftarrow \hat s) + \mathrm{KD}(z_K(\tilde x) \leftarrow s)

    :math:`\mathrm{CE}_{mix}` is :func:`mixup_cross_entropy`. The feature term is mutual (neither
    side detached), as the reference code's ``F.mse_loss``; each logit term detaches its teacher.
    The auxiliary branches distil mutually between the two views; the backbone classifier is taught
    by the self-teacher across views.

    Shapes: ``logits``, ``mixed_logits`` K tensors (B, C_cls) each (on x and on x̃);
    ``features``, ``mixed_features`` K tensors (B, C, H, W) or (B, D) (one shape per k);
    ``teacher_on_interpolated`` (s) and ``teacher_on_mixed`` (ŝ) (B, C_cls); ``targets`` (B,);
    ``perm`` (B,) → dict of scalars ``ce``, ``mixup_ce``, ``feature``, ``logit``.

    Paper: C. Yang, Z. An, H. Zhou, L. Cai, X. Zhi, J. Wu, Y. Xu, Q. Zhang, "MixSKD:
    Self-Knowledge Distillation from Mixup for Image Recognition", ECCV 2022, arXiv 2208.05768
    (T = 3: the reference code's ``--kd_T``, github.com/winycg/Self-KD-Lib ``main_mixskd_cifar.py``).
    That code computes the mixup cross-entropy but leaves it out of the summed loss, so its
    self-teacher gets no gradient at all; the paper trains every classifier and the self-teacher
    on the mixed images, as here.
    """
    k = _same_lengths(logits=logits, mixed_logits=mixed_logits, features=features, mixed_features=mixed_features)
    if T <= 0:
        raise ValueError(f"T must be > 0, got {T}")
    interp_logits = [mixup(z, lam, perm) for z in logits]
    ce = sum(F.cross_entropy(z, targets) for z in logits)
    mixed_ce = sum(mixup_cross_entropy(z, targets, lam, perm) for z in mixed_logits)
    mixed_ce = mixed_ce + mixup_cross_entropy(teacher_on_interpolated, targets, lam, perm) \
        + mixup_cross_entropy(teacher_on_mixed, targets, lam, perm)
    feature = sum(F.mse_loss(mixup(f, lam, perm), g) for f, g in zip(features, mixed_features))
    logit = kd_loss(interp_logits[-1], teacher_on_mixed.detach(), T) \
        + kd_loss(mixed_logits[-1], teacher_on_interpolated.detach(), T)
    for i in range(k - 1):
        logit = logit + kd_loss(interp_logits[i], mixed_logits[i].detach(), T) \
            + kd_loss(mixed_logits[i], interp_logits[i].detach(), T)
    return {"ce": ce, "mixup_ce": mixed_ce, "feature": feature, "logit": logit}  # type: ignore[dict-item]


def mixskd_discriminator_loss(real_scores: Tensor, fake_scores: Tensor) -> Tensor:
    r"""Binary cross-entropy of a discriminator that tells interpolated feature maps ("real",
    label 1) from the feature maps of mixed images ("fake", label 0):

    .. math:: L = -\tfrac1B \textstyle\sum_b \log \sigma(r_b) - \tfrac1B \sum_b \log\big(1 - \sigma(f_b)\big)

    ``real_scores`` (B,) or (B, 1) and ``fake_scores`` (B,) or (B, 1) are the discriminator's
    logits → scalar. The discriminator minimises it; in MixSKD the network plays against it (see
    :class:`~distill.strategies.mixskd.MixSKD`).
    """
    return F.binary_cross_entropy_with_logits(real_scores, torch.ones_like(real_scores)) \
        + F.binary_cross_entropy_with_logits(fake_scores, torch.zeros_like(fake_scores))


# --------------------------------------------------------------------------------------------
# Knowledge flow
# --------------------------------------------------------------------------------------------


def flow_weights(weight_logits: Tensor) -> Tensor:
    r"""Knowledge flow's normalised weights of one student layer: a softmax over its sources,
    entry 0 the student itself, entries 1..N the teachers: ``(N + 1,)`` → ``(N + 1,)``,
    non-negative and summing to 1."""
    if weight_logits.dim() != 1 or weight_logits.shape[0] < 2:
        raise ValueError(f"flow weights need one logit for the student and one per teacher (N + 1 >= 2,), "
                         f"got shape {tuple(weight_logits.shape)}")
    return torch.softmax(weight_logits, dim=0)


def flow_mix(own: Tensor, teachers: Sequence[Tensor], weights: Tensor) -> Tensor:
    r"""The student layer's output under knowledge flow:

    .. math:: h_j = p_{j,0}\, \hat h_j + \textstyle\sum_{i=1}^{N} p_{j,i}\, Q_{j,i}\big(h^{(i)}\big)

    ``own`` is the student layer's own output :math:`\hat h_j`, ``teachers`` the N transformed
    teacher outputs :math:`Q_{j,i}(h^{(i)})` (each shaped like ``own``), ``weights`` the
    normalised weights :math:`p_{j,\cdot}` (N + 1,) of :func:`flow_weights` → a tensor shaped like
    ``own``. Paper: see :func:`flow_dependency_loss`.
    """
    if weights.shape != (len(teachers) + 1,):
        raise ValueError(f"{len(teachers)} teacher features need {len(teachers) + 1} weights, got shape "
                         f"{tuple(weights.shape)}")
    out = weights[0] * own
    for i, t in enumerate(teachers, start=1):
        if t.shape != own.shape:
            raise ValueError(f"transformed teacher feature {i} has shape {tuple(t.shape)}, the student layer "
                             f"{tuple(own.shape)}")
        out = out + weights[i] * t
    return out


def flow_dependency_loss(weight_logits: Sequence[Tensor]) -> Tensor:
    r"""Knowledge flow's dependency loss: the total normalised weight of the teachers,

    .. math:: \ell_{dep}(w) = \textstyle\sum_{j} \sum_{i=1}^{N} p_{j,i}, \qquad p_{j,\cdot} = \operatorname{softmax}(w_j)

    over the student layers :math:`j` that receive teacher features. Minimising it (with a weight
    that grows over training, :func:`flow_dependency_factor`) moves all weight to the student's own
    outputs, so that at the end of training the student runs without its teachers.

    ``weight_logits``: one ``(N + 1,)`` tensor per layer (entry 0 the student) → scalar.

    Paper: I.-J. Liu, J. Peng, A. G. Schwing, "Knowledge Flow: Improve Upon Your Teachers",
    ICLR 2019, arXiv 1904.05878 (Section 3).
    """
    if not weight_logits:
        raise ValueError("the dependency loss needs the weights of at least one layer")
    return torch.stack([flow_weights(w)[1:].sum() for w in weight_logits]).sum()


def flow_dependency_factor(epoch: int, total_epochs: int, start: float = 0.0) -> float:
    r"""The growing multiplier of the dependency loss at ``epoch`` (0-based) of ``total_epochs``:

    .. math:: f(e) = s + (1 - s)\,\frac{e + 1}{E}

    rising linearly from just above ``start`` (:math:`s \in [0, 1]`) to 1 at the last epoch. The
    paper increases the dependency weight :math:`\lambda_2` during training so that the teachers'
    weights reach zero by its end; the linear shape is this library's choice.
    """
    if isinstance(total_epochs, bool) or not isinstance(total_epochs, int) or total_epochs < 1:
        raise ValueError(f"total_epochs must be a positive int, got {total_epochs!r}")
    if not (isinstance(start, (int, float)) and math.isfinite(start) and 0.0 <= start <= 1.0):
        raise ValueError(f"start must be a number in [0, 1], got {start!r}")
    progress = min(max(epoch + 1, 0), total_epochs) / total_epochs
    return float(start + (1.0 - start) * progress)
