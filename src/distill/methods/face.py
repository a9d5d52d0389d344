"""Face-verification distillation methods (issue 17, part G): DDL and neuron selection.

The math lives in :mod:`distill.functional.face`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from distill import functional as DF
from distill.adapters import build_adapter
from distill.batch import Batch, View
from distill.methods._views import tap as _tap
from distill.methods.base import Method, Paper, register


@register(
    "ddl",
    "face",
    Paper(
        title="Improving Face Recognition from Hard Samples via Distribution Distillation Loss",
        authors="Y. Huang, P. Shen, Y. Tai, S. Li, X. Liu, J. Li, F. Huang, R. Ji",
        year=2020,
        arxiv="2002.03662",
        venue="ECCV",
    ),
)
class DDL(Method):
    """Distribution Distillation Loss: the teacher's positive/negative similarity histograms (easy samples)
    distilled into the student's (hard samples), plus the order loss (:func:`distill.functional.ddl_loss`).

    Reads the embedding tap ``tap`` of both views, ``(B, D)`` each (the penultimate feature ``pool`` of the
    zoo's CNNs), and the identities ``batch.targets`` ``(B,)``. Positive pairs: every pair of one identity
    in the batch; negatives: each sample's hardest negative (largest similarity to another identity), as
    the authors' code (TFace ``torchkit/loss/ddl.py``) takes the row maximum. The batch must hold at least
    two images of some identity (a P identities x K images sampler).

    Easy versus hard samples: give the teacher view from easy inputs and the student view from hard ones
    (e.g. clean and degraded images of the same identities, as ``benchmarks/face_fewshot_longtail.py``
    does). The paper uses one network for both (teacher distribution from its own easy samples, without
    gradient); a frozen teacher network in the teacher view is our library's form of it.

    Defaults: the KL weights 0.1 (positive) and 0.02 (negative), the order weight 0.5, the bins
    0, 0.001, ..., 0.999 and the kernel width 0.1 come from the authors' code (the paper's experiment
    section could not be read here); the paper trains with ArcFace beside it (our benchmark uses
    cross-entropy on the training identities).
    """

    needs_targets = True

    def __init__(self, tap: str = "pool", teacher_tap: str | None = None, pos_kl_weight: float = 0.1,
                 neg_kl_weight: float = 0.02, order_weight: float = 0.5, sigma: float = 0.1,
                 weight: float = 1.0, warmup_epochs: int = 0) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        for name, value in (("pos_kl_weight", pos_kl_weight), ("neg_kl_weight", neg_kl_weight),
                            ("order_weight", order_weight)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0; got {value}")
        if sigma <= 0:
            raise ValueError(f"sigma must be > 0; got {sigma}")
        self.tap, self.teacher_tap = tap, teacher_tap or tap
        self.pos_kl_weight, self.neg_kl_weight = float(pos_kl_weight), float(neg_kl_weight)
        self.order_weight, self.sigma = float(order_weight), float(sigma)
        self.student_taps = [] if tap == "logits" else [tap]
        self.teacher_taps = [] if self.teacher_tap == "logits" else [self.teacher_tap]

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        if batch.targets is None:
            raise ValueError("DDL needs identities: batch.targets (B,)")
        s = _tap(student_view, self.tap, "student").flatten(1)
        t = _tap(teacher_view, self.teacher_tap, "teacher").detach().flatten(1)
        sp, sn = DF.ddl_pair_similarities(s, batch.targets)
        with torch.no_grad():
            tp, tn = DF.ddl_pair_similarities(t, batch.targets)
        return DF.ddl_loss(sp, sn, tp, tn, pos_kl_weight=self.pos_kl_weight, neg_kl_weight=self.neg_kl_weight,
                           order_weight=self.order_weight, sigma=self.sigma)

    def extra_repr(self) -> str:
        return (f"tap={self.tap!r}, pos_kl_weight={self.pos_kl_weight}, neg_kl_weight={self.neg_kl_weight}, "
                f"order_weight={self.order_weight}, sigma={self.sigma}")


@register(
    "neuron_selection",
    "face",
    Paper(
        title="Face Model Compression by Distilling Knowledge from Neurons",
        authors="P. Luo, Z. Zhu, Z. Liu, X. Wang, X. Tang",
        year=2016,
        arxiv=None,
        venue="AAAI",
    ),
)
class NeuronSelection(Method):
    """The student's top hidden layer regresses the teacher's *selected* top-layer neurons
    (:func:`distill.functional.neuron_regression_loss`, ``1/2B sum ||s - t_I||^2``).

    ``indices`` come from :func:`distill.functional.select_neurons` on the teacher's features of the training
    set and attribute labels (informative of the attributes, little correlated with each other); None uses
    every neuron. Reads the tap ``tap`` of the student ``(B, D_s)`` and ``teacher_tap`` of the teacher
    ``(B, D_t)``; when ``D_s`` differs from the number of selected neurons a linear adapter (built by
    :meth:`prepare`) maps the student's features to it. The paper's student has a top layer as wide as the
    selection, regressed directly, and no label loss.

    Source: only the paper's abstract and project page could be read here. The selection's terms (mean
    absolute correlation with the attributes; absolute correlation between neurons), the greedy minimisation
    of the selection energy and ``pairwise_weight = 1`` are our reading of "neurons informative of identity attributes, with low
    correlation"; the regression is the paper's. The paper selects from DeepID2+'s 512 neurons with
    CelebA's 40 attributes; our benchmark selects from a CNN's pooled features with the digit classes as
    identity attributes.
    """

    requires_prepare = True

    def __init__(self, indices: list[int] | Tensor | None = None, tap: str = "pool", teacher_tap: str | None = None,
                 weight: float = 1.0, warmup_epochs: int = 0) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        idx = None if indices is None else torch.as_tensor(indices, dtype=torch.long).flatten()
        if idx is not None and (idx.numel() == 0 or len(idx.unique()) != len(idx) or (idx < 0).any()):
            raise ValueError(f"indices must be distinct neuron indices >= 0; got {indices!r}")
        self.register_buffer("indices", idx)
        self.tap, self.teacher_tap = tap, teacher_tap or tap
        self.student_taps, self.teacher_taps = [tap], [self.teacher_tap]
        self.adapter: nn.Module | None = None

    def _pair(self, student_view: View, teacher_view: View) -> tuple[Tensor, Tensor]:
        s = _tap(student_view, self.tap, "student").flatten(1)
        t = _tap(teacher_view, self.teacher_tap, "teacher").detach().flatten(1)
        if self.indices is not None and int(self.indices.max()) >= t.shape[1]:
            raise ValueError(f"neuron index {int(self.indices.max())} is out of range: the teacher's tap "
                             f"{self.teacher_tap!r} has {t.shape[1]} neurons")
        return s, t

    def prepare(self, student_view: View, teacher_view: View, batch: Batch) -> None:
        if self.adapter is not None:
            return
        s, t = self._pair(student_view, teacher_view)
        k = t.shape[1] if self.indices is None else len(self.indices)
        self.adapter = (nn.Identity() if s.shape[1] == k else build_adapter(
            s, t[:, :k], student_name=f"student:{self.tap}", teacher_name=f"teacher:{self.teacher_tap}",
            kind="linear").to(device=s.device, dtype=s.dtype))

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        if self.adapter is None:
            raise RuntimeError("NeuronSelection.prepare() must be called on an example batch before the first forward")
        s, t = self._pair(student_view, teacher_view)
        return DF.neuron_regression_loss(self.adapter(s), t, self.indices)
