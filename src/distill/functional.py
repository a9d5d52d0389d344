"""The math of every loss: one pure function per loss, no state, no modules.

Conventions used throughout:

* ``student_logits`` / ``teacher_logits``: ``(B, K)`` unnormalised scores (B samples, K classes).
* ``targets``: ``(B,)`` integer class labels.
* ``T``: the softmax temperature; a Python float or a 0-d tensor (CTKD learns it).
* "batchmean": sum over classes, mean over the batch.
* Nothing here detaches the teacher: callers (the methods) pass detached teacher tensors.

Where a well-known implementation differs from the paper, the function follows the paper and
the docstring says what the implementation does instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "cross_entropy",
    "smooth_targets",
    "label_smoothing_loss",
    "kl_rows",
    "kd_per_sample",
    "kd_loss",
    "logit_regression_loss",
    "sample_logit_noise",
    "perturb_logits",
    "noisy_teacher_loss",
    "dkd_per_sample",
    "dkd_parts",
    "dkd_loss",
    "pearson_correlation",
    "dist_parts",
    "dist_loss",
    "spherical_logits",
    "skd_loss",
    "GradientReversal",
    "grad_reverse",
    "ctkd_lambda",
    "ctkd_temperature",
    "fitnet_hint_loss",
    "attention_map",
    "at_loss",
]


# --------------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------------


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    r"""Cross-entropy of the softmax of ``logits`` against hard labels.

    .. math:: L = -\frac{1}{B} \sum_b \log \operatorname{softmax}(z_b)_{y_b}

    Shapes: ``logits`` (B, K), ``targets`` (B,) → scalar.

    The softmax / cross-entropy pairing for classification nets: Bridle, "Probabilistic
    Interpretation of Feedforward Classification Network Outputs, with Relationships to
    Statistical Pattern Recognition", Neurocomputing (NATO ASI F68), 1990.
    """
    return F.cross_entropy(logits, targets)


def smooth_targets(targets: Tensor, num_classes: int, eps: float, dtype: torch.dtype | None = None) -> Tensor:
    r"""Label-smoothed target distribution, ``(B,)`` labels → ``(B, K)`` rows summing to 1.

    .. math:: q'_k = (1 - \varepsilon)\,\delta_{k, y} + \varepsilon / K

    The uniform prior u(k) = 1/K covers *all* K classes, the target included, as in the paper.
    ``dtype`` defaults to torch's default float dtype.
    """
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"label smoothing eps must be in [0, 1], got {eps}")
    onehot = F.one_hot(targets.long(), num_classes).to(dtype or torch.get_default_dtype())
    return onehot * (1.0 - eps) + eps / num_classes


def label_smoothing_loss(logits: Tensor, targets: Tensor, eps: float = 0.1) -> Tensor:
    r"""Cross-entropy against label-smoothed targets (label-smoothing regularisation, LSR).

    .. math::
        L = -\frac{1}{B} \sum_b \sum_k q'_{b,k} \log \operatorname{softmax}(z_b)_k,
        \qquad q'_{b,k} = (1 - \varepsilon)\,\delta_{k, y_b} + \varepsilon / K

    Shapes: ``logits`` (B, K), ``targets`` (B,) → scalar. ``eps = 0`` is plain cross-entropy.

    Paper: Szegedy, Vanhoucke, Ioffe, Shlens, Wojna, "Rethinking the Inception Architecture for
    Computer Vision", CVPR 2016, arXiv 1512.00567 (Section 7, ε = 0.1 on ImageNet).

    Note for distillation: Müller et al. (NeurIPS 2019) reported that teachers trained with
    label smoothing distil worse; Chandrasegaran et al., "Revisiting Label Smoothing and
    Knowledge Distillation Compatibility: What was Missing?", ICML 2022, arXiv 2206.14532, show
    the two are compatible at low temperature (T = 1) and that the effect depends on the
    temperature used for distillation. Record whether a teacher was trained with LS.
    """
    log_p = F.log_softmax(logits, dim=1)
    q = smooth_targets(targets, logits.shape[1], eps, dtype=log_p.dtype).to(log_p.device)
    return -(q * log_p).sum(dim=1).mean()


# --------------------------------------------------------------------------------------------
# Soft-target KD
# --------------------------------------------------------------------------------------------


def kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    r"""Row-wise :math:`\mathrm{KL}(p \,\|\, q) = \sum_k p_k (\log p_k - \log q_k)` from log-probabilities.

    ``(B, K), (B, K) → (B,)``. Terms with :math:`p_k = 0` contribute 0.
    """
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return terms.sum(dim=-1)


def kd_per_sample(student_logits: Tensor, teacher_logits: Tensor, T: float | Tensor = 4.0) -> Tensor:
    r"""Per-sample soft-target loss :math:`T^2\,\mathrm{KL}(p^T_b \,\|\, q^T_b)`, shape ``(B,)``.

    :math:`p^T = \operatorname{softmax}(t / T)` (teacher), :math:`q^T = \operatorname{softmax}(s / T)`
    (student). See :func:`kd_loss`.
    """
    log_q = F.log_softmax(student_logits / T, dim=1)
    log_p = F.log_softmax(teacher_logits / T, dim=1)
    return kl_rows(log_p, log_q) * (T * T)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, T: float | Tensor = 4.0) -> Tensor:
    r"""Hinton knowledge distillation: KL between temperature-softened distributions, times T².

    .. math::
        L_{KD} = \frac{T^2}{B} \sum_b \sum_k p^T_{b,k} \log \frac{p^T_{b,k}}{q^T_{b,k}},
        \qquad p^T = \operatorname{softmax}(t / T),\; q^T = \operatorname{softmax}(s / T)

    Shapes: (B, K), (B, K) → scalar ("batchmean": sum over classes, mean over batch).

    Paper: Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", NIPS 2014 Deep
    Learning Workshop, 2015, arXiv 1503.02531. The paper writes the soft-target term as the
    cross-entropy :math:`-\sum_k p_k \log q_k`; the KL used here differs from it by the teacher's
    entropy, a constant w.r.t. the student, so the gradients are identical and the loss is 0 when
    the distributions agree. The T² factor is the paper's (it keeps the gradient magnitude
    roughly independent of T; for large T the loss tends to
    :math:`\frac{1}{2K}\sum_k (\Delta_k - \bar\Delta)^2`, Δ = s − t, the paper's logit-matching
    limit). The paper does not prescribe a single temperature (it reports several, e.g. T = 20
    on MNIST and lower values for small students); T = 4 is the CIFAR-100 benchmark default
    (RepDistiller / mdistiller).
    """
    # one fused kernel (forward and backward) instead of the per-sample composition: equal to
    # kd_per_sample(...).mean() (tested), and it keeps the KD step's cost at that of the
    # hand-written loss on a GPU, where small models are bound by kernel launches
    log_q = F.log_softmax(student_logits / T, dim=1)
    log_p = F.log_softmax(teacher_logits / T, dim=1)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True) * (T * T)


# --------------------------------------------------------------------------------------------
# Logit regression and the noisy teacher
# --------------------------------------------------------------------------------------------


def logit_regression_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    r"""L2 regression of the student's logits on the teacher's (mimic learning).

    .. math:: L = \frac{1}{2B} \sum_b \lVert s_b - t_b \rVert_2^2

    Shapes: (B, K), (B, K) → scalar. This is the paper's objective
    :math:`\frac{1}{2T}\sum_t \lVert g(x^{(t)}; W, \beta) - z^{(t)} \rVert_2^2` over the T training
    cases, taken per mini-batch (sum over logits, ½, mean over the batch). ``nn.MSELoss`` (mean
    over B·K, no ½) equals this divided by K/2.

    Paper: Ba, Caruana, "Do Deep Nets Really Need to be Deep?", NIPS 2014, arXiv 1312.6184.
    """
    diff = (student_logits - teacher_logits).flatten(1)
    return 0.5 * diff.pow(2).sum(dim=1).mean()


def sample_logit_noise(
    teacher_logits: Tensor,
    variance: float = 0.1,
    fraction: float = 0.5,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Draw the noisy-teacher perturbation for one batch.

    Returns ``(noise, mask)``: ``noise`` (B, K) with entries :math:`\xi \sim \mathcal N(0, \sigma^2)`,
    :math:`\sigma^2` = ``variance``; ``mask`` (B,) bool, each sample selected independently with
    probability ``fraction`` (the α of the paper). Pass a ``torch.Generator`` for reproducible draws.
    """
    if variance < 0:
        raise ValueError(f"noise variance must be >= 0, got {variance}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"noisy fraction must be in [0, 1], got {fraction}")
    device, dtype = teacher_logits.device, teacher_logits.dtype
    noise = torch.randn(teacher_logits.shape, generator=generator, device=device, dtype=dtype)
    noise = noise * math.sqrt(variance)
    mask = torch.rand(teacher_logits.shape[0], generator=generator, device=device) < fraction
    return noise, mask


def perturb_logits(teacher_logits: Tensor, noise: Tensor, mask: Tensor | None = None) -> Tensor:
    r"""Multiplicative logit noise: :math:`z'_b = (1 + \xi_b) \odot z_b` for the selected samples.

    ``teacher_logits`` (B, K), ``noise`` (B, K) (or broadcastable, e.g. (B, 1) for one ξ per
    sample), ``mask`` (B,) bool or ``None`` (perturb every sample). Unselected rows are unchanged.
    """
    factor = 1.0 + noise
    if mask is not None:
        factor = torch.where(mask.view(-1, *([1] * (teacher_logits.dim() - 1))), factor, torch.ones_like(factor))
    return teacher_logits * factor


def noisy_teacher_loss(
    student_logits: Tensor, teacher_logits: Tensor, noise: Tensor, mask: Tensor | None = None
) -> Tensor:
    r"""Logit regression on a noise-perturbed teacher (noise-based regulariser).

    .. math::
        z'_b = (1 + \xi_b)\, z_b \text{ if } b \text{ is selected, else } z_b, \qquad
        L = \frac{1}{2B} \sum_b \lVert s_b - z'_b \rVert_2^2

    Shapes: (B, K), (B, K), noise (B, K), mask (B,) → scalar. Exact given ``noise``/``mask``;
    draw them with :func:`sample_logit_noise`.

    Paper: Sau, Balasubramanian, "Deep Model Compression: Distilling Knowledge from Noisy
    Teachers", 2016, arXiv 1610.09650: teacher logits perturbed with Gaussian noise on a fraction
    α of the mini-batch, student trained with the L2 logit loss of Ba & Caruana. KD_Lib's
    ``NoisyTeacher`` differs: it flips one coin per *batch* (noise on all samples or none, with
    probability α) and applies the noise before a temperature-softmax KD loss; here the
    selection is per sample and the loss is the paper's L2 on logits. The noise is drawn
    independently per logit, as in KD_Lib (``x * (1 + sqrt(var) * randn_like(x))``); pass a
    (B, 1) ``noise`` for one ξ per sample. The method's defaults σ² = 0.1, α = 0.5 are KD_Lib's.
    """
    return logit_regression_loss(student_logits, perturb_logits(teacher_logits, noise, mask))


# --------------------------------------------------------------------------------------------
# DKD
# --------------------------------------------------------------------------------------------


def _non_target(x: Tensor, targets: Tensor) -> Tensor:
    """The (B, K-1) matrix of non-target entries of a (B, K) matrix, in class order."""
    b, k = x.shape
    keep = torch.ones(b, k, dtype=torch.bool, device=x.device)
    keep[torch.arange(b, device=x.device), targets.long()] = False
    return x[keep].view(b, k - 1)


def dkd_per_sample(
    student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, T: float | Tensor = 4.0
) -> tuple[Tensor, Tensor]:
    r"""Per-sample TCKD and NCKD, each ``(B,)`` and each multiplied by T².

    With :math:`p^T = \operatorname{softmax}(t/T)`, :math:`q^T = \operatorname{softmax}(s/T)` and
    target class :math:`y`:

    * TCKD (binary target / non-target):
      :math:`T^2\,\mathrm{KL}([p_y, 1 - p_y] \,\|\, [q_y, 1 - q_y])`
    * NCKD (among the K−1 non-target classes, renormalised):
      :math:`T^2\,\mathrm{KL}(\hat p \,\|\, \hat q)`, :math:`\hat p_k = p_k / (1 - p_y)`, k ≠ y.

    These satisfy the paper's identity per sample:
    ``kd_per_sample = tckd + (1 - p_y^T) * nckd``. The non-target terms are computed from the
    K−1 non-target logits directly (log-sum-exp), not with mdistiller's "subtract 1000 from the
    target logit" mask, so the identity is exact.
    """
    if student_logits.shape[1] < 2:
        raise ValueError("DKD needs at least 2 classes")
    y = targets.long().view(-1, 1)
    s, t = student_logits / T, teacher_logits / T
    s_nt, t_nt = _non_target(s, targets), _non_target(t, targets)
    lse_s, lse_t = torch.logsumexp(s, dim=1, keepdim=True), torch.logsumexp(t, dim=1, keepdim=True)
    # binary [target, rest] log-probabilities, computed stably
    log_bs = torch.cat([s.gather(1, y) - lse_s, torch.logsumexp(s_nt, dim=1, keepdim=True) - lse_s], dim=1)
    log_bt = torch.cat([t.gather(1, y) - lse_t, torch.logsumexp(t_nt, dim=1, keepdim=True) - lse_t], dim=1)
    tckd = kl_rows(log_bt, log_bs)
    nckd = kl_rows(F.log_softmax(t_nt, dim=1), F.log_softmax(s_nt, dim=1))
    return tckd * (T * T), nckd * (T * T)


def dkd_parts(
    student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, T: float | Tensor = 4.0
) -> tuple[Tensor, Tensor]:
    """Batch-mean ``(TCKD, NCKD)`` (scalars, T² included); see :func:`dkd_per_sample`."""
    tckd, nckd = dkd_per_sample(student_logits, teacher_logits, targets, T)
    return tckd.mean(), nckd.mean()


def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    T: float | Tensor = 4.0,
) -> Tensor:
    r"""Decoupled knowledge distillation.

    .. math::
        \mathrm{KD} = \mathrm{TCKD} + (1 - p^T_y)\,\mathrm{NCKD}
        \quad\longrightarrow\quad
        L_{DKD} = \alpha\,\mathrm{TCKD} + \beta\,\mathrm{NCKD}

    both terms with T² and batchmean (see :func:`dkd_per_sample`). Shapes: (B, K), (B, K),
    targets (B,) → scalar. The paper's warm-up of the DKD weight (20 epochs on CIFAR) is the
    method's ``warmup_epochs``, not part of this function.

    Paper: Zhao, Cui, Song, Qiu, Liang, "Decoupled Knowledge Distillation", CVPR 2022,
    arXiv 2203.08679. Defaults α = 1, β = 8, T = 4 are mdistiller's CIFAR-100 config.
    """
    tckd, nckd = dkd_parts(student_logits, teacher_logits, targets, T)
    return alpha * tckd + beta * nckd


