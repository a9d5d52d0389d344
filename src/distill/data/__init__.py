"""Data: embedded and IDX data sets as tensors, a fast in-memory loader, batched augmentation.

Typical use::

    from distill.data import get_dataset, InMemoryLoader, RandomCropPad

    train = get_dataset("digits", split="train")
    loader = train.loader(128, augment=RandomCropPad(1), seed=0)
    for epoch in range(epochs):
        loader.set_epoch(epoch)  # the order of each epoch is a function of (seed, epoch)
        for batch in loader:
            ...
"""

from distill.data.cifar import CIFARFormatError, load_cifar10, load_cifar100
from distill.data.augment import Augment, Compose, Mixup, RandomCropPad, RandomHorizontalFlip
from distill.data.loader import IndexedTensorDataset, InMemoryLoader
from distill.data.sources import (
    DigitsSplit,
    IDXFormatError,
    TensorData,
    get_dataset,
    list_datasets,
    load_digits_split,
    load_fashion_mnist,
    load_mnist,
    read_idx,
    register_dataset,
)
from distill.data.scenes import SceneLoader, SceneSet, make_scenes  # registers the "*_scenes" data sets
from distill.data.pointscenes import PointSceneSet, make_point_scenes  # registers "lidar_scenes"
from distill.data.text import (
    Passage,
    TokenLoader,
    chat_prompts,
    pack_causal,
    prompt_completion,
    split_passages,
    stdlib_docstrings,
)

__all__ = [
    "CIFARFormatError",
    "load_cifar10",
    "load_cifar100",
    "Augment",
    "Compose",
    "Mixup",
    "DigitsSplit",
    "IDXFormatError",
    "InMemoryLoader",
    "IndexedTensorDataset",
    "RandomCropPad",
    "RandomHorizontalFlip",
    "TensorData",
    "get_dataset",
    "list_datasets",
    "load_digits_split",
    "load_fashion_mnist",
    "load_mnist",
    "read_idx",
    "register_dataset",
    "SceneLoader",
    "SceneSet",
    "make_scenes",
    "PointSceneSet",
    "make_point_scenes",
    "Passage",
    "TokenLoader",
    "chat_prompts",
    "pack_causal",
    "prompt_completion",
    "split_passages",
    "stdlib_docstrings",
]
