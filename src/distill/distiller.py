"""The Distiller: student, teacher source, taps and weighted methods in one ``nn.Module``."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from distill.batch import Batch, View, as_batch
from distill.methods.base import Method, check_weight, create_method
from distill.taps import Taps, last_hidden_state, lm_body_and_head, logits_of, run_tapped
from distill.teachers import TeacherSource, as_teacher_source


@dataclass
class DistillOutput:
    """What one Distiller step returns.

    Attributes:
        total: the weighted sum of the losses, a scalar with gradient.
        parts: each loss name → its weighted value, detached (``float(out.parts["kd"])`` to log;
            kept as tensors so a GPU loop need not synchronise every step).
        student: the student's view: ``"logits"`` ``(B, K)`` and its taps.
        teacher: the teacher's view, or ``None`` when no method needed the teacher.
    """

    total: Tensor
    parts: dict[str, Tensor]
    student: View
    teacher: View | None


LossSpec = float | int | Mapping[str, Any] | Method | tuple[float, Method]


def _build_methods(losses: Mapping[str, LossSpec]) -> dict[str, Method]:
    methods: dict[str, Method] = {}
    for name, spec in losses.items():
        if isinstance(spec, Method):
            methods[name] = spec
        elif isinstance(spec, (int, float)) and not isinstance(spec, bool):
            methods[name] = create_method(name, weight=float(spec))
        elif isinstance(spec, Mapping):  # keyword arguments, as a recipe's losses section says them
            methods[name] = create_method(name, **spec)
        elif (isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], (int, float))
              and isinstance(spec[1], Method)):
            check_weight(spec[0], name)
            spec[1].weight = float(spec[0])
            methods[name] = spec[1]
        else:
            raise TypeError(
                f"loss {name!r}: expected a weight (float), keyword arguments (dict), a Method, or (weight, Method); "
                f"got {spec!r}"
            )
    return methods


class Distiller(nn.Module):
    """Student + teacher source + weighted distillation methods.

    Args:
        student: the model being trained; its output holds logits ``(B, K)``.
        teacher: an ``nn.Module`` (frozen automatically), a list of modules (an ensemble),
            a :class:`~distill.teachers.TeacherSource`, or ``None`` (teacher-free losses only).
        losses: name → weight (a registered method built with its paper defaults), name →
            ``Method`` instance (its ``weight`` attribute applies), name → ``(weight, Method)``, or
            name → keyword arguments (``{"kd": {"T": 2.0, "weight": 0.9}}``, as in a recipe).
            Default: ``{"ce": 1.0, "kd": 1.0}`` with a teacher, ``{"ce": 1.0}`` without.

    Use it in your own loop (``out = d(batch); out.total.backward()``) or with
    :func:`distill.fit`. Call :meth:`prepare` on one example batch before building the
    optimizer when a method has shape-dependent parts (adapters); ``fit`` does this for you.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | list[nn.Module] | TeacherSource | None = None,
        losses: Mapping[str, LossSpec] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(student, nn.Module):
            raise TypeError(f"student must be an nn.Module, got {type(student).__name__}")
        self.student = student
        self.teacher = as_teacher_source(teacher)
        if losses is None:
            losses = {"ce": 1.0, "kd": 1.0} if self.teacher is not None else {"ce": 1.0}
        if not losses:
            raise ValueError("losses is empty: give at least one loss, e.g. {'ce': 1.0, 'kd': 1.0}")
        self.methods = nn.ModuleDict(_build_methods(losses))
        # fused token losses apply the student's lm_head themselves, chunk by chunk: the student's
        # body runs alone and its view holds the last hidden states instead of the logits
        fused = [n for n, m in self.methods.items() if getattr(m, "student_output", "logits") == "hidden"]
        self._lm_parts: tuple[nn.Module, nn.Linear] | None = None  # a tuple: not registered twice as submodules
        if fused:
            others = [n for n in self.methods if n not in fused]
            if others:
                raise ValueError(
                    f"losses {fused} are fused with the student's lm_head (chunk_size is set), so the student runs "
                    f"without its head and no logits exist for the losses {others}: drop them, fold cross-entropy "
                    f"into the fused loss (ce=<weight>), or leave chunk_size unset"
                )
            self._lm_parts = lm_body_and_head(student)
        needing = [n for n, m in self.methods.items() if m.needs_teacher]
        if needing and self.teacher is None:
            raise ValueError(f"losses {needing} need a teacher, but teacher is None")
        student_paths = sorted({p for m in self.methods.values() for p in m.student_taps})
        teacher_paths = sorted({p for m in self.methods.values() if m.needs_teacher for p in m.teacher_taps})
        self._student_taps = Taps(student, student_paths, model_name="student") if student_paths else None
        self._teacher_paths = teacher_paths
        if self.teacher is not None:
            self.teacher.require_taps(teacher_paths)
        self._needs_teacher = bool(needing)
        # skip the per-step Python calls when no part overrides the hooks (most runs)
        self._has_step_hooks = any(type(m).on_step_end is not Method.on_step_end for m in self.methods.values()) \
            or (self.teacher is not None and type(self.teacher).on_step_end is not TeacherSource.on_step_end)
        self.prepared = False
        self.num_classes: int | None = None  # the student's output size, known after prepare()
        self.epoch: int | None = None
        self._warned_warmup = False

    # ----------------------------------------------------------------- set-up
    def prepare(self, example: Any) -> Distiller:
        """Build every method's shape-dependent parts from one example batch.

        Runs the student (in eval mode, so BatchNorm statistics are untouched) and the teacher
        once under ``no_grad``. Idempotent. Call it before creating the optimizer.
        """
        if self.prepared and self.num_classes is not None:
            return self
        device = next(self.student.parameters(), torch.empty(0)).device
        batch = as_batch(example).to(device)
        modes = {m: m.training for m in self.student.modules()}  # restore per module: a user may freeze BN
        self.student.eval()
        try:
            with torch.no_grad():
                student_view = self._student_view(batch)
                self.num_classes = self._student_width(student_view)
                if not self.prepared:
                    teacher_module = self.teacher_module()
                    for m in self.methods.values():
                        m.bind_models(self.student, teacher_module, batch)
                    teacher_view = self.teacher(batch) if self._needs_teacher and self.teacher is not None else {}
                    self._check_widths(student_view, teacher_view)
                    for m in self.methods.values():
                        m.prepare(student_view, teacher_view, batch)
        finally:
            for m, mode in modes.items():
                m.training = mode
        self.methods.to(device)  # adapters are created on the CPU: follow the student
        self.prepared = True
        return self

    def _check_widths(self, student_view: View, teacher_view: View) -> None:
        """The student's and the teacher's logits have one entry per class each, the same classes,
        when a loss compares them class by class (raised here, before any training)."""
        readers = [n for n, m in self.methods.items() if reads_teacher_logits(m)]
        t = teacher_view.get("logits")
        if not readers or not isinstance(t, Tensor) or t.dim() < 1 or self.num_classes is None:
            return
        if t.shape[-1] != self.num_classes:
            what = "vocabulary entries" if t.dim() == 3 else "classes"
            raise ValueError(
                f"the student's logits have {self.num_classes} {what} but the teacher's have {t.shape[-1]}, and the "
                f"losses {readers} compare them entry by entry: build both for the same "
                + ("vocabulary (one tokenizer: distill.integrations.hf.check_same_vocabulary names the first "
                   "difference)" if t.dim() == 3 else
                   f"classes (num_classes={t.shape[-1]} for the student, or a teacher for {self.num_classes} classes)")
            )

    def _student_width(self, student_view: View) -> int:
        if self._lm_parts is not None:
            return int(self._lm_parts[1].out_features)
        logits = student_view["logits"]
        # a dense map (B, K, H, W) holds its classes on axis 1; (B, K), (B, T, K) and (B, N, K) on the last
        return int(logits.shape[1] if logits.dim() == 4 else logits.shape[-1])

    def teacher_module(self) -> nn.Module | None:
        """The teacher's ``nn.Module`` when the teacher source wraps exactly one, else ``None``."""
        model = getattr(self.teacher, "model", None)
        return model if isinstance(model, nn.Module) else None

    def predictor(self) -> nn.Module:
        """The model to evaluate and deploy: the student, unless a method predicts another way
        (SimKD: student trunk → projector → the teacher's classifier); ``fit`` evaluates this."""
        for m in self.methods.values():
            model = m.predictor(self.student)
            if model is not None:
                return model
        return self.student

    def set_epoch(self, epoch: int, total_epochs: int | None = None) -> None:
        """Tell methods (warm-up, curricula) and the teacher source which epoch starts (0-based)."""
        self.epoch = epoch
        for m in self.methods.values():
            m.on_epoch_start(epoch, total_epochs)
        if self.teacher is not None:
            self.teacher.on_epoch_start(epoch)

    def bind_data(self, num_samples: int, targets: Tensor | None = None) -> None:
        """Tell every method the training set's size and labels (CRD's memory banks); ``fit`` calls it."""
        for m in self.methods.values():
            m.bind_data(num_samples, targets)

    def step_end(self) -> None:
        """Call after each ``optimizer.step()`` in your own loop (``fit`` does): lets stateful
        teacher sources (EMA) and methods (memory banks) update from the new weights."""
        if self._has_step_hooks:
            for m in self.methods.values():
                m.on_step_end()
            if self.teacher is not None:
                self.teacher.on_step_end(self.student)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The student's and the methods' parameters: what the optimizer should see."""
        seen: set[int] = set()
        for module in (self.student, self.methods):
            for p in module.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    yield p

    def trainable_state_dict(self) -> dict[str, Any]:
        """State of the student and the methods (adapters, memory banks), without the frozen teacher."""
        return {"student": self.student.state_dict(), "methods": self.methods.state_dict()}

    def load_trainable_state_dict(self, state: Mapping[str, Any]) -> None:
        self.student.load_state_dict(state["student"])
        self.methods.load_state_dict(state["methods"])

    def attach(self) -> None:
        """(Re)install this Distiller's teacher taps, e.g. after another Distiller shared the teacher."""
        if self.teacher is not None:
            self.teacher.require_taps(self._teacher_paths)

    def detach_taps(self) -> None:
        """Remove the student's tap hooks (the model runs hook-free afterwards)."""
        if self._student_taps is not None:
            self._student_taps.remove()
            self._student_taps = None

    # ----------------------------------------------------------------- step
    def _student_view(self, batch: Batch) -> View:
        if self._lm_parts is not None:
            output, store = run_tapped(self._lm_parts[0], batch, self._student_taps)
            return {"hidden": last_hidden_state(output), **store}
        output, store = run_tapped(self.student, batch, self._student_taps)
        return {"logits": logits_of(output), **store}

    def forward(self, batch: Any) -> DistillOutput:
        """One step's losses: the student's forward, the teacher's view, every weighted method."""
        batch = as_batch(batch)
        if not self.prepared:
            if any(_has_lazy_parts(m) for m in self.methods.values()):
                raise RuntimeError(
                    "call distiller.prepare(example_batch) before training: methods "
                    f"{[n for n, m in self.methods.items() if _has_lazy_parts(m)]} build adapters from the shapes "
                    "of one batch, and the optimizer must see their parameters"
                )
            with torch.no_grad():  # methods still see the models once (the LM losses find the student's head)
                teacher_module = self.teacher_module()
                for m in self.methods.values():
                    m.bind_models(self.student, teacher_module, batch)
            self.prepared = True
        # the teacher first: its activations are freed before the student's forward starts keeping
        # its own for backward, so the two never share the cache (measured: ~3-5% per step on CPU)
        teacher_view = self.teacher(batch) if self._needs_teacher and self.teacher is not None else None
        student_view = self._student_view(batch)
        total: Tensor | None = None
        parts: dict[str, Tensor] = {}
        for name, method in self.methods.items():
            if method.needs_targets and batch.targets is None:
                raise ValueError(f"loss {name!r} needs targets, but the batch has none")
            factor = method.weight * self._warmup_factor(method)
            if factor == 0.0:  # a loss switched off (e.g. an initialisation-only method after its stage)
                continue
            loss = method(student_view, teacher_view or {}, batch)
            if factor != 1.0:  # skip a kernel (and its backward) per loss when there is nothing to scale
                loss = loss * factor
            parts[name] = loss.detach()
            total = loss if total is None else total + loss
        if total is None:
            raise ValueError("every loss has weight 0: nothing to train")
        return DistillOutput(total, parts, student_view, teacher_view)

    def _warmup_factor(self, method: Method) -> float:
        if method.warmup_epochs > 0 and self.epoch is None and not self._warned_warmup:
            warnings.warn(
                f"method {method.name!r} has a {method.warmup_epochs}-epoch weight warm-up, but "
                "Distiller.set_epoch() was never called: the warm-up is skipped. Call "
                "distiller.set_epoch(epoch) at each epoch start (distill.fit does).",
                stacklevel=3,
            )
            self._warned_warmup = True
        return method.weight_factor()


# families whose losses compare the student's and the teacher's logits class by class
LOGIT_FAMILIES = ("logits", "condensation", "online")


def reads_teacher_logits(method: Method) -> bool:
    """Whether ``method`` compares the student's logits with the teacher's class by class (then both
    need the same number of classes): a teacher-reading method of a logit family, or one whose class
    sets ``reads_teacher_logits = True``."""
    flag = getattr(method, "reads_teacher_logits", None)
    if isinstance(flag, bool):
        return flag and method.needs_teacher
    return method.needs_teacher and method.family in LOGIT_FAMILIES


def _has_lazy_parts(method: Method) -> bool:
    return bool(getattr(method, "requires_prepare", False))
