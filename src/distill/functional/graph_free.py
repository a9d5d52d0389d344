"""The math of Graph-Free Knowledge Distillation (GFKD).

Deng & Zhang, "Graph-Free Knowledge Distillation for Graph Neural Networks", IJCAI 2021,
arXiv 2105.07519. No training graph is read: ``G`` synthetic graphs are learned from the frozen
teacher GNN alone. Graph ``g`` has ``n`` nodes, node features ``X_g`` ``(n, F)`` and an adjacency
``A_g`` ``(n, n)`` drawn from a multivariate Bernoulli ``A_g,ij ~ Bernoulli(sigmoid(phi_g,ij))``.
Features and edge logits minimise

    L(A, X) = (1/N) sum_i CE(f_T(A, X)_i, y_i) + lambda_BN * R_BN + lambda_oh * H(X)

with ``y`` fixed random target classes, ``R_BN`` the BatchNorm-statistics term of DeepInversion
(:class:`distill.synthesis.bn_stats.BatchNormStatistics`: the batch mean / variance of every BN
input against its running statistics) and ``H(X)`` the mean row entropy of one-hot-relaxed
features (:func:`gfkd_feature_entropy`, only when node features are known to be one-hot).

``X`` gets ordinary gradients. The adjacency is discrete: its gradient
``d E_A[L] / d phi`` comes from the Augment-REINFORCE-Merge (ARM) estimator (Yin & Zhou 2019),
which needs only two forward passes of the teacher and no back-propagation through ``A``:

    d E[L] / d phi = E_{u ~ U(0,1)^{n x n}} [ (L(A^+) - L(A^-)) * (u - 1/2) ],
    A^+ = 1[u > sigmoid(-phi)],  A^- = 1[u < sigmoid(phi)]

(:func:`arm_bernoulli_samples`, :func:`arm_bernoulli_grad`). The paper's method section could not
be read here (only its abstract: "a gradient estimator ... only using GNN forward-propagation");
this form and the use of each graph's *own* loss for its edges are read from the authors' code
(``utils/helper.py``: ``generate_b``, ``bernulli_fastgrad``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["arm_bernoulli_grad", "arm_bernoulli_samples", "dense_graphs_to_edge_index", "gfkd_feature_entropy",
           "gfkd_graph_losses"]


def arm_bernoulli_samples(logits: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """The ARM estimator's two antithetic Bernoulli samples from one uniform draw.

    ``A^+ = 1[u > sigmoid(-phi)]`` and ``A^- = 1[u < sigmoid(phi)]``; each is marginally a
    ``Bernoulli(sigmoid(phi))`` sample.

    Args:
        logits: edge logits ``phi``, any shape, e.g. ``(G, n, n)``.
        u: uniform noise in ``[0, 1)`` of the same shape.
    Returns: ``(A^+, A^-)``, float tensors of 0/1 shaped like ``logits``.
    """
    if logits.shape != u.shape:
        raise ValueError(f"arm_bernoulli_samples: logits {tuple(logits.shape)} and u {tuple(u.shape)} must have the "
                         "same shape")
    plus = (u > torch.sigmoid(-logits)).to(logits.dtype)
    minus = (u < torch.sigmoid(logits)).to(logits.dtype)
    return plus, minus


def arm_bernoulli_grad(loss_plus: Tensor, loss_minus: Tensor, u: Tensor) -> Tensor:
    """ARM's one-sample gradient of ``E_{A ~ Bernoulli(sigmoid(phi))}[L(A)]`` with respect to ``phi``:
    ``(L(A^+) - L(A^-)) * (u - 1/2)``.

    Args:
        loss_plus, loss_minus: the losses on ``A^+`` and ``A^-`` (:func:`arm_bernoulli_samples`), a
            scalar or one value per graph ``(G,)``; they broadcast against ``u`` over its leading axis.
        u: the uniform draw ``(G, n, n)`` (or any shape whose leading axes match the losses').
    Returns: the gradient estimate shaped like ``u`` (no autograd graph).
    """
    diff = (loss_plus - loss_minus).detach()
    if diff.dim() > u.dim() or tuple(diff.shape) != tuple(u.shape[: diff.dim()]):
        raise ValueError(f"arm_bernoulli_grad: losses {tuple(diff.shape)} must be a scalar or match the leading axes "
                         f"of u {tuple(u.shape)}")
    diff = diff.reshape(*diff.shape, *([1] * (u.dim() - diff.dim())))
    return diff * (u - 0.5)


def gfkd_graph_losses(logits: Tensor, targets: Tensor, num_graphs: int) -> Tensor:
    """Each synthetic graph's cross-entropy against its fixed random targets.

    The node rows are ``num_graphs`` equal blocks (graph ``g`` owns rows ``g*n .. (g+1)*n - 1``).

    Args:
        logits: the teacher's logits on the synthetic nodes, ``(G*n, K)``.
        targets: the target classes ``(G*n,)``.
        num_graphs: ``G``.
    Returns: ``(G,)``: ``(1/n) sum_{i in g} CE(logits_i, y_i)``; their mean is the node-mean CE.
    """
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"gfkd_graph_losses: logits must be (N, K) and targets (N,); got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")
    if num_graphs < 1 or logits.shape[0] % num_graphs:
        raise ValueError(f"gfkd_graph_losses: {logits.shape[0]} nodes do not split into {num_graphs} equal graphs")
    return F.cross_entropy(logits, targets, reduction="none").view(num_graphs, -1).mean(1)


def gfkd_feature_entropy(features: Tensor, eps: float = 1e-12) -> Tensor:
    """The one-hot prior on relaxed categorical node features: ``H(X) = -(1/N) sum_i sum_f x_if log x_if``.

    Args:
        features: rows on the simplex (a softmax of the feature parameters), ``(N, F)``.
    Returns: a scalar, 0 exactly when every row is one-hot.
    """
    if features.dim() != 2:
        raise ValueError(f"gfkd_feature_entropy: features must be (N, F); got {tuple(features.shape)}")
    return -(features * torch.log(features.clamp_min(eps))).sum() / features.shape[0]


def dense_graphs_to_edge_index(adjacency: Tensor) -> Tensor:
    """The disjoint union of ``G`` dense adjacencies as one ``edge_index``.

    ``A_g[i, j] = 1`` is the edge from source ``i`` to target ``j`` of graph ``g``, offset to nodes
    ``g*n + i -> g*n + j`` (row 0 of ``edge_index`` the sources); the diagonal (self loops) is
    dropped (GCN adds its own). Each entry is its own Bernoulli variable, so a sampled graph need
    not be symmetric (as in the authors' code).

    Args:
        adjacency: ``(G, n, n)`` 0/1 (any dtype).
    Returns: ``edge_index`` ``(2, E)`` long.
    """
    if adjacency.dim() != 3 or adjacency.shape[1] != adjacency.shape[2]:
        raise ValueError(f"dense_graphs_to_edge_index: adjacency must be (G, n, n); got {tuple(adjacency.shape)}")
    g, n, _ = adjacency.shape
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=adjacency.device)
    graph, src, dst = torch.nonzero((adjacency != 0) & off_diagonal, as_tuple=True)
    return torch.stack([graph * n + src, graph * n + dst])
