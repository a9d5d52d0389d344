"""Relation methods (SP, RKD, PKT, CC) and the NST / FSP / ICKD feature methods.

Each loss against an independent computation (numpy, explicit loops), its properties
(zero at agreement, non-negative, invariances), the methods on synthetic views (gradients reach
the student and the adapters, never the teacher) and end to end through the Distiller.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

import distill
from distill import functional as DF
from distill.adapters import ShapeMismatchError
from distill.methods import CC, FSP, ICKD, NST, PKT, RKD, SP, create_method, list_methods, method_info
from distill.models import create
from _views import cnn_views

SETTINGS = settings(max_examples=30, deadline=None)
NEW = ("sp", "rkd", "pkt", "cc", "nst", "fsp", "ickd")


def rand(seed: int, *shape: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


seeds = st.integers(0, 10_000)


# ---------------------------------------------------------------------------- numpy references


def np_unit(v: np.ndarray) -> np.ndarray:
    n = math.sqrt(float(np.dot(v, v)))
    return v / n if n > 0 else v * 0.0


def np_huber(a: float, b: float) -> float:
    r = abs(a - b)
    return 0.5 * r * r if r <= 1.0 else r - 0.5


def np_sp(fs: np.ndarray, ft: np.ndarray) -> float:
    b = fs.shape[0]
    qs, qt = fs.reshape(b, -1), ft.reshape(b, -1)

    def gram_rows(q):
        g = np.array([[sum(q[i, n] * q[j, n] for n in range(q.shape[1])) for j in range(b)] for i in range(b)])
        return np.array([row / math.sqrt(sum(x * x for x in row)) for row in g])

    gs, gt = gram_rows(qs), gram_rows(qt)
    return sum((gt[i, j] - gs[i, j]) ** 2 for i in range(b) for j in range(b)) / b**2


def np_rkd(s: np.ndarray, t: np.ndarray) -> tuple[float, float]:
    b = len(s)

    def dist(e, i, j):
        return math.sqrt(sum((e[i, d] - e[j, d]) ** 2 for d in range(e.shape[1])))

    pairs = [(i, j) for i in range(b) for j in range(b) if i != j]
    mu_s = sum(dist(s, i, j) for i, j in pairs) / len(pairs)
    mu_t = sum(dist(t, i, j) for i, j in pairs) / len(pairs)
    ld = sum(np_huber(dist(t, i, j) / mu_t, dist(s, i, j) / mu_s) for i, j in pairs) / len(pairs)

    def cos(e, i, j, k):  # angle at j
        return float(np.dot(np_unit(e[i] - e[j]), np_unit(e[k] - e[j])))

    triplets = [(i, j, k) for i in range(b) for j in range(b) for k in range(b) if len({i, j, k}) == 3]
    la = sum(np_huber(cos(t, i, j, k), cos(s, i, j, k)) for i, j, k in triplets) / len(triplets)
    return ld, la


def np_pkt(s: np.ndarray, t: np.ndarray) -> float:
    b = len(s)

    def cond(e):
        kern = [[0.5 * (float(np.dot(np_unit(e[i]), np_unit(e[j]))) + 1.0) for j in range(b)] for i in range(b)]
        p = np.zeros((b, b))
        for i in range(b):
            z = sum(kern[i][k] for k in range(b) if k != i)
            for j in range(b):
                if j != i:
                    p[i, j] = kern[i][j] / z
        return p

    p, q = cond(t), cond(s)
    total = sum(p[i, j] * math.log(p[i, j] / q[i, j]) for i in range(b) for j in range(b) if i != j)
    return total / b


def np_cc(s: np.ndarray, t: np.ndarray, gamma: float, order: int) -> float:
    n = len(s)

    def kmat(e):
        u = [np_unit(row) for row in e]
        out = np.zeros((n, n))
        for i in range(n):
            for j in range(n):
                x = float(np.dot(u[i], u[j]))
                out[i, j] = sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * x**p
                                for p in range(order + 1))
        return out

    return float(((kmat(t) - kmat(s)) ** 2).sum()) / n**2


def np_mmd2(fs: np.ndarray, ft: np.ndarray, d: int, c: float) -> float:
    """Mean over the batch of MMD² between the normalised channel vectors, by explicit loops."""
    total = 0.0
    for b in range(fs.shape[0]):
        xs = [np_unit(fs[b, k].ravel()) for k in range(fs.shape[1])]
        xt = [np_unit(ft[b, k].ravel()) for k in range(ft.shape[1])]

        def k(a, bb):
            return (float(np.dot(a, bb)) + c) ** d

        tt = sum(k(a, bb) for a in xt for bb in xt) / len(xt) ** 2
        ss = sum(k(a, bb) for a in xs for bb in xs) / len(xs) ** 2
        st_ = sum(k(a, bb) for a in xt for bb in xs) / (len(xt) * len(xs))
        total += tt + ss - 2 * st_
    return total / fs.shape[0]


def np_fsp_matrix(f1: np.ndarray, f2: np.ndarray) -> np.ndarray:
    b, c1, h, w = f1.shape
    c2 = f2.shape[1]
    out = np.zeros((b, c1, c2))
    for n in range(b):
        for i in range(c1):
            for j in range(c2):
                out[n, i, j] = sum(f1[n, i, y, x] * f2[n, j, y, x] for y in range(h) for x in range(w)) / (h * w)
    return out


def np_ickd(fs: np.ndarray, ft: np.ndarray) -> float:
    b, c = ft.shape[:2]

    def corr(f):
        out = np.zeros((c, c))
        for m in range(c):
            for n in range(c):
                out[m, n] = float(np.dot(f[m].ravel(), f[n].ravel()))
        return np.array([row / math.sqrt(float(np.dot(row, row))) for row in out])

    return sum(float(((corr(ft[n]) - corr(fs[n])) ** 2).sum()) / c**2 for n in range(b)) / b


# ---------------------------------------------------------------------------- registry


def test_registered_with_paper_family_and_defaults():
    expected = {
        "sp": ("relations", "1907.09682", {"pairs": (("stage3", "stage3"),), "weight": 1.0}),
        "rkd": ("relations", "1904.05068", {"student_tap": "pool", "distance_weight": 25.0, "angle_weight": 50.0}),
        "pkt": ("relations", "1803.10837", {"student_tap": "pool", "teacher_tap": "pool"}),
        "cc": ("relations", "1904.01802", {"gamma": 0.4, "order": 2, "adapter": "linear"}),
        "nst": ("features", "1707.01219", {"pairs": (("stage3", "stage3"),), "degree": 2, "c": 0.0}),
        "fsp": ("features", None, {"pairs": (("stem", "stage1"), ("stage1", "stage2")), "lambdas": None}),
        "ickd": ("features", "2202.03680", {"student_tap": "stage3", "adapter": "conv1x1_bn"}),
    }
    assert {i.name for i in list_methods("relations")} >= {"sp", "rkd", "pkt", "cc"}
    for name, (family, arxiv, defaults) in expected.items():
        info = method_info(name)
        assert info.family == family and info.cls.name == name
        assert info.paper.title and info.paper.authors and info.paper.year >= 2017 and info.paper.venue != ""
        assert info.paper.arxiv == arxiv, name
        assert info.defaults["weight"] == 1.0 and info.defaults["warmup_epochs"] == 0
        for key, value in defaults.items():
            assert info.defaults[key] == value, (name, key)
        assert info.summary and info.cls.needs_teacher


# ---------------------------------------------------------------------------- SP


def test_sp_matches_loops():
    fs, ft = rand(1, 4, 3, 2, 2), rand(2, 4, 5, 2, 2)
    want = np_sp(fs.numpy(), ft.numpy())
    assert DF.sp_loss([fs], [ft]).item() == pytest.approx(want, rel=1e-10)
    # summed over pairs
    es, et = rand(3, 4, 6), rand(4, 4, 2)
    both = DF.sp_loss([fs, es], [ft, et]).item()
    assert both == pytest.approx(want + np_sp(es.numpy(), et.numpy()), rel=1e-10)


@SETTINGS
@given(seeds, st.integers(2, 6), st.floats(0.1, 10.0))
def test_sp_zero_at_agreement_nonnegative_and_scale_invariant(seed, b, a):
    fs, ft = rand(seed, b, 3, 2, 2), rand(seed + 1, b, 4, 2, 2)
    assert DF.sp_loss([ft], [ft.clone()]).item() == pytest.approx(0.0, abs=1e-12)
    loss = DF.sp_loss([fs], [ft]).item()
    assert loss >= 0.0
    # rows are normalised: a positive rescaling of either network's features changes nothing
    assert DF.sp_loss([fs * a], [ft]).item() == pytest.approx(loss, rel=1e-9, abs=1e-12)
    # bounded: each row of G has unit norm, so ||G_t - G_s||_F^2 <= 4b
    assert loss <= 4.0 / b + 1e-12


# ---------------------------------------------------------------------------- RKD


def test_rkd_matches_loops():
    s, t = rand(5, 5, 3, scale=2.0), rand(6, 5, 4)
    ld, la = np_rkd(s.numpy(), t.numpy())
    assert DF.rkd_distance_loss(s, t).item() == pytest.approx(ld, rel=1e-10)
    assert DF.rkd_angle_loss(s, t).item() == pytest.approx(la, rel=1e-10)
    assert DF.rkd_loss(s, t).item() == pytest.approx(25 * ld + 50 * la, rel=1e-10)
    assert DF.rkd_loss(s, t, 1.0, 2.0).item() == pytest.approx(ld + 2 * la, rel=1e-10)


def test_rkd_differs_from_the_reference_reduction_by_the_documented_factors():
    # the reference code averages over all B^2 pairs / B^3 triplets (degenerate ones included)
    b = 6
    s, t = rand(7, b, 5), rand(8, b, 3)

    def ref_dist(e):
        d = torch.cdist(e, e)
        return d / d[d > 0].mean()

    def ref_angle(e):
        u = torch.nn.functional.normalize(e.unsqueeze(0) - e.unsqueeze(1), dim=2)
        return torch.bmm(u, u.transpose(1, 2)).reshape(-1)

    ref_d = torch.nn.functional.smooth_l1_loss(ref_dist(s), ref_dist(t)).item()
    ref_a = torch.nn.functional.smooth_l1_loss(ref_angle(s), ref_angle(t)).item()
    assert ref_d == pytest.approx(DF.rkd_distance_loss(s, t).item() * (b - 1) / b, rel=1e-9)
    assert ref_a == pytest.approx(DF.rkd_angle_loss(s, t).item() * (b - 1) * (b - 2) / b**2, rel=1e-9)


@SETTINGS
@given(seeds, st.integers(3, 6), st.floats(0.1, 10.0))
def test_rkd_zero_at_agreement_nonnegative_and_similarity_invariant(seed, b, a):
    s, t = rand(seed, b, 4), rand(seed + 1, b, 3)
    assert DF.rkd_loss(t, t.clone()).item() == pytest.approx(0.0, abs=1e-10)
    loss = DF.rkd_loss(s, t).item()
    assert loss >= 0.0
    # distances are mean-normalised and angles are angles: invariant to scale, rotation, translation
    q, _ = torch.linalg.qr(rand(seed + 2, 4, 4))
    moved = a * s @ q + rand(seed + 3, 1, 4)
    assert DF.rkd_loss(moved, t).item() == pytest.approx(loss, rel=1e-7, abs=1e-10)


def test_rkd_small_batches_and_coincident_points_are_finite():
    s = torch.zeros(4, 3, dtype=torch.float64, requires_grad=True)  # every pair coincides
    t = rand(0, 4, 3)
    loss = DF.rkd_loss(s, t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    one = torch.randn(1, 3, requires_grad=True)
    assert DF.rkd_loss(one, torch.randn(1, 5)).item() == 0.0
    two = torch.randn(2, 3)
    assert DF.rkd_angle_loss(two, torch.randn(2, 3)).item() == 0.0


# ---------------------------------------------------------------------------- PKT


def test_pkt_matches_loops_and_direction_is_teacher_to_student():
    s, t = rand(9, 5, 4), rand(10, 5, 6)
    want = np_pkt(s.numpy(), t.numpy())
    assert DF.pkt_loss(s, t).item() == pytest.approx(want, rel=1e-10)
    # KL is not symmetric: swapping the roles changes the value
    assert DF.pkt_loss(t, s).item() == pytest.approx(np_pkt(t.numpy(), s.numpy()), rel=1e-10)
    assert DF.pkt_loss(t, s).item() != pytest.approx(want, rel=1e-6)


def test_pkt_conditional_probabilities_are_distributions_without_self():
    p = DF.pkt_conditional_probabilities(rand(11, 6, 3))
    assert torch.allclose(p.sum(dim=1), torch.ones(6, dtype=p.dtype))
    assert (p.diagonal() == 0).all() and (p >= 0).all()


@SETTINGS
@given(seeds, st.integers(2, 6))
def test_pkt_zero_at_agreement_nonnegative_and_invariant_to_per_sample_scaling(seed, b):
    s, t = rand(seed, b, 4), rand(seed + 1, b, 4)
    assert DF.pkt_loss(t, t.clone()).item() == pytest.approx(0.0, abs=1e-12)
    loss = DF.pkt_loss(s, t).item()
    assert loss >= -1e-12
    scales = torch.rand(b, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 5 + 0.1
    assert DF.pkt_loss(s * scales, t).item() == pytest.approx(loss, rel=1e-9, abs=1e-12)


# ---------------------------------------------------------------------------- CC


def test_cc_matches_loops():
    s, t = rand(12, 5, 3), rand(13, 5, 7)
    for gamma, order in ((0.4, 2), (1.0, 0), (0.25, 4)):
        assert DF.cc_loss(s, t, gamma, order).item() == pytest.approx(np_cc(s.numpy(), t.numpy(), gamma, order),
                                                                      rel=1e-10)


@SETTINGS
@given(seeds, st.integers(2, 6), st.floats(0.05, 2.0))
def test_cc_kernel_converges_to_the_rbf_and_loss_properties(seed, n, gamma):
    s, t = rand(seed, n, 4), rand(seed + 1, n, 5)
    u = torch.nn.functional.normalize(t, dim=1)
    exact = torch.exp(-gamma * torch.cdist(u, u).pow(2))
    assert torch.allclose(DF.cc_kernel_matrix(t, gamma, order=25), exact, atol=1e-9)
    assert DF.cc_loss(t, t.clone(), gamma).item() == pytest.approx(0.0, abs=1e-12)
    assert DF.cc_loss(s, t, gamma).item() >= 0.0


# ---------------------------------------------------------------------------- NST


def test_nst_matches_loops():
    fs, ft = rand(14, 2, 3, 2, 3), rand(15, 2, 5, 2, 3)
    for d, c in ((2, 0.0), (1, 0.0), (3, 0.5)):
        assert DF.nst_mmd2(fs, ft, d, c).item() == pytest.approx(np_mmd2(fs.numpy(), ft.numpy(), d, c), rel=1e-9)
    gs, gt = rand(16, 2, 2, 4, 4), rand(17, 2, 6, 4, 4)
    both = DF.nst_loss([fs, gs], [ft, gt]).item()
    assert both == pytest.approx(np_mmd2(fs.numpy(), ft.numpy(), 2, 0) + np_mmd2(gs.numpy(), gt.numpy(), 2, 0),
                                 rel=1e-9)


@SETTINGS
@given(seeds, st.integers(1, 4), st.integers(1, 5))
def test_nst_zero_at_agreement_nonnegative_permutation_and_scale_invariant(seed, b, c):
    fs, ft = rand(seed, b, c, 3, 3), rand(seed + 1, b, c + 2, 3, 3)
    assert DF.nst_mmd2(ft, ft.clone()).item() == pytest.approx(0.0, abs=1e-10)
    loss = DF.nst_mmd2(fs, ft).item()
    assert loss >= -1e-10  # MMD² with a positive-definite kernel
    # channels are samples of a distribution, each normalised: their order and scale do not matter
    perm = torch.randperm(c, generator=torch.Generator().manual_seed(seed))
    scales = torch.rand(1, c, 1, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.1
    assert DF.nst_mmd2(fs[:, perm] * scales, ft).item() == pytest.approx(loss, rel=1e-8, abs=1e-10)


def test_nst_rejects_unequal_spatial_sizes():
    with pytest.raises(ValueError, match="spatial"):
        DF.nst_mmd2(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 2, 2))


# ---------------------------------------------------------------------------- FSP


def test_fsp_matrix_and_loss_match_loops():
    f1, f2 = rand(18, 2, 3, 2, 3), rand(19, 2, 4, 2, 3)
    g = DF.fsp_matrix(f1, f2)
    assert g.shape == (2, 3, 4)
    np.testing.assert_allclose(g.numpy(), np_fsp_matrix(f1.numpy(), f2.numpy()), rtol=1e-10)
    gs, gt = [rand(20, 2, 3, 4), rand(21, 2, 2, 2)], [rand(22, 2, 3, 4), rand(23, 2, 2, 2)]
    want = 0.0
    for lam, a, b in zip((0.5, 2.0), gs, gt):
        want += lam * sum(float(((b[n] - a[n]) ** 2).sum()) for n in range(2)) / 2
    assert DF.fsp_loss(gs, gt, (0.5, 2.0)).item() == pytest.approx(want, rel=1e-10)
    # RepDistiller's per-pair mean over B*C1*C2 entries is this divided by C1*C2
    ref = (gt[0] - gs[0]).pow(2).mean().item()
    assert ref == pytest.approx(DF.fsp_loss(gs[:1], gt[:1]).item() / 12, rel=1e-10)


@SETTINGS
@given(seeds, st.integers(1, 4))
def test_fsp_zero_at_agreement_and_nonnegative(seed, b):
    f1, f2 = rand(seed, b, 3, 2, 2), rand(seed + 1, b, 2, 2, 2)
    g = DF.fsp_matrix(f1, f2)
    assert DF.fsp_loss([g], [g.clone()]).item() == 0.0
    assert DF.fsp_loss([g], [DF.fsp_matrix(f1 + 1, f2)]).item() >= 0.0


def test_fsp_shape_errors():
    with pytest.raises(ValueError, match="spatial"):
        DF.fsp_matrix(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 2, 2))
    with pytest.raises(ValueError, match="shapes differ"):
        DF.fsp_loss([torch.randn(2, 3, 3)], [torch.randn(2, 3, 4)])


# ---------------------------------------------------------------------------- ICKD


def test_ickd_matches_loops():
    fs, ft = rand(24, 3, 4, 2, 2), rand(25, 3, 4, 3, 3)  # spatial sizes may differ
    assert DF.ickd_loss(fs, ft).item() == pytest.approx(np_ickd(fs.numpy(), ft.numpy()), rel=1e-10)


@SETTINGS
@given(seeds, st.integers(1, 4), st.integers(1, 5), st.floats(0.1, 10.0))
def test_ickd_zero_at_agreement_nonnegative_and_scale_invariant(seed, b, c, a):
    fs, ft = rand(seed, b, c, 3, 3), rand(seed + 1, b, c, 2, 2)
    assert DF.ickd_loss(ft, ft.clone()).item() == pytest.approx(0.0, abs=1e-12)
    loss = DF.ickd_loss(fs, ft).item()
    assert 0.0 <= loss <= 4.0 / c + 1e-12  # rows of G have unit norm
    assert DF.ickd_loss(fs * a, ft).item() == pytest.approx(loss, rel=1e-9, abs=1e-12)


def test_ickd_needs_equal_channels():
    with pytest.raises(ValueError, match="channel"):
        DF.ickd_loss(torch.randn(2, 3, 2, 2), torch.randn(2, 4, 2, 2))


# ---------------------------------------------------------------------------- methods on synthetic views

B = 6


def make_views(seed: int = 0):
    return cnn_views(B, seed)


@pytest.mark.parametrize("name", NEW)
def test_method_forward_gradients_reach_student_and_adapters_never_teacher(name):
    student, teacher, batch = make_views()
    m = create_method(name)
    with torch.no_grad():
        m.prepare(student, teacher, batch)
    loss = m(student, teacher, batch)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert m.student_taps
    for key in m.student_taps:
        g = student[key].grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, (name, key)
    for key, t in teacher.items():
        assert t.grad is None, (name, key)
    assert student["logits"].grad is None
    params = list(m.named_parameters())
    if name in ("cc", "fsp", "ickd"):
        assert params, name  # channel counts differ in these views: adapters exist
    for pname, p in params:
        assert p.grad is not None and torch.isfinite(p.grad).all(), (name, pname)


@pytest.mark.parametrize("name", ("cc", "fsp", "ickd"))
def test_methods_with_adapters_need_prepare(name):
    student, teacher, batch = make_views()
    m = create_method(name)
    assert m.requires_prepare
    with pytest.raises(RuntimeError, match="prepare"):
        m(student, teacher, batch)


def test_methods_match_functional():
    student, teacher, batch = make_views(1)
    s3, t3 = student["stage3"], teacher["stage3"]
    assert torch.equal(SP()(student, teacher, batch), DF.sp_loss([s3], [t3]))
    assert torch.equal(RKD(distance_weight=1, angle_weight=3)(student, teacher, batch),
                       DF.rkd_loss(student["pool"], teacher["pool"], 1, 3))
    assert torch.equal(PKT()(student, teacher, batch), DF.pkt_loss(student["pool"], teacher["pool"]))
    assert torch.equal(NST()(student, teacher, batch), DF.nst_mmd2(s3, t3))
    cc = CC(adapter=None, gamma=0.3, order=3)
    cc.prepare(student, teacher, batch)
    assert torch.equal(cc(student, teacher, batch), DF.cc_loss(student["pool"], teacher["pool"], 0.3, 3))
    ickd = ICKD()
    ickd.prepare(student, teacher, batch)
    assert isinstance(ickd.adapter, torch.nn.Sequential)
    assert torch.equal(ickd(student, teacher, batch), DF.ickd_loss(ickd.adapter(s3), t3))


def test_nst_pools_the_larger_map_and_names_both_taps_otherwise():
    student, teacher, batch = make_views()
    m = NST(pairs=[("stage1", "stage2")])  # 8x8 student vs 4x4 teacher: pooled
    want = DF.nst_mmd2(torch.nn.functional.avg_pool2d(student["stage1"], 2), teacher["stage2"])
    assert m(student, teacher, batch).item() == pytest.approx(want.item(), rel=1e-6)
    teacher["odd"] = torch.randn(B, 3, 3, 3)
    with pytest.raises(ShapeMismatchError, match="student:stage1.*teacher:odd"):
        NST(pairs=[("stage1", "odd")]).prepare(student, teacher, batch)
    with pytest.raises(ShapeMismatchError, match="student:pool"):
        NST(pairs=[("pool", "stage3")]).prepare(student, teacher, batch)


def test_fsp_adapters_per_link_and_identity_for_equal_channels():
    student, teacher, batch = make_views()
    m = FSP()
    m.prepare(student, teacher, batch)
    assert sorted(m.adapters) == ["stage1__stage1", "stage2__stage2", "stem__stem"]
    assert all(isinstance(a, torch.nn.Conv2d) for a in m.adapters.values())
    # equal widths: no adapter, and the loss is the functional one on the raw maps (stage2 pooled to 4x4)
    same = FSP()
    same.prepare(teacher, teacher, batch)
    assert all(isinstance(a, torch.nn.Identity) for a in same.adapters.values())
    t = {k: v.detach() for k, v in teacher.items()}
    s = {k: v + 0.1 for k, v in t.items()}
    pool = torch.nn.functional.avg_pool2d
    want = DF.fsp_loss(
        [DF.fsp_matrix(s["stem"], s["stage1"]), DF.fsp_matrix(pool(s["stage1"], 2), s["stage2"])],
        [DF.fsp_matrix(t["stem"], t["stage1"]), DF.fsp_matrix(pool(t["stage1"], 2), t["stage2"])],
    )
    assert same(s, t, batch).item() == pytest.approx(want.item(), rel=1e-6)
    assert same(t, t, batch).item() == 0.0


def test_fsp_separate_teacher_pairs_and_lambdas():
    student, teacher, batch = make_views()
    m = FSP(pairs=[("stage2", "stage3")], teacher_pairs=[("stage1", "stage3")], lambdas=[2.0])
    m.prepare(student, teacher, batch)
    assert sorted(m.adapters) == ["stage2__stage1", "stage3__stage3"]
    assert m.student_taps == ["stage2", "stage3"] and m.teacher_taps == ["stage1", "stage3"]
    assert torch.isfinite(m(student, teacher, batch))
    with pytest.raises(ValueError, match="lambdas"):
        FSP(lambdas=[1.0])


def test_relation_methods_accept_any_embedding_sizes_and_check_batches():
    student, teacher, batch = make_views()
    for m in (SP(pairs=[("pool", "stage3")]), RKD(teacher_tap="stage2"), PKT("stage1", "pool")):
        assert torch.isfinite(m(student, teacher, batch))
    teacher["short"] = torch.randn(B - 1, 4)
    with pytest.raises(ShapeMismatchError, match="batch sizes differ"):
        RKD(teacher_tap="short").prepare(student, teacher, batch)
    with pytest.raises(KeyError, match="no tap 'nope'"):
        PKT(student_tap="nope").prepare(student, teacher, batch)


# ---------------------------------------------------------------------------- end to end

CONV_PAIRS = {
    "cnn": (lambda: create("cnn", widths=(4, 8, 8)), lambda: create("cnn", widths=(8, 16, 16))),
    "digits": (lambda: create("cnn_digits_student"), lambda: create("cnn_digits_teacher")),
}
VECTOR_PAIRS = {
    "cnn": CONV_PAIRS["cnn"],
    "digits_mlp": (lambda: create("mlp_digits_student"), lambda: create("cnn_digits_teacher")),
}
CASES = [(n, p) for n in ("nst", "fsp", "ickd", "sp") for p in CONV_PAIRS] + [
    (n, p) for n in ("rkd", "pkt", "cc") for p in VECTOR_PAIRS
]


@pytest.mark.parametrize("name,pair", CASES)
def test_end_to_end_through_the_distiller(name, pair):
    torch.manual_seed(0)
    make_s, make_t = (CONV_PAIRS | VECTOR_PAIRS)[pair]
    student, teacher = make_s(), make_t()
    d = distill.Distiller(student, teacher, losses={"ce": 1.0, name: create_method(name)})
    x, y = torch.randn(8, 1, 8, 8), torch.arange(8) % 10
    d.prepare((x, y))
    params = list(d.trainable_parameters())
    method_params = list(d.methods[name].parameters())
    assert all(any(p is q for q in params) for p in method_params)
    opt = torch.optim.SGD(params, lr=0.01)
    out = d((x, y))
    assert torch.isfinite(out.total) and torch.isfinite(out.parts[name]) and out.parts[name].item() >= 0
    out.total.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    for p in method_params:
        assert p.grad is not None and torch.isfinite(p.grad).all()
    opt.step()


def test_sp_on_pooled_features_of_an_mlp_student():
    student, teacher = create("mlp_digits_student"), create("cnn_digits_teacher")
    d = distill.Distiller(student, teacher, losses={"ce": 1.0, "sp": SP(pairs=[("pool", "stage3")])})
    x, y = torch.randn(8, 1, 8, 8), torch.arange(8) % 10
    d.prepare((x, y))
    out = d((x, y))
    out.total.backward()
    assert torch.isfinite(out.parts["sp"])


def test_fsp_stage_one_with_fit_hint_stage_trains_only_up_to_the_last_fsp_layer():
    torch.manual_seed(0)
    student, teacher = create("cnn", widths=(4, 8, 8)), create("cnn", widths=(8, 16, 16))
    d = distill.Distiller(student, teacher, losses={"ce": 1.0, "fsp": FSP()})
    x, y = torch.randn(16, 1, 8, 8), torch.arange(16) % 10
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    d.prepare((x[:8], y[:8]))
    before = {k: v.detach().clone() for k, v in student.state_dict().items()}
    res = distill.fit_hint_stage(d, loader, method="fsp", epochs=1, lr=0.01, schedule="constant",
                                 progress=False, eval_teacher=False)
    assert "train_fsp" in res.history[0]
    after = student.state_dict()
    assert not torch.equal(before["stage1.body.0.weight"], after["stage1.body.0.weight"])
    assert not torch.equal(before["stage2.body.1.weight"], after["stage2.body.1.weight"])
    assert torch.equal(before["stage3.body.1.weight"], after["stage3.body.1.weight"])
    assert torch.equal(before["fc.weight"], after["fc.weight"])
