"""Instance-graph and ranking relation methods: IRG and DarkRank.

Each ``forward`` returns the *unweighted* loss; the math lives in
:mod:`distill.functional.ranking`. Teacher tensors are detached here.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from distill import functional as DF
from distill.batch import Batch, View
from distill.methods._views import check_batch as _check_batch, tap as _tap
from distill.methods.base import Method, Paper, register


@register(
    "irg",
    "relations",
    Paper(
        title="Knowledge Distillation via Instance Relationship Graph",
        authors="Y. Liu, J. Cao, B. Li, C. Yuan, W. Hu, Y. Li, Y. Duan",
        year=2019,
        venue="CVPR",
    ),
)
class IRG(Method):
    """Instance relationship graph: λ1·vertex (logits MSE) + λ2·edge (distance matrices) + λ3·transformation.

    * vertex: ``vertex_tap`` of both models (default the logits; None disables), equal shapes;
    * edges: one B×B Euclidean distance matrix per tap of ``student_taps`` / ``teacher_taps``
      (default ``stage3`` and ``pool``), each divided by its maximum, summed over taps;
    * transformation: the per-instance distance between the two taps of ``student_transform``
      (``teacher_transform``, default the same names), after pooling to a common shape
      (:func:`distill.functional.irg_match_layers`), max-normalised; None disables.

    The default transformation is stage2 → stage3: stage3 → pool is identically 0 for networks
    whose ``pool`` is the global average of ``stage3``.

    Defaults: squared Euclidean distances divided by their maximum (the authors' Caffe code,
    yufanLIU/IRG ``batch_euclidean_map_layer.cpp`` / ``batch_euclidean_vector_layer.cpp``;
    ``squared=False`` for plain distances). λ = 0.1 / 5 / 5 are not from the paper's text (not
    readable here) but AberHu/Knowledge-Distillation-Zoo's ``w_irg_vert / w_irg_edge /
    w_irg_tran``; the authors' prototxts use 0.005 per edge / transformation term with Caffe's
    ``EuclideanLoss`` (= λ 0.005·B/2 here) and no vertex term. See
    :func:`distill.functional.irg_loss`.
    """

    def __init__(
        self,
        student_taps: Sequence[str] = ("stage3", "pool"),
        teacher_taps: Sequence[str] | None = None,
        vertex_tap: str | None = "logits",
        student_transform: Sequence[str] | None = ("stage2", "stage3"),
        teacher_transform: Sequence[str] | None = None,
        vertex_weight: float = 0.1,
        edge_weight: float = 5.0,
        transformation_weight: float = 5.0,
        squared: bool = True,
        normalize: bool = True,
        weight: float = 1.0,
        warmup_epochs: int = 0,
    ) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        self.edge_student = [str(p) for p in student_taps]
        self.edge_teacher = list(self.edge_student) if teacher_taps is None else [str(p) for p in teacher_taps]
        if len(self.edge_teacher) != len(self.edge_student):
            raise ValueError(f"{len(self.edge_student)} student taps vs {len(self.edge_teacher)} teacher taps")
        for w, what in ((vertex_weight, "vertex"), (edge_weight, "edge"), (transformation_weight, "transformation")):
            if w < 0:
                raise ValueError(f"IRG {what}_weight must be >= 0, got {w}")
        self.vertex_tap = None if vertex_tap is None else str(vertex_tap)
        self.transform_student = None if student_transform is None else tuple(str(p) for p in student_transform)
        if teacher_transform is None:
            self.transform_teacher = self.transform_student
        else:
            self.transform_teacher = tuple(str(p) for p in teacher_transform)
        for pair in (self.transform_student, self.transform_teacher):
            if pair is not None and len(pair) != 2:
                raise ValueError(f"an IRG transformation needs two taps (earlier, later), got {pair}")
        if (self.transform_student is None) != (self.transform_teacher is None):
            raise ValueError("student_transform and teacher_transform must both be set or both be None")
        if not self.edge_student and self.vertex_tap is None and self.transform_student is None:
            raise ValueError("IRG needs at least one of edge taps, vertex_tap or a transformation")
        self.vertex_weight = float(vertex_weight)
        self.edge_weight = float(edge_weight)
        self.transformation_weight = float(transformation_weight)
        self.squared, self.normalize = bool(squared), bool(normalize)

        def taps(edge: list[str], transform: tuple[str, ...] | None) -> list[str]:
            out = list(edge) + list(transform or ())
            if self.vertex_tap is not None and self.vertex_tap != "logits":
                out.append(self.vertex_tap)
            return sorted(set(out))

        self.student_taps = taps(self.edge_student, self.transform_student)
        self.teacher_taps = taps(self.edge_teacher, self.transform_teacher)

    def _gather(self, student_view: View, teacher_view: View):
        fs, ft = [], []
        for s_path, t_path in zip(self.edge_student, self.edge_teacher):
            s = _tap(student_view, s_path, "student")
            t = _tap(teacher_view, t_path, "teacher").detach()
            _check_batch(s, t, f"student:{s_path}", f"teacher:{t_path}")
            fs.append(s)
            ft.append(t)
        vs = vt = None
        if self.vertex_tap is not None:
            vs = _tap(student_view, self.vertex_tap, "student")
            vt = _tap(teacher_view, self.vertex_tap, "teacher").detach()
            if vs.shape != vt.shape:
                raise ValueError(
                    f"IRG's vertex loss needs equal shapes: student:{self.vertex_tap} {tuple(vs.shape)}, "
                    f"teacher:{self.vertex_tap} {tuple(vt.shape)}"
                )
        ts = tt = None
        if self.transform_student is not None and self.transform_teacher is not None:
            ts = tuple(_tap(student_view, p, "student") for p in self.transform_student)
            tt = tuple(_tap(teacher_view, p, "teacher").detach() for p in self.transform_teacher)
        return vs, vt, fs, ft, ts, tt

    def prepare(self, student_view: View, teacher_view: View, batch: Batch) -> None:
        # fail early, naming the taps, on missing taps and unmatched shapes
        _, _, _, _, ts, tt = self._gather(student_view, teacher_view)
        for pair, names, side in ((ts, self.transform_student, "student"), (tt, self.transform_teacher, "teacher")):
            if pair is not None:
                try:
                    DF.irg_match_layers(*pair)
                except ValueError as err:
                    raise ValueError(f"IRG transformation {side}:{names[0]} -> {side}:{names[1]}: {err}") from None

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        vs, vt, fs, ft, ts, tt = self._gather(student_view, teacher_view)
        return DF.irg_loss(
            vs, vt, fs, ft, ts, tt, self.vertex_weight, self.edge_weight, self.transformation_weight,
            self.squared, self.normalize,
        )

    def extra_repr(self) -> str:
        return (
            f"edges={list(zip(self.edge_student, self.edge_teacher))}, vertex={self.vertex_tap}, "
            f"transform={self.transform_student} -> {self.transform_teacher}, "
            f"lambdas=({self.vertex_weight}, {self.edge_weight}, {self.transformation_weight}), weight={self.weight}"
        )


@register(
    "darkrank",
    "relations",
    Paper(
        title="DarkRank: Accelerating Deep Metric Learning via Cross Sample Similarities Transfer",
        authors="Y. Chen, N. Wang, Z. Zhang",
        year=2018,
        arxiv="1707.01220",
        venue="AAAI",
    ),
)
class DarkRank(Method):
    """DarkRank: ListMLE likelihood of the teacher's ranking of each anchor's neighbours under the student's scores.

    Scores S = −α‖f_i − f_j‖^β on (L2-normalised) embeddings, α = β = 3. ``variant="hard"``
    (default) is the listwise ListMLE loss over all other samples of the batch (``list_length``
    keeps the teacher's top n); ``"soft"`` is the KL between the n!-permutation distributions of
    the teacher's top ``list_length`` (default 4 when None). Embeddings of any sizes.
    """

    def __init__(
        self,
        student_tap: str = "pool",
        teacher_tap: str = "pool",
        alpha: float = 3.0,
        beta: float = 3.0,
        variant: str = "hard",
        list_length: int | None = None,
        normalize: bool = True,
        weight: float = 1.0,
        warmup_epochs: int = 0,
    ) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        if alpha <= 0 or beta <= 0:
            raise ValueError(f"DarkRank needs alpha > 0 and beta > 0, got {alpha}, {beta}")
        if variant not in ("hard", "soft"):
            raise ValueError(f"DarkRank variant must be 'hard' or 'soft', got {variant!r}")
        if list_length is not None and list_length < 1:
            raise ValueError(f"list_length must be >= 1 or None, got {list_length}")
        if variant == "soft" and list_length is not None and list_length > 8:
            raise ValueError(f"the soft variant enumerates list_length! permutations: list_length <= 8, got {list_length}")
        self.student_tap, self.teacher_tap = str(student_tap), str(teacher_tap)
        self.student_taps = [self.student_tap]
        self.teacher_taps = [self.teacher_tap]
        self.alpha, self.beta = float(alpha), float(beta)
        self.variant, self.list_length, self.normalize = variant, list_length, bool(normalize)

    def _pair(self, student_view: View, teacher_view: View) -> tuple[Tensor, Tensor]:
        s = _tap(student_view, self.student_tap, "student")
        t = _tap(teacher_view, self.teacher_tap, "teacher").detach()
        _check_batch(s, t, f"student:{self.student_tap}", f"teacher:{self.teacher_tap}")
        return s, t

    def prepare(self, student_view: View, teacher_view: View, batch: Batch) -> None:
        self._pair(student_view, teacher_view)  # fail early, naming the taps

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        s, t = self._pair(student_view, teacher_view)
        if self.variant == "hard":
            return DF.darkrank_hard_loss(s, t, self.alpha, self.beta, self.list_length, self.normalize)
        n = 4 if self.list_length is None else self.list_length
        return DF.darkrank_soft_loss(s, t, self.alpha, self.beta, n, self.normalize)

    def extra_repr(self) -> str:
        return (
            f"{self.student_tap} -> {self.teacher_tap}, alpha={self.alpha}, beta={self.beta}, "
            f"variant={self.variant}, list_length={self.list_length}, weight={self.weight}"
        )


__all__ = ["IRG", "DarkRank"]
