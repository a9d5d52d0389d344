r"""The math of BINGO: bags of instances from a teacher's embedding space, and the contrastive loss
that aggregates the student's embeddings of a bag towards the teacher's.

Paper: H. Xu, J. Fang, X. Zhang, L. Xie, X. Wang, W. Dai, H. Xiong, Q. Tian, "Bag of Instances
Aggregation Boosts Self-supervised Distillation", ICLR 2022, arXiv 2107.01691; the authors' code is
github.com/haohang96/bingo (``compute_knn.py``, ``main_moco.py``, ``moco/builder.py``). Only the
paper's abstract could be read here, so the formulas below are the authors' code's, written out.

* A **bag** of anchor ``i`` holds its ``k`` nearest neighbours in the frozen teacher's embedding
  space (L2-normalised features, so nearest = highest cosine similarity), the anchor excluded
  (:func:`knn_bags`).
* The teacher of our examples is pre-trained without labels with SimCLR's NT-Xent
  (:func:`nt_xent_loss`).
* The loss (:func:`bingo_loss`) is an InfoNCE with a memory queue of teacher keys as negatives
  (:func:`bag_contrastive_loss`), between the student's queries of the anchor, of one bag member
  and of their CutMix (:func:`cutmix_pair`) and the teacher's keys of the anchor and of the member.

Nothing here detaches the teacher (the strategy passes detached keys); no state, no modules.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.functional._precision import fp32

__all__ = ["bag_contrastive_loss", "bingo_loss", "cutmix_pair", "knn_bags", "nt_xent_loss"]


def knn_bags(features: Tensor, k: int, *, chunk_size: int = 512) -> Tensor:
    r"""Each sample's bag: the indices of its ``k`` nearest neighbours by cosine similarity.

    .. math:: \Omega_i = \operatorname{top-}k_{j \ne i}\; \frac{f_i \cdot f_j}{\|f_i\|\,\|f_j\|}

    (on L2-normalised features this is the ``k`` smallest Euclidean distances, the authors' faiss
    ``IndexFlatL2`` search, which drops the first hit as the sample itself; here the sample itself is
    masked out, so an exact duplicate of it can be a neighbour).

    Args:
        features: the teacher's embeddings of the whole data set ``(N, D)``.
        k: bag size (neighbours per sample, ``1 <= k < N``).
        chunk_size: rows of the ``(chunk, N)`` similarity sorted at once (memory ~ 16·chunk·N bytes).

    Returns:
        ``(N, k)`` long, most similar first (ties: lower index first).
    """
    if features.dim() != 2:
        raise ValueError(f"knn_bags needs features (N, D), got {tuple(features.shape)}")
    n = features.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < n:
        raise ValueError(f"k must be an int in [1, N - 1] = [1, {n - 1}], got {k!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    f = F.normalize(fp32(features), dim=1)
    out = torch.empty(n, k, dtype=torch.long, device=features.device)
    for start in range(0, n, chunk_size):
        sim = f[start:start + chunk_size] @ f.T  # (c, N)
        rows = torch.arange(sim.shape[0], device=sim.device)
        sim[rows, rows + start] = -math.inf
        # a stable descending sort puts equal similarities in index order (deterministic bags)
        out[start:start + chunk_size] = torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :k]
    return out


def bag_contrastive_loss(query: Tensor, keys: Tensor, queue: Tensor, weights: Tensor, tau: float = 0.2) -> Tensor:
    r"""InfoNCE of one student query against several positive teacher keys, each weighted.

    With :math:`\hat q, \hat k_p, \hat n_j` the L2-normalised query, keys and queued negatives,

    .. math::
        \mathcal{L} = \frac{1}{B}\sum_{b=1}^{B}\sum_{p=1}^{P} w_{b,p}\,\Big(-\log
        \frac{\exp(\hat q_b \cdot \hat k_{b,p}/\tau)}{\exp(\hat q_b \cdot \hat k_{b,p}/\tau)
        + \sum_{j=1}^{K} \exp(\hat q_b \cdot \hat n_j/\tau)}\Big)

    (each positive is contrasted with the queue alone, not with the other positives: the authors'
    ``logits_q_nk`` and ``MulposCrossEntropy``).

    Args:
        query: the student's embeddings ``(B, D)``.
        keys: the teacher's positive keys ``(B, P, D)``.
        queue: negatives ``(K, D)`` (the memory queue of past teacher keys).
        weights: ``(P,)`` or ``(B, P)``, the weight of each positive.
        tau: temperature (> 0).

    Returns:
        a scalar.
    """
    if query.dim() != 2 or keys.dim() != 3 or keys.shape[0] != query.shape[0] or keys.shape[2] != query.shape[1]:
        raise ValueError(f"bag_contrastive_loss needs query (B, D) and keys (B, P, D), got {tuple(query.shape)} "
                         f"and {tuple(keys.shape)}")
    if queue.dim() != 2 or queue.shape[1] != query.shape[1]:
        raise ValueError(f"queue must be (K, D) with D = {query.shape[1]}, got {tuple(queue.shape)}")
    b, p = keys.shape[:2]
    if weights.shape not in ((p,), (b, p)):
        raise ValueError(f"weights must be (P,) = ({p},) or (B, P) = ({b}, {p}), got {tuple(weights.shape)}")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    q = F.normalize(fp32(query), dim=1)
    k = F.normalize(fp32(keys), dim=2)
    n = F.normalize(fp32(queue), dim=1)
    pos = torch.einsum("bd,bpd->bp", q, k) / tau  # (B, P)
    neg = torch.logsumexp(q @ n.T / tau, dim=1, keepdim=True)  # (B, 1): log Σ_j exp(q·n_j/τ)
    nll = torch.logaddexp(pos, neg) - pos  # (B, P): -log softmax of the positive among [pos, negatives]
    return (nll * fp32(weights).expand(b, p)).sum(1).mean()


def bingo_loss(s_anchor: Tensor, s_member: Tensor, t_anchor: Tensor, t_member: Tensor, queue: Tensor, *,
               s_mix: Tensor | None = None, mix_lam: Tensor | float | None = None, tau: float = 0.2,
               lam_self: float = 0.5, lam_cross: float = 0.5) -> Tensor:
    r"""BINGO's loss for a batch of anchors ``a`` and one bag member ``m`` of each.

    With :math:`\ell(q; k)` the queue-contrastive term of :func:`bag_contrastive_loss` (one positive),
    :math:`q_a, q_m` the student's queries of the anchor and the member, :math:`k_a, k_m` the teacher's
    keys and :math:`q_x` the student's query of the CutMix of the two images keeping a fraction
    :math:`\lambda` of the anchor,

    .. math::
        \mathcal{L} = \frac{1}{3}\Big[\lambda_s\,\ell(q_a; k_a) + \lambda_c\,\ell(q_a; k_m)
        + \lambda_c\,\ell(q_m; k_a) + \lambda_s\,\ell(q_m; k_m)
        + \lambda\,\ell(q_x; k_a) + (1 - \lambda)\,\ell(q_x; k_m)\Big]

    The terms pulling the member's query to the anchor's key and the anchor's to the member's are
    the bag aggregation (the paper's inter-sample distillation); the self terms its intra-sample
    distillation. Without ``s_mix`` the bracket has the four bag terms and is divided by 2.

    Args:
        s_anchor, s_member: the student's embeddings ``(B, D)``.
        t_anchor, t_member: the teacher's keys ``(B, D)`` (pass them detached).
        queue: negatives ``(K, D)``.
        s_mix: the student's embedding of the CutMix images ``(B, D)``, or ``None``.
        mix_lam: the anchor's share of each mixed image, a float or ``(B,)``.
        tau: temperature (0.2: the authors' ``moco_t``).
        lam_self, lam_cross: the weights of the own-key and the other-key terms (0.5 and 0.5: the
            authors' ``--lam=0.5,0.5``; their code uses 1 and 0 for the first 10 epochs).

    Returns:
        a scalar.
    """
    shapes = {tuple(t.shape) for t in (s_anchor, s_member, t_anchor, t_member)}
    if len(shapes) != 1 or s_anchor.dim() != 2:
        raise ValueError("bingo_loss needs four (B, D) tensors of one shape, got "
                         f"{[tuple(t.shape) for t in (s_anchor, s_member, t_anchor, t_member)]}")
    keys = torch.stack([t_anchor, t_member], 1)  # (B, 2, D)
    w = torch.tensor([[lam_self, lam_cross], [lam_cross, lam_self]], device=s_anchor.device)
    total = bag_contrastive_loss(s_anchor, keys, queue, w[0], tau) + bag_contrastive_loss(s_member, keys, queue,
                                                                                          w[1], tau)
    if s_mix is None:
        return total / 2
    if mix_lam is None:
        raise ValueError("s_mix needs mix_lam, the anchor's share of each mixed image")
    lam = torch.as_tensor(mix_lam, dtype=torch.float32, device=s_anchor.device).expand(s_anchor.shape[0])
    if s_mix.shape != s_anchor.shape:
        raise ValueError(f"s_mix must be {tuple(s_anchor.shape)}, got {tuple(s_mix.shape)}")
    return (total + bag_contrastive_loss(s_mix, keys, queue, torch.stack([lam, 1 - lam], 1), tau)) / 3


def cutmix_pair(x: Tensor, y: Tensor, lam: float, generator: torch.Generator | None = None) -> tuple[Tensor, float]:
    r"""CutMix of two image batches with one box: ``y``'s pixels pasted into ``x`` inside the box.

    The box (CutMix, Yun et al. ICCV 2019, arXiv 1905.04899) has sides ``W·√(1-λ)`` and ``H·√(1-λ)``
    around a uniformly drawn centre, clipped to the image; the returned share of ``x`` is
    ``1 - box area / (H·W)`` after clipping.

    Args:
        x, y: ``(B, C, H, W)`` of one shape.
        lam: the intended share of ``x`` in ``[0, 1]`` (BINGO's code draws it from Beta(2, 2)).
        generator: for the centre.

    Returns:
        ``(mixed (B, C, H, W), share of x)``.
    """
    if x.dim() != 4 or x.shape != y.shape:
        raise ValueError(f"cutmix_pair needs two (B, C, H, W) batches of one shape, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    h, w = x.shape[-2:]
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy = int(torch.randint(h, (1,), generator=generator))
    cx = int(torch.randint(w, (1,), generator=generator))
    y1, y2 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x1, x2 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    mixed = x.clone()
    mixed[..., y1:y2, x1:x2] = y[..., y1:y2, x1:x2]
    return mixed, 1.0 - (y2 - y1) * (x2 - x1) / (h * w)


def nt_xent_loss(z1: Tensor, z2: Tensor, tau: float = 0.5) -> Tensor:
    r"""SimCLR's NT-Xent over ``B`` positive pairs (the self-supervised pre-training of BINGO's teacher here).

    From "A Simple Framework for Contrastive Learning of Visual Representations" (Chen, Kornblith,
    Norouzi, Hinton, ICML 2020, arXiv 2002.05709). With the ``2B`` L2-normalised embeddings
    :math:`z = [z_1; z_2]` and :math:`j(i)` the other view of sample :math:`i`,

    .. math::
        \mathcal{L} = \frac{1}{2B}\sum_{i=1}^{2B} -\log
        \frac{\exp(z_i \cdot z_{j(i)}/\tau)}{\sum_{k \ne i} \exp(z_i \cdot z_k/\tau)}

    Args:
        z1, z2: the embeddings of the two views ``(B, D)``.
        tau: temperature (> 0).

    Returns:
        a scalar.
    """
    if z1.dim() != 2 or z1.shape != z2.shape or z1.shape[0] < 2:
        raise ValueError(f"nt_xent_loss needs two (B, D) tensors of one shape with B >= 2, got {tuple(z1.shape)} "
                         f"and {tuple(z2.shape)}")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    b = z1.shape[0]
    z = F.normalize(fp32(torch.cat([z1, z2])), dim=1)
    sim = z @ z.T / tau
    sim = sim.masked_fill(torch.eye(2 * b, dtype=torch.bool, device=z.device), -math.inf)
    other = torch.cat([torch.arange(b, 2 * b), torch.arange(b)]).to(z.device)
    return F.cross_entropy(sim, other)
