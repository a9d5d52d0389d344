"""Self-slimmed ViT: the zoo :class:`~distill.models.vit.ViT` with token slimming modules (TSMs).

Paper: Z. Zong, K. Li, G. Song, Y. Wang, Y. Qiao, B. Leng, Y. Liu, "Self-slimmed Vision
Transformer", ECCV 2022, arXiv 2111.12624. Only the paper's abstract could be read here; the TSM's
exact form below follows the authors' code (github.com/Sense-X/SiT, ``models/lvvit.py``,
``TokenSlimmingModule``).

A TSM after block ``i`` softly aggregates that block's ``N`` patch tokens ``X`` (B, N, D) into
``N' = int(N_0 · r^j)`` tokens (``N_0`` the patch count, ``r`` = ``keep_ratio``, ``j`` the TSM's
1-based order):

.. math::
    W = \\mathrm{MLP}(\\mathrm{LN}(X)) \\in \\mathbb{R}^{B \\times N \\times N'},\\quad
    A = \\mathrm{softmax}_N(W \\cdot s)^\\top \\in \\mathbb{R}^{B \\times N' \\times N},\\quad
    \\hat X = A X \\in \\mathbb{R}^{B \\times N' \\times D}

with the MLP ``D → D·h → N'`` (LayerNorm, Linear, GELU, Linear; ``h`` = ``tsm_hidden_ratio``, 0.5
in the code) and a learned scale ``s`` (an inverse temperature, initialised to 1). Each slimmed
token is a convex combination of the input tokens (rows of ``A`` sum to 1). Prefix tokens (class,
distillation) pass through unchanged. The authors' code uses ``keeping_ratio = 0.5`` and, for
LV-ViT-T (14 blocks), ``stage_blocks = [1, 1, 1, 11]``: TSMs after blocks 0, 1 and 2.

Module names are the plain ViT's (``blocks.{i}.attn``, ``norm``, ``head``...), so a trained
``ViT``'s weights load into a ``SlimmedViT`` of the same size (:meth:`SlimmedViT.from_vit`; the
paper's "self-slimmed" student starts from its unslimmed teacher's weights). Extra taps:

=================================  ==============================================================
tap                                 tensor
=================================  ==============================================================
``blocks.{i}``                      tokens after block ``i`` *and* its TSM: ``(B, P + N_i, D)``
``blocks.{i}.tsm``                  slimmed patch tokens ``(B, N_i, D)`` (blocks with a TSM)
``blocks.{i}.tsm.weights``          aggregation matrix ``A`` ``(B, N_i, N_{i-1})``
=================================  ==============================================================
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.models.registry import register_model
from distill.models.vit import Block, ViT


class TokenSlimming(nn.Module):
    """The TSM: ``(B, N, D)`` patch tokens -> ``(B, N', D)`` by ``A X`` (see the module docstring).

    ``weights`` is an ``nn.Identity`` that receives ``A`` ``(B, N', N)`` (a tap point).
    """

    def __init__(self, dim: int, num_in: int, num_out: int, hidden_ratio: float = 0.5) -> None:
        super().__init__()
        if not 1 <= num_out <= num_in:
            raise ValueError(f"a token slimming module keeps 1..{num_in} tokens, asked for {num_out}")
        hidden = max(1, int(dim * hidden_ratio))
        self.num_in, self.num_out = num_in, num_out
        self.score = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, num_out))
        self.scale = nn.Parameter(torch.ones(1, 1, 1))
        self.weights = nn.Identity()

    def aggregation(self, x: Tensor) -> Tensor:
        """``A = softmax_N(MLP(LN(x)) · s)ᵀ``: ``(B, N, D)`` -> ``(B, N', N)``, rows summing to 1."""
        if x.dim() != 3 or x.shape[1] != self.num_in:
            raise ValueError(f"TokenSlimming expects (B, {self.num_in}, D) patch tokens, got {tuple(x.shape)}")
        return F.softmax(self.score(x) * self.scale, dim=1).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.weights(self.aggregation(x)) @ x


class SlimBlock(Block):
    """A pre-norm transformer block followed by a TSM on its patch tokens (prefix tokens untouched)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, prefix: int, num_in: int, num_out: int,
                 tsm_hidden_ratio: float = 0.5) -> None:
        super().__init__(dim, heads, mlp_ratio)
        self.prefix = prefix
        self.tsm = TokenSlimming(dim, num_in, num_out, tsm_hidden_ratio)

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        x = super().forward(x, bias)
        return torch.cat([x[:, :self.prefix], self.tsm(x[:, self.prefix:])], 1)


def slim_token_counts(num_patches: int, depth: int, slim_after: Sequence[int], keep_ratio: float) -> list[int]:
    """Patch tokens *entering* each block and leaving the last: ``depth + 1`` counts.

    The ``j``-th TSM (1-based, in block order) keeps ``int(num_patches · keep_ratio^j)`` tokens, as
    the authors' code (``keeped_patches``).
    """
    if not 0.0 < keep_ratio < 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1), got {keep_ratio}")
    after = sorted({int(i) for i in slim_after})
    if len(after) != len(list(slim_after)) or any(not 0 <= i < depth for i in after):
        raise ValueError(f"slim_after must be distinct block indices in [0, {depth - 1}], got {list(slim_after)}")
    counts, n = [num_patches], num_patches
    for i in range(depth):
        if i in after:
            n = int(num_patches * keep_ratio ** (after.index(i) + 1))
            if n < 1:
                raise ValueError(f"keep_ratio={keep_ratio} leaves no token after block {i}: use fewer TSMs or a "
                                 "larger ratio")
        counts.append(n)
    return counts


class SlimmedViT(ViT):
    """A :class:`~distill.models.vit.ViT` whose blocks ``slim_after`` end in a token slimming module.

    Args:
        num_classes, in_channels, img_size, patch_size, dim, depth, heads, mlp_ratio, distilled: as ``ViT``.
        slim_after: blocks followed by a TSM (ours for the 4-block zoo ViT: ``(0, 1)``, 49 -> 24 -> 12 tokens
            at 28×28 with 4×4 patches).
        keep_ratio: each TSM keeps ``keep_ratio`` times the previous stage's tokens (0.5, the authors' code).
        tsm_hidden_ratio: hidden width of the TSM's MLP over ``D`` (0.5, the authors' code).

    ``token_counts`` lists the patch tokens entering each block (and leaving the last);
    :meth:`flops` counts multiply-accumulates per image.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, img_size: int = 28, patch_size: int = 4,
                 dim: int = 64, depth: int = 4, heads: int = 4, mlp_ratio: float = 2.0, distilled: bool = False,
                 slim_after: Sequence[int] = (0, 1), keep_ratio: float = 0.5, tsm_hidden_ratio: float = 0.5) -> None:
        super().__init__(num_classes, in_channels, img_size, patch_size, dim, depth, heads, mlp_ratio, distilled)
        self.slim_after = tuple(sorted(int(i) for i in slim_after))
        self.keep_ratio, self.mlp_ratio = float(keep_ratio), float(mlp_ratio)
        self.token_counts = slim_token_counts(self.patch_embed.num_patches, depth, slim_after, keep_ratio)
        self.blocks = nn.ModuleList(
            SlimBlock(dim, heads, mlp_ratio, self.num_prefix_tokens, self.token_counts[i], self.token_counts[i + 1],
                      tsm_hidden_ratio) if i in self.slim_after else Block(dim, heads, mlp_ratio)
            for i in range(depth))
        self._init_weights()
        self.tap_points = (*self.tap_points, *(f"blocks.{i}.tsm" for i in self.slim_after),
                           *(f"blocks.{i}.tsm.weights" for i in self.slim_after))

    @classmethod
    def from_vit(cls, vit: ViT, slim_after: Sequence[int] = (0, 1), keep_ratio: float = 0.5,
                 tsm_hidden_ratio: float = 0.5) -> SlimmedViT:
        """A slimmed copy of a trained ``ViT``: its weights, plus freshly initialised TSMs."""
        if not isinstance(vit, ViT):
            raise TypeError(f"from_vit needs a distill.models.vit.ViT, got {type(vit).__name__}")
        first = vit.blocks[0]
        model = cls(vit.num_classes, vit.patch_embed.proj.in_channels, vit.patch_embed.img_size,
                    vit.patch_embed.patch_size, vit.embed_dim, len(vit.blocks), first.attn.num_heads,
                    first.mlp.fc1.out_features / vit.embed_dim, vit.distilled, slim_after, keep_ratio,
                    tsm_hidden_ratio)
        missing, unexpected = model.load_state_dict(vit.state_dict(), strict=False)
        if unexpected or any(".tsm." not in k for k in missing):
            raise RuntimeError(f"from_vit: weights do not match (missing {missing}, unexpected {unexpected})")
        return model.to(next(vit.parameters()).device)

    def flops(self) -> dict[str, int]:
        """Multiply-accumulates per image of the blocks (with TSMs) and in total (patch embedding and
        head included), counted from the token numbers: a block on ``n`` tokens of width ``D`` costs
        ``n·3D² + 2n²D + n·D² + 2n·D·H`` (qkv, QKᵀ and AV, projection, MLP of hidden ``H``); a TSM
        ``n·D·h + n·h·n' + n'·n·D``."""
        d = self.embed_dim
        hidden = int(d * self.mlp_ratio)
        p = self.num_prefix_tokens
        blocks = 0
        for i, block in enumerate(self.blocks):
            n = self.token_counts[i] + p
            blocks += n * 3 * d * d + 2 * n * n * d + n * d * d + 2 * n * d * hidden
            if isinstance(block, SlimBlock):
                n_in, n_out = self.token_counts[i], self.token_counts[i + 1]
                h = block.tsm.score[1].out_features
                blocks += n_in * d * h + n_in * h * n_out + n_out * n_in * d
        proj = self.patch_embed.proj
        embed = self.patch_embed.num_patches * d * proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1]
        head = d * self.num_classes * (2 if self.distilled else 1)
        return {"blocks": blocks, "total": blocks + embed + head}


