"""Class-incremental distillation: D3Former's attention (Grad-CAM) and feature terms, and the protocol's metrics.

Paper: A. Mohamed, R. Grandhe, K. J. Joseph, S. Khan, F. Khan, "D3Former: Debiased Dual Distilled Transformer
for Incremental Learning", CVPR Workshops 2023, arXiv 2208.00777. Its debiasing is the logit-adjusted
cross-entropy (:func:`distill.functional.logit_adjusted_cross_entropy`, Menon et al. 2021) with the current
phase's class frequencies (new classes and exemplars).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["average_incremental_accuracy", "cam_distillation_loss", "cosine_feature_distillation",
           "forgetting", "token_gradcam"]


def token_gradcam(tokens: Tensor, grads: Tensor, eps: float = 1e-7) -> Tensor:
    r"""Grad-CAM over the patch tokens of a transformer block.

    .. math::
        w_{b,d} = \frac1L \sum_l \frac{\partial y_b}{\partial A_{b,l,d}},\qquad
        c_{b,l} = \mathrm{ReLU}\Big(\sum_d w_{b,d} A_{b,l,d}\Big),\qquad
        \hat c_{b,l} = \frac{c_{b,l} - \min_l c_{b,l}}{\max_l c_{b,l} - \min_l c_{b,l} + \epsilon}

    ``tokens`` ``A`` and ``grads`` ``∂y/∂A`` ``(B, L, D)`` (patch tokens only, prefix tokens dropped; ``y_b``
    the score of the class explained) → maps ``(B, L)`` in ``[0, 1]`` (Selvaraju et al., ICCV 2017, with the
    min-max scaling of the pytorch-grad-cam package that D3Former's code uses). Differentiable in both
    inputs (pass ``grads`` from ``torch.autograd.grad(..., create_graph=True)`` to train through it).
    """
    if tokens.dim() != 3 or grads.shape != tokens.shape:
        raise ValueError(f"token_gradcam: tokens and grads must both be (B, L, D); got {tuple(tokens.shape)} and "
                         f"{tuple(grads.shape)}")
    weights = grads.mean(dim=1, keepdim=True)  # (B, 1, D)
    cam = F.relu((weights * tokens).sum(dim=-1))  # (B, L)
    low = cam.min(dim=1, keepdim=True).values
    return (cam - low) / (cam.max(dim=1, keepdim=True).values - low + eps)


def cam_distillation_loss(cam: Tensor, ref_cam: Tensor) -> Tensor:
    r"""D3Former's attention-map distillation: :math:`\frac{1}{BL}\sum_{b,l} |\hat c_{b,l} - \hat c^{old}_{b,l}|`
    (L1, mean over samples and positions) between the current model's and the previous phase's Grad-CAM maps
    ``(B, L)`` on the exemplars of old classes; the reference is detached."""
    if cam.shape != ref_cam.shape:
        raise ValueError(f"cam_distillation_loss: maps must have one shape; got {tuple(cam.shape)} and "
                         f"{tuple(ref_cam.shape)}")
    return (cam - ref_cam.detach()).abs().mean()


def cosine_feature_distillation(features: Tensor, ref_features: Tensor) -> Tensor:
    r"""The feature (output) distillation D3Former keeps from LUCIR (Hou et al., CVPR 2019):
    :math:`\frac1B \sum_b \big(1 - \cos(f_b, f^{old}_b)\big)` on features ``(B, D)``; reference detached."""
    if features.shape != ref_features.shape or features.dim() != 2:
        raise ValueError(f"cosine_feature_distillation: features must be (B, D) of one shape; got "
                         f"{tuple(features.shape)} and {tuple(ref_features.shape)}")
    return (1.0 - F.cosine_similarity(features, ref_features.detach(), dim=1)).mean()


def _check_matrix(acc: Tensor, who: str) -> Tensor:
    acc = torch.as_tensor(acc, dtype=torch.float64)
    if acc.dim() != 2 or acc.shape[0] != acc.shape[1] or acc.shape[0] < 1:
        raise ValueError(f"{who}: acc must be a square (T, T) matrix of per-task accuracies; got {tuple(acc.shape)}")
    return acc


def average_incremental_accuracy(acc: Tensor, sizes: Tensor | None = None) -> float:
    r"""The mean over phases of the accuracy on every class seen so far:
    :math:`\bar A = \frac1T \sum_{k} A_k`, :math:`A_k = \sum_{j \le k} n_j\, a_{k,j} / \sum_{j\le k} n_j`, where
    ``acc[k, j]`` ``(T, T)`` is the accuracy (%) on task ``j``'s test samples after phase ``k`` (``j <= k``) and
    ``sizes`` ``(T,)`` the tasks' test-set sizes (default: equal)."""
    acc = _check_matrix(acc, "average_incremental_accuracy")
    n = torch.ones(acc.shape[0], dtype=torch.float64) if sizes is None else torch.as_tensor(sizes, dtype=torch.float64)
    per_phase = [float((acc[k, :k + 1] * n[:k + 1]).sum() / n[:k + 1].sum()) for k in range(acc.shape[0])]
    return sum(per_phase) / len(per_phase)


def forgetting(acc: Tensor) -> float:
    r"""Average forgetting: :math:`F = \frac{1}{T-1}\sum_{j<T-1} \big(\max_{k<T-1} a_{k,j} - a_{T-1,j}\big)` over
    ``acc`` ``(T, T)`` as in :func:`average_incremental_accuracy` (only ``k >= j`` entries are read); 0 for one
    task (Chaudhry et al., ECCV 2018)."""
    acc = _check_matrix(acc, "forgetting")
    t = acc.shape[0]
    if t == 1:
        return 0.0
    return sum(float(acc[j:t - 1, j].max() - acc[t - 1, j]) for j in range(t - 1)) / (t - 1)
