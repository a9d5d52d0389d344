"""What the row-table recipe runners share (``kind: graph``, :mod:`distill.graph_runner`; ``kind: generative``,
:mod:`distill.generative_runner`): recognising a recipe's kind, the rules on row names, seeds and strategy
arguments, the run folder (one writer, one version of a recipe, ``--resume`` / ``--overwrite`` / ``--rows``),
which rows of a seed are still to run, loading a teacher's weights, and ``mean ± std`` cells.

The run folder ``OUT/NAME`` holds ``recipe.yaml`` (the validated recipe, as run), ``results.json`` (rewritten
after each row, so a crash loses only the row it was in) and ``report.md``. Another version of the recipe is
refused unless ``overwrite``; finished results are refused unless ``resume`` (continue them), ``overwrite``
(start again) or an explicit list of ``rows`` (re-run those).
"""

from __future__ import annotations

import inspect
import statistics
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from distill.files import atomic_write_json, atomic_write_text, read_json
from distill.locks import RunLock
from distill.recipes import RecipeError
from distill.train.checkpoint import load_model
from distill.train.rundir import RunFolderError

__all__ = ["RecipeRun", "check_row_name", "check_seeds", "check_strategy_arg_names", "load_weights", "mean_std",
           "open_run_folder", "recipe_kind", "recipe_run", "rows_to_run"]


def recipe_kind(path: str | Path) -> Any:
    """The ``kind`` of the YAML recipe at ``path`` (None when it is not a readable mapping)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data.get("kind") if isinstance(data, dict) else None


def check_row_name(row: str) -> None:
    """A row names files: letters, digits, ``_`` and ``-`` only (``ValueError`` otherwise)."""
    if not row.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"row name {row!r}: use letters, digits, '_' and '-' (it names files)")


def check_seeds(seeds: list[int]) -> list[int]:
    """``seeds`` unchanged when none repeats (``ValueError`` otherwise)."""
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds repeat: {seeds}")
    return seeds


def check_strategy_arg_names(where: str, strategy: str, fn: Callable[..., Any], args: Iterable[str],
                             own: Iterable[str]) -> None:
    """Each of ``args`` (a recipe row's argument names, at ``where``) is a parameter of ``fn`` and not one the
    runner sets itself (``own``); a :class:`~distill.recipes.RecipeError` names the first that is not."""
    own = tuple(own)
    params = inspect.signature(fn).parameters
    for key in args:
        if key in own:
            raise RecipeError(f"{where}.{key}: set by the runner, not the recipe")
        if key not in params or params[key].kind in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL):
            allowed = sorted(p for p, v in params.items() if p not in own and v.kind not in (
                inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL))
            raise RecipeError(f"{where}.{key}: unknown argument of {strategy} (it takes {allowed})")


@contextmanager
def open_run_folder(folder: Path, recipe_text: str, *, name: str, resume: bool, overwrite: bool,
                    rows: list[str] | None, what: str) -> Iterator[dict[str, Any]]:
    """Lock ``folder`` (:class:`~distill.locks.RunLock`), check that it may be written, write ``recipe.yaml``
    and yield the results already there (``{}`` when none or ``overwrite``).

    Raises :class:`~distill.train.rundir.RunFolderError` when the folder holds another version of the recipe
    (not ``overwrite``) or finished results (not ``resume``, ``overwrite`` or ``rows``). ``what`` names the
    results in a read error (e.g. ``"graph recipe results"``)."""
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: resume continues the results, overwrite replaces them")
    folder.mkdir(parents=True, exist_ok=True)
    with RunLock(folder):
        recipe_file, results_file = folder / "recipe.yaml", folder / "results.json"
        if recipe_file.is_file() and recipe_file.read_text() != recipe_text and not overwrite:
            raise RunFolderError(f"{str(folder)!r} holds the results of another version of the recipe {name!r} "
                                 "(its recipe.yaml differs from this one): pass --overwrite to replace them, or give "
                                 "the recipe another name or --out")
        done: dict[str, Any] = {}
        if results_file.is_file() and not overwrite:
            if not resume and not rows:
                raise RunFolderError(f"{str(folder)!r} already holds results of {name!r}: pass --resume to "
                                     "continue them, --overwrite to start again, or --out for another folder")
            done = read_json(results_file, what)
        atomic_write_text(recipe_file, recipe_text)
        yield done


@dataclass
class RecipeRun:
    """An open run folder (:func:`recipe_run`): the results already there, ``teachers`` by seed and ``results`` by
    row (updated in place by the runner), and :meth:`write`, which rewrites ``results.json``."""

    folder: Path
    name: str
    seeds: list[int]
    teachers: dict[str, Any]
    results: dict[str, Any]
    summary: dict[str, Any] = field(default_factory=dict)

    def write(self, **header: Any) -> dict[str, Any]:
        """``results.json`` = ``{recipe, **header, seeds, teacher, rows}`` (written atomically); returns it."""
        self.summary.update(recipe=self.name, **header, seeds=self.seeds, teacher=self.teachers, rows=self.results)
        atomic_write_json(self.folder / "results.json", self.summary)
        return self.summary


@contextmanager
def recipe_run(recipe: Any, row_names: Iterable[str], *, out_dir: str | Path | None, resume: bool, overwrite: bool,
               rows: list[str] | None, what: str, row_word: str = "rows") -> Iterator[RecipeRun]:
    """Open ``OUT/NAME`` for a recipe with ``name``, ``output_dir``, ``threads`` and ``seeds``
    (:func:`open_run_folder`, ``torch.set_num_threads(threads)`` when set) and yield its :class:`RecipeRun`.
    ``rows`` (asked for on the command line) must be among ``row_names`` (the recipe's ``row_word``)."""
    row_names = list(row_names)
    unknown = sorted(set(rows or ()) - set(row_names))
    if unknown:
        raise RecipeError(f"rows {unknown} are not in the recipe's {row_word} {sorted(row_names)}")
    folder = Path(out_dir or recipe.output_dir) / recipe.name
    if recipe.threads is not None:
        torch.set_num_threads(recipe.threads)
    text = yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
    with open_run_folder(folder, text, name=recipe.name, resume=resume, overwrite=overwrite, rows=rows,
                         what=what) as done:
        yield RecipeRun(folder, recipe.name, list(recipe.seeds), dict(done.get("teacher", {})),
                        {row: dict(v) for row, v in done.get("rows", {}).items()})


def rows_to_run(all_rows: Iterable[str], seed: int, results: dict[str, Any], rows: list[str] | None,
                overwrite: bool) -> list[str]:
    """The rows of ``seed`` to run: those asked for (``rows``, default all), less those finished in
    ``results`` (``{row: {"seeds": {"<seed>": ...}}}``) unless ``overwrite`` or ``rows`` says run again."""
    return [r for r in all_rows if (not rows or r in rows)
            and (overwrite or rows or str(seed) not in results.get(r, {}).get("seeds", {}))]


def load_weights(model: nn.Module, path: Path) -> None:
    """A teacher's weights from ``path`` (:func:`~distill.train.checkpoint.load_model`: no code runs, the
    checksum is checked); a recipe error when they do not fit the model."""
    if not path.is_file():
        raise FileNotFoundError(f"teacher checkpoint {str(path)!r} does not exist")
    try:
        load_model(path, model)
    except ValueError as e:
        raise RecipeError(f"teacher checkpoint {str(path)!r} does not fit the teacher model: {e}") from None


def mean_std(values: list[float], digits: int = 2) -> str:
    """``mean ± std`` over the seeds (the value alone for one seed, ``—`` for none)."""
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"
