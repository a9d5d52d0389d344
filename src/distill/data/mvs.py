"""A small procedural multi-view stereo (MVS) data set: textured planes and boxes seen by pinhole cameras.

Built for KD-MVS (Ding et al., "KD-MVS: Knowledge Distillation Based Self-supervised Learning for
Multi-view Stereo", ECCV 2022, arXiv 2207.10425) at a size a CPU trains in minutes. Every scene is a
deterministic function of ``(seed, index)``:

* a background plane (tilted up to ±8°) at depth 4.4-5.2 and one or two boxes (edges 0.6-1.3, yawed up
  to ±35°, centres at depth 2.8-4.2), every face carrying its own texture: a real MNIST or
  Fashion-MNIST digit (when the files are there) colourised with two random colours and blended with
  smooth procedural noise, or the noise alone (``texture="noise"``);
* ``num_views`` pinhole cameras with shared intrinsics ``K`` (focal ``size`` pixels, principal point at
  the image centre): view 0 (the reference) at the origin looking down ``+z``; the others shifted
  sideways by a baseline of 0.8-1.1 (alternately left and right, a little up or down) and turned to look
  at the point ``(0, 0, 4)``;
* images rendered by ray casting with 2×2 super-sampling, and the ground-truth depth (the camera-frame
  ``z`` of the first surface hit) at every pixel centre.

Camera convention (MVSNet's): pixel ``(u, v)`` = (column, row), integers at pixel centres; a world point
``X`` maps to ``E @ [X, 1]`` in the camera frame (``E = [R | t]``, 4×4) and to pixels by ``K``; the
*projection* of a view is the 4×4 ``P = [[K, 0], [0, 1]] @ E``, so ``P @ [X, 1] = [u·z, v·z, z, 1]``.

A model sees one scene as a single tensor (what ``Distiller`` hands a model: ``model(batch.inputs)``):
:func:`pack_views` stores the images ``(B, V, 3, H, W)`` and projections ``(B, V, 4, 4)`` as
``(B, V, 4, H, W)``, channel 3 holding ``P`` in its top-left 4×4 corner; :func:`unpack_views` undoes it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.batch import DenseBatch

__all__ = ["MVSLoader", "MVSScenes", "look_at", "pack_views", "unpack_views", "render_view"]

TEXTURES = ("auto", "mnist", "fashion", "noise")


# ----------------------------------------------------------------------------------------- packing


def pack_views(images: Tensor, proj: Tensor) -> Tensor:
    """Images ``(B, V, C, H, W)`` and projections ``(B, V, 4, 4)`` as one tensor ``(B, V, C+1, H, W)``:
    channel ``C`` holds each view's ``P`` in its top-left 4×4 corner (zeros elsewhere)."""
    if images.dim() != 5 or proj.shape != (*images.shape[:2], 4, 4):
        raise ValueError(f"pack_views expects images (B, V, C, H, W) and proj (B, V, 4, 4), got "
                         f"{tuple(images.shape)} and {tuple(proj.shape)}")
    if images.shape[-1] < 4 or images.shape[-2] < 4:
        raise ValueError(f"pack_views needs images of at least 4x4 pixels, got {tuple(images.shape[-2:])}")
    cam = images.new_zeros(*images.shape[:2], 1, *images.shape[-2:])
    cam[:, :, 0, :4, :4] = proj.to(images.dtype)
    return torch.cat([images, cam], dim=2)


def unpack_views(x: Tensor) -> tuple[Tensor, Tensor]:
    """Undo :func:`pack_views`: ``(B, V, C+1, H, W)`` → images ``(B, V, C, H, W)``, projections ``(B, V, 4, 4)``."""
    if x.dim() != 5 or x.shape[2] < 2:
        raise ValueError(f"expected packed multi-view inputs (B, V, C+1, H, W) from pack_views, got {tuple(x.shape)}")
    return x[:, :, :-1], x[:, :, -1, :4, :4]


# ----------------------------------------------------------------------------------------- geometry


