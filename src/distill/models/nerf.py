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

__all__ = ["NeLF", "NeRF", "ResidualBlock", "fine_uniforms", "positional_encoding", "sample_depths", "sample_pdf"]


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


def sample_pdf(edges: Tensor, weights: Tensor, u: Tensor) -> Tensor:
    """Inverse-transform samples (N, F) of the piecewise-constant PDF along each ray (NeRF's hierarchical
    volume sampling, Mildenhall et al. ECCV 2020, arXiv 2003.08934, Section 5.2).

    Bin ``i`` of a ray is ``[edges[:, i], edges[:, i+1])`` and carries the probability
    ``ŵ_i = w_i / Σ_j w_j``; the density inside a bin is constant. For each ``u`` in ``[0, 1]`` the sample is
    ``F^{-1}(u)``: the bin ``b`` with ``cdf_b <= u < cdf_{b+1}`` (``cdf_0 = 0``, ``cdf_i = Σ_{j<i} ŵ_j``), then
    ``edges_b + (u - cdf_b) / ŵ_b · (edges_{b+1} - edges_b)``, so a bin of zero weight never receives a sample
    (except ``u = 1`` exactly, which lands on the last positive bin's end or after it).

    Args:
        edges: (N, S + 1) increasing bin edges per ray.
        weights: (N, S) non-negative bin weights (NeRF: the coarse compositing weights ``T_i (1 - exp(-σ_i δ_i))``);
            normalised here; a ray whose weights sum to 0 gets a uniform PDF over its bins.
        u: (N, F) uniforms in ``[0, 1]`` (:func:`fine_uniforms`).

    Returns:
        (N, F) depths, in the order of ``u``. Not differentiable through the weights (NeRF does not
        back-propagate through the sampling: callers pass detached weights).
    """
    if edges.dim() != 2 or weights.dim() != 2 or edges.shape != (weights.shape[0], weights.shape[1] + 1):
        raise ValueError(f"edges must be (N, S + 1) for weights (N, S), got {tuple(edges.shape)} and "
                         f"{tuple(weights.shape)}")
    if u.dim() != 2 or u.shape[0] != weights.shape[0]:
        raise ValueError(f"u must be (N, F) with N = {weights.shape[0]}, got {tuple(u.shape)}")
    total = weights.sum(-1, keepdim=True)
    # a ray with no weight at all (empty space) falls back to a uniform PDF rather than dividing by zero
    pdf = torch.where(total > 0, weights / total.clamp_min(torch.finfo(weights.dtype).tiny),
                      torch.full_like(weights, 1.0 / weights.shape[-1]))
    cdf = torch.cat([torch.zeros_like(pdf[:, :1]), pdf.cumsum(-1)], -1)  # (N, S + 1), cdf[:, i] = Σ_{j<i} ŵ_j
    u = u.to(cdf).contiguous()
    # bin b = number of interior cdf values <= u: cdf_b <= u < cdf_{b+1}, so zero-weight bins are skipped
    b = torch.searchsorted(cdf[:, 1:-1].contiguous(), u, right=True)  # (N, F) in [0, S - 1]
    lo_cdf, bin_p = cdf.gather(1, b), pdf.gather(1, b)
    lo_t, hi_t = edges.gather(1, b), edges.gather(1, b + 1)
    frac = ((u - lo_cdf) / bin_p.clamp_min(torch.finfo(pdf.dtype).tiny)).clamp(0.0, 1.0)
    return lo_t + frac * (hi_t - lo_t)


def fine_uniforms(num_rays: int, num_fine: int, *, perturb: bool = False, generator: torch.Generator | None = None,
                  device: torch.device | str | None = None) -> Tensor:
    """The uniforms (num_rays, num_fine) that :func:`sample_pdf` maps to fine depths: i.i.d. ``U[0, 1)``
    when ``perturb`` (NeRF's training), else the fixed quantiles ``(k + 0.5) / num_fine`` (ours: the
    deterministic rendering; nerf-pytorch's ``perturb=False`` uses ``linspace(0, 1)``, whose end points
    map to the support's ends)."""
    if num_fine <= 0:
        raise ValueError(f"num_fine must be > 0, got {num_fine}")
    if perturb:
        return torch.rand(num_rays, num_fine, generator=generator).to(device)
    return ((torch.arange(num_fine, dtype=torch.float32, device=device) + 0.5) / num_fine).expand(num_rays, num_fine)


