"""Accuracy of every registered method on Fashion-MNIST / MNIST, side by side, several seeds.

A scaled-down version of the CIFAR protocol that fits 2 CPU cores: one teacher
(cnn_teacher_mnist, ~1.17M parameters) trained once, then the same student
(cnn_student_mnist, ~99k) from scratch and with each method (CE + the method, the method's
weight from ``METHOD_LOSSES`` below), over several seeds, on a subset of the training set.
Prints a table of mean ± std of last- and best-epoch top-1 and agreement with the teacher,
the scratch baseline beside them, and writes it into docs/benchmarks.md with --write-docs.

    python benchmarks/accuracy.py [--data fashion_mnist] [--seeds 3] [--epochs 4] [--teacher-epochs 3]
        [--train-subset 3000] [--val-subset 4000] [--workers 2] [--methods kd dkd ...] [--write-docs]

``--protocol full`` (issue 10) is the regime in which the papers' effects can show: all 60,000
training images and all 10,000 test images, a teacher trained once and saved (``--reuse`` keeps
it), its outputs cached once with :func:`distill.cache.build_cache` so a student run costs the
student only, a 6.9k-parameter student several points below the teacher, the methods of
``FULL_METHODS``, and beside each method the sign and size its paper reports on CIFAR-100
(``PAPER_CIFAR100``). ``--protocol quick`` (the default) is the run described above.

    python benchmarks/accuracy.py --protocol full [--epochs 4] [--teacher-epochs 2] [--seeds 3] [--reuse]

Runs go to ``--workers`` processes with one thread each (on small models two single-thread
processes beat one two-thread process). Special protocols: FitNets, AB, FSP and FT start with
their first stage (1 epoch; ``STAGES``), KCD runs through ``fit_condensed``, SimKD trains with its
loss alone and is evaluated through the teacher's classifier.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import time
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import torch
from _common import run_pool, train_teacher, write_section

import distill
from distill.cache import CachedTeacher, build_cache
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


def _build_losses(spec: dict[str, Any], num_samples: int) -> dict[str, Any]:
    """The methods of a losses spec (name -> weight or keyword arguments); CRD learns the data-set size."""
    losses = {}
    for loss_name, kw in spec.items():
        kw = {"weight": kw} if isinstance(kw, float) else dict(kw)
        if loss_name == "crd":
            kw.setdefault("num_samples", num_samples)
        losses[loss_name] = create_method(loss_name, **kw)
    return losses


def _losses(name: str, num_samples: int) -> dict[str, Any]:
    return _build_losses(METHOD_LOSSES.get(name, {"ce": 1.0, name: {}}), num_samples)


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
    shutil.rmtree(run_dir, ignore_errors=True)  # a job without summary.json runs again from nothing
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


# ----------------------------------------------------------------------------- --protocol full (issue 10)
# All 60,000 training images and all 10,000 test images; a teacher trained once (seed 0, CE, crop 2) and saved; its
# outputs on the plain training images (logits and the taps the methods read) cached once with distill's teacher
# cache, so a student run costs the student only; a student 14x smaller than the teacher; 3 seeds.
FULL_TEACHER = "cnn_student_mnist"  # the zoo's 99k CNN (stem 16; stages 32, 64, 128) is the teacher here
FULL_STUDENT: dict[str, Any] = {"widths": (8, 16, 32), "stem_width": 8, "blocks": 1}  # zoo "cnn": 6.9k parameters
FULL_TAPS = ["stage1", "stage2", "stage3", "pool"]  # AT: stage1, stage2; FitNets: stage2; SP: stage3; CRD: pool
FULL_METHODS = ["scratch", "kd", "dkd", "dist", "crd", "at", "fitnet"]
# CE + the method, for this teacher/student pair and a schedule of a few epochs. Where a paper's setting is
# given per epoch of a 240-epoch CIFAR schedule it is scaled (DKD's 20-epoch warm-up is < 1 epoch here: none).
FULL_LOSSES: dict[str, dict[str, Any]] = {
    "scratch": {"ce": 1.0},
    "kd": {"ce": 0.1, "kd": {"weight": 0.9}},  # RepDistiller's KD: alpha 0.9, T 4
    "dkd": {"ce": 1.0, "dkd": {"warmup_epochs": 0}},  # alpha 1, beta 8, T 4 (the paper's CIFAR-100 setting)
    "dist": {"ce": 1.0, "dist": {}},  # beta 2, gamma 2, T 4 (the paper's CIFAR-100 setting)
    # RepDistiller's -b 0.8, feat_dim 128; 256 uniform negatives instead of 16,384 of other classes: the (B, K+1, 128)
    # gathers grow with K, and K = 4096 measured ~1 h per 60k-image epoch on the shared 2-core machine
    "crd": {"ce": 1.0, "crd": {"weight": 0.8, "nce_k": 256, "negatives": "random"}},
    "at": METHOD_LOSSES["at"],  # stage1 and stage2 pairs, beta 100, as the quick protocol
    # RepDistiller's element-mean MSE x 100 on the teacher's stage2 (64 x 7 x 7), trained with CE from the start
    # as RepDistiller does on CIFAR (no separate hint stage)
    "fitnet": {"ce": 1.0, "fitnet": {"student_tap": "stage2", "teacher_tap": "stage2", "weight": 200.0 / (64 * 7 * 7)}},
    # not a paper's setting: KD with the hard-label CE at full weight (CE 1 + KD 1), to see what CE 0.1 costs here
    "kd_ce1": {"ce": 1.0, "kd": {"weight": 1.0}},
}
# The sign and rough size of each method's effect on CIFAR-100 as the papers' tables report it: CRD (Tian et al.,
# ICLR 2020, 1910.10699) Table 1, seven same-architecture pairs (vanilla student; KD, FitNet, AT, SP, PKT, CRD); DKD
# (Zhao et al., CVPR 2022, 2203.08679) Table 1 (KD vs DKD, six of those pairs; students as CRD's Table 1); DIST
# (Huang et al., NeurIPS 2022, 2205.10536): resnet32x4 -> resnet8x4 76.31 only (its other pairs were not read).
PAPER_CIFAR100: dict[str, str] = {
    "scratch": "vanilla student (CRD Table 1)",
    "kd": "+0.8 to +2.6 over the student (CRD Table 1)",
    "dkd": "+2.8 to +4.3 over the student; +1.0 to +3.0 over KD (DKD Table 1)",
    "dist": "+3.8 over the student, +3.0 over KD, = DKD (76.31 vs 76.32; resnet32x4 -> resnet8x4 only)",
    "crd": "+2.1 to +3.6 over the student; +0.4 to +2.2 over KD (CRD Table 1)",
    "at": "+0.8 to +1.5 over the student; -1.6 to +0.1 vs KD (CRD Table 1)",
    "fitnet": "-0.1 to +1.0 over the student; -2.0 to +0.2 vs KD (CRD Table 1)",
    "sp": "+0.4 to +2.3 over the student; -1.1 to -0.3 vs KD (CRD Table 1)",
    "pkt": "+1.1 to +2.5 over the student; -0.5 to +0.3 vs KD (CRD Table 1)",
    "kd_ce1": "no table (CE 1 + KD 1 is a variant of ours)",
}


def _full_student() -> torch.nn.Module:
    return create("cnn", num_classes=10, in_channels=1, **FULL_STUDENT)


def _full_losses(name: str, num_samples: int) -> dict[str, Any]:
    return _build_losses(FULL_LOSSES.get(name, METHOD_LOSSES.get(name, {"ce": 1.0, name: {}})), num_samples)


def _full_job(job: dict[str, Any]) -> dict[str, Any]:
    """One (method, seed) run of the full protocol, in a worker with one thread: the student reads the teacher's
    cached outputs (the scratch baseline needs no teacher); returns its summary or its error."""
    torch.set_num_threads(1)
    name, seed, a = job["name"], job["seed"], job["args"]
    train, test = get_dataset(a["data"], split="train"), get_dataset(a["data"], split="test")
    val = InMemoryLoader(test.inputs, test.targets, 1000, shuffle=False)
    loader = InMemoryLoader(train.inputs, train.targets, a["batch_size"], seed=seed, return_index=True)
    losses = _full_losses(name, len(train.inputs))
    teacher = None
    if any(k != "ce" for k in losses):
        live = create(FULL_TEACHER)
        live.load_state_dict(torch.load(job["teacher"]))
        teacher = CachedTeacher(job["cache"], teacher=live, verify="lazy")  # live: only the fingerprint check
    torch.manual_seed(seed)
    student = _full_student()
    run_dir = Path(job["run_dir"])
    shutil.rmtree(run_dir, ignore_errors=True)  # a job without summary.json runs again from nothing
    t0 = time.perf_counter()
    try:
        d = distill.Distiller(student, teacher, losses)
        with redirect_stdout(io.StringIO()):
            res = distill.fit(d, loader, val, epochs=a["epochs"], run_dir=run_dir, seed=seed, optimizer="sgd",
                              lr=a["lr"], schedule="cosine", progress=False, eval_teacher=False)
    except Exception as e:  # noqa: BLE001 - a method that cannot run here is reported, not hidden
        return {"name": name, "seed": seed, "error": f"{type(e).__name__}: {e}"}
    seconds = time.perf_counter() - t0
    student.eval()
    with torch.no_grad():
        pred = torch.cat([student(xb).argmax(1) for xb in test.inputs.split(1000)])
    torch.save(pred, run_dir / "test_pred.pt")
    agreement = _agreement(pred, Path(job["teacher_pred"]))
    summary = {"name": name, "group": name, "kind": "distill", "seed": seed, "epochs": a["epochs"],
               "last_acc": res.last_acc, "best_acc": res.best_acc, "best_epoch": res.best_epoch,
               "agreement": agreement, "teacher_acc": job["teacher_acc"], "time_s": seconds,
               "losses": FULL_LOSSES.get(name, METHOD_LOSSES.get(name, {"ce": 1.0, name: {}}))}
    (run_dir / "summary.json").write_text(json.dumps(summary, default=str))
    return summary


def _agreement(pred: torch.Tensor, teacher_pred: Path) -> float | None:
    """Top-1 agreement (%) of the student's test predictions with the teacher's (None before the teacher exists)."""
    return 100.0 * (pred == torch.load(teacher_pred)).float().mean().item() if teacher_pred.is_file() else None


def _full_teacher(out: Path, a: argparse.Namespace) -> tuple[Any, float]:
    """The full protocol's teacher, trained once on every training image (or reused with --reuse), its
    predictions on the test set, and its cache over the plain training images."""
    record = {"model": FULL_TEACHER, "data": a.data, "epochs": a.teacher_epochs, "batch_size": 128}
    meta = out / "teacher.json"
    teacher = create(FULL_TEACHER)
    train, test = get_dataset(a.data, split="train"), get_dataset(a.data, split="test")
    reused = a.reuse and meta.is_file() and {k: v for k, v in json.loads(meta.read_text()).items()
                                             if k != "teacher_acc"} == record
    if reused:
        teacher.load_state_dict(torch.load(out / "teacher.pt"))
        acc = json.loads(meta.read_text())["teacher_acc"]
        print(f"teacher {acc:.2f}% (reused from {out})", flush=True)
    else:
        t0 = time.perf_counter()
        val = InMemoryLoader(test.inputs, test.targets, 1000, shuffle=False)
        teacher, acc = train_teacher(FULL_TEACHER, train.inputs, train.targets, val, epochs=a.teacher_epochs,
                                     batch_size=128, run_dir=out / "teacher", fit_args=FIT_ARGS)
        torch.save(teacher.state_dict(), out / "teacher.pt")
        meta.write_text(json.dumps({**record, "teacher_acc": acc}))
        print(f"teacher {acc:.2f}% ({time.perf_counter() - t0:.0f} s)", flush=True)
    teacher.eval()
    if not (reused and (out / "teacher_pred.pt").is_file()):
        with torch.no_grad():
            torch.save(torch.cat([teacher(xb).argmax(1) for xb in test.inputs.split(1000)]), out / "teacher_pred.pt")
    cache = out / "cache"
    if not (reused and (cache / "manifest.json").is_file()):
        t0 = time.perf_counter()
        build_cache(teacher, train.inputs, cache, targets=train.targets, dtype="fp16", taps=FULL_TAPS, overwrite=True)
        print(f"teacher cache: {len(train.inputs)} plain views, logits + {FULL_TAPS} in fp16 "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return teacher, acc


def _main_full(a: argparse.Namespace) -> None:
    t_start = time.perf_counter()
    out = Path(a.out) / f"{a.data}-full"
    out.mkdir(parents=True, exist_ok=True)
    # seeds are not part of it: --reuse --seeds 2 reports (or completes) the first two seeds of the same runs
    protocol = {k: v for k, v in vars(a).items() if k in ("protocol", "data", "epochs", "teacher_epochs", "batch_size",
                                                           "lr")}
    if a.reuse and (out / "protocol.json").is_file():
        saved = json.loads((out / "protocol.json").read_text())
        if saved != protocol:
            raise SystemExit(f"--reuse: {out} holds runs of another protocol {saved}, not {protocol}")
    (out / "protocol.json").write_text(json.dumps(protocol))
    _, teacher_acc = _full_teacher(out, a)
    names = a.methods or FULL_METHODS
    if "scratch" not in names:
        names = ["scratch", *names]
    jobs = [{"name": n, "seed": s, "args": vars(a), "teacher": str(out / "teacher.pt"), "cache": str(out / "cache"),
             "teacher_pred": str(out / "teacher_pred.pt"), "teacher_acc": teacher_acc,
             "run_dir": str(out / "runs" / f"{n}-seed{s}")}
            for s in range(a.seeds) for n in names]  # seed by seed: a run cut short still has every method
    runs, failed = _run_jobs(_full_job, jobs, a.workers, reuse=a.reuse)

    for i, run in enumerate(runs):  # runs finished before the teacher was trained (scratch) get their agreement now
        if run.summary.get("agreement") is None and (run.path / "test_pred.pt").is_file():
            run.summary["agreement"] = _agreement(torch.load(run.path / "test_pred.pt"), out / "teacher_pred.pt")
            (run.path / "summary.json").write_text(json.dumps(run.summary, default=str))
            runs[i] = read_run(run.path)
    rows = aggregate(runs)
    buf = io.StringIO()
    with redirect_stdout(buf):
        print(f"{a.data}, full protocol: teacher {FULL_TEACHER} (98.7k parameters) {teacher_acc:.2f}% ({a.teacher_epochs}"
              f" epochs on all {60000} training images, crop 2), cached once on the plain training images; student "
              f"cnn {FULL_STUDENT} (6.9k parameters), {a.epochs} epochs on all 60000 training images (no augmentation),"
              f" SGD lr {a.lr} cosine, batch {a.batch_size}; {a.seeds} seeds; evaluated on all 10000 test images; "
              f"{a.workers} runs in parallel, one thread each; total {time.perf_counter() - t_start:.0f} s")
        print()
        print(table_markdown(rows, baseline="scratch"))
        base = next((r for r in rows if r.group == "scratch"), None)
        kd = next((r for r in rows if r.group == "kd"), None)
        print()
        print("| method | Δ vs scratch here | Δ vs KD here | paper, CIFAR-100 (sign, rough size) |")
        print("| :--- | ---: | ---: | :--- |")
        for r in rows:
            d_s = _delta(r, base)
            d_k = _delta(r, kd) if r.group not in ("scratch", "kd") else ""
            print(f"| {r.group} | {d_s} | {d_k} | {PAPER_CIFAR100.get(r.group, 'not read')} |")
        for f in failed:
            print(f"\n{f['name']} seed {f['seed']} failed: {f['error']}")
    print(buf.getvalue())
    if a.write_docs:
        write_section(f"accuracy-{a.data}-full", buf.getvalue())


def _delta(row: Any, ref: Any) -> str:
    """``mean difference ± combined standard error`` of last-epoch accuracy, e.g. ``+1.20 ± 0.31``."""
    if ref is None or row is ref or row.last_acc.mean is None or ref.last_acc.mean is None:
        return ""
    se = ((row.last_acc.std or 0.0) ** 2 / row.last_acc.n + (ref.last_acc.std or 0.0) ** 2 / ref.last_acc.n) ** 0.5
    return f"{row.last_acc.mean - ref.last_acc.mean:+.2f} ± {se:.2f}"


def _run_jobs(fn: Any, jobs: list[dict[str, Any]], workers: int, *, reuse: bool) -> tuple[list[Any], list[dict]]:
    """Every job's run (``fn`` in ``workers`` spawned processes), and the failed ones; with ``reuse``
    the jobs whose run folder already holds a ``summary.json`` are read, not run again."""
    runs: list[Any] = []
    failed: list[dict] = []
    if reuse:  # finished runs stay as they are
        done = [j for j in jobs if (Path(j["run_dir"]) / "summary.json").is_file()]
        runs = [read_run(Path(j["run_dir"])) for j in done]
        jobs = [j for j in jobs if j not in done]
        print(f"reusing {len(done)} finished runs, running {len(jobs)}", flush=True)
    run_dirs = {(j["name"], j["seed"]): Path(j["run_dir"]) for j in jobs}
    for res in run_pool(fn, jobs, workers):
        if "error" in res:
            failed.append(res)
            print(f"{res['name']} seed {res['seed']}: FAILED: {res['error']}", flush=True)
            continue
        runs.append(read_run(run_dirs[(res["name"], res["seed"])]))
        print(f"{res['name']} seed {res['seed']}: {res['last_acc']:.2f}% ({res['time_s']:.0f} s)", flush=True)
    return runs, failed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--protocol", default="quick", choices=["quick", "full"],
                    help="quick: the 3,000-image, 4-epoch run of every method (issue 3); full: all 60,000 images, a "
                         "cached teacher, a 6.9k student, the methods of FULL_METHODS (issue 10)")
    ap.add_argument("--data", default="fashion_mnist", choices=["fashion_mnist", "mnist"])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=None, help="student epochs (quick: 4, full: 4)")
    ap.add_argument("--teacher-epochs", type=int, default=None, help="quick: 3, full: 2")
    ap.add_argument("--lr", type=float, default=None, help="full protocol only (default 0.1 at batch 256)")
    ap.add_argument("--teacher-subset", type=int, default=30000, help="training images the teacher sees")
    ap.add_argument("--train-subset", type=int, default=3000, help="training images each student sees")
    ap.add_argument("--val-subset", type=int, default=4000, help="test images evaluated each epoch")
    ap.add_argument("--batch-size", type=int, default=None, help="quick: 128, full: 256")
    ap.add_argument("--methods", nargs="+", default=None)
    ap.add_argument("--workers", type=int, default=2, help="runs in parallel, one thread each")
    ap.add_argument("--out", default="runs/accuracy")
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse the teacher and the finished runs in --out (same protocol): run only what is missing")
    args = ap.parse_args()
    full = args.protocol == "full"
    for key, quick, full_default in (("epochs", 4, 4), ("teacher_epochs", 3, 2), ("batch_size", 128, 256),
                                     ("lr", None, 0.1)):
        if getattr(args, key) is None:
            setattr(args, key, full_default if full else quick)
    if not full and args.lr is not None:
        raise SystemExit(f"--lr {args.lr}: the quick protocol trains at lr 0.05 (FIT_ARGS); --lr is for --protocol full")
    torch.set_num_threads(max(1, args.workers))
    if full:
        return _main_full(args)
    t_start = time.perf_counter()

    train, test = get_dataset(args.data, split="train"), get_dataset(args.data, split="test")
    x, y = train.inputs[: args.train_subset], train.targets[: args.train_subset]
    val_x, val_y = test.inputs[: args.val_subset], test.targets[: args.val_subset]
    val = InMemoryLoader(val_x, val_y, 1000, shuffle=False)

    out = Path(args.out) / args.data
    out.mkdir(parents=True, exist_ok=True)
    protocol = {k: v for k, v in vars(args).items() if k not in ("methods", "workers", "write_docs", "reuse", "out",
                                                                  "protocol", "lr")}
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
                        val, epochs=args.teacher_epochs, run_dir=out / "teacher", overwrite=True, **FIT_ARGS)
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
    runs, failed = _run_jobs(_job, jobs, args.workers, reuse=args.reuse)

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
