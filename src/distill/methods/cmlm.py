r"""Distilling a conditional masked language model (C-MLM) into a sequence-to-sequence student.

Chen, Gan, Cheng, Liu & Liu, "Distilling Knowledge Learned in BERT for Text Generation", ACL 2020,
arXiv 1911.03829. A BERT-style masked LM is fine-tuned on ``[CLS] X [SEP] Y [SEP]`` with a part of
the target ``Y`` masked (C-MLM); since it sees the target on both sides of a masked word, its
distribution for ``y_t`` carries "future" context an autoregressive decoder lacks. That
distribution supervises the student word by word:

.. math::

    L = \alpha\, L_{bidi} + (1 - \alpha)\, L_{xe}, \qquad
    L_{bidi} = -\sum_t \sum_w p_\phi(y_t = w \mid Y^{u}, X) \log p_\theta(y_t = w \mid y_{<t}, X)

with ``p_φ = softmax(teacher logits / T)``. Here: :class:`CMLMTeacher` turns a seq2seq batch into the
teacher's logits ``(B, L, V)`` aligned with the student's decoder positions, :class:`CMLMKD` is the
loss, and :func:`cmlm_mlm_inputs` builds the C-MLM fine-tuning batches of the teacher.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from distill.batch import Batch, TokenBatch, View
from distill.functional.seq2seq_kd import soft_target_token_loss
from distill.functional.tokens import REDUCTIONS
from distill.methods.base import Method, Paper, register
from distill.teachers import TeacherSource, freeze
from distill.taps import logits_of

__all__ = ["CMLMKD", "CMLMTeacher", "cmlm_inputs", "cmlm_mlm_inputs"]

PAPER = Paper(
    title="Distilling Knowledge Learned in BERT for Text Generation",
    authors="Y.-C. Chen, Z. Gan, Y. Cheng, J. Liu, J. Liu",
    year=2020,
    arxiv="1911.03829",
    venue="ACL",
)


def cmlm_inputs(source_ids: Tensor, source_mask: Tensor, target: Tensor, masked: Tensor, *, cls_id: int,
                sep_id: int, mask_id: int, pad_id: int = 0) -> tuple[dict[str, Tensor], Tensor]:
    """Pack ``[CLS] x [SEP] y [SEP]`` per row, with the target tokens where ``masked`` replaced by ``mask_id``.

    Shapes: ``source_ids`` ``(B, S)`` long, ``source_mask`` ``(B, S)`` (1 = a real source token),
    ``target`` ``(B, L)`` long (-100 = no token; the tokens that remain must be contiguous from
    position 0, as a decoder's labels are), ``masked`` ``(B, L)`` bool → (the masked LM's inputs
    ``{"input_ids", "attention_mask", "token_type_ids"}`` each ``(B, P)``, ``positions`` ``(B, L)``
    long: where target position ``t`` sits in the packed row, -1 where ``target`` is -100).
    Segment ids are 0 for ``[CLS] x [SEP]`` and 1 for ``y [SEP]`` (BERT's sentence-pair layout).
    """
    if source_ids.dim() != 2 or target.dim() != 2 or source_ids.shape[0] != target.shape[0]:
        raise ValueError(f"source_ids (B, S) and target (B, L) must share B, got {tuple(source_ids.shape)} and "
                         f"{tuple(target.shape)}")
    if tuple(masked.shape) != tuple(target.shape) or tuple(source_mask.shape) != tuple(source_ids.shape):
        raise ValueError("masked must be shaped like target and source_mask like source_ids")
    B, L = target.shape
    valid_t = target != -100
    n_src = source_mask.bool().sum(1)
    n_tgt = valid_t.sum(1)
    if bool((valid_t.long().cumsum(1) != torch.arange(1, L + 1, device=target.device).clamp_max(n_tgt[:, None])).any()):
        raise ValueError("the target tokens (labels != -100) of each row must be contiguous from position 0")
    P = int((n_src + n_tgt).max()) + 3
    ids = torch.full((B, P), pad_id, dtype=torch.long, device=target.device)
    types = torch.zeros((B, P), dtype=torch.long, device=target.device)
    attn = torch.zeros((B, P), dtype=torch.long, device=target.device)
    positions = torch.full((B, L), -1, dtype=torch.long, device=target.device)
    for b in range(B):
        src = source_ids[b][source_mask[b].bool()]
        tgt = torch.where(masked[b], torch.full_like(target[b], mask_id), target[b])[valid_t[b]]
        row = torch.cat([src.new_tensor([cls_id]), src, src.new_tensor([sep_id]), tgt, src.new_tensor([sep_id])])
        ids[b, :row.numel()] = row
        attn[b, :row.numel()] = 1
        start = src.numel() + 2
        types[b, start:row.numel()] = 1
        positions[b, :tgt.numel()] = torch.arange(start, start + tgt.numel(), device=target.device)
    return {"input_ids": ids, "attention_mask": attn, "token_type_ids": types}, positions


def cmlm_mlm_inputs(source_ids: Tensor, source_mask: Tensor, target: Tensor, *, mask_prob: float = 0.15,
                    cls_id: int, sep_id: int, mask_id: int, pad_id: int = 0,
                    generator: torch.Generator | None = None) -> tuple[dict[str, Tensor], Tensor]:
    """A C-MLM fine-tuning batch: a random ``mask_prob`` of each row's target tokens masked (at least one).

    Shapes as :func:`cmlm_inputs` → (inputs, each ``(B, P)``; ``mlm_labels`` ``(B, P)``: the original
    token at every masked position, -100 elsewhere), the labels a Hugging Face ``*ForMaskedLM`` takes.
    The paper masks 15% of the target tokens and none of the source.
    """
    if not 0.0 < mask_prob <= 1.0:
        raise ValueError(f"mask_prob must be in (0, 1], got {mask_prob!r}")
    valid = target != -100
    score = torch.rand(target.shape, generator=generator).to(target.device)
    masked = (score < mask_prob) & valid
    # at least one masked token per row with a target: the row's lowest score
    best = torch.where(valid, score, torch.full_like(score, 2.0)).argmin(1)
    has = valid.any(1)
    masked[has.nonzero().squeeze(1), best[has]] = True
    inputs, positions = cmlm_inputs(source_ids, source_mask, target, masked, cls_id=cls_id, sep_id=sep_id,
                                    mask_id=mask_id, pad_id=pad_id)
    mlm = torch.full_like(inputs["input_ids"], -100)
    b, t = masked.nonzero(as_tuple=True)
    mlm[b, positions[b, t]] = target[b, t]
    return inputs, mlm


class CMLMTeacher(TeacherSource):
    """A fine-tuned conditional masked LM as the teacher of a seq2seq student.

    Args:
        model: a masked LM (e.g. Hugging Face ``BertForMaskedLM``) over the student's vocabulary,
            fine-tuned with :func:`cmlm_mlm_inputs`; frozen here (eval mode, no gradients).
        cls_id, sep_id, mask_id, pad_id: its special tokens.
        rounds: the target positions are split into ``rounds`` groups (position ``t`` in group
            ``t mod rounds``); each group is masked in one teacher pass and read there, so every
            position is predicted exactly once with about ``1/rounds`` of the target hidden. ``None``:
            one pass per position (only that word hidden: ``L`` passes). Default 7 (≈ 14% masked per
            pass, the 15% of the teacher's C-MLM training; our choice, the paper's extraction scheme
            was not readable to us).
        top_k: keep each position's ``top_k`` largest logits, the others ``-inf`` (as we recall, the
            paper stores the teacher's top-8 logits to save space and renormalises over them; not
            confirmed); ``None``: the full distribution.
        token_type_ids: pass segment ids (BERT-style models); ``False`` for models without them.

    The view: ``{"logits": (B, L, V)}``, row ``t`` the teacher's logits for the target token at
    ``labels[:, t]`` (the seq2seq decoder alignment), zeros where the label is -100. The batch is a
    :class:`~distill.batch.TokenBatch`: ``input_ids`` the source ``(B, S)``, ``attention_mask``
    ``(B, S)``, ``labels`` the target ``(B, L)``.
    """

    kind = "cmlm"
    static = True

    def __init__(self, model: nn.Module, *, cls_id: int, sep_id: int, mask_id: int, pad_id: int = 0,
                 rounds: int | None = 7, top_k: int | None = 8, token_type_ids: bool = True) -> None:
        super().__init__()
        if rounds is not None and (isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1):
            raise ValueError(f"rounds must be None (one pass per position) or an integer >= 1, got {rounds!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be None (the full distribution) or an integer >= 1, got {top_k!r}")
        self.model = freeze(model)
        self.ids = dict(cls_id=int(cls_id), sep_id=int(sep_id), mask_id=int(mask_id), pad_id=int(pad_id))
        self.rounds = rounds
        self.top_k = top_k
        self.token_type_ids = token_type_ids

    def train(self, mode: bool = True) -> CMLMTeacher:
        self.training = mode
        self.model.eval()
        return self

    def forward(self, batch: Batch) -> View:
        if not isinstance(batch, TokenBatch) or batch.targets is None:
            raise ValueError("the C-MLM teacher needs a token batch with labels (the target, (B, L)): a seq2seq "
                             f"batch of input_ids, attention_mask and labels; got {type(batch).__name__}"
                             + (" without labels" if isinstance(batch, TokenBatch) else ""))
        src, target = batch.inputs, batch.targets
        src_mask = batch.attention_mask if batch.attention_mask is not None else torch.ones_like(src)
        B, L = target.shape
        valid = target != -100
        n_max = int(valid.sum(1).max()) if valid.any() else 0
        rounds = n_max if self.rounds is None else min(self.rounds, max(n_max, 1))
        out: Tensor | None = None
        t_index = torch.arange(L, device=target.device).expand(B, L)
        with torch.no_grad():
            for r in range(max(rounds, 1) if n_max else 0):
                masked = valid & (t_index % rounds == r)
                if not bool(masked.any()):
                    continue
                inputs, positions = cmlm_inputs(src, src_mask, target, masked, **self.ids)
                if not self.token_type_ids:
                    inputs.pop("token_type_ids")
                logits = logits_of(self.model(**inputs)).float()
                if out is None:
                    out = logits.new_zeros(B, L, logits.shape[-1])
                b, t = masked.nonzero(as_tuple=True)
                out[b, t] = logits[b, positions[b, t]]
        if out is None:
            raise ValueError("the batch has no target token (every label is -100): nothing for the C-MLM teacher")
        if self.top_k is not None and self.top_k < out.shape[-1]:
            kept, idx = out.topk(self.top_k, dim=-1)
            out = torch.full_like(out, -math.inf).scatter_(-1, idx, kept)
            out = torch.where(valid[..., None], out, torch.zeros_like(out))
        return {"logits": out}


class SoftTargetTokenKD(Method):
    """Word-level KD to a teacher source's soft targets, interpolated with the NLL on gold, per token:
    ``kd · scale · KL(softmax(t/T) ‖ softmax(s/T_s)) + ce · CE(s, y)``
    (:func:`distill.functional.seq2seq_kd.soft_target_token_loss`), the loss of ``cmlm_kd``,
    ``knn_kd`` and ``noisy_self_kd``, which differ in their teacher sources and temperatures.

    ``student_tempered``: False, the student at temperature 1 and no ``T²`` (C-MLM); True, the
    student at ``T`` too and ``scale = T²`` (Hinton's convention). Shapes: student and teacher logits
    ``(B, L, V)``, labels ``(B, L)`` (-100: no loss). Not registered: a base class.
    """

    needs_targets = True
    reads_teacher_logits = True
    student_tempered: ClassVar[bool] = False

    def __init__(self, *, kd: float, ce: float, T: float, causal: bool, reduction: str, weight: float,
                 warmup_epochs: int) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        _check_common(kd, ce, T, reduction, causal)
        self.kd, self.ce, self.T = float(kd), float(ce), float(T)
        self.causal, self.reduction = causal, reduction

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        s, t, labels = _read(self, student_view, teacher_view, batch)
        student_T = self.T if self.student_tempered else 1.0
        return soft_target_token_loss(s, t, labels, kd=self.kd, ce=self.ce, teacher_T=self.T, student_T=student_T,
                                      scale=student_T * student_T, causal=self.causal, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"kd={self.kd}, ce={self.ce}, T={self.T}, causal={self.causal}, weight={self.weight}"


@register("cmlm_kd", "seq2seq", PAPER)
class CMLMKD(SoftTargetTokenKD):
    """Word-level KD from a C-MLM teacher: ``kd · KL(softmax(t/T) ‖ softmax(s)) + ce · CE(s, y)`` per token.

    Chen et al., "Distilling Knowledge Learned in BERT for Text Generation", ACL 2020, arXiv
    1911.03829: ``L = α L_bidi + (1 − α) L_xe`` with the teacher's distribution at temperature ``T``
    and the student's at 1, no ``T²`` factor (the paper's definition; our other KD losses follow
    Hinton's ``T²``). ``kd = α``, ``ce = 1 − α``. The paper writes the soft cross-entropy
    ``−Σ p log q``; we compute ``KL(p ‖ q)``, which differs by the teacher's entropy (same gradient).

    Shapes: student logits ``(B, L, V)``, the teacher's ``(B, L, V)`` (:class:`CMLMTeacher`), labels
    ``(B, L)`` (-100: no loss). ``causal=False`` for seq2seq decoders (row ``t`` predicts
    ``labels[t]``); ``True`` for a causal LM (row ``t`` predicts ``labels[t + 1]``), then the teacher's
    rows must be aligned the same way.

    Defaults: ``α = 0.5`` and ``T = 10`` as recalled from the paper's experimental set-up (its
    machine-translation runs); the method section could not be read through our search tool, so
    treat both as unconfirmed.
    """

    def __init__(self, *, kd: float = 0.5, ce: float = 0.5, T: float = 10.0, causal: bool = False,
                 reduction: str = "token", weight: float = 1.0, warmup_epochs: int = 0) -> None:
        super().__init__(kd=kd, ce=ce, T=T, causal=causal, reduction=reduction, weight=weight,
                         warmup_epochs=warmup_epochs)


def _check_common(kd: float, ce: float, T: float, reduction: str, causal: bool) -> None:
    for name, value in (("kd", kd), ("ce", ce)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} (a loss weight) must be a finite number >= 0, got {value!r}")
    if kd == 0 and ce == 0:
        raise ValueError("kd and ce are both 0: the loss would train nothing")
    if isinstance(T, bool) or not isinstance(T, (int, float)) or not (math.isfinite(T) and T > 0):
        raise ValueError(f"temperature T must be a finite number > 0, got {T!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {', '.join(REDUCTIONS)}")
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be True or False, got {causal!r}")


def _read(method: Method, student_view: View, teacher_view: View, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
    name = method.name or type(method).__name__
    if "logits" not in student_view:
        raise KeyError(f"loss {name!r} reads the student's 'logits' (B, L, V); the view has {sorted(student_view)}")
    if "logits" not in teacher_view:
        raise KeyError(f"loss {name!r} reads the teacher's 'logits' (B, L, V); the view has {sorted(teacher_view)}")
    if batch.targets is None:
        raise ValueError(f"loss {name!r} needs labels (B, L), but the batch has no targets")
    return student_view["logits"], teacher_view["logits"], batch.targets
