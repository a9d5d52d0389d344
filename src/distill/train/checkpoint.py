"""Checkpoints: written atomically, so a crash mid-write never destroys the last good one."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    # a checkpoint loaded with map_location="cuda" moved these byte tensors too; the setters want CPU ones
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` with ``torch.save`` to a temporary file, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")  # per process: concurrent writers never collide
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; a clear error if it is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    return torch.load(path, map_location=map_location, weights_only=False)


def save_model(path: str | Path, model: torch.nn.Module, *, name: str | None = None,
               kwargs: dict[str, Any] | None = None, metadata: dict[str, Any] | None = None) -> Path:
    """Save a trained model with what is needed to rebuild it from the zoo and how it was trained.

    ``metadata`` records the training protocol (e.g. ``label_smoothing``, accuracy, epochs):
    a later KD run reports it (Chandrasegaran et al., ICML 2022: label-smoothed teachers).
    """
    return save_checkpoint(path, {"format": "distill.model/1", "model": name, "kwargs": dict(kwargs or {}),
                                  "state_dict": model.state_dict(), "metadata": dict(metadata or {})})


def load_model(path: str | Path, model: torch.nn.Module | None = None,
               map_location: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load a model saved by :func:`save_model`: into ``model`` if given, else rebuilt from the zoo.

    Also accepts, when ``model`` is given, ``fit``'s ``checkpoints/last.pt`` (the student of its
    ``"distiller"`` state) or ``checkpoints/best.pt`` (its ``"student"``), or a plain
    ``state_dict`` file. Returns ``(model, metadata)``; the metadata is also set as
    ``model.distill_metadata`` so teacher sources can report it.
    """
    state = load_checkpoint(path, map_location)
    if isinstance(state, dict) and state.get("format") == "distill.model/1":
        if model is None:
            if not state.get("model"):
                raise ValueError(f"{str(path)!r} does not name its architecture; pass the model to load into")
            from distill.models import create

            model = create(state["model"], **state["kwargs"])
        weights, metadata = state["state_dict"], state["metadata"]
    elif model is not None and isinstance(state, dict):
        if isinstance(state.get("distiller"), dict) and "student" in state["distiller"]:  # fit's last.pt
            weights = state["distiller"]["student"]
        elif isinstance(state.get("student"), dict):  # fit's best.pt
            weights = state["student"]
        else:
            weights = state.get("state_dict", state)
        metadata = {}
    elif model is not None:
        raise ValueError(f"{str(path)!r} holds a {type(state).__name__}, not model weights")
    else:
        raise ValueError(f"{str(path)!r} is not a distill model file; pass the model to load a plain state_dict into")
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise ValueError(f"weights in {str(path)!r} do not fit {type(model).__name__}: {e}") from None
    model.distill_metadata = metadata  # type: ignore[attr-defined]
    return model, metadata
