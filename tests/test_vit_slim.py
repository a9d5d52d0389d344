"""SiT (Self-slimmed Vision Transformer, Zong et al. ECCV 2022, arXiv 2111.12624): the token slimming
module, the slimmed ViT, and the sit_distill loss, checked against numbers worked out here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import distill
from distill import functional as DF
from distill.methods.vit_slim import ReverseTSM, SiTDistill
from distill.models import create
from distill.models.slimmed_vit import SlimBlock, SlimmedViT, TokenSlimming, slim_token_counts
from distill.models.vit import ViT

torch.set_num_threads(1)


def _tiny(cls=ViT, **kw):
    torch.manual_seed(0)
    cfg = dict(num_classes=5, in_channels=1, img_size=8, patch_size=2, dim=16, depth=2, heads=2)
    return cls(**cfg, **kw)


# ------------------------------------------------------------------------------- the TSM and the model


def test_tsm_is_a_softmax_over_input_tokens_times_scale_loop():
    torch.manual_seed(1)
    tsm = TokenSlimming(dim=6, num_in=5, num_out=3)
    with torch.no_grad():
        tsm.scale.fill_(0.7)  # a non-default inverse temperature
    x = torch.randn(2, 5, 6)
    scores = tsm.score(x).detach().numpy().astype(np.float64)  # (B, N, N') raw importance scores
    xn = x.numpy().astype(np.float64)
    out = tsm(x).detach().numpy()
    for b in range(2):
        for j in range(3):
            e = [math.exp(0.7 * scores[b, i, j]) for i in range(5)]
            w = [v / sum(e) for v in e]  # normalised over the 5 input tokens
            expect = sum(w[i] * xn[b, i] for i in range(5))
            np.testing.assert_allclose(out[b, j], expect, rtol=1e-5, atol=1e-6)


def test_slim_token_counts_by_hand():
    assert slim_token_counts(49, 4, (0, 1), 0.5) == [49, 24, 12, 12, 12]
    assert slim_token_counts(49, 6, (0, 1, 2), 0.5) == [49, 24, 12, 6, 6, 6, 6]
    assert slim_token_counts(196, 14, (0, 1, 2), 0.5)[1:5] == [98, 49, 24, 24]  # the authors' LV-ViT-T counts
    assert slim_token_counts(16, 3, (1,), 0.3) == [16, 16, 4, 4]
    assert slim_token_counts(10, 2, (0, 1), 0.95) == [10, 9, 9]  # int(10·0.95²) = 9, not int(9·0.95) = 8
    with pytest.raises(ValueError, match="keep_ratio"):
        slim_token_counts(49, 4, (0,), 1.0)
    with pytest.raises(ValueError, match="slim_after"):
        slim_token_counts(49, 4, (4,), 0.5)
    with pytest.raises(ValueError, match="no token"):
        slim_token_counts(4, 4, (0, 1, 2), 0.2)


def test_sit_tiny_taps_shapes_and_weights_rows_sum_to_one():
    model = create("sit_tiny")
    assert model.token_counts == [49, 24, 12, 12, 12]
    taps = distill.taps.Taps(model, ["blocks.0", "blocks.1", "blocks.3", "blocks.0.tsm", "blocks.1.tsm.weights"])
    out, store = distill.taps.run_tapped(model, distill.batch.as_batch((torch.randn(2, 1, 28, 28), None)), taps)
    assert out.shape == (2, 10)
    assert store["blocks.0"].shape == (2, 25, 64) and store["blocks.1"].shape == (2, 13, 64)
    assert store["blocks.3"].shape == (2, 13, 64) and store["blocks.0.tsm"].shape == (2, 24, 64)
    a = store["blocks.1.tsm.weights"]
    assert a.shape == (2, 12, 24)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 12))


def test_from_vit_copies_weights_and_without_tsm_is_the_vit():
    vit = _tiny()
    same = SlimmedViT.from_vit(vit, slim_after=())
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(same(x), vit(x))
    slim = SlimmedViT.from_vit(vit, slim_after=(0,), keep_ratio=0.5)
    assert isinstance(slim.blocks[0], SlimBlock) and slim.token_counts == [16, 8, 8]
    torch.testing.assert_close(slim.blocks[1].mlp.fc2.weight, vit.blocks[1].mlp.fc2.weight)


def test_flops_by_hand():
    torch.manual_seed(0)
    m = SlimmedViT(num_classes=10, in_channels=1, img_size=8, patch_size=4, dim=8, depth=2, heads=2, mlp_ratio=2,
                   slim_after=(0,), keep_ratio=0.5)
    # tokens: 4 patches (+1 class) -> 2 after block 0. D=8, MLP hidden 16, TSM hidden 4.
    block0 = 5 * 3 * 64 + 2 * 25 * 8 + 5 * 64 + 2 * 5 * 8 * 16  # 2960
    tsm = 4 * 8 * 4 + 4 * 4 * 2 + 2 * 4 * 8  # 224
    block1 = 3 * 3 * 64 + 2 * 9 * 8 + 3 * 64 + 2 * 3 * 8 * 16  # 1680
    assert m.flops() == {"blocks": block0 + tsm + block1, "total": block0 + tsm + block1 + 4 * 8 * 16 + 8 * 10}
    full = SlimmedViT(num_classes=10, in_channels=1, img_size=8, patch_size=4, dim=8, depth=2, heads=2, slim_after=())
    assert full.flops()["blocks"] == 2 * block0


# ------------------------------------------------------------------------------------------- the loss


def _log_softmax(z):
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def test_sit_distill_loss_against_numpy():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    rec = [torch.randn(4, 5, 3, generator=g), torch.randn(4, 5, 3, generator=g)]
    tok = [torch.randn(4, 5, 3, generator=g), torch.randn(4, 5, 3, generator=g)]
    T = 2.5
    ls, lt = _log_softmax(s.double().numpy() / T), _log_softmax(t.double().numpy() / T)
    kd = (np.exp(lt) * (lt - ls)).sum() / 4 * T * T
    mse = [((a.double().numpy() - b.double().numpy()) ** 2).mean() for a, b in zip(rec, tok)]
    expect = 0.7 * kd + 1.3 * (mse[0] + mse[1]) / 2
    got = DF.sit_distill_loss(s, t, rec, tok, T=T, logits_weight=0.7, token_weight=1.3)
    assert abs(float(got) - expect) < 1e-5
    assert abs(float(DF.sit_frd_loss(rec, tok)) - (mse[0] + mse[1]) / 2) < 1e-6
    with pytest.raises(ValueError, match="one teacher tensor per student layer"):
        DF.sit_frd_loss(rec, tok[:1])


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 4), st.integers(2, 6), st.floats(0.5, 4.0))
def test_sit_loss_zero_when_equal_and_non_negative(b, n, T):
    g = torch.Generator().manual_seed(b * 10 + n)
    z, x, y = torch.randn(b, 5, generator=g), torch.randn(b, n, 4, generator=g), torch.randn(b, n, 4, generator=g)
    assert float(DF.sit_distill_loss(z, z, [x], [x], T=T)) == pytest.approx(0.0, abs=1e-6)
    assert float(DF.sit_distill_loss(z, torch.randn(b, 5, generator=g), [x], [y], T=T)) >= 0.0


def test_reverse_tsm_by_hand():
    torch.manual_seed(2)
    r = ReverseTSM(dim=4, num_in=3, num_out=6, ratio=2.0)
    x = torch.randn(2, 3, 4)
    ln = torch.nn.functional.layer_norm
    xt = ln(x, (4,), r.norm_tokens.weight, r.norm_tokens.bias).transpose(1, 2)  # (B, D, N')
    h = torch.nn.functional.gelu(xt @ r.tokens[0].weight.T + r.tokens[0].bias)
    y = (h @ r.tokens[2].weight.T + r.tokens[2].bias).transpose(1, 2)  # (B, N, D)
    yn = ln(y, (4,), r.norm_channels.weight, r.norm_channels.bias)
    c = torch.nn.functional.gelu(yn @ r.channels[0].weight.T + r.channels[0].bias) @ r.channels[2].weight.T
    expect = y + c + r.channels[2].bias
    assert r(x).shape == (2, 6, 4)
    torch.testing.assert_close(r(x), expect)


def _pair(distilled=False):
    teacher = _tiny(distilled=distilled)
    student = _tiny(SlimmedViT, slim_after=(1,), keep_ratio=0.25, distilled=distilled)  # layer 0 keeps 16 tokens, layer 1 has 4
    return student, teacher


@pytest.mark.parametrize("distilled", [False, True])
def test_sit_distill_method_composes_terms_and_inits_from_teacher(distilled):
    student, teacher = _pair(distilled)
    p = 2 if distilled else 1  # prefix tokens: class (+ distillation)
    method = SiTDistill(layers=(0, 1), T=2.0, logits_weight=0.6, token_weight=1.7)
    d = distill.Distiller(student, teacher, losses={"sit": method})
    x, y = torch.randn(3, 1, 8, 8), torch.randint(0, 5, (3,))
    d.prepare((x, y))
    torch.testing.assert_close(student.blocks[0].attn.qkv.weight, teacher.blocks[0].attn.qkv.weight)
    assert isinstance(method.rtsm["0"], torch.nn.Identity) and isinstance(method.rtsm["1"], ReverseTSM)
    out = d((x, y))
    # by hand: hook the two models' block outputs, recover layer 1 with the method's RTSM
    keep = {}
    hooks = [m.blocks[i].register_forward_hook(lambda mod, a, o, k=(name, i): keep.__setitem__(k, o))
             for name, m in (("s", student), ("t", teacher)) for i in (0, 1)]
    with torch.no_grad():
        zs, zt = student(x).double().numpy(), teacher(x).double().numpy()
        rec1 = method.rtsm["1"](keep[("s", 1)][:, p:])
    for h in hooks:
        h.remove()
    ls, lt = _log_softmax(zs / 2.0), _log_softmax(zt / 2.0)
    kd = (np.exp(lt) * (lt - ls)).sum() / 3 * 4.0
    m0 = ((keep[("s", 0)][:, p:] - keep[("t", 0)][:, p:]) ** 2).mean().item()
    m1 = ((rec1 - keep[("t", 1)][:, p:]) ** 2).mean().item()
    assert float(out.parts["sit"]) == pytest.approx(0.6 * kd + 1.7 * (m0 + m1) / 2, rel=1e-4)


def test_sit_distill_trains_student_and_rtsm_only():
    student, teacher = _pair()
    t_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    method = SiTDistill(layers=(0, 1), token_weight=3.0)
    d = distill.Distiller(student, teacher, losses={"ce": 1.0, "sit": method})
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 5, (8,))
    d.prepare((x, y))
    opt = torch.optim.AdamW([p for p in d.parameters() if p.requires_grad], lr=3e-3)
    first = None
    for _ in range(12):
        out = d((x, y))
        out.total.backward()
        assert all(p.grad is None for p in teacher.parameters())
        assert method.rtsm["1"].tokens[0].weight.grad is not None
        assert student.blocks[1].tsm.score[1].weight.grad is not None
        opt.step()
        opt.zero_grad()
        first = float(out.parts["sit"]) if first is None else first
    assert float(out.parts["sit"]) < first
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, t_state[k]), k


def test_sit_distill_errors():
    with pytest.raises(ValueError, match="layers"):
        SiTDistill(layers=())
    student, teacher = _pair()
    with pytest.raises(ValueError, match="has 2 blocks"):
        SiTDistill(layers=(0, 5)).bind_models(student, teacher, None)
    swapped = distill.Distiller(teacher, student, losses={"sit": SiTDistill(layers=(0, 1), init_from_teacher=False)})
    with pytest.raises(distill.adapters.ShapeMismatchError, match="more tokens"):
        swapped.prepare((torch.randn(2, 1, 8, 8), torch.zeros(2, dtype=torch.long)))
    wide = ViT(num_classes=5, in_channels=1, img_size=8, patch_size=2, dim=32, depth=2, heads=2)
    with pytest.raises(distill.adapters.ShapeMismatchError, match="teacher's architecture"):
        distill.Distiller(student, wide, losses={"sit": SiTDistill(layers=(0, 1))}).prepare(
            (torch.randn(2, 1, 8, 8), torch.zeros(2, dtype=torch.long)))
