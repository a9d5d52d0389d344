"""IRG and DarkRank: losses against explicit loops, properties, gradient isolation, end to end."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import distill
from distill import functional as DF
from distill.batch import Batch
from distill.methods import IRG, DarkRank, create_method, method_info
from distill.models import create

SETTINGS = settings(max_examples=30, deadline=None)
seeds = st.integers(0, 10_000)


def rand(seed: int, *shape: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


# ---------------------------------------------------------------------------- numpy references


def np_dist(a, b, squared=False):
    sq = sum((float(x) - float(y)) ** 2 for x, y in zip(a.ravel(), b.ravel()))
    return sq if squared else math.sqrt(sq)


def np_edge(f, squared=False, normalize=True):
    b = f.shape[0]
    a = np.array([[0.0 if i == j else np_dist(f[i], f[j], squared) for j in range(b)] for i in range(b)])
    return a / a.max() if normalize else a


def np_irg(vs, vt, fs_list, ft_list, s_pair, t_pair, lv, le, lt, squared=True):
    b = vs.shape[0]
    vert = sum((vs[i, k] - vt[i, k]) ** 2 for i in range(b) for k in range(vs.shape[1])) / vs.size
    edge = 0.0
    for fs, ft in zip(fs_list, ft_list):
        es, et = np_edge(fs, squared), np_edge(ft, squared)
        edge += sum((et[i, j] - es[i, j]) ** 2 for i in range(b) for j in range(b)) / b**2

    def trans(f1, f2):  # here f1 is a (B, C, H, W) map, f2 a (B, C) vector: global average pool
        g1 = f1.mean(axis=(2, 3))
        d = np.array([np_dist(g1[i], f2[i], squared) for i in range(b)])
        return d / d.max()

    ts, tt = trans(*s_pair), trans(*t_pair)
    tran = sum((tt[i] - ts[i]) ** 2 for i in range(b)) / b
    return lv * vert + le * edge + lt * tran


def np_scores(f, alpha, beta, normalize=True):
    f = f.reshape(f.shape[0], -1)
    if normalize:
        f = np.array([row / math.sqrt(float(np.dot(row, row))) for row in f])
    b = f.shape[0]
    return np.array([[-alpha * np_dist(f[i], f[j]) ** beta for j in range(b)] for i in range(b)])


def np_perm_prob(scores, perm):
    """Plackett–Luce probability of ``perm`` as the explicit product."""
    p = 1.0
    for k in range(len(perm)):
        p *= math.exp(scores[perm[k]]) / sum(math.exp(scores[perm[m]]) for m in range(k, len(perm)))
    return p


def np_teacher_rank(t_scores, q, n=None):
    others = [j for j in range(len(t_scores)) if j != q]
    others.sort(key=lambda j: -t_scores[q, j])
    return others if n is None else others[:n]


def np_darkrank_hard(s, t, alpha=3.0, beta=3.0, n=None):
    ss, ts = np_scores(s, alpha, beta), np_scores(t, alpha, beta)
    b = len(s)
    total = 0.0
    for q in range(b):
        order = np_teacher_rank(ts, q, n)
        total += -math.log(np_perm_prob({j: ss[q, j] for j in order}, order))
    return total / b


def np_darkrank_soft(s, t, alpha=3.0, beta=3.0, n=4):
    ss, ts = np_scores(s, alpha, beta), np_scores(t, alpha, beta)
    b = len(s)
    total = 0.0
    for q in range(b):
        cand = np_teacher_rank(ts, q, n)
        for perm in itertools.permutations(cand):
            pt = np_perm_prob({j: ts[q, j] for j in cand}, list(perm))
            ps = np_perm_prob({j: ss[q, j] for j in cand}, list(perm))
            total += pt * math.log(pt / ps)
    return total / b


# ---------------------------------------------------------------------------- registry


def test_registered_with_paper_and_defaults():
    irg = method_info("irg")
    assert irg.family == "relations" and irg.paper.venue == "CVPR" and irg.paper.year == 2019 and irg.paper.arxiv is None
    assert irg.defaults["student_taps"] == ("stage3", "pool") and irg.defaults["vertex_tap"] == "logits"
    assert (irg.defaults["vertex_weight"], irg.defaults["edge_weight"], irg.defaults["transformation_weight"]) == (
        0.1, 5.0, 5.0)
    assert irg.defaults["squared"] is True and irg.defaults["normalize"] is True  # the authors' Caffe layers
    dr = method_info("darkrank")
    assert dr.family == "relations" and dr.paper.arxiv == "1707.01220" and dr.paper.venue == "AAAI"
    assert dr.paper.year == 2018
    assert (dr.defaults["alpha"], dr.defaults["beta"], dr.defaults["variant"]) == (3.0, 3.0, "hard")
    assert dr.defaults["student_tap"] == "pool" and dr.defaults["list_length"] is None
    for info in (irg, dr):
        assert info.defaults["weight"] == 1.0 and info.defaults["warmup_epochs"] == 0
        assert info.summary and info.cls.needs_teacher and info.paper.title and info.paper.authors


# ---------------------------------------------------------------------------- IRG


def test_irg_edge_matrix_matches_loops():
    f = rand(1, 4, 2, 2, 3)
    for squared in (False, True):
        for normalize in (False, True):
            got = DF.irg_edge_matrix(f, squared, normalize).numpy()
            assert np.allclose(got, np_edge(f.numpy(), squared, normalize), rtol=1e-10, atol=1e-12)


def test_irg_loss_matches_loops():
    b = 4
    vs, vt = rand(2, b, 5), rand(3, b, 5)
    fs3, ft3 = rand(4, b, 3, 2, 2), rand(5, b, 6, 2, 2)
    ps, pt = rand(6, b, 3), rand(7, b, 6)
    args = ([fs3.numpy(), ps.numpy()], [ft3.numpy(), pt.numpy()], (fs3.numpy(), ps.numpy()), (ft3.numpy(), pt.numpy()))
    got = DF.irg_loss(vs, vt, [fs3, ps], [ft3, pt], (fs3, ps), (ft3, pt), 0.1, 5.0, 5.0).item()
    # the default is the authors' squared, max-normalised distances
    assert got == pytest.approx(np_irg(vs.numpy(), vt.numpy(), *args, 0.1, 5.0, 5.0), rel=1e-10)
    plain = DF.irg_loss(vs, vt, [fs3, ps], [ft3, pt], (fs3, ps), (ft3, pt), 0.1, 5.0, 5.0, squared=False).item()
    assert plain == pytest.approx(np_irg(vs.numpy(), vt.numpy(), *args, 0.1, 5.0, 5.0, squared=False), rel=1e-10)
    assert plain != pytest.approx(got, rel=1e-3)
    # the parts add up
    parts = (0.1 * DF.irg_vertex_loss(vs, vt) + 5.0 * DF.irg_edge_loss([fs3, ps], [ft3, pt])
             + 5.0 * DF.irg_transformation_loss((fs3, ps), (ft3, pt)))
    assert got == pytest.approx(parts.item(), rel=1e-12)


def test_irg_match_layers_pools_space_and_groups_channels():
    a = rand(8, 2, 4, 4, 4)
    b = rand(9, 2, 8, 2, 2)
    x, y = DF.irg_match_layers(a, b)
    assert x.shape == y.shape == (2, 4, 2, 2)
    assert torch.allclose(x, torch.nn.functional.avg_pool2d(a, 2))
    # consecutive channel pairs are averaged (the reference code's (c[0::2] + c[1::2]) / 2)
    assert torch.allclose(y, (b[:, 0::2] + b[:, 1::2]) / 2)
    with pytest.raises(ValueError, match="channel"):
        DF.irg_match_layers(rand(1, 2, 3, 2, 2), rand(2, 2, 4, 2, 2))


@SETTINGS
@given(seeds, st.integers(2, 6), st.floats(-5.0, 5.0), st.floats(0.1, 10.0))
def test_irg_edges_and_transformation_invariant_to_translation_and_scale_zero_at_agreement(seed, b, shift, a):
    fs, ft = rand(seed, b, 3, 2, 2), rand(seed + 1, b, 5)
    loss = DF.irg_edge_loss([fs], [ft]).item()
    assert loss >= 0
    assert DF.irg_edge_loss([fs + shift], [ft]).item() == pytest.approx(loss, rel=1e-8, abs=1e-12)
    assert DF.irg_edge_loss([fs * a], [ft]).item() == pytest.approx(loss, rel=1e-8, abs=1e-12)
    assert DF.irg_edge_loss([ft], [ft.clone()]).item() == pytest.approx(0.0, abs=1e-14)
    p1, p2 = rand(seed + 2, b, 4, 2, 2), rand(seed + 3, b, 4)
    assert DF.irg_transformation_loss((p1, p2), (p1.clone(), p2.clone())).item() == pytest.approx(0.0, abs=1e-14)
    v = rand(seed + 4, b, 3)
    assert DF.irg_vertex_loss(v, v.clone()).item() == 0.0
    full = DF.irg_loss(v, v.clone(), [ft], [ft.clone()], (p1, p2), (p1.clone(), p2.clone()))
    assert full.item() == pytest.approx(0.0, abs=1e-13)


def test_irg_coincident_instances_have_finite_gradients():
    f = rand(10, 4, 3)
    f[1] = f[0]
    f.requires_grad_(True)
    DF.irg_edge_loss([f], [rand(11, 4, 2)]).backward()
    assert torch.isfinite(f.grad).all()


# ---------------------------------------------------------------------------- DarkRank


def test_darkrank_scores_match_loops():
    f = rand(20, 4, 3)
    for normalize in (True, False):
        got = DF.darkrank_scores(f, 3.0, 3.0, normalize)
        want = np_scores(f.numpy(), 3.0, 3.0, normalize)
        off = ~torch.eye(4, dtype=torch.bool)
        assert np.allclose(got[off].numpy(), want[off.numpy()], rtol=1e-9)


def test_listmle_log_prob_is_the_product_formula():
    s = rand(21, 3, 5)
    got = DF.listmle_log_prob(s).exp()
    for r in range(3):
        want = np_perm_prob(s[r].numpy(), list(range(5)))
        assert got[r].item() == pytest.approx(want, rel=1e-12)
    # a distribution over the n! permutations
    perms = torch.tensor(list(itertools.permutations(range(4))))
    assert DF.listmle_log_prob(s[0, :4][perms]).exp().sum().item() == pytest.approx(1.0, rel=1e-12)


def test_darkrank_hard_and_soft_match_loops():
    s, t = rand(22, 4, 3), rand(23, 4, 6)
    assert DF.darkrank_hard_loss(s, t).item() == pytest.approx(np_darkrank_hard(s.numpy(), t.numpy()), rel=1e-10)
    assert DF.darkrank_hard_loss(s, t, 2.0, 1.5, list_length=2).item() == pytest.approx(
        np_darkrank_hard(s.numpy(), t.numpy(), 2.0, 1.5, n=2), rel=1e-10)
    s5, t5 = rand(24, 5, 3), rand(25, 5, 4)
    assert DF.darkrank_soft_loss(s5, t5, list_length=3).item() == pytest.approx(
        np_darkrank_soft(s5.numpy(), t5.numpy(), n=3), rel=1e-9)


def test_darkrank_teacher_ranking_excludes_the_anchor_even_with_duplicates():
    t = rand(26, 4, 3)
    t[2] = t[0]  # anchor 0 and sample 2 coincide: both score the maximum
    order = DF.darkrank_teacher_ranking(DF.darkrank_scores(t))
    for q in range(4):
        assert q not in order[q].tolist() and len(set(order[q].tolist())) == 3
    assert order[0, 0].item() == 2


@SETTINGS
@given(seeds, st.integers(2, 6), st.floats(-5.0, 5.0))
def test_darkrank_invariant_to_translation_without_normalisation_and_soft_zero_at_agreement(seed, b, shift):
    s, t = rand(seed, b, 3), rand(seed + 1, b, 4)
    hard = DF.darkrank_hard_loss(s, t, normalize=False).item()
    assert hard >= 0  # a negative log-likelihood
    assert DF.darkrank_hard_loss(s + shift, t + shift, normalize=False).item() == pytest.approx(hard, rel=1e-8,
                                                                                                  abs=1e-10)
    # with normalisation: invariant to per-sample positive scaling instead
    scales = torch.rand(b, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3 + 0.1
    assert DF.darkrank_hard_loss(s * scales, t).item() == pytest.approx(DF.darkrank_hard_loss(s, t).item(),
                                                                         rel=1e-8, abs=1e-10)
    assert DF.darkrank_soft_loss(t, t.clone(), list_length=3).item() == pytest.approx(0.0, abs=1e-12)
    assert DF.darkrank_soft_loss(s, t, list_length=3).item() >= -1e-12


def test_darkrank_hard_is_lower_when_student_agrees_with_teacher_ranking():
    t = rand(27, 6, 4)
    agree = DF.darkrank_hard_loss(t.clone() * 1.0, t, normalize=False, alpha=50.0, beta=1.0).item()
    other = DF.darkrank_hard_loss(rand(28, 6, 4), t, normalize=False, alpha=50.0, beta=1.0).item()
    assert agree < 0.1 < other  # sharp scores: the teacher's own ranking is near-certain


# ---------------------------------------------------------------------------- methods on synthetic views

B = 6


def make_views(seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape):
        return torch.randn(*shape, generator=g).requires_grad_(True)

    student = {"logits": leaf(B, 10), "stage2": leaf(B, 6, 4, 4), "stage3": leaf(B, 6, 2, 2), "pool": leaf(B, 6)}
    teacher = {"logits": leaf(B, 10), "stage2": leaf(B, 8, 4, 4), "stage3": leaf(B, 16, 2, 2), "pool": leaf(B, 16)}
    return student, teacher, Batch(torch.zeros(B, 1, 8, 8), torch.arange(B) % 10)


@pytest.mark.parametrize("name,kwargs", [("irg", {}), ("darkrank", {}), ("darkrank", {"variant": "soft"})])
def test_gradients_reach_student_never_teacher(name, kwargs):
    student, teacher, batch = make_views()
    m = create_method(name, **kwargs)
    with torch.no_grad():
        m.prepare(student, teacher, batch)
    loss = m(student, teacher, batch)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    for key in m.student_taps:
        g = student[key].grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, (name, key)
    for key, t in teacher.items():
        assert t.grad is None, (name, key)
    if name == "irg":
        assert student["logits"].grad is not None and student["logits"].grad.abs().sum() > 0
        assert sorted(m.student_taps) == ["pool", "stage2", "stage3"]
    else:
        assert student["logits"].grad is None


def test_methods_match_functional():
    student, teacher, batch = make_views(1)
    m = IRG()
    got = m(student, teacher, batch)
    d = {k: v.detach() for k, v in teacher.items()}
    want = DF.irg_loss(student["logits"], d["logits"], [student["stage3"], student["pool"]], [d["stage3"], d["pool"]],
                       (student["stage2"], student["stage3"]), (d["stage2"], d["stage3"]))
    assert torch.allclose(got, want)
    dr = DarkRank(list_length=3)
    assert torch.allclose(dr(student, teacher, batch), DF.darkrank_hard_loss(student["pool"], d["pool"], list_length=3))


def test_irg_errors_name_the_taps():
    student, teacher, batch = make_views()
    teacher["stage2"] = torch.randn(B, 5, 4, 4)  # 5 vs 16 channels: not divisible
    with pytest.raises(ValueError, match="teacher:stage2"):
        IRG().prepare(student, teacher, batch)
    with pytest.raises(KeyError, match="hidden1"):
        IRG(student_taps=("hidden1",), teacher_taps=("pool",))(student, teacher, batch)
    with pytest.raises(ValueError, match="vertex"):
        IRG(vertex_tap="pool")(student, teacher, batch)
    with pytest.raises(ValueError):
        DarkRank(variant="ranked")


# ---------------------------------------------------------------------------- end to end

PAIRS = {
    "cnn": (lambda: create("cnn", widths=(4, 8, 8)), lambda: create("cnn", widths=(8, 16, 16))),
    "digits_mlp": (lambda: create("mlp_digits_student"), lambda: create("cnn_digits_teacher")),
}
CASES = [
    ("irg", "cnn", {}),
    # the MLP has no maps: edges on the pooled features, vertices on the logits, no transformation
    ("irg", "digits_mlp", {"student_taps": ("pool",), "student_transform": None}),
    ("darkrank", "cnn", {}),
    ("darkrank", "digits_mlp", {}),
    ("darkrank", "digits_mlp", {"variant": "soft"}),
]


@pytest.mark.parametrize("name,pair,kwargs", CASES)
def test_end_to_end_through_the_distiller_and_fit(name, pair, kwargs):
    torch.manual_seed(0)
    make_s, make_t = PAIRS[pair]
    student, teacher = make_s(), make_t()
    d = distill.Distiller(student, teacher, losses={"ce": 1.0, name: create_method(name, **kwargs)})
    x, y = torch.randn(16, 1, 8, 8), torch.arange(16) % 10
    d.prepare((x[:8], y[:8]))
    out = d((x[:8], y[:8]))
    assert torch.isfinite(out.total) and torch.isfinite(out.parts[name]) and out.parts[name].item() >= 0
    out.total.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    distill.fit(d, loader, epochs=1, progress=False)
