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

from distill.functional._precision import fp32

__all__ = [
    "cross_entropy",
    "token_cross_entropy",
    "smooth_targets",
    "label_smoothing_loss",
    "mixed_label_loss",
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
    return F.cross_entropy(fp32(logits), targets)


def token_cross_entropy(logits: Tensor, labels: Tensor, *, causal: bool = True, ignore_index: int = -100) -> Tensor:
    r"""Cross-entropy of a language model on its labels, averaged over the tokens that carry a label.

    .. math:: L = -\frac{1}{|\mathcal{T}|} \sum_{(b, t) \in \mathcal{T}} \log \operatorname{softmax}(z_{b,t})_{y_{b,t'}}

    Shapes: ``logits`` (B, L, V), ``labels`` (B, L) long with ``ignore_index`` (−100) where a
    position carries no loss → scalar. ``causal=True`` (decoder-only LMs, the Hugging Face
    convention of unshifted labels): the logits at ``t`` predict the label at ``t' = t + 1``;
    ``causal=False`` (seq2seq decoders, token classifiers): ``t' = t``. A batch without any
    labelled token gives 0 (still attached to the graph), not NaN.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"token cross-entropy needs logits (B, L, V) and labels (B, L), got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}")
    if causal:
        logits, labels = logits[:, :-1], labels[:, 1:]
    flat = labels.reshape(-1)
    bad = flat[(flat != ignore_index) & ((flat < 0) | (flat >= logits.shape[-1]))]
    if bad.numel():
        raise ValueError(f"labels must be token ids in [0, {logits.shape[-1]}) or {ignore_index}, got {int(bad[0])}")
    if not bool((flat != ignore_index).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(fp32(logits).reshape(-1, logits.shape[-1]), flat, ignore_index=ignore_index)


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
    log_p = F.log_softmax(fp32(logits), dim=1)
    q = smooth_targets(targets, logits.shape[1], eps, dtype=log_p.dtype).to(log_p.device)
    return -(q * log_p).sum(dim=1).mean()


def mixed_label_loss(logits: Tensor, targets: Tensor, mix_targets: Tensor, lam: Tensor, eps: float = 0.0) -> Tensor:
    r"""mixup's loss: cross-entropy against the mixed (optionally label-smoothed) targets.

    .. math::
        L = \frac{1}{B} \sum_b \lambda_b\, H(q'(y_b), p_b) + (1 - \lambda_b)\, H(q'(y'_b), p_b),
        \qquad p_b = \operatorname{softmax}(z_b)

    where :math:`H(q, p) = -\sum_k q_k \log p_k` and :math:`q'(y)` is the label-smoothed one-hot
    of :func:`label_smoothing_loss` (plain one-hot for ``eps = 0``). Cross-entropy is linear in the
    target, so this equals the cross-entropy against the paper's mixed target
    :math:`\lambda q'(y_b) + (1 - \lambda) q'(y'_b)`.

    Shapes: ``logits`` (B, K), ``targets`` (B,) the labels of the samples, ``mix_targets`` (B,)
    their partners' labels, ``lam`` (B,) each sample's weight → scalar.

    Paper: H. Zhang, M. Cisse, Y. N. Dauphin, D. Lopez-Paz, "mixup: Beyond Empirical Risk
    Minimization", ICLR 2018, arXiv 1710.09412 (a per-sample ``λ`` here, see
    :class:`distill.data.augment.Mixup`).
    """
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"label smoothing eps must be in [0, 1], got {eps}")
    b = logits.shape[0]
    if targets.shape != (b,) or mix_targets.shape != (b,) or lam.shape != (b,):
        raise ValueError(f"mixed_label_loss expects targets, mix_targets and lam of shape ({b},) for logits "
                         f"{tuple(logits.shape)}; got {tuple(targets.shape)}, {tuple(mix_targets.shape)}, "
                         f"{tuple(lam.shape)}")
    log_p = F.log_softmax(fp32(logits), dim=1)
    nll = -log_p.gather(1, torch.stack([targets, mix_targets], 1).long())  # (B, 2)
    w = lam.to(log_p.dtype)
    per_sample = w * nll[:, 0] + (1 - w) * nll[:, 1]
    if eps:  # q' = (1 - eps) one-hot + eps / K: the uniform part is the same for both labels
        per_sample = (1 - eps) * per_sample - eps * log_p.mean(dim=1)
    return per_sample.mean()


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
    log_q = F.log_softmax(fp32(student_logits) / T, dim=1)
    log_p = F.log_softmax(fp32(teacher_logits) / T, dim=1)
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
    log_q = F.log_softmax(fp32(student_logits) / T, dim=1)
    log_p = F.log_softmax(fp32(teacher_logits) / T, dim=1)
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
    (B, 1) ``noise`` for one ξ per sample. The method's defaults σ² = 0.1, α = 0.5 are KD_Lib's
    (``KD_Lib/KD/vision/noisy/noisy_teacher.py``); the paper's own values could not be read here.
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
    s, t = fp32(student_logits) / T, fp32(teacher_logits) / T
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
    y_s = F.softmax(fp32(student_logits) / T, dim=1)
    y_t = F.softmax(fp32(teacher_logits) / T, dim=1)
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
    NeurIPS 2022, arXiv 2205.10536. Defaults: the CIFAR-100 setting T = 4, β = γ = 2. ImageNet:
    T = 1 and effectively β = γ = 2 too: the authors' code builds ``DIST(beta=1, gamma=1, tau=1)``
    and multiplies it by ``kd_loss_weight: 2`` (image_classification_sota ``kd_loss.py``, DIST_KD
    ImageNet yaml; likewise their mmrazor config, ``loss_weight=2``). The paper's own text was
    not readable here, so these come from the authors' code.
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
    (szagoruyko/attention-transfer ``utils.at_loss`` with ``--beta 1e+3``, also RepDistiller
    ``-b 1000``) instead takes the *squared* difference and no ½:
    :math:`\beta\sum_j \operatorname{mean}_{b,i}\,(\hat Q_S - \hat Q_T)^2`, i.e.
    :math:`\frac{\beta}{B N_j}\sum_b \lVert\cdot\rVert_2^2`, so no constant factor relates the
    two: per sample, this loss is the code's times :math:`1/(2\lVert\hat Q_S - \hat Q_T\rVert_2)`.
    It also averages over channels instead of summing, which the normalisation makes irrelevant.

    Maps of different sizes: this function needs equal sizes. Code that pairs layers of
    different resolutions (RepDistiller, mdistiller, torchdistill) average-pools the larger
    *feature map* before building its attention map, which is what the :class:`~distill.methods.AT`
    method does by default (``pool="feature"``); pooling the attention map instead gives another
    loss, since pooling and :math:`|\cdot|^p` do not commute (numbers in the method's docstring).
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


# --------------------------------------------------------------------------------------------
# Relation methods (SP, RKD, PKT, CC) and more feature methods (NST, FSP, ICKD)
# --------------------------------------------------------------------------------------------

__all__ += [
    "sp_similarity",
    "sp_loss",
    "huber",
    "rkd_distance_potential",
    "rkd_angle_potential",
    "rkd_distance_loss",
    "rkd_angle_loss",
    "rkd_loss",
    "pkt_conditional_probabilities",
    "pkt_loss",
    "cc_kernel_matrix",
    "cc_loss",
    "nst_mmd2",
    "nst_loss",
    "fsp_matrix",
    "fsp_loss",
    "ickd_correlation",
    "ickd_loss",
]


def _rows(x: Tensor) -> Tensor:
    """``(B, ...)`` → ``(B, N)``: one flattened row per sample."""
    if x.dim() < 2:
        raise ValueError(f"expected a batch of features (B, ...), got shape {tuple(x.shape)}")
    return x.reshape(x.shape[0], -1)


def _same_batch(a: Tensor, b: Tensor, what: str) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{what}: batch sizes differ, {tuple(a.shape)} vs {tuple(b.shape)}")


def _off_diagonal(n: int, device: torch.device) -> Tensor:
    """``(n, n)`` bool mask, True off the diagonal."""
    return ~torch.eye(n, dtype=torch.bool, device=device)


def _graph_zero(*tensors: Tensor) -> Tensor:
    """A 0-d zero that stays connected to the inputs' graph (for degenerate batches)."""
    return sum(t.sum() * 0.0 for t in tensors)  # type: ignore[return-value]


def sp_similarity(feature: Tensor) -> Tensor:
    r"""SP's row-normalised batch similarity matrix.

    .. math:: \tilde G = Q Q^\top,\qquad G_{[i,:]} = \tilde G_{[i,:]} / \lVert \tilde G_{[i,:]} \rVert_2

    ``feature`` (B, ...) is flattened to Q (B, N) (N = C·H·W for maps) → (B, B). A zero row
    (a sample with an all-zero feature) stays zero.
    """
    q = _rows(feature)
    return F.normalize(q @ q.t(), p=2, dim=1)


def sp_loss(student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> Tensor:
    r"""Similarity-preserving KD loss, summed over layer pairs (l, l').

    .. math::
        L_{SP} = \frac{1}{b^2} \sum_{(l, l') \in \mathcal I}
                 \big\lVert G_T^{(l)} - G_S^{(l')} \big\rVert_F^2

    with :math:`G` from :func:`sp_similarity`. ``student_feats[j]`` / ``teacher_feats[j]``: (b, ...)
    tensors of any (possibly different) shapes sharing the batch size b → scalar. Since only
    b×b matrices are compared, no adapter is needed.

    Paper: Tung, Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019,
    arXiv 1907.09682 (eqs. 1–4; total loss L_CE + γ L_SP). RepDistiller's ``Similarity`` (verified
    by the first author) computes the same quantity on the last feature map before pooling;
    its CIFAR-100 weight is γ = 3000 (``-b 3000``), which is this loss's ``weight`` to reproduce it.
    """
    if len(student_feats) != len(teacher_feats):
        raise ValueError(f"{len(student_feats)} student features vs {len(teacher_feats)} teacher features")
    if not student_feats:
        raise ValueError("sp_loss needs at least one pair of features")
    total = student_feats[0].new_zeros(())
    for fs, ft in zip(student_feats, teacher_feats):
        _same_batch(fs, ft, "sp_loss")
        b = fs.shape[0]
        total = total + (sp_similarity(ft) - sp_similarity(fs)).pow(2).sum() / (b * b)
    return total


def huber(x: Tensor, y: Tensor, delta: float = 1.0) -> Tensor:
    r"""Element-wise Huber loss :math:`l_\delta(x, y)`:
    :math:`\tfrac12 (x - y)^2` if :math:`|x - y| \le \delta`, else :math:`\delta (|x - y| - \tfrac12 \delta)`.

    With δ = 1 this is the ``smooth_l1`` of torch (RKD's choice).
    """
    return F.huber_loss(x, y, reduction="none", delta=delta)


def rkd_distance_potential(embedding: Tensor, eps: float = 1e-12) -> Tensor:
    r"""RKD's distance-wise potential :math:`\psi_D(t_i, t_j) = \lVert t_i - t_j \rVert_2 / \mu`.

    :math:`\mu = \frac{1}{|\mathcal X^2|} \sum_{(i, j) \in \mathcal X^2} \lVert t_i - t_j \rVert_2`,
    the mean over the distinct pairs :math:`\mathcal X^2 = \{(i, j) : i \ne j\}` of the batch.
    ``embedding`` (B, ...) is flattened to (B, D) → (B, B); the diagonal is 0 and is not a
    potential (callers mask it). Squared distances are clamped at ``eps`` before the square
    root, so coincident embeddings give a finite gradient.
    """
    e = _rows(embedding)
    b = e.shape[0]
    sq = (e.unsqueeze(1) - e.unsqueeze(0)).pow(2).sum(dim=-1)
    off = _off_diagonal(b, e.device)
    d = torch.where(off, sq.clamp_min(eps).sqrt(), torch.zeros_like(sq))
    if b < 2:
        return d
    mu = d[off].mean().clamp_min(eps)
    return d / mu


def rkd_angle_potential(embedding: Tensor) -> Tensor:
    r"""RKD's angle-wise potential: the cosine of the angle at :math:`t_j` of the triangle
    :math:`(t_i, t_j, t_k)`.

    .. math::
        \psi_A(t_i, t_j, t_k) = \langle e^{ij}, e^{kj} \rangle, \qquad
        e^{ij} = \frac{t_i - t_j}{\lVert t_i - t_j \rVert_2}

    ``embedding`` (B, ...) is flattened to (B, D) → (B, B, B) indexed ``[i, j, k]``. Entries
    with i = j or k = j (a zero edge) are 0 and are not potentials (callers mask them).
    """
    e = _rows(embedding)
    edges = F.normalize(e.unsqueeze(1) - e.unsqueeze(0), p=2, dim=-1)  # [j, i] = e^{ij}, unit
    # cos[i, j, k] = <e^{ij}, e^{kj}>, a batched inner product over the vertex j
    return torch.einsum("jid,jkd->ijk", edges, edges)


def rkd_distance_loss(student: Tensor, teacher: Tensor, delta: float = 1.0) -> Tensor:
    r"""RKD-D: Huber loss between distance potentials, averaged over the distinct pairs.

    .. math::
        L_{RKD\text{-}D} = \frac{1}{|\mathcal X^2|} \sum_{(i, j) \in \mathcal X^2}
        l_\delta\big(\psi_D(t_i, t_j),\ \psi_D(s_i, s_j)\big)

    ``student`` (B, ...), ``teacher`` (B, ...) (flattened; dimensions may differ) → scalar;
    0 for B < 2. See :func:`rkd_loss` for the normalisation.
    """
    _same_batch(student, teacher, "rkd_distance_loss")
    b = student.shape[0]
    if b < 2:
        return _graph_zero(student)
    off = _off_diagonal(b, student.device)
    return huber(rkd_distance_potential(student)[off], rkd_distance_potential(teacher)[off], delta).mean()


def rkd_angle_loss(student: Tensor, teacher: Tensor, delta: float = 1.0) -> Tensor:
    r"""RKD-A: Huber loss between angle potentials, averaged over the triplets of distinct samples.

    .. math::
        L_{RKD\text{-}A} = \frac{1}{|\mathcal X^3|} \sum_{(i, j, k) \in \mathcal X^3}
        l_\delta\big(\psi_A(t_i, t_j, t_k),\ \psi_A(s_i, s_j, s_k)\big)

    :math:`\mathcal X^3 = \{(i, j, k) : i, j, k \text{ pairwise distinct}\}`. Shapes as
    :func:`rkd_distance_loss`; 0 for B < 3.
    """
    _same_batch(student, teacher, "rkd_angle_loss")
    b = student.shape[0]
    if b < 3:
        return _graph_zero(student)
    idx = torch.arange(b, device=student.device)
    i, j, k = idx.view(-1, 1, 1), idx.view(1, -1, 1), idx.view(1, 1, -1)
    distinct = (i != j) & (j != k) & (i != k)
    return huber(rkd_angle_potential(student)[distinct], rkd_angle_potential(teacher)[distinct], delta).mean()


def rkd_loss(
    student: Tensor,
    teacher: Tensor,
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
    delta: float = 1.0,
) -> Tensor:
    r"""Relational knowledge distillation: distance-wise plus angle-wise relation losses.

    .. math:: L_{RKD} = \lambda_D\, L_{RKD\text{-}D} + \lambda_A\, L_{RKD\text{-}A}

    (:func:`rkd_distance_loss`, :func:`rkd_angle_loss`, Huber with δ = 1). ``student`` (B, D_s),
    ``teacher`` (B, D_t) embeddings (e.g. the pooled features; no adapter is needed) → scalar.

    Paper: Park, Kim, Lu, Cho, "Relational Knowledge Distillation", CVPR 2019, arXiv 1904.05068.
    λ_D = 25, λ_A = 50 are the paper's image-classification weights (CIFAR-100, Tiny ImageNet;
    with λ_KD = 16 when combined with KD); its metric-learning weights are λ_D = 1, λ_A = 2.
    Normalisation: the paper writes both terms as *sums* over :math:`\mathcal X^2` and
    :math:`\mathcal X^3`; its official code (lenscloth/RKD, also RepDistiller) *averages*, and the
    paper's weights were set with that average, so this function averages too — but over the
    paper's sets of distinct pairs / triplets, where that code averages over all B² pairs and B³
    triplets, degenerate ones (i = j, j = k, i = k, contributing 0) included; the code's values
    are therefore smaller by the factors (B−1)/B (distance) and (B−1)(B−2)/B² (angle). μ is the
    mean over distinct pairs (the code: over non-zero distances). The official classification
    script also L2-normalises both embeddings before the loss; that is not part of the loss's
    definition and this function does not do it (normalise the inputs to reproduce it).
    """
    return distance_weight * rkd_distance_loss(student, teacher, delta) + angle_weight * rkd_angle_loss(
        student, teacher, delta
    )


def pkt_conditional_probabilities(feature: Tensor, eps: float = 1e-12) -> Tensor:
    r"""PKT's conditional probabilities from the cosine-similarity kernel.

    .. math::
        K(a, b) = \tfrac12 \Big(\frac{a^\top b}{\lVert a \rVert_2 \lVert b \rVert_2} + 1\Big),
        \qquad P_{[i, j]} = p_{j|i} = \frac{K(x_j, x_i)}{\sum_{k \ne i} K(x_k, x_i)}\ (j \ne i),
        \quad P_{[i, i]} = 0

    ``feature`` (B, ...) flattened to (B, D) → (B, B), each row a distribution over the other
    B − 1 samples (B ≥ 2).
    """
    u = F.normalize(_rows(feature), p=2, dim=1)
    kernel = 0.5 * (u @ u.t() + 1.0)
    kernel = kernel.masked_fill(~_off_diagonal(kernel.shape[0], kernel.device), 0.0)
    return kernel / kernel.sum(dim=1, keepdim=True).clamp_min(eps)


def pkt_loss(student: Tensor, teacher: Tensor, eps: float = 1e-12) -> Tensor:
    r"""Probabilistic knowledge transfer: KL from the teacher's to the student's conditional
    probabilities, averaged over the conditioning samples.

    .. math::
        L_{PKT} = \frac{1}{B} \sum_{i=1}^{B} \sum_{j \ne i} p_{j|i} \log \frac{p_{j|i}}{q_{j|i}}
        = \frac{1}{B} \sum_i \mathrm{KL}\big(p_{\cdot|i} \,\big\|\, q_{\cdot|i}\big)

    p from the teacher, q from the student (:func:`pkt_conditional_probabilities`). ``student``
    (B, D_s), ``teacher`` (B, D_t) → scalar (dimensions may differ: only B×B matrices are
    compared); 0 for B < 2. ``eps`` only keeps ``log q`` finite where a student similarity is
    exactly −1.

    Paper: Passalis, Tefas, "Learning Deep Representations with Probabilistic Knowledge
    Transfer", ECCV 2018, arXiv 1803.10837 ("Probabilistic Knowledge Transfer for deep
    representation learning"): the divergence is KL(P_teacher ‖ Q_student) with the cosine kernel
    above, the conditionals normalised over k ≠ i and the loss summed over i and j ≠ i. This
    function follows that, except that it divides the sum by B (a per-batch mean, like KD's
    "batchmean"; the paper's sum grows with the batch size). The authors' code
    (passalis/probabilistic_kt, copied into RepDistiller) keeps the self-similarities K(x_i, x_i)
    = 1 in the normalisation and in the KL, adds ε = 1e-7 inside the log, and takes the mean over
    all B² entries, i.e. roughly 1/B of this loss with a slightly different P; RepDistiller's
    CIFAR-100 weight is 30000.
    """
    _same_batch(student, teacher, "pkt_loss")
    b = student.shape[0]
    if b < 2:
        return _graph_zero(student)
    off = _off_diagonal(b, student.device)
    p = pkt_conditional_probabilities(teacher, eps)[off].view(b, b - 1)
    q = pkt_conditional_probabilities(student, eps)[off].view(b, b - 1)
    kl = torch.xlogy(p, p) - p * q.clamp_min(eps).log()
    return kl.sum(dim=1).mean()


_CC_KERNELS = ("gaussian", "bilinear")


def cc_kernel_matrix(feature: Tensor, gamma: float = 0.4, order: int = 2, kernel: str = "gaussian") -> Tensor:
    r"""CC's correlation matrix :math:`\psi(F) = [k(F_i, F_j)]_{i,j}` among the batch's
    L2-normalised embeddings, for one of the paper's two kernels.

    ``kernel="gaussian"`` (default): the Gaussian RBF by its order-P Taylor expansion,

    .. math::
        k(F_i, F_j) = e^{-\gamma \lVert F_i - F_j \rVert^2}
        \approx \sum_{p=0}^{P} e^{-2\gamma} \frac{(2\gamma)^p}{p!} \big(F_i^\top F_j\big)^p,
        \qquad \lVert F_i \rVert = 1

    (for unit vectors :math:`\lVert F_i - F_j \rVert^2 = 2 - 2 F_i^\top F_j`).
    ``kernel="bilinear"``: the bilinear pool :math:`k(F_i, F_j) = F_i^\top F_j` (the cosine
    similarity of the un-normalised rows; ``gamma`` and ``order`` are not used).

    ``feature`` (B, ...) flattened to (B, D) and L2-normalised per row → (B, B).
    """
    if kernel not in _CC_KERNELS:
        raise ValueError(f"CC kernel must be one of {_CC_KERNELS}, got {kernel!r}")
    if order < 0:
        raise ValueError(f"the Taylor order must be >= 0, got {order}")
    u = F.normalize(_rows(feature), p=2, dim=1)
    sim = u @ u.t()
    if kernel == "bilinear":
        return sim
    out = torch.zeros_like(sim)
    for p in range(order + 1):
        out = out + math.exp(-2.0 * gamma) * (2.0 * gamma) ** p / math.factorial(p) * sim.pow(p)
    return out


def cc_loss(
    student: Tensor, teacher: Tensor, gamma: float = 0.4, order: int = 2, kernel: str = "gaussian"
) -> Tensor:
    r"""Correlation congruence: squared distance between the two networks' correlation matrices.

    .. math:: L_{CC} = \frac{1}{n^2} \big\lVert \psi(F_t) - \psi(F_s) \big\rVert_F^2

    with ψ from :func:`cc_kernel_matrix` (``kernel`` "gaussian": the Taylor-expanded RBF with
    ``gamma``, ``order``; "bilinear": :math:`F_i^\top F_j`; both on L2-normalised rows) over the
    n samples of the batch. ``student`` (n, D_s) (the embedded student feature), ``teacher``
    (n, D_t) → scalar. The paper compares the two kernels (and the RBF's expansion order P) in
    its ablation; the bilinear pool is the simpler, the Gaussian RBF its proposal.

    Paper: Peng, Jin, Liu, Zhou, Wu, Liu, Li, Zhang, "Correlation Congruence for Knowledge
    Distillation", ICCV 2019, arXiv 1904.01802 (the full objective adds CE and KD terms, which
    are separate methods here). γ = 0.4 and P = 2 are not taken from the paper's text (not
    readable here) but from torchdistill's ILSVRC2012 CCKD config (``gamma: 0.4, max_p: 2``) and
    AberHu/Knowledge-Distillation-Zoo's ``CC`` arguments.
    RepDistiller's ``Correlation`` (code the authors sent to its maintainer) computes something
    else: no kernel and no batch correlation matrix, but the mean over consecutive sample pairs
    of :math:`\sum_d |F^s_{i,d} - F^t_{i,d}|\,|F^s_{i+1,d} - F^t_{i+1,d}|` on 128-d linear
    embeddings of *both* networks (weight 0.02 on CIFAR-100); this function follows the paper.
    """
    _same_batch(student, teacher, "cc_loss")
    n = student.shape[0]
    diff = cc_kernel_matrix(teacher, gamma, order, kernel) - cc_kernel_matrix(student, gamma, order, kernel)
    return diff.pow(2).sum() / (n * n)


def nst_mmd2(student: Tensor, teacher: Tensor, degree: int = 2, c: float = 0.0) -> Tensor:
    r"""Squared MMD between the teacher's and the student's neuron (channel) distributions, per
    sample, averaged over the batch.

    Each channel k of a (C, H, W) map is one sample :math:`f^{k\cdot} \in \mathbb R^{HW}`
    (its activations over the spatial positions), L2-normalised. With the polynomial kernel
    :math:`k(x, y) = (x^\top y + c)^d`:

    .. math::
        \mathcal L_{MMD^2} = \frac{1}{C_T^2} \sum_{i, i'} k(f_T^i, f_T^{i'})
        + \frac{1}{C_S^2} \sum_{j, j'} k(f_S^j, f_S^{j'})
        - \frac{2}{C_T C_S} \sum_{i, j} k(f_T^i, f_S^j)

    ``student`` (B, C_S, H, W), ``teacher`` (B, C_T, H, W): channel counts may differ, spatial
    sizes must agree (pool first, see the method) → scalar.
    """
    _same_batch(student, teacher, "nst_mmd2")
    if student.dim() != 4 or teacher.dim() != 4:
        raise ValueError(f"NST needs (B, C, H, W) maps, got {tuple(student.shape)} and {tuple(teacher.shape)}")
    if student.shape[2:] != teacher.shape[2:]:
        raise ValueError(f"NST needs equal spatial sizes, got {tuple(student.shape)} and {tuple(teacher.shape)}")
    fs = F.normalize(student.flatten(2), p=2, dim=2)
    ft = F.normalize(teacher.flatten(2), p=2, dim=2)

    def kernel_mean(a: Tensor, b: Tensor) -> Tensor:  # (B, Ca, N), (B, Cb, N) → (B,)
        return (torch.bmm(a, b.transpose(1, 2)) + c).pow(degree).mean(dim=(1, 2))

    return (kernel_mean(ft, ft) + kernel_mean(fs, fs) - 2.0 * kernel_mean(fs, ft)).mean()


def nst_loss(
    student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor], degree: int = 2, c: float = 0.0
) -> Tensor:
    r"""Neuron selectivity transfer: :func:`nst_mmd2` summed over layer pairs.

    .. math:: L = \sum_j \mathcal L_{MMD^2}(F_T^{(j)}, F_S^{(j)})

    Paper: Huang, Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer",
    2017, arXiv 1707.01219: total loss :math:`H(y, p_S) + \frac{\lambda}{2} \mathcal L_{MMD^2}`,
    polynomial kernel with d = 2, c = 0 (the paper's choice; linear and Gaussian kernels are
    its alternatives), so the method's ``weight`` is λ/2. RepDistiller's ``NSTLoss`` computes
    the same MMD² (d = 2, c = 0, means over channel pairs) on every stage output, average-pooling
    the larger map to the smaller, and weights the sum by 50 on CIFAR-100 (i.e. λ/2 = 50 here).
    """
    if len(student_feats) != len(teacher_feats):
        raise ValueError(f"{len(student_feats)} student features vs {len(teacher_feats)} teacher features")
    if not student_feats:
        raise ValueError("nst_loss needs at least one pair of feature maps")
    total = student_feats[0].new_zeros(())
    for fs, ft in zip(student_feats, teacher_feats):
        total = total + nst_mmd2(fs, ft, degree, c)
    return total


def fsp_matrix(first: Tensor, second: Tensor) -> Tensor:
    r"""The FSP ("flow of solution procedure") matrix between two feature maps of one network.

    .. math:: G_{i,j}(x) = \sum_{s=1}^{h} \sum_{t=1}^{w} \frac{F^1_{s,t,i}(x)\, F^2_{s,t,j}(x)}{h \times w}

    ``first`` (B, C1, h, w), ``second`` (B, C2, h, w) → (B, C1, C2). The two maps must have the
    same spatial size (the paper pairs layers of equal resolution).
    """
    if first.dim() != 4 or second.dim() != 4:
        raise ValueError(f"FSP needs (B, C, H, W) maps, got {tuple(first.shape)} and {tuple(second.shape)}")
    _same_batch(first, second, "fsp_matrix")
    if first.shape[2:] != second.shape[2:]:
        raise ValueError(f"FSP needs equal spatial sizes, got {tuple(first.shape)} and {tuple(second.shape)}")
    h, w = first.shape[2:]
    return torch.einsum("bihw,bjhw->bij", first, second) / (h * w)


def fsp_loss(
    student_mats: Sequence[Tensor], teacher_mats: Sequence[Tensor], lambdas: Sequence[float] | None = None
) -> Tensor:
    r"""FSP loss: weighted squared Frobenius distance between FSP matrices, mean over the batch.

    .. math::
        L_{FSP} = \frac{1}{N} \sum_x \sum_{i=1}^{n} \lambda_i
        \big\lVert G_i^T(x; W_t) - G_i^S(x; W_s) \big\rVert_2^2

    ``student_mats[i]``, ``teacher_mats[i]``: (B, C1, C2) from :func:`fsp_matrix` (equal shapes);
    ``lambdas`` (default all 1: the paper gives every pair the same weight) → scalar.

    Paper: Yim, Joo, Bae, Kim, "A Gift from Knowledge Distillation: Fast Optimization, Network
    Minimization and Transfer Learning", CVPR 2017 (eq. 2). The paper trains in two stages: the
    student first minimises this loss alone (to initialise its weights), then trains on the
    main task without it. RepDistiller's ``FSP`` takes the mean over the B·C1·C2 entries of each
    pair instead of the per-sample sum (i.e. this divided by C1·C2), requires equal channel
    counts, and trains its stage 1 on the plain sum over pairs (its ``-b 50`` multiplies a zero
    FSP term in stage 2): ``lambdas`` 1/(C1·C2) reproduce it (docs/methods.md).
    """
    if len(student_mats) != len(teacher_mats):
        raise ValueError(f"{len(student_mats)} student FSP matrices vs {len(teacher_mats)} teacher ones")
    if not student_mats:
        raise ValueError("fsp_loss needs at least one pair of FSP matrices")
    weights = [1.0] * len(student_mats) if lambdas is None else [float(v) for v in lambdas]
    if len(weights) != len(student_mats):
        raise ValueError(f"{len(weights)} lambdas for {len(student_mats)} FSP pairs")
    total = student_mats[0].new_zeros(())
    for lam, gs, gt in zip(weights, student_mats, teacher_mats):
        if gs.shape != gt.shape:
            raise ValueError(f"FSP matrix shapes differ: {tuple(gs.shape)} vs {tuple(gt.shape)}")
        total = total + lam * (gt - gs).pow(2).sum(dim=(1, 2)).mean()
    return total


def ickd_correlation(feature: Tensor) -> Tensor:
    r"""ICKD's inter-channel correlation matrix, row-normalised.

    .. math::
        \tilde G_{m,n} = v(F_m)^\top v(F_n),\qquad
        G_{[m,:]} = \tilde G_{[m,:]} / \lVert \tilde G_{[m,:]} \rVert_2

    v(F_m) the vectorised (h·w) map of channel m. ``feature`` (B, C, H, W) → (B, C, C).
    """
    if feature.dim() != 4:
        raise ValueError(f"ICKD needs (B, C, H, W) maps, got shape {tuple(feature.shape)}")
    v = feature.flatten(2)
    return F.normalize(torch.bmm(v, v.transpose(1, 2)), p=2, dim=2)


def ickd_loss(student: Tensor, teacher: Tensor) -> Tensor:
    r"""Inter-channel correlation KD loss.

    .. math::
        L_{ICC} = \frac{1}{B} \sum_b \frac{1}{c^2} \sum_{m=1}^{c} \sum_{n=1}^{c}
        \big(G^{T}_{m,n} - G^{S}_{m,n}\big)^2

    with G from :func:`ickd_correlation`. ``student`` (B, c, H_s, W_s) (already mapped to the
    teacher's c channels by the method's 1x1 conv + BN adapter), ``teacher`` (B, c, H_t, W_t)
    (spatial sizes may differ: only c×c matrices are compared) → scalar.

    Paper: Liu, Huang, Lin, Xie, Wang, Chang, Liang, "Exploring Inter-Channel Correlation for
    Diversity-preserved Knowledge Distillation", ICCV 2021, arXiv 2202.03680 (the 1/c² mean over
    the c×c entries; the paper's grid-level variant for dense prediction, which splits large maps
    into cells first, is :func:`distill.functional.ickd_grid.ickd_grid_loss`). The official code (ADLab-AutoDrive/ICKD,
    ``ICKDLoss``) row-normalises G as here but divides the batch sum by c·B instead of c²·B,
    i.e. its loss is c times this one, with weight β = 2.5 on CIFAR-100 (weight 2.5·c here to
    reproduce its scale).
    """
    _same_batch(student, teacher, "ickd_loss")
    if student.shape[1] != teacher.shape[1]:
        raise ValueError(
            f"ICKD compares c×c matrices: channel counts differ, {tuple(student.shape)} vs {tuple(teacher.shape)}"
        )
    c = teacher.shape[1]
    return (ickd_correlation(teacher) - ickd_correlation(student)).pow(2).sum(dim=(1, 2)).mean() / (c * c)
