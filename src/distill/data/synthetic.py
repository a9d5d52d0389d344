"""Synthetic data sets: what data-free KD and dataset distillation produce, saved and loaded safely.

A :class:`SyntheticSet` is images ``(N, C, H, W)`` (float32, in the normalised space the models
see), labels (``(N,)`` int64 class indices, or ``(N, K)`` float32 soft labels) and a manifest
(a JSON-serialisable dict: the method, its settings, the source data set or the teacher's
fingerprint, the normalisation). On disk a set is a folder of two files:

* ``synthetic.safetensors``: the tensors ``images`` and ``labels`` (nothing to unpickle);
* ``manifest.json``: the manifest, completed at save time with ``format``, ``count``,
  ``image_shape``, ``num_classes``, ``label_kind``, ``created`` (UTC) and ``distill_version``.

``get_dataset("synthetic", root=FOLDER)`` serves a saved set as a training split and the
manifest's source data set's test split for evaluation, so an ordinary recipe trains on it::

    data: {name: synthetic, root: runs/synth/mnist_herding_ipc10}
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from distill.data.loader import InMemoryLoader

__all__ = ["MANIFEST_FILE", "SYNTHETIC_FILE", "SYNTHETIC_FORMAT", "SyntheticSet", "load_synthetic"]

SYNTHETIC_FILE = "synthetic.safetensors"
MANIFEST_FILE = "manifest.json"
SYNTHETIC_FORMAT = "distill.synthetic/1"


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("distill")
    except Exception:  # not installed as a distribution (a source checkout on PYTHONPATH)
        return "unknown"


@dataclass
class SyntheticSet:
    """A synthetic training set.

    Attributes:
        images: ``(N, C, H, W)`` float32, in the normalised input space of the models
            (``manifest["normalization"]`` gives the per-channel mean/std that maps them back to pixels).
        labels: ``(N,)`` int64 class indices, or ``(N, K)`` float32 soft labels.
        manifest: JSON-serialisable settings; ``"method"`` (a string) is required. Conventional keys:
            ``family`` (``"dataset"`` | ``"data-free"``), ``source`` (``{"dataset": NAME, "root": ...,
            "options": {...}}``: the real set a "dataset" synthesizer condensed, whose test split
            evaluates it), ``teacher`` (``{"fingerprint": sha256, ...}`` for "data-free" ones),
            ``settings`` (the synthesizer's arguments), ``normalization`` (``{"mean": [...],
            "std": [...]}``), ``num_classes``, ``ipc``.
    """

    images: Tensor
    labels: Tensor
    manifest: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        x, y = self.images, self.labels
        if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"SyntheticSet: images must be a float tensor (N, C, H, W); got {got}")
        if not isinstance(y, Tensor):
            raise TypeError(f"SyntheticSet: labels must be a tensor (N,) or (N, K); got {type(y).__name__}")
        hard = y.dim() == 1 and not y.is_floating_point()
        soft = y.dim() == 2 and y.is_floating_point()
        if not (hard or soft):
            raise ValueError(f"SyntheticSet: labels must be int64 (N,) or float (N, K); got {y.dtype} "
                             f"{tuple(y.shape)}")
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"SyntheticSet: {x.shape[0]} images but {y.shape[0]} labels")
        self.images = x.detach().to("cpu", torch.float32).contiguous()
        self.labels = (y.detach().to("cpu", torch.int64) if hard else y.detach().to("cpu", torch.float32)).contiguous()
        if not isinstance(self.manifest, dict) or not isinstance(self.manifest.get("method"), str):
            raise ValueError("SyntheticSet: manifest must be a dict with 'method' (the synthesizer's name); got "
                             f"{self.manifest!r}")
        try:
            json.dumps(self.manifest)
        except (TypeError, ValueError) as e:
            raise ValueError(f"SyntheticSet: manifest must be JSON-serialisable: {e}") from None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def soft_labels(self) -> bool:
        """Whether the labels are ``(N, K)`` soft labels."""
        return self.labels.dim() == 2

    @property
    def num_classes(self) -> int:
        """``K``: the manifest's ``num_classes``, else the soft labels' width or the largest label + 1."""
        if "num_classes" in self.manifest:
            return int(self.manifest["num_classes"])
        if self.soft_labels:
            return int(self.labels.shape[1])
        return int(self.labels.max().item()) + 1 if len(self) else 0

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel ``(mean, std)`` of the manifest (identity when it names none)."""
        c = int(self.images.shape[1])
        norm = self.manifest.get("normalization") or {}
        mean = tuple(float(v) for v in norm.get("mean", (0.0,) * c))
        std = tuple(float(v) for v in norm.get("std", (1.0,) * c))
        return mean, std

    def hard_labels(self) -> Tensor:
        """Class indices ``(N,)``: the labels, or the argmax of soft labels."""
        return self.labels.argmax(1) if self.soft_labels else self.labels

    def loader(self, batch_size: int, shuffle: bool = True, seed: int = 0) -> InMemoryLoader:
        """An :class:`~distill.data.loader.InMemoryLoader` over the set (its epochs are seeded by ``seed``)."""
        from distill.data.loader import InMemoryLoader

        return InMemoryLoader(self.images, self.labels, batch_size, shuffle=shuffle, seed=seed)

    def full_manifest(self) -> dict[str, Any]:
        """The manifest as :meth:`save` writes it (the given keys plus the computed ones)."""
        out = dict(self.manifest)
        mean, std = self.normalization
        out.setdefault("normalization", {"mean": list(mean), "std": list(std)})
        out.update({
            "format": SYNTHETIC_FORMAT,
            "count": len(self),
            "image_shape": list(self.images.shape[1:]),
            "num_classes": self.num_classes,
            "label_kind": "soft" if self.soft_labels else "hard",
        })
        out.setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        out.setdefault("distill_version", _version())
        return out

    def save(self, directory: str | os.PathLike[str], overwrite: bool = False) -> Path:
        """Write ``synthetic.safetensors`` and ``manifest.json`` into ``directory``; returns it.

        Raises:
            FileExistsError: ``directory`` exists and is not empty, and ``overwrite`` is False.
            NotADirectoryError: ``directory`` is a file.
            ValueError: images or labels hold NaN or infinity.
        """
        from safetensors.torch import save as st_save

        from distill.files import atomic_write_bytes, atomic_write_json

        folder = Path(directory)
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(f"SyntheticSet.save: {str(folder)!r} is a file, not a folder")
        if folder.is_dir() and any(folder.iterdir()) and not overwrite:
            raise FileExistsError(f"SyntheticSet.save: {str(folder)!r} already holds files; pass overwrite=True "
                                  "to replace the set in it")
        for name, t in (("images", self.images), ("labels", self.labels)):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"SyntheticSet.save: {name} hold NaN or infinite values")
        manifest = self.full_manifest()
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / SYNTHETIC_FILE,
                           st_save({"images": self.images, "labels": self.labels}, metadata={"format": SYNTHETIC_FORMAT}))
        atomic_write_json(folder / MANIFEST_FILE, manifest)
        self.manifest = manifest
        return folder


