"""Speed of distillation with a live and a cached teacher, side by side in one process.

For two pairs, MNIST-sized data (1x28x28, batch 128; cnn_teacher_mnist ~1.2M parameters ->
cnn_student_mnist ~100k) and 32x32 RGB synthetic data (batch 64; resnet32x4 -> resnet8x4,
100 classes), prints medians of interleaved repetitions of:

  (a) live-teacher KD step / (student step + teacher forward)      target <= 1.03
      and one cached-teacher read / one teacher forward            (the cache must be far cheaper)
  (b) cached-teacher KD epoch / student-only epoch                 target <= 1.15
  (c) cache build / one live-teacher KD epoch                      reported
  (d) distill / torchdistill for the same KD job: not here, `make bench-peers` (benchmarks/peers.py)
      measures it in an environment of its own; this script prints where

and the throughput switches of the teacher forward as ratios to the fp32 eager forward: the
teacher in bf16, in channels_last, and under torch.compile (a failure is caught and printed).
Epochs run the in-memory loader with per-sample crop (+ flip for RGB) augmentation over a
fixed slice of the data (``--samples``), so every variant pays the same data cost.

    python benchmarks/speed.py [--reps 5] [--threads N] [--device cpu|cuda] [--quick] [--no-compile] [--write-docs]

Each repetition runs every variant of a group once in turn (student-only vs cached epochs; live
epochs vs builds), so slow drifts of a noisy machine hit them alike; medians over repetitions are
compared (``--reps`` >= 5 for reported numbers;
``--quick`` is a smoke run with 2 repetitions and smaller epochs).
"""

from __future__ import annotations

import argparse
import io
import platform
import tempfile
import time
from collections.abc import Callable
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _common import time_interleaved, write_section

import distill
from distill.cache import CachedTeacher, build_cache
from distill.data import Compose, InMemoryLoader, RandomCropPad, RandomHorizontalFlip
from distill.models import create
from distill.teachers import FrozenTeacher


@dataclass
class Pair:
    label: str
    teacher: str
    student: str
    shape: tuple[int, int, int]
    classes: int
    batch: int
    samples: int  # per benchmark "epoch"
    steps: int  # step-level calls per repetition
    flip: bool


PAIRS = [
    Pair("MNIST-sized", "cnn_teacher_mnist", "cnn_student_mnist", (1, 28, 28), 10, 128, 2048, 4, False),
    Pair("32x32 RGB", "resnet32x4", "resnet8x4", (3, 32, 32), 100, 64, 128, 1, True),
]


def load_data(pair: Pair, n: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    if pair.shape == (1, 28, 28):
        root = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "mnist"
        try:
            from distill.data import get_dataset

            data = get_dataset("mnist", root)
            return data.inputs[:n].contiguous(), data.targets[:n].contiguous(), f"MNIST ({n} images)"
        except (FileNotFoundError, OSError):
            pass
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, *pair.shape, generator=g)
    return x, torch.randint(0, pair.classes, (n,), generator=g), f"synthetic {'x'.join(map(str, pair.shape))} ({n})"


def make(name: str, classes: int, device: torch.device) -> torch.nn.Module:
    kwargs = {"num_classes": classes} if name.startswith("resnet") else {}
    return create(name, **kwargs).to(device)


def sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.01, momentum=0.9)


def kd_trainer(student: torch.nn.Module, source: Any) -> Callable[[Any], None]:
    d = distill.Distiller(student, source, losses={"ce": 1.0, "kd": distill.methods.KD(T=4.0)})
    d.set_epoch(0)
    opt = sgd(d.trainable_parameters())

    def step(batch: Any) -> None:
        out = d(batch)
        opt.zero_grad(set_to_none=True)
        out.total.backward()
        opt.step()

    return step


