"""Dense-prediction distillation (issue 14): every registered dense method beside its scratch student.

Per task a teacher trained once (cached in ``--out`` as a ``weights_only`` state dict; ``--reuse``
keeps it when its settings match), the student from scratch (its task loss alone), and the student
with each registered method of the task (task loss + the method), over several seeds; mean ± std of
the last-epoch score (mAP / mIoU / BEV AP, in %) and of the training time per run (fit's time, the
per-epoch evaluations and a method's first stage included; data building excluded). Semi-supervised
detection (Dense Teacher, DTG-SSOD) runs as a task of its own: a labelled fraction of the detection
scenes, the rest unlabeled, against the student trained on the labelled fraction alone for the same
number of optimizer steps (an epoch of a strategy is a pass over the unlabeled scenes, each step
also drawing a labelled batch).

    python benchmarks/dense.py [--tasks detection segmentation bev ...] [--seeds 3] [--quick]
        [--methods ld fgd ...] [--workers 2] [--out runs/bench_dense] [--reuse] [--write-docs]

Tasks (``TASKS``): ``detection`` (GFL-style detector on 64x64 MNIST scenes, COCO mAP),
``detr`` (the small DETR, mAP), ``segmentation`` (DeepLab-lite, mIoU over 11 classes), ``bev``
(PointPillars-style BEV detector on LiDAR point scenes, BEV AP), ``mono3d`` (CenterNet-style
monocular 3D detector on the same scenes' camera view, BEV AP), ``ssod`` (semi-supervised GFL).
Methods are found in the registry by family (``FAMILY_TASK``; ``TASK_OF`` sends a method to another
task), so a method registered later appears without touching this file; ``METHOD_LOSSES`` holds the
loss settings that differ from "task loss 1 + the method with its paper defaults", ``STAGES`` the
methods whose paper trains a part first, ``SPECIAL`` the ones that need other data or teachers,
``BASELINES`` the scratch students of another scan (LiDAR Distillation's 16-beam student is compared with a
16-beam scratch student, not with the 64-beam one).
``--quick`` is a smoke run (tiny data, one epoch, one seed): it checks that every row runs.
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
from _common import run_pool, write_section

# ----------------------------------------------------------------------------- the tables (edit here)

# task -> its models, task loss, data and metric; "fit": the optimizer settings of every run of the task
TASKS: dict[str, dict[str, Any]] = {
    # students get 18 epochs (6 left the scratch student at 5.3 mAP, still climbing; 18: 15.1, teacher 40.6)
    "detection": {"teacher": "gfl_teacher", "student": "gfl_student", "task_loss": "gfl_loss", "data": "scenes",
                  "metric": "mAP", "full_epochs": 18, "fit": {"optimizer": "adamw", "lr": 2e-3, "schedule": "cosine", "weight_decay": 1e-4}},
    # DETR converges slowly: 40 epochs at lr 1e-3 (part D2b measured the teacher at 11.9 mAP, the student at 2.1)
    "detr": {"teacher": "detr_teacher", "student": "detr_student", "task_loss": "detr_loss", "data": "scenes",
             "metric": "mAP", "full_epochs": 40, "full_teacher_epochs": 40,
             "fit": {"optimizer": "adamw", "lr": 1e-3, "schedule": "cosine", "weight_decay": 1e-4, "grad_clip": 0.1}},
    # 24 student epochs: at 6 the scratch student is near all-background (12.6 mIoU); at 24 55.8, teacher 66.3
    "segmentation": {"teacher": "seg_teacher", "student": "seg_student", "task_loss": "seg_ce", "data": "scenes",
                     "metric": "mIoU", "full_epochs": 24, "fit": {"optimizer": "adamw", "lr": 2e-3, "schedule": "cosine",
                                               "weight_decay": 1e-4}},
    # 12 student epochs, as the 3D recipes (6 left the scratch student at 5.5 BEV AP, loss still falling)
    "bev": {"teacher": "pillars_teacher", "student": "pillars_student", "task_loss": "bev_loss", "data": "points",
            "metric": "BEV AP", "full_epochs": 12, "fit": {"optimizer": "adamw", "lr": 2e-3, "schedule": "cosine", "weight_decay": 1e-4}},
    # 24 epochs each: after 12 the monocular teacher was at 5.8 BEV AP and the 6-epoch student at 1.5
    "mono3d": {"teacher": "mono_teacher", "student": "mono_student", "task_loss": "mono3d_loss", "data": "camera",
               "metric": "BEV AP", "full_epochs": 24, "full_teacher_epochs": 24, "fit": {"optimizer": "adamw", "lr": 2e-3, "schedule": "cosine",
                                           "weight_decay": 1e-4}},
    # 18 passes over the unlabeled scenes (6 left every row near 2 mAP, where pseudo-labels are noise)
    "ssod": {"student": "gfl_student", "task_loss": "gfl_loss", "data": "scenes", "metric": "mAP", "full_epochs": 18,
             "labeled_fraction": 0.1, "strategies": ["dense_teacher", "dtg_ssod"],
             "fit": {"optimizer": "adamw", "lr": 2e-3, "schedule": "cosine", "weight_decay": 1e-4}},
}
# registry family -> task; TASK_OF overrides single methods
FAMILY_TASK = {"detection": "detection", "segmentation": "segmentation", "detection3d": "bev"}
TASK_OF = {"detrdistill": "detr", "monodistill": "mono3d"}
# the dense forms of two feature methods of the classification families, run on the segmentation maps
EXTRA = {"segmentation": ["cwd", "mgd"]}
# losses other than {task_loss: 1, method: {}} (a method's own defaults are its paper's)
METHOD_LOSSES: dict[str, dict[str, Any]] = {
    # CWD on the segmentation logits (τ = 4, weight 3: the authors' Cityscapes setting, see docs/methods.md)
    "cwd": {"seg_ce": 1.0, "cwd": {"pairs": [("logits_map", "logits_map")], "tau": 4.0, "weight": 3.0}},
    # MGD on the segmenter's last feature map (its α, mask ratio and generation block: the method's defaults)
    "mgd": {"seg_ce": 1.0, "mgd": {"student_tap": "feat", "teacher_tap": "feat"}},
    # sparse KD's released configuration weights its logit term 7; its label KD replaces bev_loss (GT inside)
    "sparse_kd3d": {"bev_loss": 1.0, "sparse_kd3d": 7.0},
    "sparse_kd3d_label": {"sparse_kd3d_label": {}},
    "ld": {"gfl_loss": 1.0, "ld": 0.25},
    "ld_vlr": {"gfl_loss": 1.0, "ld_vlr": 0.25},
}
# a first stage of the paper (the owner method's stage, 1 epoch) before the main fit
STAGES: dict[str, tuple[str, int]] = {"knowledge_adaptation": ("ka_autoencoder", 1),
                                      "graph_flow": ("graph_flow_paraphraser", 1)}
# methods that are not a training loss on their own (stages), or need what this benchmark lacks
SKIP = {"ka_autoencoder", "graph_flow_paraphraser"}
# LiDAR Distillation: the student sees STUDENT_BEAMS beams, the teacher the full 64-beam scans
SPECIAL = {"lidar_distill": {"student_beams": 16}}
# rows that are not methods: a student from scratch on another scan, the baseline of the rows named here
BASELINES = {"bev": {"scratch_16beams": {"student_beams": 16, "baseline_of": ["lidar_distill"]}}}
# LGD has no pretrained teacher (the method owns its label-guided one)
TEACHER_FREE = {"lgd"}

SIZES = {  # (train scenes, val scenes, student epochs, teacher epochs, batch size)
    "full": {"scenes": (1024, 256), "points": (256, 64), "epochs": 6, "teacher_epochs": 12, "batch": 16},
    "quick": {"scenes": (48, 16), "points": (16, 8), "epochs": 1, "teacher_epochs": 1, "batch": 8},
}


# ----------------------------------------------------------------------------- data, models, evaluators


def _data(task: str, size: dict[str, Any], root: str | None) -> tuple[Any, Any]:
    """(train set, val set) of a task."""
    kind = TASKS[task]["data"]
    if kind == "scenes":
        from distill.data import get_dataset

        n_train, n_val = size["scenes"]
        return (get_dataset("mnist_scenes", root, split="train", n_scenes=n_train, canvas=64, seed=0),
                get_dataset("mnist_scenes", root, split="test", n_scenes=n_val, canvas=64, seed=1))
    from distill.data.pointscenes import make_point_scenes

    n_train, n_val = size["points"]
    return make_point_scenes(n_train, seed=0, progress=False), make_point_scenes(n_val, seed=1, progress=False)


def _loaders(task: str, train: Any, val: Any, batch: int, seed: int) -> tuple[Any, Any]:
    inputs = "camera" if TASKS[task]["data"] == "camera" else "points"
    if TASKS[task]["data"] == "scenes":
        return train.loader(batch, shuffle=True, seed=seed, masks=False), val.loader(2 * batch, masks=False)
    return train.loader(batch, shuffle=True, seed=seed, inputs=inputs), val.loader(2 * batch, inputs=inputs)


def _evaluator(task: str, val: Any) -> Any:
    if TASKS[task]["data"] == "scenes" and task != "segmentation":
        from distill.train.dense_eval import detection_evaluator

        return detection_evaluator
    if task == "segmentation":
        from distill.train.dense_eval import segmentation_evaluator

        return segmentation_evaluator(val.num_seg_classes)
    from distill.train.bev_eval import bev_evaluator

    return bev_evaluator()


def _model(name: str, task: str, train: Any) -> torch.nn.Module:
    from distill.models import create

    if task == "segmentation":
        return create(name, num_classes=train.num_seg_classes)
    return create(name)


def _epochs(task: str, args: dict[str, Any], key: str) -> int:
    """``args[key]`` (student ``epochs`` or ``teacher_epochs``), or in the full protocol the task's own
    ``full_<key>`` unless the command line set it."""
    if args["size_name"] == "full" and f"full_{key}" in TASKS[task] and not args.get(f"{key}_set"):
        return int(TASKS[task][f"full_{key}"])
    return int(args[key])


def _teacher(task: str, args: dict[str, Any], train: Any, val: Any, out: Path) -> tuple[Path, float | None]:
    """The task's teacher trained once (seed 0, task loss), cached as a weights_only state dict."""
    import distill

    cfg = TASKS[task]
    path, meta = out / task / "teacher.pt", out / task / "teacher.json"
    epochs = _epochs(task, args, "teacher_epochs")
    settings = {"model": cfg["teacher"], "task_loss": cfg["task_loss"], "size": args["size_name"],
                "epochs": epochs, "fit": cfg["fit"]}
    if args["reuse"] and path.exists() and meta.exists():
        saved = json.loads(meta.read_text())
        if saved.get("settings") == json.loads(json.dumps(settings)):
            return path, saved.get("score")
    torch.manual_seed(0)
    teacher = _model(cfg["teacher"], task, train)
    loader, val_loader = _loaders(task, train, val, args["batch"], 0)
    with redirect_stdout(io.StringIO()):
        r = distill.fit(distill.Distiller(teacher, None, {cfg["task_loss"]: 1.0}), loader, val_loader,
                        epochs=epochs, evaluator=_evaluator(task, val), progress=False, seed=0,
                        **cfg["fit"])
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(teacher.state_dict(), path)
    meta.write_text(json.dumps({"settings": settings, "score": r.last_acc}))
    return path, r.last_acc


