"""The math of the semantic-segmentation distillation methods (issue 14).

Structured KD (pixel-wise, pair-wise and the Wasserstein critic of the holistic term), Knowledge
Adaptation (normalised latent matching, affinity), IFVD (intra-class feature variation), CIRKD
(cross-image pixel-to-pixel and memory-based pixel/region similarity distributions) and Graph Flow
(channel-salience vertices and cross-layer edges).

Conventions: score / feature maps are ``(B, C, H, W)``; label maps are ``(B, H, W)`` long with
``ignore_index`` (255) on unlabelled pixels; nothing here detaches the teacher (the methods pass
detached tensors) and nothing here owns state: discriminators, auto-encoders, projection heads and
memory banks live in :mod:`distill.methods.dense_seg`, which pass their outputs in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.functional._precision import fp32

__all__ = [
    "seg_resize_labels",
    "seg_pixel_kd_loss",
    "spatial_cosine_affinity",
    "skd_pool_nodes",
    "skd_pairwise_loss",
    "wgan_critic_loss",
    "wgan_generator_loss",
    "wgan_gradient_penalty",
    "feature_reconstruction_loss",
    "ka_adaptation_loss",
    "ka_affinity_loss",
    "ifvd_variation_map",
    "ifvd_loss",
    "cirkd_minibatch_pixel_loss",
    "cirkd_memory_loss",
    "graph_flow_vertices",
    "graph_flow_edges",
    "graph_flow_losses",
]

_EPS = 1e-8


def _map(x: Tensor, name: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"{name} must be a (B, C, H, W) map, got {tuple(x.shape)}")


def _same(a: Tensor, b: Tensor, what: str) -> None:
    _map(a, f"{what}: the student map")
    _map(b, f"{what}: the teacher map")
    if a.shape != b.shape:
        raise ValueError(f"{what} needs equal shapes (resize/adapt the student first), got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")


def _same_grid(a: Tensor, b: Tensor, what: str) -> None:
    _map(a, f"{what}: the student map")
    _map(b, f"{what}: the teacher map")
    if a.shape[0] != b.shape[0] or a.shape[-2:] != b.shape[-2:]:
        raise ValueError(f"{what} needs the same batch size and H x W (channels may differ), got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")


def seg_resize_labels(labels: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest-neighbour resize of a label map ``(B, H, W)`` to ``size = (h, w)`` → ``(B, h, w)`` long.

    Nearest keeps labels (and the ignore value) exact, as IFVD's and CIRKD's code downsample them.
    """
    if labels.dim() != 3:
        raise ValueError(f"labels must be a (B, H, W) map, got {tuple(labels.shape)}")
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels.long()
    return F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()


# --------------------------------------------------------------------------------------------
# Structured KD (Liu et al., CVPR 2019, arXiv 1903.04197)
# --------------------------------------------------------------------------------------------


def seg_pixel_kd_loss(student: Tensor, teacher: Tensor, tau: float = 1.0) -> Tensor:
    r"""Pixel-wise distillation: the per-pixel KL of class distributions, averaged over pixels and images.

    .. math::
        L_{pi} = \frac{\tau^2}{B\,H W} \sum_{b} \sum_{i=1}^{H W}
        \mathrm{KL}\big(\sigma(z^T_{b,:,i}/\tau) \,\|\, \sigma(z^S_{b,:,i}/\tau)\big)

    ``student``, ``teacher``: score maps ``(B, K, H, W)`` of equal shape → scalar; σ is the softmax
    over the K classes at each pixel.

    Paper: Liu, Chen, Liu, Qin, Luo, Wang, "Structured Knowledge Distillation for Semantic
    Segmentation", CVPR 2019, arXiv 1903.04197 (ℓ_pi: 1/(W'H') Σ_i KL over the pixels of one
    image; no temperature, i.e. τ = 1). The authors' code (``CriterionPixelWise``) computes the
    cross-entropy −Σ p^T log p^S (KL plus the teacher's entropy, a constant: same gradient) summed
    over the batch and divided by H·W only, i.e. B times this mean.
    """
    _same(student, teacher, "seg_pixel_kd_loss")
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    log_ps = F.log_softmax(fp32(student) / tau, dim=1)
    log_pt = F.log_softmax(fp32(teacher) / tau, dim=1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=1)  # (B, H, W)
    return kl.mean() * (tau * tau)


