"""The batch a training step sees, whatever shape the user's loader yields."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
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


@dataclass
class TokenBatch(Batch):
    """A batch of token sequences, as Hugging Face models and collators speak them.

    Attributes:
        inputs: ``input_ids`` ``(B, L)`` long.
        targets: ``labels`` ``(B, L)`` long, ``-100`` where a position carries no loss (padding,
            the prompt). For causal LMs the labels are *not* shifted (the Hugging Face
            convention): the logits at position ``t`` predict the label at ``t + 1``.
        index: position of each sequence in its data set ``(B,)`` (the teacher cache reads it).
        model_kwargs: the model's other inputs by name, each ``(B, ...)``: ``attention_mask``
            ``(B, L)``, ``decoder_input_ids``, ``token_type_ids``...
    """

    model_kwargs: dict[str, Tensor] = field(default_factory=dict)

    @property
    def attention_mask(self) -> Tensor | None:
        return self.model_kwargs.get("attention_mask")

    def model_inputs(self) -> dict[str, Tensor]:
        """The keyword arguments of the model's forward: ``input_ids`` and :attr:`model_kwargs`."""
        return {"input_ids": self.inputs, **self.model_kwargs}

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TokenBatch:
        moved = super().to(device, non_blocking)
        return replace(moved, model_kwargs={k: v.to(device, non_blocking=non_blocking)
                                            for k, v in self.model_kwargs.items()})

    def part(self, rank: int, world_size: int) -> TokenBatch:
        n = len(self)
        whole = super().part(rank, world_size)
        return replace(whole, model_kwargs={k: torch.tensor_split(v, world_size)[rank]
                                            if v.dim() >= 1 and v.shape[0] == n else v
                                            for k, v in self.model_kwargs.items()})


@dataclass
class DenseBatch(Batch):
    """A batch of a dense-prediction task: detection, segmentation, 3D.

    Attributes:
        inputs: the model input: images ``(B, C, H, W)``, or for point-cloud tasks padded points
            ``(B, P, F)`` (``F`` features per point: x, y, z, intensity...) with ``point_mask``.
        targets: semantic masks ``(B, H, W)`` long (class per pixel, ``255`` = ignored), or ``None``.
        boxes: per image the ground-truth boxes, a list of ``B`` tensors ``(n_i, D)`` float:
            ``D = 4`` image boxes ``(x1, y1, x2, y2)`` in pixels; 3D boxes
            ``(x, y, z, dx, dy, dz, yaw)`` in metres (``D = 7``). ``None`` when not labelled.
        labels: per image the class of each box, a list of ``B`` tensors ``(n_i,)`` long in ``[0, K)``.
        instance_masks: per image one mask per box, a list of ``B`` tensors ``(n_i, H, W)`` bool, or ``None``.
        point_mask: ``(B, P)`` bool, which rows of a padded point cloud are points; ``None`` for images.
        extras: more per-sample tensors by name, each ``(B, ...)`` (a depth map, a second view of the
            scene, camera intrinsics ``(B, 3, 3)``...).
    """

    boxes: list[Tensor] | None = None
    labels: list[Tensor] | None = None
    instance_masks: list[Tensor] | None = None
    point_mask: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = int(self.inputs.shape[0])
        for name in ("boxes", "labels", "instance_masks"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"DenseBatch.{name} must hold one tensor per sample ({n}), got {len(value)}")

    def to(self, device: torch.device | str, non_blocking: bool = False) -> DenseBatch:
        moved = super().to(device, non_blocking)

        def each(items: list[Tensor] | None) -> list[Tensor] | None:
            return None if items is None else [t.to(device, non_blocking=non_blocking) for t in items]

        return replace(moved, boxes=each(self.boxes), labels=each(self.labels),
                       instance_masks=each(self.instance_masks),
                       point_mask=None if self.point_mask is None else self.point_mask.to(device, non_blocking=non_blocking),
                       extras={k: v.to(device, non_blocking=non_blocking) for k, v in self.extras.items()})

    def part(self, rank: int, world_size: int) -> DenseBatch:
        n = len(self)
        if n < world_size:
            raise ValueError(f"a batch of {n} samples cannot be split over {world_size} processes: every rank "
                             "needs at least one sample (use a larger batch)")
        return self.select(torch.tensor_split(torch.arange(n), world_size)[rank])

    def select(self, idx: Tensor) -> DenseBatch:
        """The samples ``idx`` ``(k,)`` long, in that order: every per-sample field (tensors whose
        first dimension is B, the per-image lists, ``extras``) picked alike; the rest kept."""
        n = len(self)
        rows = idx.tolist()

        def each(items: list[Tensor] | None) -> list[Tensor] | None:
            return None if items is None else [items[i] for i in rows]

        def cut(t: Tensor | None) -> Tensor | None:
            return t[idx.to(t.device)] if isinstance(t, Tensor) and t.dim() >= 1 and t.shape[0] == n else t

        return replace(self, inputs=cut(self.inputs), targets=cut(self.targets), index=cut(self.index),
                       mix_targets=cut(self.mix_targets), mix_lam=cut(self.mix_lam), point_mask=cut(self.point_mask),
                       boxes=each(self.boxes), labels=each(self.labels), instance_masks=each(self.instance_masks),
                       extras={k: cut(v) for k, v in self.extras.items()})


