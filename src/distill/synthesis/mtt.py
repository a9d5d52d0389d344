"""Matching Training Trajectories (MTT): the ``"mtt"`` dataset synthesizer.

Paper: G. Cazenavette, T. Wang, A. Torralba, A. A. Efros, J.-Y. Zhu, "Dataset Distillation by
Matching Training Trajectories", CVPR 2022, arXiv 2203.11932 (reference code:
github.com/GeorgeCazenavette/mtt-distillation, ``distill.py``).

1. Expert trajectories ``theta*_0..E`` are trained on the real data and buffered
   (:func:`~distill.synthesis.experts.buffer_experts`).
2. Each distillation iteration samples an expert and a start epoch ``t <= T+``, starts a student
   at ``theta*_t``, takes ``N`` differentiable SGD steps with the learnable step size ``alpha`` on
   DSA-augmented synthetic mini-batches (``torch.func.functional_call`` on flat parameters), and
   descends :func:`distill.functional.trajectory_matching_loss` against ``theta*_{t+M}`` with
   respect to the images and ``alpha`` (each with SGD, momentum 0.5 as the reference code).

Defaults and where they come from. The paper reports no MNIST or Fashion-MNIST experiment (its
data sets are CIFAR-10/100, Tiny ImageNet and ImageNet subsets), so ours follow its CIFAR-10
settings. Its hyper-parameter table (appendix) could not be read here (the reference README shows
it as an image only), so the per-ipc values below are the CIFAR-10 rows as run by the reference
code's command lines in two independent reproductions (cvlab-yonsei/FYI ``MTT/scripts/mtt.sh``,
Zhong0x29a/MCT ``run_command.md``); treat them as "the authors' CIFAR-10 settings, not verified
against the paper's table":

==== ============== ============== ================== ========
ipc  syn_steps N    expert_epochs M max_start_epoch T+ lr_lr
==== ============== ============== ================== ========
1    50             2              2                  1e-7
10   30             2              20                 1e-4
50   30             2              40                 1e-5
==== ============== ============== ================== ========

(other ipc values take the row of the nearest ipc). ``lr_img = 1000`` (the reference code's
default and its un-whitened runs; the paper's ZCA-whitened CIFAR rows use other pixel rates for
whitened pixels, and we do not whiten), ``lr_init = 0.01`` (``alpha``'s start, = the experts'
lr), ``momentum = 0.5`` (the reference code's SGD for images and ``alpha``), ``batch_syn`` = the
whole synthetic set, ``init = "real"`` (random real images of each class), DSA on, 5000
iterations (the reference code's ``Iteration``). Experts: 100 x 50 epochs, SGD lr 0.01 without
momentum or weight decay, batch 256, with DSA (reference ``buffer.py``).

Departures: the start epoch is drawn uniformly from ``{0, ..., T+}`` as the paper writes
(``t <= T+``); the reference code draws from ``{0, ..., T+ - 1}``. Soft labels (``learn_labels``)
are our option, off by default (the paper learns none): logits ``(N, K)`` initialised to
``label_init_scale`` times the one-hot labels, trained by SGD with ``lr_labels``, used as
``softmax`` targets of the student's cross-entropy; the set's labels are then their softmax.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from distill.data.synthetic import SyntheticSet
from distill.functional.trajectory import trajectory_matching_loss, unrolled_sgd
from distill.models.registry import create
from distill.papers import Paper
from distill.synthesis._checks import check_int
from distill.synthesis._real import check_real_set, class_indices, init_images
from distill.synthesis.experts import (
    ExpertBuffer,
    ParamLayout,
    _dsa_module,
    buffer_experts,
    load_experts,
)
from distill.synthesis.progress import StepProgress
from distill.synthesis.registry import register_synthesizer

__all__ = ["MTT_DEFAULTS", "PAPER", "buffer_experts", "load_experts", "matching_loss", "mtt", "mtt_defaults"]

PAPER = Paper(
    title="Dataset Distillation by Matching Training Trajectories",
    authors="G. Cazenavette, T. Wang, A. Torralba, A. A. Efros, J.-Y. Zhu",
    year=2022,
    arxiv="2203.11932",
    venue="CVPR",
)

# CIFAR-10 rows of the reference code's command lines (see the module docstring)
MTT_DEFAULTS: dict[int, dict[str, float]] = {
    1: {"syn_steps": 50, "expert_epochs": 2, "max_start_epoch": 2, "lr_lr": 1e-7},
    10: {"syn_steps": 30, "expert_epochs": 2, "max_start_epoch": 20, "lr_lr": 1e-4},
    50: {"syn_steps": 30, "expert_epochs": 2, "max_start_epoch": 40, "lr_lr": 1e-5},
}


def mtt_defaults(ipc: int) -> dict[str, float]:
    """The per-ipc defaults: the row of :data:`MTT_DEFAULTS` whose ipc is nearest (ties: the smaller)."""
    row = min(MTT_DEFAULTS, key=lambda k: (abs(math.log(k) - math.log(max(ipc, 1))), k))
    return dict(MTT_DEFAULTS[row])


def matching_loss(
    model: torch.nn.Module,
    layout: ParamLayout,
    images: Tensor,
    targets: Tensor,
    expert_start: Tensor,
    expert_target: Tensor,
    lr: Tensor | float,
    *,
    syn_steps: int,
    batch_syn: int | None = None,
    dsa: Any = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One MTT objective: ``N`` differentiable student steps from ``theta*_t``, then the normalised
    distance to ``theta*_{t+M}``.

    Args:
        model: the architecture (its own parameters are not used; ``functional_call`` runs it on
            the student's flat parameters). Its mode is left as it is (the reference: train mode).
        layout: ``ParamLayout.of(model)``.
        images: the synthetic images ``(N_syn, C, H, W)`` (requires grad to learn them).
        targets: ``(N_syn,)`` int64 classes, or ``(N_syn, K)`` soft targets (probabilities).
        expert_start, expert_target: ``theta*_t`` and ``theta*_{t+M}`` ``(P,)``.
        lr: ``alpha``, a float or a scalar tensor (requires grad to learn it).
        syn_steps: ``N``.
        batch_syn: synthetic mini-batch size (None: all of them each step). Batches are drawn as
            the reference code does: a random permutation cut into chunks, a fresh one when used up.
        dsa: a :class:`~distill.synthesis.dsa.DSA` applied to each mini-batch (None: no augmentation).
        generator: the source of the permutations and augmentation parameters.

    Returns:
        The scalar loss (differentiable with respect to ``images``, ``targets`` and ``lr``).
    """
    n = images.shape[0]
    batch = n if batch_syn is None else min(int(batch_syn), n)
    chunks: list[Tensor] = []

    def step_loss(theta: Tensor, step: int) -> Tensor:
        if not chunks:
            chunks.extend(torch.split(torch.randperm(n, generator=generator), batch))
        idx = chunks.pop().to(images.device)
        x, y = images[idx], targets[idx]
        if dsa is not None:
            x = dsa(x, generator=generator)  # a fresh draw per image, as the reference DiffAugment
        logits = functional_call(model, layout.unflatten(theta), (x,))
        if y.dim() == 2:
            return -(y * F.log_softmax(logits, dim=1)).sum(1).mean()
        return F.cross_entropy(logits, y)

    end = unrolled_sgd(step_loss, expert_start, lr, syn_steps)
    return trajectory_matching_loss(end, expert_start, expert_target)


