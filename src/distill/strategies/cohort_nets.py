"""The networks of the online strategies that share a trunk: rocket launching's light + booster
net and OKDHP's multi-branch net with its feature aggregation unit.

They live below both :mod:`distill.strategies.online` (which trains them) and
:mod:`distill.strategies.composite` (which builds them from zoo models), so that neither of those
imports the other's way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from distill import functional as DF
from distill.taps import logits_of

__all__ = ["FeatureAggregationUnit", "MultiBranchNet", "RocketNet"]


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


class RocketNet(nn.Module):
    """A light net and a booster net sharing their lower layers (rocket launching's whole net).

    ``forward(x)``: ``h = trunk(x)``; returns the light net's logits ``light(h)`` (B, K) and passes
    the booster's logits ``booster(h)`` (B, K) through the tap point ``booster_logits`` (an
    ``nn.Identity``), where :class:`~distill.methods.online.RocketHint` and
    :class:`~distill.methods.online.RocketBoosterCE` read them. Any three modules work, e.g. a
    stem, a one-layer head and a deeper head.

    After training deploy :meth:`light_net` (trunk + light head: the booster is not run);
    :meth:`booster_net` is the booster alone. Both share the parameters of this module.
    """

    def __init__(self, trunk: nn.Module, light: nn.Module, booster: nn.Module) -> None:
        super().__init__()
        for name, m in (("trunk", trunk), ("light", light), ("booster", booster)):
            if not isinstance(m, nn.Module):
                raise TypeError(f"RocketNet: {name} must be an nn.Module, got {type(m).__name__}")
        self.trunk, self.light, self.booster = trunk, light, booster
        self.booster_logits = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.trunk(x)
        self.booster_logits(logits_of(self.booster(h)))
        return logits_of(self.light(h))

    def light_net(self) -> nn.Module:
        """The deployable light net: trunk then light head (shares this module's parameters)."""
        return nn.Sequential(self.trunk, self.light)

    def booster_net(self) -> nn.Module:
        """The booster net: trunk then booster head (shares this module's parameters)."""
        return nn.Sequential(self.trunk, self.booster)


class FeatureAggregationUnit(nn.Module):
    """OKDHP's feature aggregation unit (FAU): per-sample, per-channel weights of M branches.

    From the shared feature (B, C_in, H, W): M parallel conv-BN-ReLU paths with kernels 3, 5, 7, ...
    (one per branch), summed, averaged over space, a linear map to ``mid_channels``, then one linear
    map per branch to the C output channels; a softmax over the branches gives weights (B, M, C)
    for :func:`~distill.functional.okdhp_ensemble`. As in the reference code (``mid_channel = 64``,
    no activation after the first linear map).
    """

    def __init__(self, in_channels: int, num_branches: int, out_channels: int, mid_channels: int = 64) -> None:
        super().__init__()
        _positive_int("in_channels", in_channels)
        _positive_int("num_branches", num_branches, minimum=2)
        _positive_int("out_channels", out_channels)
        _positive_int("mid_channels", mid_channels)
        self.convs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(in_channels, in_channels, 3 + 2 * i, padding=1 + i),
                          nn.BatchNorm2d(in_channels), nn.ReLU())
            for i in range(num_branches)
        )
        self.fc = nn.Linear(in_channels, mid_channels)
        self.fcs = nn.ModuleList(nn.Linear(mid_channels, out_channels) for _ in range(num_branches))

    def forward(self, feature: Tensor) -> Tensor:
        if feature.dim() != 4:
            raise ValueError(f"FeatureAggregationUnit expects a feature map (B, C, H, W), got {tuple(feature.shape)}")
        fused = sum(conv(feature) for conv in self.convs)
        z = self.fc(fused.mean(dim=(2, 3)))  # type: ignore[union-attr]
        return torch.softmax(torch.stack([fc(z) for fc in self.fcs], dim=1), dim=1)


class MultiBranchNet(nn.Module):
    """A shared trunk, M branches with dense heads and an aggregation unit (OKDHP's network).

    ``forward(x)`` → ``(branch_maps, ensemble)``: every branch's output (M, B, C, H, W) and their
    FAU-weighted ensemble (B, C, H, W). Give either ``fau`` (a module: trunk feature → weights
    (B, M, C)) or ``in_channels`` (the trunk's output channels) and ``out_channels`` (C) to build a
    :class:`FeatureAggregationUnit`. After training deploy :meth:`branch_net` (trunk + one branch).
    """

    def __init__(self, trunk: nn.Module, branches: Sequence[nn.Module], fau: nn.Module | None = None, *,
                 in_channels: int | None = None, out_channels: int | None = None, mid_channels: int = 64) -> None:
        super().__init__()
        branches = list(branches)
        if len(branches) < 2:
            raise ValueError(f"MultiBranchNet needs at least 2 branches, got {len(branches)}")
        if fau is None:
            if in_channels is None or out_channels is None:
                raise ValueError("MultiBranchNet: give fau, or in_channels and out_channels to build the default "
                                 "FeatureAggregationUnit")
            fau = FeatureAggregationUnit(in_channels, len(branches), out_channels, mid_channels)
        self.trunk = trunk
        self.branches = nn.ModuleList(branches)
        self.fau = fau

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.trunk(x)
        maps = torch.stack([b(h) for b in self.branches])
        return maps, DF.okdhp_ensemble(maps, self.fau(h))

    def branch_net(self, index: int = 0) -> nn.Module:
        """Trunk then branch ``index``: the single-branch model to deploy (shares parameters)."""
        return nn.Sequential(self.trunk, self.branches[index])