def load_synthetic(directory: str | os.PathLike[str]) -> SyntheticSet:
    """Read a set written by :meth:`SyntheticSet.save` (safetensors and JSON only: nothing executes).

    Raises:
        FileNotFoundError: the folder or one of its two files is missing.
        ValueError: a file of another format, or tensors that disagree with the manifest.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    folder = Path(directory)
    if not folder.is_dir():
        raise FileNotFoundError(f"no synthetic set at {str(folder)!r} (a folder written by SyntheticSet.save or "
                                "'distill synth')")
    for name in (SYNTHETIC_FILE, MANIFEST_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{str(folder)!r} has no {name}: not a synthetic set written by SyntheticSet.save")
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{folder / MANIFEST_FILE}: not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != SYNTHETIC_FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"{folder / MANIFEST_FILE}: format {got!r}, expected {SYNTHETIC_FORMAT!r}")
    try:
        tensors = st_load((folder / SYNTHETIC_FILE).read_bytes())
    except SafetensorError as e:
        raise ValueError(f"{folder / SYNTHETIC_FILE}: not a safetensors file: {e}") from None
    if set(tensors) != {"images", "labels"}:
        raise ValueError(f"{folder / SYNTHETIC_FILE}: expected tensors 'images' and 'labels', found {sorted(tensors)}")
    out = SyntheticSet(tensors["images"], tensors["labels"], manifest)
    if len(out) != manifest.get("count") or list(out.images.shape[1:]) != manifest.get("image_shape"):
        raise ValueError(f"{folder}: the tensors {tuple(out.images.shape)} disagree with the manifest "
                         f"(count {manifest.get('count')}, image_shape {manifest.get('image_shape')})")
    norm = manifest.get("normalization", {})
    if any(not math.isfinite(float(v)) for v in [*norm.get("mean", []), *norm.get("std", [])]):
        raise ValueError(f"{folder / MANIFEST_FILE}: normalization holds a non-finite number")
    return out
