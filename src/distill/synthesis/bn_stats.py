"""BatchNorm-statistics matching: the feature-distribution regulariser of DeepInversion.

Yin et al., "Dreaming to Distill: Data-free Knowledge Transfer via DeepInversion", CVPR 2020,
arXiv 1912.08795, the feature distribution regularisation of its method section:

    R_feature(x) = sum_l || mu_l(x) - E(mu_l | X) ||_2 + || sigma^2_l(x) - E(sigma^2_l | X) ||_2

where ``mu_l(x)`` and ``sigma^2_l(x)`` are the per-channel batch mean and (biased) variance of the
input of the l-th BatchNorm layer on the synthesised batch ``x``, and the expectations over the
training data are the layer's ``running_mean`` and ``running_var``. The authors' code multiplies
the first layer's term by a ``first_bn_multiplier`` (10 in their ImageNet script);
``first_weight`` is that factor (default 1, the paper's plain sum).

    with BatchNormStatistics(teacher, first_weight=10.0) as bn:
        logits = teacher(x)          # x: (B, C, H, W), requires_grad
        loss = ce(logits, y) + 0.01 * bn.loss()
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["BatchNormStatistics"]

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of a BN input ``(N, C, *spatial)`` over ``N`` and every
    spatial axis; returns two ``(C,)`` tensors."""
    dims = [0, *range(2, x.dim())]
    return x.mean(dim=dims), x.var(dim=dims, correction=0)


class BatchNormStatistics:
    """Forward hooks on every ``nn.BatchNorm1d/2d/3d`` of ``model`` that record the batch statistics
    of each layer's input; :meth:`loss` compares them with the layers' running statistics.

    Args:
        model: the (usually frozen, eval-mode) network whose BN layers hold the data statistics.
        first_weight: the factor on the first BN layer's term (in ``model.named_modules()`` order).

    Raises:
        ValueError: ``model`` has no BatchNorm layer, or one of them keeps no running statistics.
    """

    def __init__(self, model: nn.Module, first_weight: float = 1.0) -> None:
        layers = [(name, m) for name, m in model.named_modules() if isinstance(m, _BN_TYPES)]
        if not layers:
            raise ValueError(f"BatchNormStatistics: model {type(model).__name__} has no BatchNorm1d/2d/3d "
                             f"layer, so there are no statistics to match")
        for name, m in layers:
            if m.running_mean is None or m.running_var is None:
                raise ValueError(f"BatchNormStatistics: BatchNorm layer {name!r} of {type(model).__name__} "
                                 f"has track_running_stats=False, so it holds no data statistics to match")
        self.model_name = type(model).__name__
        self.names = [name for name, _ in layers]
        self.first_weight = float(first_weight)
        self._layers = [m for _, m in layers]
        self._stats: list[tuple[Tensor, Tensor] | None] = [None] * len(layers)
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self._layers)]

    def _hook(self, index: int) -> Any:
        def record(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            self._stats[index] = _batch_stats(inputs[0])
        return record

    def per_layer(self) -> list[Tensor]:
        """The unweighted term of each BN layer from the last forward pass, in module order:
        ``||mu_l - running_mean_l||_2 + ||var_l - running_var_l||_2``, each a scalar tensor.

        Raises:
            RuntimeError: a layer has not seen a forward pass since the hooks were registered.
        """
        terms = []
        for name, layer, stats in zip(self.names, self._layers, self._stats):
            if stats is None:
                raise RuntimeError(f"BatchNormStatistics: layer {name!r} of {self.model_name} has not run; "
                                   f"call the model on a batch before .loss()")
            mean, var = stats
            terms.append(torch.linalg.vector_norm(mean - layer.running_mean)
                         + torch.linalg.vector_norm(var - layer.running_var))
        return terms

    def loss(self) -> Tensor:
        """``first_weight * term_1 + sum_{l>1} term_l`` (scalar), from the last forward pass."""
        terms = self.per_layer()
        return self.first_weight * terms[0] + sum(terms[1:], torch.zeros_like(terms[0]))

    def remove(self) -> None:
        """Remove every hook and forget the recorded statistics."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._stats = [None] * len(self._layers)

    def __enter__(self) -> BatchNormStatistics:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
