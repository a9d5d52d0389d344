"""A procedurally rendered 3D scene for novel view synthesis: analytic primitives seen by pinhole cameras.

Built for R2L (H. Wang et al., "R2L: Distilling Neural Radiance Field to Neural Light Field for Efficient
Novel View Synthesis", ECCV 2022, arXiv 2203.17261), whose teacher NeRF and student light field both learn
one scene from posed images. Nothing is downloaded: every image is a deterministic function of the scene
(itself a function of ``seed``) and of the camera.

The scene (world frame, ``z`` up):

* a ground disc ``z = ground_z``, radius ``ground_radius``, a two-colour checkerboard of ``tile``-sized
  squares;
* 2-3 spheres and 1-2 axis-aligned boxes resting on the ground inside radius ~1, one flat colour each;
* Lambertian shading by one directional light: ``colour = albedo * (ambient + (1 - ambient) * max(0, n·l))``
  (no shadows, no view-dependent effects);
* a constant background colour where a ray hits nothing.

Cameras follow the NeRF / OpenGL convention: a camera-to-world pose ``c2w`` (4, 4) whose rotation columns are
the camera's right, up and backward axes, the camera looking down its ``-z``. Pixel ``(i, j)`` (column, row)
is cast through its centre: the camera-frame direction ``((i + 0.5 - W/2)/f, -(j + 0.5 - H/2)/f, -1)``
(NeRF's ``get_rays`` uses the pixel corner ``i`` instead of ``i + 0.5``). Directions are not normalised, so
the ray parameter ``t`` is the depth along the camera's viewing axis.

Rendering is exact ray casting: one ray per pixel (no super-sampling), so a pixel's colour *is* the colour of
its ray: the quantity a light field models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "LightFieldViews",
    "Scene",
    "cast_rays",
    "get_rays",
    "make_scene",
    "make_views",
    "orbit_poses",
    "pose_spherical",
    "random_poses",
    "render_views",
]

_EPS = 1e-4  # hits closer than this along a ray are ignored (the ray's own origin surface)


@dataclass
class Scene:
    """Analytic primitives; every field a float32 tensor.

    Attributes:
        sphere_centers: (S, 3); sphere_radii: (S,); sphere_colors: (S, 3) in [0, 1].
        box_min, box_max: (B, 3) corners of the axis-aligned boxes; box_colors: (B, 3).
        ground_z: height of the ground disc; ground_radius: its radius; ground_colors: (2, 3) checker
            colours; tile: checker square size.
        light_dir: (3,) unit vector towards the light; ambient: the unlit share of the albedo.
        background: (3,) colour of rays that hit nothing.
    """

    sphere_centers: Tensor
    sphere_radii: Tensor
    sphere_colors: Tensor
    box_min: Tensor
    box_max: Tensor
    box_colors: Tensor
    ground_z: float = -0.5
    ground_radius: float = 1.6
    ground_colors: Tensor = field(default_factory=lambda: torch.tensor([[0.85, 0.85, 0.8], [0.45, 0.45, 0.5]]))
    tile: float = 0.8
    light_dir: Tensor = field(default_factory=lambda: torch.tensor([0.4, 0.3, 0.866]))
    ambient: float = 0.35
    background: Tensor = field(default_factory=lambda: torch.ones(3))


def make_scene(seed: int = 0) -> Scene:
    """A random scene, a deterministic function of ``seed``: 2-3 spheres (radius 0.22-0.42) and 1-2 boxes
    (half-edges 0.15-0.32) resting on the ground disc (``z = -0.5``, radius 1.6) at distinct places within
    radius 1 of the origin, saturated random colours, a light from above (elevation 45-70°)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    g = torch.Generator().manual_seed(seed)

    def u(lo: float, hi: float, *shape: int) -> Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=g)

    def colour(hue: float) -> Tensor:  # a saturated colour of hue in [0, 6) (HSV's hexcone)
        hue = hue % 6.0
        c = torch.tensor([abs(hue - 3.0) - 1.0, 2.0 - abs(hue - 2.0), 2.0 - abs(hue - 4.0)]).clamp(0, 1)
        return 0.15 + 0.7 * c * float(u(0.75, 1.0, 1))

    ground_z = -0.5
    n_spheres, n_boxes = 2 + int(torch.randint(0, 2, (1,), generator=g)), 1 + int(torch.randint(0, 2, (1,), generator=g))
    # place the objects at distinct angles around the origin so that they do not overlap
    slots = torch.randperm(n_spheres + n_boxes, generator=g).tolist()
    offset = float(u(0.0, 2 * math.pi, 1))
    # object hues spread evenly around the colour wheel from a random start, so that objects differ
    hue0 = float(u(0.0, 6.0, 1))
    hues = [hue0 + 6.0 * k / (n_spheres + n_boxes + 1) for k in range(n_spheres + n_boxes + 1)]
    places = []
    for k in slots:
        angle = offset + 2 * math.pi * k / (n_spheres + n_boxes)
        dist = float(u(0.45, 0.95, 1))
        places.append((dist * math.cos(angle), dist * math.sin(angle)))
    centers, radii, s_colors = [], [], []
    for x, y in places[:n_spheres]:
        r = float(u(0.22, 0.42, 1))
        centers.append([x, y, ground_z + r])
        radii.append(r)
        s_colors.append(colour(hues[len(s_colors)]))
    lo, hi, b_colors = [], [], []
    for x, y in places[n_spheres:]:
        half = u(0.15, 0.32, 3)
        c = torch.tensor([x, y, ground_z + float(half[2])])
        lo.append(c - half)
        hi.append(c + half)
        b_colors.append(colour(hues[n_spheres + len(b_colors)]))
    elev, azim = math.radians(float(u(45.0, 70.0, 1))), float(u(0.0, 2 * math.pi, 1))
    light = torch.tensor([math.cos(elev) * math.cos(azim), math.cos(elev) * math.sin(azim), math.sin(elev)])
    return Scene(
        sphere_centers=torch.tensor(centers, dtype=torch.float32),
        sphere_radii=torch.tensor(radii, dtype=torch.float32),
        sphere_colors=torch.stack(s_colors).float(),
        box_min=torch.stack(lo).float(),
        box_max=torch.stack(hi).float(),
        box_colors=torch.stack(b_colors).float(),
        ground_z=ground_z,
        ground_colors=torch.stack([colour(hues[-1]) * 0.4 + 0.55, colour(hues[-1]) * 0.4 + 0.2]).float(),
        light_dir=light.float(),
    )