def spatial_cosine_affinity(feature: Tensor) -> Tensor:
    r"""Cosine similarity of every pair of positions: ``(B, C, H, W) → (B, N, N)``, N = H·W.

    .. math:: a_{ij} = \frac{f_i^\top f_j}{(\lVert f_i \rVert_2 + \epsilon)(\lVert f_j \rVert_2 + \epsilon)}

    ``f_i`` is the C-vector at position i (row-major); ε = 1e-8 as SKD's code (``L2``).
    """
    _map(feature, "spatial_cosine_affinity")
    f = fp32(feature).flatten(2)  # (B, C, N)
    f = f / (f.norm(dim=1, keepdim=True) + _EPS)
    return torch.bmm(f.transpose(1, 2), f)


def skd_pool_nodes(feature: Tensor, pool_scale: float = 0.5) -> Tensor:
    """SKD's graph nodes: max-pool ``(B, C, H, W)`` with a ``⌊H·s⌋ x ⌊W·s⌋`` window and stride
    (``ceil_mode``), s = ``pool_scale`` in (0, 1]; each node summarises one patch.

    With s = 0.5 a map becomes 2x2 nodes: the authors' ``CriterionPairWiseforWholeFeatAfterPool``
    (``--pool-scale 0.5``). s small enough that the window is 1 keeps every position a node.
    """
    _map(feature, "skd_pool_nodes")
    if not 0.0 < pool_scale <= 1.0:
        raise ValueError(f"pool_scale must be in (0, 1], got {pool_scale}")
    kh, kw = max(1, int(feature.shape[2] * pool_scale)), max(1, int(feature.shape[3] * pool_scale))
    if kh == 1 and kw == 1:
        return feature
    return F.max_pool2d(feature, kernel_size=(kh, kw), stride=(kh, kw), ceil_mode=True)


def skd_pairwise_loss(student: Tensor, teacher: Tensor, pool_scale: float = 0.5) -> Tensor:
    r"""Pair-wise distillation: squared differences of the node-to-node cosine similarities.

    .. math::
        L_{pa} = \frac{1}{B} \sum_b \frac{1}{N^2} \sum_{i=1}^{N} \sum_{j=1}^{N} \big(a^S_{b,ij} - a^T_{b,ij}\big)^2

    Nodes are :func:`skd_pool_nodes` of each map, ``a`` their :func:`spatial_cosine_affinity`.
    ``student`` ``(B, C_s, H, W)``, ``teacher`` ``(B, C_t, H, W)`` (channels may differ: only N x N
    similarities are compared) → scalar.

    Paper: arXiv 1903.04197 (ℓ_pa = 1/(W'H')² Σ_i Σ_j (a^s_ij − a^t_ij)² per image); the authors'
    ``sim_dis_compute`` divides by (W'H')² and by B, as here.
    """
    _same_grid(student, teacher, "skd_pairwise_loss")
    a_s = spatial_cosine_affinity(skd_pool_nodes(student, pool_scale))
    a_t = spatial_cosine_affinity(skd_pool_nodes(teacher, pool_scale))
    n = a_s.shape[-1]
    return (a_s - a_t).pow(2).sum() / (n * n * student.shape[0])


def wgan_critic_loss(real_scores: Tensor, fake_scores: Tensor) -> Tensor:
    r"""The Wasserstein critic's loss (to minimise): :math:`\frac1B\sum D(\text{fake}) - \frac1B\sum D(\text{real})`.

    ``real_scores`` (B,) the critic on the teacher's maps, ``fake_scores`` (B,) on the student's →
    scalar. Its negative estimates the Wasserstein-1 distance (Arjovsky et al. 2017, arXiv 1701.07875).
    """
    return fp32(fake_scores).mean() - fp32(real_scores).mean()


def wgan_generator_loss(fake_scores: Tensor) -> Tensor:
    r"""The generator's (student's) Wasserstein loss: :math:`-\frac1B\sum_b D(\text{fake}_b)`."""
    return -fp32(fake_scores).mean()


