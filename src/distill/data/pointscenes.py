"""Procedural 3D scenes seen by a LiDAR and by a front camera, for BEV and monocular 3D detection.

Each scene is a flat ground plane (``z = 0``) with a few objects of ``K = 3`` classes placed in
front of a sensor rig at the origin, without overlap in the bird's-eye view (BEV):

=====  ============  ========================================  ==========================
class  name          shape                                     size ranges (metres)
=====  ============  ========================================  ==========================
0      ``car``       box, yaw uniform in [-π, π)               dx 3.6-4.6, dy 1.6-2.0, dz 1.4-1.7
1      ``pedestrian``  vertical cylinder (yaw 0)               radius 0.3-0.45, height 1.6-1.9
2      ``truck``     box, yaw uniform in [-π, π)               dx 6.0-8.5, dy 2.3-2.6, dz 2.6-3.2
=====  ============  ========================================  ==========================

World frame (metres): ``x`` forward, ``y`` left, ``z`` up. Objects stand on the ground and their
BEV centres lie in ``x ∈ [5, 38]``, ``|y| ≤ 18`` and inside the camera's field of view (±40° of
azimuth), so every object is seen by both sensors. The BEV range of the task is
``x ∈ [0, 40]``, ``y ∈ [-20, 20]`` (:data:`BEV_RANGE`), which a 64×64 or 96×96 BEV grid covers.

**Ground-truth boxes** ``(x, y, z, dx, dy, dz, yaw)``: the box centre (``z`` is the *centre*
height, half the object's height above the ground, as OpenPCDet's LiDAR frame), its extents
along its own axes, and ``yaw`` the rotation about ``z`` from the ``x`` axis, in [-π, π). A
cylinder's box is its bounding box ``(2r, 2r, h)`` with yaw 0.

**LiDAR** (:class:`LidarConfig`): a spinning sensor at height ``1.8`` m with ``beams`` elevation
angles evenly spaced from ``-24.9°`` to ``+2.0°`` (the HDL-64E's span) and one ray per
``azimuth_resolution`` degrees over ``±azimuth_fov/2`` around ``+x``. Each ray is cast against the
ground and the primitives (exact ray/box slab and ray/cylinder intersection); the nearest hit
within ``max_range`` becomes a point with intensity = reflectivity of the surface × |cos| of the
incidence angle, and its range gets Gaussian noise of ``range_noise`` m (seeded per scene and
per ray of the *64-beam* pattern, so a reduced scan is an exact subset of the full one).

**Reducing beams** (LiDAR Distillation's setting): the 64 elevation angles are fixed; a scan with
``beams = 32`` keeps every 2nd of them (indices 0, 2, 4, ...), ``beams = 16`` every 4th; any
divisor ``b`` of 64 keeps every ``64/b``-th. The same scene with fewer beams is therefore a subset
of the same points (:meth:`PointSceneSet.with_beams`).

**Points layout** (what :meth:`PointSceneSet.loader` puts in :attr:`DenseBatch.inputs`): padded
``(B, P, 5)`` float with the features :data:`POINT_FEATURES` = ``(x, y, z, intensity, valid)``;
``P`` is the largest point count in the batch; a real point has ``valid = 1``, a padding row is
all zeros (so ``valid = 0``). :attr:`DenseBatch.point_mask` ``(B, P)`` bool says the same
(``point_mask == inputs[..., 4] > 0``), so a model may read either. Only points inside
:data:`BEV_RANGE` (and ``z ∈ [-1, 5]``) are kept.

**Camera** (:class:`CameraConfig`): a pinhole camera at ``(0, 0, 1.6)`` looking along ``+x``, no
rotation otherwise, image ``(H, W) = (64, 160)``, ``fx = fy = (W/2)/tan(45°)``, ``(cx, cy) = (W/2, H/2)``.
Camera coordinates follow KITTI: ``x_c = -y`` (right), ``y_c = 1.6 - z`` (down), ``z_c = x``
(forward, the depth); a point projects to ``u = fx·x_c/z_c + cx``, ``v = fy·y_c/z_c + cy``
(pixel ``(row, col)`` = ``(floor(v), floor(u))``). The batch's extras:

- ``"image"`` ``(B, 1, H, W)`` in [0, 1]: the scene rendered by casting one ray per pixel centre
  (sky 0.9, ground 0.3 ± 0.06 in a 2 m checkerboard, objects lit by a fixed sun with their class's
  albedo);
- ``"depth"`` ``(B, 1, H, W)``: the sparse depth map of the LiDAR points projected into the image
  (the nearest ``z_c`` per pixel, 0 where no point falls): MonoDistill's LiDAR input of the teacher;
- ``"intrinsics"`` ``(B, 3, 3)``;
- ``"camera_height"`` ``(B,)``: the camera's height above the ground (1.6 m).

``loader(..., inputs="camera")`` puts ``cat(image, depth)`` ``(B, 2, H, W)`` in ``inputs``
instead of the points (the monocular pair of :mod:`distill.models.mono3d`: the student reads
channel 0, the LiDAR-depth teacher channel 1), with the points nowhere (``point_mask`` ``None``).

Everything is deterministic by ``seed``; scenes are generated once and held in memory
(a 64-beam scene has about 5,000 points).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from distill.batch import DenseBatch
from distill.data.sources import register_dataset

__all__ = [
    "BEV_RANGE",
    "CLASSES",
    "POINT_FEATURES",
    "CameraConfig",
    "LidarConfig",
    "PointScene",
    "PointSceneLoader",
    "PointSceneSet",
    "beam_elevations",
    "lidar_scenes",
    "box_corners",
    "cast_rays",
    "lidar_scan",
    "make_point_scenes",
    "points_in_boxes",
    "project_points",
    "sparse_depth_map",
]

CLASSES = ("car", "pedestrian", "truck")
POINT_FEATURES = ("x", "y", "z", "intensity", "valid")
BEV_RANGE = (0.0, -20.0, 40.0, 20.0)
"""``(x_min, y_min, x_max, y_max)`` of the task in metres."""
Z_RANGE = (-1.0, 5.0)
FULL_BEAMS = 64

_REFLECTIVITY = (0.6, 0.4, 0.8)  # per class; the ground's is 0.3
_GROUND_REFLECTIVITY = 0.3
_ALBEDO = (0.75, 0.55, 0.95)  # camera shade per class
_SUN = (0.3, 0.5, 0.81)  # direction towards the light (normalised in use)


@dataclass(frozen=True)
class LidarConfig:
    """A spinning LiDAR at ``(0, 0, height)``; see the module notes for the beam pattern."""

    beams: int = 64
    azimuth_resolution: float = 1.0  # degrees between rays of one beam
    azimuth_fov: float = 100.0  # degrees, centred on +x
    max_range: float = 60.0
    height: float = 1.8
    range_noise: float = 0.02  # metres (std of the range noise)

    def __post_init__(self) -> None:
        if not isinstance(self.beams, int) or self.beams < 1 or FULL_BEAMS % self.beams:
            raise ValueError(f"beams must be a divisor of {FULL_BEAMS} (64, 32, 16, 8...), got {self.beams!r}")
        if not 0 < self.azimuth_resolution <= self.azimuth_fov <= 360:
            raise ValueError(f"need 0 < azimuth_resolution <= azimuth_fov <= 360, got "
                             f"{self.azimuth_resolution} and {self.azimuth_fov}")
        if self.max_range <= 0 or self.height <= 0 or self.range_noise < 0:
            raise ValueError(f"max_range and height must be > 0 and range_noise >= 0, got {self.max_range}, "
                             f"{self.height}, {self.range_noise}")


@dataclass(frozen=True)
class CameraConfig:
    """A pinhole camera at ``(0, 0, height)`` looking along ``+x`` with a horizontal field of view ``hfov``."""

    height_px: int = 64
    width_px: int = 160
    hfov: float = 90.0  # degrees
    height: float = 1.6  # metres above the ground

    def __post_init__(self) -> None:
        if self.height_px < 4 or self.width_px < 4 or not 10 <= self.hfov < 170 or self.height <= 0:
            raise ValueError(f"camera needs an image of at least 4x4 pixels, 10 <= hfov < 170 degrees and a height "
                             f"> 0, got {self.height_px}x{self.width_px}, hfov {self.hfov}, height {self.height}")

    def intrinsics(self) -> Tensor:
        """``K`` ``(3, 3)``: ``fx = fy = (W/2)/tan(hfov/2)``, ``(cx, cy) = (W/2, H/2)``."""
        f = (self.width_px / 2) / math.tan(math.radians(self.hfov) / 2)
        return torch.tensor([[f, 0.0, self.width_px / 2], [0.0, f, self.height_px / 2], [0.0, 0.0, 1.0]])


def beam_elevations(beams: int = 64) -> Tensor:
    """The elevation angles (radians) of a ``beams``-beam scan, ``(beams,)``: every ``64/beams``-th of
    the 64 angles evenly spaced over [-24.9°, +2.0°] (index 0 is the lowest)."""
    LidarConfig(beams=beams)  # validates
    full = torch.linspace(math.radians(-24.9), math.radians(2.0), FULL_BEAMS, dtype=torch.float64)
    return full[:: FULL_BEAMS // beams]


# --------------------------------------------------------------------------------------------
# geometry
# --------------------------------------------------------------------------------------------


def box_corners(boxes: Tensor) -> Tensor:
    """The 4 BEV corners of boxes ``(N, 7)`` ``(x, y, z, dx, dy, dz, yaw)`` → ``(N, 4, 2)``, counter-clockwise."""
    x, y, dx, dy, yaw = boxes[:, 0], boxes[:, 1], boxes[:, 3], boxes[:, 4], boxes[:, 6]
    sx = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=boxes.dtype, device=boxes.device)
    sy = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=boxes.dtype, device=boxes.device)
    lx = sx[None] * dx[:, None] / 2
    ly = sy[None] * dy[:, None] / 2
    c, s = torch.cos(yaw)[:, None], torch.sin(yaw)[:, None]
    return torch.stack([x[:, None] + c * lx - s * ly, y[:, None] + s * lx + c * ly], dim=-1)


def points_in_boxes(points: Tensor, boxes: Tensor, margin: float = 0.0) -> Tensor:
    """Which points lie in which boxes: ``points`` ``(P, ≥3)`` xyz, ``boxes`` ``(N, 7)`` → ``(P, N)`` bool
    (each box grown by ``margin`` metres on every side)."""
    rel = points[:, None, :3] - boxes[None, :, :3]  # (P, N, 3)
    c, s = torch.cos(boxes[:, 6]), torch.sin(boxes[:, 6])
    lx = c * rel[..., 0] + s * rel[..., 1]
    ly = -s * rel[..., 0] + c * rel[..., 1]
    return ((lx.abs() <= boxes[:, 3] / 2 + margin) & (ly.abs() <= boxes[:, 4] / 2 + margin)
            & (rel[..., 2].abs() <= boxes[:, 5] / 2 + margin))


def cast_rays(origin: Tensor, directions: Tensor, boxes: Tensor, shapes: Tensor,
              max_range: float = float("inf")) -> tuple[Tensor, Tensor, Tensor]:
    """Cast rays from ``origin`` ``(3,)`` along unit ``directions`` ``(R, 3)`` against the ground
    ``z = 0`` and the objects ``boxes`` ``(M, 7)`` (``shapes`` ``(M,)`` long: 0 box, 1 vertical cylinder
    of radius ``dx/2``).

    Returns ``(t, hit, normal)``: the distance to the nearest hit ``(R,)`` (``inf`` for none within
    ``max_range``), what was hit ``(R,)`` long (``-1`` ground, ``-2`` nothing, else the object's
    index), and the unit surface normal there ``(R, 3)``.
    """
    if origin.shape != (3,) or directions.dim() != 2 or directions.shape[1] != 3:
        raise ValueError(f"cast_rays needs origin (3,) and directions (R, 3), got {tuple(origin.shape)} and "
                         f"{tuple(directions.shape)}")
    dt = directions.dtype
    r = directions.shape[0]
    inf = torch.full((r,), float("inf"), dtype=dt)
    # ground
    dz = directions[:, 2]
    t_ground = torch.where(dz < -1e-9, -origin[2] / dz.clamp(max=-1e-9), inf)
    best_t, hit = t_ground, torch.where(torch.isfinite(t_ground), -1, -2)
    normal = torch.zeros(r, 3, dtype=dt)
    normal[:, 2] = 1.0
    m = boxes.shape[0]
    if m:
        rel = origin[None, :] - boxes[:, :3]  # (M, 3) origin in each object's frame (before rotation)
        c, s = torch.cos(boxes[:, 6]), torch.sin(boxes[:, 6])
        # rotate into the object frame: local = R(-yaw) world
        ox = c * rel[:, 0] + s * rel[:, 1]
        oy = -s * rel[:, 0] + c * rel[:, 1]
        o = torch.stack([ox, oy, rel[:, 2]], dim=-1)  # (M, 3)
        dx_ = c[:, None] * directions[None, :, 0] + s[:, None] * directions[None, :, 1]  # (M, R)
        dy_ = -s[:, None] * directions[None, :, 0] + c[:, None] * directions[None, :, 1]
        dz_ = directions[None, :, 2].expand(m, r)
        d = torch.stack([dx_, dy_, dz_], dim=-1)  # (M, R, 3)
        half = boxes[:, 3:6] / 2  # (M, 3)
        # --- boxes: slab method
        safe = torch.where(d.abs() < 1e-12, torch.full_like(d, 1e-12), d)
        t1 = (-half[:, None, :] - o[:, None, :]) / safe
        t2 = (half[:, None, :] - o[:, None, :]) / safe
        tmin, tmax = torch.minimum(t1, t2), torch.maximum(t1, t2)
        t_enter, axis = tmin.max(dim=-1)
        t_exit = tmax.min(dim=-1).values
        box_ok = (t_enter <= t_exit) & (t_enter > 1e-6)
        sign = -torch.sign(torch.gather(d, 2, axis[..., None]).squeeze(-1))
        n_local_box = torch.nn.functional.one_hot(axis, 3).to(dt) * sign[..., None]
        # --- cylinders: side and caps
        radius = half[:, 0:1]  # (M, 1)
        a = dx_ ** 2 + dy_ ** 2
        b = 2 * (o[:, 0:1] * dx_ + o[:, 1:2] * dy_)
        cc = o[:, 0:1] ** 2 + o[:, 1:2] ** 2 - radius ** 2
        disc = b ** 2 - 4 * a * cc
        t_side = (-b - disc.clamp_min(0).sqrt()) / (2 * a.clamp_min(1e-12))
        z_side = o[:, 2:3] + t_side * dz_
        side_ok = (disc >= 0) & (a > 1e-12) & (t_side > 1e-6) & (z_side.abs() <= half[:, 2:3])
        cap_z = torch.where(dz_ < 0, half[:, 2:3], -half[:, 2:3])  # the cap facing the ray
        t_cap = (cap_z - o[:, 2:3]) / torch.where(dz_.abs() < 1e-12, torch.full_like(dz_, 1e-12), dz_)
        px, py = o[:, 0:1] + t_cap * dx_, o[:, 1:2] + t_cap * dy_
        cap_ok = (dz_.abs() > 1e-12) & (t_cap > 1e-6) & (px ** 2 + py ** 2 <= radius ** 2)
        t_cyl = torch.minimum(torch.where(side_ok, t_side, torch.inf), torch.where(cap_ok, t_cap, torch.inf))
        use_cap = cap_ok & (~side_ok | (t_cap < t_side))
        sx, sy = o[:, 0:1] + t_side * dx_, o[:, 1:2] + t_side * dy_
        n_side = torch.stack([sx, sy, torch.zeros_like(sx)], dim=-1) / radius[..., None]
        n_cap = torch.zeros_like(n_side)
        n_cap[..., 2] = torch.sign(cap_z)
        n_local_cyl = torch.where(use_cap[..., None], n_cap, n_side)
        is_cyl = (shapes == 1)[:, None]
        t_obj = torch.where(is_cyl, t_cyl, torch.where(box_ok, t_enter, torch.inf))  # (M, R)
        n_local = torch.where(is_cyl[..., None], n_local_cyl, n_local_box)
        t_best_obj, which = t_obj.min(dim=0)  # (R,)
        closer = t_best_obj < best_t
        best_t = torch.where(closer, t_best_obj, best_t)
        hit = torch.where(closer, which, hit)
        nl = n_local[which, torch.arange(r)]  # (R, 3) in the object frame: rotate back
        cw, sw = c[which], s[which]
        nw = torch.stack([cw * nl[:, 0] - sw * nl[:, 1], sw * nl[:, 0] + cw * nl[:, 1], nl[:, 2]], dim=-1)
        normal = torch.where(closer[:, None], nw, normal)
    far = best_t > max_range
    best_t = torch.where(far, torch.inf, best_t)
    hit = torch.where(far, -2, hit)
    return best_t, hit, normal


def project_points(points: Tensor, intrinsics: Tensor, camera_height: float) -> tuple[Tensor, Tensor]:
    """World points ``(P, ≥3)`` → pixel coordinates ``(P, 2)`` ``(u, v)`` and depths ``z_c = x`` ``(P,)``
    (see the module notes for the camera frame)."""
    xc = -points[:, 1]
    yc = camera_height - points[:, 2]
    zc = points[:, 0]
    safe = zc.clamp_min(1e-6)
    u = intrinsics[0, 0] * xc / safe + intrinsics[0, 2]
    v = intrinsics[1, 1] * yc / safe + intrinsics[1, 2]
    return torch.stack([u, v], dim=-1), zc


def sparse_depth_map(points: Tensor, intrinsics: Tensor, camera_height: float, hw: tuple[int, int]) -> Tensor:
    """The LiDAR points ``(P, ≥3)`` projected into an ``hw`` image: ``(1, H, W)`` float, each pixel the
    smallest depth ``z_c`` of the points that fall in it (``z_c > 0.1`` m), 0 where none does."""
    h, w = hw
    uv, z = project_points(points, intrinsics, camera_height)
    col, row = torch.floor(uv[:, 0]).long(), torch.floor(uv[:, 1]).long()
    ok = (z > 0.1) & (col >= 0) & (col < w) & (row >= 0) & (row < h)
    flat = torch.full((h * w,), float("inf"), dtype=points.dtype)
    flat = flat.scatter_reduce(0, (row * w + col)[ok], z[ok], reduce="amin")
    flat = torch.where(torch.isfinite(flat), flat, torch.zeros_like(flat))
    return flat.view(1, h, w)


# --------------------------------------------------------------------------------------------
# scenes
# --------------------------------------------------------------------------------------------


@dataclass
class PointScene:
    """One scene.

    Attributes:
        points: ``(P, 4)`` float ``(x, y, z, intensity)`` in the BEV range.
        point_object: ``(P,)`` long, the object each point hit (``-1`` the ground).
        boxes: ``(n, 7)`` float ``(x, y, z, dx, dy, dz, yaw)``; ``labels`` ``(n,)`` long class.
        shapes: ``(n,)`` long, 0 box, 1 cylinder.
        image, depth: ``(1, H, W)`` float (camera rendering; sparse LiDAR depth).
    """

    points: Tensor
    point_object: Tensor
    boxes: Tensor
    labels: Tensor
    shapes: Tensor
    image: Tensor
    depth: Tensor


def _sample_objects(gen: torch.Generator, n: int, cam: CameraConfig) -> tuple[Tensor, Tensor, Tensor]:
    def u(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=gen, dtype=torch.float64))

    boxes: list[list[float]] = []
    labels: list[int] = []
    half_fov = math.radians(min(40.0, cam.hfov / 2 - 5))
    for _ in range(n):
        for _attempt in range(50):
            k = int(torch.randint(0, len(CLASSES), (), generator=gen))
            if k == 1:
                rad, h = u(0.3, 0.45), u(1.6, 1.9)
                dims, yaw = (2 * rad, 2 * rad, h), 0.0
            elif k == 0:
                dims, yaw = (u(3.6, 4.6), u(1.6, 2.0), u(1.4, 1.7)), u(-math.pi, math.pi)
            else:
                dims, yaw = (u(6.0, 8.5), u(2.3, 2.6), u(2.6, 3.2)), u(-math.pi, math.pi)
            x = u(5.0, 38.0)
            lim = min(18.0, x * math.tan(half_fov))
            y = u(-lim, lim)
            radius = 0.5 * math.hypot(dims[0], dims[1])
            if all(math.hypot(x - b[0], y - b[1]) > radius + 0.5 * math.hypot(b[3], b[4]) + 0.5 for b in boxes):
                boxes.append([x, y, dims[2] / 2, dims[0], dims[1], dims[2], yaw])
                labels.append(k)
                break
    t = torch.tensor(boxes, dtype=torch.float64).view(-1, 7)
    lab = torch.tensor(labels, dtype=torch.long)
    return t, lab, (lab == 1).long()


def _lidar_rays(cfg: LidarConfig) -> tuple[Tensor, Tensor]:
    """Directions ``(64·A, 3)`` of the full 64-beam pattern and which of them this config keeps ``(64·A,)``."""
    elev = torch.linspace(math.radians(-24.9), math.radians(2.0), FULL_BEAMS, dtype=torch.float64)
    n_az = int(round(cfg.azimuth_fov / cfg.azimuth_resolution))
    az = torch.tensor([math.radians(-cfg.azimuth_fov / 2 + (i + 0.5) * cfg.azimuth_resolution)
                       for i in range(n_az)], dtype=torch.float64)
    e, a = torch.meshgrid(elev, az, indexing="ij")
    dirs = torch.stack([e.cos() * a.cos(), e.cos() * a.sin(), e.sin()], dim=-1).reshape(-1, 3)
    keep = torch.zeros(FULL_BEAMS, n_az, dtype=torch.bool)
    keep[:: FULL_BEAMS // cfg.beams] = True
    return dirs, keep.reshape(-1)


def lidar_scan(boxes: Tensor, shapes: Tensor, labels: Tensor, cfg: LidarConfig,
               noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One LiDAR scan of the objects ``boxes`` ``(M, 7)`` (``shapes`` ``(M,)`` 0 box / 1 cylinder,
    ``labels`` ``(M,)``) on the ground: ``(points (P, 4) (x, y, z, intensity), hit (P,))`` with
    ``hit`` the object index of each point (``-1`` the ground), cropped to :data:`BEV_RANGE`.

    ``noise`` ``(64·A,)``: standard-normal range noise per ray of the full 64-beam pattern (``A``
    azimuth steps; scaled by ``cfg.range_noise``), or ``None`` for none.
    """
    dirs, keep = _lidar_rays(cfg)
    if noise is None:
        noise = torch.zeros(dirs.shape[0], dtype=torch.float64)
    if noise.shape != (dirs.shape[0],):
        raise ValueError(f"lidar_scan: noise must have one entry per ray of the 64-beam pattern "
                         f"({dirs.shape[0]}), got {tuple(noise.shape)}")
    boxes = boxes.double()
    dirs, noise = dirs[keep], noise.double()[keep]
    origin = torch.tensor([0.0, 0.0, cfg.height], dtype=torch.float64)
    t, hit, normal = cast_rays(origin, dirs, boxes, shapes, cfg.max_range)
    ok = hit > -2
    t, hit, normal, dirs, noise = t[ok], hit[ok], normal[ok], dirs[ok], noise[ok]
    refl = torch.full_like(t, _GROUND_REFLECTIVITY)
    obj = hit >= 0
    if obj.any():
        refl[obj] = torch.tensor(_REFLECTIVITY, dtype=t.dtype)[labels[hit[obj]]]
    intensity = refl * (normal * dirs).sum(-1).abs()
    xyz = origin + (t + noise * cfg.range_noise)[:, None] * dirs
    x0, y0, x1, y1 = BEV_RANGE
    inside = ((xyz[:, 0] >= x0) & (xyz[:, 0] < x1) & (xyz[:, 1] >= y0) & (xyz[:, 1] < y1)
              & (xyz[:, 2] >= Z_RANGE[0]) & (xyz[:, 2] < Z_RANGE[1]))
    pts = torch.cat([xyz, intensity[:, None]], dim=1)[inside]
    return pts, hit[inside]


