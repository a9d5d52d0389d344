"""Weight scans for the dense methods that collapse at their papers' weights (issue 14, item 2).

Knowledge Adaptation (α = 50, β = 1), IFVD (weight 200), Graph Flow (w_V = w_E = 1) on scene
segmentation and FGD (the authors' GFL/COCO α, β, γ, λ) on scene detection: same tasks, models,
optimizer, data and teacher cache as ``benchmarks/dense.py`` (its helpers are imported, not copied).
The scanned number is the method's outer loss weight, a multiplier of the paper's setting (KA's α, β,
Graph Flow's w_V, w_E and FGD's α, β, γ, λ stay at their defaults; IFVD's paper weight 200 is itself
the outer weight).

Three modes (each writes JSON lines to ``--out``; the table reads every file there):

* ``--diagnose``: each method at its paper weight, the student from seed 0: after the paper's first
  stage (KA, Graph Flow: 1 epoch of auto-encoder pre-training), ``--diagnose-steps`` AdamW steps on
  task loss + method; at steps 0, 10 and the last, each term's value (weighted) and the norm of its
  gradient on the student's parameters beside the task loss's, the maps' shapes, and (segmentation)
  the fraction of pixels the student predicts as background.
* scan (default): seed 0, the scratch student and each ``--weights`` multiplier; then the paper
  weight and the best scanned weight (highest seed-0 score) rerun with seeds 1 .. ``--seeds``-1,
  with the scratch student beside them (same budget).
* ``--table``: print the table from the JSON already in ``--out`` (mean ± std over seeds).

    python benchmarks/dense_weight_scan.py --task segmentation --methods knowledge_adaptation \\
        [--weights 1 0.1 0.01 0.001] [--seeds 3] [--train-scenes 512] [--val-scenes 128] [--epochs 6] \\
        [--teacher PATH] [--out runs/dense_weight_scan] [--diagnose] [--table] [--quick]

A teacher is trained once per task and size (``dense._teacher``, cached in ``--out``) unless
``--teacher`` names a ``weights_only`` state dict of the task's teacher model.
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

import dense  # benchmarks/dense.py: data, models, evaluators, teacher cache, first stages

# method -> task, and the paper's setting as a loss spec (the scan multiplies "weight")
PAPER: dict[str, tuple[str, dict[str, Any]]] = {
    "knowledge_adaptation": ("segmentation", {"weight": 1.0}),  # α = 50, β = 1 inside the method
    "ifvd": ("segmentation", {"weight": 200.0}),  # the authors' --lambda-ifv 200
    "graph_flow": ("segmentation", {"weight": 1.0}),  # w_V = w_E = 1 inside the method (ours, see its docstring)
    "fgd": ("detection", {"weight": 1.0}),  # α 1e-3, β 5e-4, γ 5e-4, λ 5e-6 inside the method
}
DEFAULT_WEIGHTS = {"segmentation": [1.0, 0.1, 0.01, 0.001], "detection": [1.0, 1e-2, 1e-3, 1e-4, 1e-5]}


def _spec(method: str, factor: float) -> dict[str, Any]:
    task, paper = PAPER[method]
    return {**paper, "weight": paper["weight"] * factor}


def _setup(task: str, a: argparse.Namespace) -> dict[str, Any]:
    """The task's data sizes, loaders' settings and teacher path (trained once and cached if not given)."""
    size = {"scenes": (a.train_scenes, a.val_scenes)}
    args = {"size_name": "weight_scan", "epochs": a.epochs, "teacher_epochs": a.teacher_epochs, "batch": a.batch,
            "reuse": True, "root": a.root}
    if a.teacher:
        return {"size": size, "args": args, "teacher": a.teacher}
    train, val = dense._data(task, size, a.root)
    out = Path(a.out) / f"{task}_{a.train_scenes}_{a.val_scenes}_{a.batch}"
    path, score = dense._teacher(task, args, train, val, out)
    print(f"teacher {task}: {score}", file=sys.stderr)
    return {"size": size, "args": args, "teacher": str(path)}


def _build(task: str, method: str | None, factor: float, seed: int, s: dict[str, Any]) -> tuple[Any, ...]:
    import distill

    train, val = dense._data(task, s["size"], s["args"]["root"])
    loader, val_loader = dense._loaders(task, train, val, s["args"]["batch"], seed)
    cfg = dense.TASKS[task]
    torch.manual_seed(seed)
    student = dense._model(cfg["student"], task, train)
    losses: dict[str, Any] = {cfg["task_loss"]: 1.0}
    teacher = None
    if method is not None:
        teacher = dense._model(cfg["teacher"], task, train)
        teacher.load_state_dict(torch.load(s["teacher"], weights_only=True))
        losses[method] = _spec(method, factor)
    return distill.Distiller(student, teacher, losses), loader, val_loader, dense._evaluator(task, val), distill


def run_one(task: str, method: str | None, factor: float, seed: int, s: dict[str, Any]) -> dict[str, Any]:
    """One student (scratch when ``method`` is None): the stage of its paper, then fit; last-epoch scores."""
    torch.set_num_threads(1)
    row = {"task": task, "method": method or "scratch", "factor": None if method is None else factor, "seed": seed}
    try:
        d, loader, val_loader, evaluator, distill = _build(task, method, factor, seed, s)
        fit_kw = dense.TASKS[task]["fit"]
        stage_s = 0.0
        with redirect_stdout(io.StringIO()):
            if method in dense.STAGES:
                stage, stage_epochs = dense.STAGES[method]
                stage_s = distill.fit_hint_stage(d, loader, method=stage, epochs=stage_epochs, seed=seed,
                                                 progress=False, **fit_kw).time_s or 0.0
            r = distill.fit(d, loader, val_loader, epochs=s["args"]["epochs"], evaluator=evaluator,
                            eval_teacher=False, progress=False, seed=seed, **fit_kw)
    except Exception as e:  # noqa: BLE001 - a run that fails is reported, not hidden
        return {**row, "error": f"{type(e).__name__}: {e}"}
    last = r.history[-1] if r.history else {}
    return {**row, "score": r.last_acc, "pixel_acc": last.get("val_student_pixel_acc"),
            "time_s": stage_s + (r.time_s or 0.0)}


# ----------------------------------------------------------------------------- diagnosis


def _terms(method: str, m: Any, sv: Any, tv: Any, batch: Any) -> dict[str, torch.Tensor]:
    """The method's terms, each times its inner weight and the outer weight ``m.weight``."""
    import distill.functional as DF
    from distill.methods.dense_seg import _resize_to

    if method == "knowledge_adaptation":
        s, t = m._pair(sv, tv)
        z = m.encode(0, t)
        a = _resize_to(m.adapter(s), z)
        return {"alpha*L_adapt": m.weight * m.adaptation_weight * DF.ka_adaptation_loss(a, z, m.p),
                "beta*L_aff": m.weight * m.affinity_weight * DF.ka_affinity_loss(a, z)}
    if method == "graph_flow":
        fs, ft = m._layers(sv, tv)
        v, e = DF.graph_flow_losses(fs, [m.encode(i, t) for i, t in enumerate(ft)])
        return {"w_V*L_V": m.weight * m.vertex_weight * v, "w_E*L_E": m.weight * m.edge_weight * e}
    if method == "fgd":
        return {k: m.weight * v for k, v in m.parts(sv, tv, batch).items()}
    return {method: m.weight * m(sv, tv, batch)}