def ce_trainer(student: torch.nn.Module) -> Callable[[Any], None]:
    opt = sgd(student.parameters())

    def step(batch: Any) -> None:
        loss = F.cross_entropy(student(batch.inputs), batch.targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def epoch_of(loader: InMemoryLoader, step: Callable[[Any], None]) -> Callable[[], None]:
    def run() -> None:
        for batch in loader:
            step(batch)

    return run


def forward_of(model: Any, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            model(x)

    return run


def switches(pair: Pair, teacher: torch.nn.Module, x: torch.Tensor, reps: int, steps: int, compile_: bool,
             sync: Callable[[], None]) -> list[str]:
    """Teacher-forward ratios of bf16, channels_last and torch.compile to the fp32 eager forward."""
    import copy

    fns: dict[str, Callable[[], None]] = {"fp32": forward_of(teacher, x)}
    fns["bf16"] = forward_of(FrozenTeacher(copy.deepcopy(teacher), dtype=torch.bfloat16),
                             distill.Batch(x))  # casts inputs in, logits back to fp32, as a run would
    cl = copy.deepcopy(teacher).to(memory_format=torch.channels_last)
    fns["channels_last"] = forward_of(cl, x.contiguous(memory_format=torch.channels_last))
    notes = []
    if compile_:
        try:
            t0 = time.perf_counter()
            compiled = torch.compile(copy.deepcopy(teacher))
            with torch.no_grad():
                compiled(x)
            notes.append(f"torch.compile: first call (compilation) took {time.perf_counter() - t0:.1f} s")
            fns["compile"] = forward_of(compiled, x)
        except Exception as e:  # noqa: BLE001 - a CPU build without a working compiler, an unsupported op, ...
            notes.append(f"torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
    else:
        notes.append("torch.compile: not measured (--no-compile / --quick)")
    t = time_interleaved(fns, steps=steps, reps=reps, warmup=1, sync=sync)
    lines = [f"  teacher forward fp32 eager        {t['fp32'] * 1e3:8.2f} ms"]
    for k in ("bf16", "channels_last", "compile"):
        if k in t:
            lines.append(f"  teacher forward {k:<17} {t[k] * 1e3:8.2f} ms   ratio to fp32 eager {t[k] / t['fp32']:.3f}")
    return lines + [f"  {n}" for n in notes]


def bench_pair(pair: Pair, args: argparse.Namespace, device: torch.device, sync: Callable[[], None],
               workdir: Path) -> list[str]:
    samples = pair.samples // (4 if args.quick else 1)
    x_all, y_all, source = load_data(pair, samples)
    x_all, y_all = x_all.to(device), y_all.to(device)
    augs: list[Any] = [RandomCropPad(2 if pair.shape[0] == 1 else 4)] + ([RandomHorizontalFlip()] if pair.flip else [])
    augment = Compose(augs)
    torch.manual_seed(0)
    teacher = make(pair.teacher, pair.classes, device).eval().requires_grad_(False)
    init = make(pair.student, pair.classes, device).state_dict()

    def student() -> torch.nn.Module:
        s = make(pair.student, pair.classes, device)
        s.load_state_dict(init)
        return s

    def loader() -> InMemoryLoader:
        return InMemoryLoader(x_all, y_all, pair.batch, augment=augment, seed=0, return_index=True)

    n_t = sum(p.numel() for p in teacher.parameters())
    n_s = sum(p.numel() for p in init.values())
    lines = [(f"[{pair.label}] {source}, batch {pair.batch}; teacher {pair.teacher} {n_t:,} params, "
             f"student {pair.student} {n_s:,} params; augmentation {augment!r}")]

    # ---- (a) one step on a fixed batch
    batch = next(iter(loader()))
    cache = build_cache(teacher, x_all, workdir / f"{pair.teacher}_a", targets=y_all, augment=augment, epochs=1,
                        device=device, overwrite=True)
    cached = CachedTeacher(cache)
    cached.prepare_loader(loader())
    student_step, kd_step = ce_trainer(student()), kd_trainer(student(), FrozenTeacher(teacher))
    t = time_interleaved({"student": lambda: student_step(batch), "teacher": forward_of(teacher, batch.inputs),
                          "kd": lambda: kd_step(batch), "read": lambda: cached(batch)},
                         steps=pair.steps, reps=args.reps * (2 if pair.steps > 1 else 1), warmup=2, sync=sync)
    ratio_a = t["kd"] / (t["student"] + t["teacher"])
    lines += [
        f"  student train step               {t['student'] * 1e3:8.2f} ms",
        f"  teacher forward                  {t['teacher'] * 1e3:8.2f} ms",
        f"  live KD step (Distiller, CE+KD)  {t['kd'] * 1e3:8.2f} ms",
        f"  cached-teacher read of a batch   {t['read'] * 1e3:8.2f} ms",
        (f"  (a) live KD step / (student step + teacher forward) = {ratio_a:.3f}  "
        f"(target <= 1.03: {'met' if ratio_a <= 1.03 else 'NOT met'})"),
        f"      cache read / teacher forward = {t['read'] / t['teacher']:.4f}",
    ]

    # ---- (b), (c) whole epochs through the loader; two groups, so that neither the live teacher's
    # memory traffic nor the build's disk writes sit between the two epochs that (b) compares
    t = time_interleaved({"student": epoch_of(loader(), ce_trainer(student())),
                          "cached": epoch_of(loader(), kd_trainer(student(), cached))},
                         steps=1, reps=args.reps, warmup=1, sync=sync)

    def build() -> None:
        build_cache(teacher, x_all, workdir / f"{pair.teacher}_c", targets=y_all, augment=augment, epochs=1,
                    device=device, overwrite=True)

    t.update(time_interleaved({"live": epoch_of(loader(), kd_trainer(student(), FrozenTeacher(teacher))),
                               "build": build}, steps=1, reps=args.reps, warmup=1, sync=sync))
    ratio_b = t["cached"] / t["student"]
    lines += [
        (f"  epoch of {samples} samples: student-only {t['student']:.3f} s, cached KD {t['cached']:.3f} s; "
         f"live KD {t['live']:.3f} s, cache build {t['build']:.3f} s"),
        (f"  (b) cached KD epoch / student-only epoch = {ratio_b:.3f}  "
         f"(target <= 1.15: {'met' if ratio_b <= 1.15 else 'NOT met'})"),
        (f"      live KD epoch / student-only epoch = {t['live'] / t['student']:.3f}; "
         f"cached / live KD epoch = {t['cached'] / t['live']:.3f}"),
        f"  (c) cache build / live KD epoch = {t['build'] / t['live']:.3f}  (one epoch of views; reported)",
    ]

    # ---- throughput switches of the teacher forward
    lines.append("  throughput switches (teacher forward, same batch):")
    lines += switches(pair, teacher, batch.inputs, args.reps * (2 if pair.steps > 1 else 1), pair.steps,
                      args.compile and not args.quick, sync)
    return lines


def torchdistill_line() -> str:
    return ("(d) distill / torchdistill: measured by `make bench-peers` (benchmarks/peers.py, in its own "
            "environment .venv-peers: torchdistill needs the multi-GB torch/torchvision build; "
            "docs/benchmarks.md, section 'peers')")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5, help="repetitions per measurement (median; >= 5 to report)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 repetitions, quarter epochs, no compile")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile of the teacher")
    ap.add_argument("--pairs", default="all", choices=["all", "mnist", "rgb"])
    ap.add_argument("--write-docs", action="store_true", help="record command and output in docs/benchmarks.md")
    args = ap.parse_args()
    if args.quick:
        args.reps = min(args.reps, 2)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    pairs = {"all": PAIRS, "mnist": PAIRS[:1], "rgb": PAIRS[1:]}[args.pairs]
    buf = io.StringIO()
    t0 = time.perf_counter()
    with redirect_stdout(buf), tempfile.TemporaryDirectory() as tmp:
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
            f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
        print(f"torch {torch.__version__}, {where}; medians of {args.reps} interleaved repetitions"
              + (" (quick smoke run)" if args.quick else ""))
        for pair in pairs:
            for line in bench_pair(pair, args, device, sync, Path(tmp)):
                print(line)
        print(torchdistill_line())
        print(f"total wall time {time.perf_counter() - t0:.0f} s")
    print(buf.getvalue(), end="")
    if args.write_docs:
        write_section("speed", buf.getvalue())


if __name__ == "__main__":
    main()
