"""The training loop we ship: ``fit``, evaluation, checkpoints, schedules and metrics."""

from distill.train.checkpoint import load_checkpoint, save_checkpoint
from distill.train.evaluate import evaluate
from distill.train.loop import FitResult, LabelRangeError, NonFiniteLossError, fit
from distill.train.stages import fit_hint_stage

__all__ = [
    "FitResult",
    "LabelRangeError",
    "NonFiniteLossError",
    "evaluate",
    "fit",
    "fit_hint_stage",
    "load_checkpoint",
    "save_checkpoint",
]
