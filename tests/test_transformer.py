"""TaT (target-aware transformer, Lin et al. CVPR 2022): one-to-all, patch-group and anchor-point.

Each loss against an independent numpy computation (explicit loops over positions, patches,
groups and pooling windows, explicit softmax), the identity and limiting cases, clear errors for
map sizes the patches or anchors do not divide, the methods on synthetic views (gradients reach
the student and the embeddings, never the teacher) and end to end through the Distiller and ``fit``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _views import CNN_PAIRS, cnn_views, prepare_and_snapshot, prepare_checked, tiny_loader
from hypothesis import given, settings
from hypothesis import strategies as st

import distill
from distill import functional as DF
from distill.adapters import ShapeMismatchError
from distill.batch import Batch
from distill.methods import HierarchicalTaT, TaT, create_method, method_info
from distill.recipes import RecipeError, validate_losses

SETTINGS = settings(max_examples=30, deadline=None)
seeds = st.integers(0, 10_000)


def rand(seed: int, *shape: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def np_tat(q: np.ndarray, k: np.ndarray, v: np.ndarray, t: np.ndarray, temp: float = 1.0) -> tuple[float, float]:
    """Explicit loops: for each query position, softmax over key positions, weighted sum of values."""
    b, c, h, w = q.shape
    hk, wk = k.shape[2:]
    total = 0.0
    for bb in range(b):
        for i in range(h * w):
            qi = q[bb, :, i // w, i % w]
            logits = [float(np.dot(qi, k[bb, :, j // wk, j % wk])) / temp for j in range(hk * wk)]
            m = max(logits)
            e = [math.exp(x - m) for x in logits]
            z = sum(e)
            out = sum((e[j] / z) * v[bb, :, j // wk, j % wk] for j in range(hk * wk))
            total += float(((t[bb, :, i // w, i % w] - out) ** 2).sum())
    return total / (b * c * h * w), total / b


def np_groups(x: np.ndarray, ph: int, pw: int, p: int) -> list[list[np.ndarray]]:
    """For each sample, its groups: p consecutive raster-order patches stacked along the channels."""
    b, _, h, w = x.shape
    patches = [[x[bb, :, i : i + ph, j : j + pw] for i in range(0, h, ph) for j in range(0, w, pw)] for bb in range(b)]
    return [[np.concatenate(ps[k : k + p], axis=0) for k in range(0, len(ps), p)] for ps in patches]


def np_patch_group(q, k, v, t, ph: int, pw: int, p: int, temp: float = 1.0) -> tuple[float, float]:
    """L^P summed over samples and groups, each group its own one-to-all matching (np_tat)."""
    gq, gk, gv, gt = (np_groups(x, ph, pw, p) for x in (q, k, v, t))
    total = 0.0
    for bb in range(q.shape[0]):
        for grp in range(len(gq[bb])):
            one = [g[bb][grp][None] for g in (gq, gk, gv, gt)]  # a batch of one group
            total += np_tat(*one, temp)[1]
    return total / t.size, total / t.shape[0]


def np_anchors(x: np.ndarray, kh: int, kw: int) -> np.ndarray:
    b, c, h, w = x.shape
    out = np.zeros((b, c, h // kh, w // kw))
    for bb in range(b):
        for cc in range(c):
            for u in range(h // kh):
                for v in range(w // kw):
                    window = [x[bb, cc, u * kh + i, v * kw + j] for i in range(kh) for j in range(kw)]
                    out[bb, cc, u, v] = sum(window) / len(window)
    return out


def test_registered_with_paper_family_and_defaults():
    info = method_info("tat")
    assert info.family == "features" and info.paper.arxiv == "2205.10793" and info.paper.year == 2022
    assert info.paper.venue == "CVPR" and "Lin" in info.paper.authors and info.summary
    d = info.defaults
    assert (d["student_tap"], d["teacher_tap"], d["query"], d["embed"]) == ("stage3", "stage3", "teacher", "conv1x1_bn")
    assert (d["temperature"], d["reduction"]) == (1.0, "mean")
    # the classification objective: the whole-map term only, hierarchical terms switched off
    assert (d["whole_weight"], d["patch_weight"], d["anchor_weight"], d["weight"]) == (1.0, 0.0, 0.0, 1.0)


def test_hierarchical_registered_with_the_segmentation_defaults():
    info = method_info("tat_hierarchical")
    assert info.family == "features" and info.paper == method_info("tat").paper and info.summary
    assert info.cls is HierarchicalTaT and issubclass(HierarchicalTaT, TaT)
    d = info.defaults
    # TaT-seg train_voc_resnet18.sh on the 129x129 map: n=m=16 -> 8x8 patches, 64 groups of 256 -> p=4,
    # 32x32 anchors -> kernel 4; ALPHA=0.1 (weight), BETA=1.0 (patch), GAMMA=0.4 (anchor)
    assert (d["patch_size"], d["group_size"], d["anchor_kernel"]) == (8, 4, 4)
    assert (d["whole_weight"], d["patch_weight"], d["anchor_weight"], d["weight"]) == (0.0, 1.0, 0.4, 0.1)
    assert (d["query"], d["embed"], d["reduction"]) == ("teacher", "conv1x1_bn", "mean")
    m = create_method("tat_hierarchical")
    assert m.patch_size == (8, 8) and m.anchor_kernel == (4, 4) and "anchor_kernel=(4, 4)" in repr(m)
    assert HierarchicalTaT("stage1", "stage1", "student").query == "student"  # TaT's positional order
    # recipes validate the arguments from the signature, types included
    assert validate_losses({"tat_hierarchical": {"patch_size": [2, 2]}}) == {"tat_hierarchical": {"patch_size": (2, 2)}}
    with pytest.raises(RecipeError, match="patch_sz: unknown key"):
        validate_losses({"tat_hierarchical": {"patch_sz": 2}})


def test_tat_loss_matches_explicit_softmax_loops():
    q, t = rand(1, 2, 3, 2, 3), rand(2, 2, 3, 2, 3)
    k, v = rand(3, 2, 3, 3, 2), rand(4, 2, 3, 3, 2)  # key/value grid may differ from the query's
    for temp in (1.0, 0.5, 3.0):
        mean, summed = np_tat(q.numpy(), k.numpy(), v.numpy(), t.numpy(), temp)
        assert DF.tat_loss(q, k, v, t, temp).item() == pytest.approx(mean, rel=1e-10)
        assert DF.tat_loss(q, k, v, t, temp, "sum").item() == pytest.approx(summed, rel=1e-10)


def test_tat_attention_rows_are_softmaxes():
    q, k = rand(5, 2, 4, 2, 2), rand(6, 2, 4, 1, 3)
    att = DF.tat_attention(q, k)
    assert att.shape == (2, 4, 3)
    qn, kn = q.numpy().reshape(2, 4, -1), k.numpy().reshape(2, 4, -1)
    for b in range(2):
        for i in range(4):
            e = [math.exp(float(np.dot(qn[b, :, i], kn[b, :, j]))) for j in range(3)]
            for j in range(3):
                assert att[b, i, j].item() == pytest.approx(e[j] / sum(e), rel=1e-10)


@SETTINGS
@given(seeds, st.integers(1, 3), st.integers(1, 4), st.floats(0.3, 4.0))
def test_tat_nonnegative_and_zero_for_uniform_values_matching_teacher(seed, b, c, temp):
    q, k = rand(seed, b, c, 2, 2), rand(seed + 1, b, c, 2, 3)
    t = rand(seed + 2, b, c, 2, 2)
    v = rand(seed + 3, b, c, 2, 3)
    assert DF.tat_loss(q, k, v, t, temp).item() >= 0.0
    # every value position equal to the same vector u: any convex combination is u
    u = rand(seed + 4, b, c, 1, 1)
    assert DF.tat_loss(q, k, u.expand(b, c, 2, 3), u.expand(b, c, 2, 2), temp).item() == pytest.approx(0.0, abs=1e-20)


def test_identity_case_peaked_softmax_gives_small_loss():
    # orthogonal, strongly scaled position features: each position attends (almost) only to itself
    b, c, h, w = 2, 6, 2, 2
    f = torch.zeros(b, c, h, w, dtype=torch.float64)
    for i in range(h * w):
        f[:, i, i // w, i % w] = 10.0
    f = f + 0.01 * rand(7, b, c, h, w)
    assert DF.tat_loss(f, f, f, f).item() < 1e-10
    m = TaT(embed="identity")
    view = {"stage3": f}
    m.prepare(view, view, Batch(torch.zeros(b, 1, 8, 8), torch.zeros(b, dtype=torch.long)))
    assert all(isinstance(p, torch.nn.Identity) for p in (m.theta, m.gamma, m.phi))
    assert m(view, view, None).item() < 1e-10
    # unpeaked (random, same map) it is not zero: the matching mixes positions
    g = rand(8, b, c, h, w)
    assert DF.tat_loss(g, g, g, g, temperature=100.0).item() > 1e-3


def test_rejects_bad_shapes_and_arguments():
    with pytest.raises(ValueError, match="query's shape"):
        DF.tat_loss(rand(0, 2, 3, 2, 2), rand(1, 2, 3, 2, 2), rand(2, 2, 3, 2, 2), rand(3, 2, 4, 2, 2))
    with pytest.raises(ValueError, match="channel"):
        DF.tat_attention(rand(0, 2, 3, 2, 2), rand(1, 2, 4, 2, 2))
    with pytest.raises(ValueError):
        DF.tat_loss(*(rand(i, 1, 2, 2, 2) for i in range(4)), reduction="none")
    for kw in ({"query": "both"}, {"embed": "mlp"}, {"temperature": 0.0}, {"reduction": "max"}):
        with pytest.raises(ValueError):
            TaT(**kw)


# ---------------------------------------------------------------------------- patch-group and anchor-point


def test_patch_groups_layout_by_hand():
    # one sample, 2 channels, a 4x4 map of 2x2 patches: raster order 0 1 / 2 3, groups of two
    x = torch.arange(32, dtype=torch.float64).reshape(1, 2, 4, 4)
    g = DF.tat_patch_groups(x, 2, 2)
    assert g.shape == (2, 4, 2, 2)
    assert torch.equal(g[0, :2], x[0, :, 0:2, 0:2]) and torch.equal(g[0, 2:], x[0, :, 0:2, 2:4])
    assert torch.equal(g[1, :2], x[0, :, 2:4, 0:2]) and torch.equal(g[1, 2:], x[0, :, 2:4, 2:4])
    assert torch.equal(DF.tat_patch_groups(x, (4, 4), 1), x)  # one patch, one group: the map itself
    assert DF.tat_patch_grid(6, 8, (3, 2), 4) == (2, 4, 2)


@pytest.mark.parametrize(
    ("hw", "patch", "p"),
    # (2, 2) patches of a 4x6 map in pairs: the middle group spans the end of one patch row and the next
    [((4, 6), (2, 3), 2), ((4, 6), (2, 2), 3), ((4, 6), (2, 2), 2), ((4, 4), (1, 2), 8), ((4, 6), (4, 6), 1),
     ((2, 4), (1, 1), 1)],
)
def test_patch_group_loss_matches_explicit_loops(hw, patch, p):
    (h, w), (ph, pw) = hw, patch
    q, t = rand(1, 2, 3, h, w), rand(2, 2, 3, h, w)
    k, v = rand(3, 2, 3, h, w), rand(4, 2, 3, h, w)
    for temp in (1.0, 0.5):
        mean, summed = np_patch_group(*(x.numpy() for x in (q, k, v, t)), ph, pw, p, temp)
        assert DF.tat_patch_group_loss(q, k, v, t, patch, p, temp).item() == pytest.approx(mean, rel=1e-10)
        assert DF.tat_patch_group_loss(q, k, v, t, patch, p, temp, "sum").item() == pytest.approx(summed, rel=1e-10)


def test_patch_group_limits_whole_map_and_one_to_one():
    q, k, v, t = (rand(i, 2, 3, 4, 6) for i in range(4))
    # a single patch covering the map: the one-to-all TaT of the whole map
    assert torch.allclose(DF.tat_patch_group_loss(q, k, v, t, (4, 6), 1), DF.tat_loss(q, k, v, t), rtol=1e-12)
    # 1x1 patches alone in their group: each softmax has one entry, the one-to-one squared error
    assert DF.tat_patch_group_loss(q, k, v, t, 1, 1).item() == pytest.approx(((t - v) ** 2).mean().item(), rel=1e-12)


@pytest.mark.parametrize(("kernel", "kh", "kw"), [(2, 2, 2), ((1, 3), 1, 3), ((4, 2), 4, 2)])
def test_anchor_loss_matches_explicit_window_means(kernel, kh, kw):
    q, t = rand(5, 2, 3, 4, 6), rand(6, 2, 3, 4, 6)
    k, v = rand(7, 2, 3, 8, 6), rand(8, 2, 3, 8, 6)  # the student grid may differ with teacher queries
    anchors = DF.tat_anchors(q, kernel)
    assert np.allclose(anchors.numpy(), np_anchors(q.numpy(), kh, kw), rtol=1e-12)
    for temp in (1.0, 2.0):
        mean, summed = np_tat(*(np_anchors(x.numpy(), kh, kw) for x in (q, k, v, t)), temp)
        assert DF.tat_anchor_loss(q, k, v, t, kernel, temp).item() == pytest.approx(mean, rel=1e-10)
        assert DF.tat_anchor_loss(q, k, v, t, kernel, temp, "sum").item() == pytest.approx(summed, rel=1e-10)
    # kernel 1: the anchors are the pixels, the whole-map TaT
    assert torch.allclose(DF.tat_anchor_loss(q, k, v, t, 1), DF.tat_loss(q, k, v, t), rtol=1e-12)


@SETTINGS
@given(seeds, st.integers(1, 2), st.integers(1, 3), st.sampled_from([(1, 1, 4), (2, 1, 2), (1, 2, 4), (2, 2, 1)]))
def test_hierarchical_terms_nonnegative_scaled_and_zero_for_uniform_values(seed, b, c, spec):
    ph, pw, p = spec
    q, k, v, t = (rand(seed + i, b, c, 4, 4) for i in range(4))
    pg = DF.tat_patch_group_loss(q, k, v, t, (ph, pw), p)
    an = DF.tat_anchor_loss(q, k, v, t, (ph, pw))
    assert pg.item() >= 0 and an.item() >= 0
    # "sum" is the per-sample squared norm: C·H·W times "mean" (anchor maps: C·H·W / (kh·kw))
    assert DF.tat_patch_group_loss(q, k, v, t, (ph, pw), p, reduction="sum").item() == pytest.approx(
        pg.item() * c * 16, rel=1e-10)
    assert DF.tat_anchor_loss(q, k, v, t, (ph, pw), reduction="sum").item() == pytest.approx(
        an.item() * c * 16 / (ph * pw), rel=1e-10)
    # values equal to one vector u everywhere, teacher too: every convex combination is u
    u = rand(seed + 9, b, c, 1, 1).expand(b, c, 4, 4)
    assert DF.tat_patch_group_loss(q, k, u, u, (ph, pw), p).item() == pytest.approx(0.0, abs=1e-20)
    assert DF.tat_anchor_loss(q, k, u, u, (ph, pw)).item() == pytest.approx(0.0, abs=1e-20)


def test_hierarchical_rejects_sizes_that_do_not_divide_the_map():
    q = rand(0, 2, 3, 6, 4)
    with pytest.raises(ValueError, match=r"patch_size \(4, 4\) must divide the 6x4 map"):
        DF.tat_patch_groups(q, 4, 1)
    with pytest.raises(ValueError, match=r"group_size 4 must divide the 6 patches \(3x2"):
        DF.tat_patch_group_loss(q, q, q, q, 2, 4)
    with pytest.raises(ValueError, match=r"anchor kernel \(4, 4\) must divide the 6x4 map"):
        DF.tat_anchors(q, 4)
    with pytest.raises(ValueError, match="anchor kernel"):
        DF.tat_anchor_loss(q, rand(1, 2, 3, 8, 8), rand(2, 2, 3, 8, 8), q, (3, 4))  # fits the key, not the query
    for bad in (0, (2,), (2, 0), True, (2.0, 2)):
        with pytest.raises(ValueError, match="positive int"):
            DF.tat_patch_grid(4, 4, bad)
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="group_size"):
            DF.tat_patch_grid(4, 4, 2, bad)
    with pytest.raises(ValueError, match="one spatial size"):
        DF.tat_patch_group_loss(q, rand(1, 2, 3, 4, 4), rand(2, 2, 3, 4, 4), q, 2, 1)
    with pytest.raises(ValueError, match="reduction"):
        DF.tat_patch_group_loss(q, q, q, q, 2, 1, reduction="none")
    with pytest.raises(ValueError, match="query's shape"):
        DF.tat_anchor_loss(q, q, q, rand(3, 2, 3, 4, 6), 2)


# ---------------------------------------------------------------------------- method on synthetic views

B = 6
# stage1: 8x8 maps (student 4, teacher 8 channels): 2x2 patches in groups of 4, 2x2 anchors
HIER = {"student_tap": "stage1", "teacher_tap": "stage1", "patch_size": 2, "group_size": 4, "anchor_kernel": 2}


def make_views(seed: int = 0):
    """Leaves for the taps; teacher leaves require grad too, to catch leaks."""
    return cnn_views(B, seed)


@pytest.mark.parametrize("query", ["teacher", "student"])
def test_gradients_reach_student_and_embeddings_never_teacher(query):
    student, teacher, batch = make_views()
    m = create_method("tat", query=query)
    params = prepare_checked(m, student, teacher, batch)
    assert {n.split(".")[0] for n, _ in params} == {"theta", "gamma", "phi"}
    loss = m(student, teacher, batch)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.item() >= 0
    loss.backward()
    assert student["stage3"].grad is not None and student["stage3"].grad.abs().sum() > 0
    assert student["logits"].grad is None and student["stage2"].grad is None
    for key, t in teacher.items():
        assert t.grad is None, key
    for name, p in params:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("query", ["teacher", "student"])
@pytest.mark.parametrize("whole_weight", [0.0, 0.5])
def test_hierarchical_gradients_reach_student_and_embeddings_never_teacher(query, whole_weight):
    student, teacher, batch = make_views(3)
    m = create_method("tat_hierarchical", query=query, whole_weight=whole_weight, **HIER)
    with pytest.raises(RuntimeError, match="HierarchicalTaT.prepare"):
        m(student, teacher, batch)
    with torch.no_grad():
        m.prepare(student, teacher, batch)
    params = list(m.named_parameters())
    assert {n.split(".")[0] for n, _ in params} == {"theta", "gamma", "phi"}
    loss = m(student, teacher, batch)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert student["stage1"].grad is not None and student["stage1"].grad.abs().sum() > 0
    assert all(student[key].grad is None for key in student if key != "stage1")
    for key, t in teacher.items():
        assert t.grad is None, key
    for name, p in params:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_method_matches_functional_in_both_arrangements():
    student, teacher, batch = make_views(1)
    s, t = student["stage3"], teacher["stage3"]
    for query in ("teacher", "student"):
        m = TaT(query=query, temperature=2.0, reduction="sum")
        m.prepare(student, teacher, batch)
        conv = m.gamma[0]
        assert isinstance(conv, torch.nn.Conv2d) and conv.kernel_size == (1, 1) and conv.out_channels == 16
        qkv = (m.theta(t), m.gamma(s), m.phi(s)) if query == "teacher" else (m.gamma(s), m.theta(t), m.phi(s))
        want = DF.tat_loss(*qkv, t, 2.0, "sum")
        assert torch.allclose(m(student, teacher, batch), want)


@pytest.mark.parametrize("query", ["teacher", "student"])
def test_method_is_the_weighted_sum_of_the_functional_terms(query):
    student, teacher, batch = make_views(4)
    s, t = student["stage1"], teacher["stage1"].detach()
    m = TaT(query=query, whole_weight=0.3, patch_weight=0.7, anchor_weight=0.2, reduction="sum", **HIER)
    m.prepare(student, teacher, batch)
    m.eval()  # BatchNorm on running statistics: the embeddings are fixed functions to compare against
    q, k = (m.theta(t), m.gamma(s)) if query == "teacher" else (m.gamma(s), m.theta(t))
    v = m.phi(s)
    want = (0.3 * DF.tat_loss(q, k, v, t, reduction="sum")
            + 0.7 * DF.tat_patch_group_loss(q, k, v, t, 2, 4, reduction="sum")
            + 0.2 * DF.tat_anchor_loss(q, k, v, t, 2, reduction="sum"))
    assert torch.allclose(m(student, teacher, batch), want)
    # one term alone, same embeddings: exactly that term (unweighted)
    only_anchor = TaT("stage1", "stage1", query=query, whole_weight=0.0, anchor_weight=1.0, anchor_kernel=2)
    only_anchor.prepare(student, teacher, batch)
    only_anchor.load_state_dict(m.state_dict())
    only_anchor.eval()
    assert torch.allclose(only_anchor(student, teacher, batch), DF.tat_anchor_loss(q, k, v, t, 2))


def test_hierarchical_checks_map_sizes_at_prepare_with_the_tap_names():
    student, teacher, batch = make_views(5)
    # the 2x2 stage3 maps: the default 8x8 patches do not fit; the error names both taps
    with pytest.raises(ShapeMismatchError, match=r"student:stage3 .*teacher:stage3 .*patch_size \(8, 8\)"):
        create_method("tat_hierarchical").prepare(student, teacher, batch)
    with pytest.raises(ShapeMismatchError, match=r"group_size 4 must divide the 1 patches"):
        create_method("tat_hierarchical", patch_size=2).prepare(student, teacher, batch)
    with pytest.raises(ShapeMismatchError, match=r"anchor kernel \(4, 4\) must divide the 2x2 map"):
        create_method("tat_hierarchical", patch_size=1).prepare(student, teacher, batch)
    # patch groups pair student and teacher patches by position: equal sizes, either query
    with pytest.raises(ShapeMismatchError, match="patch-group distillation"):
        create_method("tat_hierarchical", student_tap="stage2", teacher_tap="stage1", patch_size=1,
                      anchor_kernel=1).prepare(student, teacher, batch)
    # anchors alone with teacher queries: different grids are fine when the kernel divides both
    m = create_method("tat_hierarchical", student_tap="stage2", teacher_tap="stage1", patch_weight=0.0,
                      anchor_kernel=2)
    m.prepare(student, teacher, batch)
    assert torch.isfinite(m(student, teacher, batch))
    # a term switched off puts no constraint on the maps: plain tat on 2x2 maps with the 8x8 default patch size
    TaT().prepare(student, teacher, batch)


def test_method_rejects_bad_hierarchical_arguments():
    with pytest.raises(ValueError, match="at least one of"):
        TaT(whole_weight=0.0)
    for kw in ({"patch_weight": -1.0}, {"anchor_weight": float("nan")}):
        with pytest.raises(ValueError, match=">= 0"):
            TaT(**kw)
    for kw in ({"patch_size": 0}, {"patch_size": (2, 2, 2)}, {"group_size": 0}, {"anchor_kernel": (0, 2)}):
        with pytest.raises(ValueError):
            create_method("tat_hierarchical", **kw)


def test_teacher_query_allows_different_spatial_sizes_student_query_does_not():
    student, teacher, batch = make_views(2)
    m = TaT(student_tap="stage3", teacher_tap="stage2")
    m.prepare(student, teacher, batch)
    assert torch.isfinite(m(student, teacher, batch))
    with pytest.raises(ShapeMismatchError, match="spatial"):
        TaT(student_tap="stage3", teacher_tap="stage2", query="student").prepare(student, teacher, batch)
    with pytest.raises(ShapeMismatchError, match="identity"):
        TaT(embed="identity").prepare(student, teacher, batch)


# ---------------------------------------------------------------------------- end to end

PAIRS = CNN_PAIRS


CONFIGS = {"tat": ("tat", {}), "hierarchical": ("tat_hierarchical", HIER),
           "all_terms_student_query": ("tat", {**HIER, "patch_weight": 1.0, "anchor_weight": 0.4, "query": "student"})}


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_end_to_end_fit_through_the_distiller(pair, config, tmp_path):
    torch.manual_seed(0)
    student, teacher = PAIRS[pair]()
    teacher_params = [p.detach().clone() for p in teacher.parameters()]
    name, kwargs = CONFIGS[config]
    method = create_method(name, **kwargs)
    d = distill.Distiller(student, teacher, losses={"ce": 1.0, "tat": method})
    x, y, loader = tiny_loader()
    method_params, before = prepare_and_snapshot(d, method, loader)
    res = distill.fit(d, loader, loader, epochs=1, lr=0.01, schedule="constant", run_dir=tmp_path, progress=False)
    assert len(res.history) == 1
    assert any(not torch.equal(a, p) for a, p in zip(before, method_params))
    assert all(torch.equal(a, p) for a, p in zip(teacher_params, teacher.parameters()))
    d.eval()
    out = d((x[:4], y[:4]))
    assert torch.isfinite(out.parts["tat"]) and out.parts["tat"].item() >= 0
