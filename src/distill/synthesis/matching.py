"""Dataset condensation by matching: gradient matching (DC), DC with differentiable siamese
augmentation (DSA) and distribution matching (DM), registered as "dataset" synthesizers.

* ``gradient_matching``: B. Zhao, K. R. Mopuri, H. Bilen, "Dataset Condensation with Gradient
  Matching", ICLR 2021, arXiv 2006.05929.
* ``dsa``: B. Zhao, H. Bilen, "Dataset Condensation with Differentiable Siamese Augmentation",
  ICML 2021, arXiv 2102.08259.
* ``distribution_matching``: B. Zhao, H. Bilen, "Dataset Condensation with Distribution
  Matching", WACV 2023, arXiv 2110.04181.

All three learn ``ipc`` images per class, pixels in the normalised space of ``images``, with the
labels fixed (``ipc`` of each class, in class order). The objectives are pure functions in
:mod:`distill.functional.matching`. Defaults: the papers' where we could read them (their
abstracts and the authors' README), the rest from the authors' code
(github.com/VICO-UoE/DatasetCondensation: ``main.py``, ``main_DM.py``, ``utils.py``); each
docstring says which.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.data.synthetic import SyntheticSet
from distill.functional.matching import gradient_match_distance, mean_embedding_discrepancy
from distill.models import create
from distill.papers import Paper
from distill.synthesis._checks import check_int
from distill.synthesis._real import check_real_set, class_indices, init_images
from distill.synthesis.progress import StepProgress
from distill.synthesis.registry import register_synthesizer

__all__ = ["DC_LOOPS", "distribution_matching", "dsa", "gradient_matching"]

DC = Paper("Dataset Condensation with Gradient Matching", "B. Zhao, K. R. Mopuri, H. Bilen", 2021, "2006.05929",
           "ICLR")
DSA_PAPER = Paper("Dataset Condensation with Differentiable Siamese Augmentation", "B. Zhao, H. Bilen", 2021,
                  "2102.08259", "ICML")
DM = Paper("Dataset Condensation with Distribution Matching", "B. Zhao, H. Bilen", 2023, "2110.04181", "WACV")

# (outer loop T, inner loop ς_θ) per images-per-class, from the authors' code (utils.get_loops)
DC_LOOPS: dict[int, tuple[int, int]] = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15),
                                        50: (50, 10)}
_CURVE_POINTS = 100  # the objective's curve kept in the manifest, thinned to at most this many points


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------


def _positive_float(who: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{who}: {name} must be a number > 0; got {value!r}")
    return float(value)


def _class_indices(who: str, images: Tensor, labels: Tensor, ipc: int, num_classes: int,
                   init: str) -> list[Tensor]:
    """Check the real set and return the indices of each class's images."""
    check_real_set(images, labels, ipc, num_classes, who)
    if init not in ("real", "noise"):
        raise ValueError(f"{who}: init must be 'real' or 'noise'; got {init!r}")
    return class_indices(labels, num_classes, ipc, who, minimum=ipc if init == "real" else 1)


def _sample(idx: Tensor, n: int, gen: torch.Generator) -> Tensor:
    """``min(n, len(idx))`` indices drawn without replacement."""
    return idx[torch.randperm(len(idx), generator=gen)[:n]]


def _network(who: str, model: str, model_kwargs: dict[str, Any] | None, num_classes: int,
             shape: torch.Size) -> nn.Module:
    kwargs = {"num_classes": num_classes, "in_channels": int(shape[0]), "image_size": int(shape[1]),
              **(model_kwargs or {})}
    if shape[1] != shape[2] and "image_size" not in (model_kwargs or {}):
        raise ValueError(f"{who}: images must be square for {model!r} (image_size = H = W); got {tuple(shape)}")
    return create(model, **kwargs)


def _check_augment(who: str, augment: Any) -> None:
    if augment is not None and not (callable(augment) and callable(getattr(augment, "sample", None))):
        raise TypeError(f"{who}: augmentation must be None or a DSA-like object with .sample(shape, generator, "
                        f"siamese=...) and __call__(x, params); got {type(augment).__name__}")


def _thin(curve: list[float]) -> list[float]:
    if len(curve) <= _CURVE_POINTS:
        return [round(v, 6) for v in curve]
    step = len(curve) / _CURVE_POINTS
    return [round(curve[int(i * step)], 6) for i in range(_CURVE_POINTS)] + [round(curve[-1], 6)]