# --------------------------------------------------------------------------------------------
# DIST
# --------------------------------------------------------------------------------------------


def pearson_correlation(a: Tensor, b: Tensor, dim: int = -1, eps: float = 1e-12) -> Tensor:
    r"""Pearson correlation of ``a`` and ``b`` along ``dim`` (other dims are batch dims).

    .. math::
        \rho(u, v) = \frac{\sum_i (u_i - \bar u)(v_i - \bar v)}
                          {\max(\lVert u - \bar u \rVert\,\lVert v - \bar v \rVert,\ \epsilon)}

    The paper's ρ has no ε; here ε only guards (near-)constant vectors, whose correlation is
    then ≈ 0. The DIST reference code *adds* ε = 1e-8 to the denominator instead, which biases
    ρ towards 0 whenever the product of norms is not ≫ 1e-8 — e.g. for the intra-class term of
    rarely predicted classes, whose softmax probabilities barely vary across the batch.
    """
    a_c = a - a.mean(dim=dim, keepdim=True)
    b_c = b - b.mean(dim=dim, keepdim=True)
    return (a_c * b_c).sum(dim=dim) / (a_c.norm(dim=dim) * b_c.norm(dim=dim)).clamp_min(eps)


def dist_parts(student_logits: Tensor, teacher_logits: Tensor, T: float | Tensor = 4.0) -> tuple[Tensor, Tensor]:
    r"""DIST's ``(inter, intra)`` relation losses, each scalar and multiplied by T².

    With :math:`Y = \operatorname{softmax}(Z / T)` row-wise, (B, K):

    * inter-class: :math:`\frac{T^2}{B} \sum_b \big(1 - \rho(Y^s_{b,:}, Y^t_{b,:})\big)`
      (correlation over classes, per sample)
    * intra-class: :math:`\frac{T^2}{K} \sum_k \big(1 - \rho(Y^s_{:,k}, Y^t_{:,k})\big)`
      (correlation over the batch, per class)
    """
    y_s = F.softmax(student_logits / T, dim=1)
    y_t = F.softmax(teacher_logits / T, dim=1)
    inter = (1.0 - pearson_correlation(y_s, y_t, dim=1)).mean()
    intra = (1.0 - pearson_correlation(y_s, y_t, dim=0)).mean()
    return inter * (T * T), intra * (T * T)