def diagnose(method: str | None, s: dict[str, Any], steps: int, task: str) -> list[dict[str, Any]]:
    """Terms and gradient norms of ``method`` at its paper weight (None: the scratch student, task loss
    alone), at steps 0, 10 and ``steps``."""
    from distill.batch import as_batch

    torch.set_num_threads(1)
    d, loader, _val, _ev, distill = _build(task, method, 1.0, 0, s)
    fit_kw = dense.TASKS[task]["fit"]
    with redirect_stdout(io.StringIO()):
        if method in dense.STAGES:
            stage, stage_epochs = dense.STAGES[method]
            distill.fit_hint_stage(d, loader, method=stage, epochs=stage_epochs, seed=0, progress=False, **fit_kw)
    first = next(iter(loader))
    if not d.prepared:
        d.prepare(first)
    student = d.student
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([p for p in d.trainable_parameters() if p.requires_grad], lr=fit_kw["lr"],
                            weight_decay=fit_kw["weight_decay"])
    task_loss = dense.TASKS[task]["task_loss"]
    m = d.methods[method] if method is not None else None
    rows: list[dict[str, Any]] = []
    batches = iter(loader)
    d.train()
    for step in range(steps + 1):
        try:
            raw = next(batches)
        except StopIteration:
            batches = iter(loader)
            raw = next(batches)
        batch = as_batch(raw)
        out = d(batch)
        if step in (0, 10, steps):
            named = {task_loss: d.methods[task_loss](out.student, out.teacher or {}, batch)}
            if m is not None:
                named.update(_terms(method, m, out.student, out.teacher or {}, batch))
            row: dict[str, Any] = {"method": method or "scratch", "step": step}
            for name, value in named.items():
                grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
                norm = torch.sqrt(sum((g.detach() ** 2).sum() for g in grads if g is not None) or torch.zeros(()))
                row[name] = [round(float(value.detach()), 5), round(float(norm), 5)]
            if task == "segmentation":
                row["pred_background"] = round(float((out.student["logits"].argmax(1) == 0).float().mean()), 4)
            if step == 0 and m is not None:
                row["shapes"] = {k: list(v.shape) for k, v in {**{f"S:{p}": out.student[p] for p in m.student_taps},
                                                               **{f"T:{p}": out.teacher[p] for p in m.teacher_taps}
                                                               }.items()}
                row["mean_abs"] = {f"{side}:{p}": round(float(view[p].abs().mean()), 4) for side, view, taps in
                                   (("S", out.student, m.student_taps), ("T", out.teacher, m.teacher_taps))
                                   for p in taps}
                if method == "fgd":  # how peaked the teacher's attention is: max of A^S_ij A^C_k (uniform: 1)
                    import distill.functional as DF

                    peaks = []
                    for p in m.teacher_taps:
                        sa, ca = DF.fgd_attention(out.teacher[p], m.temperature)
                        peaks.append(round(float(sa.amax(dim=(1, 2)).mean() * ca.amax(dim=1).mean()), 1))
                    row["fgd_attention_peak"] = peaks
            rows.append(row)
        opt.zero_grad()
        out.total.backward()
        opt.step()
    return rows


