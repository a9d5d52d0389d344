"""Evaluating a (self-supervised) encoder: a linear probe on frozen features, and fine-tuning.

The two protocols of self-supervised learning papers (MoCo, "Momentum Contrast for Unsupervised
Visual Representation Learning", He et al. 2020, arXiv 1911.05722; MAE, "Masked Autoencoders Are
Scalable Vision Learners", He et al. 2022, arXiv 2111.06377):

* :func:`linear_probe`: the encoder is frozen (eval mode, no gradient); the features of the training
  and validation sets are extracted **once**, standardised with the training features' mean and
  standard deviation (MAE's ``BatchNorm1d(affine=False)`` before the linear layer, folded into the
  data), and a linear classifier ``W f + b`` is trained on them by minimising the cross-entropy:
  with mini-batch SGD (momentum 0.9, cosine learning rate, no weight decay: MoCo's and MAE's
  optimiser, on our scale) or full-batch L-BFGS (multinomial logistic regression with an L2 penalty,
  what scikit-learn's ``LogisticRegression(solver="lbfgs")`` solves; the probe of SimCLR's and
  BYOL's transfer tables).
* :func:`finetune`: a fresh classifier replaces the encoder's head and the whole network is trained
  with cross-entropy through :func:`distill.fit` (its optimiser, schedule, progress bar, metrics).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.batch import as_batch, run_model
from distill.distiller import Distiller
from distill.models.vit import num_prefix_tokens
from distill.taps import Taps, logits_of, resolve
from distill.train.loop import FitResult, fit

__all__ = ["FinetuneResult", "classifier_input", "extract_features", "finetune", "linear_probe", "train_linear"]

FeatureSpec = str | Callable[[nn.Module, Tensor], Tensor] | None
"""What the probe reads: a tap path of the encoder (``"head:input"``: the pooled feature of the zoo's and
timm's ViTs, ``"fc:input"``: the zoo's CNNs', ``"norm"``: a ViT's tokens), ``"classifier"`` (the input
of the encoder's linear ``head`` or ``fc``, :func:`classifier_input`), ``"logits"`` / ``None`` (the
encoder's output itself), or a callable ``f(encoder, inputs) -> (B, D)``."""

POOLS = ("cls", "mean", "prefix_mean")


def classifier_input(model: nn.Module, who: str = "model") -> str:
    """The tap of a model's pooled feature: the input of its linear classifier, ``"head:input"`` (the zoo's
    and timm's ViTs) or ``"fc:input"`` (the zoo's and torchvision's CNNs); an error naming both otherwise."""
    names = dict(model.named_modules())
    for head in ("head", "fc"):
        if isinstance(names.get(head), nn.Linear):
            return f"{head}:input"
    raise ValueError(f"the {who} ({type(model).__name__}) has no 'head' or 'fc' linear classifier: name its pooled "
                     "feature tap")
SOLVERS = ("sgd", "lbfgs")


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _number(name: str, value: Any, low: float = 0.0, strict: bool = False) -> float:
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
    if bad or value < low or (strict and value == low):
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {low}, got {value!r}")
    return float(value)


def _pool_tokens(x: Tensor, pool: str | None, prefix: int, where: str) -> Tensor:
    if x.dim() == 2:
        return x
    if x.dim() != 3:
        raise ValueError(f"{where}: features must be (B, D) or tokens (B, N, D), got {tuple(x.shape)}")
    if pool is None:
        raise ValueError(f"{where} gives tokens {tuple(x.shape)}: pass pool='cls' (first token), 'mean' (mean "
                         f"of the patch tokens, the {prefix} prefix tokens dropped) or 'prefix_mean' (mean of all "
                         "tokens), or read a pooled tap such as 'head:input'")
    if pool == "cls":
        return x[:, 0]
    if pool == "mean":
        return x[:, prefix:].mean(1)
    return x.mean(1)


@torch.no_grad()
def extract_features(encoder: nn.Module, loader: Iterable[Any], *, features: FeatureSpec = "classifier",
                     pool: str | None = None, device: torch.device | str | None = None,
                     progress: bool = False) -> tuple[Tensor, Tensor | None]:
    """The frozen encoder's features of every sample of ``loader``, in loader order.

    The encoder runs in eval mode under ``torch.no_grad`` (its modes are restored afterwards).

    Args:
        encoder: any ``nn.Module``.
        loader: yields batches (tuples, mappings or :class:`~distill.batch.Batch`).
        features: see :data:`FeatureSpec`.
        pool: for token features ``(B, N, D)``: ``"cls"`` (token 0), ``"mean"`` (mean of the patch
            tokens, ``num_prefix_tokens`` dropped) or ``"prefix_mean"`` (mean over all tokens).
        device: where the encoder runs (default: its parameters' device).
        progress: a progress bar over the batches.

    Returns:
        ``(features (N, D) float32 on the CPU, labels (N,) long or None)``.
    """
    if pool is not None and pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS} or None, got {pool!r}")
    if not (features is None or isinstance(features, str) or callable(features)):
        raise TypeError(f"features must be a tap path, 'logits', None or a callable (encoder, inputs) -> (B, D), "
                        f"got {type(features).__name__}")
    if device is None:
        device = next(encoder.parameters(), torch.empty(0)).device
    taps = None
    if features == "classifier":
        features = classifier_input(encoder, "encoder")
    if isinstance(features, str) and features != "logits":
        resolve(encoder, features, model_name="encoder")  # a clear error before any batch runs
        taps = Taps(encoder, [features], model_name="encoder")
    prefix = num_prefix_tokens(encoder)
    modes = {m: m.training for m in encoder.modules()}
    encoder.eval()
    feats: list[Tensor] = []
    labels: list[Tensor] = []
    has_labels: bool | None = None
    try:
        with _bar(progress, loader, "features") as advance:
            for raw in loader:
                batch = as_batch(raw).to(device)
                if callable(features) and not isinstance(features, str):
                    f = features(encoder, batch.inputs)
                elif taps is not None:
                    with taps.recording() as store:
                        run_model(encoder, batch)
                    f = store[features]  # type: ignore[index]
                else:
                    f = logits_of(run_model(encoder, batch))
                feats.append(_pool_tokens(f, pool, prefix, f"features {features!r}").float().cpu())
                if has_labels is None:
                    has_labels = batch.targets is not None
                if has_labels != (batch.targets is not None):
                    raise ValueError("the loader yields some batches with labels and some without")
                if batch.targets is not None:
                    labels.append(batch.targets.long().cpu())
                advance()
    finally:
        if taps is not None:
            taps.remove()
        for m, mode in modes.items():
            m.training = mode
    if not feats:
        raise ValueError("the loader yielded no batch")
    return torch.cat(feats), (torch.cat(labels) if labels else None)


