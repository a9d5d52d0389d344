"""A CenterNet-style monocular 3D detector and the LiDAR-depth teacher of MonoDistill.

The model (:class:`Mono3D`) follows the keypoint recipe of CenterNet (Zhou, Wang, Krähenbühl,
"Objects as Points", 2019, arXiv 1904.07850) as MonoDLE and MonoDistill's baseline use it: a
small conv backbone with one top-down merge gives a stride-4 feature map ``feat``, and five
heads read it: a class heatmap of the objects' projected 3D centres, the sub-pixel offset of that
centre, its depth, the log of the 3D size, and the local yaw. MonoDistill (Chong et al., ICLR
2022, arXiv 2201.10830) trains a *teacher of the same architecture* on LiDAR points projected
into the image plane ("image-like LiDAR maps"): :func:`mono_teacher` reads the sparse depth map,
:func:`mono_student` the camera image, both from the same ``(B, 2, H, W)`` input
``cat(image, depth)`` of :meth:`distill.data.pointscenes.PointSceneSet.loader` (``inputs="camera"``):
channel 0 is the image, channel 1 the depth in metres (0 = no point), which the teacher scales by
``1/40``. A ``(B, 1, H, W)`` input is read as it is.

Outputs (``h, w = H/4, W/4``; taps are ``nn.Identity`` modules on each):

- ``"logits"`` = tap ``"heatmap_out"`` ``(B, K, h, w)``: heatmap logits (sigmoid → scores);
- ``"offset_out"`` ``(B, 2, h, w)``: ``(du, dv)`` in output cells, the centre's sub-cell position;
- ``"depth_out"`` ``(B, 1, h, w)``: raw; the depth in metres is ``1/σ(o) − 1`` (CenterNet's transform);
- ``"size_out"`` ``(B, 3, h, w)``: ``log(dx, dy, dz)`` in metres;
- ``"yaw_out"`` ``(B, 2, h, w)``: ``(sin 2α, cos 2α)`` of the local yaw ``α = yaw − atan2(y, x)``
  (the angle to the viewing ray, which is what the image shows); the doubled angle because our
  boxes and cylinders look the same after a half turn, so ``yaw`` and ``yaw + π`` are one box.
  CenterNet/MonoDLE classify the angle into bins instead (ours: two regressed numbers);
- ``"feat"`` ``(B, C, h, w)`` the map the heads read; ``"backbone_out.0..3"`` the stages
  (strides 1, 2, 4, 8).

Camera geometry (KITTI convention, :mod:`distill.data.pointscenes`): camera at height ``c`` above
the ground looking along world ``+x``; ``x_c = −y``, ``y_c = c − z``, ``z_c = x``; a centre
``(u, v)`` in pixels with depth ``z_c`` back-projects to ``x_c = (u − c_x) z_c / f_x``,
``y_c = (v − c_y) z_c / f_y``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.models.registry import register_model

__all__ = ["Mono3D", "MonoTargets", "boxes_to_2d", "decode_mono", "mono_student", "mono_targets", "mono_teacher"]

DEFAULT_INTRINSICS = ((80.0, 0.0, 80.0), (0.0, 80.0, 32.0), (0.0, 0.0, 1.0))
"""The camera of :class:`distill.data.pointscenes.CameraConfig` (64x160 pixels, 90° field of view)."""


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Mono3D(nn.Module):
    """CenterNet-style monocular 3D detector (see the module notes).

    Args:
        num_classes: ``K`` object classes.
        widths: channels of the 4 backbone stages (strides 1, 2, 4, 8).
        head_width: hidden channels of each head.
        input_channel: which channel of a multi-channel input to read (0 image, 1 depth).
        input_scale: the input is multiplied by this (the teacher's depth in metres by 1/40).
        camera_height: metres above the ground, used by :meth:`predict`.
        intrinsics: default camera ``(3, 3)`` of :meth:`predict`.
    """

    stride = 4

    def __init__(self, num_classes: int = 3, widths: tuple[int, int, int, int] = (16, 32, 64, 96),
                 head_width: int = 64, input_channel: int = 0, input_scale: float = 1.0,
                 camera_height: float = 1.6, intrinsics: Any = DEFAULT_INTRINSICS) -> None:
        super().__init__()
        if num_classes < 1 or len(widths) != 4 or min(widths) < 1 or head_width < 1:
            raise ValueError(f"Mono3D needs num_classes >= 1, 4 positive widths and head_width >= 1, got "
                             f"{num_classes}, {widths}, {head_width}")
        if input_channel < 0:
            raise ValueError(f"input_channel must be >= 0, got {input_channel}")
        self.num_classes, self.input_channel, self.input_scale = num_classes, input_channel, float(input_scale)
        self.camera_height = float(camera_height)
        self.register_buffer("intrinsics", torch.as_tensor(intrinsics, dtype=torch.float32).reshape(3, 3))
        c0, c1, c2, c3 = widths
        self.stages = nn.ModuleList([_conv(1, c0), nn.Sequential(_conv(c0, c1, 2), _conv(c1, c1)),
                                     nn.Sequential(_conv(c1, c2, 2), _conv(c2, c2)),
                                     nn.Sequential(_conv(c2, c3, 2), _conv(c3, c3))])
        self.backbone_out = nn.ModuleList([nn.Identity() for _ in range(4)])
        self.lateral = nn.Conv2d(c3, c2, 1)
        self.merge = _conv(c2, c2)
        self.feat = nn.Identity()

        def head(cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c2, head_width, 3, padding=1), nn.ReLU(inplace=True),
                                 nn.Conv2d(head_width, cout, 1))

        self.heads = nn.ModuleDict({"heatmap": head(num_classes), "offset": head(2), "depth": head(1),
                                    "size": head(3), "yaw": head(2)})
        nn.init.constant_(self.heads["heatmap"][-1].bias, -2.19)  # CenterNet's prior: σ(b) = 0.1
        # depth 1/σ(b) − 1 = 20 m at the start (ours: the scenes' objects lie 5–38 m away; starting at
        # 1 m sends the first steps' large L1 gradients through a steep 1/σ and made training spike)
        nn.init.constant_(self.heads["depth"][-1].bias, -math.log(20.0))
        self.heatmap_out, self.offset_out, self.depth_out = nn.Identity(), nn.Identity(), nn.Identity()
        self.size_out, self.yaw_out = nn.Identity(), nn.Identity()

    def _select(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"Mono3D expects images (B, C, H, W), got {tuple(x.shape)}")
        if x.shape[1] > 1:
            if self.input_channel >= x.shape[1]:
                raise ValueError(f"Mono3D reads input channel {self.input_channel} but the input has {x.shape[1]}")
            x = x[:, self.input_channel:self.input_channel + 1]
        if x.shape[2] % 8 or x.shape[3] % 8:
            raise ValueError(f"Mono3D needs H and W divisible by 8, got {tuple(x.shape[2:])}")
        return x * self.input_scale

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """``x`` ``(B, C, H, W)`` → dict of the raw head maps (see the module notes), ``"logits"`` the heatmap."""
        h = self._select(x)
        outs = []
        for stage, tap in zip(self.stages, self.backbone_out):
            h = tap(stage(h))
            outs.append(h)
        top = F.interpolate(self.lateral(outs[3]), size=outs[2].shape[2:], mode="nearest")
        feat = self.feat(self.merge(outs[2] + top))
        o = {"logits": self.heatmap_out(self.heads["heatmap"](feat)), "offset": self.offset_out(self.heads["offset"](feat)),
             "depth": self.depth_out(self.heads["depth"](feat)), "size": self.size_out(self.heads["size"](feat)),
             "yaw": self.yaw_out(self.heads["yaw"](feat))}
        return o

    @torch.no_grad()
    def predict(self, x: Tensor, intrinsics: Tensor | None = None, score_threshold: float = 0.1,
                max_detections: int = 50) -> list[dict[str, Tensor]]:
        """3D boxes per image: ``dict(boxes (n, 7), scores (n,), labels (n,))`` (:func:`decode_mono`);
        ``intrinsics`` ``(B, 3, 3)`` or ``(3, 3)`` (default: the model's)."""
        was = self.training
        self.eval()
        try:
            out = self(x)
        finally:
            self.train(was)
        k = self.intrinsics if intrinsics is None else intrinsics
        return decode_mono(out, k, self.camera_height, self.stride, score_threshold, max_detections)


@register_model("mono_teacher")
def mono_teacher(num_classes: int = 3, widths: tuple[int, int, int, int] = (16, 32, 64, 96), head_width: int = 64,
                 **kwargs: Any) -> Mono3D:
    """MonoDistill's LiDAR Net: :class:`Mono3D` on the sparse LiDAR depth map (input channel 1, scaled by 1/40)."""
    kwargs.setdefault("input_channel", 1)
    kwargs.setdefault("input_scale", 1 / 40)
    return Mono3D(num_classes, widths, head_width, **kwargs)


@register_model("mono_student")
def mono_student(num_classes: int = 3, widths: tuple[int, int, int, int] = (16, 32, 64, 96), head_width: int = 64,
                 **kwargs: Any) -> Mono3D:
    """The monocular student: :class:`Mono3D` on the camera image (input channel 0); the same
    architecture as the teacher by default, as in MonoDistill."""
    kwargs.setdefault("input_channel", 0)
    return Mono3D(num_classes, widths, head_width, **kwargs)


# --------------------------------------------------------------------------------------------
# geometry: targets and decoding
# --------------------------------------------------------------------------------------------


def _camera(boxes: Tensor, camera_height: float) -> Tensor:
    """World points ``(..., 3)`` → camera ``(x_c, y_c, z_c)``."""
    return torch.stack([-boxes[..., 1], camera_height - boxes[..., 2], boxes[..., 0]], dim=-1)


def boxes_to_2d(boxes: Tensor, intrinsics: Tensor, camera_height: float, hw: tuple[int, int]) -> Tensor:
    """The image-plane boxes of 3D boxes ``(n, 7)``: the 2D extent of the 8 projected corners,
    clipped to the ``hw`` image, ``(n, 4)`` ``(x1, y1, x2, y2)`` pixels (corners less than 0.1 m in
    front of the camera are moved to 0.1 m)."""
    if boxes.numel() == 0:
        return boxes.new_zeros(0, 4)
    sx = torch.tensor([1, 1, -1, -1, 1, 1, -1, -1], dtype=boxes.dtype, device=boxes.device)
    sy = torch.tensor([1, -1, -1, 1, 1, -1, -1, 1], dtype=boxes.dtype, device=boxes.device)
    sz = torch.tensor([1, 1, 1, 1, -1, -1, -1, -1], dtype=boxes.dtype, device=boxes.device)
    lx, ly, lz = sx * boxes[:, 3:4] / 2, sy * boxes[:, 4:5] / 2, sz * boxes[:, 5:6] / 2
    c, s = torch.cos(boxes[:, 6:7]), torch.sin(boxes[:, 6:7])
    corners = torch.stack([boxes[:, 0:1] + c * lx - s * ly, boxes[:, 1:2] + s * lx + c * ly, boxes[:, 2:3] + lz], -1)
    cam = _camera(corners, camera_height)
    z = cam[..., 2].clamp_min(0.1)
    u = intrinsics[0, 0] * cam[..., 0] / z + intrinsics[0, 2]
    v = intrinsics[1, 1] * cam[..., 1] / z + intrinsics[1, 2]
    h, w = hw
    return torch.stack([u.min(1).values.clamp(0, w), v.min(1).values.clamp(0, h),
                        u.max(1).values.clamp(0, w), v.max(1).values.clamp(0, h)], dim=1)


@dataclass
class MonoTargets:
    """Training targets of :class:`Mono3D` for a batch (``M`` = most objects in one image).

    Attributes:
        heatmap: ``(B, K, h, w)`` Gaussian peaks at the projected centres (1 at each centre cell).
        index: ``(B, M)`` long, each object's centre cell ``row·w + col`` (0 for padding).
        mask: ``(B, M)`` bool, which entries are objects.
        offset: ``(B, M, 2)`` the centre's position inside its cell ``(du, dv)`` in [0, 1).
        depth: ``(B, M)`` metres (``z_c`` of the box centre).
        log_size: ``(B, M, 3)`` ``log(dx, dy, dz)``.
        yaw: ``(B, M, 2)`` ``(sin 2α, cos 2α)``, ``α = yaw − atan2(y, x)``.
        boxes2d: per image ``(n_i, 4)`` the 2D boxes in output cells (:func:`boxes_to_2d` / stride).
    """

    heatmap: Tensor
    index: Tensor
    mask: Tensor
    offset: Tensor
    depth: Tensor
    log_size: Tensor
    yaw: Tensor
    boxes2d: list[Tensor]


def mono_targets(boxes: list[Tensor], labels: list[Tensor], intrinsics: Tensor, camera_height: float | Tensor,
                 out_hw: tuple[int, int], stride: int, num_classes: int) -> MonoTargets:
    """CenterNet targets for 3D boxes ``(n_i, 7)`` (world frame) of ``B`` images.

    The centre ``(u, v)`` of each box projects into output cell ``(⌊v/s⌋, ⌊u/s⌋)`` (``s`` = stride);
    its heatmap peak is ``exp(−((i − ⌊v/s⌋)² + (j − ⌊u/s⌋)²) / 2σ²)`` with
    ``σ = max(0.8, min(w₂, h₂)/6)`` from the 2D box ``(w₂, h₂)`` in cells (ours; CenterNet derives
    the radius from an IoU bound), the per-class maximum where peaks meet. Objects whose centre
    falls outside the map or behind the camera get no target. ``intrinsics`` ``(B, 3, 3)`` or
    ``(3, 3)``; ``camera_height`` a float or ``(B,)``.
    """
    b = len(boxes)
    h, w = out_hw
    dev = boxes[0].device if b else torch.device("cpu")
    k = intrinsics.to(dev, torch.float32)
    k = k.expand(b, 3, 3) if k.dim() == 2 else k
    cam_h = torch.as_tensor(camera_height, dtype=torch.float32, device=dev).expand(b) if not isinstance(
        camera_height, Tensor) or camera_height.dim() == 0 else camera_height.to(dev, torch.float32)
    m = max([1] + [len(x) for x in boxes])
    heat = torch.zeros(b, num_classes, h, w, device=dev)
    index = torch.zeros(b, m, dtype=torch.long, device=dev)
    mask = torch.zeros(b, m, dtype=torch.bool, device=dev)
    offset = torch.zeros(b, m, 2, device=dev)
    depth = torch.zeros(b, m, device=dev)
    log_size = torch.zeros(b, m, 3, device=dev)
    yaw = torch.zeros(b, m, 2, device=dev)
    rows = torch.arange(h, device=dev, dtype=torch.float32)[:, None]
    cols = torch.arange(w, device=dev, dtype=torch.float32)[None, :]
    boxes2d = []
    for i in range(b):
        bx = boxes[i].to(dev, torch.float32).reshape(-1, 7)
        if len(labels[i]) != len(bx):
            raise ValueError(f"mono_targets: image {i} has {len(bx)} boxes but {len(labels[i])} labels")
        if len(labels[i]) and (int(labels[i].min()) < 0 or int(labels[i].max()) >= num_classes):
            raise ValueError(f"mono_targets: image {i} has labels outside [0, {num_classes}): {labels[i].tolist()}")
        ch = float(cam_h[i])
        b2 = boxes_to_2d(bx, k[i], ch, (h * stride, w * stride)) / stride
        boxes2d.append(b2)
        cam = _camera(bx[:, :3], ch)
        for j in range(len(bx)):
            zc = float(cam[j, 2])
            if zc <= 0.1:
                continue
            u = float(k[i, 0, 0] * cam[j, 0] / zc + k[i, 0, 2]) / stride
            v = float(k[i, 1, 1] * cam[j, 1] / zc + k[i, 1, 2]) / stride
            cu, cv = math.floor(u), math.floor(v)
            if not (0 <= cu < w and 0 <= cv < h):
                continue
            sigma = max(0.8, float(min(b2[j, 2] - b2[j, 0], b2[j, 3] - b2[j, 1])) / 6)
            g = torch.exp(-((rows - cv) ** 2 + (cols - cu) ** 2) / (2 * sigma ** 2))
            c = int(labels[i][j])
            heat[i, c] = torch.maximum(heat[i, c], g)
            index[i, j] = cv * w + cu
            mask[i, j] = True
            offset[i, j] = torch.tensor([u - cu, v - cv])
            depth[i, j] = zc
            log_size[i, j] = bx[j, 3:6].clamp_min(1e-3).log()
            alpha = float(bx[j, 6]) - math.atan2(float(bx[j, 1]), float(bx[j, 0]))
            yaw[i, j] = torch.tensor([math.sin(2 * alpha), math.cos(2 * alpha)])
    return MonoTargets(heat, index, mask, offset, depth, log_size, yaw, boxes2d)


def depth_from_raw(raw: Tensor) -> Tensor:
    """CenterNet's depth transform ``1/σ(o) − 1`` (metres)."""
    return 1.0 / torch.sigmoid(raw).clamp_min(1e-6) - 1.0


def decode_mono(out: dict[str, Tensor], intrinsics: Tensor, camera_height: float, stride: int,
                score_threshold: float = 0.1, max_detections: int = 50) -> list[dict[str, Tensor]]:
    """Heads of :class:`Mono3D` → per image ``dict(boxes (n, 7), scores (n,), labels (n,))``.

    Peaks: cells whose sigmoid score is the maximum of their 3x3 neighbourhood (CenterNet's
    max-pool NMS), the top ``max_detections`` over classes and cells, those ≥ ``score_threshold``.
    Each peak's centre ``((j + du)·s, (i + dv)·s)`` and depth ``z_c`` back-project to the world
    centre; size ``exp(log size)``; yaw ``= atan2(sin 2α, cos 2α)/2 + atan2(y, x)``, wrapped to [-π, π).
    """
    heat = torch.sigmoid(out["logits"].float())
    b, kc, h, w = heat.shape
    keep = F.max_pool2d(heat, 3, 1, 1) == heat
    scores_all = (heat * keep).flatten(1)
    k = intrinsics.to(heat.device, torch.float32)
    k = k.expand(b, 3, 3) if k.dim() == 2 else k
    n_top = min(max_detections, scores_all.shape[1])
    top, idx = scores_all.topk(n_top, dim=1)
    results = []
    for i in range(b):
        ok = top[i] >= score_threshold
        sc, ix = top[i][ok], idx[i][ok]
        cls, cell = ix // (h * w), ix % (h * w)
        r, c = cell // w, cell % w
        off = out["offset"][i].float().flatten(1)[:, cell]  # (2, n)
        z = depth_from_raw(out["depth"][i].float().flatten(1)[0, cell])
        u = (c.float() + off[0]) * stride
        v = (r.float() + off[1]) * stride
        xc = (u - k[i, 0, 2]) * z / k[i, 0, 0]
        yc = (v - k[i, 1, 2]) * z / k[i, 1, 1]
        x, y, zz = z, -xc, camera_height - yc
        size = out["size"][i].float().flatten(1)[:, cell].clamp(max=5).exp().T  # (n, 3)
        sy = out["yaw"][i].float().flatten(1)[:, cell]
        yaw = torch.atan2(sy[0], sy[1]) / 2 + torch.atan2(y, x)
        yaw = torch.remainder(yaw + math.pi, 2 * math.pi) - math.pi
        boxes = torch.stack([x, y, zz, size[:, 0], size[:, 1], size[:, 2], yaw], dim=1)
        results.append({"boxes": boxes, "scores": sc, "labels": cls})
    return results
