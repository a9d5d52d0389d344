"""distill beside torchdistill: the same KD job, the same modules, weights and batches, timed side by side.

Two pairs of the CIFAR-100 zoo (100 classes, 32x32 RGB synthetic batches with a fixed seed, in memory):
ResNet-56 -> ResNet-20 and resnet32x4 -> resnet8x4. The models are distill's zoo modules on BOTH
sides (torchdistill ships ResNet-20/56 for CIFAR -- same layer shapes and parameter counts as ours
-- but not resnet32x4/8x4), deep copies of one teacher and one student initialisation, so only the
framework differs. The job is torchdistill's CIFAR KD sample config: ``KDLoss`` with temperature 4,
alpha 0.9 (loss = 0.9 CE + 0.1 T^2 KL, batchmean), SGD lr 0.1, momentum 0.9, weight decay 1e-4; in
distill ``losses={"ce": 0.9, "kd": KD(T=4, weight=0.1)}`` and the same SGD.

Each framework is driven as its users drive it:

* torchdistill: ``get_distillation_box(teacher, student, dataset_dict, train_config, ...)`` with a
  config dict (an in-memory dataset for its data loader), ``box.pre_epoch_process(epoch=0)``, then
  per batch ``loss = box.forward_process(x, y, supp_dict)`` and ``box.post_forward_process(loss=loss)``
  (its example ``image_classification.py``'s ``train_one_epoch``). Its example builds the teacher
  with ``get_model`` + ``load_ckpt`` and hands it over as built, i.e. in train mode, and nothing in
  torchdistill calls ``teacher.eval()``: that is variant ``td``. Variant ``td_eval`` is the same box
  with ``teacher.eval()`` called by hand first: the framework cost alone.
* distill: ``Distiller(student, teacher, losses)``, ``distiller.train()``, then per batch
  ``out = d(batch)``, ``zero_grad``, ``out.total.backward()``, ``opt.step()``, ``d.step_end()``
  (what ``distill.fit`` does per step); ``live`` with the teacher as given (a
  :class:`~distill.teachers.FrozenTeacher`), ``cached`` with a
  :class:`~distill.cache.CachedTeacher` reading the teacher's logits from a cache built once
  beforehand (``build_cache``; its build time is printed, not counted in the step). torchdistill
  has no teacher cache, so ``cached`` is compared with torchdistill's live step.

A fifth variant, ``student``, is the student's plain CE step, hand-written: the floor of any
cached step. All on the CPU, one thread each (``--threads``), in one process. Every round runs one
training step of each variant, the variants' order rotating from round to round, and every variant
sees the same batch in the same round (after one untimed pass over the batches). A ratio is the
median over the rounds of the two variants' times in the same round (quartiles beside it): on a
shared, loaded machine that pairing is what makes it meaningful. The teacher's ``module.training``
is recorded inside the untimed training steps of each variant by a forward pre-hook (removed before
timing), and whether its BatchNorm running statistics moved by the end.

    python benchmarks/peers.py [--reps 16] [--threads 1] [--pairs all|r56|r32x4]

Needs torchdistill (``make bench-peers`` makes ``.venv-peers`` with it; never part of ``make test``).
"""

from __future__ import annotations

import argparse
import copy
import io
import itertools
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from _common import write_section
from torch import Tensor
from torch.utils.data import Dataset, RandomSampler

import distill
from distill.cache import CachedTeacher, build_cache
from distill.models import create

T, ALPHA = 4.0, 0.9  # torchdistill's CIFAR KD sample config (KDLoss temperature, alpha)
SGD_KW = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4}


@dataclass
class Pair:
    key: str
    teacher: str
    student: str
    batch: int
    batches: int  # distinct batches, cycled: every variant gets the same one in the same round


PAIRS = [Pair("r56", "resnet56", "resnet20", 64, 2), Pair("r32x4", "resnet32x4", "resnet8x4", 32, 2)]
CLASSES = 100


