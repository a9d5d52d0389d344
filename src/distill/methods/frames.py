"""Frame-level distillation for sequence labelling: per-frame logits ``(B, T, K)`` of student and teacher.

``frame_ce`` and ``frame_kd`` are the two terms of the frame-level teacher-student objective of
Lu et al. (2017); their interpolation is ``losses={"frame_ce": λ, "frame_kd": 1 − λ}`` (weights
named for what they weight). The pre-train / fine-tune regimes of Tang et al. (2016) are the
strategy ``dark_knowledge`` (:mod:`distill.strategies.dark_knowledge`), built on these two.

Frames that count: ``batch.targets != -100`` when the batch has per-frame labels ``(B, T)``,
else every frame.
"""

from __future__ import annotations

from torch import Tensor

from distill.batch import Batch, View
from distill.functional.frames import frame_cross_entropy, frame_kd_loss
from distill.methods.base import Method, Paper, register

__all__ = ["FrameCE", "FrameKD", "LU_2017", "TANG_2016"]

LU_2017 = Paper(
    title="Knowledge Distillation for Small-footprint Highway Networks",
    authors="L. Lu, M. Guo, S. Renals",
    year=2017,
    arxiv="1608.00892",
    venue="ICASSP",
)
TANG_2016 = Paper(
    title="Recurrent Neural Network Training with Dark Knowledge Transfer",
    authors="Z. Tang, D. Wang, Z. Zhang",
    year=2016,
    arxiv="1505.04630",
    venue="ICASSP",
)


def _frame_targets(batch: Batch) -> Tensor | None:
    t = batch.targets
    return t if t is not None and t.dim() == 2 else None


@register("frame_ce", "sequence", LU_2017)
class FrameCE(Method):
    """Hard-label cross-entropy per frame, mean over the labelled frames (``targets != -100``).

    Student logits ``(B, T, K)``, ``batch.targets`` ``(B, T)``. The hard-label term of Lu et al.'s
    interpolated frame-level objective (Lu, Guo, Renals, "Knowledge Distillation for Small-footprint
    Highway Networks", ICASSP 2017, arXiv 1608.00892), and the fine-tuning loss of Tang et al. (2016).
    """

    needs_teacher = False
    needs_targets = True

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        targets = _frame_targets(batch)
        if targets is None:
            raise ValueError(f"frame_ce needs per-frame labels (B, T) in batch.targets; got "
                             f"{None if batch.targets is None else tuple(batch.targets.shape)}")
        return frame_cross_entropy(student_view["logits"], targets)


@register("frame_kd", "sequence", LU_2017)
class FrameKD(Method):
    """Frame-level teacher-student loss: ``T²·KL(p_teacher^T ‖ q_student^T)`` per frame, mean over frames.

    Logits ``(B, T, K)`` from both views (:func:`distill.functional.frames.frame_kd_loss`); frames
    with label ``-100`` are left out when the batch carries per-frame labels ``(B, T)``.

    Paper: L. Lu, M. Guo, S. Renals, "Knowledge Distillation for Small-footprint Highway Networks",
    ICASSP 2017, arXiv 1608.00892: a large DNN teacher's frame posteriors supervise a small
    highway DNN through the KL divergence per frame, optionally interpolated with the hard-label
    CE (``frame_ce``). Default ``T = 1``: the posteriors as the teacher outputs them (only the
    abstract could be read here; the temperature of 1 and the weights are our reading of the
    standard frame-level teacher-student recipe the paper follows, not checked against its text).
    The paper's sequence-level (sMBR lattice) teacher-student training needs a speech decoder's
    lattices and is not implemented.
    """

    def __init__(self, T: float = 1.0, weight: float = 1.0, warmup_epochs: int = 0) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        if isinstance(T, bool) or not isinstance(T, (int, float)) or not T > 0:
            raise ValueError(f"frame_kd: temperature T must be a number > 0; got {T!r}")
        self.T = float(T)

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        return frame_kd_loss(student_view["logits"], teacher_view["logits"], self.T,
                             targets=_frame_targets(batch))

    def extra_repr(self) -> str:
        return f"T={self.T}, weight={self.weight}"
