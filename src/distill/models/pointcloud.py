"""Point-cloud BEV detectors: a PointPillars-style pair and a PointNet-style student.

All three read a padded point cloud ``(B, P, F)`` (``F >= 3``: x, y, z in metres, then any
per-point features such as intensity; :mod:`distill.data.pointscenes`) and predict, on a
bird's-eye-view (BEV) grid of ``H × W`` cells, a CenterPoint-style output:

- a class heatmap ``(B, K, H, W)`` (logits; the target is a Gaussian peak at each box centre),
- a box regression ``(B, 8, H, W)``: the centre's offset inside its cell (2, in cells), the centre
  height z (1, metres), the log size ``log dx, log dy, log dz`` (3, metres) and ``sin, cos`` of the
  yaw (2).

**Padding.** ``distill.Distiller`` calls ``model(batch.inputs)``, so a model must tell points from
padding without ``point_mask``. The scenes of :mod:`distill.data.pointscenes` carry a validity
column, ``(x, y, z, intensity, valid)``, 1 for a point and 0 for a padding row: the models read it
(``valid_column = 4``, the default, with ``in_features = 5``). A model built with
``valid_column=None`` takes a row whose x, y and z are all exactly 0 for padding (a LiDAR return
always lies at a positive range from the sensor). ``model(points, point_mask=mask)`` uses the mask
when one is given. Points outside the grid's x/y/z range are dropped as well.

Models (registered in the zoo):

- ``pillars_teacher`` / ``pillars_student``: PointPillars (Lang et al., "PointPillars: Fast
  Encoders for Object Detection from Point Clouds", CVPR 2019, arXiv 1812.05784) made small: each
  point is decorated with its offset to the mean of its pillar's points and to the pillar's
  centre (9 features from x, y, z, intensity), a linear layer + BatchNorm + ReLU, a max over the
  points of each pillar, the pillars scattered into the BEV grid, a two-block 2D backbone
  (strides 1 and 2, the second upsampled and concatenated: SECOND's FPN in miniature) and a
  CenterPoint head (Yin, Zhou, Krähenbühl, "Center-based 3D Object Detection and Tracking",
  CVPR 2021, arXiv 2006.11275). The student is the teacher at half the widths.
- ``pointnet_bev_student``: a PointNet (Qi et al., CVPR 2017, arXiv 1612.00593) shared MLP on the
  raw points (x, y, z, intensity and the offset to the cell centre; no pillar-mean decoration),
  max-pooled into the BEV cells, one 2D conv block and the same head.

Taps (``nn.Identity`` modules): ``"point_features"`` ``(B, P, C)`` (per point, 0 at padding),
``"pillar_bev"`` ``(B, C, H, W)`` (the scattered pillar features, 0 in empty cells),
``"pillar_counts"`` ``(B, 1, H, W)`` (points per cell, float), ``"bev_features"`` ``(B, C', H, W)``
(the 2D backbone's output, what the head reads), ``"heatmap_out"`` ``(B, K, H, W)`` and
``"reg_out"`` ``(B, 8, H, W)``. ``forward`` returns ``{"logits": (B, H·W, K), "heatmap", "reg"}``.

The pure pieces (grid geometry, the pillar scatter, CenterPoint targets and decoding) are
functions here, so the losses (:mod:`distill.functional.dense3d`) and the methods share them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.models.registry import register_model

__all__ = [
    "BEVGrid",
    "BEVTargets",
    "PointPillarsBEV",
    "PointNetBEV",
    "valid_points",
    "cell_index",
    "scatter_max",
    "cell_counts",
    "gaussian_radius",
    "bev_targets",
    "decode_bev",
    "REG_CHANNELS",
]

REG_CHANNELS = 8
"""Box regression channels: offset x, offset y (cells), z (m), log dx, log dy, log dz (m), sin yaw, cos yaw."""


@dataclass(frozen=True)
class BEVGrid:
    """The bird's-eye-view grid: cell ``(row, col)`` covers ``y ∈ [y0 + row·cell, y0 + (row+1)·cell)``,
    ``x ∈ [x0 + col·cell, ...)``; points with z outside ``z_range`` are dropped.

    Default: the point scenes' range (:data:`distill.data.pointscenes.BEV_RANGE`, x ∈ [0, 40],
    y ∈ [-20, 20], z ∈ [-1, 5] m) in 0.625 m cells, a 64 × 64 grid.
    """

    x_range: tuple[float, float] = (0.0, 40.0)
    y_range: tuple[float, float] = (-20.0, 20.0)
    z_range: tuple[float, float] = (-1.0, 5.0)
    cell: float = 0.625

    def __post_init__(self) -> None:
        for name in ("x_range", "y_range", "z_range"):
            lo, hi = getattr(self, name)
            if not hi > lo:
                raise ValueError(f"BEVGrid.{name} must be (low, high) with high > low, got {(lo, hi)}")
        if not self.cell > 0:
            raise ValueError(f"BEVGrid.cell must be > 0 metres, got {self.cell}")

    @property
    def width(self) -> int:
        """Columns (along x)."""
        return int(round((self.x_range[1] - self.x_range[0]) / self.cell))

    @property
    def height(self) -> int:
        """Rows (along y)."""
        return int(round((self.y_range[1] - self.y_range[0]) / self.cell))


# ------------------------------------------------------------------------------------------
# the pillar scatter
# ------------------------------------------------------------------------------------------


def valid_points(points: Tensor, point_mask: Tensor | None = None, valid_column: int | None = None) -> Tensor:
    """Which rows of ``points`` ``(B, P, F)`` are points → ``(B, P)`` bool: ``point_mask`` ``(B, P)`` when
    given, else ``points[..., valid_column] > 0`` when a validity column is named, else the rows whose
    x, y, z are not all 0 (the padding conventions of this module)."""
    if points.dim() != 3 or points.shape[-1] < 3:
        raise ValueError(f"points must be (B, P, F) with F >= 3 (x, y, z, ...), got {tuple(points.shape)}")
    if point_mask is not None:
        if tuple(point_mask.shape) != tuple(points.shape[:2]):
            raise ValueError(f"point_mask must be (B, P) = {tuple(points.shape[:2])}, got {tuple(point_mask.shape)}")
        return point_mask.bool()
    if valid_column is not None:
        return points[..., valid_column] > 0
    return (points[..., :3] != 0).any(dim=-1)


def cell_index(points: Tensor, valid: Tensor, grid: BEVGrid) -> tuple[Tensor, Tensor]:
    """The BEV cell of each point: ``(index (B, P) long = row·W + col, keep (B, P) bool)``; ``keep`` is
    ``valid`` and inside the grid's x, y, z ranges (``index`` is 0 where ``keep`` is False)."""
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    col = torch.floor((x - grid.x_range[0]) / grid.cell).long()
    row = torch.floor((y - grid.y_range[0]) / grid.cell).long()
    keep = (valid & (col >= 0) & (col < grid.width) & (row >= 0) & (row < grid.height)
            & (z >= grid.z_range[0]) & (z < grid.z_range[1]))
    index = torch.where(keep, row * grid.width + col, torch.zeros_like(col))
    return index, keep


