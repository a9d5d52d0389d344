"""The matching objectives of dataset condensation: gradient matching (DC, DSA) and distribution
matching (DM), as pure functions of tensors.

* B. Zhao, K. R. Mopuri, H. Bilen, "Dataset Condensation with Gradient Matching", ICLR 2021,
  arXiv 2006.05929 (DC): the synthetic set is learned so that a network's gradients on it match
  its gradients on real data, class by class, under the layer-wise distance
  :func:`gradient_match_distance`.
* B. Zhao, H. Bilen, "Dataset Condensation with Differentiable Siamese Augmentation", ICML 2021,
  arXiv 2102.08259 (DSA): the same distance, with one augmentation applied to both batches.
* B. Zhao, H. Bilen, "Dataset Condensation with Distribution Matching", WACV 2023,
  arXiv 2110.04181 (DM): the squared distance between the mean embeddings of real and synthetic
  images under randomly initialised networks, :func:`mean_embedding_discrepancy`.

The loops that use them are in :mod:`distill.synthesis.matching`.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

__all__ = ["gradient_layer_distance", "gradient_match_distance", "mean_embedding_discrepancy"]


def gradient_layer_distance(a: Tensor, b: Tensor, eps: float = 1e-6) -> Tensor:
    """DC's distance between two gradients of one layer's weight (arXiv 2006.05929):

        d(A, B) = sum_{i=1}^{out} (1 - A_i . B_i / (||A_i|| ||B_i||))

    where ``A_i``, ``B_i`` are the flattened gradients of output node ``i``: a linear weight
    ``(out, in)`` gives ``out`` rows of ``in`` numbers, a convolution ``(out, in, kh, kw)`` gives
    ``out`` rows of ``in * kh * kw``; any weight of 2 or more dimensions is reshaped to
    ``(shape[0], -1)``. The sum (not the mean) over output nodes is the paper's.

    One-dimensional tensors (biases, normalisation scales and shifts) have no output-node
    structure and contribute 0, as in the authors' code (``utils.distance_wb``); the paper
    matches the layers' weights. ``eps`` guards the division when a row's gradient is zero
    (the product of the norms is clamped at ``eps``; the authors add ``1e-6`` to it instead,
    which differs from ours by a relative 1e-6 / (||A_i|| ||B_i||)).

    Args:
        a, b: two gradients of the same shape.
        eps: smallest value of ``||A_i|| ||B_i||``.

    Returns:
        A scalar tensor, ``0 <= d <= 2 * out``; differentiable in both arguments.
    """
    if a.shape != b.shape:
        raise ValueError(f"gradient_layer_distance: the two gradients must have one shape; got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    if a.dim() < 2:
        return a.new_zeros(())
    a2, b2 = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    cos = (a2 * b2).sum(-1) / (a2.norm(dim=-1) * b2.norm(dim=-1)).clamp_min(eps)
    return (1.0 - cos).sum()


def gradient_match_distance(grads_syn: Sequence[Tensor], grads_real: Sequence[Tensor],
                            eps: float = 1e-6) -> Tensor:
    """DC's matching loss D(grad L^S, grad L^T) = sum over layers l of
    :func:`gradient_layer_distance` (arXiv 2006.05929).

    Args:
        grads_syn: the gradients of the loss on synthetic images, one per parameter (the order
            of ``model.parameters()``); keep their graph (``create_graph=True``) to learn images.
        grads_real: the same parameters' gradients on real images (usually detached).
        eps: see :func:`gradient_layer_distance`.

    Returns:
        A scalar tensor.
    """
    if len(grads_syn) != len(grads_real):
        raise ValueError(f"gradient_match_distance: {len(grads_syn)} synthetic gradients but "
                         f"{len(grads_real)} real ones; pass one per parameter, in the same order")
    if not grads_syn:
        raise ValueError("gradient_match_distance: no gradients given")
    total = grads_syn[0].new_zeros(())
    for gs, gr in zip(grads_syn, grads_real):
        total = total + gradient_layer_distance(gs, gr, eps)
    return total


def mean_embedding_discrepancy(real: Tensor, syn: Tensor) -> Tensor:
    """DM's loss for one class and one embedding network (arXiv 2110.04181):

        || (1/|T|) sum_i psi(x_i) - (1/|S|) sum_j psi(s_j) ||_2^2

    the squared Euclidean distance between the mean embeddings (the empirical MMD with a linear
    kernel). ``real`` is usually computed without gradient.

    Args:
        real: embeddings ``(N, D)`` of real images of one class.
        syn: embeddings ``(M, D)`` of that class's synthetic images.

    Returns:
        A scalar tensor.
    """
    if real.dim() != 2 or syn.dim() != 2 or real.shape[1] != syn.shape[1]:
        raise ValueError(f"mean_embedding_discrepancy: expects embeddings (N, D) and (M, D) with one D; got "
                         f"{tuple(real.shape)} and {tuple(syn.shape)}")
    if real.shape[0] == 0 or syn.shape[0] == 0:
        raise ValueError("mean_embedding_discrepancy: an empty batch has no mean embedding")
    return (real.mean(0) - syn.mean(0)).pow(2).sum()

