"""The synthesis loops' progress bar: :class:`distill.progress.StepProgress` (kept under this name for imports)."""

from distill.progress import StepProgress

__all__ = ["StepProgress"]
