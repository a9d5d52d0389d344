"""Class-incremental learning with a small exemplar memory: D3Former and its two baselines.

Paper: A. Mohamed, R. Grandhe, K. J. Joseph, S. Khan, F. Khan, "D3Former: Debiased Dual Distilled Transformer
for Incremental Learning", CVPR Workshops 2023, arXiv 2208.00777 (the issue's "Kim et al." is not the
authors). The classes arrive in ``num_tasks`` groups; after each phase ``memory_per_class`` exemplars per
class are kept (herding on the features, iCaRL's rule, :func:`distill.synthesis.coresets.herding_select`) and
the model of the previous phase is the frozen teacher of the next. ``method``:

* ``"d3former"``: a cosine-normalised classifier ``σ · cos(f, w_c)`` (LUCIR's, which D3Former builds on; new
  classes' weights imprinted from their mean normalised feature), trained with

  .. math::
      L = \\mathrm{CE}(z + \\tau \\log \\pi, y) + \\lambda_k \\frac{1}{|E|}\\sum_{b \\in E} (1 - \\cos(f_b, f^{old}_b))
          + \\gamma\\, \\frac{1}{|E|L}\\sum_{b\\in E, l} |\\hat c_{b,l} - \\hat c^{old}_{b,l}|

  the logit-adjusted cross-entropy with the phase's class frequencies ``π`` (the debiasing; the adjustment
  is used in training only), the feature ("output") distillation on the exemplars ``E`` of the batch with
  LUCIR's adaptive weight ``λ_k = λ · sqrt(n_old / n_new)``, and the attention distillation between the
  Grad-CAM maps over the patch tokens of ``cam_layer`` (:func:`~distill.functional.token_gradcam`, each model
  explaining its own top class, differentiable in the current model).
* ``"lwf"``: plain-KD incremental learning (LwF-like, Li & Hoiem 2016): a linear head, cross-entropy plus
  ``T² KL`` (``T = 2``) between the old classes' logits of the current and the previous model, all samples.
* ``"finetune"``: a linear head and cross-entropy only.

All three replay the same exemplar memory, so the rows differ by the distillation and the debiasing only.

Defaults: ``λ = 10`` (``the_lambda``), ``τ = 1`` (``tau``), ``γ = 0.1`` (``attention_weight``) are the authors' CIFAR-100 command (README of
github.com/abdohelmy/D-3Former; the paper's experiment section could not be read here); the adaptive ``λ_k`` is
LUCIR's, as in the code's base trainer. Departures: the authors' Grad-CAM term goes through numpy images
(``show_cam_on_image``), so no gradient reaches the model in their code; ours is differentiable, as the paper's
loss is written. Their backbone is a nested hierarchical ViT (NesT); ours is any zoo ViT (``vit_tiny``...) with
a ``head`` on the class token; ``memory_per_class = 20`` (LUCIR's) and the class order (``0..K-1``, or a
seeded permutation with ``shuffle_classes``) are ours.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill import functional as DF
from distill.data.loader import InMemoryLoader, in_memory_tensors
from distill.papers import Paper
from distill.progress import StepProgress
from distill.strategies.metadistil import write_history
from distill.strategies.registry import as_model, register_strategy
from distill.synthesis.coresets import herding_select
from distill.train import FitResult
from distill.train.schedules import make_optimizer

__all__ = ["D3FORMER_PAPER", "INCREMENTAL_METHODS", "CosineHead", "IncrementalResult", "fit_class_incremental"]

D3FORMER_PAPER = Paper("D3Former: Debiased Dual Distilled Transformer for Incremental Learning",
                       "A. Mohamed, R. Grandhe, K. J. Joseph, S. Khan, F. Khan", 2023, "2208.00777", "CVPR Workshops")
INCREMENTAL_METHODS = ("d3former", "lwf", "finetune")
_TRAIN_KEYS = ("optimizer", "lr", "momentum", "weight_decay", "nesterov")
_IGNORED = ("schedule", "milestones", "gamma", "amp", "grad_clip", "deterministic", "device", "resume", "fingerprint")


class CosineHead(nn.Module):
    """``σ · cos(f, w_c)`` for each class ``c``: features ``(B, D)`` → logits ``(B, K)``; ``σ`` learnt from ``scale``."""

    def __init__(self, dim: int, num_classes: int, scale: float = 1.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, dim) / math.sqrt(dim))
        self.sigma = nn.Parameter(torch.tensor(float(scale)))

    def forward(self, features: Tensor) -> Tensor:
        return self.sigma * F.linear(F.normalize(features, dim=1), F.normalize(self.weight, dim=1))

    def grow(self, new_weights: Tensor) -> None:
        """Append classes with the given weight rows ``(k, D)``."""
        self.weight = nn.Parameter(torch.cat([self.weight.detach(), new_weights.to(self.weight)], 0))


@dataclass
class IncrementalResult(FitResult):
    """The final model's :class:`~distill.train.FitResult` (``last_acc``: accuracy on every class after the last
    phase; ``history``: one row per phase) plus the protocol's numbers."""

    acc_matrix: list[list[float]] = field(default_factory=list)  # [phase k][task j], j <= k, in %
    avg_incremental_acc: float | None = None
    forgetting: float | None = None
    student: nn.Module | None = None


