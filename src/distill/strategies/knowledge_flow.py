"""Knowledge flow: several frozen teachers flow into one student that ends up without them.

:class:`KnowledgeFlowNet` wraps the student: at each chosen student layer j a forward hook
replaces the layer's output :math:`\\hat h_j` by

.. math:: h_j = p_{j,0}\\,\\hat h_j + \\textstyle\\sum_{i=1}^{N} p_{j,i}\\, Q_{j,i}\\big(h^{(i)}_j\\big)

(:func:`~distill.functional.flow_mix`): :math:`h^{(i)}_j` the output of teacher i's matching layer
(tapped; the teachers are frozen and run first), :math:`Q_{j,i}` a trainable 1x1 convolution (a
linear map for vectors) to the student layer's shape, and :math:`p_{j,\\cdot}` = softmax of
trainable logits (:func:`~distill.functional.flow_weights`). One :func:`distill.fit` trains the
student, the transformations and the weights with

.. math:: L = \\mathrm{CE}\\big(\\pi(x; \\Omega), y\\big)
    + \\lambda_1\\,\\mathrm{KL}\\big(\\pi(x; \\Omega_{old}) \\,\\|\\, \\pi(x; \\Omega)\\big)
    + \\lambda_2(e)\\, \\textstyle\\sum_j \\sum_{i \\ge 1} p_{j,i}

(``"ce"``, :class:`FlowKL`, :class:`FlowDependency`): π the teacher-informed student's output,
:math:`\\Omega_{old}` all trainable parameters one step earlier, :math:`\\lambda_2(e)` growing over
training (:func:`~distill.functional.flow_dependency_factor`) so that the teachers' weights go to
zero. At the end the hooks are removed and the student runs alone.

Paper: I.-J. Liu, J. Peng, A. G. Schwing, "Knowledge Flow: Improve Upon Your Teachers", ICLR 2019,
arXiv 1904.05878. Sources: the abstract and introduction (arXiv mirrors, the ICLR text) and a
review's summary of the method (teachers' intermediate representations, transformed by trainable
matrices and scaled by normalised weights, added to the student's layers; a dependency loss and a
KL regulariser that make the student independent of the teachers as training goes on) could be
read here; the method section with its equations and settings could not, and no code by the
authors was found (their public repositories hold other projects). The symbols λ1 (KL) and λ2
(dependency) are this module's names, not necessarily the paper's numbering; their defaults,
the softmax parametrisation of the weights, the uniform initial weights and the linear λ2 ramp
are this library's choices.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from distill import functional as DF
from distill.adapters import build_adapter
from distill.batch import Batch, View, as_batch
from distill.distiller import Distiller
from distill.methods._views import tap
from distill.methods.base import Method, Paper
from distill.strategies.chain import (
    ModelSpec,
    _check_epochs,
    _check_weight,
    build_model,
    check_model_spec,
)
from distill.strategies.registry import register_strategy
from distill.strategies.student_alone import fit_evaluating_student_alone
from distill.taps import TapError, logits_of, record_in_eval, resolve
from distill.teachers import FrozenTeacher
from distill.train.loop import FitResult

__all__ = ["FlowDependency", "FlowKL", "KnowledgeFlowNet", "KnowledgeFlowResult", "fit_knowledge_flow"]

PAPER = Paper("Knowledge Flow: Improve Upon Your Teachers", "I.-J. Liu, J. Peng, A. G. Schwing", 2019,
              "1904.05878", "ICLR")


class _FlowHook:
    """A forward hook that replaces student layer ``j``'s output by its knowledge-flow mix while
    the owning :class:`KnowledgeFlowNet` runs; a no-op otherwise (the student called directly runs
    alone). A callable object, not a closure, so a deep copy of the net hooks the copy."""

    def __init__(self, net: KnowledgeFlowNet, layer: int) -> None:
        self.net, self.layer = net, layer

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> Tensor | None:
        features = self.net._current
        if features is None:
            return None
        if not isinstance(output, Tensor):
            raise TypeError(f"knowledge flow replaces the output of student layer {self.net.layers[self.layer]!r}, "
                            f"which must be a tensor, got {type(output).__name__}")
        return self.net.mix(self.layer, output, features[self.layer])


class KnowledgeFlowNet(nn.Module):
    """A student with teachers' features flowing into chosen layers (see the module docstring).

    Args:
        student: the student model.
        teachers: the trained teachers (frozen here: eval mode, no gradient).
        layers: module paths of the student layers whose outputs receive teacher features.
        teacher_layers: for each teacher, one module path per student layer (the teacher output
            transformed into that layer).
        example: an example input batch (B, ...), to build the transformations from the shapes.

    ``forward(x)`` runs the teachers, then the student with the mixing hooks, and returns the
    student's output. Calling ``student`` directly runs it alone. The weights' logits start at 0
    (every source weighted 1 / (N + 1)).
    """

    def __init__(self, student: nn.Module, teachers: Sequence[nn.Module], layers: Sequence[str],
                 teacher_layers: Sequence[Sequence[str]], example: Tensor) -> None:
        super().__init__()
        if not teachers:
            raise ValueError("knowledge flow needs at least one teacher")
        if isinstance(layers, str) or not layers:
            raise ValueError(f"layers must be a non-empty list of student module paths, got {layers!r}")
        self.layers = [str(p) for p in layers]
        if any(":" in p for p in self.layers):
            raise ValueError(f"knowledge flow replaces module outputs: student layers cannot be ':input' taps, "
                             f"got {self.layers}")
        if len(teacher_layers) != len(teachers) or any(len(t) != len(self.layers) for t in teacher_layers):
            raise ValueError(f"teacher_layers needs one list of {len(self.layers)} paths (one per student layer) per "
                             f"teacher ({len(teachers)}), got {teacher_layers!r}")
        self.student = student
        self.teacher_layers = [[str(p) for p in paths] for paths in teacher_layers]
        # on the example's device for the shape probes below (fit then moves the whole net to its device)
        self.teachers = nn.ModuleList(FrozenTeacher(t) for t in teachers).to(example.device)
        for source, paths in zip(self.teachers, self.teacher_layers):
            source.require_taps(paths)
        self.modules_at = [resolve(student, p, model_name="student") for p in self.layers]
        own = self._own_outputs(example)
        feats = self.teacher_features(example)
        self.transforms = nn.ModuleList(
            nn.ModuleList(build_adapter(t, s, student_name=f"teacher {i} {self.teacher_layers[i][j]!r}",
                                        teacher_name=f"student {self.layers[j]!r}", kind="conv1x1").to(s.device)
                          for i, t in enumerate(feats[j]))
            for j, s in enumerate(own))
        self.weight_logits = nn.ParameterList(
            nn.Parameter(torch.zeros(len(teachers) + 1, device=example.device)) for _ in self.layers)
        self._current: list[list[Tensor]] | None = None
        self.last_teacher_features: list[list[Tensor]] | None = None
        self._handles: list[Any] = []
        self.attach()

    def _own_outputs(self, example: Tensor) -> list[Tensor]:
        store = record_in_eval(self.student, self.layers, example, model_name="student")
        return [store[p] for p in self.layers]

    def attach(self) -> None:
        """Install the mixing hooks (done at construction; again after :meth:`detach`)."""
        if not self._handles:
            self._handles = [m.register_forward_hook(_FlowHook(self, j)) for j, m in enumerate(self.modules_at)]

    def detach(self) -> nn.Module:
        """Remove the mixing hooks and return the student, which then runs without its teachers."""
        for h in self._handles:
            h.remove()
        self._handles = []
        return self.student

    @torch.no_grad()
    def teacher_features(self, x: Tensor) -> list[list[Tensor]]:
        """The teachers' tapped outputs, grouped by student layer: ``[layer][teacher]``."""
        batch = Batch(x)
        views = [source(batch) for source in self.teachers]
        return [[views[i][paths[j]] for i, paths in enumerate(self.teacher_layers)] for j in range(len(self.layers))]

    def weights(self) -> Tensor:
        """The normalised weights, one row per student layer: (L, N + 1), column 0 the student."""
        return torch.stack([DF.flow_weights(w) for w in self.weight_logits])

    def mix(self, layer: int, own: Tensor, teacher_features: Sequence[Tensor]) -> Tensor:
        """Layer ``layer``'s output under knowledge flow (:func:`~distill.functional.flow_mix`)."""
        transformed = [q(t) for q, t in zip(self.transforms[layer], teacher_features)]  # type: ignore[arg-type]
        return DF.flow_mix(own, transformed, DF.flow_weights(self.weight_logits[layer]))

    def forward(self, x: Tensor, teacher_features: list[list[Tensor]] | None = None) -> Any:
        """The student's output with the teachers flowing in; ``teacher_features`` (from
        :meth:`teacher_features`) skips running the teachers again."""
        if not self._handles:
            raise RuntimeError("the mixing hooks were removed (detach()); call attach() first, or run the student")
        features = self.teacher_features(x) if teacher_features is None else teacher_features
        self._current = features
        try:
            out = self.student(x)
        finally:
            self._current = None
        self.last_teacher_features = features
        return out

    def trained_tensors(self) -> list[Tensor]:
        """Every parameter and buffer this net trains (student, transformations, weights), teachers excluded."""
        parts = [self.student, self.transforms, self.weight_logits]
        return [t for m in parts for t in (*m.parameters(), *m.buffers())]

    def twin(self) -> KnowledgeFlowNet:
        """A copy sharing the (frozen) teachers, with its own student, transformations and weights."""
        self.detach()
        saved, self.last_teacher_features = self.last_teacher_features, None
        try:
            twin = copy.deepcopy(self, {id(self.teachers): self.teachers})
        finally:
            self.attach()
            self.last_teacher_features = saved
        twin.attach()
        for p in twin.parameters():
            p.requires_grad_(False)
        return twin


