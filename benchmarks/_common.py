"""Shared helpers of the benchmark scripts: interleaved timing and writing results into the docs."""

from __future__ import annotations

import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

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
