"""MTT (Cazenavette et al., CVPR 2022, arXiv 2203.11932) on MNIST or Fashion-MNIST, evaluated with
the ConvNet-3 protocol, beside the random real images it starts from.

    python examples/synthesis/mtt_mnist.py --quick            # a few CPU minutes, reduced everything
    python examples/synthesis/mtt_mnist.py --dataset fashion_mnist --buffer runs/mtt_buffer_fmnist

Without ``--quick`` the settings are the paper's (100 experts x 50 epochs on all 60000 images,
ConvNet-3 of width 128, 5000 iterations of N = 30 student steps): GPU work, hours to days on a CPU.
``--quick`` shrinks them (a slice of the training set, width 32, a few experts, epochs and
iterations, N = 10, and lr_img 100: measured better than the authors' 1000 at this reduced scale,
where 1000 left the set below its random-real start); its numbers are a smoke check, not the
paper's protocol.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from distill.data.sources import get_dataset
from distill.synthesis.evaluate import evaluate_synthetic
from distill.synthesis.mtt import mtt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="mnist", choices=["mnist", "fashion_mnist"])
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--train-slice", type=int, default=None, help="use the first N training images")
    p.add_argument("--width", type=int, default=None, help="ConvNet-3 width (paper: 128)")
    p.add_argument("--experts", type=int, default=None)
    p.add_argument("--expert-epochs", type=int, default=None, help="E, epochs per expert")
    p.add_argument("--iterations", type=int, default=None)
    p.add_argument("--syn-steps", type=int, default=None, help="N")
    p.add_argument("--max-start-epoch", type=int, default=None, help="T+")
    p.add_argument("--lr-img", type=float, default=None, help="images' lr (the authors' code: 1000)")
    p.add_argument("--evaluations", type=int, default=None)
    p.add_argument("--eval-epochs", type=int, default=None)
    p.add_argument("--buffer", default=None, help="expert buffer folder (reused when its settings match)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    q = a.quick
    pick = lambda given, quick, full: given if given is not None else (quick if q else full)  # noqa: E731
    train_slice = pick(a.train_slice, 6000, None)
    width = pick(a.width, 32, 128)
    hp = dict(
        num_experts=pick(a.experts, 2, 100), expert_train_epochs=pick(a.expert_epochs, 5, 50),
        iterations=pick(a.iterations, 60, 5000), syn_steps=pick(a.syn_steps, 10, None),
        max_start_epoch=pick(a.max_start_epoch, 3, None), lr_img=pick(a.lr_img, 100.0, 1000.0),
        model_kwargs={"width": width},
    )
    evaluations, eval_epochs = pick(a.evaluations, 3, 5), pick(a.eval_epochs, 300, 1000)

    train, test = get_dataset(a.dataset, split="train"), get_dataset(a.dataset, split="test")
    x, y = train.inputs, train.targets
    if train_slice is not None:
        x, y = x[:train_slice], y[:train_slice]
    t0 = time.perf_counter()
    synthetic = mtt(x, y, ipc=a.ipc, num_classes=train.num_classes, seed=a.seed, buffer_dir=a.buffer, **hp)
    distill_s = time.perf_counter() - t0
    alpha = synthetic.manifest["learned_lr"]
    ev = dict(evaluations=evaluations, epochs=eval_epochs, seed=a.seed, model_kwargs={"width": width})
    tests = (test.inputs, test.targets)
    results = {
        "mtt (learned lr)": evaluate_synthetic(synthetic, tests, lr=alpha, **ev),
        "mtt (lr 0.01)": evaluate_synthetic(synthetic, tests, lr=0.01, **ev),
    }
    # the baseline: the random real images MTT starts from (init='real', the same seed), no distillation
    from distill.data.synthetic import SyntheticSet
    from distill.synthesis.mtt import _init_images

    init = _init_images(x, y, a.ipc, train.num_classes, "real", torch.Generator().manual_seed(a.seed))
    base = SyntheticSet(init, torch.arange(train.num_classes).repeat_interleave(a.ipc), {"method": "random_real"})
    results["random real (lr 0.01)"] = evaluate_synthetic(base, tests, lr=0.01, **ev)

    print(json.dumps({"dataset": a.dataset, "ipc": a.ipc, "train_images": int(x.shape[0]), "width": width,
                      "settings": hp, "learned_lr": alpha, "matching_loss": synthetic.manifest["matching_loss"],
                      "distill_time_s": round(distill_s, 1)}, indent=1))
    for name, r in results.items():
        print(f"{name:24s} {r.mean:6.2f} +- {r.std:5.2f} %  ({evaluations} x {eval_epochs} epochs, "
              f"{r.time_s:.0f} s)")


if __name__ == "__main__":
    main()
