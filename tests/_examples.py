"""Run an example script's ``--quick`` mode in a temporary folder (the examples' smoke tests)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from _mnist import mnist_dir

ROOT = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")


def run_example_quick(script: str, expect: str, data: str | None, tmp_path: Path) -> None:
    """Run ``examples/<script> --quick`` in ``tmp_path`` (caches in a temporary ``DISTILL_CACHE``) and check it
    exits 0 printing ``expect``; ``data``: ``"mnist"`` or ``"fashion_mnist"`` when the example reads them (the
    test skips, naming the files, when they are absent)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DISTILL_CACHE": str(tmp_path / "cache")}
    if data == "mnist":
        root = mnist_dir()
        if root is None:
            pytest.skip("MNIST not found beside the repository (../shared/data/mnist) nor in DISTILL_MNIST")
        env["DISTILL_MNIST"] = str(root)
    if data == "fashion_mnist" and not FASHION.is_dir():
        pytest.skip(f"Fashion-MNIST not installed at {FASHION} (apt-get install dataset-fashion-mnist)")
    done = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--quick"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert expect in done.stdout, done.stdout[-3000:]
