"""SdAE and DMJD pre-training interrupted and resumed: does the resumed run reach the uninterrupted run's weights?

For each strategy, side by side in one run on the first ``--train`` Fashion-MNIST training images
(``vit_tiny``, no labels used): (a) ``--epochs`` epochs uninterrupted; (b) the same run stopped by an
exception at the first batch of epoch ``--crash-at`` (the last checkpoint is epoch ``crash_at - 1``'s),
then started again with ``resume=True`` from a fresh model in another global random state. It prints
each run's per-epoch pre-training losses, the largest absolute difference between the two encoders'
weights (and, for SdAE, the EMA teachers'), and the seconds each took.

    python examples/vit/mim_resume_check.py --quick     # 256 images, 3 epochs: < 30 s on one thread
    python examples/vit/mim_resume_check.py --train 2000 --epochs 4 --crash-at 2
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from distill.data.loader import InMemoryLoader
from distill.data.sources import get_dataset
from distill.models import create
from distill.strategies.mim import dmjd, sdae


class _Crash(Exception):
    pass


class CrashingLoader:
    """``inner``, raising at the first batch of epoch ``crash_at`` (a run killed mid-training)."""

    def __init__(self, inner: InMemoryLoader, crash_at: int) -> None:
        self.inner, self.crash_at, self.epoch = inner, crash_at, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.inner.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Any:
        if self.epoch == self.crash_at:
            raise _Crash(f"simulated crash at epoch {self.epoch}")
        return iter(self.inner)


def _losses(result: Any) -> str:
    return ", ".join(f"{row['pretrain_loss']:.4f}" for row in result.pretrain_history)


def _max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sb = b.state_dict()
    return max(float((v.float() - sb[k].float()).abs().max()) for k, v in a.state_dict().items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="256 images, 3 epochs, crash at epoch 2")
    ap.add_argument("--train", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--crash-at", type=int, default=2, help="epoch whose first batch raises (>= 1)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.quick:
        args.train, args.epochs, args.crash_at = 256, 3, 2
    if not 1 <= args.crash_at < args.epochs:
        raise SystemExit(f"--crash-at must be in 1..{args.epochs - 1}, got {args.crash_at}")
    torch.set_num_threads(1)
    data = get_dataset("fashion_mnist", split="train")
    x, y = data.inputs[: args.train], data.targets[: args.train]
    runs = {"sdae": lambda m, tl, d, **kw: sdae(m, tl, epochs=args.epochs, run_dir=d, seed=args.seed, progress=False,
                                                folds=2, ema_every="step", ema_momentum=0.99, **kw),
            "dmjd": lambda m, tl, d, **kw: dmjd(m, tl, epochs=args.epochs, run_dir=d, seed=args.seed, progress=False,
                                                block=1, target="pixels", **kw)}
    print(f"Fashion-MNIST, first {args.train} training images, vit_tiny, {args.epochs} epochs, crash at the first "
          f"batch of epoch {args.crash_at}, seed {args.seed}, 1 thread")
    print("| strategy | run | pre-training losses per epoch | seconds | max abs weight diff vs uninterrupted |")
    print("|---|---|---|---|---|")

    def fresh() -> torch.nn.Module:
        torch.manual_seed(args.seed)
        return create("vit_tiny", num_classes=10, in_channels=1)

    with tempfile.TemporaryDirectory() as tmp:
        for name, run in runs.items():
            loader = InMemoryLoader(x, y, batch_size=128, seed=args.seed)
            t0 = time.perf_counter()
            whole = run(fresh(), loader, str(Path(tmp) / f"{name}_whole"))
            t_whole = time.perf_counter() - t0
            folder = str(Path(tmp) / f"{name}_crashed")
            t0 = time.perf_counter()
            try:
                run(fresh(), CrashingLoader(InMemoryLoader(x, y, batch_size=128, seed=args.seed), args.crash_at),
                    folder)
            except _Crash:
                pass
            torch.manual_seed(12345)  # another global random state: the checkpoint must bring back its own
            resumed = run(fresh(), InMemoryLoader(x, y, batch_size=128, seed=args.seed), folder, resume=True)
            t_resumed = time.perf_counter() - t0
            diff = f"encoder {_max_diff(whole.encoder, resumed.encoder):.1e}"
            if name == "sdae":
                diff += f", EMA teacher {_max_diff(whole.teacher, resumed.teacher):.1e}"
            print(f"| {name} | uninterrupted | {_losses(whole)} | {t_whole:.1f} | - |")
            print(f"| {name} | crashed + resumed | {_losses(resumed)} | {t_resumed:.1f} (both parts) | {diff} |",
                  flush=True)


if __name__ == "__main__":
    main()