@register_model("sit_tiny")
def sit_tiny(num_classes: int = 10, in_channels: int = 1, img_size: int = 28, patch_size: int = 4,
             slim_after: Sequence[int] = (0, 1), keep_ratio: float = 0.5) -> SlimmedViT:
    """``vit_tiny`` (D=64, 4 blocks, 4 heads) with TSMs after blocks 0 and 1 (49 -> 24 -> 12 tokens at 28×28)."""
    return SlimmedViT(num_classes, in_channels, img_size, patch_size, dim=64, depth=4, heads=4,
                      slim_after=slim_after, keep_ratio=keep_ratio)


@register_model("sit_small")
def sit_small(num_classes: int = 10, in_channels: int = 1, img_size: int = 28, patch_size: int = 4,
              slim_after: Sequence[int] = (0, 1, 2), keep_ratio: float = 0.5) -> SlimmedViT:
    """``vit_small`` (D=128, 6 blocks) with TSMs after blocks 0, 1, 2 (49 -> 24 -> 12 -> 6 tokens at 28×28)."""
    return SlimmedViT(num_classes, in_channels, img_size, patch_size, dim=128, depth=6, heads=4,
                      slim_after=slim_after, keep_ratio=keep_ratio)


__all__ = ["SlimBlock", "SlimmedViT", "TokenSlimming", "sit_small", "sit_tiny", "slim_token_counts"]