def _net(student: nn.Module, who: str) -> KnowledgeFlowNet:
    if not isinstance(student, KnowledgeFlowNet):
        raise TypeError(f"{who} reads the knowledge-flow weights: the Distiller's student must be a "
                        f"KnowledgeFlowNet, got {type(student).__name__}")
    return student


class FlowKL(Method):
    """Knowledge flow's KL term: :math:`\\mathrm{KL}(\\pi(x; \\Omega_{old}) \\,\\|\\, \\pi(x; \\Omega))`,
    batch mean, T = 1 (:func:`~distill.functional.kd_loss` at T = 1).

    :math:`\\Omega_{old}` are the student's, transformations' and weights' values one training step
    earlier, kept in a copy of the net (:meth:`KnowledgeFlowNet.twin`) that runs on the same batch
    with the same teacher features: the student's prediction is kept from changing abruptly while
    the teachers' weights shrink. 0 on the first step. The Distiller's student must be a
    :class:`KnowledgeFlowNet`.
    """

    needs_teacher = False

    def __init__(self, weight: float = 1.0, warmup_epochs: int = 0) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        self._nets: tuple[KnowledgeFlowNet, KnowledgeFlowNet] | tuple[()] = ()  # (live, old), out of the module tree
        self._synced = False

    def bind_models(self, student: nn.Module, teacher: nn.Module | None, example: Batch) -> None:
        net = _net(student, "FlowKL")
        self._nets = (net, net.twin())
        self._synced = False

    @torch.no_grad()
    def _sync(self) -> None:
        net, old = self._nets  # type: ignore[misc]
        for a, b in zip(old.trained_tensors(), net.trained_tensors()):
            a.copy_(b)
        self._synced = True

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        if not self._nets:
            raise RuntimeError("FlowKL needs Distiller.prepare(example) first (it copies the KnowledgeFlowNet)")
        net, old = self._nets
        logits = tap(student_view, "logits", "student")
        if old.weight_logits[0].device != logits.device:
            old.to(logits.device)
        if not self._synced:  # first step, or after a resume: the copy starts from the current values
            self._sync()
        with torch.no_grad():
            old.train(net.training)
            old_logits = logits_of(old(batch.inputs, teacher_features=net.last_teacher_features))
        loss = DF.kd_loss(logits, old_logits, 1.0)
        if self.training:
            self._sync()  # this step's values become the next step's Ω_old
        return loss


