"""Interrupting a training run on purpose, to test that resuming it loses nothing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Interrupted(Exception):
    """Raised by :func:`interrupt_after`'s callback: stands for a crash between two epochs."""


def interrupt_after(epochs: int | None) -> Callable[[dict[str, Any]], None] | None:
    """An ``on_epoch_end`` callback that raises :class:`Interrupted` once it has seen ``epochs`` epochs
    (counted over every ``fit`` it is given to, so a chain stops inside a later stage); ``None``
    gives no callback. ``fit`` has written the epoch's checkpoint before it calls the callback."""
    if epochs is None:
        return None
    seen: list[int] = []

    def on_epoch_end(row: dict[str, Any]) -> None:
        seen.append(row["epoch"])
        if len(seen) == epochs:
            raise Interrupted

    return on_epoch_end
