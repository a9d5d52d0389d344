"""The issue-14 examples' ``--quick`` modes run end to end on real MNIST scenes (smoke tests: a few
steps per model; the formulas are proved in tests/test_dense_*.py). The 3D examples need no files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from _mnist import mnist_dir

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("args, expect, needs_mnist", [
    (["dense_gfl.py"], "gfl_teacher: mAP per epoch", True),
    (["dense_seg_detr.py", "--task", "seg"], "seg seg_teacher: last epoch", True),
    (["dense_seg_detr.py", "--task", "detr"], "detr detr_teacher: last epoch", True),
    (["dense_det_kd.py"], "| student + adl |", True),
    (["dense_seg_kd.py"], "| student + skd_holistic |", True),
    (["mono3d_kd.py"], "| student + monodistill |", False),
    (["dense3d_kd.py"], "| lidar_distill 32->16 beams |", False),
])
def test_dense_example_quick(args: list[str], expect: str, needs_mnist: bool, tmp_path: Path) -> None:
    root = mnist_dir()
    if needs_mnist and root is None:
        pytest.skip("MNIST not found beside the repository (../shared/data/mnist) nor in DISTILL_MNIST")
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({"DISTILL_MNIST": str(root)} if root else {})}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "dense" / args[0]), *args[1:], "--quick"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert expect in done.stdout, done.stdout[-3000:]
