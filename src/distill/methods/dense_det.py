"""Detection distillation on a one-stage dense detector: Quantization Mimic, ADL, FGD, Rank Mimicking,
PFI, LD, LD on the valuable localization region, and LGD.

Written for :class:`distill.models.detection.GFLDetector` (``gfl_teacher`` / ``gfl_student``) and any
model with the same outputs and taps: ``"logits"`` ``(B, N, K)`` (sigmoid class scores of every
point), ``"box_dist"`` ``(B, N, 4, R+1)`` (GFL's edge distributions), per pyramid level ``l``
``"fpn_out.l"`` ``(B, C, H_l, W_l)`` and ``"cls_out.l"`` ``(B, K, H_l, W_l)``, plus ``strides`` and
``num_classes`` attributes (read in :meth:`bind_models`). Batches are
:class:`~distill.batch.DenseBatch` with ``boxes`` (xyxy pixels) and ``labels``. Methods that need the
positive points assign them with the detector's own rule
(:func:`distill.models.detection.assign_targets`, ATSS) on the student's point grid, so the regions
agree with what ``gfl_loss`` trains.

Each ``forward`` returns the *unweighted* loss (the Distiller multiplies by ``weight``); the math is in
:mod:`distill.functional.dense_det`. Teacher tensors are detached here. Adapters (1x1 convs when the
channel counts differ), FGD's GcBlock and LGD's label encoder / relation adapter / knowledge mapper are
built by :meth:`prepare` from one example batch, before the optimizer is made.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill import functional as DF
from distill.adapters import build_adapter
from distill.batch import Batch, DenseBatch, View
from distill.methods._views import tap as _tap
from distill.methods.base import Method, Paper, register
from distill.models.detection import Assignment, assign_targets, gfl_losses, grid_points

__all__ = ["QuantizationMimic", "ADL", "FGD", "RankMimicking", "PFI", "LD", "LDVLR", "LGD", "GcBlock"]

FAMILY = "detection"


# ============================================================================================
# shared helpers
# ============================================================================================


def _dense(batch: Batch, who: str) -> DenseBatch:
    if not isinstance(batch, DenseBatch) or batch.boxes is None or batch.labels is None:
        extra = "" if not isinstance(batch, DenseBatch) else " without boxes/labels"
        raise ValueError(f"{who} needs a DenseBatch with boxes and labels (the scene loaders of "
                         f"distill.data.scenes yield them), got {type(batch).__name__}{extra}")
    return batch


def _levels(levels: Sequence[int], who: str) -> tuple[int, ...]:
    out = tuple(int(level) for level in levels)
    if not out or any(level < 0 for level in out) or len(set(out)) != len(out):
        raise ValueError(f"{who}: levels must be distinct pyramid indices >= 0, got {tuple(levels)}")
    return out


def _align(s: Tensor, t: Tensor, s_name: str, t_name: str) -> nn.Module:
    """Identity when the channel counts agree, else a 1x1 conv student → teacher channels."""
    if s.shape[1:] == t.shape[1:]:
        return nn.Identity()
    return build_adapter(s, t, student_name=s_name, teacher_name=t_name, kind="conv1x1")


def _stride(image: Tensor, feature: Tensor, strides: tuple[int, ...] | None, level: int) -> float:
    """The stride of pyramid level ``level``: the detector's when bound, else image height / map height."""
    if strides is not None and level < len(strides):
        return float(strides[level])
    return float(image.shape[-2]) / float(feature.shape[-2])


class _Geometry:
    """Mixin: the detector's strides and class count (from :meth:`bind_models`) and ATSS assignment."""

    strides: tuple[int, ...] | None
    num_classes: int | None
    anchor_scale: float
    topk: int

    def _bind_geometry(self, model: nn.Module | None, who: str) -> None:
        strides, k = getattr(model, "strides", None), getattr(model, "num_classes", None)
        if strides is None or k is None:
            raise TypeError(f"{who} needs a detector with 'strides' and 'num_classes' attributes (GFLDetector: "
                            f"distill.models.create('gfl_student')), got {type(model).__name__}")
        self.strides, self.num_classes = tuple(int(s) for s in strides), int(k)

    def _points(self, batch: Batch, like: Tensor, who: str) -> tuple[Tensor, Tensor]:
        if self.strides is None:
            raise RuntimeError(f"{who}: bind_models(student, ...) must run first (Distiller.prepare does) so the "
                               "loss knows the detector's strides")
        return grid_points(tuple(batch.inputs.shape[-2:]), self.strides, device=like.device, dtype=like.dtype)

    def _assign(self, batch: DenseBatch, like: Tensor, who: str) -> tuple[Tensor, Tensor, Assignment]:
        points, strides = self._points(batch, like, who)
        if points.shape[0] != like.shape[1]:
            raise ValueError(f"{who}: the detector has {points.shape[0]} points for images of size "
                             f"{tuple(batch.inputs.shape[-2:])} but its outputs have {like.shape[1]}")
        assert self.num_classes is not None
        a = assign_targets(points, strides, batch.boxes, batch.labels, self.num_classes, topk=self.topk,
                           anchor_scale=self.anchor_scale)
        return points, strides, a


def _check_dense_pair(s: Tensor, t: Tensor, what: str, who: str) -> None:
    if s.shape != t.shape:
        raise ValueError(f"{who}: the student's and the teacher's {what} differ in shape ({tuple(s.shape)} vs "
                         f"{tuple(t.shape)}): both detectors must share classes, reg_max and strides")