def scatter_max(features: Tensor, index: Tensor, keep: Tensor, grid: BEVGrid) -> Tensor:
    """Max-pool per-point features into their BEV cells (the pillar scatter).

    ``features`` ``(B, P, C)``, ``index``/``keep`` ``(B, P)`` from :func:`cell_index` →
    ``(B, C, H, W)``: ``out[b, :, r, c] = max { features[b, p] : keep[b, p], index[b, p] = r·W + c }``,
    and 0 for a cell without points.
    """
    b, p, c = features.shape
    cells = grid.height * grid.width
    flat = (index + torch.arange(b, device=index.device).unsqueeze(1) * cells)[keep]  # (n,)
    out = features.new_zeros(b * cells, c)
    out = out.scatter_reduce(0, flat.unsqueeze(1).expand(-1, c), features[keep], reduce="amax", include_self=False)
    return out.view(b, grid.height, grid.width, c).permute(0, 3, 1, 2)


def cell_counts(index: Tensor, keep: Tensor, grid: BEVGrid) -> Tensor:
    """Points per BEV cell: ``(B, 1, H, W)`` float."""
    b = index.shape[0]
    cells = grid.height * grid.width
    counts = torch.zeros(b, cells, device=index.device)
    counts.scatter_add_(1, index, keep.float())
    return counts.view(b, 1, grid.height, grid.width)


