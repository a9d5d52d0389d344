"""Tests for distill.report on hand-written run folders with known numbers."""

from __future__ import annotations

import ast
import io
import json
import math
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from rich.table import Table

from distill import report
from distill.report import (
    RunRecord,
    aggregate,
    compare,
    format_table,
    plot_runs,
    read_run,
    table_markdown,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TEACHER_ACC = 95.0


def make_run(
    folder: Path,
    *,
    group: str | None,
    seed: int,
    last_acc: float,
    best_acc: float | None = None,
    teacher: bool = True,
    agreement: float = 80.0,
    kl: float = 0.5,
    time_s: float = 10.0,
    epochs: int = 3,
    notes: list[str] | None = None,
) -> Path:
    """Write a run folder whose validation accuracy climbs linearly to ``last_acc``."""
    folder.mkdir(parents=True)
    metrics = []
    for epoch in range(epochs):
        acc = last_acc - 2.0 * (epochs - 1 - epoch)
        row: dict[str, Any] = {"epoch": epoch, "lr": 0.1, "train_loss": 1.0 / (epoch + 1),
                               "train_ce": 0.5, "val_student_acc": acc, "best_acc": acc,
                               "time_s": time_s / epochs}
        if teacher:
            row.update(val_teacher_acc=TEACHER_ACC, val_agreement=agreement, val_kl_to_teacher=kl)
        metrics.append(row)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    summary: dict[str, Any] = {
        "name": f"{group or folder.name}-seed{seed}" if group else folder.name,
        "kind": "distill" if teacher else "train",
        "losses": {"ce": 1.0, "kd": {"weight": 0.9, "T": 4.0}} if teacher else {"ce": 1.0},
        "seed": seed, "epochs": epochs, "last_acc": last_acc,
        "best_acc": last_acc if best_acc is None else best_acc,
        "best_epoch": epochs - 1, "time_s": time_s,
    }
    if group is not None:
        summary["group"] = group
    if teacher:
        summary.update(teacher_acc=TEACHER_ACC, agreement=agreement, kl_to_teacher=kl,
                       teacher_label_smoothing=None)
    if notes:
        summary["notes"] = notes
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


@pytest.fixture
def demo_dir(tmp_path: Path) -> Path:
    """A demo output folder: out/runs/<group>-seed<k>/ for a scratch baseline and a KD method."""
    runs = tmp_path / "out" / "runs"
    for seed, acc in enumerate([88.0, 89.0, 90.0]):
        make_run(runs / f"scratch-seed{seed}", group="scratch", seed=seed, last_acc=acc, teacher=False,
                 time_s=8.0)
    for seed, (acc, agr, kl) in enumerate([(90.0, 80.0, 0.3), (92.0, 82.0, 0.4), (94.0, 84.0, 0.5)]):
        make_run(runs / f"kd-seed{seed}", group="kd", seed=seed, last_acc=acc, best_acc=acc + 1,
                 agreement=agr, kl=kl, time_s=12.0,
                 notes=["teacher label smoothing unknown"] if seed < 2 else None)
    return tmp_path / "out"


def all_runs(demo_dir: Path) -> list[RunRecord]:
    return [read_run(p) for p in sorted((demo_dir / "runs").iterdir())]


def render(table: Table) -> str:
    console = Console(width=200, record=True)
    console.print(table)
    return console.export_text()


# --------------------------------------------------------------------------- reading


def test_read_run_parses_summary_and_metrics(tmp_path: Path) -> None:
    folder = make_run(tmp_path / "r", group="kd", seed=3, last_acc=91.0)
    run = read_run(folder)
    assert run.path == folder
    assert run.summary["seed"] == 3 and run.summary["group"] == "kd"
    assert [m["epoch"] for m in run.metrics] == [0, 1, 2]
    assert run.metrics[-1]["val_student_acc"] == 91.0


def test_read_run_missing_summary_names_path(tmp_path: Path) -> None:
    folder = tmp_path / "not_a_run"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match="not_a_run.*summary.json"):
        read_run(folder)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_run(tmp_path / "nowhere")


