"""Four feature-map methods: CWD, MGD, SimKD and SemCKD.

Each ``forward`` returns the *unweighted* loss; the math lives in :mod:`distill.functional`
(``distill/functional/channels.py``). Teacher tensors are detached here. Trainable parts
(adapters, generation block, projectors, query/key embeddings) are built by :meth:`prepare`
from one example batch, before the optimizer is made.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill import functional as DF
from distill.adapters import ShapeMismatchError, build_adapter, match_spatial
from distill.batch import Batch, View
from distill.methods._views import tap as _tap, tap_pairs as _pairs, check_maps as _check_maps
from distill.methods.base import Method, Paper, register








def _channel_align(s: Tensor, t: Tensor, s_name: str, t_name: str) -> nn.Module:
    """Identity when the shapes agree, else a 1x1 conv (with bias), as CWD's and MGD's code; maps of
    different resolution get the resampling conv of :func:`distill.adapters.resampling_conv` instead."""
    if s.shape[1:] == t.shape[1:]:
        return nn.Identity()
    return build_adapter(s, t, student_name=s_name, teacher_name=t_name, kind="conv1x1")




# ============================================================================================
# CWD
# ============================================================================================


@register(
    "cwd",
    "features",
    Paper(
        title="Channel-wise Knowledge Distillation for Dense Prediction",
        authors="C. Shu, Y. Liu, J. Gao, Z. Yan, C. Shen",
        year=2021,
        arxiv="2011.13256",
        venue="ICCV",
    ),
)
class CWD(Method):
    """Channel-wise distillation: τ²/C Σ_c KL(softmax(T_c/τ) ‖ softmax(S_c/τ)) over positions, summed over pairs.

    Each channel's map is turned into a distribution over its H·W positions. When channel counts
    differ the student passes through a 1x1 conv (built by :meth:`prepare`); a student map of
    another resolution gets the resampling conv of :func:`distill.adapters.resampling_conv`
    instead (an error when no integer factor bridges them). The paper distils dense-prediction outputs (segmentation logits, detection heads);
    for classifiers the natural tap is the last feature map (the default).

    Defaults: τ = 4 is the authors' semantic-segmentation setting (official TorchDistiller
    ``SemSeg-distill/README.md``: ``bash exp_cwd.sh channel kl 3 4``, i.e. loss weight 3, τ = 4 on
    PSPNet's Cityscapes logits; the paper's text could not be read here). Their detection code
    (pppppM/mmdetection-distiller ``cwd_retina_rx101_64x4d_distill_retina_r50_fpn_2x_coco.py``)
    uses τ = 1, weight 5 on the FPN levels. Classification is not in the paper: τ = 4 and
    ``weight = 1`` (recipes set the protocol's weight; use ``weight=3`` for the paper's
    segmentation setting).
    """

    requires_prepare = True  # the 1x1 conv (when channels differ) is built before the optimizer

    def __init__(
        self,
        pairs: Sequence[tuple[str, str]] = (("stage3", "stage3"),),
        tau: float = 4.0,
        weight: float = 1.0,
        warmup_epochs: int = 0,
    ) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        self.pairs = _pairs(pairs, "CWD")
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.tau = float(tau)
        self.student_taps = [s for s, _ in self.pairs]
        self.teacher_taps = [t for _, t in self.pairs]
        self.align: nn.ModuleList | None = None

    def _features(self, student_view: View, teacher_view: View) -> list[tuple[Tensor, Tensor, str, str]]:
        out = []
        for s_path, t_path in self.pairs:
            s = _tap(student_view, s_path, "student")
            t = _tap(teacher_view, t_path, "teacher").detach()
            s_name, t_name = f"student:{s_path}", f"teacher:{t_path}"
            _check_maps(s, t, s_name, t_name, "CWD")
            out.append((s, t, s_name, t_name))
        return out

    def prepare(self, student_view: View, teacher_view: View, batch: Batch) -> None:
        if self.align is not None:
            return
        self.align = nn.ModuleList(
            _channel_align(s, t, sn, tn).to(device=s.device, dtype=s.dtype)
            for s, t, sn, tn in self._features(student_view, teacher_view)
        )

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        if self.align is None:
            raise RuntimeError("CWD.prepare() must be called on an example batch before the first forward")
        total: Tensor | None = None
        for align, (s, t, _, _) in zip(self.align, self._features(student_view, teacher_view)):
            loss = DF.cwd_loss(align(s), t, self.tau)
            total = loss if total is None else total + loss
        assert total is not None
        return total

    def extra_repr(self) -> str:
        return f"pairs={self.pairs}, tau={self.tau}, weight={self.weight}"


# ============================================================================================
# MGD
# ============================================================================================


@register(
    "mgd",
    "features",
    Paper(
        title="Masked Generative Distillation",
        authors="Z. Yang, Z. Li, M. Shao, D. Shi, Z. Yuan, C. Yuan",
        year=2022,
        arxiv="2205.01529",
        venue="ECCV",
    ),
)
class MGD(Method):
    """Masked generative distillation: α/B Σ (T - G(align(S)·M))², M a random spatial mask (ratio λ).

    ``align`` is a 1x1 conv when channel counts differ (identity otherwise); ``G`` the generation
    block 3x3 conv → ReLU → 3x3 conv at the teacher's width; both built by :meth:`prepare`.

    ``mask="spatial"`` (default) masks random pixels (positions, shared by all channels), as the
    paper describes; ``mask="channel"`` masks random channels of each sample
    (:func:`distill.functional.mgd_channel_mask`), which is what the authors' released
    classification code does. Defaults α = 7e-5, λ = 0.5, last feature map: the paper's text
    could not be read here; α = 7e-5 is the authors' ImageNet ``alpha_mgd`` and λ = 0.5 the
    "masked ratio. Defaults to 0.5" of their classification ``MGDLoss`` docstring, while its
    code and configs (yzd-v/MGD ``cls/mmcls/distillation/losses/mgd.py``,
    ``cls/configs/distillers/res34_distill_res18_img.py``) mask channels with
    ``lambda_mgd=0.15``: ``MGD(mask="channel", mask_ratio=0.15)`` reproduces that. Their
    detection / segmentation code masks pixels with λ = 0.65 / 0.75 and α = 2e-5.

    The mask is drawn from a ``torch.Generator`` owned by the method (seeded with ``seed``):
    in training mode each forward advances it; in eval mode (``method.eval()``, e.g. during
    validation) the mask is drawn from a fresh generator seeded with ``seed``, so evaluation is
    reproducible and does not disturb the training sequence. The generator's state is not part of
    ``state_dict`` (a resumed run draws a different, equally random, mask sequence).
    """

    requires_prepare = True  # align + generation block are built from example shapes

    def __init__(
        self,
        student_tap: str = "stage3",
        teacher_tap: str = "stage3",
        alpha: float = 7e-5,
        mask_ratio: float = 0.5,
        mask: str = "spatial",
        seed: int = 0,
        weight: float = 1.0,
        warmup_epochs: int = 0,
    ) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        if not 0.0 <= mask_ratio <= 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio}")
        if mask not in ("spatial", "channel"):
            raise ValueError(f"mask must be 'spatial' (the paper) or 'channel' (the authors' classification code), "
                             f"got {mask!r}")
        self.student_tap, self.teacher_tap = str(student_tap), str(teacher_tap)
        self.alpha, self.mask_ratio, self.seed = float(alpha), float(mask_ratio), int(seed)
        self.mask = mask
        self.student_taps = [self.student_tap]
        self.teacher_taps = [self.teacher_tap]
        self.align: nn.Module | None = None
        self.generation: nn.Module | None = None
        self.generator = torch.Generator().manual_seed(self.seed)

    def _pair(self, student_view: View, teacher_view: View) -> tuple[Tensor, Tensor]:
        s = _tap(student_view, self.student_tap, "student")
        t = _tap(teacher_view, self.teacher_tap, "teacher").detach()
        _check_maps(s, t, f"student:{self.student_tap}", f"teacher:{self.teacher_tap}", "MGD")
        return s, t

    def prepare(self, student_view: View, teacher_view: View, batch: Batch) -> None:
        if self.generation is not None:
            return
        s, t = self._pair(student_view, teacher_view)
        c = t.shape[1]
        self.align = _channel_align(s, t, f"student:{self.student_tap}", f"teacher:{self.teacher_tap}").to(
            device=s.device, dtype=s.dtype
        )
        self.generation = nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1)
        ).to(device=s.device, dtype=s.dtype)

    def draw_mask(self, like: Tensor) -> Tensor:
        """The mask for a map shaped like ``like``: ``(B, 1, H, W)`` (spatial) or ``(B, C, 1, 1)`` (channel)."""
        gen = self.generator if self.training else torch.Generator().manual_seed(self.seed)
        b, c, h, w = like.shape
        if self.mask == "channel":
            return DF.mgd_channel_mask(b, c, self.mask_ratio, gen, device=like.device, dtype=like.dtype)
        return DF.mgd_mask(b, h, w, self.mask_ratio, gen, device=like.device, dtype=like.dtype)

    def generate(self, student: Tensor, mask: Tensor) -> Tensor:
        """G(align(S) · M): the generated feature, shaped like the teacher's map."""
        if self.generation is None or self.align is None:
            raise RuntimeError("MGD.prepare() must be called on an example batch before the first forward")
        return self.generation(self.align(student) * mask)

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        if self.generation is None:
            raise RuntimeError("MGD.prepare() must be called on an example batch before the first forward")
        s, t = self._pair(student_view, teacher_view)
        return self.alpha * DF.mgd_loss(self.generate(s, self.draw_mask(t)), t)

    def extra_repr(self) -> str:
        return (f"{self.student_tap} -> {self.teacher_tap}, alpha={self.alpha}, mask_ratio={self.mask_ratio}, "
                f"mask={self.mask}, weight={self.weight}")