# ----------------------------------------------------------------------------- one run


def _losses(task: str, name: str) -> dict[str, Any]:
    loss = TASKS[task]["task_loss"]
    if name == "scratch" or name in BASELINES.get(task, {}):
        return {loss: 1.0}
    return METHOD_LOSSES.get(name, {loss: 1.0, name: {}})


def _job(job: dict[str, Any]) -> dict[str, Any]:
    """One (task, method, seed) run; returns its summary or its error."""
    torch.set_num_threads(1)
    import distill

    task, name, seed, a = job["task"], job["name"], job["seed"], job["args"]
    size = SIZES[a["size_name"]]
    t0 = time.perf_counter()
    try:
        train, val = _data(task, size, a["root"])
        loader, val_loader = _loaders(task, train, val, a["batch"], seed)
        evaluator = _evaluator(task, val)
        with redirect_stdout(io.StringIO()):
            if task == "ssod":
                score, train_s = _ssod(name, train, val, seed, a, evaluator)
            else:
                score, train_s = _distill(task, name, seed, a, train, val, loader, val_loader, evaluator, distill)
    except Exception as e:  # noqa: BLE001 - a method that cannot run here is reported, not hidden
        return {"task": task, "name": name, "seed": seed, "error": f"{type(e).__name__}: {e}"}
    return {"task": task, "name": name, "seed": seed, "score": score,
            "time_s": train_s if train_s is not None else time.perf_counter() - t0}


