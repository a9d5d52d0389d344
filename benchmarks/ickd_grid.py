"""Grid-level ICKD on scene segmentation: the student alone, image-level ICKD, grid-level ICKD, CWD.

Same task, models and optimizer as ``benchmarks/dense.py``'s ``segmentation`` task (DeepLab-lite
``seg_teacher`` → ``seg_student`` on 64x64 MNIST scenes, mIoU over 11 classes, AdamW 2e-3 cosine;
its helpers are imported, not copied). The teacher is trained once (seed 0, ``seg_ce``) and cached
in ``--out`` as a ``weights_only`` state dict; every row then trains the student from the same
seed-``s`` initialisation, so the rows of one seed differ only by the distillation term.

Rows: ``scratch`` (``seg_ce`` alone); ``ickd`` (image-level, :class:`distill.methods.ICKD` on the
``"feat"`` maps); ``ickd_grid`` at each ``--grids`` (``"feat"`` maps, 16x16 here); ``cwd`` on the
logits (τ 4, weight 3: CWD's segmentation setting), a reference. Both ICKD forms use the same
weight, ``--ickd-weight`` (default 2.5·c = 160 for the teacher's c = 64 channels: the official CIFAR
code's β = 2.5 on its c-times larger loss; the paper's segmentation weight could not be read).

    python benchmarks/ickd_grid.py [--seeds 3] [--train-scenes 512] [--val-scenes 128] [--epochs 6]
        [--teacher-epochs 8] [--grids 2x2 4x4 8x8] [--ickd-weight 160] [--workers 1] [--root MNIST_DIR] [--quick]

Prints one table: mean ± std over seeds of the last-epoch mIoU (%) and pixel accuracy, Δ vs
scratch, and fit's training time per run (measured in this run, side by side).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import torch
from _common import run_pool

import dense  # benchmarks/dense.py: the segmentation task's data, models, teacher cache and evaluator

TASK = "segmentation"


def _losses(row: str, weight: float) -> dict[str, Any]:
    if row == "scratch":
        return {"seg_ce": 1.0}
    if row == "ickd":
        return {"seg_ce": 1.0, "ickd": {"student_tap": "feat", "teacher_tap": "feat", "weight": weight}}
    if row == "cwd":
        return dict(dense.METHOD_LOSSES["cwd"])
    n, m = (int(v) for v in row.removeprefix("ickd_grid_").split("x"))
    return {"seg_ce": 1.0, "ickd_grid": {"grid": [n, m], "weight": weight}}


def _job(job: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(1)
    import distill

    row, seed, a = job["row"], job["seed"], job["args"]
    try:
        train, val = dense._data(TASK, a["size"], a["root"])
        loader, val_loader = dense._loaders(TASK, train, val, a["batch"], seed)
        evaluator = dense._evaluator(TASK, val)
        torch.manual_seed(seed)
        student = dense._model("seg_student", TASK, train)
        teacher = None
        if row != "scratch":
            teacher = dense._model("seg_teacher", TASK, train)
            teacher.load_state_dict(torch.load(a["teacher"], weights_only=True))
        d = distill.Distiller(student, teacher, _losses(row, a["weight"]))
        with redirect_stdout(io.StringIO()):
            r = distill.fit(d, loader, val_loader, epochs=a["epochs"], evaluator=evaluator, eval_teacher=False,
                            progress=False, seed=seed, **dense.TASKS[TASK]["fit"])
        last = r.history[-1] if r.history else {}
    except Exception as e:  # noqa: BLE001 - a row that cannot run is reported, not hidden
        return {"row": row, "seed": seed, "error": f"{type(e).__name__}: {e}"}
    return {"row": row, "seed": seed, "miou": r.last_acc, "time_s": r.time_s,
            "pixel_acc": last.get("val_student_pixel_acc")}


def _fmt(values: list[float]) -> str:
    if not values:
        return "—"
    mean = statistics.fmean(values)
    return f"{mean:.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{mean:.2f}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--train-scenes", type=int, default=512)
    p.add_argument("--val-scenes", type=int, default=128)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--teacher-epochs", type=int, default=8)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--grids", nargs="+", default=["4x4"], help="grid-level rows, as NxM")
    p.add_argument("--ickd-weight", type=float, default=160.0)
    p.add_argument("--no-cwd", action="store_true", help="leave out the CWD reference row")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--out", default="runs/bench_ickd_grid")
    p.add_argument("--root", default=None, help="MNIST folder (default: distill's, or $DISTILL_MNIST)")
    p.add_argument("--quick", action="store_true", help="smoke run: 32/16 scenes, 1 epoch, 1 seed")
    a = p.parse_args(argv)
    for g in a.grids:
        parts = g.split("x")
        if len(parts) != 2 or not all(v.isdigit() and int(v) > 0 for v in parts):
            p.error(f"--grids takes NxM with positive N, M (e.g. 4x4), got {g!r}")
    if a.quick:
        a.train_scenes, a.val_scenes, a.epochs, a.teacher_epochs, a.seeds, a.batch = 32, 16, 1, 1, 1, 8
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    size = {"scenes": (a.train_scenes, a.val_scenes)}
    args = {"size_name": "ickd_grid", "epochs": a.epochs, "teacher_epochs": a.teacher_epochs, "batch": a.batch,
            "reuse": True, "size": size, "weight": a.ickd_weight, "root": a.root}
    train, val = dense._data(TASK, size, a.root)
    out = Path(a.out) / f"{a.train_scenes}_{a.val_scenes}_{a.batch}"
    path, teacher_score = dense._teacher(TASK, args, train, val, out)
    args["teacher"] = str(path)
    print(f"teacher: {teacher_score}", file=sys.stderr)
    rows = ["scratch", "ickd", *(f"ickd_grid_{g}" for g in a.grids), *([] if a.no_cwd else ["cwd"])]
    jobs = [{"row": r, "seed": s, "args": args} for s in range(a.seeds) for r in rows]
    results = []
    for r in ((_job(j) for j in jobs) if a.workers <= 1 else run_pool(_job, jobs, a.workers)):
        results.append(r)
        print(json.dumps(r, default=str), file=sys.stderr)
    (out / "results.json").write_text(json.dumps({"teacher": teacher_score, "results": results}, indent=1))
    lines = [f"segmentation, {a.train_scenes} train / {a.val_scenes} val scenes (64x64), batch {a.batch}, "
             f"teacher {a.teacher_epochs} epochs, students {a.epochs} epochs, {a.seeds} seed(s), "
             f"ICKD weight {a.ickd_weight:g}; total {time.perf_counter() - t_start:.0f} s", "",
             "| run | mIoU % (mean ± std) | Δ vs scratch | pixel acc % | time (s) | seeds |", "|---|---|---|---|---|---|",
             f"| teacher (seg_teacher) | {'—' if teacher_score is None else f'{teacher_score:.2f}'} | | | | 1 |"]
    base = [r["miou"] for r in results if r["row"] == "scratch" and r.get("miou") is not None]
    for row in rows:
        mine = [r for r in results if r["row"] == row]
        scores = [r["miou"] for r in mine if r.get("miou") is not None]
        if not scores:
            lines.append(f"| {row} | error: {mine[0].get('error', '?')[:120]} | | | | 0 |")
            continue
        acc = [r["pixel_acc"] for r in mine if r.get("pixel_acc") is not None]
        delta = f"{statistics.fmean(scores) - statistics.fmean(base):+.2f}" if base and row != "scratch" else ""
        times = [r["time_s"] for r in mine if r.get("time_s") is not None]
        lines.append(f"| {row} | {_fmt(scores)} | {delta} | {_fmt(acc)} | {_fmt(times)} | {len(scores)} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