@contextmanager
def _captured(model: nn.Module, cam_layer: str | None) -> Iterator[dict[str, Tensor]]:
    """Hooks that store the head's input (``"features"``) and ``cam_layer``'s output (``"tokens"``)."""
    store: dict[str, Tensor] = {}
    hooks = [model.head.register_forward_pre_hook(lambda _m, args: store.__setitem__("features", args[0]))]
    if cam_layer is not None:
        hooks.append(model.get_submodule(cam_layer).register_forward_hook(
            lambda _m, _i, out: store.__setitem__("tokens", out)))
    try:
        yield store
    finally:
        for h in hooks:
            h.remove()


def _gradcam(model: nn.Module, x: Tensor, cam_layer: str, prefix: int, create_graph: bool) -> Tensor:
    """Grad-CAM maps ``(B, L)`` of each sample's top class over ``cam_layer``'s patch tokens."""
    with torch.enable_grad(), _captured(model, cam_layer) as store:
        if not create_graph:
            x = x.detach().requires_grad_(True)  # a frozen model: the tokens need a graph to x
        logits = model(x)
        score = logits.gather(1, logits.argmax(1, keepdim=True)).sum()
        tokens = store["tokens"]
        (grads,) = torch.autograd.grad(score, tokens, create_graph=create_graph)
        cam = DF.token_gradcam(tokens[:, prefix:], grads[:, prefix:])
    return cam if create_graph else cam.detach()


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _grow_head(model: nn.Module, method: str, new: int, x_new: Tensor, y_new: Tensor, first: int) -> None:
    head = model.head
    if isinstance(head, CosineHead):  # imprint: the new classes' mean normalised feature
        with torch.no_grad(), _captured(model, None) as store:
            model.eval()
            model(x_new.to(_device(model)))
            f = F.normalize(store["features"], dim=1)
        rows = torch.stack([F.normalize(f[y_new.to(f.device) == first + c].mean(0), dim=0) for c in range(new)])
        head.grow(rows * head.weight.detach().norm(dim=1).mean())
        return
    grown = nn.Linear(head.in_features, head.out_features + new)
    with torch.no_grad():
        grown.weight[:head.out_features] = head.weight
        grown.bias[:head.out_features] = head.bias
    model.head = grown.to(_device(model))


def _check(method: str, num_tasks: int, memory_per_class: int, k: int, model: nn.Module, cam_layer: str) -> None:
    if method not in INCREMENTAL_METHODS:
        raise ValueError(f"class-incremental: method must be one of {INCREMENTAL_METHODS}; got {method!r}")
    for name, v, low in (("num_tasks", num_tasks, 2), ("memory_per_class", memory_per_class, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"class-incremental: {name} must be an int >= {low}; got {v!r}")
    if k % num_tasks:
        raise ValueError(f"class-incremental: {k} classes do not split into num_tasks={num_tasks} equal tasks")
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear):
        raise TypeError("class-incremental: the model needs a linear classifier `head` on its features (the zoo's "
                        f"ViTs: vit_tiny, deit_tiny, vit_small); got head={type(head).__name__}")
    if method == "d3former":
        try:
            model.get_submodule(cam_layer)
        except AttributeError as e:
            raise ValueError(f"d3former: cam_layer={cam_layer!r} is not a submodule of the model") from e


