"""SKD (Rajasegaran et al., BMVC 2021, arXiv 2006.09785) on Fashion-MNIST: Gen-0 and Gen-1 on the base classes
0-4, then 5-way 1-/5-shot episodes on the held-out classes 5-9 with a logistic regression on frozen features.

    python examples/fewshot/skd_fewshot.py --quick     # < 60 s
    python examples/fewshot/skd_fewshot.py
"""

from __future__ import annotations

import argparse

import torch

from distill.data.fewshot import episode_accuracy
from distill.data.sources import load_fashion_mnist
from distill.models import create
from distill.strategies.fewshot_skd import fit_skd_fewshot, tap_features


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    xtr, ytr = load_fashion_mnist(split="train")
    xte, yte = load_fashion_mnist(split="test")
    per = 60 if args.quick else 1000
    base = torch.cat([(ytr == c).nonzero().flatten()[:per] for c in range(5)])
    novel = (yte >= 5).nonzero().flatten()
    result = fit_skd_fewshot(lambda: create("cnn", num_classes=5, in_channels=1, widths=(8, 16, 32)),
                             (xtr[base], ytr[base]), epochs=1 if args.quick else 8, batch_size=64,
                             progress=not args.quick)
    for name, model in (("Gen-0", result.teacher), ("Gen-1", result.model)):
        feats = tap_features(model, xte[novel], "pool")
        for shot in (1, 5):
            acc, ci = episode_accuracy(feats, yte[novel], 5, shot, 15, episodes=20 if args.quick else 600)
            print(f"{name}: 5-way {shot}-shot {acc:.1f} ± {ci:.1f} %")


if __name__ == "__main__":
    main()
