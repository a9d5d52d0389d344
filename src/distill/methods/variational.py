"""VID and factor transfer: feature methods with a learnt model between the two networks.

* ``"vid"``: variational information distillation (Ahn et al., CVPR 2019). Per tap pair, a 1x1-conv
  regressor predicts the teacher's feature from the student's, with a learnt per-channel
  variance; the loss is the Gaussian negative log-likelihood of the teacher's feature.
* ``"ft"``: factor transfer (Kim, Park, Kwak, NeurIPS 2018). A paraphraser (conv autoencoder on
  the teacher's last feature map) is first pre-trained to reconstruct it (``"ft_paraphraser"``,
  sharing the paraphraser with its :class:`FT`), then frozen; a translator on the student's
  feature learns to match the paraphraser's normalised factor.

Each ``forward`` returns the *unweighted* loss; the math lives in :mod:`distill.functional`.
Teacher tensors are detached here.
"""

from __future__ import annotations

from collections.abc import Sequence
import torch
from torch import Tensor, nn

from distill import functional as DF
from distill.adapters import ShapeMismatchError, match_spatial
from distill.batch import Batch, View
from distill.methods._views import tap as _tap, module_key as _key, tap_pairs
from distill.methods.base import Method, Paper, register






def _match(s: Tensor, t: Tensor, s_name: str, t_name: str, what: str) -> tuple[Tensor, Tensor]:
    """Check ranks and batch sizes; for maps, average-pool the larger spatial size to the smaller."""
    if s.shape[0] != t.shape[0]:
        raise ShapeMismatchError(f"batch sizes differ: {s_name} {tuple(s.shape)}, {t_name} {tuple(t.shape)}")
    if s.dim() != t.dim() or s.dim() not in (2, 4):
        raise ShapeMismatchError(
            f"{what} needs two (B, C, H, W) feature maps or two (B, D) vectors: {s_name} {tuple(s.shape)}, "
            f"{t_name} {tuple(t.shape)}"
        )
    if s.dim() == 4:
        return match_spatial(s, t, student_name=s_name, teacher_name=t_name)
    return s, t


# ============================================================================================
# VID
# ============================================================================================


def vid_regressor(in_channels: int, mid_channels: int, out_channels: int, *, maps: bool = True) -> nn.Sequential:
    """VID's mean regressor μ(·): three 1x1 convolutions (bias-free) with ReLU between them.

    The architecture of the authors' code (and RepDistiller's ``VIDLoss``): the paper only asks
    for a per-position function of the student's feature. For ``(B, D)`` vectors (``maps=False``)
    the same network with linear layers.
    """

    def layer(i: int, o: int) -> nn.Module:
        return nn.Conv2d(i, o, kernel_size=1, bias=False) if maps else nn.Linear(i, o, bias=False)

    return nn.Sequential(
        layer(in_channels, mid_channels), nn.ReLU(),
        layer(mid_channels, mid_channels), nn.ReLU(),
        layer(mid_channels, out_channels),
    )


