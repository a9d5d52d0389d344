r"""Graph distillation math: the local structure preserving (LSP) loss and the per-node neighbourhood helpers
it needs (softmax over each node's incoming edges, written with plain ``torch`` scatter operations so
that no optional package is needed).

Edges follow torch-geometric's convention: ``edge_index`` ``(2, E)`` long, row 0 the source ``j``, row 1
the target ``i``; the neighbourhood of node ``i`` is :math:`\mathcal N(i) = \{j : (j, i) \in E\}` (its
incoming edges). A symmetrised graph (every edge in both directions) makes this the usual undirected
neighbourhood.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["LSP_KERNELS", "check_edge_index", "lsp_kernel", "lsp_local_structure", "lsp_loss",
           "segment_log_softmax", "segment_softmax"]

LSP_KERNELS = ("rbf", "linear", "poly", "laplacian")


def check_edge_index(edge_index: Tensor, num_nodes: int, what: str) -> None:
    """``edge_index`` is a ``(2, E)`` integer tensor with every entry in ``[0, num_nodes)``; a ``ValueError``
    naming ``what`` otherwise."""
    if not isinstance(edge_index, Tensor) or edge_index.dim() != 2 or edge_index.shape[0] != 2:
        shape = tuple(edge_index.shape) if isinstance(edge_index, Tensor) else type(edge_index).__name__
        raise ValueError(f"{what}: edge_index must be a (2, E) tensor, got {shape}")
    if edge_index.dtype not in (torch.long, torch.int32, torch.int64):
        raise ValueError(f"{what}: edge_index must hold integer node ids, got dtype {edge_index.dtype}")
    if edge_index.numel() and (int(edge_index.min()) < 0 or int(edge_index.max()) >= num_nodes):
        raise ValueError(f"{what}: edge_index refers to nodes outside [0, {num_nodes}): "
                         f"min {int(edge_index.min())}, max {int(edge_index.max())}")


def segment_log_softmax(scores: Tensor, index: Tensor, num_segments: int) -> Tensor:
    r"""Log-softmax of ``scores`` ``(E,)`` within each group of equal ``index`` ``(E,)`` (values in
    ``[0, num_segments)``): :math:`\log p_e = s_e - \log \sum_{e' : \mathrm{index}_{e'} = \mathrm{index}_e} e^{s_{e'}}`.
    Returns ``(E,)``."""
    index = index.long()
    neg_inf = torch.full((num_segments,), float("-inf"), dtype=scores.dtype, device=scores.device)
    top = neg_inf.scatter_reduce(0, index, scores.detach(), reduce="amax", include_self=True)
    shifted = scores - top[index]
    denom = torch.zeros(num_segments, dtype=scores.dtype, device=scores.device).index_add(0, index, shifted.exp())
    return shifted - denom[index].log()


def segment_softmax(scores: Tensor, index: Tensor, num_segments: int) -> Tensor:
    """Softmax of ``scores`` ``(E,)`` within each group of equal ``index`` ``(E,)``; returns ``(E,)``."""
    return segment_log_softmax(scores, index, num_segments).exp()


def lsp_kernel(zi: Tensor, zj: Tensor, kernel: str = "rbf", sigma: float = 1.0, degree: int = 2,
               coef: float = 1.0) -> Tensor:
    r"""The similarity :math:`\mathrm{SIM}(z_i, z_j)` of paired rows ``zi``, ``zj`` ``(E, D)`` → ``(E,)``.

    * ``"rbf"``: :math:`\exp(-\lVert z_i - z_j \rVert_2^2 / (2\sigma^2))`
    * ``"linear"``: :math:`z_i^\top z_j`
    * ``"poly"``: :math:`(z_i^\top z_j + c)^d` (``coef`` = c, ``degree`` = d)
    * ``"laplacian"``: :math:`\exp(-\lVert z_i - z_j \rVert_1 / \sigma)`: the authors' released code
      (ihollywhy/DistillGCN.PyTorch ``local_structure.py``, ``distanceNet``) computes this with σ = 100.
    """
    if kernel == "rbf":
        return torch.exp(-(zi - zj).pow(2).sum(-1) / (2.0 * sigma * sigma))
    if kernel == "linear":
        return (zi * zj).sum(-1)
    if kernel == "poly":
        return ((zi * zj).sum(-1) + coef).pow(degree)
    if kernel == "laplacian":
        return torch.exp(-(zi - zj).abs().sum(-1) / sigma)
    raise ValueError(f"unknown LSP kernel {kernel!r}; expected one of {LSP_KERNELS}")


def _lsp_edges(edge_index: Tensor, num_nodes: int, exclude_self: bool) -> tuple[Tensor, Tensor]:
    src, dst = edge_index[0].long(), edge_index[1].long()
    if exclude_self:
        keep = src != dst
        src, dst = src[keep], dst[keep]
    if src.numel() == 0:
        raise ValueError("LSP needs at least one edge between distinct nodes; the graph has none")
    return src, dst


def lsp_local_structure(emb: Tensor, edge_index: Tensor, kernel: str = "rbf", sigma: float = 1.0,
                        degree: int = 2, coef: float = 1.0, exclude_self: bool = True) -> Tensor:
    r"""Each node's local structure: the distribution over its neighbours of the kernel similarity.

    .. math:: S_{ij} = \frac{\exp \mathrm{SIM}(z_i, z_j)}{\sum_{k \in \mathcal N(i)} \exp \mathrm{SIM}(z_i, z_k)},
        \qquad j \in \mathcal N(i)

    ``emb`` ``(N, D)`` node embeddings, ``edge_index`` ``(2, E)`` → ``(E',)``: :math:`S_{ij}` for each edge
    ``(j, i)`` kept (self loops dropped when ``exclude_self``), in the order of ``edge_index``.
    """
    if emb.dim() != 2:
        raise ValueError(f"lsp_local_structure needs node embeddings (N, D), got {tuple(emb.shape)}")
    check_edge_index(edge_index, emb.shape[0], "lsp_local_structure")
    src, dst = _lsp_edges(edge_index, emb.shape[0], exclude_self)
    sim = lsp_kernel(emb[dst], emb[src], kernel, sigma, degree, coef)
    return segment_softmax(sim, dst, emb.shape[0])


def lsp_loss(
    student_emb: Tensor,
    teacher_emb: Tensor,
    edge_index: Tensor,
    kernel: str = "rbf",
    sigma: float = 1.0,
    degree: int = 2,
    coef: float = 1.0,
    reverse: bool = False,
    exclude_self: bool = True,
) -> Tensor:
    r"""Local structure preserving loss: the mean over nodes of the KL divergence between the teacher's and
    the student's local structures.

    .. math::
        S^{(\cdot)}_{ij} = \operatorname{softmax}_{j \in \mathcal N(i)} \mathrm{SIM}(z^{(\cdot)}_i, z^{(\cdot)}_j),
        \qquad
        L_{LSP} = \frac{1}{|V'|} \sum_{i \in V'} \sum_{j \in \mathcal N(i)} S^t_{ij} \log \frac{S^t_{ij}}{S^s_{ij}}

    with :math:`V'` the nodes that have at least one neighbour (all nodes of a kNN graph, so the average is
    the paper's 1/N). ``reverse=True`` swaps the arguments of the KL (student ‖ teacher).

    ``student_emb`` ``(N, Ds)`` and ``teacher_emb`` ``(N, Dt)`` (the widths may differ: only similarities
    are compared), ``edge_index`` ``(2, E)`` → scalar. SIM is :func:`lsp_kernel`; self loops are dropped
    when ``exclude_self`` (a node is not its own neighbour in the paper's local structure).

    Paper: Yang, Qiu, Song, Tao, Wang, "Distilling Knowledge from Graph Convolutional Networks", CVPR 2020,
    arXiv 2003.10477 (the local structure preserving module; its kernels: linear, polynomial, RBF). Only
    the paper's abstract and introduction could be read here: the formula above follows the authors'
    released code (ihollywhy/DistillGCN.PyTorch: ``edge_softmax`` of the similarity over each node's
    incoming edges; ``graph_KLDiv`` sums :math:`S^t (\log S^t - \log S^s)` over each node's edges and
    averages over nodes, i.e. KL(teacher ‖ student)), whose kernel is ``"laplacian"`` with σ = 100.
    """
    if student_emb.dim() != 2 or teacher_emb.dim() != 2 or student_emb.shape[0] != teacher_emb.shape[0]:
        raise ValueError(f"lsp_loss needs node embeddings (N, Ds) and (N, Dt) with the same N, got "
                         f"{tuple(student_emb.shape)} and {tuple(teacher_emb.shape)}")
    if sigma <= 0:
        raise ValueError(f"lsp_loss: sigma must be > 0, got {sigma}")
    n = student_emb.shape[0]
    check_edge_index(edge_index, n, "lsp_loss")
    src, dst = _lsp_edges(edge_index, n, exclude_self)
    log_s = segment_log_softmax(lsp_kernel(student_emb[dst], student_emb[src], kernel, sigma, degree, coef), dst, n)
    log_t = segment_log_softmax(lsp_kernel(teacher_emb[dst], teacher_emb[src], kernel, sigma, degree, coef), dst, n)
    if reverse:
        log_s, log_t = log_t, log_s
    per_edge = log_t.exp() * (log_t - log_s)
    per_node = torch.zeros(n, dtype=per_edge.dtype, device=per_edge.device).index_add(0, dst, per_edge)
    has_neighbour = torch.zeros(n, dtype=torch.bool, device=dst.device)
    has_neighbour[dst] = True
    return per_node[has_neighbour].mean()
