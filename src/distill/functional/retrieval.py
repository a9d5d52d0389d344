r"""Score- and interaction-level losses of retrieval and vision-language distillation.

Notation: a *score matrix* ``S`` of shape ``(B, C)`` holds, for each of ``B`` queries (or images),
the scores of ``C`` candidates (passages, captions; with in-batch negatives ``C = B`` and the
positive of row ``i`` in column ``i``). A *listwise* distribution is a softmax over one row:
``q_i = softmax(S_i / T)`` for the student, ``p_i = softmax(T_i / T)`` for the teacher.

======================== =====================================================================================
``listwise_kl``          :math:`\frac{T^2}{B}\sum_i KL(p_i \| q_i)` over the valid candidates of each row
``late_interaction``     ColBERT MaxSim: :math:`s(q, d) = \sum_{a} \max_{b} \langle u_a, v_b \rangle` (masked)
``token_attention_kl``   :math:`\frac{1}{N}\sum_{rows} KL(A^t_{row} \| softmax(L^s_{row}))` over valid rows
``object_distillation``  KD-VLP: :math:`\|W f_k - f^t_k\|^2` (mean over objects and dims) and
                         :math:`KL(p^t_k \| softmax(z_k))` (mean over objects)
======================== =====================================================================================

Teacher tensors are detached in every function (they are targets); computations run in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["in_batch_contrastive", "late_interaction", "listwise_kl", "object_distillation", "token_attention_kl"]


def _check_scores(student: Tensor, teacher: Tensor, what: str) -> None:
    if student.dim() != 2 or student.shape != teacher.shape:
        raise ValueError(f"{what} needs two (B, C) score matrices of one shape; got student {tuple(student.shape)}, "
                         f"teacher {tuple(teacher.shape)}")


def _check_T(T: float, what: str) -> None:
    if not (isinstance(T, (int, float)) and T > 0):
        raise ValueError(f"{what}: temperature must be a number > 0, got {T!r}")


def listwise_kl(student_scores: Tensor, teacher_scores: Tensor, T: float = 1.0, *,
                teacher_T: float | None = None, mask: Tensor | None = None, scale_T2: bool = True) -> Tensor:
    r"""Listwise distillation of candidate scores: :math:`\frac{1}{B}\sum_i KL(p_i\|q_i)\cdot T^2`.

    Args:
        student_scores: ``(B, C)`` the student's scores (e.g. dot products of a dual encoder).
        teacher_scores: ``(B, C)`` the teacher's scores of the same candidates (detached here).
        T: temperature dividing the student's scores (and the teacher's unless ``teacher_T``).
        teacher_T: a separate temperature for the teacher's scores (``None``: ``T``).
        mask: optional ``(B, C)`` bool, True where a candidate is in the list; each row needs one.
        scale_T2: multiply by ``T**2`` (Hinton et al.'s convention; the project's default).

    Returns:
        A scalar: the KL averaged over the ``B`` rows (``batchmean``).
    """
    _check_scores(student_scores, teacher_scores, "listwise_kl")
    _check_T(T, "listwise_kl")
    tT = T if teacher_T is None else teacher_T
    _check_T(tT, "listwise_kl teacher_T")
    s = student_scores.float() / T
    t = teacher_scores.detach().float() / tT
    if mask is not None:
        if mask.shape != s.shape:
            raise ValueError(f"listwise_kl mask must be (B, C) = {tuple(s.shape)}, got {tuple(mask.shape)}")
        if not bool(mask.any(dim=1).all()):
            raise ValueError("listwise_kl mask leaves a row with no candidate")
        s = s.masked_fill(~mask, float("-inf"))
        t = t.masked_fill(~mask, float("-inf"))
    log_q = F.log_softmax(s, dim=1)
    log_p = F.log_softmax(t, dim=1)
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    loss = terms.sum(dim=1).mean()
    return loss * (T * T) if scale_T2 else loss


def in_batch_contrastive(scores: Tensor, T: float = 1.0, positives: Tensor | None = None) -> Tensor:
    """Cross-entropy of each row of ``scores`` ``(B, C)`` / ``T`` against its positive column
    (``positives`` ``(B,)`` long; default ``arange(B)``, the in-batch diagonal). The supervised
    objective a dual encoder trains with, with or without distillation."""
    _check_T(T, "in_batch_contrastive")
    if scores.dim() != 2:
        raise ValueError(f"in_batch_contrastive needs (B, C) scores, got {tuple(scores.shape)}")
    if positives is None:
        if scores.shape[1] < scores.shape[0]:
            raise ValueError(f"in-batch positives need C >= B, got scores {tuple(scores.shape)}")
        positives = torch.arange(scores.shape[0], device=scores.device)
    return F.cross_entropy(scores.float() / T, positives)


def late_interaction(query_tokens: Tensor, doc_tokens: Tensor, query_mask: Tensor | None = None,
                     doc_mask: Tensor | None = None, *, normalize: bool = True, pairwise: bool = True,
                     reduce: str = "sum") -> Tensor:
    r"""ColBERT's late-interaction score (Khattab & Zaharia 2020), also the *MrSw* fine-grained
    alignment (max over regions, sum over words) that ALADIN's alignment head computes:
    :math:`s(q, d) = \sum_a \max_b \cos(u_a, v_b)` over valid query tokens ``a`` / document tokens ``b``.

    Args:
        query_tokens: ``(B, Lq, D)`` token (word) embeddings of the queries.
        doc_tokens: ``(C, Ld, D)`` token (region) embeddings of the candidates; with ``pairwise=False``
            ``(B, Ld, D)``, one candidate per query.
        query_mask: ``(B, Lq)`` bool/0-1, valid query tokens (default all).
        doc_mask: ``(C, Ld)`` (or ``(B, Ld)``) valid document tokens (default all).
        normalize: L2-normalise token vectors first (cosine); False: raw dot products.
        pairwise: score every query against every candidate (``(B, C)``); False: ``(B,)``.
        reduce: ``"sum"`` over query tokens (ColBERT, ALADIN) or ``"mean"`` (length-independent).

    Returns:
        ``(B, C)`` scores, or ``(B,)`` with ``pairwise=False``.
    """
    if reduce not in ("sum", "mean"):
        raise ValueError(f"late_interaction reduce must be 'sum' or 'mean', got {reduce!r}")
    if query_tokens.dim() != 3 or doc_tokens.dim() != 3 or query_tokens.shape[-1] != doc_tokens.shape[-1]:
        raise ValueError(f"late_interaction needs (B, Lq, D) and (C, Ld, D) with one D; got "
                         f"{tuple(query_tokens.shape)}, {tuple(doc_tokens.shape)}")
    u, v = query_tokens.float(), doc_tokens.float()
    if normalize:
        u, v = F.normalize(u, dim=-1), F.normalize(v, dim=-1)
    qm = torch.ones(u.shape[:2], dtype=torch.bool, device=u.device) if query_mask is None else query_mask.bool()
    dm = torch.ones(v.shape[:2], dtype=torch.bool, device=v.device) if doc_mask is None else doc_mask.bool()
    if pairwise:
        # chunks of queries keep the (chunk, C, Lq, Ld) similarity tensor near 2**24 elements
        step = max(1, (1 << 24) // max(1, v.shape[0] * u.shape[1] * v.shape[1]))
        totals = []
        for start in range(0, u.shape[0], step):
            sim = torch.einsum("bad,cld->bcal", u[start:start + step], v)   # (chunk, C, Lq, Ld)
            sim = sim.masked_fill(~dm[None, :, None, :], float("-inf"))
            best = sim.max(dim=-1).values                                   # (chunk, C, Lq)
            totals.append(best.masked_fill(~qm[start:start + step, None, :], 0.0).sum(-1))
        total = torch.cat(totals)
        count = qm.sum(-1, keepdim=True).clamp_min(1)
    else:
        if u.shape[0] != v.shape[0]:
            raise ValueError(f"late_interaction pairwise=False needs one candidate per query; got {u.shape[0]} "
                             f"queries, {v.shape[0]} candidates")
        sim = torch.einsum("bad,bld->bal", u, v).masked_fill(~dm[:, None, :], float("-inf"))
        best = sim.max(dim=-1).values.masked_fill(~qm, 0.0)
        total = best.sum(-1)
        count = qm.sum(-1).clamp_min(1)
    return total / count if reduce == "mean" else total


def token_attention_kl(student_logits: Tensor, teacher_probs: Tensor, key_mask: Tensor | None = None,
                       row_mask: Tensor | None = None) -> Tensor:
    r"""KL between attention distributions, row by row: :math:`\frac1N\sum_r KL(A^t_r\|softmax(L^s_r))`.

    DiDE's cross-modal attention distillation (image→text and text→image rows of the fusion
    teacher's attention vs. the dual-encoder student's cross-modal attention computed from its
    separately encoded states) and ERNIE-Search's interaction distillation (a cross-encoder's
    query→passage attention vs. the late-interaction map) both take this form.

    Args:
        student_logits: ``(..., Lr, Lk)`` the student's attention *logits* (pre-softmax) per row.
        teacher_probs: ``(..., Lr, Lk)`` the teacher's attention probabilities (rows sum to 1 over
            the valid keys; detached here).
        key_mask: optional ``(..., Lk)`` valid keys (broadcast over rows); invalid keys get no mass.
        row_mask: optional ``(..., Lr)`` valid rows; the mean runs over valid rows only.

    Returns:
        A scalar: the KL summed over keys, averaged over every valid row (heads and batch included).
    """
    if student_logits.shape != teacher_probs.shape or student_logits.dim() < 2:
        raise ValueError(f"token_attention_kl needs student logits and teacher probabilities of one shape "
                         f"(..., Lr, Lk); got {tuple(student_logits.shape)}, {tuple(teacher_probs.shape)}")
    s = student_logits.float()
    p = teacher_probs.detach().float()
    if key_mask is not None:
        km = key_mask.bool().unsqueeze(-2)
        s = s.masked_fill(~km, float("-inf"))
        p = p.masked_fill(~km, 0.0)
    log_q = F.log_softmax(s, dim=-1)
    log_p = torch.log(p.clamp_min(1e-30))
    kl = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)   # (..., Lr)
    if row_mask is None:
        return kl.mean()
    rm = row_mask.bool().expand_as(kl)
    if not bool(rm.any()):
        raise ValueError("token_attention_kl row_mask selects no row")
    return kl[rm].mean()


def object_distillation(region_features: Tensor, teacher_features: Tensor, region_logits: Tensor,
                        teacher_probs: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    r"""KD-VLP's object knowledge distillation of the object-guided masked vision modelling task:
    feature regression :math:`\frac{1}{ND}\sum_k \|f_k - f^t_k\|^2` and label distillation
    :math:`\frac1N\sum_k KL(p^t_k\|softmax(z_k))` over the ``N`` (valid, masked) objects.

    Args:
        region_features: ``(B, K, D)`` the student's (projected) features at the objects' boxes.
        teacher_features: ``(B, K, D)`` the detector's RoI features of the same objects (detached).
        region_logits: ``(B, K, C)`` the student's object-class logits.
        teacher_probs: ``(B, K, C)`` the detector's class distributions (rows sum to 1; detached).
        mask: optional ``(B, K)`` bool, the objects that count (the masked ones); default all.

    Returns:
        ``(feature_loss, label_loss)``, two scalars.
    """
    if region_features.shape != teacher_features.shape or region_features.dim() != 3:
        raise ValueError(f"object_distillation needs (B, K, D) student and teacher features of one shape; got "
                         f"{tuple(region_features.shape)}, {tuple(teacher_features.shape)}")
    if region_logits.shape != teacher_probs.shape or region_logits.shape[:2] != region_features.shape[:2]:
        raise ValueError(f"object_distillation needs (B, K, C) logits and teacher probabilities over the same "
                         f"objects; got {tuple(region_logits.shape)}, {tuple(teacher_probs.shape)}")
    m = torch.ones(region_features.shape[:2], dtype=torch.bool, device=region_features.device) \
        if mask is None else mask.bool()
    if not bool(m.any()):
        raise ValueError("object_distillation mask selects no object")
    f = region_features.float()[m]
    ft = teacher_features.detach().float()[m]
    feat = ((f - ft) ** 2).mean()
    log_q = F.log_softmax(region_logits.float()[m], dim=-1)
    p = teacher_probs.detach().float()[m]
    label = torch.where(p > 0, p * (torch.log(p.clamp_min(1e-30)) - log_q), torch.zeros_like(p)).sum(-1).mean()
    return feat, label
