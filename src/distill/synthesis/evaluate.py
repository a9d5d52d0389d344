"""Evaluate a synthetic set the way dataset distillation does: train fresh models on it, test them.

Protocol of Dataset Condensation with Gradient Matching (Zhao, Mopuri & Bilen, ICLR 2021,
arXiv 2006.05929) as the authors' code runs it (github.com/VICO-UoE/DatasetCondensation,
``utils.evaluate_synset``), also used by DSA (arXiv 2102.08259) and DM (arXiv 2110.04181):
a fresh ConvNet-3 per evaluation, SGD with momentum 0.9 and weight decay 5e-4, lr 0.01, batch
256, cross-entropy, ``epochs`` epochs (300 in DC/DSA), the lr multiplied by 0.1 once half the
epochs are done, DSA augmentation of every training batch when ``dsa`` is on
(fresh parameters per image, not shared across the batch: the authors' evaluation is not siamese); then top-1
accuracy on the real test split. Reported: every evaluation's accuracy, their mean and their
standard deviation (``np.std``, i.e. over N, not N - 1, as the authors' code).

Departures: the authors train ``epochs + 1`` epochs and decay after epoch ``epochs // 2 + 1``;
we train exactly ``epochs`` and decay after ``epochs // 2`` (a one-epoch shift). Soft labels
``(N, K)`` are trained with the soft cross-entropy ``-sum_k p_k log q_k`` (mean over the batch).
"""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from distill.data.synthetic import SyntheticSet
from distill.synthesis.progress import StepProgress

__all__ = ["SyntheticEval", "evaluate_synthetic", "train_on_synthetic", "test_accuracy"]


@dataclass
class SyntheticEval:
    """What :func:`evaluate_synthetic` measured.

    Attributes:
        accuracies: test top-1 accuracy (%) of each evaluation model, in seed order.
        mean: their mean (%).
        std: their standard deviation (%), over N (``np.std``).
        time_s: wall time of all evaluations (s).
        settings: the protocol (model, epochs, lr, lr_decay, batch_size, dsa, seeds).
    """

    accuracies: list[float]
    mean: float
    std: float
    time_s: float
    settings: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check(name: str, value: Any, least: float, kind: type = int) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else int)
    if not ok or not math.isfinite(float(value)) or value < least:
        what = "a number" if kind is float else "an int"
        raise ValueError(f"evaluate_synthetic: {name} must be {what} >= {least}; "
                         f"got {value!r}")


def _build(model: str, model_kwargs: dict[str, Any], num_classes: int, shape: tuple[int, ...]) -> torch.nn.Module:
    from distill.models import create
    from distill.models.registry import _MODELS

    kwargs: dict[str, Any] = {"num_classes": num_classes, "in_channels": shape[0]}
    factory = _MODELS.get(model)
    if factory is not None and "image_size" in inspect.signature(factory).parameters:
        kwargs["image_size"] = shape[1]
    return create(model, **{**kwargs, **model_kwargs})


