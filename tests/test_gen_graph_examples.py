"""The issue-16 examples' ``--quick`` modes run end to end (smoke tests: a few steps per model; the
formulas are proved in tests/test_gen_*.py and tests/test_graph_*.py). Each runs in a temporary folder
(its ``runs/`` output lands there) with its feature-net and GAN caches in a temporary ``DISTILL_CACHE``.

Left out for time: ``stylegan2_distillation.py --quick`` (~110 s: it trains a teacher GAN and a classifier)
and ``self_distilled_stylegan.py --quick`` (~50 s: two GANs); their strategies run end to end in
tests/test_gen_stylegan2_distillation.py and tests/test_gen_gan.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from _examples import run_example_quick


@pytest.mark.parametrize("script, expect, data", [
    ("generative/diffusion_distill.py", "wrote runs/diffusion_distill/samples.png", "mnist"),
    ("generative/stylekd.py", "student L1 to the teacher's image of the same z", "mnist"),
    ("generative/darkgan.py", "top-1 agreement", "fashion_mnist"),
    ("generative/wavelet_kd.py", "student + Wavelet KD", "fashion_mnist"),
    ("generative/r2l.py", "speed-up teacher/student", None),
    ("graph/lsp.py", "student GCN-8 + GNN-SD", None),
    ("graph/hire.py", "student HGNN-16 + HIRE node+rel", None),
    ("graph/graph_free_kd.py", "graph-free KD", None),
])
def test_example_quick(script: str, expect: str, data: str | None, tmp_path: Path) -> None:
    pytest.importorskip("torch_geometric" if script.startswith("graph/") else "diffusers")
    run_example_quick(script, expect, data, tmp_path)
