"""FedFTG: federated averaging whose global model the server fine-tunes by data-free distillation.

Zhang, Shen, Ding, Tao, Duan, "Fine-tuning Global Model via Data-Free Knowledge Distillation for
Non-IID Federated Learning", CVPR 2022, arXiv 2203.09249. The pieces live in
:mod:`distill.synthesis.federated`; this module runs the rounds. ``server_finetune=False`` is plain
FedAvg (McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data", AISTATS 2017, arXiv 1602.05629) on the same clients, the paper's baseline.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from distill.distiller import Distiller
from distill.models import create
from distill.papers import Paper
from distill.strategies.data_free_dfad import train_settings
from distill.strategies.registry import as_model, register_strategy
from distill.synthesis.federated import (
    ConditionalGenerator,
    class_counts,
    dirichlet_split,
    fedavg,
    fedftg_finetune,
    local_train,
)
from distill.synthesis.progress import StepProgress
from distill.train import FitResult, evaluate

__all__ = ["FEDFTG_PAPER", "FederatedFitResult", "fedftg"]

FEDFTG_PAPER = Paper("Fine-tuning Global Model via Data-Free Knowledge Distillation for Non-IID Federated Learning",
                     "Zhang, Shen, Ding, Tao, Duan", 2022, "2203.09249", "CVPR 2022")


@dataclass
class FederatedFitResult(FitResult):
    """:class:`~distill.train.FitResult` of the global model (``history``: one row per evaluated
    round, ``epoch`` = rounds done) plus the clients' class counts ``(M, K)``."""

    client_counts: Tensor | None = None


