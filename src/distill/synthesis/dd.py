"""Dataset Distillation: synthetic images and step sizes learned through unrolled training.

Paper: T. Wang, J.-Y. Zhu, A. Torralba, A. A. Efros, "Dataset Distillation", 2018, arXiv
1811.10959 (reference code: github.com/SsnL/dataset-distillation).

The distilled data are ``S`` batches ``x̃_1..x̃_S`` (``per_step`` images per class each, fixed
labels) and ``S·E`` learned step sizes ``η̃_1..η̃_{S·E}``. A network with initial weights ``θ_0``
takes ``S·E`` gradient steps, cycling ``E`` times ("epochs") through the batches,

    θ_{j+1} = θ_j - η̃_{j+1} ∇_θ ℓ(x̃_{(j mod S)+1}, θ_j),

and the distilled data and step sizes are trained (Adam) to minimise the loss of ``θ_{S·E}`` on a
batch of real data, ``L = ℓ(x_real, θ_{S·E})``, back-propagated through every step (Algorithm 1
with the multi-step, multi-epoch extension of Section 3). ``init="random"`` draws a fresh
``θ_0 ~ p(θ_0)`` every iteration (the paper's "random unknown initialisation": the images must
train any network of the distribution); ``init="fixed"`` uses one ``θ_0`` (drawn from ``seed``)
throughout ("fixed known initialisation"; the set then trains that initialisation only, which
:func:`train_distilled` rebuilds from the manifest).

The unrolled steps are :func:`unrolled_sgd` (``torch.func.functional_call`` with
``create_graph=True``); the authors' code computes the same gradient with hand-written
Hessian-vector products.

Defaults from the authors' code (``base_options.py``, ``train_distilled_image.py``; the paper's
text gives LeNet on MNIST and the steps/epochs only): LeNet (here ``lenet5`` at the images' size,
DAFL's LeNet-5, whose conv3 on the 5x5 map is the code's 400->120 linear layer: the same
network); Xavier-normal weights (gain 1) and zero biases for ``p(θ_0)``; 10 steps x 3 epochs with
1 image per class per step (``ipc = steps x per_step``: ipc 10 -> 10 steps; the fixed-init MNIST
setting of the README is 1 step, i.e. ipc 1); step sizes initialised to 0.02 and kept positive
by a softplus; images initialised ``N(0, 1)``; Adam(lr 0.01, betas (0.5, 0.999)) halved every 40
epochs of the real data, 400 epochs, real batches of 1024; one ``θ_0`` per iteration; cross
entropy for both the inner and the outer loss.

Evaluation departs from the paper when the set is evaluated by
:func:`distill.synthesis.evaluate.evaluate_synthetic` (a ConvNet-3 trained 300 epochs with SGD):
the paper evaluates by replaying the learned step sizes from ``θ_0`` (:func:`train_distilled`),
which is what the images were made for.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from distill.data.synthetic import SyntheticSet
from distill.papers import Paper
from distill.synthesis._checks import check_int
from distill.synthesis._real import check_real_set
from distill.synthesis.progress import StepProgress
from distill.synthesis.registry import register_synthesizer

__all__ = ["DD_PAPER", "dataset_distillation", "init_params", "train_distilled", "unrolled_sgd"]

DD_PAPER = Paper("Dataset Distillation", "Tongzhou Wang, Jun-Yan Zhu, Antonio Torralba, Alexei A. Efros", 2018,
                 "1811.10959")

Step = tuple[Tensor, Tensor, Tensor]


def unrolled_sgd(model: nn.Module, params: dict[str, Tensor], steps: Sequence[Step],
                 loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
                 create_graph: bool = True) -> dict[str, Tensor]:
    """Plain gradient steps ``θ ← θ - η ∇_θ loss_fn(model(x; θ), y)`` through ``torch.func``.

    Args:
        model: the architecture (its own parameters are not used; its buffers are).
        params: name -> initial tensor ``θ_0`` for every parameter of ``model``.
        steps: ``(x (B, ...), y (B,) or (B, K), lr (scalar tensor))`` per step, in order.
        loss_fn: ``loss_fn(logits, y)`` -> scalar.
        create_graph: keep the graph of every gradient, so that the result is differentiable with
            respect to the step data, the step sizes and ``θ_0`` (False: first-order, detached).

    Returns:
        name -> ``θ_T`` after all steps.
    """
    buffers = dict(model.named_buffers())
    theta = {k: v if v.requires_grad else v.detach().requires_grad_(True) for k, v in params.items()}
    names = list(theta)
    for x, y, lr in steps:
        if not create_graph:
            theta = {k: v.detach().requires_grad_(True) for k, v in theta.items()}
        loss = loss_fn(functional_call(model, {**theta, **buffers}, (x,)), y)
        grads = torch.autograd.grad(loss, [theta[k] for k in names], create_graph=create_graph)
        theta = {k: theta[k] - lr * g for k, g in zip(names, grads)}
    return theta


def init_params(model: nn.Module, generator: torch.Generator) -> dict[str, Tensor]:
    """``θ_0 ~ p(θ_0)`` of the authors' code: Xavier-normal (gain 1) weights and zero biases for
    every conv and linear layer, unit weight / zero bias for norm layers, other parameters as the
    module has them. Returns name -> tensor (not leaves of ``model``)."""
    out: dict[str, Tensor] = {}
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            t = p.detach().clone()
            if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                if p_name == "weight":
                    nn.init.xavier_normal_(t, gain=1.0, generator=generator)
                else:
                    t.zero_()
            elif "Norm" in type(mod).__name__:
                t.fill_(1.0 if p_name == "weight" else 0.0)
            out[f"{mod_name}.{p_name}" if mod_name else p_name] = t
    return out


def _build(model: str | Callable[[], nn.Module], model_kwargs: dict[str, Any], num_classes: int,
           shape: tuple[int, ...]) -> nn.Module:
    if callable(model) and not isinstance(model, str):
        net = model()
        if not isinstance(net, nn.Module):
            raise TypeError(f"dataset_distillation: model factory returned {type(net).__name__}, not an nn.Module")
        return net
    from distill.models import create
    from distill.models.registry import _MODELS

    kwargs: dict[str, Any] = {"num_classes": num_classes, "in_channels": shape[0]}
    factory = _MODELS.get(model)
    if factory is not None and "image_size" in inspect.signature(factory).parameters:
        kwargs["image_size"] = shape[1]
    return create(model, **{**kwargs, **model_kwargs})


def _steps_of(data: Tensor, labels: Tensor, lrs: Tensor, n_steps: int) -> list[Step]:
    xs, ys = data.chunk(n_steps), labels.chunk(n_steps)
    return [(xs[j % n_steps], ys[j % n_steps], lrs[j]) for j in range(lrs.shape[0])]


def _check(images: Tensor, labels: Tensor, ipc: int, num_classes: int, hp: dict[str, Any]) -> None:
    who = "dataset_distillation"
    check_real_set(images, labels, ipc, num_classes, who)
    for name in ("epochs", "batch_size", "distill_epochs", "decay_epochs", "inits_per_iteration"):
        check_int(name, hp[name], who=who)
    steps = hp["steps"]
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1 or ipc % steps):
        raise ValueError(f"{who}: steps must be a positive int dividing ipc={ipc} (images per class per step = "
                         f"ipc / steps); got {steps!r}")
    for name in ("lr", "distill_lr", "decay_factor"):
        if not (isinstance(hp[name], (int, float)) and math.isfinite(hp[name]) and hp[name] > 0):
            raise ValueError(f"{who}: {name} must be a positive number; got {hp[name]!r}")
    if hp["max_time_s"] is not None and not (isinstance(hp["max_time_s"], (int, float)) and hp["max_time_s"] > 0):
        raise ValueError(f"{who}: max_time_s must be a positive number or None; got {hp['max_time_s']!r}")
    if hp["init"] not in ("random", "fixed"):
        raise ValueError(f"{who}: init must be 'random' (a fresh θ_0 every iteration) or 'fixed'; got {hp['init']!r}")


@register_synthesizer("dataset_distillation", "dataset", DD_PAPER)
def dataset_distillation(images: Tensor, labels: Tensor, *, ipc: int, num_classes: int, seed: int = 0,
                         progress: bool = True, model: str | Callable[[], nn.Module] = "lenet5",
                         model_kwargs: dict[str, Any] | None = None, init: str = "random",
                         steps: int | None = None, distill_epochs: int = 3, distill_lr: float = 0.02,
                         epochs: int = 400, batch_size: int = 1024, lr: float = 0.01, decay_epochs: int = 40,
                         decay_factor: float = 0.5, inits_per_iteration: int = 1,
                         max_time_s: float | None = None) -> SyntheticSet:
    """Dataset Distillation (Wang et al. 2018): images and per-step learning rates trained through
    unrolled gradient steps of a network.

    Args:
        images: ``(N, C, H, W)`` real training images; labels: ``(N,)``.
        ipc: distilled images per class in all (``steps`` x images per class per step).
        num_classes: ``K``.
        model: a zoo name (built with ``num_classes``, ``in_channels`` and ``image_size`` when the
            factory takes it, plus ``model_kwargs``) or a zero-argument factory; "lenet5": LeNet.
        init: ``"random"`` (fresh ``θ_0`` each iteration) or ``"fixed"`` (one ``θ_0`` from ``seed``).
        steps: distilled batches ``S`` (default: ``ipc`` when ``ipc <= 10``, else 10, dividing ``ipc``).
        distill_epochs: ``E``, passes over the ``S`` batches (``S·E`` learned step sizes).
        distill_lr: the step sizes' initial value.
        epochs, batch_size: passes over the real data and real images per iteration.
        lr, decay_epochs, decay_factor: Adam's learning rate on images and step sizes, multiplied by
            ``decay_factor`` every ``decay_epochs`` epochs.
        inits_per_iteration: ``θ_0`` draws whose losses are averaged per iteration (Algorithm 1's
            batch of initial weights; ignored with ``init="fixed"``).
        max_time_s: stop after the iteration that passes this many seconds (None: all epochs);
            ``manifest["iterations_run"]`` says how many ran.

    Returns:
        :class:`SyntheticSet` of ``ipc·K`` images in step order (each step's images class-major),
        hard labels; the manifest holds the learned ``step_lrs``, ``steps``, ``distill_epochs``, the
        ``init`` and ``init_seed``, and the outer loss history.
    """
    hp = {"epochs": epochs, "batch_size": batch_size, "distill_epochs": distill_epochs, "decay_epochs": decay_epochs,
          "inits_per_iteration": inits_per_iteration, "steps": steps, "lr": lr, "distill_lr": distill_lr,
          "decay_factor": decay_factor, "init": init, "max_time_s": max_time_s}
    _check(images, labels, ipc, num_classes, hp)
    if steps is None:
        steps = ipc if ipc <= 10 else next(s for s in range(10, 0, -1) if ipc % s == 0)
    per_step = ipc // steps
    shape = tuple(images.shape[1:])
    net = _build(model, dict(model_kwargs or {}), num_classes, shape)
    net.eval()  # its parameters are never trained; unrolled_sgd uses functional copies
    g = torch.Generator().manual_seed(seed)
    fixed = init_params(net, torch.Generator().manual_seed(seed)) if init == "fixed" else None

    # the distilled data: S batches of per_step images per class (class-major inside a batch)
    step_labels = torch.arange(num_classes).repeat_interleave(per_step)
    syn_y = step_labels.repeat(steps)
    syn_x = torch.randn(steps * per_step * num_classes, *shape, generator=g).requires_grad_(True)
    raw_lr = torch.full((steps * distill_epochs,), math.log(math.expm1(distill_lr))).requires_grad_(True)
    opt = torch.optim.Adam([syn_x, raw_lr], lr=lr, betas=(0.5, 0.999))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=decay_epochs, gamma=decay_factor)

    n = images.shape[0]
    per_epoch = math.ceil(n / batch_size)
    history: list[float] = []
    t0 = time.perf_counter()
    with StepProgress(progress, "dataset_distillation", epochs * per_epoch) as bar:
        for _epoch in range(epochs):
            if max_time_s is not None and time.perf_counter() - t0 > max_time_s:
                break
            order = torch.randperm(n, generator=g)
            for start in range(0, n, batch_size):
                idx = order[start:start + batch_size]
                x_real, y_real = images[idx], labels[idx]
                lrs = F.softplus(raw_lr)
                plan = _steps_of(syn_x, syn_y, lrs, steps)
                draws = 1 if fixed is not None else inits_per_iteration
                opt.zero_grad(set_to_none=True)
                total = 0.0
                for _ in range(draws):
                    theta0 = fixed if fixed is not None else init_params(net, g)
                    theta = unrolled_sgd(net, theta0, plan)
                    loss = F.cross_entropy(functional_call(net, {**theta, **dict(net.named_buffers())},
                                                           (x_real,)), y_real) / draws
                    loss.backward()
                    total += float(loss.detach())
                opt.step()
                history.append(total)
                bar.advance(f"loss {total:.4f}")
                if max_time_s is not None and time.perf_counter() - t0 > max_time_s:
                    break
            sched.step()
    every = max(1, len(history) // 200)
    manifest = {
        "method": "dataset_distillation", "family": "dataset", "ipc": ipc, "num_classes": num_classes, "seed": seed,
        "settings": {"model": model if isinstance(model, str) else getattr(model, "__name__", "callable"),
                     "model_kwargs": dict(model_kwargs or {}), "init": init, "steps": steps,
                     "per_step": per_step, "distill_epochs": distill_epochs, "distill_lr": distill_lr,
                     "epochs": epochs, "batch_size": batch_size, "lr": lr, "decay_epochs": decay_epochs,
                     "decay_factor": decay_factor, "inits_per_iteration": inits_per_iteration,
                     "max_time_s": max_time_s},
        "iterations_run": len(history),
        "step_lrs": F.softplus(raw_lr).detach().tolist(), "init_seed": seed if init == "fixed" else None,
        "loss_history": history[::every], "loss_first": history[0], "loss_last": history[-1],
        "time_s": time.perf_counter() - t0,
    }
    return SyntheticSet(syn_x.detach(), syn_y, manifest)


def train_distilled(model: nn.Module, synthetic: SyntheticSet, theta0: dict[str, Tensor] | None = None) -> nn.Module:
    """The paper's evaluation: replay a :func:`dataset_distillation` set's learned steps on ``model``.

    ``θ_0``: ``theta0`` when given; else, for a fixed-init set, the initialisation rebuilt from
    the manifest's ``init_seed``; else a fresh draw of ``p(θ_0)``. The model's parameters are set to
    ``θ_{S·E}`` in place; returns ``model``.
    """
    m = synthetic.manifest
    if m.get("method") != "dataset_distillation" or "step_lrs" not in m:
        raise ValueError("train_distilled needs a set made by dataset_distillation (its manifest has no step_lrs)")
    if theta0 is None:
        seed = m.get("init_seed")
        theta0 = init_params(model, torch.Generator().manual_seed(int(seed) if seed is not None else
                                                                  int(torch.randint(2**31, ()))))
    lrs = torch.tensor(m["step_lrs"], dtype=synthetic.images.dtype)
    plan = _steps_of(synthetic.images, synthetic.labels, lrs, int(m["settings"]["steps"]))
    theta = unrolled_sgd(model, theta0, plan, create_graph=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(theta[name])
    return model
