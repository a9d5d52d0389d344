"""Read finished run folders, aggregate them over seeds, and report them as a table, markdown and a plot.

A *run folder* holds ``summary.json`` (one dict describing the finished run) and ``metrics.jsonl``
(one JSON object per epoch). Runs that share ``summary["group"]`` (e.g. the method name) are the
same method trained with different seeds; :func:`aggregate` turns them into one :class:`Row`
with mean and sample standard deviation, which the table, markdown and plot functions render.

matplotlib is optional (``pip install distill[plot]``): it is imported only inside
:func:`plot_runs`, so importing this module never pulls it in.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from distill.files import atomic_write, atomic_write_text, read_json

__all__ = [
    "RunRecord",
    "Row",
    "Stat",
    "aggregate",
    "compare",
    "format_table",
    "plot_runs",
    "read_run",
    "table_markdown",
    "write_report",
]

SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.jsonl"
REPORT_FILE = "report.md"
PLOT_FILE = "plot.png"
MISSING = "–"  # shown for a value no run recorded


# --------------------------------------------------------------------------- reading


@dataclass
class RunRecord:
    """One run folder: its path, the parsed ``summary.json`` and the ``metrics.jsonl`` rows."""

    path: Path
    summary: dict[str, Any]
    metrics: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The run's name, or the folder name when the summary has none."""
        return str(self.summary.get("name") or self.path.name)

    def group_key(self, by: str = "group") -> str:
        """The key this run is aggregated under: ``summary[by]``, falling back to the name."""
        value = self.summary.get(by)
        return str(value) if value not in (None, "") else self.name


def read_run(path: str | Path) -> RunRecord:
    """Read the run folder at ``path``.

    Raises FileNotFoundError if the folder or its ``summary.json`` is missing, and ValueError
    (naming the file, and the line for ``metrics.jsonl``) if either holds invalid JSON.
    A missing ``metrics.jsonl`` gives an empty metrics list: the summary alone is enough
    for the table.
    """
    path = Path(path)
    summary_path = path / SUMMARY_FILE
    if not path.is_dir():
        raise FileNotFoundError(f"run folder {str(path)!r} does not exist")
    if not summary_path.is_file():
        raise FileNotFoundError(f"{str(path)!r} is not a run folder: it has no {SUMMARY_FILE}")
    summary = _read_summary(summary_path)
    metrics_path = path / METRICS_FILE
    metrics = _read_jsonl(metrics_path) if metrics_path.is_file() else []
    return RunRecord(path=path, summary=summary, metrics=metrics)


def _read_summary(path: Path) -> dict[str, Any]:
    """Parse ``summary.json``; it must be one JSON object."""
    summary = read_json(path, "run summary", remedy="rerun the run that wrote it, or delete the run folder")
    if not isinstance(summary, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(summary).__name__}")
    return summary


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Parse a JSON-lines file into dicts, skipping blank lines; errors name the 1-based line."""
    rows: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: line {lineno} is not valid JSON ({err.msg})") from err
            if not isinstance(row, dict):
                raise ValueError(f"{path}: line {lineno} is not a JSON object")
            rows.append(row)
    return rows


# --------------------------------------------------------------------------- aggregation


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (ddof=1; 0 for one value) of ``n`` values.

    ``mean`` and ``std`` are None when no run recorded the value.
    """

    mean: float | None
    std: float | None
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        """Summarise ``values``."""
        n = len(values)
        if n == 0:
            return cls(None, None, 0)
        mean = sum(values) / n
        # sample std: the runs are a sample of seeds, not the whole population
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
        return cls(mean, std, n)


@dataclass
class Row:
    """One group (usually one method) aggregated over its seeds."""

    group: str
    n: int
    seeds: list[Any]
    last_acc: Stat
    best_acc: Stat
    agreement: Stat
    kl_to_teacher: Stat
    time_s: Stat
    teacher_acc: float | None
    runs: list[RunRecord] = field(default_factory=list, repr=False)


# summary keys aggregated into a Stat on each Row
_STAT_KEYS = ("last_acc", "best_acc", "agreement", "kl_to_teacher", "time_s")


