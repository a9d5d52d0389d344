"""StyleKD (Xu et al. ECCV 2022, arXiv 2208.08840): its losses on independent numbers, and the strategy."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.functional.stylegan_kd import (
    feature_distance,
    image_l1,
    latent_direction_relation,
    mapping_l1,
    principal_directions,
    sample_offsets,
)
from distill.models.stylegan import StyleDiscriminator, stylegan_small
from distill.strategies.registry import strategy_info
from distill.strategies.stylekd import StyleKDWeights, stylekd, stylekd_generator_loss
from distill.taps import Taps

torch.set_num_threads(1)


def _relation_by_loop(fs, fs2, ft, ft2, form):
    """The relation loss written as plain loops over numpy arrays."""
    def cos(a, b):
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

    b = fs.shape[0]
    s = np.array([[cos(fs[i], fs2[j]) for j in range(b)] for i in range(b)])
    t = np.array([[cos(ft[i], ft2[j]) for j in range(b)] for i in range(b)])
    if form == "mse":
        return float(((s - t) ** 2).mean())
    total = 0.0
    for i in range(b):
        p = np.exp(t[i]) / np.exp(t[i]).sum()
        q = np.exp(s[i]) / np.exp(s[i]).sum()
        total += sum(p[j] * (math.log(p[j]) - math.log(q[j])) for j in range(b))
    return total / b


def test_pointwise_terms_on_hand_numbers():
    assert float(image_l1(torch.tensor([[[[1.0, -1.0]]]]), torch.tensor([[[[0.5, 0.0]]]]))) == pytest.approx(0.75)
    assert float(mapping_l1(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 4.0]]))) == pytest.approx(1.5)
    # unit-normalised features: [3, 4] -> [.6, .8], [2, 0] -> [1, 0]: squared distance .16 + .64 = .8
    # second sample equal up to scale: 0; the mean over the batch is .4
    fs = torch.tensor([[3.0, 4.0], [1.0, 1.0]])
    ft = torch.tensor([[2.0, 0.0], [5.0, 5.0]])
    assert float(feature_distance(fs, ft)) == pytest.approx(0.4, rel=1e-6)


@pytest.mark.parametrize("form", ["kl", "mse"])
def test_relation_matches_a_plain_loop(form):
    rng = np.random.default_rng(0)
    fs, fs2 = rng.normal(size=(5, 6)), rng.normal(size=(5, 6))
    ft, ft2 = rng.normal(size=(5, 9)), rng.normal(size=(5, 9))  # the teacher is wider: only B x B compared
    got = latent_direction_relation(*(torch.tensor(a, dtype=torch.float64).reshape(5, 3, -1) for a in (fs, fs2)),
                                    *(torch.tensor(a, dtype=torch.float64).reshape(5, 3, -1) for a in (ft, ft2)),
                                    form=form)
    assert float(got) == pytest.approx(_relation_by_loop(fs, fs2, ft, ft2, form), rel=1e-9)


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 6), st.integers(1, 5), st.floats(0.1, 10.0), st.integers(0, 10_000))
def test_relation_is_zero_for_equal_similarities_and_nonnegative(b, d, scale, seed):
    g = torch.Generator().manual_seed(seed)
    f, f2 = torch.randn(b, d, generator=g, dtype=torch.float64), torch.randn(b, d, generator=g, dtype=torch.float64)
    # scaling the features leaves the cosine similarities (and the loss) unchanged
    assert float(latent_direction_relation(f * scale, f2 * scale, f, f2)) == pytest.approx(0.0, abs=1e-12)
    o, o2 = torch.randn(b, d, generator=g, dtype=torch.float64), torch.randn(b, d, generator=g, dtype=torch.float64)
    assert float(latent_direction_relation(o, o2, f, f2)) >= -1e-12
    assert float(latent_direction_relation(o, o2, f, f2, form="mse")) >= 0


def test_principal_directions_normalise_rows_and_sort_by_eigenvalue():
    # rows scaled to unit norm: [5,0,0] -> e1 once, [0,1,0] twice -> A^T A = diag(1, 2, 0): e2 first, then e1.
    # without the normalisation e1 (25) would come first.
    a = torch.tensor([[5.0, 0, 0], [0, 1, 0], [0, 1, 0]])
    b = torch.tensor([[0, 0, 1.0], [0, 2.0, 0], [0, 0, 3.0]])  # diag(0, 1, 2): e3, e2
    d = principal_directions([a, b], k=2)
    assert d.shape == (4, 3)
    want = torch.tensor([[0, 1.0, 0], [1, 0, 0], [0, 0, 1], [0, 1, 0]])
    torch.testing.assert_close(d.abs(), want)


def test_offsets_are_scaled_rows_of_the_directions():
    dirs = torch.tensor([[2.0, 0.0], [0.0, 0.5]])
    off = sample_offsets(dirs, 200, sigma=3.0, generator=torch.Generator().manual_seed(0))
    zero_one = (off[:, 0] == 0) | (off[:, 1] == 0)
    assert bool(zero_one.all())  # each offset lies along one direction
    assert float(off.norm(dim=1).std()) == pytest.approx(3.0 * math.sqrt(1 - 2 / math.pi), rel=0.2)  # |N(0, 9)|


def _pair():
    torch.manual_seed(0)
    t = stylegan_small(z_dim=8, w_dim=8, width=16)
    s = stylegan_small(z_dim=8, w_dim=8, width=8)
    return t.eval(), s


def test_generator_loss_terms_match_direct_computation():
    t, s = _pair()
    z = torch.randn(4, 8)
    off = torch.randn(4, 8)
    only = dict(gan=0.0, l1=0.0, perceptual=0.0, relation=0.0, mapping=0.0)
    ws, wt = s.mapping(z), t.mapping(z)
    xs, xt = s.synthesis(ws, "const"), t.synthesis(wt, "const")
    loss, _ = stylekd_generator_loss(s, t, z, None, StyleKDWeights(**{**only, "l1": 2.0}), noise="const")
    assert float(loss.detach()) == pytest.approx(2.0 * float((xs - xt).abs().mean().detach()), rel=1e-5)
    loss, _ = stylekd_generator_loss(s, t, z, None, StyleKDWeights(**{**only, "mapping": 0.5}), noise="const")
    assert float(loss.detach()) == pytest.approx(0.5 * float((ws - wt).abs().mean().detach()), rel=1e-5)
    # relation: features of w and of w + offsets, read from separate passes, compared by the plain loop
    paths = ["synthesis.b14", "synthesis.b28"]
    st_, tt_ = Taps(s, paths), Taps(t, paths)
    want = 0.0
    for p in paths:
        feats = {}
        for name, model, w in (("s", s, ws), ("s2", s, ws + off), ("t", t, wt), ("t2", t, wt + off)):
            with Taps(model, [p]).recording() as rec:
                model.synthesis(w, "const")
            feats[name] = rec[p].detach().flatten(1).double().numpy()
        want += _relation_by_loop(feats["s"], feats["s2"], feats["t"], feats["t2"], "kl")
    loss, parts = stylekd_generator_loss(s, t, z, off, StyleKDWeights(**{**only, "relation": 3.0}),
                                         student_taps=st_, teacher_taps=tt_, noise="const")
    assert parts["relation"] == pytest.approx(want, rel=1e-4)
    assert float(loss.detach()) == pytest.approx(3.0 * want, rel=1e-4)
    # the gradient reaches the student only
    loss.backward()
    assert all(p.grad is None for p in t.parameters())
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in s.synthesis.parameters())


def test_stylekd_initialises_the_mapping_from_the_teacher_and_trains_the_student():
    t, s = _pair()
    t0 = copy.deepcopy(t.state_dict())
    s0 = copy.deepcopy(s.synthesis.state_dict())
    images = torch.rand(16, 1, 28, 28)
    res = stylekd(s, teacher=t, images=images, discriminator=StyleDiscriminator(width=8),
                  weights=StyleKDWeights(perceptual=0.0), steps=2, batch_size=4, r1_every=1, mapping_lr_mult=0.0,
                  progress=False)
    for (k, v), (_, u) in zip(t.mapping.named_parameters(), s.mapping.named_parameters()):  # copied, kept (lr x 0)
        torch.testing.assert_close(u, v, msg=k)
    for k, v in t.state_dict().items():  # the teacher is untouched
        assert torch.equal(v, t0[k])
    assert any(not torch.equal(v, s0[k]) for k, v in s.synthesis.state_dict().items())
    row = res.history[-1]
    assert all(math.isfinite(row[k]) for k in ("gan", "l1", "relation", "d_loss", "r1"))
    with pytest.raises(ValueError, match="feature_net"):
        stylekd(s, teacher=t, images=images, steps=1, progress=False)
    info = strategy_info("stylekd")
    assert info.paper.arxiv == "2208.08840" and info.family == "generative"
