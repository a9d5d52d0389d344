"""Relation-based methods (SP, RKD, PKT, CC) and three more feature methods (NST, FSP, ICKD).

Relation methods compare how samples of a batch relate to each other (b×b similarity or kernel
matrices, distances and angles); feature methods here compare structure inside one sample's
feature maps (channel distributions, FSP and channel-correlation matrices). Each ``forward``
returns the *unweighted* loss; the math lives in :mod:`distill.functional`. Teacher tensors are
detached here.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from distill import functional as DF
from distill.adapters import build_adapter, match_spatial
from distill.batch import Batch, View
from distill.methods._views import (
    check_batch as _check_batch,
    check_maps as _check_maps,
    module_key as _key,
    tap as _tap,
    tap_pairs as _pairs,
)
from distill.methods.base import Method, Paper, register












# ============================================================================================
# Relations
# ============================================================================================


@register(
    "sp",
    "relations",
    Paper(
        title="Similarity-Preserving Knowledge Distillation",
        authors="F. Tung, G. Mori",
        year=2019,
        arxiv="1907.09682",
        venue="ICCV",
    ),
)
class SP(Method):
    """Similarity-preserving KD: (1/b^2) ||G_T - G_S||_F^2 of row-normalised batch Gram matrices, per tap pair.

    Any two taps with the same batch size can be paired (the b×b matrices do not depend on the
    feature sizes); the default pairs the last stage's maps, as RepDistiller does. The paper's
    CIFAR weight γ = 3000 (RepDistiller's ``-b 3000``) is the ``weight`` that reproduces it.
    """

    def __init__(
        self,
        pairs: Sequence[tuple[str, str]] = (("stage3", "stage3"),),
        weight: float = 1.0,
        warmup_epochs: int = 0,
    ) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        self.pairs = _pairs(pairs, "SP")
        self.student_taps = [s for s, _ in self.pairs]
        self.teacher_taps = [t for _, t in self.pairs]

    def _features(self, student_view: View, teacher_view: View) -> tuple[list[Tensor], list[Tensor]]:
        fs, ft = [], []
        for s_path, t_path in self.pairs:
            s = _tap(student_view, s_path, "student")
            t = _tap(teacher_view, t_path, "teacher").detach()
            _check_batch(s, t, f"student:{s_path}", f"teacher:{t_path}")
            fs.append(s)
            ft.append(t)
        return fs, ft

    def prepare(self, student_view: View, teacher_view: View, batch: Batch) -> None:
        self._features(student_view, teacher_view)  # fail early, naming the taps

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        return DF.sp_loss(*self._features(student_view, teacher_view))

    def extra_repr(self) -> str:
        return f"pairs={self.pairs}, weight={self.weight}"


class _EmbeddingRelation(Method):
    """Shared plumbing of the relation methods on one (student, teacher) pair of embeddings."""

    def __init__(self, student_tap: str, teacher_tap: str, weight: float, warmup_epochs: int) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        self.student_tap, self.teacher_tap = str(student_tap), str(teacher_tap)
        self.student_taps = [self.student_tap]
        self.teacher_taps = [self.teacher_tap]

    def _pair(self, student_view: View, teacher_view: View) -> tuple[Tensor, Tensor]:
        s = _tap(student_view, self.student_tap, "student")
        t = _tap(teacher_view, self.teacher_tap, "teacher").detach()
        _check_batch(s, t, f"student:{self.student_tap}", f"teacher:{self.teacher_tap}")
        return s, t

    def prepare(self, student_view: View, teacher_view: View, batch: Batch) -> None:
        self._pair(student_view, teacher_view)  # fail early, naming the taps

    def extra_repr(self) -> str:
        return f"{self.student_tap} -> {self.teacher_tap}, weight={self.weight}"


@register(
    "rkd",
    "relations",
    Paper(
        title="Relational Knowledge Distillation",
        authors="W. Park, D. Kim, Y. Lu, M. Cho",
        year=2019,
        arxiv="1904.05068",
        venue="CVPR",
    ),
)
class RKD(_EmbeddingRelation):
    """Relational KD: distance_weight * RKD-D + angle_weight * RKD-A (Huber on mean-normalised distances and angles).

    Defaults λ_D = 25, λ_A = 50 are the paper's classification weights; the terms are averaged
    over distinct pairs / triplets (see :func:`distill.functional.rkd_loss`). Embeddings of any
    sizes (B, D_s), (B, D_t): no adapter.
    """

    def __init__(
        self,
        student_tap: str = "pool",
        teacher_tap: str = "pool",
        distance_weight: float = 25.0,
        angle_weight: float = 50.0,
        weight: float = 1.0,
        warmup_epochs: int = 0,
    ) -> None:
        super().__init__(student_tap, teacher_tap, weight, warmup_epochs)
        if distance_weight < 0 or angle_weight < 0:
            raise ValueError(f"RKD weights must be >= 0, got distance {distance_weight}, angle {angle_weight}")
        self.distance_weight, self.angle_weight = float(distance_weight), float(angle_weight)

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        s, t = self._pair(student_view, teacher_view)
        return DF.rkd_loss(s, t, self.distance_weight, self.angle_weight)

    def extra_repr(self) -> str:
        return (
            f"{self.student_tap} -> {self.teacher_tap}, distance_weight={self.distance_weight}, "
            f"angle_weight={self.angle_weight}, weight={self.weight}"
        )


@register(
    "pkt",
    "relations",
    Paper(
        title="Learning Deep Representations with Probabilistic Knowledge Transfer",
        authors="N. Passalis, A. Tefas",
        year=2018,
        arxiv="1803.10837",
        venue="ECCV",
    ),
)
class PKT(_EmbeddingRelation):
    """Probabilistic knowledge transfer: KL(teacher || student) of cosine-kernel conditional probabilities.

    Embeddings of any sizes: only B×B matrices are compared. RepDistiller's CIFAR weight is
    30000 on a loss about 1/B of this one (see :func:`distill.functional.pkt_loss`).
    """

    def __init__(
        self, student_tap: str = "pool", teacher_tap: str = "pool", weight: float = 1.0, warmup_epochs: int = 0
    ) -> None:
        super().__init__(student_tap, teacher_tap, weight, warmup_epochs)

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        s, t = self._pair(student_view, teacher_view)
        return DF.pkt_loss(s, t)


@register(
    "cc",
    "relations",
    Paper(
        title="Correlation Congruence for Knowledge Distillation",
        authors="B. Peng, X. Jin, J. Liu, S. Zhou, Y. Wu, Y. Liu, D. Li, Z. Zhang",
        year=2019,
        arxiv="1904.01802",
        venue="ICCV",
    ),
)
class CC(_EmbeddingRelation):
    """Correlation congruence: (1/n^2) ||K_T - K_S||_F^2 of kernel matrices among the batch (Taylor RBF or bilinear).

    The student's tap passes through a trainable linear embedding to the teacher's dimension
    (built by :meth:`prepare`; ``adapter=None`` compares the raw student features, which also
    works since only n×n matrices are compared); both embeddings are L2-normalised inside the
    kernel. ``kernel`` picks the correlation kernel (:func:`distill.functional.cc_kernel_matrix`):
    ``"gaussian"`` (default) the Taylor-expanded Gaussian RBF with γ = ``gamma`` and P = ``order``;
    ``"bilinear"`` the bilinear pool k(F_i, F_j) = F_iᵀF_j of the normalised embeddings, the
    simpler kernel the paper compares it with (``gamma`` and ``order`` then unused).

    Defaults γ = 0.4, P = 2: the paper's text could not be read here (arXiv 1904.01802, abstract
    only); the values are those of torchdistill's ILSVRC2012 CCKD config
    (``configs/sample/ilsvrc2012/cckd/resnet18_from_resnet50.yaml``: ``gamma: 0.4, max_p: 2``)
    and AberHu/Knowledge-Distillation-Zoo's CC arguments. That torchdistill config weights CC
    by 0.003 next to KD, but on un-normalised 128-d linear embeddings of both networks and with
    the Frobenius norm of ΔK (``torch.dist``, not its square over n²), so its 0.003 does not
    carry over: ``weight`` stays 1.
    """

    requires_prepare = True  # the linear embedding is built from example shapes, before the optimizer

    def __init__(
        self,
        student_tap: str = "pool",
        teacher_tap: str = "pool",
        gamma: float = 0.4,
        order: int = 2,
        adapter: str | None = "linear",
        kernel: str = "gaussian",
        weight: float = 1.0,
        warmup_epochs: int = 0,
    ) -> None:
        super().__init__(student_tap, teacher_tap, weight, warmup_epochs)
        if gamma <= 0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        if int(order) != order or order < 0:
            raise ValueError(f"order must be an int >= 0, got {order}")
        if kernel not in ("gaussian", "bilinear"):
            raise ValueError(f"kernel must be 'gaussian' or 'bilinear', got {kernel!r}")
        self.gamma, self.order, self.adapter_kind, self.kernel = float(gamma), int(order), adapter, kernel
        self.embed: nn.Module | None = None

    def prepare(self, student_view: View, teacher_view: View, batch: Batch) -> None:
        s, t = self._pair(student_view, teacher_view)
        if self.adapter_kind is None:
            self.embed = nn.Identity()
            return
        s2, t2 = s.reshape(s.shape[0], -1), t.reshape(t.shape[0], -1)
        self.embed = build_adapter(
            s2, t2, student_name=f"student:{self.student_tap}", teacher_name=f"teacher:{self.teacher_tap}",
            kind=self.adapter_kind,
        ).to(device=s.device, dtype=s.dtype)

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        if self.embed is None:
            raise RuntimeError("CC.prepare() must be called on an example batch before the first forward")
        s, t = self._pair(student_view, teacher_view)
        return DF.cc_loss(self.embed(s.reshape(s.shape[0], -1)), t, self.gamma, self.order, self.kernel)

    def extra_repr(self) -> str:
        return (
            f"{self.student_tap} -> {self.teacher_tap}, kernel={self.kernel!r}, gamma={self.gamma}, "
            f"order={self.order}, adapter={self.adapter_kind}, weight={self.weight}"
        )


# ============================================================================================
# Feature methods
# ============================================================================================


@register(
    "nst",
    "features",
    Paper(
        title="Like What You Like: Knowledge Distill via Neuron Selectivity Transfer",
        authors="Z. Huang, N. Wang",
        year=2017,
        arxiv="1707.01219",
    ),
)
class NST(Method):
    """Neuron selectivity transfer: MMD^2 between normalised channel activation patterns, polynomial kernel.

    k(x, y) = (x^T y + c)^degree with the paper's d = 2, c = 0. Channel counts may differ;
    spatial sizes must agree or be integer multiples (the larger map is average-pooled,
    ``match_spatial``). The paper's total loss is CE + λ/2 · MMD^2, so ``weight`` is λ/2.
    """

    def __init__(
        self,
        pairs: Sequence[tuple[str, str]] = (("stage3", "stage3"),),
        degree: int = 2,
        c: float = 0.0,
        weight: float = 1.0,
        warmup_epochs: int = 0,
    ) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        self.pairs = _pairs(pairs, "NST")
        if int(degree) != degree or degree < 1:
            raise ValueError(f"degree must be an int >= 1, got {degree}")
        self.degree, self.c = int(degree), float(c)
        self.student_taps = [s for s, _ in self.pairs]
        self.teacher_taps = [t for _, t in self.pairs]

    def _maps(self, student_view: View, teacher_view: View) -> tuple[list[Tensor], list[Tensor]]:
        fs, ft = [], []
        for s_path, t_path in self.pairs:
            s = _tap(student_view, s_path, "student")
            t = _tap(teacher_view, t_path, "teacher").detach()
            s_name, t_name = f"student:{s_path}", f"teacher:{t_path}"
            _check_maps(s, t, s_name, t_name, "NST")
            s, t = match_spatial(s, t, student_name=s_name, teacher_name=t_name)
            fs.append(s)
            ft.append(t)
        return fs, ft

    def prepare(self, student_view: View, teacher_view: View, batch: Batch) -> None:
        self._maps(student_view, teacher_view)  # fail early, naming the taps

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        fs, ft = self._maps(student_view, teacher_view)
        return DF.nst_loss(fs, ft, self.degree, self.c)

    def extra_repr(self) -> str:
        return f"pairs={self.pairs}, degree={self.degree}, c={self.c}, weight={self.weight}"


@register(
    "fsp",
    "features",
    Paper(
        title="A Gift from Knowledge Distillation: Fast Optimization, Network Minimization and Transfer Learning",
        authors="J. Yim, D. Joo, J. Bae, J. Kim",
        year=2017,
        venue="CVPR",
    ),
)
class FSP(Method):
    """Flow of solution procedure: sum_i lambda_i ||G_i^T - G_i^S||^2 (per sample, mean over batch) of FSP matrices.

    Each of ``pairs`` names two taps (first, second) of the *student*; ``teacher_pairs``
    (default: the same names) the corresponding taps of the teacher. When the two maps of a
    pair differ in size by an integer factor, the larger is average-pooled. When a student
    tap's channel count differs from its teacher tap's, :meth:`prepare` builds an adapter
    (default a 1x1 conv) mapping it to the teacher's channels (one per distinct (student,
    teacher) tap; the paper has none, it distils between nets of equal widths),
    so the FSP matrices agree in shape. The paper's two-stage protocol (stage 1: this loss
    alone, to initialise the student; stage 2: the main task without it) is the training
    loop's job: ``distill.fit_hint_stage(distiller, loader, method="fsp", epochs=...)`` runs
    stage 1 with this loss alone.
    """

    requires_prepare = True  # channel adapters are built from example shapes, before the optimizer

    def __init__(
        self,
        pairs: Sequence[tuple[str, str]] = (("stem", "stage1"), ("stage1", "stage2")),
        teacher_pairs: Sequence[tuple[str, str]] | None = None,
        lambdas: Sequence[float] | None = None,
        adapter: str = "conv1x1",
        weight: float = 1.0,
        warmup_epochs: int = 0,
    ) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        self.pairs = _pairs(pairs, "FSP")
        self.teacher_pairs = self.pairs if teacher_pairs is None else _pairs(teacher_pairs, "FSP")
        if len(self.teacher_pairs) != len(self.pairs):
            raise ValueError(f"{len(self.pairs)} student pairs vs {len(self.teacher_pairs)} teacher pairs")
        if lambdas is not None and len(lambdas) != len(self.pairs):
            raise ValueError(f"{len(lambdas)} lambdas for {len(self.pairs)} pairs")
        self.lambdas = None if lambdas is None else [float(v) for v in lambdas]
        self.adapter_kind = adapter
        # (student tap, teacher tap) for each position of each pair, in order
        self._links = [
            (s, t) for sp, tp in zip(self.pairs, self.teacher_pairs) for s, t in zip(sp, tp)
        ]
        self.student_taps = sorted({s for s, _ in self._links})
        self.teacher_taps = sorted({t for _, t in self._links})
        self.adapters: nn.ModuleDict | None = None

    @staticmethod
    def _link_key(s_path: str, t_path: str) -> str:
        return f"{_key(s_path)}__{_key(t_path)}"

    def prepare(self, student_view: View, teacher_view: View, batch: Batch) -> None:
        adapters: dict[str, nn.Module] = {}
        for s_path, t_path in self._links:
            key = self._link_key(s_path, t_path)
            if key in adapters:
                continue
            s = _tap(student_view, s_path, "student")
            t = _tap(teacher_view, t_path, "teacher")
            s_name, t_name = f"student:{s_path}", f"teacher:{t_path}"
            _check_maps(s, t, s_name, t_name, "FSP")
            if s.shape[1] == t.shape[1]:
                adapters[key] = nn.Identity()
            else:
                # an FSP matrix averages over positions, so only channels must agree: build from
                # 1x1 slices (a 1x1 conv then maps the student's map at any resolution)
                adapters[key] = build_adapter(
                    s[:, :, :1, :1], t[:, :, :1, :1], student_name=s_name, teacher_name=t_name,
                    kind=self.adapter_kind,
                ).to(device=s.device, dtype=s.dtype)
        self.adapters = nn.ModuleDict(adapters)
        self._matrices(student_view, teacher_view)  # fail early on pairs of unmatched sizes

    def _matrices(self, student_view: View, teacher_view: View) -> tuple[list[Tensor], list[Tensor]]:
        assert self.adapters is not None
        gs_all, gt_all = [], []
        for (s1, s2), (t1, t2) in zip(self.pairs, self.teacher_pairs):
            a1 = self.adapters[self._link_key(s1, t1)](_tap(student_view, s1, "student"))
            a2 = self.adapters[self._link_key(s2, t2)](_tap(student_view, s2, "student"))
            b1 = _tap(teacher_view, t1, "teacher").detach()
            b2 = _tap(teacher_view, t2, "teacher").detach()
            a1, a2 = match_spatial(a1, a2, student_name=f"student:{s1}", teacher_name=f"student:{s2}")
            b1, b2 = match_spatial(b1, b2, student_name=f"teacher:{t1}", teacher_name=f"teacher:{t2}")
            gs_all.append(DF.fsp_matrix(a1, a2))
            gt_all.append(DF.fsp_matrix(b1, b2))
        return gs_all, gt_all

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        if self.adapters is None:
            raise RuntimeError("FSP.prepare() must be called on an example batch before the first forward")
        gs, gt = self._matrices(student_view, teacher_view)
        return DF.fsp_loss(gs, gt, self.lambdas)

    def extra_repr(self) -> str:
        return f"pairs={self.pairs}, teacher_pairs={self.teacher_pairs}, lambdas={self.lambdas}, weight={self.weight}"


# ICKD's paper, shared with its grid-level form (``distill.methods.ickd_grid``)
ICKD_PAPER = Paper(
    title="Exploring Inter-Channel Correlation for Diversity-preserved Knowledge Distillation",
    authors="L. Liu, Q. Huang, S. Lin, H. Xie, B. Wang, X. Chang, X. Liang",
    year=2021,
    arxiv="2202.03680",
    venue="ICCV",
)


@register("ickd", "features", ICKD_PAPER)
class ICKD(Method):
    """Inter-channel correlation KD: (1/c^2) ||G_T - G_S||^2 of row-normalised c×c channel Gram matrices.

    The student's map passes through a 1x1 conv + BN adapter to the teacher's c channels
    (built by :meth:`prepare`, as the official code's ``Embed``); spatial sizes may differ. The
    official CIFAR-100 weight is 2.5 on a loss c times this one (see
    :func:`distill.functional.ickd_loss`).
    """

    requires_prepare = True  # the channel adapter is built from example shapes, before the optimizer

    def __init__(
        self,
        student_tap: str = "stage3",
        teacher_tap: str = "stage3",
        adapter: str = "conv1x1_bn",
        weight: float = 1.0,
        warmup_epochs: int = 0,
    ) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        self.student_tap, self.teacher_tap, self.adapter_kind = str(student_tap), str(teacher_tap), adapter
        self.student_taps = [self.student_tap]
        self.teacher_taps = [self.teacher_tap]
        self.adapter: nn.Module | None = None

    def _pair(self, student_view: View, teacher_view: View) -> tuple[Tensor, Tensor]:
        s = _tap(student_view, self.student_tap, "student")
        t = _tap(teacher_view, self.teacher_tap, "teacher").detach()
        _check_maps(s, t, f"student:{self.student_tap}", f"teacher:{self.teacher_tap}", "ICKD")
        return s, t

    def prepare(self, student_view: View, teacher_view: View, batch: Batch) -> None:
        s, t = self._pair(student_view, teacher_view)
        # the c×c matrices do not depend on resolution: build the channel adapter from 1x1 slices
        self.adapter = build_adapter(
            s[:, :, :1, :1], t[:, :, :1, :1], student_name=f"student:{self.student_tap}",
            teacher_name=f"teacher:{self.teacher_tap}", kind=self.adapter_kind,
        ).to(device=s.device, dtype=s.dtype)

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        if self.adapter is None:
            raise RuntimeError("ICKD.prepare() must be called on an example batch before the first forward")
        s, t = self._pair(student_view, teacher_view)
        return DF.ickd_loss(self.adapter(s), t)

    def extra_repr(self) -> str:
        return f"{self.student_tap} -> {self.teacher_tap}, adapter={self.adapter_kind}, weight={self.weight}"


__all__ = ["SP", "RKD", "PKT", "CC", "NST", "FSP", "ICKD"]