@register_strategy("d3former", "incremental", D3FORMER_PAPER)
def fit_class_incremental(
    student: Any,
    train_loader: Any,
    val_loader: Any = None,
    *,
    epochs: int,
    method: str = "d3former",
    num_tasks: int = 5,
    memory_per_class: int = 20,
    the_lambda: float = 10.0,
    tau: float = 1.0,
    attention_weight: float = 0.1,
    kd_T: float = 2.0,
    cam_layer: str | None = None,
    cosine_scale: float = 1.0,
    shuffle_classes: bool = False,
    batch_size: int | None = None,
    seed: int = 0,
    progress: bool = True,
    run_dir: str | Path | None = None,
    **train: Any,
) -> IncrementalResult:
    """Class-incremental training (module docstring): ``num_tasks`` phases of ``epochs`` epochs each.

    Args:
        student: a zoo ViT (module or zero-argument factory); its ``head`` is replaced per phase.
        train_loader, val_loader: in-memory labelled data (``val_loader`` is required: the protocol's accuracies).
        epochs: epochs per phase.
        method: ``"d3former"``, ``"lwf"`` or ``"finetune"``.
        num_tasks: phases (the classes split equally).
        memory_per_class: exemplars kept per old class.
        the_lambda, tau, attention_weight: D3Former's feature-distillation base weight ``λ``, logit-adjustment
            temperature ``τ`` and attention-distillation weight ``γ`` (the code's ``--gamma``; renamed here
            because a recipe's ``train.gamma`` is the learning-rate decay).
        kd_T: the LwF baseline's temperature.
        cam_layer: the module whose output tokens Grad-CAM reads (default ``blocks.<n-1>.norm1``: the tokens the
            last block's attention reads, the usual Grad-CAM layer of a ViT; the last block's *output* patch
            tokens do not reach the class token, so their gradient is zero).
        shuffle_classes: a seeded class order instead of ``0..K-1``.
        batch_size: default: the training loader's.
        **train: ``optimizer``, ``lr``, ``momentum``, ``weight_decay`` (a recipe's ``train:``; a schedule is
            not used: a constant rate per phase).
    """
    unknown = sorted(set(train) - set(_TRAIN_KEYS) - set(_IGNORED))
    if unknown:
        raise TypeError(f"class-incremental: unexpected arguments {unknown}")
    opt = {k: train[k] for k in _TRAIN_KEYS if k in train}
    torch.manual_seed(seed)  # a factory's initialisation follows the seed
    model = as_model(student, "class-incremental")
    cam_layer = cam_layer or (f"blocks.{len(model.blocks) - 1}.norm1" if hasattr(model, "blocks") else "")
    x, y, settings = in_memory_tensors(train_loader, "class-incremental")
    if val_loader is None:
        raise ValueError("class-incremental needs val_loader: the accuracy on every class seen after each phase")
    xv, yv, _ = in_memory_tensors(val_loader, "class-incremental (val_loader)")
    k_total = int(y.max()) + 1
    _check(method, num_tasks, memory_per_class, k_total, model, cam_layer)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"class-incremental: epochs must be an int >= 1; got {epochs!r}")
    bs = batch_size or int(settings.get("batch_size", 64))
    order = torch.randperm(k_total, generator=torch.Generator().manual_seed(seed)) if shuffle_classes \
        else torch.arange(k_total)
    rank = torch.empty(k_total, dtype=torch.long)
    rank[order] = torch.arange(k_total)
    y, yv = rank[y], rank[yv]  # class index = position in the order: the head grows by one block per phase
    per = k_total // num_tasks
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    torch.manual_seed(seed)
    head = model.head
    model.head = CosineHead(head.in_features, per, cosine_scale) if method == "d3former" else nn.Linear(head.in_features, per)
    device = next(model.parameters()).device
    model.head.to(device)
    mem_x, mem_y = x[:0], y[:0]
    ref: nn.Module | None = None
    acc: list[list[float]] = []
    history: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with StepProgress(progress, f"class-incremental ({method})", num_tasks * epochs) as bar:
        for task in range(num_tasks):
            lo, hi = task * per, (task + 1) * per
            new = (y >= lo) & (y < hi)
            if task > 0:
                _grow_head(model, method, per, x[new], y[new], lo)
            tx, ty = torch.cat([x[new], mem_x]), torch.cat([y[new], mem_y])
            loader = InMemoryLoader(tx, ty, bs, seed=seed + task, augment=settings.get("augment"))
            prior = torch.bincount(ty, minlength=hi).double() / len(ty)
            lam = the_lambda * math.sqrt(lo / per) if task > 0 else 0.0
            optimizer = make_optimizer(model.parameters(), opt.get("optimizer", "sgd"), lr=float(opt.get("lr", 0.05)),
                                       momentum=float(opt.get("momentum", 0.9)),
                                       weight_decay=float(opt.get("weight_decay", 5e-4)),
                                       nesterov=bool(opt.get("nesterov", False)))
            for epoch in range(epochs):
                loader.set_epoch(epoch)
                model.train()
                for b in loader:
                    b = b.to(device)
                    loss = _phase_loss(model, ref, method, b.inputs, b.targets, lo, prior, lam, attention_weight, tau, kd_T,
                                       cam_layer, prefix)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                bar.advance(f"task {task + 1}/{num_tasks} loss {float(loss.detach()):.3f}")
            mem_x, mem_y = _update_memory(model, mem_x, mem_y, x[new], y[new], lo, hi, memory_per_class)
            row_acc = _task_accuracies(model, xv, yv, per, task)
            acc.append(row_acc)
            seen = (yv < hi)
            sizes = [int(((yv >= j * per) & (yv < (j + 1) * per)).sum()) for j in range(task + 1)]
            overall = sum(a * n for a, n in zip(row_acc, sizes)) / max(sum(sizes), 1)
            history.append({"epoch": task, "task": task, "classes": hi, "time_s": time.perf_counter() - t0,
                            "val_student_acc": overall, "val_task_acc": row_acc, "val_samples": int(seen.sum())})
            write_history(run_dir, history)
            ref = copy.deepcopy(model).eval().requires_grad_(False)
    matrix = torch.zeros(num_tasks, num_tasks, dtype=torch.float64)
    for k, row in enumerate(acc):
        matrix[k, :len(row)] = torch.tensor(row, dtype=torch.float64)
    sizes = torch.tensor([int(((yv >= j * per) & (yv < (j + 1) * per)).sum()) for j in range(num_tasks)])
    best = max(range(len(history)), key=lambda i: history[i]["val_student_acc"])
    return IncrementalResult(history=history, best_acc=history[best]["val_student_acc"], best_epoch=best,
                             last_acc=history[-1]["val_student_acc"], run_dir=Path(run_dir) if run_dir else None,
                             time_s=time.perf_counter() - t0, acc_matrix=acc,
                             avg_incremental_acc=DF.average_incremental_accuracy(matrix, sizes),
                             forgetting=DF.forgetting(matrix), student=model)


