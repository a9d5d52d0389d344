"""The math of HIRE: node-level and relation-level distillation from a heterogeneous GNN.

Liu, Zheng, Hao, "HIRE: Distilling High-order Relational Knowledge From Heterogeneous Graph
Neural Networks", Neurocomputing 2022, arXiv 2207.11887.

* First order, node level (:func:`hire_node_loss`): the teacher's temperature-softened prediction
  of each target node, ``L_node = tau^2 * (1/N) sum_i KL(softmax(z^T_i / tau) || softmax(z^S_i / tau))``.
* Second order, relation level (:func:`hire_relation_loss`): the *correlations between the node
  embeddings of different types*. For an ordered pair of node types ``(a, b)``, ``a != b``, each
  node ``i`` of type ``a`` gets a distribution over the nodes ``j`` of type ``b``,
  ``R_ab[i, :] = softmax_j(cos(h_i, h_j) / tau)``, from the L2-normalised embeddings; the student
  matches the teacher's rows, ``L_rel = tau^2 * mean_{(a,b)} (1/N_a) sum_i KL(R^T_ab[i] || R^S_ab[i])``.
  Both matrices are ``(N_a, N_b)`` whatever the two models' widths, so no projector is needed.

Only the paper's abstract could be read here ("first-order node-level knowledge distillation,
which encodes the semantics of the teacher HGNN with its prediction logits ... second-order
relation-level knowledge distillation imitates the relational correlation between node embeddings
of different types"); no code by the authors was found. The node-level form is Hinton et al.'s
KD per node; the relation-level form (cosine correlations turned into per-row distributions,
KL-matched) is ours, written from that sentence.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor

__all__ = ["hire_node_loss", "hire_relation_loss", "hire_relation_matrix"]


def hire_node_loss(student_logits: Tensor, teacher_logits: Tensor, tau: float = 1.0) -> Tensor:
    """``tau^2 * (1/N) sum_i KL(softmax(t_i / tau) || softmax(s_i / tau))`` over target nodes.

    Args:
        student_logits, teacher_logits: ``(N, K)`` logits of the same ``N`` nodes.
        tau: the temperature (> 0).
    Returns: a scalar.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(f"hire_node_loss: logits must both be (N, K); got student {tuple(student_logits.shape)}, "
                         f"teacher {tuple(teacher_logits.shape)}")
    if tau <= 0:
        raise ValueError(f"hire_node_loss: tau must be > 0, got {tau}")
    log_s = F.log_softmax(student_logits / tau, dim=1)
    log_t = F.log_softmax(teacher_logits / tau, dim=1)
    return (log_t.exp() * (log_t - log_s)).sum(1).mean() * tau ** 2


def hire_relation_matrix(h_a: Tensor, h_b: Tensor, tau: float = 1.0) -> Tensor:
    """Log of ``R_ab = softmax_j(cos(h_a_i, h_b_j) / tau)``, row ``i`` a distribution over type-``b`` nodes.

    Args:
        h_a: embeddings of the type-``a`` nodes ``(N_a, D)``.
        h_b: embeddings of the type-``b`` nodes ``(N_b, D)``.
        tau: the temperature (> 0).
    Returns: ``log R_ab`` ``(N_a, N_b)``.
    """
    if h_a.dim() != 2 or h_b.dim() != 2 or h_a.shape[1] != h_b.shape[1]:
        raise ValueError(f"hire_relation_matrix: embeddings must be (N_a, D) and (N_b, D); got {tuple(h_a.shape)} and "
                         f"{tuple(h_b.shape)}")
    if tau <= 0:
        raise ValueError(f"hire_relation_matrix: tau must be > 0, got {tau}")
    cos = F.normalize(h_a, dim=1) @ F.normalize(h_b, dim=1).T
    return F.log_softmax(cos / tau, dim=1)


def hire_relation_loss(student_embeddings: Mapping[str, Tensor], teacher_embeddings: Mapping[str, Tensor],
                       pairs: Sequence[tuple[str, str]], tau: float = 1.0) -> Tensor:
    """``tau^2 * mean_{(a,b) in pairs} (1/N_a) sum_i KL(R^T_ab[i] || R^S_ab[i])`` (:func:`hire_relation_matrix`).

    Args:
        student_embeddings, teacher_embeddings: node type -> embeddings ``(N_type, D_s)`` /
            ``(N_type, D_t)`` (the widths may differ between the models, not between types of one model).
        pairs: ordered pairs ``(a, b)`` of distinct node types.
        tau: the temperature (> 0).
    Returns: a scalar.
    """
    if not pairs:
        raise ValueError("hire_relation_loss: pairs is empty: name at least one (type_a, type_b) pair")
    total: Tensor | None = None
    for a, b in pairs:
        if a == b:
            raise ValueError(f"hire_relation_loss: the relation is between different node types; got the pair ({a!r}, "
                             f"{b!r})")
        for side, emb in (("student", student_embeddings), ("teacher", teacher_embeddings)):
            for t in (a, b):
                if t not in emb:
                    raise KeyError(f"hire_relation_loss: the {side} has no embeddings of node type {t!r} "
                                   f"(has {sorted(emb)})")
        if student_embeddings[a].shape[0] != teacher_embeddings[a].shape[0] or \
                student_embeddings[b].shape[0] != teacher_embeddings[b].shape[0]:
            raise ValueError(f"hire_relation_loss: student and teacher must embed the same nodes of {a!r} and {b!r}")
        log_s = hire_relation_matrix(student_embeddings[a], student_embeddings[b], tau)
        log_t = hire_relation_matrix(teacher_embeddings[a], teacher_embeddings[b], tau)
        kl = (log_t.exp() * (log_t - log_s)).sum(1).mean()
        total = kl if total is None else total + kl
    assert total is not None
    return total / len(pairs) * tau ** 2
