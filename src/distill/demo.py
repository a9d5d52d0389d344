"""``distill demo``: the embedded default, end to end, in a few minutes on two CPU cores.

On scikit-learn's 8x8 digits (no download): train a teacher CNN (and two more for the ensemble
row), then the same tiny student from scratch and with each method of the core, over several
seeds, and print one table of what was measured: student accuracy (last epoch, mean ± std),
agreement with the teacher, KL to the teacher and time. The run folder holds every run's
``metrics.jsonl`` and ``summary.json``, plus ``summary.json``, ``report.md`` and ``plot.png``
over all of them.
"""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from distill.files import atomic_write_json, read_json
from distill.recipes import AugmentSpec, DataSpec, ModelSpec, TrainSpec

console = Console()

# The protocol: the teacher learns from the whole training split (1,347 images); a 2.3k-parameter
# student (90x smaller) learns from its first 270 images (a fifth) — Hinton et al.'s setting of
# a small transfer set, where the teacher's soft targets carry the most that labels do not.
TEACHER = ModelSpec(name="cnn_digits_teacher")
STUDENT = ModelSpec(name="cnn_digits_student")
TEACHER_DATA = DataSpec(name="digits", batch_size=32, eval_batch_size=512, augment=AugmentSpec(crop_padding=1),
                        val_split="val")
DATA = TEACHER_DATA.model_copy(update={"train_subset": 270})
TEACHER_TRAIN = TrainSpec(epochs=20, optimizer="sgd", lr=0.05, schedule="cosine", weight_decay=5e-4)
STUDENT_EPOCHS = 40
ENSEMBLE_SIZE = 3

# demo row → losses (name → weight, or name → keyword arguments); the method's paper defaults
# apply to whatever is not given. The default rows are the logit family, label smoothing and the
# ensemble teacher; "fitnet" and "at" are extra rows (``--methods fitnet at``), with weights
# scaled for 8x8 inputs: the papers' normalisations (FitNets' sum over C·H·W, AT's β/(N·B) with
# an unsquared norm) give 2x2 and 4x4 maps a weight far above what 32x32 CIFAR maps get.
ROWS: dict[str, dict[str, Any]] = {
    "scratch": {"ce": 1.0},
    "label_smoothing": {"label_smoothing": {"eps": 0.1}},
    "kd": {"ce": 1.0, "kd": {"T": 4.0}},
    "logit_regression": {"ce": 1.0, "logit_regression": {}},
    "noisy_teacher": {"ce": 1.0, "noisy_teacher": {}},
    "dkd": {"ce": 1.0, "dkd": {"warmup_epochs": 10}},
    "dist": {"ce": 1.0, "dist": {}},
    "skd": {"ce": 1.0, "skd": {}},
    "ctkd": {"ce": 1.0, "ctkd": {}},
    "kd_ensemble": {"ce": 1.0, "kd": {"T": 4.0}},
}
EXTRA_ROWS: dict[str, dict[str, Any]] = {
    "fitnet": {"ce": 1.0, "kd": {"T": 4.0},
               "fitnet": {"student_tap": "stage2", "teacher_tap": "stage2", "weight": 0.02}},
    "at": {"ce": 1.0, "kd": {"T": 4.0}, "at": {"pairs": [["stage1", "stage1"], ["stage2", "stage2"]], "beta": 100.0}},
}
ALL_ROWS = {**ROWS, **EXTRA_ROWS}


def _student_train(epochs: int) -> TrainSpec:
    return TrainSpec(epochs=epochs, optimizer="sgd", lr=0.05, schedule="cosine", weight_decay=5e-4)


