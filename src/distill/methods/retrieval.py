"""Score-matrix distillation for retrieval and vision-language dual encoders: DiDE, ERNIE-Search, ALADIN.

The views carry ``(B, C)`` score matrices (row ``i``: query/image ``i`` against ``C`` candidates;
with in-batch negatives ``C = B``, positive on the diagonal) under ``student_key`` /
``teacher_key`` (default ``"logits"``: a dual-encoder student whose forward returns its score
matrix), and, for the attention/interaction terms, token-level maps under the keys named below.
Each ``forward`` returns the *unweighted* loss; the math is :mod:`distill.functional.retrieval`.

The method sections of these three papers could not be read on this machine (only their
abstracts and third-party summaries); each class says where its formula and defaults come from.
"""

from __future__ import annotations

from torch import Tensor

from distill.batch import Batch, View
from distill.functional import retrieval as FR
from distill.methods._views import tap as _tap
from distill.methods.base import Method, Paper, register

__all__ = ["ALADIN", "DiDE", "ERNIESearch"]


def _opt(view: View, key: str | None, side: str) -> Tensor | None:
    return None if key is None else _tap(view, key, side)


def _check_nonneg(**weights: float) -> None:
    for name, w in weights.items():
        if not (isinstance(w, (int, float)) and w >= 0):
            raise ValueError(f"{name} must be a number >= 0, got {w!r}")


@register(
    "dide",
    "retrieval",
    Paper(
        title="Distilled Dual-Encoder Model for Vision-Language Understanding",
        authors="Z. Wang, W. Wang, H. Zhu, M. Liu, B. Qin, F. Wei",
        year=2022,
        arxiv="2112.08723",
        venue="EMNLP",
    ),
)
class DiDE(Method):
    r"""DiDE: a fusion-encoder teacher's soft labels and cross-modal attention → a dual-encoder student.

    .. math::
        L = w_{soft}\,T^2\,\tfrac1B\sum_i KL(p_i\|q_i)
          + w_{attn}\,\tfrac12\big[KL_{rows}(A^t_{q\to p}\|A^s_{q\to p}) + KL_{rows}(A^t_{p\to q}\|A^s_{p\to q})\big]

    * soft labels: ``p_i = softmax(t_i / T)`` the teacher's predicted distribution for example
      ``i`` (``teacher_key``, ``(B, C)``: over answers/classes, or over a candidate list in
      retrieval), ``q_i`` the student's (``student_key``);
    * cross-modal attention: the teacher's attention probabilities from the tokens of one modality
      to those of the other in its last fusion layer (``teacher_q2p`` / ``teacher_p2q``,
      ``(B, H, Lq, Lp)`` / ``(B, H, Lp, Lq)`` or head-averaged ``(B, Lq, Lp)``), and the student's
      attention *logits* between its separately encoded streams, computed with its last layer's
      query/key projections (``student_q2p`` / ``student_p2q``, same shapes: heads must agree, or
      average both over heads before). ``query_mask`` / ``passage_mask`` (``(B, Lq)``/``(B, Lp)``,
      read from the teacher view when named) drop padding keys and rows.

    Sources: the abstract (image→text and text→image attention distributions of the fusion
    encoder guide the dual encoder; distillation in pre-training and fine-tuning). The KL
    direction (teacher as target), the equal weights 1/1, ``T = 1`` and the mean over the two
    directions are our choices, not read from the paper's method section. ``soft_weight=0``
    distils the attention alone (a stage without task predictions to match, e.g. pre-training).
    """

    def __init__(self, soft_weight: float = 1.0, attention_weight: float = 1.0, T: float = 1.0,
                 student_key: str = "logits", teacher_key: str = "logits",
                 student_q2p: str | None = "q2p", teacher_q2p: str | None = "q2p",
                 student_p2q: str | None = "p2q", teacher_p2q: str | None = "p2q",
                 query_mask: str | None = None, passage_mask: str | None = None,
                 weight: float = 1.0, warmup_epochs: int = 0) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        _check_nonneg(soft_weight=soft_weight, attention_weight=attention_weight)
        if not T > 0:
            raise ValueError(f"DiDE T must be > 0, got {T}")
        if (student_q2p is None) != (teacher_q2p is None) or (student_p2q is None) != (teacher_p2q is None):
            raise ValueError("DiDE: name both the student's and the teacher's key of an attention direction, or "
                             "neither")
        self.soft_weight, self.attention_weight, self.T = float(soft_weight), float(attention_weight), float(T)
        self.student_key, self.teacher_key = student_key, teacher_key
        self.q2p = (student_q2p, teacher_q2p)
        self.p2q = (student_p2q, teacher_p2q)
        self.query_mask, self.passage_mask = query_mask, passage_mask

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        loss = 0.0
        if self.soft_weight > 0:
            s = _tap(student_view, self.student_key, "student")
            t = _tap(teacher_view, self.teacher_key, "teacher")
            loss = loss + self.soft_weight * FR.listwise_kl(s, t, self.T)
        if self.attention_weight > 0:
            qm = _opt(teacher_view, self.query_mask, "teacher")
            pm = _opt(teacher_view, self.passage_mask, "teacher")
            parts = []
            for (sk, tk), keys, rows in ((self.q2p, pm, qm), (self.p2q, qm, pm)):
                if sk is None:
                    continue
                sl = _tap(student_view, sk, "student")
                tp = _tap(teacher_view, tk, "teacher")
                km = rm = None
                if keys is not None:
                    km = keys if sl.dim() == 3 else keys[:, None]
                if rows is not None:
                    rm = rows if sl.dim() == 3 else rows[:, None].expand(sl.shape[:-1])
                parts.append(FR.token_attention_kl(sl, tp, key_mask=km, row_mask=rm))
            if not parts:
                raise ValueError("DiDE attention_weight > 0 but no attention direction is named")
            loss = loss + self.attention_weight * sum(parts) / len(parts)
        if isinstance(loss, float):
            raise ValueError("DiDE: both soft_weight and attention_weight are 0; nothing to distil")
        return loss


