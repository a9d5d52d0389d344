"""`distill auto` beside hand-picked recipes, on Fashion-MNIST with a fixed budget (issue 17).

The search (recipes/fashion_mnist/auto_cnn.yaml: four cnn students from 2.4k to 99k parameters,
ce / KD / DKD / DIST with their hyper-parameters and the learning rate, 4 epochs per trial on the
first 3,000 training images, scored on a held-out 10% of them) runs under a trial budget. Then,
under the same protocol (the same 3,000 images, 4 epochs, the same teacher, the 10,000 test
images, ``--seeds`` seeds), the recipe of every point of its Pareto front is run beside the
hand-picked recipes of the accuracy table (docs/benchmarks.md: cnn_student_mnist from scratch,
with KD at T = 4 and with DKD at the paper's α = 1, β = 8, T = 4, warm-up off). One table:
parameters, latency measured here (median forward of one image), test accuracy mean ± std.

    python benchmarks/auto.py [--trials 48] [--seeds 3] [--population N] [--out /tmp/auto_bench] [--reuse] [--quick]

``--reuse`` continues the study in ``--out`` (to a larger ``--trials``) instead of starting over.
``--quick``: 6 trials of 1 epoch on 600 images, two students, a 1-epoch teacher on 3,000 images, one
seed (a smoke run, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "recipes" / "fashion_mnist" / "auto_cnn.yaml"


def hand_picked(spec: Any, teacher_file: Path) -> dict[str, dict[str, Any]]:
    """The accuracy table's recipes under the search's protocol: student cnn_student_mnist."""
    base = {"kind": "distill", "data": {"name": spec.data.name, **spec.data.model_dump(mode="json", exclude_defaults=True)},
            "student": {"name": "cnn_student_mnist"},
            "teacher": {"model": {"name": spec.teacher.name, "checkpoint": str(teacher_file)}},
            "train": spec.train.model_dump(mode="json", exclude_defaults=True)}
    return {"hand: scratch": {**base, "losses": {"ce": 1.0}},
            "hand: kd T=4": {**base, "losses": {"ce": 1.0, "kd": {"T": 4.0}}},
            "hand: dkd (paper)": {**base, "losses": {"ce": 1.0, "dkd": {"T": 4.0, "alpha": 1.0, "beta": 8.0,
                                                                        "warmup_epochs": 0}}}}


def run_one(name: str, recipe: dict[str, Any], seeds: list[int], out: Path) -> list[float]:
    from distill.recipes import parse_recipe
    from distill.runner import run_recipe

    r = parse_recipe({**recipe, "name": name.replace(" ", "_").replace(":", "").replace("=", ""), "seeds": seeds,
                      "output_dir": str(out)})
    dirs = run_recipe(r, progress=False, overwrite=True)
    return [json.loads((d / "summary.json").read_text())["last_acc"] for d in dirs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=48)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default="/tmp/auto_bench")
    ap.add_argument("--population", type=int, default=None,
                    help="NSGA-II population (the spec's when omitted); its first generation is random")
    ap.add_argument("--reuse", action="store_true")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from distill.auto import load_auto_spec, measure_latency, run_auto
    from distill.models import create

    spec = load_auto_spec(SPEC)
    out = Path(args.out)
    update: dict[str, Any] = {"output_dir": str(out), "budget": spec.budget.model_copy(update={"trials": args.trials})}
    if args.population is not None:
        update["population"] = args.population
    if args.quick:
        update.update(budget=spec.budget.model_copy(update={"trials": 6}), students=spec.students[1:3],
                      data=spec.data.model_copy(update={"train_subset": 600}), teacher_train_subset=3000,
                      teacher_train=spec.teacher_train.model_copy(update={"epochs": 1}),
                      train=spec.train.model_copy(update={"epochs": 1}))
        args.seeds = 1
    spec = spec.model_copy(update=update)
    if not args.reuse and (out / spec.name).exists():
        shutil.rmtree(out / spec.name)
    t0 = time.perf_counter()
    base = run_auto(spec, progress=True, resume=args.reuse and (out / spec.name / "auto_spec.json").exists())
    search_s = time.perf_counter() - t0
    front = json.loads((base / "pareto.json").read_text())
    records = [json.loads(x) for x in (base / "trials.jsonl").read_text().splitlines()]

    seeds = list(range(args.seeds))
    rows = []
    example = torch.zeros(1, 1, 28, 28)
    teacher_file = (base / "teacher" / "model.safetensors").resolve()
    import yaml

    for f in front:
        recipe = yaml.safe_load(Path(f["recipe"]).read_text())
        t1 = time.perf_counter()
        accs = run_one(f"front trial{f['trial']}", recipe, seeds, out / "reruns")
        m = f["method"]
        settings = "" if m == "ce" else ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                  for k, v in f["losses"][m].items() if k != "warmup_epochs")
        rows.append((f"front trial {f['trial']}", f["student"], f["parameters"], f["latency_ms"],
                     f"{m} {settings}".strip() + f"; lr {f['lr']:.3g}", accs, time.perf_counter() - t1))
    for name, recipe in hand_picked(spec, teacher_file).items():
        t1 = time.perf_counter()
        accs = run_one(name, recipe, seeds, out / "reruns")
        model = create("cnn_student_mnist", num_classes=10)
        m = [k for k in recipe["losses"] if k != "ce"]
        rows.append((name, "cnn_student_mnist", sum(p.numel() for p in model.parameters()),
                     measure_latency(model, example, spec.latency.repeats), (m[0] if m else "ce") + "; lr 0.05",
                     accs, time.perf_counter() - t1))

    def fmt(accs: list[float]) -> str:
        return f"{statistics.mean(accs):.2f} ± {statistics.stdev(accs):.2f}" if len(accs) > 1 else f"{accs[0]:.2f}"

    complete = sum(r["state"] == "complete" for r in records)
    print(f"\ndistill auto on {spec.data.name}: {len(records)} trials ({complete} complete, {len(records) - complete} "
          f"pruned) of {spec.train.epochs} epoch(s) on {spec.data.train_subset} training images (held-out "
          f"{spec.holdout:.0%}), search {search_s:.0f} s including the teacher ({spec.teacher.name}, "
          f"{spec.teacher_train.epochs} epochs on {spec.teacher_train_subset or 'all'} images) and its cache; "
          f"each row below re-run from its recipe on all {spec.data.train_subset} images, {len(seeds)} seed(s), "
          "test accuracy on the 10,000 test images; latency: median forward of one image, one thread\n")
    print("| row | student | parameters | latency (ms) | settings | test acc (%) | time (s) |")
    print("| :--- | :--- | ---: | ---: | :--- | ---: | ---: |")
    for name, student, params, lat, settings, accs, secs in rows:
        print(f"| {name} | {student} | {params:,} | {lat:.3f} | {settings} | {fmt(accs)} | {secs:.0f} |")
    best_hand = max((r for r in rows if r[0].startswith("hand")), key=lambda r: statistics.mean(r[5]))
    beats = [r[0] for r in rows if r[0].startswith("front") and statistics.mean(r[5]) >= statistics.mean(best_hand[5])
             and r[2] <= best_hand[2]]
    print(f"\nbest hand-picked: {best_hand[0]} ({fmt(best_hand[5])}%, {best_hand[2]:,} parameters); front points at "
          f"least as accurate with no more parameters: {', '.join(beats) if beats else 'none'}")
    print(f"\nNSGA-II population {spec.population} (its first generation is random search)")
    print(f"\ncommand: python benchmarks/auto.py --trials {args.trials} --seeds {args.seeds} --out {args.out}"
          + (f" --population {args.population}" if args.population is not None else "")
          + (" --quick" if args.quick else ""))


if __name__ == "__main__":
    main()
