"""ViTKD: mimicking and masked generation against plain loops (seeded masks), properties, the method."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from distill import Distiller
from distill import functional as DF
from distill.adapters import ShapeMismatchError
from distill.batch import Batch
from distill.methods import ViTKD, create_method, method_info
from distill.models import create


def _loop_mask(batch: int, patches: int, ratio: float, seed: int) -> np.ndarray:
    """Keep each image's floor(L(1 - ratio)) tokens of lowest noise, found by sorting plain lists."""
    noise = torch.rand(batch, patches, generator=torch.Generator().manual_seed(seed)).tolist()
    keep = int(patches * (1 - ratio))
    mask = np.ones((batch, patches), dtype=bool)
    for b in range(batch):
        for i in sorted(range(patches), key=lambda j: noise[b][j])[:keep]:
            mask[b, i] = False
    return mask


def _conv3x3(x: np.ndarray, w: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """A 3x3 convolution with zero padding 1 written as loops: x (C, H, W), w (O, C, 3, 3) -> (O, H, W)."""
    c, h, wd = x.shape
    pad = np.zeros((c, h + 2, wd + 2))
    pad[:, 1:-1, 1:-1] = x
    out = np.zeros((w.shape[0], h, wd))
    for o in range(w.shape[0]):
        for i in range(h):
            for j in range(wd):
                out[o, i, j] = bias[o] + sum(pad[ci, i + di, j + dj] * w[o, ci, di, dj]
                                             for ci in range(c) for di in range(3) for dj in range(3))
    return out


def test_registered_with_paper_and_authors_defaults():
    info = method_info("vitkd")
    assert info.family == "vit" and info.paper.arxiv == "2209.02432" and info.paper.year == 2022
    d = info.defaults
    assert (d["mimic_weight"], d["generation_weight"], d["mask_ratio"]) == (3e-5, 3e-6, 0.5)
    assert d["shallow_pairs"] == (("blocks.0", "blocks.0"), ("blocks.1", "blocks.1")) and d["deep_pair"] == ("norm", "norm")
    assert isinstance(create_method("vitkd"), ViTKD)


@pytest.mark.parametrize("ratio", [0.25, 0.3, 0.5, 0.75])  # 0.25: floor(6.75) = 6 kept, not 7
def test_random_mask_matches_sorted_lists(ratio):
    got = DF.vitkd_random_mask(5, 9, ratio, torch.Generator().manual_seed(11))
    assert got.dtype == torch.bool and np.array_equal(got.numpy(), _loop_mask(5, 9, ratio, 11))
    assert (got.sum(1) == 9 - int(9 * (1 - ratio))).all()
    with pytest.raises(ValueError, match="mask ratio"):
        DF.vitkd_random_mask(2, 4, 1.5)


def test_mimic_and_generation_losses_match_loops():
    g = torch.Generator().manual_seed(0)
    s = [torch.randn(3, 4, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    t = [torch.randn(3, 4, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    want = sum((s[k][b, l, c] - t[k][b, l, c]).item() ** 2
               for k in range(2) for b in range(3) for l in range(4) for c in range(5)) / 3
    assert DF.vitkd_mimic_loss(s, t).item() == pytest.approx(want, rel=1e-12)
    mask = torch.tensor([[True, False, False, True], [False, False, True, False], [True, True, True, False]])
    want = sum((s[0][b, l, c] - t[0][b, l, c]).item() ** 2
               for b in range(3) for l in range(4) for c in range(5) if mask[b, l]) / (3 * 0.3)
    assert DF.vitkd_generation_loss(s[0], t[0], mask, 0.3).item() == pytest.approx(want, rel=1e-12)
    token = torch.arange(5, dtype=torch.float64)
    filled = DF.vitkd_fill_masked(s[0], mask, token.reshape(1, 1, 5))
    for b in range(3):
        for l in range(4):
            assert torch.equal(filled[b, l], token if mask[b, l] else s[0][b, l])
    with pytest.raises(ValueError, match=r"\(3, 4, 5\) and \(3, 4, 6\)"):
        DF.vitkd_mimic_loss([s[0]], [torch.zeros(3, 4, 6)])
    with pytest.raises(ValueError, match="ratio > 0"):
        DF.vitkd_generation_loss(s[0], t[0], mask, 0.0)


def _views(seed: int = 1):
    """Student width 3 with 2 prefix tokens (DeiT), teacher width 4 with 1; a 2x2 patch grid, B=2."""
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(True)

    sv = {"logits": leaf(2, 10), "blocks.0": leaf(2, 6, 3), "blocks.1": leaf(2, 6, 3), "norm": leaf(2, 6, 3)}
    tv = {"logits": leaf(2, 10), "blocks.0": leaf(2, 5, 4), "blocks.2": leaf(2, 5, 4), "norm": leaf(2, 5, 4)}
    return sv, tv, Batch(torch.zeros(2, 1, 4, 4), torch.arange(2))


class _Prefix(torch.nn.Module):
    def __init__(self, p: int) -> None:
        super().__init__()
        self.num_prefix_tokens = p


def _method(**kw) -> ViTKD:
    kw = {"shallow_pairs": [("blocks.0", "blocks.0"), ("blocks.1", "blocks.2")], "mimic_weight": 0.7,
          "generation_weight": 0.2, "mask_ratio": 0.5, "seed": 4, **kw}
    m = ViTKD(**kw).double()
    sv, tv, batch = _views()
    m.bind_models(_Prefix(2), _Prefix(1), batch)
    with torch.no_grad():
        m.prepare(sv, tv, batch)
    return m


def test_method_matches_an_independent_computation():
    m = _method()
    for p in m.parameters():  # non-trivial parts: a nonzero mask token, random biases
        torch.nn.init.normal_(p, generator=torch.Generator().manual_seed(p.numel()))
    sv, tv, batch = _views()
    got = m(sv, tv, batch)

    def lin(layer, x):  # x (L, D_s) -> (L, D_t)
        return x @ layer.weight.detach().numpy().T + layer.bias.detach().numpy()

    s = {k: v.detach().numpy()[:, 2:] for k, v in sv.items() if k != "logits"}
    t = {k: v.detach().numpy()[:, 1:] for k, v in tv.items() if k != "logits"}
    mimic = sum(((lin(m.mimic_align[k], s[sp][b]) - t[tp][b]) ** 2).sum()
                for k, (sp, tp) in enumerate(m.shallow_pairs) for b in range(2)) / 2
    mask = _loop_mask(2, 4, 0.5, 4)
    conv1, conv2 = m.generation[0], m.generation[2]
    token = m.mask_token.detach().numpy().reshape(-1)
    gen = 0.0
    for b in range(2):
        x = lin(m.align, s["norm"][b])
        x = np.stack([token if mask[b, l] else x[l] for l in range(4)])  # (L, D_t)
        grid = x.T.reshape(4, 2, 2)
        h = np.maximum(_conv3x3(grid, conv1.weight.detach().numpy(), conv1.bias.detach().numpy()), 0)
        out = _conv3x3(h, conv2.weight.detach().numpy(), conv2.bias.detach().numpy()).reshape(4, 4).T  # (L, D_t)
        gen += sum(((out[l] - t["norm"][b][l]) ** 2).sum() for l in range(4) if mask[b, l])
    gen /= 2 * 0.5
    assert got.item() == pytest.approx(0.7 * mimic + 0.2 * gen, rel=1e-9)
    got.backward()
    assert all(v.grad is None for v in tv.values())  # no gradient reaches the teacher
    assert sv["norm"].grad[:, :2].abs().sum() == 0 and sv["norm"].grad[:, 2:].abs().sum() > 0
    assert m.mask_token.grad.abs().sum() > 0 and m.generation[0].weight.grad.abs().sum() > 0


def test_parts_built_by_prepare_and_eval_mask_reproducible():
    m = _method()
    assert [type(a).__name__ for a in m.mimic_align] == ["Linear", "Linear"] and m.mimic_align[0].in_features == 3
    assert m.align.out_features == 4 and m.mask_token.shape == (1, 1, 4) and m.generation[0].in_channels == 4
    assert m.grid == (2, 2)
    sv, tv, batch = _views()
    m.eval()
    assert m(sv, tv, batch).item() == m(sv, tv, batch).item()


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), ratio=st.floats(0.1, 1.0))
def test_properties_nonnegative_and_zero_mimic_when_equal(seed, ratio):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(2, 1 + 4, 3, generator=g, dtype=torch.float64)
    t = torch.randn(2, 1 + 4, 3, generator=g, dtype=torch.float64)
    m = ViTKD(shallow_pairs=[("a", "a")], deep_pair=("z", "z"), mimic_weight=1.0, generation_weight=0.0,
              mask_ratio=ratio, seed=seed).double()
    sv, tv, batch = {"a": s, "z": s}, {"a": t, "z": t}, Batch(torch.zeros(2, 1, 4, 4), torch.arange(2))
    m.bind_models(_Prefix(1), _Prefix(1), batch)
    m.prepare(sv, tv, batch)
    assert isinstance(m.mimic_align[0], torch.nn.Identity)  # equal widths: no linear layer
    assert m(sv, tv, batch).item() >= 0
    assert m(sv, {"a": s.clone(), "z": t}, batch).item() == 0.0


def test_errors_before_work():
    with pytest.raises(ValueError, match="mask_ratio"):
        ViTKD(mask_ratio=0.0)
    with pytest.raises(ValueError, match="mimic_weight"):
        ViTKD(mimic_weight=-1.0)
    sv, tv, batch = _views()
    with pytest.raises(RuntimeError, match="prepare"):
        ViTKD()(sv, tv, batch)
    m = ViTKD(shallow_pairs=[("blocks.0", "blocks.0")])
    m.bind_models(_Prefix(1), _Prefix(1), batch)  # 5 student patches vs 4 teacher patches
    with pytest.raises(ShapeMismatchError, match=r"student:blocks.0 \(2, 5, 3\), teacher:blocks.0 \(2, 4, 4\)"):
        m.prepare(sv, tv, batch)


def test_distiller_vit_small_to_vit_tiny_trains_its_parts():
    torch.manual_seed(0)
    teacher, student = create("vit_small", num_classes=10), create("vit_tiny", num_classes=10)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    d = Distiller(student, teacher, losses={"vitkd": {"mimic_weight": 1e-3, "generation_weight": 1e-3}})
    x, y = torch.randn(8, 1, 28, 28), torch.arange(8) % 10
    d.prepare((x, y))
    m = d.methods["vitkd"]
    assert m.grid == (7, 7) and m.align.in_features == 64 and m.align.out_features == 128
    params = {id(p) for p in d.trainable_parameters()}
    assert all(id(p) in params for p in m.parameters())  # the optimizer sees the linear layers, token, block
    opt = torch.optim.AdamW(d.trainable_parameters(), lr=3e-3)
    m.eval()  # the same mask every step, so the losses compare
    losses = []
    for _ in range(4):
        out = d((x, y))
        losses.append(out.total.item())
        opt.zero_grad()
        out.total.backward()
        opt.step()
    assert losses[-1] < losses[0]
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_cnn_teacher_feature_maps_serve_as_tokens():
    torch.manual_seed(0)
    teacher, student = create("cnn_teacher_mnist", num_classes=10), create("vit_tiny", num_classes=10)
    d = Distiller(student, teacher, losses={"vitkd": {"shallow_pairs": [("blocks.1", "stage2")],
                                                      "deep_pair": ("norm", "stage2")}})
    x, y = torch.randn(4, 1, 28, 28), torch.arange(4) % 10
    d.prepare((x, y))
    m = d.methods["vitkd"]
    assert m.align.out_features == 128 and m.grid == (7, 7)  # stage2: 128 channels on a 7x7 grid = 49 tokens
    out = d((x, y))
    assert torch.isfinite(out.total) and out.parts["vitkd"] > 0
