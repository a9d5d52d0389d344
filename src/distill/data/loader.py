"""Iterating over in-memory tensors: a fast batch loader and an index-returning Dataset."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from distill.batch import Batch
from distill.data.augment import (
    Augment,
    SampleKeys,
    augmented_views,
    mix_seed,
    split_mixup,
)

__all__ = ["GlobalBatchShards", "InMemoryLoader", "IndexedTensorDataset", "NonFiniteInputError", "check_finite",
           "check_shard", "in_memory_tensors", "mix_seed", "shard_wrapped"]

SHARD_SPLITS = ("batch", "samples")


class NonFiniteInputError(ValueError):
    """Inputs holding NaN or infinite values (a corrupted file, a bad normalisation)."""


def check_finite(inputs: Any, where: str) -> None:
    """Raise :class:`NonFiniteInputError` naming ``where`` and the counts when a floating-point
    ``inputs`` tensor holds NaN or ±inf values (other inputs pass). One pass over the data, no copy
    of it beyond a boolean mask per chunk."""
    if not isinstance(inputs, Tensor) or not inputs.is_floating_point() or inputs.numel() == 0:
        return
    nan = inf = 0
    flat = inputs.reshape(-1)
    for lo in range(0, flat.numel(), 1 << 24):  # chunks: a mask of the whole of a large set would double it
        part = flat[lo:lo + (1 << 24)]
        nan += int(torch.isnan(part).sum())
        inf += int(torch.isinf(part).sum())
    if nan or inf:
        samples = int((~torch.isfinite(inputs.reshape(inputs.shape[0], -1))).any(1).sum()) if inputs.dim() else 1
        raise NonFiniteInputError(
            f"{where} holds non-finite inputs: {nan} NaN and {inf} inf value(s) in {samples} sample(s); the "
            "loss would be NaN from the first step. Fix or drop those samples (a corrupted file? a division by "
            "a zero standard deviation in the normalisation?)"
        )


def _check_pair(inputs: Tensor, targets: Tensor | None, who: str) -> None:
    if not isinstance(inputs, Tensor) or inputs.dim() == 0:
        got = "a 0-d tensor" if isinstance(inputs, Tensor) else type(inputs).__name__
        raise ValueError(f"{who}: inputs must be a tensor with a leading sample axis (N, ...); got {got}")
    if targets is not None:
        if not isinstance(targets, Tensor):
            raise TypeError(f"{who}: targets must be a tensor (N,) or None; got {type(targets).__name__}")
        if targets.shape[0] != inputs.shape[0]:
            raise ValueError(
                f"{who}: inputs have {inputs.shape[0]} samples but targets have {targets.shape[0]}"
            )


def check_shard(rank: Any, world_size: Any, split: Any, who: str, splits: tuple[str, ...] = SHARD_SPLITS) -> None:
    """The clear error for a bad ``set_shard(rank, world_size, split)`` call."""
    for name, value in (("rank", rank), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{who}: {name} must be an int; got {value!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"{who}: need 0 <= rank < world_size; got rank={rank}, world_size={world_size}")
    if split not in splits:
        raise ValueError(f"{who}: split must be one of {splits}; got {split!r}")


def shard_wrapped(loader: Any, rank: int, world_size: int, split: str, who: str) -> None:
    """``set_shard`` of a loader built on another one (``loader``): the wrapped loader is sharded, so
    the wrapper's batches are made of this rank's samples."""
    if loader is None:
        return
    if not hasattr(loader, "set_shard"):
        raise ValueError(f"{who} cannot be sharded for multi-process training: the loader it wraps "
                         f"({type(loader).__name__}) has no set_shard(rank, world_size, split) (an InMemoryLoader has)")
    loader.set_shard(rank, world_size, split)


class GlobalBatchShards:
    """Sharding for loaders that build each global batch themselves (from several sources, with
    per-batch random draws): every rank builds the same global batch (the draws are seeded by epoch
    and batch number) and yields its part of it (:meth:`~distill.batch.Batch.part`), so the ranks'
    batches of one step make up the single-process batch, as with an :class:`InMemoryLoader`'s
    ``split="batch"``. Subclasses call :meth:`_shard` on each batch they yield."""

    rank = 0
    world_size = 1
    split = "batch"

    def set_shard(self, rank: int, world_size: int, split: str = "batch") -> None:
        """Yield only rank ``rank``'s part of each global batch (``set_shard(0, 1)`` undoes it)."""
        check_shard(rank, world_size, split, f"{type(self).__name__}.set_shard", splits=("batch",))
        self.rank, self.world_size = rank, world_size

    def _shard(self, batch: Batch) -> Batch:
        return batch if self.world_size == 1 else batch.part(self.rank, self.world_size)


