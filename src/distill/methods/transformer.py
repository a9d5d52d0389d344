"""TaT: knowledge distillation via the target-aware transformer (one-to-all spatial matching).

``forward`` returns the *unweighted* loss; the math lives in :mod:`distill.functional`
(``distill/functional/transformer.py``). The teacher tensor is detached here; the linear
embeddings θ, γ, φ (1x1 conv + BatchNorm) are built by :meth:`TaT.prepare` from one example
batch, before the optimizer is made.
"""

from __future__ import annotations

from torch import Tensor, nn

from distill import functional as DF
from distill.adapters import ShapeMismatchError
from distill.batch import Batch, View
from distill.methods._views import check_maps as _check_maps, tap as _tap
from distill.methods.base import Method, Paper, register

_EMBEDS = ("conv1x1_bn", "identity")
_QUERIES = ("teacher", "student")


def _embed(c_in: int, c_out: int, kind: str, what: str) -> nn.Module:
    if kind == "identity":
        if c_in != c_out:
            raise ShapeMismatchError(f"embed='identity' needs equal channel counts, {what} has {c_in} -> {c_out}")
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))


@register(
    "tat",
    "features",
    Paper(
        title="Knowledge Distillation via the Target-aware Transformer",
        authors="S. Lin, H. Xie, B. Wang, K. Yu, X. Chang, X. Liang, G. Wang",
        year=2022,
        arxiv="2205.10793",
        venue="CVPR",
    ),
)
class TaT(Method):
    """Target-aware transformer: each teacher pixel matched to a similarity-weighted sum of all student pixels.

    .. math::
        f^{s'}_i = \\sum_j \\operatorname{softmax}_j\\big(\\langle\\theta(f^t)_i, \\gamma(f^s)_j\\rangle\\big)\\,
        \\varphi(f^s)_j, \\qquad L_{TaT} = \\lVert f^t - f^{s'} \\rVert^2

    θ (teacher side), γ and φ (student side) are the paper's linear functions, each a 1x1 conv +
    BatchNorm to the teacher's channel count (``embed="identity"`` skips them; channels must then
    agree). The θ embedding is trainable although the teacher is frozen: it reads the detached
    teacher map, as in the authors' code. Computed by :func:`distill.functional.tat_loss`.

    ``query="teacher"`` (default) follows the paper's per-pixel equations (§3.2): the weights of
    teacher pixel i are a softmax over *student* pixels j of ⟨θ(f^t_i), γ(f^s_j)⟩; the output has
    the teacher's layout, so student and teacher maps may even differ in spatial size.
    ``query="student"`` is the authors' code (sihaoevery/TaT, ``MaskedFM``): the row for position
    i is a softmax over teacher positions j of ⟨γ(f^s_i), θ(f^t_j)⟩ applied to φ(f^s)_j (a
    single head); spatial sizes must then agree.

    ``reduction="mean"`` is the code's ``nn.MSELoss`` scale (the paper writes the plain squared
    norm, ``"sum"``: per-sample sum, C·H·W times larger). Loss weight: the authors' ImageNet
    ResNet-34 → ResNet-18 config weights this term 0.2 (mean reduction) beside cross-entropy; the
    Method's ``weight`` defaults to 1.0, set it to taste.

    Not implemented: the paper's hierarchical variant for large maps — patch-group distillation
    (TaT within groups of spatial patches) and anchor-point distillation (TaT between pooled
    anchor maps) — only the one-to-all L_TaT on the whole map, the paper's form for the small
    last-stage maps of classification networks.
    """

    requires_prepare = True  # θ, γ, φ are built from example shapes

    def __init__(
        self,
        student_tap: str = "stage3",
        teacher_tap: str = "stage3",
        query: str = "teacher",
        embed: str = "conv1x1_bn",
        temperature: float = 1.0,
        reduction: str = "mean",
        weight: float = 1.0,
        warmup_epochs: int = 0,
    ) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        if query not in _QUERIES:
            raise ValueError(f"query must be one of {_QUERIES}, got {query!r}")
        if embed not in _EMBEDS:
            raise ValueError(f"embed must be one of {_EMBEDS}, got {embed!r}")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.student_tap, self.teacher_tap = str(student_tap), str(teacher_tap)
        self.query, self.embed = query, embed
        self.temperature, self.reduction = float(temperature), reduction
        self.student_taps = [self.student_tap]
        self.teacher_taps = [self.teacher_tap]
        self.theta: nn.Module | None = None  # teacher embedding
        self.gamma: nn.Module | None = None  # student embedding compared with the teacher's
        self.phi: nn.Module | None = None  # student embedding that is recombined

    def _pair(self, student_view: View, teacher_view: View) -> tuple[Tensor, Tensor]:
        s = _tap(student_view, self.student_tap, "student")
        t = _tap(teacher_view, self.teacher_tap, "teacher").detach()
        s_name, t_name = f"student:{self.student_tap}", f"teacher:{self.teacher_tap}"
        _check_maps(s, t, s_name, t_name, "TaT")
        if self.query == "student" and s.shape[2:] != t.shape[2:]:
            raise ShapeMismatchError(
                f"TaT with query='student' needs equal spatial sizes: {s_name} {tuple(s.shape)}, "
                f"{t_name} {tuple(t.shape)}; use query='teacher' or tap layers of the same size"
            )
        return s, t

    def prepare(self, student_view: View, teacher_view: View, batch: Batch) -> None:
        if self.theta is not None:
            return
        s, t = self._pair(student_view, teacher_view)
        cs, ct = s.shape[1], t.shape[1]
        parts = (
            _embed(ct, ct, self.embed, "theta (teacher)"),
            _embed(cs, ct, self.embed, "gamma (student)"),
            _embed(cs, ct, self.embed, "phi (student)"),
        )
        self.theta, self.gamma, self.phi = (p.to(device=s.device, dtype=s.dtype) for p in parts)

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        if self.theta is None or self.gamma is None or self.phi is None:
            raise RuntimeError("TaT.prepare() must be called on an example batch before the first forward")
        s, t = self._pair(student_view, teacher_view)
        t_emb, s_emb, value = self.theta(t), self.gamma(s), self.phi(s)
        if self.query == "teacher":
            return DF.tat_loss(t_emb, s_emb, value, t, self.temperature, self.reduction)
        return DF.tat_loss(s_emb, t_emb, value, t, self.temperature, self.reduction)

    def extra_repr(self) -> str:
        return (f"student_tap={self.student_tap!r}, teacher_tap={self.teacher_tap!r}, query={self.query!r}, "
                f"embed={self.embed!r}, temperature={self.temperature}, reduction={self.reduction!r}, "
                f"weight={self.weight}")
