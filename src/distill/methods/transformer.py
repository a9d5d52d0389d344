"""TaT: knowledge distillation via the target-aware transformer (one-to-all spatial matching, and
its hierarchical form for large maps: patch-group and anchor-point distillation).

``forward`` returns the *unweighted* loss; the math lives in :mod:`distill.functional`
(``distill/functional/transformer.py``). The teacher tensor is detached here; the linear
embeddings θ, γ, φ (1x1 conv + BatchNorm) are built by :meth:`TaT.prepare` from one example
batch, before the optimizer is made.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from distill import functional as DF
from distill.adapters import ShapeMismatchError
from distill.batch import Batch, View
from distill.methods._views import check_maps as _check_maps
from distill.methods._views import tap as _tap
from distill.methods.base import Method, Paper, register

_EMBEDS = ("conv1x1_bn", "identity")
_QUERIES = ("teacher", "student")
_PAPER = Paper(
    title="Knowledge Distillation via the Target-aware Transformer",
    authors="S. Lin, H. Xie, B. Wang, K. Yu, X. Chang, X. Liang, G. Wang",
    year=2022,
    arxiv="2205.10793",
    venue="CVPR",
)


def _embed(c_in: int, c_out: int, kind: str, what: str) -> nn.Module:
    if kind == "identity":
        if c_in != c_out:
            raise ShapeMismatchError(f"embed='identity' needs equal channel counts, {what} has {c_in} -> {c_out}")
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))


def _with_defaults(init: Callable[..., None], **defaults: Any) -> Callable[..., None]:
    """``init`` with other defaults for some arguments, and a signature that shows them."""
    sig = inspect.signature(init)
    unknown = set(defaults) - set(sig.parameters)
    if unknown:
        raise TypeError(f"{init.__qualname__} has no argument(s) {sorted(unknown)}")
    sig = sig.replace(parameters=[p.replace(default=defaults.get(p.name, p.default)) for p in sig.parameters.values()])

    @functools.wraps(init)
    def __init__(*args: Any, **kwargs: Any) -> None:
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        init(*bound.args, **bound.kwargs)

    __init__.__signature__ = sig  # type: ignore[attr-defined]
    return __init__


def _size2(size: int | Sequence[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))



@register("tat", "features", _PAPER)
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
    ``query="student"`` is the authors' code (sihaoevery/TaT, ``MaskedFM``; TaT-seg
    ``distiller_tat.py`` likewise): the row for position i is a softmax over teacher positions j of
    ⟨γ(f^s_i), θ(f^t_j)⟩ applied to φ(f^s)_j (a single head); spatial sizes must then agree.

    **Hierarchical distillation** (§3.3, the paper's form for the large maps of segmentation), on
    the same embedded maps q, k, v and the teacher map, added with their own weights:

    .. math::
        L = w_{whole}\\,L_{TaT} + w_{patch}\\,L^{P}_{TaT} + w_{anchor}\\,L^{A}_{TaT}

    - patch-group, :func:`distill.functional.tat_patch_group_loss`: the maps are cut into patches
      of ``patch_size`` (h, w), runs of ``group_size`` p consecutive patches (raster order) are
      concatenated along the channels, and TaT matches one to all inside each group only (the
      paper's g = n·m/p groups of an n x m patch grid); student and teacher maps must agree in
      size and the patch size must divide them;
    - anchor-point, :func:`distill.functional.tat_anchor_loss`: every map is average-pooled with
      a non-overlapping ``anchor_kernel`` and TaT matches the anchor maps one to all (long-range
      dependence at low cost); the kernel must divide both maps.

    A term whose weight is 0 is not computed and puts no constraint on the map sizes. ``tat``
    keeps the paper's classification objective (the whole-map term only, ``whole_weight`` 1,
    ``patch_weight`` = ``anchor_weight`` = 0); ``tat_hierarchical`` (:class:`HierarchicalTaT`)
    has the segmentation defaults. The embeddings are the ones of the whole-map term, applied to
    the full maps before they are split or pooled (a 1x1 conv acts per position, so this is the
    same linear map on every patch; for anchors the *embedded* maps are pooled, and BatchNorm
    sees full-resolution statistics) — as the authors' segmentation code (``distiller_tat.py``:
    one ``embed_query``/``embed_key``/``embed_value`` shared by both terms).

    ``reduction="mean"`` is the code's ``nn.MSELoss`` scale (the paper writes the plain squared
    norm, ``"sum"``: per-sample sum, C·H·W times larger). Loss weight: the authors' ImageNet
    ResNet-34 → ResNet-18 config weights this term 0.2 (mean reduction) beside cross-entropy; the
    Method's ``weight`` defaults to 1.0, set it to taste.
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
        whole_weight: float = 1.0,
        patch_weight: float = 0.0,
        anchor_weight: float = 0.0,
        patch_size: int | tuple[int, int] = 8,
        group_size: int = 4,
        anchor_kernel: int | tuple[int, int] = 4,
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
        terms = {"whole_weight": whole_weight, "patch_weight": patch_weight, "anchor_weight": anchor_weight}
        for name, w in terms.items():
            if not w >= 0:
                raise ValueError(f"{name} must be >= 0, got {w}")
        if not any(terms.values()):
            raise ValueError(f"at least one of {sorted(terms)} must be > 0, got {terms}")
        # a 0x0 map is divisible by anything: these calls check only the sizes' form
        DF.tat_patch_grid(0, 0, patch_size, group_size)
        DF.tat_anchor_grid(0, 0, anchor_kernel)
        self.student_tap, self.teacher_tap = str(student_tap), str(teacher_tap)
        self.query, self.embed = query, embed
        self.temperature, self.reduction = float(temperature), reduction
        self.whole_weight, self.patch_weight = float(whole_weight), float(patch_weight)
        self.anchor_weight = float(anchor_weight)
        self.patch_size, self.group_size = _size2(patch_size), int(group_size)
        self.anchor_kernel = _size2(anchor_kernel)
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
        if s.shape[2:] != t.shape[2:] and (self.query == "student" or self.patch_weight):
            why = "query='student'" if self.query == "student" else "patch-group distillation (patches pair by position)"
            raise ShapeMismatchError(
                f"TaT with {why} needs equal spatial sizes: {s_name} {tuple(s.shape)}, {t_name} {tuple(t.shape)}; "
                "tap layers of the same size"
            )
        try:  # the functional size checks, before any work; their errors name the sizes
            for x in (t, s):
                if self.patch_weight:
                    DF.tat_patch_grid(x.shape[2], x.shape[3], self.patch_size, self.group_size)
                if self.anchor_weight:
                    DF.tat_anchor_grid(x.shape[2], x.shape[3], self.anchor_kernel)
        except ValueError as e:
            raise ShapeMismatchError(f"TaT on {s_name} {tuple(s.shape)}, {t_name} {tuple(t.shape)}: {e}") from None
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
            raise RuntimeError(f"{type(self).__name__}.prepare() must be called on an example batch before the first "
                               "forward")
        s, t = self._pair(student_view, teacher_view)
        t_emb, s_emb, value = self.theta(t), self.gamma(s), self.phi(s)
        query, key = (t_emb, s_emb) if self.query == "teacher" else (s_emb, t_emb)
        temp, red = self.temperature, self.reduction
        terms = []
        if self.whole_weight:
            terms.append(self.whole_weight * DF.tat_loss(query, key, value, t, temp, red))
        if self.patch_weight:
            loss = DF.tat_patch_group_loss(query, key, value, t, self.patch_size, self.group_size, temp, red)
            terms.append(self.patch_weight * loss)
        if self.anchor_weight:
            terms.append(self.anchor_weight * DF.tat_anchor_loss(query, key, value, t, self.anchor_kernel, temp, red))
        return torch.stack(terms).sum()

    def extra_repr(self) -> str:
        parts = [f"student_tap={self.student_tap!r}, teacher_tap={self.teacher_tap!r}, query={self.query!r}",
                 f"embed={self.embed!r}, temperature={self.temperature}, reduction={self.reduction!r}"]
        if self.whole_weight:
            parts.append(f"whole_weight={self.whole_weight}")
        if self.patch_weight:
            parts.append(f"patch_weight={self.patch_weight}, patch_size={self.patch_size}, "
                         f"group_size={self.group_size}")
        if self.anchor_weight:
            parts.append(f"anchor_weight={self.anchor_weight}, anchor_kernel={self.anchor_kernel}")
        return ", ".join([*parts, f"weight={self.weight}"])


@register("tat_hierarchical", "features", _PAPER)
class HierarchicalTaT(TaT):
    """TaT's hierarchical distillation for large maps: patch-group plus anchor-point one-to-all matching.

    :class:`TaT` with the paper's segmentation objective (§3.3, L_seg = α L_CE + δ L^P_TaT +
    ζ L^A_TaT) as defaults; see :class:`TaT` for the terms and the embeddings.

    .. math:: L = w_{patch}\\,L^{P}_{TaT} + w_{anchor}\\,L^{A}_{TaT}, \\qquad
        \\text{Distiller weight} \\times L = \\delta L^{P}_{TaT} + \\zeta L^{A}_{TaT}

    Defaults are the authors' Pascal VOC ResNet-101 → ResNet-18 (DeepLabV3+) run, sihaoevery/TaT-seg
    ``train_voc_resnet18.sh`` with ``distiller_tat.py``, on its 129 x 129 distilled map (the
    ``--anchor_h``/``--anchor_w`` default 129 is that size):

    - ``patch_size=8``: ``-n 16 -m 16`` patches per side, 129 // 16 = 8 pixels each;
    - ``group_size=4``: ``--heads 64`` groups of the 16·16 = 256 patches (``stack_attn``: the
      groups are runs of consecutive patches concatenated along the channels), p = 256 / 64 = 4;
    - ``anchor_kernel=4``: ``--anchor_h 32 --anchor_w 32`` anchors, kernel = stride = 129 // 32 = 4;
    - ``patch_weight=1.0``, ``anchor_weight=0.4``, ``weight=0.1``: the script's ``BETA=1.0``,
      ``GAMMA=0.4`` and ``ALPHA=0.1`` (the code's distillation loss is ALPHA·(BETA·L^P + GAMMA·L^A)
      beside the cross-entropy at weight 1, so δ = 0.1, ζ = 0.04), at the ``"mean"`` reduction.

    The other TaT-seg scripts: VOC MobileNetV2 4x4 patches, p = 1, kernel 2, ALPHA/BETA/GAMMA
    0.1/1.0/0.5; COCOStuff-10k ResNet-18 4x4, p = 2, kernel 4, 0.6/1.0/1.0; COCOStuff-10k
    MobileNetV2 8x8, p = 4, kernel 4, 0.4/1.0/1.0. ``query`` defaults to the paper's per-pixel
    form (teacher pixels ask, §3.2); the segmentation code has the student ask (``query="student"``).

    Differences from the authors' code: it cuts patches and anchors with ``unfold``/``AvgPool2d``
    and silently drops the rows and columns that do not fit (129 = 16·8 + 1); here the patch size
    and the anchor kernel must divide the map (a clear error otherwise). It runs the distillation
    one sample at a time (the embeddings' BatchNorm sees a batch of one); here the batch is
    embedded together. The default taps are ``stage3`` as for ``tat``; the paper distills the
    last feature map before the segmentation classifier, so tap that layer of a segmentation net.
    """

    # TaT's arguments with the segmentation defaults (an explicit signature: the registry, create_method
    # and recipe validation read the defaults and types from it)
    __init__ = _with_defaults(TaT.__init__, whole_weight=0.0, patch_weight=1.0, anchor_weight=0.4, weight=0.1)
