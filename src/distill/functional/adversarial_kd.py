"""Adversarial knowledge distillation: a discriminator as the learned loss.

* Conditional adversarial KD (Xu, Hsu, Huang, "Training Shallow and Thin Networks for Acceleration via
  Knowledge Distillation with Conditional Adversarial Networks", 2017, arXiv 1709.00513; its later version
  "Learning Loss for Knowledge Distillation with Conditional Adversarial Networks"):
  :func:`cakd_discriminator_loss`, :func:`cakd_student_loss`.
* KDGAN (Wang, Zhang, Sun, Qi, "KDGAN: Knowledge Distillation with Generative Adversarial Networks",
  NeurIPS 2018, no arXiv id): :func:`concrete_sample`, :func:`kdgan_discriminator_loss`,
  :func:`kdgan_policy_loss`, :func:`kdgan_distill_loss`.
* Adversarial imitation (Liu, Chen, Liu, AAAI 2019) reuses :func:`adversarial_bce` on per-token
  representations.

Discriminator outputs are *logits* of "real" (a sigmoid gives the probability); all losses are means
over the rows given.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["adversarial_bce", "cakd_discriminator_loss", "cakd_student_loss", "concrete_sample",
           "kdgan_discriminator_loss", "kdgan_distill_loss", "kdgan_policy_loss"]


def _scores(x: Tensor, who: str) -> Tensor:
    if x.dim() == 2 and x.shape[1] == 1:
        x = x[:, 0]
    if x.dim() != 1:
        raise ValueError(f"{who}: discriminator scores must be (B,) or (B, 1) logits; got {tuple(x.shape)}")
    return x


def adversarial_bce(scores: Tensor, real: bool) -> Tensor:
    """``-(1/B) sum_i log sigma(d_i)`` (``real=True``) or ``-(1/B) sum_i log(1 - sigma(d_i))`` (``real=False``)
    for discriminator logits ``d`` (B,) or (B, 1): the binary cross-entropy against one target."""
    d = _scores(scores, "adversarial_bce")
    return F.binary_cross_entropy_with_logits(d, torch.full_like(d, 1.0 if real else 0.0))


def cakd_discriminator_loss(real_scores: Tensor, fake_scores: Tensor, real_class_logits: Tensor | None = None,
                            fake_class_logits: Tensor | None = None, targets: Tensor | None = None,
                            aux_weight: float = 1.0) -> Tensor:
    r"""What the discriminator of conditional adversarial KD minimises:

    ``L_D = -(1/B) sum_i [log sigma(D(t_i|y_i)) + log(1 - sigma(D(s_i|y_i)))]
           + aux_weight * (1/B) sum_i [CE(C(t_i), y_i) + CE(C(s_i), y_i)]``

    with ``D(.|y)`` the discriminator's real/fake logit on teacher logits ``t`` (real) and student logits
    ``s`` (fake), conditioned on the label ``y``, and ``C(.)`` its auxiliary classification head (class
    logits), which learns to name the class of teacher *and* student logits (the category-level
    supervision of the discriminator). The auxiliary term is dropped when ``real_class_logits`` is None.

    Args:
        real_scores, fake_scores: ``(B,)`` or ``(B, 1)`` real/fake logits on teacher / student logits.
        real_class_logits, fake_class_logits: ``(B, K)`` the auxiliary head's class logits, or None.
        targets: ``(B,)`` long class labels (needed with the auxiliary head).
        aux_weight: weight of the auxiliary classification term.
    Returns: a scalar.
    """
    loss = adversarial_bce(real_scores, True) + adversarial_bce(fake_scores, False)
    if real_class_logits is not None or fake_class_logits is not None:
        if real_class_logits is None or fake_class_logits is None or targets is None:
            raise ValueError("cakd_discriminator_loss: the auxiliary term needs real_class_logits, fake_class_logits "
                             "and targets together")
        loss = loss + aux_weight * (F.cross_entropy(real_class_logits, targets)
                                    + F.cross_entropy(fake_class_logits, targets))
    return loss


def cakd_student_loss(fake_scores: Tensor, student_logits: Tensor, teacher_logits: Tensor,
                      fake_class_logits: Tensor | None = None, targets: Tensor | None = None,
                      adv_weight: float = 1.0, l1_weight: float = 1.0, aux_weight: float = 1.0) -> Tensor:
    r"""What the student of conditional adversarial KD minimises:

    ``L_S = adv_weight * (-(1/B) sum_i log sigma(D(s_i|y_i)))
           + l1_weight * (1/B) sum_i ||s_i - t_i||_1
           + aux_weight * (1/B) sum_i CE(C(s_i), y_i)``

    the non-saturating GAN loss (the student's logits should pass for the teacher's), the L1 distance
    of the logits (the norm summed over the K classes, averaged over the batch: ``E_x ||t(x) - s(x)||_1``;
    DFAD's :func:`~distill.synthesis.adversarial.l1_logits` also averages over classes, K times smaller),
    and the discriminator's auxiliary classifier naming the student logits' true class.

    Args:
        fake_scores: ``(B,)`` or ``(B, 1)`` the discriminator's real/fake logits on the student logits.
        student_logits, teacher_logits: ``(B, K)``.
        fake_class_logits: ``(B, K)`` the auxiliary head on the student logits, or None (term dropped).
        targets: ``(B,)`` long labels (with the auxiliary head).
    Returns: a scalar.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"cakd_student_loss: student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must have one shape (B, K)")
    loss = adv_weight * adversarial_bce(fake_scores, True)
    if l1_weight:
        loss = loss + l1_weight * (student_logits - teacher_logits).abs().sum(dim=1).mean()
    if fake_class_logits is not None:
        if targets is None:
            raise ValueError("cakd_student_loss: the auxiliary term needs targets")
        loss = loss + aux_weight * F.cross_entropy(fake_class_logits, targets)
    return loss


