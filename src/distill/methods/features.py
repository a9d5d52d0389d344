"""Feature-based methods: losses on intermediate tapped tensors of the two networks.

Tap paths follow the model zoo: ``"stem"``, ``"stage1"`` … ``"stageN"`` (post-activation),
``"stageN.pre"`` (pre-activation), ``"pool"`` (B, D), ``"fc"`` (logits).
Each ``forward`` returns the *unweighted* loss; the math lives in :mod:`distill.functional`.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from distill import functional as DF
from distill.adapters import ShapeMismatchError, build_adapter, match_spatial
from distill.batch import Batch, View
from distill.methods._views import tap as _tap, tap_pairs
from distill.methods.base import Method, Paper, register




@register(
    "fitnet",
    "features",
    Paper(
        title="FitNets: Hints for Thin Deep Nets",
        authors="A. Romero, N. Ballas, S. E. Kahou, A. Chassang, C. Gatta, Y. Bengio",
        year=2015,
        arxiv="1412.6550",
        venue="ICLR",
    ),
)
class FitNet(Method):
    """FitNets hint loss: 1/2 ||u_h - r(v_g)||^2 per sample, mean over the batch.

    ``r`` is a trainable regressor (adapter) from the student's guided layer to the teacher's
    hint layer, built by :meth:`prepare`. The paper's stage-1 hint training (student up to the
    guided layer plus the regressor, trained with this loss alone) is the training loop's job;
    :meth:`hint_parameters` gives it the regressor's parameters.
    """

    requires_prepare = True  # the regressor is built from example shapes, before the optimizer

    def __init__(
        self,
        student_tap: str = "stage2",
        teacher_tap: str = "stage2",
        adapter: str = "conv1x1_bn",
        weight: float = 1.0,
        warmup_epochs: int = 0,
    ) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        self.student_tap, self.teacher_tap, self.adapter_kind = student_tap, teacher_tap, adapter
        self.student_taps = [student_tap]
        self.teacher_taps = [teacher_tap]
        self.regressor: nn.Module | None = None

    def prepare(self, student_view: View, teacher_view: View, batch: Batch) -> None:
        s = _tap(student_view, self.student_tap, "student")
        t = _tap(teacher_view, self.teacher_tap, "teacher")
        self.regressor = build_adapter(
            s, t, student_name=f"student:{self.student_tap}", teacher_name=f"teacher:{self.teacher_tap}",
            kind=self.adapter_kind,
        ).to(device=s.device, dtype=s.dtype)

    def hint_parameters(self) -> list[nn.Parameter]:
        """The regressor's parameters (empty before :meth:`prepare` or for an identity adapter)."""
        return [] if self.regressor is None else list(self.regressor.parameters())

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        if self.regressor is None:
            raise RuntimeError("FitNet.prepare() must be called on an example batch before the first forward")
        s = _tap(student_view, self.student_tap, "student")
        t = _tap(teacher_view, self.teacher_tap, "teacher").detach()
        return DF.fitnet_hint_loss(self.regressor(s), t)

    def extra_repr(self) -> str:
        return f"{self.student_tap} -> {self.teacher_tap}, adapter={self.adapter_kind}, weight={self.weight}"


@register(
    "at",
    "features",
    Paper(
        title="Paying More Attention to Attention: Improving the Performance of Convolutional Neural "
        "Networks via Attention Transfer",
        authors="S. Zagoruyko, N. Komodakis",
        year=2017,
        arxiv="1612.03928",
        venue="ICLR",
    ),
)
class AT(Method):
    """Attention transfer: beta/(2 B N_j) * sum_b || Q_S/||Q_S|| - Q_T/||Q_T|| ||_2 summed over layer pairs j.

    Q = vec(sum_c |A_c|^p) (:func:`distill.functional.attention_map`, :func:`distill.functional.at_loss`).
    Channel counts may differ. When the two taps' spatial sizes differ by an integer factor, the
    larger is average-pooled to the smaller (``match_spatial``), and ``pool`` says what is pooled:

    - ``"feature"`` (default): the (B, C, H, W) *feature map* is pooled, then its attention map
      is built, as RepDistiller, mdistiller and torchdistill do (the reference code,
      szagoruyko/attention-transfer, only pairs maps of equal size);
    - ``"attention"``: the attention map is built at full resolution and then pooled (this
      method's behaviour before issue 10).

    The two differ because pooling and ``|.|^p`` do not commute: pooling the feature first lets
    activations of opposite sign cancel inside a block, pooling the attention map does not. One
    sample, one channel, student 2x2 map [[1, 2], [-1, 2]], teacher 1x2 map [[1, 1]], p = 2,
    beta = 1000: ``"feature"`` gives Q_S = (0, 4) and a loss of 250 * 0.76537 = 191.34;
    ``"attention"`` gives Q_S = (1, 4) and 250 * 0.53386 = 133.47.
    """

    def __init__(
        self,
        pairs: Sequence[tuple[str, str]] = (("stage1", "stage1"), ("stage2", "stage2"), ("stage3", "stage3")),
        p: float = 2.0,
        beta: float = 1000.0,
        pool: str = "feature",
        weight: float = 1.0,
        warmup_epochs: int = 0,
    ) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        self.pairs = tap_pairs(pairs, "AT")
        if p <= 0:
            raise ValueError(f"p must be > 0, got {p}")
        if pool not in ("feature", "attention"):
            raise ValueError(f"pool must be 'feature' or 'attention', got {pool!r}")
        self.p, self.beta, self.pool = float(p), float(beta), pool
        self.student_taps = [s for s, _ in self.pairs]
        self.teacher_taps = [t for _, t in self.pairs]

    def _maps(self, student_view: View, teacher_view: View) -> tuple[list[Tensor], list[Tensor]]:
        qs_all, qt_all = [], []
        for s_path, t_path in self.pairs:
            s = _tap(student_view, s_path, "student")
            t = _tap(teacher_view, t_path, "teacher").detach()
            s_name, t_name = f"student:{s_path}", f"teacher:{t_path}"
            if s.dim() != 4 or t.dim() != 4:
                raise ShapeMismatchError(
                    f"attention transfer needs (B, C, H, W) feature maps: {s_name} {tuple(s.shape)}, "
                    f"{t_name} {tuple(t.shape)}"
                )
            if s.shape[0] != t.shape[0]:
                raise ShapeMismatchError(f"batch sizes differ: {s_name} {tuple(s.shape)}, {t_name} {tuple(t.shape)}")
            if self.pool == "feature":  # pool the feature maps, then build the attention maps
                s, t = match_spatial(s, t, student_name=s_name, teacher_name=t_name)
                qs, qt = DF.attention_map(s, self.p), DF.attention_map(t, self.p)
            else:  # build the attention maps at full resolution, then pool them
                qs, qt = match_spatial(
                    DF.attention_map(s, self.p), DF.attention_map(t, self.p), student_name=s_name, teacher_name=t_name
                )
            qs_all.append(qs)
            qt_all.append(qt)
        return qs_all, qt_all

    def prepare(self, student_view: View, teacher_view: View, batch: Batch) -> None:
        self._maps(student_view, teacher_view)  # fail early, naming the taps, if shapes cannot be matched

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        qs, qt = self._maps(student_view, teacher_view)
        return DF.at_loss(qs, qt, self.beta)

    def extra_repr(self) -> str:
        return f"pairs={self.pairs}, p={self.p}, beta={self.beta}, pool={self.pool!r}, weight={self.weight}"


__all__ = ["FitNet", "AT"]
