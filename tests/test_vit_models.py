"""The zoo's vision transformers (distill.models.vit): shapes, DeiT's inference rule, the mask token,
tap points laid out as timm's, and the attention recomputed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from distill.models import create
from distill.models.vit import ViT, num_prefix_tokens, patch_grid, tokens_to_map
from distill.taps import Taps, run_tapped
from distill.batch import as_batch


def _model(**kw) -> ViT:
    torch.manual_seed(0)
    return ViT(num_classes=5, in_channels=1, img_size=12, patch_size=4, dim=16, depth=2, heads=2, **kw)


def test_zoo_models_build_and_count_parameters():
    for name, distilled in (("vit_tiny", False), ("deit_tiny", True), ("vit_small", False)):
        m = create(name)
        assert m.distilled is distilled and num_prefix_tokens(m) == (2 if distilled else 1)
        assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10)
        assert patch_grid(m) == (7, 7)
    assert create("vit_tiny", in_channels=3, img_size=32).patch_embed.num_patches == 64


def test_distilled_model_averages_its_two_heads_in_train_and_eval():
    m = _model(distilled=True)
    x = torch.randn(3, 1, 12, 12)
    for mode in (m.train, m.eval):
        mode()
        tokens = m.forward_features(x)
        expected = (tokens[:, 0] @ m.head.weight.T + m.head.bias + tokens[:, 1] @ m.head_dist.weight.T
                    + m.head_dist.bias) / 2
        torch.testing.assert_close(m(x), expected)


def test_mask_replaces_exactly_the_masked_patch_embeddings():
    m = _model()
    x = torch.randn(2, 1, 12, 12)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, 4] = mask[1, 0] = True
    plain, masked = m.embed(x), m.embed(x, mask)
    # token 1 + l is patch l (one class token first)
    changed = (plain - masked).abs().sum(-1) > 0
    assert changed[:, 1:].eq(mask).all() and not changed[:, 0].any()
    torch.testing.assert_close(masked[0, 5], m.mask_token[0, 0] + m.pos_embed[0, 5])
    with pytest.raises(ValueError, match="mask must be"):
        m.embed(x, mask[:, :4])


def test_taps_match_timm_names_and_attention_is_softmax_of_scaled_scores():
    m = _model(distilled=True).eval()
    paths = ["patch_embed", "blocks.1", "blocks.0.attn.attn_drop", "blocks.0.attn.qkv", "blocks.0.norm1", "norm",
             "head", "head_dist", "head:input"]
    taps = Taps(m, paths)
    x = torch.randn(2, 1, 12, 12)
    _, store = run_tapped(m, as_batch((x, torch.zeros(2, dtype=torch.long))), taps)
    taps.remove()
    n = 2 + 9
    assert store["patch_embed"].shape == (2, 9, 16) and store["blocks.1"].shape == (2, n, 16)
    attn = store["blocks.0.attn.attn_drop"]
    assert attn.shape == (2, 2, n, n)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 2, n))
    # recompute head 1 of block 0 by hand from its qkv output: softmax(q k^T / sqrt(d))
    qkv = store["blocks.0.attn.qkv"]
    q, k = qkv[..., 8:16], qkv[..., 16 + 8:32]  # head 1's slice of the queries and of the keys
    ref = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(8), -1)
    torch.testing.assert_close(attn[:, 1], ref)
    assert store["head:input"].shape == (2, 16)


def test_relative_position_bias_is_added_to_every_head():
    torch.manual_seed(1)
    m = _model().eval()
    attn = m.blocks[0].attn
    x = torch.randn(2, 10, 16)
    bias = torch.zeros(1, 2, 10, 10)
    torch.testing.assert_close(attn(x, bias), attn(x))
    bias[0, :, :, 3] = 1e4  # every query then attends only to token 3: the output is token 3's value
    out = attn(x, bias)
    v = attn.qkv(x)[..., 32:]
    torch.testing.assert_close(out, attn.proj(v[:, 3:4].expand(-1, 10, -1)), atol=1e-5, rtol=1e-5)


def test_tokens_to_map_drops_the_prefix_and_lays_patches_row_major():
    tokens = torch.arange(2 * (2 + 6) * 3, dtype=torch.float).reshape(2, 8, 3)
    fmap = tokens_to_map(tokens, 2, (2, 3))
    assert fmap.shape == (2, 3, 2, 3)
    torch.testing.assert_close(fmap[1, :, 1, 2], tokens[1, 2 + 5])
    with pytest.raises(ValueError, match="do not fill"):
        tokens_to_map(tokens, 2, (2, 2))


def test_bad_sizes_are_refused_before_training():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ViT(img_size=28, patch_size=5)
    with pytest.raises(ValueError, match="multiple of heads"):
        ViT(dim=30, heads=4)
    with pytest.raises(ValueError, match=r"built for \(B, C, 28, 28\)"):
        create("vit_tiny")(torch.randn(1, 1, 32, 32))


def test_a_few_steps_learn_a_separable_task():
    torch.manual_seed(0)
    m = _model()
    x = torch.randn(64, 1, 12, 12)
    y = (x[:, 0, :6].mean((1, 2)) > x[:, 0, 6:].mean((1, 2))).long()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        loss = torch.nn.functional.cross_entropy(m(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


class _FusedAttention(torch.nn.Module):
    """timm's pattern: with ``fused_attn`` the probabilities stay inside F.scaled_dot_product_attention."""

    def __init__(self) -> None:
        super().__init__()
        self.fused_attn = True
        self.attn_drop = torch.nn.Dropout(0.0)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        if self.fused_attn:
            return torch.nn.functional.scaled_dot_product_attention(q, q, q)
        return self.attn_drop(torch.softmax(q @ q.transpose(-2, -1) / math.sqrt(q.shape[-1]), -1)) @ q


def test_a_tap_under_a_fused_attention_module_turns_fusion_off_until_removed():
    model = torch.nn.Sequential(_FusedAttention())
    q = torch.randn(2, 5, 4)
    reference = model(q)
    taps = Taps(model, ["0.attn_drop"])
    assert model[0].fused_attn is False
    with taps.recording() as store:
        out = model(q)
    torch.testing.assert_close(out, reference)
    torch.testing.assert_close(store["0.attn_drop"], torch.softmax(q @ q.transpose(-2, -1) / 2, -1))
    taps.remove()
    assert model[0].fused_attn is True
