"""Multi-teacher, multi-task distillation on three real image tasks (issue 12 rows 9-11).

GLUE (BAM!, MT-DNN) and multilingual parallel corpora (Tan et al.) are not available offline. The
closest honest small stand-in: three real classification tasks that share an input space, MNIST
digits, Fashion-MNIST clothes and scikit-learn's 8x8 digits (resized to 14x14), learned by one
student with a shared trunk (a 196→16 MLP layer) and one 10-way head per task. Each task has its own
teachers: wider single-task MLPs (196→256→10), three per task trained with different seeds.

Compared at the same seed and budget (same steps, optimizer, lr):
* multi-task CE: the student on gold labels only;
* multilingual_kd (Tan et al. 2019): KD from the task's teacher while the student trails it + 1 point;
* bam (Clark et al. 2019): teacher annealing from the task's teacher, tasks drawn ∝ n^0.75;
* mtdnn_kd (Liu et al. 2019): the average of the three teachers' probabilities per task.

Run: ``.venv/bin/python examples/language/multitask.py`` (about a minute on 2 idle CPU cores),
``--quick`` for a few seconds.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distill.data.loader import InMemoryLoader
from distill.data.sources import load_digits_split, load_fashion_mnist, load_mnist
from distill.strategies.multitask import (
    MultiTaskNet,
    Task,
    evaluate_task,
    fit_bam,
    fit_mtdnn_kd,
    fit_multilingual_kd,
    fit_multitask,
)

MNIST_ROOT = "/work/shared/data/mnist"


def _prep(x: torch.Tensor) -> torch.Tensor:
    """Images (N, 1, H, W) in [0, 1] → 14x14, standardised per image, flattened to (N, 196)."""
    x = F.interpolate(x, size=(14, 14), mode="bilinear", align_corners=False) if x.shape[-1] != 14 else x
    x = x.flatten(1)
    return (x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + 1e-6)


def load_tasks(n_train: int, n_val: int, quick: bool = False
               ) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Task → (train inputs (N, 196), labels (N,), validation inputs, labels). Training images from
    the official training split, validation images from the test split (``quick``: both drawn,
    disjoint, from the 10,000 test images, which load faster)."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, loader in (("mnist", lambda s: load_mnist(MNIST_ROOT, s)), ("fashion", lambda s: load_fashion_mnist(None, s))):
        xte, yte = loader("test")
        ite = torch.randperm(len(yte), generator=g)
        if quick:
            itr, ite = ite[n_val:n_val + n_train], ite[:n_val]
            xtr, ytr = xte, yte
        else:
            xtr, ytr = loader("train")
            itr, ite = torch.randperm(len(ytr), generator=g)[:n_train], ite[:n_val]
        out[name] = (_prep(xtr[itr]), ytr[itr], _prep(xte[ite]), yte[ite])
    d = load_digits_split(0.25, seed=0)
    k = min(n_train, len(d.train_targets))  # digits is the small task (1,347 training images)
    out["digits"] = (_prep(d.train_inputs[:k]), d.train_targets[:k], _prep(d.val_inputs[:n_val]), d.val_targets[:n_val])
    return out


def mlp(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(196, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def train_teacher(x: torch.Tensor, y: torch.Tensor, seed: int, epochs: int) -> nn.Module:
    torch.manual_seed(seed)
    model = mlp(256)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    loader = InMemoryLoader(x, y, batch_size=64, seed=seed)
    for e in range(epochs):
        loader.set_epoch(e)
        for b in loader:
            loss = F.cross_entropy(model(b.inputs), b.targets)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def student() -> MultiTaskNet:
    trunk = nn.Sequential(nn.Linear(196, 16), nn.ReLU())
    return MultiTaskNet(trunk, {name: nn.Linear(16, 10) for name in ("mnist", "fashion", "digits")})


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0, help="first student seed")
    parser.add_argument("--seeds", type=int, default=3, help="student seeds (the teachers are trained once)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny models: one thread is fastest on a shared machine
    n_train, n_val = (400, 200) if args.quick else (3000, 2000)
    epochs = args.epochs or (1 if args.quick else 8)
    teacher_epochs = 2 if args.quick else 8
    members = 2 if args.quick else 3
    t0 = time.time()
    data = load_tasks(n_train, n_val, args.quick)
    teachers = {name: [train_teacher(x, y, seed=100 + i, epochs=teacher_epochs) for i in range(members)]
                for name, (x, y, _, _) in data.items()}

    def tasks(teacher_of: Any, seed: int) -> list[Task]:
        return [Task(name, InMemoryLoader(x, y, batch_size=64, seed=seed),
                     InMemoryLoader(xv, yv, batch_size=512, shuffle=False), teacher_of(name))
                for name, (x, y, xv, yv) in data.items()]

    for name, (_, _, xv, yv) in data.items():
        accs = [evaluate_task(m, [(xv, yv)]) for m in teachers[name]]
        print(f"teachers on {name}: " + ", ".join(f"{a:.1f}%" for a in accs))
    seeds = [args.seed + i for i in range(1 if args.quick else args.seeds)]

    def runs(seed: int) -> dict[str, Any]:
        common = dict(epochs=epochs, seed=seed, progress=False, optimizer="adam", lr=3e-3)
        return {
            "multi-task CE (no KD)": lambda: fit_multitask(
                student, tasks(lambda n: None, seed), lambda task, z, zt, y, state: F.cross_entropy(z, y), **common),
            "multilingual_kd": lambda: fit_multilingual_kd(student, tasks(lambda n: teachers[n][0], seed), **common),
            "bam": lambda: fit_bam(student, tasks(lambda n: teachers[n][0], seed), **common),
            "mtdnn_kd": lambda: fit_mtdnn_kd(student, tasks(lambda n: teachers[n], seed), **common),
        }

    names = list(data)
    rows = []
    for method in runs(0):
        per_seed = []
        kd_on = []
        for seed in seeds:
            res = runs(seed)[method]()
            per_seed.append([res.last_acc] + [res.task_last_acc[n] for n in names])
            if res.kd_flags:
                kd_on.append(sum(res.kd_flags.values()))
        acc = torch.tensor(per_seed, dtype=torch.float64)
        mean, std = acc.mean(0), (acc.std(0) if len(seeds) > 1 else torch.zeros(acc.shape[1]))
        row = {"method": method, "mean_acc": float(mean[0]), "mean_acc_std": float(std[0]),
               **{n: float(mean[i + 1]) for i, n in enumerate(names)}}
        if kd_on:
            row["kd_on_at_end"] = f"{sum(kd_on)}/{len(kd_on) * len(names)}"
        rows.append(row)
    print(f"\nstudent 196→16 shared trunk + 3 heads, {epochs} epochs, Adam lr 3e-3, seeds {seeds} "
          f"(last-epoch validation accuracy, %, mean over seeds)")
    print(f"{'method':24s} {'mean':>6s} {'± sd':>5s} " + " ".join(f"{n:>8s}" for n in names) + "  tasks with KD on at end")
    for r in rows:
        print(f"{r['method']:24s} {r['mean_acc']:6.2f} {r['mean_acc_std']:5.2f} "
              + " ".join(f"{r[n]:8.2f}" for n in names) + f"  {r.get('kd_on_at_end', '')}")
    print(f"({time.time() - t0:.0f} s)")
    return rows


if __name__ == "__main__":
    main()