def look_at(centre: Tensor, target: Tensor) -> Tensor:
    """World-to-camera extrinsic ``E`` (4, 4) of a camera at ``centre`` (3,) looking at ``target`` (3,),
    image ``y`` pointing down (world ``+y``), as the reference camera at the origin does."""
    f = F.normalize(target - centre, dim=0)
    r = F.normalize(torch.linalg.cross(torch.tensor([0.0, 1.0, 0.0], dtype=f.dtype), f), dim=0)
    d = torch.linalg.cross(f, r)
    e = torch.eye(4, dtype=f.dtype)
    e[:3, :3] = torch.stack([r, d, f])
    e[:3, 3] = -e[:3, :3] @ centre
    return e


def _rot(axis: int, angle: float) -> Tensor:
    c, s = math.cos(angle), math.sin(angle)
    i, j = [a for a in range(3) if a != axis]
    m = torch.eye(3)
    m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
    return m


def render_view(quads: list[tuple[Tensor, Tensor, Tensor, Tensor]], k: Tensor, ext: Tensor, h: int, w: int
                ) -> tuple[Tensor, Tensor]:
    """Ray-cast planar quads into one view.

    Args:
        quads: each ``(origin (3,), edge_a (3,), edge_b (3,), texture (3, th, tw))`` with ``edge_a ⟂ edge_b``;
            the quad is ``origin + s·edge_a + t·edge_b`` for ``s, t ∈ [0, 1]``, textured by ``(s, t)``.
        k: intrinsics (3, 3); ext: world-to-camera (4, 4); h, w: image size.

    Returns:
        image ``(3, h, w)`` (0 where no quad is hit) and depth ``(h, w)`` (camera ``z``; ``inf`` where none).
    """
    v, u = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    pix = torch.stack([u, v, torch.ones_like(u)], -1).reshape(-1, 3)                 # (N, 3)
    rays_cam = pix @ torch.linalg.inv(k).T                                            # z = 1: ray length = depth
    rot, trans = ext[:3, :3], ext[:3, 3]
    rays = rays_cam @ rot                                                             # R^T d, (N, 3)
    centre = -rot.T @ trans
    depth = torch.full((pix.shape[0],), float("inf"))
    image = torch.zeros(pix.shape[0], 3)
    for origin, ea, eb, tex in quads:
        normal = torch.linalg.cross(ea, eb)
        denom = rays @ normal
        lam = ((origin - centre) @ normal) / torch.where(denom.abs() < 1e-9, torch.full_like(denom, 1e-9), denom)
        p = centre + lam[:, None] * rays - origin
        s, t = p @ ea / (ea @ ea), p @ eb / (eb @ eb)
        hit = (lam > 1e-4) & (s >= 0) & (s <= 1) & (t >= 0) & (t <= 1) & (lam < depth)
        if hit.any():
            grid = torch.stack([s[hit] * 2 - 1, t[hit] * 2 - 1], -1).view(1, 1, -1, 2)
            colour = F.grid_sample(tex[None], grid, mode="bilinear", padding_mode="border", align_corners=True)
            image[hit] = colour[0, :, 0].T
            depth[hit] = lam[hit]
    return image.T.reshape(3, h, w), depth.reshape(h, w)


# ----------------------------------------------------------------------------------------- textures


def _digit_bank(texture: str, root: str | Path | None) -> tuple[Tensor | None, str]:
    """Up to 2,000 real 28×28 images (N, 28, 28) in [0, 1] and their source's name, or (None, "noise")."""
    if texture == "noise":
        return None, "noise"
    from distill.data.sources import FASHION_MNIST_ROOT, load_fashion_mnist, load_mnist

    tries = [("mnist", root or Path("/work/shared/data/mnist")), ("fashion", root or FASHION_MNIST_ROOT)]
    if texture == "fashion":
        tries = tries[::-1]
    for name, path in tries:
        if texture not in ("auto", name):
            continue
        try:
            loader = load_mnist if name == "mnist" else load_fashion_mnist
            return loader(path, "test")[0][:2000, 0], name
        except FileNotFoundError:
            if texture != "auto":
                raise
    return None, "noise"


