"""The batch a training step sees, whatever shape the user's loader yields."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor

View = dict[str, Tensor]
"""A view: the logits of a model (key ``"logits"``, shape ``(B, K)``) plus one entry per tap path."""


@dataclass
class Batch:
    """One mini-batch.

    Attributes:
        inputs: model input, e.g. images ``(B, C, H, W)`` or features ``(B, D)``.
        targets: integer class labels ``(B,)``, or ``None`` for unlabeled data.
        index: position of each sample in its data set ``(B,)``, or ``None``. Methods that keep
            per-sample state (memory banks, caches) read it.
        mix_targets: with mixup (:class:`~distill.data.augment.Mixup`), the label of each sample's
            partner ``(B,)`` long; ``None`` otherwise.
        mix_lam: with mixup, each sample's own weight ``λ`` ``(B,)`` float: ``inputs`` is
            ``λ·x_i + (1 − λ)·x_j`` and the label losses (``ce``, ``label_smoothing``) weigh
            ``targets`` by ``λ`` and ``mix_targets`` by ``1 − λ``. ``None`` otherwise.
    """

    inputs: Tensor
    targets: Tensor | None = None
    index: Tensor | None = None
    mix_targets: Tensor | None = None
    mix_lam: Tensor | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return replace(self, inputs=move(self.inputs), targets=move(self.targets), index=move(self.index),
                       mix_targets=move(self.mix_targets), mix_lam=move(self.mix_lam))

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def part(self, rank: int, world_size: int) -> Batch:
        """Rank ``rank``'s part of this batch: the ``rank``-th of ``world_size`` contiguous, balanced
        slices of every per-sample field (``torch.tensor_split``, as
        :class:`~distill.data.loader.InMemoryLoader` splits a global batch), for loaders that build a
        global batch and hand each rank of a multi-process run its part. A subclass's extra
        per-sample tensors (first dimension B) are sliced too; anything else is kept as it is.
        """
        n = len(self)
        if n < world_size:
            raise ValueError(f"a batch of {n} samples cannot be split over {world_size} processes: every rank "
                             "needs at least one sample (use a larger batch)")
        changes = {f.name: torch.tensor_split(v, world_size)[rank] for f in fields(self)
                   if isinstance(v := getattr(self, f.name), Tensor) and v.dim() >= 1 and v.shape[0] == n}
        return replace(self, **changes)


def as_batch(obj: Any) -> Batch:
    """Turn what a loader yields into a :class:`Batch`.

    Accepts a ``Batch``; a tuple/list ``(inputs,)``, ``(inputs, targets)`` or
    ``(inputs, targets, index)``; a mapping with keys ``inputs``/``input``/``x``,
    ``targets``/``target``/``labels``/``y`` and optionally ``index``; or a bare tensor.
    """
    if isinstance(obj, Batch):
        return obj
    if isinstance(obj, Tensor):
        return Batch(obj)
    if isinstance(obj, Mapping):
        def pick(*names: str) -> Any:
            for n in names:
                if n in obj:
                    return obj[n]
            return None

        inputs = pick("inputs", "input", "x", "images", "image")
        if inputs is None:
            raise ValueError(
                f"batch mapping has keys {sorted(obj)}; expected one of 'inputs', 'input', 'x', 'images'"
            )
        return Batch(inputs, pick("targets", "target", "labels", "label", "y"), pick("index", "indices", "idx"))
    if isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)):
        if not 1 <= len(obj) <= 3:
            raise ValueError(
                f"batch tuple has {len(obj)} items; expected (inputs,), (inputs, targets) or (inputs, targets, index)"
            )
        return Batch(*obj)
    raise TypeError(f"cannot read a batch from {type(obj).__name__}; expected a tuple, a mapping, a tensor or a Batch")