class _bar:
    """A rich progress bar over ``len(loader)`` steps (nothing when disabled or the length is unknown)."""

    def __init__(self, enabled: bool, loader: Any, what: str) -> None:
        self.enabled = enabled and hasattr(loader, "__len__")
        self.total, self.what, self.progress = (len(loader) if self.enabled else 0), what, None

    def __enter__(self) -> Callable[[], None]:
        if not self.enabled:
            return lambda: None
        from rich.progress import Progress

        self.progress = Progress(transient=True)
        self.progress.start()
        task = self.progress.add_task(self.what, total=self.total)
        return lambda: self.progress.advance(task)  # type: ignore[union-attr]

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()


def train_linear(x: Tensor, y: Tensor, num_classes: int, *, solver: str = "sgd", epochs: int = 100,
                 lr: float = 0.1, batch_size: int = 256, weight_decay: float = 0.0, seed: int = 0,
                 progress: bool = False) -> nn.Linear:
    """A linear classifier ``(D) -> (K)`` trained on features ``x (N, D)`` with labels ``y (N,)``.

    Minimises ``mean_i CE(W x_i + b, y_i) + weight_decay/2 · ‖W‖²`` (the bias is not penalised):

    * ``solver="sgd"``: ``epochs`` passes of shuffled mini-batches of ``batch_size``, SGD with
      momentum 0.9, learning rate ``lr`` decayed by a cosine to 0 over all steps.
    * ``solver="lbfgs"``: full-batch L-BFGS (strong Wolfe line search), at most ``epochs``
      iterations: multinomial logistic regression, as scikit-learn's
      ``LogisticRegression(C=1/(N·weight_decay))``; ``lr`` is L-BFGS's step (1 is standard).

    The classifier starts at zero (the problem is convex: the start only matters for SGD's path).
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if x.dim() != 2 or y.dim() != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"train_linear needs x (N, D) and y (N,), got {tuple(x.shape)} and {tuple(y.shape)}")
    epochs, batch_size = _positive_int("epochs", epochs), _positive_int("batch_size", batch_size)
    lr, weight_decay = _number("lr", lr, strict=True), _number("weight_decay", weight_decay)
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes - 1}], got [{int(y.min())}, {int(y.max())}]")
    clf = nn.Linear(x.shape[1], num_classes).to(x.device)
    nn.init.zeros_(clf.weight)
    nn.init.zeros_(clf.bias)

    def objective(xb: Tensor, yb: Tensor) -> Tensor:
        return F.cross_entropy(clf(xb), yb) + 0.5 * weight_decay * clf.weight.pow(2).sum()

    with torch.enable_grad():
        if solver == "lbfgs":
            opt = torch.optim.LBFGS(clf.parameters(), lr=lr, max_iter=epochs, line_search_fn="strong_wolfe",
                                    tolerance_grad=1e-9, tolerance_change=1e-12, history_size=20)

            def closure() -> Tensor:
                opt.zero_grad()
                loss = objective(x, y)
                loss.backward()
                return loss

            opt.step(closure)
            return clf
        g = torch.Generator().manual_seed(seed)
        n = x.shape[0]
        steps_per_epoch = math.ceil(n / batch_size)
        opt = torch.optim.SGD(clf.parameters(), lr=lr, momentum=0.9)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
        with _bar(progress, range(epochs), "linear probe") as advance:
            for _ in range(epochs):
                order = torch.randperm(n, generator=g).to(x.device)
                for k in range(steps_per_epoch):
                    idx = order[k * batch_size:(k + 1) * batch_size]
                    opt.zero_grad()
                    objective(x[idx], y[idx]).backward()
                    opt.step()
                    sched.step()
                advance()
    return clf


def _top1(clf: nn.Linear, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return 100.0 * int((clf(x).argmax(1) == y).sum()) / y.shape[0]


def linear_probe(encoder: nn.Module, train_loader: Iterable[Any], val_loader: Iterable[Any], *,
                 features: FeatureSpec = "classifier", pool: str | None = None, solver: str = "sgd",
                 epochs: int = 100, lr: float = 0.1, batch_size: int = 256, weight_decay: float = 0.0,
                 standardize: bool = True, num_classes: int | None = None, seed: int = 0,
                 device: torch.device | str | None = None, progress: bool = True) -> dict[str, Any]:
    """Linear-probe accuracy of a frozen encoder.

    The features of ``train_loader`` and ``val_loader`` are extracted once
    (:func:`extract_features`), standardised with the training set's per-dimension mean and
    standard deviation (``standardize``), and a linear classifier is trained on them
    (:func:`train_linear`, ``solver`` ``"sgd"`` or ``"lbfgs"``). The encoder is never changed.

    Args:
        encoder: the frozen model (any ``nn.Module``).
        train_loader, val_loader: labelled batches (give the training loader without augmentation:
            the features are extracted once).
        features, pool: what is read (:data:`FeatureSpec`; default ``"classifier"``: the pooled feature
            entering the encoder's ``head`` (ViTs) or ``fc`` (CNNs)).
        solver, epochs, lr, batch_size, weight_decay, seed: the classifier's training
            (:func:`train_linear`; defaults: SGD, 100 epochs, lr 0.1, batch 256, no weight decay).
        standardize: standardise the features first (MAE's non-affine BatchNorm).
        num_classes: classes (default: the largest label seen + 1).
        device: where the encoder runs (default: its device); the classifier trains on the CPU.
        progress: progress bars.

    Returns:
        ``{"top1": val top-1 %, "train_top1": %, "num_features": D, "num_train": N, "num_val": M,
        "solver": ..., "epochs": ..., "time_s": seconds}``.
    """
    start = time.perf_counter()
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    _positive_int("epochs", epochs)
    _number("lr", lr, strict=True)
    x_tr, y_tr = extract_features(encoder, train_loader, features=features, pool=pool, device=device, progress=progress)
    x_va, y_va = extract_features(encoder, val_loader, features=features, pool=pool, device=device, progress=progress)
    if y_tr is None or y_va is None:
        raise ValueError("linear_probe needs labelled train and validation loaders (a batch had no targets)")
    if standardize:
        mean, std = x_tr.mean(0), x_tr.std(0, unbiased=False)
        std = torch.where(std > 1e-6, std, torch.ones_like(std))
        x_tr, x_va = (x_tr - mean) / std, (x_va - mean) / std
    k = int(max(y_tr.max(), y_va.max())) + 1 if num_classes is None else _positive_int("num_classes", num_classes)
    clf = train_linear(x_tr, y_tr, k, solver=solver, epochs=epochs, lr=lr, batch_size=batch_size,
                       weight_decay=weight_decay, seed=seed, progress=progress)
    return {"top1": _top1(clf, x_va, y_va), "train_top1": _top1(clf, x_tr, y_tr), "num_features": x_tr.shape[1],
            "num_train": x_tr.shape[0], "num_val": x_va.shape[0], "solver": solver, "epochs": epochs,
            "time_s": time.perf_counter() - start}


@dataclass
class FinetuneResult(FitResult):
    """:func:`finetune`'s :class:`~distill.train.FitResult` plus the fine-tuned model."""

    model: nn.Module | None = None


def _new_head(model: nn.Module, head: str, num_classes: int, example: Any) -> None:
    old = resolve(model, head, model_name="encoder")
    if isinstance(old, nn.Linear):
        width = old.in_features
    else:  # an Identity or a bare projector: measure what enters it on one example
        taps = Taps(model, [f"{head}:input"], model_name="encoder")
        modes = {m: m.training for m in model.modules()}
        model.eval()
        try:
            with torch.no_grad(), taps.recording() as store:
                run_model(model, as_batch(example))
        finally:
            taps.remove()
            for m, mode in modes.items():
                m.training = mode
        width = store[f"{head}:input"].shape[-1]
    ref = next(model.parameters())
    new = nn.Linear(width, num_classes).to(device=ref.device, dtype=ref.dtype)
    nn.init.trunc_normal_(new.weight, std=2e-5)  # MAE's fine-tuning head init (a near-zero start)
    nn.init.zeros_(new.bias)
    parent, _, name = head.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, new)


def finetune(encoder: nn.Module, num_classes: int, train_loader: Iterable[Any], val_loader: Iterable[Any] | None,
             *, epochs: int, lr: float, head: str | tuple[str, ...] | None = None, optimizer: str = "adamw",
             weight_decay: float = 0.05, schedule: str = "cosine", copy_encoder: bool = True,
             **fit_kwargs: Any) -> FinetuneResult:
    """Fine-tune ``encoder`` end to end for ``num_classes`` classes with cross-entropy.

    A new ``nn.Linear`` replaces the module at ``head`` (default: the encoder's linear ``head``, the zoo's
    and timm's ViT classifier, else its ``fc``, the zoo's CNNs'; a tuple for several, e.g.
    ``("head", "head_dist")`` of a distilled ViT), with the width of what enters it; every parameter is made trainable and the
    model is trained by :func:`distill.fit` with ``optimizer`` (AdamW, weight decay 0.05 and a cosine
    schedule: MAE's and FD's fine-tuning recipe, without their layer-wise decay and augmentations).

    Args:
        encoder: the pre-trained model; copied first unless ``copy_encoder=False``.
        num_classes: classes of the new head.
        train_loader, val_loader: labelled batches.
        epochs, lr: passed to :func:`distill.fit` (required: no default suits every encoder).
        head: the classifier module path(s) to replace.
        optimizer, weight_decay, schedule, **fit_kwargs: passed to :func:`distill.fit`
            (``progress``, ``run_dir``, ``seed``, ``device``...).

    Returns:
        a :class:`FinetuneResult`: ``fit``'s result (``last_acc``, ``best_acc``, ``history``) and ``model``.
    """
    _positive_int("num_classes", num_classes)
    _positive_int("epochs", epochs)
    _number("lr", lr, strict=True)
    if head is None:
        head = classifier_input(encoder, "encoder").removesuffix(":input")
    heads = (head,) if isinstance(head, str) else tuple(head)
    if not heads or not all(isinstance(h, str) and h for h in heads):
        raise ValueError(f"head must be a module path or a tuple of them, got {head!r}")
    model = copy.deepcopy(encoder) if copy_encoder else encoder
    for h in heads:
        resolve(model, h, model_name="encoder")  # every path checked before any work
    example = next(iter(train_loader), None)
    if example is None:
        raise ValueError("the training loader yielded no batch")
    for h in heads:
        _new_head(model, h, num_classes, example)
    model.requires_grad_(True)
    if hasattr(model, "num_classes"):
        model.num_classes = num_classes
    result = fit(Distiller(model, None, {"ce": 1.0}), train_loader, val_loader, epochs=epochs, lr=lr,
                 optimizer=optimizer, weight_decay=weight_decay, schedule=schedule, **fit_kwargs)
    return FinetuneResult(history=result.history, best_acc=result.best_acc, best_epoch=result.best_epoch,
                          last_acc=result.last_acc, run_dir=result.run_dir, time_s=result.time_s, model=model)
