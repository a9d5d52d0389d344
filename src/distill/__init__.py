"""distill: knowledge distillation for PyTorch.

``Distiller(student, teacher, losses={...})`` inside your own loop, or ``distill.fit(...)``.
See ``distill methods`` for every method with its paper and defaults.
"""

from distill import functional, methods, models
from distill.batch import Batch
from distill.distiller import DistillOutput, Distiller
from distill.methods import create_method, list_methods, method_info
from distill.teachers import EnsembleTeacher, FrozenTeacher, TeacherSource
from distill.train import FitResult, evaluate, fit, fit_hint_stage

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "DistillOutput",
    "Distiller",
    "EnsembleTeacher",
    "FitResult",
    "FrozenTeacher",
    "TeacherSource",
    "create_method",
    "evaluate",
    "fit",
    "fit_hint_stage",
    "functional",
    "list_methods",
    "method_info",
    "methods",
    "models",
]
