"""A frame-labelling task on real pixels: digit images laid side by side, each image column a frame.

Speech frames (the acoustic-model setting of Lu et al. 2017 and Tang et al. 2016) are not available
offline; this is the closest honest small task. A sequence is ``digits_per_seq`` real digit images
(scikit-learn's 8x8 digits, or MNIST's 28x28) placed left to right; frame ``t`` is the ``t``-th
pixel column (``H`` features) and its label the class of the digit that column belongs to. Like a
speech frame, one column is ambiguous on its own (blank edge columns, strokes shared by classes):
a model needs the neighbouring frames, which the DNN teacher gets from a context window and an
RNN from its recurrence. Training sequences use training images only, test sequences held-out
images only.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from distill.batch import as_batch
from distill.data.loader import InMemoryLoader

__all__ = ["FrameTask", "frame_accuracy", "frame_sequences", "make_frame_task"]

IGNORE = -100  # a frame label that carries no loss (padding)


@dataclass
class FrameTask:
    """Train and test frame sequences.

    Attributes:
        train_inputs, test_inputs: frames ``(N, T, F)`` (float, pixel columns normalised by the
            training mean and std per feature).
        train_targets, test_targets: frame labels ``(N, T)`` (int64).
        num_classes: ``K`` (10).
        in_features: ``F`` (pixel rows per column).
    """

    train_inputs: Tensor
    train_targets: Tensor
    test_inputs: Tensor
    test_targets: Tensor
    num_classes: int
    in_features: int

    def loaders(self, batch_size: int = 32, seed: int = 0) -> tuple[InMemoryLoader, InMemoryLoader]:
        """``(train, test)`` in-memory loaders (the training one shuffled with ``seed``)."""
        return (InMemoryLoader(self.train_inputs, self.train_targets, batch_size, shuffle=True, seed=seed),
                InMemoryLoader(self.test_inputs, self.test_targets, batch_size, shuffle=False))


def frame_sequences(images: Tensor, labels: Tensor, num_sequences: int, digits_per_seq: int,
                    generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Sequences of ``digits_per_seq`` images drawn with replacement, laid side by side.

    ``images``: ``(N, 1, H, W)`` or ``(N, H, W)``; ``labels``: ``(N,)``. Returns frames
    ``(S, digits_per_seq·W, H)`` (column ``t`` of the strip is frame ``t``) and frame labels
    ``(S, digits_per_seq·W)``.
    """
    if images.dim() == 4:
        images = images[:, 0]
    if images.dim() != 3 or labels.shape != images.shape[:1]:
        raise ValueError(f"frame_sequences needs images (N, H, W) and labels (N,); got {tuple(images.shape)} and "
                         f"{tuple(labels.shape)}")
    for name, value in (("num_sequences", num_sequences), ("digits_per_seq", digits_per_seq)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int; got {value!r}")
    n, h, w = images.shape
    pick = torch.randint(n, (num_sequences, digits_per_seq), generator=generator)  # (S, k)
    columns = images[pick].float().transpose(-1, -2)  # (S, k, W, H): each image's columns as frames
    frames = columns.reshape(num_sequences, digits_per_seq * w, h)
    targets = labels[pick].long().repeat_interleave(w, dim=1)  # (S, k·W)
    return frames, targets


def make_frame_task(source: str = "digits", num_train: int = 600, num_test: int = 200, digits_per_seq: int = 4,
                    seed: int = 0, mnist_root: str | None = None) -> FrameTask:
    """Build the frame-labelling task from real digit images.

    Args:
        source: ``"digits"`` (scikit-learn's 1,797 8x8 images, split 75/25 stratified: 8 features
            per frame) or ``"mnist"`` (28x28, train/test files of ``mnist_root``, default
            ``$DISTILL_MNIST`` or ``/work/shared/data/mnist``: 28 features per frame).
        num_train, num_test: sequences in each part.
        digits_per_seq: images per sequence (``T = digits_per_seq · W`` frames).
        seed: draws the sequences.
    """
    if source == "digits":
        from distill.data.sources import load_digits_split

        split = load_digits_split(seed=seed)
        tr_x, tr_y, te_x, te_y = split.train_inputs, split.train_targets, split.val_inputs, split.val_targets
    elif source == "mnist":
        from distill.data.sources import load_mnist

        root = mnist_root or os.environ.get("DISTILL_MNIST", "/work/shared/data/mnist")
        tr_x, tr_y = load_mnist(root, "train")
        te_x, te_y = load_mnist(root, "test")
    else:
        raise ValueError(f"source must be 'digits' or 'mnist'; got {source!r}")
    g = torch.Generator().manual_seed(seed)
    train_x, train_y = frame_sequences(tr_x, tr_y, num_train, digits_per_seq, g)
    test_x, test_y = frame_sequences(te_x, te_y, num_test, digits_per_seq, g)
    mean = train_x.mean(dim=(0, 1), keepdim=True)
    std = train_x.std(dim=(0, 1), keepdim=True).clamp_min(1e-6)
    return FrameTask((train_x - mean) / std, train_y, (test_x - mean) / std, test_y, 10, int(train_x.shape[-1]))


@torch.no_grad()
def frame_accuracy(model: Any, loader: Iterable[Any]) -> float:
    """Per-frame top-1 accuracy (%) of ``model`` (frames ``(B, T, F)`` -> logits ``(B, T, K)``) over
    every frame whose label is not ``-100``; the model is put back in its training mode after."""
    was = model.training
    model.eval()
    correct = total = 0
    try:
        for raw in loader:
            b = as_batch(raw)
            x, y = b.inputs, b.targets
            pred = model(x).argmax(-1)
            valid = y != IGNORE
            correct += int(((pred == y) & valid).sum())
            total += int(valid.sum())
    finally:
        model.train(was)
    if total == 0:
        raise ValueError("frame_accuracy: the loader yielded no labelled frame")
    return 100.0 * correct / total
