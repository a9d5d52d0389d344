"""Knowledge projection: a projected teacher feature is injected into the student's upper layers, then
handed over to the student's own lower layers.

:class:`KnowledgeProjectionNet` wraps the student: a forward hook replaces the output :math:`F_S` of the
student's *injection layer* by

.. math:: H = (1 - \\alpha_e)\\, F_S + \\alpha_e\\, P(F_T), \\qquad P(F_T) = \\mathrm{ReLU}(W_p * F_T)

(:func:`inject`): :math:`F_T` the output of the teacher's chosen layer (the teacher frozen, run first),
:math:`W_p` the trainable projection matrix (a 1x1 convolution, stride ``k`` when the teacher's map is
``k`` times larger: the projection of :class:`~distill.methods.jacobian.KnowledgeProjection`), and
:math:`\\alpha_e` the injection coefficient of epoch ``e`` (:func:`injection_coefficient`), falling from
1 to 0 over ``handover_epochs``: the student's upper layers are first trained on the projected teacher
representation, which is then handed over, epoch by epoch, to the student's own lower layers. One
:func:`distill.fit` trains student and projection with the joint loss

.. math:: L_e = \\mathrm{CE}\\bigl(f_{up}(H), y\\bigr)
    + \\lambda_e\\, \\frac{1}{B}\\sum_b \\frac{1}{n} \\bigl\\lVert F_S(x_b) - P(F_T(x_b)) \\bigr\\rVert_2^2

(``"ce"`` and ``"projection"``, :class:`InjectedProjectionLoss`), :math:`n` the elements of one sample's
feature, :math:`\\lambda_e` the projection weight decaying linearly (:func:`projection_decay`). The
student's lower layers learn from the projection loss and, once :math:`\\alpha_e < 1`, from the
cross-entropy through their own path; ``W_p`` learns from both (through the injected path). At the end
the hook is removed and the student runs alone.

**Layer-pair search.** With several candidate ``pairs`` (student injection layer, teacher layer), each
candidate trains ``search_epochs`` epochs from the same initial student under the same schedule, its
joint loss :math:`L_e` is measured (evaluation mode, on the validation loader, else the training loader),
and the pair with the lowest is kept; the full run then trains that pair from the initial student.

Paper: Z. Zhang, G. Ning, Z. He, "Knowledge Projection for Effective Design of Thinner and Faster Deep
Neural Networks" (arXiv 1710.09505, 2017; first titled "Knowledge Projection for Deep Neural Networks").
Sources: only the abstract and the introduction (deepai.org's copy) and a secondary summary could be read
here; the method section (its equations, schedules and search algorithm) could not, and no code by the
authors was found. From the abstract: a projection matrix projects the teacher's intermediate
representation into an intermediate (injection) layer of a thinner student to guide and regulate its
training, and both layers are "adaptively selected during training by evaluating a joint loss function
in an iterative manner". Everything else is this library's reading and choice, said so in each default:

* the convex mix :math:`(1-\\alpha_e) F_S + \\alpha_e P(F_T)` and its linear fall over
  ``handover_epochs`` (default: half the epochs);
* the linear decay of :math:`\\lambda_e` from ``projection_weight`` to
  ``projection_weight / epochs`` (never exactly zero);
* the **element mean** in the projection term (the paper writes the squared norm; our functional
  :func:`~distill.functional.knowledge_projection_loss` sums over the features and is divided here by
  :math:`n`): one weight then suits every layer pair, so the joint losses of different pairs compare;
* the search as one round of short trainings ranked by the joint loss (the paper's "iterative"
  procedure could not be read).

Why the loss alone can collapse: :class:`~distill.methods.jacobian.KnowledgeProjection` trains ``W_p``
and the student to meet each other; ``W_p = 0`` with a negative bias (ReLU output 0) and a student layer
driven to 0 is an exact minimum that carries no information upwards. At weight 1 on a per-sample *sum*
(784 elements for a 16x7x7 map) this term outweighs the cross-entropy by orders of magnitude and training
falls into that minimum (the student at chance, ``docs/benchmarks.md``). The weight is the cause: with
injection at the same scale (``projection_weight = C·H·W`` here) it collapses too (measured:
``benchmarks/knowledge_projection.py``, mean :math:`|P(F_T)|` ~ 1e-6); the element mean at weight 1 does not.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill import functional as DF
from distill.batch import Batch, View, as_batch
from distill.distiller import Distiller
from distill.methods.base import Method
from distill.methods.jacobian import KnowledgeProjection
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

__all__ = ["InjectedProjectionLoss", "KnowledgeProjectionNet", "KnowledgeProjectionResult",
           "fit_knowledge_projection", "inject", "injection_coefficient", "projection_decay"]


def injection_coefficient(epoch: int, handover_epochs: int) -> float:
    """:math:`\\alpha_e = \\max(0, 1 - e / h)`: the projected teacher feature's share of the injection
    layer's output at epoch ``e`` (0-based), ``h = handover_epochs``. 1 at epoch 0 (the upper layers see
    the projected teacher feature only), 0 from epoch ``h`` on (the student alone); ``h = 0``: always 0
    (no injection, the projection loss alone). This library's linear schedule."""
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
    if isinstance(handover_epochs, bool) or not isinstance(handover_epochs, int) or handover_epochs < 0:
        raise ValueError(f"handover_epochs must be an int >= 0, got {handover_epochs!r}")
    if handover_epochs == 0:
        return 0.0
    return max(0.0, 1.0 - epoch / handover_epochs)