def _result(method: str, syn: Tensor, ipc: int, num_classes: int, settings: dict[str, Any], curve: list[float],
            iterations: int, t0: float, paper: Paper) -> SyntheticSet:
    labels = torch.arange(num_classes).repeat_interleave(ipc)
    manifest = {
        "method": method, "family": "dataset", "paper": paper.cite(), "ipc": ipc, "num_classes": num_classes,
        "settings": settings, "iterations_done": iterations, "time_s": round(time.perf_counter() - t0, 3),
        "objective": {"first": curve[0] if curve else None, "last": curve[-1] if curve else None,
                      "curve": _thin(curve)},
    }
    return SyntheticSet(syn.detach().clone(), labels, manifest)


def _freeze_batchnorm(net: nn.Module, images: Tensor, idx: list[Tensor], gen: torch.Generator) -> None:
    """The authors' handling of BatchNorm (``main.py``): running statistics from 16 real images
    per class, then every BatchNorm layer in eval mode (a batch of 1 synthetic image has none)."""
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    with torch.no_grad():
        net(torch.cat([images[_sample(i, 16, gen)] for i in idx]))
    for m in bns:
        m.eval()


# --------------------------------------------------------------------------------------------
# Gradient matching (DC) and DSA
# --------------------------------------------------------------------------------------------


def _gradient_matching(who: str, paper: Paper, images: Tensor, labels: Tensor, *, ipc: int, num_classes: int,
                       seed: int, progress: bool, iterations: int, outer_loop: int | None, inner_loop: int | None,
                       lr_images: float, momentum_images: float, lr_net: float, batch_real: int, batch_train: int,
                       init: str, model: str, model_kwargs: dict[str, Any] | None, augment: Any,
                       max_time_s: float | None, settings: dict[str, Any]) -> SyntheticSet:
    t0 = time.perf_counter()
    idx = _class_indices(who, images, labels, ipc, num_classes, init)
    check_int("iterations", iterations, 0, who=who)
    if outer_loop is None or inner_loop is None:
        if ipc not in DC_LOOPS:
            raise ValueError(f"{who}: no default outer_loop/inner_loop for ipc={ipc} (the authors give them for "
                             f"ipc in {sorted(DC_LOOPS)}); pass outer_loop and inner_loop")
        outer_loop = DC_LOOPS[ipc][0] if outer_loop is None else outer_loop
        inner_loop = DC_LOOPS[ipc][1] if inner_loop is None else inner_loop
    check_int("outer_loop", outer_loop, who=who)
    check_int("inner_loop", inner_loop, 0, who=who)
    for name, v in (("lr_images", lr_images), ("lr_net", lr_net)):
        _positive_float(who, name, v)
    check_int("batch_real", batch_real, who=who)
    check_int("batch_train", batch_train, who=who)
    if max_time_s is not None:
        _positive_float(who, "max_time_s", max_time_s)
    _check_augment(who, augment)
    settings = {**settings, "outer_loop": outer_loop, "inner_loop": inner_loop}

    gen = torch.Generator().manual_seed(seed)
    syn_labels = torch.arange(num_classes).repeat_interleave(ipc)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the networks' initialisations; the caller's global RNG is left as it was
        syn = init_images(images, idx, ipc, init, gen).requires_grad_(True)
        opt_img = torch.optim.SGD([syn], lr=lr_images, momentum=momentum_images)
        curve: list[float] = []
        bar = StepProgress(progress, who, iterations)
        done = 0
        try:
            for _ in range(iterations):
                net = _network(who, model, model_kwargs, num_classes, images.shape[1:])
                net.train()
                params = [p for p in net.parameters() if p.requires_grad]
                opt_net = torch.optim.SGD(params, lr=lr_net)
                total = 0.0
                for ol in range(outer_loop):
                    _freeze_batchnorm(net, images, idx, gen)
                    loss = syn.new_zeros(())
                    for c in range(num_classes):
                        real = images[_sample(idx[c], batch_real, gen)]
                        mine = syn[c * ipc:(c + 1) * ipc]
                        if augment is not None:  # siamese: one draw of parameters for both batches
                            p = augment.sample(real.shape, gen)
                            real, mine = augment(real, p), augment(mine, p)
                        y_real = torch.full((real.shape[0],), c, dtype=torch.long)
                        g_real = torch.autograd.grad(F.cross_entropy(net(real), y_real), params)
                        g_real = [g.detach() for g in g_real]
                        y_syn = torch.full((mine.shape[0],), c, dtype=torch.long)
                        g_syn = torch.autograd.grad(F.cross_entropy(net(mine), y_syn), params, create_graph=True)
                        loss = loss + gradient_match_distance(g_syn, g_real)
                    opt_img.zero_grad()
                    syn.grad = torch.autograd.grad(loss, syn)[0]
                    opt_img.step()
                    total += float(loss.detach()) / num_classes
                    if ol == outer_loop - 1:
                        break
                    # the network takes inner_loop epochs on the (current, detached) synthetic set
                    data = syn.detach().clone()
                    for _ in range(inner_loop):
                        for b in torch.randperm(len(data), generator=gen).split(batch_train):
                            xb = data[b]
                            if augment is not None:  # plain (not siamese) augmentation of a training batch
                                xb = augment(xb, augment.sample(xb.shape, gen, siamese=False))
                            opt_net.zero_grad()
                            F.cross_entropy(net(xb), syn_labels[b]).backward()
                            opt_net.step()
                curve.append(total / outer_loop)
                done += 1
                bar.advance(f"loss {curve[-1]:.4f}")
                if max_time_s is not None and time.perf_counter() - t0 > max_time_s:
                    break
        finally:
            bar.close()
    return _result(who, syn, ipc, num_classes, settings, curve, done, t0, paper)


