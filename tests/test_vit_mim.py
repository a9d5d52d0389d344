"""FD, SdAE and DMJD: masks, whitening, losses, HOG, EMA, the relative-position ViT, the strategies.

Every expected number below is worked out independently of ``distill``: by hand in the comments,
with numpy, or with a plain loop written in the test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import distill.functional as DF
from distill.data.loader import InMemoryLoader
from distill.methods import method_info
from distill.methods.mim import FD
from distill.models import create
from distill.models.vit_relpos import RelPosViT, relative_position_index
from distill.strategies.mim import MaskedDecoder, dmjd, ema_update_, encode_visible, fd, sdae, sincos_2d
from distill.strategies.registry import strategy_info

torch.set_num_threads(1)
FAST = settings(max_examples=15, deadline=None)


def _smooth_l1(x: float, beta: float) -> float:
    return 0.5 * x * x / beta if abs(x) < beta else abs(x) - 0.5 * beta


# ---------------------------------------------------------------------------------------- registry


def test_registered_with_papers() -> None:
    assert method_info("fd").paper.arxiv == "2205.14141"
    assert method_info("fd").family == "self-supervised"
    assert strategy_info("fd").paper.arxiv == "2205.14141"
    assert strategy_info("sdae").paper.arxiv == "2208.00449"
    assert strategy_info("dmjd").paper.arxiv == "2301.00230"
    assert {strategy_info(n).family for n in ("fd", "sdae", "dmjd")} == {"self-supervised"}


# ---------------------------------------------------------------------------------------- masks


def test_random_mask_counts_and_seed() -> None:
    # int(49 * (1 - 0.75)) = 12 visible, 37 masked in every row
    m = DF.random_token_mask(5, 49, 0.75, generator=torch.Generator().manual_seed(3))
    assert m.shape == (5, 49) and m.dtype == torch.bool
    assert m.sum(1).tolist() == [37] * 5
    again = DF.random_token_mask(5, 49, 0.75, generator=torch.Generator().manual_seed(3))
    assert torch.equal(m, again)
    other = DF.random_token_mask(5, 49, 0.75, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(m, other)


def test_block_mask_masks_whole_blocks() -> None:
    m = DF.block_token_mask(3, (4, 6), 0.5, block=2, generator=torch.Generator().manual_seed(0))
    # 2x3 = 6 cells, int(6 * 0.5) = 3 visible cells -> 3 masked cells of 4 tokens = 12 tokens
    assert m.sum(1).tolist() == [12, 12, 12]
    grid = m.reshape(3, 4, 6)
    for b in range(3):
        for cy in range(2):
            for cx in range(3):
                cell = grid[b, 2 * cy:2 * cy + 2, 2 * cx:2 * cx + 2]
                assert bool(cell.all()) or not bool(cell.any())
    with pytest.raises(ValueError, match="not divisible by block=2"):
        DF.block_token_mask(1, (7, 7), 0.5, block=2)


@FAST
@given(views=st.integers(1, 4), ratio=st.floats(0.3, 0.9), block=st.sampled_from([1, 2]), seed=st.integers(0, 99))
def test_disjoint_views_visible_sets_disjoint_and_cover(views: int, ratio: float, block: int, seed: int) -> None:
    grid = (6, 8)
    cells = (6 // block) * (8 // block)
    keep = int(cells * (1 - ratio))
    if keep < 1 or views * keep > cells:
        with pytest.raises(ValueError, match="views"):
            DF.disjoint_view_masks(2, grid, ratio, views, block)
        return
    m = DF.disjoint_view_masks(3, grid, ratio, views, block, generator=torch.Generator().manual_seed(seed))
    assert m.shape == (views, 3, 48)
    visible = (~m).sum(0)  # how many views show each token
    assert int(visible.max()) <= 1  # no token visible in two views
    assert ((~m).sum(2) == keep * block * block).all()  # every view keeps its ratio
    if views >= 2:
        assert m.any(0).all()  # every token is masked (predicted) in at least one view


def test_dmjd_two_views_match_authors_counts() -> None:
    # 49 tokens at ratio 0.6: int(49 * 0.4) = 19 visible per view, 30 masked; view 2's 19 visible are
    # drawn from view 1's 30 masked ones, so the masks overlap on 30 - 19 = 11 tokens
    m = DF.disjoint_view_masks(4, (7, 7), 0.6, 2, 1, generator=torch.Generator().manual_seed(1))
    assert m.sum(2).tolist() == [[30] * 4, [30] * 4]
    assert (m[0] & m[1]).sum(1).tolist() == [11] * 4


def test_mask_folds_partition_masked_tokens() -> None:
    mask = DF.random_token_mask(4, 49, 0.75, generator=torch.Generator().manual_seed(0))  # 37 masked
    idx = DF.mask_folds(mask, 3, generator=torch.Generator().manual_seed(1))
    assert idx.shape == (4, 3, 12)  # 37 // 3 = 12, one token left out
    for b in range(4):
        flat = idx[b].flatten().tolist()
        assert len(set(flat)) == 36  # disjoint folds
        assert all(bool(mask[b, i]) for i in flat)  # all inside the masked set
    with pytest.raises(ValueError, match="as many tokens"):
        DF.mask_folds(torch.tensor([[True, False], [True, True]]), 1)


# ---------------------------------------------------------------------------------------- losses


def test_whitening_matches_numpy() -> None:
    x = torch.tensor([[[1.0, 2.0, 4.0, 9.0], [-3.0, 0.0, 3.0, 0.0]]])
    a = x.numpy()
    expect = (a - a.mean(-1, keepdims=True)) / np.sqrt(a.var(-1, keepdims=True) + 1e-5)  # biased variance
    assert np.allclose(DF.whiten_tokens(x).numpy(), expect, atol=1e-6)


def test_fd_loss_on_hand_numbers() -> None:
    # teacher tokens [1, 3] -> mean 2, variance 1 -> whitened [-1/√(1+1e-5), +1/√(1+1e-5)] ≈ [-1, 1]
    t = torch.tensor([[[1.0, 3.0]]])
    s = torch.tensor([[[2.0, -3.0]]])
    w = 1.0 / math.sqrt(1.0 + 1e-5)
    d = [2.0 + w, -3.0 - w]  # ≈ 3 and -4: both beyond beta = 2.5, the linear part |d| - beta/2
    expect = sum(_smooth_l1(v, 2.5) for v in d) / 2
    assert DF.fd_loss(s, t, beta=2.5).item() == pytest.approx(expect, rel=1e-6)
    # inside the quadratic zone with beta = 2: differences 0.5 and -0.25
    s2 = torch.tensor([[[-w + 0.5, w - 0.25]]])
    assert DF.fd_loss(s2, t, beta=2.0).item() == pytest.approx((0.25 / 4 + 0.0625 / 4) / 2, rel=1e-5)


@FAST
@given(seed=st.integers(0, 1000), beta=st.floats(0.1, 5.0))
def test_fd_loss_zero_at_whitened_teacher_and_nonnegative(seed: int, beta: float) -> None:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(2, 5, 6, generator=g) * 3 + 1
    assert DF.fd_loss(DF.whiten_tokens(t), t, beta).item() == pytest.approx(0.0, abs=1e-10)
    assert DF.fd_loss(torch.randn(2, 5, 6, generator=g), t, beta).item() >= 0.0


def test_sdae_loss_matches_numpy_cosine() -> None:
    g = torch.Generator().manual_seed(0)
    p, t = torch.randn(3, 4, 8, generator=g), torch.randn(3, 4, 8, generator=g)
    a, b = p.numpy().reshape(-1, 8), t.numpy().reshape(-1, 8)
    b = b - b.mean(1, keepdims=True)  # centring is all that matters for a cosine
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert DF.sdae_loss(p, t).item() == pytest.approx(1.0 - cos.mean(), abs=1e-5)
    # a prediction equal to the centred target costs 0, the opposite one 2
    c = t - t.mean(-1, keepdim=True)
    assert DF.sdae_loss(c, t).item() == pytest.approx(0.0, abs=1e-6)
    assert DF.sdae_loss(-c, t).item() == pytest.approx(2.0, abs=1e-6)


def test_dmjd_loss_by_loop() -> None:
    g = torch.Generator().manual_seed(2)
    pred, target = torch.randn(2, 5, 3, generator=g), torch.randn(2, 5, 3, generator=g)
    mask = torch.tensor([[True, False, True, True, False], [False, True, True, False, True]])
    vis = torch.randn(2, 2, 3, generator=g)
    theta, beta = 0.7, 1.5
    sq, n = 0.0, 0
    for b in range(2):
        for i in range(5):
            if mask[b, i]:
                sq += sum((pred[b, i, k].item() - target[b, i, k].item()) ** 2 for k in range(3)) / 3
                n += 1
    visible_pos = [[1, 4], [0, 3]]
    sl = [_smooth_l1(vis[b, j, k].item() - target[b, visible_pos[b][j], k].item(), beta)
          for b in range(2) for j in range(2) for k in range(3)]
    expect = sq / n + theta * sum(sl) / len(sl)
    assert DF.dmjd_loss(pred, vis, target, mask, theta, beta).item() == pytest.approx(expect, rel=1e-5)


def test_cosine_momentum_closed_form() -> None:
    assert DF.cosine_momentum(0, 10, 0.96, 0.99) == pytest.approx(0.96)
    assert DF.cosine_momentum(5, 10, 0.96, 0.99) == pytest.approx(0.975)  # cos(π/2) = 0: the midpoint
    assert DF.cosine_momentum(10, 10, 0.96, 0.99) == pytest.approx(0.99)
    # at k = K/3: 0.99 - 0.03 (cos(π/3) + 1) / 2 = 0.99 - 0.03 · 0.75
    assert DF.cosine_momentum(2, 6, 0.96, 0.99) == pytest.approx(0.99 - 0.0225)


def test_ema_update_by_hand() -> None:
    teacher, student = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    with torch.no_grad():
        teacher.weight.fill_(1.0), teacher.bias.fill_(-2.0)
        student.weight.fill_(3.0), student.bias.fill_(2.0)
    ema_update_(teacher, student, 0.75)
    assert teacher.weight.item() == pytest.approx(0.75 * 1 + 0.25 * 3)  # 1.5
    assert teacher.bias.item() == pytest.approx(0.75 * -2 + 0.25 * 2)  # -1.0
    with pytest.raises(ValueError, match="names differ"):
        ema_update_(teacher, torch.nn.Sequential(student), 0.5)


# ---------------------------------------------------------------------------------------- targets


def test_hog_on_ramps() -> None:
    j = torch.arange(4.0)
    horizontal = j.expand(4, 4).reshape(1, 1, 4, 4)  # x[i, j] = j: g_x = 2 inside, 0 on border columns
    h = DF.hog_histograms(horizontal, cell=2, bins=9)
    assert h.shape == (1, 1, 2, 2, 9)
    # each 2x2 cell holds one border column (magnitude 0) and one inner column (magnitude 2, angle 0°)
    expect = torch.zeros(9)
    expect[0] = (2 + 2) / 4
    assert torch.allclose(h[0, 0, 0, 0], expect) and torch.allclose(h[0, 0, 1, 1], expect)
    vertical = horizontal.transpose(2, 3)  # angle 90° -> bin floor(90 / 20) = 4
    assert torch.allclose(DF.hog_histograms(vertical, 2)[0, 0, 0, 0], torch.eye(9)[4])
    diagonal = horizontal + vertical  # g = (2, 2) at the single inner pixel (1, 1) of cell (0, 0): 45° -> bin 2
    cell = DF.hog_histograms(diagonal, 2)[0, 0, 0, 0]
    # pixel (1, 1): g = (2, 2), |g| = 2√2, bin 2; (0, 1): g_y = 0 (border row), g_x = 2 -> bin 0;
    # (1, 0): g_x = 0 (border column), g_y = 2 -> bin 4; (0, 0): 0
    assert cell.tolist() == pytest.approx([0.5, 0, 2 * math.sqrt(2) / 4, 0, 0.5, 0, 0, 0, 0], abs=1e-6)


def test_patch_targets_layout_by_loop() -> None:
    g = torch.Generator().manual_seed(0)
    img = torch.randn(2, 3, 8, 8, generator=g)
    hist = DF.hog_histograms(img, 2, 4)  # (B, C, 4, 4, 4)
    out = DF.hog_patch_targets(img, patch=4, cell=2, bins=4, whiten=False)  # 2x2 tokens of 2x2 cells
    assert out.shape == (2, 4, 2 * 2 * 4 * 3)
    for b in range(2):
        for ty in range(2):
            for tx in range(2):
                vec = [hist[b, c, 2 * ty + dy, 2 * tx + dx, k].item()
                       for dy in range(2) for dx in range(2) for k in range(4) for c in range(3)]
                assert out[b, ty * 2 + tx].tolist() == pytest.approx(vec, abs=1e-6)
    white = DF.hog_patch_targets(img, patch=4, cell=2, bins=4)
    block = white[0, 0].reshape(2, 2, 4, 3)[0, 0, :, 1]  # first cell, channel 1, over its 4 bins
    assert float(block.mean()) == pytest.approx(0.0, abs=1e-5)
    pix = DF.pixel_patch_targets(img, 4, normalize=False)
    assert pix[1, 3].tolist() == pytest.approx(
        [img[1, c, 4 + dy, 4 + dx].item() for dy in range(4) for dx in range(4) for c in range(3)], abs=1e-6)
    norm = DF.pixel_patch_targets(img, 4)
    assert float(norm[0, 0].var()) == pytest.approx(1.0, abs=1e-4)


# ---------------------------------------------------------------------------------------- models


def test_relative_position_index_by_hand() -> None:
    # 2x2 grid: (2·2 - 1)² = 9 offset rows, 9 / 10 / 11 for the prefix token
    idx = relative_position_index((2, 2), prefix=1)
    assert idx.shape == (5, 5)
    # token 1 = (0, 0), token 4 = (1, 1): offset (-1, -1) -> (0)·3 + 0 = 0; reverse: (1, 1) -> 2·3 + 2 = 8
    assert idx[1, 4].item() == 0 and idx[4, 1].item() == 8
    assert idx[2, 2].item() == 4  # zero offset: (1)·3 + 1
    assert idx[0, 3].item() == 9 and idx[3, 0].item() == 10 and idx[0, 0].item() == 11
    # the same offset reads the same row: (0,0)->(0,1) and (1,0)->(1,1)
    assert idx[1, 2].item() == idx[3, 4].item()


def test_relpos_vit_uses_bias_and_drops_paths_only_in_training() -> None:
    torch.manual_seed(0)
    m = RelPosViT(dim=16, depth=2, heads=2, img_size=8, patch_size=4, drop_path=0.5)
    assert not m.pos_embed.requires_grad and float(m.pos_embed.abs().sum()) == 0.0
    x = torch.randn(3, 1, 8, 8)
    m.eval()
    before = m(x)
    assert torch.equal(before, m(x))  # eval: no drop path
    with torch.no_grad():
        m.rel_pos_bias.table.normal_()
    assert not torch.allclose(before, m(x))
    m.train()
    torch.manual_seed(1)
    a = m(x)
    torch.manual_seed(2)
    assert not torch.allclose(a, m(x))  # random residual drops
    a.sum().backward()
    assert m.rel_pos_bias.table.grad is not None and float(m.rel_pos_bias.table.grad.abs().sum()) > 0


def test_encode_visible_all_tokens_equals_forward_features() -> None:
    for model in (create("vit_tiny"), create("vit_tiny_rpb", drop_path=0.0)):
        model.eval()
        with torch.no_grad():
            model.rel_pos_bias.table.normal_() if hasattr(model, "rel_pos_bias") else None
        x = torch.randn(2, 1, 28, 28)
        keep = torch.arange(49).expand(2, -1)
        assert torch.allclose(encode_visible(model, x, keep), model.forward_features(x), atol=1e-5)


def test_encode_visible_subset_equals_model_on_the_subset_alone() -> None:
    # a plain loop: embed, keep prefix + chosen tokens, run the blocks one by one, norm
    model = create("vit_tiny").eval()
    x = torch.randn(2, 1, 28, 28)
    keep = torch.tensor([[0, 5, 9, 30], [48, 1, 2, 3]])
    h = model.embed(x)
    rows = []
    for b in range(2):
        seq = torch.cat([h[b, :1], h[b, 1 + keep[b]]]).unsqueeze(0)
        for block in model.blocks:
            seq = block(seq)
        rows.append(model.norm(seq))
    assert torch.allclose(encode_visible(model, x, keep), torch.cat(rows), atol=1e-5)


def test_sincos_and_decoder_shapes() -> None:
    pe = sincos_2d(8, (2, 3))
    assert pe.shape == (6, 8)
    # position (0, 0): sin 0 = 0, cos 0 = 1 for both axes; row of token 4 = (1, 1): sin(1·ω_0) = sin 1
    assert pe[0].tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
    assert pe[4, 0].item() == pytest.approx(math.sin(1.0), abs=1e-6)
    dec = MaskedDecoder(enc_dim=10, out_dim=7, grid=(2, 3), prefix=1, dim=8, depth=1, heads=2)
    out = dec(torch.randn(4, 1 + 2, 10), torch.tensor([[0, 5]] * 4))
    assert out.shape == (4, 6, 7)


def test_decoder_places_visible_tokens_and_mask_tokens_by_loop() -> None:
    # without blocks the decoder is per-token: pred(norm(embed(token) + pos)) at a visible position,
    # pred(norm(mask_token + pos)) at a hidden one
    torch.manual_seed(0)
    dec = MaskedDecoder(enc_dim=10, out_dim=3, grid=(2, 2), prefix=1, dim=8, depth=0).eval()
    tokens, keep = torch.randn(2, 1 + 2, 10), torch.tensor([[3, 0], [1, 2]])
    out = dec(tokens, keep)
    pos = sincos_2d(8, (2, 2))
    for b in range(2):
        for i in range(4):
            where = (keep[b] == i).nonzero()
            x = dec.embed(tokens[b, 1 + int(where[0, 0])]) if len(where) else dec.mask_token[0, 0]
            assert torch.allclose(out[b, i], dec.pred(dec.norm(x + pos[i])), atol=1e-6)


# ---------------------------------------------------------------------------------------- FD method


def test_fd_method_regresses_whitened_teacher_tokens_by_hand() -> None:
    torch.manual_seed(0)
    student, teacher = create("vit_tiny"), create("vit_small")
    fd_loss = FD(beta=1.5)
    batch = (torch.randn(2, 1, 28, 28), torch.zeros(2, dtype=torch.long))
    fd_loss.bind_models(student, teacher, batch)
    s, t = torch.randn(2, 50, 64), torch.randn(2, 50, 128)
    fd_loss.prepare({"norm": s}, {"norm": t}, batch)
    assert isinstance(fd_loss.projector, torch.nn.Linear) and fd_loss.projector.weight.shape == (128, 64)
    got = fd_loss({"norm": s}, {"norm": t}, batch)
    # by hand: all 50 tokens (class + 49 patches, same grid), projected, against LayerNorm(no affine) targets
    proj = fd_loss.projector(s)
    tw = (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, unbiased=False, keepdim=True) + 1e-5)
    diff = (proj - tw).abs()
    expect = torch.where(diff < 1.5, 0.5 * diff ** 2 / 1.5, diff - 0.75).mean()
    assert got.item() == pytest.approx(expect.item(), rel=1e-5)


def test_fd_method_cnn_teacher_map_resized_to_student_grid() -> None:
    fd_loss = FD(teacher_tap="stage3", beta=2.0)
    student, teacher = create("vit_tiny"), create("cnn_teacher_mnist")
    batch = (torch.randn(2, 1, 28, 28), torch.zeros(2, dtype=torch.long))
    fd_loss.bind_models(student, teacher, batch)
    s, t = torch.randn(2, 50, 64), torch.randn(2, 256, 4, 4)
    s_tok, t_tok = fd_loss.pairs({"norm": s}, {"stage3": t})
    # no class token in a CNN: the 49 patch tokens only, the 4x4 map bilinearly resized to 7x7
    assert s_tok.shape == (2, 49, 64) and t_tok.shape == (2, 49, 256)
    assert torch.equal(s_tok, s[:, 1:])
    resized = torch.nn.functional.interpolate(t, size=(7, 7), mode="bilinear", align_corners=False)
    assert torch.allclose(t_tok, resized.flatten(2).transpose(1, 2))


def test_fd_distiller_gradient_reaches_only_the_student() -> None:
    import distill

    torch.manual_seed(0)
    student, teacher = create("vit_tiny_rpb"), create("cnn_teacher_mnist")
    d = distill.Distiller(student, teacher, losses={"fd": {"teacher_tap": "stage3"}})
    batch = (torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,)))
    d.prepare(batch)
    out = d(batch)
    out.total.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.blocks[0].attn.qkv.weight.grad is not None
    assert student.rel_pos_bias.table.grad is not None
    assert d.methods["fd"].projector.weight.grad is not None


# ---------------------------------------------------------------------------------------- strategies


def _loaders(n: int = 32) -> tuple[InMemoryLoader, InMemoryLoader]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)
    return InMemoryLoader(x, y, batch_size=16, seed=0), InMemoryLoader(x[:16], y[:16], batch_size=16, seed=0)


def test_sdae_trains_encoder_and_moves_ema_teacher() -> None:
    torch.manual_seed(0)
    model = create("vit_tiny")
    start = {k: v.clone() for k, v in model.state_dict().items()}
    tl, vl = _loaders()
    r = sdae(model, tl, vl, epochs=2, progress=False, mask_ratio=0.75, folds=3, ema_every="step",
             ema_momentum=0.9, ema_momentum_final=0.99, probe_epochs=2)
    assert r.encoder is model and len(r.pretrain_history) == 2
    # the teacher branch is an EMA of the encoder: moved away from the start, not equal to the student
    key = "blocks.1.mlp.fc1.weight"
    t_w, s_w = r.teacher.state_dict()[key], model.state_dict()[key]
    assert not torch.equal(t_w, start[key]) and not torch.equal(t_w, s_w)
    assert all(not p.requires_grad for p in r.teacher.parameters())
    assert all(math.isfinite(row["pretrain_loss"]) and 0 <= row["pretrain_loss"] <= 2 for row in r.pretrain_history)
    assert not torch.equal(start["blocks.0.attn.qkv.weight"], model.state_dict()["blocks.0.attn.qkv.weight"])
    assert r.probe is not None and r.last_acc == r.probe["top1"]
    with pytest.raises(ValueError, match="cannot fill"):
        sdae(create("vit_tiny"), tl, epochs=1, progress=False, folds=40)


def test_dmjd_runs_and_checks_block_before_work() -> None:
    torch.manual_seed(0)
    tl, vl = _loaders()
    with pytest.raises(ValueError, match="not divisible by block=2"):
        dmjd(create("vit_tiny"), tl, epochs=1, progress=False)  # the authors' 2x2 blocks on a 7x7 grid
    r = dmjd(create("vit_tiny"), tl, vl, epochs=1, progress=False, block=1, target="pixels",
             finetune_epochs=1, optimizer="adamw", lr=1e-3)
    assert math.isfinite(r.pretrain_history[0]["pretrain_loss"])
    assert r.finetuned is not None and r.last_acc is not None
    with pytest.raises(ValueError, match="target must be"):
        dmjd(create("vit_tiny"), tl, epochs=1, progress=False, block=1, target="sift")


def test_fd_strategy_keeps_teacher_frozen() -> None:
    torch.manual_seed(0)
    teacher = create("cnn_teacher_mnist")
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    tl, _ = _loaders()
    r = fd(create("vit_tiny_rpb"), tl, None, teacher=teacher, teacher_tap="stage3", epochs=1, progress=False)
    assert r.pretrain_history[0]["pretrain_loss"] > 0
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


class _CrashingLoader:
    """The loader ``inner``, raising on the first batch of epoch ``crash_at`` (a crash mid-training)."""

    def __init__(self, inner: InMemoryLoader, crash_at: int) -> None:
        self.inner, self.crash_at, self.epoch = inner, crash_at, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.inner.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self):
        if self.epoch == self.crash_at:
            raise KeyboardInterrupt("simulated crash")
        return iter(self.inner)


@pytest.mark.parametrize("strategy", ["sdae", "dmjd"])
def test_mim_pretraining_resumes_to_the_uninterrupted_weights(tmp_path, strategy) -> None:
    from distill.train.rundir import RunFolderError

    run = {"sdae": lambda m, tl, d, **kw: sdae(m, tl, epochs=3, progress=False, run_dir=d, folds=2,
                                               ema_momentum=0.8, **kw),
           "dmjd": lambda m, tl, d, **kw: dmjd(m, tl, epochs=3, progress=False, run_dir=d, block=1,
                                               target="pixels", **kw)}[strategy]

    def fresh():
        torch.manual_seed(0)
        return create("vit_tiny")

    whole = run(fresh(), _loaders()[0], str(tmp_path / "whole"))
    model = fresh()
    with pytest.raises(KeyboardInterrupt):
        run(model, _CrashingLoader(_loaders()[0], crash_at=2), str(tmp_path / "crashed"))
    assert (tmp_path / "crashed" / "pretrain" / "checkpoints" / "last.pt").is_file()
    with pytest.raises(RunFolderError, match="already holds"):  # never overwritten without resume
        run(fresh(), _loaders()[0], str(tmp_path / "crashed"))
    torch.manual_seed(123)  # the global RNG comes back from the checkpoint, whatever it is now
    resumed = run(fresh(), _loaders()[0], str(tmp_path / "crashed"), resume=True)
    assert [r["pretrain_loss"] for r in resumed.pretrain_history] == [r["pretrain_loss"] for r in whole.pretrain_history]
    for key, value in whole.encoder.state_dict().items():
        assert torch.equal(value, resumed.encoder.state_dict()[key]), key
    if strategy == "sdae":  # the EMA teacher is saved and restored too
        for key, value in whole.teacher.state_dict().items():
            assert torch.equal(value, resumed.teacher.state_dict()[key]), key
    with pytest.raises(ValueError, match="resume must be True or False"):
        run(fresh(), _loaders()[0], str(tmp_path / "x"), resume="last.pt")
