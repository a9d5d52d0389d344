"""DarkGAN (Nistal et al., ISMIR 2021, arXiv 2108.01216): the soft labels, the conditioning (KD) term and the
agreement measure on hand-worked numbers; the strategy's loop on a tiny generator/discriminator."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.functional.darkgan import (
    darkgan_condition_agreement,
    darkgan_condition_loss,
    darkgan_discriminator_loss,
    darkgan_generator_loss,
    darkgan_soft_labels,
)
from distill.models.stylegan import StyleDiscriminator, StyleGenerator
from distill.strategies.darkgan import AuxDiscriminator, darkgan, darkgan_evaluate
from distill.strategies.registry import strategy_info

LN2, LN3 = math.log(2.0), math.log(3.0)


# ----------------------------------------------------------------------------- the math, by hand


def test_soft_labels_are_the_tempered_probabilities():
    T = 2.0
    # t / T = [ln 2, 0, 0] -> softmax [2, 1, 1] / 4 ; t / T = [0, ln 3, 0] -> [1, 3, 1] / 5
    t = torch.tensor([[T * LN2, 0.0, 0.0], [0.0, T * LN3, 0.0]])
    c = darkgan_soft_labels(t, temperature=T)
    assert torch.allclose(c, torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.6, 0.2]]), atol=1e-6)
    # sigmoid(ln 3) = 3/4, sigmoid(0) = 1/2, sigmoid(-ln 3) = 1/4
    s = darkgan_soft_labels(torch.tensor([[T * LN3, 0.0, -T * LN3]]), temperature=T, form="sigmoid")
    assert torch.allclose(s, torch.tensor([[0.75, 0.5, 0.25]]), atol=1e-6)
    assert not darkgan_soft_labels(t.requires_grad_(), temperature=T).requires_grad  # a target


def test_softmax_condition_loss_is_the_categorical_kl_on_hand_numbers():
    T = 2.0
    c = torch.tensor([[0.5, 0.25, 0.25], [1.0, 0.0, 0.0]])
    # row 1: a / T = [0, ln 2, 0] -> q = [1/4, 1/2, 1/4]: KL = 1/2 ln 2 + 1/4 ln(1/2) + 0 = ln 2 / 4
    # row 2: a / T = [ln 2, 0, 0] -> q = [1/2, 1/4, 1/4]: KL = ln 2 (the zero entries add nothing)
    a = torch.tensor([[0.0, T * LN2, 0.0], [T * LN2, 0.0, 0.0]])
    got = darkgan_condition_loss(a, c, temperature=T)
    assert got.item() == pytest.approx((LN2 / 4 + LN2) / 2, abs=1e-6)
    # with one-hot targets and T = 1 it is AC-GAN's cross-entropy
    y = torch.tensor([2, 0])
    assert darkgan_condition_loss(a, F.one_hot(y, 3).float(), temperature=1.0).item() == pytest.approx(
        F.cross_entropy(a, y).item(), abs=1e-6)


def test_sigmoid_condition_loss_is_the_bernoulli_kl_on_hand_numbers():
    T = 3.0
    c = torch.tensor([[0.5, 1.0], [0.0, 0.25]])
    a = torch.tensor([[T * LN3, T * LN3], [0.0, -T * LN3]])  # q = [[3/4, 3/4], [1/2, 1/4]]
    # 0.5 ln(0.5/0.75) + 0.5 ln(0.5/0.25) = 0.5 ln(4/3); 1 ln(1/0.75) = ln(4/3); 1 ln(1/0.5) = ln 2; 0
    expected = (0.5 * math.log(4 / 3) + math.log(4 / 3) + LN2 + 0.0) / 4
    assert darkgan_condition_loss(a, c, temperature=T, form="sigmoid").item() == pytest.approx(expected, abs=1e-6)


def test_gradients_equal_the_authors_cross_entropies():
    # the authors' code: BCE(sigmoid(a / T), c) (multi-label) or the soft cross-entropy; ours differ by a constant
    torch.manual_seed(0)
    T = 3.0
    a = torch.randn(4, 5, requires_grad=True)
    c = torch.rand(4, 5)
    g_ours, = torch.autograd.grad(darkgan_condition_loss(a, c, T, "sigmoid"), a)
    g_code, = torch.autograd.grad(F.binary_cross_entropy(torch.sigmoid(a / T), c), a)
    assert torch.allclose(g_ours, g_code, atol=1e-6)
    p = F.softmax(torch.randn(4, 5), 1)
    g_ours, = torch.autograd.grad(darkgan_condition_loss(a, p, T), a)
    g_code, = torch.autograd.grad(-(p * F.log_softmax(a / T, 1)).sum() / 4, a)
    assert torch.allclose(g_ours, g_code, atol=1e-6)


def test_agreement_is_teacher_kl_and_top1_by_a_plain_loop():
    T = 2.0
    t = torch.tensor([[3.0, 0.0, 0.0], [0.0, 1.0, 2.0], [0.5, 0.2, -1.0]])
    c = torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.3, 0.1], [0.7, 0.2, 0.1]])
    kl = 0.0
    for i in range(3):
        q = np.exp(t[i].numpy() / T) / np.exp(t[i].numpy() / T).sum()
        kl += sum(c[i, k].item() * math.log(c[i, k].item() / q[k]) for k in range(3))
    got = darkgan_condition_agreement(t, c, temperature=T)
    assert got["kl"] == pytest.approx(kl / 3, abs=1e-5)
    assert got["top1"] == pytest.approx(2 / 3)  # rows 1 and 3 agree, row 2 does not
    s = darkgan_condition_agreement(torch.tensor([[1.0, -1.0]]), torch.tensor([[0.9, 0.8]]), 1.0, "sigmoid")
    assert s["top1"] == pytest.approx(0.5)


def test_player_losses_on_hand_numbers():
    T = 2.0
    # softplus(-0) = ln 2, softplus(ln 3) = ln 4, softplus(-ln 3) = ln(4/3)
    real, fake = torch.tensor([0.0, 0.0]), torch.tensor([[LN3], [LN3]])
    c = torch.tensor([[0.5, 0.25, 0.25], [1.0, 0.0, 0.0]])
    a = torch.tensor([[0.0, T * LN2, 0.0], [T * LN2, 0.0, 0.0]])  # KL = 5/8 ln 2 (above)
    loss, parts = darkgan_discriminator_loss(real, fake, a, c, temperature=T, weight=3.0)
    assert loss.item() == pytest.approx(LN2 + math.log(4) + 3.0 * 5 / 8 * LN2, abs=1e-6)
    assert parts["d_cond"] == pytest.approx(5 / 8 * LN2, abs=1e-6)
    loss, parts = darkgan_generator_loss(fake, a, c, temperature=T, weight=0.5)
    assert loss.item() == pytest.approx(math.log(4 / 3) + 0.5 * 5 / 8 * LN2, abs=1e-6)
    # unconditional: only the adversarial terms
    assert darkgan_discriminator_loss(real, fake)[0].item() == pytest.approx(LN2 + math.log(4), abs=1e-6)
    assert darkgan_generator_loss(fake)[0].item() == pytest.approx(math.log(4 / 3), abs=1e-6)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(2, 6), st.floats(0.5, 5.0), st.integers(0, 10_000))
def test_condition_loss_is_nonnegative_and_zero_at_a_match(b, k, T, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(b, k, generator=g) * 3
    c = F.softmax(torch.randn(b, k, generator=g), 1)
    assert darkgan_condition_loss(a, c, T).item() >= -1e-6
    # a head whose tempered softmax is c (logits T log c plus any per-row constant) costs nothing
    match = T * torch.log(c) + torch.randn(b, 1, generator=g)
    assert darkgan_condition_loss(match, c, T).item() == pytest.approx(0.0, abs=1e-5)
    s = torch.rand(b, k, generator=g) * 0.98 + 0.01
    assert darkgan_condition_loss(a, s, T, "sigmoid").item() >= -1e-6
    assert darkgan_condition_loss(T * torch.logit(s), s, T, "sigmoid").item() == pytest.approx(0.0, abs=1e-5)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="form must be one of"):
        darkgan_soft_labels(torch.zeros(2, 3), form="tanh")
    with pytest.raises(ValueError, match="temperature must be a positive number; got 0"):
        darkgan_condition_loss(torch.zeros(2, 3), torch.zeros(2, 3), temperature=0)
    with pytest.raises(ValueError, match=r"one \(B, K\) shape; got \(2, 3\) and \(2, 4\)"):
        darkgan_condition_loss(torch.zeros(2, 3), torch.zeros(2, 4))


# ----------------------------------------------------------------------------- the strategy


def _tiny(c_dim: int) -> StyleGenerator:
    return StyleGenerator(z_dim=6, w_dim=8, c_dim=c_dim, img_size=8, width=8, min_width=4, mapping_layers=1)


def _teacher() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 4))


def test_registered_with_its_paper():
    info = strategy_info("darkgan")
    assert info.paper.arxiv == "2108.01216" and info.paper.year == 2021 and "Nistal" in info.paper.authors


def test_two_steps_equal_a_plain_rewrite_of_the_paper_losses():
    """The loop's two steps (teacher soft labels at T, D: logistic + w_D KL on the real batch's head, fakes
    conditioned on the real batch's c; G: non-saturating + w_G KL on the fakes' head) against a plain loop."""
    T, wd, wg, lr, B, seed = 2.0, 3.0, 5.0, 1e-2, 6, 7
    torch.manual_seed(0)
    images = torch.rand(20, 1, 8, 8)
    teacher = _teacher()
    t_state = copy.deepcopy(teacher.state_dict())
    g0 = _tiny(4)
    d0 = AuxDiscriminator(StyleDiscriminator(img_size=8, width=8, min_width=4), 4)
    G, D = copy.deepcopy(g0), copy.deepcopy(d0)
    r = darkgan(G, teacher=teacher, images=images, discriminator=D, temperature=T, weight_d=wd, weight_g=wg,
                steps=2, batch_size=B, lr=lr, r1_gamma=0.0, log_every=1, progress=False, seed=seed)
    # the teacher is untouched
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in t_state.items())
    # the plain rewrite
    c_all = torch.softmax(teacher(images) / T, 1).detach()
    assert torch.allclose(r.conditions, c_all, atol=1e-6)
    G, D = copy.deepcopy(g0), copy.deepcopy(d0)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt_g = torch.optim.Adam(G.parameters(), lr=lr, betas=(0.0, 0.99))
    opt_d = torch.optim.Adam(D.parameters(), lr=lr, betas=(0.0, 0.99))

    def kl(a, c):
        return (c * (c.log() - torch.log_softmax(a / T, 1))).sum(1).mean()

    for _ in range(2):
        idx = torch.randint(0, 20, (B,), generator=gen)
        real, c = images[idx] * 2 - 1, c_all[idx]
        z = torch.randn(B, 6, generator=gen)
        G.eval()
        with torch.no_grad():
            fake = G(z, c)
        G.train()
        s_real, a_real = D.forward_with_aux(real)
        loss_d = F.softplus(-s_real).mean() + F.softplus(D(fake)).mean() + wd * kl(a_real, c)
        opt_d.zero_grad()
        loss_d.backward()
        opt_d.step()
        z = torch.randn(B, 6, generator=gen)
        s_fake, a_fake = D.forward_with_aux(G(z, c))
        loss_g = F.softplus(-s_fake).mean() + wg * kl(a_fake, c)
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()
    assert r.history[-1]["g_cond"] == pytest.approx(kl(a_fake, c).item(), rel=1e-4)
    for mine, ref in ((r.generator, G), (r.discriminator, D)):
        for (name, p), q in zip(mine.named_parameters(), ref.parameters(), strict=True):
            assert torch.allclose(p, q, atol=1e-6), name


def test_baselines_run_through_the_same_loop():
    torch.manual_seed(0)
    images = torch.rand(16, 1, 8, 8)
    teacher = _teacher()
    r = darkgan(_tiny(4), teacher=teacher, images=images, conditioning="onehot", steps=2, batch_size=4,
                progress=False)
    assert torch.equal(r.conditions, F.one_hot(teacher(images).argmax(1), 4).float())
    assert r.temperature == 1.0 and "d_cond" in r.history[-1]
    r = darkgan(_tiny(4), images=images, conditioning="onehot", labels=torch.arange(16) % 4, steps=1, batch_size=4,
                progress=False)
    assert torch.equal(r.conditions.argmax(1), torch.arange(16) % 4)
    r = darkgan(_tiny(0), images=images, conditioning="none", steps=2, batch_size=4, progress=False)
    assert r.conditions is None and "d_cond" not in r.history[-1] and not isinstance(r.discriminator,
                                                                                     AuxDiscriminator)


def test_bad_settings_are_refused_before_training():
    images = torch.rand(8, 1, 8, 8)
    with pytest.raises(ValueError, match="conditioning must be one of"):
        darkgan(_tiny(4), teacher=_teacher(), images=images, conditioning="hard")
    with pytest.raises(ValueError, match="c_dim is 3 but the conditioning has 4 classes"):
        darkgan(_tiny(3), teacher=_teacher(), images=images, steps=1)
    with pytest.raises(ValueError, match=r"images must lie in \[0, 1\]"):
        darkgan(_tiny(4), teacher=_teacher(), images=images * 2 - 1, steps=1)
    with pytest.raises(ValueError, match="needs the teacher"):
        darkgan(_tiny(4), images=images, steps=1)
    with pytest.raises(TypeError, match="needs an AuxDiscriminator"):
        darkgan(_tiny(4), teacher=_teacher(), images=images, steps=1,
                discriminator=StyleDiscriminator(img_size=8, width=8, min_width=4))
    with pytest.raises(ValueError, match="must be unconditional"):
        AuxDiscriminator(StyleDiscriminator(img_size=8, c_dim=4, width=8, min_width=4), 4)


class _Echo(torch.nn.Module):
    """A 'generator' that writes 2c - 1 into the first K pixels of an 8x8 image (so (x + 1) / 2 = c there)."""

    z_dim, c_dim = 3, 4

    def __init__(self) -> None:
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(()))

    def forward(self, z, c):
        x = -torch.ones(z.shape[0], 64)
        x[:, :4] = 2 * c - 1
        return x.view(-1, 1, 8, 8) + self.p


def test_evaluate_feeds_the_conditioning_and_judges_with_the_teacher():
    T, scale = 2.0, 6.0
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 4, bias=False))
    with torch.no_grad():
        teacher[1].weight.zero_()
        teacher[1].weight[:, :4] = scale * torch.eye(4)  # logits = scale * (first 4 pixels)
    c = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.2, 0.5, 0.2, 0.1], [0.25, 0.25, 0.1, 0.4]])
    got = darkgan_evaluate(_Echo(), teacher, c, temperature=T, batch_size=2)
    kl = 0.0
    for row in c.numpy():
        q = np.exp(scale * row / T) / np.exp(scale * row / T).sum()
        kl += float((row * np.log(row / q)).sum())
    assert got["kl"] == pytest.approx(kl / 3, abs=1e-5) and got["top1"] == 1.0
    # an AC-GAN is fed other inputs (here: the rows rolled), judged against the same targets
    got = darkgan_evaluate(_Echo(), teacher, c, inputs=c.roll(1, 0), temperature=T)
    assert got["top1"] == pytest.approx(0.0)