class InMemory(Dataset):
    """The tiny in-memory data set torchdistill's box builds its training loader from."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], int(self.y[i])


def td_box(teacher: torch.nn.Module, student: torch.nn.Module, data: Dataset, batch: int) -> Any:
    """A torchdistill DistillationBox for KD, configured as its CIFAR KD sample config
    (``configs/sample/cifar10/kd/resnet20_from_densenet_bc_k12_depth100-final_run.yaml``) is."""
    from torchdistill.core.distillation import get_distillation_box

    train_config = {
        "num_epochs": 1,
        "train_data_loader": {"dataset_id": "train", "sampler": {"class_or_func": RandomSampler, "kwargs": {}},
                              "kwargs": {"batch_size": batch, "num_workers": 0}},
        # the wrappers (DataParallel, DDP) apply on CUDA devices only: on the CPU the models run as given
        "teacher": {"forward_proc": "forward_batch_only", "sequential": [], "wrapper": "DataParallel",
                    "requires_grad": False, "frozen_modules": []},
        "student": {"forward_proc": "forward_batch_only", "adaptations": None, "sequential": [],
                    "wrapper": "DistributedDataParallel", "requires_grad": True, "frozen_modules": []},
        "optimizer": {"key": "SGD", "kwargs": dict(SGD_KW)},
        "criterion": {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {"kd": {
            "criterion": {"key": "KDLoss", "kwargs": {
                "student_module_path": ".", "student_module_io": "output",
                "teacher_module_path": ".", "teacher_module_io": "output",
                "temperature": T, "alpha": ALPHA, "reduction": "batchmean"}},
            "weight": 1.0}}}},
    }
    box = get_distillation_box(teacher, student, {"train": data}, train_config, torch.device("cpu"), None, False, 1)
    box.pre_epoch_process(epoch=0)
    return box


def td_step(box: Any, batches: list[distill.Batch]) -> Callable[[], Tensor]:
    """One training step of torchdistill's example loop (``train_one_epoch``) per call, cycling the batches."""
    it = itertools.cycle(batches)

    def run() -> Tensor:
        b = next(it)
        loss = box.forward_process(b.inputs, b.targets, {})
        box.post_forward_process(loss=loss)
        return loss

    return run


def distill_step(student: torch.nn.Module, teacher: Any, batches: list[distill.Batch]) -> Callable[[], Tensor]:
    """One training step of distill (what ``distill.fit`` does per batch) per call, cycling the batches."""
    d = distill.Distiller(student, teacher, losses={"ce": ALPHA, "kd": distill.methods.KD(T=T, weight=1 - ALPHA)})
    d.set_epoch(0)
    d.train()
    opt = torch.optim.SGD(d.trainable_parameters(), **SGD_KW)
    it = itertools.cycle(batches)

    def run() -> Tensor:
        out = d(next(it))
        opt.zero_grad(set_to_none=True)
        out.total.backward()
        opt.step()
        d.step_end()
        return out.total

    return run


