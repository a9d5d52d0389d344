"""Wavelet KD (Zhang et al. CVPR 2022, arXiv 2203.06321), the image-to-image models, data and pix2pix loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("ptwt")

from hypothesis import given, settings, strategies as st  # noqa: E402

from distill import functional as DF  # noqa: E402
from distill.data.img2img import dilate, make_pairs, sobel_edges  # noqa: E402
from distill.methods import create_method, method_info  # noqa: E402
from distill.models import create  # noqa: E402
from distill.strategies.img2img import train_img2img  # noqa: E402
from distill.taps import Taps  # noqa: E402


def haar_level(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One Haar level by its 2x2-block definition, written out: x (H, W) with even sides."""
    a, b, c, d = x[0::2, 0::2], x[0::2, 1::2], x[1::2, 0::2], x[1::2, 1::2]
    return (a + b + c + d) / 2, (a + b - c - d) / 2, (a - b + c - d) / 2, (a - b - c + d) / 2


def test_haar_bands_match_hand_computed_4x4() -> None:
    x = np.array([[1, 2, 3, 4], [5, 6, 7, 8], [0, 1, 0, 1], [2, 2, 2, 2]], dtype=np.float64)
    low, highs = DF.wavelet_bands(torch.tensor(x)[None, None], levels=2)
    # level 1, block by block: [[1,2],[5,6]] -> LL 7, LH (3-11)/2 = -4, HL (1-2+5-6)/2 = -1, HH 0
    expected_l1 = np.array([[[-4.0, -4.0], [-1.5, -1.5]], [[-1.0, -1.0], [-0.5, -0.5]], [[0.0, 0.0], [-0.5, -0.5]]])
    np.testing.assert_allclose(highs[0][0, 0].numpy(), expected_l1, atol=1e-12)
    ll1 = np.array([[7.0, 11.0], [2.5, 2.5]])
    # level 2 on LL1 = [[7, 11], [2.5, 2.5]]: LL 11.5, LH (18-5)/2 = 6.5, HL (7-11+2.5-2.5)/2 = -2, HH -2
    np.testing.assert_allclose(highs[1][0, 0, :, 0, 0].numpy(), [6.5, -2.0, -2.0], atol=1e-12)
    np.testing.assert_allclose(low[0, 0].numpy(), [[(ll1.sum()) / 2]], atol=1e-12)
    assert [h.shape for h in highs] == [(1, 1, 3, 2, 2), (1, 1, 3, 1, 1)]


def _hand_wkd(s: np.ndarray, t: np.ndarray, levels: int, include_low: bool = False) -> float:
    """sum over levels of mean |LH, HL, HH (student) - (teacher)|, a plain loop over images and channels."""
    total = 0.0
    ls, lt = s.copy(), t.copy()
    for _ in range(levels):
        diffs, nxt_s, nxt_t = [], np.empty(ls[..., ::2, ::2].shape), np.empty(lt[..., ::2, ::2].shape)
        for i in range(s.shape[0]):
            for c in range(s.shape[1]):
                bs, bt = haar_level(ls[i, c]), haar_level(lt[i, c])
                nxt_s[i, c], nxt_t[i, c] = bs[0], bt[0]
                diffs += [np.abs(bs[k] - bt[k]).ravel() for k in (1, 2, 3)]
        total += np.concatenate(diffs).mean()
        ls, lt = nxt_s, nxt_t
    if include_low:
        total += np.abs(ls - lt).mean()
    return total


@pytest.mark.parametrize("levels,include_low", [(1, False), (3, False), (2, True)])
def test_wavelet_kd_loss_matches_a_plain_loop(levels: int, include_low: bool) -> None:
    g = torch.Generator().manual_seed(3)
    s, t = torch.rand(2, 2, 16, 8, generator=g, dtype=torch.float64), torch.rand(2, 2, 16, 8, generator=g,
                                                                                 dtype=torch.float64)
    got = DF.wavelet_kd_loss(s, t, levels=levels, include_low=include_low)
    assert float(got) == pytest.approx(_hand_wkd(s.numpy(), t.numpy(), levels, include_low), rel=1e-10)


def test_constant_offset_is_ignored_by_the_high_bands_only() -> None:
    t = torch.rand(3, 1, 16, 16, dtype=torch.float64)
    s = t + 0.3
    assert float(DF.wavelet_kd_loss(s, t, levels=3)) == pytest.approx(0.0, abs=1e-12)
    # with the low band: LL_J of a constant c is c * 2^J (each level sums 4 and halves), so the loss is 0.3 * 8
    assert float(DF.wavelet_kd_loss(s, t, levels=3, include_low=True)) == pytest.approx(0.3 * 8, rel=1e-10)
    # a high-frequency difference (a checkerboard) is seen
    checker = 0.1 * (torch.arange(16)[:, None] + torch.arange(16)[None, :]).remainder(2).to(t.dtype)
    assert float(DF.wavelet_kd_loss(t + checker, t, levels=3)) == pytest.approx(0.1 * 2 / 2 / 3, rel=1e-10)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(1, 2), st.floats(-2, 2))
