"""EC-KD (Wang et al., ECCV 2020): hardness-aware feature consistency + position-aware weight exclusivity.

The math lives in :mod:`distill.functional.face_eckd`.
"""

from __future__ import annotations

from torch import Tensor, nn

from distill import functional as DF
from distill.adapters import build_adapter
from distill.batch import Batch, View
from distill.methods._views import tap as _tap
from distill.methods.base import Method, Paper, register

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@register(
    "ec_kd",
    "face",
    Paper(
        title="Exclusivity-Consistency Regularized Knowledge Distillation for Face Recognition",
        authors="X. Wang, T. Fu, S. Liao, S. Wang, Z. Lei, T. Mei",
        year=2020,
        arxiv=None,
        venue="ECCV",
    ),
)
class ECKD(Method):
    """EC-KD: the student's embedding matches the teacher's, hard samples weighing more
    (:func:`distill.functional.hardness_aware_consistency`), and the filters of each of the student's conv
    (and linear) layers are pushed apart in where they are non-zero
    (:func:`distill.functional.weight_exclusivity`)::

        L = consistency_weight * HFC(s, t) + exclusivity_weight * sum_l E(W_l)

    The student's own classification loss is a separate term (``"ce"`` beside it in the Distiller).

    Reads the embedding tap ``tap`` of the student ``(B, D_s)`` and ``teacher_tap`` of the teacher
    ``(B, D_t)`` (the pooled feature ``pool`` of the zoo's CNNs). When ``D_s != D_t`` a linear adapter
    (built by :meth:`prepare`, trained with the student) maps the student's embedding to the teacher's width.
    The exclusivity reads the student network itself: the Distiller shows it to :meth:`bind_models`, or
    pass ``student_model=`` / call :meth:`bind`. Layers: every ``Conv1d/2d/3d`` and (``include_linear``)
    ``Linear`` of the student whose dotted name is not in ``skip`` nor under a name in it (e.g. ``skip=("fc",)``
    leaves the classifier out). The adapter is not part of the student and is never penalised.

    Source: Wang, Fu, Liao, Wang, Lei, Mei, ECCV 2020 (LNCS 12369, DOI 10.1007/978-3-030-58586-0_20; no
    arXiv version). Only the abstract, the first page and a secondary summary could be read, not the method
    section: the relaxed exclusivity ``||w_i ⊙ w_j||_1`` over the pairs of filters of a layer, the
    hardness-weighted consistency of embeddings and their sum with the classification loss are the
    summary's; the unit-norm filters, the per-pair mean, the sum over layers, the distance (2 - 2 cos), the
    softmax hardness weight and every default weight (1, 0.05, hardness 1) are ours.
    """

    requires_prepare = True

    def __init__(self, tap: str = "pool", teacher_tap: str | None = None, consistency_weight: float = 1.0,
                 exclusivity_weight: float = 0.05, hardness: float = 1.0, normalize_features: bool = True,
                 normalize_filters: bool = True, reduction: str = "mean", include_linear: bool = True,
                 skip: tuple[str, ...] | list[str] = (), student_model: nn.Module | None = None,
                 weight: float = 1.0, warmup_epochs: int = 0) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        for name, value in (("consistency_weight", consistency_weight), ("exclusivity_weight", exclusivity_weight),
                            ("hardness", hardness)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise ValueError(f"{name} must be a finite number >= 0; got {value!r}")
        if consistency_weight == 0 and exclusivity_weight == 0:
            raise ValueError("consistency_weight and exclusivity_weight are both 0: EC-KD would compute nothing")
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean'; got {reduction!r}")
        if isinstance(skip, str) or not all(isinstance(s, str) for s in skip):
            raise ValueError(f"skip must be a list of module names; got {skip!r}")
        self.tap, self.teacher_tap = tap, teacher_tap or tap
        self.consistency_weight, self.exclusivity_weight = float(consistency_weight), float(exclusivity_weight)
        self.hardness = float(hardness)
        self.normalize_features, self.normalize_filters = bool(normalize_features), bool(normalize_filters)
        self.reduction, self.include_linear, self.skip = reduction, bool(include_linear), tuple(skip)
        self.student_taps, self.teacher_taps = [tap], [self.teacher_tap]
        self.adapter: nn.Module | None = None
        self._student: list[nn.Module] = []  # a list: a reference, not a submodule (not saved or moved with us)
        self._layers: list[tuple[str, nn.Module]] = []
        if student_model is not None:
            self.bind(student_model)

    # ------------------------------------------------------------------ the student network
    def bind(self, student_model: nn.Module) -> ECKD:
        """Give the method the student network whose layers the exclusivity penalises."""
        if not isinstance(student_model, nn.Module):
            raise TypeError(f"student_model must be an nn.Module, got {type(student_model).__name__}")
        kinds = _CONVS + ((nn.Linear,) if self.include_linear else ())
        layers = [(n, m) for n, m in student_model.named_modules() if isinstance(m, kinds) and not any(
            n == s or n.startswith(s + ".") for s in self.skip)]
        small = [n for n, m in layers if m.weight.shape[0] < 2]
        layers = [(n, m) for n, m in layers if m.weight.shape[0] >= 2]  # one filter: no pair to compare
        if self.exclusivity_weight > 0:
            if not layers:
                raise ValueError(f"EC-KD's exclusivity found no conv{'/linear' if self.include_linear else ''} layer "
                                 f"with 2 or more filters in the student (skip={list(self.skip)}, "
                                 f"single-filter layers {small})")
        self._student, self._layers = [student_model], layers
        return self

    @property
    def student_model(self) -> nn.Module | None:
        return self._student[0] if self._student else None

    @property
    def layer_names(self) -> list[str]:
        """The dotted names of the student's layers the exclusivity penalises."""
        return [n for n, _ in self._layers]

    def bind_models(self, student: nn.Module, teacher: nn.Module | None, example: Batch) -> None:
        if not self._student:
            self.bind(student)

    def exclusivity(self) -> Tensor:
        """``sum_l E(W_l)`` over the bound student's layers (unweighted)."""
        if not self._student:
            raise RuntimeError("EC-KD needs the student network for its weight exclusivity: pass "
                               "ECKD(student_model=...), call .bind(student), or let the Distiller prepare it")
        return sum(DF.weight_exclusivity(m.weight, normalize=self.normalize_filters, reduction=self.reduction)
                   for _, m in self._layers)

    # ------------------------------------------------------------------ the embeddings
    def _pair(self, student_view: View, teacher_view: View) -> tuple[Tensor, Tensor]:
        s = _tap(student_view, self.tap, "student").flatten(1)
        t = _tap(teacher_view, self.teacher_tap, "teacher").detach().flatten(1)
        if s.shape[0] != t.shape[0]:
            raise ValueError(f"batch sizes differ: student {tuple(s.shape)}, teacher {tuple(t.shape)}")
        return s, t

    def prepare(self, student_view: View, teacher_view: View, batch: Batch) -> None:
        if self.exclusivity_weight > 0 and not self._student:
            self.exclusivity()  # raises the clear error before training starts
        if self.adapter is not None or self.consistency_weight == 0:
            return
        s, t = self._pair(student_view, teacher_view)
        self.adapter = (nn.Identity() if s.shape[1] == t.shape[1] else build_adapter(
            s, t, student_name=f"student:{self.tap}", teacher_name=f"teacher:{self.teacher_tap}",
            kind="linear").to(device=s.device, dtype=s.dtype))

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        loss: Tensor | None = None
        if self.consistency_weight > 0:
            if self.adapter is None:
                raise RuntimeError("ECKD.prepare() must be called on an example batch before the first forward")
            s, t = self._pair(student_view, teacher_view)
            loss = self.consistency_weight * DF.hardness_aware_consistency(
                self.adapter(s), t, hardness=self.hardness, normalize=self.normalize_features)
        if self.exclusivity_weight > 0:
            e = self.exclusivity_weight * self.exclusivity()
            loss = e if loss is None else loss + e
        assert loss is not None  # __init__ refuses both weights 0
        return loss

    def extra_repr(self) -> str:
        return (f"tap={self.tap!r}, consistency_weight={self.consistency_weight}, "
                f"exclusivity_weight={self.exclusivity_weight}, hardness={self.hardness}, "
                f"normalize_features={self.normalize_features}, normalize_filters={self.normalize_filters}, "
                f"reduction={self.reduction!r}, layers={len(self._layers)}")