def _render(boxes: Tensor, shapes: Tensor, labels: Tensor, cam: CameraConfig) -> Tensor:
    k = cam.intrinsics().double()
    v, u = torch.meshgrid(torch.arange(cam.height_px, dtype=torch.float64) + 0.5,
                          torch.arange(cam.width_px, dtype=torch.float64) + 0.5, indexing="ij")
    xc = (u - k[0, 2]) / k[0, 0]
    yc = (v - k[1, 2]) / k[1, 1]
    dirs = torch.stack([torch.ones_like(xc), -xc, -yc], dim=-1).reshape(-1, 3)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    origin = torch.tensor([0.0, 0.0, cam.height], dtype=torch.float64)
    t, hit, normal = cast_rays(origin, dirs, boxes, shapes, 200.0)
    shade = torch.full_like(t, 0.9)
    ground = hit == -1
    p = origin + torch.where(torch.isfinite(t), t, torch.zeros_like(t))[:, None] * dirs
    checker = (torch.floor(p[:, 0] / 2) + torch.floor(p[:, 1] / 2)).remainder(2)
    shade = torch.where(ground, 0.3 + 0.06 * (2 * checker - 1), shade)
    obj = hit >= 0
    if obj.any():
        sun = torch.tensor(_SUN, dtype=torch.float64)
        sun = sun / sun.norm()
        albedo = torch.tensor(_ALBEDO, dtype=torch.float64)[labels[hit[obj]]]
        shade[obj] = albedo * (0.35 + 0.65 * (normal[obj] @ sun).clamp_min(0))
    return shade.view(1, cam.height_px, cam.width_px).float()


