"""Synthesised data for distillation: what data-free KD and dataset distillation share.

Image priors (:mod:`~distill.synthesis.priors`), BatchNorm-statistics matching hooks
(:mod:`~distill.synthesis.bn_stats`), differentiable siamese augmentation
(:mod:`~distill.synthesis.dsa`) and the adversarial teacher-student-generator loop
(:mod:`~distill.synthesis.adversarial`). The generators live in the model zoo
(``distill.models.create("dafl_generator")``). The other modules of this package (the
synthesizers and their registry, the evaluator) are imported by name.
"""

from distill.synthesis.adversarial import adversarial_distill, generator_step, l1_logits, student_step
from distill.synthesis.bn_stats import BatchNormStatistics
from distill.synthesis.dsa import DSA, DSA_OPS, DSAParams
from distill.synthesis.priors import jitter_flip, l2_prior, total_variation

__all__ = [
    "DSA",
    "DSA_OPS",
    "BatchNormStatistics",
    "DSAParams",
    "adversarial_distill",
    "generator_step",
    "jitter_flip",
    "l1_logits",
    "l2_prior",
    "student_step",
    "total_variation",
]