# keys of a Hugging Face batch that are not model inputs
_TOKEN_BATCH_META = ("input_ids", "labels", "index", "idx", "indices")


def _token_batch(obj: Mapping[str, Any]) -> TokenBatch:
    input_ids = obj["input_ids"]
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int32):
        raise ValueError("a token batch's input_ids must be an integer tensor (B, L), got "
                         + (f"{input_ids.dtype} of shape {tuple(input_ids.shape)}" if isinstance(input_ids, Tensor)
                            else type(input_ids).__name__))
    labels = obj.get("labels")
    if labels is not None and (not isinstance(labels, Tensor) or labels.shape[0] != input_ids.shape[0]):
        raise ValueError(f"a token batch's labels must be a tensor with one row per sequence ({input_ids.shape[0]}), "
                         f"got {tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__}")
    index = next((obj[k] for k in ("index", "idx", "indices") if k in obj), None)
    kwargs = {k: v for k, v in obj.items() if k not in _TOKEN_BATCH_META and isinstance(v, Tensor)}
    mask = kwargs.get("attention_mask")
    if mask is not None and tuple(mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)} but input_ids {tuple(input_ids.shape)}")
    return TokenBatch(input_ids.long(), None if labels is None else labels.long(), index, model_kwargs=kwargs)


@dataclass
class GraphBatch(Batch):
    """A whole graph for full-batch node classification (issue 16's graph distillation).

    Attributes:
        inputs: node features ``(N, F)``.
        targets: node labels ``(N,)`` long, ``-100`` where a node carries no label loss (nodes
            outside the training mask; ``F.cross_entropy`` ignores them), or ``None``.
        edge_index: edges ``(2, E)`` long, source row first (torch-geometric's convention).
        mask: the nodes this batch is about ``(N,)`` bool (training nodes in a training batch,
            validation nodes in an evaluation batch), or ``None`` for all.

    :func:`run_model` calls ``model(inputs, edge_index)``. One graph is one batch: it cannot be
    split across processes (``part`` raises).
    """

    edge_index: Tensor | None = None
    mask: Tensor | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> GraphBatch:
        moved = super().to(device, non_blocking)
        return replace(moved, edge_index=None if self.edge_index is None else self.edge_index.to(device),
                       mask=None if self.mask is None else self.mask.to(device))

    def part(self, rank: int, world_size: int) -> GraphBatch:
        if world_size == 1:
            return self
        raise ValueError(f"a GraphBatch is one whole graph: it cannot be split over {world_size} processes")


def run_model(model: Any, batch: Batch, **extra: Any) -> Any:
    """Call ``model`` on ``batch``: ``model(batch.inputs)``, for a :class:`TokenBatch` the
    Hugging Face way, ``model(input_ids=..., attention_mask=..., **extra)``, for a
    :class:`GraphBatch` ``model(inputs, edge_index)``."""
    if isinstance(batch, TokenBatch):
        return model(**batch.model_inputs(), **extra)
    if isinstance(batch, GraphBatch):
        return model(batch.inputs, batch.edge_index, **extra)
    return model(batch.inputs, **extra)


def as_batch(obj: Any) -> Batch:
    """Turn what a loader yields into a :class:`Batch`.

    Accepts a ``Batch``; a tuple/list ``(inputs,)``, ``(inputs, targets)`` or
    ``(inputs, targets, index)``; a mapping with keys ``inputs``/``input``/``x``,
    ``targets``/``target``/``labels``/``y`` and optionally ``index``; a Hugging Face batch
    (a mapping with ``input_ids``, optionally ``attention_mask``, ``labels``, ``index`` and other
    model inputs): a :class:`TokenBatch`; or a bare tensor.
    """
    if isinstance(obj, Batch):
        return obj
    if isinstance(obj, Tensor):
        return Batch(obj)
    if isinstance(obj, Mapping) and "input_ids" in obj:
        return _token_batch(obj)
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
