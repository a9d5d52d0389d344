"""The issue-13 examples' ``--quick`` modes run end to end on the real MNIST files (smoke tests: a
few synthesis steps and one short evaluation; the formulas are proved in tests/test_synth_*.py).
``examples/synthesis/mtt_mnist.py --quick`` buffers experts for minutes, so it is not run here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from _mnist import mnist_dir

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("example, expect", [
    ("kip_mnist.py", "on kip_fc:"),
    ("inversion_mnist.py", "fast_dfkd: student LeNet-5-half test top-1"),
])
def test_synthesis_example_quick(example: str, expect: str, tmp_path: Path) -> None:
    root = mnist_dir()
    if root is None:
        pytest.skip("MNIST not found beside the repository (../shared/data/mnist) nor in DISTILL_MNIST")
    env = {**os.environ, "DISTILL_MNIST": str(root), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "synthesis" / example), "--quick"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert expect in done.stdout, done.stdout[-3000:]
