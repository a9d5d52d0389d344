"""SSD (Li, Wang, Wu, ICCV 2021, arXiv 2109.04075) on long-tailed Fashion-MNIST (exponential profile, imbalance
100): a self-supervised teacher, its class-balanced soft labels, a two-head student; many/medium/few-shot
accuracy on the balanced test set.

    python examples/longtail/ssd_longtail.py --quick     # < 60 s
    python examples/longtail/ssd_longtail.py
"""

from __future__ import annotations

import argparse

import torch

from distill.data.longtail import long_tailed_counts, long_tailed_indices, shot_accuracy
from distill.data.sources import load_fashion_mnist
from distill.models import create
from distill.strategies.longtail_ssd import fit_ssd_longtail


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    xtr, ytr = load_fashion_mnist(split="train")
    xte, yte = load_fashion_mnist(split="test")
    n_max = 150 if args.quick else 1000
    idx = long_tailed_indices(ytr, n_max, 100.0)
    result = fit_ssd_longtail(lambda: create("cnn", num_classes=10, in_channels=1, widths=(8, 16, 32)),
                              (xtr[idx], ytr[idx]), epochs=1 if args.quick else 10, batch_size=64,
                              progress=not args.quick)
    counts = long_tailed_counts(10, n_max, 100.0)
    print(f"train counts per class: {counts}")
    x_eval, y_eval = (xte[:2000], yte[:2000]) if args.quick else (xte, yte)
    with torch.no_grad():
        hard, soft = result.model.eval().both(x_eval)
    for name, logits in (("hard head", hard), ("soft head", soft)):
        acc = shot_accuracy(logits.argmax(1), y_eval, counts)
        print(name + ": " + ", ".join(f"{k} {v:.1f}%" for k, v in acc.items()))


if __name__ == "__main__":
    main()