@register(
    "ernie_search",
    "retrieval",
    Paper(
        title="ERNIE-Search: Bridging Cross-Encoder with Dual-Encoder via Self On-the-fly Distillation for "
              "Dense Passage Retrieval",
        authors="Y. Lu, Y. Liu, J. Liu, Y. Shi, Z. Huang, S. Feng, Y. Sun, H. Tian, H. Wu, S. Wang, D. Yin, "
                "H. Wang",
        year=2022,
        arxiv="2205.09153",
    ),
)
class ERNIESearch(Method):
    r"""ERNIE-Search: cascade cross-encoder → late interaction → dual encoder, trained on the fly.

    .. math::
        L = w_{ce}\,KL(p^{CE}\|q^{LI}) + w_{self}\,KL(\mathrm{sg}(q^{LI})\|q^{DE})
          + w_{int}\,KL_{rows}(A^{CE}_{q\to p}\|softmax(M^{LI}))

    (each score KL listwise over a query's candidate list, ``T²``-scaled, batch-mean.)

    * ``q^{DE}``: the student dual encoder's scores (``student_key``, ``(B, C)``);
    * ``q^{LI}``: the late-interaction (ColBERT) scores of the *same* encoder's token vectors
      (``student_late_key``): the "self" teacher trained together with the student (on the fly);
      ``sg``: its distribution is a target in the self term (no gradient; ``detach_late``);
      ``student_late_key=None`` drops the cascade: ``L = w_ce KL(p^{CE}\|q^{DE}) + ...``;
    * ``p^{CE}``: the frozen cross-encoder teacher's scores (``teacher_key``);
    * interaction: the cross-encoder's attention from query tokens to passage tokens
      (``teacher_interaction``, ``(B, Lq, Lp)`` probabilities, for each query's positive) as target
      of the student's token-interaction logits (``student_interaction``, ``(B, Lq, Lp)``, e.g.
      ``u_a·v_b / τ`` of the late-interaction head); masks from the teacher view when named.

    Sources: the abstract and summaries (self on-the-fly distillation of late interaction into
    the dual encoder; cascade with a cross-encoder teacher; a token-level attention loss). Unit
    weights, ``T = 1`` and the stop-gradient on the late-interaction side of the self term are our
    choices, not read from the paper's method section. The contrastive losses each model also
    trains with are the user's (see :func:`distill.functional.retrieval.in_batch_contrastive`).
    """

    def __init__(self, ce_weight: float = 1.0, self_weight: float = 1.0, interaction_weight: float = 1.0,
                 T: float = 1.0, student_key: str = "logits", student_late_key: str | None = "late_logits",
                 teacher_key: str = "logits", student_interaction: str | None = "interaction",
                 teacher_interaction: str | None = "attention", query_mask: str | None = None,
                 passage_mask: str | None = None, detach_late: bool = True,
                 weight: float = 1.0, warmup_epochs: int = 0) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        _check_nonneg(ce_weight=ce_weight, self_weight=self_weight, interaction_weight=interaction_weight)
        if not T > 0:
            raise ValueError(f"ERNIE-Search T must be > 0, got {T}")
        if interaction_weight > 0 and (student_interaction is None or teacher_interaction is None):
            raise ValueError("ERNIE-Search interaction_weight > 0 needs student_interaction and teacher_interaction")
        self.ce_weight, self.self_weight, self.interaction_weight = map(float, (ce_weight, self_weight,
                                                                               interaction_weight))
        self.T = float(T)
        self.student_key, self.student_late_key, self.teacher_key = student_key, student_late_key, teacher_key
        self.student_interaction, self.teacher_interaction = student_interaction, teacher_interaction
        self.query_mask, self.passage_mask = query_mask, passage_mask
        self.detach_late = bool(detach_late)

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        de = _tap(student_view, self.student_key, "student")
        ce = _tap(teacher_view, self.teacher_key, "teacher")
        late = _opt(student_view, self.student_late_key, "student")
        if late is None:
            loss = self.ce_weight * FR.listwise_kl(de, ce, self.T)
        else:
            loss = self.ce_weight * FR.listwise_kl(late, ce, self.T)
            target = late.detach() if self.detach_late else late
            if self.self_weight > 0:
                loss = loss + self.self_weight * _kl_live(de, target, self.T)
        if self.interaction_weight > 0:
            sl = _tap(student_view, self.student_interaction, "student")
            tp = _tap(teacher_view, self.teacher_interaction, "teacher")
            qm = _opt(teacher_view, self.query_mask, "teacher")
            pm = _opt(teacher_view, self.passage_mask, "teacher")
            loss = loss + self.interaction_weight * FR.token_attention_kl(sl, tp, key_mask=pm, row_mask=qm)
        return loss


