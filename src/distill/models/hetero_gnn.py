"""A heterogeneous GNN (relation-wise message passing, R-GCN style) with per-type tap points.

``HeteroGNN`` classifies the nodes of one *target* type of a heterogeneous graph. Each node type
is first projected to ``hidden`` channels (a linear layer of its features, or a learned embedding
for a type without features); then ``layers`` rounds of message passing with one convolution per
relation ``(src, rel, dst)`` (torch-geometric's ``HeteroConv``, per-relation outputs summed at the
destination, as R-GCN sums its relation-specific messages), each followed by ReLU and dropout; a
linear head reads the target type's last embeddings.

Tap points: ``embeds.{l}.{node_type}`` (``nn.Identity``) carry the ``(N_type, hidden)``
embeddings after round ``l`` (0-based), so a method can read every type's embeddings, e.g.
HIRE's relation-level loss (:mod:`distill.methods.hire`). ``forward(x_dict, edge_index_dict)``
returns the target type's logits ``(N_target, num_classes)``.

torch-geometric is imported only when a model is built (``pip install 'distill[graph]'``).
Zoo names: ``hetero_gnn`` (the teacher: 2 rounds, 64 channels) and ``hetero_gnn_small`` (the
student: 1 round, 16 channels).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from distill.models.registry import register_model

__all__ = ["BoundHeteroGNN", "HeteroGNN", "bind_hetero", "hetero_gnn", "hetero_gnn_small"]

EdgeType = tuple[str, str, str]
_CONVS = ("sage", "graph", "gat")


def _relation_conv(kind: str, channels: int, heads: int) -> nn.Module:
    from distill.integrations import require

    pyg = require("torch_geometric.nn", "graph", "HeteroGNN")
    if kind == "sage":
        return pyg.SAGEConv((channels, channels), channels)
    if kind == "graph":
        return pyg.GraphConv((channels, channels), channels)
    if channels % heads:
        raise ValueError(f"HeteroGNN: hidden={channels} must be divisible by heads={heads} for conv='gat'")
    return pyg.GATConv((channels, channels), channels // heads, heads=heads, add_self_loops=False)


class HeteroGNN(nn.Module):
    """Node classification on a heterogeneous graph.

    Args:
        node_types: every node type, e.g. ``("image", "class", "region")``.
        edge_types: every relation ``(src_type, name, dst_type)``; a type that is no relation's
            destination keeps its embedding from round to round.
        in_dims: node type -> feature width; a type absent here (or mapped to 0) has no features
            and gets a learned embedding per node (``num_nodes[type]`` rows).
        num_classes: classes of the target type.
        target: the node type classified.
        hidden: channels of every embedding.
        layers: rounds of message passing (>= 1).
        conv: the per-relation convolution: ``"sage"`` (GraphSAGE, mean), ``"graph"`` (GraphConv,
            sum) or ``"gat"`` (GAT without self loops, ``heads`` heads concatenated).
        dropout: dropout after each round.
        num_nodes: node type -> count, for the featureless types.
    """

    def __init__(self, node_types: Sequence[str], edge_types: Sequence[EdgeType], in_dims: Mapping[str, int],
                 num_classes: int, target: str = "image", hidden: int = 64, layers: int = 2, conv: str = "sage",
                 heads: int = 2, dropout: float = 0.5, num_nodes: Mapping[str, int] | None = None) -> None:
        super().__init__()
        from distill.integrations import require

        pyg = require("torch_geometric.nn", "graph", "HeteroGNN")
        self.node_types = [str(t) for t in node_types]
        self.edge_types = [tuple(str(p) for p in e) for e in edge_types]
        if target not in self.node_types:
            raise ValueError(f"HeteroGNN: target {target!r} is not a node type (have {self.node_types})")
        for e in self.edge_types:
            if len(e) != 3 or e[0] not in self.node_types or e[2] not in self.node_types:
                raise ValueError(f"HeteroGNN: edge type {e!r} must be (src, name, dst) between node types "
                                 f"{self.node_types}")
        if conv not in _CONVS:
            raise ValueError(f"HeteroGNN: conv must be one of {_CONVS}; got {conv!r}")
        if layers < 1 or hidden < 1 or num_classes < 1:
            raise ValueError(f"HeteroGNN: layers, hidden and num_classes must be >= 1; got {layers}, {hidden}, "
                             f"{num_classes}")
        self.target, self.hidden, self.num_classes, self.dropout = target, int(hidden), int(num_classes), float(dropout)
        self.inputs = nn.ModuleDict()
        for t in self.node_types:
            width = int(in_dims.get(t, 0))
            if width > 0:
                self.inputs[t] = nn.Linear(width, hidden)
            else:
                if not num_nodes or t not in num_nodes:
                    raise ValueError(f"HeteroGNN: node type {t!r} has no features: give num_nodes[{t!r}] for its "
                                     "learned embedding")
                self.inputs[t] = nn.Embedding(int(num_nodes[t]), hidden)
        self.convs = nn.ModuleList(
            pyg.HeteroConv({e: _relation_conv(conv, hidden, heads) for e in self.edge_types}, aggr="sum")
            for _ in range(layers))
        self.embeds = nn.ModuleList(nn.ModuleDict({t: nn.Identity() for t in self.node_types}) for _ in range(layers))
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x_dict: Mapping[str, Tensor | None], edge_index_dict: Mapping[Any, Tensor]) -> Tensor:
        """``x_dict``: node type -> features ``(N_type, F_type)`` (ignored, may be absent, for a
        featureless type); ``edge_index_dict``: relation -> ``(2, E)``. Returns ``(N_target, K)``."""
        h: dict[str, Tensor] = {}
        for t in self.node_types:
            layer = self.inputs[t]
            if isinstance(layer, nn.Embedding):
                h[t] = layer.weight
            else:
                x = x_dict.get(t)
                if x is None:
                    raise KeyError(f"HeteroGNN: no features for node type {t!r} (x_dict has {sorted(x_dict)})")
                h[t] = layer(x)
        edges = {tuple(k): v for k, v in edge_index_dict.items() if tuple(k) in self.edge_types}
        missing = [e for e in self.edge_types if e not in edges]
        if missing:
            raise KeyError(f"HeteroGNN: edge_index_dict lacks the relations {missing}")
        for conv, taps in zip(self.convs, self.embeds):
            out = conv(h, edges)
            h = {t: taps[t](nn.functional.dropout(out[t].relu(), self.dropout, self.training) if t in out else h[t])
                 for t in self.node_types}
        return self.head(h[self.target])

    def extra_repr(self) -> str:
        return f"target={self.target!r}, hidden={self.hidden}, num_classes={self.num_classes}"


class BoundHeteroGNN(nn.Module):
    """A :class:`HeteroGNN` bound to one heterogeneous graph, called like a homogeneous GNN.

    ``forward(x (N_target, F), edge_index (2, E)) -> logits (N_target, K)``: ``x`` replaces the
    target type's features and ``edge_index`` the target type's own relation ``(target, *, target)``
    (when the graph has one); every other type's features and every other relation are the bound
    graph's. So the full-batch loops written for homogeneous graphs
    (:func:`distill.strategies.graph.distill_graph`, :func:`distill.train.graph.fit_graph`) train a
    heterogeneous model unchanged. The per-type taps keep their paths (``embeds.{l}.{type}``).
    """

    def __init__(self, model: HeteroGNN, x_dict: Mapping[str, Tensor], edge_index_dict: Mapping[Any, Tensor]) -> None:
        super().__init__()
        # the same tap modules, reachable at the unbound model's paths: registered before ``model``
        # so that ``named_modules`` (which lists a shared module once) lists them as ``embeds...``
        self.embeds = model.embeds
        self.model = model
        self.target = model.target
        self.x_dict = dict(x_dict)
        self.edge_index_dict = {tuple(k): v for k, v in edge_index_dict.items()}
        own = [k for k in self.edge_index_dict if k[0] == self.target and k[2] == self.target]
        if len(own) > 1:
            raise ValueError(f"BoundHeteroGNN: the target type {self.target!r} has several relations to itself "
                             f"({own}); the call's edge_index could replace only one")
        self.own_relation = own[0] if own else None

    def forward(self, x: Tensor, edge_index: Tensor | None = None) -> Tensor:
        x_dict = {**self.x_dict, self.target: x}
        edges = dict(self.edge_index_dict)
        if self.own_relation is not None and edge_index is not None:
            edges[self.own_relation] = edge_index
        return self.model(x_dict, edges)

    def _apply(self, fn: Any, recurse: bool = True) -> BoundHeteroGNN:
        # .to() / .cuda() / .double(): the bound features follow like buffers; edge indices only change device
        super()._apply(fn, recurse)
        self.x_dict = {k: fn(v) for k, v in self.x_dict.items()}
        device = next(self.model.parameters()).device
        self.edge_index_dict = {k: v.to(device) for k, v in self.edge_index_dict.items()}
        return self


def bind_hetero(model: HeteroGNN, data: Any) -> tuple[BoundHeteroGNN, Any]:
    """``model`` bound to the heterogeneous graph ``data`` (:class:`distill.data.graphs.HeteroGraphData`),
    and the target type's homogeneous view of it: a :class:`~distill.data.graphs.GraphData` with the
    target features ``x``, its own relation as ``edge_index`` (empty when none), ``y`` and the masks.
    Pass both to :func:`distill.strategies.graph.distill_graph` (teacher and student bound to the
    same ``data``)."""
    from distill.data.graphs import GraphData

    target = model.target
    if target not in data.x_dict:
        raise ValueError(f"bind_hetero: the model classifies {target!r} nodes, which the graph lacks "
                         f"(node types {sorted(data.x_dict)})")
    bound = BoundHeteroGNN(model, data.x_dict, data.edge_index_dict)
    x = data.x_dict[target]
    edge_index = (data.edge_index_dict[bound.own_relation] if bound.own_relation is not None
                  else torch.zeros(2, 0, dtype=torch.long, device=x.device))
    graph = GraphData(x, edge_index, data.y, data.train_mask, data.val_mask, data.test_mask, data.num_classes,
                      name=f"{getattr(data, 'name', 'hetero graph')} [{target} view]")
    return bound, graph


@register_model("hetero_gnn")
def hetero_gnn(node_types: Sequence[str], edge_types: Sequence[EdgeType], in_dims: Mapping[str, int],
               num_classes: int, **kwargs: Any) -> HeteroGNN:
    """The heterogeneous teacher: 2 rounds of relation-wise GraphSAGE, 64 channels (any keyword of
    :class:`HeteroGNN` overrides)."""
    kwargs = {"hidden": 64, "layers": 2, **kwargs}
    return HeteroGNN(node_types, edge_types, in_dims, num_classes, **kwargs)


@register_model("hetero_gnn_small")
def hetero_gnn_small(node_types: Sequence[str], edge_types: Sequence[EdgeType], in_dims: Mapping[str, int],
                     num_classes: int, **kwargs: Any) -> HeteroGNN:
    """The heterogeneous student: 1 round of relation-wise GraphSAGE, 16 channels."""
    kwargs = {"hidden": 16, "layers": 1, **kwargs}
    return HeteroGNN(node_types, edge_types, in_dims, num_classes, **kwargs)
