"""Train the scene segmenter (``seg_ce``) or the small DETR (``detr_loss``) on MNIST scenes (CPU, minutes).

    python examples/dense/dense_seg_detr.py --task seg                  # seg_teacher, mIoU on held-out scenes
    python examples/dense/dense_seg_detr.py --task seg --train-scenes 2000 --epochs 15   # mIoU 72 (docs/dense.md)
    python examples/dense/dense_seg_detr.py --task seg --model seg_student
    python examples/dense/dense_seg_detr.py --task detr --epochs 40     # detr_teacher, mAP (DETR converges slowly)
    python examples/dense/dense_seg_detr.py --task seg --quick          # a smoke run (seconds)

Data: :func:`distill.data.scenes.make_scenes` on MNIST (``../shared/data/mnist`` or ``$DISTILL_MNIST``),
64x64 canvases with 1-4 digits, normalised with the train split's statistics; the test scenes paste
MNIST's test digits. Segmentation is scored by mIoU over the 11 classes (background + 10 digits),
detection by COCO mAP (pycocotools), both in % (:mod:`distill.train.dense_eval`).
"""

from __future__ import annotations

import argparse
import time

import torch

from distill import Distiller, fit
from distill.data.scenes import make_scenes
from distill.models import create
from distill.train.dense_eval import detection_evaluator, segmentation_evaluator


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=("seg", "detr"), default="seg")
    p.add_argument("--model", default=None, help="zoo name (default: seg_teacher / detr_teacher)")
    p.add_argument("--train-scenes", type=int, default=1000)
    p.add_argument("--test-scenes", type=int, default=200)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 3e-3 seg, 1e-3 detr)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="64 train / 32 test scenes, 1 epoch")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    if a.quick:
        a.train_scenes, a.test_scenes, a.epochs = 64, 32, 1
    train = make_scenes("mnist", "train", n_scenes=a.train_scenes, seed=a.seed)
    test = make_scenes("mnist", "test", n_scenes=a.test_scenes, seed=a.seed)
    stats = train.images.mean().item(), train.images.std().item()
    train, test = train.with_normalization([stats[0]], [stats[1]]), test.with_normalization([stats[0]], [stats[1]])
    if a.task == "seg":
        model = create(a.model or "seg_teacher", num_classes=train.num_seg_classes)
        losses, evaluator, lr = {"seg_ce": 1.0}, segmentation_evaluator(train.num_seg_classes), a.lr or 3e-3
    else:
        model = create(a.model or "detr_teacher", num_classes=train.num_classes)
        losses, evaluator, lr = {"detr_loss": 1.0}, detection_evaluator, a.lr or 1e-3
    d = Distiller(model, None, losses=losses)
    start = time.time()
    result = fit(d, train.loader(a.batch_size, shuffle=True, seed=a.seed), test.loader(64), epochs=a.epochs,
                 optimizer="adamw" if a.task == "detr" else "adam", lr=lr, weight_decay=1e-4, schedule="cosine",
                 grad_clip=0.1 if a.task == "detr" else None, seed=a.seed, evaluator=evaluator, eval_teacher=False,
                 progress=not a.no_progress, on_epoch_end=lambda m: print(
                     f"epoch {m['epoch']}: loss {m['train_loss']:.3f}, val {m.get('val_student_acc', float('nan')):.2f}",
                     flush=True))
    last = {k: round(v, 2) for k, v in result.history[-1].items() if k.startswith("val_student_") and isinstance(v, float)}
    print(f"{a.task} {a.model or ('seg_teacher' if a.task == 'seg' else 'detr_teacher')}: last epoch {last}, "
          f"best {result.best_acc:.2f} (epoch {result.best_epoch}), {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
