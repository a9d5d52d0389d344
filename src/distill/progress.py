"""A small rich progress bar for loops that are not :func:`distill.fit` (synthesis, GANs, graphs; silent with
``enabled=False``)."""

from __future__ import annotations

from typing import Any

__all__ = ["StepProgress"]


class StepProgress:
    """``total`` steps under a title: ``advance(info)`` per step, ``close()`` at the end; a context manager."""

    def __init__(self, enabled: bool, what: str, total: int) -> None:
        self._progress: Any = None
        if enabled and total > 0:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(TextColumn(f"[bold]{what}"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=True)
            self._progress.start()
            self._task = self._progress.add_task(what, total=total, info="")

    def advance(self, info: str = "", steps: int = 1) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=steps, info=info)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __enter__(self) -> StepProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