class FlowDependency(Method):
    """Knowledge flow's dependency loss :math:`\\sum_j \\sum_{i \\ge 1} p_{j,i}`
    (:func:`~distill.functional.flow_dependency_loss`), its weight λ2 growing over training:
    ``weight · flow_dependency_factor(epoch, total_epochs, start)``.

    ``log_values`` reports ``teacher_weight`` (the teachers' total normalised weight, averaged over
    layers) and ``factor``. The Distiller's student must be a :class:`KnowledgeFlowNet`.
    """

    needs_teacher = False

    def __init__(self, weight: float = 1.0, start: float = 0.0, warmup_epochs: int = 0) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        DF.flow_dependency_factor(0, 1, start)  # validates start
        self.start = float(start)
        self._net_ref: tuple[KnowledgeFlowNet, ...] = ()

    def bind_models(self, student: nn.Module, teacher: nn.Module | None, example: Batch) -> None:
        self._net_ref = (_net(student, "FlowDependency"),)

    def factor(self) -> float:
        """λ2's growth factor at the current epoch (1 when the epoch is unknown)."""
        if self.epoch is None or self.total_epochs is None:
            return 1.0
        return DF.flow_dependency_factor(self.epoch, self.total_epochs, self.start)

    def weight_factor(self) -> float:
        return super().weight_factor() * self.factor()

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        if not self._net_ref:
            raise RuntimeError("FlowDependency needs Distiller.prepare(example) first (it reads the net's weights)")
        return DF.flow_dependency_loss(list(self._net_ref[0].weight_logits))

    def log_values(self) -> dict[str, float]:
        if not self._net_ref:
            return {}
        with torch.no_grad():
            teacher_weight = float(self._net_ref[0].weights()[:, 1:].sum(dim=1).mean())
        return {"teacher_weight": teacher_weight, "factor": self.factor()}


