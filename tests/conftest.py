"""Test-wide settings: one torch thread (the models are tiny; on a busy 2-core machine more
threads contend and slow every step many times over)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
