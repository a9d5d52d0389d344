"""Read the runs of the 3D dense recipes (recipes/dense/bev_*.yaml, mono3d_*.yaml) and print them side by side.

    python benchmarks/dense3d_recipes.py RUNS [RUNS ...]

Each ``RUNS`` is a ``distill run --out`` folder (several when seeds ran in separate folders). Two tables:

1. finished runs (every epoch of the recipe's schedule): BEV AP (%) of the last and best epoch, mean ± std
   over seeds, per recipe, with the in-run teachers' own scores;
2. each distillation run beside its student-from-scratch row (the kind-train recipe of the same data,
   seed and schedule, so both students start from the same weights and see the same batches) at the last
   epoch both reached: the method's gain for that seed. With unfinished runs (stopped, or still going) this
   is a comparison at epoch k of the schedule, not a result of the recipe: the table says which epoch.

With ``--per-epoch`` a third table: for each pair, the mean over the seeds both ran of the method's and the
scratch row's score at every epoch, their gap, and the method's own loss term (``train_<method>``): where a
method helps early and where the gap closes.

Nothing is trained here; finish an interrupted run with ``distill run RECIPE --resume --out RUNS``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

# each distillation recipe's name (OUT/<name>) and its student-from-scratch row's
PAIRS = {
    "dense_bev_sparse_kd3d": "dense_bev_pillars_student",
    "dense_bev_pointdistiller": "dense_bev_pillars_student",
    "dense_bev_lidar_distill": "dense_bev_pillars_student_16beams",
    "dense_mono3d_monodistill": "dense_mono3d_student",
    # LiDAR Distillation's own setting: both start as the teacher's copy; the baseline only fine-tunes
    "dense_bev_lidar_distill_from_teacher": "dense_bev_finetune_16beams_from_teacher",
}
ORDER = ["dense_bev_pillars_student", "dense_bev_sparse_kd3d", "dense_bev_pointdistiller",
         "dense_bev_pillars_student_16beams", "dense_bev_lidar_distill", "dense_mono3d_student",
         "dense_mono3d_monodistill", "dense_bev_finetune_16beams_from_teacher", "dense_bev_lidar_distill_from_teacher"]


def _history(folder: Path) -> list[dict]:
    f = folder / "metrics.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.is_file() else []


def _epochs(recipe_dir: Path) -> int:
    """The student's schedule length, from the recipe the run saved."""
    import yaml

    return int(yaml.safe_load((recipe_dir / "recipe.yaml").read_text())["train"]["epochs"])


def _ms(values: list[float]) -> str:
    if not values:
        return "–"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {sd:.2f}"


def collect(roots: list[Path]) -> dict[str, dict[int, list[dict]]]:
    """``{recipe name: {seed: its metrics rows}}`` over every root (a seed found twice: the longer history)."""
    runs: dict[str, dict[int, list[dict]]] = {}
    for root in roots:
        for name in ORDER:
            for seed_dir in sorted((root / name).glob("seed*")):
                rows = _history(seed_dir)
                seed = int(seed_dir.name[4:])
                if rows and len(rows) > len(runs.setdefault(name, {}).get(seed, [])):
                    runs[name][seed] = rows
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--per-epoch", action="store_true", help="also each pair's per-epoch means over seeds")
    args = ap.parse_args()
    runs = collect(args.runs)
    schedule = {}
    for name in runs:
        schedule[name] = next(_epochs(r / name) for r in args.runs if (r / name / "recipe.yaml").is_file())

    print("finished runs: BEV AP (%), mean ± std over seeds")
    print(f"{'recipe':36s} {'seeds':>8s} {'last':>14s} {'best':>14s} {'teacher (val)':>14s}")
    for name in ORDER:
        done = {s: rows for s, rows in runs.get(name, {}).items() if len(rows) == schedule[name]}
        if not done:
            continue
        last = [rows[-1]["val_student_acc"] for rows in done.values()]
        best = [max(r["val_student_acc"] for r in rows) for rows in done.values()]
        teacher = [rows[-1]["val_teacher_acc"] for rows in done.values() if rows[-1].get("val_teacher_acc") is not None]
        print(f"{name:36s} {','.join(map(str, sorted(done))):>8s} {_ms(last):>14s} {_ms(best):>14s} {_ms(teacher):>14s}")
    teachers: dict[tuple, list[str]] = {}  # a teacher folder copied to several recipes' folders is shown once
    for root in args.runs:
        for t in sorted(root.glob("dense_*/teacher/summary.json")):
            s = json.loads(t.read_text())
            teachers.setdefault((s["name"], s["seed"], s["last_acc"], s["best_acc"]), []).append(t.parent.parent.name)
    for (model, seed, last, best), folders in teachers.items():
        print(f"{'teacher ' + model:36s} {seed!s:>8s} {last:14.2f} {best:14.2f}   (in {len(folders)} recipe folders)")

    print("\neach method beside its scratch row, same seed, at the last epoch both reached (of the schedule's)")
    print(f"{'recipe':28s} {'seed':>4s} {'epoch':>8s} {'method':>8s} {'scratch':>8s} {'gain':>8s} {'teacher':>8s}")
    for name, base in PAIRS.items():
        gains = []
        for seed, rows in sorted(runs.get(name, {}).items()):
            ref = runs.get(base, {}).get(seed)
            if not ref:
                continue
            e = min(len(rows), len(ref)) - 1
            a, b = rows[e]["val_student_acc"], ref[e]["val_student_acc"]
            gains.append(a - b)
            t = rows[0].get("val_teacher_acc")  # the frozen teacher on the validation scans (the student's)
            print(f"{name:28s} {seed:4d} {f'{e + 1}/{schedule[name]}':>8s} {a:8.2f} {b:8.2f} {a - b:+8.2f} "
                  f"{'–' if t is None else f'{t:.2f}':>8s}")
        if len(gains) > 1:
            print(f"{name:28s} {'mean':>4s} {'':>8s} {'':>8s} {'':>8s} {statistics.mean(gains):+8.2f}")
    if args.per_epoch:
        for name, base in PAIRS.items():
            per_epoch(name, base, runs)


def per_epoch(name: str, base: str, runs: dict[str, dict[int, list[dict]]]) -> None:
    """Mean over the seeds both ran: method and scratch score per epoch, the gap, the method's loss term."""
    seeds = sorted(set(runs.get(name, {})) & set(runs.get(base, {})))
    if not seeds:
        return
    n = min(min(len(runs[name][s]), len(runs[base][s])) for s in seeds)
    term = "train_" + name.removeprefix("dense_bev_").removeprefix("dense_mono3d_").removesuffix("_from_teacher")
    print(f"\n{name} vs {base}, per epoch, mean over seeds {','.join(map(str, seeds))}")
    print(f"{'epoch':>5s} {'method':>8s} {'scratch':>8s} {'gain':>8s} {term:>24s}")
    for e in range(n):
        a = statistics.mean(runs[name][s][e]["val_student_acc"] for s in seeds)
        b = statistics.mean(runs[base][s][e]["val_student_acc"] for s in seeds)
        losses = [runs[name][s][e][term] for s in seeds if term in runs[name][s][e]]
        shown = f"{statistics.mean(losses):.3f}" if losses else "–"
        print(f"{e + 1:5d} {a:8.2f} {b:8.2f} {a - b:+8.2f} {shown:>24s}")


if __name__ == "__main__":
    main()