class IndexedTensorDataset(Dataset):
    """A map-style Dataset over tensors that returns ``(x, y, index)``.

    The index lets methods with per-sample state (memory banks, cached teacher outputs) find
    their slot even after a DataLoader shuffles. ``targets`` may be ``None`` (unlabeled data);
    then ``y`` is ``-1``.
    """

    def __init__(self, inputs: Tensor, targets: Tensor | None) -> None:
        _check_pair(inputs, targets, "IndexedTensorDataset")
        self.inputs = inputs
        self.targets = targets

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, int]:
        y = self.targets[index] if self.targets is not None else torch.tensor(-1)
        return self.inputs[index], y, index


def batches_per_epoch(n: int, batch_size: int, world_size: int = 1, split: str = "batch",
                      drop_last: bool = False) -> int:
    """Batches per epoch of one rank of a sharded in-memory loader (the same on every rank): ``n``
    samples in batches of ``batch_size``; ``split="samples"`` deals every ``world_size``-th sample to
    a rank, ``"batch"`` splits each global batch (a last global batch smaller than the world is
    dropped, or a rank would get no sample)."""
    if world_size > 1 and split == "samples":
        n = n // world_size if drop_last else math.ceil(n / world_size)
    if drop_last:
        return n // batch_size
    batches = math.ceil(n / batch_size)
    if world_size > 1 and split == "batch" and 0 < n % batch_size < world_size:
        batches -= 1
    return batches


