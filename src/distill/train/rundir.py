"""A run folder is written by one process, never silently replaced, and resumed only under its own spec.

What ``fit`` (and the loops built like it: the cohort loop, the recipe runner) does with ``run_dir``:

- **one writer**: the folder is locked (:class:`~distill.locks.RunLock`) for the whole run; under
  ``torchrun`` only rank 0 writes, so only rank 0 locks.
- **never silently replaced**: a folder that already holds results (:data:`RESULT_NAMES`) is
  refused with :class:`RunFolderError` unless the call resumes it or passes ``overwrite=True``,
  which clears the folder first (no stale ``best.pt`` or metrics line survives).
- **resumed only under its own spec**: every checkpoint carries a fingerprint of the settings that
  determine the result (:func:`normalize_fingerprint`); resuming under another one raises
  :class:`SpecMismatchError`, naming each field that differs (``train.lr: checkpoint 0.05, now
  0.1``). ``resume`` where results exist but no ``last.pt`` is an error too
  (:class:`ResumeError`), never a silent restart; ``resume`` with nothing there starts afresh.
- **epochs** are checked apart from the fingerprint (:func:`check_epochs`): a run may be resumed
  with more epochs (extended) or fewer, as long as no more than that are done already and the
  learning-rate schedule does not depend on the number of epochs.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from distill.locks import LOCK_NAME, RunLock, RunLockedError
from distill.train import distributed as D

__all__ = [
    "RESULT_NAMES",
    "ResumeError",
    "RunFolderError",
    "RunLockedError",
    "SpecMismatchError",
    "check_epochs",
    "check_fingerprint",
    "clear_run_dir",
    "default_fingerprint",
    "elapsed_so_far",
    "fingerprint_diff",
    "has_results",
    "normalize_fingerprint",
    "open_run_dir",
    "schedule_depends_on_epochs",
]

# what a run writes: a folder holding any of these has results that a new run would replace
RESULT_NAMES = ("metrics.jsonl", "summary.json", "checkpoints", "model.pt", "model.safetensors", "report.md")
MAX_LISTED = 12  # differences named in one message


class RunFolderError(FileExistsError):
    """The run folder already holds results and the call neither resumes nor overwrites it."""


class ResumeError(ValueError):
    """``resume`` cannot continue this run folder (results but no ``last.pt``, a checkpoint from
    before fingerprints, or one of another run: :class:`SpecMismatchError`)."""


class SpecMismatchError(ResumeError):
    """The checkpoint was written under other settings; ``differences`` lists ``(field, saved, now)``."""

    def __init__(self, message: str, differences: Sequence[tuple[str, Any, Any]] = ()) -> None:
        super().__init__(message)
        self.differences = list(differences)


def has_results(folder: str | Path, *, deep: bool = False) -> bool:
    """Whether ``folder`` holds a run's results (:data:`RESULT_NAMES`); ``deep``: also in any
    subfolder (a strategy's stage folders, a hint stage)."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    if any((folder / name).exists() for name in RESULT_NAMES):
        return True
    return deep and any(has_results(sub, deep=True) for sub in folder.iterdir() if sub.is_dir())


def clear_run_dir(folder: str | Path) -> None:
    """Remove everything in ``folder`` but its lock file (the folder itself stays)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if entry.name == LOCK_NAME:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def normalize_fingerprint(fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    """``fingerprint`` as it reads back from JSON (tuples become lists, keys strings, other
    objects their ``str``), so a saved one and a fresh one compare equal when they mean the same."""
    return json.loads(json.dumps(dict(fingerprint), default=str, sort_keys=True))


_ABSENT = "(absent)"


def _diff(a: Any, b: Any, prefix: str, out: list[tuple[str, Any, Any]]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            key = f"{prefix}.{k}" if prefix else str(k)
            if k not in a or k not in b:  # a whole part only one side has: named once, not leaf by leaf
                out.append((key, a.get(k, _ABSENT), b.get(k, _ABSENT)))
            else:
                _diff(a[k], b[k], key, out)
    elif a != b:
        out.append((prefix, a, b))


def fingerprint_diff(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """The dotted fields whose values differ, as ``(field, saved, now)``; a field (or a whole part,
    e.g. a model) that only one side has gets ``"(absent)"`` on the other."""
    out: list[tuple[str, Any, Any]] = []
    _diff(normalize_fingerprint(saved), normalize_fingerprint(now), "", out)
    return out


def _show(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return f"{{{len(value)} entries}}"
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _describe(differences: Sequence[tuple[str, Any, Any]]) -> str:
    shown = [f"{k}: checkpoint {_show(a)}, now {_show(b)}" for k, a, b in differences[:MAX_LISTED]]
    more = len(differences) - MAX_LISTED
    return "; ".join(shown) + (f"; and {more} more" if more > 0 else "")


def check_fingerprint(state: Mapping[str, Any], fingerprint: Mapping[str, Any], where: str | Path) -> None:
    """Refuse to resume from ``state`` (a checkpoint read from ``where``) unless it was written
    under ``fingerprint``.

    Raises:
        ResumeError: the checkpoint records no fingerprint (written before distill stored them).
        SpecMismatchError: it records another one; the message names each differing field with
            both values.
    """
    saved = state.get("fingerprint") if isinstance(state, Mapping) else None
    if saved is None:
        raise ResumeError(f"cannot resume from {where}: it does not record the settings it was trained with "
                          "(written by an older distill), so it may belong to another run; start afresh "
                          "(overwrite=True, distill run --overwrite)")
    differences = fingerprint_diff(saved, fingerprint)
    if differences:
        raise SpecMismatchError(
            f"cannot resume from {where}: it was trained with other settings: {_describe(differences)}. "
            "Resume with the settings it was trained with, or start afresh (overwrite=True, "
            "distill run --overwrite)", differences)


def schedule_depends_on_epochs(schedule: str, milestones: Sequence[int] | None) -> bool:
    """Whether a :class:`~distill.train.schedules.Schedule`'s learning rates depend on the number of
    epochs: cosine and one-cycle anneal over the run, multistep's default milestones are 50% and 75%
    of it; constant, and multistep with explicit milestones, do not."""
    return schedule in ("cosine", "onecycle") or (schedule == "multistep" and milestones is None)


def check_epochs(state: Mapping[str, Any], epochs: int, schedule: str, milestones: Sequence[int] | None,
                 where: str | Path) -> None:
    """May a run whose checkpoint ``state`` (from ``where``) has ``state["epoch"] + 1`` epochs done,
    of ``state["epochs"]`` planned, continue as an ``epochs``-epoch run?

    Raises:
        SpecMismatchError: more epochs are done than ``epochs`` (the result would be labelled with
            fewer epochs than it trained), or the number changed and the schedule depends on it.
    """
    done = int(state["epoch"]) + 1
    planned = state.get("epochs")
    if done > epochs:
        raise SpecMismatchError(
            f"cannot resume from {where}: epochs: checkpoint {planned if planned is not None else done} "
            f"({done} done), now {epochs}; the run is already past {epochs} epoch(s). Resume with "
            f"epochs >= {done}, or start afresh (overwrite=True, distill run --overwrite)",
            [("epochs", planned if planned is not None else done, epochs)])
    if planned is not None and int(planned) != epochs and schedule_depends_on_epochs(schedule, milestones):
        raise SpecMismatchError(
            f"cannot resume from {where}: epochs: checkpoint {planned}, now {epochs}; the {schedule!r} schedule"
            + (" with its default milestones" if schedule == "multistep" else "")
            + " depends on the number of epochs, so the resumed run would follow neither plan. Resume with "
            f"epochs={planned}, or use schedule 'constant' or explicit milestones to extend a run",
            [("epochs", planned, epochs)])


def open_run_dir(run_dir: Path | None, *, resume: Any, overwrite: bool, info: D.DistInfo,
                 stack: ExitStack, what: str = "fit") -> None:
    """Lock ``run_dir`` for the run (its lock is released when ``stack`` closes) and apply the
    rules of this module before any work: clear it when ``overwrite``; refuse results without
    ``resume``; refuse ``resume=True`` where results exist but no ``checkpoints/last.pt``.

    Under DDP rank 0 (the only writer) locks and checks; an error it finds is raised on every rank.
    """
    if run_dir is None:
        return
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: resume continues the run in run_dir, "
                         "overwrite replaces it")
    error: BaseException | None = None
    if info.is_main:
        try:
            stack.enter_context(RunLock(run_dir, what))
            if overwrite:
                clear_run_dir(run_dir)
            elif resume is True and has_results(run_dir) and not (run_dir / "checkpoints" / "last.pt").is_file():
                raise ResumeError(
                    f"cannot resume {run_dir}: it holds results but no checkpoints/last.pt (the run ended before "
                    "its first checkpoint, or the file was removed); starting over would replace them: pass "
                    "overwrite=True (distill run --overwrite) to replace them")
            elif not resume and has_results(run_dir):
                raise RunFolderError(
                    f"{run_dir} already holds a run's results; resume it (resume=True, distill run --resume) or "
                    "replace it (overwrite=True, distill run --overwrite), or write to another folder")
        except (RunLockedError, RunFolderError, ResumeError, OSError) as e:
            error = e
    if info.enabled:  # every rank raises what rank 0 found
        found = D.broadcast_object((type(error), str(error)) if error is not None else None)
        if found is not None and error is None:
            stack.close()
            raise found[0](found[1])
    if error is not None:
        stack.close()
        raise error


def elapsed_so_far(state: Mapping[str, Any] | None) -> float:
    """The training time a checkpoint records (``elapsed_s``; 0 for none, or an older checkpoint)."""
    value = (state or {}).get("elapsed_s")
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else 0.0


def default_fingerprint(distiller: Any, settings: Mapping[str, Any]) -> dict[str, Any]:
    """What ``fit`` stores when its caller gives no fingerprint: the ``settings`` that determine
    the result (optimizer, lr, schedule, milestones, seed...), the student's architecture
    (parameter and buffer names with their shapes), and each loss's method class, weight and
    trainable parts' shapes."""
    import torch

    def shapes(module: Any) -> dict[str, list[int]]:
        return {k: list(v.shape) for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}

    methods = {name: {"method": type(m).__name__, "weight": getattr(m, "weight", None), "parts": shapes(m)}
               for name, m in getattr(distiller, "methods", {}).items()}
    return normalize_fingerprint({"fit": dict(settings), "student": shapes(distiller.student), "losses": methods})