def _make_scene(gen: torch.Generator, objects: tuple[int, int], lidar: LidarConfig, cam: CameraConfig) -> PointScene:
    n = int(torch.randint(objects[0], objects[1] + 1, (), generator=gen))
    boxes, labels, shapes = _sample_objects(gen, n, cam)
    n_az = int(round(lidar.azimuth_fov / lidar.azimuth_resolution))
    noise = torch.randn(FULL_BEAMS * n_az, generator=gen, dtype=torch.float64)
    pts, hit = lidar_scan(boxes, shapes, labels, lidar, noise)
    image = _render(boxes, shapes, labels, cam)
    depth = sparse_depth_map(pts, cam.intrinsics().double(), cam.height, (cam.height_px, cam.width_px)).float()
    return PointScene(pts.float(), hit, boxes.float(), labels, shapes, image, depth)


class PointSceneSet:
    """A list of :class:`PointScene` built by :func:`make_point_scenes` (``len``, indexing, :meth:`loader`)."""

    def __init__(self, scenes: list[PointScene], lidar: LidarConfig, camera: CameraConfig,
                 seed: int, objects: tuple[int, int]) -> None:
        self.scenes = scenes
        self.lidar = lidar
        self.camera = camera
        self.seed = seed
        self.objects = objects
        self.num_classes = len(CLASSES)
        self.classes = CLASSES
        self.teacher_scans: PointSceneSet | None = None  # see with_teacher_scans
        self.teacher_key = "teacher_points"

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, i: int) -> PointScene:
        return self.scenes[i]

    def with_beams(self, beams: int) -> PointSceneSet:
        """The same scenes scanned with ``beams`` beams (a subset of every 64-beam scan's points)."""
        return make_point_scenes(len(self), beams=beams, objects=self.objects, seed=self.seed,
                                 lidar=replace(self.lidar, beams=beams), camera=self.camera, progress=False)

    def with_teacher_scans(self, beams: int, key: str = "teacher_points") -> PointSceneSet:
        """These scenes, whose point batches also carry the same scenes scanned with ``beams`` beams in
        ``extras[key]`` (padded ``(B, P', 5)``, the :data:`POINT_FEATURES` layout): LiDAR Distillation's
        teacher input, read by :class:`distill.methods.dense3d.BeamTeacher`. Camera batches carry none."""
        out = PointSceneSet(self.scenes, self.lidar, self.camera, self.seed, self.objects)
        out.teacher_scans, out.teacher_key = self.with_beams(beams), key
        return out

    def intrinsics(self) -> Tensor:
        return self.camera.intrinsics()

    def collate(self, idx: list[int], inputs: str = "points") -> DenseBatch:
        """A :class:`DenseBatch` of the scenes ``idx`` (see the module notes for the layout)."""
        if inputs not in ("points", "camera"):
            raise ValueError(f"inputs must be 'points' or 'camera', got {inputs!r}")
        scenes = [self.scenes[i] for i in idx]
        image = torch.stack([s.image for s in scenes])
        depth = torch.stack([s.depth for s in scenes])
        k = self.camera.intrinsics().expand(len(idx), 3, 3).clone()
        cam_h = torch.full((len(idx),), float(self.camera.height))
        extras = {"image": image, "depth": depth, "intrinsics": k, "camera_height": cam_h}
        boxes = [s.boxes for s in scenes]
        labels = [s.labels for s in scenes]
        index = torch.tensor(idx, dtype=torch.long)
        if inputs == "camera":
            return DenseBatch(torch.cat([image, depth], dim=1), None, index, boxes=boxes, labels=labels, extras=extras)
        p = max(1, max(s.points.shape[0] for s in scenes))
        pts = torch.zeros(len(idx), p, len(POINT_FEATURES))
        mask = torch.zeros(len(idx), p, dtype=torch.bool)
        for b, s in enumerate(scenes):
            n = s.points.shape[0]
            pts[b, :n, :4] = s.points
            pts[b, :n, 4] = 1.0
            mask[b, :n] = True
        if self.teacher_scans is not None:  # the same scenes with more beams (with_teacher_scans)
            extras[self.teacher_key] = self.teacher_scans.collate(idx, "points").inputs
        return DenseBatch(pts, None, index, boxes=boxes, labels=labels, point_mask=mask, extras=extras)

    def loader(self, batch_size: int = 8, shuffle: bool = False, seed: int = 0, *, inputs: str = "points",
               drop_last: bool = False) -> PointSceneLoader:
        """An iterable of :class:`DenseBatch` (a new order each epoch when ``shuffle``; see :meth:`collate`)."""
        return PointSceneLoader(self, batch_size, shuffle, seed, inputs, drop_last)


