r"""Mean teacher: an exponential moving average of the student as its own teacher, with a consistency
cost on labeled and unlabeled data.

Paper: A. Tarvainen, H. Valpola, "Mean teachers are better role models: Weight-averaged consistency
targets improve semi-supervised deep learning results", NeurIPS 2017, arXiv 1703.01780 (reference
code: github.com/CuriousAI/mean-teacher, a TensorFlow and a PyTorch version).

Built from the library's pieces:

* :class:`EMATeacher` is a teacher source (a :class:`~distill.teachers.FrozenTeacher` whose weights
  follow the student): the Distiller calls :meth:`EMATeacher.on_step_end` after every optimizer step
  (``distill.fit`` does, through ``Distiller.step_end``), which applies
  :math:`\theta' \leftarrow \alpha_t \theta' + (1 - \alpha_t)\theta`.
* the student minimises :class:`MaskedCrossEntropy` (labeled samples only) plus
  :class:`MeanTeacherConsistency` (squared error between the softmaxes, every sample), whose weight
  ramps up with a sigmoid over the first steps;
* :class:`MeanTeacherLoader` joins a labeled and an unlabeled loader into mixed batches (label ``-1``
  marks an unlabeled sample) and draws independent noise for the student's and the teacher's views;
* :func:`mean_teacher` runs all of it through one :func:`distill.fit` call.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from distill import functional as DF
from distill.batch import Batch, View, as_batch
from distill.data.augment import mix_seed
from distill.data.loader import GlobalBatchShards
from distill.distiller import Distiller
from distill.methods.base import Method, Paper
from distill.strategies.chain import ModelSpec, build_model, check_model_spec
from distill.strategies.registry import register_strategy
from distill.teachers import FrozenTeacher
from distill.train.loop import FitResult, fit

__all__ = [
    "EMATeacher",
    "MaskedCrossEntropy",
    "MeanTeacherConsistency",
    "MeanTeacherLoader",
    "MeanTeacherResult",
    "TwoViewBatch",
    "mean_teacher",
]

PAPER = Paper(
    title="Mean teachers are better role models: Weight-averaged consistency targets improve semi-supervised "
    "deep learning results",
    authors="A. Tarvainen, H. Valpola",
    year=2017,
    arxiv="1703.01780",
    venue="NeurIPS",
)

BUFFER_MODES = ("own", "copy", "ema")


# ---------------------------------------------------------------------------------------- the teacher


class EMATeacher(FrozenTeacher):
    """The mean teacher: a copy of the student whose weights are an exponential moving average of the
    student's, updated after every optimizer step.

    ``on_step_end(student)`` applies, for every parameter,
    ``θ' ← α_t θ' + (1 - α_t) θ`` with ``α_t = min(1 - 1/(t+1), α)`` for the ``t``-th update
    (:func:`~distill.functional.ema_decay_at`), where ``α`` is ``decay_rampup`` for the first
    ``rampup_steps`` updates and ``decay`` afterwards (the paper's 0.99 during the consistency ramp-up,
    0.999 after it; the cap by ``1 - 1/(t+1)`` is the reference PyTorch code's: a true average until
    the exponential one is more correct).

    Args:
        student: the model being trained; the teacher starts as a deep copy of it.
        decay: ``α`` after the ramp-up.
        decay_rampup: ``α`` during the first ``rampup_steps`` updates; ``None``: ``decay`` throughout.
        rampup_steps: length of that phase in optimizer steps.
        buffers: what the copy's buffers (BatchNorm running statistics) follow.
            ``"own"`` (default, the reference PyTorch code's): the teacher keeps its own statistics,
            updated by its own training-mode forward passes on its own views; ``"copy"``: copied from
            the student after each step; ``"ema"``: averaged like the parameters (integer buffers
            such as ``num_batches_tracked`` are copied). With ``"copy"`` and ``"ema"`` the teacher's
            training-mode forward still normalises with batch statistics but leaves the buffers as
            they were.
        noise: run the copy in training mode (dropout, batch statistics: the paper's teacher noise
            η') during training steps. Evaluation (``distill.evaluate``) and ``Distiller.prepare``
            run without gradient, and there the copy always runs in eval mode. With ``noise=False``
            the copy always runs in eval mode; then ``buffers="own"`` would never update the running
            statistics, so it is refused.

    A batch with a ``teacher_inputs`` attribute (:class:`TwoViewBatch`) is seen by the teacher
    through those inputs (its own augmentation and noise), by the student through ``inputs``.
    The copy never receives gradient: its parameters have ``requires_grad=False`` and the forward
    runs under ``torch.no_grad``.
    """

    kind = "ema"
    static = False  # the weights change every step: fit must not cache its validation outputs

    def __init__(
        self,
        student: nn.Module,
        *,
        decay: float = 0.999,
        decay_rampup: float | None = None,
        rampup_steps: int = 0,
        buffers: str = "own",
        noise: bool = True,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(student, nn.Module):
            raise TypeError(f"student must be an nn.Module, got {type(student).__name__}")
        for name, value in (("decay", decay), ("decay_rampup", decay_rampup)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 0.0 <= value <= 1.0):
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
        if isinstance(rampup_steps, bool) or not isinstance(rampup_steps, int) or rampup_steps < 0:
            raise ValueError(f"rampup_steps must be an int >= 0, got {rampup_steps!r}")
        if buffers not in BUFFER_MODES:
            raise ValueError(f"buffers must be one of {BUFFER_MODES}, got {buffers!r}")
        if not noise and buffers == "own" and any(True for _ in student.buffers()):
            raise ValueError(
                "buffers='own' with noise=False would never update the teacher's running statistics "
                "(it only runs in eval mode); use buffers='copy' or 'ema', or noise=True"
            )
        super().__init__(copy.deepcopy(student), metadata=metadata)
        self.decay = float(decay)
        self.decay_rampup = None if decay_rampup is None else float(decay_rampup)
        self.rampup_steps = rampup_steps
        self.buffers_mode = buffers
        self.noise = bool(noise)
        self.num_updates = 0
        self._pairs: tuple[int, list[Tensor], list[Tensor], list[Tensor], list[Tensor]] | None = None

    # the update count travels with state_dict(), so a saved teacher resumes its decay schedule
    def get_extra_state(self) -> dict[str, int]:
        return {"num_updates": self.num_updates}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.num_updates = int(state["num_updates"])

    def current_decay(self) -> float:
        """The cap ``α`` of the next update (``decay_rampup`` during the ramp-up, else ``decay``)."""
        in_rampup = self.decay_rampup is not None and self.num_updates < self.rampup_steps
        return self.decay_rampup if in_rampup else self.decay  # type: ignore[return-value]

    def _tensors(self, student: nn.Module) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        if self._pairs is None or self._pairs[0] != id(student):
            mine, theirs = dict(self.model.named_parameters()), dict(student.named_parameters())
            my_bufs, their_bufs = dict(self.model.named_buffers()), dict(student.named_buffers())
            if mine.keys() != theirs.keys() or my_bufs.keys() != their_bufs.keys():
                missing = sorted(set(mine).symmetric_difference(theirs) | set(my_bufs).symmetric_difference(their_bufs))
                raise ValueError(
                    f"the student passed to EMATeacher.on_step_end is not the model it copied: tensors {missing[:5]} "
                    "differ"
                )
            self._pairs = (id(student), list(mine.values()), [theirs[k] for k in mine],
                           list(my_bufs.values()), [their_bufs[k] for k in my_bufs])
        return self._pairs[1:]

    @torch.no_grad()
    def on_step_end(self, student: nn.Module) -> None:
        params, student_params, bufs, student_bufs = self._tensors(student)
        alpha = DF.ema_decay_at(self.num_updates + 1, self.current_decay())
        self.num_updates += 1
        if params:
            # θ' + (1 - α)(θ - θ') = α θ' + (1 - α) θ, for every parameter in one fused call
            torch._foreach_lerp_(params, [p.detach() for p in student_params], 1.0 - alpha)
        if self.buffers_mode == "own":
            return
        for mine, theirs in zip(bufs, student_bufs):
            if self.buffers_mode == "ema" and mine.is_floating_point():
                mine.lerp_(theirs, 1.0 - alpha)
            else:
                mine.copy_(theirs)

    def forward(self, batch: Batch) -> View:
        inputs = getattr(batch, "teacher_inputs", None)
        if inputs is not None:
            batch = replace(batch, inputs=inputs)  # keeps the mixup fields of a mixed batch
        # noise (dropout, batch statistics) only in a training step: evaluation and prepare() run
        # without gradient, and the teacher must be deterministic there
        noisy = self.noise and self.training and torch.is_grad_enabled()
        if not noisy:
            return super().forward(batch)
        # with buffers that follow the student, the training-mode forward must not move them
        saved = None if self.buffers_mode == "own" else [b.clone() for b in self.model.buffers()]
        self.model.train()
        try:
            return super().forward(batch)
        finally:
            self.model.eval()
            if saved is not None:
                with torch.no_grad():
                    for b, value in zip(self.model.buffers(), saved):
                        b.copy_(value)

    def extra_repr(self) -> str:
        return (f"decay={self.decay}, decay_rampup={self.decay_rampup}, rampup_steps={self.rampup_steps}, "
                f"buffers={self.buffers_mode!r}, noise={self.noise}, num_updates={self.num_updates}")


# ---------------------------------------------------------------------------------------- the losses


class MaskedCrossEntropy(Method):
    """Cross-entropy on the labeled samples of a mixed batch (label ``-1``: unlabeled), summed and
    divided by the whole batch size as in the reference code (:func:`~distill.functional.masked_cross_entropy`)."""

    name = "masked_ce"
    needs_teacher = False
    needs_targets = True

    def __init__(self, weight: float = 1.0, warmup_epochs: int = 0) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        assert batch.targets is not None  # needs_targets: the Distiller checked
        return DF.masked_cross_entropy(student_view["logits"], batch.targets)


class StepCountedMethod(Method):
    """A method whose weight follows the optimizer steps taken: ``steps`` counts them
    (:meth:`on_step_end`) and is saved in ``state_dict``, so a resumed run keeps its schedule."""

    def __init__(self, weight: float = 1.0, warmup_epochs: int = 0) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        self.steps = 0

    def get_extra_state(self) -> dict[str, int]:
        return {"steps": self.steps}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.steps = int(state["steps"])

    def on_step_end(self) -> None:
        self.steps += 1


class MeanTeacherConsistency(StepCountedMethod):
    """The mean teacher's consistency cost: squared error between the student's and the (detached)
    teacher's softmaxes, mean over classes and samples (:func:`~distill.functional.softmax_mse_loss`),
    on every sample, labeled or not.

    Its weight (``weight``, the paper's maximum consistency cost: 100 on CIFAR-10 and SVHN in both
    reference codes) ramps up as ``exp(-5 (1 - t / rampup_steps)^2)`` over the first ``rampup_steps``
    optimizer steps (:func:`~distill.functional.sigmoid_rampup`, per step as in the TensorFlow code;
    the PyTorch code ramps per epoch). The step count is saved in ``state_dict`` (resume keeps it).
    """

    name = "mean_teacher_consistency"

    def __init__(self, rampup_steps: int = 0, weight: float = 100.0, warmup_epochs: int = 0) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        if isinstance(rampup_steps, bool) or not isinstance(rampup_steps, int) or rampup_steps < 0:
            raise ValueError(f"rampup_steps must be an int >= 0, got {rampup_steps!r}")
        self.rampup_steps = rampup_steps

    def weight_factor(self) -> float:
        return super().weight_factor() * DF.sigmoid_rampup(self.steps, self.rampup_steps)

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        return DF.softmax_mse_loss(student_view["logits"], teacher_view["logits"].detach())

    def extra_repr(self) -> str:
        return f"weight={self.weight}, rampup_steps={self.rampup_steps}, steps={self.steps}"


# ---------------------------------------------------------------------------------------- the data


@dataclass
class TwoViewBatch(Batch):
    """A batch with a second view of the same samples for the teacher (``teacher_inputs``, same shape
    as ``inputs``); ``targets`` uses ``-1`` for unlabeled samples."""

    teacher_inputs: Tensor | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TwoViewBatch:
        moved = super().to(device, non_blocking=non_blocking)
        t = self.teacher_inputs
        return replace(moved, teacher_inputs=None if t is None else t.to(device, non_blocking=non_blocking))


class MeanTeacherLoader(GlobalBatchShards):
    """Mixed labeled + unlabeled batches, with independent perturbations for the student and the teacher.

    Without ``unlabeled``, an epoch is one pass over ``labeled`` (whose batches may already mark
    unlabeled samples with label ``-1``, or have no labels at all). With it, an epoch is one pass over
    ``unlabeled`` and each of its batches is joined to the next batch of ``labeled``, which is cycled
    (the reference code's two-stream sampler: the unlabeled set defines the epoch); the joined batch
    holds the labeled samples first, and the unlabeled loader's labels, if any, are ignored (``-1``).

    Views: from the loaders' inputs ``x``, the student sees ``augment(x) + σ ε`` and the teacher
    ``augment'(x) + σ ε'`` with independent random draws (the paper's η and η'; ``σ`` =
    ``input_noise``). Give the loaders *without* their own augmentation and pass it here, so that the
    two views are augmented independently. The draws of batch ``k`` of epoch ``e`` are a pure function
    of ``(seed, e, k)``.

    ``targets`` (read by ``distill.fit`` to check the labels once) holds the labeled loader's known
    labels; batches carry no sample index (per-sample state would mix the two data sets' indices).

    Under torchrun (``set_shard``, called by ``fit``) every rank builds the same joined batch and
    yields its part of it (:class:`~distill.data.loader.GlobalBatchShards`): the ranks' batches of a
    step make up the single-process batch, views included.
    """

    def __init__(
        self,
        labeled: Iterable[Any],
        unlabeled: Iterable[Any] | None = None,
        *,
        augment: Callable[[Tensor, torch.Generator], Tensor] | None = None,
        input_noise: float = 0.0,
        seed: int = 0,
    ) -> None:
        if augment is not None and not callable(augment):
            raise TypeError(f"augment must be an Augment or a callable (x, generator) -> x, got {type(augment).__name__}")
        if isinstance(input_noise, bool) or not isinstance(input_noise, (int, float)) or not (
                math.isfinite(input_noise) and input_noise >= 0):
            raise ValueError(f"input_noise must be a finite number >= 0, got {input_noise!r}")
        for name, loader in (("labeled", labeled), ("unlabeled", unlabeled)):
            if loader is not None and not hasattr(loader, "__len__"):
                raise TypeError(f"the {name} loader must have a length (len(loader) batches per epoch)")
        if unlabeled is not None and len(labeled) == 0:  # type: ignore[arg-type]
            raise ValueError("the labeled loader yields no batch")
        self.labeled = labeled
        self.unlabeled = unlabeled
        self.augment = augment
        self.input_noise = float(input_noise)
        self.seed = int(seed)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.unlabeled if self.unlabeled is not None else self.labeled)  # type: ignore[arg-type]

    @property
    def targets(self) -> Tensor:
        known = getattr(self.labeled, "targets", None)
        if isinstance(known, Tensor):
            return known[known != -1]
        return torch.empty(0, dtype=torch.long)

    def set_epoch(self, epoch: int) -> None:
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"set_epoch expects an int >= 0, got {epoch!r}")
        self.epoch = epoch

    def _perturb(self, x: Tensor, generator: torch.Generator) -> Tensor:
        if self.augment is not None:
            x = self.augment(x, generator)
        if self.input_noise > 0:
            if not x.is_floating_point():
                raise TypeError(f"input_noise needs floating-point inputs, got {x.dtype}")
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
            x = x + self.input_noise * noise.to(x.device)
        return x

    def _views(self, inputs: Tensor, targets: Tensor | None, k: int) -> TwoViewBatch:
        if targets is None:
            targets = torch.full((inputs.shape[0],), -1, dtype=torch.long, device=inputs.device)
        if self.augment is None and self.input_noise == 0:
            return TwoViewBatch(inputs, targets)
        g_student = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, 2, k))
        g_teacher = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, 3, k))
        return TwoViewBatch(self._perturb(inputs, g_student), targets,
                            teacher_inputs=self._perturb(inputs, g_teacher))

    def _labeled_passes(self) -> Iterator[Batch]:
        """The labeled batches, cycled; pass ``i`` of epoch ``e`` is the labeled loader's epoch
        ``e * passes_per_epoch + i`` (a pure function of the epoch, so a resumed run sees the same)."""
        per_epoch = math.ceil(len(self) / len(self.labeled))  # type: ignore[arg-type]
        n = self.epoch * per_epoch
        while True:
            if hasattr(self.labeled, "set_epoch"):
                self.labeled.set_epoch(n)
            yielded = False
            for raw in self.labeled:
                yielded = True
                yield as_batch(raw)
            if not yielded:
                raise ValueError("the labeled loader yielded no batch")
            n += 1

    def __iter__(self) -> Iterator[TwoViewBatch]:
        if self.unlabeled is None:
            if hasattr(self.labeled, "set_epoch"):
                self.labeled.set_epoch(self.epoch)
            for k, raw in enumerate(self.labeled):
                b = as_batch(raw)
                yield self._shard(self._views(b.inputs, b.targets, k))
            return
        if hasattr(self.unlabeled, "set_epoch"):
            self.unlabeled.set_epoch(self.epoch)
        labeled = self._labeled_passes()
        for k, raw in enumerate(self.unlabeled):
            u, lab = as_batch(raw), next(labeled)
            x = torch.cat([lab.inputs, u.inputs.to(lab.inputs.device)])
            y_lab = lab.targets if lab.targets is not None else \
                torch.full((lab.inputs.shape[0],), -1, dtype=torch.long, device=x.device)
            y = torch.cat([y_lab.long(), torch.full((u.inputs.shape[0],), -1, dtype=torch.long, device=x.device)])
            yield self._shard(self._views(x, y, k))

    def __repr__(self) -> str:
        return (f"MeanTeacherLoader(batches={len(self)}, unlabeled={self.unlabeled is not None}, "
                f"augment={self.augment!r}, input_noise={self.input_noise}, seed={self.seed}, epoch={self.epoch})")


# ---------------------------------------------------------------------------------------- the strategy


@dataclass
class MeanTeacherResult(FitResult):
    """The student's :class:`~distill.train.loop.FitResult` plus the EMA model and its accuracies
    (``val_teacher_acc`` of each epoch: the paper reports the EMA model)."""

    ema_model: nn.Module | None = None
    ema_last_acc: float | None = None
    ema_best_acc: float | None = None
    ema_best_epoch: int | None = None


def _check_number(name: str, value: Any, low: float, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < low or (high is not None and value > high):
        span = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be a number in {span}, got {value!r}")
    return float(value)


@register_strategy("mean_teacher", "self", PAPER)
def mean_teacher(
    student: ModelSpec,
    train_loader: Iterable[Any],
    val_loader: Iterable[Any] | None = None,
    *,
    epochs: int,
    unlabeled_loader: Iterable[Any] | None = None,
    run_dir: str | None = None,
    seed: int = 0,
    progress: bool = True,
    consistency: float = 100.0,
    consistency_rampup: float = 5.0,
    ema_decay: float = 0.999,
    ema_decay_rampup: float | None = 0.99,
    input_noise: float = 0.15,
    augment: Callable[[Tensor, torch.Generator], Tensor] | None = None,
    teacher_noise: bool = True,
    buffers: str = "own",
    **fit_kwargs: Any,
) -> MeanTeacherResult:
    """Mean teacher: train a student with an EMA copy of itself as teacher, on labeled and unlabeled data.

    The student minimises ``CE(labeled) / B + w(t) · consistency`` where the consistency is the
    squared error between its softmax and the EMA teacher's (mean over classes and samples, every
    sample), ``w(t) = consistency · exp(-5 (1 - t / R)^2)`` for the first ``R`` steps; after every
    optimizer step the teacher's weights move towards the student's (:class:`EMATeacher`).

    Args:
        student: the model (or a zero-argument factory, a zoo name or a zoo spec; see
            :data:`~distill.strategies.chain.ModelSpec`).
        train_loader: labeled batches (labels ``-1`` or ``None`` mark unlabeled samples).
        val_loader: evaluated after each epoch, for the student and the EMA model (the teacher).
        epochs: epochs; with ``unlabeled_loader`` an epoch is one pass over it.
        unlabeled_loader: unlabeled batches joined to each labeled batch (:class:`MeanTeacherLoader`).
        consistency: the maximum consistency weight (100: the paper's CIFAR-10/SVHN value, both codes).
        consistency_rampup: ramp-up length in epochs (5: the reference PyTorch CIFAR-10 run; the
            TensorFlow ConvNet runs ramp over 40000 of 150000 steps), turned into optimizer steps.
        ema_decay: ``α`` after the ramp-up (0.999, the paper's and both codes' default).
        ema_decay_rampup: ``α`` during the ramp-up (0.99, the paper's and the TensorFlow code's);
            ``None`` keeps ``ema_decay`` throughout (the PyTorch code).
        input_noise: standard deviation of the Gaussian noise added to each view's inputs (0.15: the
            TensorFlow ConvNet's, on per-image normalised inputs; 0 for token inputs).
        augment: an :class:`~distill.data.augment.Augment` (or ``callable(x, generator)``) drawn
            independently for the two views; give the loaders without their own augmentation.
        teacher_noise: the teacher runs its forward in training mode during training steps
            (dropout and batch statistics, as in both codes), see :class:`EMATeacher`.
        buffers: the teacher's BatchNorm statistics: ``"own"`` (the PyTorch code's), ``"copy"``, ``"ema"``.
        run_dir, seed, progress, **fit_kwargs: passed to :func:`distill.fit` (optimizer, lr, schedule...).
            ``resume=True`` continues from ``run_dir``'s last checkpoint, EMA teacher included (``fit``
            saves a changing teacher source with the student).

    Returns:
        a :class:`MeanTeacherResult`: the student's fit result, the EMA model and its accuracies.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    consistency = _check_number("consistency", consistency, 0.0)
    rampup = _check_number("consistency_rampup", consistency_rampup, 0.0)
    _check_number("ema_decay", ema_decay, 0.0, 1.0)
    if ema_decay_rampup is not None:
        _check_number("ema_decay_rampup", ema_decay_rampup, 0.0, 1.0)
    if buffers not in BUFFER_MODES:
        raise ValueError(f"buffers must be one of {BUFFER_MODES}, got {buffers!r}")
    check_model_spec(student, "student")
    loader = MeanTeacherLoader(train_loader, unlabeled_loader, augment=augment, input_noise=input_noise, seed=seed)
    model = build_model(student, "student")
    rampup_steps = round(rampup * len(loader))
    teacher = EMATeacher(model, decay=ema_decay, decay_rampup=ema_decay_rampup, rampup_steps=rampup_steps,
                         buffers=buffers, noise=teacher_noise)
    distiller = Distiller(model, teacher, losses={
        "ce": MaskedCrossEntropy(),
        "consistency": MeanTeacherConsistency(rampup_steps=rampup_steps, weight=consistency),
    })
    result = fit(distiller, loader, val_loader, epochs=epochs, run_dir=run_dir, seed=seed, progress=progress,
                 **fit_kwargs)
    accs = [(row["epoch"], row["val_teacher_acc"]) for row in result.history if "val_teacher_acc" in row]
    best = max(accs, key=lambda ea: ea[1], default=None)  # the first epoch reaching the best, as fit does
    return MeanTeacherResult(
        history=result.history, best_acc=result.best_acc, best_epoch=result.best_epoch, last_acc=result.last_acc,
        run_dir=result.run_dir, ema_model=teacher.model, ema_last_acc=accs[-1][1] if accs else None,
        ema_best_acc=best[1] if best else None, ema_best_epoch=best[0] if best else None,
    )
