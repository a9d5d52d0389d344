r"""Face-verification distillation (issue 17, part G): the Distribution Distillation Loss and neuron selection.

Huang, Shen, Tai, Li, Liu, Li, Huang, Ji, "Improving Face Recognition from Hard Samples via Distribution
Distillation Loss", ECCV 2020, arXiv 2002.03662. The similarities of positive pairs (same identity) and of
negative pairs are summarised by soft histograms; the teacher's histograms (easy samples) are distilled
into the student's (hard samples) with a KL divergence, and an order loss pushes every negative
expectation below every positive one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ddl_loss", "ddl_pair_similarities", "neuron_regression_loss", "neuron_selection_scores", "select_neurons",
           "soft_histogram"]


def soft_histogram(values: Tensor, centers: Tensor, sigma: float) -> Tensor:
    r"""Soft histogram of ``values`` ``(M,)`` over bin centres ``(R,)``: a Gaussian kernel per value,
    normalised to sum to 1 over the bins.

    .. math:: h_r = \frac{\sum_m \exp(-(v_m - t_r)^2 / 2\sigma^2)}{\sum_{r'} \sum_m \exp(-(v_m - t_{r'})^2 / 2\sigma^2)}

    Returns ``(R,)``.
    """
    if values.dim() != 1 or values.numel() == 0:
        raise ValueError(f"soft_histogram needs a non-empty (M,) tensor of values; got {tuple(values.shape)}")
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0; got {sigma}")
    k = torch.exp(-0.5 * ((values.unsqueeze(1) - centers.unsqueeze(0)) / sigma) ** 2).sum(0)
    return k / k.sum()


def ddl_pair_similarities(embeddings: Tensor, identities: Tensor) -> tuple[Tensor, Tensor]:
    """Cosine similarities of every positive pair ``i < j`` (same identity), ``(P,)``, and each sample's
    hardest negative (its largest similarity to another identity), ``(B,)`` for the samples that have one.

    Args:
        embeddings: ``(B, D)`` features (normalised here).
        identities: ``(B,)`` identity labels.
    """
    if embeddings.dim() != 2 or identities.shape != embeddings.shape[:1]:
        raise ValueError(f"embeddings must be (B, D) with identities (B,); got {tuple(embeddings.shape)} and "
                         f"{tuple(identities.shape)}")
    z = F.normalize(embeddings, dim=1)
    sim = z @ z.t()
    same = identities.unsqueeze(0) == identities.unsqueeze(1)
    upper = torch.ones_like(same).triu(1)
    pos = sim[same & upper]
    has_neg = (~same).any(1)
    neg = sim.masked_fill(same, float("-inf")).max(1).values[has_neg]
    if pos.numel() == 0 or neg.numel() == 0:
        raise ValueError("DDL needs a batch with at least one positive pair (two images of one identity) and two "
                         f"identities; got identities {identities.tolist()}")
    return pos, neg


def _kl(p: Tensor, q: Tensor, eps: float = 1e-9) -> Tensor:
    return ((p + eps) * ((p + eps).log() - (q + eps).log())).sum()


def ddl_loss(student_pos: Tensor, student_neg: Tensor, teacher_pos: Tensor, teacher_neg: Tensor, *,
             pos_kl_weight: float = 0.1, neg_kl_weight: float = 0.02, order_weight: float = 0.5,
             centers: Tensor | None = None, sigma: float = 0.1) -> Tensor:
    r"""The Distribution Distillation Loss.

    With soft histograms :func:`soft_histogram` :math:`P^\pm` of the teacher's positive/negative
    similarities and :math:`Q^\pm` of the student's,

    .. math::
        L = \lambda_+ \mathrm{KL}(P^+ \| Q^+) + \lambda_- \mathrm{KL}(P^- \| Q^-)
            + \lambda_o \sum_{a, b \in \{t, s\}} \big(E[S^-_a] - E[S^+_b]\big),
        \qquad \mathrm{KL}(P \| Q) = \sum_r P_r \log \frac{P_r}{Q_r}

    (a 1e-9 is added to each bin inside the KL, as the authors' code). The order loss sums the four
    teacher/student combinations of (negative mean - positive mean).

    Args:
        student_pos, teacher_pos: ``(P_s,)``, ``(P_t,)`` positive-pair similarities.
        student_neg, teacher_neg: ``(N_s,)``, ``(N_t,)`` negative similarities. Teacher values are detached.
        centers: ``(R,)`` bin centres; default 0, 0.001, ..., 0.999 (the authors' code).
        sigma: the Gaussian kernel's width (0.1 in the authors' code).
    """
    teacher_pos, teacher_neg = teacher_pos.detach(), teacher_neg.detach()
    if centers is None:
        centers = torch.arange(0.0, 1.0, 0.001, device=student_pos.device, dtype=student_pos.dtype)
    kl_pos = _kl(soft_histogram(teacher_pos, centers, sigma), soft_histogram(student_pos, centers, sigma))
    kl_neg = _kl(soft_histogram(teacher_neg, centers, sigma), soft_histogram(student_neg, centers, sigma))
    order = sum(n.mean() - p.mean() for n in (teacher_neg, student_neg) for p in (teacher_pos, student_pos))
    return pos_kl_weight * kl_pos + neg_kl_weight * kl_neg + order_weight * order


# --------------------------------------------------------------------------------------------
# Neuron selection (Luo, Zhu, Liu, Wang, Tang, "Face Model Compression by Distilling Knowledge from Neurons",
# AAAI 2016, no arXiv id)
# --------------------------------------------------------------------------------------------


def _standardise(x: Tensor) -> Tensor:
    x = x - x.mean(0, keepdim=True)
    return x / x.norm(dim=0, keepdim=True).clamp_min(1e-12)


def neuron_selection_scores(features: Tensor, attributes: Tensor) -> tuple[Tensor, Tensor]:
    r"""Unary and pairwise terms of the neuron selection.

    .. math::
        d_i = \frac{1}{A} \sum_a \lvert \rho(x_i, a) \rvert, \qquad c_{ij} = \lvert \rho(x_i, x_j) \rvert

    with :math:`\rho` Pearson's correlation over the ``N`` samples (for a binary attribute, the point-biserial
    correlation): ``d`` how informative neuron ``i`` is of the attributes, ``c`` the redundancy of two neurons.

    Args:
        features: ``(N, D)`` the teacher's top hidden layer.
        attributes: ``(N, A)`` attribute values (0/1 or real).
    Returns:
        ``d`` ``(D,)`` and ``c`` ``(D, D)`` (zero diagonal).
    """
    if features.dim() != 2 or attributes.dim() != 2 or features.shape[0] != attributes.shape[0]:
        raise ValueError(f"features must be (N, D) and attributes (N, A) with one N; got {tuple(features.shape)} and "
                         f"{tuple(attributes.shape)}")
    f, a = _standardise(features.double()), _standardise(attributes.double())
    d = (f.t() @ a).abs().mean(1)
    c = (f.t() @ f).abs()
    c.fill_diagonal_(0.0)
    return d, c


def select_neurons(features: Tensor, attributes: Tensor, k: int, pairwise_weight: float = 1.0) -> Tensor:
    r"""Indices ``(k,)`` of the neurons chosen by greedy minimisation of the binary selection energy

    .. math:: E(y) = -\sum_i d_i y_i + \frac{\lambda}{k} \sum_{i \ne j} c_{ij} y_i y_j, \qquad y \in \{0, 1\}^D,
        \ \sum_i y_i = k

    (:func:`neuron_selection_scores`): informative neurons, little correlated with each other. Starting from
    the empty set, each step adds the neuron of largest gain :math:`d_i - \frac{2\lambda}{k} \sum_{j \in S}
    c_{ij}` (ties to the lower index), so an exact copy of a chosen neuron loses to a less informative but
    uncorrelated one. ``pairwise_weight`` is :math:`\lambda`; 0 keeps the ``k`` most informative neurons.
    The returned indices are in the order chosen.
    """
    d, c = neuron_selection_scores(features, attributes)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(d):
        raise ValueError(f"k must be an integer in [1, {len(d)}] (the number of neurons); got {k!r}")
    if pairwise_weight < 0:
        raise ValueError(f"pairwise_weight must be >= 0; got {pairwise_weight}")
    chosen: list[int] = []
    penalty = torch.zeros_like(d)
    free = torch.ones(len(d), dtype=torch.bool)
    for _ in range(k):
        gain = (d - 2.0 * pairwise_weight / k * penalty).masked_fill(~free, float("-inf"))
        i = int(torch.argmax(gain))  # the first maximum: ties to the lower index
        chosen.append(i)
        free[i] = False
        penalty = penalty + c[i]
    return torch.tensor(chosen, dtype=torch.long)


def neuron_regression_loss(student: Tensor, teacher: Tensor, indices: Tensor | None = None) -> Tensor:
    r"""The student regresses the selected teacher neurons:
    :math:`\frac{1}{2B} \sum_b \lVert s_b - t_{b, I} \rVert_2^2` with ``student`` ``(B, k)``, ``teacher`` ``(B, D)``
    (detached) and ``I`` the selected ``indices`` ``(k,)`` (all neurons when None)."""
    t = teacher.detach() if indices is None else teacher.detach()[:, indices]
    if student.shape != t.shape:
        raise ValueError(f"the student's features {tuple(student.shape)} must match the selected teacher neurons "
                         f"{tuple(t.shape)}")
    return 0.5 * (student - t).pow(2).sum(1).mean()
