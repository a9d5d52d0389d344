"""Train the GFL-style detector (``gfl_loss``) on MNIST scenes and report COCO mAP (CPU, minutes).

    python examples/dense/dense_gfl.py                          # gfl_teacher (width 64)
    python examples/dense/dense_gfl.py --model gfl_student      # width 16, ~1/13 of the teacher's FLOPs
    python examples/dense/dense_gfl.py --quick                  # a smoke run (seconds)

Data: :func:`distill.data.scenes.make_scenes` on MNIST (``../shared/data/mnist`` or ``$DISTILL_MNIST``),
64x64 canvases with 1-4 digits (side 28·U(0.6, 1.2) px), normalised with the train split's
statistics; the test scenes paste MNIST's test digits. Scored by COCO mAP / mAP@0.5 in %
(pycocotools, :func:`distill.train.dense_eval.detection_evaluator`).
"""

from __future__ import annotations

import argparse
import time

import torch

from distill import Distiller, fit
from distill.data.scenes import make_scenes
from distill.models import create
from distill.train.dense_eval import detection_evaluator


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gfl_teacher", help="zoo name (gfl_teacher / gfl_student)")
    p.add_argument("--train-scenes", type=int, default=2000)
    p.add_argument("--test-scenes", type=int, default=300)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (cosine schedule)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="64 train / 32 test scenes, 1 epoch")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    if a.quick:
        a.train_scenes, a.test_scenes, a.epochs = 64, 32, 1
    train = make_scenes("mnist", "train", n_scenes=a.train_scenes, seed=a.seed)
    test = make_scenes("mnist", "test", n_scenes=a.test_scenes, seed=a.seed)
    stats = train.images.mean().item(), train.images.std().item()
    train, test = train.with_normalization([stats[0]], [stats[1]]), test.with_normalization([stats[0]], [stats[1]])
    model = create(a.model, num_classes=train.num_classes)
    d = Distiller(model, None, losses={"gfl_loss": 1.0})
    start = time.time()
    result = fit(d, train.loader(a.batch_size, shuffle=True, seed=a.seed), test.loader(64), epochs=a.epochs,
                 optimizer="adam", lr=a.lr, weight_decay=1e-4, schedule="cosine", seed=a.seed,
                 evaluator=detection_evaluator, eval_teacher=False)
    last = {k: round(v, 2) for k, v in result.history[-1].items() if k.startswith("val_student_") and isinstance(v, float)}
    per_epoch = [round(row.get("val_student_map", float("nan")), 1) for row in result.history]
    print(f"{a.model}: mAP per epoch {per_epoch}")
    print(f"{a.model}: last epoch {last}, {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
