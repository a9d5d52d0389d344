"""Vision-language distillation from an object detector: KD-VLP's object knowledge distillation.

Each ``forward`` returns the *unweighted* loss; the math is
:func:`distill.functional.retrieval.object_distillation`.
"""

from __future__ import annotations

from torch import Tensor, nn

from distill.adapters import ShapeMismatchError
from distill.batch import Batch, View
from distill.functional import retrieval as FR
from distill.methods._views import tap as _tap
from distill.methods.base import Method, Paper, register

__all__ = ["KDVLP"]


@register(
    "kd_vlp",
    "vision_language",
    Paper(
        title="KD-VLP: Improving End-to-End Vision-and-Language Pretraining with Object Knowledge Distillation",
        authors="Y. Liu, C. Wu, S.-Y. Tseng, V. Lal, X. He, N. Duan",
        year=2022,
        arxiv="2109.10504",
        venue="Findings of NAACL",
    ),
)
class KDVLP(Method):
    r"""KD-VLP object knowledge distillation (object-guided masked vision modelling).

    .. math::
        L = w_f\,\tfrac{1}{ND}\sum_k \|W_f h_k - f^t_k\|^2 + w_l\,\tfrac1N\sum_k KL\big(p^t_k\,\|\,softmax(W_c h_k)\big)

    * ``h_k`` ``(B, K, Ds)``: the image-text student's output at object ``k``'s box (its grid
      features pooled inside the box after the multimodal encoder; ``student_key``);
    * ``f^t_k`` ``(B, K, Dt)`` and ``p^t_k`` ``(B, K, C)``: the detector teacher's RoI feature and
      class distribution for that box (``teacher_features`` / ``teacher_probs``);
    * ``W_f`` (``Ds → Dt``) and ``W_c`` (``Ds → C``): linear heads this method owns, built by
      :meth:`prepare` from the shapes of one example batch;
    * the mean runs over the ``N`` objects selected by ``mask_key`` (``(B, K)`` bool in the
      student view: the objects whose region was masked in the input), or over all objects.

    The paper's second pretext task (phrase–region alignment by the similarity of noun phrases
    and object labels) is not part of this method. Sources: the abstract (object features and
    their semantic labels from an external detector supervise an object-guided masked vision
    modelling task); the L2 feature regression and the KL to the detector's label distribution
    follow the task brief; unit weights are our choice, not read from the paper.
    """

    requires_prepare = True

    def __init__(self, feature_weight: float = 1.0, label_weight: float = 1.0, student_key: str = "regions",
                 teacher_features: str = "object_features", teacher_probs: str = "object_probs",
                 mask_key: str | None = None, weight: float = 1.0, warmup_epochs: int = 0) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        for name, w in (("feature_weight", feature_weight), ("label_weight", label_weight)):
            if not (isinstance(w, (int, float)) and w >= 0):
                raise ValueError(f"KD-VLP {name} must be a number >= 0, got {w!r}")
        if feature_weight == 0 and label_weight == 0:
            raise ValueError("KD-VLP: feature_weight and label_weight are both 0; nothing to distil")
        self.feature_weight, self.label_weight = float(feature_weight), float(label_weight)
        self.student_key, self.teacher_features, self.teacher_probs = student_key, teacher_features, teacher_probs
        self.mask_key = mask_key
        self.regressor: nn.Linear | None = None
        self.classifier: nn.Linear | None = None

    def _shapes(self, student_view: View, teacher_view: View) -> tuple[Tensor, Tensor, Tensor]:
        h = _tap(student_view, self.student_key, "student")
        f = _tap(teacher_view, self.teacher_features, "teacher")
        p = _tap(teacher_view, self.teacher_probs, "teacher")
        if h.dim() != 3 or f.dim() != 3 or p.dim() != 3 or not (h.shape[:2] == f.shape[:2] == p.shape[:2]):
            raise ShapeMismatchError(f"KD-VLP needs (B, K, .) student regions, teacher features and teacher "
                                     f"probabilities over the same objects; got {tuple(h.shape)}, {tuple(f.shape)}, "
                                     f"{tuple(p.shape)}")
        return h, f, p

    def prepare(self, student_view: View, teacher_view: View, batch: Batch) -> None:
        h, f, p = self._shapes(student_view, teacher_view)
        self.regressor = nn.Linear(h.shape[-1], f.shape[-1]).to(h.device)
        self.classifier = nn.Linear(h.shape[-1], p.shape[-1]).to(h.device)

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        h, f, p = self._shapes(student_view, teacher_view)
        if self.regressor is None or self.classifier is None:
            raise RuntimeError("KD-VLP heads are built by prepare(); call Distiller.prepare (or method.prepare) "
                               "on an example batch first")
        mask = None if self.mask_key is None else _tap(student_view, self.mask_key, "student")
        feat, label = FR.object_distillation(self.regressor(h), f, self.classifier(h), p, mask)
        return self.feature_weight * feat + self.label_weight * label
