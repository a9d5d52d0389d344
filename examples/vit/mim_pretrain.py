"""FD, SdAE and DMJD pre-training of a zoo ViT on Fashion-MNIST, measured by linear probes and fine-tuning.

Each encoder (``vit_tiny``; ``vit_tiny_rpb`` for FD, with its shared relative position bias) is
pre-trained without labels on the first ``--train`` training images, then frozen: a linear
classifier is trained (:func:`distill.train.probe.linear_probe`, SGD, ``--probe-epochs`` epochs) on
its standardised class-token feature (``head:input``) and, separately, on the mean of its final
patch tokens (``norm``, mean-pooled), and scored on the first ``--val`` test images. With
``--finetune-epochs`` the whole encoder is then fine-tuned with labels
(:func:`distill.train.probe.finetune`: AdamW lr 1e-3, wd 0.05, cosine) on the same images.
Reference rows: the same protocol on randomly initialised ``vit_tiny`` and ``vit_tiny_rpb`` (what
pre-training must beat; their fine-tuning is training from scratch), and the FD teacher itself
(``cnn_teacher_mnist`` trained with labels for ``--teacher-epochs`` epochs, probed on ``pool``).
One seed; rows are printed as they finish.

    python examples/vit/mim_pretrain.py --quick        # a few hundred images, one epoch: a smoke run
    python examples/vit/mim_pretrain.py --train 3000 --val 2000 --epochs 3 --probe-epochs 30 --finetune-epochs 2
"""

from __future__ import annotations

import argparse
import time

import torch

from distill import Distiller, fit
from distill.data.loader import InMemoryLoader
from distill.data.sources import get_dataset
from distill.models import create
from distill.strategies.mim import dmjd, fd, sdae
from distill.train.probe import finetune, linear_probe

CHOICES = ("random", "random_rpb", "fd", "sdae", "dmjd")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="256 training images, 1 epoch, short probes")
    ap.add_argument("--train", type=int, default=3000, help="training images used (first N)")
    ap.add_argument("--val", type=int, default=2000, help="test images scored (first N)")
    ap.add_argument("--epochs", type=int, default=3, help="pre-training epochs")
    ap.add_argument("--teacher-epochs", type=int, default=3)
    ap.add_argument("--probe-epochs", type=int, default=30)
    ap.add_argument("--finetune-epochs", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", nargs="*", default=list(CHOICES), choices=CHOICES)
    args = ap.parse_args()
    if args.quick:
        args.train, args.val, args.epochs, args.teacher_epochs, args.probe_epochs = 256, 256, 1, 1, 5
        args.finetune_epochs = min(args.finetune_epochs, 1)
    torch.set_num_threads(args.threads)
    train, test = get_dataset("fashion_mnist", split="train"), get_dataset("fashion_mnist", split="test")
    x, y = train.inputs[: args.train], train.targets[: args.train]
    loader = InMemoryLoader(x, y, batch_size=128, seed=args.seed)
    probe_train = InMemoryLoader(x, y, batch_size=500, shuffle=False)
    probe_val = InMemoryLoader(test.inputs[: args.val], test.targets[: args.val], batch_size=500, shuffle=False)

    def probe(model: torch.nn.Module, features: str = "head:input", pool: str | None = None) -> float:
        return linear_probe(model, probe_train, probe_val, features=features, pool=pool, epochs=args.probe_epochs,
                            seed=args.seed, progress=False)["top1"]

    def tune(model: torch.nn.Module) -> str:
        if not args.finetune_epochs:
            return "-"
        out = finetune(model, 10, loader, probe_val, epochs=args.finetune_epochs, lr=1e-3, seed=args.seed,
                       progress=False)
        return f"{out.last_acc:.2f}"

    print(f"Fashion-MNIST, {args.train} train / {args.val} test images, {args.epochs} pre-training epochs, "
          f"linear probe {args.probe_epochs} epochs, fine-tuning {args.finetune_epochs} epochs, seed {args.seed}")
    print("| encoder | probe cls % | probe mean-patch % | fine-tune % | pre-training s | last pre-training loss |")
    print("|---|---|---|---|---|---|", flush=True)

    def report(label: str, model: torch.nn.Module, secs: float, loss: str) -> None:
        cls, mean = probe(model), probe(model, "norm", "mean")
        print(f"| {label} | {cls:.2f} | {mean:.2f} | {tune(model)} | {secs:.0f} | {loss} |", flush=True)

    common = dict(epochs=args.epochs, seed=args.seed, progress=False, pretrain_lr=1e-3)
    for name in args.only:
        torch.manual_seed(args.seed)
        if name in ("random", "random_rpb"):
            arch = "vit_tiny" if name == "random" else "vit_tiny_rpb"
            report(f"random-init {arch} (no pre-training)", create(arch), 0.0, "-")
            continue
        t0 = time.perf_counter()
        if name == "fd":
            teacher = create("cnn_teacher_mnist")
            fit(Distiller(teacher, None, {"ce": 1.0}), loader, None, epochs=args.teacher_epochs, optimizer="sgd",
                lr=0.05, schedule="cosine", seed=args.seed, progress=False)
            teacher.eval()
            acc = probe(teacher, "pool")
            print(f"| teacher cnn_teacher_mnist ({args.teacher_epochs} ep, labels), probe on pool | {acc:.2f} | - | - "
                  f"| {time.perf_counter() - t0:.0f} | - |", flush=True)
            t0 = time.perf_counter()
            r = fd(create("vit_tiny_rpb"), loader, None, teacher=teacher, teacher_tap="stage3", **common)
        elif name == "sdae":
            r = sdae(create("vit_tiny"), loader, None, ema_every="step", ema_momentum=0.99,
                     ema_momentum_final=0.999, **common)
        else:
            r = dmjd(create("vit_tiny"), loader, None, block=1, **common)
        assert r.encoder is not None
        report(f"{name} pre-trained vit_tiny{'_rpb' if name == 'fd' else ''}", r.encoder,
               time.perf_counter() - t0, f"{r.pretrain_history[-1]['pretrain_loss']:.4f}")


if __name__ == "__main__":
    main()
