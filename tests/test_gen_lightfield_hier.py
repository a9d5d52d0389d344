"""NeRF's hierarchical volume sampling (Mildenhall et al. ECCV 2020, arXiv 2003.08934, Section 5.2) as an option of
R2L's teacher (Wang et al. ECCV 2022, arXiv 2203.17261): the inverse-transform sampler against numbers worked out
by hand, its bin frequencies on many samples, the coarse + fine rendering against a written-out compositing loop,
and the training of both networks."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.data.lightfield import make_scene, make_views
from distill.models.nerf import NeRF, fine_uniforms, sample_pdf
from distill.strategies import r2l as R

torch.set_num_threads(1)


# ------------------------------------------------------------------------------ the inverse-transform sampler


def test_sample_pdf_by_hand_three_bins():
    # bins [2, 3), [3, 5), [5, 6) with weights 3, 1, 0 -> PDF 0.75, 0.25, 0; CDF at the edges 0, 0.75, 1, 1.
    # u = 0.125: bin 0, (0.125 - 0) / 0.75 = 1/6 of the way -> 2 + 1/6
    # u = 0.375: bin 0, 1/2 -> 2.5;  u = 0.625: bin 0, 5/6 -> 2 + 5/6
    # u = 0.875: bin 1, (0.875 - 0.75) / 0.25 = 1/2 of [3, 5) -> 4.0;  the empty bin [5, 6) gets nothing
    edges = torch.tensor([[2.0, 3.0, 5.0, 6.0]])
    weights = torch.tensor([[3.0, 1.0, 0.0]])
    u = fine_uniforms(1, 4, perturb=False)  # deterministic quantiles (k + 0.5) / 4
    assert u.tolist() == [[0.125, 0.375, 0.625, 0.875]]
    expected = [[2.0 + 1 / 6, 2.5, 2.0 + 5 / 6, 4.0]]
    assert torch.allclose(sample_pdf(edges, weights, u), torch.tensor(expected), atol=1e-6)
    # the weights are normalised: scaling them changes nothing
    assert torch.allclose(sample_pdf(edges, 7.0 * weights, u), torch.tensor(expected), atol=1e-6)
    # fixed "random" uniforms, including a CDF value (0.75 starts bin 1) and 0 (the first edge):
    # 0 -> 2.0; 0.75 -> 3.0; 0.9 -> 3 + 0.6 * 2 = 4.2; 0.999 -> 3 + 0.996 * 2 = 4.992
    u2 = torch.tensor([[0.0, 0.75, 0.9, 0.999]])
    assert torch.allclose(sample_pdf(edges, weights, u2), torch.tensor([[2.0, 3.0, 4.2, 4.992]]), atol=1e-5)
    # u = 1 exactly: the end of the last bin with weight (5.0), not past the edges
    assert sample_pdf(edges, weights, torch.ones(1, 1)).item() == pytest.approx(5.0)
    # u = 0 with an empty first bin starts the first bin that has weight, not the empty one: 3.0
    assert sample_pdf(edges, torch.tensor([[0.0, 1.0, 3.0]]), torch.zeros(1, 1)).item() == pytest.approx(3.0)


def test_sample_pdf_rays_are_independent_and_empty_rays_are_uniform():
    edges = torch.tensor([[2.0, 3.0, 5.0, 6.0], [0.0, 1.0, 3.0, 4.0]])
    weights = torch.tensor([[0.0, 0.0, 2.0], [0.0, 0.0, 0.0]])  # ray 1: no weight at all -> uniform 1/3 per bin
    u = torch.tensor([[0.5, 0.25], [0.5, 0.25]])
    # ray 0: all in [5, 6): 5.5, 5.25. ray 1: CDF 0, 1/3, 2/3, 1: u 0.5 -> bin 1 half way -> 2.0;
    # u 0.25 -> bin 0, 0.75 of the way -> 0.75
    assert torch.allclose(sample_pdf(edges, weights, u), torch.tensor([[5.5, 5.25], [2.0, 0.75]]), atol=1e-6)


def test_sample_pdf_fills_bins_in_proportion_to_weights():
    torch.manual_seed(0)
    probs = torch.tensor([0.1, 0.45, 0.0, 0.15, 0.3])
    edges = torch.tensor([[1.0, 1.5, 3.0, 3.2, 4.0, 6.0]])
    n = 200_000
    t = sample_pdf(edges, probs[None] * 3.0, torch.rand(1, n))[0]
    assert bool(((t >= 1.0) & (t <= 6.0)).all())
    b = torch.bucketize(t, edges[0, 1:-1], right=True)  # the bin each sample fell in
    freq = torch.bincount(b, minlength=5).double() / n
    # a binomial frequency's std is <= sqrt(0.25 / n) ≈ 0.0011; a wrong bin index moves >= 0.1 of mass
    assert torch.allclose(freq, probs.double(), atol=0.006)
    assert freq[2] == 0  # the empty bin
    # inside its bin a sample is uniform: the mean is the bin's centre
    for i in (0, 1, 3, 4):
        inside = t[b == i]
        centre = float(edges[0, i] + edges[0, i + 1]) / 2
        width = float(edges[0, i + 1] - edges[0, i])
        assert abs(float(inside.mean()) - centre) < 0.02 * width + 1e-3, i


@settings(max_examples=40, deadline=None)
@given(st.lists(st.one_of(st.just(0.0), st.floats(1e-3, 5.0)), min_size=2, max_size=6), st.integers(0, 2**16))
def test_sample_pdf_is_monotone_and_skips_empty_bins(ws, seed):
    g = torch.Generator().manual_seed(seed)
    weights = torch.tensor([ws])
    edges = torch.cumsum(torch.cat([torch.zeros(1, 1), 0.1 + torch.rand(1, len(ws), generator=g)], -1), -1)
    u = torch.sort(torch.rand(1, 64, generator=g) * 0.999).values
    t = sample_pdf(edges, weights, u)[0]
    assert bool((t[1:] >= t[:-1] - 1e-6).all())  # the inverse CDF is non-decreasing in u
    assert float(t.min()) >= float(edges[0, 0]) - 1e-6 and float(t.max()) <= float(edges[0, -1]) + 1e-6
    if sum(ws) > 0:
        b = torch.bucketize(t, edges[0, 1:-1], right=True)
        # a sample on an edge may count to either side; all others sit in a bin of positive weight
        on_edge = torch.isclose(t[:, None], edges[0][None], atol=1e-5).any(-1)
        assert bool(((weights[0][b] > 0) | on_edge).all())


def test_sample_pdf_and_nerf_reject_bad_input():
    with pytest.raises(ValueError, match="edges must be"):
        sample_pdf(torch.zeros(1, 3), torch.ones(1, 3), torch.rand(1, 2))
    with pytest.raises(ValueError, match="u must be"):
        sample_pdf(torch.zeros(1, 4), torch.ones(1, 3), torch.rand(2, 2))
    with pytest.raises(ValueError, match="num_fine"):
        fine_uniforms(2, 0)
    for bad in (-1, True, 2.5):
        with pytest.raises(ValueError, match="num_fine_samples"):
            NeRF(num_fine_samples=bad)
    with pytest.raises(ValueError, match="num_fine_samples must be > 0"):
        R.render_hierarchical(NeRF(), NeRF(), torch.zeros(2, 6), near=1.0, far=2.0, num_samples=4,
                              num_fine_samples=0)


# ------------------------------------------------------------------------------ coarse + fine rendering


class SlabField(torch.nn.Module):
    """Density ``sigma`` where ``lo <= x < hi`` (x the first coordinate), else 0; a constant colour."""

    def __init__(self, lo: float, hi: float, sigma: float) -> None:
        super().__init__()
        self.lo, self.hi, self.sigma = lo, hi, sigma

    def forward(self, points):
        x = points[..., 0]
        sigma = torch.where((x >= self.lo) & (x < self.hi), torch.tensor(self.sigma), torch.tensor(0.0))
        return torch.full((*points.shape[:-1], 3), 0.5), sigma


class RampField(torch.nn.Module):
    """Colour and density that vary along x (so that each depth's value matters)."""

    def forward(self, points):
        x = points[..., 0]
        rgb = torch.stack([x / 8.0, 1.0 - x / 8.0, torch.full_like(x, 0.25)], -1)
        return rgb, 0.7 + 0.1 * x


def test_fine_render_with_all_weight_on_one_bin_equals_a_written_out_compositing():
    # rays along +x from the origin with |d| = 2: the point at depth t is x = 2t.
    # N_c = 8 bin centres in [2, 6]: t = 2.25, 2.75, 3.25, ... -> x = 4.5, 5.5, 6.5, 7.5, ...
    # the coarse density is non-zero only for x in [6, 7): only t = 3.25, so all weight is on bin [3.25, 3.75);
    # N_f = 4 quantiles (k + 0.5)/4 fall at 3.25 + 0.5 (k + 0.5) / 4 = 3.3125, 3.4375, 3.5625, 3.6875
    near, far, n_c, n_f = 2.0, 6.0, 8, 4
    bg = torch.tensor([0.1, 0.2, 0.3])
    rays = torch.tensor([[0.0, 0.0, 0.0, 2.0, 0.0, 0.0]] * 2)
    out = R.render_hierarchical(SlabField(6.0, 7.0, 5.0), RampField(), rays, near=near, far=far, num_samples=n_c,
                                num_fine_samples=n_f, background=bg)
    coarse = [2.25 + 0.5 * i for i in range(n_c)]
    fine = [3.3125, 3.4375, 3.5625, 3.6875]
    depths = sorted(coarse + fine)
    assert torch.allclose(out["depths"][0], torch.tensor(depths), atol=1e-6)
    assert torch.allclose(out["depths_coarse"][0], torch.tensor(coarse), atol=1e-6)
    # coarse weight: only sample 2, α = 1 - exp(-5 · 0.5 · 2)
    w_c = torch.zeros(n_c)
    w_c[2] = 1 - math.exp(-5.0)
    assert torch.allclose(out["weights_coarse"][0], w_c, atol=1e-6)
    # the fine network's compositing written out: δ to the next depth (the last to far) times |d| = 2
    color, trans = [0.0, 0.0, 0.0], 1.0
    for i, t in enumerate(depths):
        delta = ((depths[i + 1] if i + 1 < len(depths) else far) - t) * 2.0
        x = 2.0 * t
        sigma, c = 0.7 + 0.1 * x, [x / 8.0, 1.0 - x / 8.0, 0.25]
        alpha = 1.0 - math.exp(-sigma * delta)
        color = [color[k] + trans * alpha * c[k] for k in range(3)]
        trans *= 1.0 - alpha
    color = [color[k] + trans * float(bg[k]) for k in range(3)]
    assert torch.allclose(out["rgb"], torch.tensor([color] * 2), atol=1e-5)
    assert torch.allclose(out["acc"], torch.full((2,), 1.0 - trans), atol=1e-5)
    # the coarse rendering is the slab's: 0.5 · (1 - e^-5) + e^-5 · background
    a = 1 - math.exp(-5.0)
    assert torch.allclose(out["rgb_coarse"][0], 0.5 * a + (1 - a) * bg, atol=1e-6)


def test_union_of_samples_is_sorted_and_holds_the_coarse_ones():
    torch.manual_seed(0)
    teacher = NeRF(num_freqs=2, width=16, depth=2, num_fine_samples=12)
    rays = torch.cat([torch.randn(5, 3) * 0.1 + torch.tensor([4.0, 0.0, 0.0]), -torch.randn(5, 3).abs() - 0.5], -1)
    g = torch.Generator().manual_seed(3)
    out = R.render_nerf_rays(teacher, rays, near=2.0, far=6.0, num_samples=6, perturb=True, generator=g)
    t_all, t_c = out["depths"], out["depths_coarse"]
    assert t_all.shape == (5, 18) and out["weights"].shape == (5, 18) and out["weights_coarse"].shape == (5, 6)
    assert bool((t_all[:, 1:] >= t_all[:, :-1]).all())
    for r in range(5):
        for t in t_c[r]:
            assert bool(torch.isclose(t_all[r], t, atol=0).any())
    # the fine samples are NeRF's inverse-transform samples of the coarse weights with i.i.d. uniforms, drawn
    # from the same generator after the stratified coarse depths
    g = torch.Generator().manual_seed(3)
    torch.rand(5, 6, generator=g)  # the coarse jitter
    u = torch.rand(5, 12, generator=g)
    edges = torch.cat([t_c, torch.full((5, 1), 6.0)], -1)
    expected = torch.sort(torch.cat([t_c, sample_pdf(edges, out["weights_coarse"].detach(), u)], -1)).values
    assert torch.allclose(t_all, expected, atol=1e-6)
    # fine samples live inside [first coarse sample, far]
    assert bool((t_all >= t_c[:, :1] - 1e-6).all()) and bool((t_all <= 6.0 + 1e-6).all())
    assert not out["depths"].requires_grad  # no gradient flows through the sampling


def test_default_teacher_is_unchanged_and_costs_are_counted():
    plain = NeRF(num_freqs=2, width=16, depth=2)
    assert plain.fine is None and not any(k.startswith("fine.") for k in plain.state_dict())
    out = R.render_nerf_rays(plain, torch.tensor([[4.0, 0, 0, -1, 0, 0]]), near=2.0, far=6.0, num_samples=4)
    assert set(out) == {"rgb", "acc", "depth", "weights"}
    hier = NeRF(num_freqs=2, width=16, depth=2, num_fine_samples=16)
    per_point = 15 * 16 + 16 * 16 + 16 * 1 + 16 * 3  # γ of 3 coords with 2 freqs = 15 numbers
    assert plain.macs_per_point() == hier.macs_per_point() == per_point
    assert hier.evaluations_per_ray(16) == 16 + 32 and plain.evaluations_per_ray(48) == 48
    assert hier.macs_per_ray(16) == plain.macs_per_ray(48) == 48 * per_point


# ------------------------------------------------------------------------------ training and pseudo-data


@pytest.fixture
def tiny():
    scene = make_scene(0)
    train = make_views(scene, 4, H=6, W=6, seed=0)
    torch.manual_seed(0)
    return train, NeRF(num_freqs=2, width=16, depth=2, num_fine_samples=4)


def test_gradient_reaches_both_networks(tiny):
    train, teacher = tiny
    o, d, colors = train.rays()
    out = R.render_nerf_rays(teacher, torch.cat([o, d], -1)[:32], near=train.near, far=train.far, num_samples=4,
                             background=train.background, perturb=True, generator=torch.Generator().manual_seed(0))
    ((out["rgb"] - colors[:32]) ** 2).mean().backward()
    coarse = [teacher.layers[0].weight, teacher.density.weight, teacher.color.weight]
    assert all(p.grad is None for p in coarse)  # the fine loss alone: the sampling passes no gradient back
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in teacher.fine.parameters())
    # train_nerf's loss (coarse + fine) moves both networks
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    R.train_nerf(teacher, train, steps=1, batch_rays=32, num_samples=4, lr=1e-2, progress=False)
    changed = {k for k, v in teacher.state_dict().items() if not torch.equal(before[k], v)}
    assert "layers.0.weight" in changed and "density.weight" in changed and "fine.layers.0.weight" in changed


