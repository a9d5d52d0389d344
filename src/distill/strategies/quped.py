"""QuPeD: quantised personalised models distilled with a global model, on simulated federated clients.

Ozkara, Singh, Data, Diggavi, "QuPeD: Quantized Personalization via Distillation with Applications
to Federated Learning", NeurIPS 2021, arXiv 2107.13892. The quantiser's math is in
:mod:`distill.functional.quped`; the clients are a Dirichlet non-IID split
(:func:`distill.synthesis.federated.dirichlet_split`) averaged by :func:`~distill.synthesis.federated.fedavg`.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from distill import functional as DF
from distill.methods.base import Paper
from distill.progress import StepProgress
from distill.strategies.chain import build_model
from distill.strategies.data_free_dfad import train_settings
from distill.strategies.registry import register_strategy
from distill.synthesis.federated import dirichlet_split, fedavg
from distill.train.loop import FitResult

__all__ = ["QUPED_PAPER", "QuPeDClient", "QuPeDResult", "quped", "quped_step"]

QUPED_PAPER = Paper("QuPeD: Quantized Personalization via Distillation with Applications to Federated Learning",
                    "K. Ozkara, N. Singh, D. Data, S. Diggavi", 2021, "2107.13892", "NeurIPS 2021")
QUPED_MODES = ("quped", "local", "fedavg")


class QuPeDClient:
    """One client: its personal model (latent weights ``x`` and, per quantised tensor, centres ``c``),
    its train/test shards. :meth:`quantized` is the model it deploys, every quantised tensor ``Q_c(x)``."""

    def __init__(self, model: nn.Module, names: list[str], num_centers: int, x: Tensor, y: Tensor,
                 xt: Tensor, yt: Tensor) -> None:
        self.model, self.names = model, names
        params = dict(model.named_parameters())
        self.centers = {n: DF.quped_init_centers(params[n], num_centers) for n in names}
        self.x, self.y, self.xt, self.yt = x, y, xt, yt

    def quantized(self) -> nn.Module:
        """A copy of the personal model with every quantised tensor replaced by ``Q_c(x)``."""
        q = copy.deepcopy(self.model)
        with torch.no_grad():
            for n, p in q.named_parameters():
                if n in self.centers:
                    p.copy_(DF.quped_quantize(p, self.centers[n]))
        return q


@dataclass
class QuPeDResult(FitResult):
    """:class:`FitResult` of the clients' personalised accuracy (``history``: per evaluated round,
    ``val_student_acc`` the mean over clients of their quantised model's accuracy on their own test
    shard, weighted by its size; ``global_acc`` the global model's on the same shards) plus the clients."""

    clients: list[QuPeDClient] = field(default_factory=list)
    client_accs: list[float] = field(default_factory=list)
    global_model: nn.Module | None = None


def _quantized_names(model: nn.Module) -> list[str]:
    """Weight tensors of dim >= 2, except the first and the last (kept full precision, as the authors' code)."""
    names = [n for n, p in model.named_parameters() if p.dim() >= 2]
    return names[1:-1] if len(names) > 2 else names


@torch.no_grad()
def _correct(model: nn.Module, x: Tensor, y: Tensor) -> int:
    was = model.training
    model.eval()
    out = int((model(x).argmax(1) == y).sum())
    model.train(was)
    return out


def _client_tensors(client_data: Any, train_loader: Any) -> tuple[Tensor, Tensor]:
    if client_data is not None:
        x, y = client_data
    else:
        x, y = getattr(train_loader, "inputs", None), getattr(train_loader, "targets", None)
    if not isinstance(x, Tensor) or not isinstance(y, Tensor) or y.dim() != 1 or len(x) != len(y):
        raise ValueError("quped: give client_data=(inputs (N, ...), labels (N,)) or a train_loader holding tensors "
                         f".inputs/.targets (an InMemoryLoader); got {type(train_loader).__name__}")
    return x, y