def _texture(g: torch.Generator, bank: Tensor | None, size: int = 32) -> Tensor:
    """One face's texture (3, size, size): smooth noise at three scales, plus a colourised real image."""
    def noise(cells: int) -> Tensor:
        return F.interpolate(torch.rand(1, 3, cells, cells, generator=g), size=(size, size), mode="bilinear",
                             align_corners=True)[0]

    tex = 0.3 * noise(4) + 0.3 * noise(10) + 0.4 * noise(24)
    if bank is not None:
        digit = bank[int(torch.randint(len(bank), (1,), generator=g))]
        digit = F.interpolate(digit[None, None], size=(size, size), mode="bilinear", align_corners=False)[0]
        ca, cb = torch.rand(3, 1, 1, generator=g), torch.rand(3, 1, 1, generator=g)
        tex = 0.5 * tex + 0.5 * (ca * (1 - digit) + cb * digit)
    return tex.clamp(0, 1)


# ----------------------------------------------------------------------------------------- the data set


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


class MVSScenes:
    """``num_scenes`` procedural scenes, each seen from ``num_views`` cameras (view 0 = reference).

    Attributes:
        images: ``(N, V, 3, H, W)`` in [0, 1]; proj: ``(N, V, 4, 4)``; depth: ``(N, V, H, W)`` ground truth
            (never used for training by KD-MVS: evaluation only); intrinsics: ``(3, 3)``;
        depth_values: the ``num_depths`` hypotheses ``(D,)``, uniform in ``[depth_min, depth_max]``;
        texture: which textures were used (``"mnist"``, ``"fashion"`` or ``"noise"``).

    Args:
        num_scenes: N. size: H = W (>= 8). num_views: V (>= 2). depth_min, depth_max, num_depths: the depth
        hypotheses models use (every rendered depth lies inside). seed: the scenes are a function of
        ``(seed, index)``. texture: ``"auto"`` (MNIST, else Fashion-MNIST, else noise), ``"mnist"``,
        ``"fashion"`` (an error when absent) or ``"noise"``. root: the IDX directory of that data set.
    """

    def __init__(self, num_scenes: int, *, size: int = 32, num_views: int = 3, depth_min: float = 1.8,
                 depth_max: float = 7.8, num_depths: int = 24, seed: int = 0, texture: str = "auto",
                 root: str | Path | None = None) -> None:
        if num_scenes < 1:
            raise ValueError(f"num_scenes must be >= 1, got {num_scenes}")
        if size < 8:
            raise ValueError(f"size must be >= 8 pixels, got {size}")
        if num_views < 2:
            raise ValueError(f"num_views must be >= 2 (a reference and a source), got {num_views}")
        if not 0 < depth_min < depth_max:
            raise ValueError(f"need 0 < depth_min < depth_max, got [{depth_min}, {depth_max}]")
        if num_depths < 2:
            raise ValueError(f"num_depths must be >= 2, got {num_depths}")
        if texture not in TEXTURES:
            raise ValueError(f"texture must be one of {TEXTURES}, got {texture!r}")
        bank, self.texture = _digit_bank(texture, root)
        self.size, self.num_views, self.seed = size, num_views, seed
        self.depth_values = torch.linspace(depth_min, depth_max, num_depths)
        f, c = float(size), (size - 1) / 2
        self.intrinsics = torch.tensor([[f, 0, c], [0, f, c], [0, 0, 1.0]])
        images, projs, depths = [], [], []
        for i in range(num_scenes):
            im, pr, de = self._scene(i, bank)
            images.append(im), projs.append(pr), depths.append(de)
        self.images, self.proj, self.depth = torch.stack(images), torch.stack(projs), torch.stack(depths)
        if not torch.isfinite(self.depth).all():
            raise RuntimeError("a rendered pixel hit no surface: the background plane is too small")
        lo, hi = float(self.depth.min()), float(self.depth.max())
        if lo < depth_min or hi > depth_max:
            raise ValueError(f"the scenes' depths span [{lo:.3f}, {hi:.3f}], outside the hypotheses' range "
                             f"[{depth_min}, {depth_max}]: widen it (the defaults 1.8-7.8 cover every scene)")

    def _scene(self, index: int, bank: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        quads = []
        # background: a 16 x 16 plane at depth 4.4-5.2, tilted about x and y
        rot = _rot(0, math.radians(_uniform(g, -8, 8))) @ _rot(1, math.radians(_uniform(g, -8, 8)))
        z = _uniform(g, 4.4, 5.2)
        ea, eb = rot @ torch.tensor([16.0, 0, 0]), rot @ torch.tensor([0, 16.0, 0])
        quads.append((torch.tensor([0, 0, z]) - (ea + eb) / 2, ea, eb, _texture(g, bank)))
        for _ in range(1 + int(torch.randint(2, (1,), generator=g))):
            centre = torch.tensor([_uniform(g, -0.8, 0.8), _uniform(g, -0.8, 0.8), _uniform(g, 2.8, 4.2)])
            half = torch.tensor([_uniform(g, 0.3, 0.65), _uniform(g, 0.3, 0.65), _uniform(g, 0.3, 0.65)])
            r = _rot(1, math.radians(_uniform(g, -35, 35)))
            ax = [r[:, j] * half[j] for j in range(3)]  # half-edges along the box's own axes
            for j in range(3):
                a, b = ax[(j + 1) % 3], ax[(j + 2) % 3]
                for sign in (-1.0, 1.0):
                    origin = centre + sign * ax[j] - a - b
                    quads.append((origin, 2 * a, 2 * b, _texture(g, bank)))
        k = self.intrinsics
        k4 = torch.eye(4)
        k4[:3, :3] = k
        k_hi = k.clone()
        k_hi[:2, :2] *= 2
        k_hi[:2, 2] = k[:2, 2] * 2 + 0.5
        images, projs, depths = [], [], []
        for view in range(self.num_views):
            if view == 0:
                ext = torch.eye(4)
            else:
                side = -1.0 if view % 2 else 1.0
                baseline = _uniform(g, 0.8, 1.1) * (1 + (view - 1) // 2)
                centre = torch.tensor([side * baseline, _uniform(g, -0.15, 0.15), 0.0])
                ext = look_at(centre, torch.tensor([0.0, 0.0, 4.0]))
            hi, _ = render_view(quads, k_hi, ext, 2 * self.size, 2 * self.size)
            _, depth = render_view(quads, k, ext, self.size, self.size)
            images.append(F.avg_pool2d(hi[None], 2)[0])
            depths.append(depth)
            projs.append(k4 @ ext)
        return torch.stack(images), torch.stack(projs), torch.stack(depths)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def packed(self) -> Tensor:
        """Every scene as model input: ``(N, V, 4, H, W)`` (:func:`pack_views`)."""
        return pack_views(self.images, self.proj)

    def loader(self, batch_size: int, *, shuffle: bool = False, seed: int = 0, with_depth: bool = False
               ) -> MVSLoader:
        """Mini-batches of :class:`~distill.batch.DenseBatch` (see :class:`MVSLoader`)."""
        return MVSLoader(self, batch_size, shuffle=shuffle, seed=seed, with_depth=with_depth)


class MVSLoader:
    """Mini-batches of a :class:`MVSScenes`: ``DenseBatch(inputs=(B, V, 4, H, W) packed, index=(B,))``.

    ``with_depth=True`` adds the ground truth of the reference view as ``extras["depth"]`` ``(B, H, W)``
    (for evaluation; training batches leave it out, so no loss can read it). ``shuffle`` draws a new order
    each epoch from ``(seed, epoch)``.
    """

    def __init__(self, data: MVSScenes, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                 with_depth: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.data, self.batch_size, self.shuffle, self.seed, self.with_depth = data, batch_size, shuffle, seed, with_depth
        self.epoch = 0
        self._packed = data.packed()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self.data) / self.batch_size)

    def __iter__(self) -> Iterator[DenseBatch]:
        n = len(self.data)
        order = (torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 7919 + self.epoch))
                 if self.shuffle else torch.arange(n))
        for start in range(0, n, self.batch_size):
            idx = order[start:start + self.batch_size]
            extras = {"depth": self.data.depth[idx, 0]} if self.with_depth else {}
            yield DenseBatch(self._packed[idx], index=idx, extras=extras)