def dist_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    beta: float = 2.0,
    gamma: float = 2.0,
    T: float | Tensor = 4.0,
) -> Tensor:
    r"""DIST: relational (Pearson-correlation) match of predictions, across classes and samples.

    .. math:: L_{DIST} = \beta\, L_{inter} + \gamma\, L_{intra}

    with :math:`L_{inter}, L_{intra}` from :func:`dist_parts` (1 − Pearson, T² scaling as in the
    paper's equations). Shapes: (B, K), (B, K) → scalar; needs B ≥ 2 for the intra-class term
    to be informative.

    Paper: Huang, You, Wang, Qian, Xu, "Knowledge Distillation from A Stronger Teacher",
    NeurIPS 2022, arXiv 2205.10536. The paper's ImageNet setting is T = 1, β = γ = 1; the
    CIFAR-100 setting (used here as the default) is T = 4 with β = γ = 2. The official
    ImageNet loss (image_classification_sota ``DIST``) has no temperature argument, i.e. T = 1.
    """
    inter, intra = dist_parts(student_logits, teacher_logits, T)
    return beta * inter + gamma * intra


# --------------------------------------------------------------------------------------------
# SKD
# --------------------------------------------------------------------------------------------


def spherical_logits(logits: Tensor, multiplier: float = 2.0, eps: float = 1e-7) -> Tensor:
    r"""Project logits onto a sphere: centre, normalise, rescale.

    .. math:: \tilde z = m \cdot \frac{z - \bar z}{\sqrt{\operatorname{Var}(z) + \epsilon}}

    per row (biased variance over the K classes), i.e. a parameter-free layer norm; every row
    ends on the sphere of radius :math:`m\sqrt{K}` in the hyperplane :math:`\sum_k \tilde z_k = 0`.
    Shapes: (B, K) → (B, K).
    """
    return F.layer_norm(logits, logits.shape[1:], None, None, eps) * multiplier


