"""The training loop we ship: ``fit``, evaluation, checkpoints, schedules, metrics and multi-process
training (:mod:`distill.train.distributed`)."""

from distill.train import distributed
from distill.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from distill.train.dense_eval import (
    detection_evaluator,
    detection_map,
    evaluate_detection,
    evaluate_segmentation,
    segmentation_evaluator,
)
from distill.train.evaluate import evaluate
from distill.train.loop import (
    EpochLog,
    EpochLosses,
    FitProgress,
    FitResult,
    LabelRangeError,
    NonFiniteLossError,
    fit,
)
from distill.train.stages import fit_hint_stage

__all__ = [
    "CheckpointError",
    "EpochLog",
    "EpochLosses",
    "FitProgress",
    "FitResult",
    "LabelRangeError",
    "NonFiniteLossError",
    "distributed",
    "detection_evaluator",
    "detection_map",
    "evaluate_detection",
    "evaluate_segmentation",
    "segmentation_evaluator",
    "evaluate",
    "fit",
    "fit_hint_stage",
    "load_checkpoint",
    "save_checkpoint",
]