def _distill(task: str, name: str, seed: int, a: dict[str, Any], train: Any, val: Any, loader: Any,
             val_loader: Any, evaluator: Any, distill: Any) -> tuple[float | None, float | None]:
    cfg = TASKS[task]
    torch.manual_seed(seed)
    student = _model(cfg["student"], task, train)
    teacher: Any = None
    baseline = BASELINES.get(task, {}).get(name)
    if baseline is not None:  # a scratch student on the scan its methods' students see
        low = train.with_beams(baseline["student_beams"])
        loader = low.loader(a["batch"], shuffle=True, seed=seed, inputs="points")
        val_loader = val.with_beams(baseline["student_beams"]).loader(2 * a["batch"], inputs="points")
    if name != "scratch" and name not in TEACHER_FREE and baseline is None:
        teacher = _model(cfg["teacher"], task, train)
        teacher.load_state_dict(torch.load(a["teachers"][task], weights_only=True))
    if name in SPECIAL and "student_beams" in SPECIAL[name]:  # LiDAR Distillation: fewer beams, teacher on 64
        from distill.methods.dense3d import BeamTeacher, paired_beams

        low = train.with_beams(SPECIAL[name]["student_beams"])
        loader = paired_beams(low.loader(a["batch"], seed=seed), train.loader(a["batch"], seed=seed))
        val_loader = val.with_beams(SPECIAL[name]["student_beams"]).loader(2 * a["batch"])
        teacher = BeamTeacher(teacher)
    d = distill.Distiller(student, teacher, _losses(task, name))
    stage_s = 0.0
    if name in STAGES:
        stage, stage_epochs = STAGES[name]
        stage_s = distill.fit_hint_stage(d, loader, method=stage, epochs=stage_epochs, seed=seed, progress=False,
                                         **cfg["fit"]).time_s or 0.0
    r = distill.fit(d, loader, val_loader, epochs=_epochs(task, a, "epochs"), evaluator=evaluator, eval_teacher=False,
                    progress=False, seed=seed, **cfg["fit"])
    return r.last_acc, None if r.time_s is None else stage_s + r.time_s