@register_synthesizer("gradient_matching", "dataset", DC)
def gradient_matching(
    images: Tensor,
    labels: Tensor,
    *,
    ipc: int,
    num_classes: int,
    seed: int = 0,
    progress: bool = True,
    iterations: int = 1000,
    outer_loop: int | None = None,
    inner_loop: int | None = None,
    lr_images: float = 0.1,
    momentum_images: float = 0.5,
    lr_net: float = 0.01,
    batch_real: int = 256,
    batch_train: int = 256,
    init: str = "noise",
    model: str = "convnet3",
    model_kwargs: dict[str, Any] | None = None,
    max_time_s: float | None = None,
) -> SyntheticSet:
    """Dataset Condensation with gradient matching (DC; Zhao, Mopuri & Bilen, ICLR 2021, arXiv 2006.05929).

    For each of ``iterations`` (K) freshly initialised networks, ``outer_loop`` (T) times: for every
    class c, draw ``batch_real`` real images of c; the loss is

        sum_c D(grad_theta CE(net(S_c), c), grad_theta CE(net(B_c), c))

    with D the layer-wise distance of :func:`distill.functional.gradient_match_distance` (per output
    node ``1 - cos``, summed over nodes and layers); one SGD step (``lr_images``, momentum
    ``momentum_images``) on the synthetic images S; then, except after the last outer step, the
    network trains ``inner_loop`` (ς_θ) epochs on the current synthetic set (plain SGD ``lr_net``,
    batches of ``batch_train``). One summed step for all classes equals the paper's per-class steps:
    each class's images get only their own class's gradient.

    Args:
        images: real images ``(N, C, H, W)``, normalised (square for ConvNet-3).
        labels: their classes ``(N,)`` in ``[0, num_classes)``.
        ipc: synthetic images per class.
        num_classes: ``K``.
        seed: seeds the image initialisation, the batches and every network's initialisation (the
            global RNG is restored afterwards).
        progress: a rich progress bar over the iterations.
        iterations: K = 1000 (the authors' ``--Iteration``).
        outer_loop, inner_loop: T and ς_θ; by default the authors' table ``DC_LOOPS`` for ipc 1, 10,
            20, 30, 40, 50 ((1, 1), (10, 50), ..., (50, 10)); other ipc values must pass both.
        lr_images, momentum_images: SGD on the images, 0.1 and 0.5 (the authors' code).
        lr_net: the network's SGD step in the inner loop, 0.01 (the authors' code).
        batch_real: real images per class per outer step, 256; batch_train: 256 (the authors' code).
        init: ``"noise"`` (N(0, 1), DC's default in the authors' code) or ``"real"`` (random real images).
        model, model_kwargs: the network, ``"convnet3"`` (width 128, depth 3, instance norm) by default;
            ``num_classes``, ``in_channels`` and ``image_size`` are filled in.
        max_time_s: stop after the iteration that passes this many seconds (ours, for CPU budgets;
            the manifest's ``iterations_done`` says how many ran).

    Returns:
        A :class:`~distill.data.synthetic.SyntheticSet` of ``num_classes * ipc`` images, labels in
        class order, the manifest holding the settings and the matching loss per iteration
        (``objective``: first, last and a curve, averaged over classes and outer steps).

    Departures: biases and normalisation parameters (1-D) are not matched (authors' code); the
    authors' evaluation of DC on MNIST trains with crop/scale/rotate augmentation, which is the
    evaluator's business (:func:`distill.synthesis.evaluate.evaluate_synthetic`).
    """
    settings = {"iterations": iterations, "lr_images": lr_images, "momentum_images": momentum_images,
                "lr_net": lr_net, "batch_real": batch_real, "batch_train": batch_train, "init": init,
                "model": model, "model_kwargs": model_kwargs or {}, "max_time_s": max_time_s, "seed": seed}
    return _gradient_matching("gradient_matching", DC, images, labels, ipc=ipc, num_classes=num_classes, seed=seed,
                              progress=progress, iterations=iterations, outer_loop=outer_loop, inner_loop=inner_loop,
                              lr_images=lr_images, momentum_images=momentum_images, lr_net=lr_net,
                              batch_real=batch_real, batch_train=batch_train, init=init, model=model,
                              model_kwargs=model_kwargs, augment=None, max_time_s=max_time_s, settings=settings)