class PointSceneLoader:
    """Batches of a :class:`PointSceneSet`; ``len`` is the number of batches, ``set_epoch`` reshuffles."""

    def __init__(self, data: PointSceneSet, batch_size: int, shuffle: bool, seed: int, inputs: str,
                 drop_last: bool) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if inputs not in ("points", "camera"):
            raise ValueError(f"inputs must be 'points' or 'camera', got {inputs!r}")
        self.data, self.batch_size, self.shuffle, self.seed = data, batch_size, shuffle, seed
        self.inputs, self.drop_last, self.epoch = inputs, drop_last, 0

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[DenseBatch]:
        n = len(self.data)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + 1_000_003 * self.epoch))
        else:
            order = torch.arange(n)
        self.epoch += 1 if self.shuffle else 0
        for i in range(len(self)):
            yield self.data.collate(order[i * self.batch_size:(i + 1) * self.batch_size].tolist(), self.inputs)


def make_point_scenes(n_scenes: int, *, beams: int = 64, objects: tuple[int, int] = (3, 8), seed: int = 0,
                      lidar: LidarConfig | None = None, camera: CameraConfig | None = None,
                      progress: bool = True) -> PointSceneSet:
    """Generate ``n_scenes`` scenes (see the module notes), deterministic by ``seed``.

    ``beams`` sets the LiDAR's beam count (overrides ``lidar.beams``); the objects, the camera view
    and the noise do not depend on it, so ``make_point_scenes(n, beams=16, seed=s)`` is a subset of
    the points of ``make_point_scenes(n, beams=64, seed=s)``, scene by scene. The camera's depth map
    comes from the scan of this beam count.
    """
    if not isinstance(n_scenes, int) or n_scenes < 1:
        raise ValueError(f"n_scenes must be a positive int, got {n_scenes!r}")
    if len(objects) != 2 or not 1 <= objects[0] <= objects[1] <= 20:
        raise ValueError(f"objects must be (min, max) with 1 <= min <= max <= 20, got {objects!r}")
    lidar = replace(lidar or LidarConfig(), beams=beams)
    camera = camera or CameraConfig()
    scenes = []
    steps = range(n_scenes)
    bar = None
    if progress and n_scenes >= 50:
        from rich.progress import Progress

        bar = Progress(transient=True)
        bar.start()
        task = bar.add_task("point scenes", total=n_scenes)
    try:
        for i in steps:
            gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + i)
            scenes.append(_make_scene(gen, (int(objects[0]), int(objects[1])), lidar, camera))
            if bar is not None:
                bar.advance(task)
    finally:
        if bar is not None:
            bar.stop()
    return PointSceneSet(scenes, lidar, camera, int(seed), (int(objects[0]), int(objects[1])))