def skd_loss(
    student_logits: Tensor, teacher_logits: Tensor, T: float | Tensor = 4.0, multiplier: float = 2.0
) -> Tensor:
    r"""Spherical knowledge distillation: Hinton KD on sphere-projected logits.

    .. math:: L_{SKD} = L_{KD}\big(\tilde s, \tilde t; T\big), \qquad \tilde z = m \cdot \mathrm{LN}(z)

    (see :func:`spherical_logits` and :func:`kd_loss`: KL, T², batchmean). Removing each
    network's logit norm removes the teacher–student *confidence* gap, so the student only
    matches the direction of the teacher's (centred) logits. Invariant to any shift and any
    positive rescaling of either network's logits. Shapes: (B, K), (B, K) → scalar.

    Paper: Guo, Chen, Hu, Zhu, He, Cai, "Reducing the Teacher-Student Gap via Spherical
    Knowledge Distillation", 2020, arXiv 2010.07485. The normalisation and the multiplier
    follow the authors' reference (README of forjiuzhou/Spherical-Knowledge-Distillation:
    ``F.layer_norm(logits, (K,), None, None, 1e-7) * multiplier`` on both networks, multiplier
    "between 2 and 3", ImageNet command T = 4, multiplier 2). Differences of other code: a
    revision of the reference's ``skd_main.py`` instead rescales the student's logits to the
    teacher's standard deviation and divides the batch sum by B twice; PaddleClas ``SKDLoss``
    uses the soft cross-entropy instead of KL (same gradient). The CE-on-labels term of those
    implementations is left to a separate ``ce`` method here.
    """
    return kd_loss(spherical_logits(student_logits, multiplier), spherical_logits(teacher_logits, multiplier), T)


