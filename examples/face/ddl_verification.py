"""DDL (Huang et al., ECCV 2020, arXiv 2002.03662) on a small identity-verification task: identities are
writing-style clusters of MNIST digits 0-5; verification pairs come from the held-out digits 6-9. A teacher
trained on clean images; a student trained on degraded (hard) images with cross-entropy plus DDL, whose
teacher distributions come from the clean copies.

    python examples/face/ddl_verification.py --quick     # < 60 s
    python examples/face/ddl_verification.py
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from distill.batch import Batch
from distill.data.face_verification import cluster_identities, degrade, verification_metrics, verification_pairs
from distill.data.sources import load_mnist
from distill.methods import create_method
from distill.models import create
from distill.strategies.fewshot_skd import tap_features
from distill.taps import Taps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    # $DISTILL_MNIST, else ../shared/data/mnist beside the repository (as the data sets' default)
    root = os.environ.get("DISTILL_MNIST") or str(Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist")
    xtr, ytr = load_mnist(root, "train")
    xte, yte = load_mnist(root, "test")
    keep = (ytr <= 5).nonzero().flatten()[:1000 if args.quick else 6000]
    x, ids = xtr[keep], cluster_identities(xtr[keep], ytr[keep], 8)
    hard = degrade(x)
    held = (yte >= 6).nonzero().flatten()[:1000 if args.quick else None]
    test_ids = cluster_identities(xte[held], yte[held], 8)
    pi, pj, same = verification_pairs(test_ids, 1000)
    test_hard = degrade(xte[held], seed=1)
    n_id = int(ids.max()) + 1
    by_id = [(ids == i).nonzero().flatten() for i in range(n_id)]
    g = torch.Generator().manual_seed(0)

    def batches(epochs):
        for _ in range(epochs * len(x) // 64):
            chosen = torch.randperm(n_id, generator=g)[:16]
            yield torch.cat([by_id[i][torch.randint(len(by_id[i]), (4,), generator=g)] for i in chosen])

    def train(model, loss_fn, epochs):
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        model.train()
        for idx in batches(epochs):
            loss = loss_fn(idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return model.eval()

    epochs = 1 if args.quick else 4
    new = lambda: create("cnn", num_classes=n_id, in_channels=1, widths=(8, 16, 32))  # noqa: E731
    teacher = new()
    train(teacher, lambda i: F.cross_entropy(teacher(x[i]), ids[i]), epochs).requires_grad_(False)
    student = new()
    ddl = create_method("ddl")
    s_taps, t_taps = Taps(student, ["pool"]), Taps(teacher, ["pool"])

    def loss_fn(i):
        with t_taps.recording() as tv, torch.no_grad():
            teacher(x[i])
        with s_taps.recording() as sv:
            z = student(hard[i])
        return F.cross_entropy(z, ids[i]) + ddl(sv, tv, Batch(hard[i], ids[i]))

    train(student, loss_fn, epochs)
    for name, model in (("teacher", teacher), ("student + DDL", student)):
        f = F.normalize(tap_features(model, test_hard, "pool"), dim=1)
        m = verification_metrics((f[pi] * f[pj]).sum(1), same)
        print(f"{name} on degraded pairs: " + ", ".join(f"{k} {v:.1f}%" for k, v in m.items()))


if __name__ == "__main__":
    main()