def wgan_gradient_penalty(critic: Callable[[Tensor], Tensor], real: Tensor, fake: Tensor, alpha: Tensor) -> Tensor:
    r"""WGAN-GP's penalty (Gulrajani et al., 2017, arXiv 1704.00028) at points between real and fake.

    .. math::
        \hat x_b = \alpha_b\, x^{real}_b + (1 - \alpha_b)\, x^{fake}_b, \qquad
        GP = \frac1B \sum_b \big(\lVert \nabla_{\hat x} D(\hat x)_b \rVert_2 - 1\big)^2

    ``real``, ``fake``: ``(B, ...)`` (both are detached here: the penalty trains the critic only);
    ``alpha``: ``(B,)`` in [0, 1]; ``critic`` maps ``(B, ...)`` to ``(B,)`` scores → scalar, with a
    graph through the critic's parameters (``create_graph=True``), as SKD's ``CriterionAdditionalGP``.
    """
    if real.shape != fake.shape:
        raise ValueError(f"wgan_gradient_penalty needs equal shapes, got {tuple(real.shape)} and {tuple(fake.shape)}")
    if alpha.shape != (real.shape[0],):
        raise ValueError(f"alpha must be ({real.shape[0]},), got {tuple(alpha.shape)}")
    a = alpha.to(real.dtype).reshape(-1, *([1] * (real.dim() - 1)))
    x = (a * real.detach() + (1 - a) * fake.detach()).requires_grad_(True)
    with torch.enable_grad():
        scores = critic(x)
        (grad,) = torch.autograd.grad(scores.sum(), x, create_graph=True)
    norm = grad.flatten(1).norm(dim=1)
    return (norm - 1).pow(2).mean()


# --------------------------------------------------------------------------------------------
# Knowledge Adaptation (He et al., CVPR 2019, arXiv 1903.04688)
# --------------------------------------------------------------------------------------------


def feature_reconstruction_loss(reconstruction: Tensor, target: Tensor) -> Tensor:
    r"""An auto-encoder's reconstruction error: :math:`\frac{1}{B C H W}\lVert D(E(F)) - F\rVert_2^2`.

    ``reconstruction``, ``target`` ``(B, C, H, W)`` → scalar (the mean squared error). Trains
    Knowledge Adaptation's teacher auto-encoder and Graph Flow's paraphraser (their first stage).
    """
    _same(reconstruction, target, "feature_reconstruction_loss")
    return (fp32(reconstruction) - fp32(target)).pow(2).mean()


def ka_adaptation_loss(adapted: Tensor, latent: Tensor, p: float = 2.0) -> Tensor:
    r"""Knowledge Adaptation's feature loss: normalised adapted student vs the teacher's latent code.

    .. math::
        L_{adapt} = \frac{1}{B} \sum_{b=1}^{B} \Big\lVert \frac{E(F^T_b)}{\lVert E(F^T_b) \rVert_2}
        - \frac{C_f(F^S_b)}{\lVert C_f(F^S_b) \rVert_2} \Big\rVert_p

    ``adapted`` = C_f(F^S) (the student's adaptation unit), ``latent`` = E(F^T) (the frozen
    encoder on the teacher's feature), both ``(B, C', H, W)``, each sample normalised as one vector
    → scalar. p = 2 by default.
    """
    _same(adapted, latent, "ka_adaptation_loss")
    if p <= 0:
        raise ValueError(f"p must be > 0, got {p}")
    s = F.normalize(fp32(adapted).flatten(1), dim=1)
    t = F.normalize(fp32(latent).flatten(1), dim=1)
    return (s - t).abs().pow(p).sum(dim=1).pow(1.0 / p).mean()


def ka_affinity_loss(student: Tensor, teacher: Tensor) -> Tensor:
    r"""Knowledge Adaptation's affinity distillation: the squared difference of the position-affinity
    matrices, averaged over the N² entries and the batch.

    .. math::
        L_{aff} = \frac{1}{B\,N^2} \sum_b \sum_{i,j} \big(A^S_{b,ij} - A^T_{b,ij}\big)^2,
        \qquad A = \text{spatial\_cosine\_affinity}

    ``student`` (the adapted student map) and ``teacher`` (the teacher's latent code): ``(B, C_s, H, W)``
    and ``(B, C_t, H, W)`` on one grid → scalar. Every position is a node (the non-local,
    whole-image interactions of the paper's affinity module; SKD pools patches first).
    """
    _same_grid(student, teacher, "ka_affinity_loss")
    a_s, a_t = spatial_cosine_affinity(student), spatial_cosine_affinity(teacher)
    return (a_s - a_t).pow(2).mean()


