"""Graphs built from real images, for node classification (issue 16's graph distillation).

No graph data set can be downloaded here, so the graphs are built from the image sets on this
machine, deterministically by seed:

* :func:`knn_image_graph`: nodes are images (MNIST, Fashion-MNIST or scikit-learn's digits),
  node features their pixels, edges the ``k`` nearest neighbours of each image by cosine
  similarity of the pixel vectors, symmetrised (``i ~ j`` when either is among the other's ``k``
  nearest). Labels are the image classes; the split is the semi-supervised one of the citation
  graphs (Kipf & Welling 2017): ``train_per_class`` labelled nodes per class, ``val_size``
  validation nodes, the rest test. kNN graphs over images are the MNIST graphs of e.g. Franceschi
  et al. (ICML 2019) and graph-based semi-supervised learning before them.
* :func:`hetero_image_graph`: a heterogeneous graph with three node types, for heterogeneous GNNs
  (HIRE): ``image`` nodes (pixels as features), ``class`` nodes (one per class, a one-hot feature)
  linked only to the *training* images of their class (so no evaluated label leaks), and
  ``region`` nodes (the cells of a ``grid × grid`` partition of the image plane, a one-hot
  feature) linked to every image whose mean intensity in that cell exceeds ``region_threshold``
  (which strokes an image has). Image–image kNN edges as above. Every relation is stored in both
  directions (``rev_`` prefix), as message passing needs.

Both return plain tensors (no torch-geometric needed to build or test them);
``HeteroGraphData.to_pyg()`` makes a ``torch_geometric.data.HeteroData``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from distill.batch import GraphBatch

__all__ = ["GraphData", "HeteroGraphData", "hetero_image_graph", "knn_edges", "knn_image_graph", "split_masks"]


@dataclass
class GraphData:
    """One graph for node classification.

    Attributes:
        x: node features ``(N, F)`` float. edge_index: ``(2, E)`` long (both directions present,
        no self-loops). y: labels ``(N,)`` long. train_mask / val_mask / test_mask: ``(N,)`` bool,
        disjoint. num_classes: ``K``. name: how it was built.
    """

    x: Tensor
    edge_index: Tensor
    y: Tensor
    train_mask: Tensor
    val_mask: Tensor
    test_mask: Tensor
    num_classes: int
    name: str = "graph"

    @property
    def num_nodes(self) -> int:
        return int(self.x.shape[0])

    @property
    def num_edges(self) -> int:
        return int(self.edge_index.shape[1])

    def to(self, device: torch.device | str) -> GraphData:
        return replace(self, **{k: getattr(self, k).to(device)
                                for k in ("x", "edge_index", "y", "train_mask", "val_mask", "test_mask")})

    def batch(self, split: str = "train") -> GraphBatch:
        """The whole graph as a :class:`~distill.batch.GraphBatch` whose targets are the labels of
        ``split``'s nodes (``"train"``, ``"val"``, ``"test"``) and ``-100`` elsewhere."""
        masks = {"train": self.train_mask, "val": self.val_mask, "test": self.test_mask}
        if split not in masks:
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        mask = masks[split]
        targets = torch.where(mask, self.y, torch.full_like(self.y, -100))
        return GraphBatch(self.x, targets, edge_index=self.edge_index, mask=mask)