def concrete_sample(logits: Tensor, tau: float, uniform: Tensor | None = None) -> tuple[Tensor, Tensor]:
    r"""A sample of the concrete (Gumbel-softmax) relaxation of ``p = softmax(logits)``:

    ``q = softmax((log p + g) / tau)``, ``g = -log(-log u)``, ``u ~ U(0, 1)``,

    and the pseudo label ``argmax_k q_k`` (= ``argmax_k (log p_k + g_k)``, an exact draw from ``p``: the
    Gumbel-max trick). KDGAN feeds the discrete label forward and differentiates through ``q``.

    Args:
        logits: ``(B, K)``.
        tau: temperature > 0.
        uniform: ``(B, K)`` draws in (0, 1) to use (tests); default fresh ones.
    Returns: ``(q, labels)``: ``(B, K)`` (differentiable in ``logits``) and ``(B,)`` long.
    """
    if not tau > 0:
        raise ValueError(f"concrete_sample: tau must be > 0; got {tau!r}")
    if uniform is None:
        uniform = torch.rand_like(logits)
    elif uniform.shape != logits.shape:
        raise ValueError(f"concrete_sample: uniform {tuple(uniform.shape)} must have the logits' shape "
                         f"{tuple(logits.shape)}")
    u = uniform.clamp(1e-20, 1 - 1e-7)
    g = -torch.log(-torch.log(u))
    q = F.softmax((F.log_softmax(logits, dim=1) + g) / tau, dim=1)
    return q, q.argmax(dim=1)


def kdgan_discriminator_loss(real_scores: Tensor, student_scores: Tensor, teacher_scores: Tensor,
                             alpha: float = 0.5) -> Tensor:
    r"""Minus KDGAN's value function in the discriminator's terms (which it ascends):

    ``L_D = -(1/B) sum_i [log D(x_i, y_i) + alpha log(1 - D(x_i, y^s_i)) + (1 - alpha) log(1 - D(x_i, y^t_i))]``

    with ``D = sigmoid(score)`` on the true label ``y``, the student's pseudo label ``y^s`` and the
    teacher's ``y^t``.

    Args:
        real_scores, student_scores, teacher_scores: ``(B,)`` the discriminator's logits of those pairs.
        alpha: in [0, 1], the share of the student's pseudo labels among the negatives.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"kdgan_discriminator_loss: alpha must be in [0, 1]; got {alpha!r}")
    return (adversarial_bce(real_scores, True) + alpha * adversarial_bce(student_scores, False)
            + (1 - alpha) * adversarial_bce(teacher_scores, False))


def kdgan_policy_loss(sample: Tensor, labels: Tensor, scores: Tensor) -> Tensor:
    r"""KDGAN's adversarial loss for the student (or teacher), whose gradient is the paper's estimate

    ``(1/B) sum_i grad log q_i[y_i] * log(1 - D(x_i, y_i))``

    with ``q`` the concrete sample, ``y_i = argmax q_i`` the pseudo label and the reward
    ``log(1 - D)`` held constant: returns ``(1/B) sum_i log q_i[y_i] * stopgrad(log(1 - sigmoid(d_i)))``.
    Descending it raises the probability of pseudo labels that the discriminator takes for real ones
    (``log(1 - D)`` most negative). Multiply by ``alpha`` (student) or ``1 - alpha`` (teacher).

    Args:
        sample: ``(B, K)`` concrete sample ``q`` (differentiable).
        labels: ``(B,)`` long pseudo labels.
        scores: ``(B,)`` discriminator logits of ``(x_i, y_i)`` (detached here).
    """
    d = _scores(scores, "kdgan_policy_loss").detach()
    reward = -F.softplus(d)  # log(1 - sigmoid(d)), computed stably
    picked = sample.gather(1, labels.long().unsqueeze(1)).squeeze(1).clamp_min(1e-20)
    return (torch.log(picked) * reward).mean()


def kdgan_distill_loss(logits: Tensor, target_logits: Tensor, form: str = "l2", temperature: float = 1.0) -> Tensor:
    r"""KDGAN's distillation loss of one player toward the other (the target is detached):

    * ``form="l2"`` (the paper's reported choice, Ba & Caruana's logit regression):
      ``(1/(2B)) sum_i ||z_i - z^target_i||_2^2``;
    * ``form="kl"`` (Hinton et al.): ``T^2 (1/B) sum_i KL(softmax(z^target_i/T) || softmax(z_i/T))``.

    Args:
        logits, target_logits: ``(B, K)``.
    """
    if logits.shape != target_logits.shape:
        raise ValueError(f"kdgan_distill_loss: logits {tuple(logits.shape)} and target logits "
                         f"{tuple(target_logits.shape)} must have one shape (B, K)")
    target = target_logits.detach()
    if form == "l2":
        return 0.5 * (logits - target).pow(2).sum(dim=1).mean()
    if form == "kl":
        t = temperature
        return F.kl_div(F.log_softmax(logits / t, 1), F.softmax(target / t, 1), reduction="batchmean") * t * t
    raise ValueError(f"kdgan_distill_loss: form must be 'l2' or 'kl'; got {form!r}")