def _number(value: Any) -> float | None:
    """``value`` as a float, or None if it is missing or not a number (bools are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _values(runs: Iterable[RunRecord], key: str) -> list[float]:
    """The numeric ``summary[key]`` of each run that has one."""
    found = (_number(run.summary.get(key)) for run in runs)
    return [v for v in found if v is not None]


def _group_runs(runs: Iterable[RunRecord], by: str) -> dict[str, list[RunRecord]]:
    """Runs keyed by group, in the order each group first appears (dicts keep insertion order)."""
    groups: dict[str, list[RunRecord]] = {}
    for run in runs:
        groups.setdefault(run.group_key(by), []).append(run)
    return groups


def _make_row(group: str, runs: list[RunRecord]) -> Row:
    """Aggregate one group's runs."""
    stats = {key: Stat.of(_values(runs, key)) for key in _STAT_KEYS}
    return Row(
        group=group,
        n=len(runs),
        seeds=[run.summary.get("seed") for run in runs],
        teacher_acc=Stat.of(_values(runs, "teacher_acc")).mean,
        runs=list(runs),
        **stats,
    )


def aggregate(runs: Iterable[RunRecord], by: str = "group") -> list[Row]:
    """Group ``runs`` by ``summary[by]`` (falling back to the run name) and aggregate each group.

    Each :class:`Row` holds mean and sample std over seeds of last/best accuracy, agreement,
    KL to the teacher and time, the number of seeds, and the mean teacher accuracy.
    Values a run did not record are left out of that statistic rather than counted as zero.
    Rows keep the order in which their group first appears in ``runs``.
    """
    return [_make_row(group, members) for group, members in _group_runs(runs, by).items()]


# --------------------------------------------------------------------------- tables


def _fmt(value: float | None, digits: int) -> str:
    return MISSING if value is None else f"{value:.{digits}f}"


def _fmt_stat(stat: Stat, digits: int = 2) -> str:
    """``mean ± std``; a lone value has no spread worth showing, so it is printed alone."""
    if stat.mean is None:
        return MISSING
    if stat.n < 2:
        return _fmt(stat.mean, digits)
    return f"{stat.mean:.{digits}f} ± {stat.std:.{digits}f}"


def _delta(row: Row, base: Row | None, baseline: str) -> str:
    """Difference of mean last accuracy against the baseline row."""
    if row.group == baseline:
        return "(baseline)"
    if base is None or base.last_acc.mean is None or row.last_acc.mean is None:
        return MISSING
    return f"{row.last_acc.mean - base.last_acc.mean:+.2f}"


def _find_row(rows: Sequence[Row], group: str) -> Row | None:
    return next((row for row in rows if row.group == group), None)


def _table_cells(rows: Sequence[Row], baseline: str | None) -> tuple[list[str], list[list[str]]]:
    """Headers and string cells shared by the rich and markdown tables.

    The Δ column is only present when a baseline is named; if that group is absent its cells
    read "–" rather than failing, so a report still comes out when the baseline run is missing.
    """
    headers = ["method", "seeds", "acc last (%)", "acc best (%)"]
    if baseline is not None:
        headers.append(f"Δ vs {baseline}")
    headers += ["agreement (%)", "KL to teacher", "time (s)"]
    base = _find_row(rows, baseline) if baseline is not None else None
    body = []
    for row in rows:
        cells = [row.group, str(row.n), _fmt_stat(row.last_acc), _fmt_stat(row.best_acc)]
        if baseline is not None:
            cells.append(_delta(row, base, baseline))
        cells += [_fmt_stat(row.agreement), _fmt_stat(row.kl_to_teacher, 3), _fmt(row.time_s.mean, 1)]
        body.append(cells)
    return headers, body