def _cell_mean(values: Tensor, index: Tensor, keep: Tensor, grid: BEVGrid) -> Tensor:
    """Per point, the mean of ``values`` ``(B, P, D)`` over the kept points of its cell → ``(B, P, D)``."""
    b, _, d = values.shape
    cells = grid.height * grid.width
    w = keep.float().unsqueeze(-1)
    sums = values.new_zeros(b, cells, d).scatter_add_(1, index.unsqueeze(-1).expand(-1, -1, d), values * w)
    counts = values.new_zeros(b, cells, 1).scatter_add_(1, index.unsqueeze(-1), w)
    mean = sums / counts.clamp_min(1.0)
    return mean.gather(1, index.unsqueeze(-1).expand(-1, -1, d))


def _cell_centres(index: Tensor, grid: BEVGrid) -> Tensor:
    """The x, y of each point's cell centre ``(B, P, 2)``."""
    col = (index % grid.width).float()
    row = torch.div(index, grid.width, rounding_mode="floor").float()
    return torch.stack([grid.x_range[0] + (col + 0.5) * grid.cell, grid.y_range[0] + (row + 0.5) * grid.cell], -1)


# ------------------------------------------------------------------------------------------
# CenterPoint targets and decoding
# ------------------------------------------------------------------------------------------


def gaussian_radius(height: Tensor, width: Tensor, min_overlap: float = 0.1) -> Tensor:
    """CornerNet's radius (Law & Deng, ECCV 2018, arXiv 1808.01244), as CenterNet and CenterPoint use it:
    the smallest of the three radii at which a box of ``height × width`` (cells) shifted by it keeps
    IoU ``min_overlap`` with the original (the three cases of the two corners moving)."""
    h, w = height, width
    b1 = h + w
    c1 = w * h * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + torch.sqrt(b1 ** 2 - 4 * c1)) / 2
    b2 = 2 * (h + w)
    c2 = (1 - min_overlap) * w * h
    r2 = (b2 + torch.sqrt(b2 ** 2 - 16 * c2)) / 2
    a3 = 4 * min_overlap
    b3 = -2 * min_overlap * (h + w)
    c3 = (min_overlap - 1) * w * h
    r3 = (b3 + torch.sqrt(b3 ** 2 - 4 * a3 * c3)) / 2
    return torch.minimum(torch.minimum(r1, r2), r3)


@dataclass
class BEVTargets:
    """CenterPoint training targets of a batch on a :class:`BEVGrid`.

    Attributes:
        heatmap: ``(B, K, H, W)`` in [0, 1]: per class the max over its boxes of
            ``exp(-((r - r_c)² + (c - c_c)²) / (2σ²))``, ``σ = (2·radius + 1) / 6``, ``radius =
            max(min_radius, floor(gaussian_radius(dy, dx in cells)))``, centred on the integer cell of
            the box centre (exactly 1 there).
        index: ``(B, M)`` long, the centre cell ``row·W + col`` of each box (M = the most boxes of an
            image; 0 for padding).
        mask: ``(B, M)`` bool, which entries are boxes (False for padding and boxes off the grid).
        reg: ``(B, M, 8)`` the regression target at the centre cell (:data:`REG_CHANNELS`).
    """

    heatmap: Tensor
    index: Tensor
    mask: Tensor
    reg: Tensor


