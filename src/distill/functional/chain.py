"""The math of chains, generations and the EMA teacher: mean teacher's EMA decay, ramp-up and
consistency cost; born-again networks' CWTM and DKPP objectives; Pro-KD's temperature schedule.

Papers:

* A. Tarvainen, H. Valpola, "Mean teachers are better role models: Weight-averaged consistency
  targets improve semi-supervised deep learning results", NeurIPS 2017, arXiv 1703.01780
  (reference code: github.com/CuriousAI/mean-teacher, TensorFlow and PyTorch versions).
* T. Furlanello, Z. Lipton, M. Tschannen, L. Itti, A. Anandkumar, "Born-Again Neural Networks",
  ICML 2018, arXiv 1805.04770 (Section 3.2: CWTM and DKPP).
* M. Rezagholizadeh, A. Jafari, P. Salad, P. Sharma, A. S. Pasand, A. Ghodsi, "Pro-KD: Progressive
  Distillation by Following the Footsteps of the Teacher", COLING 2022, arXiv 2110.08532.

Shapes: logits ``(B, K)``, labels ``(B,)`` (``-1`` marks an unlabeled sample where a function says
so). Nothing here detaches the teacher: callers pass detached teacher tensors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.functional._precision import fp32
from distill.functional.core import kd_loss

__all__ = [
    "annealed_temperature",
    "cwtm_loss",
    "cwtm_weights",
    "dkpp_loss",
    "dkpp_permute",
    "ema_decay_at",
    "masked_cross_entropy",
    "sigmoid_rampup",
    "softmax_mse_loss",
]


def _check_logits(x: Tensor, who: str) -> None:
    if x.dim() != 2:
        raise ValueError(f"{who} must be (B, K) logits, got shape {tuple(x.shape)}")


def _check_pair(student_logits: Tensor, teacher_logits: Tensor) -> None:
    _check_logits(student_logits, "student_logits")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits {tuple(teacher_logits.shape)} and student_logits {tuple(student_logits.shape)} "
            "must have the same (B, K) shape"
        )


# --------------------------------------------------------------------------------------------
# Mean teacher
# --------------------------------------------------------------------------------------------


def ema_decay_at(step: int, decay: float) -> float:
    r"""The EMA decay of the mean teacher's ``step``-th update (1-based): :math:`\min(1 - 1/(t+1), \alpha)`.

    The teacher's weights follow :math:`\theta'_t = \alpha_t \theta'_{t-1} + (1 - \alpha_t)\theta_t`
    (Eq. 1's weight average, Section 2). Capping :math:`\alpha_t` by :math:`1 - 1/(t+1)` makes the
    first updates the plain mean of the weights seen so far (the reference PyTorch code's
    ``update_ema_variables``: "use the true average until the exponential average is more correct"):
    update 1 averages :math:`\theta_0` and :math:`\theta_1` equally.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step must be an int >= 1 (the number of the update), got {step!r}")
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    return min(1.0 - 1.0 / (step + 1), float(decay))


def sigmoid_rampup(current: float, length: float) -> float:
    r"""Sigmoid-shaped ramp from ~0 to 1: :math:`\exp(-5 (1 - x)^2)`, :math:`x = \mathrm{clip}(current / length, 0, 1)`.

    The mean teacher's consistency-cost ramp-up (Appendix B of the paper, taken from Laine & Aila,
    "Temporal Ensembling for Semi-Supervised Learning", ICLR 2017, arXiv 1610.02242). ``length = 0``
    means no ramp (1.0). At ``current = 0`` the value is :math:`e^{-5} \approx 0.0067`, not 0.
    """
    if not math.isfinite(length) or length < 0:
        raise ValueError(f"ramp-up length must be a finite number >= 0, got {length}")
    if length == 0:
        return 1.0
    x = min(max(float(current), 0.0), float(length)) / float(length)
    return math.exp(-5.0 * (1.0 - x) ** 2)


def softmax_mse_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    r"""Mean teacher's consistency cost: squared error between the two softmaxes, mean over classes and samples.

    .. math:: J = \frac{1}{B K} \sum_b \lVert \operatorname{softmax}(s_b) - \operatorname{softmax}(t_b) \rVert^2

    Shapes: (B, K), (B, K) → scalar. Gradient flows into both arguments; the caller detaches the
    teacher (the paper's teacher receives no gradient).

    The paper writes the cost as :math:`\lVert f(x,\theta',\eta') - f(x,\theta,\eta) \rVert^2` and
    calls it "mean squared error"; both reference implementations (TensorFlow ``consistency_costs``:
    ``reduce_mean`` over classes; PyTorch ``softmax_mse_loss``: sum divided by the number of classes)
    average over the K classes, and the paper's cost coefficients (e.g. 100 on CIFAR-10 and SVHN) were
    tuned with that mean. It is taken here so those coefficients keep their meaning; the sum over
    classes is this value times K.
    """
    _check_pair(student_logits, teacher_logits)
    diff = F.softmax(fp32(student_logits), dim=1) - F.softmax(fp32(teacher_logits), dim=1)
    return diff.pow(2).mean()


def masked_cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int = -1) -> Tensor:
    r"""Cross-entropy on the labeled samples, divided by the *whole* batch size.

    .. math:: L = \frac{1}{B} \sum_{b:\, y_b \neq -1} -\log \operatorname{softmax}(z_b)_{y_b}

    Shapes: ``logits`` (B, K), ``targets`` (B,) with ``ignore_index`` (-1) marking unlabeled samples →
    scalar; 0 when no sample is labeled. Dividing by B rather than by the number of labeled samples
    is what both mean-teacher reference implementations do (the classification cost is a mean over
    the mixed labeled/unlabeled mini-batch), so the balance with the consistency cost does not change
    with the fraction of labels in a batch.
    """
    _check_logits(logits, "logits")
    if targets.shape != logits.shape[:1]:
        raise ValueError(f"targets must be (B,) = ({logits.shape[0]},), got shape {tuple(targets.shape)}")
    labeled = targets != ignore_index
    bad = targets[labeled & ((targets < 0) | (targets >= logits.shape[1]))]
    if bad.numel():
        raise ValueError(
            f"labels {bad.unique()[:10].tolist()} are out of range: a label must lie in [0, {logits.shape[1] - 1}] "
            f"or be {ignore_index} (unlabeled)"
        )
    return F.cross_entropy(logits, targets.long(), ignore_index=ignore_index, reduction="sum") / logits.shape[0]


