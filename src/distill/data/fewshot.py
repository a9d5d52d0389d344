"""N-way K-shot episodes on held-out classes and their linear-probe evaluation (issue 17, part G).

The protocol of Tian et al. ("Rethinking Few-Shot Image Classification", ECCV 2020) that SKD
(Rajasegaran et al., BMVC 2021, arXiv 2006.09785) follows: the backbone is frozen, each episode's
support and query features are L2-normalised, a logistic regression is fitted on the ``N*K`` support
features and scored on the queries; the mean accuracy over episodes and its 95% interval are reported.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["episode_accuracy", "sample_episode"]


def sample_episode(labels: Tensor, n_way: int, k_shot: int, n_query: int, generator: torch.Generator
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One episode: ``n_way`` classes drawn from ``labels`` ``(N,)``, ``k_shot`` support and ``n_query``
    query samples each. Returns ``(support_idx (n_way*k_shot,), support_y, query_idx (n_way*n_query,),
    query_y)`` with episode labels 0..n_way-1."""
    classes = labels.unique()
    if n_way > len(classes):
        raise ValueError(f"n_way={n_way} but the held-out set has only {len(classes)} classes")
    chosen = classes[torch.randperm(len(classes), generator=generator)[:n_way]]
    s_idx, s_y, q_idx, q_y = [], [], [], []
    for k, c in enumerate(chosen.tolist()):
        idx = (labels == c).nonzero().flatten()
        if len(idx) < k_shot + n_query:
            raise ValueError(f"class {c} has {len(idx)} samples, fewer than k_shot + n_query = {k_shot + n_query}")
        idx = idx[torch.randperm(len(idx), generator=generator)[:k_shot + n_query]]
        s_idx.append(idx[:k_shot]), q_idx.append(idx[k_shot:])
        s_y.append(torch.full((k_shot,), k)), q_y.append(torch.full((n_query,), k))
    return torch.cat(s_idx), torch.cat(s_y), torch.cat(q_idx), torch.cat(q_y)


def episode_accuracy(features: Tensor, labels: Tensor, n_way: int = 5, k_shot: int = 1, n_query: int = 15,
                     episodes: int = 100, seed: int = 0) -> tuple[float, float]:
    """Mean accuracy (%) and 95% confidence half-width over ``episodes`` episodes, each a logistic regression
    (sklearn, L2, lbfgs) on L2-normalised support features ``(N, D)`` scored on its queries."""
    from sklearn.linear_model import LogisticRegression

    feats = torch.nn.functional.normalize(features.detach().double(), dim=1).numpy()
    g = torch.Generator().manual_seed(seed)
    accs = []
    for _ in range(episodes):
        si, sy, qi, qy = sample_episode(labels, n_way, k_shot, n_query, g)
        clf = LogisticRegression(max_iter=1000).fit(feats[si.numpy()], sy.numpy())
        accs.append(float((clf.predict(feats[qi.numpy()]) == qy.numpy()).mean()))
    a = np.asarray(accs)
    return 100.0 * float(a.mean()), 100.0 * 1.96 * float(a.std(ddof=1) if len(a) > 1 else 0.0) / math.sqrt(len(a))