def projection_decay(epoch: int, total_epochs: int) -> float:
    """:math:`\\lambda_e / \\lambda_0 = 1 - e / E`: the projection weight's factor at epoch ``e``
    (0-based) of ``E = total_epochs``; 1 at the first epoch, ``1 / E`` at the last. This library's
    linear decay."""
    if isinstance(total_epochs, bool) or not isinstance(total_epochs, int) or total_epochs < 1:
        raise ValueError(f"total_epochs must be an int >= 1, got {total_epochs!r}")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch < total_epochs:
        raise ValueError(f"epoch must be an int in [0, {total_epochs}), got {epoch!r}")
    return 1.0 - epoch / total_epochs


def inject(own: Tensor, projected: Tensor, alpha: float) -> Tensor:
    """:math:`(1 - \\alpha) F_S + \\alpha P(F_T)`: the injection layer's output under knowledge projection.

    Shapes: ``own`` (the student layer's output :math:`F_S`) and ``projected`` (:math:`P(F_T)`)
    ``(B, C, H, W)`` or ``(B, D)``, equal → the same shape. ``alpha`` in [0, 1]."""
    if own.shape != projected.shape:
        raise ValueError(f"the projected teacher feature {tuple(projected.shape)} must have the student layer's "
                         f"shape {tuple(own.shape)}")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if alpha == 0.0:
        return own
    if alpha == 1.0:
        return projected
    return (1.0 - alpha) * own + alpha * projected


class _InjectionHook:
    """Replaces the injection layer's output while the owning net runs (a no-op when the student is
    called directly). A callable object, not a closure, so a deep copy of the net hooks the copy."""

    def __init__(self, net: KnowledgeProjectionNet) -> None:
        self.net = net

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> Tensor | None:
        projected = self.net._projected
        if projected is None:
            return None
        if not isinstance(output, Tensor):
            raise TypeError(f"knowledge projection replaces the output of student layer {self.net.student_layer!r}, "
                            f"which must be a tensor, got {type(output).__name__}")
        self.net.last_own = output
        return inject(output, projected, self.net.alpha)