def rank_batches(order: Tensor, batch_size: int, num_batches: int, rank: int = 0, world_size: int = 1,
                 split: str = "batch", drop_last: bool = False) -> list[Tensor]:
    """The indices of the batches one rank yields in an epoch whose sample order is ``order``
    ``(N,)``: ``split="samples"`` deals every ``world_size``-th sample to a rank (padding by wrapping
    around), ``"batch"`` gives the rank its contiguous part of each global batch; ``num_batches`` is
    :func:`batches_per_epoch`'s count."""
    if world_size > 1 and split == "samples":
        n = int(order.shape[0])
        total = (n // world_size if drop_last else math.ceil(n / world_size)) * world_size
        if total > n:  # pad by wrapping around (several times if there are fewer samples than ranks)
            order = order.repeat(math.ceil(total / n))
        order = order[:total][rank::world_size]
    batches = list(order.split(batch_size))[:num_batches]
    if world_size > 1 and split == "batch":
        batches = [torch.tensor_split(b, world_size)[rank] for b in batches]
    return batches


class InMemoryLoader:
    """Batches straight from tensors held in memory, yielding :class:`~distill.batch.Batch`.

    A batch is one gather ``inputs[idx]`` instead of ``batch_size`` Python ``__getitem__``
    calls plus a collate, which is what makes it much faster than ``DataLoader`` for small
    images on CPU.

    Reproducibility: the sample order of epoch ``e`` is a pure function of ``(seed, e)``, and the
    augmentation parameters of sample ``i`` in epoch ``e`` (crop offsets, flip) are a pure function
    of ``(augment_seed, e, i)`` (:class:`~distill.data.augment.SampleKeys`), whatever batch the
    sample lands in: :meth:`augment_params` replays them, and a teacher cache
    (:mod:`distill.cache`) stores the teacher's outputs for exactly these views. With a
    :class:`~distill.data.augment.Mixup` last in ``augment``, the loader (it holds every sample)
    mixes each view with its partner's view (the partner's own crop and flip of that epoch) and
    fills ``Batch.mix_targets`` (the partner's label) and ``Batch.mix_lam`` for the loss. The loader does
    **not** advance the epoch by itself: the training loop must call :meth:`set_epoch` before
    iterating each epoch (the default is epoch 0, so a loop that forgets sees the same order every
    epoch). In exchange a run resumed at epoch ``e`` sees the same batches as the uninterrupted run.

    Sharding (multi-process training, :meth:`set_shard`): every rank builds the loader with the
    same ``seed``, so every rank draws the same permutation, and takes its own part of it.
    ``split="batch"`` (what :func:`distill.fit` uses under ``torchrun``): ``batch_size`` stays the
    *global* batch, and rank ``r`` of ``W`` yields the ``r``-th of ``W`` contiguous, balanced parts
    of each global batch, so the ranks' batches of one step, concatenated in rank order, are exactly
    the single-process batch of that step. ``split="samples"`` (``DistributedSampler``'s scheme,
    used by codistillation workers): rank ``r`` takes every ``W``-th sample of the epoch's
    permutation (padded by wrapping around so that every rank has as many) and batches it with the
    full ``batch_size``. Augmentation stays a function of ``(augment_seed, epoch, sample index)``,
    so a sample's view does not depend on the rank it lands on.

    Args:
        inputs: samples ``(N, ...)``, e.g. images ``(N, C, H, W)``.
        targets: labels ``(N,)`` or ``None``.
        batch_size: samples per batch (the last one may be smaller unless ``drop_last``).
        shuffle: draw a fresh permutation per epoch; otherwise keep data order.
        drop_last: drop the final incomplete batch.
        augment: an :class:`~distill.data.augment.Augment` applied to each batch of images, a
            :class:`~distill.data.augment.Mixup` possibly last (a plain callable
            ``augment(x, generator)`` also works; it gets :meth:`augment_generator`).
        seed: base seed of the order (and, unless ``augment_seed`` is given, of the augmentation).
        augment_seed: seed of the augmentation draws; runs with different ``seed`` but one
            ``augment_seed`` see the same view of each sample in each epoch (what lets several
            students share one teacher cache).
        return_index: fill ``Batch.index`` with each sample's position in ``inputs``.
        device: move the data there once, at construction; batches are then built on it.
    """

    def __init__(
        self,
        inputs: Tensor,
        targets: Tensor | None,
        batch_size: int,
        shuffle: bool = True,
        drop_last: bool = False,
        augment: Augment | None = None,
        seed: int = 0,
        return_index: bool = False,
        device: torch.device | str | None = None,
        augment_seed: int | None = None,
    ) -> None:
        _check_pair(inputs, targets, "InMemoryLoader")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"InMemoryLoader batch_size must be a positive int; got {batch_size!r}")
        if augment is not None and not callable(augment):
            raise TypeError(f"InMemoryLoader augment must be an Augment or None; got {type(augment).__name__}")
        if augment is not None and inputs.dim() != 4:
            raise ValueError(
                f"InMemoryLoader augment needs images (N, C, H, W); got inputs of shape {tuple(inputs.shape)}"
            )
        if isinstance(augment, Augment) and split_mixup(augment)[1] is not None and not inputs.is_floating_point():
            raise TypeError(f"InMemoryLoader: Mixup needs floating-point inputs to mix; got {inputs.dtype}")
        if device is not None:
            inputs = inputs.to(device)
            targets = targets.to(device) if targets is not None else None
        self.inputs = inputs
        self.targets = targets
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.augment = augment
        self.seed = int(seed)
        self.augment_seed = self.seed if augment_seed is None else int(augment_seed)
        self.return_index = return_index
        self.epoch = 0
        self.rank, self.world_size, self.split = 0, 1, "batch"

    @property
    def num_samples(self) -> int:
        return int(self.inputs.shape[0])

    def __len__(self) -> int:
        """Number of batches per epoch (of this rank, when sharded: the same on every rank)."""
        return batches_per_epoch(self.num_samples, self.batch_size, self.world_size, self.split, self.drop_last)

    def set_shard(self, rank: int, world_size: int, split: str = "batch") -> None:
        """Yield only rank ``rank``'s part of the data of ``world_size`` processes (see the class notes).

        ``set_shard(0, 1)`` undoes it. With ``split="batch"`` a final global batch with fewer samples
        than ``world_size`` is dropped (it would leave a rank with an empty batch).
        """
        check_shard(rank, world_size, split, "InMemoryLoader.set_shard")
        self.rank, self.world_size, self.split = rank, world_size, split

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order (and augmentation) the next iteration produces."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"InMemoryLoader.set_epoch expects an int >= 0; got {epoch!r}")
        self.epoch = epoch

    def order(self, epoch: int | None = None) -> Tensor:
        """The sample order ``(N,)`` (int64, CPU) of ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        if not self.shuffle:
            return torch.arange(self.num_samples)
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 0))
        return torch.randperm(self.num_samples, generator=g)

    def augment_params(self, index: Tensor, epoch: int | None = None) -> Any:
        """The augmentation parameters of samples ``index`` ``(B,)`` in ``epoch`` (default: the current one).

        ``augment.apply(inputs[index], loader.augment_params(index, epoch))`` replays the exact
        views the loader yields for those samples, in any grouping. With a Mixup the last entry
        is its :class:`~distill.data.augment.MixupParams` (partner, λ), and :meth:`views` replays.
        """
        if not isinstance(self.augment, Augment):
            raise TypeError(f"augment_params needs an Augment; this loader's augment is {self.augment!r}")
        epoch = self.epoch if epoch is None else epoch
        return self.augment.params_for(SampleKeys.of(self.augment_seed, epoch, index, num_samples=self.num_samples))

    def views(self, index: Tensor, epoch: int | None = None) -> Batch:
        """The batch of samples ``index`` ``(B,)`` (CPU, int64) exactly as this loader yields them in
        ``epoch`` (default: the current one), whatever batch or shard they land in."""
        if self.augment is not None and not isinstance(self.augment, Augment):
            raise TypeError(f"views needs an Augment (per-sample draws); this loader's augment is {self.augment!r}")
        epoch = self.epoch if epoch is None else epoch
        return self._batch(index, index.to(self.inputs.device), epoch, batch_number=0)

    def _batch(self, cpu_idx: Tensor, idx: Tensor, epoch: int, batch_number: int) -> Batch:
        x = self.inputs[idx]
        mix_targets = mix_lam = None
        if isinstance(self.augment, Augment):
            x, mix = augmented_views(self.inputs, cpu_idx, epoch, self.augment, self.augment_seed, x=x)
            if mix is not None:
                mix_lam = mix.lam.to(device=x.device, dtype=x.dtype)  # the λ that weighed the inputs
                if self.targets is not None:
                    mix_targets = self.targets[mix.partner.to(self.targets.device)]
        elif self.augment is not None:
            x = self.augment(x, self.augment_generator(batch_number, epoch))
        y = self.targets[idx] if self.targets is not None else None
        return Batch(x, y, idx if self.return_index else None, mix_targets, mix_lam)

    def augment_generator(self, batch_index: int, epoch: int | None = None) -> torch.Generator:
        """The CPU generator a plain-callable ``augment(x, generator)`` gets for batch ``batch_index``.

        An :class:`~distill.data.augment.Augment` draws per-sample parameters instead
        (:meth:`augment_params`); this stream serves callables that are not one.
        """
        epoch = self.epoch if epoch is None else epoch
        # Stream tag 1 keeps augmentation draws independent of the permutation (tag 0).
        if self.world_size == 1:
            return torch.Generator().manual_seed(mix_seed(self.augment_seed, epoch, 1, batch_index))
        # sharded: one stream per (batch, rank), so ranks do not repeat each other's draws (a
        # callable's views therefore differ from a single-process run's; an Augment's do not)
        return torch.Generator().manual_seed(
            mix_seed(self.augment_seed, epoch, 1, batch_index, self.rank + 1, self.world_size))

    def batch_indices(self, epoch: int | None = None) -> list[Tensor]:
        """The sample indices (CPU, int64) of every batch this loader (this rank) yields in ``epoch``."""
        epoch = self.epoch if epoch is None else epoch
        return rank_batches(self.order(epoch), self.batch_size, len(self), self.rank, self.world_size, self.split,
                            self.drop_last)

    def __iter__(self) -> Iterator[Batch]:
        epoch = self.epoch
        batches = self.batch_indices(epoch)  # CPU: the per-sample augmentation keys are computed there
        # one host-to-device copy per epoch, then views of it per batch
        on_device = torch.cat(batches).to(self.inputs.device) if batches else None
        start = 0
        for k, cpu_idx in enumerate(batches):
            idx = on_device[start:start + len(cpu_idx)]  # type: ignore[index]
            start += len(cpu_idx)
            yield self._batch(cpu_idx, idx, epoch, k)

    def __repr__(self) -> str:
        return (
            f"InMemoryLoader(samples={self.num_samples}, batch_size={self.batch_size}, shuffle={self.shuffle}, "
            f"drop_last={self.drop_last}, augment={self.augment!r}, seed={self.seed}, augment_seed={self.augment_seed}, "
            f"epoch={self.epoch}"
            + (f", shard={self.rank}/{self.world_size} ({self.split})" if self.world_size > 1 else "") + ")"
        )


def in_memory_tensors(data: Any, who: str) -> tuple[Tensor, Tensor | None, dict[str, Any]]:
    """``(inputs, targets, loader settings)`` of training data held in memory.

    For strategies that build new loaders over (subsets of, or additions to) the training data:
    an :class:`InMemoryLoader` (its batch size, order, augmentation and seed come along as
    settings), a :class:`~distill.data.sources.TensorData` (or anything with tensor ``inputs``),
    or an ``(inputs, targets)`` tuple of tensors. Anything else is a ``TypeError`` naming ``who``.
    """
    if isinstance(data, InMemoryLoader):
        settings = {"batch_size": data.batch_size, "shuffle": data.shuffle, "drop_last": data.drop_last,
                    "augment": data.augment, "seed": data.seed}
        return data.inputs, data.targets, settings
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], Tensor):
        return data[0], data[1], {}
    if isinstance(getattr(data, "inputs", None), Tensor):  # TensorData and look-alikes
        return data.inputs, getattr(data, "targets", None), {}
    raise TypeError(f"{who} builds new loaders from the training data, so it needs it in memory: an "
                    f"InMemoryLoader, a distill.data.sources.TensorData or an (inputs, targets) tuple of tensors; "
                    f"got {type(data).__name__}")