def format_table(rows: Sequence[Row], *, baseline: str | None = None, full: bool | None = None) -> Table:
    """A rich table of ``rows``; with ``baseline``, a Δ column against that group's last accuracy.

    ``full``: include the best-epoch accuracy and the KL's std. By default only on a console
    wider than 110 columns, so the table never wraps a cell on an 80-column terminal; the
    markdown report always has every column.
    """
    from rich import box
    from rich.console import Console

    if full is None:
        full = Console().width > 110
    headers, body = _table_cells(rows, baseline)
    keep = list(range(len(headers)))
    if not full:
        keep = [i for i, h in enumerate(headers) if not h.startswith("acc best")]
        kl = headers.index("KL to teacher")
        body = [[c.split(" ± ")[0] if i == kl else c for i, c in enumerate(cells)] for cells in body]
    short = {"seeds": "n", "acc last (%)": "acc (%)", "agreement (%)": "agree (%)", "KL to teacher": "KL",
             "time (s)": "s"}
    if not full:
        body = [[c.replace("(baseline)", "base") for c in cells] for cells in body]
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for i in keep:
        header = headers[i] if full else short.get(headers[i], headers[i])
        if not full and header.startswith("Δ vs"):
            header = "Δ"
        # numbers right-aligned so decimals line up; the method name reads best left-aligned
        table.add_column(header, justify="left" if i == 0 else "right", no_wrap=True)
    for cells in body:
        table.add_row(*(cells[i] for i in keep))
    return table


def _md_cell(text: str) -> str:
    # a bare "|" inside a cell would split it into two columns
    return text.replace("|", r"\|")


def table_markdown(rows: Sequence[Row], baseline: str | None = None) -> str:
    """The same table as :func:`format_table`, as a GitHub-flavoured markdown table."""
    headers, body = _table_cells(rows, baseline)
    align = [":---"] + ["---:"] * (len(headers) - 1)
    lines = [_md_line(headers), _md_line(align)]
    lines += [_md_line(cells) for cells in body]
    return "\n".join(lines) + "\n"


def _md_line(cells: Sequence[str]) -> str:
    return "| " + " | ".join(_md_cell(c) for c in cells) + " |"


# --------------------------------------------------------------------------- report.md


def _span(values: Iterable[Any]) -> str:
    """"10" for one distinct value, "5–10" for several numbers, "" for none."""
    distinct = sorted({v for v in values if _number(v) is not None})
    if not distinct:
        return ""
    return f"{distinct[0]:g}" if len(distinct) == 1 else f"{distinct[0]:g}–{distinct[-1]:g}"


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _protocol_line(runs: Sequence[RunRecord], rows: Sequence[Row]) -> str:
    """One sentence of what the summaries tell about the protocol (epochs, seeds, teacher)."""
    parts = [f"{_plural(len(runs), 'run')} in {_plural(len(rows), 'group')}"]
    epochs = _span(run.summary.get("epochs") for run in runs)
    if epochs:
        parts.append(f"{epochs} epoch{'' if epochs == '1' else 's'}")
    seeds = sorted({s for s in (run.summary.get("seed") for run in runs) if s is not None}, key=str)
    if seeds:
        per_group = _span(row.n for row in rows)
        parts.append(f"seeds {', '.join(map(str, seeds))} ({per_group} per group)")
    teacher = Stat.of(_values(runs, "teacher_acc")).mean
    if teacher is not None:
        parts.append(f"teacher accuracy {teacher:.2f}%")
    smoothing = _span(run.summary.get("teacher_label_smoothing") for run in runs)
    if smoothing:
        # worth stating: a label-smoothed teacher is known to transfer less through KD
        parts.append(f"teacher label smoothing {smoothing}")
    return "Protocol: " + ", ".join(parts) + "."


def _notes(runs: Iterable[RunRecord]) -> list[str]:
    """Every run's notes, each text once, in first-seen order (seeds usually repeat them)."""
    seen: dict[str, None] = {}
    for run in runs:
        notes = run.summary.get("notes") or []
        for note in [notes] if isinstance(notes, str) else notes:
            seen.setdefault(str(note), None)
    return list(seen)