class KnowledgeProjectionNet(nn.Module):
    """A student whose injection layer receives the projected teacher feature (see the module docstring).

    Args:
        student: the student model.
        teacher: the trained teacher (frozen here: eval mode, no gradient).
        student_layer: module path of the student's injection layer (its output is replaced).
        teacher_layer: tap path of the teacher's layer that is projected.
        example: an example input batch ``(B, ...)``, to build the projection from the shapes.
        relu: the ReLU after ``W_p`` (the paper's projection layer).

    ``forward(x)`` runs the teacher, projects its feature, then the student with the injection hook
    (coefficient :attr:`alpha`, 1 at construction) and returns the student's output; it keeps the
    injection layer's own output (:attr:`last_own`, ``F_S``) and the projected feature
    (:attr:`last_projected`, ``P(F_T)``) for the projection loss. Calling ``student`` runs it alone.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, student_layer: str, teacher_layer: str,
                 example: Tensor, relu: bool = True) -> None:
        super().__init__()
        self.student_layer, self.teacher_layer = str(student_layer), str(teacher_layer)
        if ":" in self.student_layer:
            raise ValueError(f"knowledge projection replaces a module's output: the student layer cannot be an "
                             f"':input' tap, got {self.student_layer!r}")
        self.student = student
        self.module_at = resolve(student, self.student_layer, model_name="student")
        self.teacher = FrozenTeacher(teacher).to(example.device)
        self.teacher.require_taps([self.teacher_layer])
        own = self._own_output(example)
        feat = self.teacher_feature(example)
        # the method's projection (1x1 conv, stride k, ReLU) and its shape checks
        self.kp = KnowledgeProjection(self.student_layer, self.teacher_layer, relu=relu)
        with torch.no_grad():
            self.kp.prepare({self.student_layer: own}, {self.teacher_layer: feat}, Batch(example))
        self.alpha = 1.0
        self._projected: Tensor | None = None
        self.last_own: Tensor | None = None
        self.last_projected: Tensor | None = None
        self._handle: Any = None
        self.attach()

    def _own_output(self, example: Tensor) -> Tensor:
        return record_in_eval(self.student, [self.student_layer], example, model_name="student")[self.student_layer]

    def attach(self) -> None:
        """Install the injection hook (done at construction; again after :meth:`detach`)."""
        if self._handle is None:
            self._handle = self.module_at.register_forward_hook(_InjectionHook(self))

    def detach(self) -> nn.Module:
        """Remove the injection hook and return the student, which then runs without its teacher."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        return self.student

    def close(self) -> nn.Module:
        """:meth:`detach`, and remove the teacher's tap (the teacher model is left as it was tapped)."""
        self.teacher.require_taps([])
        return self.detach()

    @torch.no_grad()
    def teacher_feature(self, x: Tensor) -> Tensor:
        """The teacher's tapped feature :math:`F_T` for inputs ``x``."""
        view = self.teacher(Batch(x))
        if self.teacher_layer not in view:
            raise RuntimeError("the teacher's tap was removed (close()): this net no longer runs; tap the teacher "
                               "yourself (distill.taps.Taps) to project its features")
        return view[self.teacher_layer]

    def forward(self, x: Tensor) -> Any:
        if self._handle is None:
            raise RuntimeError("the injection hook was removed (detach()); call attach() first, or run the student")
        projected = self.kp.project(self.teacher_feature(x))
        self._projected, self.last_own = projected, None
        try:
            out = self.student(x)
        finally:
            self._projected = None
        if self.last_own is None:
            raise RuntimeError(f"student layer {self.student_layer!r} did not run in the student's forward")
        self.last_projected = projected
        return out


def _net(student: nn.Module) -> KnowledgeProjectionNet:
    if not isinstance(student, KnowledgeProjectionNet):
        raise TypeError(f"InjectedProjectionLoss reads the injection layer: the Distiller's student must be a "
                        f"KnowledgeProjectionNet, got {type(student).__name__}")
    return student


class InjectedProjectionLoss(Method):
    """The projection term of knowledge projection under injection:
    :math:`\\lambda_e \\frac{1}{B}\\sum_b \\frac{1}{n}\\lVert F_S(x_b) - P(F_T(x_b))\\rVert_2^2`, with
    :math:`\\lambda_e` = ``weight`` · :func:`projection_decay`, and the injection coefficient
    :math:`\\alpha_e` (:func:`injection_coefficient`) set on the net at each epoch's start.

    ``total_epochs`` fixes the schedules' length (the layer-pair search trains a few epochs on the full
    run's schedule). ``log_values`` reports ``alpha`` and ``decay``. The Distiller's student must be a
    :class:`KnowledgeProjectionNet`.
    """

    needs_teacher = False

    def __init__(self, total_epochs: int, handover_epochs: int, weight: float = 1.0) -> None:
        super().__init__(weight=weight)
        projection_decay(0, total_epochs)  # validates
        injection_coefficient(0, handover_epochs)
        self.schedule_epochs, self.handover_epochs = int(total_epochs), int(handover_epochs)
        self._net_ref: tuple[KnowledgeProjectionNet, ...] = ()

    def bind_models(self, student: nn.Module, teacher: nn.Module | None, example: Batch) -> None:
        self._net_ref = (_net(student),)
        self._net_ref[0].alpha = self.alpha()

    def _epoch(self) -> int:
        return 0 if self.epoch is None else min(self.epoch, self.schedule_epochs - 1)

    def alpha(self) -> float:
        return injection_coefficient(self._epoch(), self.handover_epochs)

    def decay(self) -> float:
        return projection_decay(self._epoch(), self.schedule_epochs)

    def on_epoch_start(self, epoch: int, total_epochs: int | None = None) -> None:
        super().on_epoch_start(epoch, total_epochs)
        if self._net_ref:
            self._net_ref[0].alpha = self.alpha()

    def weight_factor(self) -> float:
        return self.decay()

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        if not self._net_ref:
            raise RuntimeError("InjectedProjectionLoss needs Distiller.prepare(example) first (it binds the net)")
        net = self._net_ref[0]
        own, projected = net.last_own, net.last_projected
        if own is None or projected is None:
            raise RuntimeError("the KnowledgeProjectionNet has not run on this batch")
        return DF.knowledge_projection_loss(own, projected) / own[0].numel()

    def log_values(self) -> dict[str, float]:
        return {"alpha": self.alpha(), "decay": self.decay()}