def _ssod(name: str, train: Any, val: Any, seed: int, a: dict[str, Any],
          evaluator: Any) -> tuple[float | None, float | None]:
    import distill
    from distill.strategies.registry import strategy_info

    cfg = TASKS["ssod"]
    n_lab = max(a["batch"], int(len(train) * cfg["labeled_fraction"]))
    labeled = train.subset(range(n_lab)).loader(a["batch"], shuffle=True, seed=seed, masks=False)
    val_loader = val.loader(2 * a["batch"], masks=False)
    unlabeled = train.subset(range(n_lab, len(train))).loader(a["batch"], shuffle=True, seed=seed, masks=False)
    torch.manual_seed(seed)
    student = _model(cfg["student"], "ssod", train)
    if name == "scratch":  # the labelled fraction alone, for as many optimizer steps as the strategies take
        epochs = max(1, round(_epochs("ssod", a, "epochs") * len(unlabeled) / len(labeled)))
        r = distill.fit(distill.Distiller(student, None, {"gfl_loss": 1.0}), labeled, val_loader, epochs=epochs,
                        evaluator=evaluator, progress=False, seed=seed, **cfg["fit"])
        return r.last_acc, r.time_s
    r = strategy_info(name).fn(student, labeled, val_loader, epochs=_epochs("ssod", a, "epochs"), unlabeled_loader=unlabeled,
                               progress=False, seed=seed, evaluator=evaluator, **cfg["fit"])
    return r.last_acc, r.time_s


# ----------------------------------------------------------------------------- the plan and the table


def methods_of(task: str) -> list[str]:
    """The methods the benchmark runs for ``task``: registry families, overrides and extras."""
    from distill.methods import list_methods

    if task == "ssod":
        return list(TASKS["ssod"]["strategies"])
    found = [i.name for i in list_methods()
             if TASK_OF.get(i.name, FAMILY_TASK.get(i.family)) == task and i.name not in SKIP]
    return sorted(set(found + EXTRA.get(task, [])))


