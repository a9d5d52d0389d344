"""GNN self-distillation (GNN-SD): a teacher-free regulariser on the student's own layers.

The math lives in :mod:`distill.functional.graph_self_distill`; the graph comes from ``batch.edge_index``
(see :mod:`distill.methods.graph`).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from distill import functional as DF
from distill.batch import Batch, View
from distill.methods._views import tap as _tap
from distill.methods.base import Method, Paper, register
from distill.methods.graph import graph_edge_index

__all__ = ["GNNSelfDistill"]


@register(
    "gnn_self_distill",
    "graph",
    Paper(
        title="On Self-Distilling Graph Neural Network",
        authors="Y. Chen, Y. Bian, X. Xiao, Y. Rong, T. Xu, J. Huang",
        year=2021,
        arxiv="2011.02255",
        venue="IJCAI",
    ),
)
class GNNSelfDistill(Method):
    """GNN-SD: adaptive discrepancy retaining on the neighbourhood discrepancy rates of the student's layers
    (+ ``cge`` × compact graph embedding), no teacher.

    ``adr`` × :func:`distill.functional.adr_loss` over the NDR vectors
    (:func:`distill.functional.neighborhood_discrepancy_rate`) of the tapped layers, in order from shallow
    to deep, plus ``cge`` × :func:`distill.functional.cge_loss` of the same layers (equal widths needed when
    ``cge > 0``). The loss weight of the whole term is ``weight``.

    Defaults are ours (the paper's text past its introduction could not be read here): the NDR of every
    conv output of a 2-layer GNN (``taps=("convs.0", "convs.1")``), mean aggregation, ``adr = 1``,
    ``cge = 0`` (the compact-graph-embedding term is for graph classification).
    """

    needs_teacher = False

    def __init__(
        self,
        taps: Sequence[str] = ("convs.0", "convs.1"),
        adr: float = 1.0,
        cge: float = 0.0,
        adaptive: bool = True,
        normalization: str = "mean",
        weight: float = 1.0,
        warmup_epochs: int = 0,
    ) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        self.taps = [str(t) for t in taps]
        if len(self.taps) < 2:
            raise ValueError(f"gnn_self_distill needs at least 2 layer taps (shallow to deep), got {self.taps}")
        for name, value in (("adr", adr), ("cge", cge)):
            if not value >= 0:
                raise ValueError(f"gnn_self_distill: {name} must be >= 0, got {value}")
        if normalization not in ("mean", "sym"):
            raise ValueError(f"normalization must be 'mean' or 'sym', got {normalization!r}")
        self.adr, self.cge, self.adaptive, self.normalization = float(adr), float(cge), bool(adaptive), normalization
        self.student_taps = list(self.taps)

    def ndr(self, student_view: View, batch: Batch) -> list[Tensor]:
        """The NDR vector ``(N,)`` of each tapped layer, shallow to deep."""
        edge_index = graph_edge_index(batch, "gnn_self_distill")
        return [DF.neighborhood_discrepancy_rate(_tap(student_view, p, "student"), edge_index, self.normalization)
                for p in self.taps]

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        loss = self.adr * DF.adr_loss(self.ndr(student_view, batch), adaptive=self.adaptive)
        if self.cge > 0:
            loss = loss + self.cge * DF.cge_loss([_tap(student_view, p, "student") for p in self.taps])
        return loss

    def extra_repr(self) -> str:
        return f"taps={self.taps}, adr={self.adr}, cge={self.cge}, weight={self.weight}"