# ============================================================================================
# Quantization Mimic
# ============================================================================================


@register(
    "quantization_mimic",
    FAMILY,
    Paper(
        title="Quantization Mimic: Towards Very Tiny CNN for Object Detection",
        authors="Y. Wei, X. Pan, H. Qin, W. Ouyang, J. Yan",
        year=2018,
        arxiv="1805.02152",
        venue="ECCV",
    ),
)
class QuantizationMimic(Method):
    """Quantization Mimic: the quantised student feature mimics the quantised teacher's inside object regions.

    Per pyramid level ``l`` in ``levels``: ``L_m = 1/(2N) Σ_{cells in boxes} ‖Q(F^T) − Q(r(F^S))‖²``
    (:func:`distill.functional.quantization_mimic_loss`), ``Q(x) = step·round(x/step)`` with a
    straight-through gradient, ``r`` a 1x1 conv when the channel counts differ (the paper's regression
    layer), summed over levels.

    Departures: the paper mimics RoI features of a two-stage detector's proposals (Faster R-CNN /
    R-FCN); our one-stage GFL detector has no proposals, so the region is the set of pyramid cells whose
    centre lies inside a ground-truth box and ``N`` counts cells. The paper trains the teacher with
    quantised features first (the "quantized teacher"); here the teacher is any trained detector and its
    map is quantised on the fly. Only the abstract and introduction of the paper could be read here;
    ``step = 0.5`` (the quantisation interval on our FPN maps) is ours.
    """

    requires_prepare = True

    def __init__(self, levels: Sequence[int] = (0, 1), step: float = 0.5, weight: float = 1.0,
                 warmup_epochs: int = 0) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        if step <= 0:
            raise ValueError(f"quantization_mimic: step must be > 0, got {step}")
        self.levels, self.step = _levels(levels, "quantization_mimic"), float(step)
        self.student_taps = [f"fpn_out.{lv}" for lv in self.levels]
        self.teacher_taps = list(self.student_taps)
        self.align: nn.ModuleList | None = None
        self.strides: tuple[int, ...] | None = None

    def bind_models(self, student: nn.Module, teacher: nn.Module | None, example: Batch) -> None:
        s = getattr(student, "strides", None)
        self.strides = None if s is None else tuple(int(v) for v in s)

    def prepare(self, student_view: View, teacher_view: View, batch: Batch) -> None:
        if self.align is None:
            self.align = nn.ModuleList(
                _align(_tap(student_view, p, "student"), _tap(teacher_view, p, "teacher"), f"student:{p}",
                       f"teacher:{p}").to(student_view[p].device) for p in self.student_taps)

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        if self.align is None:
            raise RuntimeError("quantization_mimic.prepare() must run on an example batch first (Distiller.prepare)")
        dense = _dense(batch, "quantization_mimic")
        total: Tensor | None = None
        for align, level, path in zip(self.align, self.levels, self.student_taps):
            s = align(_tap(student_view, path, "student"))
            t = _tap(teacher_view, path, "teacher").detach()
            _check_dense_pair(s, t, path, "quantization_mimic")
            h, w = s.shape[-2:]
            stride = _stride(dense.inputs, s, self.strides, level)
            region = torch.stack([DF.cell_box_masks(b.to(s), h, w, stride).any(0) if len(b) else
                                  torch.zeros(h, w, dtype=torch.bool, device=s.device) for b in dense.boxes])
            loss = DF.quantization_mimic_loss(s, t, region, self.step)
            total = loss if total is None else total + loss
        assert total is not None
        return total

    def extra_repr(self) -> str:
        return f"levels={self.levels}, step={self.step}, weight={self.weight}"


# ============================================================================================
# ADL
# ============================================================================================


@register(
    "adl",
    FAMILY,
    Paper(
        title="Learning Efficient Detector with Semi-supervised Adaptive Distillation",
        authors="S. Tang et al.",
        year=2019,
        arxiv="1901.00366",
        venue="arXiv",
    ),
)
class ADL(Method):
    """Adaptive distillation loss on the dense class scores: ``Σ (1 − e^{−(KL + β𝒯(q))})^γ KL / Σ q^θ``.

    Reads ``"logits"`` ``(B, N, K)`` of both detectors (sigmoid scores, one binary distribution per
    point and class); :func:`distill.functional.adl_loss` holds the formula. It needs no labels, so it
    also distils on unlabeled scenes (the paper's semi-supervised setting).

    Defaults β = 1, γ = 2, θ = 1.8 (normaliser ``Σ q^θ``): the authors' released configuration
    (see :func:`~distill.functional.adl_loss` for how their ``β`` maps to ours); the paper's text could
    not be read here beyond its abstract.
    """

    reads_teacher_logits = True  # the Distiller checks both detectors have the same classes before training

    def __init__(self, beta: float = 1.0, gamma: float = 2.0, normalizer_power: float | None = 1.8,
                 weight: float = 1.0, warmup_epochs: int = 0) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        if beta < 0 or gamma < 0:
            raise ValueError(f"adl: beta and gamma must be >= 0, got beta={beta}, gamma={gamma}")
        if normalizer_power is not None and normalizer_power <= 0:
            raise ValueError(f"adl: normalizer_power must be > 0 or None, got {normalizer_power}")
        self.beta, self.gamma = float(beta), float(gamma)
        self.normalizer_power = None if normalizer_power is None else float(normalizer_power)

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        s, t = student_view["logits"], _tap(teacher_view, "logits", "teacher").detach()
        _check_dense_pair(s, t, "logits", "adl")
        return DF.adl_loss(s, t, self.beta, self.gamma, self.normalizer_power)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, gamma={self.gamma}, normalizer_power={self.normalizer_power}, weight={self.weight}"


