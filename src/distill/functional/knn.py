r"""Exact k-nearest-neighbour retrieval over a token datastore and the retrieval distribution of
kNN-MT / kNN-KD.

A datastore holds ``M`` entries: a key ``k_j`` (a model's hidden state at one target position,
``(H,)``) and a value ``v_j`` (the gold token at that position). For a query ``h``, the ``k``
nearest keys by squared Euclidean distance ``d_j = ‖h − k_j‖²`` give (Khandelwal et al., "Nearest
Neighbor Machine Translation", ICLR 2021, arXiv 2010.00710, Eq. 2; the teacher of Yang et al.,
"Nearest Neighbor Knowledge Distillation for Neural Machine Translation", NAACL 2022, arXiv
2205.00479):

.. math::

    p_{kNN}(y) = \frac{\sum_{j \in N(h)} 1[v_j = y] \exp(-d_j / T)}{\sum_{j \in N(h)} \exp(-d_j / T)}

The search is exact (a chunked ``torch.cdist``), which is what small datastores need; no faiss.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["knn_distribution", "knn_search"]


def knn_search(queries: Tensor, keys: Tensor, k: int, *, exclude: Tensor | None = None,
               chunk_size: int = 4096) -> tuple[Tensor, Tensor]:
    """The ``k`` nearest keys of each query by squared Euclidean distance, nearest first.

    Shapes: queries ``(N, H)``, keys ``(M, H)`` → ``(distances (N, k) float32, indices (N, k) long)``.
    ``exclude`` ``(N,)`` long: for each query, a key index never returned (the query's own entry when
    the queries are the datastore's keys; ``-1`` = none). Queries are processed ``chunk_size`` at a time.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if queries.dim() != 2 or keys.dim() != 2 or queries.shape[1] != keys.shape[1]:
        raise ValueError(f"queries (N, H) and keys (M, H) must share H, got {tuple(queries.shape)} and "
                         f"{tuple(keys.shape)}")
    available = keys.shape[0] - (1 if exclude is not None else 0)
    if k > available:
        raise ValueError(f"k={k} neighbours asked for but the datastore has {keys.shape[0]} entries"
                         + (" (one excluded per query)" if exclude is not None else ""))
    if exclude is not None and tuple(exclude.shape) != (queries.shape[0],):
        raise ValueError(f"exclude must be (N,) = ({queries.shape[0]},), got {tuple(exclude.shape)}")
    keys32 = keys.float()
    out_d, out_i = [], []
    for start in range(0, queries.shape[0], chunk_size):
        q = queries[start:start + chunk_size].float()
        d = torch.cdist(q, keys32).square()
        if exclude is not None:
            ex = exclude[start:start + chunk_size].long()
            rows = (ex >= 0).nonzero().squeeze(1)
            d[rows, ex[rows]] = math.inf
        dist, idx = d.topk(k, dim=1, largest=False)
        out_d.append(dist)
        out_i.append(idx)
    if not out_d:
        return keys32.new_zeros(0, k), torch.zeros(0, k, dtype=torch.long, device=keys.device)
    return torch.cat(out_d), torch.cat(out_i)


def knn_distribution(distances: Tensor, values: Tensor, vocab_size: int, temperature: float) -> Tensor:
    r"""The retrieval distribution: ``softmax(−d / T)`` over the neighbours, summed per token.

    Shapes: distances ``(N, k)``, values ``(N, k)`` long token ids in ``[0, V)`` → ``(N, V)``
    probabilities (float32). ``temperature`` ``T > 0``.
    """
    if isinstance(temperature, bool) or not (math.isfinite(float(temperature)) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if distances.shape != values.shape or distances.dim() != 2:
        raise ValueError(f"distances and values must both be (N, k), got {tuple(distances.shape)} and "
                         f"{tuple(values.shape)}")
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= vocab_size):
        raise ValueError(f"values must be token ids in [0, {vocab_size}), got range "
                         f"[{int(values.min())}, {int(values.max())}]")
    w = torch.softmax(-distances.float() / temperature, dim=1)
    out = torch.zeros(distances.shape[0], vocab_size, dtype=w.dtype, device=w.device)
    return out.scatter_add_(1, values.long(), w)
