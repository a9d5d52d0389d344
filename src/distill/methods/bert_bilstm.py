"""Tang et al. 2019: distilling a fine-tuned BERT into a BiLSTM by regressing its logits (squared error),
with cross-entropy on the label or, for the augmented unlabelled sentences, on the teacher's label.

``forward`` returns the *unweighted* loss; the math lives in :mod:`distill.functional.logit_mse`.
The student is :class:`distill.models.bilstm.BiLSTMClassifier` (``"bilstm_tang"``), the augmented
transfer set :func:`distill.data.augment_text.augment_texts`.
"""

from __future__ import annotations

from torch import Tensor

from distill.batch import Batch, View
from distill.functional.logit_mse import tang_loss
from distill.methods._views import tap as _tap
from distill.methods.base import Method, Paper, register


@register(
    "logit_mse",
    "logits",
    Paper(
        title="Distilling Task-Specific Knowledge from BERT into Simple Neural Networks",
        authors="R. Tang, Y. Lu, L. Liu, L. Mou, O. Vechtomova, J. Lin",
        year=2019,
        arxiv="1903.12136",
    ),
)
class LogitMSE(Method):
    """Squared error on the logits plus cross-entropy on the (teacher-filled) label: the paper's α·CE + (1 − α)·‖z_B − z_S‖².

    .. math:: L = w_{ce}\\,\\mathrm{CE}(z^{(S)}, t) + w_{distill}\\,\\frac{1}{B}\\sum_b
        \\lVert z^{(B)}_b - z^{(S)}_b \\rVert_2^2

    z^(B), z^(S): the teacher's and the student's logits ``(B, K)``; t the label ``batch.targets``
    (B,), or the teacher's argmax where a sample is unlabelled (target < 0, or no targets at all —
    the paper's rule for the augmented sentences). ``ce_weight`` is the paper's α, ``distill_weight``
    its 1 − α (named for the terms they weight). ``reduction="sum"`` is the paper's squared norm;
    ``"mean"`` is ``nn.MSELoss`` (divided by K).

    Defaults: α = 0 (``ce_weight=0``, ``distill_weight=1``): the distillation term alone, our
    reading of the paper's experiments, recalled rather than read (its full text was not readable
    offline; the arXiv id, title and the objective's form are checked); set ``ce_weight`` to mix
    in the labels.
    """

    def __init__(self, ce_weight: float = 0.0, distill_weight: float = 1.0, reduction: str = "sum",
                 weight: float = 1.0, warmup_epochs: int = 0) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        for name, w in (("ce_weight", ce_weight), ("distill_weight", distill_weight)):
            if not w >= 0 or w == float("inf"):
                raise ValueError(f"{name} must be a finite number >= 0, got {w}")
        if not (ce_weight or distill_weight):
            raise ValueError("ce_weight and distill_weight are both 0: nothing to train")
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        self.ce_weight, self.distill_weight, self.reduction = float(ce_weight), float(distill_weight), reduction

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        s = _tap(student_view, "logits", "student")
        t = _tap(teacher_view, "logits", "teacher").detach()
        targets = batch.targets if self.ce_weight else None
        if targets is not None and targets.dim() != 1:
            raise ValueError(f"logit_mse needs class labels (B,), got targets of shape {tuple(targets.shape)}")
        return tang_loss(s, t, targets, self.ce_weight, self.distill_weight, self.reduction)

    def extra_repr(self) -> str:
        return (f"ce_weight={self.ce_weight}, distill_weight={self.distill_weight}, reduction={self.reduction!r}, "
                f"weight={self.weight}")