# --------------------------------------------------------------------------------------------
# Born-again networks: the two objectives of Section 3.2
# --------------------------------------------------------------------------------------------


def cwtm_weights(teacher_logits: Tensor) -> Tensor:
    r"""CWTM sample weights: the teacher's top probability, normalised over the batch, shape ``(B,)``.

    .. math:: w_s = \frac{\max_k p_{k,s}}{\sum_{u=1}^{B} \max_k p_{k,u}}, \qquad p_{\cdot,s} = \operatorname{softmax}(t_s)

    The weights sum to 1 (BAN, Section 3.2, "Confidence-Weighted by Teacher Max").
    """
    _check_logits(teacher_logits, "teacher_logits")
    top = F.softmax(fp32(teacher_logits), dim=1).amax(dim=1)
    return top / top.sum()


def cwtm_loss(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor) -> Tensor:
    r"""Confidence-Weighted by Teacher Max: the ground-truth cross-entropy of each sample weighted by
    the teacher's normalised confidence (BAN, Section 3.2).

    .. math:: L = \sum_{s=1}^{B} w_s \left(-\log q_{y_s, s}\right), \qquad w = \text{cwtm\_weights}(t)

    Its gradient w.r.t. the student's logit of the true class is the paper's
    :math:`\sum_s w_s (q_{*,s} - y_{*,s})`: the importance weighting that KD applies to the
    ground-truth term, with the teacher's dark knowledge (its non-argmax outputs) removed.
    Shapes: (B, K), (B, K), (B,) → scalar. The weights come from the teacher only.
    """
    _check_pair(student_logits, teacher_logits)
    ce = F.cross_entropy(student_logits, targets.long(), reduction="none")
    return (cwtm_weights(teacher_logits) * ce).sum()


