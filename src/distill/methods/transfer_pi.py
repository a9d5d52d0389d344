"""Generalized distillation (privileged information) and the linear-theory objective as methods.

* ``generalized_distillation``: Lopez-Paz, Bottou, Schölkopf, Vapnik, "Unifying Distillation and
  Privileged Information", ICLR 2016, arXiv 1511.03643. The teacher's view holds its logits on
  the privileged features ``x*`` (the strategy :func:`distill.strategies.transfer_pi.fit_generalized_distillation`
  wires the views); the loss mixes hard labels and those soft labels by the imitation parameter.
* ``linear_soft_ce``: Phuong & Lampert, "Towards Understanding Knowledge Distillation", ICML 2019,
  arXiv 2105.13093: a binary student's cross-entropy against the teacher's sigmoid outputs.
"""

from __future__ import annotations

from torch import Tensor

from distill import functional as DF
from distill.batch import Batch, View
from distill.methods.base import Method, Paper, register
from distill.methods.logits import _logits

GENERALIZED_DISTILLATION = Paper("Unifying Distillation and Privileged Information",
                                 "D. Lopez-Paz, L. Bottou, B. Schölkopf, V. Vapnik", 2016, "1511.03643", "ICLR")
TOWARDS_UNDERSTANDING_KD = Paper("Towards Understanding Knowledge Distillation", "M. Phuong, C. H. Lampert", 2019,
                                 "2105.13093", "ICML")


@register("generalized_distillation", "transfer", GENERALIZED_DISTILLATION)
class GeneralizedDistillation(Method):
    """``(1 − λ)·CE(y, σ(s)) + λ·CE(σ(t/T), σ(s))``: :func:`~distill.functional.generalized_distillation_loss`.

    ``s`` (B, K): the student's logits on the regular features; ``t`` (B, K): the teacher's on the
    privileged features. Defaults ``imitation = T = 1``: the paper's synthetic experiments (its
    MNIST and CIFAR runs sweep both). Takes the place of both ``ce`` and ``kd``: the imitation
    parameter weighs the two terms as the paper does.
    """

    needs_targets = True

    def __init__(self, imitation: float = 1.0, T: float = 1.0, weight: float = 1.0, warmup_epochs: int = 0) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        if not 0.0 <= imitation <= 1.0:
            raise ValueError(f"imitation (the paper's lambda) must be in [0, 1]; got {imitation!r}")
        if not T > 0 or T == float("inf"):
            raise ValueError(f"temperature T must be a finite number > 0; got {T!r}")
        self.imitation, self.T = float(imitation), float(T)

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        if batch.targets is None:
            raise ValueError("generalized_distillation needs labels (its (1 - imitation) term)")
        return DF.generalized_distillation_loss(_logits(student_view, "student"), _logits(teacher_view, "teacher"),
                                                batch.targets, imitation=self.imitation, T=self.T)

    def extra_repr(self) -> str:
        return f"imitation={self.imitation}, T={self.T}, weight={self.weight}"


@register("linear_soft_ce", "theory", TOWARDS_UNDERSTANDING_KD)
class LinearSoftCE(Method):
    """Binary cross-entropy of the student's one logit against the teacher's sigmoid output:
    :func:`~distill.functional.binary_soft_cross_entropy`. Logits (B,) or (B, 1) each. The
    objective whose gradient-descent limit is :func:`~distill.functional.linear_distillation_limit`."""

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        return DF.binary_soft_cross_entropy(_logits(student_view, "student"), _logits(teacher_view, "teacher"))
