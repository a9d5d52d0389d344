"""A tiny MVSNet-style multi-view stereo network and the warping geometry it and its losses share.

MVSNet (Yao et al., "MVSNet: Depth Inference for Unstructured Multi-view Stereo", ECCV 2018, arXiv
1804.02505) is the backbone KD-MVS builds on (the paper uses CasMVSNet; one stage here). The pipeline:

1. a shared 2D CNN turns every view ``(B, V, 3, H, W)`` into features ``(B·V, C, H, W)`` (full resolution,
   the images are small);
2. :func:`plane_sweep_warp` warps each source's features to the reference camera at the ``D`` depth
   hypotheses (the plane-induced homography, computed by back-projection);
3. the variance over views ``(B, C, D, H, W)`` is the cost volume;
4. a small 3D CNN (one down/up level) regularises it into one score per hypothesis ``(B, D, H, W)``;
5. a softmax over ``D`` gives the probability volume; the expected depth ``Σ_d P_d·d`` is the output.

Projections follow :mod:`distill.data.mvs`: ``P = [[K, 0], [0, 1]] @ [R | t]`` (4, 4), so
``P @ [X, 1] = [u·z, v·z, z, 1]`` with pixel ``(u, v)`` = (column, row) at integer pixel centres.

Tap points (``nn.Identity``): ``features`` ``(B·V, C, H, W)`` (views of a scene consecutive),
``cost_logits`` ``(B, D, H, W)`` (the regularised scores before the softmax) and ``log_prob``
``(B, D, H, W)`` (the log-probability volume). ``model(x)`` returns the expected depth ``(B, H, W)``;
:meth:`MVSNet.predict` returns everything (depth, probability volume, confidence, features).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.data.mvs import unpack_views
from distill.models.registry import register_model

__all__ = ["MVSNet", "mvsnet_student", "mvsnet_teacher", "plane_sweep_warp", "reproject", "sample_pixels", "warp_by_depth"]


# ----------------------------------------------------------------------------------------- geometry


def reproject(src_proj: Tensor, ref_proj: Tensor, depth: Tensor) -> Tensor:
    """Source-view pixel coordinates of reference pixels back-projected at ``depth``.

    Args:
        src_proj, ref_proj: ``(B, 4, 4)``. depth: ``(B, D, H, W)`` (one map per hypothesis) or ``(B, H, W)``.

    Returns:
        ``(B, D, H, W, 3)`` (or ``(B, H, W, 3)``): ``(u', v', z')``, the source pixel and the point's depth in
        the source camera; ``u' = (M₀·[u, v, 1]·d + m₀) / (M₂·[u, v, 1]·d + m₂)`` with ``[M | m]`` the top
        three rows of ``src_proj @ ref_proj⁻¹``. For a fronto-parallel plane at ``d`` this is the plane
        homography ``K_s (R − t·nᵀ/d) K_r⁻¹``.
    """
    squeeze = depth.dim() == 3
    if squeeze:
        depth = depth[:, None]
    b, d, h, w = depth.shape
    m = src_proj.double() @ torch.linalg.inv(ref_proj.double())
    rot, trans = m[:, :3, :3].to(depth.dtype), m[:, :3, 3].to(depth.dtype)
    v, u = torch.meshgrid(torch.arange(h, dtype=depth.dtype, device=depth.device),
                          torch.arange(w, dtype=depth.dtype, device=depth.device), indexing="ij")
    pix = torch.stack([u, v, torch.ones_like(u)]).reshape(3, -1)                       # (3, HW)
    rays = rot @ pix                                                                   # (B, 3, HW)
    pts = rays[:, :, None, :] * depth.reshape(b, 1, d, h * w) + trans[:, :, None, None]  # (B, 3, D, HW)
    z = pts[:, 2]
    safe = torch.where(z.abs() < 1e-6, torch.full_like(z, 1e-6), z)
    out = torch.stack([pts[:, 0] / safe, pts[:, 1] / safe, z], -1).reshape(b, d, h, w, 3)
    return out[:, 0] if squeeze else out


def sample_pixels(src: Tensor, uv: Tensor) -> tuple[Tensor, Tensor]:
    """Bilinear samples of ``src`` (B, C, H, W) at pixel coordinates ``uv`` (B, ..., 2); zeros and
    ``valid = False`` outside the image."""
    h, w = src.shape[-2:]
    shape = uv.shape[1:-1]
    grid = torch.stack([uv[..., 0] * 2 / max(w - 1, 1) - 1, uv[..., 1] * 2 / max(h - 1, 1) - 1], -1)
    grid = grid.reshape(uv.shape[0], -1, shape[-1], 2)
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    eps = 1e-3  # float noise at the border (an exact border pixel must stay inside)
    valid = (uv[..., 0] >= -eps) & (uv[..., 0] <= w - 1 + eps) & (uv[..., 1] >= -eps) & (uv[..., 1] <= h - 1 + eps)
    return out.reshape(src.shape[0], src.shape[1], *shape), valid


def plane_sweep_warp(src: Tensor, src_proj: Tensor, ref_proj: Tensor, depth_values: Tensor) -> Tensor:
    """Warp source features to the reference camera at each depth hypothesis (MVSNet's differentiable
    homography): ``out[b, :, k, v, u] = src[b, :, v', u']`` with ``(u', v')`` from :func:`reproject` at
    depth ``depth_values[k]``; bilinear, zeros outside the source image.

    Args:
        src: ``(B, C, H, W)``. src_proj, ref_proj: ``(B, 4, 4)``. depth_values: ``(D,)`` or ``(B, D)``.

    Returns:
        ``(B, C, D, H, W)``.
    """
    b, _, h, w = src.shape
    dv = depth_values.to(src.dtype)
    dv = dv.expand(b, -1) if dv.dim() == 1 else dv
    uvz = reproject(src_proj, ref_proj, dv[:, :, None, None].expand(b, dv.shape[1], h, w))
    out, _ = sample_pixels(src, uvz[..., :2])
    return out


def warp_by_depth(src: Tensor, src_proj: Tensor, ref_proj: Tensor, depth: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse warping: the source image seen from the reference camera through the reference depth.

    Args:
        src: ``(B, C, H, W)``. src_proj, ref_proj: ``(B, 4, 4)``. depth: reference depth ``(B, H, W)``.

    Returns:
        warped ``(B, C, H, W)`` and valid ``(B, H, W)`` bool (the point projects inside the source image, in
        front of its camera). Differentiable in ``depth`` (through the bilinear sampling).
    """
    uvz = reproject(src_proj, ref_proj, depth)
    out, valid = sample_pixels(src, uvz[:, None, ..., :2])
    return out[:, :, 0], valid[:, 0] & (uvz[..., 2] > 1e-6)


# ----------------------------------------------------------------------------------------- network


def _conv2d(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _conv3d(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm3d(cout),
                         nn.ReLU(inplace=True))


class MVSNet(nn.Module):
    """A one-stage MVSNet for small images (see the module docstring).

    Args:
        depth_values: the hypotheses ``(D,)`` (``D`` and ``H``, ``W`` even: the 3D CNN halves them once).
        feat_channels: feature channels ``C``. reg_channels: width of the 3D CNN. in_channels: image channels.

    ``forward(x)``: ``x`` packed views ``(B, V, in_channels+1, H, W)`` (:func:`distill.data.mvs.pack_views`,
    view 0 the reference) → expected depth ``(B, H, W)``.
    """

    def __init__(self, depth_values: Tensor, feat_channels: int = 16, reg_channels: int = 8,
                 in_channels: int = 3) -> None:
        super().__init__()
        depth_values = torch.as_tensor(depth_values, dtype=torch.float32)
        if depth_values.dim() != 1 or len(depth_values) < 2 or len(depth_values) % 2:
            raise ValueError(f"depth_values must be a 1-D tensor of an even number (>= 2) of hypotheses, got shape "
                             f"{tuple(depth_values.shape)}")
        if not bool((depth_values.diff() > 0).all()):
            raise ValueError("depth_values must increase strictly")
        self.register_buffer("depth_values", depth_values)
        self.in_channels = in_channels
        c, r = feat_channels, reg_channels
        self.feature_net = nn.Sequential(_conv2d(in_channels, c), _conv2d(c, c), nn.Conv2d(c, c, 3, padding=1))
        self.features = nn.Identity()
        self.reg0 = _conv3d(c, r)
        self.reg1 = _conv3d(r, 2 * r, stride=2)
        self.reg2 = _conv3d(2 * r, 2 * r)
        self.up = nn.Sequential(nn.ConvTranspose3d(2 * r, r, 3, stride=2, padding=1, output_padding=1, bias=False),
                                nn.BatchNorm3d(r), nn.ReLU(inplace=True))
        self.score = nn.Conv3d(r, 1, 3, padding=1)
        self.cost_logits = nn.Identity()
        self.log_prob = nn.Identity()

    def _check(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.dim() != 5 or x.shape[2] != self.in_channels + 1:
            raise ValueError(f"MVSNet expects packed views (B, V, {self.in_channels + 1}, H, W) from pack_views, got "
                             f"{tuple(x.shape)}")
        if x.shape[1] < 2:
            raise ValueError(f"MVSNet needs a reference and at least one source view, got V = {x.shape[1]}")
        if x.shape[-1] % 2 or x.shape[-2] % 2:
            raise ValueError(f"MVSNet needs an even image height and width, got {tuple(x.shape[-2:])}")
        return unpack_views(x)

    def predict(self, x: Tensor) -> dict[str, Tensor]:
        """Everything of one forward: ``depth`` (B, H, W), ``prob`` (B, D, H, W), ``log_prob`` (B, D, H, W),
        ``confidence`` (B, H, W): MVSNet's photometric confidence, the probability mass of the four hypotheses
        around the expected one, and ``features`` (B, V, C, H, W)."""
        images, proj = self._check(x)
        b, v = images.shape[:2]
        feats = self.features(self.feature_net(images.flatten(0, 1)))                    # (B·V, C, H, W)
        feats_v = feats.view(b, v, *feats.shape[1:])
        ref = feats_v[:, 0]
        d = len(self.depth_values)
        total = ref[:, :, None].expand(-1, -1, d, -1, -1)
        sq = total ** 2
        for i in range(1, v):
            warped = plane_sweep_warp(feats_v[:, i], proj[:, i], proj[:, 0], self.depth_values)
            total = total + warped
            sq = sq + warped ** 2
        cost = sq / v - (total / v) ** 2                                                  # variance, (B, C, D, H, W)
        c0 = self.reg0(cost)
        y = self.up(self.reg2(self.reg1(c0))) + c0
        logits = self.cost_logits(self.score(y)[:, 0])                                    # (B, D, H, W)
        log_prob = self.log_prob(torch.log_softmax(logits, dim=1))
        prob = log_prob.exp()
        dv = self.depth_values.view(1, -1, 1, 1)
        depth = (prob * dv).sum(1)
        index = (prob * torch.arange(d, device=prob.device, dtype=prob.dtype).view(1, -1, 1, 1)).sum(1)
        window = F.avg_pool3d(F.pad(prob[:, None], (0, 0, 0, 0, 1, 2)), (4, 1, 1), stride=1)[:, 0] * 4
        lo = index.floor().long().clamp(0, d - 1)
        confidence = window.gather(1, lo[:, None])[:, 0]
        return {"depth": depth, "prob": prob, "log_prob": log_prob, "confidence": confidence, "features": feats_v}

    def forward(self, x: Tensor) -> Tensor:
        return self.predict(x)["depth"]


def _hypotheses(depth_min: float, depth_max: float, num_depths: int) -> Tensor:
    return torch.linspace(depth_min, depth_max, num_depths)


@register_model("mvsnet_teacher")
def mvsnet_teacher(depth_min: float = 1.8, depth_max: float = 7.8, num_depths: int = 24, in_channels: int = 3,
                   feat_channels: int = 16, reg_channels: int = 8) -> MVSNet:
    """KD-MVS's teacher size here: 16 feature channels, 3D CNN width 8 (defaults match :class:`~distill.data.mvs.MVSScenes`)."""
    return MVSNet(_hypotheses(depth_min, depth_max, num_depths), feat_channels, reg_channels, in_channels)


@register_model("mvsnet_student")
def mvsnet_student(depth_min: float = 1.8, depth_max: float = 7.8, num_depths: int = 24, in_channels: int = 3,
                   feat_channels: int = 8, reg_channels: int = 4) -> MVSNet:
    """The student size: 8 feature channels, 3D CNN width 4."""
    return MVSNet(_hypotheses(depth_min, depth_max, num_depths), feat_channels, reg_channels, in_channels)
