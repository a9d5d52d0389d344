"""DeiT: distillation through attention, with a distillation token (family ``vit``).

The math lives in :mod:`distill.functional.vit_deit`; this module reads the two heads of a
distilled ViT through taps and detaches the teacher.
"""

from __future__ import annotations

from torch import Tensor

from distill import functional as DF
from distill.batch import Batch, View
from distill.methods._views import tap as _tap
from distill.methods.base import Method, Paper, register

_MODES = ("hard", "soft")
_TOKENS = ("dist", "class")
# the paper's weights of (true-label term, teacher term): ½/½ for hard distillation (Eq. 3), (1 − λ)/λ with
# λ = 0.1 for soft (Section 6; the authors' main.py defaults to λ = 0.5 for both, see the class docstring)
_PAPER_WEIGHTS = {"hard": (0.5, 0.5), "soft": (0.9, 0.1)}


@register(
    "deit",
    "vit",
    Paper(
        title="Training data-efficient image transformers & distillation through attention",
        authors="H. Touvron, M. Cord, M. Douze, F. Massa, A. Sablayrolles, H. Jégou",
        year=2021,
        arxiv="2012.12877",
        venue="ICML",
    ),
)
class DeiT(Method):
    """DeiT: the class head learns the labels, the distillation-token head the teacher (hard or soft).

    ``mode="hard"`` (the paper's DeiT⚗): ``½ CE(ψ(Z_cls), y) + ½ CE(ψ(Z_dist), argmax Z_t)``;
    ``mode="soft"``: ``(1 − λ) CE(ψ(Z_cls), y) + λ τ² KL(ψ(Z_t/τ) ‖ ψ(Z_dist/τ))``
    (:func:`distill.functional.deit_hard_loss`, :func:`distill.functional.deit_soft_loss`). The
    method carries its own cross-entropy term: a recipe uses ``losses: {deit: {...}}`` alone.

    ``token="dist"`` reads the class head and the distillation head through the taps ``cls_tap``
    (``"head"``) and ``dist_tap`` (``"head_dist"``): the zoo's ``deit_tiny`` and timm's
    ``deit_*_distilled_*`` models name them so; each tap is ``(B, K)``. ``token="class"`` is the
    paper's "usual distillation" baseline for a model without a distillation token (``vit_tiny``,
    any CNN): the model's logits take both terms. At inference a distilled model averages its two
    heads (the model does that, :class:`distill.models.vit.ViT`), so evaluation needs nothing here.

    Args:
        mode: ``"hard"`` or ``"soft"``.
        T: τ of soft distillation (unused by ``"hard"``); 3.0 the paper's (Section 6).
        ce_weight: weight of the true-label term; ``None``: the paper's, ½ (hard) or 1 − λ = 0.9 (soft).
        distill_weight: weight of the teacher term; ``None``: the paper's, ½ (hard) or λ = 0.1 (soft).
        label_smoothing: ε of the true label (1 − ε on it, ε/(K − 1) on each other class); the
            teacher's pseudo-label is never smoothed.
        token: ``"dist"`` (distillation token) or ``"class"`` (usual distillation on the logits).
        cls_tap, dist_tap: tap paths of the two heads when ``token="dist"``.
        weight, warmup_epochs: see :class:`~distill.methods.base.Method`.

    Defaults, all the paper's: hard mode, its ½/½ weights (Section 4, Eq. 3), and ε = 0.1 on true
    labels only, the remaining ε shared over the other classes (Section 4: "we fix this parameter to
    ε = 0.1"; the teacher's pseudo-label is not smoothed). τ = 3, λ = 0.1 for soft distillation
    (Eq. 2): Section 6, "Initialization and hyper-parameters", which takes "the typical values
    τ = 3.0 and λ = 0.1 for the usual (soft) distillation" after Cho & Hariharan (ICCV 2019). Read
    in a transcription of the paper's full text (not an arXiv page: the ``pages`` corpus holds only
    its first page and summaries). The paper writes the term ``KL(ψ(Z_s/τ), ψ(Z_t/τ))``; we
    compute ``KL(teacher ‖ student)`` as Hinton et al. and the authors' code do.

    The authors' code (facebookresearch/deit, commit 7e160fe, ``main.py``) differs from the paper:
    ``--distillation-alpha 0.5 --distillation-tau 1.0`` for both modes (so its soft mode runs at
    τ = 1, λ = 0.5 unless told otherwise), and ``losses.py`` divides the soft KL by B·K rather than B
    (1/K of the paper's term, see :func:`~distill.functional.deit_soft_loss`); its label smoothing is
    timm's (ε spread over all K classes: its ε is the paper's ε·K/(K − 1)). We keep the paper's.
    """

    needs_targets = True
    reads_teacher_logits = True  # argmax / softmax of the teacher's K classes against the student's K

    def __init__(self, mode: str = "hard", T: float = 3.0, ce_weight: float | None = None,
                 distill_weight: float | None = None, label_smoothing: float = 0.1, token: str = "dist",
                 cls_tap: str = "head", dist_tap: str = "head_dist", weight: float = 1.0,
                 warmup_epochs: int = 0) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        if mode not in _MODES:
            raise ValueError(f"deit: mode must be one of {list(_MODES)}, got {mode!r}")
        if token not in _TOKENS:
            raise ValueError(f"deit: token must be 'dist' (a distillation-token model's head_dist) or 'class' (the "
                             f"usual distillation, on the logits), got {token!r}")
        if not T > 0 or T == float("inf"):
            raise ValueError(f"deit: temperature T must be a finite number > 0, got {T}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"deit: label_smoothing must be in [0, 1), got {label_smoothing}")
        paper_ce, paper_distill = _PAPER_WEIGHTS[mode]
        self.ce_weight = float(paper_ce if ce_weight is None else ce_weight)
        self.distill_weight = float(paper_distill if distill_weight is None else distill_weight)
        for name, value in (("ce_weight", self.ce_weight), ("distill_weight", self.distill_weight)):
            if not value >= 0:
                raise ValueError(f"deit: {name} must be >= 0, got {value}")
        self.mode, self.T, self.label_smoothing, self.token = mode, float(T), float(label_smoothing), token
        self.cls_tap, self.dist_tap = str(cls_tap), str(dist_tap)
        self.student_taps = [self.cls_tap, self.dist_tap] if token == "dist" else []

    def _heads(self, student_view: View) -> tuple[Tensor, Tensor]:
        if self.token == "class":
            logits = _tap(student_view, "logits", "student")
            return logits, logits
        return _tap(student_view, self.cls_tap, "student"), _tap(student_view, self.dist_tap, "student")

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        if batch.targets is None:
            raise ValueError("method 'deit' needs class labels (its class head learns them), but the batch has none")
        cls_logits, dist_logits = self._heads(student_view)
        teacher = _tap(teacher_view, "logits", "teacher").detach()
        mixed = getattr(batch, "mix_lam", None) is not None and getattr(batch, "mix_targets", None) is not None
        mix = {"mix_targets": batch.mix_targets, "mix_lam": batch.mix_lam} if mixed else {}
        if self.mode == "hard":
            return DF.deit_hard_loss(cls_logits, dist_logits, teacher, batch.targets, self.ce_weight,
                                     self.distill_weight, self.label_smoothing, **mix)
        return DF.deit_soft_loss(cls_logits, dist_logits, teacher, batch.targets, self.T, self.ce_weight,
                                 self.distill_weight, self.label_smoothing, **mix)

    def extra_repr(self) -> str:
        return (f"mode={self.mode!r}, token={self.token!r}, T={self.T}, ce_weight={self.ce_weight}, "
                f"distill_weight={self.distill_weight}, label_smoothing={self.label_smoothing}, weight={self.weight}")
