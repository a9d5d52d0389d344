r"""Losses between two encoder-decoders: the math of :mod:`distill.methods.seq2seq`.

* :func:`teaching_attention_loss`: Duan et al., "Zero-Shot Cross-Lingual Abstractive Sentence
  Summarization through Teaching Generation and Attention", ACL 2019 (ACL Anthology P19-1305; no
  arXiv version found): the student's encoder-decoder (cross-) attention is pulled toward the
  teacher's by the Frobenius norm of their difference.
* :func:`masked_token_kl`: per-token :math:`KL(p_T \| p_S)` averaged over the labelled target
  tokens (their "teaching generation", and the KD term of Liu et al. 2018, arXiv 1805.11224).
"""

from __future__ import annotations

import torch
from torch import Tensor

from distill.functional._precision import fp32
from distill.functional.tokens import token_divergence

__all__ = ["masked_token_kl", "relay_top_k", "teaching_attention_loss"]


def _check_mask(mask: Tensor, shape: tuple[int, ...], who: str) -> Tensor:
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{who}: the target mask has shape {tuple(mask.shape)}, expected (B, T) = {tuple(shape)}")
    return mask.bool()


def relay_top_k(attention: Tensor, k: int, value: float) -> Tensor:
    """A sparse target from attention rows ``(..., S)``: ``value`` at each row's ``k`` largest entries,
    0 elsewhere (the authors' released code's teacher attention, with an identity source alignment)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"relay_top_k k must be an int >= 1; got {k!r}")
    k = min(k, attention.shape[-1])
    out = torch.zeros_like(attention)
    return out.scatter_(-1, attention.topk(k, dim=-1).indices, float(value))


def teaching_attention_loss(student_attention: Tensor, teacher_attention: Tensor, mask: Tensor, *,
                            top_k: int | None = None, top_value: float = 0.3) -> Tensor:
    r"""``‖(Ā_S − Ā_T) ⊙ m‖_F / Σ m``: the teaching-attention loss of Duan et al. (ACL 2019).

    Shapes: ``student_attention`` ``(B, H_s, T, S)`` (or ``(B, T, S)``), ``teacher_attention``
    ``(B, H_t, T, S)`` (or ``(B, T, S)``), ``mask`` ``(B, T)`` (1 on the labelled target positions).
    ``Ā`` averages the heads (the attention a fairseq transformer decoder returns, which the authors'
    code reads), so the two models need not have as many heads; ``m`` keeps the labelled rows. The
    teacher is detached. ``top_k``: replace each teacher row by :func:`relay_top_k` (``top_value`` at
    its ``top_k`` largest source positions), the authors' code's target (``top_k=3``, ``0.3``) when
    the relay alignment is the identity. The Frobenius norm over the batch divided by the number of
    target tokens is what the authors' code optimises (``mse_loss(..., size_average=False).sqrt()``,
    the loss then normalised by the token count as fairseq does).
    """
    a_s = fp32(student_attention)
    a_t = fp32(teacher_attention.detach())
    if a_s.dim() == 4:
        a_s = a_s.mean(1)
    if a_t.dim() == 4:
        a_t = a_t.mean(1)
    if a_s.dim() != 3 or a_s.shape != a_t.shape:
        raise ValueError(f"teaching_attention_loss: the student's attention {tuple(student_attention.shape)} and the "
                         f"teacher's {tuple(teacher_attention.shape)} must be (B, H, T, S) (or (B, T, S)) with the "
                         "same B, T and S (one target, one source)")
    m = _check_mask(mask, tuple(a_s.shape[:2]), "teaching_attention_loss")
    if top_k is not None:
        a_t = relay_top_k(a_t, top_k, top_value)
    diff = (a_s - a_t) * m.unsqueeze(-1).to(a_s.dtype)
    return torch.linalg.vector_norm(diff) / m.sum().clamp_min(1)


def masked_token_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, temperature: float = 1.0) -> Tensor:
    r"""``Σ_{b,t} m_{bt} KL(p_T(·|b,t) ‖ p_S(·|b,t)) · T² / Σ m``: word-level KL over the labelled tokens.

    Shapes: logits ``(B, T, V)`` each (aligned: position ``t`` predicts target token ``t``, the
    encoder-decoder convention), ``mask`` ``(B, T)``. The teacher is detached.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 3:
        raise ValueError(f"masked_token_kl: logits must both be (B, T, V); got {tuple(student_logits.shape)} and "
                         f"{tuple(teacher_logits.shape)}")
    m = _check_mask(mask, tuple(student_logits.shape[:2]), "masked_token_kl")
    per = token_divergence(student_logits[m], teacher_logits[m], "forward_kl", temperature=temperature)
    return per.sum() / m.sum().clamp_min(1)