def _fmt(values: list[float]) -> str:
    if not values:
        return "—"
    mean = statistics.fmean(values)
    return f"{mean:.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{mean:.2f}"


def baseline_of(task: str, name: str) -> str:
    """The row a method is compared with: its own baseline (``BASELINES``) or the task's scratch student."""
    return next((b for b, spec in BASELINES.get(task, {}).items() if name in spec["baseline_of"]), "scratch")


def paired_gains(results: list[dict[str, Any]]) -> str:
    """Per task and method, the gain over its baseline seed by seed (same seed: same initial weights and
    batch order), their mean, and on how many seeds the gain is positive."""
    lines = []
    for task in dict.fromkeys(r["task"] for r in results):
        scored = {(r["name"], r["seed"]): r["score"] for r in results
                  if r["task"] == task and r.get("score") is not None}
        lines.append(f"paired gains ({task}; method − its baseline, per seed):")
        for name in dict.fromkeys(r["name"] for r in results if r["task"] == task):
            if name == "scratch" or name in BASELINES.get(task, {}):
                continue
            base = baseline_of(task, name)
            gains = [scored[(name, seed)] - scored[(base, seed)] for (n, seed) in scored
                     if n == name and (base, seed) in scored]
            if gains:
                lines.append(f"  {name:22s} vs {base:16s} " + " ".join(f"{g:+6.2f}" for g in gains)
                             + f"   mean {statistics.fmean(gains):+.2f}, positive on {sum(g > 0 for g in gains)}"
                             f"/{len(gains)} seeds")
        lines.append("")
    return "\n".join(lines)


def read_logs(paths: list[str]) -> tuple[list[dict[str, Any]], dict[str, float | None]]:
    """``(results, teachers)`` from the stderr of earlier runs (their ``teacher <task>: <score>`` lines and
    one JSON line per run), in the table's order. A run found twice must have the same score (the runs are
    deterministic); if not, that is an error, since the logs would come from different protocols."""
    results: dict[tuple[str, str, int], dict[str, Any]] = {}
    teachers: dict[str, float | None] = {}
    for path in paths:
        for line in Path(path).read_text().splitlines():
            if line.startswith("teacher ") and ": " in line:
                task, score = line[len("teacher "):].split(": ", 1)
                teachers[task] = None if score == "None" else float(score)
            elif line.startswith("{"):
                r = json.loads(line)
                key = (r["task"], r["name"], r["seed"])
                if key in results and results[key].get("score") != r.get("score"):
                    raise ValueError(f"{key} has two scores in the logs: {results[key].get('score')} and "
                                     f"{r.get('score')} (logs of different protocols?)")
                results.setdefault(key, r)
    order = list(TASKS)

    def rank(r: dict[str, Any]) -> tuple[int, int, str, int]:
        kind = 0 if r["name"] == "scratch" else 1 if r["name"] in BASELINES.get(r["task"], {}) else 2
        return order.index(r["task"]), kind, r["name"], r["seed"]

    return sorted(results.values(), key=rank), teachers


