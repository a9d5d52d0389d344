"""Vision-transformer distillation (issue 15): a CNN teacher into a small ViT, and self-supervised ViTs.

Fashion-MNIST (``--dataset mnist`` for MNIST), a zoo CNN teacher (``cnn_teacher_mnist``, ~1.17M
parameters) trained once and cached in ``--out`` as safetensors (with a JSON of the settings it was
trained with: a later run reuses it when they match, and trains it again when they do not), and a
small ViT student (``vit_tiny``, 139k parameters; ``deit_tiny`` where the method needs DeiT's
distillation token). Methods that distil ViT tokens or attention need a ViT teacher: they get
``vit_small`` (0.8M), trained and cached the same way, and their row says so.

Three sections, each row over ``--seeds`` seeds (mean ± std of the last-epoch top-1 on the test
subset, and of the training time per run, fit's clock: per-epoch evaluations and a method's
stages included, data and teacher building excluded):

* **supervised** (``SUPERVISED``): scratch (CE), Hinton KD, DeiT hard / soft (distillation token),
  manifold distillation, ViTKD, TinyViT-style cached sparse logits (the teacher's top-k logits
  stored once per augmented view, replayed, no teacher in the loop), self-slimmed ViT, DearKD.
* **reduced** (``REDUCED``): scratch / KD / DeiT hard / DeiT soft on ``--reduced-fraction`` of the
  training subset, for the same number of optimizer steps as the full rows (epochs ÷ fraction):
  DeiT's paper finds the distillation token helping most when data is scarce.
* **ssl** (``SSL``): self-supervised (label-free) pre-training of ``vit_tiny`` (FD, SdAE, DMJD,
  BINGO, and no pre-training as the reference), then a linear probe on the frozen features and a
  full fine-tuning, both with labels (:mod:`distill.train.probe`).

A row whose method, strategy or model is not registered prints "not available" with the reason;
a run that fails prints its error. No number is written by hand.

    python benchmarks/vit.py [--dataset fashion_mnist|mnist] [--seeds 3] [--epochs 3]
        [--train-subset 10000] [--val-subset 2000] [--rows scratch kd ...] [--sections supervised ...]
        [--batch 128] [--workers 1] [--out runs/bench_vit] [--quick] [--write-docs]

``--quick`` is a smoke run (512 training images, 256 test images, one epoch, one seed): it checks
that every row runs, its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import math
import statistics
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import torch
from _common import run_pool, write_section

# ----------------------------------------------------------------------------- the rows (edit here)

# optimizer settings of every ViT run (DeiT's AdamW with weight decay 0.05 and a cosine schedule;
# lr 1e-3 for 128-image batches is ours: DeiT's 5e-4·batch/512 is tuned for 300 ImageNet epochs)
FIT = {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05, "schedule": "cosine"}
# the teachers' training (seed 0, CE, crop 2): the CNN with SGD as the other benchmarks, the ViT as the students
TEACHERS: dict[str, dict[str, Any]] = {
    "cnn": {"model": "cnn_teacher_mnist", "fit": {"optimizer": "sgd", "lr": 0.05, "schedule": "cosine"}},
    "vit": {"model": "vit_small", "fit": FIT},
    "vit_tiny": {"model": "vit_tiny", "fit": FIT},  # SiT's unslimmed model: the student's own architecture
}
KD_LOSSES = {"ce": 0.1, "kd": {"weight": 0.9}}  # as benchmarks/accuracy.py (T = 4, the method's default)

# row -> student model, teacher (a key of TEACHERS, or None), losses (name -> weight or keyword arguments),
# what it needs registered, and a note printed in the table
SUPERVISED: dict[str, dict[str, Any]] = {
    "scratch": {"student": "vit_tiny", "teacher": None, "losses": {"ce": 1.0}},
    "kd": {"student": "vit_tiny", "teacher": "cnn", "losses": KD_LOSSES},
    "deit_hard": {"student": "deit_tiny", "teacher": "cnn", "losses": {"deit": {"mode": "hard"}},
                  "needs": {"methods": ["deit"]}},
    "deit_soft": {"student": "deit_tiny", "teacher": "cnn", "losses": {"deit": {"mode": "soft"}},
                  "needs": {"methods": ["deit"]}},
    # CE + the manifold term alone (the authors' command adds soft KD at T = 1 and drops CE: not composed here,
    # so the row measures the relation losses)
    "manifold_kd": {"student": "vit_tiny", "teacher": "vit", "losses": {"ce": 1.0, "manifold_kd": {}},
                    "needs": {"methods": ["manifold_kd"]}, "note": "ViT teacher: patch tokens of both"},
    "vitkd": {"student": "vit_tiny", "teacher": "vit", "losses": {"ce": 1.0, "vitkd": {}},
              "needs": {"methods": ["vitkd"]}, "note": "ViT teacher: shallow and deep token layers"},
    # TinyViT: the teacher's top-3 logits (of 10) stored once per augmented view, the KD loss alone at T = 1
    "tinyvit": {"student": "vit_tiny", "teacher": "cnn", "losses": {"kd": {"T": 1.0}}, "cache": {"topk": 3},
                "note": "top-3 cached logits, KD alone (T=1)"},
    # SiT: the student starts from the trained unslimmed vit_tiny (the method copies its weights), so it has
    # had the teacher's epochs of training before its own
    "sit": {"student": "sit_tiny", "teacher": "vit_tiny", "losses": {"ce": 1.0, "sit_distill": {}},
            "needs": {"methods": ["sit_distill"], "models": ["sit_tiny"]},
            "note": "unslimmed vit_tiny teacher, student initialised from it"},
    # DearKD carries DeiT's hard distillation (its class and distillation heads) and CNN features early on
    "dearkd": {"student": "deit_tiny", "teacher": "cnn", "losses": {"dearkd": {}}, "needs": {"methods": ["dearkd"]},
               "note": "CNN stage1/stage2 into attention outputs, first half of the epochs"},
}
REDUCED = ["scratch", "kd", "deit_hard", "deit_soft"]  # rerun on --reduced-fraction of the data
# self-supervised pre-training (labels unused), then a linear probe and a fine-tuning with labels
SSL: dict[str, dict[str, Any]] = {
    "none": {"kind": "none"},  # a randomly initialised vit_tiny: the reference
    # FD regresses the whitened final tokens ("norm") of a teacher: vit_small, trained with labels here
    "fd": {"kind": "strategy", "teacher": "vit", "needs": {"strategies": ["fd"]},
           "note": "supervised vit_small teacher (the paper's are self-supervised or CLIP)"},
    # a per-step EMA at 0.99 -> 0.999: at a few epochs the code's per-epoch 0.96 leaves the teacher where it began
    "sdae": {"kind": "strategy", "teacher": None, "needs": {"strategies": ["sdae"]},
             "kwargs": {"ema_every": "step", "momentum": 0.99, "momentum_final": 0.999},
             "note": "EMA teacher, per step 0.99 -> 0.999 (ours)"},
    # block masking needs an even patch grid: the 7x7 grid of 28x28 images takes 1x1 blocks (random masking)
    "dmjd": {"kind": "strategy", "teacher": None, "needs": {"strategies": ["dmjd"]}, "kwargs": {"block": 1},
             "note": "HOG targets, 1x1 blocks on the 7x7 grid"},
    "bingo": {"kind": "strategy", "teacher": "vit", "needs": {"strategies": ["bingo"]},
              "note": "supervised vit_small teacher (the paper's is self-supervised)"},
}
PROBE = ("distill.train.probe", ("linear_probe", "finetune"))
SSL_NEEDS = {"functions": [f"{PROBE[0]}:{f}" for f in PROBE[1]]}

SIZES = {  # train images, test images, student epochs, teacher epochs, batch size
    "full": {"train": 10000, "val": 2000, "epochs": 3, "teacher_epochs": 3, "batch": 128},
    "quick": {"train": 512, "val": 256, "epochs": 1, "teacher_epochs": 1, "batch": 128},
}


# ----------------------------------------------------------------------------- availability


def missing(needs: dict[str, list[str]] | None) -> str | None:
    """Why a row cannot run here (the first missing method, strategy, model or function), else None."""
    if not needs:
        return None
    from distill.methods import list_methods
    from distill.models import list_models
    from distill.strategies.registry import list_strategies

    have = {"methods": {i.name for i in list_methods()}, "strategies": {i.name for i in list_strategies()},
            "models": set(list_models())}
    for kind, what in (("methods", "method"), ("strategies", "strategy"), ("models", "model")):
        for name in needs.get(kind, []):
            if name not in have[kind]:
                return f"{what} {name!r} is not registered"
    for ref in needs.get("functions", []):
        module, fn = ref.split(":")
        try:
            if not callable(getattr(importlib.import_module(module), fn, None)):
                return f"{module}.{fn} does not exist"
        except ImportError as e:
            return f"{module} cannot be imported ({e})"
    return None


# ----------------------------------------------------------------------------- data and teachers


def _data(args: dict[str, Any], out: Path) -> Path:
    """The first ``train``/``val`` images of the data set's train/test splits, saved once for the workers."""
    from distill.data import get_dataset

    path = out / f"data_{args['dataset']}_{args['train']}_{args['val']}.pt"
    if not path.exists():
        train, test = get_dataset(args["dataset"], args["root"], split="train"), \
            get_dataset(args["dataset"], args["root"], split="test")
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"x": train.inputs[:args["train"]].contiguous(), "y": train.targets[:args["train"]].contiguous(),
                    "vx": test.inputs[:args["val"]].contiguous(), "vy": test.targets[:args["val"]].contiguous()}, path)
    return path


