"""Data sets as in-memory tensors: scikit-learn digits, MNIST and Fashion-MNIST (IDX files).

Everything here returns float images ``(N, C, H, W)`` and int64 labels ``(N,)``. The
:func:`get_dataset` registry adds per-channel normalisation with statistics computed on the
data set's *train* split, so train and evaluation splits share one transform.
"""

from __future__ import annotations

import difflib
import gzip
import math
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from distill.data.loader import InMemoryLoader

__all__ = [
    "DigitsSplit",
    "IDXFormatError",
    "TensorData",
    "get_dataset",
    "list_datasets",
    "load_digits_split",
    "load_fashion_mnist",
    "load_mnist",
    "read_idx",
    "register_dataset",
]

# --------------------------------------------------------------------------------------------
# IDX files
# --------------------------------------------------------------------------------------------

# IDX type byte -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT").
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


class IDXFormatError(ValueError):
    """An IDX file that is truncated, corrupt or not IDX at all."""


def read_idx(path: str | os.PathLike[str]) -> Tensor:
    """Read an IDX file (the MNIST format), gzipped or not, into a tensor.

    Compression is detected from the content, not the file name. The header gives the element
    type and the dimensions, e.g. ``(60000, 28, 28)`` uint8 for MNIST training images and
    ``(60000,)`` uint8 for its labels.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        IDXFormatError: bad magic number, unknown type code, or a payload shorter or longer
            than the header announces (also for a damaged gzip stream).
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as e:
            raise IDXFormatError(f"{path}: damaged gzip stream ({e}); re-download the file") from e

    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise IDXFormatError(
            f"{path}: not an IDX file (magic number {raw[:4].hex() or 'missing'}; "
            "expected 0000 followed by a type byte and a dimension count)"
        )
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise IDXFormatError(f"{path}: unknown IDX type code 0x{code:02X}; expected one of {known}")
    if ndim == 0:
        raise IDXFormatError(f"{path}: IDX header declares 0 dimensions; expected at least 1")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IDXFormatError(f"{path}: truncated header ({len(raw)} bytes, expected {header} for {ndim} dims)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = _IDX_DTYPES[code]
    expected = math.prod(dims) * dtype.itemsize
    got = len(raw) - header
    if got != expected:
        what = "truncated" if got < expected else "has trailing bytes"
        raise IDXFormatError(
            f"{path}: {what}: header announces shape {dims} ({expected} data bytes) but the file holds {got}"
        )
    # astype to the native dtype copies, so the tensor owns writable memory.
    array = np.frombuffer(raw, dtype=dtype, count=math.prod(dims), offset=header)
    array = array.astype(dtype.newbyteorder("="))
    return torch.from_numpy(array.reshape(dims))


# --------------------------------------------------------------------------------------------
# MNIST-format directories
# --------------------------------------------------------------------------------------------

_SPLIT_PREFIX = {"train": "train", "test": "t10k"}
MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
_MNIST_HINT = (
    "expected the files " + ", ".join(MNIST_FILES) + " (gzipped or not); "
    "pass root= or set DISTILL_MNIST to the directory that holds them"
)
FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
_FASHION_HINT = (
    "install them with `apt-get install -y dataset-fashion-mnist` (Debian/Ubuntu, files land in "
    f"{FASHION_MNIST_ROOT}) or pass root= to a directory with the four MNIST-format files"
)


def _find_idx_file(root: Path, prefix: str, kind: str, hint: str) -> Path:
    """``root/<prefix>-<kind>-ubyte`` in any of its common spellings, e.g. ``train-images-idx3-ubyte.gz``."""
    # Both "train-images-idx3-ubyte" and the "train-images.idx3-ubyte" spelling some mirrors use.
    stems = [f"{prefix}-{kind}-ubyte", f"{prefix}-{kind.replace('-', '.')}-ubyte"]
    for stem in stems:
        for name in (stem, stem + ".gz"):
            if (root / name).is_file():
                return root / name
    raise FileNotFoundError(f"no {stems[0]}[.gz] in {root}; {hint}")


def _load_idx_split(root: str | os.PathLike[str], split: str, hint: str) -> tuple[Tensor, Tensor]:
    if split not in _SPLIT_PREFIX:
        raise ValueError(f"split must be one of {sorted(_SPLIT_PREFIX)}; got {split!r}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data directory {root} does not exist; {hint}")
    prefix = _SPLIT_PREFIX[split]
    images_path = _find_idx_file(root, prefix, "images-idx3", hint)
    labels_path = _find_idx_file(root, prefix, "labels-idx1", hint)
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dim() != 3 or images.dtype != torch.uint8:
        raise IDXFormatError(
            f"{images_path}: expected uint8 images (N, H, W); got {images.dtype} {tuple(images.shape)}"
        )
    if labels.dim() != 1:
        raise IDXFormatError(f"{labels_path}: expected labels (N,); got shape {tuple(labels.shape)}")
    if images.shape[0] != labels.shape[0]:
        raise IDXFormatError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} {labels.shape[0]} labels"
        )
    # (N, H, W) uint8 -> (N, 1, H, W) float in [0, 1]
    return images.unsqueeze(1).float().div_(255.0), labels.long()


def load_mnist(root: str | os.PathLike[str], split: str = "train") -> tuple[Tensor, Tensor]:
    """MNIST (or any MNIST-format directory) as images ``(N, 1, 28, 28)`` in [0, 1] and labels ``(N,)``.

    ``split`` is ``"train"`` (60,000 samples) or ``"test"`` (10,000, the ``t10k-*`` files).

    Raises:
        FileNotFoundError: the directory or one of its files is missing; names the expected files.
    """
    return _load_idx_split(root, split, _MNIST_HINT)


def load_fashion_mnist(
    root: str | os.PathLike[str] | None = None, split: str = "train"
) -> tuple[Tensor, Tensor]:
    """Fashion-MNIST, same layout as :func:`load_mnist`; ``root`` defaults to the Debian package's directory."""
    return _load_idx_split(FASHION_MNIST_ROOT if root is None else root, split, _FASHION_HINT)


