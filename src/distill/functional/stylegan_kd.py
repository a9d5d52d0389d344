"""StyleKD's losses: Xu, Hou, Liu, Loy, "Mind the Gap in Distilling StyleGANs", ECCV 2022, arXiv 2208.08840.

A narrow student generator learns from a StyleGAN teacher given the same latent ``z``:

* **mapping-network output** (the paper's key finding: the mapping network decides the image's
  semantics, so the student's ``w`` must match the teacher's): the student's mapping network is
  initialised from the teacher's (done by the strategy), and/or :func:`mapping_l1`
  ``L_w = mean |w_s - w_t|`` (the authors' ``kd_style_loss``);
* **output images**: :func:`image_l1` ``L_1 = mean |G_s(z) - G_t(z)|`` and a perceptual distance
  (LPIPS in the paper; its VGG weights cannot be downloaded here, so :func:`feature_distance` on a
  classifier's features trained here stands in for it, and says so);
* **latent-direction-based relation** (:func:`latent_direction_relation`): each latent ``w_i`` is
  moved along a direction ``w_i' = w_i + a_i d_i``; with ``f_i`` / ``f_i'`` the flattened synthesis
  features of ``w_i`` / ``w_i'``, the similarity matrices ``S_ij = cos(f^s_i, f^s_j')`` (student)
  and ``T_ij = cos(f^t_i, f^t_j')`` (teacher) over the batch are matched row by row,
  ``L_rel = (1/B) sum_i KL(softmax(T_i) || softmax(S_i))`` (the authors' ``simi_loss kl``; the
  ``mse`` form ``mean (S - T)^2`` is their other option). Only the abstract of the paper could be
  read here: the form, the directions and the defaults come from the authors' code
  (github.com/xuguodong03/StyleKD, ``distributed_train.py``).

Directions: :func:`principal_directions` (the authors' ``calc_direction_split``) takes, per
synthesis block, the top-``k`` eigenvectors of ``A^T A`` where ``A`` stacks the block's style
affine weights ``(out, w_dim)`` with unit-norm rows (SeFa-like closed-form directions); offsets
are a direction drawn uniformly times ``a ~ N(0, sigma^2)``, ``sigma = 5``
(:func:`sample_offsets`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["feature_distance", "image_l1", "latent_direction_relation", "mapping_l1", "principal_directions",
           "sample_offsets"]


def _same(a: Tensor, b: Tensor, who: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{who}: student and teacher tensors must have equal shapes; got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")


def image_l1(student_images: Tensor, teacher_images: Tensor) -> Tensor:
    """``mean |x_s - x_t|`` over every element of images ``(B, C, H, W)``."""
    _same(student_images, teacher_images, "image_l1")
    return (student_images - teacher_images).abs().mean()


def mapping_l1(student_w: Tensor, teacher_w: Tensor) -> Tensor:
    """``mean |w_s - w_t|`` over latents ``(B, w_dim)`` (the authors' ``F.l1_loss(student_w, teacher_w)``)."""
    _same(student_w, teacher_w, "mapping_l1")
    return (student_w - teacher_w).abs().mean()


def feature_distance(student_features: Tensor, teacher_features: Tensor, eps: float = 1e-10) -> Tensor:
    """An LPIPS-like perceptual distance on one feature layer: ``(1/B) sum_i ||u^s_i - u^t_i||^2`` with
    ``u = f / ||f||`` the unit-normalised features ``(B, F)`` (or ``(B, C, H, W)``: normalised over
    channels at each position, squared differences summed over channels and averaged over positions,
    as LPIPS does per layer). LPIPS also weights channels with learned linear layers and sums several
    VGG layers; here every channel counts once and the layer is whatever network the caller chose
    (:class:`~distill.train.generative_eval.FeatureNet`'s penultimate features in the strategy)."""
    _same(student_features, teacher_features, "feature_distance")
    s = student_features / (student_features.pow(2).sum(1, keepdim=True) + eps).sqrt()
    t = teacher_features / (teacher_features.pow(2).sum(1, keepdim=True) + eps).sqrt()
    d = (s - t).pow(2).sum(1)  # (B,) or (B, H, W)
    return d.flatten(1).mean(1).mean() if d.dim() > 1 else d.mean()


def latent_direction_relation(student: Tensor, student_shifted: Tensor, teacher: Tensor, teacher_shifted: Tensor,
                              form: str = "kl") -> Tensor:
    """StyleKD's latent-direction-based relation loss for one layer.

    ``S_ij = cos(f^s_i, f^s'_j)``, ``T_ij = cos(f^t_i, f^t'_j)`` (``(B, B)``), ``f`` the features of
    ``w_i`` and ``f'`` those of the shifted ``w_j' = w_j + a_j d_j``, flattened per sample; then

    * ``form="kl"``: ``(1/B) sum_i sum_j P_ij (log P_ij - log Q_ij)``, ``P = softmax_j(T)``,
      ``Q = softmax_j(S)`` (temperature 1, as the authors' code);
    * ``form="mse"``: ``mean_ij (S_ij - T_ij)^2``.

    Args:
        student, student_shifted: ``(B, ...)`` student features of ``w`` and of ``w'``.
        teacher, teacher_shifted: ``(B, ...)`` teacher features (any per-sample size: only the
            ``B x B`` similarities are compared, so student and teacher widths may differ).
    Returns: a scalar.
    """
    if form not in ("kl", "mse"):
        raise ValueError(f"latent_direction_relation: form must be 'kl' or 'mse'; got {form!r}")
    _same(student, student_shifted, "latent_direction_relation (student)")
    _same(teacher, teacher_shifted, "latent_direction_relation (teacher)")
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"latent_direction_relation: batch sizes differ: {student.shape[0]} vs {teacher.shape[0]}")
    s = F.cosine_similarity(student.flatten(1)[:, None, :], student_shifted.flatten(1)[None, :, :], dim=2)
    t = F.cosine_similarity(teacher.flatten(1)[:, None, :], teacher_shifted.flatten(1)[None, :, :], dim=2)
    if form == "mse":
        return (s - t).pow(2).mean()
    return F.kl_div(F.log_softmax(s, 1), F.softmax(t, 1), reduction="batchmean")