def run_demo(out_dir: str | Path = "runs", seeds: int = 3, epochs: int | None = None,
             methods: list[str] | None = None, progress: bool = True, threads: int | None = 1) -> Path:
    """Run the demo and return its folder ``OUT/demo-YYYYmmdd-HHMMSS``.

    ``threads``: torch intra-op threads (default 1: these models are too small to gain from more,
    and on a busy 2-core machine extra threads contend and slow every step many times over).
    """
    from distill.distiller import Distiller
    from distill.methods import create_method
    from distill.recipes import validate_losses
    from distill.report import aggregate, format_table, plot_runs, read_run, write_report
    from distill.runner import MODEL_FILE, build_data, build_model, ls_notes
    from distill.teachers import EnsembleTeacher, FrozenTeacher
    from distill.train import fit
    from distill.train.checkpoint import load_model

    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    rows = methods or list(ROWS)
    unknown = [r for r in rows if r not in ALL_ROWS]
    if unknown:
        raise ValueError(f"unknown demo rows {unknown}; choose from {list(ALL_ROWS)}")
    if "scratch" not in rows:
        rows = ["scratch", *rows]
    epochs = epochs or STUDENT_EPOCHS
    losses = {row: validate_losses(ALL_ROWS[row]) for row in rows}
    base = Path(out_dir) / f"demo-{datetime.now():%Y%m%d-%H%M%S}"
    base.mkdir(parents=True, exist_ok=False)
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    teacher_data = build_data(TEACHER_DATA, seed=0)
    info = build_data(DATA, seed=0)[2]
    n_teachers = ENSEMBLE_SIZE if "kd_ensemble" in rows else 1
    total = n_teachers * TEACHER_TRAIN.epochs + len(rows) * seeds * epochs
    t_start = time.perf_counter()
    console.print(f"[bold]distill demo[/bold]: digits (teacher {teacher_data[2]['train_size']} / student "
                  f"{info['train_size']} train images, {info['val_size']} val), "
                  f"teacher {TEACHER.name}, student {STUDENT.name}, {len(rows)} rows x {seeds} seeds, "
                  f"{epochs} epochs → {base}")

    bar = Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console, disable=not progress)
    with bar:
        task = bar.add_task("teacher", total=total)
        tick = lambda _row: bar.advance(task)  # noqa: E731  (one tick per epoch)
        teachers = []
        for i in range(n_teachers):
            bar.update(task, description=f"teacher {i + 1}/{n_teachers}")
            torch.manual_seed(1000 + i)
            model = build_model(TEACHER, info["num_classes"], info["in_channels"])
            tdir = base / f"teacher{i}"
            _train_teacher(model, tdir, teacher_data, i, tick)
            teachers.append(load_model(tdir / MODEL_FILE, model)[0])
        for row in rows:
            for s in range(seeds):
                bar.update(task, description=f"{row} seed {s}")
                torch.manual_seed(s)
                student = build_model(STUDENT, info["num_classes"], info["in_channels"])
                if row == "kd_ensemble":
                    teacher: Any = EnsembleTeacher(teachers, combine="probs", temperature=4.0,
                                                   metadata={"label_smoothing": 0.0})
                else:  # teacher-free rows still get it, to measure agreement; no loss reads it
                    teacher = FrozenTeacher(teachers[0])
                d = Distiller(student, teacher, {n: create_method(n, **kw) for n, kw in losses[row].items()})
                train_loader, val_loader, _ = build_data(DATA, seed=s)
                run_dir = base / "runs" / f"{row}-seed{s}"
                t0 = time.perf_counter()
                result = fit(d, train_loader, val_loader, run_dir=run_dir, seed=s, progress=False,
                             on_epoch_end=tick, epochs=epochs, **_fit_args(_student_train(epochs)))
                last = result.history[-1]
                summary = {
                    "name": row, "group": row, "kind": "distill", "losses": losses[row], "seed": s,
                    "epochs": epochs, "last_acc": result.last_acc, "best_acc": result.best_acc,
                    "best_epoch": result.best_epoch, "time_s": time.perf_counter() - t0,
                    "teacher_acc": last.get("val_teacher_acc"), "agreement": last.get("val_agreement"),
                    "kl_to_teacher": last.get("val_kl_to_teacher"),
                    "teacher_label_smoothing": teacher.metadata.get("label_smoothing"),
                    "teacher": "ensemble of 3" if row == "kd_ensemble" else TEACHER.name,
                    "notes": ls_notes(teacher.metadata, losses[row]) if row != "scratch" else [],
                }
                atomic_write_json(run_dir / "summary.json", summary, default=str)
    runs = [read_run(p) for p in sorted((base / "runs").iterdir(), key=lambda p: (rows.index(p.name.rsplit("-seed", 1)[0]), p.name))]
    table_rows = aggregate(runs)
    elapsed = time.perf_counter() - t_start
    teacher_accs = [read_json(base / f"teacher{i}" / "summary.json", "teacher summary")["last_acc"]
                    for i in range(n_teachers)]
    extra = [
        f"Teacher: {TEACHER.name} ({_count(teachers[0])} parameters), val accuracy "
        + ", ".join(f"{a:.2f}%" for a in teacher_accs) + (" (ensemble members)" if n_teachers > 1 else ""),
        f"Student: {STUDENT.name} ({_count(build_model(STUDENT, 10, 1))} parameters), {epochs} epochs, "
        f"on the first {info['train_size']} of {teacher_data[2]['train_size']} training images, "
        f"SGD lr 0.05 cosine, batch {DATA.batch_size}, random crop (padding {DATA.augment.crop_padding}).",
        f"Seeds: {seeds}. Total wall time: {elapsed:.0f} s.",
    ]
    plot = plot_runs(base, runs, baseline="scratch")
    write_report(base, runs, title="distill demo: digits", baseline="scratch", extra_lines=extra)
    atomic_write_json(base / "summary.json", {
        "kind": "collection", "name": "demo",
        "teacher_acc": teacher_accs, "seeds": seeds, "epochs": epochs, "time_s": elapsed,
        "rows": [r.__dict__ if hasattr(r, "__dict__") else r for r in table_rows],
    }, default=str)
    console.print(format_table(table_rows, baseline="scratch"))
    for line in extra:
        console.print(line)
    if plot is None:
        console.print("[yellow]matplotlib is not installed: no plot.png (pip install 'distill[plot]')[/yellow]")
    console.print(f"report: {base / 'report.md'}")
    return base


def _fit_args(t: TrainSpec) -> dict[str, Any]:
    return dict(optimizer=t.optimizer, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay,
                schedule=t.schedule, amp=t.amp)


def _count(model: torch.nn.Module) -> str:
    return f"{sum(p.numel() for p in model.parameters()) / 1000:.1f}k"


def _train_teacher(model: torch.nn.Module, tdir: Path, data: Any, i: int, tick: Any) -> None:
    from distill.runner import train_model

    train_model(model, TEACHER, TEACHER_TRAIN, data, tdir, seed=1000 + i, progress=False, on_epoch_end=tick)
