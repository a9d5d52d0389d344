"""Privileged information, paired modalities and degraded inputs: the math of three transfer papers.

* :func:`generalized_distillation_loss`: Lopez-Paz, Bottou, Schölkopf, Vapnik, "Unifying
  Distillation and Privileged Information", ICLR 2016, arXiv 1511.03643 (eq. 4-5).
* :func:`degrade`: the input degradations of Su & Maji, "Adapting Models to Signal Degradation
  using Distillation", BMVC 2017, arXiv 1604.00433 (low resolution, noise, line drawings).
* :func:`distance_field`: a depth-like second rendering of an image, the paired modality of our
  supervision-transfer benchmark (Gupta, Hoffman, Malik, "Cross Modal Distillation for
  Supervision Transfer", CVPR 2016, arXiv 1507.00448, transfer RGB to depth).
* :func:`parse_view` / :func:`apply_view`: one spec string names the part of a packed input a
  model sees (``"identity"``, ``"columns:0:50"``, ``"channels:1:2"``, ``"downsample:4"``,
  ``"noise:0.5"``, ``"edges"``, ``"distance"``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from distill.functional._precision import fp32

__all__ = ["VIEW_KINDS", "apply_view", "degrade", "distance_field", "generalized_distillation_loss",
           "parse_view", "sobel_edges"]

VIEW_KINDS = ("identity", "columns", "channels", "downsample", "noise", "edges", "distance")
"""The kinds of :func:`parse_view` specs."""


def generalized_distillation_loss(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, *,
                                  imitation: float = 1.0, T: float = 1.0) -> Tensor:
    r"""Generalized distillation (Lopez-Paz et al. 2016, eq. 4-5): hard labels and the teacher's soft
    labels computed on the privileged features, mixed by the imitation parameter ``λ``.

    .. math::
        L = \frac{1}{B}\sum_b \Big[(1-\lambda)\,\ell\big(y_b, \sigma(f_s(x_b))\big)
            + \lambda\,\ell\big(s_b, \sigma(f_s(x_b))\big)\Big],\quad
        s_b = \sigma\big(f_t(x^\star_b)/T\big),\quad \ell(p, q) = -\textstyle\sum_k p_k \log q_k

    The student's softmax is *not* divided by ``T`` and the soft term is not multiplied by
    ``T²``: the paper's eq. 4 as written. (The authors' Keras code, ``synthetic.py``, weighs the
    soft term by ``T²·λ``; both agree at the synthetic experiments' ``λ = T = 1``.) The soft term
    is the cross-entropy, so it does not vanish when the student equals the teacher (it is then
    the teacher's entropy).

    Shapes: ``student_logits`` (B, K) on the regular features ``x``, ``teacher_logits`` (B, K) on
    the privileged features ``x*`` (no gradient flows to them), ``targets`` (B,) long → scalar.
    """
    if not 0.0 <= imitation <= 1.0:
        raise ValueError(f"imitation (the paper's lambda) must be in [0, 1]; got {imitation!r}")
    if not T > 0:
        raise ValueError(f"temperature T must be > 0; got {T!r}")
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(f"student and teacher logits must both be (B, K); got {tuple(student_logits.shape)} "
                         f"and {tuple(teacher_logits.shape)}")
    log_q = F.log_softmax(fp32(student_logits), dim=1)
    soft = F.softmax(fp32(teacher_logits.detach()) / T, dim=1)
    hard = F.nll_loss(log_q, targets)
    return (1.0 - imitation) * hard + imitation * -(soft * log_q).sum(1).mean()


def sobel_edges(x: Tensor) -> Tensor:
    r"""Edge magnitude of each channel, a line-drawing rendering: :math:`\sqrt{G_x^2 + G_y^2}` with
    the 3x3 Sobel kernels (zero padding), rescaled per image to a maximum of 1.

    Shapes: ``x`` (B, C, H, W) → (B, C, H, W).
    """
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=x.dtype, device=x.device)
    k = torch.stack([kx, kx.t()]).unsqueeze(1)  # (2, 1, 3, 3)
    b, c, h, w = x.shape
    g = F.conv2d(x.reshape(b * c, 1, h, w), k, padding=1)
    mag = g.pow(2).sum(1).sqrt().reshape(b, c, h, w)
    return mag / mag.flatten(1).amax(1).clamp_min(1e-12).view(b, 1, 1, 1)


def distance_field(x: Tensor, threshold: float = 0.5, scale: float | None = None) -> Tensor:
    r"""A depth-like rendering of a drawing: each pixel's Euclidean distance to the nearest stroke
    pixel (``x > threshold``), mapped to ``[0, 1]`` as :math:`\exp(-d / s)` (1 on the strokes, decaying
    away from them; ``s = scale`` or ``H / 8``).

    Why this modality: like a depth map beside an RGB image, it is a second, aligned rendering of
    the same scene whose pixel values differ from the image's everywhere off the strokes, so a
    network trained on the images does not apply to it, yet the same labels hold. An image
    without strokes maps to zeros. Computed with :func:`scipy.ndimage.distance_transform_edt`
    on the CPU (no gradient).

    Shapes: ``x`` (B, 1, H, W) → (B, 1, H, W) float32 on ``x``'s device.
    """
    from scipy.ndimage import distance_transform_edt

    if x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"distance_field takes grey images (B, 1, H, W); got {tuple(x.shape)}")
    s = float(scale) if scale is not None else x.shape[-1] / 8.0
    strokes = (x.detach().cpu().numpy()[:, 0] > threshold)
    out = np.zeros(strokes.shape, dtype=np.float32)
    for i, m in enumerate(strokes):
        if m.any():
            out[i] = np.exp(-distance_transform_edt(~m) / s)
    return torch.from_numpy(out).unsqueeze(1).to(x.device)


def degrade(x: Tensor, kind: str, level: float | None = None, *, generator: torch.Generator | None = None) -> Tensor:
    r"""One of Su & Maji's degradations of images ``x`` (B, C, H, W), output shaped like ``x``.

    * ``"downsample"``: low resolution, average-pooled by the integer factor ``level`` then
      upsampled back to H x W bilinearly (the paper upsamples its low-resolution images to the
      network's input size); H and W must be multiples of ``level``.
    * ``"noise"``: additive Gaussian noise of standard deviation ``level`` (drawn from ``generator``).
    * ``"edges"``: a line drawing, :func:`sobel_edges` (the paper's "line drawings from color images").
    """
    if x.dim() != 4:
        raise ValueError(f"degrade takes images (B, C, H, W); got {tuple(x.shape)}")
    if kind == "downsample":
        k = int(level) if level is not None else 0
        if k < 1 or k != level or x.shape[-1] % k or x.shape[-2] % k:
            raise ValueError(f"downsample needs an integer factor >= 1 dividing the image size "
                             f"{tuple(x.shape[-2:])}; got {level!r}")
        small = F.avg_pool2d(x, k)
        return F.interpolate(small, size=x.shape[-2:], mode="bilinear", align_corners=False)
    if kind == "noise":
        if level is None or not level >= 0:
            raise ValueError(f"noise needs a standard deviation >= 0; got {level!r}")
        return x + float(level) * torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    if kind == "edges":
        return sobel_edges(x)
    raise ValueError(f"unknown degradation {kind!r}; expected 'downsample', 'noise' or 'edges'")


def parse_view(spec: str) -> tuple[str, tuple[float, ...]]:
    """Parse a view spec ``"kind[:a[:b]]"`` into ``(kind, numbers)``, checking it before any work.

    ``identity``; ``columns:a:b`` / ``channels:a:b`` (the slice ``a:b`` of dimension 1: flat
    features packed side by side, or modalities stacked as channels); ``downsample:k``;
    ``noise:sigma``; ``edges``; ``distance``.
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"a view is a string such as 'identity', 'columns:0:50' or 'downsample:4'; got {spec!r}")
    kind, *rest = spec.split(":")
    if kind not in VIEW_KINDS:
        raise ValueError(f"unknown view kind {kind!r} in {spec!r}; expected one of {VIEW_KINDS}")
    try:
        nums = tuple(float(r) for r in rest)
    except ValueError:
        raise ValueError(f"view {spec!r}: the parts after {kind!r} must be numbers") from None
    arity = {"identity": 0, "edges": 0, "distance": 0, "columns": 2, "channels": 2, "downsample": 1, "noise": 1}[kind]
    if len(nums) != arity:
        raise ValueError(f"view {spec!r}: {kind!r} takes {arity} number(s), got {len(nums)}")
    if kind in ("columns", "channels") and not (nums[0] == int(nums[0]) and nums[1] == int(nums[1])
                                                 and 0 <= nums[0] < nums[1]):
        raise ValueError(f"view {spec!r}: the slice a:b needs integers 0 <= a < b")
    return kind, nums


def apply_view(x: Tensor, spec: str, *, generator: torch.Generator | None = None) -> Tensor:
    """The part of the packed input ``x`` (B, ...) that view ``spec`` (:func:`parse_view`) names."""
    kind, nums = parse_view(spec)
    if kind == "identity":
        return x
    if kind in ("columns", "channels"):
        a, b = int(nums[0]), int(nums[1])
        if x.dim() < 2 or b > x.shape[1] or (kind == "columns" and x.dim() != 2) or (kind == "channels" and x.dim() != 4):
            raise ValueError(f"view {spec!r} does not fit an input of shape {tuple(x.shape)} "
                             f"({'(B, D)' if kind == 'columns' else '(B, C, H, W)'} with dimension 1 >= {b})")
        return x[:, a:b]
    if kind == "distance":
        return distance_field(x)
    return degrade(x, kind, nums[0] if nums else None, generator=generator)
