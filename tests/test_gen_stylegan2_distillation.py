"""StyleGAN2 Distillation for Feed-forward Image Manipulation (Viazovetskyi et al. ECCV 2020, arXiv 2003.03581)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from distill.models import create
from distill.strategies.registry import strategy_info
from distill.strategies.stylegan2_distillation import (classify, edit_pairs, latent_direction, sample_latents,
                                                       stylegan2_distillation)


def test_registered_with_its_paper() -> None:
    info = strategy_info("stylegan2_distillation")
    assert info.family == "generative" and info.paper.arxiv == "2003.03581" and info.paper.year == 2020


def test_mean_diff_direction_matches_numpy_top_k() -> None:
    g = np.random.default_rng(0)
    w = g.normal(size=(40, 5))
    logits = g.normal(size=(40, 3)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    pred = probs.argmax(1)

    def centre(c: int, k: int) -> np.ndarray:
        idx = [i for i in range(40) if pred[i] == c]
        idx = sorted(idx, key=lambda i: -probs[i, c])[:k]
        return w[idx].mean(0)

    got = latent_direction(torch.tensor(w), torch.tensor(probs), 2, 0, top_k=4)
    np.testing.assert_allclose(got.numpy(), centre(0, 4) - centre(2, 4), rtol=1e-12)
    got_all = latent_direction(torch.tensor(w), torch.tensor(probs), 2, 0, top_k=None)
    np.testing.assert_allclose(got_all.numpy(), centre(0, 40) - centre(2, 40), rtol=1e-12)


def test_logistic_direction_is_the_boundary_normal() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(200, 4, generator=g, dtype=torch.float64)
    cls = (w[:, 1] > 0).long()  # classes separated by the hyperplane w_1 = 0
    probs = torch.stack([1.0 - cls, cls.double()], 1) * 0.9 + 0.05
    d = latent_direction(w, probs, 0, 1, method="logistic")
    cos = float(d[1] / d.norm())
    assert cos > 0.95
    mean_diff = w[cls == 1].mean(0) - w[cls == 0].mean(0)
    assert float(d.norm()) == pytest.approx(float((d / d.norm()) @ mean_diff), rel=1e-9)


def test_direction_errors() -> None:
    w, probs = torch.randn(4, 3), torch.tensor([[0.9, 0.1]] * 4)
    with pytest.raises(ValueError, match="no sample is classified as class 1"):
        latent_direction(w, probs, 0, 1)
    with pytest.raises(ValueError, match="must differ"):
        latent_direction(w, probs, 0, 0)
    with pytest.raises(ValueError, match="not a class"):
        latent_direction(w, probs, 0, 5)


class _BrightnessGAN(nn.Module):
    """A stand-in generator: style w (B, 2) -> a constant image of value sigmoid(w_0), in [-1, 1] units."""

    z_dim = 2

    def sample_z(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return torch.randn(n, 2, generator=generator)

    def mapping(self, z: Tensor, truncation_psi: float = 1.0) -> Tensor:
        return truncation_psi * z

    def synthesis(self, w: Tensor, noise: str = "random") -> Tensor:
        return (2 * torch.sigmoid(w[:, :1]) - 1)[:, :, None, None].expand(-1, 1, 16, 16)


class _BrightnessClassifier(nn.Module):
    """Two classes: p(bright) = mean pixel value, p(dark) = 1 - it."""

    def forward(self, x: Tensor) -> Tensor:
        p = x.mean((1, 2, 3)).clamp(1e-6, 1 - 1e-6)
        return torch.stack([torch.log1p(-p), torch.log(p)], 1)


def test_edit_pairs_selects_as_a_plain_loop() -> None:
    gan, clf = _BrightnessGAN(), _BrightnessClassifier()
    w = torch.tensor([[-2.0, 0.0], [0.0, 1.0], [1.5, 0.0], [-0.3, 2.0], [3.0, 0.0]], dtype=torch.float64)
    d = torch.tensor([1.0, 0.0], dtype=torch.float64)
    src, tgt, kept = edit_pairs(gan, clf, w, d, 0, 1, amplitude=1.5, confidence=0.75)
    want_keep, want_src, want_tgt = [], [], []
    for row in w.tolist():
        vals = [1 / (1 + np.exp(-(row[0] + s * 1.5))) for s in (-1, 0, 1)]  # brightness = p(bright)
        i_a = int(np.argmax([1 - v for v in vals]))
        i_b = int(np.argmax(vals))
        ok = i_a < i_b and 1 - vals[i_a] >= 0.75 and vals[i_b] >= 0.75
        want_keep.append(ok)
        if ok:
            want_src.append(vals[i_a])
            want_tgt.append(vals[i_b])
    assert kept.tolist() == want_keep and any(want_keep) and not all(want_keep)
    np.testing.assert_allclose(src.mean((1, 2, 3)).numpy(), want_src, rtol=1e-9)
    np.testing.assert_allclose(tgt.mean((1, 2, 3)).numpy(), want_tgt, rtol=1e-9)
    # a zero direction makes the triple identical: one member is both the source and the target, never a pair
    # (with confidence 0.4 both of its probabilities, 0.5, would pass)
    _, _, kept = edit_pairs(gan, clf, torch.zeros(1, 2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64),
                            0, 1, confidence=0.4)
    assert kept.tolist() == [False]


def test_classify_uses_classify_method_when_present() -> None:
    class WithClassify(nn.Module):
        def forward(self, x: Tensor) -> Tensor:  # features, not logits
            return torch.zeros(x.shape[0], 7)

        def classify(self, x: Tensor) -> Tensor:
            return torch.tensor([[0.0, np.log(3.0)]]).expand(x.shape[0], -1)

    p = classify(WithClassify(), torch.rand(3, 1, 8, 8))
    np.testing.assert_allclose(p.numpy(), [[0.25, 0.75]] * 3, rtol=1e-6)


def test_sample_latents_is_seeded_and_in_unit_range() -> None:
    gan = create("stylegan_small").train()
    w_avg = gan.w_avg.clone()
    w1, x1 = sample_latents(gan, 6, seed=3, truncation_psi=0.5)
    w2, x2 = sample_latents(gan, 6, seed=3, truncation_psi=0.5)
    assert gan.training and torch.equal(gan.w_avg, w_avg)
    assert torch.equal(w1, w2) and torch.equal(x1, x2) and x1.shape == (6, 1, 28, 28)
    assert float(x1.min()) >= 0 and float(x1.max()) <= 1


def test_strategy_end_to_end_on_the_stand_in_gan() -> None:
    torch.manual_seed(0)
    student = create("unet_img2img", width=2, depth=2)
    before = [p.clone() for p in student.parameters()]
    real = torch.full((4, 1, 16, 16), 0.1)
    out = stylegan2_distillation(student, teacher=_BrightnessGAN(), classifier=_BrightnessClassifier(),
                                 source_class=0, target_class=1, direction_samples=256, top_k=32, truncation_psi=1.0,
                                 amplitude=1.0, confidence=0.6, train_pairs=16, test_pairs=8, steps=2, batch_size=8,
                                 gan_weight=0.5, real_images=real, progress=False)
    assert out.direction[0] > 0  # bright minus dark along the brightness coordinate
    assert out.pairs_train == 16 and out.pairs_test == 8 and 0 < out.keep_rate <= 1
    assert out.edit_rate_teacher == 1.0 and out.edit_rate_source == 0.0
    assert np.isfinite(out.psnr_student) and np.isfinite(out.psnr_identity)
    assert out.real_base_rate == 0.0 and out.real_edit_rate is not None
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
    with pytest.raises(RuntimeError, match="gave a confident pair"):
        stylegan2_distillation(student, teacher=_BrightnessGAN(), classifier=_BrightnessClassifier(), source_class=0,
                               target_class=1, direction_samples=64, confidence=1.0, train_pairs=4, test_pairs=4,
                               max_latents=2048, steps=1, progress=False)
    with pytest.raises(TypeError, match="StyleGAN-like"):
        stylegan2_distillation(student, teacher=nn.Linear(2, 2), classifier=_BrightnessClassifier(), source_class=0,
                               target_class=1, progress=False)