def knn_edges(features: Tensor, k: int, chunk: int = 2048) -> Tensor:
    """Symmetrised kNN edges ``(2, E)`` of the rows of ``features`` ``(N, F)`` by cosine similarity,
    without self-loops, each undirected edge stored in both directions, sorted (source, target)."""
    n = features.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, {n - 1}] for {n} nodes, got {k}")
    unit = F.normalize(features.float(), dim=1)
    neighbours = []
    for start in range(0, n, chunk):
        sim = unit[start:start + chunk] @ unit.T
        rows = torch.arange(start, min(start + chunk, n))
        sim[rows - start, rows] = -float("inf")  # no self-loops
        # ties broken by the lower index: a stable sort of the negated similarities
        neighbours.append(torch.sort(-sim, dim=1, stable=True).indices[:, :k])
    nbr = torch.cat(neighbours)
    src = torch.arange(n).repeat_interleave(k)
    dst = nbr.reshape(-1)
    both = torch.cat([torch.stack([src, dst]), torch.stack([dst, src])], dim=1)
    key = torch.unique(both[0] * n + both[1])
    return torch.stack([key // n, key % n])


def split_masks(y: Tensor, num_classes: int, train_per_class: int, val_size: int,
                generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Disjoint train / val / test masks: ``train_per_class`` random nodes of each class, then
    ``val_size`` random nodes of the rest, the remainder test."""
    n = y.shape[0]
    order = torch.randperm(n, generator=generator)
    train = torch.zeros(n, dtype=torch.bool)
    for c in range(num_classes):
        of_c = order[y[order] == c]
        if len(of_c) < train_per_class:
            raise ValueError(f"class {c} has {len(of_c)} nodes, fewer than train_per_class={train_per_class}")
        train[of_c[:train_per_class]] = True
    rest = order[~train[order]]
    if val_size >= len(rest):
        raise ValueError(f"val_size {val_size} leaves no test nodes ({len(rest)} nodes outside the training set)")
    val = torch.zeros(n, dtype=torch.bool)
    val[rest[:val_size]] = True
    return train, val, ~(train | val)


def _images(dataset: str, split: str) -> tuple[Tensor, Tensor]:
    from distill.data import sources

    if dataset == "mnist":
        return sources.load_mnist(sources._default_mnist_root(), split)
    if dataset == "fashion_mnist":
        return sources.load_fashion_mnist(split=split)
    if dataset == "digits":
        x, y = sources._digits_arrays()
        return torch.as_tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0, torch.as_tensor(y).long()
    raise ValueError(f"dataset must be 'mnist', 'fashion_mnist' or 'digits', got {dataset!r}")


def _pick_nodes(dataset: str, num_nodes: int, seed: int, split: str) -> tuple[Tensor, Tensor, Tensor]:
    images, labels = _images(dataset, split)
    if not 2 <= num_nodes <= len(images):
        raise ValueError(f"num_nodes must be in [2, {len(images)}] for {dataset!r} ({split}), got {num_nodes}")
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(images), generator=g)[:num_nodes].sort().values
    return images[pick], labels[pick], pick


def knn_image_graph(dataset: str = "fashion_mnist", num_nodes: int = 2000, k: int = 10, train_per_class: int = 20,
                    val_size: int = 500, seed: int = 0, split: str = "train") -> GraphData:
    """A kNN graph over ``num_nodes`` images of ``dataset`` (see the module docstring).

    Nodes are drawn from the ``split`` split by a permutation seeded with ``seed`` (kept in data
    set order); features are the pixels ``(N, H·W)`` in [0, 1]; ``k`` nearest neighbours by cosine.
    """
    images, labels, _ = _pick_nodes(dataset, num_nodes, seed, split)
    x = images.flatten(1)
    num_classes = int(labels.max()) + 1
    g = torch.Generator().manual_seed(seed + 1)
    train, val, test = split_masks(labels, num_classes, train_per_class, val_size, g)
    return GraphData(x, knn_edges(x, k), labels, train, val, test, num_classes,
                     name=f"knn_image_graph({dataset}, n={num_nodes}, k={k}, seed={seed})")


@dataclass
class HeteroGraphData:
    """A heterogeneous graph: features per node type, edges per relation ``(src_type, name, dst_type)``.

    Attributes:
        x_dict: ``{node_type: (N_type, F_type)}``. edge_index_dict: ``{(src, rel, dst): (2, E)}``
        (source indices into ``src``'s nodes, targets into ``dst``'s). target_type: the node type
        with labels (``"image"``). y, train_mask, val_mask, test_mask: over ``target_type``'s nodes.
    """

    x_dict: dict[str, Tensor]
    edge_index_dict: dict[tuple[str, str, str], Tensor]
    y: Tensor
    train_mask: Tensor
    val_mask: Tensor
    test_mask: Tensor
    num_classes: int
    target_type: str = "image"
    name: str = "hetero graph"
    metadata_extra: dict[str, Any] = field(default_factory=dict)

    @property
    def node_types(self) -> list[str]:
        return list(self.x_dict)

    @property
    def edge_types(self) -> list[tuple[str, str, str]]:
        return list(self.edge_index_dict)

    def to(self, device: torch.device | str) -> HeteroGraphData:
        return replace(self, x_dict={k: v.to(device) for k, v in self.x_dict.items()},
                       edge_index_dict={k: v.to(device) for k, v in self.edge_index_dict.items()},
                       y=self.y.to(device), train_mask=self.train_mask.to(device),
                       val_mask=self.val_mask.to(device), test_mask=self.test_mask.to(device))

    def to_pyg(self) -> Any:
        """A ``torch_geometric.data.HeteroData`` with the same tensors (``y`` and masks on the target type)."""
        from distill.integrations import require

        pyg_data = require("torch_geometric.data", "graph", "HeteroGraphData.to_pyg")
        data = pyg_data.HeteroData()
        for t, x in self.x_dict.items():
            data[t].x = x
        for key, ei in self.edge_index_dict.items():
            data[key].edge_index = ei
        target = data[self.target_type]
        target.y, target.train_mask, target.val_mask, target.test_mask = (
            self.y, self.train_mask, self.val_mask, self.test_mask)
        return data


def _bipartite(src: Tensor, dst: Tensor) -> Tensor:
    return torch.stack([src.long(), dst.long()])


def hetero_image_graph(dataset: str = "fashion_mnist", num_nodes: int = 2000, k: int = 10, grid: int = 7,
                       region_threshold: float = 0.3, train_per_class: int = 20, val_size: int = 500,
                       seed: int = 0, split: str = "train") -> HeteroGraphData:
    """A heterogeneous image / class / region graph over ``num_nodes`` images (see the module docstring).

    Relations: ``("image", "similar", "image")`` (symmetrised kNN), ``("image", "in_class", "class")``
    for training images only, ``("image", "has", "region")`` where the image's mean intensity in the
    region exceeds ``region_threshold``; and each of the last two reversed (``rev_in_class``,
    ``rev_has``). Node features: image pixels ``(N, H·W)``; class one-hot ``(K, K)``; region one-hot
    ``(grid², grid²)``.
    """
    images, labels, _ = _pick_nodes(dataset, num_nodes, seed, split)
    h, w = images.shape[-2:]
    if h % grid or w % grid:
        raise ValueError(f"grid {grid} must divide the image size {h}×{w}")
    x = images.flatten(1)
    num_classes = int(labels.max()) + 1
    g = torch.Generator().manual_seed(seed + 1)
    train, val, test = split_masks(labels, num_classes, train_per_class, val_size, g)
    cells = F.avg_pool2d(images, (h // grid, w // grid)).flatten(1)  # (N, grid²) mean intensity per cell
    img_idx, region_idx = (cells > region_threshold).nonzero(as_tuple=True)
    train_idx = train.nonzero(as_tuple=True)[0]
    edges = {
        ("image", "similar", "image"): knn_edges(x, k),
        ("image", "in_class", "class"): _bipartite(train_idx, labels[train_idx]),
        ("class", "rev_in_class", "image"): _bipartite(labels[train_idx], train_idx),
        ("image", "has", "region"): _bipartite(img_idx, region_idx),
        ("region", "rev_has", "image"): _bipartite(region_idx, img_idx),
    }
    feats = {"image": x, "class": torch.eye(num_classes), "region": torch.eye(grid * grid)}
    return HeteroGraphData(feats, edges, labels, train, val, test, num_classes,
                           name=f"hetero_image_graph({dataset}, n={num_nodes}, k={k}, grid={grid}, seed={seed})")
