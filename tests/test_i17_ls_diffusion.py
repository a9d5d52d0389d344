"""Müller's template-plane projection and our systematic-diffusion measure (distill.functional.ls_diffusion).

Expected numbers are worked by hand (in comments) or with numpy, never with the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from _examples import run_example_quick
from hypothesis import strategies as st

from distill.functional.ls_diffusion import (
    pick_diffusion_classes,
    project_to_template_plane,
    systematic_diffusion,
    template_plane_basis,
)

# ---------------------------------------------------------------------------------------------
# the projection, worked by hand
# ---------------------------------------------------------------------------------------------


def test_basis_and_coordinates_by_hand_without_bias():
    # templates e_x, e_y, e_z; classes (target 0, similar 1, dissimilar 2)
    # e1 = (e_y - e_x)/√2 = (-1, 1, 0)/√2
    # v = e_z - e_x = (-1, 0, 1); v·e1 = 1/√2; v - (1/√2) e1 = (-1/2, -1/2, 1); norm √(3/2) → e2 = (-1, -1, 2)/√6
    w = torch.eye(3)
    basis = template_plane_basis(w, None, (0, 1, 2))
    assert torch.allclose(basis[0], torch.tensor([-1.0, 1.0, 0.0], dtype=torch.float64) / math.sqrt(2))
    assert torch.allclose(basis[1], torch.tensor([-1.0, -1.0, 2.0], dtype=torch.float64) / math.sqrt(6))
    # x = (1, 2, 3): x - w_0 = (0, 2, 3) → (2/√2, (−2 + 6)/√6) = (√2, 4/√6)
    coords, templates = project_to_template_plane(torch.tensor([[1.0, 2.0, 3.0]]), w, None, (0, 1, 2))
    assert torch.allclose(coords, torch.tensor([[math.sqrt(2), 4 / math.sqrt(6)]], dtype=torch.float64))
    # templates: origin, (√2, 0), (1/√2, 3/√6) — an equilateral triangle of side √2
    expected = torch.tensor([[0, 0], [math.sqrt(2), 0], [1 / math.sqrt(2), 3 / math.sqrt(6)]], dtype=torch.float64)
    assert torch.allclose(templates, expected)


def test_class_order_sets_the_axes():
    # with (target 2, similar 0, dissimilar 1) the first axis points from e_z to e_x
    basis = template_plane_basis(torch.eye(3), None, (2, 0, 1))
    assert torch.allclose(basis[0], torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64) / math.sqrt(2))


def test_projection_with_bias_matches_numpy_qr():
    rng = np.random.default_rng(3)
    w, b = rng.normal(size=(6, 5)), rng.normal(size=6)
    x = rng.normal(size=(7, 5))
    classes = (4, 1, 3)
    # numpy: augment, plane through the three augmented templates by QR of the differences (same span,
    # same orientation up to the sign of each column)
    wt = np.concatenate([w, b[:, None]], 1)
    xt = np.concatenate([x, np.ones((7, 1))], 1)
    q, _ = np.linalg.qr(np.stack([wt[1] - wt[4], wt[3] - wt[4]], 1))
    ref = (xt - wt[4]) @ q
    got, _ = project_to_template_plane(torch.tensor(x), torch.tensor(w), torch.tensor(b), classes)
    got = got.numpy()
    signs = np.sign((got * ref).sum(0))
    np.testing.assert_allclose(got, ref * signs, atol=1e-10)
    # and the projection is orthogonal: residual ⟂ plane; the bias changes the answer
    nobias, _ = project_to_template_plane(torch.tensor(x), torch.tensor(w), None, classes)
    assert not np.allclose(nobias.numpy(), got)


def test_first_axis_is_the_logit_margin():
    # x̃ᵀe1 = (z_s − z_t)/‖w̃_s − w̃_t‖: the plane's first coordinate (plus the origin's) is a logit margin
    g = torch.Generator().manual_seed(0)
    w, b, x = torch.randn(5, 4, generator=g), torch.randn(5, generator=g), torch.randn(9, 4, generator=g)
    coords, _ = project_to_template_plane(x, w, b, (0, 3, 1))
    z = (x @ w.T + b).double()
    wt = torch.cat([w, b[:, None]], 1).double()
    norm = (wt[3] - wt[0]).norm()
    offset = (wt[0] @ (wt[3] - wt[0])) / norm
    assert torch.allclose(coords[:, 0] + offset, (z[:, 3] - z[:, 0]) / norm)


# ---------------------------------------------------------------------------------------------
# invariances
# ---------------------------------------------------------------------------------------------


def _random_orthogonal(d: int, seed: int) -> torch.Tensor:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return torch.tensor(q * np.sign(np.diag(r)))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), with_bias=st.booleans())
def test_coordinates_invariant_to_a_rotation_of_the_feature_space(seed, with_bias):
    g = torch.Generator().manual_seed(seed)
    w, b, x = (torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64),
               torch.randn(10, 6, generator=g, dtype=torch.float64))
    q = _random_orthogonal(6, seed)
    bias = b if with_bias else None
    c1, t1 = project_to_template_plane(x, w, bias, (0, 1, 2))
    c2, t2 = project_to_template_plane(x @ q.T, w @ q.T, bias, (0, 1, 2))
    assert torch.allclose(c1, c2, atol=1e-9) and torch.allclose(t1, t2, atol=1e-9)


def test_coordinates_scale_with_features_and_templates_without_bias():
    # no bias: x → c·x, W → c·W scales the plane (same basis) and every coordinate by c
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(8, 5, generator=g, dtype=torch.float64)
    c1, _ = project_to_template_plane(x, w, None, (1, 0, 3))
    c2, _ = project_to_template_plane(3.0 * x, 3.0 * w, None, (1, 0, 3))
    assert torch.allclose(c2, 3.0 * c1, atol=1e-9)


def _clusters(seed: int, d: int = 6, n: int = 40) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(4, d, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    labels = torch.arange(4).repeat_interleave(n)
    x = 3.0 * w[labels] + torch.randn(4 * n, d, generator=g, dtype=torch.float64)  # class k near 3·w_k
    return x, labels, w, b


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(0.1, 10.0), tscale=st.floats(0.1, 10.0))
def test_measure_invariant_to_rotation_scale_translation(seed, scale, tscale):
    x, labels, w, b = _clusters(seed)
    ref = systematic_diffusion(x, labels, w, b, (0, 1, 2))
    q = _random_orthogonal(x.shape[1], seed + 1)
    shift = torch.randn(x.shape[1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for got in (systematic_diffusion(x @ q.T, labels, w @ q.T, b, (0, 1, 2)),       # rotation
                systematic_diffusion(scale * x + shift, labels, w, b, (0, 1, 2)),   # feature scale + shift
                systematic_diffusion(x, labels, tscale * w, tscale * b, (0, 1, 2))):  # template scale
        np.testing.assert_allclose(np.array(got), np.array(ref), rtol=1e-7, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# the measure on clusters with a known shape
# ---------------------------------------------------------------------------------------------


def _planted(sigma_s: float, sigma_d: float, gap_s: float = 2.0, gap_d: float = 4.0):
    """Templates e_x (target 0), e_y (similar 1), e_z (dissimilar 2), no bias. Along u_s = (e_y − e_x)/√2 the
    target examples sit at offsets ±σ_s·gap_s (and the other axis at ±σ_d·gap_d), so std(r) is σ by hand."""
    us = torch.tensor([-1.0, 1.0, 0.0], dtype=torch.float64) / math.sqrt(2)
    ud = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64) / math.sqrt(2)
    # the two axes are not orthogonal (u_s·u_d = 1/2): build target points from coordinates a (along u_s)
    # and c (along u_d) by solving [u_s; u_d; n] p = [a, c, 0] with n the plane's normal (1,1,1)/√3
    n = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64) / math.sqrt(3)
    m = torch.stack([us, ud, n])
    pts = []
    for a in (-sigma_s * gap_s, sigma_s * gap_s):
        for c in (-sigma_d * gap_d, sigma_d * gap_d):
            pts.append(torch.linalg.solve(m, torch.tensor([a, c, 0.0], dtype=torch.float64)))
    target = torch.stack(pts)                                   # mean 0: μ_t = 0 along both axes
    similar = torch.stack([gap_s * us, gap_s * us])             # mean position gap_s along u_s...
    dissimilar = torch.stack([gap_d * ud, gap_d * ud])          # ...and gap_d along u_d
    # the similar/dissimilar points are also off-axis for the other direction; the gap we need is
    # only along each class's own axis, which is gap_s / gap_d by construction
    x = torch.cat([target, similar, dissimilar])
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    return x, labels, torch.eye(3, dtype=torch.float64)


def test_measure_on_planted_clusters():
    # spread toward the similar class 0.3 of the gap, toward the dissimilar 0.1
    x, labels, w = _planted(sigma_s=0.3, sigma_d=0.1)
    got = systematic_diffusion(x, labels, w, None, (0, 1, 2))
    assert got.spread_similar == pytest.approx(0.3)
    assert got.spread_dissimilar == pytest.approx(0.1)
    assert got.directionality == pytest.approx(3.0)
    assert got.overlap_similar == 0.0 and got.overlap_dissimilar == 0.0  # |r| = 0.3, 0.1 < ½


def test_overlap_counts_examples_past_the_midpoint():
    # σ_s = 0.6: half the target examples at r = +0.6 > ½, half at −0.6
    x, labels, w = _planted(sigma_s=0.6, sigma_d=0.2)
    got = systematic_diffusion(x, labels, w, None, (0, 1, 2))
    assert got.spread_similar == pytest.approx(0.6)
    assert got.overlap_similar == 0.5
    assert got.overlap_dissimilar == 0.0


def test_a_known_shift_of_target_examples_toward_the_similar_class():
    # target examples at r = 0 ± 0.1 along u_s; moving one of four by +1.0 gap (to r = 1.1 from its own
    # centroid's old place) changes the population std to the value numpy gives for the new positions
    x, labels, w = _planted(sigma_s=0.1, sigma_d=0.1)
    us = torch.tensor([-1.0, 1.0, 0.0], dtype=torch.float64) / math.sqrt(2)
    moved = x.clone()
    moved[0] = moved[0] + 2.0 * us  # gap_s = 2 → +1 in units of the gap
    got = systematic_diffusion(moved, labels, w, None, (0, 1, 2))
    pos = np.array([-0.1, -0.1, 0.1, 0.1]) + np.array([1.0, 0, 0, 0])  # offsets a/gap: (−σ,−σ,+σ,+σ)
    mu = pos.mean()
    gap = 1.0 - mu  # the similar class still sits at 1; the target centroid moved to μ
    assert got.spread_similar == pytest.approx(np.std((pos - mu) / gap))
    assert got.overlap_similar == pytest.approx(np.mean((pos - mu) / gap > 0.5))


def test_measure_does_not_depend_on_the_bias():
    x, labels, w, b = _clusters(5)
    with_bias = systematic_diffusion(x, labels, w, b, (0, 1, 2))
    without = systematic_diffusion(x, labels, w, None, (0, 1, 2))
    # with a bias the axis is (w_s − w_t, b_s − b_t)/norm on (x, 1): the same direction in x, plus a
    # constant that cancels — so the measure is the same up to the axis normalisation, which cancels too
    np.testing.assert_allclose(np.array(with_bias), np.array(without), rtol=1e-9)


# ---------------------------------------------------------------------------------------------
# picking the classes
# ---------------------------------------------------------------------------------------------


def test_pick_by_template_distance():
    # target 0 at origin-ish; class 2 at distance 1, class 1 at distance 5, class 3 at distance 3
    w = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    assert pick_diffusion_classes(0, w) == (0, 2, 1)
    # the bias counts: b_2 − b_0 = 10 makes class 2 the farthest
    b = torch.tensor([0.0, 0.0, 10.0, 0.0])
    assert pick_diffusion_classes(0, w, b) == (0, 3, 2)


def test_pick_by_confusion():
    # target-class examples put mean probability on class 3 > 1 > 2 (softmax of these logits)
    logits = torch.tensor([[5.0, 1.0, -3.0, 2.0], [5.0, 1.0, -3.0, 2.0], [0.0, 9.0, 0.0, 0.0]])
    labels = torch.tensor([0, 0, 1])
    assert pick_diffusion_classes(0, logits=logits, labels=labels, by="confusion") == (0, 3, 2)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------


def test_bad_input_raises_clear_errors():
    w = torch.eye(3)
    with pytest.raises(ValueError, match="distinct"):
        template_plane_basis(w, None, (0, 0, 2))
    with pytest.raises(ValueError, match="distinct"):
        template_plane_basis(w, None, (0, 1, 3))
    with pytest.raises(ValueError, match="collinear"):
        template_plane_basis(torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]), None, (0, 1, 2))
    with pytest.raises(ValueError, match="coincide"):
        template_plane_basis(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), None, (0, 1, 2))
    with pytest.raises(ValueError, match="bias must have shape"):
        template_plane_basis(w, torch.zeros(2), (0, 1, 2))
    with pytest.raises(ValueError, match="penultimate activations"):
        project_to_template_plane(torch.zeros(4, 2), w, None, (0, 1, 2))
    with pytest.raises(ValueError, match="at least 2 examples"):
        systematic_diffusion(torch.eye(3), torch.tensor([0, 1, 2]), w, None, (0, 1, 2))
    with pytest.raises(ValueError, match="target must be a class id"):
        pick_diffusion_classes(5, w)
    with pytest.raises(ValueError, match="target must be a class id"):
        pick_diffusion_classes(-1, logits=torch.zeros(2, 3), labels=torch.tensor([0, 1]), by="confusion")
    with pytest.raises(ValueError, match="by must be"):
        pick_diffusion_classes(0, w, by="nearest")
    with pytest.raises(ValueError, match="no example of the target"):
        pick_diffusion_classes(2, logits=torch.zeros(2, 3), labels=torch.tensor([0, 1]), by="confusion")


def test_unseparated_classes_are_refused():
    # the "similar" class's examples sit behind the target's along the template axis
    w = torch.eye(3, dtype=torch.float64)
    x = torch.cat([w[[1, 1]], w[[0, 0]], w[[2, 2]]])
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match="does not separate"):
        systematic_diffusion(x, labels, w, None, (0, 1, 2))


def test_gap_is_the_mean_of_the_similar_class():
    # a third similar example at 5·u_s: similar positions 2, 2, 5 → mean 3 (median 2); target offsets ±0.2
    x, labels, w = _planted(sigma_s=0.1, sigma_d=0.1)
    us = torch.tensor([-1.0, 1.0, 0.0], dtype=torch.float64) / math.sqrt(2)
    x = torch.cat([x, 5.0 * us[None]])
    labels = torch.cat([labels, torch.tensor([1])])
    got = systematic_diffusion(x, labels, w, None, (0, 1, 2))
    assert got.spread_similar == pytest.approx(0.2 / 3)


def test_confusion_averages_probabilities_not_logits():
    # example A: class 1 close behind the target (p₁ ≈ 0.27); example B: class 1 far down, class 3 at 3.
    # mean logits favour class 3 (1.5 vs −7.55); mean probabilities favour class 1 (numpy below)
    logits = np.array([[5.0, 4.9, -10.0, 0.0], [5.0, -20.0, -10.0, 3.0]])
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert p.mean(0)[1] > p.mean(0)[3] and logits.mean(0)[3] > logits.mean(0)[1]
    got = pick_diffusion_classes(0, logits=torch.tensor(logits), labels=torch.tensor([0, 0]), by="confusion")
    assert got == (0, 1, 2)


def test_example_quick_runs(tmp_path):
    # smoke test: two teachers, four students on 5k Fashion-MNIST images; prints the table
    run_example_quick("explain/ls_diffusion.py", "spread→sim", "fashion_mnist", tmp_path)