# --------------------------------------------------------------------------------------------
# CTKD
# --------------------------------------------------------------------------------------------


class GradientReversal(torch.autograd.Function):
    r"""Gradient reversal layer: identity forward, gradient multiplied by :math:`-\lambda` backward.

    Ganin & Lempitsky, "Unsupervised Domain Adaptation by Backpropagation", ICML 2015. In CTKD it
    sits between the temperature parameter and the loss, so the temperature *ascends* the
    distillation loss (adversarial, "make the task harder") while the student descends it.
    """

    @staticmethod
    def forward(ctx, x: Tensor, lambda_: float) -> Tensor:  # type: ignore[override]
        ctx.lambda_ = float(lambda_)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad_output * (-ctx.lambda_), None


def grad_reverse(x: Tensor, lambda_: float) -> Tensor:
    """Apply :class:`GradientReversal` with strength ``lambda_`` (≥ 0)."""
    return GradientReversal.apply(x, lambda_)


def ctkd_lambda(
    epoch: int, lambda_max: float = 1.0, lambda_min: float = 0.0, curriculum_epochs: int = 10
) -> float:
    r"""CTKD's cosine curriculum for the gradient-reversal strength λ.

    .. math::
        \lambda_n = \lambda_{min} + \tfrac12(\lambda_{max} - \lambda_{min})
        \Big(1 + \cos\big((1 + \min(n, E)/E)\,\pi\big)\Big),
        \qquad n = \text{epoch} + 1,\; E = \text{curriculum\_epochs}

    so λ rises from λ_min towards λ_max over the first E epochs and stays at λ_max afterwards.
    ``epoch`` is 0-based; the reference code (zhengli97/CTKD ``CosineDecay``, called with the
    1-based epoch and ``decay_max=0, decay_min=-1, decay_loops=10``, passing the negative value
    straight to its GRL) evaluates the same curve at n = epoch + 1, which is what this does:
    epoch 0 → (1 − cos(π/10))/2 ≈ 0.0245, epoch 4 → 0.5, epoch ≥ 9 → 1.

    Paper: Li, Li, Yang, Zhao, Song, Luo, Li, Yang, "Curriculum Temperature for Knowledge
    Distillation", AAAI 2023, arXiv 2211.16231 (defaults λ_max = 1, λ_min = 0, E = 10). The
    CTKD loss itself is :func:`kd_loss` evaluated at the learned temperature
    ``ctkd_temperature(grad_reverse(θ, λ))``, T² included.
    """
    if curriculum_epochs <= 0:
        return float(lambda_max)
    n = min(max(epoch + 1, 0), curriculum_epochs)
    return lambda_min + 0.5 * (lambda_max - lambda_min) * (1.0 + math.cos((1.0 + n / curriculum_epochs) * math.pi))


