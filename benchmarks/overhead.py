"""Overhead of the Distiller's KD step against its parts, side by side in one process.

Measures, on MNIST-sized data (1x28x28, batch 128) with a ~1.2M-parameter teacher CNN and a
~100k-parameter student CNN, the median time per call of:
  (1) a plain student training step (forward, cross-entropy, backward, SGD step),
  (2) a teacher forward (eval mode, no grad),
  (3) a Distiller KD step (CE + KD, T=4: teacher view, student forward, losses, backward, step),
and prints (3) / ((1) + (2)): what the library adds around the work that cannot be avoided.
Target: <= 1.03.

    python benchmarks/overhead.py [--reps 200] [--steps 1] [--threads N] [--write-docs]

Each repetition calls every function in turn (``--steps`` calls each), so slow drifts of a
noisy machine hit all of them alike; the medians over repetitions are compared.
"""

from __future__ import annotations

import argparse
import io
import platform
from contextlib import redirect_stdout
from pathlib import Path

import torch
import torch.nn.functional as F

from _common import time_interleaved, write_section

import distill
from distill.models import create


def load_batch(batch_size: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    root = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "mnist"
    try:
        from distill.data import get_dataset

        data = get_dataset("mnist", root)
        return data.inputs[:batch_size].contiguous(), data.targets[:batch_size].contiguous(), f"MNIST ({root})"
    except (FileNotFoundError, OSError):
        g = torch.Generator().manual_seed(0)
        return torch.randn(batch_size, 1, 28, 28, generator=g), torch.randint(0, 10, (batch_size,), generator=g), \
            "synthetic 1x28x28"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--write-docs", action="store_true", help="record command and output in docs/benchmarks.md")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    x, y, source = load_batch(args.batch_size)
    x, y = x.to(device), y.to(device)

    teacher = create("cnn_teacher_mnist").to(device).eval().requires_grad_(False)
    student_plain = create("cnn_student_mnist").to(device)
    student_kd = create("cnn_student_mnist").to(device)
    student_kd.load_state_dict(student_plain.state_dict())
    opt_plain = torch.optim.SGD(student_plain.parameters(), lr=0.01, momentum=0.9)
    d = distill.Distiller(student_kd, teacher, losses={"ce": 1.0, "kd": distill.methods.KD(T=4.0)})
    d.prepare((x, y))
    opt_kd = torch.optim.SGD(d.trainable_parameters(), lr=0.01, momentum=0.9)
    batch = distill.Batch(x, y)

    def student_step() -> None:
        loss = F.cross_entropy(student_plain(x), y)
        opt_plain.zero_grad(set_to_none=True)
        loss.backward()
        opt_plain.step()

    def teacher_forward() -> None:
        with torch.no_grad():
            teacher(x)

    student_hand = create("cnn_student_mnist").to(device)
    student_hand.load_state_dict(student_plain.state_dict())
    opt_hand = torch.optim.SGD(student_hand.parameters(), lr=0.01, momentum=0.9)

    def hand_kd_step() -> None:
        # the same losses written inline, no library: what KD costs before any framework
        with torch.no_grad():
            t_logits = teacher(x)
        s_logits = student_hand(x)
        T = 4.0
        kd = F.kl_div(F.log_softmax(s_logits / T, 1), F.log_softmax(t_logits / T, 1), reduction="batchmean",
                      log_target=True) * T * T
        loss = F.cross_entropy(s_logits, y) + kd
        opt_hand.zero_grad(set_to_none=True)
        loss.backward()
        opt_hand.step()

    def kd_step() -> None:
        out = d(batch)
        opt_kd.zero_grad(set_to_none=True)
        out.total.backward()
        opt_kd.step()

    t = time_interleaved({"student": student_step, "teacher": teacher_forward, "hand": hand_kd_step, "kd": kd_step},
                         steps=args.steps, reps=args.reps,
                         sync=torch.cuda.synchronize if device.type == "cuda" else lambda: None)
    n_t = sum(p.numel() for p in teacher.parameters())
    n_s = sum(p.numel() for p in student_plain.parameters())
    buf = io.StringIO()
    with redirect_stdout(buf):
        print(f"data: {source}, batch {args.batch_size}; teacher cnn_teacher_mnist {n_t:,} params, "
              f"student cnn_student_mnist {n_s:,} params")
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
            f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
        print(f"torch {torch.__version__}, {where}; "
              f"median of {args.reps} reps x {args.steps} steps, interleaved")
        print(f"student train step      {t['student'] * 1e3:8.2f} ms")
        print(f"teacher forward         {t['teacher'] * 1e3:8.2f} ms")
        print(f"hand-written KD step    {t['hand'] * 1e3:8.2f} ms   (same losses inline, no library)")
        print(f"Distiller KD step       {t['kd'] * 1e3:8.2f} ms")
        ratio = t["kd"] / (t["student"] + t["teacher"])
        print(f"KD step / (student step + teacher forward) = {ratio:.3f}  (target <= 1.03: "
              f"{'met' if ratio <= 1.03 else 'NOT met'})")
        print(f"hand-written KD step / (student step + teacher forward) = {t['hand'] / (t['student'] + t['teacher']):.3f}")
        print(f"Distiller KD step / hand-written KD step = {t['kd'] / t['hand']:.3f}  (the library's own cost)")
    print(buf.getvalue(), end="")
    if args.write_docs:
        write_section("overhead", buf.getvalue())


if __name__ == "__main__":
    main()
