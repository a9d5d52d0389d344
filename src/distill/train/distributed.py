"""Multi-process training under ``torchrun``: the process group, data sharding, DDP and collectives.

``distill.fit`` uses these helpers when it finds itself launched by ``torchrun`` (``WORLD_SIZE`` > 1
in the environment); they are public so that strategies with loops of their own, and scripts, can
do the same. The design:

* **What DDP wraps.** The optimizer trains the student and the methods' parts (adapters,
  embeddings, learnable temperatures), so exactly these are put in one module
  (:class:`TrainableParts`) and wrapped in :class:`~torch.nn.parallel.DistributedDataParallel`:
  one gradient all-reduce covers everything the optimizer steps, and DDP's start-up broadcast
  gives every rank rank 0's weights. Its forward runs the whole Distiller step, so the teacher
  source is called inside it but is **not** a submodule: each rank runs its own frozen teacher (or
  reads its rows of a teacher cache), which DDP never sees, broadcasts or all-reduces.
* **Data.** Each rank takes its part of the same permutation (same seed on every rank); with an
  :class:`~distill.data.loader.InMemoryLoader` the loader's ``batch_size`` stays the global batch and
  the ranks' parts of one step make up exactly the single-process batch
  (:meth:`~distill.data.loader.InMemoryLoader.set_shard`). A ``torch.utils.data.DataLoader`` must
  carry a :class:`~torch.utils.data.distributed.DistributedSampler` (then its ``batch_size`` is per
  rank); any other iterable is refused, since each rank would silently train on all the data.
* **Losses of uneven parts.** DDP averages the ranks' gradients with equal weights; when the ranks'
  batches differ in size (the last batch of an epoch), each rank's loss is scaled by
  ``W · n_r / n`` so that the average is the gradient of the global batch mean
  (:func:`step_sizes`).
* **Buffers.** DDP broadcasts rank 0's buffers (BatchNorm statistics) before each forward, as it
  does by default: every rank computes the same function. Per-sample state (CRD's memory banks,
  KCD's records: method buffers with one row per training sample) is excluded from that broadcast,
  which would send whole banks every step and erase the other ranks' updates; instead, after each
  step every rank receives the rows the other ranks wrote (:class:`PerSampleSync`), so the banks
  stay identical and equal to a single-process run's for the same global batches.
* **BatchNorm statistics.** Without SyncBatchNorm each rank normalises with the statistics of its
  own part of the batch, so a student with BatchNorm does not train exactly as in one process;
  ``sync_bn=True`` converts it with :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`, which
  torch supports for GPU (CUDA/XPU) tensors only (:func:`convert_sync_batchnorm` refuses CPU).
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "DDPDistiller",
    "DistInfo",
    "PerSampleSync",
    "TrainableParts",
    "all_gather_object",
    "all_reduce_sum",
    "average_gradients",
    "barrier",
    "broadcast_object",
    "broadcast_state",
    "convert_sync_batchnorm",
    "dist_info",
    "init_distributed",
    "shutdown_distributed",
    "is_main_process",
    "main_process_first",
    "resolve_device",
    "set_loader_epoch",
    "shard_loader",
    "step_sizes",
    "sync_rng_from_main",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size`` processes, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """More than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files, evaluates and shows progress."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def dist_info() -> DistInfo:
    """The process group's rank and size when one is initialised, else torchrun's ``RANK``,
    ``WORLD_SIZE`` and ``LOCAL_RANK`` environment variables (a plain run: rank 0 of 1)."""
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        return DistInfo(rank, dist.get_world_size(), _env_int("LOCAL_RANK", rank))
    return DistInfo(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0))


def is_main_process() -> bool:
    """True on rank 0 (and in a plain single-process run)."""
    return dist_info().is_main


def resolve_device(device: torch.device | str, info: DistInfo | None = None) -> torch.device:
    """In a multi-process run, ``"cuda"`` without an index means this process's GPU, ``cuda:LOCAL_RANK``."""
    device = torch.device(device)
    info = info or dist_info()
    if info.enabled and device.type == "cuda" and device.index is None:
        return torch.device("cuda", info.local_rank)
    return device


_created_group = False


