r"""GNN self-distillation math (GNN-SD): the neighbourhood discrepancy rate (NDR), the adaptive discrepancy
retaining (ADR) regulariser and the compact graph embedding (CGE) term.

Paper: Chen, Bian, Xiao, Rong, Xu, Huang, "On Self-Distilling Graph Neural Network", IJCAI 2021,
arXiv 2011.02255. Only the paper's abstract and introduction could be read here (the search corpus
returned no other part of it, and no code from the authors was found), so the formulas below are our
reading of the method as the abstract describes it ("NDR quantifies the non-smoothness of the embedded
graph"; "ADR ... maintains high neighbourhood discrepancy across GNN layers"; a teacher-free drop-in
regulariser); each function's docstring states the choices that are ours.

Edges follow torch-geometric's convention (row 0 source ``j``, row 1 target ``i``; the neighbourhood of
``i`` is its incoming edges).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.functional.graph import check_edge_index

__all__ = ["adr_loss", "cge_loss", "neighborhood_aggregate", "neighborhood_discrepancy_rate"]


def neighborhood_aggregate(h: Tensor, edge_index: Tensor, normalization: str = "mean") -> Tensor:
    r"""Each node's aggregated neighbourhood :math:`h_{\mathcal N(i)}`: ``h`` ``(N, D)`` → ``(N, D)``.

    * ``"mean"``: :math:`\frac{1}{|\mathcal N(i)|} \sum_{j \in \mathcal N(i)} h_j` (row-normalised adjacency)
    * ``"sym"``: :math:`\sum_{j \in \mathcal N(i)} h_j / \sqrt{d_i d_j}` (GCN's symmetric normalisation,
      in-degrees, no self loops)

    Self loops in ``edge_index`` are ignored (the neighbourhood excludes the node itself). A node with no
    neighbour gets a zero row.
    """
    if h.dim() != 2:
        raise ValueError(f"neighborhood_aggregate needs node embeddings (N, D), got {tuple(h.shape)}")
    n = h.shape[0]
    check_edge_index(edge_index, n, "neighborhood_aggregate")
    src, dst = edge_index[0].long(), edge_index[1].long()
    keep = src != dst
    src, dst = src[keep], dst[keep]
    deg = torch.zeros(n, dtype=h.dtype, device=h.device).index_add(0, dst, torch.ones_like(dst, dtype=h.dtype))
    if normalization == "mean":
        w = 1.0 / deg[dst]
    elif normalization == "sym":
        w = deg[dst].rsqrt() * deg[src].clamp_min(1.0).rsqrt()
    else:
        raise ValueError(f"normalization must be 'mean' or 'sym', got {normalization!r}")
    return torch.zeros_like(h).index_add(0, dst, h[src] * w.unsqueeze(1))


def neighborhood_discrepancy_rate(h: Tensor, edge_index: Tensor, normalization: str = "mean",
                                  eps: float = 1e-8) -> Tensor:
    r"""The neighbourhood discrepancy rate of every node: ``h`` ``(N, D)`` → ``(N,)`` in ``[0, 2]``.

    .. math:: s_i = 1 - \cos\big(h_i,\ h_{\mathcal N(i)}\big)

    with :math:`h_{\mathcal N(i)}` from :func:`neighborhood_aggregate`. 0 when a node points the same way
    as its neighbourhood (a perfectly smooth graph signal), larger as it departs from it. A node with no
    neighbour has :math:`s_i = 0`. With ``"mean"`` the neighbourhood's scale does not matter (the cosine
    ignores it), so ``"mean"`` equals an unnormalised sum.
    """
    agg = neighborhood_aggregate(h, edge_index, normalization)
    cos = F.cosine_similarity(h, agg, dim=1, eps=eps)
    has = agg.abs().sum(1) > 0
    return torch.where(has, 1.0 - cos, torch.zeros_like(cos))


def adr_loss(ndr: Sequence[Tensor], adaptive: bool = True) -> Tensor:
    r"""Adaptive discrepancy retaining: each layer's NDR vector is pulled towards the previous layer's,
    where the previous layer was the less smooth one.

    .. math::
        L_{ADR} = \sum_{l=1}^{L-1} \mathbb 1\big[\lVert S^{(l)} \rVert_2 > \lVert S^{(l+1)} \rVert_2\big]\;
        \frac{1}{N} \big\lVert S^{(l+1)} - \mathrm{sg}(S^{(l)}) \big\rVert_2^2

    ``ndr``: the NDR vectors :math:`S^{(1)}, \dots, S^{(L)}` of consecutive layers, each ``(N,)``
    (:func:`neighborhood_discrepancy_rate`) → scalar. :math:`\mathrm{sg}` stops the gradient: the shallower
    layer is the teacher of the deeper one, and the indicator transfers only where the shallower layer
    retained more discrepancy (over-smoothing is what the regulariser fights). ``adaptive=False`` drops the
    indicator (every pair is distilled).

    Ours, as the paper's text could not be read here: the 1/N (a mean over nodes, so the loss weight does
    not grow with the graph) and the ℓ2 norm in the indicator.
    """
    if len(ndr) < 2:
        raise ValueError(f"adr_loss needs the NDR of at least 2 layers, got {len(ndr)}")
    n = ndr[0].shape
    if any(s.dim() != 1 or s.shape != n for s in ndr):
        raise ValueError(f"adr_loss needs NDR vectors (N,) of equal N, got {[tuple(s.shape) for s in ndr]}")
    total = ndr[0].new_zeros(())
    for shallow, deep in zip(ndr[:-1], ndr[1:]):
        target = shallow.detach()
        if adaptive and not bool(target.norm() > deep.detach().norm()):
            continue
        total = total + (deep - target).pow(2).mean()
    return total


def cge_loss(embeddings: Sequence[Tensor], batch: Tensor | None = None) -> Tensor:
    r"""Compact graph embedding term: every earlier layer's graph readout is pulled towards the last layer's.

    .. math::
        g^{(l)} = \frac{1}{|V|} \sum_{i \in V} h^{(l)}_i, \qquad
        L_{CGE} = \sum_{l=1}^{L-1} \big\lVert g^{(l)} - \mathrm{sg}(g^{(L)}) \big\rVert_2^2 \;/\; G

    ``embeddings``: node embeddings of the layers, each ``(N, D)`` (equal widths); ``batch`` ``(N,)`` long
    assigns nodes to ``G`` graphs (``None``: one graph) → scalar (mean over graphs).

    Ours, as the paper's text could not be read here: the abstract names a "generic GNN-SD framework"
    that induces other distillation strategies, and the issue names a compact-graph-embedding term; this
    mean-readout, deepest-layer-as-target form is our reconstruction. The paper applies it to graph
    classification; for node classification :class:`~distill.methods.GNNSelfDistill` weighs it 0.
    """
    if len(embeddings) < 2:
        raise ValueError(f"cge_loss needs the embeddings of at least 2 layers, got {len(embeddings)}")
    shape = embeddings[0].shape
    if any(h.dim() != 2 or h.shape != shape for h in embeddings):
        raise ValueError(f"cge_loss needs node embeddings (N, D) of equal shape, got "
                         f"{[tuple(h.shape) for h in embeddings]}")
    n = shape[0]
    if batch is None:
        batch = torch.zeros(n, dtype=torch.long, device=embeddings[0].device)
    if batch.shape != (n,):
        raise ValueError(f"cge_loss: batch must be (N,) = ({n},), got {tuple(batch.shape)}")
    g = int(batch.max()) + 1
    counts = torch.zeros(g, dtype=embeddings[0].dtype, device=batch.device).index_add(
        0, batch, torch.ones(n, dtype=embeddings[0].dtype, device=batch.device)).clamp_min(1.0)

    def readout(h: Tensor) -> Tensor:
        return torch.zeros(g, h.shape[1], dtype=h.dtype, device=h.device).index_add(0, batch, h) / counts[:, None]

    target = readout(embeddings[-1]).detach()
    total = embeddings[0].new_zeros(())
    for h in embeddings[:-1]:
        total = total + (readout(h) - target).pow(2).sum(1).mean()
    return total
