"""HIRE's two losses (family ``graph``): node-level (``hire_node``) and relation-level (``hire_relation``).

Liu, Zheng, Hao, "HIRE: Distilling High-order Relational Knowledge From Heterogeneous Graph Neural
Networks", Neurocomputing 2022, arXiv 2207.11887. The teacher and the student are heterogeneous
GNNs (e.g. :class:`distill.models.hetero_gnn.HeteroGNN`); the views' ``"logits"`` are the target
node type's predictions ``(N, K)`` (every target node of the graph: the full-batch setting), and
the relation-level loss reads each node type's embeddings from per-type taps (``HeteroGNN``'s
``embeds.{round}.{type}``, ``(N_type, D)``). The math lives in :mod:`distill.functional.hire`.

Defaults are ours (only the paper's abstract could be read here; see the functional module's
docstring): ``tau = 2`` for the node-level KD, ``tau = 0.5`` for the relation-level cosine
distributions, every ordered pair of distinct node types.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import permutations

from torch import Tensor

from distill.batch import Batch, View
from distill.functional.hire import hire_node_loss, hire_relation_loss
from distill.methods._views import tap as _tap
from distill.methods.base import Method, Paper, register

__all__ = ["HIRENode", "HIRERelation", "HIRE_PAPER"]

HIRE_PAPER = Paper(
    title="HIRE: Distilling High-order Relational Knowledge From Heterogeneous Graph Neural Networks",
    authors="J. Liu, T. Zheng, Q. Hao",
    year=2022,
    arxiv="2207.11887",
    venue="Neurocomputing",
)


def _logits(view: View, side: str) -> Tensor:
    return _tap(view, "logits", side)


@register("hire_node", "graph", HIRE_PAPER)
class HIRENode(Method):
    """HIRE's first-order node-level KD: tau^2 * (1/N) sum_i KL(softmax(t_i/tau) || softmax(s_i/tau)) over target nodes.

    :func:`distill.functional.hire_node_loss` on the views' ``"logits"`` ``(N, K)``. ``tau = 2`` is ours.
    """

    def __init__(self, tau: float = 2.0, weight: float = 1.0, warmup_epochs: int = 0) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        if not tau > 0 or tau == float("inf"):
            raise ValueError(f"hire_node: tau must be a finite number > 0, got {tau}")
        self.tau = float(tau)

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        return hire_node_loss(_logits(student_view, "student"), _logits(teacher_view, "teacher").detach(), self.tau)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, weight={self.weight}"


@register("hire_relation", "graph", HIRE_PAPER)
class HIRERelation(Method):
    """HIRE's second-order relation-level KD: match the teacher's cross-type correlation distributions
    softmax_j(cos(h_i, h_j)/tau), i of type a, j of type b != a (KL, tau^2, mean over pairs).

    :func:`distill.functional.hire_relation_loss` on the per-type embeddings tapped at
    ``f"{student_prefix}.{type}"`` and ``f"{teacher_prefix}.{type}"`` (``HeteroGNN``: the last
    round of the one-round student is ``embeds.0``, of the two-round teacher ``embeds.1``). The
    widths may differ: the correlation matrices are ``(N_a, N_b)`` on both sides.

    Args:
        node_types: the node types whose embeddings are read.
        pairs: the ordered type pairs ``(a, b)``; ``None``: every ordered pair of distinct ``node_types``.
        tau: temperature of the correlation distributions (ours: 0.5).
    """

    def __init__(self, node_types: Sequence[str] = ("image", "class", "region"),
                 pairs: Sequence[tuple[str, str]] | None = None, student_prefix: str = "embeds.0",
                 teacher_prefix: str = "embeds.1", tau: float = 0.5, weight: float = 1.0,
                 warmup_epochs: int = 0) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        if not tau > 0 or tau == float("inf"):
            raise ValueError(f"hire_relation: tau must be a finite number > 0, got {tau}")
        self.node_types = [str(t) for t in node_types]
        if len(set(self.node_types)) < 2:
            raise ValueError(f"hire_relation relates different node types: give at least two; got {self.node_types}")
        self.pairs = ([(str(a), str(b)) for a, b in pairs] if pairs is not None
                      else list(permutations(self.node_types, 2)))
        bad = [p for p in self.pairs if p[0] == p[1] or p[0] not in self.node_types or p[1] not in self.node_types]
        if bad or not self.pairs:
            raise ValueError(f"hire_relation: pairs must be (a, b) of distinct types among {self.node_types}; got "
                             f"{self.pairs}")
        self.tau = float(tau)
        self.student_prefix, self.teacher_prefix = str(student_prefix), str(teacher_prefix)
        self.student_taps = [f"{self.student_prefix}.{t}" for t in self.node_types]
        self.teacher_taps = [f"{self.teacher_prefix}.{t}" for t in self.node_types]

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        s = {t: _tap(student_view, f"{self.student_prefix}.{t}", "student") for t in self.node_types}
        t_ = {t: _tap(teacher_view, f"{self.teacher_prefix}.{t}", "teacher").detach() for t in self.node_types}
        return hire_relation_loss(s, t_, self.pairs, self.tau)

    def extra_repr(self) -> str:
        return (f"{self.student_prefix} -> {self.teacher_prefix}, pairs={self.pairs}, tau={self.tau}, "
                f"weight={self.weight}")