@dataclass
class KnowledgeProjectionResult(FitResult):
    """The student's :class:`~distill.train.loop.FitResult` *without* the teacher (the delivered model:
    ``best_acc`` / ``last_acc`` / ``best_epoch`` from ``val_independent_acc``, measured each epoch), plus
    the injected net's (``injected_best_acc``, ``injected_last_acc``: what ``fit`` evaluated, at each
    epoch's α), the chosen ``pair`` (student layer, teacher layer), the search's joint loss per candidate
    (``search_losses``, ``"student_layer<-teacher_layer"``: empty without a search), the ``student`` and
    the ``net`` (its hook removed)."""

    injected_best_acc: float | None = None
    injected_last_acc: float | None = None
    pair: tuple[str, str] = ("", "")
    search_losses: dict[str, float] = field(default_factory=dict)
    student: nn.Module | None = None
    net: KnowledgeProjectionNet | None = None


def _pairs(pairs: Any) -> list[tuple[str, str]]:
    ok = isinstance(pairs, Sequence) and not isinstance(pairs, (str, bytes)) and len(pairs) > 0
    out: list[tuple[str, str]] = []
    for p in pairs if ok else ():
        if isinstance(p, (str, bytes)) or not isinstance(p, Sequence) or len(p) != 2 \
                or not all(isinstance(s, str) and s for s in p):
            ok = False
            break
        out.append((p[0], p[1]))
    if not ok:
        raise ValueError(f"pairs must be a non-empty list of (student layer, teacher layer) path pairs, "
                         f"e.g. [('stage2', 'stage2')]; got {pairs!r}")
    if len(set(out)) != len(out):
        raise ValueError(f"pairs lists a pair twice: {out}")
    return out


@torch.no_grad()
def _joint_loss(net: KnowledgeProjectionNet, method: InjectedProjectionLoss, loader: Iterable[Any]) -> float:
    """Mean over ``loader`` of CE(injected output, y) + λ_e · projection term, in evaluation mode."""
    device = next(net.kp.parameters()).device
    modes = {m: m.training for m in net.modules()}
    net.eval()
    total, n = 0.0, 0
    try:
        for raw in loader:
            batch = as_batch(raw).to(device)
            logits = logits_of(net(batch.inputs))
            ce = F.cross_entropy(logits, batch.targets, reduction="sum")
            proj = method(None, None, batch) * batch.inputs.shape[0]  # type: ignore[arg-type]
            total += float(ce + method.weight * method.weight_factor() * proj)
            n += batch.inputs.shape[0]
    finally:
        for m, mode in modes.items():
            m.training = mode
    if n == 0:
        raise ValueError("the loader for the layer-pair search yielded no sample")
    return total / n


def _train(net: KnowledgeProjectionNet, method: InjectedProjectionLoss, train_loader: Iterable[Any],
           val_loader: Iterable[Any] | None, epochs: int, run_dir: Path | None, seed: int, progress: bool,
           fit_kwargs: dict[str, Any]) -> tuple[FitResult, list[float]]:
    distiller = Distiller(net, None, {"ce": 1.0, "projection": method})
    return fit_evaluating_student_alone(distiller, net.student, train_loader, val_loader, epochs=epochs,
                                        run_dir=run_dir, seed=seed, progress=progress, **fit_kwargs)