# ----------------------------------------------------------------------------- the table


def _fmt(values: list[float]) -> str:
    if not values:
        return "—"
    mean = statistics.fmean(values)
    return f"{mean:.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{mean:.2f}"


def _read(out: Path) -> list[dict[str, Any]]:
    """Every line of the ``*.jsonl`` files in ``out``; a run recorded twice (two processes) counts once."""
    rows, seen = [], set()
    for f in sorted(out.glob("*.jsonl")):
        for line in f.read_text().splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            key = (r.get("task"), r.get("method"), r.get("factor"), r.get("seed"), r.get("step"))
            if key not in seen:
                seen.add(key)
                rows.append(r)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = []
    runs = [r for r in rows if "seed" in r]
    for task in dict.fromkeys(r["task"] for r in runs):
        metric = dense.TASKS[task]["metric"]
        mine = [r for r in runs if r["task"] == task]
        base = [r["score"] for r in mine if r["method"] == "scratch" and r.get("score") is not None]
        lines += [f"### {task} ({metric} %, last epoch; weight = multiple of the paper's setting)", "",
                  f"| run | weight × paper | {metric} (mean ± std) | Δ vs scratch | pixel acc | time (s) | seeds |",
                  "|---|---|---|---|---|---|---|"]
        keys = dict.fromkeys((r["method"], r["factor"]) for r in mine)
        for method, factor in sorted(keys, key=lambda k: (k[0] != "scratch", k[0], -(k[1] or 0))):
            group = [r for r in mine if r["method"] == method and r["factor"] == factor]
            scores = [r["score"] for r in group if r.get("score") is not None]
            if not scores:
                lines.append(f"| {method} | {factor} | error: {group[0].get('error', '?')[:100]} | | | | 0 |")
                continue
            acc = [r["pixel_acc"] for r in group if r.get("pixel_acc") is not None]
            times = [r["time_s"] for r in group if r.get("time_s") is not None]
            delta = f"{statistics.fmean(scores) - statistics.fmean(base):+.2f}" if base and method != "scratch" else ""
            seeds = ",".join(str(v) for v in sorted(r["seed"] for r in group if r.get("score") is not None))
            lines.append(f"| {method} | {'' if factor is None else f'{factor:g}'} | {_fmt(scores)} | {delta} | "
                         f"{_fmt(acc)} | {_fmt(times)} | {seeds} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=["segmentation", "detection"], default="segmentation")
    p.add_argument("--methods", nargs="*", default=None, help="default: the task's methods of PAPER")
    p.add_argument("--weights", nargs="+", type=float, default=None, help="multipliers of the paper's weight")
    p.add_argument("--seeds", type=int, default=3, help="seeds of the confirmation runs (seed 0 is the scan's)")
    p.add_argument("--no-scratch", action="store_true", help="leave the scratch student to another process")
    p.add_argument("--scratch-only", action="store_true")
    p.add_argument("--confirm", action="store_true",
                   help="no scan: run each --weights with seeds --first-seed .. --seeds-1 only (to spread runs over "
                        "processes)")
    p.add_argument("--first-seed", type=int, default=1, help="with --confirm or --scratch-only")
    p.add_argument("--train-scenes", type=int, default=512)
    p.add_argument("--val-scenes", type=int, default=128)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--teacher-epochs", type=int, default=8)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--teacher", default=None, help="a weights_only state dict of the task's teacher")
    p.add_argument("--diagnose", action="store_true")
    p.add_argument("--diagnose-steps", type=int, default=50)
    p.add_argument("--table", action="store_true", help="only print the table of the results in --out")
    p.add_argument("--out", default="runs/dense_weight_scan")
    p.add_argument("--tag", default=None, help="name of this process's results file in --out")
    p.add_argument("--root", default=None, help="MNIST folder (default: distill's, or $DISTILL_MNIST)")
    p.add_argument("--quick", action="store_true", help="smoke run: 32/16 scenes, 1 epoch, 1 seed, 2 weights")
    a = p.parse_args(argv)
    out = Path(a.out)
    if a.table:
        print(table(_read(out)))
        return
    methods = a.methods if a.methods is not None else [m for m, (t, _) in PAPER.items() if t == a.task]
    bad = [m for m in methods if m not in PAPER or PAPER[m][0] != a.task]
    if bad:
        p.error(f"--methods for task {a.task} must be among "
                f"{[m for m, (t, _) in PAPER.items() if t == a.task]}, got {bad}")
    weights = a.weights or DEFAULT_WEIGHTS[a.task]
    if a.quick:
        a.train_scenes, a.val_scenes, a.epochs, a.teacher_epochs, a.seeds, a.batch = 32, 16, 1, 1, 1, 8
        weights, a.diagnose_steps = weights[:2], 2
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    s = _setup(a.task, a)
    out.mkdir(parents=True, exist_ok=True)
    log = out / f"{a.tag or a.task + '_' + '_'.join(methods or ['scratch'])}{'_diag' if a.diagnose else ''}.jsonl"

    def record(r: dict[str, Any]) -> None:
        with log.open("a") as f:
            f.write(json.dumps(r, default=str) + "\n")
        print(json.dumps(r, default=str), file=sys.stderr, flush=True)

    if a.diagnose:
        for m in [None, *methods]:
            for row in diagnose(m, s, a.diagnose_steps, a.task):
                record(row)
        return
    if not a.no_scratch and not (a.scratch_only and a.first_seed > 0):
        record(run_one(a.task, None, 1.0, 0, s))
    if a.scratch_only:
        for seed in range(max(1, a.first_seed), a.seeds):
            record(run_one(a.task, None, 1.0, seed, s))
        print(table(_read(out)))
        return
    for m in methods:
        if a.confirm:
            for seed in range(a.first_seed, a.seeds):
                for w in weights:
                    record(run_one(a.task, m, w, seed, s))
            continue
        scan = []
        for w in weights:
            scan.append(run_one(a.task, m, w, 0, s))
            record(scan[-1])
        ok = [r for r in scan if r.get("score") is not None]
        best = max(ok, key=lambda r: r["score"])["factor"] if ok else None
        again = list(dict.fromkeys(w for w in (1.0, best) if w is not None))
        for seed in range(1, a.seeds):
            for w in again:
                record(run_one(a.task, m, w, seed, s))
    if not a.no_scratch:
        for seed in range(1, a.seeds):
            record(run_one(a.task, None, 1.0, seed, s))
    print(f"total {time.perf_counter() - t_start:.0f} s", file=sys.stderr)
    print(table(_read(out)))


if __name__ == "__main__":
    main()
