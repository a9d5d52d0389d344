"""Coreset baselines of dataset distillation: pick ``ipc`` real images per class.

Registered as "dataset" synthesizers (:mod:`distill.synthesis.registry`); each returns a
:class:`~distill.data.synthetic.SyntheticSet` of real images whose manifest records the chosen
``indices`` into the given training set.

* ``random_real``: ``ipc`` images per class drawn uniformly without replacement (the "Random"
  baseline of Dataset Condensation, Zhao et al., ICLR 2021, arXiv 2006.05929).
* ``herding``: herding (Welling, "Herding Dynamical Weights to Learn", ICML 2009) in the greedy
  form iCaRL uses for exemplars (Rebuffi et al., CVPR 2017, arXiv 1611.07725, Algorithm 4):
  with class mean ``mu = mean_i phi(x_i)``, pick for ``k = 1..ipc``

      p_k = argmin_{x not yet picked} || mu - (phi(x) + sum_{j<k} phi(p_j)) / k ||_2

  (ties: the lowest index).
* ``k_center``: the greedy k-center core-set of Sener & Savarese ("Active Learning for
  Convolutional Neural Networks: A Core-Set Approach", ICLR 2018, arXiv 1708.00489,
  Algorithm 1): starting from one centre, repeatedly add ``u = argmax_i min_{j in S} ||phi(x_i) -
  phi(x_j)||_2`` (ties: the lowest index).

The embedding ``phi`` (DC uses the features of a ConvNet trained on the real data for its
herding and k-center baselines; how long it trains is not given in what we could read):
``embedding="convnet3"`` (default) trains a ConvNet-3 (:mod:`distill.models.convnet`) on all the
given images for ``embed_epochs`` epochs (SGD 0.01, momentum 0.9, batch 256: ours, brief) and
uses its flattened features (``ConvNet.embed``, ``(N, 2048)`` on 28x28); ``"pixels"`` uses the
flattened images; a callable ``(B, C, H, W) -> (B, D)`` is used as given (Python only).
The first k-center centre (ours; the paper starts from the already-labelled pool): ``first_center=
"mean"`` the sample nearest the class mean, ``"random"`` a uniformly drawn one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from distill.data.synthetic import SyntheticSet
from distill.papers import Paper
from distill.synthesis._checks import check_int
from distill.synthesis._real import check_real_set, class_indices
from distill.synthesis.progress import StepProgress
from distill.synthesis.registry import register_synthesizer

__all__ = ["herding", "herding_select", "k_center", "k_center_select", "random_real"]

DC_PAPER = Paper("Dataset Condensation with Gradient Matching", "Bo Zhao, Konda Reddy Mopuri, Hakan Bilen", 2021,
                 "2006.05929", "ICLR")
HERDING_PAPER = Paper("Herding Dynamical Weights to Learn", "Max Welling", 2009, None, "ICML")
KCENTER_PAPER = Paper("Active Learning for Convolutional Neural Networks: A Core-Set Approach",
                      "Ozan Sener, Silvio Savarese", 2018, "1708.00489", "ICLR")

Embedding = str | Callable[[Tensor], Tensor]


# ---------------------------------------------------------------------------------------------
# the selection rules, on features
# ---------------------------------------------------------------------------------------------


def herding_select(features: Tensor, m: int) -> Tensor:
    """Herding: ``m`` distinct row indices of ``features (n, D)`` whose running mean tracks the mean.

    Step ``k`` picks the unpicked row ``x`` minimising ``||mu - (x + s) / k||_2`` where ``s`` is the
    sum of the rows picked so far and ``mu`` the mean of all rows. Returns int64 ``(m,)`` in pick order.
    """
    _check_m(features, m, "herding_select")
    f = features.double()
    mu = f.mean(0)
    picked: list[int] = []
    taken = torch.zeros(f.shape[0], dtype=torch.bool)
    total = torch.zeros_like(mu)
    for k in range(1, m + 1):
        dist = (mu.unsqueeze(0) - (f + total) / k).norm(dim=1)
        dist[taken] = float("inf")
        i = int(torch.argmin(dist))
        picked.append(i)
        taken[i] = True
        total = total + f[i]
    return torch.tensor(picked, dtype=torch.int64)


def k_center_select(features: Tensor, m: int, first: int = 0) -> Tensor:
    """Greedy k-center: start at row ``first`` of ``features (n, D)``, then add the row farthest
    (Euclidean) from its nearest chosen centre, until ``m`` rows. Returns int64 ``(m,)`` in pick order."""
    _check_m(features, m, "k_center_select")
    if not 0 <= first < features.shape[0]:
        raise ValueError(f"k_center_select: first must index a row in [0, {features.shape[0]}); got {first}")
    f = features.double()
    picked = [int(first)]
    nearest = (f - f[first]).norm(dim=1)
    for _ in range(m - 1):
        i = int(torch.argmax(nearest))
        picked.append(i)
        nearest = torch.minimum(nearest, (f - f[i]).norm(dim=1))
    return torch.tensor(picked, dtype=torch.int64)


def _check_m(features: Tensor, m: int, who: str) -> None:
    if not isinstance(features, Tensor) or features.dim() != 2:
        raise ValueError(f"{who}: features must be a tensor (n, D); got "
                         f"{tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__}")
    if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= features.shape[0]:
        raise ValueError(f"{who}: m must be an int in [1, {features.shape[0]}] (the rows); got {m!r}")


# ---------------------------------------------------------------------------------------------
# shared plumbing
# ---------------------------------------------------------------------------------------------


def _class_indices(images: Tensor, labels: Tensor, ipc: int, num_classes: int, who: str) -> list[Tensor]:
    """Per class, the indices of its samples; every check before any work."""
    check_real_set(images, labels, ipc, num_classes, who)
    return class_indices(labels, num_classes, ipc, who)


def _assemble(method: str, images: Tensor, chosen: list[Tensor], settings: dict[str, Any],
              num_classes: int, ipc: int) -> SyntheticSet:
    idx = torch.cat(chosen)
    labels = torch.cat([torch.full((len(c),), k, dtype=torch.int64) for k, c in enumerate(chosen)])
    manifest = {"method": method, "family": "dataset", "ipc": ipc, "num_classes": num_classes,
                "settings": settings, "indices": idx.tolist()}
    return SyntheticSet(images[idx].clone(), labels, manifest)


def _embedder(embedding: Embedding, images: Tensor, labels: Tensor, num_classes: int, *, embed_epochs: int,
              seed: int, progress: bool, who: str) -> Callable[[Tensor], Tensor]:
    """``phi``: a function images ``(B, C, H, W)`` -> features ``(B, D)`` (see the module docstring)."""
    if callable(embedding):
        return embedding
    if embedding == "pixels":
        return lambda x: x.flatten(1)
    if embedding != "convnet3":
        raise ValueError(f"{who}: embedding must be 'convnet3', 'pixels' or a callable (B, C, H, W) -> (B, D); "
                         f"got {embedding!r}")
    check_int("embed_epochs", embed_epochs, who=who)
    from distill.models import create
    from distill.synthesis.evaluate import train_on_synthetic

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = create("convnet3", num_classes=num_classes, in_channels=images.shape[1], image_size=images.shape[2])
    g = torch.Generator().manual_seed(seed)
    with StepProgress(progress, f"{who}: train the ConvNet-3 embedding", embed_epochs) as bar:
        train_on_synthetic(net, images, labels, epochs=embed_epochs, lr=0.01, batch_size=256, lr_decay=1.0,
                           generator=g, bar=bar)
    net.eval()

    @torch.no_grad()
    def phi(x: Tensor) -> Tensor:
        return torch.cat([net.embed(x[i:i + 1024]) for i in range(0, x.shape[0], 1024)])

    return phi


def _features(phi: Callable[[Tensor], Tensor], x: Tensor, who: str) -> Tensor:
    f = phi(x)
    if not isinstance(f, Tensor) or f.dim() != 2 or f.shape[0] != x.shape[0]:
        raise ValueError(f"{who}: the embedding must map ({x.shape[0]}, C, H, W) to ({x.shape[0]}, D); got "
                         f"{tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__}")
    return f.detach()


def _embedding_name(embedding: Embedding) -> str:
    return embedding if isinstance(embedding, str) else getattr(embedding, "__qualname__", "callable")


# ---------------------------------------------------------------------------------------------
# the synthesizers
# ---------------------------------------------------------------------------------------------


@register_synthesizer("random_real", "dataset", DC_PAPER)
def random_real(images: Tensor, labels: Tensor, *, ipc: int, num_classes: int, seed: int = 0,
                progress: bool = True) -> SyntheticSet:
    """Random real images: ``ipc`` per class, uniformly without replacement (seeded)."""
    per_class = _class_indices(images, labels, ipc, num_classes, "random_real")
    g = torch.Generator().manual_seed(seed)
    chosen = [idx[torch.randperm(idx.numel(), generator=g)[:ipc]] for idx in per_class]
    return _assemble("random_real", images, chosen, {"seed": seed}, num_classes, ipc)


@register_synthesizer("herding", "dataset", HERDING_PAPER)
def herding(images: Tensor, labels: Tensor, *, ipc: int, num_classes: int, seed: int = 0, progress: bool = True,
            embedding: Embedding = "convnet3", embed_epochs: int = 1) -> SyntheticSet:
    """Herding: per class, the images whose running feature mean best tracks the class mean."""
    per_class = _class_indices(images, labels, ipc, num_classes, "herding")
    phi = _embedder(embedding, images, labels, num_classes, embed_epochs=embed_epochs, seed=seed,
                    progress=progress, who="herding")
    chosen = []
    with StepProgress(progress, "herding", num_classes) as bar:
        for c, idx in enumerate(per_class):
            chosen.append(idx[herding_select(_features(phi, images[idx], "herding"), ipc)])
            bar.advance(f"class {c}")
    settings = {"embedding": _embedding_name(embedding), "embed_epochs": embed_epochs, "seed": seed}
    return _assemble("herding", images, chosen, settings, num_classes, ipc)


@register_synthesizer("k_center", "dataset", KCENTER_PAPER)
def k_center(images: Tensor, labels: Tensor, *, ipc: int, num_classes: int, seed: int = 0, progress: bool = True,
             embedding: Embedding = "convnet3", embed_epochs: int = 1, first_center: str = "random") -> SyntheticSet:
    """Greedy k-center per class: each new image is the one farthest from its nearest chosen one."""
    if first_center not in ("random", "mean"):
        raise ValueError(f"k_center: first_center must be 'random' or 'mean'; got {first_center!r}")
    per_class = _class_indices(images, labels, ipc, num_classes, "k_center")
    phi = _embedder(embedding, images, labels, num_classes, embed_epochs=embed_epochs, seed=seed,
                    progress=progress, who="k_center")
    g = torch.Generator().manual_seed(seed)
    chosen = []
    with StepProgress(progress, "k-center", num_classes) as bar:
        for c, idx in enumerate(per_class):
            f = _features(phi, images[idx], "k_center")
            if first_center == "mean":
                first = int(torch.argmin((f.double() - f.double().mean(0)).norm(dim=1)))
            else:
                first = int(torch.randint(idx.numel(), (1,), generator=g))
            chosen.append(idx[k_center_select(f, ipc, first)])
            bar.advance(f"class {c}")
    settings = {"embedding": _embedding_name(embedding), "embed_epochs": embed_epochs,
                "first_center": first_center, "seed": seed}
    return _assemble("k_center", images, chosen, settings, num_classes, ipc)
