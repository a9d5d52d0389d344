r"""Volume rendering (NeRF's teacher side) and R2L's light-field distillation loss.

NeRF (B. Mildenhall et al., ECCV 2020, arXiv 2003.08934), eq. 3: with samples ``i = 1..S`` along a ray at
colours :math:`c_i`, densities :math:`\sigma_i` and interval lengths :math:`\delta_i`,

.. math::
    \alpha_i = 1 - e^{-\sigma_i \delta_i},\quad T_i = \prod_{j<i} (1 - \alpha_j),\quad
    w_i = T_i \alpha_i,\quad \hat C = \sum_i w_i c_i + \Big(1 - \sum_i w_i\Big) c_{bg}.

The background term composites the ray over a constant background colour (nerf-pytorch's ``white_bkgd``).

R2L (H. Wang et al., "R2L: Distilling Neural Radiance Field to Neural Light Field for Efficient Novel View
Synthesis", ECCV 2022, arXiv 2203.17261) trains the light field with the mean squared error between its
colour of a ray and the target colour: the teacher NeRF's rendering on pseudo-data, the image's pixel when
fine-tuning on the real views (:func:`r2l_loss`).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["interval_lengths", "r2l_loss", "volume_render", "volume_render_weights"]


def interval_lengths(depths: Tensor, far: float, ray_norm: Tensor | None = None) -> Tensor:
    """Metric lengths δ (N, S) of the intervals that samples at ``depths`` (N, S, increasing) stand for:
    ``δ_i = t_{i+1} - t_i`` and ``δ_S = far - t_S``, times ``|d|`` (``ray_norm`` (N,)) when the direction is
    not unit length (NeRF multiplies by ``|d|`` likewise; nerf-pytorch's last interval is ``1e10`` instead of
    reaching ``far``, which makes the last sample opaque whatever its density)."""
    if depths.dim() != 2:
        raise ValueError(f"depths must be (N, S), got {tuple(depths.shape)}")
    last = (far - depths[:, -1:]).clamp_min(0)
    deltas = torch.cat([depths[:, 1:] - depths[:, :-1], last], 1)
    return deltas if ray_norm is None else deltas * ray_norm[:, None]


def volume_render_weights(sigma: Tensor, deltas: Tensor) -> Tensor:
    """Compositing weights ``w_i = T_i α_i`` (N, S) of densities ``sigma`` (N, S) >= 0 over intervals
    ``deltas`` (N, S)."""
    if sigma.shape != deltas.shape:
        raise ValueError(f"sigma {tuple(sigma.shape)} and deltas {tuple(deltas.shape)} must have the same shape")
    tau = sigma * deltas
    alpha = 1.0 - torch.exp(-tau)
    # T_i = exp(-Σ_{j<i} σ_j δ_j): the exclusive cumulative sum, stable where α is close to 1
    trans = torch.exp(-torch.cumsum(torch.cat([torch.zeros_like(tau[:, :1]), tau[:, :-1]], 1), 1))
    return trans * alpha


def volume_render(rgb: Tensor, sigma: Tensor, deltas: Tensor, depths: Tensor | None = None,
                  background: Tensor | None = None) -> dict[str, Tensor]:
    """Composite samples along rays (NeRF eq. 3, see the module docstring).

    Args:
        rgb: (N, S, 3) sample colours; sigma: (N, S) densities >= 0; deltas: (N, S) interval lengths
            (:func:`interval_lengths`); depths: (N, S) sample depths, for the expected depth (optional);
            background: (3,) colour behind the ray; ``None``: black (no background term).

    Returns:
        ``{"rgb": (N, 3), "acc": (N,) opacity Σ w_i, "weights": (N, S)}`` and ``"depth": (N,) Σ w_i t_i``
        when ``depths`` is given.
    """
    if rgb.dim() != 3 or rgb.shape[:2] != sigma.shape or rgb.shape[-1] != 3:
        raise ValueError(f"rgb must be (N, S, 3) matching sigma (N, S), got {tuple(rgb.shape)} and {tuple(sigma.shape)}")
    weights = volume_render_weights(sigma, deltas)
    acc = weights.sum(1)
    color = (weights[..., None] * rgb).sum(1)
    if background is not None:
        color = color + (1.0 - acc)[:, None] * background.to(color)
    out = {"rgb": color, "acc": acc, "weights": weights}
    if depths is not None:
        out["depth"] = (weights * depths).sum(1)
    return out


def r2l_loss(student_rgb: Tensor, target_rgb: Tensor) -> Tensor:
    """R2L's training loss: ``mean over rays and channels of (student_rgb - target_rgb)²``, both (N, 3)
    (the teacher's rendered colour on pseudo-data, the pixel on real data)."""
    if student_rgb.shape != target_rgb.shape:
        raise ValueError(f"student_rgb {tuple(student_rgb.shape)} and target_rgb {tuple(target_rgb.shape)} differ")
    return ((student_rgb - target_rgb.detach()) ** 2).mean()
