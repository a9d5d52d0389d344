"""Graph distillation methods (family ``graph``): the local structure preserving module (LSP).

Graph methods read node embeddings from taps (``(N, D)``: one row per node of the whole graph, the
full-batch setting) and the graph from the batch: ``batch.edge_index`` ``(2, E)`` long (torch-geometric's
convention, row 0 source, row 1 target) of a :class:`~distill.batch.GraphBatch` (``GraphData.batch()``,
or what :func:`distill.strategies.graph.distill_graph` passes; :func:`graph_edge_index` reads it). The math
lives in :mod:`distill.functional.graph`.
"""

from __future__ import annotations

from torch import Tensor

from distill import functional as DF
from distill.batch import Batch, View
from distill.methods._views import tap as _tap
from distill.methods.base import Method, Paper, register

__all__ = ["LSP", "graph_edge_index"]


def graph_edge_index(batch: Batch, who: str) -> Tensor:
    """``batch.edge_index`` ``(2, E)``; a clear error naming ``who`` when the batch carries no graph."""
    edge_index = getattr(batch, "edge_index", None)
    if edge_index is None:
        raise ValueError(f"{who} reads the graph from batch.edge_index, but this {type(batch).__name__} has none: "
                         "pass a distill.batch.GraphBatch (GraphData.batch(), or train with "
                         "distill.strategies.graph.distill_graph)")
    return edge_index


@register(
    "lsp",
    "graph",
    Paper(
        title="Distilling Knowledge from Graph Convolutional Networks",
        authors="Y. Yang, J. Qiu, M. Song, D. Tao, X. Wang",
        year=2020,
        arxiv="2003.10477",
        venue="CVPR",
    ),
)
class LSP(Method):
    """Local structure preserving: mean over nodes of KL(teacher ‖ student) between each node's distributions
    over its neighbours of a kernel similarity of the tapped node embeddings.

    :func:`distill.functional.lsp_loss` on ``student_view[student_tap]`` ``(N, Ds)`` and
    ``teacher_view[teacher_tap]`` ``(N, Dt)`` (widths may differ: no adapter is needed) with
    ``batch.edge_index``. Self loops are not neighbours.

    Defaults: ``kernel="rbf"`` (the brief's reading of the paper, whose kernels are linear, polynomial and
    RBF) with σ = 1 (ours); the paper's text past its introduction could not be read here. The authors'
    code (ihollywhy/DistillGCN.PyTorch) uses ``kernel="laplacian", sigma=100`` (exp(-‖z_i − z_j‖₁/100)),
    KL(teacher ‖ student) averaged over nodes (our default direction; ``reverse=True`` for the other) and
    loss weight 1 (``--loss-weight 1.0``) on the student's middle layer (``--target-layer 2``).

    Args:
        student_tap / teacher_tap: tap paths of node embeddings ``(N, D)``; default ``"embeddings.0"``, the
            first hidden layer's embedding (after its activation) of a :class:`distill.models.gnn.GNN`.
        kernel: ``"rbf"``, ``"linear"``, ``"poly"`` or ``"laplacian"`` (:func:`distill.functional.lsp_kernel`).
        sigma: bandwidth of ``"rbf"`` / ``"laplacian"``; degree, coef: ``"poly"``'s (x·y + coef)^degree.
    """

    def __init__(
        self,
        student_tap: str = "embeddings.0",
        teacher_tap: str = "embeddings.0",
        kernel: str = "rbf",
        sigma: float = 1.0,
        degree: int = 2,
        coef: float = 1.0,
        reverse: bool = False,
        weight: float = 1.0,
        warmup_epochs: int = 0,
    ) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        if kernel not in DF.LSP_KERNELS:
            raise ValueError(f"LSP kernel must be one of {DF.LSP_KERNELS}, got {kernel!r}")
        if not sigma > 0:
            raise ValueError(f"LSP sigma must be > 0, got {sigma}")
        if int(degree) < 1:
            raise ValueError(f"LSP degree must be an integer >= 1, got {degree}")
        self.student_tap, self.teacher_tap = str(student_tap), str(teacher_tap)
        self.kernel, self.sigma, self.degree, self.coef = kernel, float(sigma), int(degree), float(coef)
        self.reverse = bool(reverse)
        self.student_taps = [self.student_tap]
        self.teacher_taps = [self.teacher_tap]

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        s = _tap(student_view, self.student_tap, "student")
        t = _tap(teacher_view, self.teacher_tap, "teacher").detach()
        return DF.lsp_loss(s, t, graph_edge_index(batch, "LSP"), kernel=self.kernel, sigma=self.sigma,
                           degree=self.degree, coef=self.coef, reverse=self.reverse)

    def extra_repr(self) -> str:
        return (f"{self.student_tap} -> {self.teacher_tap}, kernel={self.kernel}, sigma={self.sigma}, "
                f"weight={self.weight}")
