"""A small neural radiance field (the teacher) and R2L's deep residual MLP neural light field (the student).

* :class:`NeRF` (B. Mildenhall et al., "NeRF: Representing Scenes as Neural Radiance Fields for View
  Synthesis", ECCV 2020, arXiv 2003.08934): an MLP from a positionally encoded 3D point to a colour and a
  volume density; an image needs ``num_samples`` evaluations per pixel, composited by volume rendering
  (:func:`distill.functional.volume_render`).
* :class:`NeLF` (H. Wang et al., "R2L: Distilling Neural Radiance Field to Neural Light Field for Efficient
  Novel View Synthesis", ECCV 2022, arXiv 2203.17261): a ray is represented by ``num_points`` points sampled
  along it between ``near`` and ``far``, each positionally encoded, all concatenated; a deep residual MLP maps
  that vector to the ray's colour in ONE forward pass.

The positional encoding is NeRF's ``γ(p) = (p, sin(2^0 π p), cos(2^0 π p), ..., sin(2^{L-1} π p),
cos(2^{L-1} π p))`` per coordinate, on coordinates divided by ``bound`` (NeRF normalises them to [-1, 1]).
The reference codes of both papers (nerf-pytorch, R2L's) leave out the ``π`` (frequencies ``2^k`` instead of
``2^k π``) and do not divide by a bound.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["NeLF", "NeRF", "ResidualBlock", "positional_encoding", "sample_depths"]


def positional_encoding(x: Tensor, num_freqs: int, include_input: bool = True) -> Tensor:
    """NeRF's encoding of every coordinate: (..., D) -> (..., D * (2 * num_freqs + include_input)).

    Per coordinate ``p`` the features are ``[p,] sin(2^0 π p), cos(2^0 π p), ..., sin(2^{L-1} π p),
    cos(2^{L-1} π p)`` (``L = num_freqs``), laid out coordinate-major: all features of ``x[..., 0]`` first.
    """
    if num_freqs < 0:
        raise ValueError(f"num_freqs must be >= 0, got {num_freqs}")
    freqs = math.pi * 2.0 ** torch.arange(num_freqs, dtype=x.dtype, device=x.device)  # (L,)
    angles = x[..., None] * freqs  # (..., D, L)
    feats = torch.stack([angles.sin(), angles.cos()], -1).flatten(-2)  # (..., D, 2L): sin, cos per frequency
    if include_input:
        feats = torch.cat([x[..., None], feats], -1)
    return feats.flatten(-2)


def sample_depths(near: float, far: float, num_samples: int, num_rays: int, *, perturb: bool = False,
                  generator: torch.Generator | None = None, device: torch.device | str | None = None) -> Tensor:
    """Depths (num_rays, num_samples) along rays: ``[near, far]`` cut into ``num_samples`` equal bins, one
    depth per bin, at the bin's centre (``perturb=False``) or uniformly at random inside it (NeRF's stratified
    sampling, ``perturb=True``)."""
    if not 0 <= near < far:
        raise ValueError(f"need 0 <= near < far, got near={near}, far={far}")
    if num_samples <= 0:
        raise ValueError(f"num_samples must be > 0, got {num_samples}")
    width = (far - near) / num_samples
    lower = near + width * torch.arange(num_samples, dtype=torch.float32, device=device)
    if perturb:
        u = torch.rand(num_rays, num_samples, generator=generator).to(device)  # a CPU generator serves any device
    else:
        u = torch.full((num_rays, num_samples), 0.5, device=device)
    return lower[None] + width * u


class NeRF(nn.Module):
    """A NeRF MLP without view directions: point (N, 3) -> (colour (N, 3) in (0, 1), density (N,) >= 0).

    ``depth`` ReLU layers of ``width`` units on ``γ(x / bound)`` (``num_freqs`` frequencies), the input
    re-injected after layer ``skip`` (NeRF's skip connection; ``None``: none), then a linear density head and a
    colour head (sigmoid). The density is ``softplus(raw - 1)`` (mip-NeRF's), not NeRF's ``relu(raw)``: a ReLU
    density that starts at zero everywhere can stay there on a small CPU budget. Our scene is Lambertian, so
    the colour does not depend on the viewing direction (R2L's ``*_noview`` configurations too).
    Paper defaults: ``num_freqs=10``, ``width=256``, ``depth=8``, ``skip=4`` (ours are CPU-sized).
    """

    def __init__(self, num_freqs: int = 6, width: int = 64, depth: int = 4, skip: int | None = None,
                 bound: float = 4.0) -> None:
        super().__init__()
        if depth < 1 or width < 1:
            raise ValueError(f"depth and width must be >= 1, got depth={depth}, width={width}")
        if skip is not None and not 0 < skip < depth:
            raise ValueError(f"skip must be None or in (0, depth={depth}), got {skip}")
        self.num_freqs, self.bound, self.skip = num_freqs, float(bound), skip
        in_dim = 3 * (2 * num_freqs + 1)
        self.layers = nn.ModuleList()
        for k in range(depth):
            fan_in = in_dim if k == 0 else width + (in_dim if skip is not None and k == skip else 0)
            self.layers.append(nn.Linear(fan_in, width))
        self.density = nn.Linear(width, 1)
        self.color = nn.Linear(width, 3)

    def forward(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """``points`` (..., 3) -> ``(rgb (..., 3), sigma (...))``."""
        enc = positional_encoding(points / self.bound, self.num_freqs)
        h = enc
        for k, layer in enumerate(self.layers):
            if self.skip is not None and k == self.skip:
                h = torch.cat([h, enc], -1)
            h = F.relu(layer(h))
        return torch.sigmoid(self.color(h)), F.softplus(self.density(h).squeeze(-1) - 1.0)

    def macs_per_point(self) -> int:
        """Multiply-accumulates of one point's forward pass (the linear layers); a ray costs ``num_samples`` times it."""
        return sum(m.in_features * m.out_features for m in self.modules() if isinstance(m, nn.Linear))


class ResidualBlock(nn.Module):
    """R2L's residual block: ``x + Linear(ReLU(Linear(x)))`` (two layers, no activation after the sum)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(F.relu(self.fc1(x)))


class NeLF(nn.Module):
    """R2L's neural light field: a ray (N, 6) = (origin, direction) -> its colour (N, 3) in (0, 1), one pass.

    The ray is represented by ``num_points`` depths in ``[near, far]`` (:func:`sample_depths`: bin centres,
    or stratified in training mode when ``perturb``), the points ``o + t d`` (N, K, 3), each encoded by
    :func:`positional_encoding` of ``p / bound``, all concatenated: (N, K * 3 * (2L + 1)). The network
    (``depth`` linear layers in all): a head ``Linear + ReLU`` to ``width``, ``(depth - 2) // 2``
    :class:`ResidualBlock` s, a residual around the whole body, and a tail ``Linear(width, 3) + sigmoid``.

    Paper defaults (R2L's README commands: ``--n_sample_per_ray 16 --netwidth 256 --netdepth 88
    --use_residual --trial.body_arch resmlp``, ``multires`` 10): ``num_points=16``, ``num_freqs=10``,
    ``width=256``, ``depth=88`` (43 blocks). The abstract states the 88 layers; the rest is from that code.
    Taps: ``head``, ``body.{i}``, ``tail``.
    """

    def __init__(self, near: float, far: float, num_points: int = 16, num_freqs: int = 10, width: int = 256,
                 depth: int = 88, bound: float = 4.0, perturb: bool = True) -> None:
        super().__init__()
        if depth < 2:
            raise ValueError(f"depth must be >= 2 (a head and a tail layer), got {depth}")
        if not 0 <= near < far:
            raise ValueError(f"need 0 <= near < far, got near={near}, far={far}")
        self.near, self.far, self.num_points, self.num_freqs = float(near), float(far), num_points, num_freqs
        self.bound, self.perturb = float(bound), perturb
        self.in_dim = num_points * 3 * (2 * num_freqs + 1)
        self.head = nn.Sequential(nn.Linear(self.in_dim, width), nn.ReLU())
        self.body = nn.Sequential(*[ResidualBlock(width) for _ in range((depth - 2) // 2)])
        self.tail = nn.Linear(width, 3)

    def ray_points(self, rays: Tensor) -> Tensor:
        """The ray representation's points (N, K, 3) of ``rays`` (N, 6)."""
        if rays.dim() != 2 or rays.shape[-1] != 6:
            raise ValueError(f"rays must be (N, 6) = (origin, direction), got {tuple(rays.shape)}")
        t = sample_depths(self.near, self.far, self.num_points, rays.shape[0],
                          perturb=self.perturb and self.training, device=rays.device)
        return rays[:, None, :3] + t[..., None] * rays[:, None, 3:]

    def encode(self, rays: Tensor) -> Tensor:
        """The network's input (N, K * 3 * (2L + 1)) for ``rays`` (N, 6)."""
        return positional_encoding(self.ray_points(rays) / self.bound, self.num_freqs).flatten(1)

    def forward(self, rays: Tensor) -> Tensor:
        h = self.head(self.encode(rays))
        h = h + self.body(h)
        return torch.sigmoid(self.tail(h))

    def macs_per_ray(self) -> int:
        """Multiply-accumulates of one ray's forward pass (the linear layers)."""
        return sum(m.in_features * m.out_features for m in self.modules() if isinstance(m, nn.Linear))
