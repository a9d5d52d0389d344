"""KIP: Kernel Inducing Points, a support set learned through kernel ridge regression.

Papers:

* T. Nguyen, Z. Chen, J. Lee, "Dataset Meta-Learning from Kernel Ridge-Regression", ICLR 2021,
  arXiv 2011.00050 (``kip_fc``: the NTK of fully-connected ReLU networks);
* T. Nguyen, R. Novak, L. Xiao, J. Lee, "Dataset Distillation with Infinitely Wide Convolutional
  Networks", NeurIPS 2021, arXiv 2107.13034 (``kip_conv``: the convolutional NTK).

KIP (Algorithm 1 of arXiv 2011.00050) initialises a support set ``(X_s, y_s)`` from real images
and, at every step, samples a class-balanced target batch ``(X_t, y_t)`` of the real training
set and takes an Adam step on ``X_s`` (and on ``y_s`` with label learning) down

    L(X_s, y_s) = ½ ‖y_t - K(X_t, X_s) (K(X_s, X_s) + λ I)⁻¹ y_s‖²,   λ = reg · tr(K_ss) / n_s

(:func:`distill.functional.krr_loss`; the kernels are :func:`distill.functional.fc_ntk` and
:func:`distill.functional.conv_ntk`, computed exactly in closed form).

Defaults and where they come from:

* from the paper (ICLR 2021, "Experiment setup"): Adam; learning rate 0.01 for MNIST (0.04 for
  CIFAR-10); mean-centred one-hot labels (``onehot - 1/K``); class-balanced target batches;
  channel-wise standardised images (what ``get_dataset`` serves); weight and bias variances
  ``σ_w² = 2``, ``σ_b² = 1e-4``;
* from the authors' code (google-research ``kip/KIP.ipynb``): ``λ = reg · tr(K_ss)/n_s`` with
  ``reg = 1e-6``; the loss as ``0.5 * mean((pred - y_t)²)`` (the paper's ``½‖·‖²`` divided by
  ``N_t · K``; Adam's steps do not depend on that factor); target batch 5000; FC depth 1 (one
  hidden layer) and a class-balanced random real initialisation of the support set; the notebook
  runs a few hundred to ~1000 steps (``iterations=1000`` here);
* ``kip_conv``: the ConvNet kernel here is ``depth`` x [conv3x3 -> ReLU -> avgpool2] -> dense
  (the DC ConvNet without its instance norm, which has no closed-form kernel); its defaults
  (depth 3, label learning off, ``target_batch=100``, float64) are ours: we could read the
  NeurIPS paper's abstract and introduction only, and its distributed many-GPU set-up is out of
  reach of a CPU. The CNTK costs ``O((N_t + N_s) N_s (HW)²)`` per step (module docstring of
  :mod:`distill.functional.ntk`); measured on this project's 2-core CPU (shared, loaded): 8x8
  digits, 20 support + 20 target images: 12 s (float64) and 8.8 s (float32) for one step; ipc 1
  with 100 targets ~70 s per step (float32). A 28x28 pair has 150x the entries of an 8x8 one: MNIST at ipc 10 is out
  of reach of a CPU (the paper used many GPUs); :func:`kip_fc` is the CPU path.

Label learning (``learn_labels=True``) optimises ``y_s`` too. A :class:`SyntheticSet` keeps the
class each support image started from as its hard label (what a classifier trains on); the
learned regression targets ``(N, K)`` are in ``manifest["learned_targets"]`` (they are not
probability vectors, so they are not stored as soft labels).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.data.synthetic import SyntheticSet
from distill.functional.ntk import conv_ntk, fc_ntk, krr_loss, krr_predict
from distill.papers import Paper
from distill.synthesis._checks import check_int
from distill.synthesis._real import check_real_set, class_indices
from distill.synthesis.progress import StepProgress
from distill.synthesis.registry import register_synthesizer

__all__ = ["KIP_CONV_PAPER", "KIP_PAPER", "centered_one_hot", "class_balanced_indices", "kip_conv", "kip_fc",
           "krr_accuracy", "run_kip"]

KIP_PAPER = Paper("Dataset Meta-Learning from Kernel Ridge-Regression", "Timothy Nguyen, Zhourong Chen, Jaehoon Lee",
                  2021, "2011.00050", "ICLR 2021")
KIP_CONV_PAPER = Paper("Dataset Distillation with Infinitely Wide Convolutional Networks",
                       "Timothy Nguyen, Roman Novak, Lechao Xiao, Jaehoon Lee", 2021, "2107.13034", "NeurIPS 2021")

Kernel = Callable[[Tensor, Tensor | None], Tensor]


def centered_one_hot(labels: Tensor, num_classes: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """KIP's targets: ``onehot(labels) - 1/K``, ``(N,)`` int64 -> ``(N, K)``."""
    return F.one_hot(labels, num_classes).to(dtype) - 1.0 / num_classes


