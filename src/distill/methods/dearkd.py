"""DearKD: early distillation of a CNN's intermediate features into a ViT, then response distillation alone.

The math is in :mod:`distill.functional.dearkd`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from distill import functional as DF
from distill.adapters import ShapeMismatchError
from distill.batch import Batch, View
from distill.methods._views import module_key, tap as _tap, tap_pairs
from distill.methods.base import Method, Paper, register
from distill.models.vit import patch_grid, tokens_to_map

DEARKD_PAPER = Paper(
    title="DearKD: Data-Efficient Early Knowledge Distillation for Vision Transformers",
    authors="X. Chen, Q. Cao, Y. Zhong, J. Zhang, S. Gao, D. Tao",
    year=2022,
    arxiv="2204.12997",
    venue="CVPR",
)


@register("dearkd", "vit", DEARKD_PAPER)
class DearKD(Method):
    """DearKD: DeiT hard distillation throughout, plus CNN-feature distillation in the early epochs.

    ``L = ½·CE(z_cls, y) + ½·CE(z_dist, argmax z_T) + β·[epoch is early]·(1/P)·Σ_p MSE(φ_p(F_S,p), F_T,p)``
    (:func:`distill.functional.dearkd_response_loss`, :func:`distill.functional.dearkd_feature_loss`).

    ``F_S,p``: the ViT's tokens at a student tap (default the attention outputs of the first two
    blocks, ``blocks.{i}.attn``, ``(B, P + L, D)``), the prefix dropped and the patches laid out on
    the patch grid (``(B, D, h, w)``); ``φ_p`` a 1x1 conv ``D → C_p`` (built by :meth:`prepare`);
    the larger of the two maps is average-pooled to the smaller's size. ``F_T,p``: the CNN's map
    (``stage1``, ``stage2`` of ``cnn_teacher_mnist``: ``(B, 64, 14, 14)``, ``(B, 128, 7, 7)``).

    Args:
        pairs: (student tap, teacher tap) feature pairs.
        beta: weight of the feature term (ours: 1.0).
        early_epochs: epochs (from 0) with the feature term; ``None``: ``ceil(early_fraction · total)``.
        early_fraction: share of the run with the feature term when ``early_epochs`` is ``None`` (ours: 0.5).
        heads: student taps of the class-token and distillation-token heads (``("head", "head_dist")``
            for ``deit_tiny``); a single entry (``("head",)``) for a ViT without distillation token,
            whose class head then takes both cross-entropies.

    Departures: only the paper's abstract could be read here, so (i) the paper's multi-head
    convolutional attention (MHCA) student layers are not built: the zoo ViT's plain attention
    outputs are aligned with the CNN features; (ii) the aligner (1x1 conv), the MSE, β and the stage
    split are ours; (iii) the response term is DeiT's hard distillation (the paper builds on DeiT).
    The data-free stage (DeepInversion with the paper's boundary-preserving intra-divergence loss)
    is :func:`distill.strategies.dearkd.fit_dearkd_data_free` without that loss.
    """

    requires_prepare = True
    needs_targets = True

    def __init__(self, pairs: Sequence[tuple[str, str]] = (("blocks.0.attn", "stage1"), ("blocks.1.attn", "stage2")),
                 beta: float = 1.0, early_epochs: int | None = None, early_fraction: float = 0.5,
                 heads: Sequence[str] = ("head", "head_dist"), weight: float = 1.0, warmup_epochs: int = 0) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        self.pairs = tap_pairs(pairs, "DearKD")
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        if early_epochs is not None and early_epochs < 0:
            raise ValueError(f"early_epochs must be >= 0 or None, got {early_epochs}")
        if not 0.0 <= early_fraction <= 1.0:
            raise ValueError(f"early_fraction must be in [0, 1], got {early_fraction}")
        self.heads = [str(h) for h in heads]
        if len(self.heads) not in (1, 2):
            raise ValueError(f"heads must name the class head, and optionally the distillation head, got {list(heads)}")
        self.beta, self.early_epochs, self.early_fraction = float(beta), early_epochs, float(early_fraction)
        self.student_taps = [*dict.fromkeys([s for s, _ in self.pairs] + self.heads)]
        self.teacher_taps = [*dict.fromkeys(t for _, t in self.pairs)]
        self.align: nn.ModuleDict | None = None
        self.prefix = 1
        self.grid: tuple[int, int] | None = None

    @property
    def feature_active(self) -> bool:
        """Whether the current epoch is in the early stage (the feature term is on)."""
        return DF.dearkd_feature_active(self.epoch, self.total_epochs, self.early_epochs, self.early_fraction)

    def bind_models(self, student: nn.Module, teacher: nn.Module | None, example: Batch) -> None:
        self.prefix = int(getattr(student, "num_prefix_tokens", 1))
        self.grid = patch_grid(student)

    def _maps(self, student_view: View, teacher_view: View) -> tuple[list[Tensor], list[Tensor]]:
        fs, ft = [], []
        for sp, tp in self.pairs:
            s, t = _tap(student_view, sp, "student"), _tap(teacher_view, tp, "teacher").detach()
            if s.dim() != 3 or t.dim() != 4 or s.shape[0] != t.shape[0]:
                raise ShapeMismatchError(
                    f"DearKD pairs ViT tokens (B, P + L, D) with CNN maps (B, C, H, W): student {sp!r} "
                    f"{tuple(s.shape)}, teacher {tp!r} {tuple(t.shape)}")
            s = tokens_to_map(s, self.prefix, self.grid)
            (hs, ws), (ht, wt) = s.shape[-2:], t.shape[-2:]
            if hs * ws > ht * wt:
                s = F.adaptive_avg_pool2d(s, (ht, wt))
            elif (hs, ws) != (ht, wt):
                t = F.adaptive_avg_pool2d(t, (hs, ws))
            fs.append(s)
            ft.append(t)
        return fs, ft

    def prepare(self, student_view: View, teacher_view: View, batch: Batch) -> None:
        if self.align is not None:
            return
        fs, ft = self._maps(student_view, teacher_view)
        self.align = nn.ModuleDict({module_key(sp): nn.Conv2d(s.shape[1], t.shape[1], 1)
                                    for (sp, _), s, t in zip(self.pairs, fs, ft)})
        self.align.to(device=fs[0].device, dtype=fs[0].dtype)

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        if self.align is None:
            raise RuntimeError("DearKD.prepare() must be called on an example batch before the first forward")
        targets = batch.targets
        if targets is None:
            raise ValueError("DearKD needs labelled batches (its class head is trained with cross-entropy)")
        if getattr(batch, "mix_targets", None) is not None:
            raise ValueError("DearKD does not take mixup/cutmix batches: switch batch mixing off for this loss")
        cls_logits = _tap(student_view, self.heads[0], "student")
        dist_logits = _tap(student_view, self.heads[-1], "student")
        loss = DF.dearkd_response_loss(cls_logits, dist_logits, targets, _tap(teacher_view, "logits", "teacher").detach())
        if self.beta > 0 and self.feature_active:
            fs, ft = self._maps(student_view, teacher_view)
            aligned = [self.align[module_key(sp)](s) for (sp, _), s in zip(self.pairs, fs)]
            loss = loss + self.beta * DF.dearkd_feature_loss(aligned, ft)
        return loss

    def extra_repr(self) -> str:
        return (f"pairs={self.pairs}, beta={self.beta}, early_epochs={self.early_epochs}, "
                f"early_fraction={self.early_fraction}, heads={self.heads}, weight={self.weight}")


__all__ = ["DEARKD_PAPER", "DearKD"]