@dataclass
class KnowledgeFlowResult(FitResult):
    """The student's :class:`~distill.train.loop.FitResult` *without* its teachers (the delivered
    model: ``best_acc`` / ``last_acc`` / ``best_epoch`` from ``val_independent_acc``, measured each
    epoch), plus the teacher-informed net's (``flow_best_acc``, ``flow_last_acc``: what ``fit``
    evaluated), the final normalised weights ``teacher_weights`` (one row per layer, column 0 the
    student), the ``student`` and the ``net`` (its hooks removed)."""

    flow_best_acc: float | None = None
    flow_last_acc: float | None = None
    teacher_weights: list[list[float]] = field(default_factory=list)
    student: nn.Module | None = None
    net: KnowledgeFlowNet | None = None


def _teacher_list(teacher: Any) -> list[nn.Module]:
    teachers = list(teacher) if isinstance(teacher, (list, tuple)) else [teacher]
    bad = [type(t).__name__ for t in teachers if not isinstance(t, nn.Module)]
    if not teachers or bad:
        raise TypeError(f"teacher must be a trained nn.Module or a non-empty list of them, got {bad or teacher!r}")
    return teachers


def _teacher_layer_lists(teacher_layers: Any, layers: list[str], count: int) -> list[list[str]]:
    if teacher_layers is None:
        return [list(layers) for _ in range(count)]
    if isinstance(teacher_layers, str) or not isinstance(teacher_layers, Sequence):
        raise TypeError(f"teacher_layers must be a list of paths, or one list per teacher, got {teacher_layers!r}")
    if all(isinstance(p, str) for p in teacher_layers):
        return [list(teacher_layers) for _ in range(count)]  # type: ignore[arg-type]
    return [list(p) for p in teacher_layers]


