"""Accuracy of every registered method on Fashion-MNIST / MNIST, side by side, several seeds.

A scaled-down version of the CIFAR protocol that fits 2 CPU cores: one teacher
(cnn_teacher_mnist, ~1.17M parameters) trained once, then the same student
(cnn_student_mnist, ~99k) from scratch and with each method (CE + the method, the method's
weight from ``METHOD_LOSSES`` below), over several seeds, on a subset of the training set.
Prints a table of mean ± std of last- and best-epoch top-1 and agreement with the teacher,
the scratch baseline beside them, and writes it into docs/benchmarks.md with --write-docs.

    python benchmarks/accuracy.py [--data fashion_mnist] [--seeds 3] [--epochs 4] [--teacher-epochs 3]
        [--train-subset 3000] [--val-subset 4000] [--workers 2] [--methods kd dkd ...] [--write-docs]

Runs go to ``--workers`` processes with one thread each (on small models two single-thread
processes beat one two-thread process). Special protocols: FitNets, AB, FSP and FT start with
their first stage (1 epoch; ``STAGES``), KCD runs through ``fit_condensed``, SimKD trains with its
loss alone and is evaluated through the teacher's classifier.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import time
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import torch
from _common import write_section

import distill
from distill.data import RandomCropPad, get_dataset
from distill.data.loader import InMemoryLoader
from distill.methods import create_method, list_methods
from distill.models import create
from distill.report import aggregate, read_run, table_markdown
from distill.strategies.condense import fit_condensed

CNN_STAGES = [["stem", "stage1"], "stage2", "stage3", ["avgpool", "pool", "dropout", "fc"]]

# CE + this method; weights scaled for 28x28 inputs where the paper's normalisation makes the
# raw loss large (see docs/methods.md). Methods not listed run as {"ce": 1, name: {}}.
METHOD_LOSSES: dict[str, dict[str, Any]] = {
    "scratch": {"ce": 1.0},
    "label_smoothing": {"label_smoothing": {}},
    "kd": {"ce": 0.1, "kd": {"weight": 0.9}},
    "fitnet": {"ce": 1.0, "fitnet": {"student_tap": "stage2", "teacher_tap": "stage2", "weight": 200.0 / (128 * 7 * 7)}},
    "at": {"ce": 1.0, "at": {"pairs": [("stage1", "stage1"), ("stage2", "stage2")], "beta": 100.0}},
    "sp": {"ce": 1.0, "sp": {"weight": 3000.0}},
    "pkt": {"ce": 1.0, "pkt": {"weight": 30000.0 / 128}},
    "nst": {"ce": 1.0, "nst": {"weight": 50.0}},
    # the element mean of RepDistiller and the authors' code (the paper's per-sample sum diverges here at weight 1)
    "vid": {"ce": 1.0, "vid": {"reduction": "mean"}},
    # FSP initialises (its stage below) and is then off, as the paper does; lambda_i = 1/(C1*C2) of the
    # teacher's pair (stem 32 x stage1 64, stage1 64 x stage2 128) is RepDistiller's element mean
    "fsp": {"ce": 1.0, "fsp": {"weight": 0.0, "lambdas": [1.0 / (32 * 64), 1.0 / (64 * 128)]}},
    "kcd": {"ce": 0.1, "kcd": {"weight": 0.9}},
    # the per-sample squared norm over the 64x7x7 stage2 map as an element mean (weight 1 collapses the student)
    "knowledge_projection": {"ce": 1.0, "knowledge_projection": {"weight": 1.0 / (64 * 7 * 7)}},  # the reference protocol's CE 0.1 + KD 0.9
    "simkd": {"simkd": {}},  # the paper trains with its loss alone; fit evaluates through the teacher's fc
    # AB initialises (its stage below: the authors' 3/1000 and layer weights 1/4, 1/2, 1), then CE alone
    "ab": {"ce": 1.0, "ab": {"weight": 0.0, "layer_weights": [0.25, 0.5, 1.0]}},
    # the 4x4 last maps of these CNNs: 2x2 patches in groups of 2, 2x2 anchors
    "tat_hierarchical": {"ce": 1.0, "tat_hierarchical": {"patch_size": 2, "group_size": 2, "anchor_kernel": 2}},
    # the small CNN's stages for the multi-path network (its head has dropout, no "head" module)
    # hint weight 1e-3: its per-sample squared norms over maps of 4k-12k elements diverge at weight 1 and lr 0.05
    "spot_adaptive": {"ce": 1.0, "spot_adaptive": {
        "student_stages": CNN_STAGES, "teacher_stages": CNN_STAGES, "hint": 1e-3}},
}
# a first stage before the main fit, as the papers do: (stage name, epochs, loss weight in the stage or None)
STAGES: dict[str, tuple[str, int, float | None]] = {"fitnet": ("fitnet", 1, None), "ab": ("ab", 1, 0.003),
                                                    "fsp": ("fsp", 1, None),
                                                    # RepDistiller's element-mean MSE: 1/(C*H*W) of teacher stage3
                                                    "ft": ("ft_paraphraser", 1, 1.0 / (256 * 4 * 4))}
# methods that are not a student's training loss on their own (a stage of another method, or plain CE)
SKIP = {"ce", "ft_paraphraser"}


def _losses(name: str, num_samples: int) -> dict[str, Any]:
    losses = {}
    for loss_name, kw in METHOD_LOSSES.get(name, {"ce": 1.0, name: {}}).items():
        kw = {"weight": kw} if isinstance(kw, float) else dict(kw)
        if loss_name == "crd":
            kw.setdefault("num_samples", num_samples)
        losses[loss_name] = create_method(loss_name, **kw)
    return losses


def _job(job: dict[str, Any]) -> dict[str, Any]:
    """One (method, seed) run, in a worker process with one thread; returns its summary or its error."""
    torch.set_num_threads(1)
    name, seed, a = job["name"], job["seed"], job["args"]
    x, y, val_x, val_y = torch.load(job["data"])
    teacher = create("cnn_teacher_mnist")
    teacher.load_state_dict(torch.load(job["teacher"]))
    aug = RandomCropPad(2)
    val = InMemoryLoader(val_x, val_y, 1000, shuffle=False)
    loader = InMemoryLoader(x, y, a["batch_size"], augment=aug, seed=seed, return_index=True)
    fit_args = dict(FIT_ARGS)
    torch.manual_seed(seed)
    d = distill.Distiller(create("cnn_student_mnist"), teacher, _losses(name, len(x)))
    run_dir = Path(job["run_dir"])
    t0 = time.perf_counter()
    try:
        with redirect_stdout(io.StringIO()):
            if name in STAGES:
                stage, stage_epochs, stage_weight = STAGES[name]
                distill.fit_hint_stage(d, loader, method=stage, epochs=stage_epochs, weight=stage_weight, seed=seed,
                                       run_dir=run_dir / "stage", **fit_args)
            if name == "kcd":  # knowledge condensation: the data set shrinks every 2 epochs towards 70%
                res = fit_condensed(d, (x, y), val, epochs=a["epochs"], condense_every=2, keep_ratio=0.7,
                                    batch_size=a["batch_size"], augment=aug, seed=seed, run_dir=run_dir, **fit_args)
            else:
                res = distill.fit(d, loader, val, epochs=a["epochs"], run_dir=run_dir, seed=seed, **fit_args)
    except Exception as e:  # noqa: BLE001 - a method that cannot run here is reported, not hidden
        return {"name": name, "seed": seed, "error": f"{type(e).__name__}: {e}"}
    last = res.history[-1]
    summary = {"name": name, "group": name, "kind": "distill", "seed": seed, "epochs": a["epochs"],
               "last_acc": res.last_acc, "best_acc": res.best_acc, "best_epoch": res.best_epoch,
               "agreement": last.get("val_agreement"), "kl_to_teacher": last.get("val_kl_to_teacher"),
               "teacher_acc": job["teacher_acc"], "time_s": time.perf_counter() - t0,
               "losses": METHOD_LOSSES.get(name, {"ce": 1.0, name: {}})}
    (run_dir / "summary.json").write_text(json.dumps(summary, default=str))
    return summary


FIT_ARGS: dict[str, Any] = {"optimizer": "sgd", "lr": 0.05, "schedule": "cosine", "progress": False, "eval_teacher": True}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="fashion_mnist", choices=["fashion_mnist", "mnist"])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--teacher-epochs", type=int, default=3)
    ap.add_argument("--teacher-subset", type=int, default=30000, help="training images the teacher sees")
    ap.add_argument("--train-subset", type=int, default=3000, help="training images each student sees")
    ap.add_argument("--val-subset", type=int, default=4000, help="test images evaluated each epoch")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--methods", nargs="+", default=None)
    ap.add_argument("--workers", type=int, default=2, help="runs in parallel, one thread each")
    ap.add_argument("--out", default="runs/accuracy")
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse the teacher and the finished runs in --out (same protocol): run only what is missing")
    args = ap.parse_args()
    torch.set_num_threads(max(1, args.workers))
    t_start = time.perf_counter()

    train, test = get_dataset(args.data, split="train"), get_dataset(args.data, split="test")
    x, y = train.inputs[: args.train_subset], train.targets[: args.train_subset]
    val_x, val_y = test.inputs[: args.val_subset], test.targets[: args.val_subset]
    val = InMemoryLoader(val_x, val_y, 1000, shuffle=False)

    out = Path(args.out) / args.data
    out.mkdir(parents=True, exist_ok=True)
    protocol = {k: v for k, v in vars(args).items() if k not in ("methods", "workers", "write_docs", "reuse", "out")}
    if args.reuse and (out / "protocol.json").is_file():
        saved = json.loads((out / "protocol.json").read_text())
        if saved != protocol:
            raise SystemExit(f"--reuse: {out} holds runs of another protocol {saved}, not {protocol}")
        teacher_acc = json.loads((out / "teacher_acc.json").read_text())["teacher_acc"]
        print(f"teacher {teacher_acc:.2f}% (reused from {out})", flush=True)
    else:
        torch.manual_seed(0)
        teacher = create("cnn_teacher_mnist")
        r = distill.fit(distill.Distiller(teacher, None, {"ce": 1.0}),
                        InMemoryLoader(train.inputs[: args.teacher_subset], train.targets[: args.teacher_subset],
                                       args.batch_size, augment=RandomCropPad(2), seed=0),
                        val, epochs=args.teacher_epochs, run_dir=out / "teacher", **FIT_ARGS)
        teacher_acc = r.last_acc
        torch.save(teacher.state_dict(), out / "teacher.pt")
        torch.save((x, y, val_x, val_y), out / "data.pt")
        (out / "protocol.json").write_text(json.dumps(protocol))
        (out / "teacher_acc.json").write_text(json.dumps({"teacher_acc": teacher_acc}))
        print(f"teacher {teacher_acc:.2f}% ({time.perf_counter() - t_start:.0f} s)", flush=True)

    names = args.methods or ["scratch"] + [i.name for i in list_methods() if i.name not in SKIP]
    if "scratch" not in names:
        names = ["scratch", *names]
    jobs = [{"name": n, "seed": s, "args": vars(args), "teacher": str(out / "teacher.pt"), "data": str(out / "data.pt"),
             "teacher_acc": teacher_acc, "run_dir": str(out / "runs" / f"{n}-seed{s}")}
            for n in names for s in range(args.seeds)]
    runs, failed = [], []
    if args.reuse:  # finished runs stay as they are
        done = [j for j in jobs if (Path(j["run_dir"]) / "summary.json").is_file()]
        runs = [read_run(Path(j["run_dir"])) for j in done]
        jobs = [j for j in jobs if j not in done]
        print(f"reusing {len(done)} finished runs, running {len(jobs)}", flush=True)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(args.workers, maxtasksperchild=8) as pool:
        for res in pool.imap_unordered(_job, jobs):
            if "error" in res:
                failed.append(res)
                print(f"{res['name']} seed {res['seed']}: FAILED: {res['error']}", flush=True)
                continue
            runs.append(read_run(Path(out / "runs" / f"{res['name']}-seed{res['seed']}")))
            print(f"{res['name']} seed {res['seed']}: {res['last_acc']:.2f}% ({res['time_s']:.0f} s)", flush=True)

    buf = io.StringIO()
    with redirect_stdout(buf):
        print(f"{args.data}: teacher cnn_teacher_mnist {teacher_acc:.2f}% ({args.teacher_epochs} epochs on "
              f"{min(args.teacher_subset, len(train))} training images); student cnn_student_mnist, {args.epochs} "
              f"epochs on the first {len(x)} training images, SGD lr 0.05 cosine, batch {args.batch_size}, crop 2; "
              f"{args.seeds} seeds; evaluated on the first {len(val_x)} test images; {args.workers} runs in parallel, "
              f"one thread each; total {time.perf_counter() - t_start:.0f} s")
        print()
        print(table_markdown(aggregate(runs), baseline="scratch"))
        for f in failed:
            print(f"\n{f['name']} seed {f['seed']} failed: {f['error']}")
    print(buf.getvalue())
    if args.write_docs:
        write_section(f"accuracy-{args.data}", buf.getvalue())


if __name__ == "__main__":
    main()
