"""Graph neural networks for node classification, built from torch-geometric's layers.

``GNN(in_dim, hidden, num_classes, layers, conv)``: ``layers`` message-passing layers, the last
mapping to the class logits, ReLU and dropout between them (the two-layer GCN of Kipf & Welling,
"Semi-Supervised Classification with Graph Convolutional Networks", ICLR 2017, arXiv 1609.02907,
with ``layers=2``). ``conv`` picks the layer:

* ``"gcn"``: ``torch_geometric.nn.GCNConv`` (symmetric normalisation with self-loops);
* ``"gat"``: ``GATConv`` (Veličković et al., ICLR 2018, arXiv 1710.10903): hidden layers with
  ``heads`` heads concatenated (``hidden // heads`` each), the last layer one head;
* ``"sage"``: ``SAGEConv`` (mean aggregation; Hamilton et al., NeurIPS 2017, arXiv 1706.02216);
* ``"mlp"``: ``nn.Linear`` layers that ignore the edges (the graph-less student of GNN-to-MLP KD).

``forward(x (N, F), edge_index (2, E)) -> logits (N, K)``. Tap points: ``convs.{i}``, the output of
layer ``i`` before its activation (``(N, hidden)`` for hidden layers, the logits for the last),
and ``embeddings.{i}`` (``nn.Identity``), layer ``i``'s node embedding after the activation (and
the norm, with ``norm="batch"``), for ``i < layers - 1``. torch-geometric is an optional
dependency: ``pip install 'distill[graph]'``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.nn import functional as F

from distill.integrations import require
from distill.models.registry import register_model

__all__ = ["GNN", "gat", "gcn", "mlp_graph", "sage"]

CONVS = ("gcn", "gat", "sage", "mlp")


def _conv(kind: str, in_dim: int, out_dim: int, heads: int, last: bool) -> nn.Module:
    if kind == "mlp":
        return nn.Linear(in_dim, out_dim)
    pyg = require("torch_geometric.nn", "graph", f"the {kind!r} graph layer")
    if kind == "gcn":
        return pyg.GCNConv(in_dim, out_dim)
    if kind == "sage":
        return pyg.SAGEConv(in_dim, out_dim)
    if last:
        return pyg.GATConv(in_dim, out_dim, heads=1)
    if out_dim % heads:
        raise ValueError(f"GAT: hidden width {out_dim} must be divisible by heads={heads}")
    return pyg.GATConv(in_dim, out_dim // heads, heads=heads)


class GNN(nn.Module):
    """A node classifier of ``layers`` graph layers (see the module docstring).

    Args:
        in_dim: node feature size F. hidden: width of the hidden layers. num_classes: K.
        layers: number of graph layers (≥ 1). conv: ``"gcn"``, ``"gat"``, ``"sage"`` or ``"mlp"``.
        heads: GAT heads of the hidden layers. dropout: on each layer's input (Kipf & Welling: 0.5).
        norm: ``None`` or ``"batch"`` (a BatchNorm1d over nodes after each hidden layer, for methods
            that read the teacher's BatchNorm statistics, e.g. graph-free KD).
    """

    def __init__(self, in_dim: int, hidden: int, num_classes: int, layers: int = 2, conv: str = "gcn",
                 heads: int = 4, dropout: float = 0.5, norm: str | None = None) -> None:
        super().__init__()
        if conv not in CONVS:
            raise ValueError(f"conv must be one of {CONVS}, got {conv!r}")
        if layers < 1:
            raise ValueError(f"layers must be at least 1, got {layers}")
        if norm not in (None, "batch"):
            raise ValueError(f"norm must be None or 'batch', got {norm!r}")
        self.conv_kind, self.dropout, self.num_classes = conv, dropout, num_classes
        dims = [in_dim] + [hidden] * (layers - 1) + [num_classes]
        self.convs = nn.ModuleList(_conv(conv, a, b, heads, last=i == layers - 1)
                                   for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)))
        self.norms = nn.ModuleList(nn.BatchNorm1d(hidden) for _ in range(layers - 1)) if norm else None
        self.embeddings = nn.ModuleList(nn.Identity() for _ in range(layers - 1))

    def forward(self, x: Tensor, edge_index: Tensor | None = None) -> Tensor:
        if edge_index is None and self.conv_kind != "mlp":
            raise ValueError(f"a {self.conv_kind!r} GNN needs edge_index (2, E)")
        for i, conv in enumerate(self.convs):
            x = F.dropout(x, self.dropout, self.training)
            x = conv(x) if self.conv_kind == "mlp" else conv(x, edge_index)
            if i < len(self.convs) - 1:
                x = F.elu(x) if self.conv_kind == "gat" else F.relu(x)
                if self.norms is not None:
                    x = self.norms[i](x)
                x = self.embeddings[i](x)
        return x


@register_model("gcn")
def gcn(in_dim: int, num_classes: int, hidden: int = 64, layers: int = 2, **kwargs: Any) -> GNN:
    """A GCN (Kipf & Welling 2017): two GCNConv layers, 64 hidden units by default."""
    return GNN(in_dim, hidden, num_classes, layers, conv="gcn", **kwargs)


@register_model("gat")
def gat(in_dim: int, num_classes: int, hidden: int = 64, layers: int = 2, heads: int = 8, **kwargs: Any) -> GNN:
    """A GAT (Veličković et al. 2018): 8 heads × 8 units in the hidden layer by default, ELU."""
    return GNN(in_dim, hidden, num_classes, layers, conv="gat", heads=heads, **kwargs)


@register_model("sage")
def sage(in_dim: int, num_classes: int, hidden: int = 64, layers: int = 2, **kwargs: Any) -> GNN:
    """GraphSAGE with mean aggregation (Hamilton et al. 2017)."""
    return GNN(in_dim, hidden, num_classes, layers, conv="sage", **kwargs)


@register_model("mlp_graph")
def mlp_graph(in_dim: int, num_classes: int, hidden: int = 64, layers: int = 2, **kwargs: Any) -> GNN:
    """An MLP on node features that ignores the edges (same taps as the GNNs)."""
    return GNN(in_dim, hidden, num_classes, layers, conv="mlp", **kwargs)
