r"""Codistillation across processes: each worker trains its own model and distils from its peers'
stale predictions.

Paper: R. Anil, G. Pereyra, A. Passos, R. Ormandi, G. E. Dahl, G. E. Hinton, "Large scale
distributed neural network training through online distillation", ICLR 2018, arXiv 1804.03235.

Each of the W processes started by ``torchrun`` is one worker with its own model and its own
part of the data. Worker i minimises

.. math::
    L_i = L_{CE}(z_i, y) + \psi\, T^2\, \mathrm{KL}\Big(\frac{1}{W-1}\sum_{j \ne i}
          \operatorname{softmax}(\tilde z_j / T) \,\Big\|\, \operatorname{softmax}(z_i / T)\Big)

where :math:`\tilde z_j` are worker j's logits computed *locally* by worker i with a copy of
worker j's weights as of the last exchange (stale), and the distillation term is off during the
first ``burn_in_steps`` optimizer steps. As in the paper the workers exchange weights, not
predictions: every ``exchange_every`` steps each worker all-gathers the others' parameters and
buffers (``torch.distributed``) into frozen copies (:class:`PeerTeacher`), and runs them as its
teachers until the next exchange. The loss is the registered method ``codistillation``
(:class:`~distill.methods.online.Codistillation`) next to ``ce``; each worker's training loop is
an ordinary :func:`distill.fit` run without DDP (the models are not averaged).

Differences from the paper, all documented choices: the paper's ψ is a cross-entropy to the peers'
average prediction, here a KL, which differs by the target's entropy and has the same gradients;
the paper's workers are groups of machines running synchronous or asynchronous SGD, here one
process each; the paper states no exchange interval or burn-in length to copy, so
``exchange_every=50`` and ``burn_in_steps=exchange_every`` (the first exchange after the start:
before it the copies hold the other workers' random initial weights) are this library's.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from distill.batch import Batch, View
from distill.data.augment import mix_seed
from distill.distiller import Distiller
from distill.methods.online import Codistillation
from distill.strategies.registry import as_model, register_strategy
from distill.taps import logits_of
from distill.teachers import TeacherSource, freeze
from distill.train import distributed as D
from distill.train.loop import FitResult, fit

__all__ = ["DATA_MODES", "CodistillationResult", "PeerTeacher", "fit_codistillation"]

DATA_MODES = ("shard", "same")


def _comm_device() -> torch.device:
    """Where tensors must be for the default group's collectives (nccl: this process's GPU)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class PeerTeacher(TeacherSource):
    """The other workers' models as of the last exchange: the teacher source of codistillation.

    Holds ``W - 1`` frozen copies of the student (eval mode, no gradients). :meth:`exchange`
    all-gathers every worker's parameters and buffers and loads the others' into the copies, in rank
    order; it runs once at construction and then after every ``exchange_every`` optimizer steps
    (:meth:`on_step_end`, which ``Distiller.step_end`` calls). Collectives: every worker must take
    the same number of steps (equal loader lengths) and build the same architecture (checked here).

    The view: ``"peer_logits"`` (P, B, K), the copies' logits, and ``"logits"`` (B, K), the log of
    their mean probability (so that evaluation reports the peers' ensemble as "teacher").

    Args:
        student: this worker's model (copied for the shape of the peers; never modified here).
        exchange_every: optimizer steps between exchanges (>= 1).
    """

    kind = "peers"
    static = False  # the copies change at every exchange: fit saves them in last.pt and re-evaluates

    def __init__(self, student: nn.Module, exchange_every: int = 50) -> None:
        super().__init__()
        if not isinstance(student, nn.Module):
            raise TypeError(f"student must be an nn.Module, got {type(student).__name__}")
        if isinstance(exchange_every, bool) or not isinstance(exchange_every, int) or exchange_every < 1:
            raise ValueError(f"exchange_every must be an integer >= 1, got {exchange_every!r}")
        info = D.dist_info()
        if not (dist.is_available() and dist.is_initialized()) or info.world_size < 2:
            raise RuntimeError(
                "PeerTeacher exchanges weights with the other workers: it needs an initialised process group of at "
                "least 2 processes (launch with torchrun --nproc_per_node=2 ..., then distill.train.distributed."
                "init_distributed())"
            )
        self.rank, self.world_size = info.rank, info.world_size
        self.exchange_every = exchange_every
        self.steps = 0
        self.last_exchange_step = -1
        self.exchanges = 0
        self.peers = nn.ModuleList(freeze(_bare_copy(student)) for _ in range(self.world_size - 1))
        layout = [(k, tuple(v.shape), str(v.dtype)) for k, v in student.state_dict().items()]
        layouts = D.all_gather_object(layout)
        for r, other in enumerate(layouts):
            if other != layout:
                diff = sorted(set(other).symmetric_difference(layout))[:3]
                raise ValueError(
                    f"codistillation exchanges weights between workers of one architecture, but worker {r}'s model "
                    f"differs from worker {self.rank}'s (state entries {diff})"
                )
        self.exchange(student)

    # the step count travels with state_dict(): a resumed worker exchanges on the same steps
    def get_extra_state(self) -> dict[str, int]:
        return {"steps": self.steps, "last_exchange_step": self.last_exchange_step, "exchanges": self.exchanges}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.steps = int(state["steps"])
        self.last_exchange_step = int(state["last_exchange_step"])
        self.exchanges = int(state["exchanges"])

    def train(self, mode: bool = True) -> PeerTeacher:
        self.training = mode
        self.peers.eval()  # the copies predict; they never train, and their BatchNorm never moves
        return self

    @torch.no_grad()
    def exchange(self, student: nn.Module) -> None:
        """All-gather every worker's ``student.state_dict()``; copy ``j`` gets the j-th other worker's."""
        device = _comm_device()
        mine = student.state_dict()
        others = [r for r in range(self.world_size) if r != self.rank]
        # one collective per dtype (float weights, integer counters), each a flat vector
        for dtype in sorted({v.dtype for v in mine.values()}, key=str):
            keys = [k for k, v in mine.items() if v.dtype == dtype]
            flat = torch.cat([mine[k].reshape(-1) for k in keys]).to(device)
            gathered = [torch.empty_like(flat) for _ in range(self.world_size)]
            dist.all_gather(gathered, flat)
            for peer, r in zip(self.peers, others):
                theirs = peer.state_dict()
                for k, part in zip(keys, gathered[r].split([mine[k].numel() for k in keys])):
                    theirs[k].copy_(part.view_as(theirs[k]))
        self.last_exchange_step = self.steps
        self.exchanges += 1

    def on_step_end(self, student: nn.Module) -> None:
        self.steps += 1
        if self.steps % self.exchange_every == 0:
            self.exchange(student)

    def forward(self, batch: Batch) -> View:
        with torch.no_grad():
            peer_logits = torch.stack([logits_of(p(batch.inputs)) for p in self.peers])  # (P, B, K)
        # log of the peers' mean probability: their ensemble, for evaluation and logit-reading methods
        ensemble = torch.logsumexp(F.log_softmax(peer_logits, dim=-1), dim=0) - math.log(peer_logits.shape[0])
        return {"peer_logits": peer_logits, "logits": ensemble}

    def extra_repr(self) -> str:
        return (f"rank={self.rank}, world_size={self.world_size}, exchange_every={self.exchange_every}, "
                f"steps={self.steps}, last_exchange_step={self.last_exchange_step}")