@register(
    "vid",
    "features",
    Paper(
        title="Variational Information Distillation for Knowledge Transfer",
        authors="S. Ahn, S. X. Hu, A. Damianou, N. D. Lawrence, Z. Dai",
        year=2019,
        arxiv="1904.05835",
        venue="CVPR",
    ),
)
class VID(Method):
    """Variational information distillation: Gaussian NLL of the teacher's features given the student's, per tap pair.

    For each pair k: ``sum_{c,h,w} [log σ_c + (t - μ(s))² / (2 σ_c²)]``, mean over the batch, summed
    over pairs; μ is a 1x1-conv regressor (:func:`vid_regressor`, hidden width ``mid_channels``,
    default the teacher's channel count as in RepDistiller) and ``σ_c² = softplus(α_c) + eps`` a
    learnt per-channel variance, initialised to ``init_pred_var``. When spatial sizes differ by
    an integer factor the larger map is average-pooled to the smaller first (the authors' code
    does the same). Both regressor and variances are trained with the student.

    ``reduction="sum"`` is the paper's normalisation; the authors' code and RepDistiller average
    over all B·C·H·W elements instead (``reduction="mean"``, = the paper's value / (C·H·W) per
    pair), with weight 1: use ``reduction="mean"`` to reproduce RepDistiller's scale.

    Defaults: the paper's text could not be read here (arXiv 1904.05835, abstract only). The
    variance parametrisation σ² = softplus(α) + ε with ε = 1e-5, σ² initialised to 5.0, the
    three-1x1-conv regressor and weight 1 per pair are those of RepDistiller
    ``distiller_zoo/VID.py`` (``init_pred_var=5.0, eps=1e-5``; "code from author",
    ssahn0215/variational-information-distillation, not available here) and its ``-b 1``.
    All λ_k are equal (the method's ``weight``).
    """

    requires_prepare = True  # regressors and variances are sized from example shapes

    def __init__(
        self,
        pairs: Sequence[tuple[str, str]] = (("stage1", "stage1"), ("stage2", "stage2"), ("stage3", "stage3")),
        init_pred_var: float = 5.0,
        eps: float = 1e-5,
        mid_channels: int | None = None,
        reduction: str = "sum",
        weight: float = 1.0,
        warmup_epochs: int = 0,
    ) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        self.pairs = tap_pairs(pairs, "VID")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if init_pred_var <= eps:
            raise ValueError(f"init_pred_var must exceed eps={eps}, got {init_pred_var}")
        if mid_channels is not None and mid_channels < 1:
            raise ValueError(f"mid_channels must be >= 1 or None, got {mid_channels}")
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' (the paper) or 'mean' (RepDistiller), got {reduction!r}")
        self.init_pred_var, self.eps = float(init_pred_var), float(eps)
        self.mid_channels, self.reduction = mid_channels, reduction
        self.student_taps = list(dict.fromkeys(s for s, _ in self.pairs))
        self.teacher_taps = list(dict.fromkeys(t for _, t in self.pairs))
        self.regressors = nn.ModuleDict()
        self.alphas = nn.ParameterDict()

    def _name(self, s_path: str, t_path: str) -> str:
        return f"{_key(s_path)}__{_key(t_path)}"

    def _features(self, student_view: View, teacher_view: View) -> list[tuple[str, Tensor, Tensor]]:
        out = []
        for s_path, t_path in self.pairs:
            s = _tap(student_view, s_path, "student")
            t = _tap(teacher_view, t_path, "teacher").detach()
            s, t = _match(s, t, f"student:{s_path}", f"teacher:{t_path}", "VID")
            out.append((self._name(s_path, t_path), s, t))
        return out

    def prepare(self, student_view: View, teacher_view: View, batch: Batch) -> None:
        for name, s, t in self._features(student_view, teacher_view):
            if name in self.regressors:
                continue
            cs, ct = s.shape[1], t.shape[1]
            mid = self.mid_channels or ct
            self.regressors[name] = vid_regressor(cs, mid, ct, maps=s.dim() == 4).to(device=s.device, dtype=s.dtype)
            alpha = torch.full((ct,), DF.vid_alpha_for_variance(self.init_pred_var, self.eps),
                               device=s.device, dtype=s.dtype)
            self.alphas[name] = nn.Parameter(alpha)

    def variances(self) -> dict[str, Tensor]:
        """Each pair's current σ² (C,), keyed ``"<student>__<teacher>"``."""
        return {name: DF.vid_variance(a, self.eps) for name, a in self.alphas.items()}

    def log_values(self) -> dict[str, float]:
        """Mean σ² per pair, logged by ``fit`` each epoch (the variances are learnt)."""
        with torch.no_grad():
            return {f"var_{name}": float(v.mean()) for name, v in self.variances().items()}

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        if not self.regressors:
            raise RuntimeError("VID.prepare() must be called on an example batch before the first forward")
        means, targets, variances = [], [], []
        for name, s, t in self._features(student_view, teacher_view):
            means.append(self.regressors[name](s))
            targets.append(t)
            variances.append(DF.vid_variance(self.alphas[name], self.eps))
        return DF.vid_loss(means, targets, variances, self.reduction)

    def extra_repr(self) -> str:
        return (f"pairs={self.pairs}, init_pred_var={self.init_pred_var}, eps={self.eps}, "
                f"reduction={self.reduction}, weight={self.weight}")


# ============================================================================================
# Factor transfer
# ============================================================================================


def _conv_block(i: int, o: int, bn: bool, transpose: bool = False) -> list[nn.Module]:
    conv = nn.ConvTranspose2d(i, o, 3, 1, 1) if transpose else nn.Conv2d(i, o, 3, 1, 1)
    return [conv, *([nn.BatchNorm2d(o)] if bn else []), nn.LeakyReLU(0.1)]