def _init_images(images: Tensor, labels: Tensor, ipc: int, num_classes: int, init: str,
                 generator: torch.Generator) -> Tensor:
    """The initial float32 synthetic images ``(K * ipc, C, H, W)``: :func:`~distill.synthesis._real.init_images`
    with one noise draw per class."""
    per_class = class_indices(labels, num_classes, ipc, "mtt", minimum=0)
    return init_images(images.float(), per_class, ipc, init, generator, noise_per_class=True).detach()


@register_synthesizer("mtt", "dataset", PAPER)
def mtt(
    images: Tensor,
    labels: Tensor,
    *,
    ipc: int,
    num_classes: int,
    seed: int = 0,
    progress: bool = True,
    iterations: int = 5000,
    syn_steps: int | None = None,
    expert_epochs: int | None = None,
    max_start_epoch: int | None = None,
    lr_img: float = 1000.0,
    lr_lr: float | None = None,
    lr_init: float = 0.01,
    momentum: float = 0.5,
    batch_syn: int | None = None,
    init: str = "real",
    dsa: bool | str = True,
    learn_labels: bool = False,
    lr_labels: float = 10.0,
    label_init_scale: float = 1.0,
    buffer_dir: str | os.PathLike[str] | None = None,
    num_experts: int = 100,
    expert_train_epochs: int = 50,
    expert_lr: float = 0.01,
    expert_batch_size: int = 256,
    expert_dsa: bool | str | None = None,
    expert_seed: int = 0,
    model: str = "convnet3",
    model_kwargs: dict[str, Any] | None = None,
    device: str | torch.device | None = None,
) -> SyntheticSet:
    """Dataset distillation by matching training trajectories (Cazenavette et al., CVPR 2022).

    Args:
        images: the real training images ``(N, C, H, W)``, normalised.
        labels: their classes ``(N,)`` int64.
        ipc: synthetic images per class; the set holds ``ipc * num_classes`` images.
        num_classes: ``K``.
        seed: seeds the synthetic initialisation, the sampling of experts, start epochs, batches
            and augmentations (not the experts: ``expert_seed``, so one buffer serves every seed).
        progress: rich progress bars (experts, then distillation).
        iterations: distillation iterations (outer steps).
        syn_steps: ``N``, student steps per iteration (None: the per-ipc default, module docstring).
        expert_epochs: ``M``, epochs of the expert the student's ``N`` steps must cover (None: default).
        max_start_epoch: ``T+``, the latest start epoch (None: default); needs
            ``T+ + M <= expert_train_epochs``.
        lr_img: SGD learning rate of the images.
        lr_lr: SGD learning rate of ``alpha`` (None: the per-ipc default).
        lr_init: ``alpha``'s initial value.
        momentum: momentum of the images', ``alpha``'s (and soft labels') SGD.
        batch_syn: synthetic mini-batch of each student step (None: the whole set).
        init: ``"real"`` (random real images of each class) or ``"noise"`` (standard normal).
        dsa: DSA on every synthetic mini-batch (True: the default strategy; a strategy string; False).
        learn_labels: also learn soft labels (ours; off as in the paper; module docstring).
        lr_labels, label_init_scale: their SGD rate and initial logit scale.
        buffer_dir: the expert buffer folder: reused when its settings match, refused when they
            differ, created otherwise (None: a temporary folder, deleted afterwards).
        num_experts, expert_train_epochs, expert_lr, expert_batch_size, expert_dsa: the experts
            (:func:`~distill.synthesis.experts.buffer_experts`; ``expert_dsa=None``: as ``dsa``);
        expert_seed: expert ``k`` is initialised and shuffled from seed ``expert_seed + k``.
        model, model_kwargs: the experts' and student's architecture (a zoo name, built with
            ``num_classes``, ``in_channels``, ``image_size`` and ``model_kwargs``).
        device: where experts and students run (None: the CPU); the set is returned on the CPU.

    Returns:
        A :class:`~distill.data.synthetic.SyntheticSet` of ``(ipc * K, C, H, W)`` images ordered by
        class, int64 labels (or ``(ipc * K, K)`` soft labels), and a manifest with ``learned_lr``
        (the final ``alpha``: train on the set with it, as the reference evaluation does), the
        settings, and the matching loss's first/last values.
    """
    check_real_set(images, labels, ipc, num_classes, "mtt", min_classes=2)
    defaults = mtt_defaults(ipc) if isinstance(ipc, int) and not isinstance(ipc, bool) and ipc >= 1 else {}
    syn_steps = int(defaults["syn_steps"]) if syn_steps is None else syn_steps
    expert_epochs = int(defaults["expert_epochs"]) if expert_epochs is None else expert_epochs
    max_start_epoch = int(defaults["max_start_epoch"]) if max_start_epoch is None else max_start_epoch
    lr_lr = float(defaults["lr_lr"]) if lr_lr is None else lr_lr
    for name, value, low in (("ipc", ipc, 1), ("iterations", iterations, 1), ("syn_steps", syn_steps, 1),
                             ("expert_epochs", expert_epochs, 1), ("max_start_epoch", max_start_epoch, 0),
                             ("num_experts", num_experts, 1), ("expert_train_epochs", expert_train_epochs, 1)):
        check_int(name, value, low, who="mtt")
    if max_start_epoch + expert_epochs > expert_train_epochs:
        raise ValueError(f"mtt: max_start_epoch + expert_epochs = {max_start_epoch} + {expert_epochs} exceeds "
                         f"the experts' {expert_train_epochs} epochs; expected T+ + M <= expert_train_epochs")
    if init not in ("real", "noise"):
        raise ValueError(f"mtt: init must be 'real' or 'noise'; got {init!r}")
    for name, value in (("lr_img", lr_img), ("lr_init", lr_init), ("lr_labels", lr_labels)):
        if not (isinstance(value, (int, float)) and value > 0):
            raise ValueError(f"mtt: {name} must be a positive number; got {value!r}")
    if not (isinstance(lr_lr, (int, float)) and lr_lr >= 0):
        raise ValueError(f"mtt: lr_lr must be a number >= 0 (0 keeps alpha fixed); got {lr_lr!r}")
    if batch_syn is not None and (isinstance(batch_syn, bool) or not isinstance(batch_syn, int) or batch_syn < 1):
        raise ValueError(f"mtt: batch_syn must be a positive int or None; got {batch_syn!r}")
    if init == "real":
        class_indices(labels, num_classes, ipc, "mtt")  # every class has ipc real images

    cfg = dict(ipc=ipc, num_classes=num_classes, seed=seed, progress=progress, iterations=iterations,
               syn_steps=syn_steps, expert_epochs=expert_epochs, max_start_epoch=max_start_epoch, lr_img=lr_img,
               lr_lr=lr_lr, lr_init=lr_init, momentum=momentum, batch_syn=batch_syn, init=init, dsa=dsa,
               learn_labels=learn_labels, lr_labels=lr_labels, label_init_scale=label_init_scale,
               buffer_dir=None if buffer_dir is None else str(buffer_dir), num_experts=num_experts,
               expert_train_epochs=expert_train_epochs, expert_lr=expert_lr, expert_batch_size=expert_batch_size,
               expert_dsa=expert_dsa, expert_seed=expert_seed, model=model, model_kwargs=model_kwargs,
               device=None if device is None else str(device))
    expert_args = dict(num_classes=num_classes, num_experts=num_experts, epochs=expert_train_epochs, lr=expert_lr,
                       batch_size=expert_batch_size, model=model, model_kwargs=model_kwargs,
                       dsa=dsa if expert_dsa is None else expert_dsa, seed=expert_seed,
                       progress=progress, device=device)
    started = time.perf_counter()
    if buffer_dir is None:
        with tempfile.TemporaryDirectory(prefix="distill_mtt_") as tmp:
            return _distill(buffer_experts(images, labels, tmp, **expert_args), images, labels, cfg, started)
    return _distill(buffer_experts(images, labels, buffer_dir, **expert_args), images, labels, cfg, started)


