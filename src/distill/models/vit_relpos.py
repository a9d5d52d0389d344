"""A ViT with FD's shared relative position bias and stochastic depth (drop path).

Feature Distillation (Wei et al., "Contrastive Learning Rivals Masked Image Modeling in
Fine-tuning via Feature Distillation", 2022, arXiv 2205.14141) trains its student ViT with one
relative position bias table shared by all blocks (BEiT's "shared relative position bias") instead
of absolute position embeddings, and with drop path on the student only (the teacher runs without:
"asymmetric drop path"). The authors' code (github.com/SwinTransformer/Feature-Distillation,
``configs/pretrain/*``: ``USE_APE: False``, ``USE_SHARED_RPB: True``, ``DROP_PATH_RATE: 0.3`` for
ViT-B) is followed here.

:class:`RelPosViT` is the zoo's :class:`~distill.models.vit.ViT` (same module names, so the same
tap paths) whose blocks add :class:`SharedRelativePositionBias` to their attention logits and drop
their residual branches at random during training.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from distill.models.registry import register_model
from distill.models.vit import Block, ViT


def relative_position_index(grid: tuple[int, int], prefix: int) -> Tensor:
    """The index into a bias table of ``(2h - 1)(2w - 1) + 3`` rows for each (query, key) token pair.

    Patch pair ``(i, j)`` at grid positions ``(y_i, x_i)``, ``(y_j, x_j)`` reads row
    ``(y_i - y_j + h - 1)(2w - 1) + (x_i - x_j + w - 1)``: one row per relative offset. The prefix
    tokens (class / distillation) have no position; as in BEiT they read three extra rows:
    ``R`` (prefix query -> any key), ``R + 1`` (patch query -> prefix key) and ``R + 2`` (prefix ->
    prefix), ``R = (2h - 1)(2w - 1)``. Returns ``(P + h·w, P + h·w)`` long.
    """
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + h - 1
    dx = xs[:, None] - xs[None, :] + w - 1
    rows = (2 * h - 1) * (2 * w - 1)
    n = prefix + h * w
    index = torch.empty(n, n, dtype=torch.long)
    index[prefix:, prefix:] = dy * (2 * w - 1) + dx
    index[:prefix, :] = rows
    index[prefix:, :prefix] = rows + 1
    index[:prefix, :prefix] = rows + 2
    return index


class SharedRelativePositionBias(nn.Module):
    """A learned ``(rows, heads)`` table (zeros at start, as the authors' code) read through
    :func:`relative_position_index`; ``forward()`` -> the additive attention bias ``(heads, N, N)``."""

    def __init__(self, grid: tuple[int, int], heads: int, prefix: int) -> None:
        super().__init__()
        rows = (2 * grid[0] - 1) * (2 * grid[1] - 1) + 3
        self.table = nn.Parameter(torch.zeros(rows, heads))
        self.register_buffer("index", relative_position_index(grid, prefix), persistent=False)

    def forward(self) -> Tensor:
        n = self.index.shape[0]
        return self.table[self.index.flatten()].reshape(n, n, -1).permute(2, 0, 1)


def drop_path(x: Tensor, rate: float, training: bool) -> Tensor:
    """Stochastic depth: zero a sample's residual branch with probability ``rate`` and scale the kept
    ones by ``1 / (1 - rate)`` (training only). ``x`` (B, ...)."""
    if rate <= 0.0 or not training:
        return x
    keep = 1.0 - rate
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    return x * x.new_empty(shape).bernoulli_(keep) / keep


class DropPathBlock(Block):
    """The zoo's pre-norm block with drop path on both residual branches."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, drop_path: float = 0.0) -> None:
        super().__init__(dim, heads, mlp_ratio)
        self.drop_path = float(drop_path)

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        x = x + drop_path(self.attn(self.norm1(x), bias), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class RelPosViT(ViT):
    """:class:`~distill.models.vit.ViT` with FD's shared relative position bias and drop path.

    Args (besides ViT's):
        drop_path: the largest drop-path rate; block ``i`` of ``depth`` uses ``drop_path · i / (depth - 1)``
            (timm's linear rule, as the authors' code).
        abs_pos: keep the learned absolute position embedding too (FD's ViT configs: off, so it is
            fixed at zero and frozen).

    Module names stay the ViT's (``blocks.{i}``, ``norm``, ``head``...) plus ``rel_pos_bias``.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, img_size: int = 28, patch_size: int = 4,
                 dim: int = 64, depth: int = 4, heads: int = 4, mlp_ratio: float = 2.0, distilled: bool = False,
                 drop_path: float = 0.1, abs_pos: bool = False) -> None:
        super().__init__(num_classes, in_channels, img_size, patch_size, dim, depth, heads, mlp_ratio, distilled)
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(DropPathBlock(dim, heads, mlp_ratio, r) for r in rates)
        self.rel_pos_bias = SharedRelativePositionBias(self.grid_size, heads, self.num_prefix_tokens)
        self.abs_pos = bool(abs_pos)
        if not abs_pos:
            nn.init.zeros_(self.pos_embed)
            self.pos_embed.requires_grad_(False)
        self._init_weights_blocks()

    def _init_weights_blocks(self) -> None:
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        h = self.embed(x, mask)
        bias = self.rel_pos_bias().to(h.dtype)
        for block in self.blocks:
            h = block(h, bias)
        return self.norm(h)


@register_model("vit_tiny_rpb")
def vit_tiny_rpb(num_classes: int = 10, in_channels: int = 1, img_size: int = 28, patch_size: int = 4,
                 drop_path: float = 0.1) -> RelPosViT:
    """``vit_tiny`` (D=64, 4 blocks, 4 heads) with FD's shared relative position bias, no absolute
    position embedding, and drop path 0.1 (ours: the paper's ViT-B uses 0.3; a 4-block model less)."""
    return RelPosViT(num_classes, in_channels, img_size, patch_size, dim=64, depth=4, heads=4, drop_path=drop_path)
