"""FID / KID / PSNR of distill.train.generative_eval against closed forms computed here with numpy/scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("torchmetrics")
scipy_linalg = pytest.importorskip("scipy.linalg")

from distill.train import generative_eval as ge  # noqa: E402


def _net(seed: int = 0) -> ge.FeatureNet:
    torch.manual_seed(seed)
    return ge.FeatureNet(num_features=16, name="test-net").eval().requires_grad_(False)


def _images(n: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, 16, 16, generator=g) * 0.8 + shift).clamp(0, 1)


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # ReLU features of an untrained net: a rank-deficient product
def test_fid_is_the_frechet_distance_of_the_feature_gaussians():
    net = _net()
    real, fake = _images(64, 1), _images(48, 2) * 0.3  # a darker set
    got = ge.fid_kid(real, fake, net, kid_subset_size=16, kid_subsets=5)
    fr = net(real).double().numpy()
    ff = net(fake).double().numpy()
    mu_r, mu_f = fr.mean(0), ff.mean(0)
    cov_r, cov_f = np.cov(fr, rowvar=False), np.cov(ff, rowvar=False)
    root = scipy_linalg.sqrtm(cov_r @ cov_f).real
    want = float(((mu_r - mu_f) ** 2).sum() + np.trace(cov_r + cov_f - 2 * root))
    assert got["fid"] == pytest.approx(want, rel=1e-3, abs=1e-6)
    assert got["fid"] > 1e-3  # the two sets differ: the match is not 0 == 0
    assert got["extractor"] == "test-net" and got["n_real"] == 64 and got["n_fake"] == 48


def test_kid_with_one_full_subset_is_the_unbiased_mmd2_of_the_cubic_kernel():
    net = _net(1)
    real, fake = _images(20, 3), _images(20, 4, shift=0.1)
    got = ge.fid_kid(real, fake, net, kid_subset_size=20, kid_subsets=3)
    x, y = net(real).double().numpy(), net(fake).double().numpy()
    d = x.shape[1]

    def k(a, b):
        return (a @ b.T / d + 1.0) ** 3

    m = len(x)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    mmd = ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
           - 2 * kxy.mean())
    assert got["kid"] == pytest.approx(mmd, rel=1e-4, abs=1e-9)
    assert got["kid_std"] == pytest.approx(0.0, abs=1e-9)  # every subset is the whole set


def test_identical_sets_score_zero_fid():
    net = _net(2)
    real = _images(40, 5)
    assert ge.fid_kid(real, real.clone(), net, kid_subset_size=10)["fid"] == pytest.approx(0.0, abs=1e-4)


def test_bad_inputs_are_named():
    net = _net()
    with pytest.raises(ValueError, match="kid_subset_size 50 exceeds"):
        ge.fid_kid(_images(20, 1), _images(30, 2), net, kid_subset_size=50)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        ge.fid_kid(torch.rand(10, 16, 16), _images(10, 2), net)
    with pytest.raises(ValueError, match=r"takes images \(B, 1, H, W\)"):
        net(torch.rand(2, 3, 16, 16))


def test_psnr_on_hand_numbers():
    a = torch.zeros(2, 1, 2, 2)
    b = a.clone()
    b[0, 0, 0, 0] = 0.4  # MSE = 0.16 / 8 = 0.02 -> 10 log10(1 / 0.02)
    assert ge.psnr(b, a) == pytest.approx(10 * math.log10(50.0))
    assert ge.psnr(b * 2, a * 2, data_range=2.0) == pytest.approx(10 * math.log10(50.0))
    assert ge.psnr(a, a) == math.inf


def test_feature_net_trains_and_is_cached(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 1, 16, 16, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > x.mean()).long()
    calls = []

    def fake_split(dataset):
        calls.append(dataset)
        return x, y

    monkeypatch.setattr(ge, "_load_split", fake_split)
    net = ge.train_feature_net("mnist", epochs=2, seed=3, cache_dir=tmp_path, batch_size=16, progress=False)
    assert "trained here, 2 epochs, seed 3" in net.name and not net.training
    assert (tmp_path / "lenet-mnist-e2-s3.safetensors").is_file()
    again = ge.train_feature_net("mnist", epochs=2, seed=3, cache_dir=tmp_path, progress=False)
    assert calls == ["mnist"]  # the second call read the cache, not the data
    assert torch.equal(net(x[:4]), again(x[:4]))
    torch.manual_seed(3)  # the seed train_feature_net starts from: training moved the weights
    fresh = ge.FeatureNet(num_classes=2, name="untrained")
    assert not torch.allclose(fresh.fc.weight, net.fc.weight)
    with pytest.raises(ValueError, match="epochs must be at least 1"):
        ge.train_feature_net("mnist", epochs=0, cache_dir=tmp_path)
