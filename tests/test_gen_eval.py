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
    assert (tmp_path / "lenet-v3-mnist-e2-s3.safetensors").is_file()
    assert net.has_feature_stats and int(net.feature_stats_count) == 64  # fitted on the training images
    again = ge.train_feature_net("mnist", epochs=2, seed=3, cache_dir=tmp_path, progress=False)
    assert calls == ["mnist"]  # the second call read the cache, not the data
    assert torch.equal(net(x[:4]), again(x[:4]))
    assert torch.equal(net.feature_mean, again.feature_mean) and torch.equal(net.feature_std, again.feature_std)
    # the statistics are those of the training split's raw features
    f = net(x).double()
    assert torch.allclose(net.feature_mean.double(), f.mean(0), atol=1e-5)
    std = f.std(0, unbiased=False)
    live = std >= 1e-6
    want = torch.where(live, torch.maximum(std, 0.1 * std[live].mean()), torch.ones_like(std))
    assert torch.allclose(net.feature_std.double(), want, atol=1e-5)
    (tmp_path / "lenet-v3-mnist-e2-s3.safetensors").unlink()  # an old-format file is never read
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in net.state_dict().items() if not k.startswith("feature_")},
              str(tmp_path / "lenet-mnist-e2-s3.safetensors"))
    ge.train_feature_net("mnist", epochs=2, seed=3, cache_dir=tmp_path, batch_size=16, progress=False)
    assert calls == ["mnist", "mnist"]
    torch.manual_seed(3)  # the seed train_feature_net starts from: training moved the weights
    fresh = ge.FeatureNet(num_classes=2, name="untrained")
    assert not torch.allclose(fresh.fc.weight, net.fc.weight)
    with pytest.raises(ValueError, match="epochs must be at least 1"):
        ge.train_feature_net("mnist", epochs=0, cache_dir=tmp_path)


# ---- KID on standardised features ---------------------------------------------------------------


def _fitted(seed: int, train: torch.Tensor) -> ge.FeatureNet:
    return _net(seed).fit_feature_stats(train)


