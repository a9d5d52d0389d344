"""Point-cloud BEV detection with distillation on the procedural LiDAR scenes (CPU, minutes).

    python examples/dense/dense3d_kd.py                    # teacher, then a student with each method
    python examples/dense/dense3d_kd.py --quick            # a smoke run (seconds)
    python examples/dense/dense3d_kd.py --only teacher     # just the teacher's BEV AP
    python examples/dense/dense3d_kd.py --only lidar       # LiDAR Distillation's progressive 64 → 32 → 16 chain

Teacher: ``pillars_teacher`` (PointPillars + CenterPoint head) trained with ``bev_loss`` on 64-beam
scans. Students (``--student pillars_student``, half the widths, or ``pointnet_bev_student``) trained
from scratch and with ``pointdistiller``, ``sparse_kd3d`` and ``sparse_kd3d_label`` (``--methods``). LiDAR Distillation (the paper's
setting: a student of the teacher's architecture, starting from its weights, on beam-reduced scans
of the same scenes, taught by the previous stage's model) runs 64 → 32 → 16 beams. Every score is
BEV AP in % (:mod:`distill.train.bev_eval`, rotated IoU 0.25 and 0.5) on held-out scenes.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from safetensors.torch import load_file, save_file

from distill import Distiller, fit
from distill.data.pointscenes import make_point_scenes
from distill.methods.dense3d import BeamTeacher, paired_beams
from distill.models import create
from distill.train.bev_eval import bev_evaluator, evaluate_bev


def train(distiller: Distiller, train_loader, val_loader, epochs: int, lr: float, progress: bool) -> dict:
    t0 = time.perf_counter()
    res = fit(distiller, train_loader, val_loader, epochs=epochs, optimizer="adamw", lr=lr, weight_decay=1e-4,
              schedule="cosine", evaluator=bev_evaluator(), eval_teacher=False, progress=progress, amp=False,
              on_epoch_end=lambda row: print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()
                                               if k in ("epoch", "train_loss", "val_student_acc", "time_s")}, flush=True))
    return {"bev_ap_last": res.last_acc, "bev_ap_best": res.best_acc, "time_s": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smoke run: few scenes, one epoch")
    ap.add_argument("--only", choices=["teacher", "students", "lidar", "all"], default="all")
    ap.add_argument("--train-scenes", type=int, default=256)
    ap.add_argument("--val-scenes", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--student", default="pillars_student", choices=["pillars_student", "pointnet_bev_student"])
    ap.add_argument("--methods", default="pointdistiller,sparse_kd3d,sparse_kd3d_label",
                    help="comma-separated students to train besides the one from scratch")
    ap.add_argument("--save-teacher", default=None, help="write the trained teacher's weights here (safetensors)")
    ap.add_argument("--teacher-weights", default=None, help="load the teacher from this safetensors file, no training")
    ap.add_argument("--lidar-ablation", action="store_true",
                    help="also fine-tune each stage's starting model on the low-beam scans without distillation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.train_scenes, args.val_scenes, args.epochs = 16, 8, 1
    progress = not args.no_progress
    torch.manual_seed(args.seed)

    train64 = make_point_scenes(args.train_scenes, beams=64, seed=args.seed, progress=progress)
    val64 = make_point_scenes(args.val_scenes, beams=64, seed=args.seed + 10_000, progress=progress)
    loader = train64.loader(args.batch_size, shuffle=True, seed=args.seed)
    val = val64.loader(args.batch_size)
    results: dict[str, dict] = {}

    teacher = create("pillars_teacher")
    if args.teacher_weights:
        teacher.load_state_dict(load_file(args.teacher_weights))
        ap_ = evaluate_bev(teacher, val)["bev_ap"]
        results["teacher (64 beams, loaded)"] = {"bev_ap_last": ap_, "bev_ap_best": ap_, "time_s": 0.0}
    else:
        results["teacher (64 beams)"] = train(Distiller(teacher, None, {"bev_loss": 1.0}), loader, val, args.epochs,
                                              args.lr, progress)
        if args.save_teacher:
            save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, args.save_teacher)
    print("teacher", next(iter(results.values())), flush=True)

    if args.only in ("students", "all"):
        runs = {"pointdistiller": {"bev_loss": 1.0, "pointdistiller": 2.0},
                "sparse_kd3d": {"bev_loss": 1.0, "sparse_kd3d": 7.0}, "sparse_kd3d_label": {"sparse_kd3d_label": 1.0}}
        wanted = [m for m in args.methods.split(",") if m]
        unknown = sorted(set(wanted) - set(runs))
        if unknown:
            raise SystemExit(f"--methods: unknown {unknown}; choose from {sorted(runs)}")
        for name, losses in [(f"{args.student} from scratch", {"bev_loss": 1.0}),
                             *[(f"{args.student} + {m}", runs[m]) for m in wanted]]:
            torch.manual_seed(args.seed)
            student = create(args.student)
            d = Distiller(student, teacher if len(losses) > 1 or "sparse_kd3d_label" in losses else None, losses)
            results[name] = train(d, loader, val, args.epochs, args.lr, progress)
            print(name, results[name], flush=True)

    if args.only in ("lidar", "all"):
        previous, beams_prev = teacher, 64
        for beams in (32, 16):
            low_train = train64.with_beams(beams)
            low_val = val64.with_beams(beams).loader(args.batch_size)
            direct = evaluate_bev(teacher, low_val)["bev_ap"]
            pairs = paired_beams(low_train.loader(args.batch_size, shuffle=True, seed=args.seed),
                                 (train64 if beams_prev == 64 else train64.with_beams(beams_prev)).loader(
                                     args.batch_size, shuffle=True, seed=args.seed))
            student = copy.deepcopy(previous).train().requires_grad_(True)  # the paper starts from the teacher's weights
            d = Distiller(student, BeamTeacher(copy.deepcopy(previous)), {"bev_loss": 1.0, "lidar_distill": 1.0})
            r = train(d, pairs, low_val, args.epochs, args.lr / 4, progress)
            r["teacher_direct_on_low_beams"] = direct
            results[f"lidar_distill {beams_prev}->{beams} beams"] = r
            print(f"lidar_distill {beams_prev}->{beams}", r, flush=True)
            if args.lidar_ablation:  # the same start and schedule, bev_loss only: what distillation adds
                plain = copy.deepcopy(previous).train().requires_grad_(True)
                r = train(Distiller(plain, None, {"bev_loss": 1.0}),
                          low_train.loader(args.batch_size, shuffle=True, seed=args.seed), low_val, args.epochs,
                          args.lr / 4, progress)
                results[f"fine-tune only {beams_prev}->{beams} beams"] = r
                print(f"fine-tune only {beams_prev}->{beams}", r, flush=True)
            previous, beams_prev = student, beams

    print("\n| model | BEV AP last | BEV AP best | time (s) |\n|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['bev_ap_last']:.1f} | {r['bev_ap_best']:.1f} | {r['time_s']:.0f} |")


if __name__ == "__main__":
    main()