def test_wavelet_kd_properties(b: int, c: int, scale: float) -> None:
    g = torch.Generator().manual_seed(b * 10 + c)
    t = scale * torch.rand(b, c, 8, 8, generator=g, dtype=torch.float64)
    s = t + torch.rand(b, c, 8, 8, generator=g, dtype=torch.float64)
    method = create_method("wavelet_kd", levels=2)
    assert float(method({"logits": t.clone()}, {"logits": t}, None)) == pytest.approx(0.0, abs=1e-12)
    s.requires_grad_(True)
    t.requires_grad_(True)
    loss = method({"logits": s}, {"logits": t}, None)
    assert float(loss.detach()) >= 0
    loss.backward()
    assert s.grad is not None and t.grad is None  # the teacher's image is detached


def test_method_registry_and_errors() -> None:
    info = method_info("wavelet_kd")
    assert info.family == "generative" and info.paper.arxiv == "2203.06321"
    assert info.defaults["levels"] == 4 and info.defaults["wavelet"] == "haar" and info.defaults["mode"] == "zero"
    with pytest.raises(ValueError, match="levels"):
        create_method("wavelet_kd", levels=0)
    with pytest.raises(ValueError, match="same shape"):
        DF.wavelet_kd_loss(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 4), levels=1)
    with pytest.raises(ValueError, match="side >= 16"):
        DF.wavelet_kd_loss(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8), levels=4)


def test_dilate_and_sobel_against_plain_loops() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, 6, 5, generator=g)
    xn = np.pad(x[0, 0].numpy(), 1)  # zero outside
    want = np.array([[xn[i:i + 3, j:j + 3].max() for j in range(5)] for i in range(6)])
    np.testing.assert_allclose(dilate(x, 3)[0, 0].numpy(), want, rtol=1e-6)
    kx = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float64)
    mag = np.array([[np.hypot((xn[i:i + 3, j:j + 3] * kx).sum(), (xn[i:i + 3, j:j + 3] * kx.T).sum())
                     for j in range(5)] for i in range(6)])
    np.testing.assert_array_equal(sobel_edges(x, 0.7)[0, 0].numpy(), (mag > 0.7).astype(np.float32))
    src, tgt = make_pairs(x, "edges2image", edge_threshold=0.7)
    assert torch.equal(tgt, x) and torch.equal(src, sobel_edges(x, 0.7))
    with pytest.raises(ValueError, match="unknown image-to-image task"):
        make_pairs(x, "colorize")
    with pytest.raises(ValueError, match="odd"):
        dilate(x, 2)


def test_unet_shapes_and_taps() -> None:
    for name in ("unet_img2img_teacher", "unet_img2img_student"):
        model = create(name)
        taps = Taps(model, list(model.tap_points), model_name=name)
        with taps.recording() as store, torch.no_grad():
            y = model(torch.rand(2, 1, 28, 28))
        assert y.shape == (2, 1, 28, 28) and float(y.min()) > 0 and float(y.max()) < 1
        assert store["down3"].shape[-1] == 4 and store["up1"].shape[-1] == 32 and torch.equal(store["out"], y)
        taps.remove()
    assert create("patchgan")(torch.rand(2, 1, 28, 28), torch.rand(2, 1, 28, 28)).shape[:2] == (2, 1)
    with pytest.raises(ValueError, match="width"):
        create("unet_img2img", width=0)


def test_train_img2img_with_wavelet_kd_trains_the_student_not_the_teacher() -> None:
    torch.manual_seed(0)
    x = torch.rand(16, 1, 16, 16)
    src, tgt = make_pairs(x, "thicken")
    teacher = create("unet_img2img", width=4, depth=2)
    teacher.train()
    teacher(torch.rand(4, 1, 16, 16))  # move BN statistics so "unchanged" is a real check
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = create("unet_img2img", width=2, depth=2)
    s_before = [p.clone() for p in student.parameters()]
    result = train_img2img(student, src, tgt, teacher=teacher, kd="wavelet", wavelet_levels=2, steps=3, batch_size=8,
                           val=(src[:4], tgt[:4]), progress=False)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    assert any(not torch.equal(a, b) for a, b in zip(s_before, student.parameters()))
    assert result.steps == 3 and result.history[-1]["kd"] > 0 and np.isfinite(result.psnr)
    with pytest.raises(ValueError, match="needs a trained teacher"):
        train_img2img(student, src, tgt, kd="l1", steps=1, progress=False)
    with pytest.raises(ValueError, match="kd must be"):
        train_img2img(student, src, tgt, teacher=teacher, kd="wkd", steps=1, progress=False)


def test_kd_term_alone_pulls_the_student_to_the_teacher() -> None:
    torch.manual_seed(1)
    src, tgt = make_pairs(torch.rand(8, 1, 16, 16), "thicken")
    teacher = create("unet_img2img", width=4, depth=2).eval()
    student = create("unet_img2img", width=2, depth=2)
    frozen = [p.clone() for p in student.parameters()]
    # no ground-truth and no adversarial term: with kd_weight 0 nothing moves (Adam's step on a zero gradient is 0)
    train_img2img(student, src, tgt, teacher=teacher, kd="l1", kd_weight=0.0, l1_weight=0.0, gan_weight=0.0, steps=2,
                  batch_size=8, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(frozen, student.parameters()))

    def gap() -> float:
        student.eval()
        with torch.no_grad():
            return float((student(src) - teacher(src)).abs().mean())

    before = gap()
    train_img2img(student, src, tgt, teacher=teacher, kd="l1", kd_weight=1.0, l1_weight=0.0, gan_weight=0.0, steps=30,
                  batch_size=8, lr=1e-2, progress=False)
    assert gap() < 0.5 * before