def bev_targets(boxes: list[Tensor], labels: list[Tensor], grid: BEVGrid, num_classes: int, *,
                min_radius: int = 2, min_overlap: float = 0.1) -> BEVTargets:
    """CenterPoint targets from 3D boxes ``(n_i, 7)`` ``(x, y, z, dx, dy, dz, yaw)`` and labels ``(n_i,)``.

    Defaults are CenterPoint's (``min_radius = 2``, ``gaussian_overlap = 0.1``, the configs of the
    authors' code ``tianweiy/CenterPoint``). A box whose centre falls off the grid gets no target.
    A later box overwrites an earlier one's regression target at a shared centre cell.
    """
    if len(boxes) != len(labels):
        raise ValueError(f"bev_targets needs one labels tensor per boxes tensor, got {len(boxes)} and {len(labels)}")
    b = len(boxes)
    device = boxes[0].device if b else torch.device("cpu")
    h, w = grid.height, grid.width
    m = max([int(t.shape[0]) for t in boxes] + [1])
    heatmap = torch.zeros(b, num_classes, h, w, device=device)
    index = torch.zeros(b, m, dtype=torch.long, device=device)
    mask = torch.zeros(b, m, dtype=torch.bool, device=device)
    reg = torch.zeros(b, m, REG_CHANNELS, device=device)
    rows = torch.arange(h, device=device, dtype=torch.float32).view(h, 1)
    cols = torch.arange(w, device=device, dtype=torch.float32).view(1, w)
    for i, (bx, lb) in enumerate(zip(boxes, labels)):
        if bx.numel() == 0:
            continue
        if bx.dim() != 2 or bx.shape[1] != 7:
            raise ValueError(f"3D boxes must be (n, 7) (x, y, z, dx, dy, dz, yaw), got {tuple(bx.shape)} in image {i}")
        if lb.numel() and (int(lb.min()) < 0 or int(lb.max()) >= num_classes):
            raise ValueError(f"box labels must lie in [0, {num_classes}), got {lb.tolist()} in image {i}")
        bx = bx.float()
        fx = (bx[:, 0] - grid.x_range[0]) / grid.cell
        fy = (bx[:, 1] - grid.y_range[0]) / grid.cell
        cx, cy = torch.floor(fx).long(), torch.floor(fy).long()
        inside = (cx >= 0) & (cx < w) & (cy >= 0) & (cy < h)
        radius = torch.floor(gaussian_radius(bx[:, 4] / grid.cell, bx[:, 3] / grid.cell, min_overlap))
        radius = radius.clamp_min(min_radius)
        for j in torch.nonzero(inside).flatten().tolist():
            sigma = (2 * float(radius[j]) + 1) / 6
            peak = torch.exp(-((rows - float(cy[j])) ** 2 + (cols - float(cx[j])) ** 2) / (2 * sigma * sigma))
            r = int(radius[j])  # CenterNet draws the Gaussian in a (2r+1)² window only
            window = ((rows - float(cy[j])).abs() <= r) & ((cols - float(cx[j])).abs() <= r)
            k = int(lb[j])
            heatmap[i, k] = torch.maximum(heatmap[i, k], peak * window)
            index[i, j] = cy[j] * w + cx[j]
            mask[i, j] = True
            reg[i, j] = torch.stack([fx[j] - cx[j], fy[j] - cy[j], bx[j, 2], torch.log(bx[j, 3].clamp_min(1e-3)),
                                     torch.log(bx[j, 4].clamp_min(1e-3)), torch.log(bx[j, 5].clamp_min(1e-3)),
                                     torch.sin(bx[j, 6]), torch.cos(bx[j, 6])])
    return BEVTargets(heatmap, index, mask, reg)


