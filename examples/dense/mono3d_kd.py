"""Monocular 3D detection with MonoDistill on the procedural camera + LiDAR scenes (CPU, minutes).

    python examples/dense/mono3d_kd.py                 # LiDAR-depth teacher, student from scratch, student + monodistill
    python examples/dense/mono3d_kd.py --quick         # a smoke run (seconds)

Teacher: ``mono_teacher`` (:class:`distill.models.mono3d.Mono3D` on the sparse LiDAR depth map projected
into the camera, MonoDistill's "LiDAR Net") trained with ``mono3d_loss``. Students: ``mono_student``
(the same architecture on the camera image) from scratch (``mono3d_loss``) and with ``monodistill``
added. Scores: BEV AP in % (:mod:`distill.train.bev_eval`, rotated IoU 0.25 and 0.5) on held-out scenes.
"""

from __future__ import annotations

import argparse
import time

import torch

from distill import Distiller, fit
from distill.data.pointscenes import make_point_scenes
from distill.models import create
from distill.train.bev_eval import bev_evaluator


def train(distiller: Distiller, train_loader, val_loader, epochs: int, lr: float, progress: bool) -> dict:
    t0 = time.perf_counter()
    res = fit(distiller, train_loader, val_loader, epochs=epochs, optimizer="adamw", lr=lr, weight_decay=1e-4,
              schedule="cosine", evaluator=bev_evaluator(), eval_teacher=False, progress=progress, amp=False,
              grad_clip=10.0)
    last = res.history[-1]
    return {"bev_ap_last": res.last_acc, "bev_ap_best": res.best_acc,
            "bev_ap_50_last": last.get("val_student_bev_ap_50"), "time_s": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smoke run: few scenes, one epoch")
    ap.add_argument("--train-scenes", type=int, default=256)
    ap.add_argument("--val-scenes", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--beams", type=int, default=64, help="LiDAR beams of the teacher's depth map")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.train_scenes, args.val_scenes, args.epochs = 16, 8, 1
    progress = not args.no_progress
    train_set = make_point_scenes(args.train_scenes, beams=args.beams, seed=args.seed, progress=progress)
    val_set = make_point_scenes(args.val_scenes, beams=args.beams, seed=args.seed + 10_000, progress=progress)
    loader = train_set.loader(args.batch_size, shuffle=True, seed=args.seed, inputs="camera")
    val = val_set.loader(args.batch_size, inputs="camera")
    rows = {}

    torch.manual_seed(args.seed)
    teacher = create("mono_teacher")
    rows["teacher (LiDAR depth)"] = train(Distiller(teacher, None, losses={"mono3d_loss": 1.0}), loader, val,
                                          args.epochs, args.lr, progress)
    print("teacher (LiDAR depth)", rows["teacher (LiDAR depth)"], flush=True)
    teacher.eval()
    for name, losses in (("student (scratch)", {"mono3d_loss": 1.0}),
                         ("student + monodistill", {"mono3d_loss": 1.0, "monodistill": 1.0})):
        torch.manual_seed(args.seed)
        student = create("mono_student")
        d = Distiller(student, teacher if "monodistill" in losses else None, losses=losses)
        rows[name] = train(d, loader, val, args.epochs, args.lr, progress)
        print(name, rows[name], flush=True)
    print(f"| model | BEV AP (last) | BEV AP (best) | AP@0.5 (last) | time s |  (seed {args.seed}, "
          f"{args.train_scenes} train / {args.val_scenes} val scenes, {args.epochs} epochs)")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['bev_ap_last']:.2f} | {r['bev_ap_best']:.2f} | {r['bev_ap_50_last']:.2f} | {r['time_s']} |")


if __name__ == "__main__":
    main()