def _make_dsa(strategy: str, augmentation: Any) -> Any:
    if augmentation is not None:
        return augmentation
    from distill.synthesis.dsa import DSA

    return DSA(strategy=strategy)


@register_synthesizer("dsa", "dataset", DSA_PAPER)
def dsa(
    images: Tensor,
    labels: Tensor,
    *,
    ipc: int,
    num_classes: int,
    seed: int = 0,
    progress: bool = True,
    strategy: str = "color_crop_cutout_flip_scale_rotate",
    iterations: int = 1000,
    outer_loop: int | None = None,
    inner_loop: int | None = None,
    lr_images: float = 0.1,
    momentum_images: float = 0.5,
    lr_net: float = 0.01,
    batch_real: int = 256,
    batch_train: int = 256,
    init: str = "real",
    model: str = "convnet3",
    model_kwargs: dict[str, Any] | None = None,
    max_time_s: float | None = None,
    augmentation: Any = None,
) -> SyntheticSet:
    """DC with Differentiable Siamese Augmentation (DSA; Zhao & Bilen, ICML 2021, arXiv 2102.08259).

    :func:`gradient_matching` where, for every class at every outer step, ONE draw of augmentation
    parameters ``p = A.sample(...)`` transforms both the real batch and the synthetic batch
    (``A(B_c, p)``, ``A(S_c, p)``: siamese), so the matched gradients see the same transformation and
    the images learn through it (it is differentiable). The network's inner-loop training batches
    are augmented too, with fresh parameters each batch (the authors' code).

    Args:
        strategy: the DSA operations (:class:`distill.synthesis.dsa.DSA`), the paper's
            ``"color_crop_cutout_flip_scale_rotate"``; the authors' README advises dropping ``flip``
            for digit data sets (MNIST, SVHN): ``"color_crop_cutout_scale_rotate"``.
        init: ``"real"`` (the authors' DSA command line uses ``--init real``).
        augmentation: an already built DSA-like object (``.sample(shape, generator)``,
            ``__call__(x, params)``) used instead of ``DSA(strategy)``; not recorded in the manifest.
        the rest: as :func:`gradient_matching` (the same defaults, from the authors' code).

    Returns:
        A :class:`~distill.data.synthetic.SyntheticSet` (see :func:`gradient_matching`).

    The authors evaluate DSA sets with DSA augmentation while training the evaluation networks (1000
    epochs in their code): ``evaluate_synthetic(..., dsa=True)``.
    """
    augment = _make_dsa(strategy, augmentation)
    settings = {"strategy": strategy if augmentation is None else type(augmentation).__name__,
                "iterations": iterations, "lr_images": lr_images, "momentum_images": momentum_images,
                "lr_net": lr_net, "batch_real": batch_real, "batch_train": batch_train, "init": init,
                "model": model, "model_kwargs": model_kwargs or {}, "max_time_s": max_time_s, "seed": seed}
    return _gradient_matching("dsa", DSA_PAPER, images, labels, ipc=ipc, num_classes=num_classes, seed=seed,
                              progress=progress, iterations=iterations, outer_loop=outer_loop, inner_loop=inner_loop,
                              lr_images=lr_images, momentum_images=momentum_images, lr_net=lr_net,
                              batch_real=batch_real, batch_train=batch_train, init=init, model=model,
                              model_kwargs=model_kwargs, augment=augment, max_time_s=max_time_s, settings=settings)


# --------------------------------------------------------------------------------------------
# Distribution matching (DM)
# --------------------------------------------------------------------------------------------


def _embedder(who: str, net: nn.Module, model: str) -> Callable[[Tensor], Tensor]:
    embed = getattr(net, "embed", None)
    if not callable(embed):
        raise TypeError(f"{who}: model {model!r} has no .embed(x) -> (B, D) (the features before the classifier); "
                        "use convnet3 or a model that defines embed")
    return embed


