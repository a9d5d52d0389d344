"""Load a script of ``benchmarks/`` as a module, for the tests of its pure parts (tables, plans, parsing)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` executed as the module ``bench_<name>``; the folder is on ``sys.path`` only
    while it loads (the scripts import their siblings, ``_common`` and ``dense``)."""
    script = BENCHMARKS / f"{name}.py"
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module
