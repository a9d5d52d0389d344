"""SiT's distillation: logits KD plus Feature Recalibration Distillation from the unslimmed ViT.

The math is :func:`distill.functional.sit_distill_loss`; the student is
:class:`distill.models.slimmed_vit.SlimmedViT` (zoo ``sit_tiny``), the teacher the same ViT without
slimming (``vit_tiny``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from distill import functional as DF
from distill.adapters import ShapeMismatchError
from distill.batch import Batch, View
from distill.methods._views import tap as _tap
from distill.methods.base import Method, Paper, register

SIT_PAPER = Paper(
    title="Self-slimmed Vision Transformer",
    authors="Z. Zong, K. Li, G. Song, Y. Wang, Y. Qiao, B. Leng, Y. Liu",
    year=2022,
    arxiv="2111.12624",
    venue="ECCV",
)


class ReverseTSM(nn.Module):
    """SiT's reverse token slimming module: ``(B, N', D)`` slimmed tokens -> ``(B, N, D)``.

    An MLP across tokens (``N' → r·N → N``, GELU, after a LayerNorm over ``D``) restores the token
    count, then a residual MLP across channels (``D → r·D → D`` after a LayerNorm) recalibrates
    each token: ``Y = M_tok(LN(X)ᵀ)ᵀ;  out = Y + M_ch(LN(Y))``. ``r = 4`` as in the authors' code
    (``ReverseTSM(..., ratio=4.)``). Used in training only (the deployed student has no RTSM).
    """

    def __init__(self, dim: int, num_in: int, num_out: int, ratio: float = 4.0) -> None:
        super().__init__()
        self.norm_tokens = nn.LayerNorm(dim)
        self.tokens = nn.Sequential(nn.Linear(num_in, int(num_out * ratio)), nn.GELU(),
                                    nn.Linear(int(num_out * ratio), num_out))
        self.norm_channels = nn.LayerNorm(dim)
        self.channels = nn.Sequential(nn.Linear(dim, int(dim * ratio)), nn.GELU(), nn.Linear(int(dim * ratio), dim))

    def forward(self, x: Tensor) -> Tensor:
        y = self.tokens(self.norm_tokens(x).transpose(1, 2)).transpose(1, 2)
        return y + self.channels(self.norm_channels(y))


@register("sit_distill", "vit", SIT_PAPER)
class SiTDistill(Method):
    """SiT: KD on the logits + MSE between RTSM-recovered student tokens and the teacher's, every layer.

    ``L = λ_logits·T²·KL(σ(z_T/T) ‖ σ(z_S/T)) + λ_token·(1/L)·Σ_l MSE(RTSM_l(X̂_S,l), X_T,l)``
    (:func:`distill.functional.sit_distill_loss`). ``X̂_S,l`` are the student's patch tokens after
    block ``l`` and its token slimming module (tap ``blocks.{l}`` of a
    :class:`~distill.models.slimmed_vit.SlimmedViT`, prefix tokens dropped): ``(B, N_l, D)``;
    ``X_T,l`` the teacher's ``(B, N, D)``. Layers whose student keeps all ``N`` tokens are compared
    directly; the others go through a :class:`ReverseTSM` ``N_l → N`` built by :meth:`prepare`
    (the paper's "reverse version of TSM", an auto-encoder with the TSM as encoder).

    Args:
        layers: block indices distilled (the authors' code: every block; default the 4 blocks of the
            zoo's ``vit_tiny`` / ``sit_tiny``).
        T: KD temperature (1.0, authors' code ``--distillation-tau``).
        logits_weight, token_weight: ``λ_logits``, ``λ_token`` (2.0 and 2.0, authors' ``train.sh``).
        rtsm_ratio: hidden-width ratio of the RTSM's MLPs (4, authors' code).
        init_from_teacher: copy the teacher's weights into the student's parameters of the same
            name and shape once, when the models are bound (before the optimizer): the paper's
            student is the teacher plus TSMs, fine-tuned from the teacher's weights (the authors'
            scripts pass the teacher checkpoint as ``--finetune``). Needs a teacher module.

    Not done: the authors' code optionally adds a CNN teacher's hard label on a distillation
    token (``--lambda-cnn``), off in their scripts; here that is a separate loss if wanted.
    Only the paper's abstract could be read here; the form of every term and every default
    comes from the authors' code (github.com/Sense-X/SiT).
    """

    requires_prepare = True

    def __init__(self, layers: Sequence[int] = (0, 1, 2, 3), T: float = 1.0, logits_weight: float = 2.0,
                 token_weight: float = 2.0, rtsm_ratio: float = 4.0, init_from_teacher: bool = True,
                 weight: float = 1.0, warmup_epochs: int = 0) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        self.layers = [int(i) for i in layers]
        if not self.layers or len(set(self.layers)) != len(self.layers) or min(self.layers) < 0:
            raise ValueError(f"layers must be distinct block indices >= 0 (at least one), got {list(layers)}")
        if T <= 0:
            raise ValueError(f"T must be > 0, got {T}")
        for name, value in (("logits_weight", logits_weight), ("token_weight", token_weight)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if rtsm_ratio <= 0:
            raise ValueError(f"rtsm_ratio must be > 0, got {rtsm_ratio}")
        self.T, self.logits_weight, self.token_weight = float(T), float(logits_weight), float(token_weight)
        self.rtsm_ratio, self.init_from_teacher = float(rtsm_ratio), bool(init_from_teacher)
        self.student_taps = [f"blocks.{i}" for i in self.layers]
        self.teacher_taps = list(self.student_taps)
        self.rtsm: nn.ModuleDict | None = None
        self.student_prefix, self.teacher_prefix = 1, 1
        self._initialised = False

    def bind_models(self, student: nn.Module, teacher: nn.Module | None, example: Batch) -> None:
        for who, model in (("student", student), ("teacher", teacher)):
            blocks = getattr(model, "blocks", None)
            if model is not None and blocks is not None and max(self.layers) >= len(blocks):
                raise ValueError(f"sit_distill: layers={self.layers} but the {who} has {len(blocks)} blocks")
        self.student_prefix = int(getattr(student, "num_prefix_tokens", 1))
        self.teacher_prefix = int(getattr(teacher, "num_prefix_tokens", 1)) if teacher is not None else 1
        if self.init_from_teacher and not self._initialised:
            if teacher is None:
                raise ValueError("sit_distill: init_from_teacher=True needs a teacher module (a frozen model); "
                                 "set init_from_teacher=False for cached or ensemble teachers")
            self._copy_teacher(student, teacher)
            self._initialised = True

    @staticmethod
    @torch.no_grad()
    def _copy_teacher(student: nn.Module, teacher: nn.Module) -> None:
        mine, theirs = student.state_dict(), teacher.state_dict()
        same = [k for k, v in mine.items() if k in theirs and theirs[k].shape == v.shape]
        blocks = [k for k in mine if k.startswith("blocks.") and ".tsm." not in k]
        if not blocks or any(k not in same for k in blocks):
            bad = [k for k in blocks if k not in same][:3]
            raise ShapeMismatchError(
                f"sit_distill: init_from_teacher needs a student of the teacher's architecture (plus TSMs); "
                f"parameters {bad} have no teacher counterpart of the same shape (or set init_from_teacher=False)")
        for k in same:
            mine[k].copy_(theirs[k])

    def _tokens(self, student_view: View, teacher_view: View) -> tuple[list[Tensor], list[Tensor]]:
        s = [_tap(student_view, p, "student")[:, self.student_prefix:] for p in self.student_taps]
        t = [_tap(teacher_view, p, "teacher")[:, self.teacher_prefix:].detach() for p in self.teacher_taps]
        for p, a, b in zip(self.student_taps, s, t):
            if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
                raise ShapeMismatchError(
                    f"sit_distill: tap {p!r}: student tokens {tuple(a.shape)} and teacher tokens {tuple(b.shape)} "
                    "need equal batch and width (SiT distils from the same architecture without slimming)")
            if a.shape[1] > b.shape[1]:
                raise ShapeMismatchError(f"sit_distill: tap {p!r}: the student has more tokens ({a.shape[1]}) than "
                                         f"the teacher ({b.shape[1]}); is the teacher the slimmed model?")
        return s, t

    def prepare(self, student_view: View, teacher_view: View, batch: Batch) -> None:
        if self.rtsm is not None:
            return
        s, t = self._tokens(student_view, teacher_view)
        self.rtsm = nn.ModuleDict({
            str(i): nn.Identity() if a.shape[1] == b.shape[1] else ReverseTSM(a.shape[2], a.shape[1], b.shape[1],
                                                                              self.rtsm_ratio)
            for i, a, b in zip(self.layers, s, t)})
        self.rtsm.to(device=s[0].device, dtype=s[0].dtype)

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        if self.rtsm is None:
            raise RuntimeError("SiTDistill.prepare() must be called on an example batch before the first forward")
        s, t = self._tokens(student_view, teacher_view)
        recovered = [self.rtsm[str(i)](a) for i, a in zip(self.layers, s)]
        return DF.sit_distill_loss(_tap(student_view, "logits", "student"),
                                   _tap(teacher_view, "logits", "teacher").detach(), recovered, t, self.T,
                                   self.logits_weight, self.token_weight)

    def extra_repr(self) -> str:
        return (f"layers={self.layers}, T={self.T}, logits_weight={self.logits_weight}, "
                f"token_weight={self.token_weight}, init_from_teacher={self.init_from_teacher}, weight={self.weight}")


__all__ = ["ReverseTSM", "SiTDistill", "SIT_PAPER"]