def _kl_live(student: Tensor, target: Tensor, T: float) -> Tensor:
    """listwise KL whose target may keep its gradient (``listwise_kl`` always detaches the target)."""
    import torch.nn.functional as F

    if student.shape != target.shape or student.dim() != 2:
        raise ValueError(f"ERNIE-Search self term needs two (B, C) score matrices of one shape; got "
                         f"{tuple(student.shape)}, {tuple(target.shape)}")
    log_q = F.log_softmax(student.float() / T, dim=1)
    log_p = F.log_softmax(target.float() / T, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(1).mean() * (T * T)


@register(
    "aladin",
    "retrieval",
    Paper(
        title="ALADIN: Distilling Fine-grained Alignment Scores for Efficient Image-Text Matching and Retrieval",
        authors="N. Messina, M. Stefanini, M. Cornia, L. Baraldi, F. Falchi, G. Amato, R. Cucchiara",
        year=2022,
        arxiv="2207.14757",
        venue="CBMI",
    ),
)
class ALADIN(Method):
    r"""ALADIN: fine-grained alignment scores distilled into a dual encoder's global-embedding scores.

    .. math::
        L = \tfrac{T^2}{2}\Big[\tfrac1B\sum_i KL\big(\sigma(A_{i\cdot}/T)\,\|\,\sigma(S_{i\cdot}/T)\big)
          + \tfrac1C\sum_j KL\big(\sigma(A_{\cdot j}/T)\,\|\,\sigma(S_{\cdot j}/T)\big)\Big]

    ``S`` ``(B, C)``: the student's matching-head scores (cosine similarities of the global image
    and text embeddings, ``student_key``); ``A`` ``(B, C)``: the teacher's fine-grained alignment
    scores of every image–caption pair of the batch (``teacher_key``; ALADIN's alignment head uses
    TERAN's max-over-regions, sum-over-words cosine, :func:`distill.functional.late_interaction`);
    ``σ``: softmax over the row (image → all captions) or the column (caption → all images).
    ``directions="rows"`` keeps only the first term.

    Sources: the abstract (the shared embedding space is learnt "by distilling the relevance
    scores obtained from the fine-grained alignments"); the listwise KL over the batch's
    candidates with a temperature follows the task brief. ``T = 1`` (one temperature shared by both
    sides, ``teacher_T`` to set the teacher's apart) and the two directions averaged are our
    choices, not read from the paper's method section.
    """

    def __init__(self, T: float = 1.0, teacher_T: float | None = None, directions: str = "both",
                 student_key: str = "logits", teacher_key: str = "logits",
                 weight: float = 1.0, warmup_epochs: int = 0) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        if not T > 0 or (teacher_T is not None and not teacher_T > 0):
            raise ValueError(f"ALADIN temperatures must be > 0, got T={T}, teacher_T={teacher_T}")
        if directions not in ("both", "rows"):
            raise ValueError(f"ALADIN directions must be 'both' or 'rows', got {directions!r}")
        self.T, self.teacher_T, self.directions = float(T), teacher_T, directions
        self.student_key, self.teacher_key = student_key, teacher_key

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        s = _tap(student_view, self.student_key, "student")
        t = _tap(teacher_view, self.teacher_key, "teacher")
        rows = FR.listwise_kl(s, t, self.T, teacher_T=self.teacher_T)
        if self.directions == "rows":
            return rows
        cols = FR.listwise_kl(s.t(), t.t(), self.T, teacher_T=self.teacher_T)
        return 0.5 * (rows + cols)