def test_read_run_bad_jsonl_line_names_the_line(tmp_path: Path) -> None:
    folder = make_run(tmp_path / "r", group="kd", seed=0, last_acc=91.0)
    with open(folder / "metrics.jsonl", "a") as f:
        f.write("\n{not json\n")  # a blank line 4 is skipped; line 5 is broken
    with pytest.raises(ValueError, match=r"metrics\.jsonl: line 5 "):
        read_run(folder)


def test_read_run_bad_summary_names_file(tmp_path: Path) -> None:
    folder = make_run(tmp_path / "r", group="kd", seed=0, last_acc=91.0)
    (folder / "summary.json").write_text("{")
    with pytest.raises(ValueError, match="summary.json"):
        read_run(folder)


# --------------------------------------------------------------------------- aggregate


def test_aggregate_mean_and_sample_std(demo_dir: Path) -> None:
    rows = aggregate(all_runs(demo_dir))
    assert [r.group for r in rows] == ["kd", "scratch"]  # order of first appearance (sorted paths)
    kd, scratch = rows
    assert kd.n == 3 and sorted(kd.seeds) == [0, 1, 2]
    # 90, 92, 94: mean 92, squared deviations 4+0+4 over n-1=2 -> std 2
    assert kd.last_acc.mean == pytest.approx(92.0) and kd.last_acc.std == pytest.approx(2.0)
    assert kd.best_acc.mean == pytest.approx(93.0) and kd.best_acc.std == pytest.approx(2.0)
    assert kd.agreement.mean == pytest.approx(82.0) and kd.agreement.std == pytest.approx(2.0)
    assert kd.kl_to_teacher.mean == pytest.approx(0.4) and kd.kl_to_teacher.std == pytest.approx(0.1)
    assert kd.time_s.mean == pytest.approx(12.0) and kd.time_s.std == pytest.approx(0.0)
    assert kd.teacher_acc == pytest.approx(TEACHER_ACC)
    # 88, 89, 90: mean 89, std sqrt((1+0+1)/2) = 1
    assert scratch.last_acc.mean == pytest.approx(89.0) and scratch.last_acc.std == pytest.approx(1.0)
    # no teacher: missing, not zero
    assert scratch.agreement.mean is None and scratch.teacher_acc is None


def test_aggregate_single_run_std_zero_and_name_fallback(tmp_path: Path) -> None:
    run = read_run(make_run(tmp_path / "solo", group=None, seed=0, last_acc=77.0))
    (row,) = aggregate([run])
    assert row.group == "solo"  # no group: falls back to the name
    assert row.n == 1 and row.last_acc.mean == 77.0 and row.last_acc.std == 0.0


def test_aggregate_by_other_key(demo_dir: Path) -> None:
    rows = aggregate(all_runs(demo_dir), by="kind")
    assert {r.group: r.n for r in rows} == {"distill": 3, "train": 3}


# --------------------------------------------------------------------------- tables


def test_markdown_table_formats_and_delta(demo_dir: Path) -> None:
    md = table_markdown(aggregate(all_runs(demo_dir)), baseline="scratch")
    lines = md.strip().splitlines()
    assert "Δ vs scratch" in lines[0]
    assert len(lines) == 4  # header, alignment, kd, scratch
    kd_line = next(line for line in lines if line.startswith("| kd "))
    assert "92.00 ± 2.00" in kd_line  # last acc
    assert "93.00 ± 2.00" in kd_line  # best acc
    assert "+3.00" in kd_line  # 92 - 89
    assert "82.00 ± 2.00" in kd_line  # agreement
    assert "0.400 ± 0.100" in kd_line  # KL
    assert "12.0" in kd_line
    scratch_line = next(line for line in lines if line.startswith("| scratch "))
    assert "89.00 ± 1.00" in scratch_line and "(baseline)" in scratch_line
    assert scratch_line.count("–") == 2  # no agreement, no KL


def test_markdown_without_baseline_has_no_delta_column(demo_dir: Path) -> None:
    md = table_markdown(aggregate(all_runs(demo_dir)))
    assert "Δ" not in md


def test_missing_baseline_group_shows_dash(demo_dir: Path) -> None:
    md = table_markdown(aggregate(all_runs(demo_dir)), baseline="nope")
    kd_line = next(line for line in md.splitlines() if line.startswith("| kd "))
    assert "Δ vs nope" in md and "+" not in kd_line