class NeRF(nn.Module):
    """A NeRF MLP without view directions: point (N, 3) -> (colour (N, 3) in (0, 1), density (N,) >= 0).

    ``depth`` ReLU layers of ``width`` units on ``γ(x / bound)`` (``num_freqs`` frequencies), the input
    re-injected after layer ``skip`` (NeRF's skip connection; ``None``: none), then a linear density head and a
    colour head (sigmoid). The density is ``softplus(raw - 1)`` (mip-NeRF's), not NeRF's ``relu(raw)``: a ReLU
    density that starts at zero everywhere can stay there on a small CPU budget. Our scene is Lambertian, so
    the colour does not depend on the viewing direction (R2L's ``*_noview`` configurations too).
    Paper defaults: ``num_freqs=10``, ``width=256``, ``depth=8``, ``skip=4`` (ours are CPU-sized).

    Hierarchical volume sampling (NeRF Section 5.2): ``num_fine_samples = N_f > 0`` adds a second network of
    the same architecture, ``self.fine`` (this module's own layers are then the *coarse* network).
    :func:`distill.strategies.r2l.render_nerf_rays` evaluates the coarse network at ``N_c = num_samples``
    stratified depths, draws ``N_f`` depths from the piecewise-constant PDF of its compositing weights
    (:func:`sample_pdf`), and evaluates the fine network at all ``N_c + N_f`` depths, sorted; the fine
    rendering is the output, and training adds both renderings' squared errors. Paper: ``N_c = 64``,
    ``N_f = 128``. ``num_fine_samples=0`` (the default): a single network and stratified samples only.
    """

    def __init__(self, num_freqs: int = 6, width: int = 64, depth: int = 4, skip: int | None = None,
                 bound: float = 4.0, num_fine_samples: int = 0) -> None:
        super().__init__()
        if depth < 1 or width < 1:
            raise ValueError(f"depth and width must be >= 1, got depth={depth}, width={width}")
        if skip is not None and not 0 < skip < depth:
            raise ValueError(f"skip must be None or in (0, depth={depth}), got {skip}")
        if isinstance(num_fine_samples, bool) or not isinstance(num_fine_samples, int) or num_fine_samples < 0:
            raise ValueError(f"num_fine_samples must be an int >= 0, got {num_fine_samples!r}")
        self.num_fine_samples = num_fine_samples
        self.num_freqs, self.bound, self.skip = num_freqs, float(bound), skip
        in_dim = 3 * (2 * num_freqs + 1)
        self.layers = nn.ModuleList()
        for k in range(depth):
            fan_in = in_dim if k == 0 else width + (in_dim if skip is not None and k == skip else 0)
            self.layers.append(nn.Linear(fan_in, width))
        self.density = nn.Linear(width, 1)
        self.color = nn.Linear(width, 3)
        # NeRF's fine network: the same architecture, its own weights (Section 5.2 "a second 'fine' network")
        self.fine: NeRF | None = NeRF(num_freqs, width, depth, skip, bound) if num_fine_samples else None

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
        """Multiply-accumulates of one point's forward pass through ONE network (the linear layers; with
        ``num_fine_samples`` the fine network has the same count); a ray costs :meth:`macs_per_ray`."""
        return sum(m.in_features * m.out_features for m in [*self.layers, self.density, self.color])

    def evaluations_per_ray(self, num_samples: int) -> int:
        """Network evaluations to render one ray with ``num_samples`` (coarse) samples: ``N_c``, or
        ``N_c + (N_c + N_f)`` with hierarchical sampling (the fine network sees the coarse depths too)."""
        return num_samples + (num_samples + self.num_fine_samples if self.fine is not None else 0)

    def macs_per_ray(self, num_samples: int) -> int:
        """Multiply-accumulates of rendering one ray: :meth:`macs_per_point` × :meth:`evaluations_per_ray`."""
        return self.macs_per_point() * self.evaluations_per_ray(num_samples)


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