def class_balanced_indices(labels: Tensor, per_class: int, num_classes: int,
                           generator: torch.Generator | None = None) -> Tensor:
    """``per_class`` distinct indices of each class (class-major order), uniformly at random."""
    out = []
    for c in range(num_classes):
        idx = torch.nonzero(labels == c).flatten()
        if idx.numel() < per_class:
            raise ValueError(f"class {c} has {idx.numel()} samples, fewer than the {per_class} asked for")
        out.append(idx[torch.randperm(idx.numel(), generator=generator)[:per_class]])
    return torch.cat(out)


@torch.no_grad()
def krr_accuracy(kernel: Kernel, support_x: Tensor, support_y: Tensor, test_x: Tensor, test_y: Tensor,
                 reg: float = 1e-6, batch_size: int = 1000) -> float:
    """Top-1 accuracy (%) of kernel ridge regression from a support set on labelled test images.

    Args:
        kernel: ``kernel(a, b)`` -> ``(len(a), len(b))``, ``kernel(a, None)`` the symmetric ``K(a, a)``.
        support_x: ``(N_s, ...)``; support_y: ``(N_s, K)`` regression targets.
        test_x: ``(M, ...)``; test_y: ``(M,)`` class indices.
        reg: as :func:`distill.functional.krr_predict`; batch_size: test rows per kernel block.
    """
    k_ss = kernel(support_x, None)
    correct = 0
    for start in range(0, test_x.shape[0], batch_size):
        xb = test_x[start:start + batch_size].to(support_x.dtype)
        pred = krr_predict(kernel(xb, support_x), k_ss, support_y, reg)
        correct += int((pred.argmax(1).cpu() == test_y[start:start + batch_size].cpu()).sum())
    return 100.0 * correct / max(1, test_x.shape[0])


def _check(images: Tensor, labels: Tensor, ipc: int, num_classes: int, hp: dict[str, Any], who: str) -> None:
    check_real_set(images, labels, ipc, num_classes, who)
    for name in ("iterations", "target_batch"):
        check_int(name, hp[name], who=who)
    if not (isinstance(hp["lr"], (int, float)) and hp["lr"] > 0):
        raise ValueError(f"{who}: lr must be > 0; got {hp['lr']!r}")
    if not (isinstance(hp["reg"], (int, float)) and hp["reg"] >= 0):
        raise ValueError(f"{who}: reg must be >= 0; got {hp['reg']!r}")
    if hp["max_time_s"] is not None and not (isinstance(hp["max_time_s"], (int, float)) and hp["max_time_s"] > 0):
        raise ValueError(f"{who}: max_time_s must be a positive number or None; got {hp['max_time_s']!r}")
    if hp["dtype"] not in ("float32", "float64"):
        raise ValueError(f"{who}: dtype must be 'float32' or 'float64'; got {hp['dtype']!r}")
    class_indices(labels, num_classes, ipc, who)  # every class has ipc images


