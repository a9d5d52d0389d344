r"""Exclusivity-Consistency regularised knowledge distillation for face recognition (EC-KD).

Wang, Fu, Liao, Wang, Lei, Mei, "Exclusivity-Consistency Regularized Knowledge Distillation for Face
Recognition", ECCV 2020 (LNCS 12369, pp. 325-342, DOI 10.1007/978-3-030-58586-0_20; no arXiv version found).

What could be read: the abstract and the paper's first page, and a secondary summary (a paper note), not the
method section. The summary's reading, which we implement:

* **position-aware weight exclusivity** (:func:`weight_exclusivity`): the filters of one layer should be
  diverse in *where* they are non-zero: the exclusivity of two filters is :math:`\lVert w_i \odot w_j
  \rVert_0` (the number of positions where both are non-zero), relaxed to :math:`\lVert w_i \odot w_j
  \rVert_1`, as in the same group's "Exclusivity-Consistency Regularized Multi-view Subspace Clustering"
  (CVPR 2017); summed over the pairs of filters of a layer. The summary contrasts it with value-aware
  regularisers (orthogonality, hyperspherical energy).
* **hardness-aware feature consistency** (:func:`hardness_aware_consistency`): the student's face embedding
  matches the teacher's, each sample weighted by how far the student's embedding is from the teacher's
  (harder samples weigh more).

Ours (the exact forms could not be read; each is a parameter): each filter is scaled to unit
:math:`\ell_2` norm before the penalty (``normalize``), so the penalty cannot be met by shrinking all weights
(the paper's layers are followed by BatchNorm, which would undo such shrinking anyway); the average over
ordered pairs (``reduction="mean"``); the distance (squared Euclidean distance of the L2-normalised
embeddings, :math:`2 - 2\cos`); the hardness weight (a softmax of the distances at inverse temperature
``hardness``, rescaled to mean 1 and detached).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["hardness_aware_consistency", "weight_exclusivity"]

_REDUCTIONS = ("sum", "mean")


def weight_exclusivity(weight: Tensor, *, normalize: bool = True, reduction: str = "mean",
                       eps: float = 1e-12) -> Tensor:
    r"""Position-aware exclusivity of the filters of one layer.

    With the weight flattened to ``N`` filters :math:`w_i \in \mathbb{R}^D` (``weight[i].flatten()``) and
    :math:`\hat w_i = w_i / \lVert w_i \rVert_2` when ``normalize`` (else :math:`\hat w_i = w_i`),

    .. math::
        E(W) = \sum_{i \ne j} \lVert \hat w_i \odot \hat w_j \rVert_1
             = \sum_k \Big(\sum_i \lvert \hat w_{ik} \rvert\Big)^2 - \sum_i \sum_k \hat w_{ik}^2,

    the second form computed here in :math:`O(ND)` instead of the :math:`O(N^2 D)` pair loop (each unordered
    pair is counted twice). ``reduction="mean"`` divides by the :math:`N(N-1)` ordered pairs; then
    :math:`0 \le E \le 1` for normalised filters (Cauchy-Schwarz), whatever the layer's size.

    Args:
        weight: ``(N, ...)`` a conv ``(C_out, C_in/groups, kh, kw)`` or linear ``(out, in)`` weight; ``N >= 2``.
        normalize: scale each filter to unit L2 norm first (ours; see the module docstring).
        reduction: ``"sum"`` (over ordered pairs) or ``"mean"`` (per ordered pair).
        eps: floor of a filter's norm (an all-zero filter stays zero).
    Returns:
        a scalar, >= 0.
    """
    if not isinstance(weight, Tensor) or weight.dim() < 2:
        raise ValueError("weight_exclusivity needs a weight tensor (N, ...) of N filters (at least 2 dims); got "
                         f"{tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__}")
    if weight.shape[0] < 2 or weight[0].numel() == 0:
        raise ValueError(f"weight_exclusivity needs at least 2 non-empty filters; got weight {tuple(weight.shape)}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}; got {reduction!r}")
    w = weight.flatten(1)
    if normalize:
        w = w / w.norm(dim=1, keepdim=True).clamp_min(eps)
    a = w.abs()
    # sum over ordered pairs i != j of sum_k |w_ik||w_jk| = sum_k (sum_i |w_ik|)^2 - the i == j terms
    e = (a.sum(0).pow(2).sum() - a.pow(2).sum()).clamp_min(0.0)  # clamp: rounding only, the value is >= 0
    if reduction == "mean":
        n = w.shape[0]
        e = e / (n * (n - 1))
    return e


def hardness_aware_consistency(student: Tensor, teacher: Tensor, *, hardness: float = 1.0, normalize: bool = True,
                               detach_weights: bool = True) -> Tensor:
    r"""Hardness-aware feature consistency: the student's embeddings match the teacher's, harder samples
    weighing more.

    .. math::
        d_b = \lVert \hat s_b - \hat t_b \rVert_2^2, \qquad
        \omega_b = B \, \frac{\exp(\gamma d_b)}{\sum_{b'} \exp(\gamma d_{b'})}, \qquad
        L = \frac{1}{B} \sum_b \omega_b \, d_b

    with :math:`\hat x = x / \lVert x \rVert_2` when ``normalize`` (then :math:`d_b = 2 - 2\cos(s_b, t_b)`,
    in [0, 4]), else the raw features. :math:`\gamma` = ``hardness``: 0 gives plain feature consistency
    (the mean of :math:`d_b`); larger values put more weight on the samples the student matches worst. The
    weights are rescaled to mean 1 and (``detach_weights``) carry no gradient, so they only re-weight the
    samples. The form of :math:`\omega` is ours (see the module docstring).

    Args:
        student: ``(B, D)`` the student's embeddings.
        teacher: ``(B, D)`` the teacher's embeddings (detached here).
        hardness: :math:`\gamma \ge 0`.
    Returns:
        a scalar, >= 0; zero when the embeddings agree (in direction, when ``normalize``).
    """
    if student.dim() != 2 or student.shape != teacher.shape or student.shape[0] == 0:
        raise ValueError(f"student and teacher embeddings must both be (B, D) with B >= 1 and one shape; got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    hardness = float(hardness)
    if not hardness >= 0 or hardness == float("inf"):
        raise ValueError(f"hardness must be a finite number >= 0; got {hardness}")
    t = teacher.detach()
    if normalize:
        student, t = F.normalize(student, dim=1), F.normalize(t, dim=1)
    d = (student - t).pow(2).sum(1)
    w = torch.softmax(hardness * (d.detach() if detach_weights else d), dim=0)  # sums to 1: (1/B) * B * softmax
    return (w * d).sum()