def shutdown_distributed(wait: bool = False) -> None:
    """Destroy the default process group, when one is initialised; a no-op otherwise.

    ``wait``: first wait for every rank (a command that ended normally on all of them). Never at
    exit after an error: the other ranks may not come, and the barrier would hang.

    Garbage is collected first: a DDP wrapper or a pending collective that outlives its group is
    torn down during interpreter finalisation, where gloo can abort the process ("terminate called
    without an active exception", seen on loaded 2-core machines). The command line calls this when
    a command ends; ``init_distributed`` also registers it to run at exit.
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        if wait:  # no rank tears its connections down while another still uses them
            dist.barrier()
        dist.destroy_process_group()


def init_distributed(device: torch.device | str | None = None, backend: str | None = None) -> DistInfo:
    """Initialise the default process group from torchrun's environment, when it is not already.

    ``backend`` defaults to ``"nccl"`` for a CUDA ``device`` and ``"gloo"`` otherwise. A plain
    single-process run (no ``WORLD_SIZE`` > 1) initialises nothing. A group created here is
    destroyed when the interpreter exits.
    """
    global _created_group
    info = dist_info()
    if not info.enabled or dist.is_initialized():
        return info
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={info.world_size}, but this torch build has no torch.distributed")
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={info.world_size} but {', '.join(missing)} is not set: launch the processes with "
            "torchrun (torchrun --nproc_per_node=N ...), which sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT"
        )
    dev = torch.device(device) if device is not None else None
    if backend is None:
        backend = "nccl" if dev is not None and dev.type == "cuda" else "gloo"
    if dev is not None and dev.type == "cuda":
        torch.cuda.set_device(resolve_device(dev, info))
    dist.init_process_group(backend, rank=info.rank, world_size=info.world_size)
    if not _created_group:
        atexit.register(shutdown_distributed)
        _created_group = True
    return dist_info()


@contextlib.contextmanager
def main_process_first(device: torch.device | str | None = None) -> Iterator[bool]:
    """Rank 0 runs the block first, the other ranks once it is done; yields whether this is rank 0.

    For work whose result the others then read: writing a trained teacher, building a teacher
    cache (``with main_process_first() as main: if main: build(...)``, then every rank opens it).
    Initialises the process group when launched by torchrun. If rank 0's block raises, the others
    are not released (torchrun then stops them).
    """
    info = init_distributed(device) if dist_info().enabled else DistInfo()
    if info.enabled and not info.is_main:
        barrier()
    yield info.is_main
    if info.enabled and info.is_main:
        barrier()


def _world() -> int:
    """The process group's size (1 when none is initialised)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    """Wait for every rank (nothing to wait for in a single-process run)."""
    if _world() > 1:
        dist.barrier()


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over the ranks, in place (unchanged in a single-process run); returns it."""
    if _world() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` (any picklable object) on every rank."""
    if _world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` in a single-process run)."""
    if _world() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def broadcast_state(modules: Any, src: int = 0, *, buffers_only: bool = False) -> None:
    """Give every rank rank ``src``'s parameters and buffers of ``modules`` (a module or an iterable of
    modules), as DDP does at start-up (only the buffers, e.g. BatchNorm statistics, with
    ``buffers_only``); a tensor shared by several modules is sent once."""
    if _world() == 1:
        return
    seen: set[int] = set()
    for module in [modules] if isinstance(modules, nn.Module) else modules:
        for t in [*([] if buffers_only else module.parameters()), *module.buffers()]:
            if id(t) not in seen:
                seen.add(id(t))
                dist.broadcast(t.data, src=src)


@torch.no_grad()
def average_gradients(params: Any, flag: Tensor | None = None) -> bool:
    """Average the gradients of ``params`` over the ranks, as DDP's all-reduce does, for loops that
    step optimizers of their own (cohorts of peers); returns whether any rank raised ``flag``.

    One flat all-reduce carries every gradient and, in its last element, ``flag`` (a bool scalar,
    e.g. "my loss is non-finite"), so a rank whose loss went bad stops every rank at the same step
    instead of leaving the others waiting in a collective. Parameters without a gradient are skipped:
    the loops call this where every rank runs the same code, so the same ones have gradients.
    In a single-process run nothing is communicated and ``bool(flag)`` is returned.
    """
    grads = [p.grad for p in params if p.grad is not None]
    bad = flag if flag is not None else torch.zeros((), dtype=torch.bool)
    world = _world()
    if world == 1:
        return bool(bad)
    device = grads[0].device if grads else bad.device
    flat = torch.cat([*(g.reshape(-1).float() for g in grads), bad.to(device).float().reshape(1)])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g).to(g.dtype) / world)
        offset += n
    return bool(flat[-1] > 0)


def sync_rng_from_main() -> None:
    """Every rank takes rank 0's random-number state (Python, NumPy, torch).

    ``fit`` gives ranks other than 0 their own streams for dropout; a strategy that goes on after a
    ``fit`` (generating a transfer set, drawing the next generation's initialisation) must draw the
    same numbers on every rank, the ones a single-process run draws.
    """
    if _world() == 1:
        return
    from distill.train.checkpoint import rng_state, set_rng_state

    set_rng_state(broadcast_object(rng_state()))


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def _distributed_sampler(loader: Any) -> Any:
    from torch.utils.data.distributed import DistributedSampler

    for sampler in (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        if isinstance(sampler, DistributedSampler):
            return sampler
    return None


def set_loader_epoch(loader: Any, epoch: int) -> None:
    """``loader.set_epoch(epoch)``, or its DistributedSampler's (a DataLoader has no ``set_epoch``)."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
        return
    sampler = _distributed_sampler(loader)
    if sampler is not None:
        sampler.set_epoch(epoch)


@contextlib.contextmanager
def shard_loader(loader: Any, info: DistInfo | None = None, split: str = "batch") -> Iterator[Any]:
    """Within the block, ``loader`` yields only this rank's part of the data.

    A loader with ``set_shard`` (:class:`~distill.data.loader.InMemoryLoader`) is sharded and
    restored afterwards; a DataLoader with a DistributedSampler is checked (its ``num_replicas`` and
    ``rank`` must match the process group); anything else is refused with a clear error.
    """
    info = info or dist_info()
    if not info.enabled:
        yield loader
        return
    if hasattr(loader, "set_shard"):
        before = (getattr(loader, "rank", 0), getattr(loader, "world_size", 1), getattr(loader, "split", "batch"))
        loader.set_shard(info.rank, info.world_size, split)
        try:
            yield loader
        finally:
            loader.set_shard(*before)
        return
    sampler = _distributed_sampler(loader)
    if sampler is not None:
        if sampler.num_replicas != info.world_size or sampler.rank != info.rank:
            raise ValueError(
                f"the training loader's DistributedSampler is set for rank {sampler.rank} of {sampler.num_replicas}, "
                f"but this process is rank {info.rank} of {info.world_size}"
            )
        yield loader
        return
    raise ValueError(
        f"multi-process training (world size {info.world_size}) needs a training loader that each rank can shard: "
        f"an InMemoryLoader (sharded automatically), a DataLoader with a DistributedSampler, or any loader with a "
        f"set_shard(rank, world_size, split) method; got {type(loader).__name__}, on which every rank would "
        "train on all the data"
    )


# --------------------------------------------------------------------------------------------
# DDP around the Distiller's trainable parts
# --------------------------------------------------------------------------------------------


class TrainableParts(nn.Module):
    """The student and the methods (what the optimizer trains) as one module, for DDP.

    ``forward(batch)`` runs the whole Distiller step and returns its output as a dict (``total``,
    ``parts``, ``student``, ``teacher``) so that DDP can find its tensors. The teacher source is held
    as a plain attribute, not a submodule: DDP never broadcasts, all-reduces or wraps it.
    """

    def __init__(self, distiller: Any) -> None:
        super().__init__()
        self.student = distiller.student
        self.methods = distiller.methods
        object.__setattr__(self, "distiller", distiller)  # not registered: the teacher stays outside DDP

    def forward(self, batch: Any) -> dict[str, Any]:
        out = self.distiller(batch)
        return {"total": out.total, "parts": out.parts, "student": out.student, "teacher": out.teacher}


def _per_sample_buffer_names(methods: nn.ModuleDict, num_samples: int | None) -> list[str]:
    """Method buffers with one row per training sample, in methods that take the training set
    (``bind_data``): CRD's memory banks, KCD's records."""
    from distill.methods.base import Method

    if num_samples is None:
        return []
    names = []
    for name, method in methods.items():
        if type(method).bind_data is Method.bind_data:
            continue
        for bname, buf in method.named_buffers():
            if buf is not None and buf.dim() >= 1 and buf.shape[0] == num_samples:
                names.append(f"{name}.{bname}")
    return names


class PerSampleSync:
    """Keeps the methods' per-sample buffers identical on every rank.

    A method with per-sample state (CRD's momentum-updated memory banks, KCD's per-sample records)
    writes the rows of its own batch's samples. Called after each step with the batch's indices,
    this gathers every rank's indices and those rows and writes them on every rank, so each rank
    ends the step with all the rows the global batch updated, as a single process would have.
    Rows a rank writes for a sample of another rank's batch in the same step would be overwritten;
    no method of the library does that.
    """

    def __init__(self, methods: nn.ModuleDict, num_samples: int | None) -> None:
        self.methods = methods
        self.names = _per_sample_buffer_names(methods, num_samples)

    def __bool__(self) -> bool:
        return bool(self.names)

    def broadcast(self) -> None:
        """Give every rank rank 0's per-sample buffers (once, before training)."""
        buffers = dict(self.methods.named_buffers())
        for name in self.names:
            dist.broadcast(buffers[name], src=0)

    @torch.no_grad()
    def __call__(self, index: Tensor | None) -> None:
        if not self.names or dist.get_world_size() == 1:
            return
        if index is None:
            raise ValueError(
                f"the buffers {self.names} hold one row per training sample; keeping them equal on every rank "
                "needs each batch's sample indices (InMemoryLoader(..., return_index=True))"
            )
        buffers = dict(self.methods.named_buffers())  # looked up each step: a method may replace a buffer
        device = buffers[self.names[0]].device
        index = index.reshape(-1).to(device=device, dtype=torch.long)
        world = dist.get_world_size()
        count = torch.tensor([index.numel()], device=device)
        counts = [torch.zeros_like(count) for _ in range(world)]
        dist.all_gather(counts, count)
        sizes = [int(c) for c in counts]
        most = max(sizes)

        def gather(rows: Tensor) -> Tensor:
            padded = rows.new_zeros((most, *rows.shape[1:]))
            padded[: rows.shape[0]] = rows
            out = [torch.empty_like(padded) for _ in range(world)]
            dist.all_gather(out, padded)
            return torch.cat([o[:n] for o, n in zip(out, sizes)])

        every_index = gather(index)
        for name in self.names:
            buf = buffers[name]
            buf.index_copy_(0, every_index, gather(buf.index_select(0, index)))


def step_sizes(local_size: int, local_nonfinite: Tensor, device: torch.device) -> tuple[int, bool]:
    """One all-reduce per step: the global batch size and whether any rank's loss is non-finite.

    ``local_nonfinite``: a bool scalar (kept on the device, so a GPU step syncs once here).
    """
    stats = torch.stack([torch.tensor(float(local_size), device=device), local_nonfinite.to(device).float()])
    all_reduce_sum(stats)
    size, bad = stats.tolist()
    return round(size), bad > 0


class DDPDistiller:
    """A :class:`~distill.Distiller` whose trainable parts are wrapped in DDP; call it like the Distiller.

    Args:
        distiller: a prepared Distiller on this rank's device.
        num_samples: the training set's size (finds the methods' per-sample buffers).
        find_unused_parameters: DDP's flag; ``None``: on when a method has trainable parameters
            (a method switched off by a zero weight or warm-up leaves them without gradient).
    """

    def __init__(self, distiller: Any, num_samples: int | None = None,
                 find_unused_parameters: bool | None = None) -> None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        self.distiller = distiller
        self.sync = PerSampleSync(distiller.methods, num_samples)
        parts = TrainableParts(distiller)
        if self.sync:
            # rank 0's banks must not overwrite the others' every step: PerSampleSync keeps them equal
            DDP._set_params_and_buffers_to_ignore_for_model(parts, [f"methods.{n}" for n in self.sync.names])
            self.sync.broadcast()
        if find_unused_parameters is None:
            find_unused_parameters = any(p.requires_grad for p in distiller.methods.parameters())
        # DDP's default buffer handling: rank 0's buffers broadcast at start-up and before each forward
        self.ddp = DDP(parts, find_unused_parameters=bool(find_unused_parameters))

    def __call__(self, batch: Any) -> Any:
        from distill.distiller import DistillOutput

        return DistillOutput(**self.ddp(batch))

    def step_end(self, index: Tensor | None) -> None:
        """After ``optimizer.step()``: the Distiller's step hooks, then the per-sample rows of every rank."""
        self.distiller.step_end()
        self.sync(index)


# --------------------------------------------------------------------------------------------
# SyncBatchNorm
# --------------------------------------------------------------------------------------------


def convert_sync_batchnorm(distiller: Any, device: torch.device) -> int:
    """Replace the student's BatchNorm layers with SyncBatchNorm (statistics over the global batch).

    Parameters and buffers are kept (the optimizer's references stay valid), and so are the
    forward hooks of tapped BatchNorm layers. Returns the number of layers converted. torch runs
    SyncBatchNorm on GPU (CUDA/XPU) tensors only: on CPU this raises before any training.
    """
    student = distiller.student
    if isinstance(student, nn.modules.batchnorm._BatchNorm):
        raise TypeError("sync_bn: the student is itself a BatchNorm layer; wrap it in a module")
    if device.type == "cpu":
        raise ValueError(
            "sync_bn=True needs a GPU: torch's SyncBatchNorm runs on CUDA/XPU tensors only, and this run is on the "
            "CPU (gloo). Train without it (each rank then normalises with its own part of the batch) or on GPUs"
        )
    before = dict(student.named_modules())
    nn.SyncBatchNorm.convert_sync_batchnorm(student)
    converted = 0
    for path, module in student.named_modules():
        old = before.get(path)
        if old is not None and old is not module and isinstance(module, nn.SyncBatchNorm):
            converted += 1
            # the same hook dicts: a tap keeps recording, and its handle can still remove it
            module._forward_hooks = old._forward_hooks
            module._forward_pre_hooks = old._forward_pre_hooks
    return converted