class Paraphraser(nn.Module):
    """FT's paraphraser: a convolutional autoencoder on the teacher's feature map.

    Encoder: three 3x3 convolutions (C → C → k·C → k·C), decoder: three 3x3 transposed
    convolutions back (k·C → k·C → C → C), each followed by LeakyReLU(0.1); stride 1, so the
    factor keeps the feature's H×W. ``k`` is the factor rate (paper: 0.5). No BatchNorm by
    default, as in the authors' code (``use_bn=False``): the frozen paraphraser then gives the
    same factor in train and eval mode.
    """

    def __init__(self, channels: int, factor_rate: float = 0.5, use_bn: bool = False) -> None:
        super().__init__()
        k = max(1, int(channels * factor_rate))
        self.channels, self.factor_channels = channels, k
        self.encoder = nn.Sequential(*_conv_block(channels, channels, use_bn), *_conv_block(channels, k, use_bn),
                                     *_conv_block(k, k, use_bn))
        self.decoder = nn.Sequential(*_conv_block(k, k, use_bn, True), *_conv_block(k, channels, use_bn, True),
                                     *_conv_block(channels, channels, use_bn, True))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(factor, reconstruction)``."""
        factor = self.encoder(x)
        return factor, self.decoder(factor)


class Translator(nn.Sequential):
    """FT's translator: three 3x3 convolutions (C_s → C_s → k·C_t → k·C_t), each with BatchNorm
    and LeakyReLU(0.1), mapping the student's feature to the paraphraser's factor size."""

    def __init__(self, in_channels: int, factor_channels: int, use_bn: bool = True) -> None:
        super().__init__(*_conv_block(in_channels, in_channels, use_bn),
                         *_conv_block(in_channels, factor_channels, use_bn),
                         *_conv_block(factor_channels, factor_channels, use_bn))


_FT_PAPER = Paper(
    title="Paraphrasing Complex Network: Network Compression via Factor Transfer",
    authors="J. Kim, S. Park, N. Kwak",
    year=2018,
    arxiv="1802.04977",
    venue="NeurIPS",
)


def _check_map(t: Tensor, name: str) -> None:
    if t.dim() != 4:
        raise ShapeMismatchError(f"factor transfer needs a (B, C, H, W) feature map: {name} {tuple(t.shape)}")


@register("ft", "features", _FT_PAPER)
class FT(Method):
    """Factor transfer: mean over the batch of || F_T/||F_T||_2 - F_S/||F_S||_2 ||_p with a frozen paraphraser.

    ``F_T`` = the paraphraser's encoder on the teacher's ``teacher_tap`` (the last feature map),
    ``F_S`` = the translator on the student's ``student_tap``; p = 1 (the paper). The paraphraser
    must be pre-trained first (the paper's first stage) with ``"ft_paraphraser"``, which shares
    it (see :meth:`paraphraser_loss`); during transfer it is frozen: it runs under ``no_grad``
    and its parameters get ``requires_grad=False`` from :meth:`prepare` and each epoch start.
    The translator trains with the student. Factor spatial sizes that differ by an integer
    factor are average-pooled to the smaller one.

    Defaults k = 0.5, p = 1, ``reduction="mean"``, weight β = 500: the paper's text could not be
    read here (arXiv 1802.04977, abstract only); these are the authors' code
    (Jangho-Kim/Factor-Transfer-pytorch ``train_student.py``: ``--rate 0.5``, ``--beta 500``,
    ``BETA * nn.L1Loss()(FT(factor_s), FT(factor_t))``), i.e. the L1 distance of the normalised
    factors averaged over their B·D entries. ``reduction="sum"`` is the per-sample norm as the
    paper writes it: D (= C'·H·W) times larger, so β must shrink accordingly
    (:func:`distill.functional.ft_factor_loss`). RepDistiller's ``-b 200`` weights a different,
    attention-map-like factor loss and does not carry over. The authors' translator and
    paraphraser have no BatchNorm; :class:`Translator` keeps RepDistiller's (``use_bn=True``).

    Protocol (RepDistiller: 30 pre-training epochs, SGD lr 0.01 for ResNet/WRN students, 0.05
    otherwise; its reconstruction loss is ``nn.MSELoss``, i.e. ``reduction="mean"``)::

        ft = FT()
        pre = Distiller(student, teacher, {"ft_paraphraser": ft.paraphraser_loss()})
        fit_hint_stage(pre, loader, method="ft_paraphraser", epochs=30, lr=0.01)
        fit(Distiller(student, teacher, {"ce": 1.0, "ft": ft}), loader, ...)
    """

    requires_prepare = True  # paraphraser and translator are sized from example shapes
    stages = ("ft_paraphraser",)  # the paper's first stage: fit_hint_stage(d, loader, method="ft_paraphraser")

    def __init__(
        self,
        student_tap: str = "stage3",
        teacher_tap: str = "stage3",
        factor_rate: float = 0.5,
        p: float = 1.0,
        reduction: str = "mean",
        weight: float = 500.0,
        warmup_epochs: int = 0,
    ) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        if not 0.0 < factor_rate:
            raise ValueError(f"factor_rate must be > 0, got {factor_rate}")
        if p <= 0:
            raise ValueError(f"p must be > 0, got {p}")
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'mean' (the authors' code) or 'sum' (the paper's per-sample norm), "
                             f"got {reduction!r}")
        self.student_tap, self.teacher_tap = str(student_tap), str(teacher_tap)
        self.factor_rate, self.p, self.reduction = float(factor_rate), float(p), reduction
        self.student_taps = [self.student_tap]
        self.teacher_taps = [self.teacher_tap]
        self.paraphraser: Paraphraser | None = None
        self.translator: Translator | None = None

    # ------------------------------------------------------------------ parts
    def build_paraphraser(self, teacher_feature: Tensor) -> Paraphraser:
        """The paraphraser, built from one teacher feature map the first time (idempotent)."""
        _check_map(teacher_feature, f"teacher:{self.teacher_tap}")
        if self.paraphraser is None:
            self.paraphraser = Paraphraser(teacher_feature.shape[1], self.factor_rate).to(
                device=teacher_feature.device, dtype=teacher_feature.dtype)
        elif self.paraphraser.channels != teacher_feature.shape[1]:
            raise ShapeMismatchError(
                f"the paraphraser was built for {self.paraphraser.channels} channels, but "
                f"teacher:{self.teacher_tap} has {tuple(teacher_feature.shape)}"
            )
        return self.paraphraser

    def freeze_paraphraser(self, frozen: bool = True) -> None:
        """Set the paraphraser's ``requires_grad`` to ``not frozen`` (no-op before it exists).

        Freezing also drops gradients left over from pre-training's last step.
        """
        if self.paraphraser is not None:
            self.paraphraser.requires_grad_(not frozen)
            if frozen:
                for p in self.paraphraser.parameters():
                    p.grad = None

    def stage_method(self, name: str) -> Method:
        """``"ft_paraphraser"``: the paraphraser's pre-training loss, sharing this FT's paraphraser."""
        if name != "ft_paraphraser":
            return super().stage_method(name)
        return self.paraphraser_loss()

    def paraphraser_loss(self, reduction: str = "sum", weight: float = 1.0) -> FTParaphraser:
        """A ``"ft_paraphraser"`` method bound to this FT's paraphraser (same module, same weights)."""
        return FTParaphraser(teacher_tap=self.teacher_tap, factor_rate=self.factor_rate, reduction=reduction,
                             weight=weight, ft=self)

    def _features(self, student_view: View, teacher_view: View) -> tuple[Tensor, Tensor]:
        s = _tap(student_view, self.student_tap, "student")
        t = _tap(teacher_view, self.teacher_tap, "teacher").detach()
        _check_map(s, f"student:{self.student_tap}")
        _check_map(t, f"teacher:{self.teacher_tap}")
        if s.shape[0] != t.shape[0]:
            raise ShapeMismatchError(
                f"batch sizes differ: student:{self.student_tap} {tuple(s.shape)}, "
                f"teacher:{self.teacher_tap} {tuple(t.shape)}"
            )
        return s, t

    def prepare(self, student_view: View, teacher_view: View, batch: Batch) -> None:
        s, t = self._features(student_view, teacher_view)
        paraphraser = self.build_paraphraser(t)
        if self.translator is None:
            self.translator = Translator(s.shape[1], paraphraser.factor_channels).to(device=s.device, dtype=s.dtype)
        match_spatial(s[:, :1], t[:, :1], student_name=f"student:{self.student_tap}",
                      teacher_name=f"teacher:{self.teacher_tap}")  # fail early if factors cannot be compared
        self.freeze_paraphraser()

    def on_epoch_start(self, epoch: int, total_epochs: int | None = None) -> None:
        super().on_epoch_start(epoch, total_epochs)
        self.freeze_paraphraser()  # pre-training (ft_paraphraser) may have unfrozen it

    def factors(self, student_view: View, teacher_view: View) -> tuple[Tensor, Tensor]:
        """``(F_S, F_T)``: translator(student), frozen paraphraser encoder(teacher), spatially matched."""
        if self.paraphraser is None or self.translator is None:
            raise RuntimeError("FT.prepare() must be called on an example batch before the first forward")
        s, t = self._features(student_view, teacher_view)
        with torch.no_grad():
            factor_t = self.paraphraser.encoder(t)
        factor_s = self.translator(s)
        return match_spatial(factor_s, factor_t, student_name=f"student:{self.student_tap}",
                             teacher_name=f"teacher:{self.teacher_tap}")

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        factor_s, factor_t = self.factors(student_view, teacher_view)
        return DF.ft_factor_loss(factor_s, factor_t, self.p, self.reduction)

    def extra_repr(self) -> str:
        return (f"{self.student_tap} -> {self.teacher_tap}, factor_rate={self.factor_rate}, p={self.p}, "
                f"reduction={self.reduction}, weight={self.weight}")


@register("ft_paraphraser", "features", _FT_PAPER)
class FTParaphraser(Method):
    """FT's first stage: the paraphraser's reconstruction loss (1/B) sum_b ||x_b - P(x_b)||^2 on the teacher's feature.

    Trains only the paraphraser (the student gets no gradient: it reads no student tap). Build
    it with :meth:`FT.paraphraser_loss` so it shares the paraphraser of the :class:`FT` used
    afterwards; built alone (``create_method("ft_paraphraser")``) it owns a fresh :class:`FT`,
    reachable as :attr:`ft`. While this method trains (its :meth:`prepare` and each epoch start)
    the paraphraser's parameters require grad; :class:`FT` freezes them again.
    ``reduction="sum"`` is the paper's squared norm per sample; RepDistiller's ``nn.MSELoss`` is
    ``reduction="mean"`` (÷ C·H·W). The authors' code trains the paraphraser with ``nn.L1Loss``
    (mean absolute error) instead, lr 0.1 for ``--epoch 5`` (Jangho-Kim/Factor-Transfer-pytorch
    ``train_Paraphraser.py``).
    """

    requires_prepare = True

    def __init__(
        self,
        teacher_tap: str = "stage3",
        factor_rate: float = 0.5,
        reduction: str = "sum",
        weight: float = 1.0,
        warmup_epochs: int = 0,
        ft: FT | None = None,
    ) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' (the paper) or 'mean' (RepDistiller), got {reduction!r}")
        if ft is None:
            ft = FT(teacher_tap=teacher_tap, factor_rate=factor_rate)
        elif ft.teacher_tap != teacher_tap or ft.factor_rate != factor_rate:
            raise ValueError(
                f"teacher_tap/factor_rate ({teacher_tap!r}, {factor_rate}) disagree with the FT's "
                f"({ft.teacher_tap!r}, {ft.factor_rate}); use ft.paraphraser_loss()"
            )
        object.__setattr__(self, "_ft", ft)  # a plain reference: the FT's translator is not ours to train
        self.teacher_tap, self.factor_rate, self.reduction = str(teacher_tap), float(factor_rate), reduction
        self.teacher_taps = [self.teacher_tap]
        self.paraphraser: Paraphraser | None = ft.paraphraser

    @property
    def ft(self) -> FT:
        """The :class:`FT` whose paraphraser this loss trains."""
        return self._ft

    def prepare(self, student_view: View, teacher_view: View, batch: Batch) -> None:
        t = _tap(teacher_view, self.teacher_tap, "teacher")
        self.paraphraser = self._ft.build_paraphraser(t)
        self._ft.freeze_paraphraser(False)

    def on_epoch_start(self, epoch: int, total_epochs: int | None = None) -> None:
        super().on_epoch_start(epoch, total_epochs)
        self._ft.freeze_paraphraser(False)

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        if self.paraphraser is None:
            raise RuntimeError("FTParaphraser.prepare() must be called on an example batch before the first forward")
        t = _tap(teacher_view, self.teacher_tap, "teacher").detach()
        _check_map(t, f"teacher:{self.teacher_tap}")
        _, reconstruction = self.paraphraser(t)
        return DF.ft_reconstruction_loss(reconstruction, t, self.reduction)

    def extra_repr(self) -> str:
        return f"teacher:{self.teacher_tap}, factor_rate={self.factor_rate}, reduction={self.reduction}, " \
               f"weight={self.weight}"


__all__ = ["VID", "FT", "FTParaphraser", "Paraphraser", "Translator", "vid_regressor"]
