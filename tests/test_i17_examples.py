"""The issue-17 examples' ``--quick`` modes run end to end (smoke tests, about 10 s each: the formulas are
proved in tests/test_i17_*.py). Each runs in a temporary folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from _mnist import mnist_dir

ROOT = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.parametrize("script, expect, data", [
    ("adversarial/adversarial_imitation.py", "student + adversarial imitation", None),
    ("explain/additive_explanations.py", "additive student acc", None),
    ("explain/yasenn.py", "class:", None),
    ("face/ddl_verification.py", "student + DDL on degraded pairs", "mnist"),
    ("fewshot/skd_fewshot.py", "Gen-1: 5-way 5-shot", "fashion_mnist"),
    ("longtail/ssd_longtail.py", "soft head: overall", "fashion_mnist"),
    ("transfer/cross_lingual.py", "target student distilled on parallel text", None),
    ("transfer/msdn_zsl.py", "lambda_distill=0.001: ZSL", "fashion_mnist"),
])
def test_example_quick(script: str, expect: str, data: str | None, tmp_path: Path) -> None:
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
