"""The math of MonoDistill and of the monocular 3D detector's own loss.

MonoDistill: Chong, Ma, Zhang, Yue, Li, Wang, Ouyang, "MonoDistill: Learning Spatial Features for
Monocular 3D Object Detection", ICLR 2022, arXiv 2201.10830. A teacher of the student's
architecture, trained on LiDAR points projected into the image plane, guides the monocular
student with three terms: a scene-level affinity distillation and an object-level feature
distillation in the feature space, and an object-level distillation in the result space.

Conventions: feature maps ``(B, C, h, w)``; masks ``(B, h, w)`` float in {0, 1}; nothing here
detaches the teacher (the methods pass detached tensors). The paper's method section could not
be read here (only its abstract and introduction); the formulas below follow the authors' code
(github.com/monster-ghost/MonoDistill, ``lib/losses/feature_distill_loss.py``,
``head_distill_loss.py``), and every difference from it is written beside the function.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "box_cell_mask",
    "gather_cells",
    "mono_heatmap_focal_loss",
    "monodistill_affinity",
    "monodistill_object_loss",
    "monodistill_result_loss",
    "monodistill_scene_loss",
]


def _same_maps(s: Tensor, t: Tensor, what: str) -> None:
    if s.dim() != 4 or s.shape != t.shape:
        raise ValueError(f"{what} needs two (B, C, h, w) maps of one shape (adapt the student first), got "
                         f"{tuple(s.shape)} and {tuple(t.shape)}")


def monodistill_affinity(feature: Tensor, normalize: bool = True) -> Tensor:
    r"""The affinity map of a feature map ``(B, C, h, w)`` → ``(B, N, N)``, ``N = h·w``:

    .. math:: A_{ij} = \frac{f_i^\top f_j}{\lVert f_i\rVert_2 \lVert f_j\rVert_2}

    with ``f_i`` the ``C``-vector at position ``i``. ``normalize=False`` gives the raw dot products
    ``f_iᵀ f_j`` the authors' code uses.
    """
    if feature.dim() != 4:
        raise ValueError(f"monodistill_affinity needs a (B, C, h, w) map, got {tuple(feature.shape)}")
    f = feature.float().flatten(2)  # (B, C, N)
    if normalize:
        f = F.normalize(f, dim=1, eps=1e-8)
    return f.transpose(1, 2) @ f


def monodistill_scene_loss(student: Tensor, teacher: Tensor, normalize: bool = True,
                           size: tuple[int, int] | None = None) -> Tensor:
    r"""Scene-level distillation in the feature space: the L1 distance of the affinity maps,

    .. math:: L_{sf} = \frac{1}{B N^2} \sum_b \sum_{i,j} \big| A^t_{b,ij} - A^s_{b,ij} \big|

    ``student``, ``teacher`` ``(B, C, h, w)`` (equal shapes). ``size`` first resizes both maps
    bilinearly to ``size`` (the authors resize every level to the smallest one to bound the
    ``N²`` cost); ``None`` keeps them. The authors' code divides this mean once more by ``B``
    (``F.l1_loss(...) / B``) and uses ``normalize=False``; we keep the plain mean.
    """
    _same_maps(student, teacher, "monodistill_scene_loss")
    if size is not None:
        student = F.interpolate(student, size=size, mode="bilinear", align_corners=False)
        teacher = F.interpolate(teacher, size=size, mode="bilinear", align_corners=False)
    return (monodistill_affinity(teacher, normalize) - monodistill_affinity(student, normalize)).abs().mean()


def box_cell_mask(boxes: Sequence[Tensor], hw: tuple[int, int], scale: float = 1.0) -> Tensor:
    """The cells of an ``hw`` map covered by each image's boxes: ``(B, h, w)`` float in {0, 1}.

    ``boxes``: per image ``(n, 4)`` ``(x1, y1, x2, y2)``; multiplied by ``scale`` into cell
    units, a box covers rows ``⌊y1⌋ .. ⌈y2⌉ − 1`` and columns ``⌊x1⌋ .. ⌈x2⌉ − 1`` (every cell it
    touches; the authors' code truncates both ends, ``int(x1):int(x2)``).
    """
    h, w = hw
    dev = boxes[0].device if len(boxes) else torch.device("cpu")
    mask = torch.zeros(len(boxes), h, w, device=dev)
    for i, bx in enumerate(boxes):
        for x1, y1, x2, y2 in (bx.reshape(-1, 4).float() * scale).tolist():
            c0, c1 = max(0, math.floor(x1)), min(w, math.ceil(x2))
            r0, r1 = max(0, math.floor(y1)), min(h, math.ceil(y2))
            if c1 > c0 and r1 > r0:
                mask[i, r0:r1, c0:c1] = 1.0
    return mask


def monodistill_object_loss(student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
    r"""Object-level distillation in the feature space: the squared error inside the objects' 2D boxes,

    .. math:: L_{of} = \frac{1}{N_{pos}} \sum_{b,p} M_{bp} \, \frac{1}{C} \sum_c (F^s_{bcp} - F^t_{bcp})^2,
              \qquad N_{pos} = \sum_{b,p} M_{bp}

    ``student``, ``teacher`` ``(B, C, h, w)``, ``mask`` ``(B, h, w)`` (:func:`box_cell_mask`). 0
    when the mask is empty. The authors' code has a further factor ``0.5/B`` and also drops cells
    where the teacher's feature is all zero.
    """
    _same_maps(student, teacher, "monodistill_object_loss")
    if mask.shape != (student.shape[0], *student.shape[2:]):
        raise ValueError(f"monodistill_object_loss: mask {tuple(mask.shape)} does not match the maps "
                         f"{tuple(student.shape)}; expected (B, h, w)")
    per_cell = (student.float() - teacher.float()).pow(2).mean(dim=1)  # (B, h, w)
    n = mask.sum()
    return (per_cell * mask).sum() / n.clamp_min(1.0)


def monodistill_result_loss(student: Sequence[Tensor], teacher: Sequence[Tensor], mask: Tensor) -> Tensor:
    r"""Object-level distillation in the result space: per head, the L1 distance of the student's and
    the teacher's raw outputs at the object cells, summed over heads,

    .. math:: L_{or} = \sum_k \frac{1}{N_{pos} C_k} \sum_{b,p} M_{bp} \sum_c \big| y^s_{k,bcp} - y^t_{k,bcp} \big|

    ``student``, ``teacher``: the heads' maps ``(B, C_k, h, w)`` in the same order; ``mask``
    ``(B, h, w)`` in {0, 1} (the object-centre neighbourhoods). 0 when the mask is empty. The
    authors' code does the same for its offset, size, depth and 3D-size heads (``F.l1_loss`` over
    the masked cells) and a KL + L1 pair for its binned heading; our heading is regressed.
    """
    if len(student) != len(teacher) or not student:
        raise ValueError(f"monodistill_result_loss needs as many student as teacher heads (>= 1), got "
                         f"{len(student)} and {len(teacher)}")
    n = mask.sum()
    total = mask.new_zeros(())
    for s, t in zip(student, teacher):
        _same_maps(s, t, "monodistill_result_loss")
        if mask.shape != (s.shape[0], *s.shape[2:]):
            raise ValueError(f"monodistill_result_loss: mask {tuple(mask.shape)} does not match a head "
                             f"{tuple(s.shape)}; expected (B, h, w)")
        diff = (s.float() - t.float()).abs().mean(dim=1)  # (B, h, w)
        total = total + (diff * mask).sum() / n.clamp_min(1.0)
    return total


def mono_heatmap_focal_loss(logits: Tensor, heatmap: Tensor, alpha: float = 2.0, beta: float = 4.0) -> Tensor:
    r"""CenterNet's penalty-reduced focal loss (Zhou et al. 2019, arXiv 1904.07850, Eq. 1) on
    heatmap logits ``(B, K, h, w)`` against Gaussian targets ``heatmap`` (same shape, 1 at centres):

    .. math:: L_k = \frac{-1}{N} \sum_{xyc} \begin{cases} (1 - p)^{\alpha} \log p & y = 1 \\
              (1 - y)^{\beta} p^{\alpha} \log(1 - p) & \text{otherwise} \end{cases}

    with ``p = σ(logit)`` and ``N`` the number of centres (at least 1).
    """
    if logits.shape != heatmap.shape:
        raise ValueError(f"mono_heatmap_focal_loss: logits {tuple(logits.shape)} and heatmap "
                         f"{tuple(heatmap.shape)} differ")
    x = logits.float()
    log_p, log_1p = F.logsigmoid(x), F.logsigmoid(-x)
    p = torch.sigmoid(x)
    pos = heatmap >= 1.0 - 1e-6
    pos_term = (1 - p).pow(alpha) * log_p
    neg_term = (1 - heatmap).pow(beta) * p.pow(alpha) * log_1p
    n = pos.sum().clamp_min(1)
    return -(torch.where(pos, pos_term, neg_term)).sum() / n


def gather_cells(maps: Tensor, index: Tensor) -> Tensor:
    """The values of ``maps`` ``(B, C, h, w)`` at flat cell indices ``index`` ``(B, M)`` → ``(B, M, C)``."""
    b, c = maps.shape[:2]
    flat = maps.flatten(2)  # (B, C, h·w)
    return flat.gather(2, index[:, None, :].expand(b, c, index.shape[1])).transpose(1, 2)
