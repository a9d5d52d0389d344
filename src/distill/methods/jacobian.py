"""Jacobian matching (Srinivas & Fleuret 2018) and knowledge projection (Zhang et al. 2017).

Jacobian matching needs the two *models*, not only their views: the teacher runs under
``no_grad`` in the Distiller and the student's view is not a function of a leaf input, so the
method recomputes both input-gradients itself on leaf copies of ``batch.inputs`` (one extra
forward + backward of each network per step). The Distiller gives it its models when prepared
(:meth:`JacobianMatching.bind_models`); or give them at construction
(``JacobianMatching(student_model=s, teacher_model=t)``) or later with :meth:`JacobianMatching.bind`.
The math lives in :mod:`distill.functional.jacobian`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from distill import functional as DF
from distill.adapters import ShapeMismatchError
from distill.batch import Batch, View
from distill.methods._views import check_batch, tap
from distill.methods.base import Method, Paper, register
from distill.taps import logits_of

_COMPONENTS = ("target", "teacher_top")


@contextmanager
def _bn_stats_kept(model: nn.Module) -> Iterator[None]:
    """Run an extra forward without moving BatchNorm running statistics.

    The running mean/var are saved by autograd for the double backward, so they cannot be
    restored in place afterwards: their update factor is set to 0 instead (momentum 0 leaves
    them exactly as they were), and ``num_batches_tracked`` is put back.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m, m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.detach().clone())
             for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, tracked in saved:
            m.momentum = momentum
            if tracked is not None:
                with torch.no_grad():
                    m.num_batches_tracked.copy_(tracked)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


@register(
    "jacobian",
    "features",
    Paper(
        title="Knowledge Transfer with Jacobian Matching",
        authors="S. Srinivas, F. Fleuret",
        year=2018,
        arxiv="1803.00443",
        venue="ICML",
    ),
)
class JacobianMatching(Method):
    """Jacobian matching: || g_T/||g_T|| - g_S/||g_S|| ||_2^2 with g = grad_x f^c(x), mean over the batch.

    ``c`` is each sample's true class (``component="target"``; the teacher's top class for
    samples of a batch without labels) or the teacher's top class (``component="teacher_top"``).

    How the gradients are obtained:

    * student: the student is run again on a leaf copy of ``batch.inputs`` with
      ``requires_grad``; ``g_S`` is taken with ``create_graph=True`` so the loss trains the student
      through double backprop. BatchNorm running statistics are left unchanged by this extra
      forward (momentum 0 during it), so each step still updates them once; the train/eval mode
      is kept (batch statistics in train mode, as in the main forward).
    * teacher: run in eval mode on its own leaf copy under ``torch.enable_grad``; only the input
      gets a gradient (``torch.autograd.grad`` w.r.t. the input alone), ``g_T`` is detached, and
      the teacher's parameters, buffers and ``.grad`` are never touched.

    Cost: one extra forward and a double backward of the student, one extra forward/backward of
    the teacher per step. Student and teacher must take the same inputs and have the same number
    of outputs. ``student_model`` / ``teacher_model`` are plain references (not submodules: they
    do not appear in this method's ``state_dict`` or ``parameters()``).
    """

    def __init__(
        self,
        student_model: nn.Module | None = None,
        teacher_model: nn.Module | None = None,
        component: str = "target",
        squared: bool = True,
        weight: float = 1.0,
        warmup_epochs: int = 0,
    ) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        if component not in _COMPONENTS:
            raise ValueError(f"component must be one of {_COMPONENTS}, got {component!r}")
        self.component = component
        self.squared = bool(squared)
        self._models: list[nn.Module | None] = [None, None]  # a list: references, not submodules
        if student_model is not None or teacher_model is not None:
            self.bind(student_model, teacher_model)

    def bind(self, student_model: nn.Module | None, teacher_model: nn.Module | None) -> JacobianMatching:
        """Give the method the student and teacher networks (either may be ``None`` to keep the current one)."""
        for i, (m, side) in enumerate(((student_model, "student"), (teacher_model, "teacher"))):
            if m is not None:
                if not isinstance(m, nn.Module):
                    raise TypeError(f"{side}_model must be an nn.Module, got {type(m).__name__}")
                self._models[i] = m
        return self

    @property
    def student_model(self) -> nn.Module | None:
        return self._models[0]

    @property
    def teacher_model(self) -> nn.Module | None:
        return self._models[1]

    def bind_models(self, student: nn.Module, teacher: nn.Module | None, example: Batch) -> None:
        """The Distiller's models, for whichever of the two was not given (so recipes need no Python)."""
        self.bind(None if self._models[0] is not None else student,
                  None if self._models[1] is not None else teacher)

    def _check_bound(self) -> tuple[nn.Module, nn.Module]:
        s, t = self._models
        if s is None or t is None:
            missing = [n for n, m in (("student_model", s), ("teacher_model", t)) if m is None]
            raise RuntimeError(
                f"JacobianMatching needs the networks themselves to differentiate them w.r.t. their input; "
                f"missing {missing}: pass JacobianMatching(student_model=..., teacher_model=...) or call "
                ".bind(student, teacher)"
            )
        return s, t

    def prepare(self, student_view: View, teacher_view: View, batch: Batch) -> None:
        self._check_bound()
        if not batch.inputs.is_floating_point():
            raise TypeError(f"Jacobian matching needs floating-point inputs, got {batch.inputs.dtype}")

    def teacher_gradient(self, batch: Batch, teacher_view: View | None = None) -> tuple[Tensor, Tensor]:
        """``(g_T, classes)``: the teacher's input-gradient (detached, on the inputs' device and dtype) and ``c``."""
        _, teacher = self._check_bound()
        x = batch.inputs
        classes: Tensor | None = None
        if self.component == "target" and batch.targets is not None:
            classes = batch.targets
        elif teacher_view is not None and "logits" in teacher_view:
            classes = teacher_view["logits"].detach().argmax(dim=1)
        p = next(iter(teacher.parameters()), None)
        xt = x if p is None else x.to(device=p.device, dtype=p.dtype if p.is_floating_point() else x.dtype)
        with _eval_mode(teacher):
            g, logits = DF.input_gradient(lambda v: logits_of(teacher(v)), xt, classes, create_graph=False)
        if classes is None:
            classes = logits.detach().argmax(dim=1)
        return g.detach().to(device=x.device, dtype=x.dtype), classes.to(x.device)

    def student_gradient(self, batch: Batch, classes: Tensor) -> Tensor:
        """``g_S`` with its graph (``create_graph=True``): a loss on it trains the student."""
        student, _ = self._check_bound()
        with _bn_stats_kept(student):
            g, _ = DF.input_gradient(lambda v: logits_of(student(v)), batch.inputs, classes, create_graph=True)
        return g

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        g_t, classes = self.teacher_gradient(batch, teacher_view)
        g_s = self.student_gradient(batch, classes)
        check_batch(g_s, g_t, "student input-gradient", "teacher input-gradient")
        return DF.jacobian_matching_loss(g_s, g_t, squared=self.squared)

    def extra_repr(self) -> str:
        bound = all(m is not None for m in self._models)
        return f"component={self.component}, squared={self.squared}, bound={bound}, weight={self.weight}"