@register_synthesizer("distribution_matching", "dataset", DM)
def distribution_matching(
    images: Tensor,
    labels: Tensor,
    *,
    ipc: int,
    num_classes: int,
    seed: int = 0,
    progress: bool = True,
    iterations: int = 20000,
    lr_images: float = 1.0,
    momentum_images: float = 0.5,
    batch_real: int = 256,
    init: str = "real",
    strategy: str | None = "color_crop_cutout_flip_scale_rotate",
    model: str = "convnet3",
    model_kwargs: dict[str, Any] | None = None,
    max_time_s: float | None = None,
    augmentation: Any = None,
) -> SyntheticSet:
    """Dataset Condensation with Distribution Matching (DM; Zhao & Bilen, WACV 2023, arXiv 2110.04181).

    Each iteration draws a freshly initialised network psi (its parameters frozen: it is only an
    embedding, ``model.embed``), and for every class c a batch B_c of ``batch_real`` real images;
    with one DSA draw ``p`` per class applied to both (siamese, when ``strategy`` is set) the loss is

        sum_c || mean_{x in B_c} psi(A(x, p)) - mean_{s in S_c} psi(A(s, p)) ||_2^2

    (:func:`distill.functional.mean_embedding_discrepancy`), and the synthetic images take one SGD
    step (``lr_images``, momentum ``momentum_images``). No network is trained.

    Args:
        images, labels, ipc, num_classes, seed, progress: as :func:`gradient_matching`.
        iterations: 20000; lr_images: 1.0; momentum_images: 0.5; batch_real: 256; init: ``"real"``;
            strategy: ``"color_crop_cutout_flip_scale_rotate"`` — the authors' ``main_DM.py`` defaults
            (the README's command for CIFAR-10 uses ``--lr_img 1``). ``strategy=None`` matches
            without augmentation.
        model, model_kwargs: the embedding network, ConvNet-3 (its flattened features, 2048 for 28x28).
        max_time_s: as :func:`gradient_matching`.
        augmentation: an already built DSA-like object used instead of ``DSA(strategy)``.

    Returns:
        A :class:`~distill.data.synthetic.SyntheticSet` (manifest ``objective``: the loss per
        iteration, averaged over classes).
    """
    who = "distribution_matching"
    t0 = time.perf_counter()
    idx = _class_indices(who, images, labels, ipc, num_classes, init)
    check_int("iterations", iterations, 0, who=who)
    _positive_float(who, "lr_images", lr_images)
    check_int("batch_real", batch_real, who=who)
    if max_time_s is not None:
        _positive_float(who, "max_time_s", max_time_s)
    augment = None if strategy is None and augmentation is None else _make_dsa(strategy or "", augmentation)
    _check_augment(who, augment)
    settings = {"iterations": iterations, "lr_images": lr_images, "momentum_images": momentum_images,
                "batch_real": batch_real, "init": init,
                "strategy": strategy if augmentation is None else type(augmentation).__name__,
                "model": model, "model_kwargs": model_kwargs or {}, "max_time_s": max_time_s, "seed": seed}

    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        syn = init_images(images, idx, ipc, init, gen).requires_grad_(True)
        opt_img = torch.optim.SGD([syn], lr=lr_images, momentum=momentum_images)
        curve: list[float] = []
        bar = StepProgress(progress, who, iterations)
        done = 0
        try:
            for _ in range(iterations):
                net = _network(who, model, model_kwargs, num_classes, images.shape[1:])
                net.train()
                net.requires_grad_(False)
                embed = _embedder(who, net, model)
                loss = syn.new_zeros(())
                for c in range(num_classes):
                    real = images[_sample(idx[c], batch_real, gen)]
                    mine = syn[c * ipc:(c + 1) * ipc]
                    if augment is not None:
                        p = augment.sample(real.shape, gen)
                        real, mine = augment(real, p), augment(mine, p)
                    with torch.no_grad():
                        e_real = embed(real)
                    loss = loss + mean_embedding_discrepancy(e_real, embed(mine))
                opt_img.zero_grad()
                syn.grad = torch.autograd.grad(loss, syn)[0]
                opt_img.step()
                curve.append(float(loss.detach()) / num_classes)
                done += 1
                bar.advance(f"loss {curve[-1]:.4f}")
                if max_time_s is not None and time.perf_counter() - t0 > max_time_s:
                    break
        finally:
            bar.close()
    return _result(who, syn, ipc, num_classes, settings, curve, done, t0, DM)