def quped_step(model: nn.Module, centers: dict[str, Tensor], w: nn.Module | None, xb: Tensor, yb: Tensor, *,
               lr: float, lr_centers: float, lam: float, lambda_p: float, T: float, frozen: bool = False,
               personal: bool = True) -> None:
    """One local iteration of a QuPeD client on a batch ``xb`` ``(B, ...)``, ``yb`` ``(B,)``, in place.

    ``model``: the personal model (latent weights ``x``; ``centers`` maps each quantised parameter's name
    to its centres ``(m,)``, replaced by the updated ones); ``w``: the client's copy of the global model
    (``None``: no global model, no distillation). ``personal=False`` updates ``w`` alone with
    cross-entropy (FedAvg's client). The updates, all from the same batch, each with the others' outputs
    as fixed targets (``KD(s <- t) = T^2 KL(softmax(t/T) || softmax(s/T))``, ``lp = lambda_p``):

    * ``x <- prox_{lr·lam·R(·, c)}(x - lr ∇_x[(1 - lp) CE(p_x) + lp KD(p_x <- w)])`` for the quantised
      tensors; the other parameters of ``model`` take the plain step (unless ``frozen``: then the quantised
      tensors stay, and the other parameters step on the loss at ``Q_c(x)``);
    * ``c <- sort(c - lr_centers · quped_center_grad(x, c, ∇_q[(1 - lp) CE(p_q) + lp KD(p_q <- w)], lam))``,
      ``q = Q_c(x)`` (``lam`` taken as 0 when ``frozen``);
    * ``w <- w - lr ∇_w[(1 - lp) CE(w) + lp KD(w <- p_q)]``.

    All three from the same iterate ``(x, c, w)``; the authors' code takes the centres' step after
    ``x``'s (at the new ``x``) — the same fixed points, one forward pass fewer here.
    """
    if not personal:
        assert w is not None
        loss_w = F.cross_entropy(w(xb), yb)
        w.zero_grad(set_to_none=True)
        loss_w.backward()
        with torch.no_grad():
            for p in w.parameters():
                if p.grad is not None:
                    p.sub_(lr * p.grad)
        return
    lp = lambda_p  # (no global model: the objective is the cross-entropy alone)

    def objective(z: Tensor, zt: Tensor | None) -> Tensor:
        ce = F.cross_entropy(z, yb)
        return ce if zt is None else (1 - lp) * ce + lp * DF.kd_loss(z, zt.detach(), T)

    params = dict(model.named_parameters())
    q = {n: DF.quped_quantize(params[n].detach(), centers[n]).requires_grad_(True) for n in centers}
    # at Q_c(x) the unquantised parameters are detached, except once frozen: then the deployed model
    # Q_c(x) is the only one left and they learn there
    rest = {n: p if frozen else p.detach() for n, p in params.items() if n not in q}
    zq = functional_call(model, {**rest, **q}, (xb,))
    zw = w(xb) if w is not None else None
    loss_q = objective(zq, zw)
    total = loss_q if frozen else loss_q + objective(model(xb), zw)
    if zw is not None:
        total = total + objective(zw, zq)
    model.zero_grad(set_to_none=True)
    if w is not None:
        w.zero_grad(set_to_none=True)
    grads_q = torch.autograd.grad(loss_q, list(q.values()), retain_graph=True)
    total.backward()
    x_now = {n: params[n].detach().clone() for n in centers}  # every update is taken from the same iterate
    with torch.no_grad():
        for n, p in params.items():
            if n in centers and frozen:
                continue
            if p.grad is not None:
                p.sub_(lr * p.grad)
            if n in centers:
                p.copy_(DF.quped_prox(p, centers[n], lr * lam))
        for n, gq in zip(q, grads_q):
            step = DF.quped_center_grad(x_now[n], centers[n], gq, 0.0 if frozen else lam)
            centers[n] = torch.sort(centers[n] - lr_centers * step).values
        if w is not None:
            for p in w.parameters():
                if p.grad is not None:
                    p.sub_(lr * p.grad)


