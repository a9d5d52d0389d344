"""Feature Distillation (FD): a ViT student regresses a teacher's whitened output feature map.

The math is :func:`distill.functional.fd_loss` (``distill/functional/mim.py``); the pre-training
strategies of the same family (SdAE, DMJD, and FD followed by fine-tuning) are in
:mod:`distill.strategies.mim`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill import functional as DF
from distill.adapters import ShapeMismatchError
from distill.batch import Batch, View
from distill.methods._views import tap as _tap
from distill.methods.base import Method, Paper, register
from distill.models.vit import num_prefix_tokens, patch_grid

FD_PAPER = Paper(
    title="Contrastive Learning Rivals Masked Image Modeling in Fine-tuning via Feature Distillation",
    authors="Y. Wei, H. Hu, Z. Xie, Z. Zhang, Y. Cao, J. Bao, D. Chen, B. Guo",
    year=2022,
    arxiv="2205.14141",
    venue="arXiv",
)


def _as_tokens(x: Tensor, prefix: int, grid: tuple[int, int] | None, side: str,
               path: str, channels_last: bool = False) -> tuple[Tensor | None, Tensor]:
    """``(class token (B, D) or None, patch map (B, D, h, w))`` from ViT tokens ``(B, P + L, D)``, a
    CNN map ``(B, C, h, w)``, or with ``channels_last`` a Swin stage's ``(B, h, w, C)``."""
    if x.dim() == 4:
        return None, x.permute(0, 3, 1, 2) if channels_last else x
    if x.dim() != 3:
        raise ShapeMismatchError(f"FD reads tokens (B, N, D) or maps (B, C, H, W); {side}:{path} is {tuple(x.shape)}")
    patches = x[:, prefix:]
    n = patches.shape[1]
    h, w = grid if grid is not None else (round(n ** 0.5),) * 2
    if h * w != n:
        raise ShapeMismatchError(f"{side}:{path} has {n} patch tokens after {prefix} prefix token(s), which do not "
                                 f"fill a {h}x{w} grid")
    cls = x[:, 0] if prefix > 0 else None
    return cls, patches.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)


