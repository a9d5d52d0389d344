"""Argument checks shared by the synthesizers and the data-free strategies."""

from __future__ import annotations

from typing import Any

__all__ = ["check_int"]


def check_int(name: str, value: Any, minimum: int = 1, *, who: str | None = None) -> int:
    """``value`` when it is an int (not a bool) ``>= minimum``; else a ValueError naming it
    (prefixed ``"{who}: "`` when ``who`` is given)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        prefix = f"{who}: " if who else ""
        raise ValueError(f"{prefix}{name} must be an int >= {minimum}; got {value!r}")
    return value