def student_step(student: torch.nn.Module, batches: list[distill.Batch]) -> Callable[[], Tensor]:
    """The floor of any cached-teacher step: the student's plain CE step, hand-written, no framework."""
    student.train()
    opt = torch.optim.SGD(student.parameters(), **SGD_KW)
    it = itertools.cycle(batches)

    def run() -> Tensor:
        b = next(it)
        loss = torch.nn.functional.cross_entropy(student(b.inputs), b.targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return run


def rounds(fns: dict[str, Callable[[], Any]], reps: int) -> dict[str, list[float]]:
    """Seconds of each call, ``reps`` rounds of one call each; the order rotates every round, so no
    variant always follows the same one (a cache-hungry neighbour, a burst of load)."""
    names = list(fns)
    out: dict[str, list[float]] = {k: [] for k in names}
    for r in range(reps):
        for k in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            fns[k]()
            out[k].append(time.perf_counter() - t0)
    return out


def paired(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Median and quartiles of the per-round ratios a_i / b_i (each pair timed in the same round)."""
    q = statistics.quantiles([x / y for x, y in zip(a, b)], n=4, method="inclusive")
    return q[1], q[0], q[2]


class ModeProbe:
    """Records ``module.training`` of the teacher (and of its first BatchNorm) at each forward."""

    def __init__(self, teacher: torch.nn.Module) -> None:
        self.seen: list[tuple[bool, bool]] = []
        bn = next(m for m in teacher.modules() if isinstance(m, torch.nn.BatchNorm2d))
        self.handle = teacher.register_forward_pre_hook(lambda m, _a: self.seen.append((m.training, bn.training)))

    def close(self) -> str:
        self.handle.remove()
        if not self.seen:
            return "no teacher forward in the step"
        modes = {("train" if a else "eval") + ("" if a == b else f" (BatchNorm {'train' if b else 'eval'})")
                 for a, b in self.seen}
        return " / ".join(sorted(modes)) + " mode"


def bn_moved(before: dict[str, torch.Tensor], teacher: torch.nn.Module) -> bool:
    after = teacher.state_dict()
    return any(not torch.equal(v, after[k]) for k, v in before.items() if "running" in k)


def bench_pair(pair: Pair, reps: int, workdir: Path) -> list[str]:
    g = torch.Generator().manual_seed(0)
    n = pair.batch * pair.batches
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    batches = [distill.Batch(x[i:i + pair.batch], y[i:i + pair.batch], torch.arange(i, i + pair.batch))
               for i in range(0, n, pair.batch)]
    torch.manual_seed(0)
    teacher0 = create(pair.teacher, num_classes=CLASSES)
    student0 = create(pair.student, num_classes=CLASSES)
    # a "trained" teacher's BatchNorm statistics are not the init's 0/1: give them values, so that
    # train-mode (batch statistics) and eval-mode (running statistics) forwards differ as they would
    with torch.no_grad():
        for m in teacher0.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
    teacher0.train()  # as torchdistill's example hands it over: get_model + load_ckpt, never .eval()
    init_t = copy.deepcopy(teacher0.state_dict())

    t0 = time.perf_counter()
    cache = build_cache(copy.deepcopy(teacher0), x, workdir / pair.key, targets=y, overwrite=True)
    build_s = time.perf_counter() - t0

    teachers = {k: copy.deepcopy(teacher0) for k in ("live", "cached", "td", "td_eval")}
    teachers["td_eval"].eval()  # the hand fix a careful torchdistill user applies
    probes = {k: ModeProbe(t) for k, t in teachers.items()}
    data = InMemory(x, y)
    fns: dict[str, Callable[[], float]] = {
        "live": distill_step(copy.deepcopy(student0), teachers["live"], batches),
        "cached": distill_step(copy.deepcopy(student0), CachedTeacher(cache), batches),
        "td": td_step(td_box(teachers["td"], copy.deepcopy(student0), data, pair.batch), batches),
        "td_eval": td_step(td_box(teachers["td_eval"], copy.deepcopy(student0), data, pair.batch), batches),
        "student": student_step(copy.deepcopy(student0), batches),
    }
    first = {}  # one untimed pass over the batches: the mode probes, the losses after the same SGD steps
    for k, fn in fns.items():
        for _ in batches:
            first[k] = float(fn().detach())
    modes = {k: p.close() for k, p in probes.items()}
    samples = rounds(fns, reps)
    step = {k: statistics.median(v) for k, v in samples.items()}
    moved = {k: bn_moved(init_t, teachers[k]) for k in ("live", "td", "td_eval")}

    spread = max(first[k] for k in ("live", "cached", "td_eval")) - min(first[k] for k in ("live", "cached", "td_eval"))
    nt, ns = (sum(p.numel() for p in m.parameters()) for m in (teacher0, student0))
    lines = [
        (f"[{pair.teacher} -> {pair.student}] teacher {nt:,} params, student {ns:,} params; batch {pair.batch}, "
         f"{pair.batches} distinct batches, {reps} timed rounds of one step per variant"),
        "  teacher mode seen inside the training step (forward pre-hook on the teacher):",
        f"    distill live            {modes['live']}; BatchNorm running stats changed: {moved['live']}",
        f"    distill cached          {modes['cached']} (logits read from the cache)",
        f"    torchdistill (as given) {modes['td']}; BatchNorm running stats changed: {moved['td']}",
        f"    torchdistill + .eval()  {modes['td_eval']}; BatchNorm running stats changed: {moved['td_eval']}",
        (f"  loss at the untimed pass's last step (after {pair.batches - 1} SGD step(s) on the same batches): "
         f"distill live {first['live']:.6f}, cached {first['cached']:.6f}, torchdistill + .eval() "
         f"{first['td_eval']:.6f} (max difference {spread:.1e}: {'the same job' if spread < 1e-3 else 'DIFFERENT'}); "
         f"torchdistill as given {first['td']:.6f} (its teacher on batch statistics)"),
        "  time per step, median over the rounds:",
        f"    distill live               {step['live'] * 1e3:8.1f} ms",
        (f"    distill cached             {step['cached'] * 1e3:8.1f} ms   (cache build, once: {build_s:.2f} s "
         f"for {n} samples = {build_s / pair.batches * 1e3:.0f} ms per batch)"),
        f"    torchdistill (as given)    {step['td'] * 1e3:8.1f} ms",
        f"    torchdistill + .eval()     {step['td_eval'] * 1e3:8.1f} ms",
        f"    student alone (CE, no KD)  {step['student'] * 1e3:8.1f} ms   (hand-written: the floor of a cached step)",
    ]
    lines.append("  ratios: median of the rounds' paired ratios [quartiles]")
    for name, goal in (("live", 0.97), ("cached", 0.5)):
        for ref, label in (("td", "torchdistill as given"), ("td_eval", "torchdistill + .eval()")):
            r, lo, hi = paired(samples[name], samples[ref])
            lines.append(f"  distill {name:<6} / {label:<23} = {r:.3f} [{lo:.3f}, {hi:.3f}]  (goal <= {goal}: "
                         f"{'met' if r <= goal else 'NOT met'})")
    r1, lo1, hi1 = paired(samples["cached"], samples["student"])
    r2, lo2, hi2 = paired(samples["student"], samples["td_eval"])
    lines.append(f"  distill cached / student alone = {r1:.3f} [{lo1:.3f}, {hi1:.3f}]; student alone / torchdistill "
                 f"+ .eval() = {r2:.3f} [{lo2:.3f}, {hi2:.3f}] (the least a cached step can take of a live one)")
    return lines


def load() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=16, help="timed rounds of one step per variant (median)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the same for both)")
    ap.add_argument("--pairs", default="all", choices=["all", "r56", "r32x4"])
    ap.add_argument("--write-docs", action="store_true", help="record command and output in docs/benchmarks.md")
    args = ap.parse_args()
    if args.reps < 2:
        raise SystemExit(f"--reps must be >= 2 (quartiles of the rounds' ratios); got {args.reps}")
    try:
        import torchdistill
    except ImportError:
        raise SystemExit("torchdistill is not installed in this environment: `make bench-peers` makes .venv-peers "
                         "with it (torch 2.14.1, torchvision 0.29.1, torchdistill 1.1.5) and runs this script") from None
    torch.set_num_threads(args.threads)
    pairs = PAIRS if args.pairs == "all" else [p for p in PAIRS if p.key == args.pairs]
    buf = io.StringIO()
    t0 = time.perf_counter()
    with redirect_stdout(buf), tempfile.TemporaryDirectory() as tmp:
        print(f"torch {torch.__version__}, torchdistill {torchdistill.__version__}, distill {distill.__version__}; "
              f"{torch.get_num_threads()} thread(s), {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores; {args.reps} interleaved rounds, one step per variant each")
        print(f"load at start: {load()}")
        for pair in pairs:
            for line in bench_pair(pair, args.reps, Path(tmp)):
                print(line, flush=True)
        print(f"load at end: {load()}")
        print(f"total wall time {time.perf_counter() - t0:.0f} s")
    print(buf.getvalue(), end="")
    if args.write_docs:
        write_section("peers", buf.getvalue())


if __name__ == "__main__":
    main()
