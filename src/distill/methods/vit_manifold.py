"""Fine-grained manifold distillation for vision transformers (Hao et al., NeurIPS 2022).

The math lives in :mod:`distill.functional.vit_manifold`; this module picks the layers, drops the
prefix tokens, merges patch grids of different sizes and draws the random patch sample.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from distill import functional as DF
from distill.adapters import ShapeMismatchError
from distill.batch import Batch, View
from distill.methods._views import tap as _tap, tap_pairs as _pairs
from distill.methods.base import Method, Paper, register
from distill.models.vit import num_prefix_tokens

# vit_tiny (4 blocks) <- vit_small (6 blocks): the first and the last blocks of each, as the authors'
# DeiT-Tiny (12 blocks) <- CaiT-S24 (24 blocks) command pairs student 0-3, 8-11 with teacher 0-3, 20-23
_ZOO_PAIRS = (("blocks.0", "blocks.0"), ("blocks.1", "blocks.1"), ("blocks.2", "blocks.4"), ("blocks.3", "blocks.5"))


def _patch_tokens(x: Tensor, prefix: int | None, name: str, channels_last: bool = False) -> Tensor:
    """Patch tokens ``(B, L, D)``: a ViT's tokens ``(B, P + L, D)`` without their ``P`` prefix tokens, or a
    CNN's feature map ``(B, C, H, W)`` read as ``H·W`` tokens of width ``C`` (row-major); with
    ``channels_last`` a 4-D tap is ``(B, H, W, C)`` (timm's Swin stages)."""
    if x.dim() == 4:
        return x.flatten(1, 2) if channels_last else x.flatten(2).transpose(1, 2)
    if x.dim() != 3:
        raise ShapeMismatchError(f"ManifoldKD needs token tensors (B, N, D) or feature maps (B, C, H, W): "
                                 f"{name} {tuple(x.shape)}")
    if prefix is None:
        raise RuntimeError(f"ManifoldKD: the prefix-token count of {name.split(':')[0]} is unknown; call "
                           "bind_models(student, teacher, batch) (Distiller.prepare does) or pass student_prefix= "
                           "and teacher_prefix=")
    return x[:, prefix:]


def _sides(sides: Sequence[str], what: str) -> frozenset[str]:
    if isinstance(sides, str):
        sides = (sides,)
    bad = [x for x in sides if x not in ("student", "teacher")]
    if bad:
        raise ValueError(f"{what}: channels_last names sides 'student' / 'teacher', got {bad}")
    return frozenset(sides)


@register(
    "manifold_kd",
    "vit",
    Paper(
        title="Learning Efficient Vision Transformers via Fine-Grained Manifold Distillation",
        authors="Z. Hao, J. Guo, D. Jia, K. Han, Y. Tang, C. Zhang, H. Hu, Y. Wang",
        year=2022,
        arxiv="2107.01378",
        venue="NeurIPS",
    ),
)
class ManifoldKD(Method):
    """Patch-level manifold distillation: α·intra + β·inter + γ·random relation losses, averaged over layer pairs.

    For each (student tap, teacher tap) pair of transformer blocks, the patch tokens ``(B, L, D)``
    (prefix tokens dropped: class / distillation tokens, counted from each model's
    ``num_prefix_tokens`` in :meth:`bind_models`) give three normalised relation maps
    (:mod:`distill.functional.vit_manifold`): per image ``L×L`` (intra), per patch position ``B×B``
    (inter), and ``K×K`` over K patches drawn at random from the batch (random); the pair's loss
    is ``intra_weight·L_intra + inter_weight·L_inter + random_weight·L_random``, and the method
    returns the mean over pairs (the authors' code divides the sum over pairs by their number).

    No projector is needed: relations are cosine similarities, free of the widths, so a D=64
    student distils from a D=128 teacher directly (the method has no trainable parts). Token counts
    must match; when they differ by a square factor (e.g. patch size 4 vs 8 on the same image), the
    finer grid is merged to the coarser one by concatenating each block of neighbouring tokens
    (:func:`distill.functional.manifold_merge_patches`, the authors' code's ``merge``); any other
    mismatch is an error naming both shapes. A CNN teacher's feature map ``(B, C, H, W)`` is read as
    ``H·W`` tokens of width ``C`` (ours: the paper distils ViT into ViT), so ``cnn_teacher_mnist``'s
    ``stage2`` (7×7) pairs with a 28×28 / patch-4 ViT's 49 patches, its ``stage1`` (14×14) after
    merging 2×2 neighbours.

    Defaults: the paper's text could not be read here (only its abstract). The weights α = 4 (intra),
    β = 0.1 (inter), γ = 0.2 (random), K = 192 and the layer choice (first and last blocks) are
    the authors' ImageNet command (huawei-noah/Efficient-Computing ``Distillation/ManifoldKD``
    README: ``--w-patch 4 --w-sample 0.1 --w-rand 0.2 --K 192 --s-id 0 1 2 3 8 9 10 11
    --t-id 0 1 2 3 20 21 22 23``, with ``--distillation-type soft --distillation-alpha 1
    --distillation-beta 1``: soft KD at τ = 1 with weight 1, cross-entropy weight 1 - 1 = 0, manifold
    weight 1). Compose that KD term in the losses (``{"kd": {"T": 1.0}, "manifold_kd": 1.0}``)
    rather than here. ``pairs`` defaults to the zoo's ``vit_tiny`` (4 blocks) ← ``vit_small`` (6
    blocks): student blocks 0, 1, 2, 3 ← teacher blocks 0, 1, 4, 5 (ours, following that pattern).

    The random sample is drawn from a ``torch.Generator`` owned by the method (seeded with
    ``seed``); in eval mode a fresh generator seeded with ``seed`` is used, so validation is
    reproducible. Each layer pair draws its own sample (in pair order), as in the authors' code.

    Args:
        pairs: (student tap, teacher tap) pairs of token tensors ``(B, P + L, D)``.
        intra_weight, inter_weight, random_weight: α, β, γ.
        num_samples: K, the patches of the random relation.
        student_prefix, teacher_prefix: prefix-token counts; ``None`` = from the models in
            :meth:`bind_models` (``model.num_prefix_tokens``, 1 when absent).
        channels_last: the sides (``"student"``, ``"teacher"``) whose 4-D taps are channels-last
            ``(B, H, W, C)``, as timm's hierarchical Swin stages are; a 4-D tap is otherwise a CNN's
            ``(B, C, H, W)`` (the two cannot be told apart from the shape).
    """

    def __init__(
        self,
        pairs: Sequence[tuple[str, str]] = _ZOO_PAIRS,
        intra_weight: float = 4.0,
        inter_weight: float = 0.1,
        random_weight: float = 0.2,
        num_samples: int = 192,
        student_prefix: int | None = None,
        teacher_prefix: int | None = None,
        channels_last: Sequence[str] = (),
        seed: int = 0,
        weight: float = 1.0,
        warmup_epochs: int = 0,
    ) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        self.pairs = _pairs(pairs, "ManifoldKD")
        for name, w in (("intra_weight", intra_weight), ("inter_weight", inter_weight),
                        ("random_weight", random_weight)):
            if not w >= 0:
                raise ValueError(f"{name} must be >= 0, got {w}")
        if int(num_samples) < 1:
            raise ValueError(f"num_samples (K) must be >= 1, got {num_samples}")
        for name, p in (("student_prefix", student_prefix), ("teacher_prefix", teacher_prefix)):
            if p is not None and int(p) < 0:
                raise ValueError(f"{name} must be >= 0 or None, got {p}")
        self.intra_weight, self.inter_weight = float(intra_weight), float(inter_weight)
        self.random_weight, self.num_samples, self.seed = float(random_weight), int(num_samples), int(seed)
        self.student_prefix = None if student_prefix is None else int(student_prefix)
        self.teacher_prefix = None if teacher_prefix is None else int(teacher_prefix)
        self.channels_last = _sides(channels_last, "ManifoldKD")
        self.student_taps = [s for s, _ in self.pairs]
        self.teacher_taps = [t for _, t in self.pairs]
        self.generator = torch.Generator().manual_seed(self.seed)

    def bind_models(self, student: nn.Module, teacher: nn.Module | None, example: Batch) -> None:
        if self.student_prefix is None:
            self.student_prefix = num_prefix_tokens(student)
        if self.teacher_prefix is None and teacher is not None:
            self.teacher_prefix = num_prefix_tokens(teacher)

    def patch_tokens(self, student_view: View, teacher_view: View) -> list[tuple[Tensor, Tensor]]:
        """Each pair's patch tokens ``(B, L, D_s)``, ``(B, L, D_t)`` (teacher detached), grids merged to agree."""
        out = []
        for s_path, t_path in self.pairs:
            s = _patch_tokens(_tap(student_view, s_path, "student"), self.student_prefix, f"student:{s_path}",
                              "student" in self.channels_last)
            t = _patch_tokens(_tap(teacher_view, t_path, "teacher").detach(), self.teacher_prefix, f"teacher:{t_path}",
                              "teacher" in self.channels_last)
            if s.shape[0] != t.shape[0]:
                raise ShapeMismatchError(f"batch sizes differ: student:{s_path} {tuple(s.shape)}, "
                                         f"teacher:{t_path} {tuple(t.shape)}")
            if s.shape[1] != t.shape[1]:
                try:
                    if s.shape[1] > t.shape[1]:
                        s = DF.manifold_merge_patches(s, t.shape[1])
                    else:
                        t = DF.manifold_merge_patches(t, s.shape[1])
                except ValueError as e:
                    raise ShapeMismatchError(
                        f"ManifoldKD: student:{s_path} has {s.shape[1]} patch tokens and teacher:{t_path} "
                        f"{t.shape[1]} (after dropping {self.student_prefix} / {self.teacher_prefix} prefix "
                        f"tokens); {e}") from None
            out.append((s, t))
        return out

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        gen = self.generator if self.training else torch.Generator().manual_seed(self.seed)
        total: Tensor | None = None
        pairs = self.patch_tokens(student_view, teacher_view)
        for s, t in pairs:
            idx = DF.manifold_random_indices(s.shape[0], s.shape[1], self.num_samples, gen, device=s.device)
            loss = DF.manifold_layer_loss(s, t, idx, self.intra_weight, self.inter_weight, self.random_weight)
            total = loss if total is None else total + loss
        assert total is not None
        return total / len(pairs)

    def extra_repr(self) -> str:
        return (f"pairs={self.pairs}, intra_weight={self.intra_weight}, inter_weight={self.inter_weight}, "
                f"random_weight={self.random_weight}, num_samples={self.num_samples}, weight={self.weight}")


__all__ = ["ManifoldKD"]