@register_strategy("knowledge_flow", "chain", PAPER)
def fit_knowledge_flow(
    student: ModelSpec,
    train_loader: Iterable[Any],
    val_loader: Iterable[Any] | None = None,
    *,
    teacher: nn.Module | Sequence[nn.Module],
    epochs: int,
    run_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    layers: Sequence[str] = ("stage1", "stage2", "stage3"),
    teacher_layers: Sequence[str] | Sequence[Sequence[str]] | None = None,
    kl_weight: float = 1.0,
    dependency_weight: float = 1.0,
    dependency_start: float = 0.0,
    **fit_kwargs: Any,
) -> KnowledgeFlowResult:
    """Knowledge flow: teachers' features flow into the student's layers, their weights driven to zero.

    One :func:`distill.fit` of a :class:`KnowledgeFlowNet` with the losses ``"ce"``, ``"flow_kl"``
    (:class:`FlowKL`, weight λ1 = ``kl_weight``) and ``"flow_dependency"`` (:class:`FlowDependency`,
    λ2 = ``dependency_weight`` times a factor rising linearly from ``dependency_start`` to 1 over the
    epochs). After every epoch the student is also evaluated alone (``val_independent_acc``); at the
    end the hooks are removed and the student is returned without its teachers.

    Args:
        student: the student (a model, a factory, a zoo name or a zoo spec).
        teacher: one trained teacher or a list (their architectures and tasks may differ: only the
            tapped layers' outputs are used, through trainable transformations).
        layers: the student's module paths that receive teacher features (the output of each is mixed).
        teacher_layers: the teachers' module paths, one per student layer: a list used for every
            teacher, one list per teacher, or ``None`` (the student's paths, for zoo models).
        kl_weight, dependency_weight, dependency_start: λ1, the final λ2 and the schedule's start
            (this library's defaults: 1, 1, 0; the paper's values could not be read here).
        **fit_kwargs: passed to :func:`distill.fit`.

    Returns:
        a :class:`KnowledgeFlowResult`; its top-level accuracies are the student's *alone*.
    """
    _check_epochs(epochs)
    teachers = _teacher_list(teacher)
    check_model_spec(student, "student")
    if isinstance(layers, str) or not isinstance(layers, Sequence) or not layers:
        raise ValueError(f"layers must be a non-empty list of student module paths, got {layers!r}")
    layers = [str(p) for p in layers]
    paths = _teacher_layer_lists(teacher_layers, layers, len(teachers))
    kl_weight = _check_weight("kl_weight", kl_weight)
    dependency_weight = _check_weight("dependency_weight", dependency_weight)
    dependency = FlowDependency(weight=dependency_weight, start=dependency_start)
    if fit_kwargs.get("resume"):
        raise ValueError("fit_knowledge_flow cannot resume: the evaluation of the student alone is not checkpointed")
    first = next(iter(train_loader), None)
    if first is None:
        raise ValueError("the training loader yielded no batch")
    model = build_model(student, "student")
    example = as_batch(first).inputs.to(next(model.parameters()).device)
    try:
        net = KnowledgeFlowNet(model, teachers, layers, paths, example)
    except TapError as e:
        raise ValueError(f"knowledge flow: {e}") from None
    distiller = Distiller(net, None, {"ce": 1.0, "flow_kl": FlowKL(weight=kl_weight), "flow_dependency": dependency})

    result, alone = fit_evaluating_student_alone(distiller, model, train_loader, val_loader, epochs=epochs,
                                                 run_dir=run_dir, seed=seed, progress=progress, **fit_kwargs)
    weights = net.weights().detach().cpu().tolist()
    net.detach()
    out = KnowledgeFlowResult(history=result.history, run_dir=result.run_dir, flow_best_acc=result.best_acc,
                              flow_last_acc=result.last_acc, teacher_weights=weights, student=model, net=net)
    if alone:
        out.last_acc = alone[-1]
        out.best_epoch = max(range(len(alone)), key=lambda e: alone[e])
        out.best_acc = alone[out.best_epoch]
    return out