def write_report(
    run_dir: str | Path,
    runs: Sequence[RunRecord],
    *,
    title: str,
    baseline: str | None = None,
    extra_lines: Iterable[str] = (),
) -> Path:
    """Write ``report.md`` into ``run_dir`` and return its path.

    It holds the title, a protocol line, the markdown table, the runs' notes (deduplicated),
    ``extra_lines``, and a link to ``plot.png`` when that file exists in ``run_dir``
    (call :func:`plot_runs` first to get it).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = aggregate(runs)
    lines = [f"# {title}", "", _protocol_line(runs, rows), "", table_markdown(rows, baseline)]
    if baseline is not None:
        lines += [f"Δ: mean last-epoch accuracy minus that of `{baseline}`, in points.", ""]
    notes = _notes(runs)
    if notes:
        lines += ["## Notes", ""] + [f"- {note}" for note in notes] + [""]
    extra = list(extra_lines)
    if extra:
        lines += extra + [""]
    if (run_dir / PLOT_FILE).is_file():
        lines += [f"![Validation accuracy per epoch and final accuracy per group]({PLOT_FILE})", ""]
    path = run_dir / REPORT_FILE
    atomic_write_text(path, "\n".join(lines))
    return path


# --------------------------------------------------------------------------- plot


def _epoch_curve(runs: Sequence[RunRecord], key: str = "val_student_acc") -> tuple[list[float], list[Stat]]:
    """Per-epoch mean/std of ``key`` over the runs; runs of different length just add fewer points."""
    by_epoch: dict[float, list[float]] = {}
    for run in runs:
        for i, row in enumerate(run.metrics):
            value = _number(row.get(key))
            if value is None:
                continue
            epoch = _number(row.get("epoch"))
            by_epoch.setdefault(i if epoch is None else epoch, []).append(value)
    epochs = sorted(by_epoch)
    return epochs, [Stat.of(by_epoch[e]) for e in epochs]


def _plot_curves(ax: Any, rows: Sequence[Row], teacher: float | None) -> None:
    """Left panel: validation accuracy per epoch, mean line with a ±std band per group."""
    plotted = False
    for row in rows:
        epochs, stats = _epoch_curve(row.runs)
        if not epochs:
            continue
        mean = [s.mean for s in stats]
        (line,) = ax.plot(epochs, mean, label=row.group, linewidth=1.5)
        lower = [s.mean - s.std for s in stats]
        upper = [s.mean + s.std for s in stats]
        ax.fill_between(epochs, lower, upper, color=line.get_color(), alpha=0.2, linewidth=0)
        plotted = True
    if teacher is not None:
        ax.axhline(teacher, color="black", linestyle="--", linewidth=1, label="teacher")
    if plotted:
        ax.legend(fontsize=8, loc="lower right")
    else:
        ax.text(0.5, 0.5, "no validation metrics", ha="center", va="center", transform=ax.transAxes)
    ax.xaxis.get_major_locator().set_params(integer=True)  # epochs are whole numbers
    ax.set_xlabel("epoch")
    ax.set_ylabel("val student accuracy (%)")
    ax.set_title("validation accuracy (mean ± std over seeds)")
    ax.grid(alpha=0.3)


def _plot_bars(ax: Any, rows: Sequence[Row], teacher: float | None, baseline: str | None) -> None:
    """Right panel: final accuracy per group with std error bars and the teacher as a dashed line."""
    shown = [row for row in rows if row.last_acc.mean is not None]
    x = list(range(len(shown)))
    means = [row.last_acc.mean for row in shown]
    stds = [row.last_acc.std for row in shown]
    # the baseline in grey so the eye compares every other bar against it
    colors = ["tab:gray" if row.group == baseline else "tab:blue" for row in shown]
    ax.bar(x, means, yerr=stds, color=colors, capsize=4, alpha=0.85)
    for xi, mean, std in zip(x, means, stds):
        # label above the error bar's cap, where it cannot collide with it
        ax.annotate(f"{mean:.2f}", (xi, mean + std), xytext=(0, 3), textcoords="offset points",
                    ha="center", va="bottom", fontsize=7)
    if teacher is not None:
        ax.axhline(teacher, color="black", linestyle="--", linewidth=1, label=f"teacher {teacher:.2f}")
        ax.legend(fontsize=8, loc="best")
    tops = [m + s for m, s in zip(means, stds)] + ([teacher] if teacher is not None else [])
    bottoms = [m - s for m, s in zip(means, stds)] + ([teacher] if teacher is not None else [])
    if bottoms:
        # accuracies of competing methods sit within a few points: bars from 0 would hide the gaps
        # (the +2 on top leaves room for the value labels)
        ax.set_ylim(max(0.0, math.floor(min(bottoms) - 5)), max(tops) + 2)
    ax.set_xticks(x)
    ax.set_xticklabels([row.group for row in shown], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("last-epoch accuracy (%)")
    ax.set_title("final accuracy (mean ± std)")
    ax.grid(axis="y", alpha=0.3)


def plot_runs(run_dir: str | Path, runs: Sequence[RunRecord], *, baseline: str | None = None) -> Path | None:
    """Write ``plot.png`` into ``run_dir``: accuracy curves per group (left), final accuracy bars (right).

    Returns the path, or None without printing anything when matplotlib is not installed
    (the caller tells the user to install ``distill[plot]``). Raises ValueError for no runs.
    """
    if not runs:
        raise ValueError("plot_runs needs at least one run")
    try:
        # the object-oriented API with the Agg canvas renders off-screen and leaves pyplot's
        # global backend alone, so calling this from a notebook does not change its backend
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    rows = aggregate(runs)
    teacher = Stat.of(_values(runs, "teacher_acc")).mean
    fig = Figure(figsize=(11, 4), dpi=120)
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    _plot_curves(left, rows, teacher)
    _plot_bars(right, rows, teacher, baseline)
    fig.tight_layout()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / PLOT_FILE
    atomic_write(path, lambda f: fig.savefig(f, format=path.suffix.lstrip(".") or "png"))
    return path


# --------------------------------------------------------------------------- compare (CLI)


def _natural_key(path: Path) -> list[Any]:
    # "kd-seed10" after "kd-seed2": split digits out so they compare as numbers
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _is_run(path: Path) -> bool:
    """A folder with a run's ``summary.json`` (a collection's summary, e.g. the demo's, is not one)."""
    file = path / SUMMARY_FILE
    if not file.is_file():
        return False
    try:
        return json.loads(file.read_text()).get("kind") != "collection"
    except (ValueError, AttributeError):
        return True  # let read_run report the broken file