def run_kip(kernel: Kernel, images: Tensor, labels: Tensor, *, ipc: int, num_classes: int, seed: int, progress: bool,
        iterations: int, lr: float, target_batch: int, reg: float, learn_labels: bool, dtype: str,
        method: str, settings: dict[str, Any], max_time_s: float | None = None) -> SyntheticSet:
    """The KIP loop (module docstring) with any kernel; returns the learned support set."""
    _check(images, labels, ipc, num_classes, {"iterations": iterations, "lr": lr, "target_batch": target_batch,
                                               "reg": reg, "dtype": dtype, "max_time_s": max_time_s}, method)
    dt = torch.float64 if dtype == "float64" else torch.float32
    g = torch.Generator().manual_seed(seed)
    init = class_balanced_indices(labels, ipc, num_classes, g)
    x_s = images[init].to(dt).clone().requires_grad_(True)
    y_s = centered_one_hot(labels[init], num_classes, dt).requires_grad_(learn_labels)
    opt = torch.optim.Adam([x_s, y_s] if learn_labels else [x_s], lr=lr)
    counts = torch.bincount(labels, minlength=num_classes)
    per_class = max(1, min(target_batch // num_classes, int(counts.min())))
    history: list[float] = []
    t0 = time.perf_counter()
    with StepProgress(progress, method, iterations) as bar:
        for it in range(iterations):
            idx = class_balanced_indices(labels, per_class, num_classes, g)
            x_t = images[idx].to(dt)
            y_t = centered_one_hot(labels[idx], num_classes, dt)
            loss = krr_loss(kernel(x_t, x_s), kernel(x_s, None), y_s, y_t, reg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.append(float(loss.detach()))
            bar.advance(f"loss {history[-1]:.5f}")
            if max_time_s is not None and time.perf_counter() - t0 > max_time_s:
                break
    step = max(1, len(history) // 200)
    manifest: dict[str, Any] = {
        "method": method, "family": "dataset", "ipc": ipc, "num_classes": num_classes, "seed": seed,
        "settings": {**settings, "iterations": iterations, "lr": lr, "target_batch": target_batch, "reg": reg,
                     "learn_labels": learn_labels, "dtype": dtype, "target_per_class": per_class,
                     "max_time_s": max_time_s},
        "iterations_run": len(history),
        "init_indices": init.tolist(), "loss_history": history[::step], "loss_first": history[0],
        "loss_last": history[-1], "time_s": time.perf_counter() - t0,
    }
    if learn_labels:
        manifest["learned_targets"] = y_s.detach().tolist()
    return SyntheticSet(x_s.detach().float(), labels[init].clone(), manifest)


@register_synthesizer("kip_fc", "dataset", KIP_PAPER)
def kip_fc(images: Tensor, labels: Tensor, *, ipc: int, num_classes: int, seed: int = 0, progress: bool = True,
           iterations: int = 1000, lr: float = 0.01, target_batch: int = 5000, reg: float = 1e-6,
           learn_labels: bool = False, depth: int = 1, weight_var: float = 2.0, bias_var: float = 1e-4,
           dtype: str = "float64", max_time_s: float | None = None) -> SyntheticSet:
    """KIP with the exact NTK of a fully-connected ReLU network (Nguyen et al., ICLR 2021).

    Args:
        images: ``(N, C, H, W)`` standardised training images; labels: ``(N,)`` class indices.
        ipc: support images per class; num_classes: ``K``.
        iterations: Adam steps; lr: Adam's learning rate (paper: 0.01 on MNIST).
        target_batch: target images per step, class-balanced (``target_batch // K`` per class).
        reg: ``λ = reg · tr(K_ss)/n_s``; learn_labels: optimise the support targets too.
        depth, weight_var, bias_var: the FC network's hidden layers, ``σ_w²``, ``σ_b²``.
        dtype: ``"float64"`` (as the authors' code, which enables JAX's x64) or ``"float32"``.
        max_time_s: stop after the iteration that passes this many seconds (None: run them all);
            ``manifest["iterations_run"]`` says how many ran.

    Returns:
        the support set (float32 images, their initial classes; manifest with the loss history).
    """
    kernel = partial(fc_ntk, depth=depth, weight_var=weight_var, bias_var=bias_var)
    if isinstance(images, Tensor) and images.dim() == 4:
        kernel(images[:1].double(), None)  # bad kernel args fail now
    return run_kip(kernel, images, labels, ipc=ipc, num_classes=num_classes, seed=seed, progress=progress,
               iterations=iterations, lr=lr, target_batch=target_batch, reg=reg, learn_labels=learn_labels,
               dtype=dtype, method="kip_fc", max_time_s=max_time_s,
               settings={"kernel": "fc_ntk", "depth": depth, "weight_var": weight_var, "bias_var": bias_var})


@register_synthesizer("kip_conv", "dataset", KIP_CONV_PAPER)
def kip_conv(images: Tensor, labels: Tensor, *, ipc: int, num_classes: int, seed: int = 0, progress: bool = True,
             iterations: int = 1000, lr: float = 0.01, target_batch: int = 100, reg: float = 1e-6,
             learn_labels: bool = False, depth: int = 3, weight_var: float = 2.0, bias_var: float = 1e-4,
             pool: bool = True, readout: str = "flatten", chunk: int | None = None,
             dtype: str = "float64", max_time_s: float | None = None) -> SyntheticSet:
    """KIP with the exact convolutional NTK of a ConvNet (Nguyen et al., NeurIPS 2021).

    Args:
        images, labels, ipc, num_classes, iterations, lr, target_batch, reg, learn_labels, dtype, max_time_s:
            as :func:`kip_fc`.
        depth: conv blocks [conv3x3 -> ReLU -> avgpool2]; weight_var, bias_var: ``σ_w²``, ``σ_b²``.
        pool: the 2x2 average pooling after each block; readout: ``"flatten"`` or ``"gap"``.
        chunk: rows per block of the kernel computation (None: automatic; see
            :func:`~distill.functional.conv_ntk`).

    Returns:
        the support set, as :func:`kip_fc`.
    """
    kernel = partial(conv_ntk, depth=depth, weight_var=weight_var, bias_var=bias_var, pool=pool,
                     readout=readout, chunk=chunk)
    if isinstance(images, Tensor) and images.dim() == 4:
        kernel(images[:1].double(), None)  # bad kernel args fail now
    return run_kip(kernel, images, labels, ipc=ipc, num_classes=num_classes, seed=seed, progress=progress,
               iterations=iterations, lr=lr, target_batch=target_batch, reg=reg, learn_labels=learn_labels,
               dtype=dtype, method="kip_conv", max_time_s=max_time_s,
               settings={"kernel": "conv_ntk", "depth": depth, "weight_var": weight_var, "bias_var": bias_var,
                         "pool": pool, "readout": readout, "chunk": chunk})