def _bare_copy(model: nn.Module) -> nn.Module:
    """A deep copy without forward hooks (taps installed on the student must not record the peers)."""
    twin = copy.deepcopy(model)
    for m in twin.modules():
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
    return twin


@dataclass
class CodistillationResult(FitResult):
    """This worker's :class:`~distill.train.FitResult`, plus ``rank``, ``world_size``, ``workers``
    (every worker's ``{"rank", "best_acc", "last_acc", "run_dir"}``, in rank order), ``model``
    (this worker's trained model) and ``peers`` (its :class:`PeerTeacher`)."""

    rank: int = 0
    world_size: int = 1
    workers: list[dict[str, Any]] = field(default_factory=list)
    model: nn.Module | None = None
    peers: PeerTeacher | None = None


def _check_args(teacher: Any, weight: float, T: float, exchange_every: int, burn_in_steps: int | None,
                data: str, epochs: int, fit_kwargs: dict[str, Any]) -> None:
    if teacher is not None:
        raise ValueError("codistillation has no teacher of its own (the workers teach each other): pass teacher=None")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"weight (the paper's psi) must be a finite number >= 0, got {weight!r}")
    if isinstance(T, bool) or not isinstance(T, (int, float)) or not math.isfinite(T) or T <= 0:
        raise ValueError(f"T must be a finite number > 0, got {T!r}")
    if isinstance(exchange_every, bool) or not isinstance(exchange_every, int) or exchange_every < 1:
        raise ValueError(f"exchange_every must be an integer >= 1, got {exchange_every!r}")
    if burn_in_steps is not None and (isinstance(burn_in_steps, bool) or not isinstance(burn_in_steps, int)
                                      or burn_in_steps < 0):
        raise ValueError(f"burn_in_steps must be None or an integer >= 0, got {burn_in_steps!r}")
    if data not in DATA_MODES:
        raise ValueError(f"data must be one of {DATA_MODES}, got {data!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs <= 0:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if "ddp" in fit_kwargs:
        raise ValueError("codistillation workers train separate models: fit's ddp is always off (remove 'ddp')")


@register_strategy("codistillation", "online", Codistillation.paper)  # type: ignore[arg-type]
def fit_codistillation(
    student: nn.Module | Callable[[], nn.Module],
    train_loader: Iterable[Any],
    val_loader: Iterable[Any] | None = None,
    *,
    teacher: Any = None,
    epochs: int,
    run_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    weight: float = 1.0,
    T: float = 1.0,
    exchange_every: int = 50,
    burn_in_steps: int | None = None,
    data: str = "shard",
    **fit_kwargs: Any,
) -> CodistillationResult:
    """Codistillation: one worker per process, CE + psi * KL to the peers' stale average prediction.

    Run the same script in every process (``torchrun --nproc_per_node=W script.py``); each call
    trains this process's worker and returns its result.

    Args:
        student: this worker's model, or a zero-argument factory (called with torch seeded by
            ``(seed, rank)``, so the workers start from different weights, as the paper's
            independently initialised models do).
        train_loader: the training data; ``data="shard"`` (default) gives each worker its own
            part of every epoch (``InMemoryLoader.set_shard(rank, W, split="samples")``, or a
            DataLoader with a DistributedSampler): the paper's workers train on different data;
            ``"same"``: every worker iterates the whole loader.
        val_loader: evaluated by every worker (the peers' ensemble is reported as the teacher).
        teacher: must be ``None``; the workers teach each other.
        epochs, seed, progress: as in :func:`distill.fit` (progress on rank 0 only).
        run_dir: each worker writes to ``run_dir/worker<rank>``.
        weight: psi, the distillation term's weight (1).
        T: temperature of the distillation term (1, the paper's plain predictions).
        exchange_every: optimizer steps between weight exchanges (50, this library's choice).
        burn_in_steps: steps of plain CE before the distillation term switches on (default
            ``exchange_every``).
        data: ``"shard"`` or ``"same"`` (above).
        **fit_kwargs: passed to :func:`distill.fit` (optimizer, lr, schedule, device, ...).

    Raises:
        ValueError: bad arguments, or a launch with a single process (before any training).
    """
    _check_args(teacher, weight, T, exchange_every, burn_in_steps, data, epochs, fit_kwargs)
    info = D.dist_info()
    if not info.enabled:
        raise ValueError(
            "codistillation trains one model per process and needs at least 2 processes: launch with "
            "torchrun --nproc_per_node=2 ... (WORLD_SIZE is 1)"
        )
    device = fit_kwargs.get("device")
    if device is not None:
        fit_kwargs["device"] = device = D.resolve_device(device, info)
    info = D.init_distributed(device)
    worker_seed = seed if info.rank == 0 else mix_seed(seed, info.rank)
    torch.manual_seed(worker_seed)  # a factory builds each worker's model from its own initialisation
    model = as_model(student, "codistillation")
    if device is not None:
        model.to(device)

    peers = PeerTeacher(model, exchange_every)  # before the Distiller installs taps on the student
    burn_in = exchange_every if burn_in_steps is None else burn_in_steps
    distiller = Distiller(model, peers, losses={"ce": 1.0, "codistillation": Codistillation(T=T, burn_in_steps=burn_in,
                                                                                            weight=float(weight))})
    worker_dir = Path(run_dir) / f"worker{info.rank}" if run_dir is not None else None
    with D.shard_loader(train_loader, info, split="samples") if data == "shard" else contextlib.nullcontext(train_loader):
        result = fit(distiller, train_loader, val_loader, epochs=epochs, run_dir=worker_dir, seed=worker_seed,
                     progress=progress and info.is_main, ddp=False, **fit_kwargs)
    workers = D.all_gather_object({"rank": info.rank, "best_acc": result.best_acc, "last_acc": result.last_acc,
                                   "run_dir": str(worker_dir) if worker_dir is not None else None})
    base = {f.name: getattr(result, f.name) for f in fields(FitResult)}
    return CodistillationResult(**base, rank=info.rank, world_size=info.world_size, workers=workers, model=model,
                                peers=peers)
