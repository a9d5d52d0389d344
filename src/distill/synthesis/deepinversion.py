"""DeepInversion and Adaptive DeepInversion: images optimised from noise against a BN teacher.

Paper: H. Yin, P. Molchanov, Z. Li, J. M. Alvarez, A. Mallya, D. Hoiem, N. K. Jha, J. Kautz,
"Dreaming to Distill: Data-free Knowledge Transfer via DeepInversion", CVPR 2020, arXiv 1912.08795.

For a batch ``x`` ``(B, C, H, W)`` with target classes ``y`` ``(B,)`` (Sec. 3.2-3.3)::

    L_DI(x)  = CE(f_T(x~), y) + a_tv R_TV(x) + a_l2 R_l2(x) + a_f R_feature(x~)
    L_ADI(x) = L_DI(x) + a_c (1 - JS(p_T(x~) || p_S(x~)))

with ``x~`` the batch after one random jitter (roll) and, optionally, a horizontal flip
(:func:`~distill.synthesis.priors.jitter_flip`); ``R_TV`` and ``R_l2`` the image priors
(:mod:`~distill.synthesis.priors`, computed on ``x``); ``R_feature`` the BatchNorm-statistics
distance (:class:`~distill.synthesis.bn_stats.BatchNormStatistics`, first layer weighted by
``first_bn_weight``); ``p_T``, ``p_S`` the teacher's and the (fixed) student's softmax at
temperature ``T`` and ``JS(p || q) = 1/2 KL(p || m) + 1/2 KL(q || m)``, ``m = (p + q)/2``, in nats,
averaged over the batch. Minimising ``1 - JS`` pushes the images where teacher and student disagree.

Only the abstract of the paper could be read here. Defaults come from the authors' code
(github.com/NVlabs/DeepInversion, ``cifar10/deepinversion_cifar10.py`` and its README's
"parameters from the paper": Adam, lr 0.05, 2000 iterations, batch 256, ``r_feature`` 10,
TV weight 2.5e-5, L2 weight 0, jitter 2, no flip; the competition weight 0.2 is that of the
authors' ImageNet ADI example log ``fp16_set0_rn50_adi02``). Departures, with their factors:

* JS follows the paper's definition at ``T = 1``; the code uses ``T = 3``, clamps the three
  distributions to ``[0.01, 0.99]``, computes ``KL(m || p)`` (the reverse direction) and clamps JS
  to ``[0, 1]``;
* ``R_TV`` is :func:`~distill.synthesis.priors.total_variation` (``p = 2``: the sum of squared
  differences along both axes, mean over the batch); the code adds the Frobenius norms over the
  whole batch of four directional differences (two diagonals too), so its 2.5e-5 weighs a
  differently scaled term;
* the priors act on ``x``, not on the jittered ``x~`` (the same up to the rolled border);
* the final images are those after the last step, not the code's lowest-loss iterate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.data.synthetic import SyntheticSet
from distill.papers import Paper
from distill.synthesis.bn_stats import BatchNormStatistics
from distill.synthesis._checks import check_int
from distill.synthesis.priors import jitter_flip, l2_prior, total_variation
from distill.synthesis.progress import StepProgress
from distill.synthesis.registry import register_synthesizer, teacher_fingerprint

__all__ = ["YIN_2020", "DIWeights", "adaptive_deepinversion", "competition_loss", "deepinversion",
           "deepinversion_objective", "js_divergence", "synthesize_deepinversion"]

YIN_2020 = Paper(
    title="Dreaming to Distill: Data-free Knowledge Transfer via DeepInversion",
    authors="H. Yin, P. Molchanov, Z. Li, J. M. Alvarez, A. Mallya, D. Hoiem, N. K. Jha, J. Kautz",
    year=2020,
    arxiv="1912.08795",
    venue="CVPR",
)


def js_divergence(logits_p: Tensor, logits_q: Tensor, T: float = 1.0) -> Tensor:
    """Jensen-Shannon divergence between ``softmax(logits_p / T)`` and ``softmax(logits_q / T)``,
    ``(B, K)`` each: ``mean_b [1/2 KL(p_b || m_b) + 1/2 KL(q_b || m_b)]``, ``m = (p + q)/2``, in nats
    (a scalar in ``[0, ln 2]``)."""
    if logits_p.shape != logits_q.shape or logits_p.dim() != 2:
        raise ValueError(f"js_divergence needs two (B, K) logits of one shape; got {tuple(logits_p.shape)} "
                         f"and {tuple(logits_q.shape)}")
    if not T > 0:
        raise ValueError(f"temperature T must be > 0; got {T!r}")
    log_p = F.log_softmax(logits_p / T, dim=1)
    log_q = F.log_softmax(logits_q / T, dim=1)
    log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - torch.log(torch.tensor(2.0))
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(1)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(1)
    return (0.5 * kl_pm + 0.5 * kl_qm).mean()


def competition_loss(teacher_logits: Tensor, student_logits: Tensor, T: float = 1.0) -> Tensor:
    """ADI's competition term ``1 - JS(p_T || p_S)`` (scalar; :func:`js_divergence`)."""
    return 1.0 - js_divergence(teacher_logits, student_logits, T)