def table(results: list[dict[str, Any]], teachers: dict[str, float | None]) -> str:
    lines = []
    for task in dict.fromkeys(r["task"] for r in results):
        metric = TASKS[task]["metric"]
        rows = [r for r in results if r["task"] == task]
        lines += [f"### {task} ({TASKS[task].get('student')} student; {metric} in %, last epoch)", "",
                  f"| run | losses | {metric} (mean ± std) | Δ vs scratch | time (s) | seeds |",
                  "|---|---|---|---|---|---|"]
        if task in teachers:
            t = teachers[task]
            lines.append(f"| teacher ({TASKS[task]['teacher']}) | {TASKS[task]['task_loss']} | "
                         f"{'—' if t is None else f'{t:.2f}'} | | | 1 |")
        def mean_of(baseline: str) -> float | None:
            scores = [r["score"] for r in rows if r["name"] == baseline and r.get("score") is not None]
            return statistics.fmean(scores) if scores else None

        for name in dict.fromkeys(r["name"] for r in rows):
            base_name = baseline_of(task, name)
            base = mean_of(base_name)
            mine = [r for r in rows if r["name"] == name]
            errors = [r["error"] for r in mine if "error" in r]
            scores = [r["score"] for r in mine if r.get("score") is not None]
            times = [r["time_s"] for r in mine if "time_s" in r]
            losses = "strategy" if task == "ssod" and name != "scratch" else json.dumps(_losses(
                "detection" if task == "ssod" else task, name), default=str).replace("|", "/")
            if errors and not scores:
                lines.append(f"| {name} | {losses} | error: {errors[0][:120]} | | | 0 |")
                continue
            delta = ("" if base is None or not scores or name == "scratch" or name in BASELINES.get(task, {})
                     else f"{statistics.fmean(scores) - base:+.2f}" + ("" if base_name == "scratch" else f" (vs {base_name})"))
            lines.append(f"| {name} | {losses} | {_fmt(scores)} | {delta} | {_fmt(times)} | {len(scores)} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--methods", nargs="+", default=None, help="only these methods (scratch always runs, a method's own baseline with it)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--teacher-epochs", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny data, 1 epoch, 1 seed")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--out", default="runs/bench_dense")
    p.add_argument("--root", default=None, help="MNIST folder (default: distill's)")
    p.add_argument("--reuse", action="store_true", help="keep cached teachers whose settings match")
    p.add_argument("--write-docs", action="store_true")
    p.add_argument("--from-logs", nargs="+", default=None, metavar="STDERR",
                   help="run nothing: rebuild the table from the stderr of earlier runs (their JSON lines)")
    a = p.parse_args(argv)
    if a.from_logs:
        results, teachers = read_logs(a.from_logs)
        text = f"rebuilt from {len(results)} run(s) in {len(a.from_logs)} log(s)\n\n" + table(results, teachers)
        print(text + "\n" + paired_gains(results))
        if a.write_docs:
            write_section("dense", text + "\n" + paired_gains(results))
        return
    size_name = "quick" if a.quick else "full"
    size = SIZES[size_name]
    seeds = 1 if a.quick else a.seeds
    args = {"size_name": size_name, "epochs": a.epochs or size["epochs"], "batch": size["batch"], "root": a.root,
            "teacher_epochs": a.teacher_epochs or size["teacher_epochs"], "reuse": a.reuse,
            "epochs_set": a.epochs is not None, "teacher_epochs_set": a.teacher_epochs is not None}
    out = Path(a.out)
    torch.set_num_threads(1)
    teachers: dict[str, float | None] = {}
    paths: dict[str, str] = {}
    t_start = time.perf_counter()
    for task in a.tasks:
        if "teacher" not in TASKS[task]:
            continue
        train, val = _data(task, size, a.root)
        path, score = _teacher(task, args, train, val, out)
        paths[task], teachers[task] = str(path), score
        print(f"teacher {task}: {score}", file=sys.stderr)
    args["teachers"] = paths
    jobs = [{"task": task, "name": name, "seed": seed, "args": args}
            for task in a.tasks for name in ["scratch", *BASELINES.get(task, {}), *methods_of(task)]
            if a.methods is None or name == "scratch" or name in a.methods
            or set(BASELINES.get(task, {}).get(name, {}).get("baseline_of", [])) & set(a.methods)
            for seed in range(seeds)]
    results: list[dict[str, Any]] = []
    runner = (_job(j) for j in jobs) if a.workers <= 1 else run_pool(_job, jobs, a.workers)
    for r in runner:
        results.append(r)
        print(json.dumps(r, default=str), file=sys.stderr)
    order = {(j["task"], j["name"], j["seed"]): i for i, j in enumerate(jobs)}
    results.sort(key=lambda r: order[(r["task"], r["name"], r["seed"])])
    (out / "results.json").parent.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"teachers": teachers, "results": results}, indent=1, default=str))
    own = [f"{t}: {_epochs(t, args, 'epochs')}/{_epochs(t, args, 'teacher_epochs')}" for t in a.tasks
           if (_epochs(t, args, "epochs"), _epochs(t, args, "teacher_epochs")) != (args["epochs"], args["teacher_epochs"])]
    text = (f"{size_name} protocol: {seeds} seed(s), {args['epochs']} student epoch(s), {args['teacher_epochs']} "
            f"teacher epoch(s){' (' + ', '.join(own) + ')' if own else ''}; total "
            f"{time.perf_counter() - t_start:.0f} s\n\n" + table(results, teachers))
    text += "\n" + paired_gains(results)
    print(text)
    if a.write_docs:
        write_section("dense", text)


if __name__ == "__main__":
    main()
