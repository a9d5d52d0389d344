"""Monocular 3D detection: the detector's own loss (``mono3d_loss``) and MonoDistill (``monodistill``).

Both read the taps of :class:`distill.models.mono3d.Mono3D` and the geometry of a
:class:`~distill.batch.DenseBatch` from :meth:`distill.data.pointscenes.PointSceneSet.loader`
(``inputs="camera"``): ``boxes`` ``(n, 7)`` world boxes, ``labels``, ``extras["intrinsics"]``
``(B, 3, 3)`` and ``extras["camera_height"]`` ``(B,)``. The math is in
:mod:`distill.functional.dense3d_mono`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from distill import functional as DF
from distill.batch import Batch, DenseBatch, View
from distill.methods._views import check_maps as _check_maps, tap as _tap
from distill.methods.base import Method, Paper, register
from distill.models.mono3d import MonoTargets, depth_from_raw, mono_targets

__all__ = ["Mono3DLoss", "MonoDistill"]

CENTERNET = Paper(title="Objects as Points", authors="X. Zhou, D. Wang, P. Krähenbühl", year=2019,
                  arxiv="1904.07850")
MONODISTILL = Paper(title="MonoDistill: Learning Spatial Features for Monocular 3D Object Detection",
                    authors="Z. Chong, X. Ma, H. Zhang, Y. Yue, H. Li, Z. Wang, W. Ouyang", year=2022,
                    arxiv="2201.10830", venue="ICLR")

HEAD_TAPS = ("offset_out", "depth_out", "size_out", "yaw_out")


def _targets(view: View, batch: Batch, who: str) -> MonoTargets:
    if not isinstance(batch, DenseBatch) or batch.boxes is None or batch.labels is None:
        raise ValueError(f"{who} needs DenseBatch es with 3D boxes (n, 7) and labels "
                         "(PointSceneSet.loader(inputs='camera'))")
    for key in ("intrinsics", "camera_height"):
        if key not in batch.extras:
            raise ValueError(f"{who} needs batch.extras[{key!r}] (PointSceneSet.loader gives it); the batch has "
                             f"{sorted(batch.extras)}")
    logits = view["logits"]
    if logits.dim() != 4:
        raise ValueError(f"{who} needs heatmap logits (B, K, h, w), got {tuple(logits.shape)}")
    h, w = logits.shape[2:]
    stride = batch.inputs.shape[-1] // w
    if stride * w != batch.inputs.shape[-1] or stride * h != batch.inputs.shape[-2]:
        raise ValueError(f"{who}: the heatmap {h}x{w} is not an integer fraction of the input "
                         f"{tuple(batch.inputs.shape[-2:])}")
    return mono_targets(batch.boxes, batch.labels, batch.extras["intrinsics"], batch.extras["camera_height"],
                        (h, w), stride, logits.shape[1])


@register("mono3d_loss", "task", CENTERNET)
class Mono3DLoss(Method):
    """CenterNet's monocular 3D loss: focal heatmap + L1 offset, depth, log size and yaw at the centres.

    ``L = heatmap·focal(logits, Gaussians) + Σ_h w_h · (1/N) Σ_objects |ŷ_h − y_h|₁`` with
    ``h`` ∈ {offset (cells), depth (metres, ``1/σ(o) − 1``), log size, (sin 2α, cos 2α)} and ``N``
    the number of objects. The focal loss (α = 2, β = 4), the L1 offset and the depth transform
    ``1/σ(o) − 1`` with an L1 loss are CenterNet's; the weights (1 each) are ours; MonoDLE's uncertainty-aware
    depth and binned angle are not used (ours). Teacher-free (``needs_teacher = False``): it trains
    both the LiDAR-depth teacher and the monocular student.
    """

    needs_teacher = False

    def __init__(self, heatmap: float = 1.0, offset: float = 1.0, depth: float = 1.0, size: float = 1.0,
                 yaw: float = 1.0, weight: float = 1.0, warmup_epochs: int = 0) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        for name, v in (("heatmap", heatmap), ("offset", offset), ("depth", depth), ("size", size), ("yaw", yaw)):
            if not v >= 0:
                raise ValueError(f"mono3d_loss: {name} weight must be >= 0, got {v}")
        self.w = {"heatmap": float(heatmap), "offset": float(offset), "depth": float(depth), "size": float(size),
                  "yaw": float(yaw)}
        self.student_taps = list(HEAD_TAPS)

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        t = _targets(student_view, batch, "mono3d_loss")
        logits = student_view["logits"]
        loss = self.w["heatmap"] * DF.mono_heatmap_focal_loss(logits, t.heatmap)
        m = t.mask.float()
        n = m.sum().clamp_min(1.0)

        def at(tap: str) -> Tensor:
            return DF.gather_cells(_tap(student_view, tap, "student").float(), t.index)  # (B, M, C)

        preds = {"offset": at("offset_out"), "depth": depth_from_raw(at("depth_out"))[..., 0],
                 "size": at("size_out"), "yaw": at("yaw_out")}
        goals = {"offset": t.offset, "depth": t.depth, "size": t.log_size, "yaw": t.yaw}
        for key in ("offset", "depth", "size", "yaw"):
            err = (preds[key] - goals[key]).abs()
            err = err.sum(-1) if err.dim() == 3 else err
            loss = loss + self.w[key] * (err * m).sum() / n
        return loss

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.w.items()) + f", weight={self.weight}"


@register("monodistill", "detection3d", MONODISTILL)
class MonoDistill(Method):
    """MonoDistill: scene affinity L1 + object-region feature L2 + object-centre head L1 from a LiDAR-depth teacher.

    ``L = scene_weight·L_sf(a(F^s), F^t) + object_weight·L_of(a(F^s), F^t, M_of)
    + result_weight·L_or(heads^s, heads^t, M_or)``
    (:func:`~distill.functional.monodistill_scene_loss`, :func:`~distill.functional.monodistill_object_loss`,
    :func:`~distill.functional.monodistill_result_loss`), with ``F`` the tap ``feature`` of both
    models, ``a`` the adapter the authors put on the student's features (3x3 conv → ReLU → 1x1
    conv to the teacher's width, built by :meth:`prepare`; ``adapter=False`` drops it when
    widths agree), ``M_of`` the cells of the objects' 2D boxes (the projected 3D boxes' extent) and
    ``M_or`` the cells where the ground-truth centre heatmap is ≥ ``exp(−2)`` (within 2σ of a
    projected centre; the authors' code: a CenterNet Gaussian around the 2D box centre, made binary).

    Model family: the paper's baseline is MonoDLE (CenterNet on DLA-34) with an identical teacher
    on projected LiDAR depth; ours is :class:`~distill.models.mono3d.Mono3D` on the point
    scenes' sparse depth map, with one feature level (the authors distil three: strides 8/16/32
    after a review-KD fusion of the student's levels, which we leave out).

    Defaults: ``scene_weight = 1``, ``object_weight = 10``, ``result_weight = 1`` are the authors' code
    (``trainer_helper.py``: ``rgb_loss + 10·backbone_loss_l1 + backbone_loss_affinity +
    head_loss``); the paper's text beyond its abstract and introduction could not be read here.
    ``normalize=True`` (cosine affinities) follows the paper's definition as we recall it; the
    code uses raw dot products (``normalize=False``). The heatmap is not distilled (as the code:
    only the regression heads, ``heads``).
    """

    requires_prepare = True

    def __init__(self, feature: str = "feat", heads: Sequence[str] = HEAD_TAPS, scene_weight: float = 1.0,
                 object_weight: float = 10.0, result_weight: float = 1.0, normalize: bool = True,
                 affinity_size: tuple[int, int] | None = None, adapter: bool = True, weight: float = 1.0,
                 warmup_epochs: int = 0) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        for name, v in (("scene_weight", scene_weight), ("object_weight", object_weight),
                        ("result_weight", result_weight)):
            if not v >= 0:
                raise ValueError(f"monodistill: {name} must be >= 0, got {v}")
        if affinity_size is not None and (len(affinity_size) != 2 or min(affinity_size) < 1):
            raise ValueError(f"monodistill: affinity_size must be (h, w) >= 1 or None, got {affinity_size}")
        self.feature = str(feature)
        self.heads = [str(h) for h in heads]
        self.scene, self.object, self.result = float(scene_weight), float(object_weight), float(result_weight)
        self.normalize = bool(normalize)
        self.affinity_size = None if affinity_size is None else (int(affinity_size[0]), int(affinity_size[1]))
        self.use_adapter = bool(adapter)
        self.adapter: nn.Module | None = None
        self.student_taps = [self.feature, *self.heads]
        self.teacher_taps = [self.feature, *self.heads]

    def prepare(self, student_view: View, teacher_view: View, batch: Batch) -> None:
        if self.adapter is not None:
            return
        s = _tap(student_view, self.feature, "student")
        t = _tap(teacher_view, self.feature, "teacher")
        _check_maps(s, t, f"student:{self.feature}", f"teacher:{self.feature}", "MonoDistill")
        if s.shape[2:] != t.shape[2:]:
            raise ValueError(f"MonoDistill needs feature maps of one resolution, got student {tuple(s.shape)} and "
                             f"teacher {tuple(t.shape)}")
        cs, ct = s.shape[1], t.shape[1]
        if self.use_adapter:
            self.adapter = nn.Sequential(nn.Conv2d(cs, cs, 3, padding=1), nn.ReLU(), nn.Conv2d(cs, ct, 1))
        elif cs == ct:
            self.adapter = nn.Identity()
        else:
            raise ValueError(f"MonoDistill(adapter=False) needs equal widths, got student {cs} and teacher {ct}")
        self.adapter.to(device=s.device, dtype=s.dtype)

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        if self.adapter is None:
            raise RuntimeError("MonoDistill.prepare() must be called on an example batch before the first forward")
        fs = self.adapter(_tap(student_view, self.feature, "student"))
        ft = _tap(teacher_view, self.feature, "teacher").detach()
        loss = fs.new_zeros(())
        if self.scene:
            loss = loss + self.scene * DF.monodistill_scene_loss(fs, ft, self.normalize, self.affinity_size)
        if self.object or self.result:
            t = _targets(student_view, batch, "monodistill")
        if self.object:
            scale = fs.shape[-1] / student_view["logits"].shape[-1]  # heatmap cells -> feature cells
            m_of = DF.box_cell_mask(t.boxes2d, tuple(fs.shape[2:]), scale)
            loss = loss + self.object * DF.monodistill_object_loss(fs, ft, m_of)
        if self.result:
            m_or = (t.heatmap.amax(dim=1) >= torch.exp(torch.tensor(-2.0))).float()
            hs = [_tap(student_view, h, "student") for h in self.heads]
            ht = [_tap(teacher_view, h, "teacher").detach() for h in self.heads]
            loss = loss + self.result * DF.monodistill_result_loss(hs, ht, m_or)
        return loss

    def extra_repr(self) -> str:
        return (f"feature={self.feature!r}, scene={self.scene}, object={self.object}, result={self.result}, "
                f"normalize={self.normalize}, weight={self.weight}")
