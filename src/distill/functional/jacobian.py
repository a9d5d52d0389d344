"""Jacobian matching and knowledge projection: the math.

* Jacobian matching — Srinivas & Fleuret, "Knowledge Transfer with Jacobian Matching",
  ICML 2018, arXiv 1803.00443.
* Knowledge projection — Zhang, Ning & He, "Knowledge Projection for Effective Design of
  Thinner and Faster Deep Neural Networks" (also titled "Knowledge Projection for Deep Neural
  Networks"), 2017, arXiv 1710.09505.

Nothing here detaches the teacher: callers pass detached teacher tensors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "input_gradient",
    "normalize_per_sample",
    "jacobian_matching_loss",
    "knowledge_projection_loss",
]


def input_gradient(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    classes: Tensor | None = None,
    *,
    create_graph: bool = False,
) -> tuple[Tensor, Tensor]:
    r"""One row of the input-output Jacobian per sample: :math:`\nabla_x f^{c_b}(x_b)`.

    .. math:: g_b = \frac{\partial f^{c_b}(x_b)}{\partial x_b}

    Args:
        fn: the model, ``(B, ...) -> (B, K)`` logits.
        x: inputs ``(B, ...)``; a leaf copy with ``requires_grad`` is made, ``x`` is untouched.
        classes: ``(B,)`` output component per sample; ``None`` picks each sample's top logit.
        create_graph: keep the graph of the gradient (double backprop), so a loss on ``g``
            trains ``fn``'s parameters.

    Returns ``(g, logits)``: ``g`` has the shape of ``x``; ``logits`` ``(B, K)`` from the same forward.
    When sample ``b``'s output depends only on ``x_b`` (eval mode, or no batch-coupled layers),
    the gradient of ``sum_b f^{c_b}(x_b)`` w.r.t. the batch gives every row exactly, in one
    backward. With BatchNorm in train mode the batch statistics couple the samples and ``g_b``
    also holds the (usually small) terms through the other samples' outputs, as in every
    batched implementation.
    """
    leaf = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = fn(leaf)
        if logits.dim() != 2 or logits.shape[0] != x.shape[0]:
            raise ValueError(f"expected (B, K) logits for {x.shape[0]} inputs, got {tuple(logits.shape)}")
        if classes is None:
            classes = logits.detach().argmax(dim=1)
        classes = classes.to(device=logits.device, dtype=torch.long).view(-1, 1)
        picked = logits.gather(1, classes).sum()
        (g,) = torch.autograd.grad(picked, leaf, create_graph=create_graph)
    return g, logits


def normalize_per_sample(g: Tensor, eps: float = 1e-12) -> Tensor:
    r"""Each sample's tensor divided by its l2 norm: :math:`g_b / \max(\lVert g_b \rVert_2, \epsilon)`, flattened to ``(B, D)``."""
    flat = g.reshape(g.shape[0], -1)
    return flat / flat.norm(dim=1, keepdim=True).clamp_min(eps)


def jacobian_matching_loss(grad_s: Tensor, grad_t: Tensor, *, squared: bool = True, eps: float = 1e-12) -> Tensor:
    r"""Normalised Jacobian matching (Srinivas & Fleuret, ICML 2018, arXiv 1803.00443).

    .. math::
        L = \frac{1}{B} \sum_b \Bigl\lVert \frac{\nabla_x f_T^{c_b}(x_b)}{\lVert\nabla_x f_T^{c_b}(x_b)\rVert_2}
            - \frac{\nabla_x f_S^{c_b}(x_b)}{\lVert\nabla_x f_S^{c_b}(x_b)\rVert_2} \Bigr\rVert_2^{2}

    (the power 2 dropped when ``squared=False``). The paper derives the unit-norm form from
    distillation with input noise under cross-entropy (the Jacobians' scale is not matched, only
    their direction); with unit vectors the squared form equals ``2 - 2 cos(g_S, g_T)``.

    Shapes: ``grad_s``, ``grad_t`` ``(B, ...)`` of equal numel per sample → scalar. A zero
    gradient stays zero after normalisation (``eps`` guards the division).
    """
    if grad_s.shape[0] != grad_t.shape[0]:
        raise ValueError(f"batch sizes differ: {tuple(grad_s.shape)} vs {tuple(grad_t.shape)}")
    us, ut = normalize_per_sample(grad_s, eps), normalize_per_sample(grad_t, eps)
    if us.shape != ut.shape:
        raise ValueError(f"input-gradient sizes differ: {tuple(grad_s.shape)} vs {tuple(grad_t.shape)}")
    d2 = (ut - us).pow(2).sum(dim=1)
    per_sample = d2 if squared else d2.clamp_min(1e-24).sqrt()
    return per_sample.mean()


def knowledge_projection_loss(student: Tensor, projected_teacher: Tensor) -> Tensor:
    r"""Knowledge-projection hint loss (Zhang, Ning & He 2017, arXiv 1710.09505).

    .. math:: L_{KP} = \frac{1}{B} \sum_b \bigl\lVert F_S(x_b) - P(F_T(x_b)) \bigr\rVert_2^2

    ``P`` is the knowledge-projection layer (a trainable 1x1 convolution, the projection matrix,
    followed by ReLU) mapping the teacher's ``M``-channel feature to the student layer's
    ``N < M`` channels; the method applies it and passes ``P(F_T)`` here.

    Shapes: ``student``, ``projected_teacher`` ``(B, ...)``, equal → scalar (sum over features,
    mean over the batch).
    """
    if student.shape != projected_teacher.shape:
        raise ValueError(f"shapes differ: {tuple(student.shape)} vs {tuple(projected_teacher.shape)}")
    return (student - projected_teacher).pow(2).reshape(student.shape[0], -1).sum(dim=1).mean()