def _default_mnist_root() -> Path:
    env = os.environ.get("DISTILL_MNIST")
    if env:
        return Path(env)  # an explicit setting wins, even if wrong: the error then names it
    candidate = Path.cwd() / ".." / "shared" / "data" / "mnist"
    if candidate.is_dir():
        return candidate.resolve()
    raise FileNotFoundError(
        f"no MNIST directory: DISTILL_MNIST is unset and {candidate.resolve()} does not exist; {_MNIST_HINT}"
    )


# --------------------------------------------------------------------------------------------
# scikit-learn digits
# --------------------------------------------------------------------------------------------


class DigitsSplit(NamedTuple):
    """Train/validation tensors of the digits set: images ``(N, 1, 8, 8)`` in [0, 1], labels ``(N,)``."""

    train_inputs: Tensor
    train_targets: Tensor
    val_inputs: Tensor
    val_targets: Tensor


@lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images.astype(np.float32) / 16.0, bunch.target.astype(np.int64)  # pixels are 0..16


def load_digits_split(val_fraction: float = 0.25, seed: int = 0) -> DigitsSplit:
    """scikit-learn's 1,797 8x8 digits, split stratified by class into train and validation.

    Ships with scikit-learn, so it needs no download. The split is a pure function of
    ``(val_fraction, seed)``; every class keeps its share in both parts.
    """
    if not 0.0 < float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1); got {val_fraction!r}")
    from sklearn.model_selection import train_test_split

    images, labels = _digits_arrays()
    position = np.arange(len(labels))
    train_pos, val_pos = train_test_split(position, test_size=val_fraction, random_state=seed, stratify=labels)
    # Sorting keeps the data-set order inside each part, so the split does not double as a shuffle.
    train_pos, val_pos = np.sort(train_pos), np.sort(val_pos)

    def take(pos: np.ndarray) -> tuple[Tensor, Tensor]:
        return torch.from_numpy(images[pos]).unsqueeze(1), torch.from_numpy(labels[pos])

    return DigitsSplit(*take(train_pos), *take(val_pos))


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