def principal_directions(affine_weights: Sequence[Tensor], k: int = 5) -> Tensor:
    """The top-``k`` eigenvectors (largest eigenvalue first) of ``A^T A`` for each ``A`` in
    ``affine_weights`` (each ``(out, w_dim)``: one synthesis block's style affine weights stacked,
    rows scaled to unit norm), stacked ``(k * len(affine_weights), w_dim)``. The authors' code uses
    ``np.linalg.eig``, whose order is not guaranteed; we sort by eigenvalue (``torch.linalg.eigh``)."""
    if not affine_weights or k < 1:
        raise ValueError(f"principal_directions: need at least one weight matrix and k >= 1; got "
                         f"{len(affine_weights)} matrices, k={k}")
    out = []
    for a in affine_weights:
        if a.dim() != 2 or k > a.shape[1]:
            raise ValueError(f"principal_directions: each weight must be (out, w_dim) with w_dim >= k={k}; got "
                             f"{tuple(a.shape)}")
        a = a.detach().double()
        a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
        vals, vecs = torch.linalg.eigh(a.T @ a)
        order = vals.argsort(descending=True)[:k]
        out.append(vecs[:, order].T)
    return torch.cat(out).float()


def sample_offsets(directions: Tensor, batch: int, sigma: float = 5.0,
                   generator: torch.Generator | None = None) -> Tensor:
    """``(batch, w_dim)`` offsets ``a_i d_i``: ``d_i`` a row of ``directions`` ``(M, w_dim)`` drawn uniformly
    and scaled to unit norm, ``a_i ~ N(0, sigma^2)`` (the authors' ``offset_mode main``, ``offset_weight``)."""
    idx = torch.randint(0, directions.shape[0], (batch,), generator=generator)
    d = directions[idx.to(directions.device)]
    d = d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)
    a = torch.randn(batch, 1, generator=generator).to(d.device) * sigma
    return d * a
