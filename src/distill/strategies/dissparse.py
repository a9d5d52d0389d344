"""DDSL: a student's channels pruned by ADMM while it is distilled, with a meta-learned "dean" weighting
the distillation and the sparsity supervision.

Paper: Y. Liu, J. Cao, B. Li, W. Hu, S. Maybank, "Learning to Explore Distillability and Sparsability:
A Joint Framework for Model Compression", IEEE TPAMI 45(3), 2023 (no arXiv version found). Only the
abstract could be read here (teacher, student and dean; the dean adjusts the distillation and the
sparsity supervision by meta-learning; an ADMM-based knowledge-distillation-with-pruning optimisation).
Every concrete choice below is ours, written from that description:

* **Sparsability**: the channel gates are the student's BatchNorm scales and shifts, one group
  :math:`\\gamma_{l,c} = (\\text{scale}_c, \\text{shift}_c)` per channel (Network Slimming gates by the scale
  alone; a channel whose scale is 0 still emits ReLU(shift), so we gate both). Each layer keeps
  ``k_l = max(1, round(keep · C_l))`` channels. ADMM splits :math:`\\gamma_l = Z_l`, :math:`Z_l` with at most
  :math:`k_l` non-zero rows: the student minimises
  ``λ_ce · CE + λ_kd · KD_T + λ_sp · ½ Σ_l ‖γ_l − Z_l + U_l‖²`` (λ starting at ``ce, kd, sp``)
  (:func:`~distill.functional.dissparse.dissparse_admm_penalty`), and every ``admm_every`` steps
  :math:`Z_l = \\Pi_{k_l}(\\gamma_l + U_l)` (:func:`~distill.functional.dissparse.dissparse_keep_topk`),
  :math:`U_l \\leftarrow U_l + \\gamma_l - Z_l`.
* **Distillability**: Hinton KD at temperature ``T`` (``kd_loss``, T² and batchmean).
* **The dean** moves the loss weights each step by the meta-gradient of the *pruned* student's
  cross-entropy on the next batch after a virtual SGD step
  (:func:`~distill.functional.dissparse.dissparse_dean_gradient`): the label and distillation weights as a
  balance whose sum stays ``ce + kd`` (softmax logits, gradient descent with
  :func:`~distill.functional.dissparse.dissparse_balance_gradient`), the sparsity weight in log space,
  ``log λ_sp -= dean_lr · λ_sp · ∂L_meta/∂λ_sp``, kept within ``[sp/10, 10 sp]``. (A first version moved
  λ_kd freely in log space: the one-step look-ahead always favours a larger weight along a descent
  direction, λ_kd grew to ~70 and training diverged; a constant-sum balance removes that step-size incentive.)

At the end the gates outside each layer's top ``k_l`` (and their BatchNorm shifts) are set to zero for
good: the channel is off (its ReLU output is 0), then ``finetune_epochs`` of :func:`distill.fit` with the
masks held (``torch.nn.utils.prune.custom_from_mask``). ``kd=0`` with ``dean=False`` is the benchmark's
"without the distillability term" (ADMM pruning on the labels alone).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils import prune

from distill.batch import as_batch
from distill.distiller import Distiller
from distill.functional.core import kd_loss
from distill.functional.dissparse import (
    dissparse_admm_penalty,
    dissparse_admm_update,
    dissparse_balance_gradient,
    dissparse_dean_gradient,
    dissparse_keep_topk,
)
from distill.methods.base import create_method
from distill.papers import Paper
from distill.progress import StepProgress
from distill.strategies.registry import as_model, register_strategy
from distill.taps import logits_of
from distill.train.evaluate import evaluate
from distill.train.loop import FitResult, fit
from distill.train.schedules import Schedule, make_optimizer

__all__ = ["DDSL", "DisSparseResult", "channel_gates", "fit_dissparse", "keep_counts"]

DDSL = Paper("Learning to Explore Distillability and Sparsability: A Joint Framework for Model Compression",
             "Y. Liu, J. Cao, B. Li, W. Hu, S. Maybank", 2023, None, "IEEE TPAMI")


@dataclass
class DisSparseResult(FitResult):
    """:class:`~distill.train.FitResult` of the pruned student (``last_acc``: after pruning and fine-tuning),
    plus the student, its channel masks ``{BatchNorm path: (C_l,) bool}``, the remaining and total gated
    channels and the dean's weights after each epoch (``[{"ce": λ_ce, "kd": λ_kd, "sp": λ_sp}, ...]``)."""

    student: nn.Module | None = None
    masks: dict[str, Tensor] = field(default_factory=dict)
    remaining_channels: int = 0
    total_channels: int = 0
    lambdas: list[dict[str, float]] = field(default_factory=list)