def ctkd_temperature(raw: Tensor, t_min: float = 1.0, t_max: float = 21.0) -> Tensor:
    r"""Map CTKD's unconstrained global temperature parameter into (t_min, t_max).

    .. math:: T = t_{min} + (t_{max} - t_{min})\,\sigma(\theta)

    The reference code writes this ``t_start + t_end * sigmoid(θ)`` with ``t_start=1, t_end=20``,
    i.e. T ∈ (1, 21), and initialises θ = 1 (T ≈ 15.6).
    """
    return t_min + (t_max - t_min) * torch.sigmoid(raw)


# --------------------------------------------------------------------------------------------
# Feature methods
# --------------------------------------------------------------------------------------------


def fitnet_hint_loss(regressed_student: Tensor, teacher_hint: Tensor) -> Tensor:
    r"""FitNets hint loss: half squared L2 distance per sample, mean over the batch.

    .. math:: L_{HT} = \frac{1}{B} \sum_b \tfrac12 \lVert u_h(x_b) - r(v_g(x_b)) \rVert_2^2

    ``regressed_student`` = r(v_g), the student's guided layer passed through the regressor;
    ``teacher_hint`` = u_h, the teacher's hint layer; both (B, C, H, W) (or any (B, ...)) of the
    same shape → scalar.

    Paper: Romero, Ballas, Kahou, Chassang, Gatta, Bengio, "FitNets: Hints for Thin Deep Nets",
    ICLR 2015, arXiv 1412.6550 (eq. 3). RepDistiller instead uses ``nn.MSELoss()`` (mean over all
    B·N elements, N = C·H·W, no ½) with weight β = 100, i.e.
    ``100 * MSE = (200 / N) * L_HT``: to reproduce RepDistiller's scale with this loss, use
    weight 200/N (e.g. N = 64·8·8 = 4096 → ≈ 0.049).
    """
    if regressed_student.shape != teacher_hint.shape:
        raise ValueError(
            f"hint shapes differ: student (regressed) {tuple(regressed_student.shape)} "
            f"vs teacher {tuple(teacher_hint.shape)}"
        )
    diff = (regressed_student - teacher_hint).flatten(1)
    return 0.5 * diff.pow(2).sum(dim=1).mean()


