"""The math of DarkGAN: a classifier teacher's temperature-softened labels as a GAN's conditioning.

Paper: Nistal, Lattner, Richard, "DarkGAN: Exploiting Knowledge Distillation for Comprehensible
Audio Synthesis with GANs", ISMIR 2021, arXiv 2108.01216. The teacher (there the PANNs audio
tagger, here an image classifier) labels every real sample with its softened probabilities ``c``;
the generator takes ``c`` as its conditioning; the discriminator has an auxiliary head that learns
to predict ``c`` of real samples (this is where the teacher's knowledge is distilled) and the
generator is trained so that this head, on ``G(z, c)``, predicts the ``c`` it was given (AC-GAN's
scheme with soft targets). Only the abstract could be read here; the form of each term and the
defaults come from the authors' code (github SonyCSLParis/DarkGAN, ``darkgan/gans/ac_criterion.py``,
``darkgan/gans/base_GAN.py``, ``darkgan/config_files/darkgan.json``).

Two forms, chosen by ``form``:

* ``"softmax"`` (ours, for a single-label classifier teacher such as an MNIST/Fashion-MNIST
  net): ``c = softmax(t / T)`` and the conditioning term is the categorical KL divergence
  ``KL(c || softmax(a / T))`` of the discriminator head's logits ``a``.
* ``"sigmoid"`` (the authors' code, for their multi-label AudioSet tagger): ``c = sigmoid(t / T)``
  and the term is the per-tag Bernoulli KL ``KL(c || sigmoid(a / T))`` averaged over tags. The code
  computes the binary cross-entropy ``BCE(sigmoid(a / T), c)``; ours is that minus the target's
  entropy, a constant in ``a``: same gradients, and 0 when the head matches ``c`` exactly.

Neither form is multiplied by ``T**2`` (Hinton's convention elsewhere in this library): the authors'
code does not; it weights the terms by 10 for both players (against a WGAN-GP critic).

Shapes: logits and labels ``(B, K)``; every loss is a scalar averaged over the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["darkgan_condition_agreement", "darkgan_condition_loss", "darkgan_discriminator_loss",
           "darkgan_generator_loss", "darkgan_soft_labels"]

_FORMS = ("softmax", "sigmoid")


def _check(form: str, temperature: float, who: str) -> None:
    if form not in _FORMS:
        raise ValueError(f"{who}: form must be one of {_FORMS}; got {form!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"{who}: temperature must be a positive number; got {temperature!r}")


def _pair(pred: Tensor, target: Tensor, who: str) -> None:
    if pred.dim() != 2 or pred.shape != target.shape:
        raise ValueError(f"{who} needs logits and soft labels of one (B, K) shape; got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")


def darkgan_soft_labels(teacher_logits: Tensor, temperature: float = 3.0, form: str = "softmax") -> Tensor:
    r"""The teacher's soft labels, DarkGAN's conditioning vectors: ``(B, K)`` logits → ``(B, K)``.

    .. math:: c = \operatorname{softmax}(t / T) \quad (\text{form="softmax"}), \qquad
              c = \sigma(t / T) \quad (\text{form="sigmoid"})

    Default ``T = 3``: the authors' configuration (``darkgan.json``: ``"temperature": 3`` for the
    AudioSet labels and for the discriminator's head). The result is detached: it is a target.
    """
    _check(form, temperature, "darkgan_soft_labels")
    if teacher_logits.dim() != 2:
        raise ValueError(f"darkgan_soft_labels needs (B, K) logits; got {tuple(teacher_logits.shape)}")
    t = teacher_logits.detach().float() / temperature
    return F.softmax(t, dim=1) if form == "softmax" else torch.sigmoid(t)


def darkgan_condition_loss(pred_logits: Tensor, soft_labels: Tensor, temperature: float = 3.0,
                           form: str = "softmax") -> Tensor:
    r"""DarkGAN's conditioning (knowledge-distillation) term: how far the discriminator's auxiliary
    prediction ``a`` of a sample is from that sample's soft label ``c``.

    ``form="softmax"`` (categorical), with :math:`q = \operatorname{softmax}(a / T)`:

    .. math:: L = \frac{1}{B} \sum_{i=1}^{B} \sum_{k=1}^{K} c_{ik} \log \frac{c_{ik}}{q_{ik}}

    ``form="sigmoid"`` (per tag, the authors' multi-label case), with :math:`q = \sigma(a / T)`:

    .. math:: L = \frac{1}{B K} \sum_{i,k} \Big[ c_{ik} \log \frac{c_{ik}}{q_{ik}}
              + (1 - c_{ik}) \log \frac{1 - c_{ik}}{1 - q_{ik}} \Big]

    (``0 log 0 = 0``). The discriminator minimises it on real samples with their teacher labels;
    the generator minimises it on ``G(z, c)`` with the ``c`` it was given. With one-hot ``c`` and
    ``T = 1`` the softmax form is AC-GAN's cross-entropy.

    Args:
        pred_logits: ``(B, K)`` the discriminator head's logits ``a``.
        soft_labels: ``(B, K)`` targets ``c`` (rows summing to 1 for ``"softmax"``; in [0, 1]).
        temperature: ``T`` dividing ``a`` (default 3, the authors' configuration).
        form: ``"softmax"`` or ``"sigmoid"``.
    Returns: scalar.
    """
    _check(form, temperature, "darkgan_condition_loss")
    _pair(pred_logits, soft_labels, "darkgan_condition_loss")
    a = pred_logits.float() / temperature
    c = soft_labels.float()
    if form == "softmax":
        return (torch.xlogy(c, c) - c * F.log_softmax(a, dim=1)).sum(1).mean()
    # log sigma(a) = -softplus(-a), log(1 - sigma(a)) = -softplus(a): stable for large |a|
    kl = torch.xlogy(c, c) + torch.xlogy(1 - c, 1 - c) + c * F.softplus(-a) + (1 - c) * F.softplus(a)
    return kl.mean()


def darkgan_condition_agreement(teacher_logits: Tensor, soft_labels: Tensor, temperature: float = 3.0,
                                form: str = "softmax") -> dict[str, float]:
    r"""How well generated samples carry their conditioning, judged by the teacher itself.

    ``teacher_logits`` ``(B, K)``: the teacher on ``G(z_i, c_i)``; ``soft_labels`` ``(B, K)``: the
    ``c_i`` the generator was given. Returns

    * ``"kl"``: :func:`darkgan_condition_loss` with the teacher's logits in place of the
      discriminator's, i.e. ``KL(c || softmax(t / T))`` averaged over the batch (0 when the
      teacher's softened prediction on each generated sample is its conditioning);
    * ``"top1"``: the fraction of samples whose teacher top-1 class is the top-1 class of ``c``
      (for ``"sigmoid"``: the fraction of tags on the same side of 1/2).
    """
    _check(form, temperature, "darkgan_condition_agreement")
    _pair(teacher_logits, soft_labels, "darkgan_condition_agreement")
    kl = float(darkgan_condition_loss(teacher_logits.detach(), soft_labels, temperature, form))
    if form == "softmax":
        top1 = (teacher_logits.argmax(1) == soft_labels.argmax(1)).float().mean()
    else:
        top1 = ((teacher_logits > 0) == (soft_labels > 0.5)).float().mean()
    return {"kl": kl, "top1": float(top1)}


def _scores(s: Tensor, what: str) -> Tensor:
    if s.dim() == 2 and s.shape[1] == 1:
        s = s.squeeze(1)
    if s.dim() != 1:
        raise ValueError(f"{what} must be discriminator scores (B,) or (B, 1); got {tuple(s.shape)}")
    return s.float()


def darkgan_discriminator_loss(real_scores: Tensor, fake_scores: Tensor, real_aux: Tensor | None = None,
                               real_c: Tensor | None = None, temperature: float = 3.0, weight: float = 10.0,
                               form: str = "softmax") -> tuple[Tensor, dict[str, float]]:
    r"""The discriminator's loss of one DarkGAN step (without R1, which the loop adds):

    .. math:: L_D = \frac{1}{B}\sum_i \operatorname{softplus}(-D(x_i))
              + \frac{1}{B'}\sum_j \operatorname{softplus}(D(G(z_j, c_j)))
              + \lambda_D \, L_c(a(x), c(x))

    the non-saturating logistic GAN loss (StyleGAN2's; the authors train a progressive-growing
    WGAN-GP instead) plus ``weight`` (:math:`\lambda_D`, the authors' ``weightConditionD = 10``)
    times :func:`darkgan_condition_loss` of the auxiliary head ``a`` on the **real** batch with the
    teacher's soft labels ``c(x)`` (the authors' code puts the auxiliary term on real data only).
    Without ``real_aux`` (an unconditional GAN) the last term is absent.

    Args:
        real_scores: ``(B,)`` or ``(B, 1)`` D on real images; fake_scores: ``(B',)`` on generated ones.
        real_aux: ``(B, K)`` the auxiliary head's logits on the real images, or None.
        real_c: ``(B, K)`` their soft labels (required with ``real_aux``).
    Returns: ``(loss, parts)``, parts the floats ``"d_adv"`` and (conditional) ``"d_cond"``.
    """
    adv = F.softplus(-_scores(real_scores, "real_scores")).mean() + F.softplus(
        _scores(fake_scores, "fake_scores")).mean()
    parts = {"d_adv": float(adv.detach())}
    if real_aux is None:
        return adv, parts
    if real_c is None:
        raise ValueError("darkgan_discriminator_loss: real_aux was given without real_c (the soft labels)")
    cond = darkgan_condition_loss(real_aux, real_c, temperature, form)
    parts["d_cond"] = float(cond.detach())
    return adv + weight * cond, parts


def darkgan_generator_loss(fake_scores: Tensor, fake_aux: Tensor | None = None, c: Tensor | None = None,
                           temperature: float = 3.0, weight: float = 1.0,
                           form: str = "softmax") -> tuple[Tensor, dict[str, float]]:
    r"""The generator's loss of one DarkGAN step:

    .. math:: L_G = \frac{1}{B}\sum_j \operatorname{softplus}(-D(G(z_j, c_j)))
              + \lambda_G \, L_c(a(G(z_j, c_j)), c_j)

    the non-saturating GAN loss plus ``weight`` (:math:`\lambda_G`; default 1, ours: the authors'
    ``weightConditionG = 10`` is for a WGAN-GP critic and made our logistic-loss generator
    collapse) times :func:`darkgan_condition_loss`: the discriminator's auxiliary head, on each
    generated sample, should predict the soft label ``c_j`` the generator was given.
    Without ``fake_aux`` (unconditional) only the first term.

    Args:
        fake_scores: ``(B,)`` or ``(B, 1)``; fake_aux: ``(B, K)`` head logits on ``G(z, c)``; c: ``(B, K)``.
    Returns: ``(loss, parts)``, parts the floats ``"g_adv"`` and (conditional) ``"g_cond"``.
    """
    adv = F.softplus(-_scores(fake_scores, "fake_scores")).mean()
    parts = {"g_adv": float(adv.detach())}
    if fake_aux is None:
        return adv, parts
    if c is None:
        raise ValueError("darkgan_generator_loss: fake_aux was given without c (the conditioning soft labels)")
    cond = darkgan_condition_loss(fake_aux, c, temperature, form)
    parts["g_cond"] = float(cond.detach())
    return adv + weight * cond, parts