# ---------------------------------------------------------------------------------------------- cameras


def pose_spherical(azimuth_deg: float, elevation_deg: float, radius: float) -> Tensor:
    """Camera-to-world pose (4, 4) of a camera at azimuth/elevation (degrees) on a sphere of ``radius``
    around the origin, looking at the origin with the world ``z`` axis up (|elevation| < 90)."""
    if not -90.0 < elevation_deg < 90.0:
        raise ValueError(f"elevation_deg must be in (-90, 90) (the camera's up axis is world z), got {elevation_deg}")
    if radius <= 0:
        raise ValueError(f"radius must be > 0, got {radius}")
    a, e = math.radians(azimuth_deg), math.radians(elevation_deg)
    position = radius * torch.tensor([math.cos(e) * math.cos(a), math.cos(e) * math.sin(a), math.sin(e)])
    back = position / position.norm()
    right = torch.linalg.cross(torch.tensor([0.0, 0.0, 1.0]), back)
    right = right / right.norm()
    up = torch.linalg.cross(back, right)
    c2w = torch.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, up, back, position
    return c2w


def random_poses(n: int, radius: float = 4.0, elevation: tuple[float, float] = (10.0, 70.0), seed: int = 0) -> Tensor:
    """``n`` poses (n, 4, 4) at uniform random azimuths in [0, 360) and elevations in ``elevation`` (degrees)
    on a sphere of ``radius``, looking at the origin; deterministic by ``seed``."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    g = torch.Generator().manual_seed(seed)
    az = torch.rand(n, generator=g) * 360.0
    el = elevation[0] + (elevation[1] - elevation[0]) * torch.rand(n, generator=g)
    return torch.stack([pose_spherical(float(a), float(e), radius) for a, e in zip(az, el)]) if n else torch.zeros(0, 4, 4)


def orbit_poses(n: int, radius: float = 4.0, elevation_deg: float = 30.0, start_deg: float = 0.0) -> Tensor:
    """``n`` poses (n, 4, 4) evenly spaced in azimuth on a circle at ``elevation_deg``."""
    return torch.stack([pose_spherical(start_deg + 360.0 * k / n, elevation_deg, radius) for k in range(n)])


def get_rays(H: int, W: int, focal: float, c2w: Tensor) -> tuple[Tensor, Tensor]:
    """Rays through the pixel centres of an ``H``×``W`` pinhole camera (focal length ``focal`` pixels,
    principal point at the image centre) with pose ``c2w`` (4, 4) or (3, 4).

    Returns ``(rays_o, rays_d)``, each (H, W, 3): the camera centre, and the world direction of
    ``((i + 0.5 - W/2)/focal, -(j + 0.5 - H/2)/focal, -1)`` for column ``i``, row ``j`` (not normalised).
    """
    if c2w.shape not in ((4, 4), (3, 4)):
        raise ValueError(f"c2w must be (4, 4) or (3, 4), got {tuple(c2w.shape)}")
    if H <= 0 or W <= 0 or focal <= 0:
        raise ValueError(f"H, W and focal must be > 0, got H={H}, W={W}, focal={focal}")
    c2w = c2w.float()
    j, i = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    dirs = torch.stack([(i + 0.5 - W / 2) / focal, -(j + 0.5 - H / 2) / focal, -torch.ones_like(i)], -1)
    rays_d = dirs @ c2w[:3, :3].T
    rays_o = c2w[:3, 3].expand_as(rays_d).clone()
    return rays_o, rays_d


# ------------------------------------------------------------------------------------------- ray casting


def _hit_spheres(o: Tensor, d: Tensor, centers: Tensor, radii: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest positive hit of each ray (N) with each sphere (S): t (N, S) (inf where missed), normals (N, S, 3)."""
    oc = o[:, None, :] - centers[None]  # (N, S, 3)
    a = (d * d).sum(-1, keepdim=True)  # (N, 1)
    b = 2 * (oc * d[:, None, :]).sum(-1)  # (N, S)
    c = (oc * oc).sum(-1) - radii[None] ** 2
    disc = b * b - 4 * a * c
    root = disc.clamp_min(0).sqrt()
    t_near, t_far = (-b - root) / (2 * a), (-b + root) / (2 * a)
    t = torch.where(t_near > _EPS, t_near, t_far)
    t = torch.where((disc >= 0) & (t > _EPS), t, torch.full_like(t, math.inf))
    points = o[:, None, :] + t.clamp(max=1e6)[..., None] * d[:, None, :]
    normals = (points - centers[None]) / radii[None, :, None]
    return t, normals


