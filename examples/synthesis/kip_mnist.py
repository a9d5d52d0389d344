"""KIP with the exact FC NTK (Nguyen, Chen & Lee, ICLR 2021, arXiv 2011.00050) on MNIST at ipc 10.

Reports kernel ridge regression test accuracy from the 100 support images (the paper's metric)
before and after KIP, and a ConvNet-3 trained on each set (DC's protocol, shortened by the flags)::

    python examples/synthesis/kip_mnist.py --iterations 200 --target-batch 2000 --eval-epochs 100
    python examples/synthesis/kip_mnist.py --quick        # seconds: 3 steps, 1 short evaluation

Without flags: the paper's/authors' settings (1000 steps, target batch 5000) and DC's evaluation
(5 ConvNet-3, 300 epochs). Needs the MNIST files (``distill.data.sources``); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch

from distill.data.sources import get_dataset
from distill.data.synthetic import SyntheticSet
from distill.functional import fc_ntk
from distill.synthesis.evaluate import evaluate_synthetic
from distill.synthesis.kip import centered_one_hot, kip_fc, krr_accuracy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=1000)
    p.add_argument("--target-batch", type=int, default=5000)
    p.add_argument("--eval-epochs", type=int, default=300)
    p.add_argument("--evaluations", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="3 KIP steps, 1 ConvNet-3 for 2 epochs, 2000 test images")
    args = p.parse_args()
    if args.quick:
        args.iterations, args.target_batch, args.eval_epochs, args.evaluations = 3, 200, 2, 1
    torch.set_num_threads(1)
    train, test = get_dataset("mnist", split="train"), get_dataset("mnist", split="test")
    x, y, xt, yt = train.inputs, train.targets, test.inputs, test.targets
    if args.quick:
        xt, yt = xt[:2000], yt[:2000]
    t = time.time()
    s = kip_fc(x, y, ipc=10, num_classes=10, iterations=args.iterations, target_batch=args.target_batch,
               seed=args.seed, progress=not args.quick)
    m = s.manifest
    print(f"kip_fc: {args.iterations} iterations, target batch {args.target_batch}: {time.time() - t:.1f} s; "
          f"loss {m['loss_first']:.5f} -> {m['loss_last']:.5f}")
    kernel = partial(fc_ntk, depth=1, weight_var=2.0, bias_var=1e-4)
    init = x[torch.tensor(m["init_indices"])]
    ys = centered_one_hot(s.labels, 10)
    print(f"KRR (FC1 NTK) test accuracy, 100 random real images (KIP's init): "
          f"{krr_accuracy(kernel, init.double(), ys, xt.double(), yt):.2f}%")
    print(f"KRR (FC1 NTK) test accuracy, 100 KIP images:                     "
          f"{krr_accuracy(kernel, s.images.double(), ys, xt.double(), yt):.2f}%")
    real = SyntheticSet(init.clone(), s.labels.clone(), {"method": "random_real"})
    for name, subset in (("random real (KIP init)", real), ("kip_fc", s)):
        r = evaluate_synthetic(subset, (xt, yt), evaluations=args.evaluations, epochs=args.eval_epochs,
                               progress=not args.quick)
        print(f"ConvNet-3 ({args.eval_epochs} epochs, DSA, {args.evaluations} evaluations) on {name}: "
              f"{r.mean:.2f} ± {r.std:.2f}  ({r.time_s:.0f} s)")


if __name__ == "__main__":
    main()
