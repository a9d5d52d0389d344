"""Distillation between encoder-decoders: teaching generation and attention (Duan et al. 2019) and the
search-based ensemble distillation of Liu et al. 2018 (reference and exploration states).

Both read aligned decoder logits ``(B, T, V)`` (position ``t`` predicts label ``t``: Hugging Face
encoder-decoders fed ``decoder_input_ids``, e.g. :func:`distill.data.seq2seq.seq2seq_loader`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.batch import Batch, TokenBatch, View
from distill.functional._precision import fp32
from distill.functional.seq2seq import masked_token_kl, teaching_attention_loss
from distill.methods.base import Method, Paper, register

__all__ = ["DUAN_2019", "LIU_2018", "ExploredBatch", "SearchKD", "TeachingAttention"]

IGNORE_INDEX = -100

DUAN_2019 = Paper(
    title="Zero-Shot Cross-Lingual Abstractive Sentence Summarization through Teaching Generation and Attention",
    authors="X. Duan, M. Yin, M. Zhang, B. Chen, W. Luo",
    year=2019,
    arxiv=None,
    venue="ACL (Anthology P19-1305)",
)

LIU_2018 = Paper(
    title="Distilling Knowledge for Search-based Structured Prediction",
    authors="Y. Liu, W. Che, H. Zhao, B. Qin, T. Liu",
    year=2018,
    arxiv="1805.11224",
    venue="ACL",
)


def _number(value: Any, name: str, who: str, *, positive: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and \
        (value > 0 if positive else value >= 0)
    if not ok:
        raise ValueError(f"{who} {name} must be a finite number {'> 0' if positive else '>= 0'}; got {value!r}")
    return float(value)


def _aligned(who: str, student_view: View, teacher_view: View, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
    """The student's and the teacher's logits ``(B, T, V)`` and the labels ``(B, T)``, checked."""
    for name, view in (("student", student_view), ("teacher", teacher_view)):
        if "logits" not in view:
            raise KeyError(f"loss {who!r} reads the {name}'s 'logits'; its view has {sorted(view)}")
    s, t, labels = student_view["logits"], teacher_view["logits"], batch.targets
    if labels is None:
        raise ValueError(f"loss {who!r} needs labels (B, T), but the batch has no targets")
    if s.dim() != 3 or s.shape != t.shape or tuple(labels.shape) != tuple(s.shape[:2]):
        raise ValueError(f"loss {who!r}: expected student and teacher logits (B, T, V) of one shape and labels (B, T); "
                         f"got {tuple(s.shape)}, {tuple(t.shape)} and {tuple(labels.shape)}")
    return s, t, labels


@register("teaching_attention", "seq2seq", DUAN_2019)
class TeachingAttention(Method):
    r"""Teaching generation and attention: ``generation · KL(p_T ‖ p_S) + attention · ‖Ā_S − Ā_T‖_F / N``.

    Duan et al., "Zero-Shot Cross-Lingual Abstractive Sentence Summarization through Teaching
    Generation and Attention", ACL 2019 (no arXiv version). A monolingual summariser (teacher)
    teaches a cross-lingual one (student) on pseudo pairs: its word distributions (teaching
    generation, :func:`~distill.functional.seq2seq.masked_token_kl`, averaged over the ``N``
    labelled target tokens) and its encoder-decoder attention
    (:func:`~distill.functional.seq2seq.teaching_attention_loss` on the ``layer``-th
    ``cross_attentions`` of both models, heads averaged).

    Sources: only the abstract of the paper could be read; the loss's form (plain sum of the two
    terms, KL summed over tokens, the Frobenius norm of the attention difference, token-count
    normalisation, the last decoder layer's head-averaged attention) follows the authors' released
    code (``Teaching-Attention`` criterion of KelleyYin/Cross-lingual-Summarization), hence the
    defaults ``generation = attention = 1``, ``layer = -1``. Departure: there the teacher reads the
    source in another language and its attention is *relayed* to the student's source through a
    translation model's alignment (each teacher row's top-3 source words, mapped, set to 0.3). Here
    both models read the same source, the relay is the identity, and the target is the teacher's
    dense attention (``top_k=None``) or, with ``top_k=3, top_value=0.3``, the code's sparse target.

    Views: ``logits`` ``(B, T, V)`` and ``cross_attentions.<layer>`` ``(B, H, T, S)`` of each model
    (Hugging Face encoder-decoders with eager attention); labels ``(B, T)`` with −100 off target.
    """

    def __init__(self, *, generation: float = 1.0, attention: float = 1.0, layer: int = -1, T: float = 1.0,
                 top_k: int | None = None, top_value: float = 0.3, weight: float = 1.0,
                 warmup_epochs: int = 0) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        who = "teaching_attention"
        self.generation = _number(generation, "generation (the KL weight)", who)
        self.attention = _number(attention, "attention (the attention-loss weight)", who)
        self.T = _number(T, "T", who, positive=True)
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ValueError(f"{who} layer must be an int (a decoder layer index, -1 the last); got {layer!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"{who} top_k must be None (the teacher's dense attention) or an int >= 1; got {top_k!r}")
        self.top_value = _number(top_value, "top_value", who)
        self.layer, self.top_k = layer, top_k
        tap = f"cross_attentions.{layer}"
        self.student_taps = [tap] if self.attention else []
        self.teacher_taps = [tap] if self.attention else []

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        s, t, labels = _aligned(self.name, student_view, teacher_view, batch)
        mask = labels != IGNORE_INDEX
        loss = s.new_zeros((), dtype=torch.float32)
        if self.generation:
            loss = loss + self.generation * masked_token_kl(s, t, mask, self.T)
        if self.attention:
            tap = self.student_taps[0]
            for name, view in (("student", student_view), ("teacher", teacher_view)):
                if tap not in view:
                    raise KeyError(f"loss {self.name!r} reads the {name}'s {tap!r} (cross-attention weights "
                                   f"(B, H, T, S)); its view has {sorted(view)}")
            loss = loss + self.attention * teaching_attention_loss(student_view[tap], teacher_view[tap], mask,
                                                                   top_k=self.top_k, top_value=self.top_value)
        return loss

    def extra_repr(self) -> str:
        return (f"generation={self.generation}, attention={self.attention}, layer={self.layer}, T={self.T}, "
                f"top_k={self.top_k}, weight={self.weight}")


@dataclass
class ExploredBatch(TokenBatch):
    """A seq2seq batch whose rows are reference states (the gold target, teacher-forced) or
    exploration states (a target sampled from the teacher ensemble): ``explored`` ``(B,)`` bool."""

    explored: Tensor | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ExploredBatch:
        moved = super().to(device, non_blocking)
        return replace(moved, explored=None if self.explored is None else self.explored.to(device))


@register("search_kd", "seq2seq", LIU_2018)
class SearchKD(Method):
    r"""Ensemble distillation on reference and exploration states (Liu et al., ACL 2018, arXiv 1805.11224).

    Per labelled target token ``t`` of row ``b`` (a search state: the source and the prefix
    ``y_{<t}``), with ``q`` the ensemble's averaged distribution (the teacher view's logits are
    ``log q``: :class:`~distill.teachers.EnsembleTeacher` with ``combine="probs"``) and ``p`` the
    student's::

        loss = (1 / N) Σ_{b,t} [ kd · KL(q ‖ p) + ce · [b is a reference row] · (−log p(y_t)) ]

    ``N`` the number of labelled tokens. Reference rows follow the gold prefix (teacher forcing: the
    reference policy's states); exploration rows follow a target the ensemble sampled
    (:func:`distill.strategies.search_kd.explore`), where there is no gold action, so only the
    distillation term applies. Rows are told apart by :class:`ExploredBatch`'s ``explored``
    (a plain batch is all reference rows).

    The paper writes the distillation term as the cross-entropy ``−Σ_a q(a) log p(a)``, which
    differs from ``KL(q ‖ p)`` by the ensemble's entropy (a constant for the student). Sources: the
    abstract and introduction were read (match the ensemble on reference states; let the ensemble
    explore and learn on the encountered states); the exact interpolation of the reference-state
    NLL and KD terms was not, so the weights are named for what they weight and both default to 1
    (this library's choice).
    """

    def __init__(self, *, kd: float = 1.0, ce: float = 1.0, T: float = 1.0, weight: float = 1.0,
                 warmup_epochs: int = 0) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        self.kd = _number(kd, "kd (the distillation weight)", "search_kd")
        self.ce = _number(ce, "ce (the reference-state NLL weight)", "search_kd")
        self.T = _number(T, "T", "search_kd", positive=True)

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        s, t, labels = _aligned(self.name, student_view, teacher_view, batch)
        mask = labels != IGNORE_INDEX
        n = mask.sum().clamp_min(1)
        loss = s.new_zeros((), dtype=torch.float32)
        if self.kd:
            loss = loss + self.kd * masked_token_kl(s, t, mask, self.T)
        if self.ce:
            explored = getattr(batch, "explored", None)
            reference = mask if explored is None else mask & ~explored.to(mask.device).bool().unsqueeze(1)
            if bool(reference.any()):
                nll = F.cross_entropy(fp32(s[reference]), labels[reference], reduction="sum")
                loss = loss + self.ce * nll / n
        return loss

    def extra_repr(self) -> str:
        return f"kd={self.kd}, ce={self.ce}, T={self.T}, weight={self.weight}"