@register_strategy("quped", "compression", QUPED_PAPER)
def quped(student: Any, train_loader: Any = None, val_loader: Any = None, *, teacher: None = None,
          client_data: tuple[Tensor, Tensor] | None = None, personal: Any = None, mode: str = "quped",
          num_clients: int = 10, beta: float = 0.5, test_fraction: float = 0.25, rounds: int = 50,
          local_steps: int = 10, batch_size: int = 32, lr: float | None = None, lr_centers: float = 1e-4,
          lam: float = 1e-3, lambda_p: float = 0.5, T: float = 1.0, num_centers: int = 2,
          finetune_fraction: float = 0.2, eval_every: int = 5, seed: int = 0, progress: bool = True,
          run_dir: Any = None, epochs: int | None = None, **train: Any) -> QuPeDResult:
    """QuPeD rounds: each client alternates proximal updates of its quantised personal model and
    gradient steps of its copy of the global model, each distilled from the other; the server averages.

    Objective of client ``i`` (personal latent weights ``x_i``, centres ``c_i``, global ``w``):
    ``F_i = (1 - λ_p)(f_i(Q(x_i)) + f_i(w)) + λ_p (KD(Q(x_i) ← w) + KD(w ← Q(x_i))) + λ R(x_i, c_i)``,
    ``f_i`` the cross-entropy on the client's data, ``KD(s ← t) = T² KL(softmax(t/T) ‖ softmax(s/T))``,
    ``R`` :func:`~distill.functional.quped_relaxation`. Per local iteration on a batch of the client's data:

    1. ``x``: a gradient step on ``(1 - λ_p) f_i + λ_p KD(· ← w)`` at the latent weights (the authors'
       code evaluates this gradient at full precision), then ``x <- prox_{lr · λ_t R(·, c)}(x)``
       (:func:`~distill.functional.quped_prox`); the personal model's unquantised parameters (first and
       last layers, biases, BatchNorm) take the plain gradient step;
    2. ``c``: ``c <- c - lr_centers · g`` with ``g`` :func:`~distill.functional.quped_center_grad` of the
       same loss evaluated at ``Q_c(x)``; centres kept sorted;
    3. ``w``: a gradient step on ``(1 - λ_p) f_i(w) + λ_p KD(w ← Q_c(x))``.

    After ``local_steps`` iterations the server averages the clients' ``w`` by their sizes (every client
    takes part each round). ``λ_t = lam · (t + 1)`` grows with the round ``t`` (the code's schedule per
    epoch). In the last ``finetune_fraction`` of the rounds the quantised tensors are frozen at
    ``Q_c(x)`` and only the centres (with ``λ = 0``) and the unquantised parameters train (the code's
    fine-tuning after ``freeze_epoch``).

    ``mode="local"``: no server, ``λ_p = 0`` (each client's quantised model from its own data);
    ``mode="fedavg"``: only the global model, FedAvg, scored on every client's test shard.

    Defaults: ``num_centers=2`` (1 bit), the clip at 10, the centre initialisation and ``lr_centers=1e-4``
    (the code's initial ``lr2``, which it then decays to 1e-5 and 1e-6) are the authors' code's; every other value (clients, Dirichlet β = 0.5, rounds, local steps, batch 32, lr 0.05 plain
    SGD, ``lam = 1e-3``, ``λ_p = 0.5``, ``T = 1``) is ours for MNIST-sized runs on CPU: the
    paper's text could not be read here.

    Args:
        student: the global model's architecture (module or factory; a module becomes the global model).
        train_loader: read only for its tensors (``.inputs``/``.targets``), the pooled client data, or
            ``client_data=(x, y)``. Each client's shard is split into train and test (``test_fraction``).
        personal: the personal models' architecture (factory, zoo name or spec); default: the student's.
        epochs: from a recipe, sets ``rounds``. ``lr`` defaults to the recipe's ``train.lr`` or 0.05
            (``train.momentum`` / ``weight_decay`` are not used: plain SGD). ``val_loader`` and ``run_dir``
            are unused: each client is scored on its own test shard, nothing is written.

    Returns:
        :class:`QuPeDResult`; ``last_acc`` is the final personalised accuracy (%).
    """
    if teacher is not None:
        raise ValueError("quped: the global model is the personal models' teacher; pass teacher=None")
    if mode not in QUPED_MODES:
        raise ValueError(f"quped: mode must be one of {QUPED_MODES}; got {mode!r}")
    opt = train_settings("quped", train, "sgd")
    rounds = epochs if epochs is not None else rounds
    lr = lr if lr is not None else opt.get("lr", 0.05)
    for name, v in (("rounds", rounds), ("local_steps", local_steps), ("batch_size", batch_size),
                    ("eval_every", eval_every), ("num_centers", num_centers)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"quped: {name} must be a positive int; got {v!r}")
    if num_centers < 2:
        raise ValueError(f"quped: num_centers must be >= 2; got {num_centers}")
    if not 0 <= lambda_p <= 1:
        raise ValueError(f"quped: lambda_p must be in [0, 1]; got {lambda_p!r}")
    if not 0 < test_fraction < 1 or not 0 <= finetune_fraction < 1:
        raise ValueError(f"quped: test_fraction must be in (0, 1) and finetune_fraction in [0, 1); got "
                         f"{test_fraction!r}, {finetune_fraction!r}")
    if not (T > 0 and lr > 0 and lr_centers >= 0 and lam >= 0):
        raise ValueError(f"quped: need T > 0, lr > 0, lr_centers >= 0, lam >= 0; got {T}, {lr}, {lr_centers}, {lam}")
    x_all, y_all = _client_tensors(client_data, train_loader)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    global_model = student if isinstance(student, nn.Module) else build_model(student, "student")
    splits = dirichlet_split(y_all, num_clients, beta, num_classes=int(y_all.max()) + 1, seed=seed)
    clients: list[QuPeDClient] = []
    for ix in splits:
        ix = ix[torch.randperm(len(ix), generator=g)]
        n_test = max(1, int(round(test_fraction * len(ix))))
        if len(ix) - n_test < 1:
            raise ValueError(f"quped: a client has {len(ix)} samples, too few for a train and a test part: "
                             "use fewer clients")
        model = build_model(personal, "personal") if personal is not None else copy.deepcopy(global_model)
        names = _quantized_names(model)
        clients.append(QuPeDClient(model, names, num_centers, x_all[ix[n_test:]], y_all[ix[n_test:]],
                                   x_all[ix[:n_test]], y_all[ix[:n_test]]))
    sizes = [len(c.y) for c in clients]
    lp = 0.0 if mode == "local" else lambda_p
    freeze_at = rounds - int(finetune_fraction * rounds)
    result = QuPeDResult(clients=clients)
    t0 = time.perf_counter()

    with StepProgress(progress, f"quped ({mode})", rounds) as bar:
        for r in range(rounds):
            lam_t = lam * (r + 1)
            frozen = r >= freeze_at
            if frozen and r == freeze_at and mode != "fedavg":
                for c in clients:  # the quantised tensors take their centres' values for good
                    with torch.no_grad():
                        for n, p in c.model.named_parameters():
                            if n in c.centers:
                                p.copy_(DF.quped_quantize(p, c.centers[n]))
            locals_: list[nn.Module] = []
            for c in clients:
                w = copy.deepcopy(global_model)
                w.train()
                c.model.train()
                for _ in range(local_steps):
                    b = torch.randint(len(c.y), (min(batch_size, len(c.y)),), generator=g)
                    xb, yb = c.x[b], c.y[b]
                    quped_step(c.model, c.centers, w if mode != "local" else None, xb, yb, lr=lr,
                               lr_centers=lr_centers, lam=lam_t, lambda_p=lp, T=T, frozen=frozen,
                               personal=mode != "fedavg")
                locals_.append(w)
            if mode != "local":
                global_model.load_state_dict(fedavg(locals_, sizes))
            if (r + 1) % eval_every == 0 or r + 1 == rounds:
                correct = [_correct(global_model if mode == "fedavg" else c.quantized(), c.xt, c.yt) for c in clients]
                n_test = sum(len(c.yt) for c in clients)
                acc = 100.0 * sum(correct) / n_test
                g_acc = 100.0 * sum(_correct(global_model, c.xt, c.yt) for c in clients) / n_test
                result.client_accs = [100.0 * k / len(c.yt) for k, c in zip(correct, clients)]
                result.history.append({"epoch": r + 1, "time_s": time.perf_counter() - t0,
                                       "val_student_acc": acc, "global_acc": g_acc})
                bar.advance(f"acc {acc:.1f}")
            else:
                bar.advance()
    result.global_model = global_model
    result.last_acc = result.history[-1]["val_student_acc"]
    best = max(result.history, key=lambda h: h["val_student_acc"])
    result.best_acc, result.best_epoch = best["val_student_acc"], best["epoch"]
    result.time_s = time.perf_counter() - t0
    return result
