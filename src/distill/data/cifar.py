"""CIFAR-10 and CIFAR-100 from the standard "python version" folders, as tensors.

The folders are the ones the data sets' authors distribute (Krizhevsky, "Learning Multiple
Layers of Features from Tiny Images", 2009): ``cifar-10-batches-py/`` with ``data_batch_1``..
``data_batch_5`` and ``test_batch``, and ``cifar-100-python/`` with ``train`` and ``test``. Each
file is a pickled dict with ``data`` (N, 3072) uint8 in channel-major order (R plane, G plane,
B plane of 32x32) and ``labels`` (CIFAR-10) or ``fine_labels`` (CIFAR-100). Nothing is
downloaded: point ``root`` at the folder (or its parent).

The files are pickles. They are read with a restricted unpickler (:func:`distill.files.safe_unpickle`)
that builds only plain containers, numbers, strings and NumPy arrays: a file that names any other
global (``os.system``, a class with ``__reduce__``) is refused with a :class:`CIFARFormatError`
naming the file and the global, and nothing of it runs.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from distill.files import CorruptFileError, safe_unpickle

__all__ = ["CIFARFormatError", "load_cifar10", "load_cifar100"]

_FOLDERS = {10: "cifar-10-batches-py", 100: "cifar-100-python"}
_FILES = {10: {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
          100: {"train": ["train"], "test": ["test"]}}
_LABEL_KEY = {10: "labels", 100: "fine_labels"}
HINT = ("CIFAR cannot be downloaded here: put the official python-version folder ({folder}/) under "
        "a directory and pass it as root (or set {env})")


class CIFARFormatError(ValueError):
    """A CIFAR file that is not the official pickled-dict layout."""


def _resolve(root: str | os.PathLike[str] | None, classes: int) -> Path:
    env = f"DISTILL_CIFAR{classes}"
    folder = _FOLDERS[classes]
    if root is None:
        if env not in os.environ:
            raise FileNotFoundError(f"no CIFAR-{classes} root given and ${env} is unset; "
                                    + HINT.format(folder=folder, env=f"${env}"))
        root = os.environ[env]
    path = Path(root)
    if (path / folder).is_dir():
        path = path / folder
    if not path.is_dir():
        raise FileNotFoundError(f"CIFAR-{classes} directory {str(path)!r} does not exist; "
                                + HINT.format(folder=folder, env=f"${env}"))
    return path


def _read(file: Path, classes: int) -> tuple[np.ndarray, np.ndarray]:
    if not file.is_file():
        raise FileNotFoundError(f"missing CIFAR-{classes} file {str(file)!r}; expected "
                                f"{', '.join(_FILES[classes]['train'] + _FILES[classes]['test'])}")
    try:  # latin1: the official files hold NumPy data pickled by Python 2
        entry = safe_unpickle(file, f"CIFAR-{classes} file", encoding="latin1",
                              remedy="replace it with the official file from the data set's site")
    except CorruptFileError as e:  # unsafe (names a global outside NumPy arrays and builtins) or not a pickle
        raise CIFARFormatError(f"{file}: not a CIFAR pickle: {e}") from None
    if not isinstance(entry, dict):
        raise CIFARFormatError(f"{file}: expected a pickled dict, got {type(entry).__name__}")
    # files written by Python 2 pickle have bytes keys
    entry = {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}
    key = _LABEL_KEY[classes]
    if "data" not in entry or key not in entry:
        raise CIFARFormatError(f"{file}: keys {sorted(entry)} lack 'data' or '{key}'")
    data = np.asarray(entry["data"], dtype=np.uint8)
    labels = np.asarray(entry[key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0]:
        raise CIFARFormatError(f"{file}: data {data.shape} and labels {labels.shape} are not (N, 3072) and (N,)")
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        raise CIFARFormatError(f"{file}: labels outside [0, {classes - 1}]")
    return data, labels


def _load(root: str | os.PathLike[str] | None, split: str, classes: int) -> tuple[Tensor, Tensor]:
    if split not in ("train", "test"):
        raise ValueError(f"CIFAR-{classes} has splits 'train' and 'test'; got {split!r}")
    folder = _resolve(root, classes)
    parts = [_read(folder / name, classes) for name in _FILES[classes][split]]
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    images = torch.from_numpy(data).view(-1, 3, 32, 32).float().div_(255.0)
    return images, torch.from_numpy(labels)


def load_cifar10(root: str | os.PathLike[str] | None = None, split: str = "train") -> tuple[Tensor, Tensor]:
    """CIFAR-10 images ``(N, 3, 32, 32)`` in [0, 1] and labels ``(N,)`` (50,000 train / 10,000 test)."""
    return _load(root, split, 10)


def load_cifar100(root: str | os.PathLike[str] | None = None, split: str = "train") -> tuple[Tensor, Tensor]:
    """CIFAR-100 images ``(N, 3, 32, 32)`` in [0, 1] and fine labels ``(N,)`` (50,000 train / 10,000 test)."""
    return _load(root, split, 100)