def _distill(buffer: ExpertBuffer, images: Tensor, labels: Tensor, a: dict[str, Any], started: float) -> SyntheticSet:
    """The distillation loop of :func:`mtt` (``a``: its validated arguments)."""
    ipc, num_classes, seed = a["ipc"], a["num_classes"], a["seed"]
    generator = torch.Generator().manual_seed(int(seed))
    dev = torch.device(a["device"]) if a["device"] is not None else torch.device("cpu")
    net = create(buffer.settings["model"], **buffer.settings["model_kwargs"]).to(dev)
    net.train()
    layout = buffer.layout
    dsa = _dsa_module(a["dsa"])

    x_syn = _init_images(images, labels, ipc, num_classes, a["init"], generator).to(dev).requires_grad_(True)
    y_syn = torch.arange(num_classes, device=dev).repeat_interleave(ipc)
    alpha = torch.tensor(float(a["lr_init"]), device=dev).requires_grad_(True)
    opt_img = torch.optim.SGD([x_syn], lr=a["lr_img"], momentum=a["momentum"])
    opt_lr = torch.optim.SGD([alpha], lr=a["lr_lr"], momentum=a["momentum"])
    label_logits = opt_lab = None
    if a["learn_labels"]:
        label_logits = (F.one_hot(y_syn, num_classes).float() * a["label_init_scale"]).requires_grad_(True)
        opt_lab = torch.optim.SGD([label_logits], lr=a["lr_labels"], momentum=a["momentum"])

    history: list[float] = []
    with StepProgress(a["progress"], "mtt", a["iterations"]) as bar:
        for it in range(a["iterations"]):
            k = int(torch.randint(buffer.num_experts, (1,), generator=generator))
            t = int(torch.randint(a["max_start_epoch"] + 1, (1,), generator=generator))
            start, target = buffer.points(k, [t, t + a["expert_epochs"]]).to(dev)
            targets = y_syn if label_logits is None else F.softmax(label_logits, dim=1)
            loss = matching_loss(net, layout, x_syn, targets, start, target, alpha, syn_steps=a["syn_steps"],
                                 batch_syn=a["batch_syn"], dsa=dsa, generator=generator)
            if not bool(torch.isfinite(loss)):
                raise FloatingPointError(f"mtt: the matching loss became {float(loss)} at iteration {it} (alpha = "
                                         f"{float(alpha.detach()):.4g}); lower lr_img ({a['lr_img']}) or lr_lr ({a['lr_lr']})")
            for opt in (opt_img, opt_lr, opt_lab):
                if opt is not None:
                    opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt in (opt_img, opt_lr, opt_lab):
                if opt is not None:
                    opt.step()
            history.append(float(loss.detach()))
            bar.advance(f"loss {history[-1]:.4f}  alpha {float(alpha.detach()):.4g}")

    tail = history[-max(1, len(history) // 10):]
    settings = {key: a[key] for key in (
        "iterations", "syn_steps", "expert_epochs", "max_start_epoch", "lr_img", "lr_lr", "lr_init", "momentum",
        "batch_syn", "init", "dsa", "learn_labels", "lr_labels", "label_init_scale", "num_experts",
        "expert_train_epochs", "expert_lr", "expert_batch_size", "expert_dsa", "expert_seed", "model",
        "model_kwargs")}
    settings["experts"] = {k: v for k, v in buffer.settings.items() if k != "data"}
    manifest = {
        "method": "mtt", "family": "dataset", "paper": PAPER.cite(), "ipc": ipc, "num_classes": num_classes,
        "seed": seed, "settings": settings, "learned_lr": float(alpha.detach()),
        "buffer": a["buffer_dir"],
        "data_fingerprint": buffer.settings["data"],
        "matching_loss": {"first": history[0], "last": history[-1], "mean_first_10pct": sum(
            history[:len(tail)]) / len(tail), "mean_last_10pct": sum(tail) / len(tail)},
        "time_s": round(time.perf_counter() - started, 3),
    }
    out_labels = y_syn if label_logits is None else F.softmax(label_logits.detach(), dim=1)
    return SyntheticSet(x_syn.detach(), out_labels, manifest)