def _unbiased_cubic_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² with k(a, b) = (aᵀb / d + 1)³, written out with loops over the pairs."""
    d, m, n = x.shape[1], len(x), len(y)

    def k(a, b):
        return (float(a @ b) / d + 1.0) ** 3

    sxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    syy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    sxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return sxx + syy - 2 * sxy


def test_fit_feature_stats_are_the_training_features_mean_and_std():
    train = _images(50, 10)
    net = _fitted(1, train)
    f = net(train).double().numpy()
    std = f.std(0)  # population std (ddof 0)
    live = std >= 1e-6
    want_std = np.where(live, np.maximum(std, 0.1 * std[live].mean()), 1.0)
    np.testing.assert_allclose(net.feature_mean.numpy(), f.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(net.feature_std.numpy(), want_std, rtol=1e-5, atol=1e-6)
    assert int(net.feature_stats_count) == 50 and net.has_feature_stats
    z = net.standardise(net(train)).numpy()
    np.testing.assert_allclose(z[:, live].mean(0), 0.0, atol=1e-5)
    unfloored = live & (std >= 0.1 * std[live].mean())
    np.testing.assert_allclose(z[:, unfloored].std(0), 1.0, rtol=1e-4)


def test_a_nearly_constant_feature_is_floored_at_a_tenth_of_the_mean_std():
    # features by hand, columns ±1, ±2, ±0.005 around 3 and a constant 3: population std 1, 2, 0.005 (nearly
    # constant) and 0 (dead) -> mean live std (1 + 2 + 0.005) / 3 = 1.001667, floor 0.1001667
    net = _net(1)
    cols = torch.tensor([[1.0, -1.0], [2.0, -2.0], [0.005, -0.005], [0.0, 0.0]]).T.repeat(5, 1)  # (10, 4)
    feats = torch.zeros(10, net.num_features)
    feats[:, :4] = cols + 3.0
    net.forward = lambda images: feats[: len(images)]  # the statistics of these exact features
    net.fit_feature_stats(torch.zeros(10, 1, 28, 28))
    np.testing.assert_allclose(net.feature_std[:4].numpy(), [1.0, 2.0, 0.1001667, 1.0], rtol=1e-5)
    np.testing.assert_allclose(net.feature_mean[:4].numpy(), [3.0, 3.0, 3.0, 3.0], rtol=1e-6)


def test_kid_is_the_unbiased_cubic_mmd2_on_the_standardised_features():
    train = _images(60, 11)
    net = _fitted(1, train)
    real, fake = _images(20, 3), _images(20, 4, shift=0.1)
    got = ge.fid_kid(real, fake, net, kid_subset_size=20, kid_subsets=3)
    assert got["kid_features"] == "standardised"
    mu, sd = net.feature_mean.double().numpy(), net.feature_std.double().numpy()
    x = (net(real).double().numpy() - mu) / sd  # standardised by hand with the stored statistics
    y = (net(fake).double().numpy() - mu) / sd
    want = _unbiased_cubic_mmd2(x, y)
    assert got["kid"] == pytest.approx(want, rel=1e-4, abs=1e-9)
    raw = ge.fid_kid(real, fake, net, kid_subset_size=20, kid_subsets=3, kid_features="raw")
    assert raw["kid_features"] == "raw"
    assert raw["kid"] == pytest.approx(_unbiased_cubic_mmd2(net(real).double().numpy(), net(fake).double().numpy()),
                                       rel=1e-4, abs=1e-9)
    assert raw["kid"] != pytest.approx(got["kid"], rel=1e-2)  # the two spaces do differ
    assert raw["fid"] == pytest.approx(got["fid"], rel=1e-9)  # FID is on the raw features either way


def test_standardised_kid_ignores_the_scale_of_the_raw_features():
    train, real, fake = _images(60, 12), _images(24, 13), _images(24, 14, shift=0.15)
    net = _fitted(2, train)
    scaled = _net(2)
    last = scaled.body[6]  # the last conv before ReLU: scaling it by c scales every (ReLU) feature by c
    with torch.no_grad():
        last.weight.mul_(7.0)
        last.bias.mul_(7.0)
    scaled.fit_feature_stats(train)
    assert torch.allclose(scaled(real), 7.0 * net(real), rtol=1e-4, atol=1e-5)
    a = ge.fid_kid(real, fake, net, kid_subset_size=12, kid_subsets=4)
    b = ge.fid_kid(real, fake, scaled, kid_subset_size=12, kid_subsets=4)
    assert b["kid"] == pytest.approx(a["kid"], rel=1e-4, abs=1e-9)
    assert abs(a["kid"]) > 1e-4  # not a 0 == 0 match
    ra = ge.fid_kid(real, fake, net, kid_subset_size=12, kid_subsets=4, kid_features="raw")
    rb = ge.fid_kid(real, fake, scaled, kid_subset_size=12, kid_subsets=4, kid_features="raw")
    assert abs(rb["kid"]) > 20 * abs(ra["kid"])  # the raw KID moves with the scale
    assert b["fid"] == pytest.approx(49.0 * a["fid"], rel=1e-3)  # FID keeps its (scale-dependent) definition


def test_kid_between_two_real_samples_is_near_zero():
    train = _images(200, 20)
    net = _fitted(3, train)
    real_a, real_b = _images(300, 21), _images(300, 22)  # two draws of one distribution
    fake = (_images(300, 23) * 0.6).clamp(0, 1)  # a darker distribution
    same = ge.fid_kid(real_a, real_b, net, kid_subset_size=100, kid_subsets=20)
    diff = ge.fid_kid(real_a, fake, net, kid_subset_size=100, kid_subsets=20)
    assert abs(same["kid"]) < 0.02 * diff["kid"]
    assert abs(same["kid"]) < 3 * same["kid_std"] + 1e-3


def test_kid_feature_choice_is_checked():
    net = _net()
    with pytest.raises(ValueError, match="kid_features must be 'auto', 'standardised' or 'raw', got 'scaled'"):
        ge.fid_kid(_images(10, 1), _images(10, 2), net, kid_features="scaled")
    with pytest.raises(ValueError, match="has none: call its fit_feature_stats"):
        ge.fid_kid(_images(10, 1), _images(10, 2), net, kid_features="standardised")
    assert ge.fid_kid(_images(10, 1), _images(10, 2), net, kid_subset_size=5)["kid_features"] == "raw"  # auto
    with pytest.raises(ValueError, match=r"N >= 2, got \(1, 1, 16, 16\)"):
        net.fit_feature_stats(_images(1, 1))