def channel_gates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The gated layers: every affine ``nn.BatchNorm1d``/``nn.BatchNorm2d`` of ``model`` (path, module)."""
    gates = [(n, m) for n, m in model.named_modules()
             if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and m.affine]
    if not gates:
        raise ValueError(f"dissparse gates channels by their BatchNorm scales, and {type(model).__name__} has no affine "
                         "BatchNorm layer (use a zoo CNN, or lenet5 with batch_norm=True)")
    return gates


def keep_counts(gates: list[tuple[str, nn.Module]], keep: float) -> list[int]:
    """Channels kept per gated layer: ``max(1, round(keep · C_l))``."""
    return [max(1, round(keep * m.num_features)) for _, m in gates]


def _check(name: str, value: Any, low: float, high: float = math.inf, *, open_low: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < low or value > high or (open_low and value == low):
        bound = f"> {low}" if open_low else f">= {low}"
        raise ValueError(f"{name} must be a finite number {bound}" + (f" and <= {high}" if high < math.inf else "")
                         + f"; got {value!r}")
    return float(value)


def _masked_copy(model: nn.Module, gates: list[tuple[str, nn.Module]], masks: list[Tensor]) -> nn.Module:
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for (name, _), mask in zip(gates, masks):
            bn = twin.get_submodule(name)
            bn.weight.mul_(mask)
            bn.bias.mul_(mask)
    return twin


@register_strategy("dissparse", "compression", DDSL)
def fit_dissparse(
    student: Any,
    train_loader: Iterable[Any],
    val_loader: Iterable[Any] | None = None,
    *,
    teacher: nn.Module,
    epochs: int,
    keep: float = 0.5,
    ce: float = 1.0,
    kd: float = 1.0,
    sp: float = 0.5,
    T: float = 4.0,
    dean: bool = True,
    dean_lr: float = 10.0,
    admm_every: int | None = None,
    finetune_epochs: int = 0,
    run_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    **fit_kwargs: Any,
) -> DisSparseResult:
    """Distill ``teacher`` into ``student`` while ADMM prunes the student's channels to ``keep`` of each
    BatchNorm layer, the dean adjusting the KD and sparsity weights (all defaults are ours: the paper could
    not be read beyond its abstract).

    Args:
        student: a model with BatchNorm layers (a module or a zero-argument factory).
        teacher: the trained teacher (``nn.Module``), used in evaluation mode without gradients.
        epochs: epochs of the joint phase (``fit_kwargs``' ``optimizer``, ``lr``, ``momentum``,
            ``weight_decay``, ``nesterov``, ``schedule``, ``milestones``, ``gamma``, ``device``; the dean's
            virtual step uses the current learning rate); ``finetune_epochs`` then run :func:`distill.fit`
            with all of ``fit_kwargs``.
        keep: fraction of each gated layer's channels kept, in (0, 1].
        ce, kd, sp: the initial λ_ce, λ_kd, λ_sp (λ_sp is the ADMM penalty's ρ).
        T: the KD temperature.
        dean: meta-learn the weights (off: they stay at ``ce``, ``kd``, ``sp``).
        dean_lr: the dean's step on the CE/KD balance logits and on log λ_sp.
        admm_every: steps between Z/U updates (default: once per epoch).
        finetune_epochs: epochs of masked fine-tuning with the final λ_ce CE + λ_kd KD.
    """
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"dissparse needs teacher= (a trained nn.Module); got {type(teacher).__name__}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an int >= 1; got {epochs!r}")
    if isinstance(finetune_epochs, bool) or not isinstance(finetune_epochs, int) or finetune_epochs < 0:
        raise ValueError(f"finetune_epochs must be an int >= 0; got {finetune_epochs!r}")
    if admm_every is not None and (isinstance(admm_every, bool) or not isinstance(admm_every, int) or admm_every < 1):
        raise ValueError(f"admm_every must be an int >= 1 (steps) or None (once per epoch); got {admm_every!r}")
    keep = _check("keep", keep, 0.0, 1.0, open_low=True)
    ce, kd, sp = _check("ce", ce, 0.0), _check("kd", kd, 0.0), _check("sp", sp, 0.0)
    T = _check("T", T, 0.0, open_low=True)
    dean_lr = _check("dean_lr", dean_lr, 0.0)
    model = as_model(student, "dissparse")
    gates = channel_gates(model)
    ks = keep_counts(gates, keep)
    opt_name = fit_kwargs.get("optimizer", "sgd")
    lr = float(fit_kwargs.get("lr", 0.05))
    device = torch.device(fit_kwargs["device"]) if fit_kwargs.get("device") else next(model.parameters()).device
    model.to(device)
    t_was = teacher.training
    teacher.eval()
    t_device = next(iter(teacher.parameters()), torch.empty(0, device=device)).device
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    opt = make_optimizer(params, opt_name, lr=lr, momentum=fit_kwargs.get("momentum", 0.9),
                         weight_decay=fit_kwargs.get("weight_decay", 5e-4), nesterov=fit_kwargs.get("nesterov", False))
    def gate_groups() -> list[Tensor]:  # (C_l, 2): each channel's BatchNorm scale and shift, differentiable
        return [torch.stack([m.weight, m.bias], 1) for _, m in gates]

    def current_masks() -> list[Tensor]:
        return [dissparse_keep_topk(g.detach(), k).abs().sum(1) != 0 for g, k in zip(gate_groups(), ks)]
    with torch.no_grad():
        z = [dissparse_keep_topk(g.detach().clone(), k) for g, k in zip(gate_groups(), ks)]
        u = [torch.zeros_like(g) for g in z]
    steps = len(train_loader) if hasattr(train_loader, "__len__") else 0
    schedule = fit_kwargs.get("schedule", "multistep") if steps else "constant"
    sched = Schedule(opt, schedule, epochs=epochs, steps_per_epoch=max(steps, 1),
                     milestones=fit_kwargs.get("milestones"), gamma=fit_kwargs.get("gamma", 0.1))
    lam = {"ce": ce, "kd": kd, "sp": sp}
    balance = torch.tensor([ce, kd]).log() if dean and ce > 0 and kd > 0 else None
    history: list[dict[str, Any]] = []
    lambdas: list[dict[str, float]] = []
    start = time.perf_counter()
    step = 0

    def admm_update() -> None:
        z[:], u[:] = dissparse_admm_update(gate_groups(), u, ks)

    try:
        for epoch in range(1, epochs + 1):
            if hasattr(train_loader, "set_epoch"):
                train_loader.set_epoch(epoch - 1)
            batches = [as_batch(b).to(device) for b in train_loader]
            if not batches:
                raise ValueError("dissparse: the training loader yielded no batch")
            model.train()
            total = 0.0
            with StepProgress(progress, f"dissparse epoch {epoch}/{epochs}", len(batches)) as bar:
                for i, batch in enumerate(batches):
                    x, y = batch.inputs, batch.targets
                    s = logits_of(model(x))
                    with torch.no_grad():
                        t = logits_of(teacher(x.to(t_device))).to(s.device).float()
                    terms = {"ce": F.cross_entropy(s, y), "kd": kd_loss(s, t, T),
                             "sp": dissparse_admm_penalty(gate_groups(), z, u, 1.0)}
                    grads = {name: torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
                             for name, loss in terms.items()}
                    if dean and (balance is not None or sp > 0):
                        meta = batches[(i + 1) % len(batches)]
                        d = _dean_step(model, names, params, grads, dict(lam), meta, gates, ks,
                                       opt.param_groups[0]["lr"])
                        if balance is not None:  # the CE/KD balance: their sum stays ce + kd
                            balance = balance - dean_lr * dissparse_balance_gradient(
                                balance, torch.stack([d["ce"], d["kd"]]), ce + kd)
                            lam["ce"], lam["kd"] = ((ce + kd) * torch.softmax(balance, 0)).tolist()
                        if sp > 0:  # the sparsity weight in log space, within [sp / 10, 10 sp]
                            new = math.log(lam["sp"]) - dean_lr * lam["sp"] * float(d["sp"])
                            lam["sp"] = float(min(max(math.exp(new), sp / 10), sp * 10))
                    weights = dict(lam)
                    for j, p in enumerate(params):
                        gsum = None
                        for name, w in weights.items():
                            g = grads[name][j]
                            if g is not None and w:
                                gsum = w * g if gsum is None else gsum + w * g
                        p.grad = gsum
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    sched.step_batch()
                    loss = sum(weights[n] * float(v.detach()) for n, v in terms.items())
                    if not math.isfinite(loss):
                        raise FloatingPointError(f"dissparse: the loss became {loss} at epoch {epoch}, step {i + 1} "
                                                 f"(λ={lam}); lower lr or sp")
                    total += loss
                    step += 1
                    if admm_every is not None and step % admm_every == 0:
                        admm_update()
                    bar.advance(f"loss {loss:.3f} λkd {lam['kd']:.3g} λsp {lam['sp']:.3g}")
            sched.step_epoch()
            if admm_every is None:
                admm_update()
            lambdas.append(dict(lam))
            row: dict[str, Any] = {"epoch": epoch, "train_loss": total / len(batches), "lambda_ce": lam["ce"],
                                   "lambda_kd": lam["kd"], "lambda_sp": lam["sp"]}
            if val_loader is not None:
                masks = current_masks()
                row["val_dense_acc"] = evaluate(Distiller(model, None, {"ce": 1.0}), val_loader, device,
                                                with_teacher=False)["student_acc"]
                row["val_student_acc"] = evaluate(Distiller(_masked_copy(model, gates, masks), None, {"ce": 1.0}),
                                                  val_loader, device, with_teacher=False)["student_acc"]
            history.append(row)
    finally:
        teacher.train(t_was)

    # prune for good: the gates outside each layer's top k (and their shifts) are zero, held by masks
    masks = current_masks()
    for (_, bn), mask in zip(gates, masks):
        prune.custom_from_mask(bn, "weight", mask.to(bn.weight.dtype))
        prune.custom_from_mask(bn, "bias", mask.to(bn.bias.dtype))
    last_acc = history[-1].get("val_student_acc") if history else None
    if finetune_epochs:
        losses: dict[str, Any] = {"kd": create_method("kd", T=T, weight=lam["kd"])} if lam["kd"] > 0 else {}
        if lam["ce"] > 0 or not losses:
            losses["ce"] = lam["ce"] if lam["ce"] > 0 else 1.0
        res = fit(Distiller(model, teacher if "kd" in losses else None, losses), train_loader, val_loader, epochs=finetune_epochs,
                  run_dir=run_dir, seed=seed, progress=progress, **fit_kwargs)
        history += [{**h, "epoch": epochs + h.get("epoch", k + 1), "phase": "finetune"}
                    for k, h in enumerate(res.history)]
        last_acc = res.last_acc
    for _, bn in gates:
        prune.remove(bn, "weight")
        prune.remove(bn, "bias")
    accs = [h["val_student_acc"] for h in history if h.get("val_student_acc") is not None]
    best = max(range(len(accs)), key=accs.__getitem__) if accs else None
    return DisSparseResult(history=history, best_acc=accs[best] if best is not None else None,
                           best_epoch=best + 1 if best is not None else None, last_acc=last_acc,
                           run_dir=Path(run_dir) if run_dir is not None else None,
                           time_s=time.perf_counter() - start, student=model,
                           masks={n: m.cpu() for (n, _), m in zip(gates, masks)},
                           remaining_channels=int(sum(int(m.sum()) for m in masks)),
                           total_channels=sum(m.num_features for _, m in gates), lambdas=lambdas)


def _dean_step(model: nn.Module, names: list[str], params: list[nn.Parameter],
               grads: dict[str, tuple[Tensor | None, ...]], weights: dict[str, float], meta: Any,
               gates: list[tuple[str, nn.Module]], ks: list[int], lr: float) -> dict[str, Tensor]:
    """∂L_meta/∂λ for λ_ce, λ_kd, λ_sp: the pruned student's CE on the ``meta`` batch after a virtual SGD step."""
    with torch.no_grad():
        virtual = {}
        for j, (n, p) in enumerate(zip(names, params)):
            step = torch.zeros_like(p)
            for key, w in weights.items():
                g = grads[key][j]
                if g is not None and w:
                    step += w * g
            virtual[n] = (p - lr * step).detach().requires_grad_(True)
    inputs = dict(virtual)
    for (name, _), k in zip(gates, ks):
        group = torch.stack([virtual[f"{name}.weight"], virtual[f"{name}.bias"]], 1).detach()
        mask = (dissparse_keep_topk(group, k).abs().sum(1) != 0).to(group.dtype)
        inputs[f"{name}.weight"] = virtual[f"{name}.weight"] * mask
        inputs[f"{name}.bias"] = virtual[f"{name}.bias"] * mask
    buffers = {n: b.clone() for n, b in model.named_buffers()}  # the virtual pass must not move BN statistics
    out = logits_of(functional_call(model, {**inputs, **buffers}, (meta.inputs,)))
    meta_loss = F.cross_entropy(out, meta.targets)
    meta_grads = torch.autograd.grad(meta_loss, [virtual[n] for n in names], allow_unused=True)
    return dissparse_dean_gradient(meta_grads, dict(grads), lr)
