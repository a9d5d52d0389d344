"""CIFAR readers on small files the tests write in the official python-version layout."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.data import CIFARFormatError, get_dataset, load_cifar10, load_cifar100
from distill.recipes import parse_recipe


def _write(path: Path, data: np.ndarray, labels: list[int], label_key: str, bytes_keys: bool) -> None:
    entry = {"data": data, label_key: labels, "filenames": [f"img{i}.png" for i in range(len(labels))]}
    if bytes_keys:  # the official files were written by Python 2: keys are bytes
        entry = {k.encode(): v for k, v in entry.items()}
    path.write_bytes(pickle.dumps(entry, protocol=2))


def make_cifar100(root: Path, n_train: int = 6, n_test: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    train = rng.integers(0, 256, (n_train, 3072), dtype=np.uint8)
    labels = rng.integers(0, 100, n_train).tolist()
    _write(folder / "train", train, labels, "fine_labels", bytes_keys=True)
    _write(folder / "test", rng.integers(0, 256, (n_test, 3072), dtype=np.uint8),
           rng.integers(0, 100, n_test).tolist(), "fine_labels", bytes_keys=True)
    return train, np.array(labels)


def make_cifar10(root: Path, per_batch: int = 2) -> None:
    rng = np.random.default_rng(1)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        _write(folder / name, rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
               rng.integers(0, 10, per_batch).tolist(), "labels", bytes_keys=False)


def test_cifar100_pixels_and_channel_order(tmp_path: Path) -> None:
    raw, labels = make_cifar100(tmp_path)
    x, y = load_cifar100(tmp_path, "train")
    assert x.shape == (6, 3, 32, 32) and x.dtype == torch.float32 and y.tolist() == labels.tolist()
    # pixel (c, h, w) of image i is byte c*1024 + h*32 + w of its row, scaled to [0, 1]
    for i, c, h, w in [(0, 0, 0, 0), (1, 1, 5, 7), (5, 2, 31, 31)]:
        assert x[i, c, h, w].item() == pytest.approx(raw[i, c * 1024 + h * 32 + w] / 255.0)
    assert load_cifar100(tmp_path / "cifar-100-python", "test")[0].shape == (4, 3, 32, 32)


def test_cifar10_concatenates_the_five_training_batches(tmp_path: Path) -> None:
    make_cifar10(tmp_path)
    x, y = load_cifar10(tmp_path, "train")
    assert x.shape == (10, 3, 32, 32) and y.shape == (10,)
    assert load_cifar10(tmp_path, "test")[0].shape == (2, 3, 32, 32)


def test_registry_normalises_with_train_statistics_and_env_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_cifar100(tmp_path)
    monkeypatch.setenv("DISTILL_CIFAR100", str(tmp_path))
    train = get_dataset("cifar100", split="train")
    assert train.num_classes == 100 and train.input_shape == (3, 32, 32)
    assert torch.allclose(train.inputs.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    test = get_dataset("cifar100", split="test")
    assert test.mean == train.mean


def test_missing_and_corrupt_files_are_clear_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISTILL_CIFAR100", raising=False)
    with pytest.raises(FileNotFoundError, match="DISTILL_CIFAR100"):
        load_cifar100(None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_cifar100(tmp_path / "nowhere")
    make_cifar100(tmp_path)
    (tmp_path / "cifar-100-python" / "test").unlink()
    with pytest.raises(FileNotFoundError, match="missing CIFAR-100 file"):
        load_cifar100(tmp_path, "test")
    (tmp_path / "cifar-100-python" / "test").write_bytes(b"not a pickle")
    with pytest.raises(CIFARFormatError):
        load_cifar100(tmp_path, "test")
    _write(tmp_path / "cifar-100-python" / "test", np.zeros((2, 100), np.uint8), [0, 1], "fine_labels", True)
    with pytest.raises(CIFARFormatError, match="3072"):
        load_cifar100(tmp_path, "test")
    with pytest.raises(ValueError, match="splits"):
        load_cifar100(tmp_path, "val")


def test_recipes_accept_cifar(tmp_path: Path) -> None:
    recipe = parse_recipe({"name": "c", "data": {"name": "cifar100", "root": str(tmp_path)},
                           "student": {"name": "resnet8"}, "train": {"epochs": 1}, "kind": "train"})
    assert recipe.data.name == "cifar100"


# kd: the plain case; ofd (margins found from the teacher's BNs), ft (the paraphraser stage) and simkd
# (evaluated through the teacher's classifier) need the models, which recipes reach through bind_models
@pytest.mark.parametrize("method", ["kd", "ofd", "ft", "simkd"])
def test_a_cifar100_recipe_runs_end_to_end_on_generated_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              method: str) -> None:
    """The shipped recipe, shrunk (1 epoch, tiny models), on files in the official format."""
    import yaml

    from distill.runner import run_recipe

    make_cifar100(tmp_path / "data", n_train=16, n_test=8)
    monkeypatch.setenv("DISTILL_CIFAR100", str(tmp_path / "data"))
    shipped = yaml.safe_load((Path(__file__).parent.parent / "recipes" / "cifar100" /
                              f"{method}_resnet32x4_resnet8x4.yaml").read_text())
    one_epoch = {"epochs": 1, "milestones": [1]}
    shipped["student"] = {"name": "resnet8"}
    shipped["teacher"] = {"model": {"name": "resnet8"}, "train": {**shipped["train"], **one_epoch}}
    shipped["train"].update(one_epoch)
    if "hint_stage" in shipped:
        shipped["hint_stage"]["train"].update(one_epoch)
    shipped["seeds"] = [0]
    shipped["data"]["batch_size"] = 8
    dirs = run_recipe(parse_recipe(shipped), out_dir=tmp_path / "runs", progress=False)
    import json

    summary = json.loads((dirs[0] / "summary.json").read_text())
    assert summary["data"]["num_classes"] == 100 and summary["data"]["in_channels"] == 3
    assert summary["last_acc"] is not None and summary["teacher_acc"] is not None
    if "hint_stage" in shipped:
        assert (dirs[0] / "hint_stage" / "metrics.jsonl").is_file()


def test_every_cifar100_recipe_names_a_shipped_teacher_recipe() -> None:
    import yaml

    folder = Path(__file__).parent.parent / "recipes" / "cifar100"
    teachers = {p.stem.removeprefix("teacher_") for p in folder.glob("teacher_*.yaml")}
    recipes = [p for p in folder.glob("*.yaml") if not p.stem.startswith("teacher_")]
    assert len(recipes) >= 4 * 10  # every pair x the registered methods
    for p in recipes:
        r = yaml.safe_load(p.read_text())
        assert r["teacher"]["model"]["name"] in teachers
        assert r["teacher"]["model"]["checkpoint"] == f"runs/cifar100_teacher_{r['teacher']['model']['name']}/seed0/model.safetensors"