@register_strategy("knowledge_projection", "features", KnowledgeProjection.paper)  # type: ignore[arg-type]
def fit_knowledge_projection(
    student: ModelSpec,
    train_loader: Iterable[Any],
    val_loader: Iterable[Any] | None = None,
    *,
    teacher: nn.Module,
    epochs: int,
    run_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    pairs: Sequence[tuple[str, str]] = (("stage2", "stage2"),),
    handover_epochs: int | None = None,
    projection_weight: float = 1.0,
    search_epochs: int = 1,
    relu: bool = True,
    **fit_kwargs: Any,
) -> KnowledgeProjectionResult:
    """Knowledge projection: the projected teacher feature trains the student's upper layers, then hands over.

    One :func:`distill.fit` of a :class:`KnowledgeProjectionNet` with ``"ce"`` (on the injected output)
    and ``"projection"`` (:class:`InjectedProjectionLoss`), after a layer-pair search when ``pairs`` has
    several candidates. After every epoch the student is also evaluated alone (``val_independent_acc``);
    at the end the hook is removed and the student is returned without its teacher.

    Args:
        student: the student (a model, a factory, a zoo name or a zoo spec); with several ``pairs`` each
            candidate and the final run start from copies of one initial student.
        teacher: the trained teacher (frozen: eval mode, ``requires_grad`` off).
        epochs: epochs of the final run (the schedules' length).
        pairs: candidate (student injection layer, teacher layer) module paths; one pair: no search.
        handover_epochs: epochs over which α falls from 1 to 0 (default ``epochs // 2``, at least 1;
            0: no injection, the decaying projection loss alone). This library's default.
        projection_weight: λ at the first epoch, decaying linearly to ``λ / epochs`` (this library's
            default 1, on the element mean).
        search_epochs: epochs each candidate pair trains before its joint loss is measured (ours: 1).
        relu: the ReLU after the projection matrix (the paper's projection layer).
        **fit_kwargs: passed to every :func:`distill.fit`.

    Returns:
        a :class:`KnowledgeProjectionResult`; its top-level accuracies are the student's *alone*.
    """
    _check_epochs(epochs)
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"knowledge_projection needs teacher= (a trained nn.Module), got {type(teacher).__name__}")
    check_model_spec(student, "student")
    candidates = _pairs(pairs)
    handover = max(1, epochs // 2) if handover_epochs is None else handover_epochs
    if isinstance(handover, bool) or not isinstance(handover, int) or not 0 <= handover <= epochs:
        raise ValueError(f"handover_epochs must be an int in [0, epochs={epochs}], got {handover_epochs!r}")
    projection_weight = _check_weight("projection_weight", projection_weight)
    if isinstance(search_epochs, bool) or not isinstance(search_epochs, int) or not 1 <= search_epochs <= epochs:
        raise ValueError(f"search_epochs must be an int in [1, epochs={epochs}], got {search_epochs!r}")
    if fit_kwargs.get("resume"):
        raise ValueError("fit_knowledge_projection cannot resume: the evaluation of the student alone is not "
                         "checkpointed")
    first = next(iter(train_loader), None)
    if first is None:
        raise ValueError("the training loader yielded no batch")
    model = build_model(student, "student")
    example = as_batch(first).inputs.to(next(model.parameters()).device)
    initial = copy.deepcopy(model.state_dict())

    def make(pair: tuple[str, str], m: nn.Module) -> KnowledgeProjectionNet:
        try:
            return KnowledgeProjectionNet(m, teacher, pair[0], pair[1], example, relu=relu)
        except TapError as e:
            raise ValueError(f"knowledge projection, pair {pair}: {e}") from None

    for pair in candidates:  # every pair's layers and shapes checked before any training
        make(pair, copy.deepcopy(model)).close()

    root = Path(run_dir) if run_dir is not None else None
    losses: dict[str, float] = {}
    chosen = candidates[0]
    if len(candidates) > 1:
        for k, pair in enumerate(candidates):
            m = copy.deepcopy(model)
            net = make(pair, m)
            method = InjectedProjectionLoss(epochs, handover, weight=projection_weight)
            _train(net, method, train_loader, None, search_epochs,
                   root / f"search{k}" if root else None, seed, progress, fit_kwargs)
            method.on_epoch_start(search_epochs - 1, epochs)  # the schedule's values of the last search epoch
            losses[f"{pair[0]}<-{pair[1]}"] = _joint_loss(net, method, val_loader if val_loader is not None
                                                          else train_loader)
            net.close()
        chosen = min(candidates, key=lambda p: losses[f"{p[0]}<-{p[1]}"])
        model.load_state_dict(initial)

    net = make(chosen, model)
    method = InjectedProjectionLoss(epochs, handover, weight=projection_weight)
    result, alone = _train(net, method, train_loader, val_loader, epochs, root / "final" if root and losses else root,
                           seed, progress, fit_kwargs)
    net.close()
    out = KnowledgeProjectionResult(history=result.history, run_dir=result.run_dir, time_s=result.time_s,
                                    injected_best_acc=result.best_acc, injected_last_acc=result.last_acc,
                                    pair=chosen, search_losses=losses, student=model, net=net)
    if alone:
        out.last_acc = alone[-1]
        out.best_epoch = max(range(len(alone)), key=lambda e: alone[e])
        out.best_acc = alone[out.best_epoch]
    return out
