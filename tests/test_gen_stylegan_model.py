"""The small StyleGAN2-like generator of issue 16: modulation, demodulation, truncation, w_avg, shapes."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from distill.models import create
from distill.models.stylegan import ModulatedConv2d, start_resolution


def test_modulated_conv_is_a_per_sample_conv_with_scaled_demodulated_weights():
    torch.manual_seed(0)
    conv = ModulatedConv2d(3, 2, 3, w_dim=4)
    x, w = torch.randn(2, 3, 5, 5), torch.randn(2, 4)
    got = conv(x, w)
    for b in range(2):
        s = conv.affine(w[b])  # (3,)
        weight = conv.weight / 27 ** 0.5 * s[None, :, None, None]  # stored at unit scale, used / sqrt(fan_in)
        weight = weight / weight.pow(2).sum(dim=(1, 2, 3), keepdim=True).add(1e-8).sqrt()
        want = F.conv2d(x[b:b + 1], weight, padding=1)
        assert torch.allclose(got[b:b + 1], want, atol=1e-5)
    plain = ModulatedConv2d(3, 2, 1, w_dim=4, demodulate=False)
    s = plain.affine(w[0])
    assert torch.allclose(plain(x[:1], w[:1]), F.conv2d(x[:1], plain.weight / 3 ** 0.5 * s[None, :, None, None]),
                          atol=1e-5)


def test_equalised_layers_scale_unit_weights_by_one_over_sqrt_fan_in():
    from distill.models.stylegan import EqualConv2d, EqualLinear

    torch.manual_seed(0)
    lin, conv = EqualLinear(50, 400, bias_init=0.5), EqualConv2d(4, 300, 3, padding=1)
    assert abs(float(lin.weight.detach().std()) - 1) < 0.02 and abs(float(conv.weight.detach().std()) - 1) < 0.05  # N(0, 1)
    assert torch.equal(lin.bias, torch.full((400,), 0.5)) and torch.equal(conv.bias, torch.zeros(300))
    x = torch.randn(3, 50)
    assert torch.allclose(lin(x), x @ (lin.weight / 50 ** 0.5).T + 0.5, atol=1e-5)
    y = torch.randn(2, 4, 5, 5)
    assert torch.allclose(conv(y), F.conv2d(y, conv.weight / 36 ** 0.5, conv.bias, padding=1), atol=1e-5)
    # the point: one Adam step (about lr per weight) is the same relative change whatever the fan-in
    assert lin.gain == pytest.approx(50 ** -0.5)


def test_truncation_moves_w_towards_the_average_and_w_avg_tracks_the_mean():
    torch.manual_seed(0)
    g = create("stylegan_mnist", z_dim=8, w_dim=8)
    z = torch.randn(5, 8)
    g.train()
    w = g.mapping(z)
    assert torch.allclose(g.w_avg, 0.005 * w.mean(0), atol=1e-6)  # lerp(0, mean, 1 - 0.995)
    g.eval()
    w = g.mapping(z)
    centre = torch.randn(8)
    assert torch.allclose(g.mapping(z, truncation_psi=0.3, w_avg=centre), centre + 0.3 * (w - centre), atol=1e-6)
    assert torch.allclose(g.mapping(z, truncation_psi=0.0), g.w_avg.expand(5, -1))


def test_shapes_conditioning_and_errors():
    assert start_resolution(28) == 7 and start_resolution(32) == 4 and start_resolution(16) == 4
    with pytest.raises(ValueError, match="img_size 36"):
        start_resolution(36)
    g = create("stylegan_small", c_dim=3).eval()
    d = create("stylegan_discriminator", c_dim=3, width=32)
    z, c = torch.randn(4, 64), torch.softmax(torch.randn(4, 3), 1)
    img = g(z, c, noise="const")
    assert img.shape == (4, 1, 28, 28) and img.abs().max() <= 1
    assert torch.equal(img, g(z, c, noise="const"))
    assert not torch.equal(img, g(z, c.flip(1), noise="const"))  # the conditioning reaches the image
    ws = g.mapping(z, c).unsqueeze(1).repeat(1, g.num_ws, 1)
    assert torch.equal(g.synthesis(ws, noise="const"), img)
    assert d(img, c).shape == (4,)
    with pytest.raises(ValueError, match="conditional"):
        g(z)
    with pytest.raises(ValueError, match="pass c"):
        d(img)
    with pytest.raises(ValueError, match=r"w must be \(B, 64\)"):
        g.synthesis(torch.randn(4, 3, 64))
    teacher, student = create("stylegan_mnist"), create("stylegan_small")
    n = [sum(p.numel() for p in m.parameters()) for m in (teacher, student)]
    assert n[1] * 4 < n[0]