def dkpp_permute(teacher_logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    r"""DKPP's teacher: each row's non-argmax entries randomly permuted, the argmax kept in place.

    ``(B, K) → (B, K)``; an independent permutation per row. Softmax commutes with permuting the
    entries, so permuting the logits permutes the teacher's probabilities: the result's softmax is
    :math:`p_{*}` at the teacher's argmax and :math:`\phi(p_j)` elsewhere (BAN, Section 3.2,
    "Dark Knowledge with Permuted Predictions"): the dark knowledge keeps its values (so every
    permutation-invariant moment of the distribution) but loses which class each value belongs to.
    """
    _check_logits(teacher_logits, "teacher_logits")
    b, k = teacher_logits.shape
    top = teacher_logits.argmax(dim=1)
    # random keys for every entry, the argmax's forced to sort first: the argmax stays in the first
    # slot of the order, the others come in a uniformly random order
    keys = torch.rand(b, k, generator=generator, device="cpu").to(teacher_logits.device)
    keys[torch.arange(b, device=keys.device), top] = -1.0
    others = keys.argsort(dim=1)[:, 1:]  # (B, K-1): the non-argmax positions, shuffled
    sources = torch.sort(others, dim=1).values  # the same positions in increasing order
    out = teacher_logits.clone()
    out.scatter_(1, sources, teacher_logits.gather(1, others))
    return out


def dkpp_loss(student_logits: Tensor, teacher_logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    r"""Dark Knowledge with Permuted Predictions: KD at T = 1 towards :func:`dkpp_permute`'s teacher.

    .. math:: L = \frac{1}{B} \sum_s \mathrm{KL}\big(\tilde p_s \,\|\, q_s\big), \qquad
        \tilde p_s = \operatorname{softmax}(\mathrm{perm}_s(t_s))

    The KL differs from the paper's cross-entropy by the (permutation-invariant) teacher entropy,
    a constant w.r.t. the student: same gradients. Shapes: (B, K), (B, K) → scalar.
    """
    _check_pair(student_logits, teacher_logits)
    return kd_loss(student_logits, dkpp_permute(teacher_logits, generator), T=1.0)


# --------------------------------------------------------------------------------------------
# Pro-KD
# --------------------------------------------------------------------------------------------


def annealed_temperature(epoch: int, epochs: int, t_max: float, t_min: float = 1.0) -> float:
    r"""A temperature annealed linearly from ``t_max`` (epoch 0) to ``t_min`` (the last epoch).

    .. math:: T_e = T_{max} + (T_{min} - T_{max}) \frac{e}{E - 1}

    Pro-KD's student (:func:`~distill.strategies.chain.pro_kd`) softens the early, immature
    teachers' targets with a high temperature and brings it down to ``t_min`` as it reaches the
    final teacher; the linear fall and its end points are this library's choice (only the Pro-KD
    abstract was readable). It is not the annealing of Jafari et al., "Annealing Knowledge
    Distillation" (EACL 2021, arXiv 2104.07163), whose code fits the teacher's logits scaled by
    ``T / T_max`` with a squared error while ``T`` rises from 1 to ``T_max``. One epoch (``E = 1``)
    gives ``t_min``.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    if not 0 <= epoch < epochs:
        raise ValueError(f"epoch must lie in [0, {epochs - 1}], got {epoch}")
    if not (math.isfinite(t_max) and math.isfinite(t_min)) or t_min <= 0 or t_max < t_min:
        raise ValueError(f"temperatures must satisfy 0 < t_min <= t_max (finite), got t_min={t_min}, t_max={t_max}")
    if epochs == 1:
        return float(t_min)
    return float(t_max + (t_min - t_max) * epoch / (epochs - 1))