def _load_data(path: str | Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def _loader(x: torch.Tensor, y: torch.Tensor, batch: int, seed: int, **kw: Any) -> Any:
    from distill.data import RandomCropPad
    from distill.data.loader import InMemoryLoader

    return InMemoryLoader(x, y, batch, augment=RandomCropPad(2), seed=seed, **kw)


def _val_loader(data: dict[str, torch.Tensor]) -> Any:
    from distill.data.loader import InMemoryLoader

    return InMemoryLoader(data["vx"], data["vy"], 500, shuffle=False)


def teacher_settings(kind: str, args: dict[str, Any]) -> dict[str, Any]:
    return {"model": TEACHERS[kind]["model"], "dataset": args["dataset"], "train": args["train"],
            "epochs": args["teacher_epochs"], "batch": args.get("teacher_batch", args["batch"]),
            "fit": TEACHERS[kind]["fit"], "seed": 0}


def train_teacher(kind: str, args: dict[str, Any], data_path: Path, out: Path) -> tuple[Path, float | None]:
    """The ``kind`` teacher trained once (seed 0, CE, crop 2), cached as ``teacher_<kind>.safetensors``
    with its settings and accuracy in ``teacher_<kind>.json``; reused when the settings match."""
    from safetensors.torch import save_file

    import distill
    from distill.models import create

    path, meta = out / f"teacher_{kind}.safetensors", out / f"teacher_{kind}.json"
    settings = json.loads(json.dumps(teacher_settings(kind, args)))
    if path.exists() and meta.exists():
        saved = json.loads(meta.read_text())
        if saved.get("settings") == settings:
            return path, saved.get("acc")
    data = _load_data(data_path)
    torch.manual_seed(0)
    model = create(TEACHERS[kind]["model"])
    with redirect_stdout(io.StringIO()):
        r = distill.fit(distill.Distiller(model, None, {"ce": 1.0}),
                        _loader(data["x"], data["y"], args.get("teacher_batch", args["batch"]), 0),
                        _val_loader(data),
                        epochs=args["teacher_epochs"], progress=args["progress"], seed=0, eval_teacher=False,
                        **TEACHERS[kind]["fit"])
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    meta.write_text(json.dumps({"settings": settings, "acc": r.last_acc, "time_s": r.time_s}))
    return path, r.last_acc


def load_teacher(kind: str, path: str | Path) -> torch.nn.Module:
    from safetensors.torch import load_file

    from distill.models import create

    model = create(TEACHERS[kind]["model"])
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def build_tinyvit_cache(args: dict[str, Any], data_path: Path, teacher_path: Path, out: Path) -> tuple[Path, float]:
    """The CNN teacher's top-k logits for every augmented view of every epoch (augment seed 0),
    written once; every seed replays the same views (TinyViT's stored augmentation)."""
    from distill.cache import build_cache
    from distill.data import RandomCropPad

    t0 = time.perf_counter()
    data = _load_data(data_path)
    path = out / f"tinyvit_cache_e{args['epochs']}"
    build_cache(load_teacher("cnn", teacher_path), data["x"], path, targets=data["y"],
                topk=SUPERVISED["tinyvit"]["cache"]["topk"], temperature=SUPERVISED["tinyvit"]["losses"]["kd"]["T"],
                augment=RandomCropPad(2), epochs=args["epochs"], augment_seed=0, overwrite=True,
                progress=args["progress"])
    return path, time.perf_counter() - t0


# ----------------------------------------------------------------------------- one run


def _losses(spec: dict[str, Any]) -> dict[str, Any]:
    from distill.methods import create_method

    out: dict[str, Any] = {}
    for name, kw in spec.items():
        kw = {"weight": float(kw)} if isinstance(kw, (int, float)) else dict(kw)
        out[name] = create_method(name, **kw)
    return out


def _supervised(job: dict[str, Any]) -> tuple[float | None, float | None, float | None]:
    """(last top-1, best top-1, time) of one supervised row."""
    import distill
    from distill.models import create

    a, row, seed = job["args"], SUPERVISED[job["row"]], job["seed"]
    data = _load_data(job["data"])
    x, y = data["x"], data["y"]
    epochs = a["epochs"]
    if job.get("fraction"):
        n = max(a["batch"], int(round(len(x) * job["fraction"])))
        x, y = x[:n], y[:n]
        # as many optimizer steps as the full rows: epochs x batches per epoch kept (rounded to whole epochs)
        epochs = max(1, round(a["epochs"] * math.ceil(len(data["x"]) / a["batch"]) / math.ceil(n / a["batch"])))
    torch.manual_seed(seed)
    student = create(row["student"])
    teacher: Any = None
    if row["teacher"] is not None:
        teacher = load_teacher(row["teacher"], a["teachers"][row["teacher"]])
    if "cache" in row:
        from distill.cache import CachedTeacher

        loader = _loader(x, y, a["batch"], seed, augment_seed=0, return_index=True)
        teacher = CachedTeacher(a["cache"], teacher=teacher, verify="lazy")  # live teacher: fingerprint, eval
    else:
        loader = _loader(x, y, a["batch"], seed)
    d = distill.Distiller(student, teacher, _losses(row["losses"]))
    r = distill.fit(d, loader, _val_loader(data), epochs=epochs, progress=False, seed=seed, eval_teacher=False, **FIT)
    return r.last_acc, r.best_acc, r.time_s


def _ssl(job: dict[str, Any]) -> tuple[float | None, float | None, float | None]:
    """(linear-probe top-1, fine-tune top-1, pre-training time) of one self-supervised row."""
    import distill
    from distill.models import create
    from distill.strategies.registry import strategy_info

    probe = importlib.import_module(PROBE[0])
    a, row, seed = job["args"], SSL[job["row"]], job["seed"]
    data = _load_data(job["data"])
    train = _loader(data["x"], data["y"], a["batch"], seed)
    val = _val_loader(data)
    torch.manual_seed(seed)
    student = create("vit_tiny")
    teacher = load_teacher(row["teacher"], a["teachers"][row["teacher"]]) if row.get("teacher") else None
    pre_s: float | None = 0.0
    if row["kind"] == "method":  # label-free: the method's loss alone, no CE
        r = distill.fit(distill.Distiller(student, teacher, _losses(row["losses"])), train, None,
                        epochs=a["epochs"], progress=False, seed=seed, **FIT)
        pre_s = r.time_s
    elif row["kind"] == "strategy":
        kw = {"teacher": teacher} if teacher is not None else {}
        # the strategy's own optimizer defaults (its paper's or its code's) unless the row sets them
        r = strategy_info(job["row"]).fn(student, train, None, epochs=a["epochs"], seed=seed, progress=False,
                                         **kw, **row.get("kwargs", {}))
        pre_s = r.time_s
    from distill.data.loader import InMemoryLoader

    plain = InMemoryLoader(data["x"], data["y"], 500, shuffle=False)  # features extracted once, unaugmented
    probe_acc = probe.linear_probe(student, plain, val, seed=seed, progress=False)["top1"]
    tune = probe.finetune(student, 10, train, val, epochs=a["epochs"], seed=seed, progress=False,
                          eval_teacher=False, **FIT)
    return probe_acc, tune.last_acc, pre_s


def _job(job: dict[str, Any]) -> dict[str, Any]:
    """One (section, row, seed) run in a single-thread process; returns its numbers or its error."""
    torch.set_num_threads(1)
    out = {k: job[k] for k in ("section", "row", "seed")}
    try:
        with redirect_stdout(io.StringIO()):
            if job["section"] == "ssl":
                out["probe"], out["finetune"], out["time_s"] = _ssl(job)
            else:
                out["last"], out["best"], out["time_s"] = _supervised(job)
    except Exception as e:  # noqa: BLE001 - a row that cannot run here is reported, not hidden
        out["error"] = f"{type(e).__name__}: {e}"
    return out


# ----------------------------------------------------------------------------- the plan and the tables


def plan(sections: list[str], rows: list[str] | None, seeds: int, fraction: float) -> tuple[list[dict[str, Any]],
                                                                                           dict[tuple[str, str], str]]:
    """The jobs to run and, for the rows that cannot run here, why (``(section, row) -> reason``)."""
    jobs: list[dict[str, Any]] = []
    unavailable: dict[tuple[str, str], str] = {}
    for section in sections:
        names = list(SUPERVISED) if section == "supervised" else REDUCED if section == "reduced" else list(SSL)
        for name in names:
            if rows is not None and name not in rows:
                continue
            spec = SSL[name] if section == "ssl" else SUPERVISED[name]
            why = missing(spec.get("needs")) or (missing(SSL_NEEDS) if section == "ssl" else None)
            if why:
                unavailable[(section, name)] = why
                continue
            extra = {"fraction": fraction} if section == "reduced" else {}
            jobs += [{"section": section, "row": name, "seed": s, **extra} for s in range(seeds)]
    return jobs, unavailable


def _fmt(values: list[float], digits: int = 2) -> str:
    if not values:
        return "—"
    mean = statistics.fmean(values)
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def _losses_text(spec: dict[str, Any]) -> str:
    return json.dumps(spec, default=str).replace("|", "/")


def _teacher_text(kind: str | None, row: dict[str, Any]) -> str:
    if kind is None:
        return "—"
    text = TEACHERS[kind]["model"] + (" (cached top-k)" if "cache" in row else "")
    return text + (f"; {row['note']}" if row.get("note") else "")


def table(results: list[dict[str, Any]], unavailable: dict[tuple[str, str], str], sections: list[str],
          teachers: dict[str, float | None], fraction: float) -> str:
    """The Markdown tables of the sections run."""
    lines: list[str] = []
    if teachers:
        lines += ["| teacher | top-1 (%) |", "|---|---|"]
        lines += [f"| {TEACHERS[k]['model']} | {'—' if v is None else f'{v:.2f}'} |" for k, v in teachers.items()]
        lines.append("")
    for section in sections:
        mine = [r for r in results if r["section"] == section]
        names = list(SUPERVISED) if section == "supervised" else REDUCED if section == "reduced" else list(SSL)
        names = [n for n in names if any(r["row"] == n for r in mine) or (section, n) in unavailable]
        if not names:
            continue
        if section == "ssl":
            lines += ["### self-supervised pre-training of vit_tiny, then linear probe / fine-tuning (top-1 %, last "
                      "epoch)", "", "| pre-training | teacher | linear probe | fine-tune | Δ fine-tune vs none | "
                      "pre-training time (s) | seeds |", "|---|---|---|---|---|---|---|"]
        else:
            title = ("supervised: CNN teacher → ViT student" if section == "supervised" else
                     f"reduced data: {fraction:.0%} of the training subset, same optimizer steps")
            lines += [f"### {title} (top-1 %, mean ± std over seeds)", "",
                      "| row | student | teacher | losses | top-1 last | Δ vs scratch | top-1 best | time (s) "
                      "| seeds |",
                      "|---|---|---|---|---|---|---|---|---|"]
        key = "finetune" if section == "ssl" else "last"
        ref = "none" if section == "ssl" else "scratch"
        base = [r[key] for r in mine if r["row"] == ref and r.get(key) is not None]
        base_mean = statistics.fmean(base) if base else None
        for name in names:
            spec = SSL[name] if section == "ssl" else SUPERVISED[name]
            teacher = _teacher_text(spec.get("teacher"), spec)
            if (section, name) in unavailable:
                first = f"| {name} | {teacher} |" if section == "ssl" else \
                    f"| {name} | {spec['student']} | {teacher} | {_losses_text(spec['losses'])} |"
                lines.append(f"{first} not available: {unavailable[(section, name)]} |" + " |" * 4)
                continue
            runs = [r for r in mine if r["row"] == name]
            errors = [r["error"] for r in runs if "error" in r]
            times = [r["time_s"] for r in runs if r.get("time_s") is not None]
            vals = [r[key] for r in runs if r.get(key) is not None]
            delta = (f"{statistics.fmean(vals) - base_mean:+.2f}" if vals and base_mean is not None
                     and name not in ("scratch", "none") else "")
            err = f" (error in {len(errors)} run(s): {errors[0][:100]})" if errors else ""
            if section == "ssl":
                probe = [r["probe"] for r in runs if r.get("probe") is not None]
                lines.append(f"| {name} | {teacher} | {_fmt(probe)} | {_fmt(vals)}{err} | {delta} | {_fmt(times, 1)} "
                             f"| {len(vals)} |")
            else:
                best = [r["best"] for r in runs if r.get("best") is not None]
                lines.append(f"| {name} | {spec['student']} | {teacher} | {_losses_text(spec['losses'])} | "
                             f"{_fmt(vals)}{err} | {delta} | {_fmt(best)} | {_fmt(times, 1)} | {len(vals)} |")
        lines.append("")
    return "\n".join(lines)


def save_results(out: Path, args: dict[str, Any], teachers: dict[str, float | None], results: list[dict[str, Any]],
                 unavailable: dict[tuple[str, str], str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"args": args, "teachers": teachers, "results": results,
                                                  "unavailable": {f"{s}/{n}": w for (s, n), w in unavailable.items()}},
                                                 indent=1, default=str))


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="fashion_mnist", choices=["fashion_mnist", "mnist"])
    p.add_argument("--root", default=None, help="folder of the IDX files (default: distill's)")
    p.add_argument("--sections", nargs="+", default=["supervised", "reduced", "ssl"],
                   choices=["supervised", "reduced", "ssl"])
    p.add_argument("--rows", nargs="+", default=None, help="only these rows (names of any section)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--teacher-epochs", type=int, default=None)
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--val-subset", type=int, default=None)
    p.add_argument("--reduced-fraction", type=float, default=0.1)
    p.add_argument("--batch", type=int, default=None, help="student batch size (default 128; teachers keep 128)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--out", default="runs/bench_vit")
    p.add_argument("--quick", action="store_true", help="smoke run: 512 images, 1 epoch, 1 seed")
    p.add_argument("--progress", action="store_true", help="progress bars while the teachers train")
    p.add_argument("--write-docs", action="store_true")
    a = p.parse_args(argv)
    if not 0 < a.reduced_fraction < 1:
        p.error(f"--reduced-fraction must be in (0, 1), got {a.reduced_fraction}")
    known = set(SUPERVISED) | set(SSL)
    if a.rows and set(a.rows) - known:
        p.error(f"unknown rows {sorted(set(a.rows) - known)}; known: {sorted(known)}")
    for flag in ("seeds", "epochs", "teacher_epochs", "train_subset", "val_subset", "workers", "batch"):
        if getattr(a, flag) is not None and getattr(a, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(a, flag)}")
    size_name = "quick" if a.quick else "full"
    size = SIZES[size_name]
    seeds = 1 if a.quick else a.seeds
    args: dict[str, Any] = {"dataset": a.dataset, "root": a.root, "train": a.train_subset or size["train"],
                            "val": a.val_subset or size["val"], "epochs": a.epochs or size["epochs"],
                            "teacher_epochs": a.teacher_epochs or size["teacher_epochs"],
                            "batch": a.batch or size["batch"], "teacher_batch": size["batch"],
                            "progress": a.progress}
    out = Path(a.out)
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    jobs, unavailable = plan(a.sections, a.rows, seeds, a.reduced_fraction)
    data_path = _data(args, out)
    kinds = {SUPERVISED[j["row"]]["teacher"] if j["section"] != "ssl" else SSL[j["row"]].get("teacher") for j in jobs}
    teachers: dict[str, float | None] = {}
    paths: dict[str, str] = {}
    for kind in TEACHERS:
        if kind in kinds:
            path, acc = train_teacher(kind, args, data_path, out)
            paths[kind], teachers[kind] = str(path), acc
            print(f"teacher {TEACHERS[kind]['model']}: {acc}", file=sys.stderr)
    args["teachers"] = paths
    cache_note = ""
    if any(j["row"] == "tinyvit" and j["section"] == "supervised" for j in jobs):
        cache, cache_s = build_tinyvit_cache(args, data_path, Path(paths["cnn"]), out)
        args["cache"] = str(cache)
        cache_note = f"; TinyViT cache built once in {cache_s:.0f} s (shared by the seeds, not in the row's time)"
    for j in jobs:
        j.update(args=args, data=str(data_path))
    results: list[dict[str, Any]] = []
    runner = (_job(j) for j in jobs) if a.workers <= 1 else run_pool(_job, jobs, a.workers)
    order = {(j["section"], j["row"], j["seed"]): i for i, j in enumerate(jobs)}
    for r in runner:
        results.append(r)
        print(json.dumps(r, default=str), file=sys.stderr)
        results.sort(key=lambda r: order[(r["section"], r["row"], r["seed"])])
        save_results(out, args, teachers, results, unavailable)  # after every run: an interrupted run keeps its rows
    save_results(out, args, teachers, results, unavailable)
    text = (f"{size_name} protocol on {a.dataset}: {args['train']} training / {args['val']} test images, {seeds} "
            f"seed(s), {args['epochs']} student epoch(s), {args['teacher_epochs']} teacher epoch(s), batch "
            f"{args['batch']} (teachers {args['teacher_batch']}), {FIT['optimizer']} lr {FIT['lr']}, crop 2"
            f"{cache_note}; total "
            f"{time.perf_counter() - t_start:.0f} s\n\n" + table(results, unavailable, a.sections, teachers,
                                                                a.reduced_fraction))
    print(text)
    if a.write_docs:
        write_section("vit", text)
    return text


if __name__ == "__main__":
    main()
