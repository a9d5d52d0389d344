"""The plain GAN trainer of issue 16 (distill.strategies.gan): losses, R1, EMA, conditioning, checkpoints."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from distill.models.stylegan import StyleDiscriminator, stylegan_small
from distill.strategies.gan import (
    d_logistic_loss,
    discriminator_loss,
    g_nonsaturating_loss,
    labels_to_c,
    load_gan_checkpoint,
    r1_penalty,
    train_gan,
)

torch.set_num_threads(1)


class Quadratic(nn.Module):
    """D(x) = k * sum(x^2) + b: its input gradient 2 k x is known in closed form."""

    def __init__(self, k: float = 0.3, b: float = -0.2) -> None:
        super().__init__()
        self.k = nn.Parameter(torch.tensor(k))
        self.b = nn.Parameter(torch.tensor(b))

    def forward(self, x, c=None):
        out = self.k * x.pow(2).flatten(1).sum(1) + self.b
        return out if c is None else out + c.sum(1)


def _softplus(v):
    return np.log1p(np.exp(v))


def test_logistic_losses_on_hand_numbers():
    real = torch.tensor([0.5, -1.0, 2.0])
    fake = torch.tensor([1.5, -0.5])
    want_d = _softplus(-real.numpy()).mean() + _softplus(fake.numpy()).mean()
    assert float(d_logistic_loss(real, fake)) == pytest.approx(want_d, rel=1e-6)
    assert float(g_nonsaturating_loss(fake)) == pytest.approx(_softplus(-fake.numpy()).mean(), rel=1e-6)


def test_r1_is_the_mean_squared_input_gradient_norm():
    torch.manual_seed(0)
    x = torch.randn(4, 1, 3, 3)
    d = Quadratic(k=0.3)
    # grad_x D = 2 k x, so ||grad||^2 = 4 k^2 sum(x^2) per image
    want = np.mean([4 * 0.09 * float((xi ** 2).sum()) for xi in x])
    assert float(r1_penalty(d, x).detach()) == pytest.approx(want, rel=1e-5)
    # differentiable: d r1 / dk = 8 k mean(sum x^2)
    r1 = r1_penalty(d, x)
    r1.backward()
    assert float(d.k.grad) == pytest.approx(8 * 0.3 * float(x.pow(2).flatten(1).sum(1).mean()), rel=1e-5)


def test_discriminator_loss_adds_the_weighted_r1():
    torch.manual_seed(1)
    real, fake = torch.randn(3, 1, 2, 2), torch.randn(5, 1, 2, 2)
    d = Quadratic(k=-0.7, b=0.1)
    dr = (-0.7 * real.pow(2).flatten(1).sum(1) + 0.1).numpy()
    df = (-0.7 * fake.pow(2).flatten(1).sum(1) + 0.1).numpy()
    r1 = np.mean(4 * 0.49 * real.pow(2).flatten(1).sum(1).numpy())
    loss, parts = discriminator_loss(d, real, fake, r1_weight=2.5)
    assert float(loss.detach()) == pytest.approx(_softplus(-dr).mean() + _softplus(df).mean() + 2.5 * r1, rel=1e-5)
    assert parts["r1"] == pytest.approx(r1, rel=1e-5)
    loss0, parts0 = discriminator_loss(d, real, fake)
    assert "r1" not in parts0 and float(loss0.detach()) == pytest.approx(parts0["d_loss"])


def test_labels_become_conditioning_vectors():
    c = labels_to_c(torch.tensor([2, 0]), 3)
    assert torch.equal(c, torch.tensor([[0.0, 0, 1], [1, 0, 0]]))
    soft = torch.tensor([[0.2, 0.8], [0.5, 0.5]])
    assert torch.equal(labels_to_c(soft, 2), soft)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        labels_to_c(torch.tensor([3]), 3)
    with pytest.raises(ValueError, match="conditional"):
        labels_to_c(None, 3)
    with pytest.raises(ValueError, match="unconditional"):
        labels_to_c(torch.tensor([1]), 0)


def _tiny(c_dim=0):
    torch.manual_seed(0)
    return (stylegan_small(z_dim=8, w_dim=8, c_dim=c_dim, width=8),
            StyleDiscriminator(width=8, c_dim=c_dim))


def test_a_few_steps_train_both_networks_and_the_ema_follows_its_formula(tmp_path):
    g, d = _tiny()
    g0, d0 = copy.deepcopy(g.state_dict()), copy.deepcopy(d.state_dict())
    images = torch.rand(12, 1, 28, 28)
    batch = 4
    # ema_rampup=0 and ema_kimg = batch/2000: beta = 0.5 ** (batch / (1000 * ema_kimg)) = 0.25
    res = train_gan(g, d, images, steps=1, batch_size=batch, r1_every=1, ema_kimg=batch / 2000, ema_rampup=0,
                    progress=False, checkpoint=tmp_path / "gan.safetensors")
    row = res.history[-1]
    assert all(math.isfinite(row[k]) for k in ("d_loss", "g_loss", "r1"))
    assert any(not torch.equal(v, d0[k]) for k, v in d.state_dict().items())
    g1 = g.state_dict()
    changed = [k for k, v in g1.items() if k != "mapping.w_avg" and not torch.equal(v, g0[k])]
    assert changed
    ema = dict(res.ema.named_parameters())
    for k in changed:
        torch.testing.assert_close(ema[k], 0.25 * g0[k] + 0.75 * g1[k])
    # w_avg moved once (one generator step) from 0 towards the batch mean, and the EMA copies it
    assert float(g.w_avg.abs().sum()) > 0
    torch.testing.assert_close(res.ema.w_avg, g.w_avg)
    # the checkpoint restores all three networks
    g2, d2 = _tiny()
    e2 = copy.deepcopy(g2)
    load_gan_checkpoint(res.checkpoint, g2, e2, d2)
    for a, b in ((g2, g), (e2, res.ema), (d2, d)):
        for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert ka == kb and torch.equal(va, vb)


def test_lazy_r1_is_logged_only_on_its_steps_and_conditional_training_runs():
    g, d = _tiny(c_dim=3)
    images = torch.rand(8, 1, 28, 28)
    res = train_gan(g, d, images, torch.softmax(torch.randn(8, 3), 1), steps=4, batch_size=4, r1_every=2,
                    log_every=1, progress=False)
    assert ["r1" in row for row in res.history] == [False, True, False, True]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        train_gan(g, d, images * 2 - 1, torch.zeros(8, 3), steps=1, progress=False)


# ----------------------------------------------------------------------------- Self-Distilled StyleGAN (arXiv 2202.12211)

from distill.functional.gan_truncation import (  # noqa: E402
    keep_lowest,
    kmeans,
    multimodal_truncate,
    nearest_center,
    reconstruction_scores,
    removal_precision_recall,
    truncate,
)
from distill.strategies.registry import strategy_info  # noqa: E402
from distill.strategies.self_distilled_stylegan import (  # noqa: E402
    fit_mode_clusters,
    project,
    sample_truncated,
    self_distilled_stylegan,
)


def test_truncations_on_hand_numbers():
    w = torch.tensor([[3.0, -1.0], [12.0, 8.0]])
    torch.testing.assert_close(truncate(w, torch.tensor([1.0, 1.0]), 0.5), torch.tensor([[2.0, 0.0], [6.5, 4.5]]))
    centers = torch.tensor([[0.0, 0.0], [10.0, 10.0]])
    torch.testing.assert_close(multimodal_truncate(w, centers, torch.tensor([0, 1]), 0.5),
                               torch.tensor([[1.5, -0.5], [11.0, 9.0]]))
    feats = torch.tensor([[0.1, 0.0], [4.0, 5.0], [2.6, 2.7]])
    assert nearest_center(feats, torch.tensor([[0.0, 0.0], [5.0, 5.0]])).tolist() == [0, 1, 1]


def test_kmeans_recovers_separated_clusters_and_their_means():
    rng = np.random.default_rng(0)
    means = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    labels = np.repeat(np.arange(3), 20)
    x = means[labels] + rng.normal(scale=0.5, size=(60, 2))
    centers, assign = kmeans(torch.tensor(x), 3, seed=1)
    for k in range(3):  # each found cluster is exactly one true cluster, its centre that cluster's sample mean
        members = labels[assign.numpy() == k]
        assert len(set(members)) == 1 and len(members) == 20
        np.testing.assert_allclose(centers[k].numpy(), x[labels == members[0]].mean(0), rtol=1e-10)


def test_scores_filtering_and_removal_measures():
    x = torch.tensor([[[[1.0, 0.0]]], [[[0.5, 0.5]]]])
    rec = torch.tensor([[[[0.0, 0.0]]], [[[0.5, 1.5]]]])
    torch.testing.assert_close(reconstruction_scores(x, rec), torch.tensor([0.5, 0.5]))
    f, fr = torch.tensor([[3.0, 4.0], [1.0, 0.0]]), torch.tensor([[2.0, 0.0], [7.0, 0.0]])
    torch.testing.assert_close(reconstruction_scores(x, rec, f, fr), torch.tensor([0.8, 0.0]))
    kept = keep_lowest(torch.tensor([3.0, 1.0, 2.0, 5.0]), 0.5)
    assert kept.tolist() == [False, True, True, False]
    m = removal_precision_recall(kept, torch.tensor([True, False, False, False]))
    assert m == {"precision": 0.5, "recall": 1.0, "removed": 2.0}


def _gen():
    torch.manual_seed(3)
    return stylegan_small(z_dim=8, w_dim=8, width=8).eval()


def test_projection_reconstructs_the_generators_own_images_better_than_noise():
    g = _gen()
    with torch.no_grad():
        own = (g.synthesis(g.mapping(torch.randn(6, 8)), "const") + 1) / 2
    noise = torch.rand(6, 1, 28, 28)
    images = torch.cat([own, noise])
    start = reconstruction_scores(images, ((g.synthesis(g.w_avg[None].expand(12, -1), "const") + 1) / 2).detach())
    _, rec = project(g, images, steps=30, lr=0.05, progress=False)
    scores = reconstruction_scores(images, rec)
    assert float(scores[:6].mean()) < float(start[:6].mean())  # the optimisation moved towards the images
    assert float(scores[:6].max()) < float(scores[6:].min())  # outliers (noise) reconstruct worst
    assert all(p.requires_grad for p in g.parameters())  # restored


def test_truncation_with_psi_zero_gives_the_centres_images():
    g = _gen()  # noise strengths start at 0: images are deterministic
    clusters = fit_mode_clusters(g, num_clusters=3, samples=30, seed=0)
    assert clusters.centers.shape == (3, 8)
    with torch.no_grad():
        centre_images = (g.synthesis(clusters.centers, "const") + 1) / 2
        mean_image = (g.synthesis(g.w_avg[None], "const") + 1) / 2
    # the centres are the mean w of each k-means cluster of the samples' pixel embeddings
    with torch.no_grad():
        w = g.mapping(torch.randn(30, 8, generator=torch.Generator().manual_seed(0)))
        pixels = ((g.synthesis(w, "const") + 1) / 2).flatten(1)
    _, assign = kmeans(pixels, 3, seed=0)
    for k in range(3):
        members = [w[i] for i in range(30) if int(assign[i]) == k]
        torch.testing.assert_close(clusters.centers[k], sum(members) / len(members))
    # psi = 0: each sample becomes the image of the centre nearest (in pixels) to its own image
    multi = sample_truncated(g, 10, psi=0.0, clusters=clusters, seed=1)
    with torch.no_grad():
        w = g.mapping(torch.randn(10, 8, generator=torch.Generator().manual_seed(1)))
        pixels = ((g.synthesis(w, "const") + 1) / 2).flatten(1)
    for img, p in zip(multi, pixels):
        nearest = min(range(3), key=lambda k: float(((p - centre_images[k].flatten()) ** 2).sum()))
        torch.testing.assert_close(img, centre_images[nearest], atol=1e-5, rtol=0)
    plain = sample_truncated(g, 4, psi=0.0, seed=1)
    torch.testing.assert_close(plain, mean_image.expand(4, -1, -1, -1))


def test_self_distilled_stylegan_filters_then_retrains():
    torch.manual_seed(0)
    images = torch.rand(12, 1, 28, 28)
    res = self_distilled_stylegan(lambda: stylegan_small(z_dim=8, w_dim=8, width=8),
                                  discriminator=lambda: StyleDiscriminator(width=8), images=images, keep_fraction=0.75,
                                  steps=2, batch_size=4, projection_steps=2, num_clusters=2, cluster_samples=8,
                                  progress=False)
    assert res.scores.shape == (12,) and int(res.kept.sum()) == 9
    assert bool((res.scores[res.kept].max() <= res.scores[~res.kept].min()))
    assert res.raw.history and res.filtered.history and res.clusters.centers.shape == (2, 8)
    info = strategy_info("self_distilled_stylegan")
    assert info.paper.arxiv == "2202.12211" and info.family == "generative"
