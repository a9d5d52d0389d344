"""ViTKD (Yang et al. 2022): mimic the teacher's shallow layers, generate its deep layer.

The math lives in :mod:`distill.functional.vitkd`; this module owns the trainable parts (one
linear layer per mimicked layer, the deep layer's linear layer, the mask token and the generative
block), built by :meth:`ViTKD.prepare` from one example batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from distill import functional as DF
from distill.adapters import ShapeMismatchError
from distill.batch import Batch, View
from distill.methods._views import tap as _tap
from distill.methods.base import Method, Paper, register
from distill.models.vit import num_prefix_tokens, patch_grid


def _linear(d_in: int, d_out: int) -> nn.Module:
    """Identity when the widths agree, else a linear layer with bias (the authors' ``align``)."""
    return nn.Identity() if d_in == d_out else nn.Linear(d_in, d_out)


def vitkd_generator(dim: int) -> nn.Sequential:
    """ViTKD's generative block on the token grid ``(B, D, h, w)``: 3x3 conv → ReLU → 3x3 conv, width ``dim``."""
    return nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), nn.ReLU(), nn.Conv2d(dim, dim, 3, padding=1))


@register(
    "vitkd",
    "vit",
    Paper(
        title="ViTKD: Practical Guidelines for ViT feature knowledge distillation",
        authors="Z. Yang, Z. Li, A. Zeng, Z. Li, C. Yuan, Y. Li",
        year=2022,
        arxiv="2209.02432",
    ),
)
class ViTKD(Method):
    """ViTKD: α·mimicking of the shallow layers + β·masked generation of the deep layer.

    Mimicking: each shallow student layer's patch tokens pass through their own linear layer to
    the teacher's width and match the teacher's tokens with a squared error
    (:func:`distill.functional.vitkd_mimic_loss`). Generation: the student's deep-layer tokens
    pass through a linear layer to the teacher's width, a random ratio λ of each image's tokens is
    replaced by a learned mask token (:func:`distill.functional.vitkd_random_mask`), the token
    grid goes through a 3x3 conv → ReLU → 3x3 conv block, and its output at the masked tokens
    matches the teacher's deep-layer tokens (:func:`distill.functional.vitkd_generation_loss`).
    Prefix tokens (class / distillation) are dropped on both sides (``num_prefix_tokens`` of each
    model, read in :meth:`bind_models`); the patch grid is the student's ``patch_embed.grid_size``
    (square ``√L × √L`` when unknown). Linear layers are identities when the widths agree. A CNN
    teacher's feature map ``(B, C, H, W)`` is read as ``H·W`` tokens of width ``C`` (ours: the paper
    distils ViT into ViT), e.g. ``cnn_teacher_mnist``'s ``stage2`` (7×7) for 49 patch tokens.

    Defaults: only the paper's abstract could be read here. The taps (outputs of the first two
    blocks; the last block's tokens after the final norm), α = 3e-5, β = 3e-6, λ = 0.5, the
    zero-initialised mask token, masking after the linear layer and the conv block are the
    authors' code (yzd-v/cls_KD ``mmcls/models/dis_losses/vitkd.py`` and its ViT backbones,
    configs ``configs/distillers/imagenet/deit-s3_distill_deit-t_img.py``). Those weights were set
    for DeiT at 224×224 (196 tokens, D_t = 384); with 49 tokens and D_t = 128 the summed squared
    errors are ~12× smaller, so a recipe may raise ``weight``. The authors train the student with
    cross-entropy plus ViTKD (``{"ce": 1.0, "vitkd": 1.0}``), optionally plus a logit loss.

    The mask is drawn from a ``torch.Generator`` owned by the method (seeded with ``seed``); in
    eval mode a fresh generator seeded with ``seed`` is used (reproducible validation).

    Args:
        shallow_pairs: (student tap, teacher tap) pairs mimicked, tokens ``(B, P + L, D)``.
        deep_pair: the (student tap, teacher tap) pair generated.
        mimic_weight: α. generation_weight: β. mask_ratio: λ in (0, 1].
    """

    requires_prepare = True  # linear layers, mask token and generative block depend on the widths

    def __init__(
        self,
        shallow_pairs: Sequence[tuple[str, str]] = (("blocks.0", "blocks.0"), ("blocks.1", "blocks.1")),
        deep_pair: tuple[str, str] = ("norm", "norm"),
        mimic_weight: float = 3e-5,
        generation_weight: float = 3e-6,
        mask_ratio: float = 0.5,
        seed: int = 0,
        weight: float = 1.0,
        warmup_epochs: int = 0,
    ) -> None:
        super().__init__(weight=weight, warmup_epochs=warmup_epochs)
        self.shallow_pairs = [(str(a), str(b)) for a, b in shallow_pairs]
        if len(tuple(deep_pair)) != 2:
            raise ValueError(f"deep_pair must be one (student_tap, teacher_tap) pair, got {deep_pair!r}")
        self.deep_pair = (str(deep_pair[0]), str(deep_pair[1]))
        if not mimic_weight >= 0 or not generation_weight >= 0:
            raise ValueError(f"mimic_weight and generation_weight must be >= 0, got {mimic_weight}, {generation_weight}")
        if not 0.0 < mask_ratio <= 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1], got {mask_ratio}")
        self.mimic_weight, self.generation_weight = float(mimic_weight), float(generation_weight)
        self.mask_ratio, self.seed = float(mask_ratio), int(seed)
        self.student_taps = [s for s, _ in self.shallow_pairs] + [self.deep_pair[0]]
        self.teacher_taps = [t for _, t in self.shallow_pairs] + [self.deep_pair[1]]
        self.student_prefix: int | None = None
        self.teacher_prefix: int | None = None
        self.grid: tuple[int, int] | None = None
        self.mimic_align: nn.ModuleList | None = None
        self.align: nn.Module | None = None
        self.register_parameter("mask_token", None)  # (1, 1, D_t), built by prepare()
        self.generation: nn.Module | None = None
        self.generator = torch.Generator().manual_seed(self.seed)

    def bind_models(self, student: nn.Module, teacher: nn.Module | None, example: Batch) -> None:
        self.student_prefix = num_prefix_tokens(student)
        self.teacher_prefix = num_prefix_tokens(teacher) if teacher is not None else 1
        self.grid = patch_grid(student)

    def _patches(self, view: View, path: str, side: str) -> Tensor:
        x = _tap(view, path, side)
        if x.dim() == 4:  # a CNN's feature map (B, C, H, W): H·W tokens of width C, row-major, no prefix
            return x.flatten(2).transpose(1, 2)
        if x.dim() != 3:
            raise ShapeMismatchError(f"ViTKD needs token tensors (B, N, D) or feature maps (B, C, H, W): "
                                     f"{side}:{path} {tuple(x.shape)}")
        prefix = self.student_prefix if side == "student" else self.teacher_prefix
        if prefix is None:
            raise RuntimeError("ViTKD: bind_models(student, teacher, batch) must run first (Distiller.prepare does)")
        return x[:, prefix:]

    def _pairs(self, student_view: View, teacher_view: View) -> list[tuple[Tensor, Tensor, str]]:
        out = []
        for s_path, t_path in [*self.shallow_pairs, self.deep_pair]:
            s = self._patches(student_view, s_path, "student")
            t = self._patches(teacher_view, t_path, "teacher").detach()
            if s.shape[:2] != t.shape[:2]:
                raise ShapeMismatchError(
                    f"ViTKD needs the same batch size and patch-token count: student:{s_path} {tuple(s.shape)}, "
                    f"teacher:{t_path} {tuple(t.shape)} (prefix tokens dropped)")
            out.append((s, t, s_path))
        return out

    def prepare(self, student_view: View, teacher_view: View, batch: Batch) -> None:
        if self.generation is not None:
            return
        pairs = self._pairs(student_view, teacher_view)
        s_deep, t_deep, _ = pairs[-1]
        kw = {"device": s_deep.device, "dtype": s_deep.dtype}
        self.mimic_align = nn.ModuleList(_linear(s.shape[-1], t.shape[-1]).to(**kw) for s, t, _ in pairs[:-1])
        self.align = _linear(s_deep.shape[-1], t_deep.shape[-1]).to(**kw)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, t_deep.shape[-1], **kw))
        self.generation = vitkd_generator(t_deep.shape[-1]).to(**kw)
        n = s_deep.shape[1]
        if self.grid is None or self.grid[0] * self.grid[1] != n:
            side = math.isqrt(n)
            if side * side != n:
                raise ShapeMismatchError(f"ViTKD: {n} patch tokens of student:{self.deep_pair[0]} do not fill a "
                                         "square grid and the student has no patch_embed.grid_size")
            self.grid = (side, side)

    def draw_mask(self, batch: int, patches: int, device: torch.device) -> Tensor:
        """The generation mask ``(B, L)`` bool, True = masked."""
        gen = self.generator if self.training else torch.Generator().manual_seed(self.seed)
        return DF.vitkd_random_mask(batch, patches, self.mask_ratio, gen, device=device)

    def generate(self, student: Tensor, mask: Tensor) -> Tensor:
        """G(fill(align(S), M)): the generated deep-layer tokens ``(B, L, D_t)``."""
        if self.generation is None or self.align is None or self.mask_token is None or self.grid is None:
            raise RuntimeError("ViTKD.prepare() must be called on an example batch before the first forward")
        x = DF.vitkd_fill_masked(self.align(student), mask, self.mask_token)
        b, n, d = x.shape
        grid = x.transpose(1, 2).reshape(b, d, *self.grid)
        return self.generation(grid).flatten(2).transpose(1, 2)

    def forward(self, student_view: View, teacher_view: View, batch: Batch) -> Tensor:
        if self.generation is None or self.mimic_align is None:
            raise RuntimeError("ViTKD.prepare() must be called on an example batch before the first forward")
        pairs = self._pairs(student_view, teacher_view)
        shallow, (s_deep, t_deep, _) = pairs[:-1], pairs[-1]
        total = s_deep.new_zeros(())
        if shallow:
            mimic = DF.vitkd_mimic_loss([a(s) for a, (s, _, _) in zip(self.mimic_align, shallow)],
                                        [t for _, t, _ in shallow])
            total = total + self.mimic_weight * mimic
        mask = self.draw_mask(s_deep.shape[0], s_deep.shape[1], s_deep.device)
        gen = DF.vitkd_generation_loss(self.generate(s_deep, mask), t_deep, mask, self.mask_ratio)
        return total + self.generation_weight * gen

    def extra_repr(self) -> str:
        return (f"shallow={self.shallow_pairs}, deep={self.deep_pair}, mimic_weight={self.mimic_weight}, "
                f"generation_weight={self.generation_weight}, mask_ratio={self.mask_ratio}, weight={self.weight}")


__all__ = ["ViTKD", "vitkd_generator"]