@dataclass(frozen=True)
class DIWeights:
    """The weights of the DeepInversion objective: ``ce`` (the class term), ``bn`` (``a_f``),
    ``first_bn_weight`` (the extra factor of the first BN layer), ``tv`` (``a_tv``) with exponent
    ``tv_p``, ``l2`` (``a_l2``), ``competition`` (``a_c``, ADI) at temperature ``T``."""

    ce: float = 1.0
    bn: float = 10.0
    first_bn_weight: float = 1.0
    tv: float = 2.5e-5
    tv_p: float = 2.0
    l2: float = 0.0
    competition: float = 0.0
    T: float = 1.0

    def __post_init__(self) -> None:
        for name in ("ce", "bn", "first_bn_weight", "tv", "l2", "competition"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ValueError(f"DeepInversion weight {name} must be a number >= 0; got {v!r}")
        if not self.T > 0 or not self.tv_p > 0:
            raise ValueError(f"T and tv_p must be > 0; got T={self.T!r}, tv_p={self.tv_p!r}")


def deepinversion_objective(teacher: nn.Module, x: Tensor, targets: Tensor, bn: BatchNormStatistics,
                            weights: DIWeights, *, student: nn.Module | None = None, jitter: int = 0,
                            flip: bool = False, generator: torch.Generator | None = None
                            ) -> tuple[Tensor, dict[str, float]]:
    """``L_DI`` (or ``L_ADI`` with a student and ``weights.competition > 0``) of one batch.

    Args:
        teacher: the frozen teacher whose BN layers ``bn`` hooks.
        x: images ``(B, C, H, W)`` (requires grad); ``targets`` ``(B,)`` class indices.
        jitter, flip, generator: the random roll/flip of :func:`jitter_flip` before the forward passes.

    Returns:
        the total (scalar tensor) and the unweighted parts as floats (``ce``, ``bn``, ``tv``, ``l2``,
        ``competition`` when used).
    """
    x_j = jitter_flip(x, jitter, flip, generator) if (jitter or flip) else x
    logits = teacher(x_j)
    ce = F.cross_entropy(logits, targets)
    r_bn = bn.loss()
    tv = total_variation(x, weights.tv_p)
    l2 = l2_prior(x)
    total = weights.ce * ce + weights.bn * r_bn + weights.tv * tv + weights.l2 * l2
    parts = {"ce": float(ce.detach()), "bn": float(r_bn.detach()), "tv": float(tv.detach()),
             "l2": float(l2.detach())}
    if student is not None and weights.competition > 0:
        comp = competition_loss(logits, student(x_j), weights.T)
        total = total + weights.competition * comp
        parts["competition"] = float(comp.detach())
    return total, parts


def synthesize_deepinversion(teacher: nn.Module, *, ipc: int, num_classes: int, image_shape: tuple[int, int, int],
                             weights: DIWeights, student: nn.Module | None = None, iterations: int = 2000,
                             lr: float = 0.05, batch_size: int = 256, jitter: int = 2, flip: bool = False,
                             seed: int = 0, progress: bool = True, method: str = "deepinversion",
                             device: str | torch.device | None = None) -> SyntheticSet:
    """The loop shared by :func:`deepinversion` and :func:`adaptive_deepinversion`.

    ``ipc * num_classes`` images with labels ``0..K-1`` repeated ``ipc`` times (class-balanced
    batches, as the authors' code); each batch of up to ``batch_size`` starts from ``N(0, 1)`` noise
    and takes ``iterations`` Adam steps (lr ``lr``) on its objective. Teacher (and student) run in
    eval mode and are never updated (gradients go to the images only); modes are restored.
    """
    check_int("ipc", ipc, 1)
    check_int("num_classes", num_classes, 1)
    check_int("iterations", iterations, 1)
    check_int("batch_size", batch_size, 1)
    check_int("jitter", jitter, 0)
    if len(tuple(image_shape)) != 3:
        raise ValueError(f"image_shape must be (C, H, W); got {image_shape!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0; got {lr!r}")
    dev = torch.device(device) if device is not None else next(teacher.parameters()).device
    bn = BatchNormStatistics(teacher, first_weight=weights.first_bn_weight)  # raises without BN layers
    labels_all = torch.arange(num_classes).repeat(ipc)
    gen = torch.Generator().manual_seed(seed)
    modes = [(m, m.training) for m in ([teacher] + ([student] if student is not None else []))]
    images, first, last = [], [], []
    n = labels_all.numel()
    try:
        for m, _ in modes:
            m.eval()
        with StepProgress(progress, method, -(-n // batch_size) * iterations) as bar:
            for start in range(0, n, batch_size):
                y = labels_all[start:start + batch_size].to(dev)
                x = torch.randn((y.numel(), *image_shape), generator=gen).to(dev).requires_grad_(True)
                opt = torch.optim.Adam([x], lr=lr)
                for it in range(iterations):
                    loss, parts = deepinversion_objective(teacher, x, y, bn, weights, student=student,
                                                          jitter=jitter, flip=flip, generator=gen)
                    (grad,) = torch.autograd.grad(loss, [x])
                    if it == 0:
                        first.append(float(loss.detach()))
                    x.grad = grad
                    opt.step()
                    bar.advance(f"loss {float(loss.detach()):.4g} ce {parts['ce']:.3g} bn {parts['bn']:.3g}")
                with torch.no_grad():  # the objective of the final images (no jitter: deterministic)
                    last.append(float(deepinversion_objective(teacher, x, y, bn, weights, student=student)[0]))
                images.append(x.detach().cpu())
    finally:
        bn.remove()
        for m, mode in modes:
            m.train(mode)
    settings = {"image_shape": list(image_shape), "seed": seed, "iterations": iterations, "lr": lr,
                "batch_size": batch_size, "jitter": jitter, "flip": flip, **weights.__dict__}
    manifest = {"method": method, "family": "data-free", "teacher": {"fingerprint": teacher_fingerprint(teacher)},
                "num_classes": num_classes, "ipc": ipc, "settings": settings,
                "objective_initial": sum(first) / len(first), "objective_final": sum(last) / len(last)}
    return SyntheticSet(torch.cat(images).float(), labels_all.clone(), manifest)


@register_synthesizer("deepinversion", "data-free", YIN_2020)
def deepinversion(teacher: nn.Module, *, ipc: int, num_classes: int, image_shape: tuple[int, int, int],
                  seed: int = 0, progress: bool = True, iterations: int = 2000, lr: float = 0.05,
                  batch_size: int = 256, bn: float = 10.0, first_bn_weight: float = 1.0, tv: float = 2.5e-5,
                  tv_p: float = 2.0, l2: float = 0.0, ce: float = 1.0, jitter: int = 2, flip: bool = False,
                  device: str | torch.device | None = None) -> SyntheticSet:
    """DeepInversion: class-conditional images from noise, matching the teacher's BN statistics.

    Minimises ``ce CE + bn R_feature + tv R_TV + l2 R_l2`` over the images (module docstring; defaults:
    the authors' CIFAR-10 code). The teacher must have BatchNorm layers. Returns a
    :class:`~distill.data.synthetic.SyntheticSet` (``objective_initial`` / ``objective_final`` in the
    manifest: mean over batches of the first step's and the final images' objective).
    """
    w = DIWeights(ce=ce, bn=bn, first_bn_weight=first_bn_weight, tv=tv, tv_p=tv_p, l2=l2)
    return synthesize_deepinversion(teacher, ipc=ipc, num_classes=num_classes, image_shape=image_shape, weights=w,
                                    iterations=iterations, lr=lr, batch_size=batch_size, jitter=jitter, flip=flip,
                                    seed=seed, progress=progress, method="deepinversion", device=device)


@register_synthesizer("adaptive_deepinversion", "data-free", YIN_2020)
def adaptive_deepinversion(teacher: nn.Module, *, ipc: int, num_classes: int, image_shape: tuple[int, int, int],
                           seed: int = 0, progress: bool = True, student: nn.Module | None = None,
                           competition: float = 0.2, T: float = 1.0, iterations: int = 2000, lr: float = 0.05,
                           batch_size: int = 256, bn: float = 10.0, first_bn_weight: float = 1.0,
                           tv: float = 2.5e-5, tv_p: float = 2.0, l2: float = 0.0, ce: float = 1.0, jitter: int = 2,
                           flip: bool = False, device: str | torch.device | None = None) -> SyntheticSet:
    """Adaptive DeepInversion: DeepInversion plus the competition ``competition * (1 - JS(p_T || p_S))``.

    ``student`` (required) is the current student, fixed during synthesis; the images move where it
    disagrees with the teacher. Other arguments as :func:`deepinversion`.
    """
    if not isinstance(student, nn.Module):
        raise TypeError("adaptive_deepinversion needs student=: the current student network (an nn.Module) "
                         "whose disagreement with the teacher the images seek")
    w = DIWeights(ce=ce, bn=bn, first_bn_weight=first_bn_weight, tv=tv, tv_p=tv_p, l2=l2,
                  competition=competition, T=T)
    return synthesize_deepinversion(teacher, ipc=ipc, num_classes=num_classes, image_shape=image_shape, weights=w,
                                    student=student, iterations=iterations, lr=lr, batch_size=batch_size,
                                    jitter=jitter, flip=flip, seed=seed, progress=progress,
                                    method="adaptive_deepinversion", device=device)
