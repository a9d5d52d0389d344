"""Data-free KD on MNIST by inversion: Lopes et al.'s metadata, DeepInversion, ADI and Fast DFKD.

A LeNet-5 teacher with BatchNorm (``lenet5(batch_norm=True)``, 28x28) is trained on the real MNIST
training set (the only step that sees it; it also records Lopes et al.'s activation metadata, as a
model owner would at release time). Every method then trains a fresh LeNet-5-half from the teacher
(and, for ``lopes``, the metadata file) alone, and is tested on the MNIST test split.

    python examples/synthesis/inversion_mnist.py [--methods lopes deepinversion_kd adi_kd fast_dfkd]
        [--teacher-epochs 2] [--test 10000] [--T 20] [--quick] [--out runs/inversion_mnist]

``--quick``: tiny budgets (a smoke run: the numbers say the pipeline works, not how good a method is).
Needs the MNIST files (``distill.data.get_dataset("mnist")``); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import distill
from distill.data import get_dataset
from distill.data.loader import InMemoryLoader
from distill.models import create
from distill.strategies.data_free_deepinversion import kd_on_synthetic
from distill.strategies.registry import strategy_info
from distill.synthesis.metadata import lopes_metadata, record_metadata

SHAPE = (1, 28, 28)
BUDGETS = {  # full / quick keyword arguments per method (ours, sized for a CPU)
    "lopes": ({"ipc": 50, "steps": 300, "epochs": 20, "lr": 0.01}, {"ipc": 5, "steps": 30, "epochs": 2, "lr": 0.01}),
    "deepinversion_kd": ({"ipc": 100, "epochs": 20, "batch_size": 128, "synth": {"iterations": 300}, "lr": 0.05},
                         {"ipc": 5, "epochs": 2, "batch_size": 50, "synth": {"iterations": 30}, "lr": 0.05}),
    "adi_kd": ({"rounds": 4, "ipc_per_round": 25, "epochs_per_round": 5, "batch_size": 128,
                "synth": {"iterations": 300}, "lr": 0.05},
               {"rounds": 2, "ipc_per_round": 3, "epochs_per_round": 1, "batch_size": 30,
                "synth": {"iterations": 30}, "lr": 0.05}),
    "fast_dfkd": ({"epochs": 30, "kd_steps": 50, "batch_size": 128, "lr": 0.05},
                  {"epochs": 3, "warmup": 1, "kd_steps": 10, "batch_size": 64, "lr": 0.05}),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=list(BUDGETS), choices=list(BUDGETS))
    p.add_argument("--teacher-epochs", type=int, default=2)
    p.add_argument("--test", type=int, default=10000, help="test images used for evaluation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--T", type=float, default=20.0, help="KD temperature of every method (20: Fang et al.'s scripts)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=Path("runs/inversion_mnist"))
    a = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(a.seed)
    train, test = get_dataset("mnist", split="train"), get_dataset("mnist", split="test")
    n_train = 6000 if a.quick else len(train.inputs)
    val = InMemoryLoader(test.inputs[:a.test], test.targets[:a.test], 500, shuffle=False)
    t0 = time.perf_counter()
    teacher = create("lenet5", image_size=28, batch_norm=True)
    loader = InMemoryLoader(train.inputs[:n_train], train.targets[:n_train], 128, shuffle=True, seed=a.seed)
    r = distill.fit(distill.Distiller(teacher, None, {"ce": 1.0}), loader, val, epochs=a.teacher_epochs, lr=0.05,
                    momentum=0.9, weight_decay=1e-4, schedule="constant", progress=False, eval_teacher=False)
    teacher.eval()
    a.out.mkdir(parents=True, exist_ok=True)
    meta_path = a.out / "lopes_metadata.safetensors"
    record_metadata(teacher, (train.inputs[:n_train], train.targets[:n_train]), num_classes=10, path=meta_path,
                    overwrite=True)
    print(f"teacher LeNet-5 (BN): test top-1 {r.last_acc:.2f}% ({time.perf_counter() - t0:.0f} s incl. metadata)")
    for m in a.methods:
        kw = dict(BUDGETS[m][1 if a.quick else 0])
        torch.manual_seed(a.seed)
        student = create("lenet5_half", image_size=28)
        t1 = time.perf_counter()
        if m == "lopes":
            epochs, kd_lr = kw.pop("epochs"), kw.pop("lr")  # kd_lr: the KD stage's SGD lr
            m0, s0 = train.mean[0], train.std[0]  # the authors' MNIST start: pixels N(0.15, 0.1^2)
            s = lopes_metadata(teacher, num_classes=10, image_shape=SHAPE, metadata=meta_path, seed=a.seed,
                               progress=False, init_mean=(0.15 - m0) / s0, init_std=0.1 / s0, **kw)
            res = kd_on_synthetic(student, teacher, s, val, epochs=epochs, T=a.T, batch_size=128, seed=a.seed,
                                  progress=False, run_dir=None, lr=kd_lr)
        else:
            res = strategy_info(m).fn(student, None, val, teacher=teacher, num_classes=10, image_shape=SHAPE,
                                      seed=a.seed, progress=False, T=a.T, **kw)
        print(f"{m}: student LeNet-5-half test top-1 last {res.last_acc:.2f}% best {res.best_acc:.2f}% "
              f"({time.perf_counter() - t1:.0f} s; budget {BUDGETS[m][1 if a.quick else 0]})")


if __name__ == "__main__":
    main()
