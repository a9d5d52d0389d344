"""Where the tests find the project's shared MNIST files (nothing is downloaded)."""

from __future__ import annotations

import os
from pathlib import Path


def mnist_dir() -> Path | None:
    """``$DISTILL_MNIST`` when set, else ``../shared/data/mnist`` beside the repository (as CI lays it
    out), else ``/work/shared/data/mnist``; None when none exists."""
    for candidate in (os.environ.get("DISTILL_MNIST"), Path(__file__).resolve().parents[1].parent / "shared"
                      / "data" / "mnist", Path("/work/shared/data/mnist")):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None
