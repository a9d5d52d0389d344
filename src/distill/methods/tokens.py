"""Token-level distillation of language models: one divergence per next-token distribution.

:class:`TokenKD` reads the student's logits ``(B, L, V)`` (or, fused with its ``lm_head`` when
``chunk_size`` is set, its last hidden states ``(B, L, H)``), the teacher's logits ``(B, L, V)`` or
a cached top-k teacher, and the labels ``(B, L)`` (-100: no loss; for causal LMs the logits at
``t`` are compared where ``labels[t + 1]`` is a token). The registered names fix the divergence and
carry their paper's defaults: ``token_kl``, ``token_rkl``, ``gkd``, ``distillm``, ``skew_rkl``,
``token_tvd``. The math is in :mod:`distill.functional.tokens`.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.batch import Batch, View
from distill.functional._precision import fp32
from distill.functional.tokens import (
    _NO_TOKEN_WARNING,
    DIVERGENCES,
    REDUCTIONS,
    TopK,
    _check_labels,
    _graph_zero,
    fused_linear_token_loss,
    token_divergence,
    token_mask,
    token_weights,
    topk_token_divergence,
)
from distill.methods.base import Method, Paper, register
from distill.taps import lm_body_and_head

TOPK_KEYS = ("topk_values", "topk_indices")


def _aligned_labels(labels: Tensor, causal: bool) -> Tensor:
    """The label each logit row predicts: ``labels[:, t + 1]`` (causal; -100 at the end) or ``labels``."""
    if not causal:
        return labels
    out = torch.full_like(labels, -100)
    out[:, :-1] = labels[:, 1:]
    return out


class TokenKD(Method):
    """Token-level KD: ``Σ_tokens weight · D(teacher, student)`` over the labelled positions.

    Args:
        divergence: one of ``forward_kl``, ``reverse_kl``, ``jsd``, ``skew_kl``,
            ``skew_reverse_kl``, ``tvd`` (:func:`distill.functional.token_divergence`).
        T: temperature dividing both logits; the divergence is multiplied by ``T²``.
        beta: the teacher's share of the JSD mixture (``jsd``).
        alpha: the skew of ``skew_kl`` / ``skew_reverse_kl``.
        reduction: ``"token"`` (mean over labelled tokens), ``"sequence"`` (mean per sequence,
            then over sequences) or ``"sum"`` (:func:`distill.functional.token_weights`).
        causal: the logits at ``t`` predict the label at ``t + 1`` (decoder-only LMs, labels not
            shifted, the Hugging Face convention); ``False`` for seq2seq decoders and encoders.
        chunk_size: ``None``: read the student's logits. An int: fused mode: the Distiller runs the
            student's body only, this loss applies its ``lm_head`` ``chunk_size`` tokens at a time
            (:func:`distill.functional.fused_linear_token_loss`) so the student's (tokens × vocabulary)
            float32 logits never exist for the whole batch.
        ce: weight of the student's own cross-entropy on the labels, added per token with the same
            reduction (in fused mode there are no logits for a separate ``ce`` loss).
        weight: the Distiller's multiplier for this loss.

    Teacher: ``teacher_view["logits"]`` ``(B, L, V)``, or a top-k teacher
    ``teacher_view["topk_values"]`` ``(B, L, k)`` (log-probabilities), ``["topk_indices"]``
    ``(B, L, k)`` and optionally ``["topk_tail"]`` ``(B, L)`` (the remaining mass) and
    ``["topk_temperature"]`` (the temperature the log-probabilities were made at, 1 if absent;
    it must equal ``T``, since the tail bin of a stored top-k cannot be re-tempered exactly).
    """

    needs_targets = True
    reads_teacher_logits = True
    student_output = "logits"

    def __init__(
        self,
        divergence: str = "forward_kl",
        *,
        T: float = 1.0,
        beta: float = 0.5,
        alpha: float = 0.1,
        reduction: str = "token",
        causal: bool = True,
        chunk_size: int | None = None,
        ce: float = 0.0,
        weight: float = 1.0,
        warmup_epochs: int = 0,
    ) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        if divergence not in DIVERGENCES:
            raise ValueError(f"unknown divergence {divergence!r}; expected one of {', '.join(DIVERGENCES)}")
        if isinstance(T, bool) or not isinstance(T, (int, float)) or not (math.isfinite(T) and T > 0):
            raise ValueError(f"temperature T must be a finite number > 0, got {T!r}")
        if not (isinstance(beta, (int, float)) and 0.0 <= beta <= 1.0):
            raise ValueError(f"beta must be in [0, 1], got {beta!r}")
        if not (isinstance(alpha, (int, float)) and 0.0 <= alpha < 1.0):
            raise ValueError(f"alpha must be in [0, 1), got {alpha!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"unknown reduction {reduction!r}; expected one of {', '.join(REDUCTIONS)}")
        if not isinstance(causal, bool):
            raise ValueError(f"causal must be True or False, got {causal!r}")
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 1):
            raise ValueError("chunk_size must be None (use the student's logits) or an integer >= 1, "
                             f"got {chunk_size!r}")
        if isinstance(ce, bool) or not isinstance(ce, (int, float)) or not (math.isfinite(ce) and ce >= 0):
            raise ValueError(f"ce (the cross-entropy weight) must be a finite number >= 0, got {ce!r}")
        self.divergence = divergence
        self.T = float(T)
        self.beta = float(beta)
        self.alpha = float(alpha)
        self.reduction = reduction
        self.causal = causal
        self.chunk_size = chunk_size
        self.ce = float(ce)
        if chunk_size is not None:
            self.student_output = "hidden"
        self._head: tuple[nn.Linear, ...] = ()  # the student's lm_head in fused mode (kept out of the module tree)

    @property
    def label(self) -> str:
        return self.name or type(self).__name__

    def bind_models(self, student: nn.Module, teacher: nn.Module | None, example: Batch) -> None:
        if self.causal and getattr(getattr(student, "config", None), "is_encoder_decoder", False):
            raise ValueError(f"loss {self.label!r}: the student {type(student).__name__} is an encoder-decoder, whose "
                             "decoder logits are aligned with their labels: set causal=False")
        if self.chunk_size is not None:
            self._head = (lm_body_and_head(student)[1],)

    # ------------------------------------------------------------------ views
    def _labels(self, batch: Batch, shape: tuple[int, ...]) -> Tensor:
        labels = batch.targets
        if labels is None:
            raise ValueError(f"loss {self.label!r} needs labels (B, L), but the batch has no targets")
        if tuple(labels.shape) != tuple(shape):
            raise ValueError(f"loss {self.label!r}: labels have shape {tuple(labels.shape)} but the student's "
                             f"tokens {tuple(shape)}; expected labels (B, L) = {tuple(shape)}")
        return labels

    def _teacher(self, teacher_view: View, B: int, L: int) -> Tensor | TopK:
        if "logits" in teacher_view:
            t = teacher_view["logits"].detach()
            if t.dim() != 3 or tuple(t.shape[:2]) != (B, L):
                raise ValueError(f"loss {self.label!r}: the teacher's logits have shape {tuple(t.shape)}, expected "
                                 f"(B, L, V) with (B, L) = ({B}, {L})")
            return t
        if all(k in teacher_view for k in TOPK_KEYS):
            values, indices = teacher_view["topk_values"].detach(), teacher_view["topk_indices"]
            if values.dim() != 3 or tuple(values.shape[:2]) != (B, L):
                raise ValueError(f"loss {self.label!r}: the teacher's topk_values have shape {tuple(values.shape)}, "
                                 f"expected (B, L, k) with (B, L) = ({B}, {L})")
            made_at = float(teacher_view["topk_temperature"]) if "topk_temperature" in teacher_view else 1.0
            if not math.isclose(made_at, self.T):
                raise ValueError(f"loss {self.label!r}: T={self.T:g} but the teacher's top-k log-probabilities were "
                                 f"made at temperature {made_at:g}; the tail bin of a stored top-k cannot be "
                                 f"re-tempered exactly: set T={made_at:g} or build the top-k at T={self.T:g}")
            tail = teacher_view.get("topk_tail")
            return TopK(values, indices.long(), None if tail is None else tail.detach())
        raise KeyError(f"loss {self.label!r} needs the teacher's 'logits' (B, L, V) or a top-k teacher "
                       f"({', '.join(TOPK_KEYS)}); the teacher view has {sorted(teacher_view)}")

    # ---------------------------------------------------------------- forward
    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        key = "hidden" if self.chunk_size is not None else "logits"
        if key not in student_view:
            raise KeyError(f"loss {self.label!r} reads the student's {key!r} "
                           + ("(fused mode, chunk_size set: run it through the Distiller, which runs the student's "
                              "body alone) " if key == "hidden" else "")
                           + f"but the student view has {sorted(student_view)}")
        if key == "hidden" and not self._head:
            raise RuntimeError(f"loss {self.label!r} is fused with the student's lm_head (chunk_size is set) but has "
                               "not seen the student: use it through a Distiller, or call "
                               "bind_models(student, teacher, batch) first")
        s = student_view[key]
        if s.dim() != 3:
            raise ValueError(f"loss {self.label!r}: the student's {key} must be (B, L, ·), got {tuple(s.shape)}")
        B, L = s.shape[:2]
        labels = self._labels(batch, (B, L))
        teacher = self._teacher(teacher_view, B, L)
        V = self._head[0].out_features if key == "hidden" else s.shape[-1]
        _check_labels(labels, V)
        mask = token_mask(labels, self.causal)
        weights = token_weights(mask, self.reduction, torch.float64 if s.dtype == torch.float64 else torch.float32)
        weights = weights.flatten()
        targets = _aligned_labels(labels, self.causal).flatten()
        kw = dict(beta=self.beta, alpha=self.alpha, temperature=self.T)
        if self.chunk_size is not None:
            return self._fused(s, teacher, weights, targets, kw)
        rows = mask.flatten().nonzero().squeeze(1)
        if rows.numel() == 0:
            warnings.warn(_NO_TOKEN_WARNING, RuntimeWarning, stacklevel=2)
            return _graph_zero(s)
        s_rows = s.reshape(-1, V).index_select(0, rows)
        if isinstance(teacher, TopK):
            pick = lambda x: x.reshape(-1, *x.shape[2:]).index_select(0, rows)  # noqa: E731
            per = topk_token_divergence(s_rows, pick(teacher.values), pick(teacher.indices), self.divergence,
                                        tail=None if teacher.tail is None else pick(teacher.tail), **kw)
        else:
            if teacher.shape[-1] != V:
                raise ValueError(f"loss {self.label!r}: the student's logits have {V} vocabulary entries but the "
                                 f"teacher's {teacher.shape[-1]}; build both with one tokenizer's vocabulary")
            per = token_divergence(s_rows, teacher.reshape(-1, V).index_select(0, rows), self.divergence, **kw)
        if self.ce:
            per = per + self.ce * F.cross_entropy(fp32(s_rows), targets.index_select(0, rows), reduction="none")
        return (per * weights.index_select(0, rows)).sum()

    def _fused(self, hidden: Tensor, teacher: Tensor | TopK, weights: Tensor, targets: Tensor, kw: dict) -> Tensor:
        head = self._head[0]
        H = hidden.shape[-1]
        if isinstance(teacher, TopK):
            flat = TopK(teacher.values.reshape(-1, teacher.values.shape[-1]),
                        teacher.indices.reshape(-1, teacher.indices.shape[-1]),
                        None if teacher.tail is None else teacher.tail.reshape(-1))
        else:
            if teacher.shape[-1] != head.out_features:
                raise ValueError(f"loss {self.label!r}: the student's lm_head has {head.out_features} vocabulary "
                                 f"entries but the teacher's logits {teacher.shape[-1]}; build both with one "
                                 "tokenizer's vocabulary")
            flat = teacher.reshape(-1, teacher.shape[-1])
        return fused_linear_token_loss(hidden.reshape(-1, H), head.weight, flat, weights.to(hidden.device),
                                       self.divergence, bias=head.bias, chunk_size=self.chunk_size,
                                       ce_labels=targets if self.ce else None, ce_weight=self.ce, **kw)

    def extra_repr(self) -> str:
        parts = [f"divergence={self.divergence!r}", f"T={self.T}"]
        if self.divergence == "jsd":
            parts.append(f"beta={self.beta}")
        if self.divergence.startswith("skew"):
            parts.append(f"alpha={self.alpha}")
        parts += [f"reduction={self.reduction!r}", f"causal={self.causal}"]
        if self.chunk_size is not None:
            parts.append(f"chunk_size={self.chunk_size}")
        if self.ce:
            parts.append(f"ce={self.ce}")
        return ", ".join(parts + [f"weight={self.weight}"])


@register(
    "token_kl",
    "tokens",
    Paper(
        title="Sequence-Level Knowledge Distillation",
        authors="Y. Kim, A. M. Rush",
        year=2016,
        arxiv="1606.07947",
        venue="EMNLP",
    ),
)
class TokenKL(TokenKD):
    """Word-level KD: forward KL(p_teacher ‖ q_student) per token, ``T²``-scaled.

    Kim & Rush's word-level knowledge distillation (EMNLP 2016, arXiv 1606.07947) — Hinton, Vinyals
    and Dean's soft targets ("Distilling the Knowledge in a Neural Network", 2015, arXiv 1503.02531)
    applied to every next-token distribution. Kim & Rush write the cross-entropy
    ``−Σ p log q``; the KL differs from it by the teacher's entropy, a constant for the student
    (same gradients, 0 at a perfect match). ``T = 1``: Kim & Rush use the teacher's distribution
    as it is.
    """

    def __init__(self, *, T: float = 1.0, reduction: str = "token", causal: bool = True, chunk_size: int | None = None,
                 ce: float = 0.0, weight: float = 1.0, warmup_epochs: int = 0) -> None:
        super().__init__("forward_kl", T=T, reduction=reduction, causal=causal, chunk_size=chunk_size, ce=ce,
                         weight=weight, warmup_epochs=warmup_epochs)


@register(
    "token_rkl",
    "tokens",
    Paper(
        title="MiniLLM: Knowledge Distillation of Large Language Models",
        authors="Y. Gu, L. Dong, F. Wei, M. Huang",
        year=2024,
        arxiv="2306.08543",
        venue="ICLR",
    ),
)
class TokenRKL(TokenKD):
    """Reverse KL(q_student ‖ p_teacher) per token, ``T²``-scaled: mode-seeking.

    MiniLLM (Gu et al., ICLR 2024, arXiv 2306.08543) argues for the reverse KL in LM distillation
    (a small student should not spread mass over the teacher's low-probability regions). MiniLLM
    itself minimises the *sequence-level* reverse KL by policy gradient on the student's samples;
    this is the token-level reverse KL on the given tokens (its single-step term), not that
    algorithm. ``T = 1``.
    """

    def __init__(self, *, T: float = 1.0, reduction: str = "token", causal: bool = True, chunk_size: int | None = None,
                 ce: float = 0.0, weight: float = 1.0, warmup_epochs: int = 0) -> None:
        super().__init__("reverse_kl", T=T, reduction=reduction, causal=causal, chunk_size=chunk_size, ce=ce,
                         weight=weight, warmup_epochs=warmup_epochs)


@register(
    "gkd",
    "tokens",
    Paper(
        title="On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes",
        authors="R. Agarwal, N. Vieillard, Y. Zhou, P. Stanczyk, S. Ramos, M. Geist, O. Bachem",
        year=2024,
        arxiv="2306.13649",
        venue="ICLR",
    ),
)
class GKD(TokenKD):
    """Generalized JSD(β) per token (GKD's divergence), ``T²``-scaled.

    ``β KL(p ‖ m) + (1 − β) KL(q ‖ m)``, ``m = β p + (1 − β) q`` with ``p`` the teacher (GKD Eq. 1);
    ``β = 0`` / ``1`` give forward / reverse KL (the limits, as TRL does; see
    :func:`distill.functional.token_divergence`). ``beta = 0.5`` (the symmetric JSD) is TRL's
    ``GKDConfig`` default; the paper reports several β (0.1, 0.5, 0.9) and prescribes none. GKD's
    on-policy part (the student's own samples with probability λ) is a data regime, not this loss.
    ``T = 1``.
    """

    def __init__(self, *, beta: float = 0.5, T: float = 1.0, reduction: str = "token", causal: bool = True,
                 chunk_size: int | None = None, ce: float = 0.0, weight: float = 1.0, warmup_epochs: int = 0) -> None:
        super().__init__("jsd", T=T, beta=beta, reduction=reduction, causal=causal, chunk_size=chunk_size, ce=ce,
                         weight=weight, warmup_epochs=warmup_epochs)


_DISTILLM = Paper(
    title="DistiLLM: Towards Streamlined Distillation for Large Language Models",
    authors="J. Ko, S. Kim, T. Chen, S.-Y. Yun",
    year=2024,
    arxiv="2402.03898",
    venue="ICML",
)


@register("distillm", "tokens", _DISTILLM)
class DistiLLM(TokenKD):
    """Skew KL: KL(p ‖ α p + (1 − α) q) per token, ``T²``-scaled (DistiLLM's α-SKL).

    ``alpha = 0.1`` is the paper's choice and the default of the authors' code (``--skew-alpha``,
    ``distillm/losses.py``). The authors' code computes the cross-entropy ``−Σ p log m``, which
    differs from this KL by the teacher's entropy (a constant for the student). DistiLLM's
    adaptive off-policy student generation is a data regime, not this loss. ``T = 1``.
    """

    def __init__(self, *, alpha: float = 0.1, T: float = 1.0, reduction: str = "token", causal: bool = True,
                 chunk_size: int | None = None, ce: float = 0.0, weight: float = 1.0, warmup_epochs: int = 0) -> None:
        super().__init__("skew_kl", T=T, alpha=alpha, reduction=reduction, causal=causal, chunk_size=chunk_size,
                         ce=ce, weight=weight, warmup_epochs=warmup_epochs)


@register("skew_rkl", "tokens", _DISTILLM)
class SkewRKL(TokenKD):
    """Skew reverse KL: KL(q ‖ (1 − α) p + α q) per token, ``T²``-scaled (DistiLLM's α-SRKL).

    ``alpha = 0.1`` as in the paper and the authors' code. ``T = 1``.
    """

    def __init__(self, *, alpha: float = 0.1, T: float = 1.0, reduction: str = "token", causal: bool = True,
                 chunk_size: int | None = None, ce: float = 0.0, weight: float = 1.0, warmup_epochs: int = 0) -> None:
        super().__init__("skew_reverse_kl", T=T, alpha=alpha, reduction=reduction, causal=causal,
                         chunk_size=chunk_size, ce=ce, weight=weight, warmup_epochs=warmup_epochs)


@register(
    "token_tvd",
    "tokens",
    Paper(
        title="f-Divergence Minimization for Sequence-Level Knowledge Distillation",
        authors="Y. Wen, Z. Li, W. Du, L. Mou",
        year=2023,
        arxiv="2307.15190",
        venue="ACL",
    ),
)
class TokenTVD(TokenKD):
    """Total variation distance ½ Σ |p − q| per token, ``T²``-scaled.

    One of the four f-divergences of f-DISTILL (Wen et al., ACL 2023, arXiv 2307.15190), whose
    step-wise decomposition gives this word-level loss on the given tokens (the paper's TVD
    variant also mixes teacher- and student-sampled sequences, a data regime). ``T = 1``.
    """

    def __init__(self, *, T: float = 1.0, reduction: str = "token", causal: bool = True, chunk_size: int | None = None,
                 ce: float = 0.0, weight: float = 1.0, warmup_epochs: int = 0) -> None:
        super().__init__("tvd", T=T, reduction=reduction, causal=causal, chunk_size=chunk_size, ce=ce,
                         weight=weight, warmup_epochs=warmup_epochs)