@register(
    "knowledge_projection",
    "features",
    Paper(
        title="Knowledge Projection for Effective Design of Thinner and Faster Deep Neural Networks",
        authors="Z. Zhang, G. Ning, Z. He",
        year=2017,
        arxiv="1710.09505",
    ),
)
class KnowledgeProjection(Method):
    """Knowledge projection: ||F_S - ReLU(W_p * F_T)||_2^2 per sample, mean over the batch.

    ``W_p`` is the projection matrix: a trainable 1x1 convolution (a linear map for ``(B, D)``
    taps) from the teacher's ``M`` channels down to the student layer's ``N`` channels, trained
    with the student; a ReLU follows it (``relu=True``). When the teacher's map is larger by an
    integer factor ``k`` the 1x1 convolution has stride ``k``. The teacher feature is detached:
    only ``W_p`` and the student receive gradients.

    Not done here: the paper also *injects* the projected teacher feature into the student's
    upper layers during training, picks the teacher/student layer pair by a search on a joint
    loss and decays the projection loss's weight. The strategy ``knowledge_projection``
    (:func:`distill.strategies.knowledge_projection.fit_knowledge_projection`) does all three
    around this projection. Used alone at weight 1 on this per-sample sum, the loss can collapse:
    ``W_p`` and the student layer meet at 0 (ReLU output 0), which carries nothing upwards; an
    element-mean weight (1 / (C·H·W)) avoids it (the strategy's injection alone does not).
    """

    requires_prepare = True

    def __init__(
        self,
        student_tap: str = "stage2",
        teacher_tap: str = "stage2",
        relu: bool = True,
        weight: float = 1.0,
        warmup_epochs: int = 0,
    ) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        self.student_tap, self.teacher_tap = str(student_tap), str(teacher_tap)
        self.relu = bool(relu)
        self.student_taps = [self.student_tap]
        self.teacher_taps = [self.teacher_tap]
        self.projection: nn.Module | None = None

    def _pair(self, student_view: View, teacher_view: View) -> tuple[Tensor, Tensor]:
        s = tap(student_view, self.student_tap, "student")
        t = tap(teacher_view, self.teacher_tap, "teacher").detach()
        check_batch(s, t, f"student:{self.student_tap}", f"teacher:{self.teacher_tap}")
        return s, t

    def prepare(self, student_view: View, teacher_view: View, batch: Batch) -> None:
        s, t = self._pair(student_view, teacher_view)
        where = f"student:{self.student_tap} {tuple(s.shape)}, teacher:{self.teacher_tap} {tuple(t.shape)}"
        if s.dim() != t.dim() or s.dim() not in (2, 4):
            raise ShapeMismatchError(f"knowledge projection needs two (B, C, H, W) maps or two (B, D) vectors: {where}")
        if s.dim() == 2:
            proj: nn.Module = nn.Linear(t.shape[1], s.shape[1])
        else:
            (hs, ws), (ht, wt) = s.shape[2:], t.shape[2:]
            if ht % hs or wt % ws or ht // hs != wt // ws:
                raise ShapeMismatchError(
                    f"the teacher's map must equal the student's or be larger by one integer factor: {where}"
                )
            proj = nn.Conv2d(t.shape[1], s.shape[1], kernel_size=1, stride=ht // hs, bias=True)
        self.projection = nn.Sequential(proj, nn.ReLU()) if self.relu else proj
        self.projection.to(device=s.device, dtype=s.dtype)

    def project(self, teacher_feature: Tensor) -> Tensor:
        if self.projection is None:
            raise RuntimeError("KnowledgeProjection.prepare() must be called on an example batch before the first forward")
        return self.projection(teacher_feature)

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        s, t = self._pair(student_view, teacher_view)
        return DF.knowledge_projection_loss(s, self.project(t))

    def extra_repr(self) -> str:
        return f"{self.teacher_tap} -> {self.student_tap}, relu={self.relu}, weight={self.weight}"


__all__ = ["JacobianMatching", "KnowledgeProjection"]
