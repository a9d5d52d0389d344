"""KD-MVS on the procedural multi-view stereo set: a self-supervised teacher, cross-view-checked
probabilistic pseudo-labels, a distilled student; and the same student trained self-supervised only.

Paper: Ding et al., "KD-MVS: Knowledge Distillation Based Self-supervised Learning for Multi-view Stereo",
ECCV 2022, arXiv 2207.10425. No ground-truth depth is used for training; the last lines print each
model's depth error on held-out scenes (MAE, and the fraction of pixels within 0.1 / 0.25 / 0.5 of the
true depth; the scenes span depths 2-7.3, the 24 hypotheses 1.8-7.8 are 0.26 apart).

    python examples/vit/kd_mvs.py --quick          # seconds: a smoke run
    python examples/vit/kd_mvs.py                  # minutes on 1 CPU thread
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from distill.data.mvs import MVSScenes
from distill.models import create
from distill import functional as DF
from distill.strategies.kd_mvs import evaluate_depth, kd_mvs, make_pseudo_labels, train_self_supervised


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a few scenes and one epoch each: a smoke run")
    p.add_argument("--scenes", type=int, default=64)
    p.add_argument("--val-scenes", type=int, default=32)
    p.add_argument("--epochs", type=int, default=10, help="student epochs (and the self-supervised baseline's)")
    p.add_argument("--teacher-epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args()
    if a.quick:
        a.scenes, a.val_scenes, a.epochs, a.teacher_epochs = 8, 4, 1, 1
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    train = MVSScenes(a.scenes, seed=a.seed)
    val = MVSScenes(a.val_scenes, seed=a.seed + 10_000)
    loader, val_loader = train.loader(a.batch_size, shuffle=True, seed=a.seed), val.loader(16, with_depth=True)
    print(f"{a.scenes} training scenes ({train.texture} textures), {a.val_scenes} validation scenes, "
          f"{len(train.depth_values)} depth hypotheses in [{float(train.depth_values[0])}, {float(train.depth_values[-1])}]")

    start = time.perf_counter()
    res = kd_mvs(create("mvsnet_student"), loader, val_loader, teacher=create("mvsnet_teacher"), epochs=a.epochs,
                 teacher_epochs=a.teacher_epochs, lr=a.lr, seed=a.seed, progress=not a.no_progress)
    kd_time = time.perf_counter() - start

    torch.manual_seed(a.seed)
    baseline = create("mvsnet_student")
    start = time.perf_counter()
    train_self_supervised(baseline, loader, epochs=a.teacher_epochs, lr=a.lr, seed=a.seed, progress=not a.no_progress)
    base_time = time.perf_counter() - start
    torch.manual_seed(a.seed)
    rows = {
        "untrained student (reference)": evaluate_depth(create("mvsnet_student"), val_loader),
        "teacher (self-supervised)": res.teacher_metrics,
        "student from teacher (KD-MVS)": res.student_metrics,
        "student self-supervised only": evaluate_depth(baseline, val_loader),
    }
    # diagnostics only (never used for training): the pseudo-labels against the training scenes' ground truth
    labels = make_pseudo_labels(res.teacher, train.loader(16))
    gt = train.depth[labels.index, labels.view]
    kept = DF.depth_errors(labels.mu, gt, mask=labels.mask) if labels.mask.any() else None
    print(f"pseudo-label coverage: {res.coverage[0]:.3f}; KD-MVS {kd_time:.0f} s, baseline {base_time:.0f} s")
    if kept is not None:
        print("pseudo-labels on the kept pixels vs ground truth: "
              + ", ".join(f"{k} {v:.3f}" for k, v in kept.items()))
    print(f"{'model':32s} {'MAE':>7s} {'acc@0.1':>8s} {'acc@0.25':>9s} {'acc@0.5':>8s}")
    for name, m in rows.items():
        assert m is not None
        print(f"{name:32s} {m['mae']:7.3f} {m['acc@0.1']:8.3f} {m['acc@0.25']:9.3f} {m['acc@0.5']:8.3f}")
    print(json.dumps({k: {kk: round(vv, 4) for kk, vv in v.items()} for k, v in rows.items() if v}))


if __name__ == "__main__":
    main()
