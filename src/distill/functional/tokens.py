r"""Token-level losses of language-model distillation: divergences per token, masks, reductions,
top-k teachers, and a chunked loss fused with the student's ``lm_head``.

Notation, per token (one row of the logits): ``q = softmax(s / T)`` the student's distribution,
``p = softmax(t / T)`` the teacher's, both over the vocabulary of size ``V``. Every divergence is
summed over the vocabulary, computed in float32 (float64 inputs stay float64) from log-softmaxes
(never the log of a softmax), and multiplied by ``T²`` (Hinton et al.'s convention, the project's
rule for every temperature-scaled term: it keeps gradient magnitudes comparable across ``T``):

=================== ====================================================================================
``forward_kl``      :math:`KL(p\|q) = \sum_v p_v (\log p_v - \log q_v)`
``reverse_kl``      :math:`KL(q\|p)`
``jsd``             :math:`JSD_\beta = \beta\,KL(p\|m) + (1-\beta)\,KL(q\|m)`, :math:`m = \beta p + (1-\beta) q`
``skew_kl``         :math:`SKL_\alpha = KL(p\,\|\,\alpha p + (1-\alpha) q)`
``skew_reverse_kl`` :math:`SRKL_\alpha = KL(q\,\|\,(1-\alpha) p + \alpha q)`
``tvd``             :math:`\tfrac12 \sum_v |p_v - q_v|`
=================== ====================================================================================

Mixtures are formed in log space (``logaddexp``). Logits of ``-inf`` (vocabulary entries masked
out) are allowed: a term whose weighting distribution has no mass there is 0 (``0 log 0 = 0``),
with finite gradients; a distribution that puts mass where the other has none gives ``+inf``
(the true value of that KL).

The teacher is always a target: these functions detach it, so no gradient reaches it.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.functional._precision import fp32

__all__ = [
    "DIVERGENCES",
    "REDUCTIONS",
    "TopK",
    "fused_linear_token_loss",
    "token_divergence",
    "token_loss",
    "token_mask",
    "token_weights",
    "topk_logprobs",
    "topk_token_divergence",
]

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")
REDUCTIONS = ("token", "sequence", "sum")
IGNORE_INDEX = -100


class TopK(NamedTuple):
    """A teacher reduced to its ``k`` most likely tokens per position.

    Attributes:
        values: log-probabilities of the ``k`` tokens ``(..., k)``.
        indices: their vocabulary ids ``(..., k)`` long.
        tail: the probability mass of every other token, ``1 − Σ exp(values)``, ``(...,)``; may be
            ``None`` (then computed from ``values``).
    """

    values: Tensor
    indices: Tensor
    tail: Tensor | None = None


# --------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------


def _check_hparams(divergence: str, beta: float, alpha: float, temperature: float) -> None:
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; expected one of {', '.join(DIVERGENCES)}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if divergence == "jsd" and not (isinstance(beta, (int, float)) and 0.0 <= beta <= 1.0):
        raise ValueError(f"beta (the teacher's share of the JSD mixture) must be in [0, 1], got {beta!r}")
    if divergence in ("skew_kl", "skew_reverse_kl") and not (isinstance(alpha, (int, float)) and 0.0 <= alpha < 1.0):
        raise ValueError(f"alpha (the skew of {divergence}) must be in [0, 1), got {alpha!r} "
                         "(alpha = 1 makes the loss identically 0)")


def _check_same_shape(student: Tensor, teacher: Tensor, what: str = "logits") -> None:
    if tuple(student.shape) != tuple(teacher.shape):
        raise ValueError(f"student {what} have shape {tuple(student.shape)} but teacher {what} "
                         f"{tuple(teacher.shape)}; they must be equal (same tokens, same vocabulary)")


def _check_labels(labels: Tensor, vocab_size: int | None = None) -> None:
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    bad = (labels != IGNORE_INDEX) & (labels < 0)
    if vocab_size is not None:
        bad = bad | (labels >= vocab_size)
    if bool(bad.any()):
        value = int(labels[bad].flatten()[0])
        where = f"[0, {vocab_size})" if vocab_size is not None else "the vocabulary (>= 0)"
        raise ValueError(f"labels contain {value}, which is neither {IGNORE_INDEX} (no loss) nor a token id in {where}")


# --------------------------------------------------------------------------------------------
# divergences on log-probabilities
# --------------------------------------------------------------------------------------------


def _kl(log_w: Tensor, log_o: Tensor) -> Tensor:
    """``Σ_v w_v (log w_v − log o_v)`` over the last dim; entries where ``w = 0`` contribute 0 with
    finite gradients (their log-probabilities are replaced before the subtraction)."""
    w = log_w.exp()
    has = w > 0
    zero = torch.zeros((), dtype=log_w.dtype, device=log_w.device)
    return (w * (torch.where(has, log_w, zero) - torch.where(has, log_o, zero))).sum(-1)


def _mix(log_a: Tensor, log_b: Tensor, share_a: float) -> Tensor:
    """``log(share_a · a + (1 − share_a) · b)`` in log space, for ``0 < share_a < 1``; entries where
    both are ``-inf`` give ``-inf`` without NaN gradients."""
    both = torch.isneginf(log_a) & torch.isneginf(log_b)
    zero = torch.zeros((), dtype=log_a.dtype, device=log_a.device)
    mixed = torch.logaddexp(torch.where(both, zero, log_a) + math.log(share_a),
                            torch.where(both, zero, log_b) + math.log1p(-share_a))
    return torch.where(both, torch.full_like(mixed, -math.inf), mixed)


def _divergence(log_q: Tensor, log_p: Tensor, divergence: str, beta: float, alpha: float) -> Tensor:
    """The divergence between student log-probs ``log_q`` and teacher log-probs ``log_p`` (same
    shape ``(..., bins)``), summed over the last dim, without the temperature factor."""
    if divergence == "forward_kl":
        return _kl(log_p, log_q)
    if divergence == "reverse_kl":
        return _kl(log_q, log_p)
    if divergence == "jsd":
        # the end points: the limits of JSD_β / β (β → 0) and JSD_β / (1 − β) (β → 1), see token_divergence
        if beta == 0.0:
            return _kl(log_p, log_q)
        if beta == 1.0:
            return _kl(log_q, log_p)
        log_m = _mix(log_p, log_q, beta)
        return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)
    if divergence == "skew_kl":
        log_m = log_q if alpha == 0.0 else _mix(log_p, log_q, alpha)
        return _kl(log_p, log_m)
    if divergence == "skew_reverse_kl":
        log_m = log_p if alpha == 0.0 else _mix(log_q, log_p, alpha)
        return _kl(log_q, log_m)
    if divergence == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    raise ValueError(f"unknown divergence {divergence!r}; expected one of {', '.join(DIVERGENCES)}")


def _log_probs(logits: Tensor, temperature: float) -> Tensor:
    return F.log_softmax(fp32(logits) / temperature, dim=-1)


def token_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    divergence: str = "forward_kl",
    *,
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
) -> Tensor:
    r"""The divergence between the student's and the teacher's next-token distributions, per token.

    Shapes: ``(N, V)``, ``(N, V)`` → ``(N,)`` (any leading dims: ``(..., V)`` → ``(...)``).
    ``q = softmax(s / T)``, ``p = softmax(t / T)``; the result is the divergence summed over the
    vocabulary, times ``T²`` (see the module docstring for each formula). The teacher is detached.

    ``divergence``:

    * ``"forward_kl"`` :math:`KL(p\|q)`: word-level KD (Hinton, Vinyals, Dean, "Distilling the
      Knowledge in a Neural Network", 2015, arXiv 1503.02531; Kim & Rush, "Sequence-Level
      Knowledge Distillation", EMNLP 2016, arXiv 1606.07947).
    * ``"reverse_kl"`` :math:`KL(q\|p)`: mode-seeking (Gu et al., "MiniLLM: Knowledge Distillation
      of Large Language Models", ICLR 2024, arXiv 2306.08543).
    * ``"jsd"``: the generalized JSD of GKD (Agarwal et al., "On-Policy Distillation of Language
      Models: Learning from Self-Generated Mistakes", ICLR 2024, arXiv 2306.13649, Eq. 1) with
      ``P`` the teacher and ``Q`` the student: :math:`\beta KL(p\|m) + (1-\beta) KL(q\|m)`,
      :math:`m = \beta p + (1-\beta) q` — ``beta`` is the teacher's share of the mixture and the
      weight of the teacher's KL term. The paper defines it for ``0 < β < 1`` and notes (after
      Huszár 2015) that it tends to forward KL for small ``β`` and to reverse KL for ``β`` near 1,
      up to scale: :math:`JSD_\beta/\beta \to KL(p\|q)` and :math:`JSD_\beta/(1-\beta) \to KL(q\|p)`.
      Taken literally the formula is identically 0 at ``β ∈ {0, 1}``; like TRL's
      ``GKDTrainer.generalized_jsd_loss`` we return those limits there, ``β = 0``: forward KL and
      ``β = 1``: reverse KL, so that the end points train something and name what the paper says
      they tend to (mind the jump in scale: ``β = 0.01`` gives about ``0.01 · KL(p‖q)``).
    * ``"skew_kl"`` :math:`KL(p\|\alpha p + (1-\alpha) q)` and ``"skew_reverse_kl"``
      :math:`KL(q\|(1-\alpha) p + \alpha q)` (Ko et al., "DistiLLM: Towards Streamlined
      Distillation for Large Language Models", ICML 2024, arXiv 2402.03898; ``alpha ∈ [0, 1)``,
      0.1 in the paper; ``alpha = 0`` is forward / reverse KL).
    * ``"tvd"`` :math:`\frac12\sum_v |p_v - q_v|` (Wen et al., "f-Divergence Minimization for
      Sequence-Level Knowledge Distillation", ACL 2023, arXiv 2307.15190).
    """
    _check_hparams(divergence, beta, alpha, temperature)
    _check_same_shape(student_logits, teacher_logits)
    log_q = _log_probs(student_logits, temperature)
    log_p = _log_probs(teacher_logits.detach(), temperature)
    return _divergence(log_q, log_p, divergence, beta, alpha) * (temperature * temperature)


# --------------------------------------------------------------------------------------------
# masks and reductions
# --------------------------------------------------------------------------------------------


def token_mask(labels: Tensor, causal: bool = True) -> Tensor:
    """Which logit rows carry a loss, aligned with the logits ``(B, L, V)``.

    Shapes: labels ``(B, L)`` long (``-100`` = no loss, the Hugging Face convention; labels are
    *not* shifted) → ``(B, L)`` bool. For a causal LM the logits at position ``t`` predict the
    token at ``t + 1``: ``mask[:, t] = labels[:, t + 1] != -100`` for ``t < L − 1`` and the last
    position is False (so a label at position 0 never counts). For seq2seq decoders and encoders
    (``causal=False``) ``mask = labels != -100``.
    """
    if labels.dim() != 2:
        raise ValueError(f"labels must be (B, L), got shape {tuple(labels.shape)}")
    _check_labels(labels)
    return _token_mask(labels, causal)


def _token_mask(labels: Tensor, causal: bool) -> Tensor:
    valid = labels != IGNORE_INDEX
    if not causal:
        return valid
    mask = torch.zeros_like(valid)
    mask[:, :-1] = valid[:, 1:]
    return mask


def token_weights(mask: Tensor, reduction: str = "token", dtype: torch.dtype = torch.float32) -> Tensor:
    """The weight of each token in the loss; the loss is ``Σ weights · per_token``.

    Shapes: ``(B, L)`` bool → ``(B, L)`` of ``dtype`` (float32 unless asked).

    * ``"token"``: ``1 / n_valid`` (the mean over every valid token of the batch; what TRL's
      ``GKDTrainer`` and DistiLLM compute).
    * ``"sequence"``: ``1 / (n_valid_in_its_sequence · n_sequences_with_a_valid_token)`` (each
      sequence's mean, then the mean over sequences: long and short answers count alike).
    * ``"sum"``: 1 for each valid token.

    With no valid token at all every weight is 0 (see :func:`token_loss`).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {', '.join(REDUCTIONS)}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got {mask.dtype}")
    m = mask.to(dtype)
    if reduction == "sum":
        return m
    if reduction == "token":
        return m / m.sum().clamp_min(1.0)
    per_seq = m.sum(-1, keepdim=True)
    n_seq = (per_seq > 0).sum().clamp_min(1).to(dtype)
    return m / (per_seq.clamp_min(1.0) * n_seq)


def _graph_zero(x: Tensor) -> Tensor:
    """A 0 that is part of ``x``'s graph (its gradient is 0), whatever values ``x`` holds."""
    return fp32(x).flatten()[:0].sum()


_NO_TOKEN_WARNING = ("token loss: the batch has no token with a label (every label is -100 after the shift); "
                     "the loss is 0 (a batch of prompts only trains nothing)")


def token_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    divergence: str = "forward_kl",
    *,
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    reduction: str = "token",
    causal: bool = True,
) -> Tensor:
    """A token-level distillation loss over a batch of sequences.

    Shapes: ``(B, L, V)``, ``(B, L, V)``, labels ``(B, L)`` → scalar.
    ``Σ_{b,t} token_weights(token_mask(labels, causal), reduction)[b, t] ·
    token_divergence(s[b, t], t[b, t], divergence, ...)``: only the rows whose (shifted) label is not
    -100 are computed, so positions without a label change neither the loss nor any gradient.

    A batch without any labelled token (pure prompts) gives 0, still part of the student's graph so
    that ``backward`` works, and a warning (shown once per calling line by Python's default filter): raising
    would stop a run for a batch that is legitimately empty of targets.
    """
    _check_hparams(divergence, beta, alpha, temperature)
    _check_same_shape(student_logits, teacher_logits)
    if student_logits.dim() != 3:
        raise ValueError(f"token logits must be (B, L, V), got shape {tuple(student_logits.shape)}")
    if tuple(labels.shape) != tuple(student_logits.shape[:2]):
        raise ValueError(f"labels have shape {tuple(labels.shape)} but the logits {tuple(student_logits.shape)}; "
                         f"expected labels (B, L) = {tuple(student_logits.shape[:2])}")
    _check_labels(labels, student_logits.shape[-1])
    mask = _token_mask(labels, causal)
    weights = token_weights(mask, reduction, torch.float64 if student_logits.dtype == torch.float64 else torch.float32)
    rows = mask.flatten().nonzero().squeeze(1)
    if rows.numel() == 0:
        warnings.warn(_NO_TOKEN_WARNING, RuntimeWarning, stacklevel=2)
        return _graph_zero(student_logits)
    V = student_logits.shape[-1]
    per_token = token_divergence(student_logits.reshape(-1, V).index_select(0, rows),
                                 teacher_logits.reshape(-1, V).index_select(0, rows), divergence,
                                 beta=beta, alpha=alpha, temperature=temperature)
    return (per_token * weights.flatten().index_select(0, rows).to(per_token.dtype)).sum()


# --------------------------------------------------------------------------------------------
# top-k teachers
# --------------------------------------------------------------------------------------------


def topk_logprobs(teacher_logits: Tensor, k: int, temperature: float = 1.0) -> TopK:
    """The teacher's ``k`` most likely tokens per position and the mass of all the others.

    Shapes: ``(..., V)`` → ``TopK(values (..., k) log-probabilities at temperature T (float32),
    indices (..., k) long, tail (...,) = 1 − Σ exp(values))``. The tail is computed as the
    ``logsumexp`` of the other ``V − k`` log-probabilities (exact even when it is tiny, where
    ``1 − Σ`` would cancel); it is 0 when ``k = V``. No gradient is kept (a teacher is a target).
    """
    V = teacher_logits.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= V:
        raise ValueError(f"k must be an integer in [1, {V}] (the vocabulary size), got {k!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    with torch.no_grad():
        log_p = _log_probs(teacher_logits, temperature)
        values, indices = log_p.topk(k, dim=-1)
        rest = log_p.scatter(-1, indices, -math.inf)
        tail = rest.logsumexp(-1).exp()
    return TopK(values, indices, tail)


def _collapse_teacher(values: Tensor, tail: Tensor | None) -> Tensor:
    """Teacher log-probs over ``k + 1`` bins (the k tokens, then the tail), renormalised (stored
    values in float16 do not sum to exactly 1)."""
    values = fp32(values.detach())
    if tail is None:
        log_tail = torch.log1p(-values.exp().sum(-1).clamp(max=1.0))
    else:
        log_tail = fp32(tail.detach()).to(values.dtype).clamp(0.0, 1.0).log()
    bins = torch.cat([values, log_tail.unsqueeze(-1)], dim=-1)
    return bins - bins.logsumexp(-1, keepdim=True)


def _collapse_student(log_q: Tensor, indices: Tensor) -> Tensor:
    """Student log-probs over the teacher's ``k + 1`` bins: its log-probs at ``indices``, then the
    ``logsumexp`` of every other entry (stable for a tiny tail; ``-inf`` when ``k = V``)."""
    top = log_q.gather(-1, indices)
    tail = log_q.scatter(-1, indices, -math.inf).logsumexp(-1, keepdim=True)
    return torch.cat([top, tail], dim=-1)


class _StudentBins(torch.autograd.Function):
    r"""The student's log-probabilities over the teacher's ``k + 1`` bins, from its logits, in few
    passes over the ``(N, V)`` logits and with the gradient written out (what autograd would build
    from ``log_softmax`` + ``gather`` + ``scatter`` + ``logsumexp`` takes about three times as many
    passes, and the passes over (tokens × vocabulary) are the cost of a cached-teacher step).

    With ``e = exp(z − max z)``, ``S = Σ_v e_v`` and ``S_tail = Σ_{v ∉ top} e_v`` (summed with the
    top-k entries zeroed, so a tiny tail does not cancel): ``log q_i = log e_i − log S`` for the k
    tokens and ``log q_tail = log S_tail − log S``. Backward, with ``g`` the gradient of the
    ``k + 1`` outputs and ``G = Σ_b g_b``: ``∂/∂z_v = g_v − G q_v`` for a top-k token and
    ``e_v (g_tail / S_tail − G / S)`` for every other token.

    Rows whose tail underflows to 0 in this shifted form while ``k < V`` (a student so sure that the
    rest of its mass is below ``e^{−87}`` of the top) get ``S_tail = 0`` here; the caller recomputes
    those rows with :func:`_collapse_student`.
    """

    @staticmethod
    def forward(ctx, z: Tensor, indices: Tensor) -> Tensor:  # noqa: D102
        _, m, total, tail, log_top, bins = _bins_forward(z, indices)
        ctx.save_for_backward(z, indices, m, total, tail, log_top)
        return bins

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None]:  # noqa: D102
        z, indices, m, total, tail, log_top = ctx.saved_tensors
        return _bins_backward((z - m).exp_(), g, indices, total, tail, log_top), None


def _bins_forward(z: Tensor, indices: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:class:`_StudentBins`'s forward pass over the ``(..., V)`` logits ``z``: ``(e, m, S, S_tail,
    log q of the k tokens, the k + 1 bins)``, where ``e = exp(z − m)`` has the k tokens zeroed."""
    m = z.max(-1, keepdim=True).values
    e = (z - m).exp_()
    total = e.sum(-1, keepdim=True)
    e.scatter_(-1, indices, 0.0)
    tail = e.sum(-1, keepdim=True)
    log_total = total.log()
    # the k tokens from the logits themselves: a token far below the top keeps a finite log-prob
    log_top = z.gather(-1, indices) - m - log_total
    return e, m, total, tail, log_top, torch.cat([log_top, tail.log() - log_total], dim=-1)


def _bins_backward(e: Tensor, g: Tensor, indices: Tensor, total: Tensor, tail: Tensor, log_top: Tensor,
                   ce_scale: Tensor | None = None) -> Tensor:
    """The gradient with respect to the logits of the k + 1 bins (``g``: the bins' gradient), written
    into ``e = exp(z − m)`` (its entries at ``indices`` may be anything: they are overwritten); with
    ``ce_scale`` ``(..., 1)``, plus ``ce_scale · softmax(z)`` (cross-entropy's part, less its one-hot)."""
    g_top, g_tail = g[..., :-1], g[..., -1:]
    G = g.sum(-1, keepdim=True)
    q_top = log_top.exp()
    safe_tail = torch.where(tail > 0, tail, torch.ones_like(tail))
    per_row = torch.where(tail > 0, g_tail / safe_tail, torch.zeros_like(tail)) - G / total
    top = g_top - G * q_top
    if ce_scale is not None:
        per_row = per_row + ce_scale / total  # softmax(z) of the other tokens is e / S
        top = top + ce_scale * q_top
    grad = e.mul_(per_row)  # every token as if in the tail ...
    return grad.scatter_(-1, indices, top)  # ... then the k tokens' own gradient


def _student_bins(log_z: Tensor, indices: Tensor) -> Tensor:
    """:class:`_StudentBins` of the (tempered, float) logits ``log_z`` ``(..., V)``, with the rows
    whose tail underflowed recomputed exactly by :func:`_collapse_student`."""
    bins = _StudentBins.apply(log_z, indices)
    if indices.shape[-1] < log_z.shape[-1]:
        lost = torch.isneginf(bins[..., -1])
        if bool(lost.any()):
            exact = _collapse_student(F.log_softmax(log_z[lost], dim=-1), indices[lost])
            bins = bins.index_put((lost,), exact)
    return bins


def topk_token_divergence(
    student_logits: Tensor,
    topk_values: Tensor,
    topk_indices: Tensor,
    divergence: str = "forward_kl",
    *,
    tail: Tensor | None = None,
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
) -> Tensor:
    """The divergence to a top-k teacher, exact on the ``k + 1``-bin partition.

    Shapes: student logits ``(N, V)``, ``topk_values`` ``(N, k)`` (the teacher's log-probabilities,
    e.g. from :func:`topk_logprobs` or a cache), ``topk_indices`` ``(N, k)`` long, ``tail`` ``(N,)``
    (the teacher's remaining mass; ``None``: ``1 − Σ exp(values)``) → ``(N,)``.

    Both distributions are collapsed to the same ``k + 1`` bins: the teacher's ``k`` tokens and one
    bin holding the rest of the mass (the student's tail is the ``logsumexp`` of its other
    log-probabilities). The result is ``T² · D(collapsed p, collapsed q)`` for the divergences of
    :func:`token_divergence`; with ``k = V`` it equals :func:`token_divergence`. By the data
    processing inequality it is at most the full-vocabulary divergence.

    ``temperature`` divides the student's logits; the teacher's values are log-probabilities at
    whatever temperature they were made with, which must be the same ``T`` for the result to mean
    the tempered divergence (``topk_logprobs(teacher_logits, k, temperature=T)``: the tail of a
    stored top-k cannot be re-tempered exactly).
    """
    _check_hparams(divergence, beta, alpha, temperature)
    _check_same_shape(topk_values, topk_indices, "top-k values/indices")
    if topk_values.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(f"top-k teacher has shape {tuple(topk_values.shape)} but the student logits "
                         f"{tuple(student_logits.shape)}; expected (..., k) with the same leading dims")
    if tail is not None and tuple(tail.shape) != tuple(topk_values.shape[:-1]):
        raise ValueError(f"top-k tail has shape {tuple(tail.shape)}, expected {tuple(topk_values.shape[:-1])}")
    V = student_logits.shape[-1]
    if topk_values.shape[-1] > V:
        raise ValueError(f"top-k teacher has k = {topk_values.shape[-1]} > the vocabulary size {V}")
    log_p = _collapse_teacher(topk_values, tail)
    z = fp32(student_logits)
    log_q = _student_bins(z / temperature if temperature != 1.0 else z, topk_indices.long())
    return _divergence(log_q, log_p.to(log_q.dtype), divergence, beta, alpha) * (temperature * temperature)


# --------------------------------------------------------------------------------------------
# the chunked loss fused with the lm_head
# --------------------------------------------------------------------------------------------


def _take(x: Tensor, rows: Tensor | slice) -> Tensor:
    """Rows of ``x``: a view for a contiguous run (a slice), a copy for an index tensor."""
    return x[rows] if isinstance(rows, slice) else x.index_select(0, rows)


def _chunk_loss(logits: Tensor, rows: Tensor | slice, weights: Tensor, teacher: tuple, spec: dict) -> Tensor:
    """Σ weights · (divergence + ce_weight · CE) over one chunk of rows (logits ``(C, V)``)."""
    kind, a, b, c = teacher
    kw = dict(beta=spec["beta"], alpha=spec["alpha"], temperature=spec["temperature"])
    if kind == "logits":
        per = token_divergence(logits, _take(a, rows), spec["divergence"], **kw)
    elif kind == "topk":
        per = topk_token_divergence(logits, _take(a, rows), _take(b, rows), spec["divergence"],
                                    tail=None if c is None else _take(c, rows), **kw)
    else:  # "hidden": the teacher's logits of this chunk only, never the whole (N, V)
        with torch.no_grad():
            t_logits = F.linear(_take(a, rows), b, c)
        per = token_divergence(logits, t_logits, spec["divergence"], **kw)
    if spec["ce_weight"] != 0.0 and spec["ce_labels"] is not None:
        ce = F.cross_entropy(fp32(logits), _take(spec["ce_labels"], rows), ignore_index=IGNORE_INDEX,
                             reduction="none")
        per = per + spec["ce_weight"] * ce
    return (per * weights.to(per.dtype)).sum()


def _forward_kl_chunk(logits: Tensor, rows: Tensor | slice, weights: Tensor, teacher: tuple,
                      spec: dict) -> tuple[Tensor, Tensor]:
    r"""The chunk's loss and its gradient with respect to the logits, written out, for the forward
    KL with a full teacher (the common case), in about half the passes over the ``(C, V)`` logits
    that autograd takes: with ``q = softmax(z / T)``, ``p = softmax(t / T)`` and row weights ``w``,
    ``L = Σ_n w_n T² KL(p_n ‖ q_n)`` has ``∂L/∂z_n = w_n T (q_n − p_n)``; cross-entropy
    ``λ Σ_n w_n CE(z_n, y_n)`` adds ``λ w_n (softmax(z_n) − onehot(y_n))`` on labelled rows. The
    same numbers as :func:`_chunk_loss` (tested)."""
    kind, a, b, c = teacher
    T = spec["temperature"]
    with torch.no_grad():
        t_logits = _take(a, rows) if kind == "logits" else F.linear(_take(a, rows), b, c)
        z = fp32(logits)
        log_q = F.log_softmax(z / T if T != 1.0 else z, dim=-1)
        t = fp32(t_logits)
        log_p = F.log_softmax(t / T if T != 1.0 else t, dim=-1)
        p = log_p.exp()
        kl = torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)  # 0 · log 0 = 0
        del log_p
        w = weights.to(z.dtype)
        loss = (w * kl).sum() * (T * T)
        on_q = T * w  # the coefficient of q in the gradient, per row
        ce_weight, labels = spec["ce_weight"], spec["ce_labels"]
        ce_scale = q1 = safe = None
        if ce_weight != 0.0 and labels is not None:
            y = _take(labels, rows)
            valid = y != IGNORE_INDEX
            safe = torch.where(valid, y, 0)[:, None]
            log_q1 = log_q if T == 1.0 else F.log_softmax(z, dim=-1)  # CE is at temperature 1
            nll = -log_q1.gather(-1, safe).squeeze(-1) * valid
            loss = loss + ce_weight * (w * nll).sum()
            ce_scale = ce_weight * w * valid
            if T == 1.0:
                on_q = on_q + ce_scale  # softmax(z) is q itself
            else:
                q1 = log_q1.exp_().mul_(ce_scale[:, None])
        grad = log_q.exp_().mul_(on_q[:, None]).sub_(p.mul_((T * w)[:, None]))
        if ce_scale is not None:
            if q1 is not None:
                grad.add_(q1)
            grad.scatter_add_(-1, safe, -ce_scale[:, None])
    return loss, grad


def _topk_chunk(logits: Tensor, rows: Tensor | slice, weights: Tensor, teacher: tuple,
                spec: dict) -> tuple[Tensor, Tensor] | None:
    r"""The chunk's loss and its gradient with respect to the logits for a top-k teacher (a cache),
    with the passes over the ``(C, V)`` logits shared between the ``k + 1`` bins and cross-entropy:
    one exponential, three reductions and one scaling pass in all (the bins' own gradient, on the
    small ``(C, k + 1)`` tensor, is autograd's). The formulas are :class:`_StudentBins`'s, with
    cross-entropy at temperature 1 adding ``λ w (softmax(z) − onehot(y))``. Returns ``None`` (the
    caller then uses autograd) for cross-entropy beside a temperature ≠ 1, or when a row's tail
    underflows in the shifted sum (see :class:`_StudentBins`)."""
    _, values, indices, tail = teacher
    T = spec["temperature"]
    ce_weight, labels = spec["ce_weight"], spec["ce_labels"]
    with_ce = ce_weight != 0.0 and labels is not None
    if with_ce and T != 1.0:
        return None
    idx = _take(indices, rows).long()
    with torch.no_grad():
        z = fp32(logits)
        zt = z / T if T != 1.0 else z
        e, m, total, rest, log_top, bins = _bins_forward(zt, idx)
        if idx.shape[-1] < z.shape[-1] and bool((rest == 0).any()):
            return None
        log_p = _collapse_teacher(_take(values, rows), None if tail is None else _take(tail, rows)).to(bins.dtype)
        w = weights.to(z.dtype)
    with torch.enable_grad():
        leaf = bins.requires_grad_()
        per = _divergence(leaf, log_p, spec["divergence"], spec["beta"], spec["alpha"]) * (T * T)
        kd = (w * per).sum()
        g = torch.autograd.grad(kd, leaf)[0]
    with torch.no_grad():
        loss = kd.detach()
        ce_scale = None
        if with_ce:
            y = _take(labels, rows)
            valid = y != IGNORE_INDEX
            safe = torch.where(valid, y, 0)[:, None]
            nll = -(z.gather(-1, safe) - m - total.log()).squeeze(-1) * valid
            loss = loss + ce_weight * (w * nll).sum()
            ce_scale = (ce_weight * w * valid)[:, None]
        grad = _bins_backward(e, g, idx, total, rest, log_top, ce_scale)
        if ce_scale is not None:
            grad.scatter_add_(-1, safe, -ce_scale)
        if T != 1.0:
            grad.div_(T)
    return loss, grad


class _FusedLinearTokenLoss(torch.autograd.Function):
    """Forward computes the loss *and* its gradients chunk by chunk; backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, weights, teacher_a, teacher_b, teacher_c, kind, spec):  # noqa: D102
        needs_h, needs_w, needs_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        teacher = (kind, teacher_a, teacher_b, teacher_c)
        dtype = torch.promote_types(hidden.dtype, weight.dtype)
        grad_h = torch.zeros_like(hidden) if needs_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32 if weight.dtype in (torch.float16, torch.bfloat16)
                             else weight.dtype, device=weight.device) if needs_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32 if bias.dtype in (torch.float16, torch.bfloat16)
                             else bias.dtype, device=bias.device) if needs_b else None
        total = torch.zeros((), dtype=torch.float64 if hidden.dtype == torch.float64 else torch.float32,
                            device=hidden.device)
        active = weights.reshape(-1).nonzero().squeeze(1).cpu()  # rows of weight 0 cost nothing
        chunk = spec["chunk_size"]
        w_d = weight.detach().to(dtype)
        b_d = None if bias is None else bias.detach().to(dtype)
        for start in range(0, active.numel(), chunk):
            run = active[start:start + chunk]
            first, last = int(run[0]), int(run[-1])
            # a contiguous run of rows (the usual case) is read as views, without copies
            rows = slice(first, last + 1) if last - first + 1 == run.numel() else run.to(hidden.device)
            h = _take(hidden.detach(), rows).to(dtype)
            with torch.autocast(hidden.device.type, enabled=False):
                # the logits' matmul outside autograd: the loss's gradient is taken with respect to the
                # logits alone, and the two backward matmuls below write straight into the accumulators
                with torch.no_grad():
                    logits = F.linear(h, w_d, b_d)
                chunk_weights = _take(weights.reshape(-1), rows)
                written = None  # the loss and its gradient written out, where we have them
                if spec["divergence"] == "forward_kl" and kind in ("logits", "hidden"):
                    written = _forward_kl_chunk(logits, rows, chunk_weights, teacher, spec)
                elif kind == "topk":
                    written = _topk_chunk(logits, rows, chunk_weights, teacher, spec)
                if written is not None:
                    z = logits
                    loss, g = written
                    g = g.to(dtype) if needs_h or needs_w or needs_b else None
                else:
                    with torch.enable_grad():
                        z = logits.requires_grad_(needs_h or needs_w or needs_b)
                        loss = _chunk_loss(z, rows, chunk_weights, teacher, spec)
                        g = torch.autograd.grad(loss, z)[0].to(dtype) if z.requires_grad else None
            total += loss.detach().to(total.dtype)
            if g is not None:
                if needs_h:
                    if isinstance(rows, slice):
                        torch.mm(g, w_d, out=grad_h[rows]) if grad_h.dtype == dtype else \
                            grad_h[rows].copy_(g @ w_d)
                    else:
                        grad_h.index_copy_(0, rows, (g @ w_d).to(grad_h.dtype))
                if needs_w:
                    if grad_w.dtype == dtype:
                        grad_w.addmm_(g.t(), h)
                    else:
                        grad_w += (g.t() @ h).to(grad_w.dtype)
                if needs_b:
                    grad_b += g.sum(0).to(grad_b.dtype)
            del logits, z, loss, g
        ctx.save_for_backward(*(g for g in (grad_h, grad_w, grad_b) if g is not None))
        ctx.which = (needs_h, needs_w, needs_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):  # noqa: D102
        saved = list(ctx.saved_tensors)
        out = []
        for need, dtype in zip(ctx.which, ctx.dtypes):
            out.append((saved.pop(0) * grad_output).to(dtype) if need else None)
        return (*out, None, None, None, None, None, None)


def fused_linear_token_loss(
    hidden: Tensor,
    weight: Tensor,
    teacher: Tensor | TopK | tuple[Tensor, ...],
    weights: Tensor,
    divergence: str = "forward_kl",
    *,
    bias: Tensor | None = None,
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    ce_labels: Tensor | None = None,
    ce_weight: float = 0.0,
) -> Tensor:
    r"""A token-level loss fused with the student's output layer, computed in chunks of tokens.

    Shapes: ``hidden`` ``(N, H)`` (the student's last hidden states, the rows of the tokens),
    ``weight`` ``(V, H)`` and ``bias`` ``(V,)`` (its ``lm_head``), ``weights`` ``(N,)`` (each token's
    weight, e.g. :func:`token_weights` flattened), ``ce_labels`` ``(N,)`` long (-100: no CE) → scalar

    .. math::
        \sum_n w_n \big(D(h_n W^\top + b,\; t_n) + \lambda_{ce}\, CE(h_n W^\top + b,\; y_n)\big)

    with ``D`` = :func:`token_divergence` (or :func:`topk_token_divergence`) and ``CE`` at
    temperature 1. ``teacher`` is the teacher's ``(N, V)`` logits (any float dtype), a
    :class:`TopK` of ``(N, k)`` log-probs, ids and ``(N,)`` tail, or ``(teacher_hidden (N, Ht),
    teacher_weight (V, Ht)[, teacher_bias (V,)])`` whose logits are made one chunk at a time.

    Equal, values and gradients, to that composition written naively, but the student's logits
    exist for ``chunk_size`` rows at a time only: the forward computes each chunk's logits (in the
    promoted dtype of ``hidden`` and ``weight``, autocast off, then float32 for the loss), its loss
    and, with ``torch.autograd.grad``, its gradients for ``hidden``, ``weight`` and ``bias``, and
    frees the chunk (Liger-Kernel's fused linear losses do the same); the backward only scales the
    stored gradients by the incoming one (so it is differentiable once). Rows of weight 0 are never
    computed. ``weights`` and the teacher receive no gradient.
    """
    _check_hparams(divergence, beta, alpha, temperature)
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be (N, H) and weight (V, H) with the same H, got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    N, V = hidden.shape[0], weight.shape[0]
    if bias is not None and tuple(bias.shape) != (V,):
        raise ValueError(f"bias must be (V,) = ({V},), got {tuple(bias.shape)}")
    if tuple(weights.shape) != (N,):
        raise ValueError(f"weights must be (N,) = ({N},) (one per row of hidden), got {tuple(weights.shape)}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    if not (isinstance(ce_weight, (int, float)) and math.isfinite(ce_weight) and ce_weight >= 0):
        raise ValueError(f"ce_weight must be a finite number >= 0, got {ce_weight!r}")
    if ce_weight and ce_labels is None:
        raise ValueError(f"ce_weight = {ce_weight} needs ce_labels (N,)")
    if ce_labels is not None:
        if tuple(ce_labels.shape) != (N,):
            raise ValueError(f"ce_labels must be (N,) = ({N},), got {tuple(ce_labels.shape)}")
        _check_labels(ce_labels, V)
    if isinstance(teacher, TopK):
        kind, a, b, c = "topk", teacher.values, teacher.indices.long(), teacher.tail
        if tuple(a.shape[:1]) != (N,) or a.dim() != 2:
            raise ValueError(f"top-k teacher values must be (N, k) = ({N}, k), got {tuple(a.shape)}")
        _check_same_shape(a, b, "top-k values/indices")
        if a.shape[1] > V:
            raise ValueError(f"top-k teacher has k = {a.shape[1]} > the vocabulary size {V}")
        if c is not None and tuple(c.shape) != (N,):
            raise ValueError(f"top-k tail must be (N,) = ({N},), got {tuple(c.shape)}")
    elif isinstance(teacher, Tensor):
        kind, a, b, c = "logits", teacher, None, None
        if tuple(teacher.shape) != (N, V):
            raise ValueError(f"teacher logits have shape {tuple(teacher.shape)} but the student's would be "
                             f"(N, V) = ({N}, {V}); they must be equal (same tokens, same vocabulary)")
    elif isinstance(teacher, (tuple, list)) and len(teacher) in (2, 3):
        kind, a, b = "hidden", teacher[0], teacher[1]
        c = teacher[2] if len(teacher) == 3 else None
        if a.dim() != 2 or a.shape[0] != N or b.dim() != 2 or b.shape != (V, a.shape[1]):
            raise ValueError(f"teacher (hidden, weight) must be ((N, Ht), (V, Ht)) = (({N}, Ht), ({V}, Ht)), got "
                             f"({tuple(a.shape)}, {tuple(b.shape)})")
        a, b, c = a.detach(), b.detach(), None if c is None else c.detach()
    else:
        raise TypeError(f"teacher must be (N, V) logits, a TopK or (teacher_hidden, teacher_weight), "
                        f"got {type(teacher).__name__}")
    spec = dict(divergence=divergence, beta=float(beta), alpha=float(alpha), temperature=float(temperature),
                chunk_size=chunk_size, ce_weight=float(ce_weight), ce_labels=ce_labels)
    return _FusedLinearTokenLoss.apply(hidden, weight, bias, weights.detach(), a, b, c, kind, spec)
