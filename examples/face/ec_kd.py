"""EC-KD (Wang et al., "Exclusivity-Consistency Regularized Knowledge Distillation for Face Recognition",
ECCV 2020, no arXiv version) on a small identity-verification task: identities are writing-style clusters of
MNIST digits 0-5; verification pairs come from the held-out digits 6-9. A teacher trained on clean images; a
narrower student trained on degraded images with cross-entropy + EC-KD (hardness-aware consistency of its
pooled embedding with the teacher's on the clean copies, and weight exclusivity over its conv/linear layers),
through the Distiller.

    python examples/face/ec_kd.py --quick     # < 30 s
    python examples/face/ec_kd.py
"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

import distill
from distill.batch import Batch
from distill.data.face_verification import cluster_identities, degrade, verification_metrics, verification_pairs
from distill.data.sources import load_mnist
from distill.models import create
from distill.strategies.fewshot_skd import tap_features
from distill.teachers import FrozenTeacher


class CleanTeacher(FrozenTeacher):
    """The frozen teacher's view of the *clean* copies of the batch's images (looked up by ``batch.index``)
    while the student sees the degraded ones: the easy/hard split of the face setting."""

    def __init__(self, model: torch.nn.Module, clean: torch.Tensor) -> None:
        super().__init__(model)
        self.clean = clean

    def forward(self, batch: Batch):
        return super().forward(replace(batch, inputs=self.clean[batch.index]))


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
    pi, pj, same = verification_pairs(cluster_identities(xte[held], yte[held], 8), 1000)
    test_hard = degrade(xte[held], seed=1)
    n_id = int(ids.max()) + 1
    g = torch.Generator().manual_seed(0)
    epochs = 1 if args.quick else 4

    def train(model, step, params):
        opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)
        model.train()
        for _ in range(epochs):
            for idx in torch.randperm(len(x), generator=g).split(64):
                loss = step(idx)
                opt.zero_grad()
                loss.backward()
                opt.step()
        return model.eval()

    teacher = create("cnn", num_classes=n_id, in_channels=1, widths=(16, 32, 64))
    train(teacher, lambda i: F.cross_entropy(teacher(x[i]), ids[i]), teacher.parameters())
    student = create("cnn", num_classes=n_id, in_channels=1, widths=(8, 16, 64))
    d = distill.Distiller(student, CleanTeacher(teacher, x), losses={
        "ce": 1.0, "ec_kd": distill.methods.create_method("ec_kd", consistency_weight=1.0, exclusivity_weight=0.05,
                                                          hardness=1.0)})
    d.prepare(Batch(hard[:8], ids[:8], index=torch.arange(8)))
    train(student, lambda i: d(Batch(hard[i], ids[i], index=i)).total, d.parameters())
    print(f"exclusivity over {len(d.methods['ec_kd'].layer_names)} student layers: "
          f"{d.methods['ec_kd'].exclusivity().item():.3f}")
    for name, model in (("teacher", teacher), ("student + EC-KD", student)):
        f = F.normalize(tap_features(model, test_hard, "pool"), dim=1)
        m = verification_metrics((f[pi] * f[pj]).sum(1), same)
        print(f"{name} on degraded pairs: " + ", ".join(f"{k} {v:.1f}%" for k, v in m.items()))


if __name__ == "__main__":
    main()