def decode_bev(heatmap_logits: Tensor, reg: Tensor, grid: BEVGrid, *, score_threshold: float = 0.1,
               max_detections: int = 50) -> list[dict[str, Tensor]]:
    """Boxes from a CenterPoint head: the peaks of the sigmoid heatmap (a cell that equals the max of
    its 3×3 neighbourhood, CenterPoint's max-pool NMS), the top ``max_detections`` over classes and
    cells, those with score ≥ ``score_threshold``, each box read from ``reg`` at its cell.

    ``heatmap_logits`` ``(B, K, H, W)``, ``reg`` ``(B, 8, H, W)`` → per image
    ``{"boxes": (n, 7) (x, y, z, dx, dy, dz, yaw), "scores": (n,), "labels": (n,) long}``.
    """
    b, k, h, w = heatmap_logits.shape
    if (h, w) != (grid.height, grid.width) or tuple(reg.shape) != (b, REG_CHANNELS, h, w):
        raise ValueError(f"decode_bev: heatmap {tuple(heatmap_logits.shape)} and reg {tuple(reg.shape)} do not match "
                         f"the grid ({grid.height}, {grid.width}) with {REG_CHANNELS} regression channels")
    score = heatmap_logits.detach().float().sigmoid()
    peaks = score == F.max_pool2d(score, 3, stride=1, padding=1)
    score = score * peaks
    top, where = score.flatten(1).topk(min(max_detections, k * h * w), dim=1)
    out = []
    for i in range(b):
        keep = top[i] >= score_threshold
        flat = where[i][keep]
        cls = torch.div(flat, h * w, rounding_mode="floor")
        cell = flat % (h * w)
        row = torch.div(cell, w, rounding_mode="floor")
        col = cell % w
        r = reg[i].detach().float().flatten(1)[:, cell]  # (8, n)
        x = grid.x_range[0] + (col.float() + r[0]) * grid.cell
        y = grid.y_range[0] + (row.float() + r[1]) * grid.cell
        size = r[3:6].clamp(max=6.0).exp()
        yaw = torch.atan2(r[6], r[7])
        out.append({"boxes": torch.stack([x, y, r[2], size[0], size[1], size[2], yaw], dim=1),
                    "scores": top[i][keep], "labels": cls})
    return out