def _phase_loss(model: nn.Module, ref: nn.Module | None, method: str, x: Tensor, y: Tensor, n_old: int,
                prior: Tensor, lam: float, gamma: float, tau: float, kd_T: float, cam_layer: str,
                prefix: int) -> Tensor:
    with _captured(model, None) as store:
        logits = model(x)
        features = store["features"]
    if method == "finetune" or ref is None:
        return F.cross_entropy(logits, y)
    if method == "lwf":
        with torch.no_grad():
            old = ref(x)
        return F.cross_entropy(logits, y) + DF.kd_loss(logits[:, :n_old], old, kd_T)
    loss = DF.logit_adjusted_cross_entropy(logits, y, prior.clamp_min(1e-12), tau)
    exemplars = y < n_old
    if exemplars.any():
        xe = x[exemplars]
        with torch.no_grad(), _captured(ref, None) as ref_store:
            ref(xe)
        loss = loss + lam * DF.cosine_feature_distillation(features[exemplars], ref_store["features"])
        if gamma > 0:
            cam = _gradcam(model, xe, cam_layer, prefix, create_graph=True)
            loss = loss + gamma * DF.cam_distillation_loss(cam, _gradcam(ref, xe, cam_layer, prefix, False))
    return loss


@torch.no_grad()
def _update_memory(model: nn.Module, mem_x: Tensor, mem_y: Tensor, x_new: Tensor, y_new: Tensor, lo: int, hi: int,
                   m: int) -> tuple[Tensor, Tensor]:
    """Add ``m`` herding-selected exemplars of each new class ``lo..hi-1`` (normalised features, iCaRL)."""
    model.eval()
    xs, ys = [mem_x], [mem_y]
    for c in range(lo, hi):
        xc = x_new[y_new == c]
        with _captured(model, None) as store:
            feats = []
            for i in range(0, len(xc), 256):
                model(xc[i:i + 256].to(_device(model)))
                feats.append(F.normalize(store["features"], dim=1).cpu())
        pick = herding_select(torch.cat(feats), min(m, len(xc)))
        xs.append(xc[pick])
        ys.append(torch.full((len(pick),), c, dtype=mem_y.dtype))
    return torch.cat(xs), torch.cat(ys)


@torch.no_grad()
def _task_accuracies(model: nn.Module, xv: Tensor, yv: Tensor, per: int, task: int) -> list[float]:
    """Top-1 (%) on each task ``j <= task``'s validation samples, predicting among every class seen so far."""
    model.eval()
    seen = yv < (task + 1) * per
    xs, ys = xv[seen], yv[seen]
    pred = torch.cat([model(xs[i:i + 512].to(_device(model))).argmax(1).cpu() for i in range(0, len(xs), 512)])
    return [float((pred[(ys // per) == j] == ys[(ys // per) == j]).float().mean() * 100) for j in range(task + 1)]
