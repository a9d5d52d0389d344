"""KD-MVS's two losses as methods: the teacher's self-supervised consistency and the student's
probabilistic KD from validated pseudo-labels.

Paper: Y. Ding, Q. Zhu, X. Liu, W. Yuan, H. Zhang, C. Zhang, "KD-MVS: Knowledge Distillation Based
Self-supervised Learning for Multi-view Stereo", ECCV 2022, arXiv 2207.10425. The math and its sources
are in :mod:`distill.functional.mvs`; the three-stage pipeline is the strategy ``kd_mvs``
(:mod:`distill.strategies.kd_mvs`). Both methods read the model's packed multi-view input
(``batch.inputs`` ``(B, V, 4, H, W)``, :func:`distill.data.mvs.pack_views`) and its output depth
(the view's ``"logits"``, ``(B, H, W)``) of an :class:`~distill.models.mvs.MVSNet`-like model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from distill import functional as DF
from distill.batch import Batch, View
from distill.data.mvs import unpack_views
from distill.methods._views import tap as _tap
from distill.methods.base import Method, Paper, register
from distill.models.mvs import warp_by_depth

KD_MVS = Paper(
    title="KD-MVS: Knowledge Distillation Based Self-supervised Learning for Multi-view Stereo",
    authors="Y. Ding, Q. Zhu, X. Liu, W. Yuan, H. Zhang, C. Zhang",
    year=2022,
    arxiv="2207.10425",
    venue="ECCV",
)

PSEUDO_KEYS = ("pseudo_mu", "pseudo_sigma", "pseudo_mask")


def _depth_and_views(student_view: View, batch: Batch, who: str) -> tuple[Tensor, Tensor, Tensor]:
    depth = student_view["logits"]
    images, proj = unpack_views(batch.inputs)
    if depth.dim() != 3 or depth.shape != (images.shape[0], *images.shape[-2:]):
        raise ValueError(f"{who}: the model's output must be the reference depth (B, H, W) = "
                         f"{(images.shape[0], *images.shape[-2:])}, got {tuple(depth.shape)}")
    return depth, images, proj


@register("mvs_self_sup", "self-supervised", KD_MVS)
class MVSSelfSupervised(Method):
    """KD-MVS's teacher loss: photometric + featuremetric consistency of the sources warped to the
    reference through the predicted depth, plus edge-aware depth smoothness.

    ``L = photo · C(I_ref, Î_v) + feature · C(F_ref, F̂_v) + smooth · S(d, I_ref)`` with ``C``
    :func:`~distill.functional.mvs_consistency_loss` (per pixel, the best ``top_k`` source views) and ``S``
    :func:`~distill.functional.edge_aware_smoothness`; ``Î_v`` / ``F̂_v``: view ``v``'s image / features
    warped by :func:`~distill.models.mvs.warp_by_depth`. The features are the model's own (tap
    ``features``, ``(B·V, C, H, W)``), detached as in the authors' code, so the featuremetric term trains
    the depth only.

    Defaults (authors' code ``unsup_loss``, the paper's text could not be read here): photo : feature =
    12 : 3 → ``photo = 1``, ``feature = 0.25``; smoothness 0.18 / 12 = ``0.015``; gradient weight 0.5 in
    the reconstruction error. Their SSIM term (weight 6) and learned uncertainty weighting are left out;
    ``top_k = 1`` of our 2 sources (theirs: 3 of 4).
    """

    needs_teacher = False

    def __init__(self, photo: float = 1.0, feature: float = 0.25, smooth: float = 0.015, grad_weight: float = 0.5,
                 top_k: int = 1, weight: float = 1.0, warmup_epochs: int = 0) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        for name, value in (("photo", photo), ("feature", feature), ("smooth", smooth)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if not 0.0 <= grad_weight <= 1.0:
            raise ValueError(f"grad_weight must be in [0, 1], got {grad_weight}")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.photo, self.feature, self.smooth = float(photo), float(feature), float(smooth)
        self.grad_weight, self.top_k = float(grad_weight), int(top_k)
        self.student_taps = ["features"] if feature > 0 else []

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        depth, images, proj = _depth_and_views(student_view, batch, "mvs_self_sup")
        b, v = images.shape[:2]
        if self.top_k > v - 1:
            raise ValueError(f"mvs_self_sup: top_k = {self.top_k} but the scenes have {v - 1} source views")
        sources = [warp_by_depth(images[:, i], proj[:, i], proj[:, 0], depth) for i in range(1, v)]
        valid = torch.stack([m for _, m in sources], 1)
        loss = self.photo * DF.mvs_consistency_loss(images[:, 0], torch.stack([w for w, _ in sources], 1), valid,
                                                    self.grad_weight, self.top_k)
        if self.feature > 0:
            feats = _tap(student_view, "features", "student").detach()
            if feats.shape[0] != b * v:
                raise ValueError(f"mvs_self_sup: tap 'features' must be (B·V, C, H, W) with B·V = {b * v}, got "
                                 f"{tuple(feats.shape)}")
            feats = feats.view(b, v, *feats.shape[1:])
            warped = torch.stack([warp_by_depth(feats[:, i], proj[:, i], proj[:, 0], depth)[0] for i in range(1, v)], 1)
            loss = loss + self.feature * DF.mvs_consistency_loss(feats[:, 0], warped, valid, self.grad_weight,
                                                                 self.top_k)
        if self.smooth > 0:
            loss = loss + self.smooth * DF.edge_aware_smoothness(depth, images[:, 0])
        return loss

    def extra_repr(self) -> str:
        return (f"photo={self.photo}, feature={self.feature}, smooth={self.smooth}, grad_weight={self.grad_weight}, "
                f"top_k={self.top_k}")


@register("kd_mvs", "self-supervised", KD_MVS)
class KDMVS(Method):
    """KD-MVS's probabilistic knowledge transfer: KL from the pseudo-label distribution (a Gaussian over
    the depth hypotheses, :func:`~distill.functional.depth_probability_encoding`) to the student's
    probability volume, over the validated pixels (:func:`~distill.functional.kd_mvs_kl_loss`).

    The pseudo-labels are the teacher's cross-view-checked depth (``mu``), its spread (``sigma``) and the
    validity mask, made offline by stage 2 of the strategy ``kd_mvs`` and carried by the batch as
    ``extras["pseudo_mu"]``, ``extras["pseudo_sigma"]`` ``(B, H, W)`` and ``extras["pseudo_mask"]``
    ``(B, H, W)`` bool; no live teacher is read. The student's log-probability volume is its tap
    ``log_prob`` ``(B, D, H, W)``; the hypotheses are the student's ``depth_values`` (read in
    :meth:`bind_models`).

    Args:
        min_sigma: the narrowest Gaussian; ``None`` = half the hypothesis spacing (ours: the paper's value
            could not be read; the authors' code adds 1e-6 to σ).
    """

    needs_teacher = False

    def __init__(self, min_sigma: float | None = None, weight: float = 1.0, warmup_epochs: int = 0) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        if min_sigma is not None and min_sigma <= 0:
            raise ValueError(f"min_sigma must be > 0 or None, got {min_sigma}")
        self.min_sigma = None if min_sigma is None else float(min_sigma)
        self.student_taps = ["log_prob"]
        self._depth_values: Tensor | None = None

    def bind_models(self, student: nn.Module, teacher: nn.Module | None, example: Batch) -> None:
        values = getattr(student, "depth_values", None)
        if not isinstance(values, Tensor) or values.dim() != 1:
            raise TypeError(f"kd_mvs needs a student with a 1-D tensor attribute depth_values (an MVSNet), "
                            f"got {type(student).__name__}")
        self._depth_values = values.detach()

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        extras = getattr(batch, "extras", {})
        missing = [k for k in PSEUDO_KEYS if k not in extras]
        if missing:
            raise KeyError(f"kd_mvs: the batch lacks the pseudo-labels {missing}: use a DenseBatch whose extras carry "
                           f"{list(PSEUDO_KEYS)} (stage 2 of the strategy kd_mvs makes them)")
        if self._depth_values is None:
            raise RuntimeError("kd_mvs: bind_models(student, ...) must run first (Distiller does) to read depth_values")
        log_prob = _tap(student_view, "log_prob", "student")
        values = self._depth_values.to(log_prob)
        if log_prob.dim() != 4 or log_prob.shape[1] != len(values):
            raise ValueError(f"kd_mvs: tap 'log_prob' must be (B, D={len(values)}, H, W), got {tuple(log_prob.shape)}")
        min_sigma = self.min_sigma if self.min_sigma is not None else 0.5 * float((values[1:] - values[:-1]).mean())
        target = DF.depth_probability_encoding(extras["pseudo_mu"], extras["pseudo_sigma"], values, min_sigma)
        return DF.kd_mvs_kl_loss(log_prob, target, extras["pseudo_mask"].bool())

    def extra_repr(self) -> str:
        return f"min_sigma={self.min_sigma}"