# ------------------------------------------------------------------------------------------
# the models
# ------------------------------------------------------------------------------------------


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _CenterHead(nn.Module):
    """A shared 3×3 conv, then a 1×1 conv to the K heatmap logits and one to the 8 regression channels."""

    def __init__(self, channels: int, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.shared = _conv(channels, hidden)
        self.heatmap = nn.Conv2d(hidden, num_classes, 1)
        self.reg = nn.Conv2d(hidden, REG_CHANNELS, 1)
        nn.init.constant_(self.heatmap.bias, -2.19)  # CenterPoint's prior: sigmoid(-2.19) ≈ 0.1

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.shared(x)
        return self.heatmap(x), self.reg(x)


class _BEVDetector(nn.Module):
    """What the pillar and the PointNet detectors share: the point checks, the head's output, predict."""

    grid: BEVGrid
    num_classes: int

    def _init_taps(self) -> None:
        self.point_features = nn.Identity()
        self.pillar_bev = nn.Identity()
        self.pillar_counts = nn.Identity()
        self.bev_features = nn.Identity()
        self.heatmap_out = nn.Identity()
        self.reg_out = nn.Identity()

    def _check(self, points: Tensor) -> None:
        if points.dim() != 3 or points.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__} expects points (B, P, {self.in_features}) "
                             f"(x, y, z{', features' if self.in_features > 3 else ''}), got {tuple(points.shape)}")

    def _points_to_cells(self, points: Tensor, point_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        self._check(points)
        valid = valid_points(points, point_mask, self.valid_column)
        return cell_index(points, valid, self.grid)

    def _head(self, bev: Tensor) -> dict[str, Tensor]:
        bev = self.bev_features(bev)
        heatmap, reg = self.head(bev)
        heatmap = self.heatmap_out(heatmap)
        reg = self.reg_out(reg)
        return {"logits": heatmap.flatten(2).transpose(1, 2), "heatmap": heatmap, "reg": reg}

    @torch.no_grad()
    def predict(self, points: Tensor, point_mask: Tensor | None = None, *, score_threshold: float = 0.05,
                max_detections: int = 50) -> list[dict[str, Tensor]]:
        """Detected 3D boxes per scene (:func:`decode_bev`), the model in eval mode for the call."""
        was = self.training
        self.eval()
        try:
            out = self(points, point_mask=point_mask)
        finally:
            self.train(was)
        return decode_bev(out["heatmap"], out["reg"], self.grid, score_threshold=score_threshold,
                          max_detections=max_detections)


class PointPillarsBEV(_BEVDetector):
    """PointPillars with a CenterPoint head (see the module docstring).

    Args:
        num_classes: K object classes.
        in_features: F, features per point (x, y, z and ``F - 3`` more, e.g. intensity and validity).
        valid_column: the feature that is 1 for a point and 0 for padding, or ``None`` (zero rows are padding).
        pillar_channels: the pillar feature net's width C.
        widths: the 2D backbone's two block widths (strides 1 and 2); ``bev_features`` has
            ``2·widths[0]`` channels (block 1 and the upsampled block 2, concatenated).
        grid: the BEV grid (:class:`BEVGrid`).
    """

    def __init__(self, num_classes: int = 3, in_features: int = 5, pillar_channels: int = 32,
                 widths: tuple[int, int] = (32, 64), grid: BEVGrid | None = None, valid_column: int | None = 4) -> None:
        super().__init__()
        if num_classes < 1 or in_features < 3 or pillar_channels < 1 or len(widths) != 2 or min(widths) < 1:
            raise ValueError(f"PointPillarsBEV: num_classes >= 1, in_features >= 3, pillar_channels >= 1 and two "
                             f"positive widths expected, got {num_classes}, {in_features}, {pillar_channels}, {widths}")
        self.num_classes, self.in_features = int(num_classes), int(in_features)
        if valid_column is not None and not 3 <= valid_column < in_features:
            raise ValueError(f"valid_column must index a feature after x, y, z (3 <= valid_column < {in_features}) "
                             f"or be None, got {valid_column}")
        self.valid_column = valid_column
        self.grid = grid or BEVGrid()
        decorated = in_features + 5  # + offset to the pillar's point mean (3) and to the pillar centre (2)
        self.pfn = nn.Linear(decorated, pillar_channels, bias=False)
        self.pfn_norm = nn.BatchNorm1d(pillar_channels)
        c1, c2 = widths
        self.block1 = nn.Sequential(_conv(pillar_channels, c1), _conv(c1, c1))
        self.block2 = nn.Sequential(_conv(c1, c2, 2), _conv(c2, c2))
        self.up2 = nn.Sequential(nn.ConvTranspose2d(c2, c1, 2, 2, bias=False), nn.BatchNorm2d(c1), nn.ReLU(inplace=True))
        self.head = _CenterHead(2 * c1, c1, num_classes)
        self._init_taps()

    def forward(self, points: Tensor, point_mask: Tensor | None = None) -> dict[str, Tensor]:
        """``points`` ``(B, P, F)`` (and optionally ``point_mask`` ``(B, P)``) → the head's output dict."""
        index, keep = self._points_to_cells(points, point_mask)
        pts = points.float()
        mean = _cell_mean(pts[..., :3], index, keep, self.grid)
        centre = _cell_centres(index, self.grid)
        decorated = torch.cat([pts, pts[..., :3] - mean, pts[..., :2] - centre], dim=-1)  # (B, P, F + 5)
        feats = decorated.new_zeros(*decorated.shape[:2], self.pfn.out_features)
        if keep.any():
            feats[keep] = F.relu(self.pfn_norm(self.pfn(decorated[keep])))  # BatchNorm over the real points only
        feats = self.point_features(feats)
        self.pillar_counts(cell_counts(index, keep, self.grid))  # for the taps (PointDistiller's importance)
        bev = self.pillar_bev(scatter_max(feats, index, keep, self.grid))
        x1 = self.block1(bev)
        x2 = self.up2(self.block2(x1))
        return self._head(torch.cat([x1, x2], dim=1))


class PointNetBEV(_BEVDetector):
    """A PointNet-style BEV student: a shared MLP on the points, max-pooled into the BEV cells, one 2D
    conv block and the CenterPoint head (see the module docstring).

    Args:
        num_classes: K object classes.
        in_features: F, features per point.
        valid_column: the feature that is 1 for a point and 0 for padding, or ``None`` (zero rows are padding).
        mlp: the shared point MLP's widths (each linear + BatchNorm + ReLU).
        width: the 2D block's width (``bev_features`` has this many channels).
        grid: the BEV grid (:class:`BEVGrid`).
    """

    def __init__(self, num_classes: int = 3, in_features: int = 5, mlp: tuple[int, ...] = (32, 32),
                 width: int = 32, grid: BEVGrid | None = None, valid_column: int | None = 4) -> None:
        super().__init__()
        if num_classes < 1 or in_features < 3 or not mlp or min(mlp) < 1 or width < 1:
            raise ValueError(f"PointNetBEV: num_classes >= 1, in_features >= 3, a non-empty mlp of positive widths "
                             f"and width >= 1 expected, got {num_classes}, {in_features}, {mlp}, {width}")
        self.num_classes, self.in_features = int(num_classes), int(in_features)
        if valid_column is not None and not 3 <= valid_column < in_features:
            raise ValueError(f"valid_column must index a feature after x, y, z (3 <= valid_column < {in_features}) "
                             f"or be None, got {valid_column}")
        self.valid_column = valid_column
        self.grid = grid or BEVGrid()
        layers: list[nn.Module] = []
        cin = in_features + 2  # + offset to the cell centre
        for cout in mlp:
            layers += [nn.Linear(cin, cout, bias=False), nn.BatchNorm1d(cout), nn.ReLU(inplace=True)]
            cin = cout
        self.mlp = nn.Sequential(*layers)
        self.block = nn.Sequential(_conv(cin, width), _conv(width, width))
        self.head = _CenterHead(width, width, num_classes)
        self._init_taps()

    def forward(self, points: Tensor, point_mask: Tensor | None = None) -> dict[str, Tensor]:
        """``points`` ``(B, P, F)`` (and optionally ``point_mask`` ``(B, P)``) → the head's output dict."""
        index, keep = self._points_to_cells(points, point_mask)
        pts = points.float()
        x = torch.cat([pts, pts[..., :2] - _cell_centres(index, self.grid)], dim=-1)
        feats = x.new_zeros(*x.shape[:2], self.mlp[-3].out_features)
        if keep.any():
            feats[keep] = self.mlp(x[keep])
        feats = self.point_features(feats)
        self.pillar_counts(cell_counts(index, keep, self.grid))  # for the taps (PointDistiller's importance)
        bev = self.pillar_bev(scatter_max(feats, index, keep, self.grid))
        return self._head(self.block(bev))


def _grid(x_range: tuple[float, float], y_range: tuple[float, float], z_range: tuple[float, float],
          cell: float) -> BEVGrid:
    return BEVGrid(tuple(x_range), tuple(y_range), tuple(z_range), float(cell))  # type: ignore[arg-type]


@register_model("pillars_teacher")
def pillars_teacher(num_classes: int = 3, in_features: int = 5, valid_column: int | None = 4,
                    x_range: tuple[float, float] = (0.0, 40.0),
                    y_range: tuple[float, float] = (-20.0, 20.0), z_range: tuple[float, float] = (-1.0, 5.0),
                    cell: float = 0.625) -> PointPillarsBEV:
    """PointPillars + CenterPoint head, pillar width 32, backbone widths (32, 64)."""
    return PointPillarsBEV(num_classes, in_features, 32, (32, 64), _grid(x_range, y_range, z_range, cell), valid_column)


@register_model("pillars_student")
def pillars_student(num_classes: int = 3, in_features: int = 5, valid_column: int | None = 4,
                    x_range: tuple[float, float] = (0.0, 40.0),
                    y_range: tuple[float, float] = (-20.0, 20.0), z_range: tuple[float, float] = (-1.0, 5.0),
                    cell: float = 0.625) -> PointPillarsBEV:
    """The teacher at half its widths: pillar width 16, backbone widths (16, 32)."""
    return PointPillarsBEV(num_classes, in_features, 16, (16, 32), _grid(x_range, y_range, z_range, cell), valid_column)


@register_model("pointnet_bev_student")
def pointnet_bev_student(num_classes: int = 3, in_features: int = 5, valid_column: int | None = 4,
                         x_range: tuple[float, float] = (0.0, 40.0),
                         y_range: tuple[float, float] = (-20.0, 20.0), z_range: tuple[float, float] = (-1.0, 5.0),
                         cell: float = 0.625) -> PointNetBEV:
    """PointNet MLP (16, 16) max-pooled into the cells, one 2D block of width 16."""
    return PointNetBEV(num_classes, in_features, (16, 16), 16, _grid(x_range, y_range, z_range, cell), valid_column)