@register("fd", "self-supervised", FD_PAPER)
class FD(Method):
    r"""Feature distillation: smooth-L1 between projected student tokens and whitened teacher tokens.

    .. math:: L = \frac{1}{B N D_t} \sum \ell_\beta\bigl(W s_n + b - \operatorname{LN}(t_n)\bigr)

    ``s_n``: the student's output tokens (tap ``student_tap``, default ``"norm"``: ``(B, P + L, D_s)``),
    ``t_n``: the teacher's at the same positions (tap ``teacher_tap``; ViT tokens ``(B, P' + L', D_t)``
    or a CNN map ``(B, D_t, h, w)``), ``LN`` a LayerNorm without affine parameters (the paper's
    feature whitening), ``W`` a linear projector ``D_s -> D_t`` (the authors' 1x1 ``Conv1d``) built by
    :meth:`prepare`, ``ℓ_β`` smooth-L1 with β = 2 (:func:`~distill.functional.fd_loss`). The tokens
    compared are the patch tokens, plus the class token when both models have one (the authors' code
    regresses the whole token sequence of a ViT teacher, class token included). A teacher whose patch
    grid differs from the student's (a CNN's last map: 4x4 against the student's 7x7 on 28x28 inputs)
    is resized to the student's grid by bilinear interpolation (ours; the paper's teachers share the
    student's patch grid). Both models see the same full, unmasked view (the paper's choice).

    The paper's other choices live in the student model and the strategy: the shared relative
    position bias and the student-only drop path in :class:`~distill.models.vit_relpos.RelPosViT`
    (zoo ``vit_tiny_rpb``; the teacher is frozen in eval mode, so it never drops paths); AdamW and
    fine-tuning afterwards in :func:`distill.strategies.mim.fd`. β = 2 and the non-affine LayerNorm
    are the authors' code's (``nn.SmoothL1Loss(beta=2.0)``, ``nn.LayerNorm(embed_dim,
    elementwise_affine=False)``); the paper's method section could not be read here (only the
    abstract), so they come from the code.

    Args:
        student_tap, teacher_tap: the tapped outputs (default ``"norm"``: a ViT's final normed tokens;
            ``"stage3"`` for the zoo's CNN teachers).
        beta: the smooth-L1 threshold β.
        channels_last: the sides (``"student"``, ``"teacher"``) whose 4-D taps are channels-last
            ``(B, H, W, C)``, as timm's hierarchical Swin stages are; a 4-D tap is otherwise a CNN's
            ``(B, C, H, W)`` (the shape cannot tell them apart).
        weight, warmup_epochs: see :class:`~distill.methods.base.Method`.
    """

    requires_prepare = True

    def __init__(self, student_tap: str = "norm", teacher_tap: str = "norm", beta: float = 2.0,
                 channels_last: Sequence[str] = (), weight: float = 1.0, warmup_epochs: int = 0) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        sides = (channels_last,) if isinstance(channels_last, str) else tuple(channels_last)
        if any(x not in ("student", "teacher") for x in sides):
            raise ValueError(f"FD: channels_last names sides 'student' / 'teacher', got {list(sides)}")
        self.channels_last = frozenset(sides)
        self.beta = float(beta)
        self.student_tap, self.teacher_tap = str(student_tap), str(teacher_tap)
        self.student_taps, self.teacher_taps = [self.student_tap], [self.teacher_tap]
        self.projector: nn.Module | None = None
        self._s_prefix, self._t_prefix = 1, 1
        self._s_grid: tuple[int, int] | None = None
        self._t_grid: tuple[int, int] | None = None

    def bind_models(self, student: nn.Module, teacher: nn.Module | None, example: Batch) -> None:
        self._s_prefix, self._s_grid = num_prefix_tokens(student), patch_grid(student)
        if teacher is not None:
            self._t_prefix, self._t_grid = num_prefix_tokens(teacher), patch_grid(teacher)

    def pairs(self, student_view: View, teacher_view: View) -> tuple[Tensor, Tensor]:
        """The compared tokens: student ``(B, N, D_s)`` and teacher ``(B, N, D_t)`` (detached)."""
        s = _tap(student_view, self.student_tap, "student")
        t = _tap(teacher_view, self.teacher_tap, "teacher").detach()
        if s.shape[0] != t.shape[0]:
            raise ShapeMismatchError(f"FD: batch sizes differ: student {tuple(s.shape)}, teacher {tuple(t.shape)}")
        s_cls, s_map = _as_tokens(s, self._s_prefix, self._s_grid, "student", self.student_tap,
                                  "student" in self.channels_last)
        t_cls, t_map = _as_tokens(t, self._t_prefix, self._t_grid, "teacher", self.teacher_tap,
                                  "teacher" in self.channels_last)
        if t_map.shape[-2:] != s_map.shape[-2:]:
            t_map = F.interpolate(t_map.float(), size=s_map.shape[-2:], mode="bilinear",
                                  align_corners=False).to(t_map.dtype)
        s_tok, t_tok = s_map.flatten(2).transpose(1, 2), t_map.flatten(2).transpose(1, 2)
        if s_cls is not None and t_cls is not None:
            s_tok = torch.cat([s_cls.unsqueeze(1), s_tok], 1)
            t_tok = torch.cat([t_cls.unsqueeze(1), t_tok], 1)
        return s_tok, t_tok

    def prepare(self, student_view: View, teacher_view: View, batch: Batch) -> None:
        if self.projector is not None:
            return
        s, t = self.pairs(student_view, teacher_view)
        self.projector = nn.Linear(s.shape[-1], t.shape[-1]).to(device=s.device, dtype=s.dtype)

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        if self.projector is None:
            raise RuntimeError("FD.prepare() must be called on an example batch before the first forward")
        s, t = self.pairs(student_view, teacher_view)
        return DF.fd_loss(self.projector(s), t, self.beta)

    def extra_repr(self) -> str:
        return f"student_tap={self.student_tap!r}, teacher_tap={self.teacher_tap!r}, beta={self.beta}, weight={self.weight}"