def test_train_nerf_loss_is_coarse_plus_fine(tiny):
    # one step of train_nerf equals one Adam step on the written-out sum of both squared errors
    train, teacher = tiny
    twin = NeRF(num_freqs=2, width=16, depth=2, num_fine_samples=4)
    twin.load_state_dict(teacher.state_dict())
    hist = R.train_nerf(teacher, train, steps=1, batch_rays=16, num_samples=4, lr=1e-2, seed=7, progress=False)
    o, d, colors = train.rays()
    rays = torch.cat([o, d], -1)
    g = torch.Generator().manual_seed(7)
    idx = torch.randint(0, rays.shape[0], (16,), generator=g)
    twin.train()
    out = R.render_nerf_rays(twin, rays[idx], near=train.near, far=train.far, num_samples=4,
                             background=train.background, perturb=True, generator=g)
    loss = ((out["rgb"] - colors[idx]) ** 2).mean() + ((out["rgb_coarse"] - colors[idx]) ** 2).mean()
    assert hist[0]["loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
    opt = torch.optim.Adam(twin.parameters(), lr=1e-2)
    loss.backward()
    opt.step()
    for k, v in teacher.state_dict().items():
        assert torch.allclose(v, twin.state_dict()[k], atol=1e-6), k


def test_pseudo_data_and_evaluation_use_the_hierarchical_rendering(tiny):
    train, teacher = tiny
    teacher.eval()
    rays, colors = R.make_pseudo_data(teacher, train, 2, num_samples=4, seed=1, progress=False)
    with torch.no_grad():
        fine = R.render_nerf_rays(teacher, rays, near=train.near, far=train.far, num_samples=4,
                                  background=train.background)
    assert torch.allclose(colors, fine["rgb"], atol=1e-6)
    assert not torch.allclose(colors, fine["rgb_coarse"], atol=1e-4)  # the picture is the fine network's
    # deterministic at test time: the same rendering twice
    again = R.render_nerf_rays(teacher, rays, near=train.near, far=train.far, num_samples=4,
                               background=train.background)["rgb"]
    assert torch.equal(fine["rgb"], again.detach())