# --------------------------------------------------------------------------------------------
# IFVD (Wang et al., ECCV 2020)
# --------------------------------------------------------------------------------------------


def ifvd_variation_map(feature: Tensor, labels: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    r"""The intra-class feature variation map: each pixel's cosine similarity to its class prototype.

    .. math::
        c_{b,k} = \frac{\sum_{i: y_{b,i} = k} f_{b,i}}{|\{i: y_{b,i} = k\}|}, \qquad
        M_{b,i} = \cos\big(f_{b,i},\, c_{b, y_{b,i}}\big)

    ``feature`` ``(B, C, H, W)``, ``labels`` ``(B, H, W)`` at the feature's resolution, classes in
    ``[0, num_classes)`` or ``ignore_index`` → ``(B, H, W)``. Prototypes are per image (the
    authors' ``CriterionIFV`` averages each class over each image's pixels). An ignored pixel has no
    prototype: its value is 1 (its cosine with itself), and :func:`ifvd_loss` leaves it out.
    """
    _map(feature, "ifvd_variation_map")
    if labels.shape != (feature.shape[0], *feature.shape[-2:]):
        raise ValueError(f"labels must be (B, H, W) = {(feature.shape[0], *feature.shape[-2:])} (resize them to the "
                         f"feature map first), got {tuple(labels.shape)}")
    labels = labels.long()
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        raise ValueError(f"labels must be in [0, {num_classes}) or {ignore_index}; found "
                         f"{sorted(set(labels[bad].unique().tolist()))[:5]}")
    f = fp32(feature).flatten(2)  # (B, C, N)
    y = labels.flatten(1)  # (B, N)
    valid = y != ignore_index
    onehot = F.one_hot(torch.where(valid, y, 0), num_classes).to(f.dtype) * valid[..., None]  # (B, N, K)
    counts = onehot.sum(dim=1)  # (B, K)
    protos = torch.bmm(f, onehot) / counts.clamp_min(1)[:, None, :]  # (B, C, K)
    per_pixel = torch.bmm(protos, onehot.transpose(1, 2))  # (B, C, N): the prototype of each pixel's class
    per_pixel = torch.where(valid[:, None, :], per_pixel, f)
    cos = F.cosine_similarity(f, per_pixel, dim=1, eps=_EPS)
    return cos.reshape(labels.shape)


def ifvd_loss(student: Tensor, teacher: Tensor, labels: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    r"""IFVD: the mean squared difference of the student's and the teacher's IFV maps over labelled pixels.

    .. math:: L_{ifv} = \frac{1}{|\Omega|} \sum_{(b,i) \in \Omega} \big(M^S_{b,i} - M^T_{b,i}\big)^2,
        \quad \Omega = \{(b, i): y_{b,i} \ne \text{ignore}\}

    ``student`` ``(B, C_s, H, W)``, ``teacher`` ``(B, C_t, H, W)`` (channels may differ: the map is
    a cosine per pixel), ``labels`` ``(B, H, W)`` at that resolution → scalar (0, with a graph,
    when every pixel is ignored). The authors' code takes ``nn.MSELoss`` over all pixels, ignored
    ones included (both maps are 1 there): the same sum divided by every pixel instead of |Ω|.
    """
    _same_grid(student, teacher, "ifvd_loss")
    m_s = ifvd_variation_map(student, labels, num_classes, ignore_index)
    m_t = ifvd_variation_map(teacher, labels, num_classes, ignore_index)
    valid = labels != ignore_index
    if not bool(valid.any()):
        return m_s.sum() * 0.0
    return (m_s - m_t)[valid].pow(2).mean()


# --------------------------------------------------------------------------------------------
# CIRKD (Yang et al., CVPR 2022, arXiv 2204.06986)
# --------------------------------------------------------------------------------------------


def cirkd_minibatch_pixel_loss(student: Tensor, teacher: Tensor, tau: float = 0.1) -> Tensor:
    r"""CIRKD's mini-batch pixel-to-pixel distillation across every ordered pair of images.

    .. math::
        S_{ij} = \hat s_i^\top \hat s_j \in \mathbb R^{N\times N}, \quad
        L = \frac{1}{B^2} \sum_{i,j=1}^{B} \frac{1}{N} \sum_{n=1}^{N}
        \mathrm{KL}\big(\sigma(T_{ij,n}/\tau) \,\|\, \sigma(S_{ij,n}/\tau)\big)

    ``ŝ``: the student's ``(B, C_s, H, W)`` map with each position's C-vector ℓ2-normalised,
    flattened to ``(B, N, C_s)``; T the same on the teacher's ``(B, C_t, H, W)`` (channels may
    differ); row n of S_ij holds pixel n of image i against every pixel of image j, and σ is the
    softmax over that row → scalar. No τ² factor (the authors' ``CriterionMiniBatchCrossImagePair``:
    ``kl_div(..., 'batchmean')`` per pair, summed, divided by B²; τ = 0.1).
    """
    _same_grid(student, teacher, "cirkd_minibatch_pixel_loss")
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    s = F.normalize(fp32(student).flatten(2), dim=1).transpose(1, 2)  # (B, N, C)
    t = F.normalize(fp32(teacher).flatten(2), dim=1).transpose(1, 2)
    total = s.new_zeros(())
    for i in range(s.shape[0]):  # one image against the batch at a time: (B, N, N), not (B, B, N, N), in memory
        log_ps = F.log_softmax(torch.einsum("nc,jmc->jnm", s[i], s) / tau, dim=-1)
        log_pt = F.log_softmax(torch.einsum("nc,jmc->jnm", t[i], t) / tau, dim=-1)
        total = total + (log_pt.exp() * (log_pt - log_ps)).sum(dim=-1).mean(dim=-1).sum()
    return total / (student.shape[0] ** 2)


def cirkd_memory_loss(student: Tensor, teacher: Tensor, contrast: Tensor, tau: float = 0.1,
                      kd_tau: float = 1.0) -> Tensor:
    r"""CIRKD's memory-based distillation: match the distributions of similarities to a bank of teacher embeddings.

    .. math::
        p^X_m = \sigma\Big(\frac{x_m^\top Q^\top}{\tau\, \tau_{kd}}\Big), \qquad
        L = \frac{\tau_{kd}^2}{M} \sum_{m=1}^{M} \mathrm{KL}(p^T_m \,\|\, p^S_m)

    ``student`` ``(M, D)`` (projected, ℓ2-normalised student pixel embeddings), ``teacher`` ``(M, D)``
    (ℓ2-normalised teacher embeddings of the same pixels), ``contrast`` = Q ``(R, D)`` the sampled
    bank entries (pixel embeddings for pixel-to-pixel, class-region means for pixel-to-region)
    → scalar. τ = 0.1 (``--contrast-temperature``), τ_kd = 1 (``--contrast-kd-temperature``): the
    authors' ``StudentSegContrast.contrast_sim_kd``.
    """
    if student.dim() != 2 or student.shape != teacher.shape or contrast.dim() != 2 or contrast.shape[1] != student.shape[1]:
        raise ValueError(f"cirkd_memory_loss needs student/teacher (M, D) and contrast (R, D), got "
                         f"{tuple(student.shape)}, {tuple(teacher.shape)}, {tuple(contrast.shape)}")
    if tau <= 0 or kd_tau <= 0:
        raise ValueError(f"tau and kd_tau must be > 0, got {tau}, {kd_tau}")
    q = fp32(contrast)
    log_ps = F.log_softmax(fp32(student) @ q.t() / (tau * kd_tau), dim=1)
    log_pt = F.log_softmax(fp32(teacher) @ q.t() / (tau * kd_tau), dim=1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=1)
    return kl.mean() * (kd_tau * kd_tau)


# --------------------------------------------------------------------------------------------
# Graph Flow (Zou et al., IEEE TMI 2022, arXiv 2203.08667)
# --------------------------------------------------------------------------------------------


def graph_flow_vertices(feature: Tensor) -> Tensor:
    r"""A layer's vertices: its channel-wise salience, the ℓ2-normalised global average of each channel.

    .. math:: v_c = \frac{1}{HW}\sum_{i} F_{c,i}, \qquad \hat v = v / \lVert v \rVert_2

    ``(B, C, H, W) → (B, C)``.
    """
    _map(feature, "graph_flow_vertices")
    return F.normalize(fp32(feature).mean(dim=(2, 3)), dim=1, eps=_EPS)


def graph_flow_edges(shallow: Tensor, deep: Tensor) -> Tensor:
    r"""The flow between two layers: cosine similarity of every (shallow channel, deep channel) pair of maps.

    .. math:: E_{cd} = \frac{\langle F^{l}_c, F^{l+1}_d \rangle}{\lVert F^{l}_c \rVert_2\, \lVert F^{l+1}_d \rVert_2}

    ``shallow`` ``(B, C_l, H_l, W_l)``, ``deep`` ``(B, C_{l+1}, H, W)``; the larger map is
    average-pooled to the smaller's size first (``adaptive_avg_pool2d``) → ``(B, C_l, C_{l+1})``.
    Like FSP's Gram matrix (Yim et al. 2017) but normalised per channel map.
    """
    _map(shallow, "graph_flow_edges: shallow")
    _map(deep, "graph_flow_edges: deep")
    if shallow.shape[0] != deep.shape[0]:
        raise ValueError(f"batch sizes differ: {tuple(shallow.shape)} and {tuple(deep.shape)}")
    h, w = min(shallow.shape[2], deep.shape[2]), min(shallow.shape[3], deep.shape[3])
    a = fp32(F.adaptive_avg_pool2d(shallow, (h, w)) if shallow.shape[-2:] != (h, w) else shallow)
    b = fp32(F.adaptive_avg_pool2d(deep, (h, w)) if deep.shape[-2:] != (h, w) else deep)
    a = F.normalize(a.flatten(2), dim=2, eps=_EPS)
    b = F.normalize(b.flatten(2), dim=2, eps=_EPS)
    return torch.bmm(a, b.transpose(1, 2))


def graph_flow_losses(student: Sequence[Tensor], teacher: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    r"""Graph Flow's two terms over L layers (shallow to deep): vertices and cross-layer edges.

    .. math::
        L_V = \frac{1}{L} \sum_{l=1}^{L} \frac{1}{B} \sum_b \lVert \hat v^S_{b,l} - \hat v^T_{b,l} \rVert_2^2,
        \qquad
        L_E = \frac{1}{L-1} \sum_{l=1}^{L-1} \frac{1}{B\,C_l C_{l+1}} \sum_b
        \lVert E^S_{b,l} - E^T_{b,l} \rVert_F^2

    ``student[l]`` and ``teacher[l]``: ``(B, C_l, H_l, W_l)`` with equal channels per layer (the
    method maps the teacher's layers to the student's widths with its paraphraser encoders first),
    ``L >= 2`` → ``(L_V, L_E)``, :func:`graph_flow_vertices` and :func:`graph_flow_edges`.
    """
    if len(student) != len(teacher) or len(student) < 2:
        raise ValueError(f"graph_flow_losses needs the same number (>= 2) of student and teacher layers, got "
                         f"{len(student)} and {len(teacher)}")
    for l, (s, t) in enumerate(zip(student, teacher)):
        _map(s, f"graph_flow_losses: student layer {l}")
        _map(t, f"graph_flow_losses: teacher layer {l}")
        if s.shape[:2] != t.shape[:2]:
            raise ValueError(f"layer {l}: student {tuple(s.shape)} and teacher {tuple(t.shape)} need the same batch "
                             "size and channels (paraphrase the teacher first)")
    vertices = torch.stack([(graph_flow_vertices(s) - graph_flow_vertices(t)).pow(2).sum(dim=1).mean()
                            for s, t in zip(student, teacher)]).mean()
    edges = torch.stack([(graph_flow_edges(student[l], student[l + 1])
                          - graph_flow_edges(teacher[l], teacher[l + 1])).pow(2).mean()
                         for l in range(len(student) - 1)]).mean()
    return vertices, edges
