"""The issue-16 examples' ``--quick`` modes run end to end (smoke tests: a few steps per model; the
formulas are proved in tests/test_gen_*.py and tests/test_graph_*.py). Each runs in a temporary folder
(its ``runs/`` output lands there) with its feature-net and GAN caches in a temporary ``DISTILL_CACHE``.

``stylegan2_distillation.py`` and ``self_distilled_stylegan.py`` need no optional package (their GANs are
the zoo's); their quick modes train tiny budgets (the feature nets on a few thousand images) so they take
seconds, not the minute and more they took when they trained on all of MNIST.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from _examples import FASHION, run_example_quick

NO_EXTRA = {"generative/stylegan2_distillation.py", "generative/self_distilled_stylegan.py"}


@pytest.mark.parametrize("script, expect, data", [
    ("generative/diffusion_distill.py", "wrote runs/diffusion_distill/samples.png", "mnist"),
    ("generative/stylekd.py", "student L1 to the teacher's image of the same z", "mnist"),
    ("generative/darkgan.py", "top-1 agreement", "fashion_mnist"),
    ("generative/wavelet_kd.py", "student + Wavelet KD", "fashion_mnist"),
    ("generative/r2l.py", "speed-up teacher/student", None),
    ("generative/stylegan2_distillation.py", "the student's edit", "mnist"),
    ("generative/self_distilled_stylegan.py", "filtered, multi-modal truncation psi=0.5: FID", "mnist"),
    ("graph/lsp.py", "student GCN-8 + GNN-SD", None),
    ("graph/hire.py", "student HGNN-16 + HIRE node+rel", None),
    ("graph/graph_free_kd.py", "graph-free KD", None),
])
def test_example_quick(script: str, expect: str, data: str | None, tmp_path: Path) -> None:
    if script.startswith("graph/"):
        pytest.importorskip("torch_geometric")
    elif script not in NO_EXTRA:
        pytest.importorskip("diffusers")
    if script == "generative/self_distilled_stylegan.py" and not FASHION.is_dir():  # its outliers; MNIST too
        pytest.skip(f"Fashion-MNIST not installed at {FASHION} (apt-get install dataset-fashion-mnist)")
    run_example_quick(script, expect, data, tmp_path)
