"""Knowledge Condensation Distillation as a training strategy: ``fit_condensed``.

Paper: C. Li, M. Lin, Z. Ding, N. Lin, Y. Zhuang, Y. Huang, X. Ding, L. Cao, "Knowledge
Condensation Distillation", ECCV 2022, arXiv 2207.05409 (reference code: github.com/dzy3/KCD).

The EM alternation of the paper, built from the library's pieces:

* **M-step**: ordinary training with :func:`distill.fit` on the current condensed knowledge set;
  the Distiller's :class:`~distill.methods.condensation.KCD` loss is KD and records each sample's
  value (the student's prediction entropy, running mean over its visits: OGVE, Eqs. 7 and 12).
* **E-step**, at the start of every stage of ``condense_every`` epochs: rank all training samples by
  the cost-aware score (Eq. 13), keep the best ones (the set shrinks as :func:`~distill.functional.kcd_schedule`
  says), and summarise the lowest-valued kept ones with the removed ones (VAKS, Eqs. 14 and 15).

The stages run inside **one** ``fit`` call, through a loader that condenses itself when ``fit``
announces the first epoch of a new stage (``set_epoch``): one optimizer and one learning-rate
schedule span the whole run, as in the reference code, and ``fit`` does the rest (evaluation,
metrics, checkpoints). Each epoch's metrics hold ``<loss>_samples``, the number of samples trained on.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor

from distill import functional as DF
from distill.batch import Batch
from distill.data.augment import Augment
from distill.data.loader import InMemoryLoader, in_memory_tensors
from distill.functional.condensation import SUMMARY_MODES
from distill.methods.condensation import KCD
from distill.train.loop import FitResult, fit

__all__ = ["CondensedFitResult", "CondensedLoader", "StageInfo", "fit_condensed"]


@dataclass(frozen=True)
class StageInfo:
    """One stage of the condensation: from ``start_epoch`` on, ``num_samples`` samples, of which
    ``num_summarised`` (K_1L) carry the VAKS perturbation."""

    stage: int
    start_epoch: int
    num_samples: int
    num_summarised: int


@dataclass
class CondensedFitResult(FitResult):
    """:class:`~distill.train.loop.FitResult` plus the stages and the last condensed set
    (``keep_index``: sorted indices into the training data, int64, CPU)."""

    stages: list[StageInfo] = field(default_factory=list)
    keep_index: Tensor | None = None


class CondensedLoader:
    """Batches of the current condensed knowledge set; it condenses itself when a new stage begins.

    ``set_epoch(e)`` (``fit`` calls it before every epoch) first runs the E-step of every stage
    boundary up to epoch ``e``, then selects ``e``'s sample order. Batches carry ``index``: the
    sample's position in the *full* training data, so the KCD record and other per-sample state
    (CRD's memory banks) keep their meaning when the set changes. The loader has no ``targets``
    attribute on purpose: ``fit`` would bind the methods to the condensed set's size; ``index_space``
    (the full data's size) tells it the range of the indices instead. Under torchrun
    (``set_shard``) every condensed set is sharded like an :class:`~distill.data.loader.InMemoryLoader`;
    ``fit`` keeps the KCD record equal on every rank, so every rank condenses to the same set.

    Args:
        inputs, targets: the full training data (N, ...) and (N,) (or ``None``); never modified.
        kcd: the Distiller's KCD loss, whose record ranks the samples.
        sizes: the condensed set's size per stage (:func:`~distill.functional.kcd_schedule`).
        condense_every: epochs per stage.
        alpha, eps_max, summary: Eq. 13's exponent, Eq. 15's largest strength, Eq. 14's form.
        batch_size, shuffle, drop_last, augment, seed, device: as :class:`~distill.data.loader.InMemoryLoader`.
    """

    def __init__(self, inputs: Tensor, targets: Tensor | None, kcd: KCD, *, sizes: list[int], condense_every: int,
                 alpha: float = 0.03, eps_max: float = 0.3, summary: str = "additive", batch_size: int = 64,
                 shuffle: bool = True, drop_last: bool = False, augment: Augment | None = None, seed: int = 0,
                 device: torch.device | str | None = None) -> None:
        self.inputs = inputs if device is None else inputs.to(device)
        self.labels = None if targets is None else targets.to(self.inputs.device)
        self.kcd = kcd
        self.sizes = list(sizes)
        self.condense_every = int(condense_every)
        self.alpha, self.eps_max, self.summary = float(alpha), float(eps_max), summary
        self._loader_kwargs: dict[str, Any] = {"batch_size": batch_size, "shuffle": shuffle, "drop_last": drop_last,
                                               "augment": augment, "seed": seed, "return_index": True}
        self.stage = 0
        self.shard: tuple[int, int, str] = (0, 1, "batch")
        self.index = torch.arange(self.inputs.shape[0], device=self.inputs.device)
        self._loader = self._make_loader(self.inputs, self.labels)
        self.stages = [StageInfo(0, 0, int(self.inputs.shape[0]), 0)]

    def _make_loader(self, x: Tensor, y: Tensor | None) -> InMemoryLoader:
        loader = InMemoryLoader(x, y, **self._loader_kwargs)
        loader.set_shard(*self.shard)
        if len(loader) == 0:
            raise ValueError(
                f"the condensed set of {x.shape[0]} samples makes no batch of {loader.batch_size} with "
                "drop_last=True; lower batch_size or raise keep_ratio"
            )
        return loader

    @property
    def num_samples(self) -> int:
        """Size of the current condensed set."""
        return int(self.index.numel())

    @property
    def index_space(self) -> int:
        """Size of the full training data: the batches' ``index`` lies in ``[0, index_space)``."""
        return int(self.inputs.shape[0])

    def set_shard(self, rank: int, world_size: int, split: str = "batch") -> None:
        """Yield only rank ``rank``'s part of each condensed set (this one and the ones to come)."""
        self._loader.set_shard(rank, world_size, split)  # checks the arguments
        self.shard = (rank, world_size, split)

    def condense(self, num_keep: int, start_epoch: int) -> StageInfo:
        """The E-step: rank, keep ``num_keep`` samples, summarise K_1L with K_0; returns the new stage."""
        score = self.kcd.scores(self.alpha).to(self.inputs.device)
        part = DF.kcd_partition(score, num_keep)
        keep = torch.sort(part.kept).values  # data order, so the loader's order depends on the set only
        x = self.inputs[keep]  # a copy: the original data stay untouched
        if part.low.numel():
            position = torch.empty(self.inputs.shape[0], dtype=torch.long, device=keep.device)
            position[keep] = torch.arange(keep.numel(), device=keep.device)
            eps = DF.kcd_summary_epsilon(int(part.low.numel()), self.eps_max).to(x.device)
            x[position[part.low]] = DF.kcd_summarize(self.inputs[part.low], self.inputs[part.dropped], eps,
                                                     self.summary)
        self._loader = self._make_loader(x, None if self.labels is None else self.labels[keep])
        self.index = keep
        self.stage += 1
        info = StageInfo(self.stage, start_epoch, int(keep.numel()), int(part.low.numel()))
        self.stages.append(info)
        return info

    def set_epoch(self, epoch: int) -> None:
        """Condense for every stage boundary up to ``epoch`` (the E-steps), then select ``epoch``'s order."""
        stage = min(epoch // self.condense_every, len(self.sizes) - 1)
        if stage < self.stage:
            raise RuntimeError(
                f"epoch {epoch} belongs to stage {stage}, but the set was already condensed for stage "
                f"{self.stage}: a condensed loader only moves forward (no resume)"
            )
        while self.stage < stage:
            self.condense(self.sizes[self.stage + 1], epoch)
        self._loader.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self._loader)

    def __iter__(self) -> Iterator[Batch]:
        for b in self._loader:
            yield replace(b, index=self.index[b.index])  # keeps the mixup fields of a mixed batch

    def __repr__(self) -> str:
        return (f"CondensedLoader(stage={self.stage}, samples={self.num_samples}/{self.inputs.shape[0]}, "
                f"loader={self._loader!r})")


def _find_kcd(distiller: Any, loss: str | None) -> KCD:
    methods = getattr(distiller, "methods", None)
    if methods is None:
        raise TypeError(f"fit_condensed needs a distill.Distiller, got {type(distiller).__name__}")
    if loss is not None:
        if loss not in methods or not isinstance(methods[loss], KCD):
            raise ValueError(f"loss {loss!r} is not a KCD loss of the distiller; its losses: {dict(methods.items())}")
        found = {loss: methods[loss]}
    else:
        found = {n: m for n, m in methods.items() if isinstance(m, KCD)}
    if len(found) != 1:
        what = "no KCD loss" if not found else f"several KCD losses {sorted(found)} (pass loss=...)"
        raise ValueError(
            f"fit_condensed needs exactly one KCD loss in the distiller to record the knowledge values; it has "
            f"{what}. Build it with e.g. losses={{'ce': 0.1, 'kcd': 0.9}} (the reference code's weights)"
        )
    name, kcd = next(iter(found.items()))
    if kcd.weight == 0:
        raise ValueError(f"the KCD loss {name!r} has weight 0: the Distiller skips it, so no value would be recorded")
    return kcd


def _check_real(name: str, value: Any, low: float, high: float | None, low_open: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (value > low if low_open else value >= low) and (high is None or value <= high)
    if not ok:
        span = f"{'(' if low_open else '['}{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be a number in {span}, got {value!r}")
    return float(value)


def fit_condensed(
    distiller: Any,
    train_data: Any,
    val_loader: Iterable[Any] | None = None,
    *,
    epochs: int,
    condense_every: int = 40,
    keep_ratio: float = 0.7,
    alpha: float = 0.03,
    eps_max: float = 0.3,
    summary: str = "additive",
    batch_size: int | None = None,
    shuffle: bool | None = None,
    drop_last: bool | None = None,
    augment: Augment | None = None,
    seed: int = 0,
    loss: str | None = None,
    **fit_kwargs: Any,
) -> CondensedFitResult:
    """Train with Knowledge Condensation Distillation: KD on a knowledge set condensed every stage.

    Example (the reference code's CIFAR-100 protocol: 240 epochs, lr 0.05 decayed at 150/180/210,
    batch 64, CE 0.1 + KD 0.9 at T = 4, a condensation every 40 epochs towards 70% of the data)::

        d = distill.Distiller(student, teacher, losses={"ce": 0.1, "kcd": 0.9})
        fit_condensed(d, train, test.loader(64, shuffle=False), epochs=240, milestones=[150, 180, 210],
                      augment=distill.data.augment.Augment(...))

    Args:
        distiller: a :class:`~distill.Distiller` with one :class:`~distill.methods.condensation.KCD`
            loss (other losses may sit beside it; per-sample ones see indices into the full data).
        train_data: the full training set in memory: a :class:`~distill.data.sources.TensorData`, an
            ``(inputs, targets)`` tuple, or an :class:`~distill.data.loader.InMemoryLoader` (whose
            batch size, shuffling, augmentation and seed are used unless given here).
        val_loader: evaluated after each epoch by ``fit``.
        epochs: total epochs of the run.
        condense_every: epochs per stage (40, the reference code's ``--purification``); at least one
            condensation must fall inside the run, so it must be smaller than ``epochs``.
        keep_ratio: the fraction of the data the schedule shrinks towards (0.7, the reference code's
            ``--threshold``); see :func:`~distill.functional.kcd_schedule`. 1 keeps everything.
        alpha: exponent of the visit count in the ranking score (Eq. 13; 0.03, the reference code's).
        eps_max: the strongest perturbation of the summary (Eq. 15; 0.3, the reference code's).
        summary: ``"additive"`` (Eq. 14 of the paper) or ``"convex"`` (the reference code's mixup).
        batch_size: 64 (the reference code's) unless ``train_data`` is a loader; ``shuffle`` (default
            True), ``drop_last`` (False), ``augment`` (None): as for ``InMemoryLoader``.
        seed: seeds ``fit`` and the loaders' order and augmentation streams.
        loss: the KCD loss's name, when the distiller has several.
        fit_kwargs: passed to :func:`distill.fit` (optimizer, lr, milestones, run_dir, device, ...).

    Returns:
        ``fit``'s result plus ``stages`` (start epoch and size of each condensed set) and ``keep_index``.

    Raises (before any training):
        ValueError: no KCD loss, a keep ratio outside (0, 1], ``condense_every >= epochs``, a bad
            ``alpha`` / ``eps_max`` / ``summary``, or ``resume`` (the condensed set and its
            summary are not checkpointed, so a run cannot be resumed mid-way).
        TypeError: training data that is not in memory (a ``DataLoader``, a generator, ...).

    Notes:
        The summary perturbs inputs, so the teacher must see each batch's inputs (the Distiller's
        ordinary teacher does); a teacher cache read by sample index would return the outputs of
        the unperturbed samples. ``fit`` lays per-step schedules (``cosine``, ``onecycle``) over the
        first stage's batches per epoch; later stages have fewer, so such a schedule stops short of
        its end (a warning says so). ``multistep`` (the paper's) and ``constant`` are unaffected.
    """
    kcd = _find_kcd(distiller, loss)
    if fit_kwargs.get("resume"):
        raise ValueError("fit_condensed cannot resume: the condensed set and its summary are not checkpointed")
    keep_ratio = _check_real("keep_ratio", keep_ratio, 0.0, 1.0, low_open=True)
    alpha = _check_real("alpha", alpha, 0.0, None)
    if summary not in SUMMARY_MODES:
        raise ValueError(f"summary must be one of {SUMMARY_MODES}, got {summary!r}")
    eps_max = _check_real("eps_max", eps_max, 0.0, 1.0 if summary == "convex" else None)
    for name, v in (("epochs", epochs), ("condense_every", condense_every)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if condense_every >= epochs:
        raise ValueError(
            f"condense_every={condense_every} must be smaller than epochs={epochs}: otherwise no condensation "
            "happens during training (use distill.fit for plain KD)"
        )
    if fit_kwargs.get("schedule") in ("cosine", "onecycle"):
        warnings.warn(
            f"schedule={fit_kwargs['schedule']!r} is stepped per batch and laid out over the first stage's "
            "batches per epoch; the condensed stages have fewer, so it will not reach its end. "
            "Use schedule='multistep' (the paper's) for an exact schedule.",
            stacklevel=2,
        )

    inputs, targets, settings = in_memory_tensors(train_data, "fit_condensed")
    if not isinstance(inputs, Tensor) or inputs.dim() == 0 or inputs.shape[0] < 1:
        raise ValueError("the training data has no samples")
    given = {"batch_size": batch_size, "shuffle": shuffle, "drop_last": drop_last, "augment": augment}
    loader_kwargs = {"batch_size": 64, "shuffle": True, "drop_last": False, "augment": None, "seed": seed,
                     **settings, **{k: v for k, v in given.items() if v is not None}}
    num_samples = int(inputs.shape[0])
    sizes = DF.kcd_schedule(num_samples, epochs, condense_every, keep_ratio)
    if loader_kwargs["drop_last"] and min(sizes) < loader_kwargs["batch_size"]:
        raise ValueError(
            f"the smallest condensed set has {min(sizes)} samples, fewer than "
            f"batch_size={loader_kwargs['batch_size']}, and drop_last=True would leave no batch; "
            "lower batch_size or raise keep_ratio"
        )
    loader = CondensedLoader(inputs, targets, kcd, sizes=sizes, condense_every=condense_every, alpha=alpha,
                             eps_max=eps_max, summary=summary, **loader_kwargs)

    distiller.bind_data(num_samples, targets)  # every method sees indices into the full data
    kcd.reset_values()  # the estimate belongs to this run
    result = fit(distiller, loader, val_loader, epochs=epochs, seed=seed, **fit_kwargs)
    out = CondensedFitResult(**{f.name: getattr(result, f.name) for f in fields(FitResult)})
    out.stages = list(loader.stages)
    out.keep_index = loader.index.detach().cpu()
    return out
