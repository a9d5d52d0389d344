"""BINGO on Fashion-MNIST: a self-supervised CNN teacher distilled into a small ViT, without labels.

    python examples/vit/bingo.py --quick          # a smoke run (a minute or two)
    python examples/vit/bingo.py                  # the measured run of docs/_parts/15bingo_probe.md
    python examples/vit/bingo.py --teacher supervised   # a teacher trained with labels instead (say so!)
    python examples/vit/bingo.py --student-optimizer adam --skip-baselines   # BINGO with the baseline's Adam

1. Teacher ``cnn_teacher_mnist`` pre-trained with SimCLR on the training images (no labels; ours, see
   :mod:`distill.strategies.ssl_teacher`), or with cross-entropy (``--teacher supervised``).
2. Student ``vit_tiny`` trained with BINGO (:func:`distill.strategies.bingo.bingo`, the authors' code's
   defaults except the epochs, the queue and the projector width, scaled down).
3. Baselines of the same student for the same epochs: no training (random weights) and SimCLR alone.
4. Every encoder is scored by a linear probe (:func:`distill.train.probe.linear_probe`, L-BFGS logistic
   regression on the standardised frozen features, the labelled training subset) on the test subset.
Labels are used only by the probes (and by ``--teacher supervised``).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from distill.data.loader import InMemoryLoader
from distill.data.sources import get_dataset
from distill.models import create
from distill.strategies.bingo import bingo
from distill.strategies.ssl_teacher import pretrain_simclr
from distill.train.probe import linear_probe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run: few images, few epochs")
    ap.add_argument("--teacher", choices=("ssl", "supervised"), default="ssl")
    ap.add_argument("--train", type=int, default=10000, help="training images (the first N of the train split)")
    ap.add_argument("--test", type=int, default=2000, help="test images scored by the probes")
    ap.add_argument("--teacher-epochs", type=int, default=15)
    ap.add_argument("--epochs", type=int, default=15, help="the student's BINGO (and SimCLR baseline) epochs")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--skip-baselines", action="store_true", help="no random / SimCLR student (teacher-independent)")
    ap.add_argument("--student-optimizer", choices=("sgd", "adam"), default="sgd",
                    help="BINGO's optimiser: sgd (the authors' code: lr 0.03 per 256) or adam (lr 1e-3, as the "
                         "SimCLR baseline)")
    args = ap.parse_args()
    if args.quick:
        args.train, args.test, args.teacher_epochs, args.epochs = 1000, 500, 2, 2
    torch.set_num_threads(args.threads)
    progress = not args.no_progress

    train, test = get_dataset("fashion_mnist", split="train"), get_dataset("fashion_mnist", split="test")
    x, y = train.inputs[:args.train], train.targets[:args.train]
    xt, yt = test.inputs[:args.test], test.targets[:args.test]
    images = InMemoryLoader(x, None, args.batch_size, shuffle=True, seed=args.seed)
    probe_train = InMemoryLoader(x, y, 1000, shuffle=False)
    probe_test = InMemoryLoader(xt, yt, 1000, shuffle=False)

    def probe(model: torch.nn.Module) -> float:
        return round(linear_probe(model, probe_train, probe_test, solver="lbfgs", epochs=200, weight_decay=1e-4,
                                  progress=False)["top1"], 2)

    results: dict[str, object] = {"args": vars(args)}
    torch.manual_seed(args.seed)
    teacher = create("cnn_teacher_mnist", num_classes=10)
    t0 = time.perf_counter()
    if args.teacher == "ssl":
        pretrain_simclr(teacher, images, epochs=args.teacher_epochs, batch_size=args.batch_size, seed=args.seed,
                        progress=progress)
    else:
        from distill import Distiller, fit

        fit(Distiller(teacher, None, {"ce": 1.0}), InMemoryLoader(x, y, args.batch_size, seed=args.seed), None,
            epochs=args.teacher_epochs, optimizer="adam", lr=1e-3, weight_decay=0.0, schedule="cosine",
            progress=progress)
    results["teacher"] = {"kind": args.teacher, "probe_top1": probe(teacher), "time_s": round(time.perf_counter() - t0)}
    print(json.dumps(results["teacher"]), flush=True)

    def vit() -> torch.nn.Module:
        torch.manual_seed(args.seed)
        return create("vit_tiny", num_classes=10)

    if not args.skip_baselines:
        results["student_random"] = {"probe_top1": probe(vit())}
        print(json.dumps(results["student_random"]), flush=True)
        t0 = time.perf_counter()
        ssl_student = vit()
        pretrain_simclr(ssl_student, images, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                        progress=progress)
        results["student_simclr"] = {"probe_top1": probe(ssl_student), "time_s": round(time.perf_counter() - t0)}
        print(json.dumps(results["student_simclr"]), flush=True)

    t0 = time.perf_counter()
    res = bingo(vit(), images, teacher=teacher, epochs=args.epochs, batch_size=args.batch_size,
                queue_size=min(4096, args.train // 2), hidden=512, own_key_epochs=max(1, round(11 * args.epochs / 200)),
                seed=args.seed, progress=progress,
                **({"optimizer": "sgd", "lr": 0.03 * args.batch_size / 256} if args.student_optimizer == "sgd"
                   else {"optimizer": "adam", "lr": 1e-3, "weight_decay": 1e-6}))
    results["student_bingo"] = {"probe_top1": probe(res.student), "time_s": round(time.perf_counter() - t0),
                                "loss_per_epoch": [round(r["train_bingo"], 3) for r in res.history],
                                "bag_label_purity": round(100.0 * float((y[res.bags] == y[:, None]).float().mean()), 1)}
    print(json.dumps(results["student_bingo"]), flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
