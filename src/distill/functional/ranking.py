"""Instance-graph and ranking losses: IRG (vertices, edges, transformation) and DarkRank (listwise).

Both compare how the samples of a batch relate to each other, as the relation losses of
:mod:`distill.functional.core` do: IRG through Euclidean distance matrices between instances
(and the distance an instance travels between two layers), DarkRank through the ranking of the
other samples by a distance-based similarity score around each anchor.

Conventions: features ``(B, ...)`` are flattened to ``(B, D)``; student and teacher may have
different feature sizes (only B×B matrices, (B,) vectors or rankings are compared). Nothing here
detaches the teacher: callers pass detached teacher tensors.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "irg_edge_matrix",
    "irg_vertex_loss",
    "irg_edge_loss",
    "irg_match_layers",
    "irg_transformation",
    "irg_transformation_loss",
    "irg_loss",
    "darkrank_scores",
    "darkrank_teacher_ranking",
    "listmle_log_prob",
    "darkrank_hard_loss",
    "darkrank_soft_loss",
]


def _rows(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1)


def _same_batch(a: Tensor, b: Tensor, what: str) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{what}: batch sizes differ, {tuple(a.shape)} vs {tuple(b.shape)}")


def _pairwise_sq(e: Tensor) -> Tensor:
    """``(B, D)`` → ``(B, B)`` squared Euclidean distances (Gram form, clamped at 0)."""
    sq = e.pow(2).sum(dim=1)
    return (sq.unsqueeze(0) + sq.unsqueeze(1) - 2.0 * (e @ e.t())).clamp_min(0.0)


# --------------------------------------------------------------------------------------------
# IRG
# --------------------------------------------------------------------------------------------


def irg_edge_matrix(feature: Tensor, squared: bool = True, normalize: bool = True, eps: float = 1e-12) -> Tensor:
    r"""IRG edge matrix of one layer: Euclidean distances between the instances of the batch.

    .. math:: A_{ij} = \lVert f_i - f_j \rVert_2^2, \qquad A_{ii} = 0,
              \qquad \tilde A = A / \max_{k,l} A_{kl}\ \ (\texttt{normalize})

    ``feature`` (B, ...) flattened to (B, D) → (B, B). Squared distances divided by their
    maximum are what the authors' Caffe code computes (yufanLIU/IRG
    ``batch_euclidean_map_layer.cpp``; AberHu/Knowledge-Distillation-Zoo squares too);
    ``squared=False`` uses the distance itself. The paper's text could not be read here.
    ``normalize`` divides by the largest entry so that student and teacher matrices are on the
    same scale (the maximum is clamped at ``eps``). Squared distances are clamped at ``eps``
    (before the square root when ``squared=False``) and the diagonal is set to 0 exactly, so
    coincident instances give finite gradients.
    """
    e = _rows(feature)
    b = e.shape[0]
    sq = _pairwise_sq(e)
    off = ~torch.eye(b, dtype=torch.bool, device=e.device)
    d = sq.clamp_min(eps) if squared else sq.clamp_min(eps).sqrt()
    d = torch.where(off, d, torch.zeros_like(d))
    if normalize:
        d = d / d.max().clamp_min(eps)
    return d


def irg_vertex_loss(student: Tensor, teacher: Tensor) -> Tensor:
    r"""IRG vertex loss: squared error between the instances' vertices (features or logits).

    .. math:: L_V = \frac{1}{B\,D} \sum_{i=1}^{B} \lVert v^T_i - v^S_i \rVert_2^2

    ``student``, ``teacher`` (B, ...) of equal shape → scalar. The paper places the vertex term
    on the logits (:math:`L_{logits}`) and writes a plain sum of squared norms; this averages
    over the B·D entries (``F.mse_loss``, as the reference code; the λ defaults were set with it).
    """
    if student.shape != teacher.shape:
        raise ValueError(f"irg_vertex_loss needs equal shapes: student {tuple(student.shape)}, "
                         f"teacher {tuple(teacher.shape)}")
    return (student - teacher).pow(2).mean()


def irg_edge_loss(
    student_feats: Sequence[Tensor],
    teacher_feats: Sequence[Tensor],
    squared: bool = True,
    normalize: bool = True,
) -> Tensor:
    r"""IRG (multi-layer) edge loss, summed over the layer pairs.

    .. math:: L_E = \sum_{l} \frac{1}{B^2} \big\lVert A^{T}_{l} - A^{S}_{l} \big\rVert_F^2

    with :math:`A` from :func:`irg_edge_matrix`. Features of any sizes sharing B → scalar.
    Summed over the layers (the multi-layer edge term :math:`L_{MTE}`;
    AberHu/Knowledge-Distillation-Zoo averages over its three layers). The authors' Caffe
    code compares one layer (the pooled feature) with Caffe's ``EuclideanLoss``,
    :math:`\frac{1}{2B}\sum_{ij}(\cdot)^2 = \frac{B}{2}` × this per-entry mean.
    """
    if len(student_feats) != len(teacher_feats):
        raise ValueError(f"{len(student_feats)} student features vs {len(teacher_feats)} teacher features")
    if not student_feats:
        raise ValueError("irg_edge_loss needs at least one pair of features")
    total = student_feats[0].new_zeros(())
    for fs, ft in zip(student_feats, teacher_feats):
        _same_batch(fs, ft, "irg_edge_loss")
        a_s = irg_edge_matrix(fs, squared, normalize)
        a_t = irg_edge_matrix(ft, squared, normalize)
        total = total + (a_t - a_s).pow(2).mean()
    return total


def irg_match_layers(first: Tensor, second: Tensor) -> tuple[Tensor, Tensor]:
    r"""Bring the features of two layers of one network to one shape, for the IRG transformation.

    * A (B, C, H, W) map against a (B, D) vector: the map is globally average-pooled.
    * Two maps of different resolutions: the larger is adaptively average-pooled to the smaller.
    * Different channel counts C_a = k · C_b: consecutive groups of k channels of the wider one
      are averaged (the reference code averages channel pairs, k = 2).

    Anything else raises ``ValueError``.
    """
    a, b = first, second
    if a.dim() == 4 and b.dim() == 2:
        a = a.mean(dim=(2, 3))
    elif a.dim() == 2 and b.dim() == 4:
        b = b.mean(dim=(2, 3))
    elif a.dim() == 4 and b.dim() == 4:
        if a.shape[2:] != b.shape[2:]:
            if a.shape[2] * a.shape[3] >= b.shape[2] * b.shape[3]:
                a = F.adaptive_avg_pool2d(a, b.shape[2:])
            else:
                b = F.adaptive_avg_pool2d(b, a.shape[2:])
    elif a.dim() != b.dim():
        raise ValueError(f"IRG transformation cannot match features of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    ca, cb = a.shape[1], b.shape[1]
    if ca != cb:
        big, small = (a, cb) if ca > cb else (b, ca)
        if big.shape[1] % small:
            raise ValueError(
                f"IRG transformation needs channel counts that divide each other, got {ca} and {cb}"
            )
        k = big.shape[1] // small
        pooled = big.reshape(big.shape[0], small, k, *big.shape[2:]).mean(dim=2)
        a, b = (pooled, b) if ca > cb else (a, pooled)
    return a, b


def irg_transformation(
    first: Tensor, second: Tensor, squared: bool = True, normalize: bool = True, eps: float = 1e-12
) -> Tensor:
    r"""IRG vertex transformation between two layers l1 < l2 of one network.

    .. math:: \Lambda_{l_1, l_2}(i, i) = \lVert f^{l_1}_i - f^{l_2}_i \rVert_2^2,
              \qquad \tilde\Lambda = \Lambda / \max_k \Lambda(k, k)\ \ (\texttt{normalize})

    The diagonal of the paper's Λ as a (B,) vector, after :func:`irg_match_layers`; squared and
    max-normalised as in the authors' Caffe code (``batch_euclidean_vector_layer.cpp``, on
    globally average-pooled features of two layers), ``squared=False`` for the distance. Only
    the vertex transformation is used, as in the paper's loss (and the reference code); the edge
    transformation (change of the edge matrices) is not part of it.
    """
    _same_batch(first, second, "irg_transformation")
    a, b = irg_match_layers(first, second)
    sq = (_rows(a) - _rows(b)).pow(2).sum(dim=1).clamp_min(eps)
    d = sq if squared else sq.sqrt()
    if normalize:
        d = d / d.max().clamp_min(eps)
    return d


def irg_transformation_loss(
    student_pair: tuple[Tensor, Tensor],
    teacher_pair: tuple[Tensor, Tensor],
    squared: bool = True,
    normalize: bool = True,
) -> Tensor:
    r"""IRG transformation loss :math:`L_{Tran} = \frac1B \lVert \Lambda^T_{l_1,l_2} - \Lambda^S_{l_1,l_2} \rVert_2^2`.

    Each pair is (earlier layer, later layer) of one network (:func:`irg_transformation`). The
    authors' Caffe ``EuclideanLoss`` on the (1, B) vector is :math:`\frac12\sum_i(\cdot)^2`, i.e.
    B/2 × this mean.
    """
    ls = irg_transformation(*student_pair, squared=squared, normalize=normalize)
    lt = irg_transformation(*teacher_pair, squared=squared, normalize=normalize)
    _same_batch(ls, lt, "irg_transformation_loss")
    return (lt - ls).pow(2).mean()


def irg_loss(
    student_vertex: Tensor | None,
    teacher_vertex: Tensor | None,
    student_feats: Sequence[Tensor],
    teacher_feats: Sequence[Tensor],
    student_transform: tuple[Tensor, Tensor] | None = None,
    teacher_transform: tuple[Tensor, Tensor] | None = None,
    vertex_weight: float = 0.1,
    edge_weight: float = 5.0,
    transformation_weight: float = 5.0,
    squared: bool = True,
    normalize: bool = True,
) -> Tensor:
    r"""Instance relationship graph distillation (without the ground-truth term).

    .. math:: L_{IRG} = \lambda_1 L_V + \lambda_2 L_E + \lambda_3 L_{Tran}

    :func:`irg_vertex_loss` on ``(student_vertex, teacher_vertex)`` (skipped when None),
    :func:`irg_edge_loss` on the feature lists (may be empty), :func:`irg_transformation_loss`
    on the layer pairs (skipped when None).

    λ defaults 0.1 / 5 / 5: the paper's λ1, λ2, λ3 could not be read here (CVPR 2019 open-access
    text, no arXiv version); they are AberHu/Knowledge-Distillation-Zoo's ``--w_irg_vert 0.1
    --w_irg_edge 5.0 --w_irg_tran 5.0`` for these per-entry means. The authors' released Caffe
    prototxts (yufanLIU/IRG ``IRG.prototxt``, ``IRG_Transformation.prototxt``: CIFAR-10,
    ResNet-20 → ResNet-20×0.5, batch 64) have no vertex term and put ``loss_weight: 0.005`` on
    each edge / transformation ``EuclideanLoss`` (½·Σ/num): that is λ = 0.005·B/2 (0.16 at
    B = 64) on the means here.

    Paper: Liu, Cao, Li, Yuan, Hu, Li, Duan, "Knowledge Distillation via Instance Relationship
    Graph", CVPR 2019 (no arXiv version). Squared, max-normalised distances as in the authors'
    code (``squared=False`` for plain distances); the edge term is summed (not averaged, as
    Knowledge-Distillation-Zoo does) over layers; per-entry means.
    """
    anchors = [*student_feats, *(student_transform or ()), *([student_vertex] if student_vertex is not None else [])]
    if not anchors:
        raise ValueError("irg_loss needs vertices, edge features or a transformation pair")
    total = anchors[0].new_zeros(())
    if student_vertex is not None and teacher_vertex is not None and vertex_weight:
        total = total + vertex_weight * irg_vertex_loss(student_vertex, teacher_vertex)
    if student_feats and edge_weight:
        total = total + edge_weight * irg_edge_loss(student_feats, teacher_feats, squared, normalize)
    if student_transform is not None and teacher_transform is not None and transformation_weight:
        total = total + transformation_weight * irg_transformation_loss(
            student_transform, teacher_transform, squared, normalize
        )
    return total


# --------------------------------------------------------------------------------------------
# DarkRank
# --------------------------------------------------------------------------------------------


def darkrank_scores(
    embedding: Tensor, alpha: float = 3.0, beta: float = 3.0, normalize: bool = True, eps: float = 1e-12
) -> Tensor:
    r"""DarkRank's similarity scores of every pair of the batch.

    .. math:: S(x_i, x_j) = -\alpha\, \lVert f_i - f_j \rVert_2^{\beta}

    ``embedding`` (B, ...) flattened to (B, D) → (B, B); ``normalize`` L2-normalises each
    embedding first (the authors' code does). Squared distances are clamped at ``eps`` before
    the power, so coincident embeddings give finite gradients (the diagonal is never used).
    """
    e = _rows(embedding)
    if normalize:
        e = F.normalize(e, p=2, dim=1)
    return -alpha * _pairwise_sq(e).clamp_min(eps).pow(beta / 2.0)


def darkrank_teacher_ranking(teacher_scores: Tensor, list_length: int | None = None) -> Tensor:
    r"""For each anchor q (row), the other samples sorted by the teacher's score, best first.

    ``teacher_scores`` (B, B) → (B, n) long indices, n = B − 1 or ``list_length`` (the top n).
    The anchor itself is excluded explicitly (not by assuming it scores highest).
    """
    b = teacher_scores.shape[0]
    n = b - 1 if list_length is None else min(int(list_length), b - 1)
    eye = torch.eye(b, dtype=torch.bool, device=teacher_scores.device)
    masked = teacher_scores.masked_fill(eye, float("-inf"))
    return masked.argsort(dim=1, descending=True, stable=True)[:, :n]


def listmle_log_prob(scores: Tensor) -> Tensor:
    r"""Log Plackett–Luce probability of the ranking that lists the columns in order.

    .. math:: \log P(\pi \mid s) = \sum_{k=1}^{n} \Big( s_{\pi(k)} - \log \sum_{m=k}^{n} e^{s_{\pi(m)}} \Big)

    ``scores`` (N, n), already ordered by π → (N,).
    """
    tail = torch.logcumsumexp(scores.flip(-1), dim=-1).flip(-1)
    return (scores - tail).sum(dim=-1)


def darkrank_hard_loss(
    student: Tensor,
    teacher: Tensor,
    alpha: float = 3.0,
    beta: float = 3.0,
    list_length: int | None = None,
    normalize: bool = True,
) -> Tensor:
    r"""DarkRank hard transfer: ListMLE likelihood of the teacher's ranking under the student's scores.

    .. math::
        L_{hard} = -\frac{1}{B} \sum_{q=1}^{B} \log P\big(\pi^T_q \mid S^S_q\big),
        \qquad P(\pi \mid S) = \prod_{k=1}^{n} \frac{\exp S(x_q, x_{\pi(k)})}{\sum_{m=k}^{n} \exp S(x_q, x_{\pi(m)})}

    with :math:`\pi^T_q` the other samples sorted by the teacher's scores around anchor q
    (:func:`darkrank_teacher_ranking`) and S from :func:`darkrank_scores`. ``student`` (B, D_s),
    ``teacher`` (B, D_t) → scalar; 0 for B < 2. Not zero at agreement (a likelihood < 1).

    Paper: Chen, Wang, Zhang, "DarkRank: Accelerating Deep Metric Learning via Cross Sample
    Similarities Transfer", AAAI 2018, arXiv 1707.01220 (α = β = 3). The list is every other
    sample of the batch; the authors' MXNet code keeps only the teacher's top
    ``list_length − 1 = 3`` neighbours (pass ``list_length=3`` to reproduce it). The loss is
    averaged over anchors (the code does too).
    """
    _same_batch(student, teacher, "darkrank_hard_loss")
    if student.shape[0] < 2:
        return student.sum() * 0.0
    s = darkrank_scores(student, alpha, beta, normalize)
    t = darkrank_scores(teacher, alpha, beta, normalize)
    order = darkrank_teacher_ranking(t, list_length)
    return -listmle_log_prob(s.gather(1, order)).mean()


def darkrank_soft_loss(
    student: Tensor,
    teacher: Tensor,
    alpha: float = 3.0,
    beta: float = 3.0,
    list_length: int = 4,
    normalize: bool = True,
) -> Tensor:
    r"""DarkRank soft transfer: KL between the teacher's and the student's permutation distributions.

    .. math::
        L_{soft} = \frac{1}{B} \sum_{q} \sum_{\pi \in \mathcal P_n}
                   P(\pi \mid S^T_q) \log \frac{P(\pi \mid S^T_q)}{P(\pi \mid S^S_q)}

    over all n! permutations of the teacher's top-n candidates of each anchor (n =
    ``list_length``, at most 8; the full list has (B−1)! permutations). 0 at agreement.
    The authors' code uses n = 4.
    """
    _same_batch(student, teacher, "darkrank_soft_loss")
    if not 1 <= list_length <= 8:
        raise ValueError(f"darkrank_soft_loss needs 1 <= list_length <= 8, got {list_length}")
    if student.shape[0] < 2:
        return student.sum() * 0.0
    s = darkrank_scores(student, alpha, beta, normalize)
    t = darkrank_scores(teacher, alpha, beta, normalize)
    order = darkrank_teacher_ranking(t, list_length)
    s_top, t_top = s.gather(1, order), t.gather(1, order)
    n = order.shape[1]
    perms = torch.tensor(list(itertools.permutations(range(n))), device=s.device)  # (n!, n)
    log_ps = listmle_log_prob(s_top[:, perms])  # (B, n!)
    log_pt = listmle_log_prob(t_top[:, perms])
    return (log_pt.exp() * (log_pt - log_ps)).sum(dim=1).mean()