# ============================================================================================
# SimKD
# ============================================================================================


def simkd_projector(in_channels: int, out_channels: int, factor: int = 2) -> nn.Sequential:
    """SimKD's bottleneck projector: 1x1 → BN → ReLU → 3x3 → BN → ReLU → 1x1 → BN → ReLU (no biases).

    Middle width ``out_channels // factor`` (at least 1).
    """
    mid = max(1, out_channels // factor)
    return nn.Sequential(
        nn.Conv2d(in_channels, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
        nn.Conv2d(mid, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
        nn.Conv2d(mid, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(),
    )


class SimKDPredictor(nn.Module):
    """The SimKD student at inference: student trunk up to the tapped map → projector →
    global average pool → the teacher's frozen classifier.

    The student runs its whole forward (its own ``fc`` output is discarded); the tapped map is
    captured with a hook. When the teacher's map was smaller during training, the student's map
    is average-pooled to that size first, as in training.
    """

    def __init__(self, student: nn.Module, tap: str, projector: nn.Module, classifier: nn.Module,
                 pool_to: tuple[int, int] | None = None) -> None:
        super().__init__()
        from distill.taps import Taps

        self.student, self.projector, self.classifier = student, projector, classifier
        self.tap, self.pool_to = tap, pool_to
        self._taps = Taps(student, [tap], model_name="student")

    def features(self, x: Tensor) -> Tensor:
        """The projected student map ``(B, C_t, H, W)``."""
        with self._taps.recording() as store:
            self.student(x)
        f = store[self.tap]
        if self.pool_to is not None and tuple(f.shape[-2:]) != self.pool_to:
            f = F.adaptive_avg_pool2d(f, self.pool_to)
        return self.projector(f)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))

    def remove_hooks(self) -> None:
        self._taps.remove()


@register(
    "simkd",
    "features",
    Paper(
        title="Knowledge Distillation with the Reused Teacher Classifier",
        authors="D. Chen, J.-P. Mei, H. Zhang, C. Wang, Y. Feng, C. Chen",
        year=2022,
        arxiv="2203.14001",
        venue="CVPR",
    ),
)
class SimKD(Method):
    """SimKD: ℓ2 alignment of the projected student's last feature map with the teacher's; the
    student then predicts with the *teacher's* classifier.

    The projector (1x1-3x3-1x1 bottleneck with BN/ReLU, ``factor`` 2) maps the student's map to
    the teacher's channels; the larger of the two maps is average-pooled to the smaller's size
    first (integer factors). The paper trains with this loss alone (no cross-entropy, no KD):
    ``Distiller(student, teacher, losses={"simkd": SimKD(teacher_classifier=teacher.fc)})``.

    Evaluation: the trained student is :meth:`student_predictor` (student trunk → projector →
    pool → teacher's classifier). It is also :meth:`predictor`, so ``Distiller.predictor()`` and
    ``fit``'s per-epoch validation use it (the student's own ``fc`` is never trained by SimKD).
    Without ``teacher_classifier``, :meth:`bind_models` takes the teacher's last ``nn.Linear``
    when the Distiller is prepared, so a recipe needs no Python.

    Args:
        teacher_classifier: the teacher's classifier (e.g. ``teacher.fc``, or
            ``distiller.teacher.model.fc``); kept by reference, not registered as a submodule (it
            is neither trained nor saved with the method). Needed only by :meth:`student_predictor`.
        reduction: ``"mean"`` (the authors' ``nn.MSELoss``) or ``"sum"`` (see
            :func:`distill.functional.simkd_loss`).
    """

    requires_prepare = True  # the projector is built from example shapes

    def __init__(
        self,
        student_tap: str = "stage3",
        teacher_tap: str = "stage3",
        factor: int = 2,
        teacher_classifier: nn.Module | None = None,
        reduction: str = "mean",
        weight: float = 1.0,
        warmup_epochs: int = 0,
    ) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        if factor < 1:
            raise ValueError(f"factor must be >= 1, got {factor}")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.student_tap, self.teacher_tap = str(student_tap), str(teacher_tap)
        self.factor, self.reduction = int(factor), reduction
        self.student_taps = [self.student_tap]
        self.teacher_taps = [self.teacher_tap]
        self.projector: nn.Module | None = None
        self.set_teacher_classifier(teacher_classifier)
        self._student_pool_to: tuple[int, int] | None = None

    @property
    def teacher_classifier(self) -> nn.Module | None:
        return self._teacher_classifier[0] if self._teacher_classifier else None

    def set_teacher_classifier(self, module: nn.Module | None) -> None:
        """Give (or clear) the teacher's classifier after construction (kept by reference)."""
        self._teacher_classifier = () if module is None else (module,)
        self._predictor_cache: tuple[nn.Module, SimKDPredictor] | tuple[()] = ()

    def bind_models(self, student: nn.Module, teacher: nn.Module | None, example: Batch) -> None:
        """Take the teacher's classifier (its last ``nn.Linear``) when none was given."""
        if self.teacher_classifier is None and teacher is not None:
            linears = [m for m in teacher.modules() if isinstance(m, nn.Linear)]
            if not linears:
                raise ShapeMismatchError(
                    "SimKD reuses the teacher's classifier, but the teacher has no nn.Linear: pass "
                    "teacher_classifier= (the module mapping its pooled feature to logits)"
                )
            self.set_teacher_classifier(linears[-1])

    def predictor(self, student: nn.Module) -> nn.Module | None:
        """:meth:`student_predictor`, built once per student: what ``fit`` evaluates for SimKD."""
        if self.projector is None or self.teacher_classifier is None:
            return None
        if not self._predictor_cache or self._predictor_cache[0] is not student:
            if self._predictor_cache:
                self._predictor_cache[1].remove_hooks()
            # a tuple keeps the predictor (which holds the student) out of this module's tree
            self._predictor_cache = (student, self.student_predictor(student))
        return self._predictor_cache[1]

    def _pair(self, student_view: View, teacher_view: View) -> tuple[Tensor, Tensor]:
        s = _tap(student_view, self.student_tap, "student")
        t = _tap(teacher_view, self.teacher_tap, "teacher").detach()
        s_name, t_name = f"student:{self.student_tap}", f"teacher:{self.teacher_tap}"
        _check_maps(s, t, s_name, t_name, "SimKD")
        return match_spatial(s, t, student_name=s_name, teacher_name=t_name)

    def prepare(self, student_view: View, teacher_view: View, batch: Batch) -> None:
        if self.projector is not None:
            return
        raw = _tap(student_view, self.student_tap, "student")
        s, t = self._pair(student_view, teacher_view)
        if s.shape[-2:] != raw.shape[-2:]:
            self._student_pool_to = (int(s.shape[-2]), int(s.shape[-1]))
        self.projector = simkd_projector(s.shape[1], t.shape[1], self.factor).to(device=s.device, dtype=s.dtype)

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        if self.projector is None:
            raise RuntimeError("SimKD.prepare() must be called on an example batch before the first forward")
        s, t = self._pair(student_view, teacher_view)
        return DF.simkd_loss(self.projector(s), t, self.reduction)

    def student_predictor(self, student: nn.Module, teacher_classifier: nn.Module | None = None) -> SimKDPredictor:
        """An ``nn.Module`` mapping images to logits the SimKD way (for evaluation / deployment).

        Uses ``teacher_classifier`` if given, else the one passed at construction; its parameters
        are set to ``requires_grad=False`` (it is the teacher's, frozen). Call ``.eval()`` on the
        result before evaluating (the projector has BatchNorm).
        """
        if self.projector is None:
            raise RuntimeError(
                "SimKD.prepare() must be called (the projector is built there) before student_predictor()"
            )
        classifier = teacher_classifier if teacher_classifier is not None else self.teacher_classifier
        if classifier is None:
            raise ValueError(
                "SimKD needs the teacher's classifier to predict: pass teacher_classifier=teacher.fc (or "
                "distiller.teacher.model.fc) to SimKD(...) or to student_predictor(...)"
            )
        out_ch = None
        for m in reversed(list(self.projector.modules())):
            if isinstance(m, nn.Conv2d):
                out_ch = m.out_channels
                break
        in_features = getattr(classifier, "in_features", None)
        if in_features is not None and out_ch is not None and in_features != out_ch:
            raise ShapeMismatchError(
                f"the teacher classifier takes {in_features} features but the projector gives {out_ch} channels "
                f"(teacher tap {self.teacher_tap!r}): tap the teacher's last feature map, the one its classifier pools"
            )
        classifier.requires_grad_(False)
        return SimKDPredictor(student, self.student_tap, self.projector, classifier, self._student_pool_to)

    def extra_repr(self) -> str:
        return (f"{self.student_tap} -> {self.teacher_tap}, factor={self.factor}, reduction={self.reduction}, "
                f"teacher_classifier={'set' if self.teacher_classifier is not None else 'None'}, weight={self.weight}")


# ============================================================================================
# SemCKD
# ============================================================================================


class _MLPEmbed(nn.Module):
    """Linear → ReLU → Linear → ℓ2-normalise (SemCKD's query/key embedding)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim_in, 2 * dim_out)
        self.act = nn.ReLU()
        self.linear2 = nn.Linear(2 * dim_out, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.linear2(self.act(self.linear1(x.flatten(1)))), p=2, dim=1)


def semckd_projection(in_channels: int, out_channels: int) -> nn.Sequential:
    """SemCKD's Proj(·, t): 1x1 → BN → ReLU → 3x3 → BN → ReLU → 1x1, middle width 2·C_t (no biases)."""
    mid = 2 * out_channels
    return nn.Sequential(
        nn.Conv2d(in_channels, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
        nn.Conv2d(mid, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
        nn.Conv2d(mid, out_channels, 1, bias=False),
    )


@register(
    "semckd",
    "features",
    Paper(
        title="Cross-Layer Distillation with Semantic Calibration",
        authors="D. Chen, J.-P. Mei, Y. Zhang, C. Wang, Z. Wang, Y. Feng, C. Chen",
        year=2021,
        arxiv="2012.03236",
        venue="AAAI",
    ),
)
class SemCKD(Method):
    """Semantic calibration: every student layer distils from every teacher layer, weighted by attention.

    For student layer s and teacher layer t: Proj(F_s, t) (1x1-3x3-1x1 convs to C_t channels),
    the larger of the two maps adaptive-average-pooled to the smaller's size; the per-sample MSE
    to F_t is weighted by α^b_(s,t) = softmax_t(q_s^b · k_t^b) and the weighted sum is divided by
    B·S (:func:`distill.functional.semckd_loss`), times ``beta`` (400 on CIFAR-100).

    Queries / keys (``embedding``):

    * ``"similarity"`` (paper and code): row b of the layer's B×B sample-similarity matrix
      R(F)R(F)ᵀ through an MLP (B → 2·B/4 → B/4, ℓ2-normalised). The input width is the batch size
      seen by :meth:`prepare`; a smaller batch (a data set's last one) has its rows zero-padded to
      that width (the authors' code instead skips incomplete batches); a larger one is an error.
    * ``"pooled"``: the globally average-pooled feature (B, C) through the same kind of MLP
      (C → 2·d → d, d = ``embed_dim``): independent of the batch size; not the paper's.
    """

    requires_prepare = True  # projections and embeddings are built from example shapes

    def __init__(
        self,
        student_taps: Sequence[str] = ("stage1", "stage2", "stage3"),
        teacher_taps: Sequence[str] = ("stage1", "stage2", "stage3"),
        beta: float = 400.0,
        embedding: str = "similarity",
        factor: int = 4,
        embed_dim: int = 128,
        weight: float = 1.0,
        warmup_epochs: int = 0,
    ) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        self.student_taps = [str(p) for p in student_taps]
        self.teacher_taps = [str(p) for p in teacher_taps]
        if not self.student_taps or not self.teacher_taps:
            raise ValueError("SemCKD needs at least one student tap and one teacher tap")
        if embedding not in ("similarity", "pooled"):
            raise ValueError(f"embedding must be 'similarity' or 'pooled', got {embedding!r}")
        if factor < 1 or embed_dim < 1:
            raise ValueError(f"factor and embed_dim must be >= 1, got {factor}, {embed_dim}")
        self.beta, self.embedding, self.factor, self.embed_dim = float(beta), embedding, int(factor), int(embed_dim)
        self.query: nn.ModuleList | None = None
        self.key: nn.ModuleList | None = None
        self.proj: nn.ModuleDict | None = None
        self.batch_size: int | None = None

    def _features(self, student_view: View, teacher_view: View) -> tuple[list[Tensor], list[Tensor]]:
        fs = [_tap(student_view, p, "student") for p in self.student_taps]
        ft = [_tap(teacher_view, p, "teacher").detach() for p in self.teacher_taps]
        for s, sp in zip(fs, self.student_taps):
            for t, tp in zip(ft, self.teacher_taps):
                _check_maps(s, t, f"student:{sp}", f"teacher:{tp}", "SemCKD")
        return fs, ft

    @staticmethod
    def _aligned(s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Adaptive-average-pool the larger map to the smaller's (H, W), as the authors' code."""
        (hs, ws), (ht, wt) = s.shape[-2:], t.shape[-2:]
        if hs > ht:
            return F.adaptive_avg_pool2d(s, (ht, wt)), t
        if (hs, ws) != (ht, wt):
            return s, F.adaptive_avg_pool2d(t, (hs, ws))
        return s, t

    def prepare(self, student_view: View, teacher_view: View, batch: Batch) -> None:
        if self.proj is not None:
            return
        fs, ft = self._features(student_view, teacher_view)
        b = fs[0].shape[0]
        self.batch_size = int(b)
        if self.embedding == "similarity":
            d = max(1, b // self.factor)
            self.query = nn.ModuleList(_MLPEmbed(b, d) for _ in fs)
            self.key = nn.ModuleList(_MLPEmbed(b, d) for _ in ft)
        else:
            d = self.embed_dim
            self.query = nn.ModuleList(_MLPEmbed(s.shape[1], d) for s in fs)
            self.key = nn.ModuleList(_MLPEmbed(t.shape[1], d) for t in ft)
        self.proj = nn.ModuleDict({
            f"{i}_{j}": semckd_projection(s.shape[1], t.shape[1]) for i, s in enumerate(fs) for j, t in enumerate(ft)
        })
        self.to(device=fs[0].device, dtype=fs[0].dtype)

    def _embed_input(self, f: Tensor) -> Tensor:
        if self.embedding == "pooled":
            return f.mean(dim=(2, 3))
        sim = DF.semckd_similarity(f)
        b = sim.shape[0]
        assert self.batch_size is not None
        if b > self.batch_size:
            raise ShapeMismatchError(
                f"SemCKD's similarity embeddings were built for batches of {self.batch_size}, got {b}: prepare() on a "
                "full-size batch, or use embedding='pooled'"
            )
        return F.pad(sim, (0, self.batch_size - b)) if b < self.batch_size else sim

    def attention(self, fs: Sequence[Tensor], ft: Sequence[Tensor]) -> Tensor:
        """α (B, S, T) from the student (queries) and teacher (keys) feature maps."""
        assert self.query is not None and self.key is not None
        q = torch.stack([m(self._embed_input(f)) for m, f in zip(self.query, fs)], dim=1)
        k = torch.stack([m(self._embed_input(f)) for m, f in zip(self.key, ft)], dim=1)
        return DF.semckd_attention(q, k)

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        if self.proj is None:
            raise RuntimeError("SemCKD.prepare() must be called on an example batch before the first forward")
        fs, ft = self._features(student_view, teacher_view)
        projected, targets = [], []
        for i, s in enumerate(fs):
            row_p, row_t = [], []
            for j, t in enumerate(ft):
                s_in, t_out = self._aligned(s, t)
                row_p.append(self.proj[f"{i}_{j}"](s_in))
                row_t.append(t_out)
            projected.append(row_p)
            targets.append(row_t)
        return self.beta * DF.semckd_loss(projected, targets, self.attention(fs, ft))

    def extra_repr(self) -> str:
        return (f"student={self.student_taps}, teacher={self.teacher_taps}, beta={self.beta}, "
                f"embedding={self.embedding}, weight={self.weight}")


__all__ = ["CWD", "MGD", "SimKD", "SimKDPredictor", "SemCKD", "simkd_projector", "semckd_projection"]