def _client_data(client_data: Any, train_loader: Any) -> tuple[Tensor, Tensor]:
    """The pooled client data: ``client_data=(x, y)``, else the tensors a loader holds
    (``.inputs``/``.targets`` of an :class:`~distill.data.loader.InMemoryLoader`), never iterated."""
    if client_data is None:
        x, y = getattr(train_loader, "inputs", None), getattr(train_loader, "targets", None)
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise ValueError("fedftg: give client_data=(images (N, C, H, W), labels (N,)) or a train_loader holding "
                             f"tensors .inputs/.targets (an InMemoryLoader); got {type(train_loader).__name__}")
        return x, y
    x, y = client_data
    if x.dim() != 4 or y.dim() != 1 or len(x) != len(y):
        raise ValueError(f"fedftg: client_data must be (images (N, C, H, W), labels (N,)); got shapes "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    return x, y


@register_strategy("fedftg", "data-free", FEDFTG_PAPER)
def fedftg(student: Any, train_loader: Any = None, val_loader: Any = None, *, teacher: None = None,
           client_data: tuple[Tensor, Tensor] | None = None, num_classes: int | None = None,
           num_clients: int = 100, beta: float = 0.3, rounds: int = 1000, active_fraction: float = 0.1,
           local_epochs: int = 5, local_batch_size: int = 50, local_lr: float | None = None,
           weight_decay: float | None = None,
           lr_decay: float = 0.998, server_finetune: bool = True, finetune_iterations: int = 10,
           generator_steps: int = 1, student_steps: int = 5, latent_dim: int = 100, lr_global: float = 0.01,
           lr_generator: float = 0.01, cls: float = 1.0, div: float = 1.0, eval_every: int = 1, seed: int = 0,
           progress: bool = True, run_dir: Any = None, epochs: int | None = None, **train: Any) -> FederatedFitResult:
    """FedAvg rounds on Dirichlet-split clients, each aggregate fine-tuned on the server by FedFTG.

    Clients: the pooled ``(x, y)`` split by :func:`~distill.synthesis.federated.dirichlet_split`
    (``num_clients``, ``beta``, ``seed``). Each round: every client is active with probability
    ``active_fraction`` (at least one); each active client starts from the current global model and
    runs :func:`~distill.synthesis.federated.local_train` on its own shard (``local_epochs``, plain
    SGD at ``local_lr * lr_decay**round``); the server averages the active clients by their sizes
    (:func:`~distill.synthesis.federated.fedavg`) and, with ``server_finetune``, fine-tunes that
    average with :func:`~distill.synthesis.federated.fedftg_finetune` from the active clients'
    models and class counts alone (its learning rates also decayed by ``lr_decay**round``). The
    generator (the zoo's ``dfad_generator`` fed ``[z, onehot(y)]``) persists across rounds.

    Defaults from the authors' code (``scripts/CIFAR10_FedFTG.sh``, ``methods/local_fn_gan.py``; the
    paper's text could not be read here): 100 clients, Dirichlet 0.3, 10% active, 5 local epochs,
    batch 50, lr 0.1, weight decay 1e-3, lr decay 0.998 per round, 1000 rounds; server: see
    :func:`~distill.synthesis.federated.fedftg_finetune`.

    ``train_loader`` is read only for the tensors it holds (the clients' pooled data; see
    ``client_data``), never iterated; ``teacher`` must be ``None`` (the clients are the teachers).
    ``student`` is the global model (module or factory); it ends holding the final global weights.
    From a recipe: ``epochs`` sets ``rounds``, ``train.lr`` / ``weight_decay`` the clients' SGD unless
    ``local_lr`` / ``weight_decay`` are given (``train.optimizer`` must be ``sgd``; ``train.momentum`` is
    not used: the clients run plain SGD, as the authors' code); ``run_dir`` is unused.
    """
    if teacher is not None:
        raise ValueError("fedftg: the client models are the teachers; pass teacher=None")
    opt = train_settings("fedftg", train, "sgd")
    rounds = epochs if epochs is not None else rounds
    local_lr = local_lr if local_lr is not None else opt.get("lr", 0.1)
    weight_decay = weight_decay if weight_decay is not None else opt.get("weight_decay", 1e-3)
    model = as_model(student, "fedftg")
    x, y = _client_data(client_data, train_loader)
    k = int(num_classes if num_classes is not None else int(y.max()) + 1)
    if not 0 < active_fraction <= 1:
        raise ValueError(f"fedftg: active_fraction must be in (0, 1]; got {active_fraction!r}")
    for name, v in (("rounds", rounds), ("local_epochs", local_epochs), ("eval_every", eval_every)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"fedftg: {name} must be a positive int; got {v!r}")
    splits = dirichlet_split(y, num_clients, beta, num_classes=k, seed=seed)
    counts = class_counts(y, splits, k)
    sizes = counts.sum(1)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    c, h, _ = x.shape[1:]
    generator = ConditionalGenerator(create("dfad_generator", latent_dim=latent_dim + k, image_size=h, channels=c), k)
    result = FederatedFitResult(run_dir=None, client_counts=counts)
    t0 = time.perf_counter()
    with StepProgress(progress, "fedftg" if server_finetune else "fedavg", rounds) as bar:
        for r in range(rounds):
            active = torch.nonzero(torch.rand(num_clients, generator=g) <= active_fraction).flatten()
            if active.numel() == 0:
                active = torch.randint(num_clients, (1,), generator=g)
            decay = lr_decay ** r
            clients = []
            for j in active.tolist():
                local = copy.deepcopy(model)
                ix = splits[j]
                local_train(local, x[ix], y[ix], epochs=local_epochs, batch_size=local_batch_size,
                            lr=local_lr * decay, weight_decay=weight_decay,
                            seed=int(torch.randint(2 ** 31 - 1, (1,), generator=g)))
                clients.append(local)
            model.load_state_dict(fedavg(clients, sizes[active].tolist()))
            info = ""
            if server_finetune:
                parts = fedftg_finetune(model, clients, counts[active], generator, iterations=finetune_iterations,
                                        generator_steps=generator_steps, student_steps=student_steps,
                                        batch_size=local_batch_size, latent_dim=latent_dim,
                                        lr_global=lr_global * decay, lr_generator=lr_generator * decay,
                                        weight_decay=weight_decay, cls=cls, div=div,
                                        seed=int(torch.randint(2 ** 31 - 1, (1,), generator=g)))
                info = f"md {parts['md']:.3f}"
            if val_loader is not None and ((r + 1) % eval_every == 0 or r + 1 == rounds):
                metrics = evaluate(Distiller(model, None, {"ce": 1.0}), val_loader)
                result.history.append({"epoch": r + 1, "time_s": time.perf_counter() - t0,
                                       "active_clients": int(active.numel()), **metrics})
                info += f" acc {metrics['student_acc']:.2f}"
            bar.advance(info)
    model.eval()
    accs = [row["student_acc"] for row in result.history]
    if accs:
        result.last_acc, result.best_acc = accs[-1], max(accs)
        result.best_epoch = result.history[accs.index(result.best_acc)]["epoch"]
    result.time_s = time.perf_counter() - t0
    return result