def _hit_boxes(o: Tensor, d: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Slab test of each ray (N) with each axis-aligned box (B): t (N, B) (inf where missed), normals (N, B, 3)."""
    safe = torch.where(d.abs() < 1e-12, torch.full_like(d, 1e-12), d)
    inv = 1.0 / safe  # (N, 3)
    t1 = (lo[None] - o[:, None, :]) * inv[:, None, :]  # (N, B, 3)
    t2 = (hi[None] - o[:, None, :]) * inv[:, None, :]
    t_lo, t_hi = torch.minimum(t1, t2), torch.maximum(t1, t2)
    t_enter, axis_enter = t_lo.max(-1)
    t_exit, axis_exit = t_hi.min(-1)
    hit = t_exit >= torch.maximum(t_enter, torch.full_like(t_enter, _EPS))
    outside = t_enter > _EPS
    t = torch.where(outside, t_enter, t_exit)
    t = torch.where(hit, t, torch.full_like(t, math.inf))
    axis = torch.where(outside, axis_enter, axis_exit)  # (N, B)
    sign = -torch.sign(safe)[:, None, :].expand(-1, lo.shape[0], -1).gather(-1, axis[..., None]).squeeze(-1)
    normals = torch.zeros(*t.shape, 3).scatter(-1, axis[..., None], sign[..., None])
    return t, normals


def cast_rays(scene: Scene, rays_o: Tensor, rays_d: Tensor) -> tuple[Tensor, Tensor]:
    """The exact colour and hit distance of every ray.

    Args:
        rays_o, rays_d: (..., 3) origins and directions (any length).

    Returns:
        ``(colors, t)``: (..., 3) shaded colour in [0, 1] (``scene.background`` where nothing is hit) and
        (...,) the ray parameter of the first hit (``inf`` where nothing is hit).
    """
    if rays_o.shape != rays_d.shape or rays_o.shape[-1] != 3:
        raise ValueError(f"rays_o and rays_d must both be (..., 3), got {tuple(rays_o.shape)} and {tuple(rays_d.shape)}")
    shape = rays_o.shape[:-1]
    o, d = rays_o.reshape(-1, 3).float(), rays_d.reshape(-1, 3).float()
    n = o.shape[0]
    ts, normals, albedo = [], [], []
    if scene.sphere_radii.numel():
        t, nrm = _hit_spheres(o, d, scene.sphere_centers, scene.sphere_radii)
        ts.append(t), normals.append(nrm), albedo.append(scene.sphere_colors[None].expand(n, -1, -1))
    if scene.box_min.numel():
        t, nrm = _hit_boxes(o, d, scene.box_min, scene.box_max)
        ts.append(t), normals.append(nrm), albedo.append(scene.box_colors[None].expand(n, -1, -1))
    # the ground disc
    dz = torch.where(d[:, 2].abs() < 1e-12, torch.full_like(d[:, 2], 1e-12), d[:, 2])
    t_g = (scene.ground_z - o[:, 2]) / dz
    p_g = o + t_g.clamp(-1e6, 1e6)[:, None] * d
    on_disc = (t_g > _EPS) & (p_g[:, :2].norm(dim=-1) <= scene.ground_radius)
    ts.append(torch.where(on_disc, t_g, torch.full_like(t_g, math.inf))[:, None])
    normals.append(torch.tensor([0.0, 0.0, 1.0]).expand(n, 1, 3))
    checker = (torch.floor(p_g[:, 0] / scene.tile) + torch.floor(p_g[:, 1] / scene.tile)).remainder(2).long()
    albedo.append(scene.ground_colors[checker][:, None, :])

    t_all, n_all, a_all = torch.cat(ts, 1), torch.cat(normals, 1), torch.cat(albedo, 1)
    t_hit, which = t_all.min(1)
    nrm = n_all.gather(1, which[:, None, None].expand(-1, 1, 3)).squeeze(1)
    alb = a_all.gather(1, which[:, None, None].expand(-1, 1, 3)).squeeze(1)
    light = scene.light_dir / scene.light_dir.norm()
    shade = scene.ambient + (1 - scene.ambient) * (nrm @ light).clamp_min(0)
    colors = torch.where(torch.isfinite(t_hit)[:, None], alb * shade[:, None], scene.background.expand(n, 3))
    return colors.clamp(0, 1).reshape(*shape, 3), t_hit.reshape(shape)


def render_views(scene: Scene, poses: Tensor, H: int, W: int, focal: float) -> Tensor:
    """Images (V, H, W, 3) in [0, 1] of ``scene`` seen from ``poses`` (V, 4, 4), one ray per pixel centre."""
    if poses.dim() != 3 or poses.shape[-2:] not in ((4, 4), (3, 4)):
        raise ValueError(f"poses must be (V, 4, 4) or (V, 3, 4), got {tuple(poses.shape)}")
    return torch.stack([cast_rays(scene, *get_rays(H, W, focal, c2w))[0] for c2w in poses])


# ---------------------------------------------------------------------------------------------- data set


@dataclass
class LightFieldViews:
    """Posed images of one scene: ``images`` (V, H, W, 3) in [0, 1], ``poses`` (V, 4, 4) camera-to-world,
    shared intrinsics (``H``, ``W``, ``focal``), the depth range ``near``..``far`` that holds the scene, and
    the background colour (3,)."""

    images: Tensor
    poses: Tensor
    H: int
    W: int
    focal: float
    near: float
    far: float
    background: Tensor

    def __len__(self) -> int:
        return self.images.shape[0]

    def rays(self) -> tuple[Tensor, Tensor, Tensor]:
        """Every pixel as a ray: ``(rays_o, rays_d, colors)``, each (V*H*W, 3)."""
        o, d = zip(*(get_rays(self.H, self.W, self.focal, c2w) for c2w in self.poses))
        return torch.stack(o).reshape(-1, 3), torch.stack(d).reshape(-1, 3), self.images.reshape(-1, 3)


def make_views(scene: Scene, num_views: int, *, H: int = 32, W: int = 32, focal: float | None = None,
               radius: float = 4.0, elevation: tuple[float, float] = (10.0, 70.0), seed: int = 0) -> LightFieldViews:
    """``num_views`` random views (:func:`random_poses`, deterministic by ``seed``) of ``scene`` rendered at
    ``H``×``W`` (``focal`` defaults to ``W``: a 53° field of view). ``near``/``far`` = ``radius ∓ 2``, which
    holds every primitive of :func:`make_scene` (all within distance 1.7 of the origin)."""
    if num_views <= 0:
        raise ValueError(f"num_views must be > 0, got {num_views}")
    if radius <= 2.0:
        raise ValueError(f"radius must be > 2 (the scene spans ~1.7 around the origin), got {radius}")
    focal = float(W if focal is None else focal)
    poses = random_poses(num_views, radius, elevation, seed)
    images = render_views(scene, poses, H, W, focal)
    return LightFieldViews(images, poses, H, W, focal, radius - 2.0, radius + 2.0, scene.background.clone())
