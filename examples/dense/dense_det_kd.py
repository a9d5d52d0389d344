"""Detection distillation on MNIST scenes: a GFL teacher, a student from scratch, the student with each method.

    python examples/dense/dense_det_kd.py                               # every method of distill.methods.dense_det
    python examples/dense/dense_det_kd.py --methods ld ld_vlr fgd       # a few
    python examples/dense/dense_det_kd.py --quick                       # a smoke run (about a minute)

The teacher (``gfl_teacher``, width 64) is trained with ``gfl_loss`` first (or loaded from
``--teacher-weights`` when that file exists, written there otherwise; weights only, read with
``weights_only=True``). Each student (``gfl_student``, width 16) trains with ``gfl_loss`` plus one
method at its registered defaults (``lgd`` needs no teacher), same seed, same data and schedule.
Scored by COCO mAP / mAP@0.5 in % on the test scenes (pycocotools via
:func:`distill.train.dense_eval.detection_evaluator`); prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from distill import Distiller, fit
from distill.data.scenes import make_scenes
from distill.models import create
from distill.train.dense_eval import detection_evaluator

METHODS = ("quantization_mimic", "adl", "fgd", "rank_mimicking", "pfi", "ld", "ld_vlr", "lgd")


def train(d: Distiller, train_set, test_set, a: argparse.Namespace, epochs: int) -> dict[str, float]:
    start = time.time()
    result = fit(d, train_set.loader(a.batch_size, shuffle=True, seed=a.seed), test_set.loader(64), epochs=epochs,
                 optimizer="adam", lr=a.lr, weight_decay=1e-4, schedule="cosine", seed=a.seed,
                 evaluator=detection_evaluator, eval_teacher=False, progress=False)
    last = result.history[-1]
    return {"map": float(last["val_student_map"]), "map_50": float(last["val_student_map_50"]),
            "time": time.time() - start}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="*", default=list(METHODS))
    p.add_argument("--source", default="mnist", help="mnist / fashion_mnist / digits")
    p.add_argument("--train-scenes", type=int, default=1000)
    p.add_argument("--test-scenes", type=int, default=200)
    p.add_argument("--teacher-scenes", type=int, default=2000)
    p.add_argument("--teacher-epochs", type=int, default=6)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (cosine schedule)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--teacher-weights", default="", help="a .pt file of the teacher's state_dict (read or written)")
    p.add_argument("--weights", nargs="*", default=[], metavar="NAME=W",
                   help="loss weights replacing the registered defaults, e.g. fgd=0.001")
    p.add_argument("--quick", action="store_true", help="tiny data, 1 epoch each, two methods")
    a = p.parse_args()
    unknown = sorted(set(a.methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    try:
        weights = {k: float(v) for k, v in (item.split("=", 1) for item in a.weights)}
    except ValueError:
        raise SystemExit(f"--weights takes NAME=NUMBER items, got {a.weights}") from None
    torch.set_num_threads(a.threads)
    if a.quick:
        a.train_scenes, a.test_scenes, a.teacher_scenes, a.epochs, a.teacher_epochs = 64, 32, 64, 1, 1
        a.methods = a.methods[:2] if len(a.methods) > 2 else a.methods
    teacher_data = make_scenes(a.source, "train", n_scenes=a.teacher_scenes, seed=a.seed)
    stats = [teacher_data.images.mean().item()], [teacher_data.images.std().item()]
    teacher_data = teacher_data.with_normalization(*stats)
    train_set = make_scenes(a.source, "train", n_scenes=a.train_scenes, seed=a.seed + 1).with_normalization(*stats)
    test_set = make_scenes(a.source, "test", n_scenes=a.test_scenes, seed=a.seed).with_normalization(*stats)

    torch.manual_seed(a.seed)
    teacher = create("gfl_teacher", num_classes=teacher_data.num_classes)
    rows = []
    if a.teacher_weights and os.path.exists(a.teacher_weights):
        teacher.load_state_dict(torch.load(a.teacher_weights, weights_only=True))
        print(f"teacher loaded from {a.teacher_weights}")
    else:
        r = train(Distiller(teacher, None, losses={"gfl_loss": 1.0}), teacher_data, test_set, a, a.teacher_epochs)
        rows.append(("teacher (gfl_teacher, gfl_loss)", r))
        if a.teacher_weights:
            torch.save(teacher.state_dict(), a.teacher_weights)
    teacher.eval()

    for name in ["scratch", *a.methods]:
        torch.manual_seed(a.seed)
        student = create("gfl_student", num_classes=train_set.num_classes)
        spec = {"weight": weights[name]} if name in weights else {}
        losses = {"gfl_loss": 1.0} if name == "scratch" else {"gfl_loss": 1.0, name: spec}
        d = Distiller(student, None if name in ("scratch", "lgd") else teacher, losses=losses)
        r = train(d, train_set, test_set, a, a.epochs)
        d.detach_taps()
        label = f"student + {name}" + (f" (weight {weights[name]:g})" if name in weights else "")
        rows.append((label if name != "scratch" else "student (gfl_loss only)", r))
        print(f"{rows[-1][0]}: mAP {r['map']:.2f}, mAP50 {r['map_50']:.2f}, {r['time']:.0f} s", flush=True)

    print("\n| model | mAP (%) | mAP@0.5 (%) | time (s) |\n|---|---|---|---|")
    for label, r in rows:
        print(f"| {label} | {r['map']:.2f} | {r['map_50']:.2f} | {r['time']:.0f} |")


if __name__ == "__main__":
    main()