def attention_map(feature: Tensor, p: float = 2.0) -> Tensor:
    r"""Activation-based spatial attention map :math:`F^p_{sum}(A) = \sum_c |A_c|^p`.

    ``feature`` (B, C, H, W) → (B, 1, H, W), not normalised (see :func:`at_loss`).
    """
    if feature.dim() != 4:
        raise ValueError(f"attention maps need (B, C, H, W) features, got shape {tuple(feature.shape)}")
    return feature.abs().pow(p).sum(dim=1, keepdim=True)


def at_loss(student_maps: Sequence[Tensor], teacher_maps: Sequence[Tensor], beta: float = 1000.0) -> Tensor:
    r"""Attention transfer loss over layer pairs j, from attention maps of matching sizes.

    .. math::
        L_{AT} = \sum_j \frac{\beta}{2\,B\,N_j} \sum_b
        \Big\lVert \frac{Q^j_{S,b}}{\lVert Q^j_{S,b} \rVert_2}
                  - \frac{Q^j_{T,b}}{\lVert Q^j_{T,b} \rVert_2} \Big\rVert_2,
        \qquad Q = \operatorname{vec}(F^p_{sum}(A))

    ``student_maps[j]``, ``teacher_maps[j]``: (B, 1, H_j, W_j) (or (B, H_j, W_j)) maps from
    :func:`attention_map`; N_j = H_j·W_j → scalar.

    Paper: Zagoruyko, Komodakis, "Paying More Attention to Attention: Improving the Performance
    of Convolutional Neural Networks via Attention Transfer", ICLR 2017, arXiv 1612.03928 (eq. 2):
    :math:`\frac{\beta}{2}\sum_j \lVert\cdot\rVert_p` with p = 2, "β = 10³ divided by the number of
    elements in attention map and batch size for each layer" — that division is the
    :math:`1/(B N_j)` above, and ``beta`` is the 10³. The reference code
    (szagoruyko/attention-transfer, also RepDistiller) instead takes the *squared* difference:
    :math:`\frac{\beta}{2}\sum_j \operatorname{mean}_{b,i}\,(\hat Q_S - \hat Q_T)^2`, i.e.
    :math:`\frac{\beta}{2 B N_j}\sum_b \lVert\cdot\rVert_2^2`. It also averages over channels
    instead of summing, which the normalisation makes irrelevant.
    """
    if len(student_maps) != len(teacher_maps):
        raise ValueError(f"{len(student_maps)} student maps vs {len(teacher_maps)} teacher maps")
    if not student_maps:
        raise ValueError("at_loss needs at least one pair of attention maps")
    total = student_maps[0].new_zeros(())
    for qs, qt in zip(student_maps, teacher_maps):
        if qs.shape != qt.shape:
            raise ValueError(f"attention map shapes differ: {tuple(qs.shape)} vs {tuple(qt.shape)}")
        b = qs.shape[0]
        qs_n = F.normalize(qs.reshape(b, -1), dim=1)
        qt_n = F.normalize(qt.reshape(b, -1), dim=1)
        n = qs_n.shape[1]
        total = total + beta / (2.0 * b * n) * torch.linalg.vector_norm(qs_n - qt_n, ord=2, dim=1).sum()
    return total