def train_on_synthetic(net: torch.nn.Module, images: Tensor, labels: Tensor, *, epochs: int, lr: float,
                       batch_size: int, lr_decay: float = 0.1, momentum: float = 0.9, weight_decay: float = 5e-4,
                       dsa: Any = None, generator: torch.Generator | None = None,
                       bar: StepProgress | None = None) -> torch.nn.Module:
    """Train ``net`` on images ``(N, C, H, W)`` and labels ``(N,)`` / ``(N, K)`` with DC's protocol
    (module docstring); ``dsa``: a :class:`~distill.synthesis.dsa.DSA` applied to every batch."""
    device = next(net.parameters()).device
    images, labels = images.to(device), labels.to(device)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    n = images.shape[0]
    net.train()
    for epoch in range(epochs):
        if epoch == epochs // 2 and epoch > 0:
            for group in opt.param_groups:
                group["lr"] = lr * lr_decay
        order = torch.randperm(n, generator=generator).to(device)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            x, y = images[idx], labels[idx]
            if dsa is not None:
                # per-image draws (not siamese), as the authors' evaluation calls DiffAugment with seed -1
                x = dsa(x, dsa.sample(tuple(x.shape), generator, siamese=False))
            logits = net(x)
            loss = F.cross_entropy(logits, y) if y.dim() == 1 else -(y * F.log_softmax(logits, 1)).sum(1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if bar is not None:
            bar.advance(f"epoch {epoch + 1}/{epochs} loss {loss.item():.4f}")
    return net


@torch.no_grad()
def test_accuracy(net: torch.nn.Module, images: Tensor, labels: Tensor, batch_size: int = 1024) -> float:
    """Top-1 accuracy (%) of ``net`` on images ``(M, C, H, W)`` with labels ``(M,)``, in eval mode."""
    device = next(net.parameters()).device
    net.eval()
    correct = 0
    for start in range(0, images.shape[0], batch_size):
        x = images[start:start + batch_size].to(device)
        correct += int((net(x).argmax(1).cpu() == labels[start:start + batch_size]).sum())
    return 100.0 * correct / max(1, images.shape[0])


def evaluate_synthetic(
    synthetic: SyntheticSet,
    test: tuple[Tensor, Tensor],
    *,
    model: str = "convnet3",
    evaluations: int = 5,
    epochs: int = 300,
    lr: float = 0.01,
    batch_size: int = 256,
    dsa: bool = True,
    seed: int = 0,
    progress: bool = True,
    lr_decay: float = 0.1,
    dsa_strategy: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    device: str | torch.device | None = None,
) -> SyntheticEval:
    """Train ``evaluations`` fresh ``model`` s on the synthetic set and test each (DC's protocol).

    Args:
        synthetic: the set (images ``(N, C, H, W)`` in the models' normalised input space).
        test: real held-out images ``(M, C, H, W)`` (same normalisation) and labels ``(M,)``.
        model: a zoo name (``convnet3``: the standard evaluator); built with the set's ``num_classes``,
            ``in_channels`` and, when the factory takes it, ``image_size``; ``model_kwargs`` add to these.
        evaluations: models trained, with seeds ``seed .. seed + evaluations - 1`` (weights, order, DSA).
        epochs, lr, batch_size, lr_decay: the protocol (module docstring); DC's defaults.
        dsa: differentiable siamese augmentation of each training batch.
        dsa_strategy: its ``"_"``-joined groups; ``None``: DSA's default, without ``flip`` when the
            set's manifest names a digit data set as its source (:func:`distill.synthesis.dsa.strategy_for`:
            a mirrored digit is another glyph; the authors drop flip for MNIST).

    Returns:
        :class:`SyntheticEval` (accuracies, mean, std over N, time).
    """
    _check("evaluations", evaluations, 1)
    _check("epochs", epochs, 1)
    _check("batch_size", batch_size, 1)
    _check("lr", lr, 0.0, float)
    _check("lr_decay", lr_decay, 0.0, float)
    if lr <= 0:
        raise ValueError(f"evaluate_synthetic: lr must be > 0; got {lr!r}")
    if not isinstance(synthetic, SyntheticSet):
        raise TypeError(f"evaluate_synthetic: synthetic must be a SyntheticSet; got {type(synthetic).__name__}")
    if not (isinstance(test, (tuple, list)) and len(test) == 2):
        raise TypeError("evaluate_synthetic: test must be a pair (images (M, C, H, W), labels (M,))")
    test_x, test_y = test
    shape = tuple(synthetic.images.shape[1:])
    if test_x.dim() != 4 or tuple(test_x.shape[1:]) != shape or test_y.shape != (test_x.shape[0],):
        raise ValueError(f"evaluate_synthetic: test images must be (M, {', '.join(map(str, shape))}) with labels (M,) "
                         f"like the synthetic set; got {tuple(test_x.shape)} and {tuple(test_y.shape)}")
    k = synthetic.num_classes
    if test_y.numel() and (int(test_y.min()) < 0 or int(test_y.max()) >= k):
        raise ValueError(f"evaluate_synthetic: test labels must lie in [0, {k}); got [{int(test_y.min())}, "
                         f"{int(test_y.max())}]")
    augment = None
    if dsa:
        from distill.synthesis.dsa import DSA, strategy_for

        source = synthetic.manifest.get("source") if isinstance(synthetic.manifest, dict) else None
        dataset = source.get("dataset") if isinstance(source, dict) else None
        augment = DSA(dsa_strategy if dsa_strategy is not None else strategy_for(dataset))
    dev = torch.device(device) if device is not None else torch.device("cpu")
    _build(model, dict(model_kwargs or {}), k, shape)  # a bad model name or argument fails before any training
    accs: list[float] = []
    t0 = time.perf_counter()
    with StepProgress(progress, f"evaluate ({evaluations} x {model})", evaluations * epochs) as bar:
        for i in range(evaluations):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + i)
                net = _build(model, dict(model_kwargs or {}), k, shape).to(dev)
            g = torch.Generator().manual_seed(seed + i)
            train_on_synthetic(net, synthetic.images, synthetic.labels, epochs=epochs, lr=lr, batch_size=batch_size,
                               lr_decay=lr_decay, dsa=augment, generator=g, bar=bar)
            accs.append(test_accuracy(net, test_x, test_y.cpu()))
    arr = np.asarray(accs, dtype=np.float64)
    settings = {"model": model, "model_kwargs": dict(model_kwargs or {}), "evaluations": evaluations,
                "epochs": epochs, "lr": lr, "lr_decay": lr_decay, "batch_size": batch_size, "dsa": bool(dsa),
                "dsa_strategy": "_".join(augment.groups) if augment is not None else None,
                "seeds": [seed + i for i in range(evaluations)], "momentum": 0.9, "weight_decay": 5e-4}
    return SyntheticEval(accs, float(arr.mean()), float(arr.std()), time.perf_counter() - t0, settings)
