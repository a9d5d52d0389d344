"""Small vision transformers for 28×28 / 32×32 inputs, laid out like timm's so taps match.

``ViT`` follows "An Image is Worth 16x16 Words" (Dosovitskiy et al., ICLR 2021, arXiv 2010.11929),
pre-norm blocks, a class token and learned position embeddings; with ``distilled=True`` it adds
DeiT's distillation token and second head ("Training data-efficient image transformers &
distillation through attention", Touvron et al., ICML 2021, arXiv 2012.12877).

Why a zoo ViT when timm has them: timm imports torchvision at import time, and torchvision only
installs here as a 5.5 GB CUDA build (see the Makefile); the core suite runs on the CPU torch. The
module names are timm's ``VisionTransformer``'s, so one tap path serves both:

===================================  =========================================================
tap                                   tensor
===================================  =========================================================
``patch_embed``                       patch embeddings ``(B, L, D)``, ``L = (img/patch)²``
``blocks.{i}``                        tokens after block ``i``: ``(B, P + L, D)``, prefix first
``blocks.{i}.attn.attn_drop``         attention probabilities ``(B, heads, P + L, P + L)``
``blocks.{i}.attn.qkv``               ``(B, P + L, 3·D)``: queries, keys, values (in that order)
``norm``                              final normed tokens ``(B, P + L, D)``
``head`` / ``head_dist``              class-token / distillation-token logits ``(B, K)``
``head:input``                        the pooled feature ``(B, D)``
===================================  =========================================================

``P = num_prefix_tokens`` (1, or 2 with the distillation token). timm's attention modules compute
the same probabilities inside ``F.scaled_dot_product_attention`` unless fused attention is off
(``timm.layers.set_fused_attn(False)``), after which ``attn_drop`` sees them too.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from distill.models.registry import register_model


class PatchEmbed(nn.Module):
    """``(B, C, H, W)`` -> ``(B, L, D)``: a ``patch×patch`` conv with stride ``patch``, flattened."""

    def __init__(self, img_size: int, patch_size: int, in_channels: int, dim: int) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} must be a multiple of patch_size={patch_size}")
        self.img_size, self.patch_size = img_size, patch_size
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"ViT was built for (B, C, {self.img_size}, {self.img_size}) images, "
                             f"got {tuple(x.shape)}; set img_size to match")
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention; ``attn_drop`` receives the probabilities (a tap point)."""

    def __init__(self, dim: int, heads: int, attn_drop: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} must be a multiple of heads={heads}")
        self.num_heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        """``x`` (B, N, D); ``bias`` an optional additive attention bias broadcastable to (B, heads, N, N)
        (relative position bias)."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        logits = (q * self.scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        attn = self.attn_drop(logits.softmax(-1))
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x), bias)
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """A vision transformer (optionally DeiT-distilled) for small images.

    Args:
        num_classes: classes of ``head`` (and ``head_dist``).
        in_channels: image channels.
        img_size: square input side (28 for MNIST-shaped, 32 for CIFAR-shaped).
        patch_size: patch side; ``L = (img_size / patch_size)²`` patch tokens.
        dim: token width ``D``. depth: blocks. heads: attention heads. mlp_ratio: MLP hidden / ``D``.
        distilled: add DeiT's distillation token and ``head_dist``.

    ``forward(x)`` -> logits ``(B, K)``; distilled models return ``(head(cls) + head_dist(dist)) / 2``
    in training and evaluation alike (DeiT's inference rule; the DeiT loss reads the two heads
    through the ``head`` and ``head_dist`` taps). ``forward_features(x, mask=None)`` -> normed
    tokens ``(B, P + L, D)``; ``mask`` (B, L) bool replaces masked patch embeddings by the learned
    ``mask_token`` before the position embedding is added (SimMIM-style masked image modelling).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, img_size: int = 28, patch_size: int = 4,
                 dim: int = 64, depth: int = 4, heads: int = 4, mlp_ratio: float = 2.0,
                 distilled: bool = False) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.num_classes, self.embed_dim, self.distilled = num_classes, dim, distilled
        self.num_prefix_tokens = 2 if distilled else 1
        self.patch_embed = PatchEmbed(img_size, patch_size, in_channels, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dim)) if distilled else None
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + self.patch_embed.num_patches, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.head_dist = nn.Linear(dim, num_classes) if distilled else None
        self._init_weights()
        self.tap_points = ("patch_embed", *(f"blocks.{i}" for i in range(depth)),
                           *(f"blocks.{i}.attn.attn_drop" for i in range(depth)), "norm", "head:input", "head",
                           *(("head_dist",) if distilled else ()))

    def _init_weights(self) -> None:
        # timm's defaults: truncated-normal(0.02) tokens and linears, zero biases
        for p in (self.cls_token, self.pos_embed, self.mask_token, self.dist_token):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.patch_embed.grid_size

    def embed(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Prefix + patch tokens with position embeddings, ``(B, P + L, D)``."""
        tokens = self.patch_embed(x)
        if mask is not None:
            if mask.shape != tokens.shape[:2]:
                raise ValueError(f"mask must be (B, L) = {tuple(tokens.shape[:2])}, got {tuple(mask.shape)}")
            tokens = torch.where(mask.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
        prefix = [self.cls_token] + ([self.dist_token] if self.dist_token is not None else [])
        prefix = torch.cat([p.expand(tokens.shape[0], -1, -1) for p in prefix], 1)
        return torch.cat([prefix, tokens], 1) + self.pos_embed

    def forward_features(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        h = self.embed(x, mask)
        for block in self.blocks:
            h = block(h)
        return self.norm(h)

    def forward_head(self, tokens: Tensor) -> Tensor:
        logits = self.head(tokens[:, 0])
        if self.head_dist is not None:
            logits = (logits + self.head_dist(tokens[:, 1])) / 2
        return logits

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _vit(dim: int, depth: int, heads: int, distilled: bool, num_classes: int, in_channels: int, img_size: int,
         patch_size: int) -> ViT:
    return ViT(num_classes, in_channels, img_size, patch_size, dim=dim, depth=depth, heads=heads, distilled=distilled)


@register_model("vit_tiny")
def vit_tiny(num_classes: int = 10, in_channels: int = 1, img_size: int = 28, patch_size: int = 4) -> ViT:
    """~0.14M parameters: D=64, 4 blocks, 4 heads (49 patch tokens at 28×28)."""
    return _vit(64, 4, 4, False, num_classes, in_channels, img_size, patch_size)


@register_model("deit_tiny")
def deit_tiny(num_classes: int = 10, in_channels: int = 1, img_size: int = 28, patch_size: int = 4) -> ViT:
    """``vit_tiny`` with DeiT's distillation token and second head."""
    return _vit(64, 4, 4, True, num_classes, in_channels, img_size, patch_size)


@register_model("vit_small")
def vit_small(num_classes: int = 10, in_channels: int = 1, img_size: int = 28, patch_size: int = 4) -> ViT:
    """~0.8M parameters: D=128, 6 blocks, 4 heads; a ViT teacher (or a self-supervised teacher)."""
    return _vit(128, 6, 4, False, num_classes, in_channels, img_size, patch_size)


def num_prefix_tokens(model: nn.Module) -> int:
    """How many prefix tokens (class, distillation, register) lead a ViT's token sequence:
    ``model.num_prefix_tokens`` (the zoo's and timm's attribute), else 1."""
    return int(getattr(model, "num_prefix_tokens", 1))


def patch_grid(model: nn.Module) -> tuple[int, int] | None:
    """The patch grid ``(h, w)`` of a zoo or timm ViT (``patch_embed.grid_size``), else ``None``."""
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    return (int(grid[0]), int(grid[1])) if grid is not None else None


def tokens_to_map(tokens: Tensor, prefix: int, grid: tuple[int, int] | None = None) -> Tensor:
    """Patch tokens ``(B, P + L, D)`` -> a map ``(B, D, h, w)`` (prefix dropped); ``grid`` defaults to
    the square ``√L × √L``."""
    patches = tokens[:, prefix:]
    h, w = grid if grid is not None else (math.isqrt(patches.shape[1]),) * 2
    if h * w != patches.shape[1]:
        raise ValueError(f"{patches.shape[1]} patch tokens do not fill a {h}x{w} grid")
    return patches.transpose(1, 2).reshape(patches.shape[0], patches.shape[2], h, w)