def test_format_table_is_rich_table(demo_dir: Path) -> None:
    table = format_table(aggregate(all_runs(demo_dir)), baseline="scratch", full=True)
    assert isinstance(table, Table)
    assert table.row_count == 2
    text = render(table)
    assert "92.00 ± 2.00" in text and "+3.00" in text and "(baseline)" in text
    assert "acc best" in text and "0.400 ± 0.100" in text


def test_compact_table_fits_an_80_column_terminal(demo_dir: Path) -> None:
    from rich.console import Console

    table = format_table(aggregate(all_runs(demo_dir)), baseline="scratch", full=False)
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(table)
    lines = console.export_text().splitlines()
    assert max(len(line) for line in lines) <= 80
    text = "\n".join(lines)
    assert "…" not in text  # no cell truncated
    assert "92.00 ± 2.00" in text and "+3.00" in text and "base" in text
    assert "acc best" not in text  # the best-epoch column stays in report.md


# --------------------------------------------------------------------------- report and plot


def test_write_report_contains_table_notes_and_plot_link(demo_dir: Path) -> None:
    runs = all_runs(demo_dir)
    assert plot_runs(demo_dir, runs, baseline="scratch") is not None
    path = write_report(demo_dir, runs, title="KD demo", baseline="scratch", extra_lines=["extra line"])
    assert path == demo_dir / "report.md"
    text = path.read_text()
    assert text.startswith("# KD demo")
    assert table_markdown(aggregate(runs), baseline="scratch") in text
    assert "3 epochs" in text and "seeds 0, 1, 2" in text
    assert text.count("teacher label smoothing unknown") == 1  # two runs, one note
    assert "extra line" in text
    assert "![" in text and "](plot.png)" in text


def test_write_report_without_plot_has_no_image(tmp_path: Path) -> None:
    runs = [read_run(make_run(tmp_path / "r", group="kd", seed=0, last_acc=91.0))]
    text = write_report(tmp_path / "report_dir", runs, title="t").read_text()
    assert "plot.png" not in text and "| kd |" in text


def test_plot_runs_writes_png(demo_dir: Path) -> None:
    pytest.importorskip("matplotlib")
    path = plot_runs(demo_dir, all_runs(demo_dir), baseline="scratch")
    assert path == demo_dir / "plot.png"
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 1024


def test_plot_runs_without_matplotlib_returns_none(demo_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert plot_runs(demo_dir, all_runs(demo_dir)) is None
    assert not (demo_dir / "plot.png").exists()
    assert capsys.readouterr().out == ""


def test_report_module_does_not_import_matplotlib_at_top_level() -> None:
    tree = ast.parse(Path(report.__file__).read_text())
    top_level = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    names = [alias.name for node in top_level if isinstance(node, ast.Import) for alias in node.names]
    names += [node.module or "" for node in top_level if isinstance(node, ast.ImportFrom)]
    assert not [n for n in names if n.startswith("matplotlib")]


# --------------------------------------------------------------------------- compare


def test_compare_finds_nested_runs(demo_dir: Path) -> None:
    for folder in (demo_dir, demo_dir / "runs"):  # the demo folder, or its runs/ folder
        table, runs = compare([folder])
        assert len(runs) == 6 and table.row_count == 2


def test_compare_single_runs_and_dedup(demo_dir: Path) -> None:
    one = demo_dir / "runs" / "kd-seed0"
    table, runs = compare([one, str(one), demo_dir / "runs"])
    assert len(runs) == 6  # kd-seed0 counted once
    table, runs = compare([one])
    assert len(runs) == 1 and table.row_count == 1


def test_compare_path_without_runs_is_named(tmp_path: Path, demo_dir: Path) -> None:
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty_folder") as err:
        compare([demo_dir, empty, tmp_path / "missing_folder"])
    assert "missing_folder" in str(err.value)


def test_natural_order_of_seeds(tmp_path: Path) -> None:
    for seed in (10, 2):
        make_run(tmp_path / f"kd-seed{seed}", group="kd", seed=seed, last_acc=90.0 + seed)
    _, runs = compare([tmp_path])
    assert [r.summary["seed"] for r in runs] == [2, 10]
    (row,) = aggregate(runs)
    assert math.isclose(row.last_acc.mean, 96.0)
