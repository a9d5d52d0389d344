"""Knowledge Condensation Distillation (KCD): the per-sample knowledge value and the condensation rule.

Paper: C. Li, M. Lin, Z. Ding, N. Lin, Y. Zhuang, Y. Huang, X. Ding, L. Cao, "Knowledge
Condensation Distillation", ECCV 2022, arXiv 2207.05409 (reference code: github.com/dzy3/KCD).

A *knowledge point* is a pair ``(x, p_T(x))``. KCD alternates, EM-like,

* an E-step that labels each knowledge point valuable (``y = 1``) or not from its estimated value
  (Online Global Value Estimation, OGVE: Eqs. 7, 12, 13, 8) and summarises the set
  (Value-Adaptive Knowledge Summary, VAKS: Eqs. 14, 15), and
* an M-step that distils on the condensed set only (plain KD on the samples with ``y = 1``, Eq. 11).

The functions here are the pure math of the E-step; :class:`distill.methods.condensation.KCD`
records the values during training and :func:`distill.strategies.condense.fit_condensed` runs
the alternation.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.functional._precision import fp32

__all__ = [
    "KCDPartition",
    "kcd_partition",
    "kcd_rank_likelihood",
    "kcd_ranking",
    "kcd_schedule",
    "kcd_score",
    "kcd_summarize",
    "kcd_summary_epsilon",
    "kcd_update_value",
    "kcd_value",
    "kcd_value_labels",
]

SUMMARY_MODES = ("additive", "convex")


def kcd_value(student_logits: Tensor) -> Tensor:
    r"""The knowledge value of each sample: the entropy of the student's prediction (Eq. 7).

    .. math:: V(x) = -\sum_{c \in \mathcal{C}} p_S(x, c) \log p_S(x, c),
              \qquad p_S(x) = \operatorname{softmax}(s(x))

    Shapes: ``student_logits`` (B, K) → (B,), in nats, computed in float32 at least (the logits of a
    mixed-precision step are half precision). Temperature 1, as the paper and the reference code
    (``F.softmax(logit_s)``) use. A sample the student is unsure about carries more of the
    teacher's knowledge for it, so a high entropy is a high value.
    """
    if student_logits.dim() != 2:
        raise ValueError(f"kcd_value expects logits (B, K), got shape {tuple(student_logits.shape)}")
    logits = student_logits.float() if student_logits.dtype in (torch.float16, torch.bfloat16) else student_logits
    log_p = F.log_softmax(fp32(logits), dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


def kcd_update_value(value: Tensor, count: Tensor, index: Tensor, sample_value: Tensor) -> tuple[Tensor, Tensor]:
    r"""Online value recording (Eq. 12): fold this step's values into each sample's running mean.

    Each time sample ``x`` is fed to the network its training frequency ``F(x)`` grows by one and

    .. math:: V^{F(x)}(x) = \frac{F(x) - 1}{F(x)}\, V^{F(x)-1}(x) + \frac{1}{F(x)}\, V(x),

    i.e. :math:`V^{F}` is the mean of every value recorded for ``x`` since training began (no
    momentum and no forgetting: the paper's "global" estimate). Because the result is a mean,
    it does not depend on the order of the visits, which makes a batch that holds the same index
    twice well defined: both visits count.

    Shapes: ``value`` (N,) float, ``count`` (N,) integer (F), ``index`` (B,) int64 positions in
    ``[0, N)``, ``sample_value`` (B,) → new ``(value, count)``, each (N,); the inputs are not modified.
    """
    if value.shape != count.shape or value.dim() != 1:
        raise ValueError(f"value and count must both be (N,); got {tuple(value.shape)} and {tuple(count.shape)}")
    if index.dim() != 1 or index.shape != sample_value.shape:
        raise ValueError(
            f"index and sample_value must both be (B,); got {tuple(index.shape)} and {tuple(sample_value.shape)}"
        )
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= value.numel()):
        raise IndexError(
            f"sample index out of range: found {int(index.min())}..{int(index.max())}, "
            f"but the value table has {value.numel()} samples"
        )
    index = index.long()
    visits = torch.zeros_like(count).index_add_(0, index, torch.ones_like(index, dtype=count.dtype))
    sums = torch.zeros_like(value).index_add_(0, index, sample_value.to(value.dtype))
    new_count = count + visits
    seen = visits > 0
    # mean of old mean (weight F_old) and the new visits: V + (sum - n V) / (F_old + n)
    step = (sums - visits.to(value.dtype) * value) / new_count.clamp_min(1).to(value.dtype)
    return torch.where(seen, value + step, value), new_count


def kcd_score(value: Tensor, count: Tensor, alpha: float = 0.03) -> Tensor:
    r"""Cost-aware ranking score (Eq. 13): :math:`V^{F(x)}(x) \cdot F(x)^{\alpha}`.

    Of two samples with similar mean values, the one trained on more often ranks higher.
    Shapes: (N,), (N,) → (N,) float. A sample never seen (``F = 0``) scores 0.

    ``alpha = 0.03`` is the reference code's exponent (``ET = (F / 40) ** 0.03``; dividing by the
    constant 40 scales every score alike and does not change the ranking, so it is left out).
    The paper's text names the exponent α without a value that we could confirm.
    """
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    freq = count.to(value.dtype)
    weight = torch.where(count > 0, freq.pow(alpha), torch.zeros_like(freq))
    return value * weight


def kcd_ranking(score: Tensor) -> Tensor:
    """Sample indices ordered by decreasing score, shape (N,) int64; position r holds the sample of rank r.

    Ties keep index order (a stable sort): of two equal scores the lower index ranks first, so
    the condensed set is a deterministic function of the scores.
    """
    if score.dim() != 1:
        raise ValueError(f"score must be (N,), got shape {tuple(score.shape)}")
    if torch.isnan(score).any():
        raise ValueError("scores contain NaN; the recorded values are broken (a non-finite student output?)")
    return torch.sort(score, descending=True, stable=True).indices


def kcd_rank_likelihood(score: Tensor) -> Tensor:
    r"""The relative likelihood that each sample is valuable, from its rank (Eq. 8).

    .. math:: p_{\mathcal{R}_V}(y \mid x) = 1 - \frac{\mathcal{R}_V(x)}{|\mathcal{X}|}

    with :math:`\mathcal{R}_V(x) \in \{0, \dots, N-1\}` the rank of ``x`` by decreasing score
    (:func:`kcd_ranking`). Shapes: (N,) → (N,) float.
    """
    n = score.numel()
    rank = torch.empty(n, dtype=torch.long, device=score.device)
    rank[kcd_ranking(score)] = torch.arange(n, device=score.device)
    return 1.0 - rank.to(torch.float64) / n


def kcd_value_labels(score: Tensor, tau: float) -> Tensor:
    r"""The E-step's labels :math:`Y(x) = \mathbb{1}[p_{\mathcal{R}_V}(y \mid x) \ge \tau]`, (N,) bool.

    Keeping the ``n`` best samples is the same as :math:`\tau = 1 - (n - 1)/N`; the strategy
    chooses ``n`` by its schedule (:func:`kcd_schedule`) and calls :func:`kcd_partition`.
    """
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau must be in [0, 1], got {tau}")
    return kcd_rank_likelihood(score) >= tau


def kcd_schedule(num_samples: int, epochs: int, condense_every: int, keep_ratio: float = 0.7) -> list[int]:
    r"""Size of the condensed knowledge set for each stage of ``condense_every`` epochs.

    Stage 0 trains on all ``N`` samples; each later stage starts with one condensation that
    removes :math:`\lfloor N (1 - r) / S \rfloor` samples (``S = epochs // condense_every``, ``r``
    the keep ratio), never going below :math:`\max(1, \lfloor r N \rfloor)`. Returns
    ``ceil(epochs / condense_every)`` sizes.

    This is the reference code's schedule (``--purification 40 --threshold 0.7`` over 240 epochs:
    the set shrinks by 5% of N at epochs 40, 80, ..., 200, so the stages train on 100%, 95%, ...,
    75% of the data; the floor of 70% would be reached by a sixth condensation after the last
    epoch). The paper does not state the schedule in a form we could confirm. When
    ``N (1 - r) < S`` the floor rounds the step to 0; we remove one sample per stage then, so that
    a keep ratio below 1 always condenses.
    """
    for name, v in (("num_samples", num_samples), ("epochs", epochs), ("condense_every", condense_every)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}")
    stages = math.ceil(epochs / condense_every)
    floor_size = max(1, int(keep_ratio * num_samples + 1e-9))
    condensations = epochs // condense_every
    # the 1e-9 keeps e.g. 100 * (1 - 0.9) / 2 = 4.999... from rounding down to 4
    step = int(num_samples * (1.0 - keep_ratio) / max(1, condensations) + 1e-9)
    if step == 0 and floor_size < num_samples:
        step = 1
    sizes = [num_samples]
    for _ in range(1, stages):
        sizes.append(max(floor_size, sizes[-1] - step))
    return sizes


class KCDPartition(NamedTuple):
    """The VAKS knowledge partition, each part ordered by decreasing value, int64 sample indices.

    ``high`` (K_1H) is distilled as it is; ``low`` (K_1L) is summarised with ``dropped`` (the
    first ``len(low)`` of K_0) paired position by position; the rest of K_0 is discarded.
    """

    high: Tensor
    low: Tensor
    dropped: Tensor

    @property
    def kept(self) -> Tensor:
        """K_1 = K_1H ∪ K_1L, by decreasing value."""
        return torch.cat([self.high, self.low])


def kcd_partition(score: Tensor, num_keep: int) -> KCDPartition:
    r"""Knowledge partition of VAKS over the whole training set.

    The ``num_keep`` best-scored samples form K_1 (``y = 1``), the others K_0 (``y = 0``, removed).
    K_1 splits into K_1H (its best) and K_1L (its last :math:`|K_{1L}| = |K_0|` samples, the ones
    at the border of being removed), which :func:`kcd_summarize` perturbs with K_0.

    The ranking covers all N samples, also those removed earlier (their values are kept from when
    they were last seen, and their lower ``F`` lowers their score): a removed sample can come back,
    as in the paper's global estimate and in the reference code. When K_0 is larger than K_1 only
    the best ``|K_1|`` samples of K_0 are paired (``low`` is then all of K_1); the reference code
    pairs the same way.

    Shapes: ``score`` (N,) → three index tensors whose lengths sum to ``num_keep + len(low)``.
    """
    n = score.numel()
    if isinstance(num_keep, bool) or not isinstance(num_keep, int) or not 1 <= num_keep <= n:
        raise ValueError(f"num_keep must be an integer in [1, {n}], got {num_keep!r}")
    order = kcd_ranking(score)
    kept, removed = order[:num_keep], order[num_keep:]
    pairs = min(removed.numel(), num_keep)
    return KCDPartition(kept[: num_keep - pairs], kept[num_keep - pairs:], removed[:pairs])


def kcd_summary_epsilon(num_pairs: int, eps_max: float = 0.3, dtype: torch.dtype = torch.float32) -> Tensor:
    r"""The value-adaptive perturbation strengths :math:`\epsilon(S)` of Eq. 15, shape (L,).

    .. math:: \epsilon(x') = \frac{\epsilon_m}{|K_0|}\,(x' - |K_1|) + \epsilon_m

    for the (1-based) ranks :math:`x' = |K_1| - L + 1, \dots, |K_1|` of the K_1L samples, i.e.
    :math:`\epsilon_j = \epsilon_m (j + 1) / L`, ``j = 0..L-1`` from the best to the worst of K_1L:
    the lower a kept sample's value, the stronger its perturbation, up to :math:`\epsilon_m` for the
    last kept sample. (``L = |K_0|`` unless K_0 was truncated, see :func:`kcd_partition`; the ramp is
    laid over the L pairs so it still ends at :math:`\epsilon_m`.)

    The reference code uses :math:`\epsilon_m j / L` (from 0 to just below :math:`\epsilon_m`), one
    rank off Eq. 15; ``eps_max = 0.3`` is its constant (``remain_rate`` falls from 1 to 0.7).
    """
    if isinstance(num_pairs, bool) or not isinstance(num_pairs, int) or num_pairs < 0:
        raise ValueError(f"num_pairs must be a non-negative integer, got {num_pairs!r}")
    if eps_max < 0:
        raise ValueError(f"eps_max must be >= 0, got {eps_max}")
    if num_pairs == 0:
        return torch.zeros(0, dtype=dtype)
    return eps_max * torch.arange(1, num_pairs + 1, dtype=dtype) / num_pairs


def kcd_summarize(low: Tensor, dropped: Tensor, eps: Tensor, mode: str = "additive") -> Tensor:
    r"""Adaptive knowledge augmentation (Eq. 14): perturb K_1L's inputs with K_0's, pair by pair.

    .. math:: K_{Aug} = \mathrm{Ordered}(K_{1L}) \oplus \mathrm{Ordered}(K_0) \otimes \epsilon(S)

    ``mode="additive"`` (the paper's Eq. 14): :math:`\tilde x_j = x^{1L}_j + \epsilon_j\, x^{0}_j`.
    ``mode="convex"`` (the reference code): :math:`\tilde x_j = (1 - \epsilon_j)\, x^{1L}_j + \epsilon_j\, x^{0}_j`,
    a mixup that keeps the image's scale.

    The summarised sample keeps its K_1L label; its knowledge ``p_T(\tilde x)`` is the teacher's
    output on the new input, computed online during the M-step.

    Shapes: ``low`` (L, ...), ``dropped`` (L, ...), ``eps`` (L,) → (L, ...).
    """
    if mode not in SUMMARY_MODES:
        raise ValueError(f"summary mode must be one of {SUMMARY_MODES}, got {mode!r}")
    if low.shape != dropped.shape:
        raise ValueError(f"K_1L and K_0 inputs must have one shape; got {tuple(low.shape)} and {tuple(dropped.shape)}")
    if eps.dim() != 1 or eps.numel() != low.shape[0]:
        raise ValueError(f"eps must be ({low.shape[0]},), one strength per pair; got shape {tuple(eps.shape)}")
    e = eps.to(low.dtype).view(-1, *([1] * (low.dim() - 1)))
    keep = low if mode == "additive" else (1 - e) * low
    return keep + e * dropped
