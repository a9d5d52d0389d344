"""Long-tailed subsets (issue 17, part G): the exponential profile of CIFAR-LT (Cui et al. 2019; Cao et al.
2019) applied to any labelled set, and the many/medium/few-shot split of the long-tail literature.

Class ``c`` of ``C`` keeps ``n_c = floor(n_max * imbalance ** (-c / (C - 1)))`` samples, so class 0 keeps
``n_max`` and class ``C-1`` keeps ``n_max / imbalance``. Many-shot classes have more than 100 training
samples, few-shot fewer than 20, medium-shot the rest (Liu et al., "Large-Scale Long-Tailed Recognition in
an Open World", CVPR 2019).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["long_tailed_counts", "long_tailed_indices", "shot_accuracy", "shot_groups"]


def long_tailed_counts(num_classes: int, n_max: int, imbalance: float = 100.0) -> list[int]:
    """``[n_0, ..., n_{C-1}]`` with ``n_c = floor(n_max * imbalance ** (-c / (C - 1)))``."""
    if num_classes < 2 or n_max < 1 or imbalance < 1:
        raise ValueError(f"need num_classes >= 2, n_max >= 1, imbalance >= 1; got {num_classes}, {n_max}, {imbalance}")
    return [int(math.floor(n_max * imbalance ** (-c / (num_classes - 1)) + 1e-9)) for c in range(num_classes)]


def long_tailed_indices(labels: Tensor, n_max: int, imbalance: float = 100.0, seed: int = 0) -> Tensor:
    """Indices ``(M,)`` of a long-tailed subset of ``labels`` ``(N,)``: the first ``n_c`` of a seeded
    permutation of each class ``c`` (classes 0..C-1 in label order, head first)."""
    num_classes = int(labels.max()) + 1
    counts = long_tailed_counts(num_classes, n_max, imbalance)
    g = torch.Generator().manual_seed(seed)
    out = []
    for c, n in enumerate(counts):
        idx = (labels == c).nonzero().flatten()
        if len(idx) < n:
            raise ValueError(f"class {c} has {len(idx)} samples; the profile asks for {n}")
        out.append(idx[torch.randperm(len(idx), generator=g)[:n]])
    return torch.cat(out)


def shot_groups(train_counts: Tensor | list[int], many: int = 100, few: int = 20) -> dict[str, Tensor]:
    """Class masks ``(C,)`` of the many- (> ``many``), medium- and few-shot (< ``few``) classes."""
    n = torch.as_tensor(train_counts)
    return {"many": n > many, "medium": (n <= many) & (n >= few), "few": n < few}


def shot_accuracy(pred: Tensor, targets: Tensor, train_counts: Tensor | list[int]) -> dict[str, float]:
    """Accuracy (%) overall and over the test samples of the many/medium/few-shot classes (NaN for an
    empty group). ``pred`` and ``targets`` are ``(N,)`` class indices."""
    correct = (pred == targets).float()
    out = {"overall": 100.0 * float(correct.mean())}
    for name, mask in shot_groups(train_counts).items():
        keep = mask[targets]
        out[name] = 100.0 * float(correct[keep].mean()) if keep.any() else float("nan")
    return out