def _find_runs(path: Path) -> list[Path]:
    """Run folders at ``path``: itself, or its subfolders and theirs (two levels).

    Two levels cover a demo folder (``teacher0/``, ``runs/<group>-seed<k>/``) and a recipe's
    output (``teacher/``, ``seed<k>/``).
    """
    if _is_run(path):
        return [path]
    if not path.is_dir():
        return []
    found: list[Path] = []
    for sub in sorted((p for p in path.iterdir() if p.is_dir()), key=_natural_key):
        if _is_run(sub):
            found.append(sub)
        else:
            found.extend(p for p in sorted(sub.iterdir(), key=_natural_key) if p.is_dir() and _is_run(p))
    return found


def compare(
    paths: Sequence[str | Path], *, by: str = "group", baseline: str | None = None
) -> tuple[Table, list[RunRecord]]:
    """Collect the runs under ``paths`` and tabulate them aggregated by ``by``.

    Each path is a run folder or a folder holding run folders (see :func:`_find_runs`).
    A run reached through two paths is counted once. Raises ValueError naming every path
    under which no run was found.
    """
    if not paths:
        raise ValueError("compare needs at least one run folder")
    run_paths: dict[Path, Path] = {}  # resolved path -> path as given, to drop duplicates
    empty: list[str] = []
    for raw in paths:
        found = _find_runs(Path(raw))
        if not found:
            empty.append(str(raw))
        for run_path in found:
            run_paths.setdefault(run_path.resolve(), run_path)
    if empty:
        raise ValueError(f"no run folder (with {SUMMARY_FILE}) found in: {', '.join(map(repr, empty))}")
    runs = [read_run(p) for p in run_paths.values()]
    return format_table(aggregate(runs, by=by), baseline=baseline), runs