# ============================================================================================
# FGD
# ============================================================================================


class GcBlock(nn.Module):
    """The GcBlock of FGD's global distillation: ``R(F) = F + W_2 ReLU(LN(W_1 Σ_j softmax(W_k F)_j F_j))``.

    ``(B, C, H, W) → (B, C, H, W)``; the context is a softmax-weighted sum over positions, ``W_1`` maps
    to ``C/2`` channels, ``W_2`` back to ``C`` (initialised to zero, so ``R`` starts as the identity).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        mid = max(1, channels // 2)
        self.key = nn.Conv2d(channels, 1, 1)
        self.transform = nn.Sequential(nn.Conv2d(channels, mid, 1), nn.LayerNorm([mid, 1, 1]), nn.ReLU(),
                                       nn.Conv2d(mid, channels, 1))
        nn.init.kaiming_normal_(self.key.weight, mode="fan_in")
        nn.init.zeros_(self.key.bias)
        nn.init.zeros_(self.transform[-1].weight)
        nn.init.zeros_(self.transform[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        attn = F.softmax(self.key(x).reshape(b, 1, h * w), dim=-1)  # (B, 1, HW)
        context = torch.bmm(x.reshape(b, c, h * w), attn.transpose(1, 2)).reshape(b, c, 1, 1)
        return x + self.transform(context)


@register(
    "fgd",
    FAMILY,
    Paper(
        title="Focal and Global Knowledge Distillation for Detectors",
        authors="Z. Yang, Z. Li, X. Jiang, Y. Gong, Z. Yuan, D. Zhao, C. Yuan",
        year=2022,
        arxiv="2111.11837",
        venue="CVPR",
    ),
)
class FGD(Method):
    """Focal and global distillation on the FPN maps: ``L_fg + L_bg + L_at + L_global`` per level.

    Focal: foreground / background separated by the ground-truth boxes (scale masks
    ``1/(H_r W_r)`` and ``1/N_bg``), each position and channel weighted by the *teacher's* spatial
    and channel attention ``A^S = HW·softmax(mean_c|F|/T)``, ``A^C = C·softmax(mean_hw|F|/T)``
    (:func:`~distill.functional.fgd_feature_loss`, weights α, β); attention loss γ·L1 between the
    teacher's and the student's attention maps. Global: λ·Σ(R(F^T) − R(F^S))² with a GcBlock ``R``
    (:class:`GcBlock`) that the method owns and trains. The student passes through a 1x1 conv first when
    channel counts differ (the authors' ``align``). All sums are divided by the batch size.

    Defaults T = 0.5, α = 1e-3, β = 5e-4, γ = 5e-4, λ = 5e-6: the authors' GFL configuration
    (yzd-v/FGD ``configs/distillers/fgd/fgd_gfl_r101_distill_gfl_r50_fpn_1x_coco.py``), which their
    ``FeatureLoss`` applies to every FPN level. They are sized for 256-channel COCO maps; on our 16-64
    channel maps the loss is small, so recipes raise ``weight``.

    Departures: the paper's Eq. for the global loss has one relation module ``R``; the authors' code
    trains two GcBlocks (one for the student's map, one for the teacher's): we follow the paper
    (``shared_gcblock=True``; ``False`` builds two, as the code). Box cells are the cells whose centre
    lies in the box and ``H_r W_r`` is their count; the code rounds the box outwards (floor/ceil, up to
    one extra cell per side).
    """

    requires_prepare = True

    def __init__(self, levels: Sequence[int] = (0, 1), temperature: float = 0.5, alpha: float = 1e-3,
                 beta: float = 5e-4, gamma: float = 5e-4, lam: float = 5e-6, shared_gcblock: bool = True,
                 weight: float = 1.0, warmup_epochs: int = 0) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        if temperature <= 0:
            raise ValueError(f"fgd: temperature must be > 0, got {temperature}")
        for name, v in (("alpha", alpha), ("beta", beta), ("gamma", gamma), ("lam", lam)):
            if v < 0:
                raise ValueError(f"fgd: {name} must be >= 0, got {v}")
        self.levels = _levels(levels, "fgd")
        self.temperature, self.alpha, self.beta, self.gamma, self.lam = (float(temperature), float(alpha),
                                                                         float(beta), float(gamma), float(lam))
        self.shared_gcblock = bool(shared_gcblock)
        self.student_taps = [f"fpn_out.{lv}" for lv in self.levels]
        self.teacher_taps = list(self.student_taps)
        self.align: nn.ModuleList | None = None
        self.gc_student: nn.ModuleList | None = None
        self.gc_teacher: nn.ModuleList | None = None
        self.strides: tuple[int, ...] | None = None

    def bind_models(self, student: nn.Module, teacher: nn.Module | None, example: Batch) -> None:
        s = getattr(student, "strides", None)
        self.strides = None if s is None else tuple(int(v) for v in s)

    def prepare(self, student_view: View, teacher_view: View, batch: Batch) -> None:
        if self.align is not None:
            return
        aligns, gs, gt = [], [], []
        for p in self.student_taps:
            s, t = _tap(student_view, p, "student"), _tap(teacher_view, p, "teacher")
            aligns.append(_align(s, t, f"student:{p}", f"teacher:{p}").to(s.device))
            gs.append(GcBlock(t.shape[1]).to(s.device))
            gt.append(GcBlock(t.shape[1]).to(s.device) if not self.shared_gcblock else nn.Identity())
        self.align, self.gc_student, self.gc_teacher = nn.ModuleList(aligns), nn.ModuleList(gs), nn.ModuleList(gt)

    def parts(self, student_view: View, teacher_view: View, batch: Batch) -> dict[str, Tensor]:
        """The four terms (already weighted by α, β, γ, λ), summed over levels: ``fg``, ``bg``, ``at``, ``global``."""
        if self.align is None or self.gc_student is None or self.gc_teacher is None:
            raise RuntimeError("fgd.prepare() must run on an example batch first (Distiller.prepare)")
        dense = _dense(batch, "fgd")
        out: dict[str, Tensor] = {}
        for i, (level, path) in enumerate(zip(self.levels, self.student_taps)):
            s = self.align[i](_tap(student_view, path, "student"))
            t = _tap(teacher_view, path, "teacher").detach()
            _check_dense_pair(s, t, path, "fgd")
            h, w = s.shape[-2:]
            stride = _stride(dense.inputs, s, self.strides, level)
            fg, scale, bg = DF.fgd_masks([b.to(s) for b in dense.boxes], h, w, stride, dtype=s.dtype)
            sa_t, ca_t = DF.fgd_attention(t, self.temperature)
            sa_s, ca_s = DF.fgd_attention(s, self.temperature)
            l_fg, l_bg = DF.fgd_feature_loss(s, t, fg * scale, bg, sa_t, ca_t, self.alpha, self.beta)
            l_at = DF.fgd_attention_loss(sa_s, ca_s, sa_t, ca_t, self.gamma)
            gc_t = self.gc_student[i] if self.shared_gcblock else self.gc_teacher[i]
            l_gl = DF.fgd_global_loss(self.gc_student[i](s), gc_t(t), self.lam)
            for key, value in (("fg", l_fg), ("bg", l_bg), ("at", l_at), ("global", l_gl)):
                out[key] = value if key not in out else out[key] + value
        return out

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        return sum(self.parts(student_view, teacher_view, batch).values())  # type: ignore[return-value]

    def extra_repr(self) -> str:
        return (f"levels={self.levels}, T={self.temperature}, alpha={self.alpha}, beta={self.beta}, "
                f"gamma={self.gamma}, lam={self.lam}, shared_gcblock={self.shared_gcblock}, weight={self.weight}")


# ============================================================================================
# Rank Mimicking and PFI
# ============================================================================================

_RM_PAPER = Paper(
    title="Knowledge Distillation for Object Detection via Rank Mimicking and Prediction-guided Feature Imitation",
    authors="G. Li, X. Li, Y. Wang, S. Zhang, Y. Wu, D. Liang",
    year=2022,
    arxiv="2112.04840",
    venue="AAAI",
)


@register("rank_mimicking", FAMILY, _RM_PAPER)
class RankMimicking(_Geometry, Method):
    """Rank Mimicking: each object's candidate boxes, ranked by the teacher, as a distribution the student matches.

    The candidates of a ground-truth object are the points the detector's assignment (ATSS, as
    ``gfl_loss``) makes positive for it; their scores are the sigmoid class scores of the object's class,
    softmaxed over the candidates (temperature ``tau``) for teacher and student, and
    ``L_RM = 1/M Σ_objects KL(P^T ‖ P^S)`` (:func:`distill.functional.rank_mimicking_loss`).

    Departures: the paper's candidates are the anchors RetinaNet assigns to the object (IoU ≥ 0.5);
    ours the ATSS positives of the anchor-free detector. ``tau = 1`` (a plain softmax) is the paper's
    form as we read its summary; the full text could not be read here, and the loss weight (``weight``
    1) is ours. ``anchor_scale = 4`` and ``topk = 9`` are ``gfl_loss``'s.
    """

    reads_teacher_logits = True

    def __init__(self, tau: float = 1.0, anchor_scale: float = 4.0, topk: int = 9, weight: float = 1.0,
                 warmup_epochs: int = 0) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        if tau <= 0 or anchor_scale <= 0 or topk < 1:
            raise ValueError(f"rank_mimicking: tau and anchor_scale must be > 0 and topk >= 1, got tau={tau}, "
                             f"anchor_scale={anchor_scale}, topk={topk}")
        self.tau, self.anchor_scale, self.topk = float(tau), float(anchor_scale), int(topk)
        self.strides, self.num_classes = None, None

    def bind_models(self, student: nn.Module, teacher: nn.Module | None, example: Batch) -> None:
        self._bind_geometry(student, "rank_mimicking")

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        dense = _dense(batch, "rank_mimicking")
        s, t = student_view["logits"], _tap(teacher_view, "logits", "teacher").detach()
        _check_dense_pair(s, t, "logits", "rank_mimicking")
        _, _, a = self._assign(dense, s, "rank_mimicking")
        bi, pi = a.positive.nonzero(as_tuple=True)
        cls = a.labels[bi, pi]
        score_s, score_t = s[bi, pi, cls].sigmoid(), t[bi, pi, cls].sigmoid()
        groups = bi * (int(a.gt_index.max()) + 1 if len(bi) else 1) + a.gt_index[bi, pi]
        return DF.rank_mimicking_loss(score_s, score_t, groups, self.tau)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, anchor_scale={self.anchor_scale}, topk={self.topk}, weight={self.weight}"


@register("pfi", FAMILY, _RM_PAPER)
class PFI(Method):
    """Prediction-guided feature imitation: FPN features imitated where the class predictions differ.

    Per level: ``P = 1/K Σ_c (σ(z^T_c) − σ(z^S_c))²`` from the ``"cls_out.l"`` maps (detached: a weight),
    and ``L = 1/(BHW) Σ P · Σ_c (F^T − r(F^S))²`` on ``"fpn_out.l"`` (``r`` a 1x1 conv when the channel
    counts differ), summed over levels (:func:`distill.functional.pfi_loss`).

    The full text of the paper could not be read here: the prediction difference as the mean squared
    difference of the class scores, the per-position mean and the loss weight (``weight`` 1) are ours,
    following the paper's summary ("correlate feature differences with prediction differences").
    """

    requires_prepare = True

    def __init__(self, levels: Sequence[int] = (0, 1), weight: float = 1.0, warmup_epochs: int = 0) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        self.levels = _levels(levels, "pfi")
        self.feature_taps = [f"fpn_out.{lv}" for lv in self.levels]
        self.score_taps = [f"cls_out.{lv}" for lv in self.levels]
        self.student_taps = [*self.feature_taps, *self.score_taps]
        self.teacher_taps = list(self.student_taps)
        self.align: nn.ModuleList | None = None

    def prepare(self, student_view: View, teacher_view: View, batch: Batch) -> None:
        if self.align is None:
            self.align = nn.ModuleList(
                _align(_tap(student_view, p, "student"), _tap(teacher_view, p, "teacher"), f"student:{p}",
                       f"teacher:{p}").to(student_view[p].device) for p in self.feature_taps)

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        if self.align is None:
            raise RuntimeError("pfi.prepare() must run on an example batch first (Distiller.prepare)")
        total: Tensor | None = None
        for align, fp, cp in zip(self.align, self.feature_taps, self.score_taps):
            s = align(_tap(student_view, fp, "student"))
            t = _tap(teacher_view, fp, "teacher").detach()
            _check_dense_pair(s, t, fp, "pfi")
            zs, zt = _tap(student_view, cp, "student").detach(), _tap(teacher_view, cp, "teacher").detach()
            _check_dense_pair(zs, zt, cp, "pfi")
            diff = DF.prediction_difference(zs.sigmoid(), zt.sigmoid())
            loss = DF.pfi_loss(s, t, diff)
            total = loss if total is None else total + loss
        assert total is not None
        return total

    def extra_repr(self) -> str:
        return f"levels={self.levels}, weight={self.weight}"


# ============================================================================================
# Localization distillation
# ============================================================================================


@register(
    "ld",
    FAMILY,
    Paper(
        title="Localization Distillation for Dense Object Detection",
        authors="Z. Zheng, R. Ye, P. Wang, D. Ren, W. Zuo, Q. Hou, M.-M. Cheng",
        year=2022,
        arxiv="2102.12252",
        venue="CVPR",
    ),
)
class LD(_Geometry, Method):
    """Localization distillation on the main region: KL of the box-edge distributions at temperature τ.

    On the positive points (the detector's ATSS assignment, as ``gfl_loss``):
    ``Σ_m w_m τ² Σ_e KL(softmax(z^T_e/τ) ‖ softmax(z^S_e/τ)) / Σ_m w_m`` over the ``"box_dist"`` tap
    ``(B, N, 4, R+1)`` (:func:`distill.functional.ld_loss`), with ``w_m`` the student's highest class
    score at the point (detached; ``weighting="score"``, as the authors' ``LDHead`` and GFL's own box
    losses) or 1 (``weighting="none"``). Both detectors need the same ``reg_max``.

    Defaults τ = 10 and the loss weight 0.25 (``weight``): the authors' GFL configurations (HikariTJU/LD
    ``configs/ld/ld_r18_gflv1_r101_fpn_coco_1x.py``: ``loss_ld`` T = 10, ``loss_weight`` 0.25). See
    :func:`~distill.functional.ld_loss` for how their normalisation differs. Combine with ``ld_vlr``
    for the valuable localization region.
    """

    def __init__(self, tau: float = 10.0, weighting: str = "score", anchor_scale: float = 4.0, topk: int = 9,
                 weight: float = 0.25, warmup_epochs: int = 0) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        if tau <= 0:
            raise ValueError(f"ld: tau must be > 0, got {tau}")
        if weighting not in ("score", "none"):
            raise ValueError(f"ld: weighting must be 'score' or 'none', got {weighting!r}")
        self.tau, self.weighting, self.anchor_scale, self.topk = float(tau), weighting, float(anchor_scale), int(topk)
        self.student_taps = ["box_dist"]
        self.teacher_taps = ["box_dist"]
        self.strides, self.num_classes = None, None

    def bind_models(self, student: nn.Module, teacher: nn.Module | None, example: Batch) -> None:
        self._bind_geometry(student, "ld")

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        dense = _dense(batch, "ld")
        s = _tap(student_view, "box_dist", "student")
        t = _tap(teacher_view, "box_dist", "teacher").detach()
        _check_dense_pair(s, t, "box_dist", "ld")
        _, _, a = self._assign(dense, s, "ld")
        bi, pi = a.positive.nonzero(as_tuple=True)
        if self.weighting == "score":
            w = student_view["logits"].detach()[bi, pi].sigmoid().amax(-1)
        else:
            w = torch.ones(len(bi), device=s.device, dtype=s.dtype)
        return DF.ld_loss(s[bi, pi], t[bi, pi], w, self.tau)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, weighting={self.weighting!r}, weight={self.weight}"


@register(
    "ld_vlr",
    FAMILY,
    Paper(
        title="Localization Distillation for Object Detection",
        authors="Z. Zheng, R. Ye, Q. Hou, D. Ren, P. Wang, W. Zuo, M.-M. Cheng",
        year=2023,
        arxiv="2204.05957",
        venue="TPAMI",
    ),
)
class LDVLR(_Geometry, Method):
    """Localization distillation on the valuable localization region (VLR), weighted by anchor IoU.

    The VLR of a ground-truth box is the set of points whose ATSS anchor has
    ``α_vl·α_pos ≤ DIoU < α_pos`` (``α_pos`` = ATSS's mean + std threshold of the box,
    :func:`distill.functional.valuable_localization_region`), beyond the positives that ``ld`` distils;
    each such point is weighted by its anchor's IoU with the box, and the loss is
    :func:`distill.functional.ld_loss` over those points (τ² KL of the edge distributions).

    Defaults α_vl = 0.25, τ = 10, loss weight 0.25 (``weight``): the paper's α_vl and the authors'
    ``loss_ld_vlr`` (HikariTJU/LD ``LDHead``: T = 10, ``loss_weight`` 0.25), the DIoU test and IoU
    weights from their ``ATSSAssigner.get_vlr_region``. ``anchor_scale = 4`` is ``gfl_loss``'s (theirs:
    8, for COCO). The VLR appears in the CVPR version too; the journal version is cited here.
    """

    def __init__(self, tau: float = 10.0, alpha_vl: float = 0.25, anchor_scale: float = 4.0, topk: int = 9,
                 weight: float = 0.25, warmup_epochs: int = 0) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        if tau <= 0 or not 0 <= alpha_vl < 1 or anchor_scale <= 0 or topk < 1:
            raise ValueError(f"ld_vlr: needs tau > 0, 0 <= alpha_vl < 1, anchor_scale > 0, topk >= 1; got tau={tau}, "
                             f"alpha_vl={alpha_vl}, anchor_scale={anchor_scale}, topk={topk}")
        self.tau, self.alpha_vl, self.anchor_scale, self.topk = float(tau), float(alpha_vl), float(anchor_scale), int(topk)
        self.student_taps = ["box_dist"]
        self.teacher_taps = ["box_dist"]
        self.strides, self.num_classes = None, None

    def bind_models(self, student: nn.Module, teacher: nn.Module | None, example: Batch) -> None:
        self._bind_geometry(student, "ld_vlr")

    def region(self, batch: DenseBatch, like: Tensor) -> Tensor:
        """The VLR weights of every point of every image: ``(B, N)`` (0 outside the region)."""
        points, strides = self._points(batch, like, "ld_vlr")
        return torch.stack([DF.valuable_localization_region(points, strides, b.to(points), anchor_scale=self.anchor_scale,
                                                            topk=self.topk, alpha_vl=self.alpha_vl)
                            for b in batch.boxes])

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        dense = _dense(batch, "ld_vlr")
        s = _tap(student_view, "box_dist", "student")
        t = _tap(teacher_view, "box_dist", "teacher").detach()
        _check_dense_pair(s, t, "box_dist", "ld_vlr")
        w = self.region(dense, s)
        if w.shape != s.shape[:2]:
            raise ValueError(f"ld_vlr: {w.shape[1]} points for images of size {tuple(dense.inputs.shape[-2:])} but "
                             f"box_dist has {s.shape[1]}")
        bi, pi = (w > 0).nonzero(as_tuple=True)
        return DF.ld_loss(s[bi, pi], t[bi, pi], w[bi, pi], self.tau)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, alpha_vl={self.alpha_vl}, weight={self.weight}"


# ============================================================================================
# LGD
# ============================================================================================


class _LGDTeacher(nn.Module):
    """LGD's implicit teacher for one detector width ``C``: label encoder, relation adapter, knowledge mapper.

    - label encoding ``e_j = MLP([x1/W, y1/H, x2/W, y2/H, onehot(c_j)])`` ``(T, C)``;
    - appearance ``a_j^l``: the mean of the projected student map (1x1 conv, LayerNorm-like GroupNorm(1),
      ReLU) over the cells of box ``j`` at level ``l``;
    - inter-object relation adapter: multi-head attention with the appearances as queries and the label
      encodings of the *same image's* objects as keys and values (the authors' "student-guided" pattern);
    - intra-object knowledge mapper: a linear map of each object's output painted onto its box cells,
      a 3x3 conv, ReLU, and a refinement of three 3x3 convs with GroupNorm(1) (ReLU between).
    """

    def __init__(self, channels: int, num_classes: int, heads: int) -> None:
        super().__init__()
        c = channels
        self.num_classes = num_classes
        self.label = nn.Sequential(nn.Linear(4 + num_classes, c), nn.LayerNorm(c), nn.ReLU(), nn.Linear(c, c),
                                   nn.LayerNorm(c), nn.ReLU())
        self.student_proj = nn.Sequential(nn.Conv2d(c, c, 1), nn.GroupNorm(1, c), nn.ReLU())
        self.attention = nn.MultiheadAttention(c, heads, batch_first=True)
        self.inst_proj_1d = nn.Linear(c, c)
        self.inst_proj_2d = nn.Conv2d(c, c, 3, 1, 1)
        self.refine = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1), nn.GroupNorm(1, c), nn.ReLU(),
                                    nn.Conv2d(c, c, 3, 1, 1), nn.GroupNorm(1, c), nn.ReLU(),
                                    nn.Conv2d(c, c, 3, 1, 1), nn.GroupNorm(1, c))

    def forward(self, features: list[Tensor], strides: list[float], boxes: list[Tensor], labels: list[Tensor],
                image_hw: tuple[int, int]) -> list[Tensor]:
        """Student maps ``(B, C, H_l, W_l)`` per level → knowledge maps of the same shapes."""
        h_img, w_img = image_hw
        scale = torch.tensor([w_img, h_img, w_img, h_img], dtype=features[0].dtype, device=features[0].device)
        out = []
        for feat, stride in zip(features, strides):
            proj = self.student_proj(feat)
            b, c, h, w = proj.shape
            maps = []
            for i in range(b):
                bx = boxes[i].to(proj)
                if len(bx) == 0:
                    maps.append(proj.new_zeros(c, h, w))
                    continue
                desc = torch.cat([bx / scale, F.one_hot(labels[i].long(), self.num_classes).to(proj)], dim=1)
                emb = self.label(desc)  # (n, C)
                cells = DF.cell_box_masks(bx, h, w, stride).flatten(1).to(proj)  # (n, HW)
                appearance = cells @ proj[i].flatten(1).T / cells.sum(1, keepdim=True).clamp_min(1)  # (n, C)
                rel, _ = self.attention(appearance[None], emb[None], emb[None])  # (1, n, C)
                painted = self.inst_proj_1d(rel[0]).T @ cells  # (C, HW)
                maps.append(painted.reshape(c, h, w))
            raw = torch.stack(maps)
            out.append(self.refine(F.relu(self.inst_proj_2d(raw))))
        return out


@register(
    "lgd",
    FAMILY,
    Paper(
        title="LGD: Label-guided Self-distillation for Object Detection",
        authors="P. Zhang, Z. Kang, T. Yang, X. Zhang, N. Zheng, J. Sun",
        year=2022,
        arxiv="2109.11496",
        venue="AAAI",
    ),
)
class LGD(_Geometry, Method):
    """Label-guided self-distillation: a teacher built from the labels and the student's own features.

    No pretrained teacher (``needs_teacher = False``): ``Distiller(student, None, losses={"gfl_loss": 1,
    "lgd": 1})``. Each step the implicit teacher (:class:`_LGDTeacher`, owned and trained by this
    method) turns the ground-truth boxes and classes plus the student's FPN maps ``"fpn_out.l"`` into
    *instructive knowledge* maps ``K_l`` of the same shapes. Two terms:

    - ``det_weight ·`` the detector's own GFL loss (:func:`~distill.models.detection.gfl_losses`, ATSS as
      ``gfl_loss``) of the student's detection *head* run on ``K_l``: it trains the implicit teacher
      (and the shared head) to make ``K`` detect well;
    - ``distill_weight ·`` :func:`distill.functional.lgd_feature_loss` between the adapted student maps
      (an adapter of three 3x3 convs with ReLUs between) and ``K`` (detached), instance-normalised, over
      all levels together.

    The head is the student's ``cls_tower``/``cls_head``/``reg_tower``/``reg_head``/``scales``
    (:class:`~distill.models.detection.GFLDetector`), taken in :meth:`bind_models` and not registered
    here (the student owns it). Student maps feed the teacher undetached (the authors' FCOS configs:
    ``detachAppearanceEmbed=NO``; ``detach_appearance=True`` stops that gradient).

    Departures and sources: structure from the authors' code (megvii-research/LGD ``DynamicTeacher``,
    ``BaseDistillator``); their label encoder is a PointNet-style network with a spatial transformer
    over the descriptors, ours a 2-layer MLP; we add no context box (their ``addCtxBox`` varies by
    config). ``distill_weight = 1`` is their ``LAMBDA``; ``det_weight = 1`` and ``heads = 1`` (theirs 8
    on 256 channels) are ours for 16-64 channel maps. The authors first train without distillation
    (``PRE_NONDISTILL_ITERS`` 30k): use ``warmup_epochs`` or a later start for that. The paper's text
    could not be read here beyond the abstract.
    """

    needs_teacher = False
    requires_prepare = True

    def __init__(self, levels: Sequence[int] = (0, 1), distill_weight: float = 1.0, det_weight: float = 1.0,
                 heads: int = 1, detach_appearance: bool = False, anchor_scale: float = 4.0, topk: int = 9,
                 weight: float = 1.0, warmup_epochs: int = 0) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        if distill_weight < 0 or det_weight < 0:
            raise ValueError(f"lgd: distill_weight and det_weight must be >= 0, got {distill_weight}, {det_weight}")
        if heads < 1:
            raise ValueError(f"lgd: heads must be >= 1, got {heads}")
        self.levels = _levels(levels, "lgd")
        self.distill_weight, self.det_weight, self.heads = float(distill_weight), float(det_weight), int(heads)
        self.detach_appearance = bool(detach_appearance)
        self.anchor_scale, self.topk = float(anchor_scale), int(topk)
        self.student_taps = [f"fpn_out.{lv}" for lv in self.levels]
        self.teacher_taps = []
        self.strides, self.num_classes = None, None
        self.teacher_net: _LGDTeacher | None = None
        self.adapter: nn.ModuleList | None = None
        self._head: list[nn.Module] = []  # [student], kept out of the module tree

    def bind_models(self, student: nn.Module, teacher: nn.Module | None, example: Batch) -> None:
        self._bind_geometry(student, "lgd")
        missing = [n for n in ("cls_tower", "cls_head", "reg_tower", "reg_head", "scales") if not hasattr(student, n)]
        if missing:
            raise TypeError(f"lgd runs the student's detection head on its knowledge maps and needs a GFLDetector-like "
                            f"student; {type(student).__name__} lacks {missing}")
        assert self.strides is not None
        if max(self.levels) >= len(self.strides):
            raise ValueError(f"lgd: levels {self.levels} but the detector has {len(self.strides)} levels")
        if len(self.levels) != len(self.strides):
            raise ValueError(f"lgd: the detection loss on the knowledge needs every level of the detector "
                             f"({len(self.strides)}), got levels={self.levels}")
        self._head = [student]

    def prepare(self, student_view: View, teacher_view: View, batch: Batch) -> None:
        if self.teacher_net is not None:
            return
        if self.num_classes is None:
            raise RuntimeError("lgd: bind_models must run before prepare (Distiller.prepare does both)")
        feats = [_tap(student_view, p, "student") for p in self.student_taps]
        c = feats[0].shape[1]
        if any(f.shape[1] != c for f in feats):
            raise ValueError(f"lgd needs one width on every level, got {[f.shape[1] for f in feats]}")
        if c % self.heads:
            raise ValueError(f"lgd: heads={self.heads} must divide the FPN width {c}")
        device = feats[0].device
        self.teacher_net = _LGDTeacher(c, self.num_classes, self.heads).to(device)
        self.adapter = nn.ModuleList(nn.Sequential(nn.Conv2d(c, c, 3, 1, 1), nn.ReLU(), nn.Conv2d(c, c, 3, 1, 1),
                                                   nn.ReLU(), nn.Conv2d(c, c, 3, 1, 1)).to(device)
                                     for _ in self.levels)

    def knowledge(self, student_view: View, batch: Batch) -> list[Tensor]:
        """The instructive knowledge maps, one per level ``(B, C, H_l, W_l)`` (with gradient to the teacher)."""
        if self.teacher_net is None or self.strides is None:
            raise RuntimeError("lgd.prepare() must run on an example batch first (Distiller.prepare)")
        dense = _dense(batch, "lgd")
        feats = [_tap(student_view, p, "student") for p in self.student_taps]
        if self.detach_appearance:
            feats = [f.detach() for f in feats]
        strides = [float(self.strides[lv]) for lv in self.levels]
        return self.teacher_net(feats, strides, dense.boxes, dense.labels, tuple(dense.inputs.shape[-2:]))

    def _head_outputs(self, maps: list[Tensor]) -> tuple[Tensor, Tensor]:
        """The student's head on ``maps``: ``(logits (B, N, K), box_dist (B, N, 4, R+1))``, flattened as the detector's."""
        model = self._head[0]
        cls = [model.cls_head(model.cls_tower(m)) for m in maps]
        reg = [model.reg_head(model.reg_tower(m)) * model.scales[level] for level, m in zip(self.levels, maps)]
        return DF.flatten_levels(cls), DF.flatten_levels(reg, group=4)

    def parts(self, student_view: View, teacher_view: View, batch: Batch) -> dict[str, Tensor]:
        """``{"distill": ..., "teacher_det": ...}``, each unweighted."""
        if not self._head or self.adapter is None:
            raise RuntimeError("lgd: bind_models and prepare must run first (Distiller.prepare does both)")
        dense = _dense(batch, "lgd")
        know = self.knowledge(student_view, batch)
        logits, dist = self._head_outputs(know)
        points, strides, a = self._assign(dense, logits, "lgd")
        qfl, giou, dfl = gfl_losses(logits, dist, points, strides, a)
        det = qfl + 2.0 * giou + 0.25 * dfl  # GFL's weights, as gfl_loss
        num, den = None, 0
        for adapter, p, k in zip(self.adapter, self.student_taps, know):
            s = adapter(_tap(student_view, p, "student"))
            term = DF.lgd_feature_loss(s, k.detach()) * s.numel()
            num, den = (term if num is None else num + term), den + s.numel()
        assert num is not None
        return {"distill": num / den, "teacher_det": det}

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        p = self.parts(student_view, teacher_view, batch)
        return self.distill_weight * p["distill"] + self.det_weight * p["teacher_det"]

    def extra_repr(self) -> str:
        return (f"levels={self.levels}, distill_weight={self.distill_weight}, det_weight={self.det_weight}, "
                f"heads={self.heads}, detach_appearance={self.detach_appearance}, weight={self.weight}")