@dataclass
class TensorData:
    """A whole split in memory, already normalised.

    Attributes:
        inputs: float images ``(N, C, H, W)``: pixels in [0, 1], then ``(x - mean) / std`` per channel.
        targets: int64 labels ``(N,)``.
        num_classes: number of classes ``K``.
        name: registry name, e.g. ``"mnist"``.
        split: ``"train"``, ``"val"`` or ``"test"``.
        mean, std: per-channel statistics of the [0, 1] *train* images that were applied
            (``(0.0,)`` and ``(1.0,)`` per channel when not normalised).
    """

    inputs: Tensor
    targets: Tensor
    num_classes: int
    name: str
    split: str = "train"
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample, ``(C, H, W)``."""
        return tuple(self.inputs.shape[1:])

    def denormalize(self, x: Tensor) -> Tensor:
        """Map normalised images ``(B, C, H, W)`` back to [0, 1] pixels."""
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return x * std + mean

    def loader(self, batch_size: int, **kwargs: Any) -> InMemoryLoader:
        """An :class:`~distill.data.loader.InMemoryLoader` over this split (kwargs pass through)."""
        from distill.data.loader import InMemoryLoader  # local: loader.py must not depend on sources.py

        return InMemoryLoader(self.inputs, self.targets, batch_size, **kwargs)


@dataclass(frozen=True)
class _DatasetSpec:
    num_classes: int
    splits: tuple[str, ...]
    load: Callable[..., tuple[Tensor, Tensor]]  # (root, split, **kwargs) -> raw [0, 1] images, labels
    default_root: Callable[[], Path | None]
    split_aliases: tuple[tuple[str, str], ...] = ()


def _load_digits(
    root: Path | None, split: str, val_fraction: float = 0.25, seed: int = 0
) -> tuple[Tensor, Tensor]:
    s = load_digits_split(val_fraction, seed)
    return (s.train_inputs, s.train_targets) if split == "train" else (s.val_inputs, s.val_targets)


def _load_mnist(root: Path, split: str) -> tuple[Tensor, Tensor]:
    return load_mnist(root, split)


def _load_fashion(root: Path, split: str) -> tuple[Tensor, Tensor]:
    return load_fashion_mnist(root, split)


def _default_fashion_root() -> Path:
    env = os.environ.get("DISTILL_FASHION_MNIST")
    return Path(env) if env else FASHION_MNIST_ROOT


def _load_cifar10(root: Path | None, split: str) -> tuple[Tensor, Tensor]:
    from distill.data.cifar import load_cifar10

    return load_cifar10(root, split)


def _load_cifar100(root: Path | None, split: str) -> tuple[Tensor, Tensor]:
    from distill.data.cifar import load_cifar100

    return load_cifar100(root, split)


_DATASETS: dict[str, _DatasetSpec] = {
    # digits has no separate test split: "test" means the held-out validation part.
    "digits": _DatasetSpec(10, ("train", "val"), _load_digits, lambda: None, (("test", "val"),)),
    "mnist": _DatasetSpec(10, ("train", "test"), _load_mnist, _default_mnist_root),
    "fashion_mnist": _DatasetSpec(10, ("train", "test"), _load_fashion, _default_fashion_root),
    # CIFAR roots default to $DISTILL_CIFAR10 / $DISTILL_CIFAR100 (resolved by distill.data.cifar)
    "cifar10": _DatasetSpec(10, ("train", "test"), _load_cifar10, lambda: None),
    "cifar100": _DatasetSpec(100, ("train", "test"), _load_cifar100, lambda: None),
}


def list_datasets() -> list[str]:
    """Names :func:`get_dataset` accepts."""
    return sorted([*_DATASETS, *_BUILDERS, "synthetic"])


# data sets of a richer kind than (images, labels), each built by its own module, which registers
# itself on import (``distill.data`` imports them): the scene sets of distill.data.scenes
_BUILDERS: dict[str, Callable[..., Any]] = {}


def register_dataset(name: str, build: Callable[..., Any]) -> None:
    """Let :func:`get_dataset` build data set ``name`` as ``build(root, split, normalize, **kwargs)``
    (e.g. ``"mnist_scenes"``: a :class:`~distill.data.scenes.SceneSet`). Registering a taken name raises."""
    if name in _DATASETS or name == "synthetic" or (name in _BUILDERS and _BUILDERS[name] is not build):
        raise ValueError(f"a data set named {name!r} is already registered")
    _BUILDERS[name] = build


def _get_synthetic(root: str | os.PathLike[str] | None, split: str, normalize: bool, kwargs: dict[str, Any]) -> TensorData:
    """A set saved by :meth:`~distill.data.synthetic.SyntheticSet.save`: its images as the train
    split; any other split is the manifest's source data set's (normalised the same way)."""
    from distill.data.synthetic import load_synthetic

    if root is None:
        raise ValueError("data set 'synthetic' needs root=FOLDER, a synthetic set written by SyntheticSet.save "
                         "or 'distill synth'")
    if kwargs:
        raise TypeError(f"data set 'synthetic' got unexpected options {sorted(kwargs)}")
    s = load_synthetic(root)
    mean, std = s.normalization
    if split == "train":
        x = s.images
        if not normalize:  # back to pixels
            x = x * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
            mean, std = (0.0,) * len(mean), (1.0,) * len(std)
        return TensorData(x, s.labels, s.num_classes, "synthetic", "train", mean, std)
    source = s.manifest.get("source") or {}
    if not isinstance(source, dict) or not source.get("dataset"):
        raise ValueError(f"the synthetic set at {str(root)!r} names no source data set (manifest 'source'), so it has "
                         f"no {split!r} split: evaluate it on a data set of your own")
    held_out = get_dataset(source["dataset"], source.get("root"), split, normalize, **(source.get("options") or {}))
    if normalize and any(abs(a - b) > 1e-5 * max(1.0, abs(b)) for a, b in zip((*held_out.mean, *held_out.std),
                                                                            (*mean, *std))):
        raise ValueError(f"the synthetic set at {str(root)!r} was normalised with mean {mean}, std {std} but its "
                         f"source {source['dataset']!r} now gives mean {held_out.mean}, std {held_out.std}: its "
                         "images and the held-out split would live in different spaces")
    return held_out


Stats = tuple[tuple[float, ...], tuple[float, ...]]
_STATS_CACHE: dict[tuple[Any, ...], Stats] = {}


def _channel_stats(x: Tensor) -> Stats:
    """Per-channel mean and std of images ``(N, C, H, W)``, accumulated in float64."""
    x64 = x.double()
    mean = x64.mean(dim=(0, 2, 3))
    std = x64.std(dim=(0, 2, 3)).clamp_min(1e-8)  # a constant channel must not divide by zero
    return tuple(mean.tolist()), tuple(std.tolist())


def _train_stats(name: str, root: Path | None, kwargs: dict[str, Any], train_x: Tensor | None) -> Stats:
    """Statistics of the train split, cached because evaluation splits need them too."""
    key = (name, None if root is None else str(root), tuple(sorted(kwargs.items())))
    if key not in _STATS_CACHE:
        if train_x is None:
            train_x, _ = _DATASETS[name].load(root, "train", **kwargs)
        _STATS_CACHE[key] = _channel_stats(train_x)
    return _STATS_CACHE[key]


def get_dataset(
    name: str,
    root: str | os.PathLike[str] | None = None,
    split: str = "train",
    normalize: bool = True,
    **kwargs: Any,
) -> TensorData:
    """Load a registered data set split into memory.

    Args:
        name: ``"digits"`` (embedded, no download), ``"mnist"``, ``"fashion_mnist"``, ``"cifar10"``
            or ``"cifar100"`` (the official python-version folders; root or ``$DISTILL_CIFAR10/100``).
            ``"mnist_scenes"``, ``"fashion_scenes"``, ``"digits_scenes"``: detection / segmentation
            scenes (:func:`distill.data.scenes.make_scenes`, whose options kwargs pass to), returned as
            a :class:`~distill.data.scenes.SceneSet`, normalised with the train split's statistics.
            ``"lidar_scenes"``: the 3D point scenes (:func:`distill.data.pointscenes.lidar_scenes`),
            a :class:`~distill.data.pointscenes.PointSceneSet`, not normalised.
        root: directory of the IDX files. Defaults: mnist → ``$DISTILL_MNIST``, else
            ``../shared/data/mnist`` relative to the working directory; fashion_mnist →
            ``$DISTILL_FASHION_MNIST``, else ``/usr/share/datasets/fashion-mnist``. Ignored by digits.
            ``"synthetic"``: the folder of a set saved by ``SyntheticSet.save`` (``distill synth``); its
            train split is the set, any other split its manifest's source data set's.
        split: ``"train"`` or ``"test"`` (mnist, fashion_mnist); ``"train"`` or ``"val"``
            (digits; ``"test"`` is accepted as ``"val"``).
        normalize: standardise each channel with the train split's mean/std.
        kwargs: data-set options; digits takes ``val_fraction`` and ``seed``.

    Raises:
        KeyError: unknown name (lists the known ones).
        ValueError: unknown split.
        FileNotFoundError: data files missing (says how to get them).
    """
    if name == "synthetic":
        return _get_synthetic(root, split, normalize, kwargs)
    if name in _BUILDERS:  # e.g. "mnist_scenes" (distill.data.scenes): its own type, its own options
        return _BUILDERS[name](root, split, normalize, **kwargs)
    if name not in _DATASETS:
        close = difflib.get_close_matches(str(name), _DATASETS, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"unknown data set {name!r}; known: {', '.join(list_datasets())}{hint}")
    spec = _DATASETS[name]
    split = dict(spec.split_aliases).get(split, split)
    if split not in spec.splits:
        raise ValueError(f"data set {name!r} has splits {list(spec.splits)}; got split={split!r}")
    if name == "digits":
        resolved: Path | None = None
        unknown = set(kwargs) - {"val_fraction", "seed"}
    else:
        resolved = Path(root) if root is not None else spec.default_root()
        unknown = set(kwargs)
    if unknown:
        raise TypeError(f"data set {name!r} got unexpected options {sorted(unknown)}")

    x, y = spec.load(resolved, split, **kwargs)
    channels = x.shape[1]
    if normalize:
        mean, std = _train_stats(name, resolved, kwargs, x if split == "train" else None)
        # Normalised once here, so loaders and models never repeat the per-batch arithmetic.
        x = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    else:
        mean, std = (0.0,) * channels, (1.0,) * channels
    return TensorData(x, y, spec.num_classes, name, split, mean, std)
