"""Optional packages in tests: whether one imports, and if not, why (the skip reason)."""

from __future__ import annotations

import importlib


def missing(package: str, hint: str = "") -> str | None:
    """``None`` when ``package`` imports, else why not (``hint`` appended: which extra has it)."""
    try:
        importlib.import_module(package)
        return None
    except ImportError as e:
        return f"{package} cannot be imported here ({e}){hint}"
