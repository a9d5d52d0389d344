r"""Contrastive representation distillation (CRD): the NCE critic, its memory bank and sampling.

Paper: Tian, Krishnan, Isola, "Contrastive Representation Distillation", ICLR 2020,
arXiv 1910.10699; reference code: HobbitLong/RepDistiller (``crd/``).

Conventions:

* ``anchor``: ``(B, D)`` L2-normalised embeddings of the current batch (one side, with gradient).
* ``memory``: ``(M, D)`` memory bank of the *other* side, one row per training sample
  (M = data-set size); never differentiated.
* ``index``: ``(B, K + 1)`` rows of the bank to contrast with; column 0 is the positive (the
  anchor's own sample), columns 1..K the negatives.
* ``logits``: ``(B, K + 1)`` scores :math:`\langle m_i, v \rangle / \tau`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "crd_init_memory",
    "CRDClassLayout",
    "crd_class_layout",
    "crd_sample_indices",
    "crd_scores",
    "crd_log_z",
    "crd_nce_loss",
    "crd_memory_update",
]


def crd_init_memory(
    num_data: int, feat_dim: int, generator: torch.Generator | None = None, dtype: torch.dtype | None = None
) -> Tensor:
    r"""A fresh memory bank ``(M, D)``: entries i.i.d. uniform on :math:`[-a, a]`, :math:`a = 1/\sqrt{D/3}`.

    This is the reference's initialisation (``ContrastMemory``): with this ``a`` each row has
    expected squared norm :math:`D \cdot a^2 / 3 = 1`. The rows are not normalised; the first
    momentum update of a row normalises it.
    """
    if num_data < 1 or feat_dim < 1:
        raise ValueError(f"memory bank size must be positive, got ({num_data}, {feat_dim})")
    a = 1.0 / math.sqrt(feat_dim / 3.0)
    u = torch.rand(num_data, feat_dim, generator=generator, dtype=dtype or torch.get_default_dtype())
    return u.mul_(2 * a).sub_(a)


class CRDClassLayout(NamedTuple):
    """The class structure of a training set, for ``negatives="other_class"`` sampling."""

    labels: Tensor  # (M,) int64
    order: Tensor  # (M,) sample indices sorted by class (stable)
    starts: Tensor  # (C,) each class's first position in ``order``
    counts: Tensor  # (C,) each class's size
    min_pool: int  # the fewest negatives any sample can draw from (M minus the largest class)
    max_pool: int  # the most (M minus the smallest non-empty class)

    def to(self, device: torch.device | str) -> CRDClassLayout:
        return self._replace(**{k: getattr(self, k).to(device) for k in ("labels", "order", "starts", "counts")})


def crd_class_layout(labels: Tensor) -> CRDClassLayout:
    """Precompute the class structure of the training labels ``(M,)`` (non-negative integers).

    Pass it as ``layout`` to :func:`crd_sample_indices` so the labels are not re-sorted every
    step. Needs at least two classes (otherwise no sample has a negative).
    """
    labels = labels.detach().long().reshape(-1)
    if labels.numel() == 0:
        raise ValueError("labels is empty")
    if int(labels.min()) < 0:
        raise ValueError(f"labels must be >= 0, got min {int(labels.min())}")
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels)
    starts = torch.cumsum(counts, 0) - counts
    present = counts[counts > 0]
    if present.numel() < 2:
        raise ValueError("negatives='other_class' needs at least two classes in the training labels")
    m = labels.numel()
    return CRDClassLayout(labels, order, starts, counts, m - int(present.max()), m - int(present.min()))


def crd_sample_indices(
    index: Tensor,
    num_negatives: int,
    num_data: int,
    labels: Tensor | None = None,
    generator: torch.Generator | None = None,
    layout: CRDClassLayout | None = None,
) -> Tensor:
    r"""Indices ``(B, K + 1)`` into the memory banks: the positive ``index`` (B,) then K negatives.

    * no ``labels`` / ``layout`` ("random"): negatives i.i.d. uniform over all ``num_data``
      samples, with replacement (the reference's ``AliasMethod`` over uniform unigrams; a
      negative may coincide with the positive, as there).
    * ``labels`` ``(M,)`` or their ``layout`` (:func:`crd_class_layout`) given ("other_class"):
      the negatives of anchor b are drawn uniformly among the samples whose label differs from
      ``labels[index[b]]``, *without* replacement when K does not exceed that pool and with
      replacement otherwise, as the reference's ``CIFAR100InstanceSample`` (``mode='exact'``,
      ``is_sample=True``) does. Without replacement is the K smallest of uniform keys, (B, M)
      work per call.

    Everything runs on ``index``'s device; ``generator`` (optional) must live there too.
    Index values are range-checked when ``index`` is on the CPU (a check on an accelerator
    would synchronise every step).
    """
    if num_negatives < 1:
        raise ValueError(f"the number of negatives must be >= 1, got {num_negatives}")
    device = index.device
    idx = index.detach().long().reshape(-1)
    b = idx.numel()
    if device.type == "cpu" and b and (int(idx.min()) < 0 or int(idx.max()) >= num_data):
        raise IndexError(
            f"batch index out of range [0, {num_data}): min {int(idx.min())}, max {int(idx.max())}; "
            "num_samples must be the size of the training set the loader indexes"
        )
    if layout is None and labels is not None:
        layout = crd_class_layout(labels)
    if layout is None:
        neg = torch.randint(0, num_data, (b, num_negatives), generator=generator, device=device)
    else:
        if layout.labels.numel() != num_data:
            raise ValueError(f"labels has {layout.labels.numel()} entries for a data set of {num_data} samples")
        layout = layout.to(device)
        own = layout.labels[idx]
        own_start, own_count = layout.starts[own].unsqueeze(1), layout.counts[own].unsqueeze(1)  # (B, 1)
        pool = num_data - own_count  # each anchor's number of samples to choose negatives from
        pos = None
        if num_negatives <= layout.max_pool:  # some anchors sample without replacement
            keys = torch.rand(b, num_data, generator=generator, device=device)
            keys.masked_fill_(torch.arange(num_data, device=device).unsqueeze(0) >= pool, 2.0)
            pos = keys.topk(num_negatives, dim=1, largest=False, sorted=False).indices
        if num_negatives > layout.min_pool:  # some anchors' pools are smaller than K: with replacement
            u = torch.rand(b, num_negatives, generator=generator, device=device)
            with_rep = torch.minimum((u * pool).long(), pool - 1)
            pos = with_rep if pos is None else torch.where(pool < num_negatives, with_rep, pos)
        assert pos is not None
        # position j of the class-sorted order with the anchor's own class cut out
        neg = layout.order[pos + own_count * (pos >= own_start)]
    return torch.cat([idx.unsqueeze(1), neg], dim=1)


def crd_scores(anchor: Tensor, memory: Tensor, index: Tensor, T: float = 0.07) -> Tensor:
    r"""Scores of each anchor against K + 1 rows of the other side's bank.

    .. math:: \ell_{b,i} = \langle m_{\,\mathrm{idx}_{b,i}},\, v_b \rangle / \tau

    Shapes: ``anchor`` (B, D), ``memory`` (M, D), ``index`` (B, K + 1) → (B, K + 1). The bank is
    detached (no gradient reaches it); the gather is (B, K + 1, D).
    """
    bsz, k1 = index.shape
    rows = memory.detach().index_select(0, index.reshape(-1)).view(bsz, k1, memory.shape[1])
    return torch.bmm(rows.to(anchor.dtype), anchor.unsqueeze(2)).squeeze(2) / T


def crd_log_z(logits: Tensor, num_data: int) -> Tensor:
    r"""The reference's NCE normalisation constant, as a log: :math:`\log Z`, detached.

    .. math:: Z = M \cdot \operatorname{mean}_{b,i}\, e^{\ell_{b,i}}

    over all B(K + 1) scores of one batch (positives included), so that :math:`e^{\ell}/Z`
    approximates a probability over the M samples (the NCE estimate of Wu et al., CVPR 2018,
    "Unsupervised Feature Learning via Non-Parametric Instance Discrimination"). RepDistiller
    computes it once, from the first training batch, and keeps it fixed.
    """
    flat = logits.detach().reshape(-1)
    return torch.logsumexp(flat, 0) - math.log(flat.numel()) + math.log(num_data)


def crd_nce_loss(logits: Tensor, num_data: int, log_z: float | Tensor = 0.0) -> Tensor:
    r"""CRD's NCE loss of one side: positives in column 0, K negatives after it.

    .. math::
        P_{b,i} = e^{\ell_{b,i}} / Z, \qquad
        h_{b,i} = \frac{P_{b,i}}{P_{b,i} + K/M}, \qquad
        L = -\frac{1}{B} \sum_b \Big[ \log h_{b,0} + \sum_{i=1}^{K} \log\big(1 - h_{b,i}\big) \Big]

    Shapes: ``logits`` (B, K + 1) → scalar. M = ``num_data``, the training-set size (the noise
    distribution is uniform, :math:`P_n = 1/M`).

    With :math:`Z = 1` (``log_z = 0``) :math:`h` is the critic as the paper writes it (Sec. 3,
    :math:`h(T, S) = e^{g^T(T)' g^S(S)/\tau} / (e^{g^T(T)' g^S(S)/\tau} + N/M)`, N = K negatives)
    and :math:`-L` the empirical critic objective (:math:`\mathbb E_{C=1}[\log h] + N\,
    \mathbb E_{C=0}[\log(1 - h)]`; the reference's ``ContrastLoss`` calls it Eq. 18).
    RepDistiller divides by a Z estimated from the first batch (:func:`crd_log_z`); pass its log
    here. The reference also adds ``eps = 1e-7`` to both
    denominators; this function evaluates the logs exactly and stably instead
    (:math:`\log h = -\operatorname{softplus}(-a)`, :math:`\log(1-h) = -\operatorname{softplus}(a)`,
    :math:`a = \ell - \log Z - \log(K/M)`).
    """
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must be (B, K + 1) with K >= 1, got {tuple(logits.shape)}")
    k = logits.shape[1] - 1
    a = logits - log_z - math.log(k / num_data)
    pos = F.softplus(-a[:, 0])
    neg = F.softplus(a[:, 1:]).sum(dim=1)
    return (pos + neg).mean()


def crd_memory_update(rows: Tensor, new: Tensor, momentum: float = 0.5) -> Tensor:
    r"""The momentum update of memory-bank rows, returned (the caller writes them back).

    .. math:: m_i \leftarrow \frac{\mu\, m_i + (1 - \mu)\, v_i}{\lVert \mu\, m_i + (1 - \mu)\, v_i \rVert_2}

    Shapes: ``rows`` (B, D) current bank rows of the batch's samples, ``new`` (B, D) their new
    embeddings → (B, D). Detached. μ = 0.5 is the reference's default (``--nce_m``).
    """
    mixed = rows.detach() * momentum + new.detach().to(rows.dtype) * (1.0 - momentum)
    return mixed / mixed.norm(dim=1, keepdim=True)
