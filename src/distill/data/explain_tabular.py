"""scikit-learn's bundled tabular data sets (no download), split and standardised, for the explanation
strategies (:mod:`distill.strategies.explain_additive`, :mod:`distill.strategies.explain_yasenn`)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["TABULAR", "TabularSplit", "load_tabular_split"]

TABULAR = ("breast_cancer", "wine")
"""The classification sets bundled with scikit-learn that :func:`load_tabular_split` serves."""


class TabularSplit(NamedTuple):
    """Standardised features ``(N, D)`` float32 and labels ``(N,)`` long of both parts, and the feature names."""

    train_inputs: Tensor
    train_targets: Tensor
    val_inputs: Tensor
    val_targets: Tensor
    feature_names: list[str]
    mean: Tensor  # (D,) the training mean the features were centred by
    std: Tensor  # (D,) and the training standard deviation they were divided by


def load_tabular_split(name: str, val_fraction: float = 0.3, seed: int = 0) -> TabularSplit:
    """``"breast_cancer"`` (569 × 30, 2 classes) or ``"wine"`` (178 × 13, 3 classes), split stratified by
    class and standardised with the training part's mean and standard deviation."""
    from sklearn import datasets
    from sklearn.model_selection import train_test_split

    if name not in TABULAR:
        raise ValueError(f"unknown tabular data set {name!r}; expected one of {TABULAR}")
    if not 0.0 < float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1); got {val_fraction!r}")
    bunch = getattr(datasets, f"load_{name}")()
    x, y = bunch.data.astype(np.float64), bunch.target.astype(np.int64)
    xt, xv, yt, yv = train_test_split(x, y, test_size=val_fraction, random_state=seed, stratify=y)
    mean, std = xt.mean(0), xt.std(0)
    std[std == 0] = 1.0

    def f(a: np.ndarray) -> Tensor:
        return torch.tensor((a - mean) / std, dtype=torch.float32)

    return TabularSplit(f(xt), torch.from_numpy(yt), f(xv), torch.from_numpy(yv), list(bunch.feature_names),
                        torch.from_numpy(mean), torch.from_numpy(std))