# --------------------------------------------------------------------------------------------
# get_dataset("lidar_scenes", ...): the recipes' data set (tasks "bev" and "mono3d")
# --------------------------------------------------------------------------------------------

LIDAR_SCENES_DEFAULT = {"train": 256, "test": 64}
"""Scenes per split of ``get_dataset("lidar_scenes")`` when ``n_scenes`` is not given."""
_SPLIT_SEED = {"train": 0, "test": 1}  # the test scenes are seed + 1's (benchmarks/dense.py's split)


def lidar_scenes(root: object, split: str, normalize: bool, *, n_scenes: int | None = None, beams: int = 64,
                 teacher_beams: int | None = None, objects: tuple[int, int] | list[int] = (3, 8),
                 seed: int = 0) -> PointSceneSet:
    """``get_dataset("lidar_scenes", split=..., **options)``: :func:`make_point_scenes` of a split.

    ``split`` ``"train"`` (scenes of ``seed``) or ``"test"`` (``"val"`` is accepted for it; scenes of
    ``seed + 1``); ``n_scenes`` per split (default :data:`LIDAR_SCENES_DEFAULT`); ``beams`` the scan's
    beam count; ``teacher_beams``: also put the same scenes scanned with that many beams in every point
    batch's ``extras["teacher_points"]`` (:meth:`PointSceneSet.with_teacher_scans`; LiDAR Distillation).
    ``root`` is unused (the scenes are procedural) and nothing is normalised (points are in metres,
    images in [0, 1], as the models of :mod:`distill.models.pointcloud` and ``mono3d`` expect).
    """
    split = "test" if split == "val" else split
    if split not in _SPLIT_SEED:
        raise ValueError(f"data set 'lidar_scenes' has splits ['train', 'test'], got {split!r}")
    if teacher_beams is not None:
        LidarConfig(beams=teacher_beams)  # a divisor of 64
        if teacher_beams <= beams:
            raise ValueError(f"teacher_beams ({teacher_beams}) must be more than beams ({beams}): the teacher sees "
                             "the denser scan")
    n = LIDAR_SCENES_DEFAULT[split] if n_scenes is None else n_scenes
    scenes = make_point_scenes(n, beams=beams, objects=tuple(objects),  # type: ignore[arg-type]
                               seed=int(seed) + _SPLIT_SEED[split], progress=False)
    return scenes.with_teacher_scans(teacher_beams) if teacher_beams is not None else scenes


register_dataset("lidar_scenes", lidar_scenes)
