"""Checks that need a GPU: a distillation run on CUDA with mixed precision and a bf16 teacher.

Trains the digits teacher for a few epochs, then the student with CE + KD + DKD + CTKD +
FitNets + AT, on CUDA with ``amp="auto"`` (bf16 autocast) and the teacher held in bf16, and
checks: every loss finite, the teacher's weights and BN buffers unchanged, the student learns,
and resume from a checkpoint on CUDA continues. Prints one line per check.

    python benchmarks/gpu_check.py
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch

import distill
from distill.data import get_dataset
from distill.data.augment import RandomCropPad
from distill.data.loader import InMemoryLoader
from distill.methods import AT, CTKD, DKD, KD, FitNet
from distill.models import create


def main() -> None:
    if torch.cuda.is_available():
        device = torch.device("cuda")
        print(f"torch {torch.__version__}, {torch.cuda.get_device_name(device)}, "
              f"bf16 supported: {torch.cuda.is_bf16_supported()}")
    else:  # a dry run of the script itself
        device = torch.device("cpu")
        print(f"torch {torch.__version__}: no CUDA device, running the same checks on the CPU")
    train, val = get_dataset("digits", split="train"), get_dataset("digits", split="val")
    loader = InMemoryLoader(train.inputs, train.targets, 64, augment=RandomCropPad(1), device=device)
    val_loader = InMemoryLoader(val.inputs, val.targets, 512, shuffle=False, device=device)

    torch.manual_seed(0)
    teacher = create("cnn_digits_teacher")
    r = distill.fit(distill.Distiller(teacher, None, {"ce": 1.0}), loader, val_loader, epochs=8, lr=0.05,
                    schedule="cosine", device=device, amp="auto", progress=False)
    print(f"teacher on {device.type} with amp: val acc {r.last_acc:.2f}%")
    frozen = distill.FrozenTeacher(teacher, dtype=torch.bfloat16)  # casts the teacher's weights to bf16
    before = copy.deepcopy(teacher.state_dict())

    student = create("cnn_digits_student")
    d = distill.Distiller(
        student, frozen,
        losses={"ce": 1.0, "kd": KD(T=4), "dkd": DKD(warmup_epochs=2), "ctkd": CTKD(),
                "fitnet": FitNet(weight=0.02), "at": AT(pairs=[("stage1", "stage1"), ("stage2", "stage2")], beta=100)},
    )
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        r1 = distill.fit(d, loader, val_loader, epochs=2, lr=0.05, schedule="constant", device=device,
                         amp="auto", run_dir=run, progress=False, seed=0)
        d2 = distill.Distiller(
            create("cnn_digits_student"), frozen,
            losses={"ce": 1.0, "kd": KD(T=4), "dkd": DKD(warmup_epochs=2), "ctkd": CTKD(),
                    "fitnet": FitNet(weight=0.02), "at": AT(pairs=[("stage1", "stage1"), ("stage2", "stage2")],
                                                             beta=100)},
        )
        r2 = distill.fit(d2, loader, val_loader, epochs=6, lr=0.05, schedule="constant", device=device,
                         amp="auto", run_dir=run, resume=True, progress=False, seed=0)
    parts = {k: v for k, v in r2.history[-1].items() if k.startswith("train_")}
    assert all(torch.isfinite(torch.tensor(v)) for v in parts.values()), parts
    print(f"student KD+DKD+CTKD+FitNet+AT, bf16 teacher, amp: epoch 1 acc {r1.last_acc:.2f}%, "
          f"resumed to epoch 5 acc {r2.last_acc:.2f}% ({len(r2.history)} epochs in history)")
    print("last-epoch losses: " + ", ".join(f"{k}={v:.4f}" for k, v in parts.items()))
    print(f"CTKD temperature now {d2.methods['ctkd'].temperature:.3f}")
    same = all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    print(f"teacher weights and BN buffers unchanged: {same}")
    assert same and r2.last_acc > r1.last_acc - 5 and len(r2.history) == 6
    print("gpu check: OK")


if __name__ == "__main__":
    main()
