"""Shared helpers of the benchmark scripts: interleaved timing and writing results into the docs."""

from __future__ import annotations

import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def time_interleaved(fns: dict[str, Callable[[], None]], *, steps: int, reps: int, warmup: int = 3,
                     sync: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Median seconds per call of each function, measured round-robin so drift hits all alike.

    ``sync`` waits for queued device work (``torch.cuda.synchronize``) before each clock read.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            sync()
            samples[name].append((time.perf_counter() - t0) / steps)
    return {k: statistics.median(v) for k, v in samples.items()}


def write_section(name: str, output: str) -> None:
    """Replace (or add) the section of ``docs/benchmarks.md`` between this script's markers."""
    command = "python " + " ".join(shlex.quote(a) for a in [f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]])
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n```sh\n{command}\n```\n\n```text\n{output.rstrip()}\n```\n{end}"
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _m: block, text) if pattern.search(text) else text.rstrip() + f"\n\n## {name}\n\n{block}\n"
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    DOCS.write_text(text)


# ----------------------------------------------------------------------------- accuracy-style runs
# The set-up shared by the accuracy benchmarks (accuracy.py, strategies.py): the data subsets, one
# teacher trained once, and runs spread over single-thread worker processes. torch and distill are
# imported inside, so the timing scripts that only need the helpers above stay light.


def load_subsets(data: str, train_subset: int, val_subset: int) -> tuple[Any, Any, Any, Any, Any]:
    """``(train, x, y, val_x, val_y)``: the whole training split (a TensorData), its first
    ``train_subset`` images and labels, and the first ``val_subset`` test images and labels."""
    from distill.data import get_dataset

    train, test = get_dataset(data, split="train"), get_dataset(data, split="test")
    return (train, train.inputs[:train_subset], train.targets[:train_subset],
            test.inputs[:val_subset], test.targets[:val_subset])


def train_teacher(model: str, inputs: Any, targets: Any, val_loader: Any, *, epochs: int, batch_size: int,
                  run_dir: Path, fit_args: dict[str, Any], footsteps: Path | None = None) -> tuple[Any, float]:
    """A zoo ``model`` trained from scratch (seed 0, cross-entropy, crop 2) on ``inputs``/``targets``;
    returns ``(model, last-epoch top-1 on val_loader)``. ``footsteps``: a folder that receives the
    model after every epoch (:func:`~distill.strategies.chain.save_every_epoch`, what Pro-KD follows)."""
    import torch

    import distill
    from distill.data import RandomCropPad
    from distill.data.loader import InMemoryLoader
    from distill.models import create
    from distill.strategies.chain import save_every_epoch

    torch.manual_seed(0)
    teacher = create(model)
    loader = InMemoryLoader(inputs, targets, batch_size, augment=RandomCropPad(2), seed=0)
    r = distill.fit(distill.Distiller(teacher, None, {"ce": 1.0}), loader, val_loader, epochs=epochs,
                    run_dir=run_dir, overwrite=True,  # trained again on purpose (no --reuse)
                    on_epoch_end=save_every_epoch(teacher, footsteps) if footsteps else None,
                    **fit_args)
    return teacher, r.last_acc


def run_pool(fn: Callable[[Any], Any], jobs: list[Any], workers: int, maxtasksperchild: int = 8) -> Iterator[Any]:
    """``fn(job)`` for every job in ``workers`` spawned processes, yielded as each finishes.

    ``fn`` must be a module-level function (spawned workers import it by name) and should set
    ``torch.set_num_threads(1)``: on small models two single-thread processes beat one two-thread one.
    """
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(workers, maxtasksperchild=maxtasksperchild) as pool:
        yield from pool.imap_unordered(fn, jobs)
