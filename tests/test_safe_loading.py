"""Nothing read from disk runs code; damaged files are errors that name them; files are written whole.

A crafted pickle (its ``__reduce__`` opens a marker file for writing, which creates it) is planted
where distill reads: a run's ``last.pt`` before ``fit(resume=True)``, a model file for
``load_model``, a recipe's ``teacher.model.checkpoint``, a chain stage's ``best.pt`` and a CIFAR
``data_batch_1``. Each time the marker must not appear and the error must name the file. Truncated,
empty, garbage and bit-flipped checkpoints are :class:`CheckpointError` naming the file; the
atomic writer leaves no temporary file and removes those of dead processes.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import distill
from distill import Distiller, fit
from distill.data import CIFARFormatError, InMemoryLoader, get_dataset, load_cifar10
from distill.files import (
    CorruptFileError,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    clean_stale_tmp,
    read_json,
    safe_unpickle,
)
from distill.train.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_model,
    rng_state,
    save_checkpoint,
    save_model,
    set_rng_state,
)

# ------------------------------------------------------------------------------------ helpers


class Payload:
    """Unpickling this calls ``open(marker, "w")``: the marker file appears if a reader runs code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (self.marker, "w"))


def plant_torch(path: Path, marker: Path, key: str = "student") -> Path:
    """A torch file whose ``key`` entry is the payload (as an attacker's ``last.pt``/``best.pt``/``model.pt``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({key: Payload(marker), "epoch": 0}, path)
    return path


def named(path: Path) -> str:
    return re.escape(str(path))


def digits(n: int = 64) -> tuple[InMemoryLoader, InMemoryLoader]:
    data = get_dataset("digits")
    return (InMemoryLoader(data.inputs[:n], data.targets[:n], 32, seed=0),
            InMemoryLoader(data.inputs[-64:], data.targets[-64:], 64, shuffle=False))


def tiny_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return distill.models.create("cnn", widths=(4, 8), num_classes=10)


def tensor_record_offset(path: Path) -> int:
    """Byte offset, in a ``torch.save`` zip, of the middle of its largest tensor-data record."""
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if re.search(r"/data/\d+$", i.filename)), key=lambda i: i.file_size)
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len + info.file_size // 2


def flip4(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    for i in range(4):
        raw[offset + i] ^= 0xA5
    path.write_bytes(bytes(raw))


# ------------------------------------------------------------------------------------ malicious files


def test_a_crafted_last_pt_does_not_run_on_resume(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    last = plant_torch(tmp_path / "run" / "checkpoints" / "last.pt", marker, key="distiller")
    train, val = digits()
    with pytest.raises(CheckpointError, match=named(last)) as info:
        fit(Distiller(tiny_cnn(), None, {"ce": 1.0}), train, val, epochs=1, run_dir=tmp_path / "run", resume=True,
            progress=False)
    assert not marker.exists()
    assert "io.open" in str(info.value) or "builtins.open" in str(info.value)  # the global it asked for
    assert "--resume" in str(info.value)  # what to do


def test_a_crafted_model_file_does_not_run_in_load_model(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    bad = plant_torch(tmp_path / "model.pt", marker, key="state_dict")
    for model in (nn.Linear(3, 2), None):
        with pytest.raises(CheckpointError, match=named(bad)):
            load_model(bad, model)
    with pytest.raises(CheckpointError, match=named(bad)):
        load_checkpoint(bad)
    assert not marker.exists()


def test_a_crafted_teacher_checkpoint_in_a_recipe_does_not_run(tmp_path: Path) -> None:
    from distill.recipes import parse_recipe
    from distill.runner import run_recipe

    marker = tmp_path / "pwned"
    bad = plant_torch(tmp_path / "teacher.pt", marker, key="state_dict")
    recipe = parse_recipe({
        "name": "evil", "kind": "distill", "seeds": [0],
        "data": {"name": "digits", "val_split": "val", "train_subset": 64, "batch_size": 32},
        "student": {"name": "cnn_digits_student"},
        "teacher": {"model": {"name": "cnn_digits_teacher", "checkpoint": str(bad)}},
        "losses": {"ce": 1.0, "kd": {"T": 4.0}},
        "train": {"epochs": 1, "device": "cpu"},
    })
    with pytest.raises(CheckpointError, match=named(bad)):
        run_recipe(recipe, out_dir=tmp_path / "runs", progress=False)
    assert not marker.exists()


def test_a_crafted_best_pt_of_a_chain_stage_does_not_run(tmp_path: Path) -> None:
    from distill.strategies.chain import born_again

    train, val = digits()
    kw = {"epochs": 1, "optimizer": "sgd", "lr": 0.05, "progress": False, "hand_over": "best"}
    factory = lambda: distill.models.create("mlp_digits_student")  # noqa: E731
    torch.manual_seed(0)
    born_again(factory, train, val, generations=1, run_dir=tmp_path / "chain", **kw)
    bests = sorted((tmp_path / "chain").rglob("best.pt"))
    assert bests, "the chain wrote no best.pt"
    marker = tmp_path / "pwned"
    bad = plant_torch(bests[0], marker)
    torch.manual_seed(0)
    with pytest.raises(CheckpointError, match=named(bad)):
        born_again(factory, train, val, generations=1, run_dir=tmp_path / "chain", resume=True, **kw)
    assert not marker.exists()


def test_a_crafted_cifar_batch_does_not_run(tmp_path: Path) -> None:
    from test_cifar import make_cifar10

    make_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    bad.write_bytes(pickle.dumps({b"data": Payload(marker), b"labels": [0, 1]}, protocol=2))
    with pytest.raises(CIFARFormatError, match=named(bad)) as info:
        load_cifar10(tmp_path)
    assert not marker.exists()
    assert "io.open" in str(info.value)  # names the refused global
    # what NumPy array reconstruction needs still loads (the other files, and arrays of any protocol)
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        ok = tmp_path / f"ok{protocol}"
        ok.write_bytes(pickle.dumps({b"data": np.arange(6, dtype=np.uint8), b"labels": [1, 2]}, protocol=protocol))
        assert safe_unpickle(ok, encoding="latin1")[b"data"].tolist() == list(range(6))


# ------------------------------------------------------------------------------------ damaged checkpoints


def _good_checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(path, {"epoch": 3, "student": nn.Linear(64, 32).state_dict(), "history": [{"a": 1.0}]})


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "flipped"])
def test_a_damaged_checkpoint_is_an_error_naming_the_file(damage: str, tmp_path: Path) -> None:
    path = _good_checkpoint(tmp_path / "checkpoints" / "last.pt")
    raw = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(raw[: len(raw) * 2 // 3])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "garbage":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    else:
        before = torch.load(path, weights_only=True)["student"]["weight"]
        flip4(path, tensor_record_offset(path))
        after = torch.load(path, weights_only=True)["student"]["weight"]  # torch itself loads it silently
        assert not torch.equal(before, after)
    with pytest.raises(CheckpointError, match=named(path)) as info:
        load_checkpoint(path)
    assert "without --resume" in str(info.value)  # last.pt: what to do


def test_a_bit_flipped_model_file_is_an_error(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Linear(64, 32)
    for name in ("model.safetensors", "model.pt"):
        path = save_model(tmp_path / name, model, name="cnn", metadata={"val_acc": 90.0})
        assert torch.equal(load_model(path, nn.Linear(64, 32))[0].weight, model.weight)
        raw = path.read_bytes()
        offset = tensor_record_offset(path) if name.endswith(".pt") else len(raw) - 64
        flip4(path, offset)
        with pytest.raises(CheckpointError, match=named(path)):
            load_model(path, nn.Linear(64, 32))


def test_model_files_are_safetensors_and_round_trip(tmp_path: Path) -> None:
    from safetensors import safe_open

    model = tiny_cnn()
    path = save_model(tmp_path / "model.safetensors", model, name="cnn", kwargs={"widths": [4, 8], "num_classes": 10},
                      metadata={"label_smoothing": 0.1, "val_acc": 55.5})
    with safe_open(str(path), "pt") as f:  # a plain safetensors file: any reader can open it
        assert set(f.keys()) == set(model.state_dict())
    rebuilt, meta = load_model(path)  # rebuilt from the zoo by the name and kwargs in its header
    assert meta == {"label_smoothing": 0.1, "val_acc": 55.5} and rebuilt.distill_metadata == meta
    for k, v in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[k], v), k
    # an old model.pt (torch file without a checksum) still loads, weights-only
    old = tmp_path / "old.pt"
    torch.save({"format": "distill.model/1", "model": None, "kwargs": {}, "state_dict": model.state_dict(),
                "metadata": {"epochs": 3}}, old)
    assert load_model(old, tiny_cnn(1))[1] == {"epochs": 3}


def test_a_payload_a_weights_only_load_refuses_is_not_written(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"\['rng'\].*ndarray"):
        save_checkpoint(tmp_path / "last.pt", {"rng": np.zeros(3)})
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------ RNG state


def test_last_pt_rng_state_round_trips_exactly_and_loads_weights_only(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # a cached gaussian in Python's state
    np.random.standard_normal()  # and in NumPy's
    path = save_checkpoint(tmp_path / "last.pt", {"rng": rng_state()})
    expected = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.standard_normal(),
                torch.rand(3).tolist())
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    torch.load(path, weights_only=True)  # no NumPy (or any other) global is needed
    set_rng_state(load_checkpoint(path)["rng"])
    got = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.standard_normal(),
           torch.rand(3).tolist())
    assert got == expected


def test_an_old_last_pt_with_numpy_rng_state_still_resumes(tmp_path: Path) -> None:
    np.random.seed(5)
    random.seed(5)
    old = {"rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}}
    torch.save(old, tmp_path / "last.pt")  # as distill wrote it before: no checksum, NumPy arrays
    expected = np.random.rand(2).tolist()
    np.random.seed(0)
    set_rng_state(load_checkpoint(tmp_path / "last.pt")["rng"])
    assert np.random.rand(2).tolist() == expected


# ------------------------------------------------------------------------------------ atomic files


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(proc.stdout)


def test_atomic_writes_leave_no_tmp_and_keep_the_old_file_on_failure(tmp_path: Path) -> None:
    atomic_write_json(tmp_path / "summary.json", {"a": 1})
    atomic_write_text(tmp_path / "report.md", "# r\n")
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    save_checkpoint(tmp_path / "last.pt", {"epoch": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.bin", "last.pt", "report.md", "summary.json"]
    with pytest.raises(TypeError):  # not JSON: nothing is written, the old file stays
        atomic_write_json(tmp_path / "summary.json", {"a": object()})
    assert json.loads((tmp_path / "summary.json").read_text()) == {"a": 1}
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path / "last.pt", {"epoch": object()})
    assert load_checkpoint(tmp_path / "last.pt") == {"epoch": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.bin", "last.pt", "report.md", "summary.json"]


def test_stale_tmp_files_of_dead_processes_are_removed(tmp_path: Path) -> None:
    dead = _dead_pid()
    stale = [tmp_path / f"last.pt.{dead}.tmp", tmp_path / f"last.pt.{dead}-01234567.tmp",
             tmp_path / f"summary.json.{dead}.tmp"]
    live = tmp_path / f"last.pt.{os.getpid()}-12345678.tmp"  # this process's: maybe a write under way
    old = tmp_path / f"best.pt.{os.getpid()}.tmp"
    other = tmp_path / "notes.tmp"  # not an atomic write's name: never touched
    for p in [*stale, live, old, other]:
        p.write_bytes(b"partial")
    os.utime(old, (1, 1))  # older than a day: stale whoever wrote it
    save_checkpoint(tmp_path / "last.pt", {"epoch": 0})  # a write of last.pt cleans last.pt's stale temporaries
    assert not stale[0].exists() and not stale[1].exists() and stale[2].exists() and live.exists()
    removed = clean_stale_tmp(tmp_path)
    assert removed == sorted([stale[2], old])
    assert live.exists() and other.exists() and (tmp_path / "last.pt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["last.pt", live.name, other.name])


# ------------------------------------------------------------------------------------ JSON files


def test_a_truncated_json_file_is_an_error_naming_it(tmp_path: Path) -> None:
    path = atomic_write_json(tmp_path / "summary.json", {"name": "kd", "last_acc": 91.5})
    path.write_text(path.read_text()[:12])
    with pytest.raises(CorruptFileError, match=named(path)):
        read_json(path, "run summary")
    from distill.report import read_run

    with pytest.raises(ValueError, match=named(path)):
        read_run(tmp_path)


def test_a_truncated_teacher_spec_is_an_error_naming_it(tmp_path: Path) -> None:
    from distill.recipes import parse_recipe
    from distill.runner import MODEL_FILE, run_recipe

    recipe = parse_recipe({
        "name": "spec", "kind": "distill", "seeds": [0],
        "data": {"name": "digits", "val_split": "val", "train_subset": 64, "batch_size": 32},
        "student": {"name": "cnn_digits_student"},
        "teacher": {"model": {"name": "cnn_digits_teacher"}, "train": {"epochs": 1, "device": "cpu"}},
        "losses": {"ce": 1.0, "kd": {"T": 4.0}},
        "train": {"epochs": 1, "device": "cpu"},
    })
    tdir = tmp_path / "spec" / "teacher"
    save_model(tdir / MODEL_FILE, nn.Linear(2, 2))  # only its presence matters here
    spec = tdir / "teacher_spec.json"
    spec.write_text('{"model": {"name": "cnn_digi')  # a write cut off mid-way
    with pytest.raises(CorruptFileError, match=named(spec)):
        run_recipe(recipe, out_dir=tmp_path, progress=False)
